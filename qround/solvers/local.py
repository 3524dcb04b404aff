"""Local search: steepest-descent single flips over all channels of a layer.

From the local fields ``f = H (s*b)`` (one matrix product for all channels), each channel flips
the variable with the most negative delta and updates its fields with one row of H, until no
flip lowers its energy.  The loop is a compiled kernel, one channel per thread; the batched numpy
loop it replaced (one flip per channel per iteration over an (m, n) array) stays as the tests'
reference.
"""
from __future__ import annotations

import numpy as np

from ..errors import check_int
from ..problems import energy
from ..problems.rounding import RoundingProblem
from .base import Solver


def _descent_inputs(problem: RoundingProblem, start: np.ndarray, tol: float):
    b = np.array(start, dtype=np.float64)   # a copy: the descent flips it in place
    diag = problem.hessian_diag
    fields = energy.local_fields(b, problem.step, problem.hessian)
    # a flip must gain more than this to be taken (guards against cycling on round-off)
    diag2 = diag if diag.ndim == 2 else diag[None, :]
    scale = np.max(np.abs(problem.step * problem.step * diag2), axis=1)
    thresh = -tol * np.maximum(scale, np.finfo(float).tiny)
    return b, fields, thresh


def steepest_descent(problem: RoundingProblem, start: np.ndarray, max_iter: int | None = None,
                     tol: float = 1e-12) -> tuple[np.ndarray, int]:
    """Flip the best single variable per channel until no flip lowers the energy.

    start: (m, n) bool. Returns (choices (m, n) bool, iterations: the most passes any channel
    made).  ``tol`` is relative to the channel's largest diagonal term, so round-off never makes
    a flip cycle.  A compiled kernel (:func:`qround.solvers._kernels.descent_kernel`) runs each
    channel on its own; its flips are those of :func:`steepest_descent_numpy`.
    """
    from ._kernels import descent_kernel

    b, fields, thresh = _descent_inputs(problem, start, tol)
    hess = problem.hessian
    hess = hess[None] if hess.ndim == 2 else hess
    diag = problem.hessian_diag
    diag = diag[None] if diag.ndim == 1 else diag
    # read-only views of the inputs it does not write: one compiled signature, no copies
    ro = []
    for a in (hess, problem.step, problem.grad, diag, thresh):
        a = np.ascontiguousarray(a, dtype=np.float64).view()
        a.flags.writeable = False
        ro.append(a)
    hess, step, grad, diag, thresh = ro
    limit = max_iter if max_iter is not None else 10 * problem.num_inputs + 10
    passes = descent_kernel(hess, step, grad, b, fields, diag, thresh, limit)
    return b.astype(bool), int(passes.max()) if passes.size else 0


def steepest_descent_numpy(problem: RoundingProblem, start: np.ndarray,
                           max_iter: int | None = None,
                           tol: float = 1e-12) -> tuple[np.ndarray, int]:
    """The same descent batched over channels in numpy, one flip per active channel per
    iteration (the reference the tests compare the kernel with; O(m n) per iteration)."""
    b, fields, thresh = _descent_inputs(problem, start, tol)
    step, grad, h = problem.step, problem.grad, problem.hessian
    diag = problem.hessian_diag
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
    """Steepest-descent single flips from any start (RTN by default), all channels at once.

    max_iter: flips per channel at most (None: 10 n + 10, more than a descent needs in
    practice); ``info["iterations"]`` is the most passes any channel made, the last one
    finding no improving flip (flips + 1 for a channel that reached a local minimum)."""

    name = "greedy"

    def __init__(self, max_iter: int | None = None):
        self.max_iter = check_int(max_iter, "max_iter", 1, allow_none=True)

    def _solve(self, problem, start, rng):
        b, it = steepest_descent(problem, start, self.max_iter)
        return b, {"iterations": it}
