"""What a stored config may build: an explicit registry of ldm's model classes, by exact ``_target_`` string.

A checkpoint stores the run's resolved config, and sample.py, evaluate.py, the cache, export and stage-2 training
rebuild the models from it. ``instantiate`` builds only registered targets, recursively; any other ``_target_``
(``os.system``, ``torch.fx.graph_module._exec_with_source``, a class of ours that is not a model) and Hydra's
special keys (``_partial_``, ``_args_``, ``_recursive_``, ``_convert_``) are refused with a ValueError that names
the key path and the file, before anything is built. Optimizers, schedulers, data modules, trainers and the
stage-1 loss are never rebuilt from a checkpoint, so they are not registered.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from ldm.losses.diffusion import DiffusionLoss
from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage
from ldm.models.text_encoders import ClassEncoder, NullEncoder, TransformerTextEncoder
from ldm.models.unet import UNetModel
from ldm.models.vq import VQModel
from ldm.pretrained.hf_text import hf_text_encoder, minilm_text_encoder

# torch classes a stored *model* config may name, by exact name. The shipped presets (configs/autoencoder, unet,
# text_encoder, loss/diffusion) name none: the only torch targets in configs/ are optimizers and LR schedulers.
TORCH_TARGETS: dict[str, Callable[..., Any]] = {}

REGISTRY: dict[str, Callable[..., Any]] = {
    "ldm.models.autoencoder.AutoencoderKL": AutoencoderKL,
    "ldm.models.autoencoder.IdentityFirstStage": IdentityFirstStage,
    "ldm.models.vq.VQModel": VQModel,
    "ldm.models.unet.UNetModel": UNetModel,
    "ldm.models.text_encoders.TransformerTextEncoder": TransformerTextEncoder,
    "ldm.models.text_encoders.ClassEncoder": ClassEncoder,
    "ldm.models.text_encoders.NullEncoder": NullEncoder,
    "ldm.pretrained.hf_text.hf_text_encoder": hf_text_encoder,  # frozen encoders: loaded by these functions
    "ldm.pretrained.hf_text.minilm_text_encoder": minilm_text_encoder,
    "ldm.losses.diffusion.DiffusionLoss": DiffusionLoss,  # stage 2: schedule and objective of sampling
    **TORCH_TARGETS,
}
# Targets that moved: configs stored by older ldm name the same models by these (the frozen text encoders'
# former classes, which loaded their weights in the constructor; hf_text.py before it was split off)
MOVED_TARGETS = {
    "ldm.models.hf_text.HFTextEncoder": "ldm.pretrained.hf_text.hf_text_encoder",
    "ldm.models.text_encoders.HFTextEncoder": "ldm.pretrained.hf_text.hf_text_encoder",
    "ldm.models.hf_text.MiniLMEncoder": "ldm.pretrained.hf_text.minilm_text_encoder",
    "ldm.models.text_encoders.MiniLMEncoder": "ldm.pretrained.hf_text.minilm_text_encoder",
}
REGISTRY.update({old: REGISTRY[new] for old, new in MOVED_TARGETS.items()})

# Targets a stored config holds in a section ldm never builds from a checkpoint: the stage-1 loss (configs/loss/
# autoencoder.yaml), which only training builds, from the user's config. A stage-1 checkpoint may name these in
# `config.loss` and nothing else there; they are not buildable (build_lpips may fetch weights).
RECORDED_ONLY = frozenset({
    "ldm.losses.autoencoder.AutoencoderLoss", "ldm.losses.autoencoder.VQAutoencoderLoss", "ldm.losses.lpips.build_lpips",
    "ldm.models.discriminator.NLayerDiscriminator",
})

# Hydra's keys that change what a `_target_` does (a partial instead of an object, positional arguments, unbuilt
# children, container conversion): none of ldm's models needs them, and each could smuggle a call past the registry.
HYDRA_KEYS = ("_partial_", "_args_", "_recursive_", "_convert_")


def _refuse(what: str, key: str, origin: str) -> ValueError:
    return ValueError(f"refusing to build {what} (key {key} in {origin}): only ldm's registered classes can be "
                      f"built from a checkpoint: {', '.join(sorted(REGISTRY))}")


def check_spec(spec: Any, *, key: str = "config", origin: str = "this config",
               allowed: Collection[str] | None = None) -> None:
    """Raise a ValueError unless every ``_target_`` anywhere in ``spec`` (mappings and lists, at any depth) is a
    registered one (or in ``allowed``, default ``REGISTRY``), and no mapping uses Hydra's special keys or another
    ``_``-key beside a ``_target_``.

    ``key``: the key path of ``spec`` in its file (e.g. ``config.unet``); ``origin``: the file (for the message).
    """
    allowed = REGISTRY if allowed is None else allowed
    if isinstance(spec, Mapping):
        for k in spec:
            if k in HYDRA_KEYS:
                raise _refuse(f"{spec.get('_target_', 'a config')!r} with {k}", f"{key}.{k}", origin)
        if "_target_" in spec:
            target = spec["_target_"]
            if not isinstance(target, str) or target not in allowed:
                raise _refuse(repr(target), f"{key}._target_", origin)
            others = [k for k in spec if isinstance(k, str) and k.startswith("_") and k != "_target_"]
            if others:
                raise _refuse(f"{target!r} with {others[0]}", f"{key}.{others[0]}", origin)
        for k, v in spec.items():
            check_spec(v, key=f"{key}.{k}", origin=origin, allowed=allowed)
    elif isinstance(spec, list | tuple):
        for i, v in enumerate(spec):
            check_spec(v, key=f"{key}[{i}]", origin=origin, allowed=allowed)


def _build(node: Any) -> Any:
    if isinstance(node, Mapping):
        kwargs = {k: _build(v) for k, v in node.items() if k != "_target_"}
        return REGISTRY[node["_target_"]](**kwargs) if "_target_" in node else kwargs
    if isinstance(node, list | tuple):
        return type(node)(_build(v) for v in node)
    return node


def instantiate(spec: Mapping[str, Any], *, key: str = "config", origin: str = "this config",
                overrides: Mapping[str, Any] | None = None) -> Any:
    """Build ``spec["_target_"](**spec)`` as Hydra would (children with a ``_target_`` first), without Hydra, for
    registered targets only: the whole spec is checked (``check_spec``) before anything is built.

    ``key`` / ``origin``: where the spec comes from, for the error (``config.unet``, the checkpoint's path);
    ``overrides``: keyword arguments that replace the spec's.
    """
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise ValueError(f"{key} in {origin}: expected a mapping with a '_target_' key, got {spec!r}")
    check_spec(spec, key=key, origin=origin)
    check_spec(dict(overrides or {}), key=key, origin="the overrides")
    return _build({**spec, **(overrides or {})})


def check_stored_config(meta: Any, origin: str) -> None:
    """Check the model sections of a checkpoint's ``ldm`` entry (or an export's ``ldm.json``): ``config.autoencoder``
    / ``config.unet`` / ``config.text_encoder`` / ``config.loss`` / ``autoencoder.config`` (the frozen autoencoder of
    a stage-2 run) name registered classes only; a stage-1 ``config.loss`` also its ``RECORDED_ONLY`` parts. The rest
    of the stored run config (trainer, data, optimizers, callbacks) is a record of the run, never built from it."""
    if not isinstance(meta, Mapping) or not isinstance(meta.get("config", {}), Mapping):
        raise ValueError(f"{origin} is not an ldm checkpoint: its 'ldm' entry is not a mapping with a 'config' "
                         "mapping")
    config = meta.get("config") or {}
    frozen = meta.get("autoencoder")
    sections = [("config.autoencoder", config.get("autoencoder")), ("config.unet", config.get("unet")),
                ("config.text_encoder", config.get("text_encoder")),
                ("autoencoder.config", frozen.get("config") if isinstance(frozen, Mapping) else None)]
    for key, spec in sections:
        check_spec(spec, key=key, origin=origin)
    stage1 = meta.get("stage") == "autoencoder"
    check_spec(config.get("loss"), key="config.loss", origin=origin,
               allowed=REGISTRY.keys() | RECORDED_ONLY if stage1 else None)
