"""Condition encoders for the latent diffusion U-Net's cross-attention (Rombach et al. 2022, Sec. 3.3, Eq. 3).

Every encoder maps a batch of conditions to a context ``[B, L, D]`` (float32) and a mask ``[B, L]`` (bool, True =
real token, at least one per row) on the module's device, and names its batch field in ``input_key``:

- :class:`TransformerTextEncoder` ``transformer``: trained jointly from scratch, like the paper's BERT-style
  tau_theta (token + learned position embeddings, pre-norm transformer layers, final LayerNorm) over UTF-8 bytes
  or hashed words (``ldm.models.tokenizers``), so it needs no vocabulary file.
- ``minilm`` and ``hf``: frozen pretrained text models, :class:`~ldm.models.hf_text.HFTextEncoder` (their weights
  are loaded by ``ldm.pretrained.hf_text``).
- :class:`ClassEncoder` ``class``: one learned token per class label plus a learned null class.
- :class:`NullEncoder` ``none``: a single zero token (unconditional models).

Text is always padded to ``max_length`` so that contexts of different batches (cached shards, the conditional and
unconditional halves of a classifier-free-guidance batch) concatenate. ``null_inputs(n)`` gives the "no condition"
input that training drops to with probability p_uncond and that guidance uses (Ho & Salimans 2022).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.tokenizers import (
    TOKENIZERS,
    ByteTokenizer,
    WordTokenizer,
    check_texts,
    to_device,
    warn_truncated,
)

__all__ = ["ClassEncoder", "NullEncoder", "TransformerTextEncoder"]


# --------------------------------------------------------------------------------- transformer (trainable)
class _Block(nn.Module):
    """Pre-norm transformer layer: x + Attn(LN(x)), then x + MLP(LN(x)) (as in the paper's x-transformers
    Encoder); padding keys are masked out so they never influence real tokens."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(round(width * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


