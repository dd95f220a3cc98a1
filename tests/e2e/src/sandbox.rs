//! The sandbox's state directory: what runs (pid files), where it listens (endpoints), how to
//! reach it (kubeconfig, PKI) and what it said (logs). Everything a later command needs to find,
//! check or end the sandbox lives here, so `up`, `status` and `down` can be separate processes.
//!
//! ```text
//! <state>/
//!   .trellis-sandbox        marker: only a directory holding it is ever wiped
//!   endpoints.json          ports and URLs of etcd, kube-apiserver and the operator's metrics
//!   kubeconfig              admin kubeconfig (credentials embedded)
//!   pki/                    CA, serving and client certificates, service-account keys
//!   pids/<name>.pid         pid, binary and start time of every process we started
//!                           (node agents: trellis-node-agent-<node>)
//!   logs/<name>.log         stdout+stderr of each process
//!   etcd/                   etcd data
//!   datapath.json           the sandbox has a datapath: tag, underlay, how agents run
//!   netns/<netns>.json      one per network namespace we created (see crate::datapath);
//!                           a pod's record is the sandbox's record of the pod
//!   nodes/<node>/           what would be on the node's own disk (see NodeDirs):
//!     state/ run/cni.sock   trellis-node's --state-dir and --run-dir (its endpoint socket)
//!     net.d/ bin/           the CNI conf and bin dirs it installs into
//!     cni-cache/            the runtime's results cache (a host's /var/lib/cni)
//!   bpffs/                  a bpf filesystem mounted here (with the datapath; crate::bpffs)
//!     <node>/               the node's pin directory (a host's /sys/fs/bpf; NodeDirs::bpffs)
//! ```

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    agent, bpffs, controlplane,
    datapath::{self, DatapathConfig},
    error::{Error, Result},
    process::{self, Ended, PidRecord, Process},
};

/// Default state directory of the CLI.
pub const DEFAULT_STATE_DIR: &str = "/tmp/trellis-sandbox";
/// Environment variable overriding [`DEFAULT_STATE_DIR`].
pub const STATE_DIR_ENV: &str = "TRELLIS_SANDBOX_DIR";
/// File that marks a directory as ours, so we may wipe it.
pub const MARKER: &str = ".trellis-sandbox";
/// How long a process gets between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(10);

/// Longest path of a unix socket: `sun_path` holds 108 bytes, the last one a NUL.
pub const UNIX_SOCKET_PATH_MAX: usize = 107;

/// A node's own directories in the state directory: what a real node has on its disk as
/// `/var/lib/trellis`, `/run/trellis`, `/etc/cni/net.d`, `/opt/cni/bin`, `/var/lib/cni` and
/// `/sys/fs/bpf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDirs {
    /// `<state>/nodes/<node>`.
    pub root: PathBuf,
    /// `trellis-node --state-dir`: its endpoint records.
    pub state: PathBuf,
    /// `trellis-node --run-dir`: the endpoint socket `cni.sock`.
    pub run: PathBuf,
    /// `trellis-node --cni-conf-dir`: where it writes `10-trellis.conflist` once ready.
    pub conf: PathBuf,
    /// `trellis-node --cni-bin-dir`: where it installs the `trellis` plugin; the first entry
    /// of the pods' `CNI_PATH`.
    pub bin: PathBuf,
    /// The container runtime's results cache (libcni's `/var/lib/cni`).
    pub cni_cache: PathBuf,
    /// `<state>/bpffs/<node>`: where the node's `trellis-node` pins its BPF maps and links
    /// (its `--bpffs-root`), a directory on the sandbox's bpffs (see [`crate::bpffs`]). Not
    /// under [`NodeDirs::root`]: one bpffs serves every node.
    pub bpffs: PathBuf,
}

impl NodeDirs {
    /// The directories of node `node` in the sandbox `sandbox` (nothing is created).
    pub fn of(sandbox: &Sandbox, node: &str) -> Self {
        let root = sandbox.nodes_dir().join(node);
        NodeDirs {
            state: root.join("state"),
            run: root.join("run"),
            conf: root.join("net.d"),
            bin: root.join("bin"),
            cni_cache: root.join("cni-cache"),
            bpffs: sandbox.bpffs_dir().join(node),
            root,
        }
    }

    /// `<root>/kubeconfig`: the node's `trellis-node` authenticates with it, as its
    /// ServiceAccount with a token bound to its Node (see [`crate::access`]).
    pub fn kubeconfig(&self) -> PathBuf {
        self.root.join("kubeconfig")
    }

