"""Tabu search: best single flip per iteration with a short-term memory, all channels in parallel.

Each iteration flips, in every channel, the free variable whose flip lowers the energy most
(or raises it least) among those not flipped in the last ``tenure`` iterations; a tabu flip is
still taken when it gives a new best energy (aspiration).  Deltas come from incremental local
fields (:mod:`qround.solvers._kernels`, the compiled loop of :mod:`qround.problems.energy`), so
an iteration costs O(n).

Iterated tabu search: round 0 starts from the given start; each of the ``restarts`` further
rounds starts from the best state so far (or, every ``reset_every``-th round, from the start
again) with ``perturb`` random flips.  Before its tabu iterations a round descends by
first-improvement sweeps in random order (``descent``): steepest descent from rounding-to-nearest
tends to take the one large flip of a weight on an outlier input first and stay in that basin,
while a first-improvement descent reaches other, often lower, basins.  The best state seen is
returned.
"""
from __future__ import annotations

import numpy as np

from ..errors import QroundError, check_bool, check_int, check_real
from ..problems.rounding import RoundingProblem
from . import _kernels
from .base import Solver

TENURE_CAP = 10
MAX_COUNT = 10 ** 12          # rounds, iterations and the like: far above any useful value
MAX_ITERS_PER_VAR = 1e6
MAX_TIME_LIMIT = 7 * 86400.0  # seconds


def _round_off(problem: RoundingProblem) -> np.ndarray:
    """Per channel, the smallest energy gain a descent takes (m,), so round-off never cycles."""
    diag = problem.hessian_diag
    curv = problem.step ** 2 * (diag if diag.ndim == 2 else diag[None, :])
    return 1e-12 * np.maximum(curv.max(axis=1), np.finfo(float).tiny)


