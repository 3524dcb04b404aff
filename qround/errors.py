"""Errors and input checks shared by every layer of the package.

Every check raises :class:`QroundError` (a ``ValueError``) with a message that names the
offending argument, so a user never sees a traceback from deep inside numpy for bad input.
"""
from __future__ import annotations

import numpy as np

MIN_BITS, MAX_BITS = 2, 8


class QroundError(ValueError):
    """Bad input or configuration: the message names the argument and what is wrong."""


class SolverError(QroundError, RuntimeError):
    """A solver broke its contract (the shape, values or form of what it returned): a defect
    of that solver, named by its label.  A RuntimeError too, as it was before it had a class."""


# torch's generators take seeds below 2**64 (numpy's take any): the largest seed qround accepts
MAX_SEED = 2 ** 64 - 1


def check_int(value, name: str, minimum: int, allow_none: bool = False,
              maximum: int | None = None) -> int | None:
    """An integer parameter in ``[minimum, maximum]`` (or None where allowed); QroundError
    naming it.  ``maximum`` keeps absurd values (``2**70`` restarts) from failing deep in a
    compiled kernel or an allocation."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        kind = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise QroundError(f"{name} must be {kind}, got {value!r}")
    if maximum is not None and value > maximum:
        raise QroundError(f"{name}={value} is too large: at most {maximum}")
    return int(value)


def check_real(value, name: str, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real parameter in ``[lo, hi]`` (ends open where asked), as a float; a
    QroundError naming it otherwise (NaN, infinities, strings and booleans included)."""
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."   # 10**400
    bad = QroundError(f"{name} must be a finite number, got {shown}")
    if isinstance(value, (bool, np.bool_)):
        raise QroundError(f"{name} must be a finite number, got the bool {value!r}")
    if not isinstance(value, (int, float, np.integer, np.floating)):
        raise bad
    try:
        v = float(value)   # an int too large for a float64 overflows here
    except OverflowError:
        raise bad from None
    if not np.isfinite(v):
        raise bad
    if (lo is not None and (v <= lo if lo_open else v < lo)) or \
            (hi is not None and (v >= hi if hi_open else v > hi)):
        span = (f"{'(' if lo_open or lo is None else '['}{'-inf' if lo is None else lo}, "
                f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}")
        raise QroundError(f"{name} must lie in {span}, got {value!r}")
    return v


