//! What the policy maps of this node should hold. Pure.
//!
//! ```text
//!  locals ──group by (labels, named ports)──▶ compile_endpoint, once per group ──▶ Arc<Compiled>
//!                                                │ isolated directions' entries
//!                                                ▼
//!               equal contents ──▶ one Table ──▶ id: the installed id of equal
//!               (any endpoint, either direction)     contents (PolicyIds), else a fresh one
//!                                                ▼
//!  endpoints: ifindex ──▶ EndpointEntry { identity, flags, ingress/egress id + plens }
//!  ipcache:   CIDR prefixes (WORLD, own id) ◀── host (HOST), local and remote pods (/32, /128)
//! ```
//!
//! A table never depends on the endpoint's identity (see
//! [`LocalEndpoint`]), so endpoints with equal labels and named ports share
//! one compilation, and tables with equal entries share one policy id
//! whoever uses them, in whichever direction. An id keeps naming the same
//! contents for as long as they are installed: a changed table gets a
//! fresh id, which is what lets `sync::plan` write it completely before one
//! endpoint update switches to it (0004 decision 5). Id 0 is never used.
//!
//! Two endpoints can share a table while their rule ids mean different
//! policies (equal shapes in two namespaces): the provenance to read a
//! rule id with is the endpoint's, in [`Desired::compiled`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use trellis_policy::compile::{Compiled, Input, LocalEndpoint, compile_endpoint};
use trellis_policy::identity::{HOST, IdentityInfo, NamedPorts, SecurityLabels, WORLD};
use trellis_policy::relevance::IdentityDependencies;
use trellis_policy::table::{self, DirectionTable, Key, PLENS_ANY_PROTOCOL};

use crate::bpf::abi::{Direction, EndpointEntry, IpCacheEntry, PolicyEntry};

/// One policy table as the `trellis_policy` map holds it under its id:
/// (identity, protocol, port prefix) → (rule, action).
pub type Table = BTreeMap<Key, PolicyEntry>;

/// The contents of every isolated direction with nothing allowed.
pub static EMPTY_TABLE: Table = BTreeMap::new();

/// One pod endpoint of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Local {
    /// The index of its host-side veth in the node's namespace (the
    /// `trellis_endpoints` key).
    pub ifindex: u32,
    /// Its addresses.
    pub addresses: Vec<IpAddr>,
    /// What it is compiled for: identity, labels, named ports.
    pub endpoint: LocalEndpoint,
}

/// Everything the node's policy maps are computed from.
#[derive(Debug, Clone, Copy)]
pub struct World<'a> {
    /// Policies, identities and the node's CIDR identities.
    pub input: &'a Input,
    /// This node's pod endpoints.
    pub locals: &'a [Local],
    /// Other nodes' pod addresses and their identities (the shards).
    pub remote: &'a [(IpAddr, u32)],
    /// This node's own addresses: identity `HOST`.
    pub host: &'a [IpAddr],
}

/// Which table contents are installed under which id: the only memory
/// [`desired`] has, so that unchanged tables keep their ids (no churn) and
/// new ones get ids nothing installed uses. Borrows the contents from the
/// mirror it is built from (`sync::Installed::ids`).
#[derive(Debug, Clone, Default)]
pub struct PolicyIds<'a> {
    by_content: HashMap<&'a Table, u32>,
    used: BTreeSet<u32>,
}

impl<'a> PolicyIds<'a> {
    /// Nothing installed.
    pub fn new() -> Self {
        PolicyIds::default()
    }

    /// Records that id `id` is installed holding exactly `table`. When
    /// several ids hold equal contents, the smallest is the one reused (the
    /// others then lose their endpoints and are removed). Id 0 is only
    /// reserved: it never names a table.
    pub fn insert(&mut self, id: u32, table: &'a Table) {
        self.used.insert(id);
        if id == 0 {
            return;
        }
        self.by_content
            .entry(table)
            .and_modify(|have| *have = (*have).min(id))
            .or_insert(id);
    }

    /// Records that `id` is in use with contents no table may reuse.
    pub fn reserve(&mut self, id: u32) {
        self.used.insert(id);
    }

    /// The installed id of exactly these contents.
    pub fn get(&self, table: &Table) -> Option<u32> {
        self.by_content.get(table).copied()
    }

    /// Whether `id` is installed (or reserved).
    pub fn is_used(&self, id: u32) -> bool {
        self.used.contains(&id)
    }
}

/// Who says an address has an identity. Lower ranks win a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Claimant {
    /// A pod endpoint of this node, by the ifindex of its veth.
    Local { ifindex: u32 },
    /// This node.
    Host,
    /// Another node's shard.
    Remote,
}

impl fmt::Display for Claimant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claimant::Local { ifindex } => write!(f, "local endpoint ifindex {ifindex}"),
            Claimant::Host => f.write_str("this node"),
            Claimant::Remote => f.write_str("another node's endpoints"),
        }
    }
}

/// One claim on an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claim {
    pub by: Claimant,
    pub identity: u32,
}

impl Claim {
    /// Local before host before remote (we made the local pods' veths; a
    /// remote shard can be stale), then the smaller identity.
    pub(crate) fn rank(&self) -> (u8, u32) {
        let by = match self.by {
            Claimant::Local { .. } => 0,
            Claimant::Host => 1,
            Claimant::Remote => 2,
        };
        (by, self.identity)
    }
}

