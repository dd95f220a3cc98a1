//! The reference evaluator: the semantics of NetworkPolicy and
//! PolicyBundles (designs 0004 and 0006) for one packet, read directly off
//! the objects — slowly, with no identity classes, no CIDR identities, no
//! port prefixes and no tables. The compiler's tables are checked against
//! it (`tests/bundles_match_reference.rs`), and `kubectl trellis explain`
//! can cross-check a datapath verdict with it.
//!
//! ```text
//!  packet (remote identity, remote address, protocol, port)
//!     │ Never? → not enforced
//!     │ ingress from this node (HOST) into an enforced pod → allowed
//!     ▼
//!  Admin bundles (tier, priority, name), rules in order: first match decides; Pass → on
//!  NetworkPolicy: isolated? allowed if any rule allows, else dropped
//!  Baseline bundles, the same way; Pass → on
//!  the mode's default: Default allows, Always drops
//! ```
//!
//! It shares with the compiler only the vocabulary: label selectors, CIDR
//! parsing, named ports, the bundle order ([`crate::bundle`]) and the
//! origin types. What is broken in an object is read as the compiler
//! documents it (never wider than written): a broken part of a
//! NetworkPolicy or of an `Allow` rule matches nothing; a broken part of a
//! `Deny` or `Pass` rule matches everything and denies.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use trellis_api::v1alpha1::{IpBlock, Peer, PolicyBundle, PolicyPort, PolicyRule, RuleAction};

use crate::bundle::{self, BundleOrigin, BundleTier};
use crate::cidr::parse_cidr;
use crate::compile::{Input, LocalEndpoint, Origin, RuleOrigin, check_port_name};
use crate::diagnostic::PolicyRef;
use crate::identity::{HOST, IdentityInfo, IdentityKind};
use crate::ports::Protocol;
use crate::selector::Selector;
use crate::table::Direction;
use trellis_api::v1alpha1::PolicyEnforcement;

/// One packet as the endpoint's program sees it: the other end's identity
/// (from the IP cache: a pod identity, [`HOST`] or
/// [`crate::identity::WORLD`]), its address, the protocol and the
/// destination port (0 for protocols without ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// The remote end's identity.
    pub identity: u32,
    /// The remote end's address.
    pub address: IpAddr,
    /// IANA protocol number.
    pub proto: u8,
    /// The destination port.
    pub port: u16,
}

/// What the semantics say about a packet in an enforced direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether it passes.
    pub allowed: bool,
    /// The rule (or default) that decided.
    pub by: Origin,
    /// Every origin that decides equally, `by` included: for the
    /// NetworkPolicy stage, each rule that allows the packet (a union has
    /// no first rule); otherwise only `by`.
    pub equally: Vec<Origin>,
}

/// Whether policy applies at all to `endpoint` in `direction`: some
/// NetworkPolicy isolates it, or a PolicyBundle applies to it (its subject
/// selects the pod and it has rules for the direction), or the mode is
/// `Always`; never in mode `Never`. Where it does not, everything passes.
pub fn enforced(input: &Input, endpoint: &LocalEndpoint, direction: Direction) -> bool {
    match input.enforcement {
        PolicyEnforcement::Never => false,
        PolicyEnforcement::Always => true,
        PolicyEnforcement::Default => {
            !np_stage(input, endpoint, direction, None)
                .isolating
                .is_empty()
                || !bundle::applying(&input.bundles, &endpoint.labels, direction).is_empty()
        }
    }
}

