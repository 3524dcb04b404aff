"""Tests that kill the mutants of the float32 iterations of qround.problems.bounds that
tests/problems/test_bounds.py and test_bounds_mutants.py let survive (helper-173): the setup
fallback to float64, the hand-over after an overflow (from the last certified iterate, on the
same iteration budget, without numpy warnings), the check cadence, the adaptive restart's
speed and the rescaling of tiny weights."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from qround import GridSpec, RoundingProblem
from qround.problems import bounds, lower_bound

from ..conftest import correlated_hessian

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _problem(seed=0, m=8, n=64, bits=3, scale=1.0):
    rng = np.random.default_rng(seed)
    return RoundingProblem.from_weight(scale * rng.normal(size=(m, n)),
                                       correlated_hessian(n, rng), GridSpec(bits=bits))


def test_magnitudes_float32_cannot_hold_go_to_float64_at_once_and_quietly():
    # the rescaled linear term (1e40) overflows float32: the whole run is the float64 one,
    # from the first iteration (not after a wasted stretch of float32 NaNs), with no warning
    rng = np.random.default_rng(0)
    n = 24
    h = correlated_hessian(n, rng)
    p = RoundingProblem.from_weight(rng.normal(size=(3, n)), h, GridSpec(bits=3),
                                    cross=1e40 * h, float_hessian=1e80 * h)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single = lower_bound(p, rtol=1e-6)
    double = lower_bound(p, rtol=1e-6, precision="float64")
    assert single.converged and double.converged
    assert single.iterations == double.iterations
    np.testing.assert_array_equal(single.cost, double.cost)


def _spy(monkeypatch, overflow_at=None):
    """Records every step's dtype, every certified iterate (count, y) and every start point;
    ``overflow_at``: the float32 iterate turns infinite after that step."""
    log = dict(steps=[], checked=[], starts=[])
    real_step, real_current, real_start = (bounds._Iteration.step, bounds._Iteration.current,
                                           bounds._Iteration.start)

    def step(self):
        real_step(self)
        if overflow_at is not None and self.dtype == np.float32 and self.count == overflow_at:
            self.x = np.full_like(self.x, np.inf)
        log["steps"].append(self.dtype)

    def current(self):
        y = real_current(self)
        log["checked"].append((self.count, None if y is None else y.copy()))
        return y

    def start(self, y):
        log["starts"].append((self.dtype, np.array(y, copy=True)))
        real_start(self, y)

    monkeypatch.setattr(bounds._Iteration, "step", step)
    monkeypatch.setattr(bounds._Iteration, "current", current)
    monkeypatch.setattr(bounds._Iteration, "start", start)
    return log


def test_an_overflow_hands_over_at_the_last_certified_iterate_on_the_same_budget(monkeypatch):
    p = _problem(seed=2, m=4, n=10, bits=2)
    log = _spy(monkeypatch, overflow_at=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # inf - inf in float32: no warning
        bound = lower_bound(p, rtol=0.0, max_iter=200)
    assert len(log["steps"]) == 200                    # max_iter steps in all, not 50 + 200
    assert bound.iterations == 200 and not bound.converged
    assert log["steps"][:50] == [np.float32] * 50 and set(log["steps"][50:]) == {np.float64}
    # handed over at the check at 50, from the iterate certified at 25
    (c25, y25), = [(c, y) for c, y in log["checked"] if c == 25]
    assert [c for c, y in log["checked"] if y is None] == [50]
    assert [d for d, _ in log["starts"]] == [np.float32, np.float64]
    np.testing.assert_array_equal(log["starts"][1][1], y25)
    assert np.all(np.isfinite(bound.cost))


@pytest.mark.parametrize("max_iter, check_every, counts", [
    (10, 3, [3, 6, 9, 10]), (3, 10, [3]), (6, 3, [3, 6]), (1, 1, [1])])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_iterates_are_certified_at_multiples_of_check_every_and_at_max_iter(
        monkeypatch, max_iter, check_every, counts, precision):
    # (the check at 0 certifies the float weights themselves, without asking the iteration)
    p = _problem(seed=1, m=3, n=12, bits=2)
    log = _spy(monkeypatch)
    bound = lower_bound(p, rtol=0.0, max_iter=max_iter, check_every=check_every,
                        precision=precision)
    assert [c for c, _ in log["checked"]] == counts
    assert len(log["steps"]) == max_iter == bound.iterations


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_adaptive_restart_drops_momentum_only_uphill(precision):
    # 100-125 iterations with the restart as written; 600-875 with it inverted
    for seed in (0, 1):
        bound = lower_bound(_problem(seed=seed), rtol=1e-4, precision=precision)
        assert bound.converged and bound.iterations <= 300


def test_tiny_weights_are_rescaled_for_float32():
    # steps of 1e-46 underflow float32 unless the box is rescaled: the float32 iterations
    # reach the float64 bound in as many iterations
    p = _problem(seed=0, m=3, n=24, scale=1e-45)
    single, double = lower_bound(p), lower_bound(p, precision="float64")
    assert single.converged and single.iterations == double.iterations
    span = p.rtn_costs().sum() - double.total_cost
    assert abs(single.total_cost - double.total_cost) <= 1e-3 * span


def test_a_problem_whose_scales_underflow_gives_no_numpy_warning():
    # helper-173: max step * max|A| underflowed to 0 and the rescaling divided 0/0
    w = np.array([[0.3e-150, -0.7e-150, 1.1e-150]])
    p = RoundingProblem.from_weight(w, 1e-200 * np.eye(3), GridSpec(bits=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bound = lower_bound(p)
    assert np.all(bound.cost <= p.rtn_costs())


def test_the_first_check_certifies_the_float_weights_not_their_float32_rounding():
    # no weight clips: the float weights minimise the plain relaxation, so the certificate at
    # them is the bound; at their float32 rounding it was ~1e-6 of the span weaker
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    p = RoundingProblem.from_weight(0.1 * rng.normal(size=(5, 16)), x.T @ x / 400,
                                    GridSpec(bits=8, scale_method="minmax"))
    single = lower_bound(p, shift="none", max_iter=1)
    double = lower_bound(p, shift="none", max_iter=1, precision="float64")
    span = p.rtn_costs().sum() - double.total_cost
    assert abs(single.total_cost - double.total_cost) <= 1e-9 * span


@pytest.mark.parametrize("n", [48, 128])
def test_float32_round_off_does_not_keep_a_small_rtol_from_converging(n):
    # helper-173: at rtol 1e-7 float32 stalled for all 3000 iterations; it now goes on in
    # float64 after four checks without progress and converges
    rng = np.random.default_rng(0 if n == 48 else 1)
    p = RoundingProblem.from_weight(rng.normal(size=(8, n)), correlated_hessian(n, rng),
                                    GridSpec(bits=3))
    single = lower_bound(p, rtol=1e-7)
    double = lower_bound(p, rtol=1e-7, precision="float64")
    assert single.converged and double.converged
    assert single.iterations < 1000
    span = p.rtn_costs().sum() - double.total_cost
    assert abs(single.total_cost - double.total_cost) <= 1e-6 * span
