"""Compiled (numba) inner loop of :class:`qround.activations.QuantizedLayer`'s inference path
for a conv with rounding borders (:func:`qround.border_conv.sparse_border_conv`).

The caller runs the conv on a base rounding of the input, one code per input position (the
lowest code any of its patches can give it), and knows for each position the highest code as
well.  Where the two differ, this kernel visits every patch that holds the position, computes
the element's border code with exactly the float operations of the im2col path
(``floor(v + (1 - B))`` clipped, with ``B`` the patch's fused border or the element-wise
polynomial ``b0 + (c1 + c2 v) v``), and adds ``W[:, i, j] * s * (code - base)`` to that patch's
output (into a channels-last buffer: an NCHW output would take a cache miss per output
channel).  Serial: a call does little work, and numba's thread pool would cost more (and make the
sum order depend on the thread count).
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def border_correction(low, high, grid, oy, ox, bmap, b0, c1, c2, kh, kw, sh, sw, dh, dw,
                      qmin, qmax, one, step, wt, corr):
    """Add the border correction to ``corr`` in place; returns the number of elements whose
    code differs from their base code.

    low, high: (N, C, GH, GW) the lowest (base) and highest clipped code of each position of
    ``grid`` (N, C, GH, GW), the input divided by the step: the real positions (``oy``, ``ox``
    their offset in the padded input) or the whole padded input.  bmap: (N, C, Ho, Wo) fused
    borders, or empty for element-wise borders given by b0, c1, c2 (C*kh*kw,) (c2 empty for
    linear borders).  qmin, qmax, one, step: scalars of the grid's dtype.  wt: (groups,
    C/groups*kh*kw, C_out/groups) the weight, row ``i * kh * kw + j`` for input channel ``i``
    of the group at kernel offset ``j``.  corr: (N, Ho, Wo, C_out) the correction.
    """
    n, c, gh, gw = grid.shape
    ho, wo = corr.shape[1], corr.shape[2]
    kk = kh * kw
    groups, og = wt.shape[0], wt.shape[2]
    cg = c // groups
    count = 0
    fused = bmap.shape[0] > 0
    quad = c2.shape[0] > 0
    for b in range(n):
        for ch in range(c):
            g = ch // cg
            first = g * og
            col0 = (ch % cg) * kk
            for y in range(gh):
                for x in range(gw):
                    base = low[b, ch, y, x]
                    if base == high[b, ch, y, x]:
                        continue
                    v = grid[b, ch, y, x]
                    for jh in range(kh):
                        qy = y + oy - jh * dh
                        if qy < 0 or qy % sh != 0 or qy // sh >= ho:
                            continue
                        py = qy // sh
                        for jw in range(kw):
                            qx = x + ox - jw * dw
                            if qx < 0 or qx % sw != 0 or qx // sw >= wo:
                                continue
                            px = qx // sw
                            j = jh * kw + jw
                            if fused:
                                border = bmap[b, ch, py, px]
                            else:
                                e = ch * kk + j
                                poly = c1[e]
                                if quad:
                                    poly = poly + c2[e] * v
                                border = b0[e] + poly * v
                            code = np.floor(v + (one - border))
                            if code < qmin:
                                code = qmin
                            if code > qmax:
                                code = qmax
                            if code != base:
                                count += 1
                                d = (code - base) * step
                                row = corr[b, py, px, first:first + og]
                                wrow = wt[g, col0 + j]
                                for o in range(og):
                                    row[o] += wrow[o] * d
    return count