class Tabu(Solver):
    """Iterated tabu search with single flips, batched over channels (numba).

    max_iter: tabu iterations per round (None: ``iters_per_var`` x the largest number of free
    variables of a channel); restarts: rounds after the first; tenure: iterations a flipped
    variable stays tabu (None: ``min(10, nfree // 2)``; any tenure is capped at ``nfree - 1``
    per channel, so a move always exists); stall: end a round after this many iterations without a
    new best (None: never early); perturb: random flips at the start of a restart (None:
    ``max(2, nfree // 20)``); descent: first-improvement sweeps before the tabu iterations of each
    round; reset_every: every this many rounds restart from the start instead of the best (0:
    never); time_limit: seconds of search per channel, after which its search ends wherever it is
    (None: no limit).  With a time limit the result depends on the machine's speed, as
    dwave-samplers' ``timeout`` does; ``restarts=None`` then runs rounds until the time is up.  A
    channel's clock starts with its set-up and is read every 256 iterations, so it stops within a
    few hundred iterations of time_limit; the channels share the CPU's threads, so a layer takes
    about ``channels x time_limit / threads``.  ties: which of several allowed flips of equal
    lowest delta a tabu iteration takes: ``"first"`` (the lowest index; the layer solver's
    default, whose real-valued deltas rarely tie) or ``"random"`` (uniformly, drawn from the
    channel's seeded stream: on QUBOs with integer biases, where ties abound, always taking the
    lowest index walks the same few variables; QroundSampler's default).

    Work per channel is O(rounds x max_iter x n): the defaults (5 rounds of 10 n iterations)
    took about 10 ms of CPU per 384-input channel (MiniLM layer, numba, 2 cores).
    """

    name = "tabu"

    def __init__(self, max_iter: int | None = None, restarts: int | None = 4,
                 tenure: int | None = None, stall: int | None = None,
                 perturb: int | None = None, iters_per_var: float = 10.0,
                 descent: bool = True, reset_every: int = 2, time_limit: float | None = None,
                 ties: str = "first"):
        self.max_iter = check_int(max_iter, "max_iter", 1, allow_none=True, maximum=MAX_COUNT)
        self.restarts = check_int(restarts, "restarts", 0, allow_none=True, maximum=MAX_COUNT)
        self.tenure = check_int(tenure, "tenure", 0, allow_none=True, maximum=MAX_COUNT)
        self.stall = check_int(stall, "stall", 1, allow_none=True, maximum=MAX_COUNT)
        self.perturb = check_int(perturb, "perturb", 1, allow_none=True, maximum=MAX_COUNT)
        self.iters_per_var = check_real(iters_per_var, "iters_per_var", 0, MAX_ITERS_PER_VAR,
                                        lo_open=True)
        self.descent = check_bool(descent, "descent")
        self.reset_every = check_int(reset_every, "reset_every", 0, maximum=MAX_COUNT)
        self.time_limit = (None if time_limit is None else
                           check_real(time_limit, "time_limit", 0, MAX_TIME_LIMIT, lo_open=True))
        if self.time_limit is not None and not _kernels.HAS_CLOCK:
            raise QroundError("time_limit needs a POSIX monotonic clock (clock_gettime), which "
                              "this system lacks; bound the search with restarts instead")
        if ties not in ("first", "random"):
            raise QroundError(f"ties must be 'first' or 'random', got {ties!r}")
        self.ties = ties
        if self.restarts is None and self.time_limit is None:
            raise QroundError("restarts=None (rounds until the time is up) needs a time_limit")

    def _passes(self, max_iter: int, rounds: int, n: int) -> float:
        """O(n) passes the search makes per channel, for :func:`_kernels.compact_pays`: two per
        iteration; under a time limit no more than fit in it (about a nanosecond per element
        of a pass), since the gathering it would pay for runs on the channel's clock too."""
        passes = 2.0 * max_iter * rounds
        if self.time_limit is not None:
            passes = min(passes, self.time_limit / (1e-9 * max(n, 1)))
        return passes

    def _solve(self, problem, start, rng):
        args = _kernels.kernel_inputs(problem, start, rng)
        nfree = args["nfree"]
        # tenure 10 beat 20 (dwave's min(20, n/4)) on 384-input layers; nfree // 2 is better
        # than n/4 on small channels, where a short memory cycles between a few states.  Tenure
        # 20 was tried again in the thirteenth session: lower cost on held-out layers (MiniLM
        # layers 2-5, another digits CNN), higher on the benchmark's MiniLM layers; not adopted
        # (BENCHMARKS.md 1m)
        tenure = (np.minimum(TENURE_CAP, nfree // 2) if self.tenure is None
                  else np.full_like(nfree, self.tenure))
        tenure = np.minimum(tenure, np.maximum(nfree - 1, 0))
        perturb = (np.maximum(2, nfree // 20) if self.perturb is None
                   else np.full_like(nfree, self.perturb))
        max_iter = self.max_iter
        if max_iter is None:
            max_iter = max(1, int(round(self.iters_per_var * int(nfree.max(initial=0)))))
        stall = max_iter if self.stall is None else self.stall
        rounds = MAX_COUNT if self.restarts is None else self.restarts + 1
        limit = (_kernels.NO_TIME_LIMIT if self.time_limit is None
                 else max(1, int(self.time_limit * 1e9)))
        best, _ = _kernels.tabu_kernel(
            args["hess"], args["step"], args["grad"], args["start"], args["fields"],
            args["energy"], args["free_idx"], nfree, tenure.astype(np.int64), max_iter, stall,
            rounds, perturb.astype(np.int64), self.reset_every, self.descent,
            _round_off(problem), args["seeds"],
            _kernels.compact_pays(problem.num_inputs, nfree, self._passes(
                max_iter, rounds, problem.num_inputs)), limit, self.ties == "random")
        info = {"max_iter": max_iter, "rounds": None if self.restarts is None else rounds}
        if self.time_limit is not None:
            info["time_limit"] = self.time_limit
        return best.astype(bool), info
