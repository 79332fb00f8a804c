"""ldm's weight cache on disk, shared by the LPIPS and MiniLM fetchers (``ldm.pretrained``).

``cache_dir()`` is ``$LDM_CACHE_DIR`` or ``~/.cache/ldm``; ``LDM_OFFLINE=1`` forbids every download
(:func:`offline`). Files are written atomically (:func:`atomic_write`) and checked by sha256 (:func:`sha256_file`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from ldm.atomic import atomic_write  # noqa: F401  (re-exported: the fetchers write through it)

OFFLINE_VALUES = {"1", "true", "yes", "on"}


def cache_dir() -> Path:
    """ldm's weight cache: ``$LDM_CACHE_DIR`` if set, else ``~/.cache/ldm``."""
    env = os.environ.get("LDM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ldm"


def offline() -> bool:
    """True when ``LDM_OFFLINE`` is set (1/true/yes/on): never download weights."""
    return os.environ.get("LDM_OFFLINE", "").strip().lower() in OFFLINE_VALUES


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(requirement: str, hashes: list[str], dest: Path, binary: str, pattern: str) -> Path:
    """``pip download --no-deps`` of one pinned, hash-checked ``requirement`` into ``dest``; returns the file
    matching ``pattern``. ``binary``: ``"--no-binary"`` (the sdist) or ``"--only-binary"`` (the wheel).
    RuntimeError with pip's last lines when it fails."""
    req = dest / "requirements.txt"
    req.write_text(f"{requirement} " + " ".join(f"--hash=sha256:{h}" for h in hashes) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary, ":all:", "--require-hashes",
           "-r", str(req), "-d", str(dest), "--disable-pip-version-check", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    found = sorted(dest.glob(pattern))
    if not found:
        raise RuntimeError(f"pip reported success but no {requirement} file ({pattern}) is in {dest}")
    return found[0]
