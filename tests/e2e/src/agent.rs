//! `trellis-node`, the node agent, in the sandbox: which binary, its command line, and its
//! probes. One runs per node of a sandbox with a datapath, started in the ROOT network
//! namespace (it enters the node's namespace itself, on its own threads: `ip netns exec`
//! would hide bpffs) as a detached, recorded process like the operator.
//!
//! ```text
//! $TRELLIS_NODE ──or── cargo build -q [--release] -p trellis-operator -p trellis-node
//!                                        -p trellis-cni --bins
//!         │
//!         ▼
//! trellis-node --node-name <node> --host-netns /run/netns/trellis-<tag>-<node>
//!              --kubeconfig <node dir>/kubeconfig --metrics-addr 127.0.0.1:<free>
//!              --state-dir <node dir>/state --run-dir <node dir>/run
//!              --cni-conf-dir <node dir>/net.d --cni-bin-dir <node dir>/bin
//!              --cni-plugin-source <the built `trellis`>       (<node dir>: <state>/nodes/<node>)
//!         │      pids/trellis-node-agent-<node>.pid, logs/trellis-node-agent-<node>.log
//!         ├── started when GET /healthz answers 200 (its loop runs)
//!         ├── GET /readyz answers 200 once it has reconciled its node (needs the operator)
//!         └── <node dir>/net.d/10-trellis.conflist once it serves pods (the kubelet's signal
//!             that the node's network is ready)
//! ```
//!
//! The endpoint flags (`--state-dir` … `--cni-plugin-source`) are passed to a `trellis-node`
//! whose `--help` lists them; an older binary gets the first four flags only.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    controlplane::{self, free_port},
    datapath::NodeDatapath,
    error::Result,
    operator,
    process::PidRecord,
    sandbox::{NodeDirs, Sandbox},
};

/// Process names of node agents in the state directory are this plus the node name.
pub const NAME_PREFIX: &str = "trellis-node-agent-";
/// Environment variable naming a `trellis-node` to run instead of building one.
pub const BINARY_ENV: &str = crate::binaries::NODE_AGENT.env_var;
/// Limit for one probe request.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The process name of `node`'s agent (`pids/<name>.pid`, `logs/<name>.log`).
pub fn process_name(node: &str) -> String {
    format!("{NAME_PREFIX}{node}")
}

/// The node whose agent the process `name` is, if it is one.
pub fn node_of(name: &str) -> Option<&str> {
    name.strip_prefix(NAME_PREFIX).filter(|n| !n.is_empty())
}

/// How to run the node agents in the sandbox.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Binary to run; `None`: `$TRELLIS_NODE`, else built with cargo (see [`resolve`]).
    pub binary: Option<PathBuf>,
    /// `RUST_LOG` for the agents; `None` removes an inherited `RUST_LOG`, so they log at their
    /// own default level.
    pub log_filter: Option<String>,
}

/// A node agent the sandbox started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub node: String,
    pub record: PidRecord,
    /// Its `/metrics`, `/healthz` and `/readyz` on 127.0.0.1.
    pub metrics_port: u16,
}

