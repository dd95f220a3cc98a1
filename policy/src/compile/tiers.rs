//! One direction of one endpoint where PolicyBundles apply (design 0006):
//! Admin bundles → the NetworkPolicy stage → Baseline bundles → the mode's
//! default, first match wins, resolved into one table that
//! [`crate::table::lookup`] reads unchanged.
//!
//! ```text
//!  remote pods ── grouped by what the rules see of them ──▶ identity classes (+ "nobody")
//!  CIDR ids    ── grouped by the ipBlocks holding them  ──▶ CIDR classes (+ WORLD: no prefix)
//!  ports       ── split at every rule's boundary          ──▶ cells (+ "other protocols")
//!        │ verdict(identity class, CIDR class, cell): the stages, in order
//!        ▼
//!  ANY level   = nobody's verdict at WORLD         (a drop by the fallback: no entry)
//!  CIDR level  = nobody's verdict at the class, where it differs from ANY's
//!  pod level   = the class's verdict, where it differs from what falls through,
//!                when it is the same at every CIDR class a pod address can be in
//!        │ each level: any-protocol entry + the fewest port prefixes (ports::lpm_cover)
//!        ▼
//!  Key → (action, origin)
//! ```
//!
//! Why the lookup then gives the verdict: a remote that is not a known pod
//! (WORLD, this node on egress, a pod not learned yet) has no entries of
//! its own, so it reads the CIDR level, then ANY, which hold exactly
//! "nobody"'s verdict at its CIDR class. A known pod's own entries decide
//! only where its verdict differs from that, and there they must not
//! depend on the CIDR class (one entry per identity): where they do, the
//! compiler denies (never wider than written) and reports
//! [`Problem::AddressDependentVerdict`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::IpNet;
use trellis_api::v1alpha1::{PolicyBundle, RuleAction};

use super::{Compiler, Label, Origin, Ports, RuleOrigin, parse_ip_block, parse_port};
use crate::bundle::{self, BundleOrigin, BundleTier};
use crate::diagnostic::{Problem, Source};
use crate::identity::{ANY, IdentityInfo, IdentityKind, NamedPorts, WORLD};
use crate::ports::{PortPrefix, Protocol, lpm_cover};
use crate::selector::Selector;
use crate::table::{Action, Direction, Key};

/// What the caller knows about the direction.
pub(crate) struct Stage<'b> {
    /// The direction compiled.
    pub direction: Direction,
    /// The bundles that apply, in evaluation order (never empty).
    pub bundles: Vec<&'b PolicyBundle>,
    /// Whether NetworkPolicies isolate the pod in this direction (then the
    /// NetworkPolicy stage decides everything that reaches it).
    pub np_isolated: bool,
    /// The drop when nothing decides, if the direction has one: what a
    /// lookup that finds nothing stands for.
    pub fallback: Option<Origin>,
}

