"""Channel QUBOs as plain-text files for any QUBO solver (the qbsolv ``.qubo`` format).

One file per output channel::

    c offset <float>          energy + offset = the channel's absolute cost (qround's line)
    c <comment lines>
    p qubo 0 <maxNodes> <nNodes> <nCouplers>
    <i> <i> <Q_ii>            nNodes lines: the linear terms
    <i> <j> <Q_ij>            nCouplers lines, i < j: the quadratic terms, each pair once

so ``E(x) = sum_i Q_ii x_i + sum_{i<j} Q_ij x_i x_j`` over ``x`` in {0, 1}^maxNodes.  Variable
``i`` is the problem's input ``i`` (the layer's input ``i``; for a problem made by
:meth:`~qround.problems.RoundingProblem.restrict`, its ``i``-th kept input, and the manifest
says ``"restricted": true``); ``x_i = 1`` rounds weight ``i`` of the channel up (ceil), 0
down (floor).  Weights clipped to the grid's end are fixed: they are in no line, and their
``x_i`` does not change the energy.  Pairs with a zero coupling (dead inputs) are left out.

:func:`export_qubos` writes a folder of them with a ``manifest.json`` that holds, per channel,
the offset and the energies and bit strings of known solutions (rounding-to-nearest, and any
solver's), and a certified lower bound on the energy (``qround.problems.bounds``), so a
solver's result can be compared without qround.  :func:`read_qubo` reads a
file back as an upper-triangular matrix.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np

from ..errors import QroundError
from ..files import atomic_write, missing_folders, remove_folders
from .rounding import RoundingProblem, _select

MANIFEST = "manifest.json"
MAX_DENSE_BYTES = 8 * 2 ** 30   # read_qubo builds a dense matrix: 32768 variables at most
MAX_NODES = 10 ** 8             # read_qubo_bqm: a BQM of this many variables takes gigabytes


@dataclass(frozen=True)
class QuboFile:
    """A ``.qubo`` file as read: ``Q`` (maxNodes, maxNodes) upper triangular with the linear
    terms on the diagonal, so ``E(x) = x @ Q @ x`` for binary ``x``; ``offset`` from the
    ``c offset`` line (0 when there is none); ``nodes`` the variables that have a linear line."""

    Q: np.ndarray
    offset: float
    nodes: np.ndarray

    def energy(self, x) -> float:
        """``E(x) = x @ Q @ x`` (without the offset) of a binary ``x``: a 0/1 array or a bit
        string (as in ``manifest.json``) of length maxNodes."""
        size = self.Q.shape[0]
        if isinstance(x, str):
            if set(x) - {"0", "1"}:
                raise QroundError("a bit string holds only the characters 0 and 1")
            x = [int(ch) for ch in x]
        x = np.asarray(x)
        if x.dtype == object or not (np.issubdtype(x.dtype, np.number)
                                     or x.dtype == np.bool_):
            raise QroundError(f"x must be a 0/1 vector, got dtype {x.dtype}")
        if x.shape != (size,):
            raise QroundError(f"x must hold {size} binary values (one per variable), "
                              f"got shape {x.shape}")
        x = x.astype(np.float64)
        if not np.all((x == 0) | (x == 1)):
            raise QroundError("x must be binary (0/1); a SPIN (-1/+1) sample converts as "
                              "(s + 1) / 2")
        return float(x @ self.Q @ x)


def qubo_text(problem: RoundingProblem, channel: int, comment: str = "") -> str:
    """The ``.qubo`` text of one channel (see the module docstring)."""
    c = problem._channel(channel)
    idx = np.flatnonzero(problem.free[c])
    q = problem.qubo(c)[np.ix_(idx, idx)]
    iu, ju = np.triu_indices(len(idx), k=1)
    quad = 2.0 * q[iu, ju]          # b^T Q b counts each symmetric pair twice
    keep = quad != 0.0
    iu, ju, quad = iu[keep], ju[keep], quad[keep]
    lines = [f"c offset {float(problem.const[c])!r}"]   # first: read_qubo takes the first one
    lines += [f"c {line}" for line in comment.splitlines()]
    lines.append(f"p qubo 0 {problem.num_inputs} {len(idx)} {len(quad)}")
    lines += [f"{i} {i} {float(v)!r}" for i, v in zip(idx.tolist(), np.diag(q).tolist())]
    lines += [f"{a} {b} {float(v)!r}"
              for a, b, v in zip(idx[iu].tolist(), idx[ju].tolist(), quad.tolist())]
    return "\n".join(lines) + "\n"


def write_qubo(path: str | os.PathLike, problem: RoundingProblem, channel: int,
               comment: str = "") -> None:
    """Write one channel's QUBO to ``path`` atomically."""
    text = qubo_text(problem, channel, comment)
    with atomic_write(path, binary=False, what="QUBO file") as f:
        f.write(text)