/// The verdict on `packet` in `direction` of `endpoint`; `None` where the
/// direction is not [`enforced`].
pub fn evaluate(
    input: &Input,
    endpoint: &LocalEndpoint,
    direction: Direction,
    packet: &Packet,
) -> Option<Verdict> {
    if !enforced(input, endpoint, direction) {
        return None;
    }
    let decided = |allowed: bool, by: Origin| Verdict {
        allowed,
        equally: vec![by.clone()],
        by,
    };
    // Health probes and the like: the pod's own node always gets in.
    if direction == Direction::Ingress && packet.identity == HOST {
        return Some(decided(true, Origin::FromHost));
    }
    let remote = input
        .identities
        .iter()
        .find(|i| i.id == packet.identity && IdentityKind::of(i.id) == IdentityKind::Pod);
    let cx = Context {
        direction,
        endpoint,
        remote,
        packet,
    };
    let bundles = bundle::applying(&input.bundles, &endpoint.labels, direction);
    let tier = |tier: BundleTier| -> Option<Verdict> {
        for b in bundles
            .iter()
            .filter(|b| BundleTier::from(b.spec.tier) == tier)
        {
            for (i, rule) in bundle::rules(b, direction).iter().enumerate() {
                match bundle_rule(&cx, b, i, rule) {
                    None => {}
                    Some((RuleAction::Pass, _)) => return None,
                    Some((action, origin)) => {
                        return Some(decided(action == RuleAction::Allow, origin));
                    }
                }
            }
        }
        None
    };
    if let Some(v) = tier(BundleTier::Admin) {
        return Some(v);
    }
    let np = np_stage(input, endpoint, direction, Some(&cx));
    if !np.isolating.is_empty() {
        let mut allowing = np.allowing;
        allowing.sort();
        return Some(match allowing.first() {
            Some(first) => Verdict {
                allowed: true,
                by: Origin::Rule(first.clone()),
                equally: allowing.into_iter().map(Origin::Rule).collect(),
            },
            None => {
                let mut policies = np.isolating;
                policies.sort();
                policies.dedup();
                decided(
                    false,
                    Origin::Isolated {
                        direction,
                        policies,
                    },
                )
            }
        });
    }
    if let Some(v) = tier(BundleTier::Baseline) {
        return Some(v);
    }
    Some(if input.enforcement == PolicyEnforcement::Always {
        decided(false, Origin::DefaultDeny { direction })
    } else {
        decided(true, Origin::NotIsolated { direction })
    })
}

/// The packet and whom it concerns.
struct Context<'a> {
    direction: Direction,
    endpoint: &'a LocalEndpoint,
    /// The remote end, when it is a pod identity of the input.
    remote: Option<&'a IdentityInfo>,
    packet: &'a Packet,
}

impl Context<'_> {
    /// The packet's protocol, when it has ports.
    fn port_protocol(&self) -> Option<Protocol> {
        Protocol::from_number(self.packet.proto)
    }

    /// Whether a named port `name`/`protocol` is the packet's port: the
    /// pod's own ports on ingress, the destination pod's on egress.
    fn named(&self, protocol: Protocol, name: &str) -> bool {
        if self.port_protocol() != Some(protocol) {
            return false;
        }
        let ports = match self.direction {
            Direction::Ingress => Some(&self.endpoint.named_ports),
            Direction::Egress => self.remote.map(|r| &r.named_ports),
        };
        ports.is_some_and(|p| p.resolve(name, protocol).any(|n| n == self.packet.port))
    }

    /// Whether the packet's address is in `cidr` and in none of `except`.
    fn in_block(&self, cidr: &IpNet, except: &[IpNet]) -> bool {
        cidr.contains(&self.packet.address)
            && !except.iter().any(|e| e.contains(&self.packet.address))
    }
}

// ---- NetworkPolicy -------------------------------------------------------------

/// A NetworkPolicy rule's peers (`from`/`to`) and ports.
type NpRule<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

/// What the NetworkPolicy stage says.
struct NpStage {
    /// The policies that isolate the pod in the direction.
    isolating: Vec<PolicyRef>,
    /// The (rule, peer, port) of each that allows the packet.
    allowing: Vec<RuleOrigin>,
}

fn np_stage(
    input: &Input,
    endpoint: &LocalEndpoint,
    direction: Direction,
    cx: Option<&Context<'_>>,
) -> NpStage {
    let mut out = NpStage {
        isolating: Vec::new(),
        allowing: Vec::new(),
    };
    for policy in &input.policies {
        let Some(namespace) = policy.metadata.namespace.as_deref() else {
            continue;
        };
        if namespace != endpoint.labels.namespace {
            continue;
        }
        let pref = PolicyRef {
            namespace: namespace.to_owned(),
            name: policy.metadata.name.clone().unwrap_or_default(),
        };
        let spec = policy.spec.clone().unwrap_or_default();
        // A selector the apiserver would refuse isolates (fail closed) and
        // its rules allow nothing.
        let (selected, rules_apply) = match spec.pod_selector.as_ref().map(Selector::try_from) {
            None => (true, true),
            Some(Ok(s)) => (s.matches(&endpoint.labels.pod_labels), true),
            Some(Err(_)) => (true, false),
        };
        if !selected || !policy_types(policy).contains(&direction) {
            continue;
        }
        out.isolating.push(pref.clone());
        let Some(cx) = cx.filter(|_| rules_apply) else {
            continue;
        };
        let rules: Vec<NpRule<'_>> = match direction {
            Direction::Ingress => spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            Direction::Egress => spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        };
        for (i, (peers, ports)) in rules.into_iter().enumerate() {
            let peers: Vec<(Option<usize>, Option<&NetworkPolicyPeer>)> = match peers {
                None => vec![(None, None)],
                Some(list) if list.is_empty() => vec![(None, None)],
                Some(list) => list
                    .iter()
                    .enumerate()
                    .map(|(j, p)| (Some(j), Some(p)))
                    .collect(),
            };
            let ports: Vec<(Option<usize>, Option<&NetworkPolicyPort>)> = match ports {
                None => vec![(None, None)],
                Some(list) if list.is_empty() => vec![(None, None)],
                Some(list) => list
                    .iter()
                    .enumerate()
                    .map(|(j, p)| (Some(j), Some(p)))
                    .collect(),
            };
            for (pi, peer) in &peers {
                for (qi, port) in &ports {
                    if np_pair(cx, &pref, *peer, *port) {
                        out.allowing.push(RuleOrigin {
                            policy: pref.clone(),
                            direction,
                            rule: i,
                            peer: *pi,
                            port: *qi,
                        });
                    }
                }
            }
        }
    }
    out
}

