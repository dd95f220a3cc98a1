#!/usr/bin/env bash
# The policy datapath's benchmarks (docs/design/0004-policy-datapath.md), each
# measured against a baseline in the same run, so the ratios hold on any machine:
#
#   scripts/bench-policy.sh datapath [RUNS]           per-packet cost, 10 vs 65,536 entries
#   scripts/bench-policy.sh traffic [ROUNDS] [SECS] [HOOK] [rr]
#                                                     pod-to-pod TCP throughput and 1-byte
#                                                     request/response, with vs without the programs
#                                                     (HOOK: auto, trellis-node's; tcx; clsact;
#                                                     rr: request/response only, no iperf3)
#   scripts/bench-policy.sh realize [CHANGES]         NetworkPolicy change → enforced on 3 nodes
#   scripts/bench-policy.sh bundle [CHANGES] [NODES]  PolicyBundle applied → its status Realized
#                                                     on every node (default: 3 nodes)
#   scripts/bench-policy.sh [all]                     the four with their defaults, bundle
#                                                     with 3 and with 20 nodes
#
# datapath (default 9 runs): `cargo bench -p trellis-node --bench policy_datapath`. Per
#   prefix-length mask (exact ports only; every length plus any-protocol), three unpinned
#   loads of the programs in a network namespace of its own (trellis-bench-dp), each with
#   100,000 IP cache entries: (a) a table of 10 entries, (a') the same again (the control),
#   (b) 65,536 entries. BPF_PROG_TEST_RUN on a frame denied after the full lookup, an allowed
#   first packet (its connection entry removed between runs) and an established one; every
#   measurement on the three back to back, medians, ratio (b)/(a) (target <= 1.10) next to
#   the control's (a')/(a).
# traffic (default 7 rounds of 5 s): a fresh 2-node sandbox, a client pod on one node and a
#   server pod on the other, NetworkPolicies giving the server's ingress table >= 1,000
#   entries (1,000 ipBlock /32s) plus the client's ports; iperf3 (one stream, a run per state
#   and round, ABBA) and a 1-byte ping-pong on one connection kept for the whole run, in
#   100 ms slices alternating (ABBA) between the programs as trellis-node attached them and
#   the same pods with both programs detached from both host veths; medians, ratio with /
#   without, and for request/response the median of the adjacent slices' ratios with its
#   95 % confidence interval (target >= 0.95). Then 3 request/response rounds with the
#   programs on and the kernel's BPF run-time statistics enabled (only then: they add two
#   clock reads to every run): each program's own run time per packet, the four summed
#   per transaction.
#   TRELLIS_BENCH_RR_CPU=N: the ping-pong's client and echo threads on CPU N, the sandbox
#   and everything else on the other CPUs (taskset): the whole path on one CPU with nothing
#   else on it, no wake-ups across CPUs; the programs' share of the path is largest there.
# realize (default 30 changes): a fresh 3-node sandbox with a pod per node; a NetworkPolicy
#   isolating every pod is created and deleted in turn; each change is timed until every
#   node's NetworkStatus reports PolicyReady=True with the policyHash of the new set of
#   policies, against this process's own watch of the NetworkPolicy (the floor), and until a
#   probe between two pods sees the datapath change. p50 and p99.
# bundle (default 20 changes, 3 nodes): a fresh sandbox with NODES nodes and a pod per node;
#   PolicyBundle trellis-bench-bundle (Admin, the bench pods, ingress to an unused TCP port
#   denied) server-side applied: created, then edited (the port moved: a new generation),
#   then deleted (untimed), over again, each change once the cluster has been quiet for 1 s.
#   Each create and edit is timed until the bundle's status says observedGeneration = the
#   new generation, Realized=True and realizedNodes = desiredNodes = NODES, against this
#   process's own watch of the bundle (the floor) and the last node's NetworkStatus with the
#   new policyHash. p50, p99 and max.
#
# Needs root. Release builds, in $CARGO_TARGET_DIR if set. Every sandbox and namespace is
# removed at the end, also when a part fails or is interrupted (trap). Absolute numbers
# depend on the machine and what else runs on it; the script prints the load before each
# part: compare ratios, and re-run on a quiet machine for numbers to keep.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
target=${CARGO_TARGET_DIR:-$repo/target}
part=${1:-all}

