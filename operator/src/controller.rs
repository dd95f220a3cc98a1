//! The controller shell: watches fill in-memory stores; any change wakes one
//! reconcile pass that plans from a snapshot of all stores and writes only
//! what differs.
//!
//! ```text
//!  watch Node ──┐
//!  watch IPPool ─┤ reflector stores ──▶ Notify ──▶ pass: Snapshot ─▶ plan() ─▶ Writer::apply()
//!  watch NetworkConfig, NodeNetwork, NetworkStatus ┘        (only while leading)
//! ```
//!
//! Why one global pass rather than kube-runtime's per-object `Controller`:
//! block allocation is a decision over all nodes and pools at once (which
//! block is free, which pool is older), so a per-node reconcile would redo
//! the global computation for every node. One pass costs O(n log n) for the
//! whole cluster, a few milliseconds at 5,000 nodes, and writes only what
//! changed. Events that arrive during a pass coalesce into one more pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, OnceCell, watch};
use tokio::task::JoinHandle;
use trellis_api::v1alpha1::{IPPool, NetworkConfig, NetworkStatus, NodeNetwork};

use crate::apply::Writer;
use crate::plan::{Plan, Snapshot, plan};

/// In-memory copies of everything the operator reads.
#[derive(Clone)]
pub struct Stores {
    pub nodes: Store<Node>,
    pub pools: Store<IPPool>,
    pub configs: Store<NetworkConfig>,
    pub node_networks: Store<NodeNetwork>,
    pub statuses: Store<NetworkStatus>,
    /// One shared wait for all five caches: kube-runtime's
    /// `Store::wait_until_ready` keeps a single waker (a oneshot receiver),
    /// so of several tasks waiting on a store at once only the last polled
    /// would ever wake. Through this cell any number of tasks may wait.
    synced: Arc<OnceCell<bool>>,
}

/// A watch ended before its cache held the initial list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a watch stopped before its cache was filled")]
pub struct CachesNotSynced;

impl Stores {
    pub fn new(
        nodes: Store<Node>,
        pools: Store<IPPool>,
        configs: Store<NetworkConfig>,
        node_networks: Store<NodeNetwork>,
        statuses: Store<NetworkStatus>,
    ) -> Self {
        Stores {
            nodes,
            pools,
            configs,
            node_networks,
            statuses,
            synced: Arc::default(),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            nodes: self.nodes.state(),
            pools: self.pools.state(),
            configs: self.configs.state(),
            node_networks: self.node_networks.state(),
            statuses: self.statuses.state(),
        }
    }

    /// Waits until every store has its initial list; safe from any number of
    /// tasks at once.
    pub async fn ready(&self) -> Result<(), CachesNotSynced> {
        let synced = self
            .synced
            .get_or_init(|| async {
                self.nodes.wait_until_ready().await.is_ok()
                    && self.pools.wait_until_ready().await.is_ok()
                    && self.configs.wait_until_ready().await.is_ok()
                    && self.node_networks.wait_until_ready().await.is_ok()
                    && self.statuses.wait_until_ready().await.is_ok()
            })
            .await;
        if *synced {
            Ok(())
        } else {
            Err(CachesNotSynced)
        }
    }
}

/// Starts a watch per kind; each change notifies `changed`.
pub fn watch_all(client: &Client, changed: Arc<Notify>) -> (Stores, Vec<JoinHandle<()>>) {
    let mut tasks = Vec::new();
    let nodes = watch_kind::<Node>(client, &changed, &mut tasks);
    let pools = watch_kind::<IPPool>(client, &changed, &mut tasks);
    let configs = watch_kind::<NetworkConfig>(client, &changed, &mut tasks);
    let node_networks = watch_kind::<NodeNetwork>(client, &changed, &mut tasks);
    let statuses = watch_kind::<NetworkStatus>(client, &changed, &mut tasks);
    (
        Stores::new(nodes, pools, configs, node_networks, statuses),
        tasks,
    )
}

