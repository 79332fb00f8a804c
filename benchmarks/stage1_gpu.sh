#!/usr/bin/env bash
# Stage-1 proof runs on one GPU (the numbers in benchmarks/results/stage1_*.json come from this script):
#   1. KL-f8 VAE encode throughput, ours vs diffusers, eager and torch.compile, bf16, batch 64 at 256².
#   2. The quickstart (`python train.py`, defaults only) on the GPU: bf16 chosen automatically.
#   3. The paper's KL-f8 autoencoder at 256² on `shapes` in bf16 for a fixed number of steps.
# Usage: OUT=<dir> bash benchmarks/stage1_gpu.sh   (LDM_CACHE_DIR must hold the LPIPS weights when offline)
set -euo pipefail
OUT=${OUT:-benchmarks/results/raw}
F8_STEPS=${F8_STEPS:-1500}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"

python benchmarks/vae_encode.py --batch 64 --resolution 256 --out "$OUT/vae_encode.json"

start=$(date +%s)
python train.py run_name=gpu_quickstart 2>&1 | tail -n 5
echo "quickstart wall seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/summary.txt"
cp outputs/autoencoder/gpu_quickstart/perf.json "$OUT/quickstart_perf.json"
cp outputs/autoencoder/gpu_quickstart/csv/version_0/metrics.csv "$OUT/quickstart_metrics.csv"

OUT=$OUT F8_STEPS=$F8_STEPS bash benchmarks/stage1_kl_f8.sh
