//! NetworkPolicy and PolicyBundles → one endpoint's two tables.
//!
//! NetworkPolicy alone (no bundle applies to the pod in a direction) keeps
//! Kubernetes' semantics and the tables of the NetworkPolicy compiler
//! below. When a bundle applies, the direction is compiled by
//! `compile/tiers.rs` (design 0006): Admin bundles, then this
//! NetworkPolicy stage, then Baseline bundles, then the enforcement
//! mode's default, resolved at compile time into the same kind of table.
//!
//! ```text
//!  policies of the pod's namespace
//!     │ podSelector matches the pod? policyTypes → isolated directions
//!     ▼
//!  each rule of a selecting policy, in an isolated direction
//!     │ peers  → identities: ANY │ pod identities │ CIDR identities
//!     │ ports  → any protocol │ protocol │ port prefixes │ named → numbers
//!     ▼
//!  Key (identity, proto, plen, port) → Entry (rule, Allow)     + HOST on ingress
//! ```
//!
//! Every allow is a union, so the order of policies, rules and peers does not
//! matter; when two rules give the same key, the entry names the smaller
//! origin. Rule ids are handed out in origin order, so the same policies give
//! the same tables and the same provenance whatever the input order.
//!
//! What cannot be enforced becomes a [`Diagnostic`] and matches nothing: a
//! broken peer or port is dropped from its rule (a rule left with no peer or
//! no port allows nothing), a broken `podSelector` of the policy itself
//! isolates every pod of the namespace and allows nothing, and an unknown
//! `policyTypes` value isolates both directions.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as K8sLabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use trellis_api::v1alpha1::{PolicyBundle, PolicyEnforcement};

use crate::bundle::{self, BundleOrigin};
use crate::cidr::{CidrTable, parse_cidr};
use crate::diagnostic::{Diagnostic, PolicyRef, Problem, Source};
use crate::identity::{ANY, HOST, IdentityInfo, IdentityKind, NamedPorts, SecurityLabels};
use crate::ports::{PortPrefix, Protocol, port_prefixes};
use crate::selector::{Selector, SelectorError};
use crate::table::{Action, Decision, Direction, DirectionTable, EndpointPolicy, Entry, Key};

pub(crate) mod tiers;

/// The rule id of the entry that lets the pod's own node in (health probes).
pub const RULE_FROM_HOST: u32 = 1;
/// The first rule id handed to a policy rule; ids below are reserved origins
/// (0 is "no rule").
pub const RULE_FIRST_POLICY: u32 = 16;

/// Everything a node compiles against.
#[derive(Debug, Clone, Default)]
pub struct Input {
    /// The cluster's enforcement mode (`NetworkConfig.spec.policyEnforcement`).
    pub enforcement: PolicyEnforcement,
    /// NetworkPolicies; only those in the endpoint's namespace can select it.
    pub policies: Vec<NetworkPolicy>,
    /// PolicyBundles (cluster-scoped): Admin ones before `policies`,
    /// Baseline ones after (design 0006).
    pub bundles: Vec<PolicyBundle>,
    /// Every pod identity of the cluster (ids outside the pod range are
    /// ignored: a policy never grants anything to a reserved identity).
    /// Namespace selectors are decided from each identity's own namespace
    /// labels, so the tables agree with the label sets packets carry.
    pub identities: Vec<IdentityInfo>,
    /// The node's CIDR identities; it must hold every prefix of `policies`
    /// and `bundles` (build it with [`CidrTable::from_objects`] from the
    /// same objects).
    pub cidrs: CidrTable,
    /// The address ranges pods get their addresses from (the IP pools), or
    /// `None` when unknown (any address). A pod's packets carry the CIDR
    /// identity of its address, and knowing which CIDR identities a pod
    /// address can have lets more bundles compile exactly (design 0006,
    /// "rules on addresses before rules on pods"). Every address of a pod
    /// identity must lie in one of these ranges.
    pub pod_networks: Option<Vec<IpNet>>,
}

