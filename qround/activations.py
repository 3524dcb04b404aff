"""Activation quantisation with learned steps (LSQ) and adaptive rounding borders (AQuant).

An activation ``x`` with step ``s`` is rounded as (AQuant, Algorithm 1)

    x_hat = s * clip(ceil(v - B(v)), qmin, qmax),     v = x / s,

where ``B = 0.5`` is rounding to nearest and ``B`` learned per element is AQuant's border:

- element-wise border (eq. 5 linear, eq. 8 quadratic) ``B^E_j(v) = b2_j t^2 + b1_j t + b0_j``, one
  set of ``(b0, b1, b2)`` per element ``j`` of the layer's input vector (per input feature of a
  Linear, per ``(c_in, kh, kw)`` position of a conv's im2col patch), shared by all output channels;
- border fusion (eq. 9, convs only): in every patch, the ``k*k`` elements of input channel ``i``
  are all rounded with ONE border, the mean of their element-wise borders, each evaluated at its
  own value: ``B^I_i = 1/k^2 sum_{j in channel i} B^E_j(v_j)``, then ``ceil(v_j - B^I_i)``.
  What is shared inside a channel is the border VALUE, not the parameters: every patch position
  keeps its own ``(b0, b1, b2)`` (eq. 9 sums ``B_j^E``, and the paper states that fusion adds no
  parameters), so ``B^I_i`` still weighs each position by its own coefficients; what fusion
  removes is the element-wise choice of threshold within a channel (error cancellation across
  the channel, the paper's motivation).  Eq. 9 is stated on the VDP's activation vector, i.e.
  the im2col patch, and the border then depends on the patch's other values: the same pixel
  may round differently in the ``k*k`` patches that contain it.  A conv with borders is
  therefore trained as im2col + matmul with the rounding applied to each patch element (the
  paper fuses it into its ``img2col`` kernel), never by quantising the input image once.
  Linear layers have no channel structure and never fuse (as in the paper's BERT
  experiments); in a 1x1 conv fusion is the identity.

Inference path of a conv with borders (no autograd, no QDrop, CPU; the same codes as im2col,
only the order of the sums differs).  ``floor(v + 1 - B)`` is monotone in ``B``, so each input
position's code over all the patches holding it lies between its codes for the highest and the
lowest border it meets: for a fused border the max / min of the per-patch border map (the
depthwise convolution of :meth:`ActQuantizer.patch_border`, shared with the training path so
that both round identically) over those patches; element-wise, the border polynomial with
each coefficient at its extreme over the channel's ``k*k`` positions.  The conv runs once on
the lowest codes (``F.conv2d``, no im2col); wherever the two codes differ (a fraction of a
percent of the positions with trained borders) a compiled loop
(:mod:`qround._border_kernel`) recomputes each patch's code with the im2col path's float
operations and adds ``W[:, i, j] * s * (code - base)``.  The border map and the bounds cost a
few passes over the input (no ``C_out`` factor); set ``force_unfold`` to time the im2col path.

Choices of ours, each equivalent to the paper up to what it leaves open:

- ``ceil(u)`` is computed as ``floor(u + 1)``: ``x_int = floor(v + (1 - B))``.  The two differ
  only where ``v - B`` is an integer; with ``B = 0.5`` ours is exactly round-half-up
  ``floor(v + 0.5)``, the rounding-to-nearest of the weight grids (``Grid.quantize``), whereas
  ``ceil(v - 0.5)`` rounds ties down.  Gradient: straight-through (identity) for the rounding,
  so the border's parameters get ``-dL/dx_int`` through ``-B``.
- the border is a polynomial of the normalised code ``t = v / span`` (``span = qmax`` unsigned,
  ``2^(b-1)`` signed, so ``|t| <= 1`` on the grid), not of ``v``: the same functions (the paper's
  coefficients are ``b1/span``, ``b2/span^2``), but Adam's per-parameter steps (lr 1e-3) then move
  ``B`` by at most ~lr per iteration for every bit width; in ``v`` a step of ``b2`` would move
  ``B`` by ``lr * v^2`` (0.2 at 4 bits), which makes the quadratic term unstable.
- padding of a zero-padded conv stays exactly 0 after quantisation (it is not an activation);
  its element-wise border ``B^E_j(0) = b0_j`` still enters the fused mean of its patch.

The step is learned with LSQ (Esser et al. 2019): ``x_hat = s * clip(round(x/s))`` with a
straight-through round, and the gradient of ``s`` scaled by ``g = 1 / sqrt(N_F * qmax)``, ``N_F``
the number of input elements of one sample.  Inputs with a calibrated minimum >= 0 (after a ReLU)
get an unsigned grid ``[0, 2^b - 1]``, others a signed one ``[-2^(b-1), 2^(b-1) - 1]``; the step
starts at the min-max or MSE scale of :func:`qround.grid.fit_grid` on calibration inputs.

:class:`QuantizedLayer` wraps a Linear/Conv2d/Conv1d with an input :class:`ActQuantizer` and a
weight that is float, hard-quantised (integer codes) or soft-rounded
``s (floor(w/s) + z + h(V) - z)`` (AdaRound, for reconstruction: :mod:`qround.reconstruct`).
:func:`insert_act_quantizers` returns a copy of a model with chosen layers wrapped and steps
calibrated.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._warn import gathering
from .border_conv import sparse_border_conv
from .calibrate import (ForwardFn, LayerFilter, _active_mask, _conv_padding, default_forward,
                        eval_mode, kept_buffers, layer_hooks, select_layers)
from .errors import QroundError, check_bits
from .grid import GridSpec, fit_grid, qrange
from .problems.layers import conv2d_view, forward_hooks
from .solvers.hopfield import inverse_rectified_sigmoid, rectified_sigmoid
from .writeback import QuantizedWeight

BORDERS = ("none", "linear", "quadratic")
INITS = ("minmax", "mse")
ACT_MODES = ("float", "nearest", "border")
WEIGHT_MODES = ("float", "hard", "soft")

PerLayer = Union[Any, Mapping[str, Any]]


# ------------------------------------------------------------------------------ autograd pieces
def _compiling() -> bool:
    """``torch.compiler.is_compiling()``, which torch 2.1 and 2.2 do not have (their
    ``torch._dynamo.is_compiling``)."""
    check = getattr(torch.compiler, "is_compiling", None)
    if check is None:
        from torch import _dynamo

        check = _dynamo.is_compiling
    return check()


def _tracing() -> bool:
    """Whether the forward is being traced or compiled (``torch.jit.trace``, ``torch.compile``,
    ``torch.export``): no branch on a tensor's value then, and no side effects."""
    return torch.jit.is_tracing() or _compiling()


