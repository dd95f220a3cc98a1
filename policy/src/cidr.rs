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
use trellis_api::v1alpha1::PolicyBundle;

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
/// order of the policies they came from; [`CidrTable::renumbered_like`]
/// keeps the ids of an earlier table instead, for a node whose policies
/// change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CidrTable {
    ids: BTreeMap<IpNet, u32>,
    /// Id → prefix.
    prefixes: BTreeMap<u32, IpNet>,
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

    /// Every prefix of `policies` (as [`CidrTable::from_policies`]) and of
    /// the `ipBlock` peers of `bundles` (`cidr` and `except`, both
    /// directions).
    pub fn from_objects<'a>(
        policies: impl IntoIterator<Item = &'a NetworkPolicy>,
        bundles: impl IntoIterator<Item = &'a PolicyBundle>,
    ) -> Self {
        let from_policies = policies.into_iter().flat_map(policy_prefixes);
        let from_bundles = bundles.into_iter().flat_map(bundle_prefixes);
        CidrTable::from_prefixes(from_policies.chain(from_bundles).collect::<Vec<_>>())
    }

    /// The table for exactly these prefixes (host bits cleared, repeats
    /// merged).
    pub fn from_prefixes(prefixes: impl IntoIterator<Item = IpNet>) -> Self {
        let mut sorted: Vec<IpNet> = prefixes.into_iter().map(|p| p.trunc()).collect();
        sorted.sort();
        sorted.dedup();
        // Never more than 2^32 − 2^24 prefixes in practice; stop rather than wrap.
        let ids: BTreeMap<IpNet, u32> = sorted.into_iter().zip(CIDR_FIRST..=u32::MAX).collect();
        CidrTable::with_ids(ids)
    }

    /// This table's prefixes under the ids `previous` gave them; a prefix
    /// `previous` does not hold gets the smallest id that `previous` does
    /// not use (so not the id of a prefix it drops either), in prefix
    /// order. A node renumbers its table like the one before whenever its
    /// policies change, so a change moves no id it did not add or remove:
    /// the IP cache entries of addresses whose prefixes stayed stay as they
    /// are (one write per address in a changed prefix, not one per address
    /// in the cluster), and no id means one prefix to the tables being
    /// replaced and another to their successors. The ids then depend on the
    /// node's history; nothing outside the node reads them.
    pub fn renumbered_like(&self, previous: &CidrTable) -> CidrTable {
        let mut ids: BTreeMap<IpNet, u32> = self
            .ids
            .keys()
            .filter_map(|p| Some((*p, previous.identity_of(p)?)))
            .collect();
        let mut next = CIDR_FIRST;
        for p in self.ids.keys() {
            if ids.contains_key(p) {
                continue;
            }
            while previous.prefixes.contains_key(&next) {
                next = next.saturating_add(1);
            }
            ids.insert(*p, next);
            next = next.saturating_add(1);
        }
        CidrTable::with_ids(ids)
    }

    /// The table of exactly these (prefix, id) pairs (host bits cleared).
    fn with_ids(ids: BTreeMap<IpNet, u32>) -> Self {
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
            prefixes: ids.iter().map(|(p, id)| (*id, *p)).collect(),
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

    /// The prefix of CIDR identity `id`.
    pub fn prefix_of(&self, id: u32) -> Option<IpNet> {
        self.prefixes.get(&id).copied()
    }

    /// An address inside `within` whose [`CidrTable::cidr_identity`] is
    /// `class` (a CIDR identity, or [`WORLD`] for "in no prefix"), when
    /// there is one. A prefix's addresses are its own unless a longer
    /// prefix holds them, so the class of a prefix can be empty, or empty
    /// inside `within`; the compiler uses this to know which classes a pod
    /// address can be in (design 0006).
    pub fn witness(&self, class: u32, within: IpNet) -> Option<IpAddr> {
        let within = within.trunc();
        // The class's own prefix, and the prefixes that take addresses from it.
        let (scope, longer): (Option<IpNet>, Vec<IpNet>) = if class == WORLD {
            (None, self.ids.keys().copied().collect())
        } else {
            let own = self.prefix_of(class)?;
            let longer = self
                .ids
                .keys()
                .filter(|q| **q != own && own.contains(*q))
                .copied()
                .collect();
            (Some(own), longer)
        };
        let start = match scope {
            None => within,
            Some(own) if own.contains(&within) => within,
            Some(own) if within.contains(&own) => own,
            Some(_) => return None,
        };
        if longer.iter().any(|q| q.contains(&start)) {
            return None;
        }
        let inside: Vec<IpNet> = longer.into_iter().filter(|q| start.contains(q)).collect();
        first_uncovered(start, &inside)
    }

    /// Every (prefix, identity), in identity order.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, u32)> + '_ {
        self.prefixes.iter().map(|(id, p)| (*p, *id))
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

/// The first address of `net` that no prefix of `holes` (all strictly
/// inside `net`) contains.
fn first_uncovered(net: IpNet, holes: &[IpNet]) -> Option<IpAddr> {
    if holes.is_empty() {
        return Some(net.network());
    }
    if holes.contains(&net) {
        return None;
    }
    let halves = net.subnets(net.prefix_len().checked_add(1)?).ok()?;
    for half in halves {
        let inside: Vec<IpNet> = holes
            .iter()
            .filter(|h| half.contains(*h))
            .copied()
            .collect();
        if let Some(a) = first_uncovered(half, &inside) {
            return Some(a);
        }
    }
    None
}

fn bundle_prefixes(bundle: &PolicyBundle) -> impl Iterator<Item = IpNet> + '_ {
    bundle
        .spec
        .ingress
        .iter()
        .chain(&bundle.spec.egress)
        .flat_map(|r| &r.peers)
        .filter_map(|p| p.ip_block.as_ref())
        .flat_map(|b| std::iter::once(&b.cidr).chain(&b.except))
        .filter_map(|s| parse_cidr(s))
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

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// A witness is an address of the class inside the range, checked with
    /// `cidr_identity`; none is found exactly when longer prefixes cover
    /// the class there.
    #[test]
    fn witnesses_are_addresses_of_their_class() {
        let t = CidrTable::from_prefixes(
            [
                "10.0.0.0/8",
                "10.1.0.0/16",
                "10.1.0.0/17",
                "10.1.128.0/17",
                "0.0.0.0/0",
            ]
            .map(net),
        );
        let id = |s: &str| t.identity_of(&net(s)).unwrap();
        let cases: &[(u32, &str, Option<&str>)] = &[
            (id("10.0.0.0/8"), "0.0.0.0/0", Some("10.0.0.0")),
            (id("10.0.0.0/8"), "10.1.0.0/16", None),
            (id("10.0.0.0/8"), "10.2.0.0/16", Some("10.2.0.0")),
            // Both halves of 10.1.0.0/16 are prefixes of their own.
            (id("10.1.0.0/16"), "0.0.0.0/0", None),
            (id("10.1.128.0/17"), "10.1.0.0/16", Some("10.1.128.0")),
            (id("10.1.128.0/17"), "10.1.0.0/17", None),
            (id("0.0.0.0/0"), "0.0.0.0/0", Some("0.0.0.0")),
            (id("0.0.0.0/0"), "10.0.0.0/8", None),
            (id("0.0.0.0/0"), "::/0", None),
            (WORLD, "0.0.0.0/0", None),
            (WORLD, "::/0", Some("::")),
            (WORLD, "11.0.0.0/8", None),
            (CIDR_FIRST + 99, "0.0.0.0/0", None),
        ];
        for (class, within, want) in cases {
            let got = t.witness(*class, net(within));
            assert_eq!(got, want.map(ip), "class {class:#x} within {within}");
            if let Some(a) = got {
                assert_eq!(t.cidr_identity(a), *class);
                assert!(net(within).contains(&a));
            }
        }
        let t = CidrTable::from_prefixes(["10.0.0.0/8"].map(net));
        assert_eq!(t.witness(WORLD, net("10.0.0.0/7")), Some(ip("11.0.0.0")));
        assert_eq!(t.prefix_of(CIDR_FIRST), Some(net("10.0.0.0/8")));
        assert_eq!(t.prefix_of(CIDR_FIRST + 1), None);
        assert_eq!(t.prefix_of(WORLD), None);
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

    #[test]
    fn renumbering_keeps_the_ids_of_prefixes_that_stay() {
        let before =
            CidrTable::from_prefixes(["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16"].map(net));
        let id = |t: &CidrTable, p: &str| t.identity_of(&net(p)).expect("in the table");
        // 10.0.0.0/8 goes, 10.0.5.0/24 comes (sorted before 10.1.0.0/16).
        let fresh =
            CidrTable::from_prefixes(["10.0.5.0/24", "10.1.0.0/16", "192.168.0.0/16"].map(net));
        let kept = fresh.renumbered_like(&before);
        assert_eq!(id(&kept, "10.1.0.0/16"), id(&before, "10.1.0.0/16"));
        assert_eq!(id(&kept, "192.168.0.0/16"), id(&before, "192.168.0.0/16"));
        // The new prefix does not take the id that went free in the same
        // change (10.0.0.0/8's): the tables being replaced read it so.
        assert_eq!(id(&kept, "10.0.5.0/24"), CIDR_FIRST + 3);
        // One change later it is free.
        let later = CidrTable::from_prefixes(["10.0.5.0/24", "10.2.0.0/16"].map(net))
            .renumbered_like(&kept);
        assert_eq!(id(&later, "10.2.0.0/16"), CIDR_FIRST);
        // A prefix sorted before the others: fresh numbering moves every
        // one of them, renumbering none.
        let added = CidrTable::from_prefixes(
            ["1.0.0.0/8", "10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16"].map(net),
        );
        let added_kept = added.renumbered_like(&before);
        for p in ["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16"] {
            assert_ne!(id(&added, p), id(&before, p), "{p} fresh");
            assert_eq!(id(&added_kept, p), id(&before, p), "{p} renumbered");
        }
        assert_eq!(id(&added_kept, "1.0.0.0/8"), CIDR_FIRST + 3);
        // Every lookup agrees with the ids.
        for (p, i) in kept.iter() {
            assert_eq!(kept.prefix_of(i), Some(p));
            assert_eq!(kept.cidr_identity(p.addr()), i);
        }
        assert_eq!(kept.cidr_identity(ip("10.0.5.7")), id(&kept, "10.0.5.0/24"));
        assert_eq!(kept.cidr_identity(ip("10.9.0.1")), WORLD);
        assert_eq!(kept.len(), 3);
        // Like nothing: the fresh numbering; like itself: itself.
        assert_eq!(fresh.renumbered_like(&CidrTable::default()), fresh);
        assert_eq!(kept.renumbered_like(&kept), kept);
        // New prefixes skip every id in use.
        let grown = CidrTable::from_prefixes(
            ["1.0.0.0/8", "2.0.0.0/8", "3.0.0.0/8", "192.168.0.0/16"].map(net),
        )
        .renumbered_like(&before);
        let ids: Vec<u32> = grown.iter().map(|(_, i)| i).collect();
        assert_eq!(id(&grown, "192.168.0.0/16"), id(&before, "192.168.0.0/16"));
        assert_eq!(ids.len(), 4);
        let distinct: std::collections::BTreeSet<u32> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), 4, "{ids:?}");
    }
}
