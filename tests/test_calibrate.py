"""Statistics capture: H = E[x x^T] from hooks against explicitly built input vectors."""
import copy

import logging
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qround import GridSpec, QroundError, RoundingProblem, calibrate
from qround.calibrate import (AsymmetricStats, capture_asymmetric, capture_fisher,
                              capture_hessians, select_layers)
from qround.problems import problems_from_layer

torch.set_num_threads(1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def explicit_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col by indexing (no unfold): (groups, N*Ho*Wo, c_in/groups*kh*kw), rows (n, i, j)."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        pads = (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0])
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x.double(), pads, mode=mode)
    n, c, hp, wp = xp.shape
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    ih = (torch.arange(ho) * sh)[:, None] + dh * torch.arange(kh)[None]   # (ho, kh)
    iw = (torch.arange(wo) * sw)[:, None] + dw * torch.arange(kw)[None]   # (wo, kw)
    p = xp[:, :, ih][..., iw]                                            # (n, c, ho, kh, wo, kw)
    p = p.permute(0, 2, 4, 1, 3, 5).reshape(n * ho * wo, conv.groups, -1)
    return p.permute(1, 0, 2)


def conv_output_from_patches(conv, patches, n):
    """Output (N, out, Ho, Wo) of the conv computed as W_group @ patch: checks the patch order."""
    w = conv.weight.detach().double().reshape(conv.groups, conv.out_channels // conv.groups, -1)
    out = torch.einsum("gri,goi->rgo", patches, w).reshape(n, -1, conv.out_channels)
    return out  # (N, Ho*Wo, out)


def second_moment(vectors):
    """vectors (groups, rows, n) -> (groups, n, n) as numpy, squeezed for one group."""
    h = (vectors.transpose(1, 2) @ vectors / vectors.shape[1]).numpy()
    return h[0] if h.shape[0] == 1 else h


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------------ H from hooks
@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4)), min_size=1, max_size=3),
       n_in=st.integers(1, 6), n_out=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_linear_hessian_matches_flattened_inputs(sizes, n_in, n_out, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, n_out), nn.Tanh(), nn.Linear(n_out, 2))
    batches = [torch.randn(b, t, n_in, generator=gen(seed + i)) for i, (b, t) in enumerate(sizes)]
    h = capture_hessians(model, batches)
    x0 = torch.cat([b.reshape(-1, n_in) for b in batches]).double()
    x2 = torch.tanh(model[0](torch.cat([b.reshape(-1, n_in) for b in batches]))).double()
    assert set(h) == {"0", "2"}
    # rows are weighted equally across batches of different sizes
    np.testing.assert_allclose(h["0"], (x0.T @ x0 / len(x0)).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h["2"], (x2.T @ x2 / len(x2)).detach().numpy(), rtol=1e-5,
                               atol=1e-6)
    assert h["0"].dtype == np.float64 and h["0"].shape == (n_in, n_in)


@settings(max_examples=30, deadline=None)
@given(groups=st.integers(1, 3), cin_g=st.integers(1, 3), out_g=st.integers(1, 2),
       k=st.tuples(st.integers(1, 3), st.integers(1, 3)), stride=st.integers(1, 2),
       padding=st.integers(0, 2), dilation=st.integers(1, 2),
       extra=st.tuples(st.integers(0, 4), st.integers(0, 4)),
       ns=st.lists(st.integers(1, 3), min_size=1, max_size=2), seed=st.integers(0, 2 ** 16))
