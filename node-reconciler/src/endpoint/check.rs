//! CHECK: the kernel as found against the endpoint record. Pure.
//!
//! ```text
//!  PodView  (pod namespace: interface, addresses, default routes, neighbours) ─┐
//!  HostView (node namespace: host veth, protocol-211 routes, neighbours) ──────┼─▶ differences ─▶ ["what differs", …]
//!  Record ─────────────────────────────────────────────────────────────────────┘
//! ```

use std::net::IpAddr;

use ipnet::IpNet;
use trellis_cni::proto::{Endpoint, RTPROT_TRELLIS_ENDPOINT};

use super::record::Record;
use crate::model::Mac;

/// A link as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkView {
    pub index: u32,
    pub mac: Option<Mac>,
    pub mtu: u32,
    pub up: bool,
}

/// The attachment's interface in the pod's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodView {
    pub link: Option<LinkView>,
    /// Its global addresses.
    pub addresses: Vec<IpNet>,
    /// Gateways of the main table's default routes through it.
    pub default_gateways: Vec<IpAddr>,
    /// Its permanent neighbour entries.
    pub neighbours: Vec<(IpAddr, Mac)>,
}

/// The host veth in the node's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostView {
    pub link: Option<LinkView>,
    /// Destinations of main-table routes with protocol
    /// [`RTPROT_TRELLIS_ENDPOINT`] through it.
    pub routes: Vec<IpNet>,
    /// Its permanent neighbour entries.
    pub neighbours: Vec<(IpAddr, Mac)>,
}

/// Everything in which the kernel differs from `record`, each naming the
/// object and the namespace; empty when it matches.
pub fn differences(record: &Record, pod: &PodView, host: &HostView) -> Vec<String> {
    let mut out = Vec::new();
    let ns = &record.netns;
    let ifname = &record.attachment.ifname;
    let host_ifname = &record.host_ifname;

    match &pod.link {
        None => out.push(format!("interface {ifname} is missing in {ns}")),
        Some(link) => {
            if link.mac != record.mac {
                out.push(format!(
                    "{ifname} in {ns} has MAC {}, the record says {}",
                    show(link.mac),
                    show(record.mac)
                ));
            }
            if link.mtu != record.mtu {
                out.push(format!(
                    "{ifname} in {ns} has MTU {}, the record says {}",
                    link.mtu, record.mtu
                ));
            }
            if !link.up {
                out.push(format!("{ifname} in {ns} is down"));
            }
            for address in &record.addresses {
                if !pod.addresses.contains(address) {
                    out.push(format!("address {address} is missing on {ifname} in {ns}"));
                }
            }
            for gateway in gateways(record) {
                if !pod.default_gateways.contains(&gateway) {
                    out.push(format!(
                        "pod default route via {gateway} is missing in {ns}"
                    ));
                }
                match (
                    pod.neighbours.iter().find(|(ip, _)| *ip == gateway),
                    record.host_mac,
                ) {
                    (None, _) => out.push(format!(
                        "pod neighbour {gateway} (permanent, to {}) is missing in {ns}",
                        show(record.host_mac)
                    )),
                    (Some((_, mac)), Some(want)) if *mac != want => out.push(format!(
                        "pod neighbour {gateway} in {ns} points at {mac}, not at the host veth's {want}"
                    )),
                    _ => {}
                }
            }
        }
    }

    match &host.link {
        None => out.push(format!(
            "host veth {host_ifname} is missing in the node's namespace"
        )),
        Some(link) => {
            if link.mac != record.host_mac {
                out.push(format!(
                    "host veth {host_ifname} has MAC {}, the record says {}",
                    show(link.mac),
                    show(record.host_mac)
                ));
            }
            if !link.up {
                out.push(format!("host veth {host_ifname} is down"));
            }
            for address in &record.addresses {
                if !host.routes.contains(address) {
                    out.push(format!(
                        "host route to {address} via {host_ifname} \
                         (protocol {RTPROT_TRELLIS_ENDPOINT}) is missing"
                    ));
                }
                let ip = address.addr();
                match (
                    host.neighbours.iter().find(|(n, _)| *n == ip),
                    record.mac,
                ) {
                    (None, _) => out.push(format!(
                        "host neighbour {ip} (permanent, to {}) is missing on {host_ifname}",
                        show(record.mac)
                    )),
                    (Some((_, mac)), Some(want)) if *mac != want => out.push(format!(
                        "host neighbour {ip} on {host_ifname} points at {mac}, not at the pod's {want}"
                    )),
                    _ => {}
                }
            }
        }
    }
    out
}

/// The gateway of each of the record's address families, in its order.
fn gateways(record: &Record) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for a in &record.addresses {
        let gw = Endpoint::gateway(a);
        if !out.contains(&gw) {
            out.push(gw);
        }
    }
    out
}

