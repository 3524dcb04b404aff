"""Uniform integer weight grids: per output channel, optionally per group of inputs.

A grid maps integer codes ``q in [qmin, qmax]`` to values ``s * (q - z)``.  Scales ``s`` and zero
points ``z`` have shape ``(out, groups)``; ``groups = 1`` for a per-channel grid and
``in / group_size`` for a grouped one.  :meth:`Grid.expand` broadcasts them to ``(out, in)``.

Scale choice (AdaRound Table 6): ``minmax``, ``mse`` (weight MSE of rounding-to-nearest) and
``mse-output`` (output MSE ``(w - w_rtn)^T H (w - w_rtn)``, needs H; with quantised inputs
paired to float ones, ``cross=``, AdaRound's ``||W x - W_rtn x_hat||^2``), each searched per
channel (per group) over shrunk ranges; or scales given explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import QroundError, as_float_array, check_bits, check_real

SCALE_METHODS = ("minmax", "mse", "mse-output")
MAX_SHRINK_STEPS = 10_000   # candidates of the scale search (each a pass over the weights)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: signed ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b - 1]``."""
    bits = check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


@dataclass(frozen=True)
class GridSpec:
    """How to build a grid: bit width, symmetry, group size (None = per channel), scale method."""

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None
    scale_method: str = "mse"
    shrink_steps: int = 80     # candidates in the scale search
    min_shrink: float = 0.2    # smallest fraction of the min-max range tried

    def __post_init__(self):
        check_bits(self.bits)
        if not isinstance(self.symmetric, (bool, np.bool_)):
            raise QroundError(f"symmetric must be True or False, got {self.symmetric!r}")
        if self.scale_method not in SCALE_METHODS:
            raise QroundError(f"scale_method must be one of {SCALE_METHODS}, "
                              f"got {self.scale_method!r}")
        if self.group_size is not None and (not isinstance(self.group_size, (int, np.integer))
                                            or isinstance(self.group_size, (bool, np.bool_))
                                            or self.group_size < 1):
            raise QroundError(f"group_size must be a positive integer or None, "
                              f"got {self.group_size!r}")
        if (not isinstance(self.shrink_steps, (int, np.integer))
                or isinstance(self.shrink_steps, (bool, np.bool_))
                or not 1 <= self.shrink_steps <= MAX_SHRINK_STEPS):
            raise QroundError(f"shrink_steps must be an integer in [1, {MAX_SHRINK_STEPS}], got "
                              f"{self.shrink_steps!r}")
        check_real(self.min_shrink, "min_shrink", 0, 1, lo_open=True)   # bools refused too


