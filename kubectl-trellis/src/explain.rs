//! `kubectl trellis explain`: which rule lets one connection through, or
//! drops it, on each of its two ends. Pure: the cluster's objects in, the
//! verdict and its explanation out (`main.rs` reads the objects).
//!
//! ```text
//!  Objects (as read from the apiserver)
//!     │ trellis_policy::cluster: the Input every node builds (same functions)
//!     │ each pod: labels → the SecurityIdentity holding them (as a node resolves it)
//!     ▼
//!  sender:   compile_endpoint ─▶ egress table  ─▶ table::lookup(receiver's identity, CIDR identity, proto, port)
//!  receiver: compile_endpoint ─▶ ingress table ─▶ table::lookup(sender's identity, …)
//!     │ Provenance: the deciding rule          │ reference::evaluate: must agree, else an internal error
//!     ▼
//!  Explanation { egress, ingress, allowed = both allow }
//! ```
//!
//! Out of scope: replies of established connections (the datapath lets them
//! through whatever the policy says now), and traffic from a node's own
//! addresses into its pods (always let in, for health probes).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Serialize;
use trellis_api::v1alpha1::{IPPool, NodeEndpoints, PolicyBundle, SecurityIdentity};
use trellis_policy::cluster::{self, Shards};
use trellis_policy::compile::{Input, LocalEndpoint, Origin, compile_endpoint};
use trellis_policy::identity::{SecurityLabels, WORLD};
use trellis_policy::objects::{self, ObjectError};
use trellis_policy::reference::{self, Packet};
use trellis_policy::table::{Decision, Direction, lookup};
use trellis_policy::{PolicyEnforcement, Protocol};

/// The cluster's objects the explanation is computed from.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    /// `NetworkConfig/default`'s `spec.policyEnforcement` (the default when
    /// there is none).
    pub enforcement: PolicyEnforcement,
    /// At least the pods named in the query.
    pub pods: Vec<Pod>,
    /// At least those pods' namespaces.
    pub namespaces: Vec<Namespace>,
    /// Every NetworkPolicy.
    pub policies: Vec<NetworkPolicy>,
    /// Every PolicyBundle.
    pub bundles: Vec<PolicyBundle>,
    /// Every SecurityIdentity.
    pub identities: Vec<SecurityIdentity>,
    /// Every NodeEndpoints shard.
    pub shards: Vec<NodeEndpoints>,
    /// Every IPPool.
    pub pools: Vec<IPPool>,
}

/// `NAMESPACE/NAME` of a pod.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodName {
    /// The namespace.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl FromStr for PodName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(PodName {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("{s:?} is not NAMESPACE/POD")),
        }
    }
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where the connection goes: a pod, or an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A pod.
    Pod(PodName),
    /// An address: a pod's (then that pod), or one outside the cluster.
    Address(IpAddr),
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Destination::Address(ip));
        }
        s.parse::<PodName>()
            .map(Destination::Pod)
            .map_err(|_| format!("{s:?} is neither NAMESPACE/POD nor an IP address"))
    }
}

/// `PORT[/PROTOCOL]`: the destination port and the protocol (TCP when
/// not given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// The destination port.
    pub port: u16,
    /// TCP, UDP or SCTP.
    pub protocol: Protocol,
}

impl FromStr for PortSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (port, protocol) = match s.split_once('/') {
            Some((p, proto)) => (p, proto),
            None => (s, "TCP"),
        };
        let protocol = Protocol::from_k8s(Some(protocol.to_ascii_uppercase().as_str()))
            .ok_or_else(|| format!("{protocol:?} is not a protocol: TCP, UDP or SCTP"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{port:?} is not a port number (1-65535)"))?;
        Ok(PortSpec { port, protocol })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol.as_str())
    }
}

/// One connection to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The pod that opens it.
    pub from: PodName,
    /// Where it goes.
    pub to: Destination,
    /// The destination port and protocol.
    pub port: PortSpec,
}

