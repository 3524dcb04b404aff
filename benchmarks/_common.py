"""Helpers shared by the end-to-end benchmark scripts (run from this folder's parent)."""
from __future__ import annotations

from qround.solvers import available_solvers


def _choices(text: str, allowed, flag: str, parser) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        parser.error(f"{flag}: unknown {bad or 'empty list'}; choose from {list(allowed)}")
    return items


def known_solver(spec: str) -> bool:
    """Whether every solver name in a spec (``a+b``, ``a|b``) is registered."""
    return all(name in available_solvers() for name in spec.replace("|", "+").split("+"))


def plan(args) -> tuple[list[tuple[str, str | None]], list[str]]:
    """(method label, solver spec or None) in run order, and notes on skipped solver specs."""
    out, notes = [], []
    for method in args.methods:
        if method in ("solvers", "reconstruct"):
            suffix = "+rec" if method == "reconstruct" else ""
            for spec in args.solvers:
                if known_solver(spec):
                    out.append((f"qround:{spec}{suffix}", spec))
                elif not suffix:
                    notes.append(f"skipped solver {spec!r}: not in the registry")
        else:
            out.append((method, "hopfield" if method == "hopfield" else None))
    return out, notes
