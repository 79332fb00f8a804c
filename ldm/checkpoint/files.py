"""The only code in ldm that opens a weights file: pickles with ``torch.load(weights_only=True)``, always, and
safetensors files. Nothing in a file ever runs code (DESIGN.md, rules for long runs, 1).

``torch.load`` with ``weights_only=True`` unpickles tensors, plain containers and numbers only; any other global a
pickle names (``os.system``, ``builtins.open``, a class's ``__reduce__``) is refused by torch before it is called,
and that refusal is turned here into a ValueError naming the file.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ldm.atomic import atomic_write_stream

NO_CODE = "ldm never runs code from a checkpoint"
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _why(err: Exception) -> str:
    """The sentence of torch's refusal that names the object (its message goes on to suggest weights_only=False)."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error:\s*([^\n]*?\.)(\s|$)", text)
    return found.group(1) if found else (text.strip().splitlines() or ["unreadable pickle"])[0]


def load_torch_file(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors, plain containers and numbers only.

    A pickle that names anything else (code) is a ValueError naming the file. ``mmap``: map the tensors' storage
    instead of reading it (zip-format files only; torch raises RuntimeError for the legacy format).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # from None: torch's own message goes on to suggest weights_only=False, which ldm never does
        raise ValueError(f"{path} holds pickled objects other than tensors and plain containers ({_why(err)}); "
                         f"{NO_CODE}, so it was not loaded. Convert it to .safetensors where you trust it.") from None


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a ``.safetensors`` file (on the CPU) and its string metadata; a damaged file is a ValueError
    naming it."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    return tensors, metadata


def read_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors of a ``.safetensors`` / ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` file and its extra entries.

    A ``{"state_dict": ...}`` wrapper (CompVis, Lightning) is unwrapped and its other entries returned as extras
    (safetensors: the string metadata).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown weights file type {path.suffix!r}; use .safetensors, .ckpt, .pt, .pth or .bin")
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get("state_dict"), dict):
        extras = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    else:
        extras = {}
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    return tensors, extras


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside ``path`` then rename, so ``path`` is never half-written."""
    atomic_write_stream(path, lambda f: torch.save(obj, f), fsync=True)
