//! desired × observed → the kernel operations that make them equal. Pure.
//!
//! Only what differs becomes an op, so a converged node plans nothing and
//! its reconcile issues no netlink writes. Existing objects that already
//! match are adopted as they are (a restarted agent flushes nothing).
//! Objects that are not ours never reach `plan`: `observed` keeps only our
//! device, routes with our protocol, and entries on our device.
//!
//! Order: the device first (created or recreated before anything refers to
//! it), then its addresses, then neighbour and FDB entries before the routes
//! that need them, then removals, routes first.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::desired::Desired;
use crate::model::{
    Device, Fdb, Mac, Neighbour, Observed, ObservedVxlan, Route, VXLAN_DEVICE, Vxlan,
};

/// One kernel operation. Replaces are idempotent (`NLM_F_REPLACE`);
/// deleting something already gone is success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create the VXLAN device (learning off) and set it up.
    CreateVxlan(Vxlan),
    /// Delete the VXLAN device (its addresses, entries and routes go with it).
    DeleteVxlan {
        reason: &'static str,
    },
    SetVxlanMtu(u32),
    SetVxlanMac(Mac),
    SetVxlanUp,
    AddAddress(IpNet),
    DelAddress(IpNet),
    ReplaceNeighbour(Neighbour),
    DelNeighbour(Neighbour),
    ReplaceFdb(Fdb),
    DelFdb(Fdb),
    ReplaceRoute(Route),
    DelRoute(Route),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dev = VXLAN_DEVICE;
        match self {
            Op::CreateVxlan(v) => write!(
                f,
                "create {dev} vni {} dstport {} local {} dev#{} mac {} mtu {} nolearning",
                v.vni, v.port, v.local, v.underlay_index, v.mac, v.mtu
            ),
            Op::DeleteVxlan { reason } => write!(f, "delete {dev} ({reason})"),
            Op::SetVxlanMtu(mtu) => write!(f, "set {dev} mtu {mtu}"),
            Op::SetVxlanMac(mac) => write!(f, "set {dev} address {mac}"),
            Op::SetVxlanUp => write!(f, "set {dev} up"),
            Op::AddAddress(a) => write!(f, "add address {a} dev {dev}"),
            Op::DelAddress(a) => write!(f, "delete address {a} dev {dev}"),
            Op::ReplaceNeighbour(n) => write!(
                f,
                "replace neighbour {} lladdr {} dev {dev} permanent",
                n.ip, n.mac
            ),
            Op::DelNeighbour(n) => write!(f, "delete neighbour {} dev {dev}", n.ip),
            Op::ReplaceFdb(e) => {
                write!(f, "replace fdb {} dst {} dev {dev} permanent", e.mac, e.dst)
            }
            Op::DelFdb(e) => write!(f, "delete fdb {} dst {} dev {dev}", e.mac, e.dst),
            Op::ReplaceRoute(r) => write!(f, "replace route {}", RouteDisplay(r)),
            Op::DelRoute(r) => write!(f, "delete route {}", RouteDisplay(r)),
        }
    }
}

struct RouteDisplay<'a>(&'a Route);

impl fmt::Display for RouteDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        let dev = match r.dev {
            Device::Vxlan => VXLAN_DEVICE.to_owned(),
            Device::Underlay(i) => format!("dev#{i}"),
        };
        write!(
            f,
            "{} via {} dev {dev}{}",
            r.dst,
            r.via,
            if r.onlink { " onlink" } else { "" }
        )
    }
}

