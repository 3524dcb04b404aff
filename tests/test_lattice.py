"""grid_descent (qround.lattice): steepest descent on the whole integer grid."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qround import GridSpec, QroundError, RoundingProblem
from qround import lattice
from qround.lattice import grid_descent
from qround.solvers import get_solver

from .conftest import make_problem
from .test_scales import _random_problem


def _single_move_costs(p, q):
    """(m, n, 2) costs of every +-1 move of every code (inf where it leaves the grid)."""
    m, n = q.shape
    out = np.full((m, n, 2), np.inf)
    for j in range(n):
        for k, d in enumerate((1, -1)):
            moved = q.copy()
            moved[:, j] += d
            ok = (moved[:, j] >= p.qmin) & (moved[:, j] <= p.qmax)
            cost = p.cost_of_codes(np.clip(moved, p.qmin, p.qmax))
            out[:, j, k] = np.where(ok, cost, np.inf)
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 4), bits=st.integers(2, 4),
       symmetric=st.booleans(), per_channel=st.booleans(), grouped=st.booleans(),
       cross=st.booleans(), start=st.sampled_from(["rtn", "random"]))
def test_never_worse_on_grid_and_a_local_minimum(seed, m, bits, symmetric, per_channel, grouped,
                                                 cross, start):
    """From any start: codes stay in [qmin, qmax], the reported cost is the exact cost of the
    codes, no channel gets worse, and no single +-1 move lowers any channel's cost."""
    p, rng = _random_problem(seed, m, 8, bits, symmetric, per_channel and not cross,
                             4 if grouped else None, cross)
    q0 = (p.codes(p.rtn_choices()) if start == "rtn"
          else rng.integers(p.qmin, p.qmax + 1, size=p.weight.shape))
    r = grid_descent(p, q0)
    assert r.codes.dtype == np.int64 and r.codes.shape == p.weight.shape
    assert r.codes.min() >= p.qmin and r.codes.max() <= p.qmax
    np.testing.assert_allclose(r.cost, p.cost_of_codes(r.codes), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(r.start_cost, p.cost_of_codes(q0), rtol=1e-12, atol=1e-12)
    assert np.all(r.cost <= r.start_cost)
    scale = np.abs(r.cost) + np.abs(r.start_cost) + 1e-12
    moves = _single_move_costs(p, r.codes)
    assert np.all(moves.min(axis=(1, 2)) >= r.cost - 1e-9 * scale)


def test_exhaustive_optimum_is_a_fixed_point_and_reached_from_rtn_here():
    """On channels of 3 weights at 2 bits (4^3 codes each), the brute-force optimum is never
    moved, and on this instance descent from RTN reaches it on every channel (where RTN is
    not already optimal, it moves)."""
    p = make_problem(m=6, n=3, bits=2, seed=3, clip_some=False)
    levels = np.arange(p.qmin, p.qmax + 1)
    all_codes = np.array(list(itertools.product(levels, repeat=3)))
    best = np.empty((6, 3), dtype=np.int64)
    best_cost = np.empty(6)
    for c in range(6):
        costs = [p.cost_of_codes(np.where(np.arange(6)[:, None] == c, a, p.floor_codes))[c]
                 for a in all_codes]
        best[c] = all_codes[int(np.argmin(costs))]
        best_cost[c] = min(costs)
    fixed = grid_descent(p, best)
    np.testing.assert_array_equal(fixed.codes, best)
    assert np.all(fixed.moves == 0)
    r = grid_descent(p, p.codes(p.rtn_choices()))
    np.testing.assert_allclose(r.cost, best_cost, rtol=1e-12)
    assert np.sum(p.rtn_costs() > best_cost * (1 + 1e-9)) >= 2


def test_leaves_floor_ceil_where_that_pays_and_improves_a_solver():
    """On correlated inputs a solver's floor/ceil optimum is not the grid's: descent lowers the
    summed cost of `fast`, moves some codes beyond floor/ceil, and counts them."""
    p = make_problem(m=16, n=48, bits=3, seed=5)
    sol = get_solver("fast").solve(p, seed=0)
    r = grid_descent(p, sol.codes)
    np.testing.assert_allclose(r.start_cost, sol.cost, rtol=1e-9)
    assert r.cost.sum() < sol.cost.sum()
    b = r.codes - p.floor_codes
    beyond = int(np.sum((b != 0) & ~((b == 1) & p.free)))
    assert r.beyond == beyond > 0


def test_max_moves_caps_the_descent():
    p = make_problem(m=4, n=20, bits=3, seed=7)
    q0 = np.full(p.weight.shape, p.qmin)   # far from the weights: many moves needed
    capped = grid_descent(p, q0, max_moves=2)
    assert np.all(capped.moves <= 2)
    full = grid_descent(p, q0)
    assert np.all(full.moves > 2) and full.cost.sum() < capped.cost.sum()
    assert np.all(grid_descent(p, q0, max_moves=0).codes == q0)
    assert capped.stopped.all() and not full.stopped.any()
    # the last allowed move landing on the minimum is not "stopped"
    exact = grid_descent(p, q0, max_moves=int(full.moves.max()))
    assert np.array_equal(exact.codes, full.codes) and not exact.stopped.any()
    assert not grid_descent(p, full.codes, max_moves=0).stopped.any()


@pytest.mark.parametrize("bits", [2, 8])
def test_the_default_bound_reaches_a_local_minimum_from_far_away(bits):
    """At 8 bits the old default (50 n moves) stopped before a local minimum, silently; at 2
    bits a bound of (qmax - qmin) n was too small."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 4))
    w[:, 0] = 3.0
    p = RoundingProblem.from_weight(w, np.eye(4), GridSpec(bits=bits, scale_method="minmax"))
    r = grid_descent(p, np.full((2, 4), p.qmin))
    assert not r.stopped.any() and np.all(r.moves > (200 if bits == 8 else 0))
    for j in range(4):                      # no single +-1 move lowers the cost
        for d in (-1, 1):
            q = r.codes.copy()
            q[:, j] = np.clip(q[:, j] + d, p.qmin, p.qmax)
            assert np.all(p.cost_of_codes(q) >= r.cost - 1e-12 * (1 + r.cost))


@pytest.mark.parametrize("codes,match", [
    (np.zeros((2, 2), dtype=np.int64), "shape"),
    ("float", "integers"),
    ("high", r"lie in \[-4, 3\]"),
])
def test_errors(codes, match):
    p = make_problem(m=6, n=10, bits=3)
    if isinstance(codes, str):
        codes = (p.floor_codes + 0.5 if codes == "float"
                 else np.full(p.weight.shape, p.qmax + 1))
    with pytest.raises(QroundError, match=match):
        grid_descent(p, codes)


def test_bad_problem_and_max_moves():
    p = make_problem()
    with pytest.raises(QroundError, match="RoundingProblem"):
        grid_descent("p", p.floor_codes)
    with pytest.raises(QroundError, match="max_moves"):
        grid_descent(p, p.floor_codes, max_moves=-1)


def test_user_codes_not_modified():
    p = make_problem(m=6, n=10, bits=3)
    q0 = p.floor_codes.copy()
    keep = q0.copy()
    grid_descent(p, q0)
    np.testing.assert_array_equal(q0, keep)


def test_huge_max_moves_and_codes_that_would_wrap_in_a_cast():
    p = make_problem(m=6, n=10, bits=3)
    r = grid_descent(p, p.floor_codes, max_moves=2 ** 64 - 1)       # numba's int64: clamped
    assert np.array_equal(r.codes, grid_descent(p, p.floor_codes).codes)
    with pytest.raises(QroundError, match=r"lie in \[-4, 3\], got \[\d+, 18446744073709551615\]"):
        grid_descent(p, np.full(p.weight.shape, 2 ** 64 - 1, dtype=np.uint64))
    with pytest.raises(QroundError, match=r"got \[1e\+30"):
        grid_descent(p, np.full(p.weight.shape, 1e30))


def test_an_input_constant_on_the_calibration_data_keeps_its_codes():
    """Under bias correction a constant input's row of H is round-off (H_jj == 0, neighbours
    ~1e-17): the descent used to walk its codes to the grid's ends (up to 15 steps at 4 bits)
    for no gain, and a change of that input at inference then cost 54 % more output error."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from qround.pipeline import QuantConfig, quantize_model

    torch.manual_seed(0)
    model = nn.Linear(16, 12)

    def batch(i):
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(i))
        x[:, 7] = 0.7
        return x

    data = [batch(i) for i in range(4)]
    w = model.weight.detach().double().numpy()
    codes = {}
    for widen in (False, True):
        qm = quantize_model(model, data, QuantConfig(wbits=4, bias_correction=True, widen=widen,
                                                     progress=False))
        qw = qm.layers[""]
        s, z = qw.grid.expand()
        codes[widen] = qw.codes
        step_from_floor = qw.codes - (np.floor(w / s) + z)
        assert np.all((step_from_floor[:, 7] == 0) | (step_from_floor[:, 7] == 1)), widen
    assert np.array_equal(codes[True][:, 7], codes[False][:, 7])


