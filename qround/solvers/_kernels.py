"""Compiled (numba) inner loops: the single-flip local search of ``anneal`` and ``tabu``, and
the column loop of ``gptq`` (:func:`gptq_block_kernel`, described there).

These kernels are the compiled inner loop of exactly the formulas of
:mod:`qround.problems.energy` (they are not a second definition: the tests check them against
``RoundingProblem.flip_deltas`` / ``energies``).  Per channel, with ``y = s*b`` and the local
field ``f = H y``, flipping ``b_i`` changes ``y_i`` by ``d = s_i (1 - 2 b_i)`` and the energy by

    delta_i = d (2 f_i + g_i) + d^2 H_ii,

and after the flip ``f += H[:, i] d`` (row ``i`` of the symmetric H, contiguous in memory).
The callers compute the start fields and energies with :mod:`qround.problems.energy` (BLAS) and
pass them in (:func:`kernel_inputs`), so only the O(n) incremental updates live here.

Layout: ``hess`` is (k, n, n) with ``k == 1`` for an H shared by all channels or ``k == m``
per channel; ``free_idx`` (m, n) lists each channel's free variables first (``nfree`` of them,
in input order).  With ``compact`` a channel works on its free sub-problem, ``H[free][:, free]``
gathered once (:func:`_compact_hessian`; the callers decide with :func:`compact_pays`): fixed
variables never flip, and their fields are never needed.  Channels run in parallel
(``prange``); each has its own random stream seeded from ``seeds[c]`` (splitmix64), so a seed
gives the same result whatever the number of threads.
"""
from __future__ import annotations

import os
import time

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._parallel import parallel_kernel


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
    """Flip b_i and update the local fields ``f += H[i, :] d`` (energy.local_fields)."""
    d = step[i] * (1.0 - 2.0 * b[i])
    b[i] = 1.0 - b[i]
    row = h[i]
    for j in range(f.shape[0]):
        f[j] += row[j] * d


@njit(cache=True, inline="always")
def _delta(i, b, f, step, grad, hdiag):
    """Energy change of flipping b_i (energy.flip_deltas for one variable)."""
    d = step[i] * (1.0 - 2.0 * b[i])
    return d * (2.0 * f[i] + grad[i]) + d * d * hdiag[i]


@njit(cache=True)
def _compact_hessian(h, idx):
    """``H[idx][:, idx]`` (k, k) for the free variables ``idx`` (k,) of one channel.

    With ``compact`` the kernels work on each channel's free sub-problem: a fixed variable never
    flips, so its field and delta are never needed, and every O(n) loop becomes O(k) (k is about
    0.8 n at 2 bits).  ``idx`` is in input order, so the scans visit the variables in the same
    order as over the whole row, and the results are the same."""
    k = idx.shape[0]
    hl = np.empty((k, k))
    for a in range(k):
        src = h[idx[a]]
        dst = hl[a]
        for b in range(k):
            dst[b] = src[idx[b]]
    return hl


@njit(cache=True, inline="always")
def _gather(x, idx):
    """``x[idx]`` as a new float64 array."""
    out = np.empty(idx.shape[0])
    for a in range(idx.shape[0]):
        out[a] = x[idx[a]]
    return out


@njit(cache=True, inline="always")
def _metropolis(x, state):
    """Accept an uphill move of ``x = beta * delta > 0`` with probability ``exp(-x)``.

    exp(-40) < 1e-17: rejected without a draw.  Otherwise the draw ``u`` is first compared with
    the bounds ``1 - x <= exp(-x) <= 1 / (1 + x + x^2/2 + x^3/6)`` (the Taylor sums of e^x are
    below it for x >= 0), so most moves are decided without an ``exp``.  The decision is that of
    ``u < exp(-x)`` with the same draw (the 1e-12 margins cover round-off), so results do not
    change; most of the anneal kernel's 1.2-1.6x speed-up in BENCHMARKS.md 1f comes from it.
    """
    if x > 40.0:
        return False
    u = _next(state)
    if u < 1.0 - x - 1e-12:
        return True
    if u * (1.0 + x * (1.0 + x * (0.5 + x * (1.0 / 6.0)))) >= 1.0 + 1e-12:
        return False
    return u < np.exp(-x)


