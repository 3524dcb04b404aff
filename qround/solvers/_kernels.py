"""Compiled (numba) inner loops of the single-flip local-search solvers ``anneal`` and ``tabu``.

These kernels are the compiled inner loop of exactly the formulas of
:mod:`qround.problems.energy` (they are not a second definition: the tests check them against
``RoundingProblem.flip_deltas`` / ``energies``).  Per channel, with ``y = s*b`` and the local
field ``f = H y``, flipping ``b_i`` changes ``y_i`` by ``d = s_i (1 - 2 b_i)`` and the energy by

    delta_i = d (2 f_i + g_i) + d^2 H_ii,

and after the flip ``f += H[:, i] d`` (row ``i`` of the symmetric H, contiguous in memory).
The callers compute the start fields and energies with :mod:`qround.problems.energy` (BLAS) and
pass them in, so only the O(n) incremental updates live here.

Layout: ``hess`` is (k, n, n) with ``k == 1`` for an H shared by all channels or ``k == m``
per channel; ``free_idx`` (m, n) lists each channel's free variables first (``nfree`` of them),
so fixed variables are never touched.  Channels run in parallel (``prange``); each has its own
random stream seeded from ``seeds[c]`` (splitmix64), so a seed gives the same result whatever
the number of threads.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2^-53


@njit(cache=True, inline="always")
def _next(state):
    """splitmix64: (new state, uniform float in [0, 1)). State is a 1-element uint64 array."""
    state[0] += _GOLDEN
    z = state[0]
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    z = z ^ (z >> _S31)
    return (z >> _S11) * _TO_UNIT


@njit(cache=True, inline="always")
def _randint(state, k):
    """Uniform integer in [0, k)."""
    return min(int(_next(state) * k), k - 1)


@njit(cache=True, inline="always")
def _flip(i, b, f, step, h):
    """Flip b_i and update the local fields f += H[i, :] d; returns d."""
    d = step[i] * (1.0 - 2.0 * b[i])
    b[i] = 1.0 - b[i]
    row = h[i]
    for j in range(f.shape[0]):
        f[j] += row[j] * d
    return d


@njit(cache=True, inline="always")
def _delta(i, b, f, step, grad, hdiag):
    d = step[i] * (1.0 - 2.0 * b[i])
    return d * (2.0 * f[i] + grad[i]) + d * d * hdiag[i]


@njit(parallel=True, cache=True)
def anneal_kernel(hess, step, grad, start, fields, energy, free_idx, nfree, betas, restarts,
                  random_order, seeds):
    """Simulated annealing (Metropolis single flips), ``restarts`` runs per channel from start.

    start, fields (m, n) float64 (0/1 choices and their local fields), energy (m,) their
    energies; betas (m, sweeps) the inverse temperature of each sweep.  Returns the best
    choices seen (m, n) float64 and their energies (m,) (tracked incrementally).
    """
    m, n = start.shape
    best_all = start.copy()
    best_e_all = energy.copy()
    shared = hess.shape[0] == 1
    for c in prange(m):
        k = nfree[c]
        if k == 0:
            continue
        h = hess[0] if shared else hess[c]
        s, g = step[c], grad[c]
        hdiag = np.empty(n)
        for j in range(n):
            hdiag[j] = h[j, j]
        state = np.empty(1, dtype=np.uint64)
        state[0] = seeds[c]
        order = free_idx[c, :k].copy()
        best = best_all[c]
        best_e = energy[c]
        for _ in range(restarts):
            b = start[c].copy()
            f = fields[c].copy()
            e = energy[c]
            at_best = e <= best_e
            for t in range(betas.shape[1]):
                beta = betas[c, t]
                if random_order:  # Fisher-Yates shuffle of the free variables
                    for p in range(k - 1, 0, -1):
                        q = _randint(state, p + 1)
                        order[p], order[q] = order[q], order[p]
                for p in range(k):
                    i = order[p]
                    dlt = _delta(i, b, f, s, g, hdiag)
                    if dlt > 0.0 and _next(state) >= np.exp(-beta * dlt):
                        continue
                    if at_best and dlt > 0.0:
                        # leaving the best state uphill: save it now (copies only when needed)
                        best[:] = b
                        at_best = False
                    _flip(i, b, f, s, h)
                    e += dlt
                    if e < best_e:
                        best_e = e
                        at_best = True
            if at_best:
                best[:] = b
        best_e_all[c] = best_e
    return best_all, best_e_all


@njit(parallel=True, cache=True)
def tabu_kernel(hess, step, grad, start, fields, energy, free_idx, nfree, tenure, max_iter,
                stall, rounds, perturb, seeds):
    """Tabu search with restarts that perturb the best state; per channel.

    Each iteration flips the free variable with the lowest delta that is not tabu (a tabu
    move is allowed if it gives a new best: aspiration) and makes it tabu for ``tenure[c]``
    iterations.  A round ends after ``max_iter`` iterations or ``stall`` iterations without a
    new best; the next round starts from the best state with ``perturb[c]`` random flips.
    Returns the best choices (m, n) float64 and energies (m,).
    """
    m, n = start.shape
    best_all = start.copy()
    best_e_all = energy.copy()
    shared = hess.shape[0] == 1
    for c in prange(m):
        k = nfree[c]
        if k == 0:
            continue
        h = hess[0] if shared else hess[c]
        s, g = step[c], grad[c]
        hdiag = np.empty(n)
        for j in range(n):
            hdiag[j] = h[j, j]
        state = np.empty(1, dtype=np.uint64)
        state[0] = seeds[c]
        idx = free_idx[c, :k]
        order = idx.copy()
        b = start[c].copy()
        f = fields[c].copy()
        e = energy[c]
        best = best_all[c]
        best_f = f.copy()
        best_e = e
        at_best = True
        tabu_until = np.zeros(n, dtype=np.int64)
        it = 0
        for r in range(rounds):
            if r > 0:
                if not at_best:
                    b[:] = best
                    f[:] = best_f
                    e = best_e
                for p in range(min(perturb[c], k)):  # distinct variables: partial shuffle
                    q = p + _randint(state, k - p)
                    order[p], order[q] = order[q], order[p]
                    i = order[p]
                    dlt = _delta(i, b, f, s, g, hdiag)
                    if at_best and dlt > 0.0:
                        best[:] = b
                        best_f[:] = f
                        at_best = False
                    _flip(i, b, f, s, h)
                    e += dlt
                    if e < best_e:
                        best_e = e
                        at_best = True
                tabu_until[:] = 0
            since_best = 0
            for _ in range(max_iter):
                it += 1
                pick, pick_d = -1, np.inf
                for p in range(k):
                    j = idx[p]
                    dj = _delta(j, b, f, s, g, hdiag)
                    if dj < pick_d and (tabu_until[j] < it or e + dj < best_e):
                        pick, pick_d = j, dj
                if pick < 0:
                    break
                if at_best and pick_d > 0.0:
                    best[:] = b
                    best_f[:] = f
                    at_best = False
                _flip(pick, b, f, s, h)
                e += pick_d
                tabu_until[pick] = it + tenure[c]
                if e < best_e:
                    best_e = e
                    at_best = True
                    since_best = 0
                else:
                    since_best += 1
                    if since_best >= stall:
                        break
        if at_best:
            best[:] = b
        best_e_all[c] = best_e
    return best_all, best_e_all


def kernel_inputs(problem, start: np.ndarray, rng: np.random.Generator) -> dict:
    """The arrays both kernels take, computed with :mod:`qround.problems.energy`.

    start (m, n) bool.  Returns hess (k, n, n), step, grad, start, fields (m, n) float64,
    energy (m,), free_idx (m, n) int64 (free variables first), nfree (m,) int64 and
    seeds (m,) uint64 (one random stream per channel, drawn from ``rng``).
    """
    m, n = problem.weight.shape
    b = np.ascontiguousarray(start, dtype=np.float64)
    hess = problem.hessian
    hess = np.ascontiguousarray(hess[None] if hess.ndim == 2 else hess)
    # stable argsort of ~free puts each channel's free variables first, in input order
    free_idx = np.ascontiguousarray(np.argsort(~problem.free, axis=1, kind="stable"), dtype=np.int64)
    return dict(hess=hess, step=np.ascontiguousarray(problem.step),
                grad=np.ascontiguousarray(problem.grad), start=b,
                fields=np.ascontiguousarray(problem.local_fields(b)),
                energy=np.ascontiguousarray(problem.energies(b), dtype=np.float64),
                free_idx=free_idx, nfree=problem.free.sum(axis=1).astype(np.int64),
                seeds=rng.integers(0, np.iinfo(np.int64).max, size=m, dtype=np.int64)
                .astype(np.uint64))
