//! The one mapping from what went wrong to the spec's error result:
//!
//! ```text
//!  Error ──code()/msg/details()──▶ Failure { cniVersion? } ──render()──▶
//!      {"cniVersion": "1.1.0", "code": 7, "msg": "...", "details": "..."}  (stdout, exit 1)
//! ```
//!
//! `msg` says what is wrong and names the variable, field or socket; `details`
//! carries the rule or the underlying OS error, so an operator reading the
//! kubelet's event knows what to change.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::CniVersion;
use crate::proto::{ErrorReply, code};

/// Everything the plugin can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Required `CNI_*` variables are unset or empty.
    #[error("{} not set (required for {command})", missing_list(.vars))]
    MissingEnv {
        vars: Vec<&'static str>,
        command: &'static str,
    },
    /// A `CNI_*` variable is set but its value is unusable.
    #[error("{var}={value:?} is invalid: {problem}")]
    InvalidEnv {
        var: &'static str,
        value: String,
        problem: String,
    },
    /// A `CNI_*` variable is not UTF-8.
    #[error("{var} is not valid UTF-8")]
    NonUtf8Env { var: String },
    /// Reading the configuration from stdin failed.
    #[error("failed to read the network configuration from stdin")]
    ReadStdin {
        #[source]
        source: io::Error,
    },
    /// More than [`crate::config::MAX_CONFIG`] bytes on stdin.
    #[error("the network configuration on stdin is larger than {limit} bytes")]
    ConfigTooLarge { limit: usize },
    /// stdin is not JSON (serde's message carries line and column).
    #[error("failed to decode the network configuration: {source}")]
    Decode {
        #[source]
        source: serde_json::Error,
    },
    /// stdin is JSON, but not an object.
    #[error("the network configuration is a JSON {found}, not an object")]
    NotAnObject { found: &'static str },
    /// A configuration field has the wrong type or value.
    #[error("invalid network configuration: {field}: {problem}")]
    InvalidConfig { field: String, problem: String },
    /// The configuration's `cniVersion` is not one we speak, or too old for
    /// the command.
    #[error("{problem}")]
    IncompatibleVersion { problem: String },
    /// trellis-node could not be reached, or did not answer in time.
    #[error("trellis-node is unreachable at {}", .socket.display())]
    Unreachable {
        socket: PathBuf,
        /// What we were doing: `connect`, `send request`, `read response`.
        stage: &'static str,
        #[source]
        source: io::Error,
    },
    /// trellis-node did not answer within `timeoutSeconds`.
    #[error("trellis-node at {} did not answer within {}s", .socket.display(), .timeout.as_secs())]
    TimedOut {
        socket: PathBuf,
        stage: &'static str,
        timeout: Duration,
    },
    /// STATUS: trellis-node is unreachable, so ADD cannot be served.
    #[error("trellis-node is unreachable at {}, so ADD cannot be served", .socket.display())]
    StatusUnreachable { socket: PathBuf, reason: String },
    /// STATUS: trellis-node answered that it cannot serve ADD yet;
    /// `limited` when pods already there may have limited connectivity (51).
    #[error("trellis-node is not ready to serve ADD: {message}")]
    NotReady { limited: bool, message: String },
    /// trellis-node answered with an error, already in the spec's terms.
    #[error("{}", .0.msg)]
    Node(ErrorReply),
    /// CHECK: the endpoint differs from the runtime's `prevResult`.
    #[error("the pod's endpoint differs from prevResult: {what}")]
    Mismatch { what: String },
    /// trellis-node answered something the protocol does not allow here.
    #[error("trellis-node sent an invalid response: {problem}")]
    Protocol { problem: String },
}

