//! The kernel state a node should have, from its own `NodeNetwork`, its
//! peers' `NodeNetwork`s and the facts about its underlay link. Pure.
//!
//! VXLAN (the Flannel model): one device; per remote block an onlink route
//! via the peer's VTEP address; a permanent neighbour entry (peer VTEP
//! address → peer VTEP MAC) and a permanent FDB entry (peer VTEP MAC → peer
//! underlay address). Native routing: per remote block a route via the peer's
//! underlay address on the underlay link.
//!
//! A peer that cannot be programmed (no VTEP, another encapsulation during a
//! switch, an underlay of the other family, not directly reachable) is
//! skipped and reported; it never makes the node's own state wrong.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use trellis_api::v1alpha1::{Encapsulation, NodeNetworkSpec};

use crate::model::{
    Device, Fdb, Mac, Neighbour, Route, UnderlayLink, VXLAN_OVERHEAD_V4, VXLAN_OVERHEAD_V6, Vxlan,
};

/// Everything the node should have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub encapsulation: Option<Encapsulation>,
    /// The VXLAN device, in VXLAN mode.
    pub vxlan: Option<Vxlan>,
    /// Sorted by destination, one per destination.
    pub routes: Vec<Route>,
    /// Sorted, one per address.
    pub neighbours: Vec<Neighbour>,
    /// Sorted, one per MAC.
    pub fdb: Vec<Fdb>,
    /// Pod interface MTU.
    pub pod_mtu: u32,
    /// Peers whose blocks are all programmed (peers without any block yet
    /// are neither programmed nor skipped).
    pub peers_programmed: usize,
    /// The peer each route leads to, by destination (for status: which
    /// peers a failed route or entry affects).
    pub route_owners: BTreeMap<IpNet, String>,
    /// Peers (or some of their blocks) left out, and why.
    pub skipped: Vec<Skipped>,
}

/// A peer, or one of its blocks, that is not programmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub peer: String,
    pub reason: SkipReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// The peer's spec says another encapsulation (a switch in progress).
    OtherEncapsulation,
    /// The peer has no VTEP (MAC, or an address of a block's family).
    NoVtep,
    /// A field of the peer's spec does not parse.
    Invalid(String),
    /// The peer's underlay address is of another family than ours.
    UnderlayFamily,
    /// Native routing: the peer's underlay address is on no subnet of our
    /// underlay link, so it is not L2-adjacent.
    NotDirectlyReachable(IpAddr),
    /// The peer's VTEP MAC is another node's too.
    DuplicateMac(Mac),
    /// The block overlaps ours or an earlier peer's.
    OverlappingBlock(IpNet),
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let peer = &self.peer;
        match &self.reason {
            SkipReason::OtherEncapsulation => write!(f, "{peer}: uses another encapsulation"),
            SkipReason::NoVtep => write!(f, "{peer}: no VTEP for some of its blocks"),
            SkipReason::Invalid(why) => write!(f, "{peer}: {why}"),
            SkipReason::UnderlayFamily => {
                write!(f, "{peer}: underlay address of another IP family")
            }
            SkipReason::NotDirectlyReachable(ip) => {
                write!(
                    f,
                    "{peer}: underlay address {ip} is on no subnet of this node's underlay link"
                )
            }
            SkipReason::DuplicateMac(mac) => {
                write!(f, "{peer}: VTEP MAC {mac} is also another node's")
            }
            SkipReason::OverlappingBlock(block) => {
                write!(f, "{peer}: block {block} overlaps another")
            }
        }
    }
}

/// Why no desired state can be computed for the node itself (the reconcile
/// then changes nothing and reports this).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DesiredError {
    #[error("spec.underlayAddress {0:?} is not an IP address")]
    Underlay(String),
    #[error("no link on this node holds the underlay address {0}")]
    NoUnderlayLink(IpAddr),
    #[error("spec.vtep is missing in VXLAN mode")]
    NoVtep,
    #[error("spec.vtep.mac: {0}")]
    VtepMac(String),
    #[error("spec.vtep address {0:?} is not an IP address")]
    VtepAddress(String),
    #[error("spec.podCIDRs entry {0:?} is not a CIDR")]
    PodCidr(String),
    #[error("spec.vxlan {0} is out of range")]
    VxlanRange(&'static str),
}

/// Facts about the node that come from its kernel, not its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub underlay: Option<UnderlayLink>,
    /// Networks configured on the underlay link (for the native-routing
    /// adjacency check).
    pub underlay_networks: Vec<IpNet>,
}

