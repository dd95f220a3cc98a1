#!/usr/bin/env bash
# Measures CNI ADD + DEL latency per pod for Trellis against the reference
# bridge + host-local plugins, on the same sandbox node in the same run:
#
#   scripts/bench-cni.sh [PODS] [RUNS] [REMOTE]   (default 200 pods per network, 3 runs,
#                                                  0 pods on other nodes)
#
# REMOTE publishes that many pods of other nodes (NodeEndpoints shards of 110)
# before anything is timed: the node's policy then carries a cluster of that
# size (its IP cache holds every one of them).
#
# Each run is a fresh sandbox (etcd, kube-apiserver, CRDs, trellis-operator,
# one node: its network namespace and trellis-node; release builds) with the
# default IPPool sample. Once the node's network is ready, trellis-bench-cni
# runs two networks with the node's cni_runtime::Runtime, inside the node's
# namespace, as a container runtime runs them:
#   trellis    the node's installed 10-trellis.conflist (trellis, then portmap);
#   reference  bridge "trellis-bench0" (isGateway, ipMasq false) + host-local
#              10.98.0.0/22, then the same portmap.
# Each run measures twice, each time in a fresh sandbox: the plugins under test
# alone (trellis against bridge + host-local, no portmap in either), then the
# chains as installed. After each Trellis DEL the bench waits (untimed) until
# trellis-node has finished it: DEL answers before the pod's veth is gone, and
# the rest must not overlap the reference's next command.
# The pods' network namespaces are made before anything is timed. After 5
# warm-up pods each, PODS pods per network are ADDed (the two networks taking
# turns, pod by pod), then DELeted the same way; each pod's time is its ADD +
# its DEL. A profile follows (each plugin timed on its own, plugin start-up,
# trellis-node's own time from its /metrics). Prints each run's report and a
# Markdown table per mode for BENCHMARKS.md. Leaves nothing behind (each run's sandbox
# is stopped, its namespaces and state dir removed; the trap ends a bench that
# was killed).
set -euo pipefail

pods=${1:-200}
runs=${2:-3}
remote=${3:-0}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

bash scripts/install-deps.sh >/dev/null
# The sandbox's programs are built in one invocation (see tests/e2e/src/binaries.rs).
cargo build -q --release -p trellis-operator -p trellis-node -p trellis-cni --bins
cargo build -q --release -p trellis-e2e --bin trellis-bench-cni --bin trellis-sandbox
export TRELLIS_OPERATOR="$repo/target/release/trellis-operator"
export TRELLIS_NODE="$repo/target/release/trellis-node"
export TRELLIS_CNI="$repo/target/release/trellis"
bench="$repo/target/release/trellis-bench-cni"
scratch=$(mktemp -d -t trellis-bench-cni-XXXXXX)
cleanup() {
  # The bench stops its sandbox itself; this covers a bench that was killed (it
  # deletes the recorded namespaces: the node's and the pods').
  "$repo/target/release/trellis-sandbox" --state-dir "$scratch/sandbox" down >/dev/null 2>&1 || true
  rm -rf "$scratch"
}
trap cleanup EXIT

results=()
for run in $(seq "$runs"); do
  # The plugins under test alone (the issue's comparison: trellis against bridge +
  # host-local), then the chains as installed (portmap after both).
  for mode in --without-portmap ""; do
    echo "== run $run of $runs ($pods pods per network, $remote on other nodes${mode:+, without portmap})"
    out=$("$bench" --pods "$pods" --remote-pods "$remote" --state-dir "$scratch/sandbox" $mode)
    printf '%s\n' "$out" | grep -v '^RESULT '
    results+=("$(printf '%s\n' "$out" | grep '^RESULT ')")
  done
done

# key=value out of a RESULT line
field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }

for chain in plugins installed; do
  echo
  case $chain in
    plugins) echo "trellis against bridge + host-local (no portmap in either):" ;;
    installed) echo "the installed chains (portmap after both):" ;;
  esac
  echo "| run | pods | remote pods | Trellis ADD+DEL p50 | p99 | mean | reference ADD+DEL p50 | p99 | mean | ratio p50 | ratio p99 | ratio mean | ADD ratio p50 | DEL ratio p50 | node policy_sync |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  i=0
  for r in "${results[@]}"; do
    [[ $(field "$r" chain) == "$chain" ]] || continue
    i=$((i + 1))
    add_ratio=$(awk -v t="$(field "$r" t_add_p50)" -v b="$(field "$r" r_add_p50)" 'BEGIN { printf "%.2f", t / b }')
    del_ratio=$(awk -v t="$(field "$r" t_del_p50)" -v b="$(field "$r" r_del_p50)" 'BEGIN { printf "%.2f", t / b }')
    echo "| $i | $(field "$r" pods) | $(field "$r" remote_pods) | $(field "$r" t_p50) ms | $(field "$r" t_p99) ms | $(field "$r" t_mean) ms" \
      "| $(field "$r" r_p50) ms | $(field "$r" r_p99) ms | $(field "$r" r_mean) ms" \
      "| $(field "$r" ratio_p50)x | $(field "$r" ratio_p99)x | $(field "$r" ratio_mean)x | ${add_ratio}x | ${del_ratio}x | $(field "$r" policy_sync) ms |"
  done
done
