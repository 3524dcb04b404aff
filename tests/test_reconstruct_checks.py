"""Tests from mutation testing of qround.reconstruct (helper 126): config checks, unit names
that share a prefix, the training flags and learning rates, QDrop during training, reverted
units, in-place runs, the loss definitions, the reports' layers and target power."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

from qround import GridSpec, QroundError
from qround.activations import insert_act_quantizers, quantized_layers
from qround.pipeline import QuantConfig, quantize_model
from qround.reconstruct import (ReconstructConfig, Unit, _backward_error, _BlockData,
                                _main_tensor, _mse, _one_layout, _rec_loss, check_cache,
                                plan_units, reconstruct)

from .tiny_models import BATCHES, TinyResNet, gen

torch.set_num_threads(1)

FAST = ReconstructConfig(iterations=60, batch_size=8, lr_rounding=0.05, seed=3)


def quant_model(net, borders="quadratic", abits=3, wbits=2):
    return insert_act_quantizers(net, None, abits, borders=borders, calib_batches=BATCHES,
                                 weights=GridSpec(bits=wbits, symmetric=False))


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("field, value", [
    ("seed", 2 ** 64), ("iterations", True), ("batch_size", True), ("reg_weight", -0.5),
    ("beta", (20.0, 2.0, 1.0)), ("train_steps", "False"), ("train_weights", 0.0),
    ("train_borders", "no")])
def test_config_refuses(field, value):
    with pytest.raises(QroundError, match=f"ReconstructConfig.{field}"):
        ReconstructConfig(**{field: value})


def test_config_accepts_its_edges():
    c = ReconstructConfig(seed=2 ** 64 - 1, reg_weight=0.0, qdrop=1.0, warmup=0.0)
    assert (c.seed, c.reg_weight, c.qdrop, c.warmup) == (2 ** 64 - 1, 0.0, 1.0, 0.0)


# ------------------------------------------------------------------------------ unit names
class _Pair(nn.Module):
    """Two layers whose names share a prefix ('fc', 'fc2'): neither is inside the other."""

    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc(x)))


PAIR_BATCHES = [torch.randn(8, 4, generator=gen(i)) for i in range(2)]


def test_modules_sharing_a_name_prefix_neither_overlap_nor_cover_each_other():
    net = _Pair()
    q = insert_act_quantizers(net, None, None, weights=GridSpec(bits=3))
    assert plan_units(net, q, PAIR_BATCHES, ["fc", "fc2"]) == [Unit(("fc",)), Unit(("fc2",))]
    # 'fc2' is not inside the unit 'fc': it is reconstructed alone
    assert plan_units(net, q, PAIR_BATCHES, ["fc"]) == [Unit(("fc",)), Unit(("fc2",))]
    res = reconstruct(net, q, PAIR_BATCHES, ["fc"], ReconstructConfig(iterations=2, seed=0))
    assert [b.block for b in res.blocks] == ["fc", "fc2"]


def test_an_empty_list_of_blocks_is_refused():
    net = _Pair()
    q = insert_act_quantizers(net, None, None, weights=GridSpec(bits=3))
    with pytest.raises(QroundError, match="empty list"):
        plan_units(net, q, PAIR_BATCHES, [])
    with pytest.raises(QroundError, match="empty list"):
        reconstruct(net, q, PAIR_BATCHES, [], FAST)


def test_a_unit_missing_from_the_float_model_is_named():
    net = _Pair()
    q = insert_act_quantizers(net, None, None, weights=GridSpec(bits=3))
    other = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(QroundError, match=r"\['fc', 'fc2'\] exist in quant_model but not in "
                                          "float_model"):
        reconstruct(other, q, PAIR_BATCHES, "auto", FAST)


class _SwappedBlock(nn.Module):
    """Defined 'second' then 'first'; called 'first' then 'second'."""

    def __init__(self):
        super().__init__()
        self.second = nn.Linear(4, 4)
        self.first = nn.Linear(4, 4)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_a_reports_layers_are_in_call_order():
    net = nn.Sequential(_SwappedBlock(), nn.Linear(4, 2))
    q = insert_act_quantizers(net, None, None, weights=GridSpec(bits=3))
    res = reconstruct(net, q, PAIR_BATCHES, "auto", ReconstructConfig(iterations=2, seed=0))
    assert [b.block for b in res.blocks] == ["0", "1"]
    assert res.blocks[0].layers == ("0.first", "0.second")


class _Flatten(nn.Module):
    """A block that flattens tokens: (N, T, F) in, (N*T, C) out."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(x.reshape(-1, x.shape[-1]))


