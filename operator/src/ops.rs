//! Operations endpoints: Prometheus metrics, liveness and readiness.
//!
//! ```text
//!  reconcile loop ──▶ Metrics (counters, histogram, gauges) ──▶ GET /metrics
//!        │        ──▶ Health::beat ────────────────────────────▶ GET /healthz
//!  cache sync     ──▶ Health::set_ready ───────────────────────▶ GET /readyz
//! ```
//!
//! Labels come from closed enums (error kind, write kind), never from object
//! names, so the series count stays fixed whatever the cluster size.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use trellis_common::ops::{
    DEFAULT_STALENESS, Health, OPENMETRICS_CONTENT_TYPE, OpsError, bind, serve,
};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Reconcile durations from 1 ms (cache-only no-op) to 10 s (apiserver timeouts).
const DURATION_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Why a reconcile pass failed; the `kind` label of `reconcile_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The apiserver refused or failed a request.
    Api,
    /// A write lost an optimistic-concurrency race (HTTP 409).
    Conflict,
    /// An object failed validation; waits for the user to change it.
    Invalid,
    /// A request or the pass itself ran out of time.
    Timeout,
}

impl ErrorKind {
    pub const ALL: [Self; 4] = [Self::Api, Self::Conflict, Self::Invalid, Self::Timeout];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Conflict => "conflict",
            Self::Invalid => "invalid",
            Self::Timeout => "timeout",
        }
    }
}

/// What the operator wrote to the apiserver; the `kind` label of `writes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteKind {
    NodeNetworkSpec,
    NodeNetworkStatus,
    NodeNetworkDelete,
    PoolStatus,
    PoolFinalizer,
    NetworkConfigStatus,
    Event,
    SecurityIdentityDelete,
}

impl WriteKind {
    pub const ALL: [Self; 8] = [
        Self::NodeNetworkSpec,
        Self::NodeNetworkStatus,
        Self::NodeNetworkDelete,
        Self::PoolStatus,
        Self::PoolFinalizer,
        Self::NetworkConfigStatus,
        Self::Event,
        Self::SecurityIdentityDelete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NodeNetworkSpec => "node_network_spec",
            Self::NodeNetworkStatus => "node_network_status",
            Self::NodeNetworkDelete => "node_network_delete",
            Self::PoolStatus => "pool_status",
            Self::PoolFinalizer => "pool_finalizer",
            Self::NetworkConfigStatus => "network_config_status",
            Self::Event => "event",
            Self::SecurityIdentityDelete => "security_identity_delete",
        }
    }
}

// Hand-written rather than derived: the derive would print `Api`, while
// Prometheus label values are conventionally snake_case.
impl EncodeLabelValue for ErrorKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

impl EncodeLabelValue for WriteKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    kind: ErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WriteLabels {
    kind: WriteKind,
}

/// The operator's metrics and the registry that exports them. Cloning is
/// cheap and every clone updates the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<MetricsInner>,
}

#[derive(Debug)]
struct MetricsInner {
    registry: Registry,
    reconciles: Counter,
    reconcile_errors: Family<ErrorLabels, Counter>,
    reconcile_duration: Histogram,
    writes: Family<WriteLabels, Counter>,
    ipam_blocks_in_use: Gauge,
    ipam_blocks_capacity: Gauge,
    ipam_nodes_without_block: Gauge,
    leader: Gauge,
    identities: Gauge,
    identities_unreferenced: Gauge,
    identities_collected: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis_operator");
        let reconciles = Counter::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Histogram::new(DURATION_BUCKETS);
        let writes = Family::<WriteLabels, Counter>::default();
        let [
            ipam_blocks_in_use,
            ipam_blocks_capacity,
            ipam_nodes_without_block,
            leader,
            identities,
            identities_unreferenced,
        ] = std::array::from_fn(|_| Gauge::default());
        let identities_collected = Counter::default();

        // Every label value exists from the start at 0, so `rate()` and
        // dashboards see a series before the first error of each kind.
        for kind in ErrorKind::ALL {
            drop(reconcile_errors.get_or_create(&ErrorLabels { kind }));
        }
        for kind in WriteKind::ALL {
            drop(writes.get_or_create(&WriteLabels { kind }));
        }