[[ $(id -u) == 0 ]] || { echo "bench-policy: needs root (network namespaces, BPF)" >&2; exit 1; }
bash scripts/install-deps.sh >/dev/null

machine() {
  echo "== $1: $(nproc) CPUs, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%Y-%m-%dT%H:%MZ), $(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)"
}

datapath() {
  local runs=${1:-9}
  machine "datapath: per-packet cost, $runs runs"
  cargo bench -q -p trellis-node --bench policy_datapath -- --runs "$runs"
}

scratch=""
build_sandbox() {
  # The sandbox's programs are built in one invocation (see tests/e2e/src/binaries.rs).
  cargo build -q --release -p trellis-operator -p trellis-node -p trellis-cni --bins
  cargo build -q --release -p trellis-e2e --bin trellis-bench-policy --bin trellis-sandbox
  export TRELLIS_OPERATOR="$target/release/trellis-operator"
  export TRELLIS_NODE="$target/release/trellis-node"
  export TRELLIS_CNI="$target/release/trellis"
  scratch=$(mktemp -d -t trellis-bench-policy-XXXXXX)
}
cleanup() {
  if [[ -n $scratch ]]; then
    # The bench stops its sandbox itself; this covers one that was killed (it deletes the
    # recorded namespaces: the nodes' and the pods').
    "$target/release/trellis-sandbox" --state-dir "$scratch/sandbox" down >/dev/null 2>&1 || true
    rm -rf "$scratch"
  fi
}
trap cleanup EXIT

traffic() {
  local rounds=${1:-7} seconds=${2:-5} hook=${3:-auto} only=${4:-}
  local extra=()
  case $only in
    "") ;;
    rr) extra=(--rr-only) ;;
    *) echo "traffic: the fourth argument is 'rr' (request/response only) or nothing, not '$only'" >&2; return 2 ;;
  esac
  [[ -n $scratch ]] || build_sandbox
  local pin=()
  if [[ -n ${TRELLIS_BENCH_RR_CPU:-} ]]; then
    local cpu=$TRELLIS_BENCH_RR_CPU others
    others=$(seq 0 $(($(nproc) - 1)) | grep -vx -- "$cpu" | paste -sd, || true)
    if [[ ! $cpu =~ ^[0-9]+$ ]] || ((cpu >= $(nproc))) || [[ -z $others ]]; then
      echo "traffic: TRELLIS_BENCH_RR_CPU=$cpu is not one of CPUs 0..$(($(nproc) - 1)) with another left for the rest" >&2
      return 2
    fi
    pin=(taskset -c "$others")
    extra+=(--rr-cpus "$cpu")
  fi
  machine "traffic: $rounds rounds of $seconds s, hook $hook${only:+, $only only}${TRELLIS_BENCH_RR_CPU:+, request/response on CPU $TRELLIS_BENCH_RR_CPU alone}"
  "${pin[@]}" "$target/release/trellis-bench-policy" traffic --rounds "$rounds" --seconds "$seconds" \
    --hook "$hook" "${extra[@]}" --state-dir "$scratch/sandbox"
}

realize() {
  local changes=${1:-30}
  [[ -n $scratch ]] || build_sandbox
  machine "realize: $changes changes on 3 nodes"
  "$target/release/trellis-bench-policy" realize --changes "$changes" --nodes 3 \
    --state-dir "$scratch/sandbox"
}

bundle() {
  local changes=${1:-20} nodes=${2:-3}
  [[ -n $scratch ]] || build_sandbox
  machine "bundle: $changes changes on $nodes nodes"
  "$target/release/trellis-bench-policy" bundle --changes "$changes" --nodes "$nodes" \
    --state-dir "$scratch/sandbox"
}

case $part in
  datapath) datapath "${@:2}" ;;
  traffic) traffic "${@:2}" ;;
  realize) realize "${@:2}" ;;
  bundle) bundle "${@:2}" ;;
  all)
    datapath
    traffic
    realize
    bundle 20 3
    bundle 20 20
    ;;
  *)
    echo "usage: scripts/bench-policy.sh [datapath [RUNS] | traffic [ROUNDS] [SECS] | realize [CHANGES] | bundle [CHANGES] [NODES] | all]" >&2
    exit 2
    ;;
esac
