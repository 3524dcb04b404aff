"""Mean-field annealing (``meanfield``): the start kept, the last step evaluated, the beta
bounds and the default dtype (tests from mutation testing, helper-123)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qround import QroundError, get_solver
from qround.solvers import MeanField
from qround.solvers import _torch as qt
from qround.solvers.meanfield import anneal_means

from .test_gptq import make_problem


def _energies(p, best):
    return p.energies(best.numpy().astype(bool))


def test_anneal_means_keeps_a_start_it_cannot_beat():
    # the best seen includes the start: from the exact optimum nothing is better
    p = make_problem(m=6, n=10, seed=3)
    exact = get_solver("exact").solve(p)
    tp = qt.to_torch(p, "cpu", torch.float64)
    start = torch.as_tensor(exact.choices, dtype=torch.float64)
    best, _ = anneal_means(tp, start, MeanField(iterations=30).betas(), 0.02, 10)
    np.testing.assert_array_equal(best.numpy().astype(bool), exact.choices)


def test_the_last_step_is_evaluated_when_it_is_not_a_multiple_of_eval_every():
    # eval_every above the number of steps: the only evaluation is the one after the last
    # step; from the all-zeros start (far from the optimum) it must be taken
    p = make_problem(m=6, n=10, seed=3)
    tp = qt.to_torch(p, "cpu", torch.float64)
    zeros = torch.zeros(p.weight.shape, dtype=torch.float64)
    betas = MeanField(iterations=50).betas()
    best, v = anneal_means(tp, zeros, betas, 0.02, 1000)
    rounded = (v >= 0.5).numpy() & p.free
    assert np.all(_energies(p, best) < p.energies(np.zeros(p.weight.shape, dtype=bool)))
    np.testing.assert_array_equal(best.numpy().astype(bool), rounded)


def test_the_means_start_at_the_fractional_parts():
    # one tiny step at a tiny beta hardly moves the means: rounded, they are RTN
    p = make_problem(m=6, n=10, seed=3)
    tp = qt.to_torch(p, "cpu", torch.float64)
    zeros = torch.zeros(p.weight.shape, dtype=torch.float64)
    _, v = anneal_means(tp, zeros, [1e-6], 1e-6, 1)
    np.testing.assert_allclose(v.numpy(), p.frac * p.free, atol=1e-6)


@pytest.mark.parametrize("beta", [(1e-9, 10.0), (1.0, 1e9)])
def test_beta_outside_the_float32_safe_range_is_refused(beta):
    with pytest.raises(QroundError, match=r"beta must lie in \[1e-8, 1e8\]"):
        MeanField(beta=beta)
    MeanField(beta=(1e-8, 1e8))   # the bounds themselves are fine


def test_default_dtype_is_float32():
    p = make_problem(m=6, n=20, seed=5)
    assert MeanField().dtype == "float32"
    np.testing.assert_array_equal(MeanField(iterations=60).solve(p, seed=0).choices,
                                  MeanField(iterations=60, dtype="float32").solve(p, seed=0)
                                  .choices)
