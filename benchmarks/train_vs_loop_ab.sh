#!/usr/bin/env bash
# Before/after of a train.py speed change on one GPU, one device call: a snapshot of the old code (BASE, e.g.
# `git archive a143f50 | tar -x -C .carry/base`) against this tree; per tree and preset, one process of
# benchmarks/train_vs_loop.py runs the hand-written loop and train.py (eager, bf16) one after the other.
#   OUT=<dir> LIMIT=<seconds> BASE=.carry/base AE_CKPT=<stage-1 ckpt> bash benchmarks/train_vs_loop_ab.sh
# On the device: carry [".whl", ".carry"] (.whl: the wheels README's device notes list; the stage-1 checkpoint of a
# 3-step tiny run, see benchmarks/results/train_vs_loop_h100.json). Results: $OUT/<preset>_<old|new>.json/.log.
set -uo pipefail
BASE=${BASE:-.carry/base}; BASE=$(cd "$BASE" && pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export LDM_OFFLINE=1 PYTHONUNBUFFERED=1
START=$(date +%s); LIMIT=${LIMIT:-440}
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c 'import torch, pytorch_lightning as pl; print(torch.__version__, pl.__version__)'; nproc; lscpu | grep "Model name") > $OUT/device.txt 2>&1
S=benchmarks/train_vs_loop.py
C="--ae-ckpt ${AE_CKPT:-.carry/perf16/setup/ae.ckpt} --setup-dir /tmp/tvl --profile-steps 0"
run() {
  name=$1; root=$2; shift 2
  left=$(( LIMIT - ($(date +%s) - START) ))
  if [ $left -lt 50 ]; then echo "$name skipped: $left s left"; return; fi
  echo "[$(( $(date +%s) - START )) s] $name starts"
  TVL_ROOT=$root timeout $(( left - 5 )) python3 $S "$@" $C --deadline $(( left - 30 )) --out $OUT/$name.json >> $OUT/$name.log 2>&1
  echo "[$(( $(date +%s) - START )) s] $name rc=$?"; grep '^\[ ' $OUT/$name.log
}
run sd15_old $BASE --preset sd15 --modes eager --variants recipe --steps 15 --train-variants default
run sd15_new $PWD --preset sd15 --modes eager --variants all_fixes --steps 15 --train-variants default
run small_old $BASE --preset small --modes eager --variants recipe --steps 30 --train-variants default,progress_bar
run small_new $PWD --preset small --modes eager --variants all_fixes --steps 30 --train-variants default,progress_bar
ls -la $OUT
