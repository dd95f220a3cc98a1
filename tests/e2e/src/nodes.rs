//! The sandbox's nodes. Today a node is a `Node` object registered the way a kubelet
//! registers one: created with the `kubernetes.io/hostname` label, then its addresses written
//! through the status subresource. There is no kubelet, so the Node has no conditions and
//! `kubectl get nodes` shows it `Unknown`.
//!
//! ```text
//! NodeSpec { name, internal_ips, labels }
//!     │ Nodes::add                     (later: + network namespace + trellis-node)
//!     ├─ POST   /api/v1/nodes                      metadata.labels
//!     └─ PATCH  /api/v1/nodes/<name>/status        status.addresses, status.nodeInfo
//! ```
//!
//! Numbered nodes are `trellis-node-<i>` with InternalIP `192.0.2.<10+i>` (the sandbox's
//! underlay, TEST-NET-1). [`Nodes`] is the one place that adds and removes nodes, so a node
//! can grow a network namespace and a `trellis-node` process without its callers changing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;
use trellis_api::v1alpha1::NodeNetwork;

use crate::{
    crds::FIELD_MANAGER,
    error::{Error, Result},
    sandbox::Sandbox,
};

/// Name prefix of numbered nodes.
pub const NODE_PREFIX: &str = "trellis-node-";
/// The label every kubelet puts on its Node.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// The underlay network the sandbox's node addresses come from (192.0.2.0/24, TEST-NET-1).
pub const UNDERLAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 0);
/// Host part of the first node address: node `i` gets `192.0.2.<FIRST_HOST + i>`.
pub const FIRST_HOST: u8 = 10;
/// Most numbered nodes: `192.0.2.254` is the last usable address.
pub const MAX_NUMBERED: usize = 254 - FIRST_HOST as usize;

/// A node to add to the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    /// `status.addresses` of type `InternalIP`, in this order (at least one).
    pub internal_ips: Vec<IpAddr>,
    /// Labels; [`NodeSpec::new`] sets `kubernetes.io/hostname=<name>`.
    pub labels: BTreeMap<String, String>,
}

impl NodeSpec {
    /// A node with one InternalIP and the hostname label.
    pub fn new(name: impl Into<String>, internal_ip: IpAddr) -> Self {
        let name = name.into();
        NodeSpec {
            labels: BTreeMap::from([(HOSTNAME_LABEL.to_string(), name.clone())]),
            internal_ips: vec![internal_ip],
            name,
        }
    }

    /// `trellis-node-<i>` at `192.0.2.<10+i>`; `None` unless `1 <= i <= MAX_NUMBERED`.
    pub fn numbered(i: usize) -> Option<Self> {
        Some(NodeSpec::new(
            format!("{NODE_PREFIX}{i}"),
            IpAddr::V4(underlay_address(i)?),
        ))
    }

    /// Adds (or replaces) a label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// The object to create: name and labels (a kubelet registers with the same).
    pub fn node(&self) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(self.labels.clone()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        }
    }

    /// The merge patch for the status subresource: the addresses and what a kubelet says about
    /// the machine (the sandbox's nodes share this machine's kernel).
    pub fn status_patch(&self) -> serde_json::Value {
        let mut addresses: Vec<_> = self
            .internal_ips
            .iter()
            .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
            .collect();
        addresses.push(json!({"type": "Hostname", "address": self.name}));
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        json!({"status": {
            "addresses": addresses,
            "nodeInfo": {
                "osImage": "trellis sandbox node (no kubelet)",
                "kernelVersion": kernel.trim(),
                "operatingSystem": std::env::consts::OS,
                "architecture": go_arch(std::env::consts::ARCH),
            },
        }})
    }

    fn check(&self) -> Result<()> {
        if self.internal_ips.is_empty() {
            return Err(Error::InvalidNode {
                name: self.name.clone(),
                reason: "a node needs at least one InternalIP".into(),
            });
        }
        Ok(())
    }
}

/// Nodes `trellis-node-1` … `trellis-node-<count>` (see [`NodeSpec::numbered`]).
pub fn numbered(count: usize) -> Result<Vec<NodeSpec>> {
    if count > MAX_NUMBERED {
        return Err(Error::InvalidNode {
            name: format!("{NODE_PREFIX}{count}"),
            reason: format!(
                "the sandbox numbers at most {MAX_NUMBERED} nodes (192.0.2.{}..=192.0.2.254)",
                usize::from(FIRST_HOST) + 1
            ),
        });
    }
    Ok((1..=count).filter_map(NodeSpec::numbered).collect())
}

