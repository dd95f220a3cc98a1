//! The compiler's tables against the reference evaluator (design 0006):
//! random NetworkPolicies, PolicyBundles, pod identities, CIDRs, pod
//! networks and enforcement modes; for every local endpoint, direction,
//! remote end (each pod identity, a pod identity nobody knows, WORLD, the
//! node), remote address (one of every CIDR class the remote can have,
//! and some fixed ones) and port, `table::lookup` on the compiled table
//! must give the reference's verdict, and the provenance of what it found
//! must name a rule the reference says decides.
//!
//! The only exceptions are the documented ones, for a known pod identity:
//! where its verdict is the same at every address it can have but the
//! deciding rule is not, the entry names one of those rules; where the
//! verdict itself depends on the address, the compiled verdict is a deny
//! and the compiler reported `AddressDependentVerdict` for the identity.
//!
//! A small seeded generator (no shrinking): a failure prints the seed and
//! the objects. `TRELLIS_POLICY_CASES=n` runs n cases (default 48),
//! `TRELLIS_POLICY_SEED=s` only seed s.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};
use trellis_api::v1alpha1::PolicyBundle;
use trellis_policy::identity::{HOST, WORLD};
use trellis_policy::reference::{self, Packet, Verdict};
use trellis_policy::table::lookup;
use trellis_policy::{
    CidrTable, Decision, Direction, IdentityInfo, Input, LocalEndpoint, NamedPorts,
    PolicyEnforcement, Problem, Protocol, SecurityLabels, compile_endpoint,
};

/// xorshift64*: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const NAMESPACES: [(&str, &str); 3] = [("a", "x"), ("b", "y"), ("c", "x")];
const APPS: [&str; 3] = ["web", "db", "api"];
const NAMED: [(&str, Protocol, u16); 5] = [
    ("http", Protocol::Tcp, 8080),
    ("http", Protocol::Tcp, 8081),
    ("dns", Protocol::Udp, 53),
    ("metrics", Protocol::Tcp, 9100),
    ("assoc", Protocol::Sctp, 9),
];
const PREFIXES: [&str; 12] = [
    "10.0.0.0/8",
    "10.0.0.0/16",
    "10.0.1.0/24",
    "10.0.1.128/25",
    "10.0.0.5/32",
    "169.254.169.254/32",
    "0.0.0.0/0",
    "192.0.2.0/24",
    "203.0.113.0/24",
    "fd00::/8",
    "::/0",
    "2001:db8::/32",
];
const PORTS: [u16; 25] = [
    0, 1, 9, 10, 22, 23, 52, 53, 54, 80, 443, 1024, 1025, 7999, 8000, 8050, 8080, 8081, 8082, 8100,
    8101, 9100, 30000, 32767, 65535,
];
/// Addresses every remote may have besides its classes' witnesses.
const FIXED: [&str; 9] = [
    "10.0.0.7",
    "10.0.1.200",
    "10.0.0.5",
    "169.254.169.254",
    "8.8.8.8",
    "192.0.2.1",
    "fd00::1",
    "2001:db8::1",
    "fe80::1",
];
/// A pod identity no input holds.
const UNKNOWN_POD: u32 = 999;

fn namespace_labels(ns: &str) -> BTreeMap<String, String> {
    let team = NAMESPACES
        .iter()
        .find(|(n, _)| *n == ns)
        .map_or("none", |(_, t)| t);
    BTreeMap::from([
        ("kubernetes.io/metadata.name".to_owned(), ns.to_owned()),
        ("team".to_owned(), team.to_owned()),
    ])
}

fn gen_identities(rng: &mut Rng) -> Vec<IdentityInfo> {
    let n = 3 + rng.below(4);
    (0..n)
        .map(|i| {
            let ns = rng.pick(&NAMESPACES).0;
            let mut pod = BTreeMap::from([("app".to_owned(), rng.pick(&APPS).to_string())]);
            if rng.chance(40) {
                pod.insert("tier".to_owned(), rng.pick(&["front", "back"]).to_string());
            }
            let named_ports: NamedPorts =
                NAMED.iter().filter(|_| rng.chance(30)).copied().collect();
            IdentityInfo {
                id: 300 + i as u32,
                labels: SecurityLabels::new(ns, namespace_labels(ns), pod),
                named_ports,
            }
        })
        .collect()
}

fn gen_labels(rng: &mut Rng) -> Value {
    match rng.below(4) {
        0 => json!({}),
        1 => json!({"matchLabels": {"app": rng.pick(&APPS)}}),
        2 => json!({"matchLabels": {"team": rng.pick(&["x", "y"])}}),
        _ => {
            json!({"matchExpressions": [{"key": "tier", "operator": rng.pick(&["Exists", "DoesNotExist"])}]})
        }
    }
}

