"""Block reconstruction on tiny models: loss goes down, determinism, RNG hygiene, errors."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

from qround import GridSpec, QroundError
from qround.activations import insert_act_quantizers, quantized_layers
from qround.reconstruct import ReconstructConfig, find_blocks, reconstruct

from .tiny_models import BATCHES, KwargsNet, TinyResNet, gen

torch.set_num_threads(1)


FAST = ReconstructConfig(iterations=60, batch_size=8, lr_rounding=0.05, seed=3)


def quant_model(net, borders="quadratic", abits=3, wbits=2):
    return insert_act_quantizers(net, None, abits, borders=borders, calib_batches=BATCHES,
                                 weights=GridSpec(bits=wbits, symmetric=False))


def test_find_blocks():
    q = quant_model(TinyResNet())
    assert find_blocks(q) == ["stem", "block", "head.1"]


def test_reconstruction_reduces_block_loss_and_leaves_inputs_alone():
    net = TinyResNet()
    q = quant_model(net)
    f_state, q_state = copy.deepcopy(net.state_dict()), copy.deepcopy(q.state_dict())
    res = reconstruct(net, q, BATCHES, config=FAST)
    assert [b.block for b in res.blocks] == ["stem", "block", "head.1"]
    assert res.blocks[1].layers == ("block.conv1", "block.conv2")
    assert all(b.loss_after <= b.loss_before for b in res.blocks)
    assert sum(b.loss_after < 0.9 * b.loss_before for b in res.blocks) >= 2
    assert all(b.iterations == FAST.iterations and b.seconds > 0 for b in res.blocks)
    assert all(torch.equal(v, f_state[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(v, q_state[k]) for k, v in q.state_dict().items())
    layers = quantized_layers(res.model)
    assert all(m.weight_mode == "hard" for m in layers.values())
    # the learned state moved away from the initialisation
    assert not torch.equal(layers["block.conv1"].act.b0, q.block.conv1.act.b0)
    assert not torch.equal(layers["block.conv2"].act.step, q.block.conv2.act.step)
    assert "block" in res.table()


def test_deterministic_for_a_seed_and_global_rng_untouched():
    net = TinyResNet()
    q = quant_model(net)
    state = torch.get_rng_state()
    a = reconstruct(net, q, BATCHES, config=FAST)
    b = reconstruct(net, q, BATCHES, config=FAST)
    assert torch.equal(state, torch.get_rng_state())
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r.loss_after for r in a.blocks] == [r.loss_after for r in b.blocks]
    c = reconstruct(net, q, BATCHES, config=dataclasses.replace(FAST, seed=4))
    sc = c.model.state_dict()
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_layerwise_and_user_blocks():
    net = TinyResNet()
    q = quant_model(net, borders="none")
    cfg = ReconstructConfig(iterations=5, batch_size=8)
    res = reconstruct(net, q, BATCHES, blocks=None, config=cfg)
    assert [b.block for b in res.blocks] == ["stem", "block.conv1", "block.conv2", "head.1"]
    res = reconstruct(net, q, BATCHES, blocks=["head", "block"], config=cfg)
    # forward order; the stem, outside the named blocks, is reconstructed alone
    assert [b.block for b in res.blocks] == ["stem", "block", "head"]


def test_blocks_with_keyword_inputs_and_tuple_outputs():
    net = KwargsNet()
    batches = [{"x": torch.randn(4, 3, 5, generator=gen(i)),
                "mask": (torch.rand(4, 3, generator=gen(10 + i)) > 0.3).float()}
               for i in range(3)]
    q = insert_act_quantizers(net, None, 4, borders="linear", calib_batches=batches,
                              weights=GridSpec(bits=3))
    assert find_blocks(q) == ["layer.0", "layer.1"]
    res = reconstruct(net, q, batches, config=ReconstructConfig(iterations=40, seed=1))
    assert all(b.loss_after <= b.loss_before for b in res.blocks)
    assert res.blocks[0].loss_after < res.blocks[0].loss_before


@pytest.mark.parametrize("kwargs, match", [
    (dict(blocks=["block", "nope"]), "do not exist"),
    (dict(blocks=["block", "block.conv1"]), "overlap"),
    (dict(blocks=["head.0"]), "no QuantizedLayer"),
    (dict(blocks="resnet"), "blocks must be"),
    (dict(calibration=[]), "empty"),
    (dict(config=dict(iterations=0)), "iterations"),
])
def test_errors_before_any_work(kwargs, match):
    net = TinyResNet()
    q = quant_model(net)
    net.calls = q.calls = 0
    args = dict(calibration=BATCHES, blocks="auto", config=FAST)
    args.update(kwargs)
    with pytest.raises(QroundError, match=match):
        if isinstance(args["config"], dict):
            args["config"] = ReconstructConfig(**args["config"])
        reconstruct(net, q, **args)
    assert net.calls == 0 and q.calls == 0


@pytest.mark.parametrize("field, value", [("qdrop", 1.5), ("warmup", 1.0), ("lr_border", 0.0),
                                          ("beta", (20.0,)), ("batch_size", 0), ("seed", -1)])
def test_config_validation(field, value):
    with pytest.raises(QroundError, match=field):
        ReconstructConfig(**{field: value})


def test_needs_quantized_layers():
    net = TinyResNet()
    with pytest.raises(QroundError, match="insert_act_quantizers"):
        reconstruct(net, copy.deepcopy(net), BATCHES, config=FAST)
    assert net.calls == 0


class _Holder(nn.Module):
    """Like a SentenceTransformer's module 0: transformer layers deep inside a Sequential."""

    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
                                    nn.Sequential(nn.Linear(4, 4), nn.ReLU())])

    def forward(self, x):
        for m in self.layer:
            x = m(x)
        return x


