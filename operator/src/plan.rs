//! From a snapshot of the watched objects to the writes that make the
//! cluster match: pure, so "a restarted operator writes nothing" and "only
//! what changed is written" are unit tests.
//!
//! ```text
//!  Snapshot { nodes, pools, config, node_networks, statuses }, now
//!     │ ipam::allocate · desired::node_network_spec · status::*
//!     ▼
//!  Plan { NodeNetwork specs/statuses/deletions, pool statuses/finalizers,
//!         NetworkConfig status, events }   (only what differs from the snapshot)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use trellis_api::v1alpha1::{
    Encapsulation, IPPool, IPPoolStatus, NETWORK_CONFIG_NAME, NETWORKCONFIG_VALID, NetworkConfig,
    NetworkConfigSpec, NetworkConfigStatus, NetworkStatus, NodeNetwork, NodeNetworkSpec,
    NodeNetworkStatus, VXLAN_OVERHEAD,
};
use trellis_policy::selector::Selector;

use crate::conditions::{self, Cond};
use crate::desired::{NodeAddresses, node_network_spec};
use crate::ipam::{self, Allocation};
use crate::status::{self, reason};

/// The finalizer that keeps an `IPPool` while nodes hold blocks from it.
pub const POOL_FINALIZER: &str = "network.trellis.dev/blocks-in-use";

/// What the watches hold at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub nodes: Vec<Arc<Node>>,
    pub pools: Vec<Arc<IPPool>>,
    pub configs: Vec<Arc<NetworkConfig>>,
    pub node_networks: Vec<Arc<NodeNetwork>>,
    pub statuses: Vec<Arc<NetworkStatus>>,
}

impl Snapshot {
    /// What the watches show after the apiserver took `plan`'s writes: spec
    /// changes bump `metadata.generation` (a new object starts at 1), a
    /// deleting pool whose finalizer is removed is gone. The model of the
    /// apiserver that tests and benchmarks check plans against ("a second
    /// pass writes nothing"); `NodeNetwork`s are found through an index, so
    /// applying a 5,000-node pass stays linear.
    pub fn apply(&mut self, plan: &Plan) {
        let mut at: HashMap<String, usize> = self
            .node_networks
            .iter()
            .enumerate()
            .filter_map(|(i, nn)| Some((nn.metadata.name.clone()?, i)))
            .collect();
        for (name, _, spec) in &plan.node_network_specs {
            match at.get(name) {
                Some(&i) => {
                    let nn = Arc::make_mut(&mut self.node_networks[i]);
                    nn.spec = spec.clone();
                    nn.metadata.generation = nn.metadata.generation.map(|g| g + 1);
                }
                None => {
                    let mut nn = NodeNetwork::new(name, spec.clone());
                    nn.metadata.generation = Some(1);
                    nn.metadata.uid = Some(format!("uid-nn-{name}"));
                    at.insert(name.clone(), self.node_networks.len());
                    self.node_networks.push(Arc::new(nn));
                }
            }
        }
        for (name, status) in &plan.node_network_statuses {
            let i = at[name];
            Arc::make_mut(&mut self.node_networks[i]).status = Some(status.clone());
        }
        self.node_networks.retain(|nn| {
            !plan
                .node_network_deletes
                .iter()
                .any(|(n, _)| Some(n) == nn.metadata.name.as_ref())
        });
        for (name, status) in &plan.pool_statuses {
            let p = self
                .pools
                .iter_mut()
                .find(|p| p.metadata.name.as_deref() == Some(name))
                .expect("a status for a pool in the self");
            Arc::make_mut(p).status = Some(status.clone());
        }
        for name in &plan.finalizers_to_add {
            let p = self
                .pools
                .iter_mut()
                .find(|p| p.metadata.name.as_deref() == Some(name))
                .expect("a finalizer for a pool in the self");
            Arc::make_mut(p)
                .metadata
                .finalizers
                .get_or_insert_default()
                .push(POOL_FINALIZER.into());
        }
        self.pools.retain(|p| {
            !plan
                .finalizers_to_remove
                .iter()
                .any(|n| Some(n) == p.metadata.name.as_ref())
        });
    }
}

