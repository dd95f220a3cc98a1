//! Table-driven tests of each NetworkPolicy rule, through `lookup` as the
//! datapath would see it.
//!
//! The world: namespaces `prod` (env=prod) and `dev` (env=dev); pods
//! `web@prod` (256, http=TCP/8080), `db@prod` (257, pg=TCP/5432, dns=UDP/53),
//! `web@dev` (258, http=TCP/9090), `client@dev` (259, no ports). Pod
//! addresses are 10.0.0.x; 192.0.2.1 is the node; 203.0.113.x is outside.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;
use crate::diagnostic::Severity;
use crate::identity::{CIDR_FIRST, WORLD};
use crate::selector::SelectorProblem;
use crate::table::{Decision, lookup};

const WEB_PROD: u32 = 256;
const DB_PROD: u32 = 257;
const WEB_DEV: u32 = 258;
const CLIENT_DEV: u32 = 259;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const ICMP: u8 = 1;

// ---- builders --------------------------------------------------------------

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn mk_identity(
    id: u32,
    ns: &str,
    pod: &[(&str, &str)],
    ports: &[(&str, Protocol, u16)],
) -> IdentityInfo {
    IdentityInfo {
        id,
        labels: SecurityLabels::new(
            ns,
            labels(&[("env", ns), ("kubernetes.io/metadata.name", ns)]),
            labels(pod),
        ),
        named_ports: ports.iter().copied().collect(),
    }
}

fn world() -> Vec<IdentityInfo> {
    vec![
        mk_identity(
            WEB_PROD,
            "prod",
            &[("app", "web")],
            &[("http", Protocol::Tcp, 8080)],
        ),
        mk_identity(
            DB_PROD,
            "prod",
            &[("app", "db")],
            &[("pg", Protocol::Tcp, 5432), ("dns", Protocol::Udp, 53)],
        ),
        mk_identity(
            WEB_DEV,
            "dev",
            &[("app", "web")],
            &[("http", Protocol::Tcp, 9090)],
        ),
        mk_identity(CLIENT_DEV, "dev", &[("app", "client")], &[]),
    ]
}

fn ip_of(id: u32) -> &'static str {
    match id {
        WEB_PROD => "10.0.0.1",
        DB_PROD => "10.0.0.2",
        WEB_DEV => "10.0.1.1",
        CLIENT_DEV => "10.0.1.2",
        _ => "203.0.113.9",
    }
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels(pairs)),
        match_expressions: None,
    }
}

fn mk_policy(ns: &str, name: &str) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta {
            namespace: Some(ns.to_owned()),
            name: Some(name.to_owned()),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector::default()),
            ..Default::default()
        }),
    }
}

trait PolicyExt {
    fn select(self, pairs: &[(&str, &str)]) -> Self;
    fn types(self, types: &[&str]) -> Self;
    fn ingress(
        self,
        from: Option<Vec<NetworkPolicyPeer>>,
        ports: Option<Vec<NetworkPolicyPort>>,
    ) -> Self;
    fn egress(
        self,
        to: Option<Vec<NetworkPolicyPeer>>,
        ports: Option<Vec<NetworkPolicyPort>>,
    ) -> Self;
    fn spec_mut(&mut self) -> &mut NetworkPolicySpec;
}

impl PolicyExt for NetworkPolicy {
    fn spec_mut(&mut self) -> &mut NetworkPolicySpec {
        self.spec.get_or_insert_with(Default::default)
    }
    fn select(mut self, pairs: &[(&str, &str)]) -> Self {
        self.spec_mut().pod_selector = Some(sel(pairs));
        self
    }
    fn types(mut self, types: &[&str]) -> Self {
        self.spec_mut().policy_types = Some(types.iter().map(|t| (*t).to_owned()).collect());
        self
    }
    fn ingress(
        mut self,
        from: Option<Vec<NetworkPolicyPeer>>,
        ports: Option<Vec<NetworkPolicyPort>>,
    ) -> Self {
        let rule = NetworkPolicyIngressRule { from, ports };
        self.spec_mut()
            .ingress
            .get_or_insert_with(Vec::new)
            .push(rule);
        self
    }
    fn egress(
        mut self,
        to: Option<Vec<NetworkPolicyPeer>>,
        ports: Option<Vec<NetworkPolicyPort>>,
    ) -> Self {
        let rule = NetworkPolicyEgressRule { to, ports };
        self.spec_mut()
            .egress
            .get_or_insert_with(Vec::new)
            .push(rule);
        self
    }
}

fn mk_pods(pairs: &[(&str, &str)]) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(sel(pairs)),
        ..Default::default()
    }
}

fn mk_namespaces(pairs: &[(&str, &str)]) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(sel(pairs)),
        ..Default::default()
    }
}

fn mk_pods_in(ns: &[(&str, &str)], pods: &[(&str, &str)]) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(sel(ns)),
        pod_selector: Some(sel(pods)),
        ..Default::default()
    }
}

fn mk_block(cidr: &str, except: &[&str]) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: cidr.to_owned(),
            except: (!except.is_empty()).then(|| except.iter().map(|e| (*e).to_owned()).collect()),
        }),
        ..Default::default()
    }
}

fn mk_port(
    protocol: Option<&str>,
    port: Option<IntOrString>,
    end: Option<i32>,
) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: protocol.map(str::to_owned),
        port,
        end_port: end,
    }
}

fn mk_tcp(port: i32) -> NetworkPolicyPort {
    mk_port(None, Some(IntOrString::Int(port)), None)
}

fn mk_range(protocol: &str, port: i32, end: i32) -> NetworkPolicyPort {
    mk_port(Some(protocol), Some(IntOrString::Int(port)), Some(end))
}

fn mk_named(protocol: Option<&str>, name: &str) -> NetworkPolicyPort {
    mk_port(protocol, Some(IntOrString::String(name.to_owned())), None)
}

