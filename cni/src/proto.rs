//! The wire protocol between the CNI binary and `trellis-node`.
//!
//! ```text
//!  trellis (CNI binary) ──connect(unix socket)──▶ trellis-node
//!                       ──Request JSON + '\n'──▶
//!                       ◀──Response JSON + '\n'── (then the node closes)
//! ```
//!
//! One request per connection. Both sides refuse a message over
//! [`MAX_MESSAGE`] bytes. The types are plain values shared by both ends, so
//! the binary and the node can never disagree on a field name. Addresses are
//! typed (`ipnet`/`std::net`), so a malformed one is a decoding error, never a
//! string carried along.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Version of this protocol; the node answers a request of another version
/// with [`ErrorReply`] code [`code::INCOMPATIBLE_VERSION`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest request or response, in bytes (newline included).
pub const MAX_MESSAGE: usize = 1 << 20;

/// The pod's IPv4 default gateway: link-local, answered by a permanent
/// neighbour entry in the pod (the host side's MAC), so no ARP leaves the pod
/// for it and no address is spent on the host side.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 default gateway, resolved the same way.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Route protocol number on the host-side /32 (/128) route to each pod;
/// distinct from the node reconciler's overlay routes (210), so each owner's
/// garbage collection is a diff over its own routes only.
pub const RTPROT_TRELLIS_ENDPOINT: u8 = 211;

/// Prefix of the host-side veth of every pod (`trellis` + 8 hex digits of a
/// hash of container ID and interface name: 15 bytes, what IFNAMSIZ allows).
pub const HOST_VETH_PREFIX: &str = "trellis";

/// The CNI spec's well-known error codes (0–99), and ours (100+).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables (`CNI_*`).
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later (the node reconciler is unreachable or not ready).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD requests.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: the plugin cannot serve ADD requests, and existing
    /// containers may have limited connectivity.
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// Trellis: the node's address block has no free address.
    pub const ADDRESSES_EXHAUSTED: u32 = 100;
    /// Trellis: the pod's interface, addresses or routes differ from the
    /// endpoint record (CHECK).
    pub const ENDPOINT_MISMATCH: u32 = 101;
    /// Internal error.
    pub const INTERNAL: u32 = 999;
}

/// What an endpoint is keyed by: the spec's `(CNI_CONTAINERID, CNI_IFNAME)`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The pod, from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
/// `K8S_POD_UID`), recorded on the endpoint.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// A request from the CNI binary.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// The network's `name` from the configuration.
    pub network: String,
    pub command: Command,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "UPPERCASE")]
pub enum Command {
    /// Create the endpoint (or finish one a crash left half-made).
    Add {
        attachment: Attachment,
        /// `CNI_NETNS`: path of the pod's network namespace.
        netns: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<PodRef>,
    },
    /// Remove the endpoint; success when it is already gone.
    Del {
        attachment: Attachment,
        /// `CNI_NETNS`, which DEL may omit.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
    },
    /// Verify the endpoint in the kernel against its record.
    Check {
        attachment: Attachment,
        netns: String,
    },
    /// Whether ADD can be served now.
    Status,
    /// Release every endpoint not in `valid` (the spec's
    /// `cni.dev/valid-attachments`), and whatever a crash left without a
    /// record. `None` when the runtime sent no list (libcni does so when
    /// its caller passes none, e.g. `cnitool gc`): then no recorded
    /// endpoint is released, only orphans, because "no list" is not "no
    /// pod is valid".
    Gc {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        valid: Option<Vec<Attachment>>,
    },
}

/// The node's answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Response {
    /// ADD succeeded.
    Added { endpoint: Endpoint },
    /// DEL succeeded (also when nothing was there).
    Deleted,
    /// CHECK found the kernel matching the record.
    Checked { endpoint: Endpoint },
    /// STATUS: ready when the node reconciler has a block for this node
    /// and its last reconcile converged. `limited`: not ready, and pods
    /// already on the node may have limited connectivity (the overlay did
    /// not converge), the spec's code 51 rather than 50.
    Status {
        ready: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        limited: bool,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        message: String,
    },
    /// GC released these endpoints (all of them not in the valid list).
    Collected { released: Vec<Attachment> },
    /// Any failure, already in the spec's terms.
    Error(ErrorReply),
}

/// The spec's error: `code` (see [`code`]), `msg`, `details`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl ErrorReply {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        ErrorReply {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// A pod's endpoint as recorded by the node: everything the CNI result
/// reports.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub attachment: Attachment,
    /// Path of the pod's network namespace.
    pub netns: String,
    /// Host side of the veth pair.
    pub host_ifname: String,
    pub host_mac: String,
    /// The pod side (`attachment.ifname`) MAC.
    pub mac: String,
    pub mtu: u32,
    /// The pod's addresses, /32 and /128.
    pub addresses: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

impl Endpoint {
    /// The gateway of one of the pod's addresses.
    pub fn gateway(address: &IpNet) -> IpAddr {
        match address {
            IpNet::V4(_) => IpAddr::V4(GATEWAY_V4),
            IpNet::V6(_) => IpAddr::V6(GATEWAY_V6),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn requests_round_trip_with_the_documented_shape() {
        let req = Request {
            version: PROTOCOL_VERSION,
            network: "trellis".into(),
            command: Command::Gc {
                valid: Some(vec![Attachment {
                    container_id: "abc".into(),
                    ifname: "eth0".into(),
                }]),
            },
        };
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"version": 1, "network": "trellis",
                "command": {"type": "GC", "valid": [{"containerID": "abc", "ifname": "eth0"}]}})
        );
        assert_eq!(serde_json::from_value::<Request>(json).unwrap(), req);
    }

    #[test]
    fn errors_and_endpoints_round_trip() {
        let r = Response::Error(ErrorReply::new(code::TRY_AGAIN_LATER, "busy", ""));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "error", "code": 11, "msg": "busy"})
        );
        let ep = Endpoint {
            attachment: Attachment {
                container_id: "c".into(),
                ifname: "eth0".into(),
            },
            netns: "/run/netns/x".into(),
            host_ifname: "trellis0011aabb".into(),
            host_mac: "02:00:00:00:00:01".into(),
            mac: "02:00:00:00:00:02".into(),
            mtu: 1450,
            addresses: vec!["10.244.0.5/32".parse().unwrap()],
            pod: None,
        };
        let r = Response::Added { endpoint: ep };
        let back: Response = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            Endpoint::gateway(&"fd00::5/128".parse().unwrap()),
            IpAddr::V6(GATEWAY_V6)
        );
    }
}
