"""Stage-1 adversarial and reconstruction terms on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ldm.losses.autoencoder import AutoencoderLoss
from ldm.losses.gan import (
    adaptive_weight,
    discriminator_loss,
    gate,
    generator_loss,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldm.models.distributions import DiagonalGaussianDistribution


def test_hinge_d_loss_by_hand():
    real = torch.tensor([2.0, 0.5])  # relu(1-2)=0, relu(1-0.5)=0.5 -> mean 0.25
    fake = torch.tensor([-2.0, 0.5])  # relu(1-2)=0, relu(1+0.5)=1.5 -> mean 0.75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.5)


def test_vanilla_d_loss_by_hand():
    real, fake = torch.tensor([0.0, 1.0]), torch.tensor([0.0, -1.0])
    sp = lambda v: math.log1p(math.exp(v))
    expected = 0.5 * ((sp(0) + sp(-1)) / 2 + (sp(0) + sp(-1)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)


def test_generator_losses():
    fake = torch.tensor([1.0, -3.0])
    assert generator_loss(fake, "hinge").item() == pytest.approx(1.0)
    assert generator_loss(fake, "vanilla").item() == pytest.approx(
        (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(3.0))) / 2, rel=1e-6
    )
    with pytest.raises(ValueError, match="hinge"):
        generator_loss(fake, "wgan")


def test_adaptive_weight_is_ratio_of_gradient_norms():
    w = nn.Parameter(torch.ones(2, 2))
    rec = 3.0 * w.sum()  # d/dw = 3 everywhere -> ||.|| = 3 * 2 = 6
    g = 0.5 * w.sum()  # d/dw = 0.5 everywhere -> ||.|| = 1
    weight = adaptive_weight(rec, g, w)
    assert weight.item() == pytest.approx(6.0 / (1.0 + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    # clamped at max_weight
    assert adaptive_weight(3.0 * w.sum(), 1e-9 * w.sum(), w, max_weight=10.0).item() == 10.0


def test_gate():
    assert gate(9, 10) == 0.0 and gate(10, 10) == 1.0 and gate(11, 10, 0.5) == 0.5


class _ConstDisc(nn.Module):
    """Discriminator whose logits are the per-image mean of its input (differentiable, no parameters)."""

    def forward(self, x):
        return x.mean(dim=(1, 2, 3), keepdim=True)


def _posterior(mean: float, logvar: float, shape=(2, 4, 2, 2)):
    return DiagonalGaussianDistribution(torch.cat([torch.full(shape, mean), torch.full(shape, logvar)], 1))


def test_autoencoder_loss_before_disc_start_by_hand():
    loss_fn = AutoencoderLoss(_ConstDisc(), perceptual=None, perceptual_weight=0.0, disc_start=10, kl_weight=0.5,
                              logvar_init=math.log(2.0))
    x = torch.zeros(2, 3, 4, 4)
    recon = torch.full_like(x, 0.5)
    post = _posterior(1.0, 0.0)
    loss, logs = loss_fn.generator_loss(x, recon, post, step=0)
    # nll per pixel = 0.5 / 2 + log 2, summed over 3*4*4 pixels (per image, averaged over batch)
    nll = 48 * (0.25 + math.log(2.0))
    # KL per image = 0.5 * sum(mu^2 + var - 1 - logvar) = 0.5 * 16 * 1 = 8
    assert logs["kl"].item() == pytest.approx(8.0)
    assert loss.item() == pytest.approx(nll + 0.5 * 8.0, rel=1e-6)
    assert "g_loss" not in logs


def test_autoencoder_loss_after_disc_start_uses_adaptive_weight():
    loss_fn = AutoencoderLoss(_ConstDisc(), perceptual=None, perceptual_weight=0.0, disc_start=0, disc_weight=0.5)
    last = nn.Parameter(torch.ones(3, 3, 1, 1))
    x = torch.zeros(1, 3, 4, 4)
    recon = nn.functional.conv2d(torch.ones(1, 3, 4, 4), last)  # depends on `last`
    loss, logs = loss_fn.generator_loss(x, recon, _posterior(0.0, 0.0, (1, 4, 1, 1)), step=0, last_layer=last)
    expected_w = adaptive_weight(loss_fn.reconstruction(x, recon).sum() / 1, -recon.mean(), last) * 0.5
    assert logs["d_weight"].item() == pytest.approx(expected_w.item(), rel=1e-5)
    assert logs["g_loss"].item() == pytest.approx(-3.0)
    d_loss, dlogs = loss_fn.discriminator_step_loss(x, recon, step=0)
    # real logits 0 -> relu(1)=1; fake logits 3 -> relu(4)=4; hinge = 0.5 * 5
    assert d_loss.item() == pytest.approx(2.5)
    assert dlogs["logits_fake"].item() == pytest.approx(3.0)


def test_loss_rejects_bad_settings():
    with pytest.raises(ValueError, match="disc_loss"):
        AutoencoderLoss(_ConstDisc(), perceptual=None, perceptual_weight=0.0, disc_loss="wgan")
    with pytest.raises(ValueError, match="perceptual"):
        AutoencoderLoss(_ConstDisc(), perceptual=None, perceptual_weight=1.0)


class _FrozenPerceptual(nn.Module):
    """A small frozen conv net standing in for LPIPS ``(x, y) -> [B]`` (the identity holds for any such net)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.requires_grad_(False)

    def forward(self, x, y):
        return (self.net(x) - self.net(y)).pow(2).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("scale", [None, 1024.0])
