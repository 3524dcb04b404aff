"""qbsolv .qubo files: header and index checks, the comment, node order, file names for many
channels, and what the manifest records (fixed weights, reserved labels, variables, grid)."""
import json

import numpy as np
import pytest

from qround.errors import QroundError
from qround.problems import qubo_files
from qround.problems.qubo_files import (MANIFEST, export_qubos, read_bqm_file, read_qubo,
                                        read_qubo_bqm, write_qubo)

from ..conftest import make_problem


def write(tmp_path, text, name="q.qubo"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("p qubo 0 2 1 0\np qubo 0 2 1 0\n0 0 1.0\n", "line 2: expected one header"),
    ("p qubo 0 2 1 0\n0 0 1.0\np qubo 0 3 1 0\n", "line 3: expected one header"),
    ("p qubo 0 2 1 0 7\n0 0 1.0\n", "line 1: expected one header"),
    ("p cnf 0 2 1 0\n0 0 1.0\n", "line 1: expected one header"),
    ("p qubo 0 2 1 0\n2 2 1.0\n", r"line 2: index \(2, 2\) outside the header's 2 variables"),
    ("p qubo 0 2 1 1\n0 0 1.0\n0 2 1.0\n", r"line 3: index \(0, 2\) outside"),
    ("p qubo 0 2 1 1\n1 1 1.0\n1 -1 1.0\n", r"line 3: index \(1, -1\) outside"),
    ("p qubo 0 2 2 1\n0 0 1.0\n1 1 1.0\n",
     "announces 2 nodes and 1 couplers, the file has 2 and 0"),
    ("p qubo 0 2 1 0\n0 0 1.0\n0 1 1.0\n",
     "announces 1 nodes and 0 couplers, the file has 1 and 1"),
])
@pytest.mark.parametrize("reader", [read_qubo, read_qubo_bqm])
def test_bad_headers_indices_and_counts_are_named_by_both_readers(tmp_path, text, message,
                                                                  reader):
    with pytest.raises(QroundError, match=message):
        reader(write(tmp_path, text))


def test_the_sparse_reader_refuses_more_than_max_nodes(tmp_path, monkeypatch):
    monkeypatch.setattr(qubo_files, "MAX_NODES", 10)
    assert read_qubo_bqm(write(tmp_path, "p qubo 0 10 0 0\n")).num_variables == 10
    with pytest.raises(QroundError, match="line 1: 11 variables: at most 10 are read"):
        read_qubo_bqm(write(tmp_path, "p qubo 0 11 0 0\n"))


def test_dimod_files_of_more_than_max_nodes_are_refused(tmp_path, monkeypatch):
    dimod = pytest.importorskip("dimod", reason="dimod's own file format")
    bqm = dimod.BinaryQuadraticModel({v: 1.0 for v in range(11)}, {}, 0.0, "BINARY")
    path = tmp_path / "big.bqm"
    path.write_bytes(bqm.to_file().read())
    monkeypatch.setattr(qubo_files, "MAX_NODES", 11)
    assert read_bqm_file(path).num_variables == 11
    monkeypatch.setattr(qubo_files, "MAX_NODES", 10)
    with pytest.raises(QroundError, match="has 11 variables .at most 10."):
        read_bqm_file(path)


def test_nodes_are_sorted_whatever_the_files_order(tmp_path):
    f = read_qubo(write(tmp_path, "p qubo 0 4 3 0\n3 3 1.0\n0 0 2.0\n2 2 -1.0\n"))
    assert f.nodes.tolist() == [0, 2, 3]
    assert np.array_equal(np.diag(f.Q), [2.0, 0.0, -1.0, 1.0])


def test_linear_entries_given_twice_add_up_in_both_readers(tmp_path):
    path = write(tmp_path, "p qubo 0 2 3 2\n0 0 1.0\n0 0 2.5\n1 1 -1\n0 1 1\n1 0 2\n")
    f = read_qubo(path)
    assert np.array_equal(f.Q, [[3.5, 3.0], [0.0, -1.0]])
    bqm = read_qubo_bqm(path)
    assert bqm.get_linear(0) == 3.5 and bqm.get_quadratic(0, 1) == 3.0


def test_write_qubo_writes_the_comment(tmp_path):
    problem = make_problem(m=2, n=5, seed=3)
    write_qubo(tmp_path / "c.qubo", problem, 1, comment="layer fc1\nsecond line")
    lines = (tmp_path / "c.qubo").read_text().splitlines()
    assert lines[0] == f"c offset {float(problem.const[1])!r}"
    assert lines[1:3] == ["c layer fc1", "c second line"]
    assert lines[3].startswith("p qubo 0 5 ")


