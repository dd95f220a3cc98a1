//! Netlink work inside a network namespace.
//!
//! ```text
//!  caller ──job──▶ [ OS thread: setns(CLONE_NEWNET) ─ current-thread runtime ─ rtnetlink connection ] ──result──▶ caller
//! ```
//!
//! A netlink socket stays bound to the namespace it was opened in, and
//! `setns` changes only the calling thread. So each [`NetnsHandle`] owns one
//! dedicated thread that enters the namespace first, then opens its
//! rtnetlink connection and runs the jobs it is given, one at a time, in
//! order. Never `ip netns exec` an agent: it remounts `/sys`, hiding bpffs.

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use futures::StreamExt;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{AsyncSocket, SocketAddr};
use nix::sched::{CloneFlags, setns};
use rtnetlink::packet_core::NetlinkMessage;
use tokio::sync::{mpsc, oneshot, watch};

/// Multicast groups of [`NetnsHandle::subscribe`]: `RTMGRP_LINK`,
/// `RTMGRP_NEIGH` (neighbour and FDB entries), `RTMGRP_IPV4_IFADDR`,
/// `RTMGRP_IPV4_ROUTE`, `RTMGRP_IPV6_IFADDR`, `RTMGRP_IPV6_ROUTE`.
pub const NOTIFICATION_GROUPS: u32 = 0x1 | 0x4 | 0x10 | 0x40 | 0x100 | 0x400;

/// Counts of the notifications a subscription received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Notifications {
    /// Those the filter accepted (each one woke the receiver, coalesced).
    pub relevant: u64,
    /// Those it did not (they woke nobody).
    pub ignored: u64,
}

/// Why a namespace thread could not start or run a job.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path} (setns needs CAP_SYS_ADMIN): {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot start the namespace thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("cannot start the namespace thread's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("cannot subscribe to netlink notifications in {0}: {1}")]
    Subscribe(Namespace, #[source] std::io::Error),
    /// The thread is gone (a job panicked), so no job runs any more.
    #[error("the thread of network namespace {0} has stopped")]
    Stopped(Namespace),
}

/// Which namespace a handle works in, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace(Option<PathBuf>);

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(p) => write!(f, "{}", p.display()),
            None => f.write_str("(current)"),
        }
    }
}

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;
type Job = Box<dyn FnOnce(rtnetlink::Handle) -> LocalFuture + Send>;

