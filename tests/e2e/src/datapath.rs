//! The sandbox's datapath: one underlay switch, and a network namespace per node plugged into
//! it, all made with iproute2's `ip` and recorded in the state directory so that teardown
//! deletes exactly those, by name, also after a crash.
//!
//! ```text
//!  root namespace: only the names under /run/netns (and the trellis-node processes)
//!
//!  trellis-<tag>-underlay                       <tag>: 6 hex digits derived from the state dir
//!  ┌──────────────────────────────────────────────────────────┐
//!  │ trellis-br0 (bridge, up)                                 │
//!  │   ├── trellis-p11 (veth, up)    ├── trellis-p12 …        │
//!  └───────────│─────────────────────────│────────────────────┘
//!              │ veth pair               │
//!  trellis-<tag>-trellis-node-1      trellis-<tag>-trellis-node-2
//!  ┌───────────┴──────────────┐      ┌───┴──────────────────────┐
//!  │ eth0 192.0.2.11/24, up   │      │ eth0 192.0.2.12/24, up   │
//!  │ lo up                    │      │ lo up                    │
//!  └──────────────────────────┘      └──────────────────────────┘
//!              ▲ --host-netns /run/netns/trellis-<tag>-trellis-node-1
//!   trellis-node --node-name trellis-node-1 …   (root namespace, recorded pid; crate::agent)
//! ```
//!
//! - The bridge port of a node is `trellis-p<last octet of its underlay address>` (at most 12
//!   bytes; an interface name has at most 15). Both ends of a veth pair are created directly
//!   in their namespaces (`ip -n <underlay> link add … peer name eth0 netns <node>`), so
//!   nothing ever appears in the root namespace.
//! - `<state>/datapath.json` ([`DatapathConfig`]) says the sandbox has a datapath, so a later
//!   `trellis-sandbox node add` gives its node a namespace too. `<state>/netns/<name>.json`
//!   ([`NetnsRecord`]) is written *before* namespace `<name>` is created and removed after it
//!   is deleted; teardown deletes the namespaces named by those files (nodes first, the
//!   underlay last) and nothing else.
//! - Removing a node deletes its bridge port first (which takes `eth0` with it at once, even if
//!   something still holds the namespace), then its namespace.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Mutex, PoisonError},
};

use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    nodes::{NodeSpec, UNDERLAY},
    pods::Pod,
    sandbox::Sandbox,
};

/// Every name the datapath gives a namespace or link starts with this.
pub const NAME_PREFIX: &str = "trellis";
/// The underlay bridge, inside the underlay namespace.
pub const BRIDGE: &str = "trellis-br0";
/// A node's underlay interface, inside its namespace.
pub const NODE_INTERFACE: &str = "eth0";
/// Prefix length of the underlay (192.0.2.0/24).
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// Where `ip netns` keeps its names.
pub const NETNS_RUN_DIR: &str = "/run/netns";
/// Longest interface name the kernel takes (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;
/// Longest namespace name: a file name under [`NETNS_RUN_DIR`].
const NETNS_NAME_MAX: usize = 255;
/// The underlay namespace's suffix, after `trellis-<tag>-`.
const UNDERLAY_SUFFIX: &str = "underlay";

/// A short tag for the sandbox in `state_dir`: 6 hex digits of a hash of its canonical path.
/// Namespace names carry it, so sandboxes with different state directories (parallel tests)
/// do not collide. FNV-1a, so the tag is the same in every build.
pub fn sandbox_tag(state_dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in path.as_os_str().as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let folded = hash ^ (hash >> 24) ^ (hash >> 48);
    format!("{:06x}", folded & 0xff_ffff)
}

/// `trellis-<tag>-underlay`.
pub fn underlay_netns_name(tag: &str) -> String {
    format!("{NAME_PREFIX}-{tag}-{UNDERLAY_SUFFIX}")
}

