"""Stage-1 objective: L1 + LPIPS reconstruction with a learned log-variance, KL, and a PatchGAN.

Rombach et al. 2022, Sec. 3.1 / App. G: the autoencoder is trained with a perceptual loss and a patch-based
adversarial objective, plus a small KL penalty towards N(0, I) ("KL-reg."). The reconstruction term is a
Laplace negative log-likelihood with one learned scalar log-variance, as in the released code:
    nll = |x - x̂|_lpips / exp(logvar) + logvar,     |x - x̂|_lpips = |x - x̂|_1 + w_p * LPIPS(x, x̂)
summed over pixels and averaged over the batch (so `kl_weight` 1e-6 has the paper's meaning).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.losses.gan import adaptive_weight, discriminator_loss, gate, generator_loss
from ldm.models.distributions import DiagonalGaussianDistribution


class AutoencoderLoss(nn.Module):
    """Holds what the stage-1 loss trains or freezes: the log-variance, the discriminator, the LPIPS net.

    Args:
        discriminator: PatchGAN, ``[B,3,H,W] -> [B,1,h,w]`` logits.
        perceptual: frozen LPIPS module ``(x, y) -> [B]`` on images in [-1, 1]; ``None`` disables it.
        disc_start: generator step at which the adversarial terms switch on (paper: 50001).
        kl_weight, perceptual_weight, disc_weight: term weights (paper: 1e-6, 1.0, 0.5).
        disc_factor: multiplier of the adversarial terms once active.
        disc_loss: ``"hinge"`` or ``"vanilla"``.
        logvar_init: initial value of the learned log-variance.
        adaptive: use VQGAN's adaptive generator weight (else a constant ``disc_weight``).
    """

    def __init__(
        self,
        discriminator: nn.Module,
        perceptual: nn.Module | None = None,
        disc_start: int = 50001,
        kl_weight: float = 1e-6,
        perceptual_weight: float = 1.0,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_loss: str = "hinge",
        logvar_init: float = 0.0,
        adaptive: bool = True,
    ) -> None:
        super().__init__()
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {disc_loss!r}")
        if perceptual is None and perceptual_weight > 0:
            raise ValueError("perceptual_weight > 0 needs a perceptual (LPIPS) module; set it or the weight to 0")
        self.discriminator = discriminator
        self.perceptual = perceptual
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self.disc_start = int(disc_start)
        self.kl_weight = kl_weight
        self.perceptual_weight = perceptual_weight
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.disc_loss = disc_loss
        self.adaptive = adaptive

    def discriminator_active(self, step: int) -> bool:
        return gate(step, self.disc_start, self.disc_factor) > 0

    def reconstruction(self, inputs: Tensor, recon: Tensor) -> Tensor:
        """Per-pixel |x - x̂| plus the broadcast per-image LPIPS, ``[B,3,H,W]``, float32."""
        inputs, recon = inputs.float(), recon.float()
        rec = (inputs - recon).abs()
        if self.perceptual is not None and self.perceptual_weight > 0:
            p = self.perceptual(inputs, recon).float().view(-1, 1, 1, 1)
            rec = rec + self.perceptual_weight * p
        return rec

    def generator_loss(
        self,
        inputs: Tensor,
        recon: Tensor,
        posterior: DiagonalGaussianDistribution,
        step: int,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder (generator) loss and its parts for logging.

        inputs, recon: ``[B,3,H,W]`` in [-1, 1]. ``last_layer`` is needed for the adaptive weight once the
        discriminator is active during training; without it ``disc_weight`` is used as is.
        """
        batch = inputs.shape[0]
        rec = self.reconstruction(inputs, recon)
        nll = rec / torch.exp(self.logvar) + self.logvar
        nll_loss = nll.sum() / batch
        kl = posterior.kl().float().sum() / batch
        loss = nll_loss + self.kl_weight * kl
        logs = {
            "rec_loss": rec.detach().mean(),
            "nll_loss": nll_loss.detach(),
            "kl": kl.detach(),
            "logvar": self.logvar.detach(),
        }
        factor = gate(step, self.disc_start, self.disc_factor)
        if factor > 0:
            logits_fake = self.discriminator(recon.contiguous())
            g_loss = generator_loss(logits_fake.float(), self.disc_loss)
            if self.adaptive and last_layer is not None and torch.is_grad_enabled():
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer) * self.disc_weight
            else:
                d_weight = torch.tensor(self.disc_weight, device=inputs.device)
            loss = loss + d_weight * factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight.detach())
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_step_loss(self, inputs: Tensor, recon: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator loss on real inputs vs. detached reconstructions; zero before ``disc_start``."""
        logits_real = self.discriminator(inputs.contiguous().detach()).float()
        logits_fake = self.discriminator(recon.contiguous().detach()).float()
        factor = gate(step, self.disc_start, self.disc_factor)
        d_loss = factor * discriminator_loss(logits_real, logits_fake, self.disc_loss)
        logs = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, logs
