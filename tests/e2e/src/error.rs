//! The one error type of the sandbox library. Every variant names what it was doing and on
//! what (process, file, tool), and process failures carry the tail of that process's log, so
//! a failed test run says why without anyone opening the state directory.

use std::{fmt, path::PathBuf, time::Duration};

/// Result with the sandbox [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while building, starting, probing or ending the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Generating or signing a certificate or key failed.
    #[error("cannot generate {what}: {source}")]
    Certificate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },

    /// `tests/e2e/tools/build.sh` could not be run or did not print a usable binary path.
    #[error("cannot build {tool} with {}: {reason}", script.display())]
    BuildTool {
        tool: &'static str,
        script: PathBuf,
        reason: String,
    },

    /// An environment variable names a binary that is not an executable file.
    #[error("{var}={} is not an executable file", path.display())]
    BinaryOverride { var: &'static str, path: PathBuf },

    /// No free port could be reserved on the loopback address.
    #[error("cannot reserve a free port on 127.0.0.1: {source}")]
    FreePort {
        #[source]
        source: std::io::Error,
    },

    /// A control-plane process could not be started at all.
    #[error("cannot start {name} ({}): {source}", binary.display())]
    Spawn {
        name: String,
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A control-plane process exited while we were waiting for it to become ready.
    #[error(
        "{name} (pid {pid}) exited with {status} before it was ready; last lines of {}:\n{tail}",
        log.display()
    )]
    ProcessExited {
        name: String,
        pid: u32,
        status: String,
        log: PathBuf,
        tail: String,
    },

    /// A control-plane process kept running but never passed its readiness probe.
    #[error(
        "{name} (pid {pid}) not ready after {timeout:?} (last probe: {last_probe}); last lines of {}:\n{tail}",
        log.display()
    )]
    NotReady {
        name: String,
        pid: u32,
        timeout: Duration,
        last_probe: String,
        log: PathBuf,
        tail: String,
    },

    /// A recorded process did not go away after SIGTERM and SIGKILL.
    #[error("cannot end {name} (pid {pid}): {reason}")]
    Terminate {
        name: String,
        pid: u32,
        reason: String,
    },

    /// A pid file is unreadable or malformed.
    #[error("pid file {} is malformed: {reason}", path.display())]
    PidFile { path: PathBuf, reason: String },

    /// The state directory holds files the sandbox did not create; we refuse to wipe it.
    #[error(
        "{} is not empty and has no {marker} marker, so it is not a trellis sandbox state directory; refusing to wipe it",
        path.display()
    )]
    ForeignStateDir { path: PathBuf, marker: &'static str },

    /// The state directory has no control plane recorded (never started, or already down).
    #[error("no sandbox control plane recorded in {} (run `trellis-sandbox up`)", path.display())]
    NotStarted { path: PathBuf },

    /// The sandbox's endpoints file could not be read or written.
    #[error("endpoints file {}: {source}", path.display())]
    Endpoints {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// The generated kubeconfig could not be loaded into a client configuration.
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },

    /// A kube client call failed.
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },

    /// A YAML document (of the CRD directory or a sample) could not be parsed.
    #[error("{}: document {index}: {source}", path.display())]
    CrdParse {
        path: PathBuf,
        index: usize,
        #[source]
        source: serde_yaml::Error,
    },

    /// A CRD did not reach `Established=True` in time.
    #[error("CRD {name} not Established after {timeout:?}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    CrdNotEstablished {
        name: String,
        timeout: Duration,
        detail: Option<String>,
    },

    /// A sandbox node cannot be added as asked.
    #[error("node {name}: {reason}")]
    InvalidNode { name: String, reason: String },

    /// An external command (`ip`, `ip netns exec`) could not be run or failed.
    #[error("`{command}` {reason}{}", if stderr.trim().is_empty() { String::new() } else { format!(": {}", stderr.trim()) })]
    Command {
        command: String,
        /// `exited with exit status: 2`, or why it could not be run.
        reason: String,
        stderr: String,
    },

    /// The sandbox's datapath (network namespaces, underlay, node agents) cannot do what was
    /// asked: it is switched off, or a node has no namespace, or a name or address does not fit.
    #[error("datapath of the sandbox in {}: {reason}", path.display())]
    Datapath { path: PathBuf, reason: String },

    /// A sandbox pod cannot be added, found or removed as asked.
    #[error("pod {pod}: {reason}")]
    InvalidPod { pod: String, reason: String },

    /// Running a node's CNI configuration failed (a plugin's error JSON is in `source`).
    #[error("{context}: {source}")]
    Cni {
        context: String,
        #[source]
        source: Box<crate::cni_runtime::CniError>,
    },

    /// A node's network did not become ready (no conflist in its CNI conf dir) in time.
    #[error("node {node}: network not ready after {timeout:?}: no *.conflist in {}{}", conf_dir.display(), if detail.is_empty() { String::new() } else { format!(" ({detail})") })]
    NetworkNotReady {
        node: String,
        conf_dir: PathBuf,
        timeout: Duration,
        detail: String,
    },

    /// A sandbox component's credentials could not be made (see [`crate::access`]).
    #[error("{action}: {reason}")]
    Access { action: String, reason: String },

    /// Several independent steps failed (teardown keeps going and reports all of them).
    #[error("{}", ErrorList(.0))]
    Many(Vec<Error>),
}

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn kube(action: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube {
            action: action.into(),
            source,
        }
    }

    /// The CNI error inside, if this is one (e.g. to look at a plugin's error code).
    pub fn cni(&self) -> Option<&crate::cni_runtime::CniError> {
        match self {
            Error::Cni { source, .. } => Some(source),
            _ => None,
        }
    }

    /// Collapse a list of errors from independent steps: `Ok` if empty, the error itself if
    /// one, [`Error::Many`] otherwise.
    pub(crate) fn from_list(mut errors: Vec<Error>) -> Result<()> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(Error::Many(errors)),
        }
    }
}

struct ErrorList<'a>(&'a [Error]);

impl fmt::Display for ErrorList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} errors:", self.0.len())?;
        for e in self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}