/// `trellis-<tag>-<node>`, or why `node` cannot name a namespace.
pub fn node_netns_name(tag: &str, node: &str) -> std::result::Result<String, String> {
    let valid = !node.is_empty()
        && node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !node.starts_with(['.', '-']);
    if !valid {
        return Err(format!(
            "{node:?} cannot name a network namespace: a node name is lowercase letters, digits, '-' and '.'"
        ));
    }
    if node == UNDERLAY_SUFFIX {
        return Err(format!(
            "{UNDERLAY_SUFFIX:?} is taken by the sandbox's underlay namespace"
        ));
    }
    let name = format!("{NAME_PREFIX}-{tag}-{node}");
    if name.len() > NETNS_NAME_MAX {
        return Err(format!(
            "the namespace name {name:?} would be longer than {NETNS_NAME_MAX} bytes"
        ));
    }
    Ok(name)
}

/// `trellis-<tag>-pod_<namespace>_<name>`, or `trellis-<tag>-pod_<16 hex digits>` (a hash of
/// both) when that would be longer than a file name may be. Node names and Kubernetes names
/// have no `_`, so a pod's name never collides with a node's, nor with another pod's.
pub fn pod_netns_name(tag: &str, namespace: &str, name: &str) -> String {
    let readable = format!("{NAME_PREFIX}-{tag}-pod_{namespace}_{name}");
    if readable.len() <= NETNS_NAME_MAX
        && !namespace.is_empty()
        && !name.is_empty()
        && format!("{namespace}{name}")
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return readable;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in namespace.bytes().chain([b'/']).chain(name.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{NAME_PREFIX}-{tag}-pod_{hash:016x}")
}

/// The bridge end of a node's veth pair: `trellis-p<last octet>`.
pub fn bridge_port_name(address: Ipv4Addr) -> String {
    format!("{NAME_PREFIX}-p{}", address.octets()[3])
}

/// `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Whether namespace `name` exists (has its name under /run/netns).
pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// A node's underlay address: its first IPv4 InternalIP, which must be a host address in
/// 192.0.2.0/24. Other InternalIPs (IPv6) are registered on the Node only.
pub fn node_address(spec: &NodeSpec) -> std::result::Result<Ipv4Addr, String> {
    let address = spec
        .internal_ips
        .iter()
        .find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .ok_or_else(|| format!("has no IPv4 InternalIP; the underlay is {UNDERLAY}/24"))?;
    let [a, b, c, host] = address.octets();
    if [a, b, c] != UNDERLAY.octets()[..3] || host == 0 || host == 255 {
        return Err(format!(
            "InternalIP {address} is not a host address of the underlay {UNDERLAY}/{UNDERLAY_PREFIX_LEN}"
        ));
    }
    Ok(address)
}

/// What `<state>/datapath.json` records: the sandbox has a datapath, and how it runs agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathConfig {
    /// See [`sandbox_tag`].
    pub tag: String,
    /// The namespace holding the bridge [`BRIDGE`].
    pub underlay_netns: String,
    /// Repository root, to build `trellis-node` if no binary is recorded.
    pub repo_root: PathBuf,
    /// Whether every node added gets a `trellis-node` started for it.
    pub agents: bool,
    /// The `trellis-node` to run (resolved at start when `agents`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_binary: Option<PathBuf>,
    /// `RUST_LOG` of the agents; `None` removes an inherited one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_log_filter: Option<String>,
    /// How long an agent gets to answer `/healthz`.
    pub agent_ready_timeout_ms: u64,
    /// The CNI plugin `trellis` each agent installs into its node's CNI bin directory
    /// (`--cni-plugin-source`; resolved at start when `agents`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_plugin_binary: Option<PathBuf>,
    /// The reference CNI plugins (portmap, …), the second entry of the pods' `CNI_PATH`
    /// (resolved at start when `agents`; else on first use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_plugins_dir: Option<PathBuf>,
}

