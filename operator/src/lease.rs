//! Leader election on a `coordination.k8s.io/v1` `Lease`, with client-go's semantics
//! (`k8s.io/client-go/tools/leaderelection`), so that exactly one operator replica runs the
//! controllers.
//!
//! ```text
//! every retry_period (+ up to 10% jitter): GET the lease, then
//!   absent                         → create                        (AlreadyExists: lost the race)
//!   free, or expired by our clock  → acquire: update, read rv as precondition  (Conflict: lost)
//!   held by us                     → renew:   update, read rv as precondition  (Conflict: lost)
//!   held by another, not expired   → wait
//! written ─▶ leading = true, until
//!   no renewal succeeded for renew_deadline ─▶ leading = false, Err(Lost)
//!   shutdown ─▶ leading = false, then release (no holder, leaseDurationSeconds 1): the next
//!               candidate takes over at its next retry instead of after lease_duration
//! ```
//!
//! Why not a crate: kube-lease-manager 0.13, the only one that works with kube 5, never steps
//! down when renewals keep failing, writes without a `resourceVersion` precondition, and
//! judges expiry by comparing the lease's `renewTime` with the local wall clock. Like
//! client-go, this module instead
//! - writes only with the `resourceVersion` it read, so of two racing candidates one gets
//!   409 Conflict (or AlreadyExists on create) and stays a follower;
//! - times expiry on the local monotonic clock: a follower notes when it first saw the
//!   record (holder, `renewTime`, `resourceVersion`) change and treats the lease as held until
//!   that instant plus `leaseDurationSeconds`. The timestamps in the lease are written for
//!   people and never compared with our clock, so clock skew between nodes does no harm;
//! - has the leader give up once no renewal has succeeded for `renew_deadline`, which is
//!   shorter than `lease_duration`, so it stops before any follower can think the lease
//!   expired. Measured from the *start* of the last successful renewal, which is no later
//!   than the moment the write landed and any follower could see it;
//! - releases the lease on graceful shutdown (client-go's `ReleaseOnCancel`).
//!
//! It differs from client-go in two ways, both towards fewer leaders: every attempt reads the
//! lease first (no optimistic update on the cached object), and a leader that finds another
//! holder written in steps down at once instead of retrying until its renew deadline.
//!
//! A program that loses leadership should exit (as client-go programs do, with `klog.Fatal` in
//! `OnStoppedLeading`) and let Kubernetes restart it, rather than trust in-memory state that
//! another leader may have invalidated.
//!
//! RBAC: a Role in the lease's namespace allowing
//! `{apiGroups: ["coordination.k8s.io"], resources: ["leases"], verbs: ["get", "create", "update"]}`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, api::PostParams};
use tokio::{
    sync::watch,
    time::{Instant, sleep_until, timeout, timeout_at},
};
use tracing::{Instrument, debug, info, info_span, warn};

/// How an [`Elector`] takes part in the election for one lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Namespace of the `Lease`.
    pub namespace: String,
    /// Name of the `Lease`.
    pub name: String,
    /// Who we are in `holderIdentity`: unique per replica, e.g. the pod name.
    pub identity: String,
    /// How long followers wait, from the last change they saw, before taking the lease over.
    /// Written as `leaseDurationSeconds`, rounded up to whole seconds.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal. Shorter than
    /// `lease_duration`; the difference is the safety margin, e.g. for clocks that run at
    /// different rates.
    pub renew_deadline: Duration,
    /// Time between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// Lease 10 s, renew deadline 7 s, retry 2 s (controller-runtime uses 15 / 10 / 2), so a
    /// crashed leader is replaced within about 12 s.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        LeaseConfig {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(7),
            retry_period: Duration::from_secs(2),
        }
    }

    /// `namespace/name`, as the lease appears in logs and errors.
    pub fn lease(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Check what the election's safety rests on: a non-empty identity (an empty holder means
    /// "free") and `lease_duration > renew_deadline > retry_period + jitter > 0`.
    pub fn validate(&self) -> Result<(), LeaseError> {
        let reason = if self.namespace.is_empty() || self.name.is_empty() {
            "namespace and name must not be empty".to_owned()
        } else if self.identity.is_empty() {
            "identity must not be empty: an empty holderIdentity marks the lease free".to_owned()
        } else if self.retry_period.is_zero() {
            "retry_period must be positive".to_owned()
        } else if self.renew_deadline <= jittered(self.retry_period, MAX_JITTER_SEED) {
            format!(
                "renew_deadline ({:?}) must exceed retry_period ({:?}) plus 10% jitter, or a \
                 single failed renewal ends leadership",
                self.renew_deadline, self.retry_period
            )
        } else if self.lease_duration <= self.renew_deadline {
            format!(
                "lease_duration ({:?}) must exceed renew_deadline ({:?}), or followers may take \
                 over while the leader still leads",
                self.lease_duration, self.renew_deadline
            )
        } else {
            return Ok(());
        };
        Err(LeaseError::Config {
            lease: self.lease(),
            reason,
        })
    }
}

