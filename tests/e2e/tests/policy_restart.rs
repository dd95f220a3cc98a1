//! "No traffic before policy" across crashes: `trellis-node` SIGKILLed and restarted 10 times
//! while a probe sends 1,000 packets/s to a denied port lets zero packets through, and allowed
//! established connections survive.
//!
//! ```text
//!  trellis-node-1 (A)                                trellis-node-2 (B)
//!  ┌───────────────────────────────────────┐         ┌──────────────────────────┐
//!  │ server   app=server                   │◀─ VXLAN─┤ client-b  app=client     │
//!  │   TCP :80   echo        (allowed)     │         │   TCP → :80 established  │
//!  │   UDP :9999 count       (denied)      │         │   UDP → :9999 1,000/s    │
//!  │ client-a app=client                   │         └──────────────────────────┘
//!  │   TCP → :80 established, UDP → :9999 1,000/s (same node)                   │
//!  └───────────────────────────────────────┘
//!  NetworkPolicy trellis-restart/server-ingress: pods app=server accept TCP 80 from app=client
//!
//!  positive control (no policy yet): a datagram from each client reaches :9999, TCP echoes
//!  apply the policy ─▶ A and B PolicyReady=True with the new policyHash
//!  open one TCP connection per client ─▶ each echoes every 50 ms from now on (also while an
//!  agent is dead) ─▶ start the senders
//!  10 × { SIGKILL trellis-node (A, B, A, B, …) ─▶ start it ─▶ /readyz ─▶ PolicyReady=True with
//!         that hash ─▶ each established connection echoes 3 more times }
//!  stop: 0 datagrams from the senders arrived; each sent ≥ 900/s overall and ≥ half its due
//!        datagrams during every restart (SIGKILL → PolicyReady); no echo failed; a fresh
//!        connection to :80 works; no node's NodeEndpoints shard ever lost its own pods
//! ```
//!
//! The senders use source ports of their own: the controls' flows were allowed before the
//! policy, and connection tracking keeps letting an allowed flow through. It would as well keep
//! letting through a flow that slipped past policy once during a restart: one lapse becomes a
//! lasting leak, which this test sees. Sockets are made in the pods' namespaces on short-lived threads
//! (`truth::traffic::in_netns`); the senders and the receiver are plain threads (the senders pace
//! themselves on a monotonic clock), the TCP echo runs on tokio. Every wait is on a condition
//! with a bound. The sandbox lives in `/tmp/trellis-e2e-policy-restart`. Needs root.
//!
//! `cargo test -p trellis-e2e --test policy_restart -- --nocapture` shows the timeline.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::watch,
    task::JoinSet,
};
use trellis_api::v1alpha1::{NETWORKSTATUS_POLICY_READY, NetworkStatus, NodeEndpoints};
use trellis_e2e::{
    Nodes, StartOptions, agent,
    cluster::{add_pods, app_pod, apply_namespace, apply_policy, ingress_from_app, start_cluster},
    process::Outcome,
    samples,
    truth::{
        traffic::in_netns,
        world::{FIELD_MANAGER, wait_nodes_ready},
    },
    wait_for,
};

const TEST: &str = "policy-restart";
/// The server's node (its ingress policy is enforced there) and the remote client's.
const NODE_A: &str = "trellis-node-1";
const NODE_B: &str = "trellis-node-2";
const NAMESPACE: &str = "trellis-restart";
const POLICY: &str = "server-ingress";
const ALLOWED_PORT: u16 = 80;
const DENIED_PORT: u16 = 9999;
/// Datagrams per second each sender sends.
const RATE: u64 = 1_000;
/// What each sender must at least have achieved, per second it ran.
const MIN_RATE: f64 = 900.0;
const KILLS: usize = 10;
/// Bound of every wait on the cluster (a restart, a policy reaching the maps).
const TIMEOUT: Duration = Duration::from_secs(60);
/// Bound of one TCP connect or echo.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often each established connection echoes while the kills go on.
const ECHO_INTERVAL: Duration = Duration::from_millis(50);
/// Echoes each connection must complete after a restart before the next kill.
const ECHOES_BETWEEN_KILLS: u64 = 3;
/// First bytes of every datagram of this test, then a tag and a sequence number.
const MAGIC: &[u8; 8] = b"trellis!";
/// Sender tags: the remote and the same-node client. Control datagrams use `CONTROL | tag`.
const TAG_REMOTE: u8 = 1;
const TAG_LOCAL: u8 = 2;
const CONTROL: u8 = 0x80;
/// Leaked datagrams kept with their sequence number and arrival time, for the report.
const LEAKS_KEPT: usize = 20;