/// The agent's command line (its CLI contract).
pub fn args(node: &str, host_netns: &Path, kubeconfig: &Path, metrics_port: u16) -> Vec<String> {
    vec![
        "--node-name".into(),
        node.into(),
        "--host-netns".into(),
        host_netns.display().to_string(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--metrics-addr".into(),
        format!("127.0.0.1:{metrics_port}"),
    ]
}

/// The endpoint server's part of the agent's command line: its node's directories (state,
/// runtime, CNI configuration and binaries, the pin directory of its policy datapath) and the
/// CNI plugin it installs.
pub fn endpoint_args(dirs: &NodeDirs, cni_plugin: &Path) -> Vec<String> {
    let d = |p: &Path| p.display().to_string();
    vec![
        "--bpffs-root".into(),
        d(&dirs.bpffs),
        "--state-dir".into(),
        d(&dirs.state),
        "--run-dir".into(),
        d(&dirs.run),
        "--cni-conf-dir".into(),
        d(&dirs.conf),
        "--cni-bin-dir".into(),
        d(&dirs.bin),
        "--cni-plugin-source".into(),
        d(cni_plugin),
    ]
}

/// The agent binary: `$TRELLIS_NODE` if set, else built with cargo in `repo_root` (see
/// [`CargoBinary::resolve`](crate::binaries::CargoBinary::resolve)).
pub async fn resolve(repo_root: &Path) -> Result<PathBuf> {
    crate::binaries::NODE_AGENT.resolve(repo_root).await
}

/// `Ok` once the agent's `GET /healthz` answers 200 (its loop runs).
pub async fn healthz(port: u16, timeout: Duration) -> std::result::Result<(), String> {
    operator::probe(port, "/healthz", timeout).await
}

/// `Ok` once the agent's `GET /readyz` answers 200 (it has reconciled its node).
pub async fn readyz(port: u16, timeout: Duration) -> std::result::Result<(), String> {
    operator::probe(port, "/readyz", timeout).await
}

/// Start `node`'s agent as a recorded process and wait for its `/healthz`; a port taken
/// between picking and binding it is retried with another. `kubeconfig`: its credentials
/// (see [`crate::access::node_kubeconfig`]). `endpoint`: the endpoint server's flags
/// ([`endpoint_args`]), if the binary has them.
pub(crate) async fn start(
    sandbox: &Sandbox,
    binary: &Path,
    node: &NodeDatapath,
    kubeconfig: &Path,
    endpoint: &[String],
    log_filter: Option<&str>,
    timeout: Duration,
) -> Result<Agent> {
    let name = process_name(&node.node);
    // Its log is a file: no colour codes in it.
    let env = [("RUST_LOG", log_filter), ("NO_COLOR", Some("1"))];
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = free_port()?;
        let mut args = args(&node.node, &node.netns_path(), kubeconfig, port);
        args.extend_from_slice(endpoint);
        let mut process = sandbox.spawn(&name, binary, &args, &env)?;
        let ready =
            controlplane::wait_ready(&mut process, timeout, || healthz(port, PROBE_TIMEOUT)).await;
        if !controlplane::retry_on_port_clash(ready, attempt, &mut process, sandbox)? {
            // Detached: it outlives this handle and is ended by its pid file.
            return Ok(Agent {
                node: node.node.clone(),
                record: process.record.clone(),
                metrics_port: port,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_and_names() {
        assert_eq!(
            args(
                "trellis-node-1",
                Path::new("/run/netns/trellis-abc123-trellis-node-1"),
                Path::new("/s/kubeconfig"),
                4242
            ),
            [
                "--node-name",
                "trellis-node-1",
                "--host-netns",
                "/run/netns/trellis-abc123-trellis-node-1",
                "--kubeconfig",
                "/s/kubeconfig",
                "--metrics-addr",
                "127.0.0.1:4242",
            ]
        );
        let name = process_name("trellis-node-1");
        assert_eq!(name, "trellis-node-agent-trellis-node-1");
        assert_eq!(node_of(&name), Some("trellis-node-1"));
        assert_eq!(node_of("trellis-operator"), None);
        assert_eq!(node_of(NAME_PREFIX), None);
    }

    #[test]
    fn endpoint_flags_name_the_node_dirs() {
        let sandbox = Sandbox::new("/s");
        let dirs = sandbox.node_dirs("trellis-node-1");
        assert_eq!(
            endpoint_args(&dirs, Path::new("/t/trellis")),
            [
                "--bpffs-root",
                "/s/bpffs/trellis-node-1",
                "--state-dir",
                "/s/nodes/trellis-node-1/state",
                "--run-dir",
                "/s/nodes/trellis-node-1/run",
                "--cni-conf-dir",
                "/s/nodes/trellis-node-1/net.d",
                "--cni-bin-dir",
                "/s/nodes/trellis-node-1/bin",
                "--cni-plugin-source",
                "/t/trellis",
            ]
        );
        assert_eq!(
            dirs.socket(),
            Path::new("/s/nodes/trellis-node-1/run/cni.sock")
        );
        assert!(dirs.check_socket_path().is_ok());
        let long = Sandbox::new(format!("/{}", "x".repeat(80))).node_dirs("trellis-node-1");
        assert!(long.check_socket_path().unwrap_err().contains("107"));
    }
}
