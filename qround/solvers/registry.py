"""Solvers by name, and solver specs that compose them.

A spec is a name (``greedy``), a chain ``a+b`` (run ``a``, polish with ``b``), or a best-of
``a|b`` (per channel the better of ``a`` and ``b``, both from the same start); ``+`` binds
tighter than ``|``.  ``register`` adds a factory; ``get_solver`` builds a solver from a spec.
"""
from __future__ import annotations

from typing import Callable

from ..errors import QroundError
from .base import BestOf, Chain, Solver

_REGISTRY: dict[str, Callable[..., Solver]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register(name: str, factory: Callable[..., Solver], description: str = "",
             overwrite: bool = False) -> None:
    """Register ``factory(**kwargs) -> Solver`` under ``name`` (letters, digits, '-', '_')."""
    if not name or any(ch in name for ch in "+| "):
        raise QroundError(f"solver name {name!r} may not contain '+', '|' or spaces")
    if name in _REGISTRY and not overwrite:
        raise QroundError(f"solver {name!r} is already registered")
    _REGISTRY[name] = factory
    _DESCRIPTIONS[name] = description


def available_solvers() -> dict[str, str]:
    """Registered names with a one-line description each."""
    return dict(sorted(_DESCRIPTIONS.items()))


def get_solver(spec: str | Solver, **kwargs) -> Solver:
    """Build a solver from a name or spec; ``kwargs`` go to a single named solver's factory."""
    if isinstance(spec, Solver):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise QroundError(f"solver spec must be a non-empty string, got {spec!r}")
    spec = spec.replace(" ", "")
    if "|" in spec:
        if kwargs:
            raise QroundError("keyword arguments apply to a single solver, not to a composition")
        return BestOf(*(get_solver(part) for part in spec.split("|")))
    if "+" in spec:
        if kwargs:
            raise QroundError("keyword arguments apply to a single solver, not to a composition")
        return Chain(*(get_solver(part) for part in spec.split("+")))
    if spec not in _REGISTRY:
        raise QroundError(f"unknown solver {spec!r}; available: {', '.join(sorted(_REGISTRY))}")
    solver = _REGISTRY[spec](**kwargs)
    if solver.label != spec:  # an alias (tabu-fast, neal...) reports under the name asked for
        solver._label = spec
    return solver