def test_conv_hessian_matches_explicit_patches(groups, cin_g, out_g, k, stride, padding, dilation,
                                               extra, ns, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(groups * cin_g, groups * out_g, k, stride=stride, padding=padding,
                     dilation=dilation, groups=groups).double()
    hw = [dilation * (k[i] - 1) + 1 + extra[i] for i in range(2)]
    batches = [torch.randn(n, groups * cin_g, *hw, generator=gen(seed + i), dtype=torch.float64)
               for i, n in enumerate(ns)]
    h = capture_hessians(nn.Sequential(conv), batches)["0"]
    patches = torch.cat([explicit_patches(conv, b) for b in batches], dim=1)
    # the explicit patches reproduce the real conv: their order is weight.reshape(out, -1)'s
    for b in batches:
        y = conv(b) - conv.bias.detach()[:, None, None]
        mine = conv_output_from_patches(conv, explicit_patches(conv, b), b.shape[0])
        torch.testing.assert_close(mine, y.flatten(2).transpose(1, 2), rtol=1e-10, atol=1e-10)
    want = second_moment(patches)
    assert h.shape == ((cin_g * k[0] * k[1],) * 2 if groups == 1
                       else (groups, cin_g * k[0] * k[1], cin_g * k[0] * k[1]))
    np.testing.assert_allclose(h, want, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("padding_mode,padding", [("reflect", 1), ("circular", 2),
                                                  ("replicate", 1), ("zeros", "same")])
def test_conv_padding_modes(padding_mode, padding):
    # with 'same', kernel width 2 pads an odd total: the extra column goes right, as in torch
    conv = nn.Conv2d(2, 3, (3, 2), padding=padding, padding_mode=padding_mode,
                     dilation=(2, 1) if padding == "same" else 1).double()
    x = torch.randn(2, 2, 5, 6, generator=gen(1), dtype=torch.float64)
    h = capture_hessians(nn.Sequential(conv), [x])["0"]
    patches = explicit_patches(conv, x)
    y = conv(x) - conv.bias.detach()[:, None, None]
    torch.testing.assert_close(conv_output_from_patches(conv, patches, 2),
                               y.flatten(2).transpose(1, 2))
    np.testing.assert_allclose(h, second_moment(patches), rtol=1e-10, atol=1e-12)


def test_float32_inputs_accumulate_in_float64_and_unbatched_conv():
    conv = nn.Conv2d(1, 2, 2)
    xs = [torch.randn(3, 4, generator=gen(i)) for i in range(3)]
    lin = nn.Linear(4, 2)
    h = capture_hessians(nn.Sequential(lin), xs, device="cpu")["0"]
    x = torch.cat(xs).double()
    np.testing.assert_allclose(h, (x.T @ x / len(x)).numpy(), rtol=1e-12)
    img = torch.randn(1, 4, 4, generator=gen(5))             # unbatched (C, H, W)
    hc = capture_hessians(nn.Sequential(conv), [img])["0"]
    np.testing.assert_allclose(hc, second_moment(explicit_patches(conv, img[None])), rtol=1e-12)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def forward(self, a, b=None):
        return self.proj(a) if b is None else self.proj(a) + self.proj(b)


def test_default_forward_handles_dict_tuple_and_tensor():
    m = TwoInputs()
    a, b = torch.randn(4, 3, generator=gen(0)), torch.randn(4, 3, generator=gen(1))
    h_dict = capture_hessians(m, [{"a": a, "b": b}])["proj"]
    h_tuple = capture_hessians(m, [(a, b)])["proj"]
    h_two = capture_hessians(m, [a, b])["proj"]
    x = torch.cat([a, b]).double()
    for h in (h_dict, h_tuple, h_two):  # a module called twice per forward sees both inputs
        np.testing.assert_allclose(h, (x.T @ x / 8).numpy(), rtol=1e-12)


# ------------------------------------------------------------------------ layer selection
def test_layer_selection():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    assert list(select_layers(model)) == ["0", "3"]
    assert list(select_layers(model, "3")) == ["3"]
    assert list(select_layers(model, lambda n, m: isinstance(m, nn.Conv2d))) == ["0"]
    with pytest.raises(QroundError, match="'nope'"):
        select_layers(model, ["0", "nope"])
    with pytest.raises(QroundError, match="'1' is a ReLU"):
        select_layers(model, ["1"])
    with pytest.raises(QroundError, match="no nn.Linear"):
        select_layers(model, lambda n, m: False)
    with pytest.raises(QroundError, match="'nope'"):
        capture_hessians(model, [torch.randn(1, 1, 4, 4)], layers=["nope"])


# ------------------------------------------------------------------------ hooks, modes, errors
def test_hooks_removed_and_modes_restored_after_success():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[2].eval()                      # mixed modes must come back exactly
    seen = []

    def forward(m, batch):
        seen.append((m.training, m[1].training, torch.is_grad_enabled()))
        return m(batch)

    capture_hessians(model, [torch.randn(2, 3)], forward=forward)
    assert seen == [(False, False, False)]
    assert no_hooks(model)
    assert model.training and model[0].training and model[1].training and not model[2].training


def test_hooks_removed_after_exception_in_forward():
    model = nn.Sequential(nn.Linear(3, 2))
    model.train()

    def forward(m, batch):
        m(batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        capture_hessians(model, [torch.randn(2, 3)], forward=forward)
    assert no_hooks(model) and model.training


def test_empty_and_bad_calibration_data():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with pytest.raises(QroundError, match="empty"):
        capture_hessians(model, [])
    with pytest.raises(QroundError, match="empty"):
        capture_hessians(model, iter([]))
    with pytest.raises(QroundError, match="iterable of batches"):
        capture_hessians(model, torch.randn(4, 3))
    with pytest.raises(QroundError, match="'1' saw no inputs"):
        capture_hessians(model, [torch.randn(2, 3)], forward=lambda m, b: m[0](b))
    bad = torch.randn(2, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(QroundError, match="'0' received non-finite"):
        capture_hessians(model, [bad])
    assert no_hooks(model)


# ------------------------------------------------------------------------ asymmetric
def _quantised_copy(model, index):
    q = copy.deepcopy(model)
    with torch.no_grad():  # a crude 3-bit-ish rounding of an earlier layer makes x_hat != x
        w = q[index].weight
        w.copy_(torch.round(w * 4) / 4)
    return q


@pytest.mark.parametrize("seed", [0, 1])
def test_asymmetric_cost_equals_direct_output_error_linear(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    quant = _quantised_copy(model, 0)
    batches = [torch.randn(3, 2, 6, generator=gen(seed + i), dtype=torch.float64) for i in range(3)]
    stats = capture_asymmetric(model, quant, batches, ["2"])["2"]
    assert isinstance(stats, AsymmetricStats) and stats.cross.shape == (5, 5)
    assert not np.allclose(stats.cross, stats.hessian)
    w = model[2].weight.detach().numpy()
    problem = RoundingProblem.from_weight(w, stats.hessian_hat, GridSpec(bits=3),
                                          cross=stats.cross, float_hessian=stats.hessian)
    b = np.random.default_rng(seed).random(w.shape) < 0.5
    w_hat = problem.dequantize(b)
    x = torch.cat([torch.relu(model[0](t)).reshape(-1, 5) for t in batches]).detach().numpy()
    xh = torch.cat([torch.relu(quant[0](t)).reshape(-1, 5) for t in batches]).detach().numpy()
    direct = np.mean((x @ w.T - xh @ w_hat.T) ** 2, axis=0)
    np.testing.assert_allclose(problem.costs(b), direct, rtol=1e-9, atol=1e-12)


def test_asymmetric_cost_equals_direct_output_error_grouped_conv():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 6, 2, stride=2, dilation=1, groups=2)).double()
    quant = _quantised_copy(model, 0)
    batches = [torch.randn(2, 2, 6, 5, generator=gen(i), dtype=torch.float64) for i in range(2)]
    stats = capture_asymmetric(model, quant, batches, ["2"])["2"]
    assert stats.hessian_hat.shape == stats.cross.shape == (2, 8, 8)
    conv = model[2]
    problems = problems_from_layer(conv, stats.hessian_hat, GridSpec(bits=4), name="c",
                                   cross=stats.cross, float_hessian=stats.hessian)
    rng = np.random.default_rng(0)
    choices = [rng.random(p.weight.shape) < 0.5 for p in problems]
    costs = np.concatenate([p.costs(b) for p, b in zip(problems, choices)])
    w_hat = torch.as_tensor(np.concatenate([p.dequantize(b) for p, b in zip(problems, choices)]))
    w_hat = w_hat.reshape(conv.weight.shape)
    errs = []
    for t in batches:
        x, xh = torch.relu(model[0](t)), torch.relu(quant[0](t))
        y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, 2)
        yh = F.conv2d(xh, w_hat, None, conv.stride, conv.padding, conv.dilation, 2)
        errs.append(((y - yh) ** 2).permute(1, 0, 2, 3).reshape(6, -1).detach())
    direct = torch.cat(errs, dim=1).mean(dim=1).numpy()
    np.testing.assert_allclose(costs, direct, rtol=1e-9, atol=1e-12)


def test_asymmetric_same_model_and_mismatch():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    s = capture_asymmetric(model, model, [torch.randn(4, 3)], None)
    np.testing.assert_allclose(s["1"].cross, s["1"].hessian, rtol=1e-12)
    np.testing.assert_allclose(s["1"].hessian_hat, s["1"].hessian, rtol=1e-12)
    other = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 5))
    with pytest.raises(QroundError, match="'1' of quant_model"):
        capture_asymmetric(model, other, [torch.randn(4, 3)], ["1"])
    assert no_hooks(model) and no_hooks(other)
    strided = nn.Sequential(nn.Conv2d(1, 1, 2, stride=2))   # same weight shape, other patches
    with pytest.raises(QroundError, match="'0' of quant_model"):
        capture_asymmetric(nn.Sequential(nn.Conv2d(1, 1, 2)), strided, [torch.randn(1, 1, 4, 4)],
                           None)


