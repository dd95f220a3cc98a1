//! Which `SecurityIdentity` objects to delete (design 0005): those that no
//! `NodeEndpoints` shard has named for a grace period. Pure (values in,
//! values out; the clock is an argument), so every rule is a unit test; the
//! loop that reads the caches and deletes is [`crate::identity_gc_controller`].
//!
//! ```text
//!  NodeEndpoints shards ─▶ ids some pod has ──────────┐
//!  SecurityIdentities ───▶ pod identities (by name) ──┼─ plan(…, previous, now, grace)
//!  Unreferenced (previous pass) ──────────────────────┘        │
//!        ▼                                                      ▼
//!  Unreferenced (this pass: id → uid, first seen unreferenced)  to delete: unreferenced for ≥ grace
//! ```
//!
//! The clock of an identity starts when *this process* first sees it named
//! by no shard, and restarts when a shard names it again or when the object
//! is replaced (another UID). A restarted operator, or a replica that has
//! just become the leader, starts every clock afresh: it collects later than
//! it might have, never earlier.
//!
//! Why a grace period at all: a node creates an identity before its shard
//! names it (the shard is written at most once a second), a node reuses an
//! existing identity for a new pod without writing the identity, and the
//! operator's caches of the two kinds are not one snapshot. Ten minutes
//! covers all of that by orders of magnitude. Should an identity still go
//! while a pod is using it (a pod started with an old label set in the very
//! second of the deletion), the pod's node re-creates it, under the same
//! number, at its next sync (the deletion itself wakes it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use trellis_api::v1alpha1::{NodeEndpoints, SecurityIdentity};
use trellis_policy::identity::SecurityLabels;
use trellis_policy::objects::identity_of;

/// The grace period of design 0005.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);

/// Identities named by no shard as of the last pass: id → since when, for
/// the object of which UID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unreferenced(BTreeMap<u32, Since>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Since {
    uid: String,
    since: Instant,
}

impl Unreferenced {
    /// How many identities are tracked.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Since when identity `id` has been seen unreferenced, if it is.
    pub fn since(&self, id: u32) -> Option<Instant> {
        self.0.get(&id).map(|s| s.since)
    }
}

/// One identity to delete, with the preconditions of the delete: the
/// object of this UID at this `resourceVersion`, so that one re-created or
/// changed since the caches showed it stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collect {
    pub id: u32,
    pub uid: String,
    pub resource_version: String,
    /// For the log.
    pub labels: SecurityLabels,
    /// How long it has been seen unreferenced.
    pub unreferenced_for: Duration,
}

impl Collect {
    /// The object's name.
    pub fn name(&self) -> String {
        self.id.to_string()
    }
}

/// What one pass decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcPlan {
    /// Identities to delete, by id.
    pub delete: Vec<Collect>,
    /// The clocks to keep for the next pass: every identity named by no
    /// shard (those to delete included, until the cache drops them).
    pub unreferenced: Unreferenced,
    /// Pod identities in the cache.
    pub identities: usize,
    /// Objects left alone because they cannot be read (a name that is no
    /// pod identity, no UID or `resourceVersion`: the schema and the
    /// apiserver rule these out, so this is a gap there); for logs.
    pub skipped: Vec<String>,
}

