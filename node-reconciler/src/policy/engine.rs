//! The policy engine: the node's endpoints, their identities, and the BPF
//! maps that enforce their policy.
//!
//! ```text
//!  CNI ADD ──admit──▶ resolve (labels → identity, created if new) ──▶ sync ──▶ attach ──▶ answer
//!  teardown ─release─▶ forget ──▶ sync ──▶ detach
//!  cluster caches changed / every RESYNC ──▶ resolve all ──▶ sync
//!  sync:  snapshot of the caches + endpoints ─▶ desired (pure) ─▶ plan (pure) ─▶ apply (maps)
//!         + the node's addresses, as the reconcile loop observed them
//!  the node's addresses changed ──▶ sync
//!  locals changed ──▶ NodeEndpoints shard (at most one write per SHARD_INTERVAL)
//! ```
//!
//! Every sync computes from the whole state, never from the event that
//! woke it, and writes only what differs from the mirror of the maps
//! (read from the pinned maps at start). Nothing is removed from the maps
//! before the caches hold their initial lists and the endpoints of the
//! previous run are adopted, so a restart leaves enforcement as it was.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{Notify, watch};
use trellis_api::v1alpha1::{
    IPPool, NodeEndpoints, NodeEndpointsSpec, PodEndpoint, PolicyBundle, PolicyEnforcement,
    SecurityIdentity, ShardLimit,
};
use trellis_cni::proto::PodRef;
use trellis_common::process::until_true;
use trellis_policy::compile::{Input, LocalEndpoint};
use trellis_policy::identity::{HOST, IdentityKind, NamedPorts, SecurityLabels, WORLD};

use super::cluster::Cluster;
use super::desired::{
    Claim, Claimant, CompileCache, Desired, Invalidated, Local, desired_tables, local_claims,
};
use super::ipcache::{IpCacheIndex, Source};
use super::shards::{NamedIndex, ShardFeed, shard_claims};
use super::sync::{Installed, IpCachePlan, MapOp, apply, plan_with};
use crate::agent::{FIELD_MANAGER, owner_of_node};
use crate::bpf::Datapath;
use crate::endpoint::{Admission, EndpointError, EndpointPolicy};
use crate::metrics::{AddPhase, Metrics, PolicySync};
use crate::netns::NetnsHandle;

/// A full sync at least this often.
const RESYNC: Duration = Duration::from_secs(10);
/// How long an ADD waits for the engine's first sync after a start.
const START_WAIT: Duration = Duration::from_secs(20);
/// At most one `NodeEndpoints` write per interval.
const SHARD_INTERVAL: Duration = Duration::from_secs(1);
/// Ids probed before giving up on creating an identity.
const IDENTITY_ATTEMPTS: usize = 16;

/// Where the engine stands, for `NetworkStatus` (`PolicyReady`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyReport {
    /// Whether a sync has run since the start (until then the node's
    /// status keeps saying what the previous run said: the pinned maps
    /// still enforce it).
    pub synced: bool,
    /// The first sync after the start is done and the last one applied
    /// everything.
    pub ready: bool,
    /// Why not, or a summary. (Not the number of endpoints: a report that
    /// changes with every pod would rewrite the node's status for each.)
    pub message: String,
    /// What could not be enforced, one line each (policy and reason).
    pub diagnostics: Vec<String>,
    /// [`trellis_policy::generation::policy_hash`] of what is enforced.
    pub hash: Option<String>,
}

/// One endpoint of this node.
#[derive(Debug, Clone)]
struct LocalState {
    ifindex: u32,
    addresses: Vec<IpAddr>,
    pod: Option<PodRef>,
    /// Identity, labels and named ports, once resolved.
    resolved: Option<LocalEndpoint>,
}

struct State {
    dp: Datapath,
    installed: Installed,
    /// What the last sync compiled against.
    input: CompilerInput,
    /// Compiled tables, kept while the compiler's input stays the same
    /// (for identities: while none changes that they depend on).
    cache: CompileCache,
    /// By host veth name.
    locals: BTreeMap<String, LocalState>,
    /// The IP cache as the shards, the endpoints, the node's addresses and
    /// the policies' prefixes make it, kept change by change.
    ipcache: IpCacheIndex,
    /// The named ports of each identity over every shard.
    named: NamedIndex,
    /// Plan the whole IP cache at the next sync rather than the keys the
    /// index touched: the mirror was read from the maps (a start), so it
    /// may differ anywhere.
    ipcache_full: bool,
    /// What `input.input.identities` was made from (`None`: not yet).
    identities_of: Option<IdentitiesOf>,
    /// The compile cache's key the last sync gave it.
    cache_key: Option<u64>,
    /// Endpoints (by host veth name) whose pod the last resync could not
    /// resolve, and why: they keep the identity and policy they had, and
    /// the report says so.
    unresolvable: BTreeMap<String, String>,
}

/// What the compiler's identities are made of: when these are equal, so
/// are they, and a sync neither rebuilds nor diffs them.
#[derive(Debug, PartialEq, Eq)]
struct IdentitiesOf {
    /// The `SecurityIdentity` cache's revision (read before the cache).
    objects: u64,
    /// [`NamedIndex::revision`].
    shards: u64,
    /// The local endpoints' named ports per identity (they count before
    /// the shard carries them).
    local: BTreeMap<u32, NamedPorts>,
}

/// The policy engine of one node.
pub struct Engine {
    node: String,
    client: Client,
    cluster: Cluster,
    host: Arc<NetnsHandle>,
    /// The node's addresses as the reconcile loop last observed them
    /// (`None` until it has).
    host_addresses: watch::Receiver<Option<Vec<IpAddr>>>,
    /// The node's namespace (`--host-netns`); `None`: ours.
    host_netns: Option<PathBuf>,
    state: Arc<Mutex<State>>,
    /// The identities' label sets, for resolving a pod without a probe.
    by_labels: Mutex<LabelIndex>,
    metrics: Metrics,
    started: watch::Sender<bool>,
    shard: Arc<Notify>,
    report: watch::Sender<PolicyReport>,
}

