//! Compiled NetworkPolicies written to a real, loaded datapath by
//! `policy::{desired, sync}` (root; a kernel with BPF).
//!
//! A small world — two namespaces, three local endpoints (veths in a
//! private namespace `trellis-pmaps`), remote pods, the node's own
//! addresses, an `ipBlock` with `except`, a port range, a named port — is
//! planned and applied to a pinned datapath on a private bpffs. Then, for
//! every (endpoint, direction, remote address, protocol, port) of a grid,
//! the programs' verdict on a synthetic packet (`BPF_PROG_TEST_RUN`) must
//! be what `trellis_policy::table::lookup` says on the compiled table with
//! the IP cache's identities: the BPF lookup agrees with the compiler's.
//! Then the policies change, and the verdicts must follow while the old
//! tables leave the map.

mod fixtures;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use fixtures::bpf::{Bpffs, expect, outcome, verdict_of};
use fixtures::netns::Netns;
use fixtures::packet::{Ip, L4, TCP_SYN, ip};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use trellis_node::bpf::abi::{Direction, PROTO_ICMP, PROTO_ICMPV6, Reason};
use trellis_node::bpf::{Datapath, Program};
use trellis_node::policy::desired::{Desired, Local, World, desired};
use trellis_node::policy::sync::{Installed, MapOp, apply, plan};
use trellis_policy::identity::{IdentityInfo, NamedPorts, SecurityLabels};
use trellis_policy::ports::Protocol;
use trellis_policy::table::{self, Decision, lookup};
use trellis_policy::{CidrTable, Input, LocalEndpoint, PolicyEnforcement};

const WEB: u32 = 1000;
const DB: u32 = 1001;
const TOOL: u32 = 1002;
const X: u32 = 1003;

const WEB1: [&str; 2] = ["10.244.1.10", "fd00:a::10"];
const WEB2: [&str; 2] = ["10.244.1.11", "fd00:a::11"];
const DB1: [&str; 2] = ["10.244.1.20", "fd00:a::20"];
const NODE: [&str; 2] = ["192.0.2.11", "fd00:ffff::11"];

/// Every address the grid sends from and to, besides the endpoints' own.
const PEERS: [&str; 17] = [
    "10.244.2.30",   // tool, remote
    "fd00:b::30",    // tool, remote
    "10.244.2.40",   // x, remote
    "10.244.2.10",   // web, remote
    "10.244.2.50",   // tool, remote from the second world on
    "192.0.2.11",    // this node
    "fd00:ffff::11", // this node
    "192.168.1.1",   // in web's ipBlock
    "192.168.5.5",   // in its except (until the second world)
    "fd10:0:1::1",   // in web's IPv6 ipBlock
    "fd10:0:5::1",   // in its except
    "10.1.2.3",      // in db's except
    "10.9.9.9",      // in db's ipBlock
    "203.0.113.9",   // nowhere
    "2001:db8::9",   // nowhere
    "10.244.1.20",   // db, local
    "10.244.1.10",   // web, local
];

/// A packet of the grid: what it is, and what the tables see of it.
#[derive(Debug, Clone, Copy)]
enum Probe {
    Tcp(u16),
    Udp(u16),
    Sctp(u16),
    Echo,
}

const PROBES: [Probe; 14] = [
    Probe::Tcp(53),
    Probe::Tcp(80),
    Probe::Tcp(5432),
    Probe::Tcp(8080),
    Probe::Tcp(8443),
    Probe::Tcp(8999),
    Probe::Tcp(9000),
    Probe::Tcp(9100),
    Probe::Tcp(9101),
    Probe::Udp(53),
    Probe::Udp(54),
    Probe::Sctp(7777),
    Probe::Sctp(8080),
    Probe::Echo,
];

impl Probe {
    fn l4(self) -> L4 {
        match self {
            Probe::Tcp(p) => L4::tcp(40000, p, TCP_SYN),
            Probe::Udp(p) => L4::udp(40000, p),
            Probe::Sctp(p) => L4::sctp(40000, p),
            Probe::Echo => L4::EchoRequest { id: 7 },
        }
    }

