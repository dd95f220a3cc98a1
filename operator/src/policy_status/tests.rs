//! The rollup against hand-built clusters: which nodes are desired,
//! realised and lagging, and what each condition says.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use trellis_api::v1alpha1::{
    IpBlock, LabelSelector as TLabelSelector, NetworkStatusStatus, Peer, PolicyBundleSpec,
    PolicyPort, PolicyRule, RuleAction, SecurityIdentitySpec, Subject, Tier,
};

use super::*;
use crate::test_support::mk_shard;

fn time(s: &str) -> Time {
    serde_json::from_value(serde_json::Value::String(s.into())).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A bundle selecting pods with `app=<app>` (every pod when `app` is empty)
/// that denies ingress from 192.0.2.0/24.
fn mk_bundle(name: &str, app: &str, generation: i64) -> PolicyBundle {
    let pod_selector = if app.is_empty() {
        TLabelSelector::default()
    } else {
        TLabelSelector {
            match_labels: labels(&[("app", app)]),
            ..TLabelSelector::default()
        }
    };
    let mut b = PolicyBundle::new(
        name,
        PolicyBundleSpec {
            tier: Tier::Admin,
            priority: 10,
            subject: Subject {
                namespace_selector: TLabelSelector::default(),
                pod_selector,
            },
            ingress: vec![PolicyRule {
                name: None,
                action: RuleAction::Deny,
                peers: vec![Peer {
                    ip_block: Some(IpBlock {
                        cidr: "192.0.2.0/24".into(),
                        except: vec![],
                    }),
                    ..Peer::default()
                }],
                ports: vec![],
            }],
            egress: vec![],
        },
    );
    b.metadata.uid = Some(format!("uid-{name}"));
    b.metadata.generation = Some(generation);
    b
}

fn mk_identity(id: u32, app: &str) -> SecurityIdentity {
    SecurityIdentity::new(
        &id.to_string(),
        SecurityIdentitySpec {
            namespace: "shop".into(),
            namespace_labels: labels(&[("kubernetes.io/metadata.name", "shop")]),
            pod_labels: labels(&[("app", app)]),
        },
    )
}

fn mk_status(node: &str, ready: bool, hash: &str) -> NetworkStatus {
    let mut s = NetworkStatus::new(node, Default::default());
    s.status = Some(NetworkStatusStatus {
        policy_hash: Some(hash.to_owned()),
        conditions: vec![Condition {
            type_: NETWORKSTATUS_POLICY_READY.into(),
            status: if ready { "True" } else { "False" }.into(),
            reason: "Test".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: time("2026-01-01T00:00:00Z"),
        }],
        ..NetworkStatusStatus::default()
    });
    s
}

struct Cluster {
    bundles: Vec<PolicyBundle>,
    statuses: Vec<NetworkStatus>,
    endpoints: Vec<NodeEndpoints>,
    identities: Vec<SecurityIdentity>,
}

impl Cluster {
    fn input(&self) -> Input<'_> {
        Input {
            enforcement: PolicyEnforcement::Default,
            policies: &[],
            bundles: &self.bundles,
            statuses: &self.statuses,
            endpoints: &self.endpoints,
            identities: &self.identities,
        }
    }

    /// The hash of the current set, computed independently of the rollup.
    fn hash(&self) -> String {
        policy_hash(PolicyEnforcement::Default, &[], &self.bundles)
    }

    fn status_of(&self, name: &str) -> PolicyBundleStatus {
        let out = rollup(&self.input(), &time("2026-02-01T00:00:00Z"));
        out.statuses
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
            .expect("a status for the bundle")
    }
}

fn cond<'a>(status: &'a PolicyBundleStatus, type_: &str) -> &'a Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status:?}"))
}

