"""Per-layer settings (QuantConfig.overrides, qround quantize --override): checked up front,
applied to the matching layers only, saved with the model, honoured by the baselines."""
import json

import numpy as np
import pytest
import torch

from qround import QroundError
from qround.baselines import gptq_model, rtn_model
from qround.export import load, read_metadata
from qround.grid import GridSpec, fit_grid
from qround.pipeline import QuantConfig, quantize_model
from qround.problems.layers import layer_weight
from qround.solvers import Solver, get_solver

from .test_pipeline import build

torch.set_num_threads(1)
BASE = dict(wbits=2, progress=False, solver="greedy")


# ----------------------------------------------------------------------------- the config
def test_dict_and_pairs_are_the_same_config():
    a = QuantConfig(overrides={"head": {"wbits": 8}, "out": {"group_size": 8}})
    b = QuantConfig(overrides=[("head", {"wbits": np.int64(8)}), ["out", {"group_size": 8}]])
    assert a.overrides == b.overrides == (("head", {"wbits": 8}), ("out", {"group_size": 8}))
    assert type(b.overrides[0][1]["wbits"]) is int  # saved as JSON
    assert QuantConfig(overrides={}).overrides is None


def test_layer_options_first_match_wins_and_wins_over_first_last_bits():
    config = QuantConfig(wbits=3, first_last_bits=8, group_size=4,
                         overrides={"^head": {"wbits": 5}, "head_a|out": {"symmetric": False}})
    assert config.override("head_a") == ("^head", {"wbits": 5})
    assert config.override("inp") == (None, {})
    assert config.layer_bits("head_a", end=True) == 5      # the override's bits
    assert config.layer_bits("out", end=True) == 8          # no wbits in its override
    assert config.layer_bits("inp", end=False) == 3
    assert config.layer_options("out") == dict(wbits=3, group_size=4, symmetric=False,
                                               scale_method="mse", damp=0.0, solver="fast")
    assert config.grid_spec(8, "out") == GridSpec(bits=8, symmetric=False, group_size=4)
    assert config.grid_spec(3) == GridSpec(bits=3, group_size=4)


@pytest.mark.parametrize("overrides,match", [
    ("head", "must be a dict"),
    ({"(": {"wbits": 8}}, "not a valid regex"),
    ({"": {"wbits": 8}}, "non-empty regex"),
    ([("a", {"wbits": 8}), ("a", {"wbits": 4})], "given twice"),
    ([("a",)], r"\(regex, \{option: value\}\) pair"),
    ({"a": {}}, "non-empty dict"),
    ({"a": 8}, "non-empty dict"),
    ({"a": {"bits": 8}}, "unknown option 'bits'"),
    ({"a": {"abits": 8}}, "unknown option 'abits'"),
    ({"a": {"wbits": 9}}, r"overrides\['a'\]: wbits"),
    ({"a": {"wbits": True}}, r"overrides\['a'\]: wbits"),
    ({"a": {"group_size": 0}}, r"overrides\['a'\]: .*group_size"),
    ({"a": {"symmetric": 1}}, r"overrides\['a'\]: symmetric"),
    ({"a": {"scale_method": "best"}}, r"overrides\['a'\]: .*scale_method"),
    ({"a": {"damp": -1.0}}, r"overrides\['a'\]: damp"),
    ({"a": {"damp": float("nan")}}, r"overrides\['a'\]: damp"),
    ({"a": {"solver": "nope"}}, r"overrides\['a'\]: unknown solver"),
    ({"a": {"solver": 3}}, r"overrides\['a'\]: solver must be"),
])
def test_bad_overrides_are_refused_when_the_config_is_built(overrides, match):
    with pytest.raises(QroundError, match=match):
        QuantConfig(overrides=overrides)


# ----------------------------------------------------------------------------- the pipeline
def test_overrides_apply_to_their_layers_only():
    model, data = build("branchy")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = QuantConfig(**BASE, overrides={"head_a": {"wbits": 8, "solver": "nearest"},
                                            "^out$": {"symmetric": False, "group_size": 8}})
    qm = quantize_model(model, data, config)
    rows = {r.layer: r for r in qm.report}
    assert [rows[n].bits for n in ("inp", "head_a", "head_b", "out")] == [2, 8, 2, 2]
    assert rows["head_a"].solver == "nearest" and rows["inp"].solver == "greedy"
    # head_a: 8 bits, per channel, symmetric; its codes are rounding-to-nearest on its grid
    qa = qm.layers["head_a"]
    assert (qa.bits, qa.symmetric, qa.group_size) == (8, True, None)
    grid = fit_grid(layer_weight(model.head_a), GridSpec(bits=8))
    np.testing.assert_array_equal(qa.codes, grid.quantize(layer_weight(model.head_a)))
    np.testing.assert_allclose(qa.scale, grid.scale)
    # out: 2 bits, asymmetric, groups of 8 of its 16 inputs
    qo = qm.layers["out"]
    assert (qo.bits, qo.symmetric, qo.group_size) == (2, False, 8)
    assert qo.scale.shape == (5, 2) and qo.codes.min() >= 0 and qo.codes.max() <= 3
    # the rest as configured
    for name in ("inp", "head_b"):
        qw = qm.layers[name]
        assert (qw.bits, qw.symmetric, qw.group_size) == (2, True, None)
        assert qw.codes.min() >= -2 and qw.codes.max() <= 1
    for name, value in model.state_dict().items():   # the float model is untouched
        assert torch.equal(value, before[name])


