"""The VQ-regularised first stage (LDM's "VQ-reg.", Rombach et al. 2022, Sec. 3.1, Table 8): the VQGAN autoencoder
(Esser et al. 2021) with the vector quantiser of VQ-VAE (van den Oord et al. 2017).

``z_e = quant_conv(encoder(x))`` is replaced by its nearest codebook vector ``e_k``; the straight-through
estimator ``z_q = z_e + sg[e_k - z_e]`` passes the decoder's gradient to the encoder unchanged, and the quantiser's
loss pulls codes and encodings together:

- ``codebook = mean ||sg[z_e] - e_k||^2`` moves the codes (not used with an EMA codebook, which moves them itself:
  VQ-VAE App. A.1, each code becomes the running mean of the encodings assigned to it);
- ``commitment = mean ||z_e - sg[e_k]||^2`` keeps the encoder near its codes;
- ``loss = codebook + beta * commitment`` (VQ-VAE Eq. 3). ``legacy=True`` puts beta on the other term,
  ``commitment + beta * codebook``, as the quantiser the released LDM VQ models were trained with does
  (taming-transformers' ``VectorQuantizer2``, whose default is ``legacy=True``).

Stage 2 runs on the *pre-quantisation* latent ``z_e`` (``encode``), and ``decode`` quantises before decoding, as
the paper does ("the quantization layer is absorbed by the decoder", Sec. 3.1; CompVis ``VQModelInterface``):
the diffusion model sees a continuous latent, and whatever it generates is snapped onto the codebook. So the cache
stores ``z_e`` as a posterior with all mass on it (``DiagonalGaussianDistribution.point_mass``).

Dead codes: with ``restart_threshold > 0`` a code whose running assignment count (per batch) falls below it is
moved onto the encoding of the current batch that its nearest code represents worst (no random draw, so a resumed
run restarts the same codes); under DDP counts are summed over ranks and rank 0's codebook is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.autoencoder import FirstStage
from ldm.models.convnet import Decoder, Encoder, Layout
from ldm.models.distributions import DiagonalGaussianDistribution

_CHUNK = 8192  # encodings per distance matrix: [8192, K] float32 is 512 MiB for the paper's K = 16384


@dataclass
class Quantized:
    """What the quantiser did to a batch of latents ``[B, C, h, w]``."""

    z_q: Tensor  # straight-through quantised latents, [B, C, h, w]: forward value e_k, gradient to z_e
    indices: Tensor  # [B, h, w] code indices
    loss: Tensor  # the quantiser's training loss (scalar, float32)
    codebook_loss: Tensor  # mean ||sg[z_e] - e_k||^2 (0 with an EMA codebook)
    commitment_loss: Tensor  # mean ||z_e - sg[e_k]||^2
    perplexity: Tensor  # exp(entropy of the batch's code usage): how many codes it effectively used
    usage: Tensor  # fraction of the codebook the batch used


def nearest_codes(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest (Euclidean) code for each row of ``z`` [N, C] in ``codebook`` [K, C]; float32."""
    z, codebook = z.float(), codebook.float()
    norms = codebook.pow(2).sum(1)
    out = [(norms - 2 * chunk @ codebook.t()).argmin(1) for chunk in z.split(_CHUNK)]  # |z|^2 is the same per row
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation of ``[B, embed_dim, h, w]`` latents onto ``n_embed`` codes.

    Args:
        n_embed, embed_dim: codebook size |Z| and code width (Table 8's |Z| and c).
        beta: weight of the commitment term (0.25, VQ-VAE and the released models).
        legacy: ``commitment + beta * codebook`` as the released models (see the module docstring).
        ema_decay: move the codes as running means of their encodings with this decay (e.g. 0.99) instead of by
            gradient; the codebook then is no parameter and ``loss = beta * commitment``. ``None``: gradient.
        restart_threshold: restart codes assigned fewer times per batch than this (running mean); 0 = never.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = False,
                 ema_decay: float | None = None, restart_threshold: float = 0.0) -> None:
        super().__init__()
        if n_embed < 2 or embed_dim < 1:
            raise ValueError(f"n_embed must be >= 2 and embed_dim >= 1, got {n_embed} and {embed_dim}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {ema_decay}")
        if beta < 0 or restart_threshold < 0:
            raise ValueError(f"beta and restart_threshold must be >= 0, got {beta} and {restart_threshold}")
        self.n_embed, self.embed_dim, self.beta, self.legacy = int(n_embed), int(embed_dim), float(beta), legacy
        self.ema_decay, self.restart_threshold = ema_decay, float(restart_threshold)
        self.embedding = nn.Embedding(self.n_embed, self.embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / self.n_embed, 1.0 / self.n_embed)  # as the released code
        # running assignment counts (and, for EMA, sums) exist only when used: the paper's presets keep the
        # released key layout (quantize.embedding.weight only)
        if ema_decay is not None or self.restart_threshold > 0:
            self.register_buffer("cluster_size", torch.ones(self.n_embed))
        if ema_decay is not None:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())

    @property
    def codebook(self) -> Tensor:
        return self.embedding.weight

    def forward(self, z: Tensor) -> Quantized:
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"expected latents [B, {self.embed_dim}, h, w], got shape {tuple(z.shape)}")
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        indices = nearest_codes(flat.detach(), self.codebook)
        counts = torch.bincount(indices, minlength=self.n_embed).float()
        if self.training and torch.is_grad_enabled():
            self._update_codebook(flat.detach().float(), indices, counts)
        e = F.embedding(indices, self.codebook).view(b, h, w, c).permute(0, 3, 1, 2).to(z.dtype)
        commitment = F.mse_loss(z.float(), e.detach().float())
        if self.ema_decay is not None:
            codebook_loss = torch.zeros((), device=z.device)
            loss = self.beta * commitment
        else:
            codebook_loss = F.mse_loss(e.float(), z.detach().float())
            loss = commitment + self.beta * codebook_loss if self.legacy else codebook_loss + self.beta * commitment
        probs = counts / counts.sum().clamp_min(1.0)
        return Quantized(
            z_q=z + (e - z).detach(), indices=indices.view(b, h, w), loss=loss, codebook_loss=codebook_loss,
            commitment_loss=commitment, perplexity=torch.exp(-(probs * torch.log(probs + 1e-10)).sum()),
            usage=(counts > 0).float().mean(),
        )

    @torch.no_grad()
    def _update_codebook(self, flat: Tensor, indices: Tensor, counts: Tensor) -> None:
        """EMA codebook step and dead-code restarts; a batch with non-finite latents changes nothing (decided on
        the device, no host sync)."""
        if not hasattr(self, "cluster_size"):
            return
        world = _world()
        sums = torch.zeros(self.n_embed, self.embed_dim, device=flat.device).index_add_(0, indices, flat)
        if world > 1:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        ok = torch.isfinite(sums).all()
        decay = self.ema_decay if self.ema_decay is not None else 0.99
        size = torch.where(ok, decay * self.cluster_size + (1 - decay) * counts, self.cluster_size)
        weight = self.codebook.detach().float()
        if self.ema_decay is not None:
            embed_sum = torch.where(ok, decay * self.embed_sum + (1 - decay) * sums, self.embed_sum)
            # a code nobody used for long keeps its vector instead of dividing by a vanishing count
            weight = torch.where((size > 1e-5)[:, None], embed_sum / size.clamp_min(1e-5)[:, None], weight)
            self.embed_sum.copy_(embed_sum)
        if self.restart_threshold > 0:
            weight, size = self._restart(flat, weight, size, ok)
            if world > 1:  # candidates came from each rank's own batch: rank 0's win, before anything derives from them
                dist.broadcast(weight, src=0)
            if self.ema_decay is not None:
                self.embed_sum.copy_(torch.where((size == 1.0)[:, None], weight * size[:, None], self.embed_sum))
        self.cluster_size.copy_(size)
        self.codebook.data.copy_(weight.to(self.codebook.dtype))

    def _restart(self, flat: Tensor, weight: Tensor, size: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
        """Dead codes (running count < threshold) take the encodings farthest from their nearest code, worst first
        (cycling when there are more dead codes than encodings); their count restarts at 1."""
        dead = (size < self.restart_threshold) & ok & (flat.shape[0] > 0)
        if flat.shape[0] == 0:
            return weight, size
        nearest = weight[nearest_codes(flat, weight)]
        worst = (flat - nearest).pow(2).sum(1).argsort(descending=True)
        rank = (torch.cumsum(dead.long(), 0) - 1).clamp_min(0) % flat.shape[0]
        weight = torch.where(dead[:, None], flat[worst[rank]], weight)
        return weight, torch.where(dead, torch.ones_like(size), size)


class VQModel(FirstStage):
    """VQ-regularised autoencoder: x -> z_e = quant_conv(encoder(x)) -> nearest codes -> decoder.

    Arguments are the CompVis ``VQModel``'s (``ddconfig`` plus ``embed_dim``, ``n_embed``; ``layout``: the
    encoder/decoder ones, ``ldm.models.convnet.Layout``) and the quantiser's (``beta``, ``legacy``,
    ``ema_decay``, ``restart_threshold``: ``VectorQuantizer``). State-dict keys are the
    released ones (``encoder.``, ``quant_conv.``, ``quantize.embedding.weight``, ``post_quant_conv.``,
    ``decoder.``). ``encode`` gives the pre-quantisation latent (as a point-mass posterior), ``decode`` quantises.
    """

    def __init__(self, *, in_channels: int = 3, out_ch: int = 3, z_channels: int = 4, embed_dim: int = 4,
                 n_embed: int = 16384, beta: float = 0.25, legacy: bool = False, ema_decay: float | None = None,
                 restart_threshold: float = 0.0, double_z: bool = False, **layout: Any) -> None:
        super().__init__()
        if double_z:
            raise ValueError("VQModel needs double_z=False: its encoder predicts the latent itself, not moments")
        if z_channels < 1 or embed_dim < 1:
            raise ValueError(f"z_channels and embed_dim must be >= 1, got {z_channels} and {embed_dim}")
        self.layout = Layout.of("VQModel", layout, ch_mult=(1, 2, 2, 4))
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.encoder = Encoder(self.layout, in_channels, z_channels)
        self.decoder = Decoder(self.layout, z_channels, out_ch)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, kernel_size=1)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta, legacy, ema_decay, restart_threshold)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        """Images ``[B, C, H, W]`` in [-1, 1] -> the pre-quantisation latent ``[B, embed_dim, H/f, W/f]`` as a
        point-mass posterior (``.mode()`` and ``.sample()`` both give it)."""
        self._check_image(x)
        return DiagonalGaussianDistribution.point_mass(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Latents ``[B, embed_dim, h, w]`` -> quantised -> images ``[B, out_ch, h*f, w*f]``."""
        self._check_latent(z)
        return self.decoder(self.post_quant_conv(self.quantize(z).z_q))

    def forward(self, x: Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, Quantized]:
        """Reconstruct ``x``: returns (reconstruction ``[B, out_ch, H, W]``, what the quantiser did). The
        encoder is deterministic: ``sample_posterior`` and ``generator`` are accepted for the common interface."""
        quantized = self.quantize(self.encode(x).mean)
        return self.decoder(self.post_quant_conv(quantized.z_q)), quantized
