"""Mean-field annealing: deterministic annealing of the mean-field equations (torch, any device).

Each choice ``b_i`` is replaced by its mean ``v_i`` in [0, 1] at an inverse temperature
``beta``.  With the others at their means, setting ``b_i = 1`` instead of 0 changes the energy
``E(b) = y^T H y + g^T y`` (``y = s * b``) by

    phi_i = s_i (2 (H y)_i - 2 H_ii s_i v_i + g_i) + s_i^2 H_ii,

and the mean-field equations are ``v_i = sigmoid(-beta phi_i / kappa)``.  ``beta`` grows
geometrically from ``beta[0]`` (nearly all means at one half) to ``beta[1]`` (nearly all at 0 or
1); at each ``beta`` the means take one damped step towards the equations' right-hand side,
``v <- v + damping (sigmoid(-beta phi / kappa) - v)``, for every variable and channel at once:
one product with ``H`` per step, as in :mod:`qround.solvers.hopfield` (Peterson and Soederberg
1989; the classical Hopfield network at its mean-field fixed point).  The damping keeps the
simultaneous update from oscillating: the couplings of a layer's inputs are comparable to their
self-couplings, and undamped simultaneous steps flip whole groups back and forth.  A step is
stable while ``damping x rho_c`` stays below about 2, ``rho_c`` the largest eigenvalue of the
channel's coupling ``S H S / kappa_c``; ``rho`` grows with the width and the correlation of the
inputs (28-30 on MiniLM's 384-input query layer, 90-115 on the digits CNN's conv3, 320-350 on
MiniLM's 1536-input output layer), so each channel's step is capped at ``2 / rho_c``
(:func:`coupling_norm`, 30 power iterations).  Without the cap, ``damping=0.02`` left the
output layer at half its RTN cost instead of an eighth.

``kappa_c`` is the energy scale of :mod:`qround.solvers.hopfield` (the mean single-flip curvature
``s_i^2 H_ii`` over the channel's free inputs), so one ``beta`` schedule means the same in every
layer and channel.  The means start at the float weights' fractional parts.  Every
``eval_every`` steps and at the end the means are rounded at one half and evaluated; per channel
the best seen is returned (the start included).

It is a relaxation like AdaRound's (``hopfield``), and a cheaper one: one product with ``H`` per
step and no optimiser state, 400 steps against 2000.  ``quality`` uses it as a third start for
its tabu search (BENCHMARKS.md section 1j).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import QroundError, check_int, check_positive_pair, check_real
from ..problems import energy
from ..problems.rounding import RoundingProblem
from . import _torch
from .base import Solver
from .hopfield import _energy_scale


class MeanField(Solver):
    """Mean-field (deterministic) annealing, batched over channels (torch).

    iterations: damped mean-field steps (one product with H each); beta: (start, end) of the
    geometric inverse-temperature schedule, in units of the channel's energy scale; damping:
    the fraction of the way each step moves the means (0 < damping <= 1), at most; channels
    with strong couplings take smaller steps (see the module docstring); eval_every: steps
    between evaluations of the rounded means; device: "cpu" or "cuda"; dtype: float32 by
    default on every device (the means need no more, and float32 products are the faster
    ones; the result's energies are then computed exactly, in float64, as for every solver),
    "float64", or None (float64 on the CPU, float32 on CUDA, as the other torch solvers).
    """

    name = "meanfield"

    def __init__(self, iterations: int = 400, beta: tuple[float, float] = (1.0, 1000.0),
                 damping: float = 0.02, eval_every: int = 10, device="cpu",
                 dtype="float32"):
        self.iterations = check_int(iterations, "iterations", 1, maximum=_torch.MAX_STEPS)
        self.eval_every = check_int(eval_every, "eval_every", 1)
        b0, b1 = check_positive_pair(beta, "beta")
        if not (1e-8 <= b0 and b1 <= 1e8):   # float32 rounds 1e-50 to 0; 0 * inf is NaN
            raise QroundError(f"beta must lie in [1e-8, 1e8], got {beta!r}")
        if b0 > b1:
            raise QroundError(f"beta must grow: start <= end, got {beta!r}")
        self.beta = (b0, b1)
        self.damping = check_real(damping, "damping", 0, 1, lo_open=True)
        self.device, self.dtype = _torch.check_device_dtype(device, dtype)

    def betas(self) -> np.ndarray:
        """The inverse temperature of every step (geometric from beta[0] to beta[1])."""
        b0, b1 = self.beta
        return b0 * (b1 / b0) ** (np.arange(self.iterations) / max(1, self.iterations - 1))

    def _solve(self, problem: RoundingProblem, start: np.ndarray, rng: np.random.Generator):
        dev = _torch.resolve_device(self.device)
        dtype = _torch.resolve_dtype(self.dtype, dev)
        with torch.no_grad():
            tp = _torch.to_torch(problem, dev, dtype)
            best, _ = anneal_means(tp, torch.as_tensor(start, dtype=dtype, device=dev),
                                   self.betas(), self.damping, self.eval_every)
        return _torch.to_numpy_choices(best), {"iterations": self.iterations}


def flip_in_costs(v: torch.Tensor, tp: _torch.TorchProblem) -> torch.Tensor:
    """phi (m, n): the energy change of ``b_i = 1`` instead of 0, the other choices at their
    means ``v`` (m, n).  For 0/1 ``v`` it is exactly ``E(b | b_i = 1) - E(b | b_i = 0)``."""
    s, d = tp.step, tp.hessian_diag
    # phi = s (2 (H y - H_ii y_i) + g) + s^2 H_ii with y = s v
    return 2 * s * (energy.hessian_times(s * v, tp.hessian) - s * d * v) + s * (tp.grad + s * d)


STABILITY = 2.0


def coupling_norm(tp: _torch.TorchProblem, free: torch.Tensor, kappa: torch.Tensor,
                  iterations: int = 30) -> torch.Tensor:
    """rho_c (m,): the largest eigenvalue of ``S H S / kappa_c`` on each channel's free inputs
    (S = diag(step)), by power iteration from the all-ones vector (H is PSD, so it converges
    to the top of the spectrum; 30 products bring it within a few per cent, enough for a step
    size)."""
    x = free.clone()
    rho = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        y = energy.hessian_times(tp.step * x, tp.hessian) * tp.step * free / kappa
        norm = y.norm(dim=1)
        rho = norm / x.norm(dim=1).clamp_min(1e-30)
        x = y / norm.clamp_min(1e-30)[:, None]
    return rho.clamp_min(1e-30)


def anneal_means(tp: _torch.TorchProblem, start: torch.Tensor, betas, damping: float,
                 eval_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The damped mean-field steps at the inverse temperatures ``betas``.

    Returns (best 0/1 choices seen, the start included; the final means v), both (m, n).
    """
    free = tp.free.to(start.dtype)
    kappa = _energy_scale(tp, free)[:, None]                               # (m, 1)
    s, g, h = tp.step, tp.grad, tp.hessian
    # -phi / kappa = a (H y - s H_ii v) + c with y = s v: one product and three fused operations
    # per step.  A fixed weight gets c = -inf: its mean is 0 and stays 0 (sigmoid(-inf) = 0).
    a = -2 * s / kappa
    c = torch.where(tp.free, -s * (g + s * tp.hessian_diag) / kappa,
                    torch.full_like(s, -torch.inf))
    sd = s * tp.hessian_diag
    shared = h.ndim == 2
    # a simultaneous step oscillates once damping x (coupling) passes about 2: cap each channel's
    # step at 2 / rho_c, rho_c the largest eigenvalue of its coupling S H S / kappa_c (measured:
    # 28-30 on MiniLM's 384-input query layer, 330-340 on its 1536-input output layer)
    alpha = torch.clamp(STABILITY / coupling_norm(tp, free, kappa), max=damping)[:, None]
    best = start * free
    best_e = energy.energies(best, s, g, h)
    v = tp.frac * free
    y, t, u = torch.empty_like(v), torch.empty_like(v), torch.empty_like(v)
    for step, beta in enumerate(betas):
        torch.mul(s, v, out=y)
        if shared:
            torch.addmm(torch.mul(sd, v, out=t), y, h, beta=-1, out=t)     # H y - s H_ii v
        else:
            torch.sub(energy.hessian_times(y, h), torch.mul(sd, v, out=u), out=t)
        torch.addcmul(c, a, t, out=u)                                     # -phi / kappa
        v.lerp_(torch.sigmoid_(u.mul_(float(beta))), alpha)
        if (step + 1) % eval_every == 0 or step + 1 == len(betas):
            b = (v >= 0.5).to(v.dtype)
            e = energy.energies(b, s, g, h)
            win = e < best_e   # torch.where: no host sync
            best = torch.where(win[:, None], b, best)
            best_e = torch.where(win, e, best_e)
    return best, v
