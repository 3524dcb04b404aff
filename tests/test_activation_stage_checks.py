"""Behaviours of qround.activation_stage (and border_conv's flat spread) that no other test
protected (mutation testing, helper 125): load_weight_codes' shape check and clipped codes,
the default k of granularity="loss", the exact bound of _spread_shifts."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from qround import GridSpec, QroundError
from qround.activation_stage import load_weight_codes
from qround.activations import QuantizedLayer
from qround.border_conv import _spread_shifts
from qround.pipeline import QuantConfig, quantize_model
from qround.reconstruct import ReconstructConfig
from qround.writeback import QuantizedWeight

torch.set_num_threads(1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def wrapped_linear(seed=0, bits=3):
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 6, generator=gen(seed)))
    return lin, QuantizedLayer(copy.deepcopy(lin), None, weight=GridSpec(bits=bits,
                                                                          symmetric=False))


def test_load_weight_codes_refuses_codes_of_another_shape():
    lin, layer = wrapped_linear()
    codes = np.zeros((4, 5), dtype=np.int64)
    qw = QuantizedWeight(codes, np.ones((4, 1)), np.zeros((4, 1)), 3, False, None, (4, 5))
    with pytest.raises(QroundError, match="do not fit"):
        load_weight_codes(layer, qw, lin.weight)


@pytest.mark.parametrize("start", ["solver", "float"])
def test_load_weight_codes_with_clipped_codes_keeps_a_finite_soft_rounding(start):
    """A solver grid narrower than the weights clips codes at both ends: the soft rounding
    starts finite and hardens back to the solver's codes."""
    lin, layer = wrapped_linear(1)
    w = lin.weight.detach().double().numpy()
    scale = np.full((4, 1), 0.15)                       # |w| up to ~2: far beyond 7 * 0.15
    zero = np.full((4, 1), 3.0)
    codes = np.clip(np.floor(w / scale + 0.5) + zero, 0, 7).astype(np.int64)
    floor = np.floor(w / scale) + zero
    assert (floor > 7).any() and (floor < -1).any()     # clipped on both sides
    qw = QuantizedWeight(codes, scale, zero, 3, False, None, (4, 6))
    load_weight_codes(layer, qw, lin.weight, start)
    assert torch.isfinite(layer.w_round).all()
    if start == "solver":  # h(V) = 0.9 where the code is floor + 1, else 0.1, clipped ones too
        up = torch.as_tensor((codes - floor) >= 1)
        ref = torch.where(up, torch.tensor(0.9), torch.tensor(0.1))
        torch.testing.assert_close(layer.soft_weight_fraction().detach(), ref, rtol=0, atol=1e-5)
    layer.weight_mode = "soft"
    assert torch.isfinite(layer.quantized_weight()).all()
    layer.harden()
    np.testing.assert_array_equal(layer.w_codes.numpy(), codes)


class _TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(6, 6), nn.ReLU())
                                      for _ in range(2)))

    def forward(self, x):
        return self.blocks(x)


def test_loss_granularity_merges_one_pair_by_default():
    """k defaults to 1, which a model of two blocks (one adjacent pair) allows."""
    data = [torch.randn(16, 6, generator=gen(i)) for i in range(2)]
    cfg = QuantConfig(wbits=3, solver="greedy", progress=False, abits=4, granularity="loss",
                      reconstruction=ReconstructConfig(iterations=2, batch_size=8, seed=0))
    result = quantize_model(_TwoBlocks(), data, cfg)
    sel = result.units
    assert len(sel.base_units) == 2 and len(sel.merges) <= 1
    assert len(sel.units) == len(sel.base_units) - len(sel.merges)


def test_spread_shifts_reaches_the_last_element():
    b = torch.tensor([1.0, -2.0, 3.0, 5.0])
    hi = _spread_shifts(b, [3], 1, True)          # out[i] >= b[i + 3]
    lo = _spread_shifts(b, [3], 1, False)
    assert hi[0] == 5.0 and lo[0] == 5.0
    assert torch.isinf(hi[1:]).all() and (hi[1:] < 0).all() and (lo[1:] > 0).all()
    back = _spread_shifts(b, [-3], 1, True)       # out[i] >= b[i - 3]
    assert back[3] == 1.0 and torch.isinf(back[:3]).all()


def test_the_wrapped_layers_keep_the_weight_stages_group_size():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    data = [torch.randn(16, 8, generator=gen(i)) for i in range(2)]
    result = quantize_model(net, data, QuantConfig(wbits=3, solver="greedy", progress=False,
                                                   abits=4, group_size=4))
    for name in ("0", "2"):
        layer = result.model[int(name)]
        assert layer.weight_spec.group_size == 4
        qw = layer.quantized_weight_codes()
        assert qw.group_size == 4 and qw.scale.shape[1] == layer.layer.in_features // 4