/// Why the connection cannot be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// No such pod.
    #[error("pod {0} not found")]
    PodNotFound(PodName),
    /// The pod's namespace was not found.
    #[error("namespace {namespace} of pod {pod} not found")]
    NamespaceNotFound {
        /// The pod.
        pod: PodName,
        /// Its namespace.
        namespace: String,
    },
    /// The pod's labels do not make a label set.
    #[error("the labels of pod {pod}: {source}")]
    Labels {
        /// The pod.
        pod: PodName,
        /// What is wrong.
        source: ObjectError,
    },
    /// No SecurityIdentity holds the pod's label set yet.
    #[error(
        "pod {pod} has no security identity yet: no SecurityIdentity holds its label set {labels} (its node creates one when the pod starts, or when its labels change)"
    )]
    NoIdentity {
        /// The pod.
        pod: PodName,
        /// Its label set.
        labels: String,
    },
    /// The pod has no address.
    #[error(
        "pod {0} has no address yet (neither its node's NodeEndpoints shard nor its status lists one)"
    )]
    NoAddress(PodName),
    /// The pod has no address of the destination's family.
    #[error("pod {pod} has no {family} address, and the destination {destination} is one")]
    NoAddressOfFamily {
        /// The pod.
        pod: PodName,
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// The destination address.
        destination: IpAddr,
    },
    /// The compiled tables and the reference evaluator disagree: a bug in
    /// Trellis.
    #[error(
        "INTERNAL ERROR: the compiled {direction} table of {pod} says {compiled}, but the reference evaluator says {reference}; this is a bug in Trellis, please report it with the objects involved"
    )]
    Disagreement {
        /// `ingress` or `egress`.
        direction: &'static str,
        /// The pod.
        pod: String,
        /// What the table lookup said.
        compiled: String,
        /// What the reference evaluator said.
        reference: String,
    },
}

/// One end of the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct End {
    /// `NAMESPACE/POD`, when the end is a pod.
    pub pod: Option<String>,
    /// Its security identity (2, `WORLD`, for an address outside the cluster).
    pub identity: u32,
    /// Its address for this connection.
    pub address: IpAddr,
}

/// What one end's policy says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Side {
    /// `egress` (the sender) or `ingress` (the receiver).
    pub direction: &'static str,
    /// The pod whose policy this is.
    pub pod: String,
    /// Whether any policy applies to the pod in this direction.
    pub enforced: bool,
    /// Whether the connection passes this end.
    pub allowed: bool,
    /// The rule (or default) that decided, in words.
    pub rule: String,
    /// The datapath's rule id of the deciding entry (what counters and flow
    /// events carry); none when no entry decided.
    pub rule_id: Option<u32>,
}

impl Side {
    fn verdict(&self) -> &'static str {
        if self.allowed { "allowed" } else { "denied" }
    }
}

/// The verdict on one connection, on both ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The sender.
    pub from: End,
    /// The receiver.
    pub to: End,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: &'static str,
    /// The destination port.
    pub port: u16,
    /// The sender's egress.
    pub egress: Side,
    /// The receiver's ingress; none when the destination is not a pod.
    pub ingress: Option<Side>,
    /// Whether the connection gets through: both ends allow it.
    pub allowed: bool,
    /// What else to know.
    pub notes: Vec<String>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = |e: &End| match &e.pod {
            Some(p) => format!("{p} (identity {}, {})", e.identity, e.address),
            None => format!(
                "{} (outside the cluster, identity {})",
                e.address, e.identity
            ),
        };
        writeln!(
            f,
            "{}/{} from {} to {}",
            self.port,
            self.protocol,
            end(&self.from),
            end(&self.to)
        )?;
        let mut sides = vec![&self.egress];
        sides.extend(&self.ingress);
        for s in sides {
            writeln!(f, "  {:<7} of {}: {}", s.direction, s.pod, s.verdict())?;
            writeln!(f, "    by {}", s.rule)?;
        }
        let verdict = if self.allowed {
            "allowed".to_owned()
        } else {
            let by: Vec<String> = [Some(&self.egress), self.ingress.as_ref()]
                .into_iter()
                .flatten()
                .filter(|s| !s.allowed)
                .map(|s| format!("the {} of {}", s.direction, s.pod))
                .collect();
            format!("denied (by {})", by.join(" and "))
        };
        writeln!(f, "verdict: {verdict}")?;
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

/// A pod resolved the way its node resolves it.
struct Resolved {
    name: PodName,
    endpoint: LocalEndpoint,
    addresses: Vec<IpAddr>,
}

