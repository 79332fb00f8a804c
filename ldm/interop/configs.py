"""Architectures across formats: diffusers ``config.json`` <-> our constructor arguments, and the arguments a
CompVis state dict implies (CompVis files carry no config; their shapes tell all but the attention heads).

Pure functions on dicts. Anything our modules cannot express (or diffusers cannot, on export) is a ValueError that
names the setting, so a conversion never silently drops a feature.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ldm.models.blocks import GROUPS

KL_TARGET, VQ_TARGET = "ldm.models.autoencoder.AutoencoderKL", "ldm.models.vq.VQModel"
DIFFUSERS_VERSION = "0.30.0"  # written into exported config.json files: the oldest diffusers they load in

# diffusers settings our models do not implement, with the value that matches ours
_UNET_FIXED = {
    "act_fn": "silu", "norm_num_groups": GROUPS, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "center_input_sample": False, "time_embedding_type": "positional", "conv_in_kernel": 3, "conv_out_kernel": 3,
    "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_cond_proj_dim": None,
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_dim": None,
    "timestep_post_act": None, "attention_type": "default", "cross_attention_norm": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "downsample_padding": 1, "mid_block_scale_factor": 1,
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "projection_class_embeddings_input_dim":
    None, "addition_time_embed_dim": None, "reverse_transformer_layers_per_block": None,
    "time_embedding_act_fn": None,
}
# diffusers' AutoencoderKL default when a config.json (e.g. of the first SD VAEs on the hub) has no scaling_factor
DIFFUSERS_DEFAULT_SCALING_FACTOR = 0.18215
_VAE_FIXED = {"act_fn": "silu", "norm_num_groups": GROUPS, "use_quant_conv": True, "use_post_quant_conv": True,
              "mid_block_add_attention": True}


def _check_fixed(config: Mapping[str, Any], fixed: Mapping[str, Any], what: str) -> None:
    def same(value: Any, wanted: Any) -> bool:  # a per-level list of one value counts as that value
        if isinstance(value, list | tuple) and not isinstance(wanted, list | tuple):
            return all(v == wanted for v in value)
        return value == wanted

    bad = [f"{k}={config[k]!r} (ldm supports {v!r})" for k, v in fixed.items() if k in config and not same(config[k], v)]
    if bad:
        raise ValueError(f"this {what} uses settings ldm's models do not implement: " + "; ".join(bad))


def _widths(block_out_channels) -> tuple[int, list[int]]:
    widths = [int(w) for w in block_out_channels]
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels={widths} are not multiples of the first width {base}")
    return base, [w // base for w in widths]


# --------------------------------------------------------------------------------------------- autoencoder

def vae_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments of ``ldm.models.autoencoder.AutoencoderKL`` for a diffusers ``AutoencoderKL`` config."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"config.json describes a {config['_class_name']}, not an AutoencoderKL")
    _check_fixed(config, _VAE_FIXED, "diffusers AutoencoderKL")
    down = set(config.get("down_block_types", ["DownEncoderBlock2D"]))
    up = set(config.get("up_block_types", ["UpDecoderBlock2D"]))
    if down != {"DownEncoderBlock2D"} or up != {"UpDecoderBlock2D"}:
        raise ValueError(f"down/up block types {sorted(down)} / {sorted(up)}: ldm's AutoencoderKL has "
                         "DownEncoderBlock2D / UpDecoderBlock2D only")
    ch, ch_mult = _widths(config.get("block_out_channels", [64]))
    size = config.get("sample_size", 256)
    latent = int(config.get("latent_channels", 4))
    return {"ch": ch, "ch_mult": ch_mult, "num_res_blocks": int(config.get("layers_per_block", 1)),
            "attn_resolutions": [], "resolution": int(size[0] if isinstance(size, list | tuple) else size),
            "in_channels": int(config.get("in_channels", 3)), "out_ch": int(config.get("out_channels", 3)),
            "z_channels": latent, "embed_dim": latent, "double_z": True, "dropout": 0.0}


def vae_latent_scale(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The latent normalisation a diffusers VAE config records: {"scale", "shift"[, "mean", "std"]} (a config
    without ``scaling_factor`` means diffusers' default, ``DIFFUSERS_DEFAULT_SCALING_FACTOR``)."""
    scaling = config.get("scaling_factor", DIFFUSERS_DEFAULT_SCALING_FACTOR)  # what diffusers itself would use
    if scaling is None:
        return None
    out = {"scale": float(scaling), "shift": float(config.get("shift_factor") or 0.0)}
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        out.update(mean=[float(v) for v in config["latents_mean"]], std=[float(v) for v in config["latents_std"]])
    return out


