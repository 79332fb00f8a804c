#!/usr/bin/env bash
# The paper's KL-f8 autoencoder at 256² on `shapes`, bf16 on one GPU, for a fixed budget of steps/time.
#   OUT=<dir> F8_STEPS=1500 bash benchmarks/stage1_kl_f8.sh
set -euo pipefail
OUT=${OUT:-benchmarks/results/raw}
F8_STEPS=${F8_STEPS:-1500}
mkdir -p "$OUT"
start=$(date +%s)
python train.py run_name=gpu_kl_f8 experiment=paper/kl_f8 data=shapes trainer=gpu data.num_workers=10 \
  batch_size=16 module.scale_lr=false module.base_learning_rate=1e-4 trainer.max_steps="$F8_STEPS" \
  loss.disc_start=$(( F8_STEPS / 2 )) trainer.val_check_interval=250 trainer.limit_val_batches=16 \
  latent_stats_images=512 trainer.max_time=00:00:05:00 2>&1 | tail -n 3
echo "kl_f8 wall seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/summary.txt"
cp outputs/autoencoder/gpu_kl_f8/perf.json "$OUT/kl_f8_perf.json"
cp outputs/autoencoder/gpu_kl_f8/csv/version_0/metrics.csv "$OUT/kl_f8_metrics.csv"
cp "$(ls outputs/autoencoder/gpu_kl_f8/images/*.png | tail -n 1)" "$OUT/kl_f8_grid.png"
