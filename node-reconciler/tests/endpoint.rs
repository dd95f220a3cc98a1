//! Pod endpoints against a real kernel: the endpoint service of
//! `trellis-node` in a fake node (a network namespace) with pods (more
//! namespaces), fed node facts by hand instead of an apiserver. Every result
//! is checked independently with `ip -j`, and with real pings.
//!
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN for setns). Each test makes its
//! namespaces `trellis-ept-<random>-host` and `trellis-ept-<random>-p<n>`
//! and deletes them by name when it ends, also when it fails. Traffic stays
//! inside them.

// Test-only helpers: a panic here is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use ipnet::IpNet;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;
use trellis_cni::proto::{
    Attachment, Command, Endpoint, GATEWAY_V4, GATEWAY_V6, PROTOCOL_VERSION, Request, Response,
    code,
};
use trellis_node::endpoint::record::{Phase, RECORD_VERSION, Record};
use trellis_node::endpoint::server::Server;
use trellis_node::endpoint::{Endpoints, NodeFacts, naming};
use trellis_node::metrics::Metrics;
use trellis_node::netns::NetnsHandle;
use trellis_node::observe::observe;

mod fixtures;
use fixtures::netns::{Netns, run};

const POD_MTU: u32 = 1400;

// ---------------------------------------------------------------- fixtures

impl Netns {
    /// `ip -n NAME -j ARGS…`, parsed.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["ip", "-n", &self.name, "-j"];
        all.extend_from_slice(args);
        let out = run(&all);
        if out.trim().is_empty() {
            return Value::Array(vec![]);
        }
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{all:?}: {e}: {out}"))
    }

    /// `ip netns exec NAME CMD…`.
    fn exec(&self, cmd: &[&str]) -> Output {
        Process::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .unwrap()
    }

    fn ping(&self, ip: IpAddr) -> bool {
        self.exec(&["ping", "-c", "1", "-W", "2", "-q", &ip.to_string()])
            .status
            .success()
    }

    /// Names of the links in the namespace.
    fn links(&self) -> Vec<String> {
        self.json(&["link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// A namespace of these tests: `trellis-ept-…`, so a leftover is told apart.
fn ept_netns(name: String) -> Netns {
    assert!(name.starts_with("trellis-ept-"), "{name}");
    Netns::new(name)
}

/// Six hex digits, different per test and per run.
fn tag() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:06x}",
        (nanos ^ (std::process::id() << 12) ^ (n << 20)) & 0xff_ffff
    )
}

/// STATUS as (ready, limited, message).
fn status_of(node: &Node) -> (bool, bool, String) {
    match node.endpoints().status() {
        Response::Status {
            ready,
            limited,
            message,
        } => (ready, limited, message),
        other => panic!("STATUS answered {other:?}"),
    }
}

fn facts(blocks: &[&str]) -> NodeFacts {
    NodeFacts {
        blocks: blocks.iter().map(|b| b.parse().unwrap()).collect(),
        pod_mtu: POD_MTU,
        ready: true,
    }
}

/// A fake node: its namespace (with 192.0.2.1 and fd00:ffff::1 on lo, the
/// source of its own pings), a state directory and the endpoint service.
struct Node {
    tag: String,
    host: Netns,
    state: tempfile::TempDir,
    facts: watch::Sender<Option<NodeFacts>>,
    endpoints: Option<Arc<Endpoints>>,
}

impl Node {
    async fn new(blocks: &[&str]) -> Node {
        let tag = tag();
        let host = ept_netns(format!("trellis-ept-{tag}-host"));
        host.ip(&["addr", "add", "192.0.2.1/32", "dev", "lo"]);
        host.ip(&["addr", "add", "fd00:ffff::1/128", "dev", "lo"]);
        let state = tempfile::Builder::new()
            .prefix("trellis-ept-")
            .tempdir()
            .unwrap();
        let (facts, _) = watch::channel(Some(facts(blocks)));
        let mut node = Node {
            tag,
            host,
            state,
            facts,
            endpoints: None,
        };
        node.start().await;
        node
    }

