"""The quantised model as deployment code uses it: traced, compiled, exported, under
inference_mode; outputs equal to the eager model's."""
import copy
import warnings

import pytest
import torch
from torch import nn

from qround import GridSpec
from qround.activations import ActQuantizer, insert_act_quantizers, quantized_layers

torch.set_num_threads(1)


def _border_model():
    """A conv net with 4-bit inputs and quadratic borders moved off their start, so that the
    border correction changes codes; hard weights."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(512, 5)).eval()
    cal = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]
    q = insert_act_quantizers(net, None, 4, borders="quadratic", calib_batches=cal,
                              weights=GridSpec(bits=4))
    with torch.no_grad():
        for m in quantized_layers(q).values():
            m.weight_mode = "hard"
            if m.act.borders != "none":
                m.act.b0.copy_(0.4 + 0.2 * torch.rand(m.act.b0.shape, generator=g))
                m.act.b1.copy_(0.3 * torch.randn(m.act.b1.shape, generator=g))
                m.act.b2.copy_(0.3 * torch.randn(m.act.b2.shape, generator=g))
    return q, [torch.randn(2, 3, 8, 8, generator=g) for _ in range(2)]


def test_wrappers_follow_the_models_mode():
    q, _ = _border_model()
    assert not any(m.training for m in q.modules())


def test_jit_trace_under_no_grad_keeps_the_border_correction():
    # the inference path's numba kernel wrote its correction through a numpy view, which the
    # tracer did not see: the traced model added zeros (10 % output error)
    q, (x, x2) = _border_model()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the tracer's warnings on Python values
        traced = torch.jit.trace(q, (x,), check_trace=False)
        plain = copy.deepcopy(q)
        for m in quantized_layers(plain).values():
            m.act_mode = "nearest"
        assert (plain(x2) - q(x2)).abs().max() > 1e-3   # the borders matter on this input
        assert torch.allclose(traced(x2), q(x2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["export", "compile"])
def test_export_and_fullgraph_compile_match_eager(kind):
    # branches on the quantisers' buffers (calibrated, signed) made torch.export and
    # torch.compile(fullgraph=True) fail on every model with quantised activations
    q, (x, x2) = _border_model()
    with torch.no_grad():
        if kind == "export":
            run = torch.export.export(q, (x,)).module()
        else:
            run = torch.compile(q, backend="eager", fullgraph=True)
        assert torch.allclose(run(x2), q(x2), atol=1e-6, rtol=0)


def test_a_loaded_quantiser_exports_with_its_grid_kind():
    # the flags a trace reads follow a state-dict load (a signed grid: qmin < 0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)).eval()
    cal = [torch.randn(16, 6)]
    q = insert_act_quantizers(net, None, 4, calib_batches=cal, weights=GridSpec(bits=4))
    fresh = copy.deepcopy(q)
    for m in fresh.modules():
        if isinstance(m, ActQuantizer):
            m.register_buffer("signed", torch.tensor(False))
            m.register_buffer("calibrated", torch.tensor(False))
            m._flags = (False, False)
    fresh.load_state_dict(q.state_dict())
    assert all(m.flags() == (True, True) for m in fresh.modules()
               if isinstance(m, ActQuantizer))
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.equal(torch.export.export(fresh, (x,)).module()(x), q(x))


def test_a_mask_built_under_inference_mode_serves_a_later_backward():
    q, (x, _) = _border_model()
    for m in quantized_layers(q).values():
        m.force_unfold = True   # the im2col path, which caches the padding mask
    with torch.inference_mode():
        q(x)
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_a_functional_call_with_other_buffers_leaves_the_compiled_grid_alone():
    # an eager read recorded the swapped-in buffers' grid kind, and export used it afterwards
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)).eval()
    signed = insert_act_quantizers(net, None, 4, calib_batches=[torch.randn(16, 6)],
                                   weights=GridSpec(bits=4))
    unsigned = insert_act_quantizers(net, None, 4, calib_batches=[torch.rand(16, 6)],
                                     weights=GridSpec(bits=4))
    assert signed[0].act.flags()[0] and not unsigned[0].act.flags()[0]
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.func.functional_call(signed, unsigned.state_dict(), (x,))
        assert torch.equal(torch.export.export(signed, (x,)).module()(x), signed(x))


def _recomputed(layer):
    """The hard weight dequantised from the codes, bypassing the synced weight."""
    synced, layer._synced = getattr(layer, "_synced", None), None
    try:
        return layer.quantized_weight().clone()
    finally:
        layer._synced = synced


def test_the_returned_model_uses_its_synced_weights_until_the_codes_change():
    from qround.pipeline import QuantConfig, quantize_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    qm = quantize_model(net, [torch.randn(16, 6)], QuantConfig(wbits=3, abits=8,
                                                              solver="greedy", progress=False))
    layers = quantized_layers(qm.model)
    x = torch.randn(4, 6)
    for layer in layers.values():
        # the forward takes the layer's own weight, which holds the hard weight: no
        # dequantisation per call
        assert layer.quantized_weight() is layer.layer.weight
        assert torch.equal(layer.layer.weight, _recomputed(layer))
    before = qm.model(x)
    first = layers["0"]
    with torch.no_grad():
        first.w_codes[0, 0] += 1 if first.w_codes[0, 0] < first.w_qmax else -1
    assert first.quantized_weight() is not first.layer.weight   # changed codes: recomputed
    assert torch.equal(first.quantized_weight(), _recomputed(first))
    assert not torch.equal(qm.model(x), before)
    first.mark_synced()
    assert first.quantized_weight() is first.layer.weight
    last = layers["2"]
    last.layer.weight.data = last.layer.weight.data.clone() * 2   # replaced, not in place
    assert torch.equal(last.quantized_weight(), _recomputed(last))
    assert torch.equal(last.quantized_weight(), last.layer.weight / 2)
