"""Mutation-killing tests for qround/solvers/reference.py (Stochastic, Exact)."""
from __future__ import annotations

import numpy as np
import pytest

from qround import QroundError
from qround.solvers import Exact, Stochastic

from ..conftest import make_problem


def _stochastic_reference(p, samples, seed):
    """Best per channel of the start (RTN) and ``samples`` draws of P(up) = frac, drawn in one
    go from ``default_rng(seed)`` (the draws do not depend on the batch)."""
    cand = np.random.default_rng(seed).random((samples, *p.frac.shape)) < p.frac
    e = p.energies(cand)                                  # (samples, m)
    return np.minimum(p.rtn_energies(), e.min(axis=0))


@pytest.mark.parametrize("samples, batch", [(1, 16), (7, 3), (40, 16)])
def test_stochastic_keeps_the_best_draw_of_all_batches(samples, batch):
    p = make_problem(m=5, n=9, seed=11)
    sol = Stochastic(samples=samples, batch=batch).solve(p, seed=3)
    np.testing.assert_allclose(sol.energy, _stochastic_reference(p, samples, 3), atol=1e-12)
    # a draw worse than the start is never returned (not left to the base class's guard)
    assert "channels_kept_start" not in sol.info


def test_stochastic_default_is_64_samples():
    p = make_problem(m=6, n=10, seed=12)
    sol = Stochastic().solve(p, seed=5)
    np.testing.assert_allclose(sol.energy, _stochastic_reference(p, 64, 5), atol=1e-12)
    assert Stochastic().samples == 64 and Stochastic().batch == 16


def test_stochastic_batches_shrink_to_the_memory_bound(monkeypatch):
    from qround.solvers import reference

    p = make_problem(m=4, n=8, seed=5)
    one = 8 * 4 * 8
    monkeypatch.setattr(reference, "MAX_BATCH_BYTES", 3 * one)    # 3 samples per batch at most
    sizes = []
    real = type(p).energies

    def spy(self, b):
        b = np.asarray(b)
        if b.ndim == 3:
            sizes.append(b.shape[0])
        return real(self, b)

    monkeypatch.setattr(type(p), "energies", spy)
    Stochastic(samples=8, batch=16).solve(p, seed=0)
    assert sizes == [3, 3, 2]


@pytest.mark.parametrize("make", [lambda: Stochastic(samples=0), lambda: Stochastic(batch=0),
                                  lambda: Exact(max_free=0), lambda: Exact(max_free=31),
                                  lambda: Exact(block_bits=0), lambda: Exact(block_bits=21)])
def test_reference_solver_arguments_are_bounded(make):
    with pytest.raises(QroundError):
        make()


def test_exact_max_free_is_an_inclusive_limit_and_names_the_widest_channel():
    p = make_problem(m=3, n=9, seed=0, bits=3)   # free per channel: 8, 9, 8
    nfree = p.free.sum(axis=1)
    widest = int(np.argmax(nfree))
    k = int(nfree.max())
    assert widest != 0 and nfree[0] < k
    assert Exact(max_free=k).solve(p).ratio <= 1.0 + 1e-12       # k free: allowed
    with pytest.raises(QroundError, match=f"refuses channel {widest} with {k} free"):
        Exact(max_free=k - 1).solve(p)


def test_exact_default_max_free_takes_twenty():
    assert Exact().max_free == 20 and Exact().block_bits == 12
