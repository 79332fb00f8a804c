"""Stage-1 training end to end on the CPU: a fast dev run, exact resume, 2-process DDP, checkpoint contents."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN, compose_train

import train
from ldm.checkpoint import build_autoencoder, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):  # a resumed run adds a version
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def _train_losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/rec_loss"]) for r in _metrics(run_dir) if r.get("train/rec_loss")}


def _run_cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_fast_dev_run(tmp_path):
    cfg = compose_train(TINY_RUN + ["debug=fdr", "loss.disc_start=0"], output_dir=tmp_path)
    metrics = train.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/rec_loss"]))
    assert "train/d_loss" in metrics and "train/d_weight" in metrics and "val/psnr" in metrics


def test_short_run_writes_checkpoints_grid_and_latent_stats(tmp_path):
    cfg = compose_train(TINY_RUN + ["trainer.max_steps=12", "loss.disc_start=3", "logger=many",
                                    "module.gradient_clip_val=0.5"],
                        output_dir=tmp_path)
    train.train(cfg)
    ckpts = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in ckpts} >= {"last.ckpt"} and any(p.name.startswith("best-") for p in ckpts)
    assert not list((tmp_path / "checkpoints").glob(".*.tmp")), "temporary checkpoint files left behind"
    for path in ckpts:
        ckpt = load_checkpoint(path)
        assert ckpt["ldm"]["stage"] == "autoencoder"
        assert ckpt["ldm"]["config"]["resolution"] == 32
        stats = ckpt["ldm"]["latent_stats"]
        assert stats["n_images"] == 8 and len(stats["mean"]) == 4 and stats["scale"] > 0
        model, stats2 = build_autoencoder(path)  # rebuilt from the checkpoint alone
        assert stats2 == stats
        z = model.encode(torch.zeros(1, 3, 32, 32)).mode()
        assert z.shape == (1, 4, 8, 8)
    grids = list((tmp_path / "images").glob("val_step*.png"))
    assert grids, "no reconstruction grid written"
    names = set(_metrics(tmp_path)[0].keys()) | {k for r in _metrics(tmp_path) for k, v in r.items() if v}
    for key in ["train/rec_loss", "train/kl", "train/g_loss", "train/d_loss", "train/d_weight",
                "train/logits_real", "train/logits_fake", "val/rec_loss", "val/psnr", "val/ssim", "val/lpips"]:
        assert key in names, key
    assert list((tmp_path / "tensorboard").glob("version_0/events.out.tfevents.*"))


def test_resume_reproduces_uninterrupted_run(tmp_path):
    """6 steps in one go == 3 steps, stop, resume from last.ckpt for 3 more (deterministic CPU): same losses,
    same weights, same optimizer state. The discriminator switches on at step 2, so both optimizers matter.
    Unshuffled data: Lightning replays a plain DataLoader from the start of the interrupted epoch's iterator,
    so only model, optimizer, step and noise state are under test here."""
    common = TINY_RUN + ["trainer.deterministic=true", "loss.disc_start=2", "data.dataset.size=12",
                         "batch_size=4", "+data.shuffle=false", "module.lr_scheduler.T_max=6"]
    full = tmp_path / "full"
    train.train(compose_train(common + ["trainer.max_steps=6"], output_dir=full))
    part = tmp_path / "part"
    train.train(compose_train(common + ["trainer.max_steps=3"], output_dir=part))
    train.train(compose_train(common + ["trainer.max_steps=6", "resume=auto"], output_dir=part))

    # compare in order: Lightning's logging step after a restart is offset by one (its own bookkeeping)
    a, b = list(_train_losses(full).values()), list(_train_losses(part).values())
    assert len(a) == len(b) == 6, (a, b)
    assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    sa = load_checkpoint(full / "checkpoints" / "last.ckpt")
    sb = load_checkpoint(part / "checkpoints" / "last.ckpt")
    assert sa["global_step"] == sb["global_step"] == 6  # generator updates (the discriminator's don't count)
    for oa, ob in zip(sa["optimizer_states"], sb["optimizer_states"], strict=True):
        for pa, pb in zip(oa["state"].values(), ob["state"].values(), strict=True):
            torch.testing.assert_close(pa["exp_avg"], pb["exp_avg"], rtol=1e-6, atol=1e-8)
    for k in sa["state_dict"]:
        torch.testing.assert_close(sa["state_dict"][k], sb["state_dict"][k], rtol=1e-6, atol=1e-7)


ACCUMULATE = TINY_RUN + ["trainer.deterministic=true", "loss.disc_start=0", "data.dataset.size=12", "batch_size=4",
                         "+data.shuffle=false", "module.accumulate_grad_batches=2", "trainer.num_sanity_val_steps=0",
                         "trainer.max_steps=-1", "trainer.max_epochs=2", "trainer.limit_val_batches=1",
                         "callbacks.throughput=null"]


def test_accumulation_windows_end_with_the_epoch(tmp_path):
    """3 batches per epoch, 2 per window: windows [0, 1] and [2] in each epoch, as Lightning's automatic
    optimisation does. A window across epochs counted batches twice over; one left open before the epoch's
    validation lost its gradients there (Lightning zeroes them before validating)."""
    train.train(compose_train(ACCUMULATE, output_dir=tmp_path))
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4  # generator steps: 2 windows x 2 epochs
    steps = [int(next(iter(o["state"].values()))["step"]) for o in ckpt["optimizer_states"]]
    assert steps == [4, 4]  # the discriminator steps with every window too


def test_validation_inside_a_window_keeps_its_gradients(tmp_path):
    """Validation after every batch (inside every window) trains exactly as no validation does."""
    quiet, checked = tmp_path / "quiet", tmp_path / "checked"
    train.train(compose_train(ACCUMULATE + ["trainer.max_epochs=1", "trainer.limit_val_batches=0"], output_dir=quiet))
    train.train(compose_train(ACCUMULATE + ["trainer.max_epochs=1", "trainer.val_check_interval=1"],
                              output_dir=checked))
    sa = load_checkpoint(quiet / "checkpoints" / "last.ckpt")
    sb = load_checkpoint(checked / "checkpoints" / "last.ckpt")
    assert sa["global_step"] == sb["global_step"] == 2
    for k in sa["state_dict"]:
        torch.testing.assert_close(sa["state_dict"][k], sb["state_dict"][k], rtol=0, atol=0)


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_parameters(tmp_path):
    _run_cli("debug=ddp_cpu", *TINY_RUN, "trainer.max_steps=8", "loss.disc_start=2", f"hydra.run.dir={tmp_path}")
    sums = json.loads((tmp_path / "rank_checksums.json").read_text())
    assert len(sums) == 2
    assert sums[0] == sums[1]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["ldm"]["latent_stats"]["n_images"] == 8


def test_bf16_mixed_on_cpu(tmp_path):
    cfg = compose_train(TINY_RUN + ["debug=fdr", "loss.disc_start=0", "trainer.precision=bf16-mixed"],
                        output_dir=tmp_path)
    metrics = train.train(cfg)
    assert torch.isfinite(torch.tensor([metrics["train/rec_loss"], metrics["train/d_loss"]])).all()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_precisions_on_gpu(tmp_path, precision):
    on_gpu = [o for o in TINY_RUN if not o.startswith("trainer.accelerator")]
    cfg = compose_train(on_gpu + ["trainer=gpu", "trainer.max_steps=6", "loss.disc_start=2",
                                    f"trainer.precision={precision}", "module.gradient_clip_val=1.0"],
                        output_dir=tmp_path)
    metrics = train.train(cfg)
    assert torch.isfinite(torch.tensor([metrics["train/rec_loss"], metrics["train/d_loss"]])).all()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_corrupt_images_are_skipped_and_logged(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    for i in range(10):
        Image.new("RGB", (40, 40), (20 * i, 100, 200)).save(root / f"img{i:02d}.png")
    from ldm.data.images import ImageFolderDataset

    for i in range(50):  # a broken file that the hash-based split puts into train
        broken = root / f"broken{i}.png"
        broken.write_bytes(b"\x89PNG not really an image")
        if broken.name in ImageFolderDataset(root, split="train", val_fraction=0.1).files:
            break
        broken.unlink()
    out = tmp_path / "run"
    no_shapes = [o for o in TINY_RUN if not o.startswith("data.dataset.size")]
    cfg = compose_train(no_shapes + ["data=folder", f"data.dataset.root={root}", "data.dataset.val_fraction=0.1",
                                    "data.dataset.max_bad_fraction=0.5", "+data.shuffle=false",
                                    "batch_size=2", "trainer.max_steps=5"], output_dir=out)
    train.train(cfg)
    skipped = [float(r["data/skipped"]) for r in _metrics(out) if r.get("data/skipped")]
    assert skipped and sum(skipped) >= 1


def test_wandb_offline_logger(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_train(TINY_RUN + ["logger=wandb", "trainer.max_steps=2"], output_dir=tmp_path)
    train.train(cfg)
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs, "no offline W&B run directory written"
    assert list(runs[0].rglob("*.wandb"))


@pytest.mark.slow
def test_multirun_sweep(tmp_path):
    _run_cli("-m", *TINY_RUN, "debug=fdr", "loss.kl_weight=1e-6,1e-5", f"hydra.sweep.dir={tmp_path}")
    cfgs = sorted(tmp_path.glob("*/.hydra/config.yaml"))
    assert len(cfgs) == 2
    assert "1.0e-05" in cfgs[1].read_text() or "1e-05" in cfgs[1].read_text()


def test_ema_weights_are_kept_and_used_by_the_checkpoint(tmp_path):
    cfg = compose_train(TINY_RUN + ["trainer.max_steps=4", "module.ema_decay=0.9"], output_dir=tmp_path)
    train.train(cfg)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    raw = {k[len("autoencoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("autoencoder.")}
    ema = {k[len("autoencoder_ema."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("autoencoder_ema.")}
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw), "EMA weights equal the raw weights"
    model, _ = build_autoencoder(ckpt)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ema[k])