@njit(cache=True)
def _anneal_channel(h, csr, hdiag, s, g, b0, f0, e0, order, betas, restarts, random_order,
                    seed):
    """One channel of :func:`anneal_kernel` and :func:`anneal_sparse_kernel`: h (n, n) its
    matrix, or None and ``csr`` (indptr, indices, data) the same in CSR form; hdiag (n,) its
    diagonal; s, g, b0, f0 (n,) its problem and start, e0 the start's energy, order (k,) the
    variables to visit (the free ones).  Returns the best choices (n,) and their energy.
    Compiled apart for ``h`` None and an array, so the flip's branch is decided at compile
    time (not inlined: one call per channel)."""
    k = order.shape[0]
    indptr, indices, data = csr
    state = np.empty(1, dtype=np.uint64)
    state[0] = seed
    best = b0.copy()
    best_e = e0
    for _ in range(restarts):
        b = b0.copy()
        f = f0.copy()
        e = e0
        at_best = e <= best_e
        for t in range(betas.shape[0]):
            beta = betas[t]
            if random_order:  # Fisher-Yates shuffle of the free variables
                for p in range(k - 1, 0, -1):
                    q = _randint(state, p + 1)
                    order[p], order[q] = order[q], order[p]
            for p in range(k):
                i = order[p]
                dlt = _delta(i, b, f, s, g, hdiag)
                if dlt > 0.0 and not _metropolis(beta * dlt, state):
                    continue
                if at_best and dlt > 0.0:
                    # leaving the best state uphill: save it now (copies only when needed)
                    best[:] = b
                    at_best = False
                if h is None:
                    _flip_sparse(i, b, f, s, indptr, indices, data)
                else:
                    _flip(i, b, f, s, h)
                e += dlt
                if e < best_e:
                    best_e = e
                    at_best = True
        if at_best:
            best[:] = b
    return best, best_e


@njit(cache=True, inline="always")
def _flip_sparse(i, b, f, step, indptr, indices, data):
    """:func:`_flip` with H in CSR form: only the nonzeros of row ``i`` update the fields (a
    zero adds nothing, so the fields are those of the dense update, bit for bit)."""
    d = step[i] * (1.0 - 2.0 * b[i])
    b[i] = 1.0 - b[i]
    for p in range(indptr[i], indptr[i + 1]):
        f[indices[p]] += data[p] * d


@njit(cache=True)
def _diagonal(h):
    out = np.empty(h.shape[0])
    for j in range(h.shape[0]):
        out[j] = h[j, j]
    return out


# the CSR arrays :func:`anneal_kernel` passes on with a dense matrix (none: empty)
NO_CSR = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))


