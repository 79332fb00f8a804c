"""A folder of images (searched recursively) with optional captions, as a map-style dataset.

Captions, in order of precedence: ``<image stem>.txt`` next to the image; a ``captions.jsonl`` in ``root``
with lines ``{"file": "<path relative to root>", "caption": "...", "attributes": {...}}`` (``file_name`` and
``text`` are accepted too, as in Hugging Face "imagefolder" metadata). Images without a caption get ""; they
are counted in ``n_missing_captions`` (they are not bad data).

Class labels (``labels="subfolder"``): one subfolder of ``root`` per class, as ImageNet is laid out
(``root/n01440764/x.JPEG``); classes are the sorted subfolder names, numbered from 0 over the whole folder (so
every split numbers them alike), and each sample's attributes carry ``label`` and ``class_name``.

The train/val split is a stable hash of each file's relative path, so adding files never moves existing
files between splits. Unreadable or truncated images are skipped (the next good one is returned and the
sample's ``n_bad`` says how many were skipped); too many bad files raise a RuntimeError listing them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ldm.data.common import (
    IMAGE_EXTENSIONS,
    FileListDataset,
    ImageTransform,
    check_choice,
    check_fraction,
    make_sample,
    unit_hash,
    with_label,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")
CAPTIONS_FILE = "captions.jsonl"
LABEL_SOURCES = (None, "subfolder")


def class_folders(root: Path, files: Sequence[str]) -> list[str]:
    """The sorted class names of an ImageNet-style folder (the first path component of every image); an image
    directly in ``root`` is a ValueError naming it."""
    loose = [f for f in files if "/" not in f]
    if loose:
        raise ValueError(f"labels=subfolder needs every image in a class subfolder of {root}, but {len(loose)} lie in "
                         f"it directly (e.g. {loose[:3]}): move them into a class folder or use data.dataset.labels=null")
    return sorted({f.split("/", 1)[0] for f in files})


def find_images(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Sorted relative paths (POSIX separators) of all files under ``root`` with one of ``extensions``.

    Raises FileNotFoundError if ``root`` does not exist, NotADirectoryError if it is a file, and ValueError
    naming the folder and the extensions when nothing matches.
    """
    return scan_folder(root, extensions)[0]


def scan_folder(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> tuple[list[str], set[str]]:
    """(sorted image paths, set of .txt paths) relative to ``root``, in one walk (see ``find_images``)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist (absolute: {root.resolve()})")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {str(root)!r} is a file, not a folder")
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    found, texts = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # skip .git, .ipynb_checkpoints, ...
        rel = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.startswith("."):
                continue
            if name.lower().endswith(exts):
                found.append((rel / name).as_posix())
            elif name.endswith(".txt"):
                texts.add((rel / name).as_posix())
    if not found:
        raise ValueError(f"no images found in {str(root)!r} (searched recursively for extensions {list(exts)})")
    return sorted(found), texts


def split_files(files: Sequence[str], split: str, val_fraction: float) -> list[str]:
    """Deterministic train/val assignment by a stable hash of the relative path.

    With at least two files the val split is never empty: if no file hashes into it, the file with the
    smallest hash goes there (a tiny folder should still validate).
    """
    if split == "all":
        return list(files)
    scores = {f: unit_hash("ldm.folder.split", f) for f in files}
    val = {f for f in files if scores[f] < val_fraction}
    if not val and val_fraction > 0 and len(files) >= 2:
        val = {min(files, key=scores.__getitem__)}
    chosen = [f for f in files if (f in val) == (split != "train")]
    if not chosen:
        raise ValueError(f"the {split!r} split is empty ({len(files)} files, val_fraction={val_fraction}); "
                         "add images or change val_fraction")
    return chosen


def read_captions(root: Path, files: Sequence[str], texts: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Captions and attribute JSON per relative path, from captions.jsonl then same-name .txt files."""
    captions: dict[str, str] = {}
    attributes: dict[str, str] = {}
    jsonl = root / CAPTIONS_FILE
    if jsonl.is_file():
        with open(jsonl, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    name = Path(entry.get("file", entry.get("file_name"))).as_posix()
                except (json.JSONDecodeError, TypeError, AttributeError) as exc:
                    raise ValueError(f"{jsonl}:{lineno}: expected a JSON object with 'file' and 'caption' "
                                     f"({exc})") from exc
                captions[name] = str(entry.get("caption", entry.get("text", "")))
                if "attributes" in entry:
                    attributes[name] = json.dumps(entry["attributes"], sort_keys=True)
    for f in files:
        txt = Path(f).with_suffix(".txt").as_posix()
        if txt in texts:
            captions[f] = (root / txt).read_text(encoding="utf-8", errors="replace").strip()
    return captions, attributes


class ImageFolderDataset(FileListDataset):
    """Images under ``root`` as samples of side ``resolution`` (see the module docstring).

    Args:
        root: folder searched recursively.
        split: "train", "val", "all" ("test" is the val files: a folder has no separate test set).
        resolution: output side; the shorter side is resized to it (bicubic, antialiased), then cropped.
        crop: "center" or "random" (random applies to the train split only).
        flip: random horizontal flips (p = 0.5, train split only).
        val_fraction: share of files in the val split (by hash of the relative path).
        max_bad_fraction: raise when more than this share of load attempts fail (after 20 attempts).
        extensions: file endings to include (case-insensitive).
        labels: ``"subfolder"``: class labels from the class subfolders (module docstring); None: no labels.

    Yields dicts: image FloatTensor [3, resolution, resolution] in [-1, 1], caption, attributes (JSON
    text), key (path relative to root), n_bad (bad files skipped to produce this sample).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", resolution: int = 256,
                 crop: str = "center", flip: bool = False, val_fraction: float = 0.05,
                 max_bad_fraction: float = 0.05, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 labels: str | None = None) -> None:
        self.root = Path(root).expanduser()
        self.split = check_choice("split", split, SPLITS)
        if labels not in LABEL_SOURCES:
            raise ValueError(f"labels={labels!r} (data.dataset.labels) is not supported; choose null or subfolder")
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        # Augmentation is for training only: evaluation must see the same pixels every epoch.
        train = split == "train"
        self.transform = ImageTransform(resolution, crop if train else "center", flip and train)
        files, texts = scan_folder(self.root, extensions)
        self.classes = class_folders(self.root, files) if labels == "subfolder" else None
        self.files = split_files(files, "val" if split == "test" else split, self.val_fraction)
        captions, self._attributes = read_captions(self.root, self.files, texts)
        self._captions = {f: captions[f] for f in self.files if f in captions}
        self.n_missing_captions = len(self.files) - len(self._captions)
        if self.n_missing_captions:
            log.info("%s: %d of %d images have no caption (using '')", self.root, self.n_missing_captions,
                     len(self.files))
        super().__init__(self.files, f"ImageFolderDataset({str(self.root)!r})", f"images of the {split!r} split",
                         max_bad_fraction)

    def __getitem__(self, index: int) -> dict:
        name, image, n_bad = self._read(index)
        attributes = self._attributes.get(name)
        if self.classes is not None:
            cls = name.split("/", 1)[0]
            attributes = with_label(attributes, self.classes.index(cls), cls)
        return make_sample(image, self._captions.get(name, ""), attributes, name, n_bad)

    def _load(self, name: str):
        return self.transform.load(str(self.root / name))

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, split={self.split!r}, files={len(self.files)}, "
                f"missing_captions={self.n_missing_captions}, {self.transform})")
