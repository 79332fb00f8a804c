"""Stage-1 modules: KL autoencoder presets, the diagonal Gaussian posterior and the PatchGAN discriminator."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
from helpers import accumulation_length, assert_float32_close
from omegaconf import OmegaConf

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.discriminator import ActNorm, NLayerDiscriminator
from ldm.models.distributions import DiagonalGaussianDistribution

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "autoencoder"
# name -> (downsample factor, embed_dim, test image size)
EXPECTED = {
    "kl_f4": (4, 3, 64),
    "kl_f8": (8, 4, 64),
    "kl_f16": (16, 16, 64),
    "kl_f32": (32, 64, 64),
    "tiny": (4, 4, 32),
}
SD_VAE_PARAMS = 83_653_863  # diffusers 0.42 AutoencoderKL with the SD v1 config (== CompVis kl-f8)
PATCHGAN_PARAMS = 2_765_633  # taming NLayerDiscriminator(3, 64, 3, BatchNorm): convs w/o bias + BN affine


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_cache: dict[str, AutoencoderKL] = {}


def preset(name: str) -> AutoencoderKL:
    """Build each preset once per session (the big ones take ~1 s to initialise)."""
    if name not in _cache:
        torch.manual_seed(0)
        model = hydra.utils.instantiate(OmegaConf.load(PRESETS / f"{name}.yaml"))
        _cache[name] = model.eval()
    return _cache[name]


def sd_vae_diffusers(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=256):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    n = len(block_out_channels)
    return DiffusersAutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
    ).eval()


# --------------------------------------------------------------------------------------------- presets


def test_kl_f8_matches_stable_diffusion_vae_parameter_count():
    ours = preset("kl_f8")
    assert n_params(ours) == SD_VAE_PARAMS
    assert n_params(sd_vae_diffusers()) == SD_VAE_PARAMS


def test_kl_f8_weights_run_identically_in_diffusers():
    """Our state_dict, converted by diffusers' own CompVis->diffusers mapping, gives the same outputs.

    This pins the CompVis key layout (every key must be consumed) and the forward maths at once.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = preset("kl_f8")
    theirs = sd_vae_diffusers()
    converted = convert_ldm_vae_checkpoint(ours.state_dict(), dict(theirs.config))
    missing, unexpected = theirs.load_state_dict(converted, strict=True)
    assert not missing and not unexpected

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        post = ours.encode(x)
        ref_post = theirs.encode(x).latent_dist
        encoder = accumulation_length(ours.encoder, ours.quant_conv)
        assert_float32_close(post.mean, ref_post.mean, encoder, "mean")
        assert_float32_close(post.logvar, ref_post.logvar, encoder, "logvar")
        z = post.mean
        assert_float32_close(ours.decode(z), theirs.decode(z).sample, accumulation_length(ours.decoder,
                                                                                      ours.post_quant_conv))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_preset_shapes_and_posterior(name):
    f, embed_dim, size = EXPECTED[name]
    model = preset(name)
    assert model.downsample_factor == f
    assert model.latent_channels == embed_dim
    batch = 2 if name == "tiny" else 1
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        post = model.encode(x)
        assert post.mean.shape == (batch, embed_dim, size // f, size // f)
        kl = post.kl()
        assert kl.shape == (batch,)
        assert torch.all(kl >= 0) and torch.all(torch.isfinite(kl))
        z1 = post.sample(torch.Generator().manual_seed(7))
        z2 = post.sample(torch.Generator().manual_seed(7))
        z3 = post.sample(torch.Generator().manual_seed(8))
        assert torch.equal(z1, z2)
        assert not torch.equal(z1, z3)
        assert torch.equal(post.mode(), post.mean)
        rec = model.decode(z1)
        assert rec.shape == (batch, 3, size, size)
        assert torch.all(torch.isfinite(rec))
        rec_fwd, post_fwd = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(rec_fwd, rec)
        rec_mode, _ = model(x, sample_posterior=False)
        torch.testing.assert_close(rec_mode, model.decode(post.mean))


def test_presets_are_standalone_and_groupnorm_compatible():
    for name in EXPECTED:
        cfg = OmegaConf.load(PRESETS / f"{name}.yaml")
        assert cfg._target_ == "ldm.models.autoencoder.AutoencoderKL"
        assert all(not isinstance(v, str) or "${" not in v for v in cfg.values())  # no interpolations
        assert all((cfg.ch * m) % 32 == 0 for m in cfg.ch_mult), name


def test_compvis_key_names():
    keys = set(preset("kl_f8").state_dict())
    for key in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.0.block.1.conv2.bias",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.block_1.norm2.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.attn_1.proj_out.bias",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "decoder.conv_in.weight",
        "decoder.mid.attn_1.norm.weight",
        "decoder.up.3.upsample.conv.weight",
        "decoder.up.0.block.2.conv1.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",  # 256 -> 128 at the top level
        "decoder.norm_out.bias",
        "decoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ]:
        assert key in keys, key
    assert "encoder.down.3.downsample.conv.weight" not in keys  # last encoder level keeps resolution
    assert "decoder.up.0.upsample.conv.weight" not in keys  # first decoder level (full res) has none
    assert not any(".attn.0." in k for k in keys)  # kl-f8 has attention only in the middle
    assert preset("kl_f8").get_last_layer() is preset("kl_f8").decoder.conv_out.weight

    # Attention placement follows the nominal resolution 256: 16 px -> level 4, 8 px -> level 5.
    f16 = set(preset("kl_f16").state_dict())
    assert "encoder.down.4.attn.1.k.weight" in f16 and "decoder.up.4.attn.2.v.weight" in f16
    assert not any(k.startswith(("encoder.down.3.attn", "decoder.up.3.attn")) for k in f16)
    f32 = set(preset("kl_f32").state_dict())
    assert "encoder.down.5.attn.0.q.weight" in f32 and "decoder.up.4.attn.0.q.weight" in f32


def test_non_divisible_input_raises():
    model = preset("tiny")
    with pytest.raises(ValueError, match=r"30x30 is not divisible by the downsample factor 4.*28x28.*32x32"):
        model.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="expected images"):
        model.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="GroupNorm"):
        AutoencoderKL(ch=48, ch_mult=(1, 2), num_res_blocks=1)


