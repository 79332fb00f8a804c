"""Procedural captioned shapes: a built-in text-to-image dataset that needs no files.

Each image shows 1-3 (up to 9) shapes on a 3 x 3 grid of cells, one shape per cell, so shapes never overlap.
A shape has a kind (circle, square, triangle, star, diamond, hexagon), a named colour, a size (small/large)
and a cell (its position: "top left", "top", ..., "bottom right"); it is jittered inside its cell on a grid
of 17 x 17 steps. The background has a named colour that no shape in the image shares. Captions come from a
small grammar, e.g. "a small red circle on the left and a large blue square on the right, on a gray
background"; ``attributes`` holds the same facts plus normalised boxes for a text-alignment detector.

Determinism and splits:
- a sample's scene is drawn from ``np.random.default_rng([seed, split_code, index])``: it depends only on
  (seed, split, index), not on worker count or call order.
- every scene is a discrete tuple; a stable hash of that tuple assigns it to train (80%), val (10%) or test
  (10%) and a split keeps redrawing (same RNG stream) until it gets one of its own scenes. So no scene, hence
  no image, can appear in two splits, for any seeds.
- rendering is resolution independent (normalised geometry): the same index looks the same at 32 or 256 px.
"""

from __future__ import annotations

import json
import math

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ldm.data.common import (
    article,
    check_choice,
    check_index,
    check_resolution,
    make_sample,
    pil_to_tensor,
    stable_hash,
    with_label,
)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": COLORS["white"],
    "black": COLORS["black"],
    "beige": (222, 205, 160),
    "pink": (250, 175, 200),
}
SIZES: dict[str, float] = {"small": 0.45, "large": 0.8}  # side of the shape's box as a fraction of a cell
GRID = 3
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"
)
# Preposition that reads naturally for each position.
PHRASES: dict[str, str] = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
JITTER_STEPS = 8  # jitter is an integer in [-8, 8] per axis, in units of (free space in the cell) / 8
SPLITS: dict[str, tuple[float, float]] = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}
_MAX_DRAWS = 10_000
_BG_NAMES = tuple(BACKGROUNDS)
_SIZE_NAMES = tuple(SIZES)

# A scene: (background, ((shape, color, size, cell, jx, jy), ...)), shapes in reading order of their cells.
Scene = tuple[str, tuple[tuple[str, str, str, int, int, int], ...]]


def scene_split(scene: Scene) -> str:
    """Which split owns ``scene`` (a fixed function of the scene alone, see the module docstring)."""
    u = stable_hash("ldm.shapes.v1", scene) / 2.0**64
    for name, (low, high) in SPLITS.items():
        if low <= u < high:
            return name
    return "test"


def draw_scene(rng: np.random.Generator, min_shapes: int, max_shapes: int) -> Scene:
    """Draw one scene uniformly: background, shape count, distinct cells, then kind/colour/size/jitter.

    All randomness comes from one ``rng.random`` call (a split may redraw ~10 times, so draws must be cheap).
    """
    cells_n = GRID * GRID
    u = rng.random(2 + cells_n + 5 * max_shapes).tolist()
    background = _BG_NAMES[int(u[0] * len(_BG_NAMES))]
    colors = [c for c in COLORS if c != background]
    n = min_shapes + int(u[1] * (max_shapes - min_shapes + 1))
    cells = sorted(sorted(range(cells_n), key=u[2:2 + cells_n].__getitem__)[:n])
    jit = 2 * JITTER_STEPS + 1
    shapes = []
    for i, cell in enumerate(cells):
        v = u[2 + cells_n + 5 * i: 2 + cells_n + 5 * (i + 1)]
        shapes.append((SHAPES[int(v[0] * len(SHAPES))], colors[int(v[1] * len(colors))],
                       _SIZE_NAMES[int(v[2] * len(_SIZE_NAMES))], cell,
                       int(v[3] * jit) - JITTER_STEPS, int(v[4] * jit) - JITTER_STEPS))
    return background, tuple(shapes)


def shape_geometry(cell: int, size: str, jx: int, jy: int) -> tuple[float, float, float]:
    """Centre (x, y) and half-side r of a shape's box, normalised to [0, 1] image coordinates."""
    row, col = divmod(cell, GRID)
    side = SIZES[size] / GRID
    slack = 0.9 * (1.0 / GRID - side) / 2  # keep a little gap to the cell border
    cx = (col + 0.5) / GRID + slack * jx / JITTER_STEPS
    cy = (row + 0.5) / GRID + slack * jy / JITTER_STEPS
    return cx, cy, side / 2


