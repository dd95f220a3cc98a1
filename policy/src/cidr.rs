//! CIDR identities (0004 §3): one per distinct prefix — `ipBlock.cidr` or
//! `except` — in the policies a node compiles, so that "in `cidr` and in no
//! `except`" becomes a property of the longest prefix containing an address,
//! which the IP cache answers per address and the compiler decides per
//! identity.
//!
//! ```text
//!  policies ──▶ every ipBlock.cidr and except ──▶ sorted, distinct prefixes
//!                                                    │ 0x0100_0000, +1, …
//!  address ──▶ longest prefix containing it ─────────┴─▶ cidr_identity (else WORLD)
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};

use crate::identity::{CIDR_FIRST, WORLD};

/// Parses a CIDR the way Kubernetes reads one: host bits are allowed and
/// cleared (`10.0.0.1/8` is `10.0.0.0/8`). `None` when it is not a CIDR.
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().ok().map(|n| n.trunc())
}

/// The CIDR identities of one node: prefix → identity.
///
/// Ids follow the sorted order of the prefixes (IPv4 first, then by address
/// and length), so the same set of prefixes gives the same ids whatever the
/// order of the policies they came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CidrTable {
    ids: BTreeMap<IpNet, u32>,
    /// Prefix lengths in use, longest first, per family.
    v4_lens: Vec<u8>,
    v6_lens: Vec<u8>,
}

impl CidrTable {
    /// Every `ipBlock.cidr` and `except` prefix of `policies`, in both
    /// directions. Strings that are not CIDRs are skipped here; the compiler
    /// reports them for the pods whose policies hold them.
    pub fn from_policies<'a>(policies: impl IntoIterator<Item = &'a NetworkPolicy>) -> Self {
        CidrTable::from_prefixes(policies.into_iter().flat_map(policy_prefixes))
    }

    /// The table for exactly these prefixes (host bits cleared, repeats
    /// merged).
    pub fn from_prefixes(prefixes: impl IntoIterator<Item = IpNet>) -> Self {
        let mut sorted: Vec<IpNet> = prefixes.into_iter().map(|p| p.trunc()).collect();
        sorted.sort();
        sorted.dedup();
        // Never more than 2^32 − 2^24 prefixes in practice; stop rather than wrap.
        let ids: BTreeMap<IpNet, u32> = sorted.into_iter().zip(CIDR_FIRST..=u32::MAX).collect();
        let lens = |v4: bool| {
            let mut lens: Vec<u8> = ids
                .keys()
                .filter(|p| matches!(p, IpNet::V4(_)) == v4)
                .map(IpNet::prefix_len)
                .collect();
            lens.sort_unstable_by(|a, b| b.cmp(a));
            lens.dedup();
            lens
        };
        let (v4_lens, v6_lens) = (lens(true), lens(false));
        CidrTable {
            ids,
            v4_lens,
            v6_lens,
        }
    }

    /// The identity of the longest prefix containing `addr`, or [`WORLD`].
    /// The node writes this as the IP cache's `cidr_identity` for every
    /// address, pods' and its own included.
    pub fn cidr_identity(&self, addr: IpAddr) -> u32 {
        let found = match addr {
            IpAddr::V4(a) => self.v4_lens.iter().find_map(|&len| {
                let net = Ipv4Net::new(a, len).ok()?.trunc();
                self.ids.get(&IpNet::V4(net))
            }),
            IpAddr::V6(a) => self.v6_lens.iter().find_map(|&len| {
                let net = Ipv6Net::new(a, len).ok()?.trunc();
                self.ids.get(&IpNet::V6(net))
            }),
        };
        found.copied().unwrap_or(WORLD)
    }

    /// The identity of exactly `prefix`, when the table holds it.
    pub fn identity_of(&self, prefix: &IpNet) -> Option<u32> {
        self.ids.get(&prefix.trunc()).copied()
    }

    /// Every (prefix, identity), in identity order.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, u32)> + '_ {
        self.ids.iter().map(|(p, id)| (*p, *id))
    }

    /// How many prefixes.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