impl DatapathConfig {
    /// The recorded configuration; `None` if the sandbox has no datapath.
    pub fn read(sandbox: &Sandbox) -> Result<Option<Self>> {
        let path = sandbox.datapath_config_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| datapath_error(sandbox, format!("{} is malformed: {e}", path.display())))
    }

    pub fn write(&self, sandbox: &Sandbox) -> Result<()> {
        let path = sandbox.datapath_config_path();
        write_json_atomically(sandbox, &path, self)
    }
}

/// One node's part of the datapath, as recorded in `<state>/netns/<netns>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDatapath {
    /// The Node's name.
    pub node: String,
    /// Its network namespace (`trellis-<tag>-<node>`).
    pub netns: String,
    /// The underlay namespace its bridge port is in.
    pub underlay_netns: String,
    /// The bridge end of its veth pair, in `underlay_netns`.
    pub bridge_port: String,
    /// Address of its `eth0`.
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// Port of its `trellis-node`'s `/metrics`, `/healthz` and `/readyz` on 127.0.0.1, once
    /// one was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_metrics_port: Option<u16>,
}

impl NodeDatapath {
    /// `/run/netns/<netns>`: what the agent gets as `--host-netns`.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// `192.0.2.x/24`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.address, self.prefix_len)
    }
}

/// A namespace the sandbox created (or is about to), one file per namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum NetnsRecord {
    Underlay {
        netns: String,
    },
    Node(NodeDatapath),
    /// A pod's namespace, with what the sandbox knows about the pod (see [`crate::pods`]).
    Pod(Pod),
}

impl NetnsRecord {
    pub fn netns(&self) -> &str {
        match self {
            NetnsRecord::Underlay { netns } => netns,
            NetnsRecord::Node(node) => &node.netns,
            NetnsRecord::Pod(pod) => &pod.netns,
        }
    }

    /// Teardown order: pods, then nodes (and unreadable records), the underlay last.
    fn teardown_rank(record: Option<&NetnsRecord>) -> u8 {
        match record {
            Some(NetnsRecord::Pod(_)) => 0,
            Some(NetnsRecord::Node(_)) | None => 1,
            Some(NetnsRecord::Underlay { .. }) => 2,
        }
    }
}

fn datapath_error(sandbox: &Sandbox, reason: String) -> Error {
    Error::Datapath {
        path: sandbox.dir().to_path_buf(),
        reason,
    }
}

fn write_json_atomically<T: Serialize>(sandbox: &Sandbox, path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| datapath_error(sandbox, format!("cannot encode {}: {e}", path.display())))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text + "\n").map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))
}

/// Record `record` unless its namespace is recorded already (`Ok(false)`).
fn record_new(sandbox: &Sandbox, record: &NetnsRecord) -> Result<bool> {
    let dir = sandbox.netns_records_dir();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    let path = sandbox.netns_record_path(record.netns());
    let text = serde_json::to_string_pretty(record)
        .map_err(|e| datapath_error(sandbox, format!("cannot encode {}: {e}", path.display())))?;
    // Written in full under a temporary name, then linked into place only if nothing is there.
    let mut tmp = tempfile::Builder::new()
        .prefix(".trellis-netns-")
        .tempfile_in(&dir)
        .map_err(|e| Error::io("create a temporary file in", &dir, e))?;
    std::io::Write::write_all(&mut tmp, (text + "\n").as_bytes())
        .map_err(|e| Error::io("write", tmp.path(), e))?;
    match tmp.persist_noclobber(&path) {
        Ok(_) => Ok(true),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::io("write", &path, e.error)),
    }
}

/// Replace the record of `record`'s namespace.
pub(crate) fn update_record(sandbox: &Sandbox, record: &NetnsRecord) -> Result<()> {
    write_json_atomically(sandbox, &sandbox.netns_record_path(record.netns()), record)
}

fn remove_record(sandbox: &Sandbox, netns: &str) -> Result<()> {
    let path = sandbox.netns_record_path(netns);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", &path, e)),
    }
}