/// The entries of the direction's table.
pub(crate) fn compile_direction(cx: &mut Compiler<'_>, stage: &Stage<'_>) -> BTreeMap<Key, Label> {
    let rules = parse_rules(cx, stage);
    let pods = pod_identities(cx.input.identities.as_slice());
    let np = NpStage::new(&cx.candidates[stage.direction as usize]);
    let eval = Evaluator {
        direction: stage.direction,
        rules: &rules,
        np: &np,
        // When NetworkPolicies isolate the pod, the fallback is theirs.
        isolated: stage.fallback.clone().filter(|_| stage.np_isolated),
        always: cx.input.enforcement == trellis_api::v1alpha1::PolicyEnforcement::Always,
        local: &cx.endpoint.named_ports,
    };
    let cells = Cells::new(
        &rules,
        &np,
        &pods,
        stage.direction,
        &cx.endpoint.named_ports,
    );
    let mut labels = Labels::default();
    let nomatch = stage
        .fallback
        .clone()
        .map(|o| labels.intern((Action::Deny, o)));

    // CIDR classes: every CIDR identity, and WORLD (an address in no prefix).
    let cidrs = &cx.input.cidrs;
    let mut by_csig: BTreeMap<CSig, Vec<u32>> = BTreeMap::new();
    for id in cidrs.iter().map(|(_, id)| id).chain([WORLD]) {
        by_csig.entry(csig(&rules, &np, id)).or_default().push(id);
    }
    let everywhere: [IpNet; 2] = [
        IpNet::V4(ipnet::Ipv4Net::default()),
        IpNet::V6(ipnet::Ipv6Net::default()),
    ];
    let classes: Vec<CClass> = by_csig
        .into_values()
        .map(|members| {
            let occurs: Vec<bool> = members
                .iter()
                .map(|&c| everywhere.iter().any(|n| cidrs.witness(c, *n).is_some()))
                .collect();
            let in_pods = members.iter().any(|&c| match &cx.input.pod_networks {
                None => everywhere.iter().any(|n| cidrs.witness(c, *n).is_some()),
                Some(nets) => nets.iter().any(|n| cidrs.witness(c, *n).is_some()),
            });
            CClass {
                members,
                occurs,
                in_pods,
            }
        })
        .collect();
    let world = classes
        .iter()
        .position(|c| c.members.contains(&WORLD))
        .unwrap_or_default();

    // "Nobody" (no pod peer matches it, it declares no port) at each class.
    let nobody: Vec<Vec<u32>> = classes
        .iter()
        .map(|c| {
            cells
                .all
                .iter()
                .map(|cell| labels.intern(eval.verdict(None, c.members[0], *cell)))
                .collect()
        })
        .collect();

    let mut out: BTreeMap<Key, u32> = BTreeMap::new();
    // ANY: nobody's verdict at WORLD; a drop by the fallback is no entry.
    let any_level: Vec<Option<u32>> = nobody[world]
        .iter()
        .map(|l| Some(*l).filter(|l| Some(*l) != nomatch))
        .collect();
    let any_level = fill(any_level, |i| nomatch.unwrap_or(nobody[world][i]));
    cells.emit(ANY, &any_level, &mut out);
    let through_any = &nobody[world];

    // CIDR level: where nobody's verdict at the class differs from ANY's.
    for (i, class) in classes.iter().enumerate() {
        if i == world {
            continue;
        }
        let level: Vec<Option<u32>> = nobody[i]
            .iter()
            .zip(through_any)
            .map(|(v, a)| Some(*v).filter(|v| v != a))
            .collect();
        let level = fill(level, |cell| through_any[cell]);
        for (&c, occurs) in class.members.iter().zip(&class.occurs) {
            if c != WORLD && *occurs {
                cells.emit(c, &level, &mut out);
            }
        }
    }

    // Pod level: each class of known pods whose verdict differs.
    let in_pods: Vec<usize> = (0..classes.len()).filter(|&i| classes[i].in_pods).collect();
    let nobody_sig = rsig(&rules, &np, stage.direction, None);
    let mut by_rsig: BTreeMap<RSig, Vec<&IdentityInfo>> = BTreeMap::new();
    for info in &pods {
        by_rsig
            .entry(rsig(&rules, &np, stage.direction, Some(info)))
            .or_default()
            .push(info);
    }
    let mut degraded: BTreeMap<(String, String), BTreeSet<u32>> = BTreeMap::new();
    for (sig, members) in &by_rsig {
        if *sig == nobody_sig {
            continue;
        }
        let rep = members[0];
        // Set when some cell's verdict depends on the CIDR class: the first
        // bundle rule among the verdicts that disagree, if any.
        let mut inexact: Option<Option<(String, String)>> = None;
        let mut level = Vec::with_capacity(cells.all.len());
        for (n, cell) in cells.all.iter().enumerate() {
            let vals: Vec<u32> = in_pods
                .iter()
                .map(|&c| labels.intern(eval.verdict(Some(rep), classes[c].members[0], *cell)))
                .collect();
            let through: Vec<u32> = in_pods.iter().map(|&c| nobody[c][n]).collect();
            if vals == through {
                level.push(None);
                continue;
            }
            let (label, exact) = constant(&vals, &labels);
            if !exact && inexact.as_ref().is_none_or(Option::is_none) {
                inexact = Some(culprit(&vals, &labels));
            }
            level.push(label);
        }
        if level.first().copied().flatten().is_some() {
            // An any-protocol entry: every port cell of the identity must
            // then say what falling through would have said.
            for (n, cell) in level.iter_mut().enumerate() {
                if cell.is_some() {
                    continue;
                }
                let through: Vec<u32> = in_pods.iter().map(|&c| nobody[c][n]).collect();
                let (label, exact) = constant(&through, &labels);
                if !exact && inexact.as_ref().is_none_or(Option::is_none) {
                    inexact = Some(culprit(&through, &labels));
                }
                *cell = label;
            }
        }
        if let Some(blame) = inexact {
            let (bundle, field) = blame.unwrap_or_else(|| fallback_blame(stage));
            degraded
                .entry((bundle, field))
                .or_default()
                .extend(members.iter().map(|m| m.id));
        }
        for m in members {
            cells.emit(m.id, &level, &mut out);
        }
    }
    for ((bundle, field), ids) in degraded {
        cx.report(
            Source::PolicyBundle(bundle),
            field,
            Problem::AddressDependentVerdict {
                identities: ids.into_iter().collect(),
            },
        );
    }
    out.into_iter()
        .filter_map(|(k, l)| labels.get(l).map(|label| (k, label.clone())))
        .collect()
}

