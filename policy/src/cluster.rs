//! The compiler's [`Input`] from the cluster's objects, the one way: every
//! node builds it with these functions, and so does `kubectl trellis
//! explain`, so what the tool explains is what the nodes enforce. Pure.
//!
//! ```text
//!  NetworkConfig mode, NetworkPolicies, PolicyBundles ──▶ policy_input (CIDR identities from them)
//!  SecurityIdentities ──▶ identity_infos ─┐
//!  NodeEndpoints shards ──▶ read_shards ──┴─▶ with_named_ports ──▶ Input::identities
//!      └─ every pod address ─┐
//!  IPPools ──────────────────┴─▶ pod_networks ──▶ Input::pod_networks
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use trellis_api::v1alpha1::{
    IPPool, NodeEndpoints, PolicyBundle, PolicyEnforcement, SecurityIdentity,
};

use crate::cidr::{CidrTable, parse_cidr};
use crate::compile::Input;
use crate::identity::{IdentityInfo, NamedPorts};

/// The policy part of the input: the mode, the policies, the bundles and
/// the CIDR identities of their prefixes. Identities and `pod_networks`
/// are left empty (unknown) for the caller to set.
pub fn policy_input(
    enforcement: PolicyEnforcement,
    policies: Vec<NetworkPolicy>,
    bundles: Vec<PolicyBundle>,
) -> Input {
    Input {
        enforcement,
        cidrs: CidrTable::from_objects(&policies, &bundles),
        policies,
        bundles,
        identities: Vec::new(),
        pod_networks: None,
    }
}

/// The pod identities the `SecurityIdentity` objects hold, sorted (a
/// malformed object is skipped: no pod can carry it), without named ports.
pub fn identity_infos<'a>(
    objects: impl IntoIterator<Item = &'a SecurityIdentity>,
) -> Vec<IdentityInfo> {
    let mut infos: Vec<IdentityInfo> = objects
        .into_iter()
        .filter_map(|i| IdentityInfo::try_from(i).ok())
        .collect();
    infos.sort();
    infos
}

/// `identities`, each with the named ports `named` lists for it added.
pub fn with_named_ports(
    identities: &[IdentityInfo],
    named: &BTreeMap<u32, NamedPorts>,
) -> Vec<IdentityInfo> {
    identities
        .iter()
        .map(|i| {
            let mut i = i.clone();
            if let Some(p) = named.get(&i.id) {
                i.named_ports.extend(p);
            }
            i
        })
        .collect()
}

/// One pod address a shard publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardAddress {
    /// The address.
    pub address: IpAddr,
    /// The pod's identity.
    pub identity: u32,
    /// The node whose shard lists it (the shard's name).
    pub node: String,
    /// The pod's namespace and name.
    pub pod: (String, String),
}

/// What the `NodeEndpoints` shards say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shards {
    /// The union of the named ports of the pods of each identity.
    pub named: BTreeMap<u32, NamedPorts>,
    /// Every pod address, with its identity and node.
    pub addresses: Vec<ShardAddress>,
}

/// Reads every endpoint of `shards`. An entry whose identity is not a
/// number the datapath can hold, or an address that does not parse, is
/// skipped (the schema refuses both).
pub fn read_shards<'a>(shards: impl IntoIterator<Item = &'a NodeEndpoints>) -> Shards {
    let mut out = Shards::default();
    for shard in shards {
        let node = shard.metadata.name.clone().unwrap_or_default();
        for ep in &shard.spec.endpoints {
            let Ok(identity) = u32::try_from(ep.identity) else {
                continue;
            };
            out.named
                .entry(identity)
                .or_default()
                .extend(&NamedPorts::from_api(&ep.named_ports));
            for a in &ep.addresses {
                if let Ok(address) = a.parse::<IpAddr>() {
                    out.addresses.push(ShardAddress {
                        address,
                        identity,
                        node: node.clone(),
                        pod: (ep.namespace.clone(), ep.name.clone()),
                    });
                }
            }
        }
    }
    out
}

/// Where pod addresses can be (design 0006, [`Input::pod_networks`]): the
/// IP pools' ranges (all pools, disabled ones too), as long as every one of
/// `addresses` lies in one of them; `None` (unknown: any address)
/// otherwise, or when there is no pool.
///
/// A pool's `cidr` is immutable and a pool stays until its blocks are
/// released, so the pools hold every pod address, except while a cache of
/// the pools lags a new pool whose addresses are already seen; then the
/// answer is `None`, which is never wider, until the cache catches up.
pub fn pod_networks<'a>(
    pools: impl IntoIterator<Item = &'a IPPool>,
    addresses: impl IntoIterator<Item = IpAddr>,
) -> Option<Vec<IpNet>> {
    let nets = pool_networks(pools);
    if nets.is_empty() {
        return None;
    }
    let mut addresses = addresses.into_iter();
    addresses
        .all(|a| nets.iter().any(|n| n.contains(&a)))
        .then_some(nets)
}

