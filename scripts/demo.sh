#!/usr/bin/env bash
# The main job: bring up the local sandbox (a real kube-apiserver and etcd on
# loopback with the Trellis CRDs installed, three nodes, each a Node object, a
# network namespace on the underlay bridge and a trellis-node, and
# trellis-operator), apply the samples, wait until every node reports its
# network Ready, show nodes, NodeNetworks, NetworkStatuses and every Trellis
# kind with `kubectl get`, and send real traffic between the nodes' VXLAN
# tunnel endpoints, with the tunnel's own counters as proof.
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

# The sample NodeNetwork and NetworkStatus document the kinds' shapes; in a
# cluster the operator writes one NodeNetwork per Node and each trellis-node
# its own NetworkStatus, so they are not applied.
sample_nodenetwork=config/samples/network.trellis.dev_v1alpha1_nodenetwork.yaml
sample_networkstatus=config/samples/network.trellis.dev_v1alpha1_networkstatus.yaml
echo
echo "== applying config/samples (cluster-scoped kinds, and the NetworkPolicies in namespace trellis-demo)"
echo "   (not the NodeNetwork and NetworkStatus samples: those are written by Trellis)"
k create namespace trellis-demo --dry-run=client -o yaml | k apply -f -
for f in config/samples/*.yaml; do
  [[ $f == "$sample_nodenetwork" || $f == "$sample_networkstatus" ]] && continue
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

# Each trellis-node reports Ready once its tunnel and the routes to every
# peer are in its kernel (read back after programming).
echo
echo "== waiting (up to ${timeout}s) for every node's NetworkStatus to say Ready"
if ! k wait networkstatus --all --for=condition=Ready --timeout="${timeout}s" >/dev/null; then
  echo "error: not every node is Ready:" >&2
  k get networkstatuses -o wide >&2
  exit 1
fi
echo "   all Ready after $((SECONDS - start))s"

echo
echo "== kubectl get nodes -o wide"
k get nodes -o wide
echo
echo "== kubectl get nodenetworks -o wide"
k get nodenetworks -o wide
echo
echo "== kubectl get networkstatuses -o wide   (one line per node, written by its trellis-node)"
k get networkstatuses -o wide
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

# Real traffic between the nodes' tunnel endpoints (VTEPs), from inside each
# node's network namespace; the VXLAN device's packet counters show it went
# through the tunnel.
# The node's namespace, as this sandbox recorded it (column NETNS).
netns_of() { "$sandbox" node list | awk -v node="$1" '$1 == node { print $4 }'; }
vtep_of() { k get nodenetwork "$1" -o jsonpath='{.spec.vtep.ipv4}'; }
tx_of() { ip -n "$1" -j -s link show trellis-vxlan | jq '.[0].stats64.tx.packets'; }
mapfile -t names < <(k get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | sort)
echo
echo "== ping between the nodes' VTEPs, through trellis-vxlan"
for from in "${names[@]}"; do
  ns=$(netns_of "$from")
  for to in "${names[@]}"; do
    [[ $from == "$to" ]] && continue
    target=$(vtep_of "$to")
    before=$(tx_of "$ns")
    if ! ip netns exec "$ns" ping -n -q -c 3 -i 0.2 -W 2 "$target" >/dev/null; then
      echo "error: $from cannot reach $to's VTEP $target" >&2
      exit 1
    fi
    echo "   $from → $to ($target): 3/3 replies; trellis-vxlan on $from sent $(( $(tx_of "$ns") - before )) packets"
  done
done

echo
echo "== an invalid object is refused by the apiserver before any controller sees it:"
k apply -f config/samples/invalid/ippool-cidr-host-bits.yaml 2>&1 | sed 's/^/   /' || true

echo
echo "The sandbox is still running. Use it with:"
echo "  export KUBECONFIG=$kubeconfig; kubectl get trellis"
echo "  $sandbox node add trellis-node-4        # a block from the operator, then every peer routes to it"
echo "  $sandbox node list"
echo "Stop it with:"
echo "  $sandbox down"