/// The pod being compiled for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// Its identity. The tables never depend on it (a pod's own identity is
    /// just another peer), which is what lets pods with equal labels and
    /// ports share one compiled policy; it is here for whoever keeps the
    /// endpoint table.
    pub identity: u32,
    /// Its namespace, namespace labels and labels.
    pub labels: SecurityLabels,
    /// Its own named container ports (ingress named ports resolve here).
    pub named_ports: NamedPorts,
}

/// Where a verdict comes from: the rule (or the default) that decided.
/// The variants' order is part of the rule numbering (ids are handed out
/// in origin order), so new ones go last.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// Traffic from the pod's own node into an isolated pod ([`RULE_FROM_HOST`]).
    FromHost,
    /// A rule of a NetworkPolicy.
    Rule(RuleOrigin),
    /// A rule of a PolicyBundle.
    Bundle(BundleOrigin),
    /// NetworkPolicies isolate the pod in this direction and none of their
    /// rules allows the traffic.
    Isolated {
        /// The direction.
        direction: Direction,
        /// The policies that select the pod for this direction.
        policies: Vec<PolicyRef>,
    },
    /// No NetworkPolicy isolates the pod in this direction, no bundle
    /// decided, and the enforcement mode is `Default`: allowed.
    NotIsolated {
        /// The direction.
        direction: Direction,
    },
    /// No NetworkPolicy isolates the pod in this direction, no bundle
    /// decided, and the enforcement mode is `Always`: denied.
    DefaultDeny {
        /// The direction.
        direction: Direction,
    },
}

/// A NetworkPolicy rule, down to the peer and port that gave an entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleOrigin {
    /// The policy.
    pub policy: PolicyRef,
    /// `ingress` or `egress`.
    pub direction: Direction,
    /// Index in `spec.ingress` / `spec.egress`.
    pub rule: usize,
    /// Index in `from` / `to`; `None` when the rule has no peers (all peers).
    pub peer: Option<usize>,
    /// Index in `ports`; `None` when the rule has no ports (all ports).
    pub port: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = |d: &Direction| match d {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        match self {
            Origin::FromHost => f.write_str("traffic from this node"),
            Origin::Bundle(b) => write!(f, "{b}"),
            Origin::Isolated {
                direction,
                policies,
            } => {
                f.write_str("isolated by networkpolicy ")?;
                for (i, p) in policies.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{p}")?;
                }
                write!(f, " ({}), nothing allowed", dir(direction))
            }
            Origin::NotIsolated { direction } => write!(
                f,
                "no networkpolicy isolates the pod ({}): allowed (enforcement Default)",
                dir(direction)
            ),
            Origin::DefaultDeny { direction } => {
                write!(f, "default deny ({}, enforcement Always)", dir(direction))
            }
            Origin::Rule(r) => {
                let (dir, peers) = match r.direction {
                    Direction::Ingress => ("ingress", "from"),
                    Direction::Egress => ("egress", "to"),
                };
                write!(f, "networkpolicy {} spec.{dir}[{}]", r.policy, r.rule)?;
                match r.peer {
                    Some(p) => write!(f, " {peers}[{p}]")?,
                    None => write!(f, " (every peer)")?,
                }
                match r.port {
                    Some(p) => write!(f, " ports[{p}]"),
                    None => write!(f, " (every port)"),
                }
            }
        }
    }
}

/// Rule id → origin, for counters, flow events and "why was this allowed";
/// and, per direction, what a lookup that finds no entry means (the
/// datapath drops: [`Decision::NoMatch`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Provenance {
    rules: BTreeMap<u32, Origin>,
    /// (ingress, egress): why nothing found is a drop, when it can happen.
    no_match: [Option<Origin>; 2],
}

impl Provenance {
    /// The origin of `rule`.
    pub fn get(&self, rule: u32) -> Option<&Origin> {
        self.rules.get(&rule)
    }

