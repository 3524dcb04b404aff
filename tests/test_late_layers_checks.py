"""quantize_model's late layers and shared captures across batches (helper-142): a layer
shares its leader's capture only when it reads the leader's input on every batch."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qround.pipeline import QuantConfig, quantize_model

from .test_pipeline_machinery import LateBesideFirst, fill, gen, inputs_of, rtn_cost

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def own_hessian(model, name, batches):
    x = inputs_of(model, name, batches)
    return (x.T @ x / len(x)).numpy()


def assert_rtn_cost_on_own_inputs(qm, model, name, batches):
    """Layer ``name``'s reported RTN cost is the one on its own inputs' statistics."""
    row = {r.layer: r for r in qm.report}[name]
    h = own_hessian(model, name, batches)
    assert row.rtn_cost == pytest.approx(rtn_cost(getattr(model, name), h, qm.layers[name]),
                                         rel=1e-6)


@pytest.mark.parametrize("late_first", [True, False])
def test_a_layer_reading_the_first_layers_input_on_some_batches_gets_its_own_statistics(
        late_first):
    """b reads a's input only on the batches whose feature 0 is positive: it must not take
    a's statistics (every batch), whichever batch comes first."""
    model, g = LateBesideFirst(), gen(1)
    skips, reaches = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    skips[:, 0], reaches[:, 0] = -1.0, 1.0
    skips[:, 1:] *= 3.0        # a's inputs on the batch b skips differ from b's own
    batches = [skips, reaches] if late_first else [reaches, skips]
    qm = quantize_model(model, batches, QuantConfig(wbits=3, solver="greedy", inputs="float",
                                                    progress=False))
    assert_rtn_cost_on_own_inputs(qm, model, "b", batches)


class InPlaceOnLaterBatch(nn.Module):
    """head_b reads head_a's input, changed in place (x2) in between on batches whose feature
    0 is positive: the same tensor object, another version."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.head_a, self.head_b = nn.Linear(8, 8), nn.Linear(8, 8)
        fill(self, 0)

    def forward(self, x):
        h = F.relu(self.inp(x))
        a = self.head_a(h)
        if x[:, 0].mean() > 0:
            h.mul_(2.0)
        return a + self.head_b(h)


def test_an_input_changed_in_place_on_a_later_batch_only_is_not_shared():
    model, g = InPlaceOnLaterBatch(), gen(2)
    batches = [torch.randn(32, 6, generator=g), torch.randn(32, 6, generator=g)]
    batches[0][:, 0], batches[1][:, 0] = -1.0, 1.0      # shared on the first batch only
    qm = quantize_model(model, batches, QuantConfig(wbits=3, solver="greedy", inputs="float",
                                                    progress=False))
    assert_rtn_cost_on_own_inputs(qm, model, "head_b", batches)


class LoopOnLongBatches(nn.Module):
    """q and k read one input on a batch of at most 8 rows; a longer batch runs a second step
    in which k reads 2 x: called twice there, k no longer reads q's input on every call."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        fill(self, 3)

    def forward(self, x):
        out = 0
        for i in range(1 if x.shape[0] <= 8 else 2):
            out = out + self.q(x) + self.k(x if i == 0 else 2 * x)
        return out


def test_a_follower_called_twice_on_a_later_batch_is_captured_on_its_own_inputs():
    model, g = LoopOnLongBatches(), gen(4)
    batches = [torch.randn(8, 8, generator=g), torch.randn(16, 8, generator=g)]
    qm = quantize_model(model, batches, QuantConfig(wbits=3, solver="greedy", inputs="float",
                                                    progress=False))
    assert_rtn_cost_on_own_inputs(qm, model, "k", batches)


