"""Every layer that qround rounds only in an explicit form, made explicit (and fused back) at
once.

``nn.MultiheadAttention`` (:mod:`qround.attention`), ``nn.ConvTranspose1d`` /
``nn.ConvTranspose2d`` (:mod:`qround.conv_transpose`) and ``nn.Conv3d`` (:mod:`qround.conv3d`)
each have a form whose weights sit in ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Conv1d`` layers that
quantize_model rounds.  :func:`explicit_layers` applies every one of them that the model needs
(a diffusion U-Net has attention, transposed convolutions or both), after checking them all, and
:func:`fuse_layers` gives back the native modules wherever no input quantiser is in the way.
"""
from __future__ import annotations

from torch import nn

from . import attention, conv3d, conv_transpose
from .errors import QroundError, copy_module

__all__ = ["explicit_layers", "fuse_layers"]

# (module, the native layer types, the explicit type, its fuse, what it is called)
_FORMS = (
    (attention, (nn.MultiheadAttention,), attention.LinearMultiheadAttention,
     attention.fuse_attention, "nn.MultiheadAttention"),
    (conv_transpose, (nn.ConvTranspose1d, nn.ConvTranspose2d), conv_transpose.ConvTransposeAsConv,
     conv_transpose.fuse_conv_transpose, "nn.ConvTranspose1d/2d"),
    (conv3d, (nn.Conv3d,), conv3d.Conv3dAsConv2d, conv3d.fuse_conv3d, "nn.Conv3d"),
)


def explicit_layers(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace``) in which every
    nn.MultiheadAttention, nn.ConvTranspose1d/2d and nn.Conv3d is in its explicit form
    (:class:`~qround.attention.LinearMultiheadAttention`,
    :class:`~qround.conv_transpose.ConvTransposeAsConv`, :class:`~qround.conv3d.Conv3dAsConv2d`),
    so that quantize_model rounds them all.  Every module is checked before anything changes:
    QroundError names one that cannot be made explicit, or says the model has none of them."""
    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be an nn.Module, got {type(model).__name__}")
    present = _present(model)
    if not present:
        raise QroundError("model has no " + ", ".join(form[4] for form in _FORMS[:-1])
                          + f" or {_FORMS[-1][4]}: nothing to make explicit")
    why = _refusal(model, present)
    if why:
        raise QroundError(why)
    new = model if inplace else copy_module(model)
    for module, *_ in present:
        new = module._explicit(new)
    return new


def _present(model: nn.Module) -> list:
    """The forms of ``_FORMS`` whose native layers ``model`` holds."""
    return [form for form in _FORMS if any(isinstance(m, form[1]) for m in model.modules())]


def _refusal(model: nn.Module, present: list) -> str | None:
    """The first refusal of the ``present`` forms' checks, or None."""
    for module, *_ in present:
        why = module._explicit_refusal(model)
        if why:
            return why
    return None


def _explicit_children(model: nn.Module) -> tuple[dict[str, list[str]], str | None]:
    """What :func:`explicit_layers` would add, without copying anything: the rounded layers
    of each native module's explicit form by the module's name (``attn`` -> ``attn.q_proj``,
    ``attn.k_proj``, ``attn.v_proj``, ``attn.out_proj``; ``up`` -> ``up.conv``), and the
    refusal it would raise (or None)."""
    why = _refusal(model, _present(model))
    if why:
        return {}, why
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            parts = ("q_proj", "k_proj", "v_proj", "out_proj")
        elif any(isinstance(m, form[1]) for form in _FORMS):
            parts = ("conv",)
        else:
            continue
        out[name] = [f"{name}.{p}" if name else p for p in parts]
    return out, None


def fuse_layers(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Undo :func:`explicit_layers`: a copy of ``model`` (itself with ``inplace``) in which
    every explicit module without a quantised input is the native module again, holding its
    (rounded) weights (:func:`~qround.attention.fuse_attention`,
    :func:`~qround.conv_transpose.fuse_conv_transpose`, :func:`~qround.conv3d.fuse_conv3d`);
    those whose inputs an input quantiser wraps stay explicit.  QroundError when there is
    nothing to fuse."""
    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be an nn.Module, got {type(model).__name__}")
    found = [(form, [m for m in model.modules() if isinstance(m, form[2])]) for form in _FORMS]
    fusable = [form for form, mods in found
               if any(not form[0]._quantised_input(m) for m in mods)]
    if not fusable:
        kinds = [form[2].__name__ for form, mods in found if mods]
        raise QroundError(f"every {' and '.join(kinds)} here has a quantised input: none can be "
                          "fused; keep the explicit modules" if kinds else
                          "model has no explicit module (from explicit_layers) to fuse")
    new = model if inplace else copy_module(model)
    for form in fusable:
        new = form[3](new, inplace=True)
    return new
