//! The oracle: Kubernetes NetworkPolicy semantics, read straight from the `networking.k8s.io/v1`
//! API reference and evaluated pod by pod, over the objects as the apiserver holds them.
//!
//! ```text
//!  Snapshot { namespaces, pods, policies }  +  Connection { from, to, protocol, port }
//!        │
//!        ├─ egress of `from`:  isolated iff some policy of its namespace selects it with
//!        │                     policyTypes ∋ Egress; then some such policy's egress rule must
//!        │                     match (peer `to` at its address, port)
//!        ├─ ingress of `to`:   the same with Ingress, peer `from`
//!        ▼
//!  Verdict { egress, ingress }: allowed iff both sides allow
//! ```
//!
//! It is written to be read, not to be fast, and shares nothing with Trellis' policy compiler
//! (`trellis-policy`) or its reference model (`policy/tests/model`): an oracle that was tuned
//! to agree with the compiler could not catch where both misread Kubernetes. Its inputs come
//! back from the apiserver, so they are valid (the apiserver refused anything else) and
//! defaulted; it still follows the documented defaults where a field is unset, so its unit
//! tests can leave them out. Where Kubernetes leaves a choice to the implementation, the choice
//! is the one the upstream NetworkPolicy e2e tests make, and says so:
//! - a pod reaching itself never leaves its network namespace: always allowed (upstream's
//!   `AllowLoopback`);
//! - `ipBlock` matches pod addresses too (upstream tests pods by `ipBlock` with their /32s);
//! - a named port is the destination pod's port of that name and protocol, on ingress and on
//!   egress alike (the port of a rule is always the destination's).

use std::{collections::BTreeMap, fmt, net::IpAddr};

use trellis_api::v1alpha1::{PolicyBundle, Tier};

use super::bundles;

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod},
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

/// A transport protocol the truth tables probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// As the Kubernetes API spells it.
    pub fn as_k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_k8s())
    }
}

/// The cluster as the oracle sees it: every object it needs, as the apiserver holds them.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<NetworkPolicy>,
    /// Every PolicyBundle (cluster-scoped).
    pub bundles: Vec<PolicyBundle>,
}

/// One connection attempt: `from`, at `from_ip`, opens `protocol`/`port` to `to` at `to_ip`.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    pub from: &'a Pod,
    pub from_ip: IpAddr,
    pub to: &'a Pod,
    pub to_ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

/// What one side (the sender's egress, the receiver's ingress) says about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    /// The pod talks to itself: the packet never leaves its namespace.
    Loopback,
    /// No policy selects the pod for this direction.
    NotIsolated,
    /// Isolated, and these policies (`namespace/name`) have a rule that matches.
    Allowed { by: Vec<String> },
    /// Isolated by these policies, and none of them has a rule that matches.
    Denied { isolated_by: Vec<String> },
    /// A PolicyBundle rule matched first and its action (`Allow` or `Deny`) decided.
    Bundle(BundleRule),
}

/// The PolicyBundle rule that decided one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleRule {
    pub bundle: String,
    pub tier: Tier,
    pub priority: i32,
    /// `ingress` or `egress`: the list the rule is in.
    pub direction: &'static str,
    /// Index in that list.
    pub rule: usize,
    /// `Allow` (true) or `Deny` (false).
    pub allows: bool,
}

impl fmt::Display for BundleRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} by policybundle {} ({:?} {}) spec.{}[{}]",
            if self.allows { "allowed" } else { "denied" },
            self.bundle,
            self.tier,
            self.priority,
            self.direction,
            self.rule
        )
    }
}

impl Side {
    pub fn allows(&self) -> bool {
        match self {
            Side::Denied { .. } => false,
            Side::Bundle(rule) => rule.allows,
            Side::Loopback | Side::NotIsolated | Side::Allowed { .. } => true,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Side::Loopback => f.write_str("loopback"),
            Side::NotIsolated => f.write_str("not isolated"),
            Side::Allowed { by } => write!(f, "allowed by {}", by.join(", ")),
            Side::Denied { isolated_by } => write!(
                f,
                "isolated by {} and no rule matches",
                isolated_by.join(", ")
            ),
            Side::Bundle(rule) => write!(f, "{rule}"),
        }
    }
}

/// The oracle's answer for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub egress: Side,
    pub ingress: Side,
}

impl Verdict {
    /// Both the sender's egress and the receiver's ingress allow it.
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "egress: {}; ingress: {}", self.egress, self.ingress)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn policy_type(self) -> &'static str {
        match self {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        }
    }

    /// The local pod, the peer and the peer's address of `c` seen from this side: on egress
    /// the sender is local, on ingress the receiver.
    pub(super) fn ends<'a>(self, c: &Connection<'a>) -> (&'a Pod, &'a Pod, IpAddr) {
        match self {
            Direction::Egress => (c.from, c.to, c.to_ip),
            Direction::Ingress => (c.to, c.from, c.from_ip),
        }
    }
}

/// Whether `connection` is allowed, and why.
pub fn evaluate(snapshot: &Snapshot, connection: &Connection) -> Verdict {
    if key(connection.from) == key(connection.to) {
        return Verdict {
            egress: Side::Loopback,
            ingress: Side::Loopback,
        };
    }
    Verdict {
        egress: side(snapshot, connection, Direction::Egress),
        ingress: side(snapshot, connection, Direction::Ingress),
    }
}

