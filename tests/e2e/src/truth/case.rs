//! What a truth-table case is: steps, each a list of changes to the cluster (NetworkPolicies to
//! apply or delete, labels to set on pods or namespaces) and the grids to check afterwards.
//! The expected tables are never written by hand: the oracle computes them from the cluster
//! after the changes.
//!
//! Cases name pods `namespace/name` (`"y/b"`) and build their policies from
//! [`Addresses`] (for `ipBlock`s), so the same case runs on the sandbox and, without one, on
//! [`synthetic_snapshot`] to check the case list itself.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, PodIP, PodStatus},
    networking::v1::NetworkPolicy,
};
use kube::api::ObjectMeta;
use trellis_api::v1alpha1::PolicyBundle;

use super::{
    NAMESPACES, POD_NAMES, PORTS, Protocol, Snapshot, all_grids, node_of, pod_keys, port_name,
    table::Grid,
};
use crate::pods::{ContainerPort, PodSpec};

/// Every pod's address, by `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses(pub BTreeMap<String, IpAddr>);

impl Addresses {
    /// Pod `pod`'s address. Panics for a pod the world does not have (a broken case).
    pub fn ip(&self, pod: &str) -> IpAddr {
        *self
            .0
            .get(pod)
            .unwrap_or_else(|| panic!("no pod {pod} in the truth-table world"))
    }

    /// The prefix of length `len` that holds pod `pod`'s address: `10.244.1.0/24`.
    pub fn cidr(&self, pod: &str, len: u8) -> String {
        let network = match self.ip(pod) {
            IpAddr::V4(ip) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::from((u32::from(ip) & mask).to_be_bytes())
            }
            IpAddr::V6(ip) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::from((u128::from(ip) & mask).to_be_bytes())
            }
        };
        format!("{network}/{len}")
    }

    /// Pod `pod`'s address as a host prefix: `10.244.1.2/32`.
    pub fn host(&self, pod: &str) -> String {
        match self.ip(pod) {
            IpAddr::V4(_) => self.cidr(pod, 32),
            IpAddr::V6(_) => self.cidr(pod, 128),
        }
    }

    /// Made-up addresses as the sandbox hands them out: node `n`'s pods in `10.244.<n-1>.0/24`,
    /// numbered from 1 in the order they were added.
    pub fn synthetic() -> Self {
        let mut next = [0u8; super::NODES];
        let map = pod_keys()
            .into_iter()
            .enumerate()
            .map(|(i, key)| {
                let node = i % super::NODES;
                next[node] += 1;
                let block = u8::try_from(node).unwrap_or_default();
                (key, IpAddr::from([10, 244, block, next[node]]))
            })
            .collect();
        Addresses(map)
    }
}

/// One change to the cluster.
#[derive(Debug, Clone)]
pub enum Change {
    /// Create or update (server-side apply) a NetworkPolicy.
    Apply(Box<NetworkPolicy>),
    /// Delete a NetworkPolicy.
    Delete { namespace: String, name: String },
    /// Create or update (server-side apply) a PolicyBundle.
    ApplyBundle(Box<PolicyBundle>),
    /// Delete a PolicyBundle.
    DeleteBundle { name: String },
    /// Set (`Some`) or remove (`None`) a label of a running pod (`namespace/name`).
    LabelPod {
        pod: String,
        key: String,
        value: Option<String>,
    },
    /// Set or remove a label of a namespace.
    LabelNamespace {
        namespace: String,
        key: String,
        value: Option<String>,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = |key: &str, value: &Option<String>| match value {
            Some(v) => format!("{key}={v}"),
            None => format!("{key}-"),
        };
        match self {
            Change::Apply(p) => write!(
                f,
                "apply NetworkPolicy {}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            ),
            Change::Delete { namespace, name } => {
                write!(f, "delete NetworkPolicy {namespace}/{name}")
            }
            Change::ApplyBundle(b) => write!(
                f,
                "apply PolicyBundle {} ({:?} {})",
                b.metadata.name.as_deref().unwrap_or_default(),
                b.spec.tier,
                b.spec.priority
            ),
            Change::DeleteBundle { name } => write!(f, "delete PolicyBundle {name}"),
            Change::LabelPod { pod, key, value } => {
                write!(f, "label pod {pod} {}", label(key, value))
            }
            Change::LabelNamespace {
                namespace,
                key,
                value,
            } => write!(f, "label namespace {namespace} {}", label(key, value)),
        }
    }
}

/// Changes, then the grids to check once they are in effect.
#[derive(Debug, Clone)]
pub struct Step {
    /// What the step does, for the report.
    pub what: String,
    pub changes: Vec<Change>,
    pub grids: Vec<Grid>,
}

impl Step {
    /// A step with no changes yet that checks every grid.
    pub fn new(what: impl Into<String>) -> Self {
        Step {
            what: what.into(),
            changes: Vec::new(),
            grids: all_grids(),
        }
    }

