"""Torch plumbing shared by the tensor solvers (``cem``, ``hopfield``, ``gptq``).

Moves a problem's arrays to a device once, turns the numpy ``rng`` handed to ``_solve`` into a
local ``torch.Generator`` (the global torch RNG is never used), and splits channels into chunks
so that a batch of candidates (K, chunk, n) stays within a memory budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import QroundError
from ..problems.rounding import RoundingProblem

try:  # torch is a dependency of the package, but keep the error readable if it is missing
    import torch
except ImportError:  # pragma: no cover
    torch = None

_DTYPES = {"float32": "float32", "float": "float32", "float64": "float64", "double": "float64"}


def resolve_device(device) -> "torch.device":
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``; CUDA must be available."""
    if torch is None:  # pragma: no cover
        raise QroundError("this solver needs torch; install it with `pip install torch`")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise QroundError(f"device={device!r} is not a torch device: {exc}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise QroundError(f"device={device!r} asked for CUDA, but torch.cuda.is_available() "
                              "is False here; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise QroundError(f"device={device!r}: only {torch.cuda.device_count()} CUDA "
                              "device(s) present")
    elif dev.type != "cpu":
        raise QroundError(f"device={device!r} is not supported: use 'cpu' or 'cuda'")
    elif dev.index not in (None, 0):
        raise QroundError(f"device={device!r}: there is one CPU device; use 'cpu'")
    return dev


MAX_STEPS = 10 ** 7   # steps of the torch relaxations: their schedules are per-step arrays


def check_device_dtype(device, dtype):
    """(device, dtype) as given, after checking them as the solve will (a misspelt device, CUDA
    where there is none, an unsupported dtype), so a solver is refused when it is built."""
    resolve_dtype(dtype, resolve_device(device))
    return device, dtype


def resolve_dtype(dtype, device: "torch.device") -> "torch.dtype":
    """None -> float64 on CPU (exact comparisons), float32 on CUDA; else float32/float64."""
    if dtype is None:
        return torch.float64 if device.type == "cpu" else torch.float32
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise QroundError(f"dtype={dtype!r} is not supported: use 'float32' or 'float64'")
        return getattr(torch, _DTYPES[dtype.removeprefix("torch.")])
    if dtype in (torch.float32, torch.float64):
        return dtype
    if dtype in (np.float32, np.float64):
        return torch.float32 if dtype == np.float32 else torch.float64
    raise QroundError(f"dtype={dtype!r} is not supported: use torch.float32 or torch.float64")


def torch_generator(rng: np.random.Generator, device: "torch.device") -> "torch.Generator":
    """A private torch generator on ``device``, seeded from the numpy ``rng``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(rng.integers(0, 2 ** 63 - 1)))
    return gen


@dataclass(frozen=True)
class TorchProblem:
    """A problem's arrays as tensors on one device (shapes as in :class:`RoundingProblem`).

    step, grad, frac (m, n); free (m, n) bool; hessian (n, n) or (m, n, n);
    hessian_diag (n,) or (m, n).
    """

    step: "torch.Tensor"
    grad: "torch.Tensor"
    frac: "torch.Tensor"
    free: "torch.Tensor"
    hessian: "torch.Tensor"
    hessian_diag: "torch.Tensor"

    @property
    def shared_hessian(self) -> bool:
        return self.hessian.ndim == 2

    def channels(self, idx) -> "TorchProblem":
        """The tensors of some channels (index tensor or slice); a shared H is kept as is."""
        h = self.hessian if self.shared_hessian else self.hessian[idx]
        hd = self.hessian_diag if self.shared_hessian else self.hessian_diag[idx]
        return TorchProblem(self.step[idx], self.grad[idx], self.frac[idx], self.free[idx], h, hd)


def _float32_units(problem: RoundingProblem) -> tuple[float, float]:
    """(a, e): powers of two such that the problem with steps ``s / a`` and energies ``E / e``
    (H scaled by a^2 / e, g by a / e) fits float32, when it would not as it is (a layer's
    weights and statistics near 1e15 or 1e-15 overflow ``s^2 H`` or underflow it to zero).
    Both are 1 otherwise, so ordinary problems are computed as before.  The argmin of E / e is
    E's: the choices do not change, and solvers report energies in float64 from them."""
    step = np.abs(np.asarray(problem.step, dtype=np.float64))
    diag = np.abs(np.asarray(problem.hessian_diag, dtype=np.float64))
    curvature = step ** 2 * diag
    top_s, top_c = float(step.max(initial=0.0)), float(curvature.max(initial=0.0))
    # H and g themselves must fit too: tiny steps beside a huge H give an ordinary s^2 H
    top_h = float(np.abs(problem.hessian).max(initial=0.0))
    top_g = float(np.abs(problem.grad).max(initial=0.0))
    if (1e-15 < top_s < 1e15) and (top_c == 0 or 1e-30 < top_c < 1e30) \
            and top_h < 1e30 and top_g < 1e30:
        return 1.0, 1.0
    a = float(2.0 ** np.round(np.log2(top_s))) if top_s > 0 else 1.0   # steps near 1
    e = float(2.0 ** np.round(np.log2(top_c))) if top_c > 0 else 1.0   # curvatures near 1
    return a, e


def to_torch(problem: RoundingProblem, device, dtype) -> TorchProblem:
    """Copy the arrays a solver reads to ``device`` in ``dtype`` (torch.float32/float64); in
    float32, a problem outside float32's range in units chosen by :func:`_float32_units`."""
    def t(a, factor=1.0):
        return torch.as_tensor(np.array(a, dtype=np.float64) * factor, dtype=dtype,
                               device=device)

    a, e = _float32_units(problem) if dtype == torch.float32 else (1.0, 1.0)
    out = TorchProblem(step=t(problem.step, 1 / a), grad=t(problem.grad, a / e),
                       frac=t(problem.frac),
                       free=torch.as_tensor(np.array(problem.free), device=device),
                       hessian=t(problem.hessian, a * a / e),
                       hessian_diag=t(problem.hessian_diag, a * a / e))
    check_fits(dtype, out.step, out.grad, out.hessian)
    return out


def check_fits(dtype, *tensors) -> None:
    """QroundError when a problem's tensors overflowed ``dtype`` (float32: values near 1e38),
    instead of a solve that silently keeps its start."""
    if dtype == torch.float32 and not all(bool(torch.isfinite(x).all()) for x in tensors):
        raise QroundError("this problem's values (weights, steps or statistics) lie beyond "
                          "float32's range; use dtype='float64'")


def channel_chunks(m: int, per_channel: int, max_elements: int) -> list[slice]:
    """Slices of at most ``max_elements // per_channel`` channels (at least one each)."""
    size = max(1, int(max_elements) // max(1, int(per_channel)))
    return [slice(i, min(i + size, m)) for i in range(0, m, size)]


def to_numpy_choices(b: "torch.Tensor") -> np.ndarray:
    """(m, n) tensor of 0/1 (any dtype) -> numpy bool."""
    return (b.detach() > 0.5).cpu().numpy()
