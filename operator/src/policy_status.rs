//! `PolicyBundle.status`: whether each bundle is accepted and on how many of
//! the nodes it matters to it is enforced, from what the nodes report. Pure
//! (values in, values out), so every count and condition is a unit test.
//!
//! ```text
//!  NodeEndpoints shards (node → pods → identity) ─┐
//!  SecurityIdentities (identity → labels) ────────┼─ subject selects? ─▶ desired nodes
//!  NetworkStatus (PolicyReady, policyHash) ───────┤  hash == policy_hash(current set)? ─▶ realised
//!  NetworkPolicies, PolicyBundles, enforcement ───┘
//!        │ bundle::validate · bundle::conflicts · conditions::merge
//!        ▼
//!  per bundle: PolicyBundleStatus { desiredNodes, realizedNodes, ≤10 laggingNodes,
//!              Accepted, Realized, Conflicting }   (only those that differ are written)
//! ```
//!
//! A node is *realised* for a bundle when it enforces the whole current
//! policy set: its `PolicyReady` is True and its `policyHash` equals
//! [`policy_hash`] of the enforcement mode, every NetworkPolicy and every
//! PolicyBundle as the operator sees them, which includes this bundle's
//! current generation. A node that enforces this bundle but not yet an
//! unrelated edit elsewhere counts as lagging: the hash cannot tell the two
//! apart, and "enforces everything as written now" is the promise worth
//! reporting.
//!
//! A node is *desired* when its `NodeEndpoints` shard holds at least one
//! pod whose identity's labels the bundle's subject selects, whether or not
//! the node has a `NetworkStatus` (then it lags). A pod whose
//! `SecurityIdentity` is not known yet counts for no bundle until it is.
//!
//! Cost: O(nodes + endpoints + bundles × identities) per rollup.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use trellis_api::v1alpha1::{
    NETWORKSTATUS_POLICY_READY, NetworkStatus, NodeEndpoints, POLICYBUNDLE_ACCEPTED,
    POLICYBUNDLE_CONFLICTING, POLICYBUNDLE_REALIZED, PolicyBundle, PolicyBundleStatus,
    PolicyEnforcement, SecurityIdentity,
};
use trellis_policy::bundle::{self, Conflict};
use trellis_policy::generation::policy_hash;
use trellis_policy::identity::{IdentityInfo, NamedPorts, SecurityLabels};

use crate::conditions::{self, Cond};

/// At most this many names in `laggingNodes` (the schema's bound too).
pub const MAX_LAGGING: usize = 10;

/// Condition reasons of `PolicyBundle.status`.
pub mod reason {
    pub const VALID: &str = "Valid";
    pub const INVALID: &str = "Invalid";
    pub const ALL_NODES_ENFORCE: &str = "AllNodesEnforce";
    pub const NO_SUBJECT_PODS: &str = "NoSubjectPods";
    pub const NODES_LAGGING: &str = "NodesLagging";
    pub const NO_CONFLICT: &str = "NoConflict";
    pub const SAME_PRIORITY_OVERLAP: &str = "SamePriorityOverlap";
}

/// Everything the rollup reads, as the watches hold it.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub enforcement: PolicyEnforcement,
    pub policies: &'a [NetworkPolicy],
    pub bundles: &'a [PolicyBundle],
    pub statuses: &'a [NetworkStatus],
    pub endpoints: &'a [NodeEndpoints],
    pub identities: &'a [SecurityIdentity],
}

/// The result of one rollup.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollup {
    /// Statuses to write, by bundle name: only those that differ from the
    /// bundle's current status.
    pub statuses: Vec<(String, PolicyBundleStatus)>,
    /// The hash a node reports once it enforces the current set.
    pub hash: String,
    /// Objects the rollup could not read (they passed the schema, so this
    /// means a schema gap); for logs.
    pub skipped: Vec<String>,
}

/// What one node reports about policy.
struct NodeReport<'a> {
    ready: bool,
    hash: Option<&'a str>,
}

