//! Installs the CNI plugin for the container runtime: the binary into
//! `--cni-bin-dir` and the network configuration into `--cni-conf-dir`.
//!
//! ```text
//!  --cni-plugin-source ──copy (tmp, fsync, 0755, rename)──▶ <cni-bin-dir>/trellis
//!  conflist(socket) ─────write (tmp, fsync, rename)───────▶ <cni-conf-dir>/10-trellis.conflist
//! ```
//!
//! Runs once the socket listens and the node's facts are known, so a
//! runtime that sees the configuration finds a node ready to answer. Each
//! file is written only when its content differs, so restarts leave the
//! runtime's file watches quiet.

use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::files;

/// The plugin's file name in `--cni-bin-dir` (the conflist's `type`).
pub const PLUGIN_NAME: &str = "trellis";
/// The network configuration's file name: runtimes take the first file in
/// lexical order, and `10-` comes before the usual `87-`/`99-` defaults.
pub const CONFLIST_NAME: &str = "10-trellis.conflist";
/// The network's name.
pub const NETWORK_NAME: &str = "trellis";
/// The CNI spec version of the configuration.
pub const CNI_VERSION: &str = "1.1.0";

/// Where to install from and to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    pub plugin_source: PathBuf,
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// The socket the plugin connects to (written into the conflist).
    pub socket: PathBuf,
}

/// What an install wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    pub plugin: bool,
    pub conflist: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot install the CNI plugin: cannot {action} {}: {source}", path.display())]
pub struct InstallError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Conflist<'a> {
    cni_version: &'a str,
    name: &'a str,
    plugins: (TrellisPlugin<'a>, PortmapPlugin),
}

#[derive(Serialize)]
struct TrellisPlugin<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    socket: &'a str,
}

#[derive(Serialize)]
struct PortmapPlugin {
    #[serde(rename = "type")]
    kind: &'static str,
    capabilities: Capabilities,
    snat: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Capabilities {
    port_mappings: bool,
}

/// The network configuration: the trellis plugin, then portmap for
/// `hostPort`s. Pure.
pub fn conflist(socket: &Path) -> String {
    let socket = socket.to_string_lossy();
    let c = Conflist {
        cni_version: CNI_VERSION,
        name: NETWORK_NAME,
        plugins: (
            TrellisPlugin {
                kind: PLUGIN_NAME,
                socket: &socket,
            },
            PortmapPlugin {
                kind: "portmap",
                capabilities: Capabilities {
                    port_mappings: true,
                },
                snat: true,
            },
        ),
    };
    // Strings and booleans always serialize.
    let mut out = serde_json::to_string_pretty(&c).unwrap_or_default();
    out.push('\n');
    out
}

impl Install {
    /// Copies the plugin and writes the conflist, each only if it differs.
    /// Blocks on file I/O.
    pub fn run(&self) -> Result<Installed, InstallError> {
        let fail = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| InstallError {
                action,
                path,
                source,
            }
        };
        let binary =
            std::fs::read(&self.plugin_source).map_err(fail("read", &self.plugin_source))?;
        for dir in [&self.bin_dir, &self.conf_dir] {
            std::fs::create_dir_all(dir).map_err(fail("create", dir))?;
        }
        let plugin_path = self.bin_dir.join(PLUGIN_NAME);
        let plugin = files::write_if_changed(&plugin_path, &binary, 0o755)
            .map_err(fail("write", &plugin_path))?;
        let conf_path = self.conf_dir.join(CONFLIST_NAME);
        let conflist =
            files::write_if_changed(&conf_path, conflist(&self.socket).as_bytes(), 0o644)
                .map_err(fail("write", &conf_path))?;
        Ok(Installed { plugin, conflist })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_conflist_chains_portmap_after_trellis() {
        let text = conflist(Path::new("/run/trellis/cni.sock"));
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "cniVersion": "1.1.0",
                "name": "trellis",
                "plugins": [
                    {"type": "trellis", "socket": "/run/trellis/cni.sock"},
                    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
                ]
            })
        );
        // Key order as written: cniVersion first, type first in each plugin.
        assert!(text.starts_with("{\n  \"cniVersion\": \"1.1.0\",\n  \"name\": \"trellis\""));
        assert!(
            text.contains("\"type\": \"trellis\",\n      \"socket\""),
            "{text}"
        );
    }

    #[test]
    fn install_copies_writes_and_then_leaves_alone() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src-trellis");
        std::fs::write(&source, b"#!/bin/sh\nexit 0\n").unwrap();
        let install = Install {
            plugin_source: source.clone(),
            bin_dir: dir.path().join("opt/cni/bin"),
            conf_dir: dir.path().join("etc/cni/net.d"),
            socket: "/run/trellis/cni.sock".into(),
        };
        assert_eq!(
            install.run().unwrap(),
            Installed {
                plugin: true,
                conflist: true
            }
        );
        let plugin = install.bin_dir.join("trellis");
        assert_eq!(std::fs::read(&plugin).unwrap(), b"#!/bin/sh\nexit 0\n");
        assert_eq!(
            std::fs::metadata(&plugin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let conf = std::fs::read_to_string(install.conf_dir.join(CONFLIST_NAME)).unwrap();
        assert_eq!(conf, conflist(Path::new("/run/trellis/cni.sock")));
        assert_eq!(
            install.run().unwrap(),
            Installed {
                plugin: false,
                conflist: false
            },
            "nothing changed, nothing written"
        );
        std::fs::write(&source, b"#!/bin/sh\nexit 1\n").unwrap();
        let moved = Install {
            socket: "/run/other/cni.sock".into(),
            ..install.clone()
        };
        assert_eq!(
            moved.run().unwrap(),
            Installed {
                plugin: true,
                conflist: true
            }
        );
        let left: Vec<String> = std::fs::read_dir(&install.conf_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, [CONFLIST_NAME], "no temporary file left");

        let missing = Install {
            plugin_source: dir.path().join("nope"),
            ..install
        };
        let err = missing.run().unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