class _InPlaceRepeated(nn.Module):
    """fc's input is changed in place after fc read it (h += fc(h)), once or twice."""

    def __init__(self, in_place: bool, calls: int):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)
        self.in_place, self.calls = in_place, calls

    def forward(self, x):
        h = x * 1.0
        for _ in range(self.calls):
            if self.in_place:
                h += self.fc(h)
            else:
                h = h + self.fc(h)
        return self.out(h)


@pytest.mark.parametrize("calls", [1, 2])
def test_asymmetric_statistics_survive_an_in_place_change_of_the_input(calls):
    # the float model's layer inputs are kept until the quantised copy's forward: a view of the
    # model's tensor was rewritten by h += fc(h), and the statistics came out wrong (no error)
    torch.manual_seed(0)
    in_place = _InPlaceRepeated(True, calls).double()
    plain = _InPlaceRepeated(False, calls).double()
    plain.load_state_dict(in_place.state_dict())
    batches = [torch.randn(16, 4, dtype=torch.float64, generator=gen(i)) for i in range(2)]
    got = capture_asymmetric(in_place, copy.deepcopy(in_place), batches, ["fc"])["fc"]
    want = capture_asymmetric(plain, copy.deepcopy(plain), batches, ["fc"])["fc"]
    for field in ("hessian", "hessian_hat", "cross"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-12)
    if calls == 1:   # and both are the float inputs' second moment
        x = torch.cat(batches).numpy()
        np.testing.assert_allclose(got.cross, x.T @ x / len(x), rtol=1e-12)


