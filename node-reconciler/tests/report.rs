//! `report` + `status`: what `kubectl get networkstatus` shows for each way
//! a reconcile can end, checked against the kernel model (ops still planned
//! after an apply are what is missing).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a panic is the failure report"
)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use trellis_api::v1alpha1::{
    Encapsulation, NETWORKSTATUS_READY, NETWORKSTATUS_ROUTES_READY, NETWORKSTATUS_TUNNEL_READY,
    NetworkStatusStatus, NodeNetworkSpec,
};
use trellis_node::desired::{DesiredError, desired};
use trellis_node::model::Observed;
use trellis_node::plan::{Op, kernel_after, plan};
use trellis_node::report::{MAX_UNHEALTHY_PEERS, Outcome, report, status};

mod fixtures;
use fixtures::{UNDERLAY, host, mk_node, native};

fn names(n: u8) -> Vec<String> {
    (1..=n).map(|i| format!("node-{i}")).collect()
}

fn cond<'a>(s: &'a NetworkStatusStatus, t: &str) -> &'a Condition {
    s.conditions.iter().find(|c| c.type_ == t).unwrap()
}

fn time(s: &str) -> Time {
    serde_json::from_value(serde_json::Value::String(s.into())).unwrap()
}

/// The status after a reconcile of node-1 among `specs` where the kernel,
/// after the apply, still lacks whatever `drop` removes from the plan.
fn after_apply(
    specs: &[NodeNetworkSpec],
    drop: impl Fn(&Op) -> bool,
    errors: &[String],
) -> NetworkStatusStatus {
    let names = names(u8::try_from(specs.len()).unwrap());
    let peers: Vec<(&str, &NodeNetworkSpec)> =
        names.iter().map(String::as_str).zip(specs.iter()).collect();
    let d = desired("node-1", &specs[0], &peers, &host()).unwrap();
    let before = Observed {
        underlay: Some(UNDERLAY),
        ..Observed::default()
    };
    let ops: Vec<Op> = plan(&d, &before)
        .into_iter()
        .filter(|op| !drop(op))
        .collect();
    let after = kernel_after(&before, &ops);
    let remaining = plan(&d, &after);
    let r = report(
        "node-1",
        &specs[0].pod_cidrs,
        Some(3),
        &Outcome::Reconciled {
            desired: &d,
            host: &host(),
            remaining: &remaining,
            errors,
        },
    );
    status(None, r, &time("2026-11-21T10:00:00Z"))
}

#[test]
fn a_converged_vxlan_node_is_ready_with_its_peers_and_mtus() {
    let specs: Vec<_> = (1..=3).map(mk_node).collect();
    let s = after_apply(&specs, |_| false, &[]);
    assert_eq!(s.peers, 2);
    assert_eq!(s.encapsulation, Some(Encapsulation::Vxlan));
    assert_eq!((s.underlay_mtu, s.pod_mtu), (Some(1500), Some(1450)));
    assert_eq!(s.pod_cidrs, ["10.244.1.0/24"]);
    assert_eq!(s.node_network_generation, Some(3));
    assert!(s.unhealthy_peers.is_empty());
    assert_eq!(s.last_error, None);
    for t in [
        NETWORKSTATUS_TUNNEL_READY,
        NETWORKSTATUS_ROUTES_READY,
        NETWORKSTATUS_READY,
    ] {
        let c = cond(&s, t);
        assert_eq!(
            (c.status.as_str(), c.observed_generation),
            ("True", Some(3)),
            "{c:?}"
        );
    }
    assert_eq!(cond(&s, NETWORKSTATUS_TUNNEL_READY).reason, "DeviceReady");
    assert_eq!(
        cond(&s, NETWORKSTATUS_ROUTES_READY).message,
        "2 VXLAN routes to 2 peers"
    );
}

#[test]
fn a_route_the_kernel_refused_marks_that_peer_and_routes_not_ready() {
    let specs: Vec<_> = (1..=3).map(mk_node).collect();
    let refused =
        "replace route 10.244.3.0/24 via 10.244.3.0 dev trellis-vxlan onlink: ENETUNREACH";
    let s = after_apply(
        &specs,
        |op| matches!(op, Op::ReplaceRoute(r) if r.dst.to_string() == "10.244.3.0/24"),
        &[refused.to_owned()],
    );
    assert_eq!(s.peers, 1, "node-2 only");
    assert_eq!(s.unhealthy_peers, ["node-3"]);
    assert_eq!(s.last_error.as_deref(), Some(refused));
    assert_eq!(cond(&s, NETWORKSTATUS_TUNNEL_READY).status, "True");
    let routes = cond(&s, NETWORKSTATUS_ROUTES_READY);
    assert_eq!(
        (routes.status.as_str(), routes.reason.as_str()),
        ("False", "NotProgrammed")
    );
    assert!(
        routes.message.contains("10.244.3.0/24"),
        "{}",
        routes.message
    );
    assert!(routes.message.contains("ENETUNREACH"), "{}", routes.message);
    let ready = cond(&s, NETWORKSTATUS_READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NotProgrammed")
    );
    assert!(
        ready.message.starts_with("RoutesReady: "),
        "{}",
        ready.message
    );
}

