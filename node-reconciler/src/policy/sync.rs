//! The policy maps as they are (a mirror), what to write to make them
//! [`Desired`] ([`plan`], pure), and the writing ([`apply`]).
//!
//! ```text
//!  maps ──dump──▶ Installed::read ─▶ Installed (mirror) ──ids()──▶ desired(…)
//!                                        │                           │
//!                                        └──────▶ plan ◀─────────────┘
//!                                                  │ 1 ipcache upserts
//!                                                  │ 2 entries of new tables
//!                                                  │ 3 endpoints created / switched
//!                                                  │ 4 endpoints removed
//!                                                  │ 5 entries of unused tables
//!                                                  ▼ 6 ipcache removals
//!                              apply(maps, &mut mirror, ops) ─▶ [(MapOp, BpfError)]
//! ```
//!
//! The order is what keeps a packet from seeing a half-written table: a
//! table is complete before an endpoint names it (a changed table has a
//! fresh id, see [`super::desired`]), and an endpoint has moved on before
//! its old table goes. `apply` keeps to that when writes fail: an endpoint
//! is not switched to a table whose writes failed, and a table still named
//! by an endpoint in the mirror is not removed. The mirror changes only for
//! what the kernel accepted, so after `apply` it equals the maps, and
//! `plan(desired, mirror)` is what is still missing. A periodic
//! `Installed::read` replaces it (anything else writing the maps is then
//! put right).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;
use nix::errno::Errno;
use tracing::{debug, info, warn};
use trellis_policy::table::Key;

use super::desired::{Desired, EMPTY_TABLE, PolicyIds, Table, plens, plens_of, policy_id};
use crate::bpf::abi::{Direction, EndpointEntry, IpCacheEntry, PolicyEntry, PolicyKey};
use crate::bpf::{BpfError, Datapath};

/// The three maps `apply` writes, and their dumps: [`Datapath`], or a fake
/// in tests. Removing what is absent succeeds.
pub trait PolicyMaps {
    /// Every endpoint entry.
    fn endpoints(&self) -> Result<Vec<(u32, EndpointEntry)>, BpfError>;
    /// Every policy entry of every table.
    fn policy_entries(&self) -> Result<Vec<(PolicyKey, PolicyEntry)>, BpfError>;
    /// Every IP cache prefix.
    fn ipcache_entries(&self) -> Result<Vec<(IpNet, IpCacheEntry)>, BpfError>;
    fn set_endpoint(&mut self, ifindex: u32, entry: &EndpointEntry) -> Result<(), BpfError>;
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), BpfError>;
    /// Forgets the connections of endpoint `ifindex`; how many there were.
    fn flush_conntrack(&mut self, ifindex: u32) -> Result<usize, BpfError>;
    fn set_policy(&mut self, key: PolicyKey, entry: PolicyEntry) -> Result<(), BpfError>;
    fn remove_policy(&mut self, key: PolicyKey) -> Result<(), BpfError>;
    fn set_ipcache(&mut self, net: IpNet, entry: IpCacheEntry) -> Result<(), BpfError>;
    fn remove_ipcache(&mut self, net: IpNet) -> Result<(), BpfError>;
}

impl PolicyMaps for Datapath {
    fn endpoints(&self) -> Result<Vec<(u32, EndpointEntry)>, BpfError> {
        Datapath::endpoints(self)
    }
    fn policy_entries(&self) -> Result<Vec<(PolicyKey, PolicyEntry)>, BpfError> {
        Datapath::policy_entries(self)
    }
    fn ipcache_entries(&self) -> Result<Vec<(IpNet, IpCacheEntry)>, BpfError> {
        Datapath::ipcache_entries(self)
    }
    fn set_endpoint(&mut self, ifindex: u32, entry: &EndpointEntry) -> Result<(), BpfError> {
        Datapath::set_endpoint(self, ifindex, entry)
    }
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), BpfError> {
        Datapath::remove_endpoint(self, ifindex)
    }
    fn flush_conntrack(&mut self, ifindex: u32) -> Result<usize, BpfError> {
        Datapath::flush_conntrack(self, ifindex)
    }
    fn set_policy(&mut self, key: PolicyKey, entry: PolicyEntry) -> Result<(), BpfError> {
        Datapath::set_policy(self, key, entry)
    }
    fn remove_policy(&mut self, key: PolicyKey) -> Result<(), BpfError> {
        Datapath::remove_policy(self, key)
    }
    fn set_ipcache(&mut self, net: IpNet, entry: IpCacheEntry) -> Result<(), BpfError> {
        Datapath::set_ipcache(self, net, entry)
    }
    fn remove_ipcache(&mut self, net: IpNet) -> Result<(), BpfError> {
        Datapath::remove_ipcache(self, net)
    }
}

