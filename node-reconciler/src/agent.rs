//! The reconcile loop: the shell around `desired`, `plan` and `report`.
//!
//! ```text
//!  watch NodeNetwork (all) ──▶ store ──┐
//!  netlink notifications, those `wake` keeps (our device, the underlay, ──┼──▶ reconcile ──▶ NetworkStatus (SSA, only on change)
//!    routes of protocol 210, entries on our device)                     │      observe ─▶ desired ─▶ plan ─▶ apply ─▶ observe ─▶ plan (what is still missing)
//!  resync timer, retry backoff ────────┘
//!  endpoint count (at most once a second) ──────────────────────────────────▶ NetworkStatus status.endpoints only
//! ```
//!
//! One reconcile at a time, always from a fresh netlink dump and the whole
//! store, so events only say *when* to look, never *what* changed: a lost or
//! coalesced event costs nothing but latency, bounded by the resync period.
//! Notifications that cannot change what a reconcile observes (the pods'
//! veths, routes and neighbours, which come by the dozen per pod) are
//! dropped before they wake the loop (see [`crate::wake`]), and so are our
//! own `NetworkStatus` writes coming back through the watch.
//! Nothing is done to the kernel before the store holds the initial list
//! (a partial view would delete routes to peers not yet seen), and nothing
//! at all while the node's own `NodeNetwork` is absent, so a restart adopts
//! the kernel state as it is.
//!
//! After each reconcile the loop publishes the node's facts (blocks, pod
//! MTU, whether it converged) for the endpoint service, after each
//! observation the node's own addresses for the policy engine (which gives
//! them identity `HOST`, without a dump of its own per pod), and the status
//! carries the endpoint service's count of Ready endpoints. A changed count
//! alone rewrites only that field of the last status, without a reconcile,
//! at once after a quiet second and otherwise at most once a second, so a
//! burst of pods costs a few writes, not one per pod.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde_json::json;
use tokio::sync::{Notify, watch};
use trellis_api::v1alpha1::{
    NETWORKSTATUS_POLICY_READY, NETWORKSTATUS_READY, NetworkStatus, NetworkStatusStatus,
    NodeNetwork,
};
use trellis_common::ops::Health;
use trellis_common::process::until_true;
use trellis_common::versions::resource_version_reached;

use crate::desired::{Desired, DesiredError, Host, desired};
use crate::endpoint::NodeFacts;
use crate::metrics::{ErrorKind, Metrics, NotificationEffect, Trigger};
use crate::netns::{NetnsHandle, Notifications};
use crate::observe::{Snapshot, observe};
use crate::plan::{Op, plan};
use crate::policy::engine::PolicyReport;
use crate::report::{Outcome, report, status};
use crate::wake::{self, Interest};

/// Field manager of every write `trellis-node` makes.
pub const FIELD_MANAGER: &str = "trellis-node";

/// The owner reference to the Node `node`, for the objects this process
/// writes about its node (`NetworkStatus`, `NodeEndpoints`), so that the
/// garbage collector removes them with the Node. `None` when the Node does
/// not exist (or has no uid yet).
pub async fn owner_of_node(
    client: &Client,
    node: &str,
) -> Result<Option<OwnerReference>, kube::Error> {
    let found = Api::<Node>::all(client.clone()).get_opt(node).await?;
    Ok(found
        .and_then(|n| n.metadata.uid)
        .map(|uid| OwnerReference {
            api_version: Node::api_version(&()).into_owned(),
            kind: Node::kind(&()).into_owned(),
            name: node.to_owned(),
            uid,
            ..OwnerReference::default()
        }))
}

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Node this reconciler manages (the `NodeNetwork` and
    /// `NetworkStatus` of the same name).
    pub node_name: String,
    /// A full reconcile at least this often, even without events.
    pub resync: Duration,
    /// First retry delay after a failure; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Where the node's facts go after each reconcile (the endpoint
    /// service reads them); `None` publishes nothing.
    pub facts: Option<watch::Sender<Option<NodeFacts>>>,
    /// Where the node's own addresses go after each observation that
    /// changed them (the policy engine reads them: see
    /// [`Snapshot::addresses`]); `None` publishes nothing.
    pub host_addresses: Option<watch::Sender<Option<Vec<IpAddr>>>>,
    /// The endpoint service's count of Ready endpoints, for
    /// `status.endpoints`; `None` leaves that field as it is.
    pub endpoints: Option<watch::Receiver<usize>>,
    /// The policy engine's state, for the `PolicyReady` condition and
    /// `status.policyHash`; `None` reports no policy condition.
    pub policy: Option<watch::Receiver<PolicyReport>>,
}

