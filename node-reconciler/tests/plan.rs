//! `desired` + `plan` on table-driven cases: a fresh node, a converged node
//! (no ops), adoption of existing kernel state, peers joining, changing and
//! leaving, the device's immutable attributes, native routing, and
//! everything a peer's bad spec must not break.

// Test-only helpers: a panic here is the failure report.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;

use ipnet::IpNet;
use trellis_api::v1alpha1::{NodeNetworkSpec, VxlanConfig};
use trellis_node::desired::{Desired, Host, SkipReason, desired};
use trellis_node::model::{Device, Fdb, Mac, Neighbour, Observed, Route};
use trellis_node::plan::{Op, kernel_after, plan};

mod fixtures;
use fixtures::{UNDERLAY, host, mac, mk_node, native};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Desired state of node 1 with the given peers (node 1 itself may be among them).
fn desired_of(own: &NodeNetworkSpec, peers: &[(&str, &NodeNetworkSpec)]) -> Desired {
    desired("node-1", own, peers, &host()).expect("desired")
}

fn converge(d: &Desired, before: &Observed) -> Observed {
    let ops = plan(d, before);
    let after = kernel_after(before, &ops);
    assert_eq!(
        plan(d, &after),
        [],
        "not converged after one plan:\n{}",
        show(&ops)
    );
    after
}

fn show(ops: &[Op]) -> String {
    ops.iter().map(|o| format!("  {o}\n")).collect()
}

fn empty_kernel() -> Observed {
    Observed {
        underlay: Some(UNDERLAY),
        ..Observed::default()
    }
}

#[test]
fn a_fresh_node_creates_the_device_then_entries_then_routes() {
    let (n1, n2, n3) = (mk_node(1), mk_node(2), mk_node(3));
    let d = desired_of(&n1, &[("node-1", &n1), ("node-2", &n2), ("node-3", &n3)]);
    let ops = plan(&d, &empty_kernel());
    let text: Vec<String> = ops.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "create trellis-vxlan vni 1 dstport 8472 local 192.0.2.11 dev#2 mac 0a:00:00:00:00:01 mtu 1450 nolearning",
            "add address 10.244.1.0/32 dev trellis-vxlan",
            "replace neighbour 10.244.2.0 lladdr 0a:00:00:00:00:02 dev trellis-vxlan permanent",
            "replace neighbour 10.244.3.0 lladdr 0a:00:00:00:00:03 dev trellis-vxlan permanent",
            "replace fdb 0a:00:00:00:00:02 dst 192.0.2.12 dev trellis-vxlan permanent",
            "replace fdb 0a:00:00:00:00:03 dst 192.0.2.13 dev trellis-vxlan permanent",
            "replace route 10.244.2.0/24 via 10.244.2.0 dev trellis-vxlan onlink",
            "replace route 10.244.3.0/24 via 10.244.3.0 dev trellis-vxlan onlink",
        ]
    );
    assert_eq!(
        (d.peers_programmed, d.pod_mtu),
        (2, 1450),
        "MTU = underlay 1500 - 50"
    );
    converge(&d, &empty_kernel());
}

#[test]
fn a_converged_node_plans_nothing() {
    let (n1, n2) = (mk_node(1), mk_node(2));
    let d = desired_of(&n1, &[("node-2", &n2)]);
    let kernel = converge(&d, &empty_kernel());
    assert_eq!(plan(&d, &kernel), []);
}

#[test]
fn existing_kernel_state_is_adopted_not_rebuilt() {
    // What a previous agent left, listed in another order: adopted as is.
    let (n1, n2) = (mk_node(1), mk_node(2));
    let d = desired_of(&n1, &[("node-2", &n2)]);
    let mut kernel = converge(&d, &empty_kernel());
    kernel.routes.reverse();
    kernel.vxlan.as_mut().unwrap().index = 42;
    assert_eq!(plan(&d, &kernel), [], "a restart must not flush");
}