fn gen_block(rng: &mut Rng) -> Value {
    if rng.chance(3) {
        return json!({"cidr": "10.0.0.0/33"});
    }
    let cidr: IpNet = rng.pick(&PREFIXES).parse().expect("prefix");
    let inside: Vec<&str> = PREFIXES
        .iter()
        .copied()
        .filter(|p| {
            let p: IpNet = p.parse().expect("prefix");
            cidr.contains(&p) && p.prefix_len() > cidr.prefix_len()
        })
        .collect();
    let except: Vec<&str> = inside.into_iter().filter(|_| rng.chance(35)).collect();
    json!({"cidr": cidr.to_string(), "except": except})
}

/// A port of either kind of object (`protocol` as both spell it).
fn gen_port(rng: &mut Rng) -> Value {
    let protocol = *rng.pick(&["TCP", "TCP", "TCP", "UDP", "SCTP"]);
    match rng.below(10) {
        0..=2 => {
            json!({"protocol": protocol, "port": rng.pick(&[22, 53, 80, 443, 8080, 8081, 9100, 9])})
        }
        3 | 4 => {
            let (a, b) = *rng.pick(&[
                (8000, 8100),
                (1, 1024),
                (30000, 32767),
                (8080, 8081),
                (50, 60),
            ]);
            json!({"protocol": protocol, "port": a, "endPort": b})
        }
        5 => json!({"protocol": protocol}),
        6..=8 => {
            json!({"protocol": protocol, "port": rng.pick(&["http", "dns", "metrics", "assoc", "nope"])})
        }
        _ if rng.chance(50) => json!({"protocol": protocol, "port": 0}),
        _ => json!({"protocol": protocol, "port": 90, "endPort": 80}),
    }
}

fn gen_list<T>(rng: &mut Rng, max: usize, f: impl FnMut(&mut Rng) -> T) -> Vec<T> {
    let n = rng.below(max + 1);
    let mut f = f;
    (0..n).map(|_| f(rng)).collect()
}

fn gen_policy(rng: &mut Rng, i: usize) -> NetworkPolicy {
    let peer = |rng: &mut Rng| match rng.below(5) {
        0 => json!({"podSelector": gen_labels(rng)}),
        1 => json!({"namespaceSelector": gen_labels(rng)}),
        2 => json!({"namespaceSelector": gen_labels(rng), "podSelector": gen_labels(rng)}),
        _ => json!({"ipBlock": gen_block(rng)}),
    };
    let rule = |rng: &mut Rng, key: &str| {
        let mut r = serde_json::Map::new();
        if rng.chance(75) {
            r.insert(key.to_owned(), Value::Array(gen_list(rng, 2, peer)));
        }
        if rng.chance(65) {
            r.insert("ports".to_owned(), Value::Array(gen_list(rng, 2, gen_port)));
        }
        Value::Object(r)
    };
    let mut spec = serde_json::Map::new();
    spec.insert("podSelector".to_owned(), gen_labels(rng));
    const TYPES: [&[&str]; 4] = [&[], &["Ingress"], &["Egress"], &["Ingress", "Egress"]];
    let types = *rng.pick(&TYPES);
    if !types.is_empty() {
        spec.insert("policyTypes".to_owned(), json!(types));
    }
    spec.insert(
        "ingress".to_owned(),
        Value::Array(gen_list(rng, 2, |r| rule(r, "from"))),
    );
    spec.insert(
        "egress".to_owned(),
        Value::Array(gen_list(rng, 2, |r| rule(r, "to"))),
    );
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": format!("np{i}"), "namespace": rng.pick(&NAMESPACES).0},
        "spec": Value::Object(spec),
    }))
    .expect("a NetworkPolicy")
}

