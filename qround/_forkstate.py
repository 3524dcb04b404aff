"""Whether this process is a forked child that must run numba's serial kernels (see
:mod:`qround._parallel`).

Kept free of numba so that ``import qround`` registers the fork hook at once: the kernels'
modules are imported on first use, possibly only after the caller forked, and a child forked
from a parent that had run OpenMP threads (torch's) hangs in its first parallel launch."""
from __future__ import annotations

import os
import sys
from typing import Callable

STATE = {"serial": False}   # set in a forked child unless numba's layer is fork-safe
FORK_SAFE_LAYERS = ("tbb", "workqueue")
_CHILD_HOOKS: list[Callable[[], None]] = []


def in_forked_child(hook: Callable[[], None]) -> None:
    """Run ``hook`` in every child forked after this call, before the serial decision."""
    _CHILD_HOOKS.append(hook)


def _threading_layer() -> str:
    """numba's threading layer: the one launched, else the configured one (``default`` unless
    NUMBA_THREADING_LAYER says otherwise), as numba would read it."""
    numba = sys.modules.get("numba")
    if numba is None:
        return os.environ.get("NUMBA_THREADING_LAYER", "default").lower()
    try:
        return numba.threading_layer()   # ValueError: numba launched nothing yet
    except ValueError:
        return str(numba.config.THREADING_LAYER).lower()


def _after_fork_in_child() -> None:
    for hook in _CHILD_HOOKS:
        hook()
    # the layer is chosen at the first launch; only an explicit workqueue (or tbb) is sure to
    # be fork-safe here (the parent may have run OpenMP threads of its own, as torch does)
    if _threading_layer() not in FORK_SAFE_LAYERS:
        STATE["serial"] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
