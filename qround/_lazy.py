"""Packages whose names load on first use (PEP 562).

``qround``, ``qround.problems``, ``qround.solvers`` and ``qround.zoo`` import none of their
submodules when imported: ``qround --help`` answers without loading torch, numba and dimod,
and no package's ``__init__`` holds Python's import lock of the package while it imports submodules.
That matters for threads: one thread running such an ``__init__`` while another imports one of the
submodules directly (``from qround.solvers.tabu import Tabu``) deadlocks in Python's per-module
import locks, and Python breaks the deadlock by handing a thread a half-initialised module ("cannot
import name ... from partially initialized module").  Imports among the submodules follow a graph
without cycles, so those locks are always taken in one order.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys


def lazy_names(package: str, names: dict[str, str], public: list[str]):
    """``(__getattr__, __dir__)`` for ``package``: a name of ``names`` comes from its submodule
    (``names[name]``), any other identifier is tried as a submodule; both are cached in the
    package's namespace on first use.  A dependency missing inside a submodule still raises
    ModuleNotFoundError naming it."""

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
        elif not name.isidentifier():   # getattr(pkg, "") or "a.b": not a submodule's name
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        else:   # a submodule not imported yet (``import qround; qround.pipeline``)
            try:
                value = importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise   # the submodule exists, and something it imports is missing
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():   # submodules not loaded yet too (tab completion)
        module = sys.modules[package]
        subs = {info.name for info in pkgutil.iter_modules(module.__path__)}
        return sorted(set(vars(module)) | set(public) | subs)

    return __getattr__, __dir__
