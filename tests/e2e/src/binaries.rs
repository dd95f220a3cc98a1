//! Where the sandbox's binaries come from.
//!
//! - The pinned etcd, kube-apiserver, kubectl and cnitool ([`Tool`]): an explicit path in the
//!   environment, else `tests/e2e/tools/build.sh`, which builds them once into a cache outside
//!   the repository and prints the cached path.
//! - The reference CNI plugins (portmap, bridge, host-local, loopback): one cached directory,
//!   usable as an entry of `CNI_PATH` ([`cni_plugins_dir`]), built by the same script.
//! - This workspace's own programs ([`CargoBinary`]: `trellis-operator`, `trellis-node`, the
//!   CNI plugin `trellis`, the kubectl plugin `kubectl-trellis`): an explicit path in the environment, else one `cargo build` of all
//!   their packages' binaries ([`cargo_build_args`]), whichever is asked for.

use std::{
    os::{fd::AsFd as _, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
    process::Stdio,
};

use crate::error::{Error, Result};

/// A pinned program from `tests/e2e/tools/`: the control plane the sandbox
/// runs, the kubectl the tests drive it with (the same Kubernetes
/// version as the apiserver, whatever kubectl the machine has), and the
/// reference `cnitool` (libcni's own runtime, to cross-check the sandbox's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Etcd,
    KubeApiserver,
    Kubectl,
    Cnitool,
}

impl Tool {
    /// The name `build.sh` and the process records use.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Etcd => "etcd",
            Tool::KubeApiserver => "kube-apiserver",
            Tool::Kubectl => "kubectl",
            Tool::Cnitool => "cnitool",
        }
    }

    /// The environment variable that overrides the built binary.
    pub fn env_var(self) -> &'static str {
        match self {
            Tool::Etcd => "TRELLIS_ETCD",
            Tool::KubeApiserver => "TRELLIS_KUBE_APISERVER",
            Tool::Kubectl => "TRELLIS_KUBECTL",
            Tool::Cnitool => "TRELLIS_CNITOOL",
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
    let printed = run_build_script(repo_root, tool.name()).await?;
    executable(&printed).ok_or_else(|| Error::BuildTool {
        tool: tool.name(),
        script: build_script(repo_root),
        reason: format!(
            "printed {}, which is not an executable file",
            printed.display()
        ),
    })
}

/// The environment variable naming a directory of reference CNI plugins to use instead of
/// building them.
pub const CNI_PLUGINS_DIR_ENV: &str = "TRELLIS_CNI_PLUGINS_DIR";
/// The reference plugins [`cni_plugins_dir`] holds (`build.sh` builds exactly these).
pub const CNI_PLUGINS: [&str; 4] = ["bridge", "host-local", "loopback", "portmap"];

/// The directory holding the pinned reference CNI plugins ([`CNI_PLUGINS`]), usable as an
/// entry of `CNI_PATH`: `$TRELLIS_CNI_PLUGINS_DIR` if set, else whatever
/// `bash <repo_root>/tests/e2e/tools/build.sh cni-plugins` prints (cached like the tools).
pub async fn cni_plugins_dir(repo_root: &Path) -> Result<PathBuf> {
    const WHAT: &str = "cni-plugins";
    let dir = match std::env::var_os(CNI_PLUGINS_DIR_ENV).filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => run_build_script(repo_root, WHAT).await?,
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    match CNI_PLUGINS
        .iter()
        .find(|p| executable(&dir.join(p)).is_none())
    {
        None => Ok(dir),
        Some(missing) => Err(Error::BuildTool {
            tool: WHAT,
            script: build_script(repo_root),
            reason: format!(
                "{} has no executable {missing} (from ${CNI_PLUGINS_DIR_ENV} or build.sh)",
                dir.display()
            ),
        }),
    }
}

/// Run `bash <repo_root>/tests/e2e/tools/build.sh <what>` (its progress goes to our stderr, so
/// a cold build is visible) and return the path it printed last.
async fn run_build_script(repo_root: &Path, what: &'static str) -> Result<PathBuf> {
    let script = build_script(repo_root);
    let build_err = |reason: String| Error::BuildTool {
        tool: what,
        script: script.clone(),
        reason,
    };
    let output = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(what)
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
        .ok_or_else(|| build_err("printed no path".into()))?;
    Ok(PathBuf::from(printed))
}

