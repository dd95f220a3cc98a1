//! The Kubernetes objects identities come from and go to (0005), turned into
//! the compiler's values and back. Conversions only: no client, no lookups.
//!
//! ```text
//!  Pod + its Namespace ── pod_labels_and_ports ──▶ SecurityLabels, NamedPorts
//!  SecurityIdentity ◀── security_identity(id, labels) ── (create one)
//!  SecurityIdentity ── identity_of / IdentityInfo::try_from ──▶ (id, SecurityLabels)
//!  NodeEndpoints' namedPorts ◀── NamedPorts::to_api / from_api ──▶ NamedPorts
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use trellis_api::v1alpha1::{
    MAX_IDENTITY_LABELS, NamedPort, SecurityIdentity, SecurityIdentitySpec,
};

use crate::identity::{IdentityInfo, NamedPorts, POD_FIRST, POD_LAST, SecurityLabels};
use crate::ports::Protocol;

/// Why an object could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// A `SecurityIdentity` whose name is not a pod identity in decimal (the
    /// schema refuses such names; this is a stale CRD or a hand-made object).
    #[error(
        "SecurityIdentity {name:?}: the name must be a pod identity in decimal without leading zeros, {POD_FIRST} to {POD_LAST}"
    )]
    InvalidIdentityName {
        /// The name as found.
        name: String,
    },
    /// A `SecurityIdentity` without `metadata.name`.
    #[error("a SecurityIdentity without a name")]
    UnnamedIdentity,
    /// A number outside the pod identities was to become a `SecurityIdentity`.
    #[error("{id} is not a pod identity ({POD_FIRST} to {POD_LAST})")]
    NotAPodIdentity {
        /// The number.
        id: u32,
    },
    /// A label set with more labels than a `SecurityIdentity` may hold.
    #[error(
        "{field} has {count} labels; a SecurityIdentity holds at most {MAX_IDENTITY_LABELS}, so these pods cannot get an identity"
    )]
    TooManyLabels {
        /// `namespaceLabels` or `podLabels`.
        field: &'static str,
        /// How many there are.
        count: usize,
    },
    /// A Pod without `metadata.namespace` (the apiserver always sets it).
    #[error("pod {pod:?} has no namespace")]
    PodWithoutNamespace {
        /// The pod's name.
        pod: String,
    },
    /// The Namespace given for a Pod is another namespace.
    #[error(
        "pod {pod:?} is in namespace {pod_namespace:?}, but the labels given are those of {namespace:?}"
    )]
    NamespaceMismatch {
        /// The pod's name.
        pod: String,
        /// The pod's `metadata.namespace`.
        pod_namespace: String,
        /// The name of the Namespace given.
        namespace: String,
    },
}

/// The identity number a `SecurityIdentity` name stands for. Exactly the
/// names the schema admits: decimal digits without sign or leading zeros, in
/// `POD_FIRST..=POD_LAST`.
pub fn parse_identity_name(name: &str) -> Result<u32, ObjectError> {
    let invalid = || ObjectError::InvalidIdentityName {
        name: name.to_owned(),
    };
    let digits_only = !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || name.starts_with('0') || name.len() > 8 {
        return Err(invalid());
    }
    let id: u32 = name.parse().map_err(|_| invalid())?;
    if (POD_FIRST..=POD_LAST).contains(&id) {
        Ok(id)
    } else {
        Err(invalid())
    }
}

/// The number and label set of a `SecurityIdentity`.
pub fn identity_of(object: &SecurityIdentity) -> Result<(u32, SecurityLabels), ObjectError> {
    let name = object
        .metadata
        .name
        .as_deref()
        .ok_or(ObjectError::UnnamedIdentity)?;
    Ok((
        parse_identity_name(name)?,
        SecurityLabels::from(&object.spec),
    ))
}

/// The `SecurityIdentity` to create for `labels` under number `id` (the
/// number [`crate::identity::allocate`] picked).
pub fn security_identity(
    id: u32,
    labels: &SecurityLabels,
) -> Result<SecurityIdentity, ObjectError> {
    if !(POD_FIRST..=POD_LAST).contains(&id) {
        return Err(ObjectError::NotAPodIdentity { id });
    }
    for (field, map) in [
        ("namespaceLabels", &labels.namespace_labels),
        ("podLabels", &labels.pod_labels),
    ] {
        if map.len() > MAX_IDENTITY_LABELS {
            return Err(ObjectError::TooManyLabels {
                field,
                count: map.len(),
            });
        }
    }
    Ok(SecurityIdentity::new(
        &id.to_string(),
        SecurityIdentitySpec::from(labels),
    ))
}

impl From<&SecurityIdentitySpec> for SecurityLabels {
    fn from(spec: &SecurityIdentitySpec) -> Self {
        SecurityLabels::new(
            spec.namespace.clone(),
            spec.namespace_labels.clone(),
            spec.pod_labels.clone(),
        )
    }
}

impl From<&SecurityLabels> for SecurityIdentitySpec {
    fn from(labels: &SecurityLabels) -> Self {
        SecurityIdentitySpec {
            namespace: labels.namespace.clone(),
            namespace_labels: labels.namespace_labels.clone(),
            pod_labels: labels.pod_labels.clone(),
        }
    }
}