/// Label set → identity, as the `SecurityIdentity` cache holds them, rebuilt
/// when the cache's revision moves (a new or deleted identity), not per pod.
#[derive(Debug, Default)]
struct LabelIndex {
    revision: Option<u64>,
    /// The smallest id of each label set (two can exist after a lost race).
    ids: HashMap<SecurityLabels, u32>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("node", &self.node)
            .field("host_netns", &self.host_netns)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Loads the programs (reusing the maps pinned under `bpffs_root`),
    /// reads what the maps hold, and starts the cluster watches.
    /// `host_addresses` are the node's addresses as the reconcile loop
    /// observes them (`agent::Config::host_addresses`).
    pub async fn start(
        client: Client,
        node: &str,
        host: Arc<NetnsHandle>,
        host_netns: Option<PathBuf>,
        host_addresses: watch::Receiver<Option<Vec<IpAddr>>>,
        bpffs_root: &Path,
        metrics: Metrics,
    ) -> anyhow::Result<Arc<Engine>> {
        let root = bpffs_root.to_path_buf();
        let (dp, installed) = tokio::task::spawn_blocking(move || {
            let dp = Datapath::load(Some(&root))?;
            let installed = Installed::read(&dp)?;
            Ok::<_, crate::bpf::BpfError>((dp, installed))
        })
        .await??;
        tracing::info!(
            pins = %dp.pin_dir().map(|p| p.display().to_string()).unwrap_or_default(),
            "policy programs loaded"
        );
        let cluster = Cluster::watch(&client, node);
        Ok(Arc::new(Engine {
            node: node.to_owned(),
            client,
            cluster,
            host,
            host_addresses,
            host_netns,
            state: Arc::new(Mutex::new(State {
                dp,
                installed,
                input: CompilerInput::default(),
                cache: CompileCache::default(),
                locals: BTreeMap::new(),
                ipcache: IpCacheIndex::new(),
                named: NamedIndex::new(),
                ipcache_full: true,
                identities_of: None,
                cache_key: None,
                unresolvable: BTreeMap::new(),
            })),
            by_labels: Mutex::new(LabelIndex::default()),
            metrics,
            started: watch::Sender::new(false),
            shard: Arc::new(Notify::new()),
            report: watch::Sender::new(PolicyReport {
                ready: false,
                message: "not synced yet".into(),
                ..PolicyReport::default()
            }),
        }))
    }

    /// Where the engine stands, after every sync.
    pub fn report(&self) -> watch::Receiver<PolicyReport> {
        self.report.subscribe()
    }