/// Input that contradicts itself; what was kept is deterministic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Conflict {
    /// One address claimed with two identities (a stale shard, a reused
    /// address): `kept` is in the IP cache, `dropped` is not.
    Address {
        address: IpAddr,
        kept: Claim,
        dropped: Claim,
    },
    /// Two local endpoints on one ifindex: the one with the smaller
    /// identity is kept, the other (and its addresses) left out.
    Ifindex {
        ifindex: u32,
        kept: u32,
        dropped: u32,
    },
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::Address {
                address,
                kept,
                dropped,
            } => write!(
                f,
                "{address} has identity {} from {} and {} from {}: kept {}",
                kept.identity, kept.by, dropped.identity, dropped.by, kept.identity
            ),
            Conflict::Ifindex {
                ifindex,
                kept,
                dropped,
            } => write!(
                f,
                "two endpoints on ifindex {ifindex}, identities {kept} and {dropped}: kept {kept}"
            ),
        }
    }
}

/// The policy maps this node should hold, and what they were made from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// `trellis_endpoints`: ifindex → entry.
    pub endpoints: BTreeMap<u32, EndpointEntry>,
    /// `trellis_policy`, by table id. Every id an endpoint names is here
    /// (an isolated direction that allows nothing names an empty table).
    pub tables: BTreeMap<u32, Table>,
    /// `trellis_ipcache`: prefix → (identity, CIDR identity).
    pub ipcache: BTreeMap<IpNet, IpCacheEntry>,
    /// Per endpoint (ifindex), its compilation: the tables, the provenance
    /// of their rule ids and the diagnostics (shared by endpoints with equal
    /// labels and named ports).
    pub compiled: BTreeMap<u32, Arc<Compiled>>,
    /// Contradictions in the input, sorted.
    pub conflicts: Vec<Conflict>,
}

impl Desired {
    /// The table id endpoint `ifindex` uses in `dir`; `None` when it is not
    /// an endpoint or `dir` is not isolated.
    pub fn policy_of(&self, ifindex: u32, dir: Direction) -> Option<u32> {
        let entry = self.endpoints.get(&ifindex)?;
        entry.is_isolated(dir).then_some(policy_id(entry, dir))
    }

    /// What the IP cache answers for `addr`: the entry of the longest prefix
    /// containing it, else `WORLD`/`WORLD` (the datapath's lookup).
    pub fn identities_of(&self, addr: IpAddr) -> IpCacheEntry {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (0..=max)
            .rev()
            .find_map(|len| {
                let net = IpNet::new(addr, len).ok()?.trunc();
                self.ipcache.get(&net).copied()
            })
            .unwrap_or(IpCacheEntry {
                identity: WORLD,
                cidr_identity: WORLD,
            })
    }
}

/// The table id of `dir` in `entry` (meaningful when `dir` is isolated).
pub fn policy_id(entry: &EndpointEntry, dir: Direction) -> u32 {
    match dir {
        Direction::Ingress => entry.ingress_policy,
        Direction::Egress => entry.egress_policy,
    }
}

/// The `plens` of `dir` in `entry`.
pub fn plens_of(entry: &EndpointEntry, dir: Direction) -> u32 {
    match dir {
        Direction::Ingress => entry.ingress_plens,
        Direction::Egress => entry.egress_plens,
    }
}

/// The prefix-length mask an endpoint entry announces for `table` (as
/// [`DirectionTable::plens`]: bit `n` for port prefix length `n`, bit 17 for
/// any-protocol entries).
pub fn plens(table: &Table) -> u32 {
    table.keys().fold(0, |bits, k| {
        if k.proto == 0 {
            bits | PLENS_ANY_PROTOCOL
        } else if k.plen <= 16 {
            bits | 1 << k.plen
        } else {
            bits
        }
    })
}

/// The map form of a compiled direction's entries.
fn to_table(compiled: &DirectionTable) -> Table {
    compiled
        .entries
        .iter()
        .map(|(k, e)| {
            let entry = match e.action {
                table::Action::Allow => PolicyEntry::allow(e.rule),
                table::Action::Deny => PolicyEntry::deny(e.rule),
            };
            (*k, entry)
        })
        .collect()
}

fn compiled_direction(dir: Direction) -> table::Direction {
    match dir {
        Direction::Ingress => table::Direction::Ingress,
        Direction::Egress => table::Direction::Egress,
    }
}

/// Compilations kept from one computation to the next.
///
/// Valid for one compiler input apart from its identities (the mode, the
/// policies and bundles, the CIDR table, `pod_networks`: the caller's `key`)
/// and for the identities they were compiled against. When only identities
/// change, a compilation is kept unless its [`IdentityDependencies`] say
/// that the change of one of them (added, removed, other labels or named
/// ports) can change it (design 0005, "Implementation notes (recompiling for
/// a changed identity)"): so a sync woken by a pod elsewhere with a known
/// label set, a local pod with the labels of another, or a new label set
/// that no local endpoint's policy can select compiles nothing.
#[derive(Debug, Default)]
pub struct CompileCache {
    /// What the caller says identifies the input apart from its identities.
    key: Option<u64>,
    /// The identities the compilations were made against, as given.
    identities: Vec<IdentityInfo>,
    compiled: HashMap<(SecurityLabels, NamedPorts), Cached>,
    /// Compilations done since the cache was made.
    pub compilations: u64,
}

/// One kept compilation and what it depends on.
#[derive(Debug)]
struct Cached {
    compiled: Arc<Compiled>,
    deps: IdentityDependencies,
}

