#!/usr/bin/env bash
# Evaluation proof on one GPU (docs/results.md and benchmarks/results/eval_h200.json come from this script).
#   PHASE=train: stage 1 -> cache -> stage 2 on 64 px `shapes` (benchmarks/stage2_gpu.sh, no sampling)
#   PHASE=eval:  evaluate.py on the stage-1 checkpoint (PSNR/SSIM/LPIPS/rFID on the val split, compare=ldm_table8),
#                then on the stage-2 checkpoint as one Hydra multirun: DDIM and DPM-Solver++ at 10/20/50
#                steps, without (cfg_scale=1) and with (cfg_scale=3) guidance, N images each (vgg16 FID/KID and
#                the shapes text-alignment score), then python -m ldm.report renders the results CSV.
# Usage: OUT=<dir> PHASE=train bash benchmarks/eval_gpu.sh; then OUT=<dir> PHASE=eval bash benchmarks/eval_gpu.sh
# on the same machine (outputs/ holds the checkpoints between the two); PHASE=all runs both. SAMPLERS, STEPS and
# CFGS choose the grid (comma lists); S1_STEPS, S2_TIME, S2_ARGS, CACHE_N go to benchmarks/stage2_gpu.sh.
set -euo pipefail
OUT=${OUT:-benchmarks/results/raw}
PHASE=${PHASE:-train}
N=${N:-1000}
BATCH=${BATCH:-250}
SAMPLERS=${SAMPLERS:-ddim,dpmpp_2m}
STEPS=${STEPS:-10,20,50}
CFGS=${CFGS:-1,3}
mkdir -p "$OUT"
CSV=outputs/eval/results.csv
if [ "$PHASE" = train ] || [ "$PHASE" = all ]; then
  SAMPLE_SPECS="" S1_STEPS=${S1_STEPS:-1200} CACHE_N=${CACHE_N:-30000} S2_TIME=${S2_TIME:-00:00:04:00} \
    OUT="$OUT" bash benchmarks/stage2_gpu.sh
fi
if [ "$PHASE" = eval ] || [ "$PHASE" = all ]; then
  test -f outputs/ldm/s2/checkpoints/last.ckpt || { echo "no stage-2 checkpoint: run PHASE=train first"; exit 3; }
  t0=$(date +%s)
  python evaluate.py ckpt=outputs/autoencoder/s1/checkpoints/last.ckpt split=val n_samples=$N batch_size=$BATCH \
    out_dir=outputs/eval/stage1 results_csv=$CSV compare=ldm_table8 progress=false 2>&1 | tail -n 30
  cp outputs/eval/stage1/results.json "$OUT/eval_stage1.json"
  echo "stage-1 evaluation seconds: $(( $(date +%s) - t0 ))" | tee "$OUT/eval_seconds.txt"
  t0=$(date +%s)
  python evaluate.py -m ckpt=outputs/ldm/s2/checkpoints/last.ckpt split=val n_samples=$N batch_size=$BATCH \
    sampler=$SAMPLERS steps=$STEPS cfg_scale=$CFGS 'out_dir=outputs/eval/s2/${sampler.name}-${steps}-${cfg_scale}' \
    results_csv=$CSV progress=false hydra.sweep.dir=outputs/eval/multirun 2>&1 | grep -E "^\||fid|alignment|Error|error" | tail -n 60
  echo "stage-2 multirun seconds: $(( $(date +%s) - t0 ))" | tee -a "$OUT/eval_seconds.txt"
  python -m ldm.report $CSV --x steps --y fid --group sampler,cfg_scale --where task=generation --out outputs/eval/report
  python -m ldm.report $CSV --x steps --y alignment --group sampler,cfg_scale --where task=generation --out outputs/eval/report_alignment
  cp $CSV "$OUT/eval_results.csv"
  # at most 8 files come back from the GPU machine: the rest travels in one tar
  tar -cf "$OUT/eval_files.tar" outputs/eval/report outputs/eval/report_alignment outputs/eval/stage1/*.md \
    outputs/eval/stage1/reconstructions.png outputs/eval/s2/*/results.json outputs/eval/s2/*/results.md \
    outputs/eval/s2/*/samples.png outputs/eval/s2/*/generation.json
fi
ls -la "$OUT"
