//! Real traffic for the truth tables: a server per pod that answers with the pod's name on
//! TCP and UDP ports, and a probe that opens one connection and says whether the right pod
//! answered in time.
//!
//! ```text
//!  pod y/b's netns                                   pod x/a's netns
//!  ┌──────────────────────────────┐                  ┌─────────────────────────┐
//!  │ TCP  0.0.0.0:80, :81  accept ├─ "y/b\n" ──────► │ probe TCP 10.244.1.2:80 │
//!  │ UDP  0.0.0.0:80, :81  echo   ├─ "y/b"   ──────► │ probe UDP 10.244.1.2:81 │
//!  └──────────────────────────────┘                  └─────────────────────────┘
//! ```
//!
//! Sockets are made on a short-lived thread that entered the pod's network namespace (a socket
//! stays in the namespace it was made in wherever it is used afterwards), and all I/O runs on
//! tokio in the test process, as `tests/pods.rs` does: no tool in the pods, no process per
//! probe, and nothing to clean up after a crash (the sockets die with the process). The
//! `trellis-probe` binary runs the same [`serve`] and [`probe`] in its own namespace, to
//! reproduce a table cell by hand (`trellis-sandbox pod exec`).
//!
//! A denied connection looks like silence: policy drops the packet, so a TCP connect or a UDP
//! request gets no answer within the timeout. A refusal (RST, ICMP unreachable) or an answer
//! from the wrong pod is not allowed either, and says so.

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    task::JoinSet,
};

use super::oracle::Protocol;

/// How long a probe waits for a TCP handshake or a UDP answer: what a denial costs.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest name a server answers with (`namespace/name`: 63 + 1 + 253).
const MAX_ANSWER: usize = 320;

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// The server answered with this name.
    Answered(String),
    /// No answer within the timeout: a dropped packet.
    TimedOut,
    /// Refused: a TCP reset or an ICMP error (nothing listening, or a rejecting datapath).
    Refused,
    /// Anything else (unreachable, a connection that broke off).
    Failed(String),
}

impl Observed {
    /// Whether this is the connection `expected_answer` serves getting through.
    pub fn is_allowed(&self, expected_answer: &str) -> bool {
        matches!(self, Observed::Answered(name) if name == expected_answer)
    }
}

impl fmt::Display for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Observed::Answered(name) => write!(f, "answered by {name}"),
            Observed::TimedOut => f.write_str("no answer before the timeout"),
            Observed::Refused => f.write_str("refused"),
            Observed::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// Runs `make` in network namespace `netns` (on a thread that entered it), or right here when
/// `netns` is `None`.
pub fn in_netns<T: Send + 'static>(
    netns: Option<&Path>,
    make: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let Some(netns) = netns else {
        return make();
    };
    let path = netns.to_path_buf();
    std::thread::Builder::new()
        .name("trellis-netns".into())
        .spawn(move || {
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| io::Error::other(format!("setns {}: {e}", path.display())))?;
            make()
        })?
        .join()
        .map_err(|_| io::Error::other("the thread making a socket in a namespace panicked"))?
}

/// A pod's servers; they stop when this is dropped.
pub struct Servers {
    name: String,
    netns: Option<PathBuf>,
    tasks: JoinSet<()>,
}

