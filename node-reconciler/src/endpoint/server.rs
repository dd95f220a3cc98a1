//! The unix socket the CNI binary talks to (see `trellis_cni::proto`).
//!
//! ```text
//!  <run-dir>/cni.sock ─accept─▶ task per connection: one line (≤ MAX_MESSAGE, READ_TIMEOUT)
//!     ─▶ decode (version → code 1, shape → code 6) ─▶ Endpoints::handle ─▶ one line back ─▶ close
//! ```
//!
//! A request runs to its end even if the client goes away meanwhile: the
//! endpoint then exists and the runtime's retry (ADD again, or DEL) finds it.

use std::io;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument as _;
use trellis_cni::proto::{
    Command, ErrorReply, MAX_MESSAGE, PROTOCOL_VERSION, Request, Response, code,
};
use trellis_common::process::until_true;

use super::service::Endpoints;
use crate::metrics::{CniCommand, CniResult, Metrics};

/// The socket's file name in `--run-dir`.
pub const SOCKET_NAME: &str = "cni.sock";
/// Longest socket path: `sun_path` has 108 bytes, one for the final NUL.
pub const MAX_SOCKET_PATH: usize = 107;
/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to read the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight may take to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "socket path {} is {len} bytes, over the {MAX_SOCKET_PATH} a unix socket path can have; \
         choose a shorter --run-dir",
        path.display()
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another process is serving {}: is another trellis-node using the same --run-dir?",
        path.display()
    )]
    InUse { path: PathBuf },
}

/// `<run_dir>/cni.sock`, or why it cannot be a socket path.
pub fn socket_path(run_dir: &Path) -> Result<PathBuf, ServerError> {
    let path = run_dir.join(SOCKET_NAME);
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ServerError::PathTooLong { path, len });
    }
    Ok(path)
}