    /// `<run>/cni.sock`: where the node's `trellis-node` serves the CNI plugin.
    pub fn socket(&self) -> PathBuf {
        self.run.join("cni.sock")
    }

    /// Why the socket path cannot be bound, if it is too long for a unix socket.
    pub fn check_socket_path(&self) -> std::result::Result<(), String> {
        let socket = self.socket();
        let len = socket.as_os_str().len();
        if len > UNIX_SOCKET_PATH_MAX {
            return Err(format!(
                "its endpoint socket {} would be {len} bytes long, and a unix socket path has at                  most {UNIX_SOCKET_PATH_MAX}: use a shorter state directory or node name",
                socket.display()
            ));
        }
        Ok(())
    }

    /// Create every directory. The pin directory only on a mounted bpffs: pins in a plain
    /// directory would fail, or worse, outlive the sandbox's teardown.
    pub fn create(&self) -> Result<()> {
        for dir in [
            &self.root,
            &self.state,
            &self.run,
            &self.conf,
            &self.bin,
            &self.cni_cache,
        ] {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
        }
        let bpffs_root = self.bpffs.parent().unwrap_or(&self.bpffs);
        if !bpffs::is_mounted(bpffs_root)? {
            return Err(Error::InvalidNode {
                name: self.node_name(),
                reason: format!(
                    "no bpffs is mounted at {} for its pin directory (a sandbox started by an \
                     older trellis-sandbox? `down`, then `up` again)",
                    bpffs_root.display()
                ),
            });
        }
        match std::fs::create_dir(&self.bpffs) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(Error::io("create", &self.bpffs, e)),
        }
    }

    /// Delete them all, the pins in the pin directory too; gone already is fine. Keeps going
    /// past a failure and reports every one.
    pub fn remove(&self) -> Result<()> {
        let mut errors = Vec::new();
        for dir in [&self.root, &self.bpffs] {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(Error::io("remove", dir, e)),
            }
        }
        Error::from_list(errors)
    }

    fn node_name(&self) -> String {
        self.root
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    }
}

/// Where the control plane listens; written by `up`, read by `status` and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    /// `https://127.0.0.1:<port>`
    pub apiserver_url: String,
    pub apiserver_port: u16,
    /// `http://127.0.0.1:<port>`
    pub etcd_client_url: String,
    pub etcd_client_port: u16,
    pub etcd_peer_port: u16,
    /// Port of `trellis-operator`'s `/metrics`, `/healthz` and `/readyz` on 127.0.0.1, if the
    /// sandbox runs the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_metrics_port: Option<u16>,
}

/// A sandbox state directory.
#[derive(Debug, Clone)]
pub struct Sandbox {
    dir: PathBuf,
}