/// What [`CompileCache::for_input`] dropped, for the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Invalidated {
    /// The input apart from its identities changed: everything went.
    pub all: bool,
    /// Identities added, removed or changed (labels or named ports).
    pub identities: usize,
    /// Compilations dropped.
    pub compilations: usize,
}

impl CompileCache {
    /// Makes the cache valid for the input that `key` identifies (apart
    /// from its identities: the mode, policies, bundles, CIDR table and pod
    /// networks) with `identities` (what `Input::identities` holds), keeping
    /// every compilation that is still what compiling again would give.
    /// Call it before [`desired_cached`] with that input.
    ///
    /// `identities` should be sorted by id, one each (as
    /// `trellis_policy::cluster::identity_infos` gives them, and as ids
    /// are: one `SecurityIdentity` per id); otherwise any change of them
    /// drops every compilation.
    pub fn for_input(&mut self, key: u64, identities: &[IdentityInfo]) -> Invalidated {
        if self.key != Some(key) {
            let dropped = std::mem::take(&mut self.compiled).len();
            self.key = Some(key);
            identities.clone_into(&mut self.identities);
            return Invalidated {
                all: true,
                identities: 0,
                compilations: dropped,
            };
        }
        if self.identities == identities {
            return Invalidated::default();
        }
        let before = self.compiled.len();
        let changed = match changed_by_id(&self.identities, identities) {
            Some(changes) => {
                self.compiled.retain(|_, c| {
                    !changes
                        .iter()
                        .any(|(before, after)| c.deps.affected_by_change(*before, *after))
                });
                changes.len()
            }
            // Not one per id in order: no diff to trust.
            None => {
                self.compiled.clear();
                identities.len().max(self.identities.len())
            }
        };
        identities.clone_into(&mut self.identities);
        Invalidated {
            all: false,
            identities: changed,
            compilations: before - self.compiled.len(),
        }
    }
}

/// One identity that changed: as it was (`None`: added) and as it is
/// (`None`: removed).
type Change<'a> = (Option<&'a IdentityInfo>, Option<&'a IdentityInfo>);

/// Every identity that `old` → `new` added, removed or changed (labels or
/// named ports); `None` unless both are sorted by id, one each.
fn changed_by_id<'a>(old: &'a [IdentityInfo], new: &'a [IdentityInfo]) -> Option<Vec<Change<'a>>> {
    let by_id = |list: &[IdentityInfo]| list.windows(2).all(|w| w[0].id < w[1].id);
    if !by_id(old) || !by_id(new) {
        return None;
    }
    let mut out = Vec::new();
    let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
    loop {
        let change = match (o.peek().copied(), n.peek().copied()) {
            (None, None) => break,
            (Some(a), Some(b)) if a.id == b.id => {
                o.next();
                n.next();
                if a == b {
                    continue;
                }
                (Some(a), Some(b))
            }
            (Some(a), Some(b)) if a.id < b.id => {
                o.next();
                (Some(a), None)
            }
            (Some(a), None) => {
                o.next();
                (Some(a), None)
            }
            (_, b) => {
                n.next();
                (None, b)
            }
        };
        out.push(change);
    }
    Some(out)
}

/// The policy maps for `world`, reusing the ids of `installed` for
/// contents it already holds.
pub fn desired(world: &World, installed: &PolicyIds) -> Desired {
    desired_cached(world, installed, &mut CompileCache::default())
}

/// [`desired`], compiling only the label sets `cache` does not hold (the
/// caller keeps the cache valid with [`CompileCache::for_input`]).
pub fn desired_cached(world: &World, installed: &PolicyIds, cache: &mut CompileCache) -> Desired {
    let mut want = desired_tables(world.input, world.locals, installed, cache);
    let locals = unique_locals(world.locals, &mut Vec::new());
    want.ipcache = ipcache(world, &locals, &mut want.conflicts);
    want.conflicts.sort();
    want
}

/// [`desired_cached`] but for the IP cache: `ipcache` is left empty, and
/// `conflicts` holds only those between local endpoints. The engine keeps
/// the IP cache in an [`super::ipcache::IpCacheIndex`] instead, fed with
/// [`local_claims`], the host's and the shards' claims, which is what this
/// module's IP cache is computed from.
pub fn desired_tables(
    input: &Input,
    locals: &[Local],
    installed: &PolicyIds,
    cache: &mut CompileCache,
) -> Desired {
    debug_assert!(
        cache.key.is_none() || cache.identities == input.identities,
        "CompileCache::for_input was not told these identities"
    );
    let mut conflicts = Vec::new();
    let locals = unique_locals(locals, &mut conflicts);

    // One compilation per (labels, named ports): the identity does not
    // change the tables. Ids by content, across endpoints and directions,
    // handed out in ifindex order (so fresh ids do not depend on the
    // input's order).
    let mut ids = Ids::new(installed);
    let mut groups: BTreeMap<(&SecurityLabels, &NamedPorts), (Arc<Compiled>, EndpointEntry)> =
        BTreeMap::new();
    let mut compiled = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    for local in &locals {
        let ep = &local.endpoint;
        let (c, template) = groups
            .entry((&ep.labels, &ep.named_ports))
            .or_insert_with(|| {
                let key = (ep.labels.clone(), ep.named_ports.clone());
                let c = match cache.compiled.get(&key) {
                    Some(c) => Arc::clone(&c.compiled),
                    None => {
                        cache.compilations += 1;
                        let c = Arc::new(compile_endpoint(input, ep));
                        let cached = Cached {
                            compiled: Arc::clone(&c),
                            deps: IdentityDependencies::of(input, ep),
                        };
                        cache.compiled.insert(key, cached);
                        c
                    }
                };
                let mut entry = EndpointEntry::new(0);
                for dir in Direction::ALL {
                    let t = c.policy.table(compiled_direction(dir));
                    if t.isolated {
                        entry = entry.isolate(dir, ids.id_of(t), t.plens());
                    }
                }
                (c, entry)
            });
        compiled.insert(local.ifindex, Arc::clone(c));
        let entry = EndpointEntry {
            identity: ep.identity,
            ..*template
        };
        endpoints.insert(local.ifindex, entry);
    }

    // Only what this node's endpoints use stays.
    cache
        .compiled
        .retain(|(labels, ports), _| groups.contains_key(&(labels, ports)));
    conflicts.sort();
    Desired {
        endpoints,
        tables: ids.tables,
        ipcache: BTreeMap::new(),
        compiled,
        conflicts,
    }
}

