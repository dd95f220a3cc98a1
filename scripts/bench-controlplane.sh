#!/usr/bin/env bash
# Measures the sandbox control plane's start-up, cold and warm, in one run:
#
#   scripts/bench-controlplane.sh [RUNS]        (default 5 warm runs)
#
# cold: what a fresh machine pays once: empty Go module and build caches and
#       an empty Trellis tool cache, so etcd, kube-apiserver and kubectl are
#       downloaded through the Go module proxy and compiled; then the first
#       `trellis-sandbox up` with those binaries.
# warm: `trellis-sandbox up` with cached binaries (etcd ready, apiserver
#       /readyz ok, CRDs Established), RUNS times; median reported.
# Both run `up --no-datapath`: this measures the control plane, not the node
# namespaces and agents.
# Prints a Markdown table row set for BENCHMARKS.md. Leaves nothing behind.
set -euo pipefail

runs=${1:-5}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cargo build -q --release -p trellis-e2e --bin trellis-sandbox
sandbox="$repo/target/release/trellis-sandbox"

scratch=$(mktemp -d -t trellis-bench-XXXXXX)
cleanup() {
  "$sandbox" --state-dir "$scratch/state" down >/dev/null 2>&1 || true
  chmod -R u+w "$scratch" 2>/dev/null || true   # the Go module cache is read-only
  rm -rf "$scratch"
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", b - a}'; }

# Cold: every cache empty.
export GOMODCACHE="$scratch/gomodcache" GOCACHE="$scratch/gocache"
t0=$(now)
for tool in etcd kube-apiserver kubectl; do
  TRELLIS_CACHE_DIR="$scratch/tools" bash tests/e2e/tools/build.sh "$tool" >/dev/null
done
t1=$(now)
cold_build=$(secs "$t0" "$t1")
t0=$(now)
TRELLIS_CACHE_DIR="$scratch/tools" "$sandbox" --state-dir "$scratch/state" up --no-datapath >/dev/null
t1=$(now)
cold_up=$(secs "$t0" "$t1")
"$sandbox" --state-dir "$scratch/state" down >/dev/null
unset GOMODCACHE GOCACHE

# Warm: the cached binaries from the cold build.
warm=()
for _ in $(seq "$runs"); do
  t0=$(now)
  TRELLIS_CACHE_DIR="$scratch/tools" "$sandbox" --state-dir "$scratch/state" up --no-datapath >/dev/null
  t1=$(now)
  warm+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')")
  "$sandbox" --state-dir "$scratch/state" down >/dev/null
done
median=$(printf '%s\n' "${warm[@]}" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
cold_total=$(awk -v a="$cold_build" -v b="$cold_up" 'BEGIN {printf "%.1f", a + b}')
ratio=$(awk -v c="$cold_total" -v w="$median" 'BEGIN {printf "%.0f", c / w}')

echo "| cold: build etcd + kube-apiserver + kubectl from empty caches | ${cold_build} s |"
echo "| cold: first \`up\` with the new binaries | ${cold_up} s |"
echo "| warm: \`up\` with cached binaries, median of $runs (${warm[*]}) | ${median} s |"
echo "| ratio cold total / warm | ${ratio}x |"
