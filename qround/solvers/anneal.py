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

from ..errors import QroundError, check_int, check_positive_pair, check_real
from ..problems.rounding import RoundingProblem
from . import _kernels
from .base import Solver


def beta_schedule(problem: RoundingProblem, start: np.ndarray, num_sweeps: int,
                  hot_accept: float = 0.1, cold_accept: float = 1e-6,
                  cold_quantile: float = 0.05) -> np.ndarray:
    """Geometric inverse temperatures per channel and sweep, (m, num_sweeps).

    The energy scale of a channel is the distribution of its single-flip ``|delta|`` at the
    start (free variables, nonzero deltas).  ``beta_min`` accepts the median ``|delta|`` with
    probability ``hot_accept`` and ``beta_max`` accepts the ``cold_quantile`` quantile (a small
    but typical move; the exact minimum is often a near-tie of no consequence) with probability
    ``cold_accept``, so the last sweeps are a zero-temperature descent.

    Why ``hot_accept = 0.1``, colder than the textbook 0.5: the start is usually
    rounding-to-nearest or better and a hot phase mostly destroys it.  Measured (1000 sweeps,
    cold_accept 1e-6): MiniLM layer 0 query, 4-bit, 64 channels, cost/RTN 0.2178 / 0.2160 /
    0.2146 / 0.2133 for hot_accept 0.3 / 0.1 / 1e-2 / 1e-3; but on 12-14 variable toy problems
    the colder starts miss the exact optimum more often (8 vs 71 of 720 channels for 0.1 vs
    1e-3), so 0.1 is the robust default.
    """
    deltas = np.abs(problem.flip_deltas(start))
    betas = np.ones((problem.num_channels, num_sweeps))
    frac = np.linspace(0.0, 1.0, num_sweeps) if num_sweeps > 1 else np.ones(1)
    for c in range(problem.num_channels):
        d = deltas[c][problem.free[c] & (deltas[c] > 0)]
        if d.size == 0:
            continue  # nothing to flip, or no flip changes the energy: any temperature will do
        b_min = -np.log(hot_accept) / np.median(d)
        b_max = max(-np.log(cold_accept) / np.quantile(d, cold_quantile), b_min)
        betas[c] = b_min * (b_max / b_min) ** frac
    return betas


class Anneal(Solver):
    """Simulated annealing with a geometric beta schedule, batched over channels (numba).

    num_sweeps: sweeps per run (each visits every free variable once); restarts: independent
    runs from the start, the best state of all is kept; order: ``"random"`` (a fresh
    permutation per sweep) or ``"sequential"`` (input order; a little faster);
    hot_accept / cold_accept / cold_quantile: the temperature range, see :func:`beta_schedule`;
    beta_range: (start, end) inverse temperatures, in inverse energy units, for every channel
    instead (None: from each channel's flip deltas at its start, as above).  The deltas of a
    good start such as RTN set a fitting range for rounding problems; for a general QUBO
    searched from arbitrary starts (:class:`qround.solvers.QroundSampler`) a fixed range from
    the problem's biases is the robust choice.

    Work per channel is O(sweeps x n) plus O(n) per accepted flip: the default 1000 sweeps
    took about 12 ms of CPU per 384-input channel (MiniLM layer, numba, 2 cores).
    """

    name = "anneal"

    def __init__(self, num_sweeps: int = 1000, restarts: int = 1, order: str = "random",
                 hot_accept: float = 0.1, cold_accept: float = 1e-6,
                 cold_quantile: float = 0.05, beta_range: tuple[float, float] | None = None):
        self.num_sweeps = check_int(num_sweeps, "num_sweeps", 1)
        self.restarts = check_int(restarts, "restarts", 1)
        if order not in ("random", "sequential"):
            raise QroundError(f"order must be 'random' or 'sequential', got {order!r}")
        hot_accept = check_real(hot_accept, "hot_accept", 0, 1, lo_open=True, hi_open=True)
        cold_accept = check_real(cold_accept, "cold_accept", 0, 1, lo_open=True, hi_open=True)
        cold_quantile = check_real(cold_quantile, "cold_quantile", 0, 1)
        if beta_range is not None:
            beta_range = check_positive_pair(beta_range, "beta_range")
            if beta_range[0] > beta_range[1]:
                raise QroundError(f"beta_range must grow: start <= end, got {beta_range!r}")
        self.beta_range = beta_range
        if not (0 < cold_accept <= hot_accept < 1):
            raise QroundError("need 0 < cold_accept <= hot_accept < 1, got "
                              f"cold_accept={cold_accept!r}, hot_accept={hot_accept!r}")
        if not 0 <= cold_quantile <= 1:
            raise QroundError(f"cold_quantile must lie in [0, 1], got {cold_quantile!r}")
        self.order = order
        self.hot_accept = float(hot_accept)
        self.cold_accept = float(cold_accept)
        self.cold_quantile = float(cold_quantile)

    def _solve(self, problem, start, rng):
        args = _kernels.kernel_inputs(problem, start, rng)
        if self.beta_range is None:
            betas = beta_schedule(problem, start, self.num_sweeps, self.hot_accept,
                                  self.cold_accept, self.cold_quantile)
        else:
            b0, b1 = self.beta_range
            frac = (np.linspace(0.0, 1.0, self.num_sweeps) if self.num_sweeps > 1
                    else np.ones(1))
            betas = np.tile(b0 * (b1 / b0) ** frac, (problem.num_channels, 1))
        best, _ = _kernels.anneal_kernel(
            args["hess"], args["step"], args["grad"], args["start"], args["fields"],
            args["energy"], args["free_idx"], args["nfree"], betas, self.restarts,
            self.order == "random", args["seeds"],
            # an accepted flip is one O(n) pass; about 5 % of proposals are accepted
            _kernels.compact_pays(problem.num_inputs, args["nfree"],
                                  0.05 * self.num_sweeps * self.restarts * args["nfree"].mean()),
            _kernels.NO_CSR)
        return best.astype(bool), {"sweeps": self.num_sweeps * self.restarts}
