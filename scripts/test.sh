#!/usr/bin/env bash
# Runs every check and test Trellis has, the way CI does:
#
#   scripts/test.sh
#
# formatting, clippy (warnings are errors), the CRD staleness test, unit
# tests, and the end-to-end tests against a real kube-apiserver and etcd
# started on loopback, then a bounded libFuzzer run over the CNI plugin's
# parsing (scripts/fuzz-cni.sh). Installs what it needs first
# (scripts/install-deps.sh).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

bash scripts/install-deps.sh

# The build and the sandboxes need disk; a full disk shows up as an obscure linker
# or etcd error, so say how much there is up front.
avail_kib=$(df --output=avail -k . | tail -1)
echo "== disk: $((avail_kib / 1024 / 1024)) GiB free in $repo"
if ((avail_kib < 8 * 1024 * 1024)); then
  echo "warning: under 8 GiB free; the build (~5 GiB) and the e2e sandboxes may run out" >&2
fi

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test (unit, CRD staleness, e2e against the sandbox control plane)"
log=$(mktemp -t trellis-test-XXXXXX.log)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# cargo prints one "test result:" line per test binary, the last usually a
# doc-test run with nothing in it; close with the totals instead.
sum() { grep "^test result:" "$log" | grep -Eo "[0-9]+ $1" | awk '{n += $1} END {print n + 0}'; }
echo
echo "tests: $(sum passed) passed, $(sum failed) failed"
if ((status == 0)); then
  echo
  echo "== fuzzing the CNI plugin's configuration and environment parsing (60 s)"
  bash scripts/fuzz-cni.sh 60 || status=$?
fi
exit "$status"
