"""Checkpoint interop against the reference implementation (diffusers), on the CPU with random weights:
import from diffusers folders, CompVis / Stable Diffusion single files and standalone CompVis autoencoders;
export to safetensors, diffusers and the CompVis layout; round trips of a stage-2 checkpoint; the errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import accumulation_length, assert_float32_close
from safetensors.torch import load_file, save_file

from ldm.checkpoint import atomic_torch_save, build_latent_diffusion, load_checkpoint
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
from ldm.interop.keymaps import DEPRECATED_VAE_ATTN
from ldm.pipeline import generate

ROOT = Path(__file__).resolve().parents[1]
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
          "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
          "sample_size": 256, "scaling_factor": 0.18215}
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8, "layers_per_block": 2,
             "block_out_channels": (320, 640, 1280, 1280)}
# small, but with every feature the mapping must carry: 2 transformer blocks, linear projections, a class
# embedding, scale-shift ResBlocks, a level without attention, one head width (SD-2 style head counts per level)
SMALL_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64, 64),
              "layers_per_block": 1, "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 24,
              "attention_head_dim": (2, 4, 4), "transformer_layers_per_block": 2, "use_linear_projection": True,
              "num_class_embeds": 3, "resnet_time_scale_shift": "scale_shift"}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def diffusers_vae(config: dict, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**config).eval()
    with torch.no_grad():  # random norms and biases too: defaults (1, 0) would hide a swapped weight/bias
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def diffusers_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # zero-initialised output convs would make every output 0
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def vae_outputs(model, x: torch.Tensor, ours: bool):
    with torch.no_grad():
        if ours:
            post = model.encode(x)
            return post.mean, post.logvar, model.decode(post.mean)
        post = model.encode(x).latent_dist
        return post.mean, post.logvar, model.decode(post.mean).sample


def unet_output(model, config: dict, ours: bool, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = 8
    x = torch.randn(2, config.get("in_channels", 4), size, size, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 5, config["cross_attention_dim"], generator=g)
    y = torch.tensor([0, 2]) if config.get("num_class_embeds") else None
    with torch.no_grad():
        if ours:
            return model(x, t, context=ctx, y=y)
        return model(x, t, encoder_hidden_states=ctx, class_labels=y).sample


def assert_close(a: torch.Tensor, b: torch.Tensor, *modules: torch.nn.Module, accumulation: int = 0) -> None:
    """``a`` equals the reference ``b`` up to float32 rounding of a computation through ``modules`` (plus
    ``accumulation`` more multiply-adds): the tolerance grows with its size (``helpers.float32_tolerance``)."""
    assert_float32_close(a, b, accumulation_length(*modules) * bool(modules) + accumulation)


# ------------------------------------------------------------------------------------------- autoencoder

def test_sd_vae_from_diffusers_and_back(tmp_path):
    """diffusers AutoencoderKL (SD config) -> import -> equal encode/decode; ours -> export -> diffusers reloads ->
    equal; the SD VAE's scaling_factor travels both ways."""
    from diffusers import AutoencoderKL

    ref = diffusers_vae(SD_VAE)
    ref.save_pretrained(tmp_path / "sd-vae")
    ours = load_autoencoder(tmp_path / "sd-vae")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = vae_outputs(ref, x, ours=False)
    for a, b in zip(vae_outputs(ours, x, ours=True), expected, strict=True):
        assert_close(a, b, ref)
    ckpt = read_any(tmp_path / "sd-vae")
    assert ckpt["ldm"]["source_latent_scale"] == {"scale": 0.18215, "shift": 0.0}

    state = {k.removeprefix("autoencoder."): v for k, v in ckpt["state_dict"].items()}
    write_diffusers_vae(tmp_path / "back", state, ckpt["ldm"]["config"]["autoencoder"], {"scale": 0.18215, "shift": 0})
    again = _quiet(AutoencoderKL.from_pretrained, tmp_path / "back").eval()
    assert again.config.scaling_factor == pytest.approx(0.18215)
    for a, b in zip(vae_outputs(again, x, ours=False), expected, strict=True):
        assert_close(a, b, ref)


def test_vae_with_pre_0_14_attention_names(tmp_path):
    """The SD VAEs on the hub were saved with query/key/value/proj_attn: they read as the current names."""
    config = {**SD_VAE, "block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
              "up_block_types": ("UpDecoderBlock2D",) * 2}
    ref = diffusers_vae(config)
    ref.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    renamed = {}
    for k, v in load_file(str(weights)).items():
        for old, new in DEPRECATED_VAE_ATTN.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(weights))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    for a, b in zip(vae_outputs(load_autoencoder(tmp_path / "vae"), x, True), vae_outputs(ref, x, False), strict=True):
        assert_close(a, b, ref)