impl Config {
    pub fn new(node_name: impl Into<String>) -> Self {
        Config {
            node_name: node_name.into(),
            resync: Duration::from_secs(10),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            facts: None,
            host_addresses: None,
            endpoints: None,
            policy: None,
        }
    }
}

/// Runs until `shutdown` turns true. Leaves the kernel as it is on the way
/// out: the datapath outlives the process.
pub async fn run(
    client: Client,
    netns: Arc<NetnsHandle>,
    cfg: Config,
    metrics: Metrics,
    health: Health,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let spec_changed = Arc::new(Notify::new());
    let (store, watch_task) = watch_node_networks(&client, spec_changed.clone());
    // What the loop observes, for the notification filter: unknown (every
    // notification wakes the loop) until the first observation.
    let interest = watch::Sender::new(None);
    let mut kernel = subscribe(&netns, &interest, &metrics).await?;
    let mut reporter = Reporter::new(client.clone(), &cfg.node_name).await;
    let (mut written_elsewhere, status_task) = watch_own_status(&client, &cfg.node_name);

    tokio::select! {
        res = store.wait_until_ready() => res?,
        () = until_true(shutdown.clone()) => {
            watch_task.abort();
            status_task.abort();
            return Ok(());
        }
    }
    tracing::info!(node = %cfg.node_name, "NodeNetwork cache synced");

    let mut trigger = Trigger::Start;
    let mut backoff: Option<Duration> = None;
    let mut endpoints = cfg.endpoints.clone();
    let mut policy = cfg.policy.clone();
    // The endpoint count the status shows: taken at start and then at most
    // once per `ENDPOINTS_INTERVAL`, so a burst of pods costs a few status
    // writes, not one per pod; a change after a quiet second shows at once.
    let mut shown = endpoints.as_mut().map(|rx| *rx.borrow_and_update());
    let mut endpoints_throttle = Throttle::new(ENDPOINTS_INTERVAL);
    let mut endpoints_due: Option<Instant> = None;
    'run: loop {
        health.beat();
        if trigger == Trigger::Endpoints {
            shown = endpoints.as_mut().map(|rx| *rx.borrow_and_update());
            endpoints_throttle.fired(Instant::now());
        }
        let failed = match (trigger, shown) {
            // Only the count changed: the rest of the status stands as last
            // written, so no dumps and no reconcile.
            (Trigger::Endpoints, Some(n)) if reporter.last.is_some() => {
                !reporter.publish_endpoints(n, &metrics).await
            }
            _ => {
                let node_ns = Kernel {
                    netns: &netns,
                    interest: &interest,
                    addresses: cfg.host_addresses.as_ref(),
                };
                reconcile(
                    &store,
                    &node_ns,
                    &cfg,
                    &metrics,
                    &mut reporter,
                    trigger,
                    shown,
                )
                .await
            }
        };
        health.set_ready(true);
        backoff = if failed {
            Some(backoff.map_or(cfg.min_backoff, |b| (b * 2).min(cfg.max_backoff)))
        } else {
            None
        };
        let resync_at = tokio::time::Instant::now() + backoff.unwrap_or(cfg.resync);
        // Notifications our own writes caused arrive around now; the next
        // turn consumes them in one reconcile that finds nothing to do (those
        // of the pods' endpoints never wake the loop: see `wake`).
        trigger = loop {
            let woke = tokio::select! {
                _ = spec_changed.notified() => Some(Trigger::Spec),
                Some((rv, seen)) = written_elsewhere.recv() => {
                    // Our own writes come back too, and events of an earlier
                    // write may arrive after a later one: only a change newer
                    // than our last write that leaves something else than we
                    // wrote (deleted, or edited by someone) counts.
                    if reporter.newer_than_ours(rv) && reporter.last.as_ref() != seen.as_ref() {
                        tracing::info!("NetworkStatus was changed or deleted by someone else; writing it again");
                        reporter.forget(seen.is_some());
                        Some(Trigger::Spec)
                    } else {
                        None
                    }
                }
                changed = kernel.changed() => match changed {
                    Ok(()) => {
                        kernel.borrow_and_update();
                        Some(Trigger::Kernel)
                    }
                    Err(_) => {
                        tracing::warn!("netlink notifications stopped (socket overrun?); subscribing again");
                        kernel = subscribe(&netns, &interest, &metrics).await?;
                        Some(Trigger::Resync)
                    }
                },
                Some(()) = changed(&mut endpoints), if endpoints_due.is_none() => {
                    // Later changes pile up in the watch until the slot.
                    endpoints_due = Some(endpoints_throttle.slot(Instant::now()));
                    None
                }
                Some(()) = changed(&mut policy) => Some(Trigger::Policy),
                () = sleep_until(endpoints_due), if endpoints_due.is_some() => {
                    endpoints_due = None;
                    Some(Trigger::Endpoints)
                }
                () = tokio::time::sleep_until(resync_at) => {
                    Some(if backoff.is_some() { Trigger::Retry } else { Trigger::Resync })
                }
                () = until_true(shutdown.clone()) => break 'run,
            };
            if let Some(t) = woke {
                break t;
            }
        };
    }
    watch_task.abort();
    status_task.abort();
    Ok(())
}

