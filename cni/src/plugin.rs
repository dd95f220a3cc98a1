//! Carries out a parsed invocation: ask trellis-node, turn its answer into
//! what the runtime reads on stdout.
//!
//! ```text
//!  Invocation ──request()──▶ Transport::call ──▶ Response ──▶ Some(result JSON) | None | Failure
//! ```
//!
//! ADD prints the result; DEL, CHECK, STATUS and GC print nothing on
//! success; VERSION never touches the socket.

use serde_json::json;

use crate::client::Transport;
use crate::config::SUPPORTED_VERSIONS;
use crate::env::CniCommand;
use crate::error::{Error, Failure};
use crate::invocation::Invocation;
use crate::proto::Response;
use crate::result;

/// Runs `inv`; `Ok(Some(json))` is printed on stdout, `Ok(None)` is a
/// silent success.
pub fn execute(
    inv: &Invocation,
    transport: &mut impl Transport,
) -> Result<Option<String>, Failure> {
    let conf = match inv {
        Invocation::Version { cni_version } => return Ok(Some(version_json(cni_version))),
        _ => inv.conf(),
    };
    let (Some(conf), Some(request)) = (conf, inv.request()) else {
        return Ok(None);
    };
    let fail = |e| Failure::new(Some(conf.cni_version), e);
    let command = inv.command();
    let response = transport
        .call(conf.socket_path(), conf.timeout(), &request)
        .map_err(|e| match (command, e) {
            // STATUS has its own codes: the node being away means ADD
            // cannot be served (50), not "try again".
            (CniCommand::Status, e @ (Error::Unreachable { .. } | Error::TimedOut { .. })) => {
                Error::StatusUnreachable {
                    socket: conf.socket_path().to_path_buf(),
                    reason: e.details(),
                }
            }
            (_, e) => e,
        })
        .map_err(fail)?;
    if let Response::Error(reply) = response {
        return Err(fail(Error::Node(reply)));
    }
    match (inv, response) {
        (
            Invocation::Add {
                attachment,
                prev_result,
                ..
            },
            Response::Added { endpoint },
        ) => {
            if &endpoint.attachment != attachment {
                return Err(fail(Error::Protocol {
                    problem: format!(
                        "ADD of {attachment:?} was answered with the endpoint of {:?}",
                        endpoint.attachment
                    ),
                }));
            }
            let ours = result::from_endpoint(&endpoint);
            let full = match prev_result {
                Some(prev) => ours.append_to(prev.clone()),
                None => ours,
            };
            full.for_version(conf.cni_version)
                .to_json()
                .map(Some)
                .map_err(fail)
        }
        (Invocation::Del { .. }, Response::Deleted) => Ok(None),
        (Invocation::Check { prev_result, .. }, Response::Checked { endpoint }) => {
            result::compare(prev_result, &endpoint).map_err(fail)?;
            Ok(None)
        }
        (
            Invocation::Status { .. },
            Response::Status {
                ready,
                limited,
                message,
            },
        ) => {
            if ready {
                Ok(None)
            } else {
                Err(fail(Error::NotReady {
                    limited,
                    message: if message.is_empty() {
                        "trellis-node gave no reason".into()
                    } else {
                        message
                    },
                }))
            }
        }
        (Invocation::Gc { .. }, Response::Collected { .. }) => Ok(None),
        (_, other) => Err(fail(Error::Protocol {
            problem: format!("{command} was answered with {:?}", response_kind(&other)),
        })),
    }
}

