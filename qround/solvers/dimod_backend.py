"""Any dimod sampler as a solver: one BQM per channel, started from the given solution.

Sampler names (``DimodSolver(name)``, or ``dimod(sampler='name')`` in a spec): ``neal``
(dwave-neal / dwave-samplers simulated annealing), ``dwave-tabu`` (dwave-samplers tabu search),
``dwave-steepest`` (dwave-samplers steepest descent), ``exact-dimod`` (``dimod.ExactSolver``:
every state, for channels of up to ``EXACT_DIMOD_MAX_FREE`` free variables).  The first three
are also registry names (``get_solver("neal")``); ``exact`` is qround's own enumeration.  Any
object with a dimod ``sample(bqm, **kwargs)`` method works too.  Samplers that accept
``initial_states`` get the start (RTN by default), so they can only refine it.
"""
from __future__ import annotations

import inspect

import numpy as np

from ..errors import QroundError, SolverError, check_int
from .base import Solver

SAMPLER_NAMES = ("neal", "dwave-tabu", "dwave-steepest", "exact-dimod")
EXACT_DIMOD_MAX_FREE = 22   # dimod.ExactSolver keeps every state: 2^22 x 22 bytes and energies


def _make_sampler(name: str):
    if name == "neal":
        try:
            from dwave.samplers import SimulatedAnnealingSampler
        except ImportError:  # older installs: dwave-neal alone
            from neal import SimulatedAnnealingSampler
        return SimulatedAnnealingSampler()
    if name == "dwave-tabu":
        from dwave.samplers import TabuSampler
        return TabuSampler()
    if name == "dwave-steepest":
        from dwave.samplers import SteepestDescentSolver
        return SteepestDescentSolver()
    if name == "exact-dimod":
        import dimod
        return dimod.ExactSolver()
    raise QroundError(f"unknown dimod sampler {name!r}: use {', '.join(SAMPLER_NAMES)}, or pass "
                      "a sampler object")


# options of dwave-samplers that must not be negative (a negative tabu timeout never ends)
_NON_NEGATIVE = ("timeout", "num_sweeps", "num_restarts", "tenure", "num_sweeps_per_beta")


def _is_tensor(value) -> bool:
    """A torch tensor, told apart without importing torch."""
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach")


def _numbers(value):
    """The numbers inside an option value (a number, or a tuple/list/array/tensor of them,
    nested)."""
    if isinstance(value, (bool, np.bool_)):
        return []
    if isinstance(value, (int, float, np.integer, np.floating)):
        return [value]
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _numbers(v)]
    if isinstance(value, np.ndarray):
        return [x for v in value.ravel().tolist() for x in _numbers(v)]
    if _is_tensor(value):
        return _numbers(value.detach().cpu().tolist())   # any dtype (numpy has no bfloat16)
    return []


def _check_values(kwargs: dict) -> None:
    """Refuse NaN or infinite numbers in any option (dwave's samplers accept NaN temperatures
    and do nothing, and overflow on an infinite timeout), negative values of the counts and
    times in ``_NON_NEGATIVE``, and a ``beta_range`` that is not two positive numbers."""
    for key, value in kwargs.items():
        numbers = _numbers(value)
        if any(not np.isfinite(float(x)) for x in numbers):
            raise QroundError(f"{key} must be finite, got {value!r}")
        if key == "timeout" and value is not None and any(x <= 0 for x in numbers):
            raise QroundError(f"timeout must be a positive number of milliseconds, got "
                              f"{value!r} (dwave's tabu search reads a negative one as no limit "
                              "and runs its 10^6 restarts)")
        if key in _NON_NEGATIVE and value is not None and any(x < 0 for x in numbers):
            raise QroundError(f"{key} must not be negative, got {value!r}")
    beta = kwargs.get("beta_range")
    sequence = isinstance(beta, (tuple, list, np.ndarray)) or _is_tensor(beta)
    if beta is not None and (not sequence or len(_numbers(beta)) != 2
                             or min(_numbers(beta)) <= 0):
        raise QroundError(f"beta_range must be two positive numbers (hot, cold), got {beta!r}")