fn missing_list(vars: &[&'static str]) -> String {
    match vars {
        [one] => format!("{one} is"),
        many => format!("{} are", many.join(", ")),
    }
}

impl Error {
    /// The spec's (or our 100+) error code.
    pub fn code(&self) -> u32 {
        match self {
            Error::MissingEnv { .. } | Error::InvalidEnv { .. } | Error::NonUtf8Env { .. } => {
                code::INVALID_ENVIRONMENT
            }
            Error::ReadStdin { .. } => code::IO_FAILURE,
            Error::ConfigTooLarge { .. } | Error::Decode { .. } | Error::NotAnObject { .. } => {
                code::DECODING_FAILURE
            }
            Error::InvalidConfig { .. } => code::INVALID_CONFIG,
            Error::IncompatibleVersion { .. } => code::INCOMPATIBLE_VERSION,
            Error::Unreachable { .. } | Error::TimedOut { .. } => code::TRY_AGAIN_LATER,
            Error::NotReady { limited: true, .. } => code::LIMITED_CONNECTIVITY,
            Error::StatusUnreachable { .. } | Error::NotReady { .. } => code::PLUGIN_NOT_AVAILABLE,
            Error::Node(reply) => reply.code,
            Error::Mismatch { .. } => code::ENDPOINT_MISMATCH,
            Error::Protocol { .. } => code::INTERNAL,
        }
    }

    /// The spec's `details`: the rule that was broken or the OS error.
    pub fn details(&self) -> String {
        match self {
            Error::MissingEnv { .. } => {
                "the container runtime must set these CNI_* variables (CNI spec, section 2)".into()
            }
            Error::InvalidEnv { .. } | Error::NonUtf8Env { .. } => String::new(),
            Error::ReadStdin { source } => source.to_string(),
            Error::ConfigTooLarge { .. } => {
                "trellis reads at most this many bytes of configuration; a larger one is not a \
                 trellis network configuration"
                    .into()
            }
            Error::Decode { .. } | Error::NotAnObject { .. } => {
                "stdin must hold the network configuration as one JSON object".into()
            }
            Error::InvalidConfig { .. } | Error::IncompatibleVersion { .. } => format!(
                "trellis supports cniVersion {}",
                crate::config::SUPPORTED_VERSIONS.join(", ")
            ),
            Error::Unreachable { stage, source, .. } => format!(
                "{stage}: {source}; is trellis-node running on this node, and is `socket` in the \
                 network configuration its CNI socket?"
            ),
            Error::TimedOut { stage, .. } => {
                format!("{stage}: timed out; raise `timeoutSeconds` if trellis-node is just slow")
            }
            Error::StatusUnreachable { reason, .. } => reason.clone(),
            Error::NotReady { .. } => String::new(),
            Error::Node(reply) => reply.details.clone(),
            Error::Mismatch { .. } => {
                "the runtime's cached ADD result and trellis-node's endpoint record disagree; the \
                 pod needs to be recreated"
                    .into()
            }
            Error::Protocol { .. } => {
                "the trellis CNI binary and trellis-node may be of different versions".into()
            }
        }
    }
}

/// An [`Error`] together with the configuration's `cniVersion`, when one was
/// read: what the binary prints.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Failure {
    /// `None` until a supported `cniVersion` was read (then "1.1.0" is
    /// reported, the newest we speak).
    pub cni_version: Option<CniVersion>,
    #[source]
    pub error: Error,
}

impl Failure {
    pub fn new(cni_version: Option<CniVersion>, error: Error) -> Self {
        Failure { cni_version, error }
    }

    pub fn code(&self) -> u32 {
        self.error.code()
    }

    /// The spec's error result.
    pub fn render(&self) -> ErrorResult {
        ErrorResult {
            cni_version: self.cni_version.unwrap_or(CniVersion::LATEST).to_string(),
            code: self.error.code(),
            msg: self.error.to_string(),
            details: self.error.details(),
        }
    }

    /// [`Failure::render`] as one line of JSON.
    pub fn to_json(&self) -> String {
        self.render().to_json()
    }
}

