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

from ..errors import QroundError, as_float_array, check_int, check_positive_pair, check_real
from ..problems.rounding import RoundingProblem
from . import _kernels
from .base import Solver

SCHEDULE_TYPES = ("geometric", "linear", "custom")
# sweeps per run: the kernels hold an inverse temperature per sweep and channel
MAX_SWEEPS = 10 ** 7
MAX_RESTARTS = 10 ** 6
MAX_SCHEDULE_BYTES = 2 ** 31


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
    ends = _beta_ends(problem, start, hot_accept, cold_accept, cold_quantile)
    frac = np.linspace(0.0, 1.0, num_sweeps) if num_sweeps > 1 else np.ones(1)
    return ends[:, :1] * (ends[:, 1:] / ends[:, :1]) ** frac[None, :]


def _beta_ends(problem, start, hot_accept, cold_accept, cold_quantile) -> np.ndarray:
    """(beta_min, beta_max) per channel, (m, 2), as :func:`beta_schedule` describes; (1, 1)
    where nothing can flip or no flip changes the energy (any temperature will do)."""
    deltas = np.abs(problem.flip_deltas(start))
    counted = problem.free & (deltas > 0)
    ends = np.ones((problem.num_channels, 2))
    some = counted.any(axis=1)
    if not some.any():
        return ends
    # all channels at once: the deltas that do not count are NaN, which nanmedian and
    # nanquantile skip (the same values as the median and quantile of each channel's own)
    d = np.where(counted[some], deltas[some], np.nan)
    b_min = -np.log(hot_accept) / np.nanmedian(d, axis=1)
    b_max = np.maximum(-np.log(cold_accept) / np.nanquantile(d, cold_quantile, axis=1), b_min)
    ends[some, 0], ends[some, 1] = b_min, b_max
    return ends