// -------------------------------------------------------------------------------------------
// The denied port: paced senders in the clients, a counting receiver in the server

/// What the receiver saw, by tag.
#[derive(Debug, Default, Clone)]
struct Tally {
    counts: BTreeMap<u8, u64>,
    /// Datagrams of this test with an unknown layout.
    malformed: u64,
    /// The first datagrams of the senders: (tag, sequence number, since the test's start).
    first: Vec<(u8, u64, Duration)>,
}

impl Tally {
    fn of(&self, tag: u8) -> u64 {
        self.counts.get(&tag).copied().unwrap_or_default()
    }
}

/// A UDP socket bound on `port` in a namespace, counting the datagrams of this test.
struct Receiver {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Receiver {
    fn start(netns: &Path, port: u16, t0: Instant) -> io::Result<Receiver> {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        let socket = in_netns(Some(netns), move || std::net::UdpSocket::bind(any))?;
        // Only so that `stop` is seen; every datagram is read as it comes.
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let thread = std::thread::Builder::new()
            .name("trellis-receiver".into())
            .spawn({
                let (stop, tally) = (stop.clone(), tally.clone());
                move || {
                    let mut buf = [0u8; 64];
                    loop {
                        let stopping = stop.load(Ordering::SeqCst);
                        if stopping {
                            // Whatever is queued still counts.
                            socket.set_nonblocking(true)?;
                        }
                        match socket.recv_from(&mut buf) {
                            Ok((n, _)) => count(&tally, &buf[..n], t0),
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                                ) =>
                            {
                                if stopping {
                                    return Ok(());
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
            })?;
        Ok(Receiver {
            stop,
            tally,
            thread: Some(thread),
        })
    }

    fn tally(&self) -> Tally {
        lock(&self.tally).clone()
    }

    /// Stops after reading what is queued; the final tally.
    fn finish(mut self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .expect("the receiver thread panicked")
                .expect("the receiver's socket failed");
        }
        self.tally()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn count(tally: &Mutex<Tally>, datagram: &[u8], t0: Instant) {
    let mut t = lock(tally);
    let Some(rest) = datagram.strip_prefix(MAGIC.as_slice()) else {
        t.malformed += 1;
        return;
    };
    let (Some(&tag), Some(seq)) = (rest.first(), rest.get(1..9)) else {
        t.malformed += 1;
        return;
    };
    *t.counts.entry(tag).or_default() += 1;
    if tag & CONTROL == 0 && t.first.len() < LEAKS_KEPT {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(seq);
        let seq = u64::from_be_bytes(bytes);
        t.first.push((tag, seq, t0.elapsed()));
    }
}

/// The value behind `m`, also after a thread panicked holding it (that panic is the report).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn datagram(tag: u8, seq: u64) -> [u8; 17] {
    let mut d = [0u8; 17];
    d[..8].copy_from_slice(MAGIC);
    d[8] = tag;
    d[9..].copy_from_slice(&seq.to_be_bytes());
    d
}

/// A UDP socket in a namespace bound to a fixed source port (so that its flow is never the
/// control's, which conntrack remembers as allowed from before the policy).
fn udp_socket(netns: &Path, source_port: u16) -> io::Result<std::net::UdpSocket> {
    let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), source_port);
    in_netns(Some(netns), move || std::net::UdpSocket::bind(local))
}

#[derive(Debug, Clone)]
struct Sent {
    sent: u64,
    /// Sends the kernel refused (ENOBUFS and the like); not counted as sent.
    failed: u64,
    elapsed: Duration,
    /// When each datagram was sent, since the test's start.
    times: Vec<Duration>,
}

impl Sent {
    /// Datagrams sent from `from` to `to` (since the test's start).
    fn between(&self, from: Duration, to: Duration) -> u64 {
        let first = self.times.partition_point(|t| *t < from);
        let last = self.times.partition_point(|t| *t <= to);
        u64::try_from(last - first).unwrap_or(u64::MAX)
    }

    /// The longest time without a send (the sender's thread not scheduled).
    fn longest_pause(&self) -> Duration {
        self.times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }
}

/// Sends datagram `n` at `n / RATE` s after its start (a monotonic schedule: a thread that
/// was not scheduled in time catches up), until stopped.
struct Sender {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Sent>,
}

impl Sender {
    fn start(
        socket: std::net::UdpSocket,
        tag: u8,
        target: SocketAddr,
        t0: Instant,
    ) -> io::Result<Sender> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("trellis-sender".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    let started = Instant::now();
                    let due = |n: u64| started + Duration::from_micros(n * 1_000_000 / RATE);
                    let (mut seq, mut failed) = (0u64, 0u64);
                    let mut times = Vec::with_capacity(120 * RATE as usize);
                    while !stop.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        if due(seq) > now {
                            // Pacing, not synchronisation: the schedule is the clock's.
                            std::thread::sleep(due(seq) - now);
                            continue;
                        }
                        while due(seq) <= now {
                            match socket.send_to(&datagram(tag, seq), target) {
                                Ok(_) => times.push(t0.elapsed()),
                                Err(_) => failed += 1,
                            }
                            seq += 1;
                        }
                    }
                    Sent {
                        sent: u64::try_from(times.len()).unwrap_or(u64::MAX),
                        failed,
                        elapsed: started.elapsed(),
                        times,
                    }
                }
            })?;
        Ok(Sender { stop, thread })
    }

    fn finish(self) -> Sent {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("a sender thread panicked")
    }
}

