//! The `CNI_*` environment: which command, and the attachment parameters.
//!
//! ```text
//!  process env ──from_os()──▶ Vars (CNI_* only, UTF-8) ──parse_command() + parse()──▶ CniEnv
//! ```
//!
//! Pure: it reads a map, never the process environment, so tests and the
//! fuzzer feed it directly. An empty variable counts as unset, as in libcni.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;

use serde::Serialize;

use crate::error::Error;
use crate::proto::PodRef;

/// The `CNI_*` variables, by name.
pub type Vars = BTreeMap<String, String>;

pub const CNI_COMMAND: &str = "CNI_COMMAND";
pub const CNI_CONTAINERID: &str = "CNI_CONTAINERID";
pub const CNI_NETNS: &str = "CNI_NETNS";
pub const CNI_IFNAME: &str = "CNI_IFNAME";
pub const CNI_ARGS: &str = "CNI_ARGS";
pub const CNI_PATH: &str = "CNI_PATH";

/// Linux's IFNAMSIZ less the terminating NUL.
pub const MAX_IFNAME: usize = 15;

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CniCommand {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl CniCommand {
    pub const ALL: [CniCommand; 6] = [
        CniCommand::Add,
        CniCommand::Del,
        CniCommand::Check,
        CniCommand::Status,
        CniCommand::Gc,
        CniCommand::Version,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CniCommand::Add => "ADD",
            CniCommand::Del => "DEL",
            CniCommand::Check => "CHECK",
            CniCommand::Status => "STATUS",
            CniCommand::Gc => "GC",
            CniCommand::Version => "VERSION",
        }
    }

    /// The variables the command cannot do without. `CNI_PATH` is required
    /// wherever libcni's skeleton requires it (every command but VERSION):
    /// runtimes always set it, so its absence means a broken runtime.
    pub fn required(self) -> &'static [&'static str] {
        match self {
            CniCommand::Add | CniCommand::Check => {
                &[CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_PATH]
            }
            // DEL must work after the namespace is gone, so no CNI_NETNS.
            CniCommand::Del => &[CNI_CONTAINERID, CNI_IFNAME, CNI_PATH],
            CniCommand::Status | CniCommand::Gc => &[CNI_PATH],
            CniCommand::Version => &[],
        }
    }
}

impl fmt::Display for CniCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parsed environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CniEnv {
    pub command: CniCommand,
    /// Set (and valid) for ADD, DEL, CHECK.
    pub container_id: Option<String>,
    /// Set for ADD and CHECK; DEL may have it.
    pub netns: Option<String>,
    /// Set (and valid) for ADD, DEL, CHECK.
    pub ifname: Option<String>,
    pub path: Option<String>,
    /// From `CNI_ARGS` (ADD, DEL, CHECK only).
    pub pod: Option<PodRef>,
}

/// Keeps the `CNI_*` variables of the process environment; one that is not
/// UTF-8 is an error (code 4), never silently mangled.
pub fn from_os(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Result<Vars, Error> {
    let mut out = Vars::new();
    for (key, value) in vars {
        let Some(key) = key.to_str() else { continue };
        if !key.starts_with("CNI_") {
            continue;
        }
        let value = value
            .into_string()
            .map_err(|_| Error::NonUtf8Env { var: key.into() })?;
        out.insert(key.into(), value);
    }
    Ok(out)
}

fn get<'a>(vars: &'a Vars, name: &str) -> Option<&'a str> {
    vars.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// `CNI_COMMAND` alone: VERSION needs nothing else, and the command decides
/// what the rest of the parse requires.
pub fn parse_command(vars: &Vars) -> Result<CniCommand, Error> {
    let Some(value) = get(vars, CNI_COMMAND) else {
        return Err(Error::MissingEnv {
            vars: vec![CNI_COMMAND],
            command: "every command",
        });
    };
    CniCommand::ALL
        .into_iter()
        .find(|c| c.as_str() == value)
        .ok_or_else(|| Error::InvalidEnv {
            var: CNI_COMMAND,
            value: value.into(),
            problem: "not one of ADD, DEL, CHECK, STATUS, GC, VERSION".into(),
        })
}