/// `192.0.2.<10+i>` for `1 <= i <= MAX_NUMBERED`.
pub fn underlay_address(i: usize) -> Option<Ipv4Addr> {
    if i == 0 || i > MAX_NUMBERED {
        return None;
    }
    let host = u8::try_from(usize::from(FIRST_HOST) + i).ok()?;
    let [a, b, c, _] = UNDERLAY.octets();
    Some(Ipv4Addr::new(a, b, c, host))
}

/// The first underlay address after `192.0.2.10` that no address in `taken` uses.
pub fn next_free_address(taken: &BTreeSet<IpAddr>) -> Option<Ipv4Addr> {
    (1..=MAX_NUMBERED)
        .filter_map(underlay_address)
        .find(|ip| !taken.contains(&IpAddr::V4(*ip)))
}

/// Kubernetes spells architectures the Go way.
fn go_arch(rust: &str) -> &str {
    match rust {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// A node as `trellis-sandbox node list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub internal_ips: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// `spec.podCIDRs` of its `NodeNetwork`; `None` while the operator has written none.
    pub pod_cidrs: Option<Vec<String>>,
}

/// Adds, removes and lists the sandbox's nodes.
#[derive(Clone)]
pub struct Nodes {
    sandbox: Sandbox,
    client: kube::Client,
}

impl Nodes {
    pub fn new(sandbox: Sandbox, client: kube::Client) -> Self {
        Nodes { sandbox, client }
    }

    /// For a sandbox started earlier (by another process): a client from its kubeconfig.
    pub async fn connect(sandbox: &Sandbox) -> Result<Self> {
        let kubeconfig = sandbox.kubeconfig_path();
        if !kubeconfig.is_file() {
            return Err(Error::NotStarted {
                path: sandbox.dir().to_path_buf(),
            });
        }
        let client = crate::kubeconfig::client(&kubeconfig).await?;
        Ok(Nodes::new(sandbox.clone(), client))
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    fn api(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// Register a node: create the Node, then write its addresses through the status
    /// subresource. If that second step fails the Node is deleted again.
    pub async fn add(&self, spec: &NodeSpec) -> Result<Node> {
        spec.check()?;
        let api = self.api();
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        api.create(&params, &spec.node())
            .await
            .map_err(|e| Error::kube(format!("create Node {}", spec.name), e))?;
        let patch = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        match api
            .patch_status(&spec.name, &patch, &Patch::Merge(spec.status_patch()))
            .await
        {
            Ok(node) => Ok(node),
            Err(e) => {
                let _ = api.delete(&spec.name, &DeleteParams::default()).await;
                Err(Error::kube(
                    format!("write the addresses of Node {}", spec.name),
                    e,
                ))
            }
        }
    }

    /// [`Nodes::add`] for each spec, all at once.
    pub async fn add_all(&self, specs: &[NodeSpec]) -> Result<Vec<Node>> {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, spec) in specs.iter().enumerate() {
            let (nodes, spec) = (self.clone(), spec.clone());
            tasks.spawn(async move { (i, nodes.add(&spec).await) });
        }
        let mut added = Vec::new();
        let mut errors = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, Ok(node))) => added.push((i, node)),
                Ok((_, Err(e))) => errors.push(e),
                Err(e) => errors.push(Error::InvalidNode {
                    name: "?".into(),
                    reason: format!("the task adding it failed: {e}"),
                }),
            }
        }
        Error::from_list(errors)?;
        added.sort_by_key(|(i, _)| *i);
        Ok(added.into_iter().map(|(_, node)| node).collect())
    }

    /// Remove a node: delete the Node (its `NodeNetwork` is the operator's to delete).
    /// `Ok(false)` if there was no such node.
    pub async fn remove(&self, name: &str) -> Result<bool> {
        match self.api().delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(e) => Err(Error::kube(format!("delete Node {name}"), e)),
        }
    }

    /// Every Node with its InternalIPs and its `NodeNetwork`'s pod CIDRs, by name.
    pub async fn list(&self) -> Result<Vec<NodeView>> {
        let nodes = self
            .api()
            .list(&ListParams::default())
            .await
            .map_err(|e| Error::kube("list Nodes", e))?;
        // Without the CRDs (`up --no-crds`) there are no NodeNetworks to show.
        let networks: BTreeMap<String, Vec<String>> =
            match Api::<NodeNetwork>::all(self.client.clone())
                .list(&ListParams::default())
                .await
            {
                Ok(list) => list
                    .items
                    .into_iter()
                    .map(|nn| (nn.name_any(), nn.spec.pod_cidrs))
                    .collect(),
                Err(kube::Error::Api(status)) if status.code == 404 => BTreeMap::new(),
                Err(e) => return Err(Error::kube("list NodeNetworks", e)),
            };
        let mut views: Vec<NodeView> = nodes
            .items
            .into_iter()
            .map(|node| {
                let name = node.name_any();
                NodeView {
                    internal_ips: internal_ips(&node),
                    labels: node.metadata.labels.unwrap_or_default(),
                    pod_cidrs: networks.get(&name).cloned(),
                    name,
                }
            })
            .collect();
        views.sort_by(|a, b| natural_key(&a.name).cmp(&natural_key(&b.name)));
        Ok(views)
    }

    /// The first free underlay address (see [`next_free_address`]) given the Nodes there are.
    pub async fn next_free_address(&self) -> Result<Ipv4Addr> {
        let taken: BTreeSet<IpAddr> = self
            .list()
            .await?
            .iter()
            .flat_map(|n| n.internal_ips.iter().filter_map(|ip| ip.parse().ok()))
            .collect();
        next_free_address(&taken).ok_or_else(|| Error::InvalidNode {
            name: "?".into(),
            reason: "every underlay address 192.0.2.11..=192.0.2.254 is taken; pass --ip".into(),
        })
    }
}

