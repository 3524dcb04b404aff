"""Scales refitted to the rounding: alternate between solving the rounding and fitting the scales.

A grid's scales are searched before any rounding is chosen (``GridSpec.scale_method``), for
rounding-to-nearest.  Once a solver has chosen the codes ``q``, the cost
``(s (q - z) - w)^T H (s (q - z) - w)`` of each output channel is a quadratic in that channel's
scales, minimised in closed form (a ``groups x groups`` linear system per channel; one division
per channel for a per-channel grid).  The refitted grid moves the floor/ceil pairs, so the
rounding is solved again there, starting from the previous codes; per channel the better of the
two (grid, rounding) pairs is kept.  Each round therefore never increases any channel's cost.

On MiniLM's first ``intermediate.dense`` layer at 3 bits, three rounds take ``fast`` from 0.266
to 0.163 of the RTN cost (BENCHMARKS.md, section 2).  A round stops the loop early when it
improves no channel.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from .errors import QroundError
from .grid import Grid
from .problems.rounding import RoundingProblem
from .solvers.base import Solution, Solver, make_solution, spawn_rng

__all__ = ["refit_scales", "solve_refitting"]


def refit_scales(problem: RoundingProblem, codes, ridge: float = 1e-9) -> Grid:
    """The grid whose scales minimise the problem's cost of ``codes`` (m, n), zero points kept.

    ridge: pulls each scale toward its current value with weight ``ridge * mean diagonal`` of
    the channel's system, which keeps a group whose codes are all at the zero point (no
    information about its scale) where it was.  A group whose fitted scale is not positive and
    finite is pinned at its current scale and the channel's other groups are fitted again; a
    channel whose cost would still go up (round-off) keeps its current scales.
    """
    q = np.asarray(codes)
    if q.shape != problem.weight.shape:
        raise QroundError(f"codes must have shape {problem.weight.shape}, got {q.shape}")
    g = problem.grid
    if q.dtype == bool or not (np.issubdtype(q.dtype, np.integer)
                               or np.issubdtype(q.dtype, np.floating)):
        raise QroundError(f"codes must be integers in [{g.qmin}, {g.qmax}], got dtype {q.dtype}")
    if q.size and not (np.all(np.isfinite(q)) and np.all(q == np.round(q))
                       and q.min() >= g.qmin and q.max() <= g.qmax):
        raise QroundError(f"codes must be integers in [{g.qmin}, {g.qmax}] (the grid's codes); "
                          f"got values from {q.min()} to {q.max()}"
                          + ("" if np.all(q == np.round(q)) else ", not all integers"))
    if g.in_features != problem.num_inputs or problem.restricted:
        raise QroundError("refit_scales needs a whole layer's problem, not a restricted one")
    if isinstance(ridge, (bool, np.bool_)) or not isinstance(
            ridge, (int, float, np.integer, np.floating)) or not (np.isfinite(ridge)
                                                                 and ridge >= 0):
        raise QroundError(f"ridge must be a finite number >= 0, got {ridge!r}")
    m, n = problem.weight.shape
    groups = g.groups
    gs = n // groups
    e = q.astype(np.float64) - problem.zero_point          # grid units: w_hat = s * e
    r, _ = problem.target()
    # A[c, a, b] = e_a^T H e_b over the inputs of groups a and b; b[c, a] = e_a^T r_c
    he = np.empty((groups, m, n))   # he[a] = H e_a: only group a's rows of H take part
    h = problem.hessian
    for a in range(groups):
        sl = slice(a * gs, (a + 1) * gs)
        he[a] = e[:, sl] @ h[sl, :] if h.ndim == 2 else np.einsum("mi,mij->mj", e[:, sl],
                                                                   h[:, sl, :])
    ew = e.reshape(m, groups, gs)
    mat = np.einsum("cag,bcag->cab", ew, he.reshape(groups, m, groups, gs))
    rhs = np.sum(ew * r.reshape(m, groups, gs), axis=2)
    old = g.scale
    scale_of = np.maximum(np.trace(mat, axis1=1, axis2=2) / groups, np.finfo(float).tiny)
    pin = np.full((m, groups), ridge)   # ridge weight per group; pinned groups get a huge one
    new = old
    for _ in range(groups):
        lam = pin * scale_of[:, None]
        sys_ = mat + lam[:, :, None] * np.eye(groups)
        with np.errstate(all="ignore"):
            new = np.linalg.solve(sys_, (rhs + lam * old)[..., None])[..., 0]
        bad = ~(np.isfinite(new) & (new > 0))
        if not bad.any():
            break
        # a group whose best scale is not positive stays where it was; the others refit
        pin = np.where(bad, 1e12, pin)
    new = np.where(np.isfinite(new) & (new > 0), new, old)
    # a channel whose cost does not depend on its scales (every code at the zero point, or no
    # input energy) keeps them exactly: its subnormal ridge solve only lost bits
    new = np.where((np.trace(mat, axis1=1, axis2=2) > 0)[:, None], new, old)
    # the joint fit with pinned groups is still a minimiser; keep the old scales of any channel
    # that rounding noise made worse
    s_new = np.repeat(new, gs, axis=1)
    worse = problem.cost_of_codes(q, scale=s_new) > problem.cost_of_codes(q)
    new = np.where(worse[:, None], old, new)
    return Grid(new, g.zero_point, g.bits, g.symmetric, g.group_size, g.in_features)


def solve_refitting(problem: RoundingProblem, solver: Solver | str, rounds: int = 2, seed=None,
                    tol: float = 1e-12) -> tuple[RoundingProblem, Solution]:
    """Solve ``problem``, then up to ``rounds`` times refit the scales and solve again.

    Returns ``(problem, solution)`` on the final grid (a channel keeps its previous grid when the
    refit did not lower its cost).  ``solution.rtn_cost`` stays the rounding-to-nearest cost on
    the original grid, ``solution.seconds`` covers all rounds, ``solution.solver`` reads
    ``"<solver> (N refits)"``, N the ``rounds`` asked for (a setting, the same for every layer
    of a model); ``solution.info["refits"]`` lists per round run the summed cost and the number
    of channels that moved to the new grid.  Stops early once a round improves no channel by
    more than ``tol`` (relative): ``info["refits"]`` then has fewer than ``rounds`` entries.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
        raise QroundError(f"rounds must be a non-negative integer, got {rounds!r}")
    if isinstance(solver, str):
        from .solvers.registry import get_solver
        solver = get_solver(solver)
    if not isinstance(solver, Solver):
        raise QroundError(f"solver must be a Solver or a registry name, got "
                          f"{type(solver).__name__}")
    rng = spawn_rng(seed)
    t0 = time.perf_counter()
    sol = solver.solve(problem, seed=rng)
    rtn = problem.rtn_costs()
    cur, codes, cost = problem, sol.codes, sol.cost
    history = []
    for _ in range(int(rounds)):
        grid = refit_scales(cur, codes)
        cand = cur.with_grid(grid)
        # start from the previous codes, projected onto the new floor/ceil pairs
        start = np.clip(codes - cand.floor_codes, 0, 1).astype(bool) & cand.free
        new = solver.solve(cand, init=start, seed=rng)
        better = new.cost < cost - tol * np.abs(cost)
        history.append({"cost": float(np.sum(np.where(better, new.cost, cost))),
                        "channels": int(better.sum())})
        if not better.any():
            break
        scale = np.where(better[:, None], grid.scale, cur.grid.scale)
        g = cur.grid
        cur = cur.with_grid(Grid(scale, g.zero_point, g.bits, g.symmetric, g.group_size,
                                 g.in_features))
        codes = np.where(better[:, None], new.codes, codes)
        cost = np.where(better, new.cost, cost)
    choices = cur.choices_from_codes(codes)
    label = f"{sol.solver} ({rounds} refits)" if rounds else sol.solver
    out = make_solution(cur, choices, time.perf_counter() - t0, label,
                        {**sol.info, "refits": history})
    return cur, dataclasses.replace(out, rtn_cost=rtn.copy())