/// The listening socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    /// Creates `run_dir` (0755), replaces a stale socket (refusing a live
    /// one) and listens on `<run_dir>/cni.sock` (0660: root and the
    /// runtime's group).
    pub async fn bind(run_dir: &Path) -> Result<Server, ServerError> {
        let path = socket_path(run_dir)?;
        let io_error = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| ServerError::Io {
                action,
                path,
                source,
            }
        };
        if !run_dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(run_dir)
                .map_err(io_error("create", run_dir))?;
            // Whatever the umask: the runtime's plugin must reach the socket.
            std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io_error("set the mode of", run_dir))?;
        }
        if std::fs::symlink_metadata(&path).is_ok() {
            if UnixStream::connect(&path).await.is_ok() {
                return Err(ServerError::InUse { path });
            }
            std::fs::remove_file(&path).map_err(io_error("remove the stale socket", &path))?;
        }
        let listener = UnixListener::bind(&path).map_err(io_error("listen on", &path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
            .map_err(io_error("set the mode of", &path))?;
        Ok(Server { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `shutdown` turns true, then gives requests in flight
    /// [`SHUTDOWN_GRACE`] to finish and removes the socket.
    pub async fn serve(
        self,
        endpoints: Arc<Endpoints>,
        metrics: Metrics,
        shutdown: watch::Receiver<bool>,
    ) {
        tracing::info!(socket = %self.path.display(), "serving CNI requests");
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tasks.spawn(connection(stream, endpoints.clone(), metrics.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors, most likely: let some close.
                        tracing::warn!(error = %e, "cannot accept a CNI connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                () = until_true(shutdown.clone()) => break,
            }
        }
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "CNI requests still running at shutdown; a restart rolls back unfinished ADDs"
            );
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, endpoints.settled())
            .await
            .is_err()
        {
            tracing::warn!(
                "answered DELs still deleting veths at shutdown; a restart finishes them"
            );
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn connection(stream: UnixStream, endpoints: Arc<Endpoints>, metrics: Metrics) {
    let (read, mut write) = stream.into_split();
    let response = match tokio::time::timeout(READ_TIMEOUT, read_line(read)).await {
        Ok(Ok(line)) => respond(&endpoints, &metrics, &line).await,
        Ok(Err(reply)) => refuse(&metrics, reply),
        Err(_) => refuse(
            &metrics,
            ErrorReply::new(
                code::IO_FAILURE,
                format!("no complete request within {} s", READ_TIMEOUT.as_secs()),
                "",
            ),
        ),
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        write.write_all(&out).await?;
        write.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        tracing::debug!("the CNI client left before reading its response");
    }
}

/// Decodes and serves one request line; a span per request, counted by
/// command and result.
pub async fn respond(endpoints: &Endpoints, metrics: &Metrics, line: &[u8]) -> Response {
    let started = Instant::now();
    let request = match decode(line) {
        Ok(r) => r,
        Err(reply) => return refuse(metrics, reply),
    };
    let command = CniCommand::of(&request.command);
    let (container_id, ifname) = match &request.command {
        Command::Add { attachment, .. }
        | Command::Del { attachment, .. }
        | Command::Check { attachment, .. } => {
            (attachment.container_id.as_str(), attachment.ifname.as_str())
        }
        Command::Status | Command::Gc { .. } => ("", ""),
    };
    let span = tracing::info_span!("cni", command = command.as_str(), container_id, ifname);
    let response = endpoints
        .handle(request.command)
        .instrument(span.clone())
        .await;
    let took = started.elapsed();
    let result = match &response {
        Response::Error(e) => {
            span.in_scope(|| tracing::warn!(code = e.code, error = %e.msg, "CNI request failed"));
            CniResult::of_code(e.code)
        }
        _ => {
            span.in_scope(|| tracing::debug!(took_ms = took.as_millis(), "CNI request served"));
            CniResult::Ok
        }
    };
    metrics.cni_request(command, result, took);
    response
}

fn refuse(metrics: &Metrics, reply: ErrorReply) -> Response {
    tracing::warn!(code = reply.code, error = %reply.msg, "CNI request refused");
    metrics.cni_request(
        CniCommand::Invalid,
        CniResult::of_code(reply.code),
        Duration::ZERO,
    );
    Response::Error(reply)
}

/// A request line, or the error to answer: code 1 for another protocol
/// version (checked first, so a future request shape still gets the right
/// answer), code 6 for anything that does not decode.
pub fn decode(line: &[u8]) -> Result<Request, ErrorReply> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let undecodable = |e: serde_json::Error| {
        ErrorReply::new(
            code::DECODING_FAILURE,
            format!("cannot decode the request: {e}"),
            "",
        )
    };
    let versioned: Versioned = serde_json::from_slice(line).map_err(undecodable)?;
    if versioned.version != PROTOCOL_VERSION {
        return Err(ErrorReply::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "protocol version {} is not served: this trellis-node speaks version \
                 {PROTOCOL_VERSION} (the CNI binary and trellis-node come from different releases)",
                versioned.version
            ),
            "",
        ));
    }
    serde_json::from_slice(line).map_err(undecodable)
}

/// One line (without its newline), at most [`MAX_MESSAGE`] bytes with it.
/// End of input also ends a line.
async fn read_line(r: impl AsyncRead + Unpin) -> Result<Vec<u8>, ErrorReply> {
    let limit = u64::try_from(MAX_MESSAGE).unwrap_or(u64::MAX);
    let mut reader = BufReader::new(r.take(limit));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await.map_err(|e| {
        ErrorReply::new(
            code::IO_FAILURE,
            format!("cannot read the request: {e}"),
            "",
        )
    })?;
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(line);
    }
    if line.len() >= MAX_MESSAGE {
        return Err(ErrorReply::new(
            code::DECODING_FAILURE,
            format!("the request exceeds {MAX_MESSAGE} bytes"),
            "",
        ));
    }
    if line.is_empty() {
        return Err(ErrorReply::new(code::DECODING_FAILURE, "empty request", ""));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn socket_paths_over_107_bytes_are_refused() {
        let ok = format!(
            "/{}",
            "r".repeat(MAX_SOCKET_PATH - 1 - SOCKET_NAME.len() - 1)
        );
        let path = socket_path(Path::new(&ok)).unwrap();
        assert_eq!(path.as_os_str().len(), MAX_SOCKET_PATH);
        let long = format!("{ok}x");
        let err = socket_path(Path::new(&long)).unwrap_err();
        assert!(err.to_string().contains("108 bytes"), "{err}");
        assert!(err.to_string().contains("--run-dir"), "{err}");
        assert_eq!(
            socket_path(Path::new("/run/trellis")).unwrap(),
            Path::new("/run/trellis/cni.sock")
        );
    }

    #[test]
    fn versions_are_checked_before_the_shape() {
        let ok = br#"{"version":1,"network":"trellis","command":{"type":"STATUS"}}"#;
        assert_eq!(decode(ok).unwrap().command, Command::Status);
        let future = br#"{"version":2,"network":"trellis","command":{"type":"NEW"}}"#;
        assert_eq!(decode(future).unwrap_err().code, code::INCOMPATIBLE_VERSION);
        for bad in [
            &b"not json"[..],
            br#"{"network":"trellis"}"#,
            br#"{"version":1,"network":"trellis","command":{"type":"NEW"}}"#,
            br#"{"version":1,"network":"trellis","command":{"type":"ADD"}}"#,
        ] {
            assert_eq!(
                decode(bad).unwrap_err().code,
                code::DECODING_FAILURE,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn a_live_socket_is_refused_a_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let first = Server::bind(&run).await.unwrap();
        let err = Server::bind(&run).await.unwrap_err();
        assert!(matches!(err, ServerError::InUse { .. }), "{err}");
        drop(first);
        // The file stays behind a dead listener: stale, so replaced.
        assert!(run.join(SOCKET_NAME).exists());
        let again = Server::bind(&run).await.unwrap();
        let mode = std::fs::metadata(again.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660);
        let dir_mode = std::fs::metadata(&run).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o755);
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        assert_eq!(read_line(&b"{}\nmore"[..]).await.unwrap(), b"{}");
        assert_eq!(read_line(&b"{}"[..]).await.unwrap(), b"{}");
        assert_eq!(
            read_line(&b""[..]).await.unwrap_err().code,
            code::DECODING_FAILURE
        );
        let huge = vec![b'x'; MAX_MESSAGE + 10];
        let err = read_line(&huge[..]).await.unwrap_err();
        assert!(err.msg.contains("exceeds"), "{}", err.msg);
        let mut exact = vec![b'x'; MAX_MESSAGE - 1];
        exact.push(b'\n');
        assert_eq!(read_line(&exact[..]).await.unwrap().len(), MAX_MESSAGE - 1);
    }
}
