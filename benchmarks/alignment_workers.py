"""Time the shapes alignment detector on generated images, in this process and spread over spawned workers.

    PYTHONPATH=. python benchmarks/alignment_workers.py --repeat 8 --workers 0 2 auto --out benchmarks/results/alignment_workers_cpu.json

The images are a committed sample grid of run C's stage-2 model (docs/results.md; one per val caption in index
order, 8 per row, 2 px padding), cut back into 64 px images, repeated ``--repeat`` times with their val captions.
``auto`` is alignment_score's default (workers=None). Each setting starts fresh, so the worker rows include the
processes' start-up, as an evaluation pays it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.shapes import ShapesDataset
from ldm.metrics.alignment import alignment_score

GRID = Path(__file__).resolve().parents[1] / "docs" / "eval_runC_long_samples_dpmpp_2m_20_cfg3_h200.png"


def grid_images(path: Path, side: int = 64, pad: int = 2, per_row: int = 8) -> list[np.ndarray]:
    grid = np.asarray(Image.open(path).convert("RGB"))
    rows = (grid.shape[0] - pad) // (side + pad)
    return [grid[pad + r * (side + pad):pad + r * (side + pad) + side, pad + c * (side + pad):pad + c * (side + pad) + side]
            for r in range(rows) for c in range(per_row)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=8)
    p.add_argument("--workers", nargs="+", default=["0", "2", "auto"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    images = grid_images(GRID)
    val = ShapesDataset(split="val", size=1000, val_size=1000, resolution=64)
    captions = [val[i]["caption"] for i in range(len(images))]
    images, captions = images * args.repeat, captions * args.repeat
    rows = {}
    for w in args.workers:
        started = time.perf_counter()
        score = alignment_score(images, captions, workers=None if w == "auto" else int(w))
        seconds = time.perf_counter() - started
        rows[w] = {"seconds": round(seconds, 3), "ms_per_image": round(1000 * seconds / len(images), 3),
                   "alignment": score["alignment"]}
        print(f"workers={w:>4s}: {seconds:6.2f} s for {len(images)} images, alignment {score['alignment']:.3f}",
              flush=True)
    result = {"command": "PYTHONPATH=. python benchmarks/alignment_workers.py --repeat "
                         f"{args.repeat} --workers {' '.join(args.workers)}",
              "images": len(images), "grid": str(GRID.relative_to(GRID.parents[1])), "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "python": platform.python_version(), "results": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
