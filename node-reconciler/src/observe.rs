//! Netlink dumps → [`Observed`]: what the node's kernel holds of ours, and
//! the host facts `desired` needs.
//!
//! ```text
//!  RTM_GETLINK  ─▶ our device (by name) + the underlay link (by address) ─┐
//!  RTM_GETADDR  ─▶ VTEP addresses on our device, networks on the underlay ─┤
//!                  and every address of the node (for the policy engine) ──┤
//!  RTM_GETROUTE ─▶ main table, protocol RTPROT_TRELLIS only ───────────────┼─▶ Snapshot { observed, host, addresses }
//!  RTM_GETNEIGH ─▶ permanent entries on our device (IPv4, IPv6) ───────────┤
//!  RTM_GETNEIGH (bridge) ─▶ FDB entries on our device ─────────────────────┘
//! ```
//!
//! Everything is filtered here, by the ownership marks of [`crate::model`]:
//! another link, a route of another protocol or table, an entry on another
//! device never reaches `plan`, so nothing foreign is ever deleted. (The
//! node's addresses are facts, not state to converge: nothing plans them.)

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteVia,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::desired::Host;
use crate::model::{
    Device, Fdb, Mac, Neighbour, Observed, ObservedVxlan, RTPROT_TRELLIS, Route, UnderlayLink,
    VXLAN_DEVICE,
};

/// One observation of the node: its kernel state, filtered to ours, and the
/// host facts for `desired`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub observed: Observed,
    pub host: Host,
    /// Every address of the node's namespace but loopback, sorted, once
    /// each: the node's own, which the policy engine gives identity `HOST`
    /// (the reconcile loop publishes them, so that a pod's ADD needs no dump).
    pub addresses: Vec<IpAddr>,
}

/// A dump that failed (the observation is then unusable: planning from a
/// partial view would delete what was merely not seen).
#[derive(Debug, thiserror::Error)]
#[error("cannot dump {what}: {source}")]
pub struct ObserveError {
    pub what: &'static str,
    #[source]
    pub source: rtnetlink::Error,
}

