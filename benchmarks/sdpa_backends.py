"""Each SDPA backend on the attention shapes of a U-Net training step (issue 16: "the fastest SDPA backend for each
attention shape"): forward + backward time per call, bf16, and the step total weighted by how often each shape runs.

    python benchmarks/sdpa_backends.py --preset sd15 --out sdpa_sd15.json

Shapes come from the preset itself: a forward pass of the U-Net records every ``F.scaled_dot_product_attention``
call (query/key shapes, mask) with the batch and latent size of ``train_vs_loop.py`` (sd15: batch 32 on 64x64
latents with a 160-token masked context; small: batch 256 on 16x16 with 48 tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {"sd15": (32, 64, 160, 768), "small": (256, 16, 48, 128)}  # batch, latent size, context tokens, width
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def record_shapes(preset: str, device: torch.device) -> Counter:
    """(q shape, k shape, masked) -> calls per forward, from one forward of the preset's U-Net (meta tensors)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    batch, size, tokens, width = PRESETS[preset]
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "unet"), version_base="1.3"):
        cfg = compose(preset, overrides=[f"context_dim={width}"])
    seen: Counter = Counter()
    original = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen[(tuple(q.shape), tuple(k.shape), attn_mask is not None)] += 1
        return original(q, k, v, attn_mask=attn_mask, **kw)

    with torch.device("meta"):
        unet = instantiate(cfg)
        x = torch.zeros(batch, 4, size, size)
        ctx = torch.zeros(batch, tokens, width)
        mask = torch.ones(batch, tokens, dtype=torch.bool)
        F.scaled_dot_product_attention = spy
        try:
            unet(x, torch.zeros(batch), context=ctx, context_mask=mask)
        finally:
            F.scaled_dot_product_attention = original
    return seen


def time_backend(q_shape, k_shape, masked: bool, backend, device, reps: int) -> float | None:
    """Milliseconds for one forward + backward with only ``backend`` allowed (None: torch's own choice); None if
    the backend cannot run this shape."""
    q = torch.randn(q_shape, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(k_shape, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(k_shape, device=device, dtype=torch.bfloat16, requires_grad=True)
    mask = None
    if masked:
        mask = torch.ones(k_shape[0], 1, 1, k_shape[2], device=device, dtype=torch.bool)
        mask[: k_shape[0] // 2, ..., k_shape[2] // 2:] = False  # half the rows padded, as captions are
    grad = torch.randn(q_shape, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
            for _ in range(3):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad)
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad)
            end.record()
            torch.cuda.synchronize(device)
    except RuntimeError:
        return None
    return start.elapsed_time(end) / reps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="sd15", choices=sorted(PRESETS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    shapes = record_shapes(args.preset, device)
    rows = []
    for (q_shape, k_shape, masked), calls in sorted(shapes.items()):
        row = {"q": q_shape, "k": k_shape, "masked": masked, "calls_per_step": calls}
        for name, backend in {**BACKENDS, "default": None}.items():
            if name == "math" and q_shape[2] * k_shape[2] * q_shape[0] * q_shape[1] > 2**31:
                row[name] = None  # the math path materialises the score matrix: tens of GiB here
            else:
                row[name] = time_backend(q_shape, k_shape, masked, backend, device, args.reps)
        row["fastest"] = min((n for n in BACKENDS if row[n] is not None), key=lambda n: row[n])
        rows.append(row)
        print(json.dumps(row), flush=True)
    # per step, for each backend that ran every shape, and for the fastest backend of each shape
    totals = {name: round(sum(r[name] * r["calls_per_step"] for r in rows), 2)
              for name in [*BACKENDS, "default"] if all(r[name] is not None for r in rows)}
    totals["fastest_each"] = round(sum(r[r["fastest"]] * r["calls_per_step"] for r in rows), 2)
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "preset": args.preset,
              "command": " ".join(sys.argv), "shapes": rows,
              "ms_per_step_forward_backward": totals}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["ms_per_step_forward_backward"]), flush=True)
    return report


if __name__ == "__main__":
    main()