/// Why an election attempt failed or leadership ended.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The [`LeaseConfig`] cannot give a safe election.
    #[error("invalid leader election settings for lease {lease}: {reason}")]
    Config { lease: String, reason: String },

    /// Reading the lease failed.
    #[error("cannot get lease {lease}: {source}{}", hint(source))]
    Get {
        lease: String,
        #[source]
        source: kube::Error,
    },

    /// Creating the absent lease failed (other than losing the race to create it).
    #[error("cannot create lease {lease}: {source}{}", hint(source))]
    Create {
        lease: String,
        #[source]
        source: kube::Error,
    },

    /// Writing ourselves in as holder failed (other than losing a race to another writer).
    #[error("cannot acquire or renew lease {lease}: {source}{}", hint(source))]
    Update {
        lease: String,
        #[source]
        source: kube::Error,
    },

    /// Handing the lease back on shutdown failed; it then expires after its duration.
    #[error("cannot release lease {lease}: {source}{}", hint(source))]
    Release {
        lease: String,
        #[source]
        source: kube::Error,
    },

    /// The API server did not answer in time.
    #[error("{op} of lease {lease} got no answer within {after:?}")]
    Timeout {
        lease: String,
        op: &'static str,
        after: Duration,
    },

    /// We led, and no renewal succeeded within the renew deadline; `since` is how long ago
    /// the last successful one started.
    #[error("lost lease {lease}: no renewal succeeded for {since:?}, past the renew deadline")]
    Lost { lease: String, since: Duration },

    /// We led, and found another holder written into the lease.
    #[error("lost lease {lease}: it names {holder} as holder while we held it")]
    Taken { lease: String, holder: String },
}

/// What the API error most likely means for a lease, for the operator's logs.
fn hint(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) if s.is_forbidden() => {
            " (RBAC: allow get, create and update on leases.coordination.k8s.io in the \
             lease's namespace)"
        }
        kube::Error::Api(s) if s.is_not_found() => {
            " (no such namespace, or the lease was just deleted)"
        }
        kube::Error::Api(s) if s.is_conflict() => {
            " (the lease changed since we read it, so it is no longer ours to write)"
        }
        _ => "",
    }
}

/// Campaigns for one lease and leads while holding it. See the module docs.
pub struct Elector {
    client: kube::Client,
    cfg: LeaseConfig,
    lease: String,
    /// The lease as we last read or wrote it: what a write builds on, with its
    /// `resourceVersion` as precondition.
    current: Option<Lease>,
    /// Its election record and when that was first seen, by our clock.
    observed: Option<Observed>,
    /// Start of the attempt that last acquired or renewed the lease; `Some` exactly while we
    /// lead.
    renewed_at: Option<Instant>,
}

/// What one acquire-or-renew attempt found.
#[derive(Debug)]
enum Outcome {
    /// We hold the lease now.
    Holding,
    /// Another holder's lease has not expired by our clock.
    Held {
        holder: String,
        expires_in: Duration,
    },
    /// Another holder is written in although we led.
    Deposed { holder: String },
    /// Another writer came between our read and our write.
    Raced,
}

impl Elector {
    /// An elector for the lease `cfg` names; nothing is read or written until [`Elector::run`].
    pub fn new(client: kube::Client, cfg: LeaseConfig) -> Self {
        Elector {
            client,
            lease: cfg.lease(),
            cfg,
            current: None,
            observed: None,
            renewed_at: None,
        }
    }

