"""Iterated tabu search (``tabu``): what the solver passes to its kernel, its defaults and the
stall limit (tests from mutation testing, helper-123)."""
from __future__ import annotations

import numpy as np
import pytest

from qround import GridSpec, RoundingProblem, get_solver
from qround.grid import fit_grid
from qround.solvers import _kernels
from qround.solvers.tabu import Tabu, _round_off

from ..conftest import make_problem


def _all_free(m, n, seed):
    """make_problem's weights and H on a grid that clips nothing: every variable is free."""
    q = make_problem(m=m, n=n, seed=seed, clip_some=False)
    grid = fit_grid(q.weight, GridSpec(bits=3), scale=np.abs(q.weight).max(axis=1) / 2.9)
    p = RoundingProblem.from_weight(q.weight, q.hessian, grid)
    assert p.free.all()
    return p


def _kernel_run(p, start, seed, tenure, perturb, max_iter, stall, rounds, reset_every, descent):
    """The kernel called by hand with explicit settings."""
    args = _kernels.kernel_inputs(p, start, np.random.default_rng(seed))
    m = p.num_channels
    best, _ = _kernels.tabu_kernel(
        args["hess"], args["step"], args["grad"], args["start"], args["fields"], args["energy"],
        args["free_idx"], args["nfree"], np.full(m, tenure, dtype=np.int64), max_iter, stall,
        rounds, np.full(m, perturb, dtype=np.int64), reset_every, descent, _round_off(p),
        args["seeds"], False, _kernels.NO_TIME_LIMIT, False)
    return best.astype(bool)


@pytest.mark.parametrize("kwargs", [
    dict(restarts=3, reset_every=1, descent=True, stall=None),
    dict(restarts=3, reset_every=0, descent=True, stall=None),
    dict(restarts=3, reset_every=2, descent=False, stall=None),
    dict(restarts=2, reset_every=2, descent=True, stall=3),
])
def test_solve_runs_the_kernel_with_its_settings(kwargs):
    # tenure, perturb and max_iter given: reset_every, descent, stall and the number of rounds
    # (restarts + 1) must reach the kernel as given
    p = make_problem(m=12, n=40, seed=2)
    start = p.rtn_choices()
    solver = Tabu(tenure=3, perturb=8, max_iter=8, **kwargs)
    got = solver.solve(p, seed=9)
    stall = 8 if kwargs["stall"] is None else kwargs["stall"]
    want = _kernel_run(p, start, 9, 3, 8, 8, stall, kwargs["restarts"] + 1,
                       kwargs["reset_every"], kwargs["descent"])
    np.testing.assert_array_equal(got.choices, want)
    assert got.info["rounds"] == kwargs["restarts"] + 1 and got.info["max_iter"] == 8


def test_the_settings_above_change_the_search():
    # not vacuous: each setting changes the codes on this problem
    p = make_problem(m=12, n=40, seed=2)
    start = p.rtn_choices()
    run = lambda **kw: _kernel_run(p, start, 9, 3, 8, 8, kw.get("stall", 8),   # noqa: E731
                                   kw.get("rounds", 4), kw.get("reset_every", 2),
                                   kw.get("descent", True))
    base = run()
    for kw in (dict(rounds=3), dict(reset_every=1), dict(reset_every=0), dict(descent=False),
               dict(stall=3)):
        assert not np.array_equal(base, run(**kw)), kw


def test_default_tenure_is_capped_at_ten():
    # 36 free inputs per channel: nfree // 2 = 18, capped at TENURE_CAP = 10
    p = _all_free(m=6, n=36, seed=4)
    default = Tabu(restarts=3, perturb=2).solve(p, seed=1).choices
    np.testing.assert_array_equal(default, Tabu(restarts=3, tenure=10, perturb=2)
                                  .solve(p, seed=1).choices)
    assert not np.array_equal(default, Tabu(restarts=3, tenure=18, perturb=2)   # it matters
                              .solve(p, seed=1).choices)


def test_default_perturb_is_at_least_two():
    # 36 free inputs per channel: nfree // 20 = 1, raised to 2 random flips per restart
    p = _all_free(m=6, n=36, seed=4)
    default = Tabu(restarts=3, max_iter=5, tenure=10).solve(p, seed=1).choices
    np.testing.assert_array_equal(default, Tabu(restarts=3, max_iter=5, tenure=10, perturb=2)
                                  .solve(p, seed=1).choices)
    assert not np.array_equal(default, Tabu(restarts=3, max_iter=5, tenure=10, perturb=1)
                              .solve(p, seed=1).choices)


