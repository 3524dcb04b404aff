"""Warnings that point at the user's code, and one warning per call for what repeats.

qround warns from inside forward hooks and capture loops, several frames (and torch's module
call) away from the user's line, so a fixed ``stacklevel`` would name a qround file: the
warning's location, and with it ``-W error::UserWarning:mymodule`` style filters and Python's
once-per-location deduplication, would be qround's.  :func:`warn_user` attributes the warning
to the innermost frame outside qround, torch and contextlib.

Inside a call wrapped with :func:`gathering` (``quantize_model``, the capture functions),
:func:`warn_gathered` collects what it is told per kind (a layer that looks sequence-first on
every batch, a unit's Fisher blocks that are all zero) and the outermost such call warns once
per kind at its end, naming the items, instead of once per layer, batch or unit.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from contextvars import ContextVar
from typing import Callable, Iterator

_QROUND_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_GATHERED: ContextVar = ContextVar("qround_gathered_warnings", default=None)


def _internal_prefixes() -> tuple[str, ...]:
    prefixes = [_QROUND_DIR, os.path.abspath(contextlib.__file__)]
    torch = sys.modules.get("torch")   # not imported here: only its frames are skipped
    if torch is not None and getattr(torch, "__file__", None):
        prefixes.append(os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    return tuple(prefixes)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the innermost frame outside qround, torch and
    contextlib: the user's line (their call into qround, or their own forward function)."""
    prefixes = _internal_prefixes()
    level, frame = 2, sys._getframe(1)   # level 2: warn_user's caller
    while frame is not None and _internal(frame.f_code.co_filename, prefixes):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _internal(filename: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a frame's file is qround's, torch's or contextlib's.  A pseudo-filename
    (``<string>``, ``<stdin>``, ``<ipython-input-...>``) is the user's code wherever the
    working directory is (abspath would put it there)."""
    if filename.startswith("<") and filename.endswith(">"):
        return False
    return os.path.abspath(filename).startswith(prefixes)


def warn_gathered(kind: str, item: str, message: Callable[[list[str]], str],
                  category: type[Warning] = UserWarning) -> None:
    """Warn ``message([item])`` now, or, inside :func:`gathering`, add ``item`` to the
    ``kind`` of warning that the outermost gathering call gives once, as
    ``message(all items in order)``."""
    gathered = _GATHERED.get()
    if gathered is None:
        warn_user(message([item]), category)
        return
    entry = gathered.setdefault(kind, (message, category, {}))
    entry[2].setdefault(item, None)


@contextlib.contextmanager
def gathered() -> Iterator[None]:
    """Collect :func:`warn_gathered` calls inside; at the exit of the outermost one, one
    warning per kind.  An exception leaving it still gets them first (a layer that looked
    sequence-first can be why its padding reached a NaN check), but a warning that the
    filters turn into an error is dropped then, so that the exception is the one raised."""
    if _GATHERED.get() is not None:   # an outer call gathers and warns
        yield
        return
    pending: dict = {}
    token = _GATHERED.set(pending)
    try:
        yield
    except Exception:
        _GATHERED.reset(token)
        _emit(pending, during_error=True)
        raise
    except BaseException:   # Ctrl-C, exit: nothing more
        _GATHERED.reset(token)
        raise
    _GATHERED.reset(token)
    _emit(pending)


def _emit(pending: dict, during_error: bool = False) -> None:
    for message, category, items in pending.values():
        try:
            warn_user(message(list(items)), category)
        except Exception:  # noqa: BLE001 (-W error while an error leaves: that error goes on)
            if not during_error:
                raise


def gathering(fn):
    """Decorator: ``fn`` runs inside :func:`gathered`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with gathered():
            return fn(*args, **kwargs)
    return wrapper
