//! The one blocking exchange with trellis-node.
//!
//! ```text
//!  connect(socket) ──▶ write Request JSON + '\n' ──▶ read one line (≤ MAX_MESSAGE) ──▶ Response
//!   code 11 on refusal, a missing socket, a hang-up or timeoutSeconds running out
//! ```
//!
//! Plain std, no async runtime: the binary runs once per pod operation and
//! must start fast.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::proto::{MAX_MESSAGE, Request, Response};

/// How a request reaches trellis-node: the unix socket, or a fake in tests.
pub trait Transport {
    fn call(
        &mut self,
        socket: &Path,
        timeout: Duration,
        request: &Request,
    ) -> Result<Response, Error>;
}

/// The real transport: one connection per request.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnixTransport;

impl Transport for UnixTransport {
    fn call(
        &mut self,
        socket: &Path,
        timeout: Duration,
        request: &Request,
    ) -> Result<Response, Error> {
        let deadline = Instant::now() + timeout;
        let line = encode(request)?;
        let stream = connect(socket, timeout)?;
        let io_err = |stage: &'static str| {
            let socket = socket.to_path_buf();
            move |source: io::Error| io_error(socket, stage, timeout, source)
        };
        stream
            .set_write_timeout(Some(remaining(deadline, socket, "send request", timeout)?))
            .map_err(io_err("send request"))?;
        (&stream).write_all(&line).map_err(io_err("send request"))?;
        stream
            .set_read_timeout(Some(remaining(deadline, socket, "read response", timeout)?))
            .map_err(io_err("read response"))?;
        read_response(&stream).map_err(|e| match e {
            ReadError::Io(source) => io_err("read response")(source),
            ReadError::Closed => Error::Unreachable {
                socket: socket.to_path_buf(),
                stage: "read response",
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "trellis-node closed the connection without answering",
                ),
            },
            ReadError::TooLarge => Error::Protocol {
                problem: format!("the response is larger than {MAX_MESSAGE} bytes"),
            },
            ReadError::Decode(e) => Error::Protocol {
                problem: format!("cannot decode the response: {e}"),
            },
        })
    }
}

/// The request as one line; refused locally if the node would refuse it.
pub fn encode(request: &Request) -> Result<Vec<u8>, Error> {
    let mut line = serde_json::to_vec(request).map_err(|e| Error::Protocol {
        problem: format!("cannot encode the request: {e}"),
    })?;
    line.push(b'\n');
    if line.len() > MAX_MESSAGE {
        return Err(Error::Protocol {
            problem: format!(
                "the request is {} bytes, more than the protocol's {MAX_MESSAGE}",
                line.len()
            ),
        });
    }
    Ok(line)
}

/// `connect(2)` on a unix socket blocks while the listener's backlog is full
/// (a wedged trellis-node), and std has no connect timeout for unix sockets:
/// connect on a helper thread and stop waiting at the timeout.
fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, Error> {
    let (tx, rx) = mpsc::channel();
    let path = socket.to_path_buf();
    let spawned = thread::Builder::new()
        .name("connect".into())
        .spawn(move || {
            // The receiver is gone only after a timeout; nothing to report.
            let _ = tx.send(UnixStream::connect(&path));
        });
    let result = match spawned {
        Ok(_) => match rx.recv_timeout(timeout) {
            Ok(result) => result,
            Err(_) => {
                return Err(Error::TimedOut {
                    socket: socket.to_path_buf(),
                    stage: "connect",
                    timeout,
                });
            }
        },
        // No thread to be had: connect without the timeout.
        Err(_) => UnixStream::connect(socket),
    };
    result.map_err(|source| Error::Unreachable {
        socket: socket.to_path_buf(),
        stage: "connect",
        source,
    })
}

fn remaining(
    deadline: Instant,
    socket: &Path,
    stage: &'static str,
    timeout: Duration,
) -> Result<Duration, Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    // A zero timeout means "block forever" to setsockopt; std refuses it.
    if left.is_zero() {
        return Err(Error::TimedOut {
            socket: socket.to_path_buf(),
            stage,
            timeout,
        });
    }
    Ok(left)
}

fn io_error(socket: PathBuf, stage: &'static str, timeout: Duration, source: io::Error) -> Error {
    match source.kind() {
        // SO_RCVTIMEO/SO_SNDTIMEO expiring shows as EAGAIN.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::TimedOut {
            socket,
            stage,
            timeout,
        },
        _ => Error::Unreachable {
            socket,
            stage,
            source,
        },
    }
}