def test_accepts_lists_and_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    model = AutoencoderKL(
        ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], resolution=32
    ).eval()
    assert model.ch_mult == (1, 2)
    assert hasattr(model.encoder.down[1].attn[0], "q")  # level 1 works at 32 // 2 = 16
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref, _ = model(x, sample_posterior=False)
        cl_model = AutoencoderKL(
            ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], resolution=32
        )
        cl_model.load_state_dict(model.state_dict())
        cl_model = cl_model.eval().to(memory_format=torch.channels_last)
        out, _ = cl_model(x.contiguous(memory_format=torch.channels_last), sample_posterior=False)
        assert_float32_close(out, ref, accumulation_length(model))  # other conv kernels: other summation orders
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16, post = model(x, sample_posterior=False)
        assert out_bf16.dtype == torch.bfloat16 and torch.all(torch.isfinite(out_bf16))
        assert post.kl().dtype == torch.float32
        assert (out_bf16.float() - ref).abs().max() < 0.2  # random init; only a sanity bound


# ----------------------------------------------------------------------------------------- distributions


def test_kl_hand_computed():
    # B=2, C=1, h=1, w=2: channel 0 = mean, channel 1 = log-variance.
    mean = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])
    logvar = torch.tensor([[[[0.0, 0.0]]], [[[math.log(4.0), 0.0]]]])
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    expected = torch.tensor([0.5 * ((1 + 1 - 1 - 0) + (4 + 1 - 1 - 0)), 0.5 * (4 - 1 - math.log(4.0))])
    torch.testing.assert_close(dist.kl(), expected)
    torch.testing.assert_close(dist.kl(dist), torch.zeros(2))
    torch.testing.assert_close(dist.var, logvar.exp())
    torch.testing.assert_close(dist.std, (0.5 * logvar).exp())
    # NLL at the mean: 0.5 * sum(log 2pi + logvar)
    nll = dist.nll(mean)
    torch.testing.assert_close(nll, 0.5 * (2 * math.log(2 * math.pi) + logvar.sum(dim=(1, 2, 3))))
    # KL between N(0, 4) and N(0, 1) per element: 0.5 * (1/4 - 1 + log 4) via kl(other)
    p = DiagonalGaussianDistribution(torch.cat([torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)], 1))
    q = DiagonalGaussianDistribution(
        torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), math.log(4.0))], 1)
    )
    torch.testing.assert_close(p.kl(q), torch.tensor([0.5 * (0.25 - 1 + math.log(4.0))]))


