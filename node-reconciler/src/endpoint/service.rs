//! ADD, DEL, CHECK, STATUS and GC over the store and the datapath, and the
//! recovery that runs before the first request.
//!
//! ```text
//!  ADD   facts? ─▶ tear down what exists ─▶ forwarding on ─▶ enter netns ─▶ allocate ─▶ Record{Adding}
//!                  ─▶ datapath ─▶ Record{Ready}        (any failure: tear down, drop the record, release)
//!  DEL   Record{Deleting} ─▶ routes gone ─▶ answer        (nothing there: success)
//!        └─ after the answer: veth ─▶ drop the record (durably) ─▶ release addresses
//!  CHECK record ─▶ inspect pod + node namespaces ─▶ check::differences
//!  GC    DEL every record not in `valid`, then orphans (addresses, host veths)
//! ```
//!
//! Two requests for the same attachment never overlap (a lock per
//! attachment, which the rest of a DEL keeps until the veth is gone);
//! requests for different ones do. GC and recovery take the whole service,
//! so they never see an ADD or a DEL half done.
//!
//! Why DEL answers before its veth is gone: deleting a device waits for an
//! RCU grace period (about 17 ms here, most of a DEL), and nothing the
//! runtime does next depends on it. Once the pod's routes are gone the pod
//! is unreachable; its addresses stay allocated, and its name and record
//! held, until the veth is gone too, so nothing new can collide with what
//! is left. A restart finishes what a crash interrupted.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedMutexGuard, RwLock, watch};
use tracing::Instrument;
use trellis_cni::proto::{Attachment, Command, Endpoint, PodRef, Response};

use super::check;
use super::datapath::{self, Wiring};
use super::error::EndpointError;
use super::ipam::Family;
use super::naming;
use super::record::{Phase, RECORD_VERSION, Record};
use super::store::Store;
use super::{Admission, EndpointPolicy, NodeFacts};
use crate::metrics::{AddPhase, Metrics};
use crate::netns::NetnsHandle;

/// The node's pod endpoints.
#[derive(Debug)]
pub struct Endpoints {
    core: Arc<Core>,
    facts: watch::Receiver<Option<NodeFacts>>,
    locks: Arc<AttachmentLocks>,
    /// Shared by ADD, DEL (until its veth is gone) and CHECK; exclusive for
    /// GC and recovery.
    whole: Arc<RwLock<()>>,
    /// DELs answered whose veth is not gone yet.
    deleting: Arc<watch::Sender<usize>>,
}

/// What requests and the rest of a DEL after its answer share.
#[derive(Debug)]
struct Core {
    store: Arc<Store>,
    host: Arc<NetnsHandle>,
    metrics: Metrics,
    ready: watch::Sender<usize>,
    /// The endpoints' policy; `None`: none (tests of the plumbing alone).
    policy: Option<Arc<dyn EndpointPolicy>>,
}

/// Attempts at finishing a DEL after its answer before leaving it to GC or
/// the next start.
const DELETE_ATTEMPTS: u32 = 3;

/// What recovery or GC cleaned up besides records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Records rolled back (recovery) or released (GC).
    pub endpoints: Vec<Attachment>,
    /// Allocations no record owned.
    pub addresses: Vec<IpAddr>,
    /// Host veths (and stray temporary peers) no record owned.
    pub links: Vec<String>,
    /// What could not be cleaned up.
    pub errors: Vec<String>,
}

impl Endpoints {
    /// Opens the state directory (refusing one another process holds),
    /// then recovers: rolls back every record still `Adding` (no ADD
    /// survives a restart), finishes every one `Deleting`, and removes
    /// addresses and host veths no record owns. `host` works in the node's
    /// namespace.
    pub async fn open(
        state_dir: &Path,
        host: Arc<NetnsHandle>,
        facts: watch::Receiver<Option<NodeFacts>>,
        metrics: Metrics,
    ) -> Result<Endpoints, EndpointError> {
        Self::open_with_policy(state_dir, host, facts, metrics, None).await
    }

