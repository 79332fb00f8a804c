"""The first stages of LDM (Rombach et al. 2022, Sec. 3.1, App. G): the KL-regularised autoencoder, the identity
(pixel space, the paper's LDM-1), and what every first stage shares (``FirstStage``: image checks, downsample factor, the decoder's last layer for the adaptive GAN
weight). The VQ-regularised one is in ``ldm.models.vq``; both build their encoder and decoder from
``ldm.models.convnet``.

Images are ``[B, in_channels, H, W]`` in [-1, 1]; latents are ``[B, embed_dim, H/f, W/f]`` with
``f = 2 ** (len(ch_mult) - 1)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ldm.models.convnet import Decoder, Encoder, Layout
from ldm.models.distributions import DiagonalGaussianDistribution


class FirstStage(nn.Module):
    """What stage 2, the cache and evaluation use of a first stage: ``encode(x)`` -> a posterior (``.mode()``,
    ``.sample(generator)``, ``.mean`` / ``.logvar``), ``decode(z)`` -> images, and the shapes in between.
    Subclasses set ``layout``, ``in_channels``, ``embed_dim`` and ``decoder``."""

    layout: Layout
    in_channels: int
    embed_dim: int
    decoder: nn.Module

    @property
    def ch_mult(self) -> tuple[int, ...]:
        return tuple(self.layout.ch_mult)

    @property
    def downsample_factor(self) -> int:
        """Spatial factor f between image and latent (4, 8, 16, 32 for the paper's presets)."""
        return self.layout.downsample_factor

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the diffusion model sees (``embed_dim``)."""
        return self.embed_dim

    def _check_image(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        f = self.downsample_factor
        height, width = x.shape[-2], x.shape[-1]
        if height % f != 0 or width % f != 0:
            down = (max(f, height // f * f), max(f, width // f * f))
            up = (-(-height // f) * f, -(-width // f) * f)
            raise ValueError(
                f"image size {height}x{width} is not divisible by the downsample factor {f}; "
                f"crop/resize to {down[0]}x{down[1]} or pad to {up[0]}x{up[1]}"
            )

    def _check_latent(self, z: Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"expected latents [B, {self.embed_dim}, h, w], got shape {tuple(z.shape)}")

    def get_last_layer(self) -> Tensor:
        """Weight of the decoder's output conv; the adaptive GAN weight (VQGAN Eq. 7) is taken there."""
        return self.decoder.conv_out.weight


class AutoencoderKL(FirstStage):
    """The KL-regularised first-stage autoencoder (LDM Sec. 3.1): x -> q(z|x) = N(mu, sigma^2) -> z -> x_hat.

    Arguments mirror the CompVis ``ddconfig`` plus ``embed_dim``; ``layout`` holds the encoder/decoder ones
    (``ldm.models.convnet.Layout``: ch, ch_mult, num_res_blocks, attn_resolutions, resolution, dropout).
    ``resolution`` is the nominal training resolution and only decides at which levels ``attn_resolutions``
    places attention; any input whose height and width are divisible by ``downsample_factor`` works.

    Shapes: images ``[B, in_channels, H, W]`` in [-1, 1]; latents ``[B, embed_dim, H/f, W/f]``.
    """

    def __init__(self, *, in_channels: int = 3, out_ch: int = 3, z_channels: int = 4, embed_dim: int = 4,
                 double_z: bool = True, **layout: Any) -> None:
        super().__init__()
        if not double_z:
            raise ValueError(
                "AutoencoderKL needs double_z=True: the encoder must predict both mean and log-variance"
            )
        if z_channels < 1 or embed_dim < 1:
            raise ValueError(f"z_channels and embed_dim must be >= 1, got {z_channels} and {embed_dim}")
        self.layout = Layout.of("AutoencoderKL", layout, ch_mult=(1, 2, 4, 4))
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.encoder = Encoder(self.layout, in_channels, 2 * z_channels)
        self.decoder = Decoder(self.layout, z_channels, out_ch)
        # 1x1 convs between the encoder/decoder width z_channels and the stored latent width embed_dim.
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        """Images ``[B, C, H, W]`` in [-1, 1] -> posterior over latents ``[B, embed_dim, H/f, W/f]``."""
        self._check_image(x)
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Latents ``[B, embed_dim, h, w]`` -> images ``[B, out_ch, h*f, w*f]`` (approximately [-1, 1])."""
        self._check_latent(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``x``: returns (reconstruction ``[B, out_ch, H, W]``, posterior).

        ``sample_posterior=False`` decodes the posterior mean (evaluation); ``generator`` seeds the sample.
        """
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class IdentityFirstStage(FirstStage):
    """Pixel space as a first stage (f = 1, the paper's LDM-1 in Fig. 6): ``encode`` gives the image itself as a
    point-mass posterior and ``decode`` returns its input. No parameters; stage 2 then diffuses pixels."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.layout = Layout(ch=32, ch_mult=(1,))  # f = 1; the widths are unused
        self.in_channels = self.embed_dim = int(in_channels)

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        self._check_image(x)
        return DiagonalGaussianDistribution.point_mass(x)

    def decode(self, z: Tensor) -> Tensor:
        self._check_latent(z)
        return z

    def forward(self, x: Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussianDistribution]:
        return x, self.encode(x)

    def get_last_layer(self) -> Tensor:
        raise ValueError("the identity first stage has no decoder to train: use it for stage 2 only "
                         "(autoencoder.pretrained=identity)")
