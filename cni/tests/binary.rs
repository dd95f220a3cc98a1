//! The `trellis` binary run exactly as a container runtime runs it: `CNI_*`
//! variables, the configuration on stdin, the result or error on stdout and
//! the exit code (containernetworking/plugins `pkg/testutils/cmd.go`).
//!
//! Errors reachable without trellis-node are checked against no server (or a
//! socket with no listener). The round trip runs against `FakeNode`, a tiny
//! in-test server speaking `trellis_cni::proto`: this is a PROTOCOL test of
//! the binary's side; the real trellis-node is tested in its own crate and in
//! the end-to-end tests.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup step must fail the test loudly"
)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use serde_json::{Value, json};
use trellis_cni::config::CniVersion;
use trellis_cni::env::CniCommand;
use trellis_cni::proto::{
    Attachment, Command, Endpoint, ErrorReply, PodRef, Request, Response, code,
};
use trellis_cni::runtime::{PluginOutput, RuntimeCall, net_conf};

fn plugin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_trellis"))
}

fn exec(call: &RuntimeCall, stdin: &[u8]) -> PluginOutput {
    call.exec(plugin(), stdin).unwrap()
}

fn conf_bytes(conf: &Value) -> Vec<u8> {
    serde_json::to_vec(conf).unwrap()
}

/// Asserts the plugin failed the spec's way and returns the error object.
fn assert_error(out: &PluginOutput, code: u32, version: &str) -> Value {
    assert_eq!(out.exit_code, Some(1), "{out:?}");
    let v = out
        .json()
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {out:?}"));
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(keys, ["cniVersion", "code", "details", "msg"], "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["cniVersion"], version, "{v}");
    assert!(!v["msg"].as_str().unwrap().is_empty());
    v
}

fn pod() -> PodRef {
    PodRef {
        namespace: "default".into(),
        name: "web-0".into(),
        uid: Some("7f9c2a51-1d2e-4b8a-9a55-2f0d1c1e0b42".into()),
    }
}

#[test]
fn version_with_empty_stdin() {
    let out = exec(
        &RuntimeCall::new(CniCommand::Version).unset("CNI_PATH"),
        b"",
    );
    assert!(out.success(), "{out:?}");
    assert_eq!(
        out.stdout,
        "{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"0.4.0\",\"1.0.0\",\"1.1.0\"]}\n"
    );
}

#[test]
fn version_echoes_the_configuration_version() {
    // libcni sends {"cniVersion": <its latest>} to VERSION.
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        let out = exec(
            &RuntimeCall::new(CniCommand::Version),
            json!({"cniVersion": v}).to_string().as_bytes(),
        );
        assert!(out.success(), "{out:?}");
        let json = out.json().unwrap();
        assert_eq!(json["cniVersion"], v);
        assert_eq!(
            json["supportedVersions"],
            json!(["0.4.0", "1.0.0", "1.1.0"])
        );
    }
}

#[test]
fn code_1_for_an_unsupported_cni_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut conf = net_conf(CniVersion::V1_0_0, "trellis", &dir.path().join("n.sock"));
    conf["cniVersion"] = json!("0.3.1");
    let out = exec(
        &RuntimeCall::add("abc", "/run/netns/x", "eth0"),
        &conf_bytes(&conf),
    );
    let v = assert_error(&out, code::INCOMPATIBLE_VERSION, "1.1.0");
    assert_eq!(
        v["msg"],
        "cniVersion \"0.3.1\" is not supported; trellis supports 0.4.0, 1.0.0, 1.1.0"
    );
}

#[test]
fn code_1_for_status_and_gc_below_1_1_0() {
    let dir = tempfile::tempdir().unwrap();
    let conf = net_conf(CniVersion::V1_0_0, "trellis", &dir.path().join("n.sock"));
    let out = exec(&RuntimeCall::new(CniCommand::Status), &conf_bytes(&conf));
    let v = assert_error(&out, 1, "1.0.0");
    assert_eq!(
        v["msg"],
        "cniVersion 1.0.0 does not allow STATUS; it needs 1.1.0 or later"
    );
}