/// The writes one reconcile pass makes, each only when it changes something.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// `NodeNetwork` specs to apply: (node name, node uid, spec).
    pub node_network_specs: Vec<(String, String, NodeNetworkSpec)>,
    pub node_network_statuses: Vec<(String, NodeNetworkStatus)>,
    /// `NodeNetwork`s whose node is gone: (name, uid).
    pub node_network_deletes: Vec<(String, String)>,
    pub pool_statuses: Vec<(String, IPPoolStatus)>,
    pub finalizers_to_add: Vec<String>,
    pub finalizers_to_remove: Vec<String>,
    pub config_status: Option<NetworkConfigStatus>,
    pub events: Vec<PlannedEvent>,
    /// Nodes that get no `NodeNetwork` yet: no InternalIP and none recorded.
    pub waiting_for_address: Vec<String>,
    /// Objects the pure core could not use (they passed the schema, so this
    /// means a schema gap); reported in logs.
    pub skipped: Vec<String>,
    /// Totals for metrics.
    pub blocks_in_use: u128,
    pub blocks_total: u128,
    pub nodes_without_block: usize,
}

impl Plan {
    /// One short line per write, for logs.
    pub fn summary(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(
            self.node_network_specs
                .iter()
                .map(|(n, _, s)| format!("NodeNetwork {n} spec {:?}", s.pod_cidrs)),
        );
        out.extend(self.node_network_statuses.iter().map(|(n, s)| {
            let c: Vec<String> = s
                .conditions
                .iter()
                .map(|c| format!("{}={}/{}", c.type_, c.status, c.reason))
                .collect();
            format!("NodeNetwork {n} status {}", c.join(","))
        }));
        out.extend(
            self.node_network_deletes
                .iter()
                .map(|(n, _)| format!("delete NodeNetwork {n}")),
        );
        out.extend(self.pool_statuses.iter().map(|(n, s)| {
            format!(
                "IPPool {n} status {}/{} in use",
                s.blocks_in_use, s.blocks_total
            )
        }));
        out.extend(
            self.finalizers_to_add
                .iter()
                .map(|n| format!("IPPool {n} add finalizer")),
        );
        out.extend(
            self.finalizers_to_remove
                .iter()
                .map(|n| format!("IPPool {n} remove finalizer")),
        );
        out.extend(
            self.config_status
                .iter()
                .map(|_| "NetworkConfig status".to_owned()),
        );
        out.extend(self.events.iter().map(|e| format!("Event {}", e.reason)));
        out
    }

    /// Number of API writes (events included).
    pub fn writes(&self) -> usize {
        self.node_network_specs.len()
            + self.node_network_statuses.len()
            + self.node_network_deletes.len()
            + self.pool_statuses.len()
            + self.finalizers_to_add.len()
            + self.finalizers_to_remove.len()
            + usize::from(self.config_status.is_some())
            + self.events.len()
    }
}

/// The object an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Regarding {
    Node { name: String, uid: String },
    Pool { name: String, uid: String },
}

/// A Kubernetes Event to publish, for a change worth a human's attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEvent {
    pub regarding: Regarding,
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// The writes that bring the cluster to what the snapshot asks for.
pub fn plan(snapshot: &Snapshot, now: &Time) -> Plan {
    let mut plan = Plan::default();
    let config = snapshot
        .configs
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(NETWORK_CONFIG_NAME))
        .map(|c| c.spec.clone())
        .unwrap_or_default();

    let pools: Vec<ipam::Pool> = snapshot
        .pools
        .iter()
        .filter_map(|p| match to_pool(p) {
            Ok(pool) => Some(pool),
            Err(why) => {
                plan.skipped.push(why);
                None
            }
        })
        .collect();
    let nodes: Vec<ipam::Node> = snapshot
        .nodes
        .iter()
        .map(|n| ipam::Node {
            name: name_of(&n.metadata),
            labels: n.metadata.labels.clone().unwrap_or_default(),
        })
        .collect();
    let current: BTreeMap<String, &NodeNetwork> = snapshot
        .node_networks
        .iter()
        .map(|nn| (name_of(&nn.metadata), nn.as_ref()))
        .collect();
    let record: Vec<ipam::Held> = current
        .iter()
        .map(|(name, nn)| ipam::Held {
            node: name.clone(),
            blocks: nn
                .spec
                .pod_cidrs
                .iter()
                .filter_map(|c| c.parse::<IpNet>().ok())
                .collect(),
        })
        .collect();

    let allocation = ipam::allocate(&pools, &nodes, &record);
    plan_node_networks(snapshot, &allocation, &current, &config, now, &mut plan);
    plan_pools(snapshot, &pools, &allocation, now, &mut plan);
    plan_config(snapshot, &config, now, &mut plan);

    plan.blocks_in_use = allocation.pools.values().map(|u| u.used).sum();
    plan.blocks_total = allocation
        .pools
        .values()
        .map(|u| u.total)
        .fold(0, u128::saturating_add);
    plan.nodes_without_block = allocation
        .nodes
        .values()
        .filter(|n| n.blocks.is_empty())
        .count();
    plan
}