/// The status each bundle should have, given the previous ones and `now`
/// (a condition's `lastTransitionTime` moves only when its status does).
pub fn rollup(input: &Input<'_>, now: &Time) -> Rollup {
    let mut skipped = Vec::new();
    let hash = policy_hash(input.enforcement, input.policies, input.bundles);

    let mut identities: HashMap<u32, SecurityLabels> = HashMap::new();
    for object in input.identities {
        match trellis_policy::objects::identity_of(object) {
            Ok((id, labels)) => {
                identities.insert(id, labels);
            }
            Err(e) => skipped.push(format!(
                "SecurityIdentity {}: {e}",
                object.metadata.name.as_deref().unwrap_or_default()
            )),
        }
    }
    // Identity → the nodes hosting a pod of it.
    let mut hosts: BTreeMap<u32, BTreeSet<&str>> = BTreeMap::new();
    for shard in input.endpoints {
        let Some(node) = shard.metadata.name.as_deref() else {
            continue;
        };
        for ep in &shard.spec.endpoints {
            match u32::try_from(ep.identity) {
                Ok(id) => {
                    hosts.entry(id).or_default().insert(node);
                }
                Err(_) => skipped.push(format!(
                    "NodeEndpoints {node}: pod {}/{} has identity {}",
                    ep.namespace, ep.name, ep.identity
                )),
            }
        }
    }
    let reports: HashMap<&str, NodeReport<'_>> = input
        .statuses
        .iter()
        .filter_map(|s| {
            let name = s.metadata.name.as_deref()?;
            let status = s.status.as_ref();
            let ready = status.is_some_and(|st| {
                st.conditions
                    .iter()
                    .any(|c| c.type_ == NETWORKSTATUS_POLICY_READY && c.status == "True")
            });
            let hash = status.and_then(|st| st.policy_hash.as_deref());
            Some((name, NodeReport { ready, hash }))
        })
        .collect();

    // `bundle::conflicts` wants identities with their named ports; the
    // overlap of pod peers needs only the labels.
    let infos: Vec<IdentityInfo> = identities
        .iter()
        .map(|(id, labels)| IdentityInfo {
            id: *id,
            labels: labels.clone(),
            named_ports: NamedPorts::default(),
        })
        .collect();
    let conflicts = bundle::conflicts(input.bundles, &infos);

    let mut statuses = Vec::new();
    for b in input.bundles {
        let name = bundle::name_of(b);
        let desired: BTreeSet<&str> = hosts
            .iter()
            .filter(|(id, _)| {
                identities
                    .get(*id)
                    .is_some_and(|labels| bundle::selects(&b.spec.subject, labels))
            })
            .flat_map(|(_, nodes)| nodes.iter().copied())
            .collect();
        let lagging: Vec<&str> = desired
            .iter()
            .copied()
            .filter(|n| {
                !reports
                    .get(n)
                    .is_some_and(|r| r.ready && r.hash == Some(hash.as_str()))
            })
            .collect();
        let realized = desired.len() - lagging.len();
        let generation = b.metadata.generation;
        let conds = vec![
            accepted(b),
            realized_condition(desired.len(), realized, &lagging, generation),
            conflicting(name, &conflicts),
        ];
        let previous = b.status.clone().unwrap_or_default();
        let next = PolicyBundleStatus {
            observed_generation: generation,
            desired_nodes: count(desired.len()),
            realized_nodes: count(realized),
            lagging_nodes: lagging
                .iter()
                .take(MAX_LAGGING)
                .map(|n| (*n).to_owned())
                .collect(),
            conditions: conditions::merge(&previous.conditions, conds, now, generation),
        };
        if next != previous {
            statuses.push((name.to_owned(), next));
        }
    }
    Rollup {
        statuses,
        hash,
        skipped,
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// `Accepted`: False with the compiler's words when the bundle is invalid.
fn accepted(b: &PolicyBundle) -> Cond {
    let errors = bundle::validate(b);
    if errors.is_empty() {
        return Cond::new(
            POLICYBUNDLE_ACCEPTED,
            true,
            reason::VALID,
            "the bundle is valid and compiled by every node it applies to",
        );
    }
    let shown: Vec<String> = errors
        .iter()
        .take(5)
        .map(|d| format!("{}: {}", d.field, d.problem))
        .collect();
    let more = if errors.len() > 5 {
        format!(" (and {} more)", errors.len() - 5)
    } else {
        String::new()
    };
    Cond::new(
        POLICYBUNDLE_ACCEPTED,
        false,
        reason::INVALID,
        format!(
            "fix the spec: {}{more}; until then the broken parts of Allow rules match nothing and those of Deny and Pass rules match everything and deny",
            shown.join("; ")
        ),
    )
}

/// `Realized`: True when every desired node enforces the current set.
fn realized_condition(
    desired: usize,
    realized: usize,
    lagging: &[&str],
    generation: Option<i64>,
) -> Cond {
    let generation = generation.map_or_else(|| "?".to_owned(), |g| g.to_string());
    if desired == 0 {
        return Cond::new(
            POLICYBUNDLE_REALIZED,
            true,
            reason::NO_SUBJECT_PODS,
            "no node hosts a pod the subject selects",
        );
    }
    if lagging.is_empty() {
        return Cond::new(
            POLICYBUNDLE_REALIZED,
            true,
            reason::ALL_NODES_ENFORCE,
            format!("{realized} of {desired} nodes enforce generation {generation}"),
        );
    }
    let mut names = lagging
        .iter()
        .take(MAX_LAGGING)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if lagging.len() > MAX_LAGGING {
        names.push_str(&format!(" and {} more", lagging.len() - MAX_LAGGING));
    }
    Cond::new(
        POLICYBUNDLE_REALIZED,
        false,
        reason::NODES_LAGGING,
        format!("{realized} of {desired} nodes enforce generation {generation}; lagging: {names}"),
    )
}

/// `Conflicting`: True when a bundle of the same tier and priority overlaps
/// this one with a different action.
fn conflicting(name: &str, conflicts: &[Conflict]) -> Cond {
    let mine: Vec<&Conflict> = conflicts
        .iter()
        .filter(|c| c.first == name || c.second == name)
        .collect();
    match mine.first() {
        None => Cond::new(
            POLICYBUNDLE_CONFLICTING,
            false,
            reason::NO_CONFLICT,
            "no bundle of the same tier and priority overlaps this one with another action",
        ),
        Some(first) => {
            let more = if mine.len() > 1 {
                format!(
                    "; {} more conflicting bundle(s); give them distinct priorities",
                    mine.len() - 1
                )
            } else {
                "; give them distinct priorities".to_owned()
            };
            Cond::new(
                POLICYBUNDLE_CONFLICTING,
                true,
                reason::SAME_PRIORITY_OVERLAP,
                format!("{first}{more}"),
            )
        }
    }
}

#[cfg(test)]
mod tests;