def test_default_max_iter_follows_the_widest_channel():
    # iters_per_var x the most free variables of any channel, rounded (here 10 x 11, 2.5 x 11)
    p = make_problem(m=4, n=12, seed=0)
    nfree = p.free.sum(axis=1)
    assert nfree.min() < nfree.max() == 11
    assert Tabu(restarts=0).solve(p, seed=0).info["max_iter"] == 110
    assert Tabu(restarts=0, iters_per_var=2.5).solve(p, seed=0).info["max_iter"] == 28


def test_stall_one_stops_each_round_at_its_first_local_minimum():
    # no descent, one round: tabu's first moves are steepest descent (each a new best, taken by
    # aspiration even when tabu); stall=1 ends the round at the first move without a new best,
    # so the result is greedy's local minimum, where without the stall limit it goes on
    p = make_problem(m=8, n=16, seed=11)
    greedy = get_solver("greedy").solve(p)
    kw = dict(restarts=0, descent=False, tenure=3, max_iter=500)
    stalled = Tabu(stall=1, **kw).solve(p, seed=0)
    np.testing.assert_allclose(stalled.energy, greedy.energy, rtol=1e-12, atol=1e-15)
    free_run = Tabu(**kw).solve(p, seed=0)
    assert np.any(free_run.energy < greedy.energy - 1e-9 * np.abs(greedy.energy))


def test_the_descent_ends_at_a_local_minimum():
    # the first-improvement descent takes every flip gaining more than 1e-12 of the channel's
    # largest curvature: after it (and one tabu move, which cannot improve on a local minimum)
    # the best state has no improving flip beyond round-off; a coarser guard stops the descent
    # early on the small inputs next to the outlier one
    p = make_problem(m=16, n=24, seed=13)
    sol = Tabu(restarts=0, max_iter=1, tenure=0).solve(p, seed=0)
    curv = (p.step ** 2 * np.diagonal(p.hessian)[None]).max(axis=1)
    deltas = p.flip_deltas(sol.choices)
    assert np.all(np.where(p.free, deltas, 0) >= -1e-10 * curv[:, None])


def test_a_tenure_above_the_channel_is_capped_at_nfree_minus_one():
    # tenure 50 on 8 free inputs would make every move tabu after 8 iterations (the round
    # ends there, short of max_iter); it is capped at 7, so the two searches are the same
    p = _all_free(m=8, n=8, seed=10)
    kw = dict(restarts=2, perturb=1, max_iter=24, descent=False)
    capped = Tabu(tenure=7, **kw).solve(p, seed=10)
    np.testing.assert_array_equal(Tabu(tenure=50, **kw).solve(p, seed=10).choices,
                                  capped.choices)
    # an uncapped tenure of 50 ends each round early and gives other codes here
    uncapped = _kernel_run(p, p.rtn_choices(), 10, 50, 1, 24, 24, 3, 2, False)
    assert p.energies(uncapped).sum() > capped.energy.sum() + 1e-9


def _reference_round(p, start, tenure, max_iter):
    """One round of tabu search as the module docstring states it, in numpy: each iteration
    flips the free variable of lowest delta among those not tabu, or tabu with a new best
    energy (aspiration); a flipped variable is tabu for the next ``tenure`` iterations."""
    best, b = start.copy(), start.copy()
    for c in range(p.num_channels):     # the channels are independent
        e = best_e = p.energies(b)[c]
        tabu_until = np.zeros(p.num_inputs, dtype=int)
        for it in range(1, max_iter + 1):
            delta = np.where(p.free[c], p.flip_deltas(b)[c], np.inf)
            allowed = (tabu_until < it) | (e + delta < best_e)
            j = int(np.argmin(np.where(allowed, delta, np.inf)))
            if not np.isfinite(delta[j]) or not allowed[j]:
                break
            b[c, j] = not b[c, j]
            e += delta[j]
            tabu_until[j] = it + tenure
            if e < best_e:
                best_e, best[c] = e, b[c]
    return best


def test_a_round_makes_the_documented_moves_aspiration_included():
    # with a long tenure the lowest move is often tabu; it is still taken when it gives a new
    # best energy, so the search matches the rule above and not the rule without aspiration
    p = make_problem(m=12, n=10, seed=21)
    start = np.random.default_rng(2).integers(0, 2, size=p.weight.shape).astype(bool) & p.free
    for tenure in (2, 5):
        sol = Tabu(restarts=0, descent=False, tenure=tenure, max_iter=30).solve(
            p, init=start, seed=0)
        want = _reference_round(p, start, tenure, 30)
        np.testing.assert_allclose(sol.energy, p.energies(want), rtol=1e-9, atol=1e-12)
