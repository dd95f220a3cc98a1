//! The pure parsing entry point: environment and stdin in, one validated
//! invocation (or the error to print) out.
//!
//! ```text
//!  Vars + stdin bytes ──parse()──▶ Invocation ──request()──▶ proto::Request
//!                          └──────▶ Failure (codes 1, 4, 5, 6, 7)
//! ```
//!
//! No I/O and no clock, so unit tests and the fuzzer call it directly; the
//! binary only adds reading the process environment and stdin around it.

use serde::Serialize;

use crate::config::{self, CniVersion, NetConf};
use crate::env::{self, CniCommand, Vars};
use crate::error::{Error, Failure};
use crate::proto::{self, Attachment, PodRef, Request};
use crate::result::{self, CniResult};

/// One invocation of the plugin, everything it needs validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "command", rename_all = "UPPERCASE")]
pub enum Invocation {
    Add {
        conf: NetConf,
        attachment: Attachment,
        netns: String,
        pod: Option<PodRef>,
        /// Set when trellis runs chained after another plugin.
        prev_result: Option<CniResult>,
    },
    Del {
        conf: NetConf,
        attachment: Attachment,
        netns: Option<String>,
    },
    Check {
        conf: NetConf,
        attachment: Attachment,
        netns: String,
        prev_result: CniResult,
    },
    Status {
        conf: NetConf,
    },
    Gc {
        conf: NetConf,
        /// `None`: the runtime sent no `cni.dev/valid-attachments`; only
        /// orphans are collected.
        valid: Option<Vec<Attachment>>,
    },
    Version {
        /// What VERSION reports as its own `cniVersion`.
        cni_version: String,
    },
}

/// The error codes [`parse`] can return.
pub const PARSE_ERROR_CODES: [u32; 5] = [
    proto::code::INCOMPATIBLE_VERSION,
    proto::code::INVALID_ENVIRONMENT,
    proto::code::IO_FAILURE,
    proto::code::DECODING_FAILURE,
    proto::code::INVALID_CONFIG,
];

/// Parses one invocation. Environment errors (code 4) come first, as in
/// libcni's skeleton; the configuration's `cniVersion`, when supported, is
/// carried into every error.
pub fn parse(vars: &Vars, stdin: &[u8]) -> Result<Invocation, Failure> {
    let command = env::parse_command(vars).map_err(|e| {
        let version = config::decode(stdin)
            .ok()
            .and_then(|doc| config::sniff_version(&doc));
        Failure::new(version, e)
    })?;
    if command == CniCommand::Version {
        return Ok(Invocation::Version {
            cni_version: config::version_for_version_command(stdin),
        });
    }
    let doc = config::decode(stdin);
    let version = doc.as_ref().ok().and_then(config::sniff_version);
    let fail = |e| Failure::new(version, e);
    let env = env::parse(command, vars).map_err(fail)?;
    let mut conf = config::parse(doc.map_err(fail)?).map_err(fail)?;
    let fail = |e| Failure::new(Some(conf.cni_version), e);
    config::check_command(&conf, command).map_err(fail)?;
    let prev = conf.prev_result.take();
    let valid = conf.valid_attachments.take();
    let version = conf.cni_version;
    let fail = |e| Failure::new(Some(version), e);
    Ok(match command {
        CniCommand::Add => Invocation::Add {
            attachment: attachment(&env).map_err(fail)?,
            netns: required(env.netns.clone(), env::CNI_NETNS, command).map_err(fail)?,
            pod: env.pod,
            prev_result: prev
                .as_ref()
                .map(result::parse_prev)
                .transpose()
                .map_err(fail)?,
            conf,
        },
        // DEL does not read prevResult: trellis-node's record is what gets
        // released, and DEL must work even when the runtime lost its cache.
        CniCommand::Del => Invocation::Del {
            attachment: attachment(&env).map_err(fail)?,
            netns: env.netns,
            conf,
        },
        CniCommand::Check => {
            let prev = prev.ok_or_else(|| Error::InvalidConfig {
                field: "prevResult".into(),
                problem: "missing; CHECK needs the result of the ADD".into(),
            });
            Invocation::Check {
                attachment: attachment(&env).map_err(fail)?,
                netns: required(env.netns.clone(), env::CNI_NETNS, command).map_err(fail)?,
                prev_result: result::parse_prev(&prev.map_err(fail)?).map_err(fail)?,
                conf,
            }
        }
        CniCommand::Status => Invocation::Status { conf },
        // The spec says the runtime sends the list, but libcni leaves it out
        // when its caller passes none (cnitool gc). Without it no pod can be
        // told dead, so the node collects only what no record owns.
        CniCommand::Gc => Invocation::Gc { valid, conf },
        CniCommand::Version => Invocation::Version {
            cni_version: config::version_for_version_command(stdin),
        },
    })
}

