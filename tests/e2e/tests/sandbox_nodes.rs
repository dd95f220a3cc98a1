//! The sandbox as `trellis-sandbox up` runs it, through the library: Node objects registered
//! like a kubelet registers them, and the real `trellis-operator` run as a recorded process
//! that gives each node a `NodeNetwork` from the default IPPool sample, follows a removed node,
//! and is ended (first) when the sandbox stops.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::{Api, Client, ResourceExt as _, api::ListParams};
use trellis_api::v1alpha1::NodeNetwork;
use trellis_e2e::{
    ControlPlane, StartOptions,
    nodes::{self, HOSTNAME_LABEL},
    operator,
    process::{identity_matches, is_alive, proc_identity},
    samples, wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Server-side apply of every IPPool in `config/samples/<file>`.
async fn apply_pool_sample(client: &Client, file: &str) -> Vec<String> {
    let pools = samples::ippools(file).expect("the sample parses");
    samples::apply_ippools(client, &pools, "trellis-e2e")
        .await
        .expect("apply the pools")
}

async fn node_networks(client: &Client) -> BTreeMap<String, NodeNetwork> {
    Api::<NodeNetwork>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list NodeNetworks")
        .items
        .into_iter()
        .map(|nn| (nn.name_any(), nn))
        .collect()
}

/// `a.b.c.d/len` as an address and a prefix length.
fn parse_v4_cidr(cidr: &str) -> (Ipv4Addr, u8) {
    let (addr, len) = cidr.split_once('/').expect("a CIDR");
    (addr.parse().expect("IPv4"), len.parse().expect("prefix"))
}

#[tokio::test(flavor = "multi_thread")]
async fn up_registers_nodes_runs_the_operator_and_down_ends_it() {
    // Node objects and the operator only: the datapath has its own tests (sandbox_datapath.rs).
    let opts = StartOptions::for_test("sandbox-nodes")
        .with_cluster(3)
        .expect("three nodes")
        .without_datapath();
    let mut cp = ControlPlane::start(opts).await.expect("start the sandbox");
    let client = cp.client();

    // The namespace for the operator's Lease.
    Api::<Namespace>::all(client.clone())
        .get(operator::SYSTEM_NAMESPACE)
        .await
        .expect("namespace trellis-system");

    // Three Nodes, each with its hostname label and InternalIP, as a kubelet registers them.
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list Nodes");
    let got: BTreeMap<String, (Vec<String>, Option<String>)> = nodes
        .items
        .iter()
        .map(|n| {
            (
                n.name_any(),
                (
                    nodes::internal_ips(n),
                    n.labels().get(HOSTNAME_LABEL).cloned(),
                ),
            )
        })
        .collect();
    let want: BTreeMap<String, (Vec<String>, Option<String>)> = (1..=3)
        .map(|i| {
            let name = format!("trellis-node-{i}");
            (
                name.clone(),
                (vec![format!("192.0.2.{}", 10 + i)], Some(name)),
            )
        })
        .collect();
    assert_eq!(got, want);

    // The operator runs as a recorded process, ready on its metrics port.
    let op = cp.operator().expect("the operator runs");
    assert_eq!(op.name, operator::NAME);
    let seen = proc_identity(op.pid).expect("the operator is alive");
    assert!(identity_matches(&op, &seen), "{op:?} vs {seen:?}");
    let recorded: Vec<_> = cp
        .sandbox()
        .recorded_processes()
        .expect("pid files")
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(recorded, ["trellis-operator", "kube-apiserver", "etcd"]);
    let port = cp
        .endpoints()
        .operator_metrics_port
        .expect("metrics port recorded");
    assert_eq!(
        cp.sandbox()
            .endpoints()
            .expect("endpoints file")
            .and_then(|e| e.operator_metrics_port),
        Some(port)
    );
    operator::readyz(port, Duration::from_secs(5))
        .await
        .expect("operator /readyz");
    let status = cp.sandbox().status().await.expect("status");
    assert!(status.healthy(), "{status:?}");
    assert_eq!(status.operator_readyz, Some(Ok("ok".into())));

    // With the default pool, every node gets its own /24 of 10.244.0.0/16.
    let pools = apply_pool_sample(&client, "network.trellis.dev_v1alpha1_ippool.yaml").await;
    assert!(pools.contains(&"default-ipv4".to_string()), "{pools:?}");
    let allocated = wait_for(
        "a NodeNetwork with pod CIDRs for each of 3 nodes",
        TIMEOUT,
        || {
            let client = client.clone();
            async move {
                let nns = node_networks(&client).await;
                (nns.len() == 3 && nns.values().all(|nn| !nn.spec.pod_cidrs.is_empty()))
                    .then_some(nns)
            }
        },
    )
    .await;
    let mut blocks = Vec::new();
    for (i, (name, nn)) in allocated.iter().enumerate() {
        assert_eq!(name, &format!("trellis-node-{}", i + 1));
        assert_eq!(nn.spec.underlay_address, format!("192.0.2.{}", 11 + i));
        assert_eq!(
            nn.spec.pod_cidrs.len(),
            1,
            "{name}: {:?}",
            nn.spec.pod_cidrs
        );
        let (addr, len) = parse_v4_cidr(&nn.spec.pod_cidrs[0]);
        assert_eq!(len, 24, "{name}");
        assert_eq!(addr.octets()[..2], [10, 244], "{name}: {addr}");
        blocks.push(addr);
    }
    blocks.sort();
    blocks.dedup();
    assert_eq!(blocks.len(), 3, "the /24s are disjoint: {allocated:?}");

    // A removed node's NodeNetwork goes too.
    assert!(cp.nodes().remove("trellis-node-2").await.expect("remove"));
    assert!(!cp.nodes().remove("trellis-node-2").await.expect("remove"));
    assert!(
        Api::<Node>::all(client.clone())
            .get_opt("trellis-node-2")
            .await
            .expect("get")
            .is_none()
    );
    wait_for("NodeNetwork trellis-node-2 to be deleted", TIMEOUT, || {
        let client = client.clone();
        async move {
            let nns = node_networks(&client).await;
            (!nns.contains_key("trellis-node-2")).then_some(())
        }
    })
    .await;
    let left: Vec<String> = node_networks(&client).await.into_keys().collect();
    assert_eq!(left, ["trellis-node-1", "trellis-node-3"]);

    // Stopping ends the operator first, then the apiserver, then etcd.
    let ended: Vec<_> = cp
        .stop()
        .expect("stop")
        .into_iter()
        .map(|e| (e.record.name, e.record.pid))
        .collect();
    let names: Vec<&str> = ended.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["trellis-operator", "kube-apiserver", "etcd"]);
    assert!(!is_alive(op.pid), "the operator (pid {}) survived", op.pid);
    for (name, pid) in &ended {
        assert!(!is_alive(*pid), "{name} (pid {pid}) survived stop");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_that_exits_fails_the_start_with_its_log() {
    use std::os::unix::fs::PermissionsExt as _;

    let tmp = tempfile::Builder::new()
        .prefix("trellis-fake-operator-")
        .tempdir()
        .expect("temp dir");
    let fake = tmp.path().join("trellis-operator");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"fake operator: cannot reach the apiserver ($*)\" >&2\nexit 3\n",
    )
    .expect("write the fake operator");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let mut opts = StartOptions::for_test("sandbox-operator-exits")
        .with_cluster(1)
        .expect("one node")
        .without_datapath();
    let state_dir = opts.state_dir.clone();
    if let Some(op) = opts.operator.as_mut() {
        op.binary = Some(fake);
    }
    let err = match ControlPlane::start(opts).await {
        Ok(_) => panic!("a start whose operator exits must fail"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        matches!(err, trellis_e2e::Error::ProcessExited { ref name, .. } if name == "trellis-operator"),
        "{msg}"
    );
    assert!(
        msg.contains("fake operator: cannot reach the apiserver"),
        "{msg}"
    );
    assert!(msg.contains("--identity trellis-operator-0"), "{msg}");
    // Everything it started was ended again; the state dir stays for inspection.
    let sandbox = trellis_e2e::Sandbox::new(&state_dir);
    assert!(sandbox.recorded_processes().expect("pid files").is_empty());
    sandbox.down(false).expect("remove the state dir");
}
