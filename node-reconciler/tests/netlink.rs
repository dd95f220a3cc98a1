//! The netlink layer against a real kernel: `observe` → `desired` → `plan` →
//! `apply` in network namespaces, each result checked independently with
//! `ip -j` / `bridge -j`.
//!
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN for setns). Each test makes its
//! own namespaces `trellis-t-<test>-<n>`, joined by a veth pair
//! `trls-<test>-<n>` with 192.0.2.1<n>/24, and deletes them by name when it
//! ends, also when it fails.

// Test-only helpers: a panic here is the failure report.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::path::Path;

use serde_json::Value;
use trellis_api::v1alpha1::NodeNetworkSpec;
use trellis_node::apply::apply;
use trellis_node::desired::desired;
use trellis_node::model::{Device, Fdb, Mac, Neighbour, Route, VXLAN_DEVICE};
use trellis_node::netns::{NetnsError, NetnsHandle, Notifications};
use trellis_node::observe::{Snapshot, dump_node_addresses, observe};
use trellis_node::plan::{Op, plan};

mod fixtures;
use fixtures::netns::{Netns, run};
use fixtures::{mac, mk_node, underlay};

// ---------------------------------------------------------------- fixtures

impl Netns {
    /// `ip netns exec NAME CMD…` for one-shot inspection, parsed as JSON.
    fn json(&self, cmd: &[&str]) -> Value {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(cmd);
        let out = run(&all);
        if out.trim().is_empty() {
            return Value::Array(vec![]);
        }
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{cmd:?}: {e}: {out}"))
    }

    /// Everything of ours the kernel shows, for before/after comparisons.
    fn kernel_state(&self) -> Value {
        serde_json::json!({
            "link": self.json(&["ip", "-j", "-d", "link", "show", VXLAN_DEVICE]),
            "addr": self.json(&["ip", "-j", "addr", "show", "dev", VXLAN_DEVICE]),
            "routes": self.json(&["ip", "-j", "-d", "route", "show", "proto", "210"]),
            "routes6": self.json(&["ip", "-j", "-6", "-d", "route", "show", "proto", "210"]),
            "neigh": self.json(&["ip", "-j", "neigh", "show", "dev", VXLAN_DEVICE]),
            "fdb": self.json(&["bridge", "-j", "fdb", "show", "dev", VXLAN_DEVICE]),
        })
    }
}

/// Two nodes (namespaces) on one L2 segment: node n has 192.0.2.1n/24 on
/// `trls-<tag>-<n>`.
struct Pair {
    nodes: [Netns; 2],
}

impl Pair {
    fn new(tag: &str) -> Pair {
        let nodes = [1, 2].map(|n| Netns::new(format!("trellis-t-{tag}-{n}")));
        let (a, b) = (underlay_link(tag, 1), underlay_link(tag, 2));
        assert!(a.len() <= 15, "{a} is longer than IFNAMSIZ allows");
        nodes[0].ip(&[
            "link",
            "add",
            &a,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &nodes[1].name,
        ]);
        for (n, (ns, link)) in nodes.iter().zip([&a, &b]).enumerate() {
            let n = u8::try_from(n + 1).unwrap();
            ns.ip(&["addr", "add", &format!("{}/24", underlay(n)), "dev", link]);
            ns.ip(&["link", "set", link, "up"]);
        }
        Pair { nodes }
    }

    fn node(&self, n: u8) -> &Netns {
        &self.nodes[usize::from(n - 1)]
    }

    fn handle(&self, n: u8) -> NetnsHandle {
        NetnsHandle::new(Some(Path::new(&self.node(n).path()))).expect("namespace thread")
    }
}

fn underlay_link(tag: &str, n: u8) -> String {
    format!("trls-{tag}-{n}")
}

fn vxlan_route(peer: u8) -> Route {
    Route {
        dst: format!("10.244.{peer}.0/24").parse().unwrap(),
        via: format!("10.244.{peer}.0").parse().unwrap(),
        dev: Device::Vxlan,
        onlink: true,
    }
}

fn vxlan_neighbour(peer: u8) -> Neighbour {
    Neighbour {
        ip: format!("10.244.{peer}.0").parse().unwrap(),
        mac: mac(peer),
    }
}

fn vxlan_fdb(peer: u8) -> Fdb {
    Fdb {
        mac: mac(peer),
        dst: underlay(peer),
    }
}

/// What one pass of the reconciler did.
#[derive(Debug)]
struct Pass {
    ops: Vec<Op>,
    errors: Vec<String>,
}