#[test]
fn a_missing_fdb_entry_is_traced_to_its_peer() {
    let specs: Vec<_> = (1..=3).map(mk_node).collect();
    let s = after_apply(
        &specs,
        |op| matches!(op, Op::ReplaceFdb(e) if e.dst.to_string() == "192.0.2.12"),
        &[],
    );
    assert_eq!(s.unhealthy_peers, ["node-2"]);
    assert_eq!(s.peers, 1);
}

#[test]
fn a_missing_device_makes_the_tunnel_and_every_peer_not_ready() {
    let specs: Vec<_> = (1..=3).map(mk_node).collect();
    let s = after_apply(
        &specs,
        |op| matches!(op, Op::CreateVxlan(_)),
        &["create: EEXIST".into()],
    );
    let tunnel = cond(&s, NETWORKSTATUS_TUNNEL_READY);
    assert_eq!(
        (tunnel.status.as_str(), tunnel.reason.as_str()),
        ("False", "DeviceNotReady")
    );
    assert!(
        tunnel.message.contains("create trellis-vxlan"),
        "{}",
        tunnel.message
    );
    assert_eq!(s.peers, 0);
    assert_eq!(s.unhealthy_peers, ["node-2", "node-3"]);
    assert_eq!(cond(&s, NETWORKSTATUS_READY).reason, "DeviceNotReady");
}

#[test]
fn native_mode_needs_no_tunnel_and_names_unreachable_peers() {
    let mut far = native(mk_node(3));
    far.underlay_address = "198.51.100.3".into();
    let specs = vec![native(mk_node(1)), native(mk_node(2)), far];
    let s = after_apply(&specs, |_| false, &[]);
    let tunnel = cond(&s, NETWORKSTATUS_TUNNEL_READY);
    assert_eq!(
        (tunnel.status.as_str(), tunnel.reason.as_str()),
        ("True", "NotRequired")
    );
    assert_eq!(s.pod_mtu, Some(1500), "no encapsulation overhead");
    let routes = cond(&s, NETWORKSTATUS_ROUTES_READY);
    assert_eq!(
        (routes.status.as_str(), routes.reason.as_str()),
        ("False", "PeerNotReachable")
    );
    assert!(
        routes.message.contains("198.51.100.3"),
        "{}",
        routes.message
    );
    assert_eq!(s.unhealthy_peers, ["node-3"]);
    assert_eq!(s.peers, 1);
}

#[test]
fn unhealthy_peers_are_bounded_and_messages_say_how_many_more() {
    let mut specs = vec![mk_node(1)];
    for n in 2..=30 {
        let mut peer = mk_node(n);
        peer.encapsulation = Encapsulation::None;
        specs.push(peer);
    }
    let s = after_apply(&specs, |_| false, &[]);
    assert_eq!(s.unhealthy_peers.len(), MAX_UNHEALTHY_PEERS);
    let routes = cond(&s, NETWORKSTATUS_ROUTES_READY);
    assert_eq!(routes.reason, "PeersSkipped");
    assert!(
        routes.message.ends_with("(and 26 more)"),
        "{}",
        routes.message
    );
    assert!(
        routes.message.contains("uses another encapsulation"),
        "{}",
        routes.message
    );
}

#[test]
fn spec_and_observe_failures_say_what_and_change_nothing_else() {
    let err = DesiredError::NoUnderlayLink("192.0.2.1".parse().unwrap());
    let r = report(
        "node-1",
        &["10.244.1.0/24".into()],
        Some(1),
        &Outcome::Unusable(&err, &host()),
    );
    let s = status(None, r, &time("2026-11-21T10:00:00Z"));
    let ready = cond(&s, NETWORKSTATUS_READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NoUnderlayLink")
    );
    assert_eq!(
        ready.message,
        "NodeNetwork node-1: no link on this node holds the underlay address 192.0.2.1"
    );
    assert_eq!(s.last_error.as_deref(), Some(ready.message.as_str()));

    let r = report("node-1", &[], None, &Outcome::NoNodeNetwork);
    let s = status(None, r, &time("2026-11-21T10:00:00Z"));
    assert_eq!(cond(&s, NETWORKSTATUS_READY).reason, "NoNodeNetwork");
    assert!(s.pod_cidrs.is_empty());

    let r = report(
        "node-1",
        &[],
        Some(1),
        &Outcome::ObserveFailed("cannot dump routes: EPERM".into()),
    );
    let s = status(None, r, &time("2026-11-21T10:00:00Z"));
    assert_eq!(cond(&s, NETWORKSTATUS_ROUTES_READY).reason, "ObserveFailed");
}

