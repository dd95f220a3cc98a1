//! `NodeEndpoints`: one node's pods as every other node needs to see them
//! (design 0005): addresses, identity and named ports. One shard per node,
//! written only by that node, so a pod start is one write cluster-wide and
//! nobody has to watch every Pod.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::policy_bundle::Protocol;

/// At most this many endpoints in one node's shard (see
/// [`NodeEndpointsSpec::endpoints`]).
pub const MAX_NODE_ENDPOINTS: usize = 1024;
/// At most this many named ports per endpoint.
pub const MAX_ENDPOINT_NAMED_PORTS: usize = 64;
/// At most this many named ports in one node's shard, all endpoints together.
pub const MAX_NODE_NAMED_PORTS: usize = 2048;

/// The pods of one node (name = the Node's name), as the other nodes need
/// them to enforce policy: each pod's addresses (the IP cache), its security
/// identity and its named container ports (egress rules that name a port).
///
/// Written only by that node's `trellis-node`, whole, at most about once a
/// second; every node watches every shard. Users never write it.
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema,
)]
#[kube(
    group = "network.trellis.dev",
    version = "v1alpha1",
    kind = "NodeEndpoints",
    plural = "nodeendpoints",
    shortname = "nodeep",
    category = "trellis",
    doc = "The pods of one node with their addresses, security identities and named ports (written by that node's trellis-node).",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(format!(
    "!has(self.endpoints) || self.endpoints.map(e, has(e.namedPorts) ? size(e.namedPorts) : 0).sum() <= {MAX_NODE_NAMED_PORTS}"
)).message(kube::core::Message::Message(format!(
    "spec.endpoints may hold at most {MAX_NODE_NAMED_PORTS} named ports in all, so the object stays far below etcd's size limit"
))).field_path(".endpoints"))]
pub struct NodeEndpointsSpec {
    /// The node's pods that have an address, in any order, each once.
    ///
    /// At most 1024: four times the largest `--max-pods` in common use (250;
    /// Kubernetes' default is 110), which leaves room for pods that are still
    /// terminating while their replacements start. A typical entry (two
    /// addresses, two named ports) takes about 230 bytes, so a node with 110
    /// pods writes about 25 KiB and 1024 such pods about 230 KiB, inside the
    /// 256 KiB object budget. With every string, list and the named-port
    /// total at its bound the object is about 600 KiB, below etcd's 1.5 MiB
    /// request limit, so a node's write is never refused for its size.
    ///
    /// An atomic list: the node always writes it whole, and an atomic list
    /// keeps server-side apply's `managedFields` one entry long instead of
    /// one entry per pod.
    #[serde(default)]
    #[schemars(length(max = MAX_NODE_ENDPOINTS))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Atomic)]
    pub endpoints: Vec<PodEndpoint>,
}

/// One pod of the node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodEndpoint {
    /// The pod's namespace.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: String,

    /// The pod's name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,

    /// The pod's addresses: one IPv4 address, one IPv6 address, or one of
    /// each.
    #[schemars(length(min = 1, max = 2), inner(length(min = 2, max = 39)))]
    #[x_kube(validation = kube::core::Rule::new("self.all(a, isIP(a))").message(
        "addresses must be IPv4 or IPv6 addresses"
    ))]
    #[x_kube(validation = kube::core::Rule::new(
        "size(self) < 2 || !isIP(self[0]) || !isIP(self[1]) || ip(self[0]).family() != ip(self[1]).family()"
    ).message("addresses may hold at most one address of each IP family"))]
    pub addresses: Vec<String>,

    /// The pod's security identity: the name of the `SecurityIdentity` that
    /// holds its label set, 256 to 16777215.
    #[schemars(range(min = 256, max = 16_777_215))]
    pub identity: i32,

    /// The pod's named container ports (those of its containers and of its
    /// sidecar init containers), which egress rules naming a port resolve
    /// against. At most 64 per pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ENDPOINT_NAMED_PORTS))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Atomic)]
    pub named_ports: Vec<NamedPort>,
}

/// A named container port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamedPort {
    /// The port's name (an IANA service name: at most 15 lowercase letters,
    /// digits and '-', with at least one letter, '-' neither first, last nor
    /// doubled).
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^([a-z0-9]+-)*[a-z0-9]*[a-z][a-z0-9]*(-[a-z0-9]+)*$")
    )]
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: Protocol,
    /// The port number, 1 to 65535.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}