    /// Why a lookup in `direction`'s table that finds no entry is a drop:
    /// the pod is isolated by NetworkPolicies that allow nothing more
    /// ([`Origin::Isolated`]) or by the enforcement mode
    /// ([`Origin::DefaultDeny`]). `None` when the table cannot miss (or the
    /// direction is not isolated).
    pub fn no_match(&self, direction: Direction) -> Option<&Origin> {
        self.no_match[direction as usize].as_ref()
    }

    /// The origin of what [`crate::table::lookup`] decided in `direction`.
    pub fn explain(&self, direction: Direction, decision: Decision) -> Option<&Origin> {
        match decision {
            Decision::Allow { rule } | Decision::Deny { rule } => self.get(rule),
            Decision::NoMatch => self.no_match(direction),
        }
    }

    /// Every (rule, origin), by rule id.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Origin)> {
        self.rules.iter().map(|(r, o)| (*r, o))
    }

    /// How many rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// One endpoint's compiled policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Compiled {
    /// The two tables.
    pub policy: EndpointPolicy,
    /// Every rule id the tables use. Two endpoints can share one datapath
    /// policy id when `policy` and `provenance` are both equal.
    pub provenance: Provenance,
    /// What could not be enforced, sorted and without repeats.
    pub diagnostics: Vec<Diagnostic>,
}

/// Compiles the ingress and egress tables of `endpoint`.
///
/// Kubernetes' semantics: the pod is isolated in a direction when a policy of
/// its namespace selects it with that direction in its `policyTypes` (or
/// always, or never, per [`Input::enforcement`]); then a connection passes
/// when any rule of any such policy allows it. Ingress of an isolated pod also
/// admits its own node ([`HOST`], [`RULE_FROM_HOST`]).
///
/// Where a PolicyBundle applies to the pod (its subject selects the pod and
/// it has rules for the direction), the direction is enforced and decided
/// in order: Admin bundles, the NetworkPolicy stage above, Baseline
/// bundles, the mode's default (design 0006). `Never` enforces nothing.
pub fn compile_endpoint(input: &Input, endpoint: &LocalEndpoint) -> Compiled {
    if input.enforcement == PolicyEnforcement::Never {
        return Compiled::default();
    }
    let always = input.enforcement == PolicyEnforcement::Always;
    let mut cx = Compiler {
        input,
        endpoint,
        candidates: [BTreeMap::new(), BTreeMap::new()],
        diagnostics: BTreeSet::new(),
    };
    // Per direction, the policies that isolate the pod.
    let mut isolating: [Vec<PolicyRef>; 2] = [Vec::new(), Vec::new()];
    let default_spec = NetworkPolicySpec::default();
    for policy in &input.policies {
        let Some(namespace) = policy.metadata.namespace.as_deref() else {
            cx.diagnose(
                policy_ref(policy),
                "metadata.namespace",
                Problem::NoNamespace,
            );
            continue;
        };
        if namespace != endpoint.labels.namespace {
            continue;
        }
        let pref = policy_ref(policy);
        let spec = policy.spec.as_ref().unwrap_or(&default_spec);
        let (selected, rules_apply) =
            match cx.selector(&pref, "spec.podSelector", spec.pod_selector.as_ref()) {
                Some(s) => (s.matches(&endpoint.labels.pod_labels), true),
                // Fail closed: isolate every pod the policy might select, allow nothing.
                None => (true, false),
            };
        if !selected {
            continue;
        }
        let (ingress, egress) = cx.policy_types(&pref, spec);
        if ingress {
            isolating[0].push(pref.clone());
            if rules_apply {
                for (i, rule) in spec.ingress.iter().flatten().enumerate() {
                    cx.rule(
                        &pref,
                        Direction::Ingress,
                        i,
                        rule.from.as_deref(),
                        rule.ports.as_deref(),
                    );
                }
            }
        }
        if egress {
            isolating[1].push(pref.clone());
            if rules_apply {
                for (i, rule) in spec.egress.iter().flatten().enumerate() {
                    cx.rule(
                        &pref,
                        Direction::Egress,
                        i,
                        rule.to.as_deref(),
                        rule.ports.as_deref(),
                    );
                }
            }
        }
    }
    for list in &mut isolating {
        list.sort();
        list.dedup();
    }

    let mut tables: [Option<BTreeMap<Key, Label>>; 2] = [None, None];
    let mut no_match: [Option<Origin>; 2] = [None, None];
    for direction in [Direction::Ingress, Direction::Egress] {
        let d = direction as usize;
        let np_isolated = !isolating[d].is_empty();
        // What the direction falls back to when nothing decides: a drop,
        // when the pod is isolated by policy or by the mode.
        let fallback = if np_isolated {
            Some(Origin::Isolated {
                direction,
                policies: isolating[d].clone(),
            })
        } else if always {
            Some(Origin::DefaultDeny { direction })
        } else {
            None
        };
        let bundles = bundle::applying(&input.bundles, &endpoint.labels, direction);
        if !bundles.is_empty() {
            let stage = tiers::Stage {
                direction,
                bundles,
                np_isolated,
                fallback: fallback.clone(),
            };
            tables[d] = Some(tiers::compile_direction(&mut cx, &stage));
            no_match[d] = fallback;
        } else if np_isolated || always {
            let entries = cx.candidates[d]
                .iter()
                .map(|(k, o)| (*k, (Action::Allow, Origin::Rule(o.clone()))))
                .collect();
            tables[d] = Some(entries);
            no_match[d] = fallback;
        }
    }
    let diagnostics = std::mem::take(&mut cx.diagnostics);
    assemble(tables, no_match, diagnostics)
}