#[test]
fn an_unchanged_report_makes_an_identical_status_so_nothing_is_written() {
    let specs: Vec<_> = (1..=2).map(mk_node).collect();
    let first = after_apply(&specs, |_| false, &[]);
    let names = names(2);
    let peers: Vec<(&str, &NodeNetworkSpec)> =
        names.iter().map(String::as_str).zip(specs.iter()).collect();
    let d = desired("node-1", &specs[0], &peers, &host()).unwrap();
    let again = report(
        "node-1",
        &specs[0].pod_cidrs,
        Some(3),
        &Outcome::Reconciled {
            desired: &d,
            host: &host(),
            remaining: &[],
            errors: &[],
        },
    );
    let later = status(Some(&first), again, &time("2026-11-22T00:00:00Z"));
    assert_eq!(later, first, "transition times carried over");

    // Fields other parts of the node own survive a report.
    let mut with_endpoints = first.clone();
    with_endpoints.endpoints = 7;
    with_endpoints.policy_hash = Some("abc".into());
    let r = report(
        "node-1",
        &specs[0].pod_cidrs,
        Some(3),
        &Outcome::Reconciled {
            desired: &d,
            host: &host(),
            remaining: &[],
            errors: &[],
        },
    );
    let kept = status(
        Some(&with_endpoints),
        r.clone(),
        &time("2026-11-22T00:00:00Z"),
    );
    assert_eq!(
        (kept.endpoints, kept.policy_hash.as_deref()),
        (7, Some("abc"))
    );

    // Once the endpoint service counts, its count is written.
    let counted = trellis_node::report::Report {
        endpoints: Some(3),
        ..r
    };
    let s = status(
        Some(&with_endpoints),
        counted,
        &time("2026-11-22T00:00:00Z"),
    );
    assert_eq!((s.endpoints, s.policy_hash.as_deref()), (3, Some("abc")));
}

#[test]
fn long_errors_are_cut_to_the_schema_bound() {
    let err = "é".repeat(2000);
    let r = report("node-1", &[], Some(1), &Outcome::ObserveFailed(err));
    assert!(r.status.last_error.unwrap().len() <= trellis_node::report::MAX_ERROR_LEN);
}

#[test]
fn a_node_without_a_block_is_not_ready_and_blockless_peers_are_no_peers() {
    let mut own = mk_node(1);
    own.pod_cidrs.clear();
    own.vtep.as_mut().unwrap().ipv4 = None;
    let mut waiting = mk_node(3);
    waiting.pod_cidrs.clear();
    waiting.vtep.as_mut().unwrap().ipv4 = None;
    let specs = vec![own, mk_node(2), waiting];
    let s = after_apply(&specs, |_| false, &[]);
    let ready = cond(&s, NETWORKSTATUS_READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NoPodCIDR")
    );
    assert!(ready.message.contains("IPPool"), "{}", ready.message);
    assert_eq!(cond(&s, NETWORKSTATUS_ROUTES_READY).status, "True");
    assert_eq!(s.peers, 1, "node-3 has nothing to route to yet");
    assert!(
        s.unhealthy_peers.is_empty(),
        "waiting for a block is not a fault"
    );
}

#[test]
fn the_policy_hash_is_what_the_engine_last_reported_and_stays_until_it_reports() {
    let t = time("2026-11-21T10:00:00Z");
    let blank = || report("n", &[], None, &Outcome::ObserveFailed("x".into()));
    let mut with = blank();
    with.status.policy_hash = Some("v1-aaaa".into());
    let first = status(None, with, &t);
    assert_eq!(first.policy_hash.as_deref(), Some("v1-aaaa"));
    // A report without one (no policy engine, or one not synced) keeps it.
    let kept = status(Some(&first), blank(), &t);
    assert_eq!(kept.policy_hash.as_deref(), Some("v1-aaaa"));
    // A new one replaces it.
    let mut newer = blank();
    newer.status.policy_hash = Some("v1-bbbb".into());
    assert_eq!(
        status(Some(&kept), newer, &t).policy_hash.as_deref(),
        Some("v1-bbbb")
    );
}