/// What the policy maps hold, as [`Desired`] spells it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// `trellis_endpoints`.
    pub endpoints: BTreeMap<u32, EndpointEntry>,
    /// `trellis_policy`, grouped by table id (a table with no entries is
    /// absent).
    pub tables: BTreeMap<u32, Table>,
    /// `trellis_ipcache`.
    pub ipcache: BTreeMap<IpNet, IpCacheEntry>,
}

impl Installed {
    /// The mirror, from dumps of the maps (at start, and for a periodic full
    /// resync).
    pub fn read<M: PolicyMaps + ?Sized>(maps: &M) -> Result<Installed, BpfError> {
        let endpoints = maps.endpoints()?.into_iter().collect();
        let mut tables: BTreeMap<u32, Table> = BTreeMap::new();
        for (k, v) in maps.policy_entries()? {
            tables.entry(k.policy).or_default().insert(key_of(&k), v);
        }
        let ipcache = maps.ipcache_entries()?.into_iter().collect();
        Ok(Installed {
            endpoints,
            tables,
            ipcache,
        })
    }

    /// Which contents are installed under which table id, for
    /// [`super::desired::desired`]. A table an isolated endpoint names but
    /// that has no entries holds the empty table; every id in use anywhere
    /// is reserved. Borrows the tables: no copy.
    pub fn ids(&self) -> PolicyIds<'_> {
        let mut ids = PolicyIds::new();
        for (id, table) in &self.tables {
            ids.insert(*id, table);
        }
        for entry in self.endpoints.values() {
            for dir in Direction::ALL {
                let id = policy_id(entry, dir);
                if entry.is_isolated(dir) && !self.tables.contains_key(&id) {
                    ids.insert(id, &EMPTY_TABLE);
                } else {
                    ids.reserve(id);
                }
            }
        }
        ids
    }

    /// An endpoint whose isolated direction names table `policy`.
    pub fn user_of(&self, policy: u32) -> Option<u32> {
        self.endpoints
            .iter()
            .find(|(_, e)| {
                Direction::ALL
                    .into_iter()
                    .any(|d| e.is_isolated(d) && policy_id(e, d) == policy)
            })
            .map(|(ifindex, _)| *ifindex)
    }
}

fn key_of(k: &PolicyKey) -> Key {
    Key {
        identity: k.identity,
        proto: k.proto,
        plen: k.plen,
        port: k.port,
    }
}

fn policy_key(policy: u32, k: &Key) -> PolicyKey {
    PolicyKey {
        policy,
        identity: k.identity,
        proto: k.proto,
        plen: k.plen,
        port: k.port,
    }
}

/// One change to the policy maps. The variants are in [`plan`]'s order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOp {
    /// Insert or replace an IP cache prefix.
    SetIpCache { net: IpNet, entry: IpCacheEntry },
    /// Write these entries of table `policy` (all of a new table).
    SetTable {
        policy: u32,
        entries: Vec<(Key, PolicyEntry)>,
    },
    /// Create an endpoint entry, or switch it in one update.
    SetEndpoint { ifindex: u32, entry: EndpointEntry },
    /// Remove the entry of an interface that is no longer a local endpoint
    /// (and forget its connections: a new veth may get its index).
    RemoveEndpoint { ifindex: u32 },
    /// Remove every entry of a table no endpoint names any more.
    RemoveTable { policy: u32, keys: Vec<Key> },
    /// Remove entries of a table that stays. Only planned when the desired
    /// state was computed against another mirror than the one planned
    /// against (ids are otherwise never rewritten in place).
    RemoveEntries { policy: u32, keys: Vec<Key> },
    /// Remove an IP cache prefix.
    RemoveIpCache { net: IpNet },
}

