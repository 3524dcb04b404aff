"""qround.bench: behaviours no other test pinned (found by mutation testing).  Small layer
files only (8 x 10); no timing asserts."""
import dataclasses
import json

import numba
import numpy as np
import pytest
import torch

from qround.bench import (BenchConfig, _exact_gaps, _gap, _gptq_reference_row, _layer_rows,
                          _work, direct_cost, load_layer_files, parse_args, plot, run,
                          summarise)
from qround.cli import main
from qround.grid import GridSpec
from qround.problems import RoundingProblem
from qround.problems.io import load_layer_stats, save_layer_stats
from qround.solvers import DimodSolver, get_solver


def _hessian(n, rng, rows=128):
    mix = rng.normal(size=(n, n)) / np.sqrt(n) + np.eye(n)
    x = rng.standard_t(df=4, size=(rows, n)) @ mix
    x[:, 0] *= 8.0
    return x.T @ x / rows


@pytest.fixture
def plain_file(tmp_path):
    rng = np.random.default_rng(7)
    w = rng.normal(size=(8, 10))
    path = tmp_path / "plain.npz"
    save_layer_stats(path, w, _hessian(10, rng), bits=3, name="plain")
    return path


@pytest.fixture
def cross_file(tmp_path):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 10))
    h = _hessian(10, rng)
    path = tmp_path / "rel.npz"
    save_layer_stats(path, w, h, bits=2, cross=h, name="rel")
    return path


def _cfg(paths, **kw):
    base = dict(layer_files=tuple(map(str, paths)), minilm_layers=(), cnn_layers=0,
                solvers=("nearest",), subset_solvers=(), references=(), ref_channels=4)
    return BenchConfig(**{**base, **kw})


def _rows(result):
    return {(r["bits"], r["solver"]): r for r in result["rows"]}


# ------------------------------------------------------------------- layers, labels, work
def test_the_same_file_given_four_times_gets_four_labels(plain_file):
    labels = [label for label, _ in load_layer_files(_cfg([plain_file] * 4))]
    assert len(set(labels)) == 4
    assert labels == ["plain", f"plain ({plain_file})", f"plain ({plain_file}) #2",
                      f"plain ({plain_file}) #3"]


def test_packaged_layers_run_at_the_configured_bits_else_2_3_4():
    rng = np.random.default_rng(0)
    w, h = rng.normal(size=(3, 4)), np.eye(4)
    assert [x[1] for x in _work(BenchConfig(bits=(3,)), [("x", w, h)], [])] == [3]
    work = _work(BenchConfig(), [("x", w, h)], [])
    assert [x[1] for x in work] == [2, 3, 4]
    assert [make().grid.bits for _, _, make, _, _ in work] == [2, 3, 4]


def test_a_file_at_other_widths_is_solved_at_those_widths(plain_file):
    stats = load_layer_stats(plain_file)
    work = _work(_cfg([plain_file], bits=(2, 4)), [], load_layer_files(_cfg([plain_file])))
    assert [(b, make().grid.bits) for _, b, make, _, _ in work] == [(2, 2), (4, 4)]
    result = run(_cfg([plain_file], bits=(2, 4), solvers=("nearest", "fast")), progress=False)
    rows = _rows(result)
    for bits in (2, 4):
        direct = get_solver("fast").solve(stats.problem(bits=bits), seed=0)
        assert rows[bits, "fast"]["ratio"] == pytest.approx(direct.ratio, rel=1e-12)
    assert rows[2, "fast"]["ratio"] != pytest.approx(rows[4, "fast"]["ratio"])


def test_a_file_with_an_asymmetric_target_has_no_gptq_reference(cross_file):
    result = run(_cfg([cross_file]), progress=False)
    assert "gptq-reference" not in {r["solver"] for r in result["rows"]}
    [skip] = [s for s in result["skipped"] if s["solver"] == "gptq-reference"]
    assert "asymmetric target" in skip["reason"]


def test_no_gptq_reference_row_when_it_is_turned_off(plain_file):
    on = run(_cfg([plain_file]), progress=False)
    off = run(_cfg([plain_file], gptq_reference=False), progress=False)
    assert "gptq-reference" in {r["solver"] for r in on["rows"]}
    assert "gptq-reference" not in {r["solver"] for r in off["rows"]}
    assert not off["skipped"]


# ------------------------------------------------------------------- seeds and channel samples
def test_the_configured_seed_reaches_the_solvers(plain_file):
    problem = load_layer_stats(plain_file).problem()
    rows = _rows(run(_cfg([plain_file], solvers=("stochastic",), seed=5), progress=False))
    seeded = get_solver("stochastic").solve(problem, seed=5).ratio
    assert seeded != get_solver("stochastic").solve(problem, seed=0).ratio  # not vacuous
    assert rows[3, "stochastic"]["ratio"] == pytest.approx(seeded, rel=1e-12)


