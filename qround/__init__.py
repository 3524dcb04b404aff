"""qround: post-training quantisation with rounding solved as per-channel QUBOs."""
from .errors import QroundError, SolverError
from .grid import Grid, GridSpec, fit_grid, qrange
from .problems import RoundingProblem
from .solvers import Solution, Solver, available_solvers, get_solver

__version__ = "0.1.0"

__all__ = ["QroundError", "SolverError", "Grid", "GridSpec", "fit_grid", "qrange", "RoundingProblem", "Solution",
           "Solver", "available_solvers", "get_solver", "__version__"]