/// The directions a policy isolates: its `policyTypes`, or when unset or
/// empty, Ingress plus Egress when it has egress rules (the apiserver's
/// defaulting); an unknown type isolates both.
fn policy_types(policy: &NetworkPolicy) -> Vec<Direction> {
    let spec = policy.spec.clone().unwrap_or_default();
    let types = spec.policy_types.unwrap_or_default();
    if types.is_empty() {
        let mut out = vec![Direction::Ingress];
        if spec.egress.is_some_and(|e| !e.is_empty()) {
            out.push(Direction::Egress);
        }
        return out;
    }
    let mut out = Vec::new();
    for t in &types {
        match t.as_str() {
            "Ingress" => out.push(Direction::Ingress),
            "Egress" => out.push(Direction::Egress),
            _ => return vec![Direction::Ingress, Direction::Egress],
        }
    }
    out
}

/// Whether one (peer, port) of a NetworkPolicy rule matches (`None`: the
/// rule has no peers, or no ports: every one).
fn np_pair(
    cx: &Context<'_>,
    policy: &PolicyRef,
    peer: Option<&NetworkPolicyPeer>,
    port: Option<&NetworkPolicyPort>,
) -> bool {
    let named = port.is_some_and(|p| matches!(p.port, Some(IntOrString::String(_))));
    let peer_ok = match peer {
        None => true,
        Some(p) => match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) | (None, None, None) => false,
            (Some(block), None, None) => {
                // A named port towards an ipBlock cannot be told apart
                // from the address's pod in a NetworkPolicy: it matches
                // nothing (documented in `compile`).
                if named && cx.direction == Direction::Egress {
                    return false;
                }
                let except = block.except.clone().unwrap_or_default();
                match parse_block(&block.cidr, &except) {
                    Some((cidr, except)) => cx.in_block(&cidr, &except),
                    None => false,
                }
            }
            (None, ns, pods) => {
                let ns = match ns.as_ref().map(Selector::try_from) {
                    None => None,
                    Some(Ok(s)) => Some(s),
                    Some(Err(_)) => return false,
                };
                let pods = match pods.as_ref().map(Selector::try_from) {
                    None => Selector::everything(),
                    Some(Ok(s)) => s,
                    Some(Err(_)) => return false,
                };
                cx.remote.is_some_and(|r| {
                    let in_namespace = match &ns {
                        Some(s) => s.matches(&r.labels.namespace_labels),
                        None => r.labels.namespace == policy.namespace,
                    };
                    in_namespace && pods.matches(&r.labels.pod_labels)
                })
            }
        },
    };
    peer_ok
        && match port {
            None => true,
            Some(p) => match Protocol::from_k8s(p.protocol.as_deref()) {
                None => false,
                Some(protocol) => port_matches(cx, protocol, p.port.as_ref(), p.end_port),
            },
        }
}

/// A port of either kind of object: `protocol`, `port` (unset: every
/// port) and `endPort`; what the apiserver would refuse matches nothing.
fn port_matches(
    cx: &Context<'_>,
    protocol: Protocol,
    port: Option<&IntOrString>,
    end_port: Option<i32>,
) -> bool {
    port_valid(port, end_port)
        && match port {
            None => cx.port_protocol() == Some(protocol),
            Some(IntOrString::Int(first)) => {
                let last = end_port.unwrap_or(*first);
                cx.port_protocol() == Some(protocol)
                    && (*first..=last).contains(&i32::from(cx.packet.port))
            }
            Some(IntOrString::String(name)) => cx.named(protocol, name),
        }
}

