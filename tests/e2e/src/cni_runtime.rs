//! The container runtime's half of CNI, as libcni does it for containerd and CRI-O: load the
//! node's network configuration list, run its plugins with the spec's environment and stdin,
//! chain their results, cache the final one, and hand it back on DEL and CHECK.
//!
//! ```text
//!  <conf dir>/*.conflist (lowest sorted) ─► NetworkConfigList { name, cniVersion, plugins }
//!                                                   │
//!  Runtime::add ── for each plugin, in order ───────┤
//!     stdin: the plugin's config + name + cniVersion (+ prevResult from the 2nd on)
//!            (+ runtimeConfig: the capability args the plugin declares)
//!     env:   CNI_COMMAND CNI_CONTAINERID CNI_NETNS CNI_IFNAME CNI_ARGS CNI_PATH
//!     exec:  nsenter --net=<node netns> -- <CNI_PATH lookup of "type">     (timeout)
//!     stdout: the result ─► next plugin's prevResult ─► cache: <cache>/results/<net>-<id>-<if>
//!  Runtime::del   ── in reverse order, prevResult = the cached result, then uncache
//!  Runtime::check ── in order, prevResult = the cached result
//!  Runtime::status ─ each plugin, no container (1.1.0)
//!  Runtime::gc ──── DEL every cached attachment not in the valid list, then GC each plugin
//!                   with "cni.dev/valid-attachments" (1.1.0)
//! ```
//!
//! Plugins run with the node's network namespace as their host namespace (`nsenter --net`;
//! the workspace forbids the `unsafe` a `pre_exec` setns would need), so what a plugin does
//! to "the host" (portmap's netfilter rules, a bridge, a veth's host end) lands in the node,
//! never in the root namespace. A plugin that fails prints the spec's error JSON on stdout;
//! it comes back as [`CniError::Plugin`] ([`PluginFailure`]: its code, message, details, the
//! plugin and its exit status).

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt as _;

/// How long one plugin execution may take unless the [`Runtime`] says otherwise.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// The key under which GC hands the plugins the attachments to keep.
pub const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";
/// The key the 1.1.0 spec text used by mistake; libcni sends both.
const VALID_ATTACHMENTS_LEGACY: &str = "cni.dev/attachments";
/// `kind` of a results cache entry (libcni's).
pub const CACHE_KIND: &str = "cniCacheV1";
/// The interface name runtimes give a pod's first network.
pub const DEFAULT_IFNAME: &str = "eth0";

/// A CNI operation, as `CNI_COMMAND` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong running a network configuration.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The conf dir has no `*.conflist` (the node's network is not ready).
    #[error("no *.conflist in {}", dir.display())]
    NoConfList { dir: PathBuf },

    /// A configuration list cannot be read or is not a valid one.
    #[error("network configuration {}: {reason}", path.display())]
    InvalidConfList { path: PathBuf, reason: String },

    /// A container ID, interface name, network name or argument the spec does not allow.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidArgument {
        what: &'static str,
        value: String,
        reason: String,
    },

    /// No executable named after the plugin's `type` in any `CNI_PATH` directory.
    #[error("CNI plugin {plugin:?} not found in CNI_PATH {}", join_paths(path))]
    PluginNotFound { plugin: String, path: Vec<PathBuf> },

    /// The plugin could not be started at all.
    #[error("cannot run CNI plugin {plugin} ({command}) as {}: {source}", program.display())]
    Spawn {
        plugin: String,
        command: Command,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The plugin ran past the runtime's limit and was killed.
    #[error("CNI plugin {plugin} ({command}) did not finish within {timeout:?}; killed")]
    Timeout {
        plugin: String,
        command: Command,
        timeout: Duration,
    },

    /// The plugin failed and said why in the spec's error JSON.
    #[error("{0}")]
    Plugin(Box<PluginFailure>),

    /// The plugin failed without error JSON, or succeeded with output that is no result.
    #[error(
        "CNI plugin {plugin} ({command}) exited with {status}: {reason}{}{}",
        if stdout.trim().is_empty() { String::new() } else { format!("; stdout: {}", stdout.trim()) },
        if stderr.trim().is_empty() { String::new() } else { format!("; stderr: {}", stderr.trim()) }
    )]
    BadOutput {
        plugin: String,
        command: Command,
        status: ExitStatus,
        reason: String,
        stdout: String,
        stderr: String,
    },

    /// CHECK needs the result ADD cached, and there is none.
    #[error(
        "no cached result for network {network}, container {container_id}, interface {ifname} (was it added?)"
    )]
    NoCachedResult {
        network: String,
        container_id: String,
        ifname: String,
    },

    /// The results cache could not be read or written.
    #[error("results cache {}: {reason}", path.display())]
    Cache { path: PathBuf, reason: String },

    /// Several independent steps failed (GC keeps going and reports all of them).
    #[error("{} errors:{}", .0.len(), .0.iter().map(|e| format!("\n  - {e}")).collect::<String>())]
    Many(Vec<CniError>),
}

impl CniError {
    /// The spec's error code if a plugin reported one.
    pub fn code(&self) -> Option<u32> {
        self.plugin_failure().map(|f| f.code)
    }

