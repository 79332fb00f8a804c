"""Training throughput of the latent U-Net, ours against diffusers' UNet2DConditionModel, side by side.

    python benchmarks/unet_train.py --batch 32 --out benchmarks/results/unet_train_h100.json
    python benchmarks/unet_train.py --preset tiny --device cpu --steps 2 --size 8      # smoke check

Both models get the same architecture (diffusers' config is derived from our preset; for ``sd15`` it is
exactly the SD-1.5 config), the same random data and the same training step: eps-prediction MSE at uniformly
random timesteps of the paper's sqrt-linear schedule, bf16 autocast over fp32 master weights, AdamW (fused on
CUDA).
Each model runs in the same process, one after the other, in every requested mode (eager, torch.compile of the
model's forward); model, optimizer and compiled graphs are freed and peak-memory statistics reset in between.
Without diffusers installed only ours runs. Writes a JSON with device, versions, img/s and peak GiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def build_ours(preset: str, context_dim: int | None) -> torch.nn.Module:
    cfg = OmegaConf.load(ROOT / "configs" / "unet" / f"{preset}.yaml")
    if context_dim is not None:
        cfg.context_dim = context_dim
    return instantiate(cfg)


def build_diffusers(preset: str, context_dim: int | None, size: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # only for the config: no memory, no init time
        config = build_ours(preset, context_dim).diffusers_config(sample_size=size)
    return UNet2DConditionModel(**config)


def forward_fn(kind: str, model: Callable) -> Callable:
    if kind == "diffusers":
        return lambda x, t, ctx: model(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
    return lambda x, t, ctx: model(x, t, ctx)


def alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """The paper's schedule: betas linear in sqrt space from 0.00085 to 0.012."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def run_one(kind: str, mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Build one model, train ``warmup + steps`` steps, return img/s and peak memory."""
    torch.manual_seed(args.seed)
    model = (
        build_diffusers(args.preset, args.context_dim, args.size)
        if kind == "diffusers"
        else build_ours(args.preset, args.context_dim)
    )
    n_params = sum(p.numel() for p in model.parameters())
    ctx_dim = model.config.cross_attention_dim if kind == "diffusers" else model.context_dim
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    fwd = forward_fn(kind, torch.compile(model) if mode == "compile" else model)

    gen = torch.Generator(device).manual_seed(args.seed)
    x0 = torch.randn(args.batch, 4, args.size, args.size, device=device, generator=gen)
    ctx = torch.randn(args.batch, args.context_len, ctx_dim, device=device, generator=gen)
    abar = alphas_cumprod().to(device)
    amp = args.precision == "bf16"

    def step() -> torch.Tensor:
        with _sdpa(args.sdpa):
            return _step()

    def _step() -> torch.Tensor:
        noise = torch.randn(x0.shape, device=device, generator=gen)
        t = torch.randint(0, abar.numel(), (args.batch,), device=device, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = fwd(x_t, t, ctx)
        loss = F.mse_loss(out.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(max(args.warmup, 2) if mode == "compile" else args.warmup):  # compile = first 1-2 calls
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    result = {
        "img_per_s": round(args.batch * args.steps / elapsed, 2),
        "step_ms": round(1000 * elapsed / args.steps, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "warmup_s": round(warmup_s, 1),
        "params": n_params,
        "final_loss": round(float(loss), 4),
    }
    if not torch.isfinite(loss):
        raise RuntimeError(f"{kind}/{mode}: loss is {float(loss)}")
    return result  # model, optimizer and data go out of scope here; _free() then empties the caches


def _sdpa(backend: str):
    """Restrict F.scaled_dot_product_attention to one kernel family (default: PyTorch's own choice)."""
    from contextlib import nullcontext

    if backend == "default":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return sdpa_kernel([names[backend]])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks so the next model starts from the same empty GPU."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="sd15", help="configs/unet/<preset>.yaml (sd15 = SD-1.5 U-Net)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64, help="latent height = width")
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--context-dim", type=int, default=None, help="default: the preset's context_dim")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (include compilation)")
    p.add_argument("--modes", default="eager,compile", help="comma list of eager, compile")
    p.add_argument("--models", default="ours,diffusers", help="comma list of ours, diffusers")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16 = bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs (both)")
    p.add_argument("--sdpa", default="default", choices=["default", "cudnn", "flash", "efficient"],
                   help="attention kernel for both models (default: PyTorch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.models = [m for m in args.models.split(",") if m]
    bad = sorted(set(args.modes) - {"eager", "compile"}) + sorted(set(args.models) - {"ours", "diffusers"})
    if bad:
        p.error(f"unknown mode/model {bad}: use --modes eager,compile and --models ours,diffusers")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    skipped = {}
    if "diffusers" in args.models:
        try:
            import diffusers
        except ImportError:
            skipped["diffusers"] = "not installed"
            args.models.remove("diffusers")
    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "diffusers": None
        if "diffusers" in skipped or "diffusers" not in args.models
        else diffusers.__version__,
        "preset": args.preset,
        "batch": args.batch,
        "latents": [4, args.size, args.size],
        "context_len": args.context_len,
        "precision": "bf16 autocast, fp32 master weights" if args.precision == "bf16" else "fp32",
        "optimizer": f"AdamW(lr=1e-4, weight_decay=0.01, fused={device.type == 'cuda'})",
        "channels_last": args.channels_last,
        "sdpa": args.sdpa,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": {},
        "skipped": skipped,
    }
    for kind in args.models:
        for mode in args.modes:
            _free(device)
            res = run_one(kind, mode, args, device)
            report["results"].setdefault(kind, {})[mode] = res
            print(
                f"{kind:9s} {mode:7s} {res['img_per_s']:9.2f} img/s  peak {res['peak_gib']} GiB  "
                f"(warm-up {res['warmup_s']} s, {res['params']:,} params)",
                flush=True,
            )
    _free(device)
    if {"ours", "diffusers"} <= set(report["results"]):
        report["speedup_ours_vs_diffusers"] = {
            mode: round(
                report["results"]["ours"][mode]["img_per_s"]
                / report["results"]["diffusers"][mode]["img_per_s"],
                3,
            )
            for mode in args.modes
        }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
