"""Reference solvers: rounding-to-nearest, stochastic rounding, and the exact optimum."""
from __future__ import annotations

import numpy as np

from ..errors import QroundError, check_int
from ..problems.rounding import RoundingProblem
from .base import Solver


class Nearest(Solver):
    """Rounding-to-nearest. With an explicit start it returns the better of the two (contract)."""

    name = "nearest"

    def _solve(self, problem, start, rng):
        return problem.rtn_choices()


MAX_BATCH_BYTES = 2 ** 31


class Stochastic(Solver):
    """Stochastic rounding (Gupta et al. 2015): P(up) = fractional part; best of ``samples``.

    batch: samples drawn and evaluated together (fewer on a wide layer, within a memory
    bound); it changes the speed, not the codes."""

    name = "stochastic"

    def __init__(self, samples: int = 64, batch: int = 16):
        self.samples = check_int(samples, "samples", 1, maximum=10 ** 9)
        # a batch is (batch, m, n), smaller where that would pass MAX_BATCH_BYTES
        self.batch = check_int(batch, "batch", 1, maximum=4096)

    def _solve(self, problem, start, rng):
        # a batch of candidates and their products with H within MAX_BATCH_BYTES: a smaller
        # batch on a wide layer (the draws, and so the codes, do not depend on the batch)
        one = 8 * problem.num_channels * problem.num_inputs
        if one > MAX_BATCH_BYTES:
            raise QroundError(f"stochastic: one sample of this {problem.num_channels}x"
                              f"{problem.num_inputs} layer takes {one / 2 ** 30:.1f} GiB (at "
                              f"most {MAX_BATCH_BYTES / 2 ** 30:.0f} GiB)")
        batch = min(self.batch, MAX_BATCH_BYTES // one)
        best, best_e = start, problem.energies(start)
        left = self.samples
        while left > 0:
            k = min(batch, left)
            left -= k
            cand = rng.random((k, *problem.frac.shape)) < problem.frac
            e = problem.energies(cand)                    # (k, m)
            i = np.argmin(e, axis=0)
            e_min = e[i, np.arange(e.shape[1])]
            better = e_min < best_e
            best = np.where(better[:, None], cand[i, np.arange(e.shape[1])], best)
            best_e = np.minimum(best_e, e_min)
        return best


class Exact(Solver):
    """The exact optimum by enumerating all assignments of the free variables of each channel.

    Enumeration is vectorised in blocks of ``2^block_bits`` assignments; it refuses channels with
    more than ``max_free`` free variables (2^max_free evaluations each).
    """

    name = "exact"

    def __init__(self, max_free: int = 20, block_bits: int = 12):
        self.max_free = check_int(max_free, "max_free", 1)
        if self.max_free > 30:
            raise QroundError(f"max_free must lie in 1..30, got {max_free!r}")
        self.block_bits = check_int(block_bits, "block_bits", 1, maximum=20)  # 2^bits rows

    def _solve(self, problem: RoundingProblem, start, rng):
        nfree = problem.free.sum(axis=1)
        if nfree.max(initial=0) > self.max_free:
            c = int(np.argmax(nfree))
            raise QroundError(f"exact solver refuses channel {c} with {int(nfree[c])} free "
                              f"variables (limit max_free={self.max_free}: 2^n evaluations)")
        out = start.copy()
        for c in range(problem.num_channels):
            idx = np.flatnonzero(problem.free[c])
            if idx.size == 0:
                continue
            q = problem.qubo(c)[np.ix_(idx, idx)]
            k = idx.size
            best_e, best_b = np.inf, None
            block = 1 << min(k, self.block_bits)
            low = ((np.arange(block)[:, None] >> np.arange(min(k, self.block_bits))) & 1)
            for hi in range(1 << max(0, k - self.block_bits)):
                high = (hi >> np.arange(k - low.shape[1])) & 1
                b = np.concatenate([low, np.broadcast_to(high, (block, high.size))], axis=1)
                b = b.astype(np.float64)
                e = np.einsum("bi,ij,bj->b", b, q, b)
                j = int(np.argmin(e))
                if e[j] < best_e:
                    best_e, best_b = e[j], b[j]
            row = np.zeros(problem.num_inputs, dtype=bool)
            row[idx] = best_b.astype(bool)
            out[c] = row
        return out
