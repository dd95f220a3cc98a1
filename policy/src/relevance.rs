//! Which identities one endpoint's compilation depends on (the scale
//! budget: no node recompiles policy for an unrelated pod; design 0005,
//! "Implementation notes (recompiling for a changed identity)").
//!
//! ```text
//!  Input (policies, bundles) + LocalEndpoint
//!        │ what applies to the endpoint: NetworkPolicies of its namespace
//!        │ that select it, PolicyBundles whose subject selects it
//!        ▼
//!  IdentityDependencies { pod peers of their rules, egress port names }
//!        │ affected_by(identity): a peer selects it, or it declares a name
//!        │ affected_by_change(before, after): added, removed, relabelled:
//!        │   either version is affected; same labels: the numbers it gives
//!        │   a name that an egress rule resolves against it differ
//!        ▼
//!  false ⇒ compile_endpoint(input ± identity, endpoint) == compile_endpoint(input, endpoint)
//! ```
//!
//! The summary is computed once per compilation, from the policies and
//! the endpoint only (never from `Input::identities`), and checking an
//! identity against it matches a few label selectors: a node holds one per
//! cached compilation and checks every identity that was added, removed or
//! changed against each.
//!
//! The claim, for identities with distinct ids (the node's are: one
//! `SecurityIdentity` per id): when
//! [`IdentityDependencies::affected_by_change`] says `false` for adding an
//! identity to `Input::identities`, removing one, or replacing one by
//! another version with the same id, compiling after the change gives
//! exactly the same [`Compiled`](crate::Compiled) as before — the same
//! tables, the same rule ids, the same provenance and diagnostics. Why,
//! from the compiler:
//!
//! - NetworkPolicy: an identity gets entries only as a pod peer
//!   (`podSelector`/`namespaceSelector`) of a rule of a policy that
//!   selects the endpoint, or, for an egress rule with no `to` (every
//!   peer), through a named port it declares. Nothing else reads the
//!   identities: `ANY` and CIDR keys do not depend on them.
//! - PolicyBundles (`compile/tiers.rs`): identities are grouped by what
//!   the applying rules see of them — the `pods`/`namespaces` peers that
//!   select them, the numbers their named ports give egress rules (whatever
//!   the peer: towards an `ipBlock` the name resolves against the pod at the
//!   address), and the NetworkPolicy entries keyed on them. An identity that
//!   no peer selects, that declares none of the egress names and that has no
//!   NetworkPolicy entry looks exactly like "nobody", gets no entry of its
//!   own, and adds no port boundary (cells come from rule ports, the
//!   NetworkPolicy entries and the egress names' numbers).
//! - Rule ids are handed out in origin order over the origins some entry
//!   names, per compilation. An identity that adds no entry adds no origin,
//!   so no id moves.
//! - Diagnostics that depend on identities (an egress named port that
//!   resolves nowhere; `AddressDependentVerdict`, which lists identities)
//!   come only from the same peers and names.
//! - Named ports of a remote identity are read only for egress names
//!   (ingress names are the endpoint's own ports), so a version with the
//!   same labels, which the same peers select, differs only through the
//!   numbers it gives such a name.
//!
//! Deliberately wider than needed (false positives are only a
//! recompilation): every rule of a NetworkPolicy that selects the endpoint
//! counts whatever its `policyTypes`; a name counts with any protocol;
//! every egress name of a bundle counts whoever its peers are. A broken
//! selector or peer selects no identity in the compiler, and none here.

use std::collections::BTreeSet;

use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use trellis_api::v1alpha1::{PolicyEnforcement, PolicyPort, Subject};

use crate::bundle;
use crate::compile::{Input, LocalEndpoint};
use crate::identity::{IdentityInfo, IdentityKind, SecurityLabels};
use crate::ports::Protocol;
use crate::selector::Selector;
use crate::table::Direction;

