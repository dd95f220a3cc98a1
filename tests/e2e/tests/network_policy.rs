//! NetworkPolicy truth tables on the sandbox, the upstream Kubernetes e2e model
//! (`test/e2e/network/netpol`): namespaces x, y, z with pods a, b, c each, spread over three
//! nodes, every pod serving TCP and UDP on 80 and 81. A case is a list of steps; each step
//! changes the cluster (policies applied, updated or deleted, labels set on pods or
//! namespaces), and then every pod probes every pod on each (protocol, port) and the table of
//! what got through must equal the table the oracle (`trellis_e2e::truth::oracle`, Kubernetes
//! semantics written independently of Trellis' compiler) computes from the apiserver's
//! objects. A failure prints both tables, upstream style, with every differing cell and why the
//! oracle decided as it did.
//!
//! - `without_policies_every_pod_reaches_every_pod`: with no policy Kubernetes allows
//!   everything. It also checks the harness's plumbing: each kind of change reaches the
//!   apiserver and comes back to the oracle (without probing it).
//! - `the_case_list_checks_out_against_the_oracle` needs no sandbox (nor root): every case
//!   builds, names only objects of the world, and each of its steps changes the truth.
//! - `datapath::*`: the case list, each case in a sandbox of its own; one with
//!   `cargo test -p trellis-e2e --test network_policy -- --exact datapath::deny_all_ingress`.
//!   A step that only applies or deletes policies is checked strictly once every node reports
//!   it enforces them (PolicyReady with their policyHash): any differing cell fails at once. A
//!   step that changes labels is probed until the tables match (no status says when a pod's
//!   new identity reached the other nodes), for up to 30 s.
//!
//! Each sandboxed test has its own state dir, `/tmp/trellis-e2e-np-<case>`. Needs root.

use serde_json::json;
use trellis_e2e::truth::{
    self, Addresses, Case, Enforcement, Step, World, expected_tables, policy,
};

/// Starts the world in its own sandbox and runs `steps` as case `name`.
async fn run(name: &'static str, steps: fn(&Addresses) -> Vec<Step>) {
    let world = World::start(&format!("np-{name}"))
        .await
        .unwrap_or_else(|e| panic!("the truth-table world for {name} starts: {e}"));
    world.run(&Case { name, steps }).await;
}