/// The whole environment for `command`: every required variable present,
/// and the ones the command uses valid.
pub fn parse(command: CniCommand, vars: &Vars) -> Result<CniEnv, Error> {
    let required = command.required();
    let missing: Vec<&'static str> = required
        .iter()
        .copied()
        .filter(|name| get(vars, name).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(Error::MissingEnv {
            vars: missing,
            command: command.as_str(),
        });
    }
    let attachment = matches!(
        command,
        CniCommand::Add | CniCommand::Del | CniCommand::Check
    );
    let container_id = if attachment {
        get(vars, CNI_CONTAINERID)
            .map(|id| {
                validate_container_id(id).map_err(|problem| Error::InvalidEnv {
                    var: CNI_CONTAINERID,
                    value: id.into(),
                    problem,
                })?;
                Ok::<_, Error>(id.to_string())
            })
            .transpose()?
    } else {
        None
    };
    let ifname = if attachment {
        get(vars, CNI_IFNAME)
            .map(|name| {
                validate_ifname(name).map_err(|problem| Error::InvalidEnv {
                    var: CNI_IFNAME,
                    value: name.into(),
                    problem,
                })?;
                Ok::<_, Error>(name.to_string())
            })
            .transpose()?
    } else {
        None
    };
    let netns = if attachment {
        get(vars, CNI_NETNS).map(str::to_string)
    } else {
        None
    };
    let pod = if attachment {
        match get(vars, CNI_ARGS) {
            Some(args) => pod_from_args(&parse_args(args)?)?,
            None => None,
        }
    } else {
        None
    };
    Ok(CniEnv {
        command,
        container_id,
        netns,
        ifname,
        path: get(vars, CNI_PATH).map(str::to_string),
        pod,
    })
}

/// The spec's container ID: not empty, an alphanumeric first, then
/// alphanumerics, `_`, `.` or `-` (ASCII, as libcni's regular expression).
pub fn validate_container_id(id: &str) -> Result<(), String> {
    let mut chars = id.chars();
    match chars.next() {
        None => return Err("must not be empty".into()),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return Err(format!("must start with a letter or digit, not {c:?}"));
        }
        Some(_) => {}
    }
    match chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        Some(c) => Err(format!(
            "{c:?} is not allowed (only letters, digits, '_', '.' and '-')"
        )),
        None => Ok(()),
    }
}

/// The spec's (Linux's) interface name: 1 to 15 bytes, not `.` or `..`, no
/// `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_IFNAME {
        return Err(format!(
            "is {} bytes long; Linux allows at most {MAX_IFNAME}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err("must not be \".\" or \"..\"".into());
    }
    match name
        .chars()
        .find(|&c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some(c) => Err(format!("must not contain {c:?}")),
        None => Ok(()),
    }
}

/// `CNI_ARGS`: `K=V;K=V`. The value is everything after the first `=`;
/// empty segments (a trailing `;`) are skipped; a segment without `=` or with
/// an empty key is malformed (code 4).
pub fn parse_args(args: &str) -> Result<Vec<(String, String)>, Error> {
    let mut pairs = Vec::new();
    for segment in args.split(';') {
        if segment.is_empty() {
            continue;
        }
        match segment.split_once('=') {
            Some((key, value)) if !key.is_empty() => pairs.push((key.into(), value.into())),
            Some(_) => {
                return Err(Error::InvalidEnv {
                    var: CNI_ARGS,
                    value: args.into(),
                    problem: format!("pair {segment:?} has an empty key"),
                });
            }
            None => {
                return Err(Error::InvalidEnv {
                    var: CNI_ARGS,
                    value: args.into(),
                    problem: format!("pair {segment:?} is not KEY=VALUE"),
                });
            }
        }
    }
    Ok(pairs)
}

