#!/usr/bin/env bash
# Train demo-kontext on the lent GPU within one device call (a call may run 10 minutes at most):
#   bash scripts/gpu_kontext_train.sh MINUTES [EVAL_EDITS] [DECODER_MINUTES] [more `pipelines.demo train` flags]
# trains on from demo-kontext (its VAE decoder first for DECODER_MINUTES, default 0; then the transformer and
# text encoders for MINUTES, which may be 0), packs the model and log into $OUT/kontext.tar at once, then scores
# EVAL_EDITS held-out edits (default 60; 0: none) on the GPU with what time the call has left.
# It starts from the model the last call left on this machine when there is one (the machine stays warm for
# 30 s after a call, so a next call sent at once continues without carrying the model back), else from
# models/demo-kontext. Flags after the third argument reach `pipelines.demo train` after the script's own, so
# `--init models/demo-flux` starts a new editor and `--no-compile` trains the transformer uncompiled.
# One call, not a detached job across two: a run left training between calls was lost when the machine was
# released (2026-12-01). The model is packed before the evaluation so a call that runs out of time still brings
# it back; one tar because $OUT brings back a limited number of files.
set -euo pipefail
minutes=${1:?training minutes}
eval_edits=${2:-60}
decoder_minutes=${3:-0}
shift $(( $# < 3 ? $# : 3 ))
work=/tmp/kontext-train
started=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/diffusers*.whl .whl/importlib_metadata*.whl
export PYTHONPATH=/tmp/site
init=models/demo-kontext
if [ -d "$work/out/demo-kontext" ]; then
  rm -rf "$work/init" && mv "$work/out/demo-kontext" "$work/init" && init=$work/init
fi
rm -rf "$work/out" && mkdir -p "$work/out"
echo "training on from $init (a --init among the flags below overrides it): $*"
python3 -m pipelines.demo train --family kontext --init "$init" --out "$work/out" --minutes "$minutes" \
  --decoder-minutes "$decoder_minutes" --batch 1024 --workers 14 --eval-edits 0 "$@" 2>&1 | tee "$work/out/train.log"
tar -C "$work" -cf "$OUT/kontext.tar" out
echo "packed after $((SECONDS - started)) s"
[ "$eval_edits" -gt 0 ] || exit 0
left=$((585 - SECONDS + started))
timeout "$left" python3 -m pipelines.demo evaluate-edits --model "$work/out/demo-kontext" --n "$eval_edits" \
  --precision bf16 --device cuda --markdown "$OUT/eval.md" 2>&1 | tail -20 || echo "evaluation stopped after ${left} s"