fn plan_node_networks(
    snapshot: &Snapshot,
    allocation: &Allocation,
    current: &BTreeMap<String, &NodeNetwork>,
    config: &NetworkConfigSpec,
    now: &Time,
    plan: &mut Plan,
) {
    for node in &snapshot.nodes {
        let name = name_of(&node.metadata);
        let uid = node.metadata.uid.clone().unwrap_or_default();
        let Some(blocks) = allocation.nodes.get(&name) else {
            continue;
        };
        let existing = current.get(&name).copied();
        let addresses = NodeAddresses {
            name: name.clone(),
            internal_ips: internal_ips(node),
        };
        let previous_underlay = existing.map(|nn| nn.spec.underlay_address.as_str());
        let Some(spec) = node_network_spec(&addresses, previous_underlay, &blocks.blocks, config)
        else {
            plan.waiting_for_address.push(name);
            continue;
        };

        // A spec change bumps metadata.generation by one (a new object starts at 1).
        let generation = match existing {
            Some(nn) if nn.spec == spec => nn.metadata.generation,
            Some(nn) => nn.metadata.generation.map(|g| g + 1),
            None => Some(1),
        };
        if existing.is_none_or(|nn| nn.spec != spec) {
            plan.node_network_specs
                .push((name.clone(), uid.clone(), spec));
        }

        let previous: &[Condition] = existing
            .and_then(|nn| nn.status.as_ref())
            .map_or(&[], |s| &s.conditions);
        let cond = status::node_condition(blocks);
        if !cond.status && !had_condition(previous, cond.type_, false, cond.reason) {
            plan.events.push(PlannedEvent {
                regarding: Regarding::Node {
                    name: name.clone(),
                    uid,
                },
                warning: true,
                reason: cond.reason,
                note: format!("no pod address block for node {name}: {}", cond.message),
            });
        }
        let conditions = conditions::merge(previous, vec![cond], now, generation);
        if conditions != previous {
            plan.node_network_statuses
                .push((name, NodeNetworkStatus { conditions }));
        }
    }
    for (name, nn) in current {
        if !allocation.nodes.contains_key(name) {
            plan.node_network_deletes
                .push((name.clone(), nn.metadata.uid.clone().unwrap_or_default()));
        }
    }
}

