"""quantize_model: forward order, streamed (asymmetric) statistics, write-back, bias correction."""
import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qround import QroundError
from qround.calibrate import capture_asymmetric, capture_hessians
from qround.grid import Grid
from qround.pipeline import LayerReport, QuantConfig, QuantizedModel, quantize_model
from qround.reconstruct import ReconstructConfig
from qround.problems import problems_from_layer
from qround.solvers import Solver
from qround.writeback import apply_to_layer

torch.set_num_threads(1)
FAST = dict(progress=False, wbits=3)


# ------------------------------------------------------------------------------ tiny models
def materialise(model: nn.Module, seed: int) -> nn.Module:
    """Fill a model built on the meta device from a local generator (no global RNG draws)."""
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bn" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.uniform_(-1.0, 1.0, generator=gen).mul_(fan_in ** -0.5)
    for buf_name, b in model.named_buffers():
        b.fill_(1.0 if "var" in buf_name else 0.0)
    return model.eval()


class Branchy(nn.Module):
    """Linear -> ReLU, then two heads reading the same tensor (like q and k), then a Linear
    without bias on their concatenation."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.head_a = nn.Linear(16, 8)
        self.head_b = nn.Linear(16, 8)
        self.out = nn.Linear(16, 5, bias=False)

    def forward(self, x):
        h = F.relu(self.inp(x))
        return self.out(F.relu(torch.cat([self.head_a(h), self.head_b(h)], -1)))


class TinyCNN(nn.Module):
    """Conv -> BatchNorm -> grouped conv -> Conv1d -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.conv1d = nn.Conv1d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.grouped(x))
        x = self.conv1d(x.flatten(2)).mean(-1)
        return self.fc(x)


def branchy(seed=0):
    with torch.device("meta"):
        model = Branchy()
    return materialise(model, seed)


def mlp2(seed=0):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 6))
    return materialise(model, seed)


def cnn(seed=0):
    with torch.device("meta"):
        model = TinyCNN()
    return materialise(model, seed)


def batches(shape, n=3, seed=1, mean=0.5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) + mean for _ in range(n)]


MODELS = {"branchy": (branchy, (16, 12)), "mlp2": (mlp2, (16, 10)), "cnn": (cnn, (4, 3, 6, 6))}


def build(kind, seed=0):
    make, shape = MODELS[kind]
    return make(seed), batches(shape)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def layer_grid(qw, n):
    return Grid(np.array(qw.scale), np.array(qw.zero_point), qw.bits, qw.symmetric,
                qw.group_size, n)


def partly_quantised(float_model, qm: QuantizedModel, upto: str) -> nn.Module:
    """The float model with the layers quantised before ``upto`` (in report order) written."""
    partial = copy.deepcopy(float_model)
    modules = dict(partial.named_modules())
    for row in qm.report:
        if row.layer == upto:
            break
        apply_to_layer(modules[row.layer], qm.layers[row.layer], inplace=True)
    return partial


