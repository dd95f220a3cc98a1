//! `trellis-node`'s Prometheus metrics. Labels come from closed enums (what
//! triggered a reconcile, which kind of kernel write, which step failed),
//! never from peer names, so the series count is fixed whatever the cluster
//! size.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use trellis_common::ops::OpsError;

use trellis_cni::proto::{Command, code};

use crate::plan::Op;
use crate::policy::sync::MapOp;

/// Reconcile durations from 100 µs (nothing to do) to 10 s.
const DURATION_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];

macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }
        impl $name {
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }
        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
                fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

label_enum!(
    /// What woke a reconcile.
    Trigger {
        Start => "start",
        Spec => "spec",
        Kernel => "kernel",
        Resync => "resync",
        Retry => "retry",
        Endpoints => "endpoints",
        Policy => "policy",
    }
);

label_enum!(
    /// A CNI request's command (`invalid`: it did not decode).
    CniCommand {
        Add => "add",
        Del => "del",
        Check => "check",
        Status => "status",
        Gc => "gc",
        Invalid => "invalid",
    }
);

label_enum!(
    /// How a CNI request ended: `ok`, or the CNI error code's name.
    CniResult {
        Ok => "ok",
        IncompatibleVersion => "incompatible_version",
        UnknownContainer => "unknown_container",
        InvalidEnvironment => "invalid_environment",
        IoFailure => "io_failure",
        DecodingFailure => "decoding_failure",
        TryAgainLater => "try_again_later",
        AddressesExhausted => "addresses_exhausted",
        EndpointMismatch => "endpoint_mismatch",
        Internal => "internal",
    }
);

impl CniCommand {
    pub fn of(command: &Command) -> Self {
        match command {
            Command::Add { .. } => Self::Add,
            Command::Del { .. } => Self::Del,
            Command::Check { .. } => Self::Check,
            Command::Status => Self::Status,
            Command::Gc { .. } => Self::Gc,
        }
    }
}

impl CniResult {
    /// The result of an error answer with `code`.
    pub fn of_code(c: u32) -> Self {
        match c {
            code::INCOMPATIBLE_VERSION => Self::IncompatibleVersion,
            code::UNKNOWN_CONTAINER => Self::UnknownContainer,
            code::INVALID_ENVIRONMENT => Self::InvalidEnvironment,
            code::IO_FAILURE => Self::IoFailure,
            code::DECODING_FAILURE => Self::DecodingFailure,
            code::TRY_AGAIN_LATER => Self::TryAgainLater,
            code::ADDRESSES_EXHAUSTED => Self::AddressesExhausted,
            code::ENDPOINT_MISMATCH => Self::EndpointMismatch,
            _ => Self::Internal,
        }
    }
}

label_enum!(
    /// The kind of object a kernel write touched.
    WriteKind {
        Link => "link",
        Address => "address",
        Neighbour => "neighbour",
        Fdb => "fdb",
        Route => "route",
    }
);

label_enum!(
    /// What a netlink notification did: woke the reconcile loop (it can
    /// change what the loop observes), or was ignored (a pod's veth, route
    /// or neighbour; see [`crate::wake`]).
    NotificationEffect {
        Wake => "wake",
        Ignored => "ignored",
    }
);

label_enum!(
    /// Which step of a reconcile failed.
    ErrorKind {
        Observe => "observe",
        Spec => "spec",
        Apply => "apply",
        Status => "status",
    }
);

label_enum!(
    /// A write to the policy maps ([`MapOp`]'s kinds).
    PolicyWrite {
        SetIpCache => "set_ipcache",
        SetTable => "set_table",
        SetEndpoint => "set_endpoint",
        RemoveEndpoint => "remove_endpoint",
        RemoveTable => "remove_table",
        RemoveEntries => "remove_entries",
        RemoveIpCache => "remove_ipcache",
    }
);

label_enum!(
    /// Whether a write was accepted.
    WriteResult {
        Ok => "ok",
        Failed => "failed",
    }
);