class DimodSolver(Solver):
    """Solve each channel's BQM with a dimod sampler.

    sampler: a name (see module docstring) or a dimod sampler object.
    channels: optionally solve only these channel indices or this slice (others keep the start):
    dense BQMs of large layers are slow to build and sample, so benchmarks use a subset.
    sample_kwargs: forwarded to ``sampler.sample`` (e.g. ``num_reads``, ``num_sweeps``, ``timeout``
    for tabu in ms).
    """

    name = "dimod"

    def __init__(self, sampler="neal", channels=None, **sample_kwargs):
        if isinstance(sampler, str):
            if sampler not in SAMPLER_NAMES:
                raise QroundError(f"unknown dimod sampler {sampler!r}: use "
                                  f"{', '.join(SAMPLER_NAMES)}, or pass a sampler object")
        elif not callable(getattr(sampler, "sample", None)):
            raise QroundError(f"sampler must be a name ({', '.join(SAMPLER_NAMES)}) or a dimod "
                              f"sampler (an object with a sample method), got {sampler!r}")
        self.sampler = sampler
        if isinstance(channels, slice):
            if not all(v is None or (isinstance(v, (int, np.integer)) and
                                     not isinstance(v, bool))
                       for v in (channels.start, channels.stop, channels.step)):
                raise QroundError(f"channels: a slice of integers, got {channels!r}")
            if channels.step == 0:
                raise QroundError("channels: a slice step cannot be zero")
        elif channels is not None:
            arr = np.asarray(channels)
            if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
                raise QroundError(f"channels must be None or a non-empty list of channel "
                                  f"indices, got {channels!r}")
            channels = [int(c) for c in arr]
        self.channels = channels
        if "num_reads" in sample_kwargs and sample_kwargs["num_reads"] is not None:
            check_int(sample_kwargs["num_reads"], "num_reads", 1, maximum=10 ** 6)
        _check_values(sample_kwargs)
        self.sample_kwargs = sample_kwargs
        self._check_kwargs(_make_sampler(sampler) if isinstance(sampler, str) else sampler)

    def _check_kwargs(self, sampler) -> None:
        """Refuse keyword arguments the sampler does not declare: dwave's samplers take
        ``**kwargs`` and ignore a misspelt name."""
        declared = set(getattr(sampler, "parameters", {}) or {})
        unknown = sorted(set(self.sample_kwargs) - declared - {"seed", "initial_states"})
        # a sampler object declaring nothing may not list what it takes; a named one (dimod's
        # ExactSolver) declaring nothing takes nothing
        if unknown and (declared or isinstance(self.sampler, str)):
            raise QroundError(f"sampler {self.label!r} does not take {unknown}; its parameters: "
                              f"{sorted(declared)}")

    @property
    def parameters(self) -> dict:
        """The constructor's arguments, the sampler's keywords flat as they were given:
        ``DimodSolver(**s.parameters)`` rebuilds ``s``."""
        return {"sampler": self.sampler, "channels": self.channels, **self.sample_kwargs}

    @property
    def label(self) -> str:
        if self.__dict__.get("_label"):
            return self._label
        return self.sampler if isinstance(self.sampler, str) else type(self.sampler).__name__

    def _best(self, sampleset, idx: np.ndarray) -> np.ndarray:
        """The lowest-energy sample's values of variables ``idx`` as 0/1 choices: a SPIN
        sample set (-1/+1) is read as spins, and one without the BQM's variables is refused."""
        import dimod

        if not isinstance(sampleset, dimod.SampleSet):
            raise SolverError(f"sampler {self.label!r} returned {type(sampleset).__name__}, "
                              "not a dimod.SampleSet")
        if len(sampleset) == 0:
            raise SolverError(f"sampler {self.label!r} returned no sample")
        missing = sorted(set(int(i) for i in idx) - set(sampleset.variables))[:5]
        if missing:
            raise SolverError(f"sampler {self.label!r} returned samples without the BQM's "
                              f"variables {missing} (its labels: the free inputs' indices)")
        if sampleset.vartype is dimod.SPIN:
            sampleset = sampleset.change_vartype(dimod.BINARY, inplace=False)
        best = sampleset.first.sample
        return np.array([best[int(i)] for i in idx], dtype=bool)

    def _solve(self, problem, start, rng):
        import dimod

        sampler = _make_sampler(self.sampler) if isinstance(self.sampler, str) else self.sampler
        try:
            params = set(inspect.signature(sampler.sample).parameters)
            params |= set(getattr(sampler, "parameters", {}) or {})
        except (TypeError, ValueError):
            params = set()
        self._check_kwargs(sampler)   # again: a sampler object may have changed
        channels = (range(problem.num_channels) if self.channels is None else
                    range(problem.num_channels)[self.channels]
                    if isinstance(self.channels, slice) else self.channels)
        if len(channels) == 0:
            raise QroundError(f"channels={self.channels!r} selects none of the problem's "
                              f"{problem.num_channels} channels")
        channels = [problem._channel(c) for c in channels]
        if len(set(channels)) != len(channels):
            raise QroundError(f"channels={self.channels!r} names a channel more than once (of "
                              f"{problem.num_channels} channels)")
        out = start.copy()
        if isinstance(sampler, dimod.ExactSolver):   # by name (exact-dimod) or as an object
            free = max((int(problem.free[problem._channel(c)].sum()) for c in channels),
                       default=0)
            if free > EXACT_DIMOD_MAX_FREE:
                raise QroundError(f"{self.label} (dimod.ExactSolver) lists all 2^n states of a "
                                  f"channel: a channel here has {free} free variables, at most "
                                  f"{EXACT_DIMOD_MAX_FREE} fit; restrict the problem, or use "
                                  "qround's 'exact' on a subproblem")
        for c in channels:
            c = problem._channel(c)
            idx = np.flatnonzero(problem.free[c])
            if idx.size == 0:
                continue
            bqm = problem.to_bqm(c)
            linear, (_, _, quadratic), _ = bqm.to_numpy_vectors()
            if not (np.any(linear) or np.any(quadratic)):
                continue   # every state costs the same (no input reaches it): keep the start,
                # rather than let a sampler warn of "a value error" (dwave's SA does)
            kwargs = dict(self.sample_kwargs)
            if "seed" in params and "seed" not in kwargs:
                kwargs["seed"] = int(rng.integers(2**31 - 1))
            if "initial_states" in params and "initial_states" not in kwargs:
                init = start[c, idx].astype(np.int8)
                reads = int(kwargs.get("num_reads", 1) or 1)
                kwargs["initial_states"] = (np.tile(init, (reads, 1)), [int(i) for i in idx])
                if "initial_states_generator" in params:
                    kwargs.setdefault("initial_states_generator", "tile")
            try:
                sampleset = sampler.sample(bqm, **kwargs)
            except (ValueError, TypeError, OverflowError) as exc:  # the sampler's own checks
                if isinstance(exc, QroundError):
                    raise
                given = f" {self.sample_kwargs}" if self.sample_kwargs else " the BQM"
                raise QroundError(f"sampler {self.label!r} refused{given}: {exc}") from None
            out[c, idx] = self._best(sampleset, idx)
        return out, {"sampler": self.label,
                     "channels": problem.num_channels if self.channels is None else len(channels)}
