//! Builders for the tests of `desired` and `sync` (the unit tests, and
//! `tests/policy_maps.rs`, which adds its own world on a real datapath).
//! They panic on input that is not what they build: for tests only.
//!
//! The unit tests' world: namespace `shop` with pods `web` (identity 300) and `db`
//! (301), namespace `ops` with `tool` (302). Local endpoints on ifindex 10
//! and 11 (web), 12 (db), 13 (tool); remote pods 10.244.2.20 (tool) and
//! 10.1.0.7 (db); the node is 192.0.2.11.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use trellis_policy::PolicyEnforcement;
use trellis_policy::cidr::CidrTable;
use trellis_policy::compile::{Input, LocalEndpoint};
use trellis_policy::identity::{IdentityInfo, NamedPorts, SecurityLabels};

use super::desired::{Desired, Local, PolicyIds, World, desired};

pub const WEB: u32 = 300;
pub const DB: u32 = 301;
pub const TOOL: u32 = 302;

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address")
}

pub fn net(s: &str) -> IpNet {
    s.parse().expect("a prefix")
}

pub fn labels(ns: &str, app: &str) -> SecurityLabels {
    SecurityLabels::new(
        ns,
        [("kubernetes.io/metadata.name".to_owned(), ns.to_owned())].into(),
        [("app".to_owned(), app.to_owned())].into(),
    )
}

pub fn mk_identity(id: u32, ns: &str, app: &str) -> IdentityInfo {
    IdentityInfo {
        id,
        labels: labels(ns, app),
        named_ports: NamedPorts::new(),
    }
}

pub fn mk_local(ifindex: u32, id: u32, ns: &str, app: &str, addrs: &[&str]) -> Local {
    Local {
        ifindex,
        addresses: addrs.iter().map(|a| ip(a)).collect(),
        endpoint: LocalEndpoint {
            identity: id,
            labels: labels(ns, app),
            named_ports: NamedPorts::new(),
        },
    }
}

pub fn mk_policy(v: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(v).expect("a NetworkPolicy")
}

/// `web` in `shop` admits `tool` on TCP `web_port`; `db` admits `web` on
/// TCP 5432 and may send to 10.0.0.0/8 except 10.1.0.0/16 on UDP 53.
pub fn mk_policies(web_port: u16) -> Vec<NetworkPolicy> {
    vec![
        mk_policy(json!({
            "metadata": {"namespace": "shop", "name": "web"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{
                    "from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "tool"}}}],
                    "ports": [{"protocol": "TCP", "port": web_port}]
                }]
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
                "egress": [{
                    "to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                    "ports": [{"protocol": "UDP", "port": 53}]
                }]
            }
        })),
    ]
}

/// The compiler's input: `policies`, their CIDR identities, and the
/// world's identities.
pub fn mk_input(policies: Vec<NetworkPolicy>) -> Input {
    mk_input_with(
        policies,
        vec![
            mk_identity(WEB, "shop", "web"),
            mk_identity(DB, "shop", "db"),
            mk_identity(TOOL, "ops", "tool"),
        ],
    )
}

/// The compiler's input: `policies`, their CIDR identities, and
/// `identities`, in the default enforcement mode.
pub fn mk_input_with(policies: Vec<NetworkPolicy>, identities: Vec<IdentityInfo>) -> Input {
    Input {
        enforcement: PolicyEnforcement::Default,
        cidrs: CidrTable::from_policies(&policies),
        policies,
        bundles: Vec::new(),
        identities,
        pod_networks: None,
    }
}

pub fn mk_locals() -> Vec<Local> {
    vec![
        mk_local(10, WEB, "shop", "web", &["10.244.1.10", "fd00:a::10"]),
        mk_local(11, WEB, "shop", "web", &["10.244.1.11"]),
        mk_local(12, DB, "shop", "db", &["10.244.1.12"]),
        mk_local(13, TOOL, "ops", "tool", &["10.244.1.13"]),
    ]
}

/// The remote pods of the world.
pub fn mk_remote() -> Vec<(IpAddr, u32)> {
    vec![(ip("10.244.2.20"), TOOL), (ip("10.1.0.7"), DB)]
}

/// [`desired`] with the world's remote pods and host address.
pub fn compute(input: &Input, locals: &[Local], ids: &PolicyIds) -> Desired {
    compute_with(input, locals, &mk_remote(), ids)
}

/// [`desired`] with these remote pods and the world's host address.
pub fn compute_with(
    input: &Input,
    locals: &[Local],
    remote: &[(IpAddr, u32)],
    ids: &PolicyIds,
) -> Desired {
    let host = [ip("192.0.2.11")];
    let world = World {
        input,
        locals,
        remote,
        host: &host,
    };
    desired(&world, ids)
}

/// The ids `d` would have once installed.
pub fn installed_ids(d: &Desired) -> PolicyIds<'_> {
    let mut ids = PolicyIds::new();
    for (id, t) in &d.tables {
        ids.insert(*id, t);
    }
    ids
}