/// Which identities to delete at `now`: those that no shard names, and that
/// `previous` (the last pass's [`GcPlan::unreferenced`]) has seen named by
/// none, as the same object, since at least `grace` ago. Identities being
/// deleted already (a deletion timestamp) are left to the apiserver.
pub fn plan(
    identities: &[SecurityIdentity],
    shards: &[NodeEndpoints],
    previous: &Unreferenced,
    now: Instant,
    grace: Duration,
) -> GcPlan {
    // A number outside the pod range (the schema refuses it) names nothing
    // that could be collected; it keeps nothing either.
    let named: BTreeSet<u32> = shards
        .iter()
        .flat_map(|s| &s.spec.endpoints)
        .filter_map(|ep| u32::try_from(ep.identity).ok())
        .collect();
    let mut out = GcPlan::default();
    for object in identities {
        let name = object.metadata.name.as_deref().unwrap_or_default();
        let (id, labels) = match identity_of(object) {
            Ok(found) => found,
            Err(e) => {
                out.skipped.push(format!("SecurityIdentity {name:?}: {e}"));
                continue;
            }
        };
        out.identities += 1;
        if named.contains(&id) || object.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let (Some(uid), Some(resource_version)) = (
            object.metadata.uid.as_deref(),
            object.metadata.resource_version.as_deref(),
        ) else {
            out.skipped.push(format!(
                "SecurityIdentity {name}: no uid or resourceVersion to delete it by"
            ));
            continue;
        };
        let since = previous
            .0
            .get(&id)
            .filter(|s| s.uid == uid)
            .map_or(now, |s| s.since);
        out.unreferenced.0.insert(
            id,
            Since {
                uid: uid.to_owned(),
                since,
            },
        );
        let unreferenced_for = now.saturating_duration_since(since);
        if unreferenced_for >= grace {
            out.delete.push(Collect {
                id,
                uid: uid.to_owned(),
                resource_version: resource_version.to_owned(),
                labels,
                unreferenced_for,
            });
        }
    }
    out.delete.sort_by_key(|c| c.id);
    out
}