/// The record of namespace `netns`, if there is one.
pub fn read_record(sandbox: &Sandbox, netns: &str) -> Result<Option<NetnsRecord>> {
    let path = sandbox.netns_record_path(netns);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| datapath_error(sandbox, format!("{} is malformed: {e}", path.display())))
}

/// Every recorded namespace name (from the record's file name, so a damaged record still
/// names its namespace) with its record if it parses; pod namespaces first, then node
/// namespaces, the underlay last, each group by name.
pub fn recorded_namespaces(sandbox: &Sandbox) -> Result<Vec<(String, Option<NetnsRecord>)>> {
    let dir = sandbox.netns_records_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io("list", &dir, e))?.path();
        if path.extension().is_none_or(|ext| ext != "json") {
            continue;
        }
        let Some(name) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        let record = read_record(sandbox, &name).ok().flatten();
        found.push((name, record));
    }
    found.sort_by(|(a, ra), (b, rb)| {
        let rank = |r: &Option<NetnsRecord>| NetnsRecord::teardown_rank(r.as_ref());
        (rank(ra), a).cmp(&(rank(rb), b))
    });
    Ok(found)
}

/// Every recorded pod, by namespace and name.
pub fn recorded_pods(sandbox: &Sandbox) -> Result<Vec<Pod>> {
    let mut pods: Vec<Pod> = recorded_namespaces(sandbox)?
        .into_iter()
        .filter_map(|(_, record)| match record {
            Some(NetnsRecord::Pod(pod)) => Some(pod),
            _ => None,
        })
        .collect();
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(pods)
}

/// Every recorded node's datapath, by node name.
pub fn recorded_nodes(sandbox: &Sandbox) -> Result<Vec<NodeDatapath>> {
    let mut nodes: Vec<NodeDatapath> = recorded_namespaces(sandbox)?
        .into_iter()
        .filter_map(|(_, record)| match record {
            Some(NetnsRecord::Node(node)) => Some(node),
            _ => None,
        })
        .collect();
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(nodes)
}

/// `ip netns add` sets up /run/netns (a shared bind mount) on first use; two at once could
/// both do it. Within one program they take turns.
static NETNS_ADD: Mutex<()> = Mutex::new(());

fn add_netns(sandbox: &Sandbox, name: &str) -> Result<()> {
    let _turn = NETNS_ADD.lock().unwrap_or_else(PoisonError::into_inner);
    if netns_exists(name) {
        return Err(datapath_error(
            sandbox,
            format!(
                "network namespace {name} already exists but this sandbox did not create it (a \
                 sandbox whose state dir hashes to the same tag, or the leftover of a run whose \
                 state dir was deleted); if it is stale: ip netns del {name}"
            ),
        ));
    }
    ip(&["netns", "add", name]).map(drop).map_err(|e| match e {
        Error::Command {
            command,
            reason,
            stderr,
        } if stderr.contains("Permission denied") || stderr.contains("not permitted") => {
            Error::Command {
                command,
                reason: format!(
                    "{reason} (network namespaces need root; without the datapath the sandbox \
                     runs unprivileged: `trellis-sandbox up --no-datapath`, StartOptions::datapath = false)"
                ),
                stderr,
            }
        }
        e => e,
    })
}

