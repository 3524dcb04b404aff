"""Steepest descent (``greedy``): the caller's start, max_iter and the default limit (tests
from mutation testing, helper-123)."""
from __future__ import annotations

import numpy as np

from qround.solvers import Greedy
from qround.solvers.local import steepest_descent

from ..conftest import make_problem


def test_a_float_start_is_not_written_into():
    # the descent flips a float copy in place: a float64 0/1 start must stay the caller's
    p = make_problem(m=5, n=12, seed=2)
    start = np.zeros(p.weight.shape)
    b, _ = steepest_descent(p, start)
    assert b.any()                        # it did flip something
    np.testing.assert_array_equal(start, 0.0)


def test_max_iter_limits_the_flips_of_each_channel():
    # from all zeros every channel needs several flips; max_iter=1 allows exactly one pass
    p = make_problem(m=6, n=12, seed=2)
    zeros = np.zeros(p.weight.shape, dtype=bool)
    full = Greedy().solve(p, init=zeros)
    assert (full.choices != zeros).sum(axis=1).min() >= 2
    one = Greedy(max_iter=1).solve(p, init=zeros)
    assert one.info["iterations"] == 1
    assert np.all((one.choices != zeros).sum(axis=1) == 1)


def test_the_default_limit_lets_a_long_descent_finish():
    # from all zeros on 40 inputs many channels need more than 10 flips: the default limit,
    # 10 n + 10, lets every channel reach a local minimum
    p = make_problem(m=6, n=40, seed=3, clip_some=False)
    zeros = np.zeros(p.weight.shape, dtype=bool)
    sol = Greedy().solve(p, init=zeros)
    assert (sol.choices != zeros).sum(axis=1).max() > 11
    deltas = p.flip_deltas(sol.choices)
    assert np.all(deltas[p.free] >= -1e-9 * np.abs(sol.energy).max())
