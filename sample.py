"""Generate images with a trained stage-2 model: prompts in, PNGs and a grid out.

    python sample.py ckpt=outputs/ldm/<run>/checkpoints/last.ckpt prompts="a large red circle in the center, on a black background"
    python sample.py ckpt=... prompts_file=prompts.txt n=16 steps=50 sampler=ddim cfg_scale=4 seed=0

The checkpoint carries everything (U-Net + EMA, condition encoder, autoencoder, latent statistics, schedule).
Writes ``<out_dir>/images/<prompt #>_<image #>.png``, ``grid.png`` (one row per prompt), ``samples.jsonl`` and
``timing.json`` (images/s of the sampling loop, peak GPU memory).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from ldm.cli import check_arguments, user_errors
from ldm.export import load_latent_diffusion
from ldm.pipeline import generate, resolve_sampling
from ldm.runtime import autocast_dtype, resolve_device

log = logging.getLogger("ldm.sample")


def read_prompts(cfg: DictConfig) -> list[str]:
    prompts = list(cfg.prompts) if isinstance(cfg.prompts, ListConfig) else ([] if cfg.prompts is None else [cfg.prompts])
    if cfg.prompts_file is not None:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file={path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError('no prompts: pass prompts="a red circle" (or a list) and/or prompts_file=<one per line>')
    return [str(p) for p in prompts]


def sample(cfg: DictConfig) -> Path:
    prompts = read_prompts(cfg)
    # settings first: a typo must not wait for the checkpoint to load (keys named as the user set them)
    steps, cfg_scale = resolve_sampling(cfg.steps, cfg.cfg_scale, cfg.sampler.steps, cfg.sampler.cfg_scale)
    n = int(cfg.n)
    if n < 1:
        raise ValueError(f"n={n}: images per prompt must be >= 1")
    device = resolve_device(str(cfg.device))
    model = load_latent_diffusion(cfg.ckpt, use_ema=cfg.use_ema).to(device)
    out_dir = Path(cfg.out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    log.info("%d prompts x %d images, %s %d steps, cfg %.2f, seed %d, on %s -> %s", len(prompts), n,
             cfg.sampler.name, steps, cfg_scale, cfg.seed, device, out_dir)

    all_prompts = [p for p in prompts for _ in range(n)]
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with tqdm(total=len(all_prompts), desc="sampling", unit="img") as bar:
        images = generate(model, all_prompts, sampler=cfg.sampler.name, steps=steps, cfg_scale=cfg_scale,
                          generator=generator, sampler_options=dict(cfg.sampler.options), batch_size=int(cfg.batch_size),
                          autocast_dtype=autocast_dtype(str(cfg.precision), device), progress=bar.update)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timing = sampling_timing(images.shape[0], time.perf_counter() - started, device, int(cfg.batch_size))

    records = []
    for i, (prompt, image) in enumerate(zip(all_prompts, images.cpu(), strict=True)):
        path = out_dir / "images" / f"{i // n:03d}_{i % n:03d}.png"
        save_image(image, path, normalize=True, value_range=(-1, 1))
        records.append({"file": str(path.relative_to(out_dir)), "prompt": prompt, "index": i % n})
    save_image(make_grid(images.cpu(), nrow=n, normalize=True, value_range=(-1, 1)), out_dir / "grid.png")
    settings = {"ckpt": str(cfg.ckpt), "sampler": cfg.sampler.name, "steps": steps, "cfg_scale": cfg_scale,
                "seed": int(cfg.seed), "use_ema": bool(cfg.use_ema)}
    with open(out_dir / "samples.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps({**rec, **settings}) + "\n")
    (out_dir / "timing.json").write_text(json.dumps({**timing, **settings}, indent=2) + "\n")
    log.info("wrote %d images and grid.png to %s (%.1f img/s)", len(records), out_dir, timing["images_per_s"])
    return out_dir


def sampling_timing(n: int, seconds: float, device: torch.device, batch_size: int) -> dict:
    """Throughput of the sampling loop (model loading and PNG writing excluded) and, on a GPU, its peak memory."""
    out = {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2), "batch_size": batch_size,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def _one_string(arg: str) -> bool:
    """Whether Hydra reads the override ``arg`` as one plain string (not a sweep, not a parse error)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        override = OverridesParser.create().parse_overrides([arg])[0]
    except Exception:  # noqa: BLE001  (Hydra's grammar errors have several types)
        return False
    return not override.is_sweep_override() and isinstance(override.value(), str)


def quote_prompt_overrides(argv: list[str]) -> list[str]:
    """Make ``prompts=a red circle, on a black background`` mean one prompt: Hydra would read the comma as a sweep
    ("Ambiguous value"), and ``=``, ``(``, ``'``, ``#``, ``!`` ... as grammar errors. Such a value is quoted; values
    Hydra reads as one string, quoted values and lists (``prompts=[a,b]``) are left alone."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key.lstrip("+~") in ("prompts", "prompts_file") and sep and value[:1] not in "[\"'" and \
                not _one_string(arg):
            # Hydra's quoted strings: backslashes are escapes only before a quote (or the closing one)
            value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
@user_errors("python sample.py")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    check_arguments("sample", "python sample.py")
    sys.argv[1:] = quote_prompt_overrides(sys.argv[1:])
    main()
