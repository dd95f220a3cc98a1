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
/// At most this many bytes for `spec.endpoints` as JSON, by the estimate
/// [`NodeEndpointsSpec::estimated_bytes`] (which the schema's CEL rule
/// computes alike): the object's 256 KiB budget less room for `metadata`.
pub const MAX_NODE_ENDPOINTS_BYTES: usize = 240 * 1024;
/// JSON bytes of one endpoint besides its strings and lists' items:
/// `{"namespace":"","name":"","addresses":[],"identity":16777215,"namedPorts":[]},`
/// is 77.
const ENDPOINT_BYTES: usize = 80;
/// JSON bytes of one address besides its text: `"",`.
const ADDRESS_BYTES: usize = 3;
/// JSON bytes of one named port besides its name:
/// `{"name":"","protocol":"SCTP","port":65535},` is 43.
const NAMED_PORT_BYTES: usize = 44;

/// Why a shard does not fit what the schema admits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardLimit {
    /// More endpoints than [`MAX_NODE_ENDPOINTS`].
    #[error("{0} pods, more than the {MAX_NODE_ENDPOINTS} a node's NodeEndpoints can list")]
    Endpoints(usize),
    /// One pod with more named ports than [`MAX_ENDPOINT_NAMED_PORTS`].
    #[error(
        "pod {pod} has {count} named container ports, more than the {MAX_ENDPOINT_NAMED_PORTS} a pod may publish"
    )]
    EndpointNamedPorts {
        /// `namespace/name`.
        pod: String,
        /// How many it has.
        count: usize,
    },
    /// More named ports in all than [`MAX_NODE_NAMED_PORTS`].
    #[error(
        "{0} named ports in all, more than the {MAX_NODE_NAMED_PORTS} a node's NodeEndpoints can list"
    )]
    NamedPorts(usize),
    /// Over [`MAX_NODE_ENDPOINTS_BYTES`].
    #[error(
        "about {0} bytes of names, addresses and named ports, more than the {MAX_NODE_ENDPOINTS_BYTES} a node's NodeEndpoints can hold"
    )]
    Bytes(usize),
}

impl NodeEndpointsSpec {
    /// An upper bound of `spec.endpoints`' JSON size, computed as the
    /// schema's CEL rule computes it (every string counts its characters,
    /// all ASCII by the schema).
    pub fn estimated_bytes(&self) -> usize {
        self.endpoints
            .iter()
            .map(PodEndpoint::estimated_bytes)
            .sum()
    }

    /// Whether the apiserver would take this spec as far as the list-wide
    /// limits go (count, named ports per pod and in all, size); each
    /// endpoint's own fields are checked by the schema alone. The error is
    /// the first limit the endpoints break, in their order.
    pub fn check_limits(&self) -> Result<(), ShardLimit> {
        let mut budget = Budget::default();
        self.endpoints.iter().try_for_each(|e| budget.take(e))
    }

    /// The spec of `endpoints`, in their order, leaving out each one that
    /// would break a limit of [`NodeEndpointsSpec::check_limits`] (with the
    /// limit it breaks): what a node can still write when it holds more than
    /// a shard can list.
    pub fn fitting(endpoints: Vec<PodEndpoint>) -> (Self, Vec<(PodEndpoint, ShardLimit)>) {
        let (mut kept, mut left_out) = (Vec::new(), Vec::new());
        let mut budget = Budget::default();
        for e in endpoints {
            match budget.take(&e) {
                Ok(()) => kept.push(e),
                Err(limit) => left_out.push((e, limit)),
            }
        }
        (NodeEndpointsSpec { endpoints: kept }, left_out)
    }
}

/// The list-wide limits, spent endpoint by endpoint: the one place they
/// are counted.
#[derive(Default)]
struct Budget {
    endpoints: usize,
    named_ports: usize,
    bytes: usize,
}

impl Budget {
    /// Counts `e` in, or says which limit it would break (counting nothing).
    fn take(&mut self, e: &PodEndpoint) -> Result<(), ShardLimit> {
        let (ports, bytes) = (
            self.named_ports + e.named_ports.len(),
            self.bytes + e.estimated_bytes(),
        );
        if self.endpoints >= MAX_NODE_ENDPOINTS {
            return Err(ShardLimit::Endpoints(self.endpoints + 1));
        }
        if e.named_ports.len() > MAX_ENDPOINT_NAMED_PORTS {
            return Err(ShardLimit::EndpointNamedPorts {
                pod: format!("{}/{}", e.namespace, e.name),
                count: e.named_ports.len(),
            });
        }
        if ports > MAX_NODE_NAMED_PORTS {
            return Err(ShardLimit::NamedPorts(ports));
        }
        if bytes > MAX_NODE_ENDPOINTS_BYTES {
            return Err(ShardLimit::Bytes(bytes));
        }
        self.endpoints += 1;
        self.named_ports = ports;
        self.bytes = bytes;
        Ok(())
    }
}

impl PodEndpoint {
    /// This endpoint's share of [`NodeEndpointsSpec::estimated_bytes`].
    pub fn estimated_bytes(&self) -> usize {
        ENDPOINT_BYTES
            + self.namespace.len()
            + self.name.len()
            + self
                .addresses
                .iter()
                .map(|a| ADDRESS_BYTES + a.len())
                .sum::<usize>()
            + self
                .named_ports
                .iter()
                .map(|p| NAMED_PORT_BYTES + p.name.len())
                .sum::<usize>()
    }
}

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
#[x_kube(validation = kube::core::Rule::new(format!(
    "!has(self.endpoints) || self.endpoints.map(e, {ENDPOINT_BYTES} + size(e.namespace) + size(e.name) + e.addresses.map(a, {ADDRESS_BYTES} + size(a)).sum() + (has(e.namedPorts) ? e.namedPorts.map(p, {NAMED_PORT_BYTES} + size(p.name)).sum() : 0)).sum() <= {MAX_NODE_ENDPOINTS_BYTES}"
)).message(kube::core::Message::Message(format!(
    "spec.endpoints would take more than {MAX_NODE_ENDPOINTS_BYTES} bytes (names, addresses and named ports of every pod), over the 256 KiB object budget"
))).field_path(".endpoints"))]
pub struct NodeEndpointsSpec {
    /// The node's pods that have an address, in any order, each once.
    ///
    /// At most 1024: four times the largest `--max-pods` in common use (250;
    /// Kubernetes' default is 110), which leaves room for pods that are still
    /// terminating while their replacements start. A typical entry (two
    /// addresses, two named ports) takes about 230 bytes, so a node with 110
    /// pods writes about 25 KiB and 1024 such pods about 230 KiB. A CEL rule
    /// bounds the list's size (an estimate of its JSON, 80 bytes per pod plus
    /// its strings, 3 per address, 44 per named port) to 240 KiB, so the
    /// object stays inside the 256 KiB budget whatever the pods' names; the
    /// node refuses a pod that would not fit (CNI ADD fails and says why)
    /// rather than write a shard the apiserver refuses.
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