impl TryFrom<&SecurityIdentity> for IdentityInfo {
    type Error = ObjectError;

    /// The identity with no named ports: those come from the nodes'
    /// `NodeEndpoints` shards, merged per identity by the caller.
    fn try_from(object: &SecurityIdentity) -> Result<Self, Self::Error> {
        let (id, labels) = identity_of(object)?;
        Ok(IdentityInfo {
            id,
            labels,
            named_ports: NamedPorts::new(),
        })
    }
}

/// What decides a pod's identity, and its named ports: its namespace's name
/// and labels, its own labels, and the named ports of its containers and of
/// its sidecar (restartable init) containers, which Kubernetes resolves named
/// ports against too (`FindPort`).
///
/// `namespace` must be the pod's own Namespace: labels of another namespace
/// would give the pod another namespace's policy, so that is an error.
pub fn pod_labels_and_ports(
    pod: &Pod,
    namespace: &Namespace,
) -> Result<(SecurityLabels, NamedPorts), ObjectError> {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let pod_namespace =
        pod.metadata
            .namespace
            .clone()
            .ok_or_else(|| ObjectError::PodWithoutNamespace {
                pod: pod_name.clone(),
            })?;
    let namespace_name = namespace.metadata.name.as_deref().unwrap_or_default();
    if namespace_name != pod_namespace {
        return Err(ObjectError::NamespaceMismatch {
            pod: pod_name,
            pod_namespace,
            namespace: namespace_name.to_owned(),
        });
    }
    let labels = SecurityLabels::new(
        pod_namespace,
        labels_of(&namespace.metadata),
        labels_of(&pod.metadata),
    );
    let spec = pod.spec.as_ref();
    let containers = spec.into_iter().flat_map(|s| &s.containers);
    let sidecars = spec
        .into_iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let ports = containers
        .chain(sidecars)
        .flat_map(|c| c.ports.iter().flatten());
    Ok((labels, NamedPorts::from_container_ports(ports)))
}