# ------------------------------------------------------------------------ Fisher
def test_fisher_linear_matches_per_token_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(inplace=True), nn.Linear(3, 2)).double()
    for p in model.parameters():
        p.requires_grad_(False)        # frozen model: flags must come back unchanged
    batches = [torch.randn(2, 4, 5, generator=gen(i), dtype=torch.float64) for i in range(2)]
    loss_fn = lambda out, batch: (out ** 2).sum() + out.sum()  # noqa: E731
    fisher = capture_fisher(model, batches, loss_fn, ["0"])["0"]
    assert fisher.shape == (3, 5, 5)
    total, rows = 0, 0
    for t in batches:
        z = model[0](t).detach().requires_grad_()
        g, = torch.autograd.grad(loss_fn(model[2](torch.relu(z)), t), z)
        x, g = t.reshape(-1, 5), g.reshape(-1, 3)
        total = total + torch.einsum("rc,ri,rj->cij", g ** 2, x, x)
        rows += len(x)
    np.testing.assert_allclose(fisher, (total / rows).numpy(), rtol=1e-10, atol=1e-14)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert no_hooks(model)


def test_fisher_grouped_conv_matches_per_position_gradients():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 4, 2, stride=1, padding=1, groups=2).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(1)).double()
    x = torch.randn(3, 4, 3, 3, generator=gen(2), dtype=torch.float64)
    model(x)  # materialise the lazy layer
    loss_fn = lambda out, batch: (out ** 2).mean()  # noqa: E731
    fisher = capture_fisher(model, [x], loss_fn, ["0"])["0"]
    assert fisher.shape == (4, 8, 8)
    z = conv(x).detach().requires_grad_()
    g, = torch.autograd.grad(loss_fn(model[3](model[2](torch.tanh(z))), x), z)
    g2 = (g ** 2).flatten(2).transpose(1, 2).reshape(-1, 4)          # (rows, out)
    patches = explicit_patches(conv, x)                               # (groups, rows, 8)
    want = torch.stack([torch.einsum("r,ri,rj->ij", g2[:, c], patches[c // 2], patches[c // 2])
                        for c in range(4)]) / g2.shape[0]
    np.testing.assert_allclose(fisher, want.numpy(), rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())


def test_fisher_budget_and_errors():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 1))
    x = [torch.randn(2, 64)]
    with pytest.raises(QroundError, match=r"'0' need 1 MB"):   # 32 * 64 * 64 * 8 bytes
        capture_fisher(model, x, lambda o, b: o.sum(), None, memory_budget_mb=0.5)
    with pytest.raises(QroundError, match="scalar"):
        capture_fisher(model, x, lambda o, b: o, None)
    with pytest.raises(QroundError, match="'0' received no gradient"):
        capture_fisher(model, x, lambda o, b: o.sum(), ["0"], forward=lambda m, b: m[1](m[0](b)
                                                                                       .detach()))
    with pytest.raises(QroundError, match="empty"):
        capture_fisher(model, [], lambda o, b: o.sum(), None)
    with pytest.raises(QroundError, match=r"non-finite loss nan on an empty output"):
        capture_fisher(model, [torch.randn(0, 64)], lambda o, b: o.mean(), None)
    with pytest.warns(UserWarning, match=r"Fisher blocks of layer '0' are all zero"):
        flat = capture_fisher(model, x, lambda o, b: (0 * o).sum() + model[1].bias.sum(),
                              ["0"])["0"]
    assert flat.shape == (32, 64, 64) and not flat.any()
    assert no_hooks(model) and all(p.grad is None for p in model.parameters())


