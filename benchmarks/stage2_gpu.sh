#!/usr/bin/env bash
# Stage-2 proof on one GPU (benchmarks/results/stage2_*.json and docs/stage2_*.png come from this script):
#   1. stage 1: the tiny KL-f4 autoencoder on 64 px `shapes` (quickstart recipe, bf16 chosen automatically)
#   2. latent cache of `shapes` with that autoencoder (python -m ldm.cache)
#   3. stage 2: the `small` U-Net + a text transformer over hashed words (`transformer_small`: width 128, 2 layers) trained from scratch on the cached latents
#   4. sample.py with each sampler (ddpm, ddim, dpmpp_2m) on fixed prompts
# Usage: OUT=<dir> bash benchmarks/stage2_gpu.sh   (LDM_CACHE_DIR must hold the LPIPS weights when offline).
# The knobs below shrink it for a CPU smoke test, e.g. S1_STEPS=20 S2_STEPS=20 CACHE_N=64 S2_BATCH=8 ...
set -euo pipefail
OUT=${OUT:-benchmarks/results/raw}
RES=${RES:-64}
S1_STEPS=${S1_STEPS:-1500}
S1_BATCH=${S1_BATCH:-64}
CACHE_N=${CACHE_N:-50000}
S2_STEPS=${S2_STEPS:-100000}
S2_TIME=${S2_TIME:-00:00:04:45}
S2_BATCH=${S2_BATCH:-256}
S2_EVERY=${S2_EVERY:-1000}
UNET=${UNET:-small}
WORKERS=${WORKERS:-8}
N=${N:-8}
SAMPLE_SPECS=${SAMPLE_SPECS-ddpm:250 ddim:50 dpmpp_2m:25}   # SAMPLE_SPECS="": skip sampling
S2_ARGS=${S2_ARGS:-}   # more stage-2 overrides, e.g. S2_ARGS="latent_norm=channel"
mkdir -p "$OUT"
LOG=outputs/stage2_log && mkdir -p $LOG   # small text results, merged into $OUT/stage2_metrics.json at the end
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo cpu) | tee $LOG/device.txt

t0=$(date +%s)
python train.py run_name=s1 resolution=$RES batch_size=$S1_BATCH trainer.max_steps=$S1_STEPS \
  trainer.val_check_interval=$(( S1_STEPS / 3 )) trainer.check_val_every_n_epoch=null loss.disc_start=$(( S1_STEPS * 3 / 4 )) \
  data.num_workers=$WORKERS latent_stats_images=2048 trainer.enable_progress_bar=false 2>&1 | tail -n 3
t1=$(date +%s)
python -m ldm.cache ckpt=outputs/autoencoder/s1/checkpoints/last.ckpt out_dir=outputs/cache/shapes$RES \
  data.dataset.size=$CACHE_N data.dataset.val_size=1000 batch_size=256 num_workers=$WORKERS progress=false 2>&1 | tail -n 3
t2=$(date +%s)
python train.py stage=ldm run_name=s2 unet=$UNET resolution=$RES batch_size=$S2_BATCH \
  autoencoder.pretrained=outputs/autoencoder/s1/checkpoints/last.ckpt cache_dir=outputs/cache/shapes$RES \
  module.base_learning_rate=3e-4 module.ema_decay=0.999 module.lr_scheduler.total_iters=500 \
  trainer.max_steps=$S2_STEPS trainer.max_time=$S2_TIME trainer.val_check_interval=$S2_EVERY \
  trainer.check_val_every_n_epoch=null trainer.limit_val_batches=4 callbacks.sample_grid.every_n_steps=$S2_EVERY \
  trainer.enable_progress_bar=false $S2_ARGS 2>&1 | tail -n 3
t3=$(date +%s)
printf '%s\n' "a large red circle in the center, on a black background" \
  "a small blue square in the top left, on a white background" \
  "a large green triangle at the bottom and a small yellow star at the top, on a gray background" \
  "a large white hexagon on the left and a small orange diamond on the right, on a pink background" > $LOG/prompts.txt
for spec in $SAMPLE_SPECS; do
  s=${spec%%:*}; k=${spec##*:}
  ts=$(date +%s%N)
  python sample.py ckpt=outputs/ldm/s2/checkpoints/last.ckpt prompts_file=$LOG/prompts.txt n=$N sampler=$s \
    steps=$k cfg_scale=3 seed=0 out_dir=outputs/samples/$s 2>&1 | tail -n 1
  echo "$s $k $(( ($(date +%s%N) - ts) / 1000000 ))" >> $LOG/sample_ms.txt
  cp outputs/samples/$s/grid.png "$OUT/stage2_samples_${s}.png"
done
t4=$(date +%s)
echo "seconds: stage1 $((t1-t0)) cache $((t2-t1)) stage2 $((t3-t2)) sampling $((t4-t3))" | tee $LOG/times.txt
python - "$OUT" "outputs/cache/shapes$RES/manifest.json" <<'PY'
import csv, json, os, sys
def load(p):
    return json.load(open(p)) if os.path.exists(p) else None
out, manifest = sys.argv[1], json.load(open(sys.argv[2]))
def rows(pattern, key):  # the newest csv logger version of the run
    import glob
    path = sorted(glob.glob(pattern))[-1]
    return [(float(r[key]), int(r["step"])) for r in csv.DictReader(open(path)) if r.get(key)]
r = {"stage1_val": {k: rows("outputs/autoencoder/s1/csv/version_*/metrics.csv", k)
                    for k in ("val/psnr", "val/lpips", "val/ssim")},
     "stage2_val_loss": rows("outputs/ldm/s2/csv/version_*/metrics.csv", "val/loss"),
     "cache": {k: manifest[k] for k in ("latent_shape", "dtype", "latent_stats")}
              | {"num_samples": {s: v["num_samples"] for s, v in manifest["splits"].items()}},
     "stage1_perf": load("outputs/autoencoder/s1/perf.json"),
     "stage2_perf": load("outputs/ldm/s2/perf.json"),
     "device": open("outputs/stage2_log/device.txt").read().strip(),
     "phase_seconds": open("outputs/stage2_log/times.txt").read().strip(),
     "sample_ms (sampler, steps, wall ms of sample.py incl. load)": ([line.split() for line in open("outputs/stage2_log/sample_ms.txt").read().splitlines() if line.strip()] if os.path.exists("outputs/stage2_log/sample_ms.txt") else []),
     "sampling (sample.py timing.json: img/s of the sampling loop, peak GPU memory)":
         {s: load(f"outputs/samples/{s}/timing.json") for s in ("ddpm", "ddim", "dpmpp_2m")
          if os.path.exists(f"outputs/samples/{s}/timing.json")}}
from ldm.checkpoint import load_checkpoint  # what the run trained: U-Net preset and text encoder, as resolved
config = load_checkpoint("outputs/ldm/s2/checkpoints/last.ckpt")["ldm"]["config"]
r["models"] = {"unet": config["unet"], "text_encoder": config["text_encoder"]}
json.dump(r, open(f"{out}/stage2_metrics.json", "w"), indent=1)
print(json.dumps(r)[:1500])
PY
ls outputs/ldm/s2/images | tail -n 3
cp "$(ls outputs/ldm/s2/images/samples_step*.png | tail -n 1)" "$OUT/stage2_train_grid_last.png"
