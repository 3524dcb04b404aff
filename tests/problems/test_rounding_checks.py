"""RoundingProblem behaviours found unguarded by mutation testing of qround.problems.rounding
(helper-133)."""
from __future__ import annotations

import numpy as np
import pytest

from qround import GridSpec, QroundError, RoundingProblem
from qround.grid import Grid

from ..conftest import correlated_hessian, make_problem


def _direct(p, b):
    d = p.dequantize(b) - p.weight
    if p.shared_hessian:
        return np.einsum("mi,ij,mj->m", d, p.hessian, d)
    return np.einsum("mi,mij,mj->m", d, p.hessian, d)


# ------------------------------------------------------------------ from_weight
def test_check_false_uses_the_symmetric_part_of_a_non_symmetric_hessian():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 6))
    h = correlated_hessian(6, rng)
    skew = np.triu(rng.standard_normal((6, 6)), 1)
    skew = skew - skew.T                             # x^T skew x == 0
    grid = Grid(np.full((3, 1), 0.3), np.zeros((3, 1)), 4, True, None, 6)
    p = RoundingProblem.from_weight(w, h + skew, grid, check=False)
    ref = RoundingProblem.from_weight(w, h, grid)
    np.testing.assert_allclose(p.hessian, ref.hessian, rtol=1e-12, atol=1e-12)
    b = rng.integers(0, 2, size=(4, 3, 6))
    np.testing.assert_allclose(p.costs(b), ref.costs(b), rtol=1e-9, atol=1e-12)
    with pytest.raises(QroundError, match="not symmetric"):
        RoundingProblem.from_weight(w, h + skew, grid)


def test_check_false_skips_the_psd_check():
    w = np.random.default_rng(1).standard_normal((2, 3))
    p = RoundingProblem.from_weight(w, -np.eye(3), GridSpec(bits=3), check=False)
    b = np.ones((2, 3), dtype=bool) & p.free
    np.testing.assert_allclose(p.costs(b), _direct(p, b), rtol=1e-9, atol=1e-12)
    with pytest.raises(QroundError, match="positive semi-definite"):
        RoundingProblem.from_weight(w, -np.eye(3), GridSpec(bits=3))


@pytest.mark.parametrize("damp", [True, np.bool_(True), "0.1", None])
def test_damp_must_be_a_number(damp):
    with pytest.raises(QroundError, match="damp must be a finite number"):
        RoundingProblem.from_weight(np.ones((2, 3)), np.eye(3), GridSpec(bits=3), damp=damp)


def test_float_hessian_needs_cross_and_cross_needs_a_shared_hessian():
    w = np.random.default_rng(2).standard_normal((2, 4))
    with pytest.raises(QroundError, match="float_hessian is only used together with cross"):
        RoundingProblem.from_weight(w, np.eye(4), GridSpec(bits=3), float_hessian=np.eye(4))
    with pytest.raises(QroundError, match=r"cross=\) needs a shared \(n, n\) hessian"):
        RoundingProblem.from_weight(w, np.stack([np.eye(4)] * 2), GridSpec(bits=3),
                                    cross=np.eye(4))


# ------------------------------------------------------------------ arrays and caches
def test_frac_is_zero_where_a_weight_has_no_choice(problem):
    fixed = ~problem.free
    assert fixed.any()
    assert np.all(problem.frac[fixed] == 0)
    raw = problem.weight / problem.scale - np.floor(problem.weight / problem.scale)
    assert np.any(raw[fixed] != 0)              # the clipped weights had a fraction
    np.testing.assert_array_equal(problem.frac[~fixed], raw[~fixed])


def test_rtn_energies_and_costs_are_read_only(problem):
    e, c = problem.rtn_energies(), problem.rtn_costs()
    before = c.copy()
    with pytest.raises(ValueError):
        e[0] = 1e9
    with pytest.raises(ValueError):
        c[0] = 1e9
    np.testing.assert_array_equal(problem.rtn_costs(), before)


