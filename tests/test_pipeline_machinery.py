"""quantize_model's model-level machinery: which tensor counts as a shared input (_trace), how
a layer's several calls are captured and paired (_stream), Fisher with bias correction
(_capture), the bias bias correction creates (_correct_bias), shape checks of paired inputs,
and the forwards the checks run on the caller's model (_called)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qround import QroundError
from qround.calibrate import capture_hessians
from qround.grid import Grid
from qround.pipeline import QuantConfig, quantize_model
from qround.problems import problems_from_layer
from qround.writeback import apply_to_layer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def fill(model, seed, std=0.4):
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def data(shape, n=3, seed=1):
    g = gen(seed)
    return [torch.randn(shape, generator=g) + 0.3 for _ in range(n)]


def layer_grid(qw, n):
    return Grid(np.array(qw.scale), np.array(qw.zero_point), qw.bits, qw.symmetric,
                qw.group_size, n)


def rtn_cost(module, hessian, qw):
    """The RTN cost of a layer on the given statistics, on the layer's own grid."""
    problems = problems_from_layer(module, hessian, layer_grid(qw, qw.codes.shape[1]), "x")
    return float(sum(p.rtn_costs().sum() for p in problems))


def inputs_of(model, name, batches):
    """Every input row module ``name`` sees on the batches (all its calls), float64."""
    seen = []
    handle = dict(model.named_modules())[name].register_forward_hook(
        lambda m, args, out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        handle.remove()
    return torch.cat(seen).double()


# ---------------------------------------------------------------------- shared inputs (_trace)
class InPlaceBetween(nn.Module):
    """Two heads with the same weights read the same tensor object, changed in place (x2)
    between the two calls: head_b's input is 2 h, not h."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.head_a, self.head_b = nn.Linear(8, 8), nn.Linear(8, 8)
        fill(self, 0)
        self.head_b.load_state_dict(self.head_a.state_dict())

    def forward(self, x):
        h = F.relu(self.inp(x))
        a = self.head_a(h)
        h.mul_(2.0)
        return a + self.head_b(h)


def test_an_input_changed_in_place_between_two_layers_is_not_shared():
    model, batches = InPlaceBetween(), data((16, 6))
    qm = quantize_model(model, batches, QuantConfig(wbits=3, inputs="float", solver="nearest",
                                                    progress=False))
    rows = {r.layer: r for r in qm.report}
    # same weights, same grid, the same rounding: the input twice as large costs 4x
    np.testing.assert_array_equal(qm.layers["head_a"].codes, qm.layers["head_b"].codes)
    assert rows["head_b"].rtn_cost == pytest.approx(4 * rows["head_a"].rtn_cost, rel=1e-6)


class CalledTwiceSharing(nn.Module):
    """head_b's first call reads head_a's input; it is called a second time on head_a's output."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.head_a, self.head_b = nn.Linear(8, 8), nn.Linear(8, 8)
        fill(self, 3)

    def forward(self, x):
        h = F.relu(self.inp(x))
        a = F.relu(self.head_a(h))
        return self.head_b(h) + self.head_b(a)


def test_a_layer_called_twice_is_captured_on_all_its_calls_even_when_its_first_shares():
    model, batches = CalledTwiceSharing(), data((16, 6))
    qm = quantize_model(model, batches, QuantConfig(wbits=3, inputs="float", solver="nearest",
                                                    progress=False))
    x = inputs_of(model, "head_b", batches)
    assert x.shape[0] == 2 * 48
    h = (x.T @ x / x.shape[0]).numpy()
    row = {r.layer: r for r in qm.report}["head_b"]
    assert row.rtn_cost == pytest.approx(rtn_cost(model.head_b, h, qm.layers["head_b"]),
                                         rel=1e-6)


# ---------------------------------------------------------------- calls of one layer (_stream)
class Reused(nn.Module):
    """first -> the same square layer applied twice (an unrolled loop)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.cell = nn.Linear(8, 8)
        fill(self, 5)

    def forward(self, x):
        h = F.relu(self.first(x))
        h = F.relu(self.cell(h))
        return self.cell(h)


def test_asymmetric_pairs_the_calls_of_a_reused_layer_in_call_order():
    """Report cost == E||W x_i - W_hat x_hat_i||^2 over every call i: the float input of a
    call is paired with the quantised input of the same call, not of another (x_hat: the
    inputs in the model with only `first` rounded, as when `cell` was captured)."""
    model, batches = Reused(), data((16, 6))
    qm = quantize_model(model, batches, QuantConfig(wbits=2, inputs="asymmetric", solver="nearest",
                                                    progress=False))
    partial = copy.deepcopy(model)
    apply_to_layer(partial.first, qm.layers["first"], inplace=True)
    x = inputs_of(model, "cell", batches)
    x_hat = inputs_of(partial, "cell", batches)
    w = model.cell.weight.detach().double()
    w_hat = torch.as_tensor(qm.layers["cell"].dequantized)
    measured = ((x @ w.T - x_hat @ w_hat.T) ** 2).sum(1).mean().item()
    row = {r.layer: r for r in qm.report}["cell"]
    assert row.cost == pytest.approx(measured, rel=1e-6)


class Loop(nn.Module):
    """first -> cell applied once per 8 rows of the batch: 1 call on a batch of 8, 2 on 16."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.cell = nn.Linear(8, 8)
        fill(self, 7)

    def forward(self, x):
        h = F.relu(self.first(x))
        for _ in range(x.shape[0] // 8):
            h = F.relu(self.cell(h))
        return h


def test_a_layer_called_more_often_on_a_later_batch_is_captured_on_every_call():
    g = gen(2)
    batches = [torch.randn(8, 6, generator=g), torch.randn(16, 6, generator=g)]
    model = Loop()
    qm = quantize_model(model, batches, QuantConfig(wbits=2, inputs="quantized", solver="nearest",
                                                    progress=False))
    partial = copy.deepcopy(model)
    apply_to_layer(partial.first, qm.layers["first"], inplace=True)
    x = inputs_of(partial, "cell", batches)
    assert x.shape[0] == 8 + 2 * 16
    h = (x.T @ x / x.shape[0]).numpy()
    row = {r.layer: r for r in qm.report}["cell"]
    assert row.rtn_cost == pytest.approx(rtn_cost(model.cell, h, qm.layers["cell"]), rel=1e-6)
    ref = capture_hessians(partial, batches, ["cell"])["cell"]
    assert row.rtn_cost == pytest.approx(rtn_cost(model.cell, ref, qm.layers["cell"]), rel=1e-6)


class Routed(nn.Module):
    """An expert reached by the rows whose first feature is positive (a router): rounding
    `gate` changes how many rows reach `expert`."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(6, 8)
        self.expert = nn.Linear(8, 4)
        fill(self, 11)

    def forward(self, x):
        h = self.gate(x)
        return self.expert(h[h[:, 0] > 0])


def test_asymmetric_refuses_float_and_quantised_inputs_of_different_shapes():
    model = Routed()
    g = gen(4)
    batches = [torch.randn(64, 6, generator=g) for _ in range(2)]
    qm = quantize_model(model, batches, QuantConfig(wbits=2, inputs="float", solver="nearest",
                                                    layers="gate", progress=False))
    with torch.no_grad():   # the routing really differs once `gate` is rounded
        assert any(int((model.gate(b)[:, 0] > 0).sum()) != int((qm.model.gate(b)[:, 0] > 0).sum())
                   for b in batches)
    with pytest.raises(QroundError, match="'expert'.*differ in shape"):
        quantize_model(model, batches, QuantConfig(wbits=2, inputs="asymmetric",
                                                   solver="nearest", progress=False))


# ------------------------------------------------------------- Fisher and bias correction
class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.head_a, self.head_b = nn.Linear(8, 4), nn.Linear(8, 4)
        fill(self, 13)

    def forward(self, x):
        h = F.relu(self.inp(x))
        return torch.cat([self.head_a(h), self.head_b(h)], -1)


def test_fisher_with_bias_correction_keeps_each_layers_own_fisher_blocks():
    """Bias correction adds means to the Fisher statistics; the heads sharing an input keep
    their own Fisher blocks (the same rounding problems as without bias correction)."""
    model, batches = Heads(), data((16, 6))
    loss = lambda out, batch: (out ** 2).sum()   # noqa: E731
    runs = {bc: quantize_model(model, batches, QuantConfig(
        wbits=3, statistics="fisher", inputs="float", solver="nearest", bias_correction=bc,
        progress=False), loss_fn=loss) for bc in (False, True)}
    plain, corrected = ({r.layer: r for r in runs[bc].report} for bc in (False, True))
    assert plain["head_a"].rtn_cost != pytest.approx(plain["head_b"].rtn_cost, rel=1e-3)
    for name in ("inp", "head_a", "head_b"):
        assert corrected[name].rtn_cost == pytest.approx(plain[name].rtn_cost, rel=1e-9)


# ------------------------------------------------------------- the bias it creates
def test_bias_correction_creates_a_bias_of_the_layers_dtype():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3, bias=False))
    fill(model, 17)
    model = model.double()
    batches = [b.double() for b in data((16, 6))]
    qm = quantize_model(model, batches, QuantConfig(wbits=2, solver="nearest",
                                                    bias_correction=True, progress=False))
    bias = qm.model[2].bias
    assert bias is not None and bias.dtype == torch.float64 and model[2].bias is None
    with torch.no_grad():
        out = qm.model(batches[0])
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


# ------------------------------------------------------------- forwards on the caller's model
transformers = pytest.importorskip("transformers", reason="needs transformers (examples extra)")
Conv1D = transformers.pytorch_utils.Conv1D


class ConvBN(nn.Module):
    """A GPT-2 Conv1D before a BatchNorm: its running statistics move on a forward in train
    mode."""

    def __init__(self):
        super().__init__()
        self.proj = Conv1D(8, 6)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)
        fill(self, 19)
        with torch.no_grad():
            self.bn.weight.fill_(1.0)
            self.bn.bias.zero_()

    def forward(self, x):
        return self.out(F.relu(self.bn(self.proj(x))))


@pytest.mark.parametrize("rows", [16, 1])
def test_a_conv1d_model_in_train_mode_keeps_its_buffers_and_runs_in_eval_mode(rows):
    """Every forward runs in eval mode, the one that finds the called Conv1D layers included:
    in train mode a BatchNorm would refuse batches of one sample."""
    model = ConvBN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qm = quantize_model(model, data((rows, 6)), QuantConfig(wbits=3, solver="nearest",
                                                            progress=False))
    assert set(qm.layers) == {"proj", "out"} and model.training
    assert type(qm.model.proj) is Conv1D
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


# ------------------------------------------------------------- experts
class NeverRouted(nn.Module):
    """`expert` is called on every batch, always with no rows (no token routed to it)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(6, 8)
        self.expert = nn.Linear(8, 8)
        fill(self, 23)

    def forward(self, x):
        h = self.gate(x)
        return h.index_add(0, torch.zeros(0, dtype=torch.long), self.expert(h[:0]))


def test_every_chosen_layer_with_only_empty_inputs_is_an_error():
    model, batches = NeverRouted(), data((16, 6))
    qm = quantize_model(model, batches, QuantConfig(wbits=3, solver="nearest", progress=False))
    assert list(qm.layers) == ["gate"] and "empty inputs" in qm.skipped["expert"]
    with pytest.raises(QroundError, match="no chosen layer received a non-empty input.*'expert'"):
        quantize_model(model, batches, QuantConfig(wbits=3, solver="nearest", layers="expert",
                                                   progress=False))


class SkipsUnreached(nn.Module):
    """A router over two experts that skips an expert no row reaches (the loop over the
    experts hit, as in many MoE implementations)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(6, 16)
        self.e0, self.e1 = nn.Linear(16, 4), nn.Linear(16, 4)
        fill(self, 29)

    def forward(self, x):
        h = self.gate(x)
        out = [e(h[m]) for e, m in ((self.e0, h[:, 0] > 0), (self.e1, h[:, 0] <= 0)) if m.any()]
        return torch.cat(out)


def _late_expert_batches(model):
    g = gen(3)
    first = torch.randn(32, 6, generator=g)
    with torch.no_grad():
        first = first[model.gate(first)[:, 0] > 0]      # every row of batch 0 goes to e0
    batches = [first, torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)]
    with torch.no_grad():
        assert all((model.gate(b)[:, 0] <= 0).any() for b in batches[1:])   # e1 is reached
    return batches


@pytest.mark.parametrize("options", [dict(inputs="float"),
                                     dict(inputs="float", capture_cache_mb=0),
                                     dict(inputs="float", bias_correction=True),
                                     dict()])    # the quantised copy's inputs
def test_an_expert_reached_only_on_later_batches_is_rounded(options):
    """The plan is traced on the first batch; an expert first reached on a later one was left
    in float as 'never called'.  It is rounded on the rows that reach it, in call order."""
    model = SkipsUnreached()
    batches = _late_expert_batches(model)
    qm = quantize_model(model, batches, QuantConfig(wbits=3, solver="greedy", progress=False,
                                                    **options))
    assert list(qm.layers) == ["gate", "e0", "e1"] and not qm.skipped
    assert [r.layer for r in qm.report] == ["gate", "e0", "e1"]
    e1 = dict(model.named_modules())["e1"]
    x = inputs_of(model, "e1", batches)
    row = {r.layer: r for r in qm.report}["e1"]
    if options.get("inputs") == "float":   # the float model's inputs: its E[x x^T]
        h = (x.T @ x / len(x)).numpy()
        if options.get("bias_correction"):      # centred statistics
            mean = x.mean(0)
            h = ((x - mean).T @ (x - mean) / len(x)).numpy()
        assert row.rtn_cost == pytest.approx(rtn_cost(e1, h, qm.layers["e1"]), rel=1e-6)


def test_a_layer_no_batch_calls_stays_in_float_and_is_named():
    model = SkipsUnreached()
    g = gen(4)
    batches = []
    for _ in range(2):
        b = torch.randn(32, 6, generator=g)
        with torch.no_grad():
            batches.append(b[model.gate(b)[:, 0] > 0])
    qm = quantize_model(model, batches, QuantConfig(wbits=3, solver="nearest", progress=False))
    assert list(qm.layers) == ["gate", "e0"]
    assert "never called by the forward on any calibration batch" in qm.skipped["e1"]


def test_gptq_model_rounds_an_expert_first_reached_on_a_later_batch():
    from qround.baselines import gptq_model

    model = SkipsUnreached()
    batches = _late_expert_batches(model)
    quantised, _ = gptq_model(model, batches, QuantConfig(wbits=3, progress=False))
    # it was left in float; now each row takes at most 2**3 values, as on a 3-bit grid
    assert not torch.equal(quantised.e1.weight, model.e1.weight)
    for name in ("e0", "e1"):
        w = getattr(quantised, name).weight.detach()
        assert w.shape[1] > 8 and all(len(row.unique()) <= 8 for row in w)


@pytest.mark.parametrize("order", ["late", "skipped in the middle"])
@pytest.mark.parametrize("granularity", ["layer", "scheme"])
def test_block_reconstruction_trains_an_expert_on_the_batches_that_reach_it(order, granularity):
    """An expert the first batch skips was left in float ("orders its units by the first
    batch"); one a middle batch skips made the reconstruction fail after every solve ("block
    'e1' was not called").  It is trained on the batches that reach it."""
    from qround.reconstruct import ReconstructConfig

    model = SkipsUnreached()
    batches = _late_expert_batches(model)     # batch 0 reaches only e0
    if order != "late":
        batches = [batches[1], batches[0], batches[2]]
    # the router stays in float: its rounding would move rows between the experts
    config = QuantConfig(wbits=2, abits=4, solver="greedy", progress=False, exclude="gate",
                         reconstruction=ReconstructConfig(iterations=300),
                         granularity=granularity,
                         scheme=["e0", "e1"] if granularity == "scheme" else None)
    qm = quantize_model(model, batches, config)
    assert list(qm.layers) == ["e0", "e1"] and set(qm.skipped) == {"gate"}
    rows = {b.block: b for b in qm.reconstruction.blocks}
    assert list(rows) == ["e0", "e1"]
    # e1's loss is measured on the rows that reach it, on the model before its training
    x = inputs_of(model, "e1", batches).float()
    with torch.no_grad():
        want = float(((qm.model.e1(x) - model.e1(x)) ** 2).mean())
    assert rows["e1"].loss_after == pytest.approx(want, rel=1e-4)
    assert rows["e1"].loss_after < rows["e1"].loss_before


class LateBesideFirst(nn.Module):
    """b reads the model's input, as a does, but only when the batch's feature 0 is positive:
    it belongs with the first layer whichever batch comes first."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        fill(self, 31)

    def forward(self, x):
        h = self.a(x)
        if x[:, 0].mean() > 0:
            h = h + self.b(x)
        return self.head(torch.relu(h))


def test_a_late_layer_reading_the_first_layers_input_gets_the_first_layers_bits():
    from qround.baselines import gptq_model

    model, g = LateBesideFirst(), gen(1)
    skips, reaches = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    skips[:, 0], reaches[:, 0] = -1.0, 1.0
    for batches in ([skips, reaches], [reaches, skips]):
        config = QuantConfig(wbits=3, first_last_bits=8, solver="nearest", progress=False)
        qm = quantize_model(model, batches, config)
        assert {r.layer: r.bits for r in qm.report} == {"a": 8, "b": 8, "head": 8}
        quantised, _ = gptq_model(model, batches, config)
        assert max(len(row.unique()) for row in quantised.b.weight.detach()) > 8   # 8 bits


def test_a_later_batch_that_fails_the_forward_is_named():
    model = SkipsUnreached()
    batches = _late_expert_batches(model)
    batches[1] = torch.randn(16, 7)
    with pytest.raises(QroundError, match="failed on calibration batch 1 "):
        quantize_model(model, batches, QuantConfig(wbits=3, solver="nearest", progress=False))


class Windowed(nn.Module):
    """q reads every token; k and v read the last 4 (a sliding-window memory), which is the
    very tensor q reads when the sequence is no longer than 4 (found by helper-138)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(8, 8) for _ in range(4))
        fill(self, 33)

    def forward(self, x):                       # x: (N, T, 8)
        mem = x if x.shape[1] <= 4 else x[:, -4:]
        a = torch.softmax(self.q(x) @ self.k(mem).transpose(1, 2), -1) @ self.v(mem)
        return self.out(a)


@pytest.mark.parametrize("inputs", ["float", "asymmetric"])
def test_a_layer_sharing_an_input_on_the_first_batch_only_gets_its_own_statistics(inputs):
    """Layers reading one input on the first batch shared its capture on every batch: with
    the short batch first, k took q's statistics (every token), not its own (the last 4).
    The first capture pass, which runs every batch whole, now checks the sharing."""
    from qround.baselines import gptq_model

    model, g = Windowed(), gen(5)
    short = torch.randn(16, 4, 8, generator=g)
    long_ = torch.randn(16, 12, 8, generator=g) * torch.linspace(0.2, 3, 12)[None, :, None]
    x = inputs_of(model, "k", [long_, short])
    h = (x.T @ x / len(x)).numpy()
    codes, gptq = [], []
    for batches in ([long_, short], [short, long_]):
        calls = []
        qm = quantize_model(model, batches, QuantConfig(wbits=3, solver="greedy", inputs=inputs,
                                                        progress=False),
                            forward=lambda m, b: calls.append(1) or m(b))
        row = {r.layer: r for r in qm.report}["k"]
        if inputs == "float":
            assert row.rtn_cost == pytest.approx(rtn_cost(model.k, h, qm.layers["k"]), rel=1e-6)
            # the order pass, the capture of every layer, and the capture of k and v alone
            # when the first batch showed them sharing q's input
            assert len(calls) == 1 + 2 * (1 if batches[0] is long_ else 2)
        codes.append(qm.layers["k"].codes)
        gptq.append(gptq_model(model, batches, QuantConfig(wbits=3, progress=False))[0]
                    .k.weight.detach())
    assert np.array_equal(*codes)
    assert torch.allclose(*gptq, atol=1e-6)


class Skips(nn.Module):
    """c runs when the batch's feature 0 is positive, d when feature 1 is: a batch may skip
    either (found by helper-137)."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.d, self.out = (nn.Linear(6, 6) for _ in range(4))
        fill(self, 35)

    def forward(self, x):
        h = self.a(x)
        if x[:, 0].mean() > 0:
            h = self.c(torch.relu(h))
        if x[:, 1].mean() > 0:
            h = self.d(torch.relu(h))
        return self.out(h)


def _skips_batches():
    g = gen(6)
    batches = [torch.randn(16, 6, generator=g) for _ in range(3)]
    for b, (c, d) in zip(batches, ((1.0, -1.0), (-1.0, 1.0), (1.0, 1.0))):
        b[:, 0], b[:, 1] = c, d
    return batches      # c only, d only, then c and d


def test_layers_first_seen_on_later_batches_keep_the_forward_order():
    """d, first reached by a batch that skips c, was put before c (after a, the layer it
    follows there), though c runs before d on the batch that calls both."""
    from qround.baselines import gptq_model

    model = Skips()
    qm = quantize_model(model, _skips_batches(), QuantConfig(wbits=3, solver="nearest",
                                                             first_last_bits=8,
                                                             progress=False))
    assert [r.layer for r in qm.report] == ["a", "c", "d", "out"]
    assert [r.bits for r in qm.report] == [8, 3, 3, 8]
    quantised, _ = gptq_model(model, _skips_batches(), QuantConfig(wbits=3, progress=False))
    assert all(len(row.unique()) <= 8 for n in "acd" for row in getattr(quantised, n).weight)


@pytest.mark.parametrize("late", [True, False])
def test_parallel_experts_in_one_unit_are_refused_whichever_batch_comes_first(late):
    """The check that a joint unit's modules feed its last one ran on the first batch only, and
    passed e0+e1 when that batch skipped e1: e0's rounding was never in the loss (found by
    helpers 137 and 138)."""
    from qround.activations import insert_act_quantizers
    from qround.granularity import select_units
    from qround.grid import GridSpec
    from qround.reconstruct import ReconstructConfig

    model = SkipsUnreached()
    batches = _late_expert_batches(model)     # batch 0 reaches only e0
    if not late:
        batches = [batches[1], batches[0], batches[2]]
    config = QuantConfig(wbits=2, abits=4, solver="nearest", progress=False, exclude="gate",
                         reconstruction=ReconstructConfig(iterations=5),
                         granularity="scheme", scheme=["e0+e1"])
    with pytest.raises(QroundError, match=r"the output of \['e0'\] does not reach 'e1'"):
        quantize_model(model, batches, config)
    # modcap would merge e0 with e1 (fewer bits): the merge is dropped, with a warning
    q = insert_act_quantizers(model, ["e0", "e1"], 4, calib_batches=batches,
                              weights={"e0": GridSpec(bits=4), "e1": GridSpec(bits=2)})
    selection = select_units(model, q, batches, "modcap", base="layer")
    assert [u.name for u in selection.units] == ["e0", "e1"]


def test_loss_search_on_batches_that_miss_a_unit_is_refused_naming_search_batches():
    """The quick pass of granularity='loss' runs on the first search_batches batches: an
    expert only a later one reaches was refused as 'not called by the model's forward (a
    module whose parent calls its children directly...)' (found by helpers 137 and 138)."""
    from qround.activations import insert_act_quantizers
    from qround.granularity import select_units
    from qround.grid import GridSpec

    model = SkipsUnreached()
    batches = _late_expert_batches(model)
    q = insert_act_quantizers(model, ["e0", "e1"], 4, calib_batches=batches,
                              weights=GridSpec(bits=2, symmetric=False))
    with pytest.raises(QroundError, match=r"units \['e1'\] are not called on the first "
                                          "search_batches=1 calibration batches"):
        select_units(model, q, batches, "loss", k=1, base="layer", search_batches=1)
    selection = select_units(model, q, batches, "loss", k=1, base="layer", search_batches=2)
    assert [u.name for u in selection.base_units] == ["e0", "e1"]


def test_rtn_model_with_the_calibration_rounds_an_expert_the_first_batch_skips():
    """With one example batch an expert it does not reach stays in float (documented);
    rtn_model(calibration=...) chooses as quantize_model does (found by helper-138)."""
    from qround.baselines import rtn_model

    model = SkipsUnreached()
    batches = _late_expert_batches(model)
    config = QuantConfig(wbits=3, first_last_bits=8, progress=False)
    quantised, _ = rtn_model(model, config, calibration=batches)
    assert not torch.equal(quantised.e1.weight, model.e1.weight)
    assert max(len(row.unique()) for row in quantised.e1.weight) > 8    # the last: 8 bits
    assert max(len(row.unique()) for row in quantised.e0.weight) <= 8
    quantised, _ = rtn_model(model, config, example=batches[0])
    assert torch.equal(quantised.e1.weight, model.e1.weight)
    with pytest.raises(QroundError, match="example .* or calibration .*, not both"):
        rtn_model(model, config, example=batches[0], calibration=batches)


def test_rtn_model_takes_a_loader_without_a_length_and_refuses_a_one_shot_stream():
    """``batches or [example]`` asked a DataLoader over an IterableDataset for its length (a
    TypeError from torch), and a stream that runs dry after one pass left e1 in float (found
    by helper-139)."""
    from torch.utils.data import DataLoader, IterableDataset

    from qround.baselines import rtn_model

    model = SkipsUnreached()
    batches = _late_expert_batches(model)

    class Batches(IterableDataset):     # re-iterable, no __len__
        def __iter__(self):
            return iter(batches)

    class Stream(IterableDataset):      # one pass only
        def __init__(self):
            self.it = iter(batches)

        def __iter__(self):
            return self.it

    config = QuantConfig(wbits=3, progress=False)
    quantised, _ = rtn_model(model, config,
                             calibration=DataLoader(Batches(), batch_size=None))
    assert max(len(row.unique()) for row in quantised.e1.weight) <= 8
    with pytest.raises(QroundError, match="calibration yielded"):
        rtn_model(model, config, calibration=DataLoader(Stream(), batch_size=None))


class TiedToLate(SkipsUnreached):
    """``spare``, never called and first in module order, holds e1's weight (tied)."""

    def __init__(self):
        super().__init__()
        self.spare = nn.Linear(16, 4)
        self.spare.weight = self.e1.weight
        self._modules = {k: self._modules[k] for k in ("spare", "gate", "e0", "e1")}


def test_a_weight_tied_to_a_late_expert_is_rounded_at_the_expert():
    """The tied weight went to the layer that calls it on the first batch only; an expert
    that batch skips kept it in float (found by helper-138)."""
    from qround.baselines import gptq_model
    from qround.sensitivity import layer_sensitivity

    model = TiedToLate()
    batches = _late_expert_batches(model)
    qm = quantize_model(model, batches, QuantConfig(wbits=3, solver="greedy", progress=False))
    assert list(qm.layers) == ["gate", "e0", "e1"] and "tied" in qm.skipped["spare"]
    assert max(len(row.unique()) for row in qm.model.e1.weight) <= 8
    quantised, _ = gptq_model(model, batches, QuantConfig(wbits=3, progress=False))
    assert max(len(row.unique()) for row in quantised.e1.weight) <= 8
    sens = layer_sensitivity(model, batches, QuantConfig(progress=False), bits=(3,))
    assert [s.name for s in sens.layers] == ["gate", "e0", "e1"]
