"""Caption handling shared by the condition encoders (``ldm.models.text_encoders``, ``ldm.models.hf_text``).

- :class:`ByteTokenizer` ``bytes``: UTF-8 bytes, nothing to download, no unknown tokens.
- :class:`WordTokenizer` ``words``: lower-cased words hashed into buckets (~5x fewer tokens than bytes).
- :func:`to_device` moves token ids to the encoder's device without a host sync (pinned, non-blocking).
- :func:`check_texts` refuses anything but a non-empty list of str; :func:`warn_truncated` reports prompts that
  lost their tail to ``max_length`` (once per prompt, up to ``MAX_TRUNCATION_WARNINGS`` per encoder).

Both tokenizers pad to ``max_length`` and return ids LongTensor [B, max_length], a bool mask (True = real token)
and the untruncated lengths.
"""

from __future__ import annotations

import re
import warnings
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

MAX_TRUNCATION_WARNINGS = 20  # distinct prompts reported per encoder, then one last notice


def check_texts(inputs: Sequence[str], who: str) -> list[str]:
    """``inputs`` as a list, once checked to be a non-empty list/tuple of str (``who`` names the caller in errors)."""
    if isinstance(inputs, str) or not isinstance(inputs, (list, tuple)):
        raise TypeError(f"{who} takes a list of captions (list[str]), got {type(inputs).__name__}; wrap one "
                        "prompt as [prompt]")
    bad = [type(x).__name__ for x in inputs if not isinstance(x, str)]
    if bad:
        raise TypeError(f"{who}: every caption must be a str, found {sorted(set(bad))}")
    if not inputs:
        raise ValueError(f"{who}: got an empty list of captions")
    return list(inputs)


def warn_truncated(seen: set[str], who: str, prompt: str, n_tokens: int, max_length: int) -> None:
    """Warn once per distinct prompt (``seen`` holds those reported, up to a limit) that it lost its tail."""
    if prompt in seen or len(seen) > MAX_TRUNCATION_WARNINGS:
        return
    seen.add(prompt)
    if len(seen) > MAX_TRUNCATION_WARNINGS:
        msg = f"{who}: more than {MAX_TRUNCATION_WARNINGS} prompts were truncated; not reporting further ones"
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
        rows, lengths = [], []
        for text in texts:  # padded in Python, then one tensor: a training step tokenizes a whole batch
            kept, n = self.truncate(text)
            rows.append(kept + [self.PAD] * (self.max_length - len(kept)))
            lengths.append(n)
        ids = torch.tensor(rows, dtype=torch.long).view(len(rows), self.max_length)
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

    __call__ = ByteTokenizer.__call__  # same padding and mask: [B, max_length] ids, mask, untruncated lengths


TOKENIZERS = {"bytes": ByteTokenizer, "words": WordTokenizer}


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor to ``device``; to a GPU from pinned memory without blocking the host (a copy from pageable
    memory waits for the GPU's queue to drain: a host sync every training step)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
