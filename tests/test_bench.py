"""qround.bench: the GPTQ reference row's cost is on the same scale as the solvers', and the
benchmark on the user's layer statistics files measures what a direct solve gives."""
import json
import os

import numba
import numpy as np
import pytest

from qround.bench import BenchConfig, _gptq_reference_row, direct_cost, run, summarise
from qround.cli import main
from qround.errors import QroundError
from qround.grid import GridSpec, fit_grid
from qround.problems import RoundingProblem
from qround.problems.io import load_layer_stats, save_layer_stats
from qround.solvers import get_solver

from .conftest import correlated_hessian


def _problem(seed=0, bits=3):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, 12))
    h = correlated_hessian(12, rng)
    return RoundingProblem.from_weight(w, h, GridSpec(bits=bits)), w, h


def test_direct_cost_of_solver_codes_is_the_problem_cost():
    problem, w, h = _problem()
    rtn = problem.rtn_choices()
    assert np.isclose(direct_cost(problem, w, h, problem.codes(rtn)), problem.rtn_costs().sum(),
                      rtol=1e-9)
    b = np.random.default_rng(1).integers(0, 2, size=rtn.shape)
    assert np.isclose(direct_cost(problem, w, h, problem.codes(b)), problem.costs(b).sum(),
                      rtol=1e-9)


def test_gptq_reference_row_beats_rtn():
    problem, w, h = _problem(seed=2, bits=2)
    row = _gptq_reference_row("toy", 2, problem, w, h)
    assert row["solver"] == "gptq-reference" and row["seconds"] > 0
    assert 0 < row["ratio"] < 1


