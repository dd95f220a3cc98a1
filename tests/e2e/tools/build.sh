#!/usr/bin/env bash
# Builds one pinned control-plane tool from its Go tools module and prints the
# path of the binary on stdout. Binaries are cached outside the repository,
# keyed by tool, version and a hash of the module's go.mod + go.sum and the
# build flags, so a second run (and every run while the pins are unchanged)
# costs nothing.
#
#   tests/e2e/tools/build.sh kube-apiserver|kubectl|etcd
#
# Cache root: $TRELLIS_CACHE_DIR, else $XDG_CACHE_HOME/trellis, else ~/.cache/trellis.
set -euo pipefail

tool=${1:?usage: build.sh kube-apiserver|kubectl|etcd}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

case "$tool" in
  kube-apiserver|kubectl)
    mod="$here/kubernetes"
    pkg=k8s.io/kubernetes/cmd/$tool
    version=$(awk '$1=="k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' "$mod/go.mod")
    minor=$(echo "$version" | cut -d. -f2)
    ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
    ;;
  etcd)
    mod="$here/etcd"
    pkg=go.etcd.io/etcd/server/v3
    version=$(awk '$1=="go.etcd.io/etcd/server/v3" && $2 ~ /^v/ {print $2; exit}' "$mod/go.mod")
    ldflags="-s -w"
    ;;
  *) echo "build.sh: unknown tool '$tool'" >&2; exit 2 ;;
esac
[[ -f "$mod/go.mod" ]] || { echo "build.sh: no tools module at $mod" >&2; exit 2; }
[[ -n "$version" ]] || { echo "build.sh: cannot read the pinned version of $tool from $mod/go.mod" >&2; exit 2; }

key=$( (cat "$mod/go.mod" "$mod/go.sum"; echo "$pkg $ldflags") | sha256sum | cut -c1-12)
cache=${TRELLIS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/trellis}
dir="$cache/tools/$tool-$version-$key"
bin="$dir/$tool"

if [[ ! -x "$bin" ]]; then
  mkdir -p "$dir"
  command -v go >/dev/null || { echo "build.sh: Go is not installed (need Go >= 1.24 for tools modules)" >&2; exit 3; }
  echo "build.sh: building $tool $version (cold build, minutes) into $dir" >&2
  start=$(date +%s)
  # go.sum is committed and complete, so the checksum database is never asked.
  (cd "$mod" && GOWORK=off GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0 \
     go build -trimpath -tags selinux,notest -ldflags "$ldflags" -o "$bin.tmp.$$" "$pkg")
  mv -f "$bin.tmp.$$" "$bin"   # atomic: a crashed build never leaves a half binary at $bin
  echo "build.sh: built $tool in $(( $(date +%s) - start ))s" >&2
fi
echo "$bin"
