"""border_conv's inference path where the padding is not symmetric ("same" with an even
kernel extent): found by mutation testing (helper-174), mutant B08 (the offsets of the real
positions in the padded input taken from the bottom/right padding instead of the top/left)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qround.activations import QuantizedLayer
from qround.calibrate import _conv_padding

from .test_activations import exact_conv_layer, random_borders, tie_heavy_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(layer, x):
    """DESIGN.md section 4 by F.unfold in float64: every patch element rounded with its
    (element-wise or fused) border, zero padding kept at 0."""
    conv, act = layer.conv_view, layer.act
    w = layer.quantized_weight().detach().double()
    s = float(act.step.detach().clamp_min(1e-12))
    b0, c1, c2 = (None if t is None else t.detach().double() for t in act.coefficients())
    pads = _conv_padding(conv)
    v = x.double() / s
    vp = F.pad(v, pads)
    unfold = dict(kernel_size=conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    cols = F.unfold(vp, **unfold)
    real = F.unfold(F.pad(torch.ones_like(v), pads), **unfold)
    n, ckk, length = cols.shape
    c = x.shape[1]
    poly = c1[None, :, None] + (0 if c2 is None else c2[None, :, None] * cols)
    border = b0[None, :, None] + poly * cols
    if act.fusion_size > 1:
        border = border.view(n, c, -1, length).mean(2, keepdim=True).expand(
            n, c, ckk // c, length).reshape(n, ckk, length)
    codes = torch.floor(cols + (1 - border)).clamp(act.qmin, act.qmax) * real
    out = w.reshape(w.shape[0], -1) @ (codes * s)
    if layer.layer.bias is not None:
        out = out + layer.layer.bias.double().view(1, -1, 1)
    ho = (vp.shape[2] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
    return out.view(n, -1, ho, length // ho)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("fusion", [True, False])
@pytest.mark.parametrize("k, dilation", [((2, 4), 1), ((2, 2), (1, 3)), ((4, 1), 1)])
def test_same_padding_with_an_even_kernel_extent(fusion, k, dilation):
    layer = exact_conv_layer(3, 2, k, fusion, "quadratic", 4, True, 5, padding="same",
                             dilation=dilation)
    random_borders(layer.act, 6, 0.6)
    x = tie_heavy_input((2, 3, 7, 8), layer.act, 7)
    with torch.no_grad():
        fast = layer(x)
        layer.force_unfold = True
        unfold = layer(x)
    assert torch.equal(fast, unfold)
    torch.testing.assert_close(fast.double(), reference(layer, x), rtol=0, atol=1e-9)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_same_padding_conv1d_with_an_even_kernel():
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 4, padding="same")
    layer = QuantizedLayer(conv, 4, "linear", True)
    layer.act.calibrate(torch.tensor([-1.0, 1.0]), "minmax")
    random_borders(layer.act, 2, 0.6)
    layer.act_mode = "border"
    x = torch.randn(2, 2, 11, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast = layer(x)
        layer.force_unfold = True
        unfold = layer(x)
    torch.testing.assert_close(fast, unfold, rtol=0, atol=1e-6)
