//! `trellis-operator` (the real binary) against a real kube-apiserver:
//! Node objects become `NodeNetwork`s with disjoint blocks from the right
//! pools; a deleted node returns its block; a restarted operator changes no
//! object; a full pool shows up as conditions and Events; of two replicas
//! exactly one writes, and when it is killed the other takes over.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use trellis_api::v1alpha1::{IPPool, NodeNetwork};
use trellis_e2e::controlplane::free_port;
use trellis_e2e::{ControlPlane, StartOptions, wait_for};

const NAMESPACE: &str = "trellis-system";
const TIMEOUT: Duration = Duration::from_secs(30);

/// A running `trellis-operator`, killed on drop.
struct Operator {
    child: Child,
    identity: String,
    metrics_port: u16,
    log: PathBuf,
}

impl Operator {
    fn start(kubeconfig: &Path, identity: &str, log_dir: &Path) -> Operator {
        let metrics_port = free_port().expect("free port");
        let log = log_dir.join(format!("operator-{identity}.log"));
        let file = std::fs::File::create(&log).expect("operator log");
        let child = Command::new(env!("CARGO_BIN_EXE_trellis-operator"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "--identity",
                identity,
                "--leader-election-namespace",
                NAMESPACE,
            ])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env("RUST_LOG", "info,trellis_operator=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn trellis-operator");
        Operator {
            child,
            identity: identity.into(),
            metrics_port,
            log,
        }
    }

    /// A metric's value from /metrics (`name` with labels, as printed), if served.
    fn metric(&self, name: &str) -> Option<f64> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// SIGTERM and wait (graceful shutdown).
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }

    /// SIGKILL: no chance to release anything.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn create_node(client: &Client, name: &str, ip: &str, labels: &[(&str, &str)]) {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let node: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
        .expect("node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
    // What the kubelet would report.
    let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("node status");
}

async fn apply_yaml(client: &Client, yaml: &str) {
    for doc in yaml.split("\n---\n") {
        let value: serde_json::Value = serde_yaml::from_str(doc).expect("yaml");
        let name = value["metadata"]["name"].as_str().expect("name").to_owned();
        let kind = value["kind"].as_str().expect("kind");
        let params = PatchParams::apply("trellis-e2e").force();
        match kind {
            "IPPool" => drop(
                Api::<IPPool>::all(client.clone())
                    .patch(&name, &params, &Patch::Apply(&value))
                    .await
                    .expect("pool"),
            ),
            "NetworkConfig" => drop(
                Api::<trellis_api::v1alpha1::NetworkConfig>::all(client.clone())
                    .patch(&name, &params, &Patch::Apply(&value))
                    .await
                    .expect("config"),
            ),
            other => panic!("unexpected kind {other}"),
        }
    }
}

