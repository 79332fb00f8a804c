#!/usr/bin/env bash
# Throughput / peak-memory cost of the non-finite-step guard, TrainingState callback, resumable loaders and the
# EMA-in-optimizer_step change, against the committed HEAD, on one GPU (bf16 chosen automatically).
# Both code versions run on the same machine, alternating (ORDER, default head new head new):
#   stage1: the quickstart autoencoder, resolution 64, batch 64, GAN from step 0 (loss.disc_start=0), S1_STEPS steps
#   stage2: the `small` U-Net on cached latents of a short stage-1 run, batch 256, S2_STEPS steps
# Validation, sanity checks, the sample grid and the progress bar are off, so no checkpoint is written inside
# the timed window; the Throughput callback's perf.json (img/s after WARMUP batches, peak allocated memory) is
# what is compared. Gradient clipping at 1.0 in stage 2 in both (HEAD: trainer.gradient_clip_val default of
# stage/ldm.yaml; new: module.gradient_clip_val default).
# Usage (repo root of the new code; HEAD's tree unpacked in BASE):
#   git archive 9e61dea | tar -x -C .carry/base   # the commit before the guard work (HEAD when this was written)
#   OUT=<dir> WORKLOADS="stage1 stage2" bash benchmarks/guard_overhead.sh
# One line per run goes to $OUT/runs.jsonl, all training output to $OUT/log.txt, a progress line per run to stdout,
# and at the end $OUT/guard_overhead.json (device, torch, every run, medians and new/head ratios, settings).
# DEADLINE (seconds, 0 = none): no run starts after it, and each run's timeout is cut to what is left of it, so the
# script ends by itself inside a device call's limit (e.g. DEADLINE=500 for a 590 s call). Do not pipe the script's
# output (a pipeline killed at the call's limit returns nothing); the files under $OUT hold everything.
# On the device (one `run` call, carry [".whl", ".carry"]: .whl = wheels of hydra-core 1.3.2, omegaconf 2.3.0,
# antlr4-python3-runtime 4.9.3, lpips 0.1.4, webdataset 1.0.2, braceexpand 0.1.7; .carry/base = HEAD's tree;
# .carry/cache/lpips/alexnet.safetensors = the LPIPS backbone from ~/.cache/ldm). The image has python3 but a
# `python` symlinked to it loses its packages (seen: "No module named torch"), hence a wrapper script:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site || exit; mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 "$@"\n' >/tmp/bin/python \
#     && chmod +x /tmp/bin/python && export PATH=/tmp/bin:$PATH LDM_CACHE_DIR=$PWD/.carry/cache LDM_OFFLINE=1; \
#     WORKLOADS=stage2 S2_STEPS=200 SETUP_S1_STEPS=30 RUN_TIMEOUT=150 DEADLINE=500 WORK=/tmp/gb bash benchmarks/guard_overhead.sh
# (stage 1 in a second call: WORKLOADS=stage1 S1_STEPS=150 ...). Both workloads in one 590 s call, without
# DEADLINE (S2_STEPS=200, S1_STEPS=120, SETUP_S1_STEPS=30), ran past the limit on an H100 and returned nothing.
# CPU smoke test: OUT=/tmp/x S1_STEPS=6 S2_STEPS=6 S1_BATCH=4 S2_BATCH=8 RES=32 CACHE_N=64 SETUP_S1_STEPS=3 \
#   WARMUP=2 ORDER="head new" bash benchmarks/guard_overhead.sh
set -uo pipefail
ROOT=$(pwd)
BASE=$(cd "${BASE:-.carry/base}" && pwd)
OUT=${OUT:-benchmarks/results/raw}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-/tmp/guard_bench}
WORKLOADS=${WORKLOADS:-stage1 stage2}
ORDER=${ORDER:-head new head new}
RES=${RES:-64}
S1_STEPS=${S1_STEPS:-200}
S1_BATCH=${S1_BATCH:-64}
S2_STEPS=${S2_STEPS:-400}
S2_BATCH=${S2_BATCH:-256}
UNET=${UNET:-small}
SETUP_S1_STEPS=${SETUP_S1_STEPS:-50}
CACHE_N=${CACHE_N:-20000}
WORKERS=${WORKERS:-8}
WARMUP=${WARMUP:-20}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
DEADLINE=${DEADLINE:-0}
START=$(date +%s)
export PYTHONUNBUFFERED=1
mkdir -p "$WORK"
LOG=$OUT/log.txt
: > "$OUT/runs.jsonl"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo cpu) | tee "$OUT/device.txt"
python -c 'import torch, pytorch_lightning as pl; print("torch", torch.__version__, "lightning", pl.__version__)' | tee -a "$OUT/device.txt"