/// How often at most the status is rewritten for a changed endpoint count.
const ENDPOINTS_INTERVAL: Duration = Duration::from_secs(1);

/// At most one event per interval: the first one after a quiet interval at
/// once, later ones at the end of the interval. Pure.
#[derive(Debug, Clone, Copy)]
struct Throttle {
    interval: Duration,
    last: Option<Instant>,
}

impl Throttle {
    fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            last: None,
        }
    }

    /// When an event wanted at `now` may happen.
    fn slot(&self, now: Instant) -> Instant {
        self.last
            .map_or(now, |last| (last + self.interval).max(now))
    }

    /// An event happened at `now`.
    fn fired(&mut self, now: Instant) {
        self.last = Some(now);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Subscribes to the node namespace's notifications, waking the loop only
/// for those that can change what it observes (see [`crate::wake`]), and
/// counting both kinds.
async fn subscribe(
    netns: &NetnsHandle,
    interest: &watch::Sender<Option<Interest>>,
    metrics: &Metrics,
) -> Result<watch::Receiver<Notifications>, crate::netns::NetnsError> {
    let interest = interest.subscribe();
    let metrics = metrics.clone();
    netns
        .subscribe_filtered(move |message| {
            let wakes = wake::wakes(message, interest.borrow().as_ref());
            let effect = if wakes {
                NotificationEffect::Wake
            } else {
                NotificationEffect::Ignored
            };
            metrics.netlink_events(effect, 1);
            wakes
        })
        .await
}

/// The reasons of `PolicyReady`.
const POLICY_ENFORCED: &str = "Enforced";
const POLICY_ENFORCED_WITH_PROBLEMS: &str = "EnforcedWithProblems";
const POLICY_NOT_ENFORCED: &str = "NotEnforced";
const POLICY_REASONS: [&str; 3] = [
    POLICY_ENFORCED,
    POLICY_ENFORCED_WITH_PROBLEMS,
    POLICY_NOT_ENFORCED,
];

/// Resolves when the watched value changes; `None` once its sender is gone
/// (the branch then waits for the others), never without a receiver.
async fn changed<T>(rx: &mut Option<watch::Receiver<T>>) -> Option<()> {
    match rx {
        Some(rx) => rx.changed().await.ok(),
        None => std::future::pending().await,
    }
}

/// The `PolicyReady` condition and `status.policyHash` of the engine's
/// report. Before the engine's first sync after a start, the condition
/// `previous` had stays (the pinned maps still enforce what it says), so a
/// restart that changes nothing writes nothing.
fn add_policy(
    r: &mut crate::report::Report,
    policy: &PolicyReport,
    previous: Option<&NetworkStatusStatus>,
) {
    if !policy.synced {
        let kept = previous.and_then(|p| {
            p.conditions
                .iter()
                .find(|c| c.type_ == NETWORKSTATUS_POLICY_READY)
        });
        let (status, reason, message) = match kept {
            Some(c) => (
                c.status == "True",
                POLICY_REASONS
                    .into_iter()
                    .find(|r| *r == c.reason)
                    .unwrap_or(POLICY_NOT_ENFORCED),
                c.message.clone(),
            ),
            None => (false, POLICY_NOT_ENFORCED, policy.message.clone()),
        };
        r.conditions.push(trellis_common::conditions::Cond::new(
            NETWORKSTATUS_POLICY_READY,
            status,
            reason,
            message,
        ));
        return;
    }
    let reason = match (policy.ready, policy.diagnostics.is_empty()) {
        (true, true) => POLICY_ENFORCED,
        (true, false) => POLICY_ENFORCED_WITH_PROBLEMS,
        (false, _) => POLICY_NOT_ENFORCED,
    };
    let mut message = policy.message.clone();
    for d in policy.diagnostics.iter().take(3) {
        message.push_str("; ");
        message.push_str(d);
    }
    if policy.diagnostics.len() > 3 {
        message.push_str(&format!("; and {} more", policy.diagnostics.len() - 3));
    }
    r.conditions.push(trellis_common::conditions::Cond::new(
        NETWORKSTATUS_POLICY_READY,
        policy.ready,
        reason,
        message,
    ));
    r.status.policy_hash = policy.hash.clone();
}

/// A version of this node's `NetworkStatus` as the watch shows it:
/// `resourceVersion` and status (`None` once deleted).
type SeenStatus = (Option<String>, Option<NetworkStatusStatus>);

/// Watches this node's own `NetworkStatus`, sending its status after every
/// change (`None` once deleted), so a status deleted or overwritten by hand
/// is written again rather than left wrong until the next change.
fn watch_own_status(
    client: &Client,
    node: &str,
) -> (
    tokio::sync::mpsc::Receiver<SeenStatus>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let api = Api::<NetworkStatus>::all(client.clone());
    let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let task = tokio::spawn(async move {
        let stream = watcher(api, cfg).default_backoff();
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let seen = match event {
                Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => {
                    Some((obj.metadata.resource_version, obj.status))
                }
                Ok(watcher::Event::Delete(obj)) => Some((obj.metadata.resource_version, None)),
                Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "NetworkStatus watch error; retrying with backoff");
                    None
                }
            };
            if let Some(seen) = seen
                && tx.send(seen).await.is_err()
            {
                break;
            }
        }
    });
    (rx, task)
}

