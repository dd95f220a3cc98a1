//! PolicyBundle truth tables on the sandbox: the NetworkPolicy truth-table world
//! (`tests/network_policy.rs`: namespaces x, y, z labelled `ns=<name>`, pods a, b, c labelled
//! `pod=<name>` spread over three nodes, every pod serving TCP and UDP on 80 and 81 as
//! `serve-<port>-<proto>`), with Admin and Baseline bundles mixed with NetworkPolicies. Each
//! step changes the cluster, then every pod probes every pod on each (protocol, port) and the
//! tables must equal what the oracle (`trellis_e2e::truth::oracle` and its bundle stages,
//! written from docs/policybundles.md independently of Trellis' compiler) computes from the
//! apiserver's objects. Then `kubectl trellis explain` (the built binary) is asked about every
//! cell: its verdict must be what the probe saw, and the rule it names on each end the one the
//! oracle decided by (`trellis_e2e::truth::explain`).
//!
//! - `the_case_list_checks_out_against_the_oracle` needs no sandbox (nor root): every case
//!   builds, names only objects of the world, and each of its steps changes the truth.
//! - `datapath::*`: the cases, each in a sandbox of its own (`/tmp/trellis-e2e-pb-<case>`);
//!   one with `cargo test -p trellis-e2e --test policy_bundles -- --exact
//!   datapath::admin_deny_beats_networkpolicy_allow`. Steps that only apply or delete policies
//!   and bundles are checked strictly once every node reports it enforces them; steps that
//!   change labels are probed until they match, for up to 30 s (see `World::check`).
//!
//! `ipBlock` peers here cover whole IP pools: a bundle rule on addresses ordered before a rule
//! on pods, where pods' addresses fall on both sides of the range, is the compiler's one
//! documented approximation (design 0006, "Rules on addresses before rules on pods").
//! Needs root.

use serde_json::json;
use trellis_api::v1alpha1::PolicyBundle;
use trellis_e2e::truth::{self, Addresses, Step, World, bundle, explain::Explainer, policy};

/// Starts the world in its own sandbox, runs `steps` as case `name`, and checks
/// `kubectl trellis explain` on every cell of every step's tables.
async fn run(name: &'static str, steps: fn(&Addresses) -> Vec<Step>) {
    let world = World::start(&format!("pb-{name}"))
        .await
        .unwrap_or_else(|e| panic!("the truth-table world for {name} starts: {e}"));
    let explainer = Explainer::new(&world.control_plane().kubeconfig_path())
        .await
        .unwrap_or_else(|e| panic!("the kubectl-trellis binary: {e}"));
    let baseline = Step::new("baseline, before any policy");
    if let Err(e) = world.run_step(&baseline).await {
        panic!("case {name}: {e}");
    }
    let steps = steps(&world.addresses());
    let n = steps.len();
    for (i, step) in steps.iter().enumerate() {
        let changes: Vec<String> = step.changes.iter().map(ToString::to_string).collect();
        eprintln!(
            "truth: case {name} step {}/{n}: {} [{}]",
            i + 1,
            step.what,
            changes.join("; ")
        );
        let tables = world
            .run_step(step)
            .await
            .unwrap_or_else(|e| panic!("case {name} step {}/{n}: {e}", i + 1));
        let started = std::time::Instant::now();
        let wrong = explainer.check(&tables).await;
        assert!(
            wrong.is_empty(),
            "case {name} step {}/{n} ({}): kubectl trellis explain disagrees on {} point(s):\n{}",
            i + 1,
            step.what,
            wrong.len(),
            wrong.join("\n")
        );
        eprintln!(
            "truth: case {name} step {}/{n}: kubectl trellis explain agrees on every cell ({:.1?})",
            i + 1,
            started.elapsed()
        );
    }
}

#[test]
fn the_case_list_checks_out_against_the_oracle() {
    assert!(CASES.len() >= 15, "{} cases", CASES.len());
    truth::case::check_case_list(CASES, "pb");
    // Every case mixes in bundles.
    for case in CASES {
        let steps = (case.steps)(&Addresses::synthetic());
        assert!(
            steps.iter().flat_map(|s| &s.changes).any(|c| matches!(
                c,
                truth::Change::ApplyBundle(_) | truth::Change::DeleteBundle { .. }
            )),
            "case {} has no PolicyBundle",
            case.name
        );
    }
}