fn mk_input(enforcement: PolicyEnforcement, policies: Vec<NetworkPolicy>) -> Input {
    Input {
        enforcement,
        cidrs: CidrTable::from_policies(&policies),
        policies,
        bundles: Vec::new(),
        identities: world(),
        pod_networks: None,
    }
}

fn mk_endpoint(id: u32) -> LocalEndpoint {
    let info = world()
        .into_iter()
        .find(|i| i.id == id)
        .expect("a world identity");
    LocalEndpoint {
        identity: info.id,
        labels: info.labels,
        named_ports: info.named_ports,
    }
}

/// Who is on the other side of a probe.
#[derive(Debug, Clone, Copy)]
enum Remote {
    Pod(u32),
    Host,
    Ip(&'static str),
}

#[derive(Debug, Clone, Copy)]
enum Dir {
    In,
    Out,
}

fn permits(
    input: &Input,
    compiled: &Compiled,
    dir: Dir,
    remote: Remote,
    proto: u8,
    port: u16,
) -> bool {
    let (id, addr) = match remote {
        Remote::Pod(id) => (id, ip_of(id)),
        Remote::Host => (HOST, "192.0.2.1"),
        Remote::Ip(a) => (WORLD, a),
    };
    let addr: IpAddr = addr.parse().expect("an address");
    let cidr_id = input.cidrs.cidr_identity(addr);
    let table = match dir {
        Dir::In => &compiled.policy.ingress,
        Dir::Out => &compiled.policy.egress,
    };
    table.permits(id, cidr_id, proto, port)
}

type Probe = (Dir, Remote, u8, u16, bool);

/// Compiles for `endpoint` and checks every probe; returns the compiled
/// policy for further checks.
fn check(name: &str, input: &Input, endpoint: u32, probes: &[Probe]) -> Compiled {
    let compiled = compile_endpoint(input, &mk_endpoint(endpoint));
    for &(dir, remote, proto, port, want) in probes {
        let got = permits(input, &compiled, dir, remote, proto, port);
        assert_eq!(
            got, want,
            "{name}: {dir:?} {remote:?} proto {proto} port {port}\n{:#?}",
            compiled.policy
        );
    }
    compiled
}

use Dir::{In, Out};
use Remote::{Host, Ip, Pod};

mod bundles;

fn default_mode(policies: Vec<NetworkPolicy>) -> Input {
    mk_input(PolicyEnforcement::Default, policies)
}

// ---- isolation -------------------------------------------------------------

#[test]
fn no_policy_no_isolation() {
    let input = default_mode(vec![]);
    let c = check(
        "none",
        &input,
        WEB_PROD,
        &[
            (In, Pod(WEB_DEV), TCP, 1, true),
            (In, Ip("203.0.113.1"), ICMP, 0, true),
            (Out, Ip("203.0.113.1"), UDP, 53, true),
        ],
    );
    assert_eq!(c, Compiled::default());
}

#[test]
fn deny_all_ingress() {
    let input = default_mode(vec![mk_policy("prod", "deny")]);
    let c = check(
        "deny-all",
        &input,
        WEB_PROD,
        &[
            (In, Pod(DB_PROD), TCP, 80, false),
            (In, Ip("203.0.113.1"), ICMP, 0, false),
            (In, Host, TCP, 8080, true),
            (In, Host, ICMP, 0, true),
            (Out, Pod(DB_PROD), TCP, 5432, true),
        ],
    );
    assert!(c.policy.ingress.isolated);
    assert!(!c.policy.egress.isolated);
    // Only the node's entry.
    assert_eq!(c.policy.ingress.entries.len(), 1);
    assert!(c.policy.egress.entries.is_empty());
}

#[test]
fn allow_all_ingress_rule() {
    // `ingress: [{}]`: every peer, every port, every protocol.
    let input = default_mode(vec![mk_policy("prod", "all").ingress(None, None)]);
    let c = check(
        "allow-all",
        &input,
        WEB_PROD,
        &[
            (In, Pod(CLIENT_DEV), TCP, 1, true),
            (In, Ip("203.0.113.1"), ICMP, 0, true),
            (In, Ip("2001:db8::1"), SCTP, 9, true),
        ],
    );
    assert!(c.policy.ingress.isolated);
    assert!(
        c.policy
            .ingress
            .entries
            .contains_key(&Key::any_protocol(ANY))
    );
    // An empty `from` list is the same as none.
    let empty = default_mode(vec![
        mk_policy("prod", "all").ingress(Some(vec![]), Some(vec![])),
    ]);
    assert_eq!(
        compile_endpoint(&empty, &mk_endpoint(WEB_PROD)).policy,
        c.policy
    );
}

#[test]
fn policies_select_only_their_namespace_and_pods() {
    let input = default_mode(vec![
        mk_policy("dev", "deny-dev"),
        mk_policy("prod", "deny-db").select(&[("app", "db")]),
    ]);
    check(
        "other namespace",
        &input,
        WEB_PROD,
        &[(In, Pod(DB_PROD), TCP, 80, true)],
    );
    check(
        "selected pod",
        &input,
        DB_PROD,
        &[(In, Pod(WEB_PROD), TCP, 5432, false)],
    );
    check(
        "dev",
        &input,
        WEB_DEV,
        &[(In, Pod(CLIENT_DEV), TCP, 9090, false)],
    );
}

#[test]
fn policy_types_defaults_and_explicit() {
    let any_out = || Some(vec![mk_block("0.0.0.0/0", &[])]);
    let cases: Vec<(&str, NetworkPolicy, bool, bool)> = vec![
        ("no types, no rules", mk_policy("prod", "p"), true, false),
        (
            "no types, egress rule",
            mk_policy("prod", "p").egress(any_out(), None),
            true,
            true,
        ),
        (
            "no types, empty egress list",
            {
                let mut p = mk_policy("prod", "p");
                p.spec_mut().egress = Some(vec![]);
                p
            },
            true,
            false,
        ),
        (
            "empty types list",
            mk_policy("prod", "p").types(&[]).egress(any_out(), None),
            true,
            true,
        ),
        (
            "Egress only",
            mk_policy("prod", "p")
                .types(&["Egress"])
                .ingress(None, None),
            false,
            true,
        ),
        (
            "Ingress only",
            mk_policy("prod", "p")
                .types(&["Ingress"])
                .egress(any_out(), None),
            true,
            false,
        ),
        (
            "both",
            mk_policy("prod", "p").types(&["Ingress", "Egress"]),
            true,
            true,
        ),
        (
            "no spec",
            NetworkPolicy {
                metadata: mk_policy("prod", "p").metadata,
                spec: None,
            },
            true,
            false,
        ),
    ];
    for (name, policy, ingress, egress) in cases {
        let c = compile_endpoint(&default_mode(vec![policy]), &mk_endpoint(WEB_PROD));
        assert_eq!(
            (c.policy.ingress.isolated, c.policy.egress.isolated),
            (ingress, egress),
            "{name}"
        );
    }
}

#[test]
fn egress_only_policy_ignores_its_ingress_rules() {
    let input = default_mode(vec![
        mk_policy("prod", "p")
            .types(&["Egress"])
            .ingress(Some(vec![mk_pods(&[("app", "db")])]), None)
            .egress(
                Some(vec![mk_pods(&[("app", "db")])]),
                Some(vec![mk_tcp(5432)]),
            ),
    ]);
    let c = check(
        "egress-only",
        &input,
        WEB_PROD,
        &[
            (In, Pod(CLIENT_DEV), TCP, 8080, true),
            (Out, Pod(DB_PROD), TCP, 5432, true),
            (Out, Pod(DB_PROD), TCP, 5433, false),
            (Out, Pod(DB_PROD), UDP, 5432, false),
            (Out, Pod(WEB_DEV), TCP, 5432, false),
            // Egress to the node is not special.
            (Out, Host, TCP, 10250, false),
        ],
    );
    assert!(c.policy.ingress.entries.is_empty());
}

#[test]
fn ingress_and_egress_together() {
    let input = default_mode(vec![
        mk_policy("prod", "p")
            .select(&[("app", "db")])
            .types(&["Ingress", "Egress"])
            .ingress(
                Some(vec![mk_pods(&[("app", "web")])]),
                Some(vec![mk_tcp(5432)]),
            )
            .egress(
                Some(vec![mk_block("10.0.0.0/24", &[])]),
                Some(vec![mk_port(Some("UDP"), None, None)]),
            ),
    ]);
    check(
        "both",
        &input,
        DB_PROD,
        &[
            (In, Pod(WEB_PROD), TCP, 5432, true),
            (In, Pod(WEB_DEV), TCP, 5432, false),
            (In, Pod(WEB_PROD), TCP, 80, false),
            (Out, Pod(WEB_PROD), UDP, 1, true),
            (Out, Pod(WEB_PROD), UDP, 65535, true),
            (Out, Pod(WEB_PROD), TCP, 1, false),
            (Out, Pod(WEB_DEV), UDP, 53, false),
        ],
    );
}

#[test]
fn multiple_policies_are_a_union() {
    let input = default_mode(vec![
        mk_policy("prod", "a").ingress(
            Some(vec![mk_pods(&[("app", "db")])]),
            Some(vec![mk_tcp(80)]),
        ),
        mk_policy("prod", "b").select(&[("app", "web")]).ingress(
            Some(vec![mk_namespaces(&[("env", "dev")])]),
            Some(vec![mk_tcp(81)]),
        ),
        // Selects nobody here: adds nothing.
        mk_policy("prod", "c")
            .select(&[("app", "none")])
            .ingress(None, None),
    ]);
    check(
        "union",
        &input,
        WEB_PROD,
        &[
            (In, Pod(DB_PROD), TCP, 80, true),
            (In, Pod(DB_PROD), TCP, 81, false),
            (In, Pod(CLIENT_DEV), TCP, 81, true),
            (In, Pod(CLIENT_DEV), TCP, 80, false),
            (In, Ip("203.0.113.1"), TCP, 80, false),
        ],
    );
    check(
        "db sees only a",
        &input,
        DB_PROD,
        &[
            (In, Pod(DB_PROD), TCP, 80, true),
            (In, Pod(CLIENT_DEV), TCP, 81, false),
        ],
    );
}

// ---- peers -----------------------------------------------------------------

#[test]
fn peer_selectors() {
    let cases: Vec<(&str, NetworkPolicyPeer, [bool; 5])> = vec![
        // columns: web@prod db@prod web@dev client@dev outside
        (
            "podSelector: same namespace",
            mk_pods(&[("app", "web")]),
            [true, false, false, false, false],
        ),
        (
            "empty podSelector: every pod of the namespace",
            mk_pods(&[]),
            [true, true, false, false, false],
        ),
        (
            "namespaceSelector",
            mk_namespaces(&[("env", "dev")]),
            [false, false, true, true, false],
        ),
        (
            "empty namespaceSelector: every pod",
            mk_namespaces(&[]),
            [true, true, true, true, false],
        ),
        (
            "both: pods in namespaces",
            mk_pods_in(&[("env", "dev")], &[("app", "web")]),
            [false, false, true, false, false],
        ),
        (
            "both, empty pods",
            mk_pods_in(&[("env", "prod")], &[]),
            [true, true, false, false, false],
        ),
        (
            "namespace name label",
            mk_namespaces(&[("kubernetes.io/metadata.name", "prod")]),
            [true, true, false, false, false],
        ),
        ("matches nobody", mk_pods(&[("app", "nope")]), [false; 5]),
    ];
    for (name, peer, want) in cases {
        let input = default_mode(vec![mk_policy("prod", "p").ingress(Some(vec![peer]), None)]);
        let compiled = compile_endpoint(&input, &mk_endpoint(DB_PROD));
        let remotes = [
            Pod(WEB_PROD),
            Pod(DB_PROD),
            Pod(WEB_DEV),
            Pod(CLIENT_DEV),
            Ip("203.0.113.1"),
        ];
        let got = remotes.map(|r| permits(&input, &compiled, In, r, TCP, 5432));
        assert_eq!(got, want, "{name}");
        assert!(
            compiled.diagnostics.is_empty(),
            "{name}: {:?}",
            compiled.diagnostics
        );
    }
}

#[test]
fn match_expressions_in_peers() {
    let peer = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "app".into(),
                operator: "NotIn".into(),
                values: Some(vec!["web".into()]),
            }]),
        }),
        namespace_selector: Some(LabelSelector::default()),
        ip_block: None,
    };
    let input = default_mode(vec![mk_policy("prod", "p").ingress(Some(vec![peer]), None)]);
    check(
        "NotIn",
        &input,
        WEB_PROD,
        &[
            (In, Pod(DB_PROD), TCP, 1, true),
            (In, Pod(CLIENT_DEV), TCP, 1, true),
            (In, Pod(WEB_DEV), TCP, 1, false),
            (In, Pod(WEB_PROD), TCP, 1, false),
        ],
    );
}

