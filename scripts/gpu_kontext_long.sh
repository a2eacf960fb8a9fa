#!/usr/bin/env bash
# Train demo-kontext in one run longer than a device call (10 minutes at most): started detached in the first
# call, followed by the next calls on the same warm machine, packed into $OUT/kontext.tar by the call that sees
# it finish.
#   call 1:      bash scripts/gpu_kontext_long.sh start [`pipelines.demo train --family kontext` flags]
#   calls 2...:  bash scripts/gpu_kontext_long.sh wait
# e.g. `start --init models/demo-flux --decoder-minutes 3 --minutes 20 --batch 256 --probe-minutes 2`.
# Why one run and not gpu_kontext_train.sh call after call: each call restarted the optimizer, the learning-rate
# warmup and cosine, the compile and the held-out losses (about a minute a call). Send each next call as soon as
# the last returns: the machine stays warm only 30 s, and a released machine loses the run (2026-12-01).
# Each call follows the run for at most WAIT_SECONDS (default 560) and prints the log's new lines.
set -euo pipefail
mode=${1:?start or wait}
shift
work=/tmp/kontext-long
deadline=$((SECONDS + ${WAIT_SECONDS:-560}))
python=${PYTHON:-python3}
case "$mode" in
  start)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/diffusers*.whl .whl/importlib_metadata*.whl
    rm -rf "$work" && mkdir -p "$work/out" && : > "$work/out/train.log"
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 setsid nohup "$python" -m pipelines.demo train --family kontext \
      --out "$work/out" --workers 14 --eval-edits 0 "$@" > "$work/out/train.log" 2>&1 < /dev/null &
    echo $! > "$work/pid"
    echo "started: $*" ;;
  wait)
    [ -f "$work/pid" ] || { echo "no run on this machine (a fresh machine: the run was lost)"; exit 1; } ;;
  *) echo "usage: $0 start [train flags] | wait" >&2; exit 2 ;;
esac
shown=$(wc -l < "$work/out/train.log")
while kill -0 "$(cat "$work/pid")" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
  sleep 10
  now=$(wc -l < "$work/out/train.log")
  sed -n "$((shown + 1)),${now}p" "$work/out/train.log" | grep -v "^\[transformers\]" || true
  shown=$now
done
sed -n "$((shown + 1)),\$p" "$work/out/train.log"
cp "$work/out/train.log" "$OUT/train.log"
if kill -0 "$(cat "$work/pid")" 2>/dev/null; then
  echo "still training after this call's ${WAIT_SECONDS:-560} s: call again at once with: bash $0 wait"
else
  tar -C "$work" -cf "$OUT/kontext.tar" out
  echo "finished; packed into \$OUT/kontext.tar"
fi