#[test]
fn a_peer_joining_changing_and_leaving() {
    let (n1, n2, n3) = (mk_node(1), mk_node(2), mk_node(3));
    let two = desired_of(&n1, &[("node-2", &n2)]);
    let kernel = converge(&two, &empty_kernel());

    // node-3 joins: only its entries are added.
    let three = desired_of(&n1, &[("node-2", &n2), ("node-3", &n3)]);
    let ops = plan(&three, &kernel);
    assert_eq!(
        ops,
        [
            Op::ReplaceNeighbour(Neighbour {
                ip: ip("10.244.3.0"),
                mac: mac(3)
            }),
            Op::ReplaceFdb(Fdb {
                mac: mac(3),
                dst: ip("192.0.2.13")
            }),
            Op::ReplaceRoute(Route {
                dst: "10.244.3.0/24".parse().unwrap(),
                via: ip("10.244.3.0"),
                dev: Device::Vxlan,
                onlink: true
            }),
        ]
    );
    let kernel = kernel_after(&kernel, &ops);

    // node-2 moves to another underlay address: its FDB entry is replaced, nothing else.
    let mut moved = n2.clone();
    moved.underlay_address = "192.0.2.99".into();
    let changed = desired_of(&n1, &[("node-2", &moved), ("node-3", &n3)]);
    assert_eq!(
        plan(&changed, &kernel),
        [Op::ReplaceFdb(Fdb {
            mac: mac(2),
            dst: ip("192.0.2.99")
        })]
    );
    let kernel = converge(&changed, &kernel);

    // node-2 leaves: its route, neighbour and FDB entries go; node-3's stay.
    let left = desired_of(&n1, &[("node-3", &n3)]);
    let ops = plan(&left, &kernel);
    assert_eq!(
        ops,
        [
            Op::DelRoute(Route {
                dst: "10.244.2.0/24".parse().unwrap(),
                via: ip("10.244.2.0"),
                dev: Device::Vxlan,
                onlink: true
            }),
            Op::DelNeighbour(Neighbour {
                ip: ip("10.244.2.0"),
                mac: mac(2)
            }),
            Op::DelFdb(Fdb {
                mac: mac(2),
                dst: ip("192.0.2.99")
            }),
        ]
    );
    converge(&left, &kernel);
}

#[test]
fn device_attributes_change_in_place_or_by_recreation() {
    let (n1, n2) = (mk_node(1), mk_node(2));
    let d = desired_of(&n1, &[("node-2", &n2)]);
    let kernel = converge(&d, &empty_kernel());

    // MTU and MAC change in place.
    let mut m = n1.clone();
    m.mtu = Some(1400);
    m.vtep.as_mut().unwrap().mac = "0a:00:00:00:00:aa".into();
    let ops = plan(&desired_of(&m, &[("node-2", &n2)]), &kernel);
    assert_eq!(
        ops,
        [
            Op::SetVxlanMtu(1400),
            Op::SetVxlanMac(Mac([0x0a, 0, 0, 0, 0, 0xaa]))
        ]
    );

    // A new VNI needs a new device, and everything on it is programmed again.
    let mut v = n1.clone();
    v.vxlan = Some(VxlanConfig {
        vni: 42,
        port: 8472,
    });
    let dv = desired_of(&v, &[("node-2", &n2)]);
    let ops = plan(&dv, &kernel);
    assert_eq!(
        ops[0],
        Op::DeleteVxlan {
            reason: "VNI changed"
        }
    );
    assert!(matches!(&ops[1], Op::CreateVxlan(x) if x.vni == 42));
    assert!(
        ops.contains(&Op::ReplaceRoute(d.routes[0].clone())),
        "{}",
        show(&ops)
    );
    assert!(
        !ops.iter()
            .any(|o| matches!(o, Op::DelRoute(_) | Op::DelFdb(_) | Op::DelNeighbour(_))),
        "{}",
        show(&ops)
    );
    converge(&dv, &kernel);
}

#[test]
fn foreign_state_never_reaches_the_plan_and_stale_entries_on_our_device_go() {
    // `observed` holds only our routes (protocol) and entries on our device;
    // on our device, an entry nobody wants is removed.
    let (n1, n2) = (mk_node(1), mk_node(2));
    let d = desired_of(&n1, &[("node-2", &n2)]);
    let mut kernel = converge(&d, &empty_kernel());
    let stale = Fdb {
        mac: Mac([0; 6]),
        dst: ip("192.0.2.200"),
    };
    kernel.fdb.push(stale);
    assert_eq!(plan(&d, &kernel), [Op::DelFdb(stale)]);
}

#[test]
fn switching_to_native_routing_replaces_vxlan_routes_and_drops_the_device() {
    let (n1, n2) = (mk_node(1), mk_node(2));
    let d = desired_of(&n1, &[("node-2", &n2)]);
    let kernel = converge(&d, &empty_kernel());
    let (m1, m2) = (native(n1), native(n2));
    let nd = desired_of(&m1, &[("node-2", &m2)]);
    let ops = plan(&nd, &kernel);
    assert_eq!(
        ops,
        [
            Op::DeleteVxlan {
                reason: "not wanted in native routing"
            },
            Op::ReplaceRoute(Route {
                dst: "10.244.2.0/24".parse().unwrap(),
                via: ip("192.0.2.12"),
                dev: Device::Underlay(2),
                onlink: false
            }),
        ]
    );
    assert_eq!(nd.pod_mtu, 1500, "no encapsulation overhead");
    converge(&nd, &kernel);
}

