"""Files replaced whole or not at all: write under a temporary name beside the target, fsync,
rename (atomic), fsync the folder. Used by checkpoints and weight files."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

TMP_PREFIX = ".tmp-"


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Replace ``path`` with what ``write(tmp)`` puts into a temporary file beside it.

    The temporary file is fsynced, renamed onto ``path`` and the folder fsynced, so a kill at
    any moment leaves either the old file or the complete new one under ``path`` (a process
    killed outright may leave the hidden temporary ``.tmp-{name}-{random}`` behind). If
    ``write`` (or the fsync) raises, even a KeyboardInterrupt, the temporary file is removed,
    ``path`` is untouched and the exception propagates. Returns ``path``.

    >>> atomic_write("runs/x/notes.txt", lambda tmp: tmp.write_text("done"))  # doctest: +SKIP
    PosixPath('runs/x/notes.txt')
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        fsync(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync(path.parent)
    return path


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` (``.tmp-{name}-{random}``) to write it under first."""
    return path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")


def fsync(path: Path) -> None:
    """Flush a file or folder to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
