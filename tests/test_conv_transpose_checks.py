"""qround.conv_transpose's checks, flags and per-dimension settings (helper-147's mutation
testing: each test fails on a mutant the other tests let through)."""
import pytest
import torch
from torch import nn

from qround.activations import QuantizedLayer
from qround.conv_transpose import (ConvTransposeAsConv, conv_weight, explicit_conv_transpose,
                                   fuse_conv_transpose, transposed_weight)
from qround.errors import QroundError
from qround.export import load
from qround.pipeline import QuantConfig, quantize_model
from qround.reconstruct import ReconstructConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layer2d(seed=0, **kw):
    torch.manual_seed(seed)
    layer = nn.ConvTranspose2d(4, 6, **kw).double().eval()
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.add_(1.0)
    return layer


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


# --- weight maps ---------------------------------------------------------------------------

def test_weight_maps_refuse_groups_that_do_not_divide_the_channels():
    with pytest.raises(QroundError, match="3 input channels cannot have 2 groups"):
        conv_weight(torch.zeros(3, 2, 3, 3), groups=2)
    with pytest.raises(QroundError, match="5 output channels cannot have 2 groups"):
        transposed_weight(torch.zeros(5, 2, 3), groups=2)


# --- the explicit module computes torch's transposed convolution ---------------------------

def test_per_dimension_stride_kernel_padding_and_dilation():
    """Different settings per spatial dimension (only one dimension strided; a non-square
    kernel, padding and dilation) on a non-square input: the same output as torch."""
    x = _x(2, 4, 5, 7)
    for kw in ({"kernel_size": 3, "stride": (2, 1)},
               {"kernel_size": 3, "stride": (1, 3)},
               {"kernel_size": (3, 1), "padding": (2, 0), "dilation": (1, 2)},
               {"kernel_size": (1, 3), "stride": (3, 2), "padding": (0, 1),
                "output_padding": (2, 0), "dilation": (2, 1)}):
        layer = _layer2d(**kw)
        want = layer(x)
        got = ConvTransposeAsConv(layer)(x)
        assert got.shape == want.shape, kw
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_output_size_with_the_batch_and_channel_sizes_included():
    """torch takes output_size as the spatial sizes or the whole output shape ((N, C, ...)
    batched, (C, ...) unbatched); so does the explicit module."""
    layer = _layer2d(kernel_size=3, stride=2)
    explicit = ConvTransposeAsConv(layer)
    x = _x(2, 4, 4, 4)
    for size in ([2, 6, 10, 9], torch.Size([2, 6, 9, 10])):
        torch.testing.assert_close(explicit(x, output_size=size), layer(x, output_size=size),
                                   rtol=0, atol=1e-12)
        assert explicit(x, output_size=size).shape == tuple(size)
    unbatched = x[0]
    for size in ([6, 10, 10], [10, 9]):
        got = explicit(unbatched, output_size=size)
        torch.testing.assert_close(got, layer(unbatched, output_size=size), rtol=0, atol=1e-12)
        assert got.shape[-2:] == tuple(size[-2:])
    with pytest.raises(QroundError, match="4 sizes"):   # (N, C, H, W) for an unbatched input
        explicit(unbatched, output_size=[1, 6, 10, 10])


def test_output_size_outside_the_range_the_stride_allows_is_refused():
    """Spatial sizes 9 or 10 come from a 4x4 input (kernel 3, stride 2): 8 and 11 are
    refused, as torch refuses them, not padded or cropped to."""
    layer = _layer2d(kernel_size=3, stride=2)
    explicit = ConvTransposeAsConv(layer)
    x = _x(1, 4, 4, 4)
    for size in ([11, 9], [9, 11], [8, 9], [9, 8]):
        with pytest.raises(ValueError):
            layer(x, output_size=size)
        with pytest.raises(QroundError, match="can be 9 to 10"):
            explicit(x, output_size=size)


# --- flags and mode ------------------------------------------------------------------------

def test_a_frozen_weight_and_eval_mode_stay_through_explicit_and_fuse():
    layer = _layer2d(kernel_size=3, stride=2)   # eval
    layer.weight.requires_grad_(False)
    explicit = explicit_conv_transpose(nn.Sequential(layer).eval())
    assert not explicit[0].training and not explicit[0].conv.training
    assert not explicit[0].conv.weight.requires_grad and explicit[0].conv.bias.requires_grad
    back = fuse_conv_transpose(explicit)[0]
    assert type(back) is nn.ConvTranspose2d
    assert not back.training
    assert not back.weight.requires_grad and back.bias.requires_grad
    direct = ConvTransposeAsConv(layer)
    assert not direct.training


# --- refusals ------------------------------------------------------------------------------

def test_a_bias_that_is_not_a_parameter_is_refused():
    layer = nn.ConvTranspose2d(2, 2, 3)
    bias = layer.bias.detach().clone()
    del layer.bias
    layer.bias = bias   # a plain tensor attribute
    with pytest.raises(QroundError, match="bias is not a parameter"):
        explicit_conv_transpose(nn.Sequential(layer))


def test_a_padding_mode_torch_cannot_compute_is_refused():
    layer = nn.ConvTranspose2d(2, 2, 3)
    layer.padding_mode = "reflect"
    with pytest.raises(ValueError):
        layer(torch.zeros(1, 2, 4, 4))
    with pytest.raises(QroundError, match="padding_mode 'reflect'"):
        explicit_conv_transpose(nn.Sequential(layer))