impl Sandbox {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Sandbox { dir: dir.into() }
    }

    /// `$TRELLIS_SANDBOX_DIR`, else [`DEFAULT_STATE_DIR`].
    pub fn default_dir() -> PathBuf {
        std::env::var_os(STATE_DIR_ENV)
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin's kubeconfig (`system:masters`): for the test harness and `kubectl`.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The operator's kubeconfig: a token of its own ServiceAccount (see [`crate::access`]).
    pub fn operator_kubeconfig_path(&self) -> PathBuf {
        self.dir.join("operator.kubeconfig")
    }

    pub fn endpoints_path(&self) -> PathBuf {
        self.dir.join("endpoints.json")
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    pub fn pids_dir(&self) -> PathBuf {
        self.dir.join("pids")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    pub fn etcd_data_dir(&self) -> PathBuf {
        self.dir.join("etcd")
    }

    pub fn pid_path(&self, name: &str) -> PathBuf {
        self.pids_dir().join(format!("{name}.pid"))
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.logs_dir().join(format!("{name}.log"))
    }

    /// `datapath.json`: present if the sandbox has a datapath (see [`DatapathConfig`]).
    pub fn datapath_config_path(&self) -> PathBuf {
        self.dir.join("datapath.json")
    }

    /// `netns/`: one record per network namespace the sandbox created.
    pub fn netns_records_dir(&self) -> PathBuf {
        self.dir.join("netns")
    }

    pub fn netns_record_path(&self, netns: &str) -> PathBuf {
        self.netns_records_dir().join(format!("{netns}.json"))
    }

    /// `nodes/`: each node's own directories (see [`NodeDirs`]).
    pub fn nodes_dir(&self) -> PathBuf {
        self.dir.join("nodes")
    }

    /// `bpffs/`: where a sandbox with a datapath mounts its bpf filesystem (see
    /// [`crate::bpffs`]); each node pins under its own subdirectory ([`NodeDirs::bpffs`]).
    pub fn bpffs_dir(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    /// Mount the sandbox's bpffs at [`Sandbox::bpffs_dir`] unless it is mounted already.
    pub fn mount_bpffs(&self) -> Result<bool> {
        bpffs::mount(&self.bpffs_dir())
    }

    /// Unmount every bpffs at [`Sandbox::bpffs_dir`], found by that path (so also the one a
    /// crashed run left); how many there were. The pins go with it.
    pub fn unmount_bpffs(&self) -> Result<usize> {
        let unmounted = bpffs::unmount(&self.bpffs_dir())?;
        if unmounted > 0 {
            tracing::debug!(dir = %self.bpffs_dir().display(), unmounted, "unmounted the sandbox's bpffs");
        }
        Ok(unmounted)
    }

    /// Node `node`'s own directories (see [`NodeDirs`]).
    pub fn node_dirs(&self, node: &str) -> NodeDirs {
        NodeDirs::of(self, node)
    }

    /// Starts `binary` as the sandbox's process `name`: output to
    /// [`Sandbox::log_path`], recorded at [`Sandbox::pid_path`] so `down` and
    /// the next `up` can end it. `env`: `(key, Some(value))` sets a variable,
    /// `(key, None)` removes it.
    pub fn spawn(
        &self,
        name: &str,
        binary: &Path,
        args: &[String],
        env: &[(&str, Option<&str>)],
    ) -> Result<Process> {
        Process::spawn_with_env(
            name,
            binary,
            args,
            env,
            &self.log_path(name),
            &self.pid_path(name),
        )
    }

    /// Every pid file under `pids/`, in the order processes should be ended: clients of the
    /// apiserver (the operator, the node agents) first, then the apiserver, storage last.
    pub fn recorded_processes(&self) -> Result<Vec<PidRecord>> {
        let dir = self.pids_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list", dir, e)),
        };
        let mut records = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| Error::io("list", &dir, e))?.path();
            if path.extension().is_some_and(|ext| ext == "pid") {
                records.push(PidRecord::read(&path)?);
            }
        }
        records.sort_by(|a, b| (stop_rank(&a.name), &a.name).cmp(&(stop_rank(&b.name), &b.name)));
        Ok(records)
    }

    /// End every recorded process (by pid, identity-checked) and remove its pid file. Keeps
    /// going past failures and reports all of them; a pid file whose process could not be
    /// ended stays, so a later run can try again.
    pub fn end_recorded_processes(&self) -> Result<Vec<Ended>> {
        self.end_recorded(|_| true)
    }

    /// [`Sandbox::end_recorded_processes`] for the node agents only (`trellis-node-agent-*`).
    pub fn end_recorded_agents(&self) -> Result<Vec<Ended>> {
        self.end_recorded(|name| agent::node_of(name).is_some())
    }

    fn end_recorded(&self, which: impl Fn(&str) -> bool) -> Result<Vec<Ended>> {
        let mut ended = Vec::new();
        let mut errors = Vec::new();
        for record in self
            .recorded_processes()?
            .into_iter()
            .filter(|r| which(&r.name))
        {
            match process::end(&record, None, TERM_GRACE) {
                Ok(outcome) => {
                    // Agents are started with their `Child` handle dropped; if this program
                    // started one, collect it.
                    if agent::node_of(&record.name).is_some()
                        && matches!(
                            outcome,
                            process::Outcome::Terminated | process::Outcome::Killed
                        )
                    {
                        process::reap(record.pid);
                    }
                    tracing::debug!(name = %record.name, pid = record.pid, %outcome, "ended recorded process");
                    if let Err(e) = process::remove_pid_file(&self.pid_path(&record.name)) {
                        errors.push(e);
                    }
                    ended.push(Ended { record, outcome });
                }
                Err(e) => errors.push(e),
            }
        }
        Error::from_list(errors).map(|()| ended)
    }

    /// Delete every network namespace recorded under `netns/`, by name (node namespaces first,
    /// the underlay last), with its record. Keeps going past failures and reports all of them;
    /// the record of a namespace that could not be deleted stays. Returns the names of those
    /// that existed. End the node agents first: a running agent keeps its namespace alive.
    pub fn delete_recorded_namespaces(&self) -> Result<Vec<String>> {
        // Records are only ever written into a directory that carries the marker.
        if self.netns_records_dir().exists() && !self.dir.join(MARKER).is_file() {
            return Err(Error::ForeignStateDir {
                path: self.dir.clone(),
                marker: MARKER,
            });
        }
        let deleted = datapath::delete_recorded(self)?;
        for name in &deleted {
            tracing::debug!(netns = %name, "deleted recorded network namespace");
        }
        Ok(deleted)
    }

    /// Make the directory a fresh, empty sandbox: end whatever an earlier run left running,
    /// delete the network namespaces it recorded, unmount its bpffs, wipe the old state (only
    /// if it carries our marker) and lay out the subdirectories.
    pub fn reset(&self) -> Result<Vec<Ended>> {
        let ended = self.end_recorded_processes()?;
        self.delete_recorded_namespaces()?;
        self.unmount_bpffs()?;
        self.remove()?;
        for dir in [
            self.dir.clone(),
            self.pids_dir(),
            self.logs_dir(),
            self.pki_dir(),
        ] {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        }
        let marker = self.dir.join(MARKER);
        std::fs::write(
            &marker,
            "trellis sandbox state directory; `trellis-sandbox down` removes it\n",
        )
        .map_err(|e| Error::io("write", &marker, e))?;
        Ok(ended)
    }

    /// Delete the state directory. Refuses a non-empty directory without our marker, and one
    /// with anything mounted inside (deleting would walk into the mount); a missing directory
    /// is fine.
    pub fn remove(&self) -> Result<()> {
        let is_empty = match std::fs::read_dir(&self.dir) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("list", &self.dir, e)),
        };
        if !is_empty && !self.dir.join(MARKER).is_file() {
            return Err(Error::ForeignStateDir {
                path: self.dir.clone(),
                marker: MARKER,
            });
        }
        let mounted = bpffs::mounts_under(&self.dir)?;
        if !mounted.is_empty() {
            return Err(Error::Datapath {
                path: self.dir.clone(),
                reason: format!(
                    "refusing to delete the state directory while something is mounted inside \
                     it: {} (umount it first)",
                    mounted
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        std::fs::remove_dir_all(&self.dir).map_err(|e| Error::io("remove", &self.dir, e))
    }

    /// End every recorded process, delete every recorded network namespace, unmount the
    /// sandbox's bpffs, then delete the state directory unless `keep_state`.
    pub fn down(&self, keep_state: bool) -> Result<Vec<Ended>> {
        let ended = self.end_recorded_processes()?;
        self.delete_recorded_namespaces()?;
        self.unmount_bpffs()?;
        if !keep_state {
            self.remove()?;
        }
        Ok(ended)
    }

    pub fn write_endpoints(&self, endpoints: &Endpoints) -> Result<()> {
        let path = self.endpoints_path();
        let text = serde_json::to_string_pretty(endpoints).map_err(|source| Error::Endpoints {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, text + "\n").map_err(|e| Error::io("write", &path, e))
    }

    /// The recorded endpoints, `None` if the sandbox was never started here.
    pub fn endpoints(&self) -> Result<Option<Endpoints>> {
        let path = self.endpoints_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| Error::Endpoints { path, source })
    }

    /// Which recorded processes run, where the apiserver is and whether it is ready.
    pub async fn status(&self) -> Result<Status> {
        let processes: Vec<ProcessStatus> = self
            .recorded_processes()?
            .into_iter()
            .map(ProcessStatus::of)
            .collect();
        let datapath = DatapathConfig::read(self)?;
        let mut nodes = Vec::new();
        for node in datapath::recorded_nodes(self)? {
            let agent = processes
                .iter()
                .find(|p| agent::node_of(&p.record.name) == Some(node.node.as_str()))
                .cloned();
            let agent_healthz = match (&agent, node.agent_metrics_port) {
                (Some(p), Some(port)) if p.state == ProcessState::Running => Some(
                    agent::healthz(port, Duration::from_secs(5))
                        .await
                        .map(|()| "ok".to_string()),
                ),
                _ => None,
            };
            nodes.push(NodeStatus {
                netns_present: datapath::netns_exists(&node.netns),
                agent,
                agent_healthz,
                node,
            });
        }
        let endpoints = self.endpoints()?;
        let operator_readyz = match endpoints.as_ref().and_then(|e| e.operator_metrics_port) {
            Some(port) => Some(
                crate::operator::readyz(port, Duration::from_secs(5))
                    .await
                    .map(|()| "ok".to_string()),
            ),
            None => None,
        };
        let readyz = if endpoints.is_none() || !self.kubeconfig_path().is_file() {
            Err("no control plane recorded".to_string())
        } else {
            match crate::kubeconfig::client(&self.kubeconfig_path()).await {
                Ok(client) => controlplane::readyz(&client, Duration::from_secs(5)).await,
                Err(e) => Err(e.to_string()),
            }
        };
        let bpffs_mounted = match &datapath {
            Some(_) => Some(bpffs::is_mounted(&self.bpffs_dir())?),
            None => None,
        };
        Ok(Status {
            dir: self.dir.clone(),
            processes,
            endpoints,
            readyz,
            operator_readyz,
            datapath,
            bpffs_mounted,
            nodes,
        })
    }
}

/// The apiserver's clients (the operator, the node agents: rank 0) go first, storage last, so
/// that each shuts down while what it talks to is still there.
fn stop_rank(name: &str) -> u8 {
    use crate::binaries::Tool;
    if name == Tool::Etcd.name() {
        2
    } else if name == Tool::KubeApiserver.name() {
        1
    } else {
        0
    }
}

/// Whether a recorded process is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    Running,
    Gone,
    /// The pid is alive but runs something else now.
    PidReused,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessStatus {
    pub record: PidRecord,
    pub state: ProcessState,
}

impl ProcessStatus {
    /// What `/proc` says about the process `record` describes.
    pub fn of(record: PidRecord) -> Self {
        let state = match process::proc_identity(record.pid) {
            None => ProcessState::Gone,
            Some(seen) if process::identity_matches(&record, &seen) => ProcessState::Running,
            Some(_) => ProcessState::PidReused,
        };
        ProcessStatus { record, state }
    }
}

/// A node's part of the datapath, for `trellis-sandbox status`.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// What the sandbox recorded: namespace, bridge port, address, agent metrics port.
    pub node: datapath::NodeDatapath,
    /// Whether `/run/netns/<netns>` exists.
    pub netns_present: bool,
    /// Its agent's pid record and whether it runs; `None` if none is recorded.
    pub agent: Option<ProcessStatus>,
    /// `ok` if its agent's `GET /healthz` answered 200, or why not; `None` if no agent runs.
    pub agent_healthz: Option<std::result::Result<String, String>>,
}

/// Snapshot for `trellis-sandbox status`.
#[derive(Debug, Clone)]
pub struct Status {
    pub dir: PathBuf,
    pub processes: Vec<ProcessStatus>,
    pub endpoints: Option<Endpoints>,
    /// The body of `GET /readyz` as the admin, or why it failed.
    pub readyz: std::result::Result<String, String>,
    /// `ok` if the operator's `GET /readyz` answered 200, or why not; `None` if the sandbox
    /// runs no operator.
    pub operator_readyz: Option<std::result::Result<String, String>>,
    /// The sandbox's datapath configuration; `None` if it has none.
    pub datapath: Option<DatapathConfig>,
    /// With a datapath: whether its bpffs is mounted at [`Sandbox::bpffs_dir`].
    pub bpffs_mounted: Option<bool>,
    /// Every node with a recorded namespace.
    pub nodes: Vec<NodeStatus>,
}

impl Status {
    /// Every recorded process runs, `/readyz` answered `ok`, every recorded node namespace
    /// exists, the bpffs is mounted (with a datapath) and, if the sandbox runs node agents,
    /// every node's agent answers `/healthz`.
    pub fn healthy(&self) -> bool {
        let agents = self.datapath.as_ref().is_some_and(|d| d.agents);
        !self.processes.is_empty()
            && self
                .processes
                .iter()
                .all(|p| p.state == ProcessState::Running)
            && self.readyz.as_deref().is_ok_and(|body| body.trim() == "ok")
            && self.operator_readyz.as_ref().is_none_or(Result::is_ok)
            && self.bpffs_mounted != Some(false)
            && self.nodes.iter().all(|n| {
                n.netns_present && (!agents || n.agent_healthz.as_ref().is_some_and(Result::is_ok))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("trellis-sbx-")
            .tempdir()
            .unwrap()
    }

    #[test]
    fn reset_lays_out_and_wipes_only_marked_dirs() {
        let tmp = temp();
        let sbx = Sandbox::new(tmp.path().join("state"));
        sbx.reset().unwrap();
        assert!(sbx.pids_dir().is_dir() && sbx.logs_dir().is_dir() && sbx.pki_dir().is_dir());
        std::fs::write(sbx.log_path("etcd"), "old").unwrap();
        sbx.reset().unwrap();
        assert!(!sbx.log_path("etcd").exists(), "reset wipes earlier state");

        // A directory that is not ours is never wiped.
        let foreign = Sandbox::new(tmp.path().join("home"));
        std::fs::create_dir_all(foreign.dir()).unwrap();
        std::fs::write(foreign.dir().join("precious"), "x").unwrap();
        assert!(matches!(
            foreign.reset(),
            Err(Error::ForeignStateDir { .. })
        ));
        assert!(matches!(
            foreign.down(false),
            Err(Error::ForeignStateDir { .. })
        ));
        assert!(foreign.dir().join("precious").exists());

        sbx.down(false).unwrap();
        assert!(!sbx.dir().exists());
        sbx.down(false).unwrap();
    }

    #[test]
    fn records_are_ended_storage_last() {
        let tmp = temp();
        let sbx = Sandbox::new(tmp.path());
        sbx.reset().unwrap();
        for (name, pid) in [
            ("etcd", 10),
            ("kube-apiserver", 11),
            ("a-node", 12),
            ("trellis-operator", 13),
            ("trellis-node-agent-trellis-node-1", 14),
        ] {
            PidRecord {
                name: name.into(),
                pid,
                binary: "/nonexistent".into(),
                starttime: None,
            }
            .write(&sbx.pid_path(name))
            .unwrap();
        }
        let names: Vec<_> = sbx
            .recorded_processes()
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(
            names,
            [
                "a-node",
                "trellis-node-agent-trellis-node-1",
                "trellis-operator",
                "kube-apiserver",
                "etcd"
            ]
        );
    }

    #[test]
    fn reset_ends_recorded_processes_but_not_reused_pids() {
        use crate::process::{Outcome, is_alive, proc_identity};

        let tmp = temp();
        let sbx = Sandbox::new(tmp.path());
        sbx.reset().unwrap();
        let sleep = std::fs::canonicalize("/bin/sleep").unwrap();
        let mut ours = std::process::Command::new(&sleep)
            .arg("600")
            .spawn()
            .unwrap();
        let mut stranger = std::process::Command::new(&sleep)
            .arg("600")
            .spawn()
            .unwrap();
        let record = |name: &str, pid: u32, binary: &Path| PidRecord {
            name: name.into(),
            pid,
            binary: binary.to_path_buf(),
            starttime: proc_identity(pid).unwrap().starttime,
        };
        record("ours", ours.id(), &sleep)
            .write(&sbx.pid_path("ours"))
            .unwrap();
        // What a pid file looks like after the kernel handed its pid to another program.
        record("stranger", stranger.id(), Path::new("/opt/trellis/etcd"))
            .write(&sbx.pid_path("stranger"))
            .unwrap();

        let mut ended = sbx.reset().unwrap();
        ended.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        assert_eq!(ended[0].record.name, "ours");
        assert_eq!(ended[0].outcome, Outcome::Terminated);
        assert_eq!(ended[1].record.name, "stranger");
        assert_eq!(ended[1].outcome, Outcome::PidReused);
        assert!(!is_alive(ours.id()));
        assert!(
            is_alive(stranger.id()),
            "a pid that is not ours must never be signalled"
        );
        assert!(sbx.recorded_processes().unwrap().is_empty());

        ours.wait().unwrap();
        stranger.kill().unwrap();
        stranger.wait().unwrap();
    }

    #[test]
    fn endpoints_round_trip() {
        let tmp = temp();
        let sbx = Sandbox::new(tmp.path());
        assert_eq!(sbx.endpoints().unwrap(), None);
        let ep = Endpoints {
            apiserver_url: "https://127.0.0.1:1".into(),
            apiserver_port: 1,
            etcd_client_url: "http://127.0.0.1:2".into(),
            etcd_client_port: 2,
            etcd_peer_port: 3,
            operator_metrics_port: Some(4),
        };
        sbx.write_endpoints(&ep).unwrap();
        assert_eq!(sbx.endpoints().unwrap(), Some(ep));
        // Written before the sandbox ran an operator.
        std::fs::write(
            sbx.endpoints_path(),
            r#"{"apiserver_url": "https://127.0.0.1:1", "apiserver_port": 1,
                "etcd_client_url": "http://127.0.0.1:2", "etcd_client_port": 2, "etcd_peer_port": 3}"#,
        )
        .unwrap();
        assert_eq!(
            sbx.endpoints().unwrap().unwrap().operator_metrics_port,
            None
        );
    }
}