/// VERSION's result.
pub fn version_json(cni_version: &str) -> String {
    json!({"cniVersion": cni_version, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

fn response_kind(r: &Response) -> &'static str {
    match r {
        Response::Added { .. } => "added",
        Response::Deleted => "deleted",
        Response::Checked { .. } => "checked",
        Response::Status { .. } => "status",
        Response::Collected { .. } => "collected",
        Response::Error(_) => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::Vars;
    use crate::invocation::parse;
    use crate::proto::{Attachment, ErrorReply, Request};
    use crate::result::tests::mk_endpoint;
    use serde_json::{Value, json};
    use std::io;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    /// Records requests and answers from a script.
    struct Fake {
        answers: Vec<Result<Response, Error>>,
        seen: Vec<(PathBuf, Duration, Request)>,
    }

    impl Fake {
        fn answering(answer: Result<Response, Error>) -> Self {
            Fake {
                answers: vec![answer],
                seen: Vec::new(),
            }
        }
    }

    impl Transport for Fake {
        fn call(
            &mut self,
            socket: &Path,
            timeout: Duration,
            request: &Request,
        ) -> Result<Response, Error> {
            self.seen
                .push((socket.to_path_buf(), timeout, request.clone()));
            self.answers.pop().unwrap_or(Err(Error::Protocol {
                problem: "fake: no answer scripted".into(),
            }))
        }
    }

    fn vars(command: &str) -> Vars {
        [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/cni-1234"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn stdin(version: &str, extra: Value) -> Vec<u8> {
        let mut c = json!({"cniVersion": version, "name": "trellis", "type": "trellis",
                           "socket": "/run/trellis/t.sock", "timeoutSeconds": 7});
        if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
            c.extend(extra);
        }
        serde_json::to_vec(&c).unwrap()
    }

    fn run(
        command: &str,
        version: &str,
        extra: Value,
        answer: Result<Response, Error>,
    ) -> (Result<Option<String>, Failure>, Fake) {
        let inv = parse(&vars(command), &stdin(version, extra)).unwrap();
        let mut fake = Fake::answering(answer);
        (execute(&inv, &mut fake), fake)
    }

    fn refused() -> Error {
        Error::Unreachable {
            socket: "/run/trellis/t.sock".into(),
            stage: "connect",
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        }
    }

    #[test]
    fn add_prints_the_result_in_the_config_version() {
        let ep = mk_endpoint(&["10.244.1.5/32"]);
        let (out, fake) = run(
            "ADD",
            "0.4.0",
            json!({}),
            Ok(Response::Added { endpoint: ep }),
        );
        let v: Value = serde_json::from_str(&out.unwrap().unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["ips"][0]["version"], "4");
        let (socket, timeout, req) = &fake.seen[0];
        assert_eq!(socket, Path::new("/run/trellis/t.sock"));
        assert_eq!(*timeout, Duration::from_secs(7));
        assert_eq!(req.network, "trellis");
    }

    #[test]
    fn add_answered_for_another_attachment_is_a_protocol_error() {
        let mut ep = mk_endpoint(&["10.244.1.5/32"]);
        ep.attachment.container_id = "other".into();
        let (out, _) = run(
            "ADD",
            "1.1.0",
            json!({}),
            Ok(Response::Added { endpoint: ep }),
        );
        assert_eq!(out.unwrap_err().code(), 999);
    }

    #[test]
    fn silent_successes() {
        let (out, _) = run("DEL", "1.0.0", json!({}), Ok(Response::Deleted));
        assert_eq!(out.unwrap(), None);
        let (out, _) = run(
            "STATUS",
            "1.1.0",
            json!({}),
            Ok(Response::Status {
                ready: true,
                limited: false,
                message: String::new(),
            }),
        );
        assert_eq!(out.unwrap(), None);
        let gc = json!({"cni.dev/valid-attachments": []});
        let (out, _) = run(
            "GC",
            "1.1.0",
            gc,
            Ok(Response::Collected { released: vec![] }),
        );
        assert_eq!(out.unwrap(), None);
    }

    #[test]
    fn disabled_check_and_gc_do_not_contact_the_node() {
        let prev = json!({"prevResult": {"interfaces": []}, "disableCheck": true});
        let (out, fake) = run("CHECK", "1.0.0", prev, Err(refused()));
        assert_eq!(out.unwrap(), None);
        assert!(fake.seen.is_empty());
        let gc = json!({"cni.dev/valid-attachments": [], "disableGC": true});
        let (out, fake) = run("GC", "1.1.0", gc, Err(refused()));
        assert_eq!(out.unwrap(), None);
        assert!(fake.seen.is_empty());
    }

    #[test]
    fn check_compares_the_endpoint_with_prev_result() {
        let ep = mk_endpoint(&["10.244.1.5/32"]);
        let prev = crate::result::from_endpoint(&ep).for_version(crate::config::CniVersion::V1_0_0);
        let extra = json!({"prevResult": serde_json::to_value(&prev).unwrap()});
        let (out, _) = run(
            "CHECK",
            "1.0.0",
            extra.clone(),
            Ok(Response::Checked { endpoint: ep }),
        );
        assert_eq!(out.unwrap(), None);
        let other = mk_endpoint(&["10.244.1.9/32"]);
        let (out, _) = run(
            "CHECK",
            "1.0.0",
            extra,
            Ok(Response::Checked { endpoint: other }),
        );
        let f = out.unwrap_err();
        assert_eq!(f.code(), 101);
        assert_eq!(f.render().cni_version, "1.0.0");
    }

    #[test]
    fn transport_and_node_errors_map_to_their_codes() {
        let (out, _) = run("ADD", "1.0.0", json!({}), Err(refused()));
        let r = out.unwrap_err().render();
        assert_eq!((r.code, r.cni_version.as_str()), (11, "1.0.0"));
        // DEL does not pretend success when the node is away: the runtime retries.
        let (out, _) = run("DEL", "1.0.0", json!({}), Err(refused()));
        assert_eq!(out.unwrap_err().code(), 11);
        let (out, _) = run("STATUS", "1.1.0", json!({}), Err(refused()));
        let r = out.unwrap_err().render();
        assert_eq!(r.code, 50);
        assert_eq!(
            r.msg,
            "trellis-node is unreachable at /run/trellis/t.sock, so ADD cannot be served"
        );
        assert!(
            r.details.starts_with("connect: connection refused"),
            "{}",
            r.details
        );
        let (out, _) = run(
            "STATUS",
            "1.1.0",
            json!({}),
            Ok(Response::Status {
                ready: false,
                limited: false,
                message: "no address block yet".into(),
            }),
        );
        let r = out.unwrap_err().render();
        assert_eq!(
            (r.code, r.msg.as_str()),
            (
                50,
                "trellis-node is not ready to serve ADD: no address block yet"
            )
        );
        let (out, _) = run(
            "STATUS",
            "1.1.0",
            json!({}),
            Ok(Response::Status {
                ready: false,
                limited: true,
                message: "the node's last reconcile did not converge".into(),
            }),
        );
        assert_eq!(out.unwrap_err().code(), 51);
        let reply = ErrorReply::new(100, "no free address in 10.244.1.0/26", "64 of 64 in use");
        let (out, _) = run("ADD", "1.1.0", json!({}), Ok(Response::Error(reply)));
        let r = out.unwrap_err().render();
        assert_eq!(
            (r.code, r.msg.as_str(), r.details.as_str()),
            (100, "no free address in 10.244.1.0/26", "64 of 64 in use")
        );
        let (out, _) = run(
            "DEL",
            "1.0.0",
            json!({}),
            Ok(Response::Collected {
                released: vec![Attachment {
                    container_id: "a".into(),
                    ifname: "b".into(),
                }],
            }),
        );
        let r = out.unwrap_err().render();
        assert_eq!(
            (r.code, r.msg.as_str()),
            (
                999,
                "trellis-node sent an invalid response: DEL was answered with \"collected\""
            )
        );
    }

    #[test]
    fn version_lists_what_we_speak() {
        assert_eq!(
            version_json("1.1.0"),
            r#"{"cniVersion":"1.1.0","supportedVersions":["0.4.0","1.0.0","1.1.0"]}"#
        );
    }
}
