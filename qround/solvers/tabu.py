"""Tabu search: best single flip per iteration with a short-term memory, all channels in parallel.

Each iteration flips, in every channel, the free variable whose flip lowers the energy most
(or raises it least) among those not flipped in the last ``tenure`` iterations; a tabu flip is
still taken when it gives a new best energy (aspiration).  Deltas come from incremental local
fields (:mod:`qround.solvers._kernels`, the compiled loop of :mod:`qround.problems.energy`),
so an iteration costs O(n).  A round ends after ``max_iter`` iterations, or ``stall`` iterations
without a new best; each of the ``restarts`` further rounds starts from the best state with
``perturb`` random flips (an iterated tabu search).  The best state seen is returned.
"""
from __future__ import annotations

import numpy as np

from ..errors import QroundError
from . import _kernels
from .base import Solver


def _positive_or_none(value, name: str):
    if value is not None and (isinstance(value, bool) or int(value) < 1):
        raise QroundError(f"{name} must be a positive integer or None, got {value!r}")
    return None if value is None else int(value)


class Tabu(Solver):
    """Iterated tabu search with single flips, batched over channels (numba).

    max_iter: iterations per round (None: ``iters_per_var`` x the channel's free variables);
    restarts: extra rounds, each from the perturbed best state; tenure: iterations a flipped
    variable stays tabu (None: ``min(20, nfree // 4)``); stall: end a round after this many
    iterations without a new best (None: never early); perturb: random flips at a restart
    (None: ``max(2, nfree // 20)``).  Tenure is capped at ``nfree - 1`` so a move always exists.
    """

    name = "tabu"

    def __init__(self, max_iter: int | None = None, restarts: int = 4,
                 tenure: int | None = None, stall: int | None = None,
                 perturb: int | None = None, iters_per_var: float = 10.0):
        self.max_iter = _positive_or_none(max_iter, "max_iter")
        if isinstance(restarts, bool) or int(restarts) < 0:
            raise QroundError(f"restarts must be a non-negative integer, got {restarts!r}")
        self.restarts = int(restarts)
        if tenure is not None and (isinstance(tenure, bool) or int(tenure) < 0):
            raise QroundError(f"tenure must be a non-negative integer or None, got {tenure!r}")
        self.tenure = None if tenure is None else int(tenure)
        self.stall = _positive_or_none(stall, "stall")
        self.perturb = _positive_or_none(perturb, "perturb")
        if not iters_per_var > 0:
            raise QroundError(f"iters_per_var must be positive, got {iters_per_var!r}")
        self.iters_per_var = float(iters_per_var)

    def _solve(self, problem, start, rng):
        args = _kernels.kernel_inputs(problem, start, rng)
        nfree = args["nfree"]
        tenure = np.minimum(20, nfree // 4) if self.tenure is None else np.full_like(nfree, self.tenure)
        tenure = np.minimum(tenure, np.maximum(nfree - 1, 0))
        perturb = np.maximum(2, nfree // 20) if self.perturb is None else np.full_like(nfree, self.perturb)
        max_iter = self.max_iter
        if max_iter is None:
            max_iter = max(1, int(round(self.iters_per_var * int(nfree.max(initial=0)))))
        stall = max_iter if self.stall is None else self.stall
        best, _ = _kernels.tabu_kernel(
            args["hess"], args["step"], args["grad"], args["start"], args["fields"],
            args["energy"], args["free_idx"], nfree, tenure.astype(np.int64), max_iter, stall,
            self.restarts + 1, perturb.astype(np.int64), args["seeds"])
        return best.astype(bool), {"max_iter": max_iter, "rounds": self.restarts + 1}
