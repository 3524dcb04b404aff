"""Layer statistics files: the checks and conversions that mutation testing found unprotected
(per-channel hessian count, group sizes, shapes, read-only copies, version and scalar checks,
grids and cross terms from a module, unknown keys)."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from qround import GridSpec, QroundError, RoundingProblem, fit_grid
from qround.problems import LayerStats, load_layer_stats, save_layer_stats


def layer(out=4, n=6, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(out, n))
    x = rng.normal(size=(3 * n, n))
    return w, x.T @ x / len(x)


def rewrite(src, dst, **changes):
    """A copy of the file ``src`` at ``dst`` with some entries replaced or added."""
    with np.load(src) as data:
        contents = {k: data[k] for k in data.files}
    contents.update(changes)
    np.savez(dst, **contents)
    return dst


def test_a_per_channel_hessian_needs_one_matrix_per_output_channel():
    w, h = layer()
    s = LayerStats(weight=w, hessian=np.stack([h] * 4))
    assert s.hessian.shape == (4, 6, 6)
    with pytest.raises(QroundError, match="hessian shape"):
        LayerStats(weight=w, hessian=np.stack([h] * 5))
    with pytest.raises(QroundError, match="hessian shape"):
        LayerStats(weight=w, hessian=np.stack([h] * 3))


@pytest.mark.parametrize("gs", [0, -1, True, 2.0, 4])
def test_bad_group_sizes_are_refused(tmp_path, gs):
    w, h = layer()
    with pytest.raises(QroundError, match="group_size"):
        save_layer_stats(tmp_path / "l.npz", w, h, group_size=gs)
    assert not (tmp_path / "l.npz").exists()


def test_a_group_size_above_the_inputs_is_one_group(tmp_path):
    w, h = layer()
    save_layer_stats(tmp_path / "l.npz", w, h, group_size=8)
    stats = load_layer_stats(tmp_path / "l.npz")
    assert stats.group_size == 8
    p = stats.problem()
    assert p.grid.scale.shape == (4, 1)
    np.testing.assert_array_equal(p.grid.scale,
                                  RoundingProblem.from_weight(w, h, GridSpec()).grid.scale)


@pytest.mark.parametrize("key, value", [("bias", np.zeros(3)), ("bias", np.zeros((4, 1))),
                                        ("cross", np.eye(5)), ("float_hessian", np.eye(5))])
def test_optional_arrays_of_the_wrong_shape_are_refused(key, value):
    w, h = layer()
    extra = {"cross": h} if key == "float_hessian" else {}
    with pytest.raises(QroundError, match=f"{key} must have shape"):
        LayerStats(weight=w, hessian=h, **extra, **{key: value})


def test_float_hessian_without_cross_and_zero_point_without_scale_are_refused(tmp_path):
    w, h = layer()
    with pytest.raises(QroundError, match="float_hessian is only used together with cross"):
        save_layer_stats(tmp_path / "a.npz", w, h, float_hessian=h)
    with pytest.raises(QroundError, match="zero_point is given without scale"):
        save_layer_stats(tmp_path / "a.npz", w, h, symmetric=False, zero_point=np.ones(4))
    assert not (tmp_path / "a.npz").exists()


def test_the_callers_arrays_stay_writable_and_apart_from_the_stats(tmp_path):
    w, h = layer()
    bias, c = np.arange(4.0), h + 0.01
    stats = save_layer_stats(tmp_path / "l.npz", w, h, bias=bias, cross=c, float_hessian=h)
    for arr in (w, h, bias, c):
        assert arr.flags.writeable
    w0 = w.copy()
    w[:] = 0.0
    bias[:] = -1.0
    np.testing.assert_array_equal(stats.weight, w0)
    np.testing.assert_array_equal(stats.bias, np.arange(4.0))


def test_the_stats_arrays_are_read_only(tmp_path):
    w, h = layer()
    stats = save_layer_stats(tmp_path / "l.npz", w, h, bias=np.arange(4.0),
                             scale=np.full(4, 0.3))
    for key in ("weight", "hessian", "bias", "scale", "zero_point"):
        assert not getattr(stats, key).flags.writeable, key
        with pytest.raises(ValueError):
            getattr(stats, key)[0] = 1.0
    loaded = load_layer_stats(tmp_path / "l.npz")
    assert not loaded.weight.flags.writeable


def test_numpy_scalars_become_python_values():
    w, h = layer()
    s = LayerStats(weight=w, hessian=h, bits=np.int64(3), symmetric=np.bool_(False),
                   name=np.str_("fc"))
    assert type(s.bits) is int and type(s.symmetric) is bool and type(s.name) is str
    assert s.symmetric is False
    json.dumps({"bits": s.bits, "symmetric": s.symmetric, "name": s.name})


@pytest.mark.parametrize("symmetric", ["no", 0, 1, None])
def test_symmetric_must_be_a_bool(symmetric):
    w, h = layer()
    with pytest.raises(QroundError, match="symmetric must be True or False"):
        LayerStats(weight=w, hessian=h, symmetric=symmetric)


def test_a_searched_scale_method_uses_the_files_hessian(tmp_path):
    w, h = layer()
    save_layer_stats(tmp_path / "l.npz", w, h, bits=3)
    p = load_layer_stats(tmp_path / "l.npz").problem(scale_method="mse-output")
    expect = fit_grid(w, GridSpec(bits=3, scale_method="mse-output"), hessian=h)
    np.testing.assert_array_equal(p.grid.scale, expect.scale)
    # here the output-aware search gives other scales than the weight-only one
    assert not np.array_equal(expect.scale, fit_grid(w, GridSpec(bits=3)).scale)


def test_float_hessian_reaches_the_problem(tmp_path):
    w, h = layer()
    c = 0.9 * h
    save_layer_stats(tmp_path / "l.npz", w, h, cross=c, float_hessian=2 * h)
    p = load_layer_stats(tmp_path / "l.npz").problem()
    direct = RoundingProblem.from_weight(w, h, GridSpec(), cross=c, float_hessian=2 * h)
    without = RoundingProblem.from_weight(w, h, GridSpec(), cross=c)
    np.testing.assert_allclose(p.const, direct.const, rtol=1e-12)
    assert not np.allclose(p.const, without.const)


def test_from_module_keeps_an_asymmetric_grid_and_the_cross_terms(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    w = lin.weight.detach().double().numpy()
    _, h = layer()
    spec = GridSpec(bits=3, symmetric=False, group_size=3)
    c = 0.9 * h
    stats = LayerStats.from_module(lin, h, spec, name="fc", cross=c, float_hessian=2 * h)
    grid = fit_grid(w, spec, hessian=h)
    assert stats.symmetric is False and stats.group_size == 3 and stats.bits == 3
    np.testing.assert_array_equal(stats.scale, grid.scale)
    np.testing.assert_array_equal(stats.zero_point, grid.zero_point)
    np.testing.assert_array_equal(stats.cross, c)
    np.testing.assert_array_equal(stats.float_hessian, 2 * h)
    stats.save(tmp_path / "m.npz")
    loaded = load_layer_stats(tmp_path / "m.npz")
    assert loaded.symmetric is False
    np.testing.assert_array_equal(loaded.zero_point, grid.zero_point)
    np.testing.assert_array_equal(loaded.cross, c)


def test_a_newer_format_version_is_refused(tmp_path):
    w, h = layer()
    save_layer_stats(tmp_path / "ok.npz", w, h)
    bad = rewrite(tmp_path / "ok.npz", tmp_path / "v2.npz", format_version=np.int64(2))
    with pytest.raises(QroundError, match="format_version 2; this qround reads up to 1"):
        load_layer_stats(bad)


@pytest.mark.parametrize("gs", [-2, 0, 5])
def test_a_damaged_group_size_entry_is_refused(tmp_path, gs):
    w, h = layer()
    save_layer_stats(tmp_path / "ok.npz", w, h)
    bad = rewrite(tmp_path / "ok.npz", tmp_path / "bad.npz", group_size=np.int64(gs))
    with pytest.raises(QroundError, match="bad.npz.*group_size"):
        load_layer_stats(bad)


def test_unknown_keys_are_ignored_with_a_warning_that_names_them(tmp_path):
    """A file with an extra entry (a later writer's notes) still reads; the warning names the
    keys qround reads, since a misspelt optional one (``scales``) would silently give another
    grid (helper-155)."""
    w, h = layer()
    save_layer_stats(tmp_path / "ok.npz", w, h, name="fc")
    more = rewrite(tmp_path / "ok.npz", tmp_path / "more.npz", notes=np.str_("calibrated"),
                   scales=np.ones(4))
    with pytest.warns(UserWarning, match=r"ignoring key\(s\) \['notes', 'scales'\].* it reads "
                                         r"\[.*'scale'"):
        stats = load_layer_stats(more)
    assert stats.name == "fc" and not hasattr(stats, "notes") and stats.scale is None
    np.testing.assert_array_equal(stats.weight, w)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_layer_stats(tmp_path / "ok.npz")   # what qround writes reads without a word


@pytest.mark.parametrize("value", [np.int64(1), np.uint8(0), np.array([True])])
def test_symmetric_entries_other_than_a_bool_are_refused(tmp_path, value):
    w, h = layer()
    save_layer_stats(tmp_path / "ok.npz", w, h)
    bad = rewrite(tmp_path / "ok.npz", tmp_path / "bad.npz", symmetric=value)
    with pytest.raises(QroundError, match="'symmetric' must be a single bool"):
        load_layer_stats(bad)


def test_one_element_arrays_are_not_scalars(tmp_path):
    w, h = layer()
    save_layer_stats(tmp_path / "ok.npz", w, h)
    for key, value in (("format_version", np.array([1])), ("name", np.array(["fc"])),
                       ("group_size", np.array([[-1]]))):
        bad = rewrite(tmp_path / "ok.npz", tmp_path / "bad.npz", **{key: value})
        with pytest.raises(QroundError, match=f"'{key}' must be a single"):
            load_layer_stats(bad)
