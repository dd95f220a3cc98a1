//! `PolicyBundle.status` on a real sandbox: the operator rolls what the nodes report up into
//! the bundle (design 0006, "Is my bundle enforced?" in docs/policy.md).
//!
//! ```text
//!  trellis-node-1: web-1 (app=web)   trellis-node-2: web-2 (app=web)   trellis-node-3: db (app=db)
//!  PolicyBundle trellis-protect-web: subject app=web, Deny ingress from 192.0.2.0/24
//!
//!  apply ─▶ desired = realized = 2, no lagging, Accepted/Realized True, Conflicting False,
//!           observedGeneration = 1                       (node 3 hosts no subject pod)
//!  stop node 2's trellis-node, edit the bundle ─▶ desired 2, realized 1,
//!           laggingNodes = [trellis-node-2], Realized False (NodesLagging), observedGeneration 2
//!  start it again ─▶ desired = realized = 2, Realized True
//! ```
//!
//! The expected numbers come from where the test put its pods, not from the operator's
//! inputs. Accepted=False is covered by the operator's unit tests only: every invalid bundle
//! the compiler knows of is refused by the CRD schema already (tests/api_validation.rs).
//! Every wait is on a condition with a bound. The sandbox lives in
//! `/tmp/trellis-e2e-policy-bundle-status`. Needs root.

use std::time::Duration;

use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;
use trellis_api::v1alpha1::{
    POLICYBUNDLE_ACCEPTED, POLICYBUNDLE_CONFLICTING, POLICYBUNDLE_REALIZED, PolicyBundle,
    PolicyBundleStatus,
};
use trellis_e2e::{
    StartOptions,
    cluster::{add_pods, app_pod, apply_namespace, start_cluster},
    samples,
    truth::world::{FIELD_MANAGER, wait_nodes_ready},
};

const TEST: &str = "policy-bundle-status";
const NAMESPACE: &str = "trellis-pbstatus";
const BUNDLE: &str = "trellis-protect-web";
const NODE_1: &str = "trellis-node-1";
const NODE_2: &str = "trellis-node-2";
const NODE_3: &str = "trellis-node-3";
/// Bound of every wait on the cluster.
const TIMEOUT: Duration = Duration::from_secs(90);

fn bundle(priority: i32) -> serde_json::Value {
    json!({
        "apiVersion": "network.trellis.dev/v1alpha1",
        "kind": "PolicyBundle",
        "metadata": {"name": BUNDLE},
        "spec": {
            "tier": "Admin",
            "priority": priority,
            "subject": {"podSelector": {"matchLabels": {"app": "web"}}},
            "ingress": [{
                "name": "no-test-net",
                "action": "Deny",
                "peers": [{"ipBlock": {"cidr": "192.0.2.0/24"}}],
            }],
        },
    })
}

async fn apply_bundle(api: &Api<PolicyBundle>, priority: i32) -> i64 {
    let b = api
        .patch(
            BUNDLE,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(bundle(priority)),
        )
        .await
        .expect("apply the PolicyBundle");
    b.metadata.generation.expect("a generation")
}

/// `(status, reason)` of condition `type_`.
fn condition(status: &PolicyBundleStatus, type_: &str) -> Option<(String, String)> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Waits until the bundle's status describes `generation` and `holds`; returns it.
async fn wait_status(
    api: &Api<PolicyBundle>,
    what: &str,
    generation: i64,
    holds: impl Fn(&PolicyBundleStatus) -> bool,
) -> PolicyBundleStatus {
    let mut last = None;
    let found = tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Ok(b) = api.get(BUNDLE).await {
                let status = b.status.unwrap_or_default();
                if status.observed_generation == Some(generation) && holds(&status) {
                    return status;
                }
                last = Some(status);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!("timed out after {TIMEOUT:?} waiting for {what}; last status: {last:#?}")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_status_counts_realised_and_lagging_nodes() {
    let pools = samples::ippools(samples::IPPOOL_SAMPLE).expect("IPPool sample");
    let cp = start_cluster(StartOptions::for_test(TEST), 3, &pools, FIELD_MANAGER)
        .await
        .expect("the sandbox starts with its IPPools");
    let client = cp.client();
    let nodes = cp.nodes();
    wait_nodes_ready(&client, 3).await;
    apply_namespace(&client, NAMESPACE, FIELD_MANAGER)
        .await
        .expect("apply the namespace");
    add_pods(
        &cp.pods(),
        &[
            app_pod(NAMESPACE, "web-1", NODE_1, "web"),
            app_pod(NAMESPACE, "web-2", NODE_2, "web"),
            app_pod(NAMESPACE, "db", NODE_3, "db"),
        ],
    )
    .await
    .expect("add the pods");

    let api: Api<PolicyBundle> = Api::all(client.clone());
    let first = apply_bundle(&api, 100).await;
    let status = wait_status(
        &api,
        "Realized=True on the two nodes with web pods",
        first,
        |s| {
            s.desired_nodes == 2
                && s.realized_nodes == 2
                && condition(s, POLICYBUNDLE_REALIZED).is_some_and(|(st, _)| st == "True")
        },
    )
    .await;
    assert!(status.lagging_nodes.is_empty(), "{status:#?}");
    assert_eq!(
        condition(&status, POLICYBUNDLE_ACCEPTED),
        Some(("True".into(), "Valid".into())),
        "{status:#?}"
    );
    assert_eq!(
        condition(&status, POLICYBUNDLE_CONFLICTING),
        Some(("False".into(), "NoConflict".into())),
        "{status:#?}"
    );
    assert_eq!(
        condition(&status, POLICYBUNDLE_REALIZED),
        Some(("True".into(), "AllNodesEnforce".into())),
        "{status:#?}"
    );
    eprintln!("generation {first}: realised on 2 of 2 nodes");

    // Node 2 stops enforcing anything new; the edit reaches only node 1.
    let stopped = nodes
        .stop_agent(NODE_2)
        .await
        .expect("stop trellis-node-2's agent");
    assert!(stopped.is_some(), "trellis-node-2 had an agent to stop");
    let second = apply_bundle(&api, 101).await;
    assert!(second > first, "the edit bumps the generation");
    let status = wait_status(
        &api,
        "trellis-node-2 listed as lagging after the edit",
        second,
        |s| s.lagging_nodes == [NODE_2.to_owned()],
    )
    .await;
    assert_eq!(
        (status.desired_nodes, status.realized_nodes),
        (2, 1),
        "{status:#?}"
    );
    assert_eq!(
        condition(&status, POLICYBUNDLE_REALIZED),
        Some(("False".into(), "NodesLagging".into())),
        "{status:#?}"
    );
    let message = &status
        .conditions
        .iter()
        .find(|c| c.type_ == POLICYBUNDLE_REALIZED)
        .expect("Realized")
        .message;
    assert_eq!(
        message,
        &format!("1 of 2 nodes enforce generation {second}; lagging: {NODE_2}"),
    );
    eprintln!("generation {second}: {message}");

    // Back: the node catches up and the bundle is realised everywhere again.
    nodes
        .start_agent(NODE_2)
        .await
        .expect("start trellis-node-2's agent again");
    let status = wait_status(&api, "Realized=True again", second, |s| {
        s.desired_nodes == 2
            && s.realized_nodes == 2
            && condition(s, POLICYBUNDLE_REALIZED).is_some_and(|(st, _)| st == "True")
    })
    .await;
    assert!(status.lagging_nodes.is_empty(), "{status:#?}");
}
