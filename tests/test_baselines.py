"""The real GPTQ against an unblocked reference, and the whole-model baselines."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qround.baselines import gptq_quantize, layer_cost
from qround.errors import QroundError
from qround.grid import GridSpec, fit_grid
from tests.conftest import correlated_hessian


def reference_gptq(w, h, grid, act_order=True, percdamp=0.01):
    """Optimal Brain Quantization with a fixed order, written the plain way: explicit inverse
    hessian, every remaining weight updated after each rounding, the rounded input removed from
    the inverse (Frantar et al. 2022, eq. 2-3).  No blocks, no Cholesky."""
    scale, zero = grid.expand()
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    n = h.shape[0]
    hinv = np.linalg.inv(h + percdamp * np.mean(np.diag(h)) * np.eye(n))
    w = w.copy()
    codes = np.zeros(w.shape, dtype=np.int64)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else range(n)
    for i in order:
        q = np.clip(np.floor(w[:, i] / scale[:, i] + 0.5) + zero[:, i], grid.qmin, grid.qmax)
        codes[:, i] = q
        err = (w[:, i] - scale[:, i] * (q - zero[:, i])) / hinv[i, i]
        w -= err[:, None] * hinv[i][None, :]
        hinv -= np.outer(hinv[:, i], hinv[i]) / hinv[i, i]
    return codes


def toy(out=12, n=40, bits=3, seed=0, symmetric=True, group_size=None, dead=()):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(out, n))
    h = correlated_hessian(n, rng, rows=4 * n, outliers=2)
    for i in dead:
        h[i, :] = h[:, i] = 0.0
    grid = fit_grid(w, GridSpec(bits=bits, symmetric=symmetric, group_size=group_size), hessian=h)
    return w, h, grid


@pytest.mark.parametrize("seed,bits,symmetric,group_size,act_order,blocksize", [
    (0, 3, True, None, True, 128),
    (1, 2, True, None, False, 128),
    (2, 4, False, None, True, 7),
    (3, 3, True, 8, True, 16),
    (4, 3, False, 10, False, 1),
])
def test_matches_unblocked_reference(seed, bits, symmetric, group_size, act_order, blocksize):
    w, h, grid = toy(seed=seed, bits=bits, symmetric=symmetric, group_size=group_size)
    codes = gptq_quantize(w, h, grid, act_order=act_order, blocksize=blocksize)
    assert codes.dtype == np.int64 and codes.shape == w.shape
    np.testing.assert_array_equal(codes, reference_gptq(w, h, grid, act_order))
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax


def test_block_size_does_not_change_codes():
    w, h, grid = toy(seed=5, n=33)
    first = gptq_quantize(w, h, grid, blocksize=1)
    for blocksize in (4, 10, 33, 1000):
        np.testing.assert_array_equal(gptq_quantize(w, h, grid, blocksize=blocksize), first)


@pytest.mark.parametrize("seed", range(4))
def test_beats_rtn_on_correlated_hessian(seed):
    w, h, grid = toy(seed=seed, out=16, n=48, bits=3)
    gptq = layer_cost(w, grid.dequantize(gptq_quantize(w, h, grid)), h)
    rtn = layer_cost(w, grid.dequantize(grid.quantize(w)), h)
    assert gptq < 0.9 * rtn


def test_not_restricted_to_floor_or_ceil():
    w, h, grid = toy(seed=0, out=32, n=48, bits=4)
    scale, zero = grid.expand()
    codes = gptq_quantize(w, h, grid)
    floor = np.floor(w / scale) + zero
    moved = (codes < floor) | (codes > floor + 1)
    assert moved.any()  # error feedback pushes some weights past their floor/ceil pair


def test_diagonal_hessian_is_rtn():
    rng = np.random.default_rng(7)
    w = rng.normal(size=(8, 20))
    h = np.diag(rng.uniform(0.5, 3.0, size=20))
    grid = fit_grid(w, GridSpec(bits=3))
    np.testing.assert_array_equal(gptq_quantize(w, h, grid), grid.quantize(w))


@pytest.mark.parametrize("act_order", [True, False])
def test_dead_inputs_keep_their_nearest_code(act_order):
    w, h, grid = toy(seed=8, n=20, dead=(3, 11))
    codes = gptq_quantize(w, h, grid, act_order=act_order)
    np.testing.assert_array_equal(codes[:, [3, 11]], grid.quantize(w)[:, [3, 11]])
    np.testing.assert_array_equal(codes, reference_gptq(w, h, grid, act_order))


def test_damping_grows_then_fails_clearly():
    w = np.array([[0.3, -0.7], [1.1, 0.2]])
    grid = fit_grid(w, GridSpec(bits=3))
    indefinite = np.array([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    codes = gptq_quantize(w, indefinite, grid)        # succeeds once damping has grown to 10
    assert codes.shape == (2, 2)
    with pytest.raises(QroundError, match="percdamp"):
        gptq_quantize(w, indefinite, grid, retries=0)
    with pytest.raises(QroundError, match="Cholesky"):
        gptq_quantize(w, np.array([[1.0, 1e3], [1e3, 1.0]]), grid)


def test_bad_input_is_named():
    w, h, grid = toy(n=10)
    with pytest.raises(QroundError, match="hessian"):
        gptq_quantize(w, h[:9, :9], grid)
    with pytest.raises(QroundError, match="grid"):
        gptq_quantize(w[:, :9], h[:9, :9], grid)
    bad = w.copy()
    bad[0, 0] = np.nan
    with pytest.raises(QroundError, match="weight"):
        gptq_quantize(bad, h, grid)
    with pytest.raises(QroundError, match="blocksize"):
        gptq_quantize(w, h, grid, blocksize=0)
    with pytest.raises(QroundError, match="percdamp"):
        gptq_quantize(w, h, grid, percdamp=-1.0)


# ----------------------------------------------------------------------------- whole models
def small_net_and_data(seed=0):
    """Linear(12, 24) -> ReLU -> Linear(24, 6) and correlated inputs: (model, batches)."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    mix = torch.randn(12, 12, generator=gen) / 3 + torch.eye(12)
    x = torch.randn(256, 12, generator=gen) @ mix
    return net, [x[i:i + 64] for i in range(0, 256, 64)]


