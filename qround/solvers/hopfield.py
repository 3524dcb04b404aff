"""Continuous relaxations of the rounding QUBO, optimised by gradient descent (torch, any device).

``hopfield`` is AdaRound's relaxation (Nagel et al. 2020, eq. 21-24) on the QUBO form: each
choice becomes ``h(V)``, the rectified sigmoid ``clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``
with ``zeta = 1.1, gamma = -0.1``, and Adam minimises per channel

    E(h) / kappa + lambda * sum_i d_i (1 - |2 h_i - 1|^beta),

where ``E(h) = y^T H y + g^T y`` with the continuous step ``y = s * h`` (the quadratic form, not
``b^T Q b``: ``b^2 = b`` only holds for binary ``b``).  ``beta`` anneals 20 -> 2 after a warm-up
without the regulariser; ``V`` starts where ``h(V)`` equals the fractional part of ``w/s`` (the
float weights, where the relaxed cost is zero up to clipping); the answer is ``b = [h(V) >= 0.5]``.

Normalisation (our choice; AdaRound's loss is in the data's units).  ``kappa_c = mean_i s_i^2
H_ii`` over the free inputs of channel ``c`` is the energy change of flipping a typical variable
alone, so ``E / kappa`` has per-variable gradients of order one in every layer and channel, and
one ``lambda`` means the same everywhere (the RTN cost would be a worse yardstick: it is zero
for channels RTN already rounds well and grows with ``n``).  The regulariser of variable ``i`` is
weighted by its own curvature ``d_i = s_i^2 H_ii / kappa_c`` (mean 1 over a channel;
``reg_weighting="uniform"`` gives AdaRound's ``d_i = 1``): at ``beta = 2`` the loss along
``h_i`` alone has curvature ``2 d_i - 8 lambda d_i``, concave for every variable once
``lambda > 1/4``, so all of them end at 0 or 1.  With uniform weights, inputs with large
activations (transformer outlier features, ``H_ii`` hundreds of times the median) outweigh the
regulariser, stay fractional to the end and are thresholded blindly (measured on such a layer:
cost/RTN 0.54 uniform vs 0.32 curvature-weighted).

``hopfield-classic`` is AdaRound Table 3's baseline: ``b = sigmoid(V / T)`` with the temperature
``T`` annealed geometrically, the normalised energy alone as loss, the same final threshold.

Both evaluate the thresholded solution with exact energies every ``eval_every`` steps and at the
end, and return per channel the best seen (the start included).
"""
from __future__ import annotations

import math
from abc import abstractmethod

import numpy as np
import torch