/// One direction, in stages: the first that decides wins.
fn side(snapshot: &Snapshot, c: &Connection, direction: Direction) -> Side {
    bundles::stage(snapshot, c, direction, Tier::Admin)
        .or_else(|| network_policy_side(snapshot, c, direction))
        .or_else(|| bundles::stage(snapshot, c, direction, Tier::Baseline))
        .unwrap_or(Side::NotIsolated)
}

/// The NetworkPolicy stage of one direction: for egress the local pod is the sender and the
/// peer the receiver; for ingress the other way round. The port is always the receiver's.
/// `None` when no policy isolates the pod in this direction.
fn network_policy_side(snapshot: &Snapshot, c: &Connection, direction: Direction) -> Option<Side> {
    let (local, peer, peer_ip) = direction.ends(c);
    let mut isolated_by = Vec::new();
    let mut allowed_by = Vec::new();
    for policy in &snapshot.policies {
        let Some(spec) = &policy.spec else { continue };
        if policy.metadata.namespace != local.metadata.namespace
            || !selects(spec.pod_selector.as_ref(), labels(&local.metadata.labels))
            || !policy_types(spec).contains(&direction.policy_type())
        {
            continue;
        }
        let name = format!(
            "{}/{}",
            policy.metadata.namespace.as_deref().unwrap_or_default(),
            policy.metadata.name.as_deref().unwrap_or_default()
        );
        // A rule is its peers and its ports; a missing list means every peer, every port.
        let policy_ns = policy.metadata.namespace.as_deref().unwrap_or_default();
        let rule_matches = |peers: Option<&Vec<NetworkPolicyPeer>>,
                            ports: Option<&Vec<NetworkPolicyPort>>| {
            peers_match(snapshot, policy_ns, peers, peer, peer_ip)
                && ports_match(ports, c.to, c.protocol, c.port)
        };
        let matches = match direction {
            Direction::Ingress => spec
                .ingress
                .iter()
                .flatten()
                .any(|r| rule_matches(r.from.as_ref(), r.ports.as_ref())),
            Direction::Egress => spec
                .egress
                .iter()
                .flatten()
                .any(|r| rule_matches(r.to.as_ref(), r.ports.as_ref())),
        };
        if matches {
            allowed_by.push(name.clone());
        }
        isolated_by.push(name);
    }
    if isolated_by.is_empty() {
        None
    } else if allowed_by.is_empty() {
        Some(Side::Denied { isolated_by })
    } else {
        Some(Side::Allowed { by: allowed_by })
    }
}

/// `spec.policyTypes`, or its documented default when unset: `Ingress`, plus `Egress` when
/// the policy has egress rules.
fn policy_types(spec: &NetworkPolicySpec) -> Vec<&str> {
    match &spec.policy_types {
        Some(types) if !types.is_empty() => types.iter().map(String::as_str).collect(),
        _ => {
            let mut types = vec!["Ingress"];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                types.push("Egress");
            }
            types
        }
    }
}

/// A rule's peers: an empty or missing list matches every peer, else any one must match.
fn peers_match(
    snapshot: &Snapshot,
    policy_ns: &str,
    peers: Option<&Vec<NetworkPolicyPeer>>,
    peer: &Pod,
    peer_ip: IpAddr,
) -> bool {
    match peers {
        None => true,
        Some(list) if list.is_empty() => true,
        Some(list) => list
            .iter()
            .any(|p| peer_matches(snapshot, policy_ns, p, peer, peer_ip)),
    }
}

fn peer_matches(
    snapshot: &Snapshot,
    policy_ns: &str,
    selector: &NetworkPolicyPeer,
    peer: &Pod,
    peer_ip: IpAddr,
) -> bool {
    if let Some(block) = &selector.ip_block {
        return cidr_contains(&block.cidr, peer_ip)
            && !block
                .except
                .iter()
                .flatten()
                .any(|except| cidr_contains(except, peer_ip));
    }
    let peer_ns = peer.metadata.namespace.as_deref().unwrap_or_default();
    let namespace_ok = match &selector.namespace_selector {
        // No namespaceSelector: the policy's own namespace.
        None => peer_ns == policy_ns,
        Some(ns_selector) => selects(Some(ns_selector), namespace_labels(snapshot, peer)),
    };
    let pod_ok = match &selector.pod_selector {
        // No podSelector: every pod of the selected namespaces.
        None => true,
        Some(pod_selector) => selects(Some(pod_selector), labels(&peer.metadata.labels)),
    };
    // A peer must set one of the three; the apiserver refuses an empty one.
    let set = selector.namespace_selector.is_some() || selector.pod_selector.is_some();
    set && namespace_ok && pod_ok
}

/// A rule's ports: an empty or missing list matches every port of every protocol, else any
/// one must match. `receiver` owns the port (named ports are its container ports).
fn ports_match(
    ports: Option<&Vec<NetworkPolicyPort>>,
    receiver: &Pod,
    protocol: Protocol,
    port: u16,
) -> bool {
    match ports {
        None => true,
        Some(list) if list.is_empty() => true,
        Some(list) => list
            .iter()
            .any(|p| port_matches(p, receiver, protocol, port)),
    }
}

fn port_matches(rule: &NetworkPolicyPort, receiver: &Pod, protocol: Protocol, port: u16) -> bool {
    let rule_protocol = rule.protocol.as_deref().unwrap_or("TCP");
    port_spec_matches(
        rule_protocol,
        rule.port.as_ref(),
        rule.end_port,
        receiver,
        protocol,
        port,
    )
}

