//! Where the pinned etcd and kube-apiserver binaries come from: an explicit path in the
//! environment, else `tests/e2e/tools/build.sh`, which builds them once into a cache outside
//! the repository and prints the cached path.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
};

use crate::error::{Error, Result};

/// A pinned program from `tests/e2e/tools/`: the control plane the sandbox
/// runs, and the kubectl the tests drive it with (the same Kubernetes
/// version as the apiserver, whatever kubectl the machine has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Etcd,
    KubeApiserver,
    Kubectl,
}

impl Tool {
    /// The name `build.sh` and the process records use.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Etcd => "etcd",
            Tool::KubeApiserver => "kube-apiserver",
            Tool::Kubectl => "kubectl",
        }
    }

    /// The environment variable that overrides the built binary.
    pub fn env_var(self) -> &'static str {
        match self {
            Tool::Etcd => "TRELLIS_ETCD",
            Tool::KubeApiserver => "TRELLIS_KUBE_APISERVER",
            Tool::Kubectl => "TRELLIS_KUBECTL",
        }
    }
}

/// Paths of both control-plane binaries (canonical, so they compare equal to `/proc/<pid>/exe`).
#[derive(Debug, Clone)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
}

impl Binaries {
    /// Resolve both tools (see [`resolve`]).
    pub async fn resolve(repo_root: &Path) -> Result<Self> {
        Ok(Binaries {
            etcd: resolve(Tool::Etcd, repo_root).await?,
            kube_apiserver: resolve(Tool::KubeApiserver, repo_root).await?,
        })
    }
}

/// The binary for `tool`: `$TRELLIS_ETCD` / `$TRELLIS_KUBE_APISERVER` if set, else whatever
/// `bash <repo_root>/tests/e2e/tools/build.sh <tool>` prints (its progress goes to our stderr,
/// so a cold build is visible).
pub async fn resolve(tool: Tool, repo_root: &Path) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(tool.env_var()).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return executable(&path).ok_or(Error::BinaryOverride {
            var: tool.env_var(),
            path,
        });
    }

    let script = build_script(repo_root);
    let build_err = |reason: String| Error::BuildTool {
        tool: tool.name(),
        script: script.clone(),
        reason,
    };
    let output = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(tool.name())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .map_err(|e| build_err(format!("cannot run bash: {e}")))?;
    if !output.status.success() {
        return Err(build_err(format!(
            "exited with {} (its output is above)",
            output.status
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let printed = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .ok_or_else(|| build_err("printed no binary path".into()))?;
    executable(Path::new(printed)).ok_or_else(|| {
        build_err(format!(
            "printed {printed:?}, which is not an executable file"
        ))
    })
}

/// `<repo_root>/tests/e2e/tools/build.sh`.
pub fn build_script(repo_root: &Path) -> PathBuf {
    repo_root.join("tests/e2e/tools/build.sh")
}

/// The canonical path of `path` if it is an executable file.
pub(crate) fn executable(path: &Path) -> Option<PathBuf> {
    let canonical = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&canonical).ok()?;
    (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(canonical)
}
