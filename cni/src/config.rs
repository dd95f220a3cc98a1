//! The network configuration the runtime streams on stdin.
//!
//! ```text
//!  stdin ──read_stdin() (≤ MAX_CONFIG+1 bytes)──▶ bytes ──decode()──▶ JSON object ──parse()──▶ NetConf
//!                                                  code 5 / 6            code 6          code 1 / 7
//! ```
//!
//! Fields are taken one at a time from the decoded object so that a wrong one
//! is reported by name (serde alone says only "invalid type"). Unknown fields
//! are allowed, as the spec requires.

use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use crate::env::CniCommand;
use crate::error::Error;
use crate::proto::Attachment;

/// The most configuration we read from stdin.
pub const MAX_CONFIG: usize = 1 << 20;
/// Where trellis-node listens unless the configuration says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/trellis/cni.sock";
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 30;
pub const MAX_TIMEOUT_SECONDS: u64 = 300;
/// The configuration's `type`: this binary's name.
pub const PLUGIN_TYPE: &str = "trellis";
/// The GC command's list of attachments that are still in use.
pub const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";
/// What VERSION reports, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
/// `sockaddr_un.sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// A CNI spec version this plugin speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub const LATEST: CniVersion = CniVersion::V1_1_0;
    pub const ALL: [CniVersion; 3] = [CniVersion::V0_4_0, CniVersion::V1_0_0, CniVersion::V1_1_0];

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    pub fn parse(s: &str) -> Option<CniVersion> {
        CniVersion::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for CniVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The parts of the network configuration trellis uses.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: CniVersion,
    /// The network's name; trellis-node keys endpoints by it too.
    pub name: String,
    /// trellis-node's unix socket (ours: `socket`).
    pub socket: String,
    /// How long to wait for trellis-node (ours: `timeoutSeconds`).
    pub timeout_seconds: u64,
    pub disable_check: bool,
    pub disable_gc: bool,
    /// The previous result, unparsed: its schema depends on the command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
    /// GC's still-valid attachments (`cni.dev/valid-attachments`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

impl NetConf {
    pub fn socket_path(&self) -> &Path {
        Path::new(&self.socket)
    }

    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_seconds)
    }
}

/// Reads stdin up to `limit + 1` bytes, so a too-large configuration is
/// detected without reading all of it.
pub fn read_stdin(reader: impl Read, limit: usize) -> Result<Vec<u8>, Error> {
    let mut buf = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(cap)
        .read_to_end(&mut buf)
        .map_err(|source| Error::ReadStdin { source })?;
    Ok(buf)
}