fn labels_of(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

impl NamedPorts {
    /// The named ports of a `NodeEndpoints` entry. Entries the schema would
    /// refuse (a number outside 1–65535, an empty name) are skipped.
    pub fn from_api<'a>(ports: impl IntoIterator<Item = &'a NamedPort>) -> Self {
        ports
            .into_iter()
            .filter(|p| !p.name.is_empty())
            .filter_map(|p| {
                let number = u16::try_from(p.port).ok().filter(|n| *n != 0)?;
                Some((p.name.as_str(), Protocol::from(p.protocol), number))
            })
            .collect()
    }

    /// The named ports as a `NodeEndpoints` entry lists them, sorted by name,
    /// protocol and number.
    pub fn to_api(&self) -> Vec<NamedPort> {
        self.iter()
            .map(|(name, protocol, port)| NamedPort {
                name: name.to_owned(),
                protocol: protocol.into(),
                port: i32::from(port),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};

    use super::*;
    use crate::test_support::map;

    fn payments() -> SecurityLabels {
        SecurityLabels::new(
            "payments",
            map(&[("kubernetes.io/metadata.name", "payments")]),
            map(&[("app", "checkout")]),
        )
    }

    #[test]
    fn identity_names_are_exactly_what_the_schema_admits() {
        for (name, want) in [
            ("256", Some(256)),
            ("3022894", Some(3_022_894)),
            ("16777215", Some(16_777_215)),
            ("255", None),
            ("16777216", None),
            ("99999999", None),
            ("0256", None),
            ("+256", None),
            ("-256", None),
            (" 256", None),
            ("256 ", None),
            ("", None),
            ("checkout", None),
            ("4294967552", None), // 2^32 + 256: would wrap in a careless parser
        ] {
            let got = parse_identity_name(name).ok();
            assert_eq!(got, want, "{name:?}");
        }
        assert_eq!(
            parse_identity_name("web").unwrap_err().to_string(),
            "SecurityIdentity \"web\": the name must be a pod identity in decimal without leading zeros, 256 to 16777215"
        );
    }

    #[test]
    fn security_identities_round_trip() {
        let labels = payments();
        let object = security_identity(3_022_894, &labels).expect("a pod identity");
        assert_eq!(object.metadata.name.as_deref(), Some("3022894"));
        assert_eq!(object.spec.namespace, "payments");
        assert_eq!(identity_of(&object), Ok((3_022_894, labels.clone())));
        let info = IdentityInfo::try_from(&object).expect("valid");
        assert_eq!(info.id, 3_022_894);
        assert_eq!(info.labels, labels);
        assert!(info.named_ports.is_empty());
        // Through the JSON the apiserver stores, too.
        let json = serde_json::to_value(&object).expect("serialize");
        let back: SecurityIdentity = serde_json::from_value(json).expect("deserialize");
        assert_eq!(identity_of(&back), Ok((3_022_894, labels)));
    }

    #[test]
    fn invalid_identities_are_errors() {
        let labels = payments();
        for id in [0, 2, 255, POD_LAST + 1, u32::MAX] {
            assert_eq!(
                security_identity(id, &labels).map(|_| ()),
                Err(ObjectError::NotAPodIdentity { id })
            );
        }
        let mut object = security_identity(300, &labels).expect("valid");
        object.metadata.name = Some("00300".to_owned());
        assert_eq!(
            IdentityInfo::try_from(&object),
            Err(ObjectError::InvalidIdentityName {
                name: "00300".to_owned()
            })
        );
        object.metadata.name = None;
        assert_eq!(identity_of(&object), Err(ObjectError::UnnamedIdentity));

        let many: BTreeMap<String, String> = (0..=MAX_IDENTITY_LABELS)
            .map(|i| (format!("l{i}"), String::new()))
            .collect();
        let crowded = SecurityLabels::new("payments", BTreeMap::new(), many);
        assert_eq!(
            security_identity(300, &crowded).map(|_| ()),
            Err(ObjectError::TooManyLabels {
                field: "podLabels",
                count: MAX_IDENTITY_LABELS + 1
            })
        );
    }

    fn port(name: &str, number: i32, protocol: Option<&str>) -> ContainerPort {
        ContainerPort {
            name: Some(name.to_owned()),
            container_port: number,
            protocol: protocol.map(str::to_owned),
            ..Default::default()
        }
    }

    fn container(name: &str, ports: Vec<ContainerPort>, restart: Option<&str>) -> Container {
        Container {
            name: name.to_owned(),
            ports: Some(ports),
            restart_policy: restart.map(str::to_owned),
            ..Default::default()
        }
    }

    fn pod_in(namespace: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("checkout-0".to_owned()),
                namespace: namespace.map(str::to_owned),
                labels: Some(map(&[("app", "checkout")])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![
                    container("app", vec![port("http", 8080, None)], None),
                    container("dns", vec![port("dns", 53, Some("UDP"))], None),
                ],
                init_containers: Some(vec![
                    // A sidecar: its ports are the pod's.
                    container("proxy", vec![port("proxy", 15001, None)], Some("Always")),
                    // A plain init container has exited before traffic flows.
                    container("setup", vec![port("setup", 9999, None)], None),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn namespace(name: &str) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(map(&[("kubernetes.io/metadata.name", name)])),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_and_its_namespace_give_labels_and_named_ports() {
        let (labels, ports) =
            pod_labels_and_ports(&pod_in(Some("payments")), &namespace("payments"))
                .expect("same namespace");
        assert_eq!(labels, payments());
        let got: Vec<_> = ports.iter().collect();
        assert_eq!(
            got,
            [
                ("dns", Protocol::Udp, 53),
                ("http", Protocol::Tcp, 8080),
                ("proxy", Protocol::Tcp, 15001),
            ]
        );
        // No labels at all is a label set too.
        let bare = Pod {
            metadata: ObjectMeta {
                name: Some("bare".to_owned()),
                namespace: Some("payments".to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut ns = namespace("payments");
        ns.metadata.labels = None;
        let (labels, ports) = pod_labels_and_ports(&bare, &ns).expect("valid");
        assert_eq!(
            labels,
            SecurityLabels::new("payments", BTreeMap::new(), BTreeMap::new())
        );
        assert!(ports.is_empty());
    }

    #[test]
    fn another_namespaces_labels_are_refused() {
        assert_eq!(
            pod_labels_and_ports(&pod_in(Some("payments")), &namespace("default")),
            Err(ObjectError::NamespaceMismatch {
                pod: "checkout-0".to_owned(),
                pod_namespace: "payments".to_owned(),
                namespace: "default".to_owned(),
            })
        );
        assert_eq!(
            pod_labels_and_ports(&pod_in(None), &namespace("payments")),
            Err(ObjectError::PodWithoutNamespace {
                pod: "checkout-0".to_owned()
            })
        );
    }

    #[test]
    fn named_ports_round_trip_through_node_endpoints() {
        let ports: NamedPorts = [
            ("http", Protocol::Tcp, 8080),
            ("http", Protocol::Tcp, 80),
            ("dns", Protocol::Udp, 53),
            ("assoc", Protocol::Sctp, 9),
        ]
        .into_iter()
        .collect();
        let api = ports.to_api();
        assert_eq!(
            api.iter()
                .map(|p| (p.name.as_str(), p.port))
                .collect::<Vec<_>>(),
            [("assoc", 9), ("dns", 53), ("http", 80), ("http", 8080)]
        );
        assert_eq!(NamedPorts::from_api(&api), ports);
        // What the schema refuses is skipped, not trusted.
        let bad = [
            NamedPort {
                name: "big".to_owned(),
                protocol: trellis_api::v1alpha1::Protocol::Tcp,
                port: 70_000,
            },
            NamedPort {
                name: String::new(),
                protocol: trellis_api::v1alpha1::Protocol::Tcp,
                port: 80,
            },
            NamedPort {
                name: "zero".to_owned(),
                protocol: trellis_api::v1alpha1::Protocol::Udp,
                port: 0,
            },
        ];
        assert!(NamedPorts::from_api(&bad).is_empty());
    }
}