/// Delete namespace `name` by name; `Ok(false)` if it did not exist.
fn delete_netns(name: &str) -> Result<bool> {
    if !netns_exists(name) {
        return Ok(false);
    }
    match ip(&["netns", "del", name]) {
        Ok(_) => Ok(true),
        // Deleted in the meantime.
        Err(_) if !netns_exists(name) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Create the underlay namespace `netns` with its bridge [`BRIDGE`], up. Recorded first, so a
/// half-made underlay is deleted by teardown like a whole one.
pub fn create_underlay(sandbox: &Sandbox, netns: &str) -> Result<()> {
    let record = NetnsRecord::Underlay {
        netns: netns.to_string(),
    };
    if !record_new(sandbox, &record)? {
        return Err(datapath_error(
            sandbox,
            format!("the underlay namespace {netns} is recorded already"),
        ));
    }
    if let Err(e) = add_netns(sandbox, netns) {
        let _ = remove_record(sandbox, netns);
        return Err(e);
    }
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    ip(&["-n", netns, "link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["-n", netns, "link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// Give node `spec` its namespace, plugged into the underlay: a veth pair whose bridge end
/// joins [`BRIDGE`] and whose other end is the node's `eth0` with its underlay address, and
/// `lo` up. On failure whatever this call made is deleted again.
pub fn create_node(
    sandbox: &Sandbox,
    config: &DatapathConfig,
    spec: &NodeSpec,
) -> Result<NodeDatapath> {
    let invalid = |reason: String| Error::InvalidNode {
        name: spec.name.clone(),
        reason,
    };
    let address = node_address(spec).map_err(invalid)?;
    let netns = node_netns_name(&config.tag, &spec.name).map_err(invalid)?;
    if let Some(other) = recorded_nodes(sandbox)?
        .into_iter()
        .find(|n| n.address == address && n.node != spec.name)
    {
        return Err(invalid(format!(
            "underlay address {address} is taken by node {}",
            other.node
        )));
    }
    let node = NodeDatapath {
        node: spec.name.clone(),
        bridge_port: bridge_port_name(address),
        underlay_netns: config.underlay_netns.clone(),
        address,
        prefix_len: UNDERLAY_PREFIX_LEN,
        agent_metrics_port: None,
        netns,
    };
    if !record_new(sandbox, &NetnsRecord::Node(node.clone()))? {
        return Err(invalid(format!(
            "it has a network namespace ({}) in this sandbox already",
            node.netns
        )));
    }
    if let Err(e) = add_netns(sandbox, &node.netns) {
        let _ = remove_record(sandbox, &node.netns);
        return Err(e);
    }
    if let Err(e) = plug(&node) {
        if let Err(cleanup) = delete_node(sandbox, &node) {
            tracing::warn!(node = %node.node, error = %cleanup, "cleaning up a half-made node namespace");
        }
        return Err(e);
    }
    Ok(node)
}

fn plug(node: &NodeDatapath) -> Result<()> {
    let (underlay, netns, port) = (
        node.underlay_netns.as_str(),
        node.netns.as_str(),
        node.bridge_port.as_str(),
    );
    let cidr = node.cidr();
    #[rustfmt::skip]
    let steps: [&[&str]; 5] = [
        &["-n", underlay, "link", "add", port, "type", "veth", "peer", "name", NODE_INTERFACE, "netns", netns],
        &["-n", underlay, "link", "set", port, "master", BRIDGE, "up"],
        &["-n", netns, "addr", "add", &cidr, "dev", NODE_INTERFACE],
        &["-n", netns, "link", "set", NODE_INTERFACE, "up"],
        &["-n", netns, "link", "set", "lo", "up"],
    ];
    for args in steps {
        ip(args)?;
    }
    Ok(())
}

/// Create pod `pod`'s namespace (named `pod.netns`) with `lo` up, recorded first so teardown
/// deletes it also after a crash. On failure whatever this call made is deleted again.
pub fn create_pod_netns(sandbox: &Sandbox, pod: &Pod) -> Result<()> {
    let record = NetnsRecord::Pod(pod.clone());
    if !record_new(sandbox, &record)? {
        return Err(datapath_error(
            sandbox,
            format!(
                "the namespace {} of pod {}/{} is recorded already",
                pod.netns, pod.namespace, pod.name
            ),
        ));
    }
    if let Err(e) = add_netns(sandbox, &pod.netns) {
        let _ = remove_record(sandbox, &pod.netns);
        return Err(e);
    }
    if let Err(e) = ip(&["-n", &pod.netns, "link", "set", "lo", "up"]) {
        if let Err(cleanup) = delete_pod_netns(sandbox, &pod.netns) {
            tracing::warn!(netns = %pod.netns, error = %cleanup, "cleaning up a half-made pod namespace");
        }
        return Err(e);
    }
    Ok(())
}

/// Replace pod `pod`'s record (its namespace must be recorded already).
pub fn update_pod_record(sandbox: &Sandbox, pod: &Pod) -> Result<()> {
    update_record(sandbox, &NetnsRecord::Pod(pod.clone()))
}

/// Delete a pod's namespace by name, then its record (kept if the namespace could not be
/// deleted). A namespace that is gone already is fine.
pub fn delete_pod_netns(sandbox: &Sandbox, netns: &str) -> Result<()> {
    delete_netns(netns)?;
    remove_record(sandbox, netns)
}

/// Delete a node's bridge port and namespace, then its record (kept if something could not
/// be deleted, so a later teardown tries again). What is gone already is fine.
pub fn delete_node(sandbox: &Sandbox, node: &NodeDatapath) -> Result<()> {
    let mut errors = Vec::new();
    if netns_exists(&node.underlay_netns) {
        match ip(&["-n", &node.underlay_netns, "link", "del", &node.bridge_port]) {
            Ok(_) => {}
            Err(Error::Command { ref stderr, .. }) if stderr.contains("Cannot find device") => {}
            Err(e) => errors.push(e),
        }
    }
    if let Err(e) = delete_netns(&node.netns) {
        errors.push(e);
    }
    if errors.is_empty() {
        remove_record(sandbox, &node.netns)?;
    }
    Error::from_list(errors)
}

/// Delete every namespace recorded in the sandbox, by the recorded name (pod namespaces
/// first, then node namespaces, the underlay last) and its record. Keeps going past failures and reports all of
/// them; a record whose namespace could not be deleted stays. Returns the names of the
/// namespaces that existed.
pub fn delete_recorded(sandbox: &Sandbox) -> Result<Vec<String>> {
    let mut deleted = Vec::new();
    let mut errors = Vec::new();
    for (name, record) in recorded_namespaces(sandbox)? {
        if !name.starts_with(&format!("{NAME_PREFIX}-")) {
            errors.push(datapath_error(
                sandbox,
                format!("refusing to delete namespace {name:?}: not a name the sandbox gives"),
            ));
            continue;
        }
        let existed = netns_exists(&name);
        let result = match &record {
            Some(NetnsRecord::Node(node)) if node.netns == name => delete_node(sandbox, node),
            _ => delete_netns(&name).and_then(|_| remove_record(sandbox, &name)),
        };
        match result {
            Ok(()) if existed => deleted.push(name),
            Ok(()) => {}
            Err(e) => errors.push(e),
        }
    }
    Error::from_list(errors).map(|()| deleted)
}

/// Names of every network namespace the kernel has under /run/netns (`ip -j netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    let out = ip(&["-j", "netns", "list"])?;
    let value = parse_json("ip -j netns list", &out)?;
    Ok(value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ns| ns.get("name")?.as_str().map(str::to_string))
        .collect())
}

/// Run `ip <args>`; its stdout, or an error with the command line and its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let output = Command::new("ip").args(args).stdin(Stdio::null()).output();
    finish(command_line("ip", args), output)
}

/// [`ip`] without blocking the async runtime.
pub async fn ip_async(args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await;
    finish(command_line("ip", args), output)
}

/// `ip -n <netns> -j <args>` as JSON (`[]` when `ip` prints nothing, as it does for an empty
/// dump).
pub async fn ip_json(netns: &str, args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["-n", netns, "-j"];
    all.extend_from_slice(args);
    let out = ip_async(&all).await?;
    parse_json(&command_line("ip", &all), &out)
}

/// Run `argv` inside namespace `netns` with `ip netns exec` and return what it did, whatever
/// its exit status. For tests (`ping` between nodes); never used for an agent, because
/// `ip netns exec` mounts a fresh /sys without bpffs.
pub async fn netns_exec(netns: &str, argv: &[&str]) -> Result<Output> {
    let mut all = vec!["netns", "exec", netns];
    all.extend_from_slice(argv);
    tokio::process::Command::new("ip")
        .args(&all)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| Error::Command {
            command: command_line("ip", &all),
            reason: format!("cannot be run: {e}"),
            stderr: String::new(),
        })
}

fn parse_json(command: &str, out: &str) -> Result<serde_json::Value> {
    if out.trim().is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_str(out).map_err(|e| Error::Command {
        command: command.to_string(),
        reason: format!("printed something that is not JSON ({e})"),
        stderr: out.to_string(),
    })
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

fn finish(command: String, output: std::io::Result<Output>) -> Result<String> {
    let output = output.map_err(|e| Error::Command {
        command: command.clone(),
        reason: format!("cannot be run: {e}"),
        stderr: String::new(),
    })?;
    if !output.status.success() {
        return Err(Error::Command {
            command,
            reason: format!("exited with {}", output.status),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_carry_the_prefix() {
        let tag = sandbox_tag(Path::new("/tmp/trellis-e2e-some-test"));
        assert_eq!(tag.len(), 6);
        assert!(tag.bytes().all(|b| b.is_ascii_hexdigit()), "{tag}");
        assert_eq!(tag, sandbox_tag(Path::new("/tmp/trellis-e2e-some-test")));
        assert_ne!(tag, sandbox_tag(Path::new("/tmp/trellis-e2e-other-test")));

        assert_eq!(underlay_netns_name("abc123"), "trellis-abc123-underlay");
        assert_eq!(
            node_netns_name("abc123", "trellis-node-1").unwrap(),
            "trellis-abc123-trellis-node-1"
        );
        assert!(node_netns_name("abc123", "underlay").is_err());
        assert!(node_netns_name("abc123", "../etc").is_err());
        assert!(node_netns_name("abc123", "").is_err());
        assert!(node_netns_name("abc123", "Upper").is_err());
        assert!(node_netns_name("abc123", &"a".repeat(250)).is_err());

        for host in [1, 11, 254] {
            let port = bridge_port_name(Ipv4Addr::new(192, 0, 2, host));
            assert!(
                port.starts_with(NAME_PREFIX) && port.len() <= IFNAME_MAX,
                "{port}"
            );
        }
        assert_eq!(
            bridge_port_name(Ipv4Addr::new(192, 0, 2, 11)),
            "trellis-p11"
        );
        assert!(BRIDGE.len() <= IFNAME_MAX && BRIDGE.starts_with(NAME_PREFIX));
    }

    #[test]
    fn node_addresses_come_from_the_underlay() {
        let spec = |ips: &[&str]| NodeSpec {
            internal_ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            ..NodeSpec::new("n", "192.0.2.1".parse().unwrap())
        };
        assert_eq!(
            node_address(&spec(&["fd00::1", "192.0.2.20"])),
            Ok(Ipv4Addr::new(192, 0, 2, 20))
        );
        assert!(node_address(&spec(&["10.0.0.1"])).is_err());
        assert!(node_address(&spec(&["192.0.2.0"])).is_err());
        assert!(node_address(&spec(&["192.0.2.255"])).is_err());
        assert!(node_address(&spec(&["fd00::1"])).is_err());
    }

    #[test]
    fn records_round_trip_and_teardown_order() {
        let tmp = tempfile::Builder::new()
            .prefix("trellis-dp-")
            .tempdir()
            .unwrap();
        let sbx = Sandbox::new(tmp.path());
        let node = |name: &str, host: u8| NodeDatapath {
            node: name.into(),
            netns: format!("trellis-abc123-{name}"),
            underlay_netns: "trellis-abc123-underlay".into(),
            bridge_port: bridge_port_name(Ipv4Addr::new(192, 0, 2, host)),
            address: Ipv4Addr::new(192, 0, 2, host),
            prefix_len: 24,
            agent_metrics_port: None,
        };
        let underlay = NetnsRecord::Underlay {
            netns: "trellis-abc123-underlay".into(),
        };
        assert!(record_new(&sbx, &underlay).unwrap());
        assert!(!record_new(&sbx, &underlay).unwrap(), "recorded once only");
        assert!(record_new(&sbx, &NetnsRecord::Node(node("b", 12))).unwrap());
        assert!(record_new(&sbx, &NetnsRecord::Node(node("a", 11))).unwrap());
        // A damaged record still names its namespace.
        std::fs::write(sbx.netns_record_path("trellis-abc123-c"), "{").unwrap();
        let pod = Pod {
            namespace: "default".into(),
            name: "p".into(),
            node: "a".into(),
            netns: pod_netns_name("abc123", "default", "p"),
            container_id: "c".repeat(64),
            ifname: "eth0".into(),
            uid: None,
            network: None,
            ips: Vec::new(),
        };
        assert!(record_new(&sbx, &NetnsRecord::Pod(pod.clone())).unwrap());

        let names: Vec<String> = recorded_namespaces(&sbx)
            .unwrap()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(
            names,
            [
                "trellis-abc123-pod_default_p",
                "trellis-abc123-a",
                "trellis-abc123-b",
                "trellis-abc123-c",
                "trellis-abc123-underlay"
            ]
        );
        let mut a = node("a", 11);
        a.agent_metrics_port = Some(4242);
        update_record(&sbx, &NetnsRecord::Node(a.clone())).unwrap();
        assert_eq!(
            read_record(&sbx, "trellis-abc123-a").unwrap(),
            Some(NetnsRecord::Node(a))
        );
        let nodes: Vec<String> = recorded_nodes(&sbx)
            .unwrap()
            .into_iter()
            .map(|n| n.node)
            .collect();
        assert_eq!(nodes, ["a", "b"]);
        assert_eq!(recorded_pods(&sbx).unwrap(), [pod]);
    }

    #[test]
    fn pod_namespace_names_never_collide_with_nodes() {
        assert_eq!(
            pod_netns_name("abc123", "default", "web-0"),
            "trellis-abc123-pod_default_web-0"
        );
        assert_ne!(
            pod_netns_name("abc123", "a-b", "c"),
            pod_netns_name("abc123", "a", "b-c")
        );
        // Node names have no '_'.
        assert!(node_netns_name("abc123", "pod_default_web-0").is_err());
        let long = pod_netns_name("abc123", &"n".repeat(63), &"p".repeat(253));
        assert!(long.len() <= NETNS_NAME_MAX && long.starts_with("trellis-abc123-pod_"));
        assert_ne!(
            long,
            pod_netns_name("abc123", &"n".repeat(63), &"q".repeat(253))
        );
    }

    #[test]
    fn config_round_trips() {
        let tmp = tempfile::Builder::new()
            .prefix("trellis-dp-")
            .tempdir()
            .unwrap();
        let sbx = Sandbox::new(tmp.path());
        assert_eq!(DatapathConfig::read(&sbx).unwrap(), None);
        let config = DatapathConfig {
            tag: "abc123".into(),
            underlay_netns: "trellis-abc123-underlay".into(),
            repo_root: "/repo".into(),
            agents: true,
            agent_binary: Some("/repo/target/debug/trellis-node".into()),
            agent_log_filter: None,
            agent_ready_timeout_ms: 120_000,
            cni_plugin_binary: Some("/repo/target/debug/trellis".into()),
            cni_plugins_dir: None,
        };
        config.write(&sbx).unwrap();
        assert_eq!(DatapathConfig::read(&sbx).unwrap(), Some(config));
    }
}
