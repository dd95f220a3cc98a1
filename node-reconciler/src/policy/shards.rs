//! The nodes' `NodeEndpoints` shards as changes: the watch hands each
//! changed shard to a [`ShardFeed`], a sync takes what changed since the
//! last one and folds it into the IP cache ([`super::ipcache`]) and the
//! named ports per identity ([`NamedIndex`]). So a sync woken by a pod
//! starting on another node reads that node's shard, not all 5,000. Pure.
//!
//! ```text
//!  watch NodeEndpoints ─event─▶ ShardFeed (latest object per changed shard, deletions,
//!                                 │          shards a re-list no longer has)
//!                       sync ─take┘
//!                         ├─ shard_claims ─▶ IpCacheIndex::set_source(Shard(name))  (not our own)
//!                         └─ named ports ──▶ NamedIndex::set_shard(name) ─▶ named() when revision moved
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::watcher::Event;
use trellis_api::v1alpha1::NodeEndpoints;
use trellis_policy::identity::NamedPorts;
use trellis_policy::ports::Protocol;

use super::desired::{Claim, Claimant};

/// The shards that changed since the last [`ShardFeed::take`].
#[derive(Debug, Default)]
pub struct ShardFeed {
    /// Name → the shard as it is now (`None`: deleted).
    pending: BTreeMap<String, Option<Arc<NodeEndpoints>>>,
    /// Every shard that exists, with the resourceVersion last passed on.
    known: BTreeMap<String, Option<String>>,
    /// The names a re-list has shown so far (between `Init` and `InitDone`).
    relist: Option<BTreeSet<String>>,
    /// A first list has completed.
    ready: bool,
}

/// What [`ShardFeed::take`] hands over: name → the shard now, or `None`
/// when it is gone.
pub type ShardChanges = BTreeMap<String, Option<Arc<NodeEndpoints>>>;

impl ShardFeed {
    /// Nothing seen yet.
    pub fn new() -> Self {
        ShardFeed::default()
    }

    /// Takes one event of the watch. A re-list passes on only the shards
    /// whose resourceVersion moved, and at its end the deletion of every
    /// shard it did not list.
    pub fn event(&mut self, event: Event<NodeEndpoints>) {
        match event {
            Event::Apply(shard) => self.apply(shard),
            Event::InitApply(shard) => {
                if let Some(seen) = &mut self.relist {
                    seen.insert(shard.name_any());
                }
                self.apply(shard);
            }
            Event::Delete(shard) => {
                let name = shard.name_any();
                self.known.remove(&name);
                self.pending.insert(name, None);
            }
            Event::Init => self.relist = Some(BTreeSet::new()),
            Event::InitDone => {
                if let Some(seen) = self.relist.take() {
                    let gone: Vec<String> = self
                        .known
                        .keys()
                        .filter(|n| !seen.contains(*n))
                        .cloned()
                        .collect();
                    for name in gone {
                        self.known.remove(&name);
                        self.pending.insert(name, None);
                    }
                }
                self.ready = true;
            }
        }
    }

    fn apply(&mut self, shard: NodeEndpoints) {
        let name = shard.name_any();
        let version = shard.resource_version();
        if version.is_some() && self.known.get(&name) == Some(&version) {
            return;
        }
        self.known.insert(name.clone(), version);
        self.pending.insert(name, Some(Arc::new(shard)));
    }

    /// What changed since the last call.
    pub fn take(&mut self) -> ShardChanges {
        std::mem::take(&mut self.pending)
    }

    /// Whether the first list is complete (every shard that existed then
    /// has been passed on).
    pub fn is_ready(&self) -> bool {
        self.ready
    }
}

/// What one shard says: the IP cache claims of its pods' addresses and the
/// named ports of each identity. An entry whose identity is not a number
/// the datapath can hold, or an address that does not parse, is skipped
/// (the schema refuses both; as `trellis_policy::cluster::read_shards`).
pub fn shard_claims(shard: &NodeEndpoints) -> (Vec<(IpAddr, Claim)>, BTreeMap<u32, NamedPorts>) {
    let read = trellis_policy::cluster::read_shards([shard]);
    let claims = read
        .addresses
        .into_iter()
        .map(|a| {
            let claim = Claim {
                by: Claimant::Remote,
                identity: a.identity,
            };
            (a.address, claim)
        })
        .collect();
    let named = read
        .named
        .into_iter()
        .filter(|(_, p)| !p.is_empty())
        .collect();
    (claims, named)
}

/// One named port of an identity.
type PortName = (String, Protocol, u16);

/// The named ports of each identity over every shard (the union over the
/// pods of the identity), kept shard by shard.
#[derive(Debug, Default)]
pub struct NamedIndex {
    per_shard: HashMap<String, BTreeMap<u32, NamedPorts>>,
    /// How many shards list each (identity, named port).
    counts: BTreeMap<u32, BTreeMap<PortName, usize>>,
    /// Moves whenever some identity's union changes.
    revision: u64,
}

impl NamedIndex {
    /// No shard.
    pub fn new() -> Self {
        NamedIndex::default()
    }

