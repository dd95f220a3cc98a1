//! Executes a [`Plan`]: server-side apply with one field manager, deletes
//! with a UID precondition, Events. Keeps going after a failed write and
//! reports every failure, so one bad object never starves the others.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use trellis_api::v1alpha1::{IPPool, NETWORK_CONFIG_NAME, NetworkConfig, NodeNetwork};

use crate::plan::{POOL_FINALIZER, Plan, PlannedEvent, Regarding};

/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "trellis-operator";

/// No write may stall a pass longer than this (the client has no read
/// timeout of its own); a write that times out is retried like a conflict.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// One failed write.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct WriteError {
    pub what: String,
    #[source]
    pub source: WriteFailure,
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteFailure {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// Runs one write with [`WRITE_TIMEOUT`].
async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, WriteFailure> {
    match tokio::time::timeout(WRITE_TIMEOUT, fut).await {
        Ok(result) => result.map_err(WriteFailure::Kube),
        Err(_) => Err(WriteFailure::Timeout(WRITE_TIMEOUT)),
    }
}

impl WriteError {
    /// Transient failures (conflicts, timeouts, server errors) are retried
    /// with backoff; the rest wait for the next change.
    pub fn is_transient(&self) -> bool {
        match &self.source {
            WriteFailure::Kube(kube::Error::Api(status)) => {
                status.code == 409 || status.code == 429 || status.code >= 500
            }
            _ => true,
        }
    }

    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match &self.source {
            WriteFailure::Timeout(_) => "timeout",
            WriteFailure::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            WriteFailure::Kube(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => "invalid",
            WriteFailure::Kube(kube::Error::Api(s)) if s.code == 403 || s.code == 401 => {
                "forbidden"
            }
            WriteFailure::Kube(kube::Error::Api(_)) => "api",
            WriteFailure::Kube(_) => "transport",
        }
    }
}

/// What a pass changed on the apiserver, so the next pass can wait until the
/// watch caches show it (read-your-writes). Without this, a pass that starts
/// before the watch delivers our own write plans from the old state: it
/// writes the same object again, or, worse, allocates a block again for a
/// node whose record the cache does not show yet.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    /// NodeNetwork name → the `resourceVersion` of our last write to it.
    pub node_networks: BTreeMap<String, String>,
    /// NodeNetworks we deleted: name → UID of the deleted object.
    pub node_networks_deleted: BTreeMap<String, String>,
    /// IPPool name → `resourceVersion` of our last write.
    pub pools: BTreeMap<String, String>,
    /// `resourceVersion` of our last write to the NetworkConfig.
    pub config: Option<String>,
}

impl Written {
    pub fn is_empty(&self) -> bool {
        *self == Written::default()
    }

    fn record<K: Resource>(map: &mut BTreeMap<String, String>, name: &str, obj: &K) {
        if let Some(rv) = obj.meta().resource_version.clone() {
            map.insert(name.to_owned(), rv);
        }
    }
}

/// The result of applying a plan.
#[derive(Debug, Default)]
pub struct Applied {
    pub errors: Vec<WriteError>,
    pub written: Written,
}

/// Writes plans to the apiserver.
pub struct Writer {
    client: Client,
    recorder: Recorder,
}

impl Writer {
    pub fn new(client: Client, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Writer {
            recorder: Recorder::new(client.clone(), reporter),
            client,
        }
    }

