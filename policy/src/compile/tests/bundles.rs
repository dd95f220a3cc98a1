//! PolicyBundle precedence and provenance (design 0006), through `lookup`
//! as the datapath sees it, in the world of the parent module: `prod`
//! (env=prod) holds web 256 and db 257, `dev` (env=dev) web 258 and
//! client 259; pod addresses are 10.0.x.x, the node is 192.0.2.1.

use trellis_api::v1alpha1::{
    IpBlock, LabelSelector as ApiSelector, Peer, PolicyBundle, PolicyBundleSpec, PolicyPort,
    PolicyRule, Protocol as ApiProtocol, RuleAction, Subject, Tier,
};

use super::*;
use crate::bundle::{BundleOrigin, BundleTier, conflicts};

// ---- builders --------------------------------------------------------------

fn api_sel(pairs: &[(&str, &str)]) -> ApiSelector {
    ApiSelector {
        match_labels: labels(pairs),
        match_expressions: Vec::new(),
    }
}

fn mk_bundle(name: &str, tier: Tier, priority: i32) -> PolicyBundle {
    PolicyBundle::new(
        name,
        PolicyBundleSpec {
            tier,
            priority,
            subject: Subject::default(),
            ingress: Vec::new(),
            egress: Vec::new(),
        },
    )
}

trait BundleExt {
    fn subject(self, ns: &[(&str, &str)], pods: &[(&str, &str)]) -> Self;
    fn ingress(self, rule: PolicyRule) -> Self;
    fn egress(self, rule: PolicyRule) -> Self;
}

impl BundleExt for PolicyBundle {
    fn subject(mut self, ns: &[(&str, &str)], pods: &[(&str, &str)]) -> Self {
        self.spec.subject = Subject {
            namespace_selector: api_sel(ns),
            pod_selector: api_sel(pods),
        };
        self
    }
    fn ingress(mut self, rule: PolicyRule) -> Self {
        self.spec.ingress.push(rule);
        self
    }
    fn egress(mut self, rule: PolicyRule) -> Self {
        self.spec.egress.push(rule);
        self
    }
}

fn mk_rule(action: RuleAction, peers: Vec<Peer>, ports: Vec<PolicyPort>) -> PolicyRule {
    PolicyRule {
        name: None,
        action,
        peers,
        ports,
    }
}

fn named(name: &str, rule: PolicyRule) -> PolicyRule {
    PolicyRule {
        name: Some(name.to_owned()),
        ..rule
    }
}

fn p_pods(ns: &[(&str, &str)], pods: &[(&str, &str)]) -> Peer {
    Peer {
        pods: Some(Subject {
            namespace_selector: api_sel(ns),
            pod_selector: api_sel(pods),
        }),
        ..Default::default()
    }
}

fn p_ns(pairs: &[(&str, &str)]) -> Peer {
    Peer {
        namespaces: Some(api_sel(pairs)),
        ..Default::default()
    }
}

fn p_block(cidr: &str, except: &[&str]) -> Peer {
    Peer {
        ip_block: Some(IpBlock {
            cidr: cidr.to_owned(),
            except: except.iter().map(|e| (*e).to_owned()).collect(),
        }),
        ..Default::default()
    }
}

fn b_port(protocol: ApiProtocol, port: Option<IntOrString>, end_port: Option<i32>) -> PolicyPort {
    PolicyPort {
        protocol,
        port,
        end_port,
    }
}

fn b_tcp(n: i32) -> PolicyPort {
    b_port(ApiProtocol::Tcp, Some(IntOrString::Int(n)), None)
}

fn b_named(name: &str) -> PolicyPort {
    b_port(
        ApiProtocol::Tcp,
        Some(IntOrString::String(name.into())),
        None,
    )
}

fn with_bundles(
    enforcement: PolicyEnforcement,
    policies: Vec<NetworkPolicy>,
    bundles: Vec<PolicyBundle>,
) -> Input {
    Input {
        identities: world(),
        ..crate::cluster::policy_input(enforcement, policies, bundles)
    }
}

/// The verdict and the origin that `lookup` and the provenance give.
fn decide(
    input: &Input,
    compiled: &Compiled,
    dir: Dir,
    remote: Remote,
    proto: u8,
    port: u16,
) -> (bool, Option<Origin>) {
    let (id, addr) = match remote {
        Remote::Pod(id) => (id, ip_of(id)),
        Remote::Host => (HOST, "192.0.2.1"),
        Remote::Ip(a) => (WORLD, a),
    };
    let addr: IpAddr = addr.parse().expect("an address");
    let cidr_id = input.cidrs.cidr_identity(addr);
    let direction = match dir {
        Dir::In => Direction::Ingress,
        Dir::Out => Direction::Egress,
    };
    let table = compiled.policy.table(direction);
    if !table.isolated {
        return (true, None);
    }
    let d = lookup(table, id, cidr_id, proto, port);
    let origin = compiled.provenance.explain(direction, d).cloned();
    (matches!(d, Decision::Allow { .. }), origin)
}

