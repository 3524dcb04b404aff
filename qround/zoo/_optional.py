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


def torch_device(device):
    """``device`` as a ``torch.device``; QroundError when it is not one, or when it asks for
    CUDA on a torch without it (torch itself raises an AssertionError, and only once a model
    moves there)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise QroundError(f"device={device!r} is not a torch device: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QroundError(f"device={str(dev)!r} was asked for but CUDA is not available")
    return dev
