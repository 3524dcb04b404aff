"""The solver contract: one ``Solver`` interface, one ``Solution`` type, and composition.

A solver implements ``_solve(problem, start, rng) -> choices`` (m, n); the base class does the
rest the same way for every backend: validates the start (RTN by default), times the work,
respects fixed variables, keeps per channel the better of start and result (so no solver ever
returns worse than its start), and packages energies, absolute costs and the RTN cost.
On small layers, numpy's BLAS is held to one thread while a solve runs
(:func:`single_threaded_blas`).

Composition lives in wrappers, not flags: ``Chain(a, b)`` runs ``a`` then polishes with ``b``
from ``a``'s result; ``BestOf(a, b, ...)`` keeps per channel the best of several solvers.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np

from ..errors import QroundError, SolverError, to_numpy
from ..problems.rounding import RoundingProblem

_blas_lock = threading.Lock()
_blas_hold: dict = {"count": 0}
# Below this many multiply-adds in one product with H (m n^2), a solve holds BLAS to one thread.
BLAS_LIMIT_BELOW = 2 ** 27


@contextlib.contextmanager
def single_threaded_blas(problem: RoundingProblem | None = None):
    """Hold numpy's BLAS (OpenBLAS, MKL; via threadpoolctl) to one thread, restoring it after;
    with ``problem``, only where one product with its H (m n^2 multiply-adds) is below
    :data:`BLAS_LIMIT_BELOW` (about 6 ms on one core of the development machine).

    The solvers' parallelism is over channels, in numba kernels and torch.  OpenBLAS's idle
    workers keep spinning for a while after each call and take the cores from a numba kernel
    that follows.  On 2 cores, with every pool at 2 threads, ``fast`` on a 384x384 MiniLM layer
    took 0.12-0.15 s (median) with BLAS free and 0.045 s with it held to one thread (BENCHMARKS.md,
    section 1h).  Larger products keep their BLAS threads: there they pay for themselves, and
    a spin is small next to the kernels.  Nested uses (``Chain``, ``BestOf``) and solves
    in several threads at once act once.
    torch's pip wheels link their BLAS statically, out of threadpoolctl's reach; where torch
    shares a BLAS library with numpy (MKL in some conda builds), its CPU solvers are held too.
    """
    if problem is not None and \
            problem.num_channels * problem.num_inputs ** 2 >= BLAS_LIMIT_BELOW:
        yield
        return
    # the limit is the process's, so holders in several threads share one count: the first
    # in sets it, the last out restores the original (a per-thread count restored 1 for good)
    with _blas_lock:
        if _blas_hold["count"] == 0:
            _blas_hold["limiter"] = _blas_controller().limit(limits=1, user_api="blas")
        _blas_hold["count"] += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_hold["count"] -= 1
            if _blas_hold["count"] == 0:
                _blas_hold.pop("limiter").restore_original_limits()


def _blas_controller():
    """A threadpoolctl controller that knows every BLAS loaded so far (scipy, for one, brings
    its own OpenBLAS: a controller made before that import would miss it)."""
    from threadpoolctl import ThreadpoolController

    controller, modules = _blas_hold.get("controller", (None, -1))
    if controller is None or modules != len(sys.modules):
        controller = ThreadpoolController()
        _blas_hold["controller"] = (controller, len(sys.modules))
    return controller


@dataclass(frozen=True, eq=False)
class Solution:
    """The result of a solver on one problem.

    choices (m, n) bool: round up; codes (m, n) int64: integer grid codes; energy, cost,
    rtn_cost (m,): QUBO energy, absolute cost and RTN cost per channel; seconds: wall time;
    cost_noise: the round-off of the summed costs (energy + const cancels: weights already on
    the grid cost about 1e-17, of either sign), below which :attr:`ratio` takes a sum for 0.
    """

    choices: np.ndarray
    codes: np.ndarray
    energy: np.ndarray
    cost: np.ndarray
    rtn_cost: np.ndarray
    seconds: float
    solver: str
    info: dict = field(default_factory=dict)
    cost_noise: float = 0.0

    @property
    def total_cost(self) -> float:
        return float(np.sum(self.cost))

    @property
    def total_rtn_cost(self) -> float:
        return float(np.sum(self.rtn_cost))

    @property
    def ratio(self) -> float:
        """Summed cost relative to RTN (lower is better); 1.0 when RTN is already exact, NaN
        when RTN's summed cost is negative: the costs of an asymmetric problem built without
        ``float_hessian`` are relative (their constant is left out), and only differences of
        them mean something (compare ``total_cost`` with ``total_rtn_cost``)."""
        return cost_ratio(self.total_cost, self.total_rtn_cost, self.cost_noise)

    def summary(self) -> dict[str, Any]:
        return {"solver": self.solver, "cost": self.total_cost, "rtn_cost": self.total_rtn_cost,
                "ratio": self.ratio, "seconds": self.seconds}


def make_solution(problem: RoundingProblem, choices: np.ndarray, seconds: float, solver: str,
                  info: dict | None = None, energy: np.ndarray | None = None) -> Solution:
    """The Solution of ``choices`` (m, n); ``energy`` (m,): their energies when the caller
    already has them (saves one product with H)."""
    b = np.asarray(choices, dtype=bool) & problem.free
    e = problem.energies(b) if energy is None else np.array(energy, dtype=np.float64)
    # the Solution owns its arrays: the problem's cached RTN costs are read-only and shared
    return Solution(choices=b, codes=problem.codes(b), energy=e, cost=e + problem.const,
                    rtn_cost=problem.rtn_costs().copy(), seconds=seconds, solver=solver,
                    info=dict(info or {}), cost_noise=cost_noise(problem))


def cost_ratio(cost: float, rtn: float, noise: float = 0.0) -> float:
    """``cost / rtn`` as :attr:`Solution.ratio` reads it: a summed RTN cost within ``noise``
    (the round-off of :func:`cost_noise`) is zero, so weights already on the grid give 1.0,
    not NaN for -3e-17 or 0.0 for 0 / 6e-16; NaN where RTN's cost is negative (relative
    costs)."""
    if abs(rtn) <= noise:
        if abs(cost) <= noise:
            return 1.0
        return float("inf") if cost > 0 else float("nan")
    if rtn < 0:
        return float("nan")
    return cost / rtn


def cost_noise(problem: RoundingProblem) -> float:
    """The round-off of a problem's summed costs: ``1e-13 n sum_c sum_j H_jj w_cj^2`` (the
    cost's own scale, ``w^T H w`` for local MSE, bounded through the diagonal; the cancelling
    sums run over n terms).  O(m n), computed once per problem."""
    if "cost_noise" not in problem._cache:
        hd = problem.hessian_diag
        scale = float(np.sum(problem.weight ** 2 * (hd if hd.ndim == 2 else hd[None])))
        problem._cache["cost_noise"] = 1e-13 * problem.num_inputs * scale
    return problem._cache["cost_noise"]


def prepare(problem: RoundingProblem) -> RoundingProblem:
    """``problem`` with the setup that solvers cache on it computed (RTN energies and costs,
    the cost round-off): a benchmark calls it before timing solvers on a shared problem, or the
    first solver to run would pay for what the others then read for free."""
    problem.rtn_energies()
    problem.rtn_costs()
    cost_noise(problem)
    return problem


def _part_key(seen: dict, label: str, i: int) -> str:
    """A composite's info key for its part ``i``: the label, with ``#<position>`` (from 1) added
    when an earlier part has the same label (``stochastic|stochastic``)."""
    return label if label not in seen else f"{label}#{i + 1}"


def resolve_start(problem: RoundingProblem, init) -> np.ndarray:
    """A start as (m, n) bool: None -> RTN; a Solution or 0/1 choices (m, n).  Integer grid
    codes are not accepted here: convert them with ``problem.choices_from_codes`` first."""
    if init is None:
        return problem.rtn_choices()
    if isinstance(init, Solution):
        init = init.choices
    arr = to_numpy(init)
    if arr.shape != problem.weight.shape:
        raise QroundError(f"init must have shape {problem.weight.shape}, got {arr.shape}")
    if arr.dtype != bool and not np.all((arr == 0) | (arr == 1)):
        raise QroundError("init must be 0/1 choices (1 = round up); integer grid codes "
                          "convert with problem.choices_from_codes(codes)")
    return problem.check_choices(arr, "init").astype(bool) & problem.free


def spawn_rng(seed) -> np.random.Generator:
    """A private generator; never touches numpy's or torch's global state."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, (bool, np.bool_))
                             or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise QroundError(f"seed must be None, a non-negative integer or a "
                          f"numpy.random.Generator, got {seed!r}")
    return np.random.default_rng(seed)


