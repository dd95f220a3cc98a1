//! Which netlink notifications can change what the reconcile loop
//! observes. Pure.
//!
//! ```text
//!  notification ──▶ wakes(msg, interest) ──yes──▶ counter + 1 (the loop reconciles)
//!                                        └─no───▶ ignored (counted, nobody woken)
//! ```
//!
//! The loop observes (see [`crate::observe`]) its VXLAN device (by name),
//! the underlay link (the one holding the node's underlay address: its
//! index and MTU), the addresses of those two links, routes of protocol
//! [`RTPROT_TRELLIS`], and neighbour and FDB entries on its VXLAN device.
//! Everything else on the node (the pods' veths, their routes of protocol
//! 211 and neighbour entries, IPv6 link-local addresses and routes the
//! kernel adds to every new link, other plugins' bridges and ports) changes
//! nothing it sees, so waking it for those only costs full dumps.
//!
//! The indexes come from the loop's last observation ([`Interest`]); names
//! and the underlay address catch what indexes cannot know yet: a VXLAN
//! device created or recreated (by name), the underlay address appearing
//! on another link (by address). Until the loop has observed once, every
//! notification wakes it. A message this module does not recognise wakes
//! it too: filtering is an optimisation, never a reason to miss a change.

use std::net::IpAddr;

use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};

use crate::endpoint::naming;
use crate::model::{RTPROT_TRELLIS, VXLAN_DEVICE};

/// What the reconcile loop looks at, from its last observation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interest {
    /// Index of the VXLAN device, while it exists.
    pub vxlan: Option<u32>,
    /// Index of the underlay link, once found.
    pub underlay: Option<u32>,
    /// The node's underlay address (`NodeNetwork` `spec.underlayAddress`):
    /// the underlay link is the one holding it.
    pub underlay_address: Option<IpAddr>,
}

impl Interest {
    fn watched(&self, index: u32) -> bool {
        self.vxlan == Some(index) || self.underlay == Some(index)
    }
}

/// Whether a notification can change what the loop observes. `None`: the
/// loop has not observed yet, so everything counts.
pub fn wakes(msg: &NetlinkMessage<RouteNetlinkMessage>, interest: Option<&Interest>) -> bool {
    let (NetlinkPayload::InnerMessage(msg), Some(interest)) = (&msg.payload, interest) else {
        return true;
    };
    match msg {
        RouteNetlinkMessage::NewLink(l)
        | RouteNetlinkMessage::DelLink(l)
        | RouteNetlinkMessage::SetLink(l) => link_wakes(l, interest),
        RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
            interest.watched(a.header.index)
                || interest
                    .underlay_address
                    .is_some_and(|ip| address_of(a) == Some(ip))
        }
        // Whatever the table or device: the kernel reports a route of ours
        // it removed (an IPv6 one with its device) with our protocol too.
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
            u8::from(r.header.protocol) == RTPROT_TRELLIS
        }
        // Neighbour (IPv4, IPv6) and FDB (bridge family) entries alike.
        RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
            interest.vxlan == Some(n.header.ifindex)
        }
        _ => true,
    }
}

/// Our VXLAN device (by index or name) and the underlay link always count.
/// Not the pods' veths (ours by name, others by kind) nor bridge port
/// state (`AF_BRIDGE`, e.g. another plugin's bridge learning a port): the
/// loop observes neither. Any other link counts: such changes are rare,
/// and a link the loop does not know may be about to matter.
fn link_wakes(l: &LinkMessage, interest: &Interest) -> bool {
    if interest.watched(l.header.index) {
        return true;
    }
    let name = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    });
    if name == Some(VXLAN_DEVICE) {
        return true;
    }
    if l.header.interface_family == AddressFamily::Bridge {
        return false;
    }
    if name.is_some_and(|n| naming::is_host_veth(n) || naming::is_temp_peer(n)) {
        return false;
    }
    let veth = l.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
        _ => false,
    });
    !veth
}

