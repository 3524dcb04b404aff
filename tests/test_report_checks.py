"""qround.report: behaviours no other test pinned (found by mutation testing)."""
import json
import math

import numpy as np

from qround.grid import GridSpec
from qround.problems import RoundingProblem
from qround.report import (SolveRecord, format_table, json_text, totals, write_npz_atomic,
                           write_text_atomic)
from qround.solvers import get_solver


def _lines(text):
    return text.splitlines()


def test_table_of_no_rows():
    assert format_table([]) == "(no rows)"
    assert format_table([], ["a", "b"]) == "(no rows)"


def test_table_number_formats():
    rows = [{"x": 0.5, "y": 12345.678, "z": 1234.56789, "n": 3, "s": (2, 3)}]
    [_, _, body] = _lines(format_table(rows, significant=("z",)))
    assert body.split() == ["0.5000", "1.235e+04", "1234.57", "3", "2x3"]
    [_, _, body] = _lines(format_table([{"z": 1234.56789, "t": 0.0001}]))
    assert body.split() == ["1234.5679", "0.0001"]


def test_table_aligns_numbers_right_and_text_left():
    rows = [{"name": "a", "n": 1, "mixed": "x"}, {"name": "bbbb", "n": 100, "mixed": 2}]
    head, rule, first, second = _lines(format_table(rows))
    assert head == "name    n  mixed"
    assert rule == "----  ---  -----"
    assert first == "a       1  x"          # trailing blanks stripped
    assert second == "bbbb  100  2"


def _solution(seconds=0.0):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 8))
    x = rng.standard_t(df=4, size=(64, 8)) @ (rng.normal(size=(8, 8)) / 3 + np.eye(8))
    x[:, 0] *= 8.0
    p = RoundingProblem.from_weight(w, x.T @ x / 64, GridSpec(bits=2))
    return get_solver("greedy").solve(p, seed=0)


def test_solve_record_from_a_solution():
    sol = _solution()
    rec = SolveRecord.from_solution("layer", sol)
    assert rec.cost == sol.total_cost and rec.rtn_cost == sol.total_rtn_cost
    assert rec.cost < rec.rtn_cost            # greedy beats RTN: the two are not swapped
    assert rec.channels == 3 and rec.shape == (3, 8) and rec.ratio == sol.ratio
    assert rec.as_dict()["shape"] == [3, 8] and rec.as_dict()["layer"] == "layer"


def _rec(cost, rtn, seconds):
    return SolveRecord("l", (1, 1), "s", cost, rtn, cost / rtn if rtn else 1.0, seconds, 1)


def test_totals_sum_costs_and_seconds_and_ratio_like_solution():
    t = totals([_rec(1.0, 2.0, 0.5), _rec(2.0, 2.0, 1.5)])
    assert t == {"cost": 3.0, "rtn_cost": 4.0, "ratio": 0.75, "seconds": 2.0}
    assert totals([_rec(0.0, 0.0, 1.0)])["ratio"] == 1.0
    assert math.isnan(totals([_rec(-2.0, -1.0, 1.0)])["ratio"])   # relative costs


def test_json_text_writes_every_non_finite_number_as_null():
    data = {"t": (1.0, float("nan")), "d": {"x": float("inf")}, "l": [float("-inf"), 2],
            "f32": np.float32("nan"), "i": np.int64(4)}
    assert json.loads(json_text(data)) == {"t": [1.0, None], "d": {"x": None},
                                          "l": [None, 2], "f32": None, "i": 4}
    assert json.loads(json_text([np.array([1.0, np.nan])])) == [[1.0, None]]
    # numpy integers stay integers (5, not 5.0: a count read back by another tool)
    assert json_text({"n": np.int64(5), "v": np.arange(2)}) == '{"n": 5, "v": [0, 1]}'


def test_text_and_npz_writers_create_missing_folders(tmp_path):
    write_text_atomic(tmp_path / "a" / "b" / "t.txt", "hi")
    assert (tmp_path / "a" / "b" / "t.txt").read_text() == "hi"
    write_npz_atomic(tmp_path / "c" / "d" / "z.npz", x=np.arange(3))
    with np.load(tmp_path / "c" / "d" / "z.npz") as z:
        assert z["x"].tolist() == [0, 1, 2]


def test_totals_read_round_off_as_solution_ratio_does(tmp_path, capsys):
    """Weights on the grid: RTN's summed cost is round-off (-3e-17), so the total's ratio is
    1.0 like each layer's, not NaN (qround solve --json showed null beside a layer's 1.0)."""
    from qround.cli import main
    from qround.problems.io import save_layer_stats

    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 12))   # on x86-64 here: RTN sums to -2.8e-17
    codes = rng.integers(-3, 4, size=(4, 12)).astype(float)
    scale = rng.uniform(0.05, 0.2, size=(4, 1))
    path = tmp_path / "g.npz"
    stats = save_layer_stats(path, codes * scale, x.T @ x / 64, bits=3, scale=scale, name="g")
    sol = get_solver("greedy").solve(stats.problem())
    records = [SolveRecord.from_solution("g", sol)] * 2
    assert sol.ratio == 1.0 and totals(records)["ratio"] == 1.0
    assert main(["solve", str(path), "--solver", "greedy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ratio"] == 1.0 and out["layers"][0]["ratio"] == 1.0


def test_totals_of_relative_costs_and_of_a_cost_above_exact_rtn():
    def rec(cost, rtn, noise=0.0):
        return SolveRecord("l", (1, 1), "s", cost, rtn, float("nan"), 0.0, 1, noise)
    assert math.isnan(totals([rec(-2.0, -1.0)])["ratio"])       # relative costs
    assert totals([rec(1e-3, 0.0, 1e-12)])["ratio"] == float("inf")
    assert totals([rec(1.0, 4.0), rec(1.0, 4.0)])["ratio"] == 0.25


def test_environment_keeps_the_callers_torch_threads_when_numba_starts():
    # numba's OpenMP threading layer sets the OpenMP runtime's count when it starts (on the
    # first numba.get_num_threads()); torch shares that count. environment() started it and
    # left the torch count of a user's OMP_NUM_THREADS=1 at numba's pool size (and said so).
    import subprocess
    import sys

    code = ("import torch, numba\n"
            "from qround.report import environment\n"
            "threads = environment()['threads']\n"
            "print(threads['torch'], torch.get_num_threads())\n")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2",
           "NUMBA_THREADING_LAYER": "omp"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]