    /// Takes over the endpoints a previous run left (their records are
    /// `Ready`): they keep the map entries they have until the first sync,
    /// and get this binary's programs at once (an atomic replacement).
    pub async fn adopt(&self, endpoints: Vec<Admission>) {
        for a in endpoints {
            let ifname = a.host_ifname.clone();
            let netns = self.host_netns.clone();
            let state = self.state.clone();
            {
                let mut s = lock(&state);
                s.locals.insert(
                    a.host_ifname.clone(),
                    LocalState {
                        ifindex: a.host_index,
                        addresses: a.addresses.clone(),
                        pod: a.pod.clone(),
                        resolved: None,
                    },
                );
            }
            let attached = tokio::task::spawn_blocking(move || {
                lock(&state).dp.attach(netns.as_deref(), &ifname)
            })
            .await;
            match attached {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(ifname = %a.host_ifname, error = %e, "cannot hook the programs onto an adopted endpoint")
                }
                Err(e) => tracing::warn!(error = %e, "attach task failed"),
            }
        }
    }

    /// Runs the resync loop and the shard writer until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        tokio::select! {
            r = self.cluster.ready() => if r.is_err() { return; },
            () = until_true(shutdown.clone()) => return,
        }
        tracing::info!("policy caches synced");
        let shard = tokio::spawn(self.clone().write_shards(shutdown.clone()));
        let mut host_addresses = self.host_addresses.clone();
        loop {
            match self.resync().await {
                Ok(()) => {
                    self.started
                        .send_if_modified(|s| !std::mem::replace(s, true));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "policy sync failed; retrying");
                    self.report.send_modify(|r| {
                        r.synced = true;
                        r.ready = false;
                        r.message = e.to_string();
                    });
                }
            }
            tokio::select! {
                () = self.cluster.changed.notified() => {
                    // Let a burst of events land in one sync.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // The reconcile loop saw the node's addresses change. (Once
                // its sender is gone, the branch is off.)
                Ok(()) = host_addresses.changed() => {}
                () = tokio::time::sleep(RESYNC) => {}
                () = until_true(shutdown.clone()) => break,
            }
        }
        shard.abort();
    }

    /// Resolves every endpoint (labels may have changed) and syncs. A pod
    /// that cannot be resolved (the apiserver unreachable, labels that make
    /// no identity) keeps what it had and is reported; the others go on.
    async fn resync(&self) -> Result<(), EndpointError> {
        let locals: Vec<(String, Option<PodRef>)> = lock(&self.state)
            .locals
            .iter()
            .map(|(k, v)| (k.clone(), v.pod.clone()))
            .collect();
        for (ifname, pod) in locals {
            let resolved = self.resolve(pod.as_ref()).await;
            let mut s = lock(&self.state);
            let s = &mut *s;
            let Some(l) = s.locals.get_mut(&ifname).filter(|l| l.pod == pod) else {
                continue;
            };
            match resolved {
                Ok(resolved) => {
                    if l.resolved.as_ref() != Some(&resolved) {
                        self.shard.notify_one();
                    }
                    l.resolved = Some(resolved);
                    s.unresolvable.remove(&ifname);
                }
                Err(e) => {
                    let who = pod.as_ref().map_or_else(
                        || ifname.clone(),
                        |p| format!("pod {}/{}", p.namespace, p.name),
                    );
                    let why = format!(
                        "{who}: its identity cannot be resolved, so it keeps the identity and policy it had: {e}"
                    );
                    if s.unresolvable.get(&ifname) != Some(&why) {
                        tracing::warn!(endpoint = %ifname, error = %e, "{why}");
                    }
                    s.unresolvable.insert(ifname, why);
                }
            }
        }
        self.sync().await
    }

    /// Computes the desired maps from the caches and the endpoints, and
    /// writes the difference.
    async fn sync(&self) -> Result<(), EndpointError> {
        let started = Instant::now();
        let host = self.host_addresses().await?;
        let snapshot = self.snapshot();
        let state = self.state.clone();
        let node = self.node.clone();
        let metrics = self.metrics.clone();
        let (report, errors) = tokio::task::spawn_blocking(move || {
            let mut s = lock(&state);
            let s = &mut *s;
            // The shards that changed since the last sync: the IP cache
            // (other nodes' pods; this node's come from its endpoints) and
            // the named ports of every node's pods.
            let changes = lock_feed(&snapshot.shards).take();
            for (name, shard) in changes {
                let (claims, named) = shard.as_deref().map(shard_claims).unwrap_or_default();
                s.named.set_shard(&name, named);
                if name != node {
                    s.ipcache.set_source(Source::Shard(name), claims);
                }
            }
            let locals: Vec<Local> = s
                .locals
                .values()
                .filter_map(|l| {
                    Some(Local {
                        ifindex: l.ifindex,
                        addresses: l.addresses.clone(),
                        endpoint: l.resolved.clone()?,
                    })
                })
                .collect();
            let unresolved = s.locals.len() - locals.len();
            s.ipcache.set_source(Source::Local, local_claims(&locals));
            let host_claim = Claim {
                by: Claimant::Host,
                identity: HOST,
            };
            s.ipcache.set_source(
                Source::Host,
                host.iter().map(|a| (*a, host_claim)).collect(),
            );
            s.input.refresh(snapshot.policies_of, || PolicyObjects {
                policies: cloned(&snapshot.policies),
                bundles: cloned(&snapshot.bundles),
                pools: cloned(&snapshot.pools),
            });
            s.ipcache.set_cidrs(&s.input.input.cidrs);
            s.ipcache.set_pod_nets(s.input.pod_nets.clone());
            s.input.input.pod_networks = s.ipcache.pod_networks();
            let identities_of = IdentitiesOf {
                objects: snapshot.identities_revision,
                shards: s.named.revision(),
                local: local_named_ports(&locals),
            };
            let identities_changed = s.identities_of.as_ref() != Some(&identities_of);
            if identities_changed {
                let mut named = s.named.named();
                for (id, ports) in &identities_of.local {
                    named.entry(*id).or_default().extend(ports);
                }
                // Sorted by id: the compile cache diffs them by id.
                let objects = trellis_policy::cluster::identity_infos(
                    snapshot.identities.state().iter().map(|i| &**i),
                );
                s.input.input.identities =
                    trellis_policy::cluster::with_named_ports(&objects, &named);
                s.identities_of = Some(identities_of);
            }
            let key = input_key(&s.input.hash, &s.input.input);
            let invalidated = if identities_changed || s.cache_key != Some(key) {
                s.cache_key = Some(key);
                s.cache.for_input(key, &s.input.input.identities)
            } else {
                Invalidated::default()
            };
            let compilations = s.cache.compilations;
            let mut want =
                desired_tables(&s.input.input, &locals, &s.installed.ids(), &mut s.cache);
            let compiled = s.cache.compilations - compilations;
            if compiled > 0 || invalidated != Invalidated::default() {
                tracing::debug!(
                    compiled,
                    dropped = invalidated.compilations,
                    policies_changed = invalidated.all,
                    identities_changed = invalidated.identities,
                    "policy compiled"
                );
            }
            want.conflicts.extend(s.ipcache.conflicts().cloned());
            want.conflicts.sort();
            // The IP cache: every key after a start, else only those the
            // index touched since the last sync.
            let touched = s.ipcache.take_touched();
            let scope = if s.ipcache_full {
                IpCachePlan::All(s.ipcache.want())
            } else {
                IpCachePlan::Keys(s.ipcache.want(), &touched)
            };
            let mut ops = plan_with(&want, scope, &s.installed);
            // An endpoint not resolved yet keeps what it has (adopted after
            // a restart: enforcement stays as the previous run left it; its
            // tables cannot go while its entry names them).
            if unresolved > 0 {
                let pending = s.locals.values().filter(|l| l.resolved.is_none());
                let ifindexes: BTreeSet<u32> = pending.clone().map(|l| l.ifindex).collect();
                let addresses: BTreeSet<IpAddr> =
                    pending.flat_map(|l| l.addresses.iter().copied()).collect();
                ops.retain(|op| match op {
                    MapOp::RemoveEndpoint { ifindex } => !ifindexes.contains(ifindex),
                    MapOp::RemoveIpCache { net } => !addresses.contains(&net.addr()),
                    _ => true,
                });
            }
            let failed = apply(&mut s.dp, &mut s.installed, &ops);
            // What is still not as wanted (a failed write, a removal held
            // back for a pending endpoint) is planned again next time.
            let planned: Vec<IpNet> = if s.ipcache_full {
                let want = s.ipcache.want().keys();
                want.chain(s.installed.ipcache.keys()).copied().collect()
            } else {
                touched.into_iter().collect()
            };
            s.ipcache.settle(&planned, &s.installed.ipcache);
            s.ipcache_full = false;
            let failed_ops: Vec<MapOp> = failed.iter().map(|(op, _)| op.clone()).collect();
            metrics.policy_synced(&PolicySync {
                ops: &ops,
                failed: &failed_ops,
                compiled,
                ipcache: s.ipcache.want().len(),
                identities: s.input.input.identities.len(),
                took: started.elapsed(),
            });
            let errors: Vec<String> = failed.iter().map(|(op, e)| format!("{op}: {e}")).collect();
            let left_out = left_out_of_shard(&s.locals);
            let problems = s.unresolvable.values().chain(&left_out);
            let mut report = report_of(&want, &errors, problems);
            report.hash = errors.is_empty().then(|| s.input.hash.clone());
            (report, errors)
        })
        .await
        .map_err(|e| EndpointError::task("policy sync", &e))?;
        self.report.send_if_modified(|r| {
            let changed = *r != report;
            *r = report;
            changed
        });
        if errors.is_empty() {
            Ok(())
        } else {
            Err(EndpointError::Policy {
                reason: format!("writing the policy maps failed: {}", errors.join("; ")),
                transient: true,
            })
        }
    }

    /// The values the compiler needs, taken from the caches (the policies
    /// only if they changed since the last sync: see [`CompilerInput`]; the
    /// identities likewise, see [`IdentitiesOf`]).
    fn snapshot(&self) -> Snapshot {
        // Before the caches are read (in the sync, if at all).
        let revision = self.cluster.policies_revision.get();
        let identities_revision = self.cluster.identities_revision.get();
        let enforcement = self
            .cluster
            .configs
            .get(&ObjectRef::new("default"))
            .map(|c| c.spec.policy_enforcement)
            .unwrap_or_default();
        Snapshot {
            policies_of: (revision, enforcement),
            policies: self.cluster.policies.clone(),
            bundles: self.cluster.bundles.clone(),
            pools: self.cluster.pools.clone(),
            identities_revision,
            identities: self.cluster.identities.clone(),
            shards: self.cluster.shards.clone(),
        }
    }

    /// The node's own addresses (traffic from them is `HOST`): as the
    /// reconcile loop last observed them, so a sync (every ADD and DEL) reads
    /// no netlink dump; until it has observed once (a start, a node without
    /// its `NodeNetwork` yet), from a dump of our own.
    async fn host_addresses(&self) -> Result<Vec<IpAddr>, EndpointError> {
        let observed = self.host_addresses.borrow().clone();
        if let Some(observed) = observed {
            return Ok(observed);
        }
        let failed = |e: String| EndpointError::Policy {
            reason: format!("listing the node's addresses: {e}"),
            transient: true,
        };
        self.host
            .run(|h| async move {
                crate::observe::dump_node_addresses(&h)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(failed)
    }

    /// The pod's identity, labels and named ports: from the caches, else
    /// from the apiserver; the identity is created when its label set is new.
    async fn resolve(&self, pod: Option<&PodRef>) -> Result<LocalEndpoint, EndpointError> {
        let (namespace, pod_obj) = match pod {
            Some(p) => {
                let obj = match self.cluster.pod(&p.namespace, &p.name) {
                    Some(o) => Some((*o).clone()),
                    None => Api::<Pod>::namespaced(self.client.clone(), &p.namespace)
                        .get_opt(&p.name)
                        .await
                        .map_err(|e| {
                            transient(format!("reading pod {}/{}: {e}", p.namespace, p.name))
                        })?,
                };
                // A pod of the same name but another UID is not this one.
                let obj = obj.filter(|o| match (&p.uid, &o.metadata.uid) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                });
                (p.namespace.clone(), obj)
            }
            None => {
                // No pod named (a runtime outside Kubernetes, `cnitool`): no
                // policy can select it and no peer can name it, so it is like
                // any address outside the cluster to everyone else.
                return Ok(LocalEndpoint {
                    identity: WORLD,
                    labels: SecurityLabels::default(),
                    named_ports: NamedPorts::new(),
                });
            }
        };
        let ns_obj: Option<Namespace> = if namespace.is_empty() {
            None
        } else {
            match self.cluster.namespaces.get(&ObjectRef::new(&namespace)) {
                Some(n) => Some((*n).clone()),
                None => Api::<Namespace>::all(self.client.clone())
                    .get_opt(&namespace)
                    .await
                    .map_err(|e| transient(format!("reading namespace {namespace}: {e}")))?,
            }
        };
        if let (Some(pod), Some(ns)) = (&pod_obj, &ns_obj) {
            let (labels, named_ports) = trellis_policy::objects::pod_labels_and_ports(pod, ns)
                .map_err(|e| EndpointError::Policy {
                    reason: format!("the pod's labels: {e}"),
                    transient: false,
                })?;
            let identity = self.identity_of(&labels).await?;
            return Ok(LocalEndpoint {
                identity,
                labels,
                named_ports,
            });
        }
        // No Pod object (a runtime that named none, or a pod deleted while
        // its sandbox lives on): the namespace's labels and no pod labels.
        let namespace_labels = ns_obj.map(|n| n.labels().clone()).unwrap_or_default();
        let (pod_labels, named_ports) = (BTreeMap::new(), NamedPorts::new());
        let labels = SecurityLabels::new(namespace, namespace_labels, pod_labels);
        let identity = self.identity_of(&labels).await?;
        Ok(LocalEndpoint {
            identity,
            labels,
            named_ports,
        })
    }

    /// The identity of `labels`: the one the cluster has, else a new one
    /// (design 0005: deterministic id, probing past ids that hold another
    /// label set; a racing node creating the same one is fine).
    async fn identity_of(&self, labels: &SecurityLabels) -> Result<u32, EndpointError> {
        // A label set the cluster has already: its identity, wherever it is
        // (off its probe path after a race lost with another view of the
        // taken ids, design 0005), without a probe.
        if let Some(id) = self.known_identity(labels) {
            return Ok(id);
        }
        let api = Api::<SecurityIdentity>::all(self.client.clone());
        // Ids found taken by another label set that the cache has not shown yet.
        let mut seen: BTreeMap<u32, SecurityLabels> = BTreeMap::new();
        // The label set an id holds: found by name in the cache (an id is
        // the object's name), not by reading the whole cache, so resolving
        // a pod costs the probe, not the number of identities.
        let held = |seen: &BTreeMap<u32, SecurityLabels>, id: u32| -> Option<SecurityLabels> {
            if let Some(labels) = seen.get(&id) {
                return Some(labels.clone());
            }
            let object = self
                .cluster
                .identities
                .get(&ObjectRef::new(&id.to_string()))?;
            trellis_policy::objects::identity_of(&object)
                .ok()
                .map(|(_, labels)| labels)
        };
        for _ in 0..IDENTITY_ATTEMPTS {
            let id =
                trellis_policy::identity::allocate(labels, |id| held(&seen, id)).map_err(|e| {
                    EndpointError::Policy {
                        reason: e.to_string(),
                        transient: false,
                    }
                })?;
            if held(&seen, id).as_ref() == Some(labels) {
                return Ok(id);
            }
            let object = trellis_policy::objects::security_identity(id, labels).map_err(|e| {
                EndpointError::Policy {
                    reason: format!("the pod's labels cannot make an identity: {e}"),
                    transient: false,
                }
            })?;
            match api.create(&PostParams::default(), &object).await {
                Ok(_) => {
                    tracing::info!(id, %labels, "security identity created");
                    return Ok(id);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    let existing = api
                        .get(&id.to_string())
                        .await
                        .map_err(|e| transient(format!("reading security identity {id}: {e}")))?;
                    match trellis_policy::objects::identity_of(&existing) {
                        Ok((_, found)) => {
                            if &found == labels {
                                return Ok(id);
                            }
                            seen.insert(id, found);
                        }
                        Err(e) => {
                            return Err(EndpointError::Policy {
                                reason: format!("security identity {id} is malformed: {e}"),
                                transient: false,
                            });
                        }
                    }
                }
                Err(e) => return Err(transient(format!("creating security identity {id}: {e}"))),
            }
        }
        Err(transient(format!(
            "no free security identity for {labels} after {IDENTITY_ATTEMPTS} attempts"
        )))
    }

    /// The identity the cache holds for `labels` (the smallest, if two do).
    fn known_identity(&self, labels: &SecurityLabels) -> Option<u32> {
        // Before the cache: what it holds then is at least this revision.
        let revision = self.cluster.identities_revision.get();
        let mut index = self
            .by_labels
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if index.revision != Some(revision) {
            index.ids.clear();
            for object in self.cluster.identities.state() {
                if let Ok((id, found)) = trellis_policy::objects::identity_of(&object) {
                    index
                        .ids
                        .entry(found)
                        .and_modify(|have| *have = (*have).min(id))
                        .or_insert(id);
                }
            }
            index.revision = Some(revision);
        }
        index.ids.get(labels).copied()
    }

    /// Writes this node's `NodeEndpoints` when its endpoints changed, at
    /// most once per [`SHARD_INTERVAL`].
    async fn write_shards(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        // Not before the first sync has resolved the endpoints a restart
        // adopted: a shard without them would make them strangers to the
        // other nodes for a while.
        let mut started = self.started.subscribe();
        tokio::select! {
            r = started.wait_for(|s| *s) => if r.is_err() { return; },
            () = until_true(shutdown.clone()) => return,
        }
        let api = Api::<NodeEndpoints>::all(self.client.clone());
        let owner = match owner_of_node(&self.client, &self.node).await {
            Ok(owner) => owner,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this node's Node; its NodeEndpoints gets no owner");
                None
            }
        };
        let mut last: Option<NodeEndpointsSpec> = None;
        loop {
            let spec = self.shard_spec();
            if last.as_ref() != Some(&spec) {
                let mut metadata = json!({"name": self.node});
                if let Some(owner) = &owner {
                    metadata["ownerReferences"] = json!([owner]);
                }
                let body = json!({
                    "apiVersion": NodeEndpoints::api_version(&()),
                    "kind": NodeEndpoints::kind(&()),
                    "metadata": metadata,
                    "spec": spec,
                });
                match api
                    .patch(
                        &self.node,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&body),
                    )
                    .await
                {
                    Ok(_) => {
                        tracing::debug!(endpoints = spec.endpoints.len(), "NodeEndpoints written");
                        last = Some(spec);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot write NodeEndpoints; will retry"),
                }
            }
            tokio::select! {
                () = self.shard.notified() => {}
                () = tokio::time::sleep(RESYNC) => {}
                () = until_true(shutdown.clone()) => return,
            }
            // Coalesce: what changes in the next interval goes in one write.
            tokio::time::sleep(SHARD_INTERVAL).await;
        }
    }

    /// The shard this node writes: every local pod that fits (see
    /// [`NodeEndpointsSpec::fitting`]; admission keeps the rest from
    /// starting, so only endpoints adopted from a run with other limits can
    /// be left out, and each is logged).
    fn shard_spec(&self) -> NodeEndpointsSpec {
        let endpoints = shard_endpoints(&lock(&self.state).locals);
        let (spec, left_out) = NodeEndpointsSpec::fitting(endpoints);
        for (e, limit) in &left_out {
            tracing::warn!(
                pod = %format!("{}/{}", e.namespace, e.name),
                %limit,
                "pod left out of this node's NodeEndpoints: other nodes take its traffic as from outside the cluster"
            );
        }
        spec
    }

    async fn wait_started(&self) -> Result<(), EndpointError> {
        let mut started = self.started.subscribe();
        match tokio::time::timeout(START_WAIT, started.wait_for(|s| *s)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(transient(
                "the node's policy is not synced with the cluster yet (NetworkPolicies, namespaces, identities)"
                    .into(),
            )),
        }
    }
}

