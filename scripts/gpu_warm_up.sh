#!/usr/bin/env bash
# Issue 17, the app's side of "first image after a restart": seconds from starting the app with --warm-up to its
# "Warm-up: ... is loaded and ready" line, with an empty engine cache (cold) and then the same cache again (warm),
# each a whole new process as a restarted app. The first image a user asks for after that line skips loading
# and compiling. Usage: bash scripts/gpu_warm_up.sh OUT_DIR MODEL [app flags...]
#   bash scripts/gpu_warm_up.sh $OUT flux.1-dev --random-weights          # on the lent GPU
#   bash scripts/gpu_warm_up.sh /tmp/w demo-flux --device cpu               # smoke run
set -euo pipefail
out=${1:?output folder}; model=${2:?model}; shift 2
cache=$(mktemp -d /tmp/prism-warm-up-XXXX)  # an empty engine cache: the first start compiles from scratch
mkdir -p "$out"
port=${PORT:-7871}
for run in cold warm; do
  log="$out/warm-up-$model-$run.log"
  start=$(date +%s%N)
  ${PYTHON:-python3} app.py --port "$port" --warm-up "$model" --engine-cache "$cache" "$@" > "$log" 2>&1 &
  app=$!
  while kill -0 "$app" 2>/dev/null && ! grep -q "^Warm-up" "$log"; do sleep 0.2; done
  end=$(date +%s%N)
  kill -INT "$app" 2>/dev/null || true
  wait "$app" 2>/dev/null || true
  ms=$(( (end - start) / 1000000 ))
  printf '%s %s: %d.%03d s from start to "%s"\n' "$model" "$run" $((ms / 1000)) $((ms % 1000)) \
    "$(grep -m1 "^Warm-up" "$log" || echo "no warm-up line: see $log")" | tee -a "$out/warm-up.txt"
done