class LateConvs(nn.Module):
    """c3 and c1 read one input on the batches whose channel 0 is positive on average: two
    convs of other kernels, so other input vectors."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.c3, self.c1 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 2)
        fill(self, 5)

    def forward(self, x):
        h = self.stem(x)
        if x[:, 0].mean() > 0:
            h = self.c3(h) + self.c1(h)
        return self.head(h.mean((2, 3)))


def test_late_layers_of_other_geometries_reading_one_input_have_their_own_statistics():
    model, g = LateConvs(), gen(6)
    skips, reaches = torch.randn(8, 3, 6, 6, generator=g), torch.randn(8, 3, 6, 6, generator=g)
    skips[:, 0], reaches[:, 0] = -1.0, 1.0
    costs = []
    for batches in ([skips, reaches], [reaches, skips]):    # c1 late, then on the first batch
        qm = quantize_model(model, batches, QuantConfig(wbits=3, solver="greedy",
                                                        progress=False))
        assert [r.layer for r in qm.report] == ["stem", "c3", "c1", "head"]
        costs.append({r.layer: r.rtn_cost for r in qm.report})
    assert costs[0] == pytest.approx(costs[1], rel=1e-6)


class TwoRoutes(nn.Module):
    """On a batch whose feature 0 is positive, l reads a's input (x); on the others it reads
    b's (relu(x)); a and b never run on one batch.  out reads the sum."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.l = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)
        fill(self, 7)

    def forward(self, x):
        if x[:, 0].mean() > 0:
            h = self.a(x) + self.l(x)
        else:
            y = torch.relu(x)
            h = self.b(y) + self.l(y)
        return self.out(h)


def test_a_layer_that_read_the_first_layers_input_on_the_first_batch_gets_the_first_bits():
    """l joins the first group (a's input on batch 0), not the group of b, a late layer whose
    input it reads on batch 1: with first_last_bits it gets the first layer's bits."""
    model, g = TwoRoutes(), gen(8)
    batches = [torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)]
    batches[0][:, 0], batches[1][:, 0] = 1.0, -1.0
    qm = quantize_model(model, batches, QuantConfig(wbits=3, first_last_bits=8,
                                                    solver="nearest", progress=False))
    bits = {r.layer: r.bits for r in qm.report}
    assert set(bits) == {"a", "b", "l", "out"}
    assert bits["a"] == bits["l"] == bits["out"] == 8


def test_a_late_layer_reading_another_input_on_some_batch_leads_from_the_start():
    """b, which the first batch skips, reads a's input on the other batch only: it is its own
    leader in the plan, captured in the first pass with every layer, not in a pass of its own
    after the first capture finds it not sharing (a forward of every batch more)."""
    model, g = LateBesideFirst(), gen(1)
    skips, reaches = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    skips[:, 0], reaches[:, 0] = -1.0, 1.0
    calls = []
    quantize_model(model, [skips, reaches], QuantConfig(wbits=3, solver="greedy",
                                                        inputs="float", progress=False),
                   forward=lambda m, b: calls.append(1) or m(b))
    # the first batch's trace, the later batch's trace, the capture of every layer
    assert len(calls) == 1 + 1 + 2


def Rotating(batches, start):
    """The same batches in another order on every pass (as a shuffling DataLoader), the first
    pass starting at batch ``start``."""
    from .test_prefix_cache import Reshuffled

    loader = Reshuffled(batches)
    loader.passes = start - 1
    return loader


@pytest.mark.parametrize("start", [0, 1, 2])
def test_a_late_layer_is_found_whatever_batch_a_reshuffled_pass_puts_first(start):
    """b is called only by the third batch. Batches that come in another order on every pass
    put it first on the pass that looks for late layers for one of the starts: it was not
    traced there (taken for the first batch, already traced), so b stayed in float as "never
    called"; quantize_model, gptq_model, rtn_model and layer_sensitivity must round it."""
    from qround.baselines import gptq_model, rtn_model
    from qround.sensitivity import layer_sensitivity

    g = gen(1)
    batches = [torch.randn(32, 16, generator=g) for _ in range(3)]
    batches[0][:, 0] = batches[1][:, 0] = -1.0
    batches[2][:, 0] = 1.0
    model = LateBesideFirst()
    config = QuantConfig(wbits=3, solver="nearest", progress=False)
    qm = quantize_model(model, Rotating(batches, start), config)
    assert [r.layer for r in qm.report] == ["a", "b", "head"] and not qm.skipped
    for rounded, _ in (gptq_model(model, Rotating(batches, start), config),
                       rtn_model(model, config, calibration=Rotating(batches, start))):
        assert not torch.equal(rounded.b.weight, model.b.weight)
    sens = layer_sensitivity(model, Rotating(batches, start), config, bits=(3,))
    assert [s.name for s in sens.layers] == ["a", "b", "head"]