def test_an_override_equal_to_the_config_changes_nothing():
    model, data = build("branchy")
    plain = quantize_model(model, data, QuantConfig(**BASE))
    same = quantize_model(model, data, QuantConfig(**BASE, overrides={
        ".": {"wbits": 2, "symmetric": True, "group_size": None, "scale_method": "mse",
              "damp": 0.0, "solver": "greedy"}}))
    for name, qw in plain.layers.items():
        np.testing.assert_array_equal(same.layers[name].codes, qw.codes)
        np.testing.assert_array_equal(same.layers[name].scale, qw.scale)


def test_first_last_bits_and_an_override_together():
    model, data = build("branchy")
    qm = quantize_model(model, data, QuantConfig(**BASE, first_last_bits=8,
                                                 overrides={"^inp$": {"wbits": 4}}))
    assert [r.bits for r in qm.report] == [4, 2, 2, 8]


class Recorder(Solver):
    """Rounding-to-nearest that keeps the problems it was given."""

    name = "recorder"

    def __init__(self):
        self.problems = []

    def _solve(self, problem, start, rng):
        self.problems.append(problem)
        return start


def test_an_override_solver_instance_and_damp_reach_its_layer():
    model, data = build("branchy")
    damped, plain = Recorder(), Recorder()
    config = QuantConfig(**{**BASE, "solver": plain},
                         overrides={"head_b": {"damp": 0.5, "solver": damped}})
    qm = quantize_model(model, data, config)
    assert [p.name for p in damped.problems] == ["head_b"]
    assert [p.name for p in plain.problems] == ["inp", "head_a", "out"]
    assert {r.layer: r.solver for r in qm.report}["head_b"] == "recorder"
    # head_a and head_b read the same input: damping adds 0.5 mean(diag H) to head_b's diagonal
    h_a, h_b = plain.problems[1].hessian, damped.problems[0].hessian
    lam = 0.5 * np.mean(np.diag(h_a))
    np.testing.assert_allclose(h_b, h_a + lam * np.eye(len(h_a)), rtol=1e-12)
    meta = json.loads(json.dumps(config.as_dict()))
    assert meta["overrides"] == [["head_b", {"damp": 0.5, "solver": "recorder"}]]


@pytest.mark.parametrize("overrides,match", [
    ({"nomatch": {"wbits": 8}}, r"overrides\['nomatch'\] matches none of the 4 layers"),
    ({"head": {"wbits": 8}, "head_a": {"wbits": 4}}, r"overrides\['head_a'\] never applies"),
    ({"^out$": {"group_size": 5}}, r"group_size=5 \(from overrides\['\^out\$'\]\) does not "
                                   "divide the 16 inputs of layer 'out'"),
])
def test_override_errors_before_any_work(overrides, match, monkeypatch):
    model, data = build("branchy")

    def no_solve(*args, **kwargs):
        raise AssertionError("a layer was solved before the error")
    monkeypatch.setattr("qround.pipeline._solve_layer", no_solve)
    with pytest.raises(QroundError, match=match):
        quantize_model(model, data, QuantConfig(**BASE, overrides=overrides))


def test_an_override_of_an_excluded_layer_is_an_error():
    model, data = build("branchy")
    with pytest.raises(QroundError, match="matches none of the 3 layers being quantised"):
        quantize_model(model, data, QuantConfig(**BASE, exclude="^out$",
                                                overrides={"^out$": {"wbits": 8}}))


def test_save_and_load_keep_each_layers_grid(tmp_path):
    model, data = build("branchy")
    config = QuantConfig(**BASE, overrides={"head_a": {"wbits": 8},
                                            "^out$": {"symmetric": False, "group_size": 8}})
    qm = quantize_model(model, data, config)
    path = tmp_path / "m.safetensors"
    qm.save(path)
    loaded = load(model, path)
    x = data[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), qm.model(x))
    meta = read_metadata(path)
    assert meta["config"]["overrides"] == [["head_a", {"wbits": 8}],
                                           ["^out$", {"symmetric": False, "group_size": 8}]]
    assert meta["layers"]["head_a"]["bits"] == 8 and meta["layers"]["out"]["group_size"] == 8


def _levels(module) -> int:
    """Most distinct weight values in one output channel (per input group of the whole row)."""
    w = layer_weight(module)
    return max(len(np.unique(np.round(row, 9))) for row in w)