impl MapOp {
    /// Its step in the order of [`plan`], 1 to 6.
    pub fn step(&self) -> u8 {
        match self {
            MapOp::SetIpCache { .. } => 1,
            MapOp::SetTable { .. } => 2,
            MapOp::SetEndpoint { .. } => 3,
            MapOp::RemoveEndpoint { .. } => 4,
            MapOp::RemoveTable { .. } | MapOp::RemoveEntries { .. } => 5,
            MapOp::RemoveIpCache { .. } => 6,
        }
    }

    /// A stable name, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            MapOp::SetIpCache { .. } => "set_ipcache",
            MapOp::SetTable { .. } => "set_table",
            MapOp::SetEndpoint { .. } => "set_endpoint",
            MapOp::RemoveEndpoint { .. } => "remove_endpoint",
            MapOp::RemoveTable { .. } => "remove_table",
            MapOp::RemoveEntries { .. } => "remove_entries",
            MapOp::RemoveIpCache { .. } => "remove_ipcache",
        }
    }
}

impl fmt::Display for MapOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapOp::SetIpCache { net, entry } => write!(
                f,
                "set ipcache {net} identity {} cidr identity {:#x}",
                entry.identity, entry.cidr_identity
            ),
            MapOp::SetTable { policy, entries } => {
                write!(f, "set policy table {policy}: {} entries", entries.len())
            }
            MapOp::SetEndpoint { ifindex, entry } => {
                write!(
                    f,
                    "set endpoint ifindex {ifindex} identity {}",
                    entry.identity
                )?;
                for dir in Direction::ALL {
                    if entry.is_isolated(dir) {
                        let (id, bits) = (policy_id(entry, dir), plens_of(entry, dir));
                        write!(f, ", {dir} table {id} plens {bits:#x}")?;
                    } else {
                        write!(f, ", {dir} open")?;
                    }
                }
                Ok(())
            }
            MapOp::RemoveEndpoint { ifindex } => write!(f, "remove endpoint ifindex {ifindex}"),
            MapOp::RemoveTable { policy, keys } => {
                write!(f, "remove policy table {policy}: {} entries", keys.len())
            }
            MapOp::RemoveEntries { policy, keys } => write!(
                f,
                "remove {} stale entries of policy table {policy}",
                keys.len()
            ),
            MapOp::RemoveIpCache { net } => write!(f, "remove ipcache {net}"),
        }
    }
}

/// The ops that make `installed` equal to `desired`, in the order that
/// never shows a packet a half-written table: (1) IP cache upserts, (2)
/// table entries, (3) endpoints created or switched, (4) endpoints removed,
/// (5) entries of tables no longer named, (6) IP cache removals. Nothing
/// for what is already equal, so a converged node plans nothing. Pure.
pub fn plan(desired: &Desired, installed: &Installed) -> Vec<MapOp> {
    plan_with(desired, IpCachePlan::All(&desired.ipcache), installed)
}

/// Which IP cache [`plan_with`] plans, and how much of it.
#[derive(Debug, Clone, Copy)]
pub enum IpCachePlan<'a> {
    /// Every key of the desired cache and of the mirror (after a start,
    /// when the mirror was read from the maps).
    All(&'a BTreeMap<IpNet, IpCacheEntry>),
    /// Only these keys: the others are known to be equal already (an
    /// [`super::ipcache::IpCacheIndex`]'s touched keys).
    Keys(&'a BTreeMap<IpNet, IpCacheEntry>, &'a BTreeSet<IpNet>),
}