/// What an entry says: its action and the origin its rule id will name.
pub(crate) type Label = (Action, Origin);

/// Numbers the origins, in origin order, and builds the tables. `None`: a
/// direction that is not isolated. Ingress of an isolated pod admits its
/// own node.
fn assemble(
    mut tables: [Option<BTreeMap<Key, Label>>; 2],
    no_match: [Option<Origin>; 2],
    diagnostics: BTreeSet<Diagnostic>,
) -> Compiled {
    if let Some(ingress) = &mut tables[0] {
        ingress.insert(Key::any_protocol(HOST), (Action::Allow, Origin::FromHost));
    }
    // Rule ids in origin order, for the origins some entry names.
    let origins: BTreeSet<&Origin> = tables
        .iter()
        .flatten()
        .flat_map(|t| t.values().map(|(_, o)| o))
        .filter(|o| **o != Origin::FromHost)
        .collect();
    let mut ids: BTreeMap<&Origin, u32> = origins
        .into_iter()
        .zip(RULE_FIRST_POLICY..=u32::MAX)
        .collect();
    let from_host = Origin::FromHost;
    ids.insert(&from_host, RULE_FROM_HOST);
    let mut rules = BTreeMap::new();
    let mut built = [DirectionTable::default(), DirectionTable::default()];
    for (table, entries) in built.iter_mut().zip(&tables) {
        let Some(entries) = entries else {
            continue;
        };
        table.isolated = true;
        for (key, (action, origin)) in entries {
            // Every origin of an entry has an id: they were numbered above,
            // unless there are more than 2^32 of them.
            let Some(&rule) = ids.get(origin) else {
                continue;
            };
            rules.insert(rule, origin.clone());
            table.entries.insert(
                *key,
                Entry {
                    rule,
                    action: *action,
                },
            );
        }
    }
    let [ingress, egress] = built;
    Compiled {
        policy: EndpointPolicy { ingress, egress },
        provenance: Provenance { rules, no_match },
        diagnostics: diagnostics.into_iter().collect(),
    }
}

fn policy_ref(policy: &NetworkPolicy) -> PolicyRef {
    PolicyRef {
        namespace: policy.metadata.namespace.clone().unwrap_or_default(),
        name: policy.metadata.name.clone().unwrap_or_default(),
    }
}