#[test]
fn ip_blocks_with_nested_excepts() {
    let input = default_mode(vec![
        mk_policy("prod", "p")
            .ingress(
                Some(vec![mk_block(
                    "10.0.0.0/8",
                    &["10.0.1.0/24", "10.0.0.2/32"],
                )]),
                None,
            )
            // Nested inside an except of another peer: the union allows it again.
            .ingress(
                Some(vec![mk_block("10.0.1.2/31", &[])]),
                Some(vec![mk_tcp(22)]),
            ),
        // A prefix of a policy that does not select this pod still splits
        // the address space; it must not change the answer.
        mk_policy("dev", "other")
            .ingress(Some(vec![mk_block("10.0.0.0/16", &["10.0.0.0/25"])]), None),
    ]);
    check(
        "ipBlock",
        &input,
        WEB_PROD,
        &[
            (In, Ip("10.200.0.1"), TCP, 1, true),
            (In, Pod(WEB_PROD), TCP, 1, true),
            (In, Pod(DB_PROD), TCP, 1, false), // 10.0.0.2/32 except
            (In, Pod(WEB_DEV), TCP, 1, false), // 10.0.1.0/24 except
            (In, Pod(CLIENT_DEV), TCP, 1, false), // except, and port 1 ∉ {22}
            (In, Pod(CLIENT_DEV), TCP, 22, true), // 10.0.1.2/31
            (In, Pod(WEB_DEV), TCP, 22, false), // 10.0.1.1 ∉ 10.0.1.2/31
            (In, Ip("11.0.0.1"), TCP, 1, false),
            (In, Ip("2001:db8::1"), TCP, 1, false),
            // The node's address is an address like any other.
            (In, Ip("192.0.2.1"), TCP, 1, false),
        ],
    );
}