    /// What the plugin said, if it failed with the spec's error JSON.
    pub fn plugin_failure(&self) -> Option<&PluginFailure> {
        match self {
            CniError::Plugin(failure) => Some(failure),
            _ => None,
        }
    }
}

/// A plugin's failure in the spec's terms: its error JSON, which plugin, how it exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginFailure {
    /// The plugin's `type`.
    pub plugin: String,
    pub command: Command,
    /// The spec's error code (see `trellis_cni::proto::code`).
    pub code: u32,
    pub msg: String,
    pub details: String,
    pub status: ExitStatus,
    pub stderr: String,
}

impl fmt::Display for PluginFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CNI plugin {} ({}) failed with {}: code {}: {}",
            self.plugin, self.command, self.status, self.code, self.msg
        )?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        if !self.stderr.trim().is_empty() {
            write!(f, "; stderr: {}", self.stderr.trim())?;
        }
        Ok(())
    }
}

fn join_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// One plugin of a configuration list: its `type`, its declared capabilities, and the whole
/// object as written.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub plugin_type: String,
    /// `capabilities`: the runtime-config keys the plugin takes.
    pub capabilities: BTreeMap<String, bool>,
    pub raw: Map<String, Value>,
}

/// A network configuration list (`*.conflist`).
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfigList {
    /// Where it was read from (for messages).
    pub path: PathBuf,
    pub name: String,
    pub cni_version: String,
    pub disable_check: bool,
    pub disable_gc: bool,
    pub plugins: Vec<PluginConfig>,
    /// The whole list as written.
    pub raw: Value,
}

impl NetworkConfigList {
    /// The list in `dir` a runtime uses: the lowest-sorted `*.conflist` (by file name).
    pub fn load_dir(dir: &Path) -> Result<Self, CniError> {
        let path = first_conflist(dir)?.ok_or_else(|| CniError::NoConfList {
            dir: dir.to_path_buf(),
        })?;
        Self::load(&path)
    }

    /// The list in file `path`.
    pub fn load(path: &Path) -> Result<Self, CniError> {
        let text = std::fs::read(path).map_err(|e| CniError::InvalidConfList {
            path: path.to_path_buf(),
            reason: format!("cannot read it: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parse the list's bytes (`path` is for messages).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, CniError> {
        let invalid = |reason: String| CniError::InvalidConfList {
            path: path.to_path_buf(),
            reason,
        };
        let raw: Value =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
        let obj = raw
            .as_object()
            .ok_or_else(|| invalid("not a JSON object".into()))?;
        let string = |key: &str| obj.get(key).and_then(Value::as_str).map(str::to_string);
        let name = string("name").ok_or_else(|| invalid("no \"name\"".into()))?;
        validate_network_name(&name).map_err(|e| invalid(e.to_string()))?;
        let cni_version =
            string("cniVersion").ok_or_else(|| invalid("no \"cniVersion\"".into()))?;
        parse_version(&cni_version)
            .ok_or_else(|| invalid(format!("cniVersion {cni_version:?} is not x.y.z")))?;
        let flag = |key: &str| obj.get(key).and_then(Value::as_bool).unwrap_or(false);
        let plugins = obj
            .get("plugins")
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| invalid("no \"plugins\" (a non-empty list)".into()))?
            .iter()
            .enumerate()
            .map(|(i, plugin)| {
                let raw = plugin
                    .as_object()
                    .ok_or_else(|| invalid(format!("plugin {i} is not an object")))?
                    .clone();
                let plugin_type = raw
                    .get("type")
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty() && !t.contains('/'))
                    .ok_or_else(|| invalid(format!("plugin {i} has no valid \"type\"")))?
                    .to_string();
                let capabilities = match raw.get("capabilities") {
                    None => BTreeMap::new(),
                    Some(caps) => serde_json::from_value(caps.clone()).map_err(|e| {
                        invalid(format!("plugin {i} ({plugin_type}): capabilities: {e}"))
                    })?,
                };
                Ok(PluginConfig {
                    plugin_type,
                    capabilities,
                    raw,
                })
            })
            .collect::<Result<Vec<_>, CniError>>()?;
        Ok(NetworkConfigList {
            path: path.to_path_buf(),
            disable_check: flag("disableCheck"),
            disable_gc: flag("disableGC"),
            name,
            cni_version,
            plugins,
            raw,
        })
    }

    /// Whether the list's version is at least `version` (`x.y.z`).
    pub fn version_at_least(&self, version: &str) -> bool {
        matches!(
            (parse_version(&self.cni_version), parse_version(version)),
            (Some(have), Some(want)) if have >= want
        )
    }
}

/// The lowest-sorted `*.conflist` in `dir`; `None` if there is none (or no `dir`).
pub fn first_conflist(dir: &Path) -> Result<Option<PathBuf>, CniError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(CniError::InvalidConfList {
                path: dir.to_path_buf(),
                reason: format!("cannot list it: {e}"),
            });
        }
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "conflist") && p.is_file())
        .collect();
    found.sort();
    Ok(found.into_iter().next())
}

/// `x.y.z` as numbers.
fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    let version = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(version)
}

