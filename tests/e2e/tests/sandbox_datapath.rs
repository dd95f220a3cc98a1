//! The sandbox's datapath, checked against the kernel's own view (`ip -j`) and with real
//! traffic: every node is a network namespace whose `eth0` sits on one underlay bridge, nodes
//! ping each other over it, a removed node takes its namespace and bridge port with it, and
//! stopping (or the next start, or `down`, after a crash) deletes every namespace the sandbox
//! made. The node agents are the real `trellis-node` (`$TRELLIS_NODE`, else built with cargo),
//! run as recorded processes in the root namespace: they answer `/healthz`, turn ready after
//! their first reconcile, write their node's `NetworkStatus`, and can be killed and started
//! again; a removed node takes its `NetworkStatus` with it.
//!
//! The sandbox's bpffs (the nodes' pin directories) is mounted while the sandbox is up, checked
//! with `findmnt`, and unmounted by every teardown, also after a crash.
//!
//! No operator runs here: this is about the sandbox's own plumbing, so the agents find no
//! `NodeNetwork` and report `NoNodeNetwork`. Each test has its own state dir, hence its own
//! namespace names (`trellis-<tag>-…`), so they run in parallel.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use serde_json::Value;
use trellis_api::v1alpha1::{NETWORKSTATUS_READY, NetworkStatus};
use trellis_e2e::{
    AgentOptions, ControlPlane, NodeSpec, Nodes, Sandbox, StartOptions, agent,
    controlplane::repo_root,
    datapath::{self, BRIDGE, NODE_INTERFACE},
    nodes, operator,
    process::{Outcome, identity_matches, is_alive, proc_identity},
    sandbox::ProcessState,
    wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(30);
const PROBE: Duration = Duration::from_secs(2);
/// `RUST_LOG` the agents get.
const AGENT_LOG: &str = "info,trellis_node=debug";

/// `nodes` numbered nodes with namespaces, no CRDs, no operator, no agents.
fn datapath_only(test: &str, nodes: usize) -> StartOptions {
    StartOptions {
        crd_dir: None,
        nodes: nodes::numbered(nodes).expect("numbered nodes"),
        datapath: true,
        agents: None,
        ..StartOptions::for_test(test)
    }
}

/// [`datapath_only`] plus the real `trellis-node` for every node (`$TRELLIS_NODE`, else built
/// with cargo) and the CRDs it needs: it watches `NodeNetwork`s and writes its
/// `NetworkStatus`. Still no operator.
fn with_agents(test: &str, nodes: usize) -> StartOptions {
    StartOptions {
        crd_dir: Some(repo_root().join("config/crd")),
        agents: Some(AgentOptions {
            binary: None,
            log_filter: Some(AGENT_LOG.into()),
        }),
        ..datapath_only(test, nodes)
    }
}

/// Waits until `node`'s agent on `port` answers `/readyz` with 200: it has reconciled once.
async fn wait_ready(node: &str, port: u16) {
    wait_for(
        &format!("{node}'s agent to answer /readyz"),
        TIMEOUT,
        || async move { agent::readyz(port, PROBE).await.ok() },
    )
    .await;
}

/// The agent's reconciles so far: `trellis_node_reconciles_total` from its `/metrics`, summed
/// over its triggers.
async fn reconciles(port: u16) -> u64 {
    let (status, body) = operator::http_get(port, "/metrics", PROBE)
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200, "/metrics: {body}");
    let values: Vec<u64> = body
        .lines()
        .filter(|l| l.starts_with("trellis_node_reconciles_total"))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("a counter sample: {l:?}"))
        })
        .collect();
    assert!(
        !values.is_empty(),
        "no trellis_node_reconciles_total in /metrics:\n{body}"
    );
    values.iter().sum()
}

async fn network_status(client: &Client, node: &str) -> Option<NetworkStatus> {
    Api::<NetworkStatus>::all(client.clone())
        .get_opt(node)
        .await
        .expect("get the NetworkStatus")
}