#[test]
fn ip_blocks_ipv6_and_the_node_address() {
    let input = default_mode(vec![
        mk_policy("prod", "p")
            .types(&["Egress"])
            .egress(
                Some(vec![mk_block("2001:db8::/32", &["2001:db8:1::/48"])]),
                Some(vec![mk_tcp(443)]),
            )
            .egress(Some(vec![mk_block("192.0.2.0/24", &[])]), None),
    ]);
    check(
        "v6",
        &input,
        WEB_PROD,
        &[
            (Out, Ip("2001:db8:2::1"), TCP, 443, true),
            (Out, Ip("2001:db8:1::1"), TCP, 443, false),
            (Out, Ip("2001:db8:2::1"), TCP, 80, false),
            (Out, Ip("2001:db9::1"), TCP, 443, false),
            // ipBlock reaches the node through its CIDR identity.
            (Out, Host, TCP, 10250, true),
            (Out, Ip("192.0.2.77"), ICMP, 0, true),
        ],
    );
}

// ---- ports -----------------------------------------------------------------

#[test]
fn ports_protocols_and_ranges() {
    let input = default_mode(vec![mk_policy("prod", "p").ingress(
        None,
        Some(vec![
            mk_tcp(80),
            mk_range("TCP", 8080, 8090),
            mk_port(Some("UDP"), None, None),
            mk_port(Some("SCTP"), Some(IntOrString::Int(9)), Some(9)),
        ]),
    )]);
    let c = check(
        "ports",
        &input,
        WEB_PROD,
        &[
            (In, Pod(DB_PROD), TCP, 80, true),
            (In, Pod(DB_PROD), TCP, 79, false),
            (In, Pod(DB_PROD), TCP, 8079, false),
            (In, Pod(DB_PROD), TCP, 8080, true),
            (In, Pod(DB_PROD), TCP, 8087, true),
            (In, Pod(DB_PROD), TCP, 8088, true),
            (In, Pod(DB_PROD), TCP, 8090, true),
            (In, Pod(DB_PROD), TCP, 8091, false),
            (In, Pod(DB_PROD), UDP, 8085, true),
            (In, Pod(DB_PROD), UDP, 0, true),
            (In, Pod(DB_PROD), SCTP, 9, true),
            (In, Pod(DB_PROD), SCTP, 8, false),
            (In, Pod(DB_PROD), ICMP, 0, false),
        ],
    );
    // 8080..=8090 is three prefixes; plens has bits 16, 15, 13 and 0, and the
    // any-protocol bit for the node's entry.
    let any = crate::table::PLENS_ANY_PROTOCOL;
    assert_eq!(
        c.policy.ingress.plens(),
        1 << 16 | 1 << 15 | 1 << 13 | 1 | any
    );
}

#[test]
fn full_port_range_is_one_prefix() {
    let input = default_mode(vec![
        mk_policy("prod", "p").ingress(None, Some(vec![mk_range("TCP", 1, 65535)])),
    ]);
    let c = check(
        "1-65535",
        &input,
        WEB_PROD,
        &[
            (In, Pod(DB_PROD), TCP, 1, true),
            (In, Pod(DB_PROD), TCP, 65535, true),
            (In, Pod(DB_PROD), TCP, 0, false),
        ],
    );
    assert_eq!(c.policy.ingress.entries.len(), 1 + 16);
}