/// The spec's error result structure (section 5, "Error").
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResult {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl ErrorResult {
    pub fn to_json(&self) -> String {
        // Strings and integers only: serializing cannot fail, but fall back to
        // a fixed, valid document rather than panic.
        serde_json::to_string(self).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"{}","code":{},"msg":"internal error","details":""}}"#,
                CniVersion::LATEST,
                code::INTERNAL
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_err(kind: io::ErrorKind) -> io::Error {
        io::Error::from(kind)
    }

    #[test]
    fn every_error_maps_to_its_spec_code() {
        let socket = PathBuf::from("/run/trellis/cni.sock");
        let json_err = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        let cases: Vec<(Error, u32)> = vec![
            (
                Error::MissingEnv {
                    vars: vec!["CNI_NETNS"],
                    command: "ADD",
                },
                4,
            ),
            (
                Error::InvalidEnv {
                    var: "CNI_IFNAME",
                    value: "a/b".into(),
                    problem: "contains '/'".into(),
                },
                4,
            ),
            (
                Error::ReadStdin {
                    source: io_err(io::ErrorKind::Interrupted),
                },
                5,
            ),
            (Error::ConfigTooLarge { limit: 10 }, 6),
            (Error::Decode { source: json_err }, 6),
            (Error::NotAnObject { found: "array" }, 6),
            (
                Error::InvalidConfig {
                    field: "type".into(),
                    problem: "x".into(),
                },
                7,
            ),
            (
                Error::IncompatibleVersion {
                    problem: "x".into(),
                },
                1,
            ),
            (
                Error::Unreachable {
                    socket: socket.clone(),
                    stage: "connect",
                    source: io_err(io::ErrorKind::NotFound),
                },
                11,
            ),
            (
                Error::TimedOut {
                    socket: socket.clone(),
                    stage: "read response",
                    timeout: Duration::from_secs(3),
                },
                11,
            ),
            (
                Error::StatusUnreachable {
                    socket,
                    reason: "x".into(),
                },
                50,
            ),
            (
                Error::NotReady {
                    limited: false,
                    message: "no block".into(),
                },
                50,
            ),
            (
                Error::NotReady {
                    limited: true,
                    message: "routes to 2 peers missing".into(),
                },
                51,
            ),
            (Error::Node(ErrorReply::new(100, "full", "")), 100),
            (Error::Mismatch { what: "x".into() }, 101),
            (
                Error::Protocol {
                    problem: "x".into(),
                },
                999,
            ),
        ];
        for (error, want) in cases {
            assert_eq!(error.code(), want, "{error:?}");
        }
    }

    #[test]
    fn renders_the_spec_error_json_with_the_known_version() {
        let f = Failure::new(
            Some(CniVersion::V0_4_0),
            Error::MissingEnv {
                vars: vec!["CNI_CONTAINERID", "CNI_IFNAME"],
                command: "ADD",
            },
        );
        let v: serde_json::Value = serde_json::from_str(&f.to_json()).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["code"], 4);
        assert_eq!(
            v["msg"],
            "CNI_CONTAINERID, CNI_IFNAME are not set (required for ADD)"
        );
        assert!(v["details"].as_str().unwrap().contains("CNI_*"));
    }

    #[test]
    fn renders_the_latest_version_when_none_was_read() {
        let f = Failure::new(None, Error::ConfigTooLarge { limit: 1 << 20 });
        let r = f.render();
        assert_eq!(r.cni_version, "1.1.0");
        assert_eq!(r.code, 6);
        assert_eq!(
            r.msg,
            "the network configuration on stdin is larger than 1048576 bytes"
        );
    }

    #[test]
    fn unreachable_names_the_socket_and_carries_the_os_error() {
        let f = Failure::new(
            None,
            Error::Unreachable {
                socket: "/run/trellis/cni.sock".into(),
                stage: "connect",
                source: io::Error::from_raw_os_error(111),
            },
        );
        let r = f.render();
        assert_eq!(r.code, 11);
        assert_eq!(
            r.msg,
            "trellis-node is unreachable at /run/trellis/cni.sock"
        );
        assert!(
            r.details.starts_with("connect: Connection refused"),
            "{}",
            r.details
        );
    }

    #[test]
    fn node_errors_pass_through_as_is() {
        let f = Failure::new(
            Some(CniVersion::V1_0_0),
            Error::Node(ErrorReply::new(
                100,
                "no free address",
                "block 10.0.0.0/26 is full",
            )),
        );
        assert_eq!(
            f.render(),
            ErrorResult {
                cni_version: "1.0.0".into(),
                code: 100,
                msg: "no free address".into(),
                details: "block 10.0.0.0/26 is full".into(),
            }
        );
    }
}