/// Who a peer is.
pub(crate) enum Peers<'a> {
    /// Every address: identity [`ANY`].
    Any,
    /// These pod identities.
    Pods(Vec<&'a IdentityInfo>),
    /// These CIDR identities (an `ipBlock`).
    Cidrs(Vec<u32>),
}

/// Which ports a rule port stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ports {
    /// Every protocol and port (the rule has no ports).
    All,
    /// Every port of a protocol (`port` unset).
    Protocol(Protocol),
    /// `port..=endPort`.
    Range(Protocol, u16, u16),
    /// A container port name.
    Named(Protocol, String),
}

pub(crate) struct Compiler<'a> {
    input: &'a Input,
    endpoint: &'a LocalEndpoint,
    /// Per direction (ingress, egress): key → the smallest origin giving it.
    candidates: [BTreeMap<Key, RuleOrigin>; 2],
    diagnostics: BTreeSet<Diagnostic>,
}

impl<'a> Compiler<'a> {
    fn diagnose(&mut self, policy: PolicyRef, field: impl Into<String>, problem: Problem) {
        self.report(Source::NetworkPolicy(policy), field, problem);
    }

    fn report(&mut self, source: Source, field: impl Into<String>, problem: Problem) {
        self.diagnostics.insert(Diagnostic {
            source,
            field: field.into(),
            problem,
        });
    }

    /// `None` (reported) when the selector is invalid; an unset selector
    /// selects everything.
    fn selector(
        &mut self,
        policy: &PolicyRef,
        field: &str,
        selector: Option<&K8sLabelSelector>,
    ) -> Option<Selector> {
        let Some(selector) = selector else {
            return Some(Selector::everything());
        };
        match Selector::try_from(selector) {
            Ok(s) => Some(s),
            Err(SelectorError {
                field: inner,
                reason,
            }) => {
                self.diagnose(
                    policy.clone(),
                    format!("{field}.{inner}"),
                    Problem::Selector(reason),
                );
                None
            }
        }
    }