def test_a_block_that_flattens_its_rows_trains_on_whole_batches():
    net = nn.Sequential(_Flatten())
    batches = [torch.randn(4, 3, 5, generator=gen(i)) for i in range(2)]
    q = insert_act_quantizers(net, None, 4, calib_batches=batches, weights=GridSpec(bits=3))
    res = reconstruct(net, q, batches, "auto", ReconstructConfig(iterations=10, batch_size=2,
                                                                  seed=0))
    assert [b.block for b in res.blocks] == ["0"]
    assert res.blocks[0].loss_after <= res.blocks[0].loss_before


# ------------------------------------------------------------------------------ losses
def test_rec_loss_sums_over_channels_of_nchw_and_over_the_last_axis_otherwise():
    g = gen(5)
    t4, t3 = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, generator=g)
    assert torch.allclose(_rec_loss(torch.zeros_like(t4), t4), (t4 ** 2).sum(1).mean())
    assert torch.allclose(_rec_loss(torch.zeros_like(t3), t3), (t3 ** 2).sum(-1).mean())


def test_rec_loss_follows_the_layout_it_is_given():
    t4 = torch.randn(2, 3, 4, 5, generator=gen(6))
    zero = torch.zeros_like(t4)
    assert torch.allclose(_rec_loss(zero, t4, channels_first=False), (t4 ** 2).sum(-1).mean())
    assert torch.allclose(_rec_loss(zero, t4, channels_first=True), (t4 ** 2).sum(1).mean())


class _SwinMlp(nn.Module):
    """A channels-last block on (B, H, W, C) (Swin's, timm's layout)."""

    def __init__(self, c=6):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _ConvNeXtBlock(nn.Module):
    """NCHW in and out, a depthwise conv, then Linear layers on the channels-last permutation
    (ConvNeXt's block); H = W = C, so every 4-d shape inside is the same."""

    def __init__(self, c=5):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        return x + self.fc2(torch.relu(self.fc1(y))).permute(0, 3, 1, 2)


class _SwinTokens(nn.Module):
    """timm's Swin block: (B, H, W, C) in and out, its MLP on the (B, H*W, C) tokens."""

    def __init__(self, c=6):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x):
        b, h, w, c = x.shape
        t = x.reshape(b, h * w, c)
        return (t + self.fc2(torch.relu(self.fc1(t)))).reshape(b, h, w, c)


class _Unembed(nn.Module):
    """Tokens back to an NCHW image (a ViT decoder's un-patching): the MLP's (B, H*W, C)
    tokens transposed and reshaped to (B, C, H, W)."""

    def __init__(self, c=6):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.fc(x.flatten(2).transpose(1, 2))
        return t.transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_a_channels_last_4d_target_sums_its_loss_over_the_last_axis(loss_layouts, granularity):
    """A 4-d target a Linear gives (a Swin or ConvNeXt MLP's (B, H, W, C)) has its features
    last: summing it over axis 1 (H), as an NCHW conv output, weighed the loss against the
    rounding regulariser by C / H.  A ConvNeXt block's NCHW output keeps the channels, also
    where its Linear outputs have the same shape."""
    seen = loss_layouts
    config = QuantConfig(wbits=3, solver="nearest", granularity=granularity, progress=False,
                         reconstruction=ReconstructConfig(iterations=2, batch_size=2))
    torch.manual_seed(0)
    swin = nn.Sequential(_SwinMlp(), _SwinMlp())
    quantize_model(swin, [torch.randn(4, 3, 3, 6, generator=gen(i)) for i in range(2)], config)
    assert seen == {4: {False}}
    seen.clear()
    convnext = nn.Sequential(_ConvNeXtBlock(), _ConvNeXtBlock())
    quantize_model(convnext, [torch.randn(4, 5, 5, 5, generator=gen(i)) for i in range(2)],
                   config)
    # each block's output (block) and the conv's (layer) are NCHW; the Linears' (layer) last
    assert seen == {4: {None} if granularity == "block" else {None, False}}


