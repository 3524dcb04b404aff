"""GPTQ restricted to floor/ceil: RTN where nothing couples, lazy updates, damping, targets."""
import numpy as np
import pytest
import torch

from qround.errors import QroundError
from qround.grid import Grid, GridSpec, fit_grid
from qround.problems import RoundingProblem
from qround.solvers import GPTQ, get_solver
from qround.solvers.gptq import inverse_cholesky, round_sequentially


def make_problem(m=6, n=10, seed=0, per_channel=False, bits=3, hessian=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4, size=(4 * n, n)) @ (np.eye(n) + rng.normal(size=(n, n)) / np.sqrt(n))
    h = x.T @ x / len(x) if hessian is None else hessian
    if per_channel:
        h = np.stack([h * (1 + 0.3 * c) + np.diag(rng.uniform(0, 0.2, n)) for c in range(m)])
    return RoundingProblem.from_weight(rng.normal(size=(m, n)), h, GridSpec(bits=bits))


@pytest.mark.parametrize("act_order", [True, False])
def test_uncoupled_hessian_gives_rtn(act_order):
    n = 12
    for h in (np.eye(n), np.diag(np.random.default_rng(1).uniform(0.1, 5, n))):
        p = make_problem(m=8, n=n, hessian=h)
        b = GPTQ(act_order=act_order, device="cpu")._solve(p, p.rtn_choices(), None)[0]
        np.testing.assert_array_equal(b, p.rtn_choices())


def test_valid_result_and_better_than_rtn():
    p = make_problem(m=16, n=24, seed=2)
    sol = get_solver("gptq").solve(p)
    assert sol.choices.dtype == bool and not np.any(sol.choices & ~p.free)
    assert sol.total_cost < sol.total_rtn_cost
    again = get_solver("gptq").solve(p, seed=123)
    np.testing.assert_array_equal(sol.choices, again.choices)  # deterministic


def test_lazy_block_updates_are_exact():
    p = make_problem(m=5, n=20, seed=4)
    one = GPTQ(block=1)._solve(p, p.rtn_choices(), None)[0]
    lazy = GPTQ(block=7)._solve(p, p.rtn_choices(), None)[0]
    np.testing.assert_array_equal(one, lazy)


def test_matches_unblocked_numpy_reference():
    """The textbook loop: round column i, push the error through row i of chol(H^-1)^T."""
    p = make_problem(m=4, n=9, seed=6)
    lam = 0.01 * np.mean(np.diag(p.hessian))
    hinv = np.linalg.inv(p.hessian + lam * np.eye(9))
    u_fac = np.linalg.cholesky(hinv).T  # upper, H^-1 = U^T U
    w = p.weight.copy()
    lower = p.scale * (p.floor_codes - p.zero_point)
    want = np.zeros_like(p.free)
    for i in range(9):
        up = (w[:, i] - lower[:, i] >= 0.5 * p.step[:, i]) & p.free[:, i]
        err = (w[:, i] - lower[:, i] - p.step[:, i] * up) / u_fac[i, i]
        w[:, i:] -= err[:, None] * u_fac[i, i:]
        want[:, i] = up
    got = GPTQ(act_order=False)._solve(p, p.rtn_choices(), None)[0]
    np.testing.assert_array_equal(got, want)


def test_per_channel_hessian_runs_channel_by_channel():
    p = make_problem(m=3, n=8, seed=8, per_channel=True)
    b = GPTQ()._solve(p, p.rtn_choices(), None)[0]
    for c in range(3):
        g = p.grid
        sub = RoundingProblem.from_weight(p.weight[c:c + 1], p.hessian[c], Grid(
            g.scale[c:c + 1], g.zero_point[c:c + 1], g.bits, g.symmetric, g.group_size, 8))
        np.testing.assert_array_equal(b[c], GPTQ()._solve(sub, sub.rtn_choices(), None)[0][0])


def test_damping_retry_on_singular_hessian():
    n = 8
    p = make_problem(m=4, n=n, hessian=np.ones((n, n)))  # rank one: Cholesky fails undamped
    with pytest.raises(QroundError, match="damp"):
        GPTQ(damp=0.0, retries=0).solve(p)
    sol = GPTQ(damp=0.0, retries=3).solve(p)
    assert sol.info["damping"] > 0 and not np.any(sol.choices & ~p.free)
    _, _, lam = inverse_cholesky(torch.ones((n, n), dtype=torch.float64), 0.0, retries=3)
    assert lam == pytest.approx(1e-6)  # first retry: 1e-6 x mean diagonal


def test_dead_inputs_are_handled():
    """An input that never fires (H_ii = 0) decouples: it is rounded to nearest, and the live
    inputs are rounded as in the layer without it."""
    rng = np.random.default_rng(9)
    dead, live = [2, 7], [i for i in range(10) if i not in (2, 7)]
    x = rng.normal(size=(40, 10))
    x[:, dead] = 0.0
    p = make_problem(m=5, n=10, hessian=x.T @ x / 40)
    b = GPTQ(damp=0.0)._solve(p, p.rtn_choices(), None)[0]
    np.testing.assert_array_equal(b[:, dead], p.rtn_choices()[:, dead])
    g = p.grid
    sub = RoundingProblem.from_weight(p.weight[:, live], p.hessian[np.ix_(live, live)],
                                      Grid(g.scale, g.zero_point, g.bits, g.symmetric, None, 8))
    np.testing.assert_array_equal(b[:, live], GPTQ(damp=0.0)._solve(sub, sub.rtn_choices(),
                                                                     None)[0])


def test_asymmetric_target_is_the_minimiser():
    """With H = I the cost is ||w_hat - C w||^2: GPTQ rounds C w to the nearer of floor/ceil."""
    rng = np.random.default_rng(10)
    n, m = 10, 6
    w = rng.normal(size=(m, n))
    c = np.eye(n) + 0.2 * rng.normal(size=(n, n))
    grid = fit_grid(w, GridSpec(bits=4))
    p = RoundingProblem.from_weight(w, np.eye(n), grid, cross=c)
    target = w @ c.T
    lower = p.scale * (p.floor_codes - p.zero_point)
    want = (target - lower >= 0.5 * p.step) & p.free
    got = GPTQ(damp=0.0)._solve(p, p.rtn_choices(), None)[0]
    np.testing.assert_array_equal(got, want)


def test_round_sequentially_respects_fixed():
    lower = torch.zeros((2, 3), dtype=torch.float64)
    step = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    target = torch.full((2, 3), 0.9, dtype=torch.float64)
    b = round_sequentially(target, lower, step, torch.eye(3, dtype=torch.float64))
    np.testing.assert_array_equal(b.numpy(), step.numpy())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_raises():
    with pytest.raises(QroundError, match="CUDA"):
        GPTQ(device="cuda").solve(make_problem())


def test_float32_runs():
    p = make_problem(m=6, n=16, seed=11)
    a = GPTQ(dtype="float32").solve(p)
    assert a.total_cost < a.total_rtn_cost


@pytest.mark.parametrize("kwargs", [dict(damp=-1), dict(retries=-1), dict(block=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(QroundError):
        GPTQ(**kwargs)
