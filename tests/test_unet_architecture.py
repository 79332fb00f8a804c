"""Latent U-Net architecture: presets and their sizes, the released key layout, parity with diffusers after
its own checkpoint conversion, the conditioning paths, and clear errors for bad inputs and architectures."""

from __future__ import annotations

import pytest
import torch
from helpers import accumulation_length, assert_float32_close
from unet_fixtures import inputs, n_params, preset, randomize, small_unet

from ldm.models.blocks import timestep_embedding

SD15_PARAMS = 859_520_964  # diffusers 0.42 UNet2DConditionModel with the SD-1.5 config
LDM_KL8_TXT2IMG_PARAMS = 872_300_484  # the same U-Net with a 1280-wide context (paper txt2img)
PREFIX = "model.diffusion_model."  # where CompVis checkpoints keep the U-Net


# ----------------------------------------------------------------------------------------- presets, sizes


@pytest.mark.parametrize("name,size", [("tiny", 8), ("small", 8)])
def test_presets_build_and_keep_the_latent_shape(name, size):
    torch.manual_seed(0)
    model = preset(name).eval()
    x, t, ctx = inputs(model, b=1, size=size, tokens=3)
    with torch.no_grad():
        out = model(x, t, ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (model.in_channels, model.out_channels) == (4, 4)
    # zero-initialised output conv: an untrained U-Net predicts exactly 0 (CompVis zero_module)
    assert out.abs().max() == 0
    torch.nn.init.normal_(model.out[2].weight, std=0.1)
    with torch.no_grad():
        assert model(x, t, ctx).abs().mean() > 0


def test_context_dim_is_overridable_like_the_stage_config_does():
    model = preset("tiny", context_dim=48)
    assert model.context_dim == 48
    assert model.middle_block[1].transformer_blocks[0].attn2.to_k.weight.shape[1] == 48


def test_preset_parameter_counts_match_diffusers():
    """SD-1.5 has diffusers' count exactly; the paper's txt2img differs only by its 1280-wide context."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd15, kl8 = preset("sd15"), preset("ldm_kl8_txt2img")
        reference = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        reference_1280 = UNet2DConditionModel(**kl8.diffusers_config())
    assert n_params(reference) == SD15_PARAMS
    assert n_params(sd15) == SD15_PARAMS
    assert n_params(kl8) == n_params(reference_1280) == LDM_KL8_TXT2IMG_PARAMS
    # our config mapping reproduces the published SD-1.5 config
    config = sd15.diffusers_config()
    for key in (
        "sample_size",
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
        "transformer_layers_per_block",
        "use_linear_projection",
        "resnet_time_scale_shift",
        "norm_num_groups",
    ):
        expected = reference.config[key]
        assert config[key] == (tuple(expected) if isinstance(expected, list) else expected), key


# ------------------------------------------------------------------------------------- released key layout

# Names and shapes from the released SD-1.x checkpoints (``model.diffusion_model.`` stripped).
RELEASED_SD15_KEYS = {
    "time_embed.0.weight": (1280, 320),
    "time_embed.2.weight": (1280, 1280),
    "input_blocks.0.0.weight": (320, 4, 3, 3),
    "input_blocks.1.0.in_layers.0.weight": (320,),
    "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "input_blocks.1.0.out_layers.0.weight": (320,),
    "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
    "input_blocks.1.1.norm.weight": (320,),
    "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": (320,),
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
    "input_blocks.1.1.transformer_blocks.0.norm3.bias": (320,),
    "input_blocks.1.1.proj_out.weight": (320, 320, 1, 1),
    "input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "middle_block.0.in_layers.2.weight": (1280, 1280, 3, 3),
    "middle_block.1.transformer_blocks.0.attn2.to_v.weight": (1280, 768),
    "middle_block.2.emb_layers.1.weight": (1280, 1280),
    "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
    "out.0.weight": (320,),
    "out.2.weight": (4, 320, 3, 3),
}


def test_sd15_key_layout_is_the_released_one():
    """Every released name is there with its shape, and diffusers' own CompVis->diffusers converter maps our
    state_dict onto exactly the key set and shapes of diffusers' SD-1.5 U-Net (meta tensors: no memory)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        ours = preset("sd15")
        theirs = UNet2DConditionModel(**ours.diffusers_config())
    state = ours.state_dict()
    assert len(state) == 686
    for key, shape in RELEASED_SD15_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    converted = convert_ldm_unet_checkpoint(
        {PREFIX + k: v for k, v in state.items()}, ours.diffusers_config()
    )
    reference = theirs.state_dict()
    assert set(converted) == set(reference)
    assert all(converted[k].shape == reference[k].shape for k in reference)


def test_linear_transformer_and_class_embedding_keys():
    state = small_unet(use_linear_in_transformer=True, num_classes=3).state_dict()
    assert state["label_emb.weight"].shape == (3, 128)
    assert state["input_blocks.4.1.proj_in.weight"].shape == (64, 64)  # nn.Linear, as in SD 2.x
    assert state["input_blocks.4.1.proj_out.weight"].shape == (64, 64)


# ------------------------------------------------------------------------------------- parity with diffusers

PARITY_CASES = {
    "sd_style": {},  # 1x1-conv proj, fixed heads, additive time conditioning
    "linear_film_classes": dict(
        use_linear_in_transformer=True,
        use_scale_shift_norm=True,
        num_classes=5,
        num_heads=-1,
        num_head_channels=16,
        transformer_depth=2,
    ),
    "attention_everywhere": dict(attention_resolutions=[1, 2, 4], num_res_blocks=1),
}


@pytest.mark.parametrize("case", PARITY_CASES, ids=list(PARITY_CASES))
def test_matches_diffusers_after_its_own_checkpoint_conversion(case):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = randomize(small_unet(**PARITY_CASES[case])).eval()
    config = ours.diffusers_config(sample_size=16)
    theirs = UNet2DConditionModel(**config).eval()
    converted = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in ours.state_dict().items()}, config)
    theirs.load_state_dict(converted, strict=True)

    x, t, ctx = inputs(ours, size=8)
    y = torch.tensor([1, 4]) if ours.num_classes else None
    mask = torch.ones(2, ctx.shape[1], dtype=torch.bool)
    mask[0, 3:] = False
    with torch.no_grad():
        a = ours(x, t, ctx, y=y)
        b = theirs(x, t, encoder_hidden_states=ctx, class_labels=y).sample
        a_masked = ours(x, t, ctx, context_mask=mask, y=y)
        b_masked = theirs(x, t, encoder_hidden_states=ctx, class_labels=y, encoder_attention_mask=mask).sample
    assert a.abs().mean() > 0.05  # a real signal, not the zero output of an untrained net
    n = accumulation_length(ours)
    assert_float32_close(a, b, n)
    assert_float32_close(a_masked, b_masked, n, "masked")
    assert (a_masked - a).abs().max() > 1e-3  # the mask did something


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 999]).float() + 0.25
    ref = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 320), ref)
    assert timestep_embedding(t, 7).shape == (4, 7) and (timestep_embedding(t, 7)[:, -1] == 0).all()