fn watch_node_networks(
    client: &Client,
    changed: Arc<Notify>,
) -> (Store<NodeNetwork>, tokio::task::JoinHandle<()>) {
    let (store, writer) = reflector::store::<NodeNetwork>();
    let stream = watcher(
        Api::<NodeNetwork>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    tracing::warn!(error = %e, "NodeNetwork watch error; retrying with backoff")
                }
            }
        }
    });
    (store, task)
}

/// What one pass through the kernel found.
struct Pass {
    snapshot: Snapshot,
    desired: Desired,
    remaining: Vec<Op>,
    errors: Vec<String>,
    transient: bool,
}

/// One reconcile; returns whether it should be retried soon.
async fn reconcile(
    store: &Store<NodeNetwork>,
    node_ns: &Kernel<'_>,
    cfg: &Config,
    metrics: &Metrics,
    reporter: &mut Reporter,
    trigger: Trigger,
    endpoints: Option<usize>,
) -> bool {
    let started = Instant::now();
    let own = store.get(&ObjectRef::new(&cfg.node_name));
    let Some(own) = own else {
        publish_facts(cfg, Vec::new(), None, false);
        let mut r = report(&cfg.node_name, &[], None, &Outcome::NoNodeNetwork);
        r.endpoints = endpoints;
        if let Some(policy) = &cfg.policy {
            add_policy(&mut r, &policy.borrow(), reporter.last.as_ref());
        }
        metrics.reconciled(trigger, started.elapsed());
        metrics.set_state(0, 0, false);
        return !reporter.publish(r, metrics).await;
    };
    let generation = own.metadata.generation;
    let cidrs = &own.spec.pod_cidrs;

    let result = converge(store, node_ns, &cfg.node_name, &own, metrics).await;
    publish_facts(
        cfg,
        blocks_of(cidrs),
        result.as_ref().ok().map(|p| p.desired.pod_mtu),
        result.is_ok(),
    );
    let (mut r, retry) = match &result {
        Err(Failure::Observe(why)) => {
            metrics.error(ErrorKind::Observe);
            (
                report(
                    &cfg.node_name,
                    cidrs,
                    generation,
                    &Outcome::ObserveFailed(why.clone()),
                ),
                true,
            )
        }
        Err(Failure::Spec(err, host)) => {
            metrics.error(ErrorKind::Spec);
            tracing::warn!(error = %err, "cannot program this node's NodeNetwork");
            (
                report(
                    &cfg.node_name,
                    cidrs,
                    generation,
                    &Outcome::Unusable(err, host),
                ),
                false,
            )
        }
        Ok(pass) => {
            if !pass.errors.is_empty() {
                metrics.error(ErrorKind::Apply);
            }
            let outcome = Outcome::Reconciled {
                desired: &pass.desired,
                host: &pass.snapshot.host,
                remaining: &pass.remaining,
                errors: &pass.errors,
            };
            let r = report(&cfg.node_name, cidrs, generation, &outcome);
            // Ops the kernel refused for good (a conflict a person must
            // resolve) are retried at the resync pace, not in a hot loop.
            (
                r,
                pass.transient || (!pass.remaining.is_empty() && pass.errors.is_empty()),
            )
        }
    };
    r.endpoints = endpoints;
    if let Some(policy) = &cfg.policy {
        add_policy(&mut r, &policy.borrow(), reporter.last.as_ref());
    }
    let ready = r
        .conditions
        .iter()
        .any(|c| c.type_ == NETWORKSTATUS_READY && c.status);
    let peers = usize::try_from(r.status.peers).unwrap_or(0);
    let routes = result.as_ref().map_or(0, |p| p.desired.routes.len());
    metrics.set_state(peers, routes, ready);
    let published = reporter.publish(r, metrics).await;
    metrics.reconciled(trigger, started.elapsed());
    retry || !published
}

