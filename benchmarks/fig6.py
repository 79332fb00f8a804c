"""Fig. 6 of the LDM paper at small scale: class-conditional LDMs with downsampling factors f in {1, 2, 4, 8, 16}
trained with the same steps, batch and U-Net, their FID against training steps.

The paper (Rombach et al. 2022, Fig. 6, Table 13) trains LDM-{1,2,4,8,16,32} on ImageNet for 2M steps: f = 1-2 learn
slowly, f = 32 stalls at a poor FID (too much is lost in the first stage), f = 4-16 give the best trade-off. Here the
data is `shapes` with one shape per image and its kind as the class (6 classes, `data.dataset.labels=shape`), the
first stages are small VQ autoencoders (|Z| and c per f as in Table 13, scaled down) and f = 1 is pixel space
(`autoencoder.pretrained=identity`). Every run goes through the real commands: train.py for both stages, stage 2 in
segments of `eval_every` steps (each a `resume=auto` continuation, which equals one longer run), and evaluate.py's
generation FID after each segment (VGG16 features: offline, not comparable with published Inception FIDs).

    python benchmarks/fig6.py --preset gpu --out outputs/fig6 --deadline 500   # one H100, the factors side by side
    python benchmarks/fig6.py --preset smoke --out /tmp/fig6                   # minutes on a CPU: checks the plumbing

The factors run side by side (``--jobs``, default all of them), each its own chain of processes on the one GPU, so
their seconds are wall-clock under shared load: compare them with each other, not with a run alone.
``--deadline`` (seconds): a factor starts its next segment only if one as long as its last would end before it, and
the report covers what finished; a second call with the same ``--out`` continues where the first stopped.

Writes ``<out>/fig6.json`` (per f: FID per step, seconds per stage, first-stage reconstruction), ``<out>/fig6.png``
and ``<out>/fig6.md`` (the table for docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# f -> first stage: VQ (ch_mult, c, |Z|) as Table 13's LDM-f rows (c = 2, 3, 4, 8; |Z| scaled down 8x-16x)
FIRST_STAGES = {2: ([1, 2], 2, 256), 4: ([1, 2, 2], 3, 512), 8: ([1, 2, 2, 4], 4, 1024), 16: ([1, 2, 2, 4, 4], 8, 1024)}
PRESETS = {
    # sized for one 10-minute call on an H100, five factors side by side (f = 1 at 32 px: 1,024 attention tokens at
    # the U-Net's top level); side by side, a 500-step segment took ~140 s and an evaluation ~45 s there
    "gpu": {"resolution": 32, "images": 10000, "ae_steps": 500, "ae_batch": 64, "ldm_steps": 600, "eval_every": 200,
            "ldm_batch": 128, "n_fid": 500, "sample_steps": 25, "device": "gpu", "workers": 2},
    "smoke": {"resolution": 32, "images": 64, "ae_steps": 4, "ae_batch": 8, "ldm_steps": 4, "eval_every": 2,
              "ldm_batch": 8, "n_fid": 8, "sample_steps": 2, "device": "cpu", "workers": 0},
}


def run(cmd: list[str], log: Path) -> float:
    """Run a command from the repository root, its output into ``log``; returns the seconds it took."""
    start = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"failed (exit {proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


def data_args(p: dict) -> list[str]:
    return ["data=shapes", "data.dataset.max_shapes=1", "data.dataset.labels=shape", f"data.dataset.size={p['images']}",
            f"data.dataset.val_size={max(p['n_fid'], 16)}", f"data.num_workers={p['workers']}",
            f"resolution={p['resolution']}"]


def trainer_args(p: dict) -> list[str]:
    accel = ["trainer=gpu"] if p["device"] == "gpu" else ["trainer.accelerator=cpu"]
    return accel + ["trainer.enable_progress_bar=false", "logger=csv"]


def first_stage(f: int, p: dict, out: Path, log: Path) -> tuple[str, float]:
    """Train the f's VQ autoencoder (none for f = 1); returns (autoencoder.pretrained value, seconds)."""
    if f == 1:
        return "identity", 0.0
    mult, c, n_embed = FIRST_STAGES[f]
    run_dir = out / f"ae_f{f}"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        return str(ckpt), 0.0
    cmd = ["train.py", "autoencoder=tiny_vq", "loss=autoencoder_vq", f"autoencoder.ch_mult=[{','.join(map(str, mult))}]",
           f"autoencoder.z_channels={c}", f"autoencoder.embed_dim={c}", f"autoencoder.n_embed={n_embed}",
           "autoencoder.restart_threshold=0.5", f"batch_size={p['ae_batch']}", f"trainer.max_steps={p['ae_steps']}",
           f"loss.disc_start={p['ae_steps'] // 2}", "loss.perceptual.net=alex", "loss.discriminator.n_layers=2",
           "module.base_learning_rate=2e-4", "module.scale_lr=false", "monitor=val/rec_loss",
           f"trainer.val_check_interval={max(p['ae_steps'] // 2, 1)}", "trainer.check_val_every_n_epoch=null",
           "trainer.limit_val_batches=4", f"latent_stats_images={min(p['images'], 1024)}",
           f"hydra.run.dir={run_dir}", *data_args(p), *trainer_args(p)]
    return str(ckpt), run(cmd, log)