def test_logvar_clamp_and_deterministic():
    moments = torch.cat([torch.randn(3, 4, 2, 2), torch.full((3, 4, 2, 2), 100.0)], dim=1)
    assert DiagonalGaussianDistribution(moments).logvar.max().item() == 20.0
    moments[:, 4:] = -100.0
    assert DiagonalGaussianDistribution(moments).logvar.min().item() == -30.0

    det = DiagonalGaussianDistribution(moments, deterministic=True)
    assert torch.all(det.std == 0) and torch.all(det.var == 0)
    assert torch.equal(det.sample(torch.Generator().manual_seed(0)), det.mean)
    assert torch.equal(det.kl(), torch.zeros(3))
    assert torch.equal(det.nll(det.mean), torch.zeros(3))

    with pytest.raises(ValueError, match="even number of channels"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))


def test_sample_statistics():
    moments = torch.cat([torch.full((1, 1, 100, 100), 3.0), torch.full((1, 1, 100, 100), math.log(0.25))], 1)
    z = DiagonalGaussianDistribution(moments).sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 3.0) < 0.02
    assert abs(z.std().item() - 0.5) < 0.02


# ----------------------------------------------------------------------------------------- discriminator


def test_discriminator_shapes_and_parameter_count():
    disc = NLayerDiscriminator()
    assert n_params(disc) == PATCHGAN_PARAMS
    keys = set(disc.state_dict())  # taming layout: conv(0) lrelu(1) [conv norm lrelu] x3 conv(11)
    assert {"main.0.bias", "main.2.weight", "main.3.running_mean", "main.11.weight"} <= keys
    assert "main.2.bias" not in keys  # no conv bias in front of BatchNorm
    with torch.no_grad():
        assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
        assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    with pytest.raises(ValueError, match="at least 24x24"):
        disc(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown norm"):
        NLayerDiscriminator(norm="layer")
    # norm="none": the three middle convs (128 + 256 + 512 outputs) gain a bias and lose BN's weight + bias.
    assert n_params(NLayerDiscriminator(norm="none")) == PATCHGAN_PARAMS - 896 == 2_764_737


def test_discriminator_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    conv = disc.main[8].weight  # 256 -> 512, 2M weights
    assert abs(conv.std().item() - 0.02) < 1e-3 and abs(conv.mean().item()) < 1e-3
    bn = disc.main[9]
    assert abs(bn.weight.mean().item() - 1.0) < 0.01 and 0.01 < bn.weight.std().item() < 0.03
    assert torch.all(bn.bias == 0)


def test_actnorm_data_dependent_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(norm="act").train()
    act = disc.main[3]
    assert isinstance(act, ActNorm) and act.initialized.item() == 0
    seen = {}
    act.register_forward_hook(lambda m, i, o: seen.update(out=o.detach().clone()))
    disc(torch.randn(4, 3, 64, 64))  # the hook clones: the following LeakyReLU works in place
    assert act.initialized.item() == 1
    per_channel = seen["out"].transpose(0, 1).reshape(seen["out"].shape[1], -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(per_channel.shape[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(per_channel.shape[0]), atol=1e-3, rtol=0)
    loc = act.loc.detach().clone()
    disc(torch.randn(4, 3, 64, 64) * 5)  # second batch: no re-initialisation
    assert torch.equal(act.loc, loc)