#[test]
fn named_ports_on_ingress_resolve_against_the_pod() {
    let input = default_mode(vec![mk_policy("prod", "p").ingress(
        Some(vec![mk_namespaces(&[])]),
        Some(vec![mk_named(None, "http"), mk_named(Some("UDP"), "dns")]),
    )]);
    let web = check(
        "web",
        &input,
        WEB_PROD,
        &[
            (In, Pod(WEB_DEV), TCP, 8080, true),
            (In, Pod(WEB_DEV), TCP, 9090, false),
            (In, Pod(WEB_DEV), UDP, 53, false),
            (In, Ip("203.0.113.1"), TCP, 8080, false),
        ],
    );
    // web@prod has no "dns": a warning, and nothing allowed for it.
    assert_eq!(web.diagnostics.len(), 1, "{:?}", web.diagnostics);
    assert_eq!(web.diagnostics[0].field, "spec.ingress[0].ports[1].port");
    assert_eq!(web.diagnostics[0].severity(), Severity::Warning);
    check(
        "db",
        &input,
        DB_PROD,
        &[
            (In, Pod(WEB_DEV), UDP, 53, true),
            (In, Pod(WEB_DEV), TCP, 53, false),
            (In, Pod(WEB_DEV), TCP, 8080, false),
            (In, Pod(WEB_DEV), TCP, 5432, false),
        ],
    );
    // With every peer, a named ingress port admits outside addresses too.
    let any = default_mode(vec![
        mk_policy("prod", "p").ingress(None, Some(vec![mk_named(None, "http")])),
    ]);
    check(
        "any peer",
        &any,
        WEB_PROD,
        &[
            (In, Ip("203.0.113.1"), TCP, 8080, true),
            (In, Ip("203.0.113.1"), TCP, 80, false),
        ],
    );
}

#[test]
fn named_ports_on_egress_resolve_per_destination() {
    let input = default_mode(vec![mk_policy("prod", "p").types(&["Egress"]).egress(
        Some(vec![mk_namespaces(&[])]),
        Some(vec![mk_named(None, "http")]),
    )]);
    check(
        "egress named",
        &input,
        DB_PROD,
        &[
            (Out, Pod(WEB_PROD), TCP, 8080, true),
            (Out, Pod(WEB_PROD), TCP, 9090, false),
            (Out, Pod(WEB_DEV), TCP, 9090, true),
            (Out, Pod(WEB_DEV), TCP, 8080, false),
            (Out, Pod(CLIENT_DEV), TCP, 8080, false),
            (Out, Ip("203.0.113.1"), TCP, 8080, false),
        ],
    );
    // Every peer: every pod identity that declares the name, and nothing else.
    let any = default_mode(vec![
        mk_policy("prod", "p")
            .types(&["Egress"])
            .egress(None, Some(vec![mk_named(None, "http")])),
    ]);
    let c = check(
        "any peer",
        &any,
        DB_PROD,
        &[
            (Out, Pod(WEB_PROD), TCP, 8080, true),
            (Out, Pod(WEB_DEV), TCP, 9090, true),
            (Out, Pod(WEB_DEV), TCP, 8080, false),
            (Out, Ip("203.0.113.1"), TCP, 8080, false),
            (Out, Ip("203.0.113.1"), TCP, 9090, false),
        ],
    );
    assert!(c.diagnostics.is_empty(), "{:?}", c.diagnostics);
    assert!(c.policy.egress.entries.keys().all(|k| k.identity != ANY));
}

#[test]
fn named_ports_towards_ip_blocks_fail_closed() {
    let input = default_mode(vec![mk_policy("prod", "p").types(&["Egress"]).egress(
        Some(vec![
            mk_block("10.0.0.0/8", &[]),
            mk_pods(&[("app", "web")]),
        ]),
        Some(vec![mk_named(None, "http")]),
    )]);
    let c = check(
        "ipBlock+named",
        &input,
        DB_PROD,
        &[
            (Out, Pod(WEB_PROD), TCP, 8080, true), // through the pod peer
            (Out, Pod(WEB_DEV), TCP, 9090, false), // only the ipBlock would allow it
        ],
    );
    assert_eq!(
        c.diagnostics,
        [Diagnostic {
            source: Source::NetworkPolicy(PolicyRef {
                namespace: "prod".into(),
                name: "p".into()
            }),
            field: "spec.egress[0].to[0].ipBlock".into(),
            problem: Problem::NamedPortWithIpBlock {
                name: "http".into()
            },
        }]
    );
}

#[test]
fn identities_share_named_ports() {
    // Two pods with one identity name "http" differently: both numbers count
    // for the identity (0004).
    let mut input = default_mode(vec![
        mk_policy("prod", "p")
            .types(&["Egress"])
            .egress(None, Some(vec![mk_named(None, "http")])),
    ]);
    let web = input
        .identities
        .iter_mut()
        .find(|i| i.id == WEB_PROD)
        .expect("web");
    web.named_ports.insert("http", Protocol::Tcp, 8081);
    check(
        "union",
        &input,
        DB_PROD,
        &[
            (Out, Pod(WEB_PROD), TCP, 8080, true),
            (Out, Pod(WEB_PROD), TCP, 8081, true),
        ],
    );
}

// ---- modes and the node ----------------------------------------------------

#[test]
fn enforcement_modes() {
    let allow_db = || {
        vec![
            mk_policy("prod", "p")
                .select(&[("app", "db")])
                .ingress(Some(vec![mk_pods(&[])]), None),
        ]
    };
    let always = mk_input(PolicyEnforcement::Always, allow_db());
    let c = check(
        "always, unselected",
        &always,
        WEB_PROD,
        &[
            (In, Pod(DB_PROD), TCP, 80, false),
            (In, Host, TCP, 8080, true),
            (Out, Pod(DB_PROD), TCP, 80, false),
            (Out, Host, TCP, 80, false),
        ],
    );
    assert!(c.policy.ingress.isolated && c.policy.egress.isolated);
    check(
        "always, selected",
        &always,
        DB_PROD,
        &[
            (In, Pod(WEB_PROD), TCP, 80, true),
            (In, Pod(WEB_DEV), TCP, 80, false),
            (Out, Pod(WEB_PROD), TCP, 80, false),
        ],
    );
    let never = mk_input(PolicyEnforcement::Never, allow_db());
    let c = check(
        "never",
        &never,
        DB_PROD,
        &[
            (In, Pod(WEB_DEV), TCP, 80, true),
            (Out, Ip("203.0.113.1"), UDP, 53, true),
        ],
    );
    assert_eq!(c, Compiled::default());
}

