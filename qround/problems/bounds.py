"""Certified lower bounds on a rounding problem's optimum: how far from optimal a solution can be.

For one channel, with ``y = s*b`` the step taken (notation of :mod:`qround.problems.energy`),
the energy is ``E(y) = y^T H y + g^T y`` over ``b in {0,1}^n``.  On binary ``b``,
``b_i^2 = b_i``, so for any ``mu``

    E(y) = y^T (H - mu I) y + (g + mu s)^T y        (the term added, mu (s_i y_i - y_i^2), is 0)

and with ``mu <= lambda_min(H)`` the right-hand side is convex.  Its minimum over the box
``0 <= y_i <= s_i`` (``b in [0,1]^n``) is then a lower bound of the binary optimum.  ``mu = 0`` is
the plain convex relaxation of DESIGN section 2; on a local-MSE problem it is zero wherever no
weight clips (the box holds the float weights), so the bound comes from clipped weights alone.
``mu = lambda_min(H)`` (``shift="eigen"``, the default) adds ``mu s_i^2 b_i (1 - b_i) >= 0``
inside the box, penalising fractional choices, and is never weaker (the smallest-eigenvalue
bound of Hammer and Rubin; the optimal diagonal shift is the SDP bound, not computed here).

The box minimum is approached by accelerated projected gradient (FISTA with adaptive
restart, in the diagonal metric of ``H - mu I``), batched over channels as matrix products.
The bound reported is not the iterate's value (an upper bound of the relaxation's minimum) but
the convexity certificate

    min_box F >= F(y) + min_{z in box} grad F(y)^T (z - y)
              =  F(y) - grad F(y)^T y + sum_i s_i min(0, grad F(y)_i),

valid at every iterate (the best one over the run is kept), so a bound stopped early is weaker,
never wrong.  For the same reason the iterations may run in float32 (the default, about twice
as fast: one matrix product per iteration is all the cost) while every certificate is computed
in float64 at the iterate.  ``mu`` is taken a little below the computed smallest eigenvalue, by
more than its floating-point error, so the relaxation is convex also for an H that is PSD only
within rounding; an indefinite H (built with ``check=False``) gets a negative ``mu``, which still
makes it convex.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import QroundError
from . import energy as _energy

SHIFTS = ("eigen", "none")
_STALL_CHECKS = 4   # float32 checks in a row without progress before going on in float64
PRECISIONS = ("float32", "float64")   # of the iterations; certificates are always float64


@dataclass(frozen=True)
class LowerBound:
    """A certified lower bound on every channel's optimal absolute cost.

    cost (m,): no rounding of channel ``c`` on this grid (floor or ceil per weight) costs less
    than ``cost[c]``; relaxed_cost (m,): the relaxation's value at its last iterate (the bound
    is within ``relaxed_cost - cost`` of the relaxation's minimum); shift (m,): the ``mu`` used;
    rtn_cost (m,); iterations; seconds; converged: the certificate met ``rtol``.
    """

    cost: np.ndarray
    relaxed_cost: np.ndarray
    rtn_cost: np.ndarray
    shift: np.ndarray
    method: str
    iterations: int
    seconds: float
    converged: bool
    cost_noise: float = 0.0   # round-off of the summed costs, as Solution.cost_noise

    @property
    def total_cost(self) -> float:
        return float(np.sum(self.cost))

    @property
    def ratio(self) -> float:
        """Summed bound over summed RTN cost: no solution's ``Solution.ratio`` is below it (NaN
        for relative costs, where RTN's is negative, as ``Solution.ratio``)."""
        from ..solvers.base import cost_ratio

        return cost_ratio(self.total_cost, float(np.sum(self.rtn_cost)), self.cost_noise)

    def certified_gap(self, solution_cost) -> float:
        """``(cost - bound) / (rtn - bound)`` of a solution's summed cost (or its per-channel
        costs): the share of RTN's excess over the bound that the solution may still leave.
        0 proves the solution optimal; a weak bound leaves it large even for an optimal one.
        Where the bound reaches RTN's cost (RTN proven optimal), inf for a costlier solution."""
        cost = float(np.sum(solution_cost))
        excess = cost - self.total_cost
        span = float(np.sum(self.rtn_cost)) - self.total_cost
        if span <= self.cost_noise:   # RTN is proven optimal: only a solution as cheap is
            return 0.0 if excess <= self.cost_noise else float("inf")
        return max(excess, 0.0) / span

    def __repr__(self) -> str:
        state = "converged" if self.converged else "not converged (still valid, weaker)"
        return (f"LowerBound({self.method}: {len(self.cost)} channels, bound/RTN "
                f"{self.ratio:.4f}, {self.iterations} iterations, {state})")