def test_a_block_that_reshapes_its_tokens_to_4d_sums_its_loss_over_the_channels(loss_layouts):
    """A Swin block whose MLP runs on (B, H*W, C) tokens and which reshapes them to
    (B, H, W, C) has a channels-last target, as does one whose Linears give 4-d outputs; a
    block that reshapes the tokens to an NCHW image keeps NCHW (W != C here)."""
    seen = loss_layouts
    config = QuantConfig(wbits=3, solver="nearest", granularity="block", progress=False,
                         reconstruction=ReconstructConfig(iterations=2, batch_size=2))
    torch.manual_seed(0)
    swin = nn.Sequential(_SwinTokens(), _SwinTokens())
    quantize_model(swin, [torch.randn(4, 3, 4, 6, generator=gen(i)) for i in range(2)], config)
    assert seen == {4: {False}}
    seen.clear()
    unembed = nn.Sequential(_Unembed(), _Unembed())
    quantize_model(unembed, [torch.randn(4, 6, 3, 4, generator=gen(i)) for i in range(2)],
                   config)
    assert seen == {4: {None}}


def test_rec_loss_with_a_token_mask_averages_over_the_real_tokens_only():
    target = torch.randn(2, 3, 4, generator=gen(6))
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    per_token = (target ** 2).sum(-1)
    want = (per_token[0, 0] + per_token[0, 1] + per_token[1, 2]) / 3
    assert torch.allclose(_rec_loss(torch.zeros_like(target), target, mask), want)


def test_mse_with_a_token_mask_is_per_element_of_the_real_tokens():
    g = gen(7)
    x, y = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    mask = torch.tensor([[True, True, False], [False, False, True]])
    data = _BlockData([((x,), {})], [y], [mask])
    err = ((x - y) ** 2)[mask]   # (3 real tokens, 4 features)
    assert _mse(nn.Identity(), data, "id") == pytest.approx(float(err.mean()), rel=1e-6)


def test_main_tensor_skips_integer_tensors():
    ids, h = torch.arange(6).reshape(2, 3), torch.randn(2, 3, 4)
    assert _main_tensor({"input_ids": ids, "hidden": h}, "m") is h
    assert _main_tensor((ids, h), "m") is h


def test_check_cache_names_the_unit_that_needs_most():
    need = {"a": 3 * 2 ** 20, "b": 5 * 2 ** 20, "c": 10}
    with pytest.raises(QroundError, match=r"unit 'b' would cache 5 MB .*\(2 of 3 units"):
        check_cache(need, 1.0, 2)
    check_cache(need, 5.0, 2)   # at the bound: accepted


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("flag", ["train_weights", "train_steps", "train_borders"])
def test_a_training_flag_off_keeps_that_kind_of_parameter(flag):
    net = TinyResNet()
    q = quant_model(net)
    res = reconstruct(net, q, BATCHES, config=dataclasses.replace(FAST, **{flag: False}))
    assert not any(b.reverted for b in res.blocks if b.block == "block")

    def kind(model, which):
        out = []
        for m in quantized_layers(model).values():
            if which == "train_weights":
                out.append(m.w_codes)
            elif which == "train_steps":
                out.append(m.act.step)
            else:
                out += [p for p in (m.act.b0, m.act.b1, m.act.b2) if p is not None]
        return out

    for which in ("train_weights", "train_steps", "train_borders"):
        same = all(torch.equal(a, b) for a, b in zip(kind(res.model, which), kind(q, which)))
        # the kind switched off is as it started; the others were trained
        assert same == (which == flag), which


def test_nothing_to_train_runs_no_step_and_changes_nothing(caplog):
    net = TinyResNet()
    q = quant_model(net)
    cfg = dataclasses.replace(FAST, train_weights=False, train_steps=False, train_borders=False)
    with caplog.at_level("WARNING", logger="qround"):
        res = reconstruct(net, q, BATCHES, config=cfg)
    # it ran without comment (helper-166)
    assert "block reconstruction trained nothing" in caplog.text
    assert [b.iterations for b in res.blocks] == [0, 0, 0]
    assert all(b.loss_after == b.loss_before and not b.reverted for b in res.blocks)
    assert _same_state(res.model, q)


