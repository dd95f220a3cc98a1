#!/usr/bin/env bash
# The main job: bring up the local sandbox (a real kube-apiserver and etcd on
# loopback with the Trellis CRDs installed), apply the samples, and show
# every Trellis kind with `kubectl get`.
#
#   scripts/demo.sh            # leaves the sandbox running; stop it with:
#   cargo run -q -p trellis-e2e --bin trellis-sandbox -- down
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

bash scripts/install-deps.sh
cargo build -q -p trellis-e2e --bin trellis-sandbox
sandbox=target/debug/trellis-sandbox
kubectl_bin=$(bash tests/e2e/tools/build.sh kubectl)

"$sandbox" up
kubeconfig=$("$sandbox" kubeconfig)
k() { "$kubectl_bin" --kubeconfig "$kubeconfig" "$@"; }

echo
echo "== applying config/samples (cluster-scoped kinds, and the NetworkPolicies in namespace trellis-demo)"
k create namespace trellis-demo --dry-run=client -o yaml | k apply -f -
k apply -n trellis-demo -f config/samples/

echo
echo "== kubectl get networkconfigs,ippools,policybundles,nodenetworks,networkstatuses"
k get networkconfigs,ippools,policybundles,nodenetworks,networkstatuses
echo
echo "== kubectl get networkpolicies -n trellis-demo"
k get networkpolicies -n trellis-demo

echo
echo "== an invalid object is refused by the apiserver before any controller sees it:"
k apply -f config/samples/invalid/ippool-cidr-host-bits.yaml 2>&1 | sed 's/^/   /' || true

echo
echo "The sandbox is still running. Use it with:"
echo "  export KUBECONFIG=$kubeconfig; kubectl get trellis"
echo "Stop it with:"
echo "  $sandbox down"
