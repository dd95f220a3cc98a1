//! An independent reference model of Kubernetes NetworkPolicy, pod by pod.
//!
//! It shares no code with the compiler: no identities, no tables, no CIDR
//! identities, no port prefixes, its own selector matching and validation.
//! It answers one question straight from the rules as the Kubernetes API
//! documents them: may this packet pass? (The sender's egress, when the
//! sender is a pod, and the receiver's ingress, when the receiver is a pod.)
//!
//! Where Trellis decides something Kubernetes leaves open, or refuses what
//! the apiserver would refuse, the model encodes the documented decision and
//! says so with "Trellis:":
//! - the pod's own node is always admitted on ingress;
//! - a broken peer or port matches nothing; a broken policy `podSelector`
//!   isolates every pod of its namespace and allows nothing; an unknown
//!   `policyTypes` value isolates both directions;
//! - `ipBlock` matches pod addresses too;
//! - egress named ports resolve against the ports of every pod that shares
//!   the destination's namespace and labels (0004), and never towards an
//!   `ipBlock` peer.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::ContainerPort;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Default,
    Always,
    Never,
}

#[derive(Debug, Clone)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone)]
pub struct World {
    pub mode: Mode,
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<NetworkPolicy>,
}

/// One side of a probe.
#[derive(Debug, Clone, Copy)]
pub enum End<'a> {
    Pod(&'a Pod),
    /// An address of the destination pod's node.
    Host,
    /// Anything else.
    Outside,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
    Icmp,
}

impl Proto {
    fn k8s(self) -> Option<&'static str> {
        match self {
            Proto::Tcp => Some("TCP"),
            Proto::Udp => Some("UDP"),
            Proto::Sctp => Some("SCTP"),
            Proto::Icmp => None,
        }
    }
}

/// A connection attempt: `src` at `src_ip` opens `proto`/`port` to `dst` at
/// `dst_ip`.
#[derive(Debug, Clone, Copy)]
pub struct Probe<'a> {
    pub src: End<'a>,
    pub src_ip: IpAddr,
    pub dst: End<'a>,
    pub dst_ip: IpAddr,
    pub proto: Proto,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Ingress,
    Egress,
}

thread_local! {
    /// Which parts of the rules decided something, for the generator's
    /// coverage test.
    static HITS: RefCell<BTreeMap<&'static str, u64>> = const { RefCell::new(BTreeMap::new()) };
}

fn hit(what: &'static str) {
    HITS.with(|h| *h.borrow_mut().entry(what).or_default() += 1);
}

/// Takes the coverage counters.
pub fn take_hits() -> BTreeMap<&'static str, u64> {
    HITS.with(|h| std::mem::take(&mut *h.borrow_mut()))
}

/// Whether the probe passes.
pub fn allowed(world: &World, probe: &Probe) -> bool {
    let egress = match probe.src {
        End::Pod(pod) => direction_allows(world, pod, Dir::Egress, probe.dst, probe.dst_ip, probe),
        _ => true,
    };
    let ingress = match probe.dst {
        End::Pod(pod) => direction_allows(world, pod, Dir::Ingress, probe.src, probe.src_ip, probe),
        _ => true,
    };
    egress && ingress
}

fn direction_allows(
    world: &World,
    pod: &Pod,
    dir: Dir,
    remote: End,
    remote_ip: IpAddr,
    probe: &Probe,
) -> bool {
    if world.mode == Mode::Never {
        return true;
    }
    let mut isolated = world.mode == Mode::Always;
    let mut allowed = false;
    for policy in &world.policies {
        if policy.metadata.namespace.as_deref() != Some(pod.namespace.as_str()) {
            continue;
        }
        let empty = NetworkPolicySpec::default();
        let spec = policy.spec.as_ref().unwrap_or(&empty);
        let (selects, rules_count) = match selector_matches(spec.pod_selector.as_ref(), &pod.labels)
        {
            Some(m) => (m, true),
            // Trellis: a broken podSelector isolates and allows nothing.
            None => (true, false),
        };
        if !selects {
            continue;
        }
        let (ingress, egress) = policy_types(spec);
        let applies = match dir {
            Dir::Ingress => ingress,
            Dir::Egress => egress,
        };
        if !applies {
            continue;
        }
        isolated = true;
        if !rules_count {
            continue;
        }
        let ns = pod.namespace.as_str();
        let rule_allows = match dir {
            Dir::Ingress => spec.ingress.iter().flatten().any(|r| {
                rule_allows(
                    world,
                    ns,
                    pod,
                    dir,
                    r.from.as_deref(),
                    r.ports.as_deref(),
                    remote,
                    remote_ip,
                    probe,
                )
            }),
            Dir::Egress => spec.egress.iter().flatten().any(|r| {
                rule_allows(
                    world,
                    ns,
                    pod,
                    dir,
                    r.to.as_deref(),
                    r.ports.as_deref(),
                    remote,
                    remote_ip,
                    probe,
                )
            }),
        };
        allowed |= rule_allows;
    }
    if !isolated {
        return true;
    }
    // Trellis: the pod's own node always gets in.
    if dir == Dir::Ingress && matches!(remote, End::Host) {
        hit("host admitted");
        return true;
    }
    if !allowed {
        hit("isolated and denied");
    }
    allowed
}

