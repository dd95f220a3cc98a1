#!/usr/bin/env bash
# Measures join and leave convergence of a running cluster, against a bare
# apiserver round trip measured in the same run:
#
#   scripts/bench-node-join.sh [RUNS] [JOINS] [JOINS_50]
#                     (default 3 runs each of 10 nodes x 10 joins and 50 nodes x JOINS_50 joins)
#
# Each run is a fresh sandbox (etcd, kube-apiserver, CRDs, trellis-operator,
# N network namespaces on an underlay bridge with one trellis-node each;
# release builds) with the default IPPool sample, every node Ready with N-1
# peers. Then, JOINS times, timed with a monotonic clock in trellis-bench-join
# from events of its watches (nothing polled):
#   baseline: one ConfigMap, create sent → seen in a watch (the bare
#             create→watch round trip, under the cluster's steady load);
#   join:     node N+1 added (netns, Node, trellis-node); from just before the
#             add: (a) its NodeNetwork with podCIDRs seen, (b) the LAST of the
#             N nodes reports it programmed (NetworkStatus peers = N, Ready) =
#             join convergence, (c) the new node Ready with N peers;
#   leave:    the node removed; until every node is back to N-1 peers.
# N = 10 and N = 50. Prints each run's report and a Markdown table for
# BENCHMARKS.md. Leaves nothing behind (each run's sandbox is stopped and its
# state dir removed; the trap ends a bench that was killed).
set -euo pipefail

runs=${1:-3}
joins=${2:-10}
joins_50=${3:-$joins}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

bash scripts/install-deps.sh >/dev/null
cargo build -q --release -p trellis-operator -p trellis-node --bins
cargo build -q --release -p trellis-e2e --bin trellis-bench-join --bin trellis-sandbox
export TRELLIS_OPERATOR="$repo/target/release/trellis-operator"
export TRELLIS_NODE="$repo/target/release/trellis-node"
bench="$repo/target/release/trellis-bench-join"
scratch=$(mktemp -d -t trellis-bench-join-XXXXXX)
cleanup() {
  # The bench stops its sandbox itself; this covers a bench that was killed.
  "$repo/target/release/trellis-sandbox" --state-dir "$scratch/sandbox" down >/dev/null 2>&1 || true
  rm -rf "$scratch"
}
trap cleanup EXIT

results=()
for nodes in 10 50; do
  j=$joins
  [[ $nodes == 50 ]] && j=$joins_50
  for run in $(seq "$runs"); do
    echo "== $nodes nodes, run $run of $runs ($j joins)"
    out=$("$bench" --nodes "$nodes" --joins "$j" --state-dir "$scratch/sandbox")
    printf '%s\n' "$out" | grep -v '^RESULT '
    results+=("$(printf '%s\n' "$out" | grep '^RESULT ')")
  done
done

# key=value out of a RESULT line
field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }

echo
echo "| nodes | run | joins | (a) NodeNetwork p50 | (b) join convergence p50 | p99 | (c) new node Ready p50 | p99 | leave convergence p50 | p99 | round trip p50 | p99 | join p50 ratio | p99 ratio | NetworkStatus updates per join+leave p50 (fewest) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
i=0
for r in "${results[@]}"; do
  i=$((i + 1))
  n=$(field "$r" nodes)
  echo "| $n | $(( (i - 1) % runs + 1 )) | $(field "$r" joins) | $(field "$r" nn_p50) ms" \
    "| $(field "$r" join_p50) ms | $(field "$r" join_p99) ms | $(field "$r" own_p50) ms | $(field "$r" own_p99) ms" \
    "| $(field "$r" leave_p50) ms | $(field "$r" leave_p99) ms | $(field "$r" rt_p50) ms | $(field "$r" rt_p99) ms" \
    "| $(field "$r" ratio_p50)x | $(field "$r" ratio_p99)x | $(field "$r" updates_cycle_p50) ($((2 * n + 2))) |"
done