/// The IP cache claims of `locals`: each address of each endpoint that
/// [`desired_tables`] keeps (one per ifindex).
pub fn local_claims(locals: &[Local]) -> Vec<(IpAddr, Claim)> {
    unique_locals(locals, &mut Vec::new())
        .into_iter()
        .flat_map(|l| {
            let claim = Claim {
                by: Claimant::Local { ifindex: l.ifindex },
                identity: l.endpoint.identity,
            };
            l.addresses.iter().map(move |a| (*a, claim))
        })
        .collect()
}

/// One local endpoint per ifindex (the smaller identity wins), sorted by
/// ifindex.
fn unique_locals<'a>(locals: &'a [Local], conflicts: &mut Vec<Conflict>) -> Vec<&'a Local> {
    let mut sorted: Vec<&Local> = locals.iter().collect();
    sorted.sort_by(|a, b| {
        (a.ifindex, a.endpoint.identity, &a.addresses).cmp(&(
            b.ifindex,
            b.endpoint.identity,
            &b.addresses,
        ))
    });
    let mut out: Vec<&Local> = Vec::with_capacity(sorted.len());
    for local in sorted {
        match out.last() {
            Some(kept) if kept.ifindex == local.ifindex => {
                if kept.endpoint != local.endpoint || kept.addresses != local.addresses {
                    conflicts.push(Conflict::Ifindex {
                        ifindex: local.ifindex,
                        kept: kept.endpoint.identity,
                        dropped: local.endpoint.identity,
                    });
                }
            }
            _ => out.push(local),
        }
    }
    out
}

/// Hands out table ids by content.
struct Ids<'i, 'a> {
    installed: &'i PolicyIds<'a>,
    /// Contents → id, for the tables of this desired state.
    assigned: HashMap<Table, u32>,
    tables: BTreeMap<u32, Table>,
    /// The next candidate for a fresh id.
    next: u32,
}

impl<'i, 'a> Ids<'i, 'a> {
    fn new(installed: &'i PolicyIds<'a>) -> Self {
        Ids {
            installed,
            assigned: HashMap::new(),
            tables: BTreeMap::new(),
            next: 1,
        }
    }

    fn id_of(&mut self, compiled: &DirectionTable) -> u32 {
        let table = to_table(compiled);
        if let Some(&id) = self.assigned.get(&table) {
            return id;
        }
        let id = match self.installed.get(&table) {
            Some(id) => id,
            None => self.fresh(),
        };
        self.assigned.insert(table.clone(), id);
        self.tables.insert(id, table);
        id
    }

    /// The smallest id that is neither 0, nor installed, nor handed out.
    fn fresh(&mut self) -> u32 {
        while self.installed.is_used(self.next) || self.tables.contains_key(&self.next) {
            // Ids are bounded by the number of tables ever live at once, far
            // from u32::MAX.
            self.next += 1;
        }
        let id = self.next;
        self.next += 1;
        id
    }
}