    /// Replaces the named ports shard `name` lists (empty: the shard is
    /// gone or names none).
    pub fn set_shard(&mut self, name: &str, named: BTreeMap<u32, NamedPorts>) {
        let old = self.per_shard.remove(name).unwrap_or_default();
        if old == named {
            if !named.is_empty() {
                self.per_shard.insert(name.to_owned(), named);
            }
            return;
        }
        let mut moved = false;
        for (id, ports) in &old {
            for (port_name, protocol, number) in ports.iter() {
                let key = (port_name.to_owned(), protocol, number);
                if let Some(of_id) = self.counts.get_mut(id) {
                    if let Some(n) = of_id.get_mut(&key) {
                        *n -= 1;
                        if *n == 0 {
                            of_id.remove(&key);
                            moved = true;
                        }
                    }
                    if of_id.is_empty() {
                        self.counts.remove(id);
                    }
                }
            }
        }
        for (id, ports) in &named {
            for (port_name, protocol, number) in ports.iter() {
                let n = self
                    .counts
                    .entry(*id)
                    .or_default()
                    .entry((port_name.to_owned(), protocol, number))
                    .or_default();
                *n += 1;
                moved |= *n == 1;
            }
        }
        if !named.is_empty() {
            self.per_shard.insert(name.to_owned(), named);
        }
        if moved {
            self.revision += 1;
        }
    }

    /// Changes with the union of some identity's named ports.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The union per identity (identities with none are absent).
    pub fn named(&self) -> BTreeMap<u32, NamedPorts> {
        self.counts
            .iter()
            .map(|(id, ports)| {
                let mut named = NamedPorts::new();
                for (name, protocol, port) in ports.keys() {
                    named.insert(name.clone(), *protocol, *port);
                }
                (*id, named)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shard(name: &str, version: &str, endpoints: serde_json::Value) -> NodeEndpoints {
        serde_json::from_value(json!({
            "apiVersion": "network.trellis.dev/v1alpha1",
            "kind": "NodeEndpoints",
            "metadata": {"name": name, "resourceVersion": version},
            "spec": {"endpoints": endpoints},
        }))
        .expect("a NodeEndpoints")
    }

    fn names(changes: &ShardChanges) -> Vec<(&str, bool)> {
        changes
            .iter()
            .map(|(n, s)| (n.as_str(), s.is_some()))
            .collect()
    }

    #[test]
    fn the_feed_passes_on_changes_and_what_a_relist_dropped() {
        let mut feed = ShardFeed::new();
        feed.event(Event::Init);
        feed.event(Event::InitApply(shard("a", "1", json!([]))));
        feed.event(Event::InitApply(shard("b", "1", json!([]))));
        assert!(!feed.is_ready());
        feed.event(Event::InitDone);
        assert!(feed.is_ready());
        assert_eq!(names(&feed.take()), [("a", true), ("b", true)]);
        assert!(feed.take().is_empty());

        feed.event(Event::Apply(shard("a", "2", json!([]))));
        feed.event(Event::Delete(shard("b", "1", json!([]))));
        assert_eq!(names(&feed.take()), [("a", true), ("b", false)]);

        // A re-list: unchanged "a" is not passed on; "c" is new; "a" not
        // listed any more is gone at the end.
        feed.event(Event::Apply(shard("c", "3", json!([]))));
        feed.take();
        feed.event(Event::Init);
        feed.event(Event::InitApply(shard("c", "3", json!([]))));
        feed.event(Event::InitApply(shard("d", "4", json!([]))));
        feed.event(Event::InitDone);
        assert_eq!(names(&feed.take()), [("a", false), ("d", true)]);
    }

    #[test]
    fn named_ports_are_the_union_over_shards() {
        let http = |port: u16| {
            let mut p = NamedPorts::new();
            p.insert("http", Protocol::Tcp, port);
            p
        };
        let mut index = NamedIndex::new();
        index.set_shard("a", BTreeMap::from([(300, http(80))]));
        index.set_shard("b", BTreeMap::from([(300, http(80)), (301, http(8080))]));
        let r = index.revision();
        assert_eq!(
            index.named(),
            BTreeMap::from([(300, http(80)), (301, http(8080))])
        );
        // "a" goes: 300 still has http/80 from "b"; nothing moved.
        index.set_shard("a", BTreeMap::new());
        assert_eq!(index.revision(), r);
        index.set_shard("b", BTreeMap::from([(300, http(80))]));
        assert_ne!(index.revision(), r);
        assert_eq!(index.named(), BTreeMap::from([(300, http(80))]));
    }

    #[test]
    fn a_shard_gives_claims_and_named_ports_of_valid_entries() {
        let s = shard(
            "n1",
            "1",
            json!([
                {"namespace": "x", "name": "a", "addresses": ["10.0.1.2", "fd00::2"], "identity": 300,
                 "namedPorts": [{"name": "http", "protocol": "TCP", "port": 8080}]},
                {"namespace": "x", "name": "b", "addresses": ["10.0.1.3"], "identity": 301},
                {"namespace": "x", "name": "bad", "addresses": ["10.0.1.4"], "identity": -1},
            ]),
        );
        let (claims, named) = shard_claims(&s);
        let got: Vec<(String, u32)> = claims
            .iter()
            .map(|(a, c)| (a.to_string(), c.identity))
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.1.2".to_owned(), 300),
                ("fd00::2".to_owned(), 300),
                ("10.0.1.3".to_owned(), 301)
            ]
        );
        assert!(claims.iter().all(|(_, c)| c.by == Claimant::Remote));
        assert_eq!(named.keys().copied().collect::<Vec<_>>(), [300]);
    }
}