/// Explains `query` against `objects`: the sender's egress and, when the
/// destination is a pod, the receiver's ingress, each compiled by the one
/// compiler from the [`Input`] the nodes build, and cross-checked with the
/// reference evaluator ([`ExplainError::Disagreement`] if they differ).
pub fn explain(objects: &Objects, query: &Query) -> Result<Explanation, ExplainError> {
    let shards = cluster::read_shards(&objects.shards);
    let input = input_of(objects, &shards);
    let from = resolve(objects, &input, &shards, &query.from)?;
    let mut notes = Vec::new();

    // The destination: a pod (named, or by one of its addresses), or an
    // address outside the cluster.
    let to_pod = match &query.to {
        Destination::Pod(p) => Some(p.clone()),
        Destination::Address(ip) => {
            shards
                .addresses
                .iter()
                .find(|a| a.address == *ip)
                .map(|a| PodName {
                    namespace: a.pod.0.clone(),
                    name: a.pod.1.clone(),
                })
        }
    };
    let to = match &to_pod {
        Some(name) => Some(resolve(objects, &input, &shards, name)?),
        None => None,
    };
    let to_address = match (&query.to, &to) {
        (Destination::Address(ip), _) => *ip,
        (Destination::Pod(_), Some(r)) => *r
            .addresses
            .first()
            .ok_or_else(|| ExplainError::NoAddress(r.name.clone()))?,
        (Destination::Pod(p), None) => return Err(ExplainError::PodNotFound(p.clone())),
    };
    let from_address = *from
        .addresses
        .iter()
        .find(|a| a.is_ipv4() == to_address.is_ipv4())
        .ok_or_else(|| {
            if from.addresses.is_empty() {
                ExplainError::NoAddress(from.name.clone())
            } else {
                ExplainError::NoAddressOfFamily {
                    pod: from.name.clone(),
                    family: if to_address.is_ipv4() { "IPv4" } else { "IPv6" },
                    destination: to_address,
                }
            }
        })?;
    if to.as_ref().is_some_and(|t| t.name == from.name) {
        return Ok(loopback(&from, to_address, from_address, query));
    }
    let to_identity = to.as_ref().map_or(WORLD, |r| r.endpoint.identity);
    if to.is_none() {
        notes.push(format!(
            "{to_address} is no pod's address: it is outside the cluster to the datapath (identity {WORLD}); only the sender's egress applies"
        ));
    }
    // What the datapath's IP cache says about each address, when a shard lists it.
    for (address, identity, who) in [
        (from_address, from.endpoint.identity, from.name.to_string()),
        (
            to_address,
            to_identity,
            to.as_ref().map_or_else(String::new, |r| r.name.to_string()),
        ),
    ] {
        if let Some(a) = shards.addresses.iter().find(|a| a.address == address)
            && a.identity != identity
        {
            notes.push(format!(
                "the NodeEndpoints shard of {} still lists {address} with identity {}, not {identity} ({who}'s labels now): until its node catches up, the datapath decides by the old one",
                a.node, a.identity
            ));
        }
    }
    let protocol = query.port.protocol;
    let egress = side(
        &input,
        &from,
        Direction::Egress,
        to_identity,
        to_address,
        protocol,
        query.port.port,
    )?;
    let ingress = match &to {
        Some(r) => Some(side(
            &input,
            r,
            Direction::Ingress,
            from.endpoint.identity,
            from_address,
            protocol,
            query.port.port,
        )?),
        None => None,
    };
    notes.push(
        "traffic from a node's own addresses into its pods is always let in (health probes); replies within an established connection pass whatever the policy says now"
            .into(),
    );
    let allowed = egress.allowed && ingress.as_ref().is_none_or(|s| s.allowed);
    Ok(Explanation {
        from: End {
            pod: Some(from.name.to_string()),
            identity: from.endpoint.identity,
            address: from_address,
        },
        to: End {
            pod: to.as_ref().map(|r| r.name.to_string()),
            identity: to_identity,
            address: to_address,
        },
        protocol: protocol.as_str(),
        port: query.port.port,
        egress,
        ingress,
        allowed,
        notes,
    })
}

/// A pod connecting to itself: the packets go over its network namespace's
/// loopback and never reach the datapath, so no policy applies (as in
/// Kubernetes' own NetworkPolicy tests).
fn loopback(pod: &Resolved, to: IpAddr, from: IpAddr, query: &Query) -> Explanation {
    let side = |direction: Direction| Side {
        direction: direction_name(direction),
        pod: pod.name.to_string(),
        enforced: false,
        allowed: true,
        rule: LOOPBACK.to_owned(),
        rule_id: None,
    };
    let end = |address| End {
        pod: Some(pod.name.to_string()),
        identity: pod.endpoint.identity,
        address,
    };
    Explanation {
        from: end(from),
        to: end(to),
        protocol: query.port.protocol.as_str(),
        port: query.port.port,
        egress: side(Direction::Egress),
        ingress: Some(side(Direction::Ingress)),
        allowed: true,
        notes: Vec::new(),
    }
}

/// The deciding rule of both sides of a pod's connection to itself.
pub const LOOPBACK: &str =
    "the pod reaches itself: the packets never leave its network namespace, no policy applies";

/// The compiler's input, built as every node builds it.
pub fn input_of(objects: &Objects, shards: &Shards) -> Input {
    let mut input = cluster::policy_input(
        objects.enforcement,
        objects.policies.clone(),
        objects.bundles.clone(),
    );
    input.identities =
        cluster::with_named_ports(&cluster::identity_infos(&objects.identities), &shards.named);
    input.pod_networks =
        cluster::pod_networks(&objects.pools, shards.addresses.iter().map(|a| a.address));
    input
}