/// stdin as a JSON object: code 6 if it is too large, not JSON, or not an
/// object.
pub fn decode(stdin: &[u8]) -> Result<Map<String, Value>, Error> {
    if stdin.len() > MAX_CONFIG {
        return Err(Error::ConfigTooLarge { limit: MAX_CONFIG });
    }
    match serde_json::from_slice::<Value>(stdin).map_err(|source| Error::Decode { source })? {
        Value::Object(map) => Ok(map),
        other => Err(Error::NotAnObject {
            found: json_kind(&other),
        }),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The configuration's `cniVersion` if it is one we speak, for error results.
pub fn sniff_version(doc: &Map<String, Value>) -> Option<CniVersion> {
    doc.get("cniVersion")
        .and_then(Value::as_str)
        .and_then(CniVersion::parse)
}

/// The `cniVersion` VERSION echoes: whatever version-looking string stdin
/// has (the spec says "the value of cniVersion specified on input"), else
/// the latest. VERSION never fails on its stdin.
pub fn version_for_version_command(stdin: &[u8]) -> String {
    decode(stdin)
        .ok()
        .and_then(|doc| {
            doc.get("cniVersion")
                .and_then(Value::as_str)
                .filter(|s| is_semver_like(s))
                .map(str::to_string)
        })
        .unwrap_or_else(|| CniVersion::LATEST.to_string())
}

fn is_semver_like(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 9 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes `name` from the object and deserializes it; JSON `null` counts as
/// absent. A wrong type is code 7 naming the field.
fn take<T: DeserializeOwned>(doc: &mut Map<String, Value>, name: &str) -> Result<Option<T>, Error> {
    match doc.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| invalid(name, e.to_string())),
    }
}

fn invalid(field: &str, problem: impl Into<String>) -> Error {
    Error::InvalidConfig {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The configuration, validated: code 1 for a version we do not speak, 7 for
/// any field with a wrong type or value.
pub fn parse(mut doc: Map<String, Value>) -> Result<NetConf, Error> {
    let supported = SUPPORTED_VERSIONS.join(", ");
    let cni_version = match take::<String>(&mut doc, "cniVersion")? {
        None => {
            return Err(Error::IncompatibleVersion {
                problem: format!(
                    "the network configuration has no cniVersion (which means 0.1.0); trellis \
                     supports {supported}"
                ),
            });
        }
        Some(v) => CniVersion::parse(&v).ok_or_else(|| Error::IncompatibleVersion {
            problem: format!("cniVersion {v:?} is not supported; trellis supports {supported}"),
        })?,
    };
    let name = take::<String>(&mut doc, "name")?.ok_or_else(|| invalid("name", "missing"))?;
    crate::env::validate_container_id(&name).map_err(|problem| invalid("name", problem))?;
    let kind = take::<String>(&mut doc, "type")?.ok_or_else(|| invalid("type", "missing"))?;
    if kind != PLUGIN_TYPE {
        return Err(invalid(
            "type",
            format!("is {kind:?}, but this is the {PLUGIN_TYPE:?} plugin"),
        ));
    }
    let socket = take::<String>(&mut doc, "socket")?.unwrap_or_else(|| DEFAULT_SOCKET.into());
    if !socket.starts_with('/') {
        return Err(invalid(
            "socket",
            format!("{socket:?} is not an absolute path"),
        ));
    }
    if socket.len() > MAX_SOCKET_PATH || socket.contains('\0') {
        return Err(invalid(
            "socket",
            format!(
                "{socket:?} is not a usable unix socket path (at most {MAX_SOCKET_PATH} bytes, \
                 no NUL)"
            ),
        ));
    }
    let timeout_seconds =
        take::<u64>(&mut doc, "timeoutSeconds")?.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
    if !(1..=MAX_TIMEOUT_SECONDS).contains(&timeout_seconds) {
        return Err(invalid(
            "timeoutSeconds",
            format!("{timeout_seconds} is not between 1 and {MAX_TIMEOUT_SECONDS}"),
        ));
    }
    let disable_check = take::<bool>(&mut doc, "disableCheck")?.unwrap_or(false);
    let disable_gc = take::<bool>(&mut doc, "disableGC")?.unwrap_or(false);
    // Not used by trellis, but a runtime that sends them malformed is broken.
    for field in ["runtimeConfig", "args"] {
        take::<Map<String, Value>>(&mut doc, field)?;
    }
    let prev_result = match doc.remove("prevResult") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v),
        Some(other) => {
            return Err(invalid(
                "prevResult",
                format!("is a JSON {}, not an object", json_kind(&other)),
            ));
        }
    };
    let valid_attachments = take::<Vec<Attachment>>(&mut doc, VALID_ATTACHMENTS)?;
    Ok(NetConf {
        cni_version,
        name,
        socket,
        timeout_seconds,
        disable_check,
        disable_gc,
        prev_result,
        valid_attachments,
    })
}

/// What the command needs of the configuration's version: CHECK came with
/// 0.4.0, STATUS and GC with 1.1.0 (as libcni's skeleton enforces).
pub fn check_command(conf: &NetConf, command: CniCommand) -> Result<(), Error> {
    let needs = match command {
        CniCommand::Check => CniVersion::V0_4_0,
        CniCommand::Status | CniCommand::Gc => CniVersion::V1_1_0,
        CniCommand::Add | CniCommand::Del | CniCommand::Version => return Ok(()),
    };
    if conf.cni_version < needs {
        return Err(Error::IncompatibleVersion {
            problem: format!(
                "cniVersion {} does not allow {command}; it needs {needs} or later",
                conf.cni_version
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(v: Value) -> Result<NetConf, Error> {
        match v {
            Value::Object(map) => parse(map),
            _ => panic!("test input must be an object"),
        }
    }

    fn minimal(version: &str) -> Value {
        json!({"cniVersion": version, "name": "trellis", "type": "trellis"})
    }

    #[test]
    fn parses_a_minimal_config_with_defaults() {
        for v in SUPPORTED_VERSIONS {
            let c = conf(minimal(v)).unwrap();
            assert_eq!(c.cni_version.as_str(), v);
            assert_eq!(c.name, "trellis");
            assert_eq!(c.socket, DEFAULT_SOCKET);
            assert_eq!(c.timeout_seconds, 30);
            assert!(!c.disable_check && !c.disable_gc);
            assert_eq!(c.prev_result, None);
            assert_eq!(c.valid_attachments, None);
        }
    }

    #[test]
    fn parses_every_field_and_allows_unknown_ones() {
        let c = conf(json!({
            "cniVersion": "1.1.0",
            "cniVersions": ["1.0.0", "1.1.0"],
            "name": "pods",
            "type": "trellis",
            "socket": "/var/run/trellis/other.sock",
            "timeoutSeconds": 5,
            "disableCheck": true,
            "disableGC": true,
            "runtimeConfig": {"portMappings": []},
            "args": {"cni": {"ips": ["10.0.0.1"]}},
            "ipam": {},
            "prevResult": {"cniVersion": "1.1.0", "interfaces": []},
            "cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}],
            "somethingElse": [1, 2, 3],
        }))
        .unwrap();
        assert_eq!(c.name, "pods");
        assert_eq!(c.socket, "/var/run/trellis/other.sock");
        assert_eq!(c.timeout(), std::time::Duration::from_secs(5));
        assert!(c.disable_check && c.disable_gc);
        assert!(c.prev_result.is_some());
        assert_eq!(
            c.valid_attachments,
            Some(vec![Attachment {
                container_id: "abc".into(),
                ifname: "eth0".into(),
            }])
        );
    }

    #[test]
    fn rejects_versions_we_do_not_speak_with_code_1() {
        let cases = [
            (
                json!({"name": "n", "type": "trellis"}),
                "the network configuration has no cniVersion (which means 0.1.0); trellis \
                 supports 0.4.0, 1.0.0, 1.1.0",
            ),
            (
                minimal("0.3.1"),
                "cniVersion \"0.3.1\" is not supported; trellis supports 0.4.0, 1.0.0, 1.1.0",
            ),
            (
                minimal("2.0.0"),
                "cniVersion \"2.0.0\" is not supported; trellis supports 0.4.0, 1.0.0, 1.1.0",
            ),
        ];
        for (input, msg) in cases {
            let e = conf(input).unwrap_err();
            assert_eq!(e.code(), 1);
            assert_eq!(e.to_string(), msg);
            assert_eq!(
                e.details(),
                "trellis supports cniVersion 0.4.0, 1.0.0, 1.1.0"
            );
        }
    }

    #[test]
    fn wrong_fields_are_code_7_and_named() {
        let with = |field: &str, value: Value| {
            let mut v = minimal("1.1.0");
            v[field] = value;
            v
        };
        let cases = [
            (
                with("cniVersion", json!(1)),
                "cniVersion: invalid type: integer `1`, expected a string",
            ),
            (
                json!({"cniVersion": "1.0.0", "type": "trellis"}),
                "name: missing",
            ),
            (
                with("name", json!("-x")),
                "name: must start with a letter or digit, not '-'",
            ),
            (
                with("name", json!(["x"])),
                "name: invalid type: sequence, expected a string",
            ),
            (json!({"cniVersion": "1.0.0", "name": "n"}), "type: missing"),
            (
                with("type", json!("bridge")),
                "type: is \"bridge\", but this is the \"trellis\" plugin",
            ),
            (
                with("socket", json!("run/cni.sock")),
                "socket: \"run/cni.sock\" is not an absolute path",
            ),
            (
                with("socket", json!(format!("/{}", "a".repeat(107)))),
                &format!(
                    "socket: \"/{}\" is not a usable unix socket path (at most 107 bytes, no NUL)",
                    "a".repeat(107)
                ),
            ),
            (
                with("timeoutSeconds", json!(0)),
                "timeoutSeconds: 0 is not between 1 and 300",
            ),
            (
                with("timeoutSeconds", json!(301)),
                "timeoutSeconds: 301 is not between 1 and 300",
            ),
            (
                with("timeoutSeconds", json!(-1)),
                "timeoutSeconds: invalid value: integer `-1`, expected u64",
            ),
            (
                with("timeoutSeconds", json!("30")),
                "timeoutSeconds: invalid type: string \"30\", expected u64",
            ),
            (
                with("disableCheck", json!("true")),
                "disableCheck: invalid type: string \"true\", expected a boolean",
            ),
            (
                with("disableGC", json!(1)),
                "disableGC: invalid type: integer `1`, expected a boolean",
            ),
            (
                with("runtimeConfig", json!([])),
                "runtimeConfig: invalid type: sequence, expected a map",
            ),
            (
                with("prevResult", json!("x")),
                "prevResult: is a JSON string, not an object",
            ),
            (
                with(VALID_ATTACHMENTS, json!([{"containerID": "a"}])),
                "cni.dev/valid-attachments: missing field `ifname`",
            ),
        ];
        for (input, problem) in cases {
            let e = conf(input).unwrap_err();
            assert_eq!(e.code(), 7, "{e}");
            assert_eq!(
                e.to_string(),
                format!("invalid network configuration: {problem}")
            );
        }
    }

    #[test]
    fn null_fields_count_as_absent() {
        let mut v = minimal("1.0.0");
        v["socket"] = Value::Null;
        v["prevResult"] = Value::Null;
        let c = conf(v).unwrap();
        assert_eq!(c.socket, DEFAULT_SOCKET);
        assert_eq!(c.prev_result, None);
    }

    #[test]
    fn decoding_failures_are_code_6_with_line_and_column() {
        let e = decode(b"{\n  \"cniVersion\": \"1.1.0\",\n  oops\n}").unwrap_err();
        assert_eq!(e.code(), 6);
        assert_eq!(
            e.to_string(),
            "failed to decode the network configuration: key must be a string at line 3 column 3"
        );
        let e = decode(b"").unwrap_err();
        assert_eq!(e.code(), 6);
        assert!(e.to_string().contains("EOF while parsing"), "{e}");
        let e = decode(b"[1]").unwrap_err();
        assert_eq!(e.code(), 6);
        assert_eq!(
            e.to_string(),
            "the network configuration is a JSON array, not an object"
        );
        let deep = "[".repeat(10_000);
        assert_eq!(decode(deep.as_bytes()).unwrap_err().code(), 6);
    }

    #[test]
    fn too_large_input_is_code_6_and_read_stops_after_the_limit() {
        let big = vec![b' '; MAX_CONFIG + 10];
        let read = read_stdin(&big[..], MAX_CONFIG).unwrap();
        assert_eq!(read.len(), MAX_CONFIG + 1);
        let e = decode(&read).unwrap_err();
        assert_eq!(e.code(), 6);
        assert_eq!(
            e.to_string(),
            "the network configuration on stdin is larger than 1048576 bytes"
        );
        let exact = vec![b' '; MAX_CONFIG];
        // Exactly at the limit is read whole and decoded (and is not JSON).
        assert!(matches!(decode(&exact), Err(Error::Decode { .. })));
    }

    #[test]
    fn commands_need_their_version() {
        let at = |v: &str| conf(minimal(v)).unwrap();
        let cases = [
            ("0.4.0", CniCommand::Check, None),
            ("0.4.0", CniCommand::Add, None),
            (
                "0.4.0",
                CniCommand::Status,
                Some("cniVersion 0.4.0 does not allow STATUS; it needs 1.1.0 or later"),
            ),
            (
                "1.0.0",
                CniCommand::Gc,
                Some("cniVersion 1.0.0 does not allow GC; it needs 1.1.0 or later"),
            ),
            ("1.1.0", CniCommand::Gc, None),
            ("1.1.0", CniCommand::Status, None),
        ];
        for (v, cmd, want) in cases {
            match (check_command(&at(v), cmd), want) {
                (Ok(()), None) => {}
                (Err(e), Some(msg)) => {
                    assert_eq!(e.code(), 1);
                    assert_eq!(e.to_string(), msg);
                }
                (got, want) => panic!("{v} {cmd}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn version_command_echoes_a_version_looking_cni_version() {
        assert_eq!(version_for_version_command(b""), "1.1.0");
        assert_eq!(version_for_version_command(b"not json"), "1.1.0");
        assert_eq!(
            version_for_version_command(br#"{"cniVersion":"0.4.0"}"#),
            "0.4.0"
        );
        assert_eq!(
            version_for_version_command(br#"{"cniVersion":"0.3.1"}"#),
            "0.3.1"
        );
        assert_eq!(
            version_for_version_command(br#"{"cniVersion":"x.y"}"#),
            "1.1.0"
        );
        assert_eq!(version_for_version_command(br#"{"cniVersion":7}"#), "1.1.0");
    }

    #[test]
    fn sniffs_only_supported_versions() {
        let doc = |s: &str| decode(s.as_bytes()).unwrap();
        assert_eq!(
            sniff_version(&doc(r#"{"cniVersion":"1.0.0"}"#)),
            Some(CniVersion::V1_0_0)
        );
        assert_eq!(sniff_version(&doc(r#"{"cniVersion":"0.3.1"}"#)), None);
        assert_eq!(sniff_version(&doc(r#"{}"#)), None);
    }
}
