//! The shell around [`crate::policy_status`]: watches the policy objects and
//! what nodes report, and after every burst of changes recomputes every
//! bundle's status and writes the ones that differ (`policybundles/status`,
//! server-side apply, field manager [`FIELD_MANAGER`]), only while leading.
//!
//! ```text
//!  watch NetworkPolicy, PolicyBundle, NodeEndpoints, SecurityIdentity ─┐
//!  (shared) NetworkConfig, NetworkStatus stores ───────────────────────┤ Stores::subscribe
//!        ▼ debounce: 100 ms without changes, at most 500 ms           │
//!  policy_status::rollup(snapshot) ─▶ changed statuses ─▶ patch_status (SSA)
//! ```
//!
//! A loop of its own rather than a part of [`crate::plan`]: the IPAM pass
//! must not wait on policy writes, and a busy cluster's pod churn (every
//! shard write) must not replan blocks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use serde_json::json;
use tokio::sync::{OnceCell, watch};
use tokio::task::JoinHandle;
use trellis_api::v1alpha1::{
    NETWORK_CONFIG_NAME, NodeEndpoints, PolicyBundle, PolicyBundleStatus, PolicyEnforcement,
    SecurityIdentity,
};
use trellis_common::versions::resource_version_reached;

use crate::apply::{FIELD_MANAGER, WRITE_TIMEOUT, WriteError, WriteFailure};
use crate::controller::{CachesNotSynced, Stores};
use crate::policy_status::{self, Input, Rollup};

/// The caches the rollup reads besides the shared [`Stores`] (the identity
/// collection, [`crate::identity_gc_controller`], reads two of them too).
#[derive(Clone)]
pub struct PolicyStores {
    pub policies: Store<NetworkPolicy>,
    pub bundles: Store<PolicyBundle>,
    pub endpoints: Store<NodeEndpoints>,
    pub identities: Store<SecurityIdentity>,
    /// One shared wait for the four caches, as [`Stores`] has: a store
    /// wakes only one of several concurrent `wait_until_ready` callers.
    synced: Arc<OnceCell<bool>>,
}

impl PolicyStores {
    /// Starts the four watches; their events wake [`run`] through `stores`.
    pub fn watch(client: &Client, stores: &Stores) -> (Self, Vec<JoinHandle<()>>) {
        let mut tasks = Vec::new();
        let out = PolicyStores {
            policies: stores.watch_more(client, &mut tasks),
            bundles: stores.watch_more(client, &mut tasks),
            endpoints: stores.watch_more(client, &mut tasks),
            identities: stores.watch_more(client, &mut tasks),
            synced: Arc::new(OnceCell::new()),
        };
        (out, tasks)
    }

    /// Waits until the four caches hold their initial lists; safe from any
    /// number of tasks at once.
    pub async fn ready(&self) -> Result<(), CachesNotSynced> {
        let ok = self
            .synced
            .get_or_init(|| async {
                self.policies.wait_until_ready().await.is_ok()
                    && self.bundles.wait_until_ready().await.is_ok()
                    && self.endpoints.wait_until_ready().await.is_ok()
                    && self.identities.wait_until_ready().await.is_ok()
            })
            .await;
        if *ok { Ok(()) } else { Err(CachesNotSynced) }
    }
}

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct PolicyLoopConfig {
    /// After a change, recompute once nothing else changed for this long:
    /// the nodes' reports of one policy change arrive within tens of
    /// milliseconds of each other, and one pass for all of them is enough.
    pub quiet: Duration,
    /// ... but no later than this after the first change: a rollout that
    /// keeps the caches busy still gets its status written.
    pub debounce: Duration,
    /// A full pass at least this often, even without events.
    pub resync: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How long the next pass waits for the bundle cache to show this
    /// pass's writes.
    pub read_your_writes: Duration,
}

impl Default for PolicyLoopConfig {
    fn default() -> Self {
        PolicyLoopConfig {
            quiet: Duration::from_millis(100),
            debounce: Duration::from_millis(500),
            resync: Duration::from_secs(300),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            read_your_writes: Duration::from_secs(10),
        }
    }
}

/// What one pass did.
#[derive(Debug)]
pub struct PolicyPass {
    pub rollup: Rollup,
    pub errors: Vec<WriteError>,
    /// Bundle name → `resourceVersion` of our write.
    pub written: BTreeMap<String, String>,
    pub took: Duration,
}

/// The rollup's input from the caches, and the rollup.
pub fn compute(stores: &Stores, policy: &PolicyStores, now: &Time) -> Rollup {
    let enforcement = stores
        .configs
        .get(&ObjectRef::new(NETWORK_CONFIG_NAME))
        .map_or(PolicyEnforcement::default(), |c| c.spec.policy_enforcement);
    let policies: Vec<NetworkPolicy> = owned(policy.policies.state());
    let bundles: Vec<PolicyBundle> = owned(policy.bundles.state());
    let statuses = owned(stores.statuses.state());
    let endpoints: Vec<NodeEndpoints> = owned(policy.endpoints.state());
    let identities: Vec<SecurityIdentity> = owned(policy.identities.state());
    policy_status::rollup(
        &Input {
            enforcement,
            policies: &policies,
            bundles: &bundles,
            statuses: &statuses,
            endpoints: &endpoints,
            identities: &identities,
        },
        now,
    )
}

