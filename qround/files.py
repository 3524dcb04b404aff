"""Atomic file writes: a temp file in the target's folder, fsync, then ``os.replace``.

A failed write never leaves a partial file and never damages an existing one.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator

from .errors import QroundError


@contextmanager
def atomic_write(path: str | os.PathLike, binary: bool = True, what: str = "file",
                 make_folder: bool = False) -> Iterator[IO]:
    """Open a temp file for writing; on success it replaces ``path``.

    The target folder must exist (``make_folder``: created with its parents).  A replaced file
    keeps its permissions, a new one gets 0666 less the umask, as ``open`` would give it
    (mkstemp alone would leave it private).  A symbolic link is written through: its target is
    replaced, the link stays.  A file without write permission is refused, as ``open`` would
    refuse it.  ``OSError`` becomes a QroundError naming ``what``.  Text is written as UTF-8.
    """
    path = os.fspath(path)
    if os.path.islink(path):
        path = os.path.realpath(path)
    folder = os.path.dirname(os.path.abspath(path))
    made = missing_folders(folder) if make_folder else []   # removed again on a failure
    if make_folder:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise QroundError(f"cannot write {what} {path!r}: cannot create its folder "
                              f"{folder!r}: {exc}") from exc
    if not os.path.isdir(folder):
        raise QroundError(f"cannot write {what} {path!r}: directory {folder!r} does not exist")
    if os.path.isdir(path):
        raise QroundError(f"cannot write {what} {path!r}: it is a directory; give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise QroundError(f"cannot write {what} {path!r}: the file is read-only")
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=folder)
    except OSError as exc:
        remove_folders(made)
        raise QroundError(f"cannot write {what} {path!r}: {exc}") from exc
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        remove_folders(made)
        if isinstance(exc, OSError):
            raise QroundError(f"cannot write {what} {path!r}: {exc}") from exc
        raise


def missing_folders(folder: str | os.PathLike) -> list[str]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing, path = [], os.path.abspath(folder)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def remove_folders(folders: list[str]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: what a failed write created."""
    for path in folders:
        try:
            os.rmdir(path)
        except OSError:
            break


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


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """``safetensors.torch.save(tensors, metadata)`` with its header's keys sorted: the same
    tensors and metadata give the same bytes in every process (safetensors writes the metadata
    from a hash map whose order changes from one process to the next)."""
    import safetensors.torch

    data = safetensors.torch.save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # the format pads its header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + data[8 + size:]
