//! An endpoint in the kernel: the veth pair, the pod's addresses, default
//! routes and gateway neighbours, and the node's route and neighbour to the
//! pod.
//!
//! ```text
//!  node namespace                                   pod namespace
//!  ─────────────                                    ─────────────
//!  trellisXXXXXXXX (up, MTU)  ◀──── veth ────▶      eth0 (CNI_IFNAME, up, MTU)
//!   10.244.1.5/32 dev trellisXXXXXXXX                10.244.1.5/32, fd00::5/128
//!     scope link proto 211                           default via 169.254.1.1 dev eth0 onlink
//!   neigh 10.244.1.5 → pod MAC (permanent)           default via fe80::1 dev eth0
//!                                                    neigh 169.254.1.1, fe80::1 → host veth MAC (permanent)
//! ```
//!
//! Nothing here ARPs: both sides' entries are permanent, and the gateway is
//! an address no interface has. The pair is made by one request in the
//! node's namespace whose peer carries the pod's namespace and
//! `CNI_IFNAME`: the pod side is born there, with its MTU, so it never
//! exists in the node's namespace (where `CNI_IFNAME` could clash with a
//! node interface) and is never moved (a move unregisters and registers
//! the device again, the slowest step by far).
//! Every function runs its netlink work on the namespace's own thread (see
//! [`crate::netns`]).

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressScope,
};
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use nix::errno::Errno;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};
use trellis_cni::proto::{Endpoint, RTPROT_TRELLIS_ENDPOINT};

use super::check::{HostView, LinkView, PodView};
use super::naming;
use crate::apply::errno_of;
use crate::model::Mac;
use crate::netns::{NetnsError, NetnsHandle};

/// A datapath step that failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// A netlink request the kernel refused, or an object not found.
    #[error("{step} in {namespace}: {reason}")]
    Step {
        step: String,
        namespace: String,
        /// The errno and, where clear, what to do about it.
        reason: String,
        errno: Option<Errno>,
    },
    #[error(
        "{what} is off in the node's namespace {namespace} and cannot be turned on \
         ({path}: {source}); pods cannot reach each other or leave the node without it"
    )]
    Forwarding {
        what: &'static str,
        path: &'static str,
        namespace: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Thread(#[from] NetnsError),
}

impl DatapathError {
    /// The errno of a refused netlink request.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            DatapathError::Step { errno, .. } => *errno,
            _ => None,
        }
    }

    fn missing(step: impl Into<String>, namespace: &str, what: impl Into<String>) -> Self {
        DatapathError::Step {
            step: step.into(),
            namespace: namespace.to_owned(),
            reason: what.into(),
            errno: None,
        }
    }
}

/// `map_err` for a netlink answer: the step, the namespace, the errno and
/// its hint.
fn failed<'a>(
    step: impl Into<String> + 'a,
    namespace: &'a str,
    hint: impl Fn(Errno) -> Option<String> + 'a,
) -> impl FnOnce(rtnetlink::Error) -> DatapathError + 'a {
    move |e| {
        let errno = errno_of(&e);
        let mut reason = errno.map_or_else(|| e.to_string(), |n| n.to_string());
        let hint = errno.and_then(|n| match n {
            Errno::EPERM | Errno::EACCES if hint(n).is_none() => {
                Some("needs CAP_NET_ADMIN in that namespace".to_owned())
            }
            _ => hint(n),
        });
        if let Some(h) = hint {
            reason.push_str(" — ");
            reason.push_str(&h);
        }
        DatapathError::Step {
            step: step.into(),
            namespace: namespace.to_owned(),
            reason,
            errno,
        }
    }
}

fn no_hint(_: Errno) -> Option<String> {
    None
}

/// What ADD builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wiring {
    pub host_ifname: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    pub mtu: u32,
    /// /32 and /128.
    pub addresses: Vec<IpNet>,
}

/// The MACs the kernel gave the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wired {
    /// Index of the host side in the node's namespace.
    pub host_index: u32,
    pub host_mac: Mac,
    pub mac: Mac,
}