/// The label every value of `vals` agrees on, and whether that is exact:
/// one label → exact; one action with several origins → the first (the
/// action is exact, the origin one of those that decide); several actions
/// → a deny, the narrower verdict, not exact. `None` when `vals` is empty
/// (no address of a pod can be in any class: nothing to say).
fn constant(vals: &[u32], labels: &Labels) -> (Option<u32>, bool) {
    let Some(&first) = vals.first() else {
        return (None, true);
    };
    let action = |l: u32| labels.get(l).map(|(a, _)| *a);
    if vals.iter().all(|v| action(*v) == action(first)) {
        return (Some(first), true);
    }
    let deny = vals
        .iter()
        .copied()
        .find(|v| action(*v) == Some(Action::Deny));
    (deny.or(Some(first)), false)
}

/// The bundle rule to name when a verdict depends on the address: the
/// first bundle origin among `vals`, as (bundle, `spec.<dir>[<rule>]`).
fn culprit(vals: &[u32], labels: &Labels) -> Option<(String, String)> {
    vals.iter().find_map(|v| match labels.get(*v) {
        Some((_, Origin::Bundle(b))) => Some((
            b.bundle.clone(),
            format!("spec.{}[{}]", dir_name(b.direction), b.rule),
        )),
        _ => None,
    })
}

/// The first bundle that applies, when no bundle rule decided any of the
/// verdicts that disagree (the NetworkPolicy stage's `ipBlock` against a
/// bundle's pod rule on another cell).
fn fallback_blame(stage: &Stage<'_>) -> (String, String) {
    let name = stage
        .bundles
        .first()
        .map(|b| bundle::name_of(b).to_owned())
        .unwrap_or_default();
    (name, format!("spec.{}", dir_name(stage.direction)))
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

/// When the any-protocol cell (index 0) is set, every other cell must be
/// too (an uncovered port would read the any-protocol entry): `through`
/// says what the lookup would have found below this level there.
fn fill(mut level: Vec<Option<u32>>, through: impl Fn(usize) -> u32) -> Vec<Option<u32>> {
    if level.first().copied().flatten().is_some() {
        for (i, cell) in level.iter_mut().enumerate() {
            if cell.is_none() {
                *cell = Some(through(i));
            }
        }
    }
    level
}

/// Labels by number, so that tables and comparisons handle `u32`s.
#[derive(Default)]
struct Labels {
    all: Vec<Label>,
    ids: HashMap<Label, u32>,
}

impl Labels {
    fn intern(&mut self, label: Label) -> u32 {
        if let Some(id) = self.ids.get(&label) {
            return *id;
        }
        // Fewer than 2^32 labels: each is a distinct rule origin.
        let id = u32::try_from(self.all.len()).unwrap_or(u32::MAX);
        self.all.push(label.clone());
        self.ids.insert(label, id);
        id
    }

    fn get(&self, id: u32) -> Option<&Label> {
        self.all.get(usize::try_from(id).ok()?)
    }
}

/// A CIDR class: identities that every rule treats alike.
struct CClass {
    members: Vec<u32>,
    /// Per member: whether some address has it.
    occurs: Vec<bool>,
    /// Whether a pod address can have one of them.
    in_pods: bool,
}

// ---- rules -------------------------------------------------------------------

/// A peer of a bundle rule.
enum TierPeer {
    /// Pod identities (`pods`, `namespaces`).
    Pods(BTreeSet<u32>),
    /// CIDR identities (`ipBlock`).
    Cidrs(BTreeSet<u32>),
}

/// A bundle rule, parsed. Its broken peers and ports are left out of
/// `peers` and `ports`; the first of each is remembered, because a broken
/// `Deny` or `Pass` rule denies wherever the broken part might match.
struct TierRule {
    tier: BundleTier,
    action: RuleAction,
    /// The rule's origin, with peer 0 and every port: [`TierRule::matches`]
    /// fills in what matched.
    origin: BundleOrigin,
    peers: Vec<(usize, TierPeer)>,
    /// `None`: the rule has no ports (every port).
    ports: Option<Vec<(usize, Ports)>>,
    broken_peer: Option<usize>,
    broken_port: Option<usize>,
}

/// How a rule matches a packet.
enum Matched {
    /// An intact peer and an intact port match: the rule's action.
    Definite(BundleOrigin),
    /// Only through a broken part: a deny (for `Deny` and `Pass` rules).
    Maybe(BundleOrigin),
}

/// Who the remote end is, as far as the rules can tell: a known pod
/// identity, or nobody they can name.
type Remote<'a> = Option<&'a IdentityInfo>;

/// A class of (protocol, port): every port of a protocol from `.1`
/// (the class's first port, which stands for all of it), or a protocol
/// without ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell {
    Other,
    Port(Protocol, u16),
}

