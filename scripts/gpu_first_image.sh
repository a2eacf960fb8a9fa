#!/usr/bin/env bash
# Time to the first image with torch.compile on (the default on a GPU), cold and warm compile cache:
# each run is a whole new process (imports, random-weight build, compile, 28/30 steps), as a user restarting
# the app would see. Usage: bash scripts/gpu_first_image.sh OUT_DIR MODEL PRECISION [STEPS]
set -euo pipefail
out=${1:?output folder}; model=${2:?model}; precision=${3:?precision}; steps=${4:-}
cache=$(mktemp -d /tmp/prism-first-image-XXXX)  # an empty engine cache: the first run compiles from scratch
mkdir -p "$out"
# the imports alone, in a process of their own (22 of the 43 s of a warm restart on an H100 machine, 2026-12-07)
${PYTHON:-python3} -c 'import time; t = time.perf_counter(); import pipelines.cli, pipelines.manager, diffusers, transformers
print(f"imports: {time.perf_counter() - t:.1f} s (pipelines, diffusers, transformers)")' 2>/dev/null | tee -a "$out/first-image.txt"
for run in cold warm; do
  start=$(date +%s%N)
  ${PYTHON:-python3} -m pipelines generate "a photo of a red fox in a snowy forest, golden hour" --model "$model" \
    --random-weights --precision "$precision" --seed 1 ${steps:+--steps "$steps"} --engine-cache "$cache" \
    --out "/tmp/first-image-$run.png" > "$out/first-image-$model-$precision-$run.log" 2>&1
  end=$(date +%s%N)
  ms=$(( (end - start) / 1000000 ))
  printf '%s %s %s: %d.%03d s to the first image (whole process)\n' "$model" "$precision" "$run" \
    $((ms / 1000)) $((ms % 1000)) | tee -a "$out/first-image.txt"
  grep -E "total|compil" "$out/first-image-$model-$precision-$run.log" | tail -3 | tee -a "$out/first-image.txt"
done
