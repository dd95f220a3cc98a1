//! The truth-table world on a sandbox: three nodes with the operator and `trellis-node`s, the
//! namespaces x, y, z and their pods a, b, c, every pod serving its ports; and the loop that
//! applies a step's changes, waits until they can be expected in effect, and compares what
//! gets through with the oracle.
//!
//! ```text
//!  World::start(test)
//!     ├─ sandbox /tmp/trellis-e2e-<test>: 3 nodes, operator, agents, IPPool sample; every
//!     │  node Ready with its 2 peers
//!     ├─ Namespaces x y z (ns=<name>), Pods a b c in each (pod=<name>, ports serve-80-tcp …),
//!     │  round robin over the nodes, plugged in by the CNI plugin
//!     └─ servers in every pod's netns: TCP and UDP 80, 81, answering "<ns>/<pod>"
//!
//!  World::run_step(step)
//!     ├─ change                 apply/delete NetworkPolicies and PolicyBundles, patch labels
//!     ├─ wait_policy_applied    → Enforcement (Unconfirmed until NetworkStatus says more)
//!     ├─ snapshot + oracle      expected tables
//!     └─ rounds of probes       every cell of every grid, ≤ MAX_IN_FLIGHT at once; a cell
//!                               expected allowed but silent is tried DENIAL_TRIES times;
//!                               Confirmed: any difference fails at once;
//!                               Unconfirmed: probe again until equal or SETTLE_TIMEOUT
//! ```

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod as K8sPod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::json;
use trellis_api::v1alpha1::{
    NETWORKSTATUS_POLICY_READY, NETWORKSTATUS_READY, NetworkConfig, NetworkStatus,
    NetworkStatusStatus, NodeEndpoints, PolicyBundle,
};

use super::{
    Addresses, Change, Grid, NAMESPACES, NODES, PORTS, Reachability, Snapshot, Step,
    case::{Case, pod_specs},
    expected_tables, pod_keys,
    traffic::{self, Observed, PROBE_TIMEOUT, Servers},
};
use crate::{
    cluster::{add_pods, apply_namespace, start_cluster},
    controlplane::{ControlPlane, StartOptions},
    error::{Error, Result},
    samples, wait_for,
};

/// Field manager of everything the harness writes.
pub const FIELD_MANAGER: &str = "trellis-e2e-truth";
/// Probes in flight at once. A denied probe holds its slot for [`PROBE_TIMEOUT`], so this
/// bounds a round of 4 × 81 denied cells to about six timeouts.
pub const MAX_IN_FLIGHT: usize = 64;
/// Probes of a cell expected allowed before its silence counts as a denial (a pod's network
/// or server still starting is not a policy).
pub const DENIAL_TRIES: u32 = 3;
/// With [`Enforcement::Unconfirmed`], how long the tables may take to match after a step.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two rounds, so a round that fails fast does not spin.
const ROUND_INTERVAL: Duration = Duration::from_millis(200);
/// How often a step that keeps differing says so.
const REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// How long the sandbox's nodes, and the objects written, may take to show up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What the harness knows about when the nodes enforce the policies written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Every node reported the written policies in its maps: a table that differs is a
    /// failure at once (silence where allowed is still tried [`DENIAL_TRIES`] times).
    Confirmed,
    /// Nothing says when the nodes enforce what was written: probe until the tables match,
    /// for up to [`SETTLE_TIMEOUT`].
    Unconfirmed,
}

/// A step whose tables did not match.
#[derive(Debug)]
pub struct Mismatch {
    pub what: String,
    pub tables: Vec<Reachability>,
    pub rounds: u32,
    pub elapsed: Duration,
    pub enforcement: Enforcement,
    /// Where the sandbox's logs are (kept after a failed test).
    pub logs: PathBuf,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.enforcement {
            Enforcement::Confirmed => "with enforcement confirmed by every node".to_string(),
            Enforcement::Unconfirmed => format!(
                "still differing after {:.1?} of probing (enforcement not confirmed by the nodes)",
                self.elapsed
            ),
        };
        writeln!(
            f,
            "{}: the datapath disagrees with the truth after {} round(s), {how}",
            self.what, self.rounds
        )?;
        for table in &self.tables {
            write!(f, "{table}")?;
        }
        write!(f, "sandbox logs: {}", self.logs.display())
    }
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Writing the changes or reading the cluster failed.
    #[error(transparent)]
    Sandbox(#[from] Error),
    /// What got through is not what the oracle says.
    #[error("{0}")]
    Mismatch(Box<Mismatch>),
}