// -------------------------------------------------------------------------------------------
// The allowed port: a TCP echo server and established connections

/// Echoes every connection on `port` in `netns` until dropped.
async fn serve_echo(netns: &Path, port: u16) -> io::Result<JoinSet<()>> {
    let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
    let listener = in_netns(Some(netns), move || {
        let l = std::net::TcpListener::bind(any)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            // An error here is the runtime going away: end, never spin.
            let Ok((mut conn, _)) = listener.accept().await else {
                break;
            };
            conns.spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(tasks)
}

async fn within<T>(
    what: &str,
    future: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(IO_TIMEOUT, future)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what}: no answer within {IO_TIMEOUT:?}"),
            )
        })?
}

async fn connect(netns: &Path, target: SocketAddr) -> io::Result<TcpStream> {
    let socket = in_netns(Some(netns), tokio::net::TcpSocket::new_v4)?;
    let conn = within("connect", socket.connect(target)).await?;
    conn.set_nodelay(true)?;
    Ok(conn)
}

/// Writes `message` and reads it back.
async fn echo(conn: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    within("echo", async {
        conn.write_all(message).await?;
        let mut back = vec![0u8; message.len()];
        conn.read_exact(&mut back).await?;
        if back == message {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "echoed {:?} instead of {:?}",
                String::from_utf8_lossy(&back),
                String::from_utf8_lossy(message)
            )))
        }
    })
    .await
}

/// A fresh connection that echoes, retried until `deadline` (policy reaching the maps).
async fn connect_and_echo_until(netns: &Path, target: SocketAddr, what: &str) -> TcpStream {
    let deadline = Instant::now() + TIMEOUT;
    let mut tries = 0;
    loop {
        tries += 1;
        let attempt = async {
            let mut conn = connect(netns, target).await?;
            echo(&mut conn, format!("{what}: hello\n").as_bytes()).await?;
            Ok::<_, io::Error>(conn)
        };
        match attempt.await {
            Ok(conn) => return conn,
            Err(e) => assert!(
                Instant::now() < deadline,
                "{what}: no echo from {target} within {TIMEOUT:?} ({tries} tries): {e}"
            ),
        }
    }
}

