#!/usr/bin/env bash
# The main job: bring up the local sandbox (a real kube-apiserver and etcd on
# loopback with the Trellis CRDs installed, three nodes, each a Node object, a
# network namespace on the underlay bridge and a trellis-node, and
# trellis-operator), apply the samples, wait until every node reports its
# network Ready, show nodes, NodeNetworks, NetworkStatuses and every Trellis
# kind with `kubectl get`, and send real traffic between the nodes' VXLAN
# tunnel endpoints, with the tunnel's own counters as proof. Then put a pod on
# each of three nodes (`trellis-sandbox pod add`: a Pod bound to the node and a
# network namespace plugged in by the node's installed CNI configuration, as a
# container runtime does), show them with `kubectl get pods -o wide` and the
# endpoints each node reports, and send traffic between pods on different
# nodes: ping both ways, and HTTPS (curl to openssl s_server) over TCP.
# Finally the policy scenario of the docs: `default-deny-ingress` makes every
# request to the backend time out, then `allow-frontend-to-backend` lets only
# the frontend in, on TCP 8080.
#
#   scripts/demo.sh            # leaves the sandbox running; stop it with:
#   cargo run -q -p trellis-e2e --bin trellis-sandbox -- down
#
# TRELLIS_DEMO_TIMEOUT (seconds, default 60) bounds each wait (NodeNetworks,
# Ready, endpoints reported).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

bash scripts/install-deps.sh
# The TCP exchange between pods: openssl s_server in one, curl in the others
# (openssl comes with ca-certificates, curl with install-deps.sh).
for cmd in openssl curl; do
  command -v "$cmd" >/dev/null || { echo "error: $cmd is needed: apt-get install $cmd" >&2; exit 1; }
done
cargo build -q -p trellis-e2e --bin trellis-sandbox
sandbox=target/debug/trellis-sandbox
kubectl_bin=$(bash tests/e2e/tools/build.sh kubectl)

"$sandbox" up
kubeconfig=$("$sandbox" kubeconfig)
k() { "$kubectl_bin" --kubeconfig "$kubeconfig" "$@"; }