def test_the_baselines_honour_overrides():
    model, data = build("branchy")
    config = QuantConfig(**BASE, overrides={"head_a": {"wbits": 8}})
    rtn, _ = rtn_model(model, config)
    gptq, _ = gptq_model(model, data, config)
    for q in (rtn, gptq):
        assert _levels(q.head_b) <= 4 and _levels(q.inp) <= 4
        assert _levels(q.head_a) > 4   # 8 bits: 16 inputs take more than 4 values
    grid = fit_grid(layer_weight(model.head_a), GridSpec(bits=8))
    np.testing.assert_allclose(layer_weight(rtn.head_a),
                               grid.dequantize(grid.quantize(layer_weight(model.head_a))),
                               rtol=0, atol=1e-6)
    with pytest.raises(QroundError, match=r"overrides\['nomatch'\] matches none"):
        rtn_model(model, QuantConfig(**BASE, overrides={"nomatch": {"wbits": 8}}))
    with pytest.raises(QroundError, match="mse-output.*'head_a'"):
        rtn_model(model, QuantConfig(**BASE, overrides={"head_a": {"scale_method": "mse-output"}}))


def test_the_default_solver_object_is_shared():
    """Layers without an override solver use the one built from config.solver (so a solver's
    compiled state and a GPU placement are made once)."""
    from qround.pipeline import _build_solvers

    solvers = _build_solvers(QuantConfig(overrides={"a": {"wbits": 8}, "b": {"solver": "gptq"}}))
    assert solvers["a"] is solvers[None]
    assert solvers["b"].label == get_solver("gptq").label and solvers["b"] is not solvers[None]


# ----------------------------------------------------------------------------- the shell
def test_quantize_override_on_the_command_line(tmp_path, capsys):
    from qround import export
    from qround.cli import main

    from .test_cli import _model_files

    model = _model_files(tmp_path, seed=0)
    out, report = tmp_path / "q.safetensors", tmp_path / "q.json"
    assert main(["quantize", "--model", str(tmp_path / "model.pt"), "--calibration",
                 str(tmp_path / "calib.pt"), "--wbits", "3", "--solver", "greedy",
                 "--override", "^2$", "wbits=6", "group-size=8", "symmetric=false",
                 "solver=gptq+tabu(restarts=1)", "--override", "^0", "damp=0.1",
                 "--out", str(out), "--json", str(report), "--no-progress",
                 "--threads", "1"]) == 0
    capsys.readouterr()
    codes = export.load_codes(out)
    assert (codes["2"].bits, codes["2"].symmetric, codes["2"].group_size) == (6, False, 8)
    assert (codes["0"].bits, codes["0"].symmetric, codes["0"].group_size) == (3, True, None)
    rows = {r["layer"]: r for r in json.loads(report.read_text())["layers"]}
    assert rows["2"]["solver"] == "gptq+tabu(restarts=1)" and rows["0"]["solver"] == "greedy"
    assert json.loads(report.read_text())["config"]["overrides"] == [
        ["^2$", {"wbits": 6, "group_size": 8, "symmetric": False,
                 "solver": "gptq+tabu(restarts=1)"}], ["^0", {"damp": 0.1}]]
    export.load(model, out)


@pytest.mark.parametrize("override, message", [
    (["fc"], "--override 'fc' needs settings after the pattern"),
    (["fc", "wbits"], "'wbits' is not KEY=VALUE"),
    (["fc", "bits=8"], "unknown setting 'bits'; the settings are wbits, group_size"),
    (["fc", "wbits=8", "wbits=4"], "wbits is given twice"),
    (["fc", "wbits=eight"], "wbits must be an integer"),
    (["fc", "group_size=x"], "group_size must be an integer (or none: per channel)"),
    (["fc", "damp=x"], "damp must be a number"),
    (["fc", "symmetric=maybe"], "symmetric must be true or false"),
    (["fc", "wbits=12"], "overrides['fc']: wbits"),
    (["fc", "solver=nope"], "overrides['fc']: unknown solver"),
])
def test_bad_overrides_on_the_command_line(override, message, capsys):
    from qround.cli import main

    assert main(["quantize", "--model", "no-such-model", "--override", *override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_command_line_refuses_a_pattern_given_twice(capsys):
    from qround.cli import main

    assert main(["quantize", "--model", "no-such-model", "--override", "fc", "wbits=8",
                 "--override", "fc", "wbits=4"]) == 2
    assert "--override 'fc' is given twice" in capsys.readouterr().err


def test_save_compressed_refuses_an_asymmetric_override(tmp_path, capsys):
    pytest.importorskip("compressed_tensors", reason="the compressed-tensors check runs first")
    from qround.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert main(["quantize", "--model", str(folder), "--save-compressed", str(tmp_path / "out"),
                 "--override", "fc", "symmetric=false"]) == 2
    err = capsys.readouterr().err
    assert "--override 'fc' symmetric=false cannot be written" in err