# ------------------------------------------------------------------------------ basics
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_float_model_untouched_and_weights_on_grid(kind):
    model, data = build(kind)
    model.train()  # flags must come back as they were
    before = state(model)
    qm = quantize_model(model, data, QuantConfig(**FAST))
    assert qm.model is not model and model.training and no_hooks(model) and no_hooks(qm.model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    modules = dict(qm.model.named_modules())
    float_modules = dict(model.named_modules())
    assert list(qm.layers) == [r.layer for r in qm.report]
    for name, qw in qm.layers.items():
        module = modules[name]
        assert torch.equal(module.weight, torch.as_tensor(qw.dequantized, dtype=torch.float32))
        assert qw.codes.min() >= qw.qmin and qw.codes.max() <= qw.qmax
        # every code is the floor or the ceil of the float weight on the layer's grid
        groups = getattr(module, "groups", 1)
        n = qw.codes.shape[1]
        eye = np.broadcast_to(np.eye(n), (groups, n, n)) if groups > 1 else np.eye(n)
        problems = problems_from_layer(float_modules[name], eye, layer_grid(qw, n), name)
        rows = qw.codes.shape[0] // groups
        for j, p in enumerate(problems):
            p.choices_from_codes(qw.codes[j * rows:(j + 1) * rows])  # raises otherwise
        assert not torch.equal(module.weight, float_modules[name].weight)


def test_report_and_table():
    model, data = build("branchy")
    qm = quantize_model(model, data, QuantConfig(**FAST))
    assert [r.layer for r in qm.report] == ["inp", "head_a", "head_b", "out"]
    for r in qm.report:
        assert isinstance(r, LayerReport) and r.kind == "Linear" and r.bits == 3
        assert r.solver == "fast" and r.cost <= r.rtn_cost * (1 + 1e-9)
        assert r.ratio == pytest.approx(r.cost / r.rtn_cost) and r.capture_seconds >= 0
    assert qm.report[3].shape == (5, 16)
    text = qm.table()
    assert all(r.layer in text for r in qm.report) and "total" in text
    totals = qm.totals()
    assert totals["layers"] == 4 and totals["cost"] == pytest.approx(sum(r.cost for r in qm.report))


@pytest.mark.parametrize("kind", ["branchy", "cnn"])
@pytest.mark.parametrize("inputs", ["float", "quantized", "asymmetric"])
def test_report_costs_equal_recomputation_from_statistics(kind, inputs):
    """Each layer's cost equals its codes' cost on statistics captured independently, from the
    float model and the model quantised up to that layer."""
    model, data = build(kind)
    qm = quantize_model(model, data, QuantConfig(inputs=inputs, **FAST))
    float_modules = dict(model.named_modules())
    for row in qm.report:
        qw = qm.layers[row.layer]
        module = float_modules[row.layer]
        if inputs == "asymmetric":
            partial = partly_quantised(model, qm, row.layer)
            s = capture_asymmetric(model, partial, data, [row.layer])[row.layer]
            h, cross, hf = s.hessian_hat, s.cross, s.hessian
        elif inputs == "quantized":
            partial = partly_quantised(model, qm, row.layer)
            h, cross, hf = capture_hessians(partial, data, [row.layer])[row.layer], None, None
        else:
            h, cross, hf = capture_hessians(model, data, [row.layer])[row.layer], None, None
        problems = problems_from_layer(module, h, layer_grid(qw, qw.codes.shape[1]), row.layer,
                                       cross=cross, float_hessian=hf)
        rows = qw.codes.shape[0] // len(problems)
        cost = sum(p.costs(p.choices_from_codes(qw.codes[j * rows:(j + 1) * rows])).sum()
                   for j, p in enumerate(problems))
        rtn = sum(p.rtn_costs().sum() for p in problems)
        assert row.cost == pytest.approx(cost, rel=1e-7, abs=1e-12)
        assert row.rtn_cost == pytest.approx(rtn, rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("kind", ["branchy", "cnn"])
def test_refits_never_raise_a_layer_cost_and_stay_on_floor_or_ceil(kind):
    """With float inputs every layer sees the same statistics with and without refits, so the
    refitted layer costs compare one to one; the codes are floor/ceil on the refitted grid."""
    model, data = build(kind)
    plain = quantize_model(model, data, QuantConfig(inputs="float", **FAST))
    refit = quantize_model(model, data, QuantConfig(inputs="float", refits=2, **FAST))
    float_modules = dict(model.named_modules())
    h = capture_hessians(model, data, [r.layer for r in refit.report])
    changed = 0
    for a, b in zip(plain.report, refit.report):
        assert a.layer == b.layer and a.rtn_cost == pytest.approx(b.rtn_cost, rel=1e-9)
        assert b.solver == "fast (2 refits)"
        assert b.cost <= a.cost * (1 + 1e-9)
        qw = refit.layers[b.layer]
        changed += not np.allclose(qw.scale, plain.layers[a.layer].scale)
        problems = problems_from_layer(float_modules[b.layer], h[b.layer],
                                       layer_grid(qw, qw.codes.shape[1]), b.layer)
        rows = qw.codes.shape[0] // len(problems)
        cost = sum(p.costs(p.choices_from_codes(qw.codes[j * rows:(j + 1) * rows])).sum()
                   for j, p in enumerate(problems))  # choices_from_codes raises off floor/ceil
        assert b.cost == pytest.approx(cost, rel=1e-7, abs=1e-12)
    assert changed > 0
    assert refit.totals()["cost"] < plain.totals()["cost"]


@pytest.mark.parametrize("kind", ["branchy", "cnn"])
def test_widen_never_raises_a_layer_cost_and_stays_on_the_grid(kind):
    """With float inputs each layer's statistics do not depend on the rounding, so the widened
    layer costs compare one to one with the solver's; the written weights are s (q - z) with
    integer codes in [qmin, qmax], some beyond floor/ceil, and the report is their exact cost."""
    model, data = build(kind)
    plain = quantize_model(model, data, QuantConfig(inputs="float", wbits=2, solver="fast",
                                                    progress=False))
    wide = quantize_model(model, data, QuantConfig(inputs="float", wbits=2, solver="fast",
                                                   widen=True, progress=False))
    float_modules = dict(model.named_modules())
    q_modules = dict(wide.model.named_modules())
    h = capture_hessians(model, data, [r.layer for r in wide.report])
    beyond = 0
    for a, b in zip(plain.report, wide.report):
        assert a.layer == b.layer and b.solver == "fast + widen"
        assert a.rtn_cost == pytest.approx(b.rtn_cost, rel=1e-9)
        assert b.cost <= a.cost * (1 + 1e-9)
        qw = wide.layers[b.layer]
        assert qw.codes.min() >= qw.qmin and qw.codes.max() <= qw.qmax
        np.testing.assert_allclose(q_modules[b.layer].weight.detach().numpy(),
                                   qw.dequantized, rtol=1e-6, atol=1e-7)
        problems = problems_from_layer(float_modules[b.layer], h[b.layer],
                                       layer_grid(qw, qw.codes.shape[1]), b.layer)
        rows = qw.codes.shape[0] // len(problems)
        parts = [qw.codes[j * rows:(j + 1) * rows] for j in range(len(problems))]
        cost = sum(p.cost_of_codes(c).sum() for p, c in zip(problems, parts))
        assert b.cost == pytest.approx(cost, rel=1e-7, abs=1e-12)
        for p, c in zip(problems, parts):
            d = c - p.floor_codes
            beyond += int(np.sum((d != 0) & ~((d == 1) & p.free)))
    assert beyond > 0
    assert wide.totals()["cost"] < plain.totals()["cost"]


@pytest.mark.parametrize("kind", ["branchy", "cnn"])
def test_correction_blends_quantized_and_asymmetric_targets(kind):
    """correction=0 is the quantized-input objective, 1 the asymmetric one; in between the
    reported cost is E||W x_a - W_hat x_hat||^2 with x_a = x_hat + a (x - x_hat)."""
    model, data = build(kind)
    runs = {key: quantize_model(model, data, QuantConfig(**FAST, **cfg)) for key, cfg in {
        "quantized": dict(inputs="quantized"),
        "a0": dict(inputs="asymmetric", correction=0.0),
        "a1": dict(inputs="asymmetric", correction=1.0),
        "asym": dict(inputs="asymmetric"),
        "a05": dict(inputs="asymmetric", correction=0.5)}.items()}
    for name in runs["quantized"].layers:
        np.testing.assert_array_equal(runs["a0"].layers[name].codes,
                                      runs["quantized"].layers[name].codes)
        np.testing.assert_array_equal(runs["a1"].layers[name].codes,
                                      runs["asym"].layers[name].codes)
    for a, b in zip(runs["a0"].report, runs["quantized"].report):
        assert a.cost == pytest.approx(b.cost, rel=1e-6)
    # the blended cost of the first layer (no earlier error: x_hat = x) equals the others'
    assert runs["a05"].report[0].cost == pytest.approx(runs["a0"].report[0].cost, rel=1e-6)


def test_blended_cost_is_measured_output_error():
    """correction=a: report cost == E||W x_a - W_hat x_hat||^2, x_a = x_hat + a (x - x_hat)."""
    model, data = build("mlp2")
    qm = quantize_model(model, data, QuantConfig(wbits=2, inputs="asymmetric", correction=0.3,
                                                 progress=False))
    l1, l2 = model[0], model[2]
    with torch.no_grad():
        h = F.relu(l1(torch.cat(data))).double()
        h_hat = F.relu(qm.model[0](torch.cat(data))).double()
    w2 = torch.as_tensor(qm.layers["2"].dequantized)
    h_a = h_hat + 0.3 * (h - h_hat)
    with torch.no_grad():
        e2 = ((h_a @ l2.weight.double().T - h_hat @ w2.T) ** 2).sum(1).mean()
    assert qm.report[1].cost == pytest.approx(float(e2), rel=1e-8)
    assert not torch.equal(h, h_hat)


def test_asymmetric_cost_is_measured_output_error():
    """Report cost == E||W x - W_hat x_hat||^2 over the calibration rows (AdaRound eq. 25)."""
    model, data = build("mlp2")
    qm = quantize_model(model, data, QuantConfig(wbits=2, inputs="asymmetric", progress=False))
    l1, l2 = model[0], model[2]
    q1 = qm.model[0]
    x = torch.cat(data).double()
    with torch.no_grad():
        h = F.relu(l1(torch.cat(data))).double()       # float input of layer 2 (float32 model)
        h_hat = F.relu(q1(torch.cat(data))).double()   # its input in the quantised model
    w1, w2 = (torch.as_tensor(qm.layers[k].dequantized) for k in ("0", "2"))
    with torch.no_grad():
        e1 = ((x @ l1.weight.double().T - x @ w1.T) ** 2).sum(1).mean()
        e2 = ((h @ l2.weight.double().T - h_hat @ w2.T) ** 2).sum(1).mean()
    assert qm.report[0].cost == pytest.approx(float(e1), rel=1e-8)
    assert qm.report[1].cost == pytest.approx(float(e2), rel=1e-8)
    assert not torch.equal(h, h_hat)  # layer 2 really saw quantised inputs


# ------------------------------------------------------------------------------ config
def test_layers_and_exclude_filters():
    model, data = build("branchy")
    qm = quantize_model(model, data, QuantConfig(layers="head|out", exclude="_b$", **FAST))
    assert list(qm.layers) == ["head_a", "out"]
    assert qm.skipped == {"inp": "not matched by layers='head|out'",
                          "head_b": "excluded by exclude='_b$'"}
    assert torch.equal(qm.model.inp.weight, model.inp.weight)
    assert torch.equal(qm.model.head_b.weight, model.head_b.weight)


def test_first_last_bits():
    model, data = build("branchy")
    qm = quantize_model(model, data, QuantConfig(wbits=2, first_last_bits=8, progress=False))
    assert [r.bits for r in qm.report] == [8, 2, 2, 8]
    assert qm.layers["inp"].bits == 8 and qm.layers["head_a"].codes.max() <= 1
    # 8 bits keep the first layer far closer to float than 2 bits do
    assert qm.report[0].ratio <= 1 and qm.report[0].cost < 0.01 * qm.report[1].cost


def test_unsupported_layers_skipped_and_grouped_conv_quantised():
    model, data = build("cnn")
    model.table = nn.Embedding(5, 3)   # weights of a type qround does not round
    qm = quantize_model(model, data, QuantConfig(**FAST))
    assert set(qm.layers) == {"conv", "grouped", "conv1d", "fc"}
    assert "Embedding is not" in qm.skipped["table"] and "bn" not in qm.skipped
    assert torch.equal(qm.model.table.weight, model.table.weight)
    row = {r.layer: r for r in qm.report}["grouped"]
    assert row.kind == "Conv2d" and row.shape == (8, 2 * 9)
    assert qm.layers["grouped"].weight_shape == (8, 2, 3, 3)
    row = {r.layer: r for r in qm.report}["conv1d"]
    assert row.kind == "Conv1d" and row.shape == (8, 8)
    assert qm.layers["conv1d"].weight_shape == (8, 8, 1)


def test_layer_never_called_is_skipped():
    model, data = build("branchy")
    model.spare = nn.Linear(3, 3)  # registered but unused by forward
    qm = quantize_model(model, data, QuantConfig(**FAST))
    assert "spare" not in qm.layers and "never called" in qm.skipped["spare"]


def _inputs_of(model, name, x):
    """The inputs of module ``name`` on a forward of ``x``, rows of (..., in)."""
    seen = []
    handle = dict(model.named_modules())[name].register_forward_hook(
        lambda m, args, out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])


def test_bias_correction_zeroes_each_layers_own_mean_error():
    # inputs="quantized": the solver's target is W x_hat, so the correction zeroes the mean of
    # (W - W_hat) x_hat on the layer's quantised inputs, not the earlier layers' error too
    model, data = build("branchy")
    x = torch.cat(data)
    errors = {}
    for corrected in (False, True):
        qm = quantize_model(model, data, QuantConfig(wbits=2, solver="nearest",
                                                     bias_correction=corrected, progress=False))
        x_hat = _inputs_of(qm.model, "out", x)
        float_out = F.linear(x_hat, model.out.weight, model.out.bias)
        with torch.no_grad():
            errors[corrected] = (float_out - qm.model.out(x_hat)).mean(0).abs().max().item()
        if corrected:  # the last layer had no bias: one was created, the float model has none
            assert qm.model.out.bias is not None and model.out.bias is None
    assert errors[True] < 1e-5 < errors[False]


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_bias_correction_asymmetric_zeroes_blended_mean_error(alpha):
    # inputs="asymmetric": the target is W x_a, x_a = x_hat + alpha (x - x_hat); with alpha 1
    # the last layer is corrected on these very batches and the model's output mean error vanishes
    model, data = build("branchy")
    x = torch.cat(data)
    qm = quantize_model(model, data, QuantConfig(wbits=2, solver="nearest", inputs="asymmetric",
                                                 correction=alpha, bias_correction=True,
                                                 progress=False))
    x_hat, x_f = _inputs_of(qm.model, "out", x), _inputs_of(model, "out", x)
    target = F.linear(x_hat + alpha * (x_f - x_hat), model.out.weight)
    with torch.no_grad():
        assert (target - qm.model.out(x_hat)).mean(0).abs().max().item() < 1e-5
        if alpha == 1.0:
            assert (model(x) - qm.model(x)).mean(0).abs().max().item() < 1e-5


@pytest.mark.parametrize("inputs,alpha", [("quantized", 0.0), ("asymmetric", 0.5)])
def test_bias_correction_cost_is_the_error_left_after_correction(inputs, alpha):
    """With bias correction the solver's objective is the error that remains once the bias has
    absorbed its mean: each reported layer cost equals the measured E||W x_a + b - (W_hat x_hat +
    b')||^2 over the calibration rows, with the corrected bias b' (zero mean error there)."""
    model, data = build("branchy")
    x = torch.cat(data)
    kw = dict(correction=alpha) if inputs == "asymmetric" else {}
    qm = quantize_model(model, data, QuantConfig(wbits=2, solver="greedy", inputs=inputs,
                                                 bias_correction=True, progress=False, **kw))
    plain = quantize_model(model, data, QuantConfig(wbits=2, solver="greedy", inputs=inputs,
                                                    progress=False, **kw))
    float_modules, q_modules = dict(model.named_modules()), dict(qm.model.named_modules())
    for row in qm.report:
        # in Branchy no layer feeds an earlier one, so the final model gives each layer the
        # inputs it was calibrated on
        x_hat = _inputs_of(qm.model, row.layer, x).double()
        x_f = _inputs_of(model, row.layer, x).double()
        f = float_modules[row.layer]
        w = f.weight.detach().double()
        b = 0.0 if f.bias is None else f.bias.detach().double()
        target = F.linear(x_hat + alpha * (x_f - x_hat), w) + b
        with torch.no_grad():
            err = target - q_modules[row.layer](x_hat.float()).double()
        assert err.mean(0).abs().max().item() < 1e-5
        measured = (err - err.mean(0)).pow(2).sum(1).mean().item()
        assert row.cost == pytest.approx(measured, rel=1e-4)
    # centring moves the objective: the costs are below the uncorrected ones
    assert qm.totals()["cost"] < plain.totals()["cost"]


def test_bias_correction_conv_zeroes_own_mean_error():
    model, data = build("cnn")
    x = torch.cat(data)
    out = {}
    for corrected in (False, True):
        qm = quantize_model(model, data, QuantConfig(wbits=2, solver="nearest",
                                                     bias_correction=corrected, progress=False))
        seen = []
        handle = qm.model.grouped.register_forward_hook(lambda m, a, o: seen.append(a[0]))
        with torch.no_grad():
            qm.model(x)
            handle.remove()
            x_hat = torch.cat(seen)
            ref, got = model.grouped(x_hat), qm.model.grouped(x_hat)
        out[corrected] = (ref - got).mean((0, 2, 3)).abs().max().item()
    assert out[True] < 1e-5 < out[False]


@pytest.mark.parametrize("kwargs,match", [
    (dict(wbits=1), "wbits"), (dict(wbits=9), "wbits"), (dict(first_last_bits=16), "first_last"),
    (dict(solver="nope"), "unknown solver"), (dict(solver="greedy+nope"), "unknown solver"),
    (dict(layers="("), "layers"), (dict(scale_method="best"), "scale_method"),
    (dict(statistics="hessian"), "statistics"), (dict(device="tpu"), "device"),
    (dict(group_size=0), "group_size"), (dict(seed=-1), "seed"), (dict(symmetric=1), "symmetric"),
    (dict(refits=-1), "refits"), (dict(refits=1.5), "refits"), (dict(widen=1), "widen"),
    (dict(widen=True, reconstruction=ReconstructConfig(iterations=5)), "floor or ceil only"),
    (dict(inputs="asymmetric", correction=1.5), "correction"),
    (dict(inputs="asymmetric", correction=float("nan")), "correction"),
    (dict(correction=0.5), "only applies with inputs='asymmetric'"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(QroundError, match=match):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("kwargs,calib,match", [
    (dict(layers="nomatch"), None, "layers='nomatch' matches no"),
    (dict(exclude="nomatch"), None, "exclude='nomatch' matches no"),
    (dict(exclude="."), None, "leaves no layer"),
    (dict(group_size=5), None, "group_size=5 does not divide"),
    (dict(statistics="fisher"), None, "loss_fn"),
    ({}, [], "empty"),
    ({}, "generator", "re-iterable"),
    ({}, "tensor", "list of batches"),
])
def test_model_dependent_errors_before_any_work(kwargs, calib, match):
    model, data = build("branchy")
    before = state(model)
    if calib == "generator":
        calib = (b for b in data)
    elif calib == "tensor":
        calib = data[0]
    elif calib is None:
        calib = data
    with pytest.raises(QroundError, match=match):
        quantize_model(model, calib, QuantConfig(**FAST, **kwargs), inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_finite_inputs_raise_and_remove_hooks():
    model, data = build("branchy")
    data = data + [torch.full((4, 12), float("nan"))]
    with pytest.raises(QroundError, match="non-finite"):
        quantize_model(model, data, QuantConfig(**FAST))
    assert no_hooks(model)


class Failing(Solver):
    name = "failing"

    def _solve(self, problem, start, rng):
        raise np.linalg.LinAlgError("Matrix is not positive definite")


def test_solver_failure_names_layer_and_remedy():
    model, data = build("branchy")
    with pytest.raises(QroundError, match="layer 'inp'.*calibration"):
        quantize_model(model, data, QuantConfig(solver=Failing(), **FAST))


# ------------------------------------------------------------------------------ efficiency
@pytest.mark.parametrize("inputs, per_batch", [("asymmetric", 5), ("quantized", 3)])
def test_shared_input_captured_once_and_forwards_stop_early(inputs, per_batch):
    model, data = build("branchy")
    calls = {"forward": 0, "out": 0}
    model.out.register_forward_hook(lambda *a: calls.__setitem__("out", calls["out"] + 1))

    def forward(m, batch):
        calls["forward"] += 1
        return m(batch)

    try:
        quantize_model(model, data, QuantConfig(inputs=inputs, **FAST), forward=forward)
    finally:
        model.out._forward_hooks.clear()
    # 1 order pass; capture units: inp (float = quantised copy so far: one pass), {head_a,
    # head_b} and out: float + copy each when asymmetric (5 forwards per batch), the copy only
    # when "quantized" (3)
    assert calls["forward"] == 1 + per_batch * len(data)
    # `out` ran in the order pass and in the first capture (which runs whole, counting every
    # layer's calls per batch); the capture in between stopped before it, and its own capture
    # stops at its input, before its forward
    assert calls["out"] == 1 + len(data)


def test_symmetric_mode_captures_all_layers_in_one_pass():
    model, data = build("branchy")
    count = []
    quantize_model(model, data, QuantConfig(inputs="float", **FAST),
                   forward=lambda m, b: count.append(1) or m(b))
    assert len(count) == 1 + len(data)


# ------------------------------------------------------------------------------ misc
def test_global_rng_untouched_and_seeded():
    model, data = build("branchy")
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    config = QuantConfig(solver="stochastic+greedy", **FAST)
    a = quantize_model(model, data, config)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(u, v) for u, v in zip(np.random.get_state(), np_state))
    b = quantize_model(model, data, config)
    assert all(np.array_equal(a.layers[k].codes, b.layers[k].codes) for k in a.layers)


class _NumpyNoise(nn.Module):
    """A forward that draws from numpy's and random's global generators."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        import random

        noise = torch.as_tensor(np.random.normal(size=x.shape) * random.random(), dtype=x.dtype)
        return self.b(torch.relu(self.a(x + noise)))


def test_a_forward_drawing_from_numpy_or_random_follows_config_seed():
    import random

    from qround.sensitivity import layer_sensitivity

    model = _NumpyNoise()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 8, generator=g) for _ in range(2)]
    config = QuantConfig(wbits=2, solver="greedy", progress=False, inputs="float")
    results = []
    for user_seed in (1, 2):
        np.random.seed(user_seed)
        random.seed(user_seed)
        state = np.random.get_state()
        qm = quantize_model(model, data, config)
        sens = layer_sensitivity(model, data, config, bits=(2, 4))
        assert np.array_equal(np.random.get_state()[1], state[1])   # the caller's, restored
        results.append(([r.cost for r in qm.report], sens.as_dict()["layers"]))
    assert results[0] == results[1]


def test_quantize_model_from_threads_follows_the_seed_and_restores_the_caller():
    """Two quantize_model calls at once share the process's generators: they run one at a
    time there, so each gets its seed's draws and the caller's state comes back."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 8, generator=g) for _ in range(2)]
    models = [_NumpyNoise(), _NumpyNoise()]
    config = QuantConfig(wbits=2, solver="greedy", progress=False, inputs="float", seed=7)
    serial = [[qw.codes for qw in quantize_model(m, data, config).layers.values()]
              for m in models]
    for _ in range(4):
        torch.manual_seed(123)
        np.random.seed(123)
        random.seed(123)
        with ThreadPoolExecutor(2) as pool:
            runs = [f.result() for f in [pool.submit(quantize_model, m, data, config)
                                         for m in models]]
        for want, qm in zip(serial, runs):
            assert all(np.array_equal(a, b.codes) for a, b in zip(want, qm.layers.values()))
        draws = (torch.rand(1).item(), np.random.rand(), random.random())
        torch.manual_seed(123)
        np.random.seed(123)
        random.seed(123)
        assert draws == (torch.rand(1).item(), np.random.rand(), random.random())


def test_inplace_quantises_the_given_model():
    model, data = build("branchy")
    ref = quantize_model(model, data, QuantConfig(**FAST))
    qm = quantize_model(model, data, QuantConfig(**FAST), inplace=True)
    assert qm.model is model
    with torch.no_grad():
        assert torch.equal(model(data[0]), ref.model(data[0]))


def test_fisher_statistics():
    model, data = build("branchy")
    gen = torch.Generator().manual_seed(3)
    targets = [torch.randn(b.shape[0], 5, generator=gen) for b in data]
    pairs = list(zip(data, targets))
    qm = quantize_model(model, pairs, QuantConfig(statistics="fisher", **FAST),
                        forward=lambda m, b: m(b[0]),
                        loss_fn=lambda out, b: F.mse_loss(out, b[1]))
    assert list(qm.layers) == ["inp", "head_a", "head_b", "out"]
    assert all(0 < r.ratio <= 1 + 1e-9 for r in qm.report)


@pytest.mark.integration
def test_digits_cnn_w4_greedy_keeps_accuracy():
    zoo = pytest.importorskip("qround.zoo")
    pytest.importorskip("sklearn", reason="the digits need scikit-learn")
    model, data = zoo.train_digits_cnn("plain", seed=0)
    calib = list(data.calib_images.split(64))
    qm = quantize_model(model, calib, QuantConfig(wbits=4, solver="greedy", progress=False))
    float_acc = zoo.accuracy(model, data.test_images, data.test_labels)
    quant_acc = zoo.accuracy(qm.model, data.test_images, data.test_labels)
    assert list(qm.layers) == ["conv1", "conv2", "conv3", "fc"]
    assert quant_acc >= float_acc - 0.03
    assert all(r.ratio < 1 for r in qm.report)


class _SkipFromInput(nn.Module):
    """A 3x3 stem and a 1x1 skip conv both read the model's input (different geometries)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.skip = nn.Conv2d(2, 4, 1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = torch.relu(self.mid(torch.relu(self.stem(x)))) + self.skip(x)
        return self.fc(h.flatten(1))


def test_first_last_bits_cover_a_skip_of_another_kernel_from_the_input():
    model = _SkipFromInput()
    cal = batches((8, 2, 6, 6))
    qm = quantize_model(model, cal, QuantConfig(wbits=2, first_last_bits=8, abits=4,
                                                solver="greedy", progress=False))
    assert {r.layer: r.bits for r in qm.report} == {"stem": 8, "skip": 8, "mid": 2, "fc": 8}
    # the input of the first layers stays in float, the others are quantised
    assert qm.model.stem.act is None and qm.model.skip.act is None
    assert qm.model.mid.act is not None and qm.model.fc.act is not None


def test_a_group_size_that_does_not_divide_a_layer_is_named_by_every_entry_point():
    """quantize_model, rtn_model, gptq_model and layer_sensitivity name the layer (and refuse
    before any forward); they used to differ ("... of the layer" from deep in fit_grid)."""
    from qround.baselines import gptq_model, rtn_model
    from qround.sensitivity import layer_sensitivity

    model, data = build("branchy")
    config = QuantConfig(**{**FAST, "group_size": 5})
    for call in (lambda: rtn_model(model, config), lambda: gptq_model(model, data, config),
                 lambda: layer_sensitivity(model, data, config, bits=(2, 3))):
        with pytest.raises(QroundError, match=r"group_size=5 does not divide the \d+ inputs of "
                                              r"layer '"):
            call()


def test_fisher_with_batches_of_different_sizes_warns_about_mean_losses(caplog):
    model, data = build("mlp2")
    uneven = [data[0], data[0][:1]]
    with caplog.at_level("WARNING", logger="qround.pipeline"):
        quantize_model(model, uneven, QuantConfig(statistics="fisher", **FAST),
                       loss_fn=lambda out, batch: out.pow(2).sum())
    assert "if loss_fn is mean-reduced, the samples of a smaller batch weigh more" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="qround.pipeline"):
        quantize_model(model, [data[0], data[0]], QuantConfig(statistics="fisher", **FAST),
                       loss_fn=lambda out, batch: out.pow(2).sum())
    assert "mean-reduced" not in caplog.text


def test_every_config_field_is_documented_for_help():
    """help(QuantConfig) and IDE hovers show the docstring, not the fields' comments."""
    import dataclasses

    from qround.reconstruct import ReconstructConfig

    for cls in (QuantConfig, ReconstructConfig):
        doc = " ".join(cls.__doc__.split())
        missing = [f.name for f in dataclasses.fields(cls)
                   if not re.search(rf"(^|[\s/(`]){f.name}[`:\s/]", doc)]
        assert not missing, (cls.__name__, missing)


class _SharedInPlace(nn.Module):
    """pre, then fc twice on a residual stream changed in place (h += fc(h)) or not."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.pre, self.fc, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.in_place = in_place

    def forward(self, x):
        h = self.pre(x)
        for _ in range(2):
            if self.in_place:
                h += self.fc(h)
            else:
                h = h + self.fc(h)
        return self.out(h)


def test_asymmetric_inputs_of_a_layer_called_twice_on_an_in_place_residual():
    # a layer called twice makes the float forward run whole; its kept inputs were views that
    # the later h += fc(h) rewrote before the quantised copy's forward paired them: fc's cross
    # and float statistics (and so its costs) came out wrong, without an error
    torch.manual_seed(0)
    in_place = _SharedInPlace(True).double()
    plain = _SharedInPlace(False).double()
    plain.load_state_dict(in_place.state_dict())
    batches = [torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    cfg = QuantConfig(wbits=3, solver="greedy", inputs="asymmetric", progress=False)
    got = {r.layer: (r.cost, r.rtn_cost) for r in quantize_model(in_place, batches, cfg).report}
    want = {r.layer: (r.cost, r.rtn_cost) for r in quantize_model(plain, batches, cfg).report}
    assert got.keys() == want.keys() == {"pre", "fc", "out"}
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, err_msg=name)