#[test]
fn code_4_for_missing_and_invalid_variables() {
    let dir = tempfile::tempdir().unwrap();
    let conf = conf_bytes(&net_conf(
        CniVersion::V0_4_0,
        "trellis",
        &dir.path().join("n.sock"),
    ));
    let cases = [
        (
            RuntimeCall::add("abc", "/run/netns/x", "eth0").unset("CNI_NETNS"),
            "CNI_NETNS is not set (required for ADD)",
        ),
        (
            RuntimeCall::add("abc", "/run/netns/x", "eth0").unset("CNI_COMMAND"),
            "CNI_COMMAND is not set (required for every command)",
        ),
        (
            RuntimeCall::add("abc", "/run/netns/x", "eth0").set("CNI_COMMAND", "INIT"),
            "CNI_COMMAND=\"INIT\" is invalid: not one of ADD, DEL, CHECK, STATUS, GC, VERSION",
        ),
        (
            RuntimeCall::del("-abc", "/run/netns/x", "eth0"),
            "CNI_CONTAINERID=\"-abc\" is invalid: must start with a letter or digit, not '-'",
        ),
        (
            RuntimeCall::add("abc", "/run/netns/x", "eth0:1"),
            "CNI_IFNAME=\"eth0:1\" is invalid: must not contain ':'",
        ),
        (
            RuntimeCall::add("abc", "/run/netns/x", "eth0").set("CNI_ARGS", "K8S_POD_NAME"),
            "CNI_ARGS=\"K8S_POD_NAME\" is invalid: pair \"K8S_POD_NAME\" is not KEY=VALUE",
        ),
    ];
    for (call, msg) in cases {
        let out = exec(&call, &conf);
        let v = assert_error(&out, code::INVALID_ENVIRONMENT, "0.4.0");
        assert_eq!(v["msg"], msg);
    }
}

#[test]
fn code_6_for_undecodable_or_oversized_stdin() {
    let call = RuntimeCall::add("abc", "/run/netns/x", "eth0");
    let out = exec(&call, b"{\"cniVersion\": \"1.0.0\",\n \"name\": trellis}");
    let v = assert_error(&out, code::DECODING_FAILURE, "1.1.0");
    assert_eq!(
        v["msg"],
        "failed to decode the network configuration: expected ident at line 2 column 12"
    );
    let out = exec(&call, &vec![b' '; 2 << 20]);
    let v = assert_error(&out, code::DECODING_FAILURE, "1.1.0");
    assert_eq!(
        v["msg"],
        "the network configuration on stdin is larger than 1048576 bytes"
    );
}

#[test]
fn code_7_for_invalid_fields() {
    let dir = tempfile::tempdir().unwrap();
    let mut conf = net_conf(CniVersion::V1_1_0, "trellis", &dir.path().join("n.sock"));
    conf["timeoutSeconds"] = json!("soon");
    let out = exec(
        &RuntimeCall::add("abc", "/run/netns/x", "eth0"),
        &conf_bytes(&conf),
    );
    let v = assert_error(&out, code::INVALID_CONFIG, "1.1.0");
    assert_eq!(
        v["msg"],
        "invalid network configuration: timeoutSeconds: invalid type: string \"soon\", expected u64"
    );
}

#[test]
fn code_11_when_trellis_node_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    // A socket file nobody listens on (trellis-node died), and no file at all.
    let dead = dir.path().join("dead.sock");
    drop(UnixListener::bind(&dead).unwrap());
    let absent = dir.path().join("absent.sock");
    for (socket, os_error) in [(&dead, "Connection refused"), (&absent, "No such file")] {
        let conf = conf_bytes(&net_conf(CniVersion::V1_0_0, "trellis", socket));
        for call in [
            RuntimeCall::add("abc", "/run/netns/x", "eth0"),
            // DEL must not pretend success: the runtime retries it.
            RuntimeCall::del("abc", "/run/netns/x", "eth0"),
        ] {
            let out = exec(&call, &conf);
            let v = assert_error(&out, code::TRY_AGAIN_LATER, "1.0.0");
            assert_eq!(
                v["msg"],
                format!("trellis-node is unreachable at {}", socket.display())
            );
            let details = v["details"].as_str().unwrap();
            assert!(
                details.starts_with(&format!("connect: {os_error}")),
                "{details}"
            );
        }
    }
}

#[test]
fn code_50_for_status_without_trellis_node() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let conf = conf_bytes(&net_conf(CniVersion::V1_1_0, "trellis", &socket));
    let out = exec(&RuntimeCall::new(CniCommand::Status), &conf);
    let v = assert_error(&out, code::PLUGIN_NOT_AVAILABLE, "1.1.0");
    assert_eq!(
        v["msg"],
        format!(
            "trellis-node is unreachable at {}, so ADD cannot be served",
            socket.display()
        )
    );
}

/// A protocol-level stand-in for trellis-node: keeps endpoints in a map,
/// answers each request the way the protocol documents, and records what it
/// was asked.
struct FakeNode {
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Request>>>,
}

#[derive(Default)]
struct FakeState {
    endpoints: BTreeMap<Attachment, Endpoint>,
    next_host: u8,
    ready: bool,
    /// When set, ADD answers this error instead.
    add_error: Option<ErrorReply>,
}

