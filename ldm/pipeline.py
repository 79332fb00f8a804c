"""Text (or class) to image with a trained latent diffusion model: encode the prompts, sample latents with
classifier-free guidance, undo the latent normalisation, decode with the frozen autoencoder.

Shared by ``sample.py``, the training-time sample grids and ``evaluate.py``; plain torch, no Lightning/Hydra.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ldm.diffusion.guidance import cfg_denoiser
from ldm.diffusion.samplers import SAMPLERS
from ldm.models.latent_stats import denormalize_latents
from ldm.models.text_encoders import no_labels_error
from ldm.models.tokenizers import to_device


@dataclass
class LatentDiffusion:
    """Everything needed to turn prompts into images.

    Attributes:
        unet: noise-prediction network ``unet(x_t, t, context=, context_mask=) -> raw output`` (EMA weights).
        text_encoder: condition encoder (``ldm.models.text_encoders``), frozen or trained with the U-Net.
        autoencoder: frozen stage-1 ``AutoencoderKL`` (its decoder turns latents into images).
        alphas_cumprod: ``[T]`` float64 noise schedule the U-Net was trained with.
        objective: what the U-Net predicts: ``"eps" | "v" | "x0"``.
        latent_stats: the autoencoder's latent statistics (``scale``, ``shift``, ``mean``, ``std``).
        latent_norm: ``"scale"`` or ``"channel"`` (see ``ldm.models.latent_stats.normalize_latents``).
        latent_shape: ``(C, h, w)`` of one latent.
        class_names: a class-conditional model's ``{label: name}`` (its cache's ``classes.json``), so that prompts may
            name classes; empty when the data named none.
    """

    unet: nn.Module
    text_encoder: nn.Module
    autoencoder: nn.Module
    alphas_cumprod: Tensor
    objective: str
    latent_stats: dict[str, Any]
    latent_norm: str
    latent_shape: tuple[int, int, int]
    class_names: dict[int, str] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> LatentDiffusion:
        for m in (self.unet, self.text_encoder, self.autoencoder):
            m.to(device)
        return self


def check_sampling(steps: Any, cfg_scale: Any, num_timesteps: int | None = None, steps_key: str = "steps",
                   scale_key: str = "cfg_scale") -> tuple[int, float]:
    """``(steps, cfg_scale)`` as the samplers take them, or a ValueError naming the setting and its range.

    ``steps``: a whole number of denoiser calls in [1, num_timesteps]. ``cfg_scale``: finite and >= 0, where
    0 samples unconditionally, 1 conditionally without guidance and > 1 with classifier-free guidance
    (``ldm.diffusion.guidance.cfg_denoiser``); a negative scale pushes samples away from their prompt. Entry
    points call this before loading a checkpoint, with the config keys the values came from.
    """
    whole = isinstance(steps, (int, float)) and not isinstance(steps, bool) and float(steps).is_integer()
    top = f" and at most the {num_timesteps} training timesteps" if num_timesteps is not None else ""
    if not whole or steps < 1 or (num_timesteps is not None and steps > num_timesteps):
        raise ValueError(f"{steps_key}={steps!r}: the number of sampler steps must be a whole number >= 1{top} "
                         f"(e.g. {steps_key}=50 for ddim, 25 for dpmpp_2m)")
    scale_ok = isinstance(cfg_scale, (int, float)) and not isinstance(cfg_scale, bool)
    if not scale_ok or not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"{scale_key}={cfg_scale!r}: the classifier-free guidance scale must be a finite number "
                         ">= 0 (0 = unconditional, 1 = conditional without guidance, > 1 = guided; the paper uses "
                         "1.5, Stable Diffusion 7.5)")
    return int(steps), float(cfg_scale)


def resolve_sampling(steps: Any, cfg_scale: Any, sampler_steps: Any, sampler_cfg_scale: Any) -> tuple[int, float]:
    """An entry point's ``steps`` / ``cfg_scale`` (None = the sampler config's ``sampler.steps`` /
    ``sampler.cfg_scale``), checked by ``check_sampling`` under the key each value came from."""
    return check_sampling(steps if steps is not None else sampler_steps,
                          cfg_scale if cfg_scale is not None else sampler_cfg_scale,
                          steps_key="steps" if steps is not None else "sampler.steps",
                          scale_key="cfg_scale" if cfg_scale is not None else "sampler.cfg_scale")


def condition_inputs(text_encoder: nn.Module, prompts: Sequence[Any], device: torch.device,
                     class_names: Mapping[int, str] | None = None) -> Any:
    """Prompts as the encoder wants them: a list of captions, or a LongTensor of class labels (a class model also
    takes the names of its classes, ``class_names``: label -> name)."""
    if getattr(text_encoder, "input_key", "caption") == "label":
        n = int(text_encoder.num_classes)
        by_name: dict[str, list[int]] = {}
        for label, name in sorted((class_names or {}).items()):
            if name is not None:
                by_name.setdefault(str(name), []).append(int(label))
        labels = []
        for p in prompts:  # a number is always an index (a class folder named "3" is reached by its index)
            try:
                labels.append(int(p))
                continue
            except (TypeError, ValueError):
                pass
            if len(by_name.get(str(p), [])) > 1:
                raise ValueError(f"class name {p!r} names classes {by_name[str(p)]}: give the index instead")
            if str(p) not in by_name:
                names = f" or class names ({', '.join(sorted(by_name, key=by_name.get))})" if by_name else ""
                raise ValueError(f"this model is class-conditional: prompts must be class indices 0..{n - 1}{names}, "
                                 f"got {list(prompts)!r}")
            labels.append(by_name[str(p)][0])
        if bad := [label for label in labels if not 0 <= label < n]:
            raise ValueError(f"class prompts {bad} are outside this model's classes 0..{n - 1} (its training data's "
                             "classes.json names them); guidance supplies the unconditional sample itself")
        return torch.tensor(labels, dtype=torch.long, device=device)
    return [str(p) for p in prompts]


def encode_condition(text_encoder: nn.Module, inputs: Any) -> dict[str, Tensor]:
    """``{"context": [B,L,D], "context_mask": [B,L] bool}`` for the encoder's inputs."""
    context, mask = text_encoder(inputs)
    return {"context": context, "context_mask": mask}


