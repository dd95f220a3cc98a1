//! [`Op`]s → netlink writes, each with replace semantics.
//!
//! ```text
//!  [Op] ──▶ apply ──▶ RTM_NEWLINK / SETLINK / DELLINK, NEWADDR / DELADDR,
//!                     NEWNEIGH / DELNEIGH (inet, inet6, bridge), NEWROUTE / DELROUTE
//!       ◀── [ApplyError] (one per failed op; the others still ran)
//! ```
//!
//! Replaces are idempotent (`NLM_F_CREATE | NLM_F_REPLACE`) and a delete of
//! something already gone is success. The one exclusive write is creating
//! the device, which the kernel only offers with `NLM_F_EXCL`: `plan` asks
//! for it only when the device is absent, so `EEXIST` means another writer
//! (or another VXLAN device on the same VNI and port) is in the way.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteHeader, RouteProtocol};
use nix::errno::Errno;
use rtnetlink::{AddressMessageBuilder, Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use tracing::{info, warn};

use crate::model::{Device, Fdb, Mac, Neighbour, RTPROT_TRELLIS, Route, VXLAN_DEVICE, Vxlan};
use crate::plan::Op;

/// An op the kernel refused (or that could not be sent).
#[derive(Debug, thiserror::Error)]
#[error("{op}: {reason}{}", hint.as_deref().map(|h| format!(" — {h}")).unwrap_or_default())]
pub struct ApplyError {
    /// The op, as planned.
    pub op: Op,
    /// The kernel's errno, when it answered with one.
    pub errno: Option<Errno>,
    /// What went wrong, e.g. "EEXIST: File exists".
    pub reason: String,
    /// What a person can do about it, where that is clear.
    pub hint: Option<String>,
    #[source]
    pub source: Option<rtnetlink::Error>,
}

impl ApplyError {
    /// Whether retrying the same op later may succeed without anyone
    /// changing anything (as opposed to a conflict or a bad request that
    /// needs a person or a spec change).
    pub fn is_transient(&self) -> bool {
        match self.errno {
            Some(e) => matches!(
                e,
                Errno::EAGAIN | Errno::EBUSY | Errno::EINTR | Errno::ENOBUFS | Errno::ENOMEM
            ),
            // Our device vanished between ops, or the socket failed: the
            // next reconcile sees the new state.
            None => true,
        }
    }
}

/// Executes `ops` in order on the namespace of `handle`, going on after a
/// failure, and returns every failure.
pub async fn apply(handle: &Handle, ops: &[Op]) -> Vec<ApplyError> {
    let mut device = DeviceIndex::default();
    let mut errors = Vec::new();
    for op in ops {
        match apply_one(handle, &mut device, op).await {
            Ok(()) => info!(op = %op, "applied"),
            Err(e) => {
                warn!(op = %op, error = %e, "not applied");
                errors.push(e);
            }
        }
    }
    errors
}

/// Our device's index, looked up by name when an op first needs it and
/// forgotten when the device is created or deleted.
#[derive(Default)]
struct DeviceIndex(Option<u32>);

impl DeviceIndex {
    async fn get(&mut self, handle: &Handle) -> Result<Option<u32>, rtnetlink::Error> {
        if self.0.is_none() {
            self.0 = find_link(handle, VXLAN_DEVICE).await?;
        }
        Ok(self.0)
    }

    /// The index, or the error for an op that needs the device.
    async fn require(&mut self, handle: &Handle, op: &Op) -> Result<u32, ApplyError> {
        match self.get(handle).await {
            Ok(Some(i)) => Ok(i),
            Ok(None) => Err(ApplyError {
                op: op.clone(),
                errno: None,
                reason: format!("{VXLAN_DEVICE} does not exist"),
                hint: Some(
                    "this plan creates it first; if that failed, see its error, \
                     else it was deleted meanwhile"
                        .into(),
                ),
                source: None,
            }),
            Err(e) => Err(failed(op, e)),
        }
    }
}

async fn find_link(handle: &Handle, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
    use futures::TryStreamExt;
    let found = handle
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await;
    match found {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        Err(e) if errno_of(&e) == Some(Errno::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn apply_one(handle: &Handle, device: &mut DeviceIndex, op: &Op) -> Result<(), ApplyError> {
    let fail = |e| failed(op, e);
    match op {
        Op::CreateVxlan(v) => {
            device.0 = None;
            create_vxlan(handle, v).await.map_err(fail)
        }
        Op::DeleteVxlan { .. } => {
            let index = device.get(handle).await.map_err(fail)?;
            device.0 = None;
            match index {
                None => Ok(()),
                Some(i) => ignore_gone(handle.link().del(i).execute().await).map_err(fail),
            }
        }
        Op::SetVxlanMtu(mtu) => {
            let i = device.require(handle, op).await?;
            let msg = LinkUnspec::new_with_index(i).mtu(*mtu).build();
            handle.link().change(msg).execute().await.map_err(fail)
        }
        Op::SetVxlanMac(mac) => {
            let i = device.require(handle, op).await?;
            let msg = LinkUnspec::new_with_index(i)
                .address(mac.0.to_vec())
                .build();
            handle.link().change(msg).execute().await.map_err(fail)
        }
        Op::SetVxlanUp => {
            let i = device.require(handle, op).await?;
            let msg = LinkUnspec::new_with_index(i).up().build();
            handle.link().change(msg).execute().await.map_err(fail)
        }
        Op::AddAddress(net) => {
            let i = device.require(handle, op).await?;
            let added = handle
                .address()
                .add(i, net.addr(), net.prefix_len())
                .replace()
                .execute()
                .await;
            match added {
                Err(e) if errno_of(&e) == Some(Errno::EEXIST) => Ok(()),
                other => other.map_err(fail),
            }
        }
        Op::DelAddress(net) => {
            let i = device.require(handle, op).await?;
            ignore_gone(
                handle
                    .address()
                    .del(address_message(i, net))
                    .execute()
                    .await,
            )
            .map_err(fail)
        }
        Op::ReplaceNeighbour(n) => {
            let i = device.require(handle, op).await?;
            handle
                .neighbours()
                .add(i, n.ip)
                .link_layer_address(&n.mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(fail)
        }
        Op::DelNeighbour(n) => {
            let i = device.require(handle, op).await?;
            ignore_gone(
                handle
                    .neighbours()
                    .del(neighbour_message(i, n))
                    .execute()
                    .await,
            )
            .map_err(fail)
        }
        Op::ReplaceFdb(e) => {
            let i = device.require(handle, op).await?;
            // NLM_F_REPLACE swaps the entry's (only) remote: the kernel
            // keeps one remote per unicast MAC, lists being for the
            // all-zeros and multicast MACs.
            handle
                .neighbours()
                .add_bridge(i, &e.mac.0)
                .destination(e.dst)
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(fail)
        }
        Op::DelFdb(e) => {
            let i = device.require(handle, op).await?;
            ignore_gone(handle.neighbours().del(fdb_message(i, e)).execute().await).map_err(fail)
        }
        Op::ReplaceRoute(r) => {
            let oif = match r.dev {
                Device::Vxlan => device.require(handle, op).await?,
                Device::Underlay(i) => i,
            };
            let msg =
                route_message(r.dst, Some((r.via, oif, r.onlink))).map_err(|why| ApplyError {
                    op: op.clone(),
                    errno: None,
                    reason: why,
                    hint: None,
                    source: None,
                })?;
            handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(fail)
        }
        Op::DelRoute(r) => {
            // By destination, table and protocol only: that is "our route to
            // dst", even if its gateway or device changed since observed.
            let msg = route_message(r.dst, None).map_err(|why| ApplyError {
                op: op.clone(),
                errno: None,
                reason: why,
                hint: None,
                source: None,
            })?;
            ignore_gone(handle.route().del(msg).execute().await).map_err(fail)
        }
    }
}

async fn create_vxlan(handle: &Handle, v: &Vxlan) -> Result<(), rtnetlink::Error> {
    let builder = LinkVxlan::new(VXLAN_DEVICE, v.vni)
        .port(v.port)
        .dev(v.underlay_index)
        .learning(false);
    let builder = match v.local {
        IpAddr::V4(a) => builder.local(a),
        IpAddr::V6(a) => builder.local6(a),
    };
    // Up in the same message: if the kernel cannot open the device (its
    // UDP port taken), it removes it again, and the next reconcile retries
    // from a clean state.
    let msg = builder.address(v.mac.0.to_vec()).mtu(v.mtu).up().build();
    handle.link().add(msg).execute().await
}

fn address_message(index: u32, net: &IpNet) -> netlink_packet_route::address::AddressMessage {
    match net.addr() {
        IpAddr::V4(a) => AddressMessageBuilder::<std::net::Ipv4Addr>::new()
            .index(index)
            .address(a, net.prefix_len())
            .build(),
        IpAddr::V6(a) => AddressMessageBuilder::<std::net::Ipv6Addr>::new()
            .index(index)
            .address(a, net.prefix_len())
            .build(),
    }
}

fn neighbour_message(index: u32, n: &Neighbour) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = match n.ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    m.header.ifindex = index;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(
            n.ip,
        )));
    m
}

/// Deletes the whole entry for the MAC (every remote it has): the model
/// keeps one remote per MAC.
fn fdb_message(index: u32, e: &Fdb) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.header.flags = NeighbourFlags::Own;
    m.header.state = NeighbourState::Permanent;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(e.mac.0.to_vec()));
    m
}

