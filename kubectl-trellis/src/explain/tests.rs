//! Table-driven: small clusters built from objects as the apiserver serves
//! them, one connection each, the verdict and the deciding rule written out
//! by hand from the semantics (design 0006, docs/policy.md). Every case also
//! goes through the cross-check with the reference evaluator inside
//! `explain` (an `Err` fails the case).

use serde_json::{Value, json};
use trellis_api::v1alpha1::PodEndpoint;

use super::*;

const NODE: &str = "trellis-node-1";

/// A cluster with the sample's pool and one node's shard.
fn cluster(enforcement: PolicyEnforcement) -> Objects {
    let pool: IPPool = serde_json::from_value(json!({
        "apiVersion": "network.trellis.dev/v1alpha1",
        "kind": "IPPool",
        "metadata": {"name": "default-ipv4"},
        "spec": {"cidr": "10.244.0.0/16", "blockSize": 24},
    }))
    .expect("an IPPool");
    let shard: NodeEndpoints = serde_json::from_value(json!({
        "apiVersion": "network.trellis.dev/v1alpha1",
        "kind": "NodeEndpoints",
        "metadata": {"name": NODE},
        "spec": {"endpoints": []},
    }))
    .expect("a NodeEndpoints");
    Objects {
        enforcement,
        pools: vec![pool],
        shards: vec![shard],
        ..Objects::default()
    }
}

/// Adds pod `ns/name` (labelled `pod=<name>`) at `ip` with container ports
/// `ports`; see [`add_pod_with`].
fn add_pod(o: &mut Objects, ns: &str, name: &str, ip: &str, ports: Value) {
    add_pod_with(o, (ns, json!({})), (name, json!({"pod": name})), ip, ports);
}

/// Adds a pod with these labels at `ip` with container ports `ports`, its
/// namespace with these labels (if new; labelled as Kubernetes does too),
/// its identity (as its node would create it) and its shard entry.
fn add_pod_with(
    o: &mut Objects,
    (ns, ns_labels): (&str, Value),
    (name, labels): (&str, Value),
    ip: &str,
    ports: Value,
) {
    if !o
        .namespaces
        .iter()
        .any(|n| n.metadata.name.as_deref() == Some(ns))
    {
        let mut ns_labels = ns_labels;
        ns_labels["kubernetes.io/metadata.name"] = json!(ns);
        o.namespaces.push(
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": ns_labels},
            }))
            .expect("a Namespace"),
        );
    }
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"containers": [{"name": "serve", "image": "serve", "ports": ports}]},
        "status": {"podIPs": [{"ip": ip}]},
    }))
    .expect("a Pod");
    let namespace = o
        .namespaces
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(ns))
        .expect("added above");
    let (labels, named) = objects::pod_labels_and_ports(&pod, namespace).expect("labels");
    let id = 256 + u32::try_from(o.identities.len()).expect("few");
    o.identities
        .push(objects::security_identity(id, &labels).expect("an identity"));
    o.shards[0].spec.endpoints.push(PodEndpoint {
        namespace: ns.into(),
        name: name.into(),
        addresses: vec![ip.into()],
        identity: i32::try_from(id).expect("small"),
        named_ports: named.to_api(),
    });
    o.pods.push(pod);
}

/// Pods a, b, c, d of namespace x, at 10.244.1.1–4, serving TCP 8080 as
/// `http`.
fn four_pods(enforcement: PolicyEnforcement) -> Objects {
    let mut o = cluster(enforcement);
    for (i, p) in ["a", "b", "c", "d"].iter().enumerate() {
        add_pod(
            &mut o,
            "x",
            p,
            &format!("10.244.1.{}", i + 1),
            json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}]),
        );
    }
    o
}

fn policy(ns: &str, name: &str, spec: Value) -> NetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": spec,
    }))
    .expect("a NetworkPolicy")
}