fn port_matches(
    ports: &Ports,
    cell: Cell,
    direction: Direction,
    remote: Remote<'_>,
    local: &NamedPorts,
) -> bool {
    match (ports, cell) {
        (Ports::All, _) => true,
        (_, Cell::Other) => false,
        (Ports::Protocol(p), Cell::Port(q, _)) => *p == q,
        (Ports::Range(p, first, last), Cell::Port(q, n)) => *p == q && *first <= n && n <= *last,
        (Ports::Named(p, name), Cell::Port(q, n)) => {
            *p == q
                && match direction {
                    // Ingress: the pod's own port of that name.
                    Direction::Ingress => local.resolve(name, *p).any(|x| x == n),
                    // Egress: the destination's (a remote that is no known
                    // pod declares none).
                    Direction::Egress => {
                        remote.is_some_and(|i| i.named_ports.resolve(name, *p).any(|x| x == n))
                    }
                }
        }
    }
}

impl TierRule {
    fn matches(
        &self,
        direction: Direction,
        remote: Remote<'_>,
        cidr: u32,
        cell: Cell,
        local: &NamedPorts,
    ) -> Option<Matched> {
        let peer = self
            .peers
            .iter()
            .find(|(_, p)| match p {
                TierPeer::Pods(ids) => remote.is_some_and(|i| ids.contains(&i.id)),
                TierPeer::Cidrs(ids) => ids.contains(&cidr),
            })
            .map(|(i, _)| *i);
        let port: Option<Option<usize>> = match &self.ports {
            None => Some(None),
            Some(list) => list
                .iter()
                .find(|(_, p)| port_matches(p, cell, direction, remote, local))
                .map(|(i, _)| Some(*i)),
        };
        let with = |peer: usize, port: Option<usize>| BundleOrigin {
            peer,
            port,
            ..self.origin.clone()
        };
        if let (Some(peer), Some(port)) = (peer, port) {
            return Some(Matched::Definite(with(peer, port)));
        }
        if self.action == RuleAction::Allow {
            return None;
        }
        match (
            peer.or(self.broken_peer),
            port.or(self.broken_port.map(Some)),
        ) {
            (Some(peer), Some(port)) => Some(Matched::Maybe(with(peer, port))),
            _ => None,
        }
    }
}