/// One attachment of a container to a network: what GC keeps.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// What the runtime knows about the container it plugs in (libcni's `RuntimeConf`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConf {
    pub container_id: String,
    /// `CNI_NETNS`: the path of the container's network namespace (DEL may go without).
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS`, in order.
    pub args: Vec<(String, String)>,
    /// Capability arguments (e.g. `portMappings`); each plugin gets the ones it declares in
    /// `runtimeConfig`.
    pub capability_args: Map<String, Value>,
}

impl RuntimeConf {
    /// What a Kubernetes runtime passes for a pod's sandbox: `CNI_ARGS` =
    /// `IgnoreUnknown=1;K8S_POD_NAMESPACE=…;K8S_POD_NAME=…;K8S_POD_INFRA_CONTAINER_ID=…;K8S_POD_UID=…`
    /// (the UID only if known), interface [`DEFAULT_IFNAME`].
    pub fn for_pod(
        container_id: &str,
        netns: &Path,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
    ) -> Self {
        let mut args = vec![
            ("IgnoreUnknown".to_string(), "1".to_string()),
            ("K8S_POD_NAMESPACE".into(), namespace.into()),
            ("K8S_POD_NAME".into(), name.into()),
            ("K8S_POD_INFRA_CONTAINER_ID".into(), container_id.into()),
        ];
        if let Some(uid) = uid {
            args.push(("K8S_POD_UID".into(), uid.into()));
        }
        RuntimeConf {
            container_id: container_id.to_string(),
            netns: Some(netns.to_path_buf()),
            ifname: DEFAULT_IFNAME.to_string(),
            args,
            capability_args: Map::new(),
        }
    }

    /// `CNI_ARGS`: `K=V` pairs joined by `;`.
    pub fn cni_args(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }

    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }

    fn validate(&self) -> Result<(), CniError> {
        validate_container_id(&self.container_id)?;
        validate_ifname(&self.ifname)?;
        for (k, v) in &self.args {
            if k.is_empty() || k.contains(['=', ';']) || v.contains(';') {
                return Err(CniError::InvalidArgument {
                    what: "CNI_ARGS pair",
                    value: format!("{k}={v}"),
                    reason: "keys are non-empty without '=' or ';', values without ';'".into(),
                });
            }
        }
        Ok(())
    }
}

/// libcni's rule: a letter or digit, then letters, digits, `_`, `.`, `-`.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::InvalidArgument {
            what: "container ID",
            value: id.to_string(),
            reason:
                "must start with a letter or digit and hold only letters, digits, '_', '.', '-'"
                    .into(),
        })
    }
}

/// libcni's rule: like a container ID.
pub fn validate_network_name(name: &str) -> Result<(), CniError> {
    validate_container_id(name).map_err(|_| CniError::InvalidArgument {
        what: "network name",
        value: name.to_string(),
        reason: "must start with a letter or digit and hold only letters, digits, '_', '.', '-'"
            .into(),
    })
}

/// The kernel's rule: 1–15 bytes, no `/`, `:` or whitespace, not `.` or `..`.
pub fn validate_ifname(ifname: &str) -> Result<(), CniError> {
    let ok = !ifname.is_empty()
        && ifname.len() <= 15
        && ifname != "."
        && ifname != ".."
        && !ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(CniError::InvalidArgument {
            what: "interface name",
            value: ifname.to_string(),
            reason: "1-15 bytes, no '/', ':' or whitespace".into(),
        })
    }
}

/// A plugin's (or the chain's) result, with the fields tests look at typed.
#[derive(Debug, Clone, PartialEq)]
pub struct CniResult {
    pub cni_version: String,
    pub interfaces: Vec<ResultInterface>,
    pub ips: Vec<ResultIp>,
    /// The whole result as the last plugin printed it.
    pub raw: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ResultInterface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    /// The namespace path for container interfaces, empty for host ones.
    #[serde(default)]
    pub sandbox: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ResultIp {
    /// CIDR notation: `10.22.0.5/16`.
    pub address: String,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default)]
    pub interface: Option<usize>,
}

impl ResultIp {
    /// The address without its prefix length.
    pub fn ip(&self) -> Option<IpAddr> {
        self.address.split('/').next()?.parse().ok()
    }
}

impl CniResult {
    fn from_value(raw: Value) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Shape {
            #[serde(default)]
            cni_version: String,
            #[serde(default)]
            interfaces: Vec<ResultInterface>,
            #[serde(default)]
            ips: Vec<ResultIp>,
        }
        if !raw.is_object() {
            return Err("the result is not a JSON object".into());
        }
        let shape: Shape = serde_json::from_value(raw.clone()).map_err(|e| e.to_string())?;
        Ok(CniResult {
            cni_version: shape.cni_version,
            interfaces: shape.interfaces,
            ips: shape.ips,
            raw,
        })
    }

    /// The container's addresses, in the result's order.
    pub fn pod_ips(&self) -> Vec<IpAddr> {
        self.ips.iter().filter_map(ResultIp::ip).collect()
    }
}

/// A results cache entry (libcni's layout, with the conflist as JSON rather than base64).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedAttachment {
    pub kind: String,
    pub container_id: String,
    pub if_name: String,
    pub network_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cni_args: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub capability_args: Map<String, Value>,
    /// The configuration list the attachment was made with.
    pub config: Value,
    pub result: Value,
}

impl CachedAttachment {
    fn runtime_conf(&self) -> RuntimeConf {
        RuntimeConf {
            container_id: self.container_id.clone(),
            netns: self.netns.clone(),
            ifname: self.if_name.clone(),
            args: self.cni_args.clone(),
            capability_args: self.capability_args.clone(),
        }
    }
}

/// Runs network configuration lists for one host (a sandbox node).
#[derive(Debug, Clone)]
pub struct Runtime {
    /// `CNI_PATH`: where plugins are looked up by `type`, in order.
    pub cni_path: Vec<PathBuf>,
    /// The network namespace plugins run in (`nsenter --net=<it>`); `None` runs them in
    /// this program's own.
    pub host_netns: Option<PathBuf>,
    /// The results cache (libcni's `/var/lib/cni`): `<it>/results/<net>-<id>-<ifname>`.
    pub cache_dir: PathBuf,
    /// Limit for each plugin execution.
    pub timeout: Duration,
}

impl Runtime {
    /// A runtime with [`DEFAULT_EXEC_TIMEOUT`].
    pub fn new(cni_path: Vec<PathBuf>, host_netns: Option<PathBuf>, cache_dir: PathBuf) -> Self {
        Runtime {
            cni_path,
            host_netns,
            cache_dir,
            timeout: DEFAULT_EXEC_TIMEOUT,
        }
    }

    pub fn with_timeout(self, timeout: Duration) -> Self {
        Runtime { timeout, ..self }
    }

    /// ADD: run every plugin in order, each getting the previous one's result, and cache the
    /// last result. Nothing is rolled back on failure (as with libcni: the runtime calls DEL).
    pub async fn add(
        &self,
        list: &NetworkConfigList,
        rt: &RuntimeConf,
    ) -> Result<CniResult, CniError> {
        rt.validate()?;
        let mut prev: Option<Value> = None;
        for plugin in &list.plugins {
            let stdin = plugin_stdin(list, plugin, prev.as_ref(), Some(rt));
            let stdout = self
                .exec(&plugin.plugin_type, Command::Add, &stdin, Some(rt))
                .await?;
            let result: Value =
                serde_json::from_slice(&stdout).map_err(|e| CniError::BadOutput {
                    plugin: plugin.plugin_type.clone(),
                    command: Command::Add,
                    status: success_status(),
                    reason: format!("succeeded but printed no JSON result ({e})"),
                    stdout: String::from_utf8_lossy(&stdout).into_owned(),
                    stderr: String::new(),
                })?;
            prev = Some(result);
        }
        let raw = prev.unwrap_or(Value::Null);
        let result = CniResult::from_value(raw.clone()).map_err(|reason| CniError::BadOutput {
            plugin: list
                .plugins
                .last()
                .map(|p| p.plugin_type.clone())
                .unwrap_or_default(),
            command: Command::Add,
            status: success_status(),
            reason: format!("printed a result that does not parse: {reason}"),
            stdout: raw.to_string(),
            stderr: String::new(),
        })?;
        self.cache_write(&CachedAttachment {
            kind: CACHE_KIND.into(),
            container_id: rt.container_id.clone(),
            if_name: rt.ifname.clone(),
            network_name: list.name.clone(),
            netns: rt.netns.clone(),
            cni_args: rt.args.clone(),
            capability_args: rt.capability_args.clone(),
            config: list.raw.clone(),
            result: raw,
        })?;
        Ok(result)
    }

    /// DEL: run every plugin in reverse order with the cached result as `prevResult` (from
    /// 0.4.0 on), then drop the cache entry. Succeeds again for what is gone already, as the
    /// plugins must. Stops at the first plugin that fails, as libcni does (the entry stays, so
    /// the DEL can be retried).
    pub async fn del(&self, list: &NetworkConfigList, rt: &RuntimeConf) -> Result<(), CniError> {
        self.del_plugins(list, rt, false).await
    }

    /// [`Runtime::del`] for teardown: every plugin gets its DEL even if one before it failed,
    /// and every failure is reported. The cache entry is dropped only if all succeeded.
    pub async fn del_keep_going(
        &self,
        list: &NetworkConfigList,
        rt: &RuntimeConf,
    ) -> Result<(), CniError> {
        self.del_plugins(list, rt, true).await
    }

    async fn del_plugins(
        &self,
        list: &NetworkConfigList,
        rt: &RuntimeConf,
        keep_going: bool,
    ) -> Result<(), CniError> {
        rt.validate()?;
        let cached = if list.version_at_least("0.4.0") {
            // An unreadable entry is dropped, as libcni does.
            self.cached(&list.name, &rt.container_id, &rt.ifname)
                .ok()
                .flatten()
                .map(|c| c.result)
        } else {
            None
        };
        let mut errors = Vec::new();
        for plugin in list.plugins.iter().rev() {
            let stdin = plugin_stdin(list, plugin, cached.as_ref(), Some(rt));
            if let Err(e) = self
                .exec(&plugin.plugin_type, Command::Del, &stdin, Some(rt))
                .await
            {
                if !keep_going {
                    return Err(e);
                }
                errors.push(e);
            }
        }
        if errors.is_empty() {
            self.cache_remove(&list.name, &rt.container_id, &rt.ifname)?;
        }
        collect(errors)
    }

    /// CHECK: run every plugin in order, each with the cached result as `prevResult`. Needs
    /// 0.4.0 and a cached result; a list with `disableCheck` passes at once.
    pub async fn check(&self, list: &NetworkConfigList, rt: &RuntimeConf) -> Result<(), CniError> {
        rt.validate()?;
        if !list.version_at_least("0.4.0") {
            return Err(CniError::InvalidConfList {
                path: list.path.clone(),
                reason: format!("cniVersion {} has no CHECK", list.cni_version),
            });
        }
        if list.disable_check {
            return Ok(());
        }
        let cached = self
            .cached(&list.name, &rt.container_id, &rt.ifname)?
            .ok_or_else(|| CniError::NoCachedResult {
                network: list.name.clone(),
                container_id: rt.container_id.clone(),
                ifname: rt.ifname.clone(),
            })?;
        for plugin in &list.plugins {
            let stdin = plugin_stdin(list, plugin, Some(&cached.result), Some(rt));
            self.exec(&plugin.plugin_type, Command::Check, &stdin, Some(rt))
                .await?;
        }
        Ok(())
    }

    /// STATUS: ask each plugin in order whether it can serve ADD now (1.1.0; older lists
    /// pass at once). The first failure is returned as is: codes 50/51 mean not available /
    /// limited connectivity.
    pub async fn status(&self, list: &NetworkConfigList) -> Result<(), CniError> {
        if !list.version_at_least("1.1.0") {
            return Ok(());
        }
        for plugin in &list.plugins {
            let stdin = plugin_stdin(list, plugin, None, None);
            self.exec(&plugin.plugin_type, Command::Status, &stdin, None)
                .await?;
        }
        Ok(())
    }

    /// GC: DEL every cached attachment of this network that is not in `valid` (with what was
    /// cached for it), then, from 1.1.0 on, run GC on each plugin with `valid` as
    /// `cni.dev/valid-attachments`. Keeps going past failures and reports all of them. A list
    /// with `disableGC` does nothing.
    pub async fn gc(&self, list: &NetworkConfigList, valid: &[Attachment]) -> Result<(), CniError> {
        if list.disable_gc {
            return Ok(());
        }
        let mut errors = Vec::new();
        for cached in self.cached_attachments()? {
            let attachment = Attachment {
                container_id: cached.container_id.clone(),
                ifname: cached.if_name.clone(),
            };
            if cached.network_name != list.name || valid.contains(&attachment) {
                continue;
            }
            if let Err(e) = self.del(list, &cached.runtime_conf()).await {
                errors.push(e);
            }
        }
        if list.version_at_least("1.1.0") {
            let valid = serde_json::to_value(valid).unwrap_or_else(|_| json!([]));
            for plugin in &list.plugins {
                let mut stdin = plugin_stdin(list, plugin, None, None);
                stdin.insert(VALID_ATTACHMENTS.into(), valid.clone());
                stdin.insert(VALID_ATTACHMENTS_LEGACY.into(), valid.clone());
                if let Err(e) = self
                    .exec(&plugin.plugin_type, Command::Gc, &stdin, None)
                    .await
                {
                    errors.push(e);
                }
            }
        }
        collect(errors)
    }

    /// The cached result of an attachment, if ADD cached one.
    pub fn cached(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<CachedAttachment>, CniError> {
        let path = self.cache_path(network, container_id, ifname)?;
        read_cache_entry(&path)
    }

    /// Every cached attachment, of any network.
    pub fn cached_attachments(&self) -> Result<Vec<CachedAttachment>, CniError> {
        let dir = self.results_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(CniError::Cache {
                    path: dir,
                    reason: format!("cannot list it: {e}"),
                });
            }
        };
        let mut found = Vec::new();
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            // Half-written entries (`.tmp`) and strangers are skipped, as libcni does.
            if path.extension().is_some() {
                continue;
            }
            if let Ok(Some(entry)) = read_cache_entry(&path) {
                found.push(entry);
            }
        }
        Ok(found)
    }

    fn results_dir(&self) -> PathBuf {
        self.cache_dir.join("results")
    }

    fn cache_path(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<PathBuf, CniError> {
        validate_network_name(network)?;
        validate_container_id(container_id)?;
        validate_ifname(ifname)?;
        Ok(self
            .results_dir()
            .join(format!("{network}-{container_id}-{ifname}")))
    }

    fn cache_write(&self, entry: &CachedAttachment) -> Result<(), CniError> {
        let path = self.cache_path(&entry.network_name, &entry.container_id, &entry.if_name)?;
        let cache_err = |reason: String| CniError::Cache {
            path: path.clone(),
            reason,
        };
        let dir = self.results_dir();
        std::fs::create_dir_all(&dir).map_err(|e| cache_err(format!("cannot create dir: {e}")))?;
        let text = serde_json::to_vec(entry).map_err(|e| cache_err(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(|e| cache_err(format!("cannot write: {e}")))?;
        std::fs::rename(&tmp, &path).map_err(|e| cache_err(format!("cannot rename: {e}")))
    }

    fn cache_remove(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<(), CniError> {
        let path = self.cache_path(network, container_id, ifname)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CniError::Cache {
                path,
                reason: format!("cannot remove: {e}"),
            }),
        }
    }

    /// The executable for plugin `plugin_type`: the first `CNI_PATH` directory holding it.
    pub fn find_plugin(&self, plugin_type: &str) -> Result<PathBuf, CniError> {
        self.cni_path
            .iter()
            .map(|dir| dir.join(plugin_type))
            .find(|p| crate::binaries::executable(p).is_some())
            .ok_or_else(|| CniError::PluginNotFound {
                plugin: plugin_type.to_string(),
                path: self.cni_path.clone(),
            })
    }

    /// Run plugin `plugin_type` once with `stdin` as its configuration: the environment of
    /// `command` (the container's variables from `rt` if given), in the host namespace,
    /// within the timeout. Its stdout on success; on failure the spec's error as
    /// [`CniError::Plugin`], or [`CniError::BadOutput`] without one.
    pub async fn exec(
        &self,
        plugin_type: &str,
        command: Command,
        stdin: &Map<String, Value>,
        rt: Option<&RuntimeConf>,
    ) -> Result<Vec<u8>, CniError> {
        let plugin_path = self.find_plugin(plugin_type)?;
        let mut cmd = match &self.host_netns {
            Some(netns) => {
                let mut cmd = tokio::process::Command::new("nsenter");
                cmd.arg(format!("--net={}", netns.display()))
                    .arg("--")
                    .arg(&plugin_path);
                cmd
            }
            None => tokio::process::Command::new(&plugin_path),
        };
        // Nothing of a CNI environment this program runs in reaches the plugin.
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("CNI_")) {
                cmd.env_remove(&key);
            }
        }
        let path = std::env::join_paths(&self.cni_path).unwrap_or_default();
        cmd.env("CNI_COMMAND", command.as_str())
            .env("CNI_PATH", path)
            .env(
                "CNI_CONTAINERID",
                rt.map(|r| r.container_id.as_str()).unwrap_or_default(),
            )
            .env(
                "CNI_NETNS",
                rt.and_then(|r| r.netns.as_deref())
                    .map(|p| p.as_os_str().to_owned())
                    .unwrap_or_default(),
            )
            .env(
                "CNI_IFNAME",
                rt.map(|r| r.ifname.as_str()).unwrap_or_default(),
            )
            .env(
                "CNI_ARGS",
                rt.map(RuntimeConf::cni_args).unwrap_or_default(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let spawn_err = |source| CniError::Spawn {
            plugin: plugin_type.to_string(),
            command,
            program: plugin_path.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let input = serde_json::to_vec(stdin).unwrap_or_default();
        let mut child_stdin = child.stdin.take();
        tracing::debug!(plugin = plugin_type, %command, stdin = %String::from_utf8_lossy(&input), "running CNI plugin");
        let run = async {
            if let Some(pipe) = child_stdin.as_mut() {
                // A plugin that exits without reading its stdin closes the pipe: its exit
                // status and output tell more than the write error.
                let _ = pipe.write_all(&input).await;
            }
            drop(child_stdin.take());
            child.wait_with_output().await
        };
        let output = match tokio::time::timeout(self.timeout, run).await {
            Err(_) => {
                // Dropping the child kills it (kill_on_drop); nsenter has exec'd the plugin.
                return Err(CniError::Timeout {
                    plugin: plugin_type.to_string(),
                    command,
                    timeout: self.timeout,
                });
            }
            Ok(output) => output.map_err(spawn_err)?,
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        tracing::debug!(plugin = plugin_type, %command, status = %output.status, %stdout, %stderr, "CNI plugin finished");
        if output.status.success() {
            return Ok(output.stdout);
        }
        Err(plugin_failure(
            plugin_type,
            command,
            output.status,
            stdout,
            stderr,
        ))
    }
}

/// `Ok` for no errors, the error itself for one, [`CniError::Many`] for more.
fn collect(mut errors: Vec<CniError>) -> Result<(), CniError> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(CniError::Many(errors)),
    }
}

/// The error a failed plugin execution stands for: its error JSON if it printed one.
pub fn plugin_failure(
    plugin: &str,
    command: Command,
    status: ExitStatus,
    stdout: String,
    stderr: String,
) -> CniError {
    #[derive(Deserialize)]
    struct ErrorJson {
        code: u32,
        #[serde(default)]
        msg: String,
        #[serde(default)]
        details: String,
    }
    match serde_json::from_str::<ErrorJson>(stdout.trim()) {
        Ok(e) => CniError::Plugin(Box::new(PluginFailure {
            plugin: plugin.to_string(),
            command,
            code: e.code,
            msg: e.msg,
            details: e.details,
            status,
            stderr,
        })),
        Err(e) => CniError::BadOutput {
            plugin: plugin.to_string(),
            command,
            status,
            reason: if stdout.trim().is_empty() {
                "no error JSON on stdout".into()
            } else {
                format!("its stdout is no error JSON ({e})")
            },
            stdout,
            stderr,
        },
    }
}

/// What a plugin gets on stdin: its own configuration with the list's `name` and
/// `cniVersion`, `prevResult` if given, and in `runtimeConfig` the capability arguments it
/// declares (libcni's `buildOneConfig`).
pub fn plugin_stdin(
    list: &NetworkConfigList,
    plugin: &PluginConfig,
    prev_result: Option<&Value>,
    rt: Option<&RuntimeConf>,
) -> Map<String, Value> {
    let mut conf = plugin.raw.clone();
    conf.insert("name".into(), Value::String(list.name.clone()));
    conf.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
    if let Some(prev) = prev_result {
        conf.insert("prevResult".into(), prev.clone());
    }
    if let Some(rt) = rt {
        let runtime_config: Map<String, Value> = plugin
            .capabilities
            .iter()
            .filter(|(_, on)| **on)
            .filter_map(|(cap, _)| Some((cap.clone(), rt.capability_args.get(cap)?.clone())))
            .collect();
        if !runtime_config.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime_config));
        }
    }
    conf
}

fn read_cache_entry(path: &Path) -> Result<Option<CachedAttachment>, CniError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(CniError::Cache {
                path: path.to_path_buf(),
                reason: format!("cannot read: {e}"),
            });
        }
    };
    let entry: CachedAttachment = serde_json::from_slice(&text).map_err(|e| CniError::Cache {
        path: path.to_path_buf(),
        reason: format!("malformed: {e}"),
    })?;
    if entry.kind != CACHE_KIND {
        return Err(CniError::Cache {
            path: path.to_path_buf(),
            reason: format!("kind {:?} is not {CACHE_KIND}", entry.kind),
        });
    }
    Ok(Some(entry))
}

fn success_status() -> ExitStatus {
    use std::os::unix::process::ExitStatusExt as _;
    ExitStatus::from_raw(0)
}

/// A random container ID: 64 hex digits, as container runtimes make them.
pub fn random_container_id() -> std::io::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFLIST: &str = r#"{"cniVersion":"1.1.0","name":"trellis","plugins":[
        {"type":"trellis","socket":"/run/trellis/cni.sock"},
        {"type":"portmap","capabilities":{"portMappings":true},"snat":true}]}"#;

    fn list() -> NetworkConfigList {
        NetworkConfigList::parse(Path::new("10-trellis.conflist"), CONFLIST.as_bytes()).unwrap()
    }

    #[test]
    fn parses_the_trellis_conflist() {
        let l = list();
        assert_eq!(l.name, "trellis");
        assert_eq!(l.cni_version, "1.1.0");
        let types: Vec<_> = l.plugins.iter().map(|p| p.plugin_type.as_str()).collect();
        assert_eq!(types, ["trellis", "portmap"]);
        assert_eq!(l.plugins[1].capabilities.get("portMappings"), Some(&true));
        assert!(l.version_at_least("1.1.0") && l.version_at_least("0.4.0"));
        assert!(!l.version_at_least("1.2.0"));
        assert!(!l.disable_check && !l.disable_gc);
    }

    #[test]
    fn rejects_broken_lists() {
        for bad in [
            "not json",
            "[]",
            r#"{"cniVersion":"1.1.0","plugins":[{"type":"x"}]}"#,
            r#"{"name":"n","plugins":[{"type":"x"}]}"#,
            r#"{"name":"n","cniVersion":"1.1","plugins":[{"type":"x"}]}"#,
            r#"{"name":"n","cniVersion":"1.1.0","plugins":[]}"#,
            r#"{"name":"n","cniVersion":"1.1.0","plugins":[{"type":""}]}"#,
            r#"{"name":"n","cniVersion":"1.1.0","plugins":[{"type":"../x"}]}"#,
            r#"{"name":"n/x","cniVersion":"1.1.0","plugins":[{"type":"x"}]}"#,
        ] {
            assert!(
                matches!(
                    NetworkConfigList::parse(Path::new("x"), bad.as_bytes()),
                    Err(CniError::InvalidConfList { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn stdin_gets_name_version_prev_result_and_only_declared_capabilities() {
        let l = list();
        let mut rt = RuntimeConf::for_pod(
            "abc",
            Path::new("/run/netns/p"),
            "default",
            "a",
            Some("u-1"),
        );
        rt.capability_args.insert(
            "portMappings".into(),
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
        );
        rt.capability_args
            .insert("bandwidth".into(), json!({"ingressRate": 1}));

        let first = plugin_stdin(&l, &l.plugins[0], None, Some(&rt));
        assert_eq!(
            Value::Object(first),
            json!({"type": "trellis", "socket": "/run/trellis/cni.sock",
                   "name": "trellis", "cniVersion": "1.1.0"})
        );
        let prev = json!({"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.5/32"}]});
        let second = plugin_stdin(&l, &l.plugins[1], Some(&prev), Some(&rt));
        assert_eq!(second["prevResult"], prev);
        assert_eq!(
            second["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
        );
        assert_eq!(second["snat"], json!(true));
        // STATUS and GC carry no container.
        assert!(
            plugin_stdin(&l, &l.plugins[1], None, None)
                .get("runtimeConfig")
                .is_none()
        );
    }

    #[test]
    fn kubernetes_cni_args() {
        let rt = RuntimeConf::for_pod("c1", Path::new("/n"), "ns", "p", Some("uid"));
        assert_eq!(
            rt.cni_args(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=uid"
        );
        assert_eq!(rt.ifname, "eth0");
        assert!(rt.validate().is_ok());
        let no_uid = RuntimeConf::for_pod("c1", Path::new("/n"), "ns", "p", None);
        assert!(!no_uid.cni_args().contains("K8S_POD_UID"));
    }

    #[test]
    fn validates_names_as_libcni_does() {
        assert!(validate_container_id(&"a".repeat(64)).is_ok());
        assert!(validate_container_id("cnitool-77383ca0a0715733ca6f").is_ok());
        for bad in ["", "-x", "a/b", "a b", "a;b"] {
            assert!(validate_container_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_ifname("eth0").is_ok());
        for bad in ["", "a/b", "a:b", "a b", ".", "..", "sixteen-bytes-xx"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn error_json_becomes_a_typed_error() {
        use std::os::unix::process::ExitStatusExt as _;
        let status = ExitStatus::from_raw(1 << 8);
        let e = plugin_failure(
            "trellis",
            Command::Add,
            status,
            r#"{"cniVersion":"1.1.0","code":11,"msg":"node not ready","details":"no block yet"}"#
                .into(),
            "log line".into(),
        );
        let failure = e.plugin_failure().expect("a plugin failure");
        assert_eq!(
            failure,
            &PluginFailure {
                plugin: "trellis".into(),
                command: Command::Add,
                code: 11,
                msg: "node not ready".into(),
                details: "no block yet".into(),
                status,
                stderr: "log line".into(),
            }
        );
        assert_eq!(failure.status.code(), Some(1));
        assert_eq!(e.code(), Some(11));
        let text = e.to_string();
        assert!(
            text.contains("code 11: node not ready (no block yet)"),
            "{text}"
        );

        let garbage = plugin_failure("x", Command::Del, status, "panic!".into(), String::new());
        assert!(matches!(garbage, CniError::BadOutput { .. }));
        assert_eq!(garbage.code(), None);
    }

    #[test]
    fn results_parse_and_give_pod_ips() {
        let r = CniResult::from_value(json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/p"}],
            "ips": [{"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 0},
                    {"address": "fd00::5/64"}],
        }))
        .unwrap();
        assert_eq!(
            r.pod_ips(),
            [
                "10.22.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(r.interfaces[0].sandbox, "/run/netns/p");
        assert!(CniResult::from_value(json!([])).is_err());
    }

    #[test]
    fn cache_round_trips_and_lists() {
        let tmp = tempfile::Builder::new()
            .prefix("trellis-cni-cache-")
            .tempdir()
            .unwrap();
        let runtime = Runtime::new(vec![], None, tmp.path().to_path_buf());
        let entry = |id: &str| CachedAttachment {
            kind: CACHE_KIND.into(),
            container_id: id.into(),
            if_name: "eth0".into(),
            network_name: "trellis".into(),
            netns: Some("/run/netns/x".into()),
            cni_args: vec![("K8S_POD_NAME".into(), "a".into())],
            capability_args: Map::new(),
            config: list().raw,
            result: json!({"cniVersion": "1.1.0"}),
        };
        runtime.cache_write(&entry("b")).unwrap();
        runtime.cache_write(&entry("a")).unwrap();
        assert_eq!(
            runtime.cached("trellis", "a", "eth0").unwrap(),
            Some(entry("a"))
        );
        assert!(tmp.path().join("results/trellis-a-eth0").is_file());
        let ids: Vec<_> = runtime
            .cached_attachments()
            .unwrap()
            .into_iter()
            .map(|c| c.container_id)
            .collect();
        assert_eq!(ids, ["a", "b"]);
        runtime.cache_remove("trellis", "a", "eth0").unwrap();
        runtime.cache_remove("trellis", "a", "eth0").unwrap();
        assert_eq!(runtime.cached("trellis", "a", "eth0").unwrap(), None);
        assert!(runtime.cached("trellis", "../x", "eth0").is_err());
    }

    #[test]
    fn first_conflist_is_the_lowest_sorted() {
        let tmp = tempfile::Builder::new()
            .prefix("trellis-cni-conf-")
            .tempdir()
            .unwrap();
        assert_eq!(first_conflist(tmp.path()).unwrap(), None);
        assert_eq!(first_conflist(&tmp.path().join("missing")).unwrap(), None);
        for name in ["20-other.conflist", "10-trellis.conflist", "05-x.conf"] {
            std::fs::write(tmp.path().join(name), CONFLIST).unwrap();
        }
        assert_eq!(
            first_conflist(tmp.path()).unwrap(),
            Some(tmp.path().join("10-trellis.conflist"))
        );
        assert_eq!(
            NetworkConfigList::load_dir(tmp.path()).unwrap().name,
            "trellis"
        );
    }

    #[test]
    fn container_ids_are_64_hex_digits() {
        let a = random_container_id().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_container_id().unwrap());
    }
}