trellis_e2e::truth_cases!(
    // Admin before NetworkPolicy
    admin_deny_beats_networkpolicy_allow,
    admin_allow_beats_networkpolicy_isolation,
    admin_pass_defers_to_networkpolicy,
    admin_egress_deny_beats_networkpolicy_egress,
    admin_egress_pass_then_networkpolicy_egress,
    // Order
    admin_priorities_order_bundles,
    same_priority_goes_by_name,
    first_match_within_a_bundle,
    // Baseline after NetworkPolicy
    baseline_loses_to_networkpolicy,
    baseline_pass_leaves_it_to_the_default,
    every_stage_in_one_namespace,
    // Both ends
    admin_egress_allow_and_networkpolicy_ingress_deny,
    // Peers and ports
    admin_named_ports,
    admin_port_range,
    admin_ip_block_of_the_pool,
    subject_by_namespace_and_pod,
    // Changes over time
    bundle_update_and_delete,
    pod_label_moves_the_subject,
    namespace_label_moves_the_peer,
);

// ---------------------------------------------------------------------------------------------
// Building blocks

/// `{"namespaceSelector": {"matchLabels": {"ns": ns}}}`: the subject "every pod of `ns`".
fn pods_of(ns: &str) -> serde_json::Value {
    json!({"namespaceSelector": {"matchLabels": {"ns": ns}}})
}

/// The peer "every pod of namespace `ns`".
fn namespace_peer(ns: &str) -> serde_json::Value {
    json!({"namespaces": {"matchLabels": {"ns": ns}}})
}

/// The peer "every pod".
fn everyone() -> serde_json::Value {
    json!({"namespaces": {}})
}

/// An Admin or Baseline bundle `name` with one ingress rule into namespace `into`.
fn into_namespace(
    name: &str,
    tier: &str,
    priority: i32,
    into: &str,
    action: &str,
    peers: serde_json::Value,
    ports: serde_json::Value,
) -> PolicyBundle {
    bundle(
        name,
        json!({
            "tier": tier, "priority": priority,
            "subject": pods_of(into),
            "ingress": [{"name": format!("{}-rule", action.to_ascii_lowercase()),
                         "action": action, "peers": peers, "ports": ports}],
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// Admin before NetworkPolicy

fn admin_deny_beats_networkpolicy_allow(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("y takes ingress from x and z only").apply(policy(
            "y",
            "from-x-and-z",
            json!({"podSelector": {},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}},
                                         {"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
        )),
        Step::new("Admin: nothing from z into y on TCP 80, whatever y allows").apply_bundle(
            into_namespace(
                "trellis-no-z-to-y-80",
                "Admin",
                10,
                "y",
                "Deny",
                json!([namespace_peer("z")]),
                json!([{"protocol": "TCP", "port": 80}]),
            ),
        ),
    ]
}

fn admin_allow_beats_networkpolicy_isolation(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("deny all ingress in x").apply(policy(
            "x",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        )),
        Step::new("Admin: x/a takes 81 (TCP and UDP) from y, though x isolates it").apply_bundle(
            bundle(
                "trellis-y-to-x-a-81",
                json!({
                    "tier": "Admin", "priority": 10,
                    "subject": {"namespaceSelector": {"matchLabels": {"ns": "x"}},
                                "podSelector": {"matchLabels": {"pod": "a"}}},
                    "ingress": [{"action": "Allow", "peers": [namespace_peer("y")],
                                 "ports": [{"protocol": "TCP", "port": 81},
                                           {"protocol": "UDP", "port": 81}]}],
                }),
            ),
        ),
    ]
}

fn admin_pass_defers_to_networkpolicy(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("Admin 20: nothing into y").apply_bundle(into_namespace(
            "trellis-deny-into-y",
            "Admin",
            20,
            "y",
            "Deny",
            json!([everyone()]),
            json!([]),
        )),
        Step::new("Admin 10: pass x's traffic into y on (no NetworkPolicy: allowed)").apply_bundle(
            into_namespace(
                "trellis-pass-x-into-y",
                "Admin",
                10,
                "y",
                "Pass",
                json!([namespace_peer("x")]),
                json!([]),
            ),
        ),
        Step::new("y's NetworkPolicy takes only 80: it decides what was passed").apply(policy(
            "y",
            "only-80",
            json!({"podSelector": {},
                   "ingress": [{"ports": [{"protocol": "TCP", "port": 80},
                                          {"protocol": "UDP", "port": 80}]}]}),
        )),
    ]
}

fn admin_egress_deny_beats_networkpolicy_egress(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x's pods send only to y and z").apply(policy(
            "x",
            "egress-to-y-and-z",
            json!({"podSelector": {}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                                      {"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
        )),
        Step::new("Admin: no UDP from x to z").apply_bundle(bundle(
            "trellis-no-udp-x-to-z",
            json!({
                "tier": "Admin", "priority": 100,
                "subject": pods_of("x"),
                "egress": [{"name": "no-udp", "action": "Deny", "peers": [namespace_peer("z")],
                            "ports": [{"protocol": "UDP"}]}],
            }),
        )),
    ]
}

fn admin_egress_pass_then_networkpolicy_egress(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("Admin: x sends to nobody but y (passed on)")
            .apply_bundle(bundle(
                "trellis-x-egress-pass-y",
                json!({
                    "tier": "Admin", "priority": 10,
                    "subject": pods_of("x"),
                    "egress": [{"action": "Pass", "peers": [namespace_peer("y")]}],
                }),
            ))
            .apply_bundle(bundle(
                "trellis-x-egress-deny",
                json!({
                    "tier": "Admin", "priority": 20,
                    "subject": pods_of("x"),
                    "egress": [{"action": "Deny", "peers": [everyone()]}],
                }),
            )),
        Step::new("x's NetworkPolicy sends to y on 81 only").apply(policy(
            "x",
            "egress-81",
            json!({"podSelector": {}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                               "ports": [{"protocol": "TCP", "port": 81},
                                         {"protocol": "UDP", "port": 81}]}]}),
        )),
    ]
}

