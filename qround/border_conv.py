"""Exact inference path of a conv with AQuant rounding borders, without im2col.

:meth:`qround.activations.QuantizedLayer._conv_unfold` (the training path) rounds every element
of every im2col patch with its patch's border.  For inference, :func:`sparse_border_conv` runs
one ``F.conv2d`` on a base rounding of the input (per position: the code at the highest border
of all patches that hold it, i.e. its lowest code, since ``floor(v + (1 - B))`` is monotone in
``B``) and adds a sparse correction, computed by the numba kernel
:func:`qround._border_kernel.border_correction`, where a patch's border gives a position
another code.  Where a position's lowest and highest codes agree nothing needs correcting;
the bounds come from spreading each patch's border over the positions it holds
(:func:`_spread`, :func:`_spread_shifts`).  Same codes as the im2col path; only the order of
the sums differs.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ._border_kernel import border_correction
from .calibrate import _conv_padding


@torch.no_grad()
def sparse_border_conv(layer, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The "border" conv of ``layer`` (a :class:`~qround.activations.QuantizedLayer` wrapping
    a Conv2d or Conv1d, act_mode "border") on x (N, C, H, W) with weight ``w``, for inference."""
    conv, act = layer.conv_view, layer.act   # a Conv1d's Conv2d view: x, w are 4-D here
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    pads = _conv_padding(conv)
    zeros = conv.padding_mode == "zeros"
    s = act.scale(x.shape[1:].numel())
    v = x / s
    # positions that are activations: the real ones (padded zeros stay 0), or all of the
    # padded input when padding copies activations (reflect, replicate, circular)
    if zeros:
        grid, oy, ox = v, pads[2], pads[0]
    else:
        grid, oy, ox = F.pad(v, pads, mode=conv.padding_mode) if any(pads) else v, 0, 0
    c, kk = x.shape[1], kh * kw
    if act.fusion_size > 1:
        bmap = layer._patch_border(v, grid).contiguous()
        # highest and lowest border of the patches holding each position
        if (sh, sw) == (1, 1) and bmap.shape[2:] == grid.shape[2:]:
            rows = [oy - j * dh for j in range(kh)]
            cols = [ox - j * dw for j in range(kw)]
            bounds = [_spread_shifts(_spread_shifts(bmap, rows, grid.shape[3], hi), cols, 1,
                                     hi) for hi in (True, False)]
        else:
            bounds = [_spread(_spread(bmap, 2, kh, sh, dh, oy, grid.shape[2], hi),
                              3, kw, sw, dw, ox, grid.shape[3], hi) for hi in (True, False)]
        b0 = c1 = c2 = bmap.new_empty(0)
    else:
        # bounds of b0_j + (c1_j + c2_j v) v over the positions j: the same float operations
        # with the extreme coefficients (each is monotone in them), c1's by the sign of v
        bmap = grid.new_empty(0, 0, 0, 0)
        b0, c1, c2 = act.coefficients()
        ext = [(t.view(c, kk).amax(1).view(c, 1, 1), t.view(c, kk).amin(1).view(c, 1, 1))
               for t in (b0, c1) + ((c2,) if c2 is not None else ())]
        pos = grid >= 0
        bounds = []
        for i, k in ((0, 1), (1, 0)):       # highest, then lowest border
            bound = torch.where(pos, ext[1][i], ext[1][k])
            if c2 is not None:
                bound.add_(ext[2][i] * grid)
            bounds.append(bound.mul_(grid).add_(ext[0][i]))
        c2 = c2 if c2 is not None else b0.new_empty(0)
    # floor(v + (1 - B)) is monotone in B: the lowest and the highest code over the patches
    # (in place: -B + 1 and A + v round exactly as 1 - B and v + A)
    lo, hi = (b.neg_().add_(1.0).add_(grid).floor_().clamp_(act.qmin, act.qmax)
              for b in bounds)
    bias = layer.layer.bias
    if zeros:
        out = conv._conv_forward(lo * s, w, bias)
    else:
        out = F.conv2d(lo * s, w, bias, conv.stride, 0, conv.dilation, conv.groups)
    g = conv.groups
    wt = w.reshape(g, w.shape[0] // g, -1).transpose(1, 2).contiguous()
    corr = out.new_zeros(out.shape[0], out.shape[2], out.shape[3], out.shape[1])
    dt = _NUMPY[x.dtype]
    lo_, hi_, grid_, bmap_, b0_, c1_, c2_, wt_, corr_ = (
        t.detach().numpy() for t in (lo, hi, grid, bmap, b0, c1, c2, wt, corr))
    if border_correction(lo_, hi_, grid_, oy, ox, bmap_, b0_, c1_, c2_, kh, kw, sh, sw, dh,
                         dw, dt(act.qmin), dt(act.qmax), dt(1.0), dt(s.item()), wt_, corr_):
        out.add_(corr.permute(0, 3, 1, 2))
    return out


_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def _spread_shifts(dev: torch.Tensor, shifts: list[int], unit: int, hi: bool) -> torch.Tensor:
    """``out[i] >= max_t dev[i + t * unit]`` over the shifts ``t`` (indices of the flattened
    contiguous ``dev``), -inf where no shift applies (``hi``; else ``<=`` the min, +inf):
    :func:`_spread` for a stride-1 conv whose patches and positions coincide, along rows
    (``unit`` = row length) or columns (``unit`` = 1).  Shifting the whole flat tensor lets a
    shift reach into the neighbouring row or plane at the edges; those extra terms only loosen
    the bound (a few needless candidates, never a wrong code) and keep every operation one
    contiguous pass (a shift of a narrowed last axis runs row by row, several times slower)."""
    op = torch.maximum if hi else torch.minimum
    flat = dev.reshape(-1)
    size = flat.numel()
    out = flat.clone() if 0 in shifts else torch.full_like(flat, -math.inf if hi else math.inf)
    for t in shifts:
        k = t * unit
        if k > 0 and k < size:
            op(out[:size - k], flat[k:], out=out[:size - k])
        elif k < 0 and -k < size:
            op(out[-k:], flat[:size + k], out=out[-k:])
    return out.view(dev.shape)


def _spread(dev: torch.Tensor, dim: int, k: int, stride: int, dilation: int, start: int,
            length: int, hi: bool) -> torch.Tensor:
    """Along ``dim``: ``out[P] = max dev[p]`` (``hi``; else the min) over the patches ``p`` that
    hold padded input position ``start + P`` (``p*stride + j*dilation == start + P`` for a
    ``j < k``), -inf (+inf) where none; ``P < length``.  dev: one entry per patch along
    ``dim``."""
    op, fill = (torch.maximum, -math.inf) if hi else (torch.minimum, math.inf)
    span = (k - 1) * dilation
    shape = list(dev.shape)
    shape[dim] = max(start + length, (shape[dim] - 1) * stride + 1) + span
    z = dev.new_empty(shape)
    end = span + (dev.shape[dim] - 1) * stride + 1
    if stride == 1:                           # only the margins are not overwritten below
        z.narrow(dim, 0, span).fill_(fill)
        z.narrow(dim, end, z.shape[dim] - end).fill_(fill)
    else:
        z.fill_(fill)
    z[(slice(None),) * dim + (slice(span, end, stride),)] = dev   # z[span + p*stride] = dev[p]
    out = z.narrow(dim, start, length)
    for u in range(1, k):                     # z[start + P + u*dilation]: offset j = k-1-u
        more = z.narrow(dim, start + u * dilation, length)
        out = op(out, more) if u == 1 else op(out, more, out=out)
    return out if k > 1 else out.clone()