fn show(mac: Option<Mac>) -> String {
    mac.map_or_else(|| "none".to_owned(), |m| m.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::endpoint::record::{Phase, RECORD_VERSION};
    use trellis_cni::proto::{Attachment, GATEWAY_V4, GATEWAY_V6};

    const HOST_MAC: Mac = Mac([2, 0, 0, 0, 0, 1]);
    const POD_MAC: Mac = Mac([2, 0, 0, 0, 0, 2]);

    fn mk_record() -> Record {
        Record {
            version: RECORD_VERSION,
            phase: Phase::Ready,
            attachment: Attachment {
                container_id: "c".into(),
                ifname: "eth0".into(),
            },
            netns: "/run/netns/x".into(),
            pod: None,
            host_ifname: "trellis0011aabb".into(),
            addresses: vec![
                "10.244.1.5/32".parse().unwrap(),
                "fd00::5/128".parse().unwrap(),
            ],
            mtu: 1450,
            host_mac: Some(HOST_MAC),
            mac: Some(POD_MAC),
        }
    }

    fn link(mac: Mac) -> LinkView {
        LinkView {
            index: 2,
            mac: Some(mac),
            mtu: 1450,
            up: true,
        }
    }

    fn matching(r: &Record) -> (PodView, HostView) {
        let pod = PodView {
            link: Some(link(POD_MAC)),
            addresses: r.addresses.clone(),
            default_gateways: vec![IpAddr::V4(GATEWAY_V4), IpAddr::V6(GATEWAY_V6)],
            neighbours: vec![
                (IpAddr::V4(GATEWAY_V4), HOST_MAC),
                (IpAddr::V6(GATEWAY_V6), HOST_MAC),
            ],
        };
        let host = HostView {
            link: Some(link(HOST_MAC)),
            routes: r.addresses.clone(),
            neighbours: r.addresses.iter().map(|a| (a.addr(), POD_MAC)).collect(),
        };
        (pod, host)
    }

    #[test]
    fn a_matching_kernel_has_no_differences() {
        let r = mk_record();
        let (pod, host) = matching(&r);
        assert_eq!(differences(&r, &pod, &host), Vec::<String>::new());
    }

    #[test]
    fn each_difference_is_named() {
        let r = mk_record();
        type Edit = fn(&mut PodView, &mut HostView);
        let cases: &[(Edit, &str)] = &[
            (
                |p, _| p.default_gateways.retain(|g| g.is_ipv6()),
                "pod default route via 169.254.1.1 is missing in /run/netns/x",
            ),
            (
                |p, _| p.link = None,
                "interface eth0 is missing in /run/netns/x",
            ),
            (
                |p, _| p.link.as_mut().unwrap().mtu = 1500,
                "eth0 in /run/netns/x has MTU 1500, the record says 1450",
            ),
            (
                |p, _| p.link.as_mut().unwrap().mac = Some(Mac([2, 0, 0, 0, 0, 9])),
                "eth0 in /run/netns/x has MAC 02:00:00:00:00:09, the record says 02:00:00:00:00:02",
            ),
            (
                |p, _| p.link.as_mut().unwrap().up = false,
                "eth0 in /run/netns/x is down",
            ),
            (
                |p, _| {
                    p.addresses.pop();
                },
                "address fd00::5/128 is missing on eth0 in /run/netns/x",
            ),
            (
                |p, _| p.neighbours.clear(),
                "pod neighbour 169.254.1.1 (permanent, to 02:00:00:00:00:01) is missing in /run/netns/x",
            ),
            (
                |p, _| p.neighbours[0].1 = Mac([2, 0, 0, 0, 0, 9]),
                "pod neighbour 169.254.1.1 in /run/netns/x points at 02:00:00:00:00:09, not at the host veth's 02:00:00:00:00:01",
            ),
            (
                |_, h| h.link = None,
                "host veth trellis0011aabb is missing in the node's namespace",
            ),
            (
                |_, h| h.link.as_mut().unwrap().up = false,
                "host veth trellis0011aabb is down",
            ),
            (
                |_, h| h.routes.clear(),
                "host route to 10.244.1.5/32 via trellis0011aabb (protocol 211) is missing",
            ),
            (
                |_, h| h.neighbours.clear(),
                "host neighbour 10.244.1.5 (permanent, to 02:00:00:00:00:02) is missing on trellis0011aabb",
            ),
        ];
        for (edit, want) in cases {
            let (mut pod, mut host) = matching(&r);
            edit(&mut pod, &mut host);
            let got = differences(&r, &pod, &host);
            assert!(got.iter().any(|d| d == want), "want {want:?} in {got:#?}");
        }
    }
}