fn bundle(name: &str, spec: Value) -> PolicyBundle {
    serde_json::from_value(json!({
        "apiVersion": "network.trellis.dev/v1alpha1", "kind": "PolicyBundle",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a PolicyBundle")
}

fn query(from: &str, to: &str, port: &str) -> Query {
    Query {
        from: from.parse().expect("from"),
        to: to.parse().expect("to"),
        port: port.parse().expect("port"),
    }
}

/// One connection and what each end must say: (allowed, rule).
struct Case {
    what: &'static str,
    query: Query,
    egress: (bool, &'static str),
    ingress: Option<(bool, &'static str)>,
}

fn check(objects: &Objects, cases: &[Case]) {
    for c in cases {
        let e = explain(objects, &c.query).unwrap_or_else(|e| panic!("{}: {e}", c.what));
        assert_eq!(
            (e.egress.allowed, e.egress.rule.as_str()),
            c.egress,
            "{}: egress\n{e}",
            c.what
        );
        assert_eq!(
            e.ingress.as_ref().map(|s| (s.allowed, s.rule.as_str())),
            c.ingress,
            "{}: ingress\n{e}",
            c.what
        );
        let both = c.egress.0 && c.ingress.is_none_or(|(a, _)| a);
        assert_eq!(e.allowed, both, "{}: verdict\n{e}", c.what);
    }
}

const EGRESS_OPEN: &str =
    "no networkpolicy isolates the pod (egress): allowed (enforcement Default)";
const INGRESS_OPEN: &str =
    "no networkpolicy isolates the pod (ingress): allowed (enforcement Default)";

#[test]
fn an_admin_deny_beats_a_networkpolicy_allow() {
    let mut o = four_pods(PolicyEnforcement::Default);
    o.policies.push(policy(
        "x",
        "allow-all",
        json!({"podSelector": {}, "ingress": [{}]}),
    ));
    o.bundles.push(bundle(
        "protect-a",
        json!({
            "tier": "Admin", "priority": 10,
            "subject": {"podSelector": {"matchLabels": {"pod": "a"}}},
            "ingress": [
                {"name": "from-b-http", "action": "Allow",
                 "peers": [{"pods": {"podSelector": {"matchLabels": {"pod": "b"}}}}],
                 "ports": [{"protocol": "TCP", "port": 8080}]},
                {"name": "deny-all", "action": "Deny", "peers": [{"namespaces": {}}]},
            ],
        }),
    ));
    check(
        &o,
        &[
            Case {
                what: "the NetworkPolicy allows c, the Admin bundle denies first",
                query: query("x/c", "x/a", "8080"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    false,
                    "policybundle protect-a (Admin 10) spec.ingress[1] \"deny-all\" peers[0] (every port)",
                )),
            },
            Case {
                what: "the bundle's own allow comes first for b",
                query: query("x/b", "x/a", "8080/TCP"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    true,
                    "policybundle protect-a (Admin 10) spec.ingress[0] \"from-b-http\" peers[0] ports[0]",
                )),
            },
            Case {
                what: "b on another port: denied",
                query: query("x/b", "x/a", "80"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    false,
                    "policybundle protect-a (Admin 10) spec.ingress[1] \"deny-all\" peers[0] (every port)",
                )),
            },
            Case {
                what: "a pod the bundle does not protect: the NetworkPolicy decides",
                query: query("x/c", "x/b", "80"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    true,
                    "networkpolicy x/allow-all spec.ingress[0] (every peer) (every port)",
                )),
            },
        ],
    );
}

#[test]
fn an_admin_pass_defers_to_networkpolicy() {
    let mut o = four_pods(PolicyEnforcement::Default);
    o.bundles.push(bundle(
        "pass-x",
        json!({
            "tier": "Admin", "priority": 5,
            "subject": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}},
            "ingress": [{"name": "to-namespace-owners", "action": "Pass",
                         "peers": [{"namespaces": {}}]}],
        }),
    ));
    o.policies.push(policy(
        "x",
        "from-b",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    ));
    check(
        &o,
        &[
            Case {
                what: "passed, then allowed by the NetworkPolicy",
                query: query("x/b", "x/a", "80"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    true,
                    "networkpolicy x/from-b spec.ingress[0] from[0] (every port)",
                )),
            },
            Case {
                what: "passed, then isolated by the NetworkPolicy",
                query: query("x/c", "x/a", "80/tcp"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    false,
                    "isolated by networkpolicy x/from-b (ingress), nothing allowed",
                )),
            },
            Case {
                what: "passed, no NetworkPolicy: the mode's default",
                query: query("x/a", "x/c", "80"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((true, INGRESS_OPEN)),
            },
        ],
    );
}

