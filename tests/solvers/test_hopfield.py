"""Continuous relaxations (AdaRound's and the classical Hopfield one)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qround.errors import QroundError
from qround.grid import GridSpec
from qround.problems import RoundingProblem, energy
from qround.solvers import HopfieldClassic, Relaxation, get_solver
from qround.solvers.hopfield import inverse_rectified_sigmoid, rectified_sigmoid


def make_problem(m=6, n=10, seed=0, per_channel=False, bits=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4, size=(4 * n, n)) @ (np.eye(n) + rng.normal(size=(n, n)) / np.sqrt(n))
    h = x.T @ x / len(x)
    if per_channel:
        h = np.stack([h * (1 + 0.3 * c) + np.diag(rng.uniform(0, 0.2, n)) for c in range(m)])
    return RoundingProblem.from_weight(rng.normal(size=(m, n)), h, GridSpec(bits=bits))


def t(a):
    return torch.as_tensor(np.array(a, dtype=np.float64))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=20))
def test_initial_h_equals_frac(frac):
    f = t(frac)
    np.testing.assert_allclose(rectified_sigmoid(inverse_rectified_sigmoid(f)).numpy(), frac,
                               atol=1e-6)


def test_solver_starts_at_frac():
    p = make_problem()
    v = Relaxation()._init_v(t(p.frac))
    np.testing.assert_allclose(rectified_sigmoid(v).numpy(), p.frac, atol=1e-6)
    assert torch.isfinite(v).all()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2 ** 16), per_channel=st.booleans())
def test_continuous_energy_is_the_quadratic_form(seed, per_channel):
    """E(h) + const == (w_hat - w)^T H (w_hat - w) with w_hat = s (floor - z) + s h, h in [0,1]."""
    p = make_problem(m=3, n=6, seed=seed, per_channel=per_channel)
    h = np.random.default_rng(seed).random((3, 6))
    e = energy.energies(t(h), t(p.step), t(p.grad), t(p.hessian)).numpy() + p.const
    d = p.scale * (p.floor_codes - p.zero_point) + p.step * h - p.weight
    want = np.einsum("mi,mi->m", d, energy.hessian_times(d, p.hessian))
    np.testing.assert_allclose(e, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    # at h = frac the continuous weights are the float weights: only clipping costs anything
    e_frac = energy.energies(t(p.frac), t(p.step), t(p.grad), t(p.hessian)).numpy() + p.const
    clip = np.where(p.free, 0.0, p.scale * (p.floor_codes - p.zero_point) - p.weight)
    np.testing.assert_allclose(e_frac, np.einsum("mi,mi->m", clip,
                                                 energy.hessian_times(clip, p.hessian)),
                               atol=1e-9 * max(1.0, np.abs(p.const).max()))


def test_beta_schedule():
    r = Relaxation(iterations=100, warmup=0.2, beta=(20, 2))
    assert r.beta_at(0) is None and r.beta_at(19) is None
    assert r.beta_at(20) == pytest.approx(20) and r.beta_at(99) == pytest.approx(2, abs=0.3)
    betas = [r.beta_at(i) for i in range(20, 100)]
    assert all(a >= b for a, b in zip(betas, betas[1:]))
    c = HopfieldClassic(iterations=50, temperature=(2.0, 0.01))
    assert c.temperature_at(0) == pytest.approx(2.0) and c.temperature_at(49) == pytest.approx(0.01)


@pytest.mark.parametrize("cls", [Relaxation, HopfieldClassic])
@pytest.mark.parametrize("per_channel", [False, True])
def test_valid_never_worse_than_start(cls, per_channel):
    p = make_problem(m=6, n=12, seed=3, per_channel=per_channel)
    start = get_solver("greedy").solve(p).choices
    b = cls(iterations=60, eval_every=7, device="cpu")._solve(p, start.copy(),
                                                               np.random.default_rng(0))[0]
    assert b.dtype == bool and not np.any(b & ~p.free)
    assert np.all(p.energies(b) <= p.energies(start) + 1e-12)


@pytest.mark.parametrize("spec", ["hopfield", "hopfield-classic"])
def test_improves_on_rtn_and_is_deterministic(spec):
    p = make_problem(m=8, n=24, seed=4)
    solver = get_solver(spec, iterations=300)
    a, b = solver.solve(p, seed=1), solver.solve(p, seed=1)
    np.testing.assert_array_equal(a.choices, b.choices)
    # the relaxation itself (without the start kept) beats RTN in total
    raw = solver._solve(p, np.zeros_like(p.free), np.random.default_rng(0))[0]
    assert p.costs(raw).sum() < p.rtn_costs().sum()


def test_float32():
    p = make_problem(m=4, n=16, seed=5)
    sol = Relaxation(iterations=100, dtype="float32").solve(p)
    assert sol.choices.dtype == bool and sol.total_cost <= sol.total_rtn_cost


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
@pytest.mark.parametrize("cls", [Relaxation, HopfieldClassic])
def test_cuda_without_cuda_raises(cls):
    with pytest.raises(QroundError, match="CUDA"):
        cls(device="cuda").solve(make_problem())


@pytest.mark.parametrize("kwargs", [dict(iterations=0), dict(lr=0), dict(reg=-1),
                                    dict(beta=(20, 0)), dict(warmup=1.0),
                                    dict(reg_weighting="x")])
def test_bad_arguments(kwargs):
    with pytest.raises(QroundError):
        Relaxation(**kwargs)
    with pytest.raises(QroundError):
        HopfieldClassic(temperature=(1.0, -1.0))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 16), per_channel=st.booleans(),
       step=st.integers(0, 99), uniform=st.booleans())
def test_written_out_gradient_equals_autograd(seed, per_channel, step, uniform):
    """_grad is d loss / dV for both relaxations, in the warm-up and after it."""
    from qround.solvers import _torch
    from qround.solvers.hopfield import _energy_scale

    p = make_problem(m=3, n=7, seed=seed, per_channel=per_channel)
    tp = _torch.to_torch(p, torch.device("cpu"), torch.float64)
    free = tp.free.to(torch.float64)
    kappa = _energy_scale(tp, free)
    v0 = torch.as_tensor(np.random.default_rng(seed).normal(scale=2.0, size=(3, 7)))
    for solver in (Relaxation(iterations=100, reg_weighting="uniform" if uniform else "curvature"),
                   HopfieldClassic(iterations=100)):
        weight = solver._reg_weight(tp, free, kappa)
        sched = {k: a[step:step + 1] for k, a in
                 solver._full_schedule(torch.float64, torch.device("cpu")).items()}
        v = v0.clone().requires_grad_(True)
        solver.loss(v, tp, kappa, weight, sched).backward()
        np.testing.assert_allclose(solver._grad(v0, tp, kappa, weight, sched).numpy(),
                                   v.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_schedules_follow_beta_and_temperature():
    r = Relaxation(iterations=50, warmup=0.2, reg=0.3)
    s = r._schedule()
    assert np.all(s["reg"][:10] == 0) and np.all(s["reg"][10:] == 0.3)
    np.testing.assert_allclose(s["beta"][10:], [r.beta_at(i) for i in range(10, 50)])
    c = HopfieldClassic(iterations=30)
    np.testing.assert_allclose(c._schedule()["inv_t"], [1 / c.temperature_at(i) for i in range(30)])