#[test]
fn the_node_is_admitted_only_when_isolated_and_only_on_ingress() {
    let input = default_mode(vec![mk_policy("prod", "p").types(&["Ingress", "Egress"])]);
    let c = check(
        "host",
        &input,
        WEB_PROD,
        &[
            (In, Host, TCP, 8080, true),
            (In, Host, UDP, 1, true),
            (Out, Host, TCP, 10250, false),
        ],
    );
    let from_host = c
        .policy
        .ingress
        .entries
        .get(&Key::any_protocol(HOST))
        .expect("host entry");
    assert_eq!(from_host.rule, RULE_FROM_HOST);
    assert_eq!(c.provenance.get(RULE_FROM_HOST), Some(&Origin::FromHost));
    assert!(c.policy.egress.entries.is_empty());
}

// ---- provenance, determinism -----------------------------------------------

#[test]
fn provenance_names_the_rule_peer_and_port() {
    let input = default_mode(vec![
        mk_policy("prod", "b").ingress(
            Some(vec![mk_pods(&[("app", "x")]), mk_pods(&[("app", "db")])]),
            Some(vec![mk_tcp(1), mk_tcp(5432)]),
        ),
        // Same key from a later policy: the entry names the smaller origin.
        mk_policy("prod", "c").ingress(
            Some(vec![mk_pods(&[("app", "db")])]),
            Some(vec![mk_tcp(5432)]),
        ),
        mk_policy("prod", "a")
            .ingress(None, None)
            .types(&["Egress"]),
    ]);
    let c = compile_endpoint(&input, &mk_endpoint(WEB_PROD));
    let decision = lookup(&c.policy.ingress, DB_PROD, WORLD, TCP, 5432);
    let Decision::Allow { rule } = decision else {
        panic!("want an allow, got {decision:?}");
    };
    let want = Origin::Rule(RuleOrigin {
        policy: PolicyRef {
            namespace: "prod".into(),
            name: "b".into(),
        },
        direction: Direction::Ingress,
        rule: 0,
        peer: Some(1),
        port: Some(1),
    });
    assert_eq!(c.provenance.get(rule), Some(&want));
    assert_eq!(
        c.provenance.get(rule).map(ToString::to_string).as_deref(),
        Some("networkpolicy prod/b spec.ingress[0] from[1] ports[1]")
    );
    // Every rule id an entry uses is in the provenance, and only those.
    let used: BTreeSet<u32> = c
        .policy
        .ingress
        .entries
        .values()
        .chain(c.policy.egress.entries.values())
        .map(|e| e.rule)
        .collect();
    let known: BTreeSet<u32> = c.provenance.iter().map(|(r, _)| r).collect();
    assert_eq!(used, known);
    // "a" selects for egress only, with no egress rules: deny-all egress.
    assert!(c.policy.egress.isolated && c.policy.egress.entries.is_empty());
}

#[test]
fn output_does_not_depend_on_input_order() {
    let policies = vec![
        mk_policy("prod", "a").ingress(
            Some(vec![mk_pods(&[]), mk_block("10.0.0.0/8", &["10.0.1.0/24"])]),
            Some(vec![mk_tcp(80), mk_named(None, "http")]),
        ),
        mk_policy("prod", "b").egress(
            Some(vec![mk_namespaces(&[])]),
            Some(vec![mk_named(None, "http"), mk_range("UDP", 50, 60)]),
        ),
        mk_policy("prod", "c").ingress(
            Some(vec![NetworkPolicyPeer::default()]),
            Some(vec![mk_port(Some("tcp"), None, None)]),
        ),
        mk_policy("dev", "d").ingress(Some(vec![mk_block("10.0.0.0/16", &[])]), None),
    ];
    let forward = default_mode(policies.clone());
    let mut backward = default_mode(policies.into_iter().rev().collect());
    backward.identities.reverse();
    for id in [WEB_PROD, DB_PROD, WEB_DEV, CLIENT_DEV] {
        let a = compile_endpoint(&forward, &mk_endpoint(id));
        let b = compile_endpoint(&backward, &mk_endpoint(id));
        assert_eq!(a, b, "endpoint {id}");
    }
    assert_eq!(forward.cidrs, backward.cidrs);
}

#[test]
fn equal_tables_share() {
    // Two pods selected by the same policies with the same resolved ports
    // compile to equal values, so the node can give them one policy id.
    let mut input = default_mode(vec![mk_policy("dev", "p").ingress(
        Some(vec![mk_pods(&[("app", "web")])]),
        Some(vec![mk_tcp(80)]),
    )]);
    input.identities.push(mk_identity(
        300,
        "dev",
        &[("app", "client"), ("tier", "2")],
        &[],
    ));
    let a = compile_endpoint(&input, &mk_endpoint(CLIENT_DEV));
    let mut other = mk_endpoint(CLIENT_DEV);
    other.identity = 300;
    other.labels.pod_labels.insert("tier".into(), "2".into());
    let b = compile_endpoint(&input, &other);
    assert_eq!(a, b);
    let hasher = std::hash::RandomState::new();
    use std::hash::BuildHasher;
    assert_eq!(hasher.hash_one(&a.policy), hasher.hash_one(&b.policy));
    assert_eq!(
        hasher.hash_one(&a.provenance),
        hasher.hash_one(&b.provenance)
    );
}

// ---- diagnostics -----------------------------------------------------------