fn parse_rules(cx: &mut Compiler<'_>, stage: &Stage<'_>) -> Vec<TierRule> {
    let direction = stage.direction;
    let pods = pod_identities(cx.input.identities.as_slice());
    let mut out = Vec::new();
    for b in &stage.bundles {
        let name = bundle::name_of(b).to_owned();
        let source = || Source::PolicyBundle(name.clone());
        for (index, rule) in bundle::rules(b, direction).iter().enumerate() {
            let base = format!("spec.{}[{index}]", dir_name(direction));
            let mut broken_peer = None;
            let mut peers = Vec::new();
            if rule.peers.is_empty() {
                cx.report(source(), format!("{base}.peers"), Problem::NoPeers);
                broken_peer = Some(0);
            }
            for (j, peer) in rule.peers.iter().enumerate() {
                let field = format!("{base}.peers[{j}]");
                let set = usize::from(peer.pods.is_some())
                    + usize::from(peer.namespaces.is_some())
                    + usize::from(peer.ip_block.is_some());
                let parsed = match (&peer.pods, &peer.namespaces, &peer.ip_block) {
                    _ if set != 1 => {
                        cx.report(source(), field, Problem::PeerFields(set));
                        None
                    }
                    (Some(subject), _, _) => Some(TierPeer::Pods(
                        pods.iter()
                            .filter(|i| bundle::selects(subject, &i.labels))
                            .map(|i| i.id)
                            .collect(),
                    )),
                    (_, Some(ns), _) => {
                        let s = Selector::from(ns);
                        Some(TierPeer::Pods(
                            pods.iter()
                                .filter(|i| s.matches(&i.labels.namespace_labels))
                                .map(|i| i.id)
                                .collect(),
                        ))
                    }
                    (_, _, Some(block)) => {
                        match parse_ip_block(&cx.input.cidrs, &block.cidr, &block.except) {
                            Ok(ids) => Some(TierPeer::Cidrs(ids.into_iter().collect())),
                            Err(problems) => {
                                for (sub, problem) in problems {
                                    cx.report(source(), format!("{field}.ipBlock{sub}"), problem);
                                }
                                None
                            }
                        }
                    }
                    (None, None, None) => None,
                };
                match parsed {
                    Some(p) => peers.push((j, p)),
                    None => {
                        broken_peer.get_or_insert(j);
                    }
                }
            }
            let mut broken_port = None;
            let ports = if rule.ports.is_empty() {
                None
            } else {
                let mut list = Vec::new();
                for (k, port) in rule.ports.iter().enumerate() {
                    match parse_port(Ok(port.protocol.into()), port.port.as_ref(), port.end_port) {
                        Ok(spec) => list.push((k, spec)),
                        Err(problems) => {
                            for (sub, problem) in problems {
                                cx.report(source(), format!("{base}.ports[{k}].{sub}"), problem);
                            }
                            broken_port.get_or_insert(k);
                        }
                    }
                }
                Some(list)
            };
            if rule.action != RuleAction::Allow {
                for (broken, part) in [(broken_peer, "peer"), (broken_port, "port")] {
                    if broken.is_some() {
                        let action = bundle::action_name(rule.action);
                        cx.report(source(), &base, Problem::BrokenPartDenies { action, part });
                    }
                }
            }
            out.push(TierRule {
                tier: b.spec.tier.into(),
                action: rule.action,
                origin: BundleOrigin {
                    tier: b.spec.tier.into(),
                    priority: b.spec.priority,
                    bundle: name.clone(),
                    direction,
                    rule: index,
                    name: rule.name.clone(),
                    peer: 0,
                    port: None,
                },
                peers,
                ports,
                broken_peer,
                broken_port,
            });
        }
    }
    out
}

/// The pod identities of the input, one per id (the first when an id is
/// listed twice).
fn pod_identities(identities: &[IdentityInfo]) -> Vec<&IdentityInfo> {
    let mut seen = BTreeSet::new();
    identities
        .iter()
        .filter(|i| IdentityKind::of(i.id) == IdentityKind::Pod && seen.insert(i.id))
        .collect()
}

// ---- the NetworkPolicy stage ---------------------------------------------------

/// The NetworkPolicy compiler's candidate entries (all allows), by
/// identity: the stage allows a packet when an entry of its identity, its
/// CIDR identity or ANY covers it, and names the smallest such origin.
struct NpStage<'c> {
    by_identity: HashMap<u32, Vec<(Key, &'c RuleOrigin)>>,
}

impl<'c> NpStage<'c> {
    fn new(candidates: &'c BTreeMap<Key, RuleOrigin>) -> Self {
        let mut by_identity: HashMap<u32, Vec<(Key, &RuleOrigin)>> = HashMap::new();
        for (k, o) in candidates {
            by_identity.entry(k.identity).or_default().push((*k, o));
        }
        NpStage { by_identity }
    }