# ------------------------------------------------------------------ the benchmark on layer files
@pytest.fixture
def layer_files(tmp_path):
    """A file with scales fitted at 4 bits, one without scales (3 bits) and one with a
    per-channel hessian and the same layer name as the first."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(10, 20))
    h = correlated_hessian(20, rng)
    paths = [tmp_path / "scaled.npz", tmp_path / "plain.npz", tmp_path / "fisher.npz"]
    save_layer_stats(paths[0], w, h, bits=4, scale=fit_grid(w, GridSpec(bits=4)).scale,
                     name="toy")
    save_layer_stats(paths[1], w[:6], h, bits=3)
    save_layer_stats(paths[2], w[:6], np.stack([h * (1 + 0.1 * c) for c in range(6)]), bits=2,
                     name="toy")
    return paths


def _quick(paths, **kw):
    return BenchConfig(layer_files=tuple(map(str, paths)), minilm_layers=(), cnn_layers=0,
                       solvers=("nearest", "greedy", "fast"), subset_solvers=("meanfield",),
                       references=("neal",), ref_channels=4, **kw)


def test_bench_on_layer_files_measures_each_file_at_its_own_grid(layer_files):
    result = run(_quick(layer_files), progress=False)
    rows = {(r["layer"], r["bits"], r["solver"]): r for r in result["rows"]}
    # labels: the stored name, the stem when there is none, the path when a name repeats
    labels = ["toy", "plain", f"toy ({layer_files[2]})"]
    assert {(k[0], k[1]) for k in rows} == set(zip(labels, (4, 3, 2)))
    for label, path in zip(labels, layer_files):
        stats = load_layer_stats(path)
        problem = stats.problem()
        assert rows[label, stats.bits, "nearest"]["ratio"] == pytest.approx(1.0)
        # the row is what a direct solve of the file's problem gives (deterministic seed)
        direct = get_solver("fast").solve(problem, seed=0)
        assert rows[label, stats.bits, "fast"]["ratio"] == pytest.approx(direct.ratio, rel=1e-12)
        sub = get_solver("meanfield").solve(problem.subproblem(slice(0, 4)), seed=0)
        assert rows[label, stats.bits, "meanfield"]["sub_ratio"] == pytest.approx(sub.ratio)
        assert 0 < rows[label, stats.bits, "neal"]["sub_ratio"] < 1
    # the stored scales are used as given: RTN's cost is that of the file's grid
    stats = load_layer_stats(layer_files[0])
    assert np.array_equal(stats.problem().grid.scale, stats.scale)
    # unrestricted GPTQ runs where the file has a shared hessian, and says why not elsewhere
    assert 0 < rows["toy", 4, "gptq-reference"]["ratio"] < 1
    assert ("toy", 2, "gptq-reference") not in rows
    [skip] = [s for s in result["skipped"] if s["solver"] == "gptq-reference"]
    assert skip["layer"] == labels[2] and "per-channel hessian" in skip["reason"]
    assert {r["layer"] for r in result["exact"]} == set(labels)


def test_each_run_reports_its_own_skips_and_leaves_the_config_alone(layer_files):
    cfg = BenchConfig(layer_files=(str(layer_files[2]),), minilm_layers=(), cnn_layers=0,
                      solvers=("nearest",), subset_solvers=(), references=())
    before = dict(vars(cfg))
    first = run(cfg, progress=False)
    second = run(cfg, progress=False)
    assert len(first["skipped"]) == len(second["skipped"]) == 1   # gptq-reference, per channel H
    assert first["skipped"] is not second["skipped"] and dict(vars(cfg)) == before
    env = first["environment"]       # what it ran on, for comparing runs across machines
    assert env["numba"] == numba.__version__ and env["numpy"] == np.__version__
    assert set(env) >= {"processor", "cpus", "torch_cpu_capability"}
    if os.path.exists("/proc/cpuinfo"):   # Linux: the CPU's model name, not platform's ""
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        assert not names or not names[0] or env["processor"] == names[0]


def test_environment_facts_that_cannot_be_read_are_left_out(tmp_path, monkeypatch):
    import torch

    from qround.report import _cpu_model, _torch_cpu_capability, environment

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"   # aarch64 kernels: no model name line
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n")
    odd = tmp_path / "odd"
    odd.write_text("model name\nmodel name  :  \n")
    assert _cpu_model(str(x86)) == "Some CPU @ 2.0GHz"
    assert _cpu_model(str(arm)) is None and _cpu_model(str(odd)) is None
    assert _cpu_model(str(tmp_path / "missing")) is None and _cpu_model(str(tmp_path)) is None

    def broken():
        raise RuntimeError("cannot tell")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", broken)
    assert _torch_cpu_capability() is None
    assert environment()["torch_cpu_capability"] is None


def test_environment_records_the_thread_counts_in_effect():
    """The JSON of every benchmark names torch's and numba's threads (helper-160: end-to-end
    runs said "torch threads 1" while numba's kernels ran at their default of 2)."""
    import numba
    import torch

    from qround._parallel import cpu_threads
    from qround.report import environment

    with cpu_threads(1):
        assert environment()["threads"] == {"torch": 1, "numba": 1}
    if numba.config.NUMBA_NUM_THREADS >= 2:
        with cpu_threads(2):
            assert environment()["threads"] == {"torch": 2, "numba": 2}
    assert environment()["threads"]["torch"] == torch.get_num_threads()


def test_bench_on_layer_files_at_other_widths(layer_files):
    result = run(_quick(layer_files[1:2], bits=(2, 4)), progress=False)
    assert sorted({r["bits"] for r in result["rows"]}) == [2, 4]
    with pytest.raises(QroundError, match="fitted for 4 bits"):
        run(_quick(layer_files[:1], bits=(2,)), progress=False)


def test_cli_bench_on_layer_files_writes_table_json_and_plot(layer_files, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="writes a plot: needs matplotlib (examples extra)")
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    argv = ["bench", str(layer_files[1]), "--solvers", "nearest,fast", "--subset-solvers", "",
            "--references", "", "--ref-channels", "3", "--no-progress", "--json", str(out),
            "--plot", str(png)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "plain" in table and "minilm" not in table and "digits" not in table
    assert "slow_ratio" not in table  # no neal-10x ran: no columns to compare with it
    saved = json.loads(out.read_text())
    assert saved["config"]["layer_files"] == [str(layer_files[1])]
    assert {r["solver"] for r in saved["rows"]} == {"nearest", "fast", "gptq-reference",
                                                    "lower-bound"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, message", [
    (["--bits", "2"], "fitted for 4 bits"),
    (["--json", "{file}"], "same file as the input FILE"),
])
def test_cli_bench_on_layer_files_refuses_bad_requests_before_any_work(layer_files, extra,
                                                                       message, capsys):
    path = str(layer_files[0])
    argv = ["bench", path, "--no-progress"] + [x.format(file=path) for x in extra]
    before = layer_files[0].read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert layer_files[0].read_bytes() == before


def test_cli_bench_on_a_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope.npz"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_summary_shows_the_slow_subset_columns_only_beside_a_slow_reference():
    ours = {"layer": "l", "bits": 2, "solver": "fast", "kind": "ours", "ratio": 0.5,
            "slow_ratio": 0.4, "slow_s_per_ch": 0.01}
    slow = {"layer": "l", "bits": 2, "solver": "neal-10x", "kind": "reference",
            "slow_ratio": 0.45, "slow_s_per_ch": 1.0}
    result = {"rows": [ours], "exact": [], "skipped": []}
    assert "slow_ratio" not in summarise(result)
    assert "slow_ratio" in summarise({**result, "rows": [ours, slow]})


def test_the_plot_compares_solvers_on_the_same_channels_only(tmp_path):
    """It used to put whole-layer results of ours beside references on 4 or 16 channels."""
    pytest.importorskip("matplotlib", reason="writes a plot: needs matplotlib (examples extra)")
    from qround.bench import plot

    full_only = {"layer": "l", "bits": 2, "solver": "gptq-reference", "kind": "reference",
                 "ratio": 0.5, "seconds": 0.1, "shape": [8, 8]}
    with pytest.raises(QroundError, match="no rows to plot"):
        plot({"rows": [full_only], "config": {"ref_channels": 4}}, tmp_path / "a.png")
    both = {"layer": "l", "bits": 2, "solver": "fast", "kind": "ours", "ratio": 0.4,
            "seconds": 0.1, "sub_ratio": 0.45, "sub_s_per_ch": 0.001, "shape": [8, 8]}
    plot({"rows": [full_only, both], "config": {"ref_channels": 4}}, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_bench_takes_solver_options_with_commas(layer_files, capsys):
    assert main(["bench", str(layer_files[1]), "--solvers", "nearest,tabu(restarts=0,max_iter=5)",
                 "--subset-solvers", "none", "--references", "none", "--no-progress"]) == 0
    assert "tabu(restarts=0,max_iter=5)" in capsys.readouterr().out


def test_cli_bench_takes_none_for_an_empty_solver_list(layer_files, capsys):
    assert main(["bench", str(layer_files[1]), "--solvers", "nearest", "--subset-solvers",
                 "none", "--references", "none", "--no-progress"]) == 0
    assert "nearest" in capsys.readouterr().out


# ------------------------------------------------------------------- found by a review
@pytest.fixture
def relative_file(tmp_path):
    """A layer file with an asymmetric target (cross) and no float_hessian: costs relative,
    RTN's summed cost negative."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 16))
    h = correlated_hessian(16, rng)
    path = tmp_path / "rel.npz"
    save_layer_stats(path, w, h, bits=2, cross=h, name="rel")
    assert load_layer_stats(path).problem().rtn_costs().sum() < 0
    return path


def test_bench_on_relative_costs_writes_strict_json_finite_gaps_and_a_plot(relative_file,
                                                                           tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="writes a plot: needs matplotlib (examples extra)")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["bench", str(relative_file), "--solvers", "nearest,greedy,fast",
                 "--subset-solvers", "none", "--references", "none", "--ref-channels", "4",
                 "--no-progress", "--json", str(out), "--plot", str(png)]) == 0
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text      # strict JSON
    rows = {r["solver"]: r for r in json.loads(text)["rows"] if r["kind"] == "ours"}
    assert all(r["ratio"] is None for r in rows.values())    # no ratio of relative costs
    assert rows["nearest"]["gap_best"] == pytest.approx(1.0)  # (rtn - best) / (rtn - best)
    assert all(0 <= r["gap_best"] <= 1 for r in rows.values())
    assert min(r["gap_best"] for r in rows.values()) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["solve", str(relative_file), "--solver", "greedy", "--json"]) == 0
    solved = json.loads(capsys.readouterr().out)
    assert solved["ratio"] is None and solved["layers"][0]["ratio"] is None


def test_a_solver_given_twice_is_refused_before_any_work(layer_files, capsys):
    assert main(["bench", str(layer_files[1]), "--solvers", "nearest,tabu", "--subset-solvers",
                 "tabu", "--references", "none", "--no-progress"]) == 2
    assert "'tabu' is given twice (--solvers and --subset-solvers)" in capsys.readouterr().err


def test_bench_plot_without_matplotlib_is_refused_before_the_benchmark(monkeypatch, tmp_path,
                                                                        capsys):
    import sys

    from qround import bench
    from qround.cli import main

    monkeypatch.setattr(bench, "run", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("the benchmark started")))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["bench", "--plot", str(tmp_path / "p.png"), "--no-progress"]) == 2
    assert "plots need matplotlib" in capsys.readouterr().err
