//! Pods end to end: a sandbox with a real apiserver, the operator, a real `trellis-node` per
//! node namespace, and pods plugged in by the real `trellis` CNI binary through the conflist
//! the agent installs (the reference `portmap` chained after it), exactly as a container
//! runtime runs it. Every claim is checked against the kernel (`ip -j`), the agent's state
//! directory, the apiserver, or with real traffic between the pods' namespaces.
//!
//! - three nodes: pods on every node reach each other with ICMP, TCP and UDP; their Pod
//!   objects, their `eth0` and `NetworkStatus.status.endpoints` agree; 50 ADDs at once on one
//!   node get 50 distinct, reachable addresses and leave nothing behind when removed;
//! - the reference `cnitool` runs ADD, CHECK, STATUS, GC and DEL against the installed
//!   conflist (in a private mount namespace, so its results cache `/var/lib/cni` is the
//!   test's own directory); a GC that names the attachment valid keeps it;
//! - the result of each spec version (0.4.0, 1.0.0, 1.1.0) has that version's fields; DEL
//!   twice, CHECK after a pod's route was deleted (101), a stopped agent (STATUS 50, ADD 11)
//!   and back;
//! - `trellis-node` SIGKILLed during ADDs, then DEL and retry as a runtime does; GC after a
//!   runtime forgot pods: nothing leaks (allocation files, records, host veths, routes).
//!
//! The TCP and UDP exchanges need no tool in the pods: the test opens its sockets on a thread
//! that entered the pod's namespace (`setns`), and does the I/O on tokio.
//!
//! Each test has its own sandbox (`/tmp/trellis-e2e-pods-*`, so its own namespace names);
//! they run in parallel. On failure, every node's kernel state, state directory and agent log
//! tail are printed, and the sandbox is kept for inspection.
//!
//! Needs root (network namespaces, VXLAN, netfilter for portmap).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a panic is the failure report"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod as K8sPod;
use kube::{Api, Client, ResourceExt as _, api::ListParams};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use trellis_api::v1alpha1::{NetworkStatus, NodeNetwork};
use trellis_e2e::{
    ControlPlane, Nodes, Pod, PodSpec, Pods, StartOptions, Tool, agent, binaries,
    cni_runtime::{self, Attachment, CniError, CniResult, Command, NetworkConfigList, Runtime},
    controlplane::repo_root,
    datapath::{self, DatapathConfig},
    process, samples, wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node may take to finish answered DELs (tens of milliseconds each).
const FOOTPRINT_SETTLES: Duration = Duration::from_secs(10);
/// The pods' default gateway (trellis_cni::proto::GATEWAY_V4).
const GATEWAY: &str = "169.254.1.1";
/// Route protocol of the host routes to pods (trellis_cni::proto::RTPROT_TRELLIS_ENDPOINT).
const ENDPOINT_ROUTE_PROTO: &str = "211";
/// The network's name in the installed conflist.
const NETWORK: &str = "trellis";

// ---------------------------------------------------------------------------------------------
// The cluster

struct Cluster {
    /// First, so it prints the state before the control plane is torn down.
    _dump: DumpOnPanic,
    cp: ControlPlane,
    client: Client,
    nodes: Nodes,
    pods: Pods,
    names: Vec<String>,
}

/// A sandbox of `n` nodes with the IPPool sample applied; returns once every node reports
/// Ready with all its peers programmed (so the agents serve pods).
async fn cluster(test: &str, n: usize) -> Cluster {
    let opts = StartOptions::for_test(test).with_cluster(n).unwrap();
    let cp = ControlPlane::start(opts).await.expect("sandbox starts");
    let client = cp.client();
    let pools = samples::ippools(samples::IPPOOL_SAMPLE).unwrap();
    samples::apply_ippools(&client, &pools, "trellis-e2e")
        .await
        .unwrap();
    let nodes = cp.nodes();
    let names: Vec<String> = (1..=n).map(|i| format!("trellis-node-{i}")).collect();
    let tag = DatapathConfig::read(cp.sandbox()).unwrap().unwrap().tag;
    let dump = DumpOnPanic {
        pod_netns_prefix: format!("trellis-{tag}-pod_"),
        sandbox_dir: cp.sandbox().dir().to_path_buf(),
        nodes: names
            .iter()
            .map(|name| (name.clone(), nodes.netns(name).unwrap()))
            .collect(),
    };
    let c = Cluster {
        _dump: dump,
        pods: cp.pods(),
        cp,
        client,
        nodes,
        names,
    };
    c.wait_ready(i32::try_from(n - 1).unwrap()).await;
    c
}

impl Cluster {
    /// Every node's NetworkStatus Ready with `peers` peers.
    async fn wait_ready(&self, peers: i32) {
        let api: Api<NetworkStatus> = Api::all(self.client.clone());
        wait_for(
            &format!("every node Ready with {peers} peers"),
            TIMEOUT,
            || async {
                let list = api.list(&ListParams::default()).await.ok()?;
                self.names
                    .iter()
                    .all(|name| {
                        list.items.iter().any(|s| {
                            s.name_any() == *name
                                && s.status.as_ref().is_some_and(|st| {
                                    st.peers == peers
                                        && st
                                            .conditions
                                            .iter()
                                            .any(|c| c.type_ == "Ready" && c.status == "True")
                                })
                        })
                    })
                    .then_some(())
            },
        )
        .await;
    }

    fn sandbox_dir(&self) -> &Path {
        self.cp.sandbox().dir()
    }

    async fn network_status(&self, node: &str) -> NetworkStatus {
        Api::<NetworkStatus>::all(self.client.clone())
            .get(node)
            .await
            .unwrap()
    }

    /// The node's IPv4 block (its NodeNetwork's first pod CIDR).
    async fn block(&self, node: &str) -> String {
        let nn = Api::<NodeNetwork>::all(self.client.clone())
            .get(node)
            .await
            .unwrap();
        nn.spec.pod_cidrs[0].clone()
    }

    async fn pod_mtu(&self, node: &str) -> u64 {
        let status = self.network_status(node).await.status.unwrap();
        u64::try_from(status.pod_mtu.expect("podMTU in the NetworkStatus")).unwrap()
    }

    /// Waits until the node's `NetworkStatus.status.endpoints` is `n`.
    async fn wait_endpoints(&self, node: &str, n: usize) {
        let want = i32::try_from(n).unwrap();
        let api: Api<NetworkStatus> = Api::all(self.client.clone());
        wait_for(
            &format!("NetworkStatus {node} to count {n} endpoints"),
            TIMEOUT,
            || async {
                let st = api.get(node).await.ok()?.status?;
                (st.endpoints == want).then_some(())
            },
        )
        .await;
    }

    /// The node's runtime and its installed network configuration list.
    async fn runtime(&self, node: &str) -> (Runtime, NetworkConfigList) {
        (
            self.pods.runtime(node).await.unwrap(),
            self.pods.network(node).await.unwrap(),
        )
    }

    /// A pod namespace (`trellis-<tag>-pod_<namespace>_<name>`, recorded so the sandbox
    /// deletes it) with no Pod object and no CNI ADD yet: for driving the runtime by hand.
    async fn bare_pod(&self, node: &str, namespace: &str, name: &str) -> Pod {
        let sandbox = self.cp.sandbox().clone();
        let tag = DatapathConfig::read(&sandbox).unwrap().unwrap().tag;
        let pod = Pod {
            namespace: namespace.into(),
            name: name.into(),
            node: node.into(),
            netns: datapath::pod_netns_name(&tag, namespace, name),
            container_id: cni_runtime::random_container_id().unwrap(),
            ifname: "eth0".into(),
            uid: None,
            network: None,
            ips: Vec::new(),
        };
        let record = pod.clone();
        tokio::task::spawn_blocking(move || datapath::create_pod_netns(&sandbox, &record))
            .await
            .unwrap()
            .unwrap();
        pod
    }

    /// Forget a pod as a crashed runtime does: its namespace and the sandbox's record go, no
    /// DEL.
    async fn forget(&self, pod: &Pod) {
        let sandbox = self.cp.sandbox().clone();
        let netns = pod.netns.clone();
        tokio::task::spawn_blocking(move || datapath::delete_pod_netns(&sandbox, &netns))
            .await
            .unwrap()
            .unwrap();
    }

    /// What the node holds for pod endpoints: its state directory and its kernel.
    async fn footprint(&self, node: &str) -> Footprint {
        let dirs = self.nodes.node_dirs(node);
        let ipam = list_dir(&dirs.state.join("ipam"));
        let mut records = BTreeMap::new();
        for name in list_dir(&dirs.state.join("endpoints")) {
            let path = dirs.state.join("endpoints").join(&name);
            let value = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .unwrap_or(Value::Null);
            records.insert(name, value);
        }
        let links = self.ip(node, &["link", "show"]).await;
        let names: Vec<String> = links
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect();
        let veths = names.iter().filter(|n| is_host_veth(n)).cloned().collect();
        let temp_peers = names
            .iter()
            .filter(|n| n.starts_with("trltmp"))
            .cloned()
            .collect();
        let mut routes = BTreeSet::new();
        for family in ["-4", "-6"] {
            let r = self
                .ip(
                    node,
                    &[family, "route", "show", "proto", ENDPOINT_ROUTE_PROTO],
                )
                .await;
            for route in r.as_array().unwrap() {
                routes.insert(route["dst"].as_str().unwrap().to_string());
            }
        }
        Footprint {
            ipam,
            records,
            veths,
            temp_peers,
            routes,
        }
    }

    /// The node holds exactly the endpoints `live` (container ID → address, all distinct):
    /// one allocation file, one Ready record, one host veth and one route each, and nothing
    /// else (no temporary file, no pod side left in the node). A DEL answers before its veth
    /// is gone (the node finishes it right after), so this waits for the node to get there.
    async fn assert_footprint(&self, node: &str, live: &BTreeMap<String, IpAddr>, when: &str) {
        let deadline = Instant::now() + FOOTPRINT_SETTLES;
        loop {
            let fp = self.footprint(node).await;
            let holds = footprint_holds(&fp, live);
            if holds || Instant::now() >= deadline {
                assert!(
                    holds,
                    "{when}: node {node} should hold exactly {} endpoints {live:?}\n\
                     (allocation files, Ready records, host veths, proto-{ENDPOINT_ROUTE_PROTO} \
                     routes) within {FOOTPRINT_SETTLES:?}, but holds\n{fp:#?}",
                    live.len()
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ip(&self, node: &str, args: &[&str]) -> Value {
        self.nodes.ip_json(node, args).await.unwrap()
    }

    /// Two pings from pod `from` to `to`, both answered.
    async fn ping(&self, from: &Pod, to: IpAddr) {
        let out = datapath::netns_exec(
            &from.netns,
            &[
                "ping",
                "-n",
                "-c",
                "2",
                "-i",
                "0.2",
                "-W",
                "3",
                &to.to_string(),
            ],
        )
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "ping {} ({:?}) → {to}:\n{}{}",
            from.key(),
            from.ip(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The Pod object's `status.podIPs`.
    async fn status_pod_ips(&self, pod: &Pod) -> Vec<String> {
        let obj = Api::<K8sPod>::namespaced(self.client.clone(), &pod.namespace)
            .get(&pod.name)
            .await
            .unwrap();
        obj.status
            .and_then(|s| s.pod_ips)
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.ip)
            .collect()
    }

    /// `kubectl get networkstatus`: node name → its ENDPOINTS column.
    async fn kubectl_endpoints(&self) -> BTreeMap<String, String> {
        let kubectl = binaries::resolve(Tool::Kubectl, &repo_root())
            .await
            .unwrap();
        let out = tokio::process::Command::new(kubectl)
            .arg("--kubeconfig")
            .arg(self.cp.kubeconfig_path())
            .args(["get", "networkstatus"])
            .output()
            .await
            .unwrap();
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{table}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Columns are aligned under their headers (which may hold spaces: "POD CIDRS").
        let mut lines = table.lines();
        let header = lines.next().unwrap();
        let at = header
            .find("ENDPOINTS")
            .unwrap_or_else(|| panic!("no ENDPOINTS column in\n{table}"));
        lines
            .map(|l| {
                let name = l.split_whitespace().next().unwrap_or_default();
                let cell = l.get(at..).unwrap_or_default().split_whitespace().next();
                (name.to_string(), cell.unwrap_or_default().to_string())
            })
            .collect()
    }
}

/// What a node holds for pod endpoints.
#[derive(Debug)]
struct Footprint {
    /// Files under `<state>/ipam/`: one per allocated address.
    ipam: BTreeSet<String>,
    /// Files under `<state>/endpoints/` and their content.
    records: BTreeMap<String, Value>,
    /// `trellis` + 8 hex digits links in the node's namespace.
    veths: BTreeSet<String>,
    /// Pod sides left in the node's namespace (`trltmp*`).
    temp_peers: BTreeSet<String>,
    /// Destinations of proto-211 routes (IPv4 and IPv6).
    routes: BTreeSet<String>,
}

/// A host veth as trellis-node names them: `trellis` + 8 lowercase hex digits.
fn is_host_veth(name: &str) -> bool {
    name.strip_prefix("trellis").is_some_and(|rest| {
        rest.len() == 8
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn list_dir(dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => panic!("list {}: {e}", dir.display()),
    }
}

/// Whether IPv4 `ip` is in `cidr` (`a.b.c.d/n`).
fn in_block(ip: IpAddr, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').unwrap();
    let net: Ipv4Addr = net.parse().unwrap();
    let len: u32 = len.parse().unwrap();
    let IpAddr::V4(ip) = ip else {
        return false;
    };
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Prints every node's pod-endpoint state and its agent's log tail if the test panics; the
/// sandbox itself is kept by [`ControlPlane`]'s drop.
struct DumpOnPanic {
    sandbox_dir: PathBuf,
    /// (node, its namespace)
    nodes: Vec<(String, String)>,
    /// `trellis-<tag>-pod_`: the names of the sandbox's pod namespaces start with it.
    pod_netns_prefix: String,
}

impl Drop for DumpOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .output()
                .map(|o| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                })
                .unwrap_or_else(|e| e.to_string())
        };
        eprintln!(
            "==== trellis pods test failed: state of the sandbox in {}",
            self.sandbox_dir.display()
        );
        for (node, netns) in &self.nodes {
            let dir = self.sandbox_dir.join("nodes").join(node);
            eprintln!("---- {node} (namespace {netns})");
            eprintln!(
                "ip -j link show type veth:\n{}",
                ip(&["-n", netns, "-j", "link", "show", "type", "veth"])
            );
            eprintln!(
                "ip -j route show proto {ENDPOINT_ROUTE_PROTO}:\n{}",
                ip(&[
                    "-n",
                    netns,
                    "-j",
                    "route",
                    "show",
                    "proto",
                    ENDPOINT_ROUTE_PROTO
                ])
            );
            for sub in ["state/ipam", "state/endpoints", "cni-cache/results"] {
                eprintln!("{sub}: {:?}", list_dir(&dir.join(sub)));
            }
            let log = self
                .sandbox_dir
                .join("logs")
                .join(format!("{}.log", agent::process_name(node)));
            eprintln!(
                "agent log {} (last lines):\n{}",
                log.display(),
                process::log_tail(&log, 40)
            );
        }
        let pods = ip(&["-j", "netns", "list"]);
        if let Ok(Value::Array(list)) = serde_json::from_str::<Value>(&pods) {
            for ns in list.iter().filter_map(|n| n["name"].as_str()) {
                if ns.starts_with(&self.pod_netns_prefix) {
                    eprintln!(
                        "---- pod namespace {ns}: ip -j addr\n{}",
                        ip(&["-n", ns, "-j", "addr"])
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic inside the pods' namespaces

/// Runs `f` on a thread that entered network namespace `netns` (sockets made there stay in
/// it wherever they are used afterwards).
fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = netns.to_path_buf();
    std::thread::Builder::new()
        .name("trellis-netns".into())
        .spawn(move || {
            let ns = std::fs::File::open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
            f()
        })
        .unwrap()
        .join()
        .unwrap()
}

/// One end of an exchange: a namespace and the address it is reached at.
#[derive(Debug, Clone)]
struct End {
    what: String,
    netns: PathBuf,
    ip: IpAddr,
}

impl End {
    fn pod(pod: &Pod) -> End {
        End {
            what: pod.key().to_string(),
            netns: pod.netns_path(),
            ip: pod.ip().unwrap(),
        }
    }
}

/// A TCP connection from `from` to a listener in `to` on `to.ip:port` (`port` 0: any):
/// a line each way; the listener sees `from`'s own address (no NAT between pods) unless
/// `dial` is given (e.g. a hostPort on the node), which the client connects to instead.
async fn tcp_exchange(from: &End, to: &End, listen_port: u16, dial: Option<SocketAddr>) {
    let listen_ip = if dial.is_some() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        to.ip
    };
    let listener = in_netns(&to.netns, move || {
        let l = std::net::TcpListener::bind((listen_ip, listen_port)).unwrap();
        l.set_nonblocking(true).unwrap();
        l
    });
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = dial.unwrap_or(SocketAddr::new(to.ip, port));
    let socket = in_netns(&from.netns, || tokio::net::TcpSocket::new_v4().unwrap());
    let what = format!("TCP {} → {} via {target}", from.what, to.what);
    let msg = format!("hello from {}", from.what);
    let server = async {
        let (conn, peer) = listener.accept().await?;
        let mut conn = BufReader::new(conn);
        let mut line = String::new();
        conn.read_line(&mut line).await?;
        conn.get_mut()
            .write_all(format!("echo {line}").as_bytes())
            .await?;
        conn.get_mut().shutdown().await?;
        Ok::<_, std::io::Error>((peer, line))
    };
    let client = async {
        let conn = socket.connect(target).await?;
        let mut conn = BufReader::new(conn);
        conn.get_mut()
            .write_all(format!("{msg}\n").as_bytes())
            .await?;
        let mut reply = String::new();
        conn.read_line(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    let ((peer, line), reply) = tokio::time::timeout(
        Duration::from_secs(10),
        futures::future::try_join(server, client),
    )
    .await
    .unwrap_or_else(|_| panic!("{what}: no exchange within 10 s"))
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        line,
        format!("{msg}\n"),
        "{what}: the listener got the line"
    );
    assert_eq!(
        reply,
        format!("echo {msg}\n"),
        "{what}: the client got the echo"
    );
    if dial.is_none() {
        assert_eq!(
            peer.ip(),
            from.ip,
            "{what}: the listener sees the pod's own address"
        );
    }
}

/// A UDP datagram from `from` to a socket in `to`, and the answer back; retried a few times
/// (UDP may drop), each attempt waiting up to a second.
async fn udp_exchange(from: &End, to: &End) {
    let dst = to.ip;
    let server = in_netns(&to.netns, move || {
        let s = std::net::UdpSocket::bind((dst, 0)).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    });
    let server = tokio::net::UdpSocket::from_std(server).unwrap();
    let port = server.local_addr().unwrap().port();
    let client = in_netns(&from.netns, || {
        let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    });
    let client = tokio::net::UdpSocket::from_std(client).unwrap();
    let what = format!("UDP {} → {} ({dst}:{port})", from.what, to.what);
    let msg = format!("datagram from {}", from.what);
    let wait = Duration::from_secs(1);
    let mut buf = [0u8; 256];
    for _ in 0..5 {
        client
            .send_to(msg.as_bytes(), (dst, port))
            .await
            .unwrap_or_else(|e| panic!("{what}: send: {e}"));
        let Ok(got) = tokio::time::timeout(wait, server.recv_from(&mut buf)).await else {
            continue;
        };
        let (n, peer) = got.unwrap();
        assert_eq!(&buf[..n], msg.as_bytes(), "{what}");
        assert_eq!(
            peer.ip(),
            from.ip,
            "{what}: the receiver sees the pod's own address"
        );
        server.send_to(b"answer", peer).await.unwrap();
        let Ok(back) = tokio::time::timeout(wait, client.recv_from(&mut buf)).await else {
            continue;
        };
        let (n, source) = back.unwrap();
        assert_eq!(&buf[..n], b"answer", "{what}");
        assert_eq!(
            source,
            SocketAddr::new(dst, port),
            "{what}: answered by the pod"
        );
        return;
    }
    panic!("{what}: no exchange in 5 attempts");
}

/// The pod's `eth0`: (MAC, MTU, addresses with prefix length).
async fn pod_eth0(netns: &str) -> (String, u64, Vec<String>) {
    let addr = datapath::ip_json(netns, &["addr", "show", "dev", "eth0"])
        .await
        .unwrap();
    let link = &addr[0];
    let addrs = link["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["scope"] != "link")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    (
        link["address"].as_str().unwrap().to_string(),
        link["mtu"].as_u64().unwrap(),
        addrs,
    )
}

/// The code and message of a plugin's error.
fn failure(e: &CniError) -> (u32, String) {
    let f = e
        .plugin_failure()
        .unwrap_or_else(|| panic!("not a plugin's error JSON: {e}"));
    (f.code, f.msg.clone())
}

fn ok_or_show(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

// ---------------------------------------------------------------------------------------------
// 1 and 5: three nodes, traffic, the API's view; 50 ADDs at once

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_three_nodes_talk_and_fifty_adds_at_once_get_distinct_addresses() {
    let c = cluster("pods-reach", 3).await;
    let ns = "trellis-reach";
    let specs = [
        ("a1", "trellis-node-1"),
        ("a2", "trellis-node-1"),
        ("b", "trellis-node-2"),
        ("c", "trellis-node-3"),
    ]
    .map(|(name, node)| PodSpec::new(name, node).in_namespace(ns));
    let pods: Vec<Pod> = join_all(specs.iter().map(|s| c.pods.add(s)))
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();

    // Each pod's address: from its node's block, on its eth0 as a /32 with the node's pod MTU,
    // and in its Pod object's status.
    let mut ips = BTreeSet::new();
    for pod in &pods {
        let ip = pod.ip().unwrap();
        assert!(ips.insert(ip), "{ip} given twice");
        let block = c.block(&pod.node).await;
        assert!(
            in_block(ip, &block),
            "{}: {ip} is not in {block}",
            pod.key()
        );
        let (_, mtu, addrs) = pod_eth0(&pod.netns).await;
        assert_eq!(addrs, [format!("{ip}/32")], "{}: eth0", pod.key());
        assert_eq!(mtu, c.pod_mtu(&pod.node).await, "{}: eth0 MTU", pod.key());
        assert_eq!(
            c.status_pod_ips(pod).await,
            [ip.to_string()],
            "{}: status.podIPs",
            pod.key()
        );
        let route = datapath::ip_json(&pod.netns, &["route", "show", "default"])
            .await
            .unwrap();
        assert_eq!(route[0]["gateway"], GATEWAY, "{}: {route}", pod.key());
    }

    // ICMP, TCP and UDP between every two pods, across nodes and on one node.
    for from in &pods {
        for to in pods.iter().filter(|p| p.key() != from.key()) {
            c.ping(from, to.ip().unwrap()).await;
            tcp_exchange(&End::pod(from), &End::pod(to), 0, None).await;
            udp_exchange(&End::pod(from), &End::pod(to)).await;
        }
    }

    // The API counts the endpoints per node; so does `kubectl get networkstatus`.
    let per_node = [
        ("trellis-node-1", 2),
        ("trellis-node-2", 1),
        ("trellis-node-3", 1),
    ];
    for (node, n) in per_node {
        c.wait_endpoints(node, n).await;
        let live = pods
            .iter()
            .filter(|p| p.node == node)
            .map(|p| (p.container_id.clone(), p.ip().unwrap()))
            .collect();
        c.assert_footprint(node, &live, "after the first pods")
            .await;
    }
    let table = c.kubectl_endpoints().await;
    for (node, n) in per_node {
        assert_eq!(
            table.get(node).map(String::as_str),
            Some(n.to_string().as_str()),
            "{table:?}"
        );
    }

    // 50 ADDs on node-1 at once.
    let node = "trellis-node-1";
    let many_specs: Vec<PodSpec> = (0..50)
        .map(|i| PodSpec::new(format!("m{i}"), node).in_namespace("trellis-many"))
        .collect();
    let started = Instant::now();
    let many: Vec<Pod> = join_all(many_specs.iter().map(|s| c.pods.add(s)))
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    eprintln!(
        "50 concurrent pod ADDs on one node: {:?}",
        started.elapsed()
    );
    let many_ips: BTreeSet<IpAddr> = many.iter().map(|p| p.ip().unwrap()).collect();
    assert_eq!(many_ips.len(), 50, "50 distinct addresses: {many_ips:?}");
    assert!(
        many_ips.is_disjoint(&ips),
        "none of the earlier pods' addresses"
    );
    let block = c.block(node).await;
    assert!(
        many_ips.iter().all(|ip| in_block(*ip, &block)),
        "all in {block}"
    );
    let mut live: BTreeMap<String, IpAddr> = pods
        .iter()
        .chain(&many)
        .filter(|p| p.node == node)
        .map(|p| (p.container_id.clone(), p.ip().unwrap()))
        .collect();
    c.assert_footprint(node, &live, "after 50 concurrent ADDs")
        .await;
    c.wait_endpoints(node, 52).await;
    for pod in &many {
        assert_eq!(c.status_pod_ips(pod).await, [pod.ip().unwrap().to_string()]);
    }
    // Every one answers a pod on another node.
    let from = pods.iter().find(|p| p.node == "trellis-node-2").unwrap();
    let pings = join_all(many.iter().map(|p| {
        let target = p.ip().unwrap().to_string();
        let netns = from.netns.clone();
        async move {
            let out = datapath::netns_exec(&netns, &["ping", "-n", "-c", "1", "-W", "5", &target])
                .await
                .unwrap();
            (target, out)
        }
    }))
    .await;
    for (target, out) in pings {
        assert!(
            out.status.success(),
            "{} → {target}: {}",
            from.key(),
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // Removed at once, they leave nothing behind.
    let removed = join_all(many.iter().map(|p| c.pods.remove(p))).await;
    for (pod, r) in many.iter().zip(removed) {
        assert!(r.unwrap(), "{} existed", pod.key());
    }
    live.retain(|id, _| pods.iter().any(|p| p.container_id == *id));
    c.assert_footprint(node, &live, "after removing the 50")
        .await;
    c.wait_endpoints(node, 2).await;
    c.ping(&pods[0], pods[2].ip().unwrap()).await;

    for pod in &pods {
        assert!(c.pods.remove(pod).await.unwrap());
    }
    for node in &c.names {
        c.assert_footprint(node, &BTreeMap::new(), "after removing every pod")
            .await;
        c.wait_endpoints(node, 0).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 2: the reference cnitool against the installed conflist

/// Runs the pinned `cnitool` as the docs say (in the node's namespace, `NETCONFPATH` = the
/// node's conf dir, `CNI_PATH` = its bin dir then the reference plugins), in a private mount
/// namespace whose `/var/lib` is `var_lib`: cnitool has no flag for its results cache
/// (`/var/lib/cni`), and this way it stays in the test's directory, never on the machine.
async fn cnitool(
    c: &Cluster,
    node: &str,
    var_lib: &Path,
    args: &[&str],
    env: &[(&str, String)],
) -> Output {
    let tool = binaries::resolve(Tool::Cnitool, &repo_root())
        .await
        .unwrap();
    let runtime = c.pods.runtime(node).await.unwrap();
    let netns = c.nodes.netns_path(node).unwrap();
    let mut cmd = tokio::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount --bind "$0" /var/lib || exit 97; n=$1; shift; exec nsenter --net="$n" -- "$@""#)
        .arg(var_lib)
        .arg(&netns)
        .arg(&tool)
        .args(args)
        .env("NETCONFPATH", c.nodes.cni_conf_dir(node))
        .env("CNI_PATH", std::env::join_paths(&runtime.cni_path).unwrap())
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cnitool_runs_add_check_status_gc_and_del_against_the_installed_conflist() {
    let c = cluster("pods-cnitool", 2).await;
    let (node, other) = ("trellis-node-1", "trellis-node-2");
    let ns = "trellis-cnitool";
    let peer = c
        .pods
        .add(&PodSpec::new("peer", other).in_namespace(ns))
        .await
        .unwrap();
    // A pod of the runtime's on the same node, which nothing here may disturb.
    let bystander = c
        .pods
        .add(&PodSpec::new("bystander", node).in_namespace(ns))
        .await
        .unwrap();
    let with_bystander = |live: &BTreeMap<String, IpAddr>| {
        let mut all = live.clone();
        all.insert(bystander.container_id.clone(), bystander.ip().unwrap());
        all
    };
    let target = c.bare_pod(node, ns, "target").await;
    let netns = target.netns_path().display().to_string();
    let var_lib = c.sandbox_dir().join("cnitool-var-lib");
    std::fs::create_dir_all(&var_lib).unwrap();
    let results = var_lib.join("cni/results");
    let host_port = 18080u16;
    let env = [
        (
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=target"),
        ),
        (
            "CAP_ARGS",
            json!({"portMappings": [{"hostPort": host_port, "containerPort": 80, "protocol": "tcp"}]})
                .to_string(),
        ),
    ];

    // ADD: a valid 1.1.0 result (parsed and printed again by libcni), the address from the
    // node's block, really on the pod's eth0.
    let out = cnitool(&c, node, &var_lib, &["add", NETWORK, &netns], &env).await;
    let stdout = ok_or_show(&out, "cnitool add");
    let result: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(result["cniVersion"], "1.1.0", "{result:#}");
    let interfaces = result["interfaces"].as_array().unwrap();
    let (pod_index, pod_if) = interfaces
        .iter()
        .enumerate()
        .find(|(_, i)| i["name"] == "eth0")
        .unwrap_or_else(|| panic!("no eth0 in {result:#}"));
    assert_eq!(pod_if["sandbox"], netns.as_str(), "{result:#}");
    let (mac, mtu, addrs) = pod_eth0(&target.netns).await;
    assert_eq!(pod_if["mac"], mac.as_str(), "{result:#}");
    assert_eq!(
        pod_if["mtu"], mtu,
        "1.1.0 has the interface MTU: {result:#}"
    );
    let host_if = interfaces
        .iter()
        .find(|i| i["name"].as_str().is_some_and(is_host_veth))
        .unwrap_or_else(|| panic!("no host veth in {result:#}"));
    assert!(host_if.get("sandbox").is_none_or(|s| s == ""), "{result:#}");
    let ips = result["ips"].as_array().unwrap();
    assert_eq!(ips.len(), 1, "{result:#}");
    assert_eq!(ips[0]["gateway"], GATEWAY);
    assert_eq!(ips[0]["interface"], pod_index);
    let address = ips[0]["address"].as_str().unwrap();
    let ip: IpAddr = address.strip_suffix("/32").unwrap().parse().unwrap();
    let block = c.block(node).await;
    assert!(in_block(ip, &block), "{ip} in {block}");
    assert_eq!(addrs, [address.to_string()], "on the pod's eth0");
    assert!(
        result["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "0.0.0.0/0" && r["gw"] == GATEWAY),
        "{result:#}"
    );
    // cnitool's container ID (`cnitool-` + a hash of the netns path) from its cache.
    let cached = list_dir(&results);
    assert_eq!(cached.len(), 1, "cnitool cached one result: {cached:?}");
    let entry: Value =
        serde_json::from_slice(&std::fs::read(results.join(cached.first().unwrap())).unwrap())
            .unwrap();
    let container_id = entry["containerId"].as_str().unwrap().to_string();
    assert!(container_id.starts_with("cnitool-"), "{entry}");
    let live = BTreeMap::from([(container_id.clone(), ip)]);
    c.assert_footprint(node, &with_bystander(&live), "after cnitool add")
        .await;
    let record = c
        .footprint(node)
        .await
        .records
        .into_values()
        .find(|r| r["attachment"]["containerID"] == container_id.as_str())
        .unwrap();
    assert_eq!(
        record["pod"]["name"], "target",
        "CNI_ARGS reached the record: {record}"
    );

    // Real traffic: ICMP and TCP from a pod on the other node, and portmap (chained) really
    // maps the hostPort on the node.
    let target_end = End {
        what: format!("cnitool pod {netns}"),
        netns: target.netns_path(),
        ip,
    };
    c.ping(&peer, ip).await;
    tcp_exchange(&End::pod(&peer), &target_end, 0, None).await;
    let rules = c
        .nodes
        .exec(node, &["iptables-save", "-t", "nat"])
        .await
        .unwrap();
    let rules = ok_or_show(&rules, "iptables-save");
    assert!(
        rules.contains(&format!("--dport {host_port}")),
        "portmap's DNAT rule:\n{rules}"
    );
    let other_node = End {
        what: format!("node {other}"),
        netns: c.nodes.netns_path(other).unwrap(),
        ip: IpAddr::V4(c.nodes.underlay_ip(other).unwrap()),
    };
    let node_ip = IpAddr::V4(c.nodes.underlay_ip(node).unwrap());
    tcp_exchange(
        &other_node,
        &target_end,
        80,
        Some(SocketAddr::new(node_ip, host_port)),
    )
    .await;

    // CHECK and STATUS pass.
    let out = cnitool(&c, node, &var_lib, &["check", NETWORK, &netns], &env).await;
    ok_or_show(&out, "cnitool check");
    let out = cnitool(&c, node, &var_lib, &["status", NETWORK, &netns], &env).await;
    ok_or_show(&out, "cnitool status");

    // GC with the attachment still valid keeps it. cnitool cannot say so (below), so this is
    // the sandbox's runtime, libcni's GCNetworkList as containerd calls it: valid attachments
    // cnitool's and the bystander's.
    let valid = [
        Attachment {
            container_id: container_id.clone(),
            ifname: "eth0".into(),
        },
        bystander.attachment(),
    ];
    c.pods
        .gc_keeping(node, &valid)
        .await
        .expect("GC keeping both");
    c.assert_footprint(node, &with_bystander(&live), "after GC keeping it")
        .await;
    let out = cnitool(&c, node, &var_lib, &["check", NETWORK, &netns], &env).await;
    ok_or_show(&out, "cnitool check after GC");
    c.ping(&peer, ip).await;

    // cnitool's own gc passes no valid attachments (cnitool/cmd/gc.go calls GCNetworkList with
    // nil GCArgs): libcni DELs every attachment of the network in its cache (cnitool's own),
    // then runs GC on each plugin without `cni.dev/valid-attachments`. Trellis then collects
    // only orphans: the bystander, which nobody said is stale, survives it.
    let out = cnitool(&c, node, &var_lib, &["gc", NETWORK, &netns], &env).await;
    ok_or_show(&out, "cnitool gc");
    c.assert_footprint(
        node,
        &with_bystander(&BTreeMap::new()),
        "after cnitool gc (libcni DELs cnitool's attachment; the bystander stays)",
    )
    .await;
    c.pods
        .check(&bystander)
        .await
        .expect("the bystander is intact");
    assert!(
        list_dir(&results).is_empty(),
        "libcni uncached what it DELed"
    );

    // DEL: nothing is left, and a second DEL succeeds too.
    let out = cnitool(&c, node, &var_lib, &["del", NETWORK, &netns], &env).await;
    ok_or_show(&out, "cnitool del");
    c.assert_footprint(node, &with_bystander(&BTreeMap::new()), "after cnitool del")
        .await;
    assert!(
        list_dir(&results).is_empty(),
        "cnitool's cache entry is gone"
    );
    let rules = c
        .nodes
        .exec(node, &["iptables-save", "-t", "nat"])
        .await
        .unwrap();
    let rules = ok_or_show(&rules, "iptables-save");
    assert!(
        !rules.contains(&format!("--dport {host_port}")),
        "portmap's rule is gone:\n{rules}"
    );
    let out = cnitool(&c, node, &var_lib, &["del", NETWORK, &netns], &env).await;
    ok_or_show(&out, "cnitool del again");
    let (_, _, addrs) = pod_eth0_or_none(&target.netns).await;
    assert!(addrs.is_empty(), "the pod's eth0 is gone: {addrs:?}");
    // The other pods were never touched.
    c.pods.check(&peer).await.unwrap();
    c.pods.check(&bystander).await.unwrap();
    c.wait_endpoints(node, 1).await;
}

/// [`pod_eth0`], or nothing when the pod has no eth0.
async fn pod_eth0_or_none(netns: &str) -> (String, u64, Vec<String>) {
    let links = datapath::ip_json(netns, &["link", "show"]).await.unwrap();
    if links
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["ifname"] == "eth0")
    {
        pod_eth0(netns).await
    } else {
        (String::new(), 0, Vec::new())
    }
}

// ---------------------------------------------------------------------------------------------
// 3 and 4: each spec version's result; DEL twice, CHECK 101, a stopped agent

/// The installed list with `cniVersion` set to `version`; only the trellis plugin unless
/// `chained` (then portmap after it, as installed).
fn list_for(base: &NetworkConfigList, version: &str, chained: bool) -> NetworkConfigList {
    let mut raw = base.raw.clone();
    raw["cniVersion"] = json!(version);
    if !chained {
        raw["plugins"] = json!([raw["plugins"][0].clone()]);
    }
    NetworkConfigList::parse(
        Path::new(&format!("trellis-{version}.conflist")),
        raw.to_string().as_bytes(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_spec_versions_result_and_the_error_codes_on_a_real_node() {
    let c = cluster("pods-versions", 1).await;
    let node = "trellis-node-1";
    let ns = "trellis-versions";
    let (runtime, installed) = c.runtime(node).await;
    assert_eq!(installed.cni_version, "1.1.0");
    let types: Vec<&str> = installed
        .plugins
        .iter()
        .map(|p| p.plugin_type.as_str())
        .collect();
    assert_eq!(types, ["trellis", "portmap"], "the installed chain");
    let block = c.block(node).await;
    let pod_mtu = c.pod_mtu(node).await;

    // VERSION, from the binary the node installed.
    for version in ["0.4.0", "1.1.0"] {
        let stdin = json!({"cniVersion": version, "name": NETWORK, "type": "trellis"});
        let out = runtime
            .exec(
                "trellis",
                Command::Version,
                stdin.as_object().unwrap(),
                None,
            )
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["supportedVersions"],
            json!(["0.4.0", "1.0.0", "1.1.0"]),
            "{v}"
        );
    }

    // Each version's result, straight from the trellis binary (a list of trellis alone), then
    // through the installed chain (portmap parses and prints it again in that version).
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let pod = c
            .bare_pod(node, ns, &format!("v{}", version.replace('.', "-")))
            .await;
        let rt = pod.runtime_conf();
        let list = list_for(&installed, version, false);
        let result = runtime
            .add(&list, &rt)
            .await
            .unwrap_or_else(|e| panic!("ADD {version}: {e}"));
        let r = &result.raw;
        let what = format!("cniVersion {version}: {r:#}");
        assert_eq!(r["cniVersion"], version, "{what}");
        let ifs = r["interfaces"].as_array().unwrap();
        assert_eq!(ifs.len(), 2, "host veth and pod interface: {what}");
        let (mac, mtu, addrs) = pod_eth0(&pod.netns).await;
        assert!(is_host_veth(ifs[0]["name"].as_str().unwrap()), "{what}");
        assert!(ifs[0].get("sandbox").is_none(), "{what}");
        let host_link = c
            .ip(node, &["link", "show", ifs[0]["name"].as_str().unwrap()])
            .await;
        assert_eq!(
            host_link[0]["address"], ifs[0]["mac"],
            "the host veth's MAC: {what}"
        );
        assert_eq!(ifs[1]["name"], "eth0", "{what}");
        assert_eq!(ifs[1]["mac"], mac.as_str(), "{what}");
        assert_eq!(
            ifs[1]["sandbox"],
            pod.netns_path().display().to_string(),
            "{what}"
        );
        if version == "1.1.0" {
            assert_eq!(
                ifs[1]["mtu"], pod_mtu,
                "1.1.0 has the pod interface's MTU: {what}"
            );
            assert_eq!(mtu, pod_mtu);
        } else {
            assert!(
                ifs[1].get("mtu").is_none(),
                "{version} has no interface MTU: {what}"
            );
        }
        let ips = r["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 1, "{what}");
        if version == "0.4.0" {
            assert_eq!(ips[0]["version"], "4", "0.4.0 has ips[].version: {what}");
        } else {
            assert!(
                ips[0].get("version").is_none(),
                "{version} has no ips[].version: {what}"
            );
        }
        assert_eq!(ips[0]["interface"], 1, "{what}");
        assert_eq!(ips[0]["gateway"], GATEWAY, "{what}");
        let address = ips[0]["address"].as_str().unwrap();
        assert_eq!(addrs, [address.to_string()], "{what}");
        let ip = result.pod_ips()[0];
        assert!(in_block(ip, &block), "{what}");
        assert_eq!(
            r["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": GATEWAY}]),
            "{what}"
        );
        assert_eq!(r["dns"], json!({}), "{what}");
        c.assert_footprint(
            node,
            &BTreeMap::from([(pod.container_id.clone(), ip)]),
            &format!("after ADD {version}"),
        )
        .await;
        runtime
            .check(&list, &rt)
            .await
            .unwrap_or_else(|e| panic!("CHECK {version}: {e}"));
        runtime
            .del(&list, &rt)
            .await
            .unwrap_or_else(|e| panic!("DEL {version}: {e}"));
        c.assert_footprint(node, &BTreeMap::new(), &format!("after DEL {version}"))
            .await;

        // The same version through the chain, as a runtime with such a list runs it.
        let chained = list_for(&installed, version, true);
        let result = runtime
            .add(&chained, &rt)
            .await
            .unwrap_or_else(|e| panic!("chained ADD {version}: {e}"));
        assert_eq!(result.raw["cniVersion"], version, "{:#}", result.raw);
        let ip = result.pod_ips()[0];
        assert!(in_block(ip, &block));
        runtime
            .check(&chained, &rt)
            .await
            .unwrap_or_else(|e| panic!("chained CHECK {version}: {e}"));
        runtime
            .del(&chained, &rt)
            .await
            .unwrap_or_else(|e| panic!("chained DEL {version}: {e}"));
        c.assert_footprint(
            node,
            &BTreeMap::new(),
            &format!("after chained DEL {version}"),
        )
        .await;
        c.forget(&pod).await;
    }

    // A version we do not speak: code 1, nothing allocated; STATUS needs 1.1.0.
    let pod = c.bare_pod(node, ns, "old").await;
    let err = runtime
        .add(&list_for(&installed, "0.3.1", false), &pod.runtime_conf())
        .await
        .unwrap_err();
    assert_eq!(failure(&err).0, 1, "{err}");
    let stdin = json!({"cniVersion": "1.0.0", "name": NETWORK, "type": "trellis"});
    let err = runtime
        .exec("trellis", Command::Status, stdin.as_object().unwrap(), None)
        .await
        .unwrap_err();
    assert_eq!(failure(&err).0, 1, "STATUS with 1.0.0: {err}");
    // A namespace that does not exist: code 3.
    let mut missing = pod.runtime_conf();
    missing.netns = Some(PathBuf::from(format!(
        "{}-missing",
        pod.netns_path().display()
    )));
    let err = runtime.add(&installed, &missing).await.unwrap_err();
    assert_eq!(failure(&err).0, 3, "{err}");
    c.assert_footprint(node, &BTreeMap::new(), "after refused ADDs")
        .await;
    c.forget(&pod).await;

    // DEL twice succeeds, and leaves nothing.
    let p = c
        .pods
        .add(&PodSpec::new("twice", node).in_namespace(ns))
        .await
        .unwrap();
    runtime.del(&installed, &p.runtime_conf()).await.unwrap();
    c.assert_footprint(node, &BTreeMap::new(), "after DEL")
        .await;
    runtime
        .del(&installed, &p.runtime_conf())
        .await
        .expect("a second DEL succeeds");
    assert!(matches!(
        runtime.check(&installed, &p.runtime_conf()).await,
        Err(CniError::NoCachedResult { .. })
    ));
    assert!(
        c.pods.remove(&p).await.unwrap(),
        "a third DEL and the Pod's removal"
    );
    c.assert_footprint(node, &BTreeMap::new(), "after three DELs")
        .await;

    // CHECK after someone deleted the pod's default route: 101, naming the route.
    let p = c
        .pods
        .add(&PodSpec::new("route", node).in_namespace(ns))
        .await
        .unwrap();
    c.pods.check(&p).await.unwrap();
    let out = c
        .pods
        .exec(&p, &["ip", "route", "del", "default"])
        .await
        .unwrap();
    ok_or_show(&out, "ip route del default");
    let err = runtime
        .check(&installed, &p.runtime_conf())
        .await
        .unwrap_err();
    let (code, msg) = failure(&err);
    eprintln!("CHECK after the route was deleted: {err}");
    assert_eq!(code, 101, "{err}");
    assert!(
        msg.contains("default route") && msg.contains(GATEWAY) && msg.contains(&p.netns),
        "the message names the route and the namespace: {msg}"
    );
    assert!(c.pods.remove(&p).await.unwrap(), "DEL of the broken pod");
    c.assert_footprint(node, &BTreeMap::new(), "after removing the broken pod")
        .await;

    // trellis-node stopped: STATUS 50, ADD, CHECK and DEL 11; started again: all succeed.
    let kept = c
        .pods
        .add(&PodSpec::new("kept", node).in_namespace(ns))
        .await
        .unwrap();
    let late = c.bare_pod(node, ns, "late").await;
    let ended = c.nodes.stop_agent(node).await.unwrap();
    assert!(ended.is_some(), "an agent was running");
    let err = runtime.status(&installed).await.unwrap_err();
    let (code, msg) = failure(&err);
    eprintln!("STATUS without trellis-node: {err}");
    assert_eq!(code, 50, "STATUS without trellis-node: {err}");
    assert!(msg.contains("cni.sock"), "names the socket: {msg}");
    let err = runtime
        .add(&installed, &late.runtime_conf())
        .await
        .unwrap_err();
    eprintln!("ADD without trellis-node: {err}");
    assert_eq!(failure(&err).0, 11, "ADD without trellis-node: {err}");
    let err = runtime
        .check(&installed, &kept.runtime_conf())
        .await
        .unwrap_err();
    assert_eq!(failure(&err).0, 11, "CHECK without trellis-node: {err}");
    let err = runtime
        .del(&installed, &late.runtime_conf())
        .await
        .unwrap_err();
    assert_eq!(failure(&err).0, 11, "DEL without trellis-node: {err}");

    c.nodes.start_agent(node).await.unwrap();
    wait_for("STATUS to pass again", TIMEOUT, || async {
        runtime.status(&installed).await.ok()
    })
    .await;
    // What a runtime does with a failed ADD: DEL, then ADD again.
    runtime.del(&installed, &late.runtime_conf()).await.unwrap();
    let result = runtime.add(&installed, &late.runtime_conf()).await.unwrap();
    let late_ip = result.pod_ips()[0];
    c.pods
        .check(&kept)
        .await
        .expect("the restarted agent kept the pod");
    runtime
        .check(&installed, &late.runtime_conf())
        .await
        .unwrap();
    c.assert_footprint(
        node,
        &BTreeMap::from([
            (kept.container_id.clone(), kept.ip().unwrap()),
            (late.container_id.clone(), late_ip),
        ]),
        "after the restart",
    )
    .await;
    c.ping(&kept, late_ip).await;
    tcp_exchange(
        &End::pod(&kept),
        &End {
            what: "late".into(),
            netns: late.netns_path(),
            ip: late_ip,
        },
        0,
        None,
    )
    .await;
    c.wait_endpoints(node, 2).await;
    runtime.del(&installed, &late.runtime_conf()).await.unwrap();
    c.forget(&late).await;
    assert!(c.pods.remove(&kept).await.unwrap());
    c.assert_footprint(node, &BTreeMap::new(), "at the end")
        .await;
}

// ---------------------------------------------------------------------------------------------
// 6 and 7: trellis-node killed during ADDs; GC after a runtime forgot pods

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_during_adds_and_gc_after_a_runtime_crash_leak_nothing() {
    let c = cluster("pods-crash", 2).await;
    let (node, other) = ("trellis-node-1", "trellis-node-2");
    let ns = "trellis-crash";
    let peer = c
        .pods
        .add(&PodSpec::new("peer", other).in_namespace(ns))
        .await
        .unwrap();
    let (runtime, list) = c.runtime(node).await;
    let ipam_dir = c.nodes.node_dirs(node).state.join("ipam");
    let endpoints_dir = c.nodes.node_dirs(node).state.join("endpoints");
    assert!(list_dir(&ipam_dir).is_empty());
    let ready_records = || {
        list_dir(&endpoints_dir)
            .iter()
            .filter_map(|name| std::fs::read(endpoints_dir.join(name)).ok())
            .filter_map(|b| serde_json::from_slice::<Value>(&b).ok())
            .filter(|r| r["phase"] == "Ready")
            .count()
    };
    let mut live: BTreeMap<String, IpAddr> = BTreeMap::new();
    let mut crash: Vec<Pod> = Vec::new();

    // Two rounds of 10 ADDs at once, each ended by a SIGKILL of the agent: "early" as soon as
    // three addresses are allocated (ADDs between allocation, record and veth), "late" as
    // soon as one ADD is Ready on the node (others half way or waiting their turn).
    for (round, prefix) in [("early", "c"), ("late", "d")] {
        let names: Vec<String> = (0..10).map(|i| format!("{prefix}{i}")).collect();
        let pods: Vec<Pod> = join_all(names.iter().map(|name| c.bare_pod(node, ns, name))).await;
        let adds: Vec<_> = pods
            .iter()
            .map(|pod| {
                let (runtime, list, rt) = (runtime.clone(), list.clone(), pod.runtime_conf());
                tokio::spawn(async move { runtime.add(&list, &rt).await })
            })
            .collect();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let reached = adds.iter().any(tokio::task::JoinHandle::is_finished)
                || match round {
                    "early" => list_dir(&ipam_dir).len() >= live.len() + 3,
                    _ => ready_records() > live.len(),
                };
            if reached {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{round}: no ADD got going within {TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let killed = c.nodes.kill_agent(node).await.unwrap();
        assert_eq!(killed.outcome, process::Outcome::Killed, "{killed:?}");
        let at_kill = c.footprint(node).await;
        let adding = at_kill
            .records
            .values()
            .filter(|r| r["phase"] == "Adding")
            .count();
        let tmp = at_kill
            .records
            .keys()
            .chain(&at_kill.ipam)
            .filter(|name| name.ends_with(".tmp"))
            .count();
        let outcomes: Vec<Result<CniResult, CniError>> = join_all(adds)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let mut failed = Vec::new();
        for (pod, outcome) in pods.iter().zip(&outcomes) {
            match outcome {
                Ok(result) => {
                    live.insert(pod.container_id.clone(), result.pod_ips()[0]);
                }
                Err(e) => {
                    assert_eq!(
                        failure(e).0,
                        11,
                        "{round}: {}: an interrupted ADD says try again: {e}",
                        pod.key()
                    );
                    failed.push(pod);
                }
            }
        }
        eprintln!(
            "{round} SIGKILL during 10 ADDs: {} failed with code 11; the node held {} allocation \
             files, {} record files ({adding} Adding, {tmp} half-written .tmp), {} host veths, \
             {} temporary peers",
            failed.len(),
            at_kill.ipam.len(),
            at_kill.records.len(),
            at_kill.veths.len(),
            at_kill.temp_peers.len()
        );
        if round == "early" {
            assert!(
                !failed.is_empty(),
                "{round}: the kill interrupted no ADD (all finished first)"
            );
        }

        // Restarted, the agent rolls back what was half made; whatever it kept is consistent
        // and holds every ADD that succeeded.
        c.nodes.start_agent(node).await.unwrap();
        wait_for(
            &format!("{round}: STATUS to pass after the restart"),
            TIMEOUT,
            || async { runtime.status(&list).await.ok() },
        )
        .await;
        let fp = c.footprint(node).await;
        let kept: BTreeMap<String, IpAddr> = fp
            .records
            .values()
            .map(|r| {
                let ip = r["addresses"][0]
                    .as_str()
                    .unwrap()
                    .strip_suffix("/32")
                    .unwrap();
                (
                    r["attachment"]["containerID"].as_str().unwrap().to_string(),
                    ip.parse().unwrap(),
                )
            })
            .collect();
        assert!(
            live.iter().all(|(id, ip)| kept.get(id) == Some(ip)),
            "{round}: every successful ADD survived the restart: {live:?} in {fp:#?}"
        );
        c.assert_footprint(
            node,
            &kept,
            &format!("{round}: after the restart, before any retry"),
        )
        .await;

        // What a runtime does with a failed ADD: DEL, then ADD again. All succeed.
        for pod in failed {
            runtime
                .del(&list, &pod.runtime_conf())
                .await
                .unwrap_or_else(|e| panic!("{round}: DEL {} after the restart: {e}", pod.key()));
            let result = runtime
                .add(&list, &pod.runtime_conf())
                .await
                .unwrap_or_else(|e| panic!("{round}: ADD {} again: {e}", pod.key()));
            live.insert(pod.container_id.clone(), result.pod_ips()[0]);
        }
        crash.extend(pods);
        assert_eq!(live.len(), crash.len());
        let distinct: BTreeSet<&IpAddr> = live.values().collect();
        assert_eq!(distinct.len(), live.len(), "distinct addresses: {live:?}");
        c.assert_footprint(node, &live, &format!("{round}: after the retries"))
            .await;
        c.wait_endpoints(node, live.len()).await;
        for pod in &crash {
            runtime
                .check(&list, &pod.runtime_conf())
                .await
                .unwrap_or_else(|e| panic!("{round}: CHECK {}: {e}", pod.key()));
            c.ping(&peer, live[&pod.container_id]).await;
        }
    }

    // GC after a runtime crash. Of the 20, the runtime forgot four:
    // c0, c1: namespace, record and results cache gone (only the plugin's GC can find them);
    // c2: namespace and record gone, its cache entry left (the runtime's GC DELs it);
    // c3: namespace still there, but its cache entry gone and not in the valid list (the
    //     plugin's GC must take a live veth, route, record and address).
    for pod in &crash[..3] {
        c.forget(pod).await;
    }
    for pod in [&crash[0], &crash[1], &crash[3]] {
        let entry = runtime
            .cache_dir
            .join("results")
            .join(format!("{}-{}-{}", list.name, pod.container_id, pod.ifname));
        std::fs::remove_file(&entry).unwrap();
    }
    let kept: Vec<&Pod> = crash[4..].iter().collect();
    let valid: Vec<Attachment> = kept.iter().map(|p| p.attachment()).collect();
    let before = c.footprint(node).await;
    assert_eq!(
        before.records.len(),
        crash.len(),
        "the forgotten pods' records are still there"
    );
    assert_eq!(before.ipam.len(), crash.len(), "and their addresses");
    c.pods.gc_keeping(node, &valid).await.expect("GC");
    live.retain(|id, _| kept.iter().any(|p| p.container_id == *id));
    c.assert_footprint(node, &live, "after GC").await;
    c.wait_endpoints(node, kept.len()).await;
    let cached: BTreeSet<String> = runtime
        .cached_attachments()
        .unwrap()
        .into_iter()
        .map(|a| a.container_id)
        .collect();
    let kept_ids: BTreeSet<String> = kept.iter().map(|p| p.container_id.clone()).collect();
    assert_eq!(
        cached, kept_ids,
        "the runtime's cache holds the kept pods only"
    );
    let (_, _, addrs) = pod_eth0_or_none(&crash[3].netns).await;
    assert!(
        addrs.is_empty(),
        "GC took c3's eth0 with its endpoint: {addrs:?}"
    );
    c.forget(&crash[3]).await;

    // The kept pods still pass CHECK and reach each other and the other node's pod.
    for pod in &kept {
        runtime
            .check(&list, &pod.runtime_conf())
            .await
            .unwrap_or_else(|e| panic!("CHECK {} after GC: {e}", pod.key()));
    }
    let ends: Vec<End> = kept
        .iter()
        .map(|p| End {
            what: p.key().to_string(),
            netns: p.netns_path(),
            ip: live[&p.container_id],
        })
        .collect();
    for to in &ends[1..] {
        c.ping(kept[0], to.ip).await;
    }
    for to in &ends {
        c.ping(&peer, to.ip).await;
    }
    tcp_exchange(&ends[0], &ends[1], 0, None).await;
    udp_exchange(&End::pod(&peer), &ends[2]).await;

    // And DEL of all of them leaves the node empty.
    for pod in &kept {
        runtime.del(&list, &pod.runtime_conf()).await.unwrap();
        c.forget(pod).await;
    }
    c.assert_footprint(node, &BTreeMap::new(), "at the end")
        .await;
    c.wait_endpoints(node, 0).await;
    assert!(c.pods.remove(&peer).await.unwrap());
    c.assert_footprint(other, &BTreeMap::new(), "at the end")
        .await;
}

/// Whether `fp` is exactly the endpoints `live` (see `Cluster::assert_footprint`).
fn footprint_holds(fp: &Footprint, live: &BTreeMap<String, IpAddr>) -> bool {
    let ips: BTreeSet<String> = live.values().map(ToString::to_string).collect();
    let records: BTreeMap<String, (String, Vec<String>, String)> = fp
        .records
        .values()
        .map(|r| {
            (
                r["attachment"]["containerID"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
                (
                    r["phase"].as_str().unwrap_or("?").to_string(),
                    r["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| a.as_str().unwrap_or("?").to_string())
                        .collect(),
                    r["hostIfname"].as_str().unwrap_or("?").to_string(),
                ),
            )
        })
        .collect();
    let want_records: BTreeMap<String, (String, Vec<String>)> = live
        .iter()
        .map(|(id, ip)| (id.clone(), ("Ready".to_string(), vec![format!("{ip}/32")])))
        .collect();
    let got_records: BTreeMap<String, (String, Vec<String>)> = records
        .iter()
        .map(|(id, (phase, addrs, _))| (id.clone(), (phase.clone(), addrs.clone())))
        .collect();
    let record_veths: BTreeSet<String> = records.values().map(|r| r.2.clone()).collect();
    let want_routes: BTreeSet<String> = ips.clone();
    ips.len() == live.len()
        && fp.ipam == ips
        && fp.records.len() == live.len()
        && got_records == want_records
        && fp.veths == record_veths
        && fp.veths.len() == live.len()
        && fp.temp_peers.is_empty()
        && fp.routes == want_routes
}
