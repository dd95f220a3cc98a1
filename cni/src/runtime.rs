//! The container runtime's side, for tests: build the `CNI_*` environment
//! and the network configuration, run the binary, read what it printed.
//!
//! ```text
//!  RuntimeCall::add(..).pod(..) + net_conf(..) ──exec()──▶ trellis ──▶ PluginOutput { exit code, stdout, stderr }
//! ```
//!
//! Like containernetworking/plugins' `testutils`, but a test dependency only
//! in spirit: the plugin itself never calls this.

use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;

use serde_json::{Value, json};

use crate::config::{CniVersion, PLUGIN_TYPE};
use crate::env::{self, CniCommand, Vars};
use crate::error::ErrorResult;
use crate::proto::PodRef;

/// The plugin path runtimes commonly pass.
pub const DEFAULT_CNI_PATH: &str = "/opt/cni/bin";

/// The environment of one plugin execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeCall {
    vars: Vars,
}

impl RuntimeCall {
    /// `CNI_COMMAND` and `CNI_PATH` only: STATUS, GC and VERSION.
    pub fn new(command: CniCommand) -> Self {
        let mut vars = Vars::new();
        vars.insert(env::CNI_COMMAND.into(), command.as_str().into());
        vars.insert(env::CNI_PATH.into(), DEFAULT_CNI_PATH.into());
        RuntimeCall { vars }
    }

    /// ADD, CHECK or DEL of `(container_id, ifname)` in `netns`.
    pub fn attachment(command: CniCommand, container_id: &str, netns: &str, ifname: &str) -> Self {
        RuntimeCall::new(command)
            .set(env::CNI_CONTAINERID, container_id)
            .set(env::CNI_NETNS, netns)
            .set(env::CNI_IFNAME, ifname)
    }

    pub fn add(container_id: &str, netns: &str, ifname: &str) -> Self {
        RuntimeCall::attachment(CniCommand::Add, container_id, netns, ifname)
    }

    pub fn check(container_id: &str, netns: &str, ifname: &str) -> Self {
        RuntimeCall::attachment(CniCommand::Check, container_id, netns, ifname)
    }

    pub fn del(container_id: &str, netns: &str, ifname: &str) -> Self {
        RuntimeCall::attachment(CniCommand::Del, container_id, netns, ifname)
    }

    /// `CNI_ARGS` as the kubelet (via containerd or CRI-O) sets it.
    pub fn pod(self, pod: &PodRef) -> Self {
        let mut args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            pod.namespace,
            pod.name,
            self.vars
                .get(env::CNI_CONTAINERID)
                .map(String::as_str)
                .unwrap_or_default()
        );
        if let Some(uid) = &pod.uid {
            args.push_str(";K8S_POD_UID=");
            args.push_str(uid);
        }
        self.set(env::CNI_ARGS, &args)
    }

    /// Sets any variable (also to an invalid value, for error tests).
    pub fn set(mut self, name: &str, value: &str) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    pub fn unset(mut self, name: &str) -> Self {
        self.vars.remove(name);
        self
    }

    pub fn vars(&self) -> &Vars {
        &self.vars
    }

    /// Runs the plugin binary with exactly these `CNI_*` variables (the rest
    /// of the environment cleared) and `stdin`, and waits for it.
    pub fn exec(&self, binary: &Path, stdin: &[u8]) -> io::Result<PluginOutput> {
        let mut child = Command::new(binary)
            .env_clear()
            .envs(&self.vars)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let input = stdin.to_vec();
        let writer = child.stdin.take().map(|mut pipe| {
            // The plugin may stop reading early (too-large input, VERSION):
            // a broken pipe here is the plugin's business, not an error.
            thread::spawn(move || {
                let _ = pipe.write_all(&input);
            })
        });
        let out = child.wait_with_output()?;
        if let Some(writer) = writer {
            let _ = writer.join();
        }
        Ok(PluginOutput {
            exit_code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// A network configuration for trellis as a runtime passes it.
pub fn net_conf(version: CniVersion, name: &str, socket: &Path) -> Value {
    json!({
        "cniVersion": version.as_str(),
        "name": name,
        "type": PLUGIN_TYPE,
        "socket": socket.to_string_lossy(),
    })
}

/// What one execution of the plugin produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginOutput {
    /// `None` when killed by a signal.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl PluginOutput {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// stdout as JSON.
    pub fn json(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(&self.stdout)
    }

    /// stdout as the spec's error result.
    pub fn error(&self) -> Result<ErrorResult, serde_json::Error> {
        serde_json::from_str(&self.stdout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_kubelet_style_environment() {
        let call = RuntimeCall::add("abc", "/run/netns/x", "eth0").pod(&PodRef {
            namespace: "default".into(),
            name: "web".into(),
            uid: Some("u-1".into()),
        });
        let v = call.vars();
        assert_eq!(v["CNI_COMMAND"], "ADD");
        assert_eq!(v["CNI_PATH"], DEFAULT_CNI_PATH);
        assert_eq!(
            v["CNI_ARGS"],
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
        );
        let env = env::parse(CniCommand::Add, v).unwrap();
        assert_eq!(env.pod.unwrap().uid.as_deref(), Some("u-1"));
        assert!(
            !RuntimeCall::new(CniCommand::Gc)
                .unset("CNI_PATH")
                .vars()
                .contains_key("CNI_PATH")
        );
    }
}
