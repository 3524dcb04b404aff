"""qround's tabu search and simulated annealing as a dimod sampler, for any binary quadratic model.

The kernels of :mod:`qround.solvers.tabu` and :mod:`qround.solvers.anneal` solve many dense
QUBOs that share one matrix, one per output channel of a layer.  A dimod BQM becomes the same
thing with one "channel" per read: every read searches the BQM's dense QUBO from its own start
with its own random stream, all reads in one compiled call (in parallel over numba's threads).
So a QUBO researcher can run qround's search on their own problems next to dwave-samplers::

    import dimod
    from qround.solvers import QroundSampler

    bqm = dimod.generators.gnp_random_bqm(200, 0.5, "SPIN", random_state=1)
    best = QroundSampler("tabu").sample(bqm, num_reads=4, seed=0).first

The BQM (BINARY or SPIN) is taken to the QUBO ``E(b) = b^T H b + g^T b + offset`` with ``H``
the symmetric half of the quadratic biases (zero diagonal) and ``g`` the linear biases; a SPIN
model goes through ``change_vartype`` and its samples come back as spins.  Every returned
energy is recomputed by dimod from the BQM, so it is exact whatever the kernels did.

Starts follow dimod's ``Initialized`` conventions (``initial_states``, with
``initial_states_generator`` "random", "tile" or "none"); a sample is the best state its read
saw, never worse than its start.  Annealing then takes that state down to a local minimum by
zero-temperature sweeps (every single flip that lowers the energy, in input order, until none
does; ``descent=False`` returns the best state seen as it is): the best state seen can lie
where one flip still improves it, when the anneal left it uphill before visiting that flip.
A flip counts as lowering the energy when it gains more than :data:`DESCENT_TOL` times the sum
of the absolute biases on its variable (the round-off scale of its delta).

Tabu search's tenure is ``min(20, n // 2)`` unless given (dwave-samplers' cap; the layer
solver's is 10), and its ties go to a random one of the tied flips (``ties="random"``; the
layer solver's default takes the lowest index): with integer biases (spin glasses, Max-Cut)
many flips tie, and always taking the lowest index walks the same few variables.  Tabu
search holds the matrix dense (n variables take ``8 n^2`` bytes); annealing holds it in CSR
form below :data:`SPARSE_BELOW` density, with a kernel that makes the dense one's decisions
(up to round-off in the start's fields) at a cost per flip of the variable's couplings.

Annealing takes its inverse temperatures from the BQM's biases, as dwave-samplers' simulated
annealing does (``default_beta_range``), unless ``beta_range`` is given: the layer solver's
default, a range from the flip deltas at the start, suits a good start such as RTN but not an
arbitrary one (a start where few flips change the energy would set it alone).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import dimod
import numpy as np

from .._warn import warn_user
from ..errors import QroundError, check_bool, check_int, check_real
from ..problems import energy as _energy
from ..problems.qubo_files import MAX_DENSE_BYTES
from . import _kernels
from .anneal import Anneal
from .base import single_threaded_blas, spawn_rng
from .tabu import MAX_TIME_LIMIT, Tabu

METHODS = {"tabu": Tabu, "anneal": Anneal}
# the solver parameters a sample() call takes, by method (those of the solver's constructor)
_SOLVER_PARAMETERS = {
    "tabu": ("max_iter", "restarts", "tenure", "stall", "perturb", "iters_per_var", "descent",
             "reset_every", "time_limit", "timeout", "ties"),
    "anneal": ("num_sweeps", "restarts", "order", "beta_range", "beta_schedule_type",
               "num_sweeps_per_beta", "beta_schedule", "descent"),
}
# the sampler's own parameters, by method (not the solver's): annealing's final descent
_SAMPLER_PARAMETERS = {"tabu": (), "anneal": ("descent",)}
# a descent flip of variable i must gain more than this times the sum of |bias| on i (its
# linear bias and its couplings): the round-off scale of that variable's own delta
DESCENT_TOL = 1e-12
# the final descent's sweeps per read, at most: 10 n + this (a descent takes a few sweeps; a
# chain of flips that each enable the next, one per sweep, takes up to n)
DESCENT_SWEEPS = 100
# dwave-samplers' arguments that QroundSampler spells otherwise or does not have
DWAVE_NAMES = {   # by (method, name); None: any method
    ("tabu", "num_restarts"): "dwave's num_restarts is restarts here",
    ("anneal", "randomize_order"): "dwave's randomize_order is order='random' or "
                                   "'sequential' here",
    ("anneal", "timeout"): "annealing has no time budget; set num_sweeps",
    (None, "energy_threshold"): "energy_threshold is not supported",
    (None, "interrupt_function"): "interrupt_function is not supported",
    ("anneal", "proposal_acceptance_criteria"): "only Metropolis acceptance is supported",
    ("tabu", "coefficient_z_first"): "dwave's tabu tuning coefficients have no counterpart",
    ("tabu", "coefficient_z_restart"): "dwave's tabu tuning coefficients have no counterpart",
    ("tabu", "lower_bound_z"): "dwave's tabu tuning coefficients have no counterpart",
}
# annealing works on H in CSR form below this fraction of the possible couplings
SPARSE_BELOW = 0.25
MAX_READS = 10 ** 6
# tabu tenure min(TENURE_CAP, n // 2) unless given: dwave-samplers' cap (its rule is
# min(20, n / 4)), not the layer solver's 10.  On general QUBOs (bqp-style instances other than
# the benchmark's, BENCHMARKS.md 1m) it found the best energy of all runs in 20 of 24 runs
# against 5 of 24 with tenure 10, at 0.97-1.31x the time; on rounding problems the evidence
# for 20 was mixed, so the layer solver keeps 10.
TENURE_CAP = 20


@dataclass(frozen=True)
class DenseQubos:
    """``m`` copies of one dense QUBO ``E(b) = b^T H b + g^T b``, laid out as the kernels read a
    layer's rounding problem (:class:`qround.problems.RoundingProblem`): a shared ``hessian``
    (n, n), unit ``step`` and the linear biases as ``grad`` (m, n), every variable ``free``."""

    hessian: np.ndarray
    step: np.ndarray
    grad: np.ndarray
    free: np.ndarray

    @classmethod
    def from_matrix(cls, hessian: np.ndarray, linear: np.ndarray, copies: int) -> "DenseQubos":
        n = linear.shape[0]
        arrays = dict(hessian=np.ascontiguousarray(hessian, dtype=np.float64),
                      step=np.ones((copies, n)),
                      grad=np.ascontiguousarray(np.broadcast_to(linear, (copies, n)),
                                                dtype=np.float64),
                      free=np.ones((copies, n), dtype=bool))
        for a in arrays.values():
            a.flags.writeable = False
        return cls(**arrays)

    @property
    def weight(self) -> np.ndarray:  # only its shape is read
        return self.step

    @property
    def num_channels(self) -> int:
        return self.step.shape[0]

    @property
    def num_inputs(self) -> int:
        return self.step.shape[1]

    @property
    def hessian_diag(self) -> np.ndarray:
        return np.diagonal(self.hessian)

    def local_fields(self, choices) -> np.ndarray:
        return _energy.local_fields(np.asarray(choices, dtype=np.float64), self.step,
                                    self.hessian)

    def flip_deltas(self, choices, fields=None) -> np.ndarray:
        b = np.asarray(choices, dtype=np.float64)
        if fields is None:
            fields = self.local_fields(b)
        return _energy.flip_deltas(b, self.step, self.grad, fields, self.hessian_diag)

    def energies(self, choices) -> np.ndarray:
        return _energy.energies(np.asarray(choices, dtype=np.float64), self.step, self.grad,
                                self.hessian)


def qubo_vectors(bqm: dimod.BinaryQuadraticModel, variables):
    """``bqm`` as a BINARY QUBO in the order of ``variables``: (g (n,), rows, cols, q (k,),
    offset), each pair ``i != j`` once with its coupling ``q``, so that
    ``E(b) = g^T b + sum_k q_k b_rows[k] b_cols[k] + offset`` equals ``bqm.energy``.
    QroundError for biases that are not finite reals in float64 (or overflow on the way)."""
    spin = bqm.vartype is dimod.SPIN
    given = bqm
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            if spin:
                bqm = bqm.change_vartype(dimod.BINARY, inplace=False)
            linear, (rows, cols, quad), offset = bqm.to_numpy_vectors(variable_order=variables)
            linear = np.asarray(linear, dtype=np.float64)
            quad = np.asarray(quad, dtype=np.float64)
            offset = float(offset)
        except (TypeError, ValueError, OverflowError) as exc:
            raise QroundError(f"the BQM's biases are not real numbers that fit a float64: "
                              f"{exc}") from None
        finite = np.all(np.isfinite(linear)) and np.all(np.isfinite(quad)) and \
            np.isfinite(offset)
        # the largest change one flip can make must be finite too, or the search overflows
        reach = np.abs(linear).max(initial=0.0) + np.abs(quad).sum()
    if not finite:
        overflow = spin and _finite_biases(given)
        raise QroundError("the BQM's SPIN biases overflow float64 when converted to a BINARY "
                          "QUBO" if overflow else "the BQM has NaN or infinite biases")
    if not np.isfinite(reach):
        raise QroundError("the BQM's biases are too large: the energy of a flip overflows "
                          "float64")
    return linear, np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64), quad, \
        offset


def dense_qubo(bqm: dimod.BinaryQuadraticModel, variables) -> tuple[np.ndarray, np.ndarray, float]:
    """(H (n, n) symmetric with zero diagonal, g (n,), offset) of ``bqm`` as a BINARY model, in
    the order of ``variables``: ``E(b) = b^T H b + g^T b + offset`` equals ``bqm.energy``."""
    _check_dense_size(len(variables))  # before any conversion
    linear, rows, cols, quad, offset = qubo_vectors(bqm, variables)
    return _dense(len(variables), rows, cols, 0.5 * quad), linear, offset


def _dense(n: int, rows, cols, half) -> np.ndarray:
    hessian = np.zeros((n, n))
    np.add.at(hessian, (rows, cols), half)  # a BQM holds each pair once, so the two
    np.add.at(hessian, (cols, rows), half)  # halves land on distinct entries
    return hessian


def _sparse(n: int, rows, cols, half):
    """H (symmetric, zero diagonal) in CSR form: ((indptr, indices, data) for the kernel, the
    scipy matrix for the start's fields)."""
    from scipy import sparse

    h = sparse.csr_matrix((np.concatenate([half, half]),
                           (np.concatenate([rows, cols]), np.concatenate([cols, rows]))),
                          shape=(n, n))
    h.sort_indices()
    return (h.indptr.astype(np.int64), h.indices.astype(np.int64),
            h.data.astype(np.float64)), h


class QroundSampler(dimod.Sampler, dimod.Initialized):
    """qround's batched local search on any binary quadratic model (a dimod sampler).

    method: ``"tabu"`` (iterated tabu search, :class:`qround.solvers.Tabu`) or ``"anneal"``
    (simulated annealing, :class:`qround.solvers.Anneal`).  ``sample`` takes dimod's
    ``initial_states``, ``initial_states_generator``, ``num_reads`` and ``seed``, and the
    solver's own parameters (``parameters`` lists them), e.g. ``restarts=16`` for tabu or
    ``num_sweeps=5000`` for annealing.  Each read is one independent search of the whole BQM.
    """

    def __init__(self, method: str = "tabu"):
        if not isinstance(method, str) or method not in METHODS:
            raise QroundError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        self.method = method

    @property
    def parameters(self) -> dict:
        base = {"initial_states": [], "initial_states_generator": [], "num_reads": [],
                "seed": []}
        return {**base, **{p: [] for p in _SOLVER_PARAMETERS[self.method]}}

    @property
    def properties(self) -> dict:
        return {"method": self.method, "methods": sorted(METHODS)}

    def __repr__(self) -> str:
        return f"QroundSampler({self.method!r})"

    def sample(self, bqm, initial_states=None, initial_states_generator: str = "random",
               num_reads: int | None = None, seed: int | None = None,
               **solver_parameters) -> dimod.SampleSet:
        """Search ``bqm`` from ``num_reads`` starts; one sample per read: the best state the
        read saw (annealing: taken on down to a local minimum, unless ``descent=False``).

        Returns a ``dimod.SampleSet`` in the BQM's vartype, its energies from ``bqm``, and
        ``info["timing"]`` (seconds of the search and of the whole call); for annealing also
        ``info["beta_range"]`` (the inverse temperatures' range; None with a custom schedule),
        ``info["beta_schedule_type"]``, ``info["matrix"]`` (``"dense"`` or ``"sparse"``) and
        ``info["descent_flips"]`` (the flips of the final descent per read; None with
        ``descent=False``).  A descent that has not reached a local minimum after
        ``10 n + DESCENT_SWEEPS`` sweeps stops there with a warning (a long chain of flips
        that each enable the next; not seen outside constructed BQMs).
        Tabu search takes dwave-samplers' ``timeout`` (milliseconds per read: rounds run
        until it is up, unless ``restarts`` bounds them) or ``time_limit`` (seconds per read,
        an upper bound only: the rounds stay bounded by ``restarts``, 4 by default, so give
        ``restarts=None`` to search until ``time_limit`` is up, as ``timeout`` does).
        Annealing takes dwave-samplers' schedule options: ``beta_range``,
        ``beta_schedule_type`` ("geometric", "linear" or "custom" with ``beta_schedule``) and
        ``num_sweeps_per_beta``, and ``descent`` (default True: each read ends at a local
        minimum, see the module's description).
        """
        t_call = time.perf_counter()
        if not isinstance(bqm, dimod.BinaryQuadraticModel):
            raise QroundError(f"QroundSampler samples a dimod.BinaryQuadraticModel, got "
                              f"{type(bqm).__name__}")
        check_search_parameters(self.method, solver_parameters, f"QroundSampler({self.method!r})",
                                dimod_note=True)
        if "timeout" in solver_parameters:   # dwave-samplers' TabuSampler: ms per read
            solver_parameters = _from_timeout(solver_parameters)
        if (self.method == "tabu" and "restarts" in solver_parameters
                and solver_parameters["restarts"] is None
                and solver_parameters.get("time_limit") is None):
            raise QroundError("restarts=None (rounds until the time is up) needs a budget: "
                              "timeout (milliseconds per read, as dwave-samplers) or "
                              "time_limit (seconds)")
        own = {k: solver_parameters.pop(k) for k in _SAMPLER_PARAMETERS[self.method]
               if k in solver_parameters}
        descent = check_bool(own.get("descent", True), "descent")
        if self.method == "tabu":   # a BQM's integer biases tie often: random tie-breaks
            solver_parameters.setdefault("ties", "random")
        solver = METHODS[self.method](**solver_parameters)
        check_int(num_reads, "num_reads", 1, allow_none=True, maximum=MAX_READS)
        rng = spawn_rng(seed)  # seed checked here; the starts get their own stream from it
        # the size limits need only the counts: checked before any per-variable work
        n = bqm.num_variables
        if n and num_reads is not None:
            _check_state_size(num_reads, n)
        if n and self.method == "tabu":
            _check_dense_size(n)
            if 8 * n * n > SPARSE_TABU_WARN_BYTES and \
                    bqm.num_interactions < SPARSE_BELOW * n * (n - 1) / 2:
                # helper-168: 20k sparse variables took 183 s and 3.5 GB with tabu, 16 s with
                # annealing on CSR
                warn_user(f"QroundSampler('tabu') holds this sparse BQM ({n} variables, "
                          f"{bqm.num_interactions} couplings) as a dense matrix of "
                          f"{8 * n * n / 2 ** 30:.1f} GiB, and each of its iterations costs "
                          "O(n): QroundSampler('anneal') works on its couplings only")
        try:
            parsed = self.parse_initial_states(
                bqm, initial_states=initial_states,
                initial_states_generator=initial_states_generator, num_reads=num_reads,
                seed=None if seed is None else int(rng.integers(2 ** 32)))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, QroundError):
                raise
            hint = (" (dimod reads states of integer, float32 or float64 dtype)"
                    if "No matching signature" in str(exc) else "")   # e.g. float16, from Cython
            raise QroundError(f"initial_states: {exc}{hint}") from None
        variables = list(bqm.variables)
        starts = parsed.initial_states
        reads = parsed.num_reads
        if not variables:
            info = {"timing": {"search_s": 0.0, "total_s": time.perf_counter() - t_call},
                    "method": self.method}
            if self.method == "anneal":   # nothing to descend: no flips in any read
                info["descent_flips"] = [0] * reads if descent else None
            return dimod.SampleSet.from_samples_bqm(
                (np.empty((reads, 0), dtype=np.int8), variables), bqm, info=info)
        _check_state_size(reads, n)   # reads from initial_states, when num_reads is None
        linear, rows, cols, quad, _ = qubo_vectors(bqm, variables)
        order = [starts.variables.index(v) for v in variables]
        start = np.asarray(starts.record.sample)[:, order]
        if bqm.vartype is dimod.SPIN:
            start = (start + 1) // 2
        start = start.astype(bool)
        if self.method == "tabu" and solver_parameters.get("tenure") is None:
            solver = copy.copy(solver)
            solver.tenure = min(TENURE_CAP, n // 2)
        sparse = self.method == "anneal" and n > 1 and rows.size < SPARSE_BELOW * n * (n - 1) / 2
        if self.method == "anneal" and solver.beta_range is None and \
                solver.beta_schedule is None:
            solver = copy.copy(solver)
            solver.beta_range = _default_beta_range(linear, rows, cols, quad)
        t0 = time.perf_counter()
        flips = None
        thresh = -descent_tolerance(n, linear, rows, cols, quad)
        if sparse:
            (indptr, indices, data), h = _sparse(n, rows, cols, 0.5 * quad)
            choices = _anneal_sparse(solver, (indptr, indices, data), h, linear, start, rng)
            if descent:
                choices, flips = _descend(choices, linear, thresh, csr=(indptr, indices, data),
                                          h=h)
        else:
            _check_dense_size(n)
            problem = DenseQubos.from_matrix(_dense(n, rows, cols, 0.5 * quad), linear, reads)
            with single_threaded_blas():
                choices = solver._solve(problem, start, rng)[0]
                if self.method == "anneal" and descent:
                    choices, flips = _descend(choices, linear, thresh, dense=problem.hessian)
        search = time.perf_counter() - t0
        if flips is not None and not np.all(flips[1]):
            warn_user(f"QroundSampler('anneal'): the final descent of {int(np.sum(~flips[1]))} "
                      f"of {reads} reads stopped after {10 * n + DESCENT_SWEEPS} sweeps, before "
                      "a local minimum (a long chain of improving flips); those samples are "
                      "where it stopped")
        samples = choices.astype(np.int8)
        if bqm.vartype is dimod.SPIN:
            samples = 2 * samples - 1
        info = {"timing": {"search_s": search, "total_s": time.perf_counter() - t_call},
                "method": self.method}
        if self.method == "anneal":  # as dwave's simulated annealing reports it
            # as dwave's: the range used, None with a custom schedule (it has none)
            info["beta_range"] = (None if solver.beta_schedule is not None
                                  else list(solver.beta_range))
            info["beta_schedule_type"] = solver.beta_schedule_type
            info["matrix"] = "sparse" if sparse else "dense"
            # the flips the final descent made, per read (None: no descent)
            info["descent_flips"] = None if flips is None else flips[0].tolist()
        return dimod.SampleSet.from_samples_bqm((samples, variables), bqm, info=info)


def check_search_parameters(method: str, names, who: str, dimod_note: bool = False) -> None:
    """Refuse the names that are not ``method``'s search parameters, with dwave-samplers'
    spelling where it differs (:data:`DWAVE_NAMES`).  ``dimod_note``: also say that dimod's
    start and read parameters are taken (a ``sample`` call; the shell gives them as options)."""
    unknown = sorted(set(names) - set(_SOLVER_PARAMETERS[method]))
    if not unknown:
        return
    hints = [DWAVE_NAMES.get((method, u)) or DWAVE_NAMES.get((None, u)) for u in unknown]
    hints = list(dict.fromkeys(h for h in hints if h))
    note = (" (and dimod's initial_states, initial_states_generator, num_reads and seed)"
            if dimod_note else "")
    raise QroundError(f"{who} does not take {unknown}"
                      f"{' (' + '; '.join(hints) + ')' if hints else ''}; its search "
                      f"parameters: {sorted(_SOLVER_PARAMETERS[method])}{note}")


def _from_timeout(parameters: dict) -> dict:
    """dwave-samplers' ``timeout`` (milliseconds per read; the search restarts until it is up)
    as Tabu's ``time_limit`` (seconds), with unbounded rounds unless ``restarts`` is given."""
    parameters = dict(parameters)
    timeout = parameters.pop("timeout")
    if timeout is None:   # dwave's "no time limit"
        return parameters
    if parameters.get("time_limit") is not None:   # None: no limit, as timeout=None
        raise QroundError("give timeout (milliseconds, as dwave-samplers) or time_limit "
                          "(seconds), not both")
    ms = check_real(timeout, "timeout (milliseconds per read)", 0, 1e3 * MAX_TIME_LIMIT,
                    lo_open=True)
    parameters["time_limit"] = ms / 1e3
    parameters.setdefault("restarts", None)
    return parameters


def _default_beta_range(linear, rows, cols, quad, rate: float = 0.01) -> tuple[float, float]:
    """dwave-samplers' inverse-temperature range (``default_beta_range``) for the QUBO of
    :func:`qubo_vectors`, the one its simulated annealing uses, computed here with numpy: dwave's
    walks a dict of every coupling in Python, seconds on a dense 1536-variable BQM.

    On the Ising form (``h = g/2 + sum_j q_ij/4``, ``J = q/4``): hot is ``log 2 / (2 F)`` with
    ``F`` the largest ``|h_i| + sum_j |J_ij|`` (every flip taken at least half the time); cold is
    ``log(k / rate) / (2 e)`` with ``e`` the smallest non-zero ``|h_i|`` or ``|J_ij|`` and ``k``
    the number of variables whose smallest non-zero bias is ``e`` (a final sweep excites one
    with probability about ``rate``).  Equal to dwave's up to round-off in the sums (with the
    pairs in :func:`qubo_vectors`' order; where a variable's biases cancel to about 0, that
    round-off decides its smallest bias, in dwave's order there as in ours here).  A QUBO
    whose flips all cost nothing gets (1, 1): any temperature will do (dwave's would warn and
    give (0.1, 1))."""
    linear = np.asarray(linear, dtype=np.float64)
    quad = np.asarray(quad, dtype=np.float64)
    n = linear.size
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    ends = np.concatenate([rows, cols])
    with np.errstate(all="ignore"):
        j = np.abs(0.25 * np.concatenate([quad, quad]))    # |J| at both ends of a coupling
        h = np.abs(0.5 * linear + np.bincount(ends, weights=0.25 * np.concatenate([quad, quad]),
                                              minlength=n))
        field = h + np.bincount(ends, weights=j, minlength=n)
        smallest = np.where(h != 0, h, np.inf)
        np.minimum.at(smallest, ends[j != 0], j[j != 0])
        biased = smallest[np.isfinite(smallest)]
        if biased.size == 0:
            return 1.0, 1.0
        top = float(field.max())
        lo = 1.0 if top == 0 else float(np.log(2.0) / (2.0 * top))
        e = float(biased.min())
        hi = float(np.log(np.count_nonzero(biased == e) / rate) / (2.0 * e))
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
        return 1.0, 1.0
    return lo, hi


def _check_state_size(reads: int, n: int) -> None:
    if 8 * reads * n > MAX_DENSE_BYTES:   # the kernels hold a few (reads, n) arrays
        raise QroundError(f"{reads} reads of {n} variables: the search state alone would "
                          f"take {8 * reads * n / 2 ** 30:.1f} GiB per array; fewer reads")


SPARSE_TABU_WARN_BYTES = 2 ** 28   # a dense matrix above this, of a sparse BQM: tabu warns


def _check_dense_size(n: int) -> None:
    if 8 * n * n > MAX_DENSE_BYTES:
        raise QroundError(f"the BQM has {n} variables: its dense matrix would take "
                          f"{8 * n * n / 2 ** 30:.1f} GiB (QroundSampler holds it dense for "
                          f"tabu search, and for annealing above {SPARSE_BELOW:.0%} density; "
                          f"at most {MAX_DENSE_BYTES / 2 ** 30:.0f} GiB)")


def _anneal_sparse(solver, csr, h, linear, start, rng) -> np.ndarray:
    """``Anneal`` (with its ``beta_range`` or custom schedule) on the QUBO in CSR form (``csr``
    the kernel's arrays, ``h`` the scipy matrix, both from :func:`_sparse`): the draws and
    decisions of the dense path (same seeds, same order of visits) up to round-off in the
    start's fields (scipy's sparse product and BLAS sum in other orders; exact for integer or
    dyadic biases), at a cost per accepted flip of the variable's couplings instead of n."""
    indptr, indices, data = csr
    n = h.shape[0]
    reads = start.shape[0]
    # C-ordered and writable for any number of reads: one compiled version of the kernel
    b = np.ascontiguousarray(start, dtype=np.float64)
    fields = np.ascontiguousarray((h @ b.T).T)
    grad = np.tile(linear, (reads, 1))
    energy = np.sum(b * (fields + grad), axis=1)
    seeds = rng.integers(0, np.iinfo(np.int64).max, size=reads,
                         dtype=np.int64).astype(np.uint64)
    betas = solver.steps(reads)
    best, _ = _kernels.anneal_sparse_kernel(
        indptr, indices, data, np.zeros(n), np.ones((reads, n)), grad, b, fields, energy,
        betas, solver.restarts, solver.order == "random", seeds)
    return best.astype(bool)


def descent_tolerance(n: int, linear, rows, cols, quad) -> np.ndarray:
    """Per variable, the least gain a descent flip must make: :data:`DESCENT_TOL` times the
    sum of the absolute biases on it (its linear bias and its couplings), which bounds the
    magnitude of its delta and so the round-off in it.  Relative to each variable's own biases,
    not the BQM's largest, so a part of the problem at a small scale is descended too."""
    scale = np.abs(np.asarray(linear, dtype=np.float64))
    weights = np.abs(np.asarray(quad, dtype=np.float64))
    scale = scale + np.bincount(rows, weights, minlength=n) + np.bincount(cols, weights,
                                                                          minlength=n)
    return DESCENT_TOL * scale


def _descend(choices, linear, thresh: np.ndarray, dense: np.ndarray | None = None,
             csr=None, h=None):
    """Zero-temperature sweeps of every read to a local minimum, on the ``dense`` matrix or on
    the CSR arrays ``csr`` and scipy matrix ``h`` (:func:`_sparse`; the same decisions):
    annealing's reads are the best state each saw, which one flip can still improve.
    ``thresh`` (n,): the delta a flip must be below (``-descent_tolerance``).  The sweeps
    update the local fields incrementally; at their end the fields are computed anew and a
    read that one flip still improves by them (round-off in the updates) sweeps again.
    Returns (choices (reads, n) bool, (flips per read, whether each read reached a local
    minimum within the sweep limit))."""
    b = np.array(choices, dtype=np.float64, order="C")
    reads, n = b.shape
    linear = np.asarray(linear, dtype=np.float64)
    thresh = np.ascontiguousarray(thresh, dtype=np.float64)
    max_sweeps = 10 * n + DESCENT_SWEEPS

    def fields_of(rows):
        if dense is not None:
            return np.ascontiguousarray(rows @ dense)   # H symmetric
        return np.ascontiguousarray((h @ rows.T).T)

    flips = np.zeros(reads, dtype=np.int64)
    done = np.ones(reads, dtype=bool)
    todo = np.arange(reads)
    for _ in range(3):   # a read goes again only if round-off hid a flip: rare, and short
        part = np.ascontiguousarray(b[todo])
        grad = np.tile(linear, (todo.size, 1))
        fields = fields_of(part)
        if dense is not None:
            more, finished = _kernels.sweep_descent_kernel(dense, grad, part, fields, thresh,
                                                           max_sweeps, _kernels.NO_CSR)
        else:
            indptr, indices, data = csr
            more, finished = _kernels.sweep_descent_sparse_kernel(
                indptr, indices, data, grad, part, fields, thresh, max_sweeps)
        b[todo] = part
        flips[todo] += more
        done[todo] = finished
        deltas = (1.0 - 2.0 * part) * (2.0 * fields_of(part) + linear)
        again = finished & np.any(deltas < thresh, axis=1)
        done[todo[again]] = False
        todo = todo[again]
        if not todo.size:
            break
    return b.astype(bool), (flips, done)


def _finite_biases(bqm) -> bool:
    try:
        linear, (_, _, quad), offset = bqm.to_numpy_vectors()
        return bool(np.all(np.isfinite(np.asarray(linear, dtype=np.float64))) and
                    np.all(np.isfinite(np.asarray(quad, dtype=np.float64))) and
                    np.isfinite(float(offset)))
    except (TypeError, ValueError, OverflowError):
        return False