// ---------------------------------------------------------------------------------------------
// Order

fn admin_priorities_order_bundles(_: &Addresses) -> Vec<Step> {
    let allow_z_a = |priority: i32| {
        bundle(
            "trellis-allow-z-a",
            json!({
                "tier": "Admin", "priority": priority,
                "subject": pods_of("y"),
                "ingress": [{"action": "Allow",
                             "peers": [{"pods": {"namespaceSelector": {"matchLabels": {"ns": "z"}},
                                                 "podSelector": {"matchLabels": {"pod": "a"}}}}]}],
            }),
        )
    };
    vec![
        Step::new("Admin 10 allows z/a into y, Admin 20 denies all of z")
            .apply_bundle(allow_z_a(10))
            .apply_bundle(into_namespace(
                "trellis-deny-z",
                "Admin",
                20,
                "y",
                "Deny",
                json!([namespace_peer("z")]),
                json!([]),
            )),
        Step::new("the allow moves to priority 30: the deny comes first")
            .apply_bundle(allow_z_a(30)),
    ]
}

fn same_priority_goes_by_name(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("priority 10 both: trellis-a-allow (z) before trellis-b-deny (x and z)")
            .apply_bundle(into_namespace(
                "trellis-a-allow",
                "Admin",
                10,
                "y",
                "Allow",
                json!([namespace_peer("z")]),
                json!([]),
            ))
            .apply_bundle(into_namespace(
                "trellis-b-deny",
                "Admin",
                10,
                "y",
                "Deny",
                json!([namespace_peer("x"), namespace_peer("z")]),
                json!([]),
            )),
        Step::new("without the allow, the deny decides for z too").delete_bundle("trellis-a-allow"),
    ]
}

fn first_match_within_a_bundle(_: &Addresses) -> Vec<Step> {
    let rules = |allow_first: bool| {
        let allow = json!({"name": "a-on-80", "action": "Allow",
                           "peers": [{"pods": {"podSelector": {"matchLabels": {"pod": "a"}}}}],
                           "ports": [{"protocol": "TCP", "port": 80}]});
        let deny = json!({"name": "nobody", "action": "Deny", "peers": [everyone()]});
        let ingress = if allow_first {
            json!([allow, deny])
        } else {
            json!([deny, allow])
        };
        bundle(
            "trellis-c-ordered",
            json!({"tier": "Admin", "priority": 50,
                   "subject": {"podSelector": {"matchLabels": {"pod": "c"}}},
                   "ingress": ingress}),
        )
    };
    vec![
        Step::new("c pods: allow a's pods on TCP 80, then deny everyone").apply_bundle(rules(true)),
        Step::new("the same rules the other way round: the deny matches first")
            .apply_bundle(rules(false)),
    ]
}