def test_each_parameter_kind_gets_its_own_learning_rate(monkeypatch):
    seen = []

    class Spy(torch.optim.Adam):
        def __init__(self, groups, *args, **kwargs):
            super().__init__(groups, *args, **kwargs)
            seen.append([({id(p) for p in g["params"]}, g["lr"]) for g in self.param_groups])

    monkeypatch.setattr(torch.optim, "Adam", Spy)
    net = TinyResNet()
    q = quant_model(net)
    cfg = dataclasses.replace(FAST, iterations=2, lr_rounding=0.011, lr_step=0.0021,
                              lr_border=0.0031)
    reconstruct(net, q, BATCHES, ["block"], cfg, inplace=True)
    assert len(seen) == 3   # stem, block, head.1
    layers = [q.block.conv1, q.block.conv2]
    kinds = {0.011: {id(m.w_round) for m in layers},
             0.0021: {id(m.act.step) for m in layers},
             0.0031: {id(p) for m in layers for p in (m.act.b0, m.act.b1, m.act.b2)
                      if p is not None}}
    groups = seen[1]
    assert sorted(lr for _, lr in groups) == sorted(kinds)
    for params, lr in groups:
        assert params == kinds[lr], lr


def test_qdrop_acts_while_training_only_and_is_reset():
    net = TinyResNet()
    q = quant_model(net)
    seen: dict[bool, set] = {True: set(), False: set()}

    def hook(module, args):
        seen[torch.is_grad_enabled()].add(module.qdrop_p)

    for m in quantized_layers(q).values():
        m.register_forward_pre_hook(hook)
    reconstruct(net, q, BATCHES, config=dataclasses.replace(FAST, iterations=3, qdrop=0.3),
                inplace=True)
    assert seen[True] == {0.3}
    assert seen[False] == {0.0}
    assert all(m.qdrop_p == 0.0 and m.qdrop_generator is None
               for m in quantized_layers(q).values())


def test_a_unit_made_worse_is_restored_to_its_initial_state():
    net = TinyResNet()
    q = quant_model(net)
    # one huge Adam step: every unit ends worse than it started
    cfg = ReconstructConfig(iterations=3, batch_size=8, lr_rounding=100.0, lr_step=10.0,
                            lr_border=10.0, seed=0)
    res = reconstruct(net, q, BATCHES, config=cfg)
    assert all(b.reverted and b.loss_after == b.loss_before for b in res.blocks)
    # what training reached stays visible (helper-166: the table hid it)
    assert all(b.loss_trained > b.loss_before for b in res.blocks)
    assert f"yes (trained {res.blocks[0].loss_trained:.4g})" in res.table()
    assert _same_state(res.model, q)
    assert all(m.weight_mode == "hard" for m in quantized_layers(res.model).values())


def test_inplace_reconstructs_the_given_model():
    net = TinyResNet()
    q = quant_model(net)
    before = copy.deepcopy(q)
    res = reconstruct(net, q, BATCHES, config=dataclasses.replace(FAST, iterations=20),
                      inplace=True)
    assert res.model is q
    assert not _same_state(q, before)
    res2 = reconstruct(net, before, BATCHES, config=dataclasses.replace(FAST, iterations=20))
    assert res2.model is not before and _same_state(res2.model, q)


def test_target_power_is_the_mean_square_of_the_float_output():
    net = TinyResNet()
    q = quant_model(net)
    outs = []
    h = net.block.register_forward_hook(lambda m, a, out: outs.append(out.detach()))
    with torch.no_grad():
        for b in BATCHES:
            net(b)
    h.remove()
    y = torch.cat(outs).double()
    res = reconstruct(net, q, BATCHES, config=dataclasses.replace(FAST, iterations=2))
    block = res.blocks[1]
    assert block.block == "block"
    assert block.target_power == pytest.approx(float((y ** 2).mean()), rel=1e-6)
    assert block.relative_loss == pytest.approx(block.loss_after / float((y ** 2).mean()))