def test_gptq_model_is_sequential_gptq_on_a_copy():
    from qround.baselines import gptq_model
    from qround.calibrate import capture_hessians
    from qround.pipeline import QuantConfig
    from qround.problems.layers import layer_weight
    net, batches = small_net_and_data()
    before = [p.detach().clone() for p in net.parameters()]
    config = QuantConfig(wbits=3, progress=False)
    qnet, seconds = gptq_model(net, batches, config)
    assert seconds > 0 and qnet is not net
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    for name in ("0", "2"):
        # H of each layer's input with the layers before it already quantised (sequential)
        h = capture_hessians(qnet, batches, layers=[name])[name]
        w = layer_weight(dict(net.named_modules())[name])
        grid = fit_grid(w, config.grid_spec(3), hessian=h)
        expect = grid.dequantize(gptq_quantize(w, h, grid))
        np.testing.assert_allclose(layer_weight(dict(qnet.named_modules())[name]), expect,
                                   rtol=1e-6, atol=1e-7)
    h_float = capture_hessians(net, batches, layers=["2"])["2"]
    assert not np.allclose(h_float, h)  # the second layer really saw quantised inputs


def gptq_and_rtn_errors(net, batches, wbits=3):
    """Mean squared output error of gptq_model's and rtn_model's copies on the batches."""
    from qround.baselines import gptq_model, rtn_model
    from qround.pipeline import QuantConfig
    x = torch.cat(batches)
    config = QuantConfig(wbits=wbits, progress=False)
    with torch.no_grad():
        ref = net(x)
        return tuple(float((q(x) - ref).square().mean())
                     for q in (gptq_model(net, batches, config)[0], rtn_model(net, config)[0]))


def test_gptq_model_output_error_below_rtn():
    err_gptq, err_rtn = gptq_and_rtn_errors(*small_net_and_data(seed=1))
    assert err_gptq < 0.8 * err_rtn


