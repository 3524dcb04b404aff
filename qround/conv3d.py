"""``nn.Conv3d`` as an ``nn.Conv2d`` over depth-stacked channels, so it is rounded.

A 3-d convolution (video networks, 3-d medical segmentation, volumetric decoders) computes, at
each output depth ``d``, a 2-d convolution of the ``kernel_depth`` input slices it reads, taken
together as ``in_channels * kernel_depth`` channels, with the weight ``(out, in/groups, kd, kh,
kw)`` read as ``(out, in/groups * kd, kh, kw)``: the same numbers in the same order.
:func:`explicit_conv3d` gives a copy of a model in which every nn.Conv3d is a
:class:`Conv3dAsConv2d`: that slicing (depth padding, stride and dilation) followed by an
nn.Conv2d named ``conv`` run on every output depth at once, which quantize_model rounds as any
other Conv2d, one rounding problem per output channel of the 3-d convolution (its
``in/groups * kd * kh * kw`` weights).  :func:`fuse_conv3d` turns the rounded convs back into
nn.Conv3d modules where no input quantiser wraps them.

The explicit form computes the same function (up to float round-off) and the same products,
but copies the input ``kernel_depth / depth_stride`` times over (the stacked slices).  Its
statistics are exact: each output position's input vector is its 3-d patch, ordered (input
channel, depth, height, width) as the weight is, so ``group_size`` counts inputs in that order.

With quantised inputs, the conv's input is the stacked slices: a depth-padding zero is an input
like any other (height and width padding stay exact zeros), and AQuant's border fusion
(``QuantConfig.fusion``) shares a border over the ``kh x kw`` window of each (channel, depth
tap), not over the whole 3-d window; for a ``(k, 1, 1)`` kernel it changes nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from .attention import _replace
from .conv_transpose import _fuse_explicit, _replace_refusal, _take, _tie_refusal
from .conv_transpose import _quantised_input  # noqa: F401 (qround.explicit reads it here)
from .errors import QroundError, copy_module

__all__ = ["Conv3dAsConv2d", "explicit_conv3d", "fuse_conv3d"]


def _depth_pads(layer: nn.Conv3d) -> tuple[int, int]:
    """(front, back) zeros (or reflected, replicated, wrapped samples) added along depth."""
    if layer.padding == "valid":
        return 0, 0
    if layer.padding == "same":   # torch's split of the total: the extra one at the back
        total = layer.dilation[0] * (layer.kernel_size[0] - 1)
        return total // 2, total - total // 2
    return layer.padding[0], layer.padding[0]


class Conv3dAsConv2d(nn.Module):
    """What an ``nn.Conv3d`` computes, as its depth slices stacked into channels followed by
    ``conv``: an nn.Conv2d with ``in_channels * kd`` inputs, the height/width kernel, stride,
    padding, dilation and padding mode of the 3-d layer, the same groups, its weight reshaped to
    ``(out, in/groups * kd, kh, kw)`` and its bias.  Made from ``layer`` (its weights copied);
    same ``forward(input)`` and results, up to float round-off."""

    # block reconstruction reads this module's (N, C, D, H, W) output as channels first
    _qround_channels_first = True

    def __init__(self, layer: nn.Module, shared: dict | None = None):
        """``shared``: {id of a source parameter: the parameter made from it}, so that layers
        sharing a weight (or bias) get one shared parameter."""
        super().__init__()
        why = _refusal(layer)
        if why:
            raise QroundError(f"cannot make this {type(layer).__name__} explicit: {why}")
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride = tuple(layer.kernel_size), tuple(layer.stride)
        self.padding = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
        self.dilation, self.groups = tuple(layer.dilation), layer.groups
        self.padding_mode = layer.padding_mode
        self.depth_pads = _depth_pads(layer)
        w = layer.weight
        kd, kh, kw = self.kernel_size
        padding = self.padding if isinstance(self.padding, str) else self.padding[1:]
        self.conv = skip_init(nn.Conv2d, self.in_channels * kd, self.out_channels, (kh, kw),
                              stride=self.stride[1:], padding=padding,
                              dilation=self.dilation[1:], groups=self.groups,
                              bias=layer.bias is not None, padding_mode=self.padding_mode,
                              device=w.device, dtype=w.dtype)
        _take(self.conv, layer, w.reshape(self.conv.weight.shape), shared)
        self.train(layer.training)

    @property
    def weight(self) -> torch.Tensor:
        """The 3-d layer's weight ``(out, in/groups, kd, kh, kw)``: a view of ``conv``'s."""
        return self.conv.weight.reshape(self.out_channels, -1, *self.kernel_size)

    @property
    def bias(self) -> torch.Tensor | None:
        """``conv``'s bias, which is the 3-d layer's."""
        return self.conv.bias

    def stack(self, x: torch.Tensor) -> torch.Tensor:
        """The input of ``conv``: (N, C, D, H, W) -> (N * D_out, C * kd, H, W), the ``kd``
        depth slices that output depth ``d`` reads, channel-major (c, then depth)."""
        if x.dim() != 5:
            raise QroundError(f"stack takes a 5-d input (N, C, D, H, W), got shape "
                              f"{tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise QroundError(f"input has {x.shape[1]} channels, the layer expects "
                              f"{self.in_channels} (input shape {tuple(x.shape)})")
        front, back = self.depth_pads
        if front or back:
            if self.padding_mode == "zeros":
                x = F.pad(x, (0, 0, 0, 0, front, back))
            else:   # per-dimension padding: depth here, height and width in conv
                x = F.pad(x, (0, 0, 0, 0, front, back), mode=self.padding_mode)
        kd, dd, sd = self.kernel_size[0], self.dilation[0], self.stride[0]
        span = dd * (kd - 1) + 1
        if x.shape[2] < span:
            raise QroundError(f"input depth {x.shape[2]} (after padding) is smaller than the "
                              f"kernel's depth span {span}")
        # (N, C, D_out, H, W, span) -> the kd taps -> (N, D_out, C, kd, H, W)
        taps = x.unfold(2, span, sd)[..., ::dd]
        n, c, d_out, h, w, _ = taps.shape
        return taps.permute(0, 2, 1, 5, 3, 4).reshape(n * d_out, c * kd, h, w)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() not in (4, 5):
            raise QroundError(f"a 3-d convolution takes 4-d or 5-d input, got shape "
                              f"{tuple(input.shape)}")
        batched = input.dim() == 5
        x = input if batched else input.unsqueeze(0)
        n = x.shape[0]
        front, back = self.depth_pads
        span = self.dilation[0] * (self.kernel_size[0] - 1) + 1
        d_out = (x.shape[2] + front + back - span) // self.stride[0] + 1
        out = self.conv(self.stack(x))                       # (N * D_out, out, H', W')
        out = out.reshape(n, d_out, *out.shape[1:]).transpose(1, 2)
        return out if batched else out.squeeze(0)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


def _refusal(layer: nn.Module) -> str | None:
    """Why an nn.Conv3d cannot be made explicit (None when it can)."""
    if not isinstance(layer, nn.Conv3d):
        return f"{type(layer).__name__} is not an nn.Conv3d"
    return _replace_refusal(layer, nn.Conv3d)


def explicit_conv3d(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace``) whose nn.Conv3d modules are
    :class:`Conv3dAsConv2d`, so quantize_model rounds them (as their ``conv``).  Every module is
    checked before anything changes; QroundError names one that cannot be made explicit (a
    subclass with its own forward, a recomputed or lazy weight, hooks of its own).  Layers that
    share a weight (or a bias) share the parameter made from it, so it is rounded once; one
    shared with a layer of another kind is refused (the reshaped copy could not stay tied to
    it).  A model that is itself an nn.Conv3d comes back as a new module, ``inplace`` or not."""
    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be an nn.Module, got {type(model).__name__}")
    why = _explicit_refusal(model)
    if why:
        raise QroundError(why)
    if not any(isinstance(m, nn.Conv3d) for m in model.modules()):
        raise QroundError("model has no nn.Conv3d")
    return _explicit(model if inplace else copy_module(model))


