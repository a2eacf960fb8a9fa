#!/usr/bin/env bash
# Train demo-kontext on the lent GPU within one device call (a call may run 10 minutes at most):
#   bash scripts/gpu_kontext_train.sh MINUTES [EVAL_EDITS] [DECODER_MINUTES]
# trains from models/demo-kontext (its VAE decoder first for DECODER_MINUTES, default 0; then the transformer
# and text encoders for MINUTES, which may be 0), packs the model and log into $OUT/kontext.tar at once, then
# scores EVAL_EDITS held-out edits (default 60) on the GPU with what time the call has left.
# One call, not a detached job across two: the machine is released 30 s after a call, and a run left
# training between calls was lost that way (2026-12-01). The model is packed before the evaluation so a
# call that runs out of time still brings it back; one tar because $OUT brings back a limited number of files.
set -euo pipefail
minutes=${1:?training minutes}
eval_edits=${2:-60}
decoder_minutes=${3:-0}
work=/tmp/kontext-train
started=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/diffusers*.whl .whl/importlib_metadata*.whl
export PYTHONPATH=/tmp/site
rm -rf "$work" && mkdir -p "$work"
python3 -m pipelines.demo train --family kontext --init models/demo-kontext --out "$work/out" --minutes "$minutes" \
  --decoder-minutes "$decoder_minutes" --batch 1024 --workers 14 --eval-edits 0 2>&1 | tee "$work/train.log"
tar -C "$work" -cf "$OUT/kontext.tar" out train.log
echo "packed after $((SECONDS - started)) s"
left=$((585 - SECONDS + started))
timeout "$left" python3 -m pipelines.demo evaluate-edits --model "$work/out/demo-kontext" --n "$eval_edits" \
  --precision bf16 --device cuda --markdown "$OUT/eval.md" 2>&1 | tail -20 || echo "evaluation stopped after ${left} s"
