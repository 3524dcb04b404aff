"""Scale refitting (qround.scales) and the grid-changing methods of RoundingProblem."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qround import GridSpec, QroundError, RoundingProblem
from qround.grid import Grid
from qround.scales import refit_scales, solve_refitting
from qround.solvers import get_solver

from .conftest import correlated_hessian, make_problem
from .problems.test_rounding import direct_cost


def _random_problem(seed, m, n, bits, symmetric, per_channel, group_size, cross=False):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(m, n)) * rng.uniform(0.05, 5)
    h = (np.stack([correlated_hessian(n, rng, rows=32) for _ in range(m)]) if per_channel
         else correlated_hessian(n, rng, rows=32))
    kw = {}
    if cross:  # asymmetric reconstruction: H_hat, C, H_float from perturbed inputs
        x = rng.normal(size=(64, n))
        xh = x + 0.1 * rng.normal(size=x.shape)
        h = xh.T @ xh / 64
        kw = dict(cross=xh.T @ x / 64, float_hessian=x.T @ x / 64)
    spec = GridSpec(bits=bits, symmetric=symmetric, group_size=group_size)
    return RoundingProblem.from_weight(w, h, spec, **kw), rng


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 4), bits=st.integers(2, 5),
       symmetric=st.booleans(), per_channel=st.booleans(), grouped=st.booleans(),
       cross=st.booleans())
def test_with_grid_keeps_the_objective(seed, m, bits, symmetric, per_channel, grouped, cross):
    n = 8
    per_channel = per_channel and not cross
    p, rng = _random_problem(seed, m, n, bits, symmetric, per_channel, 4 if grouped else None,
                             cross)
    # same grid: the same problem
    same = p.with_grid(p.grid)
    for name in ("floor_codes", "free", "step", "frac"):
        np.testing.assert_array_equal(getattr(same, name), getattr(p, name))
    np.testing.assert_allclose(same.grad, p.grad, rtol=1e-9, atol=1e-9 * np.abs(p.grad).max())
    # another grid: the cost of a dequantised weight is the same under both problems
    g = p.grid
    other = p.with_grid(Grid(g.scale * rng.uniform(0.7, 1.4, size=g.scale.shape),
                             g.zero_point, g.bits, g.symmetric, g.group_size, g.in_features))
    b = rng.integers(0, 2, size=(m, n))
    codes = other.codes(b)
    tol = 1e-8 * (1 + np.abs(p.const).max() + np.abs(other.const).max())
    np.testing.assert_allclose(other.costs(b), p.cost_of_codes(codes, scale=other.scale),
                               atol=tol)
    np.testing.assert_allclose(other.cost_of_codes(codes), other.costs(b), atol=tol)
    if not cross:  # local MSE: the absolute cost is the direct H-norm of the error
        np.testing.assert_allclose(other.costs(b), direct_cost(other, b), atol=tol)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 4), bits=st.integers(2, 5),
       symmetric=st.booleans(), per_channel=st.booleans(), grouped=st.booleans())
def test_refit_never_increases_the_cost_of_the_codes(seed, m, bits, symmetric, per_channel,
                                                     grouped):
    p, rng = _random_problem(seed, m, 8, bits, symmetric, per_channel, 4 if grouped else None)
    codes = p.codes(rng.integers(0, 2, size=p.weight.shape))
    grid = refit_scales(p, codes)
    assert grid.scale.shape == p.grid.scale.shape
    assert np.all(grid.scale > 0) and np.all(np.isfinite(grid.scale))
    np.testing.assert_array_equal(grid.zero_point, p.grid.zero_point)
    before = p.cost_of_codes(codes)
    after = p.cost_of_codes(codes, scale=grid.expand()[0])
    assert np.all(after <= before + 1e-9 * (1 + np.abs(before)))


def test_refit_is_the_least_squares_scale():
    """Per channel the refitted scale is argmin_s (s q - w)^T H (s q - w) = q^T H w / q^T H q."""
    p = make_problem(m=5, n=9, bits=3, seed=4)
    codes = p.codes(p.rtn_choices())
    s = refit_scales(p, codes).scale[:, 0]
    q = codes.astype(float)
    want = np.einsum("mi,ij,mj->m", q, p.hessian, p.weight) / np.einsum(
        "mi,ij,mj->m", q, p.hessian, q)
    np.testing.assert_allclose(s, want, rtol=1e-7)


def test_refit_is_the_least_squares_scale_around_the_zero_point():
    """Asymmetric grid: w_hat = s (q - z), so the fit reads q - z, not q."""
    p = make_problem(m=5, n=9, bits=3, seed=6, symmetric=False)
    assert np.any(p.grid.zero_point != 0)
    codes = p.codes(p.rtn_choices())
    s = refit_scales(p, codes).scale[:, 0]
    e = codes.astype(float) - p.grid.zero_point
    want = np.einsum("mi,ij,mj->m", e, p.hessian, p.weight) / np.einsum(
        "mi,ij,mj->m", e, p.hessian, e)
    np.testing.assert_allclose(s, want, rtol=1e-7)


def test_refit_keeps_a_scale_it_cannot_see():
    """A group whose codes are all at the zero point says nothing about its scale."""
    p = make_problem(m=3, n=8, bits=3, seed=5, group_size=4)
    codes = p.codes(p.rtn_choices()).copy()
    codes[1, :4] = 0
    grid = refit_scales(p, codes)
    assert grid.scale[1, 0] == pytest.approx(p.grid.scale[1, 0], rel=1e-6)
    codes[1] = 0                  # a whole channel at zero: its scales stay exactly
    grid = refit_scales(p, codes)
    assert np.array_equal(grid.scale[1], p.grid.scale[1])


@pytest.mark.parametrize("kind", ["shared", "per-channel", "grouped", "asymmetric-grid"])
def test_solve_refitting_is_never_worse_and_stays_on_floor_or_ceil(kind):
    p = {"shared": lambda: make_problem(m=8, n=16, bits=3, seed=6),
         "per-channel": lambda: make_problem(m=6, n=12, bits=3, seed=7, per_channel=True),
         "grouped": lambda: make_problem(m=6, n=16, bits=2, seed=8, group_size=8),
         "asymmetric-grid": lambda: make_problem(m=6, n=12, bits=2, seed=9, symmetric=False),
         }[kind]()
    solver = get_solver("greedy")
    plain = solver.solve(p, seed=0)
    q, sol = solve_refitting(p, solver, rounds=3, seed=0)
    assert np.all(sol.cost <= plain.cost + 1e-9 * (1 + np.abs(plain.cost)))
    # the codes are floor or ceil of the weights on the final grid, and the costs are theirs
    np.testing.assert_array_equal(q.choices_from_codes(sol.codes), sol.choices)
    np.testing.assert_allclose(sol.cost, q.costs(sol.choices), rtol=1e-9, atol=1e-9)
    assert np.all((sol.codes >= q.qmin) & (sol.codes <= q.qmax))
    np.testing.assert_allclose(sol.rtn_cost, p.rtn_costs())  # RTN of the original grid
    assert len(sol.info["refits"]) >= 1
    assert sol.solver == "greedy (3 refits)"


def test_solve_refitting_lowers_the_cost_of_a_badly_scaled_grid():
    """With scales 1.5x too wide the refit must find a better grid for some channel."""
    p = make_problem(m=8, n=16, bits=3, seed=10, clip_some=False)
    g = p.grid
    wide = p.with_grid(Grid(g.scale * 1.5, g.zero_point, g.bits, g.symmetric, g.group_size,
                            g.in_features))
    solver = get_solver("greedy")
    plain = solver.solve(wide, seed=0)
    q, sol = solve_refitting(wide, solver, rounds=2, seed=0)
    assert sol.total_cost < 0.95 * plain.total_cost
    assert sol.info["refits"][0]["channels"] > 0
    assert not np.allclose(q.grid.scale, wide.grid.scale)


def test_solve_refitting_zero_rounds_is_the_plain_solve_and_is_deterministic():
    p = make_problem(m=6, n=12, bits=3, seed=11)
    solver = get_solver("anneal")
    q0, s0 = solve_refitting(p, solver, rounds=0, seed=3)
    plain = solver.solve(p, seed=3)
    assert q0 is p
    np.testing.assert_array_equal(s0.choices, plain.choices)
    a = solve_refitting(p, solver, rounds=2, seed=5)[1]
    b = solve_refitting(p, solver, rounds=2, seed=5)[1]
    np.testing.assert_array_equal(a.codes, b.codes)


@pytest.mark.parametrize("rounds", [-1, 1.5, True, "2"])
def test_solve_refitting_rejects_bad_rounds(rounds):
    with pytest.raises(QroundError, match="rounds"):
        solve_refitting(make_problem(), get_solver("greedy"), rounds=rounds)


def test_refit_and_with_grid_reject_mismatched_input():
    p = make_problem(m=4, n=8)
    with pytest.raises(QroundError, match="codes must have shape"):
        refit_scales(p, np.zeros((4, 7), dtype=np.int64))
    with pytest.raises(QroundError, match="grid fitted for"):
        g = p.grid
        p.with_grid(Grid(g.scale[:3], g.zero_point[:3], g.bits, g.symmetric, g.group_size,
                         g.in_features))
    with pytest.raises(QroundError, match="whole layer"):
        refit_scales(p.restrict([0, 1, 2], p.rtn_choices()), np.zeros((4, 3), dtype=np.int64))


def test_refit_refuses_codes_off_the_grid():
    """Codes outside [qmin, qmax] or not integers fitted a scale without a word (0.108 -> 0.003
    for codes + 100); the writeback refuses the same codes, so the refit does too."""
    p = make_problem(m=4, n=8, symmetric=False, bits=3)
    codes = p.codes(p.rtn_choices())
    for bad in (codes + 100, codes - 100, codes + 0.5, np.where(codes == codes, np.nan, 0.0)):
        with pytest.raises(QroundError, match=r"codes must be integers in \[0, 7\]"):
            refit_scales(p, bad)
    with pytest.raises(QroundError, match="dtype bool"):
        refit_scales(p, codes > 3)
    assert refit_scales(p, codes.astype(np.float64)).scale.shape == p.grid.scale.shape


# ------------------------------------------------ found by mutation testing (helper-118)
def _wide():
    p = make_problem(m=8, n=16, bits=3, seed=10, clip_some=False)
    g = p.grid
    return p.with_grid(Grid(g.scale * 1.5, g.zero_point, g.bits, g.symmetric, g.group_size,
                            g.in_features))


def test_tol_stops_after_a_round_that_improves_nothing():   # S1, S4, S8
    wide = _wide()
    q, sol = solve_refitting(wide, "greedy", rounds=3, seed=0, tol=10.0)
    assert sol.info["refits"] == [{"cost": pytest.approx(sol.total_cost), "channels": 0}]
    assert np.array_equal(q.grid.scale, wide.grid.scale)
    assert sol.solver == "greedy (3 refits)"


@pytest.mark.parametrize("rounds", [1, 3])
def test_history_matches_the_result(rounds):   # S2, S3, S7, S10, S12
    wide = _wide()
    q, sol = solve_refitting(wide, "greedy", rounds=rounds, seed=0)
    h = sol.info["refits"]
    assert 1 <= len(h) <= rounds
    if rounds == 1:
        moved = np.any(q.grid.scale != wide.grid.scale, axis=1)
        assert h[0]["channels"] == int(moved.sum()) > 0
    assert h[-1]["cost"] == pytest.approx(sol.total_cost, rel=1e-12)
    assert all(a["cost"] >= b["cost"] for a, b in zip(h, h[1:]))
    assert "iterations" in sol.info   # the solver's own info is kept


def test_a_group_with_a_negative_fit_is_pinned_and_the_others_refit():   # S13,S15,S16,S24
    p = make_problem(m=3, n=8, bits=3, seed=5, group_size=4)
    codes = p.codes(p.rtn_choices()).copy()
    codes[1, :4] = -codes[1, :4]        # group 0 of channel 1: best scale negative
    codes[1, :4] = np.clip(codes[1, :4], p.qmin, p.qmax)
    g = refit_scales(p, codes)
    assert g.scale[1, 0] == pytest.approx(p.grid.scale[1, 0], rel=1e-8)   # kept (pinned)
    e1 = np.where(np.arange(8) >= 4, codes[1], 0).astype(float)
    e0 = np.where(np.arange(8) < 4, codes[1], 0).astype(float)
    want = e1 @ p.hessian @ (p.weight[1] - p.grid.scale[1, 0] * e0) / (e1 @ p.hessian @ e1)
    assert g.scale[1, 1] == pytest.approx(want, rel=1e-6)


def test_refit_refuses_a_code_one_past_qmax():   # S19
    p = make_problem(m=4, n=8, bits=3)
    codes = p.codes(p.rtn_choices()).copy()
    codes[0, 0] = p.qmax + 1
    with pytest.raises(QroundError, match="codes must be integers"):
        refit_scales(p, codes)


def test_later_rounds_start_from_the_previous_codes():   # S11, S21
    wide = _wide()
    solver = get_solver("greedy")
    seen = []
    orig = type(solver).solve

    def spy(self, problem, init=None, seed=None, **kw):
        seen.append((problem, init))
        return orig(self, problem, init=init, seed=seed, **kw)

    import unittest.mock as um
    with um.patch.object(type(solver), "solve", spy):
        solve_refitting(wide, solver, rounds=1, seed=0)
    (_, first), (cand, init) = seen
    assert init is not None and init.dtype == bool and not np.any(init & ~cand.free)