    /// Opens the endpoint service (recovery included), as a start does.
    async fn start(&mut self) {
        let path = PathBuf::from(self.host.path());
        let handle = tokio::task::spawn_blocking(move || NetnsHandle::new(Some(&path)))
            .await
            .unwrap()
            .unwrap();
        let endpoints = Endpoints::open(
            self.state.path(),
            Arc::new(handle),
            self.facts.subscribe(),
            Metrics::new(),
        )
        .await
        .unwrap();
        self.endpoints = Some(Arc::new(endpoints));
    }

    /// Stops the service as a crash would: nothing is cleaned up.
    async fn stop(&mut self) {
        let endpoints = self.endpoints.take().unwrap();
        let endpoints = Arc::into_inner(endpoints).expect("no other user of the service");
        tokio::task::spawn_blocking(move || drop(endpoints))
            .await
            .unwrap();
    }

    fn endpoints(&self) -> &Endpoints {
        self.endpoints.as_ref().unwrap()
    }

    fn pod(&self, n: usize) -> Netns {
        ept_netns(format!("trellis-ept-{}-p{n}", self.tag))
    }

    fn att(&self, n: usize) -> Attachment {
        Attachment {
            container_id: format!("ctr-{}-{n}", self.tag),
            ifname: "eth0".into(),
        }
    }

    async fn add(&self, n: usize, netns: &str) -> Response {
        self.endpoints()
            .handle(Command::Add {
                attachment: self.att(n),
                netns: netns.to_owned(),
                pod: None,
            })
            .await
    }

    async fn check(&self, n: usize, netns: &str) -> Response {
        self.endpoints()
            .handle(Command::Check {
                attachment: self.att(n),
                netns: netns.to_owned(),
            })
            .await
    }

    async fn del(&self, n: usize) -> Response {
        self.endpoints()
            .handle(Command::Del {
                attachment: self.att(n),
                netns: None,
            })
            .await
    }

    /// Files in `<state>/<dir>`.
    fn files(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.state.path().join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Links that look like ours: host veths and temporary peers.
    fn our_links(&self) -> Vec<String> {
        self.host
            .links()
            .into_iter()
            .filter(|n| n.starts_with("trellis") || n.starts_with("trltmp"))
            .collect()
    }

    /// Routes with protocol 211, both families.
    fn endpoint_routes(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for family in ["-4", "-6"] {
            let routes = self
                .host
                .json(&[family, "-d", "route", "show", "table", "main"]);
            out.extend(
                routes
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|r| r["protocol"] == "211")
                    .cloned(),
            );
        }
        out
    }

    /// Nothing of any endpoint is left once every answered DEL has
    /// finished: no record, allocation, link or route.
    async fn assert_empty(&self) {
        self.endpoints().settled().await;
        assert_eq!(self.files("endpoints"), Vec::<String>::new(), "records");
        assert_eq!(self.files("ipam"), Vec::<String>::new(), "allocations");
        assert_eq!(self.our_links(), Vec::<String>::new(), "links");
        assert_eq!(self.endpoint_routes(), Vec::<Value>::new(), "routes");
    }
}

fn added(r: Response) -> Endpoint {
    match r {
        Response::Added { endpoint } => endpoint,
        other => panic!("expected Added, got {other:?}"),
    }
}

/// The error's message, asserting its code.
fn error(r: Response, want: u32) -> String {
    match r {
        Response::Error(e) => {
            assert_eq!(e.code, want, "{}", e.msg);
            e.msg
        }
        other => panic!("expected error {want}, got {other:?}"),
    }
}

fn v4(ep: &Endpoint) -> IpAddr {
    ep.addresses
        .iter()
        .find(|a| a.addr().is_ipv4())
        .unwrap()
        .addr()
}