    /// (protocol, port) as the lookup takes them.
    fn proto_port(self, v6: bool) -> (u8, u16) {
        match self {
            Probe::Tcp(p) => (6, p),
            Probe::Udp(p) => (17, p),
            Probe::Sctp(p) => (132, p),
            Probe::Echo if v6 => (PROTO_ICMPV6, 0),
            Probe::Echo => (PROTO_ICMP, 0),
        }
    }
}

// ─── the world ──────────────────────────────────────────────────────────────

fn ns_labels(ns: &str) -> std::collections::BTreeMap<String, String> {
    [("kubernetes.io/metadata.name".to_owned(), ns.to_owned())].into()
}

fn security_labels(ns: &str, app: &str) -> SecurityLabels {
    SecurityLabels::new(
        ns,
        ns_labels(ns),
        [("app".to_owned(), app.to_owned())].into(),
    )
}

fn named_ports(app: &str) -> NamedPorts {
    match app {
        "web" => [("http", Protocol::Tcp, 8080)].into_iter().collect(),
        _ => NamedPorts::new(),
    }
}

fn identities() -> Vec<IdentityInfo> {
    [
        (WEB, "shop", "web"),
        (DB, "shop", "db"),
        (TOOL, "ops", "tool"),
        (X, "ops", "x"),
    ]
    .into_iter()
    .map(|(id, ns, app)| IdentityInfo {
        id,
        labels: security_labels(ns, app),
        named_ports: named_ports(app),
    })
    .collect()
}

fn mk_policy(v: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(v).expect("a NetworkPolicy")
}

/// The first world's policies, all in `shop`:
/// - web admits tool (of `ops`) on its named port `http` (TCP 8080), and
///   192.168.0.0/16 except 192.168.5.0/24 and fd10::/32 except
///   fd10:0:5::/48 on TCP 9000–9100 and UDP 53; it may send TCP 5432 to
///   any pod and UDP 53 anywhere;
/// - db admits web on TCP 5432; it may send anything to `shop`'s pods, and
///   UDP 53 and SCTP 7777 to 10.0.0.0/8 except 10.1.0.0/16.
fn policies_v1() -> Vec<NetworkPolicy> {
    vec![
        mk_policy(json!({
            "metadata": {"namespace": "shop", "name": "web-ingress"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [
                    {
                        "from": [{
                            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
                            "podSelector": {"matchLabels": {"app": "tool"}}
                        }],
                        "ports": [{"port": "http"}]
                    },
                    {
                        "from": [
                            {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.5.0/24"]}},
                            {"ipBlock": {"cidr": "fd10::/32", "except": ["fd10:0:5::/48"]}}
                        ],
                        "ports": [
                            {"protocol": "TCP", "port": 9000, "endPort": 9100},
                            {"protocol": "UDP", "port": 53}
                        ]
                    }
                ]
            }
        })),
        mk_policy(json!({
            "metadata": {"namespace": "shop", "name": "web-egress"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "policyTypes": ["Egress"],
                "egress": [
                    {"to": [{"namespaceSelector": {}}], "ports": [{"protocol": "TCP", "port": 5432}]},
                    {"ports": [{"protocol": "UDP", "port": 53}]}
                ]
            }
        })),
        mk_policy(json!({
            "metadata": {"namespace": "shop", "name": "db"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "db"}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                    "ports": [{"protocol": "TCP", "port": 5432}]
                }],
                "egress": [
                    {"to": [{"podSelector": {}}]},
                    {
                        "to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "SCTP", "port": 7777}]
                    }
                ]
            }
        })),
    ]
}

/// The second world's: web admits tool on TCP 8443 instead of `http`, and
/// its IPv4 ipBlock lost its `except`; web's egress is no longer isolated;
/// db no longer sends SCTP.
fn policies_v2() -> Vec<NetworkPolicy> {
    let mut p = policies_v1();
    let web = p[0].spec.as_mut().expect("spec");
    let rules = web.ingress.as_mut().expect("ingress");
    rules[0] = serde_json::from_value(json!({
        "from": [{
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
            "podSelector": {"matchLabels": {"app": "tool"}}
        }],
        "ports": [{"protocol": "TCP", "port": 8443}]
    }))
    .expect("a rule");
    let block = rules[1].from.as_mut().expect("from")[0]
        .ip_block
        .as_mut()
        .expect("ipBlock");
    block.except = None;
    let db = p[2].spec.as_mut().expect("spec");
    db.egress.as_mut().expect("egress")[1]
        .ports
        .as_mut()
        .expect("ports")
        .truncate(1);
    // web-egress is deleted: web's egress is open again.
    p.remove(1);
    p
}

