"""Solvers of rounding problems: the contract, the registry, and every backend.

The names load on first use (see ``qround/_lazy.py``); the registry
(:mod:`qround.solvers.registry`) registers the built-in solvers when it loads, and
``available_solvers()`` lists them.
"""
import typing as _typing

from .._lazy import lazy_names as _lazy_names

# name -> the submodule that defines it
_LAZY = {"Solver": "base", "Solution": "base", "Chain": "base", "BestOf": "base",
         "make_solution": "base", "warm_up": "base",
         "register": "registry", "get_solver": "registry", "place": "registry",
         "available_solvers": "registry",
         "Nearest": "reference", "Stochastic": "reference", "Exact": "reference",
         "Greedy": "local", "steepest_descent": "local", "DimodSolver": "dimod_backend",
         "Anneal": "anneal", "Tabu": "tabu", "CrossEntropy": "cem", "GPTQ": "gptq",
         "Relaxation": "hopfield", "HopfieldClassic": "hopfield", "MeanField": "meanfield",
         "QroundSampler": "sampler"}

__all__ = ["Solver", "Solution", "Chain", "BestOf", "make_solution", "register", "get_solver",
           "place", "available_solvers", "Nearest", "Stochastic", "Exact", "Greedy",
           "DimodSolver", "steepest_descent", "Anneal", "Tabu", "CrossEntropy", "GPTQ",
           "Relaxation", "HopfieldClassic", "MeanField", "QroundSampler", "warm_up"]

if _typing.TYPE_CHECKING:   # for type checkers and IDEs: the names as if imported here
    from .anneal import Anneal
    from .base import BestOf, Chain, Solution, Solver, make_solution, warm_up
    from .cem import CrossEntropy
    from .dimod_backend import DimodSolver
    from .gptq import GPTQ
    from .hopfield import HopfieldClassic, Relaxation
    from .local import Greedy, steepest_descent
    from .meanfield import MeanField
    from .reference import Exact, Nearest, Stochastic
    from .registry import available_solvers, get_solver, place, register
    from .sampler import QroundSampler
    from .tabu import Tabu

__getattr__, __dir__ = _lazy_names(__name__, _LAZY, __all__)