@dataclass(frozen=True, eq=False)
class Grid:
    """A fitted grid. ``scale``/``zero_point``: (out, groups); codes live in ``[qmin, qmax]``.
    Grids compare by identity (their arrays have no single truth value); compare ``scale`` and
    ``zero_point`` for equal values."""

    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    symmetric: bool
    group_size: int | None
    in_features: int

    def __post_init__(self):
        check_bits(self.bits)
        if not isinstance(self.symmetric, (bool, np.bool_)):
            raise QroundError(f"Grid symmetric must be True or False, got {self.symmetric!r}")
        scale = as_float_array(self.scale, "Grid scale")
        zero = as_float_array(self.zero_point, "Grid zero_point")
        if scale.ndim != 2 or zero.shape != scale.shape:
            raise QroundError(f"Grid scale and zero_point must both be (out, groups), got "
                              f"{scale.shape} and {zero.shape}")
        if isinstance(self.in_features, bool) or not isinstance(
                self.in_features, (int, np.integer)) or self.in_features < 1 \
                or self.in_features % scale.shape[1]:
            raise QroundError(f"Grid in_features={self.in_features!r} must be a positive "
                              f"multiple of its {scale.shape[1]} groups")
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise QroundError("Grid scale must be finite and positive")
        if not (np.all(np.isfinite(zero)) and np.all(zero == np.round(zero))
                and np.all((zero >= self.qmin) & (zero <= self.qmax))):
            raise QroundError(f"Grid zero_point must be integers in [{self.qmin}, {self.qmax}]")
        if self.symmetric and np.any(zero != 0):
            raise QroundError("a symmetric Grid has zero_point 0")
        groups, gs = scale.shape[1], self.group_size
        whole = self.in_features // groups
        if not (gs is None and groups == 1 or isinstance(gs, (int, np.integer))
                and not isinstance(gs, (bool, np.bool_)) and gs == whole):
            want = "None (one group)" if groups == 1 else f"{whole}"
            raise QroundError(f"Grid group_size={gs!r} contradicts its {groups} group(s) of "
                              f"{self.in_features} inputs: expected {want}")
        # private read-only copies: a later change to the caller's arrays (or to these) would
        # silently change every weight written from this grid
        for name, value in (("scale", scale), ("zero_point", zero)):
            value = np.array(value, dtype=np.float64)
            value.flags.writeable = False
            object.__setattr__(self, name, value)

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]

    @property
    def groups(self) -> int:
        return self.scale.shape[1]

    def expand(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-weight ``(scale, zero_point)``, each (out, in)."""
        reps = self.in_features // self.groups
        return np.repeat(self.scale, reps, axis=1), np.repeat(self.zero_point, reps, axis=1)

    def _check_shape(self, arr: np.ndarray, name: str) -> None:
        want = (self.scale.shape[0], self.in_features)
        if arr.shape != want:
            raise QroundError(f"{name} must have the grid's shape {want} (out, in), got "
                              f"{arr.shape}")

    def quantize(self, weight) -> np.ndarray:
        """Rounding-to-nearest integer codes (out, in), clipped to the grid; ``weight`` (out,
        in) finite (numpy or torch)."""
        weight = as_float_array(weight, "weight", ndim=2)
        self._check_shape(weight, "weight")
        s, z = self.expand()
        x = weight / s
        fl = np.floor(x)
        # ties up, as RoundingProblem.rtn_choices (frac >= 1/2): floor(x + 1/2) would round
        # x = 1/2 - 2**-54 up, since x + 1/2 rounds to 1 in float64
        return np.clip(fl + (x - fl >= 0.5) + z, self.qmin, self.qmax).astype(np.int64)

    def dequantize(self, codes) -> np.ndarray:
        """Values ``s * (q - z)`` (out, in) for integer codes (out, in) in ``[qmin, qmax]``."""
        q = as_float_array(codes, "codes", ndim=2)
        self._check_shape(q, "codes")
        if q.size and not (np.all(q == np.round(q)) and q.min() >= self.qmin
                           and q.max() <= self.qmax):
            raise QroundError(f"codes must be integers in [{self.qmin}, {self.qmax}] (the "
                              f"grid's codes); got values from {q.min():g} to {q.max():g}"
                              + ("" if np.all(q == np.round(q)) else ", not all integers"))
        s, z = self.expand()
        return s * (q - z)


def _group_view(weight: np.ndarray, group_size: int | None) -> np.ndarray:
    out, n = weight.shape
    if group_size is None or group_size >= n:
        return weight[:, None, :]
    if n % group_size:
        raise QroundError(f"group_size={group_size} does not divide the {n} inputs of the layer")
    return weight.reshape(out, n // group_size, group_size)


def _range_to_grid(lo: np.ndarray, hi: np.ndarray, qmin: int, qmax: int, symmetric: bool):
    """Scale and zero point that cover [lo, hi] (arrays (out, groups)); zero stays representable."""
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        # The positive side has one code less; cover the larger magnitude with it.
        scale = amax / max(qmax, 1)
        zero = np.zeros_like(scale)
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = (hi - lo) / (qmax - qmin)
        zero = np.round(qmin - lo / np.where(scale > 0, scale, 1.0))
        zero = np.clip(zero, qmin, qmax)
    # A channel of all zeros still needs a positive scale; any value represents it exactly.
    scale = np.where(scale > 0, scale, 1.0)
    return scale, zero


def _rtn_error(wg: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int):
    """``s (clip(floor(w / s + 1/2) + z) - z) - w`` in one buffer (the same ufuncs in the same
    order as the out-of-place expression, so the same values; the scale search calls this once
    per candidate scale)."""
    s, z = scale[..., None], zero[..., None]
    e = np.divide(wg, s)
    e += 0.5
    np.floor(e, out=e)
    e += z
    np.clip(e, qmin, qmax, out=e)
    e -= z
    np.multiply(s, e, out=e)
    e -= wg
    return e


def fit_grid(weight, spec: GridSpec = GridSpec(), hessian=None, scale=None,
             zero_point=None, target=None) -> Grid:
    """Fit a grid to ``weight`` (out, in).

    ``hessian``: (in, in), or (out, in, in) per channel; needed by ``mse-output``.
    ``target``: (out, in), the target ``r = C w`` of an asymmetric objective (a problem built
    with ``cross=``, whose cost is ``w_hat^T H w_hat - 2 w_hat^T r`` plus a constant; H is then
    ``E[x_hat x_hat^T]``); ``mse-output`` then scores rounding-to-nearest on that cost, AdaRound's
    ``||W x - W_hat x_hat||^2``, instead of ``(w - w_rtn)^T H (w - w_rtn)``.
    ``scale``/``zero_point``: given explicitly as (out,) or (out, groups); then no search runs
    (``zero_point`` only with ``scale``; an asymmetric grid needs both).
    """
    if spec is None:
        spec = GridSpec()
    if not isinstance(spec, GridSpec):
        raise QroundError(f"spec must be a qround.GridSpec (or None for the default), got "
                          f"{type(spec).__name__}")
    w = as_float_array(weight, "weight", ndim=2)
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise QroundError(f"weight must be non-empty, got shape {w.shape}")
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    wg = _group_view(w, spec.group_size)
    out, groups, gs = wg.shape
    group_size = None if groups == 1 else gs

    if scale is None and zero_point is not None:
        raise QroundError("zero_point is given without scale: give both (then no search runs), "
                          "or neither")
    if scale is not None:
        s = as_float_array(scale, "scale", ndim=(1, 2))
        s = s.reshape(out, -1) if s.ndim == 1 and s.shape[0] == out else s
        if s.shape != (out, groups):
            want = f"({out},) or ({out}, 1)" if groups == 1 else f"({out}, {groups}), one per group"
            raise QroundError(f"scale must have shape {want}, got {np.shape(scale)}")
        if np.any(s <= 0):
            raise QroundError(f"scale must be positive; {int(np.sum(s <= 0))} entries are <= 0")
        if zero_point is None:
            if not spec.symmetric:
                raise QroundError("an asymmetric grid with an explicit scale needs zero_point too")
            z = np.zeros_like(s)
        else:
            z = as_float_array(zero_point, "zero_point", ndim=(1, 2))
            z = z.reshape(out, -1) if z.ndim == 1 and z.shape[0] == out else z
            if z.shape != (out, groups):
                want = (f"({out},) or ({out}, 1)" if groups == 1
                        else f"({out}, {groups}), one per group")
                raise QroundError(f"zero_point must have shape {want}, got {np.shape(zero_point)}")
            if np.any(z != np.round(z)) or np.any(z < qmin) or np.any(z > qmax):
                raise QroundError(f"zero_point must be integers in [{qmin}, {qmax}]")
        return Grid(s, z, spec.bits, spec.symmetric, group_size, w.shape[1])

    lo, hi = wg.min(axis=2), wg.max(axis=2)
    best_s, best_z = _range_to_grid(lo, hi, qmin, qmax, spec.symmetric)
    if spec.scale_method == "minmax":
        return Grid(best_s, best_z, spec.bits, spec.symmetric, group_size, w.shape[1])
    shrinks = np.linspace(1.0, spec.min_shrink, spec.shrink_steps)
    if spec.scale_method == "mse":
        best_s, best_z = _mse_search(wg, lo, hi, shrinks, qmin, qmax, spec.symmetric)
        return Grid(best_s, best_z, spec.bits, spec.symmetric, group_size, w.shape[1])

    # mse-output
    if hessian is None:
        raise QroundError("scale_method='mse-output' needs the layer's hessian")
    h = as_float_array(hessian, "hessian", ndim=(2, 3))
    if h.shape[-2:] != (w.shape[1], w.shape[1]) or (h.ndim == 3 and h.shape[0] != out):
        raise QroundError(f"hessian shape {h.shape} does not match weight shape {w.shape}")
    lin = None
    if target is not None:
        r = as_float_array(target, "target", ndim=2)
        if r.shape != w.shape:
            raise QroundError(f"target shape {r.shape} does not match weight shape {w.shape}")
        # with w_hat = w + e the cost is e^T H e + 2 e^T (H w - r) plus a constant
        hw = w @ h if h.ndim == 2 else np.einsum("mij,mj->mi", h, w)
        lin = (hw - r).reshape(out, groups, gs)
    # Per group the diagonal block of H scores the group's error; cross-group terms are
    # ignored so that groups can be searched independently.
    blocks = [slice(g * gs, (g + 1) * gs) for g in range(groups)]

    def score(err):  # err (out, groups, gs) -> (out, groups)
        res = np.empty(err.shape[:2])
        for g, sl in enumerate(blocks):
            e = err[:, g, :]
            hb = h[..., sl, sl]
            he = e @ hb if hb.ndim == 2 else np.einsum("mij,mj->mi", hb, e)
            res[:, g] = np.sum(he * e, axis=1)
            if lin is not None:
                res[:, g] += 2.0 * np.sum(e * lin[:, g, :], axis=1)
        return res

    best = score(_rtn_error(wg, best_s, best_z, qmin, qmax))
    for shrink in shrinks[1:]:
        s, z = _range_to_grid(lo * shrink, hi * shrink, qmin, qmax, spec.symmetric)
        err = score(_rtn_error(wg, s, z, qmin, qmax))
        better = err < best
        best = np.where(better, err, best)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
    return Grid(best_s, best_z, spec.bits, spec.symmetric, group_size, w.shape[1])


def _mse_unit(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """A power of two near each group's range (out, groups): errors are divided by it before
    squaring, so that the comparison between shrinks is exact as before and weights near the
    float64 limit do not overflow the square (their layer cost is refused later, by name)."""
    amax = np.maximum(np.abs(lo), np.abs(hi))
    return np.exp2(np.floor(np.log2(np.where(amax > 0, amax, 1.0))))


def _mse_candidates(lo, hi, shrinks, qmin, qmax, symmetric):
    """Candidate scales and zero points (k, out, groups), one per shrink of the range."""
    pairs = [_range_to_grid(lo * shrink, hi * shrink, qmin, qmax, symmetric) for shrink in shrinks]
    return (np.stack([p[0] for p in pairs]).astype(np.float64),
            np.stack([p[1] for p in pairs]).astype(np.float64))


def _mse_search(wg, lo, hi, shrinks, qmin, qmax, symmetric):
    """Scale search of ``scale_method='mse'`` (the compiled kernel of :mod:`qround._grid_kernel`):
    per group the first shrink whose rounding-to-nearest has the smallest squared weight error.
    Returns the best (scale, zero_point), each (out, groups)."""
    from ._grid_kernel import mse_search

    cand_s, cand_z = _mse_candidates(lo, hi, shrinks, qmin, qmax, symmetric)
    idx = mse_search(np.ascontiguousarray(wg, dtype=np.float64), cand_s, cand_z,
                     _mse_unit(lo, hi), float(qmin), float(qmax))
    rows = np.arange(wg.shape[0])[:, None]
    cols = np.arange(wg.shape[1])[None, :]
    return cand_s[idx, rows, cols], cand_z[idx, rows, cols]


def _mse_search_numpy(wg, lo, hi, shrinks, qmin, qmax, symmetric):
    """The same search as :func:`_mse_search` in numpy, one candidate at a time over the whole
    layer (the reference the tests compare the kernel with; nine passes per candidate).  On a
    C-contiguous copy: numpy sums an F-ordered buffer in another order, so the scales of the
    search used to depend, in the last bit of near-ties, on the weight's memory layout."""
    wg = np.ascontiguousarray(wg)
    unit = _mse_unit(lo, hi)[..., None]

    def score(err):
        np.divide(err, unit, out=err)  # err is a scratch buffer
        return np.sum(np.square(err, out=err), axis=2)

    best_s, best_z = _range_to_grid(lo * shrinks[0], hi * shrinks[0], qmin, qmax, symmetric)
    best = score(_rtn_error(wg, best_s, best_z, qmin, qmax))
    for shrink in shrinks[1:]:
        s, z = _range_to_grid(lo * shrink, hi * shrink, qmin, qmax, symmetric)
        err = score(_rtn_error(wg, s, z, qmin, qmax))
        better = err < best
        best = np.where(better, err, best)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
    return best_s, best_z