    /// [`open`](Self::open), with every ADD admitted by `policy` before it
    /// answers and every teardown releasing the endpoint from it.
    pub async fn open_with_policy(
        state_dir: &Path,
        host: Arc<NetnsHandle>,
        facts: watch::Receiver<Option<NodeFacts>>,
        metrics: Metrics,
        policy: Option<Arc<dyn EndpointPolicy>>,
    ) -> Result<Endpoints, EndpointError> {
        let dir = state_dir.to_path_buf();
        let store = tokio::task::spawn_blocking(move || Store::open(&dir))
            .await
            .map_err(|e| EndpointError::task("opening the state directory", &e))??;
        let endpoints = Endpoints {
            core: Arc::new(Core {
                store: Arc::new(store),
                host,
                metrics,
                ready: watch::Sender::new(0),
                policy,
            }),
            facts,
            locks: Arc::default(),
            whole: Arc::default(),
            deleting: Arc::new(watch::Sender::new(0)),
        };
        let cleanup = endpoints.recover().await;
        if cleanup != Cleanup::default() {
            tracing::info!(
                finished = cleanup.endpoints.len(),
                addresses = cleanup.addresses.len(),
                links = cleanup.links.len(),
                "recovered the state a previous run left"
            );
        }
        for error in &cleanup.errors {
            tracing::warn!(%error, "recovery left something behind; GC or DEL retries it");
        }
        // Early, so a node that cannot forward says so before its first
        // pod; every ADD checks again (and IPv6 once there is a block).
        match datapath::ensure_forwarding(&endpoints.core.host, false).await {
            Ok(switched) => {
                for what in switched {
                    tracing::info!(what, "turned on in the node's namespace");
                }
            }
            Err(e) => tracing::error!(error = %e, "pods on this node will not be reachable"),
        }
        endpoints.core.publish_count().await;
        Ok(endpoints)
    }

    /// The number of `Ready` endpoints, updated after every change.
    pub fn ready_endpoints(&self) -> watch::Receiver<usize> {
        self.core.ready.subscribe()
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        self.core.store.root()
    }

    /// Waits until every answered DEL has deleted its veth and released its
    /// addresses (or given up, leaving the record `Deleting` for GC or the
    /// next start).
    pub async fn settled(&self) {
        let mut pending = self.deleting.subscribe();
        // The sender lives as long as `self`.
        let _ = pending.wait_for(|n| *n == 0).await;
    }

