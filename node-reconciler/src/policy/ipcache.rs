//! The IP cache this node should hold, kept claim by claim, so that a sync
//! costs what changed (ARCHITECTURE: "reconcile cost is proportional to what
//! changed, not to the cluster"): a pod starting elsewhere touches its own
//! addresses, not the 150,000 others. Pure.
//!
//! ```text
//!  CIDR table (the policies) ────── set_cidrs ─────┐  (rare: every key again)
//!  this node's endpoints ─── set_source(Local) ────┤
//!  this node's addresses ─── set_source(Host) ─────┼─▶ claims per address ─▶ want: the map's contents
//!  another node's shard ──── set_source(Shard(n)) ─┘        ├─▶ conflicts per address
//!                                                           └─▶ touched: keys whose entry may differ
//!                                                                 └─▶ sync::plan_with(Keys(touched))
//! ```
//!
//! [`IpCacheIndex::want`] is, after every step, what
//! [`super::desired::desired`] computes from scratch for the same claims
//! (its `ipcache` and its address conflicts): the rules are written once,
//! there, and `tests/ipcache_index.rs` holds the two equal on random
//! sequences of changes. A source is replaced as a whole, and only the
//! addresses it had or has are looked at again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use trellis_policy::cidr::CidrTable;
use trellis_policy::identity::WORLD;

use super::desired::{Claim, Claimant, Conflict};
use crate::bpf::abi::IpCacheEntry;

/// Where claims come from; each is replaced as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// This node's pod endpoints (claims by [`Claimant::Local`]).
    Local,
    /// This node's own addresses ([`Claimant::Host`]).
    Host,
    /// Another node's `NodeEndpoints` shard, by name ([`Claimant::Remote`]).
    Shard(String),
}

/// The desired IP cache and what it is made of.
#[derive(Debug, Default)]
pub struct IpCacheIndex {
    cidrs: CidrTable,
    sources: HashMap<Source, Vec<(IpAddr, Claim)>>,
    /// Every claim on each address, repeats included (two shards listing
    /// one pod are two claims).
    claims: HashMap<IpAddr, Vec<Claim>>,
    want: BTreeMap<IpNet, IpCacheEntry>,
    /// The address conflicts of each address that has any, sorted.
    conflicts: BTreeMap<IpAddr, Vec<Conflict>>,
    /// Keys whose entry in `want` may differ from what the last
    /// [`IpCacheIndex::take_touched`] saw.
    touched: BTreeSet<IpNet>,
    /// Where pod addresses can be (the pools' ranges), and the pod
    /// addresses outside all of them.
    pod_nets: Vec<IpNet>,
    outside: BTreeSet<IpAddr>,
}

impl IpCacheIndex {
    /// Nothing claimed, no CIDR prefix.
    pub fn new() -> Self {
        IpCacheIndex::default()
    }

    /// The IP cache's contents: prefix → (identity, CIDR identity).
    pub fn want(&self) -> &BTreeMap<IpNet, IpCacheEntry> {
        &self.want
    }

    /// Every address conflict, sorted by address, then as
    /// [`super::desired::desired`] sorts them.
    pub fn conflicts(&self) -> impl Iterator<Item = &Conflict> {
        self.conflicts.values().flatten()
    }

    /// The keys whose entry may have changed since the last call; the
    /// caller plans exactly these, and hands back with
    /// [`IpCacheIndex::touch`] those it could not write.
    pub fn take_touched(&mut self) -> BTreeSet<IpNet> {
        std::mem::take(&mut self.touched)
    }

    /// Marks `net` to be planned again.
    pub fn touch(&mut self, net: IpNet) {
        self.touched.insert(net);
    }