# ------------------------------------------------------------------------------------- conditioning paths


def test_class_embedding_is_added_to_the_time_embedding():
    model = randomize(small_unet(num_classes=4)).eval()
    with torch.no_grad():
        model.label_emb.weight[2] = model.label_emb.weight[1]
    x, t, ctx = inputs(model)
    x, t, ctx = x[:1].expand(3, -1, -1, -1), t[:1].expand(3), ctx[:1].expand(3, -1, -1)
    with torch.no_grad():
        out = model(x, t, ctx, y=torch.tensor([1, 2, 3]))
    torch.testing.assert_close(out[0], out[1])  # equal embeddings -> equal outputs
    assert (out[0] - out[2]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="num_classes"):
        model(x, t, ctx)


def test_masked_context_tokens_do_not_change_the_output():
    model = randomize(small_unet()).eval()
    x, t, ctx = inputs(model, tokens=6)
    mask = torch.tensor([[True, True, True, False, False, False], [True] * 5 + [False]])
    changed = ctx.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), ctx.shape[-1]) * 10
    with torch.no_grad():
        ref = model(x, t, ctx, context_mask=mask)
        torch.testing.assert_close(model(x, t, changed, context_mask=mask), ref, atol=1e-6, rtol=0)
        # ... and without the mask the same change does matter; an all-True mask equals no mask
        assert (model(x, t, changed) - model(x, t, ctx)).abs().max() > 1e-3
        full = torch.ones_like(mask)
        # another attention kernel (with and without a mask): another summation order
        assert_float32_close(model(x, t, ctx, context_mask=full), model(x, t, ctx), accumulation_length(model))


def test_unconditional_model_uses_self_attention_twice():
    model = randomize(small_unet(context_dim=None)).eval()
    block = model.middle_block[1].transformer_blocks[0]
    assert block.attn2.to_k.weight.shape == (64, 64)  # keys from the tokens themselves
    x, t, _ = inputs(model)
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, torch.zeros(2, 3, 24))


def test_timesteps_may_be_float_or_a_scalar():
    model = randomize(small_unet()).eval()
    x, _, ctx = inputs(model)
    with torch.no_grad():
        a = model(x, torch.tensor(500), ctx)
        b = model(x, torch.tensor([500.0, 500.0]), ctx)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, x, t, c: m(x[:, :3], t, c), r"\[B, 4, H, W\]"),
        (lambda m, x, t, c: m(x[..., :6, :6], t, c), "not divisible by the U-Net's downsample factor 4"),
        (lambda m, x, t, c: m(x, t, None), "pass context"),
        (lambda m, x, t, c: m(x, t, c[..., :5]), "context_dim to the text encoder's width"),
        (lambda m, x, t, c: m(x, t, c, context_mask=torch.ones(2, 7)), "context_mask must be bool"),
        (lambda m, x, t, c: m(x, t[:1], c), r"timesteps must be \[B\]"),
    ],
)
def test_bad_inputs_fail_with_a_clear_message(call, match):
    model = small_unet()
    x, t, ctx = inputs(model)
    with pytest.raises(ValueError, match=match):
        call(model, x, t, ctx)


def test_bad_architectures_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        small_unet(num_heads=-1)
    with pytest.raises(ValueError, match="divisible by the 32 GroupNorm groups"):
        small_unet(model_channels=40)
    with pytest.raises(ValueError, match=r"attention_resolutions \[8\] match no level"):
        small_unet(attention_resolutions=[8])
