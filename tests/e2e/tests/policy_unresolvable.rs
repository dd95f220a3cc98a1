//! A pod whose identity cannot be resolved any more does not stop its node's
//! policy: the node keeps syncing for every other pod, says which pod in
//! `PolicyReady`, and takes the pod back once it can be resolved again.
//!
//! ```text
//!  trellis-node-1                 trellis-node-2
//!  server app=server TCP :80      client app=client, odd app=odd
//!
//!  odd relabelled with 257 labels (an identity holds at most 256: the node
//!  cannot make one) ─▶ node 2's PolicyReady: EnforcedWithProblems naming odd
//!  NetworkPolicy: client may send nothing ─▶ client can no longer reach the
//!  server (node 2 went on syncing) ─▶ odd relabelled back ─▶ the problem is gone
//! ```
//!
//! Every wait is on a condition with a bound. The sandbox lives in
//! `/tmp/trellis-e2e-policy-unresolvable`. Needs root.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use trellis_api::v1alpha1::{MAX_IDENTITY_LABELS, NETWORKSTATUS_POLICY_READY, NetworkStatus};
use trellis_e2e::{
    StartOptions,
    cluster::{add_pods, app_pod, apply_namespace, apply_policy, start_cluster},
    operator, samples,
    truth::{
        Protocol, policy,
        traffic::{PROBE_TIMEOUT, probe, serve},
        world::{FIELD_MANAGER, wait_nodes_ready},
    },
    wait_for,
};

const TEST: &str = "policy-unresolvable";
const NODE_A: &str = "trellis-node-1";
const NODE_B: &str = "trellis-node-2";
const NAMESPACE: &str = "trellis-unres";
const PORT: u16 = 80;
const TIMEOUT: Duration = Duration::from_secs(60);

/// Node `node`'s `PolicyReady` condition: (reason, message).
async fn policy_ready(client: &Client, node: &str) -> Option<(String, String)> {
    let status = Api::<NetworkStatus>::all(client.clone())
        .get_opt(node)
        .await
        .ok()??
        .status?;
    let c = status
        .conditions
        .into_iter()
        .find(|c| c.type_ == NETWORKSTATUS_POLICY_READY)?;
    Some((c.reason, c.message))
}

async fn relabel(client: &Client, name: &str, labels: BTreeMap<String, Option<String>>) {
    Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": labels}})),
        )
        .await
        .unwrap_or_else(|e| panic!("relabel pod {NAMESPACE}/{name}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_cannot_be_resolved_does_not_stop_the_nodes_policy() {
    let pools = samples::ippools(samples::IPPOOL_SAMPLE).expect("IPPool sample");
    let cp = start_cluster(StartOptions::for_test(TEST), 2, &pools, FIELD_MANAGER)
        .await
        .expect("the sandbox starts with its IPPools");
    let client = cp.client();
    wait_nodes_ready(&client, 2).await;
    apply_namespace(&client, NAMESPACE, FIELD_MANAGER)
        .await
        .expect("apply the namespace");
    let pods = cp.pods();
    let specs = [
        app_pod(NAMESPACE, "server", NODE_A, "server"),
        app_pod(NAMESPACE, "client", NODE_B, "client"),
        app_pod(NAMESPACE, "odd", NODE_B, "odd"),
    ];
    let [(server, server_ip), (client_pod, _), _]: [_; 3] = add_pods(&pods, &specs)
        .await
        .expect("add the server, the client and the odd pod")
        .try_into()
        .expect("three pods");
    let server_name = format!("{NAMESPACE}/server");
    let _listener = serve(Some(&server.netns_path()), &server_name, &[PORT])
        .await
        .expect("the server's listener");
    let target = SocketAddr::new(server_ip, PORT);
    let client_ns = client_pod.netns_path();
    let reaches = |want: bool| {
        let (client_ns, server_name) = (client_ns.clone(), server_name.clone());
        move || {
            let (client_ns, server_name) = (client_ns.clone(), server_name.clone());
            async move {
                let seen = probe(Some(&client_ns), Protocol::Tcp, target, PROBE_TIMEOUT).await;
                (seen.is_allowed(&server_name) == want).then_some(())
            }
        }
    };
    wait_for("the client to reach the server", TIMEOUT, reaches(true)).await;

    // More labels than an identity may hold: node 2 cannot resolve the pod.
    let too_many: BTreeMap<String, Option<String>> = (0..=MAX_IDENTITY_LABELS)
        .map(|i| (format!("trellis-k{i}"), Some("v".to_owned())))
        .collect();
    relabel(&client, "odd", too_many.clone()).await;
    let (reason, message) = wait_for(
        "node 2's PolicyReady to name the pod it cannot resolve",
        TIMEOUT,
        || async {
            policy_ready(&client, NODE_B)
                .await
                .filter(|(_, m)| m.contains(&format!("{NAMESPACE}/odd")))
        },
    )
    .await;
    assert_eq!(
        reason, "EnforcedWithProblems",
        "the maps still hold every pod's policy: {message}"
    );
    assert!(
        message.contains("cannot be resolved"),
        "the message says why: {message}"
    );

    // Node 2 goes on syncing: the client's new egress isolation is enforced.
    let deny_egress: NetworkPolicy = policy(
        NAMESPACE,
        "client-sends-nothing",
        json!({
            "podSelector": {"matchLabels": {"app": "client"}},
            "policyTypes": ["Egress"],
        }),
    );
    apply_policy(&client, &deny_egress, FIELD_MANAGER)
        .await
        .expect("apply the NetworkPolicy");
    wait_for(
        "node 2 to enforce the client's egress isolation",
        TIMEOUT,
        reaches(false),
    )
    .await;

    // Resolvable again: the problem goes.
    let back: BTreeMap<String, Option<String>> = too_many.into_keys().map(|k| (k, None)).collect();
    relabel(&client, "odd", back).await;
    let (reason, message) = wait_for(
        "node 2's PolicyReady to drop the pod once it resolves",
        TIMEOUT,
        || async {
            policy_ready(&client, NODE_B)
                .await
                .filter(|(_, m)| !m.contains(&format!("{NAMESPACE}/odd")))
        },
    )
    .await;
    assert_eq!(reason, "Enforced", "nothing left to report: {message}");

    // The engine's work shows in node 2's /metrics.
    let port = cp
        .nodes()
        .agent_metrics_port(NODE_B)
        .expect("node 2's agent")
        .expect("a metrics port");
    let (status, text) = operator::http_get(port, "/metrics", Duration::from_secs(5))
        .await
        .expect("node 2's /metrics");
    assert_eq!(status, 200, "{text}");
    let value = |line: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line} in node 2's /metrics:\n{text}"))
    };
    assert!(value("trellis_node_policy_syncs_total") >= 3.0);
    // Three pods, the node's own addresses.
    assert!(value("trellis_node_policy_ipcache_entries") >= 4.0);
    assert!(
        value("trellis_node_policy_map_writes_total{op=\"set_endpoint\",result=\"ok\"}") >= 2.0
    );
    assert_eq!(
        value("trellis_node_cni_add_phase_duration_seconds_count{phase=\"attach\"}"),
        2.0,
        "the client's and the odd pod's ADDs"
    );
}