@pytest.mark.parametrize("layout", ["sd_single_file", "standalone"])
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_compvis_autoencoder_files(tmp_path, layout, suffix):
    """A CompVis file (an SD single file's first_stage_model.*, or a standalone kl-f* checkpoint with its loss.*
    weights) imports with the architecture inferred from its shapes; our compvis export is read by diffusers' own
    CompVis converter into a model with equal outputs."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = {**SD_VAE, "block_out_channels": (32, 64, 64), "down_block_types": ("DownEncoderBlock2D",) * 3,
              "up_block_types": ("UpDecoderBlock2D",) * 3}
    ref = diffusers_vae(config)
    ref.save_pretrained(tmp_path / "vae")
    state = {k.removeprefix("autoencoder."): v for k, v in read_any(tmp_path / "vae")["state_dict"].items()}
    if layout == "sd_single_file":
        flat = {f"first_stage_model.{k}": v for k, v in state.items()}
        flat["cond_stage_model.transformer.dummy"] = torch.zeros(1)  # other parts of an SD file are ignored
    else:
        flat = {**state, "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4)}
    path = tmp_path / f"model{suffix}"
    save_file(flat, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": flat, "global_step": 1}, path)
    ours = load_autoencoder(path)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    expected = vae_outputs(ref, x, ours=False)
    for a, b in zip(vae_outputs(ours, x, ours=True), expected, strict=True):
        assert_close(a, b, ref)

    # our compvis export of it, read by diffusers' converter
    ckpt = read_any(path)  # as a stage-1 checkpoint of ours (export refuses foreign releases)
    for key in ("source", "source_latent_scale"):
        ckpt["ldm"].pop(key)
    ckpt["ldm"]["latent_stats"] = {"scale": 0.5, "shift": 0.0, "mean": [0.0] * 4, "std": [2.0] * 4}
    atomic_torch_save(ckpt, tmp_path / "stage1.ckpt")
    export(tmp_path / "stage1.ckpt", "compvis", tmp_path / "exported.safetensors")
    exported = load_file(str(tmp_path / "exported.safetensors"))
    theirs = AutoencoderKL(**config).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in exported.items()},
                                                      dict(theirs.config)), strict=True)
    for a, b in zip(vae_outputs(theirs, x, ours=False), expected, strict=True):
        assert_close(a, b, ref)


# ------------------------------------------------------------------------------------------------- U-Net

@pytest.mark.slow
def test_sd15_unet_from_diffusers_and_back(tmp_path):
    """diffusers UNet2DConditionModel with the SD-1.5 config (859,520,964 parameters) -> import -> equal outputs;
    ours -> export -> diffusers reloads -> equal outputs. ~1.5 min and ~11 GB on 2 CPU cores."""
    from diffusers import UNet2DConditionModel

    ref = diffusers_unet(SD15_UNET)
    expected = unet_output(ref, SD15_UNET, ours=False)
    ref.save_pretrained(tmp_path / "unet")
    n = accumulation_length(ref)
    del ref
    ours = load_unet(tmp_path / "unet")
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    assert_close(unet_output(ours, SD15_UNET, ours=True), expected, accumulation=n)
    shutil.rmtree(tmp_path / "unet")
    spec = read_any_spec(ours)
    write_diffusers_unet(tmp_path / "back", ours.state_dict(), spec)
    del ours
    again = _quiet(UNet2DConditionModel.from_pretrained, tmp_path / "back").eval()
    assert_close(unet_output(again, SD15_UNET, ours=False), expected, accumulation=n)


def read_any_spec(unet) -> dict:
    """The ``_target_`` spec of a U-Net built by ldm (its constructor arguments)."""
    keys = ("in_channels", "out_channels", "model_channels", "num_res_blocks", "attention_resolutions",
            "channel_mult", "num_heads", "num_head_channels", "transformer_depth", "context_dim",
            "use_linear_in_transformer", "num_classes", "dropout", "use_scale_shift_norm", "conv_resample")
    return {"_target_": "ldm.models.unet.UNetModel", **{k: getattr(unet, k) for k in keys}}


def test_small_unet_with_every_feature_from_diffusers_and_back(tmp_path):
    from diffusers import UNet2DConditionModel

    ref = diffusers_unet(SMALL_UNET)
    ref.save_pretrained(tmp_path / "unet")
    expected = unet_output(ref, SMALL_UNET, ours=False)
    ours = load_unet(tmp_path / "unet")
    assert ours.num_classes == 3 and ours.use_linear_in_transformer and ours.num_head_channels == 16
    assert_close(unet_output(ours, SMALL_UNET, ours=True), expected, ref)
    write_diffusers_unet(tmp_path / "back", ours.state_dict(), read_any_spec(ours), sample_size=8)
    again = _quiet(UNet2DConditionModel.from_pretrained, tmp_path / "back").eval()
    assert_close(unet_output(again, SMALL_UNET, ours=False), expected, ref)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_compvis_unet_single_file_needs_and_takes_a_preset(tmp_path, suffix):
    """model.diffusion_model.* of an SD-style file: the architecture comes from a preset (CompVis files do not
    record heads); a preset whose shapes do not fit is an error naming the mismatches."""
    config = {**SMALL_UNET, "num_class_embeds": None}
    ref = diffusers_unet(config)
    ref.save_pretrained(tmp_path / "unet")
    ours = load_unet(tmp_path / "unet")
    flat = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    path = tmp_path / f"sd{suffix}"
    save_file(flat, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": flat}, path)
    with pytest.raises(ValueError, match="does not record its attention heads.*preset"):
        load_unet(path)
    spec = read_any_spec(ours)
    loaded = load_unet(path, preset=spec)
    assert_close(unet_output(loaded, config, ours=True), unet_output(ref, config, ours=False), ref)
    bare = tmp_path / f"bare{suffix}"  # a standalone CompVis U-Net state dict, no prefix
    save_file(ours.state_dict(), str(bare)) if suffix == ".safetensors" else torch.save(ours.state_dict(), bare)
    assert_close(unet_output(load_unet(bare, preset=spec), config, ours=True), unet_output(ref, config, ours=False),
                 ref)
    with pytest.raises(ValueError, match="does not fit the architecture: .*with other shapes, e.g. \\['time_embed.0.weight: \\(128, 32\\) in the file, \\(512, 128\\) in the model"):
        load_unet(path, preset="small")


# ------------------------------------------------------------------------------- stage-2 round trips

def _samples(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return generate(model, ["a red circle on the left", "a small blue square"], sampler="ddim", steps=3,
                    cfg_scale=2.0, generator=g)


@pytest.fixture(scope="module")
def stage2_ema(stage1_ckpt, tmp_path_factory) -> Path:
    from stage2_fixtures import make_stage2_checkpoint

    return make_stage2_checkpoint(tmp_path_factory.mktemp("s2ema") / "last.ckpt", stage1_ckpt, ema_offset=0.01)


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


# ------------------------------------------------------------------- pretrained parts in the pipeline

TINY_VAE = {**SD_VAE, "block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1, "sample_size": 32,
            "scaling_factor": 0.3}


def test_stage2_on_a_diffusers_vae_and_a_pretrained_unet(tmp_path):
    """README "Use the Stable Diffusion VAE for stage 2": autoencoder_ckpt=<diffusers folder> caches its latents
    (statistics measured on the data, the scale from its config), trains, and the checkpoint samples on its own;
    unet_pretrained=<export> starts the U-Net from those weights."""
    from helpers import compose_train
    from test_train_stage2 import TINY_LDM

    import train
    from ldm.data.latents import LatentMemoryDataset
    from ldm.data.shapes import ShapesDataset

    vae = diffusers_vae(TINY_VAE)
    vae.save_pretrained(tmp_path / "vae")
    run = tmp_path / "run"
    cfg = compose_train(TINY_LDM + [f"autoencoder_ckpt={tmp_path}/vae", f"cache_dir={run}/cache", "trainer.max_steps=4",
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
    cfg2 = compose_train(TINY_LDM + [f"autoencoder_ckpt={tmp_path}/vae", f"cache_dir={run}/cache",
                                     f"unet_pretrained={tmp_path}/export"], output_dir=tmp_path / "run2")
    module, _ = train.build_ldm_stage(cfg2, {})
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in module.unet.state_dict().items())
    cfg3 = compose_train(TINY_LDM + [f"autoencoder_ckpt={tmp_path}/vae", f"cache_dir={run}/cache",
                                     f"unet_pretrained={tmp_path}/export", "unet=small"], output_dir=tmp_path / "run3")
    with pytest.raises(ValueError, match="unet_pretrained=.* does not fit the architecture"):
        train.build_ldm_stage(cfg3, {})


def test_cache_and_evaluate_take_a_pretrained_autoencoder(tmp_path):
    vae = diffusers_vae(TINY_VAE)
    vae.save_pretrained(tmp_path / "vae")
    proc = subprocess.run([sys.executable, "-m", "ldm.cache", f"ckpt={tmp_path}/vae", f"out_dir={tmp_path}/cache",
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


def test_the_issue_spelling_reaches_the_same_sources(tmp_path):
    """`autoencoder.pretrained=` / `unet.pretrained=` (train.py stage=ldm) and `autoencoder.pretrained=` (ldm.cache)
    read the same autoencoder and U-Net as the older `autoencoder_ckpt=` / `unet_pretrained=` / `ckpt=`."""
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

    modules = {}
    for spelling, keys in (("issue", ("autoencoder.pretrained", "unet.pretrained")),
                           ("older", ("autoencoder_ckpt", "unet_pretrained"))):
        cfg = compose_train(base + [f"{keys[0]}={tmp_path}/vae", f"{keys[1]}={tmp_path}/unet"], output_dir=tmp_path)
        train.check_config(cfg)
        modules[spelling], _ = train.build_ldm_stage(cfg, {})  # the first one builds the cache, the second reuses it
    for module in modules.values():
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
    from test_text_encoders import _tiny_clip

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
    proc = subprocess.run([sys.executable, "-m", "ldm.cache", f"ckpt={tmp_path}/sd.safetensors",
                           f"out_dir={tmp_path}/cache", "data.dataset.size=4", "data.dataset.val_size=2",
                           "data.num_workers=0", "device=cpu", "latent_stats_images=4", "progress=false",
                           "autoencoder_latent_scale=0.25", "resolution=32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "cache" / "manifest.json").read_text())["latent_stats"]
    assert stats["scale"] == 0.25 and stats["shift"] == 0.0 and stats["n_images"] == 4
