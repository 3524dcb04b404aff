"""Behaviours of the command line's argument checks (qround.cliargs) and commands
(qround.cli) that the other tests leave open: bounds, path checks, outputs, seeds."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from qround.cli import build_parser, main
from qround.cliargs import bits_list, check_format, check_paths
from qround.errors import MAX_SEED, QroundError
from qround.grid import GridSpec, fit_grid
from qround.problems.io import save_layer_stats


def _hessian(n, rng):
    a = rng.normal(size=(n, n))
    return a @ a.T + n * np.eye(n)


@pytest.fixture
def layer_file(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(12, 24))
    path = tmp_path / "layer.npz"
    save_layer_stats(path, w, _hessian(24, rng), bits=4, scale=fit_grid(w, GridSpec(bits=4)).scale,
                     name="toy")
    return path


# ------------------------------------------------------------------------ argument types
def test_upper_bounds_are_inclusive():
    """--threads takes MAX_THREADS itself, --seed MAX_SEED itself; one more is refused."""
    from qround.cli import MAX_THREADS

    p = build_parser()
    args = p.parse_args(["quantize", "--threads", str(MAX_THREADS), "--seed", str(MAX_SEED)])
    assert args.threads == MAX_THREADS and args.seed == MAX_SEED
    for argv in (["quantize", "--threads", str(MAX_THREADS + 1)],
                 ["solve", "x.npz", "--seed", str(MAX_SEED + 1)]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)


@pytest.mark.parametrize("text", ["inf", "nan", "-inf", "-0.5"])
def test_damp_must_be_a_finite_non_negative_number(text, capsys):
    assert main(["quantize", "--model", "no-such-model", f"--damp={text}"]) == 2
    assert "argument --damp: must be a finite number >= 0.0" in capsys.readouterr().err


def test_lower_bounds_of_numbers_are_inclusive():
    p = build_parser()
    assert p.parse_args(["quantize", "--damp", "0"]).damp == 0.0
    assert p.parse_args(["sensitivity", "--mean-bits", "1"]).mean_bits == 1.0
    with pytest.raises(SystemExit):
        p.parse_args(["sensitivity", "--mean-bits", "0.99"])


def test_bits_list_keeps_each_width_once_in_the_order_given():
    assert bits_list("4,2,4,,8,2") == (4, 2, 8)
    assert bits_list("2") == (2,)


# ------------------------------------------------------------------------ path checks
def test_an_output_in_a_folder_that_is_not_writable_is_refused(tmp_path, monkeypatch):
    # (as root every folder is writable: os.access is what the check asks)
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != str(tmp_path))
    with pytest.raises(QroundError, match="is not writable"):
        check_paths({"--out": str(tmp_path / "new" / "q.npz")})
    check_paths({"--out": str(tmp_path.parent / "q.npz")})   # another folder: fine


def test_an_output_inside_an_input_folder_is_refused(tmp_path):
    model = tmp_path / "ckpt"
    model.mkdir()
    with pytest.raises(QroundError, match="lies inside the input --model folder"):
        check_paths({"--out": str(model / "sub" / "q.safetensors")}, {"--model": str(model)})
    check_paths({"--out": str(tmp_path / "ckpt2" / "q.safetensors")}, {"--model": str(model)})


def test_an_output_under_an_earlier_outputs_path_is_refused(tmp_path, capsys):
    """The outer path given first (--out a name without suffix, --json a file under it)."""
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["quantize", "--model", "no-such-model", "--out", str(tmp_path / "o"),
                 "--json", str(tmp_path / "o" / "r.json")]) == 2
    assert "--json lies inside --out's path" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("path", ["", "  ", "\t"])
def test_a_blank_output_name_is_refused(path):
    with pytest.raises(QroundError, match="--out is empty"):
        check_paths({"--out": path})


def test_format_suffixes_are_matched_in_any_case():
    check_format("--out", "codes.NPZ", "an .npz archive", (".npz",))          # accepted
    with pytest.raises(QroundError, match="the name says a safetensors file"):
        check_format("--out", "codes.SafeTensors", "an .npz archive", (".npz",))


# ------------------------------------------------------------------------ solve
def test_solve_of_one_file_has_no_total_row(layer_file, capsys):
    assert main(["solve", str(layer_file), "--solver", "greedy"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert not any(line.split()[:1] == ["total"] for line in lines)
    assert sum("toy" in line for line in lines) == 1


@pytest.mark.parametrize("refits", ["0", "1"])
def test_solve_seed_reaches_the_solver(layer_file, tmp_path, refits, capsys):
    """Equal seeds, equal codes; another seed, other codes (a random solver), with and
    without refits."""
    codes = {}
    for run, seed in (("a", "5"), ("b", "5"), ("c", "0")):
        out = tmp_path / f"{run}.npz"
        assert main(["solve", str(layer_file), "--solver", "stochastic", "--seed", seed,
                     "--refits", refits, "--out", str(out)]) == 0
        codes[run] = np.load(out)["codes"]
    capsys.readouterr()
    np.testing.assert_array_equal(codes["a"], codes["b"])
    assert (codes["a"] != codes["c"]).any()


# ------------------------------------------------------------------------ export-qubo
@pytest.mark.parametrize("channels", ["0:4:1:2", "a:b", "1,x", "-1,2"])
def test_export_qubo_bad_channel_selections_are_usage_errors(layer_file, tmp_path, channels,
                                                             capsys):
    out = tmp_path / "q"
    assert main(["export-qubo", str(layer_file), "--out", str(out), f"--channels={channels}"]) == 2
    err = capsys.readouterr().err
    assert "argument --channels" in err and "is not 'all', a range" in err or \
        "count from 0" in err
    assert "Traceback" not in err and not out.exists()


def test_export_qubo_manifest_holds_the_solvers_solutions(layer_file, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["export-qubo", str(layer_file), "--out", str(out), "--channels", "0:4",
                 "--solver", "greedy"]) == 0
    capsys.readouterr()
    rows = json.loads((out / "manifest.json").read_text())["channels"]
    e = [{k: v["energy"] for k, v in r["solutions"].items()} for r in rows]
    assert all(set(x) == {"rtn", "greedy"} and x["greedy"] <= x["rtn"] + 1e-12 for x in e)
    assert any(x["greedy"] < x["rtn"] - 1e-9 for x in e)   # greedy's, not RTN's, choices


def test_export_qubo_warns_about_channels_only_when_the_user_named_them(layer_file, tmp_path,
                                                                        caplog, capsys):
    """The default 0:16 on a 12-channel layer says nothing; an explicit 0:20 warns."""
    import logging

    with caplog.at_level(logging.WARNING, logger="qround"):
        assert main(["export-qubo", str(layer_file), "--out", str(tmp_path / "a"),
                     "--solver", ""]) == 0
        assert not [r for r in caplog.records if "--channels" in r.getMessage()]
        assert main(["export-qubo", str(layer_file), "--out", str(tmp_path / "b"),
                     "--channels", "0:20", "--solver", ""]) == 0
        assert [r for r in caplog.records if "--channels :20" in r.getMessage()
                or "--channels 0:20" in r.getMessage()]
    assert "wrote 12 QUBO files" in capsys.readouterr().out


# ------------------------------------------------------------------------ sample
def test_sample_out_records_the_seed_and_refuses_seed_as_an_option(layer_file, tmp_path,
                                                                   capsys):
    q = tmp_path / "q"
    assert main(["export-qubo", str(layer_file), "--out", str(q), "--channels", "0:1",
                 "--solver", ""]) == 0
    out = tmp_path / "s.json"
    assert main(["sample", str(q / "c0000.qubo"), "--reads", "1", "--seed", "7",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["seed"] == 7
    assert main(["sample", str(q / "c0000.qubo"), "--method", "tabu(seed=3)"]) == 2
    assert "are not solver options here" in capsys.readouterr().err


# ------------------------------------------------------------------------ export-layer
def test_export_layer_checks_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from qround import cli

    monkeypatch.setattr(cli, "_load_named_model",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("work started")))
    assert main(["export-layer", "--model", "digits-cnn", "--layer", "conv2"]) == 2
    assert "--out FILE.npz is required" in capsys.readouterr().err


def test_export_layer_grid_options_reach_the_file(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the digits data come from scikit-learn")
    from qround.problems.io import load_layer_stats

    base = ["export-layer", "--model", "digits-cnn", "--layer", "conv1", "--threads", "1"]
    assert main(base + ["--out", str(tmp_path / "s.npz")]) == 0
    assert main(base + ["--asymmetric", "--out", str(tmp_path / "a.npz")]) == 0
    capsys.readouterr()
    sym, asym = (load_layer_stats(tmp_path / n) for n in ("s.npz", "a.npz"))
    assert sym.zero_point is None or not np.any(sym.zero_point)
    assert asym.zero_point is not None and np.any(asym.zero_point)
    # conv2 has 16 x 3 x 3 = 144 inputs: a group of 7 is refused before the model runs
    assert main(["export-layer", "--model", "digits-cnn", "--layer", "conv2", "--group-size",
                 "7", "--out", str(tmp_path / "g.npz"), "--threads", "1"]) == 2
    assert "--group-size 7 does not divide the 144 inputs" in capsys.readouterr().err
    assert not (tmp_path / "g.npz").exists()


# ------------------------------------------------------------------------ quantize/sensitivity
def test_the_whole_digits_calibration_split_can_be_asked_for():
    pytest.importorskip("sklearn", reason="the digits data come from scikit-learn")
    from qround.cli import _model_and_calibration

    args = build_parser().parse_args(["quantize", "--model", "digits-cnn",
                                      "--calibration-size", "179"])
    assert [b.shape[0] for b in _model_and_calibration(args)[1]] == [64, 64, 51]


def test_the_whole_packaged_sentence_pool_can_be_asked_for():
    from qround import zoo
    from qround.cli import _calibration_size

    n = len(zoo.sentences("calibration"))
    ok = build_parser().parse_args(["quantize", "--calibration-size", str(n)])
    assert _calibration_size(ok) == n
    with pytest.raises(QroundError, match="pool holds"):
        _calibration_size(build_parser().parse_args(["quantize", "--calibration-size",
                                                     str(n + 1)]))


def test_sensitivity_widths_are_sorted_and_unique():
    from qround.cli import _bits_list

    assert _bits_list("8,2") == (2, 8)
    assert _bits_list("4,3,4,2") == (2, 3, 4)


def _stop_before_the_model(monkeypatch):
    from qround import cli

    monkeypatch.setattr(cli, "_model_and_calibration",
                        lambda args: (_ for _ in ()).throw(QroundError("stop: model")))


def test_sensitivity_checks_come_before_the_model(tmp_path, monkeypatch, capsys):
    _stop_before_the_model(monkeypatch)
    base = ["sensitivity", "--model", "digits-cnn", "--bits", "8,2"]
    # the narrowest width itself is a valid mean, whatever order --bits gives
    assert main(base + ["--mean-bits", "2"]) == 2
    assert "stop: model" in capsys.readouterr().err
    assert main(base + ["--mean-bits", "1.5"]) == 2
    assert "--mean-bits 1.5 is below the narrowest of --bits (2)" in capsys.readouterr().err
    assert main(base + ["--tie-inputs"]) == 2
    assert "give --mean-bits too" in capsys.readouterr().err
    assert main(base + ["--json", str(tmp_path / "s.txt")]) == 2
    assert "this writes JSON, but the name says text" in capsys.readouterr().err
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    assert main(["sensitivity", "--model", str(model), "--calibration", str(model), "--json",
                 str(model)]) == 2
    assert "is the same file as the input" in capsys.readouterr().err
    assert model.read_bytes() == b"x"


def test_the_printed_quantize_command_repeats_a_nonzero_seed_only():
    from qround.cli import _measured_args

    p = build_parser()
    assert "--seed" not in _measured_args(p.parse_args(["sensitivity", "--model", "digits-cnn"]))
    args = _measured_args(p.parse_args(["sensitivity", "--model", "digits-cnn", "--seed", "3"]))
    assert args[args.index("--seed") + 1] == "3"


# ------------------------------------------------------------------------ exit status, threads
def test_ctrl_c_exits_130(capsys):
    from qround.cli import _run

    def command():
        raise KeyboardInterrupt

    assert _run(command) == 130
    assert "qround: interrupted" in capsys.readouterr().err


def test_a_command_without_threads_gives_torchs_thread_count_back():
    """`qround bench` sets torch's threads itself (_run gets no --threads): the caller's count
    comes back."""
    import torch

    from qround.cli import _run

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    assert _run(lambda: torch.set_num_threads(target)) == 0
    assert torch.get_num_threads() == before


def test_sample_names_the_best_solution_its_manifest_knows(layer_file, tmp_path, capsys):
    """A manifest that lists several solutions (edited by hand, or merged): the cheapest one
    is the one shown."""
    q = tmp_path / "q"
    assert main(["export-qubo", str(layer_file), "--out", str(q), "--channels", "0:1",
                 "--solver", "greedy"]) == 0
    manifest = json.loads((q / "manifest.json").read_text())
    sol = manifest["channels"][0]["solutions"]
    sol["worse"] = {**sol["rtn"], "energy": sol["rtn"]["energy"] + 1.0}
    (q / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["sample", str(q / "c0000.qubo"), "--reads", "1", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["known"] == "greedy"


def test_evaluate_reports_the_mean_width_over_the_weights(tmp_path, capsys):
    """--first-last-bits 8 on digits-cnn: mean_wbits weighs each layer by its weights."""
    pytest.importorskip("sklearn", reason="the digits data come from scikit-learn")
    from qround import export

    out = tmp_path / "q.safetensors"
    assert main(["quantize", "--model", "digits-cnn", "--wbits", "2", "--first-last-bits", "8",
                 "--solver", "nearest", "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", "digits-cnn", "--quantized", str(out), "--json",
                 "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    layers = export.read_metadata(out)["layers"].values()
    sizes = [(int(i["bits"]), int(np.prod(i["weight_shape"]))) for i in layers]
    assert {b for b, _ in sizes} == {2, 8}
    expected = sum(b * n for b, n in sizes) / sum(n for _, n in sizes)
    assert res["mean_wbits"] == pytest.approx(expected, abs=1e-3) and res["wbits"] == 2