def stage2_segment(f: int, source: str, until: int, p: dict, out: Path, log: Path) -> float:
    channels = 3 if f == 1 else FIRST_STAGES[f][1]
    cmd = ["train.py", "stage=ldm", f"autoencoder.pretrained={source}", "text_encoder=class",
           "text_encoder.num_classes=6", "text_encoder.context_dim=128", "unet=small", f"unet.in_channels={channels}",
           f"unet.out_channels={channels}", "unet.channel_mult=[1,2]", "unet.attention_resolutions=[1,2]",
           f"batch_size={p['ldm_batch']}", f"trainer.max_steps={until}", "module.base_learning_rate=2e-4",
           "module.ema_decay=0.999", "module.lr_scheduler.total_iters=200", "trainer.val_check_interval=null",
           "trainer.limit_val_batches=0", "callbacks.sample_grid=null", "resume=auto",  # evaluate.py draws the grids
           f"cache_dir={out / f'cache_f{f}'}", f"hydra.run.dir={out / f'ldm_f{f}'}", *data_args(p), *trainer_args(p)]
    return run(cmd, log)


def fid(f: int, step: int, p: dict, out: Path, log: Path) -> float:
    eval_dir = out / f"eval_f{f}" / f"step{step:07d}"
    cmd = ["evaluate.py", f"ckpt={out / f'ldm_f{f}' / 'checkpoints' / 'last.ckpt'}", "task=generation",
           f"n_samples={p['n_fid']}", "extractor=vgg16", "sampler=ddim", f"steps={p['sample_steps']}", "cfg_scale=1.5",
           "alignment=false", f"out_dir={eval_dir}", f"results_csv={out / f'results_f{f}.csv'}",
           f"stats_dir={out / f'fid_stats_f{f}'}", "batch_size=125", "progress=false", "overwrite=true",
           "device=cuda" if p["device"] == "gpu" else "device=cpu", *data_args(p)]
    run(cmd, log)
    return float(json.loads((eval_dir / "results.json").read_text())["metrics"]["fid"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "fig6")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--jobs", type=int, default=0, help="factors run at once (0: all)")
    parser.add_argument("--deadline", type=float, default=0, help="seconds after which no new segment starts (0: none)")
    args = parser.parse_args()
    if bad := sorted(set(args.factors) - {1, *FIRST_STAGES}):
        parser.error(f"--factors {bad}: this sweep has first stages for f in {[1, *FIRST_STAGES]}")
    if args.jobs < 0:
        parser.error(f"--jobs {args.jobs}: give the number of factors to run at once (0: all)")
    args.factors = list(dict.fromkeys(args.factors))  # one chain of processes per factor and folder
    p, out = PRESETS[args.preset], args.out.resolve()
    results = json.loads((out / "fig6.json").read_text()) if (out / "fig6.json").is_file() else {
        "preset": args.preset, "settings": p, "runs": {}}
    if results["settings"] != p:
        parser.error(f"--out {out} holds a run of --preset {results['preset']} with other settings: continue it with "
                     "that preset, or give another --out")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LDM_OFFLINE", "1")
    lock, started = threading.Lock(), time.monotonic()

    def save() -> None:
        with lock:
            (out / "fig6.json").write_text(json.dumps(results, indent=2) + "\n")

    def in_time(needs: float) -> bool:  # a segment starts only when one like the last would still finish
        return not args.deadline or time.monotonic() - started + needs < args.deadline

    def one_factor(f: int) -> None:
        with lock:
            entry = results["runs"].setdefault(str(f), {"fid": {}, "stage1_seconds": 0.0, "stage2_seconds": 0.0})
        log = out / f"f{f}.log"
        source, seconds = first_stage(f, p, out, log)
        entry["stage1_seconds"] += round(seconds, 1)
        last = 0.0
        for step in range(p["eval_every"], p["ldm_steps"] + 1, p["eval_every"]):
            if str(step) in entry["fid"]:
                continue
            if not in_time(1.3 * last):
                print(f"f={f}: no time left for step {step} before the deadline", flush=True)
                return
            begun = time.monotonic()
            entry["stage2_seconds"] += round(stage2_segment(f, source, step, p, out, log), 1)
            entry["fid"][str(step)] = fid(f, step, p, out, log)
            last = time.monotonic() - begun
            print(f"[{time.monotonic() - started:.0f} s] f={f} step={step} FID={entry['fid'][str(step)]:.2f}",
                  flush=True)
            save()

    with ThreadPoolExecutor(max_workers=args.jobs or len(args.factors)) as pool:
        failures = [(f, job.exception()) for f, job in
                    [(f, pool.submit(one_factor, f)) for f in args.factors] if job.exception()]
    save()
    write_report(results, out)
    for f, error in failures:
        print(f"f={f} failed: {error}", file=sys.stderr)
    if failures:
        raise SystemExit(1)


def write_report(results: dict, out: Path) -> None:
    runs = {int(f): r for f, r in results["runs"].items() if r["fid"]}
    steps = sorted({int(s) for r in runs.values() for s in r["fid"]})
    lines = ["| f | " + " | ".join(f"FID @ {s:,}" for s in steps) + " | stage-2 time |",
             "|---|" + "---|" * len(steps) + "---|"]
    for f in sorted(runs):
        fids = [f"{runs[f]['fid'][str(s)]:.1f}" if str(s) in runs[f]["fid"] else "-" for s in steps]
        lines.append(f"| {f} | " + " | ".join(fids) + f" | {runs[f]['stage2_seconds'] / 60:.1f} min |")
    (out / "fig6.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for f in sorted(runs):
        xs = sorted(int(s) for s in runs[f]["fid"])
        ax.plot(xs, [runs[f]["fid"][str(s)] for s in xs], marker="o", label=f"LDM-{f}")
    ax.set_xlabel("training steps")
    ax.set_ylabel("FID (VGG16 features)")
    ax.set_title("class-conditional LDMs on shapes, by factor f", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig6.png", dpi=120)


if __name__ == "__main__":
    main()