fn v6(ep: &Endpoint) -> IpAddr {
    ep.addresses
        .iter()
        .find(|a| a.addr().is_ipv6())
        .unwrap()
        .addr()
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// The endpoint as `ip -j` shows it in both namespaces.
fn assert_in_kernel(node: &Node, pod: &Netns, ep: &Endpoint) {
    // Host side: the veth, up, with the pod MTU and the recorded MAC.
    let link = &node.host.json(&["-d", "link", "show", &ep.host_ifname])[0];
    assert_eq!(link["mtu"], POD_MTU, "{link}");
    assert_eq!(link["address"], ep.host_mac.as_str(), "{link}");
    assert!(
        link["flags"].as_array().unwrap().contains(&"UP".into()),
        "{link}"
    );
    let routes = node.endpoint_routes();
    let neigh = node.host.json(&["neigh", "show", "dev", &ep.host_ifname]);
    for address in &ep.addresses {
        let ip = address.addr().to_string();
        let route = routes
            .iter()
            .find(|r| r["dst"] == ip.as_str())
            .unwrap_or_else(|| panic!("no protocol-211 route to {ip}: {routes:?}"));
        assert_eq!(route["dev"], ep.host_ifname.as_str(), "{route}");
        if address.addr().is_ipv4() {
            assert_eq!(route["scope"], "link", "{route}");
        }
        let entry = neigh
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["dst"] == ip.as_str())
            .unwrap_or_else(|| panic!("no neighbour {ip} on the host veth: {neigh}"));
        assert_eq!(entry["lladdr"], ep.mac.as_str(), "{entry}");
        assert_eq!(entry["state"], serde_json::json!(["PERMANENT"]), "{entry}");
    }

    // Pod side.
    let link = &pod.json(&["-d", "link", "show", "eth0"])[0];
    assert_eq!(link["mtu"], POD_MTU, "{link}");
    assert_eq!(link["address"], ep.mac.as_str(), "{link}");
    assert!(
        link["flags"].as_array().unwrap().contains(&"UP".into()),
        "{link}"
    );
    let addrs = &pod.json(&["addr", "show", "dev", "eth0"])[0]["addr_info"];
    for address in &ep.addresses {
        let found = addrs.as_array().unwrap().iter().any(|a| {
            a["local"] == address.addr().to_string().as_str()
                && a["prefixlen"] == address.prefix_len()
        });
        assert!(found, "{address} not on eth0: {addrs}");
    }
    let default4 = &pod.json(&["-4", "route", "show", "default"])[0];
    assert_eq!(
        default4["gateway"],
        GATEWAY_V4.to_string().as_str(),
        "{default4}"
    );
    assert_eq!(default4["dev"], "eth0", "{default4}");
    assert!(
        default4["flags"]
            .as_array()
            .is_some_and(|f| f.contains(&"onlink".into())),
        "{default4}"
    );
    let default6 = &pod.json(&["-6", "route", "show", "default"])[0];
    assert_eq!(
        default6["gateway"],
        GATEWAY_V6.to_string().as_str(),
        "{default6}"
    );
    assert_eq!(default6["dev"], "eth0", "{default6}");
    let neigh = pod.json(&["neigh", "show", "dev", "eth0"]);
    for gw in [GATEWAY_V4.to_string(), GATEWAY_V6.to_string()] {
        let entry = neigh
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["dst"] == gw.as_str())
            .unwrap_or_else(|| panic!("no gateway neighbour {gw} in the pod: {neigh}"));
        assert_eq!(entry["lladdr"], ep.host_mac.as_str(), "{entry}");
        assert_eq!(entry["state"], serde_json::json!(["PERMANENT"]), "{entry}");
    }
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_plugs_pods_in_check_sees_hand_edits_del_leaves_nothing() {
    let node = Node::new(&["10.244.1.0/24", "fd00:10:244:1::/120"]).await;
    let (p1, p2) = (node.pod(1), node.pod(2));
    assert!(status_of(&node).0, "facts with a block: ready");

    let own_forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let e1 = added(node.add(1, &p1.path()).await);
    let e2 = added(node.add(2, &p2.path()).await);
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        own_forwarding,
        "forwarding is set in the node's namespace only, not in the test's own"
    );
    assert_eq!(
        e1.addresses,
        nets(&["10.244.1.1/32", "fd00:10:244:1::1/128"]),
        "the network address (the VTEP's) is never handed out"
    );
    assert_eq!(
        e2.addresses,
        nets(&["10.244.1.2/32", "fd00:10:244:1::2/128"])
    );
    assert_eq!(e1.host_ifname, naming::host_ifname(&node.att(1)));
    assert_eq!((e1.mtu, e1.netns.as_str()), (POD_MTU, p1.path().as_str()));
    for (pod, ep) in [(&p1, &e1), (&p2, &e2)] {
        assert_in_kernel(&node, pod, ep);
    }
    assert_eq!(
        String::from_utf8(
            node.host
                .exec(&["cat", "/proc/sys/net/ipv4/ip_forward"])
                .stdout
        )
        .unwrap()
        .trim(),
        "1",
        "forwarding turned on in the node's namespace"
    );
    assert_eq!(
        *node.endpoints().ready_endpoints().borrow(),
        2,
        "two Ready endpoints counted"
    );

    // Real traffic: pod to pod across the node's forwarding, both families,
    // and the node to its pods.
    assert!(p1.ping(v4(&e2)), "pod 1 → pod 2 (IPv4)");
    assert!(p2.ping(v4(&e1)), "pod 2 → pod 1 (IPv4)");
    assert!(p1.ping(v6(&e2)), "pod 1 → pod 2 (IPv6)");
    assert!(node.host.ping(v4(&e1)), "node → pod 1 (IPv4)");
    assert!(node.host.ping(v6(&e2)), "node → pod 2 (IPv6)");

    // CHECK agrees with the kernel.
    match node.check(1, &p1.path()).await {
        Response::Checked { endpoint } => assert_eq!(endpoint, e1),
        other => panic!("{other:?}"),
    }

    // The overlay reconciler's view of the node holds none of it: it only
    // sees protocol 210 and its own VXLAN device.
    let path = PathBuf::from(node.host.path());
    let handle = tokio::task::spawn_blocking(move || NetnsHandle::new(Some(&path)))
        .await
        .unwrap()
        .unwrap();
    let snapshot = handle
        .run(|h| async move {
            observe(&h, "192.0.2.1".parse().unwrap())
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap()
        .unwrap();
    assert!(
        snapshot.observed.routes.is_empty(),
        "{:?}",
        snapshot.observed
    );
    assert!(
        snapshot.observed.neighbours.is_empty(),
        "{:?}",
        snapshot.observed
    );
    tokio::task::spawn_blocking(move || drop(handle))
        .await
        .unwrap();

    // Someone deletes pod 1's default route: CHECK names it.
    p1.ip(&["-4", "route", "del", "default"]);
    let msg = error(node.check(1, &p1.path()).await, code::ENDPOINT_MISMATCH);
    assert!(
        msg.contains(&format!(
            "pod default route via 169.254.1.1 is missing in {}",
            p1.path()
        )),
        "{msg}"
    );
    // ... and a CHECK with another namespace than the ADD's.
    let msg = error(node.check(2, &p1.path()).await, code::ENDPOINT_MISMATCH);
    assert!(msg.contains("not in"), "{msg}");

    // The runtime retries ADD for pod 2: made again from scratch, with
    // the next addresses (round robin), the old ones released.
    let e2b = added(node.add(2, &p2.path()).await);
    assert_eq!(
        e2b.addresses,
        nets(&["10.244.1.3/32", "fd00:10:244:1::3/128"])
    );
    assert_in_kernel(&node, &p2, &e2b);
    assert_eq!(
        node.files("ipam"),
        [
            "10.244.1.1",
            "10.244.1.3",
            "fd00:10:244:1::1",
            "fd00:10:244:1::3"
        ]
    );
    assert_eq!(node.our_links().len(), 2, "{:?}", node.our_links());
    assert!(node.host.ping(v4(&e2b)));

    // DEL answers once the pod is unreachable: its routes are gone, its
    // record (if still there) says Deleting, and its addresses are not
    // free until the rest is gone.
    assert_eq!(node.del(1).await, Response::Deleted);
    let routes = node.endpoint_routes();
    assert!(
        !routes
            .iter()
            .any(|r| r["dst"] == v4(&e1).to_string().as_str()),
        "{routes:?}"
    );
    let record = node
        .state
        .path()
        .join("endpoints")
        .join(naming::record_file_name(&node.att(1)));
    let ipam = node.files("ipam");
    match std::fs::read(&record) {
        Ok(bytes) => {
            let r: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(r["phase"], "Deleting", "{r}");
            assert!(ipam.contains(&v4(&e1).to_string()), "{ipam:?}");
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
    }
    // The second DEL waits for the first to finish, and finds nothing.
    assert_eq!(node.del(1).await, Response::Deleted);
    assert!(!node.our_links().contains(&e1.host_ifname));
    assert!(
        !p1.links().contains(&"eth0".to_owned()),
        "the peer went too"
    );
    let routes = node.endpoint_routes();
    assert!(
        !routes
            .iter()
            .any(|r| r["dst"] == v4(&e1).to_string().as_str()),
        "{routes:?}"
    );
    assert_eq!(node.files("endpoints").len(), 1);
    assert_eq!(node.files("ipam"), ["10.244.1.3", "fd00:10:244:1::3"]);
    assert_eq!(
        error(node.check(1, &p1.path()).await, code::UNKNOWN_CONTAINER),
        format!(
            "no endpoint for container {} interface eth0",
            node.att(1).container_id
        )
    );
    // Pod 2 is untouched by pod 1's DEL.
    match node.check(2, &p2.path()).await {
        Response::Checked { endpoint } => assert_eq!(endpoint, e2b),
        other => panic!("{other:?}"),
    }

    assert_eq!(node.del(2).await, Response::Deleted);
    node.assert_empty().await;
    assert_eq!(*node.endpoints().ready_endpoints().borrow(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_add_leaves_nothing_and_says_why() {
    let node = Node::new(&["10.244.1.0/30"]).await;
    let (pa, pb, pc) = (node.pod(1), node.pod(2), node.pod(3));

    // No facts yet, then no block: try again later.
    node.facts.send_replace(None);
    let msg = error(node.add(1, &pa.path()).await, code::TRY_AGAIN_LATER);
    assert!(msg.contains("not reconciled"), "{msg}");
    assert!(!status_of(&node).0);
    node.facts.send_replace(Some(facts(&[])));
    let msg = error(node.add(1, &pa.path()).await, code::TRY_AGAIN_LATER);
    assert!(msg.contains("no pod address block"), "{msg}");
    let (ready, limited, why) = status_of(&node);
    assert!(
        !ready && !limited && why.contains("no pod address block"),
        "{why}"
    );
    // A block, but the overlay did not converge: pods there may have limited
    // connectivity (the spec's 51, not 50).
    node.facts.send_replace(Some(NodeFacts {
        ready: false,
        ..facts(&["10.244.1.0/30"])
    }));
    let (ready, limited, why) = status_of(&node);
    assert!(
        !ready && limited && why.contains("did not converge"),
        "{why}"
    );
    node.facts.send_replace(Some(facts(&["10.244.1.0/30"])));
    assert_eq!(status_of(&node), (true, false, String::new()));
    node.assert_empty().await;

    // A namespace path that does not exist: unknown container, named.
    let missing = format!("/run/netns/trellis-ept-{}-missing", node.tag);
    let msg = error(node.add(1, &missing).await, code::UNKNOWN_CONTAINER);
    assert!(msg.contains(&missing), "{msg}");
    node.assert_empty().await;
    // A file that is no namespace.
    let not_ns = node.state.path().join("lock");
    let msg = error(
        node.add(1, not_ns.to_str().unwrap()).await,
        code::UNKNOWN_CONTAINER,
    );
    assert!(msg.contains("network namespace"), "{msg}");
    node.assert_empty().await;

    // The pod already has an eth0: the pair, whose pod side is created in
    // the pod's namespace under that name, cannot be made; the error says
    // why and nothing is left behind.
    pa.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "trlstest0",
    ]);
    let msg = error(node.add(1, &pa.path()).await, code::INTERNAL);
    assert!(
        msg.contains("the pod's namespace already has an interface named eth0"),
        "{msg}"
    );
    node.assert_empty().await;
    assert_eq!(
        pa.links().iter().filter(|l| l.as_str() != "lo").count(),
        2,
        "only the pod's own pair: {:?}",
        pa.links()
    );
    pa.ip(&["link", "del", "eth0"]);

    // Invalid attachment: refused before anything is touched.
    let bad = node
        .endpoints()
        .handle(Command::Add {
            attachment: Attachment {
                container_id: "../../etc".into(),
                ifname: "eth0".into(),
            },
            netns: pa.path(),
            pod: None,
        })
        .await;
    error(bad, code::INVALID_ENVIRONMENT);

    // A /30 has two addresses for pods (no network, no broadcast address);
    // the third ADD names the block. Round robin: the rolled-back ADD took
    // .1 last, so .2 comes first.
    let a = added(node.add(1, &pa.path()).await);
    let b = added(node.add(2, &pb.path()).await);
    assert_eq!(
        (v4(&a).to_string(), v4(&b).to_string()),
        ("10.244.1.2".into(), "10.244.1.1".into()),
    );
    let msg = error(node.add(3, &pc.path()).await, code::ADDRESSES_EXHAUSTED);
    assert!(msg.contains("10.244.1.0/30"), "{msg}");
    assert_eq!(node.files("ipam"), ["10.244.1.1", "10.244.1.2"]);
    assert_eq!(node.our_links().len(), 2);
    assert!(!pc.links().contains(&"eth0".to_owned()));

    // The block is removed from the node: its addresses are never handed
    // out again, even once free.
    node.facts.send_replace(Some(facts(&["10.244.7.0/30"])));
    assert_eq!(node.del(1).await, Response::Deleted);
    let c = added(node.add(3, &pc.path()).await);
    assert_eq!(v4(&c).to_string(), "10.244.7.1");

    for n in [2, 3] {
        assert_eq!(node.del(n).await, Response::Deleted);
    }
    node.assert_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_rolls_back_what_a_crash_left_and_keeps_the_rest() {
    let mut node = Node::new(&["10.244.1.0/24"]).await;
    let (p1, p2) = (node.pod(1), node.pod(2));
    let kept = added(node.add(1, &p1.path()).await);
    node.stop().await;

    // What a crash in the middle of an ADD leaves: a record still Adding,
    // its allocation and its veth pair.
    let crashed = Attachment {
        container_id: format!("crashed-{}", node.tag),
        ifname: "eth0".into(),
    };
    let crashed_link = naming::host_ifname(&crashed);
    let record = Record {
        version: RECORD_VERSION,
        phase: Phase::Adding,
        attachment: crashed.clone(),
        netns: p2.path(),
        pod: None,
        host_ifname: crashed_link.clone(),
        addresses: nets(&["10.244.1.77/32"]),
        mtu: POD_MTU,
        host_mac: None,
        mac: None,
    };
    let state = node.state.path().to_path_buf();
    std::fs::write(
        state
            .join("endpoints")
            .join(naming::record_file_name(&crashed)),
        record.encode(),
    )
    .unwrap();
    std::fs::write(
        state.join("ipam/10.244.1.77"),
        serde_json::to_vec(&crashed).unwrap(),
    )
    .unwrap();
    node.host.ip(&[
        "link",
        "add",
        &crashed_link,
        "type",
        "veth",
        "peer",
        "name",
        &naming::temp_ifname(&crashed),
    ]);
    // What a crash right after a DEL's answer leaves: a record Deleting,
    // its allocation and its veth (routes already gone).
    let deleted = Attachment {
        container_id: format!("deleted-{}", node.tag),
        ifname: "eth0".into(),
    };
    let deleted_link = naming::host_ifname(&deleted);
    let record = Record {
        phase: Phase::Deleting,
        attachment: deleted.clone(),
        host_ifname: deleted_link.clone(),
        addresses: nets(&["10.244.1.78/32"]),
        ..record
    };
    std::fs::write(
        state
            .join("endpoints")
            .join(naming::record_file_name(&deleted)),
        record.encode(),
    )
    .unwrap();
    std::fs::write(
        state.join("ipam/10.244.1.78"),
        serde_json::to_vec(&deleted).unwrap(),
    )
    .unwrap();
    node.host.ip(&[
        "link",
        "add",
        &deleted_link,
        "type",
        "veth",
        "peer",
        "name",
        &naming::temp_ifname(&deleted),
    ]);
    // An allocation whose record never made it to disk, an empty one (a
    // crash between create and write), a host veth of no record, and a
    // half-written record file.
    let ghost = Attachment {
        container_id: "ghost".into(),
        ifname: "eth0".into(),
    };
    std::fs::write(
        state.join("ipam/10.244.1.99"),
        serde_json::to_vec(&ghost).unwrap(),
    )
    .unwrap();
    std::fs::write(state.join("ipam/10.244.1.98"), b"").unwrap();
    node.host.ip(&[
        "link",
        "add",
        "trellis0badf00d",
        "type",
        "veth",
        "peer",
        "name",
        "trls-ept-peer",
    ]);
    std::fs::write(state.join("endpoints/.ghost_eth0.json.tmp"), b"{\"ver").unwrap();

    node.start().await;

    assert_eq!(
        node.files("endpoints"),
        [naming::record_file_name(&node.att(1))],
        "the Adding record is rolled back, the Deleting one finished, the Ready one kept"
    );
    assert_eq!(node.files("ipam"), ["10.244.1.1"], "orphans released");
    assert_eq!(node.our_links(), std::slice::from_ref(&kept.host_ifname));
    match node.check(1, &p1.path()).await {
        Response::Checked { endpoint } => assert_eq!(endpoint, kept),
        other => panic!("{other:?}"),
    }
    assert!(node.host.ping(v4(&kept)));

    // The restarted node never hands out the kept pod's address.
    let next = added(node.add(2, &p2.path()).await);
    assert_ne!(v4(&next), v4(&kept));
    assert!(p2.ping(v4(&kept)), "the new pod reaches the kept one");

    for n in [1, 2] {
        assert_eq!(node.del(n).await, Response::Deleted);
    }
    node.assert_empty().await;
}

/// One request over the socket, as the CNI binary sends it.
async fn call(socket: &Path, line: &str) -> Response {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    stream.write_all(line.as_bytes()).await.unwrap();
    stream.write_all(b"\n").await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut reply = String::new();
    reader.read_line(&mut reply).await.unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
}

fn request(command: Command) -> String {
    serde_json::to_string(&Request {
        version: PROTOCOL_VERSION,
        network: "trellis".into(),
        command,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_adds_over_the_socket_then_gc_keeps_the_valid_ten() {
    const PODS: usize = 50;
    const VALID: usize = 10;
    let node = Node::new(&["10.244.1.0/24"]).await;
    let pods: Vec<Netns> = (0..PODS).map(|n| node.pod(n)).collect();

    let run_dir = tempfile::Builder::new()
        .prefix("trellis-ept-run-")
        .tempdir()
        .unwrap();
    let server = Server::bind(run_dir.path()).await.unwrap();
    let socket = server.path().to_path_buf();
    assert_eq!(socket, run_dir.path().join("cni.sock"));
    let (shutdown_tx, shutdown) = watch::channel(false);
    let serving =
        tokio::spawn(server.serve(node.endpoints.clone().unwrap(), Metrics::new(), shutdown));

    // Not a version we speak, not JSON: refused with the spec's codes.
    let other = r#"{"version":99,"network":"trellis","command":{"type":"STATUS"}}"#;
    error(call(&socket, other).await, code::INCOMPATIBLE_VERSION);
    error(call(&socket, "{nope").await, code::DECODING_FAILURE);
    assert_eq!(
        call(&socket, &request(Command::Status)).await,
        Response::Status {
            ready: true,
            limited: false,
            message: String::new()
        }
    );

    let adds: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(n, pod)| {
            let line = request(Command::Add {
                attachment: node.att(n),
                netns: pod.path(),
                pod: None,
            });
            let socket = socket.clone();
            tokio::spawn(async move { call(&socket, &line).await })
        })
        .collect();
    let mut endpoints = Vec::new();
    for add in adds {
        endpoints.push(added(add.await.unwrap()));
    }
    let addresses: BTreeSet<IpAddr> = endpoints.iter().map(v4).collect();
    assert_eq!(addresses.len(), PODS, "{addresses:?}");
    assert!(
        addresses
            .iter()
            .all(|a| a.to_string().starts_with("10.244.1."))
    );
    assert_eq!(node.files("ipam").len(), PODS);
    assert_eq!(node.our_links().len(), PODS);
    for ep in &endpoints {
        assert!(node.host.ping(v4(ep)), "node → {}", v4(ep));
    }

    // Without a list (libcni's GC when its caller passes none) no pod is
    // told dead: nothing recorded is released.
    match call(&socket, &request(Command::Gc { valid: None })).await {
        Response::Collected { released } => assert_eq!(released, []),
        other => panic!("{other:?}"),
    }
    assert_eq!(node.our_links().len(), PODS);

    let valid: Vec<Attachment> = (0..VALID).map(|n| node.att(n)).collect();
    let released = match call(
        &socket,
        &request(Command::Gc {
            valid: Some(valid.clone()),
        }),
    )
    .await
    {
        Response::Collected { released } => released,
        other => panic!("{other:?}"),
    };
    let released: BTreeSet<Attachment> = released.into_iter().collect();
    let expected: BTreeSet<Attachment> = (VALID..PODS).map(|n| node.att(n)).collect();
    assert_eq!(released, expected);

    // Exactly the valid ten are left, and they still work.
    assert_eq!(node.files("endpoints").len(), VALID);
    let left: BTreeSet<IpAddr> = node
        .files("ipam")
        .iter()
        .map(|f| f.parse().unwrap())
        .collect();
    let kept: BTreeSet<IpAddr> = endpoints[..VALID].iter().map(v4).collect();
    assert_eq!(left, kept);
    let links: BTreeSet<String> = node.our_links().into_iter().collect();
    let kept_links: BTreeSet<String> = endpoints[..VALID]
        .iter()
        .map(|e| e.host_ifname.clone())
        .collect();
    assert_eq!(links, kept_links);
    assert_eq!(node.endpoint_routes().len(), VALID);
    for (n, ep) in endpoints[..VALID].iter().enumerate() {
        assert!(node.host.ping(v4(ep)));
        let checked = call(
            &socket,
            &request(Command::Check {
                attachment: node.att(n),
                netns: pods[n].path(),
            }),
        )
        .await;
        assert!(matches!(checked, Response::Checked { .. }), "{checked:?}");
    }

    for (n, pod) in pods.iter().enumerate().take(VALID) {
        let deleted = call(
            &socket,
            &request(Command::Del {
                attachment: node.att(n),
                netns: Some(pod.path()),
            }),
        )
        .await;
        assert_eq!(deleted, Response::Deleted);
    }
    node.assert_empty().await;

    shutdown_tx.send_replace(true);
    serving.await.unwrap();
    assert!(!socket.exists(), "the socket goes with the server");
}
