//! A sandbox cluster with pods, the way the policy tests and benchmarks start: one setup for
//! `tests/policy_restart.rs`, the truth-table world ([`crate::truth::world`]) and
//! `trellis-bench-policy`.
//!
//! ```text
//!  start_cluster(opts, nodes, pools)   the sandbox of `opts` with `nodes` numbered nodes, the
//!                                      operator and a trellis-node each; then `pools` applied
//!  apply_namespace(client, name)       Namespace <name> labelled ns=<name> (server-side apply)
//!  apply_policy(client, policy)        a NetworkPolicy (server-side apply, forced)
//!  app_pod(namespace, name, node, app) a PodSpec labelled app=<app>
//!  add_pods(pods, specs)               every pod at once; each with its address, in order
//!  ingress_from_app(ns, name, to, from, port)
//!                                      a NetworkPolicy: app=<to> accepts TCP <port> from
//!                                      app=<from> only
//!  shard_identity(client, node, pod)   the identity a node's NodeEndpoints gives a pod
//! ```

use std::net::IpAddr;

use futures::future::join_all;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use trellis_api::v1alpha1::{IPPool, NodeEndpoints};

use crate::{
    controlplane::{ControlPlane, StartOptions},
    error::{Error, Result},
    pods::{Pod, PodName, PodSpec, Pods},
    samples,
};

/// Starts the sandbox of `opts` with `nodes` numbered nodes, the operator and a `trellis-node`
/// per node ([`StartOptions::with_cluster`]), and applies `pools` (server-side, as
/// `field_manager`). Pods can be added once the nodes' networks are ready (which
/// [`Pods::add`] waits for).
pub async fn start_cluster(
    opts: StartOptions,
    nodes: usize,
    pools: &[IPPool],
    field_manager: &str,
) -> Result<ControlPlane> {
    let cp = ControlPlane::start(opts.with_cluster(nodes)?).await?;
    samples::apply_ippools(&cp.client(), pools, field_manager).await?;
    Ok(cp)
}

/// Applies Namespace `name`, labelled `ns=<name>` (server-side, as `field_manager`, forced):
/// what the policies of the tests select namespaces by.
pub async fn apply_namespace(client: &Client, name: &str, field_manager: &str) -> Result<()> {
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(field_manager).force(),
            &Patch::Apply(crate::truth::case::namespace(name)),
        )
        .await
        .map_err(|e| Error::kube(format!("apply Namespace {name}"), e))?;
    Ok(())
}

/// Applies `policy` in its namespace (server-side, as `field_manager`, forced).
pub async fn apply_policy(
    client: &Client,
    policy: &NetworkPolicy,
    field_manager: &str,
) -> Result<()> {
    let (namespace, name) = (
        policy.metadata.namespace.clone().unwrap_or_default(),
        policy.metadata.name.clone().unwrap_or_default(),
    );
    Api::<NetworkPolicy>::namespaced(client.clone(), &namespace)
        .patch(
            &name,
            &PatchParams::apply(field_manager).force(),
            &Patch::Apply(policy),
        )
        .await
        .map_err(|e| Error::kube(format!("apply NetworkPolicy {namespace}/{name}"), e))?;
    Ok(())
}

/// Pod `name` of namespace `namespace` on node `node`, labelled `app=<app>`: what the policies
/// of the tests and benchmarks select.
pub fn app_pod(namespace: &str, name: &str, node: &str, app: &str) -> PodSpec {
    PodSpec::new(name, node)
        .in_namespace(namespace)
        .with_label("app", app)
}

/// Adds the pods of `specs` all at once; each with its address, in the order of `specs`.
/// Every pod that could not be added or has no address is in the error.
pub async fn add_pods(pods: &Pods, specs: &[PodSpec]) -> Result<Vec<(Pod, IpAddr)>> {
    let added = join_all(specs.iter().map(|spec| pods.add(spec))).await;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for result in added {
        match result {
            Ok(pod) => match pod.ip() {
                Some(ip) => out.push((pod, ip)),
                None => errors.push(Error::InvalidPod {
                    pod: pod.key().to_string(),
                    reason: "has no address".into(),
                }),
            },
            Err(e) => errors.push(e),
        }
    }
    Error::from_list(errors)?;
    Ok(out)
}

/// NetworkPolicy `namespace/name`: pods labelled `app=<to>` are isolated for ingress and accept
/// TCP `port` from pods labelled `app=<from>` in the same namespace, nothing else.
pub fn ingress_from_app(
    namespace: &str,
    name: &str,
    to: &str,
    from: &str,
    port: u16,
) -> NetworkPolicy {
    crate::truth::policy(
        namespace,
        name,
        json!({
            "podSelector": {"matchLabels": {"app": to}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": from}}}],
                "ports": [{"protocol": "TCP", "port": port}],
            }],
        }),
    )
}

/// The identity number `node`'s NodeEndpoints shard gives `pod`; `None` while the shard does
/// not exist, cannot be read, or does not list the pod.
pub async fn shard_identity(client: &Client, node: &str, pod: &PodName) -> Option<u32> {
    let shard = Api::<NodeEndpoints>::all(client.clone())
        .get_opt(node)
        .await
        .ok()??;
    shard
        .spec
        .endpoints
        .iter()
        .find(|e| e.namespace == pod.namespace && e.name == pod.name)
        .and_then(|e| u32::try_from(e.identity).ok())
}
