//! The overlay end to end: a sandbox with a real apiserver, the operator, and
//! one real `trellis-node` per node namespace. Every claim is checked against
//! the kernel (`ip -j`, `bridge -j`, device counters) or with real traffic
//! between the nodes' namespaces, and against what the apiserver shows.
//!
//! Needs root (network namespaces, VXLAN).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a panic is the failure report"
)]

use std::time::{Duration, Instant};

use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt as _};
use serde_json::{Value, json};
use trellis_api::v1alpha1::{NetworkConfig, NetworkStatus, NodeNetwork};
use trellis_e2e::{
    ControlPlane, Nodes, StartOptions, controlplane::repo_root, operator, samples, wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const VXLAN: &str = "trellis-vxlan";

struct Cluster {
    cp: ControlPlane,
    client: Client,
    nodes: Nodes,
    names: Vec<String>,
}

/// A sandbox of `n` nodes with the default IPv4 pool; returns once every
/// node reports Ready with all its peers programmed.
async fn cluster(test: &str, n: usize) -> Cluster {
    let opts = StartOptions::for_test(test).with_cluster(n).unwrap();
    let cp = ControlPlane::start(opts).await.expect("sandbox starts");
    let client = cp.client();
    apply_samples(&client).await;
    let nodes = cp.nodes();
    let names: Vec<String> = (1..=n).map(|i| format!("trellis-node-{i}")).collect();
    let c = Cluster {
        cp,
        client,
        nodes,
        names,
    };
    c.wait_ready(i32::try_from(n - 1).unwrap(), "VXLAN").await;
    c
}

/// The IPPool sample, as a user applies it.
async fn apply_samples(client: &Client) {
    let pools = samples::ippools(samples::IPPOOL_SAMPLE).unwrap();
    samples::apply_ippools(client, &pools, "trellis-e2e")
        .await
        .unwrap();
}

impl Cluster {
    /// Waits until every node's NetworkStatus says Ready with `peers` peers in `mode`.
    async fn wait_ready(&self, peers: i32, mode: &str) {
        let api: Api<NetworkStatus> = Api::all(self.client.clone());
        let what = format!("every node Ready with {peers} peers in {mode} mode");
        wait_for(&what, TIMEOUT, || async {
            let list = api.list(&ListParams::default()).await.ok()?;
            let ready = self.names.iter().all(|name| {
                list.items.iter().any(|s| {
                    let Some(st) = s.status.as_ref() else {
                        return false;
                    };
                    s.name_any() == *name
                        && st.peers == peers
                        && st.encapsulation.map(|e| e.to_string()).as_deref() == Some(mode)
                        && st
                            .conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            });
            ready.then_some(())
        })
        .await;
    }

    async fn node_network(&self, name: &str) -> NodeNetwork {
        Api::<NodeNetwork>::all(self.client.clone())
            .get(name)
            .await
            .unwrap()
    }

    /// The node's VTEP IPv4 address (the first address of its block).
    async fn vtep(&self, name: &str) -> String {
        let nn = self.node_network(name).await;
        nn.spec.vtep.unwrap().ipv4.unwrap()
    }

    async fn ip(&self, node: &str, args: &[&str]) -> Value {
        self.nodes.ip_json(node, args).await.unwrap()
    }

    /// `bridge -j fdb show dev trellis-vxlan` in the node's namespace.
    async fn fdb(&self, node: &str) -> Vec<Value> {
        let out = self
            .nodes
            .exec(node, &["bridge", "-j", "fdb", "show", "dev", VXLAN])
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            return Vec::new();
        }
        serde_json::from_str::<Vec<Value>>(&text).unwrap()
    }

    /// Destinations of the node's Trellis routes (protocol 210).
    async fn route_dsts(&self, node: &str) -> Vec<String> {
        let routes = self.ip(node, &["route", "show", "proto", "210"]).await;
        let mut dsts: Vec<String> = routes
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["dst"].as_str().unwrap().to_owned())
            .collect();
        dsts.sort();
        dsts
    }

    async fn ping(&self, from: &str, args: &[&str]) -> std::process::Output {
        let mut argv = vec!["ping", "-n"];
        argv.extend_from_slice(args);
        self.nodes.exec(from, &argv).await.unwrap()
    }

    /// (tx, rx) packets of the node's VXLAN device.
    async fn vxlan_counters(&self, node: &str) -> (u64, u64) {
        let link = self.ip(node, &["-s", "link", "show", VXLAN]).await;
        let stats = &link[0]["stats64"];
        (
            stats["tx"]["packets"].as_u64().unwrap(),
            stats["rx"]["packets"].as_u64().unwrap(),
        )
    }

    async fn metric(&self, node: &str, series: &str) -> f64 {
        let port = self.nodes.agent_metrics_port(node).unwrap().unwrap();
        let (status, body) = operator::http_get(port, "/metrics", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{body}"))
    }

    async fn netlink_writes(&self, node: &str) -> f64 {
        let mut total = 0.0;
        for kind in ["link", "address", "neighbour", "fdb", "route"] {
            let series = format!("trellis_node_netlink_writes_total{{kind=\"{kind}\"}}");
            total += self.metric(node, &series).await;
        }
        total
    }

    /// Everything of ours in the node's kernel, for before/after comparisons
    /// (entries sorted: a re-added one comes back at the end of a dump).
    async fn kernel_state(&self, node: &str) -> Value {
        let mut link = self.ip(node, &["-d", "link", "show", VXLAN]).await;
        // Counters move with traffic; the device itself must not.
        for l in link.as_array_mut().unwrap() {
            l.as_object_mut().unwrap().remove("stats64");
        }
        let sorted = |v: Value| {
            let mut items: Vec<Value> = v.as_array().cloned().unwrap_or_default();
            items.sort_by_key(|i| i.to_string());
            Value::Array(items)
        };
        json!({
            "link": link,
            "routes": sorted(self.ip(node, &["-d", "route", "show", "proto", "210"]).await),
            "neigh": sorted(self.ip(node, &["neigh", "show", "dev", VXLAN]).await),
            "fdb": sorted(Value::Array(self.fdb(node).await)),
        })
    }
}

fn transmitted_received(out: &std::process::Output) -> (u64, u64) {
    transmitted_received_text(&String::from_utf8_lossy(&out.stdout))
}

fn transmitted_received_text(text: &str) -> (u64, u64) {
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in:\n{text}"));
    let mut numbers = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>().unwrap());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_reach_each_other_through_the_tunnel() {
    let c = cluster("overlay-reach", 3).await;

    // The kernel holds exactly what the NodeNetworks say, on every node.
    for name in &c.names {
        let own = c.node_network(name).await;
        let link = c.ip(name, &["-d", "link", "show", VXLAN]).await;
        let info = &link[0]["linkinfo"]["info_data"];
        assert_eq!(info["id"], 1, "VNI on {name}: {link}");
        assert_eq!(info["port"], 8472, "port on {name}");
        assert_eq!(info["learning"], false, "learning off on {name}");
        assert_eq!(info["local"], own.spec.underlay_address, "local on {name}");
        assert_eq!(link[0]["mtu"], 1450, "underlay 1500 - 50 on {name}");
        assert_eq!(link[0]["address"], own.spec.vtep.as_ref().unwrap().mac);

        let mut want_dsts = Vec::new();
        for peer in c.names.iter().filter(|p| *p != name) {
            let p = c.node_network(peer).await;
            want_dsts.push(p.spec.pod_cidrs[0].clone());
            let pvtep = p.spec.vtep.unwrap();
            let neigh = c.ip(name, &["neigh", "show", "dev", VXLAN]).await;
            assert!(
                neigh
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n["dst"] == pvtep.ipv4.clone().unwrap()
                        && n["lladdr"] == pvtep.mac
                        && n["state"].as_array().unwrap().contains(&json!("PERMANENT"))),
                "{name}: permanent neighbour for {peer}: {neigh}"
            );
            let fdb = c.fdb(name).await;
            assert!(
                fdb.iter().any(|e| e["mac"] == pvtep.mac
                    && e["dst"] == p.spec.underlay_address
                    && e["state"] == "permanent"),
                "{name}: permanent FDB entry for {peer}: {fdb:?}"
            );
        }
        want_dsts.sort();
        assert_eq!(c.route_dsts(name).await, want_dsts, "routes on {name}");
    }

    // Real traffic VTEP to VTEP, and proof it went through the tunnel.
    for from in &c.names {
        for to in c.names.iter().filter(|t| *t != from) {
            let (tx0, _) = c.vxlan_counters(from).await;
            let (_, rx0) = c.vxlan_counters(to).await;
            let target = c.vtep(to).await;
            let out = c
                .ping(from, &["-c", "3", "-i", "0.05", "-W", "2", &target])
                .await;
            assert_eq!(
                transmitted_received(&out),
                (3, 3),
                "{from} → {to} ({target}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
            let (tx1, _) = c.vxlan_counters(from).await;
            let (_, rx1) = c.vxlan_counters(to).await;
            assert!(tx1 >= tx0 + 3, "{from} sent through {VXLAN}: {tx0} → {tx1}");
            assert!(
                rx1 >= rx0 + 3,
                "{to} received through {VXLAN}: {rx0} → {rx1}"
            );
        }
    }

    // `kubectl get networkstatus` shows one honest line per node.
    let kubectl =
        trellis_e2e::binaries::resolve(trellis_e2e::binaries::Tool::Kubectl, &repo_root())
            .await
            .unwrap();
    let out = std::process::Command::new(kubectl)
        .args(["--kubeconfig"])
        .arg(c.cp.kubeconfig_path())
        .args(["get", "networkstatus", "-o", "wide"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in &c.names {
        let line = table
            .lines()
            .find(|l| l.starts_with(name.as_str()))
            .unwrap_or_else(|| panic!("no line for {name} in\n{table}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        // NAME POD-CIDRS MODE ENDPOINTS PEERS MTU READY REASON AGE
        assert_eq!(
            &cols[2..8],
            ["VXLAN", "0", "2", "1450", "True", "Ready"],
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_is_gone_from_every_peer() {
    let c = cluster("overlay-remove", 3).await;
    let gone = c.node_network("trellis-node-3").await;
    let gone_block = gone.spec.pod_cidrs[0].clone();
    let gone_vtep = gone.spec.vtep.unwrap();

    assert!(c.nodes.remove("trellis-node-3").await.unwrap());
    for name in &c.names[..2] {
        wait_for(
            &format!("{name} to forget trellis-node-3"),
            TIMEOUT,
            || async {
                let routes = c.route_dsts(name).await;
                let neigh = c.ip(name, &["neigh", "show", "dev", VXLAN]).await;
                let fdb = c.fdb(name).await;
                let clean = !routes.contains(&gone_block)
                    && !neigh
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|n| n["dst"] == gone_vtep.ipv4.clone().unwrap())
                    && !fdb.iter().any(|e| e["mac"] == gone_vtep.mac);
                clean.then_some(())
            },
        )
        .await;
        assert_eq!(
            c.route_dsts(name).await.len(),
            1,
            "{name} keeps its other peer"
        );
    }
    let remaining = Cluster {
        names: c.names[..2].to_vec(),
        ..c
    };
    remaining.wait_ready(1, "VXLAN").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_made_by_hand_is_repaired_within_two_seconds() {
    let c = cluster("overlay-drift", 3).await;
    let node = "trellis-node-1";
    let before = c.kernel_state(node).await;
    let peer = c.node_network("trellis-node-2").await;
    let block = peer.spec.pod_cidrs[0].clone();
    let mac = peer.spec.vtep.as_ref().unwrap().mac.clone();
    let netns = c.nodes.netns(node).unwrap();
    let ip = |args: &[&str]| {
        let mut all = vec!["-n", netns.as_str()];
        all.extend_from_slice(args);
        let out = std::process::Command::new("ip")
            .args(&all)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {all:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let bridge = |args: &[&str]| {
        let mut all = vec!["-n", netns.as_str()];
        all.extend_from_slice(args);
        let out = std::process::Command::new("bridge")
            .args(&all)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bridge {all:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    let cases: [(&str, Breaker); 3] = [
        (
            "a route deleted",
            Box::new(|| ip(&["route", "del", &block])),
        ),
        (
            "an FDB entry deleted",
            Box::new(|| bridge(&["fdb", "del", &mac, "dev", VXLAN])),
        ),
        (
            "the VXLAN device deleted",
            Box::new(|| ip(&["link", "del", VXLAN])),
        ),
    ];
    for (what, break_it) in cases {
        break_it();
        let broken = Instant::now();
        assert_ne!(c.kernel_state(node).await, json!(null));
        wait_for(
            &format!("{what} to be repaired"),
            Duration::from_secs(10),
            || async {
                let now = c.kernel_state(node).await;
                // A recreated device has a new index; compare what matters.
                let same = strip_indexes(&now) == strip_indexes(&before);
                same.then_some(())
            },
        )
        .await;
        let took = broken.elapsed();
        eprintln!("{what}: repaired after {took:?}");
        assert!(
            took < Duration::from_secs(2),
            "{what}: repaired after {took:?}"
        );
    }
    // And the repaired tunnel carries traffic.
    let target = c.vtep("trellis-node-2").await;
    let out = c
        .ping(node, &["-c", "2", "-i", "0.1", "-W", "2", &target])
        .await;
    assert_eq!(transmitted_received(&out), (2, 2));
    assert!(
        c.metric(node, "trellis_node_reconciles_total{trigger=\"kernel\"}")
            .await
            >= 3.0
    );
}

/// Something done by hand to a node's kernel state.
type Breaker<'a> = Box<dyn Fn() + 'a>;

/// Interface indexes and flags that change when a device is recreated.
fn strip_indexes(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "ifindex" | "link_index" | "operstate"))
                .map(|(k, v)| (k.clone(), strip_indexes(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_indexes).collect()),
        other => other.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_restarts_lose_no_packet_and_flush_nothing() {
    let c = cluster("overlay-restart", 3).await;
    let (from, to) = ("trellis-node-1", "trellis-node-2");
    let target = c.vtep(to).await;
    let before: Vec<Value> = vec![c.kernel_state(from).await, c.kernel_state(to).await];

    // 10 ms pings from before the first kill until after the last restart
    // (at most 60 s); replies are counted as they arrive.
    let netns = c.nodes.netns(from).unwrap();
    let mut ping = tokio::process::Command::new("ip")
        .args([
            "netns", "exec", &netns, "ping", "-n", "-i", "0.01", "-w", "60", "-W", "1", &target,
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // `ip netns exec` execs ping in its own process.
    let ping_pid = nix::unistd::Pid::from_raw(i32::try_from(ping.id().unwrap()).unwrap());
    let (replies_tx, replies) = tokio::sync::watch::channel(0u64);
    let stdout = ping.stdout.take().unwrap();
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt as _;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut text = String::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("bytes from") {
                replies_tx.send_modify(|n| *n += 1);
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let replies_reach = |n: u64| {
        let mut replies = replies.clone();
        async move {
            tokio::time::timeout(TIMEOUT, replies.wait_for(|r| *r >= n))
                .await
                .unwrap_or_else(|_| panic!("no {n} ping replies within {TIMEOUT:?}"))
                .unwrap();
        }
    };
    replies_reach(50).await;

    for round in 1..=5 {
        for node in [from, to] {
            c.nodes.kill_agent(node).await.unwrap();
            let agent = c.nodes.start_agent(node).await.unwrap();
            wait_for(
                &format!("round {round}: {node}'s agent ready again"),
                TIMEOUT,
                || async {
                    trellis_e2e::agent::readyz(agent.metrics_port, Duration::from_secs(5))
                        .await
                        .ok()
                },
            )
            .await;
            assert_eq!(
                c.netlink_writes(node).await,
                0.0,
                "round {round}: the restarted agent on {node} adopted the kernel as it was"
            );
            assert_eq!(
                c.metric(node, "trellis_node_status_writes_total").await,
                0.0,
                "round {round}: the restarted agent on {node} found its NetworkStatus current"
            );
        }
    }
    let after = *replies.borrow() + 50;
    replies_reach(after).await;
    // SIGINT makes ping print its summary and exit.
    nix::sys::signal::kill(ping_pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let text = reader.await.unwrap();
    assert!(ping.wait().await.unwrap().code().is_some());
    let (sent, received) = transmitted_received_text(&text);
    eprintln!("10 ms pings across 10 SIGKILL restarts: {sent} sent, {received} received");
    assert_eq!(sent, received, "no packet lost");
    assert_eq!(
        vec![c.kernel_state(from).await, c.kernel_state(to).await],
        before,
        "the datapath is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_native_routing_converges() {
    let c = cluster("overlay-native", 3).await;
    // Stand-in pod addresses: the first host of each block, on lo (the
    // CNI plugin arrives with its own issue).
    let mut pods = Vec::new();
    for name in &c.names {
        let cidr = c.node_network(name).await.spec.pod_cidrs[0].clone();
        let network: std::net::Ipv4Addr = cidr.split('/').next().unwrap().parse().unwrap();
        // The first address is the VTEP's; the next one stands in for a pod.
        let pod = std::net::Ipv4Addr::from(u32::from(network) + 1).to_string();
        let out = c
            .nodes
            .exec(
                name,
                &["ip", "addr", "add", &format!("{pod}/32"), "dev", "lo"],
            )
            .await
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        pods.push(pod);
    }
    let reach_all = |mode: &'static str| {
        let (c, pods) = (&c, &pods);
        async move {
            for (i, from) in c.names.iter().enumerate() {
                for (j, _) in c.names.iter().enumerate().filter(|(j, _)| *j != i) {
                    let out = c
                        .ping(
                            from,
                            &["-c", "2", "-i", "0.1", "-W", "2", "-I", &pods[i], &pods[j]],
                        )
                        .await;
                    assert_eq!(
                        transmitted_received(&out),
                        (2, 2),
                        "{mode}: {} → {}:\n{}",
                        pods[i],
                        pods[j],
                        String::from_utf8_lossy(&out.stdout)
                    );
                }
            }
        }
    };
    reach_all("VXLAN").await;

    let configs: Api<NetworkConfig> = Api::all(c.client.clone());
    let native = json!({
        "apiVersion": "network.trellis.dev/v1alpha1", "kind": "NetworkConfig",
        "metadata": {"name": "default"}, "spec": {"encapsulation": "None"},
    });
    configs
        .patch(
            "default",
            &PatchParams::apply("trellis-e2e").force(),
            &Patch::Apply(&native),
        )
        .await
        .unwrap();
    c.wait_ready(2, "None").await;

    for name in &c.names {
        let link = c.ip(name, &["link", "show"]).await;
        assert!(
            !link
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["ifname"] == VXLAN),
            "{name}: no VXLAN device in native mode"
        );
        let routes = c.ip(name, &["route", "show", "proto", "210"]).await;
        for r in routes.as_array().unwrap() {
            assert_eq!(
                r["dev"], "eth0",
                "{name}: native route via the underlay: {r}"
            );
            let gw = r["gateway"].as_str().unwrap();
            assert!(
                gw.starts_with("192.0.2."),
                "{name}: via a peer's underlay address: {r}"
            );
        }
        assert_eq!(routes.as_array().unwrap().len(), 2, "{name}: {routes}");
    }
    reach_all("native").await;
}