/// The `InternalIP`s in a Node's status.
pub fn internal_ips(node: &Node) -> Vec<String> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .map(|a| a.address.clone())
        .collect()
}

/// Sorts `trellis-node-2` before `trellis-node-10`.
fn natural_key(name: &str) -> (&str, u64, &str) {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (stem, number) = name.split_at(name.len() - digits);
    (stem, number.parse().unwrap_or(0), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_nodes_get_underlay_addresses() {
        let nodes = numbered(3).unwrap();
        let got: Vec<_> = nodes
            .iter()
            .map(|n| (n.name.as_str(), n.internal_ips[0].to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("trellis-node-1", "192.0.2.11".to_string()),
                ("trellis-node-2", "192.0.2.12".to_string()),
                ("trellis-node-3", "192.0.2.13".to_string()),
            ]
        );
        assert_eq!(
            nodes[0].labels.get(HOSTNAME_LABEL).map(String::as_str),
            Some("trellis-node-1")
        );
        assert!(numbered(0).unwrap().is_empty());
        assert_eq!(numbered(MAX_NUMBERED).unwrap().len(), MAX_NUMBERED);
        assert_eq!(
            numbered(MAX_NUMBERED).unwrap().last().unwrap().internal_ips[0].to_string(),
            "192.0.2.254"
        );
        assert!(numbered(MAX_NUMBERED + 1).is_err());
        assert_eq!(underlay_address(0), None);
    }

    #[test]
    fn next_free_address_skips_taken_ones() {
        let mut taken = BTreeSet::new();
        assert_eq!(
            next_free_address(&taken),
            Some(Ipv4Addr::new(192, 0, 2, 11))
        );
        taken.insert("192.0.2.11".parse().unwrap());
        taken.insert("192.0.2.13".parse().unwrap());
        assert_eq!(
            next_free_address(&taken),
            Some(Ipv4Addr::new(192, 0, 2, 12))
        );
        let all: BTreeSet<IpAddr> = (1..=MAX_NUMBERED)
            .filter_map(underlay_address)
            .map(IpAddr::V4)
            .collect();
        assert_eq!(next_free_address(&all), None);
    }

    #[test]
    fn status_patch_has_internal_ips_first() {
        let spec = NodeSpec::new("n", "192.0.2.50".parse().unwrap())
            .with_label("trellis.dev/dual-stack", "true");
        let spec = NodeSpec {
            internal_ips: vec![
                "192.0.2.50".parse().unwrap(),
                "fd00:192:0:2::50".parse().unwrap(),
            ],
            ..spec
        };
        let patch = spec.status_patch();
        let addresses = patch["status"]["addresses"].as_array().unwrap();
        assert_eq!(
            addresses[0],
            json!({"type": "InternalIP", "address": "192.0.2.50"})
        );
        assert_eq!(
            addresses[1],
            json!({"type": "InternalIP", "address": "fd00:192:0:2::50"})
        );
        assert_eq!(addresses[2], json!({"type": "Hostname", "address": "n"}));
        let node = spec.node();
        assert_eq!(node.metadata.labels.unwrap().len(), 2);
        assert!(node.status.is_none(), "status goes through the subresource");
    }

    #[test]
    fn natural_order() {
        let mut names = vec!["trellis-node-10", "trellis-node-2", "a", "trellis-node-1"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(
            names,
            ["a", "trellis-node-1", "trellis-node-2", "trellis-node-10"]
        );
    }
}
