//! The sandbox's pods. There is no kubelet and no container runtime, so [`Pods`] does their
//! part of a pod's life: a Pod object bound to a node, a network namespace for its sandbox,
//! the node's CNI configuration run on it exactly as a runtime runs it
//! ([`crate::cni_runtime`]), and the pod's status written back as a kubelet writes it.
//!
//! ```text
//! PodSpec { namespace, name, node, labels, ports }
//!     │ Pods::add
//!     ├─ wait for <node dir>/net.d/*.conflist and CNI STATUS ok  (the network is ready)
//!     ├─ POST  Namespace (if missing), Pod             spec.nodeName, one placeholder container
//!     ├─ netns trellis-<tag>-pod_<ns>_<name>, lo up    recorded first: netns/<netns>.json
//!     ├─ CNI ADD  container ID: 64 random hex digits, CNI_NETNS /run/netns/<netns>,
//!     │           CNI_IFNAME eth0, CNI_ARGS K8S_POD_*, plugins in the node's netns,
//!     │           CNI_PATH <node dir>/bin:<reference plugins>
//!     ├─ PATCH Pod status                              Running, podIP(s), hostIP(s), Ready
//!     └─ record: node, netns, container ID, uid, IPs
//!
//! Pods::remove: CNI DEL (every plugin, past failures) ─► delete the netns and its record
//!               ─► DELETE the Pod (grace 0)
//! ```
//!
//! ADD answered with "try again later" (code 11) is retried, as a kubelet retries a pod
//! sandbox, until the network-ready timeout. If a step of [`Pods::add`] fails, whatever it
//! made is undone (DEL included). The records
//! are the netns records of [`crate::datapath`], so a crashed run's pod namespaces are deleted
//! by the next `up` or `down` like the nodes'.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::PathBuf,
    process::Output,
    str::FromStr,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerPort as K8sContainerPort, ContainerState, ContainerStateRunning,
        ContainerStatus, HostIP, Node, Pod as K8sPod, PodCondition, PodIP, PodSpec as K8sPodSpec,
        PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde::{Deserialize, Serialize};

use crate::{
    binaries,
    cni_runtime::{self, Attachment, CniError, NetworkConfigList, Runtime, RuntimeConf},
    controlplane::{blocking, ensure_namespace},
    crds::FIELD_MANAGER,
    datapath::{self, DatapathConfig, NetnsRecord},
    error::{Error, Result},
    nodes::{self, Nodes},
    sandbox::Sandbox,
};

/// The namespace of pods that name none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The image of every pod's one container: nothing pulls it, and `.invalid` never resolves.
pub const PLACEHOLDER_IMAGE: &str = "registry.trellis.invalid/pause:1";
/// The name of every pod's one container.
pub const CONTAINER_NAME: &str = "main";
/// How long [`Pods::add`] waits for the node's network (its conflist) by default.
pub const DEFAULT_NETWORK_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The interface every pod gets from its network.
pub const POD_INTERFACE: &str = cni_runtime::DEFAULT_IFNAME;
/// The spec's "try again later" (ADD is retried on it until the network-ready timeout).
const TRY_AGAIN_LATER: u32 = 11;
/// The spec's STATUS codes: the plugin cannot serve ADD (waited out), or can with limited
/// connectivity (good enough).
const PLUGIN_NOT_AVAILABLE: u32 = 50;
const LIMITED_CONNECTIVITY: u32 = 51;
/// Pause between STATUS polls and ADD retries.
const RETRY: Duration = Duration::from_millis(200);

/// A container port: `[name:]port[/protocol]`, e.g. `http:80/TCP` (named ports are what
/// network policies refer to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

impl ContainerPort {
    pub fn new(name: Option<&str>, port: u16, protocol: &str) -> Self {
        ContainerPort {
            name: name.map(str::to_string),
            port,
            protocol: protocol.to_string(),
        }
    }

