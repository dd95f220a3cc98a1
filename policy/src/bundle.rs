//! PolicyBundles (design 0006): their order, whom they apply to, how a
//! compiled entry names a bundle rule, and which bundles conflict.
//!
//! ```text
//!  PolicyBundle ─ order: (tier, priority, name) ─▶ Admin … │ NetworkPolicy │ Baseline … │ default
//!        │ subject (namespace + pod selectors) selects the pod?
//!        ▼
//!  spec.ingress / spec.egress rules, in order: the first that matches decides
//!        │  Allow / Deny: decided        Pass: the next stage decides
//!        ▼
//!  compile::tiers (one table per direction) ─ BundleOrigin per entry
//!  conflicts(): same tier and priority, overlapping rules, different actions
//! ```
//!
//! The compiler (`compile`) and the reference evaluator (`reference`) read
//! bundles through the functions here, so they agree on the order and on
//! the subject; everything else each of them works out on its own.

use std::collections::BTreeSet;
use std::fmt;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use trellis_api::v1alpha1::{
    Peer, PolicyBundle, PolicyPort, PolicyRule, RuleAction, Subject, Tier,
};

use crate::cidr::parse_cidr;
use crate::diagnostic::{Diagnostic, Problem, Severity, Source};
use crate::identity::{IdentityInfo, IdentityKind, SecurityLabels};
use crate::selector::Selector;
use crate::table::Direction;

/// Where a bundle sits relative to NetworkPolicy. Ordered as evaluated:
/// `Admin` before `Baseline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BundleTier {
    /// Before NetworkPolicy.
    Admin,
    /// After NetworkPolicy, only where it decided nothing.
    Baseline,
}

impl From<Tier> for BundleTier {
    fn from(t: Tier) -> Self {
        match t {
            Tier::Admin => BundleTier::Admin,
            Tier::Baseline => BundleTier::Baseline,
        }
    }
}

impl fmt::Display for BundleTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BundleTier::Admin => "Admin",
            BundleTier::Baseline => "Baseline",
        })
    }
}

/// A bundle rule, down to the peer and port that decided. The derived
/// order is the evaluation order (tier, priority, name, then the rule), so
/// rule ids handed out in origin order follow it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BundleOrigin {
    /// The bundle's tier.
    pub tier: BundleTier,
    /// Its priority (lower first).
    pub priority: i32,
    /// Its name.
    pub bundle: String,
    /// `ingress` or `egress`.
    pub direction: Direction,
    /// Index in `spec.ingress` / `spec.egress`.
    pub rule: usize,
    /// The rule's `name`, when it has one.
    pub name: Option<String>,
    /// Index in `peers`: the first that matched (or, for the fail-closed
    /// part of a broken rule, the first broken one).
    pub peer: usize,
    /// Index in `ports`; `None` when the rule has no ports (every port).
    pub port: Option<usize>,
}

impl fmt::Display for BundleOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = match self.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        write!(
            f,
            "policybundle {} ({} {}) spec.{dir}[{}]",
            self.bundle, self.tier, self.priority, self.rule
        )?;
        if let Some(name) = &self.name {
            write!(f, " {name:?}")?;
        }
        write!(f, " peers[{}]", self.peer)?;
        match self.port {
            Some(p) => write!(f, " ports[{p}]"),
            None => write!(f, " (every port)"),
        }
    }
}

/// A bundle's name (empty when it has none: an object from the apiserver
/// always has one).
pub fn name_of(bundle: &PolicyBundle) -> &str {
    bundle.metadata.name.as_deref().unwrap_or_default()
}

/// The evaluation order: tier, then priority, then name (the tie-break;
/// same-priority bundles that disagree are [`conflicts`]).
pub fn ordered(bundles: &[PolicyBundle]) -> Vec<&PolicyBundle> {
    let mut out: Vec<&PolicyBundle> = bundles.iter().collect();
    out.sort_by(|a, b| {
        let key = |x: &PolicyBundle| (BundleTier::from(x.spec.tier), x.spec.priority);
        key(a).cmp(&key(b)).then_with(|| name_of(a).cmp(name_of(b)))
    });
    out
}

/// Whether `subject` selects a pod with `labels`: its namespace's labels
/// match the namespace selector and its own labels the pod selector.
pub fn selects(subject: &Subject, labels: &SecurityLabels) -> bool {
    Selector::from(&subject.namespace_selector).matches(&labels.namespace_labels)
        && Selector::from(&subject.pod_selector).matches(&labels.pod_labels)
}

/// The rules of `direction`.
pub fn rules(bundle: &PolicyBundle, direction: Direction) -> &[PolicyRule] {
    match direction {
        Direction::Ingress => &bundle.spec.ingress,
        Direction::Egress => &bundle.spec.egress,
    }
}

