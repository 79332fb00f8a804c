"""Export of ldm checkpoints (safetensors, diffusers, the CompVis layout) and their round trips, on the CPU with random
weights; the errors of import and export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from interop_fixtures import (
    ROOT,
    SD15_UNET,
    SMALL_UNET,
    TINY_VAE,
    _quiet,
    _samples,
    assert_close,
    diffusers_unet,
    diffusers_vae,
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
    preset_spec,
    read_any,
    write_diffusers_unet,
    write_diffusers_vae,
)

# ------------------------------------------------------------------------------- stage-2 round trips

@pytest.mark.parametrize("fmt,name", [("safetensors", "m.safetensors"), ("diffusers", "m"),
                                      ("compvis", "m.ckpt"), ("compvis", "m.safetensors")])
def test_stage2_round_trip_gives_identical_samples(stage2_ema, tmp_path, fmt, name):
    reference = _samples(build_latent_diffusion(stage2_ema))
    out = export(stage2_ema, fmt, tmp_path / name)
    assert torch.equal(_samples(load_latent_diffusion(out)), reference)
    raw = export(stage2_ema, fmt, tmp_path / f"raw_{name}", weights="raw")
    assert not torch.equal(_samples(load_latent_diffusion(raw)), reference)  # the EMA copy differs by 0.01
    assert torch.equal(_samples(load_latent_diffusion(raw)), _samples(build_latent_diffusion(stage2_ema, use_ema=False)))


def test_half_precision_export_is_half_the_size_and_close(stage2_ema, tmp_path):
    full = export(stage2_ema, "safetensors", tmp_path / "f32.safetensors")
    half = export(stage2_ema, "safetensors", tmp_path / "f16.safetensors", dtype="float16")
    assert half.stat().st_size < 0.55 * full.stat().st_size
    assert all(v.dtype == torch.float16 for v in load_file(str(half)).values() if v.is_floating_point())
    a, b = _samples(load_latent_diffusion(half)), _samples(load_latent_diffusion(full))
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.05
    assert json.loads(half.with_suffix(".json").read_text())["dtype"] == "float16"


def test_diffusers_export_loads_in_diffusers_and_its_pipeline_runs(stage2_ema, tmp_path):
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    out = export(stage2_ema, "diffusers", tmp_path / "pipe")
    model = load_latent_diffusion(out)
    vae = _quiet(AutoencoderKL.from_pretrained, out / "vae")
    assert vae.config.scaling_factor == pytest.approx(model.latent_stats["scale"])
    unet = _quiet(UNet2DConditionModel.from_pretrained, out / "unet").eval()
    config = {"cross_attention_dim": unet.config.cross_attention_dim, "in_channels": 4}
    assert_close(unet_output(unet, config, ours=False), unet_output(model.unet, config, ours=True), unet)
    pipe = _quiet(DiffusionPipeline.from_pretrained, out, text_encoder=None, tokenizer=None, safety_checker=None,
                  feature_extractor=None)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.prediction_type == "epsilon"
    assert torch.allclose(pipe.scheduler.alphas_cumprod.double(), model.alphas_cumprod, atol=1e-6)
    context, _ = model.text_encoder(["a red circle"])
    null, _ = model.text_encoder([""])
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt_embeds=context, negative_prompt_embeds=null, num_inference_steps=3, guidance_scale=2.0,
                 height=32, width=32, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_stage1_exports_read_back(stage1_ckpt, tmp_path):
    ckpt = load_checkpoint(stage1_ckpt)
    reference = load_autoencoder(stage1_ckpt)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    expected = vae_outputs(reference, x, ours=True)
    for fmt, name in (("safetensors", "ae.safetensors"), ("diffusers", "ae"), ("compvis", "ae.ckpt")):
        out = export(stage1_ckpt, fmt, tmp_path / name)
        back = read_any(out)
        assert back["ldm"]["latent_stats"] == ckpt["ldm"]["latent_stats"]
        for a, b in zip(vae_outputs(load_autoencoder(out), x, ours=True), expected, strict=True):
            assert torch.equal(a, b), fmt
    config = json.loads((tmp_path / "ae" / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(ckpt["ldm"]["latent_stats"]["scale"])


def test_export_cli(stage2_ckpt, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ldm.export", f"ckpt={stage2_ckpt}", "format=compvis",
                           f"out={tmp_path}/m.safetensors", "dtype=bfloat16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = load_file(str(tmp_path / "m.safetensors"))
    assert {k.split(".")[0] for k in keys} == {"first_stage_model", "model", "cond_stage_model"}
    assert all(v.dtype == torch.bfloat16 for v in keys.values() if v.is_floating_point())
    proc = subprocess.run([sys.executable, "-m", "ldm.export", f"ckpt={stage2_ckpt}", "format=onnx", "out=x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "format='onnx': use one of ['safetensors', 'diffusers', 'compvis']" in proc.stderr


# ------------------------------------------------------------------------------------------------ errors

class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(ValueError, match="ldm never runs code from a checkpoint"):
        load_autoencoder(path)


def test_clear_errors(stage1_ckpt, tmp_path):
    with pytest.raises(ValueError, match="neither an autoencoder .* nor a U-Net"):
        save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
        load_autoencoder(tmp_path / "x.safetensors")
    plain = tmp_path / "kl.ckpt"  # a CompVis file (no config of its own) of the tiny autoencoder
    torch.save({"state_dict": {k.removeprefix("autoencoder."): v for k, v in
                               load_checkpoint(stage1_ckpt)["state_dict"].items()}}, plain)
    assert isinstance(load_autoencoder(plain), torch.nn.Module)  # inferred from its shapes
    with pytest.raises(ValueError, match="does not fit the architecture: .*with other shapes"):
        load_autoencoder(plain, preset="kl_f8")
    with pytest.raises(ValueError, match="unknown autoencoder preset 'kl_f9'"):
        load_autoencoder(stage1_ckpt, preset="kl_f9")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_unet(tmp_path / "nothing.ckpt")
    with pytest.raises(ValueError, match="is not a diffusers model folder"):
        (tmp_path / "empty").mkdir()
        load_unet(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no U-Net"):
        load_unet(stage1_ckpt)
    with pytest.raises(ValueError, match="sampling needs a stage-2 checkpoint"):
        load_latent_diffusion(stage1_ckpt)
    with pytest.raises(ValueError, match="weights='best': use ema or raw"):
        export(stage1_ckpt, "safetensors", tmp_path / "a.safetensors", weights="best")


def test_what_diffusers_cannot_express_is_named(tmp_path):
    kl_f16 = preset_spec("autoencoder", "kl_f16")
    with pytest.raises(ValueError, match="attn_resolutions=\\[16\\]: diffusers' AutoencoderKL has attention only"):
        write_diffusers_vae(tmp_path / "x", {}, kl_f16)
    unconditional = {**preset_spec("unet", "tiny"), "context_dim": None}
    with pytest.raises(ValueError, match="unconditional U-Net \\(context_dim=None"):
        write_diffusers_unet(tmp_path / "y", {}, unconditional)
    with pytest.raises(ValueError, match="conv_resample=True"):
        write_diffusers_unet(tmp_path / "z", {}, {**preset_spec("unet", "tiny"), "conv_resample": False})
    from ldm.interop.configs import unet_kwargs_from_diffusers

    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        unet_kwargs_from_diffusers({**SD15_UNET, "addition_embed_type": "text_time"})



# ---------------------------------------------------------------------------- review findings, pinned

def test_unsupported_diffusers_settings_and_unexpressible_exports_are_named(tmp_path):
    from ldm.interop.configs import unet_kwargs_from_diffusers, vae_latent_scale

    with pytest.raises(ValueError, match="time_embedding_act_fn='silu'"):  # an extra SiLU ours does not have
        unet_kwargs_from_diffusers({**SMALL_UNET, "time_embedding_act_fn": "silu"})
    assert unet_kwargs_from_diffusers({**SMALL_UNET, "only_cross_attention": [False, False, False]})
    with pytest.raises(ValueError, match="cross_attention_dim=None"):
        unet_kwargs_from_diffusers({**SMALL_UNET, "cross_attention_dim": None})
    no_attention = {**preset_spec("unet", "tiny"), "context_dim": None, "attention_resolutions": []}
    with pytest.raises(ValueError, match="unconditional U-Net"):  # its middle block still has self-attention
        write_diffusers_unet(tmp_path / "u", {}, no_attention)
    # the first SD VAEs on the hub have no scaling_factor in config.json: diffusers' default applies
    assert vae_latent_scale({"_class_name": "AutoencoderKL"}) == {"scale": 0.18215, "shift": 0.0}


def test_a_diffusers_weights_file_without_its_folder_is_named(tmp_path):
    ref = diffusers_vae(TINY_VAE)
    ref.save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="diffusers' parameter names .* pass the folder"):
        load_autoencoder(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    unet = diffusers_unet({**SMALL_UNET, "num_class_embeds": None})
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="diffusers' parameter names .* pass the folder"):
        load_unet(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")


def test_inferred_unet_depth_of_a_middle_block_below_a_level_without_attention():
    from ldm.checkpoint import instantiate
    from ldm.interop.configs import infer_unet_kwargs

    spec = {**preset_spec("unet", "tiny"), "channel_mult": [1, 2, 2], "attention_resolutions": [1, 2],
            "transformer_depth": [2, 2, 3]}  # the last level has no attention: its 3 is the middle block's depth
    state = instantiate(dict(spec)).state_dict()
    inferred = infer_unet_kwargs(state)
    assert inferred["transformer_depth"] == [2, 2, 3]
    rebuilt = instantiate({**spec, **inferred})
    assert set(rebuilt.state_dict()) == set(state)


def test_export_refuses_foreign_releases_and_other_folders(stage1_ckpt, tmp_path):
    diffusers_vae(TINY_VAE).save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="not a checkpoint trained by ldm but a diffusers release"):
        export(tmp_path / "vae", "compvis", tmp_path / "x.ckpt")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not an earlier ldm export"):
        export(stage1_ckpt, "diffusers", tmp_path / "mine")
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
    out = export(stage1_ckpt, "diffusers", tmp_path / "again")
    (out / "stale.safetensors").write_bytes(b"old")
    export(stage1_ckpt, "diffusers", out)  # an earlier export is replaced as a whole
    assert not (out / "stale.safetensors").exists() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".again.*"))  # no temporary folders left


def test_custom_schedule_arguments_travel_as_betas():
    from diffusers import DDIMScheduler

    from ldm.diffusion.schedules import make_alphas_cumprod
    from ldm.export import scheduler_config

    loss = {"schedule": "cosine", "num_timesteps": 1000, "objective": "v", "schedule_kwargs": {"s": 0.02}}
    config = {k: v for k, v in scheduler_config(loss).items() if not k.startswith("_")}
    sched = DDIMScheduler(**config)
    ours = make_alphas_cumprod("cosine", 1000, s=0.02)
    assert (sched.alphas_cumprod.double() - ours).abs().max() < 1e-6 and config["prediction_type"] == "v_prediction"


def test_sd_single_file_gets_the_scale_it_is_told(tmp_path):
    ref = diffusers_vae(TINY_VAE)
    ref.save_pretrained(tmp_path / "vae")
    state = {k.removeprefix("autoencoder."): v for k, v in read_any(tmp_path / "vae")["state_dict"].items()}
    save_file({f"first_stage_model.{k}": v for k, v in state.items()}, str(tmp_path / "sd.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "ldm.cache", f"autoencoder.pretrained={tmp_path}/sd.safetensors",
                           f"out_dir={tmp_path}/cache", "data.dataset.size=4", "data.dataset.val_size=2",
                           "data.num_workers=0", "device=cpu", "latent_stats_images=4", "progress=false",
                           "autoencoder_latent_scale=0.25", "resolution=32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "cache" / "manifest.json").read_text())["latent_stats"]
    assert stats["scale"] == 0.25 and stats["shift"] == 0.0 and stats["n_images"] == 4
