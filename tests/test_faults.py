"""Fault tests: what a days-long run on a shared cluster meets, on real ``train.py`` runs (CPU, tiny models).

- bad steps: NaN injected into gradients is skipped, counted and never applied; a diverging run stops non-zero,
  names the last good checkpoint, and writes no non-finite weights or statistics;
- signals: SIGTERM / SIGINT / SIGUSR1 to a running ``train.py`` save at the current step and exit 128 + signal;
- SIGKILL mid-epoch, shuffled data, then ``resume=auto``: per-step losses and every weight (model, EMA,
  discriminator, optimizer moments) bit-for-bit those of an uninterrupted run, for both stages;
- resumed configs: architecture / data changes refused before any work, optimisation changes applied + recorded;
- run folders: a fresh run never overwrites another run's checkpoints; killed saves' leftovers are removed;
- ``train.py ckpt_path=`` never runs code from a pickle.

(Crafted checkpoints against the other entry points: tests/test_faults_checkpoints.py.)
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import TINY_RUN, compose_train
from stage2_fixtures import make_stage1_checkpoint

import train
from ldm.checkpoint import load_torch_file

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


def start_train(args: list[str], run_dir: Path, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended ({proc.returncode}) before {path} appeared:\n"
                                 + proc.stderr.read()[-3000:])
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


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


def all_finite(path: Path) -> bool:
    ckpt = load_torch_file(path)
    return all(bool(v.isfinite().all()) for v in ckpt["state_dict"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------ bad steps

class InjectNaN(pl.Callback):
    """Test probe: NaN into one gradient at the given steps (before the module's guard sees it); records the
    weights before and after each step."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.before, self.after = steps, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step in self.steps and optimizer is trainer.optimizers[0]:
            next(p for p in optimizer.param_groups[0]["params"] if p.grad is not None).grad[0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = {k: v.clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.parametrize("fused", [False, True], ids=["host-decision", "device-decision"])
def test_nan_gradients_are_skipped_counted_and_never_applied(tmp_path, monkeypatch, fused):
    """Stage 2 (automatic optimisation, EMA): steps 2 and 3 get a NaN gradient; the U-Net, its EMA and the
    optimizer do not move on them, the run goes on and ends well, and the checkpoint counts 2 skipped steps.
    With a fused AdamW (the default on CUDA) the decision stays on the device (tests/test_step_guard.py)."""
    s1 = make_stage1_checkpoint(tmp_path / "s1" / "last.ckpt")
    probe = InjectNaN({2, 3})
    real_trainer = pl.Trainer

    def trainer_with_probe(*args, callbacks=(), **kwargs):
        return real_trainer(*args, callbacks=[*callbacks, probe], **kwargs)

    monkeypatch.setattr(pl, "Trainer", trainer_with_probe)
    cfg = compose_train(STAGE2 + [f"autoencoder.pretrained={s1}", "trainer.max_steps=6",
                                  f"paths.latent_cache_root={tmp_path / 'cache'}"]
                        + (["+module.optimizer.fused=true"] if fused else []), output_dir=tmp_path / "run")
    metrics = train.train(cfg)
    for step in (2, 3):
        for k, v in probe.before[step].items():
            assert torch.equal(v, probe.after[step][k]), f"step {step} changed {k}"
    moved = [k for k, v in probe.before[4].items() if not torch.equal(v, probe.after[4][k])]
    assert any(k.startswith("unet.") for k in moved) and any(k.startswith("unet_ema.") for k in moved)
    ckpt = load_torch_file(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["ldm"]["guard"] == {"total": 2, "in_a_row": 0}
    assert metrics["train/skipped_steps"] == 2.0


@pytest.mark.parametrize("stage", ["autoencoder", "ldm"])
def test_diverging_run_stops_nonzero_and_writes_nothing_non_finite(tmp_path, stage):
    """A learning rate of 1e30: every step after the first is non-finite. The run stops after 3 skipped steps
    in a row with a non-zero exit naming the step and the last good checkpoint; every file it wrote holds
    finite weights, no NaN is "best", and no NaN latent statistics exist."""
    run = tmp_path / "run"
    if stage == "autoencoder":
        args = STAGE1 + ["module.base_learning_rate=1e30", "module.scale_lr=false", "trainer.max_steps=40",
                         "trainer.val_check_interval=1", "trainer.check_val_every_n_epoch=null"]
    else:
        s1 = make_stage1_checkpoint(tmp_path / "s1" / "last.ckpt")
        args = STAGE2 + [f"autoencoder.pretrained={s1}", f"paths.latent_cache_root={tmp_path / 'cache'}",
                         "module.base_learning_rate=1e30", "module.lr_scheduler=null", "module.gradient_clip_val=null",
                         "trainer.max_steps=40", "trainer.val_check_interval=1", "trainer.check_val_every_n_epoch=null"]
    proc = run_train(args + ["module.max_consecutive_skips=3"], run)
    assert proc.returncode != 0, proc.stdout[-2000:]
    err = proc.stderr + proc.stdout
    assert "3 steps in a row" in err and "last good checkpoint is" in err and "resume=auto" in err, err[-3000:]
    files = sorted((run / "checkpoints").glob("*.ckpt"))
    assert files, "the run should have saved before it diverged"
    for path in files:
        assert all_finite(path), path
        ckpt = load_torch_file(path)
        stats = ckpt["ldm"].get("latent_stats")
        assert stats is None or all(torch.isfinite(torch.tensor(stats["mean"]))), path
        for state in ckpt["callbacks"].values():
            score = state.get("best_model_score")
            assert score is None or bool(torch.isfinite(torch.as_tensor(score))), (path, score)


# ------------------------------------------------------------------------------------------------- signals

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_saves_at_the_current_step_and_exits_128_plus_signal(tmp_path, sig):
    """SIGTERM / SIGINT: save last.ckpt at the current step (data position included), exit 128 + signal; the run
    then continues with resume=auto. SIGUSR1 on SLURM (SLURM_JOB_ID set; a stand-in `scontrol` on PATH records
    its arguments) also requeues the job."""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    env = {}
    if sig == signal.SIGUSR1:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
        (bin_dir / "scontrol").chmod(0o755)
        env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = start_train(STAGE1 + ["trainer.max_steps=100000", "trainer.val_check_interval=2",
                                 "trainer.check_val_every_n_epoch=null"], run, env)
    wait_for(last, proc)
    saved_at = load_torch_file(last)["global_step"]  # the validation save at step 2
    time.sleep(1.0)  # let it train on past that save
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    err += out  # Hydra's job log goes to stdout
    ckpt = load_torch_file(last)
    assert ckpt["global_step"] > saved_at, "the signal did not save the current step"
    assert f"{signal.Signals(sig).name} received" in err and "resume=auto" in err
    assert not list(last.parent.glob(".*.tmp"))
    position = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    # every sample the training steps used (3 batches of 4 per pass; at a pass's end the position may read as the
    # end of that pass or the start of the next)
    assert position["epoch"] * 12 + position["consumed"] == ckpt["global_step"] * 4, position
    if sig == signal.SIGUSR1:
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
        assert "requeued" in err
    if sig == signal.SIGTERM:  # and the run continues from there
        done = run_train(STAGE1 + [f"trainer.max_steps={ckpt['global_step'] + 2}", "trainer.val_check_interval=2",
                                   "trainer.check_val_every_n_epoch=null", "resume=auto"], run)
        assert done.returncode == 0, done.stderr[-3000:]
        assert load_torch_file(last)["global_step"] == ckpt["global_step"] + 2


# ---------------------------------------------------------------------------------------- SIGKILL + resume

def _kill_and_resume(tmp_path: Path, args: list[str], loss_key: str, extra_steps: int = 4) -> None:
    """Start a long run that saves every 2 steps; SIGKILL it once a save exists; resume to K + extra_steps; compare
    with one uninterrupted run of K + extra_steps steps (K: the step of the checkpoint the kill left)."""
    run, ref = tmp_path / "killed", tmp_path / "straight"
    saves = ["trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null"]
    proc = start_train(args + saves + ["trainer.max_steps=100000"], run)
    wait_for(run / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    k = load_torch_file(run / "checkpoints" / "last.ckpt")["global_step"]
    if k % 3 == 0:  # make sure the cut is mid-epoch (3 batches per epoch)
        pytest.skip(f"the kill left a checkpoint at an epoch boundary (step {k})")
    total = k + extra_steps
    resumed = run_train(args + saves + [f"trainer.max_steps={total}", "resume=auto"], run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_train(args + saves + [f"trainer.max_steps={total}"], ref)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert losses(run, loss_key)[-extra_steps:] == losses(ref, loss_key)[-extra_steps:]
    assert_same_state(load_torch_file(run / "checkpoints" / "last.ckpt"),
                      load_torch_file(ref / "checkpoints" / "last.ckpt"))
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert len(list((run / "checkpoints").glob("best-*.ckpt"))) == 1


def test_sigkill_mid_epoch_then_resume_is_exact_stage1(tmp_path):
    # a cosine of fixed length: the quickstart's follows trainer.max_steps, which differs between the runs here
    _kill_and_resume(tmp_path, STAGE1 + ["module.lr_scheduler.T_max=50"], "train/rec_loss")


def test_sigkill_mid_epoch_then_resume_is_exact_stage2(tmp_path):
    s1 = make_stage1_checkpoint(tmp_path / "s1" / "last.ckpt")
    # 20 cached latents, batch 4: 5 batches per epoch; drop to 12 for 3 per epoch
    _kill_and_resume(tmp_path, STAGE2 + [f"autoencoder.pretrained={s1}", "data.dataset.size=12",
                                         f"paths.latent_cache_root={tmp_path / 'cache'}"], "train/loss")


# ---------------------------------------------------------------------------------- configs and run folders

def _train(args: list[str], run_dir: Path) -> dict:
    return train.train(compose_train(args, output_dir=run_dir))


def test_resume_refuses_architecture_change_and_records_optimisation_changes(tmp_path, caplog):
    run = tmp_path / "run"
    # the quickstart recipe decays the lr on a cosine with T_max = trainer.max_steps, base lr 3e-3, no lr scaling
    _train(STAGE1 + ["trainer.max_steps=3"], run)
    before = (run / "checkpoints" / "last.ckpt").read_bytes()

    with pytest.raises(ValueError, match="different architecture or data") as refused:
        _train(STAGE1 + ["trainer.max_steps=6", "resume=auto", "autoencoder.ch=16", "data.dataset.size=24"], run)
    assert "autoencoder.ch: 32 -> 16" in str(refused.value) and "data.dataset.size: 12 -> 24" in str(refused.value)
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before  # refused before any work

    with caplog.at_level("WARNING", logger="ldm.train"):
        _train(STAGE1 + ["module.base_learning_rate=2e-3", "trainer.max_steps=6", "batch_size=3", "resume=auto"], run)
    assert "module.base_learning_rate: 0.003 -> 0.002" in caplog.text and "trainer.max_steps: 3 -> 6" in caplog.text
    ckpt = load_torch_file(run / "checkpoints" / "last.ckpt")
    history = ckpt["ldm"]["history"]
    assert [h["step"] for h in history] == [0, 3]
    assert history[1]["changes"]["module.base_learning_rate"] == [3e-3, 2e-3]
    assert history[1]["changes"]["batch_size"] == [4, 3]
    assert history[0]["config"]["module"]["base_learning_rate"] == 3e-3
    assert ckpt["ldm"]["config"]["module"]["base_learning_rate"] == 2e-3
    assert ckpt["lr_schedulers"][0]["T_max"] == 6  # the schedule follows the resumed max_steps ...
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([torch.zeros(1)], lr=2e-3), T_max=6)
    lrs = []
    for _ in range(6):
        sched.optimizer.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(lrs[-1], abs=1e-12)  # ... new lr
    logged = [float(r["lr-Adam"]) for path in sorted((run / "csv").glob("version_*/metrics.csv"))
              for r in csv.DictReader(open(path)) if r.get("lr-Adam")]
    assert logged[-3:] == pytest.approx(lrs[2:5], rel=1e-6)  # the lr at steps 3, 4, 5 of the new schedule


def test_fresh_run_never_overwrites_another_runs_checkpoints(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    _train(STAGE1 + ["trainer.max_steps=1"], run)
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(ValueError, match="resume=auto.*run_name"):
        _train(STAGE1 + ["trainer.max_steps=2"], run)
    _train(STAGE1 + ["trainer.max_steps=1"], other)
    with pytest.raises(ValueError, match="not in this run's folder"):
        _train(STAGE1 + ["trainer.max_steps=2", f"ckpt_path={other / 'checkpoints' / 'last.ckpt'}"], run)
    assert last.read_bytes() == before


def test_leftovers_of_killed_saves_are_removed_on_resume(tmp_path):
    run = tmp_path / "run"
    _train(STAGE1 + ["trainer.max_steps=1"], run)
    stale = run / "checkpoints" / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    orphan = run / "checkpoints" / "best-0000999.ckpt"  # a best file written after the state it resumes from
    orphan.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    _train(STAGE1 + ["trainer.max_steps=2", "resume=auto"], run)
    assert not stale.exists() and not orphan.exists()
    assert load_torch_file(run / "checkpoints" / "last.ckpt")["global_step"] == 2


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_from_a_pickle_payload_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "ldm": {"config": {}}, "x": _Payload(str(marker))}, evil)
    proc = run_train(STAGE1 + ["trainer.max_steps=2", f"ckpt_path={evil}"], tmp_path / "run")
    assert proc.returncode != 0
    assert not marker.exists()
    assert "evil.ckpt" in proc.stderr and "never runs code from a checkpoint" in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------ checks before any work

def test_class_model_on_unlabelled_data_is_refused_before_the_cache(tmp_path):
    s1 = make_stage1_checkpoint(tmp_path / "s1" / "last.ckpt")
    cache_root = tmp_path / "cache"
    with pytest.raises(ValueError, match="text_encoder=class conditions on class labels.*carry none"):
        _train(STAGE2[:3] + ["text_encoder=class", f"autoencoder.pretrained={s1}",
                             f"paths.latent_cache_root={cache_root}"] + STAGE2[6:], tmp_path / "run")
    assert not cache_root.exists()  # nothing was encoded


def test_validation_interval_longer_than_the_data_is_a_clear_error(tmp_path):
    # 12 images, batch 4: 3 batches per epoch, validation asked every 5
    with pytest.raises(ValueError, match=r"val_check_interval=5 steps is longer than one epoch .*3 batches"):
        _train(STAGE1 + ["trainer.val_check_interval=5", "trainer.max_steps=10"], tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_trainer_gradient_clip_names_the_module_key(tmp_path):
    with pytest.raises(ValueError, match="module.gradient_clip_val=0.5"):
        _train(STAGE1 + ["+trainer.gradient_clip_val=0.5"], tmp_path / "run")


@pytest.mark.slow
def test_sigterm_under_ddp_saves_once_and_every_rank_exits(tmp_path):
    """2 gloo processes on the CPU: SIGTERM to the launching process (rank 0; the other rank never sees it) stops
    both at the same step; last.ckpt holds that step and both ranks' data positions agree."""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    proc = start_train(["debug=ddp_cpu", *STAGE1, "data.dataset.size=16", "trainer.max_steps=100000",
                        "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null"], run)
    wait_for(last, proc)
    saved_at = load_torch_file(last)["global_step"]
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    ckpt = load_torch_file(last)
    assert ckpt["global_step"] > saved_at
    # 16 images over 2 ranks, batch 4: 2 batches (8 samples) per rank and pass; every step used 4 samples per rank
    position = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert position["epoch"] * 8 + position["consumed"] == ckpt["global_step"] * 4
    time.sleep(1.0)
    leftover = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes of the run still alive: {leftover}"


# ------------------------------------------------------------------ continuing finished, moved or damaged runs

@pytest.mark.parametrize("first", [3, 4])  # 3 batches per epoch: stop at an epoch's end, and one step into the next
def test_continuing_a_finished_run_equals_one_longer_run(tmp_path, first):
    """Train, then resume=auto with a larger max_steps (how a run is usually extended): the same samples, losses
    and weights as one run of the total length, although Lightning closes its epoch when a run stops on max_steps."""
    args = STAGE1 + ["module.lr_scheduler.T_max=50"]
    _train(args + [f"trainer.max_steps={first}"], tmp_path / "extended")
    _train(args + ["trainer.max_steps=7", "resume=auto"], tmp_path / "extended")
    _train(args + ["trainer.max_steps=7"], tmp_path / "straight")
    assert losses(tmp_path / "extended", "train/rec_loss") == losses(tmp_path / "straight", "train/rec_loss")
    assert_same_state(load_torch_file(tmp_path / "extended" / "checkpoints" / "last.ckpt"),
                      load_torch_file(tmp_path / "straight" / "checkpoints" / "last.ckpt"))


def test_a_larger_batch_size_on_resume_continues_the_epoch_where_it_stopped(tmp_path):
    """12 images: 2 steps of batch 2 use 4 of epoch 0; resumed with batch 4, two more steps use the other 8 (Lightning
    alone would count the resumed epoch in batches of the old size and end it early)."""
    run = tmp_path / "run"
    _train(STAGE1 + ["batch_size=2", "trainer.max_steps=2"], run)
    assert load_torch_file(run / "checkpoints" / "last.ckpt")["loops"]["fit_loop"]["state_dict"][
        "combined_loader"][0] == {"epoch": 0, "consumed": 4, "batch_size": 2}
    _train(STAGE1 + ["batch_size=4", "trainer.max_steps=4", "resume=auto"], run)
    assert load_torch_file(run / "checkpoints" / "last.ckpt")["loops"]["fit_loop"]["state_dict"][
        "combined_loader"][0] == {"epoch": 0, "consumed": 12, "batch_size": 4}


def test_a_copied_run_folder_keeps_its_files_and_leaves_the_original_alone(tmp_path):
    import shutil

    original, copy = tmp_path / "original", tmp_path / "copy"
    _train(STAGE1 + ["trainer.max_steps=3"], original)  # validation at the epoch's end: best-0000003.ckpt
    shutil.copytree(original, copy)
    before = {p.name: p.read_bytes() for p in (original / "checkpoints").iterdir()}
    _train(STAGE1 + ["trainer.max_steps=4", "resume=auto"], copy)
    assert {p.name: p.read_bytes() for p in (original / "checkpoints").iterdir()} == before
    assert (copy / "checkpoints" / "best-0000003.ckpt").is_file()
    assert not list((copy / "checkpoints").glob("last-v*.ckpt"))


def test_a_damaged_last_checkpoint_is_named_with_the_alternatives(tmp_path):
    run = tmp_path / "run"
    _train(STAGE1 + ["trainer.max_steps=3"], run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"last.ckpt cannot be read .* damaged.*best-0000003.ckpt"):
        _train(STAGE1 + ["trainer.max_steps=6", "resume=auto"], run)