/// How often the loop runs a pass for `grace`: a tenth of it, at least a
/// second and at most a minute. An identity goes between `grace` and
/// `grace` plus two intervals after the last shard stopped naming it (one
/// interval until a pass sees it unreferenced, one until a pass sees the
/// grace ended).
pub fn interval(grace: Duration) -> Duration {
    (grace / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::mk_shard;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use trellis_api::v1alpha1::SecurityIdentitySpec;

    const GRACE: Duration = Duration::from_secs(600);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Identity `id` for pods `app=<app>` of namespace `shop`, as the
    /// apiserver returns it (uid `uid-<id>`, resourceVersion 1).
    fn mk_identity(id: u32, app: &str) -> SecurityIdentity {
        let mut i = SecurityIdentity::new(
            &id.to_string(),
            SecurityIdentitySpec {
                namespace: "shop".into(),
                namespace_labels: [("kubernetes.io/metadata.name".into(), "shop".into())].into(),
                pod_labels: [("app".into(), app.into())].into(),
            },
        );
        i.metadata.uid = Some(format!("uid-{id}"));
        i.metadata.resource_version = Some("1".into());
        i
    }

    /// [`mk_identity`] as another object of the same name (re-created).
    fn mk_recreated(id: u32, app: &str) -> SecurityIdentity {
        let mut i = mk_identity(id, app);
        i.metadata.uid = Some(format!("uid-{id}-again"));
        i.metadata.resource_version = Some("7".into());
        i
    }

    fn ids(plan: &GcPlan) -> Vec<u32> {
        plan.delete.iter().map(|c| c.id).collect()
    }

    /// Runs passes at the given offsets from `t0` over the same cluster;
    /// the last pass's plan.
    fn passes(
        identities: &[SecurityIdentity],
        shards: &[NodeEndpoints],
        t0: Instant,
        at: &[u64],
    ) -> GcPlan {
        let mut previous = Unreferenced::default();
        let mut last = GcPlan::default();
        for s in at {
            last = plan(identities, shards, &previous, t0 + secs(*s), GRACE);
            previous = last.unreferenced.clone();
        }
        last
    }

    #[test]
    fn what_is_collected_and_when() {
        struct Case {
            what: &'static str,
            identities: Vec<SecurityIdentity>,
            shards: Vec<NodeEndpoints>,
            /// Pass times, seconds after the first.
            at: &'static [u64],
            deleted: Vec<u32>,
            unreferenced: usize,
        }
        let cases = [
            Case {
                what: "a first pass starts the clocks and deletes nothing",
                identities: vec![mk_identity(300, "web"), mk_identity(301, "db")],
                shards: vec![],
                at: &[0],
                deleted: vec![],
                unreferenced: 2,
            },
            Case {
                what: "one second short of the grace period",
                identities: vec![mk_identity(300, "web")],
                shards: vec![],
                at: &[0, 599],
                deleted: vec![],
                unreferenced: 1,
            },
            Case {
                what: "unreferenced for exactly the grace period",
                identities: vec![mk_identity(300, "web")],
                shards: vec![],
                at: &[0, 600],
                deleted: vec![300],
                unreferenced: 1,
            },
            Case {
                what: "a named identity is never collected, however long",
                identities: vec![mk_identity(300, "web"), mk_identity(301, "db")],
                shards: vec![mk_shard("node-a", &[300])],
                at: &[0, 600, 6000],
                deleted: vec![301],
                unreferenced: 1,
            },
            Case {
                what: "named by any one shard is enough",
                identities: vec![
                    mk_identity(300, "web"),
                    mk_identity(301, "db"),
                    mk_identity(302, "cache"),
                ],
                shards: vec![mk_shard("node-a", &[300]), mk_shard("node-b", &[301, 301])],
                at: &[0, 700],
                deleted: vec![302],
                unreferenced: 1,
            },
            Case {
                what: "a shard naming an identity with no object keeps nothing else",
                identities: vec![mk_identity(300, "web")],
                shards: vec![mk_shard("node-a", &[4242])],
                at: &[0, 600],
                deleted: vec![300],
                unreferenced: 1,
            },
            Case {
                what: "a number outside the pod range in a shard is ignored",
                identities: vec![mk_identity(300, "web")],
                shards: vec![mk_shard("node-a", &[-300])],
                at: &[0, 600],
                deleted: vec![300],
                unreferenced: 1,
            },
            Case {
                what: "deleted by order of id",
                identities: vec![mk_identity(900, "c"), mk_identity(300, "a")],
                shards: vec![],
                at: &[0, 600],
                deleted: vec![300, 900],
                unreferenced: 2,
            },
        ];
        let t0 = Instant::now();
        for c in cases {
            let p = passes(&c.identities, &c.shards, t0, c.at);
            assert_eq!(ids(&p), c.deleted, "{}", c.what);
            assert_eq!(p.unreferenced.len(), c.unreferenced, "{}", c.what);
            assert_eq!(p.identities, c.identities.len(), "{}", c.what);
            assert!(p.skipped.is_empty(), "{}: {:?}", c.what, p.skipped);
        }
    }

    #[test]
    fn the_delete_carries_the_objects_preconditions_and_labels() {
        let t0 = Instant::now();
        let mut web = mk_identity(300, "web");
        web.metadata.resource_version = Some("41".into());
        let p = passes(&[web.clone()], &[], t0, &[0, 650]);
        let expected = Collect {
            id: 300,
            uid: "uid-300".into(),
            resource_version: "41".into(),
            labels: identity_of(&web).expect("valid").1,
            unreferenced_for: secs(650),
        };
        assert_eq!(p.delete, vec![expected]);
        assert_eq!(p.delete[0].name(), "300");
    }

    #[test]
    fn a_shard_naming_it_again_restarts_the_clock() {
        let t0 = Instant::now();
        let identities = [mk_identity(300, "web")];
        let p1 = plan(&identities, &[], &Unreferenced::default(), t0, GRACE);
        assert_eq!(p1.unreferenced.since(300), Some(t0));
        // A pod of it starts at 500 s…
        let used = [mk_shard("node-a", &[300])];
        let p2 = plan(&identities, &used, &p1.unreferenced, t0 + secs(500), GRACE);
        assert!(p2.unreferenced.is_empty());
        // …and is gone again at 550 s: a new clock, not the old one.
        let p3 = plan(&identities, &[], &p2.unreferenced, t0 + secs(550), GRACE);
        assert_eq!(p3.unreferenced.since(300), Some(t0 + secs(550)));
        let p4 = plan(&identities, &[], &p3.unreferenced, t0 + secs(1000), GRACE);
        assert!(p4.delete.is_empty(), "450 s since the pod went");
        let p5 = plan(&identities, &[], &p4.unreferenced, t0 + secs(1150), GRACE);
        assert_eq!(ids(&p5), vec![300]);
    }

    #[test]
    fn a_recreated_object_gets_a_clock_of_its_own() {
        let t0 = Instant::now();
        let p1 = plan(
            &[mk_identity(300, "web")],
            &[],
            &Unreferenced::default(),
            t0,
            GRACE,
        );
        // Deleted (by hand, or by a pass whose result the cache shows
        // late) and created again by a node: the same name, another UID.
        let again = [mk_recreated(300, "web")];
        let p2 = plan(&again, &[], &p1.unreferenced, t0 + secs(650), GRACE);
        assert!(p2.delete.is_empty(), "{:?}", p2.delete);
        assert_eq!(p2.unreferenced.since(300), Some(t0 + secs(650)));
        let p3 = plan(&again, &[], &p2.unreferenced, t0 + secs(1250), GRACE);
        assert_eq!(
            p3.delete
                .iter()
                .map(|c| (c.id, c.uid.as_str(), c.resource_version.as_str()))
                .collect::<Vec<_>>(),
            vec![(300, "uid-300-again", "7")]
        );
    }

    #[test]
    fn clocks_of_identities_gone_from_the_cache_are_dropped() {
        let t0 = Instant::now();
        let p1 = plan(
            &[mk_identity(300, "web"), mk_identity(301, "db")],
            &[],
            &Unreferenced::default(),
            t0,
            GRACE,
        );
        let p2 = plan(
            &[mk_identity(301, "db")],
            &[],
            &p1.unreferenced,
            t0 + secs(10),
            GRACE,
        );
        assert_eq!(p2.unreferenced.since(300), None);
        assert_eq!(p2.unreferenced.since(301), Some(t0));
    }

    #[test]
    fn a_fresh_process_starts_every_clock_again() {
        // The same cluster, unreferenced for an hour, seen by a process
        // without history (a restart, a new leader): nothing goes yet.
        let t0 = Instant::now();
        let p = plan(
            &[mk_identity(300, "web")],
            &[],
            &Unreferenced::default(),
            t0 + secs(3600),
            GRACE,
        );
        assert!(p.delete.is_empty());
        assert_eq!(p.unreferenced.since(300), Some(t0 + secs(3600)));
    }

    #[test]
    fn objects_it_cannot_read_or_that_are_going_are_left_alone() {
        let t0 = Instant::now();
        let mut reserved = mk_identity(300, "x");
        reserved.metadata.name = Some("2".into());
        let mut cidr = mk_identity(300, "x");
        cidr.metadata.name = Some("16777216".into());
        let mut named = mk_identity(300, "x");
        named.metadata.name = Some("web".into());
        let mut no_uid = mk_identity(301, "x");
        no_uid.metadata.uid = None;
        let mut no_rv = mk_identity(302, "x");
        no_rv.metadata.resource_version = None;
        let mut going = mk_identity(303, "x");
        going.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let all = [reserved, cidr, named, no_uid, no_rv, going];
        let p = passes(&all, &[], t0, &[0, 600, 6000]);
        assert!(p.delete.is_empty(), "{:?}", p.delete);
        assert!(p.unreferenced.is_empty());
        assert_eq!(p.identities, 3, "the three with pod identity names");
        assert_eq!(p.skipped.len(), 5, "{:?}", p.skipped);
        for (skipped, name) in p.skipped.iter().zip(["\"2\"", "\"16777216\"", "\"web\""]) {
            assert!(skipped.contains(name), "{skipped}");
        }
    }

    #[test]
    fn a_clock_from_the_future_does_not_panic() {
        // Instants are monotonic, but the planner takes any value.
        let t0 = Instant::now();
        let p1 = plan(
            &[mk_identity(300, "web")],
            &[],
            &Unreferenced::default(),
            t0 + secs(100),
            GRACE,
        );
        let p2 = plan(&[mk_identity(300, "web")], &[], &p1.unreferenced, t0, GRACE);
        assert!(p2.delete.is_empty());
        // A zero grace collects at the first pass (the shell never runs it so).
        let p3 = plan(
            &[mk_identity(300, "web")],
            &[],
            &Unreferenced::default(),
            t0,
            Duration::ZERO,
        );
        assert_eq!(ids(&p3), vec![300]);
    }

    #[test]
    fn the_interval_is_a_tenth_of_the_grace_within_bounds() {
        for (grace, every) in [(600, 60), (60, 6), (2, 1), (1, 1), (3600, 60)] {
            assert_eq!(interval(secs(grace)), secs(every), "grace {grace} s");
        }
    }
}
