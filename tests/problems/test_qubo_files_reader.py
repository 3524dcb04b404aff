"""The faster reader of qbsolv .qubo files (entries gathered into arrays, not tuples) gives what
the earlier reader gave, bit for bit: the same Q, BQM biases, offset and nodes on well-formed
files (repeated entries adding up in file order, comments anywhere, CRLF, tabs, trailing white
space, a byte-order mark), and the same QroundError message on malformed ones.  The reference is
a verbatim copy of the earlier reader (``_original_*`` below; helper-172's differential tests).
One difference is meant: lines end at \n, \r\n or \r only, where the earlier reader also
broke them at \v, \f, \x1c-\x1e, U+0085, U+2028 and U+2029 (str.splitlines)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qround.errors import QroundError
from qround.problems import qubo_files
from qround.problems.qubo_files import (MAX_DENSE_BYTES, MAX_NODES, _is_float, _offset_like,
                                        _qubo_bqm, read_qubo, read_qubo_bqm, write_qubo)

from ..conftest import make_problem

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- the reader before the bulk path, verbatim (the reference) -------------------------------

def _original_parse_qubo(path: str, data: bytes, dense: bool):
    text = data.decode("utf-8-sig", errors="replace")
    offset, header, entries = None, None, []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        where = f"QUBO file {path!r}, line {number}"
        try:
            if not parts:
                continue
            if parts[0][0] in "cC":
                if offset is None and len(parts) == 3 and parts[0] == "c" \
                        and parts[1] == "offset" and _is_float(parts[2]):
                    offset = float(parts[2])   # the first 'c offset <float>'; others: comments
                elif offset is None and _offset_like(line):
                    # a comment qbsolv would skip, but a cost shifted by a lost offset is silent
                    raise ValueError("an offset line is read only as 'c offset <float>' "
                                     "(lower case, one number)")
            elif parts[0] in ("p", "P"):
                if header is not None or len(parts) != 6 or parts[1].lower() != "qubo":
                    raise ValueError("expected one header 'p qubo 0 maxNodes nNodes nCouplers'")
                header = [int(v) for v in parts[3:]]
                if min(header) < 0:
                    raise ValueError(f"negative count in the header {header}")
                if dense and header[0] ** 2 * 8 > MAX_DENSE_BYTES:
                    raise ValueError(f"{header[0]} variables: the dense matrix would take "
                                     f"{header[0] ** 2 * 8 / 2 ** 30:.0f} GiB")
                if header[0] > MAX_NODES:
                    raise ValueError(f"{header[0]} variables: at most {MAX_NODES} are read")
            else:
                if header is None:
                    raise ValueError("expected the header 'p qubo 0 maxNodes nNodes nCouplers' "
                                     "before the entries (or a comment line starting with c)")
                if len(parts) != 3:
                    raise ValueError("expected 'i j value' after the 'p qubo' header")
                i, j, v = int(parts[0]), int(parts[1]), float(parts[2])
                if not (0 <= i < header[0] and 0 <= j < header[0]):
                    raise ValueError(f"index ({i}, {j}) outside the header's "
                                     f"{header[0]} variables (0..{header[0] - 1})"
                                     if header[0] else
                                     f"index ({i}, {j}), but the header has 0 variables")
                entries.append((i, j, v))
        except (ValueError, IndexError) as exc:
            raise QroundError(f"{where}: {exc}") from None
    if header is None:
        raise QroundError(f"QUBO file {path!r} has no 'p qubo' header")
    size, n_nodes, n_couplers = header
    nodes = [(i, v) for i, j, v in entries if i == j]
    pairs = [(i, j, v) for i, j, v in entries if i != j]
    if len(nodes) != n_nodes or len(pairs) != n_couplers:
        raise QroundError(f"QUBO file {path!r}: the header announces {n_nodes} nodes and "
                          f"{n_couplers} couplers, the file has {len(nodes)} and {len(pairs)}")
    offset = 0.0 if offset is None else offset
    if not all(np.isfinite(v) for _, _, v in entries) or not np.isfinite(offset):
        raise QroundError(f"QUBO file {path!r} holds NaN or infinite values")
    return size, offset, entries, np.array(sorted({i for i, _ in nodes}), dtype=int)


def _original_read_qubo(path: str, data: bytes):
    size, offset, entries, nodes = _original_parse_qubo(path, data, dense=True)
    q = np.zeros((size, size))
    with np.errstate(over="ignore"):                # checked below
        for i, j, v in entries:
            a, b = min(i, j), max(i, j)
            q[a, b] += v
    if not np.isfinite(q).all():
        raise QroundError(f"QUBO file {path!r}: entries given more than once add up to an "
                          "infinite value")
    return qubo_files.QuboFile(Q=q, offset=offset, nodes=nodes)


def _original_qubo_bqm(path: str, data: bytes):
    import dimod

    size, offset, entries, _ = _original_parse_qubo(path, data, dense=False)
    arr = np.array(entries, dtype=np.float64).reshape(-1, 3)
    i, j, v = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2]
    on = i == j
    linear = np.zeros(size)
    np.add.at(linear, i[on], v[on])
    bqm = dimod.BinaryQuadraticModel.from_numpy_vectors(
        linear, (np.minimum(i[~on], j[~on]), np.maximum(i[~on], j[~on]), v[~on]), offset,
        dimod.BINARY)
    if not qubo_files._finite_bqm(bqm):
        raise QroundError(f"QUBO file {path!r}: entries given more than once add up to an "
                          "infinite value")
    return bqm


# ---- outcomes, compared bit for bit ------------------------------------------------------------

def _dense_key(r):
    return (r.Q.shape, r.Q.dtype.str, r.Q.tobytes(), float(r.offset).hex(), r.nodes.dtype.str,
            r.nodes.tobytes())


def _bqm_key(bqm):
    lin, (a, b, q), off = bqm.to_numpy_vectors()
    return (str(bqm.vartype), list(bqm.variables), lin.dtype.str, lin.tobytes(), a.tobytes(),
            b.tobytes(), q.dtype.str, q.tobytes(), float(off).hex())


def _outcome(fn, key):
    try:
        with np.errstate(over="ignore"):   # the earlier reader warned before refusing an overflow
            return "ok", key(fn())
    except QroundError as exc:
        return "error", str(exc)


def _all_outcomes(path, data: bytes):
    """{reader: outcome} of the original readers and the current ones; the file ``path`` holds
    ``data``."""
    out = {
        "dense_original": _outcome(lambda: _original_read_qubo(path, data), _dense_key),
        "bqm_original": _outcome(lambda: _original_qubo_bqm(path, data), _bqm_key),
        "dense": _outcome(lambda: read_qubo(path), _dense_key),
        "bqm": _outcome(lambda: read_qubo_bqm(path), _bqm_key),
        "bqm_bytes": _outcome(lambda: _qubo_bqm(path, data), _bqm_key),
    }
    return out


def _assert_same(out):
    assert out["dense"] == out["dense_original"]
    assert out["bqm"] == out["bqm_original"] == out["bqm_bytes"]


_OTHER_BREAKS = "\v\f\x1c\x1d\x1e\x85\u2028\u2029"   # str.splitlines() breaks, not ours


@pytest.fixture(scope="module")
def qubo_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fast") / "q.qubo")


def _write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


# ---- random well-formed files -------------------------------------------------------------------

_VALUES = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64).map(repr),
    st.floats(-1e3, 1e3, allow_nan=False).map(lambda x: f"{x:.3f}"),
    st.floats(-1e3, 1e3, allow_nan=False).map(lambda x: f"{x:.6e}"),
    st.integers(-10 ** 6, 10 ** 6).map(str),
    st.sampled_from(["0", "-0", "-0.0", "0.0", "+1.5", ".5", "-.25", "5.", "1e-3", "1E+3",
                     "1e308", "-1e308", "4.9e-324", "0.1", "0.2", "0.3", "1e16", "1", "-1"]),
)


@st.composite
def qubo_files_(draw):
    """The bytes of a .qubo file, well-formed but for an overflow or a misplaced offset."""
    n = draw(st.integers(0, 12))
    entries = []
    if n:
        pairs = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1), _VALUES)
        entries = draw(st.lists(pairs, max_size=40))
        # repeated entries, given again in either order
        for i, j, _ in draw(st.lists(st.sampled_from(entries), max_size=6)) if entries else []:
            entries.insert(draw(st.integers(0, len(entries))),
                           (j, i, draw(_VALUES)) if draw(st.booleans()) else (i, j, draw(_VALUES)))
    n_nodes = sum(i == j for i, j, _ in entries)
    sep = draw(st.sampled_from([" ", "\t", "  ", " \t"]))
    lead = draw(st.sampled_from(["", "", " ", "\t"]))
    trail = st.sampled_from(["", "", " ", "\t", "  "])
    lines = [f"{lead}{i:0{draw(st.integers(1, 3))}d}{sep}{j}{sep}{v}{draw(trail)}"
             if draw(st.integers(0, 9)) == 0 else f"{lead}{i}{sep}{j}{sep}{v}{draw(trail)}"
             for i, j, v in entries]
    comments = st.sampled_from(["c a comment", "C another", "c", "", "   ", "\t",
                                "c offsets are in manifest.json (v2)", "c Ünïcödé — ok",
                                "c offset 7.5", "cfoo 1 2 3", "c p qubo 0 1 1 1",
                                "c 0 0 1.0", "c\t0 0 nan"])
    for _ in range(draw(st.integers(0, 6))):
        lines.insert(draw(st.integers(0, len(lines))), draw(comments))
    head = [draw(st.sampled_from(["c", "C", "", "c qround test"])) for _ in
            range(draw(st.integers(0, 2)))]
    if draw(st.booleans()):
        head.insert(draw(st.integers(0, len(head))),
                    f"c offset {draw(_VALUES)}")
    p = draw(st.sampled_from(["p", "P"]))
    head.append(f"{p} {draw(st.sampled_from(['qubo', 'QUBO']))} 0 {n} {n_nodes} "
                f"{len(entries) - n_nodes}{draw(trail)}")
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = eol.join(head + lines) + (eol if draw(st.booleans()) else "")
    data = text.encode("utf-8")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if draw(st.integers(0, 5)) == 0:      # an undecodable byte in a comment
        data = data + b"c bad \xff\xfe byte" + eol.encode()
    return data


@settings(max_examples=300, deadline=None)
@given(data=qubo_files_())
def test_readers_agree_bit_for_bit_on_well_formed_files(qubo_path, data):
    _write(qubo_path, data)
    _assert_same(_all_outcomes(qubo_path, data))


# ---- malformed files ----------------------------------------------------------------------------

_BAD_LINES = [
    "1 2", "1 2 3 4", "0", "+1 1 1.0", "-1 0 1.0", "1.0 1 1.0", "1e0 1 1", "0 0 nan", "0 0 inf",
    "0 0 -inf", "0 0 NaN", "0 0 1_0", "0_0 0 1", "0 0 1e400", "0 0 -1e400", "0 0 1e", "0 0 --1",
    "0 0 .", "0 0 1.5.3", "0 0 1e5e5", "0 0 1.51.5", "0 0 +-1", "0 0 -", "0 0 e", "e 0 1",
    "- 0 1", "0 - 1", "1- 0 1", "0 0 1.0 c", "\u0663 0 1.0", "0 0 \u0661.5", "0 0 1.0\x1f",
    "\x1f0 0 1.0", "0 0 1.0\xa0", "0\xa00 1.0", "0 0 +.5e-3", "99999999999999999999 0 1",
    "000000000000000000001 0 1.0", "18446744073709551616 0 1.0", "0 18446744073709551617 1",
    "E 0 1", "e e 1", ". 0 1", "0000000000000000001 0 1.0", "9999999999 0 1",
    "5 0 1.0", "0 5 1.0", "12 12 1", "c Offset: 3", "c offset=3", "c offset 1 2",
    "c offset nan", "c offset inf", "C offset 3", "c offset: 2", "p qubo 0 3 1 0",
    "P QUBO 0 3 1 0", "p cnf 0 2 1 0", "p qubo 0 -1 0 0", "p qubo 0 3 1", "x 1 2", "pq 1 2",
    "c comment \r inside", "0 0 1.0\r", "\ufeff0 0 1.0", "0\t0\t1e-3",
    "  0 0 1.0", "0 0 0x10", "0 0 1j", "0 0 infinity", "0 0 1e+", "0 0 .e1", "00 00 -00.00e-00",
    "0 0 1.7976931348623157e308", "0 0 1.7976931348623159e308",
]


@st.composite
def malformed_files(draw):
    data = draw(qubo_files_())
    text = data.decode("utf-8", errors="surrogateescape")
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, 2))):
        what = draw(st.integers(0, 3))
        k = draw(st.integers(0, len(lines)))
        if what == 0:
            lines.insert(k, draw(st.sampled_from(_BAD_LINES)))
        elif what == 1 and k < len(lines):
            lines[k] = draw(st.sampled_from(_BAD_LINES))
        elif what == 2 and k < len(lines):
            del lines[k]                  # a count off, or the header gone
        elif k < len(lines):
            lines[k] = lines[k] + draw(st.sampled_from([" 1", " c", "\xff", "\r", " 0.5"]))
    return "\n".join(lines).encode("utf-8", errors="surrogateescape")


@settings(max_examples=400, deadline=None)
@given(data=malformed_files())
def test_readers_agree_on_malformed_files(qubo_path, data):
    _write(qubo_path, data)
    _assert_same(_all_outcomes(qubo_path, data))


@pytest.mark.parametrize("bad", _BAD_LINES)
@pytest.mark.parametrize("where", ["after", "before"])
@pytest.mark.parametrize("size", [3, 100])        # 100: a non-digit read as a digit is in range
def test_each_bad_line_gives_the_original_outcome(qubo_path, bad, where, size):
    good = ["c offset 1.25", f"p qubo 0 {size} 2 1", "0 0 1.5", "1 1 -2.0", "0 1 0.25"]
    lines = good[:2] + [bad] + good[2:] if where == "before" else good + [bad]
    data = "\n".join(lines).encode("utf-8")
    _write(qubo_path, data)
    _assert_same(_all_outcomes(qubo_path, data))


# ---- fixed cases -------------------------------------------------------------------------------

def test_repeated_entries_add_up_in_file_order_bit_for_bit(qubo_path):
    # (0.1 + 0.2) + 0.3 != 0.1 + (0.2 + 0.3): the order shows in the last bit
    lines = ["p qubo 0 3 5 6", "0 1 0.1", "1 0 0.2", "0 1 0.3", "2 2 1e16", "2 2 1.0",
             "2 2 -1e16", "1 2 -0.0", "0 0 -0.0", "1 1 0.5", "2 1 1e-17", "2 1 1.0"]
    data = "\n".join(lines).encode()
    _write(qubo_path, data)
    out = _all_outcomes(qubo_path, data)
    _assert_same(out)
    q = read_qubo(qubo_path).Q
    assert q[0, 1] == (0.1 + 0.2) + 0.3 != 0.1 + (0.2 + 0.3)
    assert q[2, 2] == 0.0                                   # (1e16 + 1) - 1e16
    assert np.signbit(q[1, 2]) == np.signbit(0.0 + -0.0)    # +0.0, as q[a, b] += v gave


def test_sums_that_overflow_are_refused_by_both_readers(qubo_path):
    data = b"p qubo 0 2 0 2\n0 1 1.7e308\n1 0 1.7e308\n"
    _write(qubo_path, data)
    out = _all_outcomes(qubo_path, data)
    _assert_same(out)
    assert out["dense"] == ("error", f"QUBO file {qubo_path!r}: entries given more than once "
                                     "add up to an infinite value")


def test_a_file_written_by_qround_reads_as_before(tmp_path):
    problem = make_problem(seed=3, m=2, n=7, bits=3)
    path = tmp_path / "c.qubo"
    write_qubo(path, problem, 1, comment="two\nlines")
    data = path.read_bytes()
    _assert_same(_all_outcomes(str(path), data))


@pytest.mark.parametrize("brk", list(_OTHER_BREAKS))
def test_a_comment_holding_another_line_break_stays_a_comment(qubo_path, brk):
    # qbsolv reads lines up to \n: "c note<VT>0 0 5.0" is one comment, not an entry after it
    data = f"p qubo 0 3 1 0\nc note{brk}0 0 5.0\n1 1 2.0\n".encode()
    _write(qubo_path, data)
    q = read_qubo(qubo_path)
    assert q.Q[0, 0] == 0.0 and q.Q[1, 1] == 2.0
    assert read_qubo_bqm(qubo_path).linear[0] == 0.0
    # the earlier reader took the rest of the comment as an entry (and counted it)
    with pytest.raises(QroundError, match="announces 1 nodes"):
        _original_read_qubo(qubo_path, data)


def test_an_overflowing_repeat_is_refused_without_a_numpy_warning(qubo_path):
    import warnings

    data = b"p qubo 0 2 2 0\n0 0 1.7e308\n0 0 1.7e308\n"
    _write(qubo_path, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(QroundError, match="add up to an infinite value"):
            read_qubo_bqm(qubo_path)
        with pytest.raises(QroundError, match="add up to an infinite value"):
            read_qubo(qubo_path)


@pytest.mark.parametrize("data", [
    b"", b"\n", b"\xef\xbb\xbf", b"c only\n", b"p qubo 0 0 0 0", b"p qubo 0 0 0 0\n\n",
    b"0 0 1\np qubo 0 1 1 0\n", b"p qubo 0 1 1 0\r0 0 1\r", b"p qubo 0 1 1 0\r\r\n0 0 1\n",
    b"p qubo 0 1 1 0\n0 0 1\xff\n", b"c \xff\np qubo 0 1 1 0\n0 0 1\n",
    b"p qubo 0 1 1 0\n0 0 1\n\x00\n", b"p qubo 0 1 1 0\n\t \n 0 0 1 \n",
    b"p qubo 0 2 0 1\n0 1 1\np qubo 0 2 0 1\n", b"p qubo 0 100000 0 0\n",
    b"p qubo 0 100000001 0 0\n", b"p qubo x 2 1 0\n1 1 1\n", b"p qubo 0 02 +1 0\n1 1 1\n",
])
def test_edge_files_give_the_original_outcome(qubo_path, data):
    _write(qubo_path, data)
    _assert_same(_all_outcomes(qubo_path, data))