def _jacobi_steps(h, mu, m: int) -> np.ndarray:
    """Step sizes (m, n) of projected gradient in the diagonal metric ``P = diag(A)``,
    ``A = H - mu I`` (per channel): ``1 / (L P_ii)`` with ``L = 2 lambda_max(P^-1/2 A P^-1/2)``,
    the gradient's Lipschitz constant in that metric.  Real layers' H have diagonals spread over
    orders of magnitude (outlier inputs); the metric took 1.1-1.7x fewer iterations than one
    step for all on MiniLM and digits-CNN layers.  A diagonal entry near 0 (a dead input) is
    raised to 1e-12 of the largest: any positive metric is a valid one, with its own L."""
    n = h.shape[-1]
    a = h - np.multiply.outer(mu if h.ndim == 3 else mu[:1], np.eye(n)).reshape(
        h.shape if h.ndim == 3 else (n, n))
    d = np.diagonal(a, axis1=-2, axis2=-1)
    d = np.maximum(d, 1e-12 * np.max(np.abs(d), axis=-1, keepdims=True) + 1e-300)
    r = 1.0 / np.sqrt(d)
    scaled = r[..., :, None] * a * r[..., None, :]
    lip = 2.0 * np.maximum(np.linalg.eigvalsh(scaled)[..., -1], 1e-300)
    # an all-zero A (H = 0: a linear objective) would get infinite steps; 1e300 takes any
    # iterate to its vertex of the box just as well, and 0 * step stays 0
    with np.errstate(under="ignore"):
        return np.broadcast_to(1.0 / np.maximum(lip[..., None] * d, 1e-300), (m, n))


class _Iteration:
    """Accelerated projected gradient (FISTA with adaptive restart) on the box relaxation, in
    ``precision``.  It runs on a rescaled problem, ``y = beta u`` with ``beta`` the largest step
    and the objective divided by ``beta^2 max|A|`` (``A = H - mu I``), so that box, matrix and
    linear term are of order 1 and float32 neither overflows nor underflows on real magnitudes;
    the minimiser is the same.  ``current()`` gives the projected iterate as ``y`` in float64
    (None if float32 arithmetic overflowed), where the caller certifies it."""

    def __init__(self, h, mu, lin, s, step, precision: str, count: int = 0):
        beta = float(np.max(s)) if s.size and np.max(s) > 0 else 1.0
        amax = max(float(np.max(np.abs(h))) if h.size else 0.0, float(np.max(np.abs(mu))))
        amax = amax if amax > 0 else 1.0
        with np.errstate(all="ignore"):   # extreme magnitudes: checked below
            scaled = (h / amax, mu[:, None] / amax, lin / beta / amax, s / beta, step * amax)
        # float32 where it holds the rescaled problem, else float64
        for dtype in (np.float32, np.float64) if precision == "float32" else (np.float64,):
            with np.errstate(over="ignore", under="ignore"):
                arrays = tuple(a.astype(dtype) for a in scaled)
            if all(np.isfinite(a).all() for a in arrays):
                break
        self.h, self.mu, self.lin, self.box, self.step_size = arrays
        self.beta, self.dtype, self.count, self.s = beta, dtype, count, s

    def start(self, y) -> None:
        self.x = np.clip((y / self.beta).astype(self.dtype), 0.0, self.box)
        self.z, self.t = self.x.copy(), np.ones(len(self.x))

    def current(self):
        if not np.isfinite(self.x).all():
            return None
        return np.clip(self.x.astype(np.float64) * self.beta, 0.0, self.s)

    def step(self) -> None:
        z, x = self.z, self.x
        with np.errstate(over="ignore", invalid="ignore"):   # caught by current()
            grad = 2.0 * (_energy.hessian_times(z, self.h) - self.mu * z) + self.lin
            x_new = np.clip(z - grad * self.step_size, 0.0, self.box)
            # adaptive restart (O'Donoghue and Candes): drop a channel's momentum where it
            # points uphill
            uphill = np.sum(grad * (x_new - x), axis=1) > 0
            t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * self.t * self.t))
            momentum = np.where(uphill, 0.0, (self.t - 1.0) / t_new).astype(self.dtype)
            self.z = x_new + momentum[:, None] * (x_new - x)
        self.x, self.t = x_new, np.where(uphill, 1.0, t_new)
        self.count += 1