/// Identities 300 (app=web) and 301 (app=db); nodes a, b host web pods, c
/// hosts only db, d hosts web but has no NetworkStatus.
#[test]
fn desired_realised_and_lagging_nodes() {
    struct Case {
        what: &'static str,
        /// (node, PolicyReady, reports the current hash)
        reports: Vec<(&'static str, bool, bool)>,
        desired: i32,
        realized: i32,
        lagging: Vec<&'static str>,
        realized_cond: (&'static str, &'static str),
    }
    let cases = [
        Case {
            what: "every node hosting a web pod enforces the set",
            reports: vec![
                ("a", true, true),
                ("b", true, true),
                ("c", true, false),
                ("d", true, true),
            ],
            desired: 3,
            realized: 3,
            lagging: vec![],
            realized_cond: ("True", reason::ALL_NODES_ENFORCE),
        },
        Case {
            what: "an old hash, PolicyReady False and no NetworkStatus all lag",
            reports: vec![("a", true, true), ("b", false, true)],
            desired: 3,
            realized: 1,
            lagging: vec!["b", "d"],
            realized_cond: ("False", reason::NODES_LAGGING),
        },
        Case {
            what: "a stale hash lags even with PolicyReady True",
            reports: vec![("a", true, false), ("b", true, true), ("d", true, true)],
            desired: 3,
            realized: 2,
            lagging: vec!["a"],
            realized_cond: ("False", reason::NODES_LAGGING),
        },
    ];
    for case in cases {
        let bundles = vec![mk_bundle("protect-web", "web", 3)];
        let current = policy_hash(PolicyEnforcement::Default, &[], &bundles);
        let cluster = Cluster {
            statuses: case
                .reports
                .iter()
                .map(|(n, ready, fresh)| {
                    mk_status(
                        n,
                        *ready,
                        if *fresh {
                            current.as_str()
                        } else {
                            "v1-0000000000000000"
                        },
                    )
                })
                .collect(),
            bundles,
            endpoints: vec![
                mk_shard("a", &[300, 301]),
                mk_shard("b", &[300]),
                mk_shard("c", &[301]),
                mk_shard("d", &[300]),
            ],
            identities: vec![mk_identity(300, "web"), mk_identity(301, "db")],
        };
        let s = cluster.status_of("protect-web");
        assert_eq!(
            (s.desired_nodes, s.realized_nodes, s.lagging_nodes.clone()),
            (
                case.desired,
                case.realized,
                case.lagging.iter().map(|n| (*n).to_owned()).collect()
            ),
            "{}",
            case.what
        );
        let r = cond(&s, POLICYBUNDLE_REALIZED);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            case.realized_cond,
            "{}: {}",
            case.what,
            r.message
        );
        assert_eq!(s.observed_generation, Some(3), "{}", case.what);
        assert_eq!(r.observed_generation, Some(3), "{}", case.what);
    }
}

#[test]
fn the_realized_message_counts_and_names_lagging_nodes() {
    let bundles = vec![mk_bundle("all", "", 3)];
    let current = policy_hash(PolicyEnforcement::Default, &[], &bundles);
    let cluster = Cluster {
        statuses: ["c", "d", "e"]
            .iter()
            .map(|n| mk_status(n, true, &current))
            .collect(),
        bundles,
        endpoints: ["a", "b", "c", "d", "e"]
            .iter()
            .map(|n| mk_shard(n, &[300]))
            .collect(),
        identities: vec![mk_identity(300, "web")],
    };
    let s = cluster.status_of("all");
    assert_eq!(
        cond(&s, POLICYBUNDLE_REALIZED).message,
        "3 of 5 nodes enforce generation 3; lagging: a, b"
    );
}

#[test]
fn at_most_ten_lagging_names_sorted() {
    let nodes: Vec<String> = (0..25).map(|i| format!("node-{i:02}")).collect();
    let cluster = Cluster {
        bundles: vec![mk_bundle("all", "", 1)],
        statuses: vec![],
        endpoints: nodes.iter().map(|n| mk_shard(n, &[300])).collect(),
        identities: vec![mk_identity(300, "web")],
    };
    let s = cluster.status_of("all");
    assert_eq!((s.desired_nodes, s.realized_nodes), (25, 0));
    assert_eq!(s.lagging_nodes, nodes[..10].to_vec());
    let message = &cond(&s, POLICYBUNDLE_REALIZED).message;
    assert!(message.ends_with("node-09 and 15 more"), "{message}");
    assert!(!message.contains("node-10"), "{message}");
}

#[test]
fn no_subject_pod_means_nothing_to_enforce() {
    let cluster = Cluster {
        bundles: vec![mk_bundle("protect-web", "web", 1)],
        statuses: vec![],
        // The shard names an identity nobody has published yet, and a db pod.
        endpoints: vec![mk_shard("a", &[999, 301])],
        identities: vec![mk_identity(301, "db")],
    };
    let s = cluster.status_of("protect-web");
    assert_eq!((s.desired_nodes, s.realized_nodes), (0, 0));
    assert!(s.lagging_nodes.is_empty());
    let r = cond(&s, POLICYBUNDLE_REALIZED);
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("True", reason::NO_SUBJECT_PODS)
    );
}