/// Every CIDR prefix as (WORLD, its own id), then every host, local and
/// remote address as a host prefix with its identity and the CIDR identity
/// of the longest prefix containing it (an address equal to a /32 or /128
/// prefix replaces that prefix's entry: its CIDR identity is the same).
fn ipcache(
    world: &World,
    locals: &[&Local],
    conflicts: &mut Vec<Conflict>,
) -> BTreeMap<IpNet, IpCacheEntry> {
    let cidrs = &world.input.cidrs;
    let mut out: BTreeMap<IpNet, IpCacheEntry> = cidrs
        .iter()
        .map(|(prefix, id)| {
            let entry = IpCacheEntry {
                identity: WORLD,
                cidr_identity: id,
            };
            (prefix, entry)
        })
        .collect();

    let claims = locals
        .iter()
        .flat_map(|l| {
            let claim = Claim {
                by: Claimant::Local { ifindex: l.ifindex },
                identity: l.endpoint.identity,
            };
            l.addresses.iter().map(move |a| (*a, claim))
        })
        .chain(world.host.iter().map(|a| {
            let claim = Claim {
                by: Claimant::Host,
                identity: HOST,
            };
            (*a, claim)
        }))
        .chain(world.remote.iter().map(|(a, id)| {
            let claim = Claim {
                by: Claimant::Remote,
                identity: *id,
            };
            (*a, claim)
        }));
    let mut best: BTreeMap<IpAddr, Claim> = BTreeMap::new();
    let mut losers: BTreeMap<IpAddr, BTreeSet<Claim>> = BTreeMap::new();
    for (addr, claim) in claims {
        match best.get_mut(&addr) {
            None => {
                best.insert(addr, claim);
            }
            Some(have) => {
                if claim.rank() < have.rank() {
                    let old = std::mem::replace(have, claim);
                    losers.entry(addr).or_default().insert(old);
                } else {
                    losers.entry(addr).or_default().insert(claim);
                }
            }
        }
    }
    for (addr, dropped) in losers {
        let kept = best[&addr];
        for claim in dropped {
            if claim.identity != kept.identity {
                conflicts.push(Conflict::Address {
                    address: addr,
                    kept,
                    dropped: claim,
                });
            }
        }
    }
    for (addr, claim) in best {
        let entry = IpCacheEntry {
            identity: claim.identity,
            cidr_identity: cidrs.cidr_identity(addr),
        };
        out.insert(IpNet::from(addr), entry);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::*;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use serde_json::json;
    use trellis_policy::PolicyEnforcement;
    use trellis_policy::identity::CIDR_FIRST;
    use trellis_policy::ports::Protocol;

    #[test]
    fn the_cache_compiles_each_label_set_once_per_input() {
        let input = mk_input(mk_policies(8080));
        let locals = mk_locals();
        let host = [ip("192.0.2.11")];
        let remote = mk_remote();
        let world = |locals, remote| World {
            input: &input,
            locals,
            remote,
            host: &host,
        };
        let mut cache = CompileCache::default();
        cache.for_input(1, &input.identities);
        let first = desired_cached(&world(&locals, &remote), &PolicyIds::new(), &mut cache);
        // web (twice), db, tool: three label sets.
        assert_eq!(cache.compilations, 3);
        assert_eq!(
            first,
            desired(&world(&locals, &remote), &PolicyIds::new()),
            "the cache changes nothing in the outcome"
        );

        // A pod elsewhere, and a local pod with known labels: nothing compiled.
        let mut more_remote = remote.clone();
        more_remote.push((ip("10.244.3.30"), TOOL));
        let mut more_locals = locals.clone();
        more_locals.push(mk_local(14, DB, "shop", "db", &["10.244.1.14"]));
        let nothing = cache.for_input(1, &input.identities);
        assert_eq!(nothing, Invalidated::default());
        let second = desired_cached(
            &world(&more_locals, &more_remote),
            &PolicyIds::new(),
            &mut cache,
        );
        assert_eq!(cache.compilations, 3, "nothing recompiled");
        assert_eq!(
            second.endpoints[&14].egress_policy,
            second.endpoints[&12].egress_policy
        );

        // Another input: everything compiled again.
        let all = cache.for_input(2, &input.identities);
        assert_eq!(
            all,
            Invalidated {
                all: true,
                identities: 0,
                compilations: 3
            }
        );
        desired_cached(&world(&locals, &remote), &PolicyIds::new(), &mut cache);
        assert_eq!(cache.compilations, 6);
    }

    /// The policies of `mk_policies(8080)`, and `tool` may send to `web`
    /// pods of every namespace on their port named `http`.
    fn policies_with_named_egress() -> Vec<NetworkPolicy> {
        let mut policies = mk_policies(8080);
        policies.push(mk_policy(json!({
            "metadata": {"namespace": "ops", "name": "tool"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "tool"}},
                "policyTypes": ["Egress"],
                "egress": [{
                    "to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}],
                    "ports": [{"protocol": "TCP", "port": "http"}]
                }]
            }
        })));
        policies
    }

    /// Syncs `locals` against `identities` with `cache` (the policies of
    /// [`policies_with_named_egress`]), and checks the outcome against a
    /// computation from scratch.
    fn sync_with(
        cache: &mut CompileCache,
        identities: Vec<IdentityInfo>,
        locals: &[Local],
    ) -> (Desired, Invalidated) {
        let input = mk_input_with(policies_with_named_egress(), identities);
        let invalidated = cache.for_input(1, &input.identities);
        let host = [ip("192.0.2.11")];
        let remote = mk_remote();
        let world = World {
            input: &input,
            locals,
            remote: &remote,
            host: &host,
        };
        let d = desired_cached(&world, &PolicyIds::new(), cache);
        assert_eq!(
            d,
            desired(&world, &PolicyIds::new()),
            "the cache changes nothing in the outcome"
        );
        (d, invalidated)
    }

    fn world_identities() -> Vec<IdentityInfo> {
        vec![
            mk_identity(WEB, "shop", "web"),
            mk_identity(DB, "shop", "db"),
            mk_identity(TOOL, "ops", "tool"),
        ]
    }

    #[test]
    fn a_new_identity_no_local_policy_can_select_compiles_nothing() {
        let locals = mk_locals();
        let mut cache = CompileCache::default();
        sync_with(&mut cache, world_identities(), &locals);
        assert_eq!(cache.compilations, 3);

        // Pods with new label sets on another node: web admits `tool`
        // pods, db admits `web` of shop, tool sends to `web` pods; a
        // `batch` pod is none of them.
        let mut more = world_identities();
        more.push(mk_identity(400, "ops", "batch"));
        more.push(mk_identity(401, "dev", "batch"));
        let (_, invalidated) = sync_with(&mut cache, more.clone(), &locals);
        assert_eq!(cache.compilations, 3, "nothing recompiled");
        assert_eq!(
            invalidated,
            Invalidated {
                all: false,
                identities: 2,
                compilations: 0
            }
        );
        // Its pods name a port (its shard catches up), even one that tool's
        // egress uses, and it goes again: still nothing.
        let mut changed = more.clone();
        changed[3].named_ports.insert("http", Protocol::Tcp, 80);
        sync_with(&mut cache, changed, &locals);
        sync_with(&mut cache, world_identities(), &locals);
        assert_eq!(cache.compilations, 3, "nothing recompiled");
    }

    #[test]
    fn an_identity_a_local_policy_selects_recompiles_exactly_what_needs_it() {
        let locals = mk_locals();
        let mut cache = CompileCache::default();
        let (before, _) = sync_with(&mut cache, world_identities(), &locals);
        assert_eq!(cache.compilations, 3);

        // A `tool` pod in a new namespace: web's ingress admits it (any
        // namespace). web (ifindex 10 and 11: one compilation) is compiled
        // again; db and tool are not.
        let mut more = world_identities();
        more.push(mk_identity(400, "dev", "tool"));
        let (after, invalidated) = sync_with(&mut cache, more.clone(), &locals);
        assert_eq!(cache.compilations, 4);
        assert_eq!((invalidated.identities, invalidated.compilations), (1, 1));
        assert!(Arc::ptr_eq(&before.compiled[&12], &after.compiled[&12]));
        assert!(Arc::ptr_eq(&before.compiled[&13], &after.compiled[&13]));
        let web = after.policy_of(10, Direction::Ingress).expect("isolated");
        assert!(after.tables[&web].keys().any(|k| k.identity == 400));

        // web's pods name port `http`: tool's egress resolves it, so tool is
        // compiled again. db admits web, but on ingress named ports are
        // db's own: db is not, nor web.
        let mut named = more.clone();
        named[0].named_ports.insert("http", Protocol::Tcp, 8080);
        let (again, invalidated) = sync_with(&mut cache, named.clone(), &locals);
        assert_eq!(cache.compilations, 5);
        assert_eq!((invalidated.identities, invalidated.compilations), (1, 1));
        assert!(Arc::ptr_eq(&after.compiled[&10], &again.compiled[&10]));
        assert!(Arc::ptr_eq(&after.compiled[&12], &again.compiled[&12]));
        let tool = again.policy_of(13, Direction::Egress).expect("isolated");
        assert!(
            again.tables[&tool]
                .keys()
                .any(|k| (k.identity, k.port, k.plen) == (WEB, 8080, 16))
        );
        // A name no egress rule uses: nothing.
        named[0].named_ports.insert("metrics", Protocol::Tcp, 9100);
        sync_with(&mut cache, named.clone(), &locals);
        assert_eq!(cache.compilations, 5);

        // tool's label set goes (its last pod): web again, nobody else.
        named.retain(|i| i.id != TOOL);
        let (_, invalidated) = sync_with(&mut cache, named, &locals);
        assert_eq!((invalidated.identities, invalidated.compilations), (1, 1));
        assert_eq!(cache.compilations, 6);
    }

    #[test]
    fn identities_out_of_order_recompile_everything() {
        let locals = mk_locals();
        let mut cache = CompileCache::default();
        sync_with(&mut cache, world_identities(), &locals);
        let mut shuffled = world_identities();
        shuffled.reverse();
        shuffled.push(mk_identity(400, "ops", "batch"));
        let (_, invalidated) = sync_with(&mut cache, shuffled, &locals);
        assert_eq!(invalidated.compilations, 3);
        assert_eq!(cache.compilations, 6);
    }

    #[test]
    fn equal_labels_share_a_compilation_and_equal_tables_an_id() {
        let input = mk_input(mk_policies(8080));
        let d = compute(&input, &mk_locals(), &PolicyIds::new());
        // web on 10 and 11: one compilation, one ingress table; egress open.
        assert!(Arc::ptr_eq(&d.compiled[&10], &d.compiled[&11]));
        assert!(!Arc::ptr_eq(&d.compiled[&10], &d.compiled[&12]));
        let web = d.policy_of(10, Direction::Ingress).expect("isolated");
        assert_eq!(d.policy_of(11, Direction::Ingress), Some(web));
        assert_eq!(d.policy_of(10, Direction::Egress), None);
        // tool (no policy in ops): not isolated, no table at all.
        assert_eq!(d.endpoints[&13], EndpointEntry::new(TOOL));
        // Three distinct tables: web ingress, db ingress, db egress.
        assert_eq!(d.tables.len(), 3);
        assert_eq!(d.tables.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        for (ifindex, entry) in &d.endpoints {
            for dir in Direction::ALL {
                let Some(id) = d.policy_of(*ifindex, dir) else {
                    assert_eq!((policy_id(entry, dir), plens_of(entry, dir)), (0, 0));
                    continue;
                };
                assert_ne!(id, 0);
                let compiled = d.compiled[ifindex]
                    .policy
                    .table(compiled_direction(dir))
                    .clone();
                assert_eq!(d.tables[&id], to_table(&compiled));
                assert_eq!(plens_of(entry, dir), compiled.plens());
                assert_eq!(plens(&d.tables[&id]), compiled.plens());
            }
        }
    }

    #[test]
    fn equal_tables_share_an_id_whatever_the_direction() {
        use trellis_policy::identity::ANY;
        use trellis_policy::table::{Action, Entry};
        let mk = |rule| DirectionTable {
            isolated: true,
            entries: [(
                Key::any_protocol(ANY),
                Entry {
                    rule,
                    action: Action::Allow,
                },
            )]
            .into(),
        };
        let none = PolicyIds::new();
        let mut ids = Ids::new(&none);
        // One endpoint's ingress, another's egress: one table.
        assert_eq!(ids.id_of(&mk(16)), 1);
        assert_eq!(ids.id_of(&mk(16)), 1);
        // Another rule id is another table.
        assert_eq!(ids.id_of(&mk(17)), 2);
        assert_eq!(ids.tables.len(), 2);
        // Id 0 never names a table, even when a map holds entries under it.
        let mut zero = PolicyIds::new();
        zero.insert(0, &EMPTY_TABLE);
        assert_eq!(zero.get(&EMPTY_TABLE), None);
        assert!(zero.is_used(0));

        // Contents installed under some id are found there, whoever had
        // them before.
        let input = mk_input(mk_policies(8080));
        let locals = mk_locals();
        let d = compute(&input, &locals, &PolicyIds::new());
        let db_egress = d.policy_of(12, Direction::Egress).expect("isolated");
        let mut installed = PolicyIds::new();
        installed.insert(42, &d.tables[&db_egress]);
        let d = compute(&input, &locals, &installed);
        assert_eq!(d.policy_of(12, Direction::Egress), Some(42));
        assert!(d.tables.keys().all(|id| *id != 0));
    }

    #[test]
    fn installed_ids_are_kept_and_nothing_moves_on_recompute() {
        let input = mk_input(mk_policies(8080));
        let locals = mk_locals();
        let first = compute(&input, &locals, &PolicyIds::new());
        let again = compute(&input, &locals, &installed_ids(&first));
        assert_eq!(again, first);
        // The input's order does not matter either.
        let mut reversed = locals.clone();
        reversed.reverse();
        let mut input_r = input.clone();
        input_r.policies.reverse();
        assert_eq!(compute(&input_r, &reversed, &PolicyIds::new()), first);
    }

    #[test]
    fn a_changed_table_gets_a_fresh_id_and_the_others_keep_theirs() {
        let input = mk_input(mk_policies(8080));
        let locals = mk_locals();
        let before = compute(&input, &locals, &PolicyIds::new());
        let web_before = before.policy_of(10, Direction::Ingress).expect("isolated");
        let db_in = before.policy_of(12, Direction::Ingress);
        let db_out = before.policy_of(12, Direction::Egress);

        let changed = mk_input(mk_policies(8081));
        let after = compute(&changed, &locals, &installed_ids(&before));
        let web_after = after.policy_of(10, Direction::Ingress).expect("isolated");
        assert!(
            !before.tables.contains_key(&web_after),
            "{web_after} is fresh"
        );
        assert_ne!(web_after, 0);
        assert_eq!(after.policy_of(11, Direction::Ingress), Some(web_after));
        assert_eq!(after.policy_of(12, Direction::Ingress), db_in);
        assert_eq!(after.policy_of(12, Direction::Egress), db_out);
        assert!(!after.tables.contains_key(&web_before));
        // Fresh ids skip whatever is installed, not just what is desired.
        let mut busy = PolicyIds::new();
        for id in 1..=5 {
            busy.reserve(id);
        }
        let d = compute(&changed, &locals, &busy);
        assert!(d.tables.keys().all(|id| *id > 5), "{:?}", d.tables.keys());
    }

    #[test]
    fn an_isolated_direction_that_allows_nothing_names_an_empty_table() {
        let deny = mk_policy(json!({
            "metadata": {"namespace": "shop", "name": "deny-egress"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"]}
        }));
        let input = mk_input(vec![deny]);
        let d = compute(&input, &mk_locals(), &PolicyIds::new());
        let id = d.policy_of(10, Direction::Egress).expect("isolated");
        assert_ne!(id, 0);
        assert_eq!(d.tables[&id], EMPTY_TABLE);
        assert_eq!(d.endpoints[&10].egress_plens, 0);
        assert!(!d.endpoints[&10].is_isolated(Direction::Ingress));
        // Every shop endpoint shares it.
        assert_eq!(d.policy_of(12, Direction::Egress), Some(id));
        // Installed and referenced, it keeps its id.
        let mut ids = PolicyIds::new();
        ids.insert(9, &EMPTY_TABLE);
        let d = compute(&input, &mk_locals(), &ids);
        assert_eq!(d.policy_of(10, Direction::Egress), Some(9));
    }

    #[test]
    fn enforcement_never_isolates_nothing() {
        let mut input = mk_input(mk_policies(8080));
        input.enforcement = PolicyEnforcement::Never;
        let d = compute(&input, &mk_locals(), &PolicyIds::new());
        assert!(d.tables.is_empty());
        assert!(d.endpoints.values().all(|e| e.flags == 0));
    }

    #[test]
    fn the_ip_cache_holds_prefixes_pods_and_the_host() {
        let input = mk_input(mk_policies(8080));
        let d = compute(&input, &mk_locals(), &PolicyIds::new());
        let id8 = input.cidrs.identity_of(&net("10.0.0.0/8")).expect("known");
        let id16 = input.cidrs.identity_of(&net("10.1.0.0/16")).expect("known");
        assert_eq!((id8, id16), (CIDR_FIRST, CIDR_FIRST + 1));
        let e = |identity, cidr_identity| IpCacheEntry {
            identity,
            cidr_identity,
        };
        let want: BTreeMap<IpNet, IpCacheEntry> = [
            ("10.0.0.0/8", e(WORLD, id8)),
            ("10.1.0.0/16", e(WORLD, id16)),
            ("10.244.1.10/32", e(WEB, id8)),
            ("fd00:a::10/128", e(WEB, WORLD)),
            ("10.244.1.11/32", e(WEB, id8)),
            ("10.244.1.12/32", e(DB, id8)),
            ("10.244.1.13/32", e(TOOL, id8)),
            ("10.244.2.20/32", e(TOOL, id8)),
            ("10.1.0.7/32", e(DB, id16)),
            ("192.0.2.11/32", e(HOST, WORLD)),
        ]
        .into_iter()
        .map(|(n, e)| (net(n), e))
        .collect();
        assert_eq!(d.ipcache, want);
        assert!(d.conflicts.is_empty(), "{:?}", d.conflicts);
        // The longest-prefix answer, as the datapath finds it.
        assert_eq!(d.identities_of(ip("10.1.2.3")), e(WORLD, id16));
        assert_eq!(d.identities_of(ip("10.9.9.9")), e(WORLD, id8));
        assert_eq!(d.identities_of(ip("10.1.0.7")), e(DB, id16));
        assert_eq!(d.identities_of(ip("203.0.113.1")), e(WORLD, WORLD));
        assert_eq!(d.identities_of(ip("2001:db8::1")), e(WORLD, WORLD));
    }

    #[test]
    fn an_address_that_is_also_a_policy_prefix_keeps_its_pod_identity() {
        let p = mk_policy(json!({
            "metadata": {"namespace": "shop", "name": "one"},
            "spec": {
                "podSelector": {},
                "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.1.12/32"}}]}]
            }
        }));
        let input = mk_input(vec![p]);
        let d = compute(&input, &mk_locals(), &PolicyIds::new());
        assert_eq!(
            d.ipcache[&net("10.244.1.12/32")],
            IpCacheEntry {
                identity: DB,
                cidr_identity: CIDR_FIRST
            }
        );
        assert!(d.conflicts.is_empty());
    }

    #[test]
    fn conflicting_claims_are_decided_and_reported() {
        let input = mk_input(vec![]);
        let locals = vec![
            mk_local(10, WEB, "shop", "web", &["10.244.1.10"]),
            // The same ifindex twice: the smaller identity stays.
            mk_local(20, DB, "shop", "db", &["10.244.1.20"]),
            mk_local(20, WEB, "shop", "web", &["10.244.1.21"]),
        ];
        let remote = [
            // A stale shard still lists a local pod's address.
            (ip("10.244.1.10"), TOOL),
            // Two shards, one address: the smaller identity.
            (ip("10.244.2.5"), 500),
            (ip("10.244.2.5"), 400),
            // The same claim twice is no conflict.
            (ip("10.244.2.6"), 400),
            (ip("10.244.2.6"), 400),
            // A remote pod claims the node's address.
            (ip("192.0.2.11"), 600),
        ];
        let host = [ip("192.0.2.11")];
        let world = World {
            input: &input,
            locals: &locals,
            remote: &remote,
            host: &host,
        };
        let d = desired(&world, &PolicyIds::new());
        let id = |s: &str| d.ipcache[&IpNet::from(ip(s))].identity;
        assert_eq!(id("10.244.1.10"), WEB);
        assert_eq!(id("10.244.2.5"), 400);
        assert_eq!(id("10.244.2.6"), 400);
        assert_eq!(id("192.0.2.11"), HOST);
        assert_eq!(id("10.244.1.21"), WEB);
        assert!(!d.ipcache.contains_key(&net("10.244.1.20/32")));
        assert_eq!(d.endpoints[&20].identity, WEB);
        let claim = |by, identity| Claim { by, identity };
        assert_eq!(
            d.conflicts,
            [
                Conflict::Address {
                    address: ip("10.244.1.10"),
                    kept: claim(Claimant::Local { ifindex: 10 }, WEB),
                    dropped: claim(Claimant::Remote, TOOL),
                },
                Conflict::Address {
                    address: ip("10.244.2.5"),
                    kept: claim(Claimant::Remote, 400),
                    dropped: claim(Claimant::Remote, 500),
                },
                Conflict::Address {
                    address: ip("192.0.2.11"),
                    kept: claim(Claimant::Host, HOST),
                    dropped: claim(Claimant::Remote, 600),
                },
                Conflict::Ifindex {
                    ifindex: 20,
                    kept: WEB,
                    dropped: DB,
                },
            ]
        );
        assert_eq!(
            d.conflicts[0].to_string(),
            "10.244.1.10 has identity 300 from local endpoint ifindex 10 and 302 from \
             another node's endpoints: kept 300"
        );
        // The order of the claims does not matter.
        let mut remote_r = remote.to_vec();
        remote_r.reverse();
        let world_r = World {
            remote: &remote_r,
            ..world
        };
        assert_eq!(desired(&world_r, &PolicyIds::new()), d);
    }

    #[test]
    fn named_ports_split_compilations() {
        let p = mk_policy(json!({
            "metadata": {"namespace": "shop", "name": "named"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"ports": [{"protocol": "TCP", "port": "http"}]}]
            }
        }));
        let input = mk_input(vec![p]);
        let mut locals = mk_locals();
        locals[0]
            .endpoint
            .named_ports
            .insert("http", Protocol::Tcp, 8080);
        locals[1]
            .endpoint
            .named_ports
            .insert("http", Protocol::Tcp, 9090);
        let d = compute(&input, &locals, &PolicyIds::new());
        assert!(!Arc::ptr_eq(&d.compiled[&10], &d.compiled[&11]));
        assert_ne!(
            d.policy_of(10, Direction::Ingress),
            d.policy_of(11, Direction::Ingress)
        );
    }
}
