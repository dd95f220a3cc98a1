#!/usr/bin/env bash
# Installs what building, running and testing Trellis needs, idempotently:
# nothing is downloaded when everything is already there.
#
#   scripts/install-deps.sh
#
# - Rust (stable >= 1.95, with rustfmt and clippy) and Go (>= 1.24) must be on
#   the machine: they are the toolchains, not project dependencies.
# - Debian packages the build, the sandbox and the tests use (among them
#   clang and libbpf-dev for the eBPF policy programs) are installed with
#   apt-get when missing.
# - kube-apiserver, kubectl, etcd, cnitool and the reference CNI plugins are
#   built from the pinned Go tools modules in tests/e2e/tools/ into a cache
#   outside the repository.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { echo "install-deps: $*" >&2; }
die() { say "$*"; exit 1; }

# Toolchains.
command -v cargo >/dev/null || die "cargo not found: install Rust stable >= 1.95 with rustup"
rustc_minor=$(rustc --version | awk '{print $2}' | cut -d. -f2)
(( rustc_minor >= 95 )) || die "rustc $(rustc --version) is too old: need >= 1.95"
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    say "adding rust component $component"
    rustup component add "$component"
  fi
done
command -v go >/dev/null || die "go not found: install Go >= 1.24 (needed to build kube-apiserver and etcd)"
go_minor=$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
(( go_minor >= 24 )) || die "$(go env GOVERSION) is too old: need Go >= 1.24 (tool directives)"

# Debian packages: installed only when a command is missing.
declare -A need=(
  [ip]=iproute2        # network namespaces for sandbox nodes and pods
  [ping]=iputils-ping  # traffic checks between sandbox pods
  [jq]=jq              # JSON in scripts
  [curl]=curl
  [update-ca-certificates]=ca-certificates
  [g++]=g++            # builds libFuzzer for scripts/fuzz-cni.sh
  [nsenter]=util-linux # runs CNI plugins with a sandbox node's namespace as host
  [iptables]=iptables  # the reference portmap plugin chained after ours
  [nft]=nftables       # portmap's nftables backend
  [openssl]=openssl    # the demo's HTTPS server between pods
  [clang]=clang        # node-reconciler/build.rs compiles the eBPF policy programs
  [tc]=iproute2        # the BPF tests check clsact filters
  [iperf3]=iperf3      # scripts/bench-policy.sh: pod-to-pod TCP throughput
)
# ... and when a file is missing.
declare -A need_files=(
  [/usr/include/bpf/bpf_helpers.h]=libbpf-dev  # libbpf's headers for the eBPF programs
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null || missing+=("${need[$cmd]}")
done
for file in "${!need_files[@]}"; do
  [[ -e $file ]] || missing+=("${need_files[$file]}")
done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  # Several entries can name one package.
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Control-plane binaries, and the reference cnitool and CNI plugins (portmap,
# bridge, host-local, loopback) the tests use as a second client and a
# baseline (cached; seconds when already built).
for tool in etcd kube-apiserver kubectl cnitool cni-plugins; do
  bash "$repo/tests/e2e/tools/build.sh" "$tool" >/dev/null
done
say "ok"
