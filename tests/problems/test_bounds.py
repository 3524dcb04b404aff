"""The certified lower bound: below the exact optimum always, exact where the relaxation is."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qround import GridSpec, QroundError, RoundingProblem
from qround.problems import LowerBound, lower_bound
from qround.solvers import Exact

from ..conftest import correlated_hessian, make_problem


def _optimum(p):
    return Exact(max_free=12).solve(p).cost


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), per_channel=st.booleans(),
       bits=st.integers(2, 4), shift=st.sampled_from(["eigen", "none"]),
       max_iter=st.sampled_from([1, 7, 3000]), precision=st.sampled_from(["float32", "float64"]))
def test_bound_never_exceeds_the_exact_optimum(seed, n, per_channel, bits, shift, max_iter,
                                               precision):
    # also stopped after one or seven iterations: the certificate holds at every iterate
    p = make_problem(m=3, n=n, seed=seed, per_channel=per_channel, bits=bits, clip_some=n > 1)
    bound = lower_bound(p, shift=shift, max_iter=max_iter, precision=precision)
    opt = _optimum(p)
    tol = 1e-9 * (1 + np.abs(opt).max())
    assert np.all(bound.cost <= opt + tol), (bound.cost, opt)
    assert bound.ratio <= Exact(max_free=12).solve(p).ratio + 1e-9


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9), bits=st.integers(2, 4))
def test_bound_holds_for_asymmetric_targets_and_an_indefinite_hessian(seed, n, bits):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(3, n))
    x = rng.normal(size=(64, n))
    x_hat = x + 0.3 * rng.normal(size=x.shape)
    asym = RoundingProblem.from_weight(w, x_hat.T @ x_hat / 64, GridSpec(bits=bits),
                                       cross=x_hat.T @ x / 64, float_hessian=x.T @ x / 64)
    a = rng.normal(size=(n, n))
    indefinite = RoundingProblem.from_weight(w, a + a.T, GridSpec(bits=bits), check=False)
    for p in (asym, indefinite):
        opt = _optimum(p)
        for shift in ("eigen", "none"):
            for precision in ("float32", "float64"):
                bound = lower_bound(p, shift=shift, precision=precision)
                assert np.all(bound.cost <= opt + 1e-9 * (1 + np.abs(opt).max()))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), bits=st.integers(2, 4),
       c=st.floats(0.1, 10.0))
def test_eigen_shift_is_exact_for_a_multiple_of_the_identity(seed, n, bits, c):
    # H = c I: the shifted relaxation is linear, its box minimum a vertex: the optimum (RTN)
    rng = np.random.default_rng(seed)
    p = RoundingProblem.from_weight(rng.normal(size=(4, n)), c * np.eye(n), GridSpec(bits=bits))
    bound = lower_bound(p)
    np.testing.assert_allclose(bound.cost, p.rtn_costs(), rtol=1e-9, atol=1e-12)
    assert bound.certified_gap(p.rtn_costs()) == pytest.approx(0.0, abs=1e-6)


def test_unshifted_bound_is_zero_without_clipping_and_eigen_is_stronger():
    # no weight clips off the grid: the box holds the float weights, so the plain relaxation reaches 0;
    # a well-conditioned H makes the eigen shift's bound clearly positive
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    p = RoundingProblem.from_weight(0.1 * rng.normal(size=(5, 16)), x.T @ x / 400,
                                    GridSpec(bits=8, scale_method="minmax"))
    fixed = ~p.free   # minmax puts each channel's largest weight on the grid's end
    np.testing.assert_allclose(p.dequantize(p.rtn_choices())[fixed], p.weight[fixed])
    plain, eigen = lower_bound(p, shift="none"), lower_bound(p)
    assert plain.converged and eigen.converged
    np.testing.assert_allclose(plain.cost, 0.0, atol=1e-3 * p.rtn_costs().max())
    assert np.all(eigen.cost > 0.2 * p.rtn_costs())
    assert np.all(eigen.cost <= _optimum_sub(p) + 1e-12)


def _optimum_sub(p):
    return Exact(max_free=16).solve(p).cost


def test_bound_on_a_correlated_layer_is_between_zero_and_the_best_solution():
    rng = np.random.default_rng(3)
    p = RoundingProblem.from_weight(rng.normal(size=(6, 40)), correlated_hessian(40, rng),
                                    GridSpec(bits=3))
    bound = p.lower_bound()
    assert isinstance(bound, LowerBound) and bound.method == "eigen"
    best = __import__("qround").get_solver("quality").solve(p, seed=0)
    assert 0 < bound.total_cost <= best.total_cost
    assert np.all(bound.cost <= best.cost + 1e-12)
    assert np.all(bound.cost <= bound.relaxed_cost + 1e-12)   # certificate <= iterate's value
    gap = bound.certified_gap(best.cost)
    assert 0 <= gap < 1
    assert bound.certified_gap(p.rtn_costs()) == pytest.approx(1.0)
    assert bound.ratio == pytest.approx(bound.total_cost / p.rtn_costs().sum())
    assert "bound/RTN" in repr(bound)


def test_an_early_stop_is_reported_and_weaker():
    rng = np.random.default_rng(1)
    p = RoundingProblem.from_weight(rng.normal(size=(4, 60)), correlated_hessian(60, rng),
                                    GridSpec(bits=2))
    early, full = lower_bound(p, max_iter=2), lower_bound(p, rtol=1e-6)
    assert not early.converged and early.iterations == 2
    assert full.converged
    assert early.total_cost < full.total_cost
    assert "not converged" in repr(early)


@pytest.mark.parametrize("kwargs, message", [
    (dict(shift="sdp"), "shift must be one of"),
    (dict(max_iter=0), "max_iter must be an integer >= 1"),
    (dict(max_iter=True), "max_iter must be an integer >= 1"),
    (dict(max_iter=2.5), "max_iter must be an integer >= 1"),
    (dict(rtol=-1.0), "rtol must be a finite number >= 0"),
    (dict(rtol=float("nan")), "rtol must be a finite number >= 0"),
    (dict(check_every=0), "check_every must be an integer >= 1"),
    (dict(precision="float16"), "precision must be one of"),
    (dict(precision=np.float32), "precision must be one of"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(QroundError, match=message):
        lower_bound(make_problem(m=2, n=4), **kwargs)


def test_cli_solve_shows_the_bound_and_the_certified_gap(tmp_path, capsys):
    from qround.cli import main
    from qround.problems import save_layer_stats

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12))
    for name, rows in (("a", 5), ("b", 3)):
        save_layer_stats(tmp_path / f"{name}.npz", rng.normal(size=(rows, 12)), x.T @ x / 200,
                         bits=3)
    files = [str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]
    assert main(["solve", *files, "--solver", "exact", "--lower-bound", "--threads", "1"]) == 0
    table = capsys.readouterr().out
    assert "bound_ratio" in table and "certified_gap" in table
    assert main(["solve", *files, "--solver", "exact", "--lower-bound", "--json",
                 "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    for layer in out["layers"]:
        assert 0 < layer["bound_ratio"] <= layer["ratio"] + 1e-12
        assert 0 <= layer["certified_gap"] <= 1
    assert out["bound"] == pytest.approx(sum(la["bound"] for la in out["layers"]))
    assert 0 <= out["certified_gap"] <= 1
    assert main(["solve", *files, "--solver", "exact", "--threads", "1"]) == 0
    assert "bound_ratio" not in capsys.readouterr().out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9), dead=st.integers(1, 2),
       per_channel=st.booleans())
def test_dead_inputs_and_spread_diagonals_keep_the_bound_valid(seed, n, dead, per_channel):
    # inputs that never fire (a zero row and column of H) and outlier inputs (a diagonal
    # spread over 1e6): the diagonal metric of the iteration must stay finite and valid
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, n)) * np.geomspace(1e-3, 1e3, n)
    x[:, :min(dead, n - 1)] = 0.0
    h = x.T @ x / 64
    if per_channel:
        h = np.stack([h * rng.uniform(0.5, 2.0) for _ in range(3)])
    p = RoundingProblem.from_weight(rng.normal(size=(3, n)), h, GridSpec(bits=2))
    bound = lower_bound(p)
    assert np.all(np.isfinite(bound.cost))
    opt = _optimum(p)
    assert np.all(bound.cost <= opt + 1e-9 * (1 + np.abs(opt).max()))


@pytest.mark.parametrize("bits", [2, 4])
def test_float32_iterations_reach_the_float64_bound(bits):
    # the default float32 iterations, certified in float64, end where float64 ones do
    rng = np.random.default_rng(bits)
    p = RoundingProblem.from_weight(rng.normal(size=(8, 48)), correlated_hessian(48, rng),
                                    GridSpec(bits=bits))
    single, double = lower_bound(p), lower_bound(p, precision="float64")
    assert single.converged and double.converged
    span = p.rtn_costs().sum() - double.total_cost
    assert abs(single.total_cost - double.total_cost) <= 2e-3 * span
    assert single.total_cost <= _optimum_or_best(p)


def _optimum_or_best(p):
    return __import__("qround").get_solver("quality").solve(p, seed=0).total_cost


def test_magnitudes_float32_cannot_hold_go_on_in_float64():
    # a cross term 1e45 times H: the rescaled linear term overflows float32, so the
    # iterations run in float64 and give the float64 bound, below the exact optimum
    rng = np.random.default_rng(5)
    n = 8
    x = rng.normal(size=(64, n))
    h = x.T @ x / 64
    w = rng.normal(size=(3, n))
    p = RoundingProblem.from_weight(w, h, GridSpec(bits=3), cross=1e45 * np.eye(n),
                                    float_hessian=1e90 * np.eye(n))
    single, double = lower_bound(p), lower_bound(p, precision="float64")
    np.testing.assert_array_equal(single.cost, double.cost)
    assert single.iterations == double.iterations
    opt = _optimum(p)
    assert np.all(single.cost <= opt + 1e-9 * np.abs(opt).max())


def test_an_overflow_during_float32_iterations_goes_on_in_float64(monkeypatch):
    # the iterate turning non-finite (forced here) hands over to float64 from the last
    # certified iterate: the bound stays finite and valid
    from qround.problems import bounds

    rng = np.random.default_rng(2)
    p = RoundingProblem.from_weight(rng.normal(size=(4, 10)), correlated_hessian(10, rng),
                                    GridSpec(bits=2))
    made = []
    real_step = bounds._Iteration.step

    def step(self):
        real_step(self)
        if self.dtype == np.float32 and self.count == 30:
            self.x = np.full_like(self.x, np.inf)
        made.append(self.dtype)

    monkeypatch.setattr(bounds._Iteration, "step", step)
    bound = lower_bound(p, rtol=1e-9, max_iter=200)
    assert np.float32 in made and np.float64 in made
    assert made.index(np.float64) == 50        # handed over at the next check (every 25)
    assert np.all(np.isfinite(bound.cost))
    assert np.all(bound.cost <= _optimum(p) + 1e-9)
    assert bound.iterations > 50


def test_the_problem_method_passes_every_option():
    rng = np.random.default_rng(4)
    p = RoundingProblem.from_weight(rng.normal(size=(3, 12)), correlated_hessian(12, rng),
                                    GridSpec(bits=2))
    kw = dict(shift="none", max_iter=9, rtol=0.0, check_every=4, precision="float64")
    a, b = p.lower_bound(**kw), lower_bound(p, **kw)
    np.testing.assert_array_equal(a.cost, b.cost)
    assert (a.method, a.iterations) == ("none", 9)
    with pytest.raises(QroundError, match="precision must be one of"):
        p.lower_bound(precision="half")


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_a_zero_hessian_gives_finite_steps_and_no_warning(precision):
    # H = 0 (a channel's, or a linear objective from cross alone) made the diagonal metric's
    # step 1/0 (a RuntimeWarning in CI's hypothesis run); the bound is exact for a linear one
    import warnings

    rng = np.random.default_rng(0)
    w, x = rng.normal(size=(3, 5)), rng.normal(size=(50, 5))
    h = x.T @ x / 50
    per_channel = RoundingProblem.from_weight(w, np.stack([0 * h, h, 2 * h]), GridSpec(bits=3))
    linear = RoundingProblem.from_weight(w, 0 * h, GridSpec(bits=3), cross=h, float_hessian=h)
    for p in (per_channel, linear):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            bound = lower_bound(p, precision=precision)
        opt = _optimum(p)
        assert bound.converged and np.all(bound.cost <= opt + 1e-12)
    np.testing.assert_allclose(bound.cost, opt, rtol=1e-12)   # the linear one: a vertex