impl PolicyWrite {
    pub fn of(op: &MapOp) -> Self {
        match op {
            MapOp::SetIpCache { .. } => Self::SetIpCache,
            MapOp::SetTable { .. } => Self::SetTable,
            MapOp::SetEndpoint { .. } => Self::SetEndpoint,
            MapOp::RemoveEndpoint { .. } => Self::RemoveEndpoint,
            MapOp::RemoveTable { .. } => Self::RemoveTable,
            MapOp::RemoveEntries { .. } => Self::RemoveEntries,
            MapOp::RemoveIpCache { .. } => Self::RemoveIpCache,
        }
    }
}

label_enum!(
    /// A step of a CNI ADD in `trellis-node`, in order.
    AddPhase {
        Prepare => "prepare",
        Allocate => "allocate",
        Wire => "wire",
        Identity => "identity",
        PolicySync => "policy_sync",
        Attach => "attach",
        Record => "record",
    }
);

/// What one policy sync did, for [`Metrics::policy_synced`].
#[derive(Debug, Clone, Default)]
pub struct PolicySync<'a> {
    /// The ops planned and applied, and those of them that failed.
    pub ops: &'a [MapOp],
    pub failed: &'a [MapOp],
    /// Endpoint compilations done (compile cache misses).
    pub compiled: u64,
    /// Entries the IP cache should hold.
    pub ipcache: usize,
    /// Identities the compiler knows.
    pub identities: usize,
    /// From the sync's start to the maps written.
    pub took: Duration,
}

