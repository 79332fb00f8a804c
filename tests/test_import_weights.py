"""Import of pretrained weights against the reference implementation (diffusers), on the CPU with random weights:
diffusers folders, CompVis / Stable Diffusion single files and standalone CompVis autoencoders, read back both ways."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import accumulation_length
from interop_fixtures import (
    SD15_UNET,
    SD_VAE,
    SMALL_UNET,
    _quiet,
    assert_close,
    diffusers_unet,
    diffusers_vae,
    read_any_spec,
    unet_output,
    vae_outputs,
)
from safetensors.torch import load_file, save_file

from ldm.checkpoint import atomic_torch_save
from ldm.export import (
    export,
    load_autoencoder,
    load_unet,
    read_any,
    write_diffusers_unet,
    write_diffusers_vae,
)
from ldm.interop.keymaps import DEPRECATED_VAE_ATTN

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