def test_a_forward_that_catches_exceptions_does_not_swallow_the_capture():
    def tolerant(model, batch):
        try:
            return model(batch)
        except Exception:   # e.g. a forward that skips batches a model cannot take
            return None

    net = TinyResNet()
    q = quant_model(net)
    cfg = dataclasses.replace(FAST, iterations=5)
    a = reconstruct(net, q, BATCHES, config=cfg, forward=tolerant)
    b = reconstruct(net, q, BATCHES, config=cfg)
    assert [r.block for r in a.blocks] == ["stem", "block", "head.1"]
    assert _same_state(a.model, b.model)


def test_a_tensor_as_calibration_is_refused():
    net = TinyResNet()
    q = quant_model(net)
    with pytest.raises(QroundError, match="wrap a tensor in a list"):
        reconstruct(net, q, BATCHES[0], config=FAST)
    with pytest.raises(QroundError, match="wrap a tensor in a list"):
        plan_units(net, q, BATCHES[0])


class _Cache:
    """Looks like transformers' Cache API: grows on every call of a layer."""

    def __init__(self):
        self.length = 0

    def get_seq_length(self):
        return self.length

    def update(self, *args):
        self.length += 1


class _CachedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, past=None):
        if past is not None:
            past.update()
        return self.fc(x)


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_CachedLayer()])

    def forward(self, x):
        cache = _Cache()
        for layer in self.layers:
            x = layer(x, past=cache)
        return x


def test_a_block_called_with_a_key_value_cache_is_refused():
    net = _Decoder()
    q = insert_act_quantizers(net, None, None, weights=GridSpec(bits=3))
    with pytest.raises(QroundError, match=r"'layers\.0' is called with a key-value cache "
                                          r"\(_Cache\)"):
        reconstruct(net, q, PAIR_BATCHES, "auto", ReconstructConfig(iterations=2, seed=0))


def test_rows_of_flattened_tokens_count_only_the_real_tokens():
    from qround.calibrate import token_mask

    g = gen(8)
    batches = []
    for i in range(2):
        x = torch.randn(4, 3, 5, generator=g)
        mask = torch.ones(4, 3, dtype=torch.bool)
        mask[:, 2] = False
        x[~mask] = 40.0   # padding: far from what the steps were fitted on
        batches.append((x, mask))

    def forward(model, batch):
        x, mask = batch
        with token_mask(mask):
            return model(x)

    net = nn.Sequential(_Flatten())
    q = insert_act_quantizers(net, None, 3, calib_batches=batches, weights=GridSpec(bits=2),
                              forward=forward)
    with torch.no_grad():
        err = [((q(x) - net(x)) ** 2)[mask.reshape(-1)] for x, mask in batches]
        everything = torch.cat([((q(x) - net(x)) ** 2) for x, _ in batches]).mean()
    want = float(torch.cat(err).mean())
    assert want < 0.5 * float(everything)   # the padded rows would dominate
    res = reconstruct(net, q, batches, "auto", ReconstructConfig(iterations=2, seed=0),
                      forward=forward)
    assert res.blocks[0].loss_before == pytest.approx(want, rel=1e-4)