fn input(policies: Vec<NetworkPolicy>) -> Input {
    Input {
        enforcement: PolicyEnforcement::Default,
        cidrs: CidrTable::from_policies(&policies),
        policies,
        bundles: Vec::new(),
        identities: identities(),
        pod_networks: None,
    }
}

fn local(ifindex: u32, identity: u32, ns: &str, app: &str, addrs: [&str; 2]) -> Local {
    Local {
        ifindex,
        addresses: addrs.iter().map(|a| ip(a)).collect(),
        endpoint: LocalEndpoint {
            identity,
            labels: security_labels(ns, app),
            named_ports: named_ports(app),
        },
    }
}

fn remote(with_new_pod: bool) -> Vec<(IpAddr, u32)> {
    let mut r = vec![
        (ip("10.244.2.30"), TOOL),
        (ip("fd00:b::30"), TOOL),
        (ip("10.244.2.40"), X),
        (ip("10.244.2.10"), WEB),
    ];
    if with_new_pod {
        r.push((ip("10.244.2.50"), TOOL));
    }
    r
}

fn host() -> Vec<IpAddr> {
    NODE.iter().map(|a| ip(a)).collect()
}

/// The node's namespace, with the host sides of three pods' veths.
struct Node {
    ns: Netns,
    web1: u32,
    web2: u32,
    db: u32,
}

impl Node {
    fn new(test: &str) -> Node {
        let ns = Netns::new(format!("trellis-pmaps-{test}"));
        for dev in ["trellisw1", "trellisw2", "trellisdb"] {
            let peer = format!("{dev}p");
            ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer]);
        }
        Node {
            web1: ns.ifindex("trellisw1"),
            web2: ns.ifindex("trellisw2"),
            db: ns.ifindex("trellisdb"),
            ns,
        }
    }
}

// ─── the grid ───────────────────────────────────────────────────────────────

fn compiled_direction(dir: Direction) -> table::Direction {
    match dir {
        Direction::Ingress => table::Direction::Ingress,
        Direction::Egress => table::Direction::Egress,
    }
}

/// What the compiler says the datapath does with the cell's packet.
fn expected(d: &Desired, ifindex: u32, dir: Direction, remote: IpAddr, probe: Probe) -> Reason {
    let table = d.compiled[&ifindex].policy.table(compiled_direction(dir));
    if !table.isolated {
        return Reason::NotIsolated;
    }
    let ids = d.identities_of(remote);
    let (proto, port) = probe.proto_port(remote.is_ipv6());
    match lookup(table, ids.identity, ids.cidr_identity, proto, port) {
        Decision::Allow { .. } => Reason::PolicyAllow,
        Decision::Deny { .. } => Reason::PolicyDeny,
        Decision::NoMatch => Reason::NoMatch,
    }
}

