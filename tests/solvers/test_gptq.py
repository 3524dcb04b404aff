"""GPTQ restricted to floor/ceil: RTN where nothing couples, lazy updates, damping, targets."""
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from qround.errors import QroundError
from qround.grid import Grid, GridSpec, fit_grid
from qround.problems import RoundingProblem
from qround.solvers import GPTQ, get_solver
from qround.solvers.gptq import inverse_cholesky, round_columns, round_sequentially

from ..conftest import correlated_hessian


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


@pytest.mark.parametrize("act_order", [False, True])
def test_the_local_objective_written_asymmetrically_rounds_alike(act_order):
    """The damped target of the asymmetric form was pulled towards the floor: it rounded down
    more often than the same objective in its local form (18 % of the choices differed)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 32)) @ rng.normal(size=(32, 32))
    x[:, 5] = 0                          # a dead input (always rounded down before)
    h = x.T @ x / 40
    w = rng.normal(size=(64, 32))
    grid = fit_grid(w, GridSpec(bits=3), hessian=h)
    local = RoundingProblem.from_weight(w, h, grid)
    # nearly the same objective, r = C w with C = H + 1e-5 noise (C = H exactly would take the
    # local shortcut): choices first differ at about 1e-3 here, a margin of about 100x
    noise = 1e-5 * rng.normal(size=h.shape)
    noise[5] = noise[:, 5] = 0
    asym = RoundingProblem.from_weight(w, h, grid, cross=h + noise, float_hessian=h)
    solver = GPTQ(act_order=act_order)
    a = solver._solve(local, local.rtn_choices(), None)[0]
    b = solver._solve(asym, asym.rtn_choices(), None)[0]
    assert not solver._is_local_mse(*(torch.tensor(v.T) for v in (
        asym.weight, asym.scale * (asym.floor_codes - asym.zero_point), asym.grad)),
        [torch.as_tensor(h)])
    np.testing.assert_array_equal(a, b)


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


def reference_gptq(p: RoundingProblem, local: bool, act_order: bool = True, damp: float = 0.01):
    """The loop as first written, in numpy: explicit inverse of the damped H, its Cholesky
    factor, one column at a time with every later column updated at once (no blocks)."""
    out = np.zeros(p.weight.shape, dtype=bool)
    lower_all = p.scale * (p.floor_codes - p.zero_point)
    groups = [slice(None)] if p.shared_hessian else [slice(c, c + 1) for c in range(len(p.weight))]
    for sl in groups:
        h = (p.hessian if p.shared_hessian else p.hessian[sl][0]).copy()
        order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(len(h))
        h = h[np.ix_(order, order)]
        dead = np.diag(h) == 0
        h[dead, dead] = 1.0
        lam = damp * np.mean(np.diag(h))
        hinv = np.linalg.inv(h + lam * np.eye(len(h)))
        u_fac = np.linalg.cholesky(hinv).T
        lower, step = lower_all[sl][:, order], p.step[sl][:, order]
        weight = p.weight[sl][:, order]
        # the damped minimiser (H' + lam I)^-1 (r + (lam + D) w), as the local path's w (H':
        # dead diagonal set to 1, D marks it)
        pull = lam + dead
        w = (weight if local else
             lower - (0.5 * p.grad[sl][:, order] - pull * (weight - lower)) @ hinv).copy()
        for i in range(len(h)):
            up = (w[:, i] - lower[:, i] >= 0.5 * step[:, i]) & (step[:, i] > 0)
            err = (w[:, i] - lower[:, i] - step[:, i] * up) / u_fac[i, i]
            w[:, i:] -= err[:, None] * u_fac[i, i:]
            out[sl, order[i]] = up
    return out


def real_shaped(m, n, seed, bits=3, symmetric=True, per_channel=False, cross=False):
    """Correlated heavy-tailed inputs with outliers; a few clipped weights (fixed variables)."""
    rng = np.random.default_rng(seed)
    w = 0.05 * rng.normal(size=(m, n))
    w[0, :2] = [0.6, -0.6]
    h = correlated_hessian(n, rng, rows=4 * n, outliers=2)
    if per_channel:
        h = np.stack([h * rng.uniform(0.5, 2) + np.diag(rng.uniform(0, 0.1, n))
                      for _ in range(m)])
    c = h + 0.1 * correlated_hessian(n, rng, rows=4 * n) if cross else None
    p = RoundingProblem.from_weight(w, h, GridSpec(bits=bits, symmetric=symmetric), cross=c)
    assert (~p.free).any()
    return p


@pytest.mark.parametrize("m,n,seed,kwargs", [
    (40, 200, 0, {}),
    (24, 180, 1, dict(bits=2, symmetric=False)),
    (50, 150, 2, dict(bits=4, cross=True)),
    (6, 90, 3, dict(per_channel=True)),
    (30, 130, 4, dict(bits=2, cross=True, symmetric=False)),
])
@pytest.mark.parametrize("act_order", [True, False])
def test_matches_reference_loop(m, n, seed, kwargs, act_order):
    """Blocks, the compiled kernel, the factor without an inverse and the target test change
    the arithmetic, not the choices."""
    p = real_shaped(m, n, seed, **kwargs)
    want = reference_gptq(p, local=not kwargs.get("cross"), act_order=act_order)
    for block in (128, 32):
        got = GPTQ(act_order=act_order, block=block)._solve(p, p.rtn_choices(), None)[0]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_kernel_matches_torch_loop(dtype):
    p = real_shaped(20, 100, seed=5, bits=2)
    h = torch.as_tensor(np.array(p.hessian), dtype=dtype)
    upper = inverse_cholesky(h, 0.01)[0]

    def t(a):
        return torch.as_tensor(np.array(a.T), dtype=dtype)

    args = t(p.weight), t(p.scale * (p.floor_codes - p.zero_point)), t(p.step), upper
    for block in (1, 16, 128):
        torch.testing.assert_close(round_columns(*args, block=block, compiled=True),
                                   round_columns(*args, block=block, compiled=False),
                                   rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40), damp=st.sampled_from([0.0, 0.01]))
@example(seed=1, n=37, damp=0.0)
def test_inverse_cholesky_factors(seed, n, damp):
    """U upper with U^T U = (H + lambda I)^-1, and R upper with R R^T = H + lambda I."""
    h = correlated_hessian(n, np.random.default_rng(seed), rows=3 * n + 2)
    upper, r, lam = inverse_cholesky(torch.as_tensor(h), damp)
    u, r = upper.numpy(), r.numpy()
    hd = h + lam * np.eye(n)
    assert np.allclose(u, np.triu(u)) and np.allclose(r, np.triu(r)) and np.all(np.diag(u) > 0)
    np.testing.assert_allclose(r @ r.T, hd, rtol=1e-9, atol=1e-9 * np.abs(hd).max())
    np.testing.assert_allclose(u @ r, np.eye(n), atol=1e-8)
    # the inverse's own forward error grows with the condition number (about 1e13 at
    # seed=1, n=37, damp=0, where a fixed 1e-9 failed on an error of 3.5e-6 of the largest entry)
    inv = np.linalg.inv(hd)
    slack = max(1e-9, 10 * np.linalg.cond(hd) * np.finfo(float).eps)
    np.testing.assert_allclose(u.T @ u, inv, rtol=1e-6, atol=slack * np.abs(inv).max())


@pytest.mark.parametrize("per_channel", [False, True])
def test_local_target_is_recognised(per_channel):
    def tensors(p):
        def t(a):
            return torch.as_tensor(np.array(a.T))
        hs = [torch.as_tensor(np.array(p.hessian))] if p.shared_hessian else \
            [torch.as_tensor(np.array(h)) for h in p.hessian]
        return (t(p.weight), t(p.scale * (p.floor_codes - p.zero_point)), t(p.grad), hs)

    assert GPTQ._is_local_mse(*tensors(real_shaped(8, 30, 6, per_channel=per_channel)))
    if not per_channel:
        assert not GPTQ._is_local_mse(*tensors(real_shaped(8, 30, 6, cross=True)))
        # a target that differs in one weight of one channel only
        p = real_shaped(8, 30, 7)
        w, lower, grad, hs = tensors(p)
        grad = grad.clone()
        grad[3, 5] += 1e-6 * grad.abs().max()
        assert not GPTQ._is_local_mse(w, lower, grad, hs)


@pytest.mark.parametrize("asymmetric", [False, True])
def test_rescaling_h_changes_nothing_with_a_dead_input(asymmetric):
    """A dead input's diagonal was set to 1, an absolute value: with H's entries small, the
    damping (its mean diagonal included the 1) grew to many times the real diagonal and the
    choices drifted towards RTN (ratio 0.73 at scale 1, 0.91 at 1e-4)."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(40, 10)) @ rng.normal(size=(10, 10))
    x[:, 2] = 0
    h = x.T @ x / 40
    w = rng.normal(size=(16, 10))
    grid = fit_grid(w, GridSpec(bits=3), hessian=h)
    noise = 1e-5 * rng.normal(size=h.shape)
    noise[2] = noise[:, 2] = 0
    choices = []
    for scale in (1.0, 1e-3, 1e-4):
        hs = scale * h
        p = (RoundingProblem.from_weight(w, hs, grid, cross=hs + scale * noise, float_hessian=hs)
             if asymmetric else RoundingProblem.from_weight(w, hs, grid))
        choices.append(GPTQ()._solve(p, p.rtn_choices(), None)[0])
    for b in choices[1:]:
        np.testing.assert_array_equal(b, choices[0])


def test_the_gptq_baseline_keeps_gptqs_own_dead_diagonal():
    from qround.solvers.gptq import dead_fill, inverse_cholesky

    h = torch.diag(torch.tensor([4.0, 0.0, 2.0], dtype=torch.float64))
    assert dead_fill(torch.diagonal(h)) == 3.0
    _, r, lam = inverse_cholesky(h, 0.1)
    np.testing.assert_allclose(torch.diagonal(r @ r.T), [4.3, 3.3, 2.3])
    _, r, lam = inverse_cholesky(h, 0.1, dead_diagonal=1.0)
    np.testing.assert_allclose(torch.diagonal(r @ r.T), [4 + 7 / 30, 1 + 7 / 30, 2 + 7 / 30])
    assert dead_fill(torch.zeros(3, dtype=torch.float64)) == 1.0