# no validation, no checkpoint inside the timed window, no progress bar
COMMON="trainer.limit_val_batches=0 trainer.num_sanity_val_steps=0 trainer.check_val_every_n_epoch=null \
trainer.val_check_interval=1000000 trainer.enable_progress_bar=false callbacks.throughput.warmup=$WARMUP"

code_dir() { if [ "$1" = head ]; then echo "$BASE"; else echo "$ROOT"; fi; }

# seconds a step may still take: RUN_TIMEOUT, cut to what is left before DEADLINE (0: too little left)
time_left() {
  local left=$RUN_TIMEOUT
  if [ "$DEADLINE" -gt 0 ]; then
    left=$(( DEADLINE - ($(date +%s) - START) ))
    [ "$left" -gt "$RUN_TIMEOUT" ] && left=$RUN_TIMEOUT
    [ "$left" -lt 30 ] && left=0
  fi
  echo "$left"
}

# run VERSION NAME WORKLOAD STEPS ARGS...: one training run in its own folder, its perf.json appended to runs.jsonl
run() {
  local version=$1 name=$2 workload=$3 steps=$4; shift 4
  local dir=$WORK/$name t0 rc limit
  limit=$(time_left)
  if [ "$limit" = 0 ]; then
    echo "[$(( $(date +%s) - START )) s] $name skipped: DEADLINE=$DEADLINE s reached"
    echo "{\"version\": \"$version\", \"workload\": \"$workload\", \"run\": \"$name\", \"skipped\": true, \"perf\": null}" >> "$OUT/runs.jsonl"
    return
  fi
  echo "=== $name ($version, $workload): $*" >> "$LOG"
  echo "[$(( $(date +%s) - START )) s] $name ($version, $workload) starts, timeout $limit s"
  t0=$(date +%s.%N)
  (cd "$(code_dir "$version")" && PYTHONPATH=$(code_dir "$version")${PYTHONPATH:+:$PYTHONPATH} timeout "$limit" \
     python train.py run_name="$name" hydra.run.dir="$dir" "$@") >> "$LOG" 2>&1
  rc=$?
  python - "$OUT/runs.jsonl" "$dir" "$version" "$workload" "$name" "$steps" "$rc" "$t0" "$(date +%s.%N)" <<'PY'
import json, os, sys
out, d, version, workload, name, steps, rc, t0, t1 = sys.argv[1:]
p = os.path.join(d, "perf.json")
perf = json.load(open(p)) if os.path.exists(p) else None
row = {"version": version, "workload": workload, "run": name, "max_steps": int(steps), "rc": int(rc),
       "wall_s": round(float(t1) - float(t0), 1), "perf": perf}
open(out, "a").write(json.dumps(row) + "\n")
print(json.dumps(row))
PY
  [ "$rc" = 0 ] || tail -n 40 "$LOG"
}
trap 'echo "[$(( $(date +%s) - START )) s] interrupted"' TERM