        registry.register("reconciles", "Global reconcile passes", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconcile passes by error kind",
            reconcile_errors.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Duration of a global reconcile pass",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        registry.register("writes", "Writes to the apiserver by kind", writes.clone());
        registry.register(
            "ipam_blocks_in_use",
            "Address blocks held by nodes, summed over pools",
            ipam_blocks_in_use.clone(),
        );
        registry.register(
            "ipam_blocks_capacity",
            "Address blocks available, summed over pools",
            ipam_blocks_capacity.clone(),
        );
        registry.register(
            "ipam_nodes_without_block",
            "Nodes that wanted a block and got none",
            ipam_nodes_without_block.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        registry.register(
            "identities",
            "SecurityIdentities, as of the leader's last collection pass",
            identities.clone(),
        );
        registry.register(
            "identities_unreferenced",
            "SecurityIdentities no NodeEndpoints shard names, as of the leader's last collection pass (collected once unreferenced for the grace period)",
            identities_unreferenced.clone(),
        );
        registry.register(
            "identities_collected",
            "SecurityIdentities deleted because no NodeEndpoints shard named them for the grace period",
            identities_collected.clone(),
        );

        let inner = MetricsInner {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            writes,
            ipam_blocks_in_use,
            ipam_blocks_capacity,
            ipam_nodes_without_block,
            leader,
            identities,
            identities_unreferenced,
            identities_collected,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Records one finished reconcile pass, successful or not.
    pub fn reconciled(&self, duration: Duration) {
        self.inner.reconciles.inc();
        self.inner
            .reconcile_duration
            .observe(duration.as_secs_f64());
    }

    pub fn error(&self, kind: ErrorKind) {
        self.inner
            .reconcile_errors
            .get_or_create(&ErrorLabels { kind })
            .inc();
    }

    pub fn wrote(&self, kind: WriteKind) {
        self.inner.writes.get_or_create(&WriteLabels { kind }).inc();
    }

    /// Sets the IPAM gauges. Block counts are u128 because IPv6 pools can
    /// hold more blocks than any gauge; they saturate at `i64::MAX`.
    pub fn set_ipam(&self, in_use: u128, total: u128, nodes_without_block: usize) {
        self.inner.ipam_blocks_in_use.set(saturate(in_use));
        self.inner.ipam_blocks_capacity.set(saturate(total));
        let starved = i64::try_from(nodes_without_block).unwrap_or(i64::MAX);
        self.inner.ipam_nodes_without_block.set(starved);
    }

    pub fn set_leader(&self, leader: bool) {
        self.inner.leader.set(i64::from(leader));
    }

    /// Sets the identity gauges after a collection pass.
    pub fn set_identities(&self, identities: usize, unreferenced: usize) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.inner.identities.set(gauge(identities));
        self.inner.identities_unreferenced.set(gauge(unreferenced));
    }

    /// Counts one deleted identity (a delete the apiserver answered with
    /// success; one already gone or re-created is not counted).
    pub fn collected_identity(&self) {
        self.inner.identities_collected.inc();
        self.wrote(WriteKind::SecurityIdentityDelete);
    }

    /// The registry in OpenMetrics text, ending in `# EOF`.
    pub fn encode(&self) -> Result<String, OpsError> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
            .map_err(OpsError::Encode)?;
        Ok(out)
    }
}

fn saturate(n: u128) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl trellis_common::ops::Metrics for Metrics {
    fn encode(&self) -> Result<String, OpsError> {
        Metrics::encode(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};
    use trellis_common::ops::testing::http_get;

    fn has_line(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[test]
    fn ops_metrics_encode_values_with_bounded_labels() {
        let metrics = Metrics::new();
        let clone = metrics.clone();
        metrics.reconciled(Duration::from_millis(3));
        clone.reconciled(Duration::from_millis(700));
        metrics.error(ErrorKind::Api);
        metrics.wrote(WriteKind::PoolStatus);
        metrics.wrote(WriteKind::PoolStatus);
        metrics.set_ipam(5, u128::MAX, 2);
        metrics.set_leader(true);
        metrics.set_identities(7, 3);
        metrics.collected_identity();
        let text = metrics.encode().expect("encode");

        // OpenMetrics names the counter family without `_total` and its
        // sample with it; the Prometheus 0.0.4 text format put it on both.
        for line in [
            "# TYPE trellis_operator_reconciles counter",
            "trellis_operator_reconciles_total 2",
            "trellis_operator_reconcile_errors_total{kind=\"api\"} 1",
            "trellis_operator_reconcile_errors_total{kind=\"timeout\"} 0",
            "trellis_operator_writes_total{kind=\"pool_status\"} 2",
            "trellis_operator_writes_total{kind=\"network_config_status\"} 0",
            "# TYPE trellis_operator_reconcile_duration_seconds histogram",
            "trellis_operator_reconcile_duration_seconds_count 2",
            "trellis_operator_reconcile_duration_seconds_bucket{le=\"0.005\"} 1",
            "trellis_operator_reconcile_duration_seconds_bucket{le=\"1.0\"} 2",
            "trellis_operator_ipam_blocks_in_use 5",
            "trellis_operator_ipam_blocks_capacity 9223372036854775807",
            "trellis_operator_ipam_nodes_without_block 2",
            "trellis_operator_leader 1",
            "trellis_operator_identities 7",
            "trellis_operator_identities_unreferenced 3",
            "# TYPE trellis_operator_identities_collected counter",
            "trellis_operator_identities_collected_total 1",
            "trellis_operator_writes_total{kind=\"security_identity_delete\"} 1",
            "# EOF",
        ] {
            assert!(has_line(&text, line), "missing {line:?} in\n{text}");
        }
        metrics.set_leader(false);
        let text = metrics.encode().expect("encode");
        assert!(has_line(&text, "trellis_operator_leader 0"), "{text}");
    }

    #[tokio::test]
    async fn ops_endpoints_serve_and_shut_down() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Metrics::new();
        let health = Health::new(DEFAULT_STALENESS, "caches not synced");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, metrics.clone(), health.clone(), async {
            let _ = stopped.await;
        }));

        metrics.reconciled(Duration::from_millis(10));
        metrics.reconciled(Duration::from_millis(20));
        metrics.error(ErrorKind::Api);
        let (status, content_type, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
        assert!(
            has_line(&body, "# TYPE trellis_operator_reconciles counter"),
            "{body}"
        );
        assert!(
            has_line(&body, "trellis_operator_reconciles_total 2"),
            "{body}"
        );
        let api_errors = "trellis_operator_reconcile_errors_total{kind=\"api\"} 1";
        assert!(has_line(&body, api_errors), "{body}");

        let (status, _, body) = http_get(addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (503, "caches not synced"));
        health.set_ready(true);
        let (status, _, body) = http_get(addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ok"));

        let (status, _, body) = http_get(addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok"));
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
