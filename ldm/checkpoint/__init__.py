"""The one place that reads checkpoints and weight files of any origin, and builds models from them, safely.

- ``files``: the only ``torch.load`` (always ``weights_only=True``; a pickle that names code is a ValueError naming
  the file) and the only safetensors reads of model weights.
- ``reading``: files of every origin (our ``.ckpt``, our exports, CompVis / SD single files, diffusers folders)
  as our checkpoint dict ``{"state_dict", "ldm"}``; a stored config is checked against the registry when read.
- ``registry``: the explicit ``_target_`` -> class registry; ``instantiate`` builds registered targets only and
  refuses anything else naming the key path and the file.
- ``building``: models from a checkpoint dict or path (``build_*``) or any source (``load_*``), strict loads, and
  the latent statistics of a stage-1 checkpoint (``measure_latent_stats``, ``with_latent_stats``).

Format-specific names and architectures stay in ``ldm.interop.keymaps`` / ``ldm.interop.configs``; presets by name
(YAML, so Hydra) are resolved in ``ldm.export``.
"""

from ldm.checkpoint.building import (
    add_latent_stats,
    architecture,
    build_autoencoder,
    build_latent_diffusion,
    build_unet,
    load_autoencoder,
    load_latent_diffusion,
    load_unet,
    measure_latent_stats,
    strict_load,
    with_latent_stats,
)
from ldm.checkpoint.files import (
    NO_CODE,
    TORCH_SUFFIXES,
    atomic_torch_save,
    load_safetensors,
    load_torch_file,
    read_weights,
)
from ldm.checkpoint.reading import (
    AE_TARGET,
    COMPVIS_AE,
    COMPVIS_COND,
    COMPVIS_UNET,
    EXPORT_FORMAT,
    EXPORT_KEY,
    EXPORT_META,
    PIXEL_SPACE,
    UNET_TARGET,
    load_checkpoint,
    read_checkpoint,
    read_stage1_checkpoint,
    source_missing,
    submodule_state,
)
from ldm.checkpoint.registry import (
    HYDRA_KEYS,
    MOVED_TARGETS,
    RECORDED_ONLY,
    REGISTRY,
    TORCH_TARGETS,
    check_spec,
    check_stored_config,
    instantiate,
)

__all__ = [
    "AE_TARGET", "COMPVIS_AE", "COMPVIS_COND", "COMPVIS_UNET", "EXPORT_FORMAT", "EXPORT_KEY", "EXPORT_META",
    "HYDRA_KEYS", "MOVED_TARGETS", "NO_CODE", "PIXEL_SPACE", "RECORDED_ONLY", "REGISTRY", "TORCH_SUFFIXES",
    "TORCH_TARGETS", "UNET_TARGET", "add_latent_stats", "architecture", "atomic_torch_save",
    "build_autoencoder", "build_latent_diffusion", "build_unet", "check_spec", "check_stored_config",
    "instantiate", "load_autoencoder", "load_checkpoint", "load_latent_diffusion", "load_safetensors",
    "load_torch_file", "load_unet", "measure_latent_stats", "read_checkpoint", "read_stage1_checkpoint",
    "read_weights", "source_missing", "strict_load", "submodule_state", "with_latent_stats",
]