class Solver(ABC):
    """Base class of every solver. Constructors store parameters only; work happens in ``solve``.

    Subclasses set ``name`` and implement :meth:`_solve`.  ``parameters`` lists constructor
    arguments for introspection (as dimod samplers do).
    """

    name: ClassVar[str] = "solver"

    def solve(self, problem: RoundingProblem, init=None, seed=None) -> Solution:
        """Solve every channel of ``problem``.

        init: start (None = RTN): a Solution or (m, n) 0/1 choices.
        seed: int, None or ``np.random.Generator``; equal seeds give equal results, and
        ``None`` draws fresh randomness from the operating system on every call (two calls may
        differ; ``QuantConfig.seed`` defaults to 0 instead).  A Generator is advanced, never
        numpy's, torch's or ``random``'s global state.
        """
        if not isinstance(problem, RoundingProblem):
            raise QroundError(f"solve() needs a RoundingProblem, got {type(problem).__name__}")
        with single_threaded_blas(problem):
            energy = problem.rtn_energies() if init is None else None  # cached on the problem
            return self._solve_stage(problem, resolve_start(problem, init), energy,
                                     spawn_rng(seed))

    def _solve_stage(self, problem: RoundingProblem, start: np.ndarray,
                     start_energy: np.ndarray | None, rng: np.random.Generator) -> Solution:
        """:meth:`solve` on a resolved start.  start_energy: its exact energies (m,)
        (``problem.energies``) when the caller has them, as ``Chain`` and ``BestOf`` do for the
        result of a previous stage; computed otherwise."""
        e_start = problem.energies(start) if start_energy is None else start_energy
        t0 = time.perf_counter()
        out = self._solve_from(problem, start.copy(), e_start, rng)
        seconds = time.perf_counter() - t0
        out = out if isinstance(out, tuple) else (out,)
        # energies come only from a composite's _solve_from, which computes them exactly; a
        # third item from a plain _solve would skip the recomputation and the start check
        composite = type(self)._solve_from is not Solver._solve_from
        if not 1 <= len(out) <= (3 if composite else 2):
            raise SolverError(f"solver {self.label!r} returned a tuple of {len(out)} items; "
                              "_solve returns choices or (choices, info dict)")
        choices, info, energy = out + ({}, None)[len(out) - 1:]
        if not isinstance(info, Mapping):
            raise SolverError(f"solver {self.label!r} returned info of type "
                              f"{type(info).__name__}; _solve returns choices or (choices, "
                              "info dict)")
        choices = to_numpy(choices)
        if choices.shape != problem.weight.shape:
            raise SolverError(f"solver {self.label!r} returned shape {choices.shape}, "
                              f"expected {problem.weight.shape}")
        if choices.dtype != bool and not np.isin(choices, (0, 1)).all():
            raise SolverError(f"solver {self.label!r} returned values other than 0 and 1 (a "
                              "choice per weight: 1 rounds up); integer codes become choices "
                              "with problem.choices_from_codes")
        masked = choices.astype(bool) & problem.free
        # energies a composite passes on hold for its choices exactly as returned
        e_new = (energy if energy is not None and choices.dtype == bool
                 and np.array_equal(masked, choices) else problem.energies(masked))
        # Keep, per channel, the better of start and result: no solver returns worse than its start.
        worse = e_new > e_start
        if np.any(worse):
            masked = np.where(worse[:, None], start, masked)
            info = {**info, "channels_kept_start": int(worse.sum())}
        return make_solution(problem, masked, seconds, self.label, info,
                             energy=np.where(worse, e_start, e_new))

    def _solve_from(self, problem: RoundingProblem, start: np.ndarray, start_energy: np.ndarray,
                    rng: np.random.Generator):
        """:meth:`_solve` given the start's exact energies too; composites override it and may
        return ``(choices, info, energies)`` with the exact energies of ``choices``."""
        return self._solve(problem, start, rng)

    @abstractmethod
    def _solve(self, problem: RoundingProblem, start: np.ndarray, rng: np.random.Generator):
        """Return choices (m, n) bool, or ``(choices, info_dict)``."""

    @property
    def label(self) -> str:
        """The name shown in reports: the registry name it was built from, else ``name``."""
        return self.__dict__.get("_label") or self.name

    @property
    def parameters(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.parameters.items())
        return f"{type(self).__name__}({args})"