#[test]
fn a_baseline_deny_loses_to_a_networkpolicy() {
    let mut o = four_pods(PolicyEnforcement::Default);
    o.bundles.push(bundle(
        "default-deny",
        json!({
            "tier": "Baseline", "priority": 100,
            "subject": {},
            "ingress": [{"name": "deny-all", "action": "Deny",
                         "peers": [{"namespaces": {}}, {"ipBlock": {"cidr": "0.0.0.0/0"}}]}],
        }),
    ));
    o.policies.push(policy(
        "x",
        "open-a",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                            "ports": [{"port": 80}]}]}),
    ));
    check(
        &o,
        &[
            Case {
                what: "the namespace's NetworkPolicy opens a",
                query: query("x/b", "x/a", "80"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    true,
                    "networkpolicy x/open-a spec.ingress[0] from[0] ports[0]",
                )),
            },
            Case {
                what: "a is isolated by its NetworkPolicy before the baseline",
                query: query("x/c", "x/a", "80"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    false,
                    "isolated by networkpolicy x/open-a (ingress), nothing allowed",
                )),
            },
            Case {
                what: "no NetworkPolicy selects d: the baseline denies",
                query: query("x/b", "x/d", "80"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    false,
                    "policybundle default-deny (Baseline 100) spec.ingress[0] \"deny-all\" peers[0] (every port)",
                )),
            },
        ],
    );
}

#[test]
fn nothing_isolates_and_the_mode_decides() {
    let o = four_pods(PolicyEnforcement::Default);
    check(
        &o,
        &[Case {
            what: "no policy at all",
            query: query("x/a", "x/b", "53/UDP"),
            egress: (true, EGRESS_OPEN),
            ingress: Some((true, INGRESS_OPEN)),
        }],
    );
    let e = explain(&o, &query("x/a", "x/b", "80")).expect("explained");
    assert!(!e.egress.enforced && e.egress.rule_id.is_none());

    let always = four_pods(PolicyEnforcement::Always);
    check(
        &always,
        &[Case {
            what: "enforcement Always, no policy",
            query: query("x/a", "x/b", "80"),
            egress: (false, "default deny (egress, enforcement Always)"),
            ingress: Some((false, "default deny (ingress, enforcement Always)")),
        }],
    );
    let never = {
        let mut o = four_pods(PolicyEnforcement::Never);
        o.policies
            .push(policy("x", "deny", json!({"podSelector": {}})));
        o
    };
    let never_rule = "enforcement Never: no policy is enforced, allowed";
    check(
        &never,
        &[Case {
            what: "enforcement Never ignores a deny-all",
            query: query("x/a", "x/b", "80"),
            egress: (true, never_rule),
            ingress: Some((true, never_rule)),
        }],
    );
}

#[test]
fn a_pod_reaching_itself_is_never_policed() {
    // Even isolated both ways and under Always, by name or by its own address.
    let mut o = four_pods(PolicyEnforcement::Always);
    o.policies.push(policy(
        "x",
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    ));
    for to in ["x/a", "10.244.1.1"] {
        check(
            &o,
            &[Case {
                what: "x/a to itself",
                query: query("x/a", to, "8080"),
                egress: (true, LOOPBACK),
                ingress: Some((true, LOOPBACK)),
            }],
        );
    }
    let e = explain(&o, &query("x/a", "x/a", "80/UDP")).expect("explained");
    assert!(!e.egress.enforced && e.egress.rule_id.is_none() && e.allowed);
    assert_eq!(
        (e.from.address, e.to.address),
        ("10.244.1.1".parse().unwrap(), "10.244.1.1".parse().unwrap())
    );
    // Another pod is still denied.
    check(
        &o,
        &[Case {
            what: "x/a to x/b",
            query: query("x/a", "x/b", "8080"),
            egress: (
                false,
                "isolated by networkpolicy x/deny-all (egress), nothing allowed",
            ),
            ingress: Some((
                false,
                "isolated by networkpolicy x/deny-all (ingress), nothing allowed",
            )),
        }],
    );
}