    /// The `Ready` endpoints as their policy sees them (for a policy engine
    /// taking over after a restart); those whose host veth is gone are left
    /// out (GC or DEL finishes them).
    pub async fn admissions(&self) -> Vec<Admission> {
        let _whole = self.whole.read().await;
        let records = match self.core.blocking(|s| s.records()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the endpoint records");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for r in records.into_iter().filter(|r| r.phase == Phase::Ready) {
            match datapath::host_index(&self.core.host, &r.host_ifname).await {
                Ok(Some(host_index)) => out.push(Admission {
                    attachment: r.attachment,
                    pod: r.pod,
                    host_ifname: r.host_ifname,
                    host_index,
                    addresses: r.addresses.iter().map(|n| n.addr()).collect(),
                }),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(ifname = %r.host_ifname, error = %e, "cannot look up an endpoint's veth")
                }
            }
        }
        out
    }

    /// Serves one command.
    pub async fn handle(&self, command: Command) -> Response {
        let result = match command {
            Command::Add {
                attachment,
                netns,
                pod,
            } => self
                .add(attachment, netns, pod)
                .await
                .map(|endpoint| Response::Added { endpoint }),
            Command::Del { attachment, .. } => {
                self.del(attachment).await.map(|()| Response::Deleted)
            }
            Command::Check { attachment, netns } => self
                .check(attachment, netns)
                .await
                .map(|endpoint| Response::Checked { endpoint }),
            Command::Status => Ok(self.status()),
            Command::Gc { valid } => self
                .gc(valid)
                .await
                .map(|released| Response::Collected { released }),
        };
        result.unwrap_or_else(|e| Response::Error(e.reply()))
    }

    /// ADD: allocates the pod's addresses and plugs it in; on any failure
    /// leaves nothing behind. An attachment that already has an endpoint (a
    /// runtime retrying after a crash or timeout) is torn down and redone.
    pub async fn add(
        &self,
        attachment: Attachment,
        netns: String,
        pod: Option<PodRef>,
    ) -> Result<Endpoint, EndpointError> {
        naming::validate(&attachment).map_err(EndpointError::InvalidAttachment)?;
        let _whole = self.whole.read().await;
        let _one = self.locks.lock(&attachment).await;
        let facts = self.usable_facts()?;
        let mut phase = PhaseClock::new(&self.core.metrics);

        if self.core.teardown(&attachment).await? {
            tracing::info!("the attachment had an endpoint; made again");
        }
        let host_ifname = naming::host_ifname(&attachment);
        let name = host_ifname.clone();
        if let Some(held) = self.core.blocking(move |s| s.owner_of_link(&name)).await? {
            return Err(EndpointError::LinkClash {
                name: host_ifname,
                held,
                wanted: attachment,
            });
        }
        let ipv6 = facts
            .blocks
            .iter()
            .any(|b| Family::of(&b.addr()) == Family::V6);
        let switched = datapath::ensure_forwarding(&self.core.host, ipv6).await?;
        for what in switched {
            tracing::info!(what, "turned on in the node's namespace");
        }
        let pod_ns = open_netns(&netns).await?;
        phase.done(AddPhase::Prepare);

        let owner = attachment.clone();
        let blocks = facts.blocks.clone();
        let addresses = self
            .core
            .blocking(move |s| s.allocate(&owner, &blocks))
            .await??;
        let mut record = Record {
            version: RECORD_VERSION,
            phase: Phase::Adding,
            attachment: attachment.clone(),
            netns: netns.clone(),
            pod,
            host_ifname: host_ifname.clone(),
            addresses: addresses.clone(),
            mtu: facts.pod_mtu,
            host_mac: None,
            mac: None,
        };
        if let Err(e) = self.core.put(&record).await {
            return Err(self.roll_back(&attachment, e).await);
        }
        phase.done(AddPhase::Allocate);
        let wiring = Wiring {
            host_ifname,
            ifname: attachment.ifname.clone(),
            netns: PathBuf::from(&netns),
            mtu: facts.pod_mtu,
            addresses,
        };
        let wired = match datapath::add(&self.core.host, &pod_ns, &wiring).await {
            Ok(w) => w,
            Err(e) => return Err(self.roll_back(&attachment, e.into()).await),
        };
        phase.done(AddPhase::Wire);
        if let Some(policy) = &self.core.policy {
            let admission = Admission {
                attachment: attachment.clone(),
                pod: record.pod.clone(),
                host_ifname: record.host_ifname.clone(),
                host_index: wired.host_index,
                addresses: record.addresses.iter().map(|n| n.addr()).collect(),
            };
            if let Err(e) = policy.admit(&admission).await {
                return Err(self.roll_back(&attachment, e).await);
            }
            // The policy timed its own steps (identity, policy_sync, attach).
            phase.skip();
        }
        record.phase = Phase::Ready;
        record.host_mac = Some(wired.host_mac);
        record.mac = Some(wired.mac);
        if let Err(e) = self.core.put(&record).await {
            return Err(self.roll_back(&attachment, e).await);
        }
        self.core.publish_count().await;
        phase.done(AddPhase::Record);
        tracing::info!(
            addresses = ?record.addresses,
            host_ifname = %record.host_ifname,
            "endpoint added"
        );
        record.endpoint().ok_or_else(|| EndpointError::Task {
            what: "ADD",
            reason: "the ready record has no MACs".into(),
        })
    }

    /// DEL: makes the pod unreachable (its record `Deleting`, its routes
    /// gone) and answers; its veth, record and addresses go after the
    /// answer, under the attachment's lock. Success when there is nothing.
    pub async fn del(&self, attachment: Attachment) -> Result<(), EndpointError> {
        naming::validate(&attachment).map_err(EndpointError::InvalidAttachment)?;
        let whole = self.whole.clone().read_owned().await;
        let one = self.locks.lock(&attachment).await;
        let a = attachment.clone();
        let Some(mut record) = self.core.blocking(move |s| s.record(&a)).await? else {
            // No record: only leftovers named after the attachment, if any.
            self.core.teardown(&attachment).await?;
            tracing::debug!("no endpoint to delete");
            return Ok(());
        };
        if record.phase != Phase::Deleting {
            record.phase = Phase::Deleting;
            self.core.put(&record).await?;
        }
        let errors = datapath::unroute(&self.core.host, record.addresses.clone()).await;
        if !errors.is_empty() {
            return Err(EndpointError::Several(
                errors.into_iter().map(EndpointError::Datapath).collect(),
            ));
        }
        self.core.publish_count().await;
        tracing::info!("endpoint unplugged; deleting its veth");
        let pending = Pending::new(self.deleting.clone(), self.core.metrics.clone());
        let core = self.core.clone();
        tokio::spawn(
            async move {
                let _held = (whole, one, pending);
                core.finish_delete(&attachment).await;
            }
            .in_current_span(),
        );
        Ok(())
    }

    /// CHECK: the kernel against the record, in both namespaces.
    pub async fn check(
        &self,
        attachment: Attachment,
        netns: String,
    ) -> Result<Endpoint, EndpointError> {
        naming::validate(&attachment).map_err(EndpointError::InvalidAttachment)?;
        let _whole = self.whole.read().await;
        let _one = self.locks.lock(&attachment).await;
        let a = attachment.clone();
        let record = self
            .core
            .blocking(move |s| s.record(&a))
            .await?
            .ok_or_else(|| EndpointError::Unknown(attachment.clone()))?;
        match record.phase {
            Phase::Ready => {}
            Phase::Adding => {
                return Err(EndpointError::Mismatch(vec![
                    "the endpoint's ADD has not finished".into(),
                ]));
            }
            Phase::Deleting => {
                return Err(EndpointError::Mismatch(vec![
                    "the endpoint was deleted (DEL answered) and is not gone yet".into(),
                ]));
            }
        }
        if record.netns != netns {
            return Err(EndpointError::Mismatch(vec![format!(
                "the endpoint was added in {}, not in {netns}",
                record.netns
            )]));
        }
        let pod_ns = open_netns(&netns).await?;
        let pod = datapath::inspect_pod(&pod_ns, attachment.ifname.clone(), netns).await?;
        let host = datapath::inspect_host(&self.core.host, record.host_ifname.clone()).await?;
        let differences = check::differences(&record, &pod, &host);
        if !differences.is_empty() {
            return Err(EndpointError::Mismatch(differences));
        }
        record.endpoint().ok_or_else(|| EndpointError::Task {
            what: "CHECK",
            reason: "the ready record has no MACs".into(),
        })
    }

    /// STATUS ([`Response::Status`]): whether ADD can be served, and why
    /// not. A node whose reconcile did not converge may have left its pods
    /// with limited connectivity (the spec's 51); a node that has not
    /// reconciled yet, or has no block, simply cannot serve ADD (50).
    pub fn status(&self) -> Response {
        let (ready, limited, message) = match &*self.facts.borrow() {
            None => (
                false,
                false,
                "trellis-node has not reconciled this node yet".into(),
            ),
            Some(f) if f.blocks.is_empty() => (false, false, no_block_message()),
            Some(f) if !f.serves_pods() => (
                false,
                !f.ready,
                "the node's last reconcile did not converge; see its NetworkStatus \
                 (kubectl get networkstatus)"
                    .into(),
            ),
            Some(_) => (true, false, String::new()),
        };
        Response::Status {
            ready,
            limited,
            message,
        }
    }

    /// GC: releases every endpoint not in `valid`, then addresses and host
    /// veths no record owns; returns the endpoints released. Without a
    /// list (`None`) no recorded endpoint is released, only orphans. Either
    /// way, a DEL that could not finish after its answer (a record still
    /// `Deleting`) is finished.
    pub async fn gc(
        &self,
        valid: Option<Vec<Attachment>>,
    ) -> Result<Vec<Attachment>, EndpointError> {
        let _whole = self.whole.write().await;
        let valid: Option<BTreeSet<Attachment>> = valid.map(|v| v.into_iter().collect());
        let records: Vec<Record> = self
            .core
            .blocking(|s| s.records())
            .await?
            .into_iter()
            .filter(|r| {
                r.phase == Phase::Deleting
                    || valid.as_ref().is_some_and(|v| !v.contains(&r.attachment))
            })
            .collect();
        let mut released = Vec::new();
        let mut errors = Vec::new();
        for record in records {
            match self.core.teardown(&record.attachment).await {
                Ok(_) => released.push(record.attachment),
                Err(e) => errors.push(e),
            }
        }
        let orphans = self.collect_orphans().await;
        self.core.publish_count().await;
        tracing::info!(
            released = released.len(),
            addresses = orphans.addresses.len(),
            links = orphans.links.len(),
            "garbage collected"
        );
        errors.extend(orphans.errors.into_iter().map(EndpointError::Leftover));
        if errors.is_empty() {
            Ok(released)
        } else {
            Err(EndpointError::Several(errors))
        }
    }

    /// Rolls back every record still `Adding`, finishes every one
    /// `Deleting`, then removes orphans. Runs before any request is served
    /// (and takes the whole service).
    pub async fn recover(&self) -> Cleanup {
        let _whole = self.whole.write().await;
        let mut cleanup = Cleanup::default();
        match self.core.blocking(|s| s.records()).await {
            Ok(records) => {
                for record in records.into_iter().filter(|r| r.phase != Phase::Ready) {
                    match self.core.teardown(&record.attachment).await {
                        Ok(_) => cleanup.endpoints.push(record.attachment),
                        Err(e) => cleanup.errors.push(e.to_string()),
                    }
                }
            }
            Err(e) => cleanup.errors.push(e.to_string()),
        }
        let orphans = self.collect_orphans().await;
        cleanup.addresses = orphans.addresses;
        cleanup.links = orphans.links;
        cleanup.errors.extend(orphans.errors);
        cleanup
    }

    /// Tears down a failed ADD; the error to return.
    async fn roll_back(&self, attachment: &Attachment, cause: EndpointError) -> EndpointError {
        tracing::warn!(error = %cause, "ADD failed; rolling back");
        let rolled = self.core.teardown(attachment).await;
        self.core.publish_count().await;
        match rolled {
            Ok(_) => cause,
            Err(e) => EndpointError::RolledBack {
                cause: Box::new(cause),
                rollback: vec![e.to_string()],
            },
        }
    }

    /// Releases addresses no record owns and deletes host veths no record
    /// owns (and temporary peers). Only with the whole service held.
    async fn collect_orphans(&self) -> Cleanup {
        let mut cleanup = Cleanup::default();
        match self.core.blocking(|s| s.orphan_allocations()).await {
            Ok(orphans) => {
                for ip in orphans {
                    match self.core.blocking(move |s| s.release(ip)).await {
                        Ok(Ok(())) => cleanup.addresses.push(ip),
                        Ok(Err(e)) => cleanup.errors.push(e.to_string()),
                        Err(e) => cleanup.errors.push(e.to_string()),
                    }
                }
            }
            Err(e) => cleanup.errors.push(e.to_string()),
        }
        let links = match datapath::list_links(&self.core.host).await {
            Ok(links) => links,
            Err(e) => {
                cleanup.errors.push(e.to_string());
                return cleanup;
            }
        };
        for link in links {
            let name = link.clone();
            let owned = naming::is_host_veth(&link)
                && match self.core.blocking(move |s| s.owner_of_link(&name)).await {
                    Ok(owner) => owner.is_some(),
                    Err(e) => {
                        cleanup.errors.push(e.to_string());
                        true
                    }
                };
            if owned {
                continue;
            }
            match datapath::remove_link(&self.core.host, link.clone()).await {
                Ok(()) => cleanup.links.push(link),
                Err(e) => cleanup.errors.push(e.to_string()),
            }
        }
        cleanup
    }

    /// The facts ADD needs, or why it must wait.
    fn usable_facts(&self) -> Result<NodeFacts, EndpointError> {
        match &*self.facts.borrow() {
            None => Err(EndpointError::NotReady(
                "trellis-node has not reconciled this node's NodeNetwork yet; try again later"
                    .into(),
            )),
            Some(f) if f.blocks.is_empty() => Err(EndpointError::NotReady(no_block_message())),
            Some(f) if f.pod_mtu == 0 => Err(EndpointError::NotReady(
                "the pod MTU is not known yet (the node has not converged once); try again later"
                    .into(),
            )),
            Some(f) => Ok(f.clone()),
        }
    }
}

