"""Class labels from data (issue: reproduce the paper): an ImageNet-style folder tree, webdataset shards with
``<key>.cls`` members or a json label, `shapes` labelled by its shape kind; the class index the cache writes
(``classes.json``); a class model whose ``num_classes`` misses labels of its cache is refused before training."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import compose_train, run_entry
from PIL import Image

import train
from ldm.cache import build_cache
from ldm.checkpoint import build_latent_diffusion, load_checkpoint
from ldm.data.datamodules import ImageDataModule
from ldm.data.images import ImageFolderDataset
from ldm.data.shapes import SHAPES, ShapesDataset
from ldm.data.shards import WebDatasetImages
from ldm.pipeline import condition_inputs

CLASSES = ["n01440764", "n01443537", "n02102040"]  # ImageNet synset folders, sorted


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _imagenet_tree(root: Path, per_class: int = 4) -> Path:
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{name}_{i}.png").write_bytes(_png(10 * c + i))
    return root


def _label(sample: dict) -> tuple[int, str | None]:
    attributes = json.loads(sample["attributes"])
    return attributes["label"], attributes.get("class_name")


def test_a_folder_of_class_folders_gives_the_same_labels_in_every_split(tmp_path):
    root = _imagenet_tree(tmp_path / "imagenet")
    (root / CLASSES[1] / "n01443537_0.txt").write_text("a goldfish")  # captions still work beside labels
    seen = {}
    for split in ("train", "val"):
        ds = ImageFolderDataset(root, split=split, resolution=32, labels="subfolder", val_fraction=0.3)
        assert ds.classes == CLASSES
        for i in range(len(ds)):
            sample = ds[i]
            seen[sample["key"]] = _label(sample)
            if sample["key"] == "n01443537/n01443537_0.png":
                assert sample["caption"] == "a goldfish"
    assert len(seen) == 12
    assert seen == {f"{c}/{c}_{i}.png": (k, c) for k, c in enumerate(CLASSES) for i in range(4)}
    unlabelled = ImageFolderDataset(root, split="all", resolution=32)
    assert "label" not in json.loads(unlabelled[0]["attributes"])


def test_images_outside_the_class_folders_and_unknown_label_sources_are_named(tmp_path):
    root = _imagenet_tree(tmp_path / "imagenet", per_class=1)
    (root / "stray.png").write_bytes(_png(99))
    with pytest.raises(ValueError, match=r"labels=subfolder needs every image in a class subfolder.*stray\.png"):
        ImageFolderDataset(root, labels="subfolder")
    with pytest.raises(ValueError, match=r"labels='folders' \(data.dataset.labels\) is not supported; choose null or subfolder"):
        ImageFolderDataset(root, labels="folders")


def test_shards_carry_labels_as_cls_members_or_json(tmp_path):
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as tar:
        tar.write({"__key__": "a", "png": _png(0), "cls": b"7", "txt": b"a tench"})
        tar.write({"__key__": "b", "png": _png(1), "json": json.dumps({"label": 2, "class_name": "dog"}).encode()})
        tar.write({"__key__": "c", "png": _png(2), "cls": b"not a number"})  # broken: skipped and counted
        tar.write({"__key__": "d", "png": _png(3)})
    ds = WebDatasetImages(str(tmp_path / "train-000000.tar"), resolution=32, shuffle_buffer=0, epoch_size=None,
                          max_bad_fraction=1.0)
    samples = {s["key"]: s for s in ds}
    assert _label(samples["a"]) == (7, None) and samples["a"]["caption"] == "a tench"
    assert _label(samples["b"]) == (2, "dog")
    assert "c" not in samples and samples["d"]["n_bad"] == 1 and "label" not in json.loads(samples["d"]["attributes"])


def test_shapes_labelled_by_their_kind():
    ds = ShapesDataset(size=12, resolution=32, max_shapes=1, labels="shape")
    for i in range(12):
        label, name = _label(ds[i])
        assert SHAPES[label] == name and json.loads(ds[i]["attributes"])["shapes"][0]["shape"] == name
    with pytest.raises(ValueError, match="set max_shapes=1"):
        ShapesDataset(labels="shape")


def test_the_cache_writes_a_class_index_and_stage2_checks_num_classes(stage1_ckpt, tmp_path):
    root = _imagenet_tree(tmp_path / "imagenet", per_class=3)
    factory = functools.partial(ImageFolderDataset, root=str(root), resolution=32, labels="subfolder",
                                val_fraction=0.3)
    cache = tmp_path / "cache"
    manifest = build_cache(stage1_ckpt, ImageDataModule(factory, batch_size=2, num_workers=0), cache, device="cpu",
                           progress=False)
    index = json.loads((cache / "classes.json").read_text())
    assert index == manifest["classes"] and index["num_classes"] == 3
    assert [entry["name"] for entry in index["classes"].values()] == CLASSES
    assert all(entry.get("train", 0) + entry.get("val", 0) == 3 for entry in index["classes"].values())
    assert sum(entry.get("val", 0) for entry in index["classes"].values()) == manifest["splits"]["val"]["num_samples"]

    from test_train_stage2 import TINY_LDM

    base = [o for o in TINY_LDM if not o.startswith("text_encoder.")]
    cfg = compose_train(base + ["text_encoder=class", "text_encoder.num_classes=2", "text_encoder.context_dim=32",
                                f"autoencoder.pretrained={stage1_ckpt}", f"cache_dir={cache}"], output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"text_encoder.num_classes=2, but the latent cache .* has labels up to 2 .*"
                                         r"set text_encoder.num_classes=3"):
        train.build_ldm_stage(cfg, {})
    cfg = compose_train(base + ["text_encoder=class", "text_encoder.num_classes=3", "text_encoder.context_dim=32",
                                f"autoencoder.pretrained={stage1_ckpt}", f"cache_dir={cache}", "trainer.max_steps=2",
                                "batch_size=3"], output_dir=tmp_path / "run")
    metrics = train.train(cfg)
    assert np.isfinite(metrics["train/loss"])
    # the end-of-training grid of a class model has one row per class (named), not the default captions
    rows = [f"{i} ({name})" for i, name in enumerate(CLASSES)]
    assert (tmp_path / "run" / "images" / "prompts.txt").read_text().splitlines() == rows
    # the checkpoint keeps the class names: prompts may name a class or give its index
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(ckpt)["ldm"]["class_names"] == {str(i): name for i, name in enumerate(CLASSES)}
    model = build_latent_diffusion(ckpt)
    assert condition_inputs(model.text_encoder, [CLASSES[2], 0, "1"], torch.device("cpu"),
                            model.class_names).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=rf"class indices 0..2 or class names \({', '.join(CLASSES)}\), got "):
        condition_inputs(model.text_encoder, ["unicorn"], torch.device("cpu"), model.class_names)
    # a number is always an index, even where a class is named by digits; a name two classes share is refused
    digits = {0: "2", 1: "0", 2: "dog"}
    assert condition_inputs(model.text_encoder, ["2", 0, "dog"], torch.device("cpu"), digits).tolist() == [2, 0, 2]
    with pytest.raises(ValueError, match=r"class name 'dog' names classes \[1, 2\]: give the index instead"):
        condition_inputs(model.text_encoder, ["dog"], torch.device("cpu"), {0: "cat", 1: "dog", 2: "dog"})
    proc = run_entry("sample.py", f"ckpt={ckpt}", f"prompts=[2,{CLASSES[0]}]", "steps=2",
                     f"out_dir={tmp_path}/samples", "device=cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "samples").rglob("*.png"))) >= 2