def test_ours_on_the_channel_samples_are_the_first_ref_and_slow_ref_channels(plain_file):
    problem = load_layer_stats(plain_file).problem()
    result = run(_cfg([plain_file], solvers=("stochastic",), ref_channels=4,
                      slow_ref_channels=2, seed=1), progress=False)
    row = _rows(result)[3, "stochastic"]
    solver = get_solver("stochastic")
    full = solver.solve(problem, seed=1).ratio
    sub = solver.solve(problem.subproblem(slice(0, 4)), seed=1).ratio
    slow = solver.solve(problem.subproblem(slice(0, 2)), seed=1).ratio
    assert len({round(full, 12), round(sub, 12), round(slow, 12)}) == 3   # not vacuous
    assert row["ratio"] == pytest.approx(full, rel=1e-12)
    assert row["sub_ratio"] == pytest.approx(sub, rel=1e-12)
    assert row["slow_ratio"] == pytest.approx(slow, rel=1e-12)


def test_references_run_on_the_ref_channels_and_kinds_are_labelled(plain_file):
    problem = load_layer_stats(plain_file).problem()
    result = run(_cfg([plain_file], subset_solvers=("meanfield",), references=("neal",),
                      ref_channels=4, slow_ref_channels=2), progress=False)
    rows = _rows(result)
    assert {s: rows[3, s]["kind"] for s in ("nearest", "meanfield", "neal")} == \
        {"nearest": "ours", "meanfield": "subset", "neal": "reference"}
    neal4 = DimodSolver("neal").solve(problem.subproblem(slice(0, 4)), seed=0).ratio
    neal2 = DimodSolver("neal").solve(problem.subproblem(slice(0, 2)), seed=0).ratio
    assert neal4 != pytest.approx(neal2)
    assert rows[3, "neal"]["sub_ratio"] == pytest.approx(neal4, rel=1e-12)
    # the exact sub-problems compare every solver, the subset ones and references included
    assert {r["solver"] for r in result["exact"]} == {"nearest", "meanfield", "neal",
                                                      "lower-bound"}


def test_the_lower_bound_row_is_below_every_solver_on_the_same_channels(plain_file):
    problem = load_layer_stats(plain_file).problem()
    result = run(_cfg([plain_file], solvers=("nearest", "fast"), references=("neal",),
                      ref_channels=4), progress=False)
    rows = _rows(result)
    bound = rows[3, "lower-bound"]
    assert bound["kind"] == "bound" and bound["converged"]
    assert bound["ratio"] == pytest.approx(problem.lower_bound().ratio, rel=1e-12)
    assert bound["sub_ratio"] == pytest.approx(
        problem.subproblem(slice(0, 4)).lower_bound().ratio, rel=1e-12)
    assert 0 < bound["ratio"] <= rows[3, "fast"]["ratio"]
    assert bound["sub_ratio"] <= min(rows[3, s]["sub_ratio"] for s in ("fast", "neal"))
    [exact_bound] = [r for r in result["exact"] if r["solver"] == "lower-bound"]
    assert exact_bound["gap_of_rtn_gap"] <= 0 and exact_bound["ratio"] <= exact_bound[
        "exact_ratio"] + 1e-12
    assert "lower-bound" in summarise(result)
    off = run(_cfg([plain_file], solvers=("nearest",), lower_bound=False), progress=False)
    assert "lower-bound" not in {r["solver"] for r in off["rows"] + off["exact"]}


@pytest.mark.parametrize("limit, runs", [(10, True), (9, False)])
def test_the_slow_reference_runs_up_to_its_input_limit_inclusive(plain_file, limit, runs):
    result = run(_cfg([plain_file], references=("neal-10x",), slow_ref_channels=1,
                      slow_ref_max_inputs=limit), progress=False)   # the file has n = 10
    rows = _rows(result)
    assert ((3, "neal-10x") in rows) == runs
    if runs:   # on the first slow_ref_channels channels, not the ref_channels ones
        from qround.bench import extra_solvers

        problem = load_layer_stats(plain_file).problem()
        slow = extra_solvers()["neal-10x"]
        one = slow.solve(problem.subproblem(slice(0, 1)), seed=0).ratio
        assert one != pytest.approx(slow.solve(problem.subproblem(slice(0, 4)), seed=0).ratio)
        assert rows[3, "neal-10x"]["slow_ratio"] == pytest.approx(one, rel=1e-12)
        assert "sub_ratio" not in rows[3, "neal-10x"]
    else:
        [skip] = [s for s in result["skipped"] if s["solver"] == "neal-10x"]
        assert "n=10 > 9" in skip["reason"]


