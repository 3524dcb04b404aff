"""Solvers by name, and solver specs that compose them.

A spec is a name (``greedy``), a name with options (``tabu(restarts=8, tenure=20)``: keyword
arguments of the solver's factory, Python literals), a chain ``a+b`` (run ``a``, polish with
``b``), or a best-of ``a|b`` (per channel the better of ``a`` and ``b``, both from the same
start); ``+`` binds tighter than ``|``, parentheses group (``gptq+(tabu|anneal)``: GPTQ, then
the better of the two from GPTQ's result), and a part's options may hold any of ``+|,()``.  So the
shell can tune a solver: ``qround solve --solver "gptq+tabu(restarts=16)"``.  ``register`` adds
a factory; ``get_solver`` builds a solver from a spec; :func:`split_specs` splits a
comma-separated list of specs.
``get_solver(spec, device="cuda")`` (or :func:`place`) puts every torch solver of a spec
(``cem``, ``hopfield``, ``hopfield-classic``, ``meanfield``, ``gptq``) on that device; the
others (``greedy`` in numpy, ``anneal`` and ``tabu`` in numba) run on the CPU whatever the
device.
"""
from __future__ import annotations

import ast
import functools
import logging
import os
import re
import threading
import time
from typing import Callable

from .._defaults import DEFAULT_SOLVER  # noqa: F401 (qround.solvers.registry.DEFAULT_SOLVER)
from ..errors import QroundError
from .anneal import Anneal
from .base import BestOf, Chain, Solver
from .cem import CrossEntropy
from .dimod_backend import DimodSolver
from .gptq import GPTQ
from .hopfield import HopfieldClassic, Relaxation
from .local import Greedy
from .meanfield import MeanField
from .reference import Exact, Nearest, Stochastic
from .tabu import Tabu

log = logging.getLogger(__name__)

PLUGIN_GROUP = "qround.solvers"  # entry points of installed packages: name = "module:factory"

