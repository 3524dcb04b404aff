"""GPTQ: its damping retries, its defaults and the inputs it must leave alone (tests from mutation
testing, helper-127)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qround import QroundError
from qround.solvers import GPTQ
from qround.solvers.gptq import inverse_cholesky, round_columns

from ..conftest import make_problem


def _indefinite():
    """Mean diagonal 1, smallest eigenvalue -1e-3: a factorisation needs lambda > 1e-3."""
    return torch.tensor([[1.0, 1.001], [1.001, 1.0]], dtype=torch.float64)


def test_damping_grows_tenfold_per_retry():
    _, _, lam = inverse_cholesky(_indefinite(), 1e-4, retries=4)
    assert lam == pytest.approx(1e-2)        # 1e-4 and 1e-3 fail, 1e-2 factors
    _, _, lam = inverse_cholesky(_indefinite(), 1e-4, retries=2)
    assert lam == pytest.approx(1e-2)        # the last retry allowed is still tried
    with pytest.raises(QroundError, match="after 1 retries"):
        inverse_cholesky(_indefinite(), 1e-4, retries=1)


def test_no_retries_still_factors_a_good_hessian():
    p = make_problem(m=4, n=10, seed=1)
    sol = GPTQ(retries=0).solve(p)
    assert sol.info["damping"] == pytest.approx(0.01 * np.mean(np.diag(p.hessian)))
    np.testing.assert_array_equal(sol.choices, GPTQ().solve(p).choices)


def test_inverse_cholesky_leaves_its_hessian_alone():
    h = torch.diag(torch.tensor([4.0, 0.0, 2.0], dtype=torch.float64))   # a dead input
    h[0, 2] = h[2, 0] = 1.0
    before = h.clone()
    inverse_cholesky(h, 0.01)
    torch.testing.assert_close(h, before, rtol=0, atol=0)


def test_round_columns_leaves_its_target_alone():
    p = make_problem(m=5, n=12, seed=2)
    h = torch.as_tensor(np.array(p.hessian))
    upper = inverse_cholesky(h, 0.01)[0]

    def t(a):
        return torch.as_tensor(np.ascontiguousarray(a.T))

    target = t(p.weight)                      # (n, m), already contiguous: no implicit copy
    before = target.clone()
    for compiled in (True, False):
        round_columns(target, t(p.scale * (p.floor_codes - p.zero_point)), t(p.step), upper,
                      block=4, compiled=compiled)
        torch.testing.assert_close(target, before, rtol=0, atol=0)


def test_per_channel_damping_reports_the_largest():
    """A per-channel H is factored channel by channel: info['damping'] is the largest used."""
    p = make_problem(m=3, n=8, seed=0, per_channel=True)
    lams = [0.01 * np.mean(np.diag(h)) for h in p.hessian]
    assert lams[1] > 2 * max(lams[0], lams[2])     # the second channel's is the largest
    assert GPTQ().solve(p).info["damping"] == pytest.approx(lams[1])


def test_defaults():
    g = GPTQ()
    assert g.parameters == dict(act_order=True, damp=0.01, retries=4, block=128, device="cpu",
                                dtype=None)


def test_act_order_is_the_default_and_changes_the_choices():
    p = make_problem(m=16, n=24, seed=4)
    default = GPTQ().solve(p).choices
    np.testing.assert_array_equal(default, GPTQ(act_order=True).solve(p).choices)
    assert not np.array_equal(default, GPTQ(act_order=False).solve(p).choices)
