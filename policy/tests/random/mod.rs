//! Random NetworkPolicies, PolicyBundles, identities and inputs, for the
//! randomized tests of this directory (`bundles_match_reference.rs`,
//! `irrelevant_identities.rs`). A small seeded generator (no shrinking):
//! the same seed gives the same input on every machine.

#![allow(dead_code)] // each test uses a subset

use std::collections::BTreeMap;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};
use trellis_api::v1alpha1::PolicyBundle;
use trellis_policy::{
    CidrTable, IdentityInfo, Input, NamedPorts, PolicyEnforcement, Protocol, SecurityLabels,
};

/// xorshift64*: small, seeded, the same on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

pub const NAMESPACES: [(&str, &str); 3] = [("a", "x"), ("b", "y"), ("c", "x")];
pub const APPS: [&str; 3] = ["web", "db", "api"];
pub const NAMED: [(&str, Protocol, u16); 5] = [
    ("http", Protocol::Tcp, 8080),
    ("http", Protocol::Tcp, 8081),
    ("dns", Protocol::Udp, 53),
    ("metrics", Protocol::Tcp, 9100),
    ("assoc", Protocol::Sctp, 9),
];
pub const PREFIXES: [&str; 12] = [
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
pub fn namespace_labels(ns: &str) -> BTreeMap<String, String> {
    let team = NAMESPACES
        .iter()
        .find(|(n, _)| *n == ns)
        .map_or("none", |(_, t)| t);
    BTreeMap::from([
        ("kubernetes.io/metadata.name".to_owned(), ns.to_owned()),
        ("team".to_owned(), team.to_owned()),
    ])
}

/// 3 to 6 pod identities, numbered from 300.
pub fn gen_identities(rng: &mut Rng) -> Vec<IdentityInfo> {
    let n = 3 + rng.below(4);
    (0..n).map(|i| gen_identity(rng, 300 + i as u32)).collect()
}

/// A pod identity `id` in one of [`NAMESPACES`], an app of [`APPS`],
/// sometimes a tier, and some of the [`NAMED`] ports.
pub fn gen_identity(rng: &mut Rng, id: u32) -> IdentityInfo {
    let ns = rng.pick(&NAMESPACES).0;
    let mut pod = BTreeMap::from([("app".to_owned(), rng.pick(&APPS).to_string())]);
    if rng.chance(40) {
        pod.insert("tier".to_owned(), rng.pick(&["front", "back"]).to_string());
    }
    let named_ports: NamedPorts = NAMED.iter().filter(|_| rng.chance(30)).copied().collect();
    IdentityInfo {
        id,
        labels: SecurityLabels::new(ns, namespace_labels(ns), pod),
        named_ports,
    }
}

pub fn gen_labels(rng: &mut Rng) -> Value {
    match rng.below(4) {
        0 => json!({}),
        1 => json!({"matchLabels": {"app": rng.pick(&APPS)}}),
        2 => json!({"matchLabels": {"team": rng.pick(&["x", "y"])}}),
        _ => {
            json!({"matchExpressions": [{"key": "tier", "operator": rng.pick(&["Exists", "DoesNotExist"])}]})
        }
    }
}

pub fn gen_block(rng: &mut Rng) -> Value {
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
pub fn gen_port(rng: &mut Rng) -> Value {
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

pub fn gen_list<T>(rng: &mut Rng, max: usize, f: impl FnMut(&mut Rng) -> T) -> Vec<T> {
    let n = rng.below(max + 1);
    let mut f = f;
    (0..n).map(|_| f(rng)).collect()
}

pub fn gen_policy(rng: &mut Rng, i: usize) -> NetworkPolicy {
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

pub fn gen_bundle(rng: &mut Rng, i: usize) -> PolicyBundle {
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

pub fn gen_input(rng: &mut Rng) -> Input {
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

pub fn describe(input: &Input) -> String {
    format!(
        "enforcement {:?}, pod networks {:?}\nidentities: {:#?}\npolicies: {}\nbundles: {}",
        input.enforcement,
        input.pod_networks,
        input.identities,
        serde_json::to_string_pretty(&input.policies).unwrap_or_default(),
        serde_json::to_string_pretty(&input.bundles).unwrap_or_default(),
    )
}
