"""Channel QUBOs as qbsolv .qubo files: the file's energy plus its offset is the channel's
absolute cost, the manifest's energies are the problem's, nothing is overwritten, bad files
are named."""
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qround.cli import main
from qround.errors import QroundError
from qround.problems.io import save_layer_stats
from qround.problems.qubo_files import (MANIFEST, export_qubos, plan_export, qubo_text,
                                        read_qubo, read_qubo_bqm, write_qubo)
from qround.solvers import get_solver

from ..conftest import make_problem


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 4), n=st.integers(1, 9),
       bits=st.integers(2, 4), per_channel=st.booleans(), symmetric=st.booleans())
def test_file_energy_plus_offset_is_the_absolute_cost(seed, m, n, bits, per_channel, symmetric):
    problem = make_problem(m=m, n=n, bits=bits, seed=seed, per_channel=per_channel,
                           symmetric=symmetric, clip_some=n > 1)
    x = np.random.default_rng(seed).integers(0, 2, size=(m, n)).astype(bool)
    costs = problem.costs(x)
    with tempfile.TemporaryDirectory() as folder:
        for c in range(m):
            path = Path(folder) / f"c{c}.qubo"
            write_qubo(path, problem, c)
            f = read_qubo(path)
            assert f.Q.shape == (n, n) and np.allclose(f.Q, np.triu(f.Q))
            # fixed (clipped) weights are no variables: their bit changes nothing
            assert np.array_equal(f.nodes, np.flatnonzero(problem.free[c]))
            assert f.energy(x[c]) + f.offset == pytest.approx(costs[c], rel=1e-12, abs=1e-12)
            assert f.energy(x[c]) == pytest.approx(problem.energies(x)[c], rel=1e-12, abs=1e-12)


def test_file_has_the_announced_counts_and_skips_zero_couplings():
    problem = make_problem(m=2, n=6, seed=4)
    problem.hessian.flags.writeable = True  # input 5 dead: no coupling to anything
    problem.hessian[5, :] = problem.hessian[:, 5] = 0.0
    lines = qubo_text(problem, 1, comment="two\nlines").splitlines()
    assert lines[0].startswith("c offset ") and lines[1:3] == ["c two", "c lines"]
    _, _, zero, size, nodes, couplers = lines[3].split()
    k = int(problem.free[1].sum())
    assert (zero, int(size), int(nodes)) == ("0", 6, k)
    entries = [tuple(map(float, line.split())) for line in lines[4:]]
    assert len(entries) == k + int(couplers)
    assert not any(5 in (i, j) for i, j, _ in entries if i != j)


def test_export_writes_files_and_manifest_of_known_solutions(tmp_path):
    problem = make_problem(m=6, n=10, bits=2, seed=7)
    sol = get_solver("tabu").solve(problem, seed=0)
    manifest = export_qubos(tmp_path / "q", problem, [4, 1], {"tabu": sol.choices},
                            source="toy.npz")
    saved = json.loads((tmp_path / "q" / MANIFEST).read_text())
    assert saved == json.loads(json.dumps(manifest))
    assert [r["channel"] for r in saved["channels"]] == [4, 1]
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["c0001.qubo", "c0004.qubo",
                                                                   MANIFEST]
    for row in saved["channels"]:
        c, f = row["channel"], read_qubo(tmp_path / "q" / row["file"])
        assert row["offset"] == f.offset and row["variables"] == len(f.nodes)
        for label, expect in (("rtn", problem.rtn_choices()), ("tabu", sol.choices)):
            known = row["solutions"][label]
            x = np.array([ch == "1" for ch in known["x"]])
            assert np.array_equal(x, expect[c])
            assert known["energy"] == pytest.approx(f.energy(x), rel=1e-12, abs=1e-15)
            assert known["energy"] == pytest.approx(problem.energies(expect)[c], rel=1e-12)
        assert row["solutions"]["tabu"]["energy"] <= row["solutions"]["rtn"]["energy"] + 1e-15
        # the certified bound on the energy of the exported channels: no x goes below it
        k = [4, 1].index(c)
        bound = problem.subproblem([4, 1]).lower_bound()
        assert row["lower_bound"] == pytest.approx(bound.cost[k] - problem.const[c], rel=1e-9)
        optimum = get_solver("exact").solve(problem.subproblem([c])).energy[0]
        assert row["lower_bound"] <= optimum + 1e-12
    bare = export_qubos(tmp_path / "bare", problem, [4], lower_bound=False)
    assert "lower_bound" not in bare["channels"][0]


