"""Solver inputs at the edges (found by a fuzzing review): float32 torch solvers on problems
whose scale leaves float32's range, the ratio of relative costs, a registered variant's
unknown options."""
import math

import numpy as np
import pytest

from qround import QroundError, get_solver
from qround.grid import Grid, GridSpec
from qround.problems.rounding import RoundingProblem


def _scaled(scale: float) -> RoundingProblem:
    rng = np.random.default_rng(0)
    m, n = 8, 24
    w = rng.normal(size=(m, n))
    x = rng.normal(size=(64, n))
    h = x.T @ x / 64
    base = RoundingProblem.from_weight(w, h, GridSpec(bits=3))
    grid = Grid(base.grid.scale * scale, base.grid.zero_point, 3, True, None, n)
    return RoundingProblem.from_weight(w * scale, h * scale, grid)


@pytest.mark.parametrize("spec", ["meanfield", "cem(dtype='float32')",
                                  "hopfield(iterations=300, dtype='float32')"])
def test_float32_solvers_work_at_any_scale(spec):
    """s^2 H of 1e45 or 1e-45 leaves float32: the solvers work in units that fit, and find
    what they find at scale 1."""
    ratios = {sc: get_solver(spec).solve(_scaled(sc), seed=0).ratio
              for sc in (1.0, 1e-15, 1e15)}
    assert ratios[1.0] < 0.95
    for sc in (1e-15, 1e15):
        assert ratios[sc] == pytest.approx(ratios[1.0], rel=1e-3), ratios


@pytest.mark.parametrize("spec", ["meanfield", "cem(dtype='float32')",
                                  "hopfield(iterations=300, dtype='float32')"])
def test_float32_solvers_rescale_a_huge_hessian_beside_tiny_steps(spec):
    """Steps near 1e-13 beside H near 1e39: s^2 H is ordinary, but H overflowed float32 and
    the solve silently kept RTN (ratio 1)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 32)) * 3e19
    w = rng.normal(size=(8, 32)) * 1e-13
    p = RoundingProblem.from_weight(w, x.T @ x / 128, GridSpec(bits=3))
    f32 = get_solver(spec).solve(p, seed=0).ratio
    f64 = get_solver(spec.replace("float32", "float64") if "float32" in spec
                     else "meanfield(dtype='float64')").solve(p, seed=0).ratio
    assert f32 < 0.95 and f32 == pytest.approx(f64, rel=1e-2)
    with pytest.raises(QroundError, match="beyond float32's range; use dtype='float64'"):
        get_solver("gptq(dtype='float32')").solve(p)   # gptq does not rescale: it says so


def test_ratio_is_nan_when_costs_are_relative():
    """An asymmetric problem without float_hessian has costs up to a constant: a negative RTN
    total gives no ratio (NaN), while costs still compare."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 12))
    x = rng.normal(size=(64, 12))
    xq = x + 0.3 * rng.normal(size=x.shape)
    p = RoundingProblem.from_weight(w, xq.T @ xq / 64, GridSpec(bits=2), cross=xq.T @ x / 64)
    sol = get_solver("tabu").solve(p, seed=0)
    assert sol.total_rtn_cost < 0
    assert math.isnan(sol.ratio) and sol.total_cost <= sol.total_rtn_cost


def test_a_registered_variant_names_its_unknown_option():
    with pytest.raises(QroundError, match=r"'tabu-fast' does not take \['foo'\]; it takes"):
        get_solver("tabu-fast(foo=1)")
    s = get_solver("tabu-fast(restarts=2)")
    assert s.restarts == 2 and s.iters_per_var == 1.0


@pytest.mark.parametrize("spec,message", [("hopfield(lr=1e308)", "lr must lie in"),
                                          ("hopfield(reg=1e39)", r"reg \(lambda\) must lie in"),
                                          ("hopfield(beta=(1e39, 2.0))", "beta must lie in"),
                                          ("meanfield(beta=(1e-50, 1000.0))",
                                           r"beta must lie in \[1e-8, 1e8\]"),
                                          ("gptq(damp=1e308)", "damp must lie in"),
                                          ("hopfield-classic(temperature=(1e300, 1e-300))",
                                           r"temperature must lie in \[1e-8, 1e8\]")])
def test_absurd_relaxation_options_are_refused(spec, message):
    with pytest.raises(QroundError, match=message):
        get_solver(spec)
