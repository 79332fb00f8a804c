"""Emoji images with their names as captions, from the npm packages ``emoji-datasource-<vendor>``.

The packages (iamcal/emoji-data; images: Twitter Twemoji CC-BY 4.0, Google Noto Apache-2.0) ship
``emoji.json`` (one entry per emoji: "name", "short_name", "category", "image", "has_img_<vendor>",
"skin_variations") and 64 x 64 RGBA PNGs in ``img/<vendor>/64/``. Install with::

    npm install emoji-datasource-twitter      # or emoji-datasource-google

in the directory you train from (creates ./node_modules), or point ``root``/``$LDM_EMOJI_ROOT`` at it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ldm.data.common import (
    FileListDataset,
    ImageTransform,
    article,
    check_choice,
    check_fraction,
    check_resolution,
    make_sample,
    unit_hash,
)

VENDORS = ("twitter", "google")
SPLITS = ("train", "val", "test", "all")
# Unicode skin tone modifiers (Fitzpatrick types), used to caption skin-tone variants.
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark",
              "1F3FF": "dark"}


def package_name(vendor: str) -> str:
    return f"emoji-datasource-{vendor}"


def find_emoji_package(vendor: str, root: str | os.PathLike | None = None) -> Path:
    """The package folder (holding emoji.json and img/<vendor>/64).

    ``root`` may be the package folder itself, a ``node_modules`` folder or a folder containing
    ``node_modules``. Without ``root``: $LDM_EMOJI_ROOT, ./node_modules, ~/node_modules and the usual global
    npm folders are searched. Raises FileNotFoundError with install instructions when nothing is found.
    """
    name = package_name(check_choice("vendor", vendor, VENDORS))
    if root is not None:
        bases = [Path(root).expanduser()]
    else:
        bases = [Path(p).expanduser() for p in (os.environ.get("LDM_EMOJI_ROOT"), ".", "~") if p]
        bases += [Path("/usr/local/lib/node_modules"), Path("/usr/lib/node_modules")]
    candidates = []
    for base in bases:
        candidates += [base, base / name, base / "node_modules" / name]
    for c in candidates:
        if (c / "emoji.json").is_file() and (c / "img" / vendor / "64").is_dir():
            return c
    looked = "\n  ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"npm package {name!r} not found; looked in:\n  {looked}\n"
        f"Install it with `npm install {name}` (in the folder you run from, creating ./node_modules), "
        f"or pass root=<folder containing node_modules> or set LDM_EMOJI_ROOT."
    )


def emoji_caption(name: str, skin_tone: str | None = None) -> str:
    """"GRINNING FACE" -> "a grinning face"; with a skin tone: "a waving hand sign, medium skin tone"."""
    caption = article(" ".join(name.lower().split()))
    return f"{caption}, {skin_tone} skin tone" if skin_tone else caption


def list_emoji(package: Path, vendor: str, include_skin_tones: bool = False) -> list[dict]:
    """Entries {"file", "caption", "attributes"} for every emoji whose image exists, sorted by file."""
    with open(package / "emoji.json", encoding="utf-8") as fh:
        table = json.load(fh)
    img_dir = package / "img" / vendor / "64"
    items = []
    for e in table:
        variants = [(e, None)]
        if include_skin_tones:
            variants += [(v, SKIN_TONES.get(code.split("-")[0])) for code, v in e.get("skin_variations", {}).items()]
        for v, tone in variants:
            if not v.get(f"has_img_{vendor}", True) or not (img_dir / v["image"]).is_file():
                continue
            name = e.get("name") or e.get("short_name", "")
            attrs = {"name": name, "short_name": e.get("short_name"), "category": e.get("category"),
                     "subcategory": e.get("subcategory"), "unified": v.get("unified"), "vendor": vendor}
            if tone:
                attrs["skin_tone"] = tone
            items.append({"file": v["image"], "caption": emoji_caption(name, tone),
                          "attributes": json.dumps(attrs, sort_keys=True)})
    return sorted(items, key=lambda item: item["file"])


class EmojiDataset(FileListDataset):
    """Emoji of one vendor (see the module docstring) as captioned images.

    Args:
        root: package / node_modules folder; None searches the default places.
        split: "train", "val", "all" ("test" is the val set); split by a stable hash of the file name.
        resolution: output side; the 64 px images are resized (bicubic) when it differs.
        vendor: "twitter" or "google".
        val_fraction: share of emoji in the val split.
        flip: random horizontal flips of the train split (off by default: flags and text do not survive
            mirroring).
        include_skin_tones: also yield the skin-tone variants (about twice as many images).

    Yields dicts: image FloatTensor [3, resolution, resolution] in [-1, 1] (transparency composited on white),
    caption e.g. "a grinning face", attributes (name, short_name, category, ...), key (PNG file name), n_bad.
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", resolution: int = 64,
                 vendor: str = "twitter", val_fraction: float = 0.05, flip: bool = False,
                 include_skin_tones: bool = False, max_bad_fraction: float = 0.05) -> None:
        check_resolution(resolution)  # before looking for the package: a typo'd setting is named first
        self.vendor = check_choice("vendor", vendor, VENDORS)
        self.split = check_choice("split", split, SPLITS)
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.package = find_emoji_package(vendor, root)
        self.transform = ImageTransform(resolution, "center", flip and split == "train")
        items = list_emoji(self.package, vendor, include_skin_tones)
        if split != "all":
            want_val = split != "train"
            items = [it for it in items if (unit_hash("ldm.emoji", it["file"]) < self.val_fraction) == want_val]
        if not items:
            raise ValueError(f"EmojiDataset split {split!r} is empty (val_fraction={val_fraction})")
        self.items = items
        files = [it["file"] for it in items]
        self._position = {f: i for i, f in enumerate(files)}
        super().__init__(files, f"EmojiDataset({str(self.package)!r})", "emoji images", max_bad_fraction)

    def __getitem__(self, index: int) -> dict:
        name, image, n_bad = self._read(index)
        item = self.items[self._position[name]]
        return make_sample(image, item["caption"], item["attributes"], name, n_bad)

    def _load(self, name: str):
        return self.transform.load(str(self.package / "img" / self.vendor / "64" / name))

    def __repr__(self) -> str:
        return (f"EmojiDataset(vendor={self.vendor!r}, split={self.split!r}, items={len(self.items)}, "
                f"package={str(self.package)!r}, {self.transform})")