/// `IFA_LOCAL`, else `IFA_ADDRESS` (as [`crate::observe`] reads them).
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

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::address::AddressMessage;
    use netlink_packet_route::link::LinkMessage;
    use netlink_packet_route::neighbour::NeighbourMessage;
    use netlink_packet_route::route::{RouteMessage, RouteProtocol};
    use rtnetlink::packet_core::NetlinkHeader;

    const VXLAN: u32 = 7;
    const UNDERLAY: u32 = 2;
    const OTHER: u32 = 40;

    fn interest() -> Interest {
        Interest {
            vxlan: Some(VXLAN),
            underlay: Some(UNDERLAY),
            underlay_address: Some("192.168.1.10".parse().expect("an address")),
        }
    }

    fn msg(m: RouteNetlinkMessage) -> NetlinkMessage<RouteNetlinkMessage> {
        NetlinkMessage::from(m)
    }

    fn link(index: u32, name: &str, kind: Option<InfoKind>) -> LinkMessage {
        let mut l = LinkMessage::default();
        l.header.index = index;
        l.attributes.push(LinkAttribute::IfName(name.into()));
        if let Some(kind) = kind {
            l.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]));
        }
        l
    }

    fn address(index: u32, ip: &str) -> AddressMessage {
        let mut a = AddressMessage::default();
        a.header.index = index;
        a.attributes
            .push(AddressAttribute::Address(ip.parse().expect("an address")));
        a
    }

    fn route(protocol: u8) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header.protocol = RouteProtocol::from(protocol);
        r
    }

    fn neighbour(family: AddressFamily, ifindex: u32) -> NeighbourMessage {
        let mut n = NeighbourMessage::default();
        n.header.family = family;
        n.header.ifindex = ifindex;
        n
    }

    fn wakes_now(m: RouteNetlinkMessage) -> bool {
        wakes(&msg(m), Some(&interest()))
    }

    #[test]
    fn the_pods_own_links_routes_and_neighbours_do_not_wake_the_loop() {
        use RouteNetlinkMessage::*;
        let ignored = [
            // Our host veths and an earlier version's temporary peer.
            NewLink(link(OTHER, "trellis3807c7d2", Some(InfoKind::Veth))),
            DelLink(link(OTHER, "trellis3807c7d2", Some(InfoKind::Veth))),
            NewLink(link(OTHER, "trellis3807c7d2", None)),
            DelLink(link(OTHER, "trltmp3807c7d2", None)),
            // Another plugin's veth, and its bridge port state.
            NewLink(link(OTHER, "veth1a2b3c4d", Some(InfoKind::Veth))),
            {
                let mut port = link(OTHER, "veth1a2b3c4d", None);
                port.header.interface_family = AddressFamily::Bridge;
                NewLink(port)
            },
            // The link-local address the kernel gives every new link.
            NewAddress(address(OTHER, "fe80::1")),
            DelAddress(address(OTHER, "10.98.0.1")),
            // A pod's route (protocol 211), the kernel's own, the
            // reference plugin's (boot).
            NewRoute(route(211)),
            DelRoute(route(211)),
            NewRoute(route(2)),
            DelRoute(route(3)),
            // The pods' neighbours and another bridge's FDB.
            NewNeighbour(neighbour(AddressFamily::Inet, OTHER)),
            DelNeighbour(neighbour(AddressFamily::Inet6, OTHER)),
            NewNeighbour(neighbour(AddressFamily::Bridge, OTHER)),
            // An entry on the underlay (the gateway's ARP) is not ours.
            NewNeighbour(neighbour(AddressFamily::Inet, UNDERLAY)),
        ];
        for m in ignored {
            assert!(!wakes_now(m.clone()), "{m:?}");
        }
    }

    #[test]
    fn what_the_loop_observes_wakes_it() {
        use RouteNetlinkMessage::*;
        let woken = [
            // The VXLAN device by name (created, recreated, deleted) and
            // by index (no name in the message).
            NewLink(link(OTHER, VXLAN_DEVICE, Some(InfoKind::Vxlan))),
            DelLink(link(VXLAN, VXLAN_DEVICE, Some(InfoKind::Vxlan))),
            NewLink(link(VXLAN, "", None)),
            // The underlay link, even a veth (as in the sandbox), and its
            // bridge port state.
            NewLink(link(UNDERLAY, "eth0", Some(InfoKind::Veth))),
            {
                let mut port = link(UNDERLAY, "eth0", None);
                port.header.interface_family = AddressFamily::Bridge;
                NewLink(port)
            },
            // Any other link that is no veth: rare, and it may matter.
            NewLink(link(OTHER, "eth1", None)),
            DelLink(link(OTHER, "bond0", Some(InfoKind::Bond))),
            // Addresses on our device and the underlay, and the underlay
            // address moving to another link.
            NewAddress(address(VXLAN, "10.244.1.0")),
            DelAddress(address(UNDERLAY, "192.168.1.10")),
            NewAddress(address(UNDERLAY, "fd00::10")),
            NewAddress(address(OTHER, "192.168.1.10")),
            // Our routes, added or deleted (drift repair).
            NewRoute(route(RTPROT_TRELLIS)),
            DelRoute(route(RTPROT_TRELLIS)),
            // Neighbour and FDB entries on our device.
            NewNeighbour(neighbour(AddressFamily::Inet, VXLAN)),
            DelNeighbour(neighbour(AddressFamily::Inet6, VXLAN)),
            DelNeighbour(neighbour(AddressFamily::Bridge, VXLAN)),
            // What this module does not know.
            NewRule(Default::default()),
        ];
        for m in woken {
            assert!(wakes_now(m.clone()), "{m:?}");
        }
    }

    #[test]
    fn before_the_first_observation_and_for_odd_payloads_everything_wakes() {
        let pod_route = msg(RouteNetlinkMessage::NewRoute(route(211)));
        assert!(wakes(&pod_route, None), "no interest known yet");
        assert!(!wakes(&pod_route, Some(&interest())));
        // Without a VXLAN device (encapsulation None) nothing is on it.
        let none = Interest {
            vxlan: None,
            ..interest()
        };
        let on_other = msg(RouteNetlinkMessage::NewNeighbour(neighbour(
            AddressFamily::Bridge,
            OTHER,
        )));
        assert!(!wakes(&on_other, Some(&none)));
        // Not an rtnetlink message at all (an error, an overrun notice).
        let odd = NetlinkMessage::<RouteNetlinkMessage>::new(
            NetlinkHeader::default(),
            NetlinkPayload::Noop,
        );
        assert!(wakes(&odd, Some(&interest())));
    }
}
