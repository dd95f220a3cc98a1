//! The sandbox's nodes. A node is a `Node` object registered the way a kubelet registers one:
//! created with the `kubernetes.io/hostname` label, then its addresses written through the
//! status subresource. There is no kubelet, so the Node has no conditions and
//! `kubectl get nodes` shows it `Unknown`. In a sandbox with a datapath a node is also a
//! network namespace on the underlay ([`crate::datapath`]) with a `trellis-node` running for
//! it ([`crate::agent`]).
//!
//! ```text
//! NodeSpec { name, internal_ips, labels }
//!     │ Nodes::add
//!     ├─ netns trellis-<tag>-<name>, veth to the underlay bridge, eth0 <ip>/24  (datapath)
//!     ├─ POST   /api/v1/nodes                      metadata.labels
//!     ├─ PATCH  /api/v1/nodes/<name>/status        status.addresses, status.nodeInfo
//!     └─ trellis-node --node-name <name> --host-netns /run/netns/…, /healthz      (agents)
//!
//! Nodes::remove: end the agent ─► forget its pods (namespaces, records, Pods)
//!               ─► delete bridge port and namespace, its node dirs ─► DELETE the Node
//!               ─► DELETE its NetworkStatus (the garbage collector's job; there is none)
//! ```
//!
//! With a datapath a node also has its own directories under `<state>/nodes/<name>/`
//! ([`NodeDirs`]): its agent's state and endpoint socket, and the CNI conf and bin dirs its
//! agent installs into. [`Nodes::wait_network_ready`] waits for the conflist there, as a
//! kubelet does before it starts pods.
//!
//! Numbered nodes are `trellis-node-<i>` with InternalIP `192.0.2.<10+i>` (the sandbox's
//! underlay, TEST-NET-1). [`Nodes`] is the one place that adds and removes nodes; whether a
//! node gets a namespace and an agent is recorded in the state directory (`datapath.json`),
//! so a `Nodes` of another process (`trellis-sandbox node add`) does the same.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::Output,
    time::Duration,
};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;
use trellis_api::v1alpha1::{NetworkStatus, NodeNetwork};

