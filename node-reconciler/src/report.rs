//! What a reconcile found → the node's `NetworkStatus`. Pure.
//!
//! ```text
//!  Outcome (no spec | observe failed | spec unusable | reconciled: desired, host, ops still needed, errors)
//!     └─▶ report() ─▶ Report { counts, MTUs, unhealthy peers, last error, [Cond] }
//!                        └─▶ status(previous, report, now) ─▶ NetworkStatusStatus
//! ```
//!
//! The conditions describe the kernel as observed *after* the apply: ops
//! that a fresh plan still asks for are what is not in place. So a route the
//! kernel refused, or one removed by hand a moment ago, shows up here, not
//! only the errors the apply returned.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use trellis_api::v1alpha1::{
    Encapsulation, NETWORKSTATUS_READY, NETWORKSTATUS_ROUTES_READY, NETWORKSTATUS_TUNNEL_READY,
    NetworkStatusStatus,
};
use trellis_common::conditions::{Cond, merge};

use crate::desired::{Desired, DesiredError, Host, SkipReason};
use crate::model::{Mac, VXLAN_DEVICE};
use crate::plan::Op;

/// Most names in `status.unhealthyPeers` (the schema's bound).
pub const MAX_UNHEALTHY_PEERS: usize = 10;
/// `status.lastError` is cut to this many bytes (the schema's bound).
pub const MAX_ERROR_LEN: usize = 1024;
/// Most problems spelled out in one condition message.
const MAX_LISTED: usize = 3;

/// How a reconcile ended.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// The operator has not written this node's `NodeNetwork` (yet).
    NoNodeNetwork,
    /// The kernel state could not be read; nothing was changed.
    ObserveFailed(String),
    /// The node's own spec cannot be programmed; nothing was changed.
    Unusable(&'a DesiredError, &'a Host),
    /// The plan ran.
    Reconciled {
        desired: &'a Desired,
        host: &'a Host,
        /// What a fresh plan against the kernel still asks for.
        remaining: &'a [Op],
        /// Why ops failed, in order.
        errors: &'a [String],
    },
}

/// What the node reports, before condition bookkeeping.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub status: NetworkStatusStatus,
    pub conditions: Vec<Cond>,
    /// Pod endpoints in phase Ready, when the endpoint service counts them
    /// (`None` keeps what the status says).
    pub endpoints: Option<usize>,
}

/// The report for `node`, whose `NodeNetwork` has `spec_cidrs` and `generation`.
pub fn report(
    node: &str,
    spec_cidrs: &[String],
    generation: Option<i64>,
    outcome: &Outcome<'_>,
) -> Report {
    let mut status = NetworkStatusStatus {
        node_network_generation: generation,
        pod_cidrs: spec_cidrs.to_vec(),
        ..NetworkStatusStatus::default()
    };
    let all_false = |reason: &'static str, message: String| {
        [
            NETWORKSTATUS_TUNNEL_READY,
            NETWORKSTATUS_ROUTES_READY,
            NETWORKSTATUS_READY,
        ]
        .into_iter()
        .map(|t| Cond::new(t, false, reason, message.clone()))
        .collect::<Vec<_>>()
    };
    let conditions = match outcome {
        Outcome::NoNodeNetwork => {
            status.pod_cidrs.clear();
            all_false(
                "NoNodeNetwork",
                format!("waiting for trellis-operator to write NodeNetwork {node}"),
            )
        }
        Outcome::ObserveFailed(why) => {
            status.last_error = Some(truncate(why));
            all_false(
                "ObserveFailed",
                format!("cannot read the node's network state: {why}"),
            )
        }
        Outcome::Unusable(err, host) => {
            status.underlay_mtu = host.underlay.map(|u| clamp(u.mtu));
            let reason = match err {
                DesiredError::NoUnderlayLink(_) => "NoUnderlayLink",
                _ => "InvalidSpec",
            };
            let message = format!("NodeNetwork {node}: {err}");
            status.last_error = Some(truncate(&message));
            all_false(reason, message)
        }
        Outcome::Reconciled {
            desired,
            host,
            remaining,
            errors,
        } => reconciled(&mut status, desired, host, remaining, errors),
    };
    Report {
        status,
        conditions,
        endpoints: None,
    }
}

