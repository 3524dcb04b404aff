"""Reconstruction granularity (MRECG): units, ModCap and loss merges, joint reconstruction of
units of several modules, the loss-along-depth data and plot, and errors before any work."""
import copy
import json
import logging

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from qround import GridSpec, QroundError, granularity
from qround.activations import insert_act_quantizers, quantized_layers
from qround.granularity import (Selection, Unit, base_units, capacity, loss_along_depth,
                                loss_units, merge_runs, modcap_units, oscillation_points,
                                parse_scheme, plot_losses, reconstruct_with_granularity,
                                select_units)
from qround.reconstruct import ReconstructConfig, plan_units, reconstruct
from qround.zoo.digits import DeepResidualDigitsCNN, ResidualDigitsCNN

from .tiny_models import KwargsNet, gen

torch.set_num_threads(1)
FAST = ReconstructConfig(iterations=40, batch_size=8, lr_rounding=0.05, seed=2)


IMAGES = [torch.randn(12, 1, 16, 16, generator=gen(i)) for i in range(2)]


class Counting(ResidualDigitsCNN):
    """The residual digits CNN (untrained) counting its forward calls."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def quantise(net, batches=IMAGES, wbits=2, abits=4, layers=None):
    return insert_act_quantizers(net, layers, abits, calib_batches=batches,
                                 weights=GridSpec(bits=wbits, symmetric=False))


@pytest.fixture(scope="module")
def residual():
    net = Counting(0)
    return net, quantise(net)


# ------------------------------------------------------------------------------ units
def test_base_units_of_the_residual_digits_cnn(residual):
    _, q = residual
    assert [u.name for u in base_units(q, "layer")] == [
        "stem", "block1.conv1", "block1.conv2", "down", "block2.conv1", "block2.conv2", "fc"]
    assert [u.name for u in base_units(q, "block")] == ["stem", "block1", "down", "block2", "fc"]
    deep_float = DeepResidualDigitsCNN(0)
    assert deep_float(IMAGES[0]).shape == (12, 10)
    deep = quantise(deep_float)
    assert len(base_units(deep, "block")) == 8 and len(base_units(deep, "layer")) == 12


def test_unit_name_and_validation():
    u = Unit(["block1", "down"])
    assert u.modules == ("block1", "down") and u.name == "block1+down"
    assert str(Unit(("",))) == "<model>"
    for bad in ((), "block1", ("a", "a"), ("a", 3)):
        with pytest.raises(QroundError):
            Unit(bad)
    assert parse_scheme("stem, block1+down ,block2") == [
        Unit(("stem",)), Unit(("block1", "down")), Unit(("block2",))]
    assert parse_scheme([["a", "b"], Unit(("c",)), "d+e"]) == [
        Unit(("a", "b")), Unit(("c",)), Unit(("d", "e"))]
    for bad in ("stem,,fc", "stem,fc,", ",stem"):   # were dropped silently (helper-159)
        with pytest.raises(QroundError, match="has an empty unit"):
            parse_scheme(bad)


def test_merge_runs_chains_into_one_run():
    units = [Unit((n,)) for n in "abcde"]
    assert [u.name for u in merge_runs(units, [1, 2, 4])] == ["a+b+c", "d+e"]
    assert merge_runs(units, []) == units
    with pytest.raises(QroundError, match="out of range"):
        merge_runs(units, [0])


# ------------------------------------------------------------------------------ ModCap
def test_capacity_is_weight_parameters_times_weight_bits(residual):
    _, q = residual
    assert capacity(q.block1, None) == 2 * (16 * 16 * 9) * 2
    assert capacity(q.down) == 16 * 32 * 9 * 2
    assert capacity(q.down, wbits=8) == 16 * 32 * 9 * 8
    assert capacity(nn.Linear(5, 3)) == 15 * 32  # float, no QuantizedLayer
    mixed = insert_act_quantizers(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), None, None,
                                  weights={"0": GridSpec(bits=3), "1": None})
    assert capacity(mixed) == 16 * 3 + 8 * 32


def test_modcap_merges_a_module_with_a_smaller_successor():
    # widths give capacities 8*16, 16*4, 4*16, 16*16, 16*2 (x 4 bits): drops at 1 and 4
    net = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(4, 16), nn.Linear(16, 16),
                        nn.Linear(16, 2))
    q = insert_act_quantizers(net, None, None, weights=GridSpec(bits=4))
    units = base_units(q, "layer")
    assert [u.name for u in modcap_units(units, q)] == ["0+1", "2", "3+4"]
    # equal capacities are not merged (Theorem 1's equivalent modules)
    flat = insert_act_quantizers(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), None, None,
                                 weights=GridSpec(bits=4))
    assert len(modcap_units(base_units(flat, "layer"), flat)) == 2
    # a chain of decreasing capacities is one unit
    chain = insert_act_quantizers(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4),
                                                nn.Linear(4, 2)), None, None,
                                  weights=GridSpec(bits=4))
    assert [u.name for u in modcap_units(base_units(chain, "layer"), chain)] == ["0+1+2"]


def test_narrow_deep_digits_cnn_scales_every_width_and_keeps_the_squeeze_merge():
    net = DeepResidualDigitsCNN(0, width=8)
    assert net(IMAGES[0]).shape == (12, 10)
    assert (net.stem.out_channels, net.down.out_channels, net.squeeze.out_channels) == (8, 16, 8)
    assert net.fc.in_features == 8 * 4 * 4
    sel = select_units(net, quantise(net), IMAGES, "modcap", base="block")
    assert [u.name for u in sel.units if len(u.modules) > 1] == ["block4+squeeze"]
    assert sel.capacities[sel.base_units.index(Unit(("squeeze",)))] == 16 * 8 * 2
    with pytest.raises(QroundError, match="width"):
        DeepResidualDigitsCNN(0, width=0)


def test_modcap_on_the_deep_digits_cnn_merges_block4_with_the_squeeze():
    net = DeepResidualDigitsCNN(0)
    q = quantise(net)
    sel = select_units(net, q, IMAGES, "modcap", base="block")
    assert [u.name for u in sel.units if len(u.modules) > 1] == ["block4+squeeze"]
    assert sel.capacities[sel.base_units.index(Unit(("squeeze",)))] == 32 * 16 * 2
    assert "capacity" in sel.table()


# ------------------------------------------------------------------------------ loss
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), max_size=30))
def test_oscillation_points_are_exactly_the_drops(losses):
    points = oscillation_points(losses)
    assert all(losses[i] < losses[i - 1] for i in points)
    others = set(range(1, len(losses))) - set(points)
    assert all(losses[i] >= losses[i - 1] for i in others)
    assert points == sorted(points) and 0 not in points


def test_loss_units_merge_the_k_largest_drops(caplog):
    units = [Unit((n,)) for n in "abcdef"]
    losses = [1.0, 0.5, 2.0, 1.9, 3.0, 1.0]  # drops: b by 0.5, d by 0.1, f by 2.0
    with caplog.at_level(logging.WARNING, logger="qround"):
        assert [u.name for u in loss_units(losses, units, 1)] == ["a", "b", "c", "d", "e+f"]
        assert [u.name for u in loss_units(losses, units, 2)] == ["a+b", "c", "d", "e+f"]
    assert not caplog.records
    # more k than oscillation points: all of them, no error, and a warning says so
    with caplog.at_level(logging.WARNING, logger="qround"):
        assert [u.name for u in loss_units(losses, units, 5)] == ["a+b", "c+d", "e+f"]
    assert "k=5, but the losses along depth have 3 oscillation point(s): merging those 3" \
        in caplog.text
    caplog.clear()
    # none at all: nothing merged, the ideal case of the default k=1, said at INFO only
    with caplog.at_level(logging.INFO, logger="qround"):
        assert loss_units([1.0, 2.0, 3.0], units[:3], 1) == units[:3]
        assert loss_units([1.0, 2.0, 3.0], units[:3], 2) == units[:3]
    assert [r.levelno for r in caplog.records] == [logging.INFO] * 2
    assert "no oscillation point" in caplog.text
    with pytest.raises(QroundError, match=r"k=6 must lie in \[1, 5\]"):
        loss_units(losses, units, 6)
    with pytest.raises(QroundError, match="k=0"):
        loss_units(losses, units, 0)
    with pytest.raises(QroundError, match="finite"):
        oscillation_points([1.0, float("nan")])


def test_loss_selection_runs_a_quick_pass_and_merges_its_oscillations(residual):
    net, q = residual
    state = copy.deepcopy(q.state_dict())
    sel = select_units(net, q, IMAGES, "loss", k=1, base="layer", config=FAST,
                       search_iterations=5)
    assert len(sel.base_losses) == len(sel.base_units) == 7
    points = oscillation_points(sel.base_losses)
    assert len(sel.merges) == min(1, len(points)) and set(sel.merges) <= set(points)
    assert len(sel.units) == 7 - len(sel.merges) and sel.search_seconds > 0
    assert all(torch.equal(v, state[k]) for k, v in q.state_dict().items())
    d = json.loads(json.dumps(sel.as_dict()))
    assert d["units"][0] == ["stem"] and d["oscillation_points"] == points


# ------------------------------------------------------------------------------ joint units
@torch.no_grad()
def _unit_mse(qmodel, fmodel, module, batches):
    outs = {}

    def grab(tag):
        return lambda m, a, out: outs.__setitem__(tag, out)

    total = count = 0
    for x in batches:
        handles = [dict(qmodel.named_modules())[module].register_forward_hook(grab("q")),
                   dict(fmodel.named_modules())[module].register_forward_hook(grab("f"))]
        qmodel(x), fmodel(x)
        for h in handles:
            h.remove()
        total += float(((outs["q"] - outs["f"]) ** 2).sum())
        count += outs["f"].numel()
    return total / count


def test_joint_unit_reduces_its_output_error_and_touches_nothing_else():
    net = ResidualDigitsCNN(0)
    inner = ["stem", "block1.conv1", "block1.conv2", "down"]
    q = quantise(net, layers=inner)  # block2 and fc stay float nn.Conv2d / nn.Linear
    float_state = {k: v.clone() for k, v in q.state_dict().items() if k.startswith(("block2",
                                                                                      "fc"))}
    res = reconstruct(net, q, IMAGES, [("block1", "down")], FAST)
    assert [b.block for b in res.blocks] == ["stem", "block1+down"]
    joint = res.blocks[1]
    assert joint.modules == ("block1", "down")
    assert joint.layers == ("block1.conv1", "block1.conv2", "down")
    assert joint.loss_after < 0.9 * joint.loss_before
    # loss_after is the MSE of the last module's output with the unit's input from the model
    assert joint.loss_after == pytest.approx(_unit_mse(res.model, net, "down", IMAGES), rel=1e-4)
    assert res.losses == [b.loss_after for b in res.blocks]
    assert res.units == [Unit(("stem",)), Unit(("block1", "down"))]
    for k, v in res.model.state_dict().items():
        if k in float_state:
            assert torch.equal(v, float_state[k])
    assert all(p.requires_grad for p in res.model.block2.parameters())  # flags restored
    layers = quantized_layers(res.model)
    assert not torch.equal(layers["down"].w_codes, q.down.w_codes)
    assert not torch.equal(layers["block1.conv1"].act.step, q.block1.conv1.act.step)
    # the stem, inside the unit's LCA (the model) but outside the unit, ends as when it is
    # reconstructed without the joint unit after it
    alone = reconstruct(net, q, IMAGES, ["stem"], FAST)
    sa, sb = alone.model.stem.state_dict(), res.model.stem.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_first_joint_unit_starts_from_the_quantised_models_own_error():
    net = ResidualDigitsCNN(0)
    q = quantise(net)
    res = reconstruct(net, q, IMAGES, [("stem", "block1")], FAST)
    assert res.blocks[0].block == "stem+block1"
    assert res.blocks[0].loss_before == pytest.approx(_unit_mse(q, net, "block1", IMAGES),
                                                      rel=1e-4)
    assert res.blocks[0].loss_after < res.blocks[0].loss_before
    # layers outside the units: alone
    assert [b.block for b in res.blocks] == ["stem+block1", "down", "block2.conv1",
                                             "block2.conv2", "fc"]


def test_joint_transformer_layers_take_their_input_above_the_module_list():
    net = KwargsNet(layers=3)
    batches = [{"x": torch.randn(4, 3, 5, generator=gen(i)),
                "mask": (torch.rand(4, 3, generator=gen(10 + i)) > 0.3).float()}
               for i in range(2)]
    q = insert_act_quantizers(net, None, 4, calib_batches=batches, weights=GridSpec(bits=3))
    res = reconstruct(net, q, batches, ["layer.0", ("layer.1", "layer.2")],
                      ReconstructConfig(iterations=100, seed=1))
    assert [b.block for b in res.blocks] == ["layer.0", "layer.1+layer.2"]
    assert res.blocks[1].loss_after < res.blocks[1].loss_before


# ------------------------------------------------------------------------------ selection
def test_granularities_and_reconstruct_with_granularity(residual):
    net, q = residual
    assert [u.name for u in select_units(net, q, IMAGES, "layer").units][:2] == [
        "stem", "block1.conv1"]
    assert len(select_units(net, q, IMAGES, "block").units) == 5
    sel = select_units(net, q, IMAGES, "scheme", scheme="stem+block1,down+block2")
    assert [u.name for u in sel.units] == ["stem+block1", "down+block2", "fc"]
    res, sel = reconstruct_with_granularity(net, q, IMAGES, "scheme",
                                            scheme=[["block2", "fc"]],
                                            config=ReconstructConfig(iterations=3))
    assert isinstance(sel, Selection) and res.blocks[-1].block == "block2+fc"


@pytest.mark.parametrize("kwargs, match", [
    (dict(granularity="coarse"), "granularity must be"),
    (dict(granularity="scheme", scheme=["block1", "nope"]), "do not exist"),
    (dict(granularity="scheme", scheme=[]), "non-empty"),
    (dict(granularity="scheme"), "non-empty"),
    (dict(granularity="scheme", scheme=["block1", "block1.conv1+down"]), "overlap"),
    (dict(granularity="block", scheme=["block1"]), "granularity='scheme'"),
    (dict(granularity="loss"), "needs k"),
    (dict(granularity="loss", k=5, base="block"), r"k=5 must lie in \[1, 4\]"),
    (dict(granularity="loss", k=0), "k=0"),
    (dict(granularity="modcap", base="stage"), "base must be"),
    (dict(granularity="loss", k=1, metric="l1"), "metric must be"),
    (dict(granularity="modcap", wbits=0), "wbits"),
])
def test_errors_before_any_work(residual, kwargs, match):
    net, q = residual
    net.calls = q.calls = 0
    with pytest.raises(QroundError, match=match):
        select_units(net, q, IMAGES, **kwargs)
    assert net.calls == 0 and q.calls == 0  # no forward ran


def test_units_must_be_consecutive(residual):
    net, q = residual
    with pytest.raises(QroundError, match="not consecutive.*down"):
        plan_units(net, q, IMAGES, [("block1", "block2")])
    with pytest.raises(QroundError, match="not consecutive"):
        reconstruct(net, q, IMAGES, [("stem", "down"), "block1"], FAST)
    # listed out of order: put in forward order
    assert plan_units(net, q, IMAGES, [("down", "block1")])[1] == Unit(("block1", "down"))


# ------------------------------------------------------------------------------ loss along depth
def test_loss_along_depth_and_plot(residual, tmp_path):
    pytest.importorskip("matplotlib", reason="writes a plot: needs matplotlib (examples extra)")
    net, q = residual
    res = reconstruct(net, q, IMAGES, None, ReconstructConfig(iterations=3))
    joint = reconstruct(net, q, IMAGES, [("block1", "down")], ReconstructConfig(iterations=3))
    prof = loss_along_depth(res)
    assert prof["units"][0] == "stem" and len(prof["loss"]) == 7
    assert prof["oscillation"] == oscillation_points(prof["loss"])
    rel = loss_along_depth(res, "relative")
    assert rel["loss"] == pytest.approx([b.relative_loss for b in res.blocks])
    json.dumps(prof)
    path = tmp_path / "loss.png"
    plot_losses({"layer": prof, "block1+down": joint}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    nested = tmp_path / "new" / "x.png"  # missing folders are created, as for every report
    plot_losses({"layer": prof}, str(nested))
    assert nested.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(QroundError, match="loss_along_depth"):
        plot_losses({"layer": {"loss": [1.0]}}, str(path))
    short = dict(prof, loss=prof["loss"][:-1])     # an edited dict: a unit would go missing
    with pytest.raises(QroundError, match="7 units in 'layers' but 6 values in 'loss'"):
        plot_losses({"layer": short}, str(path))
    with pytest.raises(QroundError, match=r"oscillation points \[7\] are not unit indices"):
        plot_losses({"layer": dict(prof, oscillation=[7])}, str(path))
    plot_losses({"layer": dict(prof, oscillation=list(np.flatnonzero([0, 1, 0, 0, 0, 0, 1])))},
                str(path))   # numpy indices, as np.flatnonzero gives


# ------------------------------------------------------------------- joint units that cannot be
class Parallel(nn.Module):
    """Two Linears reading the same input (like q_proj and k_proj), then one on both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(8, 4)
        self.out = nn.Linear(20, 3)

    def forward(self, x):
        return self.out(torch.relu(torch.cat([self.a(x), self.b(x)], -1)))