/// observe → desired → plan (→ apply when `write`) for node `own` with
/// `peers`, on the namespace thread.
fn pass(h: &NetnsHandle, own: u8, peers: &[u8], write: bool) -> Pass {
    pass_with(h, own, peers, write, mk_node)
}

fn pass_with(
    h: &NetnsHandle,
    own: u8,
    peers: &[u8],
    write: bool,
    spec: fn(u8) -> NodeNetworkSpec,
) -> Pass {
    let own_spec = spec(own);
    let peers: Vec<(String, NodeNetworkSpec)> = peers
        .iter()
        .map(|&p| (format!("node-{p}"), spec(p)))
        .collect();
    let result = h.run_blocking(move |handle| async move {
        let snapshot = observe(&handle, underlay(own))
            .await
            .map_err(|e| e.to_string())?;
        let refs: Vec<(&str, &NodeNetworkSpec)> =
            peers.iter().map(|(n, s)| (n.as_str(), s)).collect();
        let d = desired(&format!("node-{own}"), &own_spec, &refs, &snapshot.host)
            .map_err(|e| e.to_string())?;
        let ops = plan(&d, &snapshot.observed);
        let errors = if write {
            apply(&handle, &ops)
                .await
                .iter()
                .map(ToString::to_string)
                .collect()
        } else {
            Vec::new()
        };
        Ok::<_, String>(Pass { ops, errors })
    });
    result.expect("namespace thread").expect("observe/desired")
}

fn reconcile(h: &NetnsHandle, own: u8, peers: &[u8]) -> Pass {
    let p = pass(h, own, peers, true);
    assert_eq!(p.errors, Vec::<String>::new(), "ops:\n{}", show(&p.ops));
    p
}

fn plan_only(h: &NetnsHandle, own: u8, peers: &[u8]) -> Vec<Op> {
    pass(h, own, peers, false).ops
}

fn snapshot(h: &NetnsHandle, own: u8) -> Snapshot {
    h.run_blocking(move |handle| async move { observe(&handle, underlay(own)).await })
        .expect("namespace thread")
        .expect("observe")
}

fn apply_ops(h: &NetnsHandle, ops: Vec<Op>) -> Vec<String> {
    h.run_blocking(move |handle| async move {
        apply(&handle, &ops)
            .await
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    })
    .expect("namespace thread")
}

fn show(ops: &[Op]) -> String {
    ops.iter().map(|o| format!("  {o}\n")).collect()
}

fn ifindex(ns: &Netns, link: &str) -> u64 {
    ns.json(&["ip", "-j", "link", "show", link])[0]["ifindex"]
        .as_u64()
        .unwrap()
}

/// The FDB entries with a remote (the dump also lists the device's own
/// address filters, which have none).
fn fdb_with_dst(ns: &Netns) -> Vec<Value> {
    ns.json(&["bridge", "-j", "fdb", "show", "dev", VXLAN_DEVICE])
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("dst").is_some())
        .cloned()
        .collect()
}

