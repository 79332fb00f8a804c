"""Pretrained parts in ldm's pipeline: a diffusers or Stable Diffusion autoencoder for the cache and stage 2, a
pretrained U-Net to fine-tune, exports that other tools read back; on the CPU with random weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import accumulation_length
from interop_fixtures import (
    ROOT,
    TINY_VAE,
    _quiet,
    _samples,
    assert_close,
    diffusers_vae,
    read_any_spec,
    unet_output,
    vae_outputs,
)
from safetensors.torch import load_file, save_file

from ldm.checkpoint import build_latent_diffusion, load_checkpoint
from ldm.export import (
    export,
    load_autoencoder,
    load_latent_diffusion,
    load_unet,
    read_any,
    write_diffusers_unet,
)
from ldm.pipeline import generate

# ------------------------------------------------------------------- pretrained parts in the pipeline

def test_stage2_on_a_diffusers_vae_and_a_pretrained_unet(tmp_path):
    """README "Use the Stable Diffusion VAE for stage 2": autoencoder.pretrained=<diffusers folder> caches its latents
    (statistics measured on the data, the scale from its config), trains, and the checkpoint samples on its own;
    unet.pretrained=<export> starts the U-Net from those weights."""
    from helpers import compose_train
    from test_train_stage2 import TINY_LDM

    import train
    from ldm.data.latents import LatentMemoryDataset
    from ldm.data.shapes import ShapesDataset

    vae = diffusers_vae(TINY_VAE)
    vae.save_pretrained(tmp_path / "vae")
    run = tmp_path / "run"
    cfg = compose_train(TINY_LDM + [f"autoencoder.pretrained={tmp_path}/vae", f"cache_dir={run}/cache", "trainer.max_steps=4",
                                    "latent_stats_images=16"], output_dir=run)
    train.train(cfg)
    manifest = json.loads((run / "cache" / "manifest.json").read_text())
    stats = manifest["latent_stats"]
    assert stats["scale"] == 0.3 and stats["shift"] == 0.0 and stats["n_images"] == 16 and len(stats["std"]) == 4
    assert manifest["latent_shape"] == [4, 16, 16]
    # the cached posterior means are diffusers' own encoding of the images
    sample = next(iter(LatentMemoryDataset(run / "cache", "train")))
    image = ShapesDataset("train", size=32, val_size=8, resolution=32)[0]["image"]
    with torch.no_grad():
        expected = vae.encode(image[None]).latent_dist.mean[0]
    # float16 storage: a relative rounding of 2**-11 dominates any float32 difference
    assert (torch.as_tensor(sample["mean"]).float() - expected).abs().max() <= 2e-3 * max(1.0, expected.abs().max())

    ckpt = run / "checkpoints" / "last.ckpt"
    stage2 = load_checkpoint(ckpt)
    assert stage2["ldm"]["latent_stats"]["scale"] == 0.3
    model = load_latent_diffusion(ckpt)
    assert torch.equal(model.autoencoder.decoder.conv_in.weight, vae.decoder.conv_in.weight)
    assert _samples(model).shape == (2, 3, 32, 32)

    # fine-tuning: a second run starts from the first run's U-Net (exported), and a mismatching preset is named
    export(ckpt, "diffusers", tmp_path / "export")
    cfg2 = compose_train(TINY_LDM + [f"autoencoder.pretrained={tmp_path}/vae", f"cache_dir={run}/cache",
                                     f"unet.pretrained={tmp_path}/export"], output_dir=tmp_path / "run2")
    module, _ = train.build_ldm_stage(cfg2, {})
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in module.unet.state_dict().items())
    cfg3 = compose_train(TINY_LDM + [f"autoencoder.pretrained={tmp_path}/vae", f"cache_dir={run}/cache",
                                     f"unet.pretrained={tmp_path}/export", "unet=small"], output_dir=tmp_path / "run3")
    with pytest.raises(ValueError, match="unet.pretrained=.* does not fit the architecture"):
        train.build_ldm_stage(cfg3, {})


def test_cache_and_evaluate_take_a_pretrained_autoencoder(tmp_path):
    vae = diffusers_vae(TINY_VAE)
    vae.save_pretrained(tmp_path / "vae")
    proc = subprocess.run([sys.executable, "-m", "ldm.cache", f"autoencoder.pretrained={tmp_path}/vae", f"out_dir={tmp_path}/cache",
                           "data.dataset.size=8", "data.dataset.val_size=4", "data.num_workers=0", "device=cpu",
                           "latent_stats_images=8", "progress=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["latent_stats"]["scale"] == 0.3 and manifest["splits"]["train"]["num_samples"] == 8
    assert manifest["autoencoder"]["config"]["ch_mult"] == [1, 2]

    proc = subprocess.run([sys.executable, "evaluate.py", f"ckpt={tmp_path}/vae", "n_samples=4", "batch_size=4",
                           "lpips_net=null", "num_workers=0", "progress=false", "data.dataset.val_size=4",
                           f"out_dir={tmp_path}/eval", f"results_csv={tmp_path}/r.csv", f"stats_dir={tmp_path}/s",
                           "device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["task"] == "recon" and results["n_images"] == 4 and results["data"]["resolution"] == 32
    assert 0 < results["metrics"]["psnr"]["mean"] < 60


def test_train_and_cache_read_the_same_pretrained_sources(tmp_path):
    """`autoencoder.pretrained=` / `unet.pretrained=` (train.py stage=ldm) and `autoencoder.pretrained=` (ldm.cache)
    read the same autoencoder and U-Net."""
    from helpers import CONFIG_DIR, compose_train, resolved
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from test_train_stage2 import TINY_LDM

    import train
    from ldm.cache import run
    from ldm.checkpoint import architecture, instantiate

    vae = diffusers_vae(TINY_VAE)
    vae.save_pretrained(tmp_path / "vae")
    base = TINY_LDM + [f"cache_dir={tmp_path}/cache", "latent_stats_images=8", "data.dataset.size=8"]
    torch.manual_seed(0)
    unet = instantiate(architecture(resolved(compose_train(base))["unet"]))  # the tiny U-Net of the run, nonzero
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    write_diffusers_unet(tmp_path / "unet", unet.state_dict(), read_any_spec(unet), sample_size=16)

    modules = []
    for _ in range(2):
        cfg = compose_train(base + [f"autoencoder.pretrained={tmp_path}/vae", f"unet.pretrained={tmp_path}/unet"],
                            output_dir=tmp_path)
        train.check_config(cfg)
        modules.append(train.build_ldm_stage(cfg, {})[0])  # the first one builds the cache, the second reuses it
    for module in modules:
        assert all(torch.equal(v, unet.state_dict()[k]) for k, v in module.unet.state_dict().items())
        assert torch.equal(module.autoencoder.decoder.conv_in.weight, vae.decoder.conv_in.weight)
        assert module.meta["autoencoder"]["ckpt_path"] == f"{tmp_path}/vae"

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("cache", overrides=[f"autoencoder.pretrained={tmp_path}/vae", f"out_dir={tmp_path}/cache2",
                                          "data.dataset.size=4", "data.dataset.val_size=2", "data.num_workers=0",
                                          "device=cpu", "latent_stats_images=4", "progress=false"])
    manifest = run(cfg)
    first = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["autoencoder"]["identity"] == first["autoencoder"]["identity"]
    assert manifest["autoencoder"]["ckpt_path"] == str((tmp_path / "vae").resolve())
    assert manifest["latent_stats"]["scale"] == 0.3 and manifest["splits"]["train"]["num_samples"] == 4


def test_an_sd_style_single_file_serves_as_autoencoder_and_as_unet(stage2_ema, tmp_path):
    """One file with first_stage_model.* and model.diffusion_model.* (like SD's): a stage-1 source on its own (the
    autoencoder's shapes name it), a U-Net source once a preset gives the heads."""
    export(stage2_ema, "compvis", tmp_path / "ours.safetensors")
    save_file(load_file(str(tmp_path / "ours.safetensors")), str(tmp_path / "sd.safetensors"))  # no ldm metadata
    ckpt = read_any(tmp_path / "sd.safetensors")
    assert ckpt["ldm"]["stage"] == "autoencoder" and ckpt["ldm"]["latent_stats"] is None
    reference = build_latent_diffusion(stage2_ema)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    for a, b in zip(vae_outputs(load_autoencoder(tmp_path / "sd.safetensors"), x, True),
                    vae_outputs(reference.autoencoder, x, True), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not record its attention heads"):
        load_unet(tmp_path / "sd.safetensors")
    spec = load_checkpoint(stage2_ema)["ldm"]["config"]["unet"]
    unet = load_unet(tmp_path / "sd.safetensors", preset=spec)
    assert all(torch.equal(v, reference.unet.state_dict()[k]) for k, v in unet.state_dict().items())


def test_diffusers_converter_reloads_our_compvis_unet_export(stage2_ema, tmp_path):
    """Our CompVis single-file export of a cross-attention U-Net (linear projections, scale-shift ResBlocks), read
    by diffusers' own converter into a UNet2DConditionModel: a strict load, equal outputs."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from ldm.interop.configs import unet_diffusers_config

    ours = build_latent_diffusion(stage2_ema).unet  # the EMA weights, which the export takes
    export(stage2_ema, "compvis", tmp_path / "m.safetensors")
    flat = load_file(str(tmp_path / "m.safetensors"))
    assert any(k.startswith("first_stage_model.") for k in flat)  # the whole model: the converter picks the U-Net
    theirs = _quiet(UNet2DConditionModel.from_config, unet_diffusers_config(ours, sample_size=8)).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(flat, dict(theirs.config)), strict=True)
    config = {"cross_attention_dim": ours.context_dim}
    expected = unet_output(ours, config, ours=True)
    assert expected.abs().max() > 1e-2  # not the zero output of zero-initialised layers
    assert_close(unet_output(theirs, config, ours=False), expected, theirs)


def test_sampling_a_foreign_release_says_what_it_holds(stage2_ema, tmp_path):
    """An SD single file or a diffusers pipeline folder (autoencoder + U-Net, no text encoder ldm rebuilds) given to
    sample.py: the error names what the source holds and where its parts can be used."""
    export(stage2_ema, "compvis", tmp_path / "ours.safetensors")
    save_file(load_file(str(tmp_path / "ours.safetensors")), str(tmp_path / "sd.safetensors"))  # no ldm metadata
    pipe = export(stage2_ema, "diffusers", tmp_path / "pipe")
    (pipe / "ldm.json").unlink()  # now a diffusers pipeline folder like any other
    for source, kind in ((tmp_path / "sd.safetensors", "a CompVis / Stable Diffusion file"),
                         (pipe, "a diffusers model or pipeline folder")):
        with pytest.raises(ValueError) as err:
            load_latent_diffusion(source)  # what sample.py calls
        message = str(err.value)
        assert f"{source} is {kind} that holds an autoencoder and a U-Net but no text encoder" in message
        assert "sample.py needs a stage-2 checkpoint of ours (train.py stage=ldm) or its export" in message
        assert f"autoencoder.pretrained={source} unet.pretrained={source}" in message
        assert "is a 'autoencoder' checkpoint" not in message


def test_exported_pipeline_samples_what_ldm_samples(stage1_ckpt, tmp_path):
    """A stage-2 model with a frozen CLIP text encoder (a tiny random one), exported to diffusers: diffusers' own
    StableDiffusionPipeline, from prompts, gives the images ldm's ddim sampler gives (same noise, same DDIM steps,
    the latent shift folded into the exported VAE, the tokenizer padding to ldm's length)."""
    from diffusers import DiffusionPipeline
    from stage2_fixtures import make_stage2_checkpoint
    from test_text_pretrained import _tiny_clip

    _tiny_clip(tmp_path / "clip")
    ckpt = make_stage2_checkpoint(tmp_path / "s2.ckpt", stage1_ckpt, overrides=[
        "text_encoder=hf", f"text_encoder.name_or_path={tmp_path}/clip", "text_encoder.context_dim=32",
        "text_encoder.max_length=16"])
    model = build_latent_diffusion(ckpt)
    assert abs(model.latent_stats["shift"]) > 1e-3  # so that the fold is exercised
    prompts = ["a red circle", "red"]
    ours = generate(model, prompts, sampler="ddim", steps=4, cfg_scale=2.5, generator=torch.Generator().manual_seed(0))
    out = export(ckpt, "diffusers", tmp_path / "pipe")
    assert (out / "ldm_autoencoder.safetensors").is_file() and (out / "text_encoder" / "config.json").is_file()
    pipe = _quiet(DiffusionPipeline.from_pretrained, out, safety_checker=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt=prompts, num_inference_steps=4, guidance_scale=2.5, height=32, width=32, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    # text encoder, then 4 guided U-Net steps (each feeding the next), then the decoder
    n = accumulation_length(model.text_encoder, model.autoencoder) + 4 * accumulation_length(model.unet)
    assert_close(theirs, ((ours + 1) / 2).clamp(0, 1), accumulation=n)
    assert torch.equal(_samples(load_latent_diffusion(out)), _samples(model))  # and ldm reads it back exactly


@pytest.mark.parametrize("norm", ["scale", "channel"])
def test_folded_autoencoder_encodes_normalised_latents_and_decodes_the_same(stage1_ckpt, norm):
    from ldm.export import fold_latent_norm
    from ldm.models.latent_stats import normalize_latents

    ckpt = load_checkpoint(stage1_ckpt)
    model = load_autoencoder(stage1_ckpt)
    stats = ckpt["ldm"]["latent_stats"]
    folded_state, scaling = fold_latent_norm(model.state_dict(), stats, norm)
    folded = load_autoencoder(stage1_ckpt)
    folded.load_state_dict(folded_state)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post, post_f = model.encode(x), folded.encode(x)
        expected = normalize_latents(post.mean, stats, norm)
        # the encoders differ in their last 1x1 conv only (its folded weights round differently)
        assert_close(post_f.mean * scaling, expected, model.quant_conv)
        if norm == "channel":  # the variance is normalised too
            std = torch.tensor(stats["std"])[None, :, None, None]
            assert_close(post_f.std, post.std / std, model.quant_conv)
        z = torch.randn(2, 4, 8, 8)
        assert_close(folded.decode(z / scaling), model.decode(
            z / scaling * (torch.tensor(stats["std"])[None, :, None, None] if norm == "channel" else 1)
            + (torch.tensor(stats["mean"])[None, :, None, None] if norm == "channel" else stats["shift"])),
            model.post_quant_conv, model.decoder)