/// The ops that turn `observed` into `desired`.
pub fn plan(desired: &Desired, observed: &Observed) -> Vec<Op> {
    let mut ops = Vec::new();
    // Whether the device (and so everything on it) is new in this plan.
    let mut fresh_device = false;

    match (&desired.vxlan, &observed.vxlan) {
        (None, None) => {}
        (None, Some(_)) => ops.push(Op::DeleteVxlan {
            reason: "not wanted in native routing",
        }),
        (Some(want), None) => {
            ops.push(Op::CreateVxlan(want.clone()));
            fresh_device = true;
        }
        (Some(want), Some(have)) => match immutable_mismatch(want, have) {
            Some(reason) => {
                ops.push(Op::DeleteVxlan { reason });
                ops.push(Op::CreateVxlan(want.clone()));
                fresh_device = true;
            }
            None => {
                if have.mtu != want.mtu {
                    ops.push(Op::SetVxlanMtu(want.mtu));
                }
                if have.mac != Some(want.mac) {
                    ops.push(Op::SetVxlanMac(want.mac));
                }
                if !have.up {
                    ops.push(Op::SetVxlanUp);
                }
            }
        },
    }

    // Entries on the device: a fresh device has none.
    let on_device = |v: &Observed| !fresh_device && v.vxlan.is_some();
    let have_addresses: BTreeSet<IpNet> = match &observed.vxlan {
        Some(v) if on_device(observed) => v.addresses.iter().copied().collect(),
        _ => BTreeSet::new(),
    };
    let have_neighbours: BTreeMap<IpAddr, Neighbour> = if on_device(observed) {
        observed.neighbours.iter().map(|n| (n.ip, *n)).collect()
    } else {
        BTreeMap::new()
    };
    let have_fdb: BTreeMap<Mac, Fdb> = if on_device(observed) {
        observed.fdb.iter().map(|e| (e.mac, *e)).collect()
    } else {
        BTreeMap::new()
    };
    // Routes through a device that is (re)created in this plan are gone with it.
    let device_dropped = fresh_device || desired.vxlan.is_none();
    let have_routes: BTreeMap<IpNet, Route> = observed
        .routes
        .iter()
        .filter(|r| !(device_dropped && r.dev == Device::Vxlan))
        .map(|r| (r.dst, r.clone()))
        .collect();

    if let Some(want) = &desired.vxlan {
        let want_addresses: BTreeSet<IpNet> = want.addresses.iter().copied().collect();
        ops.extend(
            want_addresses
                .difference(&have_addresses)
                .map(|a| Op::AddAddress(*a)),
        );
        ops.extend(
            have_addresses
                .difference(&want_addresses)
                .map(|a| Op::DelAddress(*a)),
        );
    }
    for n in &desired.neighbours {
        if have_neighbours.get(&n.ip) != Some(n) {
            ops.push(Op::ReplaceNeighbour(*n));
        }
    }
    for e in &desired.fdb {
        if have_fdb.get(&e.mac) != Some(e) {
            ops.push(Op::ReplaceFdb(*e));
        }
    }
    for r in &desired.routes {
        if have_routes.get(&r.dst) != Some(r) {
            ops.push(Op::ReplaceRoute(r.clone()));
        }
    }

    let want_routes: BTreeSet<IpNet> = desired.routes.iter().map(|r| r.dst).collect();
    ops.extend(
        have_routes
            .values()
            .filter(|r| !want_routes.contains(&r.dst))
            .map(|r| Op::DelRoute(r.clone())),
    );
    if desired.vxlan.is_some() {
        let want_ips: BTreeSet<IpAddr> = desired.neighbours.iter().map(|n| n.ip).collect();
        ops.extend(
            have_neighbours
                .values()
                .filter(|n| !want_ips.contains(&n.ip))
                .map(|n| Op::DelNeighbour(*n)),
        );
        let want_macs: BTreeSet<Mac> = desired.fdb.iter().map(|e| e.mac).collect();
        ops.extend(
            have_fdb
                .values()
                .filter(|e| !want_macs.contains(&e.mac))
                .map(|e| Op::DelFdb(*e)),
        );
    }
    ops
}

/// The interface index [`kernel_after`] gives a device it creates.
pub const MODEL_INDEX: u32 = 7;

/// What a kernel holds after `ops` ran on `before`: the model of the kernel
/// that tests and benchmarks check plans against ("plan, apply, plan again
/// plans nothing") without one. Deleting the device takes its entries and
/// routes with it, as in the kernel; an op on a device that does not exist
/// changes nothing (the kernel would refuse it). A created device gets index
/// [`MODEL_INDEX`].
pub fn kernel_after(before: &Observed, ops: &[Op]) -> Observed {
    let mut k = before.clone();
    for op in ops {
        match op {
            Op::CreateVxlan(v) => {
                k.vxlan = Some(ObservedVxlan {
                    index: MODEL_INDEX,
                    vni: Some(v.vni),
                    port: Some(v.port),
                    local: Some(v.local),
                    underlay_index: Some(v.underlay_index),
                    learning: false,
                    mac: Some(v.mac),
                    mtu: v.mtu,
                    up: true,
                    addresses: vec![],
                });
            }
            Op::DeleteVxlan { .. } => {
                k.vxlan = None;
                k.neighbours.clear();
                k.fdb.clear();
                k.routes.retain(|r| r.dev != Device::Vxlan);
            }
            Op::SetVxlanMtu(m) => {
                if let Some(v) = k.vxlan.as_mut() {
                    v.mtu = *m;
                }
            }
            Op::SetVxlanMac(m) => {
                if let Some(v) = k.vxlan.as_mut() {
                    v.mac = Some(*m);
                }
            }
            Op::SetVxlanUp => {
                if let Some(v) = k.vxlan.as_mut() {
                    v.up = true;
                }
            }
            Op::AddAddress(a) => {
                if let Some(v) = k.vxlan.as_mut() {
                    v.addresses.push(*a);
                }
            }
            Op::DelAddress(a) => {
                if let Some(v) = k.vxlan.as_mut() {
                    v.addresses.retain(|x| x != a);
                }
            }
            Op::ReplaceNeighbour(n) => {
                k.neighbours.retain(|x| x.ip != n.ip);
                k.neighbours.push(*n);
            }
            Op::DelNeighbour(n) => k.neighbours.retain(|x| x.ip != n.ip),
            Op::ReplaceFdb(e) => {
                k.fdb.retain(|x| x.mac != e.mac);
                k.fdb.push(*e);
            }
            Op::DelFdb(e) => k.fdb.retain(|x| x.mac != e.mac),
            Op::ReplaceRoute(r) => {
                k.routes.retain(|x| x.dst != r.dst);
                k.routes.push(r.clone());
            }
            Op::DelRoute(r) => k.routes.retain(|x| x.dst != r.dst),
        }
    }
    k
}

/// Attributes the kernel cannot change on a live VXLAN device.
fn immutable_mismatch(want: &Vxlan, have: &ObservedVxlan) -> Option<&'static str> {
    if have.vni != Some(want.vni) {
        Some("VNI changed")
    } else if have.port != Some(want.port) {
        Some("UDP port changed")
    } else if have.local != Some(want.local) {
        Some("underlay address changed")
    } else if have.underlay_index != Some(want.underlay_index) {
        Some("underlay link changed")
    } else if have.learning {
        Some("learning is on")
    } else {
        None
    }
}
