"""Grid behaviours found unguarded by mutation testing of qround.grid (helper-133)."""
from __future__ import annotations

import numpy as np
import pytest

from qround import GridSpec, QroundError, fit_grid
from qround.grid import Grid, _mse_search_numpy, _range_to_grid, qrange


def _w(seed=0, shape=(6, 16)):
    return np.random.default_rng(seed).standard_normal(shape)


# ------------------------------------------------------------------ GridSpec checks
@pytest.mark.parametrize("kwargs, match", [
    (dict(min_shrink=0), "min_shrink"),
    (dict(min_shrink=0.0), "min_shrink"),
    (dict(min_shrink=1.5), "min_shrink"),
    (dict(min_shrink=True), "min_shrink"),
    (dict(min_shrink=float("nan")), "min_shrink"),
    (dict(min_shrink="0.5"), "min_shrink"),
    (dict(group_size=0), "group_size"),
    (dict(group_size=-4), "group_size"),
    (dict(group_size=True), "group_size"),
    (dict(shrink_steps=True), "shrink_steps"),
    (dict(shrink_steps=0), "shrink_steps"),
])
def test_gridspec_refuses_bad_settings(kwargs, match):
    with pytest.raises(QroundError, match=match):
        GridSpec(**kwargs)


def test_default_mse_search_has_80_candidates_down_to_a_fifth():
    """The default grid is the mse search over linspace(1, 0.2, 80), candidate for candidate."""
    w = _w(1, (8, 32))
    wg = w[:, None, :]
    lo, hi = wg.min(axis=2), wg.max(axis=2)
    qmin, qmax = qrange(4, True)
    s, z = _mse_search_numpy(wg, lo, hi, np.linspace(1.0, 0.2, 80), qmin, qmax, True)
    g = fit_grid(w)
    np.testing.assert_array_equal(g.scale, s)
    np.testing.assert_array_equal(g.zero_point, z)


@pytest.mark.parametrize("steps, min_shrink", [(2, 0.5), (3, 0.4), (7, 0.3)])
def test_mse_search_tries_exactly_shrink_steps_candidates(steps, min_shrink):
    w = _w(2, (10, 24))
    wg = w[:, None, :]
    lo, hi = wg.min(axis=2), wg.max(axis=2)
    qmin, qmax = qrange(3, False)
    s, z = _mse_search_numpy(wg, lo, hi, np.linspace(1.0, min_shrink, steps), qmin, qmax, False)
    g = fit_grid(w, GridSpec(bits=3, symmetric=False, shrink_steps=steps, min_shrink=min_shrink))
    np.testing.assert_array_equal(g.scale, s)
    np.testing.assert_array_equal(g.zero_point, z)


# ------------------------------------------------------------------ Grid checks
def test_grid_refuses_zero_scale_and_bad_zero_points():
    one = np.ones((2, 1))
    with pytest.raises(QroundError, match="finite and positive"):
        Grid(np.array([[0.1], [0.0]]), np.zeros((2, 1)), 4, True, None, 8)
    for z in (16.0, -1.0):   # 4-bit unsigned codes are 0..15
        with pytest.raises(QroundError, match=r"zero_point must be integers in \[0, 15\]"):
            Grid(0.1 * one, np.array([[3.0], [z]]), 4, False, None, 8)
    assert Grid(0.1 * one, np.array([[0.0], [15.0]]), 4, False, None, 8).qmax == 15
    with pytest.raises(QroundError, match="symmetric Grid has zero_point 0"):
        Grid(0.1 * one, np.array([[0.0], [2.0]]), 4, True, None, 8)


def test_grid_refuses_in_features_not_a_multiple_of_its_groups():
    s, z = np.full((3, 4), 0.1), np.zeros((3, 4))
    with pytest.raises(QroundError, match="in_features=34 must be a positive multiple"):
        Grid(s, z, 4, True, 8, 34)
    with pytest.raises(QroundError, match="in_features=0"):
        Grid(np.full((3, 1), 0.1), np.zeros((3, 1)), 4, True, None, 0)


def test_grid_does_not_alias_or_freeze_the_callers_arrays():
    s = np.array([[0.3], [0.5]])
    z = np.array([[0.0], [0.0]])
    g = Grid(s, z, 4, True, None, 8)
    assert s.flags.writeable and z.flags.writeable    # the caller's arrays stay usable
    s[:] = 7.0
    np.testing.assert_array_equal(g.scale, [[0.3], [0.5]])


def test_quantize_gives_int64_codes():
    w = _w(3)
    g = fit_grid(w, GridSpec(bits=4))
    assert g.quantize(w).dtype == np.int64


def test_dequantize_refuses_codes_one_step_off_the_grid():
    w = _w(4, (2, 8))
    g = fit_grid(w, GridSpec(bits=3, symmetric=False))
    q = g.quantize(w)
    for bad_value in (g.qmin - 1, g.qmax + 1):
        bad = q.copy()
        bad[1, 3] = bad_value
        with pytest.raises(QroundError, match=r"integers in \[0, 7\]"):
            g.dequantize(bad)
    ok = q.copy()
    ok[1, 3], ok[0, 0] = g.qmin, g.qmax
    g.dequantize(ok)