/// The bundles that apply to a pod with `labels` in `direction`: those
/// whose subject selects it and that have rules for the direction, in
/// evaluation order. A bundle with no rules for a direction changes
/// nothing there (it does not isolate).
pub fn applying<'a>(
    bundles: &'a [PolicyBundle],
    labels: &SecurityLabels,
    direction: Direction,
) -> Vec<&'a PolicyBundle> {
    ordered(bundles)
        .into_iter()
        .filter(|b| !rules(b, direction).is_empty() && selects(&b.spec.subject, labels))
        .collect()
}

/// The name of an action, as the API spells it.
pub fn action_name(action: RuleAction) -> &'static str {
    match action {
        RuleAction::Allow => "Allow",
        RuleAction::Deny => "Deny",
        RuleAction::Pass => "Pass",
    }
}

/// Two bundles of the same tier and priority with rules that overlap and
/// act differently: their order is only the tie-break on the name, which
/// is probably not what their authors meant (the `Conflicting` condition).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Conflict {
    /// The tier both are in.
    pub tier: BundleTier,
    /// The priority both have.
    pub priority: i32,
    /// The bundle evaluated first (the smaller name).
    pub first: String,
    /// The other one.
    pub second: String,
    /// The direction of the overlapping rules.
    pub direction: Direction,
    /// The overlapping rule of `first` and its action.
    pub first_rule: (usize, &'static str),
    /// The overlapping rule of `second` and its action.
    pub second_rule: (usize, &'static str),
    /// A pod identity both bundles select.
    pub subject: u32,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = match self.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        write!(
            f,
            "policybundles {first} and {second} are both {tier} priority {priority}, and \
             {first} spec.{dir}[{a}] ({a_action}) overlaps {second} spec.{dir}[{b}] ({b_action}) \
             for pods of identity {subject}: {first} wins only because its name sorts first",
            first = self.first,
            second = self.second,
            tier = self.tier,
            priority = self.priority,
            a = self.first_rule.0,
            a_action = self.first_rule.1,
            b = self.second_rule.0,
            b_action = self.second_rule.1,
            subject = self.subject,
        )
    }
}

/// Every pair of bundles with the same tier and priority that select a
/// common pod identity and have, in one direction, a rule each with
/// different actions whose peers and ports overlap: one [`Conflict`] per
/// pair (the first overlapping rules), sorted.
///
/// "Overlap" is decided on what can be known without addresses: pod peers
/// overlap when some identity matches both, `ipBlock` peers when their
/// prefixes intersect outside each other's `except`s; a pod peer and an
/// `ipBlock` are not reported (a pod's address may lie in the block, but
/// flagging every such pair would flag nearly every bundle). Ports overlap
/// when a protocol is shared and the numbers intersect; a named port
/// overlaps any number of its protocol and the same name.
pub fn conflicts(bundles: &[PolicyBundle], identities: &[IdentityInfo]) -> Vec<Conflict> {
    let pods: Vec<&IdentityInfo> = identities
        .iter()
        .filter(|i| IdentityKind::of(i.id) == IdentityKind::Pod)
        .collect();
    let sorted = ordered(bundles);
    let mut out = BTreeSet::new();
    for (i, a) in sorted.iter().enumerate() {
        for b in &sorted[i + 1..] {
            let same_place = BundleTier::from(a.spec.tier) == BundleTier::from(b.spec.tier)
                && a.spec.priority == b.spec.priority;
            if !same_place {
                continue;
            }
            let Some(subject) = pods.iter().find(|p| {
                selects(&a.spec.subject, &p.labels) && selects(&b.spec.subject, &p.labels)
            }) else {
                continue;
            };
            if let Some(c) = first_overlap(a, b, &pods, subject.id) {
                out.insert(c);
            }
        }
    }
    out.into_iter().collect()
}

fn first_overlap(
    a: &PolicyBundle,
    b: &PolicyBundle,
    pods: &[&IdentityInfo],
    subject: u32,
) -> Option<Conflict> {
    for direction in [Direction::Ingress, Direction::Egress] {
        for (i, ra) in rules(a, direction).iter().enumerate() {
            for (j, rb) in rules(b, direction).iter().enumerate() {
                if ra.action == rb.action {
                    continue;
                }
                if peers_overlap(&ra.peers, &rb.peers, pods) && ports_overlap(&ra.ports, &rb.ports)
                {
                    return Some(Conflict {
                        tier: a.spec.tier.into(),
                        priority: a.spec.priority,
                        first: name_of(a).to_owned(),
                        second: name_of(b).to_owned(),
                        direction,
                        first_rule: (i, action_name(ra.action)),
                        second_rule: (j, action_name(rb.action)),
                        subject,
                    });
                }
            }
        }
    }
    None
}

