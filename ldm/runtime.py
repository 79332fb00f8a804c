"""Device, precision and dtypes: decided here, once, for every command.

- ``resolve_device``: ``auto`` = this rank's GPU (``LOCAL_RANK`` under torchrun / srun) when CUDA is there, else the
  CPU; ``cuda`` gets this rank's index; a CUDA device without CUDA is refused.
- ``autocast_dtype``: the autocast of a ``precision`` setting (``fp32`` | ``bf16`` | ``fp16`` | ``auto``); ``auto`` is
  bf16 on GPUs that have it where half precision is wanted (sampling, training), fp32 where it is not (latent
  caching, reconstruction metrics: ``half_on_auto=False``).
- ``auto_precision``: Lightning's precision string for ``trainer.precision=auto``.
- ``storage_dtype``: a dtype named in a config (``float32`` | ``float16`` | ``bfloat16``) for weights or cached
  tensors, with the names a caller allows.
- ``compile_options``: ``module.compile`` (false | true | a ``torch.compile`` mode) as ``Module.compile`` arguments.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from ldm.distributed import adopt_slurm_ranks

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_NAMES = ("auto", *AUTOCAST)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` = cuda:LOCAL_RANK when CUDA is available, else cpu; ``cuda`` gets this rank's index."""
    adopt_slurm_ranks()  # srun's ranks as torchrun's variables
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if str(name) == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available; use device=cpu (or device=auto)")
    return torch.device("cuda", local) if device.type == "cuda" and device.index is None else device


def bf16_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast_dtype(precision: str, device: torch.device, half_on_auto: bool = True) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: fp32, no autocast)."""
    precision = str(precision)
    if precision == "auto":
        return torch.bfloat16 if half_on_auto and bf16_available(device) else None
    if precision not in AUTOCAST:
        raise ValueError(f"precision={precision!r}: use {', '.join(PRECISION_NAMES)}")
    return AUTOCAST[precision]


def auto_precision(accelerator: str = "auto") -> str:
    """Lightning's precision for ``trainer.precision=auto``: bf16 autocast on GPUs that have it, fp16 autocast on
    older GPUs, fp32 on the CPU."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def storage_dtype(name: str, key: str = "dtype", allowed: Iterable[str] = tuple(DTYPES), why: str = "") -> torch.dtype:
    """The dtype called ``name`` by the config key ``key``, refused unless it is one of ``allowed``."""
    allowed = tuple(allowed)
    if name not in allowed:
        raise ValueError(f"{key}={name!r} is not supported; choose one of {list(allowed)}{why}")
    return DTYPES[name]


def compile_options(value: bool | str | None, key: str = "module.compile") -> dict | None:
    """``None`` for no compilation, else the keyword arguments of ``nn.Module.compile``: ``true`` is torch's default
    mode, a string names the mode (``max-autotune-no-cudagraphs`` autotunes the GEMM/convolution kernels,
    ``reduce-overhead`` replays CUDA graphs: for small models whose step the host's launches limit)."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    from torch._inductor import list_mode_options

    modes = list(list_mode_options())
    if str(value) not in modes:
        raise ValueError(f"{key}={value!r}: use false, true or one of torch.compile's modes {modes}")
    return {"mode": str(value)}


def keyed_generator(device: torch.device, seed: int, *key: int) -> torch.Generator:
    """A generator on ``device`` seeded by ``(seed, *key)``: the random draws of a training step are a pure
    function of the run's seed and the step's key (rank, step, micro-batch), so a resumed run draws exactly what
    an uninterrupted one would have drawn."""
    return torch.Generator(device=device).manual_seed(hash((seed, *key)) % 2**63)
