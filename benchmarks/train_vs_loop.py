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
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch

# the repository whose train.py and ldm/ are measured (TVL_ROOT: e.g. a snapshot of a commit; default: this repo)
ROOT = Path(os.environ.get("TVL_ROOT") or Path(__file__).resolve().parents[1]).resolve()
sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402
from pytorch_lightning.profilers import Profiler  # noqa: E402
from torch.profiler import ProfilerActivity, record_function  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import ldm.lit.ldm as ldm_module  # noqa: E402
import ldm.lit.resilience as resilience  # noqa: E402
from ldm.checkpoint import architecture  # noqa: E402
from ldm.data.latents import LatentMemoryDataset, read_manifest  # noqa: E402
from ldm.losses.diffusion import DiffusionLoss  # noqa: E402
from ldm.models.ema import ema_decay_at  # noqa: E402

PRESETS = {  # U-Net preset -> (resolution with the tiny KL-f4 autoencoder, batch, text-encoder overrides)
    "sd15": (256, 32, ["text_encoder=transformer", "text_encoder.width=768", "text_encoder.heads=12"]),
    "small": (64, 256, []),  # stage 2's default text encoder: transformer_small (2 x 128, hashed words)
    "tiny": (32, 64, []),
}
START = time.perf_counter()

# ------------------------------------------------------------------------------------------ CPU ranges
# Named ranges around ldm's step functions (both paths call them) and Lightning's hooks (RangeProfiler), active
# only while the torch profiler records, so they cost nothing in the timed window.
RANGES_ON = False


def ranged(name, fn):
    def wrapper(*args, **kwargs):
        if not RANGES_ON:
            return fn(*args, **kwargs)
        with record_function(name):
            return fn(*args, **kwargs)
    wrapper.__wrapped__ = fn
    return wrapper


def install_ranges() -> None:
    from ldm.models.text_encoders import TransformerTextEncoder
    for name in ("ema_update", "training_condition", "sample_posterior", "normalize_latents", "poison_if_not_finite"):
        setattr(ldm_module, name, ranged(f"ldm.{name}", getattr(ldm_module, name)))
    resilience.StepGuard.check = ranged("ldm.StepGuard.check", resilience.StepGuard.check)
    DiffusionLoss.forward = ranged("ldm.DiffusionLoss.forward", DiffusionLoss.forward)
    # (no range inside the compiled U-Net: dynamo would guard on RANGES_ON and recompile when it flips)
    TransformerTextEncoder.forward = ranged("ldm.TextEncoder.forward", TransformerTextEncoder.forward)
    pl.LightningModule.log = ranged("pl.LightningModule.log", pl.LightningModule.log)
    pl.LightningModule.log_dict = ranged("pl.LightningModule.log_dict", pl.LightningModule.log_dict)


DATA_WAIT = [0.0]  # host seconds spent in the train loader's next() (both paths), read per timed window


def install_data_timer() -> None:
    """Time every next() on a train loader (ResumableDataLoader): the host waiting for the next batch."""
    from ldm.data.resumable import ResumableDataLoader

    original = ResumableDataLoader.__iter__

    def timed(self):
        batches = original(self)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            DATA_WAIT[0] += time.perf_counter() - t0
            yield batch

    ResumableDataLoader.__iter__ = timed


class RangeProfiler(Profiler):
    """Lightning profiler that turns each hook Lightning times into a torch.profiler range (while RANGES_ON)."""

    def __init__(self) -> None:
        super().__init__()
        self._open: dict[str, list] = defaultdict(list)

    def start(self, action_name: str) -> None:
        if RANGES_ON:
            rf = record_function(f"pl:{action_name}")
            rf.__enter__()
            self._open[action_name].append(rf)

    def stop(self, action_name: str) -> None:
        if self._open.get(action_name):
            self._open[action_name].pop().__exit__(None, None, None)

    def summary(self) -> str:
        return ""


