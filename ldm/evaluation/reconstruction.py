"""Stage-1 evaluation: reconstruct a data split with the autoencoder and measure PSNR, SSIM, LPIPS (mean ± std
over images, as the LDM paper's Table 8) and rFID (the Fréchet distance between the features of the inputs and
of their reconstructions) with a named feature extractor.

Reconstructions use the posterior mode, x̂ = D(mode of q(z|x)), as the paper's evaluation does; PSNR / SSIM /
LPIPS compare x and x̂ in floating point on [0, 1] (``ldm.metrics.image_quality``), the extractor sees both as uint8.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.utils import make_grid, save_image

from ldm.distributed import rank_world
from ldm.evaluation.imagesets import (
    extract,
    feature_metrics,
    finish_rows,
    iterate_batches,
    to_stats,
    to_uint8,
)
from ldm.metrics.image_quality import mean_std, psnr, ssim


@torch.inference_mode()
def evaluate_reconstruction(
    autoencoder: nn.Module,
    dataset: Dataset,
    *,
    extractor: nn.Module,
    lpips: nn.Module | None,
    device: torch.device,
    n_images: int | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    grid_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Reconstruct the first ``n_images`` of ``dataset`` (all when None) and measure them.

    Args:
        autoencoder: ``AutoencoderKL`` in eval mode (``encode(x) -> posterior``, ``decode(z) -> [B,3,H,W]``).
        dataset: samples with ``image`` ``[3, H, W]`` in [-1, 1] (an ``ldm.data`` dataset in its eval view).
        extractor: ``ldm.metrics.features`` extractor for rFID (and rIS with Inception).
        lpips: ``ldm.losses.lpips.LPIPS`` (``lpips(x, y) -> [B]``), or None to skip LPIPS.
        autocast_dtype: autocast for the autoencoder (None: fp32); metrics are always computed in fp32.
        grid_path: where to save the first 8 inputs (top row) over their reconstructions (rank 0).
    Each rank reconstructs its share (``iterate_batches``); per-image values and features are gathered, so
    every rank returns the same dict: ``metrics`` {psnr, ssim, lpips: {mean, std}, rfid, kid, is (Inception only)},
    ``n_images``, ``n_bad``, ``timing``, ``extractor``.
    """
    started = time.perf_counter()
    autoencoder = autoencoder.to(device).eval()
    if lpips is not None:
        lpips = lpips.to(device).eval()
    rows: dict[str, list] = {"index": [], "key": [], "n_bad": []}
    grid = None
    for batch in iterate_batches(dataset, n_images, batch_size, num_workers, "reconstructing", progress):
        x = batch["image"].to(device)
        amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with amp:
            recon = autoencoder.decode(autoencoder.encode(x).mode())
        recon = recon.float().clamp(-1, 1)
        per_image = {"psnr": psnr(x, recon), "ssim": ssim(x, recon)}
        if lpips is not None:
            per_image["lpips"] = lpips(x, recon)
        for name, value in per_image.items():
            rows.setdefault(name, []).append(value.float().cpu().numpy())
        for prefix, images in (("real", x), ("recon", recon)):
            for k, v in extract(extractor, to_uint8(images), device).items():
                rows.setdefault(f"{prefix}_{k}", []).append(v)
        rows["index"].append(batch["index"])
        rows["key"].append(batch["key"])
        rows["n_bad"].append(batch["n_bad"])
        if grid is None:
            grid = torch.cat([x[:8], recon[:8]]).cpu(), min(8, len(x))
    if "psnr" not in rows:
        raise ValueError(f"no images to reconstruct in {dataset!r} (n_images={n_images})")
    out = finish_rows(rows)
    if grid_path is not None and rank_world()[0] == 0 and grid is not None:
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(grid[0], nrow=grid[1], normalize=True, value_range=(-1, 1)), grid_path)

    def stats(prefix: str):
        feats = {"features": out[f"{prefix}_features"]}
        if f"{prefix}_logits" in out:
            feats["logits"] = out[f"{prefix}_logits"]
        return to_stats(feats, extractor, {"images": prefix, "dataset": repr(dataset)})

    metrics: dict[str, Any] = {name: mean_std(out[name]) for name in ("psnr", "ssim", "lpips") if name in out}
    features = feature_metrics(stats("real"), stats("recon"))
    metrics["rfid"] = features.pop("fid")
    metrics.update(features)  # kid; is (with Inception): the paper's rIS, the Inception Score of reconstructions
    seconds = time.perf_counter() - started
    n = len(out["index"])
    return {"task": "recon", "metrics": metrics, "n_images": n, "n_bad": out["n_bad"],
            "extractor": extractor.identity(),
            "timing": {"seconds": round(seconds, 3), "seconds_per_1000_images": round(1000 * seconds / n, 3)}}