S1_ARGS="resolution=$RES batch_size=$S1_BATCH loss.disc_start=0 data.num_workers=$WORKERS trainer.max_steps=$S1_STEPS $COMMON"
i=0
for w in $WORKLOADS; do
  if [ "$w" = stage1 ]; then
    i=0
    for v in $ORDER; do
      i=$((i + 1))
      run "$v" "s1_${v}_$i" stage1 "$S1_STEPS" $S1_ARGS
    done
  elif [ "$w" = stage2 ]; then
    # shared by all stage-2 runs: a short stage-1 run and its latent cache, made with HEAD's code (so the new
    # code also reads artifacts of the committed one)
    CKPT=$WORK/s1_setup/checkpoints/last.ckpt
    CACHE=$WORK/cache_shapes$RES
    if [ ! -f "$CKPT" ]; then
      run head s1_setup setup "$SETUP_S1_STEPS" resolution=$RES batch_size=$S1_BATCH data.num_workers=$WORKERS \
        trainer.max_steps=$SETUP_S1_STEPS $COMMON
    fi
    if [ ! -f "$CACHE/manifest.json" ]; then
      echo "=== cache" >> "$LOG"
      echo "[$(( $(date +%s) - START )) s] cache starts"
      t0=$(date +%s)
      limit=$(time_left); [ "$limit" = 0 ] && { echo "cache skipped: DEADLINE reached"; continue; }
      (cd "$BASE" && PYTHONPATH=$BASE${PYTHONPATH:+:$PYTHONPATH} timeout "$limit" python -m ldm.cache autoencoder.pretrained="$CKPT" out_dir="$CACHE" \
        data.dataset.size=$CACHE_N data.dataset.val_size=1000 batch_size=256 num_workers=$WORKERS progress=false \
        hydra.run.dir="$WORK/cache_run") >> "$LOG" 2>&1 || { tail -n 40 "$LOG"; echo "cache failed: stage 2 skipped"; continue; }
      echo "cache: $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
    fi
    S2_ARGS="stage=ldm unet=$UNET resolution=$RES batch_size=$S2_BATCH autoencoder.pretrained=$CKPT cache_dir=$CACHE \
module.base_learning_rate=3e-4 module.ema_decay=0.999 module.lr_scheduler.total_iters=500 trainer.max_steps=$S2_STEPS $COMMON"
    i=0
    for v in $ORDER; do
      i=$((i + 1))
      if [ "$v" = head ]; then grid="~callbacks.sample_grid"; else grid="callbacks.sample_grid=null"; fi
      run "$v" "s2_${v}_$i" stage2 "$S2_STEPS" $S2_ARGS "$grid"
    done
  fi
done

SETTINGS="RES=$RES S1_STEPS=$S1_STEPS S1_BATCH=$S1_BATCH S2_STEPS=$S2_STEPS S2_BATCH=$S2_BATCH UNET=$UNET \
SETUP_S1_STEPS=$SETUP_S1_STEPS CACHE_N=$CACHE_N WORKERS=$WORKERS WARMUP=$WARMUP ORDER='$ORDER' WORKLOADS='$WORKLOADS'"
python - "$OUT" "$SETTINGS" "$S1_ARGS" "${S2_ARGS:-}" <<'PY'
import json, statistics, sys
out, settings, s1_args, s2_args = sys.argv[1:]
rows = [json.loads(line) for line in open(f"{out}/runs.jsonl")]
device = open(f"{out}/device.txt").read().split("\n")
print(f"{'run':<14}{'rc':>4}{'img/s':>10}{'peak GiB':>10}{'batches':>9}{'wall s':>8}")
for r in rows:
    p = r["perf"] or {}
    ips, mem = p.get("images_per_s"), p.get("peak_memory_gib")
    print(f"{r['run']:<14}{r.get('rc', '-')!s:>4}{ips or float('nan'):>10.1f}{mem or float('nan'):>10.3f}"
          f"{p.get('timed_batches', 0):>9}{r.get('wall_s', '-')!s:>8}")
summary = {}
for w in ("stage1", "stage2"):
    s = {}
    for v in ("head", "new"):
        done = [r["perf"] for r in rows if r["workload"] == w and r["version"] == v and r["perf"]]
        if done:
            s[v] = {"runs": len(done), "median_images_per_s": statistics.median(p["images_per_s"] for p in done),
                    "median_peak_memory_gib": statistics.median(p["peak_memory_gib"] or 0 for p in done)}
    if len(s) == 2:
        s["ratio_new_over_head_images_per_s"] = s["new"]["median_images_per_s"] / s["head"]["median_images_per_s"]
        print(f"{w}: median img/s head {s['head']['median_images_per_s']:.1f} new {s['new']['median_images_per_s']:.1f}"
              f" ratio new/head {s['ratio_new_over_head_images_per_s']:.4f}; peak GiB head "
              f"{s['head']['median_peak_memory_gib']:.3f} new {s['new']['median_peak_memory_gib']:.3f}")
    if s:
        summary[w] = s
json.dump({"device": device[0], "software": device[1] if len(device) > 1 else None,
           "command": f"{settings} bash benchmarks/guard_overhead.sh",
           "stage1_args": s1_args, "stage2_args": s2_args + " (+ head: ~callbacks.sample_grid, new: callbacks.sample_grid=null)",
           "runs": rows, "summary": summary}, open(f"{out}/guard_overhead.json", "w"), indent=1)
PY
