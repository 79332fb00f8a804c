"""PatchGAN discriminator of the stage-1 autoencoder loss.

LDM (Rombach et al. 2022, Sec. 3.1) trains its first stage with "a patch-based adversarial objective", taken
from VQGAN (Esser et al. 2021), which in turn uses the pix2pix PatchGAN (Isola et al. 2017): a small fully
convolutional net whose output is a grid of logits, each judging one overlapping image patch (70x70 pixels
for n_layers=3). Layer indices inside ``main`` follow taming-transformers so its checkpoints load directly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NORMS = ("batch", "act", "none")


class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)`` with data-dependent initialisation (Glow, Kingma & Dhariwal 2018).

    On the first forward pass in training mode ``loc`` and ``scale`` are set so that this batch comes out with
    zero mean and unit (unbiased) std per channel; afterwards they are ordinary parameters. Unlike BatchNorm it
    keeps no batch statistics, so generator and discriminator batches never mix statistics. Note: under DDP
    every rank initialises from its own first batch (as in taming); broadcast the parameters if that matters.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        # A buffer, so that loading a checkpoint also marks the layer as initialised.
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        flat = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)  # [C, B*H*W]
        mean = flat.mean(dim=1)
        sq = flat.pow(2).mean(dim=1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every DDP rank must start from the same parameters: average the first-batch moments
            moments = torch.stack([mean, sq])
            torch.distributed.all_reduce(moments)
            mean, sq = moments / torch.distributed.get_world_size()
        std = (sq - mean.pow(2)).clamp_min(0).sqrt().view(1, -1, 1, 1)
        mean = mean.view(1, -1, 1, 1)
        self.loc.copy_(-mean)
        self.scale.copy_(1.0 / (std + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and int(self.initialized.item()) == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


def _make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "act":
        return ActNorm(channels)
    # Identity keeps the index layout of ``main`` identical across norm choices.
    return nn.Identity()


def init_patchgan_weights(module: nn.Module) -> None:
    """pix2pix / taming initialisation: conv weights ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02), bias 0.

    Conv biases keep PyTorch's default init and ActNorm keeps loc=0, scale=1 until its data-dependent init,
    exactly as in taming. Apply with ``model.apply(init_patchgan_weights)``.
    """
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def patchgan_min_input_size(n_layers: int) -> int:
    """Smallest image side for which an ``n_layers`` PatchGAN still yields a 1x1 logit map."""
    return 3 * 2**n_layers


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``[B, in_channels, H, W]`` (images in [-1, 1]) -> logits ``[B, 1, h, w]``.

    Layout: conv4x4/2 + LeakyReLU(0.2); ``n_layers - 1`` x [conv4x4/2, norm, LeakyReLU] doubling the width
    (capped at 8*ndf); one stride-1 [conv4x4, norm, LeakyReLU]; a final stride-1 conv4x4 to one channel.
    With padding 1, ``h = H // 2**n_layers - 2`` (30x30 for 256x256 and n_layers=3).

    Args:
        norm: "batch" (BatchNorm2d, taming default; convs before it have no bias), "act" (ActNorm, taming's
            ``use_actnorm=True``) or "none".
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
        if n_layers < 1 or ndf < 1:
            raise ValueError(f"n_layers and ndf must be >= 1, got n_layers={n_layers}, ndf={ndf}")
        self.in_channels = in_channels
        self.n_layers = n_layers
        use_bias = norm != "batch"  # BatchNorm's shift makes a conv bias redundant

        def act() -> nn.Module:
            return nn.LeakyReLU(0.2, inplace=True)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1), act()]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last of these keeps the resolution
            layers += [
                nn.Conv2d(width, out, kernel_size=4, stride=stride, padding=1, bias=use_bias),
                _make_norm(norm, out),
                act(),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(init_patchgan_weights)

    @property
    def min_input_size(self) -> int:
        """Smallest height/width that still yields a 1x1 logit map."""
        return patchgan_min_input_size(self.n_layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"input {x.shape[-2]}x{x.shape[-1]} is too small for a {self.n_layers}-layer PatchGAN; "
                f"use images of at least {self.min_input_size}x{self.min_input_size} or fewer n_layers"
            )
        return self.main(x)