/// Runs every cell of the grid for `locals` (each endpoint, both
/// directions, every peer and its own fellow endpoints of the same family,
/// every probe), and fails with every cell where the program and the
/// compiler disagree. Returns how many cells gave each reason.
fn check_grid(dp: &mut Datapath, d: &Desired, locals: &[Local]) -> Vec<(Reason, usize)> {
    let mut disagreements = String::new();
    let mut tally = std::collections::BTreeMap::new();
    let mut cells = 0;
    for l in locals {
        for dir in Direction::ALL {
            for peer in PEERS.iter().map(|p| ip(p)) {
                let Some(own) = l.addresses.iter().find(|a| a.is_ipv6() == peer.is_ipv6()) else {
                    continue;
                };
                for probe in PROBES {
                    cells += 1;
                    let (src, dst) = match dir {
                        Direction::Egress => (*own, peer),
                        Direction::Ingress => (peer, *own),
                    };
                    let frame = Ip::new(src, dst, probe.l4()).frame();
                    let program = Program::for_direction(dir);
                    let got = outcome(dp, program, l.ifindex, &frame);
                    // Each cell is a new connection.
                    dp.flush_conntrack(l.ifindex).expect("flush");
                    let reason = expected(d, l.ifindex, dir, peer, probe);
                    *tally.entry(reason).or_insert(0) += 1;
                    let want = (verdict_of(reason), vec![(reason, dir, 1)]);
                    if got != want {
                        let ids = d.identities_of(peer);
                        let _ = writeln!(
                            disagreements,
                            "  endpoint {} (ifindex {}, table {:?}) {dir} {src} → {dst} {probe:?}: \
                             remote identity {} cidr {:#x}; compiler {reason} ({:?}), BPF {:?}",
                            l.endpoint.labels,
                            l.ifindex,
                            d.policy_of(l.ifindex, dir),
                            ids.identity,
                            ids.cidr_identity,
                            want.0,
                            got,
                        );
                    }
                }
            }
        }
    }
    assert!(
        disagreements.is_empty(),
        "the BPF lookup disagrees with the compiler's in these cells (of {cells}):\n{disagreements}"
    );
    tally.into_iter().collect()
}

#[track_caller]
fn assert_steps_ordered(ops: &[MapOp]) {
    let steps: Vec<u8> = ops.iter().map(MapOp::step).collect();
    assert!(steps.is_sorted(), "ops out of order: {ops:#?}");
}

/// Plans, applies, and checks that nothing failed, nothing is left to do
/// and the mirror is what the maps hold.
#[track_caller]
fn sync(dp: &mut Datapath, mirror: &mut Installed, d: &Desired) -> Vec<MapOp> {
    let ops = plan(d, mirror);
    assert_steps_ordered(&ops);
    let failures = apply(dp, mirror, &ops);
    assert!(failures.is_empty(), "{failures:#?}");
    let left = plan(d, mirror);
    assert!(
        left.is_empty(),
        "a second plan has something to do: {left:#?}"
    );
    assert_eq!(
        Installed::read(dp).expect("dump the maps"),
        *mirror,
        "the mirror is what the maps hold"
    );
    ops
}

fn table_ids(dp: &Datapath) -> BTreeSet<u32> {
    dp.policy_entries()
        .expect("dump")
        .into_iter()
        .map(|(k, _)| k.policy)
        .collect()
}