# ------------------------------------------------ found by mutation testing (helper-118)
def test_beyond_counts_a_clipped_code_off_its_only_level():   # L12
    p = make_problem(m=6, n=10, bits=3)
    q = p.floor_codes.copy()
    q[-1, -1] += 1            # weight -6 clipped to qmin (not free): qmin+1 is beyond
    assert grid_descent(p, q, max_moves=0).beyond == 1


def test_a_channel_the_kernel_made_worse_keeps_its_start(monkeypatch):   # L9, L13, L14
    p = make_problem(m=6, n=10, bits=3)
    q0 = p.codes(p.rtn_choices())
    real = lattice._descent_kernel

    def bad(hess, step, fields, codes, qmin, qmax, max_moves, moves, stopped):
        real(hess, step, fields, codes, qmin, qmax, max_moves, moves, stopped)
        codes[0] = qmax                  # far off: worse than the start
        moves[0] = 3
        stopped[0] = True

    monkeypatch.setattr(lattice, "_descent_kernel", bad)
    r = grid_descent(p, q0)
    start = p.cost_of_codes(q0)
    assert np.array_equal(r.codes[0], q0[0])
    assert r.cost[0] == start[0]
    assert r.moves[0] == 0 and not r.stopped[0]
    np.testing.assert_allclose(r.cost, p.cost_of_codes(r.codes))