def test_rtn_model_rounds_the_chosen_layers_to_nearest():
    from qround.baselines import rtn_model
    from qround.pipeline import QuantConfig
    from qround.problems.layers import layer_weight
    net, _ = small_net_and_data()
    qnet, _ = rtn_model(net, QuantConfig(wbits=2, scale_method="minmax", exclude="^2$",
                                         progress=False))
    w = layer_weight(net[0])
    grid = fit_grid(w, GridSpec(bits=2, scale_method="minmax"))
    np.testing.assert_allclose(layer_weight(qnet[0]), grid.dequantize(grid.quantize(w)),
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(qnet[2].weight, net[2].weight)  # excluded: left in float
    with pytest.warns(UserWarning, match="module order"):
        wide, _ = rtn_model(net, QuantConfig(wbits=2, first_last_bits=8, progress=False))
    assert len(torch.unique(wide[2].weight[0])) > 4  # 8 bits on the last layer, not 2
    with pytest.raises(QroundError, match="mse-output"):
        rtn_model(net, QuantConfig(scale_method="mse-output", progress=False))
    with pytest.raises(QroundError, match="QuantConfig"):
        rtn_model(net, {"wbits": 4})


def test_gptq_model_takes_noise_from_the_config_seed_not_the_caller():
    """As quantize_model: a forward that samples used the caller's global RNG (found by
    review), so the baseline depended on it and moved it on."""
    from qround.baselines import gptq_model
    from qround.pipeline import QuantConfig

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x) + 0.3 * torch.randn(x.shape[0], 8)))

    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 6, generator=gen) for _ in range(2)]
    net, weights = Noisy(), []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        state = torch.get_rng_state()
        qnet, _ = gptq_model(net, batches, QuantConfig(wbits=3, progress=False))
        assert torch.equal(torch.get_rng_state(), state)
        weights.append(qnet.b.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(percdamp="a"), "percdamp must be a finite number"),
    (dict(percdamp=float("nan")), "percdamp must be a finite number"),
    (dict(retries=-1), "retries must be an integer"),
    (dict(act_order="yes"), "act_order must be True or False"),
    (dict(blocksize=0), "blocksize must be an integer >= 1"),
])
def test_gptq_quantize_arguments_are_named(kwargs, match):
    w = np.ones((2, 4))
    with pytest.raises(QroundError, match=match):
        gptq_quantize(w, np.eye(4), fit_grid(w, GridSpec(bits=3)), **kwargs)


# ------------------------------------------------- first_last_bits covers the first layer's group
class _InputReaders(nn.Module):
    """q, k and v read the model's input (as in attention), and a 1x1-kernel-like skip of
    another width too; mid and out follow."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 12)
        self.mid = nn.Linear(28, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(torch.cat([self.q(x), self.k(x), self.v(x)], -1))
        return self.out(torch.relu(self.mid(h)))


def _levels(module) -> int:
    """The most distinct weight values in a row (a 2-bit grid has at most 4)."""
    return max(len(torch.unique(row)) for row in module.weight.detach())


def test_gptq_model_gives_first_last_bits_to_every_layer_reading_the_input():
    from qround.baselines import gptq_model
    from qround.pipeline import QuantConfig, quantize_model

    model = _InputReaders()
    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    config = QuantConfig(wbits=2, first_last_bits=8, solver="greedy", progress=False)
    qm = quantize_model(model, batches, config)
    bits = {r.layer: r.bits for r in qm.report}
    assert bits == {"q": 8, "k": 8, "v": 8, "mid": 2, "out": 8}
    gptq, _ = gptq_model(model, batches, config)
    for name, b in bits.items():
        levels = _levels(getattr(gptq, name))
        assert (levels <= 4) == (b == 2), (name, levels)


def test_rtn_model_first_last_bits_follow_the_forward_with_an_example():
    """With an example batch, rtn_model gives first_last_bits to every layer that reads the
    first layer's input (q, k and v), as quantize_model does; in module order only the first
    module got them (k and v stayed at 3 bits, an RTN baseline unlike qround's own)."""
    from qround.baselines import rtn_model
    from qround.pipeline import QuantConfig, quantize_model

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.q, self.k, self.v = (nn.Linear(32, 32) for _ in range(3))
            self.out = nn.Linear(32, 32)
            self.head = nn.Linear(32, 3)
            for p in self.parameters():
                p.data = torch.randn(p.shape, generator=gen)

        def forward(self, x):
            return self.head(self.out(self.q(x) * self.k(x) + self.v(x)))

    net = QKV()
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    config = QuantConfig(wbits=3, first_last_bits=8, solver="nearest", scale_method="minmax",
                         progress=False)
    levels = lambda m: max(len(torch.unique(row)) for row in m.weight)  # noqa: E731
    rtn, _ = rtn_model(net, config, example=x)
    assert [levels(getattr(rtn, n)) > 8 for n in ("q", "k", "v", "out", "head")] == \
        [True, True, True, False, True]
    qm = quantize_model(net, [x], config)
    for name in ("q", "k", "v", "out", "head"):
        torch.testing.assert_close(getattr(rtn, name).weight, getattr(qm.model, name).weight)