impl Servers {
    /// What the servers answer with.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    /// Runs until every server failed (they do not end otherwise); for the binary.
    pub async fn run(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Serve TCP and UDP on every port of `ports` on every address of `netns` (the current
/// namespace when `None`), answering each connection or datagram with `name`.
pub async fn serve(netns: Option<&Path>, name: &str, ports: &[u16]) -> io::Result<Servers> {
    let mut tasks = JoinSet::new();
    for &port in ports {
        // IPv4 only: the world's pods have IPv4 addresses.
        let any = unspecified(false, port);
        let tcp = in_netns(netns, move || {
            let l = std::net::TcpListener::bind(any)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let udp = in_netns(netns, move || {
            let s = std::net::UdpSocket::bind(any)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })?;
        let tcp = tokio::net::TcpListener::from_std(tcp)?;
        let udp = tokio::net::UdpSocket::from_std(udp)?;
        let answer = format!("{name}\n");
        tasks.spawn(async move {
            loop {
                let Ok((mut conn, _)) = tcp.accept().await else {
                    continue;
                };
                // One short write into a fresh connection's buffer: it does not block.
                let _ = conn.write_all(answer.as_bytes()).await;
                let _ = conn.shutdown().await;
            }
        });
        let answer = name.to_string();
        tasks.spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                if let Ok((_, peer)) = udp.recv_from(&mut buf).await {
                    let _ = udp.send_to(answer.as_bytes(), peer).await;
                }
            }
        });
    }
    Ok(Servers {
        name: name.to_string(),
        netns: netns.map(Path::to_path_buf),
        tasks,
    })
}

/// Open one `protocol` connection from `netns` (the current namespace when `None`) to
/// `target` and report who answered, waiting at most `timeout` for the handshake or the UDP
/// answer (and as long again for the TCP server's line).
pub async fn probe(
    netns: Option<&Path>,
    protocol: Protocol,
    target: SocketAddr,
    timeout: Duration,
) -> Observed {
    let result = match protocol {
        Protocol::Tcp => probe_tcp(netns, target, timeout).await,
        Protocol::Udp => probe_udp(netns, target, timeout).await,
    };
    result.unwrap_or_else(|e| match e.kind() {
        io::ErrorKind::TimedOut => Observed::TimedOut,
        io::ErrorKind::ConnectionRefused => Observed::Refused,
        _ => Observed::Failed(e.to_string()),
    })
}

/// The first source port [`fresh_local`] hands out, and how many it cycles through.
const PROBE_PORTS_FIRST: u16 = 20_000;
const PROBE_PORTS: u16 = 40_000;

/// A local address with a source port no earlier probe of this process used (until 40,000
/// probes later). A connection is identified by its addresses and ports: a probe that reused
/// an earlier probe's would be that connection again, which the datapath lets through as
/// established whatever the policy says now (Kubernetes leaves existing connections to the
/// implementation), and the table would show it as allowed.
fn fresh_local(target: SocketAddr) -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % PROBE_PORTS;
    unspecified(target.is_ipv6(), PROBE_PORTS_FIRST + n)
}

/// `0.0.0.0:port`, or `[::]:port` when `ipv6`: a socket bound to it takes every address of its
/// namespace, or lets the kernel pick the source address of what it sends.
fn unspecified(ipv6: bool, port: u16) -> SocketAddr {
    let any = if ipv6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    SocketAddr::new(any, port)
}

async fn probe_tcp(
    netns: Option<&Path>,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<Observed> {
    let local = fresh_local(target);
    let socket = in_netns(netns, move || {
        let s = match target {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }?;
        s.set_reuseaddr(true)?;
        s.bind(local)?;
        Ok(s)
    })?;
    let mut conn = within(timeout, socket.connect(target)).await?;
    let mut answer = Vec::new();
    // The handshake got through; silence now would be a broken datapath, not a denial.
    if let Err(e) = within(
        timeout,
        (&mut conn).take(MAX_ANSWER as u64).read_to_end(&mut answer),
    )
    .await
    {
        return Ok(Observed::Failed(format!("connected, then {e}")));
    }
    Ok(Observed::Answered(
        String::from_utf8_lossy(&answer).trim_end().to_string(),
    ))
}

async fn probe_udp(
    netns: Option<&Path>,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<Observed> {
    let local = fresh_local(target);
    let socket = in_netns(netns, move || {
        let s = std::net::UdpSocket::bind(local)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })?;
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    // Connected, so that an ICMP error comes back as a refusal.
    socket.connect(target).await?;
    let mut buf = [0u8; MAX_ANSWER];
    // Two requests, half the timeout apart: one lost datagram is not a denial. Each is a
    // request of the same flow, so the answer to either will do.
    let half = timeout / 2;
    for _ in 0..2 {
        socket.send(b"trellis probe").await?;
        if let Ok(received) = tokio::time::timeout(half, socket.recv(&mut buf)).await {
            let n = received?;
            return Ok(Observed::Answered(
                String::from_utf8_lossy(&buf[..n]).trim_end().to_string(),
            ));
        }
    }
    Ok(Observed::TimedOut)
}

/// `future` with a deadline; running past it is [`io::ErrorKind::TimedOut`].
async fn within<T>(
    timeout: Duration,
    future: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(timeout, future).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` on a thread of its own in a fresh network namespace with `lo` up, so its
    /// traffic stays there (the namespace goes with the thread). `false` when this process
    /// may not make one (not root): the caller skips.
    fn in_private_netns(body: impl FnOnce() + Send + 'static) -> bool {
        std::thread::spawn(move || {
            if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                return false;
            }
            // A child runs in the namespace of the thread that starts it.
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            assert!(
                up.as_ref().is_ok_and(|s| s.success()),
                "ip link set lo up: {up:?}"
            );
            body();
            true
        })
        .join()
        .unwrap()
    }

    /// On loopback: an answer names the server; nothing listening is a refusal (TCP RST, UDP
    /// ICMP port unreachable); a socket that never answers is silence.
    #[test]
    fn probes_see_answers_refusals_and_silence() {
        let ran = in_private_netns(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let servers = serve(None, "x/a", &[80, 81]).await.unwrap();
                assert_eq!(servers.name(), "x/a");
                let t = Duration::from_millis(500);
                for protocol in [Protocol::Tcp, Protocol::Udp] {
                    for port in [80, 81] {
                        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                        let seen = probe(None, protocol, target, t).await;
                        assert_eq!(seen, Observed::Answered("x/a".into()), "{protocol}/{port}");
                        assert!(seen.is_allowed("x/a") && !seen.is_allowed("x/b"));
                    }
                }
                let nothing = SocketAddr::from((Ipv4Addr::LOCALHOST, 82));
                assert_eq!(
                    probe(None, Protocol::Tcp, nothing, t).await,
                    Observed::Refused
                );
                assert_eq!(
                    probe(None, Protocol::Udp, nothing, t).await,
                    Observed::Refused
                );
                // Bound, never read: the datagrams queue up and nobody answers.
                let silent = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 83)).unwrap();
                let target = silent.local_addr().unwrap();
                let short = Duration::from_millis(200);
                assert_eq!(
                    probe(None, Protocol::Udp, target, short).await,
                    Observed::TimedOut
                );
            });
        });
        if !ran {
            eprintln!("skipped: making a network namespace needs root");
        }
    }
}
