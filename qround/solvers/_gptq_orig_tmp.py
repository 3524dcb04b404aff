"""GPTQ (Frantar et al. 2022) restricted to the floor or ceil of the original weights.

GPTQ rounds the inputs one at a time and spreads each rounding error over the inputs not yet
rounded, so that they can compensate (Optimal Brain Quantization with a fixed order).  With
``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), rounding input ``i`` of every
channel to ``q_i`` updates the remaining weights by

    err = (w_i - q_i) / U_ii,     w_j <- w_j - err * U_ij   (j > i).

Here ``q_i`` is whichever of floor or ceil *of the original weight* on its grid lies nearer to
the current, error-updated ``w_i`` (a clipped weight keeps its single code), so the result is a
choice ``b`` of the same QUBO every other solver reads, and a strong start for local search.

The weights that the error feedback starts from are the minimiser of the channel's cost,
``w* = H^-1 r``: the float weights for the local-MSE target (``r = H w``), and ``H^-1 C w`` for
asymmetric reconstruction (found from the problem's ``grad = 2 (H u - r)`` with the damped H).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import QroundError
from ..problems import energy
from ..problems.rounding import RoundingProblem
from . import _torch
from .base import Solver


def inverse_cholesky(hessian: torch.Tensor, damp: float, retries: int = 4):
    """Upper Cholesky factor of ``(H + lambda I)^-1`` and the lower factor of ``H + lambda I``.

    hessian (n, n).  ``lambda`` starts at ``damp * mean(diag H)`` and grows tenfold after every
    failed factorisation, at most ``retries`` times.  Returns (U (n, n), L (n, n), lambda).
    """
    h = hessian.clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0  # an input that is always zero: its weight does not matter (as GPTQ)
    base = float(diag.mean())
    if not np.isfinite(base) or base <= 0:
        raise QroundError("hessian has a non-positive or non-finite mean diagonal; gptq needs "
                          "E[x x^T] of real calibration data")
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp * base
    for attempt in range(retries + 1):
        if attempt:
            lam = lam * 10 if lam > 0 else 1e-6 * base
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            # cholesky_solve against I is ~3x faster than cholesky_inverse here (measured, n=1536)
            inverse = torch.cholesky_solve(eye, chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, chol, lam
    raise QroundError(f"gptq: the Cholesky factorisation of the hessian failed even with damping "
                      f"{lam:.3g} (= {lam / base:.3g} x mean diagonal, after {retries} retries); "
                      "the hessian is far from positive definite: collect more calibration "
                      "samples, use dtype='float64', or raise damp= or retries=")


def round_sequentially(target: torch.Tensor, lower: torch.Tensor, step: torch.Tensor,
                       upper: torch.Tensor, block: int = 128) -> torch.Tensor:
    """GPTQ's loop (lazy batch updates) choosing between floor ``lower`` and ``lower + step``.

    target, lower, step: (m, n) in the order of ``upper`` (n, n), the upper Cholesky factor of
    the inverse hessian.  ``step`` is 0 where a weight has no choice.  Returns b (m, n) in {0, 1}.
    """
    w = target.clone()
    m, n = w.shape
    b = torch.zeros_like(w)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        err_block = torch.zeros((m, i2 - i1), dtype=w.dtype, device=w.device)
        for i in range(i1, i2):
            wi = w[:, i]
            up = (wi - lower[:, i] >= 0.5 * step[:, i]) & (step[:, i] > 0)  # ties up, as RTN
            q = lower[:, i] + step[:, i] * up
            b[:, i] = up.to(w.dtype)
            err = (wi - q) / upper[i, i]
            # the rest of this block now, the columns after it once per block (GPTQ's lazy update)
            w[:, i:i2] -= err[:, None] * upper[i, i:i2][None, :]
            err_block[:, i - i1] = err
        w[:, i2:] -= err_block @ upper[i1:i2, i2:]
    return b


class GPTQ(Solver):
    """GPTQ sequential rounding with error feedback, restricted to floor/ceil choices.

    act_order: process inputs by decreasing ``diag(H)`` (GPTQ's act-order); damp: relative
    damping ``lambda = damp * mean(diag H)``, grown tenfold on a failed Cholesky (``retries``
    times); block: lazy-update block size.  Per-channel H runs one channel at a time.
    device: "cpu" or "cuda"; dtype: None (float64 on CPU, float32 on CUDA), float32 or float64.
    """

    name = "gptq"

    def __init__(self, act_order: bool = True, damp: float = 0.01, retries: int = 4,
                 block: int = 128, device="cpu", dtype=None):
        if damp < 0 or retries < 0 or block < 1:
            raise QroundError(f"damp and retries must be >= 0 and block >= 1, got damp={damp}, "
                              f"retries={retries}, block={block}")
        self.act_order = bool(act_order)
        self.damp = float(damp)
        self.retries = int(retries)
        self.block = int(block)
        self.device = device
        self.dtype = dtype

    def _solve(self, problem: RoundingProblem, start: np.ndarray, rng: np.random.Generator):
        dev = _torch.resolve_device(self.device)
        dtype = _torch.resolve_dtype(self.dtype, dev)

        def t(a):
            return torch.as_tensor(np.array(a, dtype=np.float64), dtype=dtype, device=dev)

        lower = t(problem.scale * (problem.floor_codes - problem.zero_point))
        step, grad = t(problem.step), t(problem.grad)
        out = torch.zeros(problem.weight.shape, dtype=dtype, device=dev)
        groups = ([slice(None)] if problem.shared_hessian
                  else [slice(c, c + 1) for c in range(problem.num_channels)])
        local = self._is_local_mse(problem)
        damping = []
        for sl in groups:
            h = t(problem.hessian if problem.shared_hessian else problem.hessian[sl][0])
            order = (torch.argsort(torch.diagonal(h), descending=True, stable=True)
                     if self.act_order else torch.arange(h.shape[0], device=dev))
            h = h[order][:, order]
            upper, chol, lam = inverse_cholesky(h, self.damp, self.retries)
            damping.append(lam)
            low = lower[sl][:, order]
            if local:
                target = t(problem.weight[sl])[:, order]
            else:
                # asymmetric target r: grad = 2 (H u - r), so w* = H^-1 r = u - H^-1 grad / 2
                target = low - 0.5 * torch.cholesky_solve(grad[sl][:, order].T, chol).T
            b = round_sequentially(target, low, step[sl][:, order], upper, self.block)
            out[sl] = b[:, torch.argsort(order)]
        return _torch.to_numpy_choices(out), {"damping": max(damping)}

    @staticmethod
    def _is_local_mse(problem: RoundingProblem) -> bool:
        """Whether the target is ``r = H w`` (then ``w* = w`` exactly, without a solve)."""
        u = problem.scale * (problem.floor_codes - problem.zero_point)
        local = 2.0 * energy.hessian_times(u - problem.weight, problem.hessian)
        tol = 1e-9 * max(1.0, float(np.abs(problem.grad).max(initial=0)))
        return bool(np.allclose(local, problem.grad, rtol=1e-9, atol=tol))