fn gen_bundle(rng: &mut Rng, i: usize) -> PolicyBundle {
    let peer = |rng: &mut Rng| match rng.below(8) {
        0 | 1 => {
            json!({"pods": {"namespaceSelector": gen_labels(rng), "podSelector": gen_labels(rng)}})
        }
        2 | 3 => json!({"namespaces": gen_labels(rng)}),
        4 if rng.chance(20) => json!({}),
        _ => json!({"ipBlock": gen_block(rng)}),
    };
    let rule = |rng: &mut Rng| {
        let mut r = serde_json::Map::new();
        r.insert(
            "action".to_owned(),
            json!(rng.pick(&["Allow", "Deny", "Pass"])),
        );
        let peers = 1 + rng.below(2);
        r.insert(
            "peers".to_owned(),
            Value::Array((0..peers).map(|_| peer(rng)).collect()),
        );
        if rng.chance(60) {
            r.insert("ports".to_owned(), Value::Array(gen_list(rng, 2, gen_port)));
        }
        if rng.chance(30) {
            r.insert("name".to_owned(), json!("r"));
        }
        Value::Object(r)
    };
    serde_json::from_value(json!({
        "apiVersion": "network.trellis.dev/v1alpha1",
        "kind": "PolicyBundle",
        "metadata": {"name": format!("b{i}")},
        "spec": {
            "tier": rng.pick(&["Admin", "Admin", "Baseline"]),
            "priority": rng.pick(&[1, 5, 5, 10]),
            "subject": {"namespaceSelector": gen_labels(rng), "podSelector": gen_labels(rng)},
            "ingress": gen_list(rng, 3, rule),
            "egress": gen_list(rng, 3, rule),
        },
    }))
    .expect("a PolicyBundle")
}

fn gen_input(rng: &mut Rng) -> Input {
    let policies: Vec<NetworkPolicy> = (0..rng.below(4)).map(|i| gen_policy(rng, i)).collect();
    let bundles: Vec<PolicyBundle> = (0..rng.below(5)).map(|i| gen_bundle(rng, i)).collect();
    let enforcement = match rng.below(10) {
        0 => PolicyEnforcement::Never,
        1..=3 => PolicyEnforcement::Always,
        _ => PolicyEnforcement::Default,
    };
    let pod_networks = match rng.below(3) {
        0 => None,
        1 => Some(vec!["10.0.0.0/16".parse().expect("net")]),
        _ => Some(vec![
            "10.0.0.0/16".parse().expect("net"),
            "fd00:10::/32".parse().expect("net"),
        ]),
    };
    Input {
        enforcement,
        cidrs: CidrTable::from_objects(&policies, &bundles),
        policies,
        bundles,
        identities: gen_identities(rng),
        pod_networks,
    }
}

/// The addresses a remote with identity `id` can have: for a known pod,
/// one in each CIDR class inside the pod networks (when known); for the
/// others, one in each class anywhere; and the fixed ones that qualify.
fn addresses(input: &Input, known_pod: bool) -> Vec<IpAddr> {
    let everywhere: Vec<IpNet> = vec![
        "0.0.0.0/0".parse().expect("net"),
        "::/0".parse().expect("net"),
    ];
    let within = match (&input.pod_networks, known_pod) {
        (Some(nets), true) => nets.clone(),
        _ => everywhere,
    };
    let classes: Vec<u32> = input
        .cidrs
        .iter()
        .map(|(_, id)| id)
        .chain([WORLD])
        .collect();
    let mut out = BTreeSet::new();
    for class in classes {
        for net in &within {
            if let Some(a) = input.cidrs.witness(class, *net) {
                assert_eq!(
                    input.cidrs.cidr_identity(a),
                    class,
                    "witness {a} of {class:#x}"
                );
                assert!(net.contains(&a), "witness {a} outside {net}");
                out.insert(a);
            }
        }
    }
    for a in FIXED {
        let a: IpAddr = a.parse().expect("address");
        if within.iter().any(|n| n.contains(&a)) {
            out.insert(a);
        }
    }
    out.into_iter().collect()
}

#[derive(Default)]
struct Stats {
    checked: usize,
    approximate: usize,
    degraded: usize,
}

fn describe(input: &Input) -> String {
    format!(
        "enforcement {:?}, pod networks {:?}\nidentities: {:#?}\npolicies: {}\nbundles: {}",
        input.enforcement,
        input.pod_networks,
        input.identities,
        serde_json::to_string_pretty(&input.policies).unwrap_or_default(),
        serde_json::to_string_pretty(&input.bundles).unwrap_or_default(),
    )
}