# ----------------------------------------------------------------------------------- measuring windows
class OpCounter(TorchDispatchMode):
    """Counts the aten operators a step dispatches (after autograd: forward, backward and optimizer alike), each by
    the innermost line of ldm, Lightning, torch.optim or this script that issued it. On a GPU nearly every one is a
    kernel launch, so on a CPU this shows which path launches more, and from where (``--count-ops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.sites: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        frames = traceback.extract_stack(limit=40)[:-1]
        keep = [f for f in frames if "/ldm/" in f.filename or "pytorch_lightning" in f.filename
                or "torch/optim" in f.filename or ("train_vs_loop" in f.filename and f.name != "__torch_dispatch__")]
        site = keep[-1] if keep else (frames[-1] if frames else None)
        where = "/".join(Path(site.filename).parts[-2:]) if site else "?"
        self.sites[f"{where}:{site.lineno if site else 0} {site.name if site else '?'}"] += 1
        return func(*args, **(kwargs or {}))


class Window:
    """W warm-up steps (last two: sync debug), P profiled steps, S timed steps; call ``before(i)`` before step i
    and ``after(i)`` after it, i = 0, 1, ..."""

    def __init__(self, device: torch.device, batch: int, warmup: int, profile: int, steps: int, name: str,
                 raw_dir: Path | None) -> None:
        self.device, self.batch, self.W, self.P, self.S = device, batch, warmup, profile, steps
        self.name, self.raw_dir = name, raw_dir
        self.cuda = device.type == "cuda"
        self.result: dict = {}
        self.sync_sites: Counter = Counter()
        self._prof = None
        self.count_ops = False  # --count-ops: the P steps count operators instead of profiling
        self._t0 = self._t_start = None
        self._old_showwarning = None

    @property
    def total(self) -> int:
        return self.W + self.P + self.S

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def before(self, i: int) -> None:
        global RANGES_ON
        if i == 0:
            self._t_start = time.perf_counter()
        if i == max(self.W - 2, 1) and self.cuda:  # sync debug on the last warm-up steps (after compilation)
            self._sync()
            self._sync_debug(True)
        if i == self.W:
            self._sync_debug(False)
            self._sync()
            self.result["warmup_s"] = round(time.perf_counter() - self._t_start, 2)
            if self.P and self.count_ops:
                self._prof = OpCounter()
                self._prof.__enter__()
            elif self.P:
                self._prof = torch.profiler.profile(
                    activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else []))
                self._prof.__enter__()
                RANGES_ON = True
                self._t_prof = time.perf_counter()
        if i == self.W + self.P:
            self._sync()
            if isinstance(self._prof, OpCounter):
                self._prof.__exit__(None, None, None)
                self.result["ops_per_step"] = round(sum(self._prof.ops.values()) / self.P, 1)
                self.result["ops_by_name"] = {k: round(v / self.P, 1) for k, v in self._prof.ops.most_common()}
                self.result["ops_by_site"] = {k: round(v / self.P, 1) for k, v in self._prof.sites.most_common()}
                self._prof = None
            if self._prof is not None:
                prof_wall = time.perf_counter() - self._t_prof
                RANGES_ON = False
                self._prof.__exit__(None, None, None)
                self.result["profile"] = summarize(self._prof, self.P, prof_wall, self.name, self.raw_dir)
                self._prof = None
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            DATA_WAIT[0] = 0.0
            self._t0 = time.perf_counter()

    def after(self, i: int) -> None:
        if i == self.total - 1:
            self._sync()
            elapsed = time.perf_counter() - self._t0
            self.result.update({
                "img_per_s": round(self.batch * self.S / elapsed, 2),
                "step_ms": round(1000 * elapsed / self.S, 2),
                "peak_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3) if self.cuda else None,
                "timed_steps": self.S,
                # host time inside the train loader's next(): 0 for the loop's GPU-resident latents
                "data_wait_ms_per_step": round(1000 * DATA_WAIT[0] / self.S, 3),
                "data_wait_fraction": round(DATA_WAIT[0] / elapsed, 4),
            })
            if self.sync_sites:
                steps = max(1, self.W - max(self.W - 2, 1))
                self.result["host_syncs_per_step"] = round(sum(self.sync_sites.values()) / steps, 2)
                self.result["host_sync_sites"] = {k: round(v / steps, 2) for k, v in self.sync_sites.most_common(12)}

    def _sync_debug(self, on: bool) -> None:
        if not self.cuda:
            return
        if on:
            self._old_showwarning = warnings.showwarning
            warnings.simplefilter("always")
            warnings.showwarning = self._record_sync
            torch.cuda.set_sync_debug_mode("warn")
        elif self._old_showwarning is not None:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = self._old_showwarning
            self._old_showwarning = None

    def _record_sync(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return self._old_showwarning(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "train_vs_loop" not in f.filename
                  or f.name in ("loop_step",)]
        keep = [f for f in frames if "/ldm/" in f.filename or "pytorch_lightning" in f.filename
                or "torch/optim" in f.filename or "train_vs_loop" in f.filename]
        site = keep[-1] if keep else frames[-1]
        self.sync_sites[f"{Path(site.filename).name}:{site.lineno} {site.name}"] += 1


def summarize(prof, steps: int, wall_s: float, name: str, raw_dir: Path | None) -> dict:
    """Per-step numbers from a torch.profiler run: wall, GPU busy (union of kernel intervals), idle, host syncs,
    CPU and GPU ms of the named ranges, GPU ms by kernel family; key_averages tables to raw_dir."""
    events = prof.events()
    # record_function ranges also appear on the GPU timeline as user annotations spanning their kernels: not kernels
    # (as key_averages().table's "Self CUDA time total" counts). Inductor's Triton kernels share their name with the
    # CPU-side launch range, so the name alone does not tell them apart.
    kernels, syncs, dtoh, families = [], Counter(), 0, Counter()
    for e in events:
        dev = str(e.device_type).rsplit(".", 1)[-1]
        if dev == "CUDA" and not getattr(e, "is_user_annotation", False):
            kernels.append((e.time_range.start, e.time_range.end))
            if "Memcpy DtoH" in e.name:
                dtoh += 1
            families[kernel_family(e.name)] += e.time_range.end - e.time_range.start
        elif dev == "CPU" and e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
            syncs[e.name] += 1
    busy, last = 0.0, None
    for s, t in sorted(kernels):
        if last is None or s > last:
            busy += t - s
            last = t
        elif t > last:
            busy += t - last
            last = t
    ranges_cpu, ranges_gpu = Counter(), Counter()  # CPU time of each range; GPU span of its annotation
    for k in prof.key_averages():
        if k.key.startswith(("ldm.", "pl:", "loop.", "Optimizer.", "aten::item", "aten::_local_scalar_dense",
                             "cudaStreamSynchronize", "cudaLaunchKernel", "cuLaunchKernel")):
            ranges_cpu[k.key] = max(ranges_cpu[k.key], k.cpu_time_total / 1000 / steps)
            gpu = getattr(k, "device_time_total", getattr(k, "cuda_time_total", 0)) / 1000 / steps
            ranges_gpu[k.key] = max(ranges_gpu[k.key], gpu)
    out = {
        "steps": steps,
        "wall_ms_per_step": round(1000 * wall_s / steps, 2),
        "gpu_busy_ms_per_step": round(busy / 1000 / steps, 2),
        "gpu_idle_ms_per_step": round(1000 * wall_s / steps - busy / 1000 / steps, 2),
        "kernels_per_step": round(len(kernels) / steps, 1),
        "kernel_ms_per_step": round(sum(t - s for s, t in kernels) / 1000 / steps, 2),
        "host_syncs_per_step": {k: round(v / steps, 2) for k, v in syncs.items()},
        "memcpy_dtoh_per_step": round(dtoh / steps, 2),
        "gpu_ms_by_kernel_family": {k: round(v / 1000 / steps, 2) for k, v in families.most_common()},
        "ranges_cpu_ms_per_step": {k: round(v, 3) for k, v in sorted(ranges_cpu.items(), key=lambda kv: -kv[1])},
        "ranges_gpu_ms_per_step": {k: round(v, 3) for k, v in sorted(ranges_gpu.items(), key=lambda kv: -kv[1]) if v},
    }
    if raw_dir is not None:
        raw_dir.mkdir(parents=True, exist_ok=True)
        sort = "self_device_time_total" if kernels else "self_cpu_time_total"
        text = [f"# {name}: {steps} profiled steps; totals over all steps (divide by {steps})\n",
                json.dumps(out, indent=1), "\n\n## by self GPU time\n",
                prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=90),
                "\n\n## by CPU total (ranges and ops)\n",
                prof.key_averages().table(sort_by="cpu_time_total", row_limit=60, max_name_column_width=90)]
        (raw_dir / f"{name}.txt").write_text("".join(text))
    return out


def kernel_family(name: str) -> str:
    n = name.lower()
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    if any(s in n for s in ("fmha", "flash", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")):
        return "attention"
    if "multi_tensor_apply" in n or "foreach" in n or "fused_adam" in n or "fusedadam" in n:
        return "foreach/fused (optimizer, clip, EMA)"
    if any(s in n for s in ("conv", "implicit", "xmma_fprop", "xmma_dgrad", "xmma_wgrad", "sm90_xmma", "dgrad",
                            "wgrad", "fprop", "winograd", "nchw", "nhwc")):
        return "convolution"
    if any(s in n for s in ("gemm", "cutlass", "sm90", "cublas", "nvjet", "matmul", "splitk")):
        return "gemm"
    if any(s in n for s in ("norm", "welford")):
        return "normalization"
    if n.startswith("triton"):
        return "triton (inductor fused)"
    if "reduce" in n:
        return "reduction"
    return "elementwise/other"


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
         f"module.compile={'true' if mode == 'compiled' else 'false'}", *text,
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


# ------------------------------------------------------------------------------------ hand-written loop
# One switch per component; "recipe" = what train.py's module does. Each variant is recipe + the listed changes.
VARIANTS = {
    "recipe": {},
    "cudnn_benchmark": {"cudnn_benchmark": True},
    "fused_adamw": {"fused_adamw": True},
    "foreach_ema": {"foreach_ema": True},
    "no_guard_sync": {"guard_sync": False},          # clip without the isfinite(norm) host sync
    "no_keep_sync": {"keep_sync": False},            # CFG dropout on token ids on the GPU, no keep.tolist()
    "no_context_mask": {"mask": False},
    "no_ema": {"ema": False},
    "no_clip_no_guard": {"clip": False},
    "fixed_context": {"text": False},               # a fixed context of the same shape instead of the encoder
    "train_loader": {"data": "loader"},             # train.py's DataLoader instead of GPU-resident latents
    "all_fixes": {"cudnn_benchmark": True, "fused_adamw": True, "foreach_ema": True, "guard_sync": False,
                  "keep_sync": False},
    "bare": {"cudnn_benchmark": True, "fused_adamw": True, "ema": False, "clip": False, "text": False,
             "mask": False},  # ~ benchmarks/unet_train.py (context of the encoder's length, no mask)
    "bare77": {"cudnn_benchmark": True, "fused_adamw": True, "ema": False, "clip": False, "text": False,
               "mask": False, "ctx_len": 77},  # = benchmarks/unet_train.py: random context [B, 77, D]
}
DEFAULTS = {"cudnn_benchmark": False, "fused_adamw": False, "foreach_ema": False, "guard_sync": True,
            "keep_sync": True, "mask": True, "ema": True, "clip": True, "text": True, "data": "gpu",
            "ctx_len": None}


class Loop:
    """The module's training step, by hand. Models and data are built once; each variant gets a fresh optimizer,
    EMA copy and scheduler."""

    def __init__(self, cfg, device: torch.device, compiled: bool) -> None:
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            self.unet = instantiate(architecture(OmegaConf.to_container(cfg.unet, resolve=True)))
            self.text_encoder = instantiate(cfg.text_encoder)
        self.unet.train()
        self.text_encoder.train()
        # module.channels_last (--train-override module.channels_last=true): NHWC weights and U-Net inputs
        self.memory_format = torch.channels_last if cfg.module.get("channels_last") else torch.contiguous_format
        self.unet.to(memory_format=self.memory_format)
        self.ema = copy.deepcopy(self.unet).eval().requires_grad_(False)
        if compiled:
            self.unet.compile()  # as LatentDiffusionModule(compile=True): in place
        self.loss_fn = instantiate(cfg.loss).to(device)
        m = cfg.module
        self.lr, self.clip, self.p_uncond = float(m.base_learning_rate), m.gradient_clip_val, float(m.p_uncond)
        self.ema_decay, self.latent_norm, self.seed = m.ema_decay, str(m.latent_norm), int(m.seed)
        self.optimizer_factory = instantiate(m.optimizer)
        self.scheduler_factory = instantiate(m.lr_scheduler) if m.lr_scheduler is not None else None
        manifest = read_manifest(Path(cfg.cache_dir))
        self.stats = manifest["latent_stats"]
        ds = LatentMemoryDataset(cfg.cache_dir, "train")
        self.mean = ds.tensors["mean"].to(device).float()
        self.logvar = ds.tensors["logvar"].to(device).float()
        self.captions = ds.lists["caption"]
        self.n = len(self.captions)
        try:
            from ldm.stages import latents_on_gpu
        except ImportError:  # an older tree
            latents_on_gpu = getattr(__import__("train"), "latents_on_gpu", None)
        on_gpu = {"on_gpu": latents_on_gpu(cfg)} if latents_on_gpu is not None else {}
        self.data_module = instantiate(cfg.latent_data, path=str(cfg.cache_dir), **on_gpu)
        self.cuda = device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def params(self) -> list[torch.nn.Parameter]:
        return list(self.unet.parameters()) + list(self.text_encoder.parameters())  # configure_optimizers

    def run(self, window: Window, variant: dict) -> dict:
        v = {**DEFAULTS, **variant}
        torch.backends.cudnn.benchmark = v["cudnn_benchmark"]
        extra = {"fused": True} if v["fused_adamw"] and self.cuda else {}
        opt = self.optimizer_factory(self.params(), lr=self.lr, **extra)
        sched = self.scheduler_factory(opt) if self.scheduler_factory is not None else None
        ema = None
        if v["ema"] and self.ema_decay:
            ema = self.ema
            ema.load_state_dict(self.unet.state_dict())
        ema_pairs = ([p for p in ema.parameters()], [p for p in self.unet.parameters()]) if ema else None
        guard = resilience.StepGuard(20)
        gen_data = torch.Generator().manual_seed(0)
        loader_iter = iter(self.data_module.train_dataloader()) if v["data"] == "loader" else None
        te = self.text_encoder
        fixed_ctx = None
        if not v["text"] and v["ctx_len"]:
            fixed_ctx = (torch.randn(window.batch, v["ctx_len"], te.context_dim, device=self.device), None)
        elif not v["text"]:
            with torch.no_grad():
                fixed_ctx = te(self.captions[: window.batch])
        null_ids = null_mask = None
        if not v["keep_sync"]:
            null_ids, null_mask, _ = te.tokenizer(te.null_inputs(1))
            null_ids, null_mask = null_ids.to(self.device), null_mask.to(self.device)
        B = window.batch

        def get_batch():
            if loader_iter is not None:
                batch = next(loader_iter)
                return {k: (x.to(self.device, non_blocking=True) if torch.is_tensor(x) else x)
                        for k, x in batch.items()}
            idx = torch.randint(0, self.n, (B,), generator=gen_data)
            idx_d = idx.to(self.device, non_blocking=True)
            return {"mean": self.mean[idx_d], "logvar": self.logvar[idx_d],
                    "caption": [self.captions[j] for j in idx.tolist()]}

        def condition(batch, keep):
            if fixed_ctx is not None:
                ctx, mask = fixed_ctx
                cond = {"context": ctx, "context_mask": mask}
            elif v["keep_sync"]:
                cond = ldm_module.training_condition(te, batch, keep)  # keep.tolist(): a host sync
            else:  # the same condition without a sync: choose caption or null tokens on the GPU
                ids, mask, _ = te.tokenizer(batch["caption"])
                ids, mask = ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
                k = keep[:, None]
                ids, mask = torch.where(k, ids, null_ids), torch.where(k, mask, null_mask)
                cond = {"context": te.encode(ids, mask), "context_mask": mask}
            if not v["mask"]:
                cond = {"context": cond["context"], "context_mask": None}
            return cond

        def loop_step(step: int) -> torch.Tensor:
            with record_function("loop.data"):
                batch = get_batch()
            gen = torch.Generator(device=self.device)  # as LatentDiffusionModule._generator
            gen.manual_seed(hash((self.seed, 0, step, 0)) % 2**63)
            with record_function("loop.training_step"), self.autocast:
                z = ldm_module.sample_posterior(batch["mean"], batch["logvar"], generator=gen)
                z = ldm_module.normalize_latents(z, self.stats, self.latent_norm)
                keep = torch.rand(z.shape[0], generator=gen, device=z.device) >= self.p_uncond
                cond = condition(batch, keep)
                fmt = self.memory_format
                loss, _ = self.loss_fn(lambda x, t: self.unet(x.contiguous(memory_format=fmt), t, **cond), z,
                                       generator=gen)
                loss = ldm_module.poison_if_not_finite(loss)
            with record_function("loop.zero_grad"):
                opt.zero_grad(set_to_none=True)
            with record_function("loop.backward"):
                loss.backward()
            with record_function("loop.clip_and_check"):
                if v["clip"] and v["guard_sync"]:
                    guard.check(opt, self.clip)
                elif v["clip"]:
                    torch.nn.utils.clip_grad_norm_([p for p in self.params() if p.grad is not None], float(self.clip),
                                                   foreach=True)
            opt.step()
            if sched is not None:
                sched.step()
            # a device bool when decided without a sync (older trees: guard.last_ok, a host bool)
            applied = guard.last_applied if hasattr(guard, "last_applied") else guard.last_ok
            if ema is not None and isinstance(applied, torch.Tensor):
                ldm_module.ema_update(ema, self.unet, ema_decay_at(step, self.ema_decay), applied=applied)
            elif ema is not None and applied:
                decay = ema_decay_at(step, self.ema_decay)
                if v["foreach_ema"]:
                    with record_function("ldm.ema_update"), torch.no_grad():
                        torch._foreach_lerp_(ema_pairs[0], ema_pairs[1], 1.0 - decay)
                else:
                    ldm_module.ema_update(ema, self.unet, decay)
            guard.end_step(step)
            return loss.detach()

        loss = None
        for i in range(window.total):
            window.before(i)
            loss = loop_step(i)
            window.after(i)
        result = dict(window.result)
        result["final_loss"] = round(float(loss), 4)
        return result


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
