#!/usr/bin/env bash
# Compare demo-kontext training recipes at equal training time on the lent GPU, in one device call:
#   bash scripts/gpu_kontext_sweep.sh MINUTES BATCH:LR[:graphs] [BATCH:LR[:graphs] ...]
# Each recipe trains the transformer and text encoders from models/demo-flux for MINUTES (no decoder phase: the
# decoder changes no latent, so not this loss) and logs the held-out loss of 1024 edits before and after
# (`kontext_train.held_out_loss`: fixed noise and timesteps, so recipes compare). $OUT/sweep.md gets a row per
# recipe as it finishes, so a call that runs out of time still brings back the rows it finished.
# A recipe ending in :graphs trains with --cuda-graphs (e.g. `1.5 256:8e-4 256:8e-4:graphs` measures that lever:
# steps in equal minutes). Budget per recipe: MINUTES plus about a minute (loading, compiling, the two losses).
set -euo pipefail
minutes=${1:?training minutes per recipe}
shift
[ $# -gt 0 ] || { echo "give at least one BATCH:LR recipe, e.g. 1024:8e-4 256:8e-4" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/diffusers*.whl .whl/importlib_metadata*.whl
export PYTHONPATH=/tmp/site
printf '| batch | lr | CUDA graphs | steps | held-out loss before -> after |\n| ---: | ---: | --- | ---: | --- |\n' \
  > "$OUT/sweep.md"
for recipe in "$@"; do
  IFS=: read -r batch lr graphs <<< "$recipe"
  flags=() && [ "$graphs" = graphs ] && flags=(--cuda-graphs)
  name=$batch-$lr${graphs:+-$graphs}
  out=/tmp/kontext-sweep/$name
  rm -rf "$out" && mkdir -p "$out"
  python3 -m pipelines.demo train --family kontext --init models/demo-flux --out "$out" --minutes "$minutes" \
    --batch "$batch" --lr "$lr" --workers 14 --eval-edits 0 --loss-edits 1024 "${flags[@]}" > "$OUT/sweep-$name.log" 2>&1 ||
    { printf '| %s | %s | %s | failed: sweep-%s.log | |\n' "$batch" "$lr" "${graphs:+on}" "$name" | tee -a "$OUT/sweep.md"
      continue; }
  steps=$(grep -o "kontext: [0-9]* steps" "$OUT/sweep-$name.log" | grep -o "[0-9]*")
  loss=$(grep "held-out loss" "$OUT/sweep-$name.log" | sed 's/.*edits: //')
  printf '| %s | %s | %s | %s | %s |\n' "$batch" "$lr" "${graphs:+on}" "$steps" "$loss" | tee -a "$OUT/sweep.md"
done