use crate::{
    access,
    agent::{self, Agent},
    controlplane::blocking,
    crds::FIELD_MANAGER,
    datapath::{self, DatapathConfig, NetnsRecord, NodeDatapath},
    error::{Error, Result},
    process::{self, Ended, PidRecord},
    sandbox::{NodeDirs, ProcessState, ProcessStatus, Sandbox, TERM_GRACE},
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
    /// Its network namespace, if the sandbox made one for it.
    pub netns: Option<String>,
    /// Its `trellis-node`'s pid record and whether it runs; `None` if none is recorded.
    pub agent: Option<ProcessStatus>,
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

    /// The client this `Nodes` talks to the apiserver with.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    fn api(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// Add a node: in a sandbox with a datapath first its namespace on the underlay, then the
    /// Node object (see [`Nodes::register`]), then, if the sandbox runs agents, its
    /// `trellis-node`, waiting for its `/healthz`. All or nothing: on failure whatever this
    /// call made is removed again.
    pub async fn add(&self, spec: &NodeSpec) -> Result<Node> {
        let config = self.datapath_config()?;
        let agents = config.as_ref().is_some_and(|c| c.agents);
        self.add_with(spec, config.as_ref(), agents).await
    }

    async fn add_with(
        &self,
        spec: &NodeSpec,
        config: Option<&DatapathConfig>,
        start_agent: bool,
    ) -> Result<Node> {
        spec.check()?;
        let made = match config {
            Some(config) => {
                let dirs = self.sandbox.node_dirs(&spec.name);
                dirs.check_socket_path()
                    .map_err(|reason| Error::InvalidNode {
                        name: spec.name.clone(),
                        reason,
                    })?;
                let (sandbox, config, spec) = (self.sandbox.clone(), config.clone(), spec.clone());
                let node =
                    blocking(move || datapath::create_node(&sandbox, &config, &spec)).await?;
                if let Err(e) = dirs.create() {
                    let sandbox = self.sandbox.clone();
                    let _ = blocking(move || datapath::delete_node(&sandbox, &node)).await;
                    return Err(e);
                }
                Some(node)
            }
            None => None,
        };
        let node = match self.register(spec).await {
            Ok(node) => node,
            Err(e) => {
                // Only what this call made: a Node of that name may exist already.
                if let Some(made) = made {
                    let sandbox = self.sandbox.clone();
                    if let Err(cleanup) =
                        blocking(move || datapath::delete_node(&sandbox, &made)).await
                    {
                        tracing::warn!(node = %spec.name, error = %cleanup, "deleting the namespace of a node that could not be registered");
                    }
                    let _ = self.sandbox.node_dirs(&spec.name).remove();
                }
                return Err(e);
            }
        };
        if start_agent && let Err(e) = self.start_agent(&spec.name).await {
            if let Err(cleanup) = self.remove(&spec.name).await {
                tracing::warn!(node = %spec.name, error = %cleanup, "removing a node whose agent did not start");
            }
            return Err(e);
        }
        Ok(node)
    }

    /// Register a node's Node object only: create the Node, then write its addresses through
    /// the status subresource. If that second step fails the Node is deleted again.
    pub async fn register(&self, spec: &NodeSpec) -> Result<Node> {
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
        let agents = self.datapath_config()?.is_some_and(|c| c.agents);
        self.add_all_with(specs, agents).await
    }

    /// [`Nodes::add_all`], starting the agents only if `start_agents` (the control plane
    /// starts them once the operator runs).
    pub(crate) async fn add_all_with(
        &self,
        specs: &[NodeSpec],
        start_agents: bool,
    ) -> Result<Vec<Node>> {
        let config = self.datapath_config()?;
        let mut tasks = tokio::task::JoinSet::new();
        for (i, spec) in specs.iter().enumerate() {
            let (nodes, spec, config) = (self.clone(), spec.clone(), config.clone());
            tasks.spawn(async move {
                (
                    i,
                    nodes
                        .add_with(&spec, config.as_ref(), start_agents && config.is_some())
                        .await,
                )
            });
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

    /// Remove a node: end its agent (SIGTERM by its recorded pid), forget its pods (their
    /// namespaces, records and Pods: the pod garbage collector's job), delete its bridge port,
    /// namespace and node dirs, delete the Node, then its `NetworkStatus` (see
    /// [`Nodes::collect_network_status`]; its `NodeNetwork` is the operator's to delete).
    /// `Ok(false)` if there was no such node. If the agent cannot be ended nothing else is
    /// touched.
    pub async fn remove(&self, name: &str) -> Result<bool> {
        let mut existed = self.stop_agent(name).await?.is_some();
        let mut errors = Vec::new();
        if let Err(e) = crate::pods::forget_node(&self.sandbox, Some(&self.client), name).await {
            errors.push(e);
        }
        if let Some(node) = self.datapath_record(name)? {
            existed = true;
            let sandbox = self.sandbox.clone();
            if let Err(e) = blocking(move || datapath::delete_node(&sandbox, &node)).await {
                errors.push(e);
            } else if let Err(e) = self.sandbox.node_dirs(name).remove() {
                errors.push(e);
            }
        }
        let node_gone = match self.api().delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                existed = true;
                true
            }
            Err(kube::Error::Api(status)) if status.code == 404 => true,
            Err(e) => {
                errors.push(Error::kube(format!("delete Node {name}"), e));
                false
            }
        };
        // As the garbage collector would: only once the owner is gone.
        if node_gone && let Err(e) = self.collect_network_status(name).await {
            errors.push(e);
        }
        Error::from_list(errors).map(|()| existed)
    }

    /// Delete node `name`'s `NetworkStatus`; none there (or no such resource: a sandbox
    /// without the CRDs) is fine.
    ///
    /// This stands in for the garbage collector. Each `trellis-node` writes a `NetworkStatus`
    /// named after its node with the Node as its owner (`ownerReferences`), and in a real
    /// cluster kube-controller-manager's garbage collector deletes it once the Node is
    /// deleted. The sandbox runs no controller manager, so without this a removed node's
    /// `NetworkStatus` would stay for good. Call it only after the node's agent has ended
    /// (or it writes the object again) and the Node is deleted, as [`Nodes::remove`] does.
    pub async fn collect_network_status(&self, name: &str) -> Result<()> {
        match Api::<NetworkStatus>::all(self.client.clone())
            .delete(name, &DeleteParams::background())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(Error::kube(format!("delete NetworkStatus {name}"), e)),
        }
    }

    /// The sandbox's datapath configuration; `None` if it has no datapath.
    pub fn datapath_config(&self) -> Result<Option<DatapathConfig>> {
        DatapathConfig::read(&self.sandbox)
    }

    fn require_datapath(&self) -> Result<DatapathConfig> {
        self.datapath_config()?.ok_or_else(|| Error::Datapath {
            path: self.sandbox.dir().to_path_buf(),
            reason: "the sandbox has no datapath (started without it: --no-datapath, \
                     StartOptions::datapath = false)"
                .into(),
        })
    }

    fn datapath_record(&self, name: &str) -> Result<Option<NodeDatapath>> {
        let Some(config) = self.datapath_config()? else {
            return Ok(None);
        };
        let Ok(netns) = datapath::node_netns_name(&config.tag, name) else {
            return Ok(None);
        };
        Ok(match datapath::read_record(&self.sandbox, &netns)? {
            Some(NetnsRecord::Node(node)) if node.node == name => Some(node),
            _ => None,
        })
    }

    /// Node `name`'s part of the datapath: namespace, bridge port, underlay address, agent
    /// metrics port. An error if the sandbox has no datapath or the node no namespace.
    pub fn datapath(&self, name: &str) -> Result<NodeDatapath> {
        self.require_datapath()?;
        self.datapath_record(name)?
            .ok_or_else(|| Error::InvalidNode {
                name: name.to_string(),
                reason: format!(
                    "has no network namespace in the sandbox in {}",
                    self.sandbox.dir().display()
                ),
            })
    }

    /// The name of node `name`'s network namespace.
    pub fn netns(&self, name: &str) -> Result<String> {
        Ok(self.datapath(name)?.netns)
    }

    /// `/run/netns/<namespace>` of node `name` (what its agent gets as `--host-netns`).
    pub fn netns_path(&self, name: &str) -> Result<PathBuf> {
        Ok(self.datapath(name)?.netns_path())
    }

    /// The address of node `name`'s `eth0` on the underlay.
    pub fn underlay_ip(&self, name: &str) -> Result<Ipv4Addr> {
        Ok(self.datapath(name)?.address)
    }

    /// The namespace holding the underlay bridge.
    pub fn underlay_netns(&self) -> Result<String> {
        Ok(self.require_datapath()?.underlay_netns)
    }

    /// Node `name`'s own directories (see [`NodeDirs`]; they exist once the node has a
    /// namespace).
    pub fn node_dirs(&self, name: &str) -> NodeDirs {
        self.sandbox.node_dirs(name)
    }

    /// Node `name`'s CNI conf dir (`--cni-conf-dir` of its agent).
    pub fn cni_conf_dir(&self, name: &str) -> PathBuf {
        self.node_dirs(name).conf
    }

    /// Node `name`'s CNI bin dir (`--cni-bin-dir` of its agent).
    pub fn cni_bin_dir(&self, name: &str) -> PathBuf {
        self.node_dirs(name).bin
    }

    /// Where node `name`'s agent serves the CNI plugin (`<--run-dir>/cni.sock`).
    pub fn cni_socket(&self, name: &str) -> PathBuf {
        self.node_dirs(name).socket()
    }

    /// The conflist node `name`'s pods get (the lowest-sorted `*.conflist` in its CNI conf
    /// dir), if there is one yet.
    pub fn network_config(&self, name: &str) -> Result<Option<PathBuf>> {
        let dir = self.cni_conf_dir(name);
        crate::cni_runtime::first_conflist(&dir).map_err(|source| Error::Cni {
            context: format!("node {name}"),
            source: Box::new(source),
        })
    }

    /// Wait until node `name`'s network is ready, which is how a kubelet decides it: a
    /// conflist in its CNI conf dir. Returns that conflist's path. Fails at once if the node
    /// has no namespace or its recorded agent has exited, and after `timeout`.
    pub async fn wait_network_ready(&self, name: &str, timeout: Duration) -> Result<PathBuf> {
        self.datapath(name)?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(path) = self.network_config(name)? {
                return Ok(path);
            }
            let agent = self.agent(name)?;
            let not_ready = |detail: String| Error::NetworkNotReady {
                node: name.to_string(),
                conf_dir: self.cni_conf_dir(name),
                timeout,
                detail,
            };
            if let Some(record) = &agent
                && ProcessStatus::of(record.clone()).state != ProcessState::Running
            {
                let log = self.sandbox.log_path(&record.name);
                return Err(not_ready(format!(
                    "its agent (pid {}) is not running; last lines of {}:\n{}",
                    record.pid,
                    log.display(),
                    process::log_tail(&log, process::LOG_TAIL_LINES)
                )));
            }
            if std::time::Instant::now() >= deadline {
                return Err(not_ready(match agent {
                    None => "no trellis-node runs for it (started without agents?)".into(),
                    Some(record) => format!(
                        "its agent runs (pid {}); see {}",
                        record.pid,
                        self.sandbox.log_path(&record.name).display()
                    ),
                }));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The pid record of node `name`'s agent, if one is recorded (it may have exited since:
    /// see [`ProcessStatus::of`]).
    pub fn agent(&self, name: &str) -> Result<Option<PidRecord>> {
        let path = self.sandbox.pid_path(&agent::process_name(name));
        if !path.is_file() {
            return Ok(None);
        }
        PidRecord::read(&path).map(Some)
    }

    /// The port of node `name`'s agent's `/metrics`, `/healthz` and `/readyz` on 127.0.0.1,
    /// if an agent was started for it.
    pub fn agent_metrics_port(&self, name: &str) -> Result<Option<u16>> {
        Ok(self.datapath(name)?.agent_metrics_port)
    }

    /// Start node `name`'s `trellis-node` (the recorded binary, else `$TRELLIS_NODE`, else
    /// built with cargo) on a fresh metrics port, recorded like every sandbox process, and
    /// wait for its `/healthz`. An error if one runs already.
    pub async fn start_agent(&self, name: &str) -> Result<Agent> {
        let config = self.require_datapath()?;
        let mut node = self.datapath(name)?;
        if let Some(record) = self.agent(name)? {
            let running = ProcessStatus::of(record.clone());
            if running.state == ProcessState::Running {
                return Err(Error::InvalidNode {
                    name: name.to_string(),
                    reason: format!("its agent runs already (pid {})", record.pid),
                });
            }
            process::remove_pid_file(&self.sandbox.pid_path(&record.name))?;
        }
        let binary = match config
            .agent_binary
            .as_deref()
            .and_then(crate::binaries::executable)
        {
            Some(binary) => binary,
            None => agent::resolve(&config.repo_root).await?,
        };
        let dirs = self.node_dirs(name);
        dirs.check_socket_path()
            .map_err(|reason| Error::InvalidNode {
                name: name.to_string(),
                reason,
            })?;
        dirs.create()?;
        let plugin = match config
            .cni_plugin_binary
            .as_deref()
            .and_then(crate::binaries::executable)
        {
            Some(plugin) => plugin,
            None => {
                crate::binaries::CNI_PLUGIN
                    .resolve(&config.repo_root)
                    .await?
            }
        };
        let endpoint = agent::endpoint_args(&dirs, &plugin);
        // Its own credentials: the node ServiceAccount's token, bound to this Node.
        let kubeconfig = access::node_kubeconfig(&self.sandbox, &self.client, name).await?;
        let started = agent::start(
            &self.sandbox,
            &binary,
            &node,
            &kubeconfig,
            &endpoint,
            config.agent_log_filter.as_deref(),
            Duration::from_millis(config.agent_ready_timeout_ms),
        )
        .await?;
        node.agent_metrics_port = Some(started.metrics_port);
        if let Err(e) = datapath::update_record(&self.sandbox, &NetnsRecord::Node(node)) {
            let _ = self.stop_agent(name).await;
            return Err(e);
        }
        Ok(started)
    }

    /// [`Nodes::start_agent`] for each node, all at once.
    pub async fn start_agents(&self, names: &[String]) -> Result<Vec<Agent>> {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, name) in names.iter().enumerate() {
            let (nodes, name) = (self.clone(), name.clone());
            tasks.spawn(async move { (i, nodes.start_agent(&name).await) });
        }
        let mut started = Vec::new();
        let mut errors = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, Ok(agent))) => started.push((i, agent)),
                Ok((_, Err(e))) => errors.push(e),
                Err(e) => errors.push(Error::InvalidNode {
                    name: "?".into(),
                    reason: format!("the task starting its agent failed: {e}"),
                }),
            }
        }
        Error::from_list(errors)?;
        started.sort_by_key(|(i, _)| *i);
        Ok(started.into_iter().map(|(_, agent)| agent).collect())
    }

    /// End node `name`'s agent as `down` does (SIGTERM by its recorded pid, identity-checked,
    /// SIGKILL after the grace period) and remove its pid file. `None` if none was recorded.
    pub async fn stop_agent(&self, name: &str) -> Result<Option<Ended>> {
        let Some(record) = self.agent(name)? else {
            return Ok(None);
        };
        let pid_file = self.sandbox.pid_path(&record.name);
        let ended = blocking(move || {
            let outcome = process::end(&record, None, TERM_GRACE)?;
            // Started with its `Child` dropped: collect it if this program started it.
            if outcome != process::Outcome::PidReused {
                process::reap(record.pid);
            }
            process::remove_pid_file(&pid_file)?;
            Ok(Ended { record, outcome })
        })
        .await?;
        Ok(Some(ended))
    }

    /// Crash node `name`'s agent: SIGKILL by its recorded pid (identity-checked), wait until
    /// it is gone and remove its pid file. Its namespace and everything in it stay.
    pub async fn kill_agent(&self, name: &str) -> Result<Ended> {
        let record = self.agent(name)?.ok_or_else(|| Error::InvalidNode {
            name: name.to_string(),
            reason: "has no agent recorded".into(),
        })?;
        let pid_file = self.sandbox.pid_path(&record.name);
        blocking(move || {
            let outcome = process::sigkill(&record)?;
            if outcome == process::Outcome::Killed {
                process::reap(record.pid);
            }
            process::remove_pid_file(&pid_file)?;
            Ok(Ended { record, outcome })
        })
        .await
    }

    /// `ip -n <node's namespace> -j <args>` as JSON, e.g. `ip_json(node, &["addr", "show",
    /// "dev", "eth0"])`.
    pub async fn ip_json(&self, name: &str, args: &[&str]) -> Result<serde_json::Value> {
        datapath::ip_json(&self.netns(name)?, args).await
    }

    /// `ip -n <underlay namespace> -j <args>` as JSON, e.g. the bridge's ports:
    /// `underlay_ip_json(&["link", "show", "master", "trellis-br0"])`.
    pub async fn underlay_ip_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        datapath::ip_json(&self.underlay_netns()?, args).await
    }

    /// Run `argv` inside node `name`'s namespace (`ip netns exec`; for tests, e.g.
    /// `["ping", "-c", "1", "-W", "2", "192.0.2.12"]`) and return what it did, whatever its exit
    /// status.
    pub async fn exec(&self, name: &str, argv: &[&str]) -> Result<Output> {
        datapath::netns_exec(&self.netns(name)?, argv).await
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
        let namespaces: BTreeMap<String, String> = datapath::recorded_nodes(&self.sandbox)?
            .into_iter()
            .map(|n| (n.node, n.netns))
            .collect();
        let mut views = Vec::new();
        for node in nodes.items {
            let name = node.name_any();
            views.push(NodeView {
                internal_ips: internal_ips(&node),
                labels: node.metadata.labels.unwrap_or_default(),
                pod_cidrs: networks.get(&name).cloned(),
                netns: namespaces.get(&name).cloned(),
                agent: self.agent(&name)?.map(ProcessStatus::of),
                name,
            });
        }
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