    fn to_k8s(&self) -> K8sContainerPort {
        K8sContainerPort {
            name: self.name.clone(),
            container_port: i32::from(self.port),
            protocol: Some(self.protocol.clone()),
            ..K8sContainerPort::default()
        }
    }
}

impl FromStr for ContainerPort {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, rest) = match s.split_once(':') {
            Some((name, rest)) => (Some(name), rest),
            None => (None, s),
        };
        let (port, protocol) = rest.split_once('/').unwrap_or((rest, "TCP"));
        let protocol = protocol.to_ascii_uppercase();
        if !matches!(protocol.as_str(), "TCP" | "UDP" | "SCTP") {
            return Err(format!(
                "{s:?}: protocol {protocol:?} is not TCP, UDP or SCTP"
            ));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: port {port:?} is not 1-65535"))?;
        if let Some(name) = name {
            let valid = !name.is_empty()
                && name.len() <= 15
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && name.bytes().any(|b| b.is_ascii_lowercase())
                && !name.starts_with('-')
                && !name.ends_with('-');
            if !valid {
                return Err(format!(
                    "{s:?}: port name {name:?} is not an IANA service name (1-15 lowercase \
                     letters, digits and '-', with a letter)"
                ));
            }
        }
        Ok(ContainerPort::new(name, port, &protocol))
    }
}

/// A pod to add to the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName`: the sandbox node whose network plugs it in.
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// Ports of its one container.
    pub ports: Vec<ContainerPort>,
}

impl PodSpec {
    /// Pod `name` in namespace `default` on node `node`, without labels or ports.
    pub fn new(name: impl Into<String>, node: impl Into<String>) -> Self {
        PodSpec {
            namespace: DEFAULT_NAMESPACE.to_string(),
            name: name.into(),
            node: node.into(),
            labels: BTreeMap::new(),
            ports: Vec::new(),
        }
    }

    pub fn in_namespace(self, namespace: impl Into<String>) -> Self {
        PodSpec {
            namespace: namespace.into(),
            ..self
        }
    }

    /// Adds (or replaces) a label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn with_port(mut self, port: ContainerPort) -> Self {
        self.ports.push(port);
        self
    }

    /// The object to create: bound to its node, one placeholder container, no grace period
    /// (there is no kubelet to confirm a graceful deletion).
    pub fn pod(&self) -> K8sPod {
        K8sPod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: (!self.labels.is_empty()).then(|| self.labels.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(K8sPodSpec {
                node_name: Some(self.node.clone()),
                termination_grace_period_seconds: Some(0),
                containers: vec![Container {
                    name: CONTAINER_NAME.into(),
                    image: Some(PLACEHOLDER_IMAGE.into()),
                    ports: (!self.ports.is_empty())
                        .then(|| self.ports.iter().map(ContainerPort::to_k8s).collect()),
                    ..Container::default()
                }],
                ..K8sPodSpec::default()
            }),
            status: None,
        }
    }

    pub fn key(&self) -> PodName {
        PodName::new(&self.namespace, &self.name)
    }
}

/// Which pod: namespace and name. From `"name"` (namespace `default`), `"namespace/name"`, a
/// `(namespace, name)` pair or a [`Pod`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