/// One port of a rule (NetworkPolicy's or a PolicyBundle's, which read alike): its protocol,
/// then no port (every port), a number, a range to `end_port`, or the receiver's container
/// port of that name and protocol.
pub(super) fn port_spec_matches(
    rule_protocol: &str,
    rule_port: Option<&IntOrString>,
    end_port: Option<i32>,
    receiver: &Pod,
    protocol: Protocol,
    port: u16,
) -> bool {
    if rule_protocol != protocol.as_k8s() {
        return false;
    }
    let port = i32::from(port);
    match (rule_port, end_port) {
        // No port: every port of the protocol.
        (None, _) => true,
        (Some(IntOrString::Int(first)), None) => port == *first,
        (Some(IntOrString::Int(first)), Some(last)) => (*first..=last).contains(&port),
        (Some(IntOrString::String(name)), _) => {
            named_port(receiver, name, rule_protocol) == Some(port)
        }
    }
}

/// The number of `pod`'s container port named `name` for `protocol`, if it has one.
pub fn named_port(pod: &Pod, name: &str, protocol: &str) -> Option<i32> {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| {
            p.name.as_deref() == Some(name) && p.protocol.as_deref().unwrap_or("TCP") == protocol
        })
        .map(|p| p.container_port)
}

/// Whether a label selector selects `labels`; a missing or empty selector selects everything.
/// `matchLabels` and every `matchExpressions` requirement must hold.
pub fn selects(selector: Option<&LabelSelector>, labels: BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels_hold = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_hold = selector.match_expressions.iter().flatten().all(|req| {
        let value = labels.get(&req.key);
        let values = req.values.as_deref().unwrap_or_default();
        match req.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // The apiserver accepts no other operator.
            _ => false,
        }
    });
    labels_hold && expressions_hold
}