class _InPlaceResidual(nn.Module):
    """h = a(x); h += b(h): b's input changes in place after b read it."""

    def __init__(self, in_place: bool = True):
        super().__init__()
        self.a, self.b, self.in_place = nn.Linear(6, 6), nn.Linear(6, 6), in_place

    def forward(self, x):
        h = self.a(x)
        if self.in_place:
            h += self.b(h)
        else:
            h = h + self.b(h)
        return h


def test_fisher_through_an_in_place_residual_equals_the_out_of_place_model():
    # b saved its input for its weight's gradient, and h += ... rewrote it: a raw autograd
    # error; each layer now reads a private copy of its input
    torch.manual_seed(0)
    model = _InPlaceResidual().double()
    plain = _InPlaceResidual(in_place=False).double()
    plain.load_state_dict(model.state_dict())
    batches = [torch.randn(5, 6, generator=gen(i), dtype=torch.float64) for i in range(2)]
    loss_fn = lambda out, batch: (out ** 2).sum()  # noqa: E731
    got = capture_fisher(model, batches, loss_fn, None)
    want = capture_fisher(plain, batches, loss_fn, None)
    assert set(got) == {"a", "b"}
    for name in got:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-15)
    assert no_hooks(model)


def test_fisher_errors_of_in_place_ops_and_inference_tensors_are_named():
    class SavedThenChanged(nn.Module):   # LayerNorm saved h, then h changes in place
        def __init__(self):
            super().__init__()
            self.a, self.n, self.b = nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 6)

        def forward(self, x):
            h = self.a(x)
            y = self.n(h)
            h.mul_(2)
            return self.b(y) + h

    x = [torch.randn(4, 6, generator=gen(0))]
    loss_fn = lambda out, batch: out.pow(2).sum()  # noqa: E731
    with pytest.raises(QroundError, match="changes in place a tensor the backward needs"):
        capture_fisher(SavedThenChanged(), x, loss_fn, None)
    with torch.inference_mode():
        frozen = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    with pytest.raises(QroundError, match="inference tensors"):
        capture_fisher(frozen, x, loss_fn, None)
    with torch.inference_mode():
        made = [torch.randn(4, 6)]
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    # batches made under inference_mode: each layer's private copy is a normal tensor
    assert set(capture_fisher(model, made, loss_fn, None)) == {"0", "2"}


def test_chunked_streaming_gives_the_same_statistics(monkeypatch):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 4, 2, groups=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 3 * 3, 3)).double()
    batches = [torch.randn(3, 2, 4, 4, generator=gen(i), dtype=torch.float64) for i in range(2)]
    loss_fn = lambda out, batch: (out ** 2).sum()  # noqa: E731
    whole_h = capture_hessians(model, batches)
    whole_f = capture_fisher(model, batches, loss_fn, None)
    monkeypatch.setattr(calibrate, "_CHUNK_BYTES", 1)  # one sample, one channel at a time
    for name, h in capture_hessians(model, batches).items():
        np.testing.assert_allclose(h, whole_h[name], rtol=1e-12)
    for name, f in capture_fisher(model, batches, loss_fn, None).items():
        np.testing.assert_allclose(f, whole_f[name], rtol=1e-12, atol=1e-15)