def _explicit_refusal(model: nn.Module) -> str | None:
    """Why ``model``'s 3-d convolutions cannot be made explicit (the whole message), or None."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv3d) and _refusal(m):
            return f"cannot make {type(m).__name__} {name or '<model>'!r} explicit: {_refusal(m)}"
    why = _tie_refusal(model, nn.Conv3d)
    return f"cannot make the 3-d convolutions explicit: {why}" if why else None


def _explicit(new: nn.Module) -> nn.Module:
    """:func:`explicit_conv3d` on a checked model, in place."""
    shared: dict = {}
    new, _ = _replace(new, nn.Conv3d, lambda layer: Conv3dAsConv2d(layer, shared))
    return new


def _fused(explicit: Conv3dAsConv2d, shared: dict) -> nn.Conv3d:
    conv = explicit.conv
    w = conv.weight
    layer = skip_init(nn.Conv3d, explicit.in_channels, explicit.out_channels,
                      explicit.kernel_size, stride=explicit.stride, padding=explicit.padding,
                      dilation=explicit.dilation, groups=explicit.groups,
                      bias=conv.bias is not None, padding_mode=explicit.padding_mode,
                      device=w.device, dtype=w.dtype)
    _take(layer, conv, w.reshape(layer.weight.shape), shared)
    layer.train(explicit.training)
    return layer


def fuse_conv3d(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Undo :func:`explicit_conv3d`: a copy of ``model`` (itself with ``inplace``) whose
    :class:`Conv3dAsConv2d` modules are nn.Conv3d again, holding their (rounded) weights and
    biases.  A module whose ``conv`` an input quantiser wraps stays explicit (nn.Conv3d could
    not quantise its input), the others are fused; QroundError when every one has one."""
    return _fuse_explicit(model, inplace, Conv3dAsConv2d, (nn.Conv2d,), _fused,
                          "explicit_conv3d", "nn.Conv3d")
