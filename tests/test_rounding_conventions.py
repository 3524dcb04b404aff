"""Conventions and identities that a hand mutation-testing pass found unguarded: ties round up
everywhere, damping is per channel, asymmetric grids cover their range, the output-error scale
search reads H, stochastic rounding leans the right way, the border span, GPTQ's dead inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qround import GridSpec, RoundingProblem, fit_grid, get_solver
from qround.activations import ActQuantizer
from qround.baselines import gptq_quantize
from qround.grid import Grid

HALVES = np.array([[0.5, 1.5, -0.5, -1.5, 2.5, -2.5, 0.25, -0.75]])
UP = np.array([[1, 2, 0, -1, 3, -2, 0, -1]])        # floor(x + 1/2): ties go up


def unit_grid(m: int, n: int) -> Grid:
    return Grid(np.ones((m, 1)), np.zeros((m, 1)), 4, True, None, n)


def test_ties_round_up_in_the_grid_the_problem_and_gptq():
    grid = unit_grid(1, HALVES.shape[1])
    np.testing.assert_array_equal(grid.quantize(HALVES), UP)
    p = RoundingProblem.from_weight(HALVES, np.eye(HALVES.shape[1]), grid)
    np.testing.assert_array_equal(p.codes(p.rtn_choices()), UP)
    # an uncoupled H gives GPTQ nothing to feed back: it is rounding to nearest, ties up
    np.testing.assert_array_equal(gptq_quantize(HALVES, np.eye(HALVES.shape[1]), grid,
                                                percdamp=0.0), UP)


def test_damping_is_per_channel_with_a_stack_of_hessians():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 5))
    a = rng.standard_normal((3, 5, 5))
    h = np.einsum("mij,mkj->mik", a, a) * np.array([1.0, 10.0, 100.0])[:, None, None]
    grid = fit_grid(w, GridSpec(bits=3))
    plain = RoundingProblem.from_weight(w, h, grid)
    damped = RoundingProblem.from_weight(w, h, grid, damp=0.1)
    b = rng.integers(0, 2, size=w.shape).astype(bool)
    d = damped.dequantize(b) - w
    lam = 0.1 * np.mean(np.diagonal(h, axis1=1, axis2=2), axis=1)       # one per channel
    np.testing.assert_allclose(damped.costs(b), plain.costs(b) + lam * np.sum(d * d, axis=1),
                               rtol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_asymmetric_min_max_grid_rounds_its_range_within_half_a_step(seed):
    w = np.random.default_rng(seed).uniform(-0.3, 1.7, size=(6, 32))
    grid = fit_grid(w, GridSpec(bits=3, symmetric=False, scale_method="minmax"))
    err = np.abs(grid.dequantize(grid.quantize(w)) - w)
    assert np.all(err <= 0.5 * grid.scale + 1e-12)


def test_output_error_scale_search_weighs_by_h():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 12))
    h = np.diag([100.0] + [1e-3] * 11)            # only the first input reaches the output

    def output_error(grid):
        e = grid.dequantize(grid.quantize(w)) - w
        return np.einsum("mi,ij,mj->m", e, h, e)

    plain = output_error(fit_grid(w, GridSpec(bits=3, scale_method="mse")))
    weighed = output_error(fit_grid(w, GridSpec(bits=3, scale_method="mse-output"), hessian=h))
    assert np.all(weighed <= plain * (1 + 1e-9)) and np.any(weighed < 0.9 * plain)


def test_stochastic_rounding_goes_up_with_the_probability_of_the_fraction():
    """From an all-down start, one sample: it rounds up where the fraction is large."""
    frac = np.where(np.random.default_rng(2).random((8, 64)) < 0.5, 0.9, 0.8)
    w = np.floor(np.random.default_rng(3).uniform(-3, 3, size=frac.shape)) + frac
    p = RoundingProblem.from_weight(w, np.eye(64), unit_grid(8, 64))
    sol = get_solver("stochastic", samples=1).solve(p, init=np.zeros(w.shape, bool), seed=0)
    c = sol.choices   # 512 draws: up at about the fraction's rate, not always (nearest) or never
    assert 0.75 < c.mean() < 0.92
    assert 0.8 < c[frac == 0.9].mean() < 0.97 and 0.68 < c[frac == 0.8].mean() < 0.9
    assert c[frac == 0.9].mean() > c[frac == 0.8].mean() + 0.05


def test_the_border_span_is_the_larger_side_of_the_grid():
    q = ActQuantizer(bits=4)
    q.calibrate(torch.linspace(-1, 1, 101))        # signed: codes -8..7
    assert (q.qmin, q.qmax, q.span) == (-8, 7, 8)
    q.calibrate(torch.linspace(0, 1, 101))         # unsigned: codes 0..15
    assert (q.qmin, q.qmax, q.span) == (0, 15, 15)


def test_gptq_dead_inputs_keep_their_nearest_code():
    """As documented (an uncoupled unit diagonal would give the same codes by itself)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 10))
    a = rng.standard_normal((40, 10))
    a[:, [2, 7]] = 0.0                              # inputs that never fire
    h = a.T @ a / 40
    grid = fit_grid(w, GridSpec(bits=3))
    codes = gptq_quantize(w, h, grid)
    np.testing.assert_array_equal(codes[:, [2, 7]], grid.quantize(w)[:, [2, 7]])
    live = [i for i in range(10) if i not in (2, 7)]
    assert not np.array_equal(codes[:, live], grid.quantize(w)[:, live])   # GPTQ did act