# ------------------------------------------------------------------------------ routed units
class _Routed(nn.Module):
    """``b`` runs on a batch whose mean first feature is above ``threshold`` (a router, as a
    mixture's experts); the threshold is a plain attribute, so a copy can route differently."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.threshold = 0.0

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x[:, 0].mean() > self.threshold:
            h = torch.relu(self.b(h))
        return self.out(h)


def _routed_batches():
    batches = [torch.randn(16, 4, generator=gen(20 + i)) for i in range(3)]
    batches[0][:, 0], batches[1][:, 0], batches[2][:, 0] = -1.0, 1.0, 2.0
    return batches      # the first batch skips b, the others reach it


def test_a_unit_the_first_batch_skips_is_ordered_and_trained_on_the_batches_that_reach_it():
    net, batches = _Routed(), _routed_batches()
    q = insert_act_quantizers(net, None, 3, calib_batches=batches,
                              weights=GridSpec(bits=2, symmetric=False))
    assert plan_units(net, q, batches, None) == [Unit(("a",)), Unit(("b",)), Unit(("out",))]
    result = reconstruct(net, q, batches, None, FAST)
    assert [r.block for r in result.blocks] == ["a", "b", "out"]
    b = result.blocks[1]
    assert b.iterations == FAST.iterations
    # its target power is that of b's float output on the two batches that reach it
    with torch.no_grad():
        y = torch.cat([net.b(torch.relu(net.a(x))) for x in batches[1:]])
    assert b.target_power == pytest.approx(float((y.double() ** 2).mean()), rel=1e-5)


def test_a_unit_no_batch_calls_is_named_before_any_training():
    net, batches = _Routed(), _routed_batches()
    q = insert_act_quantizers(net, None, 3, calib_batches=batches,
                              weights=GridSpec(bits=2, symmetric=False))
    q.threshold = 10.0      # the quantised copy never calls b
    with pytest.raises(QroundError, match=r"\['b'\] are not called by the model's forward on "
                                          "any calibration batch"):
        reconstruct(net, q, batches, None, FAST)


def test_batches_that_call_a_unit_in_one_model_only_are_left_out_with_a_warning(caplog):
    net, batches = _Routed(), _routed_batches()
    q = insert_act_quantizers(net, None, 3, calib_batches=batches,
                              weights=GridSpec(bits=2, symmetric=False))
    q.threshold = -10.0     # the quantised copy calls b on batch 0 too, the float model not
    with caplog.at_level("WARNING", logger="qround.reconstruct"):
        result = reconstruct(net, q, batches, None, FAST)
    assert "block b: calibration batches [0] call it in only one" in caplog.text
    with torch.no_grad():
        y = torch.cat([net.b(torch.relu(net.a(x))) for x in batches[1:]])
    assert result.blocks[1].target_power == pytest.approx(float((y.double() ** 2).mean()),
                                                          rel=1e-5)
    net.threshold = 10.0    # now the float model calls b on no batch at all
    with pytest.raises(QroundError, match="block 'b' was not called by the float model's "
                                          "forward on any calibration batch that the other"):
        reconstruct(net, q, batches, None, FAST)


def test_a_late_module_is_ordered_by_every_batch_not_the_first_that_calls_it():
    """d, first reached by a batch that skips c, was placed before c: the scheme unit c+d
    became d+c, trained on c's output (d's rounding unseen), and a+c was refused as not
    consecutive (found by helper-137)."""
    from .test_pipeline_machinery import Skips, _skips_batches

    batches, net = _skips_batches(), Skips()   # c only, d only, then c and d
    q = insert_act_quantizers(net, None, 3, calib_batches=batches,
                              weights=GridSpec(bits=2, symmetric=False))
    assert [u.name for u in plan_units(net, q, batches, None)] == ["a", "c", "d", "out"]
    assert plan_units(net, q, batches, [["d", "c"]])[1] == Unit(("c", "d"))
    assert plan_units(net, q, batches, [["a", "c"]])[0] == Unit(("a", "c"))


def test_a_joint_unit_whose_last_module_a_batch_skips_trains_without_a_routing_warning(
        caplog):
    """The input of a+b is taken at the model (called on every batch), its target at b: a batch
    that skips b in both models was reported as routing that depends on the weights."""
    net, batches = _Routed(), _routed_batches()
    q = insert_act_quantizers(net, None, 3, calib_batches=batches,
                              weights=GridSpec(bits=2, symmetric=False))
    with caplog.at_level("WARNING", logger="qround.reconstruct"):
        result = reconstruct(net, q, batches, [["a", "b"]], FAST)
    assert "routing" not in caplog.text
    with torch.no_grad():
        y = torch.cat([net.b(torch.relu(net.a(x))) for x in batches[1:]])
    assert result.blocks[0].target_power == pytest.approx(float((y.double() ** 2).mean()),
                                                          rel=1e-5)


class _InPlaceBlock(nn.Module):
    """``x += b(relu(a(x)))``: the add changes in place the input ``a`` saved for its
    backward (helper-152)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x += self.b(torch.relu(self.a(x)))
        return x