fn plan_pools(
    snapshot: &Snapshot,
    pools: &[ipam::Pool],
    allocation: &Allocation,
    now: &Time,
    plan: &mut Plan,
) {
    for object in &snapshot.pools {
        let name = name_of(&object.metadata);
        let (Some(pool), Some(usage)) = (
            pools.iter().find(|p| p.name == name),
            allocation.pools.get(&name),
        ) else {
            continue;
        };
        let has_finalizer = object
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|f| f == POOL_FINALIZER));
        if !pool.deleting && !has_finalizer {
            plan.finalizers_to_add.push(name.clone());
        }
        if pool.deleting && has_finalizer && usage.used == 0 {
            plan.finalizers_to_remove.push(name.clone());
        }

        let previous: &[Condition] = object.status.as_ref().map_or(&[], |s| &s.conditions);
        let conds = status::pool_conditions(pool, usage);
        for cond in &conds {
            let newly_bad = match cond.reason {
                reason::EXHAUSTED => !cond.status,
                reason::OVERLAPPING => cond.type_ == trellis_api::v1alpha1::IPPOOL_OVERLAPPING,
                _ => false,
            };
            if newly_bad && !had_condition(previous, cond.type_, cond.status, cond.reason) {
                plan.events.push(PlannedEvent {
                    regarding: Regarding::Pool {
                        name: name.clone(),
                        uid: object.metadata.uid.clone().unwrap_or_default(),
                    },
                    warning: true,
                    reason: cond.reason,
                    note: cond.message.clone(),
                });
            }
        }
        let numbers = status::pool_numbers(usage);
        let generation = object.metadata.generation;
        let desired = IPPoolStatus {
            observed_generation: generation,
            blocks_total: numbers.blocks_total,
            blocks_in_use: numbers.blocks_in_use,
            utilization_percent: numbers.utilization_percent,
            conditions: conditions::merge(previous, conds, now, generation),
        };
        if object.status.as_ref() != Some(&desired) {
            plan.pool_statuses.push((name, desired));
        }
    }
}

/// `NetworkConfig` `Valid`: what the schema cannot judge, because it needs
/// what nodes report (their underlay MTU).
fn plan_config(snapshot: &Snapshot, config: &NetworkConfigSpec, now: &Time, plan: &mut Plan) {
    let Some(object) = snapshot
        .configs
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(NETWORK_CONFIG_NAME))
    else {
        return;
    };
    let cond = config_condition(config, &snapshot.statuses);
    let previous: &[Condition] = object.status.as_ref().map_or(&[], |s| &s.conditions);
    let generation = object.metadata.generation;
    let desired = NetworkConfigStatus {
        observed_generation: generation,
        conditions: conditions::merge(previous, vec![cond], now, generation),
    };
    if object.status.as_ref() != Some(&desired) {
        plan.config_status = Some(desired);
    }
}

/// Whether an explicit MTU fits every node that reported its underlay MTU.
pub fn config_condition(config: &NetworkConfigSpec, statuses: &[Arc<NetworkStatus>]) -> Cond {
    let reported: Vec<(String, i32)> = statuses
        .iter()
        .filter_map(|s| Some((name_of(&s.metadata), s.status.as_ref()?.underlay_mtu?)))
        .collect();
    let Some(mtu) = config.mtu else {
        return Cond::new(
            NETWORKCONFIG_VALID,
            true,
            "Valid",
            "automatic MTU: each node uses its underlay MTU minus the encapsulation overhead",
        );
    };
    let overhead = if config.encapsulation == Encapsulation::Vxlan {
        VXLAN_OVERHEAD
    } else {
        0
    };
    let too_small: Vec<String> = reported
        .iter()
        .filter(|(_, underlay)| mtu + overhead > *underlay)
        .map(|(node, underlay)| format!("{node} ({underlay})"))
        .collect();
    if too_small.is_empty() {
        Cond::new(
            NETWORKCONFIG_VALID,
            true,
            "Valid",
            format!(
                "spec.mtu {mtu} plus {overhead} bytes of overhead fits the underlay of all {} node(s) that reported it",
                reported.len()
            ),
        )
    } else {
        let shown: Vec<&str> = too_small.iter().take(10).map(String::as_str).collect();
        let more = too_small.len().saturating_sub(shown.len());
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        Cond::new(
            NETWORKCONFIG_VALID,
            false,
            "MTUTooLarge",
            format!(
                "spec.mtu {mtu} plus {overhead} bytes of overhead exceeds the underlay MTU of {} node(s): {}{more}; packets that size would be dropped or fragmented",
                too_small.len(),
                shown.join(", ")
            ),
        )
    }
}

