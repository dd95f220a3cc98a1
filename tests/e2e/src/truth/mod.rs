//! Truth tables for NetworkPolicy, the upstream Kubernetes e2e model: namespaces x, y, z, pods
//! a, b, c in each, spread over three sandbox nodes, every pod serving TCP and UDP on ports 80
//! and 81. For each (protocol, port), every pod probes every pod, and the table of what got
//! through must equal the table an independent oracle computes from the objects in the
//! apiserver.
//!
//! ```text
//!  Case { steps: [Step { changes, grids }] }          (tests/network_policy.rs)
//!     │ World::run_step
//!     ├─ changes  NetworkPolicy apply/delete, pod and namespace labels   (kube client)
//!     ├─ wait_policy_applied                     objects visible; TODO: PolicyReady + generation
//!     ├─ snapshot Namespaces, Pods, NetworkPolicies as the apiserver holds them
//!     ├─ oracle   expected Reachability per grid  (oracle.rs: Kubernetes semantics, no Trellis code)
//!     ├─ traffic  9 × 9 probes per grid, concurrent (traffic.rs: sockets in the pods' netns)
//!     └─ table    equal? else probe again until a deadline (enforcement lag), then fail with
//!                 the expected and observed tables (table.rs)
//! ```
//!
//! [`world::World`] needs root and a sandbox (three nodes, the operator, `trellis-node`s);
//! [`oracle`], [`table`] and [`case`] are pure, and the case list can be checked against the
//! oracle without a sandbox ([`case::synthetic_snapshot`]).

mod bundles;
pub mod case;
pub mod explain;
pub mod oracle;
pub mod table;
pub mod traffic;
pub mod world;

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

pub use case::{Addresses, Case, Change, Step, bundle, policy};
pub use oracle::{Connection, Protocol, Snapshot, Verdict};
pub use table::{Grid, Reachability};
pub use traffic::Observed;
pub use world::{Enforcement, World};

/// The namespaces, each labelled `ns=<name>`.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// The pods of every namespace, each labelled `pod=<name>`.
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];
/// Ports every pod serves, on TCP and on UDP, named `serve-<port>-<tcp|udp>`.
pub const PORTS: [u16; 2] = [80, 81];
/// Sandbox nodes the pods are spread over.
pub const NODES: usize = 3;

/// Every (protocol, port) the pods serve.
pub fn all_grids() -> Vec<Grid> {
    let mut grids = Vec::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        for port in PORTS {
            grids.push(Grid::new(protocol, port));
        }
    }
    grids
}

/// The container port name of `port`/`protocol`: `serve-80-tcp`.
pub fn port_name(port: u16, protocol: Protocol) -> String {
    format!("serve-{port}-{}", protocol.as_k8s().to_ascii_lowercase())
}

/// `x/a`, `x/b`, … `z/c`: the rows and columns of every table.
pub fn pod_keys() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| POD_NAMES.iter().map(move |pod| format!("{ns}/{pod}")))
        .collect()
}

/// The node of the `i`th pod in [`pod_keys`] order: round robin, so every namespace has a pod
/// on every node and every node a pod of every namespace.
pub fn node_of(i: usize) -> String {
    format!("{}{}", crate::nodes::NODE_PREFIX, i % NODES + 1)
}

/// The truth tables of `grids` over the pods of [`pod_keys`] in `snapshot`, as the oracle
/// sees them (observations empty). Panics if a pod is missing or has no address: the world
/// is made before any table.
pub fn expected_tables(snapshot: &Snapshot, grids: &[Grid]) -> Vec<Reachability> {
    let keys = pod_keys();
    let pods: Vec<(&Pod, IpAddr)> = keys
        .iter()
        .map(|key| {
            let (ns, name) = key.split_once('/').unwrap_or_default();
            let pod = snapshot
                .pods
                .iter()
                .find(|p| {
                    p.metadata.namespace.as_deref() == Some(ns)
                        && p.metadata.name.as_deref() == Some(name)
                })
                .unwrap_or_else(|| panic!("the snapshot has no pod {key}"));
            (
                pod,
                pod_ip(pod).unwrap_or_else(|| panic!("pod {key} has no address")),
            )
        })
        .collect();
    grids
        .iter()
        .map(|&grid| {
            Reachability::new(grid, keys.clone(), |from, to| {
                oracle::evaluate(
                    snapshot,
                    &Connection {
                        from: pods[from].0,
                        from_ip: pods[from].1,
                        to: pods[to].0,
                        to_ip: pods[to].1,
                        protocol: grid.protocol,
                        port: grid.port,
                    },
                )
            })
        })
        .collect()
}

/// A pod's first address, from its status.
pub fn pod_ip(pod: &Pod) -> Option<IpAddr> {
    pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}