def training_condition(text_encoder: nn.Module, batch: dict[str, Any], keep: Tensor) -> dict[str, Tensor]:
    """The condition of a training batch, with the null condition where ``keep`` [B] is False (CFG dropout).

    Uses the text embeddings cached with the latents when the batch has them (``context``, ``context_mask``)
    and the encoder is frozen (``check_cache_compatible`` has made sure they are its own); a trainable encoder
    always runs on the batch's captions / labels, so that it learns and samples with what it was trained on.
    """
    n = keep.shape[0]
    if "context" in batch and not getattr(text_encoder, "trainable", False):
        cond = {"context": batch["context"], "context_mask": batch["context_mask"].bool()}
        null = encode_condition(text_encoder, text_encoder.null_inputs(1))
        length = max(cond["context"].shape[1], null["context"].shape[1])
        cond = {k: pad_tokens(v, length) for k, v in cond.items()}
        null = {k: pad_tokens(v, length).to(cond[k].dtype).expand(n, *cond[k].shape[1:]) for k, v in null.items()}
        return {k: torch.where(keep.view(n, *([1] * (cond[k].dim() - 1))), cond[k], null[k]) for k in cond}
    key = getattr(text_encoder, "input_key", "caption")
    if key not in batch:
        fields = [k for k in batch if k not in ("mean", "logvar", "image", "n_bad")]
        if key == "label":
            raise no_labels_error(fields)
        raise ValueError(f"the condition encoder {type(text_encoder).__name__} reads the batch field {key!r}, but "
                         f"the data has no such field (its samples have {sorted(fields)})")
    inputs = batch[key]
    null_inputs = text_encoder.null_inputs(n)
    if isinstance(inputs, Tensor):
        inputs = torch.where(keep, inputs, null_inputs.to(inputs.device))
    elif hasattr(text_encoder, "encode_tokens"):  # choose between caption and null tokens on the device: no host sync
        # one null row, broadcast: every encoder tokenizes each row on its own to a fixed length
        (ids, mask), (null_ids, null_mask) = text_encoder.tokenize(inputs), text_encoder.tokenize(null_inputs[:1])
        pick = keep.view(n, 1)
        ids = torch.where(pick, to_device(ids, keep.device), to_device(null_ids, keep.device))
        mask = torch.where(pick, to_device(mask, keep.device), to_device(null_mask, keep.device))
        context, mask = text_encoder.encode_tokens(ids, mask)
        return {"context": context, "context_mask": mask}
    else:
        inputs = [x if k else nx for x, k, nx in zip(inputs, keep.tolist(), null_inputs, strict=True)]
    return encode_condition(text_encoder, inputs)


def _unet_fn(unet: nn.Module) -> Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor]:
    return lambda x, t, cond: unet(x, t, context=cond["context"], context_mask=cond["context_mask"])


@torch.no_grad()
def generate(
    model: LatentDiffusion,
    prompts: Sequence[Any],
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 25,
    cfg_scale: float = 3.0,
    generator: torch.Generator,
    sampler_options: dict[str, Any] | None = None,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Images ``[N,3,H,W]`` in [-1, 1] for ``N = len(prompts)`` prompts (repeat a prompt to get several images).

    Deterministic given ``generator`` (on the model's device): the initial noise of every batch and any sampler
    noise are drawn from it in order. ``progress(n)`` is called after each batch with the number of images done.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    steps, cfg_scale = check_sampling(steps, cfg_scale, num_timesteps=len(model.alphas_cumprod))
    device = next(model.unet.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        n = len(chunk)
        cond_in = condition_inputs(model.text_encoder, chunk, device, model.class_names)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            cond = encode_condition(model.text_encoder, cond_in)
            uncond = encode_condition(model.text_encoder, model.text_encoder.null_inputs(n))
            length = max(cond["context"].shape[1], uncond["context"].shape[1])
            cond = {k: pad_tokens(v, length) for k, v in cond.items()}
            uncond = {k: pad_tokens(v, length) for k, v in uncond.items()}
            denoise = cfg_denoiser(_unet_fn(model.unet), model.objective, model.alphas_cumprod.to(device), cond,
                                   uncond, cfg_scale)
            x = torch.randn((n, *model.latent_shape), generator=generator, device=device)
            z = SAMPLERS[sampler](denoise, x, model.alphas_cumprod.to(device), steps, generator,
                                  **(sampler_options or {}))
            z = denormalize_latents(z.float(), model.latent_stats, model.latent_norm)
            images = model.autoencoder.decode(z)
        out.append(images.float().clamp(-1, 1))
        if progress is not None:
            progress(n)
    return torch.cat(out)


def pad_tokens(t: Tensor, length: int) -> Tensor:
    """Pad the token axis (dim 1) of a context [B,L,D] or mask [B,L] to ``length`` (mask padding is False)."""
    pad = length - t.shape[1]
    if pad <= 0:
        return t
    if t.dim() == 3:
        return torch.nn.functional.pad(t, (0, 0, 0, pad))
    return torch.nn.functional.pad(t, (0, pad), value=False)
