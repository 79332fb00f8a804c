"""Stage 2 end to end on the CPU: stage-1 checkpoint -> latent cache (built by train.py) -> U-Net training ->
sample.py, plus the errors a researcher meets on the way (wrong stage, missing autoencoder, cache mismatch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN, compose_train
from PIL import Image
from stage2_fixtures import make_stage1_checkpoint

import train
from ldm.checkpoint import build_autoencoder, build_latent_diffusion, load_checkpoint
from ldm.data.latent_format import autoencoder_identity
from ldm.pipeline import generate

ROOT = Path(__file__).resolve().parents[1]

# A stage-2 run small enough for 2 CPU cores: 32 px shapes -> 8x8x4 latents, tiny U-Net, small text transformer.
TINY_LDM = [
    "stage=ldm",
    "resolution=32",
    "batch_size=8",
    "data.num_workers=0",
    "data.dataset.size=32",
    "data.dataset.val_size=8",
    "latent_data.num_workers=0",
    "text_encoder.width=32",
    "text_encoder.depth=1",
    "text_encoder.heads=2",
    "trainer.accelerator=cpu",
    "trainer.limit_val_batches=1",
    "trainer.val_check_interval=null",
    "trainer.check_val_every_n_epoch=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.sample_grid.images_per_prompt=1",
    "callbacks.sample_grid.steps=3",
    "module.ema_decay=0.9",
]


@pytest.fixture(scope="module")
def stage2_run(stage1_ckpt, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stage2")
    cfg = compose_train(TINY_LDM + [f"autoencoder.pretrained={stage1_ckpt}", f"cache_dir={run_dir}/cache",
                                    "trainer.max_steps=12"], output_dir=run_dir)
    metrics = train.train(cfg)
    return run_dir, metrics


def test_stage2_trains_and_writes_a_self_contained_checkpoint(stage2_run, stage1_ckpt):
    run_dir, metrics = stage2_run
    assert (run_dir / "cache" / "manifest.json").is_file(), "train.py should build the missing cache"
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 12
    meta = ckpt["ldm"]
    assert meta["stage"] == "ldm" and meta["latent_shape"] == [4, 8, 8]
    s1 = load_checkpoint(stage1_ckpt)
    assert meta["latent_stats"] == s1["ldm"]["latent_stats"]
    assert any(k.startswith("unet_ema.") for k in ckpt["state_dict"])
    assert any(k.startswith("autoencoder.") for k in ckpt["state_dict"])
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    # the grid callback runs at the end of training with the fixed prompts
    grids = sorted((run_dir / "images").glob("samples_step*.png"))
    assert grids and Image.open(grids[-1]).size[0] > 32


def test_checkpoint_alone_rebuilds_the_model_and_sampling_is_deterministic(stage2_run):
    run_dir, _ = stage2_run
    model = build_latent_diffusion(run_dir / "checkpoints" / "last.ckpt")
    prompts = ["a large red circle in the center, on a black background"] * 2
    a = generate(model, prompts, sampler="ddim", steps=4, generator=torch.Generator().manual_seed(0))
    b = generate(model, prompts, sampler="ddim", steps=4, generator=torch.Generator().manual_seed(0))
    c = generate(model, prompts, sampler="ddim", steps=4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_sample_cli_writes_pngs_and_a_grid(stage2_run, sampler, tmp_path):
    run_dir, _ = stage2_run
    proc = subprocess.run(
        [sys.executable, "sample.py", f"ckpt={run_dir}/checkpoints/last.ckpt", "prompts=a small blue square",
         "n=3", "steps=4", f"sampler={sampler}", "cfg_scale=2", "seed=0", "device=cpu", f"out_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = sorted((tmp_path / "images").glob("*.png"))
    assert len(images) == 3 and Image.open(images[0]).size == (32, 32)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] > 3 * 32
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["sampler"] for r in records] == [sampler] * 3 and records[0]["steps"] == 4
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing["images"] == 3 and timing["images_per_s"] > 0 and timing["device"] == "cpu"


def test_sample_cli_refuses_a_stage1_checkpoint(stage1_ckpt, tmp_path):
    proc = subprocess.run(
        [sys.executable, "sample.py", f"ckpt={stage1_ckpt}", "prompts=x", "device=cpu", f"out_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "is a 'autoencoder' checkpoint; sampling needs a stage-2 checkpoint" in proc.stderr


def test_stage2_refuses_a_stage2_checkpoint_as_autoencoder(stage2_run, tmp_path):
    run_dir, _ = stage2_run
    cfg = compose_train(TINY_LDM + [f"autoencoder.pretrained={run_dir}/checkpoints/last.ckpt"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="is a 'ldm' checkpoint; stage 2 needs a stage-1"):
        train.train(cfg)


def test_stage2_refuses_a_cache_of_another_autoencoder(stage2_run, tmp_path):
    run_dir, _ = stage2_run
    other = make_stage1_checkpoint(tmp_path / "other.ckpt", resolution=32, seed=1)
    cfg = compose_train(TINY_LDM + [f"autoencoder.pretrained={other}", f"cache_dir={run_dir}/cache"],
                        output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="autoencoder"):
        train.train(cfg)


def test_stage2_refuses_a_cache_made_at_another_resolution(stage2_run, stage1_ckpt, tmp_path):
    run_dir, _ = stage2_run  # its cache holds 32 px images (8x8 latents)
    cfg = compose_train(TINY_LDM + ["resolution=64", f"autoencoder.pretrained={stage1_ckpt}", f"cache_dir={run_dir}/cache"],
                        output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"latent shape: cache \[4, 8, 8\] \(images of 32 px\) vs configured \[4, 16, 16\]"):
        train.train(cfg)
    cfg = compose_train(TINY_LDM + ["resolution=34", f"autoencoder.pretrained={stage1_ckpt}", f"cache_dir={run_dir}/cache"],
                        output_dir=tmp_path / "odd")
    with pytest.raises(ValueError, match="resolution=34 is not divisible by the autoencoder's downsampling factor 4"):
        train.train(cfg)  # 34 // 4 would pass as 8x8 latents of the 32 px cache


def test_stage2_resume_continues_the_step_count(stage2_run, stage1_ckpt, tmp_path):
    run_dir, _ = stage2_run
    cfg = compose_train(TINY_LDM + [f"autoencoder.pretrained={stage1_ckpt}", f"cache_dir={run_dir}/cache",
                                    "trainer.max_steps=16", f"ckpt_path={run_dir}/checkpoints/last.ckpt"],
                        output_dir=tmp_path)
    train.train(cfg)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 16


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_stage2_mixed_precision_on_gpu(stage1_ckpt, tmp_path, precision):
    on_gpu = [o for o in TINY_LDM if not o.startswith("trainer.accelerator")]
    cfg = compose_train(on_gpu + ["trainer=gpu", f"trainer.precision={precision}", "trainer.max_steps=6",
                                  f"autoencoder.pretrained={stage1_ckpt}", f"cache_dir={tmp_path}/cache",
                                  "module.compile=true"], output_dir=tmp_path)
    metrics = train.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    model = build_latent_diffusion(tmp_path / "checkpoints" / "last.ckpt").to("cuda")
    images = generate(model, ["a small blue square"] * 2, sampler="dpmpp_2m", steps=4,
                      generator=torch.Generator("cuda").manual_seed(0), autocast_dtype=torch.bfloat16)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_quickstart_chain_stage1_cache_stage2_sample(tmp_path):
    """README's quickstart in miniature: train.py stage 1 -> train.py stage=ldm (builds the cache) -> sample.py."""
    s1_dir, s2_dir, out = tmp_path / "s1", tmp_path / "s2", tmp_path / "samples"
    train.train(compose_train(TINY_RUN + ["trainer.max_steps=3"], output_dir=s1_dir))
    s1_ckpt = s1_dir / "checkpoints" / "last.ckpt"
    s1 = load_checkpoint(s1_ckpt)
    # README's spelling, and the default cache folder (under paths.latent_cache_root)
    train.train(compose_train(TINY_LDM + [f"autoencoder.pretrained={s1_ckpt}", f"paths.latent_cache_root={tmp_path}/caches",
                                          "trainer.max_steps=4"], output_dir=s2_dir))
    (cache,) = (tmp_path / "caches").iterdir()
    assert cache.name.startswith("shapes-32px-")  # <dataset>-<res>px-<autoencoder sha>-<data sha>
    manifest = json.loads((cache / "manifest.json").read_text())
    model, _ = build_autoencoder(s1_ckpt)
    assert manifest["autoencoder"]["identity"] == autoencoder_identity(model)
    assert manifest["latent_stats"]["scale"] == s1["ldm"]["latent_stats"]["scale"]
    assert load_checkpoint(s2_dir / "checkpoints" / "last.ckpt")["ldm"]["latent_stats"] == s1["ldm"]["latent_stats"]
    prompts = ["a large red circle in the center, on a black background", "a small blue square in the top left"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    proc = subprocess.run(
        [sys.executable, "sample.py", f"ckpt={s2_dir}/checkpoints/last.ckpt", f"prompts_file={tmp_path}/prompts.txt",
         "n=2", "steps=3", "sampler=dpmpp_2m", "seed=0", "device=cpu", f"out_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert len(list((out / "images").glob("*.png"))) == 4
    width, height = Image.open(out / "grid.png").size
    assert width >= 2 * 32 and height >= 2 * 32  # one row per prompt, one column per image