VECTORS = [torch.randn(16, 8, generator=gen(i)) for i in range(2)]


def test_a_joint_unit_of_parallel_modules_is_refused():
    net = Parallel()
    q = quantise(net, VECTORS)
    with pytest.raises(QroundError, match=r"output of \['a'\] does not reach 'b'"):
        reconstruct(net, q, VECTORS, [("a", "b")], FAST)
    with pytest.raises(QroundError, match="does not reach"):
        plan_units(net, q, VECTORS, [("a", "b")])
    # a unit whose modules feed each other is fine
    assert [u.name for u in plan_units(net, q, VECTORS, [("b", "out")])] == ["a", "b+out"]


def test_modcap_does_not_merge_parallel_modules(caplog):
    net = Parallel()
    q = quantise(net, VECTORS)
    # b has the smaller capacity, so ModCap would join it to a; b's output never reaches a's
    sel = select_units(net, q, VECTORS, "modcap", base="layer")
    assert sel.capacities[1] < sel.capacities[0]
    assert [u.name for u in sel.units] == ["a", "b", "out"] and 1 not in sel.merges
    assert "not merged" in caplog.text


def test_a_scheme_of_parallel_modules_fails_before_any_solve(monkeypatch):
    import qround.pipeline as pipeline
    from qround.pipeline import QuantConfig, quantize_model

    solves = []
    monkeypatch.setattr(pipeline, "_solve_layer",
                        lambda *a, **k: solves.append(1) or pytest.fail("solved"))
    config = QuantConfig(wbits=2, abits=4, solver="greedy", progress=False,
                         reconstruction=FAST, granularity="scheme", scheme=("a+b", "out"))
    with pytest.raises(QroundError, match="does not reach"):
        quantize_model(Parallel(), VECTORS, config)
    assert not solves


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)


