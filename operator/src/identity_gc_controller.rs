//! The shell around [`crate::identity_gc`]: every interval, while leading,
//! plans from the caches of SecurityIdentities and NodeEndpoints (those of
//! [`PolicyStores`], shared with the policy status loop) and deletes what the
//! plan says, each with a UID and `resourceVersion` precondition.
//!
//! ```text
//!  PolicyStores { identities, endpoints } ─▶ identity_gc::plan(…, clocks, now, grace)
//!        every identity_gc::interval(grace), leader only      │ to delete
//!        ▼                                                    ▼
//!  clocks kept for the next pass                DELETE securityidentities/<id>
//!  (cleared when the lease is lost)             preconditions {uid, resourceVersion}
//! ```
//!
//! A timer rather than a reaction to every change: nothing is due sooner
//! than the grace period after the change that made it unreferenced, and
//! shard writes (every pod start) must not wake a pass each.

use std::time::{Duration, Instant};

use kube::Client;
use kube::api::{Api, DeleteParams, Preconditions};
use tokio::sync::watch;
use trellis_api::v1alpha1::{NodeEndpoints, SecurityIdentity};

use crate::apply::{WRITE_TIMEOUT, WriteError, WriteFailure};
use crate::identity_gc::{self, Collect, GcPlan, Unreferenced};
use crate::policy_controller::{PolicyStores, owned};

/// Settings of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcConfig {
    /// How long an identity must be named by no shard before it goes.
    pub grace: Duration,
    /// Time between passes ([`identity_gc::interval`] of the grace).
    pub interval: Duration,
}

impl GcConfig {
    /// The loop's settings for `grace`; `None` for a zero grace, which
    /// turns the collection off (`--identity-gc-grace-seconds 0`).
    pub fn new(grace: Duration) -> Option<Self> {
        (!grace.is_zero()).then(|| GcConfig {
            grace,
            interval: identity_gc::interval(grace),
        })
    }
}

/// What happened to one planned delete.
#[derive(Debug)]
pub enum Outcome {
    /// Deleted.
    Deleted,
    /// Already gone (404), or re-created or changed since the cache showed
    /// it (409, a failed precondition): left as it is.
    Skipped(u16),
    Failed(WriteError),
}

/// What one pass did.
#[derive(Debug)]
pub struct GcPass {
    pub plan: GcPlan,
    /// Each planned delete and how it went, in the plan's order.
    pub outcomes: Vec<(Collect, Outcome)>,
    pub took: Duration,
}

/// One pass: plan from the caches at `now`, then delete.
pub async fn collect_once(
    api: &Api<SecurityIdentity>,
    policy: &PolicyStores,
    previous: &Unreferenced,
    grace: Duration,
) -> GcPass {
    let started = Instant::now();
    let identities: Vec<SecurityIdentity> = owned(policy.identities.state());
    let shards: Vec<NodeEndpoints> = owned(policy.endpoints.state());
    let plan = identity_gc::plan(&identities, &shards, previous, started, grace);
    let mut outcomes = Vec::with_capacity(plan.delete.len());
    for c in &plan.delete {
        let outcome = delete(api, c).await;
        outcomes.push((c.clone(), outcome));
    }
    GcPass {
        plan,
        outcomes,
        took: started.elapsed(),
    }
}

async fn delete(api: &Api<SecurityIdentity>, c: &Collect) -> Outcome {
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(c.uid.clone()),
            resource_version: Some(c.resource_version.clone()),
        }),
        ..DeleteParams::default()
    };
    match tokio::time::timeout(WRITE_TIMEOUT, api.delete(&c.name(), &params)).await {
        Ok(Ok(_)) => Outcome::Deleted,
        Ok(Err(kube::Error::Api(s))) if s.code == 404 || s.code == 409 => Outcome::Skipped(s.code),
        Ok(Err(e)) => Outcome::Failed(WriteError {
            what: format!("delete SecurityIdentity {}", c.id),
            source: WriteFailure::Kube(e),
        }),
        Err(_) => Outcome::Failed(WriteError {
            what: format!("delete SecurityIdentity {}", c.id),
            source: WriteFailure::Timeout(WRITE_TIMEOUT),
        }),
    }
}

/// Runs a pass every `cfg.interval` while `leading` is true, until
/// `shutdown`, starting once the caches hold their initial lists (an empty
/// shard cache would make every identity look unused). The clocks live
/// only while this replica leads: a new leader starts them afresh.
pub async fn run(
    client: Client,
    policy: PolicyStores,
    mut leading: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    cfg: GcConfig,
    mut on_pass: impl FnMut(&GcPass),
) {
    tokio::select! {
        res = policy.ready() => if res.is_err() { return },
        _ = shutdown.wait_for(|s| *s) => return,
    }
    let api: Api<SecurityIdentity> = Api::all(client);
    let mut clocks = Unreferenced::default();
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(cfg.interval) => {}
                res = leading.changed() => if res.is_err() { return },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
        first = false;
        if !*leading.borrow_and_update() {
            clocks = Unreferenced::default();
            continue;
        }
        let pass = tokio::select! {
            pass = collect_once(&api, &policy, &clocks, cfg.grace) => pass,
            _ = leading.wait_for(|l| !*l) => {
                tracing::warn!("lost leadership during an identity collection pass; stopped deleting");
                clocks = Unreferenced::default();
                continue;
            }
            _ = shutdown.wait_for(|s| *s) => return,
        };
        clocks = pass.plan.unreferenced.clone();
        on_pass(&pass);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_grace_turns_the_collection_off() {
        assert_eq!(GcConfig::new(Duration::ZERO), None);
        assert_eq!(
            GcConfig::new(Duration::from_secs(600)),
            Some(GcConfig {
                grace: Duration::from_secs(600),
                interval: Duration::from_secs(60),
            })
        );
    }
}