/// `<repo_root>/tests/e2e/tools/build.sh`.
pub fn build_script(repo_root: &Path) -> PathBuf {
    repo_root.join("tests/e2e/tools/build.sh")
}

/// The canonical path of `path` if it is an executable file.
pub fn executable(path: &Path) -> Option<PathBuf> {
    let canonical = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&canonical).ok()?;
    (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(canonical)
}

/// A program of this workspace that the sandbox runs: built with cargo on demand unless an
/// environment variable names a binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CargoBinary {
    /// Cargo package (`-p`).
    pub package: &'static str,
    /// Binary target (`--bin`); also the file name under `<target>/<profile>/`.
    pub bin: &'static str,
    /// Environment variable naming a binary to run instead of building one.
    pub env_var: &'static str,
}

/// `trellis-operator` (`$TRELLIS_OPERATOR` overrides it).
pub const OPERATOR: CargoBinary = CargoBinary {
    package: "trellis-operator",
    bin: "trellis-operator",
    env_var: "TRELLIS_OPERATOR",
};

/// `trellis-node`, the node agent (`$TRELLIS_NODE` overrides it).
pub const NODE_AGENT: CargoBinary = CargoBinary {
    package: "trellis-node",
    bin: "trellis-node",
    env_var: "TRELLIS_NODE",
};

/// `trellis`, the CNI plugin (`$TRELLIS_CNI` overrides it): each `trellis-node` installs it
/// into its node's CNI bin directory (`--cni-plugin-source`).
pub const CNI_PLUGIN: CargoBinary = CargoBinary {
    package: "trellis-cni",
    bin: "trellis",
    env_var: "TRELLIS_CNI",
};

/// `kubectl-trellis`, the kubectl plugin (`$TRELLIS_KUBECTL_PLUGIN` overrides it): the sandbox
/// does not run it, the tests do (`kubectl trellis explain` against the sandbox).
pub const KUBECTL_PLUGIN: CargoBinary = CargoBinary {
    package: "kubectl-trellis",
    bin: "kubectl-trellis",
    env_var: "TRELLIS_KUBECTL_PLUGIN",
};

/// Every program of this workspace the sandbox and the tests run. They are always built
/// together, by one cargo invocation ([`cargo_build_args`]).
pub const WORKSPACE_BINARIES: [CargoBinary; 4] = [OPERATOR, NODE_AGENT, CNI_PLUGIN, KUBECTL_PLUGIN];

/// Whether this crate was built with optimisations; the workspace's programs are then built
/// the same way.
pub fn release_build() -> bool {
    !cfg!(debug_assertions)
}

/// Whether cargo sets the environment variable `name` for the programs it runs (`cargo run`,
/// `cargo test`, and so whatever a test starts), rather than a user setting it to configure a
/// build (`CARGO_HOME`, `CARGO_TARGET_DIR`, `CARGO_PROFILE_*`, … are not).
///
/// The sandbox's `cargo build` runs without them. A build script in the workspace's
/// dependencies (ring's) reruns when `CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, … differ from
/// the last build, and everything above it (rustls, kube, every Trellis crate) compiles again:
/// a build started by a test (where they name `trellis-e2e`) and one from a shell or by
/// `cargo test` itself (where they are unset) would undo each other, some 40 s every time.
pub fn set_by_cargo(name: &str) -> bool {
    const NAMES: [&str; 9] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    const PREFIXES: [&str; 4] = [
        "CARGO_PKG_",
        "CARGO_BIN_EXE_",
        "CARGO_FEATURE_",
        "CARGO_CFG_",
    ];
    NAMES.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The arguments of the one `cargo` invocation that builds every binary of
/// [`WORKSPACE_BINARIES`]: `build -q [--release] -p trellis-operator -p trellis-node
/// -p trellis-cni -p kubectl-trellis --bins`.
///
/// One invocation for all of them, whichever binary is asked for: cargo unifies dependency
/// features over the packages of an invocation, so building the packages one at a time
/// compiles shared dependencies in two configurations that invalidate each other, and every
/// sandbox start would rebuild. Built together, a second build finds everything fresh.
pub fn cargo_build_args() -> Vec<&'static str> {
    let mut args = vec!["build", "-q"];
    if release_build() {
        args.push("--release");
    }
    for binary in WORKSPACE_BINARIES {
        args.extend(["-p", binary.package]);
    }
    args.push("--bins");
    args
}