def lower_bound(problem, *, shift: str = "eigen", max_iter: int = 3000, rtol: float = 1e-3,
                check_every: int = 25, precision: str = "float32") -> LowerBound:
    """A certified lower bound on each channel's optimal cost of ``problem``
    (a :class:`~qround.problems.RoundingProblem`); see the module's docstring for the math.

    shift: ``"eigen"`` (``mu = lambda_min(H)``, never weaker) or ``"none"`` (the plain box
    relaxation).  max_iter: projected-gradient iterations at most; rtol: stop once the summed
    certificate gap is within ``rtol`` of the span between RTN's cost and the bound.
    precision: of the iterations, ``"float32"`` (default; about twice as fast on large layers)
    or ``"float64"``; the certificate is computed in float64 either way, so the precision
    changes how close the bound gets, never its validity (float32 arithmetic that overflows
    goes on in float64).
    Costs O(max_iter * m * n^2) (one matrix product per iteration) and two eigendecompositions
    of H (two per channel for a per-channel H).
    """
    if shift not in SHIFTS:
        raise QroundError(f"shift must be one of {SHIFTS}, got {shift!r}")
    if precision not in PRECISIONS:
        raise QroundError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for name, val in (("max_iter", max_iter), ("check_every", check_every)):
        if isinstance(val, (bool, np.bool_)) or not isinstance(val, (int, np.integer)) or val < 1:
            raise QroundError(f"{name} must be an integer >= 1, got {val!r}")
    if isinstance(rtol, (bool, np.bool_)) or not isinstance(
            rtol, (int, float, np.integer, np.floating)) or not (np.isfinite(rtol) and rtol >= 0):
        raise QroundError(f"rtol must be a finite number >= 0, got {rtol!r}")
    t0 = time.perf_counter()
    h = problem.hessian
    s, g = problem.step, problem.grad                 # (m, n); s = 0 where a weight is fixed
    m, n = s.shape
    eig = np.linalg.eigvalsh(h)                       # (n,) or (m, n)
    lam_min = eig[..., 0]
    # eigvalsh is backward stable: its error is a small multiple of n * eps * ||H||
    margin = 8.0 * n * np.finfo(np.float64).eps * np.max(np.abs(eig), axis=-1)
    mu = lam_min - margin if shift == "eigen" else np.minimum(lam_min - margin, 0.0)
    mu = np.broadcast_to(mu, (m,)).astype(np.float64)
    lin = g + mu[:, None] * s
    step = _jacobi_steps(h, mu, m)                    # (m, n)

    def value_grad(y):
        hy = _energy.hessian_times(y, h) - mu[:, None] * y
        return np.sum(y * (hy + lin), axis=1), 2.0 * hy + lin

    def certificate(y):
        f, grad = value_grad(y)
        cert = f - np.sum(grad * y, axis=1) + np.sum(s * np.minimum(grad, 0.0), axis=1)
        return f, np.where(np.isfinite(cert), cert, -np.inf)

    it = _Iteration(h, mu, lin, s, step, precision)
    x_checked = problem.frac * s                     # the float weights, clipped into the box
    it.start(x_checked)
    best = np.full(m, -np.inf)
    rtn = problem.rtn_costs()
    const = problem.const
    converged = False
    best_gap, stalled = np.inf, 0
    while True:
        if it.count % check_every == 0 or it.count == max_iter:
            # certified in float64 at the projected iterate x, in the box: F(x) is then a
            # value of the relaxation, never below its minimum (the extrapolated z can leave
            # the box); the first check at the float weights themselves, not their float32
            # rounding
            y = x_checked if it.count == 0 else it.current()
            if y is None or stalled >= _STALL_CHECKS:
                # float32 overflowed, or its round-off keeps the gap from closing (a small
                # rtol): go on in float64 from the last certified iterate
                it = _Iteration(h, mu, lin, s, step, "float64", count=it.count)
                it.start(x_checked)
                y = x_checked
            x_checked = y
            f_x, cert = certificate(y)
            best = np.maximum(best, cert)
            span = float(np.sum(rtn) - np.sum(best + const))
            gap = float(np.sum(f_x - best))
            if gap <= rtol * max(span, 0.0):
                converged = True
                break
            # float32 only: checks in a row without the gap shrinking by 1 %
            stalled = stalled + 1 if it.dtype == np.float32 and gap >= 0.99 * best_gap else 0
            best_gap = min(best_gap, gap)
            if it.count == max_iter:
                break
        it.step()
    bound = best + const
    # the bound never exceeds RTN's cost by more than round-off: keep it a bound when the
    # certificate's arithmetic and RTN's differ in the last bits (an exact-RTN optimum)
    bound = np.minimum(bound, np.asarray(rtn))
    from ..solvers.base import cost_noise

    return LowerBound(cost=bound, relaxed_cost=f_x + const, rtn_cost=np.array(rtn),
                      shift=mu.copy(), method=shift, iterations=it.count,
                      seconds=time.perf_counter() - t0, converged=converged,
                      cost_noise=cost_noise(problem))