    /// Runs until `shutdown` fires (becomes `true`, or its sender is dropped). Publishes
    /// leadership on `leading`: `true` exactly while we hold the lease, changed only on a
    /// transition.
    ///
    /// On shutdown, if leading: first sets `leading` to `false`, then releases the lease (no
    /// holder, `leaseDurationSeconds` 1, `renewTime` now, with our `resourceVersion` as
    /// precondition) so another replica takes over at once, and returns `Ok` even if that
    /// fails (logged; the lease then expires as after a crash).
    ///
    /// If leading and no renewal succeeds within `renew_deadline`: sets `leading` to `false`
    /// and returns [`LeaseError::Lost`] ([`LeaseError::Taken`] if another holder shows up).
    /// The program should then exit and be restarted. Returns [`LeaseError::Config`] at once
    /// if [`LeaseConfig::validate`] fails. Other errors are logged and retried.
    pub async fn run(
        self,
        leading: watch::Sender<bool>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), LeaseError> {
        let span = info_span!("lease", lease = %self.lease, identity = %self.cfg.identity);
        self.campaign(leading, shutdown).instrument(span).await
    }

    async fn campaign(
        mut self,
        leading: watch::Sender<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), LeaseError> {
        self.cfg.validate()?;
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.cfg.namespace);
        publish(&leading, false);
        loop {
            if is_stopped(&shutdown) {
                self.finish(&api, &leading).await;
                return Ok(());
            }
            if let Some(renewed_at) = self.renewed_at {
                let since = renewed_at.elapsed();
                if since >= self.cfg.renew_deadline {
                    self.renewed_at = None;
                    publish(&leading, false);
                    info!(
                        since_renewal = ?since,
                        renew_deadline = ?self.cfg.renew_deadline,
                        "lost leadership: no renewal succeeded within the renew deadline"
                    );
                    return Err(LeaseError::Lost {
                        lease: self.lease.clone(),
                        since,
                    });
                }
            }

            let started = Instant::now();
            // A leader's attempt may not outlive its renew deadline: a hung request must not
            // keep it leading.
            let deadline = self.renewed_at.unwrap_or(started) + self.cfg.renew_deadline;
            let outcome = {
                let attempt = timeout_at(deadline, self.try_acquire_or_renew(&api));
                tokio::pin!(attempt);
                tokio::select! {
                    biased;
                    () = stopped(&mut shutdown) => {
                        // Step down before the write in flight lands; `finish` releases the
                        // lease if that write turns out to have made it ours.
                        if publish(&leading, false) {
                            info!("stepping down: shutting down");
                        }
                        attempt.await
                    }
                    outcome = &mut attempt => outcome,
                }
            };
            let stopping = is_stopped(&shutdown);
            match outcome {
                Ok(Ok(Outcome::Holding)) => {
                    self.renewed_at = Some(started);
                    if !stopping && publish(&leading, true) {
                        info!("became leader");
                    }
                }
                Ok(Ok(Outcome::Held { holder, expires_in })) => {
                    debug!(%holder, ?expires_in, "lease held by another replica");
                }
                Ok(Ok(Outcome::Raced)) => {
                    debug!("another replica wrote the lease between our read and our write");
                }
                Ok(Ok(Outcome::Deposed { holder })) => {
                    self.renewed_at = None;
                    publish(&leading, false);
                    info!(%holder, "lost leadership: another replica holds the lease");
                    return Err(LeaseError::Taken {
                        lease: self.lease.clone(),
                        holder,
                    });
                }
                Ok(Err(e)) => self.log_failure(&e),
                Err(_elapsed) => self.log_failure(&LeaseError::Timeout {
                    lease: self.lease.clone(),
                    op: "acquire or renew",
                    after: deadline.saturating_duration_since(started),
                }),
            }
            if stopping {
                continue;
            }

            let mut wake = Instant::now() + jittered(self.cfg.retry_period, jitter_seed());
            if let Some(renewed_at) = self.renewed_at {
                wake = wake.min(renewed_at + self.cfg.renew_deadline);
            }
            tokio::select! {
                biased;
                () = stopped(&mut shutdown) => {}
                () = sleep_until(wake) => {}
            }
        }
    }

    fn log_failure(&self, e: &LeaseError) {
        match self.renewed_at {
            Some(renewed_at) => warn!(
                error = %e,
                since_renewal = ?renewed_at.elapsed(),
                renew_deadline = ?self.cfg.renew_deadline,
                "cannot renew lease; still leading until the renew deadline"
            ),
            None => warn!(error = %e, "cannot acquire lease"),
        }
    }

    /// One GET and, if the decision is to hold the lease, one create or update.
    async fn try_acquire_or_renew(&mut self, api: &Api<Lease>) -> Result<Outcome, LeaseError> {
        let leading = self.renewed_at.is_some();
        let seconds = lease_seconds(self.cfg.lease_duration);
        let read = api
            .get_opt(&self.cfg.name)
            .await
            .map_err(|source| LeaseError::Get {
                lease: self.lease.clone(),
                source,
            })?;

        let Some(read) = read else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(claim(
                    None,
                    Claim::Acquire,
                    &self.cfg.identity,
                    seconds,
                    Timestamp::now(),
                )),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.remember(created);
                    Ok(Outcome::Holding)
                }
                Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(Outcome::Raced),
                Err(source) => Err(LeaseError::Create {
                    lease: self.lease.clone(),
                    source,
                }),
            };
        };

        let mut next = read.clone();
        let observed = self.remember(read);
        let now = Instant::now();
        let how = match decide(
            &observed,
            &self.cfg.identity,
            leading,
            self.cfg.lease_duration,
            now,
        ) {
            Decision::Wait { holder, expires } => {
                return Ok(Outcome::Held {
                    holder,
                    expires_in: expires.saturating_duration_since(now),
                });
            }
            Decision::Deposed { holder } => return Ok(Outcome::Deposed { holder }),
            Decision::Claim(how) => how,
        };
        next.spec = Some(claim(
            next.spec.as_ref(),
            how,
            &self.cfg.identity,
            seconds,
            Timestamp::now(),
        ));
        match api
            .replace(&self.cfg.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                self.remember(written);
                Ok(Outcome::Holding)
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(Outcome::Raced),
            Err(source) => Err(LeaseError::Update {
                lease: self.lease.clone(),
                source,
            }),
        }
    }

    /// Keep `lease` as the base of the next write and note when its record changed.
    fn remember(&mut self, lease: Lease) -> Observed {
        let observed = observe(self.observed.as_ref(), Record::of(&lease), Instant::now());
        self.observed = Some(observed.clone());
        self.current = Some(lease);
        observed
    }

    /// On shutdown: step down, then hand the lease back if it is ours.
    async fn finish(&mut self, api: &Api<Lease>, leading: &watch::Sender<bool>) {
        if publish(leading, false) {
            info!("stepping down: shutting down");
        }
        self.renewed_at = None;
        let ours = self
            .observed
            .as_ref()
            .is_some_and(|o| o.record.holder.as_deref() == Some(self.cfg.identity.as_str()));
        if !ours {
            return;
        }
        let after = self.cfg.renew_deadline;
        match timeout(after, self.release(api)).await {
            Ok(Ok(())) => info!("released lease"),
            Ok(Err(e)) => warn!(error = %e, "lease not released; it expires after its duration"),
            Err(_elapsed) => {
                let e = LeaseError::Timeout {
                    lease: self.lease.clone(),
                    op: "release",
                    after,
                };
                warn!(error = %e, "lease not released; it expires after its duration");
            }
        }
    }

    async fn release(&mut self, api: &Api<Lease>) -> Result<(), LeaseError> {
        let Some(mut lease) = self.current.clone() else {
            return Ok(());
        };
        lease.spec = Some(released(lease.spec.as_ref(), Timestamp::now()));
        let written = api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
            .map_err(|source| LeaseError::Release {
                lease: self.lease.clone(),
                source,
            })?;
        self.remember(written);
        Ok(())
    }
}

