"""The activation stage on unusual but legitimate models (found by the eleventh session's review
of the reconstruction stack): float64 layers with borders, parents that read their child's
attributes, layers registered twice, blocks that flatten tokens, first/last layers in call
order, single-layer models, and unit checks before any solve."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qround import export
from qround.activations import quantized_layers
from qround.errors import QroundError
from qround.pipeline import QuantConfig, quantize_model
from qround.reconstruct import ReconstructConfig

torch.set_num_threads(1)
REC = ReconstructConfig(iterations=4, batch_size=8, seed=3)


def _config(**kw):
    return QuantConfig(**{"wbits": 3, "solver": "greedy", "progress": False, **kw})


def _batches(*shape, n=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=gen).to(dtype) for _ in range(n)]


def _reloaded_outputs_match(q, make, batch, tmp_path):
    path = tmp_path / "m.safetensors"
    q.save(path)
    loaded = export.load(make(), path)
    with torch.no_grad():
        return torch.equal(loaded(batch), q.model(batch))


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


@pytest.mark.parametrize("borders", ["linear", "quadratic"])
def test_float64_model_with_borders(borders, tmp_path):
    make = lambda: _Conv().double()  # noqa: E731
    data = _batches(8, 2, 5, 5, dtype=torch.float64)
    q = quantize_model(make(), data, _config(abits=4, borders=borders, reconstruction=REC))
    assert all(m.act is None or m.act.step.dtype == torch.float64
               for m in quantized_layers(q.model).values())
    assert _reloaded_outputs_match(q, make, data[0], tmp_path)


class _ReadsChild(nn.Module):
    """A parent forward that reads its child's attributes, as HF's T5 does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.out = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = x.to(self.fc.weight.dtype)[..., :self.fc.in_features]
        return self.out(torch.relu(self.fc(x)))


def test_a_wrapped_layer_shows_its_layers_attributes(tmp_path):
    data = _batches(16, 6)
    q = quantize_model(_ReadsChild(), data, _config(abits=4, reconstruction=REC))
    assert q.model.fc.in_features == 6 and q.model.fc.weight.shape == (8, 6)
    assert _reloaded_outputs_match(q, _ReadsChild, data[0], tmp_path)


class _Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.shared = nn.Linear(6, 6), nn.Linear(6, 6)
        self.tail = nn.Sequential(nn.ReLU(), self.shared)  # the same layer, second name

    def forward(self, x):
        return self.tail(torch.relu(self.a(x)))


def test_a_layer_with_two_names_is_refused_by_the_activation_stage_only():
    data = _batches(16, 6)
    q = quantize_model(_Aliased(), data, _config())
    assert "shared" in q.layers
    with pytest.raises(QroundError, match=r"registered under several names \['shared', "
                                          r"'tail.1'\]"):
        quantize_model(_Aliased(), data, _config(abits=4))


class _Tokens(nn.Module):
    """Per-token logits: the last unit's output flattens (N, T, F) to (N*T, C)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.mid(torch.relu(self.inp(x))))
        return self.out(x.reshape(-1, x.shape[-1]))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_unit_that_flattens_tokens_trains_on_whole_batches(batch_size):
    """Rows were drawn along dim 0 of inputs (N) and targets (N*T) alike: a shape error, or with
    batch_size 1 a silent broadcast of one target row over all tokens."""
    rec = ReconstructConfig(iterations=4, batch_size=batch_size, seed=3)
    q = quantize_model(_Tokens(), _batches(4, 5, 6), _config(
        abits=4, reconstruction=rec, granularity="scheme", scheme=("inp", "mid+out")))
    assert [u.name for u in q.units.units] == ["inp", "mid+out"]


class _Skip(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.skip = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) + self.skip(x)


def test_first_and_last_layers_are_the_same_for_weights_and_inputs():
    q = quantize_model(_Skip(), _batches(16, 6), _config(wbits=2, abits=4, first_last_bits=8))
    layers = quantized_layers(q.model)
    for name, layer in layers.items():
        wbits = q.layers[name].bits
        abits = None if layer.act is None else layer.act.bits
        assert (wbits == 8) == (abits in (None, 8)), (name, wbits, abits)
    assert layers["fc1"].act is None                      # the first layer called: float input
    # `skip` is the last layer called, and it reads the model's input as fc1 does: it belongs
    # to the first layer's group (as k and v do to q's, whatever their widths), so its input
    # stays in float too
    assert q.layers["skip"].bits == 8 and layers["skip"].act is None
    assert q.layers["fc2"].bits == 2 and layers["fc2"].act.bits == 4


def test_a_single_layer_model_with_quantised_input_reloads(tmp_path):
    make = lambda: nn.Linear(6, 3)  # noqa: E731
    torch.manual_seed(0)
    model = make()
    data = _batches(16, 6)
    q = quantize_model(model, data, _config(abits=4, borders="linear", reconstruction=REC))
    path = tmp_path / "one.safetensors"
    q.save(path)
    loaded = export.load(model, path)
    with torch.no_grad():
        assert torch.equal(loaded(data[0]), q.model(data[0]))


class _ThreeBlocks(nn.Module):
    """Three blocks and one Linear that the forward never calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(6, 6), nn.ReLU())
                                      for _ in range(3)))
        self.unused = nn.Linear(6, 6)

    def forward(self, x):
        return self.blocks(x)