/// [`plan`] with the IP cache given apart from `desired` (whose `ipcache`
/// is then not read), planned in full or for some keys only: the ops are
/// those of [`plan`] restricted to those keys.
pub fn plan_with(desired: &Desired, ipcache: IpCachePlan, installed: &Installed) -> Vec<MapOp> {
    let mut ops = Vec::new();
    let mut removals = Vec::new();
    let mut plan_key = |net: &IpNet, want: Option<&IpCacheEntry>| match want {
        Some(entry) => {
            if installed.ipcache.get(net) != Some(entry) {
                ops.push(MapOp::SetIpCache {
                    net: *net,
                    entry: *entry,
                });
            }
        }
        None => {
            if installed.ipcache.contains_key(net) {
                removals.push(MapOp::RemoveIpCache { net: *net });
            }
        }
    };
    match ipcache {
        IpCachePlan::All(want) => {
            for (net, entry) in want {
                plan_key(net, Some(entry));
            }
            for net in installed.ipcache.keys() {
                if !want.contains_key(net) {
                    plan_key(net, None);
                }
            }
        }
        IpCachePlan::Keys(want, keys) => {
            for net in keys {
                plan_key(net, want.get(net));
            }
        }
    }
    for (policy, table) in &desired.tables {
        let have = installed.tables.get(policy).unwrap_or(&EMPTY_TABLE);
        let entries: Vec<(Key, PolicyEntry)> = table
            .iter()
            .filter(|(k, v)| have.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect();
        if !entries.is_empty() {
            ops.push(MapOp::SetTable {
                policy: *policy,
                entries,
            });
        }
    }
    for (ifindex, entry) in &desired.endpoints {
        if installed.endpoints.get(ifindex) != Some(entry) {
            ops.push(MapOp::SetEndpoint {
                ifindex: *ifindex,
                entry: *entry,
            });
        }
    }
    for ifindex in installed.endpoints.keys() {
        if !desired.endpoints.contains_key(ifindex) {
            ops.push(MapOp::RemoveEndpoint { ifindex: *ifindex });
        }
    }
    for (policy, table) in &installed.tables {
        match desired.tables.get(policy) {
            None => ops.push(MapOp::RemoveTable {
                policy: *policy,
                keys: table.keys().copied().collect(),
            }),
            Some(want) => {
                let keys: Vec<Key> = table
                    .keys()
                    .filter(|k| !want.contains_key(k))
                    .copied()
                    .collect();
                if !keys.is_empty() {
                    ops.push(MapOp::RemoveEntries {
                        policy: *policy,
                        keys,
                    });
                }
            }
        }
    }
    ops.extend(removals);
    ops
}

/// Executes `ops` in order, going on after a failure, and returns every
/// failure. `installed` follows every write the kernel accepted, and
/// nothing else. Removing what is already gone is success. Two ops are
/// refused rather than run, to keep [`plan`]'s promise when an earlier
/// write failed: switching an endpoint to a table that is not complete
/// ([`BpfError::TableIncomplete`]), and removing a table an endpoint still
/// names ([`BpfError::TableInUse`]).
///
/// Logs each op at debug (a first sync at cluster scale is thousands of
/// them), each failure at warn, and one summary at info when there was
/// anything to do.
pub fn apply<M: PolicyMaps + ?Sized>(
    maps: &mut M,
    installed: &mut Installed,
    ops: &[MapOp],
) -> Vec<(MapOp, BpfError)> {
    let mut incomplete = BTreeSet::new();
    let mut failures = Vec::new();
    for op in ops {
        match apply_one(maps, installed, &mut incomplete, op) {
            Ok(()) => debug!(op = %op, "applied"),
            Err(e) => {
                warn!(op = %op, error = %e, "not applied");
                failures.push((op.clone(), e));
            }
        }
    }
    if let Some(summary) = summary(ops, &failures) {
        info!(
            ops = ops.len(),
            failed = failures.len(),
            "policy maps: {summary}"
        );
    }
    failures
}

/// What an [`apply`] of `ops` did, in one line: the ops applied of each
/// kind, in plan order, then how many failed ("12 set_ipcache,
/// 1 set_endpoint; 2 failed"). `None` when there was nothing to do.
fn summary(ops: &[MapOp], failures: &[(MapOp, BpfError)]) -> Option<String> {
    if ops.is_empty() {
        return None;
    }
    // At most seven kinds: a list beats a map, and keeps plan order.
    let mut applied: Vec<(&str, usize)> = Vec::new();
    for op in ops {
        match applied.iter_mut().find(|(kind, _)| *kind == op.kind()) {
            Some((_, n)) => *n += 1,
            None => applied.push((op.kind(), 1)),
        }
    }
    for (op, _) in failures {
        if let Some((_, n)) = applied.iter_mut().find(|(kind, _)| *kind == op.kind()) {
            *n = n.saturating_sub(1);
        }
    }
    let parts: Vec<String> = applied
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(kind, n)| format!("{n} {kind}"))
        .collect();
    let mut line = if parts.is_empty() {
        "nothing applied".to_owned()
    } else {
        parts.join(", ")
    };
    if !failures.is_empty() {
        line.push_str(&format!("; {} failed", failures.len()));
    }
    Some(line)
}