#[test]
fn an_ipblock_peer_and_an_address_outside_the_cluster() {
    let mut o = four_pods(PolicyEnforcement::Default);
    o.policies.push(policy(
        "x",
        "egress-b",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"],
        "egress": [
            {"to": [{"podSelector": {"matchLabels": {"pod": "a"}}},
                    {"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}],
             "ports": [{"port": 443}]},
        ]}),
    ));
    check(
        &o,
        &[
            Case {
                what: "inside the ipBlock",
                query: query("x/b", "192.0.2.10", "443"),
                egress: (
                    true,
                    "networkpolicy x/egress-b spec.egress[0] to[1] ports[0]",
                ),
                ingress: None,
            },
            Case {
                what: "in its except",
                query: query("x/b", "192.0.2.200", "443"),
                egress: (
                    false,
                    "isolated by networkpolicy x/egress-b (egress), nothing allowed",
                ),
                ingress: None,
            },
            Case {
                what: "a pod peer, named by its address",
                query: query("x/b", "10.244.1.1", "443"),
                egress: (
                    true,
                    "networkpolicy x/egress-b spec.egress[0] to[0] ports[0]",
                ),
                ingress: Some((true, INGRESS_OPEN)),
            },
            Case {
                what: "another pod",
                query: query("x/b", "x/c", "443"),
                egress: (
                    false,
                    "isolated by networkpolicy x/egress-b (egress), nothing allowed",
                ),
                ingress: Some((true, INGRESS_OPEN)),
            },
        ],
    );
    let e = explain(&o, &query("x/b", "192.0.2.10", "443")).expect("explained");
    assert_eq!((e.to.pod.as_deref(), e.to.identity), (None, WORLD));
    assert!(e.notes.iter().any(|n| n.contains("outside the cluster")));
    let by_address = explain(&o, &query("x/b", "10.244.1.1", "443")).expect("explained");
    assert_eq!(by_address.to.pod.as_deref(), Some("x/a"));
}

#[test]
fn a_named_port_resolves_against_the_receiver() {
    let mut o = four_pods(PolicyEnforcement::Default);
    o.policies.push(policy(
        "x",
        "web",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"ports": [{"port": "http"}]}]}),
    ));
    check(
        &o,
        &[
            Case {
                what: "8080 is a's http",
                query: query("x/b", "x/a", "8080"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    true,
                    "networkpolicy x/web spec.ingress[0] (every peer) ports[0]",
                )),
            },
            Case {
                what: "80 is not",
                query: query("x/b", "x/a", "80"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    false,
                    "isolated by networkpolicy x/web (ingress), nothing allowed",
                )),
            },
            Case {
                what: "http is TCP",
                query: query("x/b", "x/a", "8080/UDP"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    false,
                    "isolated by networkpolicy x/web (ingress), nothing allowed",
                )),
            },
        ],
    );
}

#[test]
fn what_cannot_be_explained_says_why() {
    let mut o = four_pods(PolicyEnforcement::Default);
    let err = |o: &Objects, q: Query| explain(o, &q).expect_err("not explained").to_string();
    assert_eq!(err(&o, query("x/zz", "x/a", "80")), "pod x/zz not found");
    assert_eq!(err(&o, query("x/a", "x/zz", "80")), "pod x/zz not found");
    // Relabelled, and its node has not made the new identity yet.
    if let Some(labels) = o.pods[0].metadata.labels.as_mut() {
        labels.insert("pod".into(), "renamed".into());
    }
    let message = err(&o, query("x/a", "x/b", "80"));
    assert!(
        message.starts_with("pod x/a has no security identity yet"),
        "{message}"
    );
    assert!(message.contains("renamed"), "{message}");
    // No IPv6 address to reach an IPv6 destination from.
    assert_eq!(
        err(&o, query("x/b", "2001:db8::1", "80")),
        "pod x/b has no IPv6 address, and the destination 2001:db8::1 is one"
    );
}

#[test]
fn arguments_parse_as_documented() {
    let p: PortSpec = "53/udp".parse().expect("port");
    assert_eq!((p.port, p.protocol), (53, Protocol::Udp));
    let p: PortSpec = "80".parse().expect("port");
    assert_eq!((p.port, p.protocol), (80, Protocol::Tcp));
    let p: PortSpec = "9/SCTP".parse().expect("port");
    assert_eq!(p.protocol, Protocol::Sctp);
    for bad in ["0", "65536", "80/ICMP", "http", ""] {
        assert!(bad.parse::<PortSpec>().is_err(), "{bad}");
    }
    assert_eq!(
        "x/a".parse::<Destination>(),
        Ok(Destination::Pod(PodName {
            namespace: "x".into(),
            name: "a".into()
        }))
    );
    assert!(matches!(
        "fd00::1".parse::<Destination>(),
        Ok(Destination::Address(_))
    ));
    for bad in ["a", "x/", "/a", "x/a/b"] {
        assert!(bad.parse::<PodName>().is_err(), "{bad}");
    }
}