    /// (ingress, egress). Unset or empty: Ingress, plus Egress when the
    /// policy has egress rules (the apiserver's defaulting).
    fn policy_types(&mut self, policy: &PolicyRef, spec: &NetworkPolicySpec) -> (bool, bool) {
        let types = spec.policy_types.as_deref().unwrap_or_default();
        if types.is_empty() {
            let has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
            return (true, has_egress);
        }
        let (mut ingress, mut egress, mut unknown) = (false, false, false);
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "Ingress" => ingress = true,
                "Egress" => egress = true,
                other => {
                    unknown = true;
                    self.diagnose(
                        policy.clone(),
                        format!("spec.policyTypes[{i}]"),
                        Problem::UnknownPolicyType(other.to_owned()),
                    );
                }
            }
        }
        if unknown {
            (true, true)
        } else {
            (ingress, egress)
        }
    }

    fn rule(
        &mut self,
        policy: &PolicyRef,
        direction: Direction,
        index: usize,
        peers: Option<&[NetworkPolicyPeer]>,
        ports: Option<&[NetworkPolicyPort]>,
    ) {
        let (dir, peers_name) = match direction {
            Direction::Ingress => ("ingress", "from"),
            Direction::Egress => ("egress", "to"),
        };
        let base = format!("spec.{dir}[{index}]");

        // An empty or missing list means "all"; a list whose every element is
        // broken means "none" (never widen).
        let peer_sets: Vec<(Option<usize>, Peers<'a>)> = match peers {
            None | Some([]) => vec![(None, Peers::Any)],
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    let field = format!("{base}.{peers_name}[{i}]");
                    self.peer(policy, &field, p).map(|set| (Some(i), set))
                })
                .collect(),
        };
        let port_specs: Vec<(Option<usize>, Ports)> = match ports {
            None | Some([]) => vec![(None, Ports::All)],
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    let field = format!("{base}.ports[{i}]");
                    self.port(policy, &field, p).map(|spec| (Some(i), spec))
                })
                .collect(),
        };

        for (port_index, ports) in &port_specs {
            let mut named_resolved = false;
            let mut named_towards_pods = false;
            for (peer_index, peers) in &peer_sets {
                let origin = RuleOrigin {
                    policy: policy.clone(),
                    direction,
                    rule: index,
                    peer: *peer_index,
                    port: *port_index,
                };
                if let (Ports::Named(_, name), Direction::Egress, Peers::Cidrs(_)) =
                    (ports, direction, peers)
                {
                    let field = format!(
                        "{base}.{peers_name}[{}].ipBlock",
                        peer_index.unwrap_or_default()
                    );
                    self.diagnose(
                        policy.clone(),
                        field,
                        Problem::NamedPortWithIpBlock { name: name.clone() },
                    );
                    continue;
                }
                named_towards_pods = true;
                let keys = self.keys(direction, peers, ports);
                named_resolved |= !keys.is_empty();
                let table = &mut self.candidates[direction as usize];
                for key in keys {
                    table
                        .entry(key)
                        .and_modify(|o| {
                            if origin < *o {
                                *o = origin.clone();
                            }
                        })
                        .or_insert_with(|| origin.clone());
                }
            }
            let unresolved = match (ports, direction) {
                // Ingress names resolve against the pod itself, whoever the peers are.
                (Ports::Named(p, name), Direction::Ingress) => {
                    !peer_sets.is_empty()
                        && self.endpoint.named_ports.resolve(name, *p).next().is_none()
                }
                (Ports::Named(..), Direction::Egress) => named_towards_pods && !named_resolved,
                _ => false,
            };
            if let Ports::Named(protocol, name) = ports
                && unresolved
            {
                let field = format!("{base}.ports[{}].port", port_index.unwrap_or_default());
                self.diagnose(
                    policy.clone(),
                    field,
                    Problem::NamedPortUnresolved {
                        name: name.clone(),
                        protocol: *protocol,
                    },
                );
            }
        }
    }

    /// The keys of one (peer, port) pair. An egress named port towards an
    /// `ipBlock` never gets here.
    fn keys(&self, direction: Direction, peers: &Peers<'a>, ports: &Ports) -> Vec<Key> {
        let idents: Vec<u32> = match peers {
            Peers::Any => vec![ANY],
            Peers::Pods(infos) => infos.iter().map(|i| i.id).collect(),
            Peers::Cidrs(ids) => ids.clone(),
        };
        let mut keys = Vec::new();
        match ports {
            Ports::All => keys.extend(idents.iter().map(|&id| Key::any_protocol(id))),
            Ports::Protocol(p) => {
                let every = PortPrefix { port: 0, plen: 0 };
                keys.extend(idents.iter().map(|&id| Key::ports(id, *p, every)));
            }
            Ports::Range(p, first, last) => {
                for prefix in port_prefixes(*first, *last) {
                    keys.extend(idents.iter().map(|&id| Key::ports(id, *p, prefix)));
                }
            }
            Ports::Named(p, name) => {
                let one = |port| PortPrefix { port, plen: 16 };
                match (direction, peers) {
                    // Ingress: the pod's own ports, whoever the peer is.
                    (Direction::Ingress, _) => {
                        for n in self.endpoint.named_ports.resolve(name, *p) {
                            keys.extend(idents.iter().map(|&id| Key::ports(id, *p, one(n))));
                        }
                    }
                    // Egress to anyone: every pod identity declaring the name
                    // (an address that is not a pod declares no port).
                    (Direction::Egress, Peers::Any) => {
                        for info in self.pod_identities() {
                            for n in info.named_ports.resolve(name, *p) {
                                keys.push(Key::ports(info.id, *p, one(n)));
                            }
                        }
                    }
                    (Direction::Egress, Peers::Pods(infos)) => {
                        for info in infos {
                            for n in info.named_ports.resolve(name, *p) {
                                keys.push(Key::ports(info.id, *p, one(n)));
                            }
                        }
                    }
                    (Direction::Egress, Peers::Cidrs(_)) => {}
                }
            }
        }
        keys
    }

    fn pod_identities(&self) -> impl Iterator<Item = &'a IdentityInfo> + use<'a> {
        self.input
            .identities
            .iter()
            .filter(|i| IdentityKind::of(i.id) == IdentityKind::Pod)
    }

    /// Who a peer stands for; `None` (reported) when it is broken.
    fn peer(
        &mut self,
        policy: &PolicyRef,
        field: &str,
        peer: &NetworkPolicyPeer,
    ) -> Option<Peers<'a>> {
        match (&peer.ip_block, &peer.namespace_selector, &peer.pod_selector) {
            (Some(_), None, None) => {}
            (Some(_), _, _) => {
                self.diagnose(policy.clone(), field, Problem::IpBlockWithSelector);
                return None;
            }
            (None, None, None) => {
                self.diagnose(policy.clone(), field, Problem::EmptyPeer);
                return None;
            }
            (None, _, _) => {}
        }
        if let Some(block) = &peer.ip_block {
            return self.ip_block(policy, &format!("{field}.ipBlock"), block);
        }
        let pods = self.selector(
            policy,
            &format!("{field}.podSelector"),
            peer.pod_selector.as_ref(),
        );
        let namespaces = match &peer.namespace_selector {
            Some(s) => {
                Some(self.selector(policy, &format!("{field}.namespaceSelector"), Some(s))?)
            }
            None => None,
        };
        let pods = pods?;
        let infos = self
            .pod_identities()
            .filter(|i| match &namespaces {
                Some(ns) => ns.matches(&i.labels.namespace_labels),
                None => i.labels.namespace == policy.namespace,
            })
            .filter(|i| pods.matches(&i.labels.pod_labels))
            .collect();
        Some(Peers::Pods(infos))
    }

    /// The CIDR identities inside `cidr` and inside no `except`.
    fn ip_block(&mut self, policy: &PolicyRef, field: &str, block: &IPBlock) -> Option<Peers<'a>> {
        let except = block.except.as_deref().unwrap_or_default();
        match parse_ip_block(&self.input.cidrs, &block.cidr, except) {
            Ok(ids) => Some(Peers::Cidrs(ids)),
            Err(problems) => {
                for (sub, problem) in problems {
                    self.diagnose(policy.clone(), format!("{field}{sub}"), problem);
                }
                None
            }
        }
    }

    /// What a rule port stands for; `None` (reported) when it is broken.
    fn port(&mut self, policy: &PolicyRef, field: &str, port: &NetworkPolicyPort) -> Option<Ports> {
        let protocol = Protocol::from_k8s(port.protocol.as_deref())
            .ok_or_else(|| Problem::UnknownProtocol(port.protocol.clone().unwrap_or_default()));
        match parse_port(protocol, port.port.as_ref(), port.end_port) {
            Ok(spec) => Some(spec),
            Err(problems) => {
                for (sub, problem) in problems {
                    self.diagnose(policy.clone(), format!("{field}.{sub}"), problem);
                }
                None
            }
        }
    }
}

