"""Parallel numba kernels that keep working in a forked child process.

numba runs ``prange`` loops on a threading layer chosen at the first parallel launch.  Without
TBB installed that is OpenMP, and GNU OpenMP cannot be used again after ``fork()``: a child that
launches a parallel kernel its parent already ran is terminated ("fork() called from a process
already using GNU OpenMP, this is unsafe").  ``multiprocessing``'s default start method on Linux
before Python 3.14 is fork, so a pool of workers that fit grids or solve layers after the
parent did would die.

:func:`parallel_kernel` compiles a function as ``njit(parallel=True, cache=True)`` and, in a
child forked after the parent's OpenMP launch, runs a serial compilation of the same function
instead (compiled on first use and cached on disk like the parallel one; the kernels' results
do not depend on the thread count, only their speed does).  Elsewhere the parallel kernel runs as before.
"""
from __future__ import annotations

import os
import types

import numba
from numba import njit

_STATE = {"serial": False}   # set in a child forked after an OpenMP launch


def _after_fork_in_child() -> None:
    try:
        layer = numba.threading_layer()   # ValueError: no parallel launch yet
    except ValueError:
        return
    if layer == "omp":   # GNU OpenMP is not fork-safe (Intel's is, but numba cannot tell)
        _STATE["serial"] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def serial_after_fork() -> bool:
    """Whether this process runs the serial versions (a child forked after OpenMP ran)."""
    return _STATE["serial"]


class ParallelKernel:
    """A numba kernel with ``prange`` loops: parallel, or serial in a forked child (see the
    module docstring).  Attributes (``signatures``...) are the parallel dispatcher's."""

    def __init__(self, fn):
        self.parallel = njit(parallel=True, cache=True)(fn)
        self._fn = fn
        self._serial = None
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__
        self.__wrapped__ = fn

    def serial(self):
        """The serial compilation (made on first use).  It compiles a copy of the function
        under another qualified name: numba's cache keys a function by its name, line and
        bytecode, not by ``parallel=``, so the copy gets cache files of its own."""
        if self._serial is None:
            fn = self._fn
            twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__,
                                      fn.__defaults__, fn.__closure__)
            twin.__qualname__ = f"{fn.__qualname__}__serial"
            twin.__module__ = fn.__module__
            twin.__doc__ = fn.__doc__
            self._serial = njit(cache=True)(twin)
        return self._serial

    def __call__(self, *args):
        if _STATE["serial"]:
            return self.serial()(*args)
        return self.parallel(*args)

    def __getattr__(self, name):
        if name in ("parallel", "_fn", "_serial"):   # not yet set (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.parallel, name)


def parallel_kernel(fn) -> ParallelKernel:
    """Decorator: ``njit(parallel=True, cache=True)`` that stays usable after ``fork()``."""
    return ParallelKernel(fn)
