//! The kernel objects Trellis owns on a node, as plain values: what
//! `desired` produces, what `observed` reads back, and what `plan` compares.
//!
//! Ownership marks (so a dump can be filtered to ours and garbage collection
//! is a diff): the VXLAN device has a fixed name; routes carry
//! [`RTPROT_TRELLIS`]; neighbour and FDB entries live on our device only.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Name of the node's VXLAN device (at most 15 bytes, as IFNAMSIZ allows).
pub const VXLAN_DEVICE: &str = "trellis-vxlan";
/// Route protocol number marking routes Trellis installed (unused by the
/// protocols iproute2 names in `/etc/iproute2/rt_protos`).
pub const RTPROT_TRELLIS: u8 = 210;
/// Bytes VXLAN adds over an IPv4 underlay: outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN_OVERHEAD_V4: u32 = 50;
/// Bytes VXLAN adds over an IPv6 underlay (outer IPv6 header is 40 bytes).
pub const VXLAN_OVERHEAD_V6: u32 = 70;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts
                .next()
                .ok_or_else(|| format!("{s:?} is not a MAC address: too few octets"))?;
            if part.len() != 2 {
                return Err(format!("{s:?} is not a MAC address: octet {part:?}"));
            }
            *byte = u8::from_str_radix(part, 16)
                .map_err(|_| format!("{s:?} is not a MAC address: octet {part:?}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address: too many octets"));
        }
        Ok(Mac(out))
    }
}

/// The node's VXLAN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vxlan {
    pub vni: u32,
    pub port: u16,
    /// Outer source address: the node's underlay address.
    pub local: IpAddr,
    /// Index of the underlay link (the device VXLAN packets leave through).
    pub underlay_index: u32,
    pub mac: Mac,
    pub mtu: u32,
    /// The VTEP addresses (/32 and /128) on the device.
    pub addresses: Vec<IpNet>,
}

/// Which device a route leaves through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Device {
    /// Our VXLAN device.
    Vxlan,
    /// The underlay link, by index (native routing).
    Underlay(u32),
}

/// A route to a remote pod block.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub dst: IpNet,
    pub via: IpAddr,
    pub dev: Device,
    /// VXLAN routes point at the peer's VTEP, which is on no local subnet.
    pub onlink: bool,
}

/// A permanent neighbour entry on the VXLAN device: the peer's VTEP address
/// resolves to its VTEP MAC without ARP/ND.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: Mac,
}

/// A permanent FDB entry on the VXLAN device: frames for the peer's VTEP MAC
/// go to the peer's underlay address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fdb {
    pub mac: Mac,
    pub dst: IpAddr,
}

/// The device as the kernel reports it (only the attributes we manage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedVxlan {
    pub index: u32,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<IpAddr>,
    pub underlay_index: Option<u32>,
    pub learning: bool,
    pub mac: Option<Mac>,
    pub mtu: u32,
    pub up: bool,
    pub addresses: Vec<IpNet>,
}

/// What the node's kernel holds of ours, plus the facts `desired` needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The device named [`VXLAN_DEVICE`], if present.
    pub vxlan: Option<ObservedVxlan>,
    /// Routes with protocol [`RTPROT_TRELLIS`] (in the main table), and
    /// nothing else.
    pub routes: Vec<Route>,
    /// Neighbour entries on our VXLAN device.
    pub neighbours: Vec<Neighbour>,
    /// FDB entries on our VXLAN device.
    pub fdb: Vec<Fdb>,
    /// The link holding the node's underlay address, if found.
    pub underlay: Option<UnderlayLink>,
}

/// The link that holds the node's underlay address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnderlayLink {
    pub index: u32,
    pub mtu: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_round_trip_and_bad_ones_say_why() {
        let mac: Mac = "0a:58:c0:00:02:0b".parse().unwrap();
        assert_eq!(mac, Mac([0x0a, 0x58, 0xc0, 0x00, 0x02, 0x0b]));
        assert_eq!(mac.to_string(), "0a:58:c0:00:02:0b");
        for bad in [
            "",
            "0a:58:c0:00:02",
            "0a:58:c0:00:02:0b:0c",
            "0a-58-c0-00-02-0b",
            "0a:58:c0:00:02:zz",
            "a:58:c0:00:02:0b",
        ] {
            let err = bad.parse::<Mac>().unwrap_err();
            assert!(err.contains("is not a MAC address"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_device_name_fits_ifnamsiz() {
        assert!(VXLAN_DEVICE.len() < 16);
        assert!(
            VXLAN_DEVICE.starts_with("trellis"),
            "the sandbox's teardown finds links by prefix"
        );
    }
}