fn route_dsts(ns: &Netns) -> Vec<String> {
    ns.json(&["ip", "-j", "route", "show", "proto", "210"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["dst"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts node 1's kernel holds the device and exactly the entries for `peers`.
fn assert_programmed(pair: &Pair, tag: &str, peers: &[u8]) {
    let ns = pair.node(1);
    let link = &ns.json(&["ip", "-j", "-d", "link", "show", VXLAN_DEVICE])[0];
    let data = &link["linkinfo"]["info_data"];
    assert_eq!(link["linkinfo"]["info_kind"], "vxlan", "{link}");
    assert_eq!(data["id"], 1, "VNI: {data}");
    assert_eq!(data["port"], 8472, "{data}");
    assert_eq!(data["local"], "192.0.2.11", "{data}");
    assert_eq!(data["link"], underlay_link(tag, 1), "{data}");
    assert_eq!(data["learning"], false, "{data}");
    assert_eq!(link["mtu"], 1450, "underlay 1500 - 50");
    assert_eq!(link["address"], "0a:00:00:00:00:01");
    assert!(
        link["flags"].as_array().unwrap().contains(&"UP".into()),
        "{link}"
    );

    let addr = &ns.json(&["ip", "-j", "addr", "show", "dev", VXLAN_DEVICE])[0];
    let v4: Vec<(String, u64)> = addr["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| {
            (
                a["local"].as_str().unwrap().to_owned(),
                a["prefixlen"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(v4, [("10.244.1.0".to_owned(), 32)]);

    let routes = ns.json(&["ip", "-j", "-d", "route", "show", "proto", "210"]);
    let routes = routes.as_array().unwrap();
    assert_eq!(routes.len(), peers.len(), "{routes:?}");
    let neigh = ns.json(&["ip", "-j", "neigh", "show", "dev", VXLAN_DEVICE]);
    let neigh: Vec<&Value> = neigh
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"].as_array().unwrap().contains(&"PERMANENT".into()))
        .collect();
    assert_eq!(neigh.len(), peers.len(), "{neigh:?}");
    let fdb = fdb_with_dst(ns);
    assert_eq!(fdb.len(), peers.len(), "{fdb:?}");
    for &p in peers {
        let vtep = format!("10.244.{p}.0");
        let r = routes
            .iter()
            .find(|r| r["dst"] == format!("10.244.{p}.0/24"))
            .unwrap_or_else(|| panic!("no route to node {p}: {routes:?}"));
        assert_eq!(r["gateway"], vtep.as_str(), "{r}");
        assert_eq!(r["dev"], VXLAN_DEVICE, "{r}");
        assert!(
            r["flags"].as_array().unwrap().contains(&"onlink".into()),
            "{r}"
        );
        let n = neigh
            .iter()
            .find(|n| n["dst"] == vtep.as_str())
            .unwrap_or_else(|| panic!("no neighbour for node {p}: {neigh:?}"));
        assert_eq!(n["lladdr"], mac(p).to_string(), "{n}");
        let e = fdb
            .iter()
            .find(|e| e["mac"] == mac(p).to_string())
            .unwrap_or_else(|| panic!("no FDB entry for node {p}: {fdb:?}"));
        assert_eq!(e["dst"], underlay(p).to_string(), "{e}");
        assert_eq!(e["state"], "permanent", "{e}");
        assert!(
            e["flags"].as_array().unwrap().contains(&"self".into()),
            "{e}"
        );
    }
}

// ------------------------------------------------------------------- tests

#[test]
fn a_fresh_node_is_programmed_and_then_plans_nothing() {
    let pair = Pair::new("fresh");
    let h = pair.handle(1);
    let veth = ifindex(pair.node(1), &underlay_link("fresh", 1));

    let first = reconcile(&h, 1, &[2]);
    let text: Vec<String> = first.ops.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            format!(
                "create trellis-vxlan vni 1 dstport 8472 local 192.0.2.11 dev#{veth} \
                 mac 0a:00:00:00:00:01 mtu 1450 nolearning"
            ),
            "add address 10.244.1.0/32 dev trellis-vxlan".into(),
            "replace neighbour 10.244.2.0 lladdr 0a:00:00:00:00:02 dev trellis-vxlan permanent"
                .into(),
            "replace fdb 0a:00:00:00:00:02 dst 192.0.2.12 dev trellis-vxlan permanent".into(),
            "replace route 10.244.2.0/24 via 10.244.2.0 dev trellis-vxlan onlink".into(),
        ]
    );
    assert_programmed(&pair, "fresh", &[2]);

    // What observe reads back is exactly what was written, nothing more.
    let seen = snapshot(&h, 1).observed;
    let dev = seen.vxlan.as_ref().unwrap();
    assert_eq!(
        (dev.vni, dev.port, dev.local, dev.underlay_index),
        (
            Some(1),
            Some(8472),
            Some(underlay(1)),
            Some(u32::try_from(veth).unwrap())
        )
    );
    assert!(dev.up && !dev.learning);
    assert_eq!(dev.addresses, ["10.244.1.0/32".parse().unwrap()]);
    assert_eq!(seen.routes, [vxlan_route(2)]);
    assert_eq!(seen.neighbours, [vxlan_neighbour(2)]);
    assert_eq!(seen.fdb, [vxlan_fdb(2)]);

    // The node's addresses (the policy engine's `HOST`): every one `ip`
    // lists, the link-local ones included, but loopback.
    let mut listed: Vec<IpAddr> = pair
        .node(1)
        .json(&["ip", "-j", "addr", "show"])
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|link| link["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .filter(|ip: &IpAddr| !ip.is_loopback())
        .collect();
    listed.sort();
    listed.dedup();
    assert!(
        listed.contains(&underlay(1)) && listed.contains(&"10.244.1.0".parse().unwrap()),
        "{listed:?}"
    );
    assert_eq!(snapshot(&h, 1).addresses, listed);
    let dumped = h
        .run_blocking(|handle| async move { dump_node_addresses(&handle).await })
        .expect("namespace thread")
        .expect("dump the addresses");
    assert_eq!(dumped, listed);

    // Converged: the next pass plans nothing and so writes nothing.
    assert_eq!(plan_only(&h, 1, &[2]), []);
    let before = pair.node(1).kernel_state();
    let again = reconcile(&h, 1, &[2]);
    assert_eq!(again.ops, []);
    assert_eq!(pair.node(1).kernel_state(), before);
    assert_eq!(apply_ops(&h, vec![]), Vec::<String>::new());
    assert_eq!(pair.node(1).kernel_state(), before);
}

#[test]
fn foreign_objects_are_never_observed_nor_touched() {
    let pair = Pair::new("foreign");
    let ns = pair.node(1);
    let h = pair.handle(1);
    // Another protocol's route, another VXLAN device with its own FDB and
    // neighbour entries, and a route of our protocol in another table.
    ns.ip(&[
        "route",
        "add",
        "198.51.100.0/24",
        "via",
        "192.0.2.12",
        "proto",
        "static",
    ]);
    ns.ip(&[
        "link",
        "add",
        "trls-foreign",
        "type",
        "vxlan",
        "id",
        "99",
        "dstport",
        "4789",
        "nolearning",
    ]);
    ns.ip(&["link", "set", "trls-foreign", "up"]);
    ns.ip(&[
        "neigh",
        "replace",
        "10.99.0.1",
        "lladdr",
        "0a:00:00:00:00:99",
        "dev",
        "trls-foreign",
        "nud",
        "permanent",
    ]);
    run(&[
        "bridge",
        "-n",
        &ns.name,
        "fdb",
        "append",
        "0a:00:00:00:00:99",
        "dst",
        "192.0.2.99",
        "dev",
        "trls-foreign",
        "self",
        "permanent",
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.99.0.0/24",
        "dev",
        "trls-foreign",
        "proto",
        "210",
        "table",
        "100",
    ]);
    let foreign = |ns: &Netns| {
        [
            ns.json(&["ip", "-j", "-d", "link", "show", "trls-foreign"]),
            ns.json(&["ip", "-j", "neigh", "show", "dev", "trls-foreign"]),
            ns.json(&["bridge", "-j", "fdb", "show", "dev", "trls-foreign"]),
            ns.json(&[
                "ip",
                "-j",
                "route",
                "show",
                "table",
                "all",
                "dev",
                "trls-foreign",
            ]),
            ns.json(&["ip", "-j", "route", "show", "proto", "static"]),
        ]
    };
    let before = foreign(ns);

    let empty = snapshot(&h, 1).observed;
    assert_eq!(
        (empty.vxlan, empty.routes, empty.neighbours, empty.fdb),
        (None, vec![], vec![], vec![])
    );

    let first = reconcile(&h, 1, &[2]);
    assert_eq!(first.ops.len(), 5, "{}", show(&first.ops));
    assert_eq!(foreign(ns), before);
    // A route of another protocol on our own device is not ours either.
    ns.ip(&[
        "route",
        "add",
        "10.98.0.0/24",
        "dev",
        VXLAN_DEVICE,
        "proto",
        "static",
    ]);

    let before = foreign(ns);
    let seen = snapshot(&h, 1).observed;
    assert_eq!(seen.routes, [vxlan_route(2)]);
    assert_eq!(seen.neighbours, [vxlan_neighbour(2)]);
    assert_eq!(seen.fdb, [vxlan_fdb(2)]);

    // The peer leaves: only our entries go.
    let gone = reconcile(&h, 1, &[]);
    assert_eq!(gone.ops.len(), 3, "{}", show(&gone.ops));
    assert_eq!(foreign(ns), before);
    let static_on_ours = ns.json(&[
        "ip",
        "-j",
        "route",
        "show",
        "dev",
        VXLAN_DEVICE,
        "proto",
        "static",
    ]);
    assert_eq!(static_on_ours[0]["dst"], "10.98.0.0/24", "{static_on_ours}");
    assert_eq!(plan_only(&h, 1, &[]), []);
}

/// Node `n` with a second, IPv6 block fd00:10:244::n00/120 and VTEP fd00:10:244::n00.
fn mk_dual_stack_node(n: u8) -> NodeNetworkSpec {
    let mut spec = mk_node(n);
    spec.pod_cidrs.push(format!("fd00:10:244::{n}00/120"));
    spec.vtep.as_mut().unwrap().ipv6 = Some(format!("fd00:10:244::{n}00"));
    spec
}

#[test]
fn dual_stack_vteps_are_programmed_and_read_back_exactly() {
    let pair = Pair::new("dual");
    let ns = pair.node(1);
    let h = pair.handle(1);
    let first = pass_with(&h, 1, &[2], true, mk_dual_stack_node);
    assert_eq!(first.errors, Vec::<String>::new());
    assert_eq!(first.ops.len(), 8, "{}", show(&first.ops));
    assert_eq!(
        pass_with(&h, 1, &[2], false, mk_dual_stack_node).ops,
        [],
        "IPv6 addresses, routes and neighbours read back as written"
    );

    let seen = snapshot(&h, 1).observed;
    assert_eq!(
        seen.vxlan.unwrap().addresses,
        [
            "10.244.1.0/32".parse().unwrap(),
            "fd00:10:244::100/128".parse().unwrap()
        ],
        "the kernel's fe80:: address is not ours"
    );
    let routes6 = ns.json(&["ip", "-j", "-6", "route", "show", "proto", "210"]);
    assert_eq!(routes6.as_array().unwrap().len(), 1, "{routes6}");
    assert_eq!(routes6[0]["dst"], "fd00:10:244::200/120");
    assert_eq!(routes6[0]["gateway"], "fd00:10:244::200");
    assert!(
        routes6[0]["flags"]
            .as_array()
            .unwrap()
            .contains(&"onlink".into())
    );
    let neigh6 = ns.json(&[
        "ip",
        "-j",
        "-6",
        "neigh",
        "show",
        "dev",
        VXLAN_DEVICE,
        "nud",
        "permanent",
    ]);
    assert_eq!(neigh6[0]["dst"], "fd00:10:244::200", "{neigh6}");
    assert_eq!(neigh6[0]["lladdr"], "0a:00:00:00:00:02", "{neigh6}");

    // Back to IPv4 only: the IPv6 address, route and neighbour go.
    let back = reconcile(&h, 1, &[2]);
    assert_eq!(back.ops.len(), 3, "{}", show(&back.ops));
    assert_eq!(
        ns.json(&["ip", "-j", "-6", "route", "show", "proto", "210"]),
        Value::Array(vec![])
    );
    assert_programmed(&pair, "dual", &[2]);
}

#[test]
fn a_leaving_peer_takes_exactly_its_entries() {
    let pair = Pair::new("leave");
    let h = pair.handle(1);
    reconcile(&h, 1, &[2, 3]);
    assert_programmed(&pair, "leave", &[2, 3]);

    let left = reconcile(&h, 1, &[3]);
    assert_eq!(
        left.ops,
        [
            Op::DelRoute(vxlan_route(2)),
            Op::DelNeighbour(vxlan_neighbour(2)),
            Op::DelFdb(vxlan_fdb(2)),
        ]
    );
    assert_programmed(&pair, "leave", &[3]);
    assert_eq!(route_dsts(pair.node(1)), ["10.244.3.0/24"]);
    assert_eq!(plan_only(&h, 1, &[3]), []);
}

#[test]
fn a_restarted_agent_adopts_the_state_it_finds() {
    let pair = Pair::new("adopt");
    let h = pair.handle(1);
    reconcile(&h, 1, &[2]);
    let index = ifindex(pair.node(1), VXLAN_DEVICE);
    let before = pair.node(1).kernel_state();
    drop(h);

    let h = pair.handle(1);
    assert_eq!(plan_only(&h, 1, &[2]), [], "a restart must not flush");
    assert_eq!(reconcile(&h, 1, &[2]).ops, []);
    assert_eq!(ifindex(pair.node(1), VXLAN_DEVICE), index, "same device");
    assert_eq!(pair.node(1).kernel_state(), before);
}

#[test]
fn drift_is_repaired_with_the_fewest_ops() {
    let pair = Pair::new("drift");
    let ns = pair.node(1);
    let h = pair.handle(1);
    reconcile(&h, 1, &[2]);

    ns.ip(&["route", "del", "10.244.2.0/24"]);
    assert_eq!(plan_only(&h, 1, &[2]), [Op::ReplaceRoute(vxlan_route(2))]);
    reconcile(&h, 1, &[2]);
    assert_eq!(route_dsts(ns), ["10.244.2.0/24"]);

    ns.ip(&[
        "neigh",
        "replace",
        "10.244.2.0",
        "lladdr",
        "0a:00:00:00:00:77",
        "dev",
        VXLAN_DEVICE,
        "nud",
        "permanent",
    ]);
    run(&[
        "bridge",
        "-n",
        &ns.name,
        "fdb",
        "replace",
        "0a:00:00:00:00:02",
        "dst",
        "192.0.2.77",
        "dev",
        VXLAN_DEVICE,
        "self",
        "permanent",
    ]);
    ns.ip(&["link", "set", VXLAN_DEVICE, "mtu", "1400"]);
    ns.ip(&["link", "set", VXLAN_DEVICE, "down"]);
    // Taking the device down dropped its routes too.
    assert_eq!(
        plan_only(&h, 1, &[2]),
        [
            Op::SetVxlanMtu(1450),
            Op::SetVxlanUp,
            Op::ReplaceNeighbour(vxlan_neighbour(2)),
            Op::ReplaceFdb(vxlan_fdb(2)),
            Op::ReplaceRoute(vxlan_route(2)),
        ]
    );
    reconcile(&h, 1, &[2]);
    assert_programmed(&pair, "drift", &[2]);

    // A flood list (all-zeros MAC, two remotes) someone added on our device
    // is deleted whole.
    for dst in ["192.0.2.78", "192.0.2.79"] {
        run(&[
            "bridge",
            "-n",
            &ns.name,
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dst",
            dst,
            "dev",
            VXLAN_DEVICE,
            "self",
            "permanent",
        ]);
    }
    assert_eq!(fdb_with_dst(ns).len(), 3);
    let flood = Fdb {
        mac: Mac([0; 6]),
        dst: "0.0.0.0".parse().unwrap(),
    };
    assert_eq!(plan_only(&h, 1, &[2]), [Op::DelFdb(flood)]);
    reconcile(&h, 1, &[2]);
    assert_programmed(&pair, "drift", &[2]);
    assert_eq!(plan_only(&h, 1, &[2]), []);

    ns.ip(&["link", "del", VXLAN_DEVICE]);
    let ops = reconcile(&h, 1, &[2]).ops;
    assert_eq!(ops.len(), 5, "{}", show(&ops));
    assert!(matches!(ops[0], Op::CreateVxlan(_)), "{}", show(&ops));
    assert_programmed(&pair, "drift", &[2]);
    assert_eq!(plan_only(&h, 1, &[2]), []);
}

#[test]
fn apply_goes_on_after_a_failure_and_deleting_the_absent_succeeds() {
    let pair = Pair::new("errors");
    let h = pair.handle(1);
    let veth = u32::try_from(ifindex(pair.node(1), &underlay_link("errors", 1))).unwrap();
    let vxlan = trellis_node::model::Vxlan {
        vni: 1,
        port: 8472,
        local: underlay(1),
        underlay_index: veth,
        mac: mac(1),
        mtu: 1450,
        addresses: vec!["10.244.1.0/32".parse().unwrap()],
    };
    let bogus_route = Route {
        dst: "10.244.9.0/24".parse().unwrap(),
        // Native routing via a gateway on no subnet of the underlay link.
        via: "198.51.100.9".parse().unwrap(),
        dev: Device::Underlay(veth),
        onlink: false,
    };
    let ops = vec![
        // Before the device exists: deletes are no-ops, the rest needs it.
        Op::DeleteVxlan { reason: "test" },
        Op::DelRoute(vxlan_route(2)),
        Op::SetVxlanUp,
        Op::CreateVxlan(vxlan.clone()),
        Op::AddAddress("10.244.1.0/32".parse().unwrap()),
        Op::AddAddress("10.244.1.0/32".parse().unwrap()),
        Op::DelAddress("10.244.1.7/32".parse().unwrap()),
        Op::DelNeighbour(vxlan_neighbour(2)),
        Op::DelFdb(vxlan_fdb(2)),
        Op::ReplaceRoute(bogus_route),
        Op::CreateVxlan(vxlan),
        Op::ReplaceNeighbour(vxlan_neighbour(2)),
        Op::ReplaceFdb(vxlan_fdb(2)),
        Op::ReplaceRoute(vxlan_route(2)),
        Op::ReplaceRoute(vxlan_route(2)),
    ];
    let errors = apply_ops(&h, ops);
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors[0].starts_with("set trellis-vxlan up: trellis-vxlan does not exist"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].starts_with("replace route 10.244.9.0/24 via 198.51.100.9 dev dev#")
            && errors[1].contains("ENETUNREACH")
            && errors[1].contains("not directly reachable"),
        "{}",
        errors[1]
    );
    assert!(
        errors[2].contains("EEXIST") && errors[2].contains("another VXLAN device uses VNI 1"),
        "{}",
        errors[2]
    );
    // The ops after each failure ran.
    assert_programmed(&pair, "errors", &[2]);
    assert_eq!(plan_only(&h, 1, &[2]), []);
}

#[test]
fn pods_reach_the_peer_through_the_tunnel() {
    let pair = Pair::new("ping");
    let (h1, h2) = (pair.handle(1), pair.handle(2));
    reconcile(&h1, 1, &[1, 2]);
    reconcile(&h2, 2, &[1, 2]);
    let counters = |ns: &Netns| {
        let s = &ns.json(&["ip", "-j", "-s", "link", "show", VXLAN_DEVICE])[0]["stats64"];
        (
            s["tx"]["packets"].as_u64().unwrap(),
            s["rx"]["packets"].as_u64().unwrap(),
        )
    };
    let (tx1, rx1) = counters(pair.node(1));
    let (tx2, rx2) = counters(pair.node(2));

    // A UDP echo between the VTEP addresses, from sockets opened on the
    // namespace threads (a socket stays in the namespace it was opened in).
    let bind = |h: &NetnsHandle, addr: &'static str| {
        h.run_blocking(move |_| async move {
            let socket = std::net::UdpSocket::bind(addr).unwrap();
            socket
                .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            socket
        })
        .unwrap()
    };
    let server = bind(&h2, "10.244.2.0:7777");
    let client = bind(&h1, "10.244.1.0:0");
    let mut buf = [0u8; 64];
    for i in 0..3u8 {
        client.send_to(&[i; 8], "10.244.2.0:7777").unwrap();
        let (n, from) = server.recv_from(&mut buf).expect("node 2 got the datagram");
        assert_eq!(
            (&buf[..n], from.ip()),
            (&[i; 8][..], "10.244.1.0".parse().unwrap())
        );
        server.send_to(&buf[..n], from).unwrap();
        let n = client.recv(&mut buf).expect("node 1 got the echo");
        assert_eq!(&buf[..n], &[i; 8][..]);
    }

    // Both VXLAN devices carried the datagrams and their echoes: the traffic
    // was encapsulated, not routed around the tunnel.
    let (tx1b, rx1b) = counters(pair.node(1));
    let (tx2b, rx2b) = counters(pair.node(2));
    assert!(
        tx1b >= tx1 + 3 && rx1b >= rx1 + 3,
        "node 1: {tx1}→{tx1b}, {rx1}→{rx1b}"
    );
    assert!(
        tx2b >= tx2 + 3 && rx2b >= rx2 + 3,
        "node 2: {tx2}→{tx2b}, {rx2}→{rx2b}"
    );
}

#[test]
fn a_namespace_handle_works_only_in_its_namespace_and_survives_nothing_else() {
    let ns = Netns::new("trellis-t-handle-1".into());
    ns.ip(&["link", "add", "trls-handle", "type", "bridge"]);
    let names = |h: &NetnsHandle| {
        h.run_blocking(|handle| async move {
            use futures::TryStreamExt;
            let links: Vec<_> = handle.link().get().execute().try_collect().await.unwrap();
            links
                .iter()
                .flat_map(|l| l.attributes.iter())
                .filter_map(|a| match a {
                    netlink_packet_route::link::LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
                .collect::<Vec<String>>()
        })
        .unwrap()
    };
    let inside = NetnsHandle::new(Some(Path::new(&ns.path()))).unwrap();
    assert_eq!(names(&inside), ["lo", "trls-handle"]);
    let here = NetnsHandle::new(None).unwrap();
    assert!(!names(&here).contains(&"trls-handle".to_owned()));

    // A job that panics stops the thread; later jobs say so; drop returns.
    let crashed = inside.run_blocking(|_| async { panic!("job panics on purpose") });
    assert!(
        matches!(crashed, Err(NetnsError::Stopped(_))),
        "{crashed:?}"
    );
    let after = inside.run_blocking(|_| async { 1 });
    assert!(matches!(after, Err(NetnsError::Stopped(_))), "{after:?}");
    drop(inside);

    let missing = NetnsHandle::new(Some(std::path::Path::new("/run/netns/trellis-t-absent")));
    assert!(
        matches!(missing, Err(NetnsError::Open { .. })),
        "{missing:?}"
    );
}

#[tokio::test]
async fn the_async_run_does_not_block_the_callers_runtime() {
    let ns = Netns::new("trellis-t-async-1".into());
    let h = NetnsHandle::new(Some(Path::new(&ns.path()))).unwrap();
    let (a, b) = tokio::join!(
        h.run(|handle| async move { observe(&handle, underlay(1)).await.map(|s| s.observed) }),
        async { 7 }
    );
    let observed = a.unwrap().unwrap();
    assert_eq!((observed.vxlan, observed.underlay, b), (None, None, 7));
}

/// Drift repair rests on this: a change made by hand in the node's
/// namespace (a link, a route deleted) wakes the subscriber.
#[tokio::test]
async fn notifications_report_changes_made_by_hand() {
    let ns = Netns::new("trellis-t-notify-1".into());
    ns.ip(&[
        "link",
        "add",
        "trls-notify",
        "type",
        "veth",
        "peer",
        "name",
        "trls-notify-p",
    ]);
    let path = ns.path();
    let h = tokio::task::spawn_blocking(move || NetnsHandle::new(Some(Path::new(&path))))
        .await
        .unwrap()
        .expect("handle");
    let mut events = h.subscribe().await.expect("subscribe");
    let seen = events.borrow_and_update().relevant;

    ns.ip(&["link", "set", "trls-notify", "up"]);
    let wake = |events: &mut tokio::sync::watch::Receiver<Notifications>| {
        let mut events = events.clone();
        async move {
            tokio::time::timeout(std::time::Duration::from_secs(5), events.changed())
                .await
                .expect("a notification within 5 s")
                .expect("the subscription is alive");
            events.borrow_and_update().relevant
        }
    };
    let after_link = wake(&mut events).await;
    assert!(after_link > seen, "a link change is reported");

    ns.ip(&["address", "add", "192.0.2.1/24", "dev", "trls-notify"]);
    ns.ip(&[
        "route",
        "add",
        "10.244.9.0/24",
        "via",
        "192.0.2.9",
        "proto",
        "210",
    ]);
    events.borrow_and_update();
    ns.ip(&["route", "del", "10.244.9.0/24"]);
    let after_route = wake(&mut events).await;
    assert!(
        after_route > after_link,
        "a route deleted by hand is reported"
    );
}

/// The kernel's own messages through the reconcile loop's filter: a pod's
/// veth, route (protocol 211) and neighbour wake nobody; a route of ours
/// deleted by hand does.
#[tokio::test]
async fn the_filter_ignores_the_pods_endpoints_and_wakes_for_our_routes() {
    use trellis_node::wake::{Interest, wakes};

    let ns = Netns::new("trellis-t-wake-1".into());
    // The underlay: a veth, as in the sandbox.
    ns.ip(&[
        "link",
        "add",
        "trls-wake",
        "type",
        "veth",
        "peer",
        "name",
        "trls-wake-u",
    ]);
    ns.ip(&["address", "add", "192.0.2.1/24", "dev", "trls-wake"]);
    ns.ip(&["link", "set", "trls-wake", "up"]);
    let index = |name: &str| {
        ns.json(&["ip", "-j", "link", "show", name])[0]["ifindex"]
            .as_u64()
            .unwrap() as u32
    };
    let interest = Interest {
        vxlan: None,
        underlay: Some(index("trls-wake")),
        underlay_address: Some("192.0.2.1".parse().unwrap()),
    };
    let path = ns.path();
    let h = tokio::task::spawn_blocking(move || NetnsHandle::new(Some(Path::new(&path))))
        .await
        .unwrap()
        .expect("handle");
    let mut events = h
        .subscribe_filtered(move |m| wakes(m, Some(&interest)))
        .await
        .expect("subscribe");
    events.borrow_and_update();

    // What an ADD and a DEL do in the node's namespace.
    let host = "trellis0000beef";
    ns.ip(&[
        "link",
        "add",
        host,
        "mtu",
        "1400",
        "up",
        "type",
        "veth",
        "peer",
        "name",
        "trls-wake-p",
    ]);
    ns.ip(&["link", "set", "trls-wake-p", "up"]);
    ns.ip(&[
        "route",
        "add",
        "10.244.1.5/32",
        "dev",
        host,
        "scope",
        "link",
        "proto",
        "211",
    ]);
    ns.ip(&[
        "neigh",
        "replace",
        "10.244.1.5",
        "lladdr",
        "02:00:00:00:00:05",
        "dev",
        host,
        "nud",
        "permanent",
    ]);
    ns.ip(&["route", "del", "10.244.1.5/32", "proto", "211"]);
    ns.ip(&["link", "del", host]);
    // Then one of ours, deleted by hand.
    ns.ip(&[
        "route",
        "add",
        "10.244.9.0/24",
        "via",
        "192.0.2.9",
        "proto",
        "210",
    ]);
    tokio::time::timeout(std::time::Duration::from_secs(5), events.changed())
        .await
        .expect("a wake-up within 5 s")
        .expect("the subscription is alive");
    // Notifications arrive in order: everything before the route was
    // counted when it woke us.
    let first = *events.borrow_and_update();
    assert_eq!(first.relevant, 1, "only our route woke us: {first:?}");
    assert!(first.ignored >= 6, "the endpoint's were ignored: {first:?}");
    ns.ip(&["route", "del", "10.244.9.0/24"]);
    tokio::time::timeout(std::time::Duration::from_secs(5), events.changed())
        .await
        .expect("the deletion wakes us within 5 s")
        .expect("the subscription is alive");
    assert_eq!(events.borrow_and_update().relevant, 2);
}