@pytest.mark.parametrize("model, config, match", [
    (_ThreeBlocks, dict(granularity="loss", k=3), r"k=3 must lie in \[1, 2\]"),
    (lambda: nn.Linear(6, 3), dict(granularity="loss"), r"the model has 1, so there is nothing"),
    (lambda: nn.Linear(6, 3), dict(borders="linear", first_last_bits=8),
     "need a quantised input"),
])
def test_unit_checks_come_before_any_solve(model, config, match, monkeypatch):
    """They used to count layers the forward never calls (k passed, then failed after the
    weight stage) and to skip single-layer models."""
    import qround.pipeline

    def no_solve(*args, **kwargs):
        raise AssertionError("a layer was solved before the configuration was checked")

    monkeypatch.setattr(qround.pipeline, "_solve_layer", no_solve)
    with pytest.raises(QroundError, match=match):
        quantize_model(model(), _batches(16, 6), _config(abits=4, reconstruction=REC, **config))


@pytest.mark.parametrize("scheme, match", [
    (("0+4",), "not consecutive in forward order"),
    (("0", "0+2"), "overlap"),
])
def test_a_bad_scheme_is_refused_before_any_solve(scheme, match, monkeypatch):
    """Overlapping or non-consecutive units used to fail after the whole weight stage."""
    import qround.pipeline

    monkeypatch.setattr(qround.pipeline, "_solve_layer", lambda *a, **k: pytest.fail("solved"))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 4))
    with pytest.raises(QroundError, match=match):
        quantize_model(net, _batches(16, 8), _config(
            abits=4, reconstruction=REC, granularity="scheme", scheme=scheme))


class _LateFirst(nn.Module):
    """Registers ``late`` before ``early`` and calls ``early`` first."""

    def __init__(self):
        super().__init__()
        self.late, self.early = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.late(torch.relu(self.early(x))))


def test_loss_along_depth_lists_a_units_layers_in_call_order():
    from qround.granularity import loss_along_depth

    torch.manual_seed(0)
    q = quantize_model(nn.Sequential(_LateFirst(), _LateFirst()), _batches(16, 8),
                       _config(abits=4, reconstruction=REC, granularity="block"))
    assert loss_along_depth(q.reconstruction)["layers"] == [["0.early", "0.late"],
                                                            ["1.early", "1.late"]]


def test_relative_loss_of_a_unit_whose_float_output_is_zero():
    from qround.reconstruct import BlockReport

    exact = BlockReport("u", ("u",), 0.0, 0.0, 1, 0.0, target_power=0.0)
    assert exact.relative_loss == 0.0
    wrong = BlockReport("u", ("u",), 1.0, 1.0, 1, 0.0, target_power=0.0)
    assert math.isnan(wrong.relative_loss)


def test_unit_checks_share_the_models_parameters_and_leave_them_as_they_were(monkeypatch):
    """The stand-in of check_units was a full deep copy (a third copy of a large model); it
    shares the parameters now, and restores the flags that wrapping changes."""
    import qround.activation_stage as stage

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    shadows = []
    real = stage._check_units_on
    monkeypatch.setattr(stage, "_check_units_on",
                        lambda shadow, *a: (shadows.append(shadow), real(shadow, *a)))
    stage.check_units(model, ["0", "2"], _config(abits=4, reconstruction=REC,
                                                 granularity="scheme", scheme=("0+2",)),
                      batch=_batches(4, 8)[0])
    [shadow] = shadows
    assert shadow is not model
    assert [id(p) for p in shadow.parameters()] == [id(p) for p in model.parameters()]
    assert [p.requires_grad for p in model.parameters()] == before


