//! `kubectl trellis explain` against the datapath: in the truth-table world (namespaces x, y,
//! z with pods a, b, c, three nodes), with one NetworkPolicy and two PolicyBundles enforced
//! by every node, the built `kubectl-trellis` binary explains a few connections, and each
//! verdict must be what the semantics say (written out here by hand) and what a real probe
//! between the pods' network namespaces sees. The deciding rule it names is checked too.
//!
//! `cargo test -p trellis-e2e --test explain`. Needs root; state dir `/tmp/trellis-e2e-explain`.

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use trellis_api::v1alpha1::PolicyBundle;
use trellis_e2e::truth::{Change, Enforcement, Grid, Protocol, World, explain::Explainer, policy};

const FIELD_MANAGER: &str = "trellis-e2e-explain";

/// One connection: what the semantics say, and words the deciding rule of each end contains.
struct Pair {
    from: &'static str,
    to: &'static str,
    protocol: Protocol,
    port: u16,
    allowed: bool,
    egress_rule: &'static str,
    ingress_rule: &'static str,
}

const OPEN: &str = "no networkpolicy isolates the pod";

fn pairs() -> Vec<Pair> {
    let pair = |from, to, protocol, port, allowed, egress_rule, ingress_rule| Pair {
        from,
        to,
        protocol,
        port,
        allowed,
        egress_rule,
        ingress_rule,
    };
    use Protocol::{Tcp, Udp};
    vec![
        // The NetworkPolicy: x/a takes TCP 80 from x/b only.
        pair(
            "x/b",
            "x/a",
            Tcp,
            80,
            true,
            OPEN,
            "networkpolicy x/trellis-a-from-b spec.ingress[0] from[0] ports[0]",
        ),
        pair(
            "x/c",
            "x/a",
            Tcp,
            80,
            false,
            OPEN,
            "isolated by networkpolicy x/trellis-a-from-b (ingress)",
        ),
        pair(
            "x/b",
            "x/a",
            Udp,
            80,
            false,
            OPEN,
            "isolated by networkpolicy x/trellis-a-from-b (ingress)",
        ),
        // The Admin bundle: nothing from z into y on TCP 80; other ports fall through to
        // the mode's default.
        pair(
            "z/a",
            "y/b",
            Tcp,
            80,
            false,
            OPEN,
            "policybundle trellis-no-z-to-y (Admin 10) spec.ingress[0] \"deny-z\" peers[0] ports[0]",
        ),
        pair("z/a", "y/b", Tcp, 81, true, OPEN, OPEN),
        pair("x/a", "y/c", Tcp, 80, true, OPEN, OPEN),
        // The Baseline bundle: z/c takes nothing, where no NetworkPolicy isolates it.
        pair(
            "y/a",
            "z/c",
            Udp,
            81,
            false,
            OPEN,
            "policybundle trellis-quiet-c (Baseline 100) spec.ingress[0] \"deny-all\" peers[0] (every port)",
        ),
        pair("z/c", "x/b", Tcp, 81, true, OPEN, OPEN),
    ]
}

fn bundles() -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "network.trellis.dev/v1alpha1", "kind": "PolicyBundle",
            "metadata": {"name": "trellis-no-z-to-y"},
            "spec": {
                "tier": "Admin", "priority": 10,
                "subject": {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                "ingress": [{"name": "deny-z", "action": "Deny",
                             "peers": [{"namespaces": {"matchLabels": {"ns": "z"}}}],
                             "ports": [{"protocol": "TCP", "port": 80}]}],
            },
        }),
        json!({
            "apiVersion": "network.trellis.dev/v1alpha1", "kind": "PolicyBundle",
            "metadata": {"name": "trellis-quiet-c"},
            "spec": {
                "tier": "Baseline", "priority": 100,
                "subject": {"namespaceSelector": {"matchLabels": {"ns": "z"}},
                            "podSelector": {"matchLabels": {"pod": "c"}}},
                "ingress": [{"name": "deny-all", "action": "Deny",
                             "peers": [{"namespaces": {}}]}],
            },
        }),
    ]
}

/// `kubectl-trellis explain … -o json` (and the text form, which must agree on the verdict).
async fn explain(explainer: &Explainer, p: &Pair) -> Value {
    let grid = Grid::new(p.protocol, p.port);
    let json = explainer
        .explain(p.from, p.to, grid)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let text = explainer
        .run(p.from, p.to, grid, "text")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let verdict = if json["allowed"] == json!(true) {
        "verdict: allowed"
    } else {
        "verdict: denied"
    };
    assert!(
        text.contains(verdict),
        "{} → {}: the text says otherwise:\n{text}",
        p.from,
        p.to
    );
    json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_agrees_with_the_datapath() {
    let world = World::start("explain")
        .await
        .unwrap_or_else(|e| panic!("the truth-table world starts: {e}"));
    let explainer = Explainer::new(&world.control_plane().kubeconfig_path())
        .await
        .unwrap_or_else(|e| panic!("the kubectl-trellis binary: {e}"));

    let np = Change::Apply(Box::new(policy(
        "x",
        "trellis-a-from-b",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                            "ports": [{"protocol": "TCP", "port": 80}]}]}),
    )));
    world
        .change(std::slice::from_ref(&np))
        .await
        .expect("the NetworkPolicy applies");
    let api: Api<PolicyBundle> = Api::all(world.client());
    for b in bundles() {
        let name = b["metadata"]["name"].as_str().expect("a name").to_owned();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&b),
        )
        .await
        .unwrap_or_else(|e| panic!("applying PolicyBundle {name}: {e}"));
    }
    // Every node reports the hash of the policies and bundles the apiserver serves.
    let enforcement = world
        .wait_policy_applied(&[np])
        .await
        .expect("policy applied");
    assert_eq!(enforcement, Enforcement::Confirmed);

    let mut failures = Vec::new();
    for p in pairs() {
        let json = explain(&explainer, &p).await;
        let said = json["allowed"].as_bool().expect("allowed is a bool");
        let (observed, got_through) = world
            .probe_pair(p.from, p.to, Grid::new(p.protocol, p.port), said)
            .await
            .expect("both pods are in the world");
        let cell = format!("{} → {} {}/{}", p.from, p.to, p.port, p.protocol.as_k8s());
        let egress = json["egress"]["rule"].as_str().unwrap_or_default();
        let ingress = json["ingress"]["rule"].as_str().unwrap_or_default();
        eprintln!(
            "explain: {cell}: said {said}, probe {observed}; egress by {egress}; ingress by {ingress}"
        );
        if said != got_through {
            failures.push(format!(
                "{cell}: explain says allowed={said}, the probe saw {observed}\n{json:#}"
            ));
        }
        if said != p.allowed {
            failures.push(format!(
                "{cell}: explain says allowed={said}, the semantics say {}\n{json:#}",
                p.allowed
            ));
        }
        if !egress.contains(p.egress_rule) || !ingress.contains(p.ingress_rule) {
            failures.push(format!(
                "{cell}: want egress by {:?}, ingress by {:?}; explain says {egress:?}, {ingress:?}",
                p.egress_rule, p.ingress_rule
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
