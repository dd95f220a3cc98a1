//! `NetworkConfig`: the cluster's network settings, one object named `default`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Condition: the settings make sense together and for every node.
pub const NETWORKCONFIG_VALID: &str = "Valid";
/// The name of the one `NetworkConfig` object Trellis reads.
pub const NETWORK_CONFIG_NAME: &str = "default";
/// Default VXLAN network identifier (Flannel's and the Linux default).
pub const DEFAULT_VNI: i32 = 1;
/// Default VXLAN UDP port: the Linux kernel's historic default, also Flannel's.
pub const DEFAULT_VXLAN_PORT: i32 = 8472;
/// Bytes a VXLAN-over-IPv4 encapsulation adds (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD: i32 = 50;

/// Cluster-wide network settings. Written by the platform team; Trellis reads
/// only the object named `default`, and the schema refuses any other name.
/// When it is absent, every field takes its default.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(
    group = "network.trellis.dev",
    version = "v1alpha1",
    kind = "NetworkConfig",
    plural = "networkconfigs",
    shortname = "netcfg",
    category = "trellis",
    status = "NetworkConfigStatus",
    doc = "Cluster-wide network settings of Trellis (a singleton named `default`).",
    validation = kube::core::Rule::new("self.metadata.name == 'default'").message("metadata.name must be 'default': Trellis reads exactly one NetworkConfig, named default"),
    printcolumn(name = "Encapsulation", type_ = "string", json_path = ".spec.encapsulation"),
    printcolumn(name = "VNI", type_ = "integer", json_path = ".spec.vxlan.vni"),
    printcolumn(name = "Port", type_ = "integer", json_path = ".spec.vxlan.port"),
    printcolumn(name = "MTU", type_ = "integer", json_path = ".spec.mtu", description = "Pod MTU; empty means automatic (underlay MTU minus encapsulation overhead)"),
    printcolumn(name = "Enforcement", type_ = "string", json_path = ".spec.policyEnforcement"),
    printcolumn(name = "Valid", type_ = "string", json_path = ".status.conditions[?(@.type==\"Valid\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfigSpec {
    /// How pod traffic crosses nodes: `VXLAN` (an overlay; works on any
    /// underlay that passes UDP between nodes) or `None` (native routing: each
    /// node routes remote pod blocks via the peer's underlay address, so nodes
    /// must be L2-adjacent or the underlay must route pod CIDRs).
    #[serde(default)]
    pub encapsulation: Encapsulation,

    /// VXLAN settings, used when `encapsulation` is `VXLAN` (kept, and
    /// ignored, otherwise, so switching modes back loses nothing).
    #[serde(default)]
    pub vxlan: VxlanConfig,

    /// MTU of pod interfaces in bytes. Unset (the default): the node's
    /// underlay MTU minus the encapsulation overhead (50 bytes for VXLAN).
    /// At least 1280 (the IPv6 minimum) and at most 9216.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1280, max = 9216))]
    pub mtu: Option<i32>,

    /// When pods are isolated by policy, with Cilium's meanings:
    /// `Default` follows Kubernetes (a pod is isolated in a direction only when
    /// a policy selects it for that direction); `Always` isolates every pod in
    /// both directions (only what a policy allows passes, plus traffic from
    /// the pod's own node); `Never` enforces no policy at all.
    #[serde(default)]
    pub policy_enforcement: PolicyEnforcement,
}

/// How pod traffic crosses nodes.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum Encapsulation {
    /// A kernel VXLAN overlay between nodes.
    #[default]
    #[serde(rename = "VXLAN")]
    Vxlan,
    /// No encapsulation: native routing via each peer's underlay address.
    None,
}

impl std::fmt::Display for Encapsulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Vxlan => "VXLAN",
            Self::None => "None",
        })
    }
}

/// VXLAN parameters.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VxlanConfig {
    /// VXLAN network identifier, 1 to 16777215 (24 bits; 0 is reserved here).
    #[serde(default = "default_vni")]
    #[schemars(range(min = 1, max = 16_777_215))]
    pub vni: i32,
    /// UDP destination port of the tunnel, 1 to 65535. Default 8472 (the
    /// Linux and Flannel default; IANA's is 4789).
    #[serde(default = "default_vxlan_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        Self {
            vni: DEFAULT_VNI,
            port: DEFAULT_VXLAN_PORT,
        }
    }
}

fn default_vni() -> i32 {
    DEFAULT_VNI
}

fn default_vxlan_port() -> i32 {
    DEFAULT_VXLAN_PORT
}

/// Policy enforcement mode (Cilium's meanings).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum PolicyEnforcement {
    /// Kubernetes semantics: isolate a pod in a direction only when some
    /// policy selects it for that direction.
    #[default]
    Default,
    /// Isolate every pod in both directions; only what policy allows passes
    /// (plus traffic from the pod's own node, such as health probes).
    Always,
    /// Enforce no policy.
    Never,
}

/// What the operator observed about the `NetworkConfig`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfigStatus {
    /// The `metadata.generation` these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Valid`: the settings make sense together and for every node (for
    /// example, an explicit MTU that fits every node's underlay).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
