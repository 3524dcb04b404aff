"""Simulated annealing: Metropolis single flips over every channel of a layer in parallel.

Each sweep visits the free variables of a channel (in a fresh random order, or in input order)
and flips ``b_i`` with probability ``min(1, exp(-beta * delta_i))``, with ``delta_i`` from the
incremental local fields (:mod:`qround.solvers._kernels`, the compiled loop of
:mod:`qround.problems.energy`).  The inverse temperature grows geometrically over the sweeps,
from ``beta_min`` to ``beta_max`` fixed per channel by the channel's own energy scale, measured
as the single-flip deltas at the start (see :func:`beta_schedule`).  Every restart is an
independent run from the start; the best state seen in any run is returned (not the last).
"""
from __future__ import annotations

import numpy as np

from ..errors import QroundError
from ..problems.rounding import RoundingProblem
from . import _kernels
from .base import Solver


def beta_schedule(problem: RoundingProblem, start: np.ndarray, num_sweeps: int,
                  hot_accept: float = 0.5, cold_accept: float = 1e-3,
                  cold_quantile: float = 0.05) -> np.ndarray:
    """Geometric inverse temperatures per channel and sweep, (m, num_sweeps).

    From the start's flip deltas ``|delta|`` over the free variables of a channel:
    ``beta_min`` accepts the median ``|delta|`` with probability ``hot_accept`` and ``beta_max``
    accepts the ``cold_quantile`` quantile of the nonzero ``|delta|`` (a small but typical
    move; the exact minimum is often a near-tie of no consequence) with probability
    ``cold_accept``, so the last sweeps are a zero-temperature descent.
    """
    deltas = np.abs(problem.flip_deltas(start))
    m = problem.num_channels
    betas = np.ones((m, num_sweeps))
    frac = np.linspace(0.0, 1.0, num_sweeps) if num_sweeps > 1 else np.ones(1)
    for c in range(m):
        d = deltas[c][problem.free[c] & (deltas[c] > 0)]
        if d.size == 0:
            continue  # nothing to flip, or every flip costs nothing: any temperature will do
        b_min = -np.log(hot_accept) / np.median(d)
        b_max = max(-np.log(cold_accept) / np.quantile(d, cold_quantile), b_min)
        betas[c] = b_min * (b_max / b_min) ** frac
    return betas


class Anneal(Solver):
    """Simulated annealing with a geometric beta schedule, batched over channels (numba).

    num_sweeps: sweeps per run (each visits every free variable once); restarts: independent
    runs from the start, the best is kept; order: ``"random"`` (a fresh permutation per sweep)
    or ``"sequential"``; hot_accept / cold_accept / cold_quantile: the temperature range, see
    :func:`beta_schedule`.
    """

    name = "anneal"

    def __init__(self, num_sweeps: int = 100, restarts: int = 1, order: str = "random",
                 hot_accept: float = 0.5, cold_accept: float = 1e-3,
                 cold_quantile: float = 0.05):
        if int(num_sweeps) < 1 or int(restarts) < 1:
            raise QroundError(f"num_sweeps and restarts must be >= 1, got {num_sweeps}, {restarts}")
        if order not in ("random", "sequential"):
            raise QroundError(f"order must be 'random' or 'sequential', got {order!r}")
        if not (0 < cold_accept < hot_accept < 1):
            raise QroundError("need 0 < cold_accept < hot_accept < 1, got "
                              f"cold_accept={cold_accept}, hot_accept={hot_accept}")
        if not 0 <= cold_quantile <= 1:
            raise QroundError(f"cold_quantile must lie in [0, 1], got {cold_quantile}")
        self.num_sweeps = int(num_sweeps)
        self.restarts = int(restarts)
        self.order = order
        self.hot_accept = hot_accept
        self.cold_accept = cold_accept
        self.cold_quantile = cold_quantile

    def _solve(self, problem, start, rng):
        args = _kernels.kernel_inputs(problem, start, rng)
        betas = beta_schedule(problem, start, self.num_sweeps, self.hot_accept,
                              self.cold_accept, self.cold_quantile)
        best, _ = _kernels.anneal_kernel(
            args["hess"], args["step"], args["grad"], args["start"], args["fields"],
            args["energy"], args["free_idx"], args["nfree"], betas, self.restarts,
            self.order == "random", args["seeds"])
        return best.astype(bool), {"sweeps": self.num_sweeps * self.restarts}
