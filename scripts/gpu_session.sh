#!/usr/bin/env bash
# One prepared session on a lent GPU machine (the `device` tool runs it in the repository root; $OUT comes back).
# That machine has PyTorch, transformers, accelerate and nvcc but no package registry, so what it lacks travels as
# wheels in .whl/ (docs/benchmarks.md, "On a GPU", lists them and the command that fetches them) and text3d's own
# entry points as .gpu/text3d-*.dist-info (copied from an editable install here); the code is the working tree.
#
#   1. text3d doctor                          backends found (this also builds nerfacc's CUDA kernels, first use)
#   2. an SD-2.1-base-shaped random teacher   scripts/make_sd_teacher.py (865.9 M-parameter UNet)
#   3. scripts/gpu_check.py --teacher it      each CUDA path against its PyTorch twin, SDS / VSD step ratios
#   4. the main job on CUDA                   text3d generate "a red cube" (embedded teacher, default config) + eval
#   5. SDS and VSD at SD-2.1-base size        short end-to-end runs with export (random weights: speed and paths)
#   6. scripts/bench_step.py sds,vsd,vsd-fused  the step split again, with VSD's fused LoRA step beside
#
# STAGES="doctor red-cube ..." runs a subset (default: all; sd-teacher is built when a later stage needs it).
# Every stage gets what is left of one deadline (DEADLINE_S, default 480 s), so a slow or hung stage cannot take
# the later ones' output with it; each stage's exit code and wall time go to $OUT/session.log.
set -u
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TQDM_MININTERVAL=10
START=$(date +%s)
DEADLINE=$((START + ${DEADLINE_S:-480}))
LOG="$OUT/session.log"
WORK=/tmp/text3d-gpu

want() { [ "${STAGES:-all}" = all ] || [[ " $STAGES " == *" $1 "* ]]; }

stage() {  # stage NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, time left), tee to the log, record rc and time
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - $(date +%s)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then echo "## $name: not run (deadline)" | tee -a "$LOG"; return 1; fi
  echo "## $name (limit ${limit} s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "## $name: rc $rc, $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
  return "$rc"
}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -3 | tee -a "$LOG"
  cp -r .gpu/text3d-*.dist-info /tmp/site/ 2>/dev/null
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T3D="python3 -m text3d"
mkdir -p "$WORK"
{ nvidia-smi -L; python3 -c "import torch, transformers, diffusers, peft; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"; } 2>&1 \
  | tee -a "$LOG"

want doctor && stage doctor 240 $T3D doctor
if want gpu-check || want sd-sds || want sd-vsd || want bench; then
  stage sd-teacher 150 python3 scripts/make_sd_teacher.py --shape sd21-base --out "$WORK/sd21-base" --force
fi
want gpu-check && stage gpu-check 200 python3 scripts/gpu_check.py --teacher "$WORK/sd21-base" --debug \
  | tee "$OUT/gpu_check.txt"

if want red-cube; then
  stage red-cube 150 $T3D generate "a red cube" --out "$WORK/red-cube" --quiet --no-video
  stage red-cube-eval 60 $T3D eval run "$WORK/red-cube"
fi

SD_LATENT="sds.space=latent sds.guidance_scale=100 nerf.background=learned train.checkpoint_every=100"
want sd-sds && stage sd-sds 120 $T3D generate "a DSLR photo of a corgi" --teacher "$WORK/sd21-base" \
  --out "$WORK/sd-sds" --quiet --no-video --steps 200 $SD_LATENT
want sd-vsd && stage sd-vsd 120 $T3D generate "a DSLR photo of a corgi" --teacher "$WORK/sd21-base" \
  --out "$WORK/sd-vsd" --quiet --no-video --config text3d/configs/vsd-sd21.yaml --steps 200 \
  train.high_resolution_from=0.5 train.checkpoint_every=100 export.grid_resolution=128 export.texture_size=512
want bench && stage bench 120 python3 scripts/bench_step.py --teacher "$WORK/sd21-base" --methods sds,vsd,vsd-fused \
  --steps 10 --warmup 3

# what comes back: the log, the check's table, and each run's small files (no checkpoints, no teacher)
(cd "$WORK" && tar czf "$OUT/runs.tgz" --exclude='*.pt' --exclude='*.safetensors' --exclude='*.bin' \
  --exclude='checkpoints' --exclude='sd21-base' --exclude='*.mp4' --exclude='web' . 2>/dev/null)
echo "## session: $(( $(date +%s) - START )) s" | tee -a "$LOG"
