//! `IPPool`: a range of pod addresses, handed to nodes in fixed-size blocks.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{CEL_CANONICAL_CIDR, LabelSelector};

/// Condition: the pool can hand out new blocks (not disabled, not
/// overlapping another pool, not exhausted).
pub const IPPOOL_ALLOCATABLE: &str = "Allocatable";
/// Condition: the pool's CIDR overlaps another pool's; the later pool gives
/// out nothing.
pub const IPPOOL_OVERLAPPING: &str = "Overlapping";
/// Condition: at least 80 % of the pool's blocks are in use.
pub const IPPOOL_NEARLY_EXHAUSTED: &str = "NearlyExhausted";

/// A range of pod IP addresses. The operator splits `cidr` into blocks of
/// prefix length `blockSize` and gives each node whose labels match
/// `nodeSelector` a block; the node assigns pod addresses from its blocks.
/// A block held by a node is never moved while the node exists.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "network.trellis.dev",
    version = "v1alpha1",
    kind = "IPPool",
    plural = "ippools",
    shortname = "ipp",
    category = "trellis",
    status = "IPPoolStatus",
    doc = "A range of pod IP addresses, given to nodes in blocks.",
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(name = "Block Size", type_ = "integer", json_path = ".spec.blockSize"),
    printcolumn(
        name = "Blocks Used",
        type_ = "integer",
        json_path = ".status.blocksInUse"
    ),
    printcolumn(
        name = "Blocks Total",
        type_ = "integer",
        json_path = ".status.blocksTotal"
    ),
    printcolumn(
        name = "Utilization %",
        type_ = "integer",
        json_path = ".status.utilizationPercent"
    ),
    printcolumn(
        name = "Allocatable",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Allocatable\")].status"
    ),
    printcolumn(
        name = "Disabled",
        type_ = "boolean",
        json_path = ".spec.disabled",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!isCIDR(self.cidr) || (cidr(self.cidr).ip().family() == 4 ? (self.blockSize >= 16 && self.blockSize <= 30) : (self.blockSize >= 112 && self.blockSize <= 126))"
).message("spec.blockSize must be between 16 and 30 for an IPv4 pool, and between 112 and 126 for an IPv6 pool").field_path(".blockSize"))]
#[x_kube(validation = kube::core::Rule::new(
    "!isCIDR(self.cidr) || self.blockSize >= cidr(self.cidr).prefixLength()"
).message("spec.blockSize must be at least the prefix length of spec.cidr: a block has to fit inside the pool").field_path(".blockSize"))]
pub struct IPPoolSpec {
    /// The pool's range, IPv4 or IPv6, in CIDR notation with no host bits set
    /// (`10.244.0.0/16`, `fd00:10:244::/56`). Immutable: to renumber, create
    /// a new pool and disable this one.
    #[schemars(length(min = 4, max = 43))]
    #[x_kube(validation = kube::core::Rule::new(CEL_CANONICAL_CIDR).message(
        "spec.cidr must be an IPv4 or IPv6 network in CIDR notation with no host bits set, e.g. 10.244.0.0/16 or fd00:10:244::/56"
    ))]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message(
        "spec.cidr is immutable: create a new IPPool and disable this one to renumber"
    ))]
    pub cidr: String,

    /// Prefix length of the blocks given to nodes: 16–30 for IPv4 (a /24
    /// holds 256 pod addresses), 112–126 for IPv6. At least the prefix length
    /// of `cidr`. Each node holds one block per IP family, so the block size
    /// bounds the pods per node (a /24 holds 254 pods beside the VTEP
    /// address). Immutable.
    #[schemars(range(min = 0, max = 128))]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message(
        "spec.blockSize is immutable: blocks already given to nodes keep their size"
    ))]
    pub block_size: i32,

    /// Which nodes take blocks from this pool. Empty (the default): every node.
    #[serde(default)]
    pub node_selector: LabelSelector,

    /// Masquerade traffic from pods in this pool to destinations outside every
    /// pool (source NAT to the node's address). Default false.
    #[serde(default)]
    pub nat_outgoing: bool,

    /// Give out no new blocks. Blocks already held by nodes stay, so running
    /// pods are not disturbed. Default false.
    #[serde(default)]
    pub disabled: bool,
}

/// What the operator observed about the pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many blocks of `blockSize` the pool holds (saturates at 2^63-1 for
    /// very large IPv6 pools).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub blocks_total: i64,
    /// How many blocks are held by nodes.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub blocks_in_use: i64,
    /// `blocksInUse` as a whole percentage of `blocksTotal`, rounded up, so a
    /// pool with any block in use never shows 0.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub utilization_percent: i32,
    /// `Allocatable`, `Overlapping`, `NearlyExhausted`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
