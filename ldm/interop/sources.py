"""Readers of every supported source moved to ``ldm.checkpoint`` (``ldm/checkpoint/reading.py``), the one place
that reads checkpoints; these names stay importable from here for older code."""

from ldm.checkpoint.files import read_weights
from ldm.checkpoint.reading import (
    AE_TARGET,
    COMPVIS_AE,
    COMPVIS_COND,
    COMPVIS_UNET,
    EXPORT_FORMAT,
    EXPORT_KEY,
    EXPORT_META,
    UNET_TARGET,
    read_checkpoint,
)

__all__ = ["AE_TARGET", "COMPVIS_AE", "COMPVIS_COND", "COMPVIS_UNET", "EXPORT_FORMAT", "EXPORT_KEY", "EXPORT_META",
           "UNET_TARGET", "read_checkpoint", "read_weights"]