class Anneal(Solver):
    """Simulated annealing (geometric, linear or custom beta schedule), batched over channels
    (numba).

    num_sweeps: sweeps per run (each visits every free variable once); restarts: independent
    runs from the start, the best state of all is kept; order: ``"random"`` (a fresh
    permutation per sweep) or ``"sequential"`` (input order; a little faster);
    hot_accept / cold_accept / cold_quantile: the temperature range, see :func:`beta_schedule`;
    beta_range: (start, end) inverse temperatures, in inverse energy units, for every channel
    instead (None: from each channel's flip deltas at its start, as above).  The deltas of a
    good start such as RTN set a fitting range for rounding problems; for a general QUBO
    searched from arbitrary starts (:class:`qround.solvers.QroundSampler`) a fixed range from
    the problem's biases is the robust choice.

    The schedule, with dwave-samplers' names and meanings: ``beta_schedule_type`` is
    ``"geometric"`` (the default) or ``"linear"`` interpolation over the range, or ``"custom"``
    with ``beta_schedule`` the inverse temperatures themselves (absolute units, >= 0; giving
    ``beta_schedule`` alone implies ``"custom"``); ``num_sweeps_per_beta`` sweeps run at each
    inverse temperature, so ``num_sweeps`` must be a multiple of it (None: 1000, or with a
    custom schedule ``len(beta_schedule) x num_sweeps_per_beta``).  A single inverse
    temperature is the range's end, as in dwave-samplers.

    Work per channel is O(sweeps x n) plus O(n) per accepted flip: the default 1000 sweeps
    took about 12 ms of CPU per 384-input channel (MiniLM layer, numba, 2 cores).
    """

    name = "anneal"

    def __init__(self, num_sweeps: int | None = None, restarts: int = 1, order: str = "random",
                 hot_accept: float = 0.1, cold_accept: float = 1e-6,
                 cold_quantile: float = 0.05, beta_range: tuple[float, float] | None = None,
                 beta_schedule_type: str | None = None, num_sweeps_per_beta: int = 1,
                 beta_schedule=None):
        num_sweeps = check_int(num_sweeps, "num_sweeps", 1, allow_none=True, maximum=MAX_SWEEPS)
        self.num_sweeps_per_beta = check_int(num_sweeps_per_beta, "num_sweeps_per_beta", 1,
                                             maximum=MAX_SWEEPS)
        self.restarts = check_int(restarts, "restarts", 1, maximum=MAX_RESTARTS)
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
        if beta_schedule_type is None:
            beta_schedule_type = "geometric" if beta_schedule is None else "custom"
        if beta_schedule_type not in SCHEDULE_TYPES:
            raise QroundError(f"beta_schedule_type must be one of {list(SCHEDULE_TYPES)}, got "
                              f"{beta_schedule_type!r}")
        self.beta_schedule_type = beta_schedule_type
        per = self.num_sweeps_per_beta
        if beta_schedule_type == "custom":
            if beta_schedule is None:
                raise QroundError("beta_schedule_type='custom' needs beta_schedule, the inverse "
                                  "temperatures")
            if beta_range is not None:
                raise QroundError("give beta_range or a custom beta_schedule, not both")
            if np.asarray(beta_schedule).dtype == bool:
                raise QroundError("beta_schedule must hold numbers, got booleans")
            schedule = as_float_array(beta_schedule, "beta_schedule", ndim=1).copy()
            if schedule.size == 0:
                raise QroundError("beta_schedule is empty")
            if schedule.min() < 0:
                raise QroundError(f"beta_schedule must be >= 0, got {schedule.min()!r}")
            if num_sweeps is not None and num_sweeps != schedule.size * per:
                raise QroundError(
                    f"num_sweeps={num_sweeps} disagrees with beta_schedule: {schedule.size} "
                    f"inverse temperatures x num_sweeps_per_beta={per} is "
                    f"{schedule.size * per} sweeps (leave num_sweeps out)")
            check_int(schedule.size * per, "len(beta_schedule) x num_sweeps_per_beta", 1,
                      maximum=MAX_SWEEPS)
            schedule.flags.writeable = False
            self.beta_schedule = schedule
            self.num_sweeps = schedule.size * per
        else:
            if beta_schedule is not None:
                raise QroundError(f"beta_schedule is for beta_schedule_type='custom', not "
                                  f"{beta_schedule_type!r}")
            self.beta_schedule = None
            self.num_sweeps = 1000 if num_sweeps is None else num_sweeps
            if self.num_sweeps % per:
                raise QroundError(f"num_sweeps={self.num_sweeps} must be a multiple of "
                                  f"num_sweeps_per_beta={per}")

    def betas(self, problem, start) -> np.ndarray:
        """The inverse temperature of every channel and sweep, (m, num_sweeps)."""
        return self.steps(problem.num_channels, self._ends(problem, start))

    def _ends(self, problem, start) -> np.ndarray | None:
        """(m, 2) per-channel schedule ends from the start's flip deltas, or None when the
        schedule or its range is given."""
        if self.beta_schedule is None and self.beta_range is None:
            return _beta_ends(problem, start, self.hot_accept, self.cold_accept,
                              self.cold_quantile)
        return None

    def steps(self, channels: int, ends: np.ndarray | None = None) -> np.ndarray:
        """(channels, num_sweeps) inverse temperatures: the custom schedule, or the schedule
        type over ``ends`` (channels, 2) or else ``beta_range``; each held for
        ``num_sweeps_per_beta`` sweeps."""
        per = self.num_sweeps_per_beta
        count = self.num_sweeps // per
        if 8 * channels * self.num_sweeps > MAX_SCHEDULE_BYTES:
            raise QroundError(
                f"anneal: {channels} channels x num_sweeps={self.num_sweeps} inverse "
                f"temperatures take {8 * channels * self.num_sweeps / 2 ** 30:.1f} GiB (at most "
                f"{MAX_SCHEDULE_BYTES / 2 ** 30:.0f} GiB): fewer sweeps (a solve runs its channels "
                "in chunks that fit)")
        if self.beta_schedule is not None:
            steps = np.tile(self.beta_schedule, (channels, 1))
        else:
            if ends is None:
                if self.beta_range is None:
                    raise QroundError("Anneal.steps needs the range ends: beta_range is None")
                ends = np.tile(np.asarray(self.beta_range, dtype=np.float64), (channels, 1))
            lo, hi = ends[:, :1], ends[:, 1:]
            frac = np.linspace(0.0, 1.0, count)[None, :] if count > 1 else np.ones((1, 1))
            steps = (lo * (hi / lo) ** frac if self.beta_schedule_type == "geometric"
                     else lo + (hi - lo) * frac)
        return np.ascontiguousarray(steps if per == 1 else np.repeat(steps, per, axis=1))

    def _solve(self, problem, start, rng):
        args = _kernels.kernel_inputs(problem, start, rng)
        ends = self._ends(problem, start)
        m = problem.num_channels
        # the schedules of a chunk of channels at a time (each channel has its own seed, so
        # the chunks give the codes of one call): a wide layer with many sweeps fits the memory
        # its schedule may take
        chunk = max(1, MAX_SCHEDULE_BYTES // (8 * self.num_sweeps))
        best = np.empty(problem.weight.shape)
        for lo in range(0, m, chunk):
            sl = slice(lo, min(m, lo + chunk))
            part = {k: (v if k == "hess" and v.shape[0] == 1 else v[sl]) for k, v in args.items()}
            best[sl], _ = _kernels.anneal_kernel(
                part["hess"], part["step"], part["grad"], part["start"], part["fields"],
                part["energy"], part["free_idx"], part["nfree"],
                self.steps(sl.stop - sl.start, None if ends is None else ends[sl]),
                self.restarts, self.order == "random", part["seeds"],
                # an accepted flip is one O(n) pass; about 5 % of proposals are accepted
                _kernels.compact_pays(problem.num_inputs, args["nfree"], 0.05 * self.num_sweeps
                                      * self.restarts * args["nfree"].mean()),
                _kernels.NO_CSR)
        return best.astype(bool), {"sweeps": self.num_sweeps * self.restarts}