/// Waits for `node`'s `NetworkStatus` as its agent writes it with no operator running:
/// `Ready` False for `NoNodeNetwork`, owned by the Node (so a cluster's garbage collector
/// deletes it with the Node).
async fn assert_reports_no_node_network(client: &Client, node: &str) {
    let reported = wait_for(
        &format!("{node}'s agent to write its NetworkStatus"),
        TIMEOUT,
        || async move {
            let ns = network_status(client, node).await?;
            let ready = ns
                .status
                .as_ref()?
                .conditions
                .iter()
                .find(|c| c.type_ == NETWORKSTATUS_READY)?
                .clone();
            Some((ns, ready))
        },
    )
    .await;
    let (ns, ready) = reported;
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NoNodeNetwork"),
        "{ready:?}"
    );
    let uid = Api::<Node>::all(client.clone())
        .get(node)
        .await
        .expect("get the Node")
        .metadata
        .uid;
    let owners = ns.metadata.owner_references.unwrap_or_default();
    assert!(
        owners
            .iter()
            .any(|o| o.kind == "Node" && o.name == node && Some(&o.uid) == uid.as_ref()),
        "NetworkStatus {node} is not owned by its Node ({uid:?}): {owners:?}"
    );
}

/// Every namespace name under /run/netns that belongs to the sandbox tagged `tag`.
fn namespaces_of(tag: &str) -> BTreeSet<String> {
    let prefix = format!("trellis-{tag}-");
    datapath::list_netns()
        .expect("ip -j netns list")
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

fn flags(link: &Value) -> Vec<&str> {
    link["flags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn names(links: &Value) -> BTreeSet<String> {
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect()
}

/// The bridge's ports, as the underlay namespace's kernel lists them.
async fn bridge_ports(nodes: &Nodes) -> BTreeSet<String> {
    names(
        &nodes
            .underlay_ip_json(&["link", "show", "master", BRIDGE])
            .await
            .expect("ip link show master"),
    )
}

async fn ping(nodes: &Nodes, from: &str, to: Ipv4Addr) -> Output {
    nodes
        .exec(from, &["ping", "-c", "1", "-W", "2", &to.to_string()])
        .await
        .expect("run ping in the node's namespace")
}

async fn assert_pings(nodes: &Nodes, from: &str, to: Ipv4Addr) {
    let out = ping(nodes, from, to).await;
    assert!(
        out.status.success(),
        "{from} cannot ping {to} over the underlay ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("an IPv4 address")
}

/// `FSTYPE SOURCE` of every mount at exactly `path`, as `findmnt` (util-linux) lists them.
fn findmnt(path: &Path) -> Vec<String> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let out = std::process::Command::new("findmnt")
        .args(["--noheadings", "--output", "FSTYPE,SOURCE", "--mountpoint"])
        .arg(&path)
        .output()
        .expect("run findmnt");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

/// The filesystem (device) `path` is on.
fn device(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .dev()
}

#[tokio::test(flavor = "multi_thread")]
async fn node_namespaces_share_one_underlay_bridge_and_go_with_their_nodes() {
    let mut cp = ControlPlane::start(datapath_only("datapath-underlay", 3))
        .await
        .expect("start a sandbox with a datapath");
    let nodes = cp.nodes();
    let config = nodes
        .datapath_config()
        .expect("read datapath.json")
        .expect("the datapath is recorded");
    let tag = config.tag.clone();
    assert_eq!(tag.len(), 6, "{tag}");
    assert_eq!(config.underlay_netns, format!("trellis-{tag}-underlay"));
    assert!(!config.agents);
    let phases: Vec<&str> = cp.timings().iter().map(|p| p.name).collect();
    assert!(phases.contains(&"underlay"), "{phases:?}");

    let node_names = ["trellis-node-1", "trellis-node-2", "trellis-node-3"];
    let mut want: BTreeSet<String> = node_names
        .iter()
        .map(|n| format!("trellis-{tag}-{n}"))
        .collect();
    want.insert(config.underlay_netns.clone());
    assert_eq!(namespaces_of(&tag), want);

    // Each node: its namespace holds lo and eth0 only, both up, eth0 with its /24.
    for (i, name) in node_names.iter().enumerate() {
        let dp = nodes.datapath(name).expect("node datapath");
        let address = Ipv4Addr::new(192, 0, 2, 11 + u8::try_from(i).expect("small"));
        assert_eq!(dp.netns, format!("trellis-{tag}-{name}"));
        assert_eq!(
            nodes.netns_path(name).expect("path"),
            PathBuf::from(format!("/run/netns/trellis-{tag}-{name}"))
        );
        assert!(dp.netns_path().exists());
        assert_eq!(nodes.underlay_ip(name).expect("underlay ip"), address);
        assert_eq!(dp.bridge_port, format!("trellis-p{}", 11 + i));
        assert_eq!(nodes.agent(name).expect("agent record"), None);

        let links = nodes
            .ip_json(name, &["link", "show"])
            .await
            .expect("ip link show");
        assert_eq!(
            names(&links),
            BTreeSet::from(["lo".to_string(), NODE_INTERFACE.to_string()]),
            "{name}: {links}"
        );
        let lo = &nodes
            .ip_json(name, &["link", "show", "dev", "lo"])
            .await
            .expect("ip link show dev lo")[0];
        assert!(flags(lo).contains(&"UP"), "{name}: lo is down: {lo}");
        let eth0 = &nodes
            .ip_json(name, &["addr", "show", "dev", NODE_INTERFACE])
            .await
            .expect("ip addr show dev eth0")[0];
        assert!(flags(eth0).contains(&"UP"), "{name}: {eth0}");
        assert_eq!(eth0["operstate"], "UP", "{name}: {eth0}");
        let v4: Vec<(String, u64)> = eth0["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["family"] == "inet")
            .map(|a| {
                (
                    a["local"].as_str().unwrap_or_default().to_string(),
                    a["prefixlen"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(v4, [(address.to_string(), 24)], "{name}: {eth0}");
    }

    // The underlay: one bridge, up, with the three veth ends as its ports.
    let bridge = &nodes
        .underlay_ip_json(&["-d", "link", "show", "dev", BRIDGE])
        .await
        .expect("ip -d link show dev trellis-br0")[0];
    assert_eq!(bridge["linkinfo"]["info_kind"], "bridge", "{bridge}");
    assert!(flags(bridge).contains(&"UP"), "{bridge}");
    let ports = bridge_ports(&nodes).await;
    assert_eq!(
        ports,
        BTreeSet::from(["trellis-p11", "trellis-p12", "trellis-p13"].map(String::from))
    );
    for port in &ports {
        let link = &nodes
            .underlay_ip_json(&["-d", "link", "show", "dev", port])
            .await
            .expect("ip -d link show dev <port>")[0];
        assert_eq!(link["linkinfo"]["info_kind"], "veth", "{link}");
        assert_eq!(link["master"], BRIDGE, "{link}");
        assert_eq!(link["operstate"], "UP", "{link}");
    }

    // Nothing of it in the root namespace.
    let root = datapath::ip(&["-j", "link", "show"]).expect("ip -j link show");
    let root: Value = serde_json::from_str(&root).expect("JSON");
    let root = names(&root);
    for name in ports.iter().chain([&BRIDGE.to_string()]) {
        assert!(
            !root.contains(name),
            "{name} is in the root namespace: {root:?}"
        );
    }

    // Real traffic over the bridge, every node to every other; and to no one else.
    for from in node_names {
        for to in node_names.iter().filter(|to| **to != from) {
            assert_pings(&nodes, from, nodes.underlay_ip(to).expect("ip")).await;
        }
    }
    for port in &ports {
        let link = &nodes
            .underlay_ip_json(&["-s", "link", "show", "dev", port])
            .await
            .expect("ip -s link show")[0];
        let (rx, tx) = (
            link["stats64"]["rx"]["packets"].as_u64().unwrap_or(0),
            link["stats64"]["tx"]["packets"].as_u64().unwrap_or(0),
        );
        assert!(rx > 0 && tx > 0, "no traffic through {port}: {link}");
    }
    let nobody = ping(&nodes, "trellis-node-1", ip("192.0.2.250")).await;
    assert!(!nobody.status.success(), "nobody has 192.0.2.250");

    // `node list` shows the namespaces.
    let views = nodes.list().await.expect("list nodes");
    let listed: Vec<(String, Option<String>)> = views
        .iter()
        .map(|v| (v.name.clone(), v.netns.clone()))
        .collect();
    let want_listed: Vec<(String, Option<String>)> = node_names
        .iter()
        .map(|n| (n.to_string(), Some(format!("trellis-{tag}-{n}"))))
        .collect();
    assert_eq!(listed, want_listed);
    assert!(views.iter().all(|v| v.agent.is_none()));

    // Removing a node deletes its namespace, its bridge port and its Node.
    let removed_ns = nodes.netns("trellis-node-2").expect("netns");
    assert!(nodes.remove("trellis-node-2").await.expect("remove"));
    assert!(!namespaces_of(&tag).contains(&removed_ns));
    assert!(!PathBuf::from("/run/netns").join(&removed_ns).exists());
    assert_eq!(
        bridge_ports(&nodes).await,
        BTreeSet::from(["trellis-p11", "trellis-p13"].map(String::from))
    );
    assert!(nodes.datapath("trellis-node-2").is_err());
    assert!(!cp.sandbox().netns_record_path(&removed_ns).exists());
    let left: Vec<String> = nodes
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(left, ["trellis-node-1", "trellis-node-3"]);
    assert!(
        !ping(&nodes, "trellis-node-1", ip("192.0.2.12"))
            .await
            .status
            .success(),
        "the removed node still answers"
    );
    assert!(!nodes.remove("trellis-node-2").await.expect("remove again"));

    // A node added later gets its namespace on the same bridge.
    let extra = NodeSpec::new("trellis-extra", IpAddr::V4(ip("192.0.2.20")));
    nodes.add(&extra).await.expect("add a node");
    assert!(namespaces_of(&tag).contains(&format!("trellis-{tag}-trellis-extra")));
    assert!(bridge_ports(&nodes).await.contains("trellis-p20"));
    assert_pings(&nodes, "trellis-node-1", ip("192.0.2.20")).await;
    assert_pings(&nodes, "trellis-extra", ip("192.0.2.13")).await;
    // Adding it again fails and leaves the first one alone.
    let err = nodes
        .add(&extra)
        .await
        .expect_err("a second node of that name");
    assert!(err.to_string().contains("trellis-extra"), "{err}");
    assert_pings(&nodes, "trellis-node-1", ip("192.0.2.20")).await;
    // So does another node on a taken address.
    let twin = NodeSpec::new("trellis-twin", IpAddr::V4(ip("192.0.2.20")));
    let err = nodes.add(&twin).await.expect_err("a taken address");
    assert!(err.to_string().contains("192.0.2.20"), "{err}");
    assert!(!namespaces_of(&tag).contains(&format!("trellis-{tag}-trellis-twin")));

    // Stopping deletes every namespace the sandbox made.
    assert!(!namespaces_of(&tag).is_empty());
    cp.stop().expect("stop");
    assert_eq!(namespaces_of(&tag), BTreeSet::new());
    assert!(!cp.sandbox().dir().exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_a_crashed_run_left_are_deleted_by_the_next_start_and_by_down() {
    let opts = datapath_only("datapath-stale", 2);
    let first = ControlPlane::start(opts.clone())
        .await
        .expect("first start");
    let tag = first
        .nodes()
        .datapath_config()
        .expect("config")
        .expect("datapath")
        .tag;
    let before = namespaces_of(&tag);
    assert_eq!(before.len(), 3, "{before:?}");
    // Mark a namespace of the first run, to tell it from the one the next run makes.
    let marked = first.nodes().netns("trellis-node-1").expect("netns");
    datapath::ip(&[
        "-n",
        &marked,
        "link",
        "add",
        "trellis-mark",
        "type",
        "bridge",
    ])
    .expect("add a marker link");
    // As if the owner crashed: the handle is gone, processes, namespaces and records stay.
    let sandbox = first.detach();
    assert_eq!(namespaces_of(&tag), before);

    let second = ControlPlane::start(opts.clone())
        .await
        .expect("second start");
    let mut deleted: Vec<String> = second.deleted_stale_namespaces().to_vec();
    assert_eq!(
        deleted.last().map(String::as_str),
        Some(format!("trellis-{tag}-underlay").as_str()),
        "the underlay goes last: {deleted:?}"
    );
    deleted.sort();
    assert_eq!(deleted, before.iter().cloned().collect::<Vec<_>>());
    assert_eq!(namespaces_of(&tag), before, "the second run has its own");
    let links = second
        .nodes()
        .ip_json("trellis-node-1", &["link", "show"])
        .await
        .expect("ip link show");
    assert!(
        !names(&links).contains("trellis-mark"),
        "the first run's namespace survived: {links}"
    );
    assert_pings(&second.nodes(), "trellis-node-2", ip("192.0.2.11")).await;

    // Crashed again; `down` (what `trellis-sandbox down` runs) deletes them, by their records.
    let processes = second.processes();
    second.detach();
    sandbox.down(false).expect("down");
    assert_eq!(namespaces_of(&tag), BTreeSet::new());
    for p in processes {
        assert!(!is_alive(p.pid), "{} (pid {}) survived down", p.name, p.pid);
    }
    assert!(!sandbox.dir().exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_run_in_the_root_namespace_turn_ready_and_can_be_killed_and_restarted() {
    let mut cp = ControlPlane::start(with_agents("datapath-agents", 2))
        .await
        .expect("start a sandbox running trellis-node for each node");
    let nodes = cp.nodes();
    let client = cp.client();
    let tag = nodes
        .datapath_config()
        .expect("config")
        .expect("datapath")
        .tag;
    let phases: Vec<&str> = cp.timings().iter().map(|p| p.name).collect();
    assert!(phases.contains(&"agents"), "{phases:?}");
    let own_netns = std::fs::read_link("/proc/self/ns/net").expect("own netns");
    let binary = agent::resolve(&repo_root())
        .await
        .expect("the trellis-node the sandbox runs");

    for name in ["trellis-node-1", "trellis-node-2"] {
        let record = nodes
            .agent(name)
            .expect("read the pid file")
            .expect("an agent is recorded");
        assert_eq!(record.name, format!("trellis-node-agent-{name}"));
        assert_eq!(record.binary, binary);
        let seen = proc_identity(record.pid).expect("the agent runs");
        assert!(identity_matches(&record, &seen), "{record:?} vs {seen:?}");
        let port = nodes
            .agent_metrics_port(name)
            .expect("record")
            .expect("a metrics port");
        agent::healthz(port, PROBE).await.expect("/healthz");
        // Ready once it has reconciled (no NodeNetwork: nothing to do), which it counts.
        wait_ready(name, port).await;
        assert!(reconciles(port).await >= 1, "{name}: no reconcile counted");
        assert_reports_no_node_network(&client, name).await;
        // The command line is the agent's CLI contract.
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", record.pid)).expect("cmdline");
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let mut want = vec![
            "--node-name".to_string(),
            name.to_string(),
            "--host-netns".to_string(),
            format!("/run/netns/trellis-{tag}-{name}"),
            // Its own credentials, not the admin's.
            "--kubeconfig".to_string(),
            nodes.node_dirs(name).kubeconfig().display().to_string(),
            "--metrics-addr".to_string(),
            format!("127.0.0.1:{port}"),
        ];
        // The endpoint server's directories and the plugin it installs.
        let plugin = nodes
            .datapath_config()
            .expect("config")
            .and_then(|c| c.cni_plugin_binary)
            .expect("the CNI plugin is recorded");
        want.extend(agent::endpoint_args(&nodes.node_dirs(name), &plugin));
        assert_eq!(argv[1..], want);
        // Started in the root namespace (it enters the node's itself), with RUST_LOG as asked.
        assert_eq!(
            std::fs::read_link(format!("/proc/{}/ns/net", record.pid)).expect("its netns"),
            own_netns
        );
        let environ = std::fs::read(format!("/proc/{}/environ", record.pid)).expect("environ");
        let want = format!("RUST_LOG={AGENT_LOG}");
        assert!(
            environ.split(|b| *b == 0).any(|kv| kv == want.as_bytes()),
            "RUST_LOG not passed"
        );
        assert!(cp.sandbox().log_path(&record.name).is_file());
    }
    let recorded: Vec<String> = cp
        .sandbox()
        .recorded_processes()
        .expect("pid files")
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(
        recorded,
        [
            "trellis-node-agent-trellis-node-1",
            "trellis-node-agent-trellis-node-2",
            "kube-apiserver",
            "etcd"
        ],
        "agents end before the apiserver"
    );
    let status = cp.sandbox().status().await.expect("status");
    assert!(status.healthy(), "{status:?}");
    assert_eq!(status.nodes.len(), 2);
    assert!(
        status
            .nodes
            .iter()
            .all(|n| n.netns_present && n.agent_healthz == Some(Ok("ok".into()))),
        "{status:?}"
    );
    let views = nodes.list().await.expect("list");
    assert!(
        views.iter().all(|v| v
            .agent
            .as_ref()
            .is_some_and(|a| a.state == ProcessState::Running)),
        "{views:?}"
    );

    // Killed: gone at once, its record with it; its namespace stays.
    let old = nodes
        .agent("trellis-node-1")
        .expect("pid file")
        .expect("recorded");
    let old_port = nodes
        .agent_metrics_port("trellis-node-1")
        .expect("record")
        .expect("port");
    let killed = nodes.kill_agent("trellis-node-1").await.expect("kill");
    assert_eq!(killed.outcome, Outcome::Killed);
    assert_eq!(killed.record, old);
    assert!(!is_alive(old.pid), "pid {} survived SIGKILL", old.pid);
    assert_eq!(nodes.agent("trellis-node-1").expect("pid file"), None);
    assert!(agent::healthz(old_port, PROBE).await.is_err());
    assert!(nodes.netns_path("trellis-node-1").expect("path").exists());
    let status = cp.sandbox().status().await.expect("status");
    assert!(!status.healthy(), "a node without its agent: {status:?}");

    // Started again with the same arguments, on a port it reports.
    let restarted = nodes.start_agent("trellis-node-1").await.expect("restart");
    assert_ne!(restarted.record.pid, old.pid);
    assert_eq!(
        nodes.agent("trellis-node-1").expect("pid file"),
        Some(restarted.record.clone())
    );
    assert_eq!(
        nodes.agent_metrics_port("trellis-node-1").expect("record"),
        Some(restarted.metrics_port)
    );
    agent::healthz(restarted.metrics_port, PROBE)
        .await
        .expect("/healthz after the restart");
    wait_ready("trellis-node-1", restarted.metrics_port).await;
    assert!(reconciles(restarted.metrics_port).await >= 1);
    let err = nodes
        .start_agent("trellis-node-1")
        .await
        .expect_err("a second agent for the node");
    assert!(err.to_string().contains("runs already"), "{err}");
    wait_for("the sandbox to be healthy again", TIMEOUT, || async {
        let status = cp.sandbox().status().await.ok()?;
        status.healthy().then_some(())
    })
    .await;

    // Removing a node ends its agent first, then deletes its namespace, its Node and, as a
    // cluster's garbage collector would, the NetworkStatus the agent wrote.
    let gone = nodes
        .agent("trellis-node-2")
        .expect("pid file")
        .expect("recorded");
    let gone_ns = nodes.netns("trellis-node-2").expect("netns");
    assert!(network_status(&client, "trellis-node-2").await.is_some());
    assert!(nodes.remove("trellis-node-2").await.expect("remove"));
    assert!(!is_alive(gone.pid));
    assert!(!namespaces_of(&tag).contains(&gone_ns));
    assert!(
        Api::<Node>::all(client.clone())
            .get_opt("trellis-node-2")
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        network_status(&client, "trellis-node-2").await.is_none(),
        "the removed node's NetworkStatus is left"
    );
    assert!(!nodes.remove("trellis-node-2").await.expect("remove again"));
    assert!(network_status(&client, "trellis-node-1").await.is_some());

    // A node added later gets an agent too.
    let extra = NodeSpec::new("trellis-extra", IpAddr::V4(ip("192.0.2.30")));
    nodes.add(&extra).await.expect("add a node");
    let extra_agent = nodes
        .agent("trellis-extra")
        .expect("pid file")
        .expect("an agent for the added node");
    let port = nodes
        .agent_metrics_port("trellis-extra")
        .expect("record")
        .expect("port");
    agent::healthz(port, PROBE).await.expect("/healthz");
    wait_ready("trellis-extra", port).await;
    assert_reports_no_node_network(&client, "trellis-extra").await;

    // Stop: the agents first, then the control plane; then the namespaces.
    let ended: Vec<String> = cp
        .stop()
        .expect("stop")
        .into_iter()
        .map(|e| e.record.name)
        .collect();
    assert_eq!(
        ended,
        [
            "trellis-node-agent-trellis-extra",
            "trellis-node-agent-trellis-node-1",
            "kube-apiserver",
            "etcd"
        ]
    );
    for pid in [restarted.record.pid, extra_agent.pid] {
        assert!(!is_alive(pid), "agent pid {pid} survived stop");
    }
    assert_eq!(namespaces_of(&tag), BTreeSet::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_exits_fails_the_start_and_leaves_nothing_behind() {
    use std::os::unix::fs::PermissionsExt as _;

    let tmp = tempfile::Builder::new()
        .prefix("trellis-exiting-agent-")
        .tempdir()
        .expect("temp dir");
    // Failure injection: an agent that exits at once.
    let exits = tmp.path().join("trellis-node");
    std::fs::write(
        &exits,
        "#!/bin/sh\necho \"exiting trellis-node: giving up ($*)\" >&2\nexit 2\n",
    )
    .expect("write the exiting agent");
    std::fs::set_permissions(&exits, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let opts = StartOptions {
        agents: Some(AgentOptions {
            binary: Some(exits),
            log_filter: None,
        }),
        ..datapath_only("datapath-agent-exits", 1)
    };
    let state_dir = opts.state_dir.clone();
    let tag = datapath::sandbox_tag(&state_dir);
    let err = match ControlPlane::start(opts).await {
        Ok(_) => panic!("a start whose agent exits must fail"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        matches!(&err, trellis_e2e::Error::ProcessExited { name, .. }
            if name == "trellis-node-agent-trellis-node-1"),
        "{msg}"
    );
    assert!(msg.contains("exiting trellis-node: giving up"), "{msg}");
    assert!(msg.contains("--host-netns /run/netns/trellis-"), "{msg}");
    // Everything it started and made is gone again; the state dir stays for inspection.
    let sandbox = Sandbox::new(&state_dir);
    assert!(sandbox.recorded_processes().expect("pid files").is_empty());
    assert_eq!(namespaces_of(&tag), BTreeSet::new());
    sandbox.down(false).expect("remove the state dir");
}

#[tokio::test(flavor = "multi_thread")]
async fn bpffs_is_mounted_while_up_and_gone_after_every_teardown() {
    let opts = datapath_only("datapath-bpffs", 2);
    let mut first = ControlPlane::start(opts.clone()).await.expect("start");
    let sandbox = first.sandbox().clone();
    let root = sandbox.bpffs_dir();
    assert_eq!(root, sandbox.dir().join("bpffs"));
    assert_eq!(findmnt(&root), ["bpf trellis-bpffs"]);
    assert_ne!(
        device(&root),
        device(sandbox.dir()),
        "a filesystem of its own"
    );
    let nodes = first.nodes();
    for name in ["trellis-node-1", "trellis-node-2"] {
        let pins = nodes.node_dirs(name).bpffs;
        assert_eq!(pins, root.join(name));
        assert!(pins.is_dir(), "{}", pins.display());
        assert_eq!(
            device(&pins),
            device(&root),
            "{name}'s pin directory is on the bpffs"
        );
    }
    let status = sandbox.status().await.expect("status");
    assert_eq!(status.bpffs_mounted, Some(true));
    // A removed node takes its pin directory with it; a node added later gets one.
    nodes.remove("trellis-node-2").await.expect("remove a node");
    assert!(!root.join("trellis-node-2").exists());
    nodes
        .add(&NodeSpec::new("trellis-late", IpAddr::V4(ip("192.0.2.30"))))
        .await
        .expect("add a node");
    assert_eq!(device(&root.join("trellis-late")), device(&root));
    first.stop().expect("stop");
    assert!(
        findmnt(&root).is_empty(),
        "stop unmounts: {:?}",
        findmnt(&root)
    );
    assert!(!sandbox.dir().exists());

    // As if the owner crashed with the bpffs mounted: the next start unmounts it and mounts
    // a fresh one (not a second one on top), and `down` unmounts that.
    let second = ControlPlane::start(opts.clone())
        .await
        .expect("second start");
    // Only directories can be made in a bpffs: mark this mount with one.
    std::fs::create_dir(root.join("trellis-mark")).expect("mkdir in the bpffs");
    second.detach();
    assert_eq!(
        findmnt(&root),
        ["bpf trellis-bpffs"],
        "a crash leaves it mounted"
    );
    let third = ControlPlane::start(opts.clone())
        .await
        .expect("third start");
    assert_eq!(findmnt(&root), ["bpf trellis-bpffs"], "one mount, not two");
    assert!(
        !root.join("trellis-mark").exists(),
        "the first run's bpffs survived"
    );
    third.detach();
    sandbox.down(false).expect("down");
    assert!(
        findmnt(&root).is_empty(),
        "down unmounts: {:?}",
        findmnt(&root)
    );
    assert!(!sandbox.dir().exists());
}
