#!/usr/bin/env bash
# Instructions per request of each handler of `inprocess.py --observability`, counted by
# valgrind (callgrind): unlike CPU time, the count does not move with the machine's load.
#
#   bench/instructions.sh [SAMPLES]      # default 4; about 5 minutes on 2 cores
#
# Each handler runs in a process of its own after the same warm-up of all of them; a run
# with no samples is subtracted, and the rest divided by the requests sampled. The
# exporter's thread is counted too (its queue is flushed at the end of each sample).
set -euo pipefail
cd "$(dirname "$0")/.."
samples=${1:-4}
args=(--observability --connections 50 --batches 20)
count() {
  valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/inprocess.py \
    "${args[@]}" "$@" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
base=$(count --samples 0 --only pipeline)
requests=$((samples * 20 * 50))
echo "| handler | instructions / request |"
echo "|---|--:|"
for h in pipeline no-tracing trace-0 trace-1 trace-1-export no-window-stats floor; do
  n=$(count --samples "$samples" --only "$h")
  echo "| $h | $(( (n - base) / requests )) |"
done
