"""Measuring for benchmarks/train_vs_loop.py: named CPU ranges (``ranged``, ``RangeProfiler``), the loader-wait
timer, the warm-up / profiled / timed window both paths run in (``Window``), operator counts (``OpCounter``) and the
profiler summary. Imported after train_vs_loop.py has put the measured tree's root on ``sys.path``."""

from __future__ import annotations

import json
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.profilers import Profiler
from torch.profiler import ProfilerActivity, record_function
from torch.utils._python_dispatch import TorchDispatchMode

import ldm.lit.ldm as ldm_module

try:  # the measured tree may be an older snapshot, whose guard lived in ldm.lit.resilience
    import ldm.lit.guard as guard_module
except ImportError:
    import ldm.lit.resilience as guard_module
from ldm.losses.diffusion import DiffusionLoss

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
    guard_module.StepGuard.check = ranged("ldm.StepGuard.check", guard_module.StepGuard.check)
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