#[test]
fn bpf_verdicts_agree_with_the_compiler_before_and_after_a_policy_change() {
    let fs = Bpffs::new("pmaps");
    let node = Node::new("grid");
    let (web1, web2, db) = (node.web1, node.web2, node.db);
    let host = host();
    node.ns.enter(|| {
        // ── the first world ──
        let input1 = input(policies_v1());
        let locals1 = vec![
            local(web1, WEB, "shop", "web", WEB1),
            local(web2, WEB, "shop", "web", WEB2),
            local(db, DB, "shop", "db", DB1),
        ];
        let remote1 = remote(false);
        let world1 = World {
            input: &input1,
            locals: &locals1,
            remote: &remote1,
            host: &host,
        };
        let mut dp = Datapath::load(Some(&fs.path)).expect("load the programs");
        let mut mirror = Installed::read(&dp).expect("dump the fresh maps");
        assert_eq!(mirror, Installed::default());
        let d1 = desired(&world1, &mirror.ids());
        assert!(d1.conflicts.is_empty(), "{:?}", d1.conflicts);
        assert!(
            d1.compiled.values().all(|c| c.diagnostics.is_empty()),
            "{:#?}",
            d1.compiled
        );
        // web1 and web2 share everything; four tables in all.
        for dir in Direction::ALL {
            assert_eq!(d1.policy_of(web1, dir), d1.policy_of(web2, dir));
        }
        assert_eq!(d1.tables.len(), 4, "{:#?}", d1.tables);
        let ops = sync(&mut dp, &mut mirror, &d1);
        assert_eq!(
            ops.iter().filter(|o| o.kind() == "set_table").count(),
            d1.tables.len()
        );
        assert_eq!(
            table_ids(&dp),
            d1.tables.keys().copied().collect::<BTreeSet<_>>()
        );

        let tally = check_grid(&mut dp, &d1, &locals1);
        eprintln!("first world: {tally:?}");
        for reason in [Reason::PolicyAllow, Reason::NoMatch] {
            assert!(
                tally.iter().any(|(r, n)| *r == reason && *n > 0),
                "the grid never saw {reason}: {tally:?}"
            );
        }

        // ── a restart: the pinned maps are read back, nothing to do ──
        drop(dp);
        let mut dp = Datapath::load(Some(&fs.path)).expect("load again");
        let reread = Installed::read(&dp).expect("dump");
        assert_eq!(reread, mirror);
        assert_eq!(desired(&world1, &reread.ids()), d1);

        // ── the second world: policies change, web2 goes, a pod starts ──
        let input2 = input(policies_v2());
        let locals2 = vec![
            local(web1, WEB, "shop", "web", WEB1),
            local(db, DB, "shop", "db", DB1),
        ];
        let remote2 = remote(true);
        let world2 = World {
            input: &input2,
            locals: &locals2,
            remote: &remote2,
            host: &host,
        };
        let d2 = desired(&world2, &mirror.ids());
        assert!(d2.conflicts.is_empty(), "{:?}", d2.conflicts);
        // db's ingress table did not change: it keeps its id. Every
        // changed table has an id nothing had before.
        assert_eq!(
            d2.policy_of(db, Direction::Ingress),
            d1.policy_of(db, Direction::Ingress)
        );
        assert!(d1.policy_of(web1, Direction::Egress).is_some());
        assert_eq!(d2.policy_of(web1, Direction::Egress), None);
        for (id, t) in &d2.tables {
            match d1.tables.get(id) {
                Some(old) => assert_eq!(old, t, "table {id} changed in place"),
                None => assert!(!mirror.tables.contains_key(id)),
            }
        }
        let ops = sync(&mut dp, &mut mirror, &d2);
        let kinds: BTreeSet<&str> = ops.iter().map(MapOp::kind).collect();
        assert!(
            [
                "set_table",
                "set_endpoint",
                "remove_endpoint",
                "remove_table"
            ]
            .iter()
            .all(|k| kinds.contains(k)),
            "{ops:#?}"
        );
        // Only the tables of the second world are in the map.
        let old_only: BTreeSet<u32> = d1
            .tables
            .keys()
            .filter(|id| !d2.tables.contains_key(id))
            .copied()
            .collect();
        assert!(!old_only.is_empty());
        let live = table_ids(&dp);
        assert!(live.is_disjoint(&old_only), "{live:?} ∩ {old_only:?}");
        assert_eq!(
            live,
            d2.tables
                .iter()
                .filter(|(_, t)| !t.is_empty())
                .map(|(id, _)| *id)
                .collect::<BTreeSet<_>>()
        );
        // web2 is no endpoint any more: its packets drop.
        let frame = Ip::new(ip("10.244.2.30"), ip(WEB2[0]), L4::tcp(1, 8443, TCP_SYN)).frame();
        expect(&dp, Program::ToPod, web2, &frame, Reason::UnknownEndpoint);

        let tally = check_grid(&mut dp, &d2, &locals2);
        eprintln!("second world: {tally:?}");
        for reason in [Reason::PolicyAllow, Reason::NoMatch, Reason::NotIsolated] {
            assert!(
                tally.iter().any(|(r, n)| *r == reason && *n > 0),
                "the grid never saw {reason}: {tally:?}"
            );
        }
        // The changes show: tool reaches web on 8443 and no longer on
        // 8080; 192.168.5.5 is inside web's block now.
        let probe = |src: &str, port: u16| {
            let f = Ip::new(ip(src), ip(WEB1[0]), L4::tcp(40001, port, TCP_SYN)).frame();
            outcome(&dp, Program::ToPod, web1, &f).1
        };
        assert_eq!(
            probe("10.244.2.30", 8443),
            [(Reason::PolicyAllow, Direction::Ingress, 1)]
        );
        assert_eq!(
            probe("10.244.2.50", 8080),
            [(Reason::NoMatch, Direction::Ingress, 1)]
        );
        assert_eq!(
            probe("192.168.5.5", 9050),
            [(Reason::PolicyAllow, Direction::Ingress, 1)]
        );
    });
}