# The samples of the kinds Trellis writes (NodeNetwork, NetworkStatus,
# SecurityIdentity, NodeEndpoints) document their shapes; in a cluster the
# operator writes one NodeNetwork per Node and each trellis-node its own
# NetworkStatus and NodeEndpoints and the identities it needs, so they are
# not applied.
written_by_trellis=(
  config/samples/network.trellis.dev_v1alpha1_nodenetwork.yaml
  config/samples/network.trellis.dev_v1alpha1_networkstatus.yaml
  config/samples/network.trellis.dev_v1alpha1_securityidentity.yaml
  config/samples/network.trellis.dev_v1alpha1_nodeendpoints.yaml
)
echo
echo "== applying config/samples (cluster-scoped kinds, and the NetworkPolicies in namespace trellis-demo)"
echo "   (not the NodeNetwork, NetworkStatus, SecurityIdentity and NodeEndpoints samples: those are written by Trellis)"
k create namespace trellis-demo --dry-run=client -o yaml | k apply -f -
for f in config/samples/*.yaml; do
  [[ " ${written_by_trellis[*]} " == *" $f "* ]] && continue
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

# Pods. There is no kubelet or container runtime in the sandbox;
# `trellis-sandbox pod add` does their part: the Pod object (spec.nodeName), a
# network namespace for its sandbox, CNI ADD with the node's installed
# conflist (trellis, then portmap) run in the node's namespace, and the Pod's
# status (Running, podIP) as a kubelet writes it. They go into namespace
# trellis-pods, where no NetworkPolicy applies until the policy scenario at
# the end applies the two sample policies there.
pod_ns=trellis-pods
pods=(frontend backend client)
if ((${#names[@]} < ${#pods[@]})); then
  echo "error: the pods need ${#pods[@]} nodes, the sandbox has ${#names[@]}" >&2
  exit 1
fi
echo
echo "== pods on ${#pods[@]} nodes: trellis-sandbox pod add (Pod + network namespace + CNI ADD with the node's conflist)"
for i in "${!pods[@]}"; do
  port=()
  [[ ${pods[i]} == backend ]] && port=(--port http:8080/TCP)
  "$sandbox" pod add "${pods[i]}" -n "$pod_ns" --node "${names[i]}" --labels "app=${pods[i]}" \
    "${port[@]}" --timeout "$timeout" 2>&1 | sed 's/^/   /'
done
pod_ip() { k get pod -n "$pod_ns" "$1" -o jsonpath='{.status.podIP}'; }
node_of_pod() { k get pod -n "$pod_ns" "$1" -o jsonpath='{.spec.nodeName}'; }
echo
echo "== kubectl get pods -n $pod_ns -o wide   (Running, with the address Trellis gave each)"
k get pods -n "$pod_ns" -o wide
echo
echo "== trellis-sandbox pod list   (the sandbox's record: network namespace per pod)"
"$sandbox" pod list

# Each trellis-node counts its Ready endpoints in its NetworkStatus.
echo
echo "== waiting (up to ${timeout}s) for the nodes' NetworkStatus to count the pods (column ENDPOINTS)"
start=$SECONDS
endpoints() {
  k get networkstatuses -o jsonpath='{range .items[*]}{.status.endpoints}{"\n"}{end}' |
    awk '{ n += $1 } END { print n + 0 }'
}
until (($(endpoints) == ${#pods[@]})); do
  if ((SECONDS - start >= timeout)); then
    echo "error: the NetworkStatuses count $(endpoints) endpoints, not ${#pods[@]}:" >&2
    k get networkstatuses -o wide >&2
    exit 1
  fi
  sleep 0.2
done
k get networkstatuses -o wide

# Pod to pod across nodes: from the pod's own network namespace, through its
# eth0, the node's routes and the VXLAN tunnel to the other node; the sending
# node's trellis-vxlan counter shows the packets went through the tunnel.
echo
echo "== ping between pods on different nodes"
for from in "${pods[@]}"; do
  from_node=$(node_of_pod "$from")
  ns=$(netns_of "$from_node")
  for to in "${pods[@]}"; do
    [[ $from == "$to" ]] && continue
    target=$(pod_ip "$to")
    before=$(tx_of "$ns")
    if ! "$sandbox" pod exec "$from" -n "$pod_ns" -- ping -n -q -c 3 -i 0.2 -W 2 "$target" >/dev/null; then
      echo "error: pod $from ($from_node) cannot reach pod $to at $target" >&2
      exit 1
    fi
    echo "   $from ($from_node) → $to ($(node_of_pod "$to"), $target): 3/3 replies;" \
      "trellis-vxlan on $from_node sent $(( $(tx_of "$ns") - before )) packets"
  done
done

# TCP: backend serves HTTPS on :8080 with openssl s_server (a self-signed
# certificate for its pod IP, so curl checks it reached that address); frontend
# and client, on two other nodes, fetch a page with curl. The server runs
# until the policy scenario below is over (at most 180 s).
backend_ip=$(pod_ip backend)
backend_node=$(node_of_pod backend)
www=$(mktemp -d -t trellis-demo-www-XXXXXX)
server=
cleanup_www() {
  if [[ -n $server ]]; then kill "$server" 2>/dev/null || true; fi
  rm -rf "$www"
}
trap cleanup_www EXIT
echo "hello from backend on $backend_node" >"$www/hello.txt"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj "/CN=backend.$pod_ns" -addext "subjectAltName=IP:$backend_ip" \
  -keyout "$www/key.pem" -out "$www/cert.pem" >/dev/null 2>&1
(cd "$www" && exec timeout 180 "$repo/$sandbox" pod exec backend -n "$pod_ns" -- \
  openssl s_server -quiet -WWW -accept 8080 -cert cert.pem -key key.pem) \
  >"$www/server.log" 2>&1 &
server=$!
listening=
for _ in $(seq 50); do
  if [[ -n $("$sandbox" pod exec backend -n "$pod_ns" -- ss -Hltn 'sport = :8080') ]]; then
    listening=1
    break
  fi
  sleep 0.1
done
if [[ -z $listening ]]; then
  echo "error: openssl s_server does not listen on :8080 in pod backend:" >&2
  cat "$www/server.log" >&2
  exit 1
fi
# One HTTPS request from pod $1 to the backend, 2 s at most; prints the page.
fetch() {
  "$sandbox" pod exec "$1" -n "$pod_ns" -- \
    curl -sS --max-time 2 --cacert "$www/cert.pem" "https://$backend_ip:8080/hello.txt" 2>&1
}
echo
echo "== TCP between pods on different nodes: backend ($backend_node) serves HTTPS on :8080, curl from the others"
for from in frontend client; do
  if ! page=$(fetch "$from"); then
    echo "error: pod $from cannot fetch https://$backend_ip:8080/ from pod backend: $page" >&2
    exit 1
  fi
  echo "   $from ($(node_of_pod "$from")) → backend ($backend_ip:8080): \"$page\""
done

# NetworkPolicy, enforced by the eBPF programs on each pod's veth. The policy
# reaches every node through the apiserver; each node reports the policy it
# enforces (NetworkStatus PolicyReady and status.policyHash), and the demo
# waits on the traffic itself: up to $timeout s for the expected outcome.
# until_outcome POD ok|blocked: waits until a fetch from POD succeeds (ok) or
# times out (blocked); prints what the last fetch said.
until_outcome() {
  local from=$1 want=$2 deadline=$((SECONDS + timeout)) out
  while :; do
    if out=$(fetch "$from"); then
      [[ $want == ok ]] && { echo "\"$out\""; return 0; }
    else
      [[ $want == blocked ]] && { echo "no answer: ${out##*: }"; return 0; }
    fi
    if ((SECONDS >= deadline)); then
      echo "error: after ${timeout}s, $from → backend is still not $want (last: $out)" >&2
      return 1
    fi
  done
}
echo
echo "== NetworkPolicy: kubectl apply -n $pod_ns -f default-deny-ingress (every pod isolated for ingress)"
k apply -n "$pod_ns" -f config/samples/networking.k8s.io_v1_networkpolicy_default-deny-ingress.yaml | sed 's/^/   /'
for from in frontend client; do
  echo "   $from → backend:8080: $(until_outcome "$from" blocked)"
done
echo
echo "== NetworkPolicy: kubectl apply -n $pod_ns -f allow-frontend-to-backend (TCP 8080 from app=frontend only)"
k apply -n "$pod_ns" -f config/samples/networking.k8s.io_v1_networkpolicy_allow-frontend-to-backend.yaml | sed 's/^/   /'
echo "   frontend → backend:8080: $(until_outcome frontend ok)"
echo "   client → backend:8080: $(until_outcome client blocked)"
echo
echo "== kubectl get networkstatuses -o custom-columns=…   (the policy each node enforces)"
k get networkstatuses -o custom-columns='NODE:.metadata.name,POLICY:.status.conditions[?(@.type=="PolicyReady")].status,REASON:.status.conditions[?(@.type=="PolicyReady")].reason,HASH:.status.policyHash'
kill "$server" 2>/dev/null || true
wait "$server" 2>/dev/null || true
server=

echo
echo "== an invalid object is refused by the apiserver before any controller sees it:"
k apply -f config/samples/invalid/ippool-cidr-host-bits.yaml 2>&1 | sed 's/^/   /' || true

echo
echo "The sandbox is still running. Use it with:"
echo "  export KUBECONFIG=$kubeconfig; kubectl get trellis"
echo "  kubectl get pods -n $pod_ns -o wide; kubectl get networkstatuses -o wide"
echo "  $sandbox pod exec client -n $pod_ns -- ping -c 1 -W 1 $backend_ip   # no reply: default-deny-ingress"
echo "  kubectl delete networkpolicy -n $pod_ns --all                      # and it replies again"
echo "  $sandbox pod add web --node ${names[0]} -n $pod_ns   # CNI ADD with the node's conflist"
echo "  $sandbox pod del web -n $pod_ns                      # CNI DEL"
echo "  $sandbox node add trellis-node-4        # a block from the operator, then every peer routes to it"
echo "  $sandbox node list"
echo "Stop it with (CNI DEL for every pod, then everything the sandbox made is removed):"
echo "  $sandbox down"