    /// Applies every write of the plan; returns the failures and what was written.
    pub async fn apply(&self, plan: &Plan) -> Applied {
        let mut errors = Vec::new();
        let mut written = Written::default();
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        let node_networks: Api<NodeNetwork> = Api::all(self.client.clone());
        let pools: Api<IPPool> = Api::all(self.client.clone());
        let configs: Api<NetworkConfig> = Api::all(self.client.clone());
        let mut record = |what: String, result: Result<(), WriteFailure>| match result {
            Ok(()) => tracing::debug!(%what, "written"),
            Err(source) => errors.push(WriteError { what, source }),
        };

        for (name, node_uid, spec) in &plan.node_network_specs {
            // Owned by the Node, so a real cluster's garbage collector removes
            // it too; the operator deletes it itself (the sandbox has no GC).
            let body = json!({
                "apiVersion": "network.trellis.dev/v1alpha1", "kind": "NodeNetwork",
                "metadata": {"name": name, "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid
                }]},
                "spec": spec,
            });
            let result = timed(node_networks.patch(name, &apply, &Patch::Apply(&body)))
                .await
                .map(|nn| Written::record(&mut written.node_networks, name, &nn));
            record(format!("apply NodeNetwork {name} spec"), result);
        }
        for (name, status) in &plan.node_network_statuses {
            let body = json!({
                "apiVersion": "network.trellis.dev/v1alpha1", "kind": "NodeNetwork",
                "metadata": {"name": name}, "status": status,
            });
            let result = timed(node_networks.patch_status(name, &apply, &Patch::Apply(&body)))
                .await
                .map(|nn| Written::record(&mut written.node_networks, name, &nn));
            record(format!("apply NodeNetwork {name} status"), result);
        }
        for (name, uid) in &plan.node_network_deletes {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            let result = match timed(node_networks.delete(name, &params)).await {
                Ok(_) => {
                    written
                        .node_networks_deleted
                        .insert(name.clone(), uid.clone());
                    Ok(())
                }
                // Already gone (or replaced): nothing to do.
                Err(WriteFailure::Kube(kube::Error::Api(s))) if s.code == 404 || s.code == 409 => {
                    Ok(())
                }
                Err(e) => Err(e),
            };
            record(
                format!("delete NodeNetwork {name} of a deleted node"),
                result,
            );
        }
        for name in &plan.finalizers_to_add {
            let body = json!({
                "apiVersion": "network.trellis.dev/v1alpha1", "kind": "IPPool",
                "metadata": {"name": name, "finalizers": [POOL_FINALIZER]},
            });
            let result = timed(pools.patch(name, &apply, &Patch::Apply(&body)))
                .await
                .map(|p| Written::record(&mut written.pools, name, &p));
            record(format!("add finalizer to IPPool {name}"), result);
        }
        for (name, status) in &plan.pool_statuses {
            let body = json!({
                "apiVersion": "network.trellis.dev/v1alpha1", "kind": "IPPool",
                "metadata": {"name": name}, "status": status,
            });
            let result = timed(pools.patch_status(name, &apply, &Patch::Apply(&body)))
                .await
                .map(|p| Written::record(&mut written.pools, name, &p));
            record(format!("apply IPPool {name} status"), result);
        }
        for name in &plan.finalizers_to_remove {
            // Applying without the finalizer gives up our ownership of it,
            // which removes it (other writers' finalizers stay).
            let body = json!({
                "apiVersion": "network.trellis.dev/v1alpha1", "kind": "IPPool", "metadata": {"name": name},
            });
            let result = match timed(pools.patch(name, &apply, &Patch::Apply(&body))).await {
                // Releasing the last finalizer of a deleting pool removes it;
                // the watch then shows it gone rather than at this version.
                Ok(p) => {
                    if p.meta().deletion_timestamp.is_none() || !p.finalizers().is_empty() {
                        Written::record(&mut written.pools, name, &p);
                    }
                    Ok(())
                }
                Err(WriteFailure::Kube(kube::Error::Api(s))) if s.code == 404 => Ok(()),
                Err(e) => Err(e),
            };
            record(format!("release finalizer of IPPool {name}"), result);
        }
        if let Some(status) = &plan.config_status {
            let body = json!({
                "apiVersion": "network.trellis.dev/v1alpha1", "kind": "NetworkConfig",
                "metadata": {"name": NETWORK_CONFIG_NAME}, "status": status,
            });
            let result =
                timed(configs.patch_status(NETWORK_CONFIG_NAME, &apply, &Patch::Apply(&body)))
                    .await
                    .map(|c| written.config = c.meta().resource_version.clone());
            record("apply NetworkConfig status".into(), result);
        }
        for event in &plan.events {
            let result = timed(self.publish(event)).await;
            record(format!("publish event {}", event.reason), result);
        }
        Applied { errors, written }
    }

    async fn publish(&self, event: &PlannedEvent) -> Result<(), kube::Error> {
        let reference = match &event.regarding {
            Regarding::Node { name, uid } => ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(name.clone()),
                uid: Some(uid.clone()),
                ..Default::default()
            },
            Regarding::Pool { name, uid } => ObjectReference {
                api_version: Some(IPPool::api_version(&()).into_owned()),
                kind: Some(IPPool::kind(&()).into_owned()),
                name: Some(name.clone()),
                uid: Some(uid.clone()),
                ..Default::default()
            },
        };
        let ev = Event {
            type_: if event.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: event.reason.to_owned(),
            note: Some(truncate(&event.note, 1000)),
            action: "AllocateBlocks".into(),
            secondary: None,
        };
        self.recorder.publish(&ev, &reference).await
    }
}

/// At most `max` bytes, cut at a character boundary (Events refuse more than 1 kB).
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
