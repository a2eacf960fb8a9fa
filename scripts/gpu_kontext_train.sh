#!/usr/bin/env bash
# Train demo-kontext on the lent GPU across two calls on a warm machine (one call may run 10 minutes at most).
#   call 1: bash scripts/gpu_kontext_train.sh start MINUTES   (starts training detached, watches it ~9 minutes)
#   call 2: bash scripts/gpu_kontext_train.sh finish          (waits for it, packs the model and log into one tar)
# Results come back as one tar: $OUT brings back a limited number of files, and a trained model was lost that way.
set -euo pipefail
work=/tmp/kontext-train
case "$1" in
  start)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/diffusers*.whl .whl/importlib_metadata*.whl
    mkdir -p "$work"
    cp -r . "$work/src"
    (cd "$work/src" && PYTHONPATH=/tmp/site nohup python3 -m pipelines.demo train --family kontext \
      --init models/demo-kontext --out "$work/out" --minutes "$2" --batch 1024 --workers 14 --eval-edits 60 \
      > "$work/train.log" 2>&1; echo "exit $?" >> "$work/train.log") &
    for _ in $(seq 54); do sleep 10; done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > "$OUT/gpu.csv" || true
    cp "$work/train.log" "$OUT/train-part1.log" ;;
  finish)
    until grep -q "^exit " "$work/train.log"; do sleep 5; done
    tar -C "$work" -cf "$OUT/kontext.tar" out train.log ;;
esac