/// The shard entries of the local pods, sorted: every endpoint that stands
/// for a pod with a pod identity (an endpoint without a pod has no identity
/// to share).
fn shard_endpoints(locals: &BTreeMap<String, LocalState>) -> Vec<PodEndpoint> {
    let mut endpoints: Vec<PodEndpoint> = locals
        .values()
        .filter_map(|l| {
            let r = l.resolved.as_ref()?;
            let pod = l.pod.as_ref()?;
            if IdentityKind::of(r.identity) != IdentityKind::Pod {
                return None;
            }
            Some(PodEndpoint {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                addresses: l.addresses.iter().map(ToString::to_string).collect(),
                identity: i32::try_from(r.identity).ok()?,
                named_ports: r.named_ports.to_api(),
            })
        })
        .collect();
    endpoints.sort_by(|a, b| {
        (&a.namespace, &a.name, &a.addresses).cmp(&(&b.namespace, &b.name, &b.addresses))
    });
    endpoints
}

/// Takes `local` in as `ifname` unless the node's shard could then not be
/// written (a limit of the NodeEndpoints schema): then `locals` is left as
/// it was and the error says which limit. A pod with more named ports than
/// a pod may publish never fits; a full shard may once pods leave.
fn take_in(
    locals: &mut BTreeMap<String, LocalState>,
    ifname: &str,
    local: LocalState,
) -> Result<(), EndpointError> {
    let pod = local
        .pod
        .as_ref()
        .map(|p| format!("{}/{}", p.namespace, p.name));
    let before = locals.insert(ifname.to_owned(), local);
    let endpoints = shard_endpoints(locals);
    let Err(limit) = (NodeEndpointsSpec { endpoints }).check_limits() else {
        return Ok(());
    };
    match before {
        Some(b) => locals.insert(ifname.to_owned(), b),
        None => locals.remove(ifname),
    };
    let transient = !matches!(limit, ShardLimit::EndpointNamedPorts { .. });
    Err(EndpointError::Policy {
        reason: format!(
            "pod {} cannot be published in this node's NodeEndpoints, so other nodes could not apply policy to it: {limit}",
            pod.unwrap_or_default()
        ),
        transient,
    })
}

