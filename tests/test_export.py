"""Saved quantised models: safetensors round trip, metadata, atomic writes, architecture checks."""
import dataclasses
import json
import logging
import os

import numpy as np
import pytest

import qround.files
import safetensors.torch
import torch
from torch import nn

import qround
from qround import QroundError
from qround.export import load, load_codes, read_metadata, save
from qround.pipeline import QuantConfig, quantize_model

from .test_pipeline import build, state

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(float model, data, QuantizedModel, path) of the CNN, asymmetric grid, bias correction,
    codes widened beyond floor/ceil."""
    model, data = build("cnn")
    config = QuantConfig(wbits=3, symmetric=False, bias_correction=True, first_last_bits=8,
                         widen=True, progress=False)
    qm = quantize_model(model, data, config)
    path = tmp_path_factory.mktemp("export") / "cnn.safetensors"
    qm.save(path)
    return model, data, qm, path


def test_round_trip_gives_identical_outputs_codes_and_scales(saved):
    model, data, qm, path = saved
    before = state(model)
    loaded = load(model, path)
    assert loaded is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        for x in data:
            assert torch.equal(loaded(x), qm.model(x))
    assert torch.equal(loaded.fc.bias, qm.model.fc.bias)  # corrected biases travel too
    codes = load_codes(path)
    assert list(codes) == list(qm.layers)
    for name, qw in qm.layers.items():
        got = codes[name]
        assert np.array_equal(got.codes, qw.codes) and got.codes.dtype == np.int64
        assert np.array_equal(got.scale, qw.scale) and np.array_equal(got.zero_point,
                                                                      qw.zero_point)
        assert (got.bits, got.symmetric, got.group_size, got.weight_shape) == (
            qw.bits, qw.symmetric, qw.group_size, qw.weight_shape)
        assert np.array_equal(got.dequantized, qw.dequantized)


def test_round_trip_symmetric_creates_missing_bias(tmp_path):
    model, data = build("branchy")
    qm = quantize_model(model, data, QuantConfig(wbits=4, bias_correction=True, progress=False))
    path = tmp_path / "m.safetensors"
    save(qm, path)
    loaded = load(model, path)
    assert model.out.bias is None and loaded.out.bias is not None
    with torch.no_grad():
        assert torch.equal(loaded(data[0]), qm.model(data[0]))
    # a symmetric grid stores no zero point; codes are signed bytes
    with safetensors.safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("inp.codes").dtype == torch.int8
    assert "inp.zero_point" not in keys and {"inp.weight", "inp.codes", "inp.scale"} <= keys


def test_metadata(saved):
    _, _, qm, path = saved
    meta = read_metadata(path)
    assert meta["qround_version"] == qround.__version__
    assert meta["config"] == json.loads(json.dumps(qm.config.as_dict()))
    assert meta["bits"] == "3" and meta["symmetric"] is False and meta["group_size"] is None
    assert meta["solver"] == "fast"  # QuantConfig's default
    assert list(meta["layers"]) == list(qm.layers)
    assert meta["layers"]["conv"]["bits"] == 8 and meta["layers"]["grouped"]["bits"] == 3
    assert [r["layer"] for r in meta["report"]] == [r.layer for r in qm.report]
    assert meta["skipped"] == json.loads(json.dumps(qm.skipped))
    assert meta["layers"]["conv1d"]["kind"] == "Conv1d"
    assert meta["layers"]["conv1d"]["weight_shape"] == [8, 8, 1]


def test_saved_config_rebuilds_the_run(saved):
    """QuantConfig.from_dict(the file's config) equals the config and quantises to the same
    codes; as_dict -> JSON -> from_dict is the identity also with a reconstruction, overrides
    and a scheme; unknown keys are named."""
    model, data, qm, path = saved
    config = QuantConfig.from_dict(read_metadata(path)["config"])
    assert config == qm.config
    again = quantize_model(model, data, config)
    for name, qw in qm.layers.items():
        assert np.array_equal(again.layers[name].codes, qw.codes)
    from qround.reconstruct import ReconstructConfig

    rich = QuantConfig(wbits=3, abits=8, borders="linear", overrides={"fc": {"wbits": 8,
                                                                               "solver": "greedy"}},
                       reconstruction=ReconstructConfig(iterations=10, beta=(10.0, 1.0)),
                       granularity="scheme", scheme=("a", "b+c"), progress=False)
    assert QuantConfig.from_dict(json.loads(json.dumps(rich.as_dict()))) == rich
    instance = QuantConfig(solver=qround.get_solver("gptq+tabu(restarts=4)"))
    assert QuantConfig.from_dict(instance.as_dict()).solver == "gptq+tabu(restarts=4)"
    with pytest.raises(QroundError, match=r"unknown settings \['wbit'\]"):
        QuantConfig.from_dict({"wbit": 3})
    gpu = dict(qm.config.as_dict(), device="cuda:0")   # a run made on a GPU, rebuilt here
    assert QuantConfig.from_dict(gpu, device="cpu", seed=5) == dataclasses.replace(
        qm.config, seed=5)
    with pytest.raises(QroundError, match=r"unknown settings \['bits'\] among the changes"):
        QuantConfig.from_dict(gpu, bits=3)
    with pytest.raises(QroundError, match=r"unknown reconstruction settings \['iters'\]"):
        QuantConfig.from_dict({"reconstruction": {"iters": 3}})


def test_configs_of_the_first_saved_files_rebuild_their_run():
    """The config a file of the first saved format holds (commit a8ea3aa, verbatim): its
    `asymmetric` became `inputs`, with the meaning kept (True: the quantised copy's inputs
    paired with the float model's, False: the float model's alone)."""
    old = {"wbits": 4, "symmetric": True, "group_size": None, "scale_method": "mse",
           "solver": "greedy", "layers": None, "exclude": None, "first_last_bits": None,
           "asymmetric": True, "statistics": "covariance", "fisher_budget_mb": 1024.0,
           "bias_correction": False, "device": "cpu", "seed": 0, "progress": False}
    config = QuantConfig.from_dict(old)
    assert config == QuantConfig(wbits=4, solver="greedy", inputs="asymmetric",
                                 bias_correction=False, progress=False)
    assert QuantConfig.from_dict(dict(old, asymmetric=False)).inputs == "float"
    assert "asymmetric" in old   # the caller's dict is left as it was
    with pytest.raises(QroundError, match="'asymmetric' .* and 'inputs' .* are both given"):
        QuantConfig.from_dict(dict(old, inputs="float"))
    with pytest.raises(QroundError, match="'asymmetric' .* must be one of"):
        QuantConfig.from_dict(dict(old, asymmetric="yes"))


def test_save_is_atomic(saved, tmp_path, monkeypatch):
    _, _, qm, path = saved
    target = tmp_path / "model.safetensors"
    qm.save(target)
    good = target.read_bytes()

    def broken(fd):  # fails after the new bytes went to the temp file, before the rename
        raise OSError("disk full")

    monkeypatch.setattr(qround.files.os, "fsync", broken)
    with pytest.raises(QroundError, match="disk full"):
        qm.save(target)
    assert target.read_bytes() == good
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temp file left behind


def test_wrong_architecture_errors(saved):
    model, _, _, path = saved
    wrong = build("cnn")[0]
    wrong.fc = nn.Linear(8, 7)
    with pytest.raises(QroundError, match="'fc' has weight shape"):
        load(wrong, path)
    wrong = build("cnn")[0]
    del wrong.grouped
    with pytest.raises(QroundError, match="'grouped' is missing"):
        load(wrong, path)
    with pytest.raises(QroundError, match="missing|weight shape"):
        load(build("branchy")[0], path)


def test_not_a_qround_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(2)}, plain)
    with pytest.raises(QroundError, match="not a qround"):
        load_codes(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 4)
    with pytest.raises(QroundError, match="could not be read"):
        read_metadata(garbage)
    with pytest.raises(QroundError, match="no such file"):
        load(build("branchy")[0], tmp_path / "missing.safetensors")


def test_corrupt_weights_detected(saved, tmp_path):
    model, _, _, path = saved
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["fc.weight"] = tensors["fc.weight"] + 0.1
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, bad, metadata=meta)
    with pytest.raises(QroundError, match="corrupt"):
        load(model, bad)


# ------------------------------------------- found by the eleventh session's reviews (helpers)
def _small(tmp_path, bias=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=bias), nn.ReLU(), nn.Linear(8, 4, bias=bias))
    qm = quantize_model(model, [torch.randn(16, 8)],
                        QuantConfig(wbits=2, solver="greedy", progress=False))
    path = tmp_path / "m.safetensors"
    qm.save(path)
    return model, qm, path


def test_load_refuses_a_bias_the_file_does_not_have(tmp_path):
    _, _, path = _small(tmp_path, bias=False)
    with_bias = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(QroundError, match="'0' has a bias, the file's layer has none"):
        load(with_bias, path)


def test_load_refuses_a_parametrized_weight(tmp_path):
    _, _, path = _small(tmp_path)
    target = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)),
                           nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(QroundError, match="'0': its weight is parametrized"):
        load(target, path)


def _rewrite_header(path, out, **changes):
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    meta.update(changes)
    safetensors.torch.save_file(tensors, out, metadata=meta)
    return out


@pytest.mark.parametrize("change, match", [
    ({"layers": "[1, 2]"}, "must map layer names"),
    ({"layers": json.dumps({"0": {"kind": "Linear"}})}, "lacks 'bits'"),
    ({"layers": json.dumps({"0": {"kind": "Linear", "bits": 2, "symmetric": True, "bias": True,
                                  "weight_shape": 8}})}, "lacks 'weight_shape'"),
    ({"layers": json.dumps({"0": {"kind": "Lstm", "bits": 2, "symmetric": True, "bias": True,
                                  "weight_shape": [8, 8]}})}, "has kind 'Lstm'"),
    ({"layers": json.dumps({"0": {"kind": "Linear", "bits": 2, "symmetric": True, "bias": True,
                                  "weight_shape": [8, 8]}})}, "lacks 'group_size'"),
    ({"layers": json.dumps({"0": {"kind": "Linear", "bits": 2, "symmetric": True, "bias": True,
                                  "weight_shape": [8, 8], "group_size": None,
                                  "act": {"bits": 4, "signed": False, "borders": None,
                                          "fusion_size": 1}}})}, "'act' lacks 'mode'"),
    ({"layers": json.dumps({"0": {"kind": "Linear", "bits": 2, "symmetric": True, "bias": True,
                                  "weight_shape": [8, 8], "group_size": None,
                                  "act": {"bits": True, "signed": False, "borders": None,
                                          "fusion_size": 1, "mode": "x"}}})},
     "'act' lacks 'bits' of type int"),
    ({"units": "{not json"}, "'units' is not valid JSON"),
    ({"format_version": "2"}, "format version '2'"),
])
def test_damaged_headers_are_named(tmp_path, change, match):
    model, _, path = _small(tmp_path)
    bad = _rewrite_header(path, tmp_path / "bad.safetensors", **change)
    for read in (read_metadata, load_codes, lambda p: load(model, p)):
        with pytest.raises(QroundError, match=match):
            read(bad)


def test_save_under_a_file_is_a_clear_error(tmp_path):
    _, qm, _ = _small(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(QroundError, match="cannot create its folder"):
        qm.save(tmp_path / "afile" / "m.safetensors")
    assert (tmp_path / "afile").read_text() == "x"


def test_atomic_write_goes_through_a_symlink_and_refuses_read_only_files(tmp_path, monkeypatch):
    from qround.report import write_text_atomic

    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    write_text_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    target.chmod(0o444)
    if os.geteuid() == 0:   # root may write anything: answer access() as for another user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK and
                            os.path.samefile(p, target) else real(p, mode, **kw))
    with pytest.raises(QroundError, match="read-only"):
        write_text_atomic(target, "newer")
    assert target.read_text() == "new"


def test_damaged_codes_are_named(tmp_path):
    model, _, path = _small(tmp_path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    for key, value, match in (("0.codes", tensors["0.codes"].float(), "must be integers"),
                              ("0.codes", tensors["0.codes"][:, :4], "must be integers of shape"),
                              ("0.codes", tensors["0.codes"] * 0 + 7, r"leave \[-2, 1\]"),
                              ("0.scale", tensors["0.scale"] * 0, "grid of '0' is damaged")):
        bad = tmp_path / "bad.safetensors"
        safetensors.torch.save_file({**tensors, key: value.contiguous()}, bad, metadata=meta)
        with pytest.raises(QroundError, match=match):
            load_codes(bad)


# ------------------------------------------------------------------ the float model's fingerprint
def test_the_file_records_the_float_model_and_load_checks_it(saved):
    from qround.export import fingerprint

    model, data, qm, path = saved
    source = read_metadata(path)["source"]
    assert source == qm.source == fingerprint(model)
    assert list(source) == list(model.state_dict())   # parameters and buffers (BatchNorm stats)
    other = build("cnn", seed=1)[0]                   # same architecture, other weights
    with torch.no_grad():   # ... and other BatchNorm statistics, which the file does not hold
        other.bn.running_mean.add_(1.0)
    with pytest.raises(QroundError, match=r"another float model .* differ: 'conv.weight' "
                                          r"\(other values\)") as err:
        load(other, path)
    assert "check_source=False" in str(err.value)
    loaded = load(other, path, check_source=False)    # the user's call
    with torch.no_grad():
        assert not torch.equal(loaded(data[0]), qm.model(data[0]))  # another model indeed
    with pytest.raises(QroundError, match="check_source must be True or False"):
        load(model, path, check_source="no")


def test_a_file_without_the_fingerprint_loads_with_a_warning(saved, tmp_path, caplog):
    """Files of an older qround hold no ``source``: nothing to check, and the user is told."""
    model, data, qm, _ = saved
    path = tmp_path / "old.safetensors"
    dataclasses.replace(qm, source=None).save(path)
    assert "source" not in read_metadata(path) or read_metadata(path)["source"] is None
    with caplog.at_level(logging.WARNING, logger="qround"):
        loaded = load(build("cnn", seed=1)[0], path)   # another model: cannot be caught
    assert any("holds no fingerprint of the float model" in r.getMessage()
               for r in caplog.records)
    assert loaded is not None


def test_a_converted_or_changed_model_is_refused_with_what_changed(saved):
    model, _, qm, path = saved
    with pytest.raises(QroundError, match=r"'conv.weight' \(float64 \[8, 3, 3, 3\] here, "
                                          r"float32 \[8, 3, 3, 3\] in the file\)"):
        load(build("cnn")[0].double(), path)
    changed = build("cnn")[0]
    with torch.no_grad():
        changed.bn.running_mean.add_(1e-3)            # a buffer the file does not hold
    with pytest.raises(QroundError, match=r"1 differs: 'bn.running_mean'"):
        load(changed, path)
    # the quantised model itself is not the float model: its rounded layers differ
    with pytest.raises(QroundError, match="another float model"):
        load(qm.model, path)
    wider = build("cnn")[0]
    wider.extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(QroundError, match=r"1 is new in the model: 'extra'"):
        load(wider, path)


def test_buffers_that_only_move_in_or_out_of_the_state_dict_are_logged(saved, caplog):
    """transformers moved BERT's position_ids out of the state dict (4.31): the same weights
    with one buffer more or less load, with a warning."""
    model, data, qm, path = saved
    extra = build("cnn")[0]
    extra.register_buffer("position_ids", torch.arange(4))
    with caplog.at_level("WARNING", logger="qround.export"):
        loaded = load(extra, path)
    assert "position_ids" in caplog.text and "on one side only" in caplog.text
    with torch.no_grad():
        assert torch.equal(loaded(data[0]), qm.model(data[0]))


def test_files_without_a_fingerprint_still_load(tmp_path):
    model, qm, path = _small(tmp_path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in f.metadata().items() if k != "source"}
    old = tmp_path / "old.safetensors"
    safetensors.torch.save_file(tensors, old, metadata=meta)
    assert read_metadata(old)["source"] is None
    other = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    load(other, old)                                   # nothing to check against
    with pytest.raises(QroundError, match="another float model"):
        load(other, path)


@pytest.mark.parametrize("source", ["[1]", "{not json", json.dumps({"0.weight": 3}),
                                    json.dumps({"0.weight": "nospace"}),
                                    json.dumps({"0.weight": "float32 [8, 8]"})])
def test_a_damaged_fingerprint_is_named_and_can_be_skipped(tmp_path, source):
    model, qm, path = _small(tmp_path)
    bad = _rewrite_header(path, tmp_path / "bad.safetensors", source=source)
    with pytest.raises(QroundError, match="header field 'source' .*check_source=False"):
        load(model, bad)
    loaded = load(model, bad, check_source=False)    # the fingerprint is advisory
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), qm.model(x))


def test_fingerprint_of_tied_low_precision_and_meta_tensors():
    from qround.export import fingerprint

    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)).to(torch.bfloat16)
    model[1].weight = model[0].weight                  # tied, as an LM head
    prints = fingerprint(model)
    assert prints["0.weight"] == prints["1.weight"]
    assert prints["0.weight"].startswith("bfloat16 [5, 4] ")
    with torch.no_grad():
        model[0].weight[0, 0] += 1
    assert fingerprint(model)["0.weight"] != prints["0.weight"]
    with torch.device("meta"):
        meta = nn.Linear(3, 2)
    assert fingerprint(meta) == {"weight": "float32 [2, 3] -", "bias": "float32 [2] -"}
    bn = nn.BatchNorm1d(3)
    assert fingerprint(bn)["running_mean"].startswith("buffer float32 [3] ")
    conj = _with_buffer("z", torch.tensor([1 + 2j]).conj())   # a conjugate view
    assert fingerprint(conj)["z"] == fingerprint(_with_buffer("z", torch.tensor([1 - 2j])))["z"]
    with pytest.raises(QroundError, match="nn.Module"):
        fingerprint("model")


def test_in_place_quantisation_records_the_model_before_it_changed():
    from qround.export import fingerprint

    model, data = build("branchy")
    before = fingerprint(model)
    qm = quantize_model(model, data, QuantConfig(wbits=3, progress=False), inplace=True)
    assert qm.model is model
    assert qm.source == before != fingerprint(model)


def _with_buffer(name, value):
    module = nn.Module()
    module.register_buffer(name, value)
    return module


def test_save_refuses_a_weight_changed_after_quantising(tmp_path, saved):
    """A quantised model edited afterwards (a fine-tuning step) no longer matches its codes:
    save says so, instead of writing a file that load calls corrupt."""
    model, data, qm, _ = saved
    edited = quantize_model(model, data, QuantConfig(wbits=3, solver="nearest", progress=False))
    with torch.no_grad():
        edited.model.fc.weight.add_(0.01)
    target = tmp_path / "edited.safetensors"
    with pytest.raises(QroundError, match="'fc' is no longer its codes' dequantised value"):
        edited.save(target)
    assert not target.exists()


class _Counting(nn.Module):
    """A forward that writes a buffer (a sample counter, as observers and EMA statistics do)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.seen += x.shape[0]
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("inputs, reconstruction", [
    ("quantized", False), ("float", False), ("asymmetric", False), ("float", True)])
def test_a_forward_writing_buffers_leaves_the_float_model_as_it_was(tmp_path, inputs,
                                                                    reconstruction):
    from qround.reconstruct import ReconstructConfig

    g = torch.Generator().manual_seed(0)
    model = _Counting()
    data = [torch.randn(16, 8, generator=g) for _ in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # block granularity runs a forward in its checks, before the solves: the model's
    # fingerprint is taken before that one too
    extra = dict(abits=8, granularity="block", reconstruction=ReconstructConfig(
        iterations=2, batch_size=8)) if reconstruction else {}
    qm = quantize_model(model, data, QuantConfig(wbits=3, solver="nearest", progress=False,
                                                 inputs=inputs, **extra))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    path = tmp_path / "counting.safetensors"
    qm.save(path)
    load(model, path)    # the file was made from this model, and still says so
    # in place too: inplace decides where the weights go, not what qround's passes leave in
    # the buffers (the count used to depend on how many forwards qround ran)
    quantize_model(model, data, QuantConfig(wbits=3, solver="nearest", progress=False,
                                            inputs=inputs), inplace=True)
    assert int(model.seen) == 0


def test_baselines_and_sensitivity_leave_written_buffers_as_they_were():
    from qround.baselines import gptq_model, rtn_model
    from qround.sensitivity import layer_sensitivity

    g = torch.Generator().manual_seed(1)
    model = _Counting()
    data = [torch.randn(16, 8, generator=g) for _ in range(2)]
    config = QuantConfig(wbits=3, progress=False)
    rtn_model(model, config, example=data[0])
    gptq_model(model, data, config)
    layer_sensitivity(model, data, config, bits=(2, 4))
    assert int(model.seen) == 0


def test_a_failed_save_removes_the_folders_it_created(tmp_path, monkeypatch):
    import os

    from qround import files

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(QroundError, match="No space left"):
        with files.atomic_write(tmp_path / "new" / "a" / "b" / "out.bin", make_folder=True) as f:
            f.write(b"x")
    assert os.listdir(tmp_path) == []


def test_a_model_saved_twice_gives_the_same_bytes(saved, tmp_path):
    # safetensors wrote the metadata keys in a hash map's order, which changes from call to
    # call: the same model gave files of other bytes; the timings are the only free part
    import dataclasses

    _, _, qm, _ = saved
    fixed = dataclasses.replace(qm, report=[dataclasses.replace(r, seconds=0.0,
                                                                capture_seconds=0.0)
                                            for r in qm.report])
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for p in paths:
        fixed.save(p)
    assert len({p.read_bytes() for p in paths}) == 1
    assert read_metadata(paths[0])["layers"] == read_metadata(saved[3])["layers"]


def test_the_saved_config_holds_no_memory_address(tmp_path):
    from qround.solvers import DimodSolver

    class Sampler:   # a dimod-like sampler object: its repr names its address
        parameters: dict = {}

        def sample(self, bqm, **kwargs):
            import dimod
            return dimod.ExactSolver().sample(bqm)

    config = QuantConfig(wbits=3, solver=DimodSolver(Sampler()), progress=False)
    assert " at 0x" in repr(config.solver)
    assert " at 0x" not in config.as_dict()["solver_repr"]
    assert "DimodSolver(sampler=<" in config.as_dict()["solver_repr"]
