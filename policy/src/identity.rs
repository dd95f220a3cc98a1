//! Security identities (0004 §1): the reserved numbers, the label set that
//! decides which pods share an identity, and what the compiler needs to know
//! about each identity.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::core::v1::ContainerPort;

use crate::ports::Protocol;

/// A wildcard in policy keys; never a packet's identity.
pub const ANY: u32 = 0;
/// An address of this node (health probes come from here).
pub const HOST: u32 = 1;
/// An address outside every known pod and CIDR.
pub const WORLD: u32 = 2;
/// The first pod identity (3–255 are reserved).
pub const POD_FIRST: u32 = 256;
/// The last pod identity.
pub const POD_LAST: u32 = 0x00ff_ffff;
/// The first CIDR identity; CIDR identities are local to a node.
pub const CIDR_FIRST: u32 = 0x0100_0000;

/// What kind of identity a number is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IdentityKind {
    /// [`ANY`], [`HOST`], [`WORLD`] or another number below [`POD_FIRST`].
    Reserved,
    /// A pod label set, cluster-wide.
    Pod,
    /// A policy prefix, local to a node.
    Cidr,
}

impl IdentityKind {
    /// The kind of `id`.
    pub fn of(id: u32) -> Self {
        match id {
            0..POD_FIRST => IdentityKind::Reserved,
            POD_FIRST..=POD_LAST => IdentityKind::Pod,
            _ => IdentityKind::Cidr,
        }
    }
}

/// The labels that decide a pod's identity: its namespace's name, the
/// namespace's labels and the pod's own labels. Pods with equal label sets
/// share one identity; this is the key whoever allocates identities maps to
/// numbers (it is `Ord` and `Hash`).
///
/// Every label counts, because a policy may select on any of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecurityLabels {
    /// The pod's namespace.
    pub namespace: String,
    /// The namespace's labels (including `kubernetes.io/metadata.name`, which
    /// the apiserver sets).
    pub namespace_labels: BTreeMap<String, String>,
    /// The pod's labels.
    pub pod_labels: BTreeMap<String, String>,
}

impl SecurityLabels {
    /// The label set of a pod in `namespace`.
    pub fn new(
        namespace: impl Into<String>,
        namespace_labels: BTreeMap<String, String>,
        pod_labels: BTreeMap<String, String>,
    ) -> Self {
        SecurityLabels {
            namespace: namespace.into(),
            namespace_labels,
            pod_labels,
        }
    }
}

impl fmt::Display for SecurityLabels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{{", self.namespace)?;
        for (i, (k, v)) in self.pod_labels.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        f.write_str("}")
    }
}

/// Container ports by name: name → every (protocol, number) it stands for.
/// A set, because pods sharing an identity may number one name differently
/// (0004: then every such number counts for all of them).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPorts(BTreeMap<String, BTreeSet<(Protocol, u16)>>);

impl NamedPorts {
    /// No named ports.
    pub fn new() -> Self {
        NamedPorts::default()
    }

    /// Adds `name` → (`protocol`, `port`).
    pub fn insert(&mut self, name: impl Into<String>, protocol: Protocol, port: u16) {
        self.0
            .entry(name.into())
            .or_default()
            .insert((protocol, port));
    }

    /// Adds every named port of `other` (the union over the pods of an identity).
    pub fn extend(&mut self, other: &NamedPorts) {
        for (name, ports) in &other.0 {
            self.0.entry(name.clone()).or_default().extend(ports);
        }
    }

    /// The numbers `name` stands for with `protocol`, ascending.
    pub fn resolve<'a>(
        &'a self,
        name: &str,
        protocol: Protocol,
    ) -> impl Iterator<Item = u16> + use<'a> {
        self.0
            .get(name)
            .into_iter()
            .flatten()
            .filter(move |(p, _)| *p == protocol)
            .map(|(_, port)| *port)
    }

    /// Every (name, protocol, port), sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Protocol, u16)> {
        self.0
            .iter()
            .flat_map(|(name, ports)| ports.iter().map(move |(p, n)| (name.as_str(), *p, *n)))
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The named ports of a pod's containers (`spec.containers[*].ports`).
    /// Unnamed ports, and ports the apiserver would have refused (a number
    /// outside 1–65535, an unknown protocol), are skipped.
    pub fn from_container_ports<'a>(ports: impl IntoIterator<Item = &'a ContainerPort>) -> Self {
        let mut named = NamedPorts::new();
        for p in ports {
            let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let Some(protocol) = Protocol::from_k8s(p.protocol.as_deref()) else {
                continue;
            };
            let Some(number) = u16::try_from(p.container_port).ok().filter(|n| *n != 0) else {
                continue;
            };
            named.insert(name, protocol, number);
        }
        named
    }
}

impl<S: Into<String>> FromIterator<(S, Protocol, u16)> for NamedPorts {
    fn from_iter<I: IntoIterator<Item = (S, Protocol, u16)>>(iter: I) -> Self {
        let mut named = NamedPorts::new();
        for (name, protocol, port) in iter {
            named.insert(name, protocol, port);
        }
        named
    }
}

/// What the compiler knows about one pod identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityInfo {
    /// The number, in `POD_FIRST..=POD_LAST`.
    pub id: u32,
    /// The label set the number stands for (namespace selectors are decided
    /// from its `namespace_labels`).
    pub labels: SecurityLabels,
    /// The union of the named container ports of the pods with this identity.
    pub named_ports: NamedPorts,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_0004() {
        let cases = [
            (ANY, IdentityKind::Reserved),
            (HOST, IdentityKind::Reserved),
            (WORLD, IdentityKind::Reserved),
            (255, IdentityKind::Reserved),
            (256, IdentityKind::Pod),
            (0x00ff_ffff, IdentityKind::Pod),
            (0x0100_0000, IdentityKind::Cidr),
            (u32::MAX, IdentityKind::Cidr),
        ];
        for (id, want) in cases {
            assert_eq!(IdentityKind::of(id), want, "{id:#x}");
        }
    }

    #[test]
    fn named_ports_resolve_by_name_and_protocol() {
        let named: NamedPorts = [
            ("http", Protocol::Tcp, 8080),
            ("http", Protocol::Tcp, 80),
            ("dns", Protocol::Udp, 53),
            ("dns", Protocol::Tcp, 53),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            named.resolve("http", Protocol::Tcp).collect::<Vec<_>>(),
            [80, 8080]
        );
        assert_eq!(named.resolve("http", Protocol::Udp).count(), 0);
        assert_eq!(
            named.resolve("dns", Protocol::Udp).collect::<Vec<_>>(),
            [53]
        );
        assert_eq!(named.resolve("nope", Protocol::Tcp).count(), 0);
    }

    #[test]
    fn container_ports_skip_what_the_apiserver_refuses() {
        let port = |name: Option<&str>, number: i32, protocol: Option<&str>| ContainerPort {
            name: name.map(str::to_owned),
            container_port: number,
            protocol: protocol.map(str::to_owned),
            ..Default::default()
        };
        let ports = [
            port(Some("http"), 80, None),
            port(Some("dns"), 53, Some("UDP")),
            port(None, 9000, None),
            port(Some("bad"), 0, None),
            port(Some("big"), 70_000, None),
            port(Some("weird"), 1, Some("ICMP")),
        ];
        let named = NamedPorts::from_container_ports(&ports);
        let got: Vec<_> = named.iter().collect();
        assert_eq!(
            got,
            [("dns", Protocol::Udp, 53), ("http", Protocol::Tcp, 80)]
        );
    }
}