/// The pod from the `K8S_POD_*` keys; other keys (`IgnoreUnknown`,
/// `K8S_POD_INFRA_CONTAINER_ID`, …) are ignored. A runtime that is not
/// Kubernetes sets none of them: `None`. Later keys win over earlier ones.
pub fn pod_from_args(pairs: &[(String, String)]) -> Result<Option<PodRef>, Error> {
    let last = |key: &str| {
        pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let namespace = last("K8S_POD_NAMESPACE");
    let name = last("K8S_POD_NAME");
    let uid = last("K8S_POD_UID");
    match (namespace, name) {
        (Some(namespace), Some(name)) => Ok(Some(PodRef {
            namespace,
            name,
            uid,
        })),
        (None, None) if uid.is_none() => Ok(None),
        (namespace, name) => Err(Error::InvalidEnv {
            var: CNI_ARGS,
            value: render_args(pairs),
            problem: format!(
                "K8S_POD_NAMESPACE ({}) and K8S_POD_NAME ({}) must be set together",
                if namespace.is_some() {
                    "set"
                } else {
                    "missing"
                },
                if name.is_some() { "set" } else { "missing" },
            ),
        }),
    }
}

fn render_args(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::code;

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const K8S_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
                            K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=2b9c2c55-5a4e";

    fn add_vars() -> Vars {
        vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/cni-1234"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", K8S_ARGS),
        ])
    }

    #[test]
    fn parses_a_kubelet_style_add() {
        let v = add_vars();
        let env = parse(parse_command(&v).unwrap(), &v).unwrap();
        assert_eq!(
            env,
            CniEnv {
                command: CniCommand::Add,
                container_id: Some("abc123".into()),
                netns: Some("/var/run/netns/cni-1234".into()),
                ifname: Some("eth0".into()),
                path: Some("/opt/cni/bin".into()),
                pod: Some(PodRef {
                    namespace: "default".into(),
                    name: "web-0".into(),
                    uid: Some("2b9c2c55-5a4e".into()),
                }),
            }
        );
    }

    #[test]
    fn each_command_requires_what_the_spec_says() {
        // (command, variables removed, expected missing list or None for ok)
        let cases: &[(&str, &[&str], Option<&str>)] = &[
            (
                "ADD",
                &["CNI_NETNS"],
                Some("CNI_NETNS is not set (required for ADD)"),
            ),
            (
                "ADD",
                &["CNI_CONTAINERID", "CNI_IFNAME"],
                Some("CNI_CONTAINERID, CNI_IFNAME are not set (required for ADD)"),
            ),
            (
                "CHECK",
                &["CNI_PATH"],
                Some("CNI_PATH is not set (required for CHECK)"),
            ),
            ("DEL", &["CNI_NETNS", "CNI_ARGS"], None),
            (
                "DEL",
                &["CNI_IFNAME"],
                Some("CNI_IFNAME is not set (required for DEL)"),
            ),
            (
                "STATUS",
                &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"],
                None,
            ),
            (
                "STATUS",
                &["CNI_PATH"],
                Some("CNI_PATH is not set (required for STATUS)"),
            ),
            ("GC", &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"], None),
            (
                "GC",
                &["CNI_PATH"],
                Some("CNI_PATH is not set (required for GC)"),
            ),
            (
                "VERSION",
                &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
                None,
            ),
        ];
        for (command, removed, want) in cases {
            let mut v = add_vars();
            v.insert("CNI_COMMAND".into(), command.to_string());
            for r in *removed {
                v.remove(*r);
            }
            let got = parse(parse_command(&v).unwrap(), &v);
            match want {
                None => assert!(got.is_ok(), "{command} without {removed:?}: {got:?}"),
                Some(msg) => {
                    let e = got.unwrap_err();
                    assert_eq!(e.code(), code::INVALID_ENVIRONMENT);
                    assert_eq!(e.to_string(), *msg);
                }
            }
        }
    }

    #[test]
    fn an_empty_variable_counts_as_unset() {
        let mut v = add_vars();
        v.insert("CNI_IFNAME".into(), String::new());
        let e = parse(CniCommand::Add, &v).unwrap_err();
        assert_eq!(e.to_string(), "CNI_IFNAME is not set (required for ADD)");
    }

    #[test]
    fn status_and_gc_ignore_attachment_variables_even_if_invalid() {
        let mut v = add_vars();
        v.insert("CNI_IFNAME".into(), "bad/name".into());
        v.insert("CNI_ARGS".into(), "garbage".into());
        let env = parse(CniCommand::Gc, &v).unwrap();
        assert_eq!(env.ifname, None);
        assert_eq!(env.pod, None);
    }

    #[test]
    fn command_is_required_and_must_be_known() {
        let e = parse_command(&vars(&[])).unwrap_err();
        assert_eq!(e.code(), 4);
        assert_eq!(
            e.to_string(),
            "CNI_COMMAND is not set (required for every command)"
        );
        let e = parse_command(&vars(&[("CNI_COMMAND", "add")])).unwrap_err();
        assert_eq!(e.code(), 4);
        assert_eq!(
            e.to_string(),
            "CNI_COMMAND=\"add\" is invalid: not one of ADD, DEL, CHECK, STATUS, GC, VERSION"
        );
        for c in CniCommand::ALL {
            assert_eq!(
                parse_command(&vars(&[("CNI_COMMAND", c.as_str())])).unwrap(),
                c
            );
        }
    }

    #[test]
    fn container_ids() {
        let ok = [
            "a",
            "0",
            "abc123",
            "a_b.c-d",
            "2b9c2c55f9a1e3f4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c",
        ];
        for id in ok {
            assert_eq!(validate_container_id(id), Ok(()), "{id}");
        }
        let bad = [
            ("", "must not be empty"),
            ("-abc", "must start with a letter or digit, not '-'"),
            ("_abc", "must start with a letter or digit, not '_'"),
            (".abc", "must start with a letter or digit, not '.'"),
            (
                "ab/c",
                "'/' is not allowed (only letters, digits, '_', '.' and '-')",
            ),
            (
                "ab c",
                "' ' is not allowed (only letters, digits, '_', '.' and '-')",
            ),
            (
                "abé",
                "'é' is not allowed (only letters, digits, '_', '.' and '-')",
            ),
            ("éab", "must start with a letter or digit, not 'é'"),
        ];
        for (id, problem) in bad {
            assert_eq!(validate_container_id(id), Err(problem.to_string()), "{id}");
        }
    }

    #[test]
    fn interface_names() {
        for name in ["eth0", "net1", "a", "...", "a.b", "123456789012345", "é"] {
            assert_eq!(validate_ifname(name), Ok(()), "{name}");
        }
        let bad = [
            ("", "must not be empty"),
            (
                "1234567890123456",
                "is 16 bytes long; Linux allows at most 15",
            ),
            ("éééééééé", "is 16 bytes long; Linux allows at most 15"),
            (".", "must not be \".\" or \"..\""),
            ("..", "must not be \".\" or \"..\""),
            ("eth/0", "must not contain '/'"),
            ("eth:0", "must not contain ':'"),
            ("eth 0", "must not contain ' '"),
            ("eth\t0", "must not contain '\\t'"),
        ];
        for (name, problem) in bad {
            assert_eq!(validate_ifname(name), Err(problem.to_string()), "{name:?}");
        }
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let mut v = add_vars();
        v.insert("CNI_CONTAINERID".into(), "-bad".into());
        let e = parse(CniCommand::Del, &v).unwrap_err();
        assert_eq!(e.code(), 4);
        assert_eq!(
            e.to_string(),
            "CNI_CONTAINERID=\"-bad\" is invalid: must start with a letter or digit, not '-'"
        );
        let mut v = add_vars();
        v.insert("CNI_IFNAME".into(), "a-very-long-ifname".into());
        let e = parse(CniCommand::Check, &v).unwrap_err();
        assert_eq!(
            e.to_string(),
            "CNI_IFNAME=\"a-very-long-ifname\" is invalid: is 18 bytes long; Linux allows at most 15"
        );
    }

    #[test]
    fn cni_args() {
        let pairs = parse_args(K8S_ARGS).unwrap();
        assert_eq!(pairs.len(), 5);
        assert_eq!(pairs[0], ("IgnoreUnknown".into(), "1".into()));
        // The value keeps any further '='; empty segments are skipped.
        assert_eq!(
            parse_args("A=b=c;;B=;").unwrap(),
            vec![("A".into(), "b=c".into()), ("B".into(), String::new())]
        );
        assert_eq!(parse_args("").unwrap(), vec![]);
        let cases = [
            ("FOO", "pair \"FOO\" is not KEY=VALUE"),
            ("A=1;BAR;C=2", "pair \"BAR\" is not KEY=VALUE"),
            ("=1", "pair \"=1\" has an empty key"),
        ];
        for (args, problem) in cases {
            let e = parse_args(args).unwrap_err();
            assert_eq!(e.code(), 4);
            assert_eq!(
                e.to_string(),
                format!("CNI_ARGS={args:?} is invalid: {problem}")
            );
        }
    }

    #[test]
    fn pods_from_args() {
        let pod = |s: &str| pod_from_args(&parse_args(s).unwrap());
        assert_eq!(pod("IgnoreUnknown=1").unwrap(), None);
        assert_eq!(
            pod("K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns").unwrap(),
            Some(PodRef {
                namespace: "kube-system".into(),
                name: "dns".into(),
                uid: None,
            })
        );
        assert_eq!(
            pod("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;K8S_POD_NAMESPACE=c")
                .unwrap()
                .unwrap()
                .namespace,
            "c"
        );
        let e = pod("K8S_POD_NAME=web").unwrap_err();
        assert_eq!(e.code(), 4);
        assert_eq!(
            e.to_string(),
            "CNI_ARGS=\"K8S_POD_NAME=web\" is invalid: K8S_POD_NAMESPACE (missing) and \
             K8S_POD_NAME (set) must be set together"
        );
        assert!(pod("K8S_POD_UID=u").is_err());
    }

    #[test]
    fn a_malformed_cni_args_fails_add_with_code_4() {
        let mut v = add_vars();
        v.insert("CNI_ARGS".into(), "K8S_POD_NAME".into());
        assert_eq!(parse(CniCommand::Add, &v).unwrap_err().code(), 4);
    }

    #[test]
    fn from_os_keeps_cni_variables_and_rejects_non_utf8() {
        use std::os::unix::ffi::OsStringExt;
        let got = from_os([
            (OsString::from("PATH"), OsString::from("/usr/bin")),
            (OsString::from("CNI_COMMAND"), OsString::from("ADD")),
            (OsString::from_vec(vec![0xff]), OsString::from("x")),
        ])
        .unwrap();
        assert_eq!(got, vars(&[("CNI_COMMAND", "ADD")]));
        let e = from_os([(
            OsString::from("CNI_NETNS"),
            OsString::from_vec(vec![b'/', 0xff]),
        )])
        .unwrap_err();
        assert_eq!(e.code(), 4);
        assert_eq!(e.to_string(), "CNI_NETNS is not valid UTF-8");
    }
}
