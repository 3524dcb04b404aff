"""quantize_model's activation stage: quantised inputs after the solver, reconstruction from the
solver's rounding, save/load of steps and borders, config errors before any work."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qround import GridSpec, QroundError, export
from qround.activation_stage import input_bits, load_weight_codes
from qround.activations import QuantizedLayer, quantized_layers
from qround.granularity import oscillation_points
from qround.pipeline import QuantConfig, quantize_model
from qround.reconstruct import ReconstructConfig
from qround.writeback import QuantizedWeight

from .tiny_models import BATCHES, TinyResNet, gen

torch.set_num_threads(1)


REC = ReconstructConfig(iterations=20, batch_size=8, seed=1)
BASE = dict(wbits=2, symmetric=False, solver="greedy", progress=False)


def test_abits_wraps_layers_and_keeps_the_solver_codes():
    net = TinyResNet()
    before = copy.deepcopy(net.state_dict())
    weights_only = quantize_model(net, BATCHES, QuantConfig(**BASE))
    result = quantize_model(net, BATCHES, QuantConfig(**BASE, abits=4))
    layers = quantized_layers(result.model)
    assert list(layers) == ["stem", "block.conv1", "block.conv2", "head.1"]
    for name, layer in layers.items():
        assert layer.act_mode == "nearest" and layer.act.bits == 4
        assert layer.weight_mode == "hard"
        np.testing.assert_array_equal(result.layers[name].codes, weights_only.layers[name].codes)
        # the wrapped layer's hard weight is the weight stage's dequantised weight
        torch.testing.assert_close(layer.quantized_weight().double(), torch.as_tensor(
            weights_only.layers[name].dequantized), rtol=1e-6, atol=1e-7)
    for k, v in net.state_dict().items():  # the float model is untouched
        torch.testing.assert_close(v, before[k])
    assert result.reconstruction is None
    # activations quantised to 4 bits change the output, but not by much
    with torch.no_grad():
        y_w, y_wa = weights_only.model(BATCHES[0]), result.model(BATCHES[0])
    assert 0 < float((y_w - y_wa).abs().max()) < float(y_w.abs().max())


def test_first_last_bits_keeps_the_data_input_in_float():
    order = ["a", "b", "c"]
    cfg = QuantConfig(**BASE, abits=4, first_last_bits=8)
    assert input_bits(order, cfg) == {"a": None, "b": 4, "c": 8}
    assert input_bits(order, QuantConfig(**BASE, abits=4)) == {"a": 4, "b": 4, "c": 4}
    result = quantize_model(TinyResNet(), BATCHES, cfg)
    layers = quantized_layers(result.model)
    assert layers["stem"].act is None and layers["head.1"].act.bits == 8
    assert layers["stem"].weight_spec.bits == 8 and layers["block.conv1"].weight_spec.bits == 2


def test_reconstruction_starts_from_the_solver_and_never_gets_worse():
    net = TinyResNet()
    cfg = QuantConfig(**BASE, abits=3, borders="quadratic", reconstruction=REC)
    result = quantize_model(net, BATCHES, cfg)
    rec = result.reconstruction
    assert [b.block for b in rec.blocks] == ["stem", "block", "head.1"]
    assert all(b.loss_after <= b.loss_before for b in rec.blocks)
    layers = quantized_layers(result.model)
    assert {m.act_mode for n, m in layers.items()} == {"border"}
    for name, qw in result.layers.items():  # the report's codes are the model's final codes
        np.testing.assert_array_equal(qw.codes, layers[name].w_codes.numpy())
        assert qw.codes.min() >= qw.qmin and qw.codes.max() <= qw.qmax
    assert "reconstruction" in result.table()


def test_save_and_load_reproduce_the_outputs(tmp_path):
    net = TinyResNet()
    cfg = QuantConfig(**BASE, abits=3, borders="linear", fusion=False, reconstruction=REC)
    result = quantize_model(net, BATCHES, cfg)
    path = tmp_path / "q.safetensors"
    result.save(path)
    loaded = export.load(net, path)
    assert isinstance(dict(loaded.named_modules())["block.conv1"], QuantizedLayer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(BATCHES[1]), result.model(BATCHES[1]), rtol=0, atol=0)
    meta = export.read_metadata(path)
    act = meta["layers"]["block.conv1"]["act"]
    assert act == {"bits": 3, "signed": False, "borders": "linear", "fusion_size": 1,
                   "mode": "border"}
    assert meta["config"]["reconstruction"]["iterations"] == REC.iterations
    codes = export.load_codes(path)
    for name, qw in result.layers.items():
        np.testing.assert_array_equal(codes[name].codes, qw.codes)
    assert not any(isinstance(m, QuantizedLayer) for m in net.modules())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 16), bits=st.integers(2, 4), symmetric=st.booleans(),
       start=st.sampled_from(["solver", "float"]))
def test_load_weight_codes_hardens_back_to_the_solver_codes(seed, bits, symmetric, start):
    g = gen(seed)
    layer = nn.Linear(6, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 6, generator=g))
    wrapped = QuantizedLayer(copy.deepcopy(layer), None, weight=GridSpec(bits=bits,
                                                                         symmetric=symmetric))
    scale = wrapped.w_scale.double().numpy() * 1.1  # a grid of the solver's, not the refit one
    zero = wrapped.w_zero.double().numpy()
    ratio = layer.weight.detach().double().numpy() / scale
    floor = np.floor(ratio) + zero
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    up = torch.rand(4, 6, generator=g).numpy() < 0.5
    codes = np.clip(floor + up, lo, hi).astype(np.int64)
    qw = QuantizedWeight(codes, scale, zero, bits, symmetric, None, (4, 6))
    load_weight_codes(wrapped, qw, layer.weight, start)
    torch.testing.assert_close(wrapped.quantized_weight().double(),
                               torch.as_tensor(qw.dequantized), rtol=1e-6, atol=1e-6)
    if start == "solver":  # the soft rounding starts at the solver's choice
        wrapped.harden()
        np.testing.assert_array_equal(wrapped.w_codes.numpy(), codes)


@pytest.mark.parametrize("kwargs, match", [
    (dict(abits=1), "abits"),
    (dict(abits=9), "abits"),
    (dict(borders="quadratic", reconstruction=REC), "needs quantised inputs"),
    (dict(abits=4, borders="quadratic"), "learned by block reconstruction"),
    (dict(abits=4, borders="cubic", reconstruction=REC), "borders must be one of"),
    (dict(abits=4, borders="linear",
          reconstruction=dataclasses.replace(REC, train_borders=False)), "train_borders"),
    (dict(abits=4, fusion="yes"), "fusion"),
    (dict(abits=4, act_init="percentile"), "act_init"),
    (dict(reconstruction={"iterations": 3}), "ReconstructConfig"),
    (dict(granularity="everything"), "granularity"),
    (dict(weight_start="random"), "weight_start"),
])
def test_bad_activation_configs_fail_when_built(kwargs, match):
    with pytest.raises(QroundError, match=match):
        QuantConfig(**BASE, **kwargs)


# ------------------------------------------------------------------------------ granularity
def test_granularity_loss_merges_units_and_is_saved(tmp_path):
    net = TinyResNet()
    cfg = QuantConfig(**BASE, abits=3, reconstruction=REC, granularity="loss", k=1)
    result = quantize_model(net, BATCHES, cfg)
    sel = result.units
    assert sel.granularity == "loss" and len(sel.base_losses) == len(sel.base_units) == 3
    osc = oscillation_points(sel.base_losses)
    assert set(sel.merges) <= set(osc) and len(sel.merges) == min(1, len(osc))
    assert len(sel.units) == len(sel.base_units) - len(sel.merges)
    assert len(result.reconstruction.blocks) == len(sel.units)
    assert "reconstruction units (loss)" in result.table()
    result.save(tmp_path / "q.safetensors")
    meta = export.read_metadata(tmp_path / "q.safetensors")
    assert meta["units"]["units"] == [list(u.modules) for u in sel.units]


def test_granularity_scheme_is_followed():
    cfg = QuantConfig(**BASE, abits=3, reconstruction=REC, granularity="scheme",
                      scheme=("stem+block", "head"))
    result = quantize_model(TinyResNet(), BATCHES, cfg)
    assert [b.block for b in result.reconstruction.blocks] == ["stem+block", "head"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(granularity="loss", k=5), r"k=5 must lie in \[1, 2\]"),
    (dict(granularity="scheme", scheme=("stem", "nope+block")), "do not exist"),
])
def test_unit_errors_come_before_any_work(kwargs, match):
    calls = []

    def forward(model, batch):
        calls.append(1)
        return model(batch)

    cfg = QuantConfig(**BASE, abits=3, reconstruction=REC, **kwargs)
    with pytest.raises(QroundError, match=match):
        quantize_model(TinyResNet(), BATCHES, cfg, forward=forward)
    assert calls == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(granularity="block", k=2), "k .the number of merges. applies to granularity=.loss."),
    (dict(granularity="loss", k=0), "positive integer"),
    (dict(granularity="scheme"), "go together"),
    (dict(scheme=("stem",)), "go together"),
    (dict(granularity="scheme", scheme="stem,block"), "non-empty tuple"),
])
def test_bad_granularity_configs_fail_when_built(kwargs, match):
    with pytest.raises(QroundError, match=match):
        QuantConfig(**BASE, abits=3, reconstruction=REC, **kwargs)


def test_inplace_with_activations_quantises_the_weights_and_wraps_a_new_model():
    net = TinyResNet()
    w0 = net.block.conv1.weight.detach().clone()
    result = quantize_model(net, BATCHES, QuantConfig(**BASE, abits=4), inplace=True)
    assert result.model is not net
    assert not torch.equal(net.block.conv1.weight, w0)  # the given model's weights are rounded
    torch.testing.assert_close(net.block.conv1.weight.double(), torch.as_tensor(
        result.layers["block.conv1"].dequantized), rtol=1e-6, atol=1e-7)
    assert isinstance(dict(result.model.named_modules())["block.conv1"], QuantizedLayer)
    assert not any(isinstance(m, QuantizedLayer) for m in net.modules())


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True,
                                              dropout=0.0)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)))


def test_a_transformer_encoder_layer_calls_its_wrapped_linears():
    """torch's fused inference path of nn.TransformerEncoderLayer reads linear1/linear2's
    weights itself; with their inputs quantised it must not run (the quantisers would not)."""
    model = _Encoder().eval()
    cal = [torch.randn(8, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    qm = quantize_model(model, cal, QuantConfig(wbits=4, abits=2, solver="greedy",
                                                progress=False))
    assert qm.model.enc.linear1.act is not None
    calls = []
    handle = qm.model.enc.linear1.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        qm.model.eval()(cal[0])
    handle.remove()
    assert calls, "the fused path skipped the quantised layer"
    # the float model keeps its fused path (untouched)
    assert model.enc.activation_relu_or_gelu == 1
    # block reconstruction trains through it
    config = QuantConfig(wbits=4, abits=2, solver="greedy", progress=False,
                         reconstruction=ReconstructConfig(iterations=3, batch_size=4))
    quantize_model(model, cal, config)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


# settings under which reconstruction moves some of the solver's codes of these tiny models
STRONG = ReconstructConfig(iterations=1000, lr_rounding=0.1, warmup=0.0)


def _tied_and_data():
    torch.manual_seed(0)
    return _Tied(), [torch.randn(64, 16) for _ in range(2)]


def test_a_layer_tied_to_a_reconstructed_one_uses_its_final_codes(tmp_path):
    model, data = _tied_and_data()
    config = QuantConfig(wbits=2, abits=8, solver="greedy", progress=False, inputs="float",
                         reconstruction=STRONG)
    start = quantize_model(model, data, QuantConfig(wbits=2, solver="greedy", progress=False,
                                                    inputs="float"))
    qm = quantize_model(model, data, config)
    assert "b" in qm.skipped
    final = torch.as_tensor(qm.layers["a"].dequantized, dtype=torch.float32)
    assert not torch.equal(final, torch.as_tensor(start.layers["a"].dequantized,
                                                  dtype=torch.float32))  # codes moved
    torch.testing.assert_close(qm.model.b.weight, final)                 # b uses them too
    qm.save(tmp_path / "tied.safetensors")
    loaded = export.load(model, tmp_path / "tied.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded(data[0]), qm.model(data[0]))


def test_inplace_with_reconstruction_leaves_the_final_codes_in_the_given_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    data = [torch.randn(64, 16) for _ in range(2)]
    start = quantize_model(model, data, QuantConfig(wbits=2, solver="greedy", progress=False,
                                                    inputs="float"))
    qm = quantize_model(model, data, QuantConfig(wbits=2, abits=8, solver="greedy",
                                                 progress=False, inputs="float",
                                                 reconstruction=STRONG), inplace=True)
    assert any(not np.array_equal(qm.layers[n].codes, start.layers[n].codes) for n in ("0", "2"))
    for name in ("0", "2"):
        torch.testing.assert_close(model[int(name)].weight.double(),
                                   torch.as_tensor(qm.layers[name].dequantized),
                                   rtol=1e-6, atol=1e-6)


def test_quantconfig_seed_drives_reconstruction_unless_it_has_its_own():
    rec = ReconstructConfig(iterations=20, batch_size=8, qdrop=0.5)
    assert rec.seed is None

    def run(config):
        qm = quantize_model(TinyResNet(), BATCHES, config)
        return [float(m.act.step.detach()) for m in quantized_layers(qm.model).values()]

    base = QuantConfig(**BASE, abits=4, reconstruction=rec)
    zero = run(base)
    assert run(base) == zero                      # the mini-batch and QDrop draws follow it,
    assert run(dataclasses.replace(base, seed=1)) != zero    # also through a replaced seed
    own = dataclasses.replace(base, seed=1, reconstruction=dataclasses.replace(rec, seed=0))
    assert run(own) == zero                       # a seed of its own wins