fn dump_error(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> ObserveError {
    move |source| ObserveError { what, source }
}

/// Reads the node's links, addresses, routes, neighbour and FDB entries and
/// keeps what Trellis owns, plus the link holding `underlay_address`.
pub async fn observe(handle: &Handle, underlay_address: IpAddr) -> Result<Snapshot, ObserveError> {
    let links = dump_links(handle).await?;
    let addresses = dump_addresses(handle).await?;

    let ours = links.iter().find(|l| link_name(l) == Some(VXLAN_DEVICE));
    let our_index = ours.map(|l| l.header.index);

    let underlay_index = addresses
        .iter()
        .find(|a| address_of(a) == Some(underlay_address))
        .map(|a| a.header.index);
    let underlay = underlay_index.and_then(|index| {
        links
            .iter()
            .find(|l| l.header.index == index)
            .map(|l| UnderlayLink {
                index,
                mtu: link_mtu(l),
            })
    });
    let underlay_networks = match underlay_index {
        Some(index) => addresses
            .iter()
            .filter(|a| a.header.index == index && is_global(a))
            .filter_map(network_of)
            .map(|n| n.trunc())
            .collect(),
        None => Vec::new(),
    };

    let vxlan = ours.map(|link| {
        let mut v = vxlan_of(link);
        v.addresses = addresses
            .iter()
            // The kernel's IPv6 link-local address is not one we manage.
            .filter(|a| a.header.index == link.header.index && is_global(a))
            .filter_map(network_of)
            .collect();
        v.addresses.sort();
        v
    });

    let mut observed = Observed {
        vxlan,
        underlay,
        ..Observed::default()
    };
    observed.routes = dump_routes(handle, our_index).await?;
    if let Some(index) = our_index {
        observed.neighbours = dump_neighbours(handle, index).await?;
        observed.fdb = dump_fdb(handle, index).await?;
    }
    Ok(Snapshot {
        observed,
        host: Host {
            underlay,
            underlay_networks,
        },
        addresses: node_addresses(&addresses),
    })
}

/// The node's own addresses alone (see [`Snapshot::addresses`]), for the
/// policy engine until the reconcile loop has observed once.
pub async fn dump_node_addresses(handle: &Handle) -> Result<Vec<IpAddr>, ObserveError> {
    Ok(node_addresses(&dump_addresses(handle).await?))
}

/// Every `IFA_ADDRESS` of the dump but loopback, sorted, once each.
fn node_addresses(addresses: &[AddressMessage]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = addresses
        .iter()
        .flat_map(|m| &m.attributes)
        .filter_map(|a| match a {
            AddressAttribute::Address(ip) if !ip.is_loopback() => Some(*ip),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

async fn dump_links(handle: &Handle) -> Result<Vec<LinkMessage>, ObserveError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(dump_error("links"))
}

async fn dump_addresses(handle: &Handle) -> Result<Vec<AddressMessage>, ObserveError> {
    handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(dump_error("addresses"))
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_mtu(link: &LinkMessage) -> u32 {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(0)
}

/// Our device's attributes. A link with our name that is no VXLAN device
/// has no VNI, so `plan` recreates it.
fn vxlan_of(link: &LinkMessage) -> ObservedVxlan {
    let mut v = ObservedVxlan {
        index: link.header.index,
        vni: None,
        port: None,
        local: None,
        underlay_index: None,
        // The kernel always reports learning; if it did not, assuming it on
        // makes `plan` recreate the device rather than trust it.
        learning: true,
        mac: None,
        mtu: link_mtu(link),
        up: link.header.flags.contains(LinkFlags::Up),
        addresses: Vec::new(),
    };
    for attr in &link.attributes {
        match attr {
            LinkAttribute::Address(bytes) => v.mac = mac_of(bytes),
            LinkAttribute::LinkInfo(infos) => {
                let is_vxlan = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)));
                for info in infos {
                    if let (true, LinkInfo::Data(InfoData::Vxlan(data))) = (is_vxlan, info) {
                        for d in data {
                            match d {
                                InfoVxlan::Id(id) => v.vni = Some(*id),
                                InfoVxlan::Port(p) => v.port = Some(*p),
                                InfoVxlan::Local(a) => v.local = Some(IpAddr::V4(*a)),
                                InfoVxlan::Local6(a) => v.local = Some(IpAddr::V6(*a)),
                                InfoVxlan::Link(i) => v.underlay_index = Some(*i),
                                InfoVxlan::Learning(l) => v.learning = *l,
                                _ => {}
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    v
}

fn mac_of(bytes: &[u8]) -> Option<Mac> {
    <[u8; 6]>::try_from(bytes).ok().map(Mac)
}

/// The address itself: `IFA_LOCAL` (on point-to-point links `IFA_ADDRESS`
/// is the peer's), else `IFA_ADDRESS` (IPv6 sends only that).
fn address_of(a: &AddressMessage) -> Option<IpAddr> {
    let local = a.attributes.iter().find_map(|x| match x {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

fn network_of(a: &AddressMessage) -> Option<IpNet> {
    IpNet::new(address_of(a)?, a.header.prefix_len).ok()
}

fn is_global(a: &AddressMessage) -> bool {
    a.header.scope == AddressScope::Universe
}

/// Routes of the main table with our protocol, IPv4 and IPv6.
async fn dump_routes(handle: &Handle, our_index: Option<u32>) -> Result<Vec<Route>, ObserveError> {
    let mut routes = Vec::new();
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let messages: Vec<RouteMessage> = handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(dump_error("routes"))?;
        routes.extend(
            messages
                .iter()
                .filter(|m| is_ours(m))
                .filter_map(|m| route_of(m, our_index)),
        );
    }
    routes.sort();
    Ok(routes)
}

fn is_ours(m: &RouteMessage) -> bool {
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    table == u32::from(RouteHeader::RT_TABLE_MAIN) && u8::from(m.header.protocol) == RTPROT_TRELLIS
}

/// A route of ours as the model sees it. One we cannot have written (no
/// gateway, several next hops) still counts, with an unspecified gateway and
/// no device, so `plan` replaces or deletes it rather than keeping it.
fn route_of(m: &RouteMessage, our_index: Option<u32>) -> Option<Route> {
    let v6 = m.header.address_family == AddressFamily::Inet6;
    let unspecified = if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let mut dst = unspecified;
    let mut via = None;
    let mut oif = None;
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst = route_ip(a)?,
            RouteAttribute::Gateway(a) => via = route_ip(a),
            RouteAttribute::Via(RouteVia::Inet(a)) => via = Some(IpAddr::V4(*a)),
            RouteAttribute::Via(RouteVia::Inet6(a)) => via = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let dst = IpNet::new(dst, m.header.destination_prefix_length).ok()?;
    let dev = match oif {
        Some(i) if Some(i) == our_index => Device::Vxlan,
        Some(i) => Device::Underlay(i),
        None => Device::Underlay(0),
    };
    Some(Route {
        dst,
        via: via.unwrap_or(unspecified),
        dev,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
    })
}

pub(crate) fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Permanent neighbour entries on our device. The kernel adds others by
/// itself (incomplete, failed, multicast), which are not ours to delete.
async fn dump_neighbours(handle: &Handle, index: u32) -> Result<Vec<Neighbour>, ObserveError> {
    permanent_neighbours(handle, index)
        .await
        .map_err(dump_error("neighbours"))
}

/// Permanent IPv4 and IPv6 neighbour entries on link `index`, sorted; also
/// what the endpoint service reads back on a pod's interfaces.
pub(crate) async fn permanent_neighbours(
    handle: &Handle,
    index: u32,
) -> Result<Vec<Neighbour>, rtnetlink::Error> {
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let messages: Vec<NeighbourMessage> = handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await?;
        out.extend(
            messages
                .iter()
                .filter(|m| {
                    m.header.ifindex == index && m.header.state == NeighbourState::Permanent
                })
                .filter_map(|m| {
                    let ip = m.attributes.iter().find_map(|a| match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                            Some(IpAddr::V4(*v4))
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                            Some(IpAddr::V6(*v6))
                        }
                        _ => None,
                    })?;
                    Some(Neighbour {
                        ip,
                        mac: lladdr_of(m)?,
                    })
                }),
        );
    }
    out.sort();
    Ok(out)
}

fn lladdr_of(m: &NeighbourMessage) -> Option<Mac> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => mac_of(b),
        _ => None,
    })
}

/// The VXLAN device's own forwarding entries (`NTF_SELF`) with a remote.
/// The dump of a device without its own FDB also lists its unicast and
/// multicast address filters, which have no remote and are not ours.
async fn dump_fdb(handle: &Handle, index: u32) -> Result<Vec<Fdb>, ObserveError> {
    let messages: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(dump_error("FDB entries"))?;
    let mut out: Vec<Fdb> = messages
        .iter()
        .filter(|m| m.header.ifindex == index && m.header.flags.contains(NeighbourFlags::Own))
        .filter_map(|m| {
            let dst = m.attributes.iter().find_map(|a| match a {
                // In the bridge family the kernel's NDA_DST is a bare address.
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => ip_of(b),
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    Some(IpAddr::V6(*v6))
                }
                _ => None,
            })?;
            Some(Fdb {
                mac: lladdr_of(m)?,
                dst,
            })
        })
        .collect();
    out.sort();
    // The kernel lists an entry once per remote, and the all-zeros and
    // multicast MACs (flood lists) can have several. The model has one
    // remote per MAC, so such a MAC shows once, with a remote that is never
    // wanted (unspecified), and `plan` deletes the whole entry.
    out.dedup_by(|next, kept| {
        if next.mac != kept.mac {
            return false;
        }
        kept.dst = match kept.dst {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        true
    });
    Ok(out)
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(b) = <[u8; 4]>::try_from(bytes) {
        Some(IpAddr::from(b))
    } else {
        <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from)
    }
}
