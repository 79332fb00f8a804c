"""Run folders and resumed configs: a run folder belongs to one run, and a resume says what it changed.

- ``check_run_folder``: a fresh run whose folder already holds checkpoints is refused (never overwrite another
  run's ``last.ckpt``); leftovers of killed saves are removed when the folder is ours.
- ``config_changes``: compare the config a checkpoint was trained under with the new one. Architecture and data
  (``REFUSED``) may not change on resume: their weights or data position would be meaningless. Everything else
  (learning rate, batch size, ``max_steps``, schedules, EMA decay...) is applied and recorded in the run's history,
  which every checkpoint keeps (``history_with``).

Plain dicts only (the resolved config as ``OmegaConf.to_container`` gives it): no Hydra here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("ldm.train")

# Keys (and everything under them) that a resume may not change: what the weights are, what data they see.
REFUSED = (
    "stage_name", "autoencoder", "unet", "text_encoder", "loss", "data.dataset", "latent_data.path", "resolution",
    "latent_norm", "cache_dir", "autoencoder_ckpt", "autoencoder_preset", "autoencoder_latent_scale",
    "module._target_", "module.optimizer._target_", "module.disc_optimizer._target_", "module.ema_decay",
)
# Keys under these are how or where the run is launched, not what it trains; neither refused nor recorded.
NOT_RECORDED = ("resume", "ckpt_path", "paths", "hydra", "logger", "callbacks", "run_name", "unet.pretrained",
                "unet_pretrained", "trainer.enable_progress_bar", "trainer.default_root_dir")


def flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf value) pairs of nested dicts; lists are leaves."""
    if isinstance(tree, Mapping) and tree:
        for key, value in tree.items():
            yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, tree


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[dict[str, list], dict[str, list]]:
    """``(refused, applied)``: ``{dotted key: [old value, new value]}`` of the keys that differ (a missing key is
    ``"<absent>"``), split by ``REFUSED``; keys under ``NOT_RECORDED`` are left out."""
    a, b = dict(flatten(old)), dict(flatten(new))
    refused, applied = {}, {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va == vb or _under(key, NOT_RECORDED):
            continue
        (refused if _under(key, REFUSED) else applied)[key] = [va, vb]
    return refused, applied


def history_with(stored: Mapping[str, Any] | None, config: dict[str, Any], step: int) -> list[dict[str, Any]]:
    """The run's history after resuming at ``step`` with ``config``: the stored list (a checkpoint written before
    histories existed starts one from its own config) plus an entry when the config changed."""
    stored = dict(stored or {})
    history = list(stored.get("history") or [{"step": 0, "config": stored.get("config", config),
                                              "time": None}])
    _, applied = config_changes(history[-1]["config"], config)
    if applied:
        history.append({"step": int(step), "config": config, "changes": applied,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return history


def describe(changes: Mapping[str, list]) -> str:
    return "\n".join(f"  {k}: {json.dumps(v[0], default=str)} -> {json.dumps(v[1], default=str)}"
                     for k, v in changes.items())


def refuse_changes(refused: Mapping[str, list], ckpt_path: str) -> None:
    if refused:
        raise ValueError(
            f"resuming from {ckpt_path} with a different architecture or data is not possible; these keys differ "
            f"from the config it was trained under (stored in the checkpoint):\n{describe(refused)}\n"
            "Set them back to the stored values, or start a new run (a new run_name) that initialises from this "
            "checkpoint's weights instead of resuming it.")


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []


class RunFolderTaken(ValueError):
    """The run folder holds another run's checkpoints: nothing may be written there."""


def check_run_folder(run_dir: Path, resume_from: str | None) -> None:
    """Refuse to start a fresh run in a folder that holds another run's checkpoints; ``resume_from`` from another
    folder is refused as well when this one holds checkpoints (it would mix two runs)."""
    ckpt_dir = run_dir / "checkpoints"
    existing = checkpoint_files(ckpt_dir)
    if not existing:
        return
    if resume_from is not None and Path(resume_from).resolve().parent == ckpt_dir.resolve():
        return
    names = ", ".join(p.name for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
    if resume_from is None:
        raise RunFolderTaken(f"the run folder {run_dir} already holds checkpoints ({names}) of an earlier run, and this "
                         "command would start a new run there and overwrite them. Continue that run with "
                         "resume=auto (same run_name), or start a new one with another run_name=...")
    raise RunFolderTaken(f"ckpt_path={resume_from} is not in this run's folder, and {run_dir} already holds checkpoints "
                     f"({names}) of another run. Resume that run with resume=auto, or give a new run_name=...")


def last_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of the run folder (every file there has finite weights: others are never written)."""
    files = checkpoint_files(run_dir / "checkpoints")
    return max(files, key=lambda p: p.stat().st_mtime) if files else None
