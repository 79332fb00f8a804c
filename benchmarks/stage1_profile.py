"""Where a stage-1 `train.py` step spends its time (issue 16): a torch.profiler window inside `train.train(cfg)`.

    python benchmarks/stage1_profile.py --out stage1_profile.json --raw-dir raw/ [-- train.py overrides...]
    python benchmarks/stage1_profile.py --device cpu --batch 2 --resolution 64 --warmup 1 --profile-steps 1 \
        --steps 1 --out x.json -- experiment=null autoencoder=kl_f4_tiny  # smoke

Runs `experiment=paper/kl_f8` on `shapes` (full loss, the GAN from step 0, as perf_device.sh's stage1 jobs) with
W warm-up steps, P profiled steps and S timed steps (`tvl_measure.Window`). The profiled steps carry named ranges
around the parts of the step (autoencoder forward, reconstruction loss with LPIPS, the discriminator, the adaptive
weight, each backward, the optimizer steps, the EMA) so the JSON gives CPU and GPU milliseconds per part, GPU
busy/idle time, kernels per step and GPU time by kernel family; --raw-dir gets the profiler tables as text.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
from train_vs_loop import BenchCallback, compose_train, revision  # noqa: E402
from tvl_measure import RangeProfiler, Window, install_data_timer, ranged  # noqa: E402,F401 (Hydra: __main__.RangeProfiler)

import ldm.lit.autoencoder as lit_autoencoder  # noqa: E402
import ldm.losses.autoencoder as ae_loss  # noqa: E402
from ldm.lit import guard  # noqa: E402


def install_stage1_ranges() -> None:
    """Named ranges (active only while the profiler records) around each part of a stage-1 step."""
    loss = ae_loss.FirstStageLoss
    loss.reconstruction = ranged("ldm.loss.reconstruction (L1+LPIPS)", loss.reconstruction)
    loss.generator_loss = ranged("ldm.loss.generator_loss (all)", loss.generator_loss)
    loss.discriminator_step_loss = ranged("ldm.loss.discriminator_step_loss (fwd)", loss.discriminator_step_loss)
    loss._adaptive_objective = ranged("ldm.loss._adaptive_objective (LPIPS+D backward)", loss._adaptive_objective)
    module = lit_autoencoder.AutoencoderModule
    module._update = ranged("ldm.module._update (backward + step)", module._update)
    lit_autoencoder.ema_update = ranged("ldm.ema_update", lit_autoencoder.ema_update)
    guard.StepGuard.check = ranged("ldm.StepGuard.check (clip + finite)", guard.StepGuard.check)
    pl.LightningModule.manual_backward = ranged("pl.manual_backward", pl.LightningModule.manual_backward)
    pl.LightningModule.log_dict = ranged("pl.LightningModule.log_dict", pl.LightningModule.log_dict)
    from ldm.models.autoencoder import AutoencoderKL
    AutoencoderKL.forward = ranged("ldm.autoencoder.forward", AutoencoderKL.forward)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/stage1_profile"))
    p.add_argument("--raw-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("overrides", nargs="*", help="more train.py overrides (after --)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    install_stage1_ranges()
    install_data_timer()
    run_dir = (args.work_dir / f"run_{int(time.time())}").resolve()
    total = args.warmup + args.profile_steps + args.steps
    overrides = [
        "experiment=paper/kl_f8", "data=shapes", f"resolution={args.resolution}", f"batch_size={args.batch}",
        f"trainer={'gpu' if device.type == 'cuda' else 'cpu'}", "module.scale_lr=false",
        "module.base_learning_rate=1e-4", "loss.disc_start=0", f"trainer.max_steps={total}",
        "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.val_check_interval=100000",
        "trainer.check_val_every_n_epoch=null", "latent_stats_images=16", "trainer.enable_progress_bar=false",
        f"callbacks.throughput.warmup={args.warmup + args.profile_steps}", f"run_name={run_dir.name}",
        "+callbacks.window._target_=train_vs_loop.BenchCallback", "+callbacks.window.key=stage1",
        "+trainer.profiler._target_=__main__.RangeProfiler", *args.overrides]
    window = BenchCallback.registry["stage1"] = Window(device, args.batch, args.warmup, args.profile_steps, args.steps,
                                                       "stage1_train_py", args.raw_dir)
    cfg = compose_train(overrides, run_dir)
    import train as train_py
    t0 = time.perf_counter()
    train_py.train(cfg)  # (its final save and latent statistics come after the window)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "lightning": pl.__version__, "command": " ".join(sys.argv),
        "code_revision": revision(), "overrides": overrides, "wall_s": round(time.perf_counter() - t0, 1),
        "result": window.result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    r = report["result"]
    print(f"stage 1: {r.get('img_per_s')} img/s, peak {r.get('peak_gib')} GiB; profile "
          f"{json.dumps(r.get('profile', {}).get('ranges_gpu_ms_per_step', {}))}", flush=True)
    return report


if __name__ == "__main__":
    main()
