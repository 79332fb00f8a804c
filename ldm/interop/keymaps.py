"""Parameter names of the CompVis releases (ours) <-> diffusers, for the KL autoencoder and the latent U-Net.

Our modules use the CompVis names (``encoder.down.0.block.1.conv1``, ``input_blocks.4.1.proj_in``), so importing a
CompVis / Stable Diffusion file is a prefix strip and only diffusers needs renaming. Both directions are built from
one table of module prefixes per architecture (``vae_prefix_pairs`` / ``unet_prefix_pairs``); the inverse is the
same table read the other way, so a round trip is the identity by construction. Tensors are renamed, never copied,
except the autoencoder's mid-block attention: 1x1 convolutions in CompVis, linear layers in diffusers.

Everything here is pure: state dicts in, state dicts out; a key that the table does not cover is an error that
lists the first such keys (never a silent partial conversion).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

# inner names of one residual block / attention block: (CompVis, diffusers)
_VAE_RES = (("nin_shortcut", "conv_shortcut"),)
_VAE_ATTN = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_UNET_RES = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
             ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
# names written by diffusers before 0.14 (e.g. the SD VAEs on the hub): read them as the current ones
DEPRECATED_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_prefix_pairs(levels: int, num_res_blocks: int) -> list[tuple[str, str]]:
    """(CompVis prefix, diffusers prefix) of every module of an ``AutoencoderKL`` with ``levels`` resolutions.

    diffusers numbers the decoder's levels from the deepest (``up_blocks.0`` is CompVis ``up.{levels-1}``) and
    calls the attention ``attentions.0`` where CompVis has ``attn_1``.
    """
    pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.norm_out", f"{part}.conv_norm_out"),
                  (f"{part}.conv_out", f"{part}.conv_out"),
                  (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0"),
                  (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")]
        pairs += [(f"{part}.mid.attn_1.{a}", f"{part}.mid_block.attentions.0.{b}") for a, b in _VAE_ATTN]
    for i in range(levels):
        for j in range(num_res_blocks):
            pairs += _res(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RES)
        if i != levels - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        d = levels - 1 - i
        for j in range(num_res_blocks + 1):
            pairs += _res(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{d}.resnets.{j}", _VAE_RES)
        if i != 0:
            pairs.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{d}.upsamplers.0.conv"))
    return pairs


def unet_prefix_pairs(levels: int, num_res_blocks: int, attention_levels: Sequence[bool],
                      class_embedding: bool = False) -> list[tuple[str, str]]:
    """(CompVis prefix, diffusers prefix) of every module of a ``UNetModel`` (``UNet2DConditionModel``).

    CompVis numbers ``input_blocks`` / ``output_blocks`` straight through (block 0 is conv_in; a level's
    downsampler is a block of its own; an output block holds ResBlock, [SpatialTransformer], [Upsample]); diffusers
    groups them per level. ``attention_levels[i]``: level i has SpatialTransformers.
    """
    pairs = [("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
             ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
             ("middle_block.1", "mid_block.attentions.0")]
    pairs += _res("middle_block.0", "mid_block.resnets.0", _UNET_RES)
    pairs += _res("middle_block.2", "mid_block.resnets.1", _UNET_RES)
    if class_embedding:
        pairs.append(("label_emb", "class_embedding"))
    k = 1
    for i in range(levels):
        for j in range(num_res_blocks):
            pairs += _res(f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", _UNET_RES)
            if attention_levels[i]:
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}"))
            k += 1
        if i != levels - 1:
            pairs.append((f"input_blocks.{k}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
            k += 1
    k = 0
    for i in reversed(range(levels)):
        d = levels - 1 - i
        for j in range(num_res_blocks + 1):
            pairs += _res(f"output_blocks.{k}.0", f"up_blocks.{d}.resnets.{j}", _UNET_RES)
            slot = 1
            if attention_levels[i]:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{d}.attentions.{j}"))
                slot = 2
            if i != 0 and j == num_res_blocks:
                pairs.append((f"output_blocks.{k}.{slot}.conv", f"up_blocks.{d}.upsamplers.0.conv"))
            k += 1
    return pairs


def _res(ours: str, theirs: str, inner: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """A residual block: its renamed inner modules first (longest prefix wins), then the block itself."""
    return [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in inner] + [(ours, theirs)]


def rename(state: Mapping[str, Tensor], pairs: Sequence[tuple[str, str]], what: str) -> dict[str, Tensor]:
    """``state`` with every key's longest matching prefix ``a`` of ``(a, b)`` in ``pairs`` replaced by ``b``.

    ValueError listing the first keys no prefix covers (an architecture the table does not describe).
    """
    table = sorted(pairs, key=lambda p: len(p[0]), reverse=True)
    out, missed = {}, []
    for key, value in state.items():
        for a, b in table:
            if key == a or key.startswith(a + "."):
                out[b + key[len(a):]] = value
                break
        else:
            missed.append(key)
    if missed:
        raise ValueError(f"{what}: {len(missed)} parameter(s) have no counterpart, e.g. {missed[:5]}; the weights "
                         "do not belong to the architecture they are converted for")
    return out


def _swap(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(b, a) for a, b in pairs]


def _attention_shapes(state: dict[str, Tensor], to_linear: bool) -> dict[str, Tensor]:
    """The autoencoder's mid attention q/k/v/out weights: [C, C, 1, 1] conv <-> [C, C] linear."""
    for key, value in state.items():
        if ".mid_block.attentions.0." in key and key.endswith(".weight") and "group_norm" not in key:
            state[key] = value[:, :, 0, 0] if to_linear and value.ndim == 4 else (
                value[:, :, None, None] if not to_linear and value.ndim == 2 else value)
    return state


def vae_to_diffusers(state: Mapping[str, Tensor], levels: int, num_res_blocks: int) -> dict[str, Tensor]:
    """CompVis / our ``AutoencoderKL`` state dict -> diffusers ``AutoencoderKL`` names and shapes."""
    out = rename(state, vae_prefix_pairs(levels, num_res_blocks), "autoencoder -> diffusers")
    return _attention_shapes(out, to_linear=True)


def vae_from_diffusers(state: Mapping[str, Tensor], levels: int, num_res_blocks: int) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` state dict (current or pre-0.14 attention names) -> ours (CompVis names)."""
    current = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")  # e.g. "encoder.mid_block.attentions.0.query" + "weight"
        stem, _, name = head.rpartition(".")
        current[f"{stem}.{DEPRECATED_VAE_ATTN[name]}.{leaf}" if name in DEPRECATED_VAE_ATTN else key] = value
    out = rename(_attention_shapes(current, to_linear=False), _swap(vae_prefix_pairs(levels, num_res_blocks)),
                 "diffusers -> autoencoder")
    return out


def unet_to_diffusers(state: Mapping[str, Tensor], levels: int, num_res_blocks: int,
                      attention_levels: Sequence[bool], class_embedding: bool = False) -> dict[str, Tensor]:
    """CompVis / our ``UNetModel`` state dict -> diffusers ``UNet2DConditionModel`` names."""
    return rename(state, unet_prefix_pairs(levels, num_res_blocks, attention_levels, class_embedding),
                  "U-Net -> diffusers")


def unet_from_diffusers(state: Mapping[str, Tensor], levels: int, num_res_blocks: int,
                        attention_levels: Sequence[bool], class_embedding: bool = False) -> dict[str, Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict -> ours (CompVis names)."""
    return rename(state, _swap(unet_prefix_pairs(levels, num_res_blocks, attention_levels, class_embedding)),
                  "diffusers -> U-Net")