/// Builds the endpoint: the pair (made from `host`, its pod side created
/// directly in `pod`, the namespace at `w.netns`), the pod side's
/// addresses, routes and neighbours, then the node's route and neighbour.
/// On an error, what was made stays: the caller tears it down with
/// [`remove`] (deleting the host veth takes the pod side with it).
pub async fn add(
    host: &NetnsHandle,
    pod: &NetnsHandle,
    w: &Wiring,
) -> Result<Wired, DatapathError> {
    let host_ns = node_namespace(host);
    let target = File::open(&w.netns).map_err(|e| {
        DatapathError::missing(
            format!("open the pod's namespace {}", w.netns.display()),
            &host_ns,
            e.to_string(),
        )
    })?;
    let wiring = w.clone();
    let created = host
        .run(move |h| async move { create_pair(&h, &wiring, &target, &host_ns).await })
        .await?;
    let (host_index, host_mac) = match created {
        Ok(made) => made,
        Err(e) if e.errno() == Some(Errno::EEXIST) => {
            // Either name may be taken; the pod's is the likely one (the
            // host veth's leftovers were torn down before).
            let ifname = w.ifname.clone();
            let pod_ns = w.netns.display().to_string();
            let clash = pod
                .run(move |h| async move { find_link(&h, &ifname, &pod_ns).await })
                .await??;
            return Err(match clash {
                Some(_) => DatapathError::Step {
                    step: format!(
                        "create veth pair {} / {} (MTU {}) with {} in the pod's namespace",
                        w.host_ifname, w.ifname, w.mtu, w.ifname
                    ),
                    namespace: w.netns.display().to_string(),
                    reason: format!(
                        "{} — the pod's namespace already has an interface named {}",
                        Errno::EEXIST,
                        w.ifname
                    ),
                    errno: Some(Errno::EEXIST),
                },
                None => e,
            });
        }
        Err(e) => return Err(e),
    };
    let wiring = w.clone();
    let pod_ns = w.netns.display().to_string();
    let mac = pod
        .run(move |h| async move { configure_pod(&h, &wiring, host_mac, &pod_ns).await })
        .await??;
    let wiring = w.clone();
    let host_ns = node_namespace(host);
    host.run(move |h| async move { configure_host(&h, &wiring, host_index, mac, &host_ns).await })
        .await??;
    Ok(Wired {
        host_index,
        host_mac,
        mac,
    })
}

/// "node namespace (current)" or "node namespace /run/netns/NAME".
pub fn node_namespace(host: &NetnsHandle) -> String {
    format!("node namespace {}", host.namespace())
}

/// One `RTM_NEWLINK` makes the pair, both ends with the pod MTU, the host
/// side up, and the pod side directly in the pod's namespace
/// (`IFLA_NET_NS_FD` in the peer's `VETH_INFO_PEER`) under its final name:
/// no move, no rename (moving a device to another namespace costs the
/// kernel a full unregister and register, tens of milliseconds). Returns
/// the host side's index and MAC.
async fn create_pair(
    h: &Handle,
    w: &Wiring,
    target: &File,
    ns: &str,
) -> Result<(u32, Mac), DatapathError> {
    // Not up yet: the kernel configures the peer before it links the two
    // ends, and a veth without its peer refuses to open (ENOTCONN).
    let peer = LinkUnspec::new_with_name(&w.ifname)
        .mtu(w.mtu)
        .setns_by_fd(target.as_raw_fd())
        .build();
    let pair = LinkVeth::new(&w.host_ifname, &w.ifname)
        .mtu(w.mtu)
        // Up before the routes through it: the kernel refuses routes on a
        // device that is down.
        .up()
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    let step = format!(
        "create veth pair {} / {} (MTU {}) with {} in the pod's namespace {}",
        w.host_ifname,
        w.ifname,
        w.mtu,
        w.ifname,
        w.netns.display()
    );
    h.link()
        .add(pair)
        .execute()
        .await
        .map_err(failed(step, ns, |n| match n {
            Errno::EEXIST => Some("an interface of that name appeared meanwhile".into()),
            Errno::EINVAL => Some("is the pod MTU within 68..=65535?".into()),
            Errno::EOPNOTSUPP => Some("the kernel lacks veth support".into()),
            _ => None,
        }))?;
    let host_link = require_link(h, &w.host_ifname, ns).await?;
    let Some(host_mac) = host_link.mac else {
        return Err(DatapathError::missing(
            format!("read the MAC of {}", w.host_ifname),
            ns,
            "the kernel reported no Ethernet address",
        ));
    };
    Ok((host_link.index, host_mac))
}

