"""Solvers of rounding problems: the contract, the registry, and every backend.

Importing this package registers the built-in solvers; ``available_solvers()`` lists them.
"""
import functools

# the problems package whole before any solver module imports from its submodules (see _core)
from .. import problems as _problems  # noqa: F401

from .anneal import Anneal
from .base import BestOf, Chain, Solution, Solver, make_solution, warm_up
from .cem import CrossEntropy
from .dimod_backend import DimodSolver
from .gptq import GPTQ
from .hopfield import HopfieldClassic, Relaxation
from .local import Greedy, steepest_descent
from .meanfield import MeanField
from .reference import Exact, Nearest, Stochastic
from .sampler import QroundSampler
from .registry import available_solvers, get_solver, place, register
from .tabu import Tabu

register("nearest", Nearest, "rounding-to-nearest (the baseline)")
register("stochastic", Stochastic, "stochastic rounding, best of K samples")
register("exact", Exact, "exact optimum by enumeration (small channels only)")
register("greedy", Greedy, "steepest-descent single flips, batched over channels")
register("anneal", Anneal, "simulated annealing, batched over channels (numba)")
register("tabu", Tabu, "iterated tabu search, batched over channels (numba)")
register("dimod", DimodSolver, "any dimod sampler, one BQM per channel (sampler=...)")
register("neal", lambda **kw: DimodSolver("neal", **kw),
         "dwave-neal / dwave-samplers simulated annealing via dimod")
register("dwave-tabu", lambda **kw: DimodSolver("dwave-tabu", **kw),
         "dwave-samplers tabu search via dimod")
register("dwave-steepest", lambda **kw: DimodSolver("dwave-steepest", **kw),
         "dwave-samplers steepest descent via dimod")
register("cem", CrossEntropy, "cross-entropy method from stochastic-rounding probabilities (torch)")
register("gptq", GPTQ, "GPTQ sequential rounding with error feedback, floor/ceil only (torch)")
register("hopfield", Relaxation, "AdaRound continuous relaxation (rectified sigmoid, Adam; torch)")
register("meanfield", MeanField, "mean-field annealing, damped synchronous steps (torch)")
register("hopfield-classic", HopfieldClassic,
         "classical Hopfield relaxation, sigmoid(V/T) with annealed T (torch)")
register("tabu-fast", functools.partial(Tabu, restarts=0, iters_per_var=1.0),
         "one short tabu round (about n flips per channel)")

# Named defaults (chosen from benchmarks/solvers.py, see BENCHMARKS.md). Local search from RTN
# stalls on wide layers (1536 inputs); GPTQ's error feedback gives it a far better basin.
# From GPTQ's start the first-improvement descent does not pay: about n tabu flips without it
# were as good or better on every MiniLM/CNN layer of the benchmark, and a little faster.
register("fast", lambda: Chain(GPTQ(), Tabu(restarts=0, iters_per_var=1.0, descent=False),
                               label="fast"),
         "default for speed: gptq, then one short tabu round")
# `quality` searches three basins from GPTQ's start and keeps the best per channel: iterated tabu
# search; a short anneal (1000 sequential sweeps) followed by tabu; mean-field annealing
# followed by tabu.  The anneal leaves GPTQ's basin where tabu stalls (2-bit convs, where it cut
# the layer cost by up to a quarter); tabu alone stays best where the start is already good
# (3-4-bit convs); mean-field annealing, a deterministic relaxation that ignores the start, finds
# other basins again (on the convs its branch cut the cost 2-4 % at every width).  Each branch's
# tabu search has 3 rounds (it had 5 with two branches), so the three together take 1.0-1.26x
# the time the two did.  A tabu round ends after 4000 iterations without a new best: on layers of up
# to 400 inputs (10 n iterations per round) that never happens; on 1536-input layers, where tabu
# stalls after an anneal, it halved the time and gave the same costs.  BENCHMARKS.md 1d and 1j.
register("quality", lambda: Chain(
    GPTQ(), BestOf(Tabu(stall=4000, restarts=2),
                   Chain(Anneal(order="sequential"), Tabu(stall=4000, restarts=2)),
                   Chain(MeanField(), Tabu(stall=4000, restarts=2))), label="quality"),
         "default for quality: gptq, then the best per channel of iterated tabu search, "
         "anneal + tabu and mean-field annealing + tabu")

__all__ = ["Solver", "Solution", "Chain", "BestOf", "make_solution", "register", "get_solver", "place",
           "available_solvers", "Nearest", "Stochastic", "Exact", "Greedy", "DimodSolver",
           "steepest_descent", "Anneal", "Tabu", "CrossEntropy", "GPTQ", "Relaxation", "HopfieldClassic",
           "MeanField", "QroundSampler", "warm_up"]