// ---------------------------------------------------------------------------------------------
// Runs today

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_policies_every_pod_reaches_every_pod() {
    let world = World::start("np-baseline")
        .await
        .unwrap_or_else(|e| panic!("the truth-table world starts: {e}"));
    let snapshot = world.snapshot().await.expect("snapshot");
    assert_eq!(snapshot.pods.len(), 9);
    assert!(snapshot.policies.is_empty(), "{:?}", snapshot.policies);
    // The oracle selects namespaces by the labels the apiserver holds, including the one it
    // adds itself.
    for ns in &snapshot.namespaces {
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        let name = ns.metadata.name.clone().unwrap_or_default();
        assert_eq!(labels.get("ns"), Some(&name));
        assert_eq!(labels.get("kubernetes.io/metadata.name"), Some(&name));
    }
    // Every namespace has a pod on every node.
    for ns in truth::NAMESPACES {
        let mut nodes: Vec<String> = snapshot
            .pods
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(ns))
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        nodes.sort();
        assert_eq!(
            nodes,
            ["trellis-node-1", "trellis-node-2", "trellis-node-3"],
            "{ns}"
        );
    }
    let tables = world
        .run_step(&Step::new("no policies: everything is allowed"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tables.len(), 4);
    for table in &tables {
        assert_eq!(table.expected_allowed_count(), 81, "{table}");
        assert!(table.matches(), "{table}");
    }

    // The harness's own plumbing, which needs no enforcement: every kind of change reaches the
    // apiserver, and the oracle reads it back as the apiserver holds it (defaults included).
    let step = Step::new("plumbing")
        .apply(policy("x", "deny-all", json!({"podSelector": {}})))
        .label_pod("y/b", "role", "client")
        .label_namespace("z", "team", "blue");
    world.change(&step.changes).await.expect("change");
    let enforcement = world
        .wait_policy_applied(&step.changes)
        .await
        .expect("wait");
    assert_eq!(enforcement, Enforcement::Unconfirmed);
    let snapshot = world.snapshot().await.expect("snapshot");
    let deny = snapshot
        .policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("deny-all"))
        .expect("the policy is served");
    assert_eq!(
        deny.spec.as_ref().and_then(|s| s.policy_types.clone()),
        Some(vec!["Ingress".to_string()]),
        "the apiserver defaults policyTypes"
    );
    let label = |labels: &Option<std::collections::BTreeMap<String, String>>, key: &str| {
        labels.as_ref().and_then(|l| l.get(key).cloned())
    };
    let y_b = snapshot
        .pods
        .iter()
        .find(|p| {
            p.metadata.namespace.as_deref() == Some("y") && p.metadata.name.as_deref() == Some("b")
        })
        .expect("y/b");
    assert_eq!(
        label(&y_b.metadata.labels, "role").as_deref(),
        Some("client")
    );
    let z = snapshot
        .namespaces
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some("z"))
        .expect("z");
    assert_eq!(label(&z.metadata.labels, "team").as_deref(), Some("blue"));
    for table in expected_tables(&snapshot, &truth::all_grids()) {
        // Nothing but x's own pods reaches x's pods: 3 columns of 8 senders each are denied.
        assert_eq!(table.expected_allowed_count(), 81 - 3 * 8, "{table}");
    }
    let undo = Step::new("undo")
        .delete("x", "deny-all")
        .unlabel_pod("y/b", "role")
        .unlabel_namespace("z", "team");
    world.change(&undo.changes).await.expect("undo");
    world
        .wait_policy_applied(&undo.changes)
        .await
        .expect("wait");
    let snapshot = world.snapshot().await.expect("snapshot");
    assert!(snapshot.policies.is_empty());
    assert!(
        snapshot
            .namespaces
            .iter()
            .all(|n| label(&n.metadata.labels, "team").is_none())
    );
    world
        .run_step(&Step::new("no policies again").on(&[truth::Grid::new(truth::Protocol::Udp, 81)]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_case_list_checks_out_against_the_oracle() {
    assert!(CASES.len() >= 30, "{} cases", CASES.len());
    truth::case::check_case_list(CASES, "np");
}

// ---------------------------------------------------------------------------------------------
// The case list

trellis_e2e::truth_cases!(
    // Default deny and allow-all
    deny_all_ingress,
    deny_all_egress,
    deny_all_ingress_and_egress,
    deny_all_in_every_namespace,
    allow_all_ingress_over_deny_all,
    allow_all_egress_over_deny_all,
    empty_ingress_list_denies,
    // Peers by pod and namespace
    allow_from_same_namespace,
    allow_from_namespace_by_label,
    allow_from_namespace_by_name,
    allow_from_pod_label_in_every_namespace,
    allow_from_pod_and_namespace,
    allow_from_pod_or_namespace,
    allow_from_namespace_not_in,
    allow_from_pods_by_expression,
    select_pods_by_expression,
    // Ports
    allow_ingress_on_port_80,
    allow_ingress_on_port_81_from_namespace,
    allow_ingress_udp_only,
    allow_ingress_on_named_port,
    allow_ingress_on_named_udp_port,
    allow_ingress_port_range,
    allow_ingress_port_range_past_80,
    // Egress
    allow_egress_to_namespace,
    allow_egress_on_named_port,
    allow_egress_port_range,
    egress_only_leaves_ingress_open,
    ingress_and_egress_in_one_policy,
    default_policy_types_with_egress_rules,
    ingress_policy_type_ignores_egress_rules,
    both_sides_must_allow,
    // ipBlock
    ip_block_ingress,
    ip_block_except_ingress,
    ip_block_except_egress,
    ip_block_egress_with_port,
    // Several policies
    multiple_policies_add_up,
    ingress_and_egress_in_separate_policies,
    policy_in_one_namespace_leaves_others_alone,
    // Changes over time
    policy_update_changes_the_peers,
    policy_delete_restores_traffic,
    policy_delete_one_of_two,
    pod_label_added_then_removed,
    pod_label_moves_isolation,
    namespace_label_added_then_removed,
);

fn deny_all(namespace: &str, types: &[&str]) -> k8s_openapi::api::networking::v1::NetworkPolicy {
    let name = format!("deny-all-{}", types.join("-").to_ascii_lowercase());
    policy(
        namespace,
        &name,
        json!({"podSelector": {}, "policyTypes": types}),
    )
}

fn deny_all_ingress(_: &Addresses) -> Vec<Step> {
    vec![Step::new("deny all ingress in x").apply(deny_all("x", &["Ingress"]))]
}

fn deny_all_egress(_: &Addresses) -> Vec<Step> {
    vec![Step::new("deny all egress in x").apply(deny_all("x", &["Egress"]))]
}

fn deny_all_ingress_and_egress(_: &Addresses) -> Vec<Step> {
    vec![Step::new("deny all ingress and egress in x").apply(deny_all("x", &["Ingress", "Egress"]))]
}

fn deny_all_in_every_namespace(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("deny all ingress and egress everywhere: only loopback")
            .apply(deny_all("x", &["Ingress", "Egress"]))
            .apply(deny_all("y", &["Ingress", "Egress"]))
            .apply(deny_all("z", &["Ingress", "Egress"])),
    ]
}

fn allow_all_ingress_over_deny_all(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("deny all ingress in x").apply(deny_all("x", &["Ingress"])),
        Step::new("and allow all ingress in x: policies add up").apply(policy(
            "x",
            "allow-all-ingress",
            json!({"podSelector": {}, "ingress": [{}]}),
        )),
    ]
}