def test_token_mask_excludes_padding_rows():
    from qround.calibrate import capture_hessians, token_mask

    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    x = torch.randn(2, 4, 5, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)

    def forward(model, batch):
        with token_mask(mask):
            return model(batch)

    h = capture_hessians(lin, [x], forward=forward)[""]
    rows = x[mask].double()
    np.testing.assert_allclose(h, (rows.T @ rows / rows.shape[0]).numpy(), rtol=1e-12)
    h_all = capture_hessians(lin, [x])[""]
    assert not np.allclose(h, h_all)


class MaskedAttention(torch.nn.Module):
    """Self-attention whose padded query rows are fully masked with -inf (NaN there), as in
    implementations that mask with m[:, :, None] & m[:, None, :]; the padding never reaches
    the output (masked mean pooling)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb, self.qkv = torch.nn.Linear(6, 8), torch.nn.Linear(8, 24)
        self.out, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x, attention_mask):
        q, k, v = self.qkv(self.emb(x)).chunk(3, -1)
        m = attention_mask.bool()
        scores = (q @ k.transpose(1, 2)).masked_fill(~(m[:, :, None] & m[:, None, :]),
                                                     float("-inf"))
        h = torch.where(m[..., None], self.out(torch.softmax(scores, -1) @ v), 0.0)
        return self.head(h.sum(1) / m.sum(1, keepdim=True))


PAD = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
PADDED = [{"x": torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(i)),
           "attention_mask": PAD} for i in range(3)]


def test_nan_at_padded_positions_stays_out_of_the_statistics():
    """The finiteness check came before the mask: NaN on rows about to be dropped stopped the
    capture, though the model's outputs are finite."""
    from qround.calibrate import capture_hessians
    from qround.pipeline import QuantConfig, quantize_model

    model = MaskedAttention()
    h = capture_hessians(model, PADDED, layers="out")["out"]
    rows = []
    hook = model.out.register_forward_pre_hook(lambda mod, a: rows.append(a[0][PAD.bool()]))
    with torch.no_grad():
        for b in PADDED:
            model(**b)
    hook.remove()
    real = torch.cat(rows).double()
    assert torch.isfinite(real).all()
    np.testing.assert_allclose(h, (real.T @ real / len(real)).numpy(), rtol=1e-10)
    q = quantize_model(MaskedAttention(), PADDED, QuantConfig(wbits=4, solver="greedy",
                                                              progress=False))
    with torch.no_grad():
        assert all(torch.isfinite(q.model(**b)).all() for b in PADDED)
    # NaN on real tokens is still refused
    bad = [dict(b, x=b["x"].clone()) for b in PADDED]
    bad[1]["x"][0, 0, 0] = float("nan")
    with pytest.raises(QroundError, match="non-finite"):
        capture_hessians(MaskedAttention(), bad, layers="emb")


def test_reconstruction_through_nan_padding_is_a_clear_error():
    """0 x NaN is NaN: the weights' gradients cannot leave the padded NaN out, and training
    turned the parameters NaN silently; now the unit is named and the user's model is intact."""
    from qround.pipeline import QuantConfig, quantize_model
    from qround.reconstruct import ReconstructConfig

    model = MaskedAttention()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QroundError, match="unit 'out'.*NaN/Inf.*padded"):
        quantize_model(model, PADDED, QuantConfig(
            wbits=4, solver="greedy", abits=4, progress=False,
            reconstruction=ReconstructConfig(iterations=5)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sequence_first_inputs_are_not_masked_and_say_so():
    from qround.calibrate import capture_hessians, token_mask

    lin = torch.nn.Linear(5, 3)
    x = torch.randn(4, 2, 5, generator=torch.Generator().manual_seed(0))   # (T, B, C)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)     # (B, T)

    def forward(model, batch):
        with token_mask(mask):
            return model(batch)

    with pytest.warns(UserWarning, match="sequence-first"):
        h = capture_hessians(lin, [x], forward=forward)[""]
    every = x.reshape(-1, 5).double()
    np.testing.assert_allclose(h, (every.T @ every / 8).numpy(), rtol=1e-12)


def test_repeated_warnings_come_once_per_call_at_the_callers_line():
    """A warning raised in a forward hook for every layer and batch (a sequence-first input)
    or for every unit (all-zero Fisher blocks) comes once per quantize_model call, naming every
    layer, and points at the caller's line, not at qround's or torch's."""
    import warnings

    from qround.calibrate import capture_hessians, token_mask
    from qround.pipeline import QuantConfig, quantize_model

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 2, 6, generator=g) for _ in range(3)]   # (T, B, C)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)     # (B, T)

    def forward(model, batch):
        with token_mask(mask):
            return model(batch)

    model = SeqFirst()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(model, batches, QuantConfig(wbits=4, solver="greedy", progress=False),
                       forward=forward)
        line = sys._getframe().f_lineno - 2
        capture_hessians(model, batches, forward=forward)
    ours = [w for w in caught if "sequence-first" in str(w.message)]
    assert len(ours) == 2, [str(w.message) for w in caught]
    assert "Linear layers ['a', 'b', 'c']" in str(ours[0].message)
    assert all(w.filename == __file__ for w in ours)
    assert ours[0].lineno == line and ours[1].lineno == line + 3