class TransformerTextEncoder(nn.Module):
    """Text transformer over bytes (or hashed words) trained jointly with the U-Net (the paper's BERTEmbedder, Sec. 4.3.1/App. E.2).

    Args: ``width`` (= context_dim D), ``depth`` layers of ``heads`` heads, ``max_length`` tokens including BOS/EOS,
    MLP hidden size ``mlp_ratio * width``, ``dropout`` on attention, residual and MLP paths; ``tokenizer`` ``bytes``
    (:class:`ByteTokenizer`) or ``words`` (:class:`WordTokenizer` with ``vocab_size`` buckets). ``context_dim`` may be
    given for configs that state it; it must equal ``width``. Paper: width 1280, depth 32, max_length 77.
    """

    input_key = "caption"
    trainable = True

    def __init__(self, width: int = 256, depth: int = 4, heads: int = 4, max_length: int = 77,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, context_dim: int | None = None,
                 tokenizer: str = "bytes", vocab_size: int = 8192) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}; pick heads with width % heads == 0")
        if depth < 1:
            raise ValueError(f"depth={depth}: the text transformer needs at least one layer")
        if context_dim is not None and context_dim != width:
            raise ValueError(f"context_dim={context_dim} but the transformer's width is {width}: its context has "
                             "D = width; set context_dim to the width (or leave it out)")
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer={tokenizer!r} is not one of {sorted(TOKENIZERS)}")
        self.tokenizer = ByteTokenizer(max_length) if tokenizer == "bytes" else WordTokenizer(max_length, vocab_size)
        self.tokenizer_name = tokenizer
        self.width, self.depth, self.heads, self.mlp_ratio, self.dropout = width, depth, heads, mlp_ratio, dropout
        self.max_length, self.context_dim = max_length, width
        self._truncated: set[str] = set()  # prompts already reported as truncated
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, width)
        self.position_embedding = nn.Parameter(torch.empty(max_length, width))
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self._init_weights()

    def _init_weights(self) -> None:
        # BERT/GPT-2 style N(0, 0.02); the residual output projections are scaled by 1/sqrt(2 depth) (GPT-2) so
        # the residual stream's variance stays O(1) for deep stacks such as the paper's 32 layers.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        for name, m in self.blocks.named_modules():
            if isinstance(m, nn.Linear):
                last = name.endswith("proj") or name.endswith("mlp.3")
                nn.init.normal_(m.weight, std=0.02 / (2 * self.depth) ** 0.5 if last else 0.02)
                nn.init.zeros_(m.bias)

    def encode(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Token ids LongTensor [B, L<=max_length] + mask bool [B, L] -> context float [B, L, width].

        Padding positions of the output are zero; real tokens never attend to padding.
        """
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        x = self.emb_drop(x)
        attn_mask = mask[:, None, None, :]  # [B, 1, 1, L] keys; broadcast over heads and queries
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x) * mask[..., None].to(x.dtype)

    def forward(self, inputs: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Captions (list of B str) -> context float [B, max_length, width], mask bool [B, max_length]."""
        device = self.token_embedding.weight.device
        return self.encode_tokens(*(to_device(t, device) for t in self.tokenize(inputs)))

    def tokenize(self, inputs: Sequence[str]) -> tuple[Tensor, Tensor]:
        """CPU ids LongTensor [B, max_length] and mask bool [B, max_length]; warns about truncated captions."""
        texts = check_texts(inputs, type(self).__name__)
        ids, mask, lengths = self.tokenizer(texts)
        for text, n in zip(texts, lengths, strict=True):
            if n > self.max_length:
                warn_truncated(self._truncated, "text_encoder=transformer", text, n, self.max_length)
        return ids, mask

    def encode_tokens(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`tokenize`'s output on the encoder's device -> (context, mask), each row on its own."""
        return self.encode(ids, mask), mask

    def null_inputs(self, n: int) -> list[str]:
        return [""] * n

    def identity(self) -> dict:
        # trained weights change every step: the configuration is what identifies it
        tok = "utf8-bytes" if self.tokenizer_name == "bytes" else f"words-crc32-{self.tokenizer.buckets}"
        return {"name": "transformer", "tokenizer": tok, "width": self.width, "depth": self.depth,
                "heads": self.heads, "mlp_ratio": self.mlp_ratio, "max_length": self.max_length}


# ----------------------------------------------------------------------------------- class / unconditional
# how ldm's datasets give class labels
LABELLED_DATASETS = ("data=fashion_mnist", "data=folder data.dataset.labels=subfolder (one folder per class)",
                     "data=webdataset with <key>.cls members or a json label",
                     "data=shapes data.dataset.labels=shape data.dataset.max_shapes=1")


def no_labels_error(fields: Sequence[str] | None = None) -> ValueError:
    """The error for a class-conditional model given data without class labels, with what to do instead."""
    found = f" (its samples have {sorted(fields)})" if fields is not None else ""
    return ValueError(
        f"text_encoder=class conditions on class labels, but the data has no class labels{found}. Labels come "
        f"from datasets that carry them ({'; '.join(LABELLED_DATASETS)}; a latent "
        "cache keeps them when it was built from such data). For captioned data use another text_encoder "
        "(transformer, minilm, hf) or none for an unconditional model; for class conditioning use labelled data "
        "(e.g. data=fashion_mnist text_encoder=class text_encoder.num_classes=10).")


class ClassEncoder(nn.Module):
    """Class label -> one learned token [B, 1, D] (the paper's class-conditional ClassEmbedder).

    Labels are ints in [0, num_classes); ``num_classes`` itself is the learned null class that classifier-free
    guidance drops to. Trained with the U-Net, hence ``trainable``.
    """

    input_key = "label"
    trainable = True
    max_length = 1

    def __init__(self, num_classes: int, context_dim: int = 512) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be at least 1")
        self.num_classes, self.context_dim = num_classes, context_dim
        self.embedding = nn.Embedding(num_classes + 1, context_dim)

    def forward(self, inputs: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Labels LongTensor [B] in [0, num_classes] -> context [B, 1, D], mask bool [B, 1] (all True)."""
        device = self.embedding.weight.device
        if not isinstance(inputs, Tensor) and any(isinstance(x, str) for x in inputs):
            raise no_labels_error()  # captions where labels belong: the data has no labels
        labels = torch.as_tensor(inputs, device=device)
        if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"ClassEncoder takes integer labels of shape [B], got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class); got "
                             f"[{labels.min().item()}, {labels.max().item()}]: check num_classes of the dataset")
        context = self.embedding(labels.long())[:, None]
        return context, torch.ones(labels.shape[0], 1, dtype=torch.bool, device=device)

    def null_inputs(self, n: int) -> Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long)

    def identity(self) -> dict:
        return {"name": "class", "num_classes": self.num_classes, "context_dim": self.context_dim}


class NullEncoder(nn.Module):
    """Unconditional models: one all-zero token [B, 1, D] with mask True, whatever the captions say."""

    input_key = "caption"
    trainable = False
    max_length = 1

    def __init__(self, context_dim: int = 64) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.register_buffer("_zero", torch.zeros(1, 1, context_dim), persistent=False)  # carries the device

    def forward(self, inputs: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Any B inputs -> zeros float [B, 1, D], mask bool [B, 1] (all True)."""
        return self.encode_tokens(*(to_device(t, self._zero.device) for t in self.tokenize(inputs)))

    def tokenize(self, inputs: Sequence[str]) -> tuple[Tensor, Tensor]:
        """One placeholder token per input: ids zeros [B, 1], mask True [B, 1] (the captions are not read)."""
        n = len(inputs)
        return torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.bool)

    def encode_tokens(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self._zero.expand(ids.shape[0], 1, self.context_dim).clone(), mask

    def null_inputs(self, n: int) -> list[str]:
        return [""] * n

    def identity(self) -> dict:
        return {"name": "none", "context_dim": self.context_dim}