/// The desired state of node `own_name`.
pub fn desired(
    own_name: &str,
    own: &NodeNetworkSpec,
    peers: &[(&str, &NodeNetworkSpec)],
    host: &Host,
) -> Result<Desired, DesiredError> {
    let local: IpAddr = own
        .underlay_address
        .parse()
        .map_err(|_| DesiredError::Underlay(own.underlay_address.clone()))?;
    let underlay = host.underlay.ok_or(DesiredError::NoUnderlayLink(local))?;
    let own_blocks: Vec<IpNet> = own
        .pod_cidrs
        .iter()
        .map(|c| {
            c.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| DesiredError::PodCidr(c.clone()))
        })
        .collect::<Result<_, _>>()?;
    let overhead = match local {
        IpAddr::V4(_) => VXLAN_OVERHEAD_V4,
        IpAddr::V6(_) => VXLAN_OVERHEAD_V6,
    };

    let mut out = Desired {
        encapsulation: Some(own.encapsulation),
        ..Desired::default()
    };
    let mut taken = Taken::default();
    for block in &own_blocks {
        taken.insert(block);
    }
    let mut routes: BTreeMap<IpNet, Route> = BTreeMap::new();
    let mut route_owners: BTreeMap<IpNet, String> = BTreeMap::new();
    let mut neighbours: BTreeMap<IpAddr, Neighbour> = BTreeMap::new();
    let mut fdb: BTreeMap<Mac, Fdb> = BTreeMap::new();

    match own.encapsulation {
        Encapsulation::Vxlan => {
            let vtep = own.vtep.as_ref().ok_or(DesiredError::NoVtep)?;
            let mac: Mac = vtep.mac.parse().map_err(DesiredError::VtepMac)?;
            let mut addresses = Vec::new();
            for addr in [&vtep.ipv4, &vtep.ipv6].into_iter().flatten() {
                let ip: IpAddr = addr
                    .parse()
                    .map_err(|_| DesiredError::VtepAddress(addr.clone()))?;
                addresses.push(IpNet::from(ip));
            }
            let cfg = own.vxlan.unwrap_or_default();
            let vni = u32::try_from(cfg.vni).map_err(|_| DesiredError::VxlanRange("vni"))?;
            let port = u16::try_from(cfg.port).map_err(|_| DesiredError::VxlanRange("port"))?;
            let mtu = own
                .mtu
                .and_then(|m| u32::try_from(m).ok())
                .unwrap_or(underlay.mtu.saturating_sub(overhead));
            out.pod_mtu = mtu;
            out.vxlan = Some(Vxlan {
                vni,
                port,
                local,
                underlay_index: underlay.index,
                mac,
                mtu,
                addresses,
            });

            for (peer, spec) in peers.iter().filter(|(name, _)| *name != own_name) {
                let mut skip = |reason| {
                    out.skipped.push(Skipped {
                        peer: (*peer).to_owned(),
                        reason,
                    })
                };
                // Nothing to route to yet (waiting for a block): not a
                // peer to program, and nothing wrong with it.
                if spec.pod_cidrs.is_empty() {
                    continue;
                }
                if spec.encapsulation != Encapsulation::Vxlan {
                    skip(SkipReason::OtherEncapsulation);
                    continue;
                }
                let Some(pvtep) = spec.vtep.as_ref() else {
                    skip(SkipReason::NoVtep);
                    continue;
                };
                let (pmac, punderlay) = match (
                    pvtep.mac.parse::<Mac>(),
                    spec.underlay_address.parse::<IpAddr>(),
                ) {
                    (Ok(m), Ok(u)) => (m, u),
                    (Err(e), _) => {
                        skip(SkipReason::Invalid(format!("spec.vtep.mac: {e}")));
                        continue;
                    }
                    (_, Err(_)) => {
                        skip(SkipReason::Invalid(format!(
                            "spec.underlayAddress {:?}",
                            spec.underlay_address
                        )));
                        continue;
                    }
                };
                if punderlay.is_ipv4() != local.is_ipv4() {
                    skip(SkipReason::UnderlayFamily);
                    continue;
                }
                // The kernel refuses to manage an FDB entry for these.
                if pmac.0 == [0; 6] || pmac.0[0] & 1 == 1 {
                    skip(SkipReason::Invalid(format!(
                        "spec.vtep.mac {pmac} is not a unicast address"
                    )));
                    continue;
                }
                if pmac == mac || fdb.contains_key(&pmac) {
                    skip(SkipReason::DuplicateMac(pmac));
                    continue;
                }
                let pvtep4 = pvtep.ipv4.as_deref().and_then(|a| a.parse::<IpAddr>().ok());
                let pvtep6 = pvtep.ipv6.as_deref().and_then(|a| a.parse::<IpAddr>().ok());
                let mut complete = true;
                let mut any = false;
                for block in peer_blocks(spec, &mut complete, &mut skip) {
                    let via = if block.addr().is_ipv4() {
                        pvtep4
                    } else {
                        pvtep6
                    };
                    let Some(via) = via else {
                        complete = false;
                        skip(SkipReason::NoVtep);
                        continue;
                    };
                    if !taken.insert(&block) {
                        complete = false;
                        skip(SkipReason::OverlappingBlock(block));
                        continue;
                    }
                    routes.insert(
                        block,
                        Route {
                            dst: block,
                            via,
                            dev: Device::Vxlan,
                            onlink: true,
                        },
                    );
                    route_owners.insert(block, (*peer).to_owned());
                    neighbours.insert(via, Neighbour { ip: via, mac: pmac });
                    any = true;
                }
                if any {
                    fdb.insert(
                        pmac,
                        Fdb {
                            mac: pmac,
                            dst: punderlay,
                        },
                    );
                }
                if complete {
                    out.peers_programmed += 1;
                }
            }
        }
        Encapsulation::None => {
            out.pod_mtu = own
                .mtu
                .and_then(|m| u32::try_from(m).ok())
                .unwrap_or(underlay.mtu);
            for (peer, spec) in peers.iter().filter(|(name, _)| *name != own_name) {
                let mut skip = |reason| {
                    out.skipped.push(Skipped {
                        peer: (*peer).to_owned(),
                        reason,
                    })
                };
                // Nothing to route to yet (waiting for a block): not a
                // peer to program, and nothing wrong with it.
                if spec.pod_cidrs.is_empty() {
                    continue;
                }
                if spec.encapsulation != Encapsulation::None {
                    skip(SkipReason::OtherEncapsulation);
                    continue;
                }
                let Ok(via) = spec.underlay_address.parse::<IpAddr>() else {
                    skip(SkipReason::Invalid(format!(
                        "spec.underlayAddress {:?}",
                        spec.underlay_address
                    )));
                    continue;
                };
                if !host.underlay_networks.iter().any(|n| n.contains(&via)) {
                    skip(SkipReason::NotDirectlyReachable(via));
                    continue;
                }
                let mut complete = true;
                for block in peer_blocks(spec, &mut complete, &mut skip) {
                    // A gateway must be of the route's family.
                    if block.addr().is_ipv4() != via.is_ipv4() {
                        complete = false;
                        skip(SkipReason::UnderlayFamily);
                        continue;
                    }
                    if !taken.insert(&block) {
                        complete = false;
                        skip(SkipReason::OverlappingBlock(block));
                        continue;
                    }
                    routes.insert(
                        block,
                        Route {
                            dst: block,
                            via,
                            dev: Device::Underlay(underlay.index),
                            onlink: false,
                        },
                    );
                    route_owners.insert(block, (*peer).to_owned());
                }
                if complete {
                    out.peers_programmed += 1;
                }
            }
        }
    }
    out.routes = routes.into_values().collect();
    out.route_owners = route_owners;
    out.neighbours = neighbours.into_values().collect();
    out.fdb = fdb.into_values().collect();
    Ok(out)
}