impl CargoBinary {
    /// The binary: `$<env_var>` if set, else `<target>/<profile>/<bin>` after
    /// `cargo` [`cargo_build_args`] in `repo_root`, which builds every binary of
    /// [`WORKSPACE_BINARIES`] (`--release` when this crate is a release build).
    /// `<target>` is `$CARGO_TARGET_DIR` or `<repo_root>/target`; cargo is `$CARGO` or
    /// `cargo`. Cargo runs without the variables a cargo that started us set ([`set_by_cargo`]),
    /// as from a shell. Cargo's own output goes to our stderr, so a build that takes a while,
    /// or fails, is visible. Building is a no-op when nothing changed, also after resolving
    /// another [`CargoBinary`], and from a test as from a shell.
    pub async fn resolve(&self, repo_root: &Path) -> Result<PathBuf> {
        if let Some(path) = std::env::var_os(self.env_var).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(path);
            return executable(&path).ok_or(Error::BinaryOverride {
                var: self.env_var,
                path,
            });
        }
        let cargo = std::env::var_os("CARGO")
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from("cargo"), PathBuf::from);
        let build_err = |reason: String| Error::BuildTool {
            tool: self.bin,
            script: cargo.clone(),
            reason,
        };
        let args = cargo_build_args();
        // Cargo's stdout would mix into ours, which callers parse; both go to stderr.
        let stderr = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| build_err(format!("cannot duplicate stderr: {e}")))?;
        tracing::info!(command = %format!("{} {}", cargo.display(), args.join(" ")), "building the sandbox's binaries for {}", self.bin);
        let mut command = tokio::process::Command::new(&cargo);
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(set_by_cargo) {
                command.env_remove(&name);
            }
        }
        let status = command
            .args(&args)
            .current_dir(repo_root)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stderr))
            .stderr(Stdio::inherit())
            .status()
            .await
            .map_err(|e| build_err(format!("cannot run it: {e}")))?;
        if !status.success() {
            return Err(build_err(format!(
                "`{} {}` exited with {status} (its output is above)",
                cargo.display(),
                args.join(" ")
            )));
        }
        let built = self.built_path(repo_root);
        executable(&built).ok_or_else(|| {
            build_err(format!(
                "the build succeeded but {} is not an executable file",
                built.display()
            ))
        })
    }

    /// Where `cargo` [`cargo_build_args`] puts the binary for this crate's profile.
    pub fn built_path(&self, repo_root: &Path) -> PathBuf {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .filter(|v| !v.is_empty())
            .map_or_else(|| repo_root.join("target"), |t| repo_root.join(t));
        let profile = if release_build() { "release" } else { "debug" };
        target.join(profile).join(self.bin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_path_follows_the_profile() {
        for binary in WORKSPACE_BINARIES {
            let path = binary.built_path(Path::new("/repo"));
            if std::env::var_os("CARGO_TARGET_DIR").is_none() {
                let profile = if release_build() { "release" } else { "debug" };
                assert_eq!(
                    path,
                    PathBuf::from(format!("/repo/target/{profile}/{}", binary.bin))
                );
            }
            assert!(path.ends_with(binary.bin));
        }
    }

    #[test]
    fn one_cargo_invocation_builds_every_workspace_binary() {
        let args = cargo_build_args();
        assert_eq!(args[..2], ["build", "-q"]);
        assert_eq!(args.contains(&"--release"), release_build());
        assert_eq!(args.last(), Some(&"--bins"));
        let packages: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-p")
            .map(|w| w[1])
            .collect();
        assert_eq!(
            packages,
            [
                "trellis-operator",
                "trellis-node",
                "trellis-cni",
                "kubectl-trellis"
            ]
        );
        for binary in WORKSPACE_BINARIES {
            assert!(packages.contains(&binary.package), "{binary:?}");
        }
        assert!(!args.contains(&"--bin"), "no single binary: {args:?}");
    }

    #[test]
    fn what_cargo_sets_for_a_test_is_not_passed_to_the_build() {
        // This test runs under cargo: it has them.
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        for name in [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_EXE_trellis-sandbox",
            "CARGO_TARGET_TMPDIR",
            "OUT_DIR",
        ] {
            assert!(set_by_cargo(name), "{name}");
        }
        for name in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_PROFILE_RELEASE_DEBUG",
            "CARGO_BUILD_JOBS",
            "CARGO_INCREMENTAL",
            "PATH",
            "RUSTFLAGS",
        ] {
            assert!(!set_by_cargo(name), "{name}");
        }
    }
}