async fn setup(test: &str) -> (ControlPlane, Client, PathBuf) {
    let cp = ControlPlane::start(StartOptions::for_test(test))
        .await
        .expect("control plane");
    let client = cp.client();
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    let logs = cp.sandbox().dir().join("operator-logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    (cp, client, logs)
}

async fn node_networks(client: &Client) -> BTreeMap<String, NodeNetwork> {
    let list = Api::<NodeNetwork>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list");
    list.items
        .into_iter()
        .map(|nn| (nn.name_any(), nn))
        .collect()
}

async fn pool(client: &Client, name: &str) -> IPPool {
    Api::<IPPool>::all(client.clone())
        .get(name)
        .await
        .expect("get pool")
}

const POOLS: &str = r#"apiVersion: network.trellis.dev/v1alpha1
kind: IPPool
metadata: {name: default-ipv4}
spec:
  cidr: 10.244.0.0/16
  blockSize: 24
  nodeSelector:
    matchExpressions: [{key: trellis.dev/pool, operator: DoesNotExist}]
---
apiVersion: network.trellis.dev/v1alpha1
kind: IPPool
metadata: {name: dual-stack-ipv6}
spec:
  cidr: fd00:10:244::/56
  blockSize: 120
  nodeSelector:
    matchLabels: {trellis.dev/dual-stack: "true"}
---
apiVersion: network.trellis.dev/v1alpha1
kind: IPPool
metadata: {name: tiny}
spec:
  cidr: 10.250.0.0/24
  blockSize: 24
  nodeSelector:
    matchLabels: {trellis.dev/pool: tiny}
---
apiVersion: network.trellis.dev/v1alpha1
kind: NetworkConfig
metadata: {name: default}
spec: {}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_operator_allocates_releases_restarts_and_reports_exhaustion() {
    let (cp, client, logs) = setup("operator-single").await;
    apply_yaml(&client, POOLS).await;
    let mut op = Operator::start(&cp.kubeconfig_path(), "op-a", &logs);

    create_node(
        &client,
        "trellis-n1",
        "192.0.2.11",
        &[("trellis.dev/dual-stack", "true")],
    )
    .await;
    create_node(&client, "trellis-n2", "192.0.2.12", &[]).await;
    create_node(&client, "trellis-n3", "192.0.2.13", &[]).await;

    // Three NodeNetworks, disjoint blocks from the right pools.
    let nns = wait_for("three NodeNetworks with blocks", TIMEOUT, || async {
        let nns = node_networks(&client).await;
        (nns.len() == 3 && nns.values().all(|nn| !nn.spec.pod_cidrs.is_empty())).then_some(nns)
    })
    .await;
    let v4: IpNet = "10.244.0.0/16".parse().unwrap();
    let v6: IpNet = "fd00:10:244::/56".parse().unwrap();
    let mut all_blocks: Vec<IpNet> = Vec::new();
    for (name, nn) in &nns {
        let blocks: Vec<IpNet> = nn
            .spec
            .pod_cidrs
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let want_v6 = name == "trellis-n1";
        assert_eq!(
            blocks.len(),
            if want_v6 { 2 } else { 1 },
            "{name}: {blocks:?}"
        );
        assert!(
            v4.contains(&blocks[0]) && blocks[0].prefix_len() == 24,
            "{name}: {blocks:?}"
        );
        if want_v6 {
            assert!(
                v6.contains(&blocks[1]) && blocks[1].prefix_len() == 120,
                "{name}: {blocks:?}"
            );
        }
        let expected_ip = format!("192.0.2.1{}", &name[name.len() - 1..]);
        assert_eq!(nn.spec.underlay_address, expected_ip);
        let vtep = nn.spec.vtep.as_ref().expect("VXLAN by default: a VTEP");
        assert_eq!(
            vtep.ipv4.as_deref(),
            Some(blocks[0].network().to_string().as_str())
        );
        assert_eq!(nn.owner_references()[0].kind, "Node");
        all_blocks.extend(blocks);
    }
    for (i, a) in all_blocks.iter().enumerate() {
        for b in &all_blocks[i + 1..] {
            assert!(!a.contains(b) && !b.contains(a), "{a} overlaps {b}");
        }
    }
    let p = wait_for("default-ipv4 status", TIMEOUT, || async {
        let p = pool(&client, "default-ipv4").await;
        p.status.clone().filter(|s| s.blocks_in_use == 3).map(|_| p)
    })
    .await;
    let status = p.status.unwrap();
    assert_eq!((status.blocks_total, status.utilization_percent), (256, 2));
    assert!(
        p.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"network.trellis.dev/blocks-in-use".to_owned())
    );

    // A deleted node releases its block.
    Api::<Node>::all(client.clone())
        .delete("trellis-n2", &DeleteParams::default())
        .await
        .expect("delete node");
    wait_for(
        "n2's NodeNetwork gone and its block returned",
        TIMEOUT,
        || async {
            let gone = !node_networks(&client).await.contains_key("trellis-n2");
            let in_use = pool(&client, "default-ipv4")
                .await
                .status
                .map(|s| s.blocks_in_use);
            (gone && in_use == Some(2)).then_some(())
        },
    )
    .await;

    // A restarted operator changes nothing.
    let before = resource_versions(&client).await;
    op.stop();
    let op = Operator::start(&cp.kubeconfig_path(), "op-a2", &logs);
    wait_for(
        "the restarted operator to lead and finish a pass",
        TIMEOUT,
        || async {
            (op.metric("trellis_operator_leader") == Some(1.0)
                && op
                    .metric("trellis_operator_reconciles_total")
                    .unwrap_or(0.0)
                    >= 1.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        resource_versions(&client).await,
        before,
        "a restart must write nothing\n{}",
        op.log_tail()
    );
    assert_eq!(
        op.metric("trellis_operator_writes_total{kind=\"node_network_spec\"}"),
        Some(0.0)
    );

    // A full pool: the second node that only it selects gets nothing, and says so.
    create_node(
        &client,
        "trellis-t1",
        "192.0.2.21",
        &[("trellis.dev/pool", "tiny")],
    )
    .await;
    create_node(
        &client,
        "trellis-t2",
        "192.0.2.22",
        &[("trellis.dev/pool", "tiny")],
    )
    .await;
    let starved = wait_for(
        "a PoolExhausted condition on one tiny node",
        TIMEOUT,
        || async {
            let nns = node_networks(&client).await;
            ["trellis-t1", "trellis-t2"].into_iter().find_map(|n| {
                let c = nns.get(n)?.status.as_ref()?.conditions.first()?.clone();
                (c.status == "False" && c.reason == "PoolExhausted").then(|| (n.to_owned(), c))
            })
        },
    )
    .await;
    let nns = node_networks(&client).await;
    let holder = if starved.0 == "trellis-t1" {
        "trellis-t2"
    } else {
        "trellis-t1"
    };
    assert_eq!(nns[holder].spec.pod_cidrs, ["10.250.0.0/24"]);
    assert!(
        nns[&starved.0].spec.pod_cidrs.is_empty(),
        "never a shared block"
    );
    assert!(starved.1.message.contains("tiny"), "{}", starved.1.message);
    let tiny = wait_for("tiny's Allocatable=False", TIMEOUT, || async {
        let p = pool(&client, "tiny").await;
        let c = p
            .status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Allocatable")?
            .clone();
        (c.status == "False").then_some(c)
    })
    .await;
    assert_eq!(tiny.reason, "Exhausted");
    let event = wait_for("a PoolExhausted Event about the node", TIMEOUT, || async {
        let events = Api::<Event>::all(client.clone())
            .list(&ListParams::default())
            .await
            .ok()?;
        events.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("PoolExhausted")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(starved.0.as_str())
        })
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    drop(op);
    drop(cp);
}

async fn resource_versions(client: &Client) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, nn) in node_networks(client).await {
        out.insert(
            format!("nodenetwork/{name}"),
            nn.resource_version().unwrap_or_default(),
        );
    }
    for p in Api::<IPPool>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list pools")
        .items
    {
        out.insert(
            format!("ippool/{}", p.name_any()),
            p.resource_version().unwrap_or_default(),
        );
    }
    let config = Api::<trellis_api::v1alpha1::NetworkConfig>::all(client.clone())
        .get("default")
        .await
        .expect("get NetworkConfig");
    out.insert(
        "networkconfig/default".into(),
        config.resource_version().unwrap_or_default(),
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_replicas_one_writes_and_the_other_takes_over_when_it_dies() {
    let (cp, client, logs) = setup("operator-replicas").await;
    apply_yaml(&client, POOLS).await;
    let mut a = Operator::start(&cp.kubeconfig_path(), "replica-a", &logs);
    let mut b = Operator::start(&cp.kubeconfig_path(), "replica-b", &logs);

    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let holder = wait_for("a lease holder", TIMEOUT, || async {
        leases
            .get("trellis-operator")
            .await
            .ok()?
            .spec?
            .holder_identity
    })
    .await;
    let (leader, standby) = if holder == a.identity {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    wait_for("leader/standby gauges", TIMEOUT, || async {
        (leader.metric("trellis_operator_leader") == Some(1.0)
            && standby.metric("trellis_operator_leader") == Some(0.0))
        .then_some(())
    })
    .await;

    create_node(&client, "trellis-r1", "192.0.2.31", &[]).await;
    wait_for("r1's NodeNetwork", TIMEOUT, || async {
        node_networks(&client).await.get("trellis-r1").map(drop)
    })
    .await;
    // The pass counts its writes when it finishes, just after the object appears.
    let spec_writes = "trellis_operator_writes_total{kind=\"node_network_spec\"}";
    wait_for("the leader to count its write of r1", TIMEOUT, || async {
        (leader.metric(spec_writes) == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(
        standby.metric(spec_writes),
        Some(0.0),
        "the standby wrote nothing\n{}",
        standby.log_tail()
    );

    // The leader dies without releasing the lease.
    leader.kill();
    let killed = Instant::now();
    let new_holder = wait_for(
        "the standby to take the lease",
        Duration::from_secs(20),
        || async {
            let h = leases
                .get("trellis-operator")
                .await
                .ok()?
                .spec?
                .holder_identity?;
            (h == standby.identity).then_some(h)
        },
    )
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(15), "takeover took {took:?}");
    create_node(&client, "trellis-r2", "192.0.2.32", &[]).await;
    wait_for("r2's NodeNetwork from the new leader", TIMEOUT, || async {
        node_networks(&client).await.get("trellis-r2").map(drop)
    })
    .await;
    wait_for(
        "the new leader to count its write of r2",
        TIMEOUT,
        || async { (standby.metric(spec_writes) == Some(1.0)).then_some(()) },
    )
    .await;
    assert_eq!(new_holder, standby.identity);
    eprintln!("takeover after SIGKILL: {took:?}");
    drop(cp);
}