/// Blocks accepted so far, as disjoint address ranges per family, so an
/// overlap check costs O(log n) rather than a scan (5,000 peers).
#[derive(Default)]
struct Taken {
    /// (is IPv6, first address) → last address.
    ranges: BTreeMap<(bool, u128), u128>,
}

impl Taken {
    /// Adds `net` unless it overlaps a block already taken; says whether it did.
    fn insert(&mut self, net: &IpNet) -> bool {
        let (v6, first, last) = match net {
            IpNet::V4(n) => (
                false,
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
            ),
            IpNet::V6(n) => (true, u128::from(n.network()), u128::from(n.broadcast())),
        };
        // Ranges are disjoint, so only the last one starting at or before
        // `last` can overlap.
        if let Some((&(f, _), &end)) = self.ranges.range(..=(v6, last)).next_back()
            && f == v6
            && end >= first
        {
            return false;
        }
        self.ranges.insert((v6, first), last);
        true
    }
}

/// A peer's blocks; unparsable ones are skipped and reported.
fn peer_blocks(
    spec: &NodeNetworkSpec,
    complete: &mut bool,
    skip: &mut impl FnMut(SkipReason),
) -> Vec<IpNet> {
    spec.pod_cidrs
        .iter()
        .filter_map(|c| match c.parse::<IpNet>() {
            Ok(n) => Some(n.trunc()),
            Err(_) => {
                *complete = false;
                skip(SkipReason::Invalid(format!("spec.podCIDRs entry {c:?}")));
                None
            }
        })
        .collect()
}
