//! The oracle's PolicyBundle stages, read off docs/policybundles.md ("How a connection is
//! decided") and the field documentation of the `PolicyBundle` kind, over the objects as the
//! apiserver holds them. Like the rest of the oracle it shares nothing with Trellis' compiler
//! or its reference evaluator (`trellis-policy`); only the API types are common.
//!
//! ```text
//!  one tier, one side of a connection (the local pod: sender on egress, receiver on ingress)
//!     bundles of the tier whose subject selects the local pod, by (priority, name)
//!       └─ rules of the side's list in order; the first whose peers and ports match:
//!            Allow → allowed, Deny → denied (final)
//!            Pass  → the tier says nothing: the next stage decides
//!     no rule matched in any of them → the next stage decides
//! ```

use std::net::IpAddr;

use k8s_openapi::{
    api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::LabelSelector as K8sLabelSelector,
};
use kube::ResourceExt as _;
use trellis_api::v1alpha1::{
    LabelSelector, Peer, PolicyPort, Protocol as PortProtocol, RuleAction, Subject, Tier,
};

use super::oracle::{
    BundleRule, Connection, Direction, Protocol, Side, Snapshot, cidr_contains, labels,
    namespace_labels, port_spec_matches, selects,
};

/// What the bundles of `tier` say about one side of `c`: `None` when none decides (no rule
/// matched, or a `Pass` did).
pub(super) fn stage(
    snapshot: &Snapshot,
    c: &Connection,
    direction: Direction,
    tier: Tier,
) -> Option<Side> {
    let (local, peer, peer_ip) = direction.ends(c);
    let mut bundles: Vec<_> = snapshot
        .bundles
        .iter()
        .filter(|b| b.spec.tier == tier && subject_selects(snapshot, &b.spec.subject, local))
        .collect();
    // Lower priority first; the name breaks ties.
    bundles.sort_by_key(|b| (b.spec.priority, b.name_any()));
    for bundle in bundles {
        let (list, rules) = match direction {
            Direction::Ingress => ("ingress", &bundle.spec.ingress),
            Direction::Egress => ("egress", &bundle.spec.egress),
        };
        for (i, rule) in rules.iter().enumerate() {
            let peer_matches = rule
                .peers
                .iter()
                .any(|p| peer_matches(snapshot, p, peer, peer_ip));
            if !peer_matches || !ports_match(&rule.ports, c.to, c.protocol, c.port) {
                continue;
            }
            let allows = match rule.action {
                RuleAction::Allow => true,
                RuleAction::Deny => false,
                // The rest of the tier is skipped.
                RuleAction::Pass => return None,
            };
            return Some(Side::Bundle(BundleRule {
                bundle: bundle.name_any(),
                tier,
                priority: bundle.spec.priority,
                direction: list,
                rule: i,
                allows,
            }));
        }
    }
    None
}

/// A subject (or a `pods` peer): the pod's namespace's labels match the namespace selector
/// and its own labels the pod selector; empty selectors match everything.
fn subject_selects(snapshot: &Snapshot, subject: &Subject, pod: &Pod) -> bool {
    namespace_selected(snapshot, &subject.namespace_selector, pod)
        && selects(
            Some(&k8s_selector(&subject.pod_selector)),
            labels(&pod.metadata.labels),
        )
}

fn namespace_selected(snapshot: &Snapshot, selector: &LabelSelector, pod: &Pod) -> bool {
    selects(
        Some(&k8s_selector(selector)),
        namespace_labels(snapshot, pod),
    )
}

/// A peer is exactly one of pods, namespaces or an ipBlock (the schema refuses anything
/// else); an ipBlock matches pod addresses too.
fn peer_matches(snapshot: &Snapshot, peer: &Peer, pod: &Pod, ip: IpAddr) -> bool {
    if let Some(subject) = &peer.pods {
        return subject_selects(snapshot, subject, pod);
    }
    if let Some(namespaces) = &peer.namespaces {
        return namespace_selected(snapshot, namespaces, pod);
    }
    if let Some(block) = &peer.ip_block {
        return cidr_contains(&block.cidr, ip)
            && !block.except.iter().any(|e| cidr_contains(e, ip));
    }
    false
}

/// No ports: every port of every protocol; else any one must match. The port is the
/// receiver's, so a named port is the receiver's container port of that name.
fn ports_match(ports: &[PolicyPort], receiver: &Pod, protocol: Protocol, port: u16) -> bool {
    ports.is_empty()
        || ports.iter().any(|p| {
            let rule_protocol = match p.protocol {
                PortProtocol::Tcp => "TCP",
                PortProtocol::Udp => "UDP",
                PortProtocol::Sctp => "SCTP",
            };
            port_spec_matches(
                rule_protocol,
                p.port.as_ref(),
                p.end_port,
                receiver,
                protocol,
                port,
            )
        })
}

/// Trellis' selector has the shape of Kubernetes' (`matchLabels`, `matchExpressions` with the
/// same operators): the oracle evaluates both with one function.
fn k8s_selector(selector: &LabelSelector) -> K8sLabelSelector {
    serde_json::to_value(selector)
        .and_then(serde_json::from_value)
        .unwrap_or_else(|e| panic!("a PolicyBundle selector as a Kubernetes one: {e}"))
}