pub(crate) fn owned<K: Clone>(v: Vec<std::sync::Arc<K>>) -> Vec<K> {
    v.into_iter().map(|a| (*a).clone()).collect()
}

/// One pass: compute, then write the statuses that changed.
pub async fn reconcile_once(client: &Client, stores: &Stores, policy: &PolicyStores) -> PolicyPass {
    let started = Instant::now();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let rollup = compute(stores, policy, &now);
    let api: Api<PolicyBundle> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut errors = Vec::new();
    let mut written = BTreeMap::new();
    for (name, status) in &rollup.statuses {
        match write_status(&api, &params, name, status).await {
            Ok(Some(rv)) => {
                written.insert(name.clone(), rv);
            }
            Ok(None) => {}
            Err(source) => errors.push(WriteError {
                what: format!("apply PolicyBundle {name} status"),
                source,
            }),
        }
    }
    PolicyPass {
        rollup,
        errors,
        written,
        took: started.elapsed(),
    }
}

async fn write_status(
    api: &Api<PolicyBundle>,
    params: &PatchParams,
    name: &str,
    status: &PolicyBundleStatus,
) -> Result<Option<String>, WriteFailure> {
    let body = json!({
        "apiVersion": "network.trellis.dev/v1alpha1", "kind": "PolicyBundle",
        "metadata": {"name": name}, "status": status,
    });
    match tokio::time::timeout(
        WRITE_TIMEOUT,
        api.patch_status(name, params, &Patch::Apply(&body)),
    )
    .await
    {
        Ok(Ok(b)) => Ok(b.meta().resource_version.clone()),
        // Deleted since the snapshot: nothing to report on.
        Ok(Err(kube::Error::Api(s))) if s.code == 404 => Ok(None),
        Ok(Err(e)) => Err(WriteFailure::Kube(e)),
        Err(_) => Err(WriteFailure::Timeout(WRITE_TIMEOUT)),
    }
}

/// Whether the bundle cache shows every write of `written` (or the bundle is gone).
fn shows(policy: &PolicyStores, written: &BTreeMap<String, String>) -> bool {
    written.iter().all(|(name, want)| {
        policy.bundles.get(&ObjectRef::new(name)).is_none_or(|b| {
            b.metadata
                .resource_version
                .as_deref()
                .is_some_and(|rv| resource_version_reached(rv, want))
        })
    })
}

/// Rolls realisation up on every change while `leading` is true, until
/// `shutdown`, starting once every cache holds its initial list.
pub async fn run(
    client: Client,
    stores: Stores,
    policy: PolicyStores,
    mut leading: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    cfg: PolicyLoopConfig,
    mut on_pass: impl FnMut(&PolicyPass),
) {
    let mut updates = stores.subscribe();
    // A partial view would report nodes as missing and write it.
    tokio::select! {
        res = async { stores.ready().await.and(policy.ready().await) } => if res.is_err() { return },
        _ = shutdown.wait_for(|s| *s) => return,
    }
    let mut backoff: Option<Duration> = None;
    let mut first = true;
    loop {
        if !first {
            let wait = backoff.unwrap_or(cfg.resync);
            tokio::select! {
                res = updates.changed() => if res.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
                res = leading.changed() => if res.is_err() { return },
                _ = shutdown.wait_for(|s| *s) => return,
            }
            // Coalesce the burst: whatever arrives until a quiet moment (or
            // the debounce's end) is in this pass.
            let end = tokio::time::Instant::now() + cfg.debounce;
            loop {
                updates.borrow_and_update();
                tokio::select! {
                    res = updates.changed() => if res.is_err() { return },
                    _ = tokio::time::sleep(cfg.quiet) => break,
                    _ = tokio::time::sleep_until(end) => break,
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        }
        first = false;
        updates.borrow_and_update();
        if !*leading.borrow_and_update() {
            continue;
        }
        let pass = tokio::select! {
            pass = reconcile_once(&client, &stores, &policy) => pass,
            _ = leading.wait_for(|l| !*l) => {
                tracing::warn!("lost leadership during a policy status pass; stopped writing");
                continue;
            }
            _ = shutdown.wait_for(|s| *s) => return,
        };
        on_pass(&pass);
        if !pass.written.is_empty() {
            let wait = async {
                let mut seen = stores.subscribe();
                while !shows(&policy, &pass.written) {
                    if seen.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            };
            tokio::select! {
                res = tokio::time::timeout(cfg.read_your_writes, wait) => if res.is_err() {
                    tracing::warn!(after = ?cfg.read_your_writes,
                        "the PolicyBundle watch does not show this pass's status writes yet; recomputing anyway");
                },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
        backoff = if pass.errors.iter().any(WriteError::is_transient) {
            Some(backoff.map_or(cfg.min_backoff, |b| (b * 2).min(cfg.max_backoff)))
        } else {
            None
        };
    }
}