class _FloorSTE(torch.autograd.Function):
    """floor forward, identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, t):
        return torch.floor(t)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient times ``scale`` backward (LSQ's g, exact in the forward)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


# ------------------------------------------------------------------------------ quantiser
class ActQuantizer(nn.Module):
    """Uniform per-tensor activation quantiser with a learned step and optional borders.

    bits: 2..8.  borders: "none" | "linear" | "quadratic".  elements: length ``n`` of the
    layer's input vector (one border per element; needed with borders).  fusion_size: ``k*k``
    to fuse borders over consecutive runs of that many elements (a conv's input channel inside
    its patch), 1 for none.  Call :meth:`calibrate` before the first forward.

    Learned state: ``step`` (scalar), ``b0``/``b1``/``b2`` (n,) when borders are used.
    Buffers: ``signed`` (grid kind, set by calibration), ``calibrated``.
    """

    def __init__(self, bits: int, borders: str = "none", elements: int | None = None,
                 fusion_size: int = 1):
        super().__init__()
        self.bits = check_bits(bits, "abits")
        if borders not in BORDERS:
            raise QroundError(f"borders must be one of {BORDERS}, got {borders!r}")
        if borders != "none" and (isinstance(elements, bool) or not isinstance(elements, int)
                                   or elements < 1):
            raise QroundError(f"borders={borders!r} needs elements (input vector length) >= 1, "
                              f"got {elements!r}")
        if not isinstance(fusion_size, int) or fusion_size < 1 or (
                borders != "none" and elements % fusion_size):
            raise QroundError(f"fusion_size={fusion_size!r} must be a positive integer dividing "
                              f"elements={elements}")
        self.borders = borders
        self.fusion_size = fusion_size
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("calibrated", torch.tensor(False))
        # (signed, calibrated) as Python values: read instead of the buffers while the forward
        # is traced or compiled (a branch on a buffer's value cannot enter a graph)
        self._flags = (False, False)
        if borders != "none":
            self.b0 = nn.Parameter(torch.full((elements,), 0.5))
            self.b1 = nn.Parameter(torch.zeros(elements))
            self.b2 = nn.Parameter(torch.zeros(elements)) if borders == "quadratic" else None

    def flags(self) -> tuple[bool, bool]:
        """``(signed, calibrated)``: from the buffers, or while the forward is compiled
        (torch.compile, torch.export: its buffers have no values then) from their values at
        the last calibration, state-dict load or :meth:`set_calibrated`."""
        if _compiling() and getattr(self, "_flags", None) is not None:
            return self._flags
        return bool(self.signed), bool(self.calibrated)

    def _flag(self, index: int) -> bool:
        """One of :meth:`flags` (a buffer on the GPU costs a device sync per read)."""
        if _compiling() and getattr(self, "_flags", None) is not None:
            return self._flags[index]
        return bool(self.signed if index == 0 else self.calibrated)

    def _range(self) -> tuple[int, int, int]:
        """``(qmin, qmax, span)`` from one read of the grid kind."""
        lo, hi = qrange(self.bits, self._flag(0))
        return lo, hi, max(-lo, hi)

    @torch.no_grad()
    def set_calibrated(self, signed: bool) -> None:
        """Mark the quantiser calibrated with the grid kind ``signed`` (its step and borders set
        by the caller, e.g. when loading)."""
        self.signed.fill_(bool(signed))
        self.calibrated.fill_(True)
        self._flags = (bool(signed), True)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._flags = (bool(self.signed), bool(self.calibrated))

    @property
    def qmin(self) -> int:
        return self._range()[0]

    @property
    def qmax(self) -> int:
        return self._range()[1]

    @property
    def span(self) -> int:
        """Normaliser of the border's argument: ``t = v / span`` lies in [-1, 1] on the grid."""
        return self._range()[2]

    @torch.no_grad()
    def calibrate(self, values: torch.Tensor, method: str = "mse") -> None:
        """Set the grid kind and the initial step from calibration inputs ``values`` (any shape,
        a sample is enough as long as it holds the true minimum and maximum)."""
        if method not in INITS:
            raise QroundError(f"init must be one of {INITS}, got {method!r}")
        flat = values.detach().reshape(-1).double().cpu()
        if flat.numel() == 0:
            raise QroundError("calibration values are empty")
        if not torch.isfinite(flat).all():
            raise QroundError("calibration values contain NaN/Inf")
        signed = bool(flat.min() < 0)
        grid = fit_grid(flat.numpy()[None], GridSpec(bits=self.bits, symmetric=signed,
                                                     scale_method=method))
        self.step.fill_(float(grid.scale[0, 0]))
        self.set_calibrated(signed)

    def scale(self, features: int, qmax: int | None = None) -> torch.Tensor:
        """The step ``s`` used by the forward (0-dim), with LSQ's gradient scale for ``features``
        input elements per sample (the forward value is ``step`` clamped at 1e-12).  ``qmax``:
        the grid's, if the caller has it already."""
        g = 1.0 / math.sqrt(max(features, 1) * (self.qmax if qmax is None else qmax))
        return _GradScale.apply(self.step, g).clamp_min(1e-12)

    def coefficients(self, span: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(b0, b1 / span, b2 / span^2)`` (each (n,), the last None for linear borders): the
        border's coefficients acting on ``v`` instead of ``t = v / span`` (the same polynomial;
        scaling n coefficients is cheaper than scaling every element).  ``span``: the grid's,
        if the caller has it already."""
        span = self.span if span is None else span
        c2 = self.b2 / span ** 2 if self.b2 is not None else None
        return self.b0, self.b1 / span, c2

    def border(self, v: torch.Tensor, dim: int, span: int | None = None) -> torch.Tensor:
        """B(v) with the element axis at ``dim`` (length ``elements``) split into
        ``(elements / fusion_size, fusion_size)``; that second axis has length 1 when fused
        (the fused border broadcasts over the channel's ``k*k`` elements)."""
        shape = [1] * v.dim()
        shape[dim], shape[dim + 1] = -1, self.fusion_size
        b0, c1, c2 = self.coefficients(span)
        poly = c1.view(shape)
        if c2 is not None:
            poly = poly + c2.view(shape) * v
        b = b0.view(shape) + poly * v
        return b.mean(dim + 1, keepdim=True) if self.fusion_size > 1 else b

    def patch_border(self, vp: torch.Tensor, kernel_size: tuple[int, int],
                     stride: tuple[int, int], dilation: tuple[int, int],
                     padding: Any = 0) -> torch.Tensor:
        """Fused border (eq. 9) of every patch of a conv: ``B[n, i, p] = 1/k^2 sum_j
        B^E_{i,j}(vp[n, i, p*stride + j*dilation])``, a depthwise convolution of ``vp`` and
        ``vp^2`` with the ``b1``/``b2`` coefficients plus the mean of ``b0`` (no ``C_out``
        factor, no im2col).  vp: (N, C, H, W) the input divided by the step, with
        ``C * kh * kw == elements``, padded already or zero-padded by ``padding`` (as
        ``F.conv2d``'s; a padded zero's border is ``b0``); returns (N, C, Ho, Wo).

        :class:`QuantizedLayer` computes a conv's fused borders with this in both its training
        and its inference path, so that both round every element identically (it equals
        :meth:`border`'s mean up to float rounding of the sum)."""
        (kh, kw), c = kernel_size, vp.shape[1]
        if self.borders == "none" or self.fusion_size != kh * kw or c * kh * kw != self.b0.numel():
            raise QroundError(f"patch_border needs fused borders over {kh}x{kw} patches of "
                              f"{self.b0.numel() // (kh * kw) if self.borders != 'none' else 0} "
                              f"channels, got fusion_size={self.fusion_size} and {c} channels")
        b0, c1, c2 = self.coefficients()
        if _lower_precision(vp.dtype, b0.dtype):   # a float16/bfloat16 model's input
            vp = vp.to(b0.dtype)
        kk = kh * kw
        out = F.conv2d(vp, (c1 / kk).view(c, 1, kh, kw), b0.view(c, kk).mean(1), stride,
                       padding, dilation, c)
        if c2 is not None:  # in place is safe: conv2d's backward does not need its output
            out = out.add_(F.conv2d(vp * vp, (c2 / kk).view(c, 1, kh, kw), None, stride,
                                    padding, dilation, c))
        return out

    def codes(self, x: torch.Tensor, dim: int = -1, features: int | None = None,
              use_border: bool = True, border: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (float tensor, shape of ``x``) and the step used: ``x_hat = codes*s``.

        dim: the element axis of ``x`` (for borders); features: input elements per sample for
        LSQ's gradient scale (default ``x.numel() / x.shape[0]``); border: a precomputed border
        (e.g. :meth:`patch_border`) broadcastable to ``x`` with its element axis split as in
        :meth:`border`, used instead of computing it."""
        if not self._flag(1):
            raise QroundError("ActQuantizer is not calibrated: call calibrate() (or build it "
                              "with insert_act_quantizers) first")
        if x.dim() == 0:
            raise QroundError("ActQuantizer needs a tensor with at least one dimension (the "
                              "elements), got a 0-d tensor")
        grid = self._range()    # one read of each flag per call: on a GPU each read syncs
        dim = dim % x.dim()
        if features is None:
            features = x.numel() // max(x.shape[0], 1) if x.dim() > 1 else x.numel()
        s = self.scale(features, grid[1])
        v = x / s
        with_border = border is not None or (use_border and self.borders != "none")
        if with_border and (self.borders == "none" or x.shape[dim] != self.b0.numel()):
            raise QroundError(f"input has {x.shape[dim]} elements along dim {dim}, the borders "
                              f"were built for {0 if self.borders == 'none' else self.b0.numel()}")
        if not self._needs_grad(x, border):
            return self._codes_inplace(v, dim, border if with_border else False, grid), s
        if with_border:
            v = v.unflatten(dim, (-1, self.fusion_size))
            b = self.border(v, dim, grid[2]) if border is None else border
            t = (v + (1.0 - b)).flatten(dim, dim + 1)
        else:
            t = v + 0.5
        return _FloorSTE.apply(t).clamp(grid[0], grid[1]), s

    def _needs_grad(self, x: torch.Tensor, border: torch.Tensor | None) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad or (border is not None and border.requires_grad)
            or any(p.requires_grad for p in self.parameters()))

    @torch.no_grad()
    def _codes_inplace(self, v: torch.Tensor, dim: int, border: torch.Tensor | None | bool,
                       grid: tuple[int, int, int]) -> torch.Tensor:
        """:meth:`codes` without autograd, overwriting ``v = x / s``: the same float operations
        (so the same codes) with fewer temporaries.  border: a precomputed border, None for
        the layer's own borders, False for rounding to nearest; grid: ``(qmin, qmax, span)``."""
        qmin, qmax, span = grid
        if border is False:
            return v.add_(0.5).floor_().clamp_(qmin, qmax)
        vs = v.unflatten(dim, (-1, self.fusion_size))
        if border is None and self.fusion_size == 1:     # border() step by step, in place
            shape = [1] * vs.dim()
            shape[dim] = -1
            b0, c1, c2 = self.coefficients(span)
            if c2 is None:
                t = vs * c1.view(shape)
            else:
                t = (vs * c2.view(shape)).add_(c1.view(shape)).mul_(vs)
            t = t.add_(b0.view(shape)).neg_().add_(1.0).add_(vs)   # -B + 1 rounds as 1 - B
        else:
            b = self.border(vs, dim, span) if border is None else border
            t = vs + (1.0 - b)
        return t.flatten(dim, dim + 1).floor_().clamp_(qmin, qmax)

    def forward(self, x: torch.Tensor, dim: int = -1, features: int | None = None,
                use_border: bool = True, border: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantised ``x`` (same shape and dtype): ``s * clip(floor(x/s + 1 - B), qmin,
        qmax)``.  A float16/bfloat16 ``x`` is rounded in the step's dtype (float32 as built,
        also for a half-precision model), where the step and borders live, and the result is
        cast back.  Casting the quantised model afterwards (``.half()``, ``.bfloat16()``)
        casts the steps too: quantise the model in the dtype it will run in instead."""
        dtype = x.dtype
        if _lower_precision(dtype, self.step.dtype):
            x = x.to(self.step.dtype)
        q, s = self.codes(x, dim, features, use_border, border)
        out = q.mul_(s) if not q.requires_grad and not s.requires_grad else q * s
        return out.to(dtype)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, signed={self.flags()[0]}, borders={self.borders!r}, "
                f"fusion_size={self.fusion_size}")


def _lower_precision(dtype: torch.dtype, than: torch.dtype) -> bool:
    """Whether ``dtype`` is a float16/bfloat16 beside the quantiser's float32 (or 64)."""
    return dtype in (torch.float16, torch.bfloat16) and than in (torch.float32, torch.float64)


# ------------------------------------------------------------------------------ wrapped layer
class QuantizedLayer(nn.Module):
    """A Linear/Conv2d/Conv1d with a quantised input and a float, hard or soft-rounded weight.
    A Conv1d computes as the Conv2d with kernel (1, k) it equals (:func:`conv2d_view`,
    ``conv_view``) on its input with a height axis of 1 added.

    module: the layer (kept as child ``layer``; its parameters are frozen: quantize_model's
    activation stage writes the final quantised weight into it at the end, for layers tied
    to it).
    abits: input bits or None (float input).  borders/fusion: see :class:`ActQuantizer`.
    weight: a :class:`GridSpec` for the weight grid (per output channel of
    ``weight.reshape(out, -1)``; "minmax" or "mse" scales), or None for float weights.

    Modes (plain attributes, not state): ``act_mode`` in "float" | "nearest" | "border" and
    ``weight_mode`` in "float" | "hard" | "soft".  Hard weights are ``s (codes - z)`` with integer
    ``w_codes`` (out, n), initialised to rounding-to-nearest; soft weights
    ``s (clip(w_floor + h(V), qmin, qmax) - z)`` with ``h`` AdaRound's rectified sigmoid and ``V``
    (``w_round``) starting where ``h(V)`` is the fractional part of ``w/s``.  :meth:`harden`
    sets ``codes = clip(w_floor + [h(V) >= 0.5])``.  A conv in "border" mode runs as
    im2col + matmul when a gradient is needed, else as a conv plus a sparse correction with
    the same codes (module docstring); ``force_unfold`` runs im2col always, "nearest" too
    (for timing).
    ``qdrop``: while > 0, each quantised input element is replaced by its float value with that
    probability, drawn from ``qdrop_generator`` (set by :func:`qdrop`).
    """

    def __getattr__(self, name: str):
        """What the wrapper does not have is read from the wrapped layer (``in_features``,
        ``weight.dtype``...): a parent's forward may read its child's attributes."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_modules", {}).get("layer")
            if name == "layer" or layer is None or not hasattr(layer, name):
                raise
            return getattr(layer, name)

    def __init__(self, module: nn.Module, abits: int | None = None, borders: str = "none",
                 fusion: bool = True, weight: GridSpec | None = None):
        super().__init__()
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            raise QroundError(f"QuantizedLayer wraps nn.Linear, nn.Conv2d or nn.Conv1d, got "
                              f"{type(module).__name__}")
        if abits is None and borders != "none":
            raise QroundError(f"borders={borders!r} on a layer with no quantised input "
                              "(abits=None)")
        self.layer = module
        for p in module.parameters():
            p.requires_grad_(False)
        w = module.weight.detach()
        self.is_conv = not isinstance(module, nn.Linear)
        self.elements = w[0].numel() * (module.groups if self.is_conv else 1)
        kk = math.prod(module.kernel_size) if self.is_conv else 1
        fusion_size = kk if (fusion and self.is_conv and borders != "none") else 1
        self.act = None if abits is None else ActQuantizer(abits, borders, self.elements,
                                                           fusion_size).to(w.device)
        if self.act is not None and w.dtype == torch.float64:
            self.act.double()  # its step and borders meet float64 inputs in convs and products
        self.act_mode = "float" if abits is None else ("nearest" if borders == "none"
                                                      else "border")
        self.force_unfold = False
        self.qdrop_p = 0.0
        self.qdrop_generator: torch.Generator | None = None
        self._pad_masks: dict = {}
        self.train(module.training)   # the wrapper and its quantiser follow the layer's mode

        self.weight_spec = weight
        if weight is None:
            self.weight_mode = "float"
            return
        if not isinstance(weight, GridSpec):
            raise QroundError(f"weight must be a GridSpec or None, got {type(weight).__name__}")
        if weight.scale_method == "mse-output":
            raise QroundError("weight GridSpec scale_method='mse-output' needs layer statistics; "
                              "use 'minmax' or 'mse' here")
        w2 = w.reshape(w.shape[0], -1).double().cpu()
        grid = fit_grid(w2.numpy(), weight)
        scale, zero = (torch.as_tensor(a, dtype=torch.float64) for a in grid.expand())
        ratio = w2 / scale
        floor = torch.floor(ratio)
        frac = ratio - floor
        w_floor = floor + zero
        self.w_qmin, self.w_qmax, self.w_group_size = grid.qmin, grid.qmax, grid.group_size
        # scale and zero point per (channel, group) as in qround.grid.Grid; in float32, or in
        # float64 for a float64 layer (whose weights would otherwise leave the solver's grid)
        dt = torch.float64 if w.dtype == torch.float64 else torch.float32
        self.register_buffer("w_scale", torch.as_tensor(grid.scale.copy(), dtype=dt,
                                                        device=w.device))
        self.register_buffer("w_zero", torch.as_tensor(grid.zero_point.copy(), dtype=dt,
                                                       device=w.device))
        self.register_buffer("w_floor", w_floor.to(dt).to(w.device))
        rtn = (w_floor + (frac >= 0.5).double()).clamp(grid.qmin, grid.qmax)
        self.register_buffer("w_codes", rtn.to(torch.int32).to(w.device))
        self.w_round = nn.Parameter(inverse_rectified_sigmoid(frac.float()).to(w.device))
        self.weight_mode = "hard"

    @property
    def conv_view(self) -> nn.Conv2d | None:
        """The Conv2d that computes the wrapped conv: the layer itself, or a Conv1d's meta-device
        view (:func:`conv2d_view`), cached outside the module tree (no parameters, not in the
        state dict); None for a Linear."""
        layer = self.layer
        if not isinstance(layer, nn.Conv1d):
            return conv2d_view(layer)
        cached = self.__dict__.get("_conv_view")
        if cached is None or cached[0] is not layer:
            cached = self.__dict__["_conv_view"] = (layer, conv2d_view(layer))
        return cached[1]

    # -------------------------------------------------------------------------- weights
    def soft_weight_fraction(self) -> torch.Tensor:
        """h(V) (out, n): the relaxed rounding-up choices."""
        return rectified_sigmoid(self.w_round)

    def quantized_weight(self) -> torch.Tensor:
        """The weight used by forward, shaped like ``layer.weight``."""
        w = self.layer.weight
        if self.weight_mode == "float":
            return w
        if self.weight_mode == "soft":
            q = (self.w_floor + self.soft_weight_fraction()).clamp(self.w_qmin, self.w_qmax)
        else:
            q = self.w_codes.to(self.w_scale.dtype)
        # (out, groups, group size) against (out, groups, 1): the grid broadcast, not repeated
        m, groups = self.w_scale.shape
        q = q.reshape(m, groups, -1)
        out = (self.w_scale[:, :, None] * (q - self.w_zero[:, :, None])).reshape(
            w.shape).to(w.dtype)
        if w.dim() == 4 and not w.is_contiguous() \
                and w.is_contiguous(memory_format=torch.channels_last):
            # the layer's own layout: a conv runs other kernels (and rounds otherwise) on a
            # channels-last weight, and a saved model loads its weight into that layout
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def quantized_weight_codes(self) -> QuantizedWeight:
        """The hard weight as :class:`qround.writeback.QuantizedWeight` (codes (out, n),
        scale/zero_point (out, groups)), e.g. for export."""
        if self.weight_spec is None:
            raise QroundError("this layer's weight is not quantised (weight=None)")
        arrays = (self.w_codes.cpu().numpy().astype(np.int64),
                  self.w_scale.double().cpu().numpy().copy(),
                  self.w_zero.double().cpu().numpy().copy())
        for a in arrays:   # read-only, as weight_from_codes makes them
            a.flags.writeable = False
        return QuantizedWeight(*arrays, self.weight_spec.bits, self.weight_spec.symmetric,
                               self.w_group_size, tuple(self.layer.weight.shape))

    @torch.no_grad()
    def harden(self) -> None:
        """Fix the weight rounding at ``[h(V) >= 0.5]`` and switch to hard weights."""
        if self.weight_spec is None:
            return
        up = (self.soft_weight_fraction() >= 0.5).to(self.w_floor.dtype)
        self.w_codes.copy_((self.w_floor + up).clamp(self.w_qmin, self.w_qmax).to(torch.int32))
        self.weight_mode = "hard"

    # -------------------------------------------------------------------------- activations
    def _quantize(self, x: torch.Tensor, dim: int, features: int | None, use_border: bool,
                  border: torch.Tensor | None = None):
        if self.act is None or self.act_mode == "float":
            return x
        xq = self.act(x, dim=dim, features=features, use_border=use_border, border=border)
        if self.qdrop_p > 0:
            g = self.qdrop_generator
            keep_float = torch.rand(x.shape, generator=g, device=g.device if g is not None
                                    else x.device).to(x.device) < self.qdrop_p
            xq = torch.where(keep_float, x, xq)
        return xq

    def _pad_mask(self, x: torch.Tensor, pads) -> torch.Tensor:
        """(1, C*kh*kw, L) ones at real input positions, zeros at padding, of the im2col."""
        key = (tuple(x.shape[1:]), x.device, x.dtype)
        mask = None if _tracing() else self._pad_masks.get(key)
        if mask is None:
            conv = self.conv_view
            # a normal tensor even under inference_mode: a later forward with autograd saves
            # it for backward
            with torch.inference_mode(False):
                ones = F.pad(torch.ones((1, *x.shape[1:]), device=x.device, dtype=x.dtype),
                             pads)
                mask = F.unfold(ones, conv.kernel_size, dilation=conv.dilation,
                                stride=conv.stride)
            if not _tracing():   # a traced graph's tensor stays out of the eager cache
                self._pad_masks = {key: mask}  # one shape at a time: bounded memory
        return mask

    def _patch_border(self, v: torch.Tensor, vp: torch.Tensor | None = None) -> torch.Tensor:
        """The conv's fused borders (N, C, Ho, Wo) from ``v = x / s`` (N, C, H, W), or from
        ``vp``, ``v`` padded, when padding copies activations: one computation shared by the
        training and the inference path."""
        conv = self.conv_view
        k, st, d = conv.kernel_size, conv.stride, conv.dilation
        if conv.padding_mode == "zeros":
            return self.act.patch_border(v, k, st, d, conv.padding)
        if vp is None:
            # as the inference path: no F.pad without padding (circular F.pad returns a
            # contiguous copy of a channels_last tensor, whose sums round differently)
            pads = _conv_padding(conv)
            vp = F.pad(v, pads, mode=conv.padding_mode) if any(pads) else v
        return self.act.patch_border(vp, k, st, d)

    def _conv_unfold(self, x: torch.Tensor, w: torch.Tensor, use_border: bool) -> torch.Tensor:
        """The conv as im2col + matmul: x (N, C, H, W), w (out, C/groups, kh, kw)."""
        conv = self.conv_view
        features = x.shape[1:].numel()
        pads = _conv_padding(conv)
        zeros = conv.padding_mode == "zeros"
        xp = F.pad(x, pads, mode="constant" if zeros else conv.padding_mode) if any(pads) else x
        cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
        n, _, length = cols.shape
        border = None
        if use_border and self.act.fusion_size > 1:                # (N, C, 1, L)
            border = self._patch_border(x / self.act.scale(features))
            border = border.reshape(n, x.shape[1], 1, length)
        q = self._quantize(cols, 1, features, use_border, border)  # (N, C*kh*kw, L)
        if zeros and any(pads) and q is not cols:
            q = q * self._pad_mask(x, pads)
        g = conv.groups
        out = torch.matmul(w.reshape(g, w.shape[0] // g, -1),
                           q.reshape(n, g, cols.shape[1] // g, length))
        out = out.reshape(n, w.shape[0], length)
        if self.layer.bias is not None:
            out = out + self.layer.bias.view(1, -1, 1)
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
        wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
        return out.view(n, w.shape[0], ho, wo)

    def _sparse_ok(self, x: torch.Tensor) -> bool:
        """Whether a "border" conv may take :meth:`_conv_sparse`: no gradient is needed (no
        autograd, or no input/parameter requires one), no QDrop, a float32/64 CPU input."""
        if _tracing():
            # the numba kernel writes through a numpy view, which a trace does not see (it
            # recorded a correction of zeros), and a graph cannot branch on the input's values
            return False
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for p in self.parameters()))
        # non-finite inputs take im2col: the sparse path's bounds (max/min over the patches
        # holding a position) would spread a NaN beyond its receptive field
        return (not needs_grad and self.qdrop_p == 0 and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64) and bool(torch.isfinite(x).all()))

    def _conv_sparse(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The "border" conv for inference without im2col (:func:`qround.border_conv.
        sparse_border_conv`): same codes as :meth:`_conv_unfold`.  x: (N, C, H, W)."""
        return sparse_border_conv(self, x, w)

    def _check_conv_input(self, x: torch.Tensor) -> None:
        conv = self.layer
        spatial = 1 if isinstance(conv, nn.Conv1d) else 2
        if x.dim() not in (spatial + 1, spatial + 2):
            want = "(N, C, L) or (C, L)" if spatial == 1 else "(N, C, H, W) or (C, H, W)"
            raise QroundError(f"{type(conv).__name__} input must be {want}, got shape "
                              f"{tuple(x.shape)}")
        if x.shape[-spatial - 1] != conv.in_channels:
            raise QroundError(f"{type(conv).__name__} expects {conv.in_channels} input "
                              f"channels, got {x.shape[-spatial - 1]} (input shape "
                              f"{tuple(x.shape)})")
        if any(d == 0 for d in x.shape[-spatial:]):
            raise QroundError(f"{type(conv).__name__} input has an empty spatial size: shape "
                              f"{tuple(x.shape)}")

    def _check_extent(self, x4: torch.Tensor, one_d: bool) -> None:
        """QroundError, in the layer's own terms, for an input smaller than the kernel's extent
        after padding (torch would name the Conv2d view's sizes of a Conv1d)."""
        conv = self.conv_view
        left, right, top, bottom = _conv_padding(conv)
        size = (x4.shape[2] + top + bottom, x4.shape[3] + left + right)
        extent = tuple(d * (k - 1) + 1 for d, k in zip(conv.dilation, conv.kernel_size))
        if size[0] < extent[0] or size[1] < extent[1]:
            got, want = (size[1], extent[1]) if one_d else (size, extent)
            raise QroundError(f"{type(self.layer).__name__} input is smaller than its kernel: "
                              f"{got} after padding, the dilated kernel spans {want}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_mode not in ACT_MODES or (self.act_mode != "float" and self.act is None) or (
                self.act_mode == "border" and (self.act is None or self.act.borders == "none")):
            raise QroundError(f"act_mode={self.act_mode!r} is not available for this layer")
        if self.weight_mode not in WEIGHT_MODES or (self.weight_mode != "float"
                                                    and self.weight_spec is None):
            raise QroundError(f"weight_mode={self.weight_mode!r} is not available for this layer")
        w = self.quantized_weight()
        border = self.act_mode == "border"
        if not self.is_conv:
            xq = self._quantize(x, -1, None, border)   # LSQ's N_F: as codes() reads it
            return F.linear(xq, w, self.layer.bias)
        self._check_conv_input(x)
        one_d = isinstance(self.layer, nn.Conv1d)
        if one_d:   # (N, C, L) -> (N, C, 1, L) for the Conv2d view
            x, w = x.unsqueeze(-2), w.unsqueeze(-2)
        batched = x.dim() == 4
        x4 = x if batched else x.unsqueeze(0)
        if not _tracing():   # shapes are known when tracing; a check would only warn
            self._check_extent(x4, one_d)
        if border and not self.force_unfold and self._sparse_ok(x4):
            out = self._conv_sparse(x4, w)
        elif border or (self.force_unfold and self.act_mode != "float"):
            out = self._conv_unfold(x4, w, border)
        else:
            out = self.conv_view._conv_forward(
                self._quantize(x4, 1, x4.shape[1:].numel(), False), w, self.layer.bias)
        out = out if batched else out.squeeze(0)
        return out.squeeze(-2) if one_d else out

    def extra_repr(self) -> str:
        return f"act_mode={self.act_mode!r}, weight_mode={self.weight_mode!r}"


@contextmanager
def qdrop(layers: Iterable[QuantizedLayer], p: float,
          generator: torch.Generator | None) -> Iterator[None]:
    """QDrop (Wei et al. 2022) inside the context: each quantised input element of ``layers``
    keeps its float value with probability ``p``; masks are drawn from ``generator``."""
    layers = list(layers)
    saved = [(m.qdrop_p, m.qdrop_generator) for m in layers]
    try:
        for m in layers:
            m.qdrop_p, m.qdrop_generator = float(p), generator
        yield
    finally:
        for m, (q, g) in zip(layers, saved):
            m.qdrop_p, m.qdrop_generator = q, g


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """The :class:`QuantizedLayer` modules of a model by name, in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


# ------------------------------------------------------------------------------ insertion
class _Observer:
    """Min, max and a bounded strided subsample (<= ``cap`` values) of a layer's inputs."""

    def __init__(self, cap: int):
        self.cap, self.stride = cap, 1
        self.lo, self.hi = math.inf, -math.inf
        self.parts: list[torch.Tensor] = []
        self.size = 0

    def add(self, name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float().cpu()
        if not torch.isfinite(flat).all():
            raise QroundError(f"layer {name!r} received non-finite (NaN/Inf) inputs")
        if flat.numel() == 0:
            return
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        self.parts.append(flat[::self.stride].clone())
        self.size += self.parts[-1].numel()
        while self.size > self.cap:  # halve what is kept and sample new batches half as densely
            kept = torch.cat(self.parts)[::2]
            self.parts, self.size, self.stride = [kept], kept.numel(), self.stride * 2

    def values(self, name: str) -> torch.Tensor:
        if not self.parts:
            raise QroundError(f"layer {name!r} saw no inputs during calibration (is it called "
                              "by the model's forward?)")
        return torch.cat(self.parts + [torch.tensor([self.lo, self.hi])])


def _per_layer(value, names, what: str, default) -> dict[str, Any]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise QroundError(f"{what} names layers that are not selected: {unknown}")
        return {n: value.get(n, default) for n in names}
    return {n: value for n in names}


@gathering
def insert_act_quantizers(model: nn.Module, layers: LayerFilter = None,
                          abits: PerLayer = 4, borders: PerLayer = "none", fusion: bool = True,
                          init: str = "mse", calib_batches: Iterable | None = None, *,
                          weights: PerLayer = None, forward: ForwardFn | None = None,
                          max_samples: int = 2 ** 18) -> nn.Module:
    """A deep copy of ``model`` whose chosen Linear/Conv2d/Conv1d layers are
    :class:`QuantizedLayer`.

    layers: as :func:`qround.calibrate.select_layers` (None = all).  abits: bits of every chosen
    layer's input, or a mapping name -> bits | None (missing names: float input).  borders:
    "none" | "linear" | "quadratic" (for every layer with a quantised input), or a mapping.
    fusion: border fusion (eq. 9) in convs.  init: "mse" | "minmax" initial steps, computed from
    the float model's layer inputs on ``calib_batches`` (an iterable of batches run through
    ``forward(model, batch)``; at most ``max_samples`` values per layer are kept).  weights: a
    :class:`GridSpec` for every chosen layer's weight, a mapping, or None (float weights).
    Every argument is checked before any forward runs; ``model`` is not modified.
    """
    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be an nn.Module, got {type(model).__name__}")
    inside = {n for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    chosen = select_layers(model, layers, conv1d=False)  # QuantizedLayer wraps no Conv1D
    chosen = {n: m for n, m in chosen.items()
              if not any(n.startswith(p + ".") for p in inside)}
    if not chosen:
        raise QroundError("layers selected no layer that is not already quantised")
    for n, m in chosen.items():
        if forward_hooks(m):
            raise QroundError(f"layer {n!r} has a {' and a '.join(forward_hooks(m))} of its "
                              "own, which QuantizedLayer would not run (it computes the layer "
                              "itself): remove the hooks or register them on a parent module")
    names = list(chosen)
    bits = _per_layer(abits, names, "abits", None)
    kinds = _per_layer(borders, names, "borders", "none")
    specs = _per_layer(weights, names, "weights", None)
    for n in names:
        if bits[n] is not None:
            check_bits(bits[n], f"abits[{n!r}]" if isinstance(abits, Mapping) else "abits")
        if kinds[n] not in BORDERS:
            raise QroundError(f"borders must be one of {BORDERS}, got {kinds[n]!r} for {n!r}")
        if kinds[n] != "none" and bits[n] is None:
            if isinstance(borders, Mapping) or all(b is None for b in bits.values()):
                raise QroundError(f"borders={kinds[n]!r} on layer {n!r}, which has no quantised "
                                  "input (abits is None)")
            kinds[n] = "none"  # a global borders choice applies to the quantised inputs only
        if specs[n] is not None and not isinstance(specs[n], GridSpec):
            raise QroundError(f"weights must be GridSpec or None, got {specs[n]!r} for {n!r}")
        if specs[n] is not None and specs[n].scale_method == "mse-output":
            raise QroundError("weights scale_method='mse-output' is not supported here: use "
                              "'mse' or 'minmax'")
    if not isinstance(fusion, bool):
        raise QroundError(f"fusion must be True or False, got {fusion!r}")
    if init not in INITS:
        raise QroundError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(max_samples, int) or max_samples < 16:
        raise QroundError(f"max_samples must be an integer >= 16, got {max_samples!r}")
    quantised_inputs = [n for n in names if bits[n] is not None]
    if quantised_inputs and calib_batches is None:
        raise QroundError("calib_batches is needed to initialise the activation steps")

    observers = {n: _Observer(max_samples) for n in quantised_inputs}
    if observers:
        forward = forward or default_forward

        def hook(name, module, args, out):
            if not args or not isinstance(args[0], torch.Tensor):
                raise QroundError(f"layer {name!r} was called without a tensor input")
            x = args[0]
            mask = _active_mask(module, x, name)   # padded tokens stay out of the steps' start
            if mask is not None:
                x = x.reshape(-1, x.shape[-1])[mask]
            observers[name].add(name, x)

        count = 0
        # kept_buffers: a forward that writes a buffer (a counter, an average) leaves no trace
        with kept_buffers(model), eval_mode(model), torch.no_grad(), layer_hooks(
                {n: chosen[n] for n in observers}, hook):
            if isinstance(calib_batches, (torch.Tensor, np.ndarray)):
                raise QroundError("calib_batches must be an iterable of batches; wrap a single "
                                  "tensor in a list")
            for batch in calib_batches:
                forward(model, batch)
                count += 1
        if count == 0:
            raise QroundError("calib_batches is empty")

    qmodel = copy.deepcopy(model)
    modules = dict(qmodel.named_modules())
    for n in names:
        wrapped = QuantizedLayer(modules[n], bits[n], kinds[n], fusion, specs[n])
        if wrapped.act is not None:
            wrapped.act.calibrate(observers[n].values(n), init)
        if n == "":  # the model itself is the layer
            return wrapped
        replace_module(qmodel, modules[n], wrapped)
    return qmodel


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child inside ``root``, under every name it has (a layer
    registered twice, ``self.alias = self.fc``, is wrapped once and seen the same way twice)."""
    for parent in list(root.modules()):
        for name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[name] = new
    _no_fused_path(root)


def _no_fused_path(root: nn.Module) -> None:
    """An nn.TransformerEncoderLayer (and the nn.TransformerEncoder around it) has a fused
    inference path that reads its Linear layers' weights itself and never calls them, so a
    wrapper's input quantiser would not run.  Its ``activation_relu_or_gelu`` flag only tells
    that path which activation to fuse; at 0 torch takes the module-by-module path, which
    computes the same function and calls the wrappers."""
    for m in root.modules():
        if (isinstance(m, nn.TransformerEncoderLayer) and getattr(m, "activation_relu_or_gelu", 0)
                and any(isinstance(c, QuantizedLayer) for c in m.modules())):
            m.activation_relu_or_gelu = 0