fn watch_kind<K>(
    client: &Client,
    changed: &Arc<Notify>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let api: Api<K> = Api::all(client.clone());
    let changed = changed.clone();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::warn!(kind = %K::kind(&()), error = %e, "watch error; retrying with backoff"),
            }
        }
    }));
    store
}

/// What one pass did, for logs and metrics.
#[derive(Debug)]
pub struct PassReport {
    pub plan: Plan,
    pub errors: Vec<crate::apply::WriteError>,
    pub took: Duration,
}

/// One reconcile pass: snapshot, plan, write.
pub async fn reconcile_once(stores: &Stores, writer: &Writer) -> PassReport {
    let started = Instant::now();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let plan = plan(&stores.snapshot(), &now);
    let errors = if plan.writes() == 0 {
        Vec::new()
    } else {
        writer.apply(&plan).await
    };
    PassReport {
        plan,
        errors,
        took: started.elapsed(),
    }
}

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// A full pass at least this often, even without events.
    pub resync: Duration,
    /// First retry delay after a transient failure; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            resync: Duration::from_secs(300),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Reconciles on every change while `leading` is true, until `shutdown`,
/// starting only once every store holds its initial list. `on_pass` sees
/// every pass (metrics, logs).
pub async fn run(
    stores: Stores,
    changed: Arc<Notify>,
    writer: Writer,
    mut leading: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    cfg: LoopConfig,
    mut on_pass: impl FnMut(&PassReport),
) {
    // Never plan from a partial view: with an empty NodeNetwork store every
    // node would look unallocated and its blocks would be handed out anew.
    tokio::select! {
        res = stores.ready() => if res.is_err() { return },
        _ = shutdown.wait_for(|s| *s) => return,
    }
    let mut backoff: Option<Duration> = None;
    loop {
        let wait = backoff.unwrap_or(cfg.resync);
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            res = leading.changed() => if res.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if !*leading.borrow_and_update() {
            continue;
        }
        // A pass in flight is dropped the moment leadership is lost.
        let pass = tokio::select! {
            report = reconcile_once(&stores, &writer) => report,
            _ = leading.wait_for(|l| !*l) => {
                tracing::warn!("lost leadership during a reconcile pass; stopped writing");
                continue;
            }
            _ = shutdown.wait_for(|s| *s) => return,
        };
        on_pass(&pass);
        // Transient failures retry after a growing delay (the `sleep` arm
        // above), even without a new event; permanent ones wait for a change.
        backoff = if pass.errors.iter().any(|e| e.is_transient()) {
            Some(backoff.map_or(cfg.min_backoff, |b| (b * 2).min(cfg.max_backoff)))
        } else {
            None
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;

    /// kube-runtime wakes one of several concurrent waiters on a store;
    /// `Stores::ready` must wake them all.
    #[tokio::test]
    async fn every_concurrent_waiter_sees_the_caches_synced() {
        let (nodes, mut w1) = reflector::store::<Node>();
        let (pools, mut w2) = reflector::store::<IPPool>();
        let (configs, mut w3) = reflector::store::<NetworkConfig>();
        let (node_networks, mut w4) = reflector::store::<NodeNetwork>();
        let (statuses, mut w5) = reflector::store::<NetworkStatus>();
        let stores = Stores::new(nodes, pools, configs, node_networks, statuses);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let stores = stores.clone();
                tokio::spawn(async move { stores.ready().await })
            })
            .collect();
        // Let every waiter register before the caches fill.
        tokio::task::yield_now().await;
        w1.apply_watcher_event(&Event::InitDone);
        w2.apply_watcher_event(&Event::InitDone);
        w3.apply_watcher_event(&Event::InitDone);
        w4.apply_watcher_event(&Event::InitDone);
        w5.apply_watcher_event(&Event::InitDone);
        for waiter in waiters {
            let woke = tokio::time::timeout(Duration::from_secs(5), waiter).await;
            assert_eq!(woke.expect("every waiter wakes").expect("task"), Ok(()));
        }
        assert_eq!(
            stores.ready().await,
            Ok(()),
            "and later callers return at once"
        );
    }
}
