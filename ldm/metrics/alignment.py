"""Text alignment for the built-in ``shapes`` dataset: parse a caption, detect the shapes in an image, compare.

evaluate.py generates an image from each caption of the evaluation split and reports the share of images
whose shapes, colours and positions match their caption. The detector reads pixels only; what it knows
(palette, grid, sizes, outlines) comes from ``ldm.data.shapes``, so it follows the renderer.

What "matches" means (``match``):
- ``all``: the multiset of ``ShapeSpec(kind, color, size, position)`` detected equals the caption's, and the
  detected background colour equals the caption's. Extra shapes, missing shapes or any wrong attribute fail.
- ``count``: same number of shapes. ``color`` / ``kind`` / ``size`` / ``position``: the multisets of that
  attribute alone are equal (e.g. "color" holds for a red circle + blue square drawn as a blue circle + red
  square). ``background``: same background colour name.

How the detector reads an image (``detect``), in resolution-independent units:
1. Background: the per-channel median of the border pixels, named by the nearest ``BACKGROUNDS`` colour.
2. Each pixel is modelled as background + alpha * (shape colour - background) for every ``COLORS`` entry
   but the background's name; its colour is the one with the smallest residual (alpha clipped to [0, 1]).
   This reads anti-aliased and blurred edge pixels as partial coverage of the right colour instead of as
   another colour. Pixels with alpha > 0.5 are foreground.
3. Foreground is split into 8-connected regions. Regions whose soft mass (sum of alpha) is below
   ``SPECK_FRACTION`` of the smallest shape's area (a small star; 7.6 px at 64 px) are noise and ignored. A
   region heavy in several grid cells is cut along the cell borders when the pieces fit outlines better
   than the whole (two large shapes in adjacent cells can touch; rendered shapes never cross a border).
4. A region's colour is the palette colour with the smallest summed residual over its pixels. Its
   coverage is scaled so that its interior reads 1 (generated colours are a little off). Its kind is the
   outline (``shape_outline``) whose anti-aliased rendering, put on the region's centroid and scaled to its
   soft area, overlaps the coverage best (soft IoU); the templates are also tried blurred (``_BLURS``, one
   blur per image). Size: the fitted half-side against the geometric mean of the small and large
   half-sides. Position: the grid cell of the fitted box centre.

Accuracy (``python benchmarks/alignment_accuracy.py``, 1000 val images, up to 3 shapes): ``all`` 100% at 64,
128 and 256 px and 98.8% at 32 px on rendered images; after a 0.6 px blur and noise of sigma 8/255, 99.7% at
64 px but 91.5% at 32 px, where small shapes are ~5 px wide and circle/hexagon/star blur together. So below
``MIN_RELIABLE_RESOLUTION`` ``alignment_score`` warns; its per-attribute shares show the kind share apart.
"""

from __future__ import annotations

import collections
import itertools
import math
import multiprocessing
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm.data.shapes import BACKGROUNDS, COLORS, GRID, POSITIONS, SHAPES, SIZES, shape_outline
from ldm.metrics.pixel_ops import blur, dilate, label_regions
from ldm.metrics.shape_captions import ShapeSpec, format_caption, parse_caption  # noqa: F401  (re-exported)

ATTRIBUTES: tuple[str, ...] = ("all", "count", "color", "kind", "position", "size", "background")
SPECK_FRACTION = 0.25  # regions lighter than 1/4 of the smallest shape (a small star) are noise
MIN_RELIABLE_RESOLUTION = 64  # below this, kinds of small shapes (a few pixels wide) suffer from any blur
_SS = 4  # supersampling of the outline templates, as render_scene at <= 256 px
# Gaussian blurs (px) tried on the templates, one chosen per image: decoded images are softer than renders.
_BLURS: tuple[float, ...] = (0.0, 0.5, 0.8, 1.1)