    /// After the writes planned for `planned`: touches again each of those
    /// keys whose entry in `installed` (the mirror) is not the wanted one (a
    /// failed write, a removal held back), so the next plan has it.
    pub fn settle<'a>(
        &mut self,
        planned: impl IntoIterator<Item = &'a IpNet>,
        installed: &BTreeMap<IpNet, IpCacheEntry>,
    ) {
        for net in planned {
            if self.want.get(net) != installed.get(net) {
                self.touched.insert(*net);
            }
        }
    }

    /// The policies' CIDR prefixes. A different table looks at every key
    /// again (each address's CIDR identity can change); an equal one costs
    /// a comparison.
    pub fn set_cidrs(&mut self, cidrs: &CidrTable) {
        if &self.cidrs == cidrs {
            return;
        }
        let old = std::mem::replace(&mut self.cidrs, cidrs.clone());
        let prefixes: BTreeSet<IpNet> = old.iter().chain(cidrs.iter()).map(|(p, _)| p).collect();
        let addresses: Vec<IpAddr> = self.claims.keys().copied().collect();
        for p in prefixes {
            self.refresh(p);
        }
        for a in addresses {
            self.refresh(IpNet::from(a));
        }
    }

    /// Replaces every claim of `source` with `claims` (an empty list
    /// removes the source). Costs the old and new claims of the source.
    pub fn set_source(&mut self, source: Source, claims: Vec<(IpAddr, Claim)>) {
        let old = match self.sources.get(&source) {
            Some(old) if *old == claims => return,
            Some(_) => self.sources.remove(&source).unwrap_or_default(),
            None if claims.is_empty() => return,
            None => Vec::new(),
        };
        for (addr, claim) in &old {
            if let Some(list) = self.claims.get_mut(addr) {
                if let Some(i) = list.iter().position(|c| c == claim) {
                    list.swap_remove(i);
                }
                if list.is_empty() {
                    self.claims.remove(addr);
                }
            }
        }
        for (addr, claim) in &claims {
            self.claims.entry(*addr).or_default().push(*claim);
        }
        let addresses: BTreeSet<IpAddr> = old.iter().chain(&claims).map(|(a, _)| *a).collect();
        if !claims.is_empty() {
            self.sources.insert(source, claims);
        }
        for a in addresses {
            self.refresh(IpNet::from(a));
        }
    }

    /// The pools' ranges, as `trellis_policy::cluster::pool_networks`
    /// gives them. Another set than before looks at every pod address.
    pub fn set_pod_nets(&mut self, nets: Vec<IpNet>) {
        if self.pod_nets == nets {
            return;
        }
        self.pod_nets = nets;
        self.outside = self
            .claims
            .iter()
            .filter(|(a, list)| is_pod(list) && !self.in_pod_nets(**a))
            .map(|(a, _)| *a)
            .collect();
    }

    /// `Input::pod_networks`: the pools' ranges when every pod address
    /// (this node's endpoints and the shards') is in one, else `None`
    /// (as `trellis_policy::cluster::pod_networks`).
    pub fn pod_networks(&self) -> Option<Vec<IpNet>> {
        (!self.pod_nets.is_empty() && self.outside.is_empty()).then(|| self.pod_nets.clone())
    }

    /// How many addresses are claimed.
    pub fn addresses(&self) -> usize {
        self.claims.len()
    }

    fn in_pod_nets(&self, addr: IpAddr) -> bool {
        self.pod_nets.iter().any(|n| n.contains(&addr))
    }

    /// Computes the entry and conflicts of `net` again from its claims and
    /// the CIDR table; marks it touched when the entry changed.
    fn refresh(&mut self, net: IpNet) {
        let host = net.prefix_len() == net.max_prefix_len();
        let list = host.then(|| self.claims.get(&net.addr())).flatten();
        let entry = match list.and_then(|l| best(l)) {
            Some(kept) => Some(IpCacheEntry {
                identity: kept.identity,
                cidr_identity: self.cidrs.cidr_identity(net.addr()),
            }),
            None => self.cidrs.identity_of(&net).map(|id| IpCacheEntry {
                identity: WORLD,
                cidr_identity: id,
            }),
        };
        if host {
            let addr = net.addr();
            let conflicts = list.map(|l| conflicts_of(addr, l)).unwrap_or_default();
            if conflicts.is_empty() {
                self.conflicts.remove(&addr);
            } else {
                self.conflicts.insert(addr, conflicts);
            }
            if list.is_some_and(|l| is_pod(l)) && !self.in_pod_nets(addr) {
                self.outside.insert(addr);
            } else {
                self.outside.remove(&addr);
            }
        }
        let changed = match entry {
            Some(e) => self.want.insert(net, e) != Some(e),
            None => self.want.remove(&net).is_some(),
        };
        if changed {
            self.touched.insert(net);
        }
    }
}

/// The claim an address keeps: the lowest rank, then the lowest claimant
/// (the first local endpoint by ifindex).
fn best(claims: &[Claim]) -> Option<&Claim> {
    claims.iter().min_by_key(|c| (c.rank(), **c))
}