    pub fn apply(mut self, policy: NetworkPolicy) -> Self {
        self.changes.push(Change::Apply(Box::new(policy)));
        self
    }

    pub fn delete(mut self, namespace: &str, name: &str) -> Self {
        self.changes.push(Change::Delete {
            namespace: namespace.into(),
            name: name.into(),
        });
        self
    }

    pub fn apply_bundle(mut self, bundle: PolicyBundle) -> Self {
        self.changes.push(Change::ApplyBundle(Box::new(bundle)));
        self
    }

    pub fn delete_bundle(mut self, name: &str) -> Self {
        self.changes
            .push(Change::DeleteBundle { name: name.into() });
        self
    }

    /// Set label `key=value` on pod `pod` (`namespace/name`).
    pub fn label_pod(mut self, pod: &str, key: &str, value: &str) -> Self {
        self.changes.push(Change::LabelPod {
            pod: pod.into(),
            key: key.into(),
            value: Some(value.into()),
        });
        self
    }

    /// Remove label `key` from pod `pod`.
    pub fn unlabel_pod(mut self, pod: &str, key: &str) -> Self {
        self.changes.push(Change::LabelPod {
            pod: pod.into(),
            key: key.into(),
            value: None,
        });
        self
    }

    pub fn label_namespace(mut self, namespace: &str, key: &str, value: &str) -> Self {
        self.changes.push(Change::LabelNamespace {
            namespace: namespace.into(),
            key: key.into(),
            value: Some(value.into()),
        });
        self
    }

    pub fn unlabel_namespace(mut self, namespace: &str, key: &str) -> Self {
        self.changes.push(Change::LabelNamespace {
            namespace: namespace.into(),
            key: key.into(),
            value: None,
        });
        self
    }

    /// Check only these grids.
    pub fn on(mut self, grids: &[Grid]) -> Self {
        self.grids = grids.to_vec();
        self
    }
}

/// A named list of steps, built from the pods' addresses.
#[derive(Clone, Copy)]
pub struct Case {
    /// Also the sandbox's name (`/tmp/trellis-e2e-np-<name>`): keep it short.
    pub name: &'static str,
    pub steps: fn(&Addresses) -> Vec<Step>,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case").field("name", &self.name).finish()
    }
}

/// A test file's case list: `truth_cases!(deny_all_ingress, …)` makes `CASES` (every
/// `fn name(&Addresses) -> Vec<Step>` listed, as a [`Case`]) and `mod datapath` with one
/// sandbox test per case, which calls the file's `run(name, steps)`.
#[macro_export]
macro_rules! truth_cases {
    ($($name:ident),* $(,)?) => {
        const CASES: &[$crate::truth::Case] =
            &[$($crate::truth::Case { name: stringify!($name), steps: $name }),*];

        /// The cases on the sandbox, each in a sandbox of its own.
        mod datapath {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(stringify!($name), super::$name).await;
                }
            )*
        }
    };
}

/// A NetworkPolicy `namespace/name` with `spec` as JSON, written as in a manifest:
/// `policy("x", "deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress"]}))`. Panics
/// on a spec that is not a NetworkPolicySpec (a broken case).
pub fn policy(namespace: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": namespace, "name": name},
        "spec": spec,
    }))
    .unwrap_or_else(|e| panic!("NetworkPolicy {namespace}/{name}: {e}"))
}

/// A PolicyBundle `name` with `spec` as JSON, written as in a manifest:
/// `bundle("trellis-no-ssh", json!({"tier": "Admin", "priority": 10, "ingress": […]}))`.
/// Panics on a spec that is not a PolicyBundleSpec (a broken case).
pub fn bundle(name: &str, spec: serde_json::Value) -> PolicyBundle {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "network.trellis.dev/v1alpha1",
        "kind": "PolicyBundle",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap_or_else(|e| panic!("PolicyBundle {name}: {e}"))
}

/// The namespace `name` as the world creates it: labelled `ns=<name>`.
pub fn namespace(name: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("ns".to_string(), name.to_string())])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// The pods as the world adds them, in [`pod_keys`] order: labelled `pod=<name>`, every port
/// of [`PORTS`] named on TCP and UDP, on node [`node_of`].
pub fn pod_specs() -> Vec<PodSpec> {
    let mut specs = Vec::new();
    for ns in NAMESPACES {
        for name in POD_NAMES {
            let mut spec = PodSpec::new(name, node_of(specs.len()))
                .in_namespace(ns)
                .with_label("pod", name);
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                for port in PORTS {
                    spec = spec.with_port(ContainerPort::new(
                        Some(&port_name(port, protocol)),
                        port,
                        protocol.as_k8s(),
                    ));
                }
            }
            specs.push(spec);
        }
    }
    specs
}

