"""Stage-1 objectives: L1 + LPIPS reconstruction, a regulariser, and a PatchGAN with VQGAN's adaptive weight.

Rombach et al. 2022, Sec. 3.1 / App. G: the autoencoder is trained with a perceptual loss and a patch-based
adversarial objective, plus a regulariser of the latent:

- ``AutoencoderLoss`` (KL-reg., the released ``LPIPSWithDiscriminator``): the reconstruction term is a Laplace
  negative log-likelihood with one learned scalar log-variance,
  ``nll = |x - x̂|_lpips / exp(logvar) + logvar`` with ``|x - x̂|_lpips = |x - x̂|_1 + w_p * LPIPS(x, x̂)``,
  summed over pixels and averaged over the batch (so ``kl_weight`` 1e-6 has the paper's meaning), plus the KL
  towards N(0, I).
- ``VQAutoencoderLoss`` (VQ-reg., taming's ``VQLPIPSWithDiscriminator``): ``|x - x̂|_lpips`` averaged over pixels,
  plus ``codebook_weight`` times the quantiser's loss (``ldm.models.vq``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.losses.gan import balance, discriminator_loss, gate, generator_loss
from ldm.models.distributions import DiagonalGaussianDistribution
from ldm.models.vq import Quantized


class FirstStageLoss(nn.Module):
    """What both stage-1 losses share: the discriminator, the LPIPS net, the adversarial terms. Subclasses give
    ``fit(rec, regularised, batch) -> (reconstruction term, regulariser term, logs)``.

    Args:
        discriminator: PatchGAN, ``[B,3,H,W] -> [B,1,h,w]`` logits.
        perceptual: frozen LPIPS module ``(x, y) -> [B]`` on images in [-1, 1]; ``None`` disables it.
        disc_start: generator step at which the adversarial terms switch on (paper, KL-f8: 50001).
        perceptual_weight, disc_weight: term weights.
        disc_factor: multiplier of the adversarial terms once active.
        disc_loss: ``"hinge"`` or ``"vanilla"``.
        adaptive: use VQGAN's adaptive generator weight (else a constant ``disc_weight``).
    """

    def __init__(self, discriminator: nn.Module, perceptual: nn.Module | None, disc_start: int,
                 perceptual_weight: float, disc_weight: float, disc_factor: float, disc_loss: str,
                 adaptive: bool) -> None:
        super().__init__()
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {disc_loss!r}")
        if perceptual is None and perceptual_weight > 0:
            raise ValueError("perceptual_weight > 0 needs a perceptual (LPIPS) module; set it or the weight to 0")
        self.discriminator = discriminator
        self.perceptual = perceptual
        self.disc_start = int(disc_start)
        self.perceptual_weight = perceptual_weight
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.disc_loss = disc_loss
        self.adaptive = adaptive

    def generator_parameters(self) -> list[nn.Parameter]:
        """The loss's own parameters trained with the autoencoder (KL: the log-variance)."""
        return []

    def fit(self, rec: Tensor, regularised, batch: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        raise NotImplementedError

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
        regularised: DiagonalGaussianDistribution | Quantized,
        step: int,
        last_layer: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder (generator) loss and its parts for logging.

        inputs, recon: ``[B,3,H,W]`` in [-1, 1]; ``regularised``: the autoencoder's second output (the KL
        posterior, or what the quantiser did). ``last_layer`` is needed for the adaptive weight once the
        discriminator is active during training; without it ``disc_weight`` is used as is. ``grad_scale``: the
        AMP loss scale (16-mixed), by which the adaptive weight's gradients are taken so that fp16 does not
        underflow them.

        With the adaptive weight the returned loss is built so that one ``backward`` differentiates LPIPS and the
        discriminator once (``_adaptive_objective``); its value and gradients are those of the plain sum.
        """
        rec_in = recon.float()  # where the loss terms meet the decoder
        rec = self.reconstruction(inputs, rec_in)
        nll_loss, reg, logs = self.fit(rec, regularised, inputs.shape[0])
        loss = nll_loss + reg
        logs["rec_loss"] = rec.detach().mean()
        factor = gate(step, self.disc_start, self.disc_factor)
        if factor > 0:
            logits_fake = self.discriminator(rec_in.to(recon.dtype).contiguous())
            g_loss = generator_loss(logits_fake.float(), self.disc_loss)
            if self.adaptive and last_layer is not None and torch.is_grad_enabled():
                loss, d_weight = self._adaptive_objective(nll_loss, reg, g_loss, factor, rec_in, last_layer,
                                                          grad_scale)
            else:
                d_weight = torch.tensor(self.disc_weight, device=inputs.device)
                loss = loss + d_weight * factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight.detach())
        logs["loss"] = loss.detach()
        return loss, logs

    def _adaptive_objective(self, nll_loss: Tensor, reg: Tensor, g_loss: Tensor, factor: float, rec_in: Tensor,
                            last_layer: Tensor, grad_scale: Tensor | None) -> tuple[Tensor, Tensor]:
        """``nll + reg + w factor g`` with VQGAN's adaptive ``w = disc_weight * balance(grad_L nll, grad_L g)`` at the last
        layer L, as a loss whose one backward differentiates LPIPS and the discriminator once.

        Both terms reach the autoencoder only through ``rec_in`` (nll also through the loss's own parameters), so
        their gradients are taken there, each once; L's two gradients follow from differentiating the output conv
        alone. The returned loss has the sum's value, and its backward sends ``grad nll + w factor grad g`` into ``rec_in``
        (and the loss's parameters) and differentiates ``reg`` as usual. Differentiating each loss at L directly
        (``adaptive_weight``) and then the total would run LPIPS's and the discriminator's backward twice, and a
        decoder compiled as one graph three times. Returns ``(loss, w)``.
        """
        scale = 1.0 if grad_scale is None else grad_scale
        own = [p for p in self.generator_parameters() if p.requires_grad]
        nll_grads = torch.autograd.grad(nll_loss * scale, [rec_in, *own])  # frees LPIPS's graph, keeps the decoder's
        (g_grad,) = torch.autograd.grad(g_loss * scale, [rec_in])
        at_last = [torch.autograd.grad(rec_in, last_layer, grad, retain_graph=True)[0] / scale
                   for grad in (nll_grads[0], g_grad)]
        d_weight = balance(*at_last) * self.disc_weight
        into_rec = (nll_grads[0] + d_weight * factor * g_grad) / scale
        surrogate = (rec_in * into_rec).sum() + reg
        for p, grad in zip(own, nll_grads[1:], strict=True):
            surrogate = surrogate + (p * (grad / scale)).sum()
        value = nll_loss.detach() + reg.detach() + d_weight * factor * g_loss.detach()
        return surrogate - surrogate.detach() + value, d_weight

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


class AutoencoderLoss(FirstStageLoss):
    """KL-reg. (LDM's ``LPIPSWithDiscriminator``): the learned-log-variance NLL (summed over pixels) plus
    ``kl_weight`` KL; owns the log-variance. Paper values for KL-f8: disc_start 50001, kl 1e-6, disc weight 0.5.
    ``logvar_init``: initial value of the learned log-variance. Other arguments: ``FirstStageLoss``."""

    def __init__(self, discriminator: nn.Module, perceptual: nn.Module | None = None, disc_start: int = 50001,
                 kl_weight: float = 1e-6, perceptual_weight: float = 1.0, disc_weight: float = 0.5,
                 disc_factor: float = 1.0, disc_loss: str = "hinge", logvar_init: float = 0.0,
                 adaptive: bool = True) -> None:
        super().__init__(discriminator, perceptual, disc_start, perceptual_weight, disc_weight, disc_factor,
                         disc_loss, adaptive)
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self.kl_weight = kl_weight

    def generator_parameters(self) -> list[nn.Parameter]:
        return [self.logvar]

    def fit(self, rec: Tensor, posterior: DiagonalGaussianDistribution, batch: int):
        if not isinstance(posterior, DiagonalGaussianDistribution):
            raise TypeError(f"the KL loss needs a KL autoencoder's posterior, got {type(posterior).__name__}: "
                            "use loss=autoencoder_vq with a VQ autoencoder")
        nll_loss = (rec / torch.exp(self.logvar) + self.logvar).sum() / batch
        kl = posterior.kl().float().sum() / batch
        return nll_loss, self.kl_weight * kl, {"nll_loss": nll_loss.detach(), "kl": kl.detach(),
                                               "logvar": self.logvar.detach()}


class VQAutoencoderLoss(FirstStageLoss):
    """VQ-reg. (taming's ``VQLPIPSWithDiscriminator``): ``mean(|x - x̂| + w_p LPIPS)`` plus ``codebook_weight``
    times the quantiser's loss; logs its codebook and commitment terms, perplexity and codebook usage. Released
    VQ-f8 values: disc_start 1, disc weight 0.6, codebook weight 1.0. Other arguments: ``FirstStageLoss``."""

    def __init__(self, discriminator: nn.Module, perceptual: nn.Module | None = None, disc_start: int = 0,
                 codebook_weight: float = 1.0, perceptual_weight: float = 1.0, disc_weight: float = 0.75,
                 disc_factor: float = 1.0, disc_loss: str = "hinge", adaptive: bool = True) -> None:
        super().__init__(discriminator, perceptual, disc_start, perceptual_weight, disc_weight, disc_factor,
                         disc_loss, adaptive)
        if codebook_weight < 0:
            raise ValueError(f"codebook_weight must be >= 0, got {codebook_weight}")
        self.codebook_weight = codebook_weight

    def fit(self, rec: Tensor, quantized: Quantized, batch: int):
        if not isinstance(quantized, Quantized):
            raise TypeError(f"the VQ loss needs a VQ autoencoder's quantiser output, got {type(quantized).__name__}: "
                            "use loss=autoencoder with a KL autoencoder")
        nll_loss = rec.mean()
        return nll_loss, self.codebook_weight * quantized.loss, {
            "nll_loss": nll_loss.detach(), "quant_loss": quantized.loss.detach(),
            "codebook_loss": quantized.codebook_loss.detach(), "commitment_loss": quantized.commitment_loss.detach(),
            "perplexity": quantized.perplexity.detach(), "codebook_usage": quantized.usage.detach()}
