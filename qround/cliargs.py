"""Argument types and path checks shared by ``qround`` and ``qround bench``.

Every check here runs before any work: a bad number or a clash of paths ends the command with a
one-line error (argparse's, or a QroundError) instead of a traceback or a lost file.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable

from .errors import MAX_BITS, MIN_BITS, QroundError


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low`` (and ``<= high`` when given)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def finite_at_least(low: float) -> Callable[[str], float]:
    """An argparse ``type``: a finite number ``>= low``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low}, got {text}")
        return value
    parse.__name__ = f"number >= {low}"
    return parse


def bits_list(text: str) -> tuple[int, ...]:
    """An argparse ``type``: comma-separated bit widths, each in the supported range."""
    parts = [x for x in text.split(",") if x.strip()]
    try:
        bits = tuple(int(x) for x in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") \
            from None
    if not bits:
        raise argparse.ArgumentTypeError("needs at least one bit width")
    bad = [b for b in bits if not MIN_BITS <= b <= MAX_BITS]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad} out of range: supported are {MIN_BITS}.."
                                         f"{MAX_BITS} bits")
    return tuple(dict.fromkeys(bits))  # each width once, in the order given


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_paths(outputs: dict[str, str | None], inputs: dict[str, str | None] = None) -> None:
    """Before any work: no output (``{flag: path}``) is a folder, names the same file as another
    output, or would overwrite an input (``{flag: path}``, e.g. ``--model``).  ``None`` paths are
    not given and skipped."""
    def key(path):
        return os.path.normcase(os.path.realpath(os.fspath(path)))

    seen: dict[str, str] = {}
    existing: dict[str, str] = {}  # inputs that exist, by path: samefile catches a name that
    # a case-insensitive disk (macOS's default) takes for the same file in another case
    outputs_seen: dict[str, str] = {}
    folders: dict[str, str] = {}   # input folders (a checkpoint): nothing may be written inside
    for flag, path in (inputs or {}).items():
        if path is not None and os.path.exists(path):
            seen[key(path)] = f"the input {flag}"
            existing[os.fspath(path)] = f"the input {flag}"
            if os.path.isdir(path):
                folders[key(path)] = flag
    for flag, path in outputs.items():
        if path is None:
            continue
        if not os.fspath(path).strip():
            raise QroundError(f"{flag} is empty (an unset shell variable?); give a file name")
        if os.path.isdir(path) or os.fspath(path).endswith(("/", os.sep)):
            raise QroundError(f"{flag} {path!r} is a folder; give a file name")
        inside = next((f for k, f in folders.items()
                       if key(path).startswith(k.rstrip(os.sep) + os.sep)), None)
        if inside:
            raise QroundError(f"{flag} {path!r} lies inside the input {inside} folder, which "
                              "holds the float model; write it elsewhere")
        parent = os.path.dirname(os.path.abspath(os.fspath(path)))
        while parent and not os.path.exists(parent):  # the part of the path that exists
            parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
        if parent and not os.path.isdir(parent):
            raise QroundError(f"{flag} {path!r}: {parent!r} is a file, so no folder can be made "
                              "there; give another path")
        if parent and not os.access(parent, os.W_OK | os.X_OK):
            raise QroundError(f"{flag} {path!r}: the folder {parent!r} is not writable; give "
                              "another path")
        k = key(path)
        same = seen.get(k)
        if same is None and os.path.exists(path):
            same = next((what for other, what in existing.items()
                         if _same_file(path, other)), None)
        if same is not None:
            raise QroundError(f"{flag} {path!r} is the same file as {same}; it would be "
                              "overwritten: give another name")
        # one output inside another (a file under --save-compressed's new folder, or under a
        # file's name): the second write would fail after all the work
        for other, other_flag in outputs_seen.items():
            if k.startswith(other.rstrip(os.sep) + os.sep) or \
                    other.startswith(k.rstrip(os.sep) + os.sep):
                inner, outer = (flag, other_flag) if len(k) > len(other) else (other_flag, flag)
                raise QroundError(f"{inner} lies inside {outer}'s path: the two outputs would "
                                  "collide; write them to separate places")
        seen[k] = flag
        outputs_seen[k] = flag


# what a file name's suffix says it holds: an output whose name promises another format is
# refused before any work (an .npz archive named e.safetensors would not load as one)
_FORMATS = {".npz": "an .npz archive", ".npy": "a numpy array",
            ".safetensors": "a safetensors file", ".pt": "a torch.save file",
            ".pth": "a torch.save file", ".json": "JSON", ".png": "an image", ".pdf": "a PDF",
            ".svg": "an SVG image", ".txt": "text", ".csv": "CSV",
            ".qubo": "a qbsolv QUBO file", ".bqm": "a dimod BQM file"}
PLOT_SUFFIXES = (".png",)   # qround.report.save_figure_atomic writes PNG


def check_format(flag: str, path: str | None, writes: str, suffixes: tuple[str, ...]) -> None:
    """Before any work: refuse an output ``path`` whose suffix names a format other than what
    ``flag`` writes (``writes``, e.g. "an .npz archive"; allowed ``suffixes``).  Names without
    a known suffix are accepted, except for plots: a PNG is named .png."""
    if path is None:
        return
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix in suffixes:
        return
    plots = suffixes == PLOT_SUFFIXES
    if suffix in _FORMATS or plots:
        held = _FORMATS.get(suffix, f"a {suffix} file") if suffix else "no format"
        raise QroundError(f"{flag} {os.fspath(path)!r}: this writes {writes}, but the name "
                          f"says {held}; end it in {' or '.join(suffixes)}")


def group_size_arg(text: str) -> int | None:
    """An argparse ``type`` for ``--group-size``: a positive integer, or ``none`` / ``-1`` (GPTQ's
    convention) for one scale per output channel, as ``--override ... group_size=none``."""
    if text.strip().lower() in ("none", "-1"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, or none (-1) for one "
                                         f"scale per channel, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, or none (-1) for one "
                                         f"scale per channel, got {value}")
    return value


group_size_arg.__name__ = "group size"
