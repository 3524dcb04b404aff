"""Tests that kill the mutants of qround.solvers.sampler._default_beta_range (the numpy version
of dwave-samplers' default_beta_range) that tests/solvers/test_sampler.py lets survive
(helper-173): biases whose temperatures overflow or underflow float64 anneal at (1, 1), as
the earlier dwave-backed version did, without a numpy warning."""
from __future__ import annotations

import warnings

import dimod
import numpy as np
import pytest

from qround.solvers import QroundSampler
from qround.solvers.sampler import _default_beta_range, qubo_vectors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("linear, quadratic", [
    ({0: 5e-324, 1: 1e-323}, {(0, 1): 2e-323}),     # cold beta overflows
    ({0: 1.0, 1: 1.0}, {(0, 1): 1e-322}),           # a denormal coupling: cold beta overflows
    ({0: 1e-310, 1: 0.0, 2: -3e-310}, {}),          # denormal linear terms only
])
def test_temperatures_float64_cannot_hold_give_beta_one_without_warnings(linear, quadratic):
    bqm = dimod.BQM(linear, quadratic, 0.0, "BINARY")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _default_beta_range(*qubo_vectors(bqm, list(bqm.variables))[:4]) == (1.0, 1.0)
        QroundSampler("anneal").sample(bqm, num_reads=2, seed=0, num_sweeps=10)


def test_huge_biases_keep_dwaves_numbers_without_warnings():
    from dwave.samplers.sa.sampler import default_beta_range

    bqm = dimod.BQM({0: 1e307, 1: -1e307}, {(0, 1): 1e307}, 0.0, "SPIN")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _default_beta_range(*qubo_vectors(bqm, list(bqm.variables))[:4])
        QroundSampler("anneal").sample(bqm, num_reads=2, seed=0, num_sweeps=10)
    want = [float(b) for b in default_beta_range(bqm.change_vartype("BINARY", inplace=False))]
    assert list(got) == want and np.all(np.isfinite(got))
