//! What the compiler could not enforce, and where it is written.
//!
//! A diagnostic never widens what passes: the broken part (a peer, a port, a
//! selector) of a NetworkPolicy or of a bundle's `Allow` rule matches
//! nothing, and the pod stays isolated by its policy; the broken part of a
//! bundle's `Deny` or `Pass` rule matches everything and denies.

use std::fmt;

use crate::ports::Protocol;
use crate::selector::SelectorProblem;

/// A NetworkPolicy, by namespace and name.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    /// `metadata.namespace` (empty when the object has none).
    pub namespace: String,
    /// `metadata.name` (empty when the object has none).
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The object a diagnostic is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// A Kubernetes NetworkPolicy.
    NetworkPolicy(PolicyRef),
    /// A PolicyBundle, by name (bundles are cluster-scoped).
    PolicyBundle(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::NetworkPolicy(p) => write!(f, "networkpolicy {p}"),
            Source::PolicyBundle(name) => write!(f, "policybundle {name}"),
        }
    }
}

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The apiserver would have refused the object; the broken part matches
    /// nothing.
    Error,
    /// The object is valid, but part of it matches nothing here (a named port
    /// no pod declares) or cannot be enforced exactly and fails closed.
    Warning,
}

/// Something the compiler could not enforce as written.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Diagnostic {
    /// The policy or bundle it is in.
    pub source: Source,
    /// The field, e.g. `spec.ingress[0].ports[1].port`.
    pub field: String,
    /// What is wrong there.
    pub problem: Problem,
}

impl Diagnostic {
    /// How bad it is.
    pub fn severity(&self) -> Severity {
        self.problem.severity()
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.source, self.field, self.problem)
    }
}

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, thiserror::Error)]
pub enum Problem {
    /// A label selector the apiserver would refuse; a pod selector of the
    /// policy itself then isolates every pod of the namespace (for the
    /// policy's types) and the policy allows nothing; a peer's selector
    /// matches nothing.
    #[error("invalid label selector: {0}")]
    Selector(SelectorProblem),
    /// `policyTypes` holds something other than `Ingress` or `Egress`: the
    /// policy isolates in both directions.
    #[error("unknown policy type {0:?} (want Ingress or Egress); isolating both directions")]
    UnknownPolicyType(String),
    /// The object has no namespace, so nothing says which pods it selects.
    #[error("the policy has no namespace; it is ignored")]
    NoNamespace,
    /// A peer with none of `podSelector`, `namespaceSelector`, `ipBlock`.
    #[error("a peer must set podSelector, namespaceSelector or ipBlock")]
    EmptyPeer,
    /// `ipBlock` together with a selector.
    #[error("ipBlock cannot be combined with podSelector or namespaceSelector")]
    IpBlockWithSelector,
    /// Not a CIDR.
    #[error("invalid CIDR {0:?}")]
    InvalidCidr(String),
    /// An `except` that is not strictly inside `cidr`.
    #[error("except {except} is not strictly inside cidr {cidr}")]
    ExceptOutsideCidr {
        /// The except prefix.
        except: String,
        /// The block's prefix.
        cidr: String,
    },
    /// A prefix the CIDR identity table given to the compiler does not hold
    /// (the table was built from other policies).
    #[error("prefix {0} has no CIDR identity on this node")]
    CidrWithoutIdentity(String),
    /// A protocol other than TCP, UDP and SCTP.
    #[error("unknown protocol {0:?} (want TCP, UDP or SCTP)")]
    UnknownProtocol(String),
    /// A port number outside 1–65535.
    #[error("port {0} is outside 1-65535")]
    PortOutOfRange(i64),
    /// A port name that is not an IANA service name.
    #[error("invalid port name {name:?}: {why}")]
    InvalidPortName {
        /// The name as written.
        name: String,
        /// Which rule it breaks.
        why: &'static str,
    },
    /// `endPort` without a numeric `port`.
    #[error("endPort needs a numeric port")]
    EndPortWithoutNumericPort,
    /// `endPort` below `port`.
    #[error("endPort {end} is below port {port}")]
    EndPortBelowPort {
        /// `port`.
        port: u16,
        /// `endPort`.
        end: i64,
    },
    /// A named port that no peer (egress) or not the pod itself (ingress)
    /// declares with that protocol: it matches nothing.
    #[error("named port {name:?}/{protocol} resolves to no container port")]
    NamedPortUnresolved {
        /// The port name.
        name: String,
        /// The protocol.
        protocol: Protocol,
    },
    /// An egress named port towards an `ipBlock`: a policy key holds one
    /// identity, so "address in the block" and "the pod declares the port"
    /// cannot both be checked; the pair matches nothing.
    #[error(
        "named port {name:?} cannot be enforced towards an ipBlock; this peer matches nothing on it"
    )]
    NamedPortWithIpBlock {
        /// The port name.
        name: String,
    },
    /// A PolicyBundle rule without peers (the schema requires at least one).
    #[error("a rule must list at least one peer")]
    NoPeers,
    /// A PolicyBundle peer that does not set exactly one of `pods`,
    /// `namespaces` and `ipBlock`.
    #[error("a peer must set exactly one of pods, namespaces or ipBlock (this one sets {0})")]
    PeerFields(usize),
    /// The broken part of a `Deny` or `Pass` rule matched nothing would let
    /// through what the rule may have been written to stop, so it matches
    /// every peer (a broken peer) or every port (a broken port) instead,
    /// and denies (design 0006).
    #[error(
        "this {action} rule has a broken {part}; the part matches every {part} instead and denies (fail closed)"
    )]
    BrokenPartDenies {
        /// `Deny` or `Pass`.
        action: &'static str,
        /// `peer` or `port`.
        part: &'static str,
    },
    /// The verdict for these pod identities depends on which CIDR identity
    /// their address has (a rule on an `ipBlock` ordered before a rule on
    /// pods), and the datapath looks a pod's own entries up before its
    /// address's: the traffic that depends on it is denied (design 0006).
    #[error(
        "the verdict for pod identities {} depends on which CIDR their address is in, which one entry per identity cannot express; their traffic that depends on it is denied", list_ids(.identities)
    )]
    AddressDependentVerdict {
        /// The pod identities, ascending.
        identities: Vec<u32>,
    },
}

/// At most five ids, then how many more.
fn list_ids(ids: &[u32]) -> String {
    let mut s = ids
        .iter()
        .take(5)
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > 5 {
        s.push_str(&format!(" and {} more", ids.len() - 5));
    }
    s
}

impl Problem {
    /// How bad it is.
    pub fn severity(&self) -> Severity {
        match self {
            Problem::NamedPortUnresolved { .. }
            | Problem::NamedPortWithIpBlock { .. }
            | Problem::CidrWithoutIdentity(_)
            | Problem::BrokenPartDenies { .. }
            | Problem::AddressDependentVerdict { .. } => Severity::Warning,
            _ => Severity::Error,
        }
    }
}