// ---------------------------------------------------------------------------------------------
// Baseline after NetworkPolicy

fn baseline_loses_to_networkpolicy(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("Baseline: nothing into z").apply_bundle(into_namespace(
            "trellis-baseline-z",
            "Baseline",
            1000,
            "z",
            "Deny",
            json!([everyone()]),
            json!([]),
        )),
        Step::new("z's NetworkPolicy opens z/a to x: it decides for z/a only").apply(policy(
            "z",
            "a-from-x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}]}]}),
        )),
    ]
}

fn baseline_pass_leaves_it_to_the_default(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("Baseline 20: nothing into x").apply_bundle(into_namespace(
            "trellis-baseline-x",
            "Baseline",
            20,
            "x",
            "Deny",
            json!([everyone()]),
            json!([]),
        )),
        Step::new("Baseline 10: b pods passed on to the default (allowed)").apply_bundle(
            into_namespace(
                "trellis-baseline-pass-b",
                "Baseline",
                10,
                "x",
                "Pass",
                json!([{"pods": {"podSelector": {"matchLabels": {"pod": "b"}}}}]),
                json!([]),
            ),
        ),
    ]
}

fn every_stage_in_one_namespace(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new(
            "Admin: pass x into y, deny z into y on TCP; NetworkPolicy on y/a; Baseline: no x",
        )
        .apply_bundle(into_namespace(
            "trellis-stage-pass-x",
            "Admin",
            10,
            "y",
            "Pass",
            json!([namespace_peer("x")]),
            json!([]),
        ))
        .apply_bundle(into_namespace(
            "trellis-stage-deny-z-tcp",
            "Admin",
            20,
            "y",
            "Deny",
            json!([namespace_peer("z")]),
            json!([{"protocol": "TCP"}]),
        ))
        .apply(policy(
            "y",
            "a-from-x-80",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}],
                                    "ports": [{"protocol": "TCP", "port": 80},
                                              {"protocol": "UDP", "port": 80}]}]}),
        ))
        .apply_bundle(into_namespace(
            "trellis-stage-baseline-no-x",
            "Baseline",
            10,
            "y",
            "Deny",
            json!([namespace_peer("x")]),
            json!([]),
        )),
        Step::new("without the Admin pass, x falls through to the Baseline (and y/a's policy)")
            .delete_bundle("trellis-stage-pass-x")
            .delete_bundle("trellis-stage-deny-z-tcp"),
    ]
}

// ---------------------------------------------------------------------------------------------
// Both ends

fn admin_egress_allow_and_networkpolicy_ingress_deny(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("y sends nothing").apply(policy(
            "y",
            "deny-egress",
            json!({"podSelector": {}, "policyTypes": ["Egress"]}),
        )),
        Step::new("Admin: y may send to z").apply_bundle(bundle(
            "trellis-y-egress-to-z",
            json!({"tier": "Admin", "priority": 5, "subject": pods_of("y"),
                   "egress": [{"action": "Allow", "peers": [namespace_peer("z")]}]}),
        )),
        Step::new("z takes nothing: the receiver's ingress still decides").apply(policy(
            "z",
            "deny-ingress",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        )),
    ]
}

// ---------------------------------------------------------------------------------------------
// Peers and ports

fn admin_named_ports(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("Admin: no serve-81-tcp or serve-80-udp from y, into any pod").apply_bundle(
            bundle(
                "trellis-named-ports",
                json!({"tier": "Admin", "priority": 10,
                       "ingress": [{"action": "Deny", "peers": [namespace_peer("y")],
                                    "ports": [{"protocol": "TCP", "port": "serve-81-tcp"},
                                              {"protocol": "UDP", "port": "serve-80-udp"}]}]}),
            ),
        ),
        Step::new("a name on the wrong protocol names no port: serve-81-tcp on UDP").apply_bundle(
            bundle(
                "trellis-named-ports",
                json!({"tier": "Admin", "priority": 10,
                       "ingress": [{"action": "Deny", "peers": [namespace_peer("y")],
                                    "ports": [{"protocol": "UDP", "port": "serve-81-tcp"},
                                              {"protocol": "UDP", "port": "serve-80-udp"}]}]}),
            ),
        ),
    ]
}