# ------------------------------------------- found by the eleventh session's new-user walkthrough
class _QKV(nn.Module):
    """q, k and v read the model's input; the head is last."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.pos = nn.Parameter(torch.zeros(6))   # a bare parameter of the model itself
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = x + self.pos
        return self.head(torch.relu(self.q(x) * self.k(x) + self.v(x)))


def test_first_last_bits_cover_every_layer_that_reads_the_first_input():
    q = quantize_model(_QKV(), _batches(16, 6), _config(wbits=2, abits=4, first_last_bits=8))
    assert {n: w.bits for n, w in q.layers.items()} == {"q": 8, "k": 8, "v": 8, "head": 8}
    layers = quantized_layers(q.model)
    assert all(layers[n].act is None for n in ("q", "k", "v"))
    assert layers["head"].act.bits == 8


def test_the_table_names_what_stays_in_float():
    q = quantize_model(_QKV(), _batches(16, 6), _config(exclude="head"))
    table = q.table()
    assert "left in float:" in table and "head: excluded by exclude='head'" in table
    assert "<model>: _QKV is not an nn.Linear, nn.Conv2d or nn.Conv1d: its own parameters stay " \
           "in float" \
        in table


def test_a_solver_instance_keeps_its_parameters_in_the_saved_config(tmp_path):
    from qround.solvers import get_solver

    solver = get_solver("anneal", num_sweeps=50)
    q = quantize_model(_QKV(), _batches(16, 6), _config(solver=solver))
    q.save(tmp_path / "m.safetensors")
    config = export.read_metadata(tmp_path / "m.safetensors")["config"]
    assert config["solver"] == "anneal" and "num_sweeps=50" in config["solver_repr"]


def test_reverted_units_are_reported(caplog, monkeypatch):
    """A reconstruction that keeps every unit's start used to pass silently."""
    import types

    import qround.pipeline

    blocks = [types.SimpleNamespace(block=n, reverted=r) for n, r in (("a", True), ("b", False))]
    monkeypatch.setattr(qround.pipeline, "quantize_activations",
                        lambda *a, **k: (types.SimpleNamespace(blocks=blocks), None))
    with caplog.at_level("WARNING", logger="qround.pipeline"):
        quantize_model(_Skip(), _batches(16, 6), _config(abits=4, reconstruction=REC))
    assert "kept the start of 1 of 2 units" in caplog.text and ": a;" in caplog.text


class _PerToken(nn.Module):
    """Two per-token layers and a block around them: (B, T, 4) -> (B, T, 3)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.block = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        with torch.no_grad():
            for p in self.block.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x):
        return self.block(x)


@pytest.mark.parametrize("flatten", [False, True])
def test_padded_tokens_stay_out_of_the_activation_stage(flatten):
    """Inside qround.calibrate.token_mask, padded positions reach neither the activation steps
    nor block reconstruction's losses: whatever the padding holds, the result is the same (and
    without the mask it is not, so the check can fail).  QDrop's random draws still cover the
    padded positions, so the padded length (not tested here) changes which inputs it drops."""
    from qround.calibrate import token_mask

    gen = torch.Generator().manual_seed(0)
    real = [torch.randn(4, 6, 4, generator=gen) for _ in range(2)]
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 3:] = mask[2, 1:] = False

    def padded(fill):
        out = [x.clone() for x in real]
        for x in out:
            x[~mask] = fill
        return [x.reshape(-1, 4) if flatten else x for x in out]   # (B*T, 4): tokens flattened

    def run(batches, masked):
        def forward(model, batch):
            if not masked:
                return model(batch)
            with token_mask(mask):
                return model(batch)

        qm = quantize_model(_PerToken(), batches, _config(
            abits=3, reconstruction=ReconstructConfig(iterations=30, batch_size=3, seed=1)),
            forward=forward)
        layers = quantized_layers(qm.model)
        steps = [float(layers[n].act.step.detach()) for n in ("block.0", "block.2")]
        codes = [layers[n].w_codes.clone() for n in ("block.0", "block.2")]
        return steps, codes, [(b.loss_before, b.loss_after) for b in qm.reconstruction.blocks]

    quiet, loud = run(padded(0.0), True), run(padded(40.0), True)
    assert quiet[0] == loud[0] and quiet[2] == loud[2]
    assert all(torch.equal(a, b) for a, b in zip(quiet[1], loud[1]))
    unmasked = run(padded(40.0), False)
    assert unmasked[0] != loud[0] and unmasked[2] != loud[2]


def test_flattened_tokens_train_on_real_rows_whatever_the_padded_length():
    """A unit that sees one row per token (OPT's MLP) draws its mini-batches from the real rows
    only: padding the same texts to a longer length changes nothing (QDrop off, since its draws
    cover the padded positions)."""
    from qround.calibrate import token_mask

    gen = torch.Generator().manual_seed(0)
    real = [torch.randn(4, 6, 4, generator=gen) for _ in range(2)]
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 3:] = mask[2, 1:] = False

    def run(extra):
        m = torch.cat([mask, torch.zeros(4, extra, dtype=torch.bool)], 1)
        batches = [torch.cat([x, torch.full((4, extra, 4), 7.0)], 1).reshape(-1, 4)
                   for x in real]

        def forward(model, batch):
            with token_mask(m):
                return model(batch)

        qm = quantize_model(_PerToken(), batches, _config(abits=3, reconstruction=ReconstructConfig(
            iterations=30, batch_size=5, seed=1, qdrop=0.0)), forward=forward)
        layers = quantized_layers(qm.model)
        return ([float(layers[n].act.step.detach()) for n in ("block.0", "block.2")],
                [layers[n].w_codes.clone() for n in ("block.0", "block.2")],
                [(b.loss_before, b.loss_after) for b in qm.reconstruction.blocks])

    short, long = run(0), run(3)
    assert short[0] == long[0]
    assert all(torch.equal(a, b) for a, b in zip(short[1], long[1]))
    flat = [v for pair in short[2] for v in pair], [v for pair in long[2] for v in pair]
    assert flat[0] == pytest.approx(flat[1], rel=1e-6)