fn diagnostics_of(policy: NetworkPolicy, endpoint: u32) -> (Compiled, Vec<(String, Problem)>) {
    let input = default_mode(vec![policy]);
    let c = compile_endpoint(&input, &mk_endpoint(endpoint));
    let found = c
        .diagnostics
        .iter()
        .map(|d| (d.field.clone(), d.problem.clone()))
        .collect();
    (c, found)
}

#[test]
fn broken_parts_are_reported_and_match_nothing() {
    let bad_expr = |op: &str, values: Option<Vec<String>>| LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "app".into(),
            operator: op.into(),
            values,
        }]),
    };
    let peer_sel = |s: LabelSelector| NetworkPolicyPeer {
        pod_selector: Some(s),
        ..Default::default()
    };
    let str_port = |s: &str| Some(IntOrString::String(s.into()));
    /// (case, the rule's peers, its ports, the field reported, the problem)
    type Case = (
        &'static str,
        Vec<NetworkPolicyPeer>,
        Vec<NetworkPolicyPort>,
        &'static str,
        Problem,
    );
    let cases: Vec<Case> = vec![
        (
            "unknown operator",
            vec![peer_sel(bad_expr("Is", Some(vec!["web".into()])))],
            vec![],
            "spec.ingress[0].from[0].podSelector.matchExpressions[0].operator",
            Problem::Selector(SelectorProblem::UnknownOperator("Is".into())),
        ),
        (
            "In without values",
            vec![peer_sel(bad_expr("In", None))],
            vec![],
            "spec.ingress[0].from[0].podSelector.matchExpressions[0].values",
            Problem::Selector(SelectorProblem::MissingValues("In")),
        ),
        (
            "Exists with values",
            vec![peer_sel(bad_expr("Exists", Some(vec!["x".into()])))],
            vec![],
            "spec.ingress[0].from[0].podSelector.matchExpressions[0].values",
            Problem::Selector(SelectorProblem::UnexpectedValues("Exists")),
        ),
        (
            "empty peer",
            vec![NetworkPolicyPeer::default()],
            vec![],
            "spec.ingress[0].from[0]",
            Problem::EmptyPeer,
        ),
        (
            "ipBlock with selector",
            vec![NetworkPolicyPeer {
                pod_selector: Some(sel(&[])),
                ..mk_block("0.0.0.0/0", &[])
            }],
            vec![],
            "spec.ingress[0].from[0]",
            Problem::IpBlockWithSelector,
        ),
        (
            "invalid CIDR",
            vec![mk_block("10.0.0.0/33", &[])],
            vec![],
            "spec.ingress[0].from[0].ipBlock.cidr",
            Problem::InvalidCidr("10.0.0.0/33".into()),
        ),
        (
            "invalid except",
            vec![mk_block("10.0.0.0/8", &["nope"])],
            vec![],
            "spec.ingress[0].from[0].ipBlock.except[0]",
            Problem::InvalidCidr("nope".into()),
        ),
        (
            "except outside",
            vec![mk_block("10.0.0.0/16", &["10.1.0.0/24"])],
            vec![],
            "spec.ingress[0].from[0].ipBlock.except[0]",
            Problem::ExceptOutsideCidr {
                except: "10.1.0.0/24".into(),
                cidr: "10.0.0.0/16".into(),
            },
        ),
        (
            "except equal to cidr",
            vec![mk_block("10.0.0.0/16", &["10.0.0.0/16"])],
            vec![],
            "spec.ingress[0].from[0].ipBlock.except[0]",
            Problem::ExceptOutsideCidr {
                except: "10.0.0.0/16".into(),
                cidr: "10.0.0.0/16".into(),
            },
        ),
        (
            "except of another family",
            vec![mk_block("0.0.0.0/0", &["::/1"])],
            vec![],
            "spec.ingress[0].from[0].ipBlock.except[0]",
            Problem::ExceptOutsideCidr {
                except: "::/1".into(),
                cidr: "0.0.0.0/0".into(),
            },
        ),
        (
            "unknown protocol",
            vec![],
            vec![mk_port(Some("ICMP"), None, None)],
            "spec.ingress[0].ports[0].protocol",
            Problem::UnknownProtocol("ICMP".into()),
        ),
        (
            "lowercase protocol",
            vec![],
            vec![mk_port(Some("tcp"), Some(IntOrString::Int(80)), None)],
            "spec.ingress[0].ports[0].protocol",
            Problem::UnknownProtocol("tcp".into()),
        ),
        (
            "port 0",
            vec![],
            vec![mk_tcp(0)],
            "spec.ingress[0].ports[0].port",
            Problem::PortOutOfRange(0),
        ),
        (
            "port too big",
            vec![],
            vec![mk_tcp(65536)],
            "spec.ingress[0].ports[0].port",
            Problem::PortOutOfRange(65536),
        ),
        (
            "endPort below port",
            vec![],
            vec![mk_range("TCP", 90, 80)],
            "spec.ingress[0].ports[0].endPort",
            Problem::EndPortBelowPort { port: 90, end: 80 },
        ),
        (
            "endPort too big",
            vec![],
            vec![mk_range("TCP", 90, 70000)],
            "spec.ingress[0].ports[0].endPort",
            Problem::PortOutOfRange(70000),
        ),
        (
            "endPort without port",
            vec![],
            vec![mk_port(None, None, Some(80))],
            "spec.ingress[0].ports[0].endPort",
            Problem::EndPortWithoutNumericPort,
        ),
        (
            "endPort with a named port",
            vec![],
            vec![mk_port(None, str_port("http"), Some(9000))],
            "spec.ingress[0].ports[0].endPort",
            Problem::EndPortWithoutNumericPort,
        ),
        (
            "numeric string port",
            vec![],
            vec![mk_port(None, str_port("8080"), None)],
            "spec.ingress[0].ports[0].port",
            Problem::InvalidPortName {
                name: "8080".into(),
                why: "must contain a letter",
            },
        ),
        (
            "unresolved named port",
            vec![],
            vec![mk_named(None, "metrics")],
            "spec.ingress[0].ports[0].port",
            Problem::NamedPortUnresolved {
                name: "metrics".into(),
                protocol: Protocol::Tcp,
            },
        ),
    ];
    for (name, from, ports, field, problem) in cases {
        let policy = mk_policy("prod", "p").ingress(
            (!from.is_empty()).then_some(from),
            (!ports.is_empty()).then_some(ports),
        );
        let (c, found) = diagnostics_of(policy, WEB_PROD);
        assert_eq!(found, [(field.to_owned(), problem)], "{name}");
        // The rule's only peer or port is broken: it allows nothing, the pod
        // stays isolated and only its node gets in.
        assert!(c.policy.ingress.isolated, "{name}");
        assert_eq!(
            c.policy.ingress.entries.len(),
            1,
            "{name}: {:?}",
            c.policy.ingress.entries
        );
        let input = default_mode(vec![]);
        for remote in [
            Pod(DB_PROD),
            Pod(WEB_DEV),
            Ip("10.0.0.9"),
            Ip("203.0.113.1"),
        ] {
            for (proto, port) in [(TCP, 80), (TCP, 8080), (UDP, 80), (ICMP, 0)] {
                assert!(
                    !permits(&input, &c, In, remote, proto, port),
                    "{name}: {remote:?} {proto}/{port}"
                );
            }
        }
    }
}