_REGISTRY: dict[str, Callable[..., Solver]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_PLUGINS = {"loaded": False}    # while one thread loads them: "loader", "done"...
_PLUGINS_LOCK = threading.Lock()    # held only to claim the loading, never while loading
_WARNINGS_LOCK = threading.Lock()
PLUGIN_WAIT_S = 30.0   # how long another thread's first lookup waits for the loading


def _after_fork_in_child() -> None:
    global _PLUGINS_LOCK, _WARNINGS_LOCK
    _PLUGINS_LOCK, _WARNINGS_LOCK = threading.Lock(), threading.Lock()
    if not _PLUGINS["loaded"]:   # a loading thread of the parent does not exist here
        for key in ("loader", "done", "deadline", "warned"):
            _PLUGINS.pop(key, None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
    state = _PLUGINS
    me = threading.get_ident()
    while not state["loaded"]:
        with _PLUGINS_LOCK:   # claim the loading; no lock is held while plugins import
            if state["loaded"]:
                return
            loader = state.get("loader")
            if loader is None:
                state["loader"], state["done"] = me, threading.Event()
                state["deadline"] = time.monotonic() + PLUGIN_WAIT_S
            done, deadline = state["done"], state["deadline"]
        if loader is None:    # this thread loads them
            finished = False
            try:
                _load_entry_points(state.setdefault("eps", set()))
                finished = True
            finally:
                with _PLUGINS_LOCK:   # interrupted (Ctrl-C): a later lookup loads them again
                    state["loaded"] = finished
                    for key in ("loader", "done", "deadline", "warned"):
                        state.pop(key, None)
                done.set()
            return
        if loader == me:      # a plugin's import looked a solver up: the registry so far
            return
        # another thread's first lookup waits for the loading, until one deadline per loading:
        # a plugin module that this thread is importing may be what the loading waits for
        if done.wait(max(0.0, deadline - time.monotonic())):
            continue          # loaded, or interrupted: then this thread loads them
        with _PLUGINS_LOCK:
            warn = state.get("done") is done and not state.get("warned")
            if warn:
                state["warned"] = True
        if warn:
            log.warning("solver plugins are still loading in another thread after %g s; going "
                        "on with the solvers registered so far", PLUGIN_WAIT_S)
        return


def _load_entry_points(loaded: set) -> None:
    """Register each entry point of the group once per process (``loaded``: the (name, value)
    pairs done, kept across an interrupted loading and a fork)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        if (ep.name, ep.value) in loaded:
            continue
        if ep.name in _REGISTRY:
            log.warning("solver plugin %r (%s) skipped: the name is taken", ep.name, ep.value)
            loaded.add((ep.name, ep.value))
            continue
        try:
            factory = ep.load()
            if ep.name not in _REGISTRY:  # its module may have registered it on import
                register(ep.name, factory, f"plugin {ep.value}")
        except (Exception, SystemExit) as exc:  # noqa: BLE001 (a broken plugin must not
            # break qround; a plugin that calls sys.exit on import is broken too)
            log.warning("solver plugin %r (%s) could not be loaded: %s", ep.name, ep.value,
                        exc if not isinstance(exc, SystemExit) else f"SystemExit({exc})")
        loaded.add((ep.name, ep.value))


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

    device: None keeps each solver's own default (the CPU) or the ``device=`` option a spec
    gives; else every torch solver in the spec runs there (see :func:`place`), and a spec part
    that names another device is refused.  A ``Solver`` instance is returned as given (not
    moved).
    """
    if isinstance(spec, Solver):
        if device is not None:
            raise QroundError("device= applies to a solver built from a spec; set it on your "
                              "Solver instance (or use qround.solvers.place)")
        return spec
    if device is not None:
        asked = _spec_devices(spec) | ({kwargs["device"]} if "device" in kwargs else set())
        if any(str(d) != str(device) for d in asked):
            raise QroundError(f"solver spec {normalize_spec(spec)!r} names device(s) "
                              f"{sorted(map(str, asked))} but device={device!r} was given: "
                              "give the device in one place")
        solver = get_solver(spec, **kwargs)
        return place(solver, device)
    spec = _ungroup(normalize_spec(spec))
    alternatives = _split_top(spec, "|", spec)
    _check_no_empty_part(spec, alternatives)
    if len(alternatives) > 1:
        if kwargs:
            raise QroundError("keyword arguments apply to a single solver, not to a composition")
        return BestOf(*(get_solver(part) for part in alternatives))
    stages = _split_top(spec, "+", spec)
    if len(stages) > 1:
        if kwargs:
            raise QroundError("keyword arguments apply to a single solver, not to a composition")
        return Chain(*(get_solver(part) for part in stages))
    name, options = _parse_part(spec)
    if name not in _REGISTRY:
        load_plugins()
    if name not in _REGISTRY:
        raise QroundError(f"unknown solver {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    both = sorted(set(options) & set(kwargs))
    if both:
        raise QroundError(f"solver {name!r}: {both} given both in the spec and as keyword "
                          "arguments")
    kwargs = {**options, **kwargs}
    factory = _REGISTRY[name]
    unknown = _unknown_arguments(factory, kwargs)
    if unknown:
        raise QroundError(f"solver {name!r} does not take {unknown}; it takes "
                          f"{_accepted_arguments(factory)}")
    try:
        solver = factory(**kwargs)
    except TypeError as exc:  # the names were taken: a value of the wrong type
        if not kwargs:   # a factory with a required argument, or an abstract plugin class
            raise QroundError(f"solver {name!r} cannot be built from its name alone: "
                              f"{exc}") from None
        raise QroundError(f"solver {name!r}: a value of the wrong type in {kwargs}: "
                          f"{exc}") from None
    if not isinstance(solver, Solver):   # a plugin's factory that returns something else
        raise QroundError(f"solver {name!r}: its factory returned {type(solver).__name__}, not "
                          "a qround Solver (wrap a dimod sampler in DimodSolver)")
    if solver.label != spec:  # an alias (tabu-fast, neal...) or options: the spec asked for
        solver._label = spec
    return solver


def normalize_spec(spec: str) -> str:
    """``spec`` without whitespace outside quoted strings (the form labels use):
    ``"gptq + tabu(restarts=8, order='a b')"`` -> ``"gptq+tabu(restarts=8,order='a b')"``."""
    if not isinstance(spec, str) or not spec.strip():
        raise QroundError(f"solver spec must be a non-empty string, got {spec!r}")
    if len(spec) > MAX_SPEC_CHARS:
        raise QroundError(f"solver spec of {len(spec)} characters: at most {MAX_SPEC_CHARS}")
    out, depth, gap, before = [], 0, False, ""
    for _, ch, quoted in _scan(spec, spec):
        if not quoted and ch.isspace():
            gap = True
            continue
        if gap and not quoted and _in_token(before) and _in_token(ch):
            # spaces inside a name or a number ("restarts=1 6", "gp tq") are refused, as
            # Python refuses them, instead of being glued into another value
            at = "".join(out)
            raise QroundError(f"solver spec {spec.strip()!r} has a space inside a name or "
                              f"value, after {at[-20:]!r} (a missing comma or operator?)")
        gap = False
        if not quoted:
            depth += 1 if ch in "([{" else -1 if ch in ")]}" else 0
            if depth > MAX_SPEC_DEPTH:
                raise QroundError(f"solver spec nests parentheses more than {MAX_SPEC_DEPTH} "
                                  "deep")
        out.append(ch)
        before = "" if quoted else ch
    return "".join(out)


def _in_token(ch: str) -> bool:
    """Whether ``ch`` belongs to a name or a number (letters, digits, '_', '.', and '-', which
    solver names hold: ``tabu-fast``)."""
    return bool(ch) and (ch.isalnum() or ch in "_.-")


MAX_SPEC_CHARS = 4000
MAX_SPEC_DEPTH = 32


def split_specs(text: str) -> list[str]:
    """A comma-separated list of solver specs (commas inside a part's options belong to it),
    each normalised (:func:`normalize_spec`) and listed once:
    ``"gptq, tabu(restarts=8, tenure=20)"`` -> ``["gptq", "tabu(restarts=8,tenure=20)"]``.
    Blank items are dropped."""
    if not isinstance(text, str):
        raise QroundError(f"solver list must be a string, got {text!r}")
    if len(text) > MAX_SPEC_CHARS:
        raise QroundError(f"solver list of {len(text)} characters: at most {MAX_SPEC_CHARS}")
    parts = [normalize_spec(p) for p in _split_top(text, ",", text) if p.strip()]
    return list(dict.fromkeys(parts))


def parse_part(spec: str) -> tuple[str, dict]:
    """One name with its options: ``"tabu(restarts=8)"`` -> ``("tabu", {"restarts": 8})``;
    QroundError for a composition or a malformed part."""
    parts = _spec_parts(spec)
    if len(parts) != 1:
        raise QroundError(f"{normalize_spec(spec)!r}: give one name with its options here, "
                          "not a composition")
    return parts[0]


def spec_names(spec: str) -> list[str]:
    """The solver names a spec uses, options dropped: ``"gptq+tabu(restarts=8)|anneal"`` ->
    ``["gptq", "tabu", "anneal"]``.  QroundError for a malformed spec."""
    return [name for name, _ in _spec_parts(spec)]


def _spec_parts(spec: str) -> list[tuple[str, dict]]:
    spec = _ungroup(normalize_spec(spec))
    alternatives = _split_top(spec, "|", spec)
    _check_no_empty_part(spec, alternatives)
    parts = alternatives if len(alternatives) > 1 else _split_top(spec, "+", spec)
    if len(parts) > 1:
        return [found for part in parts for found in _spec_parts(part)]
    return [_parse_part(spec)]


def _ungroup(spec: str) -> str:
    """``spec`` without parentheses that enclose all of it: ``"(tabu|anneal)"`` ->
    ``"tabu|anneal"``, so that ``"gptq+(tabu|anneal)"`` is GPTQ, then the better of the two."""
    while spec.startswith("("):
        depth = 0
        for i, ch, quoted in _scan(spec, spec):
            if not quoted:
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0:
                    break
        if depth != 0 or i != len(spec) - 1:
            return spec   # "(a)+(b)", or unbalanced: _split_top says what is wrong
        spec = spec[1:-1]
        if not spec:
            raise QroundError("solver spec '()' is empty")
    return spec


def _check_no_empty_part(spec: str, alternatives: list[str]) -> None:
    if any(not part for alt in alternatives for part in _split_top(alt, "+", spec)):
        raise QroundError(f"solver spec {spec!r} has an empty part: write names joined by '+' "
                          "(then) and '|' (better of), e.g. 'gptq+tabu|anneal', grouped with "
                          "parentheses, e.g. 'gptq+(tabu|anneal)'")


def _spec_devices(spec: str) -> set:
    return {options["device"] for _, options in _spec_parts(spec) if "device" in options}


def _accepted_arguments(factory) -> list[str]:
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _unknown_arguments(factory, kwargs: dict) -> list[str]:
    """The keyword names ``factory`` does not take (none when it takes ``**kwargs`` or its
    signature cannot be read)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return sorted(set(kwargs) - names)


def _split_top(text: str, sep: str, spec: str) -> list[str]:
    """``text`` split at ``sep`` outside parentheses, brackets and quoted strings."""
    parts, depth, start = [], 0, 0
    for i, ch, quoted in _scan(text, spec):
        if quoted:
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise QroundError(f"solver spec {spec!r} closes a parenthesis it never opened")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise QroundError(f"solver spec {spec!r} has an unclosed parenthesis")
    parts.append(text[start:])
    return parts


def _scan(text: str, spec: str):
    """(index, character, inside a quoted string) for each character of ``text``, the quotes
    counted inside and backslash escapes honoured; QroundError for an unclosed quote."""
    quote, escaped = "", False
    for i, ch in enumerate(text):
        if quote:
            yield i, ch, True
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            yield i, ch, True
        else:
            yield i, ch, False
    if quote:
        raise QroundError(f"solver spec {spec!r} has an unclosed quote")


def _parse_part(part: str) -> tuple[str, dict]:
    """``name`` or ``name(key=literal, ...)`` -> (name, options)."""
    import warnings

    found = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\((.*)\))?", part, flags=re.S)
    if not found:
        raise QroundError(f"solver spec part {part!r} is not NAME or NAME(key=value, ...), "
                          "e.g. 'tabu(restarts=8)'")
    name, text = found.groups()
    if not text:
        return name, {}
    source = f"f({text})"
    example = "e.g. 'tabu(restarts=8,tenure=20)'"
    try:
        # SyntaxWarnings of odd literals: we refuse them.  catch_warnings swaps the process's
        # filter list, so two threads doing it at once could leave "ignore" behind for good
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call = ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        why = f" ({exc})" if isinstance(exc, ValueError) else ""
        raise QroundError(f"options of {_short(part)!r} must be key=value pairs{why}, "
                          f"{example}") from None
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args \
            or any(k.arg is None for k in call.keywords):
        raise QroundError(f"options of {_short(part)!r} must be key=value pairs (no "
                          f"positional values), {example}")
    options = {}
    for kw in call.keywords:
        if kw.arg in options:
            raise QroundError(f"option {kw.arg!r} is given twice in {_short(part)!r}")
        try:
            options[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            given = ast.get_source_segment(source, kw.value) or "?"
            given = given if len(given) <= 60 else given[:57] + "..."
            # a bare word, or one that Python reads as arithmetic (exact-dimod, a.b)
            hint = (f"; strings need quotes: {kw.arg}='{given}'"
                    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", given) else "")
            raise QroundError(f"option {kw.arg!r} of {name!r} must be a Python literal (a "
                              f"number, string, True/False/None, a tuple or a list), got "
                              f"{given!r}{hint}") from None
    return name, options


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------ the built-in solvers
# registered when this module loads (every lookup goes through it; no solver module imports it)
register("nearest", Nearest, "rounding-to-nearest (the baseline)")
register("stochastic", Stochastic, "stochastic rounding, best of K samples")
register("exact", Exact, "exact optimum by enumeration (small channels only)")
register("greedy", Greedy, "steepest-descent single flips, batched over channels")
register("anneal", Anneal, "simulated annealing, batched over channels (numba)")
register("tabu", Tabu, "iterated tabu search, batched over channels (numba)")
register("dimod", DimodSolver, "any dimod sampler, one BQM per channel (sampler=...)")
register("neal", lambda **kw: DimodSolver("neal", **kw),
         "dwave-neal / dwave-samplers simulated annealing via dimod")
register("dwave-tabu", lambda **kw: DimodSolver("dwave-tabu", **kw),
         "dwave-samplers tabu search via dimod")
register("dwave-steepest", lambda **kw: DimodSolver("dwave-steepest", **kw),
         "dwave-samplers steepest descent via dimod")
register("cem", CrossEntropy, "cross-entropy method from stochastic-rounding probabilities (torch)")
register("gptq", GPTQ, "GPTQ sequential rounding with error feedback, floor/ceil only (torch)")
register("hopfield", Relaxation, "AdaRound continuous relaxation (rectified sigmoid, Adam; torch)")
register("meanfield", MeanField, "mean-field annealing, damped synchronous steps (torch)")
register("hopfield-classic", HopfieldClassic,
         "classical Hopfield relaxation, sigmoid(V/T) with annealed T (torch)")
register("tabu-fast", functools.partial(Tabu, restarts=0, iters_per_var=1.0),
         "one short tabu round (about n flips per channel)")

# Named defaults (chosen from benchmarks/solvers.py, see BENCHMARKS.md). Local search from RTN
# stalls on wide layers (1536 inputs); GPTQ's error feedback gives it a far better basin.
# From GPTQ's start the first-improvement descent does not pay: about n tabu flips without it
# were as good or better on every MiniLM/CNN layer of the benchmark, and a little faster.
register("fast", lambda: Chain(GPTQ(), Tabu(restarts=0, iters_per_var=1.0, descent=False),
                               label="fast"),
         "default for speed: gptq, then one short tabu round")
# `quality` searches three basins from GPTQ's start and keeps the best per channel: iterated tabu
# search; a short anneal (1000 sequential sweeps) followed by tabu; mean-field annealing
# followed by tabu.  The anneal leaves GPTQ's basin where tabu stalls (2-bit convs, where it cut
# the layer cost by up to a quarter); tabu alone stays best where the start is already good
# (3-4-bit convs); mean-field annealing, a deterministic relaxation that ignores the start, finds
# other basins again (on the convs its branch cut the cost 2-4 % at every width).  Each branch's
# tabu search has 3 rounds (it had 5 with two branches), so the three together take 1.0-1.26x
# the time the two did.  A tabu round ends after 4000 iterations without a new best: on layers of up
# to 400 inputs (10 n iterations per round) that never happens; on 1536-input layers, where tabu
# stalls after an anneal, it halved the time and gave the same costs.  BENCHMARKS.md 1d and 1j.
register("quality", lambda: Chain(
    GPTQ(), BestOf(Tabu(stall=4000, restarts=2),
                   Chain(Anneal(order="sequential"), Tabu(stall=4000, restarts=2)),
                   Chain(MeanField(), Tabu(stall=4000, restarts=2))), label="quality"),
         "default for quality: gptq, then the best per channel of iterated tabu search, "
         "anneal + tabu and mean-field annealing + tabu")
