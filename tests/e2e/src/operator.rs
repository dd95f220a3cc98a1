//! `trellis-operator` in the sandbox: which binary, its command line, and its readiness probe.
//! [`crate::ControlPlane::start`] runs it as one more detached, recorded process once the CRDs
//! are in, the `trellis-system` namespace exists and the sandbox's Nodes are created.
//!
//! ```text
//! $TRELLIS_OPERATOR ──or── cargo build -q [--release] -p trellis-operator -p trellis-node --bins
//!         │
//!         ▼
//! trellis-operator --kubeconfig <state>/operator.kubeconfig --identity trellis-operator-0
//!                  --leader-election-namespace trellis-system --metrics-addr 127.0.0.1:<free>
//!                  [OperatorOptions::extra_args]
//!         │
//!         └── ready when GET http://127.0.0.1:<port>/readyz answers 200 (caches synced)
//! ```

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::error::Result;

/// The operator's process name in the state directory (`pids/`, `logs/`).
pub const NAME: &str = "trellis-operator";
/// Environment variable naming an operator binary to run instead of building one.
pub const BINARY_ENV: &str = crate::binaries::OPERATOR.env_var;
/// The operator's identity in its leader-election Lease.
pub const DEFAULT_IDENTITY: &str = "trellis-operator-0";
/// Namespace of the operator's Lease (and of Trellis' own objects in a real cluster).
pub const SYSTEM_NAMESPACE: &str = "trellis-system";

/// How to run the operator in the sandbox.
#[derive(Debug, Clone)]
pub struct OperatorOptions {
    /// Binary to run; `None`: `$TRELLIS_OPERATOR`, else built with cargo (see [`resolve`]).
    pub binary: Option<PathBuf>,
    /// Identity in the leader-election Lease.
    pub identity: String,
    /// `RUST_LOG` for the operator; `None` removes an inherited `RUST_LOG`, so it logs at its
    /// own default level whatever the sandbox runs with.
    pub log_filter: Option<String>,
    /// More flags, after those of [`args`] (e.g. `--identity-gc-grace-seconds 2`).
    pub extra_args: Vec<String>,
}

impl Default for OperatorOptions {
    fn default() -> Self {
        OperatorOptions {
            binary: None,
            identity: DEFAULT_IDENTITY.to_string(),
            log_filter: None,
            extra_args: Vec::new(),
        }
    }
}

/// The operator's command line.
pub fn args(kubeconfig: &Path, identity: &str, metrics_port: u16) -> Vec<String> {
    vec![
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--identity".into(),
        identity.into(),
        "--leader-election-namespace".into(),
        SYSTEM_NAMESPACE.into(),
        "--metrics-addr".into(),
        format!("127.0.0.1:{metrics_port}"),
    ]
}

/// Whether this crate was built with optimisations; the operator is then built the same way.
pub fn release_build() -> bool {
    crate::binaries::release_build()
}

/// The operator binary: `$TRELLIS_OPERATOR` if set, else built with cargo (see
/// [`CargoBinary::resolve`](crate::binaries::CargoBinary::resolve)).
pub async fn resolve(repo_root: &Path) -> Result<PathBuf> {
    crate::binaries::OPERATOR.resolve(repo_root).await
}

/// Where the sandbox's cargo build puts the operator for this crate's profile.
pub fn built_binary(repo_root: &Path) -> PathBuf {
    crate::binaries::OPERATOR.built_path(repo_root)
}

/// `Ok` once the operator's `GET /readyz` on `127.0.0.1:<port>` answers 200 (its caches are
/// synced), else what it answered or why there was no answer within `timeout`.
pub async fn readyz(port: u16, timeout: Duration) -> std::result::Result<(), String> {
    probe(port, "/readyz", timeout).await
}

/// `Ok` once `GET <path>` on `127.0.0.1:<port>` answers 200, else what it answered or why
/// there was no answer within `timeout`. The operator's and the node agents' `/healthz` and
/// `/readyz` are probed with it.
pub async fn probe(port: u16, path: &str, timeout: Duration) -> std::result::Result<(), String> {
    let (status, body) = http_get(port, path, timeout).await?;
    if status == 200 {
        Ok(())
    } else {
        Err(format!("{path} answered {status}: {}", body.trim()))
    }
}

/// A plain HTTP/1.0 `GET` on `127.0.0.1:<port>`: the status code and the body.
pub async fn http_get(
    port: u16,
    path: &str,
    timeout: Duration,
) -> std::result::Result<(u16, String), String> {
    let exchange = async {
        let mut stream =
            tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    parse_response(&String::from_utf8_lossy(&response))
}

/// The status code and body of an HTTP/1.x response.
pub fn parse_response(response: &str) -> std::result::Result<(u16, String), String> {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("malformed HTTP response {response:?}"))?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("malformed status line {status_line:?}"))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let args = args(Path::new("/s/kubeconfig"), "trellis-operator-0", 4242);
        assert_eq!(
            args,
            [
                "--kubeconfig",
                "/s/kubeconfig",
                "--identity",
                "trellis-operator-0",
                "--leader-election-namespace",
                "trellis-system",
                "--metrics-addr",
                "127.0.0.1:4242",
            ]
        );
    }

    #[test]
    fn parses_http_responses() {
        assert_eq!(
            parse_response("HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"),
            Ok((200, "ok".into()))
        );
        assert_eq!(
            parse_response("HTTP/1.1 503 Service Unavailable\r\n\r\ncaches not synced"),
            Ok((503, "caches not synced".into()))
        );
        assert!(parse_response("").is_err());
        assert!(parse_response("HTTP/1.0 abc\r\n\r\n").is_err());
    }

    #[test]
    fn built_binary_follows_the_profile() {
        let path = built_binary(Path::new("/repo"));
        if std::env::var_os("CARGO_TARGET_DIR").is_none() {
            let profile = if release_build() { "release" } else { "debug" };
            assert_eq!(
                path,
                PathBuf::from(format!("/repo/target/{profile}/trellis-operator"))
            );
        }
        assert!(path.ends_with("trellis-operator"));
    }
}