def _regular(cx: float, cy: float, r: float, n: int, start_deg: float, inner: float | None = None):
    """Vertices of a regular polygon (or a star when ``inner`` is the inner-radius ratio)."""
    pts = []
    count = 2 * n if inner else n
    for k in range(count):
        rad = r * (inner if inner and k % 2 else 1.0)
        a = math.radians(start_deg + 360.0 * k / count)
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def shape_outline(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices in normalised coordinates (y down); a circle returns its bounding box corners."""
    if kind == "circle":
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if kind == "square":
        s = 0.85 * r  # a full-box square looks much heavier than the circle of the same box
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":  # equilateral, pointing up; shifted down so its box is centred
        return _regular(cx, cy + 0.275 * r, 1.1 * r, 3, -90.0)
    if kind == "star":  # five points; the lowest tips sit at r * sin(54 deg), so shift down to centre
        return _regular(cx, cy + 0.095 * r, r, 5, -90.0, inner=0.45)
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if kind == "hexagon":
        return _regular(cx, cy, r, 6, 0.0)
    raise ValueError(f"unknown shape {kind!r}; choose one of {list(SHAPES)}")


def scene_attributes(scene: Scene) -> dict:
    """JSON-able facts: background and per shape kind, colour, size, position, centre and box in [0, 1]."""
    background, shapes = scene
    out = []
    for kind, color, size, cell, jx, jy in shapes:
        cx, cy, r = shape_geometry(cell, size, jx, jy)
        pts = shape_outline(kind, cx, cy, r)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        out.append({
            "shape": kind, "color": color, "size": size, "position": POSITIONS[cell],
            "row": cell // GRID, "col": cell % GRID,
            "center": [round(cx, 4), round(cy, 4)],
            "bbox": [round(min(xs), 4), round(min(ys), 4), round(max(xs), 4), round(max(ys), 4)],
        })
    return {"background": background, "shapes": out}


def scene_caption(scene: Scene) -> str:
    """E.g. "a small red circle on the left and a large blue square on the right, on a gray background"."""
    background, shapes = scene
    parts = [f"{article(f'{size} {color} {kind}')} {PHRASES[POSITIONS[cell]]}"
             for kind, color, size, cell, _, _ in shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed}, on {article(background)} background"


def render_scene(scene: Scene, resolution: int) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``resolution`` x ``resolution``.

    Anti-aliasing: draw at 4x (2x above 256 px) and box-downsample with ``Image.reduce``, i.e. each output
    pixel is the average of ss x ss samples (coverage-weighted colour).
    """
    ss = 4 if resolution <= 256 else 2
    size = resolution * ss
    background, shapes = scene
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    for kind, color, size_name, cell, jx, jy in shapes:
        cx, cy, r = shape_geometry(cell, size_name, jx, jy)
        pts = [(x * size, y * size) for x, y in shape_outline(kind, cx, cy, r)]
        if kind == "circle":
            draw.ellipse([pts[0], pts[1]], fill=COLORS[color])
        else:
            draw.polygon(pts, fill=COLORS[color])
    return img.reduce(ss) if ss > 1 else img


class ShapesDataset(Dataset):
    """Map-style dataset of procedurally rendered captioned shapes (see the module docstring).

    Args:
        split: "train", "val" or "test" (disjoint scene sets).
        size: number of samples of the train split.
        val_size: number of samples of the val and test splits.
        resolution: output side in pixels, 8..1024.
        seed: changes every scene of every split; splits stay disjoint for any seeds.
        min_shapes, max_shapes: shapes per image, 1 <= min <= max <= 9.
        labels: ``"shape"``: each image's class is the kind of its one shape (``SHAPES`` order: 6 classes; needs
            max_shapes=1), in its attributes' ``label`` / ``class_name``; None: no labels.

    Yields dicts: image FloatTensor [3, resolution, resolution] in [-1, 1], caption, attributes (JSON text),
    key "shapes/<split>/<index>", n_bad = 0.
    """

    def __init__(self, split: str = "train", size: int = 10000, resolution: int = 64, seed: int = 0,
                 min_shapes: int = 1, max_shapes: int = 3, val_size: int = 1000, labels: str | None = None) -> None:
        self.split = check_choice("split", split, tuple(SPLITS))
        self.resolution = check_resolution(resolution, 8, 1024)
        if not 1 <= min_shapes <= max_shapes <= GRID * GRID:
            raise ValueError(f"need 1 <= min_shapes <= max_shapes <= {GRID * GRID}, "
                             f"got min_shapes={min_shapes}, max_shapes={max_shapes}")
        n = size if split == "train" else val_size
        if n < 1:
            raise ValueError(f"{'size' if split == 'train' else 'val_size'} must be >= 1, got {n}")
        self.length = int(n)
        self.seed = int(seed)
        self.min_shapes, self.max_shapes = int(min_shapes), int(max_shapes)
        if labels not in (None, "shape"):
            raise ValueError(f"labels={labels!r} (data.dataset.labels) is not supported; choose null or shape")
        if labels == "shape" and self.max_shapes != 1:
            raise ValueError(f"labels=shape labels each image by its shape's kind, so it needs one shape per image: "
                             f"set max_shapes=1 (got {self.max_shapes})")
        self.labels = labels
        self._split_code = stable_hash("ldm.shapes.split", split) % 2**32

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """The scene of sample ``index``, a pure function of (seed, split, index)."""
        rng = np.random.default_rng([self.seed % 2**32, self._split_code, index])
        for _ in range(_MAX_DRAWS):
            scene = draw_scene(rng, self.min_shapes, self.max_shapes)
            if scene_split(scene) == self.split:
                return scene
        raise RuntimeError(f"could not draw a {self.split!r} scene in {_MAX_DRAWS} tries")  # p ~ 0.9**10000

    def __getitem__(self, index: int) -> dict:
        index = check_index(index, self.length, "ShapesDataset")
        scene = self.scene(index)
        image = pil_to_tensor(render_scene(scene, self.resolution))
        attributes = json.dumps(scene_attributes(scene), sort_keys=True)
        if self.labels == "shape":  # class = the kind of the image's one shape, numbered as in SHAPES
            kind = scene[1][0][0]
            attributes = with_label(attributes, SHAPES.index(kind), kind)
        return make_sample(image, scene_caption(scene), attributes, f"shapes/{self.split}/{index:07d}")

    def __repr__(self) -> str:
        return (f"ShapesDataset(split={self.split!r}, size={self.length}, resolution={self.resolution}, "
                f"seed={self.seed}, shapes={self.min_shapes}..{self.max_shapes})")