/// (ingress, egress) the policy isolates. Kubernetes defaults an unset or
/// empty list to Ingress, plus Egress when there are egress rules.
fn policy_types(spec: &NetworkPolicySpec) -> (bool, bool) {
    match spec.policy_types.as_deref() {
        None | Some([]) => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        Some(types) => {
            if types.iter().any(|t| t != "Ingress" && t != "Egress") {
                // Trellis: unknown type, isolate both.
                hit("unknown policy type");
                return (true, true);
            }
            (
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
            )
        }
    }
}

/// What kind of peer matched: it matters for egress named ports.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PeerKind {
    All,
    Selected,
    Block,
}

#[allow(clippy::too_many_arguments)]
fn rule_allows(
    world: &World,
    policy_ns: &str,
    local: &Pod,
    dir: Dir,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    remote: End,
    remote_ip: IpAddr,
    probe: &Probe,
) -> bool {
    let matching_peers: Vec<PeerKind> = match peers {
        None | Some([]) => vec![PeerKind::All],
        Some(list) => list
            .iter()
            .filter_map(|p| peer_matches(world, policy_ns, p, remote, remote_ip))
            .collect(),
    };
    matching_peers.into_iter().any(|kind| match ports {
        None | Some([]) => true,
        Some(list) => list
            .iter()
            .any(|p| port_matches(world, local, dir, kind, p, remote, probe)),
    })
}

/// `Some(kind)` when the peer is valid and matches the remote end.
fn peer_matches(
    world: &World,
    policy_ns: &str,
    peer: &NetworkPolicyPeer,
    remote: End,
    remote_ip: IpAddr,
) -> Option<PeerKind> {
    let has_selector = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    if let Some(block) = &peer.ip_block {
        if has_selector {
            return None; // Trellis: invalid, matches nothing.
        }
        let cidr = parse_prefix(&block.cidr)?;
        let mut excepts = Vec::new();
        for e in block.except.iter().flatten() {
            let e = parse_prefix(e)?;
            // The apiserver wants each except strictly inside the cidr.
            let inside = same_family(&cidr, &e)
                && e.prefix_len() > cidr.prefix_len()
                && cidr.contains(&e.network());
            if !inside {
                hit("except outside cidr");
                return None;
            }
            excepts.push(e);
        }
        if !cidr.contains(&remote_ip) {
            return None;
        }
        if excepts.iter().any(|e| e.contains(&remote_ip)) {
            hit("address in an except");
            return None;
        }
        hit("ipBlock matched");
        if matches!(remote, End::Pod(_)) {
            hit("ipBlock matched a pod");
        }
        return Some(PeerKind::Block);
    }
    if !has_selector {
        return None; // Trellis: an empty peer is invalid.
    }
    // Both selectors must be valid, whatever the remote end is.
    let pod_ok = match &peer.pod_selector {
        Some(s) => {
            validate_selector(s)?;
            Some(s)
        }
        None => None,
    };
    if let Some(ns_sel) = &peer.namespace_selector {
        validate_selector(ns_sel)?;
    }
    let End::Pod(pod) = remote else {
        return None;
    };
    let namespace_ok = match &peer.namespace_selector {
        Some(s) => {
            let ns_labels = world
                .namespaces
                .iter()
                .find(|n| n.name == pod.namespace)
                .map(|n| n.labels.clone())
                .unwrap_or_default();
            selector_matches(Some(s), &ns_labels) == Some(true)
        }
        None => pod.namespace == policy_ns,
    };
    let pods_ok = match pod_ok {
        Some(s) => selector_matches(Some(s), &pod.labels) == Some(true),
        None => true,
    };
    (namespace_ok && pods_ok).then_some(PeerKind::Selected)
}

fn same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}

/// A CIDR as Go's ParseCIDR reads it: host bits cleared.
fn parse_prefix(s: &str) -> Option<IpNet> {
    let net: IpNet = s.parse().ok()?;
    Some(net.trunc())
}

