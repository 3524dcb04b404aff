"""qround: post-training quantisation with rounding solved as per-channel QUBOs.

The names below are imported on first use (PEP 562), so that ``qround --help`` and
``qround --version`` answer without loading torch, numba and dimod."""
import importlib as _importlib
import typing as _typing

from . import _forkstate  # noqa: F401 (registers the fork hook before any kernel is loaded)
from .errors import QroundError, SolverError

__version__ = "0.1.0"

# name -> the submodule that defines it
_LAZY = {"Grid": "grid", "GridSpec": "grid", "fit_grid": "grid", "qrange": "grid",
         "RoundingProblem": "problems", "Solution": "solvers", "Solver": "solvers",
         "available_solvers": "solvers", "get_solver": "solvers"}

__all__ = ["QroundError", "SolverError", "Grid", "GridSpec", "fit_grid", "qrange",
           "RoundingProblem", "Solution", "Solver", "available_solvers", "get_solver",
           "__version__"]

if _typing.TYPE_CHECKING:   # for type checkers and IDEs: the names as if imported here
    from .grid import Grid, GridSpec, fit_grid, qrange
    from .problems import RoundingProblem
    from .solvers import Solution, Solver, available_solvers, get_solver


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.isidentifier():   # getattr(qround, "") or "a.b": not a submodule's name
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    else:   # a submodule not imported yet (``import qround; qround.pipeline``)
        try:
            value = _importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise   # the submodule exists, and something it imports is missing
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