class UncalledBlock(nn.Module):
    """A module taken as a block by name whose own forward never runs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 1, 3, padding=1)
        self.block = _Inner()
        self.fc = nn.Linear(2 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.block.conv(self.stem(x))).flatten(1))


_Inner.__name__ = "ConvBlock"  # find_blocks takes class names ending in Block


@pytest.mark.parametrize("granularity,k", [("block", None), ("modcap", None), ("loss", 1)])
def test_an_uncalled_block_is_named_before_any_solve(monkeypatch, granularity, k):
    import qround.pipeline as pipeline
    from qround.pipeline import QuantConfig, quantize_model

    monkeypatch.setattr(pipeline, "_solve_layer", lambda *a, **kw: pytest.fail("solved"))
    config = QuantConfig(wbits=2, abits=4, solver="greedy", progress=False,
                         reconstruction=FAST, granularity=granularity, k=k)
    with pytest.raises(QroundError, match=r"blocks \['block'\] are not called.*granularity='layer'"):
        quantize_model(UncalledBlock(), IMAGES, config)


def test_a_joint_unit_whose_first_module_returns_a_named_tuple_is_not_refused():
    """Outputs the check cannot take apart are not checked (no false refusal)."""
    from collections import namedtuple

    Pair = namedtuple("Pair", "h extra")

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return Pair(torch.relu(self.fc(x)), 0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.head = Head()
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.head(x).h)

    net = Net()
    q = quantise(net, VECTORS)
    assert [u.name for u in plan_units(net, q, VECTORS, [("head", "out")])] == ["head+out"]


def test_capacity_counts_float_layers_beside_quantised_ones():
    """A layer left out of quantisation (not wrapped) inside a unit with quantised layers
    counts at 32 bits, as a module without any quantised layer does."""
    net = ResidualDigitsCNN(0)
    q = insert_act_quantizers(net, ["block1.conv1"], 4, calib_batches=IMAGES,
                              weights=GridSpec(bits=2, symmetric=False))
    assert "block1.conv2" not in quantized_layers(q)
    assert capacity(q.block1) == 16 * 16 * 9 * 2 + 16 * 16 * 9 * 32
    assert capacity(q.block1) > capacity(q.block1.conv2)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(6, 6), nn.Linear(6, 3)
        self.blk = nn.Sequential(nn.Linear(6, 6), nn.ReLU())

    def forward(self, x):
        return self.out(self.blk(-4 * self.blk(self.inp(x))))


def test_a_block_called_twice_is_named_in_a_warning(caplog):
    from qround.reconstruct import _order_units

    net = _Twice()
    batch = torch.randn(4, 6, generator=gen(0))
    with caplog.at_level("WARNING", logger="qround.reconstruct"):
        _order_units(net, [Unit(("inp",)), Unit(("blk",)), Unit(("out",))], batch,
                     lambda m, b: m(b))
    assert "['blk'] are called more than once" in caplog.text
    assert "first call" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="qround.reconstruct"):
        _order_units(net, [Unit(("inp",)), Unit(("out",))], batch, lambda m, b: m(b))
    assert caplog.text == ""


def test_loss_granularity_on_a_model_with_one_block_says_so():
    from qround.pipeline import QuantConfig, quantize_model

    net = nn.Linear(6, 3)
    config = QuantConfig(wbits=4, abits=8, solver="nearest", granularity="loss",
                         reconstruction=ReconstructConfig(iterations=2), progress=False)
    with pytest.raises(QroundError, match="the model has 1, so there is nothing to merge"):
        quantize_model(net, [torch.randn(4, 6, generator=gen(0))], config)


# ------------------------------------------------ found by mutation testing (helper-118)
def test_equal_drops_shallower_first():   # G4
    units = [Unit((n,)) for n in "abcd"]
    assert [u.name for u in loss_units([2.0, 1.0, 3.0, 2.0], units, 1)] == ["a+b", "c", "d"]


def test_merges_sorted():   # G5
    assert granularity._loss_merges([3.0, 1.0, 5.0, 2.0], 2) == [1, 3]


def test_no_warning_when_k_equals_points(caplog):   # G6
    units = [Unit((n,)) for n in "abcdef"]
    with caplog.at_level(logging.WARNING, logger="qround"):
        loss_units([1.0, 0.5, 2.0, 1.9, 3.0, 1.0], units, 3)
    assert not caplog.records


def test_wbits_counts_for_float_modules():   # G10, G11
    assert capacity(nn.Linear(5, 3), wbits=4) == 15 * 4
    net = ResidualDigitsCNN(0)
    q = insert_act_quantizers(net, ["block1.conv1"], 4, calib_batches=IMAGES,
                              weights=GridSpec(bits=2, symmetric=False))
    assert capacity(q.block1, wbits=8) == 16 * 16 * 9 * 8 + 16 * 16 * 9 * 32


@pytest.mark.parametrize("metric", ["mse", "relative"])
def test_quick_pass_settings_reach_reconstruct(monkeypatch, metric):   # G14 G15 G16 G17
    net = ResidualDigitsCNN(0)
    q = quantise(net)
    seen = {}
    real = granularity.reconstruct

    def spy(f, qm, batches, units, cfg, **kw):
        seen.update(iterations=cfg.iterations, batches=len(batches))
        seen["res"] = real(f, qm, batches, units, cfg, **kw)
        return seen["res"]

    monkeypatch.setattr(granularity, "reconstruct", spy)
    sel = select_units(net, q, IMAGES, "loss", k=1, base="block",
                       config=ReconstructConfig(iterations=10, batch_size=8), search_batches=1,
                       metric=metric)
    assert seen["iterations"] == 2 and seen["batches"] == 1
    want = seen["res"].losses if metric == "mse" else seen["res"].relative_losses
    assert list(sel.base_losses) == list(want)
    assert sel.k == 1


def test_table_marks_the_merged_unit():   # G19
    base = tuple(Unit((n,)) for n in "abc")
    sel = Selection("modcap", (Unit(("a", "b")), Unit(("c",))), base, (1,), capacities=(3, 2, 5))
    rows = [line for line in sel.table().splitlines()
            if line.strip().startswith(("a ", "b ", "c "))]
    marked = [r.split()[0] for r in rows if "yes" in r]
    assert marked == ["b"], sel.table()


def test_search_iterations_zero_refused():   # G23
    net = ResidualDigitsCNN(0)
    with pytest.raises(QroundError, match="search_iterations must be a positive"):
        select_units(net, quantise(net), IMAGES, "loss", k=1, search_iterations=0)


def test_losses_and_units_must_pair():   # G26
    with pytest.raises(QroundError, match="2 losses for 3 units"):
        loss_units([1.0, 0.5], [Unit((n,)) for n in "abc"], 1)
