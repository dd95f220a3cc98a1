//! Where pod addresses can be, for the compiler (`Input::pod_networks`,
//! design 0006): the IP pools' ranges, as long as every pod address the
//! node knows lies in one of them. Pure.
//!
//! ```text
//!  IPPool.spec.cidr (all pools, disabled ones too) ──┐
//!  pod addresses (this node's, the shards')  ─────────┴─▶ all inside? Some(cidrs) : None
//! ```
//!
//! The compiler relies on the answer: a pod identity's entries may then
//! ignore the CIDR classes no pod address can be in. A pool's `cidr` is
//! immutable and a pool stays until its blocks are released, so the pools
//! hold every pod address, except while this node's pool cache lags a new
//! pool whose addresses it already sees; then the answer is `None` (any
//! address), which is never wider, until the cache catches up.

use std::net::IpAddr;

use ipnet::IpNet;
use trellis_api::v1alpha1::IPPool;
use trellis_policy::cidr::parse_cidr;

/// The pools' ranges, when every one of `addresses` lies in one of them;
/// `None` (unknown: any address) otherwise, or when there is no pool.
pub fn pod_networks<'a>(
    pools: impl IntoIterator<Item = &'a IPPool>,
    addresses: impl IntoIterator<Item = IpAddr>,
) -> Option<Vec<IpNet>> {
    let mut nets: Vec<IpNet> = pools
        .into_iter()
        .filter_map(|p| parse_cidr(&p.spec.cidr))
        .collect();
    nets.sort();
    nets.dedup();
    if nets.is_empty() {
        return None;
    }
    let mut addresses = addresses.into_iter();
    addresses
        .all(|a| nets.iter().any(|n| n.contains(&a)))
        .then_some(nets)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // A pool this node has not seen yet, or an address from elsewhere.
        assert_eq!(pod_networks(&pools, [ip("10.245.0.1")]), None);
        assert_eq!(pod_networks(&pools, [ip("fd00::1")]), None);
        assert_eq!(pod_networks(&[], [ip("10.244.0.1")]), None);
        // A pool whose cidr is not one (a stale CRD) is not a range.
        assert_eq!(pod_networks(&[pool("bad", "nope")], []), None);
    }
}