from ..errors import QroundError, check_bool, check_int, check_positive_pair, check_real
from ..problems import energy
from ..problems.rounding import RoundingProblem
from . import _torch
from .base import Solver

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> torch.Tensor:
    """AdaRound's h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), elementwise."""
    return (torch.sigmoid(v) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor, zeta: float = ZETA,
                              gamma: float = GAMMA) -> torch.Tensor:
    """A V with h(V) = h for h in [0, 1] (finite: h is clamped strictly inside sigmoid's range)."""
    p = ((h - gamma) / (zeta - gamma)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8   # torch.optim.Adam's defaults


class _GradientRounding(Solver):
    """Shared loop: Adam on V (m, n), soft choices from V, exact energies of the rounded V.

    The gradient of the loss is written out (``_grad``; :meth:`loss` is the same loss for
    autograd, and a test holds the two equal), and Adam is applied in place, so a step is a
    fixed sequence of tensor operations with every per-step number (beta, lambda, temperature,
    Adam's bias corrections) read from a precomputed schedule on the device.  On CUDA (``graph``)
    ``eval_every`` steps and the evaluation after them are captured once as a CUDA graph and
    replayed: the step's ~30 small kernels then cost no Python or launch time.
    """

    def __init__(self, iterations: int, lr: float, eval_every: int, device, dtype,
                 graph: bool = True):
        check_int(iterations, "iterations", 1, maximum=_torch.MAX_STEPS)
        check_int(eval_every, "eval_every", 1)
        # an Adam step on V (a logit: |V| of a few units decides the rounding) far above 1
        # only saturates every sigmoid in the first step (1e308 overflowed)
        check_real(lr, "lr", 0, 1e3, lo_open=True)
        self.iterations = int(iterations)
        self.lr = float(lr)
        self.eval_every = int(eval_every)
        self.device, self.dtype = _torch.check_device_dtype(device, dtype)
        self.graph = check_bool(graph, "graph")

    # subclass hooks ------------------------------------------------------------------------
    @abstractmethod
    def _init_v(self, frac: torch.Tensor) -> torch.Tensor:
        """V whose soft choice equals ``frac`` (the float weights)."""

    @abstractmethod
    def _schedule(self) -> dict[str, np.ndarray]:
        """Per-step numbers of the loss, each an array of length ``iterations``."""

    @abstractmethod
    def _soft(self, v: torch.Tensor, sched: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, dh/dV) at this step's schedule values ``sched`` (name -> tensor)."""

    def _reg_grad(self, h: torch.Tensor, weight: torch.Tensor, sched: dict):
        """d(regulariser)/dh, or None without a regulariser."""
        return None

    def _reg(self, h: torch.Tensor, weight: torch.Tensor, sched: dict):
        """The regulariser's value (for :meth:`loss`), or None."""
        return None

    @abstractmethod
    def _hard(self, v: torch.Tensor) -> torch.Tensor:
        """The 0/1 choices that V rounds to."""

    def _reg_weight(self, tp, free, kappa):
        return free

    # ---------------------------------------------------------------------------------------
    def _grad(self, v, tp, kappa, weight, sched):
        """dL/dV of :meth:`loss`, written out: (m, n)."""
        h, dh = self._soft(v, sched)
        y = h * tp.step
        g = tp.step * (2 * energy.hessian_times(y, tp.hessian) + tp.grad) / kappa[:, None]
        reg = self._reg_grad(h, weight, sched)
        if reg is not None:
            g = g + reg
        return g * dh

    def loss(self, v, tp, kappa, weight, sched):
        """sum_c E_c(h) / kappa_c + regulariser: the loss whose gradient ``_grad`` writes out."""
        h, _ = self._soft(v, sched)
        out = (energy.energies(h, tp.step, tp.grad, tp.hessian) / kappa).sum()
        reg = self._reg(h, weight, sched)
        return out if reg is None else out + reg

    def _full_schedule(self, dtype, dev) -> dict:
        t = np.arange(1, self.iterations + 1, dtype=np.float64)
        sched = {"step_size": self.lr / (1 - ADAM_BETAS[0] ** t),
                 "bc2_sqrt": np.sqrt(1 - ADAM_BETAS[1] ** t), **self._schedule()}
        return {k: torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=dtype, device=dev)
                for k, a in sched.items()}

    def _solve(self, problem: RoundingProblem, start: np.ndarray, rng: np.random.Generator):
        dev = _torch.resolve_device(self.device)
        dtype = _torch.resolve_dtype(self.dtype, dev)
        with torch.no_grad():
            tp = _torch.to_torch(problem, dev, dtype)
            free = tp.free.to(dtype)
            kappa = _energy_scale(tp, free)                                     # (m,)
            weight = self._reg_weight(tp, free, kappa)
            best = torch.as_tensor(start, dtype=dtype, device=dev) * free
            best_e = energy.energies(best, tp.step, tp.grad, tp.hessian)
            v = self._init_v(tp.frac)
            m1, m2 = torch.zeros_like(v), torch.zeros_like(v)
            sched = self._full_schedule(dtype, dev)
            t_idx = torch.zeros(1, dtype=torch.long, device=dev)
            b1, b2 = ADAM_BETAS

            def step():
                now = {k: a.index_select(0, t_idx) for k, a in sched.items()}   # (1,) each
                g = self._grad(v, tp, kappa, weight, now)
                m1.mul_(b1).add_(g, alpha=1 - b1)
                m2.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (m2.sqrt() / now["bc2_sqrt"]).add_(ADAM_EPS)
                v.sub_(m1 * now["step_size"] / denom)
                t_idx.add_(1)

            def chunk(k):  # k steps, then keep the rounded V where it beats the best so far
                for _ in range(k):
                    step()
                b = self._hard(v) * free
                e = energy.energies(b, tp.step, tp.grad, tp.hessian)
                win = e < best_e   # torch.where, not a boolean index: no host sync
                best.copy_(torch.where(win[:, None], b, best))
                best_e.copy_(torch.where(win, e, best_e))

            full, rest = divmod(self.iterations, self.eval_every)
            if self.graph and dev.type == "cuda" and full >= 3:
                _replay_as_graph(chunk, self.eval_every, full, dev)
            else:
                for _ in range(full):
                    chunk(self.eval_every)
            if rest:
                chunk(rest)
        return _torch.to_numpy_choices(best), {"iterations": self.iterations}