def read_qubo(path: str | os.PathLike) -> QuboFile:
    """Read a ``.qubo`` file (qbsolv format); QroundError naming the file and line otherwise."""
    path = os.fspath(path)
    size, offset, (i, j, v), nodes = _parse_qubo(path, _read_bytes(path, "QUBO file"),
                                                 dense=True)
    q = np.zeros((size, size))
    with np.errstate(over="ignore"):                # checked below
        # unbuffered, in file order: entries given twice add up as q[a, b] += v would
        np.add.at(q, (np.minimum(i, j), np.maximum(i, j)), v)
    if not np.isfinite(q).all():
        raise QroundError(f"QUBO file {path!r}: entries given more than once add up to an "
                          "infinite value")
    return QuboFile(Q=q, offset=offset, nodes=nodes)


def read_qubo_bqm(path: str | os.PathLike):
    """A ``.qubo`` file as a dimod ``BinaryQuadraticModel`` (BINARY, variables ``0..maxNodes-1``,
    the ``c offset`` line as its offset), built from the entries without a dense matrix, so
    sparse files of any size read; entries given twice add up, as in :func:`read_qubo`."""
    path = os.fspath(path)
    return _qubo_bqm(path, _read_bytes(path, "QUBO file"))


def _qubo_bqm(path: str, data: bytes):
    """:func:`read_qubo_bqm` of the file's bytes ``data``."""
    import dimod

    size, offset, (i, j, v), _ = _parse_qubo(path, data, dense=False)
    on = i == j
    linear = np.zeros(size)
    with np.errstate(over="ignore"):                # refused below
        np.add.at(linear, i[on], v[on])
    bqm = dimod.BinaryQuadraticModel.from_numpy_vectors(
        linear, (np.minimum(i[~on], j[~on]), np.maximum(i[~on], j[~on]), v[~on]), offset,
        dimod.BINARY)
    if not _finite_bqm(bqm):
        raise QroundError(f"QUBO file {path!r}: entries given more than once add up to an "
                          "infinite value")
    return bqm


def _finite_bqm(bqm) -> bool:
    lin, (_, _, quad), offset = bqm.to_numpy_vectors()
    return bool(np.isfinite(lin).all() and np.isfinite(quad).all() and np.isfinite(offset))


DIMOD_MAGIC = b"DIMODBQM"   # dimod's own serialisation (``bqm.to_file()``)


def read_bqm_file(path: str | os.PathLike):
    """A BQM file as a dimod ``BinaryQuadraticModel``: dimod's own serialisation (what
    ``bqm.to_file()`` writes; any labels, BINARY or SPIN), recognised by its header, or else a
    qbsolv ``.qubo`` text file (:func:`read_qubo_bqm`).  The file is read once, so a pipe
    (``/dev/stdin``, ``<(...)``) works too."""
    return _read_bqm_file(path)[0]