impl Core {
    /// Removes the attachment's endpoint: the datapath first, and only when
    /// that is all gone its record, then its addresses (an address released
    /// while a route to it remained could reach the wrong pod; a record
    /// whose address was released could, after a crash, delete the route of
    /// the next pod to get it). Returns whether it had a record.
    async fn teardown(&self, attachment: &Attachment) -> Result<bool, EndpointError> {
        let a = attachment.clone();
        let record = self.blocking(move |s| s.record(&a)).await?;
        let (host_ifname, addresses) = match &record {
            Some(r) => (r.host_ifname.clone(), r.addresses.clone()),
            None => (naming::host_ifname(attachment), Vec::new()),
        };
        // Without a record, the links named after the attachment are its
        // leftovers, unless another endpoint's record holds the name.
        let name = host_ifname.clone();
        let holder = self.blocking(move |s| s.owner_of_link(&name)).await?;
        let foreign = holder.is_some_and(|h| h != *attachment);
        if !foreign {
            // Out of the policy maps before the addresses can go to another
            // pod (the IP cache names them).
            if let Some(policy) = &self.policy {
                policy.release(&host_ifname).await?;
            }
            let errors = datapath::remove(&self.host, host_ifname, addresses).await;
            if !errors.is_empty() {
                return Err(EndpointError::Several(
                    errors.into_iter().map(EndpointError::Datapath).collect(),
                ));
            }
        }
        let a = attachment.clone();
        self.blocking(move |s| {
            s.remove(&a)?;
            s.release_owned_by(&a).map(drop)
        })
        .await??;
        Ok(record.is_some())
    }

