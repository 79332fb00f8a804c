"""Fault tests: resuming, continuing and guarding runs, on real ``train.py`` runs (CPU, tiny models).

- resumed configs: architecture / data changes refused before any work, optimisation changes applied + recorded;
- run folders: a fresh run never overwrites another run's checkpoints; killed saves' leftovers are removed;
- ``train.py ckpt_path=`` never runs code from a pickle;
- configurations that cannot work are refused before any work;
- finished, copied or damaged runs: continuing equals one longer run, a larger batch on resume continues the
  epoch, a copied folder leaves the original alone, a damaged last.ckpt is named with the alternatives.

(Interrupted runs: tests/test_faults_interruptions.py; crafted checkpoints against the other entry points:
tests/test_faults_checkpoints.py.)
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from faults_fixtures import STAGE1, STAGE2, assert_same_state, losses, run_train
from helpers import compose_train
from stage2_fixtures import make_stage1_checkpoint

import train
from ldm.checkpoint import load_torch_file

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