def _replay_as_graph(chunk, k: int, times: int, dev) -> None:
    """Run ``chunk(k)`` ``times`` times: once eagerly on a side stream (the warm-up CUDA graph
    capture needs, and a real chunk), then captured once and replayed ``times - 1`` times."""
    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        chunk(k)
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chunk(k)          # recorded, not run
    for _ in range(times - 1):
        graph.replay()


def _energy_scale(tp: _torch.TorchProblem, free: torch.Tensor) -> torch.Tensor:
    """kappa_c = mean over free i of s_i^2 H_ii (1 for channels without a free weight): (m,)."""
    curv = tp.step ** 2 * tp.hessian_diag                                   # (m, n)
    count = free.sum(1)
    kappa = curv.sum(1) / count.clamp(min=1)
    return torch.where(kappa > 0, kappa, torch.ones_like(kappa))


class Relaxation(_GradientRounding):
    """AdaRound's relaxation: rectified sigmoid, annealed |2h-1|^beta regulariser, Adam.

    iterations: Adam steps; lr: Adam step size on V; reg: lambda (per normalised energy, see the
    module docstring); beta: (start, end) of the linear annealing; warmup: fraction of the steps
    without the regulariser; eval_every: steps between exact evaluations of the rounded V.
    reg_weighting: "curvature" (each variable's regulariser weighted by its curvature, the
    default) or "uniform" (AdaRound's); see the module docstring.
    device: "cpu" or "cuda"; dtype: None (float64 on CPU, float32 on CUDA), float32 or float64;
    graph: on CUDA, replay the steps as a CUDA graph (same arithmetic, no launch overhead).
    """

    name = "hopfield"

    def __init__(self, iterations: int = 2000, lr: float = 0.02, reg: float = 0.3,
                 beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2,
                 reg_weighting: str = "curvature", eval_every: int = 25, device="cpu",
                 dtype=None, graph: bool = True):
        super().__init__(iterations, lr, eval_every, device, dtype, graph)
        if reg_weighting not in ("curvature", "uniform"):
            raise QroundError("reg_weighting must be 'curvature' or 'uniform', "
                              f"got {reg_weighting!r}")
        self.reg_weighting = reg_weighting
        # bounded like lr: float32 state turns to NaN (kept start, silently) beyond these
        check_real(reg, "reg (lambda)", 0, 1e6)
        beta = check_positive_pair(beta, "beta")
        if max(beta) > 1e8:
            raise QroundError(f"beta must lie in [1, 1e8], got {tuple(beta)!r}")
        if not beta[0] >= beta[1] >= 1:   # |x|^(beta - 1) is unbounded near x = 0 for beta < 1
            raise QroundError(f"beta anneals from start down to end, both >= 1: need "
                              f"start >= end >= 1, got {tuple(beta)!r}")
        check_real(warmup, "warmup", 0, 1, hi_open=True)
        self.reg = float(reg)
        self.beta = (float(beta[0]), float(beta[1]))
        self.warmup = float(warmup)

    def _reg_weight(self, tp, free, kappa):
        if self.reg_weighting == "uniform":
            return free
        return tp.step ** 2 * tp.hessian_diag / kappa[:, None]

    def _init_v(self, frac):
        return inverse_rectified_sigmoid(frac).clone()

    def _schedule(self):
        t = np.arange(self.iterations)
        on = np.array([self.beta_at(i) is not None for i in t])
        beta = np.array([self.beta_at(i) or self.beta[0] for i in t], dtype=np.float64)
        return {"reg": np.where(on, self.reg, 0.0), "beta": beta}

    def _soft(self, v, sched):
        sig = torch.sigmoid(v)
        u = sig * (ZETA - GAMMA) + GAMMA
        inside = ((u >= 0) & (u <= 1)).to(v.dtype)   # clamp's gradient passes inside [0, 1]
        return u.clamp(0.0, 1.0), sig * (1 - sig) * (ZETA - GAMMA) * inside

    def _reg(self, h, weight, sched):
        return (sched["reg"] * (1 - (2 * h - 1).abs() ** sched["beta"]) * weight).sum()

    def _reg_grad(self, h, weight, sched):
        x = 2 * h - 1   # d/dh lambda d (1 - |x|^beta) = -2 lambda d beta |x|^(beta-1) sign(x)
        mag = x.abs().clamp_min(1e-30) ** (sched["beta"] - 1)
        return -2 * sched["reg"] * sched["beta"] * mag * torch.sign(x) * weight

    def _hard(self, v):
        return (rectified_sigmoid(v) >= 0.5).to(v.dtype)

    def beta_at(self, t: int) -> float | None:
        """The regulariser's exponent at step t; None during the warm-up."""
        start = math.ceil(self.warmup * self.iterations)
        if t < start:
            return None
        rel = (t - start) / max(1, self.iterations - start)
        return self.beta[1] + (self.beta[0] - self.beta[1]) * max(0.0, 1.0 - rel)