impl EndpointPolicy for Engine {
    fn admit<'a>(&'a self, a: &'a Admission) -> BoxFuture<'a, Result<(), EndpointError>> {
        Box::pin(async move {
            self.wait_started().await?;
            let mut clock = Instant::now();
            let mut done = |phase: AddPhase| {
                self.metrics.add_phase(phase, clock.elapsed());
                clock = Instant::now();
            };
            let resolved = self.resolve(a.pod.as_ref()).await?;
            done(AddPhase::Identity);
            take_in(
                &mut lock(&self.state).locals,
                &a.host_ifname,
                LocalState {
                    ifindex: a.host_index,
                    addresses: a.addresses.clone(),
                    pod: a.pod.clone(),
                    resolved: Some(resolved),
                },
            )?;
            self.sync().await?;
            done(AddPhase::PolicySync);
            let state = self.state.clone();
            let netns = self.host_netns.clone();
            let ifname = a.host_ifname.clone();
            tokio::task::spawn_blocking(move || lock(&state).dp.attach(netns.as_deref(), &ifname))
                .await
                .map_err(|e| EndpointError::task("attaching the policy programs", &e))?
                .map_err(|e| EndpointError::Policy {
                    reason: format!("hooking the policy programs onto {}: {e}", a.host_ifname),
                    transient: false,
                })?;
            done(AddPhase::Attach);
            self.shard.notify_one();
            Ok(())
        })
    }