fn port_matches(
    world: &World,
    local: &Pod,
    dir: Dir,
    peer: PeerKind,
    port: &NetworkPolicyPort,
    remote: End,
    probe: &Probe,
) -> bool {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    if !matches!(protocol, "TCP" | "UDP" | "SCTP") {
        return false; // Trellis: invalid, matches nothing.
    }
    let valid_number = |n: i32| (1..=65535).contains(&n);
    // Validate the whole port first: a broken port never matches.
    match (&port.port, port.end_port) {
        (None, Some(_)) => return false,
        (Some(IntOrString::Int(n)), end) => {
            if !valid_number(*n) {
                return false;
            }
            if let Some(e) = end
                && (!valid_number(e) || e < *n)
            {
                return false;
            }
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() || !valid_service_name(name) {
                return false;
            }
        }
        (None, None) => {}
    }
    if probe.proto.k8s() != Some(protocol) {
        return false;
    }
    let p = i32::from(probe.port);
    match (&port.port, port.end_port) {
        (None, _) => true,
        (Some(IntOrString::Int(n)), None) => p == *n,
        (Some(IntOrString::Int(n)), Some(e)) => {
            let inside = *n <= p && p <= e;
            if inside && p != *n {
                hit("inside a range, past its start");
            }
            inside
        }
        (Some(IntOrString::String(name)), _) => {
            let declares = |pods: &mut dyn Iterator<Item = &Pod>| {
                pods.flat_map(|q| q.ports.iter()).any(|cp| {
                    cp.name.as_deref() == Some(name.as_str())
                        && cp.protocol.as_deref().unwrap_or("TCP") == protocol
                        && cp.container_port == p
                })
            };
            match dir {
                Dir::Ingress => {
                    let ok = declares(&mut std::iter::once(local));
                    if ok {
                        hit("named port, ingress");
                    }
                    ok
                }
                Dir::Egress => {
                    // Trellis: never towards an ipBlock peer.
                    if peer == PeerKind::Block {
                        return false;
                    }
                    let End::Pod(dst) = remote else {
                        return false;
                    };
                    // 0004: the union over the pods that share the
                    // destination's namespace and labels.
                    let mut mates = world
                        .pods
                        .iter()
                        .filter(|q| q.namespace == dst.namespace && q.labels == dst.labels);
                    let ok = declares(&mut mates);
                    if ok {
                        hit("named port, egress");
                        if !declares(&mut std::iter::once(dst)) {
                            hit("named port, egress, through a pod with the same labels");
                        }
                    }
                    ok
                }
            }
        }
    }
}

/// An IANA service name: 1–15 of `[a-z0-9-]`, a letter somewhere, no hyphen
/// at an end, no two hyphens in a row.
fn valid_service_name(name: &str) -> bool {
    let chars: Vec<char> = name.chars().collect();
    !chars.is_empty()
        && chars.len() <= 15
        && chars
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
        && chars.iter().any(|c| c.is_ascii_lowercase())
        && chars.first() != Some(&'-')
        && chars.last() != Some(&'-')
        && !chars.windows(2).any(|w| w == ['-', '-'])
}

/// `Some(matches)` for a valid selector (unset selects everything), `None`
/// for one the apiserver would refuse.
fn selector_matches(selector: Option<&LabelSelector>, labels: &Labels) -> Option<bool> {
    let Some(s) = selector else {
        return Some(true);
    };
    validate_selector(s)?;
    let labels_ok = s
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = s.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => !value.is_some_and(|v| values.contains(v)),
            "Exists" => value.is_some(),
            _ => value.is_none(), // DoesNotExist; validated above
        }
    });
    Some(labels_ok && exprs_ok)
}

fn validate_selector(s: &LabelSelector) -> Option<()> {
    for (k, v) in s.match_labels.iter().flatten() {
        if !valid_key(k) || !valid_value(v) {
            return None;
        }
    }
    for e in s.match_expressions.iter().flatten() {
        if !valid_key(&e.key) {
            return None;
        }
        let values = e.values.as_deref().unwrap_or_default();
        let ok = match e.operator.as_str() {
            "In" | "NotIn" => !values.is_empty() && values.iter().all(|v| valid_value(v)),
            "Exists" | "DoesNotExist" => values.is_empty(),
            _ => false,
        };
        if !ok {
            return None;
        }
    }
    Some(())
}

fn valid_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
}

fn valid_key(key: &str) -> bool {
    let parts: Vec<&str> = key.split('/').collect();
    match parts.as_slice() {
        [name] => valid_name_part(name),
        [prefix, name] => {
            prefix.len() <= 253
                && prefix.split('.').all(|l| {
                    !l.is_empty()
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                        && l.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                })
                && valid_name_part(name)
        }
        _ => false,
    }
}

fn valid_value(v: &str) -> bool {
    v.is_empty() || valid_name_part(v)
}
