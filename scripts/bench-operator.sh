#!/usr/bin/env bash
# Measures how long trellis-operator takes to give new nodes their address
# blocks, against a bare apiserver round trip measured in the same run:
#
#   scripts/bench-operator.sh [RUNS] [COUNT]     (default 3 runs of 100 nodes)
#
# Each run is a fresh sandbox (etcd, kube-apiserver, CRDs, trellis-operator,
# release builds) with the default IPPool sample (10.244.0.0/16 in /24s: 256
# blocks), then, timed with a monotonic clock in trellis-bench-nodes:
#   unloaded: 20 ConfigMaps created one at a time, create sent → seen in a watch;
#   baseline: COUNT ConfigMaps created at once; per object, create sent → seen
#             in a watch (the bare create→watch round trip);
#   nodes:    COUNT Nodes (with InternalIPs) registered at once; per node,
#             create returned → its NodeNetwork with podCIDRs seen in a watch;
#             and first create sent → all COUNT NodeNetworks written.
# Prints each run's report and a Markdown table for BENCHMARKS.md. Leaves
# nothing behind (each run's sandbox is stopped and its state dir removed).
set -euo pipefail

runs=${1:-3}
count=${2:-100}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

bash scripts/install-deps.sh >/dev/null
cargo build -q --release -p trellis-e2e --bin trellis-bench-nodes --bin trellis-sandbox
cargo build -q --release -p trellis-operator --bin trellis-operator
export TRELLIS_OPERATOR="$repo/target/release/trellis-operator"
bench="$repo/target/release/trellis-bench-nodes"
scratch=$(mktemp -d -t trellis-bench-operator-XXXXXX)
cleanup() {
  # The bench stops its sandbox itself; this covers a bench that was killed.
  "$repo/target/release/trellis-sandbox" --state-dir "$scratch/sandbox" down >/dev/null 2>&1 || true
  rm -rf "$scratch"
}
trap cleanup EXIT

results=()
for run in $(seq "$runs"); do
  echo "== run $run of $runs ($count nodes)"
  out=$("$bench" --count "$count" --state-dir "$scratch/sandbox")
  printf '%s\n' "$out" | grep -v '^RESULT '
  results+=("$(printf '%s\n' "$out" | grep '^RESULT ')")
done

# key=value out of a RESULT line
field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }

echo
echo "| run | NodeNetwork p50 | p99 | max | all $count written | round trip p50 | p99 | all $count ConfigMaps | p50 ratio | p99 ratio | total ratio | unloaded round trip p50 | passes |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
i=0
for r in "${results[@]}"; do
  i=$((i + 1))
  echo "| $i | $(field "$r" nn_p50) ms | $(field "$r" nn_p99) ms | $(field "$r" nn_max) ms | $(field "$r" nn_total) ms" \
    "| $(field "$r" rt_p50) ms | $(field "$r" rt_p99) ms | $(field "$r" cm_total) ms | $(field "$r" ratio_p50)x" \
    "| $(field "$r" ratio_p99)x | $(field "$r" ratio_total)x | $(field "$r" lone_p50) ms | $(field "$r" passes) |"
done
