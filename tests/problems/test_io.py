"""Layer statistics files: round trip, grids from files, atomic writes, bad files."""
import os

import numpy as np
import pytest
import torch
from torch import nn

from qround import GridSpec, QroundError, RoundingProblem, fit_grid
from qround.problems import (LayerStats, load_layer_stats, save_layer_stats,
                             save_layer_stats_from_module)
from qround.problems import io as stats_io


def layer(out=4, n=6, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(out, n))
    x = rng.normal(size=(3 * n, n))
    return w, x.T @ x / len(x)


def same_problem(a: RoundingProblem, b: RoundingProblem):
    for key in ("weight", "hessian", "scale", "zero_point", "floor_codes", "free", "grad",
                "const"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


def test_round_trip_all_fields(tmp_path):
    w, h = layer()
    rng = np.random.default_rng(1)
    grid = fit_grid(w, GridSpec(bits=3, symmetric=False, group_size=3))
    c = h + 0.1 * rng.normal(size=h.shape)
    path = tmp_path / "fc1.npz"
    saved = save_layer_stats(path, w, h, bits=3, symmetric=False, group_size=3, scale=grid.scale,
                             zero_point=grid.zero_point, bias=np.arange(4.0), cross=c,
                             float_hessian=h * 2, name="fc1")
    loaded = load_layer_stats(path)
    for key in ("weight", "hessian", "scale", "zero_point", "bias", "cross", "float_hessian"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(saved, key), err_msg=key)
    assert (loaded.bits, loaded.symmetric, loaded.group_size, loaded.name) == (3, False, 3, "fc1")
    assert loaded.hessian.dtype == np.float64
    direct = RoundingProblem.from_weight(w, h, grid, cross=c, float_hessian=h * 2, name="fc1")
    same_problem(loaded.problem(), direct)
    assert loaded.problem().name == "fc1"


def test_minimal_file_fits_grid_and_bits_override(tmp_path):
    w, h = layer()
    path = tmp_path / "l.npz"
    save_layer_stats(path, w, h)
    stats = load_layer_stats(path)
    assert stats.scale is None and stats.group_size is None and stats.name == ""
    same_problem(stats.problem(), RoundingProblem.from_weight(w, h, GridSpec(bits=4)))
    p3 = stats.problem(bits=3, scale_method="minmax")
    assert p3.grid.bits == 3
    same_problem(p3, RoundingProblem.from_weight(w, h, GridSpec(bits=3, scale_method="minmax")))


def test_stored_scale_is_used_and_bits_override_refused(tmp_path):
    w, h = layer()
    scale = np.full(4, 0.37)                    # deliberately not what a search would find
    path = tmp_path / "l.npz"
    save_layer_stats(path, w, h, bits=4, scale=scale)
    stats = load_layer_stats(path)
    np.testing.assert_array_equal(stats.problem().grid.scale[:, 0], scale)
    np.testing.assert_array_equal(stats.problem(bits=4).grid.scale[:, 0], scale)
    with pytest.raises(QroundError, match="bits=3 differs from the file's bits=4"):
        stats.problem(bits=3)
    # a scale method is not searched on a file with stored scales: refused, not ignored
    with pytest.raises(QroundError, match="scale_method='minmax' is not used: the file stores"):
        stats.problem(scale_method="minmax")
    from qround.cli import main

    assert main(["solve", str(path), "--scale-method", "minmax"]) != 0
    assert main(["solve", str(path)]) == 0


def test_from_module_stores_fitted_grid_and_bias(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    _, h = layer()
    spec = GridSpec(bits=3, scale_method="mse-output")
    stats = save_layer_stats_from_module(tmp_path / "m.npz", lin, h, spec, name="fc")
    loaded = load_layer_stats(tmp_path / "m.npz")
    w = lin.weight.detach().double().numpy()
    grid = fit_grid(w, spec, hessian=h)
    np.testing.assert_array_equal(loaded.scale, grid.scale)
    np.testing.assert_array_equal(loaded.bias, lin.bias.detach().double().numpy())
    same_problem(loaded.problem(), RoundingProblem.from_weight(w, h, grid))
    assert stats.name == loaded.name == "fc"
    conv = nn.Conv2d(2, 3, 2, bias=False)
    s = LayerStats.from_module(conv, np.eye(8), GridSpec())
    assert s.weight.shape == (3, 8) and s.bias is None
    with pytest.raises(QroundError, match="groups"):
        LayerStats.from_module(nn.Conv2d(4, 4, 1, groups=2), np.eye(2), GridSpec())


def test_failing_write_leaves_no_partial_file(tmp_path, monkeypatch):
    w, h = layer()
    path = tmp_path / "l.npz"

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("disk full")

    monkeypatch.setattr(stats_io.np, "savez", broken_savez)
    with pytest.raises(RuntimeError, match="disk full"):
        save_layer_stats(path, w, h)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    save_layer_stats(path, w, h, name="old")
    monkeypatch.setattr(stats_io.np, "savez", broken_savez)
    with pytest.raises(RuntimeError):
        save_layer_stats(path, 2 * w, h, name="new")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["l.npz"]
    old = load_layer_stats(path)
    assert old.name == "old"
    np.testing.assert_array_equal(old.weight, w)


def test_bad_files_and_arguments(tmp_path):
    w, h = layer()
    with pytest.raises(QroundError, match="missing.npz"):
        load_layer_stats(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(QroundError, match="junk.npz"):
        load_layer_stats(junk)
    np.savez(tmp_path / "nohess.npz", weight=w, bits=4, symmetric=True, group_size=-1, name="",
             format_version=1)
    with pytest.raises(QroundError, match="hessian"):
        load_layer_stats(tmp_path / "nohess.npz")
    np.savez(tmp_path / "shape.npz", weight=w, hessian=np.eye(5), bits=4, symmetric=True,
             group_size=-1, name="", format_version=1)
    with pytest.raises(QroundError, match="shape.npz.*hessian shape"):
        load_layer_stats(tmp_path / "shape.npz")
    np.savez(tmp_path / "future.npz", weight=w, hessian=h, bits=4, symmetric=True,
             group_size=-1, name="", format_version=99)
    with pytest.raises(QroundError, match="format_version 99"):
        load_layer_stats(tmp_path / "future.npz")
    np.savez(tmp_path / "zero.npz", weight=w, hessian=h, bits=4, symmetric=True,
             group_size=-1, name="", format_version=0)
    with pytest.raises(QroundError, match="format_version 0; versions start at 1"):
        load_layer_stats(tmp_path / "zero.npz")
    np.savez(tmp_path / "obj.npz", weight=np.array([object()]), hessian=h)
    with pytest.raises(QroundError, match="obj.npz"):
        load_layer_stats(tmp_path / "obj.npz")
    with pytest.raises(QroundError, match="bits"):
        save_layer_stats(tmp_path / "b.npz", w, h, bits=12)
    with pytest.raises(QroundError, match="group_size"):
        save_layer_stats(tmp_path / "b.npz", w, h, group_size=4)
    with pytest.raises(QroundError, match="scale"):
        save_layer_stats(tmp_path / "b.npz", w, h, scale=np.ones(3))
    with pytest.raises(QroundError, match="NaN"):
        save_layer_stats(tmp_path / "b.npz", w * np.nan, h)
    assert not (tmp_path / "b.npz").exists()
    save_layer_stats(tmp_path / "new" / "dir.npz", w, h)   # its folder is made, as qm.save does
    assert load_layer_stats(tmp_path / "new" / "dir.npz").weight.shape == w.shape
    with pytest.raises(QroundError, match="is a folder"):
        load_layer_stats(tmp_path / "new")


@pytest.mark.parametrize("key, value, match", [
    ("bits", np.array([4]), "'bits' must be a single int"),
    ("bits", np.array("four"), "'bits' must be a single int"),
    ("bits", np.array(4.7), "'bits' must be a single int"),
    ("symmetric", np.array("no"), "'symmetric' must be a single bool"),
    ("name", np.array(3), "'name' must be a single str"),
    ("group_size", np.array(True), "'group_size' must be a single int"),
])
def test_bad_scalar_entries_are_named(tmp_path, key, value, match):
    w, h = layer()
    save_layer_stats(tmp_path / "ok.npz", w, h)
    with np.load(tmp_path / "ok.npz") as data:
        contents = {k: data[k] for k in data.files}
    contents[key] = value
    np.savez(tmp_path / "bad.npz", **contents)
    with pytest.raises(QroundError, match=f"bad.npz.*{match}"):
        load_layer_stats(tmp_path / "bad.npz")


def test_a_single_array_file_is_named(tmp_path):
    w, _ = layer()
    np.save(tmp_path / "w.npy", w)
    with pytest.raises(QroundError, match=r"w.npy' is a single array \(.npy\)"):
        load_layer_stats(tmp_path / "w.npy")


def test_a_member_that_is_not_a_numpy_array_is_named(tmp_path):
    """An archive written by hand (a text member where numpy.savez writes an .npy array)."""
    import zipfile

    good = tmp_path / "good.npz"
    save_layer_stats(good, np.ones((2, 3)), np.eye(3), bits=3)
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.namelist():
            data = b"3" if item == "bits.npy" else src.read(item)
            dst.writestr(item.replace("bits.npy", "bits"), data)
    with pytest.raises(QroundError, match="'bits' is not a numpy array"):
        load_layer_stats(bad)