struct WorldPod {
    key: String,
    ip: IpAddr,
    netns: PathBuf,
}

/// The sandbox with the truth-table pods serving. Dropping it stops the servers, then the
/// sandbox (kept for inspection if the test panicked).
pub struct World {
    /// First: the servers' sockets go before the namespaces they live in.
    _servers: Vec<Servers>,
    pods: Vec<WorldPod>,
    client: Client,
    cp: ControlPlane,
}

impl World {
    /// Start a sandbox for test `test` (`/tmp/trellis-e2e-<test>`) and make the world in it.
    pub async fn start(test: &str) -> Result<World> {
        let pools = samples::ippools(samples::IPPOOL_SAMPLE)?;
        let cp = start_cluster(StartOptions::for_test(test), NODES, &pools, FIELD_MANAGER).await?;
        let client = cp.client();
        wait_nodes_ready(&client, NODES).await;

        for name in NAMESPACES {
            apply_namespace(&client, name, FIELD_MANAGER).await?;
        }
        let pods: Vec<WorldPod> = add_pods(&cp.pods(), &pod_specs())
            .await?
            .into_iter()
            .map(|(pod, ip)| WorldPod {
                key: pod.key().to_string(),
                ip,
                netns: pod.netns_path(),
            })
            .collect();
        // The tables' rows and columns are in this order, and so are the probes.
        let keys: Vec<String> = pods.iter().map(|p| p.key.clone()).collect();
        if keys != pod_keys() {
            return Err(Error::InvalidPod {
                pod: keys.join(", "),
                reason: format!("the world's pods are not {:?}", pod_keys()),
            });
        }
        wait_pods_published(&client, &pods).await;
        let mut servers = Vec::new();
        for pod in &pods {
            servers.push(
                traffic::serve(Some(&pod.netns), &pod.key, &PORTS)
                    .await
                    .map_err(|e| Error::io("serve in the network namespace", &pod.netns, e))?,
            );
        }
        Ok(World {
            _servers: servers,
            pods,
            client,
            cp,
        })
    }

    pub fn control_plane(&self) -> &ControlPlane {
        &self.cp
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Every pod's address.
    pub fn addresses(&self) -> Addresses {
        Addresses(self.pods.iter().map(|p| (p.key.clone(), p.ip)).collect())
    }

    /// The cluster as the oracle needs it, read from the apiserver.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let lp = ListParams::default();
        let mut snapshot = Snapshot::default();
        for ns in NAMESPACES {
            snapshot.namespaces.push(
                Api::<Namespace>::all(self.client.clone())
                    .get(ns)
                    .await
                    .map_err(|e| Error::kube(format!("get Namespace {ns}"), e))?,
            );
            snapshot.pods.extend(
                Api::<K8sPod>::namespaced(self.client.clone(), ns)
                    .list(&lp)
                    .await
                    .map_err(|e| Error::kube(format!("list Pods in {ns}"), e))?
                    .items,
            );
        }
        // Every namespace's: one in another namespace must not matter, and the oracle says so.
        snapshot.policies = Api::<NetworkPolicy>::all(self.client.clone())
            .list(&lp)
            .await
            .map_err(|e| Error::kube("list NetworkPolicies", e))?
            .items;
        snapshot.bundles = Api::<PolicyBundle>::all(self.client.clone())
            .list(&lp)
            .await
            .map_err(|e| Error::kube("list PolicyBundles", e))?
            .items;
        Ok(snapshot)
    }

