"""Cases of qround.export the first tests left open (found by mutation testing, helper-121)."""
import dataclasses
import json
import logging

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from qround import QroundError
from qround.activations import quantized_layers
from qround.export import fingerprint, load, load_codes, read_metadata, save
from qround.pipeline import QuantConfig, quantize_model

from .test_export import _rewrite_header, _small
from .tiny_models import BATCHES, TinyResNet

torch.set_num_threads(1)


def _tensors_and_meta(path):
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _write(path, tensors, meta):
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path,
                                metadata=meta)
    return path


@pytest.fixture(scope="module")
def act_file(tmp_path_factory):
    """(float net, QuantizedModel, path) with 4-bit inputs (nearest, no borders)."""
    net = TinyResNet()
    qm = quantize_model(net, BATCHES, QuantConfig(wbits=2, symmetric=False, solver="greedy",
                                                  abits=4, progress=False))
    path = tmp_path_factory.mktemp("act") / "q.safetensors"
    qm.save(path)
    return net, qm, path


# ------------------------------------------------------------------ file contents checked on load
def test_a_weight_a_few_hundred_ulps_off_its_codes_is_refused(tmp_path):
    model, _, path = _small(tmp_path)
    tensors, meta = _tensors_and_meta(path)
    w = tensors["0.weight"].clone()
    w[0, 0] += 2e-5 * float(w.abs().max())     # 170 float32 ulps of the largest weight
    bad = _write(tmp_path / "bad.safetensors", {**tensors, "0.weight": w}, meta)
    with pytest.raises(QroundError, match="corrupt"):
        load(model, bad)


def test_a_bias_of_another_shape_in_the_file_is_refused(tmp_path):
    model, _, path = _small(tmp_path)
    tensors, meta = _tensors_and_meta(path)
    # one value would broadcast into the layer's 4 biases
    bad = _write(tmp_path / "bad.safetensors", {**tensors, "2.bias": tensors["2.bias"][:1]},
                 meta)
    with pytest.raises(QroundError, match=r"bias of '2' has shape \(4,\), the file \(1,\)"):
        load(model, bad)


@pytest.mark.parametrize("key", ["solver", "config", "bits", "skipped"])
def test_a_header_missing_a_field_is_named(tmp_path, key):
    model, _, path = _small(tmp_path)
    tensors, meta = _tensors_and_meta(path)
    del meta[key]
    bad = _write(tmp_path / "bad.safetensors", tensors, meta)
    for read in (read_metadata, load_codes, lambda p: load(model, p)):
        with pytest.raises(QroundError, match=f"header lacks .*'{key}'"):
            read(bad)


@pytest.mark.parametrize("field, value, match", [
    ("group_size", 0, "has group_size 0"),
    ("group_size", True, "has group_size True"),
    ("bits", True, "lacks 'bits' of type int"),
    ("symmetric", 1, "lacks 'symmetric' of type bool"),
])
def test_bad_layer_fields_are_named(tmp_path, field, value, match):
    model, _, path = _small(tmp_path)
    layers = read_metadata(path)["layers"]
    layers["0"][field] = value
    bad = _rewrite_header(path, tmp_path / "bad.safetensors", layers=json.dumps(layers))
    for read in (read_metadata, load_codes, lambda p: load(model, p)):
        with pytest.raises(QroundError, match=match):
            read(bad)


# ------------------------------------------------------------------ input quantisers
def test_the_saved_input_mode_comes_back(act_file, tmp_path):
    net, qm, _ = act_file
    edited = quantize_model(net, BATCHES, qm.config)
    quantized_layers(edited.model)["block.conv1"].act_mode = "float"
    path = tmp_path / "mode.safetensors"
    edited.save(path)
    assert read_metadata(path)["layers"]["block.conv1"]["act"]["mode"] == "float"
    loaded = quantized_layers(load(net, path))
    assert loaded["block.conv1"].act_mode == "float"
    assert loaded["block.conv2"].act_mode == "nearest"


def test_save_leaves_the_weight_mode_of_the_wrappers_as_it_was(act_file, tmp_path):
    net, qm, _ = act_file
    edited = quantize_model(net, BATCHES, qm.config)
    layers = quantized_layers(edited.model)
    for m in layers.values():
        m.weight_mode = "soft"         # e.g. left so by a user's own fine-tuning step
    edited.save(tmp_path / "m.safetensors")   # saves the hard codes
    assert all(m.weight_mode == "soft" for m in layers.values())