fn admin_port_range(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("Admin: no UDP 80-81 from x into z").apply_bundle(into_namespace(
            "trellis-udp-range",
            "Admin",
            10,
            "z",
            "Deny",
            json!([namespace_peer("x")]),
            json!([{"protocol": "UDP", "port": 80, "endPort": 81}]),
        )),
        Step::new("the range starts at 81 now").apply_bundle(into_namespace(
            "trellis-udp-range",
            "Admin",
            10,
            "z",
            "Deny",
            json!([namespace_peer("x")]),
            json!([{"protocol": "UDP", "port": 81, "endPort": 90}]),
        )),
    ]
}

fn admin_ip_block_of_the_pool(a: &Addresses) -> Vec<Step> {
    // The /16 every pod address is in (the sandbox's IPPool).
    let pool = a.cidr("x/a", 16);
    vec![
        Step::new("deny all ingress in y").apply(policy(
            "y",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        )),
        Step::new(format!("Admin: y takes TCP 80 from {pool}")).apply_bundle(into_namespace(
            "trellis-pool-to-y",
            "Admin",
            10,
            "y",
            "Allow",
            json!([{"ipBlock": {"cidr": pool}}]),
            json!([{"protocol": "TCP", "port": 80}]),
        )),
        Step::new(format!("Admin 5: z/b's egress to {pool} on TCP is denied")).apply_bundle(
            bundle(
                "trellis-z-b-no-pool",
                json!({"tier": "Admin", "priority": 5,
                       "subject": {"namespaceSelector": {"matchLabels": {"ns": "z"}},
                                   "podSelector": {"matchLabels": {"pod": "b"}}},
                       "egress": [{"action": "Deny", "peers": [{"ipBlock": {"cidr": pool}}],
                                   "ports": [{"protocol": "TCP"}]}]}),
            ),
        ),
    ]
}

fn subject_by_namespace_and_pod(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("Admin: y/b takes nothing from the a pods of any namespace").apply_bundle(
            bundle(
                "trellis-y-b-no-a",
                json!({"tier": "Admin", "priority": 10,
                       "subject": {"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                   "podSelector": {"matchLabels": {"pod": "b"}}},
                       "ingress": [{"action": "Deny",
                                    "peers": [{"pods": {"podSelector": {"matchLabels": {"pod": "a"}}}}]}]}),
            ),
        ),
        Step::new("the subject by expression: every pod but a, in y and z").apply_bundle(bundle(
            "trellis-y-b-no-a",
            json!({"tier": "Admin", "priority": 10,
                   "subject": {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y", "z"]}]},
                               "podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["a"]}]}},
                   "ingress": [{"action": "Deny",
                                "peers": [{"pods": {"podSelector": {"matchLabels": {"pod": "a"}}}}]}]}),
        )),
    ]
}

// ---------------------------------------------------------------------------------------------
// Changes over time

fn bundle_update_and_delete(_: &Addresses) -> Vec<Step> {
    let deny_from = |peer: &str| {
        into_namespace(
            "trellis-into-x",
            "Admin",
            10,
            "x",
            "Deny",
            json!([namespace_peer(peer)]),
            json!([]),
        )
    };
    vec![
        Step::new("Admin: nothing from y into x").apply_bundle(deny_from("y")),
        Step::new("updated: nothing from z into x").apply_bundle(deny_from("z")),
        Step::new("deleted: everything flows again").delete_bundle("trellis-into-x"),
    ]
}

fn pod_label_moves_the_subject(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("Admin: pods labelled role=locked take nothing; y/c gets the label")
            .apply_bundle(bundle(
                "trellis-locked",
                json!({"tier": "Admin", "priority": 10,
                       "subject": {"podSelector": {"matchLabels": {"role": "locked"}}},
                       "ingress": [{"action": "Deny", "peers": [everyone()]}]}),
            ))
            .label_pod("y/c", "role", "locked"),
        Step::new("x/a is locked too").label_pod("x/a", "role", "locked"),
        Step::new("y/c is unlocked").unlabel_pod("y/c", "role"),
    ]
}

fn namespace_label_moves_the_peer(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("Admin: x takes nothing from namespaces team=red; z is red")
            .apply_bundle(into_namespace(
                "trellis-no-red-into-x",
                "Admin",
                10,
                "x",
                "Deny",
                json!([{"namespaces": {"matchLabels": {"team": "red"}}}]),
                json!([]),
            ))
            .label_namespace("z", "team", "red"),
        Step::new("z is no longer red, y is")
            .unlabel_namespace("z", "team")
            .label_namespace("y", "team", "red"),
    ]
}