/// Set `leading` to `value`; whether that changed it.
fn publish(leading: &watch::Sender<bool>, value: bool) -> bool {
    leading.send_if_modified(|v| {
        let changed = *v != value;
        *v = value;
        changed
    })
}

/// Whether shutdown has fired: `true` was sent, or the sender is gone and nobody can send it.
fn is_stopped(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

/// Completes once shutdown fires (see [`is_stopped`]).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // Err: the sender is gone, which counts as shutdown too.
    let _ = shutdown.wait_for(|&stop| stop).await;
}

// ---- The decision, pure: values in, values out; no client, no clock. ----

/// The parts of a lease the election reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Record {
    /// `None` for an absent or empty `holderIdentity`: the lease is free.
    holder: Option<String>,
    /// `leaseDurationSeconds`, when set and positive.
    duration: Option<Duration>,
    renew_time: Option<MicroTime>,
    resource_version: Option<String>,
}

impl Record {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Record {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            duration: spec
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .filter(|&s| s > 0)
                .map(Duration::from_secs),
            renew_time: spec.and_then(|s| s.renew_time.clone()),
            resource_version: lease.metadata.resource_version.clone(),
        }
    }
}

/// A record and when we first saw it in this form.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    record: Record,
    since: Instant,
}

/// The observation after reading `record` at `now`: the expiry clock restarts only when the
/// holder, `renewTime` or `resourceVersion` changed, i.e. when someone wrote the lease.
fn observe(last: Option<&Observed>, record: Record, now: Instant) -> Observed {
    let since = match last {
        Some(last)
            if last.record.holder == record.holder
                && last.record.renew_time == record.renew_time
                && last.record.resource_version == record.resource_version =>
        {
            last.since
        }
        _ => now,
    };
    Observed { record, since }
}