fn run_case(seed: u64, stats: &mut Stats) {
    let mut rng = Rng::new(seed);
    let input = gen_input(&mut rng);
    let ports: Vec<(u8, u16)> = Protocol::ALL
        .iter()
        .flat_map(|p| {
            let mut ports: Vec<u16> = PORTS.iter().copied().filter(|_| rng.chance(45)).collect();
            ports.push(*rng.pick(&PORTS));
            ports.into_iter().map(move |n| (p.number(), n))
        })
        .chain([(1, 0), (58, 0)])
        .collect();
    let pod_addresses = addresses(&input, true);
    let any_addresses = addresses(&input, false);
    let mut remotes: Vec<(u32, &[IpAddr])> = input
        .identities
        .iter()
        .map(|i| (i.id, pod_addresses.as_slice()))
        .collect();
    remotes.extend([
        (UNKNOWN_POD, any_addresses.as_slice()),
        (WORLD, any_addresses.as_slice()),
        (HOST, any_addresses.as_slice()),
    ]);

    // The same objects in another order compile the same.
    let mut shuffled = input.clone();
    shuffled.policies.reverse();
    shuffled.bundles.reverse();
    shuffled.identities.reverse();

    for info in &input.identities {
        let endpoint = LocalEndpoint {
            identity: info.id,
            labels: info.labels.clone(),
            named_ports: info.named_ports.clone(),
        };
        let compiled = compile_endpoint(&input, &endpoint);
        assert_eq!(
            compiled,
            compile_endpoint(&shuffled, &endpoint),
            "seed {seed}: the order of the input changed the output\n{}",
            describe(&input)
        );
        for table in [&compiled.policy.ingress, &compiled.policy.egress] {
            for e in table.entries.values() {
                assert!(
                    compiled.provenance.get(e.rule).is_some(),
                    "seed {seed}: rule {} has no origin",
                    e.rule
                );
            }
        }
        for direction in [Direction::Ingress, Direction::Egress] {
            let table = compiled.policy.table(direction);
            let enforced = reference::enforced(&input, &endpoint, direction);
            assert_eq!(
                table.isolated,
                enforced,
                "seed {seed}: endpoint {} {direction:?}: isolated {} but the reference says enforced {enforced}\n{}",
                info.id,
                table.isolated,
                describe(&input)
            );
            if !enforced {
                continue;
            }
            let degraded_ids: BTreeSet<u32> = compiled
                .diagnostics
                .iter()
                .filter(|d| {
                    d.field
                        .starts_with(&format!("spec.{}", dir_name(direction)))
                })
                .filter_map(|d| match &d.problem {
                    Problem::AddressDependentVerdict { identities } => Some(identities.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            for (id, addrs) in &remotes {
                let known_pod = input.identities.iter().any(|i| i.id == *id);
                for &(proto, port) in &ports {
                    let verdicts: Vec<(IpAddr, Verdict)> = addrs
                        .iter()
                        .map(|a| {
                            let packet = Packet {
                                identity: *id,
                                address: *a,
                                proto,
                                port,
                            };
                            let v = reference::evaluate(&input, &endpoint, direction, &packet)
                                .expect("enforced");
                            (*a, v)
                        })
                        .collect();
                    let same_action = verdicts
                        .iter()
                        .all(|(_, v)| v.allowed == verdicts[0].1.allowed);
                    for (address, want) in &verdicts {
                        stats.checked += 1;
                        let cidr_id = input.cidrs.cidr_identity(*address);
                        let d = lookup(table, *id, cidr_id, proto, port);
                        let allowed = matches!(d, Decision::Allow { .. });
                        let origin = compiled.provenance.explain(direction, d);
                        if allowed == want.allowed
                            && origin.is_some_and(|o| want.equally.contains(o))
                        {
                            continue;
                        }
                        if known_pod && same_action && allowed == want.allowed {
                            let any = origin.is_some_and(|o| {
                                verdicts.iter().any(|(_, v)| v.equally.contains(o))
                            });
                            if any {
                                stats.approximate += 1;
                                continue;
                            }
                        }
                        if known_pod && !same_action && !allowed && degraded_ids.contains(id) {
                            stats.degraded += 1;
                            continue;
                        }
                        panic!(
                            "seed {seed}: endpoint {} {direction:?}: remote {id} at {address} \
                             (cidr {cidr_id:#x}) proto {proto} port {port}:\n  \
                             table: {d:?} = {} by {:?}\n  reference: {} by {}\n\
                             diagnostics: {:#?}\ntable: {:#?}\n{}",
                            info.id,
                            if allowed { "allow" } else { "deny" },
                            origin.map(ToString::to_string),
                            if want.allowed { "allow" } else { "deny" },
                            want.by,
                            compiled.diagnostics,
                            table,
                            describe(&input),
                        );
                    }
                }
            }
        }
    }
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

#[test]
fn tables_give_the_reference_verdicts() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match env("TRELLIS_POLICY_SEED") {
        Some(s) => vec![s],
        None => (1..=env("TRELLIS_POLICY_CASES").unwrap_or(48)).collect(),
    };
    let mut stats = Stats::default();
    for seed in seeds {
        run_case(seed, &mut stats);
    }
    eprintln!(
        "{} packets checked; {} with one of several deciding rules named, {} denied where the verdict depends on the address",
        stats.checked, stats.approximate, stats.degraded
    );
    assert!(
        stats.checked > 10_000,
        "the generator produced too few packets"
    );
}
