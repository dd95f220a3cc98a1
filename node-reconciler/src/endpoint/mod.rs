//! Pod endpoints: the node side of the CNI plugin.
//!
//! ```text
//!  trellis (CNI binary) ──proto, <run-dir>/cni.sock──▶ server ──▶ service::Endpoints ─┬─▶ store    (<state-dir>: ipam/, endpoints/)
//!                                                                  ▲                  ├─▶ ipam     (pure: which address)
//!  agent ──watch NodeFacts (blocks, pod MTU, ready)────────────────┘                  ├─▶ datapath (veth, addresses, routes, neighbours)
//!                                                                                     └─▶ check    (pure: kernel vs record)
//!  install: plugin binary → <cni-bin-dir>/trellis, conflist → <cni-conf-dir>/10-trellis.conflist
//! ```
//!
//! `ipam`, `naming`, `record` and `check` are pure. Kernel objects are
//! marked as ours by the host veth name (`trellis` + 8 hex digits) and the
//! route protocol [`trellis_cni::proto::RTPROT_TRELLIS_ENDPOINT`] (211),
//! which the overlay reconciler (protocol 210, its VXLAN device only) never
//! observes, so neither touches the other's objects.

pub mod check;
pub mod datapath;
pub mod error;
pub mod files;
pub mod install;
pub mod ipam;
pub mod naming;
pub mod record;
pub mod server;
pub mod service;
pub mod store;

pub use error::EndpointError;
pub use service::Endpoints;

use std::net::IpAddr;

use futures::future::BoxFuture;
use ipnet::IpNet;
use trellis_cni::proto::{Attachment, PodRef};

/// An endpoint about to be answered to the runtime, as its policy needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub attachment: Attachment,
    /// The pod, from `CNI_ARGS` (`None` when the runtime did not say).
    pub pod: Option<PodRef>,
    /// The host side of its veth, in the node's namespace.
    pub host_ifname: String,
    pub host_index: u32,
    pub addresses: Vec<IpAddr>,
}

/// The policy side of pod endpoints ("no traffic before policy"): ADD
/// answers only after [`admit`](EndpointPolicy::admit) succeeded, and every
/// teardown (DEL, GC, a rolled-back or redone ADD, recovery) calls
/// [`release`](EndpointPolicy::release) before the endpoint's addresses
/// can go to another pod.
pub trait EndpointPolicy: Send + Sync + std::fmt::Debug {
    /// Puts the endpoint's identity and policy in the datapath and hooks the
    /// programs onto its host veth. An error fails (and rolls back) the ADD.
    fn admit<'a>(&'a self, endpoint: &'a Admission) -> BoxFuture<'a, Result<(), EndpointError>>;

    /// Forgets the endpoint whose host veth is `host_ifname`: its map
    /// entries and program links. Nothing there is fine.
    fn release<'a>(&'a self, host_ifname: &'a str) -> BoxFuture<'a, Result<(), EndpointError>>;
}

/// What the reconcile loop tells the endpoint service after each reconcile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// The node's pod address blocks (its `NodeNetwork`'s
    /// `spec.podCIDRs`), as networks.
    pub blocks: Vec<IpNet>,
    /// MTU of pod interfaces; 0 until a reconcile has computed it.
    pub pod_mtu: u32,
    /// Whether the last reconcile found the node's `NodeNetwork` and
    /// converged the kernel to it.
    pub ready: bool,
}

impl NodeFacts {
    /// Whether ADD can be served: a block, a pod MTU, and a node that
    /// converged (what STATUS reports as ready).
    pub fn serves_pods(&self) -> bool {
        !self.blocks.is_empty() && self.pod_mtu > 0 && self.ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_served_with_a_block_an_mtu_and_a_converged_node() {
        let ok = NodeFacts {
            blocks: vec!["10.244.1.0/24".parse().expect("a block")],
            pod_mtu: 1450,
            ready: true,
        };
        assert!(ok.serves_pods());
        for not in [
            NodeFacts {
                blocks: Vec::new(),
                ..ok.clone()
            },
            NodeFacts {
                pod_mtu: 0,
                ..ok.clone()
            },
            NodeFacts {
                ready: false,
                ..ok.clone()
            },
        ] {
            assert!(!not.serves_pods(), "{not:?}");
        }
    }
}