def test_dequantize_is_scale_times_code_minus_zero():
    g = Grid(np.array([[0.5], [0.25]]), np.array([[2.0], [5.0]]), 3, False, None, 3)
    codes = np.array([[0, 2, 7], [5, 1, 6]])
    np.testing.assert_array_equal(g.dequantize(codes),
                                  [[-1.0, 0.0, 2.5], [0.0, -1.0, 0.25]])


def test_a_group_size_covering_every_input_is_a_per_channel_grid():
    w = _w(5, (4, 12))
    per_channel = fit_grid(w, GridSpec(bits=3))
    for gs in (12, 16, 1000):
        g = fit_grid(w, GridSpec(bits=3, group_size=gs))
        assert g.group_size is None and g.groups == 1
        np.testing.assert_array_equal(g.scale, per_channel.scale)


# ------------------------------------------------------------------ asymmetric ranges
def test_asymmetric_minmax_grid_keeps_zero_and_covers_a_positive_range():
    """All-positive weights: the range is [0, max] (zero stays representable), so every weight
    rounds within half a step."""
    w = np.random.default_rng(6).uniform(0.5, 1.7, size=(5, 20))
    g = fit_grid(w, GridSpec(bits=4, symmetric=False, scale_method="minmax"))
    np.testing.assert_allclose(g.scale[:, 0], w.max(axis=1) / 15)
    np.testing.assert_array_equal(g.zero_point, 0)
    err = np.abs(g.dequantize(g.quantize(w)) - w)
    assert np.all(err <= 0.5 * g.scale + 1e-12)
    neg = fit_grid(-w, GridSpec(bits=4, symmetric=False, scale_method="minmax"))
    np.testing.assert_array_equal(neg.zero_point, 15)


def test_asymmetric_zero_point_is_the_nearest_code_of_the_minimum():
    lo, hi = np.array([[-0.35]]), np.array([[1.65]])    # scale 2/15: -lo/s = 2.625
    s, z = _range_to_grid(lo, hi, 0, 15, False)
    assert z[0, 0] == 3
    w = np.array([[-0.35, 1.65, 0.0, 0.7]])
    g = fit_grid(w, GridSpec(bits=4, symmetric=False, scale_method="minmax"))
    assert g.zero_point[0, 0] == 3
    err = np.abs(g.dequantize(g.quantize(w)) - w)
    assert np.all(err <= 0.5 * g.scale + 1e-12)


# ------------------------------------------------------------------ mse-output search
def _mse_output_reference(w, h, spec):
    """The search written plainly: per (channel, group) each shrink's RTN error scored with the
    group's diagonal block of H, the first best kept (the full range when nothing is better)."""
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    out, n = w.shape
    gs = spec.group_size or n
    groups = n // gs
    best_s, best_z = np.zeros((out, groups)), np.zeros((out, groups))
    for c in range(out):
        for g in range(groups):
            sl = slice(g * gs, (g + 1) * gs)
            x = w[c, sl]
            hb = (h if h.ndim == 2 else h[c])[sl, sl]
            best = None
            for shrink in np.linspace(1.0, spec.min_shrink, spec.shrink_steps):
                s, z = _range_to_grid(np.array([[x.min() * shrink]]),
                                      np.array([[x.max() * shrink]]), qmin, qmax, spec.symmetric)
                s, z = s[0, 0], z[0, 0]
                q = np.clip(np.floor(x / s + 0.5) + z, qmin, qmax)
                e = s * (q - z) - x
                cost = e @ hb @ e
                if best is None or cost < best:
                    best, best_s[c, g], best_z[c, g] = cost, s, z
    return best_s, best_z


@pytest.mark.parametrize("symmetric, group_size, per_channel, steps", [
    (False, None, False, 2), (False, 8, True, 6), (True, 8, False, 3), (False, None, True, 20),
])
def test_mse_output_search_is_the_plain_search(symmetric, group_size, per_channel, steps):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((5, 16)) + (0.8 if not symmetric else 0.0)
    a = rng.standard_normal((5 if per_channel else 1, 40, 16))
    h = np.einsum("mki,mkj->mij", a, a) / 40
    h = h if per_channel else h[0]
    spec = GridSpec(bits=3, symmetric=symmetric, group_size=group_size,
                    scale_method="mse-output", shrink_steps=steps, min_shrink=0.3)
    g = fit_grid(w, spec, hessian=h)
    s, z = _mse_output_reference(w, h, spec)
    np.testing.assert_allclose(g.scale, s, rtol=1e-12)
    np.testing.assert_array_equal(g.zero_point, z)


def test_mse_output_keeps_the_full_range_where_h_sees_nothing():
    """A group whose inputs H ignores scores 0 for every shrink: the first (min-max) is kept."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((4, 16))
    h = np.zeros((16, 16))
    h[8:, 8:] = np.eye(8)
    g = fit_grid(w, GridSpec(bits=3, group_size=8, scale_method="mse-output"), hessian=h)
    mm = fit_grid(w, GridSpec(bits=3, group_size=8, scale_method="minmax"))
    np.testing.assert_array_equal(g.scale[:, 0], mm.scale[:, 0])


def test_mse_output_refuses_a_stack_of_hessians_of_another_channel_count():
    w = _w(9, (4, 8))
    h = np.stack([np.eye(8)] * 5)
    with pytest.raises(QroundError, match=r"hessian shape \(5, 8, 8\) does not match"):
        fit_grid(w, GridSpec(scale_method="mse-output"), hessian=h)
