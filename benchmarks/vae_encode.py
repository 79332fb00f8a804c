"""Time KL-f8 VAE encoding, ours against diffusers' AutoencoderKL (SD config), side by side in one process.

    python benchmarks/vae_encode.py --batch 64 --resolution 256 --out benchmarks/results/vae_encode.json

Both models have the same architecture and random weights; we copy ours into diffusers' layout-free by
timing each on its own weights (the arithmetic is identical). bf16 autocast-free: both are cast to bf16.
Modes: eager, and torch.compile (channels_last) for each.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def ours() -> torch.nn.Module:
    return instantiate(OmegaConf.load(ROOT / "configs/autoencoder/kl_f8.yaml"))


def theirs() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=256,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )


def encode_fn(model, kind: str):
    if kind == "ours":
        return lambda x: model.encode(x).mean
    return lambda x: model.encode(x).latent_dist.mean


def bench(fn, x, iters: int, warmup: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x)
        torch.cuda.synchronize()
    return x.shape[0] * iters / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=dev, dtype=torch.bfloat16)
    results = {}
    for kind, build in (("diffusers", theirs), ("ours", ours)):
        for mode in ("eager", "compile"):
            model = build().to(dev, torch.bfloat16).eval().requires_grad_(False)
            xin = x
            if mode == "compile":
                model = model.to(memory_format=torch.channels_last)
                xin = x.contiguous(memory_format=torch.channels_last)
            fn = encode_fn(model, kind)
            if mode == "compile":
                fn = torch.compile(fn)
            rate = bench(fn, xin, args.iters, args.warmup if mode == "eager" else args.warmup + 3)
            results[f"{kind}_{mode}_img_per_s"] = round(rate, 1)
            print(f"{kind:9s} {mode:8s} {rate:8.1f} img/s", flush=True)
            if mode == "eager":  # also eager in channels_last (cuDNN's preferred layout for bf16 convs)
                model = model.to(memory_format=torch.channels_last)
                rate = bench(encode_fn(model, kind), x.contiguous(memory_format=torch.channels_last),
                             args.iters, args.warmup)
                results[f"{kind}_eager_channels_last_img_per_s"] = round(rate, 1)
                print(f"{kind:9s} eager-cl {rate:8.1f} img/s", flush=True)
            del model, fn
            torch.cuda.empty_cache()
    results.update(
        batch=args.batch, resolution=args.resolution, dtype="bfloat16", device=torch.cuda.get_device_name(),
        torch=torch.__version__, python=platform.python_version(),
        command="python benchmarks/vae_encode.py " + f"--batch {args.batch} --resolution {args.resolution}",
    )
    try:
        import diffusers

        results["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