@parallel_kernel
def anneal_kernel(hess, step, grad, start, fields, energy, free_idx, nfree, betas, restarts,
                  random_order, seeds, compact, no_csr):
    """Simulated annealing (Metropolis single flips), ``restarts`` runs per channel from start.

    start, fields (m, n) float64 (0/1 choices and their local fields), energy (m,) their
    energies; betas (m, sweeps) the inverse temperature of each sweep; compact: work on each
    channel's free sub-problem (:func:`_compact_hessian`); no_csr: :data:`NO_CSR` (the shared
    channel loop also serves :func:`anneal_sparse_kernel`).  Returns the best choices seen
    (m, n) float64 and their energies (m,) (tracked incrementally).
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
        idx = free_idx[c, :k]
        if compact:
            hc = _compact_hessian(h, idx)
            best, best_e = _anneal_channel(
                hc, no_csr, _diagonal(hc), _gather(step[c], idx), _gather(grad[c], idx),
                _gather(start[c], idx), _gather(fields[c], idx), energy[c], np.arange(k),
                betas[c], restarts, random_order, seeds[c])
            for a in range(k):
                best_all[c, idx[a]] = best[a]
        else:
            best, best_e = _anneal_channel(h, no_csr, _diagonal(h), step[c], grad[c], start[c],
                                           fields[c], energy[c], idx.copy(), betas[c],
                                           restarts, random_order, seeds[c])
            best_all[c] = best
        best_e_all[c] = best_e
    return best_all, best_e_all


@parallel_kernel
def anneal_sparse_kernel(indptr, indices, data, hdiag, step, grad, start, fields, energy,
                         betas, restarts, random_order, seeds):
    """:func:`anneal_kernel` for one H in CSR form (``indptr``, ``indices``, ``data``; its
    diagonal ``hdiag`` apart) shared by every channel, all variables free: an accepted flip
    costs the row's nonzeros instead of n.  Given the same start fields, the same draws and
    decisions as the dense kernel on the same seeds: the fields are updated by the same
    products in the same order, zeros left out (:class:`qround.solvers.QroundSampler` picks
    it for sparse BQMs)."""
    m, n = start.shape
    best_all = start.copy()
    best_e_all = energy.copy()
    for c in prange(m):
        best, best_e = _anneal_channel(None, (indptr, indices, data), hdiag, step[c],
                                       grad[c], start[c], fields[c], energy[c], np.arange(n),
                                       betas[c], restarts, random_order, seeds[c])
        best_all[c] = best
        best_e_all[c] = best_e
    return best_all, best_e_all


# A monotonic clock inside compiled loops (tabu search's time limit): POSIX clock_gettime,
# called directly.  Where there is none (Windows), HAS_CLOCK is False, the clock reads 0 and
# the solvers refuse a time limit.  With NUMBA_DISABLE_JIT=1 it is time.monotonic_ns.
_POSIX_CLOCK = os.name == "posix" and hasattr(time, "CLOCK_MONOTONIC")
HAS_CLOCK = _POSIX_CLOCK or bool(numba.config.DISABLE_JIT)   # pure Python has time.monotonic_ns
_CLOCK_ID = time.CLOCK_MONOTONIC if _POSIX_CLOCK else 0


@intrinsic
def _clock_gettime_ns(typingctx):
    import llvmlite.ir as lir

    def codegen(context, builder, signature, args):
        i32, i64 = lir.IntType(32), lir.IntType(64)
        timespec = lir.LiteralStructType([i64, i64])   # time_t, long: 64-bit on LP64 systems
        ts = cgutils.alloca_once(builder, timespec)
        fn = cgutils.get_or_insert_function(
            builder.module, lir.FunctionType(i32, [i32, timespec.as_pointer()]), "clock_gettime")
        builder.call(fn, [i32(_CLOCK_ID), ts])
        sec = builder.load(builder.gep(ts, [i32(0), i32(0)]))
        nsec = builder.load(builder.gep(ts, [i32(0), i32(1)]))
        return builder.add(builder.mul(sec, i64(1_000_000_000)), nsec)

    return types.int64(), codegen


@njit(cache=True, inline="always")
def _no_clock_ns():
    return 0


if numba.config.DISABLE_JIT:   # NUMBA_DISABLE_JIT=1: the kernels run as Python
    _now_ns = time.monotonic_ns
else:
    _now_ns = _clock_gettime_ns if _POSIX_CLOCK else _no_clock_ns
NO_TIME_LIMIT = 0   # tabu_kernel's time_limit_ns when the search has none


@njit(cache=True, inline="always")
def _flip_update_deltas(i, b, d, f, grad, curv, row, delta):
    """Flip b_i, update the fields with row i of H and refresh every delta in the same pass.

    ``d`` holds the current ``s (1 - 2 b)`` (0 for fixed variables), ``curv`` the ``s^2 H_jj``
    (+inf for fixed variables, so their delta is +inf and they are never picked).
    """
    di = d[i]
    b[i] = 1.0 - b[i]
    d[i] = -di
    for j in range(f.shape[0]):
        f[j] += row[j] * di
        delta[j] = d[j] * (2.0 * f[j] + grad[j]) + curv[j]


@njit(cache=True, inline="always")
def _shuffle(order, count, state):
    """Put ``count`` distinct random entries of ``order`` first (partial Fisher-Yates)."""
    k = order.shape[0]
    for p in range(min(count, k - 1)):
        q = p + _randint(state, k - p)
        order[p], order[q] = order[q], order[p]


@njit(cache=True, inline="always")
def _take(i, e, best_e, at_best, b, d, f, grad, curv, row, delta, best, best_f):
    """Flip variable i, tracking the best state: returns (e, best_e, at_best).

    ``at_best`` means b is a best state not yet copied to ``best``: it is saved only when a
    move leaves it uphill, so long descents copy nothing.
    """
    if at_best and delta[i] > 0.0:
        best[:] = b
        best_f[:] = f
        at_best = False
    e += delta[i]
    _flip_update_deltas(i, b, d, f, grad, curv, row, delta)
    if e < best_e:
        best_e = e
        at_best = True
    return e, best_e, at_best


@njit(cache=True)
def _pick_random_tie(delta, tabu_until, it, e, best_e, state):
    """The allowed flip of lowest delta (not tabu, or giving a new best), a tie going to a
    random one of the tied flips (reservoir sampling); (-1, inf) when none is allowed."""
    pick, pick_d, ties = -1, np.inf, 0
    for j in range(delta.shape[0]):
        dj = delta[j]
        if dj < pick_d:
            if tabu_until[j] < it or e + dj < best_e:
                pick, pick_d, ties = j, dj, 1
        elif dj == pick_d and dj < np.inf and (tabu_until[j] < it or e + dj < best_e):
            ties += 1   # each of the tied flips is kept with chance 1/ties
            if _randint(state, ties) == 0:
                pick = j
    return pick, pick_d


@njit(cache=True, inline="always")
def _tabu_channel(h, s, g, b0, f0, e0, order, tenure, max_iter, stall, rounds, perturb,
                  reset_every, descent, tol, seed, t_end, random_ties):
    """One channel of :func:`tabu_kernel`: h (n, n), s, g, b0, f0 (n,) its problem and start,
    e0 the start's energy, order (k,) its free variables (a fixed one has s = 0, so its delta
    is +inf and it is never picked); t_end the clock reading (ns) at which the search ends (0:
    none); random_ties: among allowed flips of equal lowest delta pick one uniformly at random
    (else the lowest index).  Returns the best choices (n,) and their energy."""
    out_of_time = False
    n = b0.shape[0]
    k = order.shape[0]
    state = np.empty(1, dtype=np.uint64)
    state[0] = seed
    b, f = np.empty(n), np.empty(n)
    d, curv, delta = np.empty(n), np.empty(n), np.empty(n)
    for j in range(n):
        curv[j] = s[j] * s[j] * h[j, j] if s[j] != 0.0 else np.inf
    best, best_f = b0.copy(), f0.copy()
    best_e = e = e0
    at_best = False
    tabu_until = np.zeros(n, dtype=np.int64)
    it = 0
    for r in range(rounds):
        if out_of_time or (t_end > 0 and r > 0 and _now_ns() >= t_end):
            break
        from_start = r == 0 or (reset_every > 0 and r % reset_every == 0)
        if from_start or not at_best:
            if at_best:
                best[:] = b
                best_f[:] = f
            src, src_f = (b0, f0) if from_start else (best, best_f)
            e = e0 if from_start else best_e
            for j in range(n):
                b[j] = src[j]
                f[j] = src_f[j]
                d[j] = s[j] * (1.0 - 2.0 * b[j])
                delta[j] = d[j] * (2.0 * f[j] + g[j]) + curv[j]
            at_best = False  # ``best`` holds a valid copy
        if r > 0:
            _shuffle(order, perturb, state)
            for p in range(min(perturb, k)):
                e, best_e, at_best = _take(order[p], e, best_e, at_best, b, d, f, g, curv,
                                           h[order[p]], delta, best, best_f)
        for _ in range(k if descent else 0):  # first-improvement sweeps, random order
            if t_end > 0 and _now_ns() >= t_end:
                out_of_time = True
                break
            _shuffle(order, k, state)
            improved = False
            for p in range(k):
                i = order[p]
                if delta[i] < -tol:
                    e, best_e, at_best = _take(i, e, best_e, at_best, b, d, f, g, curv, h[i],
                                               delta, best, best_f)
                    improved = True
            if not improved:
                break
        tabu_until[:] = 0
        since_best = 0
        for _ in range(0 if out_of_time else max_iter):
            it += 1
            if t_end > 0 and (it & 255) == 0 and _now_ns() >= t_end:
                out_of_time = True
                break
            if random_ties:   # two loops: the first-index one stays as fast as it was
                pick, pick_d = _pick_random_tie(delta, tabu_until, it, e, best_e, state)
            else:
                pick, pick_d = -1, np.inf
                for j in range(n):
                    dj = delta[j]
                    if dj < pick_d and (tabu_until[j] < it or e + dj < best_e):
                        pick, pick_d = j, dj
            if pick < 0 or pick_d == np.inf:
                break
            e, best_e, at_best = _take(pick, e, best_e, at_best, b, d, f, g, curv, h[pick],
                                       delta, best, best_f)
            tabu_until[pick] = it + tenure
            since_best = 0 if at_best else since_best + 1
            if since_best >= stall:
                break
    if at_best:
        best[:] = b
    return best, best_e


@parallel_kernel
def tabu_kernel(hess, step, grad, start, fields, energy, free_idx, nfree, tenure, max_iter,
                stall, rounds, perturb, reset_every, descent, tol, seeds, compact,
                time_limit_ns, random_ties):
    """Iterated tabu search per channel; see :class:`qround.solvers.tabu.Tabu`.

    Each round: from the best state (from the start in round 0 and every ``reset_every``-th
    round) flip ``perturb[c]`` random variables (none in round 0), optionally descend by
    first-improvement sweeps in random order (``descent``), then run tabu iterations: flip the
    variable with the lowest delta that is not tabu (a tabu flip that gives a new best is
    allowed: aspiration) and make it tabu for ``tenure[c]`` iterations; the round ends after
    ``max_iter`` iterations or ``stall`` without a new best.  compact: work on each channel's
    free sub-problem (:func:`_compact_hessian`).  time_limit_ns > 0: each channel's search
    also ends once that many nanoseconds have passed since the channel began, its set-up
    included (the clock is read every 256 iterations, every descent sweep and every round), so
    its result depends on the machine's speed; NO_TIME_LIMIT (0): no limit.  random_ties: a
    tie of the lowest delta among allowed flips goes to a random one of them (else to the
    lowest index; problems with integer biases have many ties).
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
        # the channel's clock starts before its set-up (the compaction is O(k^2))
        t_end = _now_ns() + time_limit_ns if time_limit_ns > 0 else 0
        h = hess[0] if shared else hess[c]
        idx = free_idx[c, :k]
        if compact:
            best, best_e = _tabu_channel(
                _compact_hessian(h, idx), _gather(step[c], idx), _gather(grad[c], idx),
                _gather(start[c], idx), _gather(fields[c], idx), energy[c], np.arange(k),
                tenure[c], max_iter, stall, rounds, perturb[c], reset_every, descent, tol[c],
                seeds[c], t_end, random_ties)
            for a in range(k):
                best_all[c, idx[a]] = best[a]
        else:
            best, best_e = _tabu_channel(
                h, step[c], grad[c], start[c], fields[c], energy[c], idx.copy(), tenure[c],
                max_iter, stall, rounds, perturb[c], reset_every, descent, tol[c], seeds[c],
                t_end, random_ties)
            best_all[c] = best
        best_e_all[c] = best_e
    return best_all, best_e_all