def test_default_forward_keeps_padding_out_of_tokenised_batches():
    """A dict batch with a 2-D attention_mask is masked by the default forward too (the Python
    API counted padding while the CLI's transformers forward did not)."""
    from qround.calibrate import capture_hessians

    class Tok(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 6)
            self.fc = torch.nn.Linear(6, 3)

        def forward(self, input_ids, attention_mask):
            return self.fc(self.emb(input_ids))

    torch.manual_seed(0)
    model = Tok()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    h = capture_hessians(model, [{"input_ids": ids, "attention_mask": mask}])["fc"]
    rows = model.emb(ids)[mask.bool()].detach().double()
    np.testing.assert_allclose(h, (rows.T @ rows / rows.shape[0]).numpy(), rtol=1e-12)
    # without a mask every position counts, as before
    h_all = capture_hessians(model, [{"input_ids": ids}], forward=lambda m, b: m(b["input_ids"], None))
    every = model.emb(ids).reshape(-1, 6).detach().double()
    np.testing.assert_allclose(h_all["fc"], (every.T @ every / 8).numpy(), rtol=1e-12)


def test_default_forward_leaves_other_masks_alone():
    """Only a 0/1 (or bool) padding mask of a batch without decoder inputs is applied: an
    additive float mask (0 keep, -inf pad) would have kept the padding rows only, and a
    decoder's tokens are not the encoder mask's."""
    from qround.calibrate import capture_hessians

    class Tok(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 6)
            self.fc = torch.nn.Linear(6, 3)

        def forward(self, input_ids, attention_mask, decoder_input_ids=None):
            return self.fc(self.emb(input_ids if decoder_input_ids is None else decoder_input_ids))

    torch.manual_seed(0)
    model = Tok()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    every = model.emb(ids).reshape(-1, 6).detach().double()
    want = (every.T @ every / 8).numpy()
    additive = torch.tensor([[0.0, 0.0, 0.0, -float("inf")], [0.0, 0.0, -float("inf"), -float("inf")]])
    counts = torch.tensor([[1, 1, 1, 0], [2, 1, 0, 0]])   # not 0/1: not a padding mask
    for batch in ({"input_ids": ids, "attention_mask": additive},
                  {"input_ids": ids, "attention_mask": counts},
                  {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
                   "decoder_input_ids": ids}):
        np.testing.assert_allclose(capture_hessians(model, [batch])["fc"], want, rtol=1e-12)


def test_kept_buffers_restores_values_objects_and_removes_new_buffers():
    from qround.calibrate import kept_buffers

    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    m[0].register_buffer("cache", torch.zeros(3))
    m[0].register_buffer("empty", None)
    mean, cache = m[1].running_mean, m[0].cache
    with kept_buffers(m):
        m[1].running_mean += 5.0               # in place
        m[0].cache = torch.ones(7)             # replaced, another shape
        m[0].register_buffer("lazy", torch.ones(1), persistent=False)
        m[0].empty = torch.ones(2)
    assert m[1].running_mean is mean and torch.equal(mean, torch.zeros(2))
    assert m[0].cache is cache and torch.equal(cache, torch.zeros(3))
    assert "lazy" not in m[0]._buffers and "lazy" not in m[0]._non_persistent_buffers_set
    assert m[0].empty is None
    with pytest.raises(RuntimeError, match="boom"), kept_buffers(m):
        mean.fill_(1.0)
        raise RuntimeError("boom")
    assert torch.equal(mean, torch.zeros(2))