def test_find_blocks_looks_inside_a_sequential_child_that_holds_blocks():
    net = nn.Sequential(_Holder(), nn.Linear(4, 2))
    q = insert_act_quantizers(net, None, None, weights=GridSpec(bits=4))
    assert find_blocks(q) == ["0.layer.0", "0.layer.1", "1"]
    plain = insert_act_quantizers(nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
                                                nn.Linear(4, 2)), None, None,
                                  weights=GridSpec(bits=4))
    assert find_blocks(plain) == ["0", "1"]


def test_block_data_holds_one_copy_of_the_cached_tensors():
    # the per-batch lists and their concatenation were two copies: twice what cache_mb counts
    from qround.reconstruct import _BlockData

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)]
    ys = [torch.randn(4, 2, generator=g), torch.randn(5, 2, generator=g)]
    data = _BlockData([((x,), {}) for x in xs], ys)
    assert data.x is not None
    for (args, _), y, x, y0 in zip(data.inputs, data.targets, xs, ys):
        assert args[0].untyped_storage().data_ptr() == data.x.untyped_storage().data_ptr()
        assert y.untyped_storage().data_ptr() == data.y.untyped_storage().data_ptr()
        assert torch.equal(args[0], x) and torch.equal(y, y0)


def _captured_bytes(net, q, units, batches):
    """What the capture of each unit really holds (the cached inputs and float targets)."""
    from qround.calibrate import default_forward
    from qround.reconstruct import _capture, _nbytes, _order_units, _resolve_blocks

    ordered, lca, _ = _order_units(q, _resolve_blocks(q, net, units), batches[0],
                                   default_forward)
    fnamed, qnamed = dict(net.named_modules()), dict(q.named_modules())
    got = {}
    for u in ordered:
        entry = qnamed[lca[u] if len(u.modules) > 1 else u.name]
        data = _capture(net, q, fnamed[u.modules[-1]], entry, u.name, batches, default_forward,
                        1e9)
        got[u.name] = _nbytes(data.inputs) + _nbytes(data.targets)
    return ordered, lca, got


@pytest.mark.parametrize("units", [None, "auto", [("stem", "block"), "head.1"]])
def test_cache_bytes_are_what_the_capture_holds(units):
    from qround.calibrate import default_forward
    from qround.reconstruct import cache_bytes

    net = TinyResNet()
    q = quant_model(net)
    batches = BATCHES + [torch.randn(5, 1, 6, 6, generator=gen(9))]
    ordered, lca, got = _captured_bytes(net, q, units, batches)
    assert cache_bytes(q, ordered, lca, batches, default_forward) == got
    assert all(v > 0 for v in got.values())