fn policy_prefixes(policy: &NetworkPolicy) -> impl Iterator<Item = IpNet> + '_ {
    let spec = policy.spec.as_ref();
    let ingress = spec
        .and_then(|s| s.ingress.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|r| r.from.iter().flatten());
    let egress = spec
        .and_then(|s| s.egress.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|r| r.to.iter().flatten());
    ingress.chain(egress).flat_map(peer_prefixes)
}

fn peer_prefixes(peer: &NetworkPolicyPeer) -> impl Iterator<Item = IpNet> + '_ {
    peer.ip_block.iter().flat_map(|b| {
        std::iter::once(b.cidr.as_str())
            .chain(b.except.iter().flatten().map(String::as_str))
            .filter_map(parse_cidr)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::{
        IPBlock, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicySpec,
    };

    fn block(cidr: &str, except: &[&str]) -> NetworkPolicyPeer {
        NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: cidr.to_owned(),
                except: Some(except.iter().map(|e| (*e).to_owned()).collect()),
            }),
            ..Default::default()
        }
    }

    fn policy(from: Vec<NetworkPolicyPeer>, to: Vec<NetworkPolicyPeer>) -> NetworkPolicy {
        NetworkPolicy {
            spec: Some(NetworkPolicySpec {
                ingress: Some(vec![NetworkPolicyIngressRule {
                    from: Some(from),
                    ports: None,
                }]),
                egress: Some(vec![NetworkPolicyEgressRule {
                    to: Some(to),
                    ports: None,
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_ids_are_sorted() {
        let p = policy(
            vec![block("10.0.0.0/8", &["10.1.0.0/16", "10.1.2.0/24"])],
            vec![
                block("fd00::/8", &["fd00:1::/32"]),
                block("bogus", &["10.0.0.0/99"]),
            ],
        );
        let t = CidrTable::from_policies([&p]);
        assert_eq!(t.len(), 5);
        let id = |s: &str| t.identity_of(&s.parse().unwrap()).unwrap();
        assert_eq!(id("10.0.0.0/8"), CIDR_FIRST);
        assert_eq!(id("10.1.0.0/16"), CIDR_FIRST + 1);
        assert_eq!(id("10.1.2.0/24"), CIDR_FIRST + 2);
        assert_eq!(id("fd00::/8"), CIDR_FIRST + 3);
        assert_eq!(id("fd00:1::/32"), CIDR_FIRST + 4);

        let cases = [
            ("10.9.9.9", id("10.0.0.0/8")),
            ("10.1.9.9", id("10.1.0.0/16")),
            ("10.1.2.3", id("10.1.2.0/24")),
            ("11.0.0.1", WORLD),
            ("fd00:2::1", id("fd00::/8")),
            ("fd00:1::1", id("fd00:1::/32")),
            ("fe80::1", WORLD),
            // An IPv4-mapped IPv6 address is IPv6 to the IP cache.
            ("::ffff:10.0.0.1", WORLD),
        ];
        for (addr, want) in cases {
            assert_eq!(t.cidr_identity(ip(addr)), want, "{addr}");
        }
    }

    #[test]
    fn host_bits_are_cleared() {
        assert_eq!(
            parse_cidr("10.0.0.1/8"),
            Some("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(parse_cidr("10.0.0.0"), None);
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_cidr(""), None);
        let t = CidrTable::from_prefixes(["10.0.0.1/8".parse().unwrap()]);
        assert_eq!(t.cidr_identity(ip("10.200.0.1")), CIDR_FIRST);
    }

    #[test]
    fn zero_length_prefixes_cover_their_family_only() {
        let t = CidrTable::from_prefixes(["0.0.0.0/0".parse().unwrap()]);
        assert_eq!(t.cidr_identity(ip("192.0.2.1")), CIDR_FIRST);
        assert_eq!(t.cidr_identity(ip("2001:db8::1")), WORLD);
    }

    #[test]
    fn same_prefixes_same_ids_whatever_the_order() {
        let a = policy(vec![block("10.0.0.0/8", &["10.1.0.0/16"])], vec![]);
        let b = policy(
            vec![],
            vec![block("192.168.0.0/16", &[]), block("10.0.0.0/8", &[])],
        );
        assert_eq!(
            CidrTable::from_policies([&a, &b]),
            CidrTable::from_policies([&b, &a])
        );
    }
}
