//! `plan` and `apply` against a recording fake of the maps.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::MapError;
use trellis_policy::compile::Input;

use super::*;
use crate::policy::desired::{Local, PolicyIds};
use crate::policy::testing::*;

/// The three maps in memory, strict about removals (absent is ENOENT, as
/// the kernel answers; the executor must take that as done), and failing
/// the writes of chosen policy keys.
#[derive(Debug, Default)]
struct FakeMaps {
    endpoints: BTreeMap<u32, EndpointEntry>,
    policy: BTreeMap<PolicyKey, PolicyEntry>,
    ipcache: BTreeMap<IpNet, IpCacheEntry>,
    fail: BTreeSet<PolicyKey>,
    flushed: Vec<u32>,
    writes: usize,
}

fn refused(map: &'static str, op: &'static str, key: String, errno: Errno) -> BpfError {
    BpfError::Map {
        map,
        op,
        key,
        errno: Some(errno),
        source: Box::new(MapError::KeyNotFound),
    }
}

fn absent<T>(found: Option<T>, map: &'static str, key: String) -> Result<(), BpfError> {
    match found {
        Some(_) => Ok(()),
        None => Err(refused(map, "remove", key, Errno::ENOENT)),
    }
}

impl PolicyMaps for FakeMaps {
    fn endpoints(&self) -> Result<Vec<(u32, EndpointEntry)>, BpfError> {
        Ok(self.endpoints.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn policy_entries(&self) -> Result<Vec<(PolicyKey, PolicyEntry)>, BpfError> {
        Ok(self.policy.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn ipcache_entries(&self) -> Result<Vec<(IpNet, IpCacheEntry)>, BpfError> {
        Ok(self.ipcache.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn set_endpoint(&mut self, ifindex: u32, entry: &EndpointEntry) -> Result<(), BpfError> {
        self.writes += 1;
        self.endpoints.insert(ifindex, *entry);
        Ok(())
    }
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), BpfError> {
        self.writes += 1;
        absent(
            self.endpoints.remove(&ifindex),
            "trellis_endpoints",
            ifindex.to_string(),
        )
    }
    fn flush_conntrack(&mut self, ifindex: u32) -> Result<usize, BpfError> {
        self.flushed.push(ifindex);
        Ok(0)
    }
    fn set_policy(&mut self, key: PolicyKey, entry: PolicyEntry) -> Result<(), BpfError> {
        self.writes += 1;
        if self.fail.contains(&key) {
            return Err(refused(
                "trellis_policy",
                "set",
                key.to_string(),
                Errno::E2BIG,
            ));
        }
        self.policy.insert(key, entry);
        Ok(())
    }
    fn remove_policy(&mut self, key: PolicyKey) -> Result<(), BpfError> {
        self.writes += 1;
        absent(self.policy.remove(&key), "trellis_policy", key.to_string())
    }
    fn set_ipcache(&mut self, net: IpNet, entry: IpCacheEntry) -> Result<(), BpfError> {
        self.writes += 1;
        self.ipcache.insert(net, entry);
        Ok(())
    }
    fn remove_ipcache(&mut self, net: IpNet) -> Result<(), BpfError> {
        self.writes += 1;
        absent(
            self.ipcache.remove(&net),
            "trellis_ipcache",
            net.to_string(),
        )
    }
}

/// Plans `desired` against the mirror, applies it, and checks that it all
/// went through, that the mirror is what the maps hold and that nothing
/// is left to do.
#[track_caller]
fn converge(maps: &mut FakeMaps, mirror: &mut Installed, desired: &Desired) -> Vec<MapOp> {
    let ops = plan(desired, mirror);
    let failures = apply(maps, mirror, &ops);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(Installed::read(&*maps).expect("read"), *mirror);
    let left = plan(desired, mirror);
    assert!(left.is_empty(), "left to do: {left:#?}");
    ops
}

fn steps(ops: &[MapOp]) -> Vec<u8> {
    ops.iter().map(MapOp::step).collect()
}

#[track_caller]
fn assert_ordered(ops: &[MapOp]) {
    let s = steps(ops);
    assert!(s.is_sorted(), "out of order: {s:?}\n{ops:#?}");
}

/// The world with web's port changed to 8081 and without endpoint 11.
fn changed() -> (Input, Vec<Local>) {
    let locals = mk_locals()
        .into_iter()
        .filter(|l| l.ifindex != 11)
        .collect();
    (mk_input(mk_policies(8081)), locals)
}

#[test]
fn a_first_sync_writes_everything_in_order_then_nothing() {
    let input = mk_input(mk_policies(8080));
    let d = compute(&input, &mk_locals(), &PolicyIds::new());
    let (mut maps, mut mirror) = (FakeMaps::default(), Installed::default());
    let ops = converge(&mut maps, &mut mirror, &d);
    assert_ordered(&ops);
    let kinds = |k: &str| ops.iter().filter(|o| o.kind() == k).count();
    assert_eq!(kinds("set_ipcache"), d.ipcache.len());
    assert_eq!(kinds("set_table"), d.tables.len());
    assert_eq!(kinds("set_endpoint"), d.endpoints.len());
    assert_eq!(
        ops.len(),
        d.ipcache.len() + d.tables.len() + d.endpoints.len()
    );
    assert_eq!(mirror.endpoints, d.endpoints);
    assert_eq!(mirror.tables, d.tables);
    assert_eq!(mirror.ipcache, d.ipcache);
    // Recomputing against what is installed changes nothing.
    let again = compute(&input, &mk_locals(), &mirror.ids());
    assert_eq!(again, d);
    assert!(plan(&again, &mirror).is_empty());
}

#[test]
fn a_changed_table_is_written_switched_to_then_removed() {
    let input = mk_input(mk_policies(8080));
    let before = compute(&input, &mk_locals(), &PolicyIds::new());
    let (mut maps, mut mirror) = (FakeMaps::default(), Installed::default());
    converge(&mut maps, &mut mirror, &before);
    let old = before.policy_of(10, Direction::Ingress).expect("isolated");

    let (input2, locals2) = changed();
    let after = compute(&input2, &locals2, &mirror.ids());
    let new = after.policy_of(10, Direction::Ingress).expect("isolated");
    assert!(!mirror.tables.contains_key(&new), "a fresh id");
    let ops = plan(&after, &mirror);
    assert_ordered(&ops);
    let table = |policy| &after.tables[&policy];
    let want = vec![
        // 10.244.1.11 (endpoint 11) goes last.
        MapOp::SetTable {
            policy: new,
            entries: table(new).iter().map(|(k, v)| (*k, *v)).collect(),
        },
        MapOp::SetEndpoint {
            ifindex: 10,
            entry: after.endpoints[&10],
        },
        MapOp::RemoveEndpoint { ifindex: 11 },
        MapOp::RemoveTable {
            policy: old,
            keys: before.tables[&old].keys().copied().collect(),
        },
        MapOp::RemoveIpCache {
            net: net("10.244.1.11/32"),
        },
    ];
    assert_eq!(ops, want);
    // db's tables did not move.
    for dir in Direction::ALL {
        assert_eq!(after.policy_of(12, dir), before.policy_of(12, dir));
    }
    let failures = apply(&mut maps, &mut mirror, &ops);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(maps.flushed, [11]);
    assert!(maps.policy.keys().all(|k| k.policy != old));
    assert!(plan(&after, &mirror).is_empty());
    assert_eq!(Installed::read(&maps).expect("read"), mirror);
}

#[test]
fn an_unrelated_pod_touches_only_the_ip_cache() {
    let input = mk_input(mk_policies(8080));
    let locals = mk_locals();
    let d = compute(&input, &locals, &PolicyIds::new());
    let (mut maps, mut mirror) = (FakeMaps::default(), Installed::default());
    converge(&mut maps, &mut mirror, &d);

    // A remote pod of a known identity starts.
    let mut remote = mk_remote();
    remote.push((ip("10.244.3.3"), WEB));
    let d2 = compute_with(&input, &locals, &remote, &mirror.ids());
    let ops = converge(&mut maps, &mut mirror, &d2);
    assert_eq!(
        ops,
        [MapOp::SetIpCache {
            net: net("10.244.3.3/32"),
            entry: IpCacheEntry {
                identity: WEB,
                cidr_identity: input.cidrs.cidr_identity(ip("10.244.3.3")),
            },
        }]
    );
    // … and stops.
    let d3 = compute(&input, &locals, &mirror.ids());
    let ops = converge(&mut maps, &mut mirror, &d3);
    assert_eq!(
        ops,
        [MapOp::RemoveIpCache {
            net: net("10.244.3.3/32")
        }]
    );
    // A local pod with labels the node already compiled for: its address
    // and its endpoint entry, no table.
    let mut more = locals.clone();
    more.push(mk_local(14, DB, "shop", "db", &["10.244.1.14"]));
    let d4 = compute(&input, &more, &mirror.ids());
    let ops = converge(&mut maps, &mut mirror, &d4);
    assert_eq!(
        ops.iter().map(MapOp::kind).collect::<Vec<_>>(),
        ["set_ipcache", "set_endpoint"]
    );
    assert_eq!(
        d4.endpoints[&14].ingress_policy,
        d4.endpoints[&12].ingress_policy
    );
}

#[test]
fn a_failed_table_write_leaves_endpoints_on_their_complete_table() {
    let input = mk_input(mk_policies(8080));
    let before = compute(&input, &mk_locals(), &PolicyIds::new());
    let (mut maps, mut mirror) = (FakeMaps::default(), Installed::default());
    converge(&mut maps, &mut mirror, &before);
    let old = before.policy_of(10, Direction::Ingress).expect("isolated");

    let input2 = mk_input(mk_policies(8081));
    let after = compute(&input2, &mk_locals(), &mirror.ids());
    let new = after.policy_of(10, Direction::Ingress).expect("isolated");
    // The table's last entry is refused: it is half written.
    let last = after.tables[&new].keys().last().expect("entries");
    maps.fail.insert(policy_key(new, last));
    let ops = plan(&after, &mirror);
    let failures = apply(&mut maps, &mut mirror, &ops);
    let got: Vec<(&str, String)> = failures
        .iter()
        .map(|(op, e)| (op.kind(), e.to_string()))
        .collect();
    assert_eq!(got.len(), 4, "{got:#?}");
    assert_eq!(got[0].0, "set_table");
    assert!(got[0].1.contains("trellis_policy"), "{}", got[0].1);
    for (i, ifindex) in [(1, 10), (2, 11)] {
        assert_eq!(
            failures[i].0,
            MapOp::SetEndpoint {
                ifindex,
                entry: after.endpoints[&ifindex]
            }
        );
        assert!(
            matches!(failures[i].1, BpfError::TableIncomplete { policy, ifindex: f }
                if policy == new && f == ifindex),
            "{}",
            failures[i].1
        );
    }
    assert!(
        matches!(failures[3].1, BpfError::TableInUse { policy, ifindex: 10 } if policy == old),
        "{}",
        failures[3].1
    );
    // Every op failed: the log line says so.
    assert_eq!(ops.len(), 4, "{ops:#?}");
    assert_eq!(
        summary(&ops, &failures).as_deref(),
        Some("nothing applied; 4 failed")
    );
    // The endpoints still use the old, complete table; the mirror says
    // exactly what the maps hold, the half-written table included.
    assert_eq!(maps.endpoints[&10], before.endpoints[&10]);
    assert_eq!(mirror.tables[&old], before.tables[&old]);
    assert_eq!(
        mirror.tables[&new].len(),
        after.tables[&new].len() - 1,
        "all but the refused entry"
    );
    assert_eq!(Installed::read(&maps).expect("read"), mirror);

    // Next round, the kernel takes it: the half-written table is not
    // reused (its contents differ), a fresh one is written in full.
    maps.fail.clear();
    let retry = compute(&input2, &mk_locals(), &mirror.ids());
    let fresh = retry.policy_of(10, Direction::Ingress).expect("isolated");
    assert!(fresh != new && fresh != old, "{fresh}");
    let ops = converge(&mut maps, &mut mirror, &retry);
    assert_ordered(&ops);
    let removed: BTreeSet<u32> = ops
        .iter()
        .filter_map(|op| match op {
            MapOp::RemoveTable { policy, .. } => Some(*policy),
            _ => None,
        })
        .collect();
    assert_eq!(removed, BTreeSet::from([old, new]));
    assert!(
        maps.policy
            .keys()
            .all(|k| k.policy != new && k.policy != old)
    );
}

#[test]
fn removing_what_is_already_gone_succeeds() {
    let input = mk_input(mk_policies(8080));
    let d = compute(&input, &mk_locals(), &PolicyIds::new());
    let (mut maps, mut mirror) = (FakeMaps::default(), Installed::default());
    converge(&mut maps, &mut mirror, &d);
    // Someone emptied the maps behind the mirror's back.
    let mut gone = FakeMaps::default();
    let ops = plan(&Desired::default(), &mirror);
    assert_ordered(&ops);
    let failures = apply(&mut gone, &mut mirror, &ops);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(mirror, Installed::default());
    assert!(gone.writes > 0);
}

#[test]
fn a_mirror_resynced_from_the_maps_puts_foreign_writes_right() {
    let input = mk_input(mk_policies(8080));
    let d = compute(&input, &mk_locals(), &PolicyIds::new());
    let (mut maps, mut mirror) = (FakeMaps::default(), Installed::default());
    converge(&mut maps, &mut mirror, &d);
    // Writes the mirror does not know of: a changed entry, an extra one,
    // an entry under id 0, an endpoint of nobody's.
    let id = d.policy_of(12, Direction::Egress).expect("isolated");
    let (k, mut v) = d.tables[&id]
        .iter()
        .next()
        .map(|(k, v)| (*k, *v))
        .expect("entry");
    v.rule += 1;
    maps.policy.insert(policy_key(id, &k), v);
    maps.policy
        .insert(PolicyKey::any_protocol(0, 0), PolicyEntry::allow(1));
    maps.endpoints.insert(99, EndpointEntry::new(WEB));
    let mut resynced = Installed::read(&maps).expect("read");
    assert_ne!(resynced, mirror);
    // db's egress table no longer holds what it should: it gets a fresh id
    // and the tainted one goes once nothing names it.
    let d2 = compute(&input, &mk_locals(), &resynced.ids());
    let fresh = d2.policy_of(12, Direction::Egress).expect("isolated");
    assert_ne!(fresh, id);
    assert_ne!(fresh, 0);
    let ops = converge(&mut maps, &mut resynced, &d2);
    assert_ordered(&ops);
    assert!(ops.contains(&MapOp::RemoveEndpoint { ifindex: 99 }));
    assert!(maps.policy.keys().all(|k| k.policy != 0 && k.policy != id));
}

#[test]
fn a_desired_state_computed_against_other_ids_is_still_reached() {
    let input = mk_input(mk_policies(8080));
    let before = compute(&input, &mk_locals(), &PolicyIds::new());
    let (mut maps, mut mirror) = (FakeMaps::default(), Installed::default());
    converge(&mut maps, &mut mirror, &before);
    // Computed as if nothing were installed: the changed web table lands
    // on id 1, which holds the old one. Not atomic, but it converges.
    let (input2, locals2) = changed();
    let stale = compute(&input2, &locals2, &PolicyIds::new());
    let ops = converge(&mut maps, &mut mirror, &stale);
    assert_ordered(&ops);
    assert!(ops.iter().any(|o| o.kind() == "remove_entries"), "{ops:#?}");
    assert_eq!(mirror.tables, stale.tables);
}

#[test]
fn ids_from_the_mirror_include_tables_without_entries() {
    let mut mirror = Installed::default();
    mirror
        .endpoints
        .insert(10, EndpointEntry::new(WEB).isolate(Direction::Egress, 5, 0));
    let t: Table = [(Key::any_protocol(0), PolicyEntry::allow(16))].into();
    mirror.tables.insert(3, t.clone());
    let ids = mirror.ids();
    assert_eq!(ids.get(&EMPTY_TABLE), Some(5));
    assert_eq!(ids.get(&t), Some(3));
    assert!(ids.is_used(3) && ids.is_used(5) && !ids.is_used(4));
    assert_eq!(mirror.user_of(5), Some(10));
    assert_eq!(mirror.user_of(3), None);
}

#[test]
fn an_endpoint_is_not_pointed_at_a_table_the_mirror_lacks() {
    // A plan from another mirror names table 7, which is not there.
    let entry = EndpointEntry::new(WEB).isolate(Direction::Ingress, 7, 1 << 16);
    let ops = [MapOp::SetEndpoint { ifindex: 10, entry }];
    let (mut maps, mut mirror) = (FakeMaps::default(), Installed::default());
    let failures = apply(&mut maps, &mut mirror, &ops);
    assert!(
        matches!(
            failures.as_slice(),
            [(
                _,
                BpfError::TableIncomplete {
                    policy: 7,
                    ifindex: 10
                }
            )]
        ),
        "{failures:?}"
    );
    assert!(maps.endpoints.is_empty() && mirror.endpoints.is_empty());
}

#[test]
fn an_apply_is_summed_up_in_one_line_and_nothing_to_do_in_none() {
    let set = |ip: &str| MapOp::SetIpCache {
        net: net(ip),
        entry: IpCacheEntry {
            identity: 300,
            cidr_identity: 2,
        },
    };
    let remove = |ip: &str| MapOp::RemoveIpCache { net: net(ip) };
    let ops = [
        set("10.0.0.1/32"),
        set("10.0.0.2/32"),
        MapOp::RemoveEndpoint { ifindex: 7 },
        remove("10.0.0.3/32"),
    ];
    assert_eq!(summary(&[], &[]), None);
    assert_eq!(
        summary(&ops, &[]).as_deref(),
        Some("2 set_ipcache, 1 remove_endpoint, 1 remove_ipcache")
    );
    let failed = |op: &MapOp| {
        (
            op.clone(),
            refused("trellis_ipcache", "set", "k".into(), Errno::E2BIG),
        )
    };
    assert_eq!(
        summary(&ops, &[failed(&ops[1]), failed(&ops[3])]).as_deref(),
        Some("1 set_ipcache, 1 remove_endpoint; 2 failed")
    );
    assert_eq!(
        summary(&ops[..1], &[failed(&ops[0])]).as_deref(),
        Some("nothing applied; 1 failed")
    );
}

#[test]
fn ops_display_for_logs() {
    let entry = EndpointEntry::new(300).isolate(Direction::Egress, 4, 1 << 16);
    let cases = [
        (
            MapOp::SetIpCache {
                net: net("10.0.0.1/32"),
                entry: IpCacheEntry {
                    identity: 300,
                    cidr_identity: 0x0100_0001,
                },
            },
            "set ipcache 10.0.0.1/32 identity 300 cidr identity 0x1000001",
        ),
        (
            MapOp::SetTable {
                policy: 4,
                entries: vec![(Key::any_protocol(1), PolicyEntry::allow(1))],
            },
            "set policy table 4: 1 entries",
        ),
        (
            MapOp::SetEndpoint { ifindex: 7, entry },
            "set endpoint ifindex 7 identity 300, ingress open, egress table 4 plens 0x10000",
        ),
        (
            MapOp::RemoveEndpoint { ifindex: 7 },
            "remove endpoint ifindex 7",
        ),
        (
            MapOp::RemoveTable {
                policy: 4,
                keys: vec![],
            },
            "remove policy table 4: 0 entries",
        ),
        (
            MapOp::RemoveEntries {
                policy: 4,
                keys: vec![Key::any_protocol(1)],
            },
            "remove 1 stale entries of policy table 4",
        ),
        (
            MapOp::RemoveIpCache {
                net: net("fd00::/8"),
            },
            "remove ipcache fd00::/8",
        ),
    ];
    for (op, want) in cases {
        assert_eq!(op.to_string(), want);
    }
}