class HopfieldClassic(_GradientRounding):
    """Classical Hopfield relaxation: b = sigmoid(V / T), T annealed geometrically, no regulariser.

    temperature: (start, end) of the geometric schedule; other arguments as :class:`Relaxation`.
    """

    name = "hopfield-classic"

    def __init__(self, iterations: int = 1000, lr: float = 0.05,
                 temperature: tuple[float, float] = (1.0, 0.02), eval_every: int = 25,
                 device="cpu", dtype=None, graph: bool = True):
        super().__init__(iterations, lr, eval_every, device, dtype, graph)
        self.temperature = check_positive_pair(temperature, "temperature")
        if not all(1e-8 <= t <= 1e8 for t in self.temperature):
            raise QroundError(f"temperature must lie in [1e-8, 1e8] (V / T of a logit V), got "
                              f"{tuple(temperature)!r}")
        if self.temperature[0] < self.temperature[1]:
            raise QroundError(f"temperature anneals from start down to end: need start >= end, "
                              f"got {tuple(temperature)!r}")

    def temperature_at(self, t: int) -> float:
        t0, t1 = self.temperature
        return t0 * (t1 / t0) ** (t / max(1, self.iterations - 1))

    def _init_v(self, frac):
        p = frac.clamp(1e-6, 1 - 1e-6)
        return self.temperature[0] * (torch.log(p) - torch.log1p(-p))

    def _schedule(self):
        t = np.arange(self.iterations)
        return {"inv_t": np.array([1.0 / self.temperature_at(i) for i in t])}

    def _soft(self, v, sched):
        h = torch.sigmoid(v * sched["inv_t"])
        return h, h * (1 - h) * sched["inv_t"]

    def _hard(self, v):
        return (v >= 0).to(v.dtype)
