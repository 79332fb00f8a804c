"""Issue 19: data-parallel training, caching and evaluation on N GPUs against one, through the real commands.

    python benchmarks/ddp_proof.py --preset gpu --nproc 2 --ae-ckpt <tiny KL-f4 .ckpt> --out <dir>   # 2+ GPUs, NCCL
    python benchmarks/ddp_proof.py --preset cpu --nproc 2 --ae-ckpt <tiny KL-f4 .ckpt> --out <dir>   # gloo smoke test

Each part runs once on one device and once on N (same per-device batch), in this order, each cut off by --deadline:

1. the latent cache: ``python -m ldm.cache`` alone and under ``torchrun --nproc_per_node N`` (every rank writes its
   own shards); the two caches must hold the same samples with the same latents;
2. stage 2 throughput: ``train.py stage=ldm`` with the ``small`` U-Net (and ``sd15`` on GPUs): img/s from perf.json
   (all ranks' images over rank 0's time), scaling = img/s(N) / (N x img/s(1)), and the parameters identical on
   every rank at the end (``rank_checksums.json`` of the RankConsistencyCheck callback);
3. stage 1 with the GAN active from step 0 (KL-f8 at 256 px on GPUs): no hang, no unused-parameter error, scaling;
4. ``evaluate.py`` generation FID on one device and under torchrun on N (each rank writes its own images);
5. pre-emption: SIGTERM to the launcher of an N-rank run saves once and every rank exits (143); ``resume=auto``
   continues from the saved step.

Writes ``<out>/ddp_proof.json`` (device, N, every number and check, the commands) and one log per command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "gpu": {"accelerator": "gpu", "precision": "bf16-mixed", "resolution": 64, "images": 8192, "steps": 80, "warmup": 30,
            "stage2": {"small": ["unet=small", "batch_size=256"],
                       "sd15": ["unet=sd15", "resolution=256", "batch_size=32", "text_encoder=transformer",
                                "text_encoder.width=768", "text_encoder.heads=12"]},
            "stage1": ["experiment=paper/kl_f8", "resolution=256", "batch_size=16", "loss.disc_start=0",
                       "module.scale_lr=false", "module.base_learning_rate=1e-4", "latent_stats_images=16"],
            "eval": ["n_samples=1000", "batch_size=125", "steps=25", "sampler=ddim"], "workers": 6},
    "cpu": {"accelerator": "cpu", "precision": "32-true", "resolution": 32, "images": 64, "steps": 6, "warmup": 2,
            "stage2": {"tiny": ["unet=tiny", "batch_size=4", "text_encoder.width=32", "text_encoder.depth=1",
                                "text_encoder.heads=2"]},
            "stage1": ["batch_size=2", "loss.disc_start=0", "loss.perceptual.net=alex", "loss.discriminator.ndf=8",
                       "loss.discriminator.n_layers=2", "latent_stats_images=4"],
            "eval": ["n_samples=8", "batch_size=4", "steps=2", "sampler=ddim"], "workers": 0},
}
START = time.monotonic()


def log_line(text: str) -> None:
    print(f"[{time.monotonic() - START:6.0f} s] {text}", flush=True)


def run(cmd: list[str], log: Path, timeout: float | None = None) -> int:
    """A command from the repository root, its output appended to ``log``; its exit status (124: timed out)."""
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            return subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124


def devices(p: dict, n: int) -> list[str]:
    """train.py's overrides for n devices of the preset's kind (DDP from two on)."""
    if n == 1:  # the same precision as the N-device runs
        return ["trainer=gpu" if p["accelerator"] == "gpu" else "trainer=cpu", f"trainer.precision={p['precision']}"]
    return ["trainer=ddp", f"trainer.accelerator={p['accelerator']}", f"trainer.devices={n}",
            f"trainer.precision={p['precision']}"] + (["trainer.benchmark=false"] if p["accelerator"] == "cpu" else [])


def torchrun(n: int, *args: str) -> list[str]:
    if n == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]


def data_args(p: dict) -> list[str]:
    return ["data=shapes", f"data.dataset.size={p['images']}", "data.dataset.val_size=64",
            f"data.num_workers={p['workers']}"]


def train_args(p: dict, name: str, out: Path, steps: int) -> list[str]:
    return [f"hydra.run.dir={out / name}", f"trainer.max_steps={steps}", "trainer.limit_val_batches=0",
            "trainer.num_sanity_val_steps=0", "trainer.val_check_interval=1000000", "trainer.check_val_every_n_epoch=null",
            f"callbacks.throughput.warmup={p['warmup']}", "trainer.enable_progress_bar=false", "logger=csv"]


def training(p: dict, name: str, overrides: list[str], n: int, out: Path) -> dict:
    """One timed train.py run on n devices: rc, img/s, and whether every rank ended with the same parameters."""
    cmd = [sys.executable, "train.py", *overrides, *devices(p, n), *train_args(p, name, out, p["warmup"] + p["steps"])]
    shutil.rmtree(out / name, ignore_errors=True)  # a second call with the same --out measures afresh
    rc = run(cmd, out / f"{name}.log", timeout=900)
    perf = out / name / "perf.json"
    sums = out / name / "rank_checksums.json"
    result = {"rc": rc, "command": " ".join(cmd[1:])}
    if rc == 0 and perf.is_file():
        result.update(json.loads(perf.read_text()))
    if rc == 0 and sums.is_file():
        per_rank = json.loads(sums.read_text())
        result["ranks"] = len(per_rank)
        result["parameters_identical_on_all_ranks"] = all(r == per_rank[0] for r in per_rank)
    log_line(f"{name}: rc {rc}, {result.get('images_per_s') or 0:.1f} img/s")
    return result


def scaling(one: dict, many: dict, n: int) -> float | None:
    """img/s on n devices over n x img/s on one; above 1.05 the one-device run was disturbed (a busy host), and the
    figure is flagged rather than believed."""
    if one.get("images_per_s") and many.get("images_per_s"):
        value = round(many["images_per_s"] / (n * one["images_per_s"]), 3)
        if value > 1.05:
            log_line(f"scaling {value} > 1: the one-device baseline was disturbed; measure on an idle machine")
        return value
    return None


def same_cache(a: Path, b: Path) -> dict:
    """Both caches hold the same samples (by key) with the same latents, split by split."""

    from ldm.data.latents import LatentMemoryDataset

    out = {}
    for split in ("train", "val"):
        x, y = LatentMemoryDataset(a, split), LatentMemoryDataset(b, split)
        ix = sorted(range(len(x)), key=lambda i: x.lists["key"][i])
        iy = sorted(range(len(y)), key=lambda i: y.lists["key"][i])
        keys = [x.lists["key"][i] for i in ix] == [y.lists["key"][i] for i in iy]
        diff = (x.tensors["mean"][ix].float() - y.tensors["mean"][iy].float()).abs().max().item() if keys else None
        out[split] = {"samples": [len(x), len(y)], "same_keys": keys, "max_abs_latent_difference": diff}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--ae-ckpt", required=True, help="a stage-1 checkpoint (the tiny KL-f4 of perf16's setup)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline", type=float, default=0, help="seconds after which no new part starts (0: none)")
    parser.add_argument("--parts", default="cache,stage2,stage1,evaluate,preempt")
    args = parser.parse_args()
    known = ("cache", "stage2", "stage1", "evaluate", "preempt")
    if args.nproc < 2:
        parser.error(f"--nproc {args.nproc}: the proof compares one device with N >= 2")
    if bad := [x for x in args.parts.split(",") if x not in known]:
        parser.error(f"--parts: unknown {bad}; choose from {','.join(known)}")
    if not Path(args.ae_ckpt).is_file():
        parser.error(f"--ae-ckpt {args.ae_ckpt} does not exist: give a stage-1 checkpoint (train.py's last.ckpt)")
    p, n, out = PRESETS[args.preset], args.nproc, args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    result = {"preset": args.preset, "nproc": n, "settings": p, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "gpus": torch.cuda.device_count(), "backend": "nccl" if p["accelerator"] == "gpu" else "gloo", "parts": {}}

    def save() -> None:
        (out / "ddp_proof.json").write_text(json.dumps(result, indent=1) + "\n")

    def in_time(part: str) -> bool:
        if args.deadline and time.monotonic() - START > args.deadline:
            result["parts"][part] = {"skipped": "deadline"}
            return False
        return part in args.parts.split(",")

    ae = str(Path(args.ae_ckpt).resolve())
    caches = {}
    if in_time("cache"):
        part = result["parts"]["cache"] = {}
        for k in (1, n):
            caches[k] = out / f"cache_{k}"
            shutil.rmtree(caches[k], ignore_errors=True)
            cmd = torchrun(k, "-m", "ldm.cache", f"autoencoder.pretrained={ae}", f"out_dir={caches[k]}",
                           f"resolution={p['resolution']}", *data_args(p), "progress=false",
                           f"device={'cuda' if p['accelerator'] == 'gpu' else 'cpu'}")
            begun = time.monotonic()
            part[f"rc_{k}"] = run(cmd, out / f"cache_{k}.log", timeout=900)
            part[f"seconds_{k}"] = round(time.monotonic() - begun, 1)
            part[f"command_{k}"] = " ".join(cmd[1:])
        if part["rc_1"] == 0 and part[f"rc_{n}"] == 0:
            part["compare"] = same_cache(caches[1], caches[n])
        log_line(f"cache: {part.get('compare')}")
        save()

    if in_time("stage2"):
        part = result["parts"]["stage2"] = {}
        for unet, overrides in p["stage2"].items():
            base = ["stage=ldm", f"autoencoder.pretrained={ae}", f"resolution={p['resolution']}", *data_args(p),
                    *overrides, "latent_data.num_workers=0", "callbacks.sample_grid=null"]
            if unet == "sd15" or caches.get(1) is None:
                base.append(f"cache_dir={out / f'cache_{unet}'}")
            else:
                base.append(f"cache_dir={caches[1]}")
            runs = {k: training(p, f"stage2_{unet}_{k}", base, k, out) for k in (1, n)}
            part[unet] = {"runs": runs, "scaling": scaling(runs[1], runs[n], n)}
            save()

    if in_time("stage1"):
        runs = {k: training(p, f"stage1_{k}", [*p["stage1"], *data_args(p)], k, out) for k in (1, n)}
        result["parts"]["stage1"] = {"runs": runs, "scaling": scaling(runs[1], runs[n], n)}
        save()

    if in_time("evaluate"):
        part = result["parts"]["evaluate"] = {}
        unet = next(iter(p["stage2"]))
        ckpt = out / f"stage2_{unet}_1" / "checkpoints" / "last.ckpt"
        for k in (1, n):
            cmd = torchrun(k, "evaluate.py", f"ckpt={ckpt}", "task=generation", "extractor=vgg16", "alignment=false",
                           *p["eval"], f"out_dir={out / f'eval_{k}'}", f"stats_dir={out / 'fid_stats'}",
                           "progress=false", "overwrite=true", f"resolution={p['resolution']}", *data_args(p))
            rc = run(cmd, out / f"eval_{k}.log", timeout=900)
            res = out / f"eval_{k}" / "results.json"
            part[str(k)] = {"rc": rc, "command": " ".join(cmd[1:]),
                            "fid": json.loads(res.read_text())["metrics"]["fid"] if res.is_file() else None,
                            "images": len(list((out / f"eval_{k}" / "images").glob("*.png")))}
        log_line(f"evaluate: {part}")
        save()

    if in_time("preempt"):
        result["parts"]["preempt"] = preempt(p, n, ae, out)
        save()
    result["failed"] = failures(result)
    save()
    log_line(f"wrote {out / 'ddp_proof.json'}" + (f"; FAILED: {result['failed']}" if result["failed"] else ""))
    if result["failed"]:
        raise SystemExit(1)


def failures(result: dict) -> list[str]:
    """The checks that did not hold: a command that failed, caches or parameters that differ, a pre-emption that
    did not save once and resume."""
    bad = []

    def walk(node: dict, where: str) -> None:
        for key, value in node.items():
            key = str(key)  # per-rank results are keyed by the number of processes
            if key == "rc" or key.startswith("rc_"):
                if value != 0:
                    bad.append(f"{where} {key}={value}")
            elif key == "parameters_identical_on_all_ranks" and value is False:
                bad.append(f"{where}: parameters differ between ranks")
            elif key == "compare" and any(not c["same_keys"] or (c["max_abs_latent_difference"] or 0) > 1e-2
                                          for c in value.values()):
                bad.append(f"{where}: the caches differ {value}")
            elif key == "ok" and value is False:
                bad.append(f"{where}: {node}")
            elif isinstance(value, dict):
                walk(value, f"{where}.{key}")

    walk(result["parts"], "parts")
    return bad


def preempt(p: dict, n: int, ae: str, out: Path) -> dict:
    """SIGTERM to the launcher of an n-rank stage-2 run once it has saved: one save at the step it stopped at, every
    rank gone (exit 143); resume=auto continues from there."""
    from ldm.checkpoint import load_torch_file

    unet, overrides = next(iter(p["stage2"].items()))
    run_dir = out / "preempt"
    shutil.rmtree(run_dir, ignore_errors=True)
    base = ["stage=ldm", f"autoencoder.pretrained={ae}", f"resolution={p['resolution']}", *data_args(p), *overrides,
            f"cache_dir={out / 'cache_1'}", "latent_data.num_workers=0", *devices(p, n), f"hydra.run.dir={run_dir}",
            "trainer.max_steps=1000000", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
            "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=5", "callbacks.sample_grid=null",
            "trainer.enable_progress_bar=false", "logger=csv"]
    last = run_dir / "checkpoints" / "last.ckpt"
    with open(out / "preempt.log", "w") as fh:
        proc = subprocess.Popen([sys.executable, "train.py", *base], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        saved_before = load_torch_file(last)["global_step"] if last.is_file() else None
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "hung"
    time.sleep(2)
    leftover = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
    stopped_at = load_torch_file(last)["global_step"] if last.is_file() else None
    resumed = run([sys.executable, "train.py", *[o for o in base if not o.startswith("trainer.max_steps")],
                   f"trainer.max_steps={(stopped_at or 0) + 3}", "resume=auto"], out / "preempt.log", timeout=600)
    final = load_torch_file(last)["global_step"] if last.is_file() else None
    result = {"exit_code": rc, "saved_before_signal": saved_before, "stopped_at": stopped_at, "ranks_left": leftover,
              "resume_rc": resumed, "resumed_to": final,
              "ok": rc == 143 and not leftover and stopped_at is not None and resumed == 0 and final == stopped_at + 3}
    log_line(f"preempt: {result}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("LDM_OFFLINE", "1")
    main()
