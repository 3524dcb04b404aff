"""Baseline behaviours found unguarded by mutation testing of qround.baselines (helper-133)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qround.baselines import gptq_model, gptq_quantize, rtn_model
from qround.calibrate import capture_hessians
from qround.errors import QroundError
from qround.grid import GridSpec, fit_grid
from qround.pipeline import QuantConfig
from qround.problems.layers import layer_weight

from .test_baselines import gptq_and_rtn_errors, small_net_and_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sequential_reference(net, qnet, batches, config, **kw):
    """Each layer's expected weights: GPTQ with ``kw`` on the H of its input in ``qnet``."""
    for name in ("0", "2"):
        h = capture_hessians(qnet, batches, layers=[name])[name]
        w = layer_weight(dict(net.named_modules())[name])
        grid = fit_grid(w, config.grid_spec(config.wbits), hessian=h)
        yield name, grid.dequantize(gptq_quantize(w, h, grid, **kw))


@pytest.mark.parametrize("kw", [dict(act_order=False), dict(percdamp=0.5),
                                dict(act_order=False, percdamp=2.0, blocksize=5)])
def test_gptq_model_passes_its_gptq_options_to_every_layer(kw):
    net, batches = small_net_and_data(seed=2)
    config = QuantConfig(wbits=3, progress=False)
    qnet, _ = gptq_model(net, batches, config, **kw)
    for name, expect in _sequential_reference(net, qnet, batches, config, **kw):
        np.testing.assert_allclose(layer_weight(dict(qnet.named_modules())[name]), expect,
                                   rtol=1e-6, atol=1e-7)


def test_gptq_model_fits_mse_output_grids_with_the_captured_hessian():
    net, batches = small_net_and_data(seed=3)
    config = QuantConfig(wbits=3, scale_method="mse-output", progress=False)
    qnet, _ = gptq_model(net, batches, config)
    for name, expect in _sequential_reference(net, qnet, batches, config):
        np.testing.assert_allclose(layer_weight(dict(qnet.named_modules())[name]), expect,
                                   rtol=1e-6, atol=1e-7)


def test_rtn_model_leaves_the_callers_model_untouched():
    net, batches = small_net_and_data(seed=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for example in (None, batches[0]):
        qnet, _ = rtn_model(net, QuantConfig(wbits=2, scale_method="minmax", progress=False),
                            example=example)
        assert qnet is not net and qnet[0] is not net[0]
        assert not torch.equal(qnet[0].weight, net[0].weight)
        for k, v in net.state_dict().items():
            assert torch.equal(v, before[k]), k


class _WithSpare(nn.Module):
    """``spare`` is a Linear the forward never calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.spare, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_rtn_model_with_an_example_leaves_uncalled_layers_in_float():
    net = _WithSpare()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    config = QuantConfig(wbits=2, scale_method="minmax", progress=False)
    qnet, _ = rtn_model(net, config, example=x)
    assert torch.equal(qnet.spare.weight, net.spare.weight)
    assert not torch.equal(qnet.a.weight, net.a.weight)
    plain, _ = rtn_model(net, config)        # no example: every selected layer is rounded
    assert not torch.equal(plain.spare.weight, net.spare.weight)


def test_gptq_quantize_refuses_a_grid_of_another_channel_count():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 6))
    grid = fit_grid(w[:3], GridSpec(bits=3))
    with pytest.raises(QroundError, match="grid was fitted for 3 x 6 weights, weight is 4 x 6"):
        gptq_quantize(w, np.eye(6), grid)


def _grouped_net(seed=0):
    """A grouped conv (2 groups), a depthwise one and a Linear, with correlated inputs."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    x = torch.randn(64, 4, 8, 8, generator=gen)
    x = x + 0.7 * x.roll(1, dims=1)   # correlated channels, across the two groups too
    return net, [x[i:i + 16] for i in range(0, 64, 16)]


@pytest.mark.parametrize("grid", [dict(), dict(symmetric=False, scale_method="mse-output"),
                                  dict(group_size=9, exclude="^5$")])
def test_gptq_model_rounds_a_grouped_conv_as_one_gptq_problem_per_group(grid):
    net, batches = _grouped_net()
    config = QuantConfig(wbits=3, progress=False, **grid)
    qnet, _ = gptq_model(net, batches, config)
    for name, groups in (("0", 2), ("2", 8)):
        h = capture_hessians(qnet, batches, layers=[name])[name]   # sequential: qnet's inputs
        w = layer_weight(dict(net.named_modules())[name])
        assert h.shape == (groups, w.shape[1], w.shape[1])
        out_g = w.shape[0] // groups
        expect = []
        for j in range(groups):
            wj = w[j * out_g:(j + 1) * out_g]
            g = fit_grid(wj, config.grid_spec(3), hessian=h[j])
            expect.append(g.dequantize(gptq_quantize(wj, h[j], g)))
        np.testing.assert_allclose(layer_weight(dict(qnet.named_modules())[name]),
                                   np.concatenate(expect), rtol=1e-6, atol=1e-7)


def test_gptq_model_on_grouped_convs_beats_rtn_and_leaves_the_model_alone():
    net, batches = _grouped_net(seed=1)
    before = [p.detach().clone() for p in net.parameters()]
    err_gptq, err_rtn = gptq_and_rtn_errors(net, batches)
    assert err_gptq < 0.8 * err_rtn
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


class _SometimesExpert(nn.Module):
    """``expert`` only ever sees an empty batch (an unused MoE expert)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.expert, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        routed = h[h[:, 0] > 1e9]               # never true: zero rows
        h = h.index_add(0, torch.zeros(len(routed), dtype=torch.long), self.expert(routed))
        return self.b(h)


def test_gptq_model_leaves_a_layer_that_only_sees_empty_inputs_in_float():
    net = _SometimesExpert()
    batches = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    qnet, _ = gptq_model(net, batches, QuantConfig(wbits=3, progress=False))
    assert torch.equal(qnet.expert.weight, net.expert.weight)
    assert not torch.equal(qnet.a.weight, net.a.weight)


@pytest.mark.parametrize("kw", [dict(percdamp=2.0), dict(act_order=False, percdamp=0.5,
                                                          blocksize=5)])
def test_gptq_model_passes_its_gptq_options_to_every_group_of_a_grouped_conv(kw):
    """Each group's GPTQ problem gets the caller's percdamp / blocksize / act_order, as a
    dense layer does (a group solved with the default damping gives other codes)."""
    net, batches = _grouped_net(seed=2)
    config = QuantConfig(wbits=3, progress=False)
    qnet, _ = gptq_model(net, batches, config, **kw)
    differs = False
    for name, groups in (("0", 2), ("2", 8)):
        h = capture_hessians(qnet, batches, layers=[name])[name]
        w = layer_weight(dict(net.named_modules())[name])
        out_g = w.shape[0] // groups
        expect, default = [], []
        for j in range(groups):
            wj = w[j * out_g:(j + 1) * out_g]
            g = fit_grid(wj, config.grid_spec(3), hessian=h[j])
            expect.append(g.dequantize(gptq_quantize(wj, h[j], g, **kw)))
            default.append(g.dequantize(gptq_quantize(wj, h[j], g)))
        got = layer_weight(dict(qnet.named_modules())[name])
        np.testing.assert_allclose(got, np.concatenate(expect), rtol=1e-6, atol=1e-7)
        differs |= not np.allclose(np.concatenate(expect), np.concatenate(default))
    assert differs   # the options matter on this problem: the check is not vacuous