    /// Make `changes` through the apiserver, in order.
    pub async fn change(&self, changes: &[Change]) -> Result<()> {
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        let merge = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        for change in changes {
            let what = change.to_string();
            match change {
                Change::Apply(policy) => {
                    let ns = policy.namespace().unwrap_or_default();
                    Api::<NetworkPolicy>::namespaced(self.client.clone(), &ns)
                        .patch(&policy.name_any(), &apply, &Patch::Apply(policy.as_ref()))
                        .await
                        .map_err(|e| Error::kube(&what, e))?;
                }
                Change::Delete { namespace, name } => {
                    Api::<NetworkPolicy>::namespaced(self.client.clone(), namespace)
                        .delete(name, &DeleteParams::default())
                        .await
                        .map_err(|e| Error::kube(&what, e))?;
                }
                Change::ApplyBundle(bundle) => {
                    Api::<PolicyBundle>::all(self.client.clone())
                        .patch(&bundle.name_any(), &apply, &Patch::Apply(bundle.as_ref()))
                        .await
                        .map_err(|e| Error::kube(&what, e))?;
                }
                Change::DeleteBundle { name } => {
                    Api::<PolicyBundle>::all(self.client.clone())
                        .delete(name, &DeleteParams::default())
                        .await
                        .map_err(|e| Error::kube(&what, e))?;
                }
                Change::LabelPod { pod, key, value } => {
                    let (ns, name) = pod.split_once('/').unwrap_or_default();
                    let patch = json!({"metadata": {"labels": {key: value}}});
                    Api::<K8sPod>::namespaced(self.client.clone(), ns)
                        .patch(name, &merge, &Patch::Merge(patch))
                        .await
                        .map_err(|e| Error::kube(&what, e))?;
                }
                Change::LabelNamespace {
                    namespace,
                    key,
                    value,
                } => {
                    let patch = json!({"metadata": {"labels": {key: value}}});
                    Api::<Namespace>::all(self.client.clone())
                        .patch(namespace, &merge, &Patch::Merge(patch))
                        .await
                        .map_err(|e| Error::kube(&what, e))?;
                }
            }
        }
        Ok(())
    }

    /// Wait until `changes` can be expected in effect on every node, and say how sure that
    /// is. First until the apiserver serves every change. A step that only applies or deletes
    /// NetworkPolicies and PolicyBundles is then [`Enforcement::Confirmed`] once every node's NetworkStatus says
    /// `PolicyReady=True` with the `policyHash` of the policies and bundles the apiserver serves (computed
    /// here from the list, with the hash's published encoding): each node's maps hold them. A
    /// label change moves a pod to another identity, which reaches other nodes through its
    /// node's NodeEndpoints shard and no status says when: [`Enforcement::Unconfirmed`].
    pub async fn wait_policy_applied(&self, changes: &[Change]) -> Result<Enforcement> {
        for change in changes {
            wait_for(&format!("{change} to be served"), READY_TIMEOUT, || async {
                self.is_served(change).await.then_some(())
            })
            .await;
        }
        if changes.iter().any(|c| {
            !matches!(
                c,
                Change::Apply(_)
                    | Change::Delete { .. }
                    | Change::ApplyBundle(_)
                    | Change::DeleteBundle { .. }
            )
        }) {
            return Ok(Enforcement::Unconfirmed);
        }
        let want = self.policy_hash().await?;
        wait_every_node(
            &self.client,
            NODES,
            &format!("every node to enforce policy hash {want}"),
            |st| {
                st.policy_hash.as_deref() == Some(want.as_str())
                    && has_condition(st, NETWORKSTATUS_POLICY_READY)
            },
        )
        .await;
        Ok(Enforcement::Confirmed)
    }

