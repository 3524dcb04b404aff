"""GPTQ (Frantar et al. 2022) restricted to the floor or ceil of the original weights.

GPTQ rounds the inputs one at a time and spreads each rounding error over the inputs not yet
rounded, so that they can compensate (Optimal Brain Quantization with a fixed order).  With
``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), rounding input ``i`` of every
channel to ``q_i`` updates the remaining weights by

    err = (w_i - q_i) / U_ii,     w_j <- w_j - err * U_ij   (j > i).

Here ``q_i`` is whichever of floor or ceil *of the original weight* on its grid lies nearer to
the current, error-updated ``w_i`` (a clipped weight keeps its single code), so the result is a
choice ``b`` of the same QUBO every other solver reads, and a strong start for local search.

The weights that the error feedback starts from are the minimiser of the channel's damped cost,
``w* = (H + lambda I)^-1 (r + lambda w)``: the float weights for the local-MSE target
(``r = H w``), and that solve for asymmetric reconstruction (``r = C w``, found from the
problem's ``grad = 2 (H u - r)``); an input that is always zero keeps its float weight there.

Cost: one Cholesky factorisation and a triangular inverse (O(n^3)), the columns after each
block of 128 updated by one matrix product (O(m n^2), BLAS), and the columns inside a block one
at a time by a numba kernel on the CPU (O(m n * 128)): 0.013 to 0.016 s measured for a
384 x 384 layer on one thread.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import QroundError, check_bool, check_int, check_real
from ..problems.rounding import RoundingProblem
from . import _kernels, _torch
from .base import Solver


def inverse_cholesky(hessian: torch.Tensor, damp: float, retries: int = 4,
                     dead_diagonal: float | None = None):
    """Upper Cholesky factor of ``(H + lambda I)^-1``, an upper factor of ``H + lambda I``.

    hessian (n, n).  A zero diagonal entry (an input that is always zero) is set to
    ``dead_diagonal``, by default :func:`dead_fill`.  ``lambda`` starts at
    ``damp * mean(diag H)`` and grows tenfold after every
    failed factorisation, at most ``retries`` times.  The inverse is never formed: with ``J``
    the reversal of the inputs, the lower Cholesky factor ``L`` of ``J (H + lambda I) J`` gives
    ``H + lambda I = R R^T`` with ``R = J L J`` upper triangular, so ``(H + lambda I)^-1 =
    R^-T R^-1`` and ``U = R^-1`` is its upper Cholesky factor (unique: positive diagonal).  One
    factorisation and one triangular solve, instead of a factorisation, an inverse and a second
    factorisation.  Returns (U (n, n), R (n, n), lambda).
    """
    h = hessian.clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    # an input that is always zero: its weight does not matter.  GPTQ sets its diagonal to 1
    # (``dead_diagonal=1.0``, the baseline's); by default it gets the live inputs' mean
    # diagonal, which keeps the result independent of H's scale (a 1 next to small entries
    # made the damping many times the real diagonal: RTN-like rounding)
    diag[dead] = dead_fill(diag) if dead_diagonal is None else dead_diagonal
    base = float(diag.double().mean())   # a float32 sum of large entries could overflow
    if not np.isfinite(base) or base <= 0:
        raise QroundError("hessian has a non-positive or non-finite mean diagonal; gptq needs "
                          "E[x x^T] of real calibration data")
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    flipped = h.flip(0, 1)
    lam = damp * base
    for attempt in range(retries + 1):
        if attempt:
            lam = lam * 10 if lam > 0 else 1e-6 * base
        chol, info = torch.linalg.cholesky_ex(flipped + lam * eye)  # J eye J = eye
        if int(info) == 0:
            r_upper = chol.flip(0, 1)
            upper = _triangular_inverse(r_upper, eye)
            if bool(torch.isfinite(upper).all()):
                return upper, r_upper, lam
    raise QroundError(f"gptq: the Cholesky factorisation of the hessian failed even with damping "
                      f"{lam:.3g} (= {lam / base:.3g} x mean diagonal, after {retries} retries); "
                      "the hessian is far from positive definite: collect more calibration "
                      "samples, use dtype='float64', or raise damp= or retries=")


def dead_fill(diag: torch.Tensor) -> float:
    """The diagonal :func:`inverse_cholesky` gives an always-zero input: the mean of the
    others (1 when every input is dead)."""
    live = diag[diag != 0].double()
    return float(live.mean()) if live.numel() else 1.0


def _triangular_inverse(r: torch.Tensor, eye: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``R^-1`` (n, n) of an upper triangular ``R`` (n, n), by column blocks: block ``j`` of the
    inverse has zeros below its rows, so it needs only the leading ``R[:j2, :j2]`` (a third of
    the work of solving against all of ``I``; half the time measured at n = 1536)."""
    out = torch.zeros_like(r)
    for j1 in range(0, r.shape[0], block):
        j2 = min(j1 + block, r.shape[0])
        out[:j2, j1:j2] = torch.linalg.solve_triangular(r[:j2, :j2], eye[:j2, j1:j2], upper=True)
    return out


