//! A node reuses the identity the cluster has for a label set, wherever its
//! number is (design 0005: after a race lost with another view of the taken
//! ids, a label set can hold a number off its probe path), instead of
//! creating a second one at the number it would pick.
//!
//! ```text
//!  pod first (app=twin) ─▶ identity p (the number the label set prefers) ─▶ pod removed,
//!  identity p deleted, the same labels created by hand at p + 1, the agent restarted
//!  pod second (app=twin) ─▶ its shard names p + 1; no identity p is created
//! ```
//!
//! The sandbox lives in `/tmp/trellis-e2e-identity-allocation`. Needs root.

use std::time::Duration;

use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use trellis_api::v1alpha1::SecurityIdentity;
use trellis_e2e::{
    PodName, StartOptions,
    cluster::{app_pod, apply_namespace, shard_identity, start_cluster},
    samples,
    truth::world::{FIELD_MANAGER, wait_nodes_ready},
    wait_for,
};

const TEST: &str = "identity-allocation";
const NODE: &str = "trellis-node-1";
const NAMESPACE: &str = "trellis-idalloc";
const TIMEOUT: Duration = Duration::from_secs(60);

/// The identity `NODE`'s shard gives pod `name`, once it lists it.
async fn wait_shard_identity(client: &Client, name: &str) -> u32 {
    let pod = PodName::new(NAMESPACE, name);
    wait_for(
        &format!("{NODE}'s NodeEndpoints to list {NAMESPACE}/{name}"),
        TIMEOUT,
        || shard_identity(client, NODE, &pod),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_set_keeps_the_identity_the_cluster_has_off_its_probe_path() {
    let pools = samples::ippools(samples::IPPOOL_SAMPLE).expect("IPPool sample");
    let cp = start_cluster(StartOptions::for_test(TEST), 1, &pools, FIELD_MANAGER)
        .await
        .expect("the sandbox starts with its IPPools");
    let client = cp.client();
    wait_nodes_ready(&client, 1).await;
    apply_namespace(&client, NAMESPACE, FIELD_MANAGER)
        .await
        .expect("apply the namespace");
    let pods = cp.pods();
    let identities: Api<SecurityIdentity> = Api::all(client.clone());

    pods.add(&app_pod(NAMESPACE, "first", NODE, "twin"))
        .await
        .expect("add the first pod");
    let preferred = wait_shard_identity(&client, "first").await;
    let original = identities
        .get(&preferred.to_string())
        .await
        .expect("the first pod's identity");
    assert!(
        pods.remove(PodName::new(NAMESPACE, "first"))
            .await
            .expect("remove the first pod"),
        "the pod existed"
    );
    identities
        .delete(&preferred.to_string(), &DeleteParams::default())
        .await
        .expect("delete the identity by hand");
    let elsewhere = preferred + 1;
    assert!(
        identities
            .get_opt(&elsewhere.to_string())
            .await
            .expect("read")
            .is_none(),
        "identity {elsewhere} is free in a fresh sandbox"
    );
    let mut moved = SecurityIdentity::new(&elsewhere.to_string(), original.spec.clone());
    moved.metadata.labels = original.metadata.labels.clone();
    identities
        .create(&PostParams::default(), &moved)
        .await
        .expect("create the same labels at the next number");
    // A restarted agent answers no ADD before its caches hold their first
    // lists, so the moved identity is in its cache when the pod comes.
    let nodes = cp.nodes();
    nodes.kill_agent(NODE).await.expect("stop the node's agent");
    nodes
        .start_agent(NODE)
        .await
        .expect("start the node's agent again");

    pods.add(&app_pod(NAMESPACE, "second", NODE, "twin"))
        .await
        .expect("add the second pod");
    assert_eq!(
        wait_shard_identity(&client, "second").await,
        elsewhere,
        "the label set's identity is the one the cluster has"
    );
    assert!(
        identities
            .get_opt(&preferred.to_string())
            .await
            .expect("read")
            .is_none(),
        "no second identity was created for the label set at {preferred}"
    );
}
