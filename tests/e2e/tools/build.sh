#!/usr/bin/env bash
# Builds one pinned tool from its Go tools module and prints the path of the
# binary on stdout. Binaries are cached outside the repository, keyed by tool,
# version and a hash of the module's go.mod + go.sum and the build flags, so a
# second run (and every run while the pins are unchanged) costs nothing.
#
#   tests/e2e/tools/build.sh kube-apiserver|kubectl|etcd|cnitool
#   tests/e2e/tools/build.sh portmap|bridge|host-local|loopback
#   tests/e2e/tools/build.sh cni-plugins
#
# The reference CNI plugins (portmap, bridge, host-local, loopback) are built
# together into one directory, usable as an entry of CNI_PATH; asking for one
# prints its path in that directory, `cni-plugins` prints the directory.
#
# Cache root: $TRELLIS_CACHE_DIR, else $XDG_CACHE_HOME/trellis, else ~/.cache/trellis.
set -euo pipefail

usage="usage: build.sh kube-apiserver|kubectl|etcd|cnitool|portmap|bridge|host-local|loopback|cni-plugins"
tool=${1:?$usage}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The reference plugins: name -> package in github.com/containernetworking/plugins.
declare -A cni_plugins=(
  [portmap]=plugins/meta/portmap
  [bridge]=plugins/main/bridge
  [host-local]=plugins/ipam/host-local
  [loopback]=plugins/main/loopback
)

pinned() { awk -v m="$1" '$1==m && $2 ~ /^v/ {print $2; exit}' "$2/go.mod"; }

case "$tool" in
  kube-apiserver|kubectl)
    mod="$here/kubernetes"
    pkgs=(k8s.io/kubernetes/cmd/$tool)
    bins=("$tool")
    version=$(pinned k8s.io/kubernetes "$mod")
    minor=$(echo "$version" | cut -d. -f2)
    ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
    ;;
  etcd)
    mod="$here/etcd"
    pkgs=(go.etcd.io/etcd/server/v3)
    # The package's last element is its major version, not the binary's name.
    bins=(etcd)
    version=$(pinned go.etcd.io/etcd/server/v3 "$mod")
    ldflags="-s -w"
    ;;
  cnitool)
    mod="$here/cni"
    pkgs=(github.com/containernetworking/cni/cnitool)
    bins=(cnitool)
    version=$(pinned github.com/containernetworking/cni "$mod")
    ldflags="-s -w"
    ;;
  portmap|bridge|host-local|loopback|cni-plugins)
    mod="$here/cni"
    version=$(pinned github.com/containernetworking/plugins "$mod")
    pkgs=()
    bins=()
    for name in $(printf '%s\n' "${!cni_plugins[@]}" | sort); do
      pkgs+=("github.com/containernetworking/plugins/${cni_plugins[$name]}")
      bins+=("$name")
    done
    ldflags="-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$version"
    ;;
  *) echo "build.sh: unknown tool '$tool' ($usage)" >&2; exit 2 ;;
esac
[[ -f "$mod/go.mod" ]] || { echo "build.sh: no tools module at $mod" >&2; exit 2; }
[[ -n "$version" ]] || { echo "build.sh: cannot read the pinned version of $tool from $mod/go.mod" >&2; exit 2; }

key=$( (cat "$mod/go.mod" "$mod/go.sum"; echo "${pkgs[*]} $ldflags") | sha256sum | cut -c1-12)
cache=${TRELLIS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/trellis}
case "$tool" in
  portmap|bridge|host-local|loopback|cni-plugins)
    dir="$cache/tools/cni-plugins-$version-$key"
    [[ "$tool" == cni-plugins ]] && out="$dir" || out="$dir/$tool"
    ;;
  *)
    dir="$cache/tools/$tool-$version-$key"
    out="$dir/$tool"
    ;;
esac

build() { # build <package> <binary path>
  local bin=$2
  # go.sum is committed and complete, so the checksum database is never asked.
  (cd "$mod" && GOWORK=off GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0 \
     go build -trimpath -tags selinux,notest -ldflags "$ldflags" -o "$bin.tmp.$$" "$1")
  mv -f "$bin.tmp.$$" "$bin"   # atomic: a crashed build never leaves a half binary at $bin
}

# Indexes of the packages whose binary ($dir/${bins[i]}) is not there yet.
missing=()
for i in "${!pkgs[@]}"; do
  [[ -x "$dir/${bins[i]}" ]] || missing+=("$i")
done
if (( ${#missing[@]} )); then
  mkdir -p "$dir"
  command -v go >/dev/null || { echo "build.sh: Go is not installed (need Go >= 1.24 for tools modules)" >&2; exit 3; }
  names=$(for i in "${missing[@]}"; do printf '%s ' "${bins[i]}"; done)
  echo "build.sh: building ${names% } $version (cold build, minutes) into $dir" >&2
  start=$(date +%s)
  for i in "${missing[@]}"; do
    build "${pkgs[i]}" "$dir/${bins[i]}"
  done
  echo "build.sh: built ${names% } in $(( $(date +%s) - start ))s" >&2
fi
[[ -x "$out" ]] || { echo "build.sh: $out was not built" >&2; exit 3; }
echo "$out"