impl PodName {
    pub fn new(namespace: &str, name: &str) -> Self {
        PodName {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl From<&str> for PodName {
    fn from(s: &str) -> Self {
        match s.split_once('/') {
            Some((namespace, name)) => PodName::new(namespace, name),
            None => PodName::new(DEFAULT_NAMESPACE, s),
        }
    }
}

impl From<(&str, &str)> for PodName {
    fn from((namespace, name): (&str, &str)) -> Self {
        PodName::new(namespace, name)
    }
}

impl From<&Pod> for PodName {
    fn from(pod: &Pod) -> Self {
        pod.key()
    }
}

impl From<&PodName> for PodName {
    fn from(name: &PodName) -> Self {
        name.clone()
    }
}

/// A pod the sandbox made, as recorded in `<state>/netns/<netns>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    /// Its network namespace (`trellis-<tag>-pod_<namespace>_<name>`).
    pub netns: String,
    /// `CNI_CONTAINERID`: 64 hex digits.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The Pod object's `metadata.uid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The network (conflist `name`) that plugged it in; `None` until ADD succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Its addresses from the CNI result, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
}

impl Pod {
    pub fn key(&self) -> PodName {
        PodName::new(&self.namespace, &self.name)
    }

    /// Its first address.
    pub fn ip(&self) -> Option<IpAddr> {
        self.ips.first().copied()
    }

    /// `/run/netns/<netns>`: `CNI_NETNS`.
    pub fn netns_path(&self) -> PathBuf {
        datapath::netns_path(&self.netns)
    }

    /// What the runtime passes for it.
    pub fn runtime_conf(&self) -> RuntimeConf {
        RuntimeConf::for_pod(
            &self.container_id,
            &self.netns_path(),
            &self.namespace,
            &self.name,
            self.uid.as_deref(),
        )
    }

    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

/// The recorded pod `pod`, if any.
pub fn recorded(sandbox: &Sandbox, pod: &PodName) -> Result<Option<Pod>> {
    Ok(datapath::recorded_pods(sandbox)?
        .into_iter()
        .find(|p| p.namespace == pod.namespace && p.name == pod.name))
}

/// The runtime of node `node`: plugins looked up in its CNI bin dir, then in the reference
/// plugins' dir, run in its network namespace, results cached in its `cni-cache/`. The
/// reference plugins are built on first use (and recorded in `datapath.json`) unless
/// `build` is false, when a runtime without them is returned.
pub async fn node_runtime(sandbox: &Sandbox, node: &str, build: bool) -> Result<Runtime> {
    let mut config = DatapathConfig::read(sandbox)?.ok_or_else(|| no_datapath(sandbox))?;
    let record = node_record(sandbox, &config, node)?;
    let dirs = sandbox.node_dirs(node);
    let plugins = match config.cni_plugins_dir.clone() {
        Some(dir) => Some(dir),
        None if build => {
            let dir = binaries::cni_plugins_dir(&config.repo_root).await?;
            config.cni_plugins_dir = Some(dir.clone());
            config.write(sandbox)?;
            Some(dir)
        }
        None => None,
    };
    let mut cni_path = vec![dirs.bin];
    cni_path.extend(plugins);
    Ok(Runtime::new(
        cni_path,
        Some(record.netns_path()),
        dirs.cni_cache,
    ))
}

fn no_datapath(sandbox: &Sandbox) -> Error {
    Error::Datapath {
        path: sandbox.dir().to_path_buf(),
        reason: "pods need the datapath (the sandbox was started without it: --no-datapath, \
                 StartOptions::datapath = false)"
            .into(),
    }
}

fn node_record(
    sandbox: &Sandbox,
    config: &DatapathConfig,
    node: &str,
) -> Result<datapath::NodeDatapath> {
    let missing = || Error::InvalidNode {
        name: node.to_string(),
        reason: format!(
            "has no network namespace in the sandbox in {}",
            sandbox.dir().display()
        ),
    };
    let netns = datapath::node_netns_name(&config.tag, node).map_err(|_| missing())?;
    match datapath::read_record(sandbox, &netns)? {
        Some(NetnsRecord::Node(record)) if record.node == node => Ok(record),
        _ => Err(missing()),
    }
}

/// The configuration list to DEL `pod` with: the node's current one, else the one its ADD
/// was cached with.
fn network_for_del(sandbox: &Sandbox, runtime: &Runtime, pod: &Pod) -> Result<NetworkConfigList> {
    let conf_dir = sandbox.node_dirs(&pod.node).conf;
    match NetworkConfigList::load_dir(&conf_dir) {
        Ok(list) => Ok(list),
        Err(current) => {
            let cached = pod
                .network
                .as_deref()
                .map(|network| runtime.cached(network, &pod.container_id, &pod.ifname))
                .transpose()
                .ok()
                .flatten()
                .flatten();
            match cached {
                Some(entry) => NetworkConfigList::parse(
                    &runtime.cache_dir.join("results"),
                    entry.config.to_string().as_bytes(),
                )
                .map_err(|source| cni_error(&pod.key(), "read the cached network", source)),
                None => Err(cni_error(&pod.key(), "find its network", current)),
            }
        }
    }
}

fn cni_error(pod: &PodName, action: &str, source: CniError) -> Error {
    Error::Cni {
        context: format!("pod {pod}: {action}"),
        source: Box::new(source),
    }
}

/// Best effort, for `trellis-sandbox down`: CNI DEL for every recorded pod (while the node
/// agents still run), without building anything or asking the apiserver. Returns one line per
/// pod that could not be deleted; the namespaces are deleted afterwards with the others.
pub async fn release_recorded(sandbox: &Sandbox) -> Result<Vec<String>> {
    let mut failed = Vec::new();
    for pod in datapath::recorded_pods(sandbox)? {
        let del = async {
            let runtime = node_runtime(sandbox, &pod.node, false).await?;
            let list = network_for_del(sandbox, &runtime, &pod)?;
            runtime
                .del_keep_going(&list, &pod.runtime_conf())
                .await
                .map_err(|source| cni_error(&pod.key(), "CNI DEL", source))
        };
        if let Err(e) = del.await {
            failed.push(format!("{}: {e}", pod.key()));
        }
    }
    Ok(failed)
}

/// Forget every pod on node `node` (for [`Nodes::remove`]): delete their namespaces and
/// records and, with a client, their Pod objects (what the pod garbage collector does for a
/// deleted node). No CNI DEL: the node's network goes with the node.
pub(crate) async fn forget_node(
    sandbox: &Sandbox,
    client: Option<&kube::Client>,
    node: &str,
) -> Result<()> {
    let mut errors = Vec::new();
    for pod in datapath::recorded_pods(sandbox)?
        .into_iter()
        .filter(|p| p.node == node)
    {
        let (s, netns) = (sandbox.clone(), pod.netns.clone());
        if let Err(e) = blocking(move || datapath::delete_pod_netns(&s, &netns)).await {
            errors.push(e);
        }
        if let Some(client) = client
            && let Err(e) = delete_pod_object(client, &pod.key()).await
        {
            errors.push(e);
        }
    }
    Error::from_list(errors)
}

async fn delete_pod_object(client: &kube::Client, pod: &PodName) -> Result<bool> {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    match Api::<K8sPod>::namespaced(client.clone(), &pod.namespace)
        .delete(&pod.name, &params)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(e) => Err(Error::kube(format!("delete Pod {pod}"), e)),
    }
}

/// Adds, removes, lists and runs commands in the sandbox's pods.
#[derive(Clone)]
pub struct Pods {
    sandbox: Sandbox,
    client: kube::Client,
    network_ready_timeout: Duration,
}

impl Pods {
    pub fn new(sandbox: Sandbox, client: kube::Client) -> Self {
        Pods {
            sandbox,
            client,
            network_ready_timeout: DEFAULT_NETWORK_READY_TIMEOUT,
        }
    }

    /// For a sandbox started earlier (by another process): a client from its kubeconfig.
    pub async fn connect(sandbox: &Sandbox) -> Result<Self> {
        let nodes = Nodes::connect(sandbox).await?;
        Ok(Pods::new(sandbox.clone(), nodes.client()))
    }

    /// How long [`Pods::add`] waits for the node's network to be ready.
    pub fn with_network_ready_timeout(self, timeout: Duration) -> Self {
        Pods {
            network_ready_timeout: timeout,
            ..self
        }
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    fn nodes(&self) -> Nodes {
        Nodes::new(self.sandbox.clone(), self.client.clone())
    }

    fn config(&self) -> Result<DatapathConfig> {
        DatapathConfig::read(&self.sandbox)?.ok_or_else(|| no_datapath(&self.sandbox))
    }

    /// Node `node`'s runtime (see [`node_runtime`]); builds the reference plugins if needed.
    pub async fn runtime(&self, node: &str) -> Result<Runtime> {
        node_runtime(&self.sandbox, node, true).await
    }

    /// Node `node`'s network: its conflist, once it has one (waiting up to the network-ready
    /// timeout, as a kubelet waits before it starts pods).
    pub async fn network(&self, node: &str) -> Result<NetworkConfigList> {
        let path = self
            .nodes()
            .wait_network_ready(node, self.network_ready_timeout)
            .await?;
        NetworkConfigList::load(&path).map_err(|source| Error::Cni {
            context: format!("node {node}: load its network configuration"),
            source: Box::new(source),
        })
    }

    /// Add a pod (see the module doc): its Pod, its namespace plugged in by the node's
    /// network, its status. All or nothing.
    pub async fn add(&self, spec: &PodSpec) -> Result<Pod> {
        let key = spec.key();
        let config = self.config()?;
        node_record(&self.sandbox, &config, &spec.node)?;
        if recorded(&self.sandbox, &key)?.is_some() {
            return Err(Error::InvalidPod {
                pod: key.to_string(),
                reason: "the sandbox has it already".into(),
            });
        }
        let deadline = Instant::now() + self.network_ready_timeout;
        let list = self.network(&spec.node).await?;
        let runtime = self.runtime(&spec.node).await?;
        self.wait_status(&spec.node, &runtime, &list, deadline)
            .await?;

        ensure_namespace(&self.client, &spec.namespace).await?;
        let api = Api::<K8sPod>::namespaced(self.client.clone(), &spec.namespace);
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let created = api
            .create(&params, &spec.pod())
            .await
            .map_err(|e| Error::kube(format!("create Pod {key}"), e))?;

        let container_id =
            cni_runtime::random_container_id().map_err(|e| Error::io("read", "/dev/urandom", e))?;
        let mut pod = Pod {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            node: spec.node.clone(),
            netns: datapath::pod_netns_name(&config.tag, &spec.namespace, &spec.name),
            container_id,
            ifname: POD_INTERFACE.into(),
            uid: created.metadata.uid.clone(),
            network: None,
            ips: Vec::new(),
        };
        let (s, record) = (self.sandbox.clone(), pod.clone());
        if let Err(e) = blocking(move || datapath::create_pod_netns(&s, &record)).await {
            let _ = delete_pod_object(&self.client, &key).await;
            return Err(e);
        }

        let plugged = async {
            let result = loop {
                match runtime.add(&list, &pod.runtime_conf()).await {
                    Ok(result) => break result,
                    // A kubelet retries a sandbox whose network said "try again later".
                    Err(e) if e.code() == Some(TRY_AGAIN_LATER) && Instant::now() < deadline => {
                        tracing::info!(pod = %key, error = %e, "CNI ADD: try again later");
                        let _ = runtime.del_keep_going(&list, &pod.runtime_conf()).await;
                        tokio::time::sleep(RETRY).await;
                    }
                    Err(source) => return Err(cni_error(&key, "CNI ADD", source)),
                }
            };
            let ips = result.pod_ips();
            if ips.is_empty() {
                return Err(Error::InvalidPod {
                    pod: key.to_string(),
                    reason: format!("network {} gave it no address: {}", list.name, result.raw),
                });
            }
            pod.ips = ips;
            pod.network = Some(list.name.clone());
            let s = self.sandbox.clone();
            let record = pod.clone();
            blocking(move || datapath::update_pod_record(&s, &record)).await?;
            self.write_status(&pod).await
        };
        if let Err(e) = plugged.await {
            self.undo_add(&runtime, &list, &pod).await;
            return Err(e);
        }
        Ok(pod)
    }

    /// Wait (up to `deadline`) until CNI STATUS of the node's network says it can serve ADD,
    /// as a container runtime reports the network ready only then: codes 50 (not available)
    /// and 51 (not available, limited connectivity: the node's overlay did not converge yet)
    /// are waited out.
    async fn wait_status(
        &self,
        node: &str,
        runtime: &Runtime,
        list: &NetworkConfigList,
        deadline: Instant,
    ) -> Result<()> {
        loop {
            match runtime.status(list).await {
                Ok(()) => return Ok(()),
                Err(e)
                    if matches!(e.code(), Some(PLUGIN_NOT_AVAILABLE | LIMITED_CONNECTIVITY))
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(RETRY).await;
                }
                Err(source) => {
                    return Err(Error::Cni {
                        context: format!("node {node}: network not ready (CNI STATUS)"),
                        source: Box::new(source),
                    });
                }
            }
        }
    }

    /// Best effort after a failed [`Pods::add`]: DEL, namespace, record, Pod object.
    async fn undo_add(&self, runtime: &Runtime, list: &NetworkConfigList, pod: &Pod) {
        if let Err(e) = runtime.del_keep_going(list, &pod.runtime_conf()).await {
            tracing::warn!(pod = %pod.key(), error = %e, "CNI DEL of a pod that could not be added");
        }
        let (s, netns) = (self.sandbox.clone(), pod.netns.clone());
        if let Err(e) = blocking(move || datapath::delete_pod_netns(&s, &netns)).await {
            tracing::warn!(pod = %pod.key(), error = %e, "deleting the namespace of a pod that could not be added");
        }
        if let Err(e) = delete_pod_object(&self.client, &pod.key()).await {
            tracing::warn!(pod = %pod.key(), error = %e, "deleting a Pod that could not be added");
        }
    }

    /// Write the status a kubelet writes once the pod's sandbox is up: `Running`, its
    /// addresses, its node's addresses, every condition `True`, its container running.
    async fn write_status(&self, pod: &Pod) -> Result<()> {
        let host_ips = match Api::<Node>::all(self.client.clone())
            .get_opt(&pod.node)
            .await
        {
            Ok(Some(node)) => nodes::internal_ips(&node),
            Ok(None) => Vec::new(),
            Err(e) => return Err(Error::kube(format!("get Node {}", pod.node), e)),
        };
        let patch = status_patch(pod, &host_ips);
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        Api::<K8sPod>::namespaced(self.client.clone(), &pod.namespace)
            .patch_status(&pod.name, &params, &Patch::Merge(patch))
            .await
            .map_err(|e| Error::kube(format!("write the status of Pod {}", pod.key()), e))?;
        Ok(())
    }

    /// Remove a pod: CNI DEL, its namespace and record, its Pod object. `Ok(false)` if the
    /// sandbox had no such pod and there was no such Pod. Keeps going past failures and
    /// reports all of them.
    pub async fn remove(&self, pod: impl Into<PodName>) -> Result<bool> {
        let key = pod.into();
        let mut existed = false;
        let mut errors = Vec::new();
        if let Some(pod) = recorded(&self.sandbox, &key)? {
            existed = true;
            let del = async {
                let runtime = self.runtime(&pod.node).await?;
                let list = network_for_del(&self.sandbox, &runtime, &pod)?;
                runtime
                    .del_keep_going(&list, &pod.runtime_conf())
                    .await
                    .map_err(|source| cni_error(&key, "CNI DEL", source))
            };
            if let Err(e) = del.await {
                errors.push(e);
            }
            let (s, netns) = (self.sandbox.clone(), pod.netns.clone());
            if let Err(e) = blocking(move || datapath::delete_pod_netns(&s, &netns)).await {
                errors.push(e);
            }
        }
        match delete_pod_object(&self.client, &key).await {
            Ok(deleted) => existed |= deleted,
            Err(e) => errors.push(e),
        }
        Error::from_list(errors).map(|()| existed)
    }

    /// The recorded pod `pod`.
    pub fn get(&self, pod: impl Into<PodName>) -> Result<Pod> {
        let key = pod.into();
        recorded(&self.sandbox, &key)?.ok_or_else(|| Error::InvalidPod {
            pod: key.to_string(),
            reason: format!(
                "the sandbox in {} has no such pod",
                self.sandbox.dir().display()
            ),
        })
    }

    /// Pod `pod`'s first address.
    pub fn ip(&self, pod: impl Into<PodName>) -> Result<IpAddr> {
        let pod = self.get(pod)?;
        pod.ip().ok_or_else(|| Error::InvalidPod {
            pod: pod.key().to_string(),
            reason: "has no address".into(),
        })
    }

    /// Every recorded pod, by namespace and name.
    pub fn list(&self) -> Result<Vec<Pod>> {
        datapath::recorded_pods(&self.sandbox)
    }

    /// Run `argv` inside pod `pod`'s namespace (`ip netns exec`) and return what it did,
    /// whatever its exit status.
    pub async fn exec(&self, pod: impl Into<PodName>, argv: &[&str]) -> Result<Output> {
        datapath::netns_exec(&self.get(pod)?.netns, argv).await
    }

    /// CNI CHECK of pod `pod` against its node's current network.
    pub async fn check(&self, pod: impl Into<PodName>) -> Result<()> {
        let pod = self.get(pod)?;
        let list = self.network(&pod.node).await?;
        self.runtime(&pod.node)
            .await?
            .check(&list, &pod.runtime_conf())
            .await
            .map_err(|source| cni_error(&pod.key(), "CNI CHECK", source))
    }

    /// CNI STATUS of node `node`'s network.
    pub async fn status(&self, node: &str) -> Result<()> {
        let list = self.network(node).await?;
        self.runtime(node)
            .await?
            .status(&list)
            .await
            .map_err(|source| Error::Cni {
                context: format!("node {node}: CNI STATUS"),
                source: Box::new(source),
            })
    }

    /// CNI GC of node `node`'s network, keeping the attachments of the pods the sandbox
    /// records on it.
    pub async fn gc(&self, node: &str) -> Result<()> {
        let valid: Vec<Attachment> = self
            .list()?
            .iter()
            .filter(|p| p.node == node)
            .map(Pod::attachment)
            .collect();
        self.gc_keeping(node, &valid).await
    }

    /// CNI GC of node `node`'s network keeping exactly `valid`.
    pub async fn gc_keeping(&self, node: &str, valid: &[Attachment]) -> Result<()> {
        let list = self.network(node).await?;
        self.runtime(node)
            .await?
            .gc(&list, valid)
            .await
            .map_err(|source| Error::Cni {
                context: format!("node {node}: CNI GC"),
                source: Box::new(source),
            })
    }
}

/// The merge patch for a Pod's status subresource, as a kubelet writes it once its sandbox
/// and container run.
pub fn status_patch(pod: &Pod, host_ips: &[String]) -> serde_json::Value {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let condition = |type_: &str| PodCondition {
        type_: type_.into(),
        status: "True".into(),
        last_transition_time: Some(now.clone()),
        ..PodCondition::default()
    };
    let status = PodStatus {
        phase: Some("Running".into()),
        host_ip: host_ips.first().cloned(),
        host_ips: Some(
            host_ips
                .iter()
                .map(|ip| HostIP { ip: ip.clone() })
                .collect(),
        ),
        pod_ip: pod.ip().map(|ip| ip.to_string()),
        pod_ips: Some(
            pod.ips
                .iter()
                .map(|ip| PodIP { ip: ip.to_string() })
                .collect(),
        ),
        start_time: Some(now.clone()),
        conditions: Some(
            [
                "PodReadyToStartContainers",
                "Initialized",
                "Ready",
                "ContainersReady",
                "PodScheduled",
            ]
            .map(condition)
            .to_vec(),
        ),
        container_statuses: Some(vec![ContainerStatus {
            name: CONTAINER_NAME.into(),
            image: PLACEHOLDER_IMAGE.into(),
            image_id: String::new(),
            container_id: Some(format!("trellis://{}", pod.container_id)),
            ready: true,
            started: Some(true),
            restart_count: 0,
            state: Some(ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(now),
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]),
        ..PodStatus::default()
    };
    serde_json::json!({ "status": status })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse() {
        assert_eq!(
            "http:80/TCP".parse::<ContainerPort>(),
            Ok(ContainerPort::new(Some("http"), 80, "TCP"))
        );
        assert_eq!(
            "53/udp".parse::<ContainerPort>(),
            Ok(ContainerPort::new(None, 53, "UDP"))
        );
        assert_eq!(
            "8080".parse::<ContainerPort>(),
            Ok(ContainerPort::new(None, 8080, "TCP"))
        );
        for bad in [
            "0",
            "http:",
            "x:70000",
            "http:80/ICMP",
            "Http:80",
            "-a:1",
            "12:80",
        ] {
            assert!(bad.parse::<ContainerPort>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pod_names() {
        assert_eq!(PodName::from("a"), PodName::new("default", "a"));
        assert_eq!(PodName::from("team/a"), PodName::new("team", "a"));
        assert_eq!(PodName::from(("team", "a")).to_string(), "team/a");
    }

    #[test]
    fn the_pod_object_is_bound_and_has_its_ports() {
        let spec = PodSpec::new("a", "trellis-node-1")
            .in_namespace("team")
            .with_label("app", "web")
            .with_port("http:80/TCP".parse().unwrap());
        let pod = spec.pod();
        let pod_spec = pod.spec.unwrap();
        assert_eq!(pod_spec.node_name.as_deref(), Some("trellis-node-1"));
        assert_eq!(pod_spec.termination_grace_period_seconds, Some(0));
        let ports = pod_spec.containers[0].ports.clone().unwrap();
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(ports[0].container_port, 80);
        assert_eq!(pod.metadata.namespace.as_deref(), Some("team"));
        assert_eq!(
            pod.metadata.labels.unwrap().get("app").map(String::as_str),
            Some("web")
        );
    }

    #[test]
    fn status_is_what_a_kubelet_writes() {
        let pod = Pod {
            namespace: "default".into(),
            name: "a".into(),
            node: "trellis-node-1".into(),
            netns: "trellis-abc123-pod_default_a".into(),
            container_id: "ab".repeat(32),
            ifname: "eth0".into(),
            uid: Some("u".into()),
            network: Some("trellis".into()),
            ips: vec![
                "10.244.1.5".parse().unwrap(),
                "fd00:10:244:1::5".parse().unwrap(),
            ],
        };
        let patch = status_patch(&pod, &["192.0.2.11".into()]);
        let status = &patch["status"];
        assert_eq!(status["phase"], "Running");
        assert_eq!(status["podIP"], "10.244.1.5");
        assert_eq!(status["podIPs"][1]["ip"], "fd00:10:244:1::5");
        assert_eq!(status["hostIP"], "192.0.2.11");
        assert_eq!(status["hostIPs"][0]["ip"], "192.0.2.11");
        let ready = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "True");
        assert_eq!(status["containerStatuses"][0]["ready"], true);
        assert!(status["startTime"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn pod_records_round_trip_as_netns_records() {
        let pod = Pod {
            namespace: "default".into(),
            name: "a".into(),
            node: "n".into(),
            netns: "trellis-abc123-pod_default_a".into(),
            container_id: "c".into(),
            ifname: "eth0".into(),
            uid: None,
            network: None,
            ips: Vec::new(),
        };
        let record = NetnsRecord::Pod(pod.clone());
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["role"], "pod");
        assert_eq!(serde_json::from_value::<NetnsRecord>(json).unwrap(), record);
        assert_eq!(record.netns(), pod.netns);
    }
}
