//! `NetworkStatus`: what one node's reconciler observed, written only by it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::network_config::Encapsulation;

/// Condition: every other condition is True.
pub const NETWORKSTATUS_READY: &str = "Ready";
/// Condition: the VXLAN device is as desired (or not needed in native mode).
pub const NETWORKSTATUS_TUNNEL_READY: &str = "TunnelReady";
/// Condition: routes, neighbour and FDB entries to every peer are programmed.
pub const NETWORKSTATUS_ROUTES_READY: &str = "RoutesReady";
/// Condition: the policy generation the operator compiled is in the maps.
pub const NETWORKSTATUS_POLICY_READY: &str = "PolicyReady";
/// Condition: the CNI binary and conflist are installed and the endpoint
/// socket is serving.
pub const NETWORKSTATUS_CNI_READY: &str = "CNIReady";

/// The observed network state of one node (name = the Node's name). Written
/// only by that node's reconciler, and only when something changed.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(
    group = "network.trellis.dev",
    version = "v1alpha1",
    kind = "NetworkStatus",
    plural = "networkstatuses",
    shortname = "netstat",
    category = "trellis",
    status = "NetworkStatusStatus",
    doc = "Observed network state of one node (written by that node's trellis-node).",
    printcolumn(name = "Pod CIDRs", type_ = "string", json_path = ".status.podCIDRs"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".status.encapsulation"),
    printcolumn(name = "Endpoints", type_ = "integer", json_path = ".status.endpoints"),
    printcolumn(name = "Peers", type_ = "integer", json_path = ".status.peers"),
    printcolumn(
        name = "MTU",
        type_ = "integer",
        json_path = ".status.podMTU",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct NetworkStatusSpec {}

/// The node's observed state. Counts and bounded lists only, so the object
/// stays small whatever the cluster size.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStatusStatus {
    /// `metadata.generation` of the node's `NodeNetwork` that was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_network_generation: Option<i64>,
    /// Pod address blocks programmed on the node.
    #[serde(default, rename = "podCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 43)))]
    pub pod_cidrs: Vec<String>,
    /// Encapsulation in effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encapsulation: Option<Encapsulation>,
    /// Pod endpoints on the node.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub endpoints: i32,
    /// Peer nodes whose blocks are programmed.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub peers: i32,
    /// Up to 10 peers that are not programmed or not reachable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), inner(length(max = 253)))]
    pub unhealthy_peers: Vec<String>,
    /// MTU of the underlay interface, as detected.
    #[serde(
        default,
        rename = "underlayMTU",
        skip_serializing_if = "Option::is_none"
    )]
    pub underlay_mtu: Option<i32>,
    /// MTU given to pod interfaces.
    #[serde(default, rename = "podMTU", skip_serializing_if = "Option::is_none")]
    pub pod_mtu: Option<i32>,
    /// Content hash of the compiled policy the node enforces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub policy_hash: Option<String>,
    /// Packets dropped by the datapath, by reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["reason".into()]))]
    pub drops: Vec<DropCount>,
    /// The last error the reconciler met, cleared when a reconcile succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub last_error: Option<String>,
    /// `Ready`, `TunnelReady`, `RoutesReady`, `PolicyReady`, `CNIReady`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// A drop counter.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DropCount {
    /// Why the packets were dropped, e.g. `PolicyDenied`.
    #[schemars(length(min = 1, max = 64))]
    pub reason: String,
    /// Packets dropped for that reason since the node's datapath was loaded.
    #[schemars(range(min = 0))]
    pub packets: i64,
}