/// What one compilation (`compile_endpoint(input, endpoint)`) reads of
/// `Input::identities`: see the [module](self).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct IdentityDependencies {
    /// The pod peers of every rule that applies to the endpoint.
    peers: BTreeSet<PodPeer>,
    /// Container port names whose numbers, on a remote pod that no peer
    /// selects, an egress rule that applies to the endpoint reads (rules
    /// towards every peer, and bundle rules).
    egress_names: BTreeSet<String>,
    /// Every container port name of an egress rule that applies to the
    /// endpoint: the names whose numbers are read on a remote pod that a
    /// peer selects.
    all_egress_names: BTreeSet<String>,
}

/// A peer that stands for pod identities.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum PodPeer {
    /// Pods of one namespace (a NetworkPolicy peer without
    /// `namespaceSelector`: the policy's own namespace).
    InNamespace { namespace: String, pods: Selector },
    /// Pods whose namespace's labels match `namespaces`.
    InNamespaces {
        namespaces: Selector,
        pods: Selector,
    },
}

impl PodPeer {
    fn selects(&self, labels: &SecurityLabels) -> bool {
        match self {
            PodPeer::InNamespace { namespace, pods } => {
                labels.namespace == *namespace && pods.matches(&labels.pod_labels)
            }
            PodPeer::InNamespaces { namespaces, pods } => {
                namespaces.matches(&labels.namespace_labels) && pods.matches(&labels.pod_labels)
            }
        }
    }
}

impl IdentityDependencies {
    /// What `compile_endpoint(input, endpoint)` depends on, read from the
    /// policies and bundles that apply to `endpoint` (never from
    /// `input.identities`, so the summary of a compilation stays valid
    /// while only identities change).
    pub fn of(input: &Input, endpoint: &LocalEndpoint) -> Self {
        let mut deps = IdentityDependencies::default();
        if input.enforcement == PolicyEnforcement::Never {
            // Nothing is compiled at all.
            return deps;
        }
        for policy in &input.policies {
            if policy.metadata.namespace.as_deref() != Some(endpoint.labels.namespace.as_str()) {
                continue;
            }
            let Some(spec) = &policy.spec else {
                // No rules, whatever it isolates.
                continue;
            };
            // A broken podSelector isolates and allows nothing: no peer counts.
            let selects = match &spec.pod_selector {
                None => true,
                Some(s) => {
                    Selector::try_from(s).is_ok_and(|s| s.matches(&endpoint.labels.pod_labels))
                }
            };
            if !selects {
                continue;
            }
            let namespace = endpoint.labels.namespace.as_str();
            for rule in spec.ingress.iter().flatten() {
                deps.np_peers(namespace, rule.from.as_deref());
            }
            for rule in spec.egress.iter().flatten() {
                deps.np_peers(namespace, rule.to.as_deref());
                // Every peer: each pod identity declaring the name gets
                // entries. Towards pod peers, only those they select.
                let every_peer = rule.to.as_deref().is_none_or(<[_]>::is_empty);
                deps.names(np_names(rule.ports.as_deref()), every_peer);
            }
        }
        for direction in [Direction::Ingress, Direction::Egress] {
            for b in bundle::applying(&input.bundles, &endpoint.labels, direction) {
                for rule in bundle::rules(b, direction) {
                    for peer in &rule.peers {
                        match (&peer.pods, &peer.namespaces, &peer.ip_block) {
                            (Some(subject), None, None) => {
                                deps.peers.insert(subject_peer(subject));
                            }
                            (None, Some(ns), None) => {
                                deps.peers.insert(PodPeer::InNamespaces {
                                    namespaces: Selector::from(ns),
                                    pods: Selector::everything(),
                                });
                            }
                            // `ipBlock`s select addresses; anything else is
                            // broken and selects nobody.
                            _ => {}
                        }
                    }
                    if direction == Direction::Egress {
                        deps.names(bundle_names(&rule.ports), true);
                    }
                }
            }
        }
        deps
    }