/// One established connection echoing every [`ECHO_INTERVAL`] in the background: how many
/// echoes completed, the slowest, and the first failure (after which it stops).
#[derive(Debug, Clone, Default)]
struct Echoes {
    done: u64,
    slowest: Duration,
    failed: Option<String>,
}

fn keep_echoing(
    tasks: &mut JoinSet<()>,
    name: &'static str,
    mut conn: TcpStream,
) -> watch::Receiver<Echoes> {
    let (tx, rx) = watch::channel(Echoes::default());
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(ECHO_INTERVAL);
        for n in 0u64.. {
            tick.tick().await;
            let started = Instant::now();
            let result = echo(&mut conn, format!("{name} #{n}\n").as_bytes()).await;
            let took = started.elapsed();
            let stop = result.is_err();
            tx.send_modify(|e| match result {
                Ok(()) => {
                    e.done += 1;
                    e.slowest = e.slowest.max(took);
                }
                Err(err) => e.failed = Some(format!("echo #{n} failed: {err}")),
            });
            if stop || tx.is_closed() {
                break;
            }
        }
    });
    rx
}

// -------------------------------------------------------------------------------------------
// The cluster

/// `node`'s `PolicyReady` status and `policyHash`, as its NetworkStatus says.
async fn policy_state(client: &Client, node: &str) -> Option<(bool, Option<String>)> {
    let status = Api::<NetworkStatus>::all(client.clone())
        .get_opt(node)
        .await
        .ok()??
        .status?;
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == NETWORKSTATUS_POLICY_READY && c.status == "True");
    Some((ready, status.policy_hash))
}

/// Waits until `node` reports `PolicyReady=True` with `hash`.
async fn wait_policy_ready(client: &Client, node: &str, hash: &str, what: &str) {
    wait_for(
        &format!("{what}: {node} PolicyReady=True with policyHash {hash}"),
        TIMEOUT,
        || async {
            let (ready, seen) = policy_state(client, node).await?;
            (ready && seen.as_deref() == Some(hash)).then_some(())
        },
    )
    .await;
}

/// Every time a node's `NodeEndpoints` shard was seen without one of its pods' addresses,
/// once the shard had held them all: (since the test's start, node, addresses it held).
type ShardGaps = Arc<Mutex<Vec<(Duration, String, Vec<String>)>>>;

/// Watches the nodes' shards: a node that restarts must keep publishing its pods (another
/// node that misses them treats them as outside the cluster).
fn watch_shards(
    tasks: &mut JoinSet<()>,
    client: &Client,
    expected: BTreeMap<String, Vec<String>>,
    t0: Instant,
) -> ShardGaps {
    let gaps: ShardGaps = Arc::default();
    let api = Api::<NodeEndpoints>::all(client.clone());
    let out = gaps.clone();
    tasks.spawn(async move {
        let mut complete: BTreeMap<String, bool> = BTreeMap::new();
        // With a backoff: a watcher retrying at once spins when the apiserver is gone.
        let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
        while let Some(event) = stream.next().await {
            let shard = match event {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => s,
                _ => continue,
            };
            let node = shard.name_any();
            let Some(want) = expected.get(&node) else {
                continue;
            };
            let held: Vec<String> = shard
                .spec
                .endpoints
                .iter()
                .flat_map(|e| e.addresses.clone())
                .collect();
            let all = want.iter().all(|a| held.contains(a));
            let was = complete.insert(node.clone(), all).unwrap_or(false);
            if was && !all {
                lock(&out).push((t0.elapsed(), node, held));
            }
        }
    });
    gaps
}

/// What one restart cost.
struct Restart {
    node: &'static str,
    old_pid: u32,
    new_pid: u32,
    /// When the SIGKILL was sent, since the test's start.
    killed_at: Duration,
    /// From the SIGKILL to `/healthz`, `/readyz`, and `PolicyReady` with the policy's hash.
    healthy: Duration,
    ready: Duration,
    policy_ready: Duration,
}

impl Restart {
    /// From the SIGKILL until the new process enforced the policy again, since the test's start.
    fn window(&self) -> (Duration, Duration) {
        (self.killed_at, self.killed_at + self.policy_ready)
    }
}