#[test]
fn native_routing_reports_peers_that_are_not_adjacent() {
    let (n1, mut far) = (native(mk_node(1)), native(mk_node(2)));
    far.underlay_address = "198.51.100.7".into();
    let d = desired_of(&n1, &[("far", &far)]);
    assert!(d.routes.is_empty());
    assert_eq!(
        d.skipped[0].reason,
        SkipReason::NotDirectlyReachable(ip("198.51.100.7"))
    );
    assert!(
        d.skipped[0].to_string().contains("is on no subnet"),
        "{}",
        d.skipped[0]
    );
}

#[test]
fn bad_peers_are_skipped_without_harming_the_rest() {
    let n1 = mk_node(1);
    let good = mk_node(2);
    let mut no_vtep = mk_node(3);
    no_vtep.vtep = None;
    let mut bad_mac = mk_node(4);
    bad_mac.vtep.as_mut().unwrap().mac = "zz".into();
    let mut dup_mac = mk_node(5);
    dup_mac.vtep.as_mut().unwrap().mac = "0a:00:00:00:00:02".into();
    let mut overlapping = mk_node(6);
    overlapping.pod_cidrs = vec!["10.244.2.0/25".into()];
    let switching = native(mk_node(7));
    let mut multicast_mac = mk_node(9);
    multicast_mac.vtep.as_mut().unwrap().mac = "01:00:5e:00:00:09".into();
    let mut v6_underlay = mk_node(8);
    v6_underlay.underlay_address = "fd00::8".into();
    let d = desired_of(
        &n1,
        &[
            ("good", &good),
            ("no-vtep", &no_vtep),
            ("bad-mac", &bad_mac),
            ("dup-mac", &dup_mac),
            ("overlapping", &overlapping),
            ("switching", &switching),
            ("v6-underlay", &v6_underlay),
            ("multicast-mac", &multicast_mac),
        ],
    );
    let reasons: Vec<(&str, &SkipReason)> = d
        .skipped
        .iter()
        .map(|s| (s.peer.as_str(), &s.reason))
        .collect();
    assert_eq!(reasons.len(), 7, "{reasons:?}");
    assert!(matches!(reasons[0], ("no-vtep", SkipReason::NoVtep)));
    assert!(matches!(reasons[1], ("bad-mac", SkipReason::Invalid(_))));
    assert!(matches!(
        reasons[2],
        ("dup-mac", SkipReason::DuplicateMac(_))
    ));
    assert!(matches!(
        reasons[3],
        ("overlapping", SkipReason::OverlappingBlock(_))
    ));
    assert!(matches!(
        reasons[4],
        ("switching", SkipReason::OtherEncapsulation)
    ));
    assert!(matches!(
        reasons[5],
        ("v6-underlay", SkipReason::UnderlayFamily)
    ));
    assert_eq!(
        (d.peers_programmed, d.routes.len()),
        (1, 1),
        "the good peer is programmed"
    );
}

#[test]
fn an_unusable_own_spec_is_an_error_not_an_empty_datapath() {
    let mut n1 = mk_node(1);
    n1.underlay_address = "not-an-ip".into();
    assert!(desired("node-1", &n1, &[], &host()).is_err());
    let no_link = Host {
        underlay: None,
        underlay_networks: vec![],
    };
    let err = desired("node-1", &mk_node(1), &[], &no_link).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no link on this node holds the underlay address 192.0.2.11"
    );
}

#[test]
fn dual_stack_blocks_route_via_the_matching_vtep_family() {
    let mut n1 = mk_node(1);
    n1.pod_cidrs.push("fd00:10:244::100/120".into());
    n1.vtep.as_mut().unwrap().ipv6 = Some("fd00:10:244::100".into());
    let mut n2 = mk_node(2);
    n2.pod_cidrs.push("fd00:10:244::200/120".into());
    n2.vtep.as_mut().unwrap().ipv6 = Some("fd00:10:244::200".into());
    let d = desired_of(&n1, &[("node-2", &n2)]);
    let vias: Vec<(IpNet, IpAddr)> = d.routes.iter().map(|r| (r.dst, r.via)).collect();
    assert_eq!(
        vias,
        [
            ("10.244.2.0/24".parse().unwrap(), ip("10.244.2.0")),
            (
                "fd00:10:244::200/120".parse().unwrap(),
                ip("fd00:10:244::200")
            ),
        ]
    );
    assert_eq!(
        d.neighbours.len(),
        2,
        "one neighbour entry per VTEP address"
    );
    assert_eq!(d.fdb.len(), 1, "one FDB entry per peer");
    assert_eq!(d.vxlan.as_ref().unwrap().addresses.len(), 2);
}