def vae_diffusers_config(kwargs: Mapping[str, Any], scaling_factor: float, shift_factor: float = 0.0) -> dict:
    """diffusers ``AutoencoderKL`` config.json for our autoencoder arguments ``kwargs`` (its stored ``_target_``
    spec); ``scaling_factor`` / ``shift_factor``: the latent statistics' 1/sigma and shift."""
    if kwargs.get("attn_resolutions"):
        raise ValueError(f"attn_resolutions={list(kwargs['attn_resolutions'])}: diffusers' AutoencoderKL has "
                         "attention only in the middle block; this autoencoder cannot be exported to diffusers")
    if int(kwargs.get("z_channels", 4)) != int(kwargs.get("embed_dim", 4)):
        raise ValueError(f"z_channels={kwargs['z_channels']} != embed_dim={kwargs['embed_dim']}: diffusers' "
                         "AutoencoderKL has one latent width (latent_channels)")
    if float(kwargs.get("dropout", 0.0)):
        raise ValueError("diffusers' AutoencoderKL has no dropout; export with dropout=0")
    ch = int(kwargs.get("ch", 128))
    mult = [int(m) for m in kwargs.get("ch_mult", (1, 2, 4, 4))]
    levels = len(mult)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
            "in_channels": int(kwargs.get("in_channels", 3)), "out_channels": int(kwargs.get("out_ch", 3)),
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [ch * m for m in mult], "layers_per_block": int(kwargs.get("num_res_blocks", 2)),
            "act_fn": "silu", "latent_channels": int(kwargs.get("embed_dim", 4)), "norm_num_groups": GROUPS,
            "sample_size": int(kwargs.get("resolution", 256)), "scaling_factor": float(scaling_factor),
            "shift_factor": float(shift_factor) or None, "force_upcast": True,
            "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}