/// Every distinct claim on `addr` whose identity differs from the kept one.
fn conflicts_of(addr: IpAddr, claims: &[Claim]) -> Vec<Conflict> {
    let Some(kept) = best(claims) else {
        return Vec::new();
    };
    let dropped: BTreeSet<&Claim> = claims
        .iter()
        .filter(|c| c.identity != kept.identity)
        .collect();
    dropped
        .into_iter()
        .map(|c| Conflict::Address {
            address: addr,
            kept: *kept,
            dropped: *c,
        })
        .collect()
}

/// Whether a pod (local or remote) claims the address.
fn is_pod(claims: &[Claim]) -> bool {
    claims.iter().any(|c| c.by != Claimant::Host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_policy::identity::HOST;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("a prefix")
    }

    fn remote(identity: u32) -> Claim {
        Claim {
            by: Claimant::Remote,
            identity,
        }
    }

    #[test]
    fn a_changed_source_touches_only_its_addresses() {
        let mut index = IpCacheIndex::new();
        index.set_source(
            Source::Shard("n1".into()),
            vec![(ip("10.0.1.2"), remote(300)), (ip("10.0.1.3"), remote(301))],
        );
        index.set_source(
            Source::Shard("n2".into()),
            vec![(ip("10.0.2.2"), remote(300))],
        );
        assert_eq!(index.take_touched().len(), 3);
        index.set_source(
            Source::Shard("n1".into()),
            vec![(ip("10.0.1.2"), remote(300)), (ip("10.0.1.4"), remote(301))],
        );
        assert_eq!(
            index.take_touched(),
            BTreeSet::from([net("10.0.1.3/32"), net("10.0.1.4/32")])
        );
        // The same list again: nothing.
        index.set_source(
            Source::Shard("n1".into()),
            vec![(ip("10.0.1.2"), remote(300)), (ip("10.0.1.4"), remote(301))],
        );
        assert!(index.take_touched().is_empty());
        assert_eq!(index.want().len(), 3);
    }

    #[test]
    fn a_removed_claim_uncovers_the_next_and_the_prefix() {
        let mut index = IpCacheIndex::new();
        index.set_cidrs(&CidrTable::from_prefixes([net("10.0.1.2/32")]));
        let prefix_entry = index.want()[&net("10.0.1.2/32")];
        assert_eq!(prefix_entry.identity, WORLD);
        index.set_source(Source::Shard("a".into()), vec![(ip("10.0.1.2"), remote(7))]);
        index.set_source(Source::Shard("b".into()), vec![(ip("10.0.1.2"), remote(5))]);
        assert_eq!(index.want()[&net("10.0.1.2/32")].identity, 5);
        assert_eq!(index.conflicts().count(), 1);
        index.set_source(Source::Shard("b".into()), vec![]);
        assert_eq!(index.want()[&net("10.0.1.2/32")].identity, 7);
        assert_eq!(index.conflicts().count(), 0);
        index.set_source(Source::Shard("a".into()), vec![]);
        assert_eq!(index.want()[&net("10.0.1.2/32")], prefix_entry);
        index.set_cidrs(&CidrTable::default());
        assert!(index.want().is_empty());
        assert_eq!(index.addresses(), 0);
    }

    #[test]
    fn pod_networks_follow_the_pod_addresses_not_the_host() {
        let mut index = IpCacheIndex::new();
        assert_eq!(index.pod_networks(), None);
        index.set_pod_nets(vec![net("10.0.0.0/16")]);
        assert_eq!(index.pod_networks(), Some(vec![net("10.0.0.0/16")]));
        let host = Claim {
            by: Claimant::Host,
            identity: HOST,
        };
        index.set_source(Source::Host, vec![(ip("192.0.2.1"), host)]);
        assert!(index.pod_networks().is_some());
        index.set_source(Source::Shard("n".into()), vec![(ip("10.1.0.1"), remote(9))]);
        assert_eq!(index.pod_networks(), None);
        index.set_pod_nets(vec![net("10.0.0.0/8")]);
        assert_eq!(index.pod_networks(), Some(vec![net("10.0.0.0/8")]));
        index.set_pod_nets(vec![net("10.0.0.0/16")]);
        index.set_source(Source::Shard("n".into()), vec![]);
        assert!(index.pod_networks().is_some());
    }
}