/// How to write ourselves into the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Someone else (or no one) held it: a new term.
    Acquire,
    /// We hold it: extend the term.
    Renew,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    /// Another holder's lease runs until `expires` by our clock.
    Wait { holder: String, expires: Instant },
    /// We lead, yet another holder is written in.
    Deposed { holder: String },
    /// Write ourselves in.
    Claim(Claim),
}

/// client-go's `tryAcquireOrRenew` decision. A lease held by another is taken over only once
/// its duration (the record's, else ours) has passed since we first saw its record as it is
/// now; a free lease is taken at once.
fn decide(
    observed: &Observed,
    identity: &str,
    leading: bool,
    default_duration: Duration,
    now: Instant,
) -> Decision {
    let record = &observed.record;
    match &record.holder {
        Some(holder) if holder == identity => Decision::Claim(Claim::Renew),
        Some(holder) if leading => Decision::Deposed {
            holder: holder.clone(),
        },
        Some(holder) => {
            let expires = observed.since + record.duration.unwrap_or(default_duration);
            if expires > now {
                Decision::Wait {
                    holder: holder.clone(),
                    expires,
                }
            } else {
                Decision::Claim(Claim::Acquire)
            }
        }
        None => Decision::Claim(Claim::Acquire),
    }
}

/// The spec that makes `identity` the holder, built on the current one (`None`: the lease is
/// being created), keeping fields the election does not own.
fn claim(
    current: Option<&LeaseSpec>,
    how: Claim,
    identity: &str,
    seconds: i32,
    now: Timestamp,
) -> LeaseSpec {
    let now = MicroTime(now);
    let mut spec = current.cloned().unwrap_or_default();
    match (current, how) {
        (None, _) => {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(0);
        }
        (Some(_), Claim::Acquire) => {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        (Some(_), Claim::Renew) => {}
    }
    spec.holder_identity = Some(identity.to_owned());
    spec.lease_duration_seconds = Some(seconds);
    spec.renew_time = Some(now);
    spec
}

/// The spec that hands the lease back: no holder, and a 1 s duration so that followers
/// still waiting on the old record stop waiting soon (client-go's `release`).
fn released(current: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let now = MicroTime(now);
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        acquire_time: Some(now.clone()),
        renew_time: Some(now),
        ..current.cloned().unwrap_or_default()
    }
}

