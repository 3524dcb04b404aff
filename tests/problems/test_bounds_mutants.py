"""Tests that kill the mutants of qround.problems.bounds and its cli/bench callers that
tests/problems/test_bounds.py and tests/test_bench_checks.py let survive (helper-170), and
the three reporting defects it found (fixed)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from qround import GridSpec, RoundingProblem
from qround.bench import BenchConfig, _bound_row, _exact_gaps, plot
from qround.problems import lower_bound
from qround.solvers import Exact, get_solver

from ..conftest import correlated_hessian


def _correlated(seed=1, m=4, n=60, bits=2):
    rng = np.random.default_rng(seed)
    return RoundingProblem.from_weight(rng.normal(size=(m, n)), correlated_hessian(n, rng),
                                       GridSpec(bits=bits))


def test_the_margin_is_taken_below_the_smallest_eigenvalue():
    # H = diag(1e13, I): the margin 8 n eps max|eig| (~0.9 here) is large; taken above
    # lambda_min instead of below it, the relaxation is concave on the free block and the start
    # point's tangent plane lies above the optimum.  Weight 0 sits on the grid's end (fixed), so
    # the free block is separable and its optimum is each weight's better side.
    n = 50
    h = np.eye(n)
    h[0, 0] = 1e13
    k = np.random.default_rng(0).integers(-3, 2, size=n).astype(float)
    s = 1.0 / 3.0
    w, t = (k + 0.3) * s, (k + 0.68) * s
    w[0] = t[0] = 1.0
    p = RoundingProblem.from_weight(w[None], h, GridSpec(bits=3, scale_method="minmax"),
                                    cross=np.diag(np.r_[1e13, t[1:] / w[1:]]), float_hessian=h)
    assert (~p.free).sum() == 1 and p.scale[0, 0] == pytest.approx(s)
    best = ((p.step ** 2 + p.grad * p.step) < 0) & p.free
    opt = p.costs(best)
    assert opt[0] < p.rtn_costs()[0] - 1.0       # the cap at RTN cannot hide a violation
    assert np.all(p.lower_bound().cost <= opt + 1e-9 * abs(opt[0]))


def test_the_bound_never_exceeds_rtn_even_by_round_off():
    # H = c I: the eigen bound is exact, so the certificate meets RTN's cost up to its last bits
    for seed in range(40):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(1, 30))
        p = RoundingProblem.from_weight(rng.normal(size=(8, n)), rng.uniform(0.1, 10) * np.eye(n),
                                        GridSpec(bits=int(rng.integers(2, 5))))
        assert np.all(p.lower_bound().cost <= p.rtn_costs())


def test_the_plain_relaxation_stops_at_once_at_the_float_weights():
    # no weight clips: the box holds the float weights, the start point, where the plain
    # relaxation's certificate is already exact
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    p = RoundingProblem.from_weight(0.1 * rng.normal(size=(5, 16)), x.T @ x / 400,
                                    GridSpec(bits=8, scale_method="minmax"))
    plain = lower_bound(p, shift="none")
    assert plain.converged and plain.iterations == 0


def test_adaptive_restart_keeps_convergence_fast():
    p = _correlated()
    bound = lower_bound(p, rtol=1e-6)
    assert bound.converged and bound.iterations <= 1000   # 500 with restarts, 2800 without


def test_the_best_certificate_over_the_run_is_kept():
    # check_every only chooses which iterates are certified (the trajectory is the same with
    # rtol=0): certifying every iterate can never give a lower bound than certifying a few
    p = _correlated()
    for k in range(5, 120, 7):
        every = lower_bound(p, max_iter=k, check_every=1, rtol=0).cost
        for c in (3, 10):
            assert np.all(every >= lower_bound(p, max_iter=k, check_every=c, rtol=0).cost - 1e-12)


def test_the_last_iterate_is_certified_too():
    # with no check after the start, only the final certificate can improve on the start's
    p = _correlated()
    one = lower_bound(p, max_iter=1, check_every=10**6)
    far = lower_bound(p, max_iter=300, check_every=10**6)
    assert far.total_cost > one.total_cost + 1.0


def test_certified_gap_of_a_cost_below_the_bound_is_zero():
    p = _correlated(n=20)
    bound = p.lower_bound()
    assert bound.certified_gap(bound.cost) == 0.0
    assert bound.certified_gap(bound.cost - 1.0) == 0.0


def test_cli_certified_gap_and_bound_ratio_are_of_the_solution_and_the_totals(tmp_path, capsys):
    from qround.cli import main
    from qround.problems import load_layer_stats, save_layer_stats

    rng = np.random.default_rng(0)
    files = []
    for name, rows in (("a", 5), ("b", 3)):
        save_layer_stats(tmp_path / f"{name}.npz", rng.normal(size=(rows, 10)),
                         correlated_hessian(10, rng), bits=2)
        files.append(str(tmp_path / f"{name}.npz"))
    assert main(["solve", *files, "--solver", "exact", "--lower-bound", "--json",
                 "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    for f, layer in zip(files, out["layers"]):
        p = load_layer_stats(f).problem()
        bound = p.lower_bound()
        assert layer["certified_gap"] == pytest.approx(
            bound.certified_gap(Exact().solve(p).cost), rel=1e-9)
        assert layer["certified_gap"] < 1   # exact beats RTN here: not RTN's own gap
    assert out["bound_ratio"] == pytest.approx(out["bound"] / out["rtn_cost"], rel=1e-12)
    assert out["certified_gap"] == pytest.approx(
        (out["cost"] - out["bound"]) / (out["rtn_cost"] - out["bound"]), rel=1e-12)


def test_bound_row_converged_needs_both_and_time_is_per_channel(monkeypatch):
    p = _correlated(m=6, n=12)
    sub = p.subproblem(slice(0, 3))
    real = RoundingProblem.lower_bound

    def fake(self, **kw):
        b = real(self, **kw)
        # the whole layer's bound stops early; every bound takes 1.5 s
        return dataclasses.replace(b, seconds=1.5, converged=self.num_channels != 6)

    monkeypatch.setattr(RoundingProblem, "lower_bound", fake)
    row = _bound_row("l", 2, p, sub)
    assert row["converged"] is False
    assert row["sub_s_per_ch"] == pytest.approx(0.5)


def test_exact_gaps_bound_row_is_the_restricted_problems_bound():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(12, 20))
    p = RoundingProblem.from_weight(w, correlated_hessian(20, rng), GridSpec(bits=2))
    cfg = BenchConfig(exact_channels=5, exact_inputs=6, seed=3)
    rows = _exact_gaps("l", p, {"nearest": get_solver("nearest")}, cfg)
    [row] = [r for r in rows if r["solver"] == "lower-bound"]
    # the same sub-problem as _exact_gaps cuts
    r2 = np.random.default_rng(cfg.seed)
    chans = np.sort(r2.choice(12, size=5, replace=False))
    base = p.subproblem(chans)
    small = base.restrict(np.sort(r2.choice(20, size=6, replace=False)), base.rtn_choices())
    bound, opt = small.lower_bound(), Exact().solve(small)
    assert row["ratio"] == pytest.approx(bound.ratio, rel=1e-12)
    tol = 1e-9 * np.abs(opt.energy).max()
    assert row["optimal_channels"] == int(np.sum(bound.cost >= opt.cost - tol)) < 5


def test_plot_draws_the_bound_as_a_line_not_a_point(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="needs matplotlib (examples extra)")
    import qround.report

    figs = []
    monkeypatch.setattr(qround.report, "save_figure_atomic",
                        lambda fig, path, what="plot": figs.append(fig))
    row = {"sub_s_per_ch": 0.01, "shape": [8, 8], "layer": "a", "bits": 2}
    rows = [{**row, "kind": "ours", "solver": "x", "sub_ratio": 0.5},
            {**row, "kind": "bound", "solver": "lower-bound", "sub_ratio": 0.2}]
    plot({"rows": rows, "config": {"ref_channels": 4}}, tmp_path / "p.png")
    [fig] = figs
    [ax] = [ax for ax in fig.axes if ax.get_title()]
    assert len(ax.collections) == 1
    assert [tuple(line.get_ydata()) for line in ax.lines] == [(0.2, 0.2)]


# ------------------------------------------------------------------ defects found, fixed
def test_certified_gap_of_a_worse_solution_is_not_zero_when_the_bound_is_rtn():
    rng = np.random.default_rng(0)
    p = RoundingProblem.from_weight(rng.normal(size=(4, 12)), np.eye(12), GridSpec(bits=3))
    bound = p.lower_bound()
    worse = p.costs(~p.rtn_choices() & p.free)
    assert np.allclose(bound.cost, p.rtn_costs()) and worse.sum() > 7 * p.rtn_costs().sum()
    assert bound.certified_gap(worse) == float("inf")   # RTN is proven optimal
    assert bound.certified_gap(p.rtn_costs()) == 0.0


def test_relaxed_cost_is_a_box_value_and_converged_means_within_rtol():
    rng = np.random.default_rng(11)
    n, m = int(rng.integers(2, 30)), int(rng.integers(1, 4))
    p = RoundingProblem.from_weight(rng.normal(size=(m, n)), correlated_hessian(n, rng),
                                    GridSpec(bits=int(rng.integers(2, 5))))
    b = lower_bound(p, check_every=1)
    ref = lower_bound(p, rtol=0, max_iter=20000)      # relaxed_cost: ~ the relaxation's minimum
    assert b.converged
    assert np.all(b.relaxed_cost >= b.cost)
    span = p.rtn_costs().sum() - b.total_cost
    assert ref.relaxed_cost.sum() - b.total_cost <= 1e-3 * span


def test_cli_solve_refuses_a_bound_with_refits(tmp_path, capsys):
    # the bound holds for the final grid, the ratio is against the first grid's RTN
    from qround.cli import main
    from qround.problems import save_layer_stats

    rng = np.random.default_rng(0)
    save_layer_stats(tmp_path / "a.npz", rng.normal(size=(3, 6)), np.eye(6), bits=3)
    assert main(["solve", str(tmp_path / "a.npz"), "--lower-bound", "--refits", "2",
                 "--threads", "1"]) == 2
    assert "--lower-bound bounds the roundings on one grid" in capsys.readouterr().err