def _members(kind: str, solvers) -> list:
    if not solvers:
        raise QroundError(f"{kind} needs at least one solver")
    for i, s in enumerate(solvers):
        if not isinstance(s, Solver):
            hint = " (build it with qround.get_solver)" if isinstance(s, str) else ""
            raise QroundError(f"{kind}'s member {i} is not a Solver: {s!r}{hint}")
    return list(solvers)


def _check_label(label):
    if label is not None and (not isinstance(label, str) or not label):
        raise QroundError(f"label must be a non-empty string or None, got {label!r}")
    return label


class Chain(Solver):
    """Run solvers in sequence, each starting from the previous result (e.g. ``gptq+tabu``)."""

    name = "chain"

    def __init__(self, *solvers: Solver, label: str | None = None):
        self.solvers = _members("Chain", solvers)
        self._label = _check_label(label)

    @property
    def label(self) -> str:
        """The members' labels joined by ``+``; a member that is a choice (``a|b``) in
        parentheses, so the label reads back as this chain (``'+'`` binds tighter)."""
        if self._label:
            return self._label
        from .registry import _split_top

        def member(label: str) -> str:
            try:
                choice = len(_split_top(label, "|", label)) > 1
            except QroundError:   # a user's label that is no spec: shown as it is
                choice = False
            return f"({label})" if choice else label

        return "+".join(member(s.label) for s in self.solvers)

    def _solve(self, problem, start, rng):
        return self._solve_from(problem, start, problem.energies(start), rng)

    def _solve_from(self, problem, start, start_energy, rng):
        sol, energy, info = start, start_energy, {}
        for i, s in enumerate(self.solvers):  # each stage gets the previous one's energies
            step = s._solve_stage(problem, sol, energy, rng)
            info[_part_key(info, s.label, i)] = {"ratio": step.ratio, "seconds": step.seconds}
            sol, energy = step.choices, step.energy
        return sol, {"steps": info}, energy