/// A thread inside a network namespace with an open rtnetlink connection.
///
/// Dropping it stops and joins the thread (after the job in progress), which
/// closes the connection.
pub struct NetnsHandle {
    namespace: Namespace,
    jobs: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for NetnsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetnsHandle")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl NetnsHandle {
    /// Starts a thread in the namespace at `path` (e.g. `/run/netns/NAME`,
    /// `/proc/PID/ns/net`), or in the caller's namespace when `None`, and
    /// opens its rtnetlink connection there. Returns once the connection is
    /// open, or with the reason it could not be.
    pub fn new(path: Option<&Path>) -> Result<Self, NetnsError> {
        let namespace = Namespace(path.map(Path::to_path_buf));
        let ns_file = match path {
            Some(p) => Some(File::open(p).map_err(|source| NetnsError::Open {
                path: p.to_path_buf(),
                source,
            })?),
            None => None,
        };
        let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::sync_channel::<Result<(), NetnsError>>(1);
        let thread_path = namespace.0.clone();
        let thread = std::thread::Builder::new()
            .name("trellis-netns".into())
            .spawn(move || {
                let started = (|| {
                    if let (Some(file), Some(path)) = (ns_file, thread_path) {
                        setns(&file, CloneFlags::CLONE_NEWNET)
                            .map_err(|source| NetnsError::Enter { path, source })?;
                    }
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_io()
                        .enable_time()
                        .build()
                        .map_err(NetnsError::Runtime)?;
                    // Opened after setns, on this thread: bound to the namespace.
                    let (connection, handle, _) = runtime
                        .block_on(async {
                            rtnetlink::new_connection_with_socket::<netlink_sys::TokioSocket>()
                        })
                        .map_err(NetnsError::Connect)?;
                    Ok((runtime, connection, handle))
                })();
                let (runtime, connection, handle) = match started {
                    Ok(parts) => {
                        let _ = ready_tx.send(Ok(()));
                        parts
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.spawn(connection);
                runtime.block_on(async move {
                    while let Some(job) = queue.recv().await {
                        job(handle.clone()).await;
                    }
                });
                // Dropping the runtime ends the connection task and closes
                // the socket.
            })
            .map_err(NetnsError::Thread)?;
        let started = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(NetnsError::Stopped(namespace.clone())));
        match started {
            Ok(()) => Ok(NetnsHandle {
                namespace,
                jobs: Some(jobs),
                thread: Some(thread),
            }),
            Err(e) => {
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// The namespace this handle works in.
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// Runs `f` with the namespace's rtnetlink handle on the namespace
    /// thread and waits for its result without blocking the caller's
    /// runtime. The future `f` returns need not be `Send`: it never leaves
    /// that thread.
    pub async fn run<F, Fut, T>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.submit(f)?
            .await
            .map_err(|_| NetnsError::Stopped(self.namespace.clone()))
    }

    /// [`run`](Self::run) for callers outside an async runtime (it panics
    /// inside one, as blocking there would stall it).
    pub fn run_blocking<F, Fut, T>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.submit(f)?
            .blocking_recv()
            .map_err(|_| NetnsError::Stopped(self.namespace.clone()))
    }

    /// Subscribes to the namespace's link, address, route and neighbour
    /// (including FDB) notifications on a socket of its own, counting each
    /// one (see [`subscribe_filtered`](Self::subscribe_filtered)).
    pub async fn subscribe(&self) -> Result<watch::Receiver<Notifications>, NetnsError> {
        self.subscribe_filtered(|_| true).await
    }

    /// Subscribes to the namespace's link, address, route and neighbour
    /// (including FDB) notifications on a socket of its own. Each message is
    /// shown to `relevant` (on the namespace thread): those it accepts grow
    /// [`Notifications::relevant`] and wake the receiver; the others only
    /// grow [`Notifications::ignored`], waking nobody. Many notifications
    /// between two reads coalesce into one wake-up. The receiver reports an
    /// error once the subscription ends (the socket failed, e.g. on a
    /// receive buffer overrun): subscribe again and do a full resync, as
    /// events may have been lost.
    pub async fn subscribe_filtered<F>(
        &self,
        mut relevant: F,
    ) -> Result<watch::Receiver<Notifications>, NetnsError>
    where
        F: FnMut(&NetlinkMessage<RouteNetlinkMessage>) -> bool + Send + 'static,
    {
        let namespace = self.namespace.clone();
        self.run(move |_| async move {
            let (mut connection, handle, mut messages) =
                rtnetlink::new_connection_with_socket::<netlink_sys::TokioSocket>()
                    .map_err(NetnsError::Connect)?;
            let groups = SocketAddr::new(0, NOTIFICATION_GROUPS);
            connection
                .socket_mut()
                .socket_mut()
                .bind(&groups)
                .map_err(|e| NetnsError::Subscribe(namespace.clone(), e))?;
            let (tx, rx) = watch::channel(Notifications::default());
            tokio::spawn(connection);
            tokio::spawn(async move {
                // The connection ends when its last handle is dropped.
                let _handle = handle;
                while let Some((message, _)) = messages.next().await {
                    if relevant(&message) {
                        tx.send_modify(|n| n.relevant = n.relevant.wrapping_add(1));
                    } else {
                        // Counted, but the receiver is not woken.
                        tx.send_if_modified(|n| {
                            n.ignored = n.ignored.wrapping_add(1);
                            false
                        });
                    }
                    if tx.is_closed() {
                        break;
                    }
                }
            });
            Ok(rx)
        })
        .await?
    }

    fn submit<F, Fut, T>(&self, f: F) -> Result<oneshot::Receiver<T>, NetnsError>
    where
        F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |handle| {
            Box::pin(async move {
                // The caller may have stopped waiting; the work is done anyway.
                let _ = tx.send(f(handle).await);
            })
        });
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .map(|()| rx)
            .ok_or_else(|| NetnsError::Stopped(self.namespace.clone()))
    }
}

impl Drop for NetnsHandle {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop after the current job.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            // A panicked job already reported itself as `Stopped` to its caller.
            let _ = thread.join();
        }
    }
}