fn reconciled(
    status: &mut NetworkStatusStatus,
    desired: &Desired,
    host: &Host,
    remaining: &[Op],
    errors: &[String],
) -> Vec<Cond> {
    status.encapsulation = desired.encapsulation;
    status.underlay_mtu = host.underlay.map(|u| clamp(u.mtu));
    status.pod_mtu = Some(clamp(desired.pod_mtu));
    status.last_error = errors.first().map(|e| truncate(e));

    let device_ops: Vec<&Op> = remaining.iter().filter(|op| is_device_op(op)).collect();
    let affected = affected_peers(desired, remaining);
    let stale = remaining
        .iter()
        .filter(|op| matches!(op, Op::DelRoute(_) | Op::DelNeighbour(_) | Op::DelFdb(_)))
        .count();

    let mut unhealthy: BTreeSet<&str> = affected.iter().map(String::as_str).collect();
    unhealthy.extend(desired.skipped.iter().map(|s| s.peer.as_str()));
    status.unhealthy_peers = unhealthy
        .into_iter()
        .take(MAX_UNHEALTHY_PEERS)
        .map(str::to_owned)
        .collect();
    let programmed = desired.peers_programmed.saturating_sub(
        affected
            .iter()
            .filter(|p| !desired.skipped.iter().any(|s| &s.peer == *p))
            .count(),
    );
    status.peers = i32::try_from(programmed).unwrap_or(i32::MAX);

    let tunnel = match (&desired.vxlan, device_ops.is_empty()) {
        (None, true) => Cond::new(
            NETWORKSTATUS_TUNNEL_READY,
            true,
            "NotRequired",
            "encapsulation None: peers' blocks are routed via their underlay addresses",
        ),
        (Some(v), true) => Cond::new(
            NETWORKSTATUS_TUNNEL_READY,
            true,
            "DeviceReady",
            format!(
                "{VXLAN_DEVICE} vni {} dstport {} local {} mtu {}",
                v.vni, v.port, v.local, v.mtu
            ),
        ),
        (_, false) => Cond::new(
            NETWORKSTATUS_TUNNEL_READY,
            false,
            "DeviceNotReady",
            listed(device_ops.iter().map(|op| op.to_string()), errors),
        ),
    };

    let not_reachable: Vec<String> = desired
        .skipped
        .iter()
        .filter(|s| matches!(s.reason, SkipReason::NotDirectlyReachable(_)))
        .map(ToString::to_string)
        .collect();
    let routes = if !affected.is_empty() || stale > 0 {
        let pending = remaining.iter().filter(|op| !is_device_op(op));
        Cond::new(
            NETWORKSTATUS_ROUTES_READY,
            false,
            "NotProgrammed",
            listed(pending.map(|op| op.to_string()), errors),
        )
    } else if !not_reachable.is_empty() {
        Cond::new(
            NETWORKSTATUS_ROUTES_READY,
            false,
            "PeerNotReachable",
            listed(not_reachable.into_iter(), &[]),
        )
    } else if !desired.skipped.is_empty() {
        Cond::new(
            NETWORKSTATUS_ROUTES_READY,
            false,
            "PeersSkipped",
            listed(desired.skipped.iter().map(ToString::to_string), &[]),
        )
    } else {
        let mode = match desired.encapsulation {
            Some(Encapsulation::None) => "native",
            _ => "VXLAN",
        };
        Cond::new(
            NETWORKSTATUS_ROUTES_READY,
            true,
            "Programmed",
            format!(
                "{} {mode} routes to {} peers",
                desired.routes.len(),
                desired.peers_programmed
            ),
        )
    };

    let ready = match [&tunnel, &routes].into_iter().find(|c| !c.status) {
        // Peers can reach nothing here: no pod can get an address.
        None if status.pod_cidrs.is_empty() => Cond::new(
            NETWORKSTATUS_READY,
            false,
            "NoPodCIDR",
            "the NodeNetwork has no pod address block yet: does an IPPool select this node and have free blocks? (kubectl get ippools)",
        ),
        None => Cond::new(
            NETWORKSTATUS_READY,
            true,
            "Ready",
            "tunnel and routes are in place",
        ),
        Some(first) => Cond::new(
            NETWORKSTATUS_READY,
            false,
            first.reason,
            format!("{}: {}", first.type_, first.message),
        ),
    };
    vec![tunnel, routes, ready]
}