    /// Whether `identity` (added, removed, or as it is before or after a
    /// change) can change the compilation this summarises. Identities
    /// outside the pod range never can: the compiler ignores them.
    pub fn affected_by(&self, identity: &IdentityInfo) -> bool {
        if IdentityKind::of(identity.id) != IdentityKind::Pod {
            return false;
        }
        self.selects(&identity.labels)
            || identity
                .named_ports
                .iter()
                .any(|(name, _, _)| self.egress_names.contains(name))
    }

    /// Whether a change of one identity can change the compilation this
    /// summarises: `before` and `after` are its versions (`None`: it is
    /// added, or removed). A change that keeps the labels (only the named
    /// ports of the pods with the identity changed) counts only when it
    /// changes the numbers of a name that an applying egress rule resolves
    /// against it: a rule towards every peer or of a bundle, or any egress
    /// rule when a peer selects it. (The same peers select both versions,
    /// and ingress named ports are the endpoint's own.)
    pub fn affected_by_change(
        &self,
        before: Option<&IdentityInfo>,
        after: Option<&IdentityInfo>,
    ) -> bool {
        match (before, after) {
            (Some(b), Some(a)) if b.id == a.id && b.labels == a.labels => {
                let differs = |names: &BTreeSet<String>| {
                    names.iter().any(|n| numbers(b, n).ne(numbers(a, n)))
                };
                IdentityKind::of(b.id) == IdentityKind::Pod
                    && (differs(&self.egress_names)
                        || (self.selects(&b.labels) && differs(&self.all_egress_names)))
            }
            _ => before.into_iter().chain(after).any(|i| self.affected_by(i)),
        }
    }

    /// Whether a peer selects pods with `labels`.
    fn selects(&self, labels: &SecurityLabels) -> bool {
        self.peers.iter().any(|p| p.selects(labels))
    }

    /// Whether no identity can change the compilation.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty() && self.all_egress_names.is_empty()
    }

    fn names<'n>(&mut self, names: impl Iterator<Item = &'n String>, every_peer: bool) {
        for name in names {
            if every_peer {
                self.egress_names.insert(name.clone());
            }
            self.all_egress_names.insert(name.clone());
        }
    }

    fn np_peers(&mut self, namespace: &str, peers: Option<&[NetworkPolicyPeer]>) {
        for peer in peers.into_iter().flatten() {
            if peer.ip_block.is_some() {
                // An address peer, or broken (with selectors too).
                continue;
            }
            let pods = match &peer.pod_selector {
                None => Selector::everything(),
                Some(s) => match Selector::try_from(s) {
                    Ok(s) => s,
                    Err(_) => continue,
                },
            };
            match &peer.namespace_selector {
                None if peer.pod_selector.is_none() => {} // empty: broken
                None => {
                    self.peers.insert(PodPeer::InNamespace {
                        namespace: namespace.to_owned(),
                        pods,
                    });
                }
                Some(ns) => {
                    if let Ok(namespaces) = Selector::try_from(ns) {
                        self.peers
                            .insert(PodPeer::InNamespaces { namespaces, pods });
                    }
                }
            }
        }
    }
}

/// The numbers `identity` gives `name`, with every protocol.
fn numbers<'a>(
    identity: &'a IdentityInfo,
    name: &'a str,
) -> impl Iterator<Item = (Protocol, u16)> + use<'a> {
    identity
        .named_ports
        .iter()
        .filter(move |(n, _, _)| *n == name)
        .map(|(_, p, number)| (p, number))
}

/// The port names of a NetworkPolicy rule.
fn np_names(ports: Option<&[NetworkPolicyPort]>) -> impl Iterator<Item = &String> {
    ports.into_iter().flatten().filter_map(|p| match &p.port {
        Some(IntOrString::String(name)) => Some(name),
        _ => None,
    })
}

/// The port names of a bundle rule.
fn bundle_names(ports: &[PolicyPort]) -> impl Iterator<Item = &String> {
    ports.iter().filter_map(|p| match &p.port {
        Some(IntOrString::String(name)) => Some(name),
        _ => None,
    })
}