def test_a_block_that_changes_its_input_in_place_gets_an_error_naming_the_fix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), _InPlaceBlock(), nn.Flatten(),
                          nn.Linear(512, 10)).eval()
    batches = [torch.randn(16, 1, 8, 8, generator=gen(i)) for i in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = QuantConfig(wbits=4, progress=False, solver="nearest",
                         reconstruction=ReconstructConfig(iterations=3, batch_size=4))
    with pytest.raises(QroundError, match=r"unit '1'.*changes in place.*x = x \+ f\(x\).*"
                                          r"granularity='layer'"):
        quantize_model(model, batches, config)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the remedy it names works: each layer trains alone
    from dataclasses import replace
    qm = quantize_model(model, batches, replace(config, granularity="layer"))
    assert qm.reconstruction is not None and len(qm.reconstruction.blocks) == 4


# helper-153: layouts that disagree across batches, backward errors
@pytest.mark.parametrize("values, expect", [
    ([False, False], False), ([True, True], True), ([None, None], None),
    ([False, None], None), ([None, False], None), ([True, False], None), ([False, True], None)])
def test_batches_whose_target_layouts_disagree_get_each_shapes_default(values, expect):
    """One layout for the unit's loss only where every batch agrees; any disagreement gives
    None (the shape's default), whatever the order of the batches."""
    assert _one_layout(values) is expect


class _Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("boom from a custom backward")


class _BoomBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return _Boom.apply(self.a(x))


def test_a_backward_error_without_a_known_cause_is_raised_as_is():
    """A RuntimeError of the unit's backward that qround does not explain reaches the caller
    unchanged (not swallowed: the training would go on without gradients)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), _BoomBlock(), nn.Flatten(),
                          nn.Linear(512, 10)).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 1, 8, 8, generator=gen) for _ in range(2)]
    config = QuantConfig(wbits=4, progress=False, solver="nearest",
                         reconstruction=ReconstructConfig(iterations=2, batch_size=4))
    with pytest.raises(RuntimeError, match="boom from a custom backward") as info:
        quantize_model(model, batches, config)
    assert not isinstance(info.value, QroundError)


def test_a_backward_error_of_another_kind_is_re_raised_unchanged():
    other = RuntimeError("something else")
    with pytest.raises(RuntimeError) as info:
        _backward_error(other, "blk")
    assert info.value is other


def test_find_blocks_takes_mobilenet_and_efficientnet_blocks_by_class_name():
    """MobileNetV2's InvertedResidual and EfficientNet's MBConv / FusedMBConv are blocks, as
    ResNet's BasicBlock is: the digits MobileNet's blocks are units of their own."""
    from qround.reconstruct import find_blocks
    from qround.zoo import DigitsMobileNet
    torch.manual_seed(0)
    model = DigitsMobileNet(seed=0).eval()
    q = insert_act_quantizers(model, None, 8, calib_batches=[torch.randn(4, 1, 16, 16)],
                              weights=GridSpec(bits=4))
    assert find_blocks(q) == ["stem", "block1", "block2", "block3", "block4", "head", "fc"]

    class MBConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    FusedMBConv = type("FusedMBConv", (MBConv,), {})
    net = nn.Module()
    net.one, net.two, net.head = MBConv(), FusedMBConv(), nn.Linear(6, 2)
    net.forward = lambda x: net.head(net.two(net.one(x)))
    q = insert_act_quantizers(net, None, 8, calib_batches=[torch.randn(4, 6)],
                              weights=GridSpec(bits=4))
    assert find_blocks(q) == ["one", "two", "head"]
    # a generic x + fn(x) wrapper named ...Residual is not a block (helper-154): here it wraps
    # half of a layer, which stays one unit as a child of the Sequential
    Residual = type("Residual", (MBConv,), {})
    half = nn.Sequential(nn.Sequential(Residual(), nn.Linear(6, 6)), nn.Linear(6, 2))
    q = insert_act_quantizers(half, None, 8, calib_batches=[torch.randn(4, 6)],
                              weights=GridSpec(bits=4))
    assert find_blocks(q) == ["0", "1"]
