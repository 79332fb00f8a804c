"""Trainable condition encoders (ldm.models.text_encoders, tokenizers): the byte and word tokenizers, the
text transformer (masks, padding, training, truncation), and the class and null encoders."""

from __future__ import annotations

import json
import warnings
import zlib

import pytest
import torch
from helpers import accumulation_length, assert_float32_close
from text_encoder_fixtures import _check_output

from ldm.models.text_encoders import ClassEncoder, NullEncoder, TransformerTextEncoder
from ldm.models.tokenizers import ByteTokenizer, WordTokenizer


# --------------------------------------------------------------------------------------------- byte tokenizer
def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer(max_length=64)
    for text in ["a red circle", "", "héllo wörld ✓ 🟥", "tab\tand\nnewline"]:
        ids = tok.encode(text)
        assert ids[0] == tok.BOS and ids[-1] == tok.EOS and len(ids) == len(text.encode()) + 2
        assert all(0 <= i < 256 for i in ids[1:-1])
        assert tok.decode(ids) == text
    ids, mask, lengths = tok(["ab", ""])
    assert ids.shape == mask.shape == (2, 64) and lengths == [4, 2]
    assert ids[0, :4].tolist() == [tok.BOS, 97, 98, tok.EOS] and (ids[0, 4:] == tok.PAD).all()
    assert mask.sum(1).tolist() == [4, 2]


def test_byte_tokenizer_truncates_on_character_boundaries():
    tok = ByteTokenizer(max_length=8)
    kept, n = tok.truncate("éééééé")  # 12 bytes: 2-byte characters; 6 body slots fit 3 whole characters
    assert n == 14 and len(kept) == 8 and kept[-1] == tok.EOS
    assert tok.decode(kept) == "ééé"
    kept, _ = tok.truncate("aéééé")  # 'a' + 2-byte chars: the 6th body byte would split a character
    assert tok.decode(kept) == "aéé" and len(kept) == 7


def test_word_tokenizer_hashes_words_stably_and_truncates():
    tok = WordTokenizer(max_length=8, vocab_size=1000)
    ids = tok.encode("A red circle, on a BLACK background")
    assert ids[0] == tok.BOS and ids[-1] == tok.EOS and len(ids) == 2 + 8  # 7 words + the comma
    body = ids[1:-1]
    assert all(0 <= i < 1000 for i in body)
    assert body[0] == body[5] and body[1] != body[2]  # "a" twice -> one id; case does not matter
    assert body == tok.encode("a red circle , on a black background")[1:-1]  # punctuation is its own token
    assert body[0] == zlib.crc32(b"a") % 1000  # stable across processes and machines (no Python hash())
    kept, n = tok.truncate("a red circle, on a black background")
    assert n == 10 and len(kept) == 8 and kept[-1] == tok.EOS and kept[:7] == ids[:7]
    batch, mask, lengths = tok(["a red circle", ""])
    assert batch.shape == (2, 8) and mask.sum(1).tolist() == [5, 2] and lengths == [5, 2]
    assert (batch[~mask] == tok.PAD).all() and tok.vocab_size == 1003


def test_transformer_with_word_tokenizer():
    torch.manual_seed(0)
    enc = TransformerTextEncoder(width=32, depth=1, heads=4, max_length=16, tokenizer="words", vocab_size=512).eval()
    context, mask = enc(["a red circle", "a blue circle"])
    _check_output(context, mask, 2, 16, 32)
    assert mask.sum(1).tolist() == [5, 5] and enc.token_embedding.num_embeddings == 515
    assert not torch.allclose(context[0, 2], context[1, 2])  # "red" vs "blue"
    assert enc.identity()["tokenizer"] == "words-crc32-512"
    with pytest.raises(ValueError, match="tokenizer='wordpiece' is not one of"):
        TransformerTextEncoder(width=32, heads=4, tokenizer="wordpiece")


# ------------------------------------------------------------------------------------------ text transformer
def _transformer(max_length: int = 32, seed: int = 0) -> TransformerTextEncoder:
    torch.manual_seed(seed)
    return TransformerTextEncoder(width=32, depth=2, heads=4, max_length=max_length).eval()


def test_transformer_shapes_masks_and_empty_caption():
    enc = _transformer()
    context, mask = enc(["a red circle", "", "ü"])
    _check_output(context, mask, 3, 32, 32)
    assert mask.sum(1).tolist() == [14, 2, 4]  # BOS + bytes + EOS; "" is BOS EOS; ü is 2 bytes
    assert context[~mask].abs().max() == 0  # padding positions are zero
    assert context[1, :2].abs().sum() > 0 and not torch.allclose(context[0, 0], context[1, 0])
    assert enc.context_dim == 32 and enc.trainable and enc.input_key == "caption"
    assert enc.null_inputs(3) == ["", "", ""]