async fn kill_and_restart(
    nodes: &Nodes,
    client: &Client,
    node: &'static str,
    hash: &str,
    what: &str,
    t0: Instant,
) -> Restart {
    let killed_at = t0.elapsed();
    let killed = nodes
        .kill_agent(node)
        .await
        .unwrap_or_else(|e| panic!("{what}: SIGKILL {node}'s trellis-node: {e}"));
    assert_eq!(killed.outcome, Outcome::Killed, "{what}: {killed:?}");
    let at = t0 + killed_at;
    let started = nodes
        .start_agent(node)
        .await
        .unwrap_or_else(|e| panic!("{what}: start {node}'s trellis-node again: {e}"));
    let healthy = at.elapsed();
    let port = started.metrics_port;
    wait_for(
        &format!("{what}: {node}'s agent /readyz"),
        TIMEOUT,
        || async move { agent::readyz(port, IO_TIMEOUT).await.ok() },
    )
    .await;
    let ready = at.elapsed();
    // After /readyz the status is the new process's own (its first reconcile published it).
    wait_policy_ready(client, node, hash, what).await;
    Restart {
        node,
        old_pid: killed.record.pid,
        new_pid: started.record.pid,
        killed_at,
        healthy,
        ready,
        policy_ready: at.elapsed(),
    }
}

/// Waits until each connection has echoed `n` more times than in `since`, failing at once on a
/// failed echo.
async fn wait_echoes(
    echoes: &[(&str, watch::Receiver<Echoes>)],
    since: &[u64],
    n: u64,
    what: &str,
) {
    for ((name, rx), &base) in echoes.iter().zip(since) {
        let mut rx = rx.clone();
        let seen = tokio::time::timeout(
            TIMEOUT,
            rx.wait_for(|e| e.failed.is_some() || e.done >= base + n),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("{what}: {name}'s established connection made no {n} echoes within {TIMEOUT:?}")
        })
        .expect("the echo task ended")
        .clone();
        assert!(
            seen.failed.is_none(),
            "{what}: {name}'s established connection broke: {}",
            seen.failed.unwrap_or_default()
        );
    }
}