def test_choices_from_codes_refuses_a_ceil_on_a_fixed_weight(problem):
    c, i = map(int, np.argwhere(~problem.free)[0])
    codes = problem.floor_codes.copy()
    codes[c, i] += 1
    with pytest.raises(QroundError, match="floor or ceil"):
        problem.choices_from_codes(codes)


# ------------------------------------------------------------------ exports
@pytest.mark.parametrize("per_channel", [False, True])
def test_qubo_and_bqm_give_the_problems_energies(per_channel):
    import dimod

    p = make_problem(m=3, n=7, seed=4, per_channel=per_channel)
    rng = np.random.default_rng(4)
    b = rng.integers(0, 2, size=p.weight.shape).astype(bool) & p.free
    for c in range(p.num_channels):
        q = p.qubo(c)
        x = b[c].astype(float)
        assert x @ q @ x == pytest.approx(p.energies(b)[c], rel=1e-9, abs=1e-12)
        bqm = p.to_bqm(c)
        sample = {int(i): int(b[c, i]) for i in np.flatnonzero(p.free[c])}
        assert bqm.vartype is dimod.BINARY and set(bqm.variables) == set(sample)
        assert bqm.energy(sample) == pytest.approx(p.costs(b)[c], rel=1e-9, abs=1e-12)


def test_negative_channels_count_from_the_end(problem):
    m = problem.num_channels
    np.testing.assert_array_equal(problem.qubo(-1), problem.qubo(m - 1))
    np.testing.assert_array_equal(problem.qubo(-m), problem.qubo(0))
    with pytest.raises(QroundError, match="out of range"):
        problem.qubo(-m - 1)


# ------------------------------------------------------------------ sub-problems
def test_subproblem_of_per_channel_hessians_takes_their_rows():
    p = make_problem(m=5, n=8, seed=5, per_channel=True)
    b = p.rtn_choices()
    sub = p.subproblem([4, 1])
    np.testing.assert_array_equal(sub.hessian, p.hessian[[4, 1]])
    np.testing.assert_allclose(sub.costs(b[[4, 1]]), p.costs(b)[[4, 1]], rtol=1e-12)
    np.testing.assert_allclose(sub.costs(b[[4, 1]]), _direct(sub, b[[4, 1]]), rtol=1e-9)


def test_a_restricted_problem_stays_restricted_when_restricted_again():
    p = make_problem(3, 8, bits=3, group_size=4, seed=2)
    b = p.rtn_choices()
    perm = p.restrict(np.r_[4:8, 0:4], b)
    again = perm.restrict(np.arange(8), b[:, np.r_[4:8, 0:4]])
    assert again.restricted
    with pytest.raises(QroundError, match="restricted"):
        again.with_grid(again.grid)


def test_restrict_takes_numpy_integers_in_slices():
    p = make_problem(m=3, n=10, seed=0)
    b = p.rtn_choices()
    sub = p.restrict(slice(np.int64(2), np.int32(8), np.int8(2)), b)
    np.testing.assert_array_equal(sub.weight, p.weight[:, 2:8:2])


def test_restrict_refuses_a_stack_of_held_choices():
    p = make_problem(m=3, n=10, seed=0)
    held = np.stack([p.rtn_choices()] * 2)
    with pytest.raises(QroundError, match="held must be one"):
        p.restrict([0, 1], held)


def test_cost_of_codes_reads_codes_around_the_zero_point():
    p = make_problem(m=4, n=8, bits=3, seed=6, symmetric=False)
    assert np.any(p.zero_point != 0)
    b = np.random.default_rng(6).integers(0, 2, size=p.weight.shape).astype(bool) & p.free
    np.testing.assert_allclose(p.cost_of_codes(p.codes(b)), p.costs(b), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(p.cost_of_codes(p.codes(b)), _direct(p, b), rtol=1e-9,
                               atol=1e-12)