impl FakeNode {
    fn start(dir: &Path, state: FakeState) -> FakeNode {
        let socket = dir.join("node.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_by_server = Arc::clone(&seen);
        // Detached: it lives until the test process exits.
        thread::spawn(move || {
            let mut state = state;
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_err() {
                    continue;
                }
                let req: Request = serde_json::from_str(&line).unwrap();
                let resp = answer(&mut state, &req);
                seen_by_server.lock().unwrap().push(req);
                let mut out = serde_json::to_vec(&resp).unwrap();
                out.push(b'\n');
                let _ = (&conn).write_all(&out);
            }
        });
        FakeNode { socket, seen }
    }

    fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}

fn answer(state: &mut FakeState, req: &Request) -> Response {
    match &req.command {
        Command::Add {
            attachment,
            netns,
            pod,
        } => {
            if let Some(e) = &state.add_error {
                return Response::Error(e.clone());
            }
            state.next_host += 1;
            let n = state.next_host;
            let endpoint = Endpoint {
                attachment: attachment.clone(),
                netns: netns.clone(),
                host_ifname: format!("trellis0000aa{n:02x}"),
                host_mac: format!("02:00:00:00:01:{n:02x}"),
                mac: format!("02:00:00:00:02:{n:02x}"),
                mtu: 1450,
                addresses: vec![
                    format!("10.244.1.{n}/32").parse().unwrap(),
                    format!("fd00:10:244:1::{n:x}/128").parse().unwrap(),
                ],
                pod: pod.clone(),
            };
            state.endpoints.insert(attachment.clone(), endpoint.clone());
            Response::Added { endpoint }
        }
        Command::Check { attachment, .. } => match state.endpoints.get(attachment) {
            Some(endpoint) => Response::Checked {
                endpoint: endpoint.clone(),
            },
            None => Response::Error(ErrorReply::new(
                code::ENDPOINT_MISMATCH,
                "no endpoint recorded",
                "",
            )),
        },
        Command::Del { attachment, .. } => {
            state.endpoints.remove(attachment);
            Response::Deleted
        }
        Command::Status => Response::Status {
            ready: state.ready,
            limited: false,
            message: if state.ready {
                String::new()
            } else {
                "no address block for this node yet".into()
            },
        },
        Command::Gc { valid } => {
            // No list: release nothing recorded (only orphans, which this
            // stand-in has none of).
            let released: Vec<Attachment> = state
                .endpoints
                .keys()
                .filter(|a| valid.as_ref().is_some_and(|v| !v.contains(a)))
                .cloned()
                .collect();
            for a in &released {
                state.endpoints.remove(a);
            }
            Response::Collected { released }
        }
    }
}