def test_one_backward_objective_equals_adaptive_weight_and_plain_backward(kind, scale):
    """Training's loss (LPIPS and the discriminator differentiated once) has the value and the gradients of the
    reference: VQGAN's weight from two gradients at the last layer, then the backward of the plain sum. A loss
    scale (16-mixed) changes nothing."""
    from ldm.losses.autoencoder import VQAutoencoderLoss
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.discriminator import NLayerDiscriminator
    from ldm.models.vq import VQModel

    torch.manual_seed(0)
    if kind == "kl":
        model = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16, z_channels=4, embed_dim=4)
        loss = AutoencoderLoss(NLayerDiscriminator(ndf=8, n_layers=2), _FrozenPerceptual(), disc_start=0, disc_weight=0.5, kl_weight=0.1,
                               logvar_init=0.3)
    else:
        model = VQModel(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=16, z_channels=4, embed_dim=4, n_embed=16)
        loss = VQAutoencoderLoss(NLayerDiscriminator(ndf=8, n_layers=2), _FrozenPerceptual(), disc_start=0,
                                 disc_weight=0.6)
    loss.discriminator.requires_grad_(False)  # as the generator step toggles it
    params = [p for p in model.parameters() if p.requires_grad] + loss.generator_parameters()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    last = model.get_last_layer()

    def forward():
        gen = torch.Generator().manual_seed(3)
        return model(x, generator=gen) if kind == "kl" else model(x)

    recon, reg = forward()
    nll, reg_term, _ = loss.fit(loss.reconstruction(x, recon), reg, x.shape[0])
    g = generator_loss(loss.discriminator(recon), "hinge")
    weight = adaptive_weight(nll, g, last) * loss.disc_weight
    reference = nll + reg_term + weight * 0.5 * g  # disc_factor 0.5 below
    ref_grads = torch.autograd.grad(reference, params)

    loss.disc_factor = 0.5
    recon, reg = forward()
    total, logs = loss.generator_loss(x, recon, reg, step=0, last_layer=last,
                                      grad_scale=None if scale is None else torch.tensor(scale))
    grads = torch.autograd.grad(total, params)
    assert total.item() == pytest.approx(reference.item(), rel=1e-6)
    assert logs["d_weight"].item() == pytest.approx(weight.item(), rel=1e-5)
    noise = 1e-6 * max(b.abs().max() for b in ref_grads)  # biases before a GroupNorm: zero but for rounding
    for p, a, b in zip(params, grads, ref_grads, strict=True):  # fp32 rounding of two summation orders
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + noise, p.shape
    assert any(gr.abs().sum() > 0 for gr in grads[-3:])  # the last layers and (KL) the log-variance learn