def test_exported_files_say_what_they_hold(tmp_path):
    problem = make_problem(m=3, n=5, bits=2, seed=1, symmetric=False)
    export_qubos(tmp_path / "q", problem, [2])
    text = (tmp_path / "q" / "c0002.qubo").read_text()
    assert "output channel 2" in text and "2-bit asymmetric grid" in text
    assert "layer toy1 (3x5)" in text


@pytest.mark.parametrize("m, name", [(10_000, "c0003.qubo"), (10_001, "c00003.qubo")])
def test_file_names_have_as_many_digits_as_the_last_channel(tmp_path, m, name):
    problem = make_problem(m=m, n=2, bits=2, seed=0, clip_some=False)
    manifest = export_qubos(tmp_path / "q", problem, [3, m - 1])
    assert [r["file"] for r in manifest["channels"]] == [name, f"c{m - 1}.qubo"]
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == sorted(
        [name, f"c{m - 1}.qubo", MANIFEST])


def test_known_solutions_read_0_on_fixed_weights(tmp_path):
    problem = make_problem(m=3, n=6, bits=2, seed=5)   # clip_some: weights (0, 0), (2, 5) fixed
    assert not problem.free[0, 0] and not problem.free[2, 5]
    ones = np.ones((3, 6), dtype=bool)
    manifest = export_qubos(tmp_path / "q", problem, known={"ones": ones})
    rows = {r["channel"]: r for r in manifest["channels"]}
    for c in range(3):
        x = rows[c]["solutions"]["ones"]["x"]
        assert x == "".join("1" if v else "0" for v in problem.free[c])
        f = read_qubo(tmp_path / "q" / rows[c]["file"])
        assert rows[c]["solutions"]["ones"]["energy"] == pytest.approx(f.energy(x), rel=1e-12,
                                                                       abs=1e-14)
    assert rows[0]["solutions"]["ones"]["x"][0] == "0"


def test_the_rtn_label_is_reserved(tmp_path):
    problem = make_problem(m=2, n=5, seed=3)
    with pytest.raises(QroundError, match="'rtn' is reserved"):
        export_qubos(tmp_path / "q", problem, known={"rtn": ~problem.rtn_choices()})
    assert not (tmp_path / "q").exists()


def test_known_solutions_are_checked_before_anything_is_written(tmp_path):
    problem = make_problem(m=2, n=5, seed=3)
    for bad in (np.full((2, 5), 2), np.zeros((2, 4)), np.zeros((5,))):
        with pytest.raises(QroundError, match=r"known\['mine'\]"):
            export_qubos(tmp_path / "q", problem, known={"mine": bad})
    assert not (tmp_path / "q").exists()


def test_the_manifest_describes_the_layer(tmp_path):
    problem = make_problem(m=3, n=7, bits=2, seed=2, symmetric=False)
    manifest = export_qubos(tmp_path / "q", problem, source="layer.npz")
    saved = json.loads((tmp_path / "q" / MANIFEST).read_text())
    assert saved == manifest
    assert saved["shape"] == [3, 7] and saved["bits"] == 2 and saved["symmetric"] is False
    assert saved["layer"] == "toy2" and saved["source"] == "layer.npz"
    for row in saved["channels"]:
        c = row["channel"]
        assert row["variables"] == int(problem.free[c].sum())
        assert row["variables"] == len(read_qubo(tmp_path / "q" / row["file"]).nodes)
        assert row["offset"] == float(problem.const[c])
    assert saved["channels"][0]["variables"] < 7       # weight (0, 0) is clipped: fixed
    sym = export_qubos(tmp_path / "s", make_problem(m=2, n=3, seed=2))
    assert sym["symmetric"] is True and sym["shape"] == [2, 3]


def test_known_solutions_with_a_batch_dimension_are_refused(tmp_path):
    problem = make_problem(m=2, n=5, seed=3)
    with pytest.raises(QroundError, match=r"known\['mine'\]"):
        export_qubos(tmp_path / "q", problem, known={"mine": np.zeros((3, 2, 5))})
    assert not (tmp_path / "q").exists()


def test_a_repeated_linear_line_lists_its_variable_once(tmp_path):
    path = tmp_path / "rep.qubo"
    path.write_text("p qubo 0 2 2 0\n0 0 1\n0 0 2\n")
    q = read_qubo(path)
    assert q.nodes.tolist() == [0]
    assert q.Q[0, 0] == 3