/// The status to write, given the one written before: transition times
/// carried over, so an unchanged report makes an identical status.
pub fn status(
    previous: Option<&NetworkStatusStatus>,
    report: Report,
    now: &Time,
) -> NetworkStatusStatus {
    let previous_conditions = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    let generation = report.status.node_network_generation;
    NetworkStatusStatus {
        conditions: merge(previous_conditions, report.conditions, now, generation),
        // What other parts of the node own (endpoints, drops, the policy
        // enforced) keeps what was there until those parts report.
        endpoints: report.endpoints.map_or_else(
            || previous.map_or(0, |p| p.endpoints),
            |n| i32::try_from(n).unwrap_or(i32::MAX),
        ),
        drops: previous.map(|p| p.drops.clone()).unwrap_or_default(),
        policy_hash: report
            .status
            .policy_hash
            .clone()
            .or_else(|| previous.and_then(|p| p.policy_hash.clone())),
        ..report.status
    }
}

fn is_device_op(op: &Op) -> bool {
    matches!(
        op,
        Op::CreateVxlan(_)
            | Op::DeleteVxlan { .. }
            | Op::SetVxlanMtu(_)
            | Op::SetVxlanMac(_)
            | Op::SetVxlanUp
            | Op::AddAddress(_)
            | Op::DelAddress(_)
    )
}

/// Peers whose routes, neighbour or FDB entries are still missing.
fn affected_peers(desired: &Desired, remaining: &[Op]) -> BTreeSet<String> {
    let mut by_via: BTreeMap<IpAddr, Vec<&String>> = BTreeMap::new();
    for route in &desired.routes {
        if let Some(owner) = desired.route_owners.get(&route.dst) {
            by_via.entry(route.via).or_default().push(owner);
        }
    }
    let by_mac: BTreeMap<Mac, IpAddr> = desired.neighbours.iter().map(|n| (n.mac, n.ip)).collect();
    let mut out = BTreeSet::new();
    for op in remaining {
        match op {
            Op::ReplaceRoute(r) => out.extend(desired.route_owners.get(&r.dst).cloned()),
            Op::ReplaceNeighbour(n) => {
                out.extend(
                    by_via
                        .get(&n.ip)
                        .into_iter()
                        .flatten()
                        .map(|s| (*s).clone()),
                );
            }
            Op::ReplaceFdb(e) => {
                let owners = by_mac.get(&e.mac).and_then(|ip| by_via.get(ip));
                out.extend(owners.into_iter().flatten().map(|s| (*s).clone()));
            }
            // The device carries every peer's entries.
            Op::CreateVxlan(_) => {
                out.extend(desired.route_owners.values().cloned());
            }
            _ => {}
        }
    }
    out
}

/// Up to [`MAX_LISTED`] items, the first error, and how many more there are.
fn listed(items: impl Iterator<Item = String>, errors: &[String]) -> String {
    let items: Vec<String> = items.collect();
    let mut msg = items
        .iter()
        .take(MAX_LISTED)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > MAX_LISTED {
        msg.push_str(&format!(" (and {} more)", items.len() - MAX_LISTED));
    }
    if let Some(e) = errors.first() {
        msg.push_str(&format!(" — last error: {e}"));
    }
    truncate(&msg)
}

fn clamp(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// At most [`MAX_ERROR_LEN`] bytes, cut at a character boundary.
fn truncate(s: &str) -> String {
    if s.len() <= MAX_ERROR_LEN {
        return s.to_owned();
    }
    let mut end = MAX_ERROR_LEN - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
