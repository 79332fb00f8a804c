#!/usr/bin/env bash
# Issue 16 measurements on one GPU, in one device call: JOB... run in order, each cut to the time left.
#   OUT=<dir> LIMIT=<seconds> BASE=<snapshot of the old tree> bash benchmarks/perf_device.sh JOB...
# Carry [".whl", ".carry/perf16/setup", ".carry/lpips16", ".carry/base"]: device wheels (README's device notes), the
# stage-1 checkpoint that makes the latent caches, LPIPS weights (`python -m ldm.pretrained export-lpips --dtype
# float16 --net vgg alex --out .carry/lpips16`) and `git archive <old commit> | tar -x -C .carry/base`.
# JOBs:
#   gpu_tests          pytest -m gpu on the guard, fast-path and stage-2 mixed-precision tests
#   stage1_eager|stage1_compiled   train.py experiment=paper/kl_f8 at 256², batch 16, full loss (GAN from step 0);
#                      with _old: the same from $BASE
#   stage1_profile|stage1_profile_compiled   benchmarks/stage1_profile.py (the same run, a profiled window by part)
#   <job>_cl           any stage1/small/sd15 job with module.channels_last=true (train.py and the loop alike)
#   COMPILE_MODE=<mode> the compiled jobs with that torch.compile mode (module.compile=<mode>; loop alike); a job
#                      ending in _ro takes reduce-overhead (CUDA graphs), _mat max-autotune-no-cudagraphs
#   sdpa_sd15|sdpa_small  benchmarks/sdpa_backends.py: each SDPA backend on the preset's attention shapes
#   stage1_vq_f8       train.py experiment=paper/vq_f8 on `shapes` at 256² as the recipe says (batch 10, GAN from
#                      step 1), STEPS_VQ steps, validation every half: losses, codebook usage, perplexity, PSNR
#   fig6               benchmarks/fig6.py --preset gpu (the factors side by side) into /tmp/fig6, segments that end 20 s
#                      before the limit; fig6.md/png to $OUT, the rest (json, logs, grids; no checkpoints) in fig6.tgz
#   ddp_proof          benchmarks/ddp_proof.py --preset gpu on every GPU of the machine (issue 19; needs 2+): cache, stage 2
#                      (small, sd15), stage 1, evaluate.py and SIGTERM under DDP against one GPU; ddp_proof.json and
#                      ddp_logs.tgz to $OUT
#   small_profile_new  small eager, loop and train.py with 3 profiled steps each (profiler tables in raw_<job>.tgz)
#   small_eager_old|small_eager_new|small_compiled_new|sd15_eager_old|sd15_eager_new|sd15_compiled_new
#                      benchmarks/train_vs_loop.py (loop and train.py alternating, --repeats), old = $BASE
set -uo pipefail
# installed once per machine: a second invocation beside a running one leaves the packages in place
PYTHONPATH=/tmp/site python3 -c 'import hydra, lpips, webdataset' 2>/dev/null || python3 -m pip install -q --no-index \
  --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
export LDM_OFFLINE=1 PYTHONUNBUFFERED=1 LDM_CACHE_DIR=$PWD/.carry/lpips16
mkdir -p /tmp/bin && ln -sf "$(command -v python3)" /tmp/bin/python && export PATH=/tmp/bin:$PATH
START=$(date +%s); LIMIT=${LIMIT:-580}; BASE=${BASE:-.carry/base}
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
 python3 -c 'import torch, pytorch_lightning as pl; print(torch.__version__, pl.__version__)'; nproc) > $OUT/device.txt 2>&1
