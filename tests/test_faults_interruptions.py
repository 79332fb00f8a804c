"""Fault tests: runs that go wrong or are stopped mid-way, on real ``train.py`` runs (CPU, tiny models).

- bad steps: NaN injected into gradients is skipped, counted and never applied; a diverging run stops non-zero,
  names the last good checkpoint, and writes no non-finite weights or statistics;
- signals: SIGTERM / SIGINT / SIGUSR1 to a running ``train.py`` save at the current step and exit 128 + signal
  (SIGTERM under DDP too);
- SIGKILL mid-epoch, shuffled data, then ``resume=auto``: per-step losses and every weight (model, EMA,
  discriminator, optimizer moments) bit-for-bit those of an uninterrupted run, for both stages.

(Resumed configs and run folders: tests/test_faults_resume.py; crafted checkpoints against the other entry
points: tests/test_faults_checkpoints.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from faults_fixtures import ROOT, STAGE1, STAGE2, assert_same_state, losses, run_train
from helpers import compose_train
from stage2_fixtures import make_stage1_checkpoint

import train
from ldm.checkpoint import load_torch_file


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


class RecordUNet(InjectNaN):
    """InjectNaN that records the U-Net's and the EMA's own weights (not the module's state_dict, which would make
    the module catch its EMA up) before the first step and after every step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.ema0 = {k: v.clone() for k, v in pl_module.unet_ema.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = {k: v.clone() for k, v in pl_module.unet.state_dict().items()}


def test_device_decided_ema_follows_exactly_the_applied_updates(tmp_path, monkeypatch):
    """With the guard's decision on the device (fused AdamW), the EMA update of a step waits for that decision
    (``_ema_catch_up``: in the next step, before its optimizer moves the weights). The checkpoint's EMA is still
    exactly ``lerp(EMA, weights after s, 1 - decay(s))`` over the applied steps s in order, the skipped steps 2 and
    3 (NaN gradients) left out."""
    from ldm.models.ema import ema_decay_at

    s1 = make_stage1_checkpoint(tmp_path / "s1" / "last.ckpt")
    probe = RecordUNet({2, 3})
    real_trainer = pl.Trainer
    monkeypatch.setattr(pl, "Trainer", lambda *a, callbacks=(), **k: real_trainer(*a, callbacks=[*callbacks, probe], **k))
    cfg = compose_train(STAGE2 + [f"autoencoder.pretrained={s1}", "trainer.max_steps=6", "+module.optimizer.fused=true",
                                  f"paths.latent_cache_root={tmp_path / 'cache'}"], output_dir=tmp_path / "run")
    train.train(cfg)
    expected = probe.ema0
    for step in range(6):
        if step not in (2, 3):
            weight = 1.0 - ema_decay_at(step, 0.9)
            expected = {k: torch.lerp(v, probe.after[step][k], weight) if v.is_floating_point() else probe.after[step][k]
                        for k, v in expected.items()}
    final = load_torch_file(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    assert not torch.equal(final["unet_ema.out.2.weight"], probe.ema0["out.2.weight"])
    for key, value in expected.items():
        torch.testing.assert_close(final["unet_ema." + key], value, rtol=0, atol=0, msg=key)


def test_a_bad_last_step_is_counted_in_what_the_run_returns(tmp_path, monkeypatch):
    """Fused AdamW (the guard decides on the device and reads the decision a step late): a NaN gradient in the last
    step is still counted in the metrics train() returns (what a sweep records), as in the checkpoint."""
    s1 = make_stage1_checkpoint(tmp_path / "s1" / "last.ckpt")
    probe = InjectNaN({5})
    real_trainer = pl.Trainer
    monkeypatch.setattr(pl, "Trainer", lambda *a, callbacks=(), **k: real_trainer(*a, callbacks=[*callbacks, probe], **k))
    cfg = compose_train(STAGE2 + [f"autoencoder.pretrained={s1}", "trainer.max_steps=6", "+module.optimizer.fused=true",
                                  f"paths.latent_cache_root={tmp_path / 'cache'}"], output_dir=tmp_path / "run")
    metrics = train.train(cfg)
    assert metrics["train/skipped_steps"] == 1.0
    assert load_torch_file(tmp_path / "run" / "checkpoints" / "last.ckpt")["ldm"]["guard"]["total"] == 1


@pytest.mark.slow
def test_deferred_ema_is_the_same_on_every_ddp_rank_after_a_rank_0_only_reader(tmp_path):
    """2 gloo processes, fused AdamW (the EMA waits for the guard's decision): the sample grid, which only rank 0
    draws, reads the EMA at the last step, before the other rank has applied that step's update. The ranks must
    still agree (the consistency check reads what a checkpoint reads) and the run must end well."""
    s1 = make_stage1_checkpoint(tmp_path / "s1" / "last.ckpt")
    args = ["debug=ddp_cpu", *[a for a in STAGE2 if not a.startswith(("trainer.accelerator", "callbacks.sample_grid"))],
            f"autoencoder.pretrained={s1}", f"paths.latent_cache_root={tmp_path / 'cache'}", "+module.optimizer.fused=true",
            "trainer.max_steps=4", "trainer.val_check_interval=3", "trainer.check_val_every_n_epoch=null",
            "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.steps=2",
            "callbacks.sample_grid.images_per_prompt=1"]
    proc = run_train(args, tmp_path / "run", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sums = json.loads((tmp_path / "run" / "rank_checksums.json").read_text())
    assert len(sums) == 2 and sums[0] == sums[1]


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
    if sig != signal.SIGUSR1:  # the folder was given by hand (hydra.run.dir): the hint names it, not a run_name
        assert f"continue with the same command and hydra.run.dir={run} resume=auto" in err, err[-2000:]
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


def test_stage2_validation_inside_an_accumulation_window_keeps_its_gradients(tmp_path):
    """Two batches per optimizer step and validation after every batch (inside every window) train exactly as
    no validation does (Lightning's automatic optimisation zeroes the gradients before validating only between
    windows; stage 1's manual one needed its own rule, tests/test_train_stage1.py)."""
    s1 = make_stage1_checkpoint(tmp_path / "s1" / "last.ckpt")
    common = STAGE2 + [f"autoencoder.pretrained={s1}", "trainer.max_steps=2", "trainer.accumulate_grad_batches=2",
                       "trainer.num_sanity_val_steps=0", f"paths.latent_cache_root={tmp_path / 'cache'}"]
    train.train(compose_train(common + ["trainer.limit_val_batches=0"], output_dir=tmp_path / "quiet"))
    train.train(compose_train(common + ["trainer.val_check_interval=1", "trainer.check_val_every_n_epoch=null"],
                              output_dir=tmp_path / "checked"))
    a = load_torch_file(tmp_path / "quiet" / "checkpoints" / "last.ckpt")
    b = load_torch_file(tmp_path / "checked" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 2
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)


SIGNAL_AT = '''
import os, signal
import pytorch_lightning as pl


class SignalAt(pl.Callback):  # SIGTERM to this process once, at the end of the batch that reaches `step`
    def __init__(self, step):
        self.step, self.sent = step, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
'''


def test_sigterm_before_an_epochs_last_batch_resumes_inside_that_epoch(tmp_path):
    """3 batches per epoch, validation every 2 steps; SIGTERM after step 2 stops before batch 2, the epoch's last,
    which Lightning already knows to be the last. The resumed run trains it in epoch 0 and counts epochs as an uninterrupted run does,
    instead of closing epoch 0 early and running that batch as a one-batch epoch 1."""
    (tmp_path / "signal_at.py").write_text(SIGNAL_AT)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # validation after step 2 too: a resume skips repeating it, and then found the stale "last batch" flag
    args = STAGE1 + ["module.lr_scheduler.T_max=50", "+data.shuffle=false", "trainer.val_check_interval=2",
                     "trainer.check_val_every_n_epoch=null"]
    run, ref = tmp_path / "stopped", tmp_path / "straight"
    stopped = run_train(args + ["trainer.max_steps=100", "+callbacks.signal_at._target_=signal_at.SignalAt",
                                "+callbacks.signal_at.step=2"], run, env)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert load_torch_file(run / "checkpoints" / "last.ckpt")["global_step"] == 2
    resumed = run_train(args + ["trainer.max_steps=5", "resume=auto"], run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_train(args + ["trainer.max_steps=5"], ref)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = load_torch_file(ref / "checkpoints" / "last.ckpt"), load_torch_file(run / "checkpoints" / "last.ckpt")
    assert a["epoch"] == b["epoch"], (a["epoch"], b["epoch"])
    assert a["loops"]["fit_loop"]["epoch_progress"] == b["loops"]["fit_loop"]["epoch_progress"]
    assert_same_state(a, b)
