"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", arXiv 1801.03924, Eq. 1), version 0.1 as in the `lpips` package with its defaults.

    d(x, y) = sum_l  mean_{h,w}  w_l · (f̂_l(x) - f̂_l(y))²,     f̂ = f / (||f||_channels + 1e-10)

f_l are the ReLU outputs that end five stages of an ImageNet VGG16/AlexNet, w_l the learned non-negative
channel weights ("lin" 1x1 convs). Rombach et al. 2022 (Sec. 3.1) train the autoencoder with this loss.
The module here is architecture only; :func:`build_lpips` loads the weights (see ``ldm.pretrained``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.pretrained import canonical_net, load_lpips_backbone, lpips_linear_state_dict

_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_features() -> nn.Sequential:
    """VGG16 conv trunk with torchvision's ``features`` indices (31 modules), so ``features.N.*`` weights load.

    Maps ``[B, 3, H, W]`` (ImageNet-normalised) to ``[B, 512, H/32, W/32]``. Built here rather than via
    ``torchvision.models.vgg16()`` to skip allocating and initialising its 120M-parameter classifier.
    """
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c_in = int(v)
    return nn.Sequential(*layers)


def alexnet_features() -> nn.Sequential:
    """AlexNet conv trunk with torchvision's ``features`` indices (13 modules): ``[B,3,H,W] -> [B,256,h,w]``."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


# Per backbone: trunk builder, index one past each tapped ReLU (lpips' slice ends), tap channels, and the
# smallest input side that still leaves a >= 1x1 map at the last tap.
_NETS = {
    "vgg16": (vgg16_features, (4, 9, 16, 23, 30), (64, 128, 256, 512, 512), 16),
    "alexnet": (alexnet_features, (2, 5, 8, 10, 12), (64, 192, 384, 256, 256), 31),
}


def lpips_min_input_size(net: str) -> int:
    """Smallest image side LPIPS with backbone ``net`` ("vgg"/"alex" or their long names) accepts."""
    return _NETS[canonical_net(net)][3]


def _unit_channels(f: Tensor, eps: float = 1e-10) -> Tensor:
    # lpips.normalize_tensor: eps is added to the norm, not inside the sqrt.
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS v0.1: ``forward(x, y) -> [B]`` for images ``[B, 3, H, W]`` in [-1, 1].

    Always in eval mode with ``requires_grad=False`` parameters; gradients still flow to the inputs, so it
    serves as a training loss. Under autocast the trunk runs in the autocast dtype while the feature
    normalisation, differences and heads run in fp32.

    Args:
        net: ``"vgg"`` (VGG16, the LDM default) or ``"alex"`` (AlexNet, lpips' default; faster).
    """

    def __init__(self, net: str = "vgg") -> None:
        super().__init__()
        self.net = canonical_net(net)
        build, self.tap_ends, channels, self.min_size = _NETS[self.net]
        self.features = build()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in channels)
        # lpips' ScalingLayer: [-1,1] input -> roughly ImageNet mean/std normalised. Constants, not weights.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.weights_source = "random init (use build_lpips for the pretrained metric)"
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # A frozen metric: a parent's .train() must not switch it (no dropout/BN to toggle, by design).
        return super().train(False)

    def _taps(self, h: Tensor) -> list[Tensor]:
        taps, start = [], 0
        for end in self.tap_ends:
            for i in range(start, end):
                h = self.features[i](h)
            taps.append(h)
            start = end
        return taps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y: ``[B, 3, H, W]`` in [-1, 1], ``H, W >= min_size``. Returns per-image distances ``[B]`` fp32."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape != y.shape:
            raise ValueError(f"LPIPS takes two [B, 3, H, W] image batches of equal shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"LPIPS-{self.net} needs images of at least {self.min_size}x{self.min_size}, got "
                             f"{tuple(x.shape[-2:])}; upsample the inputs or use the other backbone")
        batch = x.shape[0]
        both = (torch.cat([x, y]).float() - self.shift) / self.scale
        feats = self._taps(both.to(self.features[0].weight.dtype))  # one trunk pass for x and y together
        with torch.autocast(device_type=x.device.type, enabled=False):
            total = x.new_zeros(batch, dtype=torch.float32)
            for f, lin in zip(feats, self.lins, strict=True):
                f = _unit_channels(f.float())
                diff = (f[:batch] - f[batch:]).pow(2)
                total = total + F.conv2d(diff, lin.weight.float()).mean(dim=(1, 2, 3))
        return total


def build_lpips(net: str = "vgg") -> LPIPS:
    """LPIPS with ImageNet trunk weights (``ldm.pretrained``) and the lpips package's v0.1 heads, on CPU."""
    model = LPIPS(net=net)
    backbone, meta = load_lpips_backbone(model.net)
    model.load_state_dict({**backbone, **lpips_linear_state_dict(model.net)}, strict=True)
    model.weights_source = meta.get("source", "unknown")
    return model
