//! The node's view of the cluster for policy: reflector caches of what
//! the compiler reads, each waking the engine when it changes.
//!
//! ```text
//!  NetworkPolicy (all) ─┐
//!  PolicyBundle (all) ──┤
//!  Namespace (all) ─────┤
//!  SecurityIdentity ────┼──▶ stores ──▶ Snapshot (values, for the pure compiler)
//!  NodeEndpoints ───────┤        └────▶ changed (Notify) ──▶ engine resync
//!  Pod (this node) ─────┤
//!  NetworkConfig ───────┤
//!  IPPool (all) ────────┘   (where pod addresses can be: design 0006)
//! ```
//!
//! Nobody watches every Pod (design 0005): remote pods come from the
//! nodes' `NodeEndpoints` shards; only this node's pods are watched, for
//! their labels and container ports.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use trellis_api::v1alpha1::{IPPool, NetworkConfig, NodeEndpoints, PolicyBundle, SecurityIdentity};

/// The caches, and the tasks that fill them.
#[derive(Clone)]
pub struct Cluster {
    pub policies: Store<NetworkPolicy>,
    pub bundles: Store<PolicyBundle>,
    pub pools: Store<IPPool>,
    pub namespaces: Store<Namespace>,
    pub identities: Store<SecurityIdentity>,
    pub shards: Store<NodeEndpoints>,
    pub pods: Store<Pod>,
    pub configs: Store<NetworkConfig>,
    /// Notified after every change of any cache.
    pub changed: Arc<Notify>,
    /// The watch tasks, aborted when the last clone goes.
    _tasks: Arc<Tasks>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl Cluster {
    /// Starts the watches; `node` names this node (its pods are watched).
    pub fn watch(client: &Client, node: &str) -> Cluster {
        let changed = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        let policies = cache(
            Api::<NetworkPolicy>::all(client.clone()),
            watcher::Config::default(),
            &changed,
            &mut tasks,
        );
        let bundles = cache(
            Api::<PolicyBundle>::all(client.clone()),
            watcher::Config::default(),
            &changed,
            &mut tasks,
        );
        let pools = cache(
            Api::<IPPool>::all(client.clone()),
            watcher::Config::default(),
            &changed,
            &mut tasks,
        );
        let namespaces = cache(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            &changed,
            &mut tasks,
        );
        let identities = cache(
            Api::<SecurityIdentity>::all(client.clone()),
            watcher::Config::default(),
            &changed,
            &mut tasks,
        );
        let shards = cache(
            Api::<NodeEndpoints>::all(client.clone()),
            watcher::Config::default(),
            &changed,
            &mut tasks,
        );
        let pods = cache(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            &changed,
            &mut tasks,
        );
        let configs = cache(
            Api::<NetworkConfig>::all(client.clone()),
            watcher::Config::default(),
            &changed,
            &mut tasks,
        );
        Cluster {
            policies,
            bundles,
            pools,
            namespaces,
            identities,
            shards,
            pods,
            configs,
            changed,
            _tasks: Arc::new(Tasks(tasks)),
        }
    }

    /// Waits until every cache holds its initial list.
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.policies.wait_until_ready().await?;
        self.bundles.wait_until_ready().await?;
        self.pools.wait_until_ready().await?;
        self.namespaces.wait_until_ready().await?;
        self.identities.wait_until_ready().await?;
        self.shards.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.configs.wait_until_ready().await?;
        Ok(())
    }

    /// Whether every cache holds its initial list.
    pub fn is_ready(&self) -> bool {
        // A store is ready once its initial list is in; `ready()` is the
        // waiting form of the same.
        let ready = |f: futures::future::BoxFuture<'_, _>| {
            futures::FutureExt::now_or_never(f).is_some_and(|r: Result<(), _>| r.is_ok())
        };
        ready(Box::pin(self.ready()))
    }

    /// A pod of this node, by namespace and name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(namespace))
    }
}

/// A reflector of `api` whose every event notifies `changed`. Managed
/// fields are dropped before they reach the store (nobody here reads them).
fn cache<K>(
    api: Api<K>,
    cfg: watcher::Config,
    changed: &Arc<Notify>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store::<K>();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let stream = watcher(api, cfg)
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer);
    let changed = changed.clone();
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    tracing::warn!(kind, error = %e, "watch error; retrying with backoff")
                }
            }
        }
    }));
    store
}