@njit(cache=True)
def gptq_block_kernel(w, lower, step, upper, i1, i2, b, err):
    """GPTQ's column loop inside one block ``[i1, i2)`` (``gptq.round_sequentially``).

    Transposed layout, inputs as rows: w (n, m) the current weights in processing order, updated
    in place in rows ``i..i2``; lower, step (n, m) floor and step (0 for a fixed weight); upper
    (n, n) the upper Cholesky factor of the inverse hessian.  Writes b[i1:i2] (0/1) and the
    scaled errors err (i2 - i1, m) that the caller pushes to the rows after the block with one
    matrix product.  Every step is a loop over contiguous channels, which vectorises.  The
    arithmetic is the torch loop's, operation for operation.  Serial: the kernel runs once per
    block, and starting numba's thread pool for each call cost more than the work (measured).
    """
    for i in range(i1, i2):
        d = upper[i, i]
        e = err[i - i1]
        for c in range(w.shape[1]):
            wi = w[i, c]
            s = step[i, c]
            up = s > 0.0 and wi - lower[i, c] >= 0.5 * s  # ties up, as RTN
            b[i, c] = 1.0 if up else 0.0
            e[c] = (wi - (lower[i, c] + s if up else lower[i, c])) / d
        for j in range(i + 1, i2):
            u = upper[i, j]
            row = w[j]
            for c in range(w.shape[1]):
                row[c] -= e[c] * u