/// What is wrong with `bundle` on its own, whichever pods it meets: the
/// [`Severity::Error`] diagnostics the compiler
/// reports for it on every node where it applies (a rule without peers, a
/// peer that does not set exactly one field, a malformed `ipBlock`, a port
/// out of range, an `endPort` without a numeric `port`, …), sorted, in the
/// compiler's words. Empty for a bundle the apiserver's schema admitted,
/// unless the schema and the compiler disagree; the operator reports a
/// non-empty list as `Accepted=False`. Warnings (a named port no pod
/// declares, a verdict that depends on addresses) depend on the pods and
/// are left to the nodes.
pub fn validate(bundle: &PolicyBundle) -> Vec<Diagnostic> {
    let name = name_of(bundle).to_owned();
    let cidrs = crate::cidr::CidrTable::from_objects(&[] as &[NetworkPolicy], [bundle]);
    let mut out = BTreeSet::new();
    let mut report = |field: String, problem: Problem| {
        if problem.severity() == Severity::Error {
            out.insert(Diagnostic {
                source: Source::PolicyBundle(name.clone()),
                field,
                problem,
            });
        }
    };
    for direction in [Direction::Ingress, Direction::Egress] {
        let dir = match direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        for (index, rule) in rules(bundle, direction).iter().enumerate() {
            let base = format!("spec.{dir}[{index}]");
            if rule.peers.is_empty() {
                report(format!("{base}.peers"), Problem::NoPeers);
            }
            for (j, peer) in rule.peers.iter().enumerate() {
                let field = format!("{base}.peers[{j}]");
                let set = usize::from(peer.pods.is_some())
                    + usize::from(peer.namespaces.is_some())
                    + usize::from(peer.ip_block.is_some());
                if set != 1 {
                    report(field, Problem::PeerFields(set));
                    continue;
                }
                let Some(block) = &peer.ip_block else {
                    continue;
                };
                if let Err(problems) =
                    crate::compile::parse_ip_block(&cidrs, &block.cidr, &block.except)
                {
                    for (sub, problem) in problems {
                        report(format!("{field}.ipBlock{sub}"), problem);
                    }
                }
            }
            for (k, port) in rule.ports.iter().enumerate() {
                if let Err(problems) = crate::compile::parse_port(
                    Ok(port.protocol.into()),
                    port.port.as_ref(),
                    port.end_port,
                ) {
                    for (sub, problem) in problems {
                        report(format!("{base}.ports[{k}].{sub}"), problem);
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

/// What a peer stands for, for overlap checks.
enum PeerShape {
    Pods(BTreeSet<u32>),
    Block(IpNet, Vec<IpNet>),
    Unknown,
}

fn shape(peer: &Peer, pods: &[&IdentityInfo]) -> PeerShape {
    match (&peer.pods, &peer.namespaces, &peer.ip_block) {
        (Some(subject), None, None) => PeerShape::Pods(
            pods.iter()
                .filter(|p| selects(subject, &p.labels))
                .map(|p| p.id)
                .collect(),
        ),
        (None, Some(ns), None) => {
            let s = Selector::from(ns);
            PeerShape::Pods(
                pods.iter()
                    .filter(|p| s.matches(&p.labels.namespace_labels))
                    .map(|p| p.id)
                    .collect(),
            )
        }
        (None, None, Some(block)) => match parse_cidr(&block.cidr) {
            Some(cidr) => PeerShape::Block(
                cidr,
                block.except.iter().filter_map(|e| parse_cidr(e)).collect(),
            ),
            None => PeerShape::Unknown,
        },
        _ => PeerShape::Unknown,
    }
}

fn peers_overlap(a: &[Peer], b: &[Peer], pods: &[&IdentityInfo]) -> bool {
    let a: Vec<PeerShape> = a.iter().map(|p| shape(p, pods)).collect();
    let b: Vec<PeerShape> = b.iter().map(|p| shape(p, pods)).collect();
    a.iter().any(|x| {
        b.iter().any(|y| match (x, y) {
            (PeerShape::Pods(p), PeerShape::Pods(q)) => !p.is_disjoint(q),
            (PeerShape::Block(c, ce), PeerShape::Block(d, de)) => {
                // The smaller of two intersecting prefixes is their
                // intersection; it is all taken out when it lies inside an
                // except of either block.
                let inner = if c.contains(d) {
                    d
                } else if d.contains(c) {
                    c
                } else {
                    return false;
                };
                !ce.iter().chain(de).any(|e| e.contains(inner))
            }
            _ => false,
        })
    })
}

/// (protocol, first, last) or (protocol, name).
enum PortShape {
    Range(trellis_api::v1alpha1::Protocol, u16, u16),
    Named(trellis_api::v1alpha1::Protocol, String),
}

fn port_shape(p: &PolicyPort) -> Option<PortShape> {
    let in_range = |n: i32| u16::try_from(n).ok().filter(|n| *n != 0);
    match &p.port {
        None => Some(PortShape::Range(p.protocol, 0, u16::MAX)),
        Some(IntOrString::Int(n)) => {
            let first = in_range(*n)?;
            let last = match p.end_port {
                None => first,
                Some(e) => in_range(e)?,
            };
            Some(PortShape::Range(p.protocol, first, last))
        }
        Some(IntOrString::String(name)) => Some(PortShape::Named(p.protocol, name.clone())),
    }
}

fn ports_overlap(a: &[PolicyPort], b: &[PolicyPort]) -> bool {
    if a.is_empty() || b.is_empty() {
        return true;
    }
    a.iter().filter_map(port_shape).any(|x| {
        b.iter().filter_map(port_shape).any(|y| match (&x, &y) {
            (PortShape::Range(p, a1, a2), PortShape::Range(q, b1, b2)) => {
                p == q && a1 <= b2 && b1 <= a2
            }
            (PortShape::Named(p, m), PortShape::Named(q, n)) => p == q && m == n,
            (PortShape::Named(p, _), PortShape::Range(q, ..))
            | (PortShape::Range(p, ..), PortShape::Named(q, _)) => p == q,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::v1alpha1::{IpBlock, PolicyBundleSpec};

    fn bundle(rule: PolicyRule) -> PolicyBundle {
        PolicyBundle::new(
            "b",
            PolicyBundleSpec {
                tier: Tier::Admin,
                priority: 1,
                subject: Subject::default(),
                ingress: vec![rule],
                egress: Vec::new(),
            },
        )
    }

    fn rule(peers: Vec<Peer>, ports: Vec<PolicyPort>) -> PolicyRule {
        PolicyRule {
            name: None,
            action: RuleAction::Deny,
            peers,
            ports,
        }
    }

    fn block(cidr: &str, except: &[&str]) -> Peer {
        Peer {
            ip_block: Some(IpBlock {
                cidr: cidr.into(),
                except: except.iter().map(|e| (*e).to_owned()).collect(),
            }),
            ..Peer::default()
        }
    }

    /// Each error names its field and says what is wrong there; a valid
    /// bundle has none, and warnings are not errors.
    #[test]
    fn validate_names_the_field_of_every_error() {
        let port = |port: Option<IntOrString>, end_port: Option<i32>| PolicyPort {
            protocol: trellis_api::v1alpha1::Protocol::Tcp,
            port,
            end_port,
        };
        let cases: Vec<(PolicyRule, Vec<&str>)> = vec![
            (
                rule(
                    vec![block("10.0.0.0/8", &["10.1.0.0/16"])],
                    vec![port(Some(IntOrString::Int(80)), Some(90))],
                ),
                vec![],
            ),
            (
                rule(vec![], vec![]),
                vec!["spec.ingress[0].peers: a rule must list at least one peer"],
            ),
            (
                rule(vec![Peer::default()], vec![]),
                vec![
                    "spec.ingress[0].peers[0]: a peer must set exactly one of pods, namespaces or ipBlock (this one sets 0)",
                ],
            ),
            (
                rule(vec![block("10.0.0.0/8", &["192.168.0.0/16"])], vec![]),
                vec![
                    "spec.ingress[0].peers[0].ipBlock.except[0]: except 192.168.0.0/16 is not strictly inside cidr 10.0.0.0/8",
                ],
            ),
            (
                rule(vec![block("not-a-cidr", &[])], vec![]),
                vec!["spec.ingress[0].peers[0].ipBlock.cidr: invalid CIDR \"not-a-cidr\""],
            ),
            (
                rule(
                    vec![block("10.0.0.0/8", &[])],
                    vec![port(Some(IntOrString::Int(70000)), None)],
                ),
                vec!["spec.ingress[0].ports[0].port: port 70000 is outside 1-65535"],
            ),
            (
                rule(vec![block("10.0.0.0/8", &[])], vec![port(None, Some(90))]),
                vec!["spec.ingress[0].ports[0].endPort: endPort needs a numeric port"],
            ),
        ];
        for (rule, want) in cases {
            let got: Vec<String> = validate(&bundle(rule.clone()))
                .iter()
                .map(|d| {
                    let s = d.to_string();
                    s.strip_prefix("policybundle b ").unwrap_or(&s).to_owned()
                })
                .collect();
            assert_eq!(got, want, "{rule:?}");
        }
    }
}
