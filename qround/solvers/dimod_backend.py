"""Any dimod sampler as a solver: one BQM per channel, started from the given solution.

Built-in names: ``neal`` (dwave-neal / dwave-samplers simulated annealing), ``dwave-tabu``
(dwave-samplers tabu search), ``dwave-steepest`` (dwave-samplers steepest descent).  Any object
with a dimod ``sample(bqm, **kwargs)`` method works too.  Samplers that accept
``initial_states`` get the start (RTN by default), so they can only refine it.
"""
from __future__ import annotations

import inspect

import numpy as np

from ..errors import QroundError
from .base import Solver


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
    raise QroundError(f"unknown dimod sampler {name!r}: use neal, dwave-tabu, dwave-steepest, "
                      "exact-dimod, or pass a sampler object")


class DimodSolver(Solver):
    """Solve each channel's BQM with a dimod sampler.

    sampler: a name (see module docstring) or a dimod sampler object.
    channels: optionally solve only these channel indices or this slice (others keep the start): dense BQMs of
    large layers are slow to build and sample, so benchmarks use a subset.
    sample_kwargs: forwarded to ``sampler.sample`` (e.g. ``num_reads``, ``num_sweeps``,
    ``timeout`` for tabu in ms).
    """

    name = "dimod"

    def __init__(self, sampler="neal", channels=None, **sample_kwargs):
        self.sampler = sampler
        if channels is not None and not isinstance(channels, slice):
            arr = np.asarray(channels)
            if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
                raise QroundError(f"channels must be None or a non-empty list of channel "
                                  f"indices, got {channels!r}")
            channels = [int(c) for c in arr]
        self.channels = channels
        self.sample_kwargs = sample_kwargs

    @property
    def label(self) -> str:
        if self.__dict__.get("_label"):
            return self._label
        return self.sampler if isinstance(self.sampler, str) else type(self.sampler).__name__

    def _solve(self, problem, start, rng):
        sampler = _make_sampler(self.sampler) if isinstance(self.sampler, str) else self.sampler
        try:
            params = set(inspect.signature(sampler.sample).parameters)
            params |= set(getattr(sampler, "parameters", {}) or {})
        except (TypeError, ValueError):
            params = set()
        declared = set(getattr(sampler, "parameters", {}) or {})
        unknown = sorted(set(self.sample_kwargs) - declared - {"seed", "initial_states"})
        if declared and unknown:  # dwave's samplers take **kwargs and ignore a misspelt name
            raise QroundError(f"sampler {self.label!r} does not take {unknown}; its parameters: "
                              f"{sorted(declared)}")
        channels = (range(problem.num_channels) if self.channels is None else
                    range(problem.num_channels)[self.channels]
                    if isinstance(self.channels, slice) else self.channels)
        out = start.copy()
        for c in channels:
            c = problem._channel(c)
            idx = np.flatnonzero(problem.free[c])
            if idx.size == 0:
                continue
            bqm = problem.to_bqm(c)
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
            except (ValueError, TypeError) as exc:  # the sampler's own check of its arguments
                if isinstance(exc, QroundError):
                    raise
                raise QroundError(f"sampler {self.label!r} refused {self.sample_kwargs}: "
                                  f"{exc}") from None
            best = sampleset.first.sample
            out[c, idx] = np.array([best[int(i)] for i in idx], dtype=bool)
        return out, {"sampler": self.label,
                     "channels": problem.num_channels if self.channels is None else len(channels)}
