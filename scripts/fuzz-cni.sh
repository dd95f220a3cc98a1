#!/usr/bin/env bash
# Fuzzes the CNI plugin's parsing entry point (trellis_cni::parse: CNI_*
# environment + stdin -> invocation or spec error) with libFuzzer:
#
#   scripts/fuzz-cni.sh [SECONDS]     # default 60
#
# The target is cni/fuzz (a crate outside the workspace, its own target dir
# cni/fuzz/target). It is built with stable rustc: the coverage
# instrumentation libFuzzer needs comes from plain -C flags (sancov-module and
# LLVM's sanitizer-coverage options), no nightly -Z flag and no sanitizer.
# Rust's own checks (bounds, overflow with -Coverflow-checks, debug
# assertions) plus the invariants asserted in the target are what it finds.
# libfuzzer-sys compiles libFuzzer's C++ sources, so a C++ compiler (g++ from
# Debian's g++ package, or clang++) must be installed.
#
# Hand-written seeds are in cni/fuzz/seeds/parse; inputs libFuzzer finds
# interesting go to cni/fuzz/corpus/parse and crashes to
# cni/fuzz/artifacts/parse (both gitignored). Exits non-zero on any crash and
# prints the number of executions.
set -euo pipefail

seconds=${1:-60}
[[ $seconds =~ ^[0-9]+$ ]] && ((seconds > 0)) || { echo "usage: $0 [SECONDS]" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fuzz="$repo/cni/fuzz"
say() { echo "fuzz-cni: $*" >&2; }

command -v c++ >/dev/null || command -v clang++ >/dev/null \
  || { say "no C++ compiler to build libFuzzer: apt-get install g++"; exit 1; }

host=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps these flags off build scripts and proc macros (serde,
# thiserror), which must not be instrumented.
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR="$fuzz/target"

say "building the parse target ($host)"
cargo build --manifest-path "$fuzz/Cargo.toml" --locked --release --target "$host" --bin parse
bin="$CARGO_TARGET_DIR/$host/release/parse"

corpus="$fuzz/corpus/parse"
artifacts="$fuzz/artifacts/parse"
mkdir -p "$corpus" "$artifacts"
log=$(mktemp -t fuzz-cni-XXXXXX.log)
trap 'rm -f "$log"' EXIT

say "running for ${seconds}s"
set +e
# The first corpus directory receives new inputs; the seeds are read only.
"$bin" -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -max_len=8192 \
  -dict="$fuzz/cni.dict" -artifact_prefix="$artifacts/" \
  "$corpus" "$fuzz/seeds/parse" >"$log" 2>&1
status=$?
set -e

execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
units=$(find "$corpus" -type f | wc -l)
if ((status != 0)) || grep -q "^==[0-9]*== ERROR: libFuzzer" "$log"; then
  tail -60 "$log" >&2
  say "CRASH (libFuzzer exit $status) after ${execs:-?} executions; inputs in $artifacts"
  exit 1
fi
say "no crash: ${execs:-?} executions in ${seconds}s, corpus $units inputs"
echo "executions: ${execs:-0}"