/// The node's namespace as a reconcile uses it: where it observes and
/// applies, what it tells the notification filter to watch, and where the
/// node's addresses go.
struct Kernel<'a> {
    netns: &'a NetnsHandle,
    interest: &'a watch::Sender<Option<Interest>>,
    addresses: Option<&'a watch::Sender<Option<Vec<IpAddr>>>>,
}

enum Failure {
    Observe(String),
    Spec(DesiredError, Host),
}

/// The node's pod blocks from its spec; entries that do not parse are left
/// out (the reconcile reports them).
fn blocks_of(cidrs: &[String]) -> Vec<IpNet> {
    cidrs
        .iter()
        .filter_map(|c| c.parse::<IpNet>().ok())
        .map(|n| n.trunc())
        .collect()
}

/// Publishes the node's facts when they changed. A reconcile that could not
/// compute the pod MTU keeps the last one known.
fn publish_facts(cfg: &Config, blocks: Vec<IpNet>, pod_mtu: Option<u32>, ready: bool) {
    let Some(tx) = &cfg.facts else {
        return;
    };
    tx.send_if_modified(|facts| {
        let pod_mtu = pod_mtu
            .or_else(|| facts.as_ref().map(|f| f.pod_mtu))
            .unwrap_or(0);
        let next = NodeFacts {
            blocks,
            pod_mtu,
            ready,
        };
        if facts.as_ref() == Some(&next) {
            return false;
        }
        tracing::info!(blocks = ?next.blocks, pod_mtu, ready, "node facts for pod endpoints");
        *facts = Some(next);
        true
    });
}