/// The pod's identity, labels, named ports and addresses.
fn resolve(
    objects: &Objects,
    input: &Input,
    shards: &Shards,
    name: &PodName,
) -> Result<Resolved, ExplainError> {
    let pod = objects
        .pods
        .iter()
        .find(|p| {
            p.metadata.namespace.as_deref() == Some(&name.namespace)
                && p.metadata.name.as_deref() == Some(&name.name)
        })
        .ok_or_else(|| ExplainError::PodNotFound(name.clone()))?;
    let namespace = objects
        .namespaces
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(&name.namespace))
        .ok_or_else(|| ExplainError::NamespaceNotFound {
            pod: name.clone(),
            namespace: name.namespace.clone(),
        })?;
    let (labels, named_ports) =
        objects::pod_labels_and_ports(pod, namespace).map_err(|source| ExplainError::Labels {
            pod: name.clone(),
            source,
        })?;
    let identity = identity_of(input, &labels).ok_or_else(|| ExplainError::NoIdentity {
        pod: name.clone(),
        labels: labels.to_string(),
    })?;
    // The addresses the datapath knows (its node's shard), else the pod's status.
    let mut addresses: Vec<IpAddr> = shards
        .addresses
        .iter()
        .filter(|a| a.pod.0 == name.namespace && a.pod.1 == name.name)
        .map(|a| a.address)
        .collect();
    if addresses.is_empty() {
        let status = pod.status.as_ref();
        addresses = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
    }
    Ok(Resolved {
        name: name.clone(),
        endpoint: LocalEndpoint {
            identity,
            labels,
            named_ports,
        },
        addresses,
    })
}

/// The identity holding exactly `labels` (a node creates at most one).
fn identity_of(input: &Input, labels: &SecurityLabels) -> Option<u32> {
    input
        .identities
        .iter()
        .find(|i| &i.labels == labels)
        .map(|i| i.id)
}

/// One end's verdict: the compiled table's lookup, explained by its
/// provenance, and checked against the reference evaluator.
fn side(
    input: &Input,
    local: &Resolved,
    direction: Direction,
    remote_identity: u32,
    remote_address: IpAddr,
    protocol: Protocol,
    port: u16,
) -> Result<Side, ExplainError> {
    let compiled = compile_endpoint(input, &local.endpoint);
    let table = compiled.policy.table(direction);
    let cidr_identity = input.cidrs.cidr_identity(remote_address);
    let proto = protocol.number();
    let pod = local.name.to_string();
    let disagree = |compiled: String, reference: String| ExplainError::Disagreement {
        direction: direction_name(direction),
        pod: pod.clone(),
        compiled,
        reference,
    };
    let packet = Packet {
        identity: remote_identity,
        address: remote_address,
        proto,
        port,
    };
    let reference = reference::evaluate(input, &local.endpoint, direction, &packet);
    if !table.isolated {
        if let Some(v) = reference {
            return Err(disagree(
                "nothing applies (the direction is not isolated)".into(),
                format!("{} by {}", verdict_word(v.allowed), v.by),
            ));
        }
        let rule = match input.enforcement {
            PolicyEnforcement::Never => {
                "enforcement Never: no policy is enforced, allowed".to_owned()
            }
            _ => Origin::NotIsolated { direction }.to_string(),
        };
        return Ok(Side {
            direction: direction_name(direction),
            pod,
            enforced: false,
            allowed: true,
            rule,
            rule_id: None,
        });
    }
    let decision = lookup(table, remote_identity, cidr_identity, proto, port);
    let allowed = matches!(decision, Decision::Allow { .. });
    let origin = compiled.provenance.explain(direction, decision);
    let compiled_says = || match origin {
        Some(o) => format!("{} by {o}", verdict_word(allowed)),
        None => format!(
            "{} by no rule ({decision:?} without provenance)",
            verdict_word(allowed)
        ),
    };
    let Some(v) = reference else {
        return Err(disagree(
            compiled_says(),
            "nothing applies (the direction is not enforced)".into(),
        ));
    };
    let agrees = v.allowed == allowed && origin.is_some_and(|o| v.equally.contains(o));
    if !agrees {
        return Err(disagree(
            compiled_says(),
            format!("{} by {}", verdict_word(v.allowed), v.by),
        ));
    }
    let rule_id = match decision {
        Decision::Allow { rule } | Decision::Deny { rule } => Some(rule),
        Decision::NoMatch => None,
    };
    Ok(Side {
        direction: direction_name(direction),
        pod,
        enforced: true,
        allowed,
        rule: origin.map(ToString::to_string).unwrap_or_default(),
        rule_id,
    })
}

fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

fn verdict_word(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

#[cfg(test)]
mod tests;
