"""qround: post-training quantisation with rounding solved as per-channel QUBOs.

The names below are imported on first use (PEP 562, see ``qround/_lazy.py``), so that
``qround --help`` and ``qround --version`` answer without loading torch, numba and dimod."""
import typing as _typing

from . import _forkstate  # noqa: F401 (registers the fork hook before any kernel is loaded)
from ._lazy import lazy_names as _lazy_names
from .errors import QroundError, SolverError

__version__ = "0.1.0"

# name -> the submodule that defines it
_LAZY = {"Grid": "grid", "GridSpec": "grid", "fit_grid": "grid", "qrange": "grid",
         "RoundingProblem": "problems.rounding", "Solution": "solvers.base",
         "Solver": "solvers.base", "available_solvers": "solvers.registry",
         "get_solver": "solvers.registry"}

__all__ = ["QroundError", "SolverError", "Grid", "GridSpec", "fit_grid", "qrange",
           "RoundingProblem", "Solution", "Solver", "available_solvers", "get_solver",
           "__version__"]

if _typing.TYPE_CHECKING:   # for type checkers and IDEs: the names as if imported here
    from .grid import Grid, GridSpec, fit_grid, qrange
    from .problems import RoundingProblem
    from .solvers import Solution, Solver, available_solvers, get_solver


__getattr__, __dir__ = _lazy_names(__name__, _LAZY, __all__)
