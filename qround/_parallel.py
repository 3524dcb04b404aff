"""Parallel numba kernels that keep working in a forked child process.

numba runs ``prange`` loops on a threading layer chosen at the first parallel launch.  Without
TBB installed that is OpenMP, and GNU OpenMP cannot be used again after ``fork()``: a child
whose parent already ran OpenMP threads (numba's, or torch's own intra-op threads) is
terminated ("fork() called from a process already using GNU OpenMP, this is unsafe") or hangs
in its first parallel kernel.  ``multiprocessing``'s default start method on Linux before Python
3.14 is fork, so a pool of workers that fit grids or solve layers after the parent calibrated
would die or hang.

:func:`parallel_kernel` compiles a function as ``njit(parallel=True, cache=True)``; in a forked
child it runs a serial compilation of the same function instead, unless numba's layer is a
fork-safe one (TBB or workqueue: launched in the parent, or set with
``NUMBA_THREADING_LAYER=workqueue``).  The serial one is compiled on first use and cached on
disk like the parallel one; the kernels' results do not depend on the thread count, only their
speed does.  Processes started with spawn or forkserver run the parallel kernels.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import types

import numba
from numba import njit

from ._forkstate import FORK_SAFE_LAYERS, STATE as _STATE, in_forked_child  # noqa: F401

_LAUNCH_LOCK = threading.Lock()  # one parallel launch at a time (ParallelKernel.__call__)


def _new_launch_lock() -> None:
    global _LAUNCH_LOCK
    _LAUNCH_LOCK = threading.Lock()   # a parent thread may have held it at the fork


in_forked_child(_new_launch_lock)


def serial_after_fork() -> bool:
    """Whether this process runs the serial versions (a forked child, see the module
    docstring)."""
    return _STATE["serial"]


def _load(module: str, qualname: str):
    """The kernel ``qualname`` of ``module`` (how a ParallelKernel is unpickled)."""
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class ParallelKernel:
    """A numba kernel with ``prange`` loops: parallel, or serial in a forked child (see the
    module docstring).  Attributes (``signatures``...) are the parallel dispatcher's."""

    def __init__(self, fn):
        self.parallel = njit(parallel=True, cache=True)(fn)
        self._fn = fn
        self._serial = None
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__
        self.__qualname__ = fn.__qualname__
        self.__module__ = fn.__module__
        self.__wrapped__ = fn

    def __reduce__(self):   # the module's own kernel, as numba's dispatchers pickle
        return _load, (self.__module__, self.__qualname__)

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
        # One parallel launch at a time in the process: numba's workqueue layer aborts the
        # process when two threads launch at once, and each launch takes every thread anyway
        with _LAUNCH_LOCK:
            torch = sys.modules.get("torch")  # not imported here: a numba-only user needs none
            if torch is None:
                return self.parallel(*args)
            # numba's OpenMP layer starts its pool with omp_set_num_threads(NUMBA_NUM_THREADS)
            # in the OpenMP runtime torch shares: the caller's torch.set_num_threads is kept
            threads = torch.get_num_threads()
            try:
                return self.parallel(*args)
            finally:
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)

    def __getattr__(self, name):
        if name in ("parallel", "_fn", "_serial"):   # not yet set (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.parallel, name)


def parallel_kernel(fn) -> ParallelKernel:
    """Decorator: ``njit(parallel=True, cache=True)`` that stays usable after ``fork()``."""
    return ParallelKernel(fn)


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Inside: torch and numba use ``n`` CPU threads (numba at most its NUMBA_NUM_THREADS,
    the size of its pool); the caller's counts come back afterwards.  None changes nothing."""
    if n is None:
        yield
        return
    import torch

    torch_before = torch.get_num_threads()
    try:   # starts numba's threading layer: one that cannot start fails at its first kernel
        numba_before = numba.get_num_threads()
    except Exception:  # noqa: BLE001 (e.g. NUMBA_THREADING_LAYER=tbb without tbb installed)
        numba_before = None
    torch.set_num_threads(n)
    if numba_before is not None:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        if numba_before is not None:
            numba.set_num_threads(numba_before)
        if torch.get_num_threads() != torch_before:
            torch.set_num_threads(torch_before)