fn allow_all_egress_over_deny_all(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("deny all egress in x").apply(deny_all("x", &["Egress"])),
        Step::new("and allow all egress in x").apply(policy(
            "x",
            "allow-all-egress",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
        )),
    ]
}

fn empty_ingress_list_denies(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a with an empty ingress list: isolated, nothing allowed").apply(policy(
            "x",
            "no-rules",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": []}),
        )),
    ]
}

fn allow_from_same_namespace(_: &Addresses) -> Vec<Step> {
    vec![Step::new("x admits its own pods only").apply(policy(
        "x",
        "from-own-namespace",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
    ))]
}

fn allow_from_namespace_by_label(_: &Addresses) -> Vec<Step> {
    vec![Step::new("x/a admits namespace ns=y").apply(policy(
        "x",
        "from-y",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
        }),
    ))]
}

fn allow_from_namespace_by_name(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x admits z by kubernetes.io/metadata.name").apply(policy(
            "x",
            "from-z",
            json!({
                "podSelector": {},
                "ingress": [{"from": [{"namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": "z"}}}]}],
            }),
        )),
    ]
}

fn allow_from_pod_label_in_every_namespace(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a admits pod=b in every namespace").apply(policy(
            "x",
            "from-b-anywhere",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{
                    "namespaceSelector": {},
                    "podSelector": {"matchLabels": {"pod": "b"}},
                }]}],
            }),
        )),
    ]
}

fn allow_from_pod_and_namespace(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a admits pod=b in ns y or z (one peer: both must hold)").apply(policy(
            "x",
            "from-b-in-y-z",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{
                    "namespaceSelector": {"matchExpressions": [
                        {"key": "ns", "operator": "In", "values": ["y", "z"]}]},
                    "podSelector": {"matchLabels": {"pod": "b"}},
                }]}],
            }),
        )),
    ]
}

fn allow_from_pod_or_namespace(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a admits ns y, or pod=b of x (two peers: either)").apply(policy(
            "x",
            "from-y-or-b",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                    {"podSelector": {"matchLabels": {"pod": "b"}}},
                ]}],
            }),
        )),
    ]
}

fn allow_from_namespace_not_in(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a admits every namespace but x (NotIn)").apply(policy(
            "x",
            "from-not-x",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                    {"key": "ns", "operator": "NotIn", "values": ["x"]}]}}]}],
            }),
        )),
    ]
}

fn allow_from_pods_by_expression(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a admits pod In (b) and Exists pod in x").apply(policy(
            "x",
            "from-b-by-expression",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                    {"key": "pod", "operator": "In", "values": ["b"]},
                    {"key": "pod", "operator": "Exists"},
                ]}}]}],
            }),
        )),
    ]
}

fn select_pods_by_expression(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("deny ingress to x's pods NotIn (a)").apply(policy(
            "x",
            "deny-but-a",
            json!({
                "podSelector": {"matchExpressions": [
                    {"key": "pod", "operator": "NotIn", "values": ["a"]}]},
                "policyTypes": ["Ingress"],
            }),
        )),
    ]
}

fn allow_ingress_on_port_80(_: &Addresses) -> Vec<Step> {
    vec![Step::new("x/a admits TCP 80 only").apply(policy(
        "x",
        "tcp-80",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [{"port": 80}]}],
        }),
    ))]
}

fn allow_ingress_on_port_81_from_namespace(_: &Addresses) -> Vec<Step> {
    vec![Step::new("x/a admits ns y on TCP 81").apply(policy(
        "x",
        "y-on-81",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                "ports": [{"protocol": "TCP", "port": 81}],
            }],
        }),
    ))]
}

