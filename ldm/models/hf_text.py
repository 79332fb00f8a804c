"""Frozen Hugging Face text encoders for the U-Net's cross-attention (Rombach et al. 2022, Sec. 3.3, Eq. 3).

- :class:`HFTextEncoder` ``hf``: any frozen Hugging Face text encoder (CLIP text, T5 encoder, BERT...): token
  states of the last or penultimate layer, float32 [B, max_length, D], with a bool mask [B, max_length].
  ``minilm`` is the same module over all-MiniLM-L6-v2 (384-d), whose weights are found offline.
The weights are loaded by ``ldm.pretrained.hf_text`` (``hf_text_encoder``, ``minilm_text_encoder``: the configs'
targets), never in a constructor here.

Their ``identity()`` pins the weights and the vocabulary (:func:`state_dict_sha256`, :func:`tokenizer_sha256`),
so a latent cache of their embeddings is only reused with the very same encoder. The common encoder interface
(``input_key``, ``null_inputs``, ``identity``) is described in ``ldm.models.text_encoders``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ldm.models.tokenizers import check_texts, to_device, warn_truncated


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over ``module.state_dict()`` in sorted key order: name, dtype, shape and raw bytes of every tensor.

    ``*position_ids`` buffers are skipped: they are a fixed ``arange`` that some transformers versions persist and
    others do not, and must not change the identity of the same weights.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if name.endswith("position_ids"):
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def tokenizer_sha256(tokenizer: object) -> str:
    """sha256 of a tokenizer's vocabulary and special tokens (stable across transformers versions)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    payload = {"vocab": vocab, "special": special, "lowercase": getattr(tokenizer, "do_lower_case", None)}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


class HFTextEncoder(nn.Module):
    """Frozen Hugging Face text encoder: token states of the last (or penultimate) layer as the context.

    Args: ``tokenizer`` and ``model``, loaded (``ldm.pretrained.hf_text.hf_text_encoder`` loads them by hub id or
    folder: the configs' target), ``max_length`` tokens including special tokens (at most the model's position
    table), ``layer`` ``"last"`` or ``"penultimate"`` (hidden_states[-2] as the model returns it, without the
    final LayerNorm, as SDXL uses CLIP), ``context_dim`` optional check against the model's hidden size, ``name``
    the config option it came from (``hf``, ``minilm``) and ``name_or_path`` where, for messages. The output is
    always float32.

    CLIP is run without an attention mask, as the CLIP-conditioned diffusion models were: its causal attention
    already keeps padding out of the real tokens' states; its returned mask is all True, so that the U-Net's
    cross-attention reads every position as Stable Diffusion's does (pretrained SD U-Nets expect it). Others
    (BERT, T5) get the padding mask, for the encoder and the U-Net.
    """

    input_key = "caption"
    trainable = False

    def __init__(self, tokenizer: Any, model: nn.Module, max_length: int = 77, layer: str = "last",
                 context_dim: int | None = None, name: str = "hf", name_or_path: str = "") -> None:
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer={layer!r}: choose 'last' or 'penultimate'")
        self.name, self.name_or_path, self.layer, self.max_length = name, str(name_or_path), layer, int(max_length)
        self._truncated: set[str] = set()  # prompts already reported as truncated
        self.tokenizer, self.model = tokenizer, model
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:  # e.g. GPT-2 style tokenizers: pad with EOS, the mask hides it
            self.tokenizer.pad_token = self.tokenizer.eos_token
        cfg = self.model.config
        self.model_type = cfg.model_type
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit is not None and self.max_length > limit:
            raise ValueError(f"max_length={self.max_length} exceeds {name_or_path!r}'s {limit} positions; use at "
                             f"most {limit}")
        if self.max_length < 1:
            raise ValueError(f"max_length={self.max_length} must be positive")
        self.context_dim = int(getattr(cfg, "hidden_size", None) or cfg.d_model)
        if context_dim is not None and int(context_dim) != self.context_dim:
            raise ValueError(f"context_dim={context_dim} but {name_or_path!r} produces {self.context_dim}-d token "
                             f"states; set context_dim: {self.context_dim} (the U-Net's cross-attention reads it)")
        self._use_mask = self.model_type not in ("clip", "clip_text_model")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> HFTextEncoder:
        """Always stays in eval mode: the encoder is frozen (no dropout, whatever the parent module does)."""
        return super().train(False)

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """CPU ids LongTensor [B, max_length] and mask bool [B, max_length]; warns about truncated prompts."""
        full = self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        for text, ids in zip(texts, full, strict=True):
            if len(ids) > self.max_length:
                warn_truncated(self._truncated, f"text_encoder={self.name}", text, len(ids), self.max_length)
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        mask = enc["attention_mask"].bool()
        mask[:, 0] |= ~mask.any(dim=1)  # a tokenizer without special tokens gives "" no token: keep one
        return enc["input_ids"], mask

    @torch.no_grad()
    def forward(self, inputs: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Captions (list of B str) -> context float32 [B, max_length, D], mask bool [B, max_length]."""
        ids, mask = self.tokenize(check_texts(inputs, type(self).__name__))
        device = next(self.model.parameters()).device
        return self.encode_tokens(to_device(ids, device), to_device(mask, device))

    @torch.no_grad()
    def encode_tokens(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`tokenize`'s output on the model's device -> (context float32, mask), each row on its own."""
        out = self.model(input_ids=ids, attention_mask=mask.long() if self._use_mask else None,
                         output_hidden_states=self.layer == "penultimate")
        states = out.last_hidden_state if self.layer == "last" else out.hidden_states[-2]
        if not self._use_mask:  # CLIP: the U-Net attends to all max_length states, padding included, as
            mask = torch.ones_like(mask)  # Stable Diffusion's does (its U-Nets were trained that way)
        return states.float(), mask

    def null_inputs(self, n: int) -> list[str]:
        return [""] * n

    def identity(self) -> dict:
        """Machine-independent description: model type/class, layer, max_length, weight and tokenizer sha256."""
        return {"name": self.name, "model_type": self.model_type, "architecture": type(self.model).__name__,
                "layer": self.layer, "max_length": self.max_length, "context_dim": self.context_dim,
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                "tokenizer_sha256": tokenizer_sha256(self.tokenizer), "sha256": state_dict_sha256(self.model)}
