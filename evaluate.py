"""Evaluate a checkpoint of either stage, or two image sets.

    python evaluate.py ckpt=outputs/autoencoder/<run>/checkpoints/last.ckpt        # stage 1: PSNR, SSIM, LPIPS, rFID
    python evaluate.py ckpt=outputs/ldm/<run>/checkpoints/last.ckpt n_samples=1000 sampler=ddim steps=50 cfg_scale=3
    python evaluate.py task=fid real=data/images/val fake=outputs/eval/<run>/images  # FID + KID, no checkpoint
    torchrun --nproc_per_node 8 evaluate.py ckpt=... out_dir=outputs/eval/run1     # generate on every GPU

Reads top to bottom: pick the task from the checkpoint, build the feature extractor (a missing Inception file
stops here), run the task (``ldm/evaluation``), then write results.json + results.md into out_dir, append a row
to the results CSV and print the table (and a paper table beside it with ``compare=``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.checkpoint import build_autoencoder, build_latent_diffusion
from ldm.cli import check_arguments, user_errors
from ldm.config_checks import check_evaluation
from ldm.data.common import check_resolution
from ldm.data.datamodules import canonical_dataset
from ldm.data.shapes import ShapesDataset
from ldm.distributed import broadcast_object, init_distributed
from ldm.evaluation import evaluate_generation, evaluate_image_sets, evaluate_reconstruction
from ldm.losses.lpips import build_lpips
from ldm.metrics.features import build_extractor, resolve_extractor
from ldm.metrics.results import config_hash, report_results
from ldm.pipeline import resolve_sampling
from ldm.runtime import autocast_dtype, resolve_device

log = logging.getLogger("ldm.evaluate")


def latent_geometry(autoencoder) -> dict[str, int]:
    """The autoencoder's downsampling factor ``f`` and latent channels: columns of the results CSV, so that
    ``python -m ldm.report results.csv --x f --y rfid`` draws the paper's rFID-vs-f comparison."""
    return {"f": int(autoencoder.downsample_factor), "z_channels": int(autoencoder.latent_channels)}


def evaluate(cfg: DictConfig) -> dict[str, Any] | None:
    """Run the evaluation ``cfg`` describes; returns the results dict on rank 0 (None on other ranks)."""
    task, ckpt = check_evaluation(cfg)
    if task == "recon":  # the images go through the autoencoder: their side must divide by its factor
        autoencoder, _ = build_autoencoder(ckpt)  # the EMA weights when the run kept them, else the raw ones
        if cfg.resolution is not None:
            check_resolution(cfg.resolution, factor=autoencoder.downsample_factor)
    device = resolve_device(str(cfg.device))
    rank, world = init_distributed(device)
    out_dir = Path(broadcast_object(str(cfg.out_dir)))  # rank 0's folder for every rank (its clock names it)
    name = resolve_extractor(str(cfg.extractor), cfg.inception_weights)  # auto: inception if its file is found
    with open_dict(cfg):
        cfg.extractor = name  # what was measured: the config hash and results name it, never "auto"
    extractor = build_extractor(name, cfg.inception_weights if name == "inception" else cfg.vgg16_weights).to(device)
    if task != "fid" and cfg.resolution is None:  # the checkpoint's training resolution
        with open_dict(cfg):
            cfg.resolution = int(ckpt["ldm"]["config"]["resolution"])
    amp = autocast_dtype(str(cfg.precision), device, half_on_auto=task == "generation")  # recon metrics: fp32
    common = {"device": device, "batch_size": int(cfg.batch_size), "num_workers": int(cfg.num_workers),
              "progress": bool(cfg.progress)}
    log.info("task %s on %s (rank %d of %d), %s features -> %s", task, device, rank, world, extractor.name, out_dir)

    sampler = None
    if task == "fid":
        results = evaluate_image_sets(cfg.real, cfg.fake, extractor, resolution=cfg.resolution,
                                      limit=cfg.n_samples, seed=int(cfg.seed),
                                      max_bad_fraction=float(cfg.max_bad_fraction), **common)
    else:
        dataset = canonical_dataset(instantiate(cfg.data), str(cfg.split))
        name = type(dataset).__name__.removesuffix("Dataset")
        data = {"name": name, "split": cfg.split, "resolution": cfg.resolution, "description": repr(dataset)}
    if task == "recon":
        results = evaluate_reconstruction(
            autoencoder, dataset, extractor=extractor, lpips=build_lpips(cfg.lpips_net) if cfg.lpips_net else None,
            n_images=cfg.n_samples, autocast_dtype=amp, grid_path=out_dir / "reconstructions.png", **common)
        results.update(data=data, lpips_net=cfg.lpips_net, **latent_geometry(autoencoder),
                       weights="ema" if any(k.startswith("autoencoder_ema.") for k in ckpt["state_dict"]) else "raw")
    elif task == "generation":
        model = build_latent_diffusion(ckpt, use_ema=bool(cfg.use_ema)).to(device)
        steps, cfg_scale = resolve_sampling(cfg.steps, cfg.cfg_scale, cfg.sampler.steps, cfg.sampler.cfg_scale)
        sampler = {"name": cfg.sampler.name, "steps": steps, "cfg_scale": cfg_scale,
                   **OmegaConf.to_container(cfg.sampler.options)}
        n = cfg.n_samples
        if n is None:
            if not hasattr(dataset, "__len__"):
                raise ValueError(f"the {cfg.split} split of {dataset!r} has no length: pass n_samples=<images>")
            n = len(dataset)
        results = evaluate_generation(
            model, dataset, checkpoint=cfg.ckpt, out_dir=out_dir, n_samples=int(n), extractor=extractor,
            sampler=sampler["name"], steps=sampler["steps"], cfg_scale=sampler["cfg_scale"], seed=int(cfg.seed),
            sampler_options=OmegaConf.to_container(cfg.sampler.options), autocast_dtype=amp,
            stats_dir=cfg.stats_dir, split=str(cfg.split), resolution=int(cfg.resolution),
            n_reference=cfg.n_reference, overwrite=bool(cfg.overwrite), **common,
            alignment=isinstance(dataset, ShapesDataset) if cfg.alignment == "auto" else bool(cfg.alignment))
        if results is not None:
            results.update(data=data, **latent_geometry(model.autoencoder), weights="ema" if cfg.use_ema and any(
                k.startswith("unet_ema.") for k in ckpt["state_dict"]) else "raw")
    if rank != 0:
        return None
    results.update(checkpoint=None if cfg.ckpt is None else str(cfg.ckpt), sampler=sampler, seed=int(cfg.seed),
                   config_hash=config_hash(OmegaConf.to_container(cfg, resolve=True)), out_dir=str(out_dir))
    report_results(results, out_dir, cfg.results_csv, cfg.compare)
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
@user_errors("python evaluate.py")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    check_arguments("evaluate", "python evaluate.py")
    main()