/// The world without a sandbox: the namespaces (with the label the apiserver adds,
/// `kubernetes.io/metadata.name`), the pods at `addresses`, no policies.
pub fn synthetic_snapshot(addresses: &Addresses) -> Snapshot {
    let namespaces = NAMESPACES
        .iter()
        .map(|name| {
            let mut ns = namespace(name);
            if let Some(labels) = ns.metadata.labels.as_mut() {
                labels.insert("kubernetes.io/metadata.name".into(), name.to_string());
            }
            ns
        })
        .collect();
    let pods = pod_specs()
        .iter()
        .map(|spec| {
            let ip = addresses.ip(&spec.key().to_string()).to_string();
            Pod {
                status: Some(PodStatus {
                    pod_ip: Some(ip.clone()),
                    pod_ips: Some(vec![PodIP { ip }]),
                    ..PodStatus::default()
                }),
                ..spec.pod()
            }
        })
        .collect();
    Snapshot {
        namespaces,
        pods,
        ..Snapshot::default()
    }
}

/// Make `change` in `snapshot`, as the apiserver would make it.
pub fn apply_change(snapshot: &mut Snapshot, change: &Change) {
    let set = |labels: &mut Option<BTreeMap<String, String>>, key: &str, value: &Option<String>| {
        let labels = labels.get_or_insert_with(BTreeMap::new);
        match value {
            Some(v) => labels.insert(key.to_string(), v.clone()),
            None => labels.remove(key),
        };
    };
    match change {
        Change::Apply(policy) => {
            let key = |p: &NetworkPolicy| (p.metadata.namespace.clone(), p.metadata.name.clone());
            snapshot.policies.retain(|p| key(p) != key(policy));
            snapshot.policies.push((**policy).clone());
        }
        Change::Delete { namespace, name } => snapshot.policies.retain(|p| {
            p.metadata.namespace.as_deref() != Some(namespace.as_str())
                || p.metadata.name.as_deref() != Some(name.as_str())
        }),
        Change::ApplyBundle(bundle) => {
            snapshot
                .bundles
                .retain(|b| b.metadata.name != bundle.metadata.name);
            snapshot.bundles.push((**bundle).clone());
        }
        Change::DeleteBundle { name } => snapshot
            .bundles
            .retain(|b| b.metadata.name.as_deref() != Some(name.as_str())),
        Change::LabelPod { pod, key, value } => {
            let (ns, name) = pod.split_once('/').unwrap_or_default();
            for p in &mut snapshot.pods {
                if p.metadata.namespace.as_deref() == Some(ns)
                    && p.metadata.name.as_deref() == Some(name)
                {
                    set(&mut p.metadata.labels, key, value);
                }
            }
        }
        Change::LabelNamespace {
            namespace,
            key,
            value,
        } => {
            for n in &mut snapshot.namespaces {
                if n.metadata.name.as_deref() == Some(namespace.as_str()) {
                    set(&mut n.metadata.labels, key, value);
                }
            }
        }
    }
}

/// Checks a case list without a sandbox: names are unique, every case builds, names only
/// objects of the world (bundles named `trellis-…`), and each of its steps changes the
/// oracle's tables; the sandbox of each (`/tmp/trellis-e2e-<prefix>-<case>`) has node socket
/// paths that fit. Panics, naming the case and step, at the first that does not.
pub fn check_case_list(cases: &[Case], prefix: &str) {
    let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "case names are unique");
    let addresses = Addresses::synthetic();
    let grids = all_grids();
    let allowed = |snapshot: &Snapshot| -> Vec<bool> {
        super::expected_tables(snapshot, &grids)
            .iter()
            .flat_map(|t| (0..9).flat_map(move |f| (0..9).map(move |to| t.expected_allowed(f, to))))
            .collect()
    };
    for case in cases {
        let dir = std::env::temp_dir().join(format!("trellis-e2e-{prefix}-{}", case.name));
        crate::Sandbox::new(dir)
            .node_dirs("trellis-node-1")
            .check_socket_path()
            .unwrap_or_else(|e| panic!("case {}: {e}", case.name));
        let mut snapshot = synthetic_snapshot(&addresses);
        let mut before = allowed(&snapshot);
        let steps = (case.steps)(&addresses);
        assert!(!steps.is_empty(), "case {}", case.name);
        for (i, step) in steps.iter().enumerate() {
            let at = format!("case {} step {} ({})", case.name, i + 1, step.what);
            assert!(!step.changes.is_empty() && !step.grids.is_empty(), "{at}");
            for change in &step.changes {
                check_names(change, &at);
                apply_change(&mut snapshot, change);
            }
            let after = allowed(&snapshot);
            assert_ne!(before, after, "{at}: changes nothing the tables show");
            before = after;
        }
    }
}