    fn release<'a>(&'a self, host_ifname: &'a str) -> BoxFuture<'a, Result<(), EndpointError>> {
        Box::pin(async move {
            let known = {
                let mut s = lock(&self.state);
                s.unresolvable.remove(host_ifname);
                s.locals.remove(host_ifname).is_some()
            };
            if known {
                self.shard.notify_one();
                // Before the first sync the maps stay as they are; the first
                // sync removes what no endpoint wants.
                if *self.started.borrow() {
                    self.sync().await?;
                }
            }
            let state = self.state.clone();
            let netns = self.host_netns.clone();
            let ifname = host_ifname.to_owned();
            tokio::task::spawn_blocking(move || lock(&state).dp.detach(netns.as_deref(), &ifname))
                .await
                .map_err(|e| EndpointError::task("detaching the policy programs", &e))?
                .map_err(|e| EndpointError::Policy {
                    reason: format!("unhooking the policy programs from {host_ifname}: {e}"),
                    transient: true,
                })
        })
    }
}

/// The caches a sync compiles against.
struct Snapshot {
    /// Which policies, bundles, pools and mode: the revision of their
    /// caches (read before the caches) and the mode.
    policies_of: (u64, PolicyEnforcement),
    /// The caches, read only when `policies_of` changed.
    policies: Store<NetworkPolicy>,
    bundles: Store<PolicyBundle>,
    pools: Store<IPPool>,
    /// The identities' revision (read before the cache) and the cache,
    /// read only when the revision or named ports changed.
    identities_revision: u64,
    identities: Store<SecurityIdentity>,
    /// The shards that changed since the last sync.
    shards: Arc<Mutex<ShardFeed>>,
}

/// The named ports of the local endpoints, per identity.
fn local_named_ports(locals: &[Local]) -> BTreeMap<u32, NamedPorts> {
    let mut named: BTreeMap<u32, NamedPorts> = BTreeMap::new();
    for l in locals {
        if !l.endpoint.named_ports.is_empty() {
            named
                .entry(l.endpoint.identity)
                .or_default()
                .extend(&l.endpoint.named_ports);
        }
    }
    named
}

fn lock_feed(feed: &Mutex<ShardFeed>) -> std::sync::MutexGuard<'_, ShardFeed> {
    feed.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The objects the compiler's policy input is made of, read from the caches.
struct PolicyObjects {
    policies: Vec<NetworkPolicy>,
    bundles: Vec<PolicyBundle>,
    pools: Vec<IPPool>,
}