/// Whether `port` and `endPort` are what the apiserver accepts.
fn port_valid(port: Option<&IntOrString>, end_port: Option<i32>) -> bool {
    let in_range = |n: i32| (1..=65535).contains(&n);
    match (port, end_port) {
        (None, None) => true,
        (None, Some(_)) => false,
        (Some(IntOrString::Int(n)), None) => in_range(*n),
        (Some(IntOrString::Int(n)), Some(e)) => in_range(*n) && in_range(e) && e >= *n,
        (Some(IntOrString::String(name)), end) => end.is_none() && check_port_name(name).is_ok(),
    }
}

/// `cidr` and `except`, when every one is a CIDR and every except lies
/// strictly inside `cidr`.
fn parse_block(cidr: &str, except: &[String]) -> Option<(IpNet, Vec<IpNet>)> {
    let cidr = parse_cidr(cidr)?;
    let except = except
        .iter()
        .map(|e| parse_cidr(e).filter(|e| cidr.contains(e) && e.prefix_len() > cidr.prefix_len()))
        .collect::<Option<Vec<_>>>()?;
    Some((cidr, except))
}

// ---- PolicyBundle ----------------------------------------------------------------

/// What a bundle peer says of the packet.
enum PeerMatch {
    Yes,
    No,
    /// The peer is broken: it might have matched.
    Broken,
}

fn bundle_peer(cx: &Context<'_>, peer: &Peer) -> PeerMatch {
    let yes = |b: bool| if b { PeerMatch::Yes } else { PeerMatch::No };
    match (&peer.pods, &peer.namespaces, &peer.ip_block) {
        (Some(subject), None, None) => yes(cx
            .remote
            .is_some_and(|r| bundle::selects(subject, &r.labels))),
        (None, Some(ns), None) => yes(cx
            .remote
            .is_some_and(|r| Selector::from(ns).matches(&r.labels.namespace_labels))),
        (None, None, Some(IpBlock { cidr, except })) => match parse_block(cidr, except) {
            Some((cidr, except)) => yes(cx.in_block(&cidr, &except)),
            None => PeerMatch::Broken,
        },
        _ => PeerMatch::Broken,
    }
}

fn bundle_port(cx: &Context<'_>, port: &PolicyPort) -> PeerMatch {
    if !port_valid(port.port.as_ref(), port.end_port) {
        return PeerMatch::Broken;
    }
    if port_matches(cx, port.protocol.into(), port.port.as_ref(), port.end_port) {
        PeerMatch::Yes
    } else {
        PeerMatch::No
    }
}

/// What rule `index` of `b` does with the packet: `None` when it does not
/// match; otherwise its action and origin, or a deny when only a broken
/// part of a `Deny` or `Pass` rule might match.
fn bundle_rule(
    cx: &Context<'_>,
    b: &PolicyBundle,
    index: usize,
    rule: &PolicyRule,
) -> Option<(RuleAction, Origin)> {
    let peers: Vec<PeerMatch> = rule.peers.iter().map(|p| bundle_peer(cx, p)).collect();
    let ports: Vec<PeerMatch> = rule.ports.iter().map(|p| bundle_port(cx, p)).collect();
    let first = |list: &[PeerMatch], want: fn(&PeerMatch) -> bool| list.iter().position(want);
    let is_yes = |m: &PeerMatch| matches!(m, PeerMatch::Yes);
    let is_broken = |m: &PeerMatch| matches!(m, PeerMatch::Broken);
    let peer = first(&peers, is_yes);
    // No ports: every port (`Some(None)`).
    let port: Option<Option<usize>> = if rule.ports.is_empty() {
        Some(None)
    } else {
        first(&ports, is_yes).map(Some)
    };
    let origin = |peer: usize, port: Option<usize>| {
        Origin::Bundle(BundleOrigin {
            tier: b.spec.tier.into(),
            priority: b.spec.priority,
            bundle: bundle::name_of(b).to_owned(),
            direction: cx.direction,
            rule: index,
            name: rule.name.clone(),
            peer,
            port,
        })
    };
    if let (Some(peer), Some(port)) = (peer, port) {
        return Some((rule.action, origin(peer, port)));
    }
    if rule.action == RuleAction::Allow {
        return None;
    }
    // A rule without peers is broken as a whole (peer 0 stands for it).
    let broken_peer = if rule.peers.is_empty() {
        Some(0)
    } else {
        first(&peers, is_broken)
    };
    let broken_port = first(&ports, is_broken).map(Some);
    match (peer.or(broken_peer), port.or(broken_port)) {
        (Some(peer), Some(port)) => Some((RuleAction::Deny, origin(peer, port))),
        _ => None,
    }
}