#[test]
fn the_text_output_names_both_ends_and_the_verdict() {
    let mut o = four_pods(PolicyEnforcement::Default);
    o.policies.push(policy(
        "x",
        "deny",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}}),
    ));
    let e = explain(&o, &query("x/b", "x/a", "80")).expect("explained");
    let text = e.to_string();
    assert!(
        text.starts_with(
            "80/TCP from x/b (identity 257, 10.244.1.2) to x/a (identity 256, 10.244.1.1)\n"
        ),
        "{text}"
    );
    assert!(text.contains("  ingress of x/a: denied\n    by isolated by networkpolicy x/deny (ingress), nothing allowed\n"), "{text}");
    assert!(
        text.contains("verdict: denied (by the ingress of x/a)\n"),
        "{text}"
    );
    let json = serde_json::to_value(&e).expect("json");
    assert_eq!(json["allowed"], json!(false));
    assert_eq!(json["ingress"]["allowed"], json!(false));
    assert_eq!(json["egress"]["direction"], json!("egress"));
}

/// A sample of `config/samples/`, as a user applies it.
fn sample<K: serde::de::DeserializeOwned>(file: &str) -> K {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config/samples")
        .join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn sample_bundle(what: &str) -> PolicyBundle {
    sample(&format!(
        "network.trellis.dev_v1alpha1_policybundle_{what}.yaml"
    ))
}

/// Each PolicyBundle sample alone, with the pods and NetworkPolicies its
/// comment talks about: the verdicts and rules its comment shows.
#[test]
fn the_policybundle_samples_do_what_their_comments_say() {
    let no_ports = || json!([]);

    // An Admin deny that NetworkPolicy cannot override.
    let mut o = cluster(PolicyEnforcement::Default);
    o.bundles.push(sample_bundle("admin-deny"));
    add_pod_with(
        &mut o,
        ("shop", json!({})),
        ("web", json!({"app": "web"})),
        "10.244.1.1",
        no_ports(),
    );
    add_pod_with(
        &mut o,
        ("shop", json!({})),
        ("db", json!({"app": "db"})),
        "10.244.1.2",
        no_ports(),
    );
    o.policies.push(policy(
        "shop",
        "allow-all",
        json!({"podSelector": {}, "ingress": [{}]}),
    ));
    let np_allows = "networkpolicy shop/allow-all spec.ingress[0] (every peer) (every port)";
    check(
        &o,
        &[
            Case {
                what: "no-ssh: SSH denied though the NetworkPolicy allows it",
                query: query("shop/web", "shop/db", "22/TCP"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    false,
                    "policybundle no-ssh (Admin 20) spec.ingress[0] \"deny-ssh\" peers[0] ports[0]",
                )),
            },
            Case {
                what: "no-ssh: other ports are the NetworkPolicy's",
                query: query("shop/web", "shop/db", "80/TCP"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((true, np_allows)),
            },
        ],
    );

    // An Admin Pass.
    let mut o = cluster(PolicyEnforcement::Default);
    o.bundles.push(sample_bundle("admin-pass"));
    let prod = || json!({"env": "prod"});
    add_pod_with(
        &mut o,
        ("checkout", prod()),
        ("api", json!({"app": "api"})),
        "10.244.1.1",
        no_ports(),
    );
    add_pod_with(
        &mut o,
        ("payments", prod()),
        ("ledger", json!({"app": "ledger"})),
        "10.244.1.2",
        no_ports(),
    );
    add_pod_with(
        &mut o,
        ("dev", json!({"env": "dev"})),
        ("test", json!({"app": "test"})),
        "10.244.1.3",
        no_ports(),
    );
    let deny_others = "policybundle prod-isolation (Admin 50) spec.ingress[1] \"deny-other-namespaces\" peers[0] (every port)";
    check(
        &o,
        &[
            Case {
                what: "prod-isolation: prod to prod is passed on (no NetworkPolicy: the default)",
                query: query("checkout/api", "payments/ledger", "8443/TCP"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((true, INGRESS_OPEN)),
            },
            Case {
                what: "prod-isolation: dev to prod is denied",
                query: query("dev/test", "payments/ledger", "8443/TCP"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((false, deny_others)),
            },
        ],
    );
    o.policies.push(policy(
        "payments",
        "from-checkout",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector":
            {"matchLabels": {"kubernetes.io/metadata.name": "checkout"}}}]}]}),
    ));
    check(
        &o,
        &[
            Case {
                what: "prod-isolation: passed to payments' NetworkPolicy",
                query: query("checkout/api", "payments/ledger", "8443/TCP"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    true,
                    "networkpolicy payments/from-checkout spec.ingress[0] from[0] (every port)",
                )),
            },
            Case {
                what: "prod-isolation: a NetworkPolicy cannot let dev in",
                query: query("dev/test", "payments/ledger", "8443/TCP"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((false, deny_others)),
            },
        ],
    );

    // A Baseline default-deny that a namespace's NetworkPolicy opens.
    let mut o = cluster(PolicyEnforcement::Default);
    o.bundles.push(sample_bundle("baseline-default-deny"));
    let mut open: NetworkPolicy =
        sample("networking.k8s.io_v1_networkpolicy_allow-frontend-to-backend.yaml");
    open.metadata.namespace = Some("shop".into());
    o.policies.push(open);
    let deny = || json!({"trellis.dev/default-deny": "true"});
    add_pod_with(
        &mut o,
        ("shop", deny()),
        ("frontend", json!({"app": "frontend"})),
        "10.244.1.1",
        no_ports(),
    );
    add_pod_with(
        &mut o,
        ("shop", deny()),
        ("backend", json!({"app": "backend"})),
        "10.244.1.2",
        no_ports(),
    );
    add_pod_with(
        &mut o,
        ("shop", deny()),
        ("cache", json!({"app": "cache"})),
        "10.244.1.3",
        no_ports(),
    );
    add_pod_with(
        &mut o,
        ("blog", json!({})),
        ("web", json!({"app": "web"})),
        "10.244.1.4",
        no_ports(),
    );
    check(
        &o,
        &[
            Case {
                what: "default deny: the NetworkPolicy opens the backend",
                query: query("shop/frontend", "shop/backend", "8080/TCP"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    true,
                    "networkpolicy shop/allow-frontend-to-backend spec.ingress[0] from[0] ports[0]",
                )),
            },
            Case {
                what: "default deny: no NetworkPolicy selects the cache",
                query: query("shop/frontend", "shop/cache", "6379/TCP"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((
                    false,
                    "policybundle namespace-default-deny (Baseline 1000) spec.ingress[0] \"deny-all\" peers[0] (every port)",
                )),
            },
            Case {
                what: "default deny: a namespace without the label is untouched",
                query: query("shop/frontend", "blog/web", "80/TCP"),
                egress: (true, EGRESS_OPEN),
                ingress: Some((true, INGRESS_OPEN)),
            },
        ],
    );

    // Always allow DNS.
    let mut o = cluster(PolicyEnforcement::Default);
    o.bundles.push(sample_bundle("allow-dns"));
    add_pod_with(
        &mut o,
        ("kube-system", json!({})),
        ("coredns-abc12", json!({"k8s-app": "kube-dns"})),
        "10.244.1.1",
        no_ports(),
    );
    add_pod_with(
        &mut o,
        ("shop", json!({})),
        ("web", json!({"app": "web"})),
        "10.244.1.2",
        no_ports(),
    );
    o.policies.push(policy(
        "shop",
        "no-egress",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    ));
    let isolated = "isolated by networkpolicy shop/no-egress (egress), nothing allowed";
    check(
        &o,
        &[
            Case {
                what: "DNS over UDP despite an egress deny-all",
                query: query("shop/web", "kube-system/coredns-abc12", "53/UDP"),
                egress: (
                    true,
                    "policybundle always-allow-dns (Admin 1) spec.egress[0] \"dns\" peers[0] ports[0]",
                ),
                ingress: Some((true, INGRESS_OPEN)),
            },
            Case {
                what: "DNS over TCP",
                query: query("shop/web", "kube-system/coredns-abc12", "53/TCP"),
                egress: (
                    true,
                    "policybundle always-allow-dns (Admin 1) spec.egress[0] \"dns\" peers[0] ports[1]",
                ),
                ingress: Some((true, INGRESS_OPEN)),
            },
            Case {
                what: "anything else to the DNS pod: the NetworkPolicy",
                query: query("shop/web", "kube-system/coredns-abc12", "80/TCP"),
                egress: (false, isolated),
                ingress: Some((true, INGRESS_OPEN)),
            },
        ],
    );
}
