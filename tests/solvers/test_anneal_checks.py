"""Simulated annealing (``anneal``): what the solver passes to its kernel, its defaults, the
schedule's ends and its checks (tests from mutation testing, helper-123)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qround import QroundError
from qround.solvers import _kernels
from qround.solvers.anneal import Anneal, beta_schedule

from ..conftest import make_problem


def _kernel_run(solver, p, start, seed):
    """The kernel called by hand with the solver's schedule, restarts and order."""
    rng = np.random.default_rng(seed)
    args = _kernels.kernel_inputs(p, start, rng)
    best, _ = _kernels.anneal_kernel(
        args["hess"], args["step"], args["grad"], args["start"], args["fields"], args["energy"],
        args["free_idx"], args["nfree"], solver.betas(p, start), solver.restarts,
        solver.order == "random", args["seeds"], False, _kernels.NO_CSR)
    return best.astype(bool)


@pytest.mark.parametrize("order", ["random", "sequential"])
@pytest.mark.parametrize("restarts", [1, 3])
def test_solve_runs_the_kernel_with_its_order_and_restarts(order, restarts):
    # a hot, short schedule: the order of the visits and the number of runs change the result
    p = make_problem(m=8, n=14, seed=3)
    start = p.rtn_choices()
    solver = Anneal(num_sweeps=4, restarts=restarts, order=order, hot_accept=0.9,
                    cold_accept=0.5)
    got = solver.solve(p, seed=5).choices
    np.testing.assert_array_equal(got, _kernel_run(solver, p, start, 5))


def test_order_and_restarts_change_the_search():
    # the two settings above are not vacuous on this problem: each changes the codes
    p = make_problem(m=8, n=14, seed=3)
    kw = dict(num_sweeps=4, hot_accept=0.9, cold_accept=0.5)
    base = Anneal(**kw).solve(p, seed=5).choices
    assert not np.array_equal(base, Anneal(order="sequential", **kw).solve(p, seed=5).choices)
    assert not np.array_equal(base, Anneal(restarts=3, **kw).solve(p, seed=5).choices)


def test_defaults_are_the_documented_ones():
    a = Anneal()
    assert (a.num_sweeps, a.restarts, a.order) == (1000, 1, "random")
    assert (a.hot_accept, a.cold_accept, a.cold_quantile) == (0.1, 1e-6, 0.05)
    assert a.beta_schedule_type == "geometric" and a.beta_range is None
    p = make_problem(m=3, n=8, seed=1)
    assert a.solve(p, seed=0).info["sweeps"] == 1000
    assert Anneal(num_sweeps=7, restarts=3).solve(p, seed=0).info["sweeps"] == 21


def test_one_sweep_schedule_is_the_cold_end():
    # as in dwave-samplers, a single inverse temperature is the range's end (beta_max)
    p = make_problem(m=4, n=10, seed=1)
    start = p.rtn_choices()
    one = beta_schedule(p, start, 1)
    many = beta_schedule(p, start, 20)
    assert one.shape == (4, 1)
    np.testing.assert_allclose(one[:, 0], many[:, -1], rtol=1e-12)
    assert np.all(one[:, 0] > many[:, 0])


def test_schedule_never_cools_down_backwards():
    # cold_quantile 1 (the largest delta) with nearly equal accept rates would put beta_max
    # below beta_min: the end is raised to the start, so the schedule never heats up
    p = make_problem(m=5, n=10, seed=2)
    start = p.rtn_choices()
    betas = Anneal(num_sweeps=12, hot_accept=0.5, cold_accept=0.4,
                   cold_quantile=1.0).betas(p, start)
    assert np.all(np.diff(betas, axis=1) >= -1e-12 * betas.max())
    np.testing.assert_allclose(betas[:, -1], betas[:, 0], rtol=1e-12)   # raised to beta_min


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta_range=(10.0, 1.0)), "beta_range must grow"),
    (dict(hot_accept=0.01, cold_accept=0.1), "cold_accept <= hot_accept"),
    (dict(beta_schedule=[1.0, -0.5]), ">= 0"),
])
def test_inconsistent_ranges_are_refused(kwargs, match):
    with pytest.raises(QroundError, match=match):
        Anneal(**kwargs)
    Anneal(beta_range=(2.0, 2.0))   # an equal start and end is a constant temperature


def test_custom_schedule_is_read_only_on_the_solver():
    a = Anneal(beta_schedule=[0.5, 1.0, 2.0])
    with pytest.raises(ValueError):
        a.beta_schedule[0] = 100.0
    np.testing.assert_array_equal(a.steps(1), [[0.5, 1.0, 2.0]])


def test_custom_schedule_leaves_the_callers_array_alone():
    betas = np.geomspace(0.1, 10.0, 20)
    a = Anneal(beta_schedule=betas)
    betas[0] = 5.0                 # the caller's array stays theirs: writeable ...
    assert a.beta_schedule[0] == pytest.approx(0.1)   # ... and not the solver's schedule


def test_custom_schedule_from_a_tensor_is_a_copy():
    betas = torch.linspace(0.1, 5.0, 10, dtype=torch.float64)
    a = Anneal(beta_schedule=betas)
    betas[:] = 0.0                  # changing the caller's tensor later changes nothing here
    assert a.beta_schedule[0] == pytest.approx(0.1)
    assert a.beta_schedule[-1] == pytest.approx(5.0)
