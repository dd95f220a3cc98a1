//! Operations endpoints shared by every Trellis daemon: `/metrics` (the
//! daemon's own registry, in OpenMetrics text), `/healthz` (the main loop
//! beats) and `/readyz` (the daemon says when it is ready).
//!
//! ```text
//!  main loop ──▶ Health::beat ──────────▶ GET /healthz   (503 once silent > staleness)
//!  daemon    ──▶ Health::set_ready ─────▶ GET /readyz    (503 with the not-ready reason)
//!  metrics   ──▶ Metrics::encode ───────▶ GET /metrics
//! ```

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

/// Content type of the OpenMetrics text exposition format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long `/healthz` tolerates silence from the main loop by default.
/// Well above the slowest expected pass, so a slow apiserver does not get a
/// daemon restarted.
pub const DEFAULT_STALENESS: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("binding the ops endpoint on {addr} (is another process listening there?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the local address of the ops listener")]
    LocalAddr {
        #[source]
        source: std::io::Error,
    },
    #[error("serving the ops endpoint on {addr}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding metrics in OpenMetrics text")]
    Encode(#[source] fmt::Error),
}

/// A daemon's metrics, as served on `/metrics`.
pub trait Metrics: Clone + Send + Sync + 'static {
    /// The registry in OpenMetrics text, ending in `# EOF`.
    fn encode(&self) -> Result<String, OpsError>;
}

/// Liveness and readiness, shared between the main loop and the server.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Debug)]
struct HealthInner {
    ready: AtomicBool,
    not_ready: &'static str,
    staleness: Duration,
    // Construction counts as the first beat, giving the loop one staleness
    // period to start before the kubelet would restart us.
    last_beat: Mutex<Instant>,
}

impl Health {
    /// `/healthz` fails once no [`beat`](Self::beat) came for longer than
    /// `staleness`; `/readyz` answers `not_ready` until [`set_ready`](Self::set_ready).
    pub fn new(staleness: Duration, not_ready: &'static str) -> Self {
        let inner = HealthInner {
            ready: AtomicBool::new(false),
            not_ready,
            staleness,
            last_beat: Mutex::new(Instant::now()),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Relaxed);
    }

    pub fn ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    /// Called by the main loop on every turn to prove it is not stuck.
    pub fn beat(&self) {
        *self.lock_beat() = Instant::now();
    }

    pub fn live(&self) -> bool {
        self.since_beat(Instant::now()) <= self.inner.staleness
    }

    fn since_beat(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*self.lock_beat())
    }

    fn lock_beat(&self) -> std::sync::MutexGuard<'_, Instant> {
        // An Instant cannot be left half-written, so a poisoned lock is still good.
        self.inner
            .last_beat
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Binds the ops listener, naming the address when that fails.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, OpsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| OpsError::Bind { addr, source })
}

/// The `/metrics`, `/healthz` and `/readyz` routes.
pub fn router<M: Metrics>(metrics: M, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics::<M>))
        .route("/healthz", get(get_healthz::<M>))
        .route("/readyz", get(get_readyz::<M>))
        .with_state((metrics, health))
}

/// Serves the ops endpoints on `listener` until `shutdown` resolves, then
/// lets in-flight requests finish.
pub async fn serve<M: Metrics>(
    listener: TcpListener,
    metrics: M,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), OpsError> {
    let addr = listener
        .local_addr()
        .map_err(|source| OpsError::LocalAddr { source })?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| OpsError::Serve { addr, source })?;
    tracing::info!(%addr, "ops endpoint stopped");
    Ok(())
}

async fn get_metrics<M: Metrics>(State((metrics, _)): State<(M, Health)>) -> Response {
    match metrics.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(error) => {
            tracing::warn!(%error, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
        }
    }
}

async fn get_healthz<M: Metrics>(State((_, health)): State<(M, Health)>) -> (StatusCode, String) {
    let silent = health.since_beat(Instant::now());
    if silent <= health.inner.staleness {
        (StatusCode::OK, "ok".to_owned())
    } else {
        let secs = silent.as_secs();
        let msg = format!("main loop stalled: no heartbeat for {secs}s");
        (StatusCode::SERVICE_UNAVAILABLE, msg)
    }
}

async fn get_readyz<M: Metrics>(
    State((_, health)): State<(M, Health)>,
) -> (StatusCode, &'static str) {
    if health.ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, health.inner.not_ready)
    }
}

/// Test support: one HTTP/1.1 GET against an ops endpoint.
#[doc(hidden)]
pub mod testing {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// `(status, content-type, body)` of `GET path`; panics on a broken answer.
    #[allow(
        clippy::expect_used,
        reason = "test support: a broken answer fails the test"
    )]
    pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.expect("read");
        let (head, body) = raw.split_once("\r\n\r\n").expect("end of headers");
        let status = head
            .split(' ')
            .nth(1)
            .expect("status")
            .parse()
            .expect("code");
        let content_type = head
            .lines()
            .find_map(|l| l.strip_prefix("content-type: "))
            .unwrap_or_default()
            .to_owned();
        (status, content_type, body.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::http_get;
    use super::*;
    use tokio::net::TcpStream;

    /// Health whose last beat lies `ago` in the past, without sleeping.
    fn mk_health(staleness: Duration, ago: Duration) -> Health {
        let health = Health::new(staleness, "not yet");
        *health.lock_beat() = Instant::now()
            .checked_sub(ago)
            .expect("monotonic clock too young");
        health
    }

    #[derive(Clone)]
    struct Fixed;
    impl Metrics for Fixed {
        fn encode(&self) -> Result<String, OpsError> {
            Ok("# TYPE x counter\nx_total 1\n# EOF\n".into())
        }
    }

    #[test]
    fn liveness_follows_the_heartbeat() {
        let health = mk_health(Duration::from_secs(60), Duration::from_secs(61));
        assert!(!health.live());
        health.beat();
        assert!(health.live());
        assert!(mk_health(Duration::from_secs(60), Duration::from_secs(59)).live());
        let fresh = Health::new(DEFAULT_STALENESS, "starting");
        assert!(fresh.live(), "construction counts as a beat");
        assert!(!fresh.ready(), "not ready until the daemon says so");
    }

    #[tokio::test]
    async fn endpoints_serve_and_shut_down() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let health = mk_health(Duration::from_secs(60), Duration::from_secs(120));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Fixed, health.clone(), async {
            let _ = stopped.await;
        }));

        let (status, content_type, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
        assert!(body.lines().any(|l| l == "x_total 1"), "{body}");

        let (status, _, body) = http_get(addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (503, "not yet"));
        health.set_ready(true);
        let (status, _, body) = http_get(addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ok"));

        let (status, _, body) = http_get(addr, "/healthz").await;
        assert_eq!(status, 503);
        assert!(
            body.starts_with("main loop stalled: no heartbeat for 12"),
            "{body}"
        );
        health.beat();
        let (status, _, body) = http_get(addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok"));

        let (status, _, _) = http_get(addr, "/nope").await;
        assert_eq!(status, 404);

        stop.send(()).expect("server still running");
        let result = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve returns after shutdown")
            .expect("serve task did not panic");
        assert!(result.is_ok(), "{result:?}");
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }
}