    fn entries(&self, identity: u32) -> &[(Key, &'c RuleOrigin)] {
        self.by_identity
            .get(&identity)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    fn allows(&self, remote: Remote<'_>, cidr: u32, cell: Cell) -> Option<&'c RuleOrigin> {
        let idents = [remote.map(|i| i.id), Some(cidr), Some(ANY)];
        let mut best: Option<&RuleOrigin> = None;
        for (i, ident) in idents.iter().enumerate() {
            let Some(ident) = *ident else { continue };
            if idents[..i].contains(&Some(ident)) {
                continue;
            }
            for (key, origin) in self.entries(ident) {
                let covers = match cell {
                    _ if key.proto == 0 => true,
                    Cell::Other => false,
                    Cell::Port(p, n) => {
                        key.proto == p.number()
                            && PortPrefix {
                                port: key.port,
                                plen: key.plen,
                            }
                            .contains(n)
                    }
                };
                if covers && best.is_none_or(|b| *origin < b) {
                    best = Some(*origin);
                }
            }
        }
        best
    }
}

// ---- verdicts --------------------------------------------------------------------

struct Evaluator<'e, 'c> {
    direction: Direction,
    rules: &'e [TierRule],
    np: &'e NpStage<'c>,
    /// When NetworkPolicies isolate the pod: the origin of their drop.
    isolated: Option<Origin>,
    always: bool,
    local: &'e NamedPorts,
}

impl Evaluator<'_, '_> {
    /// The stages in order, for a remote end (`None`: nobody a rule can
    /// name), a CIDR identity and a cell.
    fn verdict(&self, remote: Remote<'_>, cidr: u32, cell: Cell) -> Label {
        let direction = self.direction;
        if let Some(label) = self.tier(BundleTier::Admin, remote, cidr, cell) {
            return label;
        }
        if let Some(isolated) = &self.isolated {
            return match self.np.allows(remote, cidr, cell) {
                Some(o) => (Action::Allow, Origin::Rule(o.clone())),
                None => (Action::Deny, isolated.clone()),
            };
        }
        if let Some(label) = self.tier(BundleTier::Baseline, remote, cidr, cell) {
            return label;
        }
        if self.always {
            (Action::Deny, Origin::DefaultDeny { direction })
        } else {
            (Action::Allow, Origin::NotIsolated { direction })
        }
    }

    /// The rules of one tier, in order: the first that matches decides;
    /// `None` when none does or a `Pass` hands the packet on.
    fn tier(&self, tier: BundleTier, remote: Remote<'_>, cidr: u32, cell: Cell) -> Option<Label> {
        for rule in self.rules.iter().filter(|r| r.tier == tier) {
            match rule.matches(self.direction, remote, cidr, cell, self.local) {
                None => {}
                Some(Matched::Maybe(o)) => return Some((Action::Deny, Origin::Bundle(o))),
                Some(Matched::Definite(o)) => {
                    return match rule.action {
                        RuleAction::Allow => Some((Action::Allow, Origin::Bundle(o))),
                        RuleAction::Deny => Some((Action::Deny, Origin::Bundle(o))),
                        RuleAction::Pass => None,
                    };
                }
            }
        }
        None
    }
}

// ---- classes -------------------------------------------------------------------

/// What the rules see of a CIDR identity: which `ipBlock` peers hold it,
/// and the NetworkPolicy entries keyed on it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct CSig {
    blocks: Vec<bool>,
    np: Vec<(Key, RuleOrigin)>,
}

fn csig(rules: &[TierRule], np: &NpStage<'_>, cidr: u32) -> CSig {
    let blocks = rules
        .iter()
        .flat_map(|r| &r.peers)
        .filter_map(|(_, p)| match p {
            TierPeer::Cidrs(ids) => Some(ids.contains(&cidr)),
            TierPeer::Pods(_) => None,
        })
        .collect();
    CSig {
        blocks,
        np: np
            .entries(cidr)
            .iter()
            .map(|(k, o)| (*k, (*o).clone()))
            .collect(),
    }
}

/// What the rules see of a pod identity: which pod peers match it, the
/// numbers its named ports give egress rules, and the NetworkPolicy
/// entries keyed on it. Identities with equal signatures get equal
/// verdicts everywhere.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RSig {
    pods: Vec<bool>,
    named: Vec<Vec<u16>>,
    np: Vec<(Key, RuleOrigin)>,
}

fn rsig(rules: &[TierRule], np: &NpStage<'_>, direction: Direction, remote: Remote<'_>) -> RSig {
    let pods = rules
        .iter()
        .flat_map(|r| &r.peers)
        .filter_map(|(_, p)| match p {
            TierPeer::Pods(ids) => Some(remote.is_some_and(|i| ids.contains(&i.id))),
            TierPeer::Cidrs(_) => None,
        })
        .collect();
    let named = match direction {
        Direction::Ingress => Vec::new(),
        Direction::Egress => rules
            .iter()
            .flat_map(|r| r.ports.iter().flatten())
            .filter_map(|(_, p)| match p {
                Ports::Named(proto, name) => Some(
                    remote
                        .map(|i| i.named_ports.resolve(name, *proto).collect())
                        .unwrap_or_default(),
                ),
                _ => None,
            })
            .collect(),
    };
    let np = remote
        .map(|i| {
            np.entries(i.id)
                .iter()
                .map(|(k, o)| (*k, (*o).clone()))
                .collect()
        })
        .unwrap_or_default();
    RSig { pods, named, np }
}

/// The cells: "other protocols", then per protocol the port ranges between
/// consecutive boundaries of any rule, so that every rule matches a cell
/// wholly or not at all.
struct Cells {
    all: Vec<Cell>,
    /// Per protocol: its cells' range in `all`, and each cell's last port.
    protos: Vec<(Protocol, std::ops::Range<usize>, Vec<u16>)>,
}

impl Cells {
    fn new(
        rules: &[TierRule],
        np: &NpStage<'_>,
        pods: &[&IdentityInfo],
        direction: Direction,
        local: &NamedPorts,
    ) -> Self {
        let mut starts: BTreeMap<Protocol, BTreeSet<u32>> = Protocol::ALL
            .iter()
            .map(|p| (*p, BTreeSet::from([0])))
            .collect();
        let mut cut = |p: Protocol, first: u32, last: u32| {
            if let Some(set) = starts.get_mut(&p) {
                set.insert(first);
                if last < u32::from(u16::MAX) {
                    set.insert(last + 1);
                }
            }
        };
        for (_, port) in rules.iter().flat_map(|r| r.ports.iter().flatten()) {
            match port {
                Ports::All | Ports::Protocol(_) => {}
                Ports::Range(p, first, last) => cut(*p, u32::from(*first), u32::from(*last)),
                Ports::Named(p, name) => {
                    let numbers: Vec<u16> = match direction {
                        Direction::Ingress => local.resolve(name, *p).collect(),
                        Direction::Egress => pods
                            .iter()
                            .flat_map(|i| i.named_ports.resolve(name, *p))
                            .collect(),
                    };
                    for n in numbers {
                        cut(*p, u32::from(n), u32::from(n));
                    }
                }
            }
        }
        for (key, _) in np.by_identity.values().flatten() {
            if let Some(p) = Protocol::from_number(key.proto) {
                let prefix = PortPrefix {
                    port: key.port,
                    plen: key.plen,
                };
                cut(p, u32::from(prefix.first()), u32::from(prefix.last()));
            }
        }
        let mut all = vec![Cell::Other];
        let mut protos = Vec::new();
        for (p, set) in starts {
            let firsts: Vec<u16> = set.iter().filter_map(|s| u16::try_from(*s).ok()).collect();
            let begin = all.len();
            let mut lasts = Vec::with_capacity(firsts.len());
            for (i, first) in firsts.iter().enumerate() {
                all.push(Cell::Port(p, *first));
                lasts.push(firsts.get(i + 1).map_or(u16::MAX, |next| next - 1));
            }
            protos.push((p, begin..all.len(), lasts));
        }
        Cells { all, protos }
    }

    /// The entries of identity `ident` for one level: `level[i]` is what
    /// cell `i` must find there (`None`: nothing, it falls through).
    /// Cell 0 (other protocols) set means an any-protocol entry; then every
    /// cell must be set.
    fn emit(&self, ident: u32, level: &[Option<u32>], out: &mut BTreeMap<Key, u32>) {
        let background = level.first().copied().flatten();
        if let Some(v) = background {
            out.insert(Key::any_protocol(ident), v);
        }
        for (p, range, lasts) in &self.protos {
            let mut runs: Vec<(u16, u16, Option<u32>)> = Vec::new();
            for (i, last) in range.clone().zip(lasts) {
                let Cell::Port(_, first) = self.all[i] else {
                    continue;
                };
                let value = level.get(i).copied().flatten();
                match runs.last_mut() {
                    Some(run) if run.2 == value => run.1 = *last,
                    _ => runs.push((first, *last, value)),
                }
            }
            for (prefix, v) in lpm_cover(&runs, background) {
                out.insert(Key::ports(ident, *p, prefix), v);
            }
        }
    }
}
