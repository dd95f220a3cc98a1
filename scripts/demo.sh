#!/usr/bin/env bash
# The main job: bring up the local sandbox (a real kube-apiserver and etcd on
# loopback with the Trellis CRDs installed, three Node objects and
# trellis-operator), apply the samples, wait until the operator has given
# every node its address block, and show nodes, their NodeNetworks and every
# Trellis kind with `kubectl get`.
#
#   scripts/demo.sh            # leaves the sandbox running; stop it with:
#   cargo run -q -p trellis-e2e --bin trellis-sandbox -- down
#
# TRELLIS_DEMO_TIMEOUT (seconds, default 60) bounds the wait for NodeNetworks.
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

# The sample NodeNetwork documents the kind's shape; in a cluster the operator
# writes one per Node and deletes any without a Node, so it is not applied.
sample_nodenetwork=config/samples/network.trellis.dev_v1alpha1_nodenetwork.yaml
echo
echo "== applying config/samples (cluster-scoped kinds, and the NetworkPolicies in namespace trellis-demo)"
echo "   (not $sample_nodenetwork: NodeNetworks are the operator's to write)"
k create namespace trellis-demo --dry-run=client -o yaml | k apply -f -
for f in config/samples/*.yaml; do
  [[ $f == "$sample_nodenetwork" ]] && continue
  k apply -n trellis-demo -f "$f"
done

# Every Node gets a NodeNetwork with pod CIDRs once the operator has seen the
# IPPool; poll for it rather than guess how long that takes.
timeout=${TRELLIS_DEMO_TIMEOUT:-60}
echo
echo "== waiting (up to ${timeout}s) for the operator to give every node a NodeNetwork with pod CIDRs"
start=$SECONDS
while :; do
  nodes=$(k get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | sort)
  allocated=$(k get nodenetworks \
    -o jsonpath='{range .items[?(@.spec.podCIDRs[0])]}{.metadata.name}{"\n"}{end}' | sort)
  missing=$(comm -23 <(printf '%s\n' "$nodes") <(printf '%s\n' "$allocated") | grep -v '^$' || true)
  if [[ -z $missing ]]; then
    echo "   $(printf '%s\n' "$nodes" | grep -c .) nodes, all allocated after $((SECONDS - start))s"
    break
  fi
  if ((SECONDS - start >= timeout)); then
    echo "error: after ${timeout}s these nodes still have no NodeNetwork with pod CIDRs:" >&2
    printf '   %s\n' $missing >&2
    log="$(dirname "$kubeconfig")/logs/trellis-operator.log"
    echo "last lines of the operator's log ($log):" >&2
    tail -n 30 "$log" >&2 || true
    exit 1
  fi
  sleep 0.2
done

echo
echo "== kubectl get nodes -o wide"
k get nodes -o wide
echo
echo "== kubectl get nodenetworks -o wide"
k get nodenetworks -o wide
echo
echo "== kubectl get ippools"
k get ippools
echo
echo "== kubectl get networkconfig"
k get networkconfig
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
echo "  $sandbox node add trellis-node-4        # the operator gives it a block"
echo "  $sandbox node list"
echo "Stop it with:"
echo "  $sandbox down"
