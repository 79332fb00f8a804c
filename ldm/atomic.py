"""Atomic file writes: every file ldm publishes (checkpoints, shards' sidecars, caches, results, PNGs) is
written to a temporary name in the same folder and renamed over its final name, so a reader, a resumed run or
a crash never sees half a file. One helper, used everywhere.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _umask_mode() -> int:
    """0o666 minus the process umask: the mode a plain ``open(path, "w")`` would give (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, fsync: bool = False) -> Path:
    """Run ``write(tmp_name)``, which must create the file ``tmp_name``, then rename it over ``path``.

    The temporary file lies beside ``path`` (same file system, so the rename is atomic on POSIX) and is
    removed when ``write`` fails. ``fsync``: flush it to disk before the rename (checkpoints, shards).
    Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())  # readable like any other file the user writes, not 0600
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_stream(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *,
                        fsync: bool = False) -> Path:
    """:func:`atomic_write` for writers that take an open binary file (``torch.save``, ``np.savez``, PIL)."""
    def to_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)
    return atomic_write(path, to_file, fsync=fsync)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines untranslated) atomically to ``path``; returns ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically to ``path``; returns ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