/// A change names only the world's namespaces and pods, and a policy has a name.
fn check_names(change: &Change, at: &str) {
    let ns_ok = |ns: &str| NAMESPACES.contains(&ns);
    let ok = match change {
        Change::Apply(p) => {
            p.metadata.name.is_some() && ns_ok(p.metadata.namespace.as_deref().unwrap_or_default())
        }
        Change::Delete { namespace, .. } => ns_ok(namespace),
        // Cluster-scoped: named like everything the tests make.
        Change::ApplyBundle(b) => b
            .metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("trellis-")),
        Change::DeleteBundle { name } => name.starts_with("trellis-"),
        Change::LabelPod { pod, .. } => pod_keys().contains(pod),
        Change::LabelNamespace { namespace, .. } => ns_ok(namespace),
    };
    assert!(ok, "{at}: {change} names something the world does not have");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::truth::expected_tables;
    use serde_json::json;

    #[test]
    fn synthetic_addresses_follow_the_nodes() {
        let a = Addresses::synthetic();
        assert_eq!(a.ip("x/a").to_string(), "10.244.0.1");
        assert_eq!(a.ip("x/b").to_string(), "10.244.1.1");
        assert_eq!(a.ip("y/a").to_string(), "10.244.0.2");
        assert_eq!(a.ip("z/c").to_string(), "10.244.2.3");
        assert_eq!(a.cidr("y/b", 24), "10.244.1.0/24");
        assert_eq!(a.cidr("y/b", 16), "10.244.0.0/16");
        assert_eq!(a.host("y/b"), "10.244.1.2/32");
        let v6 = Addresses(BTreeMap::from([(
            "x/a".to_string(),
            "fd00:10:244::5".parse().unwrap(),
        )]));
        assert_eq!(v6.cidr("x/a", 64), "fd00:10:244::/64");
        assert_eq!(v6.host("x/a"), "fd00:10:244::5/128");
    }

    #[test]
    fn pods_are_spread_and_named() {
        let specs = pod_specs();
        assert_eq!(specs.len(), 9);
        let on: Vec<(String, &str)> = specs
            .iter()
            .map(|s| (s.key().to_string(), s.node.as_str()))
            .collect();
        assert_eq!(on[0], ("x/a".to_string(), "trellis-node-1"));
        assert_eq!(on[4], ("y/b".to_string(), "trellis-node-2"));
        assert_eq!(on[8], ("z/c".to_string(), "trellis-node-3"));
        let ports: Vec<_> = specs[0]
            .ports
            .iter()
            .map(|p| p.name.clone().unwrap())
            .collect();
        assert_eq!(
            ports,
            [
                "serve-80-tcp",
                "serve-81-tcp",
                "serve-80-udp",
                "serve-81-udp"
            ]
        );
    }

    #[test]
    fn changes_apply_to_a_snapshot() {
        let addresses = Addresses::synthetic();
        let mut snapshot = synthetic_snapshot(&addresses);
        let deny = policy(
            "x",
            "deny",
            json!({"podSelector": {"matchLabels": {"role": "db"}}, "policyTypes": ["Ingress"]}),
        );
        let step = Step::new("deny into db pods")
            .apply(deny)
            .label_pod("x/a", "role", "db");
        for change in &step.changes {
            apply_change(&mut snapshot, change);
        }
        let tables = expected_tables(&snapshot, &step.grids);
        assert_eq!(tables.len(), 4);
        // x/a is the only db pod: only its column is denied (but for itself).
        for t in &tables {
            assert_eq!(t.expected_allowed_count(), 81 - 8, "{t}");
            assert!(!t.expected_allowed(1, 0) && t.expected_allowed(0, 0));
        }
        apply_change(
            &mut snapshot,
            &Change::LabelPod {
                pod: "x/a".into(),
                key: "role".into(),
                value: None,
            },
        );
        assert_eq!(
            expected_tables(&snapshot, &step.grids)[0].expected_allowed_count(),
            81
        );
        apply_change(
            &mut snapshot,
            &Change::Delete {
                namespace: "x".into(),
                name: "deny".into(),
            },
        );
        assert!(snapshot.policies.is_empty());
        assert_eq!(step.changes[1].to_string(), "label pod x/a role=db",);
    }
}
