"""qround.explicit: attention, transposed and 3-d convolutions made explicit, and fused, at
once."""
import pytest
import torch
from torch import nn

from qround.attention import LinearMultiheadAttention
from qround.conv3d import Conv3dAsConv2d
from qround.conv_transpose import ConvTransposeAsConv
from qround.errors import QroundError
from qround.explicit import explicit_layers, fuse_layers
from qround.pipeline import QuantConfig, quantize_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _All(nn.Module):
    """A 3-d conv, attention over its positions, a transposed conv up."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.up = nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1)

    def forward(self, x):                        # (N, 2, D, H, W)
        h = torch.relu(self.conv(x)).mean(2)     # (N, 8, H, W)
        n, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)         # (N, H*W, 8)
        t = self.attn(t, t, t, need_weights=False)[0]
        return self.up(t.transpose(1, 2).reshape(n, c, hh, ww))


def _model():
    torch.manual_seed(0)
    return _All().double().eval()


def _batches():
    return [torch.randn(3, 2, 4, 5, 5, generator=torch.Generator().manual_seed(i),
                        dtype=torch.float64) for i in range(2)]


def test_every_form_at_once_then_fused_back():
    model, batches = _model(), _batches()
    explicit = explicit_layers(model)
    assert type(explicit.conv) is Conv3dAsConv2d
    assert type(explicit.attn) is LinearMultiheadAttention
    assert type(explicit.up) is ConvTransposeAsConv
    assert type(model.conv) is nn.Conv3d   # a copy
    with torch.no_grad():
        torch.testing.assert_close(explicit(batches[0]), model(batches[0]), rtol=0, atol=1e-12)
    qm = quantize_model(explicit, batches, QuantConfig(wbits=3, solver="fast", seed=0))
    assert {r.layer for r in qm.report} == {"conv.conv", "attn.q_proj", "attn.k_proj",
                                            "attn.v_proj", "attn.out_proj", "up.conv"}
    fused = fuse_layers(qm.model)
    assert [type(m) for m in (fused.conv, fused.attn, fused.up)] == [
        nn.Conv3d, nn.MultiheadAttention, nn.ConvTranspose2d]
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(fused(b), qm.model(b), rtol=1e-9, atol=1e-12)


def test_quantised_inputs_stay_explicit_and_nothing_changes_before_a_refusal():
    model, batches = _model(), _batches()
    qm = quantize_model(explicit_layers(model), batches, QuantConfig(
        wbits=4, abits=8, first_last_bits=8, solver="nearest"))
    fused = fuse_layers(qm.model)   # the first layer's input stays in float: fused
    assert type(fused.conv) is nn.Conv3d
    assert type(fused.attn) is LinearMultiheadAttention and type(fused.up) is ConvTransposeAsConv
    with pytest.raises(QroundError, match="has a quantised input: none can be fused"):
        fuse_layers(nn.Sequential(fused.attn, fused.up))
    with pytest.raises(QroundError, match="no explicit module"):
        fuse_layers(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(QroundError, match="nothing to make explicit"):
        explicit_layers(nn.Sequential(nn.Linear(2, 2)))
    hooked = _model()
    hooked.up.register_forward_hook(lambda *a: None)
    with pytest.raises(QroundError, match="'up' explicit: .*forward hook"):
        explicit_layers(hooked, inplace=True)
    assert type(hooked.conv) is nn.Conv3d and type(hooked.attn) is nn.MultiheadAttention
    assert explicit_layers(hooked.conv) is not hooked.conv   # a bare layer comes back new