@parallel_kernel
def descent_kernel(hess, step, grad, b, fields, hdiag, thresh, limit):
    """Steepest descent of ``greedy`` (:func:`qround.solvers.local.steepest_descent`), one
    channel per thread: flip the variable with the most negative delta (the first of equal
    ones, as ``np.argmin``) while its gain is below ``thresh[c]``, at most ``limit`` times.

    hess (k, n, n), hdiag (k, n) with k 1 or m; step, grad (m, n) read-only; b, fields (m, n)
    updated in place; thresh (m,).  The deltas and field updates are the float operations of
    :func:`qround.problems.energy.flip_deltas` and ``local_fields``, so the flips are those of
    the batched numpy loop.  Returns, per channel, the passes over its deltas (flips, plus the
    last pass that found none unless ``limit`` stopped it).
    """
    m, n = b.shape
    passes = np.zeros(m, dtype=np.int64)
    shared = hess.shape[0] == 1
    for c in prange(m):
        h = hess[0] if shared else hess[c]
        hd = hdiag[0] if shared else hdiag[c]
        bc, f, s, g = b[c], fields[c], step[c], grad[c]
        it = 0
        while it < limit:
            it += 1
            best, at = np.inf, -1
            for i in range(n):
                d = s[i] * (1.0 - 2.0 * bc[i])
                v = d * (2.0 * f[i] + g[i]) + d * d * hd[i]
                if v < best:
                    best, at = v, i
            if not best < thresh[c]:
                break
            _flip(at, bc, f, s, h)
        passes[c] = it
    return passes


