"""Accuracy of the shapes text-alignment detector (ldm/metrics/alignment.py) on real rendered images.

    PYTHONPATH=. python benchmarks/alignment_accuracy.py --n 1000 --split val --resolutions 32 64 128 256
    PYTHONPATH=. python benchmarks/alignment_accuracy.py --n 1000 --noise 8 --blur 0.6   # corrupted images

For each resolution: the share of images whose caption matches (``all``) and per attribute, then two
rejection rates that must stay low: the caption of another image (index + 1), and the own caption with one
shape's colour replaced by another shape colour; and the detector's time per image. ``--noise`` adds
Gaussian noise (sigma in 0..255 units) after a Gaussian blur of ``--blur`` pixels (PIL radius = sigma).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from PIL import Image, ImageFilter

from ldm.data.shapes import COLORS, ShapesDataset, render_scene, scene_caption
from ldm.metrics.alignment import ATTRIBUTES, ShapeSpec, detect, format_caption, match, parse_caption


def corrupt(img: Image.Image, noise: float, blur: float, rng: np.random.Generator) -> np.ndarray:
    """Blur (Gaussian, ``blur`` px) then add Gaussian noise (``noise`` in 0..255), as uint8 HxWx3."""
    if blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    x = np.asarray(img, dtype=np.float32)
    if noise > 0:
        x = x + rng.normal(0.0, noise, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def recolor(caption: str, rng: np.random.Generator) -> str:
    """``caption`` with one shape's colour replaced by another colour that is not the background's."""
    shapes, bg = parse_caption(caption)
    i = int(rng.integers(len(shapes)))
    choices = [c for c in COLORS if c not in (bg, shapes[i].color)]
    s = shapes[i]
    shapes[i] = ShapeSpec(s.kind, str(rng.choice(choices)), s.size, s.position)
    return format_caption(shapes, bg)


def run(n: int, split: str, resolution: int, noise: float, blur: float, seed: int, max_shapes: int = 3) -> dict:
    ds = ShapesDataset(split=split, val_size=n, size=n, resolution=resolution, seed=seed, max_shapes=max_shapes)
    rng = np.random.default_rng(0)
    scenes = [ds.scene(i) for i in range(n)]
    captions = [scene_caption(s) for s in scenes]
    images = [corrupt(render_scene(s, resolution), noise, blur, rng) for s in scenes]
    totals = dict.fromkeys(ATTRIBUTES, 0)
    errors: dict[str, int] = {}
    seconds = 0.0
    for img, cap in zip(images, captions, strict=True):
        start = time.perf_counter()
        detected, _ = detect(img)
        seconds += time.perf_counter() - start
        wanted, _ = parse_caption(cap)
        m = match(img, cap)
        for k in ATTRIBUTES:
            totals[k] += m[k]
        for spec in set(wanted) - set(detected):  # what was missed, keyed by kind/size, for the caveats
            key = f"{spec.size} {spec.kind}"
            errors[key] = errors.get(key, 0) + 1
    other = sum(match(images[i], captions[(i + 1) % n])["all"] for i in range(n))
    swapped = sum(match(images[i], recolor(captions[i], rng))["all"] for i in range(n))
    return {
        "resolution": resolution, "n": n, "split": split, "max_shapes": max_shapes, "noise": noise, "blur": blur,
        "per_attribute": {k: totals[k] / n for k in ATTRIBUTES},
        "other_caption_match": other / n, "recolored_caption_match": swapped / n,
        "ms_per_image": 1000 * seconds / n, "missed_shapes": dict(sorted(errors.items())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--noise", type=float, default=0.0, help="Gaussian noise sigma, 0..255 units")
    ap.add_argument("--blur", type=float, default=0.0, help="Gaussian blur sigma in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shapes", type=int, default=3, help="as configs/data/shapes.yaml (1..9)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    rows = [run(args.n, args.split, r, args.noise, args.blur, args.seed, args.max_shapes) for r in args.resolutions]
    print(f"split={args.split} n={args.n} seed={args.seed} max_shapes={args.max_shapes} noise={args.noise} "
          f"blur={args.blur}")
    print(f"{'res':>4} " + " ".join(f"{k:>10}" for k in ATTRIBUTES) + f" {'other_cap':>10} {'recolored':>10} {'ms/img':>7}")
    for row in rows:
        pa = row["per_attribute"]
        print(f"{row['resolution']:>4} " + " ".join(f"{pa[k]:>10.4f}" for k in ATTRIBUTES)
              + f" {row['other_caption_match']:>10.4f} {row['recolored_caption_match']:>10.4f}"
              f" {row['ms_per_image']:>7.2f}")
    for row in rows:
        if row["missed_shapes"]:
            print(f"missed at {row['resolution']} px: {row['missed_shapes']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