/// The pod side (with its MTU already): up, `lo` up, addresses, gateway
/// neighbours and default routes. Returns the pod side's MAC.
async fn configure_pod(
    h: &Handle,
    w: &Wiring,
    host_mac: Mac,
    ns: &str,
) -> Result<Mac, DatapathError> {
    let link = require_link(h, &w.ifname, ns).await?;
    let index = link.index;
    let Some(mac) = link.mac else {
        return Err(DatapathError::missing(
            format!("read the MAC of {}", w.ifname),
            ns,
            "the kernel reported no Ethernet address",
        ));
    };
    h.link()
        .change(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(failed(format!("set {} up", w.ifname), ns, no_hint))?;
    if let Some(lo) = find_link(h, "lo", ns).await?
        && !lo.up
    {
        h.link()
            .change(LinkUnspec::new_with_index(lo.index).up().build())
            .execute()
            .await
            .map_err(failed("set lo up", ns, no_hint))?;
    }
    for address in &w.addresses {
        let mut req = h
            .address()
            .add(index, address.addr(), address.prefix_len())
            .replace();
        if address.addr().is_ipv6() {
            // The address is ours alone: duplicate detection would only
            // delay the pod's first packets.
            let m = req.message_mut();
            m.header.flags |= AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute().await.map_err(failed(
            format!("add address {address} to {}", w.ifname),
            ns,
            |n| {
                (n == Errno::EACCES && address.addr().is_ipv6())
                    .then(|| "IPv6 is disabled in the pod's namespace (disable_ipv6)".into())
            },
        ))?;
    }
    for gateway in gateways(&w.addresses) {
        h.neighbours()
            .add(index, gateway)
            .link_layer_address(&host_mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(failed(
                format!("add neighbour {gateway} → {host_mac} on {}", w.ifname),
                ns,
                no_hint,
            ))?;
        let default = match gateway {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let mut route = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(default, 0)
            .and_then(|b| b.gateway(gateway))
            .map_err(|e| DatapathError::missing("build the default route", ns, e.to_string()))?
            .output_interface(index);
        // The IPv4 gateway is on no subnet of the pod; an IPv6 link-local
        // gateway is on-link by definition.
        if gateway.is_ipv4() {
            route = route.onlink();
        }
        h.route()
            .add(route.build())
            .replace()
            .execute()
            .await
            .map_err(failed(
                format!("add default route via {gateway} dev {}", w.ifname),
                ns,
                no_hint,
            ))?;
    }
    Ok(mac)
}

async fn configure_host(
    h: &Handle,
    w: &Wiring,
    index: u32,
    pod_mac: Mac,
    ns: &str,
) -> Result<(), DatapathError> {
    for address in &w.addresses {
        let msg = host_route(*address, Some(index))
            .map_err(|e| DatapathError::missing("build the host route", ns, e))?;
        h.route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(failed(
                format!(
                    "add route {address} dev {} proto {RTPROT_TRELLIS_ENDPOINT}",
                    w.host_ifname
                ),
                ns,
                |n| (n == Errno::ENETDOWN).then(|| "the host veth is down".into()),
            ))?;
        h.neighbours()
            .add(index, address.addr())
            .link_layer_address(&pod_mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(failed(
                format!(
                    "add neighbour {} → {pod_mac} on {}",
                    address.addr(),
                    w.host_ifname
                ),
                ns,
                no_hint,
            ))?;
    }
    Ok(())
}

/// The route to a pod through its host veth, scope link, with our protocol;
/// without a device for a delete (any of ours to that destination).
fn host_route(dst: IpNet, oif: Option<u32>) -> Result<RouteMessage, String> {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .map_err(|e| e.to_string())?
        .table_id(u32::from(RouteHeader::RT_TABLE_MAIN))
        .protocol(RouteProtocol::from(RTPROT_TRELLIS_ENDPOINT));
    b = match oif {
        Some(i) => b.output_interface(i).scope(RouteScope::Link),
        // A delete matches any scope only with "nowhere".
        None => b.scope(RouteScope::NoWhere),
    };
    Ok(b.build())
}

/// Makes a pod unreachable from the node: deletes every route of ours to
/// its addresses (fast: no device goes away). What is already gone is
/// success; every failure is returned.
pub async fn unroute(host: &NetnsHandle, addresses: Vec<IpNet>) -> Vec<DatapathError> {
    let ns = node_namespace(host);
    let done = host
        .run(move |h| async move { delete_routes(&h, &addresses, &ns).await })
        .await;
    done.unwrap_or_else(|e| vec![e.into()])
}

/// Tears an endpoint down in the node's namespace: the host veth (which
/// takes its peer, wherever it is, and every route and neighbour entry on
/// it) and any route of ours to the pod's addresses. What is already gone
/// is success; every failure is returned. Deleting the veth is most of a
/// DEL's time: the kernel waits for an RCU grace period before it lets a
/// device go. (Temporary peers, `trltmp…`, that earlier versions could
/// leave in the node's namespace on a crash are collected as orphans at
/// start.)
pub async fn remove(
    host: &NetnsHandle,
    host_ifname: String,
    addresses: Vec<IpNet>,
) -> Vec<DatapathError> {
    let ns = node_namespace(host);
    let done = host
        .run(move |h| async move {
            let mut errors = Vec::new();
            if let Err(e) = delete_link(&h, &host_ifname, &ns).await {
                errors.push(e);
            }
            errors.extend(delete_routes(&h, &addresses, &ns).await);
            errors
        })
        .await;
    done.unwrap_or_else(|e| vec![e.into()])
}

async fn delete_routes(h: &Handle, addresses: &[IpNet], ns: &str) -> Vec<DatapathError> {
    let mut errors = Vec::new();
    for address in addresses {
        let deleted = match host_route(*address, None) {
            Ok(msg) => h
                .route()
                .del(msg)
                .execute()
                .await
                .or_else(gone)
                .map_err(failed(
                    format!("delete route {address} proto {RTPROT_TRELLIS_ENDPOINT}"),
                    ns,
                    no_hint,
                )),
            Err(why) => Err(DatapathError::missing("build the host route", ns, why)),
        };
        if let Err(e) = deleted {
            errors.push(e);
        }
    }
    errors
}

/// The names of host veths and stray temporary peers (left by earlier
/// versions) in the node's namespace.
pub async fn list_links(host: &NetnsHandle) -> Result<Vec<String>, DatapathError> {
    let ns = node_namespace(host);
    host.run(move |h| async move {
        let links: Vec<LinkMessage> = h
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(failed("list links", &ns, no_hint))?;
        Ok(links
            .iter()
            .filter_map(link_name)
            .filter(|n| naming::is_host_veth(n) || naming::is_temp_peer(n))
            .map(str::to_owned)
            .collect())
    })
    .await?
}

/// Deletes the link `name` in the node's namespace; none is success.
pub async fn remove_link(host: &NetnsHandle, name: String) -> Result<(), DatapathError> {
    let ns = node_namespace(host);
    host.run(move |h| async move { delete_link(&h, &name, &ns).await })
        .await?
}

/// What the pod's namespace holds for interface `ifname`.
pub async fn inspect_pod(
    pod: &NetnsHandle,
    ifname: String,
    ns: String,
) -> Result<PodView, DatapathError> {
    pod.run(move |h| async move {
        let Some(link) = find_link(&h, &ifname, &ns).await? else {
            return Ok(PodView::default());
        };
        let addresses = dump_addresses(&h, link.index, &ns).await?;
        let mut default_gateways = Vec::new();
        for route in dump_routes(&h, &ns).await? {
            if route.header.destination_prefix_length == 0
                && is_main(&route)
                && oif(&route) == Some(link.index)
                && let Some(gw) = gateway(&route)
            {
                default_gateways.push(gw);
            }
        }
        let neighbours = dump_neighbours(&h, link.index, &ns).await?;
        Ok(PodView {
            link: Some(link),
            addresses,
            default_gateways,
            neighbours,
        })
    })
    .await?
}

/// What the node's namespace holds for host veth `host_ifname`.
pub async fn inspect_host(
    host: &NetnsHandle,
    host_ifname: String,
) -> Result<HostView, DatapathError> {
    let ns = node_namespace(host);
    host.run(move |h| async move {
        let Some(link) = find_link(&h, &host_ifname, &ns).await? else {
            return Ok(HostView::default());
        };
        let mut routes = Vec::new();
        for route in dump_routes(&h, &ns).await? {
            if is_main(&route)
                && u8::from(route.header.protocol) == RTPROT_TRELLIS_ENDPOINT
                && oif(&route) == Some(link.index)
                && let Some(dst) = destination(&route)
            {
                routes.push(dst);
            }
        }
        let neighbours = dump_neighbours(&h, link.index, &ns).await?;
        Ok(HostView {
            link: Some(link),
            routes,
            neighbours,
        })
    })
    .await?
}

/// Paths of the forwarding switches in `/proc/sys`. `/proc/sys/net`
/// resolves in the network namespace of the *thread* that opens it, so the
/// namespace thread reads and writes its own namespace's.
const IPV4_FORWARDING: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6_FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// Turns on IPv4 forwarding (and IPv6 forwarding when `ipv6`) in the node's
/// namespace, writing only what is off; returns what it turned on.
pub async fn ensure_forwarding(
    host: &NetnsHandle,
    ipv6: bool,
) -> Result<Vec<&'static str>, DatapathError> {
    let ns = node_namespace(host);
    host.run(move |_| async move {
        let mut switched = Vec::new();
        let wanted = [
            ("IPv4 forwarding", IPV4_FORWARDING, true),
            ("IPv6 forwarding", IPV6_FORWARDING, ipv6),
        ];
        for (what, path, want) in wanted {
            if !want {
                continue;
            }
            let fail = |source| DatapathError::Forwarding {
                what,
                path,
                namespace: ns.clone(),
                source,
            };
            let now = std::fs::read_to_string(path).map_err(fail)?;
            if now.trim() != "1" {
                std::fs::write(path, b"1\n").map_err(fail)?;
                switched.push(what);
            }
        }
        Ok(switched)
    })
    .await?
}

/// The gateway of each address family among `addresses`, once each.
fn gateways(addresses: &[IpNet]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for a in addresses {
        let gw = Endpoint::gateway(a);
        if !out.contains(&gw) {
            out.push(gw);
        }
    }
    out
}

fn gone(e: rtnetlink::Error) -> Result<(), rtnetlink::Error> {
    match errno_of(&e) {
        Some(Errno::ENOENT | Errno::ESRCH | Errno::ENODEV | Errno::EADDRNOTAVAIL) => Ok(()),
        _ => Err(e),
    }
}

async fn delete_link(h: &Handle, name: &str, ns: &str) -> Result<(), DatapathError> {
    let Some(link) = find_link(h, name, ns).await? else {
        return Ok(());
    };
    h.link()
        .del(link.index)
        .execute()
        .await
        .or_else(gone)
        .map_err(failed(format!("delete link {name}"), ns, no_hint))
}

/// The index of the host veth `name` in the node's namespace, if it exists.
pub async fn host_index(host: &NetnsHandle, name: &str) -> Result<Option<u32>, DatapathError> {
    let ns = node_namespace(host);
    let name = name.to_owned();
    let found = host
        .run(move |h| async move { find_link(&h, &name, &ns).await })
        .await??;
    Ok(found.map(|l| l.index))
}

async fn find_link(h: &Handle, name: &str, ns: &str) -> Result<Option<LinkView>, DatapathError> {
    let found = h.link().get().match_name(name).execute().try_next().await;
    match found {
        Ok(Some(m)) => Ok(Some(link_view(&m))),
        Ok(None) => Ok(None),
        Err(e) if errno_of(&e) == Some(Errno::ENODEV) => Ok(None),
        Err(e) => Err(failed(format!("look up link {name}"), ns, no_hint)(e)),
    }
}

async fn require_link(h: &Handle, name: &str, ns: &str) -> Result<LinkView, DatapathError> {
    find_link(h, name, ns)
        .await?
        .ok_or_else(|| DatapathError::missing(format!("find link {name}"), ns, "it does not exist"))
}

fn link_view(m: &LinkMessage) -> LinkView {
    let mut view = LinkView {
        index: m.header.index,
        mac: None,
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
    };
    for attr in &m.attributes {
        match attr {
            LinkAttribute::Address(b) => view.mac = <[u8; 6]>::try_from(b.as_slice()).ok().map(Mac),
            LinkAttribute::Mtu(mtu) => view.mtu = *mtu,
            _ => {}
        }
    }
    view
}

fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

async fn dump_addresses(h: &Handle, index: u32, ns: &str) -> Result<Vec<IpNet>, DatapathError> {
    let messages: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(failed("list addresses", ns, no_hint))?;
    Ok(messages
        .iter()
        .filter(|m| m.header.index == index && m.header.scope == AddressScope::Universe)
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            })?;
            IpNet::new(ip, m.header.prefix_len).ok()
        })
        .collect())
}

async fn dump_routes(h: &Handle, ns: &str) -> Result<Vec<RouteMessage>, DatapathError> {
    let mut out = Vec::new();
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut routes: Vec<RouteMessage> = h
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(failed("list routes", ns, no_hint))?;
        out.append(&mut routes);
    }
    Ok(out)
}

fn is_main(m: &RouteMessage) -> bool {
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    table == u32::from(RouteHeader::RT_TABLE_MAIN)
}

fn oif(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn gateway(m: &RouteMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(a) => crate::observe::route_ip(a),
        _ => None,
    })
}

fn destination(m: &RouteMessage) -> Option<IpNet> {
    let ip = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(a) => crate::observe::route_ip(a),
        _ => None,
    })?;
    IpNet::new(ip, m.header.destination_prefix_length).ok()
}

/// Permanent IPv4 and IPv6 neighbour entries on link `index`.
async fn dump_neighbours(
    h: &Handle,
    index: u32,
    ns: &str,
) -> Result<Vec<(IpAddr, Mac)>, DatapathError> {
    let found = crate::observe::permanent_neighbours(h, index)
        .await
        .map_err(failed("list neighbours", ns, no_hint))?;
    Ok(found.into_iter().map(|n| (n.ip, n.mac)).collect())
}
