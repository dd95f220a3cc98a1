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
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, OnceCell, watch};
use tokio::task::JoinHandle;
use trellis_api::v1alpha1::{
    IPPool, NETWORK_CONFIG_NAME, NetworkConfig, NetworkStatus, NodeNetwork,
};

use trellis_common::versions::resource_version_reached;

use crate::apply::{Applied, Writer, Written};
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
    /// Bumped after every event any watch applied to its store.
    updates: Arc<watch::Sender<u64>>,
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
        Self::with_updates(
            nodes,
            pools,
            configs,
            node_networks,
            statuses,
            Arc::new(watch::Sender::new(0)),
        )
    }

    fn with_updates(
        nodes: Store<Node>,
        pools: Store<IPPool>,
        configs: Store<NetworkConfig>,
        node_networks: Store<NodeNetwork>,
        statuses: Store<NetworkStatus>,
        updates: Arc<watch::Sender<u64>>,
    ) -> Self {
        Stores {
            nodes,
            pools,
            configs,
            node_networks,
            statuses,
            synced: Arc::default(),
            updates,
        }
    }

    /// Tells waiters in [`Stores::reflects`] that a store changed; the watch
    /// tasks call it after every event (tests that fill stores by hand too).
    pub fn touched(&self) {
        self.updates.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether every store shows the writes of `written`: each written
    /// object at the returned version or later, each deleted one gone.
    pub fn shows(&self, written: &Written) -> bool {
        let reached = |rv: Option<&String>, want: &str| {
            rv.is_some_and(|rv| resource_version_reached(rv, want))
        };
        let nn_ok = written.node_networks.iter().all(|(name, want)| {
            self.node_networks
                .get(&ObjectRef::new(name))
                .is_some_and(|nn| reached(nn.metadata.resource_version.as_ref(), want))
        });
        let deleted_ok = written.node_networks_deleted.iter().all(|(name, uid)| {
            self.node_networks
                .get(&ObjectRef::new(name))
                .is_none_or(|nn| nn.metadata.uid.as_deref() != Some(uid.as_str()))
        });
        let pools_ok = written.pools.iter().all(|(name, want)| {
            // A pool deleted meanwhile has nothing left to show.
            self.pools
                .get(&ObjectRef::new(name))
                .is_none_or(|p| reached(p.metadata.resource_version.as_ref(), want))
        });
        let config_ok = written.config.as_deref().is_none_or(|want| {
            self.configs
                .get(&ObjectRef::new(NETWORK_CONFIG_NAME))
                .is_none_or(|c| reached(c.metadata.resource_version.as_ref(), want))
        });
        nn_ok && deleted_ok && pools_ok && config_ok
    }

    /// Waits until the stores show `written` (read-your-writes), at most
    /// `limit`; returns whether they do. Plans made before the watch has
    /// delivered our own writes would repeat them.
    pub async fn reflects(&self, written: &Written, limit: Duration) -> bool {
        let mut updates = self.updates.subscribe();
        let wait = async {
            loop {
                updates.borrow_and_update();
                if self.shows(written) {
                    return;
                }
                if updates.changed().await.is_err() {
                    // No watch is left to bring the change.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// A receiver that sees every event any watch applied (the policy
    /// status loop waits on it; several receivers never steal each other's
    /// wake-ups, unlike the reconcile loop's `Notify`).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.updates.subscribe()
    }

    /// Starts a watch of `K` whose events bump [`Stores::subscribe`]
    /// receivers but do not wake the reconcile loop (which does not read `K`).
    pub fn watch_more<K>(&self, client: &Client, tasks: &mut Vec<JoinHandle<()>>) -> Store<K>
    where
        K: Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let signal = Signal {
            changed: Arc::new(Notify::new()),
            updates: self.updates.clone(),
        };
        watch_kind::<K>(client, &signal, tasks)
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
    let updates = Arc::new(watch::Sender::new(0));
    let signal = Signal {
        changed,
        updates: updates.clone(),
    };
    let nodes = watch_kind::<Node>(client, &signal, &mut tasks);
    let pools = watch_kind::<IPPool>(client, &signal, &mut tasks);
    let configs = watch_kind::<NetworkConfig>(client, &signal, &mut tasks);
    let node_networks = watch_kind::<NodeNetwork>(client, &signal, &mut tasks);
    let statuses = watch_kind::<NetworkStatus>(client, &signal, &mut tasks);
    (
        Stores::with_updates(nodes, pools, configs, node_networks, statuses, updates),
        tasks,
    )
}

/// What a watch task pokes after applying an event to its store.
#[derive(Clone)]
struct Signal {
    /// Wakes the reconcile loop.
    changed: Arc<Notify>,
    /// Wakes read-your-writes waiters.
    updates: Arc<watch::Sender<u64>>,
}

fn watch_kind<K>(client: &Client, signal: &Signal, tasks: &mut Vec<JoinHandle<()>>) -> Store<K>
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
    let signal = signal.clone();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    signal.updates.send_modify(|n| *n = n.wrapping_add(1));
                    signal.changed.notify_one();
                }
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
    pub written: Written,
    pub took: Duration,
}

/// One reconcile pass: snapshot, plan, write.
pub async fn reconcile_once(stores: &Stores, writer: &Writer) -> PassReport {
    let started = Instant::now();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let plan = plan(&stores.snapshot(), &now);
    let applied = if plan.writes() == 0 {
        Applied::default()
    } else {
        writer.apply(&plan).await
    };
    PassReport {
        plan,
        errors: applied.errors,
        written: applied.written,
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
    /// How long the next pass waits for the watches to show this pass's
    /// writes before it plans anyway (a watch that lags this long is
    /// broken; the writes are idempotent, so planning then is only wasteful).
    pub read_your_writes: Duration,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            resync: Duration::from_secs(300),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            read_your_writes: Duration::from_secs(10),
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
        if !pass.written.is_empty() {
            tokio::select! {
                shown = stores.reflects(&pass.written, cfg.read_your_writes) => if !shown {
                    tracing::warn!(
                        after = ?cfg.read_your_writes,
                        "the watches do not show this pass's writes yet; planning anyway"
                    );
                },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
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

    fn node_network(name: &str, rv: &str) -> NodeNetwork {
        let spec = trellis_api::v1alpha1::NodeNetworkSpec {
            pod_cidrs: vec!["10.244.0.0/24".into()],
            underlay_address: "192.0.2.1".into(),
            encapsulation: trellis_api::v1alpha1::Encapsulation::None,
            vxlan: None,
            vtep: None,
            mtu: None,
        };
        let mut nn = NodeNetwork::new(name, spec);
        nn.metadata.resource_version = Some(rv.into());
        nn.metadata.uid = Some(format!("uid-{name}"));
        nn
    }

    fn empty_stores() -> (Stores, reflector::store::Writer<NodeNetwork>) {
        let (nodes, _) = reflector::store::<Node>();
        let (pools, _) = reflector::store::<IPPool>();
        let (configs, _) = reflector::store::<NetworkConfig>();
        let (node_networks, w) = reflector::store::<NodeNetwork>();
        let (statuses, _) = reflector::store::<NetworkStatus>();
        (
            Stores::new(nodes, pools, configs, node_networks, statuses),
            w,
        )
    }

    /// A pass must not plan from a cache that predates its own writes: the
    /// wait ends when the watch brings the written version, not before.
    #[tokio::test]
    async fn the_next_pass_waits_for_the_cache_to_show_its_writes() {
        let (stores, mut w) = empty_stores();
        w.apply_watcher_event(&Event::Apply(node_network("n1", "41")));
        stores.touched();
        let written = Written {
            node_networks: [("n1".to_owned(), "42".to_owned())].into(),
            ..Written::default()
        };
        assert!(!stores.shows(&written), "version 41 predates the write");
        let waiter = {
            let (stores, written) = (stores.clone(), written.clone());
            tokio::spawn(async move { stores.reflects(&written, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "nothing new arrived yet");
        w.apply_watcher_event(&Event::Apply(node_network("n1", "42")));
        stores.touched();
        let shown = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(shown.expect("the waiter wakes").expect("task"));
    }

    #[tokio::test]
    async fn a_deleted_object_is_shown_once_the_cache_drops_it() {
        let (stores, mut w) = empty_stores();
        let old = node_network("gone", "7");
        w.apply_watcher_event(&Event::Apply(old.clone()));
        let written = Written {
            node_networks_deleted: [("gone".to_owned(), "uid-gone".to_owned())].into(),
            ..Written::default()
        };
        assert!(!stores.shows(&written));
        w.apply_watcher_event(&Event::Delete(old));
        assert!(stores.shows(&written));
        // A new object of the same name (another UID) is not the deleted one.
        let mut again = node_network("gone", "9");
        again.metadata.uid = Some("uid-new".into());
        w.apply_watcher_event(&Event::Apply(again));
        assert!(stores.shows(&written));
    }

    #[tokio::test]
    async fn waiting_gives_up_after_its_limit() {
        let (stores, _w) = empty_stores();
        let written = Written {
            node_networks: [("never".to_owned(), "1".to_owned())].into(),
            ..Written::default()
        };
        assert!(!stores.reflects(&written, Duration::from_millis(50)).await);
    }
}