/// The CIDR identities of an `ipBlock`: those whose prefix lies inside
/// `cidr` and inside no `except` (0004 §3). Errors: (the field under the
/// `ipBlock`, e.g. `.cidr` or `.except[1]`, or empty for the block itself,
/// and what is wrong there).
pub(crate) fn parse_ip_block(
    cidrs: &CidrTable,
    cidr: &str,
    except: &[String],
) -> Result<Vec<u32>, Vec<(String, Problem)>> {
    let mut problems = Vec::new();
    let parsed = parse_cidr(cidr);
    if parsed.is_none() {
        problems.push((".cidr".to_owned(), Problem::InvalidCidr(cidr.to_owned())));
    }
    let mut excepts = Vec::new();
    for (i, raw) in except.iter().enumerate() {
        let at = format!(".except[{i}]");
        match (parse_cidr(raw), parsed) {
            (None, _) => problems.push((at, Problem::InvalidCidr(raw.clone()))),
            (Some(e), Some(c)) if !(c.contains(&e) && e.prefix_len() > c.prefix_len()) => {
                problems.push((
                    at,
                    Problem::ExceptOutsideCidr {
                        except: e.to_string(),
                        cidr: c.to_string(),
                    },
                ));
            }
            (Some(e), _) => excepts.push(e),
        }
    }
    let Some(cidr) = parsed.filter(|_| problems.is_empty()) else {
        return Err(problems);
    };
    // The claim of 0004 §3 holds only if the table has every prefix.
    for p in std::iter::once(&cidr).chain(&excepts) {
        if cidrs.identity_of(p).is_none() {
            return Err(vec![(
                String::new(),
                Problem::CidrWithoutIdentity(p.to_string()),
            )]);
        }
    }
    let inside = |p: &IpNet| cidr.contains(p) && !excepts.iter().any(|e| e.contains(p));
    Ok(cidrs
        .iter()
        .filter(|(p, _)| inside(p))
        .map(|(_, id)| id)
        .collect())
}