fn required(
    value: Option<String>,
    var: &'static str,
    command: CniCommand,
) -> Result<String, Error> {
    value.ok_or_else(|| Error::MissingEnv {
        vars: vec![var],
        command: command.as_str(),
    })
}

fn attachment(env: &env::CniEnv) -> Result<Attachment, Error> {
    Ok(Attachment {
        container_id: required(env.container_id.clone(), env::CNI_CONTAINERID, env.command)?,
        ifname: required(env.ifname.clone(), env::CNI_IFNAME, env.command)?,
    })
}

impl Invocation {
    pub fn command(&self) -> CniCommand {
        match self {
            Invocation::Add { .. } => CniCommand::Add,
            Invocation::Del { .. } => CniCommand::Del,
            Invocation::Check { .. } => CniCommand::Check,
            Invocation::Status { .. } => CniCommand::Status,
            Invocation::Gc { .. } => CniCommand::Gc,
            Invocation::Version { .. } => CniCommand::Version,
        }
    }

    /// The configuration (every command but VERSION has one).
    pub fn conf(&self) -> Option<&NetConf> {
        match self {
            Invocation::Add { conf, .. }
            | Invocation::Del { conf, .. }
            | Invocation::Check { conf, .. }
            | Invocation::Status { conf }
            | Invocation::Gc { conf, .. } => Some(conf),
            Invocation::Version { .. } => None,
        }
    }

    pub fn cni_version(&self) -> Option<CniVersion> {
        self.conf().map(|c| c.cni_version)
    }