/// Why a response could not be read.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    /// End of stream before any byte.
    Closed,
    TooLarge,
    Decode(serde_json::Error),
}

/// Reads one response line of at most [`MAX_MESSAGE`] bytes (newline
/// included). A last line without its newline is accepted if it decodes.
pub fn read_response(reader: impl io::Read) -> Result<Response, ReadError> {
    let limit = u64::try_from(MAX_MESSAGE)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let mut buf = Vec::new();
    BufReader::new(reader.take(limit))
        .read_until(b'\n', &mut buf)
        .map_err(ReadError::Io)?;
    if buf.is_empty() {
        return Err(ReadError::Closed);
    }
    if buf.len() > MAX_MESSAGE {
        return Err(ReadError::TooLarge);
    }
    serde_json::from_slice(&buf).map_err(ReadError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Command, ErrorReply, PROTOCOL_VERSION};
    use std::os::unix::net::UnixListener;

    fn status() -> Request {
        Request {
            version: PROTOCOL_VERSION,
            network: "trellis".into(),
            command: Command::Status,
        }
    }

    #[test]
    fn reads_one_line_and_tolerates_a_missing_newline() {
        let r = read_response(&b"{\"type\":\"deleted\"}\n{\"type\":\"x\"}"[..]).unwrap();
        assert_eq!(r, Response::Deleted);
        let r = read_response(&b"{\"type\":\"deleted\"}"[..]).unwrap();
        assert_eq!(r, Response::Deleted);
        assert!(matches!(read_response(&b""[..]), Err(ReadError::Closed)));
        assert!(matches!(
            read_response(&b"{\"type\":\"bogus\"}\n"[..]),
            Err(ReadError::Decode(_))
        ));
        let huge = vec![b' '; MAX_MESSAGE + 5];
        assert!(matches!(read_response(&huge[..]), Err(ReadError::TooLarge)));
    }

    #[test]
    fn a_missing_socket_is_code_11_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("absent.sock");
        let e = UnixTransport
            .call(&socket, Duration::from_secs(2), &status())
            .unwrap_err();
        assert_eq!(e.code(), 11);
        assert_eq!(
            e.to_string(),
            format!("trellis-node is unreachable at {}", socket.display())
        );
        assert!(
            e.details()
                .starts_with("connect: No such file or directory"),
            "{}",
            e.details()
        );
    }

    #[test]
    fn a_socket_without_listener_is_code_11_connection_refused() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("dead.sock");
        drop(UnixListener::bind(&socket).unwrap());
        let e = UnixTransport
            .call(&socket, Duration::from_secs(2), &status())
            .unwrap_err();
        assert_eq!(e.code(), 11);
        assert!(
            e.details().starts_with("connect: Connection refused"),
            "{}",
            e.details()
        );
    }

    #[test]
    fn a_silent_node_times_out_with_code_11() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("slow.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            thread::sleep(Duration::from_millis(3000));
            drop(conn);
        });
        let started = Instant::now();
        let e = UnixTransport
            .call(&socket, Duration::from_secs(1), &status())
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(2500));
        assert_eq!(e.code(), 11);
        assert_eq!(
            e.to_string(),
            format!(
                "trellis-node at {} did not answer within 1s",
                socket.display()
            )
        );
        server.join().unwrap();
    }

    #[test]
    fn exchanges_one_request_and_response() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("node.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line).unwrap();
            let req: Request = serde_json::from_str(&line).unwrap();
            let reply = Response::Error(ErrorReply::new(100, "no free address", ""));
            let mut out = serde_json::to_vec(&reply).unwrap();
            out.push(b'\n');
            (&conn).write_all(&out).unwrap();
            req
        });
        let resp = UnixTransport
            .call(&socket, Duration::from_secs(5), &status())
            .unwrap();
        assert_eq!(
            resp,
            Response::Error(ErrorReply::new(100, "no free address", ""))
        );
        assert_eq!(server.join().unwrap(), status());
    }

    #[test]
    fn a_node_hanging_up_without_answer_is_code_11() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("crash.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line).unwrap();
        });
        let e = UnixTransport
            .call(&socket, Duration::from_secs(5), &status())
            .unwrap_err();
        server.join().unwrap();
        assert_eq!(e.code(), 11);
        assert!(
            e.details()
                .contains("closed the connection without answering")
        );
    }
}