def test_export_overwrites_nothing_and_checks_before_writing(tmp_path):
    problem = make_problem(m=3, n=5, seed=1)
    export_qubos(tmp_path, problem, slice(0, 2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(QroundError, match="already holds"):
        export_qubos(tmp_path, problem)          # c0000, c0001 and the manifest exist
    with pytest.raises(QroundError, match="already holds"):
        plan_export(tmp_path, problem, [2])      # the manifest alone is a clash
    with pytest.raises(QroundError, match="is a file"):
        export_qubos(tmp_path / "c0000.qubo", problem)
    with pytest.raises(QroundError, match="channels must lie in"):
        export_qubos(tmp_path / "new", problem, [3])
    with pytest.raises(QroundError, match="known"):
        export_qubos(tmp_path / "new", problem, known={"x": np.zeros((3, 4))})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("text, message", [
    ("1 1 0.5\n", "header .p qubo 0 maxNodes nNodes nCouplers. before the entries"),
    ("p qubo 0 2 1 0\n0 0\n", "after the .p qubo. header"),
    ("p qubo 0 2 1 0\n0 0 1.0\n1 1 2.0\n", "announces 1 nodes and 0 couplers"),
    ("p qubo 0 2 1 0\n0 0 x\n", "line 2"),
    ("p qubo 0 2 1 0\n5 5 1.0\n", "line 2: index .5, 5. outside the header's 2 variables .0..1."),
    ("c only a comment\n", "no 'p qubo' header"),
    ("c offset nan\np qubo 0 1 1 0\n0 0 1.0\n", "NaN"),
    ("p qubo 0 -1 0 0\n", "negative count"),
    ("p qubo 0 10000000000 0 0\n", "the dense matrix would take"),
    (b"p qubo 0 1 1 0\n0 0 1.\xe9\n", "line 2"),               # bad bytes outside a comment
    ("p qubo 0 2 1 0\n0 0 1.0\n-1 -1 1.0\n", "line 3: index .-1, -1. outside"),
    ("p qubo 0 0 0 0\n0 0 1.0\n", "line 2: .*header has 0 variables"),
    ("c offset=3.0\np qubo 0 1 1 0\n0 0 1.0\n", "read only as 'c offset <float>'"),
    ("c Offset 3 (was removed)\np qubo 0 1 1 0\n0 0 1.0\n", "read only as 'c offset"),
    ("p qubo 0 2 2 2\n0 0 1e308\n1 1 1\n0 1 1.5e308\n1 0 1.5e308\n", "add up to an infinite"),
    ("C offset 3.0\np qubo 0 1 1 0\n0 0 1.0\n", "read only as 'c offset <float>'"),
    ("c offset: 3.0\np qubo 0 1 1 0\n0 0 1.0\n", "read only as 'c offset <float>'"),
])
def test_bad_qubo_files_are_named(tmp_path, text, message):
    path = tmp_path / "bad.qubo"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(QroundError, match=message):
        read_qubo(path)


def test_dimod_reads_the_same_energies(tmp_path):
    dimod = pytest.importorskip("dimod", reason="cross-check against dimod's BQM")
    problem = make_problem(m=2, n=7, seed=9)
    write_qubo(tmp_path / "c.qubo", problem, 0)
    f = read_qubo(tmp_path / "c.qubo")
    q = {(int(i), int(j)): f.Q[i, j] for i, j in zip(*np.nonzero(f.Q))}
    ours = dimod.BinaryQuadraticModel.from_qubo(q, offset=f.offset)
    theirs = problem.to_bqm(0)
    x = np.random.default_rng(0).integers(0, 2, size=7)
    sample = {v: int(x[v]) for v in theirs.variables}
    assert ours.energy({**{v: 0 for v in ours.variables}, **sample}) == \
        pytest.approx(theirs.energy(sample), rel=1e-12)


# ------------------------------------------------------------------------------ the command
@pytest.fixture
def layer_file(tmp_path):
    problem = make_problem(m=8, n=12, bits=3, seed=2)
    path = tmp_path / "layer.npz"
    save_layer_stats(path, problem.weight, problem.hessian, bits=3, name="toy")
    return path


def test_cli_export_qubo(layer_file, tmp_path, capsys):
    out = tmp_path / "qubos"
    assert main(["export-qubo", str(layer_file), "--out", str(out), "--channels", "2:5",
                 "--solver", "gptq+tabu"]) == 0
    assert "wrote 3 QUBO files" in capsys.readouterr().out
    saved = json.loads((out / MANIFEST).read_text())
    assert [r["channel"] for r in saved["channels"]] == [2, 3, 4]
    assert saved["layer"] == "toy" and saved["bits"] == 3 and saved["source"] == str(layer_file)
    for row in saved["channels"]:
        e = {k: v["energy"] for k, v in row["solutions"].items()}
        assert set(e) == {"rtn", "gptq+tabu"} and e["gptq+tabu"] <= e["rtn"] + 1e-15
    # again into the same folder: refused before any work, the files as they were
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["export-qubo", str(layer_file), "--out", str(out), "--channels", "3"]) == 2
    assert "already holds" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # no solver: RTN alone; a list of channels
    assert main(["export-qubo", str(layer_file), "--out", str(tmp_path / "b"), "--channels",
                 "7,0", "--solver", ""]) == 0
    rows = json.loads((tmp_path / "b" / MANIFEST).read_text())["channels"]
    assert [(r["channel"], list(r["solutions"])) for r in rows] == [(7, ["rtn"]), (0, ["rtn"])]


@pytest.mark.parametrize("channels, message", [
    ("1:x", "is not 'all', a range"), ("a,b", "is not 'all', a range"),
    ("20", "channels must lie in"), ("5:5", "select nothing"),
    ("-1", "count from 0"), ("2,-3", "count from 0"),
])
def test_cli_export_qubo_bad_channels(layer_file, tmp_path, channels, message, capsys):
    out = tmp_path / "q"
    assert main(["export-qubo", str(layer_file), "--out", str(out), "--channels", channels]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_comments_cannot_change_the_offset(tmp_path):
    problem = make_problem(m=2, n=5, seed=3)
    write_qubo(tmp_path / "c.qubo", problem, 1, comment="offset 12.5\noffset correction: none")
    assert read_qubo(tmp_path / "c.qubo").offset == problem.const[1]


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    from qround.problems import qubo_files

    problem = make_problem(m=4, n=5, seed=3)
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise QroundError("disk full (simulated)")
        return write_qubo(path, *args, **kwargs)

    monkeypatch.setattr(qubo_files, "write_qubo", failing)
    (tmp_path / "mine.txt").write_text("keep")
    for folder in (tmp_path / "new", tmp_path):       # one the export creates, one it does not
        calls.clear()
        with pytest.raises(QroundError, match="disk full"):
            export_qubos(folder, problem)
        assert len(calls) == 3
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_cli_sample_solves_exported_files_and_scores_them_against_rtn(layer_file, tmp_path,
                                                                      capsys):
    """qround sample on export-qubo's files: the bit strings' costs are the layer problem's
    costs, RTN's comes from the manifest, and the search beats it."""
    from qround.problems.io import load_layer_stats

    out = tmp_path / "qubos"
    assert main(["export-qubo", str(layer_file), "--out", str(out), "--channels", "0:3",
                 "--solver", "gptq"]) == 0
    capsys.readouterr()
    manifest = json.loads((out / MANIFEST).read_text())
    files = sorted(str(p) for p in out.glob("*.qubo"))
    result = tmp_path / "samples.json"
    assert main(["sample", *files, "--method", "tabu(restarts=2)", "--reads", "2", "--out",
                 str(result)]) == 0
    table = capsys.readouterr().out
    assert "rtn_cost" in table and "ratio" in table
    saved = json.loads(result.read_text())
    assert saved["method"] == "tabu(restarts=2)" and saved["reads"] == 2
    problem = load_layer_stats(layer_file).problem()
    for c, path in enumerate(files):
        row = saved["samples"][path]
        x = np.array([int(ch) for ch in row["x"]], dtype=bool)
        choices = problem.rtn_choices()
        choices[c] = x
        assert row["cost"] == pytest.approx(problem.costs(choices)[c], rel=1e-9)
        assert row["rtn_cost"] == pytest.approx(problem.costs(problem.rtn_choices())[c])
        assert row["ratio"] == pytest.approx(row["cost"] / row["rtn_cost"]) and row["ratio"] < 1
        assert row["energy"] == pytest.approx(read_qubo(path).energy(x), rel=1e-9, abs=1e-12)
        entry = manifest["channels"][c]
        assert row["known"] == "gptq" and row["known_cost"] == pytest.approx(
            entry["solutions"]["gptq"]["energy"] + entry["offset"])
        assert row["bound_cost"] == pytest.approx(entry["lower_bound"] + entry["offset"])
        assert row["bound_cost"] <= row["cost"] + 1e-12
    assert "bound_cost" in table
    bare = tmp_path / "bare"
    assert main(["export-qubo", str(layer_file), "--out", str(bare), "--channels", "0:1",
                 "--solver", "", "--no-lower-bound"]) == 0
    assert "lower_bound" not in json.loads((bare / MANIFEST).read_text())["channels"][0]
    capsys.readouterr()
    assert main(["sample", str(bare / "c0000.qubo"), "--reads", "1"]) == 0
    assert "bound_cost" not in capsys.readouterr().out


def test_cli_sample_without_a_manifest_and_bad_methods(tmp_path, capsys):
    path = tmp_path / "tiny.qubo"
    path.write_text("p qubo 0 3 2 1\n0 0 -1\n2 2 -1\n0 2 3\n")
    assert main(["sample", str(path), "--method", "anneal(num_sweeps=50)", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["energy"] == pytest.approx(-1.0) and "ratio" not in row
    assert row["method"] == "anneal(num_sweeps=50)" and row["variables"] == 3
    for method, match in (("gptq+tabu", "not a composition"), ("greedy", "method must be"),
                          ("tabu(num_sweeps=3)", "does not take")):
        assert main(["sample", str(path), "--method", method]) == 2
        assert match in capsys.readouterr().err, method


def test_cli_sample_refuses_seed_in_the_method_and_repeated_files(tmp_path, capsys):
    path = tmp_path / "tiny.qubo"
    path.write_text("p qubo 0 3 2 1\n0 0 -1\n2 2 -1\n0 2 3\n")
    for method in ("tabu(seed=3)", "anneal(num_reads=3)"):
        assert main(["sample", str(path), "--method", method]) == 2
        assert "give --seed and --reads" in capsys.readouterr().err
    assert main(["sample", str(path), str(path)]) == 2
    assert "more than once" in capsys.readouterr().err


def test_sparse_qubo_files_read_without_a_dense_matrix(tmp_path, capsys):
    """read_qubo_bqm builds the BQM from the entries: a 40 000-variable ring, whose dense
    matrix (12 GiB) read_qubo refuses, samples from the shell."""
    from qround.problems.qubo_files import read_qubo_bqm

    n = 40_000
    path = tmp_path / "ring.qubo"
    lines = [f"p qubo 0 {n} {n} {n}"] + [f"{i} {i} 1" for i in range(n)] + \
        [f"{i} {(i + 1) % n} -2" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(QroundError, match="dense matrix"):
        read_qubo(path)
    bqm = read_qubo_bqm(path)
    assert bqm.num_variables == n and bqm.num_interactions == n
    assert main(["sample", str(path), "--method", "anneal(num_sweeps=30)", "--reads", "1",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["variables"] == n and row["energy"] <= 0.0   # all zeros costs 0; ones too


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_the_sparse_reader_gives_the_dense_readers_energies(seed):
    from qround.problems.qubo_files import read_qubo_bqm

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    entries = [(int(i), int(j), float(rng.normal())) for i, j in
               rng.integers(0, n, size=(int(rng.integers(0, 20)), 2))]
    nodes = sum(i == j for i, j, _ in entries)
    text = f"c offset {rng.normal()}\np qubo 0 {n} {nodes} {len(entries) - nodes}\n" + \
        "".join(f"{i} {j} {v!r}\n" for i, j, v in entries)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "q.qubo"
        path.write_text(text)
        dense, bqm = read_qubo(path), read_qubo_bqm(path)
    for x in rng.integers(0, 2, size=(5, n)):
        assert bqm.energy(dict(enumerate(x))) == pytest.approx(dense.energy(x) + dense.offset,
                                                               abs=1e-12)


def test_cli_sample_reads_dimod_bqm_files(tmp_path, capsys):
    """A file from ``bqm.to_file()`` (any labels, SPIN or BINARY) samples from the shell; the
    --out file gives each label's value, and its energy is dimod's."""
    import dimod

    bqm = dimod.BinaryQuadraticModel(
        {"a": 1.0, ("x", 2): -0.5, 7: 0.25}, {("a", ("x", 2)): -2.0, ("a", 7): 1.5}, 0.75,
        "SPIN")
    path = tmp_path / "model.bqm"
    with open(path, "wb") as f:
        f.write(bqm.to_file().read())
    out = tmp_path / "s.json"
    assert main(["sample", str(path), "--method", "tabu", "--reads", "2", "--out", str(out),
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    ground = dimod.ExactSolver().sample(bqm).first.energy
    assert row["cost"] == pytest.approx(ground) and row["variables"] == 3
    assert row["energy"] == row["cost"]   # a dimod file's offset is its own: dimod's energy
    saved = json.loads(out.read_text())["samples"][str(path)]
    assert saved["vartype"] == "SPIN"
    sample = {("x", 2) if label == ["x", 2] else label: value
              for label, value in saved["sample"]}
    assert set(sample.values()) <= {-1, 1}
    assert bqm.energy(sample) == pytest.approx(row["cost"])


def test_an_empty_dimod_file_is_reported_as_dimod_files_are(tmp_path, capsys):
    """No variables: no search, but the energy is still dimod's (the offset), and --out keeps
    the vartype and an empty sample, as for a dimod file with variables."""
    import dimod

    path = tmp_path / "empty.bqm"
    with open(path, "wb") as f:
        f.write(dimod.BinaryQuadraticModel({}, {}, 2.5, "SPIN").to_file().read())
    out = tmp_path / "s.json"
    assert main(["sample", str(path), "--out", str(out), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["variables"] == 0 and row["energy"] == row["cost"] == 2.5
    saved = json.loads(out.read_text())["samples"][str(path)]
    assert saved["vartype"] == "SPIN" and saved["sample"] == [] and "x" not in saved


def test_damaged_and_other_dimod_files_are_named(tmp_path, capsys):
    import dimod

    from qround.problems.qubo_files import read_bqm_file

    bqm = dimod.generators.gnp_random_bqm(6, 0.5, "BINARY", random_state=0)
    good = bqm.to_file().read()
    damaged = tmp_path / "damaged.bqm"
    damaged.write_bytes(good[:len(good) // 2])
    with pytest.raises(QroundError, match="not a readable dimod BQM file"):
        read_bqm_file(damaged)
    cqm = tmp_path / "model.cqm"
    cqm.write_bytes(dimod.ConstrainedQuadraticModel().to_file().read())
    with pytest.raises(QroundError, match="another model"):
        read_bqm_file(cqm)
    assert main(["sample", str(damaged)]) == 2
    assert "not a readable dimod BQM file" in capsys.readouterr().err
    text = tmp_path / "tiny.qubo"     # qbsolv files still read as before
    text.write_text("p qubo 0 3 2 1\n0 0 -1\n2 2 -1\n0 2 3\n")
    assert read_bqm_file(text).num_variables == 3


def test_cli_sample_runs_dwave_samplers_to_compare(tmp_path, capsys):
    """`qround sample --method dwave-tabu(timeout=5)` (or neal) runs dwave-samplers' own
    sampler on the same files, with the same table; misspelt options are refused."""
    pytest.importorskip("dwave.samplers", reason="needs dwave-samplers")
    import dimod

    path = tmp_path / "tiny.qubo"
    path.write_text("p qubo 0 3 2 1\n0 0 -1\n2 2 -1\n0 2 3\n")
    ground = dimod.ExactSolver().sample(
        dimod.BinaryQuadraticModel({0: -1.0, 2: -1.0, 1: 0.0}, {(0, 2): 3.0}, 0.0,
                                   "BINARY")).first.energy
    for method in ("dwave-tabu(timeout=5)", "neal(num_sweeps=50)", "dwave-steepest"):
        assert main(["sample", str(path), "--method", method, "--reads", "2", "--json"]) == 0
        row = json.loads(capsys.readouterr().out.strip())
        assert row["energy"] == pytest.approx(ground) and row["method"] == method
    assert main(["sample", str(path), "--method", "neal(num_sweep=50)"]) == 2
    assert "does not take ['num_sweep']" in capsys.readouterr().err
    assert main(["sample", str(path), "--method", "neal(num_sweeps=-3)"]) == 2
    assert "num_sweeps must not be negative" in capsys.readouterr().err


def test_cli_sample_edge_cases_with_dwave_samplers(tmp_path, capsys):
    """An empty model reports its offset without sampling (dwave's tabu returns no sample for
    it); reads are bounded for every sampler; a dwave sampler's overflow is one line."""
    pytest.importorskip("dwave.samplers", reason="needs dwave-samplers")
    empty = tmp_path / "empty.qubo"
    empty.write_text("c offset 2.5\np qubo 0 0 0 0\n")
    for method in ("dwave-tabu", "tabu"):
        assert main(["sample", str(empty), "--method", method, "--json"]) == 0
        row = json.loads(capsys.readouterr().out.strip())
        assert row["variables"] == 0 and row["cost"] == 2.5
    path = tmp_path / "tiny.qubo"
    path.write_text("p qubo 0 3 2 1\n0 0 -1\n2 2 -1\n0 2 3\n")
    assert main(["sample", str(path), "--method", "neal", "--reads", str(10 ** 15)]) == 2
    assert "--reads=" in capsys.readouterr().err
    assert main(["sample", str(path), "--method", f"dwave-tabu(timeout={10 ** 20})"]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "Traceback" not in err
    for timeout in ("-5", "None", "0"):
        assert main(["sample", str(path), "--method", f"dwave-tabu(timeout={timeout})"]) == 2
        assert "positive number of milliseconds" in capsys.readouterr().err


def test_cli_sample_keeps_its_inputs_and_checks_the_manifest(layer_file, tmp_path, capsys,
                                                             caplog):
    """--out may not replace the manifest it reads nor name a .qubo file; a file beside
    another layer's manifest gets no RTN columns from it."""
    out = tmp_path / "q"
    assert main(["export-qubo", str(layer_file), "--out", str(out), "--channels", "0:2"]) == 0
    before = (out / MANIFEST).read_bytes()
    assert main(["sample", str(out / "c0000.qubo"), "--out", str(out / MANIFEST)]) == 2
    assert "same file as the input manifest" in capsys.readouterr().err
    assert main(["sample", str(out / "c0000.qubo"), "--out", str(out / "c0001.qubo")]) == 2
    assert "a qbsolv QUBO file" in capsys.readouterr().err
    assert (out / MANIFEST).read_bytes() == before
    # another layer's file beside this manifest, under a listed name
    other = make_problem(m=2, n=12, bits=3, seed=9)
    save_layer_stats(tmp_path / "other.npz", other.weight, other.hessian, bits=3)
    assert main(["export-qubo", str(tmp_path / "other.npz"), "--out", str(tmp_path / "o"),
                 "--channels", "0"]) == 0
    (out / "c0000.qubo").write_bytes((tmp_path / "o" / "c0000.qubo").read_bytes())
    capsys.readouterr()
    assert main(["sample", str(out / "c0000.qubo"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert "rtn_cost" not in row and "another offset" in caplog.text


def test_cli_sample_of_relative_costs_has_no_ratio(tmp_path, capsys):
    problem = make_problem(m=3, n=10, bits=2, seed=4)
    path = tmp_path / "rel.npz"
    save_layer_stats(path, problem.weight, problem.hessian, bits=2, cross=problem.hessian)
    assert main(["export-qubo", str(path), "--out", str(tmp_path / "q"), "--solver",
                 "greedy"]) == 0
    assert "relative" in capsys.readouterr().out
    assert main(["sample", str(tmp_path / "q" / "c0000.qubo"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["rtn_cost"] < 0 and row["ratio"] is None


@pytest.mark.parametrize("text", [
    "c-----\np qubo 0 2 2 1\n0 0 1.0\n1 1 -2.0\n0 1 0.5\n",
    "C generated by a tool\np qubo 0 2 2 1\n0 0 1.0\n1 1 -2.0\n0 1 0.5\n",
    "P qubo 0 2 2 1\n0 0 1.0\n1 1 -2.0\n0 1 0.5\n",
    "p qubo 0 2 2 1\n0 0 1.0\n1 1 -2.0\nc: links\n0 1 0.5\n",
    "c offset unknown\np qubo 0 2 2 1\n0 0 1.0\n1 1 -2.0\n0 1 0.5\n",     # no number: a comment
    "c offsets are stored in manifest.json (v2)\np qubo 0 2 2 1\n0 0 1.0\n1 1 -2.0\n0 1 0.5\n",
    "c offsetting by 0 is a no-op\np qubo 0 2 2 1\n0 0 1.0\n1 1 -2.0\n0 1 0.5\n",
    b"c Gr\xf6\xdfe (Latin-1)\np qubo 0 2 2 1\n0 0 1.0\n1 1 -2.0\n0 1 0.5\n",
    b"\xef\xbb\xbfp qubo 0 2 2 1\n0 0 1.0\n1 1 -2.0\n0 1 0.5\n",          # a UTF-8 byte-order mark
])
def test_qbsolv_comments_and_header_spellings_are_read(tmp_path, text):
    """As qbsolv's reader: a line starting with c or C is a comment, the header may be P."""
    path = tmp_path / "q.qubo"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    q = read_qubo(path)
    assert q.offset == 0.0
    assert np.array_equal(q.Q, np.array([[1.0, 0.5], [0.0, -2.0]]))


def test_cli_sample_reads_a_pipe(tmp_path, capsys):
    """The file is read once, so a FIFO (what <(...) and /dev/stdin give) works."""
    import os
    import threading

    text = "p qubo 0 2 2 1\n0 0 1.0\n1 1 -2.0\n0 1 0.5\n"
    fifo = tmp_path / "in.qubo"
    os.mkfifo(fifo)

    done = threading.Event()

    def writer():
        with open(fifo, "w") as f:
            f.write(text)
        if not done.wait(30):   # a reader that opens the file again would wait forever:
            open(fifo, "w").close()   # give it an empty second opening, so the test fails

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        code = main(["sample", str(fifo), "--reads", "1", "--json"])
    finally:
        done.set()
        thread.join(timeout=10)
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip())["cost"] == pytest.approx(-2.0)


def test_cli_sample_checks_files_before_the_warm_up_and_prints_significant_digits(
        tmp_path, capsys, monkeypatch):
    import qround.solvers as solvers

    calls = []
    monkeypatch.setattr(solvers, "warm_up", lambda *a, **k: calls.append(a))
    assert main(["sample", str(tmp_path / "missing.qubo"), "--method",
                 "tabu(timeout=3000)"]) == 2
    assert "does not exist" in capsys.readouterr().err and not calls
    path = tmp_path / "small.qubo"
    path.write_text("c offset 0.00123456789\np qubo 0 1 1 0\n0 0 0.0\n")
    assert main(["sample", str(path), "--reads", "1"]) == 0
    assert "0.00123457" in capsys.readouterr().out   # 0.0012 with four decimals


def test_duplicate_entries_that_add_up_to_infinity_are_refused_by_the_sparse_reader(tmp_path):
    pytest.importorskip("dimod", reason="the sparse reader builds a dimod BQM")
    path = tmp_path / "dup.qubo"
    path.write_text("p qubo 0 2 2 2\n0 0 1e308\n1 1 1\n0 1 1.5e308\n1 0 1.5e308\n")
    with pytest.raises(QroundError, match="add up to an infinite"):
        read_qubo_bqm(path)


def test_file_energy_takes_bit_strings_and_refuses_other_vectors(tmp_path):
    problem = make_problem(m=2, n=5, seed=3)
    write_qubo(tmp_path / "c.qubo", problem, 0)
    q = read_qubo(tmp_path / "c.qubo")
    x = np.array([1, 0, 1, 1, 0])
    assert q.energy("10110") == q.energy(x) == q.energy(x.astype(bool))
    for bad, message in ((np.ones(4), "5 binary values"), ("1011", "5 binary values"),
                         ("10a10", "only the characters 0 and 1"),
                         (2 * x - 1, "SPIN"), (np.full(5, 0.5), "binary"),
                         (np.ones((1, 5)), "shape")):
        with pytest.raises(QroundError, match=message):
            q.energy(bad)


@pytest.mark.parametrize("bias", ["linear", "offset"])
def test_dimod_files_with_nan_or_infinite_biases_are_named(tmp_path, capsys, bias):
    dimod = pytest.importorskip("dimod", reason="dimod's own file format")
    from qround.problems.qubo_files import read_bqm_file

    bqm = dimod.BinaryQuadraticModel({0: 1.0, 1: 1.0}, {(0, 1): 2.0}, 0.0, "BINARY")
    if bias == "linear":
        bqm.set_linear(0, np.nan)
    else:
        bqm.offset = np.inf
    bad = tmp_path / "bad.bqm"
    bad.write_bytes(bqm.to_file().read())
    with pytest.raises(QroundError, match="bad.bqm.*NaN or infinite"):
        read_bqm_file(bad)
    good = tmp_path / "good.bqm"
    good.write_bytes(dimod.BinaryQuadraticModel({0: 1.0}, {}, 0.0, "BINARY").to_file().read())
    assert main(["sample", str(good), str(bad)]) == 2
    assert "NaN or infinite" in capsys.readouterr().err


def test_export_refuses_labels_that_are_not_strings_before_writing(tmp_path):
    problem = make_problem(m=2, n=5, seed=3)
    with pytest.raises(QroundError, match="must be strings"):
        export_qubos(tmp_path / "a" / "b", problem, known={("x",): problem.rtn_choices()})
    assert not (tmp_path / "a").exists()


def test_a_failed_export_removes_the_parent_folders_it_created(tmp_path, monkeypatch):
    from qround.problems import qubo_files

    def failing(*args, **kwargs):
        raise QroundError("disk full (simulated)")

    monkeypatch.setattr(qubo_files, "write_qubo", failing)
    with pytest.raises(QroundError, match="disk full"):
        export_qubos(tmp_path / "new1" / "new2" / "out", make_problem(m=2, n=5, seed=3))
    assert list(tmp_path.iterdir()) == []


def test_the_manifest_says_whether_variables_are_the_layers_inputs(tmp_path):
    problem = make_problem(m=2, n=6, seed=3)
    assert export_qubos(tmp_path / "full", problem)["restricted"] is False
    small = problem.restrict([4, 1, 2], problem.rtn_choices())
    assert export_qubos(tmp_path / "small", small)["restricted"] is True


def test_cli_sample_lists_only_the_methods_search_options_and_sees_one_file_spelt_twice(
        tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "tiny.qubo").write_text("p qubo 0 3 2 1\n0 0 -1\n2 2 -1\n0 2 3\n")
    assert main(["sample", "q/tiny.qubo", "--method", "tabu(num_restarts=3)"]) == 2
    err = capsys.readouterr().err
    assert "dwave's num_restarts is restarts here" in err
    assert "search parameters" in err and "num_reads" not in err and "seed" not in err
    assert main(["sample", "q/tiny.qubo", "./q/tiny.qubo"]) == 2
    assert "FILE 'q/tiny.qubo' is given more than once (as ['./q/tiny.qubo'])" in \
        capsys.readouterr().err