    /// The policy hash of every NetworkPolicy and PolicyBundle the apiserver serves, under
    /// the cluster's enforcement mode (see `trellis_policy::generation`).
    async fn policy_hash(&self) -> Result<String> {
        let policies = Api::<NetworkPolicy>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| Error::kube("list NetworkPolicies", e))?
            .items;
        let bundles = Api::<PolicyBundle>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| Error::kube("list PolicyBundles", e))?
            .items;
        let enforcement = Api::<NetworkConfig>::all(self.client.clone())
            .get_opt("default")
            .await
            .map_err(|e| Error::kube("get NetworkConfig default", e))?
            .map(|c| c.spec.policy_enforcement)
            .unwrap_or_default();
        Ok(trellis_policy::generation::policy_hash(
            enforcement,
            &policies,
            &bundles,
        ))
    }

    async fn is_served(&self, change: &Change) -> bool {
        let labels_hold = |labels: &BTreeMap<String, String>, key: &str, value: &Option<String>| {
            labels.get(key) == value.as_ref()
        };
        match change {
            Change::Apply(policy) => {
                let ns = policy.namespace().unwrap_or_default();
                let served = Api::<NetworkPolicy>::namespaced(self.client.clone(), &ns)
                    .get_opt(&policy.name_any())
                    .await;
                // The apply returned after the write, so being served is being current (the
                // spec comes back defaulted: policyTypes, protocol; it is not compared).
                matches!(served, Ok(Some(_)))
            }
            Change::Delete { namespace, name } => matches!(
                Api::<NetworkPolicy>::namespaced(self.client.clone(), namespace)
                    .get_opt(name)
                    .await,
                Ok(None)
            ),
            Change::ApplyBundle(bundle) => matches!(
                Api::<PolicyBundle>::all(self.client.clone())
                    .get_opt(&bundle.name_any())
                    .await,
                Ok(Some(_))
            ),
            Change::DeleteBundle { name } => matches!(
                Api::<PolicyBundle>::all(self.client.clone())
                    .get_opt(name)
                    .await,
                Ok(None)
            ),
            Change::LabelPod { pod, key, value } => {
                let (ns, name) = pod.split_once('/').unwrap_or_default();
                match Api::<K8sPod>::namespaced(self.client.clone(), ns)
                    .get(name)
                    .await
                {
                    Ok(p) => labels_hold(p.labels(), key, value),
                    Err(_) => false,
                }
            }
            Change::LabelNamespace {
                namespace,
                key,
                value,
            } => match Api::<Namespace>::all(self.client.clone())
                .get(namespace)
                .await
            {
                Ok(n) => labels_hold(n.labels(), key, value),
                Err(_) => false,
            },
        }
    }

    /// Probe `grids` until they match the oracle's tables for `snapshot` (see
    /// [`Enforcement`]); the tables as last probed, or the mismatch.
    pub async fn check(
        &self,
        what: &str,
        snapshot: &Snapshot,
        grids: &[Grid],
        enforcement: Enforcement,
    ) -> std::result::Result<Vec<Reachability>, Box<Mismatch>> {
        let started = Instant::now();
        let mut tables = expected_tables(snapshot, grids);
        let mut rounds = 0;
        let (mut reported, mut last_report) = (None, started);
        loop {
            rounds += 1;
            self.probe_round(&mut tables).await;
            let differing: usize = tables.iter().map(|t| t.mismatches().len()).sum();
            let elapsed = started.elapsed();
            if differing == 0 {
                eprintln!(
                    "truth: {what}: {} grid(s) × {} cells as expected after {rounds} round(s), {elapsed:.1?}",
                    tables.len(),
                    self.pods.len() * self.pods.len()
                );
                return Ok(tables);
            }
            let give_up = match enforcement {
                Enforcement::Confirmed => true,
                Enforcement::Unconfirmed => elapsed >= SETTLE_TIMEOUT,
            };
            if give_up {
                return Err(Box::new(Mismatch {
                    what: what.to_string(),
                    tables,
                    rounds,
                    elapsed,
                    enforcement,
                    logs: self.cp.sandbox().logs_dir(),
                }));
            }
            // Say so when the count changes, and every few seconds while it does not.
            if reported != Some(differing) || last_report.elapsed() >= REPORT_INTERVAL {
                eprintln!(
                    "truth: {what}: round {rounds}: {differing} cell(s) differ; probing again \
                     (enforcement not confirmed, {elapsed:.1?} of {SETTLE_TIMEOUT:?})"
                );
                (reported, last_report) = (Some(differing), Instant::now());
            }
            tokio::time::sleep(ROUND_INTERVAL).await;
        }
    }

    /// Probe every cell of every table once (silence where allowed up to [`DENIAL_TRIES`]
    /// times), at most [`MAX_IN_FLIGHT`] at once.
    async fn probe_round(&self, tables: &mut [Reachability]) {
        let mut jobs = Vec::new();
        for (t, table) in tables.iter().enumerate() {
            for (from, to) in cells(self.pods.len()) {
                jobs.push((t, table.grid, from, to, table.expected_allowed(from, to)));
            }
        }
        let results: Vec<(usize, usize, usize, Observed, u32)> = futures::stream::iter(jobs)
            .map(|(t, grid, from, to, expected_allowed)| async move {
                let (observed, tries) = self.probe_cell(grid, from, to, expected_allowed).await;
                (t, from, to, observed, tries)
            })
            .buffer_unordered(MAX_IN_FLIGHT)
            .collect()
            .await;
        for (t, from, to, observed, tries) in results {
            tables[t].observe(from, to, observed, tries);
        }
    }

    async fn probe_cell(
        &self,
        grid: Grid,
        from: usize,
        to: usize,
        expected_allowed: bool,
    ) -> (Observed, u32) {
        let (src, dst) = (&self.pods[from], &self.pods[to]);
        let target = SocketAddr::new(dst.ip, grid.port);
        let mut tries = 0;
        loop {
            tries += 1;
            let observed =
                traffic::probe(Some(&src.netns), grid.protocol, target, PROBE_TIMEOUT).await;
            if observed.is_allowed(&dst.key) || !expected_allowed || tries >= DENIAL_TRIES {
                return (observed, tries);
            }
        }
    }

    /// Probe once from pod `from` to pod `to` (`ns/name` keys) on `grid`, as a table cell is
    /// probed (a probe expected to get through is retried, up to [`DENIAL_TRIES`]); what it
    /// saw and whether the connection got through. `None` when either pod is not in the world.
    pub async fn probe_pair(
        &self,
        from: &str,
        to: &str,
        grid: Grid,
        expected_allowed: bool,
    ) -> Option<(Observed, bool)> {
        let from = self.pods.iter().position(|p| p.key == from)?;
        let to = self.pods.iter().position(|p| p.key == to)?;
        let (observed, _) = self.probe_cell(grid, from, to, expected_allowed).await;
        let allowed = observed.is_allowed(&self.pods[to].key);
        Some((observed, allowed))
    }

    /// Make `step`'s changes, wait for them, and check its grids.
    pub async fn run_step(&self, step: &Step) -> std::result::Result<Vec<Reachability>, StepError> {
        self.change(&step.changes).await?;
        let enforcement = self.wait_policy_applied(&step.changes).await?;
        let snapshot = self.snapshot().await?;
        self.check(&step.what, &snapshot, &step.grids, enforcement)
            .await
            .map_err(StepError::Mismatch)
    }

    /// Run `case`: first the baseline (no policies: everything allowed), then each step.
    /// Panics with the tables at the first step that does not match.
    pub async fn run(&self, case: &Case) {
        let baseline = Step::new("baseline, before any policy");
        if let Err(e) = self.run_step(&baseline).await {
            panic!("case {}: {e}", case.name);
        }
        let steps = (case.steps)(&self.addresses());
        let n = steps.len();
        for (i, step) in steps.iter().enumerate() {
            let changes: Vec<String> = step.changes.iter().map(ToString::to_string).collect();
            eprintln!(
                "truth: case {} step {}/{n}: {} [{}]",
                case.name,
                i + 1,
                step.what,
                changes.join("; ")
            );
            if let Err(e) = self.run_step(step).await {
                panic!("case {} step {}/{n}: {e}", case.name, i + 1);
            }
        }
    }
}