fn apply_one<M: PolicyMaps + ?Sized>(
    maps: &mut M,
    installed: &mut Installed,
    incomplete: &mut BTreeSet<u32>,
    op: &MapOp,
) -> Result<(), BpfError> {
    match op {
        MapOp::SetIpCache { net, entry } => {
            maps.set_ipcache(*net, *entry)?;
            installed.ipcache.insert(*net, *entry);
        }
        MapOp::SetTable { policy, entries } => {
            for (key, entry) in entries {
                if let Err(e) = maps.set_policy(policy_key(*policy, key), *entry) {
                    // The rest would be of no use: no endpoint may name it.
                    incomplete.insert(*policy);
                    return Err(e);
                }
                installed
                    .tables
                    .entry(*policy)
                    .or_default()
                    .insert(*key, *entry);
            }
        }
        MapOp::SetEndpoint { ifindex, entry } => {
            for dir in Direction::ALL.into_iter().filter(|d| entry.is_isolated(*d)) {
                let policy = policy_id(entry, dir);
                // A table whose writes failed now, or one the mirror does
                // not hold with the prefix lengths the entry announces.
                let have = installed.tables.get(&policy).unwrap_or(&EMPTY_TABLE);
                if incomplete.contains(&policy) || plens(have) != plens_of(entry, dir) {
                    return Err(BpfError::TableIncomplete {
                        policy,
                        ifindex: *ifindex,
                    });
                }
            }
            maps.set_endpoint(*ifindex, entry)?;
            installed.endpoints.insert(*ifindex, *entry);
        }
        MapOp::RemoveEndpoint { ifindex } => {
            gone_ok(maps.remove_endpoint(*ifindex))?;
            installed.endpoints.remove(ifindex);
            // Its veth is gone; the next one may get the same index (and
            // the pod's address), and must not inherit its connections.
            maps.flush_conntrack(*ifindex)?;
        }
        MapOp::RemoveTable { policy, keys } => {
            if let Some(ifindex) = installed.user_of(*policy) {
                return Err(BpfError::TableInUse {
                    policy: *policy,
                    ifindex,
                });
            }
            remove_entries(maps, installed, *policy, keys)?;
        }
        MapOp::RemoveEntries { policy, keys } => {
            remove_entries(maps, installed, *policy, keys)?;
        }
        MapOp::RemoveIpCache { net } => {
            gone_ok(maps.remove_ipcache(*net))?;
            installed.ipcache.remove(net);
        }
    }
    Ok(())
}

fn remove_entries<M: PolicyMaps + ?Sized>(
    maps: &mut M,
    installed: &mut Installed,
    policy: u32,
    keys: &[Key],
) -> Result<(), BpfError> {
    for key in keys {
        gone_ok(maps.remove_policy(policy_key(policy, key)))?;
        if let Some(table) = installed.tables.get_mut(&policy) {
            table.remove(key);
            if table.is_empty() {
                installed.tables.remove(&policy);
            }
        }
    }
    Ok(())
}

/// A removal that found nothing to remove did its job.
fn gone_ok(r: Result<(), BpfError>) -> Result<(), BpfError> {
    match r {
        Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests;