/// What a rule port stands for: `protocol` (or what is wrong with it),
/// `port` and `endPort`. Errors: (`protocol`, `port` or `endPort`, what is
/// wrong there).
pub(crate) fn parse_port(
    protocol: Result<Protocol, Problem>,
    port: Option<&IntOrString>,
    end_port: Option<i32>,
) -> Result<Ports, Vec<(&'static str, Problem)>> {
    let mut problems = Vec::new();
    let protocol = match protocol {
        Ok(p) => Some(p),
        Err(problem) => {
            problems.push(("protocol", problem));
            None
        }
    };
    let in_range = |n: i32| u16::try_from(n).ok().filter(|n| *n != 0);
    let spec = match (port, end_port) {
        (None, None) => protocol.map(Ports::Protocol),
        (None, Some(_)) => {
            problems.push(("endPort", Problem::EndPortWithoutNumericPort));
            None
        }
        (Some(IntOrString::Int(n)), end) => {
            let first = in_range(*n);
            if first.is_none() {
                problems.push(("port", Problem::PortOutOfRange(i64::from(*n))));
            }
            let last = match end {
                None => first,
                Some(e) => match (in_range(e), first) {
                    (None, _) => {
                        problems.push(("endPort", Problem::PortOutOfRange(i64::from(e))));
                        None
                    }
                    (Some(last), Some(first)) if last < first => {
                        let problem = Problem::EndPortBelowPort {
                            port: first,
                            end: i64::from(e),
                        };
                        problems.push(("endPort", problem));
                        None
                    }
                    (last, _) => last,
                },
            };
            match (protocol, first, last) {
                (Some(p), Some(first), Some(last)) => Some(Ports::Range(p, first, last)),
                _ => None,
            }
        }
        (Some(IntOrString::String(name)), end) => {
            if let Err(why) = check_port_name(name) {
                let name = name.clone();
                problems.push(("port", Problem::InvalidPortName { name, why }));
            }
            if end.is_some() {
                problems.push(("endPort", Problem::EndPortWithoutNumericPort));
            }
            protocol.map(|p| Ports::Named(p, name.clone()))
        }
    };
    match spec {
        Some(spec) if problems.is_empty() => Ok(spec),
        _ => Err(problems),
    }
}

/// An IANA service name, as the apiserver requires of a named port: 1 to 15
/// lowercase alphanumerics or '-', at least one letter, no '-' at either end
/// and no "--".
pub(crate) fn check_port_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 15 {
        return Err("must be 1 to 15 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lowercase alphanumerics and '-'");
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("must contain a letter");
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err("no '-' at either end and no \"--\"");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