#[test]
fn a_broken_peer_leaves_the_others() {
    let policy = mk_policy("prod", "p").ingress(
        Some(vec![
            NetworkPolicyPeer::default(),
            mk_pods(&[("app", "db")]),
        ]),
        Some(vec![mk_port(Some("bogus"), None, None), mk_tcp(80)]),
    );
    let input = default_mode(vec![policy]);
    let c = check(
        "partial",
        &input,
        WEB_PROD,
        &[
            (In, Pod(DB_PROD), TCP, 80, true),
            (In, Pod(DB_PROD), TCP, 81, false),
            (In, Pod(WEB_DEV), TCP, 80, false),
        ],
    );
    assert_eq!(c.diagnostics.len(), 2);
    assert!(
        c.diagnostics
            .iter()
            .all(|d| d.severity() == Severity::Error)
    );
    assert_eq!(
        c.diagnostics[0].to_string(),
        "networkpolicy prod/p spec.ingress[0].from[0]: a peer must set podSelector, namespaceSelector or ipBlock"
    );
}

#[test]
fn a_broken_pod_selector_isolates_and_allows_nothing() {
    let mut policy = mk_policy("prod", "p")
        .types(&["Ingress", "Egress"])
        .ingress(None, None)
        .egress(None, None);
    policy.spec_mut().pod_selector = Some(LabelSelector {
        match_labels: Some(labels(&[("bad key!", "x")])),
        match_expressions: None,
    });
    let (c, found) = diagnostics_of(policy, WEB_PROD);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, "spec.podSelector.matchLabels[bad key!]");
    assert!(c.policy.ingress.isolated && c.policy.egress.isolated);
    assert_eq!(c.policy.ingress.entries.len(), 1); // the node only
    assert!(c.policy.egress.entries.is_empty());
}

#[test]
fn unknown_policy_types_isolate_both_directions() {
    let policy = mk_policy("prod", "p")
        .types(&["Ingress", "Egres"])
        .ingress(None, None);
    let (c, found) = diagnostics_of(policy, WEB_PROD);
    assert_eq!(
        found,
        [(
            "spec.policyTypes[1]".to_owned(),
            Problem::UnknownPolicyType("Egres".into())
        )]
    );
    assert!(c.policy.ingress.isolated && c.policy.egress.isolated);
    assert!(c.policy.egress.entries.is_empty());
}

#[test]
fn prefixes_missing_from_the_cidr_table_fail_closed() {
    let mut input = default_mode(vec![
        mk_policy("prod", "p").ingress(Some(vec![mk_block("10.0.0.0/8", &["10.0.1.0/24"])]), None),
    ]);
    input.cidrs = CidrTable::from_prefixes(["10.0.0.0/8".parse().expect("cidr")]);
    let c = check(
        "stale table",
        &input,
        WEB_PROD,
        &[
            (In, Pod(DB_PROD), TCP, 1, false),
            (In, Pod(WEB_DEV), TCP, 1, false),
        ],
    );
    assert_eq!(c.diagnostics.len(), 1);
    assert_eq!(
        c.diagnostics[0].problem,
        Problem::CidrWithoutIdentity("10.0.1.0/24".into())
    );
}

#[test]
fn reserved_identities_in_the_input_grant_nothing() {
    let mut input = default_mode(vec![
        mk_policy("prod", "p").ingress(Some(vec![mk_namespaces(&[])]), None),
    ]);
    input.identities.push(mk_identity(ANY, "prod", &[], &[]));
    input
        .identities
        .push(mk_identity(CIDR_FIRST, "prod", &[], &[]));
    check(
        "reserved",
        &input,
        WEB_PROD,
        &[
            (In, Ip("203.0.113.1"), TCP, 1, false),
            (In, Pod(DB_PROD), TCP, 1, true),
        ],
    );
}

#[test]
fn diagnostics_only_for_policies_that_select_the_pod() {
    let policy = mk_policy("prod", "p")
        .select(&[("app", "db")])
        .ingress(Some(vec![NetworkPolicyPeer::default()]), None);
    let (_, on_web) = diagnostics_of(policy.clone(), WEB_PROD);
    assert!(on_web.is_empty());
    let (_, on_db) = diagnostics_of(policy, DB_PROD);
    assert_eq!(on_db.len(), 1);
}

#[test]
fn policies_without_a_namespace_are_reported() {
    let mut policy = mk_policy("prod", "p");
    policy.metadata.namespace = None;
    let (c, found) = diagnostics_of(policy, WEB_PROD);
    assert_eq!(
        found,
        [("metadata.namespace".to_owned(), Problem::NoNamespace)]
    );
    assert!(!c.policy.ingress.isolated);
}