fn allow_ingress_udp_only(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x admits every UDP port and no TCP").apply(policy(
            "x",
            "udp-only",
            json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]}),
        )),
    ]
}

fn allow_ingress_on_named_port(_: &Addresses) -> Vec<Step> {
    vec![Step::new("x/a admits its port serve-80-tcp").apply(policy(
        "x",
        "named-80",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [{"port": "serve-80-tcp"}]}],
        }),
    ))]
}

fn allow_ingress_on_named_udp_port(_: &Addresses) -> Vec<Step> {
    vec![Step::new("x admits ns z on serve-81-udp").apply(policy(
        "x",
        "z-named-81-udp",
        json!({
            "podSelector": {},
            "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}],
                "ports": [{"protocol": "UDP", "port": "serve-81-udp"}],
            }],
        }),
    ))]
}

fn allow_ingress_port_range(_: &Addresses) -> Vec<Step> {
    vec![Step::new("x/a admits TCP 80-81 (endPort)").apply(policy(
        "x",
        "tcp-80-81",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [{"protocol": "TCP", "port": 80, "endPort": 81}]}],
        }),
    ))]
}

fn allow_ingress_port_range_past_80(_: &Addresses) -> Vec<Step> {
    vec![Step::new("x admits TCP 81-90 and UDP 70-80").apply(policy(
        "x",
        "ranges",
        json!({
            "podSelector": {},
            "ingress": [{"ports": [
                {"protocol": "TCP", "port": 81, "endPort": 90},
                {"protocol": "UDP", "port": 70, "endPort": 80},
            ]}],
        }),
    ))]
}

fn allow_egress_to_namespace(_: &Addresses) -> Vec<Step> {
    vec![Step::new("x/a may send to ns y only").apply(policy(
        "x",
        "to-y",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
        }),
    ))]
}

fn allow_egress_on_named_port(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x may send to the receivers' serve-81-udp only").apply(policy(
            "x",
            "to-named-81-udp",
            json!({
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [{"ports": [{"protocol": "UDP", "port": "serve-81-udp"}]}],
            }),
        )),
    ]
}

fn allow_egress_port_range(_: &Addresses) -> Vec<Step> {
    vec![Step::new("y may send TCP 79-80 only").apply(policy(
        "y",
        "tcp-79-80",
        json!({
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"ports": [{"protocol": "TCP", "port": 79, "endPort": 80}]}],
        }),
    ))]
}

fn egress_only_leaves_ingress_open(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a may send within x only; anyone may still reach it").apply(policy(
            "x",
            "egress-within-x",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"podSelector": {}}]}],
            }),
        )),
    ]
}

fn ingress_and_egress_in_one_policy(_: &Addresses) -> Vec<Step> {
    vec![Step::new("x/a: in from y, out to z").apply(policy(
        "x",
        "in-y-out-z",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}],
        }),
    ))]
}

fn default_policy_types_with_egress_rules(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a with egress rules and no policyTypes: both directions isolated").apply(
            policy(
                "x",
                "defaulted-types",
                json!({
                    "podSelector": {"matchLabels": {"pod": "a"}},
                    "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
                }),
            ),
        ),
    ]
}

fn ingress_policy_type_ignores_egress_rules(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a: policyTypes Ingress; its egress rules do not isolate egress").apply(
            policy(
                "x",
                "ingress-type-only",
                json!({
                    "podSelector": {"matchLabels": {"pod": "a"}},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
                    "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}],
                }),
            ),
        ),
    ]
}

fn both_sides_must_allow(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x admits z, but z/b may send to x/c only")
            .apply(policy(
                "x",
                "from-z",
                json!({"podSelector": {}, "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
            ))
            .apply(policy(
                "z",
                "b-to-x-c",
                json!({
                    "podSelector": {"matchLabels": {"pod": "b"}},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [{
                        "namespaceSelector": {"matchLabels": {"ns": "x"}},
                        "podSelector": {"matchLabels": {"pod": "c"}},
                    }]}],
                }),
            )),
    ]
}

fn ip_block_ingress(a: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a admits y/b's address only (ipBlock /32)").apply(policy(
            "x",
            "from-y-b-address",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"ipBlock": {"cidr": a.host("y/b")}}]}],
            }),
        )),
    ]
}

fn ip_block_except_ingress(a: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a admits the pod network except y/b").apply(policy(
            "x",
            "from-pods-but-y-b",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"ipBlock": {
                    "cidr": a.cidr("x/a", 16),
                    "except": [a.host("y/b")],
                }}]}],
            }),
        )),
    ]
}

