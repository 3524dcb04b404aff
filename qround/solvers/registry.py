"""Solvers by name, and solver specs that compose them.

A spec is a name (``greedy``), a chain ``a+b`` (run ``a``, polish with ``b``), or a best-of
``a|b`` (per channel the better of ``a`` and ``b``, both from the same start); ``+`` binds
tighter than ``|``.  ``register`` adds a factory; ``get_solver`` builds a solver from a spec.
``get_solver(spec, device="cuda")`` (or :func:`place`) puts every torch solver of a spec
(``cem``, ``hopfield``, ``hopfield-classic``, ``meanfield``, ``gptq``) on that device; the
others (``greedy`` in numpy, ``anneal`` and ``tabu`` in numba) run on the CPU whatever the
device.
"""
from __future__ import annotations

import logging
import re
from typing import Callable

from ..errors import QroundError
from .base import BestOf, Chain, Solver

log = logging.getLogger(__name__)

DEFAULT_SOLVER = "fast"   # what quantize_model and `qround quantize` use unless told otherwise
PLUGIN_GROUP = "qround.solvers"  # entry points of installed packages: name = "module:factory"

_REGISTRY: dict[str, Callable[..., Solver]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_PLUGINS = {"loaded": False}


def register(name: str, factory: Callable[..., Solver], description: str = "",
             overwrite: bool = False) -> None:
    """Register ``factory(**kwargs) -> Solver`` under ``name`` (letters, digits, '.', '-', '_').

    A registered name works in this process (``get_solver``, ``QuantConfig(solver=...)``,
    ``qround.cli.main([...])``).  For the ``qround`` shell commands, declare the factory as an
    entry point of your package in the ``qround.solvers`` group (:func:`load_plugins`).
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise QroundError(f"solver name {name!r} may hold letters, digits, '.', '-' and '_' "
                          "only ('+' and '|' compose solvers)")
    if not callable(factory):
        raise QroundError(f"factory for solver {name!r} must be callable, got "
                          f"{type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise QroundError(f"solver {name!r} is already registered (register(..., "
                          "overwrite=True) replaces it)")
    _REGISTRY[name] = factory
    _DESCRIPTIONS[name] = description


def load_plugins() -> None:
    """Register the solvers that installed packages declare as entry points in the
    ``qround.solvers`` group, once per process (on the first lookup)::

        # your package's pyproject.toml
        [project.entry-points."qround.solvers"]
        my-qubo = "mypkg.solvers:MyQuboSolver"

    The entry point's name is the solver's name; its value loads a factory (a ``Solver`` class
    or a function returning one).  A plugin that fails to load, or whose name is taken, is
    skipped with a warning: it never breaks the built-in solvers.
    """
    if _PLUGINS["loaded"]:
        return
    _PLUGINS["loaded"] = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name in _REGISTRY:
            log.warning("solver plugin %r (%s) skipped: the name is taken", ep.name, ep.value)
            continue
        try:
            factory = ep.load()
            if ep.name not in _REGISTRY:  # its module may have registered it on import
                register(ep.name, factory, f"plugin {ep.value}")
        except Exception as exc:  # noqa: BLE001 (a broken plugin must not break qround)
            log.warning("solver plugin %r (%s) could not be loaded: %s", ep.name, ep.value, exc)


def available_solvers() -> dict[str, str]:
    """Registered names with a one-line description each (plugins included)."""
    load_plugins()
    return dict(sorted(_DESCRIPTIONS.items()))


def place(solver: Solver, device) -> Solver:
    """Set ``device`` on every part of ``solver`` that has one (a chain's or best-of's parts too),
    in place, and return it.  ``device`` is checked first ("cpu", "cuda", "cuda:1")."""
    from ._torch import resolve_device

    resolve_device(device)
    stack = [solver]
    while stack:
        s = stack.pop()
        stack.extend(getattr(s, "solvers", []))
        if "device" in vars(s):
            s.device = device
    return solver


def get_solver(spec: str | Solver, device=None, **kwargs) -> Solver:
    """Build a solver from a name or spec; ``kwargs`` go to a single named solver's factory.

    device: None keeps each solver's own default (the CPU); else every torch solver in the spec
    runs there (see :func:`place`).  A ``Solver`` instance is returned as given (not moved).
    """
    if isinstance(spec, Solver):
        if device is not None:
            raise QroundError("device= applies to a solver built from a spec; set it on your "
                              "Solver instance (or use qround.solvers.place)")
        return spec
    if device is not None:
        return place(get_solver(spec, **kwargs), device)
    if not isinstance(spec, str) or not spec.strip():
        raise QroundError(f"solver spec must be a non-empty string, got {spec!r}")
    spec = "".join(spec.split())  # spaces, tabs, newlines
    if any(not part for part in spec.replace("|", "+").split("+")):
        raise QroundError(f"solver spec {spec!r} has an empty part: write names joined by '+' "
                          "(then) and '|' (better of), e.g. 'gptq+tabu|anneal'")
    if "|" in spec:
        if kwargs:
            raise QroundError("keyword arguments apply to a single solver, not to a composition")
        return BestOf(*(get_solver(part) for part in spec.split("|")))
    if "+" in spec:
        if kwargs:
            raise QroundError("keyword arguments apply to a single solver, not to a composition")
        return Chain(*(get_solver(part) for part in spec.split("+")))
    if spec not in _REGISTRY:
        load_plugins()
    if spec not in _REGISTRY:
        raise QroundError(f"unknown solver {spec!r}; available: {', '.join(sorted(_REGISTRY))}")
    try:
        solver = _REGISTRY[spec](**kwargs)
    except TypeError as exc:  # an argument the factory does not take
        if not kwargs:
            raise
        raise QroundError(f"solver {spec!r} does not take {sorted(kwargs)}: {exc}") from None
    if solver.label != spec:  # an alias (tabu-fast, neal...) reports under the name asked for
        solver._label = spec
    return solver