/// `leaseDurationSeconds` for `duration`: rounded up, so followers never wait less than we
/// assume, and at least 1 (the API server rejects 0).
fn lease_seconds(duration: Duration) -> i32 {
    let secs = duration.as_nanos().div_ceil(1_000_000_000).max(1);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

/// A seed for [`jittered`] whose largest value gives the largest jitter.
const MAX_JITTER_SEED: u32 = 999;

/// `period` plus up to 10% of it, by `seed`, so replicas started together spread out.
fn jittered(period: Duration, seed: u32) -> Duration {
    period + period.saturating_mul(seed % 1000) / 10_000
}

/// Cheap randomness for the jitter: the sub-second part of the wall clock.
fn jitter_seed() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "a";
    const DURATION: Duration = Duration::from_secs(10);

    fn mk_record(holder: Option<&str>, rv: &str) -> Record {
        Record {
            holder: holder.map(str::to_owned),
            duration: Some(DURATION),
            renew_time: None,
            resource_version: Some(rv.to_owned()),
        }
    }

    fn mk_observed(holder: Option<&str>, duration: Option<u64>, since: Instant) -> Observed {
        Observed {
            record: Record {
                duration: duration.map(Duration::from_secs),
                ..mk_record(holder, "1")
            },
            since,
        }
    }

    fn mk_lease(spec: LeaseSpec, rv: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
        }
    }

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).expect("valid timestamp")
    }

    /// One row of the decision table: the lease names `holder` with `duration` (seconds),
    /// first seen at t0; we decide `after` t0.
    struct Case {
        name: &'static str,
        holder: Option<&'static str>,
        duration: Option<u64>,
        leading: bool,
        after: u64,
        want: Decision,
    }

    #[test]
    fn decide_table() {
        let t0 = Instant::now();
        let wait = |secs| Decision::Wait {
            holder: "b".into(),
            expires: t0 + Duration::from_secs(secs),
        };
        let cases = [
            Case {
                name: "a free lease is taken at once",
                holder: None,
                duration: Some(10),
                leading: false,
                after: 0,
                want: Decision::Claim(Claim::Acquire),
            },
            Case {
                name: "ours is renewed",
                holder: Some(ME),
                duration: Some(10),
                leading: false,
                after: 0,
                want: Decision::Claim(Claim::Renew),
            },
            Case {
                name: "ours is renewed while leading, whatever the time",
                holder: Some(ME),
                duration: Some(10),
                leading: true,
                after: 100,
                want: Decision::Claim(Claim::Renew),
            },
            Case {
                name: "another's fresh lease is waited for",
                holder: Some("b"),
                duration: Some(10),
                leading: false,
                after: 9,
                want: wait(10),
            },
            Case {
                name: "another's lease expires by our clock",
                holder: Some("b"),
                duration: Some(10),
                leading: false,
                after: 10,
                want: Decision::Claim(Claim::Acquire),
            },
            Case {
                name: "the record's duration wins over ours",
                holder: Some("b"),
                duration: Some(3),
                leading: false,
                after: 3,
                want: Decision::Claim(Claim::Acquire),
            },
            Case {
                name: "ours applies when the record has none",
                holder: Some("b"),
                duration: None,
                leading: false,
                after: 9,
                want: wait(DURATION.as_secs()),
            },
            Case {
                name: "another holder while we lead deposes us",
                holder: Some("b"),
                duration: Some(10),
                leading: true,
                after: 0,
                want: Decision::Deposed { holder: "b".into() },
            },
        ];
        for c in cases {
            let observed = mk_observed(c.holder, c.duration, t0);
            let now = t0 + Duration::from_secs(c.after);
            assert_eq!(
                decide(&observed, ME, c.leading, DURATION, now),
                c.want,
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn expiry_clock_restarts_only_when_the_record_changes() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(5);
        let first = observe(None, mk_record(Some("b"), "1"), t0);
        assert_eq!(first.since, t0);
        let same = observe(Some(&first), mk_record(Some("b"), "1"), t1);
        assert_eq!(same.since, t0, "an unchanged record keeps its clock");
        let renewed = observe(Some(&first), mk_record(Some("b"), "2"), t1);
        assert_eq!(renewed.since, t1, "a new resourceVersion restarts it");
        let handed = observe(Some(&first), mk_record(Some("c"), "1"), t1);
        assert_eq!(handed.since, t1, "a new holder restarts it");
        let retimed = Record {
            renew_time: Some(MicroTime(ts(1))),
            ..mk_record(Some("b"), "1")
        };
        // The lease's own timestamps say nothing about expiry: a renewTime in 1970 (a
        // skewed clock, or one that stopped) still counts as fresh when first seen.
        let stale = observe(Some(&first), retimed, t1);
        assert_eq!(stale.since, t1);
        let d = decide(&stale, ME, false, DURATION, t1 + Duration::from_secs(9));
        assert!(matches!(d, Decision::Wait { .. }), "{d:?}");
    }

    #[test]
    fn record_reads_empty_holder_and_bad_durations_as_absent() {
        let lease = mk_lease(
            LeaseSpec {
                holder_identity: Some(String::new()),
                lease_duration_seconds: Some(0),
                ..LeaseSpec::default()
            },
            "3",
        );
        let record = Record::of(&lease);
        assert_eq!(record.holder, None);
        assert_eq!(record.duration, None);
        assert_eq!(record.resource_version.as_deref(), Some("3"));
        assert_eq!(Record::of(&Lease::default()), Record::default());
    }

    #[test]
    fn claims_count_transitions_and_keep_foreign_fields() {
        let created = claim(None, Claim::Acquire, ME, 10, ts(100));
        assert_eq!(created.holder_identity.as_deref(), Some(ME));
        assert_eq!(created.lease_duration_seconds, Some(10));
        assert_eq!(created.acquire_time, Some(MicroTime(ts(100))));
        assert_eq!(created.renew_time, Some(MicroTime(ts(100))));
        assert_eq!(created.lease_transitions, Some(0));

        let theirs = LeaseSpec {
            holder_identity: Some("b".into()),
            lease_duration_seconds: Some(15),
            acquire_time: Some(MicroTime(ts(1))),
            renew_time: Some(MicroTime(ts(2))),
            lease_transitions: Some(4),
            strategy: Some("OldestEmulationVersion".into()),
            ..LeaseSpec::default()
        };
        let taken = claim(Some(&theirs), Claim::Acquire, ME, 10, ts(100));
        assert_eq!(taken.holder_identity.as_deref(), Some(ME));
        assert_eq!(taken.lease_duration_seconds, Some(10));
        assert_eq!(taken.acquire_time, Some(MicroTime(ts(100))));
        assert_eq!(taken.lease_transitions, Some(5));
        assert_eq!(taken.strategy, theirs.strategy);

        let renewed = claim(Some(&taken), Claim::Renew, ME, 10, ts(102));
        assert_eq!(renewed.acquire_time, Some(MicroTime(ts(100))));
        assert_eq!(renewed.renew_time, Some(MicroTime(ts(102))));
        assert_eq!(renewed.lease_transitions, Some(5));

        let given_back = released(Some(&renewed), ts(110));
        assert_eq!(given_back.holder_identity, None);
        assert_eq!(given_back.lease_duration_seconds, Some(1));
        assert_eq!(given_back.renew_time, Some(MicroTime(ts(110))));
        assert_eq!(given_back.lease_transitions, Some(5));
        // A released lease is free: the next candidate takes it at once, as a new term.
        let record = Record::of(&mk_lease(given_back.clone(), "9"));
        let observed = observe(None, record, Instant::now());
        assert_eq!(
            decide(&observed, "b", false, DURATION, observed.since),
            Decision::Claim(Claim::Acquire)
        );
        let next = claim(Some(&given_back), Claim::Acquire, "b", 10, ts(111));
        assert_eq!(next.lease_transitions, Some(6));
    }

    #[test]
    fn lease_seconds_round_up() {
        let ms = Duration::from_millis;
        assert_eq!(lease_seconds(ms(0)), 1);
        assert_eq!(lease_seconds(ms(300)), 1);
        assert_eq!(lease_seconds(ms(2000)), 2);
        assert_eq!(lease_seconds(ms(2001)), 3);
        assert_eq!(lease_seconds(Duration::MAX), i32::MAX);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let p = Duration::from_secs(2);
        assert_eq!(jittered(p, 0), p);
        assert_eq!(jittered(p, 1000), p);
        assert_eq!(jittered(p, 500), Duration::from_millis(2100));
        assert_eq!(
            jittered(p, MAX_JITTER_SEED),
            Duration::from_micros(2_199_800)
        );
        for seed in [1, 77, 999, 123_456_789, u32::MAX] {
            let j = jittered(p, seed);
            assert!(j >= p && j < p + p / 10, "{seed}: {j:?}");
        }
    }

    #[test]
    fn config_validation() {
        let ok = LeaseConfig::new("ns", "l", ME);
        assert_eq!(ok.lease(), "ns/l");
        ok.validate().expect("defaults are valid");
        let ms = Duration::from_millis;
        let bad = [
            LeaseConfig {
                identity: String::new(),
                ..ok.clone()
            },
            LeaseConfig {
                name: String::new(),
                ..ok.clone()
            },
            LeaseConfig {
                renew_deadline: ok.lease_duration,
                ..ok.clone()
            },
            LeaseConfig {
                retry_period: ms(0),
                ..ok.clone()
            },
            LeaseConfig {
                renew_deadline: ms(2100),
                ..ok.clone()
            },
        ];
        for cfg in bad {
            let err = cfg.validate().expect_err("invalid");
            assert!(matches!(err, LeaseError::Config { .. }), "{cfg:?}: {err}");
        }
        LeaseConfig {
            lease_duration: ms(2000),
            renew_deadline: ms(1400),
            retry_period: ms(400),
            ..ok
        }
        .validate()
        .expect("the short test settings are valid");
    }
}
