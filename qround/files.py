"""Atomic file writes: a temp file in the target's folder, fsync, then ``os.replace``.

A failed write never leaves a partial file and never damages an existing one.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator

from .errors import QroundError


@contextmanager
def atomic_write(path: str | os.PathLike, binary: bool = True, what: str = "file") -> Iterator[IO]:
    """Open a temp file for writing; on success it replaces ``path``.

    The target folder must exist.  A replaced file keeps its permissions, a new one gets
    0666 less the umask, as ``open`` would give it (mkstemp alone would leave it private).  ``OSError`` becomes a QroundError naming ``what``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise QroundError(f"cannot write {what} {path!r}: directory {folder!r} does not exist")
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=folder)
    except OSError as exc:
        raise QroundError(f"cannot write {what} {path!r}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise QroundError(f"cannot write {what} {path!r}: {exc}") from exc
        raise


def _umask() -> int:
    """The process umask (read from /proc where there is one, so nothing is changed)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting, then restore at once
    os.umask(mask)
    return mask