#[test]
fn accepted_is_false_with_the_field_and_the_fix() {
    let mut broken = mk_bundle("broken", "web", 2);
    broken.spec.ingress[0].peers[0] = Peer {
        ip_block: Some(IpBlock {
            cidr: "10.0.0.0/8".into(),
            except: vec!["192.168.0.0/16".into()],
        }),
        ..Peer::default()
    };
    broken.spec.ingress[0].ports = vec![PolicyPort {
        port: None,
        end_port: Some(90),
        ..PolicyPort::default()
    }];
    let cluster = Cluster {
        bundles: vec![broken, mk_bundle("fine", "web", 1)],
        statuses: vec![],
        endpoints: vec![],
        identities: vec![],
    };
    let a = cond(&cluster.status_of("broken"), POLICYBUNDLE_ACCEPTED).clone();
    assert_eq!(
        (a.status.as_str(), a.reason.as_str()),
        ("False", reason::INVALID)
    );
    assert!(
        a.message.starts_with(
            "fix the spec: spec.ingress[0].peers[0].ipBlock.except[0]: except 192.168.0.0/16 is not strictly inside cidr 10.0.0.0/8; \
             spec.ingress[0].ports[0].endPort: endPort needs a numeric port;"
        ),
        "{}",
        a.message
    );
    let ok = cond(&cluster.status_of("fine"), POLICYBUNDLE_ACCEPTED).clone();
    assert_eq!(
        (ok.status.as_str(), ok.reason.as_str()),
        ("True", reason::VALID)
    );
}

#[test]
fn conflicting_names_the_other_bundle() {
    let deny = mk_bundle("a-deny", "web", 1);
    let mut allow = mk_bundle("b-allow", "web", 1);
    allow.spec.ingress[0].action = RuleAction::Allow;
    let mut elsewhere = mk_bundle("c-other-priority", "web", 1);
    elsewhere.spec.priority = 11;
    elsewhere.spec.ingress[0].action = RuleAction::Allow;
    let cluster = Cluster {
        bundles: vec![deny, allow, elsewhere],
        statuses: vec![],
        endpoints: vec![mk_shard("a", &[300])],
        identities: vec![mk_identity(300, "web")],
    };
    for (name, want) in [
        ("a-deny", ("True", reason::SAME_PRIORITY_OVERLAP)),
        ("b-allow", ("True", reason::SAME_PRIORITY_OVERLAP)),
        ("c-other-priority", ("False", reason::NO_CONFLICT)),
    ] {
        let c = cond(&cluster.status_of(name), POLICYBUNDLE_CONFLICTING).clone();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            want,
            "{name}: {}",
            c.message
        );
        if c.status == "True" {
            assert!(
                c.message.contains("a-deny") && c.message.contains("b-allow"),
                "{name}: {}",
                c.message
            );
        }
    }
}

/// Once written, an unchanged status is not written again, and a later
/// change keeps the transition time of conditions whose status stayed.
#[test]
fn only_changed_statuses_are_written_and_transition_times_stay() {
    let t0 = time("2026-02-01T00:00:00Z");
    let t1 = time("2026-02-02T00:00:00Z");
    let mut cluster = Cluster {
        bundles: vec![mk_bundle("all", "", 1)],
        statuses: vec![],
        endpoints: vec![mk_shard("a", &[300])],
        identities: vec![mk_identity(300, "web")],
    };
    let first = rollup(&cluster.input(), &t0);
    assert_eq!(first.statuses.len(), 1);
    cluster.bundles[0].status = Some(first.statuses[0].1.clone());
    assert!(
        rollup(&cluster.input(), &t1).statuses.is_empty(),
        "nothing changed, nothing to write"
    );
    // The node catches up: Realized flips, Accepted keeps its time.
    cluster.statuses = vec![mk_status("a", true, &cluster.hash())];
    let second = rollup(&cluster.input(), &t1);
    let s = &second.statuses[0].1;
    assert_eq!((s.desired_nodes, s.realized_nodes), (1, 1));
    assert_eq!(cond(s, POLICYBUNDLE_REALIZED).last_transition_time, t1);
    assert_eq!(cond(s, POLICYBUNDLE_ACCEPTED).last_transition_time, t0);
}

/// Editing any bundle changes the hash, so nodes that have not caught up
/// lag for every bundle (they do not enforce the whole current set).
#[test]
fn an_edit_makes_nodes_on_the_old_hash_lag() {
    let before = vec![mk_bundle("all", "", 1), mk_bundle("web", "web", 1)];
    let old = policy_hash(PolicyEnforcement::Default, &[], &before);
    let mut after = before.clone();
    after[1].metadata.generation = Some(2);
    let cluster = Cluster {
        bundles: after,
        statuses: vec![mk_status("a", true, &old)],
        endpoints: vec![mk_shard("a", &[300])],
        identities: vec![mk_identity(300, "web")],
    };
    for name in ["all", "web"] {
        let s = cluster.status_of(name);
        assert_eq!(s.lagging_nodes, vec!["a".to_owned()], "{name}");
    }
}
