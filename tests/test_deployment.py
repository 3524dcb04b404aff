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


def test_a_traced_model_computes_as_the_eager_model_with_gradients():
    """Traced, a border conv takes the im2col path, as eager does when it computes gradients:
    the same values.  Eager without gradients takes the sparse border conv, whose round-off
    differs (README, deployment)."""
    q, (x, x2) = _border_model()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(q, (x,), check_trace=False)
        fast = q(x2)
    with torch.enable_grad():
        slow = q(x2).detach()
    with torch.no_grad():
        assert torch.equal(traced(x2), slow)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=0)


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


def test_hard_weights_broadcast_the_grid_as_the_codes_say():
    # the grid is broadcast over each group instead of repeated per weight (a faster forward):
    # the same numbers as s * (q - z) with s and z repeated
    torch.manual_seed(0)
    for group_size, symmetric in ((None, True), (4, False), (8, True)):
        q = insert_act_quantizers(nn.Sequential(nn.Linear(16, 5)), None, 8,
                                  calib_batches=[torch.randn(8, 16)],
                                  weights=GridSpec(bits=3, group_size=group_size,
                                                   symmetric=symmetric))
        layer = quantized_layers(q)["0"]
        reps = 16 // layer.w_scale.shape[1]
        codes = layer.w_codes.to(layer.w_scale.dtype)
        want = layer.w_scale.repeat_interleave(reps, 1) * (
            codes - layer.w_zero.repeat_interleave(reps, 1))
        assert torch.equal(layer.quantized_weight(), want)
        layer.weight_mode = "soft"
        soft = (layer.w_floor + layer.soft_weight_fraction()).clamp(layer.w_qmin, layer.w_qmax)
        want = layer.w_scale.repeat_interleave(reps, 1) * (
            soft - layer.w_zero.repeat_interleave(reps, 1))
        assert torch.equal(layer.quantized_weight(), want)


@pytest.mark.parametrize("kind, borders, reads", [("linear", "none", 2), ("linear", "quadratic", 2),
                                                  ("conv", "none", 2), ("conv", "quadratic", 4)])
def test_a_forward_reads_the_quantisers_flags_a_few_times(kind, borders, reads, monkeypatch):
    """Each read of the signed/calibrated buffers is a device sync on a GPU: a forward reads
    them a fixed few times (it read them 8 to 18 times, once per qmin/qmax/span)."""
    from qround.activations import QuantizedLayer

    torch.manual_seed(0)
    m = nn.Linear(16, 8) if kind == "linear" else nn.Conv2d(4, 8, 3, padding=1)
    q = QuantizedLayer(m, abits=4, borders=borders, weight=GridSpec(bits=4))
    x = torch.randn(2, 16) if kind == "linear" else torch.randn(2, 4, 6, 6)
    q.act.calibrate(x)
    q.force_unfold = True
    count = [0]
    real = torch.Tensor.__bool__

    def counted(self):
        count[0] += 1
        return real(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counted)
    with torch.no_grad():
        q(x)
    assert count[0] == reads
    count[0] = 0
    q.weight_mode = "soft"
    q(x.requires_grad_()).sum().backward()
    assert count[0] == reads


def test_quantisers_run_on_a_torch_without_torch_compiler_is_compiling(monkeypatch):
    """torch 2.1 and 2.2 (pyproject allows >= 2.1) have torch._dynamo.is_compiling only."""
    from qround.activations import QuantizedLayer

    torch.manual_seed(0)
    q = QuantizedLayer(nn.Linear(8, 4), abits=4, weight=GridSpec(bits=4))
    x = torch.randn(3, 8)
    q.act.calibrate(x)
    with torch.no_grad():
        want = q(x)
    import importlib

    dynamo = importlib.import_module("torch._dynamo")
    calls = []   # today's dynamo.is_compiling calls the new name: stand in for the old one
    monkeypatch.setattr(dynamo, "is_compiling", lambda: calls.append(1) or False)
    monkeypatch.delattr(torch.compiler, "is_compiling")
    with torch.no_grad():
        assert torch.equal(q(x), want)
    assert calls     # the old name answered
