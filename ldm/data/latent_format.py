"""The latent cache on disk: its manifest (read, checked against a model) and the codec of its samples.

A cache (written by ``python -m ldm.cache``, see ``ldm/cache.py`` and ``ldm/data/latent_writer.py``) is a folder
with ``manifest.json`` and ``<split>/shard-NNNNNN.tar`` webdataset shards. A sample ``<key>`` holds
``<key>.mean.npy`` and ``<key>.logvar.npy`` (the posterior q(z|x) of the frozen autoencoder, [C, h, w], float16 or
float32), ``<key>.json`` ({"caption", "attributes" (JSON text), "key" (the dataset's own key), optional "label"})
and, when a frozen text encoder was cached, ``<key>.context.npy`` [L, D] and ``<key>.context_mask.npy`` [L] (bool).

The manifest names the autoencoder by :func:`autoencoder_identity` and stores its latent statistics, so a cache is
only used with the model it was made with (:func:`check_cache_compatible`). The datasets that read a cache for
stage 2 are in ``ldm/data/latents.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch import Tensor, nn
from torch.utils.data import default_collate

CACHE_FORMAT = "ldm-latent-cache"
CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"
CLASSES_NAME = "classes.json"  # a labelled cache's class index (ldm.data.latent_writer.class_index)
LIST_FIELDS = ("caption", "attributes", "key")  # per-sample strings: batches keep them as lists


# -------------------------------------------------------------------------------- identity & manifest

def autoencoder_identity(model: nn.Module) -> str:
    """sha256 (hex) over the state dict, keys sorted: name, dtype, shape and raw bytes of every tensor.

    Two autoencoders with equal identity produce bit-identical latents on the same hardware, so a cache
    made with one can train a model that decodes with the other.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the cache folder ``path`` (or of the manifest file itself)."""
    path = Path(path)
    file = path if path.name == MANIFEST_NAME else path / MANIFEST_NAME
    if not file.is_file():
        hint = (" Its shards are there, so a cache run was interrupted: rerun the same command to finish it."
                if any(path.glob("*/shard-*.tar")) else "")
        raise FileNotFoundError(
            f"{path} is not a latent cache (no {MANIFEST_NAME}).{hint} Build one with "
            f"`python -m ldm.cache ckpt=<stage-1 checkpoint> out_dir={path}`.")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        raise ValueError(f"{file} is not an {CACHE_FORMAT} manifest of version {CACHE_VERSION} "
                         f"(format={manifest.get('format')!r}, version={manifest.get('version')!r}); rebuild it")
    return manifest


def _stats_differ(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    keys = ("scale", "shift", "mean", "std")
    out = []
    for k in keys:
        x, y = np.atleast_1d(np.asarray(a.get(k), dtype=float)), np.atleast_1d(np.asarray(b.get(k), dtype=float))
        if x.shape != y.shape or not np.allclose(x, y, rtol=1e-6, atol=0.0):
            out.append(f"{k}: cache {a.get(k)} vs autoencoder {b.get(k)}")
    return out


def check_cache_compatible(manifest: Mapping[str, Any], identity: str | None = None,
                           latent_shape: Sequence[int] | None = None, stats: Mapping[str, Any] | None = None,
                           text_encoder: nn.Module | Mapping[str, Any] | None = None) -> None:
    """Refuse a cache that does not belong to the configured autoencoder (and frozen text encoder).

    Args (each None = not checked):
        identity: ``autoencoder_identity`` of the configured autoencoder.
        latent_shape: expected (C, h, w) of a latent.
        stats: the autoencoder's latent statistics (from its checkpoint).
        text_encoder: the condition encoder (or its ``identity()`` dict). Only compared when the cache holds
            embeddings and the encoder is frozen: a trainable encoder ignores cached embeddings
            (``ldm.pipeline.training_condition`` runs it on the captions instead).
    Raises ValueError naming the cached and the configured value.
    """
    source = manifest.get("autoencoder", {}).get("ckpt_path")
    problems = []
    cached_id = manifest.get("autoencoder", {}).get("identity")
    if identity is not None and cached_id != identity:
        problems.append(f"autoencoder identity: cache {cached_id} (from {source}) vs configured {identity}")
    if latent_shape is not None and list(manifest.get("latent_shape", [])) != [int(s) for s in latent_shape]:
        problems.append(f"latent shape: cache {manifest.get('latent_shape')} (images of "
                        f"{manifest.get('resolution')} px) vs configured {list(latent_shape)}; set resolution= to "
                        "the cache's or point at a cache made at this resolution")
    if stats is not None:
        problems += [f"latent statistics {p}" for p in _stats_differ(manifest.get("latent_stats") or {}, stats)]
    cached_text = (manifest.get("text_encoder") or {}).get("identity")
    if text_encoder is not None and cached_text is not None:
        frozen = isinstance(text_encoder, Mapping) or not getattr(text_encoder, "trainable", False)
        wanted = dict(text_encoder) if isinstance(text_encoder, Mapping) else text_encoder.identity()
        if frozen and wanted != cached_text:
            problems.append(f"text encoder: cache {cached_text} vs configured {wanted}")
    if problems:
        raise ValueError("the latent cache does not match the configured model:\n  - " + "\n  - ".join(problems)
                         + "\nRebuild the cache for this autoencoder (python -m ldm.cache ... overwrite=true) or "
                           "point at the cache that was made with it.")


def split_info(manifest: Mapping[str, Any], split: str) -> dict[str, Any]:
    """The manifest entry of ``split`` ({"num_samples", "shards": [{"name", "num_samples", "bytes"}], ...})."""
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ValueError(f"the latent cache has no {split!r} split (it has {sorted(splits)}); rebuild it with "
                         f"splits=[{', '.join(sorted(set(splits) | {split}))}]")
    return splits[split]


def check_shard_files(root: str | Path, shards: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a split whose shard files are missing or differ in size from what the manifest recorded (a copy or
    sync cut short: tarfile would read such a shard as a shorter one, and training would lose its tail silently).

    ``shards``: the split's ``[{"name", "num_samples", "bytes"}]`` (:func:`split_info`). Costs one ``stat`` per
    shard; a cut shard is also walked (``ldm.data.tarcheck``) to say how many of its samples survive.
    """
    from ldm.data.tarcheck import scan_tar

    problems = []
    for shard in shards:
        path = Path(root) / shard["name"]
        if not path.is_file():
            problems.append(f"{path}: missing ({shard['num_samples']} samples)")
        elif "bytes" in shard and path.stat().st_size != int(shard["bytes"]):
            scan = scan_tar(path)
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {shard['bytes']}; "
                            f"{scan.describe(expected=int(shard['num_samples']))}")
    if problems:
        raise ValueError(f"the latent cache {root} is damaged:\n  - " + "\n  - ".join(problems[:20])
                         + "\nCopy it again from where it was made, or rebuild it (python -m ldm.cache ... "
                           "overwrite=true).")


