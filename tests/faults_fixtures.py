"""Shared by the fault tests (test_faults_interruptions.py, test_faults_resume.py): the tiny stage-1 and
stage-2 runs, ``train.py`` in a subprocess, and comparisons of logged losses and checkpoint states."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
# tiny stage 1 on 12 shuffled `shapes` images, 3 batches per epoch: cuts at steps that are not multiples of 3
# fall mid-epoch. The PatchGAN starts at step 2, so the discriminator and its optimizer are under test too.
STAGE1 = TINY_RUN + ["data.dataset.size=12", "loss.disc_start=2", "trainer.deterministic=true",
                     "module.ema_decay=0.9", "callbacks.throughput=null"]
STAGE2 = ["stage=ldm", "resolution=32", "batch_size=4", "text_encoder.width=32", "text_encoder.depth=1",
          "text_encoder.heads=2", "latent_data.num_workers=0", "latent_stats_images=8", "data.dataset.size=20",
          "data.dataset.val_size=8", "data.num_workers=0", "trainer.accelerator=cpu", "trainer.limit_val_batches=1",
          "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "trainer.deterministic=true",
          "callbacks.sample_grid=null", "callbacks.throughput=null", "module.ema_decay=0.9",
          "module.lr_scheduler.total_iters=6"]


def run_train(args: list[str], run_dir: Path, env: dict | None = None, timeout: float = 600):
    cmd = [sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def losses(run_dir: Path, key: str) -> list[float]:
    """Per-step training losses in the order they were logged (all CSV versions: a resume adds one)."""
    out = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            out += [float(r[key]) for r in csv.DictReader(f) if r.get(key)]
    return out


def assert_same_state(a: dict, b: dict) -> None:
    """Bit-for-bit equal weights (every tensor of the state dict) and optimizer states."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert oa["state"].keys() == ob["state"].keys()
        for i in oa["state"]:
            for name, va in oa["state"][i].items():
                vb = ob["state"][i][name]
                assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, (i, name)
        assert [g["lr"] for g in oa["param_groups"]] == [g["lr"] for g in ob["param_groups"]]