/// The pools' ranges (all pools, disabled ones too), sorted, each once; a
/// `cidr` that is not one is skipped. [`pod_networks`] is these when every
/// pod address is in one.
pub fn pool_networks<'a>(pools: impl IntoIterator<Item = &'a IPPool>) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = pools
        .into_iter()
        .filter_map(|p| parse_cidr(&p.spec.cidr))
        .collect();
    nets.sort();
    nets.dedup();
    nets
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::Protocol;

    fn pool(name: &str, cidr: &str) -> IPPool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "network.trellis.dev/v1alpha1",
            "kind": "IPPool",
            "metadata": {"name": name},
            "spec": {"cidr": cidr, "blockSize": 26},
        }))
        .expect("an IPPool")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn the_pools_when_they_hold_every_pod_address() {
        let pools = [pool("a", "10.244.0.0/16"), pool("b", "fd00:10:244::/56")];
        assert_eq!(
            pod_networks(&pools, [ip("10.244.1.5"), ip("fd00:10:244::9")]),
            Some(vec![
                "10.244.0.0/16".parse().expect("net"),
                "fd00:10:244::/56".parse().expect("net"),
            ])
        );
        // No pod yet: the pools still say where pods will be.
        assert!(pod_networks(&pools, []).is_some());
    }

    #[test]
    fn unknown_when_an_address_is_outside_or_there_is_no_pool() {
        let pools = [pool("a", "10.244.0.0/16")];
        // A pool not seen yet, or an address from elsewhere.
        assert_eq!(pod_networks(&pools, [ip("10.245.0.1")]), None);
        assert_eq!(pod_networks(&pools, [ip("fd00::1")]), None);
        assert_eq!(pod_networks(&[], [ip("10.244.0.1")]), None);
        // A pool whose cidr is not one (a stale CRD) is not a range.
        assert_eq!(pod_networks(&[pool("bad", "nope")], []), None);
    }

    #[test]
    fn shards_give_named_ports_per_identity_and_every_address() {
        let shard = |node: &str, endpoints: serde_json::Value| -> NodeEndpoints {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "network.trellis.dev/v1alpha1",
                "kind": "NodeEndpoints",
                "metadata": {"name": node},
                "spec": {"endpoints": endpoints},
            }))
            .expect("a NodeEndpoints")
        };
        let shards = [
            shard(
                "n1",
                serde_json::json!([
                    {"namespace": "x", "name": "a", "addresses": ["10.244.1.2"], "identity": 300,
                     "namedPorts": [{"name": "http", "protocol": "TCP", "port": 8080}]},
                    {"namespace": "x", "name": "bad", "addresses": ["10.244.1.3"], "identity": -1},
                ]),
            ),
            shard(
                "n2",
                serde_json::json!([
                    {"namespace": "x", "name": "b", "addresses": ["10.244.2.2", "fd00::2"], "identity": 300,
                     "namedPorts": [{"name": "dns", "protocol": "UDP", "port": 53}]},
                ]),
            ),
        ];
        let read = read_shards(&shards);
        let mut want = NamedPorts::new();
        want.insert("http", Protocol::Tcp, 8080);
        want.insert("dns", Protocol::Udp, 53);
        assert_eq!(read.named, BTreeMap::from([(300, want.clone())]));
        let addresses: Vec<(IpAddr, u32, &str, &str)> = read
            .addresses
            .iter()
            .map(|a| (a.address, a.identity, a.node.as_str(), a.pod.1.as_str()))
            .collect();
        assert_eq!(
            addresses,
            [
                (ip("10.244.1.2"), 300, "n1", "a"),
                (ip("10.244.2.2"), 300, "n2", "b"),
                (ip("fd00::2"), 300, "n2", "b"),
            ]
        );

        let identity: SecurityIdentity = serde_json::from_value(serde_json::json!({
            "apiVersion": "network.trellis.dev/v1alpha1",
            "kind": "SecurityIdentity",
            "metadata": {"name": "300"},
            "spec": {"namespace": "x", "namespaceLabels": {}, "podLabels": {"app": "a"}},
        }))
        .expect("a SecurityIdentity");
        let infos = with_named_ports(&identity_infos([&identity]), &read.named);
        assert_eq!(infos.len(), 1);
        assert_eq!((infos[0].id, &infos[0].named_ports), (300, &want));
    }
}