impl WriteKind {
    pub fn of(op: &Op) -> Self {
        match op {
            Op::CreateVxlan(_)
            | Op::DeleteVxlan { .. }
            | Op::SetVxlanMtu(_)
            | Op::SetVxlanMac(_)
            | Op::SetVxlanUp => Self::Link,
            Op::AddAddress(_) | Op::DelAddress(_) => Self::Address,
            Op::ReplaceNeighbour(_) | Op::DelNeighbour(_) => Self::Neighbour,
            Op::ReplaceFdb(_) | Op::DelFdb(_) => Self::Fdb,
            Op::ReplaceRoute(_) | Op::DelRoute(_) => Self::Route,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TriggerLabels {
    trigger: Trigger,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    kind: ErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WriteLabels {
    kind: WriteKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NotificationLabels {
    effect: NotificationEffect,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CniLabels {
    command: CniCommand,
    result: CniResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AddPhaseLabels {
    phase: AddPhase,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PolicyWriteLabels {
    op: PolicyWrite,
    result: WriteResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CniCommandLabels {
    command: CniCommand,
}

/// CNI request durations from 100 µs (STATUS) to 10 s (an ADD stuck behind
/// a busy kernel).
const CNI_DURATION_BUCKETS: [f64; 14] = DURATION_BUCKETS;

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn cni_histogram() -> Histogram {
    Histogram::new(CNI_DURATION_BUCKETS)
}

/// The node reconciler's metrics; clones share the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    reconciles: Family<TriggerLabels, Counter>,
    reconcile_duration: Histogram,
    errors: Family<ErrorLabels, Counter>,
    netlink_writes: Family<WriteLabels, Counter>,
    netlink_events: Family<NotificationLabels, Counter>,
    status_writes: Counter,
    peers: Gauge,
    routes: Gauge,
    ready: Gauge,
    cni_requests: Family<CniLabels, Counter>,
    cni_request_duration: HistogramFamily<CniCommandLabels>,
    add_phase_duration: HistogramFamily<AddPhaseLabels>,
    endpoints: Gauge,
    endpoints_deleting: Gauge,
    policy_syncs: Counter,
    policy_sync_duration: Histogram,
    policy_writes: Family<PolicyWriteLabels, Counter>,
    policy_compilations: Counter,
    ipcache_entries: Gauge,
    identities: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis_node");
        let reconciles = Family::<TriggerLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let netlink_writes = Family::<WriteLabels, Counter>::default();
        for &trigger in Trigger::ALL {
            drop(reconciles.get_or_create(&TriggerLabels { trigger }));
        }
        for &kind in ErrorKind::ALL {
            drop(errors.get_or_create(&ErrorLabels { kind }));
        }
        for &kind in WriteKind::ALL {
            drop(netlink_writes.get_or_create(&WriteLabels { kind }));
        }
        let reconcile_duration = Histogram::new(DURATION_BUCKETS);
        let netlink_events = Family::<NotificationLabels, Counter>::default();
        for &effect in NotificationEffect::ALL {
            drop(netlink_events.get_or_create(&NotificationLabels { effect }));
        }
        let status_writes = Counter::default();
        let [
            peers,
            routes,
            ready,
            endpoints,
            endpoints_deleting,
            ipcache_entries,
            identities,
        ] = std::array::from_fn(|_| Gauge::default());
        let [policy_syncs, policy_compilations] = std::array::from_fn(|_| Counter::default());
        let policy_sync_duration = Histogram::new(DURATION_BUCKETS);
        let policy_writes = Family::<PolicyWriteLabels, Counter>::default();
        for &op in PolicyWrite::ALL {
            for &result in WriteResult::ALL {
                drop(policy_writes.get_or_create(&PolicyWriteLabels { op, result }));
            }
        }
        let cni_requests = Family::<CniLabels, Counter>::default();
        let cni_request_duration: HistogramFamily<CniCommandLabels> =
            Family::new_with_constructor(cni_histogram);
        for &command in CniCommand::ALL {
            drop(cni_requests.get_or_create(&CniLabels {
                command,
                result: CniResult::Ok,
            }));
            drop(cni_request_duration.get_or_create(&CniCommandLabels { command }));
        }
        let add_phase_duration: HistogramFamily<AddPhaseLabels> =
            Family::new_with_constructor(cni_histogram);
        for &phase in AddPhase::ALL {
            drop(add_phase_duration.get_or_create(&AddPhaseLabels { phase }));
        }

        registry.register(
            "reconciles",
            "Reconciles by what woke them",
            reconciles.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Duration of a reconcile: observe, plan, apply, observe again",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        registry.register("reconcile_errors", "Failed reconcile steps", errors.clone());
        registry.register(
            "netlink_writes",
            "Kernel writes (ops applied, successful or not) by object kind",
            netlink_writes.clone(),
        );
        registry.register(
            "netlink_events",
            "Netlink notifications received from the node's namespace, by whether they woke the reconcile loop",
            netlink_events.clone(),
        );
        registry.register(
            "status_writes",
            "Writes of this node's NetworkStatus",
            status_writes.clone(),
        );
        registry.register("peers", "Peers whose blocks are programmed", peers.clone());
        registry.register(
            "routes",
            "Routes to remote pod blocks wanted",
            routes.clone(),
        );
        registry.register(
            "ready",
            "1 while the node's Ready condition is True",
            ready.clone(),
        );
        registry.register(
            "cni_requests",
            "CNI requests served, by command and result (ok or the CNI error)",
            cni_requests.clone(),
        );
        registry.register_with_unit(
            "cni_request_duration",
            "Time to serve a CNI request, by command",
            Unit::Seconds,
            cni_request_duration.clone(),
        );
        registry.register_with_unit(
            "cni_add_phase_duration",
            "Time of each step of a CNI ADD in trellis-node: prepare (checks, the pod's namespace), allocate (addresses, record), wire (veth, addresses, routes), identity (the pod's labels and identity), policy_sync (the policy maps), attach (the policy programs on the veth), record",
            Unit::Seconds,
            add_phase_duration.clone(),
        );
        registry.register(
            "endpoints",
            "Pod endpoints in phase Ready on this node",
            endpoints.clone(),
        );
        registry.register(
            "endpoints_deleting",
            "Pod endpoints whose DEL answered and whose veth is still being deleted",
            endpoints_deleting.clone(),
        );
        registry.register(
            "policy_syncs",
            "Policy syncs: the policy maps computed and written (every CNI ADD and DEL, every change of the cluster's policy objects, shards or identities)",
            policy_syncs.clone(),
        );
        registry.register_with_unit(
            "policy_sync_duration",
            "Duration of a policy sync: what changed folded in, tables compiled where needed, the maps planned and written",
            Unit::Seconds,
            policy_sync_duration.clone(),
        );
        registry.register(
            "policy_map_writes",
            "Writes to the policy maps, by kind and whether the kernel accepted them",
            policy_writes.clone(),
        );
        registry.register(
            "policy_compilations",
            "Endpoint policy compilations (one per label set and named ports whose cached compilation a change dropped)",
            policy_compilations.clone(),
        );
        registry.register(
            "policy_ipcache_entries",
            "Entries the policy IP cache holds: every pod address of the cluster, the node's addresses, the policies' prefixes",
            ipcache_entries.clone(),
        );
        registry.register(
            "policy_identities",
            "Security identities the policy compiler knows",
            identities.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                reconciles,
                reconcile_duration,
                errors,
                netlink_writes,
                netlink_events,
                status_writes,
                peers,
                routes,
                ready,
                cni_requests,
                cni_request_duration,
                add_phase_duration,
                endpoints,
                endpoints_deleting,
                policy_syncs,
                policy_sync_duration,
                policy_writes,
                policy_compilations,
                ipcache_entries,
                identities,
            }),
        }
    }

    /// Records one step of a CNI ADD.
    pub fn add_phase(&self, phase: AddPhase, took: Duration) {
        self.inner
            .add_phase_duration
            .get_or_create(&AddPhaseLabels { phase })
            .observe(took.as_secs_f64());
    }

    /// Records one policy sync.
    pub fn policy_synced(&self, sync: &PolicySync) {
        let inner = &self.inner;
        inner.policy_syncs.inc();
        inner.policy_sync_duration.observe(sync.took.as_secs_f64());
        // Per kind: every op planned, those that failed; the rest went in.
        let count = |ops: &[MapOp], kind: PolicyWrite| -> u64 {
            ops.iter().filter(|op| PolicyWrite::of(op) == kind).count() as u64
        };
        for &op in PolicyWrite::ALL {
            let failed = count(sync.failed, op);
            let ok = count(sync.ops, op).saturating_sub(failed);
            for (n, result) in [(ok, WriteResult::Ok), (failed, WriteResult::Failed)] {
                if n > 0 {
                    inner
                        .policy_writes
                        .get_or_create(&PolicyWriteLabels { op, result })
                        .inc_by(n);
                }
            }
        }
        inner.policy_compilations.inc_by(sync.compiled);
        inner
            .ipcache_entries
            .set(i64::try_from(sync.ipcache).unwrap_or(i64::MAX));
        inner
            .identities
            .set(i64::try_from(sync.identities).unwrap_or(i64::MAX));
    }

    pub fn cni_request(&self, command: CniCommand, result: CniResult, took: Duration) {
        self.inner
            .cni_requests
            .get_or_create(&CniLabels { command, result })
            .inc();
        self.inner
            .cni_request_duration
            .get_or_create(&CniCommandLabels { command })
            .observe(took.as_secs_f64());
    }

    pub fn set_endpoints(&self, n: usize) {
        self.inner
            .endpoints
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_endpoints_deleting(&self, n: usize) {
        self.inner
            .endpoints_deleting
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn reconciled(&self, trigger: Trigger, took: Duration) {
        self.inner
            .reconciles
            .get_or_create(&TriggerLabels { trigger })
            .inc();
        self.inner.reconcile_duration.observe(took.as_secs_f64());
    }

    pub fn error(&self, kind: ErrorKind) {
        self.inner.errors.get_or_create(&ErrorLabels { kind }).inc();
    }

    pub fn wrote(&self, ops: &[Op]) {
        for op in ops {
            let kind = WriteKind::of(op);
            self.inner
                .netlink_writes
                .get_or_create(&WriteLabels { kind })
                .inc();
        }
    }

    pub fn netlink_events(&self, effect: NotificationEffect, n: u64) {
        self.inner
            .netlink_events
            .get_or_create(&NotificationLabels { effect })
            .inc_by(n);
    }

    pub fn status_written(&self) {
        self.inner.status_writes.inc();
    }

    pub fn set_state(&self, peers: usize, routes: usize, ready: bool) {
        self.inner
            .peers
            .set(i64::try_from(peers).unwrap_or(i64::MAX));
        self.inner
            .routes
            .set(i64::try_from(routes).unwrap_or(i64::MAX));
        self.inner.ready.set(i64::from(ready));
    }
}

impl trellis_common::ops::Metrics for Metrics {
    fn encode(&self) -> Result<String, OpsError> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
            .map_err(OpsError::Encode)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_common::ops::Metrics as _;

    #[test]
    fn every_series_exists_from_the_start_and_counts() {
        let m = Metrics::new();
        let text = m.encode().expect("encode");
        for line in [
            "trellis_node_reconciles_total{trigger=\"kernel\"} 0",
            "trellis_node_netlink_writes_total{kind=\"route\"} 0",
            "trellis_node_reconcile_errors_total{kind=\"apply\"} 0",
            "trellis_node_status_writes_total 0",
            "trellis_node_ready 0",
            "trellis_node_cni_requests_total{command=\"add\",result=\"ok\"} 0",
            "trellis_node_cni_request_duration_seconds_count{command=\"gc\"} 0",
            "trellis_node_endpoints 0",
            "trellis_node_netlink_events_total{effect=\"ignored\"} 0",
            "trellis_node_policy_syncs_total 0",
            "trellis_node_cni_add_phase_duration_seconds_count{phase=\"policy_sync\"} 0",
            "trellis_node_policy_map_writes_total{op=\"remove_ipcache\",result=\"failed\"} 0",
            "trellis_node_policy_compilations_total 0",
            "trellis_node_policy_ipcache_entries 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        m.reconciled(Trigger::Kernel, Duration::from_millis(2));
        m.wrote(&[Op::SetVxlanUp, Op::SetVxlanMtu(1450)]);
        m.set_state(4, 8, true);
        m.cni_request(CniCommand::Add, CniResult::Ok, Duration::from_millis(30));
        m.cni_request(
            CniCommand::Add,
            CniResult::of_code(code::ADDRESSES_EXHAUSTED),
            Duration::from_millis(1),
        );
        m.set_endpoints(3);
        m.netlink_events(NotificationEffect::Wake, 2);
        m.netlink_events(NotificationEffect::Ignored, 5);
        let net = "10.0.0.1/32".parse().expect("a prefix");
        let set = MapOp::SetIpCache {
            net,
            entry: crate::bpf::abi::IpCacheEntry {
                identity: 300,
                cidr_identity: 0,
            },
        };
        let remove = MapOp::RemoveIpCache { net };
        m.policy_synced(&PolicySync {
            ops: &[set.clone(), set.clone(), remove.clone()],
            failed: std::slice::from_ref(&set),
            compiled: 2,
            ipcache: 150_000,
            identities: 40,
            took: Duration::from_micros(60),
        });
        m.add_phase(AddPhase::Wire, Duration::from_millis(3));
        let text = m.encode().expect("encode");
        for line in [
            "trellis_node_cni_add_phase_duration_seconds_count{phase=\"wire\"} 1",
            "trellis_node_reconciles_total{trigger=\"kernel\"} 1",
            "trellis_node_netlink_writes_total{kind=\"link\"} 2",
            "trellis_node_peers 4",
            "trellis_node_routes 8",
            "trellis_node_ready 1",
            "trellis_node_reconcile_duration_seconds_count 1",
            "trellis_node_cni_requests_total{command=\"add\",result=\"ok\"} 1",
            "trellis_node_cni_requests_total{command=\"add\",result=\"addresses_exhausted\"} 1",
            "trellis_node_cni_request_duration_seconds_count{command=\"add\"} 2",
            "trellis_node_endpoints 3",
            "trellis_node_netlink_events_total{effect=\"wake\"} 2",
            "trellis_node_netlink_events_total{effect=\"ignored\"} 5",
            "trellis_node_policy_syncs_total 1",
            "trellis_node_policy_sync_duration_seconds_count 1",
            "trellis_node_policy_map_writes_total{op=\"set_ipcache\",result=\"ok\"} 1",
            "trellis_node_policy_map_writes_total{op=\"set_ipcache\",result=\"failed\"} 1",
            "trellis_node_policy_map_writes_total{op=\"remove_ipcache\",result=\"ok\"} 1",
            "trellis_node_policy_compilations_total 2",
            "trellis_node_policy_ipcache_entries 150000",
            "trellis_node_policy_identities 40",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