    /// What to ask trellis-node; `None` when there is nothing to ask
    /// (VERSION, and CHECK or GC that the configuration disables).
    pub fn request(&self) -> Option<Request> {
        let command = match self {
            Invocation::Add {
                attachment,
                netns,
                pod,
                ..
            } => proto::Command::Add {
                attachment: attachment.clone(),
                netns: netns.clone(),
                pod: pod.clone(),
            },
            Invocation::Del {
                attachment, netns, ..
            } => proto::Command::Del {
                attachment: attachment.clone(),
                netns: netns.clone(),
            },
            // The runtime must not call these when disabled; if it does
            // anyway, the administrator's setting wins.
            Invocation::Check { conf, .. } if conf.disable_check => return None,
            Invocation::Gc { conf, .. } if conf.disable_gc => return None,
            Invocation::Check {
                attachment, netns, ..
            } => proto::Command::Check {
                attachment: attachment.clone(),
                netns: netns.clone(),
            },
            Invocation::Status { .. } => proto::Command::Status,
            Invocation::Gc { valid, .. } => proto::Command::Gc {
                valid: valid.clone(),
            },
            Invocation::Version { .. } => return None,
        };
        Some(Request {
            version: proto::PROTOCOL_VERSION,
            network: self.conf()?.name.clone(),
            command,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn attach_vars(command: &str) -> Vars {
        vars(&[
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
            ),
        ])
    }

    fn conf(version: &str) -> serde_json::Value {
        json!({"cniVersion": version, "name": "trellis", "type": "trellis",
               "socket": "/run/trellis/test.sock"})
    }

    fn bytes(v: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    fn err(vars: &Vars, stdin: &[u8]) -> (u32, String, String) {
        let f = parse(vars, stdin).unwrap_err();
        let r = f.render();
        (r.code, r.cni_version, r.msg)
    }

    #[test]
    fn add_becomes_an_add_request() {
        let inv = parse(&attach_vars("ADD"), &bytes(&conf("1.0.0"))).unwrap();
        assert_eq!(inv.command(), CniCommand::Add);
        assert_eq!(inv.cni_version(), Some(CniVersion::V1_0_0));
        assert_eq!(
            serde_json::to_value(inv.request().unwrap()).unwrap(),
            json!({"version": 1, "network": "trellis", "command": {
                "type": "ADD",
                "attachment": {"containerID": "abc123", "ifname": "eth0"},
                "netns": "/var/run/netns/cni-1",
                "pod": {"namespace": "default", "name": "web-0"}
            }})
        );
    }

    #[test]
    fn del_without_netns_or_prev_result() {
        let mut v = attach_vars("DEL");
        v.remove("CNI_NETNS");
        let inv = parse(&v, &bytes(&conf("0.4.0"))).unwrap();
        assert_eq!(
            serde_json::to_value(inv.request().unwrap()).unwrap()["command"],
            json!({"type": "DEL", "attachment": {"containerID": "abc123", "ifname": "eth0"}})
        );
    }

    #[test]
    fn check_needs_and_parses_prev_result() {
        let (code, version, msg) = err(&attach_vars("CHECK"), &bytes(&conf("0.4.0")));
        assert_eq!((code, version.as_str()), (7, "0.4.0"));
        assert_eq!(
            msg,
            "invalid network configuration: prevResult: missing; CHECK needs the result of the ADD"
        );
        let mut c = conf("0.4.0");
        c["prevResult"] = json!({"cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
            "ips": [{"version": "4", "address": "10.0.0.5/32", "interface": 0}]});
        let inv = parse(&attach_vars("CHECK"), &bytes(&c)).unwrap();
        let Invocation::Check { prev_result, .. } = &inv else {
            panic!("{inv:?}")
        };
        assert_eq!(prev_result.ips.len(), 1);
        assert_eq!(
            inv.request().unwrap().command,
            proto::Command::Check {
                attachment: Attachment {
                    container_id: "abc123".into(),
                    ifname: "eth0".into()
                },
                netns: "/var/run/netns/cni-1".into(),
            }
        );
    }

    #[test]
    fn gc_passes_valid_attachments_on_and_needs_version_1_1_0() {
        let v = vars(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")]);
        // No list (libcni without GCArgs, e.g. `cnitool gc`): only orphans.
        let inv = parse(&v, &bytes(&conf("1.1.0"))).unwrap();
        assert_eq!(
            inv.request().unwrap().command,
            proto::Command::Gc { valid: None }
        );
        let (code, version, msg) = err(&v, &bytes(&conf("1.0.0")));
        assert_eq!((code, version.as_str()), (1, "1.0.0"));
        assert_eq!(
            msg,
            "cniVersion 1.0.0 does not allow GC; it needs 1.1.0 or later"
        );
        let mut c = conf("1.1.0");
        c[config::VALID_ATTACHMENTS] = json!([{"containerID": "a", "ifname": "eth0"}]);
        let inv = parse(&v, &bytes(&c)).unwrap();
        assert_eq!(
            inv.request().unwrap().command,
            proto::Command::Gc {
                valid: Some(vec![Attachment {
                    container_id: "a".into(),
                    ifname: "eth0".into()
                }])
            }
        );
        c["disableGC"] = json!(true);
        assert_eq!(parse(&v, &bytes(&c)).unwrap().request(), None);
    }

    #[test]
    fn status_needs_version_1_1_0() {
        let v = vars(&[("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/opt/cni/bin")]);
        assert_eq!(
            parse(&v, &bytes(&conf("1.1.0")))
                .unwrap()
                .request()
                .unwrap()
                .command,
            proto::Command::Status
        );
        let (code, version, _) = err(&v, &bytes(&conf("0.4.0")));
        assert_eq!((code, version.as_str()), (1, "0.4.0"));
    }

    #[test]
    fn version_needs_nothing_and_echoes_the_input_version() {
        let v = vars(&[("CNI_COMMAND", "VERSION")]);
        assert_eq!(
            parse(&v, b"").unwrap(),
            Invocation::Version {
                cni_version: "1.1.0".into()
            }
        );
        assert_eq!(
            parse(&v, br#"{"cniVersion":"0.4.0"}"#).unwrap(),
            Invocation::Version {
                cni_version: "0.4.0".into()
            }
        );
        assert_eq!(parse(&v, b"\xff garbage").unwrap().request(), None);
    }

    #[test]
    fn every_parse_error_code_with_a_realistic_input() {
        let add = attach_vars("ADD");
        let mut no_netns = add.clone();
        no_netns.remove("CNI_NETNS");
        let mut bad_args = add.clone();
        bad_args.insert("CNI_ARGS".into(), "K8S_POD_NAMESPACE".into());
        let mut bad_type = conf("1.0.0");
        bad_type["type"] = json!("bridge");
        let cases: Vec<(&Vars, Vec<u8>, u32, &str)> = vec![
            (&add, bytes(&conf("0.3.1")), 1, "1.1.0"),
            (&no_netns, bytes(&conf("0.4.0")), 4, "0.4.0"),
            (&bad_args, bytes(&conf("1.0.0")), 4, "1.0.0"),
            (&add, b"{\"cniVersion\": \"1.0.0\",".to_vec(), 6, "1.1.0"),
            (&add, vec![b' '; config::MAX_CONFIG + 1], 6, "1.1.0"),
            (&add, bytes(&bad_type), 7, "1.0.0"),
        ];
        for (v, stdin, code, version) in cases {
            let f = parse(v, &stdin).unwrap_err();
            assert_eq!(f.code(), code, "{f}");
            assert_eq!(f.render().cni_version, version, "{f}");
            assert!(PARSE_ERROR_CODES.contains(&f.code()));
        }
    }

    #[test]
    fn a_missing_command_still_reports_the_config_version() {
        let (code, version, _) = err(&vars(&[]), &bytes(&conf("0.4.0")));
        assert_eq!((code, version.as_str()), (4, "0.4.0"));
    }

    #[test]
    fn invocations_serialize() {
        let inv = parse(&attach_vars("ADD"), &bytes(&conf("1.1.0"))).unwrap();
        let v = serde_json::to_value(&inv).unwrap();
        assert_eq!(v["command"], "ADD");
        assert_eq!(v["conf"]["cniVersion"], "1.1.0");
        assert_eq!(v["attachment"]["containerID"], "abc123");
    }
}
