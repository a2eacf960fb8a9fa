#!/usr/bin/env bash
# Compare demo-kontext training recipes at equal training time on the lent GPU, in one device call:
#   bash scripts/gpu_kontext_sweep.sh MINUTES BATCH:LR [BATCH:LR ...]
# Each recipe trains the transformer and text encoders from models/demo-flux for MINUTES (no decoder phase: the
# decoder changes no latent, so not this loss) and logs the held-out loss of 1024 edits before and after
# (`kontext_train.held_out_loss`: fixed noise and timesteps, so recipes compare). $OUT/sweep.md gets a row per
# recipe as it finishes, so a call that runs out of time still brings back the rows it finished.
# Budget per recipe: MINUTES plus about a minute (loading, compiling for a new batch size, the two losses).
set -euo pipefail
minutes=${1:?training minutes per recipe}
shift
[ $# -gt 0 ] || { echo "give at least one BATCH:LR recipe, e.g. 1024:8e-4 256:8e-4" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/diffusers*.whl .whl/importlib_metadata*.whl
export PYTHONPATH=/tmp/site
printf '| batch | lr | steps | held-out loss before -> after |\n| ---: | ---: | ---: | --- |\n' > "$OUT/sweep.md"
for recipe in "$@"; do
  batch=${recipe%%:*} lr=${recipe##*:}
  out=/tmp/kontext-sweep/$batch-$lr
  rm -rf "$out" && mkdir -p "$out"
  python3 -m pipelines.demo train --family kontext --init models/demo-flux --out "$out" --minutes "$minutes" \
    --batch "$batch" --lr "$lr" --workers 14 --eval-edits 0 --loss-edits 1024 > "$OUT/sweep-$batch-$lr.log" 2>&1
  steps=$(grep -o "kontext: [0-9]* steps" "$OUT/sweep-$batch-$lr.log" | grep -o "[0-9]*")
  loss=$(grep "held-out loss" "$OUT/sweep-$batch-$lr.log" | sed 's/.*edits: //')
  printf '| %s | %s | %s | %s |\n' "$batch" "$lr" "$steps" "$loss" | tee -a "$OUT/sweep.md"
done
