"""Solvers by name, and solver specs that compose them.

A spec is a name (``greedy``), a chain ``a+b`` (run ``a``, polish with ``b``), or a best-of
``a|b`` (per channel the better of ``a`` and ``b``, both from the same start); ``+`` binds
tighter than ``|``.  ``register`` adds a factory; ``get_solver`` builds a solver from a spec.
``get_solver(spec, device="cuda")`` (or :func:`place`) puts every torch solver of a spec
(``cem``, ``hopfield``, ``hopfield-classic``, ``gptq``) on that device; the numba solvers
(``greedy``, ``anneal``, ``tabu``) run on the CPU whatever the device.
"""
from __future__ import annotations

from typing import Callable

from ..errors import QroundError
from .base import BestOf, Chain, Solver

DEFAULT_SOLVER = "fast"   # what quantize_model and `qround quantize` use unless told otherwise

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