def test_a_fusion_size_other_than_the_kernel_is_refused(act_file, tmp_path):
    net, _, path = act_file
    layers = read_metadata(path)["layers"]
    layers["block.conv1"]["act"]["fusion_size"] = 4          # a 3x3 conv fuses 9 or 1
    bad = _rewrite_header(path, tmp_path / "bad.safetensors", layers=json.dumps(layers))
    with pytest.raises(QroundError, match="fusion size 4 of 'block.conv1' does not match its "
                                          "9-element kernel"):
        load(net, bad)


def test_a_step_with_the_wrong_number_of_values_is_refused(act_file, tmp_path):
    net, _, path = act_file
    tensors, meta = _tensors_and_meta(path)
    step = tensors["block.conv1.act.step"]
    bad = _write(tmp_path / "bad.safetensors",
                 {**tensors, "block.conv1.act.step": torch.cat([step, step])}, meta)
    with pytest.raises(QroundError, match=r"block.conv1.act.step has \d+ values, the layer "
                                          r"needs \d+"):
        load(net, bad)


# ------------------------------------------------------------------ save's own checks
def test_save_refuses_a_report_layer_the_model_lacks(tmp_path):
    _, qm, _ = _small(tmp_path)
    other = dataclasses.replace(qm, model=nn.Sequential(qm.model[0]))   # '2' is gone
    with pytest.raises(QroundError, match="layer '2' of the report does not match qmodel.model"):
        save(other, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_save_and_load(tmp_path, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)
    data = [torch.randn(32, 16).to(dtype)]
    qm = quantize_model(model, data, QuantConfig(wbits=4, solver="greedy", progress=False))
    path = tmp_path / "h.safetensors"
    qm.save(path)
    loaded = load(model, path)
    assert loaded[0].weight.dtype == dtype
    assert torch.equal(loaded[0].weight, qm.model[0].weight)


# ------------------------------------------------------------------ fingerprints
def test_fingerprint_tells_views_of_one_storage_apart():
    flat = torch.arange(8, dtype=torch.float32)
    m = nn.Module()
    m.a = nn.Parameter(flat[:4])
    m.b = nn.Parameter(flat[4:])
    prints = fingerprint(m)
    assert prints["a"] != prints["b"]
    before = prints["b"]
    with torch.no_grad():
        m.b[0] += 1
    assert fingerprint(m)["b"] != before and fingerprint(m)["a"] == prints["a"]


def test_fingerprint_skips_uninitialised_lazy_parameters():
    m = nn.Sequential(nn.Linear(2, 2), nn.LazyLinear(3))
    assert list(fingerprint(m)) == ["0.weight", "0.bias"]


def test_an_unreadable_digest_in_the_file_compares_dtype_and_shape_only(tmp_path):
    model, qm, path = _small(tmp_path)
    source = read_metadata(path)["source"]
    source["0.weight"] = source["0.weight"].rsplit(" ", 1)[0] + " -"
    edited = _rewrite_header(path, tmp_path / "dash.safetensors", source=json.dumps(source))
    load(model, edited)                           # the other tensors still match: loads
    other = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(QroundError, match="another float model"):
        load(other, edited)


def test_a_buffer_only_the_file_recorded_is_logged_not_refused(tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model.register_buffer("position_ids", torch.arange(4))
    qm = quantize_model(model, [torch.randn(16, 8)],
                        QuantConfig(wbits=2, solver="greedy", progress=False))
    path = tmp_path / "m.safetensors"
    qm.save(path)
    del model.position_ids                        # another transformers version: no buffer
    with caplog.at_level(logging.WARNING, logger="qround.export"):
        loaded = load(model, path)
    assert "position_ids" in caplog.text and "on one side only" in caplog.text
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), qm.model(x))


def test_a_channels_last_activation_quantised_model_loads_with_identical_outputs(tmp_path):
    """The wrappers computed an NCHW weight while load wrote the hard weight into the layer's
    channels-last one: the convs ran other kernels, and their round-off moved 8-bit activation
    codes (helper-159: outputs off by 1e-3 on the digits CNN)."""
    from qround.zoo.digits import DigitsCNN, load_digits_data

    data = load_digits_data()
    cl = torch.channels_last
    model = DigitsCNN(0).eval().to(memory_format=cl)
    calib = [data.calib_images[i:i + 64].contiguous(memory_format=cl) for i in (0, 64)]
    qm = quantize_model(model, calib, QuantConfig(wbits=3, abits=8, progress=False,
                                                  solver="greedy"))
    for wrapper in quantized_layers(qm.model).values():
        if wrapper.layer.weight.dim() == 4:
            assert wrapper.quantized_weight().is_contiguous(memory_format=cl)
    qm.save(tmp_path / "q.safetensors")
    loaded = load(model, tmp_path / "q.safetensors")
    x = data.test_images[:200].contiguous(memory_format=cl)
    with torch.no_grad():
        assert torch.equal(qm.model(x), loaded(x))