# --------------------------------------------------------------------------------------- sample codec

def encode_array(array: np.ndarray) -> bytes:
    """A numpy array as .npy bytes (shape and dtype in the header, no pickle)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    """.npy bytes (as :func:`encode_array` writes them) -> the numpy array; pickled objects are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_sample(raw: Mapping[str, Any], float32: bool = True) -> dict[str, Any]:
    """A raw webdataset sample of a cache shard -> the sample dict (see the module docstring).

    ``float32=False`` keeps the stored dtype (for holding a whole split in memory)."""
    def tensor(name: str, dtype: Any) -> Tensor:
        arr = decode_array(raw[name])
        return torch.from_numpy(arr.astype(dtype if dtype is not None else arr.dtype))  # astype: a writable copy

    floats = np.float32 if float32 else None
    meta = json.loads(raw["json"])
    out = {"mean": tensor("mean.npy", floats), "logvar": tensor("logvar.npy", floats),
           "caption": meta["caption"], "attributes": meta["attributes"], "key": meta["key"]}
    if "label" in meta:
        out["label"] = int(meta["label"])
    if "context.npy" in raw:
        out["context"] = tensor("context.npy", floats)
        out["context_mask"] = tensor("context_mask.npy", bool)
    return out


def collate_latents(samples: Sequence[Mapping[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    """Stack tensors (label -> LongTensor [B]); caption, attributes and key stay lists of str. A batch a
    dataset built itself (``__getitems__``) passes through."""
    if isinstance(samples, dict):
        return samples
    batch = {k: [s[k] for s in samples] for k in LIST_FIELDS}
    batch.update(default_collate([{k: v for k, v in s.items() if k not in LIST_FIELDS} for s in samples]))
    return batch


def _all(src):  # webdataset node/worker splitter that keeps everything (we split ourselves)
    return src


def iter_shards(urls: Sequence[str], float32: bool = True) -> Iterator[dict]:
    """Every sample of the cache shards ``urls``, in order, decoded (:func:`decode_sample`); no rank or worker
    splitting: callers split."""
    pipeline = wds.WebDataset(list(urls), shardshuffle=False, empty_check=False, nodesplitter=_all,
                              workersplitter=_all)
    return (decode_sample(raw, float32) for raw in pipeline)