/// observe → desired → plan → apply → observe → plan.
async fn converge(
    store: &Store<NodeNetwork>,
    node_ns: &Kernel<'_>,
    node: &str,
    own: &NodeNetwork,
    metrics: &Metrics,
) -> Result<Pass, Failure> {
    let underlay: IpAddr = match own.spec.underlay_address.parse() {
        Ok(ip) => ip,
        Err(_) => {
            let err = DesiredError::Underlay(own.spec.underlay_address.clone());
            let host = Host {
                underlay: None,
                underlay_networks: Vec::new(),
            };
            return Err(Failure::Spec(err, host));
        }
    };
    let snapshot = observe_in(node_ns, underlay).await?;
    let all = store.state();
    let peers: Vec<(&str, &trellis_api::v1alpha1::NodeNetworkSpec)> = all
        .iter()
        .filter_map(|nn| Some((nn.metadata.name.as_deref()?, &nn.spec)))
        .collect();
    let want = desired(node, &own.spec, &peers, &snapshot.host)
        .map_err(|e| Failure::Spec(e, snapshot.host.clone()))?;
    let ops = plan(&want, &snapshot.observed);
    if ops.is_empty() {
        return Ok(Pass {
            snapshot,
            desired: want,
            remaining: Vec::new(),
            errors: Vec::new(),
            transient: false,
        });
    }
    tracing::info!(ops = ops.len(), "converging");
    let to_apply = ops.clone();
    let failures = node_ns
        .netns
        .run(move |h| async move {
            crate::apply::apply(&h, &to_apply)
                .await
                .into_iter()
                .map(|e| (e.to_string(), e.is_transient()))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Failure::Observe(e.to_string()))?;
    metrics.wrote(&ops);
    let after = observe_in(node_ns, underlay).await?;
    let remaining = plan(&want, &after.observed);
    Ok(Pass {
        snapshot: after,
        desired: want,
        remaining,
        transient: failures.iter().any(|(_, t)| *t),
        errors: failures.into_iter().map(|(e, _)| e).collect(),
    })
}

/// Tells the notification filter which links the loop now watches.
fn note_interest(
    interest: &watch::Sender<Option<Interest>>,
    snapshot: &Snapshot,
    underlay: IpAddr,
) {
    let next = Interest {
        vxlan: snapshot.observed.vxlan.as_ref().map(|v| v.index),
        underlay: snapshot.observed.underlay.map(|u| u.index),
        underlay_address: Some(underlay),
    };
    interest.send_if_modified(|now| {
        let changed = now.as_ref() != Some(&next);
        if changed {
            *now = Some(next);
        }
        changed
    });
}

/// Observes the node's namespace, tells the notification filter what the
/// observation found, and publishes the node's addresses.
async fn observe_in(node_ns: &Kernel<'_>, underlay: IpAddr) -> Result<Snapshot, Failure> {
    let snapshot = node_ns
        .netns
        .run(move |h| async move { observe(&h, underlay).await.map_err(|e| e.to_string()) })
        .await
        .map_err(|e| Failure::Observe(e.to_string()))?
        .map_err(Failure::Observe)?;
    note_interest(node_ns.interest, &snapshot, underlay);
    publish_addresses(node_ns.addresses, &snapshot.addresses);
    Ok(snapshot)
}

/// Publishes the node's addresses when they changed.
fn publish_addresses(tx: Option<&watch::Sender<Option<Vec<IpAddr>>>>, addresses: &[IpAddr]) {
    let Some(tx) = tx else {
        return;
    };
    tx.send_if_modified(|now| {
        if now.as_deref() == Some(addresses) {
            return false;
        }
        tracing::debug!(?addresses, "the node's addresses, for policy");
        *now = Some(addresses.to_vec());
        true
    });
}

/// Writes the node's `NetworkStatus` when it differs from what was last
/// written (read back once at start, so a restart that changes nothing
/// writes nothing).
struct Reporter {
    api: Api<NetworkStatus>,
    name: String,
    owner: Option<OwnerReference>,
    last: Option<NetworkStatusStatus>,
    /// `resourceVersion` our last write returned.
    last_rv: Option<String>,
    exists: bool,
}

impl Reporter {
    async fn new(client: Client, node: &str) -> Self {
        let api: Api<NetworkStatus> = Api::all(client.clone());
        let (exists, last) = match api.get_opt(node).await {
            Ok(Some(obj)) => (true, obj.status),
            Ok(None) => (false, None),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this node's NetworkStatus; will write it");
                (false, None)
            }
        };
        let owner = match owner_of_node(&client, node).await {
            Ok(owner) => owner,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this node's Node; its NetworkStatus gets no owner");
                None
            }
        };
        Reporter {
            api,
            name: node.to_owned(),
            owner,
            last,
            last_rv: None,
            exists,
        }
    }

    /// Whether a watched version comes after our last write (see
    /// [`resource_version_reached`]).
    fn newer_than_ours(&self, rv: Option<String>) -> bool {
        match (rv, &self.last_rv) {
            (Some(seen), Some(ours)) => !resource_version_reached(ours, &seen),
            _ => true,
        }
    }

    /// Forgets what was written, so the next report is written whatever it
    /// says; `exists` says whether the object is still there.
    fn forget(&mut self, exists: bool) {
        self.last = None;
        self.exists = exists;
    }

    /// Writes the report if it changes the status; returns false when a
    /// write failed (to be retried).
    async fn publish(&mut self, r: crate::report::Report, metrics: &Metrics) -> bool {
        // The apiserver keeps condition times to the second; so do we, or
        // what we wrote would never equal what the watch shows.
        let secs = k8s_openapi::jiff::Timestamp::now().as_second();
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap_or_default());
        let next = status(self.last.as_ref(), r, &now);
        self.write_if_changed(next, metrics).await
    }

    /// Rewrites only the endpoint count of the status last written; false
    /// when the write failed. Without a status written, nothing happens.
    async fn publish_endpoints(&mut self, endpoints: usize, metrics: &Metrics) -> bool {
        let Some(last) = &self.last else {
            return true;
        };
        let next = NetworkStatusStatus {
            endpoints: i32::try_from(endpoints).unwrap_or(i32::MAX),
            ..last.clone()
        };
        self.write_if_changed(next, metrics).await
    }

    async fn write_if_changed(&mut self, next: NetworkStatusStatus, metrics: &Metrics) -> bool {
        if self.last.as_ref() == Some(&next) {
            return true;
        }
        match self.write(&next).await {
            Ok(()) => {
                metrics.status_written();
                let ready = next
                    .conditions
                    .iter()
                    .find(|c| c.type_ == NETWORKSTATUS_READY)
                    .map(|c| format!("{} ({})", c.status, c.reason));
                tracing::info!(
                    ready = ready.as_deref().unwrap_or("?"),
                    peers = next.peers,
                    endpoints = next.endpoints,
                    "NetworkStatus written"
                );
                self.last = Some(next);
                true
            }
            Err(e) => {
                metrics.error(ErrorKind::Status);
                tracing::warn!(error = %e, "cannot write NetworkStatus; will retry");
                false
            }
        }
    }

    async fn write(&mut self, status: &NetworkStatusStatus) -> Result<(), kube::Error> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        if !self.exists {
            let mut metadata = json!({"name": self.name});
            if let Some(owner) = &self.owner {
                metadata["ownerReferences"] = json!([owner]);
            }
            let body = json!({
                "apiVersion": NetworkStatus::api_version(&()), "kind": NetworkStatus::kind(&()),
                "metadata": metadata, "spec": {},
            });
            let created = self
                .api
                .patch(&self.name, &params, &Patch::Apply(&body))
                .await?;
            self.last_rv = created.metadata.resource_version;
            self.exists = true;
        }
        let body = json!({
            "apiVersion": NetworkStatus::api_version(&()), "kind": NetworkStatus::kind(&()),
            "metadata": {"name": self.name}, "status": status,
        });
        match self
            .api
            .patch_status(&self.name, &params, &Patch::Apply(&body))
            .await
        {
            Ok(written) => {
                self.last_rv = written.metadata.resource_version;
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                // Deleted meanwhile: create it again on the next try.
                self.exists = false;
                Err(kube::Error::Api(s))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_count_is_written_at_once_after_a_quiet_second_else_a_second_later() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut throttle = Throttle::new(s);
        assert_eq!(throttle.slot(t0), t0, "the first change shows at once");
        throttle.fired(t0);
        let ms = Duration::from_millis;
        // A burst: every change in the next second waits for its end, and
        // the one written then carries them all.
        assert_eq!(throttle.slot(t0 + ms(10)), t0 + s);
        assert_eq!(throttle.slot(t0 + ms(990)), t0 + s);
        throttle.fired(t0 + s);
        assert_eq!(throttle.slot(t0 + s + ms(1)), t0 + s + s);
        // After a quiet second, at once again.
        throttle.fired(t0 + s + s);
        let later = t0 + ms(3500);
        assert_eq!(throttle.slot(later), later);
    }

    #[test]
    fn the_policy_condition_says_what_is_enforced_and_what_is_not() {
        let blank = || crate::report::Report {
            status: NetworkStatusStatus::default(),
            conditions: Vec::new(),
            endpoints: None,
        };
        let cond = |r: &crate::report::Report| {
            let c = r
                .conditions
                .iter()
                .find(|c| c.type_ == NETWORKSTATUS_POLICY_READY)
                .expect("a PolicyReady condition")
                .clone();
            (c.status, c.reason, c.message)
        };
        let mut r = blank();
        add_policy(
            &mut r,
            &PolicyReport {
                synced: true,
                ready: true,
                message: "policy in force".into(),
                diagnostics: Vec::new(),
                hash: Some("v1-0123456789abcdef".into()),
            },
            None,
        );
        assert_eq!(cond(&r), (true, "Enforced", "policy in force".into()));
        assert_eq!(r.status.policy_hash.as_deref(), Some("v1-0123456789abcdef"));

        // What cannot be enforced is named, the first three in full.
        let mut r = blank();
        let diagnostics: Vec<String> = (1..=5).map(|i| format!("problem {i}")).collect();
        add_policy(
            &mut r,
            &PolicyReport {
                synced: true,
                ready: true,
                message: "m".into(),
                diagnostics,
                hash: Some("h".into()),
            },
            None,
        );
        assert_eq!(
            cond(&r),
            (
                true,
                "EnforcedWithProblems",
                "m; problem 1; problem 2; problem 3; and 2 more".into()
            )
        );

        // A failed sync: False, and no hash claims anything new is enforced.
        let mut r = blank();
        add_policy(
            &mut r,
            &PolicyReport {
                synced: true,
                ready: false,
                message: "a map write failed".into(),
                ..PolicyReport::default()
            },
            None,
        );
        assert_eq!(
            cond(&r),
            (false, "NotEnforced", "a map write failed".into())
        );
        assert_eq!(r.status.policy_hash, None);

        // Not synced since the start: what the status said stays.
        let starting = PolicyReport {
            message: "not synced yet".into(),
            ..PolicyReport::default()
        };
        let mut r = blank();
        add_policy(&mut r, &starting, None);
        assert_eq!(cond(&r), (false, "NotEnforced", "not synced yet".into()));
        let mut before = NetworkStatusStatus::default();
        let mut enforced = blank();
        add_policy(
            &mut enforced,
            &PolicyReport {
                synced: true,
                ready: true,
                message: "policy in force".into(),
                hash: Some("v1-1".into()),
                ..PolicyReport::default()
            },
            None,
        );
        before.conditions = trellis_common::conditions::merge(
            &[],
            enforced.conditions,
            &Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            None,
        );
        let mut r = blank();
        add_policy(&mut r, &starting, Some(&before));
        assert_eq!(cond(&r), (true, "Enforced", "policy in force".into()));
        assert_eq!(
            r.status.policy_hash, None,
            "status() keeps the previous hash"
        );
    }

    #[test]
    fn facts_are_published_when_they_change_and_keep_the_last_mtu() {
        let (tx, mut rx) = watch::channel(None);
        let cfg = Config {
            facts: Some(tx),
            ..Config::new("node-1")
        };
        let blocks = blocks_of(&["10.244.1.7/24".into(), "bad".into(), "fd00::/120".into()]);
        assert_eq!(
            blocks,
            vec![
                "10.244.1.0/24".parse::<IpNet>().expect("a block"),
                "fd00::/120".parse().expect("a block")
            ],
            "truncated to the network; what does not parse is left out"
        );
        publish_facts(&cfg, blocks.clone(), Some(1450), true);
        assert!(rx.has_changed().expect("sender alive"));
        let first = rx.borrow_and_update().clone();
        assert_eq!(
            first,
            Some(NodeFacts {
                blocks: blocks.clone(),
                pod_mtu: 1450,
                ready: true
            })
        );
        publish_facts(&cfg, blocks.clone(), Some(1450), true);
        assert!(
            !rx.has_changed().expect("sender alive"),
            "same facts: no wake-up"
        );
        // A failed reconcile knows no MTU: the last one stays.
        publish_facts(&cfg, blocks.clone(), None, false);
        let failed = rx.borrow_and_update().clone().expect("published");
        assert_eq!((failed.pod_mtu, failed.ready), (1450, false));
        // No NodeNetwork: no blocks.
        publish_facts(&cfg, Vec::new(), None, false);
        assert!(rx.borrow().as_ref().is_some_and(|f| f.blocks.is_empty()));
        // Without a sender, nothing happens.
        publish_facts(&Config::new("node-1"), blocks, Some(1), true);
    }

    #[test]
    fn the_node_addresses_are_published_when_they_change() {
        let (tx, mut rx) = watch::channel(None);
        let ip = |s: &str| s.parse::<IpAddr>().expect("an address");
        let first = [ip("192.0.2.11"), ip("fe80::1")];
        publish_addresses(Some(&tx), &first);
        assert!(rx.has_changed().expect("sender alive"));
        assert_eq!(rx.borrow_and_update().as_deref(), Some(&first[..]));
        publish_addresses(Some(&tx), &first);
        assert!(
            !rx.has_changed().expect("sender alive"),
            "the same addresses: no wake-up"
        );
        publish_addresses(Some(&tx), &first[..1]);
        assert_eq!(rx.borrow_and_update().as_deref(), Some(&first[..1]));
        // Without a sender, nothing happens.
        publish_addresses(None, &first);
    }
}