/// A route of ours in the main table; with a next hop for a replace,
/// without one for a delete.
fn route_message(
    dst: IpNet,
    next_hop: Option<(IpAddr, u32, bool)>,
) -> Result<netlink_packet_route::route::RouteMessage, String> {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .map_err(|e| e.to_string())?
        .table_id(u32::from(RouteHeader::RT_TABLE_MAIN))
        .protocol(RouteProtocol::from(RTPROT_TRELLIS));
    if let Some((via, oif, onlink)) = next_hop {
        b = b
            .gateway(via)
            .map_err(|e| e.to_string())?
            .output_interface(oif);
        if onlink {
            b = b.onlink();
        }
    }
    Ok(b.build())
}

fn ignore_gone(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(e)
            if matches!(
                errno_of(&e),
                Some(Errno::ENOENT | Errno::ESRCH | Errno::ENODEV | Errno::EADDRNOTAVAIL)
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The errno of a netlink error answer.
pub fn errno_of(e: &rtnetlink::Error) -> Option<Errno> {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => {
            Some(Errno::from_raw(m.raw_code().abs()))
        }
        _ => None,
    }
}

fn failed(op: &Op, e: rtnetlink::Error) -> ApplyError {
    let errno = errno_of(&e);
    let reason = match errno {
        // nix shows "ENODEV: No such device".
        Some(n) => n.to_string(),
        None => e.to_string(),
    };
    ApplyError {
        op: op.clone(),
        errno,
        reason,
        hint: errno.and_then(|n| hint(op, n)),
        source: Some(e),
    }
}

/// What to do about an errno, where it is clear from the op.
fn hint(op: &Op, errno: Errno) -> Option<String> {
    Some(match (op, errno) {
        (_, Errno::EPERM | Errno::EACCES) => {
            "needs CAP_NET_ADMIN in the node's network namespace".into()
        }
        (Op::CreateVxlan(v), Errno::EEXIST) => format!(
            "{VXLAN_DEVICE} appeared since it was observed (another writer?), or another VXLAN \
             device uses VNI {} on UDP port {} with local {}; remove it or change spec.vxlan",
            v.vni, v.port, v.local
        ),
        (Op::CreateVxlan(v), Errno::EADDRINUSE) => format!(
            "UDP port {} on {} is taken by another socket; free it or change spec.vxlan.port",
            v.port, v.local
        ),
        (Op::CreateVxlan(v), Errno::EADDRNOTAVAIL) => format!(
            "{} is not an address of this node; check spec.underlayAddress",
            v.local
        ),
        (Op::CreateVxlan(_) | Op::SetVxlanMtu(_), Errno::EINVAL) => {
            "the MTU may exceed the underlay's MTU minus the VXLAN overhead; check spec.mtu".into()
        }
        (Op::CreateVxlan(_), Errno::EOPNOTSUPP) => {
            "the kernel lacks VXLAN support (vxlan module)".into()
        }
        (Op::ReplaceRoute(r), Errno::ENETUNREACH | Errno::EHOSTUNREACH) if !r.onlink => format!(
            "gateway {} is on no subnet of the underlay link (not directly reachable)",
            r.via
        ),
        (Op::ReplaceRoute(_), Errno::ENETDOWN) => "the route's device is down".into(),
        (
            Op::ReplaceRoute(Route {
                dev: Device::Underlay(i),
                ..
            }),
            Errno::ENODEV,
        ) => {
            format!(
                "no link with index {i}: the underlay link changed; the next reconcile re-reads it"
            )
        }
        (Op::SetVxlanMac(Mac(_)), Errno::EADDRNOTAVAIL) => "not a valid unicast MAC address".into(),
        _ => return None,
    })
}
