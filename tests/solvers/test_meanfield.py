"""Mean-field annealing (``meanfield``)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qround.errors import QroundError
from qround.grid import GridSpec
from qround.problems import RoundingProblem
from qround.solvers import MeanField, get_solver
from qround.solvers import _torch as qt
from qround.solvers.meanfield import anneal_means, flip_in_costs

from .test_gptq import make_problem   # correlated heavy-tailed inputs; hessian= overrides H


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 16), per_channel=st.booleans())
def test_flip_in_cost_of_binary_means_is_the_energy_difference(seed, per_channel):
    p = make_problem(m=3, n=7, seed=seed, per_channel=per_channel)
    b = (np.random.default_rng(seed).random((3, 7)) < 0.5) & p.free
    phi = flip_in_costs(torch.as_tensor(b, dtype=torch.float64),
                        qt.to_torch(p, "cpu", torch.float64)).numpy()
    for i in range(7):
        on, off = b.copy(), b.copy()
        on[:, i], off[:, i] = True, False
        want = p.energies(on) - p.energies(off)
        np.testing.assert_allclose(phi[:, i], want, rtol=1e-9,
                                   atol=1e-9 * np.abs(p.energies(b)).max())


def test_means_at_a_fixed_temperature_solve_the_mean_field_equations():
    # beta constant and small: the damped steps converge to v = sigmoid(-beta phi(v) / kappa)
    p = make_problem(m=4, n=12, seed=2)
    tp = qt.to_torch(p, "cpu", torch.float64)
    start = torch.as_tensor(p.rtn_choices(), dtype=torch.float64)
    _, v = anneal_means(tp, start, [0.2] * 3000, damping=0.2, eval_every=100)
    free = tp.free.to(torch.float64)
    kappa = (tp.step ** 2 * tp.hessian_diag * free).sum(1) / free.sum(1)
    rhs = torch.sigmoid(-0.2 * flip_in_costs(v, tp) / kappa[:, None]) * free
    np.testing.assert_allclose(v.numpy(), rhs.numpy(), atol=1e-8)
    assert 0.01 < v[tp.free].min() and v[tp.free].max() < 0.99   # still soft at this beta


def test_separable_problem_is_solved_exactly():
    # diagonal H: every variable is alone, and at a large beta its mean settles at its best side
    n = 9
    h = np.diag(np.random.default_rng(1).uniform(0.5, 2.0, n))
    p = make_problem(m=8, n=n, seed=4, hessian=h, bits=2)
    sol = MeanField().solve(p, seed=0)
    exact = get_solver("exact").solve(p, seed=0)
    np.testing.assert_allclose(sol.energy, exact.energy, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("per_channel", [False, True])
def test_beats_rtn_and_never_returns_worse_than_its_start(per_channel):
    p = make_problem(m=10, n=24, seed=3, per_channel=per_channel)
    gptq = get_solver("gptq").solve(p, seed=0)
    sol = MeanField().solve(p, init=gptq, seed=0)
    assert np.all(sol.energy <= gptq.energy + 1e-12)
    assert MeanField().solve(p, seed=0).total_cost < p.rtn_costs().sum()


def test_deterministic_and_seed_free():
    p = make_problem(m=6, n=20, seed=5)
    a = MeanField(iterations=100).solve(p, seed=0)
    b = MeanField(iterations=100).solve(p, seed=123)
    np.testing.assert_array_equal(a.choices, b.choices)


def test_float64_and_float32_agree_on_most_channels():
    p = make_problem(m=12, n=24, seed=8)
    a = MeanField(dtype="float64").solve(p, seed=0)
    b = MeanField(dtype="float32").solve(p, seed=0)
    assert b.total_cost == pytest.approx(a.total_cost, rel=0.05)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(iterations=0), "iterations"), (dict(iterations=2.5), "iterations"),
    (dict(eval_every=0), "eval_every"), (dict(beta=(0.0, 10.0)), "beta"),
    (dict(beta=(10.0, 1.0)), "beta"), (dict(beta=(1.0, float("inf"))), "beta"),
    (dict(beta=(1.0,)), "beta"), (dict(beta="ab"), "beta"), (dict(damping=0.0), "damping"),
    (dict(damping=1.5), "damping"), (dict(damping=True), "damping"),
    (dict(damping=float("nan")), "damping")])
def test_bad_parameters_are_named(kwargs, msg):
    with pytest.raises(QroundError, match=msg):
        MeanField(**kwargs)


def test_schedule_is_geometric_from_start_to_end():
    betas = MeanField(iterations=5, beta=(1.0, 16.0)).betas()
    np.testing.assert_allclose(betas, [1, 2, 4, 8, 16])
    assert MeanField(iterations=1, beta=(2.0, 8.0)).betas().tolist() == [2.0]


@pytest.mark.parametrize("per_channel", [False, True])
def test_coupling_norm_is_the_top_eigenvalue_of_the_scaled_hessian(per_channel):
    from qround.solvers.hopfield import _energy_scale
    from qround.solvers.meanfield import coupling_norm

    p = make_problem(m=5, n=16, seed=6, per_channel=per_channel, bits=2)
    tp = qt.to_torch(p, "cpu", torch.float64)
    free = tp.free.to(torch.float64)
    kappa = _energy_scale(tp, free)[:, None]
    rho = coupling_norm(tp, free, kappa, iterations=200).numpy()
    for c in range(5):
        f = p.free[c]
        h = p.hessian if p.hessian.ndim == 2 else p.hessian[c]
        s = p.step[c][f]
        scaled = s[:, None] * h[np.ix_(f, f)] * s[None, :] / kappa[c, 0].item()
        assert rho[c] == pytest.approx(np.linalg.eigvalsh(scaled)[-1], rel=1e-6)


def test_step_is_capped_where_the_coupling_is_strong():
    # inputs sharing a strong common factor: rho is about 77, and simultaneous steps larger than
    # about 2 / rho flip whole groups back and forth (uncapped, damping 1 never beats RTN here)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 96)) + 2.0 * rng.normal(size=(400, 1))
    p = RoundingProblem.from_weight(rng.normal(size=(8, 96)), x.T @ x / 400, GridSpec(bits=4))
    tabu = get_solver("tabu").solve(p, seed=0).total_cost
    for damping in (1.0, 0.2):
        cost = MeanField(damping=damping).solve(p, seed=0).total_cost
        assert cost < 1.5 * tabu and cost < 0.5 * p.rtn_costs().sum()