def test_bench_gives_the_callers_thread_counts_back(plain_file):
    torch_before, numba_before = torch.get_num_threads(), numba.get_num_threads()
    want = 2 if torch_before == 1 else 1
    torch.set_num_threads(want)
    try:
        run(_cfg([plain_file], threads=1), progress=False)
        assert torch.get_num_threads() == want
        assert numba.get_num_threads() == numba_before
    finally:
        torch.set_num_threads(torch_before)


# ------------------------------------------------------------------- costs, gaps, rows
def test_gptq_reference_ratio_is_its_direct_cost_over_rtns(plain_file):
    from qround.baselines import gptq_quantize

    stats = load_layer_stats(plain_file)
    problem = stats.problem()
    row = _gptq_reference_row("x", 3, problem, stats.weight, stats.hessian)
    codes = gptq_quantize(stats.weight, stats.hessian, problem.grid)
    cost = direct_cost(problem, stats.weight, stats.hessian, codes)
    assert row["ratio"] == pytest.approx(cost / problem.rtn_costs().sum(), rel=1e-9)
    assert row["shape"] == [8, 10] and row["kind"] == "reference"


def test_gptq_reference_ratio_on_grid_weights_is_one(tmp_path):
    """Weights already on the grid: RTN's and GPTQ's costs are round-off (6e-16 and 0), which
    read 1.0 as Solution.ratio reads them, not 0.0 ("infinitely better than RTN")."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12))   # on x86-64 here: RTN 6e-16, GPTQ 0
    codes = rng.integers(-3, 4, size=(6, 12)).astype(float)
    scale = rng.uniform(0.05, 0.2, size=(6, 1))
    path = tmp_path / "on_grid.npz"
    save_layer_stats(path, codes * scale, x.T @ x / 64, bits=3, scale=scale)
    stats = load_layer_stats(path)
    row = _gptq_reference_row("x", 3, stats.problem(), stats.weight, stats.hessian)
    assert row["ratio"] == 1.0


def test_gap_to_the_best():
    assert _gap(1.5, 1.0, 2.0) == pytest.approx(0.5)
    assert _gap(0.0, 0.0, 0.0) == 0.0
    assert _gap(1.0, 0.0, 1.0) == float("inf")          # only the best costs nothing
    assert _gap(-1.0, -3.0, 1.0) == pytest.approx(0.5)  # relative costs: (c - b) / (rtn - b)
    assert _gap(-3.0, -3.0, 1.0) == 0.0


def _solution(problem, seconds, flip=0):
    b = problem.rtn_choices().copy()
    b[:, :flip] = ~b[:, :flip]
    sol = get_solver("nearest").solve(problem)
    from qround.solvers.base import make_solution
    return dataclasses.replace(make_solution(problem, b, seconds, "x"), solver=sol.solver)


def test_layer_rows_per_channel_seconds_and_gaps_per_sample():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 6))
    p = RoundingProblem.from_weight(w, _hessian(6, rng), GridSpec(bits=3))
    sub, slow = p.subproblem(slice(0, 4)), p.subproblem(slice(0, 2))
    best_sub = get_solver("greedy").solve(sub, seed=0)
    a_slow = _solution(slow, 3.0, flip=1)
    results = {
        "a": dict(full=None, sub=dataclasses.replace(best_sub, seconds=2.0), slow=a_slow,
                  kind="ours"),
        "b": dict(full=None, sub=None, slow=_solution(slow, 1.0, flip=2), kind="reference"),
    }
    rows = {r["solver"]: r for r in _layer_rows("l", 3, (4, 6), results, None)}
    assert rows["a"]["sub_s_per_ch"] == pytest.approx(0.5)
    assert rows["a"]["slow_s_per_ch"] == pytest.approx(1.5)
    assert rows["a"]["sub_gap_best"] == 0.0
    best_slow = min(a_slow.total_cost, results["b"]["slow"].total_cost)
    assert best_slow != pytest.approx(best_sub.total_cost)   # the two samples' bests differ
    assert rows["a"]["slow_gap_best"] == pytest.approx(a_slow.total_cost / best_slow - 1)
    assert rows["b"]["kind"] == "reference" and "sub_ratio" not in rows["b"]


# ------------------------------------------------------------------- exact sub-problems
def test_exact_gaps_are_reproducible_and_sized_as_configured():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(12, 20))
    p = RoundingProblem.from_weight(w, _hessian(20, rng), GridSpec(bits=2))
    cfg = BenchConfig(exact_channels=5, exact_inputs=6, seed=3)
    solvers = {"nearest": get_solver("nearest"), "stochastic": get_solver("stochastic")}
    first = _exact_gaps("l", p, solvers, cfg)
    second = _exact_gaps("l", p, solvers, cfg)
    assert first == second
    rows = {r["solver"]: r for r in first}
    assert rows["nearest"]["channels"] == 5
    assert rows["nearest"]["ratio"] == 1.0
    assert rows["nearest"]["gap_of_rtn_gap"] == pytest.approx(1.0)   # RTN's gap is RTN's gap
    assert 0 <= rows["stochastic"]["optimal_channels"] <= 5
    # all of a small layer's inputs when exact_inputs exceeds them: the gap is then that of
    # the whole channel, so an exact solver is optimal on every channel
    q = RoundingProblem.from_weight(w[:, :6], _hessian(6, rng), GridSpec(bits=2))
    cfg = BenchConfig(exact_channels=12, exact_inputs=16, seed=0)
    row, bound = _exact_gaps("l", q, {"exact": get_solver("exact")}, cfg)
    assert bound["solver"] == "lower-bound" and bound["gap_of_rtn_gap"] <= 0
    assert bound["optimal_channels"] <= row["optimal_channels"] == 12
    chans = np.arange(12)
    whole = get_solver("exact").solve(q.subproblem(chans))
    assert row["exact_ratio"] == pytest.approx(whole.ratio, rel=1e-9)


# ------------------------------------------------------------------- summary, plot, CLI
def test_summary_sums_exact_channels_over_layers_and_lists_skips():
    ex = [{"solver": "s", "optimal_channels": 3, "channels": 8, "gap_of_rtn_gap": 0.1},
          {"solver": "s", "optimal_channels": 5, "channels": 8, "gap_of_rtn_gap": 0.3}]
    skipped = [{"solver": "neal", "reason": "no dimod"}]
    text = summarise({"rows": [], "exact": ex, "skipped": skipped})
    assert "8/16" in text and "0.2000" in text
    assert "skipped:" in text and "no dimod" in text


def test_plot_puts_each_layer_and_width_on_its_own_axes(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="needs matplotlib (examples extra)")
    import qround.report

    figs = []
    monkeypatch.setattr(qround.report, "save_figure_atomic",
                        lambda fig, path, what="plot": figs.append(fig))
    row = {"kind": "ours", "sub_s_per_ch": 0.01, "shape": [8, 8]}
    rows = [{**row, "layer": "a", "bits": 2, "solver": "x", "sub_ratio": 0.5},
            {**row, "layer": "a", "bits": 2, "solver": "y", "sub_ratio": 0.6},
            {**row, "layer": "b", "bits": 3, "solver": "x", "sub_ratio": 0.7}]
    plot({"rows": rows, "config": {"ref_channels": 4}}, tmp_path / "p.png")
    [fig] = figs
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["a W2, 4 channels", "b W3, 4 channels"]
    assert [len(ax.collections) for ax in axes] == [2, 1]


def test_cli_passes_seed_and_slow_ref_channels_and_defaults(plain_file, tmp_path, capsys):
    assert parse_args([]).ref_channels == 16 and parse_args([]).slow_ref_channels == 4
    out = tmp_path / "r.json"
    assert main(["bench", str(plain_file), "--solvers", "nearest", "--subset-solvers", "none",
                 "--references", "none", "--seed", "3", "--slow-ref-channels", "2",
                 "--ref-channels", "5", "--no-progress", "--json", str(out)]) == 0
    config = json.loads(out.read_text())["config"]
    assert (config["seed"], config["slow_ref_channels"], config["ref_channels"]) == (3, 2, 5)


# ------------------------------------------------------------------- timing
def test_every_problem_is_prepared_before_any_solver_is_timed_on_it(plain_file, monkeypatch):
    """The first solver on a shared problem used to pay for the RTN energies and the cost
    round-off that the others then read from its cache (helper-160: `fast` timed below `gptq`
    whenever `gptq` ran first)."""
    import qround.bench as bench

    events = []
    real_solve = bench._solve

    def solve(solver, problem, seed):
        events.append(("solve", set(problem._cache) >= {"rtn_energies", "rtn_costs",
                                                       "cost_noise"}))
        return real_solve(solver, problem, seed)

    monkeypatch.setattr(bench, "_solve", solve)
    run(_cfg([plain_file], solvers=("gptq", "fast"), references=(), subset_solvers=()),
        progress=False)
    assert events and all(ready for _, ready in events)


def test_prepare_fills_what_solvers_cache():
    from qround.solvers.base import prepare

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    p = RoundingProblem.from_weight(rng.normal(size=(3, 6)), x.T @ x / 40, GridSpec(bits=3))
    assert not p._cache
    assert prepare(p) is p
    assert set(p._cache) == {"rtn_energies", "rtn_costs", "cost_noise"}
    before = dict(p._cache)
    get_solver("greedy").solve(p, seed=0)
    assert all(p._cache[k] is before[k] for k in before)   # read, not recomputed
