"""Behaviours of qround._parallel no other test protected (found by mutation testing)."""
from __future__ import annotations

import numba
import torch

from qround._parallel import ParallelKernel, cpu_threads, serial_after_fork
from qround.solvers import _kernels


def _sum(x):
    return x.sum()


def test_a_launch_gives_the_callers_torch_thread_count_back():
    """numba's OpenMP pool may reset the runtime torch shares: the launch restores it."""
    assert not serial_after_fork()
    kernel = ParallelKernel(_sum)
    before = torch.get_num_threads()
    target = 3 if before != 3 else 2

    def launch(*args):   # as numba's first OpenMP launch does to the shared runtime
        torch.set_num_threads(target)
        return sum(args)

    kernel.parallel = launch
    try:
        assert kernel(1, 2) == 3
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_the_serial_twin_is_compiled_without_parallel():
    kernel = _kernels.tabu_kernel
    assert kernel.parallel.targetoptions.get("parallel")
    twin = kernel.serial()
    assert not twin.targetoptions.get("parallel")
    assert twin is kernel.serial()                   # compiled once
    assert twin.py_func.__qualname__ != kernel.parallel.py_func.__qualname__   # own cache files


def test_cpu_threads_sets_and_restores_both_counts():
    # numba first: its OpenMP layer, started by this call, resets the runtime torch shares
    numba_before = numba.get_num_threads()
    torch_before = torch.get_num_threads()
    pool = numba.config.NUMBA_NUM_THREADS
    with cpu_threads(1):
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    assert (torch.get_num_threads(), numba.get_num_threads()) == (torch_before, numba_before)
    # more than numba's pool: numba is capped there, torch takes the count as it is
    try:
        with cpu_threads(pool + 1):
            assert numba.get_num_threads() == pool
            assert torch.get_num_threads() == pool + 1
    finally:
        torch.set_num_threads(torch_before)
    assert (torch.get_num_threads(), numba.get_num_threads()) == (torch_before, numba_before)


def test_cpu_threads_none_changes_nothing():
    numba.get_num_threads()    # the layer started before the counts are taken (see above)
    before = (torch.get_num_threads(), numba.get_num_threads())
    with cpu_threads(None):
        assert (torch.get_num_threads(), numba.get_num_threads()) == before
    assert (torch.get_num_threads(), numba.get_num_threads()) == before
