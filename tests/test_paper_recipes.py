"""The paper's recipes (configs/experiment/paper/): each composes with the values of the table row it reproduces,
and its models build and run at toy size (same structure, narrower)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import CONFIG_DIR, compose_train, resolved
from hydra.utils import instantiate

from ldm.checkpoint import architecture

PAPER = Path(CONFIG_DIR) / "experiment" / "paper"
# recipe: (stage, autoencoder target, batch, base lr, scale_lr, max_steps, latent channels, U-Net width, heads)
STAGE2 = {
    "ldm_kl8_txt2img": ("ldm.models.text_encoders.TransformerTextEncoder", 85, 1.0e-4, False, 390000, 4, 320, (1, 2, 4, 4)),
    "ldm4_cin256": ("ldm.models.text_encoders.ClassEncoder", 150, 1.0e-4, False, 178000, 3, 192, (1, 2, 3, 5)),
    "ldm8_cin256": ("ldm.models.text_encoders.ClassEncoder", 64, 1.0e-6, True, 2000000, 4, 256, (1, 2, 4)),
    "ldm4_celebahq": ("ldm.models.text_encoders.NullEncoder", 48, 2.0e-6, True, 410000, 3, 224, (1, 2, 3, 4)),
    "ldm4_lsun": ("ldm.models.text_encoders.NullEncoder", 48, 2.0e-6, True, 1900000, 3, 224, (1, 2, 3, 4)),
}
STAGE1 = {"kl_f4": 4, "kl_f8": 8, "kl_f16": 16, "kl_f32": 32, "vq_f4": 4, "vq_f8": 8, "vq_f16": 16}
TOY_UNET = ["unet.model_channels=32", "unet.num_res_blocks=1", "unet.num_heads=-1", "unet.num_head_channels=16"]


def test_every_recipe_in_the_folder_is_checked_here():
    assert {p.stem for p in PAPER.glob("*.yaml")} == set(STAGE2) | set(STAGE1)


@pytest.mark.parametrize("name", sorted(STAGE2))
def test_stage2_recipe_has_its_table_values_and_builds_at_toy_size(name, tmp_path):
    encoder, batch, lr, scale_lr, steps, channels, width, mult = STAGE2[name]
    cfg = resolved(compose_train(["stage=ldm", f"experiment=paper/{name}"], output_dir=tmp_path))
    assert cfg["text_encoder"]["_target_"] == encoder and cfg["resolution"] == 256
    assert (cfg["batch_size"], cfg["module"]["base_learning_rate"], cfg["module"]["scale_lr"]) == (batch, lr, scale_lr)
    assert cfg["trainer"]["max_steps"] == steps and cfg["sampling"]["name"] == "ddim"
    unet = cfg["unet"]
    assert (unet["in_channels"], unet["model_channels"], tuple(unet["channel_mult"])) == (channels, width, mult)
    assert unet["context_dim"] == cfg["text_encoder"]["context_dim"]
    loss = instantiate(cfg["loss"])
    betas = 1 - loss.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), loss.alphas_cumprod[:-1]])
    start, end = (0.00085, 0.012) if name == "ldm_kl8_txt2img" else (0.0015, 0.0195)
    assert torch.allclose(betas[[0, -1]], torch.tensor([start, end], dtype=torch.float64), rtol=1e-6)
    if encoder.endswith("ClassEncoder"):
        assert cfg["data"]["dataset"]["labels"] == "subfolder" and cfg["text_encoder"]["num_classes"] == 1000

    toy = ["text_encoder.width=32", "text_encoder.depth=1", "text_encoder.heads=2"] if "txt2img" in name else (
        ["text_encoder.context_dim=32"] if "cin" in name else [])
    cfg = resolved(compose_train(["stage=ldm", f"experiment=paper/{name}", *TOY_UNET, *toy], output_dir=tmp_path))
    torch.manual_seed(0)
    model = instantiate(architecture(cfg["unet"]))
    text_encoder = instantiate(cfg["text_encoder"])
    prompts = torch.tensor([3, 1000]) if "cin" in name else ["a cat", ""]  # cin: a class and the null class
    context, mask = text_encoder(prompts)
    side = 2 ** (len(mult) - 1) * 2
    out = model(torch.randn(2, channels, side, side), torch.tensor([10, 900]), context, mask)
    assert out.shape == (2, channels, side, side) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(STAGE1))
def test_stage1_recipe_builds_at_toy_size(name, tmp_path):
    overrides = [f"experiment=paper/{name}", "autoencoder.ch=32", "autoencoder.num_res_blocks=1"]
    cfg = resolved(compose_train(overrides, output_dir=tmp_path))
    assert cfg["resolution"] == 256 and cfg["module"]["scale_lr"] and cfg["module"]["base_learning_rate"] == 4.5e-6
    model = instantiate(cfg["autoencoder"])
    assert model.downsample_factor == STAGE1[name]
    x = torch.rand(1, 3, 2 * STAGE1[name], 2 * STAGE1[name]) * 2 - 1
    with torch.no_grad():
        recon, _ = model(x)
    assert recon.shape == x.shape
    if name.startswith("vq"):
        assert cfg["loss"]["_target_"] == "ldm.losses.autoencoder.VQAutoencoderLoss" and cfg["autoencoder"]["legacy"]
        assert cfg["monitor"] == "val/rec_loss"
