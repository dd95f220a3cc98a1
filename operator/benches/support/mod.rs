//! Inputs shared by the IPAM benchmarks (`benches/ipam.rs`) and the peak
//! memory measurement (`examples/ipam_memory.rs`): the scale target is 5,000
//! nodes taking /24 blocks from 10.0.0.0/8 (and /120 blocks from fd00::/48
//! when dual-stack).

#![allow(dead_code)] // the bench and the memory example each use a subset

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use trellis_api::v1alpha1::{IPPool, IPPoolSpec};
use trellis_operator::ipam::{self, Allocation};
use trellis_operator::plan::{self, Snapshot};
use trellis_policy::selector::Selector;

pub const V4_CIDR: &str = "10.0.0.0/8";
pub const V4_BLOCK: u8 = 24;
pub const V6_CIDR: &str = "fd00::/48";
pub const V6_BLOCK: u8 = 120;

pub fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

/// The labels a kubelet puts on a node, roughly: they are cloned into
/// `ipam::Node` and read by pool selectors.
pub fn node_labels(i: usize) -> BTreeMap<String, String> {
    [
        ("kubernetes.io/hostname", node_name(i)),
        ("kubernetes.io/os", "linux".to_owned()),
        ("kubernetes.io/arch", "amd64".to_owned()),
        ("topology.kubernetes.io/zone", format!("zone-{}", i % 3)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn ipam_pool(name: &str, cidr: &str, block_prefix: u8, created: i64) -> ipam::Pool {
    ipam::Pool {
        name: name.to_owned(),
        cidr: cidr.parse().expect("pool CIDR parses"),
        block_prefix,
        selector: Selector::everything(),
        disabled: false,
        deleting: false,
        created,
    }
}

/// One IPv4 pool, 10.0.0.0/8 with /24 blocks (65,536 blocks).
pub fn v4_pools() -> Vec<ipam::Pool> {
    vec![ipam_pool("default-ipv4", V4_CIDR, V4_BLOCK, 0)]
}

/// The IPv4 pool plus fd00::/48 with /120 blocks.
pub fn dual_pools() -> Vec<ipam::Pool> {
    vec![
        ipam_pool("default-ipv4", V4_CIDR, V4_BLOCK, 0),
        ipam_pool("default-ipv6", V6_CIDR, V6_BLOCK, 1),
    ]
}

/// Nodes `node-00000` … in name order.
pub fn ipam_nodes(n: usize) -> Vec<ipam::Node> {
    (0..n)
        .map(|i| ipam::Node {
            name: node_name(i),
            labels: node_labels(i),
        })
        .collect()
}

/// Rough heap and inline bytes of an [`Allocation`]: map entries and the
/// heap buffers they own (string and vector capacities). B-tree node headers
/// and allocator overhead are not counted, so this is a lower bound.
pub fn allocation_bytes(a: &Allocation) -> usize {
    use std::mem::size_of;
    let nodes: usize = a
        .nodes
        .iter()
        .map(|(name, b)| {
            size_of::<String>()
                + size_of::<ipam::NodeBlocks>()
                + name.capacity()
                + b.blocks.capacity() * size_of::<ipnet::IpNet>()
                + b.problems.capacity() * size_of::<ipam::Problem>()
        })
        .sum();
    let pools: usize = a
        .pools
        .iter()
        .map(|(name, u)| {
            let names = |v: &Vec<String>| {
                v.capacity() * size_of::<String>() + v.iter().map(String::capacity).sum::<usize>()
            };
            size_of::<String>()
                + size_of::<ipam::PoolUsage>()
                + name.capacity()
                + names(&u.overlaps)
                + names(&u.yields_to)
                + names(&u.starved)
        })
        .sum();
    nodes + pools
}

pub fn time(s: &str) -> Time {
    serde_json::from_value(serde_json::Value::String(s.into())).expect("RFC 3339 time")
}

/// A `Node` as the watch shows it: name, uid, labels and one InternalIP
/// (172.16.0.0/12, outside the pod pools).
pub fn k8s_node(i: usize) -> Arc<Node> {
    let name = node_name(i);
    Arc::new(Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            uid: Some(format!("uid-{name}")),
            labels: Some(node_labels(i)),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: format!("172.16.{}.{}", i / 256, i % 256),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: name,
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

pub fn k8s_pool(name: &str, cidr: &str, block_size: u8) -> Arc<IPPool> {
    let mut pool = IPPool::new(
        name,
        IPPoolSpec {
            cidr: cidr.into(),
            block_size: i32::from(block_size),
            node_selector: Default::default(),
            nat_outgoing: false,
            disabled: false,
        },
    );
    pool.metadata.uid = Some(format!("uid-{name}"));
    pool.metadata.generation = Some(1);
    Arc::new(pool)
}

/// `n` Nodes and the IPv4 pool, before any `NodeNetwork` exists.
pub fn empty_snapshot(n: usize) -> Snapshot {
    Snapshot {
        nodes: (0..n).map(k8s_node).collect(),
        pools: vec![k8s_pool("default-ipv4", V4_CIDR, V4_BLOCK)],
        ..Default::default()
    }
}

/// The cluster after a first pass was written: every `NodeNetwork`, its
/// status, the pool's status and finalizer, as the watches would show them.
pub fn steady_snapshot(n: usize) -> Snapshot {
    let mut snapshot = empty_snapshot(n);
    let first = plan::plan(&snapshot, &time("2026-01-01T00:00:00Z"));
    snapshot.apply(&first);
    snapshot
}