def test_cache_bytes_count_keyword_inputs():
    from qround.calibrate import default_forward
    from qround.reconstruct import cache_bytes

    net = KwargsNet()
    q = insert_act_quantizers(net, None, None, weights=GridSpec(bits=4))
    g = gen(4)
    batches = [{"x": torch.randn(3, 5, 5, generator=g), "mask": torch.ones(3, 5)}
               for _ in range(2)]
    ordered, lca, got = _captured_bytes(net, q, "auto", batches)
    need = cache_bytes(q, ordered, lca, batches, default_forward)
    assert need == got
    # the mask, passed by keyword, is cached with the hidden states: 3 x 5 x (5 + 1 + 5)
    # float32 numbers per batch
    assert need["layer.0"] == 2 * 3 * 5 * 11 * 4


class _WideEnd(nn.Module):
    """Small first layer, wide last: only the last unit's capture is large."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4096)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_reconstruct_refuses_a_unit_over_cache_mb_before_training_any():
    torch.manual_seed(0)
    net = _WideEnd()
    batches = [torch.randn(64, 4, generator=gen(i)) for i in range(2)]
    q = insert_act_quantizers(net, None, None, weights=GridSpec(bits=3))
    state = copy.deepcopy(q.state_dict())
    # unit "b" holds 2 x 64 x (4 + 4096) floats, about 2.0 MB; unit "a" about 4 kB
    config = dataclasses.replace(FAST, cache_mb=1.0)
    with pytest.raises(QroundError, match=r"unit 'b' would cache 2\.00\d* MB .* above "
                                          r"cache_mb=1 MB \(1 of 2 units"):
        reconstruct(net, q, batches, None, config, inplace=True)
    # raised before unit "a" trained (inplace: it would have changed q)
    assert all(torch.equal(v, state[k]) for k, v in q.state_dict().items())
    res = reconstruct(net, q, batches, None, dataclasses.replace(FAST, cache_mb=2.5))
    assert [b.block for b in res.blocks] == ["a", "b"]


def test_quantize_model_refuses_cache_mb_before_the_weight_stage(monkeypatch):
    import qround.pipeline as pipeline

    def no_solve(*args, **kwargs):
        raise AssertionError("the weight stage ran")

    monkeypatch.setattr(pipeline, "_solve_layer", no_solve)
    net = _WideEnd()
    batches = [torch.randn(64, 4, generator=gen(i)) for i in range(2)]
    for granularity in ("layer", "block"):
        config = pipeline.QuantConfig(wbits=3, solver="nearest", granularity=granularity,
                                      reconstruction=dataclasses.replace(FAST, cache_mb=1.0),
                                      progress=False)
        with pytest.raises(QroundError, match=r"unit 'b' would cache .* above "
                                              r"ReconstructConfig\.cache_mb=1 MB"):
            pipeline.quantize_model(net, batches, config)


def test_numpy_numbers_in_the_config_become_python_ones_and_save():
    # kept as numpy scalars, they made QuantizedModel.save fail after the whole run
    import json

    import numpy as np

    from qround.pipeline import QuantConfig

    rc = ReconstructConfig(iterations=np.int64(5), qdrop=np.float32(0.5),
                           lr_rounding=np.float32(0.01), warmup=np.float64(0.2),
                           beta=(np.int64(20), np.float32(2.0)))
    assert type(rc.qdrop) is float and type(rc.iterations) is int
    assert all(type(b) in (int, float) for b in rc.beta)
    text = json.dumps(QuantConfig(abits=8, reconstruction=rc).as_dict())
    assert '"qdrop": 0.5' in text


def test_the_codes_after_the_activation_stage_are_read_only():
    from qround.pipeline import QuantConfig, quantize_model

    result = quantize_model(TinyResNet(), BATCHES, QuantConfig(wbits=3, solver="greedy",
                                                               abits=8, progress=False))
    for qw in result.layers.values():
        for a in (qw.codes, qw.scale, qw.zero_point):
            assert not a.flags.writeable