fn ip_block_except_egress(a: &Addresses) -> Vec<Step> {
    vec![
        Step::new("z may send to the pod network except x/a's node's block").apply(policy(
            "z",
            "to-pods-but-node-1",
            json!({
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {
                    "cidr": a.cidr("x/a", 16),
                    "except": [a.cidr("x/a", 24)],
                }}]}],
            }),
        )),
    ]
}

fn ip_block_egress_with_port(a: &Addresses) -> Vec<Step> {
    vec![
        Step::new("y/a may send to y/c's address on UDP 81 only").apply(policy(
            "y",
            "to-y-c-udp-81",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "policyTypes": ["Egress"],
                "egress": [{
                    "to": [{"ipBlock": {"cidr": a.host("y/c")}}],
                    "ports": [{"protocol": "UDP", "port": 81}],
                }],
            }),
        )),
    ]
}

fn multiple_policies_add_up(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a admits y on TCP 80, and every x pod admits x/b")
            .apply(policy(
                "x",
                "a-from-y-on-80",
                json!({
                    "podSelector": {"matchLabels": {"pod": "a"}},
                    "ingress": [{
                        "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                        "ports": [{"port": 80}],
                    }],
                }),
            ))
            .apply(policy(
                "x",
                "from-b",
                json!({
                    "podSelector": {},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
                }),
            )),
    ]
}

fn ingress_and_egress_in_separate_policies(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a: ingress from z in one policy, egress to y in another")
            .apply(policy(
                "x",
                "a-in-from-z",
                json!({
                    "podSelector": {"matchLabels": {"pod": "a"}},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}],
                }),
            ))
            .apply(policy(
                "x",
                "a-out-to-y",
                json!({
                    "podSelector": {"matchLabels": {"pod": "a"}},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
                }),
            )),
    ]
}

fn policy_in_one_namespace_leaves_others_alone(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("deny all in y: x and z still talk").apply(deny_all("y", &["Ingress", "Egress"])),
    ]
}

fn policy_update_changes_the_peers(_: &Addresses) -> Vec<Step> {
    let from = |ns: &str, ports: serde_json::Value| {
        policy(
            "x",
            "a-ingress",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{
                    "from": [{"namespaceSelector": {"matchLabels": {"ns": ns}}}],
                    "ports": ports,
                }],
            }),
        )
    };
    vec![
        Step::new("x/a admits y").apply(from("y", json!([]))),
        Step::new("the same policy now admits z instead").apply(from("z", json!([]))),
        Step::new("and only on UDP 81").apply(from("z", json!([{"protocol": "UDP", "port": 81}]))),
    ]
}

fn policy_delete_restores_traffic(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("deny all ingress and egress in x").apply(deny_all("x", &["Ingress", "Egress"])),
        Step::new("delete it: everything allowed again").delete("x", "deny-all-ingress-egress"),
    ]
}

fn policy_delete_one_of_two(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("deny all ingress in x, but admit y")
            .apply(deny_all("x", &["Ingress"]))
            .apply(policy(
                "x",
                "from-y",
                json!({"podSelector": {}, "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
            )),
        Step::new("delete the allow: the deny remains").delete("x", "from-y"),
    ]
}

fn pod_label_added_then_removed(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a admits pods role=client anywhere; there are none").apply(policy(
            "x",
            "from-clients",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{
                    "namespaceSelector": {},
                    "podSelector": {"matchLabels": {"role": "client"}},
                }]}],
            }),
        )),
        Step::new("label the running y/b role=client").label_pod("y/b", "role", "client"),
        Step::new("remove the label again").unlabel_pod("y/b", "role"),
    ]
}

fn pod_label_moves_isolation(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("deny ingress to app=db; x/a is the db")
            .apply(policy(
                "x",
                "deny-db",
                json!({"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}),
            ))
            .label_pod("x/a", "app", "db"),
        Step::new("x/b becomes the db instead")
            .unlabel_pod("x/a", "app")
            .label_pod("x/b", "app", "db"),
    ]
}

fn namespace_label_added_then_removed(_: &Addresses) -> Vec<Step> {
    vec![
        Step::new("x/a admits namespaces team=blue; there are none").apply(policy(
            "x",
            "from-blue",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}],
            }),
        )),
        Step::new("label namespace z team=blue").label_namespace("z", "team", "blue"),
        Step::new("remove the label again").unlabel_namespace("z", "team"),
    ]
}