def _read_bytes(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise QroundError(f"cannot read {what} {path!r}: {exc}") from exc


def _read_bqm_file(path: str | os.PathLike):
    """(the BQM of :func:`read_bqm_file`, whether the file is dimod's serialisation)."""
    import io

    import dimod

    path = os.fspath(path)
    data = _read_bytes(path, "BQM file")
    head = data[:len(DIMOD_MAGIC)]
    if head != DIMOD_MAGIC:
        if head.startswith(b"DIMOD"):
            raise QroundError(f"{path!r} is a dimod file of another model "
                              f"({head.decode('ascii', 'replace')}), not a binary quadratic "
                              "model")
        return _qubo_bqm(path, data), False
    try:
        bqm = dimod.BinaryQuadraticModel.from_file(io.BytesIO(data))
    except Exception as exc:   # dimod raises what its parsers raise on a damaged file
        raise QroundError(f"{path!r} is not a readable dimod BQM file: "
                          f"{type(exc).__name__}: {exc}") from None
    if bqm.num_variables > MAX_NODES:
        raise QroundError(f"{path!r} has {bqm.num_variables} variables (at most {MAX_NODES})")
    if not _finite_bqm(bqm):
        raise QroundError(f"{path!r} holds NaN or infinite biases (or offset)")
    return bqm, True


def _parse_qubo(path: str, data: bytes, dense: bool):
    """(maxNodes, offset, (i, j, value) arrays in file order, sorted node indices) of a
    ``.qubo`` file's bytes, checked: header counts, indices in range, finite values;
    ``dense``: refuse what a dense matrix could not hold.  As qbsolv reads them, a line that
    starts with ``c`` or ``C`` is a comment (qround's first ``c offset <float>`` line excepted)
    and the header may start with ``p`` or ``P``.  A comment that gives an offset in another
    form (``c Offset: 3``, ``c offset=3``) is refused rather than skipped: a cost shifted by a
    lost offset is silent.  Text is UTF-8 (a byte-order mark is skipped); other bytes are
    accepted in comments only."""
    # undecodable bytes become U+FFFD: harmless in a comment, a parse error (with its line)
    # anywhere else
    text = data.decode("utf-8-sig", errors="replace")
    offset, header = None, None
    rows, cols, values = [], [], []   # the entries, in file order
    # lines end at \n, \r\n or \r only, not at every break str.splitlines() knows (\v, \f,
    # U+0085, U+2028 ...): a comment holding one would otherwise turn its rest into an entry.
    # Inside a line they separate tokens as any white space does ("1\v1 2.5" is an entry)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for number, line in enumerate(lines, 1):
        parts = line.split()
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
                rows.append(i)
                cols.append(j)
                values.append(v)
        except (ValueError, IndexError) as exc:
            raise QroundError(f"QUBO file {path!r}, line {number}: {exc}") from None
    if header is None:
        raise QroundError(f"QUBO file {path!r} has no 'p qubo' header")
    size, n_nodes, n_couplers = header
    i = np.array(rows, dtype=np.int64)   # 0 <= i < maxNodes <= MAX_NODES: checked above
    j = np.array(cols, dtype=np.int64)
    v = np.array(values, dtype=np.float64)
    on = i == j
    nodes, pairs = int(np.count_nonzero(on)), int(on.size - np.count_nonzero(on))
    if nodes != n_nodes or pairs != n_couplers:
        raise QroundError(f"QUBO file {path!r}: the header announces {n_nodes} nodes and "
                          f"{n_couplers} couplers, the file has {nodes} and {pairs}")
    offset = 0.0 if offset is None else offset
    if not np.isfinite(v).all() or not np.isfinite(offset):
        raise QroundError(f"QUBO file {path!r} holds NaN or infinite values")
    return size, offset, (i, j, v), np.unique(i[on])


_OFFSET_LIKE = re.compile(r"offset\s*[:=]?\s*[-+]?(\d|\.\d|inf|nan)", re.IGNORECASE)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _offset_like(line: str) -> bool:
    """Whether a comment line seems to give an offset: its text after ``c`` is "offset"
    (any case), then optionally ``:`` or ``=``, then a number (``offset=3``, ``Offset: -2.5``;
    not ``offsets are in manifest.json (v2)``)."""
    return _OFFSET_LIKE.match(line.strip()[1:].strip()) is not None


def bit_string(choices_row) -> str:
    """A channel's choices as a string of 0/1, input 0 first (fixed weights read 0)."""
    return "".join("1" if b else "0" for b in np.asarray(choices_row, dtype=bool))


def plan_export(folder: str | os.PathLike, problem: RoundingProblem,
                channels=slice(None)) -> tuple[np.ndarray, list[str]]:
    """The channel indices and file names :func:`export_qubos` would write; QroundError, before
    any work, when ``folder`` is a file or already holds one of those names."""
    idx = _select(channels, problem.num_channels, "channels")
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise QroundError(f"{folder!r} is a file; give a folder for the QUBO files")
    width = max(4, len(str(problem.num_channels - 1)))
    names = [f"c{c:0{width}d}.qubo" for c in idx.tolist()]
    clash = [n for n in names + [MANIFEST] if os.path.exists(os.path.join(folder, n))]
    if clash:
        raise QroundError(f"{folder!r} already holds {clash[:3]}{' ...' if len(clash) > 3 else ''}"
                          ": give an empty or new folder (nothing is overwritten)")
    return idx, names


def export_qubos(folder: str | os.PathLike, problem: RoundingProblem, channels=slice(None),
                 known: dict[str, np.ndarray] | None = None, source: str = "",
                 lower_bound: bool = True) -> dict:
    """Write one ``.qubo`` file per selected channel (``c0003.qubo`` for channel 3: at least
    four digits) and ``manifest.json`` into ``folder`` (created if missing); returns the
    manifest, whose ``channels[i]["file"]`` names each file.

    channels: a slice, indices or a mask (as :meth:`RoundingProblem.subproblem`).
    known: ``{label: choices (m, n)}`` of the whole problem whose energies and bit strings the
    manifest records (rounding-to-nearest is always there, as ``rtn``).  Nothing is
    overwritten: an existing file of the same name stops the export before anything is written.
    lower_bound: record each channel's certified lower bound on the energy
    (:meth:`RoundingProblem.lower_bound`; no ``x`` has a lower energy) as ``lower_bound``.
    """
    idx, names = plan_export(folder, problem, channels)
    folder = os.fspath(folder)
    solutions = {"rtn": problem.rtn_choices()}
    for label, choices in (known or {}).items():
        if not isinstance(label, str):
            raise QroundError(f"known solution labels must be strings, got {label!r}")
        if label in solutions:
            raise QroundError(f"known solution label {label!r} is reserved")
        b = problem.check_choices(choices, f"known[{label!r}]") > 0.5
        if b.shape != problem.weight.shape:
            raise QroundError(f"known[{label!r}] must be one solution of shape "
                              f"{problem.weight.shape}, got shape {b.shape}")
        solutions[label] = b & problem.free
    energies = {label: problem.energies(b) for label, b in solutions.items()}
    bounds = None
    if lower_bound:
        sub = problem.subproblem(idx)
        bounds = dict(zip(idx.tolist(), (sub.lower_bound().cost - sub.const).tolist()))
    made = missing_folders(folder)        # the folders this export creates, deepest first
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise QroundError(f"cannot create folder {folder!r}: {exc}") from exc
    m, n = problem.weight.shape
    g = problem.grid
    kind = "symmetric" if g.symmetric else "asymmetric"
    rows, written = [], []
    try:
        for c, name in zip(idx.tolist(), names):
            comment = (f"qround: layer {problem.name or '?'} ({m}x{n}), output channel {c}, "
                       f"{g.bits}-bit {kind} grid\n"
                       "x_i = 1: weight i rounded up (ceil), 0: down (floor)")
            written.append(os.path.join(folder, name))
            write_qubo(written[-1], problem, c, comment)
            rows.append({"channel": c, "file": name, "variables": int(problem.free[c].sum()),
                         "offset": float(problem.const[c]),
                         "solutions": {label: {"energy": float(energies[label][c]),
                                               "x": bit_string(solutions[label][c])}
                                       for label in solutions}})
            if bounds is not None:
                rows[-1]["lower_bound"] = bounds[c]
        manifest = {
            "format": "qbsolv .qubo: E(x) = sum_i Q_ii x_i + sum_{i<j} Q_ij x_i x_j; "
                      "E(x) + offset = the channel's absolute cost (qround's layer objective)",
            "layer": problem.name, "source": source, "shape": [m, n], "bits": g.bits,
            "symmetric": g.symmetric, "restricted": bool(problem.restricted), "channels": rows}
        with atomic_write(os.path.join(folder, MANIFEST), binary=False,
                          what="QUBO manifest") as f:
            f.write(json.dumps(manifest, indent=1) + "\n")
    except BaseException:
        for path in written:  # a failed export leaves no part of itself behind
            if os.path.exists(path):
                os.remove(path)
        remove_folders(made)            # only while empty: whatever else is there stays
        raise
    return manifest
