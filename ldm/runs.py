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
import pickle
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ldm.checkpoint import MOVED_TARGETS, load_torch_file

log = logging.getLogger("ldm.train")

# Keys (and everything under them) that a resume may not change: what the weights are, what data they see.
REFUSED = (
    "stage_name", "autoencoder", "unet", "text_encoder", "loss", "data.dataset", "latent_data.path", "resolution",
    "latent_norm", "cache_dir", "autoencoder_preset", "autoencoder_latent_scale",
    "module._target_", "module.optimizer._target_", "module.disc_optimizer._target_", "module.ema_decay",
)
# Keys under these are how or where the run is launched, not what it trains; neither refused nor recorded.
NOT_RECORDED = ("resume", "ckpt_path", "paths", "hydra", "logger", "callbacks", "run_name", "unet.pretrained",
                "trainer.enable_progress_bar", "trainer.default_root_dir")


def flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf value) pairs of nested dicts; lists are leaves."""
    if isinstance(tree, Mapping) and tree:
        for key, value in tree.items():
            yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, tree


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


# Keys removed from the configs, and the key that took their place: a config stored by an older ldm (in a
# checkpoint or a run's history) is read with its values moved to the new keys.
RENAMED = {"autoencoder_ckpt": "autoencoder.pretrained", "unet_pretrained": "unet.pretrained"}
# Keys added to the configs later, with the value that gives an older run's behaviour: a config stored before them
# reads as having had that value, so a resume reports only what really changes.
ADDED = {"module.channels_last": False, "ddp_find_unused_parameters": True}


def upgraded(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened stored config with ``RENAMED`` keys under their new names (an old key's value wins over the
    new key's placeholder: older configs held ``???`` or null there when the old spelling was used),
    ``MOVED_TARGETS`` under their new names and ``ADDED`` keys at their older behaviour."""
    flat = {k: MOVED_TARGETS.get(v, v) if k.endswith("_target_") and isinstance(v, str) else v
            for k, v in flat.items()}
    for old, new in RENAMED.items():
        value = flat.pop(old, None)
        if value is not None and flat.get(new) in (None, "???"):
            flat[new] = value
    if "stage_name" in flat:  # a train.py config
        for key, value in ADDED.items():
            flat.setdefault(key, value)
    return flat


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[dict[str, list], dict[str, list]]:
    """``(refused, applied)``: ``{dotted key: [old value, new value]}`` of the keys that differ (a missing key is
    ``"<absent>"``), split by ``REFUSED``; keys under ``NOT_RECORDED`` are left out. Configs stored by an older
    ldm are read with their renamed keys moved (``upgraded``)."""
    a, b = upgraded(dict(flatten(old))), upgraded(dict(flatten(new)))
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


# ------------------------------------------------------------------------------------------- resuming

def resume_path(cfg: Any, run_dir: Path, sweep_job: bool = False) -> tuple[str | None, bool]:
    """(the checkpoint to continue from, whether it is this run folder's own): ``ckpt_path``, or with
    ``resume=auto`` the folder's ``last.ckpt`` (its newest checkpoint when a kill came between two saves). A sweep
    job resumes its own folder by default, before ``ckpt_path``: a job folder holding a checkpoint is a requeued
    attempt of the job, and ``ckpt_path`` was where its first attempt started. ``sweep_job``: this run is a job
    of a multirun (``ldm.sweeps.in_sweep``)."""
    sweep_job = sweep_job and cfg.resume is None  # a job of a multirun that names no resume
    if cfg.ckpt_path is not None and not sweep_job:
        return str(cfg.ckpt_path), Path(cfg.ckpt_path).resolve().parent == (run_dir / "checkpoints").resolve()
    if cfg.resume == "auto" or sweep_job:
        own = run_dir / "checkpoints" / "last.ckpt"
        own = own if own.is_file() else last_good_checkpoint(run_dir)
        if own is not None:
            log.info("resume=auto: continuing from %s", own)
            return str(own), True
        if cfg.ckpt_path is None:
            log.info("resume=auto: no checkpoint in %s yet, starting a new run", run_dir / "checkpoints")
    return (str(cfg.ckpt_path), False) if cfg.ckpt_path is not None else (None, False)


def resumed_history(ckpt_path: str | None, config: dict, same_run: bool = False) -> list[dict]:
    """The configs this run was trained under, ending with ``config``. On resume, a changed architecture or data
    is refused (naming the keys); changed optimisation settings are applied, logged and recorded. ``same_run``
    (a sweep job finding a checkpoint in its folder): any change is refused, the folder holds another run."""
    if ckpt_path is None:
        return [{"step": 0, "config": config, "time": None}]
    stored = read_resume_checkpoint(Path(ckpt_path))
    meta = stored.get("ldm") or {}
    if "config" not in meta:
        raise ValueError(f"{ckpt_path} is not a checkpoint of an ldm training run (no stored config): resume only "
                         "continues runs of train.py; start from other weights with autoencoder.pretrained / "
                         "unet.pretrained")
    refused, applied = config_changes(meta["config"], config)
    if same_run and (refused or applied):
        raise RunFolderTaken(f"this sweep job's folder holds a checkpoint of another run ({ckpt_path}; it differs in "
                         f"{', '.join(sorted({**refused, **applied}))}). A sweep job only resumes itself: start the "
                         "sweep in a new folder (hydra.sweep.dir=...), or give resume=auto to continue it anyway")
    refuse_changes(refused, ckpt_path)
    if applied:
        log.warning("resuming with changed settings (applied from step %d, recorded in the checkpoint's "
                    "history):\n%s", stored.get("global_step", 0), describe(applied))
    return history_with(meta, config, int(stored.get("global_step", 0)))


def read_resume_checkpoint(path: Path) -> dict:
    """The checkpoint to resume from, or a clear error when it is damaged (a copy or a save cut short)."""
    try:
        try:
            return load_torch_file(path, mmap=True)
        except RuntimeError:  # not the zip format mmap needs: read it whole (and fail below if it is broken)
            return load_torch_file(path)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        others = [p.name for p in sorted(path.parent.glob("*.ckpt")) if p != path]
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}): the file is "
                         "damaged, e.g. a copy cut short. Resume from another checkpoint of the run with ckpt_path="
                         f"{path.parent}/<name>{' (there: ' + ', '.join(others) + ')' if others else ''}") from err
