"""Adversarial losses for the stage-1 PatchGAN (pure functions).

The LDM autoencoder (Rombach et al. 2022, Sec. 3.1 and App. G) inherits its adversarial objective from
VQGAN (Esser et al. 2021, Eq. 7): the generator term is weighted by an *adaptive* factor that balances its
gradient against the reconstruction gradient at the decoder's last layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]). Returns a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating (BCE-with-logits) discriminator loss: 0.5 * (E[softplus(-D(x))] + E[softplus(D(G(z)))])."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(logits_fake: Tensor, kind: str = "hinge") -> Tensor:
    """Generator term. Hinge: -E[D(G(z))] (as in VQGAN/LDM); vanilla: E[softplus(-D(G(z)))]."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "vanilla":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; choose 'hinge' or 'vanilla'")


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: str = "hinge") -> Tensor:
    """Dispatch to the hinge or vanilla discriminator loss by name."""
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "vanilla":
        return vanilla_d_loss(logits_real, logits_fake)
    raise ValueError(f"unknown GAN loss {kind!r}; choose 'hinge' or 'vanilla'")


def adaptive_weight(
    rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4, eps: float = 1e-4
) -> Tensor:
    """VQGAN Eq. 7: lambda = ||grad_L(rec)|| / (||grad_L(g)|| + eps), clamped to [0, max_weight], detached.

    `last_layer` is the decoder's output conv weight. Both losses must still hold their graphs; the graphs are
    retained so the caller can back-propagate the total loss afterwards (which differentiates both losses once
    more: training takes the faster way of ``FirstStageLoss.generator_loss``, which this definition checks).
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return balance(rec_grad, g_grad, max_weight, eps)


def balance(rec_grad: Tensor, g_grad: Tensor, max_weight: float = 1e4, eps: float = 1e-4) -> Tensor:
    """VQGAN Eq. 7 from the two gradients at the last layer: ||rec_grad|| / (||g_grad|| + eps), clamped to
    [0, max_weight], in float32 (bf16/fp16 gradients must not underflow the ratio), detached."""
    weight = rec_grad.float().norm() / (g_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def gate(step: int, start: int, value: float = 1.0) -> float:
    """`value` once `step >= start`, else 0 (the discriminator is switched on at `disc_start`)."""
    return value if step >= start else 0.0
