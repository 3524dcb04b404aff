"""``nn.ConvTranspose1d`` / ``nn.ConvTranspose2d`` as the convolution they equal, so they are
rounded.

A transposed convolution (the upsampling layers of U-Nets, autoencoder and GAN decoders,
segmentation heads, HiFi-GAN's vocoder) is a convolution of its input with zeros inserted
between the samples (``stride - 1`` of them), padded by ``dilation * (kernel - 1) - padding``
on each side (and ``output_padding`` more at the end), with the kernel flipped and its two
channel axes swapped.  :func:`explicit_conv_transpose` gives a copy of a model in which every
such layer is a :class:`ConvTransposeAsConv`: that input expansion followed by an nn.Conv2d (or
nn.Conv1d) named ``conv``, which quantize_model rounds as any other conv, one rounding problem
per output channel of the transposed convolution.  :func:`fuse_conv_transpose` turns the rounded
convs back into nn.ConvTranspose modules where no input quantiser wraps them.

The explicit form computes the same function (up to float round-off: the products are summed in
another order) with about ``stride ** dims`` times the multiplications (output positions over
input positions), most of them by the inserted zeros; the fused model has none of that cost.
Its statistics are exact: the input vectors ``x`` of ``H = E[x x^T]`` are the patches of the
expanded input, which are what each output position of the transposed convolution multiplies
its weights with.

With quantised inputs, the conv's input is the expanded one: the inserted and padding zeros are
inputs like any other, which round to 0 unless a learned AQuant border leaves (0, 1].

The weight of the conv is ``(out, in / groups, *kernel)``, the transposed one's
``(in, out / groups, *kernel)`` with the kernel flipped: ``group_size`` counts inputs in the
conv's order (input channel, then the flipped kernel positions), so a ``group_size`` that is a
multiple of the kernel's size groups whole input channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from .attention import _replace
from .errors import QroundError, copy_module
from .problems.layers import forward_hooks, weight_not_writable

__all__ = ["ConvTransposeAsConv", "explicit_conv_transpose", "fuse_conv_transpose",
           "conv_weight", "transposed_weight"]

_KINDS = (nn.ConvTranspose1d, nn.ConvTranspose2d)
_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}


def conv_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight ``(out, in/groups, *k)`` of the convolution that a transposed convolution of
    weight ``(in, out/groups, *k)`` equals on the expanded input: channel axes swapped within
    each group, kernel flipped.  A new tensor."""
    c_in, out_g, *k = weight.shape
    if c_in % groups:
        raise QroundError(f"a weight of {c_in} input channels cannot have {groups} groups")
    w = weight.reshape(groups, c_in // groups, out_g, *k).transpose(1, 2)
    return w.reshape(groups * out_g, c_in // groups, *k).flip(list(range(2, 2 + len(k))))


def transposed_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of :func:`conv_weight`: a conv weight ``(out, in/groups, *k)`` as the weight
    ``(in, out/groups, *k)`` of the transposed convolution it comes from."""
    out, in_g, *k = weight.shape
    if out % groups:
        raise QroundError(f"a weight of {out} output channels cannot have {groups} groups")
    w = weight.flip(list(range(2, 2 + len(k)))).reshape(groups, out // groups, in_g, *k)
    return w.transpose(1, 2).reshape(groups * in_g, out // groups, *k)


class ConvTransposeAsConv(nn.Module):
    """What an ``nn.ConvTranspose1d`` / ``nn.ConvTranspose2d`` computes, as an input expansion
    (zeros inserted between samples, then padded or cropped) followed by ``conv``: an
    nn.Conv1d / nn.Conv2d with stride 1, no padding, the same dilation and groups, the flipped
    and transposed weight (:func:`conv_weight`) and the same bias.  Made from ``layer`` (its
    weights copied); same ``forward(input, output_size=None)`` and results, up to float
    round-off."""

    padding_mode = "zeros"   # the only one torch's transposed convolutions compute

    def __init__(self, layer: nn.Module, shared: dict | None = None):
        """``shared``: {id of a source parameter: the parameter made from it}, filled and read
        so that layers sharing a weight (or bias) get one shared parameter."""
        super().__init__()
        why = _refusal(layer)
        if why:
            raise QroundError(f"cannot make this {type(layer).__name__} explicit: {why}")
        self.dims = 1 if isinstance(layer, nn.ConvTranspose1d) else 2
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride = tuple(layer.kernel_size), tuple(layer.stride)
        self.padding, self.dilation = tuple(layer.padding), tuple(layer.dilation)
        self.output_padding, self.groups = tuple(layer.output_padding), layer.groups
        w = layer.weight
        self.conv = skip_init(
            _CONV[self.dims], self.in_channels, self.out_channels, self.kernel_size,
            dilation=self.dilation, groups=self.groups, bias=layer.bias is not None,
            device=w.device, dtype=w.dtype)
        _take(self.conv, layer, conv_weight(w, self.groups), shared)
        self.train(layer.training)

    @property
    def weight(self) -> torch.Tensor:
        """The transposed layer's weight ``(in, out/groups, *kernel)``, computed from
        ``conv``'s (read-only: a new tensor on every access)."""
        return transposed_weight(self.conv.weight, self.groups)

    @property
    def bias(self) -> torch.Tensor | None:
        """``conv``'s bias, which is the transposed layer's."""
        return self.conv.bias

    def _extra(self, x: torch.Tensor, output_size) -> tuple[int, ...]:
        """The output padding of this call: the layer's, or what ``output_size`` asks for."""
        if output_size is None:
            return self.output_padding
        sizes = list(output_size)
        batched = x.dim() == self.dims + 2
        if len(sizes) == self.dims + (2 if batched else 1):
            sizes = sizes[-self.dims:]
        if len(sizes) != self.dims:
            raise QroundError(f"output_size {list(output_size)} has {len(sizes)} sizes for a "
                              f"{self.dims}-d transposed convolution's {x.dim()}-d input")
        extra = []
        for d in range(self.dims):
            least = ((x.shape[d - self.dims] - 1) * self.stride[d] - 2 * self.padding[d]
                     + self.dilation[d] * (self.kernel_size[d] - 1) + 1)
            if not least <= sizes[d] < least + self.stride[d]:
                raise QroundError(f"output_size {sizes} cannot come from an input of spatial "
                                  f"size {tuple(x.shape[-self.dims:])}: dimension {d} can be "
                                  f"{least} to {least + self.stride[d] - 1}")
            extra.append(sizes[d] - least)
        return tuple(extra)

    def expand(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        """The input of ``conv``: ``stride - 1`` zeros between the samples of every spatial
        dimension, then ``dilation * (kernel - 1) - padding`` zeros on both sides (a negative
        number crops) and the output padding at the end."""
        if x.dim() not in (self.dims + 1, self.dims + 2):
            raise QroundError(f"a {self.dims}-d transposed convolution takes "
                              f"{self.dims + 1}-d or {self.dims + 2}-d input, got shape "
                              f"{tuple(x.shape)}")
        if x.shape[-self.dims - 1] != self.in_channels:
            raise QroundError(f"input has {x.shape[-self.dims - 1]} channels, the layer "
                              f"expects {self.in_channels} (input shape {tuple(x.shape)})")
        extra = self._extra(x, output_size)
        if any(s > 1 for s in self.stride):
            size = [(n - 1) * s + 1 for n, s in zip(x.shape[-self.dims:], self.stride)]
            spread = x.new_zeros(*x.shape[:-self.dims], *size)
            index = (...,) + tuple(slice(None, None, s) for s in self.stride)
            spread[index] = x
            x = spread
        pads = []
        for d in reversed(range(self.dims)):   # F.pad: last dimension first
            side = self.dilation[d] * (self.kernel_size[d] - 1) - self.padding[d]
            pads += [side, side + extra[d]]
        return F.pad(x, pads) if any(pads) else x

    def forward(self, input: torch.Tensor, output_size=None) -> torch.Tensor:
        return self.conv(self.expand(input, output_size))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, "
                f"output_padding={self.output_padding}")


def _take(new: nn.Module, old: nn.Module, weight: torch.Tensor, shared: dict | None) -> None:
    """``new`` (a layer of the other form) takes ``weight`` (``old``'s, in ``new``'s layout)
    and ``old``'s bias, their trainable flags, and the parameters already made from tied ones
    (:func:`_share`)."""
    with torch.no_grad():
        new.weight.copy_(weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    _share(new, old, shared)


def _share(new: nn.Module, old: nn.Module, shared: dict | None) -> None:
    """Give ``new`` the parameters already made from ``old``'s weight and bias (tied to
    another layer's), or record its own as made from them."""
    if shared is None:
        return
    for attr in ("weight", "bias"):
        source, mine = getattr(old, attr), getattr(new, attr)
        if source is None:
            continue
        made = shared.setdefault(id(source), mine)
        if made is not mine:
            setattr(new, attr, made)


def _tie_refusal(model: nn.Module, kinds) -> str | None:
    """Why the ``kinds`` layers' parameters cannot stay tied through the change of form: a
    weight or bias shared with a module of another kind (a copy in another layout cannot stay
    tied to it), or a weight shared by layers of different groups (None when every tie can be
    kept)."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, m in model.named_modules():   # a module held under two names: once
        for p in m._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append((name or "<model>", m))
    for name, m in model.named_modules():
        if not isinstance(m, kinds):
            continue
        for attr in ("weight", "bias"):
            p = getattr(m, attr)
            others = [(n, o) for n, o in holders.get(id(p), ()) if o is not m]
            foreign = [n for n, o in others if not isinstance(o, kinds)]
            if foreign:
                return (f"{name or '<model>'!r} shares its {attr} with {foreign[0]!r} "
                        f"({type(dict(others)[foreign[0]]).__name__}), which would keep the "
                        "original layout: untie them (layer." + attr + " = nn.Parameter(layer."
                        + attr + ".detach().clone())) to round them separately")
            if attr == "weight" and any(o.groups != m.groups for _, o in others):
                return (f"{name or '<model>'!r} shares its weight with a layer of other "
                        "groups")
    return None


def _replace_refusal(layer: nn.Module, kind: type) -> str | None:
    """Why ``layer`` (an instance of ``kind``) cannot be replaced by an explicit module that
    takes its parameters, whatever the kind (None when it can): a forward of its own, a
    weight that is not a plain parameter, hooks the new module would not carry, a computed
    bias.  Shared with qround.conv3d."""
    if type(layer).forward is not kind.forward:
        return f"{type(layer).__name__} subclasses nn.{kind.__name__} with its own forward"
    why = weight_not_writable(layer)   # before hooks: a lazy module's is its initialiser
    if why:
        return why
    if forward_hooks(layer):
        return (f"it has a {' and a '.join(forward_hooks(layer))}, which the new module would "
                "not carry: remove it, or register it on a parent module")
    if layer.bias is not None and not isinstance(layer.bias, nn.Parameter):
        return "its bias is not a parameter (computed on every forward?)"
    return None


def _refusal(layer: nn.Module) -> str | None:
    """Why a transposed convolution cannot be made explicit (None when it can)."""
    kind = next((k for k in _KINDS if isinstance(layer, k)), None)
    if kind is None:
        return f"{type(layer).__name__} is not an nn.ConvTranspose1d or nn.ConvTranspose2d"
    why = _replace_refusal(layer, kind)
    if why:
        return why
    if layer.padding_mode != "zeros":
        return f"padding_mode {layer.padding_mode!r} (torch computes only 'zeros')"
    if any(op >= max(s, d) for op, s, d in zip(layer.output_padding, layer.stride,
                                                layer.dilation)):
        return (f"output_padding {tuple(layer.output_padding)} is not below the larger of "
                f"stride {tuple(layer.stride)} and dilation {tuple(layer.dilation)} in every "
                "dimension: torch cannot run it")
    return None


def explicit_conv_transpose(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace``) whose nn.ConvTranspose1d /
    nn.ConvTranspose2d modules are :class:`ConvTransposeAsConv`, so quantize_model rounds them
    (as their ``conv``).  Every module is checked before anything changes; QroundError names
    one that cannot be made explicit (a subclass with its own forward, a recomputed or lazy
    weight, hooks of its own).  Transposed layers that share a weight (or a bias) share the
    parameter made from it, so quantize_model rounds it once; one shared with a layer of
    another kind (a tied autoencoder's encoder) is refused, as the flipped copy could not stay
    tied to it.  A model that is itself a transposed convolution comes back as a new module,
    ``inplace`` or not."""
    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be an nn.Module, got {type(model).__name__}")
    why = _explicit_refusal(model)
    if why:
        raise QroundError(why)
    if not any(isinstance(m, _KINDS) for m in model.modules()):
        three = [n for n, m in model.named_modules() if isinstance(m, nn.ConvTranspose3d)]
        raise QroundError("model has no nn.ConvTranspose1d or nn.ConvTranspose2d"
                          + (f" (nn.ConvTranspose3d {three[0]!r} is not rounded: qround rounds "
                             "no 3-d transposed convolution)" if three else ""))
    return _explicit(model if inplace else copy_module(model))


def _explicit_refusal(model: nn.Module) -> str | None:
    """Why ``model``'s transposed convolutions cannot be made explicit (the whole message), or
    None."""
    for name, m in model.named_modules():
        if isinstance(m, _KINDS) and _refusal(m):
            return f"cannot make {type(m).__name__} {name or '<model>'!r} explicit: {_refusal(m)}"
    why = _tie_refusal(model, _KINDS)
    return f"cannot make the transposed convolutions explicit: {why}" if why else None


def _explicit(new: nn.Module) -> nn.Module:
    """:func:`explicit_conv_transpose` on a checked model, in place."""
    shared: dict = {}
    new, _ = _replace(new, _KINDS, lambda layer: ConvTransposeAsConv(layer, shared))
    return new


def _unwrapped(m: nn.Module) -> nn.Module:
    """A conv wrapped by quantize_model without an input quantiser (weight-only block
    reconstruction) is its conv, which holds the rounded weight."""
    from .activations import QuantizedLayer

    return m.layer if isinstance(m, QuantizedLayer) and m.act is None else m


def _fused(explicit: ConvTransposeAsConv, shared: dict | None = None) -> nn.Module:
    conv = explicit.conv
    w = conv.weight
    layer = skip_init(
        _TRANSPOSED[explicit.dims], explicit.in_channels, explicit.out_channels,
        explicit.kernel_size, stride=explicit.stride, padding=explicit.padding,
        output_padding=explicit.output_padding, groups=explicit.groups,
        bias=conv.bias is not None, dilation=explicit.dilation, device=w.device, dtype=w.dtype)
    _take(layer, conv, transposed_weight(w, explicit.groups), shared)
    layer.train(explicit.training)
    return layer


def fuse_conv_transpose(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Undo :func:`explicit_conv_transpose`: a copy of ``model`` (itself with ``inplace``)
    whose :class:`ConvTransposeAsConv` modules are nn.ConvTranspose1d / nn.ConvTranspose2d
    again, holding their (rounded) weights and biases (a bias that bias correction added
    included).  A module whose ``conv`` an input quantiser wraps stays explicit (a transposed
    convolution could not quantise its input), the others are fused; QroundError when every
    one has a quantised input.  A wrapper without an input quantiser (weight-only block
    reconstruction, a ``first_last_bits`` layer whose input stays in float) gives its conv."""
    return _fuse_explicit(model, inplace, ConvTransposeAsConv, (nn.Conv1d, nn.Conv2d), _fused,
                          "explicit_conv_transpose", "a transposed convolution")


def _fuse_explicit(model: nn.Module, inplace: bool, kind: type, convs: tuple, fused,
                   maker: str, native: str) -> nn.Module:
    """The fuse of explicit modules of type ``kind`` (their ``conv`` one of ``convs``, made by
    ``maker``): ``fused(module, shared)`` for each whose conv has no input quantiser."""
    from .activations import QuantizedLayer

    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be an nn.Module, got {type(model).__name__}")
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]
    if not found:
        raise QroundError(f"model has no {kind.__name__} (from {maker})")
    for name, m in found:
        if not isinstance(_unwrapped(m.conv), (*convs, QuantizedLayer)):
            raise QroundError(f"{name or '<model>'!r}.conv is a {type(m.conv).__name__}, not "
                              f"the conv that {maker} made")
    if all(_quantised_input(m) for _, m in found):
        raise QroundError(f"every {kind.__name__} has a quantised input ({found[0][0]!r}'s "
                          f"conv is a QuantizedLayer with an input quantiser): {native} could "
                          "not compute it; keep the explicit modules")
    new = model if inplace else copy_module(model)
    for m in new.modules():
        if isinstance(m, kind) and not _quantised_input(m):
            m._modules["conv"] = _unwrapped(m._modules["conv"])
    shared: dict = {}
    new, _ = _replace(new, kind, lambda m: m if _quantised_input(m) else fused(m, shared))
    return new


def _quantised_input(m: nn.Module) -> bool:
    """Whether an input quantiser wraps an explicit module's ``conv`` (it then stays
    explicit)."""
    from .activations import QuantizedLayer

    return isinstance(_unwrapped(m.conv), QuantizedLayer)