def check_bool(value, name: str) -> bool:
    """A True/False flag (or the integers 0 and 1): a string such as ``'False'``, None or any
    other number is refused, not taken as its truth value."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise QroundError(f"{name} must be True or False, got {value!r}")


def check_positive_pair(value, name: str) -> tuple[float, float]:
    """A (start, end) pair of finite positive numbers (a schedule's ends)."""
    try:
        a, b = value
    except (TypeError, ValueError):
        raise QroundError(f"{name} must be a (start, end) pair of positive numbers, got "
                          f"{value!r}") from None
    return (check_real(a, f"{name}[0]", 0, lo_open=True),
            check_real(b, f"{name}[1]", 0, lo_open=True))


def check_bits(bits: int, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise QroundError(f"{name} must be an integer, got {bits!r}")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise QroundError(f"{name}={bits} is out of range: supported are "
                          f"{MIN_BITS}..{MAX_BITS} bits")
    return int(bits)


def to_numpy(x) -> np.ndarray:
    """``np.asarray(x)``, taking torch tensors too: detached (``requires_grad`` is fine), on the
    CPU, floating ones as float64 (numpy has no bfloat16), bool and integer ones as they are."""
    if hasattr(x, "detach") and hasattr(x, "is_floating_point"):   # without importing torch
        x = x.detach().cpu()
        x = x.double().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def as_float_array(x, name: str, ndim: int | tuple[int, ...] | None = None,
                   dtype=np.float64) -> np.ndarray:
    """Convert to a finite float array (torch tensors accepted), checking dimensionality."""
    try:
        arr = to_numpy(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise QroundError(f"{name} could not be read as an array: {exc}") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise QroundError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise QroundError(f"{name} must be real, got dtype {arr.dtype}")
    arr = arr.astype(dtype, copy=False)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if arr.ndim not in allowed:
            raise QroundError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                              f"got shape {arr.shape}")
    if arr.size and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise QroundError(f"{name} contains {bad} NaN/Inf value(s)")
    return arr


def check_psd(h: np.ndarray, name: str = "hessian", rtol: float = 1e-6) -> None:
    """Symmetric and positive semi-definite within a tolerance relative to its largest entry.

    ``h`` is (n, n) or a stack (m, n, n).
    """
    if h.shape[-1] != h.shape[-2]:
        raise QroundError(f"{name} must be square, got shape {h.shape}")
    if h.size == 0:
        return
    # each matrix of a stack against its own largest entry: a small negative-definite channel
    # beside a large one is not PSD "within tolerance"
    scale = np.max(np.abs(h), axis=(-2, -1), keepdims=True)
    if not np.any(scale > 0):
        return
    asym = np.max(np.abs(h - np.swapaxes(h, -1, -2)), axis=(-2, -1), keepdims=True)
    bad = np.flatnonzero((asym > rtol * scale * 10).ravel())
    if bad.size:
        i = int(bad[0])
        where = f" (channel {i})" if h.ndim == 3 else ""
        raise QroundError(f"{name} is not symmetric{where}: max |H - H^T| = "
                          f"{float(asym.ravel()[i]):.3g} (max |H| = {float(scale.ravel()[i]):.3g})")
    # A Cholesky factorisation of H + tol*I succeeds iff H is PSD within tol; it is ~10x faster
    # than eigenvalues, which are computed only to explain a failure.  An all-zero matrix is
    # PSD: any positive tol lets it factorise.
    tol = np.where(scale > 0, 1e-6 * scale * max(1, h.shape[-1]) ** 0.5, 1.0)
    try:
        np.linalg.cholesky(h + tol * np.eye(h.shape[-1]))
        return
    except np.linalg.LinAlgError:
        pass
    eig_min = np.min(np.linalg.eigvalsh(h), axis=-1).reshape(-1)
    bad = np.flatnonzero(eig_min < -tol.reshape(-1))
    if bad.size:
        i = int(bad[0])
        where = f" (channel {i})" if h.ndim == 3 else ""
        raise QroundError(f"{name} is not positive semi-definite{where}: smallest eigenvalue "
                          f"{float(eig_min[i]):.3g} (max |H| = {float(scale.ravel()[i]):.3g}); "
                          "statistics E[x x^T] are PSD by construction, so check how it was "
                          "computed")


def copy_module(module, what: str = "model", memo: dict | None = None):
    """``copy.deepcopy(module, memo)``; a module that cannot be copied (a tensor attribute
    computed with autograd, as pruning or the old ``weight_norm`` leave behind) gets a
    QroundError that says why qround copies and what to do.  ``memo`` ({id: object}) keeps
    those objects shared instead of copied."""
    import copy

    try:
        return copy.deepcopy(module, memo)
    except RuntimeError as exc:
        if "deepcopy protocol" not in str(exc):  # out of memory and the like stay what they are
            raise
        raise QroundError(
            f"cannot copy the {what} (qround works on a copy so that yours stays intact): a "
            "tensor attribute was computed with autograd. Make computed weights permanent "
            "first (torch.nn.utils.prune.remove, torch.nn.utils.remove_weight_norm).") from None


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, for a one-line QroundError that wraps it.  An
    exception without a message (transformers' ``BatchEncoding.__getattr__`` raises a bare
    AttributeError) is described by where it was raised instead."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0][:limit]
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "no message"
    code = tb.tb_frame.f_code
    return f"no message; raised in {code.co_name} at {code.co_filename}:{tb.tb_lineno}"[:limit]
