"""Cross-entropy method (Rubinstein 1999) as AdaRound used it for its QUBO experiments.

Per channel an independent Bernoulli distribution ``p`` (m, n) over the choices, started at the
stochastic-rounding probabilities ``p = frac`` (AdaRound appendix A, "smart initialisation": it
is why CEM beat qbsolv there).  Every iteration draws ``K`` samples per channel, scores them all
with one batched energy evaluation ``(K*m, n) @ (n, n)``, takes per channel the elite fraction
with the lowest energy, and moves ``p <- alpha * mean(elite) + (1 - alpha) * p``.  The best
solution seen so far (initially the start) joins every iteration's pool, so the distribution never
forgets it and the result is never worse than the start.  A channel stops when its ``p`` has
stopped moving; the run stops after ``iterations`` or when every channel has stopped.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import QroundError, check_int, check_real
from ..problems import energy
from ..problems.rounding import RoundingProblem
from . import _torch
from .base import Solver


MAX_CHANNEL_BYTES = 8 * 2 ** 30   # one channel's peak: about 4 copies of its batch of samples


class CrossEntropy(Solver):
    """Cross-entropy method on the per-channel QUBOs, batched over channels (torch, any device).

    samples: K candidates per channel and iteration; elite: fraction of the pool (K samples + the
    best so far) averaged into the update; alpha: smoothing of the update; p_min: probabilities
    are clamped to [p_min, 1 - p_min] so no variable freezes for good; tol: a channel has
    converged when no probability moved more than tol in an iteration.
    device: "cpu" or "cuda"; dtype: None (float64 on CPU, float32 on CUDA), float32 or float64.
    max_elements: memory budget, in numbers, of one batch of samples, ``(K + 1) x chunk x n``
    (a per-channel H is applied by one batched product, not copied per sample); channels are
    processed in chunks that fit.  None:
    2**24 on the CPU, 2**27 on CUDA (0.5 GB of float32 samples, about 3x that at the peak).
    The channels of a chunk share one stream of random draws, so another ``max_elements`` (or
    device, whose default differs) gives other samples, and other codes of about the same cost,
    for the same seed; with the same settings a seed gives the same codes.
    """

    name = "cem"

    def __init__(self, samples: int = 128, iterations: int = 100, elite: float = 0.1,
                 alpha: float = 0.5, p_min: float = 1e-3, tol: float = 1e-3,
                 device="cpu", dtype=None, max_elements: int | None = None):
        check_int(samples, "samples", 2, maximum=10 ** 6)
        check_int(iterations, "iterations", 1, maximum=_torch.MAX_STEPS)
        check_real(elite, "elite", 0, 1, lo_open=True)
        check_real(alpha, "alpha", 0, 1, lo_open=True)
        # p_min > 0: the clamp is what keeps a variable from freezing for good
        check_real(p_min, "p_min", 0, 0.5, lo_open=True, hi_open=True)
        # a probability moves by less than 1 per iteration: tol >= 0.5 stops at once
        check_real(tol, "tol", 0, 0.5, hi_open=True)
        check_int(max_elements, "max_elements", 1, allow_none=True)
        self.samples = int(samples)
        self.iterations = int(iterations)
        self.elite = float(elite)
        self.alpha = float(alpha)
        self.p_min = float(p_min)
        self.tol = float(tol)
        self.device, self.dtype = _torch.check_device_dtype(device, dtype)
        self.max_elements = None if max_elements is None else int(max_elements)

    def _solve(self, problem: RoundingProblem, start: np.ndarray, rng: np.random.Generator):
        dev = _torch.resolve_device(self.device)
        dtype = _torch.resolve_dtype(self.dtype, dev)
        tp = _torch.to_torch(problem, dev, dtype)
        gen = _torch.torch_generator(rng, dev)
        best = torch.as_tensor(start, dtype=dtype, device=dev)
        iters = np.zeros(problem.num_channels, dtype=np.int64)
        n = problem.num_inputs
        # (samples + 1) x n per channel: the samples, their fields H y (a per-channel H is
        # applied by one batched product, not copied per sample) and temporaries, about 4x
        per_channel = (self.samples + 1) * n
        budget = self.max_elements or (2 ** 27 if dev.type == "cuda" else 2 ** 24)
        # a channel above the budget still runs alone (a chunk of one), up to a hard ceiling
        peak = 4 * per_channel * torch.finfo(dtype).bits // 8
        if peak > MAX_CHANNEL_BYTES:
            raise QroundError(
                f"cem: one channel's {self.samples} samples of n = {n} inputs need about "
                f"{peak / 2 ** 30:.1f} GiB at their peak (4 x (samples + 1) x n numbers), "
                f"above {MAX_CHANNEL_BYTES / 2 ** 30:.0f} GiB: lower samples")
        for sl in _torch.channel_chunks(problem.num_channels, per_channel, budget):
            try:
                best[sl], iters[sl] = self._run(tp.channels(sl), best[sl], gen)
            except (RuntimeError, MemoryError) as exc:   # torch.OutOfMemoryError included
                if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower() \
                        and "out of memory" not in str(exc).lower():
                    raise
                raise QroundError(f"cem ran out of memory on {dev.type} with {self.samples} "
                                  f"samples of n = {n} inputs per channel: lower samples or "
                                  f"max_elements ({exc.__class__.__name__})") from exc
        return _torch.to_numpy_choices(best), {"iterations": int(iters.max(initial=0)),
                                              "mean_iterations": float(iters.mean())}

    def _run(self, tp: _torch.TorchProblem, best: torch.Tensor, gen: torch.Generator):
        """CEM on one chunk of channels: best (m, n) start -> (best (m, n), iterations (m,))."""
        m, n = best.shape
        k = self.samples
        n_elite = max(1, math.ceil(self.elite * (k + 1)))
        lo, hi = self.p_min, 1.0 - self.p_min
        free = tp.free.to(best.dtype)
        p = tp.frac.clamp(lo, hi) * free
        best = best * free
        best_e = energy.energies(best, tp.step, tp.grad, tp.hessian)
        iters = torch.zeros(m, dtype=torch.long, device=best.device)
        active = torch.arange(m, device=best.device)
        for _ in range(self.iterations):
            sub = tp.channels(active) if active.numel() < m else tp
            pa = p[active]
            cand = (torch.rand((k, active.numel(), n), generator=gen, device=best.device,
                               dtype=best.dtype) < pa).to(best.dtype) * free[active]
            # the best so far joins the pool: at the first iteration that is the start
            cand = torch.cat([best[active][None], cand], dim=0)            # (k+1, a, n)
            e = energy.energies(cand, sub.step, sub.grad, sub.hessian)     # (k+1, a)
            order = torch.topk(e, n_elite, dim=0, largest=False).indices  # (n_elite, a)
            elite = torch.gather(cand, 0, order[:, :, None].expand(-1, -1, n))
            e_top = e.gather(0, order[:1])[0]
            win = e_top < best_e[active]
            best[active] = torch.where(win[:, None], elite[0], best[active])
            best_e[active] = torch.where(win, e_top, best_e[active])
            new_p = (self.alpha * elite.mean(0) + (1 - self.alpha) * pa).clamp(lo, hi)
            new_p = new_p * free[active]
            moved = (new_p - pa).abs().amax(dim=1)
            p[active] = new_p
            iters[active] += 1
            active = active[moved > self.tol]
            if active.numel() == 0:
                break
        return best, iters.cpu().numpy()
