"""Reports as data, shown as tables: one row per (layer, solver)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from .errors import QroundError
from .files import atomic_write
from .solvers.base import Solution, cost_ratio


@dataclass(frozen=True)
class SolveRecord:
    """One solver's result on one layer: summed costs over the channels solved."""

    layer: str
    shape: tuple[int, int]
    solver: str
    cost: float
    rtn_cost: float
    ratio: float
    seconds: float
    channels: int
    cost_noise: float = 0.0   # round-off of the summed costs (Solution.cost_noise)

    @classmethod
    def from_solution(cls, layer: str, solution: Solution) -> "SolveRecord":
        return cls(layer=layer, shape=tuple(solution.choices.shape), solver=solution.solver,
                   cost=solution.total_cost, rtn_cost=solution.total_rtn_cost,
                   ratio=solution.ratio, seconds=solution.seconds,
                   channels=solution.choices.shape[0], cost_noise=solution.cost_noise)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _fmt(v, significant: bool = False) -> str:
    if isinstance(v, float) and significant:
        return f"{v:.6g}"
    if isinstance(v, float):
        if v == 0 or math.isnan(v):
            return f"{v:.4g}"
        return f"{v:.4f}" if 1e-3 <= abs(v) < 1e4 else f"{v:.4g}"
    if isinstance(v, (tuple, list)):
        return "x".join(map(str, v))
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None,
                 significant: Sequence[str] = ()) -> str:
    """A plain-text table of dict rows (monospace, right-aligned numbers); floats with four
    decimals between 1e-3 and 1e4, the ``significant`` columns' with six significant digits."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, ""), c in significant) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def totals(records: Iterable[SolveRecord]) -> dict:
    """Summed cost, RTN cost, their ratio and seconds over records."""
    records = list(records)
    cost = sum(r.cost for r in records)
    rtn = sum(r.rtn_cost for r in records)
    ratio = cost_ratio(cost, rtn, sum(r.cost_noise for r in records))   # as Solution.ratio
    return {"cost": cost, "rtn_cost": rtn, "ratio": ratio,
            "seconds": sum(r.seconds for r in records)}


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (see :func:`qround.files.atomic_write`), creating its folder."""
    with atomic_write(path, binary=False, make_folder=True) as f:
        f.write(text)


def _json_value(value):
    """numpy scalars and arrays as their Python values (an int stays an int), tuples of them
    too; anything else as its text."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _finite(value):
    """``value`` with every NaN or infinite float (a ratio of relative costs, a gap to a best
    of zero) as None: JSON has no NaN, and readers other than Python's refuse it."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_text(data, indent: int | None = None) -> str:
    """``data`` as strict JSON: numpy values as Python's, non-finite numbers as null."""
    return json.dumps(_finite(data), indent=indent, allow_nan=False,
                      default=lambda v: _finite(_json_value(v)))


def environment() -> dict[str, str | int | None]:
    """What a benchmark ran on: the versions of Python and of the numerical libraries (tabu
    and annealing costs can differ in the 4th decimal between numba/numpy versions), and the
    machine.  Libraries not installed read None."""
    import importlib.metadata
    import platform

    from . import __version__

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"qround": __version__, "python": platform.python_version(),
            **{name: version(name) for name in ("numpy", "scipy", "torch", "numba", "dimod",
                                                 "dwave-samplers")},
            "machine": platform.machine(),
            "processor": _cpu_model() or platform.processor() or None,
            "cpus": os.cpu_count(), "torch_cpu_capability": _torch_cpu_capability(),
            "threads": _threads()}


def _threads() -> dict[str, int | None]:
    """The CPU thread counts in effect now: torch's intra-op threads and numba's (the solver
    kernels'); None for a library that is not loaded (it is not imported here)."""
    import sys

    torch, numba = sys.modules.get("torch"), sys.modules.get("numba")
    torch_threads = torch.get_num_threads() if torch is not None else None
    try:
        # the first call starts numba's threading layer; its OpenMP layer sets the OpenMP
        # runtime's count, which torch shares: the caller's torch count is put back
        numba_threads = numba.get_num_threads() if numba is not None else None
    except Exception:  # noqa: BLE001 (a threading layer that cannot start)
        numba_threads = None
    finally:
        if torch is not None and torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
    return {"torch": torch_threads, "numba": numba_threads}


def _cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU's model name on Linux (platform.processor() is empty there).  Floating-point
    results (torch's and BLAS's kernels, and so trained weights and solver trajectories) can
    differ between CPUs, so a result file says which one it came from."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, colon, value = line.partition(":")
                if colon and key.strip().lower() == "model name":
                    return value.strip() or None
    except OSError:
        pass
    return None   # no such line on some ARM kernels, nor anywhere but Linux


def _torch_cpu_capability() -> str | None:
    """The vector instruction set torch's CPU kernels dispatch to ("AVX512", "AVX2"...)."""
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:   # no torch, an old one, or a build that cannot tell: a fact left out
        return None


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """``data`` as indented strict JSON (:func:`json_text`), written atomically (see
    :func:`write_text_atomic`)."""
    write_text_atomic(path, json_text(data, indent=2) + "\n")


def write_npz_atomic(path: str | os.PathLike, **arrays) -> None:
    """``np.savez`` to ``path`` atomically; a failure leaves any existing file as it was."""
    import numpy as np

    with atomic_write(path, make_folder=True) as f:
        np.savez(f, **arrays)


def require_pyplot() -> None:
    """QroundError when matplotlib is not installed (check before work whose end is a plot)."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise QroundError("plots need matplotlib: pip install 'qround[examples]' or "
                          "pip install matplotlib") from None


def new_figure(**kwargs):
    """A matplotlib ``Figure`` not registered with pyplot (no backend switch, no global state
    touched; nothing to close), or QroundError when matplotlib is not installed."""
    require_pyplot()
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure_atomic(fig, path: str | os.PathLike, what: str = "plot") -> None:
    """Write ``fig`` as PNG to ``path`` atomically (parent folders created)."""
    with atomic_write(path, what=what, make_folder=True) as f:
        fig.savefig(f, format="png", dpi=110)
