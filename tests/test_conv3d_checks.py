"""qround.conv3d: behaviours the mutation run found unprotected (helper-150: 40 of 57 mutants
killed before these tests, all 57 with them), and the explicit-form hints."""
import pytest
import torch
from torch import nn

from qround.conv3d import Conv3dAsConv2d, explicit_conv3d, fuse_conv3d
from qround.errors import QroundError
from qround.pipeline import QuantConfig, quantize_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def _pair():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(),
                         nn.Conv3d(3, 2, 3, padding=1)).double()


def test_height_and_width_dilation_differ_and_survive_the_fuse():
    """Per-axis dilation (depth, height, width) = (2, 1, 2): the explicit conv takes the
    height/width pair, and fuse_conv3d gives the 3-d layer all three back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 3, (2, 3, 3), dilation=(2, 1, 2), padding=(1, 2, 1)))
    model = model.double()
    x = _x(2, 2, 5, 7, 8)
    explicit = explicit_conv3d(model)
    assert explicit[0].conv.dilation == (1, 2)
    torch.testing.assert_close(explicit(x), model(x), rtol=0, atol=1e-12)
    fused = fuse_conv3d(explicit)
    assert type(fused[0]) is nn.Conv3d and fused[0].dilation == (2, 1, 2)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=1e-12)


def test_a_frozen_weight_stays_frozen_both_ways():
    model = _pair()
    model[0].weight.requires_grad_(False)
    explicit = explicit_conv3d(model)
    assert not explicit[0].conv.weight.requires_grad
    assert explicit[2].conv.weight.requires_grad and explicit[0].conv.bias.requires_grad
    back = fuse_conv3d(explicit)
    assert not back[0].weight.requires_grad
    assert back[2].weight.requires_grad and back[0].bias.requires_grad


def test_eval_mode_is_kept_both_ways():
    model = _pair().eval()
    explicit = explicit_conv3d(model)
    assert not explicit[0].training and not explicit[0].conv.training
    back = fuse_conv3d(explicit)
    assert not back[0].training and not back[2].training


def test_an_input_exactly_the_depth_span_long_is_computed_one_shorter_refused():
    torch.manual_seed(0)
    layer = nn.Conv3d(2, 2, (3, 1, 1), dilation=(2, 1, 1)).double()   # depth span 5
    explicit = Conv3dAsConv2d(layer)
    x = _x(1, 2, 5, 2, 3)
    got = explicit(x)
    assert got.shape == (1, 2, 1, 2, 3)
    torch.testing.assert_close(got, layer(x), rtol=0, atol=1e-12)
    with pytest.raises(QroundError, match="input depth 4 .*depth span 5"):
        explicit(x[:, :, :4])


def test_stack_refuses_an_input_that_is_not_5d():
    explicit = Conv3dAsConv2d(nn.Conv3d(2, 2, 1))
    with pytest.raises(QroundError, match="5-d input"):
        explicit.stack(torch.zeros(2, 4, 4, 4))


def test_refusals_of_what_is_not_a_plain_conv3d():
    with pytest.raises(QroundError, match="Conv2d is not an nn.Conv3d"):
        Conv3dAsConv2d(nn.Conv2d(2, 2, 3))
    layer = nn.Conv3d(2, 2, 1)
    del layer.bias
    layer.bias = torch.zeros(2)   # a plain tensor, not a parameter
    with pytest.raises(QroundError, match="bias is not a parameter"):
        explicit_conv3d(nn.Sequential(layer))
    with pytest.raises(QroundError, match="nn.Module, got str"):
        explicit_conv3d("model")
    with pytest.raises(QroundError, match="nn.Module, got list"):
        fuse_conv3d([Conv3dAsConv2d(nn.Conv3d(1, 1, 1))])


def test_inplace_changes_the_model_itself_both_ways():
    model = _pair()
    x = _x(1, 2, 3, 4, 4)
    with torch.no_grad():
        want = model(x)
    explicit = explicit_conv3d(model, inplace=True)
    assert explicit is model and type(model[0]) is Conv3dAsConv2d
    back = fuse_conv3d(model, inplace=True)
    assert back is model and type(model[0]) is nn.Conv3d and type(model[2]) is nn.Conv3d
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)


def test_fuse_refuses_a_replaced_conv():
    explicit = explicit_conv3d(_pair())
    explicit[2].conv = nn.Identity()
    with pytest.raises(QroundError, match=r"'2'.conv is a Identity"):
        fuse_conv3d(explicit)


def test_fuse_refuses_when_every_conv_has_a_quantised_input():
    """abits without first_last_bits: both explicit convs get an input quantiser, so none can
    be an nn.Conv3d; fuse_conv3d says so instead of returning an unchanged copy."""
    model = _pair()
    batches = [_x(2, 2, 3, 4, 4, seed=s) for s in range(2)]
    qm = quantize_model(explicit_conv3d(model), batches,
                        QuantConfig(wbits=4, abits=8, solver="nearest"))
    assert qm.model[0].conv.act is not None and qm.model[2].conv.act is not None
    with pytest.raises(QroundError, match="every Conv3dAsConv2d has a quantised input"):
        fuse_conv3d(qm.model)


def test_a_subclass_with_its_own_forward_is_not_pointed_to_the_explicit_form():
    """The explicit forms refuse a subclass with its own forward, so the skip reason and
    problems_from_layer's error do not recommend them for one (helper-150)."""
    from qround.problems.layers import problems_from_layer

    class Own3d(nn.Conv3d):
        def forward(self, x):
            return super().forward(x) * 2

    class OwnUp(nn.ConvTranspose2d):
        def forward(self, x, output_size=None):
            return super().forward(x) * 2

    model = nn.Sequential(Own3d(1, 2, 1), nn.Flatten(3), OwnUp(2, 2, 1), nn.Flatten(),
                          nn.Linear(16, 2))
    qm = quantize_model(model, [torch.randn(3, 1, 2, 2, 2)], QuantConfig(wbits=4,
                                                                        solver="nearest"))
    for name in ("0", "2"):
        assert "stay in float" in qm.skipped[name] and "explicit" not in qm.skipped[name]
    for layer in (Own3d(1, 2, 1), OwnUp(2, 2, 1)):
        with pytest.raises(QroundError, match="unsupported layer type") as info:
            problems_from_layer(layer, torch.eye(2).numpy())
        assert "explicit" not in str(info.value)
    plain = quantize_model(nn.Sequential(nn.Conv3d(1, 2, 1), nn.Flatten(), nn.Linear(16, 2)),
                           [torch.randn(3, 1, 2, 2, 2)], QuantConfig(wbits=4, solver="nearest"))
    assert "explicit_conv3d" in plain.skipped["0"]
