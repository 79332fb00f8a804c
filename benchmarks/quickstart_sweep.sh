#!/usr/bin/env bash
# Tune the CPU quickstart recipe fast on a GPU: runs the quickstart with variations, 4 at a time, and prints
# the validation PSNR/LPIPS/SSIM of each. (Recipe exploration only; README's CPU numbers come from a CPU.)
set -uo pipefail
OUT=${OUT:-/tmp/sweep}
mkdir -p "$OUT"
B='module.optimizer.betas=[0.9,0.99] module.disc_optimizer.betas=[0.9,0.99] loss.perceptual.net=alex'
runs=(
  "s1|$B module.base_learning_rate=3e-3 trainer.max_steps=1500 loss.disc_start=400"
  "s2|$B module.base_learning_rate=3e-3 trainer.max_steps=1500 loss.disc_start=1000"
  "s3|$B module.base_learning_rate=3e-3 trainer.max_steps=2400 loss.disc_start=1600 batch_size=8"
  "s4|$B module.base_learning_rate=5e-3 trainer.max_steps=1500 loss.disc_start=1000"
  "s5|$B module.base_learning_rate=3e-3 trainer.max_steps=1500 loss.disc_start=1000 loss.perceptual_weight=0.5"
  "s6|$B module.base_learning_rate=3e-3 trainer.max_steps=1500 loss.disc_start=1000000"
  "s7|$B module.base_learning_rate=3e-3 trainer.max_steps=1200 loss.disc_start=800"
  "s8|$B module.base_learning_rate=2e-3 trainer.max_steps=1500 loss.disc_start=1000"
)
run() {
  local name=${1%%|*} args=${1#*|}
  python train.py run_name=sweep_$name $args trainer.val_check_interval=300 > "$OUT/$name.log" 2>&1
}
for i in 0 4; do
  for j in 0 1 2 3; do run "${runs[$((i + j))]}" & done
  wait
done
for r in "${runs[@]}"; do
  name=${r%%|*}
  python - "$name" "${r#*|}" <<'PY'
import csv, glob, sys
name, args = sys.argv[1], sys.argv[2]
files = glob.glob(f"outputs/autoencoder/sweep_{name}/csv/version_0/metrics.csv")
if not files:
    print(name, "FAILED", args); sys.exit()
rows = [r for r in csv.DictReader(open(files[0])) if r.get("val/psnr")]
print(name, [(r["step"], round(float(r["val/psnr"]), 2), round(float(r["val/lpips"]), 3), round(float(r["val/ssim"]), 3)) for r in rows], args)
PY
done
for n in s2 s3; do cp "$(ls outputs/autoencoder/sweep_$n/images/*.png | tail -n 1)" "$OUT/${n}_grid.png" 2>/dev/null || true; done