    /// The rest of a DEL after its answer: the veth, then the record and
    /// the addresses. Tries [`DELETE_ATTEMPTS`] times, then leaves the
    /// record `Deleting` for GC or the next start.
    async fn finish_delete(&self, attachment: &Attachment) {
        let mut pause = Duration::from_millis(200);
        for attempt in 1..=DELETE_ATTEMPTS {
            match self.teardown(attachment).await {
                Ok(_) => {
                    tracing::info!("endpoint deleted");
                    return;
                }
                Err(e) if attempt < DELETE_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "deleting the endpoint failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 5;
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "could not delete the endpoint; its record stays Deleting until GC or \
                     the next start of trellis-node finishes it"
                ),
            }
        }
    }

    async fn put(&self, record: &Record) -> Result<(), EndpointError> {
        let record = record.clone();
        self.blocking(move |s| s.put(&record)).await??;
        Ok(())
    }

    async fn publish_count(&self) {
        if let Ok(n) = self.blocking(|s| s.ready_count()).await {
            self.metrics.set_endpoints(n);
            self.ready.send_if_modified(|old| {
                let changed = *old != n;
                *old = n;
                changed
            });
        }
    }

    /// Runs `f` on the store from a blocking thread (it does file I/O under
    /// a lock).
    async fn blocking<T, F>(&self, f: F) -> Result<T, EndpointError>
    where
        F: FnOnce(&Store) -> T + Send + 'static,
        T: Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| EndpointError::task("a state directory operation", &e))
    }
}

