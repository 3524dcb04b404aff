"""Local search: steepest-descent single flips, batched over all channels of a layer.

Every iteration computes the flip deltas of all channels at once from the local fields
``f = H (s*b)`` (one matrix of shape (m, n)), flips in each channel the variable with the most
negative delta, and updates the fields with one column of H per channel.  Channels that reached
a local minimum drop out of the active set.
"""
from __future__ import annotations

import numpy as np

from ..errors import check_int
from ..problems import energy
from ..problems.rounding import RoundingProblem
from .base import Solver


def steepest_descent(problem: RoundingProblem, start: np.ndarray, max_iter: int | None = None,
                     tol: float = 1e-12) -> tuple[np.ndarray, int]:
    """Flip the best single variable per channel until no flip lowers the energy.

    start: (m, n) bool. Returns (choices (m, n) bool, iterations). ``tol`` is relative to the
    channel's largest diagonal term, so round-off never makes a flip cycle.
    """
    b = start.astype(np.float64)
    step, grad, h = problem.step, problem.grad, problem.hessian
    diag = problem.hessian_diag
    fields = energy.local_fields(b, step, h)
    # a flip must gain more than this to be taken (guards against cycling on round-off)
    scale = np.max(np.abs(step * step * (diag if diag.ndim == 2 else diag[None, :])), axis=1)
    thresh = -tol * np.maximum(scale, np.finfo(float).tiny)
    active = np.arange(problem.num_channels)
    limit = max_iter if max_iter is not None else 10 * problem.num_inputs + 10
    it = 0
    while active.size and it < limit:
        it += 1
        hd = diag if diag.ndim == 1 else diag[active]
        deltas = energy.flip_deltas(b[active], step[active], grad[active], fields[active], hd)
        i = np.argmin(deltas, axis=1)
        gain = deltas[np.arange(active.size), i]
        move = gain < thresh[active]
        active, i = active[move], i[move]
        if not active.size:
            break
        d = step[active, i] * (1.0 - 2.0 * b[active, i])
        b[active, i] = 1.0 - b[active, i]
        col = h[i] if problem.shared_hessian else h[active, i]   # H symmetric: row i == column i
        fields[active] += col * d[:, None]
    return b.astype(bool), it


class Greedy(Solver):
    """Steepest-descent single flips from any start (RTN by default), all channels at once."""

    name = "greedy"

    def __init__(self, max_iter: int | None = None):
        self.max_iter = check_int(max_iter, "max_iter", 1, allow_none=True)

    def _solve(self, problem, start, rng):
        b, it = steepest_descent(problem, start, self.max_iter)
        return b, {"iterations": it}