fn cloned<K: Resource + Clone>(store: &Store<K>) -> Vec<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store.state().iter().map(|o| (**o).clone()).collect()
}

/// The compiler's input as the last sync left it. The policies, bundles,
/// pools, the mode and the CIDR table built from them are taken again only
/// when their caches' revision or the mode changed, so a sync for a pod
/// (every ADD and DEL) with the policies as they were neither copies them
/// nor rebuilds the table nor hashes them; the identities and where pod
/// addresses can be are set by every sync.
#[derive(Debug, Default)]
struct CompilerInput {
    /// Which objects and mode `input` holds (see [`Snapshot::policies_of`]);
    /// `None` before the first sync.
    of: Option<(u64, PolicyEnforcement)>,
    /// [`trellis_policy::generation::policy_hash`] of them: what the node
    /// enforces once they are in the maps.
    hash: String,
    /// Where pod addresses can be, as the pools say (for
    /// `input.pod_networks`).
    pod_nets: Vec<IpNet>,
    input: Input,
}

impl CompilerInput {
    /// Takes the objects and the mode `of` says unless they are the ones
    /// it holds.
    fn refresh(&mut self, of: (u64, PolicyEnforcement), read: impl FnOnce() -> PolicyObjects) {
        if self.of == Some(of) {
            return;
        }
        let (_, enforcement) = of;
        let PolicyObjects {
            policies,
            bundles,
            pools,
        } = read();
        self.hash = trellis_policy::generation::policy_hash(enforcement, &policies, &bundles);
        // Identities are kept (see `IdentitiesOf`); pod networks are set by
        // every sync, after this.
        let identities = std::mem::take(&mut self.input.identities);
        let previous = std::mem::take(&mut self.input.cidrs);
        self.input = trellis_policy::cluster::policy_input(enforcement, policies, bundles);
        self.input.identities = identities;
        // Prefixes that stay keep their CIDR identities: the IP cache
        // entries of addresses in them are not rewritten.
        self.input.cidrs = self.input.cidrs.renumbered_like(&previous);
        self.pod_nets = trellis_policy::cluster::pool_networks(&pools);
        self.of = Some(of);
    }
}

/// A diagnostic for each local pod the node's `NodeEndpoints` cannot hold
/// (only endpoints adopted from a run with other limits: admission keeps
/// the others from starting; see [`NodeEndpointsSpec::fitting`]).
fn left_out_of_shard(locals: &BTreeMap<String, LocalState>) -> Vec<String> {
    let (_, left_out) = NodeEndpointsSpec::fitting(shard_endpoints(locals));
    left_out
        .iter()
        .map(|(e, limit)| {
            format!(
                "pod {}/{} is left out of this node's NodeEndpoints ({limit}): other nodes take its traffic as from outside the cluster",
                e.namespace, e.name
            )
        })
        .collect()
}

fn report_of<'a>(
    want: &Desired,
    errors: &[String],
    unresolvable: impl Iterator<Item = &'a String>,
) -> PolicyReport {
    let diagnostics: BTreeSet<String> = want
        .compiled
        .values()
        .flat_map(|c| c.diagnostics.iter().map(ToString::to_string))
        .chain(want.conflicts.iter().map(ToString::to_string))
        .chain(unresolvable.cloned())
        .collect();
    let diagnostics: Vec<String> = diagnostics.into_iter().collect();
    let (ready, message) = if errors.is_empty() {
        (
            true,
            if diagnostics.is_empty() {
                "the maps hold the policy of every pod on the node".to_owned()
            } else {
                format!(
                    "the maps hold the policy of every pod on the node; {} problem(s) cannot be enforced",
                    diagnostics.len()
                )
            },
        )
    } else {
        (false, errors.join("; "))
    };
    PolicyReport {
        synced: true,
        ready,
        message,
        diagnostics,
        hash: None,
    }
}

/// What identifies a compiler input apart from its identities: the
/// policies, bundles and the mode (their hash) and where pod addresses can
/// be. (CIDR identities follow from the policies and bundles.) The compile
/// cache diffs the identities itself, to recompile only what a changed
/// identity can change ([`CompileCache::for_input`]).
fn input_key(policy_hash: &str, input: &Input) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    policy_hash.hash(&mut h);
    input.pod_networks.hash(&mut h);
    h.finish()
}