S=benchmarks/train_vs_loop.py
C="--ae-ckpt .carry/perf16/setup/ae.ckpt --setup-dir /tmp/tvl --profile-steps 0"
STEPS1=${STEPS1:-90}
for job in "$@"; do
  left=$(( LIMIT - ($(date +%s) - START) ))
  if [ $left -lt 45 ]; then echo "$job skipped: $left s left"; continue; fi
  echo "[$(( $(date +%s) - START )) s] $job starts ($left s left)"
  root=$PWD; case $job in *_old) root=$(cd "$BASE" && pwd);; esac
  cl=false; case $job in *_cl) cl=true;; esac
  mode=${COMPILE_MODE:-}; case $job in *_ro) mode=reduce-overhead;; *_mat) mode=max-autotune-no-cudagraphs;; esac
  case $job in
    gpu_tests) timeout $(( left - 5 )) python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_step_guard.py \
        tests/test_fast_paths.py tests/test_train_stage2.py > $OUT/$job.log 2>&1;;
    stage1_eager*|stage1_compiled*) c=false; case $job in stage1_compiled*) c=${mode:-true};; esac
      (cd "$root" && timeout $(( left - 5 )) python3 train.py run_name=$job experiment=paper/kl_f8 data=shapes trainer=gpu \
        data.num_workers=14 batch_size=16 module.scale_lr=false module.base_learning_rate=1e-4 loss.disc_start=0 \
        trainer.max_steps=$STEPS1 trainer.limit_val_batches=0 trainer.num_sanity_val_steps=0 \
        trainer.val_check_interval=100000 trainer.check_val_every_n_epoch=null latent_stats_images=16 \
        callbacks.throughput.warmup=30 module.compile=$c module.channels_last=$cl trainer.enable_progress_bar=false \
        hydra.run.dir=/tmp/s1/$job > $OUT/$job.log 2>&1)
      cp /tmp/s1/$job/perf.json $OUT/$job.perf.json 2>/dev/null;;
    stage1_profile*) extra=""; case $job in *compiled*) extra="module.compile=${mode:-true}";; esac
      timeout $(( left - 5 )) python3 benchmarks/stage1_profile.py --raw-dir /tmp/s1prof --out $OUT/$job.json \
        -- data.num_workers=14 module.channels_last=$cl $extra > $OUT/$job.log 2>&1
      tar czf $OUT/$job.tgz -C /tmp s1prof;;
    stage1_vq_f8) timeout $(( left - 5 )) python3 train.py run_name=$job experiment=paper/vq_f8 data=shapes \
        trainer=gpu data.num_workers=14 trainer.max_steps=${STEPS_VQ:-300} trainer.limit_val_batches=8 \
        trainer.val_check_interval=$(( ${STEPS_VQ:-300} / 2 )) latent_stats_images=64 callbacks.throughput.warmup=30 \
        trainer.enable_progress_bar=false hydra.run.dir=/tmp/s1/$job > $OUT/$job.log 2>&1
      cp /tmp/s1/$job/perf.json $OUT/$job.perf.json 2>/dev/null
      cp /tmp/s1/$job/csv/*/metrics.csv $OUT/$job.metrics.csv 2>/dev/null
      cp /tmp/s1/$job/images/*.png $OUT/ 2>/dev/null;;
    fig6) timeout $(( left - 5 )) python3 benchmarks/fig6.py --preset gpu --out /tmp/fig6 --deadline $(( left - 20 )) \
        > $OUT/fig6.log 2>&1
      cp /tmp/fig6/fig6.md /tmp/fig6/fig6.png $OUT/ 2>/dev/null
      tar czf $OUT/fig6.tgz -C /tmp --exclude='*.ckpt' --exclude=images --exclude='cache_f*' --exclude='fid_stats*' \
        --exclude='*.pt' --exclude='*.safetensors' fig6;;
    sdpa_sd15|sdpa_small) timeout $(( left - 5 )) python3 benchmarks/sdpa_backends.py --preset ${job#sdpa_} \
        --out $OUT/$job.json > $OUT/$job.log 2>&1;;
    ddp_proof) timeout $(( left - 5 )) python3 benchmarks/ddp_proof.py --preset gpu --nproc "$(nvidia-smi -L | wc -l)" \
        --ae-ckpt .carry/perf16/setup/ae.ckpt --out /tmp/ddp --deadline $(( left - 120 )) > $OUT/ddp_proof.log 2>&1
      cp /tmp/ddp/ddp_proof.json $OUT/ 2>/dev/null
      tar czf $OUT/ddp_logs.tgz -C /tmp --exclude='*.ckpt' --exclude='cache_*' --exclude=images --exclude='*.tar' ddp;;
    small_profile_*) a="--preset small --modes eager --variants all_fixes --steps 30 --repeats 1";;
    small_eager_*) a="--preset small --modes eager --variants all_fixes --steps 40 --repeats 2";;
    small_compiled_*) a="--preset small --modes compiled --compiled-variants all_fixes --steps 40 --repeats ${REPEATS:-2}";;
    sd15_eager_*) a="--preset sd15 --modes eager --variants all_fixes --steps 15 --repeats ${REPEATS:-2}";;
    sd15_compiled_*) a="--preset sd15 --modes compiled --compiled-variants all_fixes --steps 15 --repeats ${REPEATS:-2}";;
  esac
  case $job in small_*|sd15_*)
    [ $cl = true ] && a="$a --train-override module.channels_last=true"
    [ -n "$mode" ] && a="$a --compile-mode $mode"
    p=""; case $job in *_profile_*) p="--profile-steps 3 --raw-dir /tmp/raw_$job";; esac
    TVL_ROOT=$root timeout $(( left - 5 )) python3 $S $a $C $p --deadline $(( left - 40 )) --out $OUT/$job.json \
      >> $OUT/$job.log 2>&1
    [ -n "$p" ] && tar czf $OUT/raw_$job.tgz -C /tmp raw_$job;;
  esac
  echo "[$(( $(date +%s) - START )) s] $job rc=$?"
  grep -E '^\[ |passed|failed|images_per_s|^stage 1:' $OUT/$job.log | tail -12
done
# the device returns at most 8 files: the logs travel as one archive
(cd $OUT && ls *.log > /dev/null 2>&1 && tar czf logs.tgz *.log && rm -f *.log)
