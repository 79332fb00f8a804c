"""train.py stage=ldm against a hand-written loop of the same recipe, in one process (issue 16).

    python benchmarks/train_vs_loop.py --preset sd15 --modes eager,compiled --out results/train_vs_loop_sd15.json
    python benchmarks/train_vs_loop.py --preset tiny --device cpu --batch 4 --steps 2 --warmup 2 --profile-steps 1  # smoke

For one U-Net preset and each mode (eager; compiled = ``module.compile=true``, i.e. ``unet.compile()`` in place):

1. the hand-written loop: the module's training recipe step by step, built from the same composed Hydra config and
   the same ldm functions (``sample_posterior``/``normalize_latents``, ``training_condition`` with CFG dropout,
   ``DiffusionLoss``, ``poison_if_not_finite``, ``StepGuard.check`` = clip 1.0 + finite check, the configured AdamW
   and LinearLR, ``ema_update`` with ``ema_decay_at``), bf16 autocast over the whole training step as Lightning's
   ``bf16-mixed`` does, the latents of the same cache resident on the GPU. Variants switch one thing each
   (``VARIANTS``): what a component costs, and what a fix would bring;
2. ``train.train(cfg)`` of train.py on that config, in this process (Hydra compose, as the tests do), with a
   callback that times the same window (and the Throughput callback's perf.json for the same batches).

Every path runs W warm-up steps (the last two under ``torch.cuda.set_sync_debug_mode("warn")``, recording where each
host sync comes from), P profiled steps (torch.profiler: CPU ranges of ldm's functions and Lightning's hooks, GPU
kernels, host syncs, GPU idle time), then S timed steps (img/s, peak memory). Writes one JSON (and, with
--raw-dir, the profiler tables as text).

Setup (--setup-dir, built when missing): a stage-1 checkpoint of the tiny KL-f4 autoencoder (--ae-ckpt, or a
3-step train.py run) and a latent cache of `shapes` at the resolution that gives the preset's latents
(sd15: 256 px -> 64x64x4; small: 64 px -> 16x16x4; tiny: 32 px -> 8x8x4). The autoencoder only makes the
cache; the U-Net step is the same as with a KL-f8 at 512 px.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

# the repository whose train.py and ldm/ are measured (TVL_ROOT: e.g. a snapshot of a commit; default: this repo)
ROOT = Path(os.environ.get("TVL_ROOT") or Path(__file__).resolve().parents[1]).resolve()
sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402
from tvl_loop import VARIANTS, Loop  # noqa: E402
from tvl_measure import RangeProfiler, Window, install_data_timer, install_ranges  # noqa: E402,F401 (Hydra: __main__.RangeProfiler)

PRESETS = {  # U-Net preset -> (resolution with the tiny KL-f4 autoencoder, batch, text-encoder overrides)
    "sd15": (256, 32, ["text_encoder=transformer", "text_encoder.width=768", "text_encoder.heads=12"]),
    "small": (64, 256, []),  # stage 2's default text encoder: transformer_small (2 x 128, hashed words)
    "tiny": (32, 64, []),
}
START = time.perf_counter()

# --------------------------------------------------------------------------------------------- config
def compose_train(overrides: list[str], output_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def train_overrides(args, mode: str, run_dir: Path) -> list[str]:
    res, _, text = PRESETS[args.preset]
    o = ["stage=ldm", f"unet={args.preset}", f"resolution={res}", f"batch_size={args.batch}",
         f"autoencoder.pretrained={args.ae_ckpt}", f"cache_dir={args.cache_dir}", f"run_name={run_dir.name}",
         f"module.compile={(args.compile_mode or 'true') if mode == 'compiled' else 'false'}", *text,
         f"trainer.max_steps={args.warmup + args.profile_steps + args.steps}",
         "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.check_val_every_n_epoch=null",
         "trainer.val_check_interval=1000000", f"trainer.enable_progress_bar={str(args.progress_bar).lower()}",
         f"callbacks.throughput.warmup={args.warmup + args.profile_steps}", "callbacks.sample_grid=null",
         "callbacks.model_checkpoint=null", "+trainer.enable_checkpointing=false"]
    if args.device == "cpu":
        o.append("trainer=cpu")
    o += args.train_override
    return o


# ------------------------------------------------------------------------------------------------ setup
def prepare(args) -> None:
    """Stage-1 checkpoint and latent cache (reused when present)."""
    setup = Path(args.setup_dir)
    setup.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.ae_ckpt is None:
        args.ae_ckpt = str(setup / "ae" / "checkpoints" / "last.ckpt")
        if not Path(args.ae_ckpt).is_file():
            cmd = [sys.executable, "train.py", "run_name=ae", f"hydra.run.dir={setup / 'ae'}", "trainer.max_steps=3",
                   "batch_size=4", "data.num_workers=0", "data.dataset.size=64", "data.dataset.val_size=8",
                   "latent_stats_images=32", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
                   "trainer.enable_progress_bar=false", "trainer.val_check_interval=null"]
            subprocess.run(cmd + (["trainer=cpu"] if args.device == "cpu" else []), cwd=ROOT, env=env, check=True)
    res = PRESETS[args.preset][0]
    if args.cache_dir is None:
        args.cache_dir = str(setup / f"cache_{res}px_{args.cache_n}")
    if not (Path(args.cache_dir) / "manifest.json").is_file():
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "ldm.cache", f"autoencoder.pretrained={args.ae_ckpt}", f"out_dir={args.cache_dir}",
               f"resolution={res}", f"data.dataset.size={args.cache_n}", "data.dataset.val_size=64",
               "batch_size=256", f"num_workers={args.workers}", "progress=false", "shard_size=4096",
               f"hydra.run.dir={setup / 'cache_run'}"]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        print(f"[{elapsed()}] cache {args.cache_dir}: {time.perf_counter() - t0:.0f} s", flush=True)


def revision() -> str | None:
    rev = ROOT / "REVISION"  # written beside a snapshot (git archive) of a commit
    if rev.is_file():
        return rev.read_text().strip()
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def elapsed() -> str:
    return f"{time.perf_counter() - START:6.0f} s"


# --------------------------------------------------------------------------------------------- train.py
class BenchCallback(pl.Callback):
    """Drives a Window inside trainer.fit (created from the registry below, as Hydra instantiates callbacks)."""

    registry: dict[str, Window] = {}

    def __init__(self, key: str) -> None:
        self.window = self.registry[key]
        self.i = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.window.before(self.i)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.window.after(self.i)
        self.i += 1


TRAIN_VARIANTS = {  # train.py as benchmarked ("default": no progress bar) and single changes a user may make
    "default": [],
    "cudnn_benchmark": ["trainer.benchmark=true"],          # what trainer=gpu sets
    "progress_bar": ["trainer.enable_progress_bar=true"],   # train.py's default
}


def run_train_py(args, mode: str, device: torch.device, raw_dir: Path | None, variant: str = "default") -> dict:
    import train as train_py

    run_dir = Path(args.work_dir) / f"train_{args.preset}_{mode}_{variant}_{int(time.time())}"
    key = f"{args.preset}_{mode}_{variant}"
    window = Window(device, args.batch, args.warmup, args.profile_steps if variant == "default" else 0, args.steps,
                    f"{args.preset}_{mode}_train_py", raw_dir)
    window.count_ops = args.count_ops
    BenchCallback.registry[key] = window
    overrides = train_overrides(args, mode, run_dir) + TRAIN_VARIANTS[variant] + [
        "+callbacks.perf16._target_=__main__.BenchCallback", f"+callbacks.perf16.key={key}",
        "+trainer.profiler._target_=__main__.RangeProfiler"]
    cfg = compose_train(overrides, run_dir)
    saved = pl.Trainer.save_checkpoint
    pl.Trainer.save_checkpoint = lambda self, *a, **k: None  # train()'s final save (GiBs for sd15): outside the window
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # the loop's models, kept for ABAB
    t0 = time.perf_counter()
    try:
        train_py.train(cfg)
    finally:
        pl.Trainer.save_checkpoint = saved
    result = dict(window.result)
    if held and result.get("peak_gib") is not None:  # train.py's own peak: without what the loop holds meanwhile
        result["peak_gib_with_loop_resident"] = result["peak_gib"]
        result["peak_gib"] = round(result["peak_gib"] - held / 2**30, 3)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    perf = run_dir / "perf.json"
    result["perf_json"] = json.loads(perf.read_text()) if perf.is_file() else None
    result["overrides"] = overrides
    return result


# ------------------------------------------------------------------------------------------------- main
def free(device: torch.device) -> None:
    from torch._dynamo.utils import counters
    counters.clear()  # dynamo_counters() then reports one path each
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def dynamo_counters() -> dict:
    from torch._dynamo.utils import counters
    return {k: dict(v) for k, v in counters.items() if v}


def medians(res: dict) -> dict:
    """Median img/s of each path over the repeats, and train.py's default over each loop variant."""
    runs: dict[str, list[float]] = defaultdict(list)
    for path in ("loop", "train_py"):
        for name, r in res.get(path, {}).items():
            if r.get("img_per_s"):
                runs[f"{path}/{name.split('#')[0]}"].append(r["img_per_s"])
    med = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    out = {"img_per_s": med, "runs": dict(runs)}
    if med.get("train_py/default"):
        out["train_py_over_loop"] = {k.split("/", 1)[1]: round(med["train_py/default"] / v, 3)
                                     for k, v in med.items() if k.startswith("loop/")}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="sd15", choices=sorted(PRESETS))
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--batch", type=int, default=None, help="default: the preset's (sd15 32, small 256)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (eager 5, compiled 8)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=15, help="timed steps")
    p.add_argument("--repeats", type=int, default=1, help="loop and train.py alternate this many times (ABAB)")
    p.add_argument("--variants", default="recipe,all_fixes",
                   help=f"loop variants for eager, comma list of {','.join(VARIANTS)} or 'all'")
    p.add_argument("--compiled-variants", default="recipe,all_fixes")
    p.add_argument("--paths", default="loop,train", help="loop, train or both")
    p.add_argument("--train-variants", default="default", help=f"comma list of {','.join(TRAIN_VARIANTS)}")
    p.add_argument("--compiled-train-variants", default="default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--setup-dir", default="/tmp/train_vs_loop")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--ae-ckpt", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--cache-n", type=int, default=None, help="training latents in the cache (sd15 2048, small 8192)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--progress-bar", action="store_true", help="train.py with its progress bar (the default run)")
    p.add_argument("--compile-mode", default=None, help="compiled mode: a torch.compile mode (module.compile=<mode>)")
    p.add_argument("--count-ops", action="store_true",
                   help="the profiled steps count aten operators per step by issuing line instead of profiling")
    p.add_argument("--train-override", action="append", default=[], help="extra train.py override (repeatable)")
    p.add_argument("--deadline", type=float, default=0, help="seconds: start no new path after this (0 = none)")
    p.add_argument("--raw-dir", type=Path, default=None, help="profiler tables (text) go here")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.batch = args.batch or PRESETS[args.preset][1]
    args.cache_n = args.cache_n or {"sd15": 2048, "small": 8192}.get(args.preset, 512)
    args.setup_dir = str(Path(args.setup_dir).resolve())
    args.work_dir = str(Path(args.work_dir or Path(args.setup_dir) / "runs").resolve())
    args.ae_ckpt = str(Path(args.ae_ckpt).resolve()) if args.ae_ckpt else None
    args.cache_dir = str(Path(args.cache_dir).resolve()) if args.cache_dir else None
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    modes = [m for m in args.modes.split(",") if m]
    install_ranges()
    install_data_timer()
    torch._logging.set_logs(recompiles=True, graph_breaks=True)
    prepare(args)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "lightning": pl.__version__, "preset": args.preset, "batch": args.batch,
        "cache": args.cache_dir, "warmup": args.warmup, "profile_steps": args.profile_steps, "steps": args.steps,
        "command": " ".join(sys.argv), "code": str(ROOT), "code_revision": revision(), "results": {},
    }

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")

    for mode in modes:
        warmup = args.warmup if args.warmup is not None else (8 if mode == "compiled" else 5)
        args_m = argparse.Namespace(**{**vars(args), "warmup": warmup})
        res = report["results"].setdefault(mode, {})
        cfg = compose_train(train_overrides(args_m, mode, Path(args.work_dir) / "compose"), Path(args.work_dir))
        loop = None
        for rep in range(args.repeats):  # loop and train.py alternate (ABAB): drifts of the machine hit both
            tag = f"#{rep}" if rep else ""
            if "loop" in args.paths:
                names = args.variants if mode == "eager" else args.compiled_variants
                names = list(VARIANTS) if names == "all" else [n for n in names.split(",") if n]
                if loop is None:
                    free(device)
                    loop = Loop(cfg, device, compiled=mode == "compiled")
                for name in names:
                    if args.deadline and time.perf_counter() - START > args.deadline:
                        res.setdefault("skipped", []).append(f"loop/{name}{tag}")
                        continue
                    window = Window(device, args.batch, warmup, args.profile_steps if name in ("recipe", "all_fixes")
                                    and not rep else 0, args.steps, f"{args.preset}_{mode}_loop_{name}", args.raw_dir)
                    window.count_ops = args.count_ops
                    t0 = time.perf_counter()
                    r = loop.run(window, VARIANTS[name])
                    r["wall_s"] = round(time.perf_counter() - t0, 1)
                    res.setdefault("loop", {})[name + tag] = r
                    print(f"[{elapsed()}] {args.preset} {mode:8s} loop/{name + tag:16s} {r['img_per_s']:9.1f} img/s "
                          f"peak {r['peak_gib']} GiB  syncs/step {r.get('host_syncs_per_step')}", flush=True)
                    save()
            if "train" in args.paths:
                names = args.train_variants if mode == "eager" else args.compiled_train_variants
                for name in [n for n in names.split(",") if n]:
                    if args.deadline and time.perf_counter() - START > args.deadline:
                        res.setdefault("skipped", []).append(f"train_py/{name}{tag}")
                        continue
                    torch.backends.cudnn.benchmark = False
                    r = run_train_py(args_m, mode, device, args.raw_dir if not rep else None, name)
                    res.setdefault("train_py", {})[name + tag] = r
                    print(f"[{elapsed()}] {args.preset} {mode:8s} train.py/{name + tag:15s} {r.get('img_per_s')} img/s "
                          f"peak {r.get('peak_gib')} GiB  syncs/step {r.get('host_syncs_per_step')}  data wait "
                          f"{r.get('data_wait_fraction')}  (perf.json {(r['perf_json'] or {}).get('images_per_s')})",
                          flush=True)
                    res[f"dynamo_counters_after_train_py_{name}{tag}"] = dynamo_counters()
                    save()
        if loop is not None:
            del loop
            res["dynamo_counters_after_loop"] = dynamo_counters()
            free(device)
        res["medians"] = medians(res)
        loop_res = res.get("loop", {})
        train_default = res.get("train_py", {}).get("default", {})
        if train_default.get("img_per_s"):
            res["train_py_over_loop"] = {k: round(train_default["img_per_s"] / v["img_per_s"], 3)
                                         for k, v in loop_res.items() if v.get("img_per_s")}
        save()
    save()
    return report


if __name__ == "__main__":
    main()