def round_sequentially(target: torch.Tensor, lower: torch.Tensor, step: torch.Tensor,
                       upper: torch.Tensor, block: int = 128) -> torch.Tensor:
    """GPTQ's loop (lazy batch updates) choosing between floor ``lower`` and ``lower + step``.

    target, lower, step: (m, n) in the order of ``upper`` (n, n), the upper Cholesky factor of
    the inverse hessian.  ``step`` is 0 where a weight has no choice.  Returns b (m, n) in {0, 1}.
    """
    return round_columns(target.T, lower.T, step.T, upper, block).T


def round_columns(target: torch.Tensor, lower: torch.Tensor, step: torch.Tensor,
                  upper: torch.Tensor, block: int = 128,
                  compiled: bool | None = None) -> torch.Tensor:
    """:func:`round_sequentially` on transposed (n, m) tensors, inputs as rows: b (n, m).

    Row ``i`` of every channel is rounded, ``err = (w_i - q_i) / U_ii``, and the rows ``j > i``
    of the block get ``- U_ij err`` at once; the rows after a block get the block's errors in
    one matrix product (GPTQ's lazy batch update).  Inside a block the rows go one at a time:
    compiled (numba, the default on the CPU) or in torch (the default on a GPU); both do the
    same arithmetic.  Each step runs over the contiguous channels of a row.
    """
    w = target.clone(memory_format=torch.contiguous_format)
    lower, step, upper = lower.contiguous(), step.contiguous(), upper.contiguous()
    n, m = w.shape
    b = torch.zeros_like(w)
    err = torch.empty((min(block, n), m), dtype=w.dtype, device=w.device)
    if compiled is None:
        compiled = w.device.type == "cpu"
    if compiled:  # the kernel works on the tensors' memory
        arrays = [x.numpy() for x in (w, lower, step, upper, b, err)]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        if compiled:
            _kernels.gptq_block_kernel(*arrays[:4], i1, i2, *arrays[4:])
        else:
            for i in range(i1, i2):
                wi = w[i]
                up = (wi - lower[i] >= 0.5 * step[i]) & (step[i] > 0)  # ties up, as RTN
                b[i] = up.to(w.dtype)
                err[i - i1] = (wi - (lower[i] + step[i] * up)) / upper[i, i]
                w[i + 1:i2] -= upper[i, i + 1:i2, None] * err[i - i1][None, :]
        w[i2:] -= upper[i1:i2, i2:].T @ err[:i2 - i1]
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
        self.act_order = check_bool(act_order, "act_order")
        self.damp = check_real(damp, "damp", 0, 1e6)   # relative to mean(diag H)
        self.retries = check_int(retries, "retries", 0, maximum=64)
        self.block = check_int(block, "block", 1)
        self.device, self.dtype = _torch.check_device_dtype(device, dtype)

    def _solve(self, problem: RoundingProblem, start: np.ndarray, rng: np.random.Generator):
        dev = _torch.resolve_device(self.device)
        dtype = _torch.resolve_dtype(self.dtype, dev)

        def t(a):  # float64 until the target test; (n, m): inputs as rows, see round_columns
            return torch.as_tensor(np.array(a, dtype=np.float64), device=dev)

        weight, grad = t(problem.weight.T), t(problem.grad.T)
        lower = t((problem.scale * (problem.floor_codes - problem.zero_point)).T)
        step = t(problem.step.T).to(dtype)
        hessians = [t(problem.hessian)] if problem.shared_hessian else \
            [t(h) for h in problem.hessian]
        local = self._is_local_mse(weight, lower, grad, hessians)
        weight, lower, grad = weight.to(dtype), lower.to(dtype), grad.to(dtype)
        _torch.check_fits(dtype, weight, lower, grad)
        for h in hessians:   # one channel's copy at a time (a per-channel H is m of them)
            _torch.check_fits(dtype, h.to(dtype))
        out = torch.empty(weight.shape, dtype=dtype, device=dev)   # (n, m)
        groups = ([slice(None)] if problem.shared_hessian
                  else [slice(c, c + 1) for c in range(problem.num_channels)])
        damping = []
        for sl, h in zip(groups, hessians):
            h = h.to(dtype)
            order = (torch.argsort(torch.diagonal(h), descending=True, stable=True)
                     if self.act_order else torch.arange(h.shape[0], device=dev))
            h = h[order][:, order]
            upper, _, lam = inverse_cholesky(h, self.damp, self.retries)
            damping.append(lam)
            low = lower[order, sl]
            if local:
                target = weight[order, sl]
            else:
                # asymmetric target r: grad = 2 (H u - r).  U factors H' + lam I, where H' is H
                # with a dead input's zero diagonal set to dead_fill (D).  The damped minimiser,
                # as the local path's w is: w* = (H' + lam I)^-1 (r + (lam + D) w)
                # = u - U^T U (grad / 2 - (lam + D) (w - u)), so a dead input's target is its w.
                # (Damping towards u instead, as before, penalised every round-up: dead inputs
                # always rounded down.)
                diag = torch.diagonal(h)
                pull = lam + dead_fill(diag) * (diag == 0).to(dtype)[:, None]
                rhs = 0.5 * grad[order, sl] - pull * (weight[order, sl] - low)
                target = low - upper.T @ (upper @ rhs)
            out[order, sl] = round_columns(target, low, step[order, sl], upper, self.block)
        return _torch.to_numpy_choices(out.T), {"damping": max(damping)}

    @staticmethod
    def _is_local_mse(weight, lower, grad, hessians) -> bool:
        """Whether the target is ``r = H w`` (then ``w* = w`` exactly, without a solve).

        weight, lower, grad: (n, m) float64; hessians: [H (n, n)], shared or one per channel.
        Tested on two fixed random directions ``z``: ``z^T grad == 2 z^T H (u - w)`` per
        channel, O(m n + n^2) for a shared H instead of the O(m n^2) of comparing ``grad`` with
        ``2 H (u - w)``; a different target passes only if ``grad - 2 H (u - w)`` is orthogonal
        to both directions (probability zero).
        """
        gen = torch.Generator().manual_seed(0)
        z = torch.randn((weight.shape[0], 2), generator=gen, dtype=torch.float64)
        z = z.to(weight.device)
        diff = 2.0 * (lower - weight)
        zh = torch.stack([z.T @ h for h in hessians])               # (1 or m, 2, n)
        if len(hessians) == 1:
            local, size = zh[0] @ diff, zh[0].abs() @ diff.abs()     # (2, m)
        else:
            local = torch.einsum("mkn,nm->km", zh, diff)
            size = torch.einsum("mkn,nm->km", zh.abs(), diff.abs())
        tol = 1e-9 * (z.T.abs() @ grad.abs() + size) + 1e-300
        return bool(((z.T @ grad - local).abs() <= tol).all())
