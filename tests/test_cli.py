"""The doors of the commands (ldm/cli.py): ``--help`` lists the command's own keys with a description each, a
missing required key or a bad input ends with one ``error:`` line instead of a traceback."""

from __future__ import annotations

import pytest
import yaml
from helpers import run_entry

from ldm.cli import CONFIG_DIR, help_text, read_entry_config

COMMANDS = {"train": "python train.py", "sample": "python sample.py", "evaluate": "python evaluate.py",
            "cache": "python -m ldm.cache", "export": "python -m ldm.export"}


def _own_keys(name: str) -> set[str]:
    """Top-level keys of the entry config, a mapping's keys as parent.key (the hydra block and defaults aside)."""
    tree = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    keys = set()
    for key, value in tree.items():
        if key in ("defaults", "hydra"):
            continue
        keys |= {f"{key}.{k}" for k in value} if isinstance(value, dict) else {key}
    return keys


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_key_and_group_of_a_command_is_listed_with_a_description(name):
    _, groups, keys = read_entry_config(name)
    assert {k.name for k in keys} == _own_keys(name)
    assert not [e.name for e in groups + keys if not e.doc], "every key and group needs a comment in its config"
    for group in groups:
        if group.name != "experiment":
            assert group.choices, group.name
    text = help_text(name, COMMANDS[name])
    assert all(f"  {k.name} " in text for k in keys)


def test_help_shows_the_commands_own_keys_only():
    proc = run_entry("sample.py", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "usage: python sample.py" in out and "ckpt" in out and "(required)" in out
    assert "sampler       default dpmpp_2m; one of: ddim, ddpm, dpmpp_2m" in out
    assert "use_ema       default true; one of: true, false" in out
    assert "logger" not in out and "trainer" not in out  # train.py's groups are not sample.py's
    train = help_text("train", COMMANDS["train"])
    assert "stage" in train and "one of: autoencoder, ldm" in train and "resume" in train


def test_missing_required_key_and_bad_input_end_in_one_error_line(tmp_path):
    proc = run_entry("-m", "ldm.export", "format=safetensors", f"out={tmp_path}/x.safetensors")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("error: missing required key ckpt: pass ckpt=<value> "
                                                    "(`python -m ldm.export --help` describes every key)")
    assert "Traceback" not in proc.stderr

    missing = tmp_path / "missing.ckpt"
    proc = run_entry("sample.py", f"ckpt={missing}", "prompts=a red circle", f"out_dir={tmp_path}/s")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: {missing} does not exist" in proc.stderr
    proc = run_entry("sample.py", f"ckpt={missing}", "prompts=a red circle", f"out_dir={tmp_path}/s",
                     LDM_TRACEBACK="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr  # asked for


def test_training_output_has_no_noise_a_user_cannot_act_on(tmp_path):
    """No Lightning advertising tips, no "module(s) in eval mode" warning (ldm's frozen parts are in eval mode on
    purpose), no scheduler-order warning from the discriminator's schedule before disc_start, no deprecation
    inside Lightning; the bar counts steps."""
    proc = run_entry("train.py", "trainer=cpu", "batch_size=2", "resolution=32", "data.dataset.size=8",
                     "data.num_workers=0", "trainer.max_steps=4", "trainer.limit_val_batches=1",
                     "trainer.val_check_interval=2", "latent_stats_images=4", "loss.perceptual.net=alex",
                     "loss.discriminator.ndf=8", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for noise in ("Tip:", "in eval mode at the start", "LeafSpec", "lr_scheduler.step()", "Epoch 0/-"):
        assert noise not in text, noise
    assert "4/4" in text.replace("\r", "\n")


def test_stage2_output_has_no_loader_advice_or_sweep_warning_outside_sweeps(stage1_ckpt, tmp_path):
    """Cached latents need no loader workers (Lightning's advice to add some is noise there), and a run outside a
    sweep without validation is not warned that a sweeper would get no objective."""
    from test_train_stage2 import TINY_LDM

    args = [o for o in TINY_LDM if not o.startswith(("trainer.limit_val_batches", "trainer.check_val_every_n_epoch"))]
    proc = run_entry("train.py", *args, f"autoencoder.pretrained={stage1_ckpt}", f"cache_dir={tmp_path}/cache",
                     "trainer.max_steps=2", "trainer.limit_val_batches=0", "callbacks.sample_grid=null",
                     f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for noise in ("does not have many workers", "gets no objective", "set_float32_matmul_precision"):
        assert noise not in text, noise