def _unit_shape(kind: str) -> tuple[float, float, float]:
    """(area, centroid dx, centroid dy) of ``kind``'s outline at centre (0, 0) and half-side 1 (shoelace)."""
    if kind == "circle":  # shape_outline gives the circle's box corners
        return math.pi, 0.0, 0.0
    pts = shape_outline(kind, 0.0, 0.0, 1.0)
    a = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True):
        cross = x0 * y1 - x1 * y0
        a, cx, cy = a + cross / 2, cx + (x0 + x1) * cross, cy + (y0 + y1) * cross
    return abs(a), cx / (6.0 * a), cy / (6.0 * a)


_UNIT = {kind: _unit_shape(kind) for kind in SHAPES}
_HALF = {name: side / GRID / 2 for name, side in SIZES.items()}  # half-side of a shape's box, image units
_SIZE_SPLIT = math.sqrt(min(_HALF.values()) * max(_HALF.values()))  # geometric mean: equal log margins
# Smallest shape area, as a fraction of the image: the noise threshold scales with it.
_MIN_AREA = min(area for area, _, _ in _UNIT.values()) * min(_HALF.values()) ** 2


def _template(kind: str, cx: float, cy: float, r: float, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Anti-aliased coverage [h, w] in [0, 1] of ``kind`` at pixel centre (cx, cy), half-side r, drawn the
    way ``render_scene`` draws it (supersampled, box-downsampled), on the window starting at (x0, y0)."""
    img = Image.new("L", (w * _SS, h * _SS), 0)
    draw = ImageDraw.Draw(img)
    pts = [((x - x0) * _SS, (y - y0) * _SS) for x, y in shape_outline(kind, cx, cy, r)]
    if kind == "circle":
        draw.ellipse([pts[0], pts[1]], fill=255)
    else:
        draw.polygon(pts, fill=255)
    return np.asarray(img.reduce(_SS), dtype=np.float32) / 255.0


def _to_rgb(image) -> np.ndarray:
    """uint8 HxWx3 array, PIL image, float HxWx3 array in [0, 1], or tensor [3,H,W] (uint8 or float in
    [0, 1]) -> float32 [H, W, 3] in [0, 255]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be [3, H, W], got {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 (numpy/PIL) or [3,H,W] (tensor), got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    if not (image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"image dtype must be uint8 or float, got {image.dtype}")
    if image.dtype != np.uint8 and image.size and (image.min() < -0.05 or image.max() > 1.05):
        raise ValueError(f"float images must be in [0, 1], got [{image.min():.3f}, {image.max():.3f}]"
                         " (map [-1, 1] images with (x + 1) / 2)")
    rgb = image.astype(np.float32) if image.dtype == np.uint8 else np.clip(image, 0, 1).astype(np.float32) * 255
    if rgb.shape[0] != rgb.shape[1] or rgb.shape[0] < 8:
        raise ValueError(f"image must be square and at least 8 px, got {rgb.shape[1]}x{rgb.shape[0]}")
    return rgb


def _cell_of(x: float, y: float, side: int) -> int:
    col = min(max(int(x / side * GRID), 0), GRID - 1)
    row = min(max(int(y / side * GRID), 0), GRID - 1)
    return row * GRID + col


@dataclass
class _Fit:
    """One region read against every outline: ``iou[b, k]`` for template blur ``_BLURS[b]``, kind ``SHAPES[k]``;
    ``geometry[k]`` = fitted box centre (x, y) and half-side in pixels."""

    color: int
    mass: float
    iou: np.ndarray
    geometry: list[tuple[float, float, float]]


def _fit_region(part: np.ndarray, others: np.ndarray, cover: np.ndarray, resid: np.ndarray,
                min_mass: float) -> _Fit | None:
    """Fit one foreground region ``part`` (bool [H, W]); ``cover``/``resid`` [H, W, K] per palette colour.

    None for a speck. Works on the region's bounding box plus a margin, so cost scales with the shape.
    """
    ys, xs = np.nonzero(part)
    side = part.shape[0]
    y0, y1 = max(int(ys.min()) - 4, 0), min(int(ys.max()) + 5, side)
    x0, x1 = max(int(xs.min()) - 4, 0), min(int(xs.max()) + 5, side)
    win = (slice(y0, y1), slice(x0, x1))
    color = int(np.argmin(resid[ys, xs].sum(0)))
    area = dilate(part[win], 2) & ~others[win]  # partial-coverage edge pixels belong to the region too
    a = np.where(area, cover[win][..., color], 0.0)
    # Generated colours are a little off, so fully covered pixels need not read 1: take the coverage of the
    # region's interior (pixels >= 2 px inside its border, which a blur of ~1 px leaves alone) as 1 when it
    # has enough of them.
    inner = ~dilate(~part[win], 2)
    if inner.sum() >= 9:
        a = a / float(np.clip(np.median(a[inner]), 0.75, 1.25))
    mass = float(a.sum())
    if mass < min_mass:
        return None
    h, w = a.shape
    gy, gx = np.mgrid[y0:y1, x0:x1] + 0.5
    mx, my = float((a * gx).sum()) / mass, float((a * gy).sum()) / mass
    iou = np.zeros((len(_BLURS), len(SHAPES)))
    geometry = []
    for k, kind in enumerate(SHAPES):
        unit_area, ox, oy = _UNIT[kind]
        r = math.sqrt(mass / unit_area)  # scale the outline to the region's soft area ...
        cx, cy = mx - ox * r, my - oy * r  # ... and put its centroid on the region's centroid
        # One Newton step on the rendered template: rasterisation adds ~0.1 px around the outline, which
        # matters for shapes a few pixels wide (d area / d r = 2 area / r).
        t = _template(kind, cx, cy, r, x0, y0, w, h)
        tm = float(t.sum())
        if tm > 0:
            r *= 1.0 + (mass - tm) / (2.0 * tm)
            cx += mx - float((t * gx).sum()) / tm
            cy += my - float((t * gy).sum()) / tm
            t = _template(kind, cx, cy, r, x0, y0, w, h)
        geometry.append((cx, cy, r))
        full = max(float(t.sum()), unit_area * r * r)  # template cut off by the window counts as a miss
        for b, sigma in enumerate(_BLURS):
            tb = blur(t, sigma) if sigma else t
            inter = float(np.minimum(a, tb).sum())
            iou[b, k] = inter / (mass + full - inter)
    return _Fit(color, mass, iou, geometry)


def detect(image) -> tuple[list[ShapeSpec], str]:
    """Shapes (in reading order of their cells) and background colour name seen in ``image``.

    ``image``: uint8 numpy [H, W, 3] (or a PIL image, or float numpy in [0, 1]) or a torch tensor [3, H, W],
    uint8 or float in [0, 1]; square, any resolution >= 8 (reliable from ``MIN_RELIABLE_RESOLUTION`` px).
    """
    return _detect_rgb(_to_rgb(image))


def _detect_rgb(rgb: np.ndarray) -> tuple[list[ShapeSpec], str]:
    """``detect`` on float32 [H, W, 3] in [0, 255]."""
    side = rgb.shape[0]
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    bg = np.median(border, axis=0).astype(np.float32)
    background = min(BACKGROUNDS, key=lambda n: float(((np.array(BACKGROUNDS[n]) - bg) ** 2).sum()))
    names = [c for c in COLORS if c != background]  # a shape of the background's colour would be invisible
    d = np.array([COLORS[c] for c in names], dtype=np.float32) - bg  # [K, 3]
    x = rgb - bg  # [H, W, 3]
    dd = np.maximum((d * d).sum(1), 1.0)  # > 0 even if a (generated) background equals a shape colour
    proj = (x @ d.T) / dd  # [H, W, K]: coverage if the pixel had colour k
    alpha = np.clip(proj, 0.0, 1.0)
    # |x - alpha d|^2 = |x|^2 - 2 alpha (x . d) + alpha^2 |d|^2, with x . d = proj |d|^2
    resid = (x * x).sum(-1, keepdims=True) + dd * alpha * (alpha - 2.0 * proj)  # [H, W, K]
    best = np.take_along_axis(alpha, resid.argmin(-1)[..., None], -1)[..., 0]
    fg = best > 0.5
    # Soft coverage for areas and template fits: not clipped at 0, so background noise averages out.
    cover = np.clip(proj, -0.5, 1.5)
    labels, n = label_regions(fg)
    min_mass = SPECK_FRACTION * _MIN_AREA * side * side
    ys, xs = np.mgrid[0:side, 0:side]
    cells = ((ys + 0.5) * GRID // side).astype(int) * GRID + ((xs + 0.5) * GRID // side).astype(int)
    fits: list[_Fit] = []
    for i in range(1, n + 1):
        comp = labels == i
        whole = _fit_region(comp, fg & ~comp, cover, resid, min_mass)
        masses = np.bincount(cells[comp], weights=best[comp], minlength=GRID * GRID)
        heavy = np.nonzero(masses >= min_mass)[0]
        if len(heavy) > 1:
            # Rendered shapes never cross a cell border, but two large ones in adjacent cells can touch at a
            # pixel: cut along the borders when the pieces fit outlines better than the whole region does.
            pieces = [f for f in (_fit_region(p, fg & ~p, cover, resid, min_mass)
                                  for p in (comp & (cells == c) for c in heavy)) if f is not None]
            fit = sum(f.iou.max() * f.mass for f in pieces) / max(sum(f.mass for f in pieces), 1e-9)
            if whole is None or fit > whole.iou.max():
                fits += pieces
                continue
        if whole is not None:
            fits.append(whole)
    # One blur for the whole image (all shapes went through the same decoder): the best total fit.
    b = int(np.argmax(sum(f.mass * f.iou.max(1) for f in fits))) if fits else 0
    found = []
    for f in fits:
        k = int(np.argmax(f.iou[b]))
        cx, cy, r = f.geometry[k]
        size = "large" if r / side > _SIZE_SPLIT else "small"
        found.append(ShapeSpec(SHAPES[k], names[f.color], size, POSITIONS[_cell_of(cx, cy, side)]))
    found.sort(key=lambda s: POSITIONS.index(s.position))
    return found, background


def _compare(detected: list[ShapeSpec], det_bg: str, wanted: list[ShapeSpec], want_bg: str) -> dict[str, bool]:
    def same(attr: str) -> bool:
        return Counter(getattr(s, attr) for s in detected) == Counter(getattr(s, attr) for s in wanted)

    out = {
        "count": len(detected) == len(wanted),
        "color": same("color"), "kind": same("kind"), "position": same("position"), "size": same("size"),
        "background": det_bg == want_bg,
    }
    out["all"] = Counter(detected) == Counter(wanted) and out["background"]
    return {k: bool(out[k]) for k in ATTRIBUTES}


def match(image, caption: str) -> dict[str, bool]:
    """Does ``image`` show what ``caption`` says? Keys ``ATTRIBUTES``; see the module docstring."""
    wanted, want_bg = parse_caption(caption)
    detected, det_bg = detect(image)
    return _compare(detected, det_bg, wanted, want_bg)


def _chunk_totals(chunk: Iterable[tuple[np.ndarray, tuple[list[ShapeSpec], str]]]) -> dict[str, int]:
    """Matches per attribute over ``[(rgb float32 [H, W, 3], parsed caption)]`` (a worker's share)."""
    totals = dict.fromkeys(ATTRIBUTES, 0)
    for rgb, (wanted, want_bg) in chunk:
        for key, ok in _compare(*_detect_rgb(rgb), wanted, want_bg).items():
            totals[key] += ok
    return totals


def _chunks(pairs: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# With workers=None the detector is timed on the first chunk, and worker processes take the rest only when it would
# run longer than this in one process: a spawned worker pays seconds of start-up (it imports numpy, torch, PIL) and
# the detector takes ~3 ms per 64 px image of a trained model, so a few thousand images are faster in one process.
SPAWN_WORTH_S = 20.0
CHUNK = 32


def alignment_score(images: Iterable | torch.Tensor, captions: Sequence[str], workers: int | None = None) -> dict:
    """Share of ``images`` that match their ``captions`` (``match``'s ``all``) and per attribute.

    ``images``: a sequence or iterable of images as ``detect`` takes them, or a tensor [B, 3, H, W] (uint8, or
    float in [0, 1]). ``workers``: processes that run the detector (0 = in this process); None = in this process
    unless the first ``CHUNK`` images say the rest would take over ``SPAWN_WORTH_S`` seconds, then up to 8, one
    per CPU core. The result does not depend on it. Generated images of an untrained model can be noise with
    dozens of blobs, each fitted against every outline (~40 ms per image instead of ~3), which is when processes
    pay. Returns {"alignment": float, "per_attribute": {attribute: float}, "n": int};
    attributes are ``ATTRIBUTES`` ("all" included). Warns when images are smaller than
    ``MIN_RELIABLE_RESOLUTION``.
    """
    captions = list(captions)
    if hasattr(images, "__len__") and len(images) != len(captions):
        raise ValueError(f"got {len(images)} images for {len(captions)} captions")
    parsed = [parse_caption(c) for c in captions]  # fail on a bad caption before detecting anything
    warned = False
    n = 0

    def pairs() -> Iterator[tuple[np.ndarray, tuple[list[ShapeSpec], str]]]:
        nonlocal warned, n
        for image, caption in zip(images, parsed, strict=False):
            rgb = _to_rgb(image)
            if rgb.shape[0] < MIN_RELIABLE_RESOLUTION and not warned:
                warnings.warn(f"alignment at {rgb.shape[0]} px: below {MIN_RELIABLE_RESOLUTION} px small shapes "
                              "are a few pixels wide and their kinds are unreliable once blurred or noisy (see "
                              "per_attribute['kind'])", stacklevel=3)
                warned = True
            n += 1
            yield rgb, caption

    todo = pairs()
    parts: list[dict[str, int]] = []
    if workers is None:  # time the first chunk here; spread the rest only when that pays for the processes
        started = time.perf_counter()
        parts.append(_chunk_totals(itertools.islice(todo, CHUNK)))
        left = (time.perf_counter() - started) / max(n, 1) * (len(captions) - n)
        workers = min(8, os.cpu_count() or 1) if left > SPAWN_WORTH_S else 0
    parts.extend([_chunk_totals(todo)] if workers <= 1 else _parallel_totals(todo, workers, CHUNK))
    totals = dict.fromkeys(ATTRIBUTES, 0)
    for part in parts:
        for key, value in part.items():
            totals[key] += value
    if n != len(captions):
        raise ValueError(f"got {n} images for {len(captions)} captions")
    if n == 0:
        raise ValueError("alignment_score needs at least one image")
    per = {k: totals[k] / n for k in ATTRIBUTES}
    return {"alignment": per["all"], "per_attribute": per, "n": n}


def _parallel_totals(pairs: Iterator, workers: int, chunk: int = CHUNK) -> Iterator[dict[str, int]]:
    """``_chunk_totals`` of successive chunks in ``workers`` spawned processes (spawn: safe beside CUDA and
    threads), with at most two chunks per worker in flight so that a long iterator is never held in memory."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: collections.deque = collections.deque()
        for part in _chunks(pairs, chunk):
            pending.append(pool.submit(_chunk_totals, part))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