/// What a probe should give: allowed or not, and by what.
#[derive(Debug, Clone)]
enum By {
    Bundle(&'static str, usize),
    Policy(&'static str),
    Isolated,
    NotIsolated,
    DefaultDeny,
    FromHost,
    NotEnforced,
}

type BProbe = (Dir, Remote, u8, u16, bool, By);

fn expect_by(origin: &Option<Origin>, by: &By) -> bool {
    match (by, origin) {
        (By::Bundle(name, rule), Some(Origin::Bundle(b))) => b.bundle == *name && b.rule == *rule,
        (By::Policy(name), Some(Origin::Rule(r))) => r.policy.name == *name,
        (By::Isolated, Some(Origin::Isolated { .. })) => true,
        (By::NotIsolated, Some(Origin::NotIsolated { .. })) => true,
        (By::DefaultDeny, Some(Origin::DefaultDeny { .. })) => true,
        (By::FromHost, Some(Origin::FromHost)) => true,
        (By::NotEnforced, None) => true,
        _ => false,
    }
}

fn check_bundles(name: &str, input: &Input, endpoint: u32, probes: &[BProbe]) -> Compiled {
    let compiled = compile_endpoint(input, &mk_endpoint(endpoint));
    for (dir, remote, proto, port, want, by) in probes {
        let (got, origin) = decide(input, &compiled, *dir, *remote, *proto, *port);
        assert!(
            got == *want && expect_by(&origin, by),
            "{name}: {dir:?} {remote:?} proto {proto} port {port}: got {got} by {origin:?}, \
             want {want} by {by:?}\n{:#?}\n{:?}",
            compiled.policy,
            compiled.diagnostics,
        );
    }
    compiled
}

use By::{DefaultDeny, FromHost, Isolated, NotEnforced, NotIsolated, Policy};

fn by_bundle(name: &'static str, rule: usize) -> By {
    By::Bundle(name, rule)
}

/// NetworkPolicy in prod: db admits web (every port).
fn db_admits_web() -> NetworkPolicy {
    mk_policy("prod", "db-from-web")
        .select(&[("app", "db")])
        .ingress(Some(vec![mk_pods(&[("app", "web")])]), None)
}

// ---- precedence --------------------------------------------------------------

#[test]
fn admin_deny_beats_a_networkpolicy_allow() {
    let input = with_bundles(
        PolicyEnforcement::Default,
        vec![db_admits_web()],
        vec![mk_bundle("no-ssh", Tier::Admin, 10).ingress(mk_rule(
            RuleAction::Deny,
            vec![p_ns(&[])],
            vec![b_tcp(22)],
        ))],
    );
    let c = check_bundles(
        "admin deny",
        &input,
        DB_PROD,
        &[
            (In, Pod(WEB_PROD), TCP, 22, false, by_bundle("no-ssh", 0)),
            (In, Pod(WEB_PROD), TCP, 5432, true, Policy("db-from-web")),
            // Every protocol of the NetworkPolicy allow stays allowed,
            // next to the deny on one port of the same identity.
            (In, Pod(WEB_PROD), UDP, 22, true, Policy("db-from-web")),
            (In, Pod(WEB_PROD), ICMP, 0, true, Policy("db-from-web")),
            (In, Pod(CLIENT_DEV), TCP, 22, false, by_bundle("no-ssh", 0)),
            (In, Pod(CLIENT_DEV), TCP, 5432, false, Isolated),
            (In, Ip("203.0.113.1"), TCP, 22, false, Isolated),
            (In, Host, TCP, 22, true, FromHost),
        ],
    );
    // web@prod: "everything" plus "not TCP 22": two entries; the other pods
    // one each (the deny), for its provenance.
    let web: Vec<_> = c
        .policy
        .ingress
        .entries
        .iter()
        .filter(|(k, _)| k.identity == WEB_PROD)
        .collect();
    assert_eq!(web.len(), 2, "{web:?}");
    for id in [DB_PROD, WEB_DEV, CLIENT_DEV] {
        let n = c
            .policy
            .ingress
            .entries
            .keys()
            .filter(|k| k.identity == id)
            .count();
        assert_eq!(n, 1, "identity {id}");
    }
    assert!(c.diagnostics.is_empty(), "{:?}", c.diagnostics);
    // Egress: no bundle, no policy: not isolated.
    assert!(!c.policy.egress.isolated);
}

#[test]
fn pass_hands_the_decision_to_networkpolicy() {
    let input = with_bundles(
        PolicyEnforcement::Default,
        vec![db_admits_web()],
        vec![
            mk_bundle("tenants", Tier::Admin, 10)
                .ingress(mk_rule(
                    RuleAction::Pass,
                    vec![p_ns(&[("env", "prod")])],
                    vec![],
                ))
                .ingress(mk_rule(RuleAction::Deny, vec![p_ns(&[])], vec![])),
            // Later Admin bundles are skipped by a Pass too.
            mk_bundle("lockdown", Tier::Admin, 20).ingress(mk_rule(
                RuleAction::Deny,
                vec![p_ns(&[])],
                vec![],
            )),
        ],
    );
    check_bundles(
        "pass",
        &input,
        DB_PROD,
        &[
            (In, Pod(WEB_PROD), TCP, 5432, true, Policy("db-from-web")),
            (In, Pod(DB_PROD), TCP, 5432, false, Isolated),
            (In, Pod(WEB_DEV), TCP, 5432, false, by_bundle("tenants", 1)),
            // Not a pod: neither rule matches; the next bundle denies pods
            // only, so NetworkPolicy decides.
            (In, Ip("203.0.113.1"), TCP, 5432, false, Isolated),
        ],
    );
    // Where no NetworkPolicy isolates, a Pass goes on to Baseline, then the
    // default.
    check_bundles(
        "pass, not isolated",
        &input,
        WEB_PROD,
        &[
            (In, Pod(DB_PROD), TCP, 80, true, NotIsolated),
            (In, Pod(CLIENT_DEV), TCP, 80, false, by_bundle("tenants", 1)),
        ],
    );
}

#[test]
fn baseline_loses_to_networkpolicy() {
    let input = with_bundles(
        PolicyEnforcement::Default,
        vec![db_admits_web()],
        vec![
            mk_bundle("guard", Tier::Baseline, 10)
                .ingress(mk_rule(
                    RuleAction::Allow,
                    vec![p_ns(&[("env", "dev")])],
                    vec![b_tcp(5432)],
                ))
                .ingress(mk_rule(RuleAction::Deny, vec![p_ns(&[])], vec![])),
        ],
    );
    // db is isolated by a NetworkPolicy: it decides; the Baseline allow of
    // dev is not consulted.
    check_bundles(
        "isolated by policy",
        &input,
        DB_PROD,
        &[
            (In, Pod(WEB_PROD), TCP, 5432, true, Policy("db-from-web")),
            (In, Pod(WEB_DEV), TCP, 5432, false, Isolated),
        ],
    );
    // web is not: Baseline decides what it matches, the default the rest.
    check_bundles(
        "no policy",
        &input,
        WEB_PROD,
        &[
            (In, Pod(WEB_DEV), TCP, 5432, true, by_bundle("guard", 0)),
            (In, Pod(WEB_DEV), TCP, 80, false, by_bundle("guard", 1)),
            (In, Pod(DB_PROD), TCP, 80, false, by_bundle("guard", 1)),
            (In, Ip("203.0.113.1"), TCP, 80, true, NotIsolated),
            (Out, Pod(DB_PROD), TCP, 80, true, NotEnforced),
        ],
    );
}

#[test]
fn baseline_pass_goes_to_the_default() {
    let bundles = || {
        vec![
            mk_bundle("base", Tier::Baseline, 1)
                .egress(mk_rule(
                    RuleAction::Pass,
                    vec![p_ns(&[("env", "dev")])],
                    vec![],
                ))
                .egress(mk_rule(RuleAction::Allow, vec![p_ns(&[])], vec![])),
        ]
    };
    let always = with_bundles(PolicyEnforcement::Always, vec![], bundles());
    check_bundles(
        "always",
        &always,
        WEB_PROD,
        &[
            (Out, Pod(WEB_DEV), TCP, 80, false, DefaultDeny),
            (Out, Pod(DB_PROD), TCP, 80, true, by_bundle("base", 1)),
            (Out, Ip("203.0.113.1"), UDP, 53, false, DefaultDeny),
            (In, Pod(DB_PROD), TCP, 80, false, DefaultDeny),
            (In, Host, TCP, 80, true, FromHost),
        ],
    );
    let default = with_bundles(PolicyEnforcement::Default, vec![], bundles());
    check_bundles(
        "default",
        &default,
        WEB_PROD,
        &[
            (Out, Pod(WEB_DEV), TCP, 80, true, NotIsolated),
            (Out, Pod(DB_PROD), TCP, 80, true, by_bundle("base", 1)),
        ],
    );
    let never = with_bundles(PolicyEnforcement::Never, vec![], bundles());
    let c = compile_endpoint(&never, &mk_endpoint(WEB_PROD));
    assert_eq!(c, Compiled::default());
}

#[test]
fn priorities_order_bundles_and_names_break_ties() {
    let input = with_bundles(
        PolicyEnforcement::Default,
        vec![],
        vec![
            // Listed first, evaluated second: priority 10 after 5.
            mk_bundle("a-deny", Tier::Admin, 10).ingress(mk_rule(
                RuleAction::Deny,
                vec![p_ns(&[])],
                vec![],
            )),
            mk_bundle("z-allow", Tier::Admin, 5).ingress(mk_rule(
                RuleAction::Allow,
                vec![p_pods(&[], &[("app", "web")])],
                vec![],
            )),
            // Same priority as a-deny: the name decides, a-deny first.
            mk_bundle("b-allow", Tier::Admin, 10).ingress(mk_rule(
                RuleAction::Allow,
                vec![p_pods(&[], &[("app", "client")])],
                vec![],
            )),
        ],
    );
    check_bundles(
        "priorities",
        &input,
        DB_PROD,
        &[
            (In, Pod(WEB_PROD), TCP, 1, true, by_bundle("z-allow", 0)),
            (In, Pod(WEB_DEV), TCP, 1, true, by_bundle("z-allow", 0)),
            (In, Pod(CLIENT_DEV), TCP, 1, false, by_bundle("a-deny", 0)),
            (In, Pod(DB_PROD), TCP, 1, false, by_bundle("a-deny", 0)),
            (In, Ip("203.0.113.1"), TCP, 1, true, NotIsolated),
        ],
    );
    let found = conflicts(&input.bundles, &input.identities);
    assert_eq!(found.len(), 1, "{found:?}");
    let c = &found[0];
    assert_eq!((c.first.as_str(), c.second.as_str()), ("a-deny", "b-allow"));
    assert_eq!((c.tier, c.priority), (BundleTier::Admin, 10));
    assert_eq!(c.subject, WEB_PROD, "the first identity both select");
    assert!(
        c.to_string()
            .contains("a-deny wins only because its name sorts first")
    );
}

#[test]
fn conflicts_need_overlap_and_different_actions() {
    let deny_22 = |name: &str| {
        mk_bundle(name, Tier::Admin, 1).ingress(mk_rule(
            RuleAction::Deny,
            vec![p_ns(&[])],
            vec![b_tcp(22)],
        ))
    };
    let allow = |name: &str, peer: Peer, port: PolicyPort| {
        mk_bundle(name, Tier::Admin, 1).ingress(mk_rule(RuleAction::Allow, vec![peer], vec![port]))
    };
    let cases: Vec<(&str, Vec<PolicyBundle>, usize)> = vec![
        ("same action", vec![deny_22("a"), deny_22("b")], 0),
        (
            "other port",
            vec![deny_22("a"), allow("b", p_ns(&[]), b_tcp(23))],
            0,
        ),
        (
            "overlap",
            vec![deny_22("a"), allow("b", p_ns(&[]), b_tcp(22))],
            1,
        ),
        (
            "range overlaps",
            vec![
                deny_22("a"),
                allow(
                    "b",
                    p_ns(&[]),
                    b_port(ApiProtocol::Tcp, Some(IntOrString::Int(20)), Some(30)),
                ),
            ],
            1,
        ),
        (
            "other protocol",
            vec![
                deny_22("a"),
                allow("b", p_ns(&[]), b_port(ApiProtocol::Udp, None, None)),
            ],
            0,
        ),
        (
            "other pods",
            vec![
                deny_22("a"),
                allow("b", p_pods(&[], &[("app", "nobody")]), b_tcp(22)),
            ],
            0,
        ),
        (
            "other priority",
            vec![deny_22("a"), {
                let mut b = allow("b", p_ns(&[]), b_tcp(22));
                b.spec.priority = 2;
                b
            }],
            0,
        ),
        (
            "subjects apart",
            vec![
                deny_22("a").subject(&[("env", "prod")], &[]),
                allow("b", p_ns(&[]), b_tcp(22)).subject(&[("env", "dev")], &[]),
            ],
            0,
        ),
        (
            "blocks overlap",
            vec![
                mk_bundle("a", Tier::Admin, 1).egress(mk_rule(
                    RuleAction::Deny,
                    vec![p_block("10.0.0.0/8", &[])],
                    vec![],
                )),
                mk_bundle("b", Tier::Admin, 1).egress(mk_rule(
                    RuleAction::Allow,
                    vec![p_block("10.1.0.0/16", &[])],
                    vec![],
                )),
            ],
            1,
        ),
        (
            "block inside an except",
            vec![
                mk_bundle("a", Tier::Admin, 1).egress(mk_rule(
                    RuleAction::Deny,
                    vec![p_block("10.0.0.0/8", &["10.1.0.0/16"])],
                    vec![],
                )),
                mk_bundle("b", Tier::Admin, 1).egress(mk_rule(
                    RuleAction::Allow,
                    vec![p_block("10.1.2.0/24", &[])],
                    vec![],
                )),
            ],
            0,
        ),
    ];
    for (name, bundles, want) in cases {
        let found = conflicts(&bundles, &world());
        assert_eq!(found.len(), want, "{name}: {found:?}");
    }
}

#[test]
fn the_first_matching_rule_of_a_bundle_decides() {
    let input = with_bundles(
        PolicyEnforcement::Default,
        vec![],
        vec![
            mk_bundle("ordered", Tier::Admin, 1)
                .ingress(mk_rule(
                    RuleAction::Allow,
                    vec![p_pods(&[], &[("app", "web")])],
                    vec![b_tcp(80)],
                ))
                .ingress(mk_rule(
                    RuleAction::Deny,
                    vec![p_ns(&[])],
                    vec![b_port(
                        ApiProtocol::Tcp,
                        Some(IntOrString::Int(8000)),
                        Some(8100),
                    )],
                ))
                .ingress(mk_rule(RuleAction::Allow, vec![p_ns(&[])], vec![]))
                .ingress(mk_rule(
                    RuleAction::Deny,
                    vec![p_block("0.0.0.0/0", &[])],
                    vec![],
                )),
        ],
    );
    let c = check_bundles(
        "first match",
        &input,
        DB_PROD,
        &[
            (In, Pod(WEB_DEV), TCP, 80, true, by_bundle("ordered", 0)),
            (In, Pod(WEB_DEV), TCP, 8050, false, by_bundle("ordered", 1)),
            (In, Pod(WEB_DEV), TCP, 8000, false, by_bundle("ordered", 1)),
            (In, Pod(WEB_DEV), TCP, 8100, false, by_bundle("ordered", 1)),
            (In, Pod(WEB_DEV), TCP, 7999, true, by_bundle("ordered", 2)),
            (In, Pod(WEB_DEV), TCP, 8101, true, by_bundle("ordered", 2)),
            (In, Pod(WEB_DEV), ICMP, 0, true, by_bundle("ordered", 2)),
            (In, Pod(CLIENT_DEV), TCP, 80, true, by_bundle("ordered", 2)),
            (
                In,
                Ip("203.0.113.1"),
                TCP,
                80,
                false,
                by_bundle("ordered", 3),
            ),
            (In, Ip("2001:db8::1"), TCP, 80, true, NotIsolated),
        ],
    );
    // A pod: "everything" plus the range under it, in no more prefixes
    // than the range's own cover.
    let client = c
        .policy
        .ingress
        .entries
        .keys()
        .filter(|k| k.identity == CLIENT_DEV)
        .count();
    assert!(
        client > 1 && client <= 1 + port_prefixes(8000, 8100).len(),
        "{client}"
    );
}

// ---- addresses and pods ------------------------------------------------------

#[test]
fn a_rule_on_addresses_before_a_rule_on_pods() {
    // The metadata service is denied to every pod; db@prod admits egress
    // from web. Whether web's packet to db is denied depends on db's
    // address being the metadata address.
    let bundles = vec![mk_bundle("no-metadata", Tier::Admin, 1).egress(mk_rule(
        RuleAction::Deny,
        vec![p_block("169.254.169.254/32", &[])],
        vec![],
    ))];
    let policy = mk_policy("prod", "web-to-db")
        .select(&[("app", "web")])
        .types(&["Egress"])
        .egress(
            Some(vec![mk_pods(&[("app", "db")])]),
            Some(vec![mk_tcp(5432)]),
        );
    // Without knowing where pod addresses are, the compiler cannot tell:
    // it denies, and says so.
    let unknown = with_bundles(
        PolicyEnforcement::Default,
        vec![policy.clone()],
        bundles.clone(),
    );
    let c = check_bundles(
        "pod networks unknown",
        &unknown,
        WEB_PROD,
        &[
            (
                Out,
                Pod(DB_PROD),
                TCP,
                5432,
                false,
                by_bundle("no-metadata", 0),
            ),
            (
                Out,
                Ip("169.254.169.254"),
                TCP,
                80,
                false,
                by_bundle("no-metadata", 0),
            ),
            (Out, Ip("203.0.113.1"), TCP, 5432, false, Isolated),
        ],
    );
    assert_eq!(
        c.diagnostics,
        [Diagnostic {
            source: Source::PolicyBundle("no-metadata".into()),
            field: "spec.egress[0]".into(),
            problem: Problem::AddressDependentVerdict {
                identities: vec![DB_PROD]
            },
        }]
    );
    assert_eq!(c.diagnostics[0].severity(), Severity::Warning);
    // Pods get 10.0.0.0/16: none is the metadata address, so db's verdict
    // is the same wherever it is: exact.
    let mut known = unknown.clone();
    known.pod_networks = Some(vec!["10.0.0.0/16".parse().expect("cidr")]);
    let c = check_bundles(
        "pod networks known",
        &known,
        WEB_PROD,
        &[
            (Out, Pod(DB_PROD), TCP, 5432, true, Policy("web-to-db")),
            (Out, Pod(DB_PROD), TCP, 5433, false, Isolated),
            (
                Out,
                Ip("169.254.169.254"),
                TCP,
                5432,
                false,
                by_bundle("no-metadata", 0),
            ),
        ],
    );
    assert!(c.diagnostics.is_empty(), "{:?}", c.diagnostics);
    assert_eq!(c.policy.egress.entries.len(), 2, "{:#?}", c.policy.egress);
}

#[test]
fn a_rule_on_pods_before_a_rule_on_addresses() {
    // Tenants apart: nothing from dev reaches prod, whatever prod's
    // NetworkPolicies open to addresses.
    let input = with_bundles(
        PolicyEnforcement::Default,
        vec![mk_policy("prod", "public").ingress(Some(vec![mk_block("0.0.0.0/0", &[])]), None)],
        vec![
            mk_bundle("tenants", Tier::Admin, 1)
                .subject(&[("env", "prod")], &[])
                .ingress(mk_rule(
                    RuleAction::Deny,
                    vec![p_ns(&[("env", "dev")])],
                    vec![],
                )),
        ],
    );
    let c = check_bundles(
        "pods first",
        &input,
        WEB_PROD,
        &[
            (In, Pod(WEB_DEV), TCP, 80, false, by_bundle("tenants", 0)),
            (In, Pod(CLIENT_DEV), ICMP, 0, false, by_bundle("tenants", 0)),
            (In, Pod(DB_PROD), TCP, 80, true, Policy("public")),
            (In, Ip("203.0.113.1"), TCP, 80, true, Policy("public")),
            (In, Ip("2001:db8::1"), TCP, 80, false, Isolated),
        ],
    );
    assert!(c.diagnostics.is_empty(), "{:?}", c.diagnostics);
    // The dev pods one entry each, the block one, the node one.
    assert_eq!(c.policy.ingress.entries.len(), 4, "{:#?}", c.policy.ingress);
}

#[test]
fn the_node_always_gets_in_but_not_out() {
    let input = with_bundles(
        PolicyEnforcement::Default,
        vec![],
        vec![
            mk_bundle("walls", Tier::Admin, 1)
                .ingress(mk_rule(
                    RuleAction::Deny,
                    vec![p_block("0.0.0.0/0", &[])],
                    vec![],
                ))
                .egress(mk_rule(
                    RuleAction::Deny,
                    vec![p_block("192.0.2.0/24", &[])],
                    vec![],
                )),
        ],
    );
    check_bundles(
        "host",
        &input,
        WEB_PROD,
        &[
            (In, Host, TCP, 10250, true, FromHost),
            (In, Host, ICMP, 0, true, FromHost),
            (
                In,
                Ip("192.0.2.1"),
                TCP,
                10250,
                false,
                by_bundle("walls", 0),
            ),
            (Out, Host, TCP, 10250, false, by_bundle("walls", 0)),
            (Out, Ip("203.0.113.1"), TCP, 443, true, NotIsolated),
        ],
    );
}

#[test]
fn named_ports_resolve_on_the_pod_and_the_destination() {
    let input = with_bundles(
        PolicyEnforcement::Default,
        vec![],
        vec![
            mk_bundle("named", Tier::Admin, 1)
                .ingress(mk_rule(
                    RuleAction::Deny,
                    vec![p_ns(&[])],
                    vec![b_named("http")],
                ))
                .egress(mk_rule(
                    RuleAction::Deny,
                    vec![p_ns(&[])],
                    vec![b_named("http")],
                )),
        ],
    );
    check_bundles(
        "named",
        &input,
        WEB_PROD,
        &[
            // Ingress: web@prod's own http is 8080.
            (In, Pod(CLIENT_DEV), TCP, 8080, false, by_bundle("named", 0)),
            (In, Pod(CLIENT_DEV), TCP, 9090, true, NotIsolated),
            // Egress: each destination's http.
            (Out, Pod(WEB_DEV), TCP, 9090, false, by_bundle("named", 0)),
            (Out, Pod(WEB_DEV), TCP, 8080, true, NotIsolated),
            (Out, Pod(DB_PROD), TCP, 8080, true, NotIsolated),
            (Out, Ip("203.0.113.1"), TCP, 8080, true, NotIsolated),
        ],
    );
}

// ---- broken input ------------------------------------------------------------

#[test]
fn broken_parts_fail_closed_by_action() {
    let bad_block = || p_block("10.0.0.0/33", &[]);
    let bad_port = || b_port(ApiProtocol::Tcp, Some(IntOrString::Int(0)), None);
    let cases: Vec<(&str, PolicyRule, Vec<BProbe>)> = vec![
        (
            "allow: the broken peer matches nothing",
            mk_rule(
                RuleAction::Allow,
                vec![bad_block(), p_ns(&[("env", "dev")])],
                vec![],
            ),
            vec![
                (In, Pod(WEB_DEV), TCP, 80, true, by_bundle("b", 0)),
                (In, Pod(DB_PROD), TCP, 80, false, Isolated),
            ],
        ),
        (
            "deny: the broken peer matches every peer",
            mk_rule(
                RuleAction::Deny,
                vec![bad_block(), p_ns(&[("env", "dev")])],
                vec![b_tcp(5432)],
            ),
            vec![
                (In, Pod(WEB_DEV), TCP, 5432, false, by_bundle("b", 0)),
                (In, Pod(WEB_PROD), TCP, 5432, false, by_bundle("b", 0)),
                (In, Ip("203.0.113.1"), TCP, 5432, false, by_bundle("b", 0)),
                (In, Pod(WEB_PROD), TCP, 5433, true, Policy("db-from-web")),
            ],
        ),
        (
            "pass: the broken port denies every port of the peers",
            mk_rule(
                RuleAction::Pass,
                vec![p_ns(&[("env", "prod")])],
                vec![bad_port(), b_tcp(5432)],
            ),
            vec![
                (In, Pod(WEB_PROD), TCP, 5432, true, Policy("db-from-web")),
                (In, Pod(WEB_PROD), TCP, 80, false, by_bundle("b", 0)),
                (In, Pod(WEB_DEV), TCP, 80, false, Isolated),
            ],
        ),
    ];
    for (name, rule, probes) in cases {
        let input = with_bundles(
            PolicyEnforcement::Default,
            vec![db_admits_web()],
            vec![mk_bundle("b", Tier::Admin, 1).ingress(rule)],
        );
        let c = check_bundles(name, &input, DB_PROD, &probes);
        assert!(!c.diagnostics.is_empty(), "{name}");
        assert!(
            c.diagnostics
                .iter()
                .all(|d| d.source == Source::PolicyBundle("b".into())),
            "{name}: {:?}",
            c.diagnostics
        );
    }
    // The fields and problems of the deny case.
    let input = with_bundles(
        PolicyEnforcement::Default,
        vec![],
        vec![mk_bundle("b", Tier::Admin, 1).ingress(mk_rule(
            RuleAction::Deny,
            vec![bad_block(), Peer::default()],
            vec![],
        ))],
    );
    let c = compile_endpoint(&input, &mk_endpoint(DB_PROD));
    let found: Vec<(String, Problem)> = c
        .diagnostics
        .iter()
        .map(|d| (d.field.clone(), d.problem.clone()))
        .collect();
    assert_eq!(
        found,
        [
            (
                "spec.ingress[0]".to_owned(),
                Problem::BrokenPartDenies {
                    action: "Deny",
                    part: "peer"
                }
            ),
            (
                "spec.ingress[0].peers[0].ipBlock.cidr".to_owned(),
                Problem::InvalidCidr("10.0.0.0/33".into())
            ),
            (
                "spec.ingress[0].peers[1]".to_owned(),
                Problem::PeerFields(0)
            ),
        ]
    );
    assert_eq!(
        c.diagnostics[0].to_string(),
        "policybundle b spec.ingress[0]: this Deny rule has a broken peer; the part matches every \
         peer instead and denies (fail closed)"
    );
}

// ---- provenance and sharing ------------------------------------------------------

#[test]
fn provenance_names_the_bundle_rule_peer_and_port() {
    let input = with_bundles(
        PolicyEnforcement::Default,
        vec![db_admits_web()],
        vec![mk_bundle("guard", Tier::Admin, 7).ingress(named(
            "no-dev-db",
            mk_rule(
                RuleAction::Deny,
                vec![p_block("192.168.0.0/16", &[]), p_ns(&[("env", "dev")])],
                vec![b_tcp(80), b_tcp(5432)],
            ),
        ))],
    );
    let c = compile_endpoint(&input, &mk_endpoint(DB_PROD));
    let (allowed, origin) = decide(&input, &c, In, Pod(CLIENT_DEV), TCP, 5432);
    assert!(!allowed);
    let want = Origin::Bundle(BundleOrigin {
        tier: BundleTier::Admin,
        priority: 7,
        bundle: "guard".into(),
        direction: Direction::Ingress,
        rule: 0,
        name: Some("no-dev-db".into()),
        peer: 1,
        port: Some(1),
    });
    assert_eq!(origin.as_ref(), Some(&want));
    assert_eq!(
        want.to_string(),
        "policybundle guard (Admin 7) spec.ingress[0] \"no-dev-db\" peers[1] ports[1]"
    );
    // Nothing found: the policies that isolate, by name.
    let d = lookup(&c.policy.ingress, CLIENT_DEV, WORLD, TCP, 9);
    assert_eq!(d, Decision::NoMatch);
    let isolated = c.provenance.explain(Direction::Ingress, d);
    assert_eq!(
        isolated.map(ToString::to_string).as_deref(),
        Some("isolated by networkpolicy prod/db-from-web (ingress), nothing allowed")
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
    // Default and Always origins read as such.
    assert_eq!(
        Origin::NotIsolated {
            direction: Direction::Egress
        }
        .to_string(),
        "no networkpolicy isolates the pod (egress): allowed (enforcement Default)"
    );
    assert_eq!(
        Origin::DefaultDeny {
            direction: Direction::Ingress
        }
        .to_string(),
        "default deny (ingress, enforcement Always)"
    );
}

#[test]
fn networkpolicy_alone_compiles_as_before() {
    // Bundles that apply to other pods change nothing for this one.
    let policies = vec![
        db_admits_web(),
        mk_policy("prod", "all").types(&["Ingress", "Egress"]),
    ];
    let others = vec![
        mk_bundle("dev-only", Tier::Admin, 1)
            .subject(&[("env", "dev")], &[])
            .ingress(mk_rule(RuleAction::Deny, vec![p_ns(&[])], vec![])),
        // Selects db, but has no rules for either direction.
        mk_bundle("empty", Tier::Admin, 1),
    ];
    let without = mk_input(PolicyEnforcement::Default, policies.clone());
    let mut with = without.clone();
    with.bundles = others;
    for id in [WEB_PROD, DB_PROD] {
        let a = compile_endpoint(&without, &mk_endpoint(id));
        let b = compile_endpoint(&with, &mk_endpoint(id));
        assert_eq!(a, b, "endpoint {id}");
        assert_eq!(
            a.provenance
                .no_match(Direction::Egress)
                .map(ToString::to_string)
                .as_deref(),
            Some("isolated by networkpolicy prod/all (egress), nothing allowed")
        );
    }
}

#[test]
fn output_does_not_depend_on_bundle_order() {
    let bundles = vec![
        mk_bundle("a", Tier::Admin, 3).ingress(mk_rule(
            RuleAction::Deny,
            vec![
                p_ns(&[("env", "dev")]),
                p_block("10.0.0.0/8", &["10.0.1.0/24"]),
            ],
            vec![b_tcp(80), b_named("http")],
        )),
        mk_bundle("b", Tier::Baseline, 3).egress(mk_rule(
            RuleAction::Deny,
            vec![p_ns(&[])],
            vec![],
        )),
        mk_bundle("c", Tier::Admin, 1).ingress(mk_rule(RuleAction::Pass, vec![p_ns(&[])], vec![])),
    ];
    let forward = with_bundles(
        PolicyEnforcement::Default,
        vec![db_admits_web()],
        bundles.clone(),
    );
    let mut backward = with_bundles(
        PolicyEnforcement::Default,
        vec![db_admits_web()],
        bundles.into_iter().rev().collect(),
    );
    backward.identities.reverse();
    for id in [WEB_PROD, DB_PROD, WEB_DEV, CLIENT_DEV] {
        assert_eq!(
            compile_endpoint(&forward, &mk_endpoint(id)),
            compile_endpoint(&backward, &mk_endpoint(id)),
            "endpoint {id}"
        );
    }
}