def test_kept_buffers_takes_sparse_buffers_and_modules_made_meanwhile():
    from qround.calibrate import kept_buffers

    m = nn.Sequential(nn.Linear(2, 2))
    adjacency = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), torch.ones(2), (2, 2),
                                        check_invariants=True)
    m[0].register_buffer("adj", adjacency)    # equal/clone of sparse tensors failed before
    with kept_buffers(m):
        m[0].adj = adjacency * 2
        m.add_module("norm", nn.BatchNorm1d(2))   # built lazily by a first forward
    assert m[0].adj is adjacency
    assert "num_batches_tracked" in m.norm._buffers   # a new module keeps its own buffers


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.seen += 1
        return x


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_kept_buffers_refills_a_scripted_modules_buffers():
    from qround.calibrate import kept_buffers

    m = nn.Sequential(torch.jit.script(_Counter()), nn.Linear(2, 2))
    with kept_buffers(m):
        m(torch.ones(1, 2))
        assert int(m[0].seen) == 1
    assert int(m[0].seen) == 0


def test_all_zero_fisher_blocks_of_several_units_come_in_one_warning():
    import warnings

    from qround.pipeline import QuantConfig, quantize_model

    class Dead(nn.Module):   # b, c and d never reach the output: their gradients are zero
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            h = self.a(x)
            return h + 0 * self.d(self.c(self.b(h)))

    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(Dead(), [torch.randn(4, 8, generator=g) for _ in range(3)],
                       QuantConfig(wbits=4, solver="greedy", progress=False,
                                   statistics="fisher"),
                       loss_fn=lambda out, b: (out ** 2).sum())
    zero = [w for w in caught if "all zero" in str(w.message)]
    assert len(zero) == 1 and "layers ['b', 'c', 'd']" in str(zero[0].message)
    assert zero[0].filename == __file__


# ------------------------------- found by the twenty-sixth session's review of the warnings
def _sequence_first(layers: int = 2):
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(*[nn.Linear(6, 6) for _ in range(layers)])

        def forward(self, x):
            return self.layers(x)

    from qround.calibrate import token_mask

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)     # (B, T)

    def forward(model, batch):
        with token_mask(mask):
            return model(batch)

    g = torch.Generator().manual_seed(0)
    return SeqFirst(), [torch.randn(4, 2, 6, generator=g) for _ in range(3)], forward


def test_an_error_still_brings_the_warning_that_explains_it():
    """Padding that is NaN reaches the finite check because the layer is sequence-first (so
    its padding is not masked): the error comes with the warning that says so, and a warning
    the filters make an error does not replace the error."""
    import warnings

    from qround.calibrate import capture_hessians

    model, batches, forward = _sequence_first()
    batches[1][3, 1] = float("nan")   # a padded token of the second sequence
    with pytest.warns(UserWarning, match="sequence-first"):
        with pytest.raises(QroundError, match="non-finite"):
            capture_hessians(model, batches, forward=forward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(QroundError, match="non-finite"):
            capture_hessians(model, batches, forward=forward)
    with pytest.warns(UserWarning, match="sequence-first"):   # the next call warns again
        capture_hessians(model, batches[:1], forward=forward)


def test_asymmetric_capture_and_input_ranges_warn_once_per_call():
    import warnings

    from qround.calibrate import capture_asymmetric
    from qround.evaluate import input_ranges

    model, batches, forward = _sequence_first()
    for run in (lambda: capture_asymmetric(model, copy.deepcopy(model), batches, None,
                                           forward=forward),
                lambda: input_ranges(model, batches, forward=forward)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        ours = [w for w in caught if "sequence-first" in str(w.message)]
        assert len(ours) == 1 and "['layers.0', 'layers.1']" in str(ours[0].message)
        assert ours[0].filename == __file__


def test_a_long_list_of_layers_is_cut_and_logged_in_full(caplog):
    from qround.calibrate import capture_hessians

    model, batches, forward = _sequence_first(layers=11)
    with caplog.at_level(logging.INFO, logger="qround.calibrate"):
        with pytest.warns(UserWarning, match=r"'layers\.7'\] and 3 more \(logged at INFO\)"):
            capture_hessians(model, batches, forward=forward)
    assert "'layers.10'" in caplog.text


def test_code_run_from_a_string_is_the_users_wherever_the_working_directory_is(monkeypatch):
    """``python -c`` from inside qround's own folder: '<string>' is not a qround file."""
    import os
    import warnings

    import qround

    monkeypatch.chdir(os.path.dirname(qround.__file__))
    code = compile("from qround._warn import warn_user\nwarn_user('from a string')",
                   "<string>", "exec")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(code, {})
    assert [(w.filename, w.lineno) for w in caught] == [("<string>", 2)]