fn to_pool(p: &IPPool) -> Result<ipam::Pool, String> {
    let name = name_of(&p.metadata);
    let cidr: IpNet = p
        .spec
        .cidr
        .parse()
        .map_err(|e| format!("IPPool {name}: spec.cidr {:?}: {e}", p.spec.cidr))?;
    let block_prefix = u8::try_from(p.spec.block_size).map_err(|_| {
        format!(
            "IPPool {name}: spec.blockSize {} out of range",
            p.spec.block_size
        )
    })?;
    Ok(ipam::Pool {
        name,
        cidr,
        block_prefix,
        selector: Selector::from(&p.spec.node_selector),
        disabled: p.spec.disabled,
        deleting: p.metadata.deletion_timestamp.is_some(),
        created: p
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
    })
}

fn internal_ips(node: &Node) -> Vec<IpAddr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

fn had_condition(previous: &[Condition], type_: &str, status: bool, reason: &str) -> bool {
    let status = if status { "True" } else { "False" };
    previous
        .iter()
        .any(|c| c.type_ == type_ && c.status == status && c.reason == reason)
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use trellis_api::v1alpha1::IPPoolSpec;

    fn time(s: &str) -> Time {
        serde_json::from_value(serde_json::Value::String(s.into())).unwrap()
    }

    fn mk_node(name: &str, ip: &str) -> Arc<Node> {
        Arc::new(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.into(),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn mk_pool(name: &str, cidr: &str, block_size: i32) -> Arc<IPPool> {
        let mut pool = IPPool::new(
            name,
            IPPoolSpec {
                cidr: cidr.into(),
                block_size,
                node_selector: Default::default(),
                nat_outgoing: false,
                disabled: false,
            },
        );
        pool.metadata.uid = Some(format!("uid-{name}"));
        pool.metadata.generation = Some(1);
        Arc::new(pool)
    }

    fn cluster() -> Snapshot {
        Snapshot {
            nodes: vec![
                mk_node("node-a", "192.0.2.11"),
                mk_node("node-b", "192.0.2.12"),
                mk_node("node-c", "192.0.2.13"),
            ],
            pools: vec![mk_pool("default-ipv4", "10.244.0.0/16", 24)],
            ..Default::default()
        }
    }

    #[test]
    fn first_pass_writes_every_node_network_and_the_pool() {
        let plan = plan(&cluster(), &time("2026-01-01T00:00:00Z"));
        let specs: Vec<(&str, &[String])> = plan
            .node_network_specs
            .iter()
            .map(|(n, _, s)| (n.as_str(), s.pod_cidrs.as_slice()))
            .collect();
        assert_eq!(
            specs,
            [
                ("node-a", &["10.244.0.0/24".to_owned()][..]),
                ("node-b", &["10.244.1.0/24".to_owned()][..]),
                ("node-c", &["10.244.2.0/24".to_owned()][..])
            ]
        );
        assert_eq!(plan.node_network_statuses.len(), 3);
        assert_eq!(plan.finalizers_to_add, ["default-ipv4"]);
        let (_, pool_status) = &plan.pool_statuses[0];
        assert_eq!(
            (
                pool_status.blocks_in_use,
                pool_status.blocks_total,
                pool_status.utilization_percent
            ),
            (3, 256, 2)
        );
        assert!(plan.events.is_empty(), "{:?}", plan.events);
    }

    #[test]
    fn a_second_pass_and_a_restart_write_nothing() {
        let mut snapshot = cluster();
        let first = plan(&snapshot, &time("2026-01-01T00:00:00Z"));
        snapshot.apply(&first);
        // Later, from the same objects (a restarted operator sees exactly these).
        let again = plan(&snapshot, &time("2026-01-01T01:00:00Z"));
        assert_eq!(again.writes(), 0, "{again:#?}");
    }

    #[test]
    fn a_deleted_node_loses_its_node_network_and_its_block_is_reused() {
        let mut snapshot = cluster();
        let first = plan(&snapshot, &time("2026-01-01T00:00:00Z"));
        snapshot.apply(&first);
        snapshot
            .nodes
            .retain(|n| n.metadata.name.as_deref() != Some("node-a"));
        let second = plan(&snapshot, &time("2026-01-01T00:01:00Z"));
        assert_eq!(
            second.node_network_deletes,
            [("node-a".to_owned(), "uid-nn-node-a".to_owned())]
        );
        snapshot.apply(&second);
        snapshot.nodes.push(mk_node("node-d", "192.0.2.14"));
        let third = plan(&snapshot, &time("2026-01-01T00:02:00Z"));
        assert_eq!(third.node_network_specs[0].2.pod_cidrs, ["10.244.0.0/24"]);
    }

    #[test]
    fn exhaustion_is_a_condition_and_one_event_per_transition() {
        let mut snapshot = cluster();
        snapshot.pools = vec![mk_pool("tiny", "10.9.0.0/23", 24)];
        let first = plan(&snapshot, &time("2026-01-01T00:00:00Z"));
        let (_, starved) = first
            .node_network_statuses
            .iter()
            .find(|(n, _)| n == "node-c")
            .unwrap();
        assert_eq!(
            (
                starved.conditions[0].status.as_str(),
                starved.conditions[0].reason.as_str()
            ),
            ("False", "PoolExhausted")
        );
        let reasons: Vec<(&Regarding, &str)> = first
            .events
            .iter()
            .map(|e| (&e.regarding, e.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                (
                    &Regarding::Node {
                        name: "node-c".into(),
                        uid: "uid-node-c".into()
                    },
                    "PoolExhausted"
                ),
                (
                    &Regarding::Pool {
                        name: "tiny".into(),
                        uid: "uid-tiny".into()
                    },
                    "Exhausted"
                ),
            ]
        );
        snapshot.apply(&first);
        let second = plan(&snapshot, &time("2026-01-01T00:05:00Z"));
        assert!(
            second.events.is_empty(),
            "no repeated events: {:?}",
            second.events
        );
        assert_eq!(second.writes(), 0);
    }

    #[test]
    fn a_deleting_pool_keeps_its_finalizer_until_its_blocks_are_released() {
        let mut snapshot = cluster();
        let first = plan(&snapshot, &time("2026-01-01T00:00:00Z"));
        snapshot.apply(&first);
        Arc::make_mut(&mut snapshot.pools[0])
            .metadata
            .deletion_timestamp = Some(time("2026-01-01T00:01:00Z"));
        let while_used = plan(&snapshot, &time("2026-01-01T00:01:00Z"));
        assert!(while_used.finalizers_to_remove.is_empty());
        snapshot.nodes.clear();
        let released = plan(&snapshot, &time("2026-01-01T00:02:00Z"));
        assert_eq!(released.node_network_deletes.len(), 3);
        assert_eq!(released.finalizers_to_remove, ["default-ipv4"]);
    }

    #[test]
    fn a_node_without_an_address_waits_instead_of_getting_a_broken_object() {
        let mut snapshot = cluster();
        let mut bare = (*mk_node("node-z", "192.0.2.99")).clone();
        bare.status = None;
        snapshot.nodes.push(Arc::new(bare));
        let plan = plan(&snapshot, &time("2026-01-01T00:00:00Z"));
        assert_eq!(plan.waiting_for_address, ["node-z"]);
        assert!(
            plan.node_network_specs
                .iter()
                .all(|(n, _, _)| n != "node-z")
        );
    }

    #[test]
    fn an_explicit_mtu_is_checked_against_reported_underlays() {
        let mk_status = |name: &str, mtu: i32| {
            let mut s = NetworkStatus::new(name, Default::default());
            s.status = Some(trellis_api::v1alpha1::NetworkStatusStatus {
                underlay_mtu: Some(mtu),
                ..Default::default()
            });
            Arc::new(s)
        };
        let statuses = vec![mk_status("a", 1500), mk_status("b", 9000)];
        let config = NetworkConfigSpec {
            mtu: Some(1480),
            ..Default::default()
        };
        let c = config_condition(&config, &statuses);
        assert_eq!((c.status, c.reason), (false, "MTUTooLarge"));
        assert!(
            c.message.contains("a (1500)") && !c.message.contains("b (9000)"),
            "{}",
            c.message
        );
        let fits = NetworkConfigSpec {
            mtu: Some(1450),
            ..Default::default()
        };
        assert!(config_condition(&fits, &statuses).status);
        assert!(config_condition(&NetworkConfigSpec::default(), &statuses).status);
    }
}