/// Every (from, to) of an `n` × `n` table.
fn cells(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).flat_map(move |from| (0..n).map(move |to| (from, to)))
}

/// Every pod in its node's NodeEndpoints shard, with an identity: from then on every node
/// knows every pod's identity by address (before, a remote pod is outside the cluster).
async fn wait_pods_published(client: &Client, pods: &[WorldPod]) {
    let api: Api<NodeEndpoints> = Api::all(client.clone());
    wait_for(
        "every pod published in its node's NodeEndpoints",
        READY_TIMEOUT,
        || async {
            let list = api.list(&ListParams::default()).await.ok()?;
            pods.iter()
                .all(|pod| {
                    list.items.iter().any(|shard| {
                        shard.spec.endpoints.iter().any(|e| {
                            format!("{}/{}", e.namespace, e.name) == pod.key
                                && e.addresses.iter().any(|a| a.parse() == Ok(pod.ip))
                        })
                    })
                })
                .then_some(())
        },
    )
    .await;
}

/// The NetworkStatus of each of the sandbox's `nodes` numbered nodes Ready with all its
/// `nodes - 1` peers: the overlay is up and the agents serve pods.
pub async fn wait_nodes_ready(client: &Client, nodes: usize) {
    let peers = i32::try_from(nodes.saturating_sub(1)).unwrap_or(i32::MAX);
    wait_every_node(
        client,
        nodes,
        &format!("every node Ready with {peers} peers"),
        |st| st.peers == peers && has_condition(st, NETWORKSTATUS_READY),
    )
    .await;
}

/// Until the NetworkStatus of each of the sandbox's `nodes` numbered nodes satisfies `holds`.
async fn wait_every_node(
    client: &Client,
    nodes: usize,
    what: &str,
    holds: impl Fn(&NetworkStatusStatus) -> bool,
) {
    let api: Api<NetworkStatus> = Api::all(client.clone());
    let names: Vec<String> = (1..=nodes)
        .map(|i| format!("{}{i}", crate::nodes::NODE_PREFIX))
        .collect();
    wait_for(what, READY_TIMEOUT, || async {
        let list = api.list(&ListParams::default()).await.ok()?;
        names
            .iter()
            .all(|name| {
                list.items
                    .iter()
                    .any(|s| s.name_any() == *name && s.status.as_ref().is_some_and(&holds))
            })
            .then_some(())
    })
    .await;
}

/// Whether the status has condition `type_` True.
fn has_condition(status: &NetworkStatusStatus, type_: &str) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}
