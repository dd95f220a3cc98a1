//! `NodeNetwork`: one node's desired network, written by the operator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::network_config::{Encapsulation, VxlanConfig};

/// Condition: the node holds at least one block of each IP family a pool
/// offers it.
pub const NODENETWORK_BLOCKS_ASSIGNED: &str = "BlocksAssigned";

/// The desired network of one node (name = the Node's name). Written only by
/// the operator; the node's reconciler converges the kernel to it and to its
/// peers' `NodeNetwork`s, and reports in `NetworkStatus`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "network.trellis.dev",
    version = "v1alpha1",
    kind = "NodeNetwork",
    plural = "nodenetworks",
    shortname = "nodenet",
    category = "trellis",
    status = "NodeNetworkStatus",
    doc = "Desired network state of one node (written by the operator).",
    printcolumn(name = "Pod CIDRs", type_ = "string", json_path = ".spec.podCIDRs"),
    printcolumn(
        name = "Underlay",
        type_ = "string",
        json_path = ".spec.underlayAddress"
    ),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.encapsulation"),
    printcolumn(
        name = "VTEP",
        type_ = "string",
        json_path = ".spec.vtep.ipv4",
        priority = 1
    ),
    printcolumn(name = "MTU", type_ = "integer", json_path = ".spec.mtu"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.encapsulation != 'VXLAN' || (has(self.vxlan) && has(self.vtep))").message("spec.vxlan and spec.vtep are required when spec.encapsulation is VXLAN"))]
pub struct NodeNetworkSpec {
    /// Pod address blocks held by this node, IPv4 and IPv6. A block is never
    /// moved to another node while this node exists. Each lies inside exactly
    /// one `IPPool` (pools may not overlap), which is how the operator knows
    /// where it came from.
    #[serde(default, rename = "podCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 4, max = 43)))]
    #[x_kube(validation = kube::core::Rule::new("self.all(c, isCIDR(c) && cidr(c) == cidr(c).masked())").message("spec.podCIDRs entries must be networks in CIDR notation with no host bits set"))]
    pub pod_cidrs: Vec<String>,

    /// The node's address on the underlay (its InternalIP): VXLAN's outer
    /// source, and the next hop for its blocks in native routing.
    #[schemars(length(min = 2, max = 39))]
    #[x_kube(validation = kube::core::Rule::new("isIP(self)").message("spec.underlayAddress must be an IPv4 or IPv6 address"))]
    pub underlay_address: String,

    /// How pod traffic reaches this node from its peers.
    pub encapsulation: Encapsulation,

    /// VXLAN parameters, with `encapsulation: VXLAN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan: Option<VxlanConfig>,

    /// The node's tunnel endpoint, with `encapsulation: VXLAN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep: Option<Vtep>,

    /// Pod interface MTU; unset: the node detects its underlay MTU and
    /// subtracts the encapsulation overhead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1280, max = 9216))]
    pub mtu: Option<i32>,
}

/// A VXLAN tunnel endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Vtep {
    /// MAC address of the node's VXLAN device (locally administered, stable
    /// across restarts), e.g. `0a:58:c0:00:02:0b`.
    #[schemars(regex(pattern = r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"))]
    pub mac: String,
    /// IPv4 address of the VXLAN device (the first address of the node's
    /// IPv4 block); peers route that block via it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 7, max = 15))]
    #[x_kube(validation = kube::core::Rule::new("isIP(self) && ip(self).family() == 4").message("spec.vtep.ipv4 must be an IPv4 address"))]
    pub ipv4: Option<String>,
    /// IPv6 address of the VXLAN device, when the node has an IPv6 block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 39))]
    #[x_kube(validation = kube::core::Rule::new("isIP(self) && ip(self).family() == 6").message("spec.vtep.ipv6 must be an IPv6 address"))]
    pub ipv6: Option<String>,
}

/// What the operator could and could not do for this node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeNetworkStatus {
    /// `BlocksAssigned` (False with reason `PoolExhausted` or `NoMatchingPool`
    /// when the node could not get an address block).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
