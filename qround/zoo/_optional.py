"""Lazy imports of the optional ``examples`` extra, with an install hint when missing."""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import QroundError

INSTALL_HINT = "pip install 'qround[examples]'"


def require(module: str, package: str) -> ModuleType:
    """Import ``module`` (from the distribution ``package``) or raise QroundError with a hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise QroundError(f"{package} is needed for this (could not import {module!r}: {exc}); "
                          f"install it with: {INSTALL_HINT}") from exc