fn done(echoes: &[(&str, watch::Receiver<Echoes>)]) -> Vec<u64> {
    echoes.iter().map(|(_, rx)| rx.borrow().done).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_port_stays_closed_across_node_agent_crashes() {
    let t0 = Instant::now();
    let pools = samples::ippools(samples::IPPOOL_SAMPLE).expect("IPPool sample");
    let cp = start_cluster(StartOptions::for_test(TEST), 2, &pools, FIELD_MANAGER)
        .await
        .expect("the sandbox starts with its IPPools");
    let client = cp.client();
    let nodes = cp.nodes();
    wait_nodes_ready(&client, 2).await;
    apply_namespace(&client, NAMESPACE, FIELD_MANAGER)
        .await
        .expect("apply the namespace");

    let specs = [
        app_pod(NAMESPACE, "server", NODE_A, "server"),
        app_pod(NAMESPACE, "client-b", NODE_B, "client"),
        app_pod(NAMESPACE, "client-a", NODE_A, "client"),
    ];
    let [
        (server, server_ip),
        (client_b, client_b_ip),
        (client_a, client_a_ip),
    ]: [_; 3] = add_pods(&cp.pods(), &specs)
        .await
        .expect("add the server and the clients")
        .try_into()
        .expect("three pods");
    let (server_ns, b_ns, a_ns): (PathBuf, PathBuf, PathBuf) = (
        server.netns_path(),
        client_b.netns_path(),
        client_a.netns_path(),
    );
    let allowed = SocketAddr::new(server_ip, ALLOWED_PORT);
    let denied = SocketAddr::new(server_ip, DENIED_PORT);
    let clients: [(&'static str, u8, &Path); 2] = [
        ("client-b", TAG_REMOTE, &b_ns),
        ("client-a", TAG_LOCAL, &a_ns),
    ];
    // The test's own tasks, aborted when it ends (before the sandbox goes).
    let mut background = JoinSet::new();
    let gaps = watch_shards(
        &mut background,
        &client,
        BTreeMap::from([
            (
                NODE_A.to_string(),
                vec![server_ip.to_string(), client_a_ip.to_string()],
            ),
            (NODE_B.to_string(), vec![client_b_ip.to_string()]),
        ]),
        t0,
    );

    let _echo_server = serve_echo(&server_ns, ALLOWED_PORT)
        .await
        .expect("the echo server in the server pod");
    let receiver = Receiver::start(&server_ns, DENIED_PORT, t0).expect("the receiver");

    // Positive control, before any policy: the denied port does receive, so the zero below
    // means policy, not a broken path. The controls' source ports are not the senders'.
    for (i, (name, tag, netns)) in clients.iter().enumerate() {
        let socket = udp_socket(netns, 40_100 + u16::try_from(i).unwrap()).expect("control socket");
        let mut seq = 0;
        wait_for(
            &format!("a control datagram from {name} to reach {denied} (no policy yet)"),
            TIMEOUT,
            || {
                seq += 1;
                let _ = socket.send_to(&datagram(CONTROL | tag, seq), denied);
                let arrived = receiver.tally().of(CONTROL | tag) > 0;
                async move { arrived.then_some(()) }
            },
        )
        .await;
        connect_and_echo_until(netns, allowed, &format!("{name} before the policy")).await;
    }
    let before_hash = policy_state(&client, NODE_A).await.and_then(|(_, h)| h);

    // The policy: the server accepts TCP 80 from app=client and nothing else.
    let np = ingress_from_app(NAMESPACE, POLICY, "server", "client", ALLOWED_PORT);
    apply_policy(&client, &np, FIELD_MANAGER)
        .await
        .expect("apply the NetworkPolicy");
    let hash = wait_for("node A to enforce a new policy set", TIMEOUT, || async {
        let (ready, hash) = policy_state(&client, NODE_A).await?;
        (ready && hash.is_some() && hash != before_hash).then_some(hash?)
    })
    .await;
    wait_policy_ready(&client, NODE_B, &hash, "after the policy").await;
    eprintln!("policy {NAMESPACE}/{POLICY} enforced by both nodes (policyHash {hash})");

    // Established, allowed connections, and the probe on the denied port.
    let mut echoes = Vec::new();
    for (name, _, netns) in &clients {
        let conn =
            connect_and_echo_until(netns, allowed, &format!("{name} under the policy")).await;
        echoes.push((*name, keep_echoing(&mut background, name, conn)));
    }
    wait_echoes(&echoes, &[0, 0], ECHOES_BETWEEN_KILLS, "before the kills").await;
    let senders: Vec<(&str, u8, Sender)> = clients
        .iter()
        .enumerate()
        .map(|(i, (name, tag, netns))| {
            let socket =
                udp_socket(netns, 40_200 + u16::try_from(i).unwrap()).expect("sender socket");
            (
                *name,
                *tag,
                Sender::start(socket, *tag, denied, t0).expect("start a sender"),
            )
        })
        .collect();
    let probing = Instant::now();

    let mut restarts = Vec::new();
    for k in 1..=KILLS {
        // A enforces the server's ingress; B's restarts must not disturb it either.
        let node = if k % 2 == 1 { NODE_A } else { NODE_B };
        let what = format!("kill {k}/{KILLS} ({node})");
        let restart = kill_and_restart(&nodes, &client, node, &hash, &what, t0).await;
        let base = done(&echoes);
        wait_echoes(&echoes, &base, ECHOES_BETWEEN_KILLS, &what).await;
        let tally = receiver.tally();
        eprintln!(
            "{what}: pid {} → {}; healthz {:.1?}, readyz {:.1?}, PolicyReady {:.1?}; \
             denied datagrams received so far: remote {}, same-node {}",
            restart.old_pid,
            restart.new_pid,
            restart.healthy,
            restart.ready,
            restart.policy_ready,
            tally.of(TAG_REMOTE),
            tally.of(TAG_LOCAL),
        );
        restarts.push(restart);
    }

    // Stop the probe; one more echo on each connection is a round trip over the same paths
    // after the last datagram, then the receiver reads what is queued and stops.
    let sent: Vec<(&str, u8, Sent)> = senders
        .into_iter()
        .map(|(name, tag, s)| (name, tag, s.finish()))
        .collect();
    let probed = probing.elapsed();
    let base = done(&echoes);
    wait_echoes(&echoes, &base, 1, "after the kills").await;
    let tally = receiver.finish();

    // Positive control after: a fresh connection to the allowed port works.
    for (name, _, netns) in &clients {
        connect_and_echo_until(netns, allowed, &format!("{name}, fresh, after the kills")).await;
    }

    let echo_summary: Vec<String> = echoes
        .iter()
        .map(|(name, rx)| {
            let e = rx.borrow();
            format!("{name} {} echoes (slowest {:.1?})", e.done, e.slowest)
        })
        .collect();
    let gaps = lock(&gaps).clone();
    eprintln!(
        "policy restart: {KILLS} SIGKILLs ({} of {NODE_A}, {} of {NODE_B}) in {probed:.1?}; \
         restart to PolicyReady {:.1?}..{:.1?}",
        restarts.iter().filter(|r| r.node == NODE_A).count(),
        restarts.iter().filter(|r| r.node == NODE_B).count(),
        restarts
            .iter()
            .map(|r| r.policy_ready)
            .min()
            .unwrap_or_default(),
        restarts
            .iter()
            .map(|r| r.policy_ready)
            .max()
            .unwrap_or_default(),
    );
    for (name, tag, s) in &sent {
        // Each restart, from the SIGKILL until the new process enforces the policy, must have
        // been probed: a sender starved of CPU in that window would prove nothing.
        let per_window: Vec<u64> = restarts
            .iter()
            .map(|r| {
                let (from, to) = r.window();
                s.between(from, to)
            })
            .collect();
        eprintln!(
            "policy restart: {name} → {denied}/udp: sent {} in {:.1?} ({:.0}/s, {} refused by \
             the kernel, longest pause {:.1?}; during each restart: {per_window:?}), received {}",
            s.sent,
            s.elapsed,
            s.sent as f64 / s.elapsed.as_secs_f64(),
            s.failed,
            s.longest_pause(),
            tally.of(*tag),
        );
    }
    eprintln!(
        "policy restart: established connections: {}; shard gaps: {}",
        echo_summary.join(", "),
        gaps.len()
    );

    let timeline = restarts
        .iter()
        .map(|r| {
            let (from, to) = r.window();
            format!(
                "{} pid {}→{} down {from:.3?}..{to:.3?}",
                r.node, r.old_pid, r.new_pid
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    for (name, tag, s) in &sent {
        let min = (s.elapsed.as_secs_f64() * MIN_RATE) as u64;
        assert!(
            s.sent >= min,
            "{name} sent {} datagrams in {:.1?}, fewer than {min}: the probe was too weak to \
             mean anything",
            s.sent,
            s.elapsed
        );
        for r in &restarts {
            let (from, to) = r.window();
            let nominal = (to - from).as_secs_f64() * RATE as f64;
            let probed = s.between(from, to);
            assert!(
                probed as f64 >= nominal / 2.0,
                "{name} sent only {probed} datagrams while {}'s trellis-node restarted \
                 ({from:.3?}..{to:.3?}, {nominal:.0} due): that restart was not probed",
                r.node
            );
        }
        assert_eq!(
            tally.of(*tag),
            0,
            "{name}: datagrams to the denied port {denied} got through while trellis-node was \
             killed and restarted. First ones (tag, sequence number = ms after the probe \
             started at {:.3?}, arrival since the test's start): {:?}. Restarts (since the \
             test's start): {timeline}",
            s.times.first().copied().unwrap_or_default(),
            tally.first,
        );
    }
    assert_eq!(tally.malformed, 0, "stray datagrams on the denied port");
    assert!(
        gaps.is_empty(),
        "a restarted node published its NodeEndpoints shard without its own pods (since the \
         test's start, node, addresses it held): {gaps:?}"
    );
    drop(echoes);
}