/// ADD → CHECK (with ADD's output as prevResult) → GC → DEL → STATUS, for
/// every version the plugin claims; the node side is `FakeNode`.
#[test]
fn protocol_round_trip_for_every_version() {
    for version in CniVersion::ALL {
        let dir = tempfile::tempdir().unwrap();
        let node = FakeNode::start(
            dir.path(),
            FakeState {
                ready: true,
                ..FakeState::default()
            },
        );
        let conf = net_conf(version, "trellis", &node.socket);
        let netns = "/var/run/netns/cni-5f0e3a1b";

        // ADD: the result in the configuration's version.
        let add = RuntimeCall::add("c0ffee01", netns, "eth0").pod(&pod());
        let out = exec(&add, &conf_bytes(&conf));
        assert!(out.success(), "{version} ADD: {out:?}");
        let result = out.json().unwrap();
        let mut want = json!({
            "cniVersion": version.as_str(),
            "interfaces": [
                {"name": "trellis0000aa01", "mac": "02:00:00:00:01:01"},
                {"name": "eth0", "mac": "02:00:00:00:02:01", "sandbox": netns}
            ],
            "ips": [
                {"address": "10.244.1.1/32", "gateway": "169.254.1.1", "interface": 1},
                {"address": "fd00:10:244:1::1/128", "gateway": "fe80::1", "interface": 1}
            ],
            "routes": [
                {"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
                {"dst": "::/0", "gw": "fe80::1"}
            ],
            "dns": {}
        });
        match version {
            CniVersion::V0_4_0 => {
                want["ips"][0]["version"] = json!("4");
                want["ips"][1]["version"] = json!("6");
            }
            CniVersion::V1_0_0 => {}
            CniVersion::V1_1_0 => want["interfaces"][1]["mtu"] = json!(1450),
        }
        assert_eq!(result, want, "{version} ADD result");

        // CHECK with the ADD result as prevResult, as the runtime caches it.
        let mut check_conf = conf.clone();
        check_conf["prevResult"] = result.clone();
        let out = exec(
            &RuntimeCall::check("c0ffee01", netns, "eth0"),
            &conf_bytes(&check_conf),
        );
        assert!(out.success(), "{version} CHECK: {out:?}");
        assert_eq!(out.stdout, "", "CHECK prints nothing on success");

        // CHECK against a prevResult that disagrees with the node: 101.
        let mut stale = check_conf.clone();
        stale["prevResult"]["ips"][0]["address"] = json!("10.244.1.99/32");
        let out = exec(
            &RuntimeCall::check("c0ffee01", netns, "eth0"),
            &conf_bytes(&stale),
        );
        let v = assert_error(&out, code::ENDPOINT_MISMATCH, version.as_str());
        assert!(v["msg"].as_str().unwrap().contains("10.244.1.99/32"), "{v}");

        if version == CniVersion::V1_1_0 {
            // GC keeping the pod, then STATUS.
            let mut gc_conf = conf.clone();
            gc_conf["cni.dev/valid-attachments"] =
                json!([{"containerID": "c0ffee01", "ifname": "eth0"}]);
            let out = exec(&RuntimeCall::new(CniCommand::Gc), &conf_bytes(&gc_conf));
            assert!(out.success() && out.stdout.is_empty(), "GC: {out:?}");
            let out = exec(&RuntimeCall::new(CniCommand::Status), &conf_bytes(&conf));
            assert!(out.success() && out.stdout.is_empty(), "STATUS: {out:?}");
        }

        // DEL (twice: it must be idempotent), with prevResult as runtimes send it.
        let mut del_conf = conf.clone();
        del_conf["prevResult"] = result;
        for _ in 0..2 {
            let out = exec(
                &RuntimeCall::del("c0ffee01", netns, "eth0"),
                &conf_bytes(&del_conf),
            );
            assert!(
                out.success() && out.stdout.is_empty(),
                "{version} DEL: {out:?}"
            );
        }

        // What the node was asked, in order.
        let requests = node.requests();
        let kinds: Vec<&str> = requests
            .iter()
            .map(|r| match r.command {
                Command::Add { .. } => "ADD",
                Command::Del { .. } => "DEL",
                Command::Check { .. } => "CHECK",
                Command::Status => "STATUS",
                Command::Gc { .. } => "GC",
            })
            .collect();
        let want_kinds: &[&str] = if version == CniVersion::V1_1_0 {
            &["ADD", "CHECK", "CHECK", "GC", "STATUS", "DEL", "DEL"]
        } else {
            &["ADD", "CHECK", "CHECK", "DEL", "DEL"]
        };
        assert_eq!(kinds, want_kinds, "{version}");
        let Some(first) = requests.first() else {
            panic!("no requests")
        };
        assert_eq!(
            serde_json::to_value(first).unwrap(),
            json!({"version": 1, "network": "trellis", "command": {
                "type": "ADD",
                "attachment": {"containerID": "c0ffee01", "ifname": "eth0"},
                "netns": netns,
                "pod": {"namespace": "default", "name": "web-0",
                        "uid": "7f9c2a51-1d2e-4b8a-9a55-2f0d1c1e0b42"}
            }})
        );
        if let Some(Request {
            command: Command::Gc { valid },
            ..
        }) = requests.get(3)
        {
            assert_eq!(valid.as_ref().map(Vec::len), Some(1));
        }
    }
}

#[test]
fn protocol_node_errors_and_not_ready_reach_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::start(
        dir.path(),
        FakeState {
            ready: false,
            add_error: Some(ErrorReply::new(
                code::ADDRESSES_EXHAUSTED,
                "no free address in 10.244.1.0/26",
                "64 of 64 addresses are in use",
            )),
            ..FakeState::default()
        },
    );
    let conf = conf_bytes(&net_conf(CniVersion::V1_1_0, "trellis", &node.socket));
    let out = exec(&RuntimeCall::add("c0ffee02", "/run/netns/y", "eth0"), &conf);
    let v = assert_error(&out, code::ADDRESSES_EXHAUSTED, "1.1.0");
    assert_eq!(v["msg"], "no free address in 10.244.1.0/26");
    assert_eq!(v["details"], "64 of 64 addresses are in use");
    let out = exec(&RuntimeCall::new(CniCommand::Status), &conf);
    let v = assert_error(&out, code::PLUGIN_NOT_AVAILABLE, "1.1.0");
    assert_eq!(
        v["msg"],
        "trellis-node is not ready to serve ADD: no address block for this node yet"
    );
    // GC without the list (libcni without GCArgs, e.g. `cnitool gc`): the node is asked to
    // collect orphans only, and it succeeds.
    let out = exec(&RuntimeCall::new(CniCommand::Gc), &conf);
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    let requests = node.requests();
    assert_eq!(requests.len(), 3);
    assert!(
        matches!(&requests[2].command, Command::Gc { valid: None }),
        "{:?}",
        requests[2]
    );
}