def test_transformer_padding_does_not_change_real_tokens():
    enc = _transformer()
    caption = "a small blue square"
    alone, mask_alone = enc([caption])
    batched, _ = enc([caption, "two large green triangles"])
    real = mask_alone[0]
    n = accumulation_length(enc)  # batches of 1 and 2: other matrix-product blockings
    assert_float32_close(batched[0, real], alone[0, real], n)
    # garbage ids in the padding positions must not reach the real tokens ...
    ids, mask, _ = enc.tokenizer([caption])
    noisy = ids.clone()
    noisy[~mask] = torch.randint(0, 256, (int((~mask).sum()),), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(enc.encode(noisy, mask)[0, real], alone[0, real], atol=1e-6, rtol=0)
    # ... which they would without the key mask (so the check above can fail)
    unmasked = enc.encode(noisy, torch.ones_like(mask))[0, real]
    assert (unmasked - alone[0, real]).abs().max() > 1e-3
    # nor does a longer padded length: same weights, 4x the padding
    longer = _transformer(max_length=128)
    state = enc.state_dict()
    state["position_embedding"] = torch.cat([state["position_embedding"], longer.position_embedding[32:]])
    longer.load_state_dict(state)
    out_long, mask_long = longer([caption])
    assert mask_long.shape == (1, 128)
    assert_float32_close(out_long[0, mask_long[0]], alone[0, real], n)  # attention over 128 keys, not 32


def test_transformer_trains_and_identity_is_its_config():
    enc = _transformer().train()
    context, mask = enc(["a red circle", "two"])
    context[mask].pow(2).mean().backward()
    grads = {n: p.grad for n, p in enc.named_parameters()}
    assert all(g is not None for g in grads.values()) and grads["token_embedding.weight"].abs().sum() > 0
    ident = enc.identity()
    assert json.loads(json.dumps(ident)) == ident
    assert ident == {"name": "transformer", "tokenizer": "utf8-bytes", "width": 32, "depth": 2, "heads": 4,
                     "mlp_ratio": 4.0, "max_length": 32}


def test_transformer_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="not divisible by heads"):
        TransformerTextEncoder(width=30, heads=4)
    with pytest.raises(ValueError, match="context_dim=64 but the transformer's width is 32"):
        TransformerTextEncoder(width=32, heads=4, context_dim=64)
    with pytest.raises(TypeError, match=r"list of captions.*\[prompt\]"):
        _transformer()("a red circle")


def test_truncation_warns_once_and_keeps_max_length():
    enc = _transformer(max_length=16)
    long_caption = "a large green triangle at the bottom"
    with pytest.warns(UserWarning, match=r"'a large green triangle at the bottom' has 38 tokens.*max_length=16"):
        context, mask = enc([long_caption, "ok"])
    assert context.shape == (2, 16, 32) and mask[0].all()
    ids, _, _ = enc.tokenizer([long_caption])
    assert ids[0, -1] == ByteTokenizer.EOS and enc.tokenizer.decode(ids[0]) == long_caption[:14]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same prompt again: no second warning
        enc([long_caption])


# ---------------------------------------------------------------------------------------- class and none
def test_class_encoder():
    torch.manual_seed(0)
    enc = ClassEncoder(num_classes=10, context_dim=8)
    null = enc.null_inputs(2)
    assert null.tolist() == [10, 10] and null.dtype == torch.long
    context, mask = enc(torch.tensor([0, 3, 10]))
    _check_output(context, mask, 3, 1, 8)
    torch.testing.assert_close(context[:, 0], enc.embedding.weight[[0, 3, 10]])
    assert enc.trainable and enc.input_key == "label" and enc.max_length == 1
    assert enc([3, 3])[0].shape == (2, 1, 8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        enc(torch.tensor([11]))
    with pytest.raises(TypeError, match="integer labels"):
        enc(torch.tensor([0.5]))
    assert enc.identity() == {"name": "class", "num_classes": 10, "context_dim": 8}


def test_null_encoder():
    enc = NullEncoder(context_dim=16).to(torch.float64)
    context, mask = enc(["a red circle", "", "x"])
    assert context.shape == (3, 1, 16) and context.abs().sum() == 0 and mask.all() and mask.shape == (3, 1)
    assert enc.null_inputs(2) == ["", ""] and not enc.trainable and list(enc.parameters()) == []
    assert enc.identity() == {"name": "none", "context_dim": 16}