class BestOf(Solver):
    """Run several solvers from the same start and keep, per channel, the lowest energy."""

    name = "best"

    def __init__(self, *solvers: Solver, label: str | None = None):
        self.solvers = _members("BestOf", solvers)
        self._label = _check_label(label)

    @property
    def label(self) -> str:
        return self.__dict__.get("_label") or "|".join(s.label for s in self.solvers)

    def _solve(self, problem, start, rng):
        return self._solve_from(problem, start, problem.energies(start), rng)

    def _solve_from(self, problem, start, start_energy, rng):
        """``info["channels_won"]``: per part, the channels whose kept solution is that part's
        (the earliest part's on a tie; a channel no part improved on its start is nobody's)."""
        best, best_e = start, start_energy
        owner = np.full(len(start_energy), -1)
        keys = []
        for i, s in enumerate(self.solvers):
            sol = s._solve_stage(problem, start, start_energy, rng)
            better = sol.energy < best_e
            keys.append(_part_key(dict.fromkeys(keys), s.label, i))
            owner = np.where(better, i, owner)
            best = np.where(better[:, None], sol.choices, best)
            best_e = np.where(better, sol.energy, best_e)
        wins = {key: int((owner == i).sum()) for i, key in enumerate(keys)}
        return best, {"channels_won": wins}, best_e


def warm_up_problem() -> RoundingProblem:
    """A small random problem (its own generator, 2 channels x 16 inputs, 3 bits)."""
    from ..grid import GridSpec

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16))
    return RoundingProblem.from_weight(rng.normal(size=(2, 16)), x.T @ x / 64, GridSpec(bits=3))


def warm_up(*solvers, **sample_options) -> None:
    """Solve a small problem with each solver, untimed, so that later calls time the work only.

    The first call in a process of a numba solver (``tabu``, ``anneal``, ``gptq``...) loads its
    compiled kernels from numba's cache (about 0.3 s; the first process after an install or
    upgrade compiles them, on one thread: minutes), torch solvers pay their first-call setup, and
    dimod samplers import their libraries.  That time lands in the first ``Solution.seconds`` unless
    a warm-up took it: ``qround solve``, ``quantize``, ``demo``, ``bench`` and ``sample``
    warm up before timing.  A dimod sampler (``QroundSampler`` or any object with ``sample``)
    samples a small dense and a small sparse BQM, with ``sample_options``.
    """
    tiny = None
    for solver in solvers:
        try:
            if isinstance(solver, Solver):
                tiny = warm_up_problem() if tiny is None else tiny
                solver.solve(tiny, seed=0)
            else:
                import dimod

                options = _small_budget(sample_options)
                for density in (0.5, 0.05):  # QroundSampler anneals sparse BQMs apart
                    bqm = dimod.generators.gnp_random_bqm(60, density, "BINARY",
                                                          random_state=0)
                    try:
                        solver.sample(bqm, num_reads=2, seed=0, **options)
                    except (ValueError, TypeError, OverflowError):  # a dwave sampler's
                        break       # refusal of an option: the real call reports it
        except Exception:  # noqa: BLE001 (e.g. a DimodSolver restricted to channels the tiny
            pass           # problem lacks, a user's solver for wide layers only: the real call
            #                reports its own errors, on the user's problem)


# a sampler's budget options, and the most a warm-up spends of each (it loads kernels, it does
# not search): tabu's timeout (ms) and time_limit (s), restarts and iterations, sweeps
_WARM_UP_BUDGET = {"timeout": 1.0, "time_limit": 1e-3, "restarts": 1, "num_restarts": 1,
                   "max_iter": 100, "num_sweeps": 10, "num_sweeps_per_beta": 1}


def _small_budget(options: dict) -> dict:
    """``options`` with each numeric budget option at most its warm-up value; others as given
    (an invalid value stays, so the warm-up's sample call refuses it as the real one would)."""
    out = dict(options)
    for key, most in _WARM_UP_BUDGET.items():
        if key.startswith("num_sweeps") and out.get("beta_schedule") is not None:
            continue   # a custom schedule fixes the sweeps
        value = out.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > most:
            out[key] = int(most) if isinstance(value, int) and most >= 1 else float(most)
    return out
