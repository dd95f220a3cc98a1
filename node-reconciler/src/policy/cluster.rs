//! The node's view of the cluster for policy: reflector caches of what
//! the compiler reads, each waking the engine when it changes.
//!
//! ```text
//!  NetworkPolicy (all) ─┐
//!  PolicyBundle (all) ──┤
//!  Namespace (all) ─────┤
//!  SecurityIdentity ────┼──▶ stores ──▶ Snapshot (values, for the pure compiler)
//!  NodeEndpoints ───────┼──▶ ShardFeed (what changed, see super::shards)        └────▶ changed (Notify) ──▶ engine resync
//!  Pod (this node) ─────┤
//!  NetworkConfig ───────┤
//!  IPPool (all) ────────┘   (where pod addresses can be: design 0006)
//! ```
//!
//! Nobody watches every Pod (design 0005): remote pods come from the
//! nodes' `NodeEndpoints` shards; only this node's pods are watched, for
//! their labels and container ports. The NetworkPolicy cache also counts
//! its changes ([`Revision`]), so the engine can tell in O(1) that the
//! policies are the ones it compiled last time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use trellis_api::v1alpha1::{IPPool, NetworkConfig, NodeEndpoints, PolicyBundle, SecurityIdentity};

use super::shards::ShardFeed;

/// The caches, and the tasks that fill them.
#[derive(Clone)]
pub struct Cluster {
    pub policies: Store<NetworkPolicy>,
    /// Changes so far of what the compiler's policy input is made of
    /// (`policies`, `bundles` and `pools`): one revision for the three.
    pub policies_revision: Revision,
    pub bundles: Store<PolicyBundle>,
    pub pools: Store<IPPool>,
    pub namespaces: Store<Namespace>,
    pub identities: Store<SecurityIdentity>,
    /// Changes of `identities` so far.
    pub identities_revision: Revision,
    /// The shards that changed since the engine last took them (no store:
    /// the engine keeps what it needs of them, see [`super::shards`]).
    pub shards: Arc<Mutex<ShardFeed>>,
    /// Whether `shards` has passed on its first list.
    shards_ready: watch::Receiver<bool>,
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

/// A cache's watch task ended before its first list.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("a cache of the cluster stopped before its first list")]
pub struct CacheStopped;

/// How many events a cache has taken. Bumped after the store took each one,
/// so what a reader finds in the store after reading revision `n` includes
/// every change up to `n`: equal revisions, equal contents.
#[derive(Debug, Clone, Default)]
pub struct Revision(Arc<AtomicU64>);

impl Revision {
    /// Read it before the store.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.0.fetch_add(1, Ordering::Release);
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
        let (policies, policies_revision) = cache(
            Api::<NetworkPolicy>::all(client.clone()),
            watcher::Config::default(),
            &changed,
            &mut tasks,
        );
        let bundles = cache_with(
            Api::<PolicyBundle>::all(client.clone()),
            watcher::Config::default(),
            &changed,
            &mut tasks,
            policies_revision.clone(),
        );
        let pools = cache_with(
            Api::<IPPool>::all(client.clone()),
            watcher::Config::default(),
            &changed,
            &mut tasks,
            policies_revision.clone(),
        );
        let (namespaces, _) = cache(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            &changed,
            &mut tasks,
        );
        let (identities, identities_revision) = cache(
            Api::<SecurityIdentity>::all(client.clone()),
            watcher::Config::default(),
            &changed,
            &mut tasks,
        );
        let (shards, shards_ready) = feed(
            Api::<NodeEndpoints>::all(client.clone()),
            &changed,
            &mut tasks,
        );
        let (pods, _) = cache(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            &changed,
            &mut tasks,
        );
        let (configs, _) = cache(
            Api::<NetworkConfig>::all(client.clone()),
            watcher::Config::default(),
            &changed,
            &mut tasks,
        );
        Cluster {
            policies,
            policies_revision,
            bundles,
            pools,
            namespaces,
            identities,
            identities_revision,
            shards,
            shards_ready,
            pods,
            configs,
            changed,
            _tasks: Arc::new(Tasks(tasks)),
        }
    }

    /// Waits until every cache holds its initial list; an error when a
    /// watch task is gone (the engine is shutting down).
    pub async fn ready(&self) -> Result<(), CacheStopped> {
        let stopped = |_| CacheStopped;
        self.policies.wait_until_ready().await.map_err(stopped)?;
        self.bundles.wait_until_ready().await.map_err(stopped)?;
        self.pools.wait_until_ready().await.map_err(stopped)?;
        self.namespaces.wait_until_ready().await.map_err(stopped)?;
        self.identities.wait_until_ready().await.map_err(stopped)?;
        let mut shards_ready = self.shards_ready.clone();
        shards_ready
            .wait_for(|r| *r)
            .await
            .map_err(|_| CacheStopped)?;
        self.pods.wait_until_ready().await.map_err(stopped)?;
        self.configs.wait_until_ready().await.map_err(stopped)?;
        Ok(())
    }

    /// A pod of this node, by namespace and name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(namespace))
    }
}

/// A watch of every `NodeEndpoints` shard feeding a [`ShardFeed`] (no
/// store), notifying `changed` after every change; the receiver turns
/// true once the first list is in the feed.
fn feed(
    api: Api<NodeEndpoints>,
    changed: &Arc<Notify>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> (Arc<Mutex<ShardFeed>>, watch::Receiver<bool>) {
    let feed = Arc::new(Mutex::new(ShardFeed::new()));
    let (ready_tx, ready) = watch::channel(false);
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear());
    let (changed, into) = (changed.clone(), feed.clone());
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    let ready = {
                        let mut f = into.lock().unwrap_or_else(PoisonError::into_inner);
                        f.event(event);
                        f.is_ready()
                    };
                    ready_tx.send_if_modified(|r| !std::mem::replace(r, ready) && ready);
                    changed.notify_one();
                }
                Err(e) => {
                    tracing::warn!(kind = "NodeEndpoints", error = %e, "watch error; retrying with backoff")
                }
            }
        }
    }));
    (feed, ready)
}

/// A reflector of `api` whose every event bumps its revision and notifies
/// `changed`. Managed fields are dropped before they reach the store
/// (nobody here reads them).
fn cache<K>(
    api: Api<K>,
    cfg: watcher::Config,
    changed: &Arc<Notify>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> (Store<K>, Revision)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let revision = Revision::default();
    let store = cache_with(api, cfg, changed, tasks, revision.clone());
    (store, revision)
}

/// [`cache`] bumping a revision it shares with other caches.
fn cache_with<K>(
    api: Api<K>,
    cfg: watcher::Config,
    changed: &Arc<Notify>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
    bumped: Revision,
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
                // `reflect` has applied the event to the store by now.
                Ok(_) => {
                    bumped.bump();
                    changed.notify_one();
                }
                Err(e) => {
                    tracing::warn!(kind, error = %e, "watch error; retrying with backoff")
                }
            }
        }
    }));
    store
}