def test_a_module_that_is_not_a_transposed_convolution_is_refused():
    for module in (nn.Conv2d(2, 2, 3), nn.Linear(2, 2)):
        with pytest.raises(QroundError, match="is not an nn.ConvTranspose1d"):
            ConvTransposeAsConv(module)


def test_a_refused_layer_leaves_the_model_unchanged_even_inplace():
    """Every layer is checked before anything changes: with inplace, a model whose second
    transposed convolution is refused keeps its first one."""
    hooked = nn.ConvTranspose2d(2, 2, 3)
    hooked.register_forward_hook(lambda *a: None)
    model = nn.Sequential(nn.ConvTranspose2d(2, 2, 3), hooked)
    with pytest.raises(QroundError, match="'1'.*forward hook"):
        explicit_conv_transpose(model, inplace=True)
    assert type(model[0]) is nn.ConvTranspose2d and model[1] is hooked


def test_fuse_refuses_what_is_not_a_module_and_a_replaced_conv():
    with pytest.raises(QroundError, match="must be an nn.Module"):
        fuse_conv_transpose("model")
    explicit = explicit_conv_transpose(nn.Sequential(nn.ConvTranspose2d(2, 3, 3)))
    explicit[0].conv = nn.Identity()
    with pytest.raises(QroundError, match=r"'0'.conv is a Identity"):
        fuse_conv_transpose(explicit)


# --- fuse leaves its input alone -----------------------------------------------------------

class _Up(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(x)))


def test_fuse_of_a_weight_only_reconstruction_keeps_the_callers_wrapper():
    torch.manual_seed(0)
    model = _Up().double().eval()
    batches = [_x(4, 4, 5, 5, seed=i) for i in range(2)]
    qm = quantize_model(explicit_conv_transpose(model), batches, QuantConfig(
        wbits=3, solver="fast", seed=0, granularity="layer",
        reconstruction=ReconstructConfig(iterations=5, batch_size=4)))
    assert isinstance(qm.model.up.conv, QuantizedLayer) and qm.model.up.conv.act is None
    fused = fuse_conv_transpose(qm.model)
    assert type(fused.up) is nn.ConvTranspose2d
    assert isinstance(qm.model.up.conv, QuantizedLayer)   # the quantised model is untouched
    with torch.no_grad():
        torch.testing.assert_close(fused(batches[0]), qm.model(batches[0]), rtol=0,
                                   atol=1e-12)


# --- the load hint -------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [1, 2])
def test_load_into_the_plain_model_names_explicit_conv_transpose(tmp_path, dims):
    torch.manual_seed(0)
    kind = nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d
    model = nn.Sequential(kind(3, 2, 3, stride=2)).double().eval()
    batches = [_x(4, 3, *([5] * dims), seed=i) for i in range(2)]
    qm = quantize_model(explicit_conv_transpose(model), batches,
                        QuantConfig(wbits=3, solver="nearest"))
    path = tmp_path / "up.safetensors"
    qm.save(path)
    with pytest.raises(QroundError, match=rf"'0.conv' is missing from the model \(its "
                                          rf"ConvTranspose{dims}d .*explicit_conv_transpose"):
        load(model, path)


def test_an_output_padding_torch_cannot_run_is_refused():
    """torch raises on every forward of a layer whose output_padding is not below the larger of
    stride and dilation; the explicit module would compute an output for it (helper-147)."""
    layer = nn.ConvTranspose2d(2, 2, 3, stride=1, output_padding=1)
    with pytest.raises(RuntimeError):
        layer(torch.zeros(1, 2, 4, 4))
    with pytest.raises(QroundError, match="output_padding .* not below"):
        ConvTransposeAsConv(layer)


def test_fuse_keeps_only_the_layers_with_quantised_inputs_explicit():
    """With first_last_bits, the first layer's input stays in float (a QuantizedLayer without
    an input quantiser): it is fused, the others stay explicit, and the model computes what the
    quantised one does (helper-148: one quantised input refused the whole fuse)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, 2), nn.ReLU(),
                          nn.ConvTranspose2d(4, 4, 3, 1), nn.ReLU(),
                          nn.ConvTranspose2d(4, 2, 3, 2)).double().eval()
    batches = [_x(4, 3, 4, 4, seed=i) for i in range(2)]
    qm = quantize_model(explicit_conv_transpose(model), batches, QuantConfig(
        wbits=3, abits=4, first_last_bits=8, solver="fast", seed=0))
    assert qm.model[0].conv.act is None and qm.model[2].conv.act is not None
    fused = fuse_conv_transpose(qm.model)
    assert type(fused[0]) is nn.ConvTranspose2d
    assert type(fused[2]) is ConvTransposeAsConv and type(fused[4]) is ConvTransposeAsConv
    assert type(qm.model[0]) is ConvTransposeAsConv   # not in place
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(fused(b), qm.model(b), rtol=0, atol=1e-12)
    with pytest.raises(QroundError, match="every ConvTransposeAsConv has a quantised input"):
        fuse_conv_transpose(nn.Sequential(fused[2], fused[4]))