@njit(cache=True)
def _sweep_descent(h, csr, g, b, f, thresh, max_sweeps):
    """Zero-temperature sweeps of one read of a QUBO ``E(b) = b^T H b + g^T b`` (H symmetric,
    zero diagonal, unit steps): visit the variables in input order and flip each whose delta
    ``(1 - 2 b_i)(2 f_i + g_i)`` is below ``thresh[i]`` (<= 0), until a sweep flips nothing or
    ``max_sweeps`` sweeps were made.  ``h`` (n, n), or None and ``csr`` (indptr, indices, data)
    the same in CSR form (the same decisions: a zero coupling adds nothing to a field).  A
    sweep costs O(n) plus the flips' updates, so a large sparse BQM far from a local minimum
    takes a few sweeps, not a pass over n per flip.  Updates b, f in place; returns (flips,
    whether the last sweep flipped nothing)."""
    n = b.shape[0]
    indptr, indices, data = csr
    ones = np.ones(n)   # unit steps, as the flip updates take them
    flips = 0
    for _ in range(max_sweeps):
        changed = False
        for i in range(n):
            if (1.0 - 2.0 * b[i]) * (2.0 * f[i] + g[i]) < thresh[i]:
                if h is None:
                    _flip_sparse(i, b, f, ones, indptr, indices, data)
                else:
                    _flip(i, b, f, ones, h)
                flips += 1
                changed = True
        if not changed:
            return flips, True
    return flips, False