fn subject_peer(subject: &Subject) -> PodPeer {
    PodPeer::InNamespaces {
        namespaces: Selector::from(&subject.namespace_selector),
        pods: Selector::from(&subject.pod_selector),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::identity::NamedPorts;

    fn labels(ns: &str, team: &str, app: &str) -> SecurityLabels {
        SecurityLabels::new(
            ns,
            BTreeMap::from([
                ("kubernetes.io/metadata.name".to_owned(), ns.to_owned()),
                ("team".to_owned(), team.to_owned()),
            ]),
            BTreeMap::from([("app".to_owned(), app.to_owned())]),
        )
    }

    fn identity(id: u32, ns: &str, team: &str, app: &str) -> IdentityInfo {
        IdentityInfo {
            id,
            labels: labels(ns, team, app),
            named_ports: NamedPorts::new(),
        }
    }

    fn endpoint(ns: &str, team: &str, app: &str) -> LocalEndpoint {
        LocalEndpoint {
            identity: 300,
            labels: labels(ns, team, app),
            named_ports: NamedPorts::new(),
        }
    }

    fn input(policies: serde_json::Value, bundles: serde_json::Value) -> Input {
        Input {
            policies: serde_json::from_value(policies).expect("policies"),
            bundles: serde_json::from_value(bundles).expect("bundles"),
            ..Input::default()
        }
    }

    #[test]
    fn the_peers_of_what_applies_to_the_endpoint_and_nothing_else() {
        let input = input(
            json!([{
                "metadata": {"namespace": "shop", "name": "db"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "db"}},
                    "ingress": [{"from": [
                        {"podSelector": {"matchLabels": {"app": "web"}}},
                        {"namespaceSelector": {"matchLabels": {"team": "ops"}}},
                        {"ipBlock": {"cidr": "10.0.0.0/8"}}
                    ]}],
                    "egress": [{"ports": [{"protocol": "TCP", "port": "metrics"}]}]
                }
            }]),
            json!([{
                "apiVersion": "network.trellis.dev/v1alpha1",
                "kind": "PolicyBundle",
                "metadata": {"name": "guard"},
                "spec": {
                    "tier": "Admin",
                    "priority": 1,
                    "subject": {"podSelector": {"matchLabels": {"app": "db"}}},
                    "egress": [{"action": "Deny",
                                "peers": [{"pods": {"podSelector": {"matchLabels": {"app": "cache"}}}}],
                                "ports": [{"port": "redis"}]}]
                }
            }]),
        );
        let db = IdentityDependencies::of(&input, &endpoint("shop", "dev", "db"));
        // Selected by a peer of the NetworkPolicy: web of its own namespace,
        // every pod of an ops namespace.
        assert!(db.affected_by(&identity(400, "shop", "dev", "web")));
        assert!(!db.affected_by(&identity(401, "other", "dev", "web")));
        assert!(db.affected_by(&identity(402, "tools", "ops", "anything")));
        // Selected by the bundle's peer, in any namespace.
        assert!(db.affected_by(&identity(403, "kv", "dev", "cache")));
        // Selected by nothing, declaring no name that counts.
        let mut stranger = identity(404, "kv", "dev", "batch");
        assert!(!db.affected_by(&stranger));
        stranger.named_ports.insert("http", Protocol::Tcp, 80);
        assert!(!db.affected_by(&stranger));
        // Egress names: of an every-peer NetworkPolicy rule, of any bundle rule.
        for name in ["metrics", "redis"] {
            let mut named = identity(405, "kv", "dev", "batch");
            named.named_ports.insert(name, Protocol::Udp, 9);
            assert!(db.affected_by(&named), "{name}");
        }
        // Not a pod identity: the compiler ignores it.
        assert!(!db.affected_by(&identity(2, "shop", "dev", "web")));

        // Changes. Added or removed: as the identity itself.
        let web = identity(400, "shop", "dev", "web");
        assert!(db.affected_by_change(None, Some(&web)));
        assert!(db.affected_by_change(Some(&web), None));
        assert!(!db.affected_by_change(Some(&stranger), None));
        // New labels: either version counts.
        let mut moved = web.clone();
        moved.labels = labels("other", "dev", "web");
        assert!(db.affected_by_change(Some(&web), Some(&moved)));
        assert!(db.affected_by_change(Some(&moved), Some(&web)));
        let mut moved_stranger = stranger.clone();
        moved_stranger.labels = labels("other", "dev", "cron");
        assert!(!db.affected_by_change(Some(&stranger), Some(&moved_stranger)));
        // Same labels, other named ports: only the numbers of an egress
        // name count, even for an identity a peer selects; of a name of a
        // rule towards pods, only for an identity a peer selects.
        let mut web_http = web.clone();
        web_http.named_ports.insert("http", Protocol::Tcp, 8080);
        assert!(!db.affected_by_change(Some(&web), Some(&web_http)));
        let mut web_metrics = web_http.clone();
        web_metrics
            .named_ports
            .insert("metrics", Protocol::Tcp, 9100);
        assert!(db.affected_by_change(Some(&web_http), Some(&web_metrics)));
        let mut web_metrics_again = web_metrics.clone();
        web_metrics_again
            .named_ports
            .insert("http", Protocol::Tcp, 8081);
        assert!(!db.affected_by_change(Some(&web_metrics), Some(&web_metrics_again)));

        // Nothing applies to web (another app), or to db elsewhere.
        for other in [
            endpoint("shop", "dev", "web"),
            endpoint("prod", "dev", "db"),
        ] {
            let deps = IdentityDependencies::of(&input, &other);
            let guard_applies = other.labels.pod_labels["app"] == "db";
            assert_eq!(deps.is_empty(), !guard_applies, "{other:?}");
            assert!(!deps.affected_by(&identity(400, "shop", "dev", "web")));
        }
        // Never: nothing is compiled.
        let never = Input {
            enforcement: PolicyEnforcement::Never,
            ..input
        };
        assert!(IdentityDependencies::of(&never, &endpoint("shop", "dev", "db")).is_empty());
    }

    #[test]
    fn names_towards_pod_peers_count_for_the_pods_they_select() {
        let input = input(
            json!([{
                "metadata": {"namespace": "ops", "name": "tool"},
                "spec": {
                    "podSelector": {},
                    "policyTypes": ["Egress"],
                    "egress": [{
                        "to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}],
                        "ports": [{"protocol": "TCP", "port": "http"}]
                    }]
                }
            }]),
            json!([]),
        );
        let tool = IdentityDependencies::of(&input, &endpoint("ops", "ops", "tool"));
        let with_http = |mut i: IdentityInfo| {
            i.named_ports.insert("http", Protocol::Tcp, 8080);
            i
        };
        let web = identity(400, "shop", "dev", "web");
        let batch = identity(401, "shop", "dev", "batch");
        // A new pod identity declaring the name: only a selected one.
        assert!(tool.affected_by(&web));
        assert!(!tool.affected_by(&with_http(batch.clone())));
        // Its numbers change: the same.
        assert!(tool.affected_by_change(Some(&web), Some(&with_http(web.clone()))));
        assert!(!tool.affected_by_change(Some(&batch), Some(&with_http(batch.clone()))));
    }

    #[test]
    fn broken_selectors_select_nobody_here_as_in_the_compiler() {
        let input = input(
            json!([
                {
                    "metadata": {"namespace": "shop", "name": "broken-subject"},
                    "spec": {
                        "podSelector": {"matchExpressions": [{"key": "app", "operator": "Near"}]},
                        "ingress": [{"from": [{"podSelector": {}}]}]
                    }
                },
                {
                    "metadata": {"namespace": "shop", "name": "broken-peers"},
                    "spec": {
                        "podSelector": {},
                        "ingress": [{"from": [
                            {},
                            {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}},
                            {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}
                        ]}]
                    }
                }
            ]),
            json!([]),
        );
        let deps = IdentityDependencies::of(&input, &endpoint("shop", "dev", "db"));
        assert!(deps.is_empty(), "{deps:?}");
    }
}
