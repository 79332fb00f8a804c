"""Shared by the interop tests (test_import_weights.py, test_export.py, test_pretrained_parts.py): diffusers
reference models with random weights, their outputs next to ours, and sampling with a fixed seed."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from helpers import accumulation_length, assert_float32_close

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



def _samples(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return generate(model, ["a red circle on the left", "a small blue square"], sampler="ddim", steps=3,
                    cfg_scale=2.0, generator=g)



TINY_VAE = {**SD_VAE, "block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1, "sample_size": 32,
            "scaling_factor": 0.3}


def read_any_spec(unet) -> dict:
    """The ``_target_`` spec of a U-Net built by ldm (its constructor arguments)."""
    keys = ("in_channels", "out_channels", "model_channels", "num_res_blocks", "attention_resolutions",
            "channel_mult", "num_heads", "num_head_channels", "transformer_depth", "context_dim",
            "use_linear_in_transformer", "num_classes", "dropout", "use_scale_shift_norm", "conv_resample")
    return {"_target_": "ldm.models.unet.UNetModel", **{k: getattr(unet, k) for k in keys}}