@parallel_kernel
def sweep_descent_kernel(hess, grad, b, fields, thresh, max_sweeps, no_csr):
    """:func:`_sweep_descent` of every read (row of b, fields and grad) on the dense ``hess``
    (n, n); ``no_csr``: :data:`NO_CSR`.  Returns the flips and whether each read ended at a
    sweep without flips."""
    m = b.shape[0]
    flips = np.zeros(m, dtype=np.int64)
    done = np.zeros(m, dtype=np.bool_)
    for c in prange(m):
        flips[c], done[c] = _sweep_descent(hess, no_csr, grad[c], b[c], fields[c], thresh,
                                           max_sweeps)
    return flips, done


@parallel_kernel
def sweep_descent_sparse_kernel(indptr, indices, data, grad, b, fields, thresh, max_sweeps):
    """:func:`sweep_descent_kernel` with H in CSR form."""
    m = b.shape[0]
    flips = np.zeros(m, dtype=np.int64)
    done = np.zeros(m, dtype=np.bool_)
    for c in prange(m):
        flips[c], done[c] = _sweep_descent(None, (indptr, indices, data), grad[c], b[c],
                                           fields[c], thresh, max_sweeps)
    return flips, done


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
    fields = np.ascontiguousarray(problem.local_fields(b))
    # energy.energies, y^T (H y + g), from the fields at hand: one product with H, not two
    energies = np.sum(b * problem.step * (fields + problem.grad), axis=-1)
    # variables the energy cannot see (a dead input: a zero row of H and no linear term, up to
    # round-off) stay at the start and out of the search: each of their flips changes the
    # energy by 0, which at a local minimum tabu always picks, cycling among them (with more
    # of them than its tenure it never left the first local minimum); a step of 0 gives them
    # an infinite delta in the kernels, as a fixed variable has
    search = problem.free & ~_invisible(problem)
    step = np.ascontiguousarray(np.where(search | ~problem.free, problem.step, 0.0))
    # stable argsort of ~search puts each channel's searched variables first, in input order
    free_idx = np.argsort(~search, axis=1, kind="stable").astype(np.int64)
    arrays = dict(hess=hess, step=step,
                  grad=np.ascontiguousarray(problem.grad), start=b, fields=fields,
                  energy=np.ascontiguousarray(energies, dtype=np.float64),
                  free_idx=free_idx, nfree=search.sum(axis=1).astype(np.int64),
                  seeds=rng.integers(0, np.iinfo(np.int64).max, size=m, dtype=np.int64)
                  .astype(np.uint64))
    # numba compiles read-only and writeable arrays separately; problem arrays are read-only,
    # so pass read-only views of everything: one signature, one compilation, no copies.
    for key, a in arrays.items():
        a = a.view()
        a.flags.writeable = False
        arrays[key] = a
    return arrays


def _invisible(problem) -> np.ndarray:
    """(m, n) bool: variables whose flip changes the energy by round-off at most: curvature
    ``s_j^2 H_jj`` and linear term ``|s_j g_j|`` both at most 1e-12 of the channel's largest
    curvature (a constant or dead input).  None where the channel has no curvature at all."""
    h = problem.hessian
    hdiag = np.diagonal(h, axis1=-2, axis2=-1)
    curv = problem.step ** 2 * (hdiag[None] if h.ndim == 2 else hdiag)
    top = np.max(np.where(problem.free, curv, 0.0), axis=1, initial=0.0)[:, None]
    tiny = 1e-12 * top
    return (top > 0) & (curv <= tiny) & (np.abs(problem.step * problem.grad) <= tiny)


def compact_pays(n: int, nfree: np.ndarray, passes: float) -> bool:
    """Whether the kernels should work on each channel's free sub-problem: gathering
    ``H[free][:, free]`` costs about k^2 per channel and saves ``n - k`` of each of ``passes``
    O(n) passes (k the mean number of free variables).  It pays for `quality`'s long searches,
    most at 2 bits (a fifth of the weights fixed, 1 % at 4 bits), and not for `fast`'s n tabu
    steps, where gathering made `fast` a quarter slower."""
    k = float(np.mean(nfree)) if nfree.size else 0.0
    return (n - k) * passes > k * k