def infer_vae_kwargs(state: Mapping[str, Tensor], resolution: int = 256) -> dict[str, Any]:
    """The ``_target_`` spec of a CompVis-named autoencoder state dict (prefix already stripped), implied by its
    shapes: ``AutoencoderKL``, or ``VQModel`` when it holds ``quantize.embedding.weight`` (the released VQ models'
    quantiser: ``legacy=True``). ``resolution``: the nominal size that places ``attn_resolutions`` (CompVis
    configs: 256)."""
    if any(".down_blocks." in k or ".mid_block." in k for k in state):
        raise ValueError("these are diffusers' parameter names (a diffusion_pytorch_model file): pass the folder that "
                         "holds it with its config.json")
    vq = "quantize.embedding.weight" in state
    need = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight", "quant_conv.weight",
            "encoder.down.0.block.0.conv2.weight")
    if missing := [k for k in need if k not in state]:
        raise ValueError(f"not a CompVis {'VQ' if vq else 'KL'} autoencoder state dict: no {missing}")
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    ch = int(state["encoder.conv_in.weight"].shape[0])
    mult = [int(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in range(levels)]
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    attn = sorted({resolution // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state})
    shared = {"ch": ch, "ch_mult": mult, "num_res_blocks": blocks, "attn_resolutions": attn, "resolution": resolution,
              "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
              "out_ch": int(state["decoder.conv_out.weight"].shape[0]), "dropout": 0.0}
    if vq:
        n_embed, embed_dim = state["quantize.embedding.weight"].shape
        return {"_target_": VQ_TARGET, **shared, "z_channels": int(state["encoder.conv_out.weight"].shape[0]),
                "embed_dim": int(embed_dim), "n_embed": int(n_embed), "beta": 0.25, "legacy": True, "double_z": False}
    return {"_target_": KL_TARGET, **shared, "z_channels": int(state["encoder.conv_out.weight"].shape[0]) // 2,
            "embed_dim": int(state["quant_conv.weight"].shape[0]) // 2, "double_z": True}


# ------------------------------------------------------------------------------------------------- U-Net

def _per_level(value: Any, levels: int, name: str) -> list[int]:
    values = [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)] * levels
    if len(values) != levels:
        raise ValueError(f"{name}={value} has {len(values)} entries for {levels} levels")
    return values


def unet_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments of ``ldm.models.unet.UNetModel`` for a diffusers ``UNet2DConditionModel`` config."""
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"config.json describes a {config['_class_name']}, not a UNet2DConditionModel")
    _check_fixed(config, _UNET_FIXED, "diffusers UNet2DConditionModel")
    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    if set(down) - {"CrossAttnDownBlock2D", "DownBlock2D"} or [t == "CrossAttnUpBlock2D" for t in up] != attn[::-1]:
        raise ValueError(f"block types {down} / {up}: ldm's UNetModel needs (CrossAttn)DownBlock2D levels mirrored "
                         "by (CrossAttn)UpBlock2D levels")
    base, mult = _widths(config.get("block_out_channels", [320, 640, 1280, 1280]))
    levels = len(mult)
    if isinstance(config.get("layers_per_block", 2), list | tuple):
        raise ValueError("layers_per_block given per level: ldm's UNetModel has one count for all levels")
    if isinstance(config.get("cross_attention_dim", 1280), list | tuple):
        raise ValueError("cross_attention_dim given per level: ldm's UNetModel has one context width")
    if config.get("cross_attention_dim", 1280) is None:
        raise ValueError("cross_attention_dim=None: a UNet2DConditionModel needs a context width")
    heads_cfg = config.get("num_attention_heads") or config.get("attention_head_dim", 8)  # diffusers' old name
    heads = _per_level(heads_cfg, levels, "attention heads")
    widths = [base * m for m in mult]
    used = [(w, h) for w, h, a in zip(widths, heads, attn, strict=True) if a] + [(widths[-1], heads[-1])]  # + mid
    head_kw = {"num_heads": used[0][1], "num_head_channels": -1}
    if len({h for _, h in used}) > 1:
        if len({w // h for w, h in used}) > 1 or any(w % h for w, h in used):
            raise ValueError(f"attention heads {heads} over widths {widths}: ldm's UNetModel takes either one head "
                             "count or one head width for every level")
        head_kw = {"num_heads": -1, "num_head_channels": used[0][0] // used[0][1]}
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ValueError(f"resnet_time_scale_shift={shift!r}: ldm supports default or scale_shift")
    return {"in_channels": int(config.get("in_channels", 4)), "out_channels": int(config.get("out_channels", 4)),
            "model_channels": base, "num_res_blocks": int(config.get("layers_per_block", 2)),
            "attention_resolutions": [2**i for i, a in enumerate(attn) if a], "channel_mult": mult, **head_kw,
            "transformer_depth": _per_level(config.get("transformer_layers_per_block", 1), levels,
                                            "transformer_layers_per_block"),
            "context_dim": int(config.get("cross_attention_dim", 1280)),
            "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
            "num_classes": config.get("num_class_embeds"), "dropout": float(config.get("dropout", 0.0)),
            "use_checkpoint": False, "use_scale_shift_norm": shift == "scale_shift", "conv_resample": True}


def unet_diffusers_config(model: Any, sample_size: int = 64) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` config.json for our ``UNetModel`` ``model``."""
    if model.context_dim is None:  # its middle block (always) and levels have self-attention in place of cross
        raise ValueError("an unconditional U-Net (context_dim=None: the second attention of every transformer is "
                         "self-attention) has no diffusers UNet2DConditionModel counterpart")
    config = model.diffusers_config(sample_size=sample_size)  # raises for what diffusers cannot express
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, **config}


def attention_levels(kwargs: Mapping[str, Any]) -> list[bool]:
    """Which levels of a ``UNetModel`` with arguments ``kwargs`` have SpatialTransformers."""
    res = {int(r) for r in kwargs["attention_resolutions"]}
    return [2**i in res for i in range(len(kwargs["channel_mult"]))]


def infer_unet_kwargs(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """``UNetModel`` arguments implied by a CompVis U-Net state dict (prefix stripped), except the attention
    heads (``num_heads`` / ``num_head_channels``), which weights do not record."""
    if "input_blocks.0.0.weight" not in state or "out.2.weight" not in state:
        raise ValueError("not a CompVis U-Net state dict: no input_blocks.0.0 / out.2 weights")
    base = int(state["input_blocks.0.0.weight"].shape[0])
    n_in = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"input_blocks\.(\d+)\.", k)))
    levels: list[list[int]] = [[]]
    for k in range(1, n_in):
        if f"input_blocks.{k}.0.op.weight" in state:
            levels.append([])
        else:
            levels[-1].append(k)
    counts = {len(blocks) for blocks in levels}
    if len(counts) != 1:
        raise ValueError(f"residual blocks per level {[len(b) for b in levels]}: one count for all levels needed")

    def depth(prefix: str) -> int:
        found = [int(m.group(1)) for key in state if (m := re.match(re.escape(prefix) + r"\.transformer_blocks\.(\d+)\.",
                                                                         key))]
        return 1 + max(found) if found else 0

    first = [blocks[0] for blocks in levels]
    attn = [f"input_blocks.{k}.1.proj_in.weight" in state for k in first]
    mult = [int(state[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0]) // base for k in first]
    middle = depth("middle_block.1") or 1  # levels without attention: only the middle block uses their entry
    depths = [depth(f"input_blocks.{k}.1") if a else middle for k, a in zip(first, attn, strict=True)]
    ctx_key = "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    emb = state["input_blocks.1.0.emb_layers.1.weight"]
    return {"in_channels": int(state["input_blocks.0.0.weight"].shape[1]),
            "out_channels": int(state["out.2.weight"].shape[0]), "model_channels": base,
            "num_res_blocks": counts.pop(), "attention_resolutions": [2**i for i, a in enumerate(attn) if a],
            "channel_mult": mult, "transformer_depth": depths if len(set(depths)) > 1 else depths[0],
            "context_dim": int(state[ctx_key].shape[1]) if ctx_key in state else None,
            "use_linear_in_transformer": state["middle_block.1.proj_in.weight"].ndim == 2
            if "middle_block.1.proj_in.weight" in state else False,
            "num_classes": int(state["label_emb.weight"].shape[0]) if "label_emb.weight" in state else None,
            "use_scale_shift_norm": int(emb.shape[0]) == 2 * base * mult[0]}