fn no_block_message() -> String {
    "this node has no pod address block yet (its NodeNetwork's spec.podCIDRs is empty): does an \
     IPPool select it and have free blocks? (kubectl get ippools)"
        .into()
}

/// A thread in a pod's namespace, stopped off the async threads when
/// dropped (stopping joins the thread).
struct PodNetns(Option<NetnsHandle>);

impl std::ops::Deref for PodNetns {
    type Target = NetnsHandle;
    fn deref(&self) -> &NetnsHandle {
        match &self.0 {
            Some(handle) => handle,
            // Set at construction, taken only by drop.
            None => unreachable!("a PodNetns is empty only while it is dropped"),
        }
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(move || drop(handle))),
                Err(_) => drop(handle),
            }
        }
    }
}

/// A thread in the pod's namespace, or code 3 naming the path.
async fn open_netns(path: &str) -> Result<PodNetns, EndpointError> {
    let p = PathBuf::from(path);
    let unusable = |reason: &str| EndpointError::Netns {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if !p.is_absolute() {
        return Err(unusable("not an absolute path"));
    }
    // A FIFO or a directory would block or fail the open in odd ways; a
    // namespace file (nsfs) is a regular file.
    match std::fs::metadata(&p) {
        Ok(m) if !m.is_file() => return Err(unusable("not a network namespace file")),
        Ok(_) => {}
        Err(e) => return Err(unusable(&e.to_string())),
    }
    let opened = tokio::task::spawn_blocking(move || NetnsHandle::new(Some(&p)))
        .await
        .map_err(|e| EndpointError::task("entering the pod's namespace", &e))?;
    opened
        .map(|h| PodNetns(Some(h)))
        .map_err(|e| EndpointError::netns(path, &e))
}

/// One DEL whose veth is not gone yet, counted while it lives.
struct Pending {
    count: Arc<watch::Sender<usize>>,
    metrics: Metrics,
}

impl Pending {
    fn new(count: Arc<watch::Sender<usize>>, metrics: Metrics) -> Pending {
        count.send_modify(|n| *n += 1);
        metrics.set_endpoints_deleting(*count.borrow());
        Pending { count, metrics }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.count.send_modify(|n| *n = n.saturating_sub(1));
        self.metrics.set_endpoints_deleting(*self.count.borrow());
    }
}

/// One lock per attachment, made on first use and dropped with its last
/// user.
#[derive(Debug, Default)]
struct AttachmentLocks(Mutex<HashMap<Attachment, Arc<tokio::sync::Mutex<()>>>>);

struct AttachmentGuard {
    locks: Arc<AttachmentLocks>,
    key: Attachment,
    guard: Option<OwnedMutexGuard<()>>,
}

impl AttachmentLocks {
    async fn lock(self: &Arc<Self>, a: &Attachment) -> AttachmentGuard {
        let lock = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(a.clone())
            .or_default()
            .clone();
        AttachmentGuard {
            locks: self.clone(),
            key: a.clone(),
            guard: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for AttachmentGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            map.remove(&self.key);
        }
    }
}

/// Times the steps of an ADD, each from the end of the one before.
struct PhaseClock<'a> {
    metrics: &'a Metrics,
    since: std::time::Instant,
}

impl<'a> PhaseClock<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        PhaseClock {
            metrics,
            since: std::time::Instant::now(),
        }
    }

    /// Records `phase` as ended now.
    fn done(&mut self, phase: AddPhase) {
        self.metrics.add_phase(phase, self.since.elapsed());
        self.skip();
    }

    /// Starts the next step now (the time since was recorded elsewhere).
    fn skip(&mut self) {
        self.since = std::time::Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn att(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    #[tokio::test]
    async fn one_attachment_at_a_time_others_in_parallel() {
        let locks = Arc::new(AttachmentLocks::default());
        let first = locks.lock(&att("a")).await;
        // Another attachment is not held up.
        let other = tokio::time::timeout(Duration::from_secs(1), locks.lock(&att("b"))).await;
        assert!(other.is_ok());
        drop(other);
        // The same one waits until the first is done.
        let same = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _g = locks.lock(&att("a")).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!same.is_finished());
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), same)
            .await
            .expect("ran after the first")
            .expect("no panic");
        assert!(
            locks.0.lock().expect("not poisoned").is_empty(),
            "locks go with their last user"
        );
    }
}