fn transient(reason: String) -> EndpointError {
    EndpointError::Policy {
        reason,
        transient: true,
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The policy of a node whose datapath could not be loaded: every ADD is
/// refused with the reason (fail closed), teardown has nothing to undo.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl EndpointPolicy for Unavailable {
    fn admit<'a>(&'a self, _: &'a Admission) -> BoxFuture<'a, Result<(), EndpointError>> {
        Box::pin(async move {
            Err(EndpointError::Policy {
                reason: self.0.clone(),
                transient: false,
            })
        })
    }

    fn release<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), EndpointError>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::mk_policies;
    use trellis_api::v1alpha1::{MAX_ENDPOINT_NAMED_PORTS, MAX_NODE_ENDPOINTS};
    use trellis_policy::cidr::CidrTable;

    fn pod_local(i: usize, named_ports: usize) -> LocalState {
        let mut ports = NamedPorts::new();
        for p in 0..named_ports {
            let port = u16::try_from(1000 + p).expect("small");
            ports.insert(format!("p-{p}"), trellis_policy::Protocol::Tcp, port);
        }
        LocalState {
            ifindex: u32::try_from(i).expect("small"),
            addresses: vec![IpAddr::from([10, 244, 1, 1])],
            pod: Some(PodRef {
                namespace: "payments".into(),
                name: format!("checkout-{i}"),
                uid: None,
            }),
            resolved: Some(LocalEndpoint {
                identity: 300,
                labels: SecurityLabels::default(),
                named_ports: ports,
            }),
        }
    }

    #[test]
    fn a_pod_that_would_not_fit_the_shard_is_refused_and_changes_nothing() {
        let mut locals = BTreeMap::new();
        for i in 0..MAX_NODE_ENDPOINTS {
            take_in(&mut locals, &format!("trellis{i}"), pod_local(i, 0)).expect("fits");
        }
        let before: Vec<String> = locals.keys().cloned().collect();
        let err = take_in(&mut locals, "trellisfull", pod_local(5000, 0)).unwrap_err();
        assert!(
            matches!(&err, EndpointError::Policy { transient: true, reason } if reason.contains("payments/checkout-5000") && reason.contains("more than the 1024")),
            "{err}"
        );
        assert_eq!(locals.keys().cloned().collect::<Vec<_>>(), before);
        // A pod re-added under a name it had keeps its old entry when refused.
        let err = take_in(
            &mut locals,
            "trellis0",
            pod_local(0, MAX_ENDPOINT_NAMED_PORTS + 1),
        )
        .unwrap_err();
        assert!(
            matches!(&err, EndpointError::Policy { transient: false, reason } if reason.contains("65 named container ports")),
            "{err}"
        );
        assert_eq!(
            locals["trellis0"]
                .resolved
                .as_ref()
                .map(|r| r.named_ports.is_empty()),
            Some(true)
        );
        // Once one leaves, the next fits.
        locals.remove("trellis1");
        take_in(&mut locals, "trellisfull", pod_local(5000, 0)).expect("fits now");
        // Endpoints without a pod take no room.
        let mut no_pod = pod_local(6000, 0);
        no_pod.pod = None;
        take_in(&mut locals, "trellisnopod", no_pod).expect("not in the shard");
        assert_eq!(shard_endpoints(&locals).len(), MAX_NODE_ENDPOINTS);
        assert!(left_out_of_shard(&locals).is_empty(), "everything fits");
    }

    #[test]
    fn an_adopted_pod_the_shard_cannot_hold_is_reported() {
        // Adopted from a run with other limits: not through take_in.
        let mut locals = BTreeMap::new();
        locals.insert("trellis0".to_owned(), pod_local(0, 0));
        locals.insert(
            "trellis1".to_owned(),
            pod_local(1, MAX_ENDPOINT_NAMED_PORTS + 1),
        );
        let problems = left_out_of_shard(&locals);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("payments/checkout-1") && problems[0].contains("named"),
            "{problems:?}"
        );
        let report = report_of(&Desired::default(), &[], problems.iter());
        assert!(report.ready, "the maps hold the policy");
        assert_eq!(report.diagnostics, problems);
    }

    #[test]
    fn the_policies_are_taken_again_only_when_their_revision_or_the_mode_changed() {
        let mut input = CompilerInput::default();
        let reads = std::cell::Cell::new(0);
        let read = |policies: Vec<NetworkPolicy>| {
            let reads = &reads;
            move || {
                reads.set(reads.get() + 1);
                PolicyObjects {
                    policies,
                    bundles: Vec::new(),
                    pools: Vec::new(),
                }
            }
        };
        input.refresh((1, PolicyEnforcement::Default), read(mk_policies(8080)));
        assert_eq!(reads.get(), 1);
        let first = (input.hash.clone(), input.input.cidrs.clone());
        assert_eq!(
            first.0,
            trellis_policy::generation::policy_hash(
                PolicyEnforcement::Default,
                &mk_policies(8080),
                &[]
            )
        );
        assert_eq!(first.1, CidrTable::from_policies(&mk_policies(8080)));
        assert_eq!(input.input.policies.len(), 2);

        // The same revision and mode: the policies are not read at all.
        input.refresh((1, PolicyEnforcement::Default), read(Vec::new()));
        assert_eq!(reads.get(), 1);
        assert_eq!((input.hash.clone(), input.input.cidrs.clone()), first);
        assert_eq!(input.input.policies.len(), 2);

        // Another mode: taken again.
        input.refresh((1, PolicyEnforcement::Always), read(mk_policies(8080)));
        assert_eq!(reads.get(), 2);
        assert_eq!(input.input.enforcement, PolicyEnforcement::Always);
        assert_ne!(input.hash, first.0);
        // Another revision: taken again, whatever changed.
        input.refresh((2, PolicyEnforcement::Always), read(Vec::new()));
        assert_eq!(reads.get(), 3);
        assert!(input.input.policies.is_empty());
        assert!(input.input.cidrs.is_empty());
        assert_eq!(
            input.hash,
            trellis_policy::generation::policy_hash(PolicyEnforcement::Always, &[], &[])
        );
    }

    #[test]
    fn a_policy_change_keeps_the_cidr_identities_of_prefixes_that_stay() {
        let egress_to = |cidrs: &[&str]| {
            let to: Vec<serde_json::Value> = cidrs
                .iter()
                .map(|c| serde_json::json!({"ipBlock": {"cidr": c}}))
                .collect();
            crate::policy::testing::mk_policy(serde_json::json!({
                "metadata": {"namespace": "shop", "name": "out"},
                "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": to}]}
            }))
        };
        let objects = |policies: Vec<NetworkPolicy>| {
            move || PolicyObjects {
                policies,
                bundles: Vec::new(),
                pools: Vec::new(),
            }
        };
        let mut input = CompilerInput::default();
        input.refresh(
            (1, PolicyEnforcement::Default),
            objects(vec![egress_to(&["10.0.0.0/8"])]),
        );
        let before = input.input.cidrs.clone();
        // A prefix sorted before it: numbered afresh, 10.0.0.0/8 would move.
        input.refresh(
            (2, PolicyEnforcement::Default),
            objects(vec![egress_to(&["1.0.0.0/8", "10.0.0.0/8"])]),
        );
        let ten = "10.0.0.0/8".parse().expect("a prefix");
        assert_eq!(
            input.input.cidrs.identity_of(&ten),
            before.identity_of(&ten)
        );
        assert_eq!(input.input.cidrs.len(), 2);
    }
}