/// Whether `ip` is inside `cidr` (`address/length`); an unreadable CIDR contains nothing.
pub fn cidr_contains(cidr: &str, ip: IpAddr) -> bool {
    let Some((network, length)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(network), Ok(length)) = (network.parse::<IpAddr>(), length.parse::<u32>()) else {
        return false;
    };
    // Compare the first `length` bits, as numbers of the family's width.
    let (network, ip, width) = match (network, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (u128::from(u32::from(n)), u128::from(u32::from(i)), 32),
        (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
        _ => return false,
    };
    if length > width {
        return false;
    }
    let shift = width - length;
    network.checked_shr(shift).unwrap_or(0) == ip.checked_shr(shift).unwrap_or(0)
}

/// The labels of `pod`'s namespace (none when the snapshot lacks it).
pub(super) fn namespace_labels(snapshot: &Snapshot, pod: &Pod) -> BTreeMap<String, String> {
    snapshot
        .namespaces
        .iter()
        .find(|n| n.metadata.name == pod.metadata.namespace)
        .map(|n| labels(&n.metadata.labels))
        .unwrap_or_default()
}

pub(super) fn labels(labels: &Option<BTreeMap<String, String>>) -> BTreeMap<String, String> {
    labels.clone().unwrap_or_default()
}

pub(super) fn key(pod: &Pod) -> (Option<&str>, Option<&str>) {
    (
        pod.metadata.namespace.as_deref(),
        pod.metadata.name.as_deref(),
    )
}

#[cfg(test)]
mod tests {
    //! Each test states the expected answers by hand, from the Kubernetes documentation; the
    //! oracle is only as good as these.

    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};
    use kube::api::ObjectMeta;
    use serde_json::json;

    fn meta(namespace: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            namespace: namespace.map(str::to_string),
            name: Some(name.to_string()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        }
    }

    fn mk_ns(name: &str) -> Namespace {
        Namespace {
            metadata: meta(
                None,
                name,
                &[("ns", name), ("kubernetes.io/metadata.name", name)],
            ),
            ..Namespace::default()
        }
    }

    /// Pod `name` in `namespace` with label `pod=<name>` and ports `serve-80-tcp` … like the
    /// truth-table pods.
    fn mk_pod(namespace: &str, name: &str) -> Pod {
        let ports = [(80, "TCP"), (80, "UDP"), (81, "TCP"), (81, "UDP")]
            .map(|(port, protocol)| ContainerPort {
                name: Some(format!("serve-{port}-{}", protocol.to_ascii_lowercase())),
                container_port: port,
                protocol: Some(protocol.into()),
                ..ContainerPort::default()
            })
            .to_vec();
        Pod {
            metadata: meta(Some(namespace), name, &[("pod", name)]),
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "main".into(),
                    ports: Some(ports),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: None,
        }
    }

    fn np(namespace: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"namespace": namespace, "name": name},
            "spec": spec,
        }))
        .unwrap()
    }

    /// x, y, z × a, b, c; pod `<ns>/<name>` at 10.0.<ns index>.<pod index + 1>.
    struct World {
        snapshot: Snapshot,
    }

    impl World {
        fn new(policies: Vec<NetworkPolicy>) -> Self {
            let mut pods = Vec::new();
            for ns in ["x", "y", "z"] {
                for pod in ["a", "b", "c"] {
                    pods.push(mk_pod(ns, pod));
                }
            }
            World {
                snapshot: Snapshot {
                    namespaces: ["x", "y", "z"].map(mk_ns).to_vec(),
                    pods,
                    policies,
                    bundles: Vec::new(),
                },
            }
        }

        fn ip(pod: &str) -> IpAddr {
            let (ns, name) = pod.split_once('/').unwrap();
            let n = |s: &str, all: &str| u8::try_from(all.find(s).unwrap()).unwrap();
            IpAddr::from([10, 0, n(ns, "xyz"), n(name, "abc") + 1])
        }

        fn pod(&self, pod: &str) -> &Pod {
            let (ns, name) = pod.split_once('/').unwrap();
            self.snapshot
                .pods
                .iter()
                .find(|p| key(p) == (Some(ns), Some(name)))
                .unwrap()
        }

        fn verdict(&self, from: &str, to: &str, protocol: Protocol, port: u16) -> Verdict {
            evaluate(
                &self.snapshot,
                &Connection {
                    from: self.pod(from),
                    from_ip: Self::ip(from),
                    to: self.pod(to),
                    to_ip: Self::ip(to),
                    protocol,
                    port,
                },
            )
        }

        fn allows(&self, from: &str, to: &str, protocol: Protocol, port: u16) -> bool {
            self.verdict(from, to, protocol, port).allowed()
        }

        fn tcp(&self, from: &str, to: &str, port: u16) -> bool {
            self.allows(from, to, Protocol::Tcp, port)
        }

        /// Every pod that may open TCP `port` to `to`, sorted.
        fn senders(&self, to: &str, protocol: Protocol, port: u16) -> Vec<String> {
            all_pods()
                .into_iter()
                .filter(|from| from != to && self.allows(from, to, protocol, port))
                .collect()
        }

        /// Every pod that `from` may open `port` to.
        fn receivers(&self, from: &str, protocol: Protocol, port: u16) -> Vec<String> {
            all_pods()
                .into_iter()
                .filter(|to| to != from && self.allows(from, to, protocol, port))
                .collect()
        }
    }

    fn all_pods() -> Vec<String> {
        let mut all = Vec::new();
        for ns in ["x", "y", "z"] {
            for pod in ["a", "b", "c"] {
                all.push(format!("{ns}/{pod}"));
            }
        }
        all
    }

    fn except(list: &[&str], gone: &[&str]) -> Vec<String> {
        list.iter()
            .filter(|p| !gone.contains(p))
            .map(|p| p.to_string())
            .collect()
    }

    const ALL: [&str; 9] = [
        "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
    ];

    #[test]
    fn without_policies_everything_is_allowed() {
        let w = World::new(vec![]);
        for from in ALL {
            for to in ALL {
                for protocol in [Protocol::Tcp, Protocol::Udp] {
                    let v = w.verdict(from, to, protocol, 80);
                    assert!(v.allowed(), "{from} → {to}: {v}");
                }
            }
        }
        assert_eq!(
            w.verdict("x/a", "y/b", Protocol::Tcp, 80).egress,
            Side::NotIsolated
        );
    }

    #[test]
    fn deny_all_ingress_isolates_every_pod_of_the_namespace() {
        let w = World::new(vec![np(
            "x",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        )]);
        for to in ["x/a", "x/b", "x/c"] {
            assert_eq!(
                w.senders(to, Protocol::Tcp, 80),
                Vec::<String>::new(),
                "{to}"
            );
            assert_eq!(
                w.senders(to, Protocol::Udp, 81),
                Vec::<String>::new(),
                "{to}"
            );
        }
        // Its pods still send, but not to each other; the other namespaces are untouched.
        assert_eq!(w.receivers("x/a", Protocol::Tcp, 80).len(), 6);
        assert_eq!(w.senders("y/a", Protocol::Tcp, 80).len(), 8);
        // A pod reaches itself whatever the policy.
        assert_eq!(
            w.verdict("x/a", "x/a", Protocol::Tcp, 80).ingress,
            Side::Loopback
        );
        assert_eq!(
            w.verdict("y/a", "x/b", Protocol::Tcp, 80).ingress,
            Side::Denied {
                isolated_by: vec!["x/deny-all".into()]
            }
        );
    }

    #[test]
    fn deny_all_egress_and_the_empty_ingress_list() {
        // `ingress: []` has no rules: it isolates and allows nothing, like no `ingress` at all.
        let w = World::new(vec![
            np(
                "x",
                "deny-egress",
                json!({"podSelector": {}, "policyTypes": ["Egress"]}),
            ),
            np(
                "y",
                "empty-ingress",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": []}),
            ),
        ]);
        assert!(w.receivers("x/b", Protocol::Udp, 80).is_empty());
        assert_eq!(
            w.senders("x/b", Protocol::Tcp, 80).len(),
            6,
            "y/a and z/* still send; x/* do not"
        );
        assert!(w.senders("y/a", Protocol::Tcp, 81).is_empty());
        assert!(w.tcp("z/a", "y/b", 80));
        // `ingress: [{}]`: one rule that matches everything.
        let open = World::new(vec![np(
            "y",
            "allow-all",
            json!({"podSelector": {}, "ingress": [{}]}),
        )]);
        assert_eq!(open.senders("y/a", Protocol::Udp, 81).len(), 8);
    }

    #[test]
    fn allow_from_a_namespace() {
        let w = World::new(vec![np(
            "x",
            "from-y",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
            }),
        )]);
        assert_eq!(w.senders("x/a", Protocol::Tcp, 80), ["y/a", "y/b", "y/c"]);
        assert_eq!(w.senders("x/a", Protocol::Udp, 81), ["y/a", "y/b", "y/c"]);
        // Only x/a is selected; its neighbours are not isolated.
        assert_eq!(w.senders("x/b", Protocol::Tcp, 80).len(), 8);
        // By the label the apiserver puts on every namespace.
        let by_name = World::new(vec![np(
            "x",
            "from-z",
            json!({
                "podSelector": {},
                "ingress": [{"from": [{"namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": "z"}}}]}],
            }),
        )]);
        assert_eq!(
            by_name.senders("x/c", Protocol::Tcp, 81),
            ["z/a", "z/b", "z/c"]
        );
        // A podSelector alone means the policy's own namespace.
        let own = World::new(vec![np(
            "x",
            "from-own",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
        )]);
        assert_eq!(own.senders("x/a", Protocol::Tcp, 80), ["x/b", "x/c"]);
    }

    #[test]
    fn pod_and_namespace_selector_in_one_peer_is_and_in_two_peers_is_or() {
        let and = World::new(vec![np(
            "x",
            "and",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{
                    "namespaceSelector": {"matchExpressions": [
                        {"key": "ns", "operator": "In", "values": ["y", "z"]}]},
                    "podSelector": {"matchLabels": {"pod": "b"}},
                }]}],
            }),
        )]);
        assert_eq!(and.senders("x/a", Protocol::Tcp, 80), ["y/b", "z/b"]);
        let or = World::new(vec![np(
            "x",
            "or",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                    {"podSelector": {"matchLabels": {"pod": "b"}}},
                ]}],
            }),
        )]);
        // y's pods, and x/b (a podSelector alone stays in x): z/b is not one of them.
        assert_eq!(
            or.senders("x/a", Protocol::Tcp, 80),
            ["x/b", "y/a", "y/b", "y/c"]
        );
    }

    #[test]
    fn selector_operators() {
        let l = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let sel = |v: serde_json::Value| -> LabelSelector { serde_json::from_value(v).unwrap() };
        let not_in = sel(json!({"matchExpressions": [
            {"key": "pod", "operator": "NotIn", "values": ["a"]}]}));
        assert!(selects(Some(&not_in), l(&[("pod", "b")])));
        assert!(
            selects(Some(&not_in), l(&[])),
            "NotIn holds where the key is missing"
        );
        assert!(!selects(Some(&not_in), l(&[("pod", "a")])));
        let exists = sel(json!({"matchExpressions": [{"key": "pod", "operator": "Exists"}]}));
        assert!(selects(Some(&exists), l(&[("pod", "")])));
        assert!(!selects(Some(&exists), l(&[("app", "a")])));
        let absent = sel(json!({"matchExpressions": [
            {"key": "pod", "operator": "DoesNotExist"}]}));
        assert!(selects(Some(&absent), l(&[("app", "a")])));
        let both = sel(json!({"matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["1", "2"]}]}));
        assert!(selects(Some(&both), l(&[("app", "web"), ("tier", "2")])));
        assert!(!selects(Some(&both), l(&[("app", "web"), ("tier", "3")])));
        assert!(!selects(Some(&both), l(&[("tier", "1")])));
        assert!(
            selects(Some(&sel(json!({}))), l(&[])),
            "the empty selector selects all"
        );
        assert!(selects(None, l(&[])));
    }

    #[test]
    fn ip_block_with_except() {
        let w = World::new(vec![np(
            "x",
            "block",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"ipBlock": {
                    "cidr": "10.0.1.0/24", "except": ["10.0.1.2/32"]}}]}],
            }),
        )]);
        // y's pods are 10.0.1.1-3; y/b (10.0.1.2) is the exception.
        assert_eq!(w.senders("x/a", Protocol::Tcp, 80), ["y/a", "y/c"]);
        let egress = World::new(vec![np(
            "z",
            "to-block",
            json!({
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16",
                    "except": ["10.0.0.0/24", "10.0.2.3/32"]}}]}],
            }),
        )]);
        assert_eq!(
            egress.receivers("z/a", Protocol::Udp, 81),
            ["y/a", "y/b", "y/c", "z/b"]
        );
        assert!(cidr_contains("10.0.0.0/8", "10.255.1.1".parse().unwrap()));
        assert!(cidr_contains("0.0.0.0/0", "192.0.2.1".parse().unwrap()));
        assert!(!cidr_contains("10.0.0.0/8", "11.0.0.1".parse().unwrap()));
        assert!(cidr_contains("fd00::/8", "fd00:10::1".parse().unwrap()));
        assert!(!cidr_contains("fd00::/8", "10.0.0.1".parse().unwrap()));
        assert!(cidr_contains("10.0.1.2/32", "10.0.1.2".parse().unwrap()));
        assert!(!cidr_contains("10.0.1.2/33", "10.0.1.2".parse().unwrap()));
    }

    #[test]
    fn named_ports_are_the_receivers() {
        let w = World::new(vec![np(
            "x",
            "named",
            json!({
                "podSelector": {},
                "ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}],
            }),
        )]);
        assert_eq!(w.senders("x/a", Protocol::Udp, 81).len(), 8);
        assert!(w.senders("x/a", Protocol::Udp, 80).is_empty());
        assert!(
            w.senders("x/a", Protocol::Tcp, 81).is_empty(),
            "the name is for UDP only"
        );
        // The protocol defaults to TCP: a TCP rule naming a UDP port matches nothing.
        let mismatch = World::new(vec![np(
            "x",
            "named-tcp",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-udp"}]}]}),
        )]);
        assert!(mismatch.senders("x/a", Protocol::Udp, 81).is_empty());
        assert!(mismatch.senders("x/a", Protocol::Tcp, 81).is_empty());
        // Egress: the destination's port of that name.
        let egress = World::new(vec![np(
            "y",
            "egress-named",
            json!({
                "podSelector": {"matchLabels": {"pod": "c"}},
                "policyTypes": ["Egress"],
                "egress": [{"ports": [{"port": "serve-80-tcp"}]}],
            }),
        )]);
        assert_eq!(egress.receivers("y/c", Protocol::Tcp, 80).len(), 8);
        assert!(egress.receivers("y/c", Protocol::Tcp, 81).is_empty());
        // A receiver without that port name is not matched.
        let mut snapshot = egress.snapshot.clone();
        for pod in &mut snapshot.pods {
            if key(pod) == (Some("z"), Some("a")) {
                pod.spec = Some(PodSpec::default());
            }
        }
        let bare = World { snapshot };
        assert_eq!(
            bare.receivers("y/c", Protocol::Tcp, 80),
            except(&ALL, &["y/c", "z/a"])
        );
    }

    #[test]
    fn end_port_is_an_inclusive_range() {
        let w = World::new(vec![np(
            "x",
            "range",
            json!({
                "podSelector": {},
                "ingress": [{"ports": [
                    {"protocol": "TCP", "port": 81, "endPort": 90},
                    {"protocol": "UDP", "port": 70, "endPort": 80},
                ]}],
            }),
        )]);
        assert!(!w.tcp("y/a", "x/a", 80));
        assert!(w.tcp("y/a", "x/a", 81));
        assert!(w.tcp("y/a", "x/a", 90));
        assert!(!w.tcp("y/a", "x/a", 91));
        assert!(w.allows("y/a", "x/a", Protocol::Udp, 80));
        assert!(!w.allows("y/a", "x/a", Protocol::Udp, 81));
    }

    #[test]
    fn egress_only_policies_leave_ingress_alone_and_both_sides_must_allow() {
        let w = World::new(vec![np(
            "x",
            "egress-to-y",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
            }),
        )]);
        assert_eq!(w.receivers("x/a", Protocol::Tcp, 80), ["y/a", "y/b", "y/c"]);
        assert_eq!(
            w.senders("x/a", Protocol::Tcp, 80).len(),
            8,
            "ingress is not isolated"
        );
        // Unset policyTypes with egress rules: Ingress and Egress. Its ingress has no rules.
        let defaulted = World::new(vec![np(
            "x",
            "defaulted",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
            }),
        )]);
        assert_eq!(
            defaulted.receivers("x/a", Protocol::Tcp, 80),
            ["y/a", "y/b", "y/c"]
        );
        assert!(defaulted.senders("x/a", Protocol::Tcp, 80).is_empty());
        // Ingress only, though it has egress rules: egress is not isolated.
        let ingress_only = World::new(vec![np(
            "x",
            "ingress-only",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "policyTypes": ["Ingress"],
                "ingress": [{}],
                "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
            }),
        )]);
        assert_eq!(ingress_only.receivers("x/a", Protocol::Tcp, 80).len(), 8);
        // The receiver allows z/b, but z/b's own egress only allows x/c: z/b → x/a is denied.
        let both = World::new(vec![
            np(
                "x",
                "from-z",
                json!({"podSelector": {}, "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
            ),
            np(
                "z",
                "b-to-x-c",
                json!({
                    "podSelector": {"matchLabels": {"pod": "b"}},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "x"}},
                                        "podSelector": {"matchLabels": {"pod": "c"}}}]}],
                }),
            ),
        ]);
        assert_eq!(both.senders("x/a", Protocol::Tcp, 80), ["z/a", "z/c"]);
        assert_eq!(
            both.senders("x/c", Protocol::Tcp, 80),
            ["z/a", "z/b", "z/c"]
        );
        let v = both.verdict("z/b", "x/a", Protocol::Tcp, 80);
        assert_eq!(
            v.ingress,
            Side::Allowed {
                by: vec!["x/from-z".into()]
            }
        );
        assert!(!v.egress.allows() && !v.allowed(), "{v}");
    }

    #[test]
    fn policies_add_up() {
        let w = World::new(vec![
            np(
                "x",
                "from-y-on-80",
                json!({
                    "podSelector": {"matchLabels": {"pod": "a"}},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                                 "ports": [{"port": 80}]}],
                }),
            ),
            np(
                "x",
                "from-b",
                json!({
                    "podSelector": {},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
                }),
            ),
            // Another namespace's policy never applies to x's pods.
            np(
                "y",
                "deny-all",
                json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
            ),
        ]);
        assert_eq!(
            w.senders("x/a", Protocol::Tcp, 80),
            ["x/b"],
            "y's egress is denied"
        );
        assert_eq!(w.senders("x/a", Protocol::Tcp, 81), ["x/b"]);
        assert_eq!(w.senders("x/c", Protocol::Udp, 80), ["x/b"]);
        assert_eq!(
            w.verdict("x/b", "x/a", Protocol::Tcp, 80).ingress,
            Side::Allowed {
                by: vec!["x/from-b".into()]
            }
        );
        assert_eq!(
            w.verdict("x/c", "x/a", Protocol::Tcp, 80).ingress,
            Side::Denied {
                isolated_by: vec!["x/from-y-on-80".into(), "x/from-b".into()]
            }
        );
        // Without y's deny-all, y's pods reach x/a on 80 only.
        let no_deny = World {
            snapshot: Snapshot {
                policies: w.snapshot.policies[..2].to_vec(),
                ..w.snapshot.clone()
            },
        };
        assert_eq!(
            no_deny.senders("x/a", Protocol::Tcp, 80),
            ["x/b", "y/a", "y/b", "y/c"]
        );
        assert_eq!(no_deny.senders("x/a", Protocol::Tcp, 81), ["x/b"]);
    }

    // --- PolicyBundles: the stages around NetworkPolicy ------------------------------------

    fn pb(name: &str, spec: serde_json::Value) -> PolicyBundle {
        serde_json::from_value(json!({
            "apiVersion": "network.trellis.dev/v1alpha1",
            "kind": "PolicyBundle",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .unwrap()
    }

    fn with_bundles(policies: Vec<NetworkPolicy>, bundles: Vec<PolicyBundle>) -> World {
        let mut w = World::new(policies);
        w.snapshot.bundles = bundles;
        w
    }

    fn bundle_side(
        bundle: &str,
        tier: Tier,
        priority: i32,
        direction: &'static str,
        rule: usize,
        allows: bool,
    ) -> Side {
        Side::Bundle(BundleRule {
            bundle: bundle.into(),
            tier,
            priority,
            direction,
            rule,
            allows,
        })
    }

    /// Into namespace y: `action` from namespace z.
    fn into_y_from_z(name: &str, tier: &str, priority: i32, action: &str) -> PolicyBundle {
        pb(
            name,
            json!({
                "tier": tier, "priority": priority,
                "subject": {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                "ingress": [{"action": action, "peers": [{"namespaces": {"matchLabels": {"ns": "z"}}}]}],
            }),
        )
    }

    fn allow_all_ingress(namespace: &str) -> NetworkPolicy {
        np(
            namespace,
            "allow-all",
            json!({"podSelector": {}, "ingress": [{}]}),
        )
    }

    #[test]
    fn an_admin_deny_beats_a_networkpolicy_allow() {
        let w = with_bundles(
            vec![allow_all_ingress("y")],
            vec![into_y_from_z("no-z", "Admin", 10, "Deny")],
        );
        assert_eq!(
            w.senders("y/a", Protocol::Udp, 81),
            except(&ALL, &["y/a", "z/a", "z/b", "z/c"])
        );
        assert_eq!(
            w.verdict("z/b", "y/a", Protocol::Tcp, 80).ingress,
            bundle_side("no-z", Tier::Admin, 10, "ingress", 0, false)
        );
        // Egress of z is not the bundle's subject.
        assert_eq!(
            w.verdict("z/b", "y/a", Protocol::Tcp, 80).egress,
            Side::NotIsolated
        );
        // The others are the NetworkPolicy's.
        assert_eq!(
            w.verdict("x/b", "y/a", Protocol::Tcp, 80).ingress,
            Side::Allowed {
                by: vec!["y/allow-all".into()]
            }
        );
    }

    #[test]
    fn an_admin_allow_beats_networkpolicy_isolation() {
        let w = with_bundles(
            vec![np(
                "y",
                "deny-all",
                json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
            )],
            vec![into_y_from_z("from-z", "Admin", 10, "Allow")],
        );
        assert_eq!(w.senders("y/c", Protocol::Tcp, 80), ["z/a", "z/b", "z/c"]);
        assert_eq!(
            w.verdict("x/a", "y/c", Protocol::Tcp, 80).ingress,
            Side::Denied {
                isolated_by: vec!["y/deny-all".into()]
            }
        );
    }

    #[test]
    fn pass_skips_the_rest_of_the_tier_and_networkpolicy_decides() {
        let deny_all = pb(
            "deny-all-into-y",
            json!({
                "tier": "Admin", "priority": 20,
                "subject": {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                "ingress": [{"action": "Deny", "peers": [{"namespaces": {}}]}],
            }),
        );
        let w = with_bundles(vec![], vec![deny_all.clone()]);
        assert_eq!(w.senders("y/a", Protocol::Tcp, 80), ["y/a"; 0]);
        // A Pass of z at priority 10 skips the deny at 20: nothing isolates y/a, allowed.
        let w = with_bundles(
            vec![],
            vec![
                deny_all.clone(),
                into_y_from_z("pass-z", "Admin", 10, "Pass"),
            ],
        );
        assert_eq!(w.senders("y/a", Protocol::Tcp, 80), ["z/a", "z/b", "z/c"]);
        assert_eq!(
            w.verdict("z/a", "y/a", Protocol::Tcp, 80).ingress,
            Side::NotIsolated
        );
        // Then y's NetworkPolicy decides what is passed.
        let w = with_bundles(
            vec![np(
                "y",
                "from-a",
                json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
            )],
            vec![deny_all, into_y_from_z("pass-z", "Admin", 10, "Pass")],
        );
        assert_eq!(w.senders("y/b", Protocol::Tcp, 80), ["z/a"]);
        assert_eq!(
            w.verdict("z/b", "y/b", Protocol::Tcp, 80).ingress,
            Side::Denied {
                isolated_by: vec!["y/from-a".into()]
            }
        );
        // A Pass in the Baseline tier leaves it to the mode's default.
        let w = with_bundles(
            vec![],
            vec![
                into_y_from_z("b-pass-z", "Baseline", 1, "Pass"),
                pb(
                    "b-deny",
                    json!({"tier": "Baseline", "priority": 2,
                           "ingress": [{"action": "Deny", "peers": [{"namespaces": {}}]}]}),
                ),
            ],
        );
        assert_eq!(w.senders("y/b", Protocol::Tcp, 80), ["z/a", "z/b", "z/c"]);
        assert_eq!(w.senders("x/b", Protocol::Tcp, 80), ["x/a"; 0]);
    }

    #[test]
    fn baseline_decides_only_where_no_networkpolicy_isolates() {
        let w = with_bundles(
            vec![np(
                "y",
                "a-from-x",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}]}]}),
            )],
            vec![into_y_from_z("baseline-no-z", "Baseline", 5, "Deny")],
        );
        // y/a is isolated by the NetworkPolicy: it decides (z denied as "nothing allowed").
        assert_eq!(w.senders("y/a", Protocol::Tcp, 80), ["x/a", "x/b", "x/c"]);
        assert_eq!(
            w.verdict("z/a", "y/a", Protocol::Tcp, 80).ingress,
            Side::Denied {
                isolated_by: vec!["y/a-from-x".into()]
            }
        );
        // y/b is not: the Baseline denies z, the default allows the rest.
        assert_eq!(
            w.senders("y/b", Protocol::Tcp, 80),
            except(&ALL, &["y/b", "z/a", "z/b", "z/c"])
        );
        assert_eq!(
            w.verdict("z/a", "y/b", Protocol::Tcp, 80).ingress,
            bundle_side("baseline-no-z", Tier::Baseline, 5, "ingress", 0, false)
        );
    }

    #[test]
    fn priorities_then_names_order_bundles_and_the_first_rule_matches() {
        let allow = into_y_from_z("b-allow", "Admin", 10, "Allow");
        let deny = into_y_from_z("a-deny", "Admin", 20, "Deny");
        let w = with_bundles(vec![], vec![deny.clone(), allow.clone()]);
        assert!(w.tcp("z/a", "y/a", 80), "priority 10 first");
        let mut deny_first = deny.clone();
        deny_first.spec.priority = 10;
        let w = with_bundles(vec![], vec![allow, deny_first]);
        assert!(
            !w.tcp("z/a", "y/a", 80),
            "same priority: by name, a-deny first"
        );
        // Within a bundle, the first matching rule.
        let ordered = pb(
            "ordered",
            json!({
                "priority": 1,
                "subject": {"podSelector": {"matchLabels": {"pod": "c"}}},
                "ingress": [
                    {"action": "Allow", "peers": [{"pods": {"podSelector": {"matchLabels": {"pod": "a"}}}}],
                     "ports": [{"port": 80}]},
                    {"action": "Deny", "peers": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]},
                ],
            }),
        );
        let w = with_bundles(vec![], vec![ordered]);
        assert_eq!(w.senders("x/c", Protocol::Tcp, 80), ["x/a", "y/a", "z/a"]);
        assert_eq!(w.senders("x/c", Protocol::Tcp, 81), ["x/a"; 0]);
        assert_eq!(
            w.verdict("y/a", "x/c", Protocol::Tcp, 81).ingress,
            bundle_side("ordered", Tier::Admin, 1, "ingress", 1, false)
        );
    }

    #[test]
    fn bundle_ports_and_egress() {
        let w = with_bundles(
            vec![],
            vec![pb(
                "x-egress",
                json!({
                    "priority": 3,
                    "subject": {"namespaceSelector": {"matchLabels": {"ns": "x"}}},
                    "egress": [
                        {"action": "Deny", "peers": [{"namespaces": {"matchLabels": {"ns": "z"}}}],
                         "ports": [{"protocol": "UDP", "port": 80, "endPort": 81}]},
                        {"action": "Deny", "peers": [{"pods": {"namespaceSelector": {"matchLabels": {"ns": "y"}}}}],
                         "ports": [{"port": "serve-81-tcp"}]},
                    ],
                }),
            )],
        );
        assert_eq!(
            w.receivers("x/a", Protocol::Udp, 80),
            except(&ALL, &["x/a", "z/a", "z/b", "z/c"])
        );
        assert_eq!(
            w.receivers("x/a", Protocol::Udp, 81),
            except(&ALL, &["x/a", "z/a", "z/b", "z/c"])
        );
        assert_eq!(
            w.receivers("x/a", Protocol::Tcp, 81),
            except(&ALL, &["x/a", "y/a", "y/b", "y/c"])
        );
        assert_eq!(
            w.receivers("x/a", Protocol::Tcp, 80),
            except(&ALL, &["x/a"])
        );
        assert_eq!(
            w.verdict("x/a", "y/b", Protocol::Tcp, 81).egress,
            bundle_side("x-egress", Tier::Admin, 3, "egress", 1, false)
        );
        // An ipBlock matches pod addresses, with its holes.
        let w = with_bundles(
            vec![],
            vec![pb(
                "no-10-1",
                json!({"priority": 1, "ingress": [{"action": "Deny",
                        "peers": [{"ipBlock": {"cidr": "10.0.1.0/24", "except": ["10.0.1.2/32"]}}]}]}),
            )],
        );
        assert_eq!(
            w.senders("x/a", Protocol::Tcp, 80),
            except(&ALL, &["x/a", "y/a", "y/c"])
        );
    }
}
