//! `trellis-bench-nodes`: how long the operator takes to give new nodes their address blocks,
//! against a bare apiserver create→watch round trip measured in the same sandbox and run.
//!
//! ```text
//! fresh sandbox (etcd, kube-apiserver, CRDs, trellis-operator; no nodes)
//!   + IPPool default-ipv4 (config/samples: 10.244.0.0/16, /24 blocks = 256)
//!
//! unloaded  watch ConfigMaps ─┐  create 20 ConfigMaps one at a time; per object:
//!                             └─ sent ── returned ── seen in the watch
//! baseline  watch ConfigMaps ─┐  create N ConfigMaps at once; per object:
//!                             └─ sent ── returned ── seen in the watch
//! nodes     watch NodeNetworks┐  create N Nodes at once (one POST each, with
//!                             │  status.addresses, as a kubelet registers);
//!                             └─ sent ── returned ── NodeNetwork with podCIDRs seen
//! ```
//!
//! The operator's latency is create returned → NodeNetwork seen; the bare round trip it is
//! compared with is create sent → seen for the ConfigMaps of the same burst (returned → seen is
//! only a few ms there, at times negative: the apiserver sends the watch event and the
//! response together, so it would measure nothing but noise).
//! All times are `Instant`s (monotonic) in this process. Prints percentiles per phase and one
//! `RESULT key=value ...` line (milliseconds) for `scripts/bench-operator.sh`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::{
    Api, Client, ResourceExt as _,
    api::{ObjectMeta, PostParams},
    runtime::watcher,
};
use trellis_api::v1alpha1::{IPPool, NodeNetwork};
use trellis_e2e::{
    ControlPlane, NodeSpec, OperatorOptions, StartOptions, controlplane::ensure_namespace, nodes,
    operator, samples, support::Stats,
};

#[derive(Parser)]
#[command(
    name = "trellis-bench-nodes",
    about = "Node → NodeNetwork latency of trellis-operator vs. a bare create→watch round trip"
)]
struct Args {
    /// Objects per phase (nodes, and ConfigMaps for the baseline).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=nodes::MAX_NUMBERED as i64))]
    count: u8,
    /// Sandbox state directory (ended and wiped at start, removed at the end).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("trellis-bench-nodes"))]
    state_dir: PathBuf,
    /// Seconds to wait for each phase to complete.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

const POOL: &str = "default-ipv4";
const NAMESPACE: &str = "trellis-bench";
/// ConfigMaps created one at a time for the unloaded round trip.
const LONE_COUNT: usize = 20;

#[tokio::main]
async fn main() -> ExitCode {
    trellis_e2e::support::init_logging("warn,kube_client=off");
    let args = Args::parse();
    trellis_e2e::support::run_until_interrupted(run(&args)).await
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let count = usize::from(args.count);
    let timeout = Duration::from_secs(args.timeout);
    let opts = StartOptions {
        system_namespace: true,
        operator: Some(OperatorOptions::default()),
        remove_state_on_stop: true,
        ..StartOptions::new(&args.state_dir)
    };
    let started = Instant::now();
    // Stopped (operator first) when dropped, also on an error below.
    let cp = ControlPlane::start(opts)
        .await
        .with_context(|| format!("starting a sandbox in {}", args.state_dir.display()))?;
    eprintln!(
        "sandbox with trellis-operator up in {:.1}s ({} build)",
        started.elapsed().as_secs_f64(),
        if operator::release_build() {
            "release"
        } else {
            "debug"
        }
    );
    let client = cp.client();
    let metrics_port = cp
        .endpoints()
        .operator_metrics_port
        .context("no operator metrics port")?;

    apply_pool(&client, timeout).await?;
    ensure_namespace(&client, NAMESPACE).await?;

    let lone = baseline(&client, LONE_COUNT, Load::OneAtATime, timeout).await?;
    let baseline = baseline(&client, count, Load::Burst, timeout).await?;
    let passes_before = reconciles(metrics_port).await?;
    let nodes = nodes_phase(&client, count, timeout).await?;
    let passes = reconciles(metrics_port).await? - passes_before;

    let report = Report {
        count,
        lone,
        baseline,
        nodes,
        passes,
    };
    report.print();
    drop(cp);
    Ok(())
}

/// Apply the pool sample's `default-ipv4` and wait until the operator has written its status,
/// so the operator has it in its cache before the clock starts.
async fn apply_pool(client: &Client, timeout: Duration) -> anyhow::Result<()> {
    let pool = samples::ippools(samples::IPPOOL_SAMPLE)?
        .into_iter()
        .find(|p| p.name_any() == POOL)
        .with_context(|| format!("no IPPool {POOL} in {}", samples::IPPOOL_SAMPLE))?;
    samples::apply_ippools(client, &[pool], "trellis-bench").await?;
    let api: Api<IPPool> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    loop {
        let pool = api.get(POOL).await.context("get the IPPool")?;
        let total = pool.status.as_ref().map_or(0, |s| s.blocks_total);
        if total > 0 {
            eprintln!(
                "IPPool {POOL} ({}, /{}): {total} blocks",
                pool.spec.cidr, pool.spec.block_size
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the operator wrote no status for IPPool {POOL} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// When each object of one phase was sent, came back and was seen in the watch.
#[derive(Debug, Default)]
struct Phase {
    first_sent: Option<Instant>,
    sent: BTreeMap<String, Instant>,
    returned: BTreeMap<String, Instant>,
    seen: BTreeMap<String, Instant>,
}

impl Phase {
    /// `to - from` per object, in milliseconds, sorted; negative when `to` came first.
    fn latencies(
        &self,
        from: &BTreeMap<String, Instant>,
        to: &BTreeMap<String, Instant>,
    ) -> Vec<f64> {
        let mut ms: Vec<f64> = from
            .iter()
            .filter_map(|(name, a)| {
                let b = to.get(name)?;
                Some(if b >= a {
                    b.duration_since(*a).as_secs_f64() * 1e3
                } else {
                    -(a.duration_since(*b).as_secs_f64() * 1e3)
                })
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        ms
    }

    /// First request sent → last object seen.
    fn total_ms(&self) -> f64 {
        match (self.first_sent, self.seen.values().max()) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64() * 1e3,
            _ => f64::NAN,
        }
    }
}

/// Watch `api` from now on; record when each wanted name first passes `ready`; finish when
/// all are seen. Returns once the watch's initial list is done, with the recording task.
async fn watch_until_seen<K>(
    api: Api<K>,
    wanted: BTreeSet<String>,
    ready: fn(&K) -> bool,
    timeout: Duration,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<BTreeMap<String, Instant>>>>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
        let mut synced_tx = Some(synced_tx);
        let mut seen = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while seen.len() < wanted.len() {
            let event = match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => bail!(
                    "after {timeout:?} only {} of {} seen; missing e.g. {:?}",
                    seen.len(),
                    wanted.len(),
                    wanted.iter().find(|n| !seen.contains_key(*n))
                ),
                Ok(None) => bail!("the watch ended"),
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "watch error; the watcher retries");
                    continue;
                }
                Ok(Some(Ok(event))) => event,
            };
            let now = Instant::now();
            match event {
                watcher::Event::InitDone => {
                    if let Some(tx) = synced_tx.take() {
                        let _ = tx.send(());
                    }
                }
                watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => {
                    let name = obj.name_any();
                    if wanted.contains(&name) && ready(&obj) {
                        seen.entry(name).or_insert(now);
                    }
                }
                watcher::Event::Init | watcher::Event::Delete(_) => {}
            }
        }
        Ok(seen)
    });
    tokio::time::timeout(timeout, synced_rx)
        .await
        .context("the watch did not finish its initial list")?
        .context("the watch task ended before its initial list")?;
    Ok(task)
}

/// How the objects of a phase are created.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    /// All requests in flight at once.
    Burst,
    /// Each request after the previous one returned.
    OneAtATime,
}

/// Run `create(i)` for `0..count`, recording sent and returned per name.
async fn create_all<F, Fut>(
    count: usize,
    load: Load,
    name: fn(usize) -> String,
    create: F,
) -> anyhow::Result<Phase>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let first_sent = Instant::now();
    if load == Load::OneAtATime {
        let mut phase = Phase {
            first_sent: Some(first_sent),
            ..Phase::default()
        };
        for i in 0..count {
            let sent = Instant::now();
            create(i).await?;
            phase.returned.insert(name(i), Instant::now());
            phase.sent.insert(name(i), sent);
        }
        return Ok(phase);
    }
    let stamps = Arc::new(Mutex::new(Phase::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let request = create(i);
        let stamps = stamps.clone();
        tasks.spawn(async move {
            let sent = Instant::now();
            request.await?;
            let returned = Instant::now();
            let mut s = stamps
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.sent.insert(name(i), sent);
            s.returned.insert(name(i), returned);
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a create task failed")??;
    }
    let mut phase = std::mem::take(
        &mut *stamps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    phase.first_sent = Some(first_sent);
    Ok(phase)
}

fn configmap_name(i: usize) -> String {
    format!("trellis-bench-{}", i + 1)
}

fn lone_configmap_name(i: usize) -> String {
    format!("trellis-bench-lone-{}", i + 1)
}

fn node_name(i: usize) -> String {
    format!("{}{}", nodes::NODE_PREFIX, i + 1)
}

/// The baseline: N ConfigMaps created (all at once, or one at a time), each timed to its
/// appearance in a watch.
async fn baseline(
    client: &Client,
    count: usize,
    load: Load,
    timeout: Duration,
) -> anyhow::Result<Phase> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let name = match load {
        Load::Burst => configmap_name,
        Load::OneAtATime => lone_configmap_name,
    };
    let wanted = (0..count).map(name).collect();
    let watch = watch_until_seen(api.clone(), wanted, |_| true, timeout).await?;
    let mut phase = create_all(count, load, name, |i| {
        let api = api.clone();
        async move {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name(i)),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([("i".to_string(), i.to_string())])),
                ..ConfigMap::default()
            };
            api.create(&PostParams::default(), &cm)
                .await
                .with_context(|| format!("create ConfigMap {}", name(i)))?;
            Ok(())
        }
    })
    .await?;
    phase.seen = watch.await.context("the watch task failed")??;
    Ok(phase)
}

/// N Nodes registered at once, each timed to its NodeNetwork with pod CIDRs.
async fn nodes_phase(client: &Client, count: usize, timeout: Duration) -> anyhow::Result<Phase> {
    let nn_api: Api<NodeNetwork> = Api::all(client.clone());
    let wanted = (0..count).map(node_name).collect();
    let watch = watch_until_seen(
        nn_api,
        wanted,
        |nn: &NodeNetwork| !nn.spec.pod_cidrs.is_empty(),
        timeout,
    )
    .await?;
    let node_api: Api<Node> = Api::all(client.clone());
    let mut phase = create_all(count, Load::Burst, node_name, |i| {
        let api = node_api.clone();
        async move {
            let spec = NodeSpec::numbered(i + 1).context("node number out of range")?;
            // One POST with the status, as a kubelet registers: the apiserver keeps the
            // status of a Node on create, so the create is the whole registration.
            let mut node = spec.node();
            node.status = Some(serde_json::from_value(
                spec.status_patch()["status"].clone(),
            )?);
            let created = api
                .create(&PostParams::default(), &node)
                .await
                .with_context(|| format!("create Node {}", spec.name))?;
            if nodes::internal_ips(&created).is_empty() {
                bail!(
                    "the apiserver dropped the status of Node {} on create",
                    spec.name
                );
            }
            Ok(())
        }
    })
    .await?;
    phase.seen = watch.await.context("the watch task failed")??;
    Ok(phase)
}

/// `trellis_operator_reconciles_total` from the operator's /metrics.
async fn reconciles(port: u16) -> anyhow::Result<u64> {
    let (status, body) = operator::http_get(port, "/metrics", Duration::from_secs(5))
        .await
        .map_err(|e| anyhow::anyhow!("operator /metrics: {e}"))?;
    if status != 200 {
        bail!("operator /metrics answered {status}");
    }
    body.lines()
        .find_map(|l| {
            l.strip_prefix("trellis_operator_reconciles_total ")
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|v| v as u64)
        .context("no trellis_operator_reconciles_total in /metrics")
}

struct Report {
    count: usize,
    lone: Phase,
    baseline: Phase,
    nodes: Phase,
    passes: u64,
}

impl Report {
    fn print(&self) {
        let b = &self.baseline;
        let n = &self.nodes;
        let b_create = Stats::of(b.latencies(&b.sent, &b.returned));
        let b_watch = Stats::of(b.latencies(&b.returned, &b.seen));
        let b_round = Stats::of(b.latencies(&b.sent, &b.seen));
        let n_create = Stats::of(n.latencies(&n.sent, &n.returned));
        let n_net = Stats::of(n.latencies(&n.returned, &n.seen));
        let n_round = Stats::of(n.latencies(&n.sent, &n.seen));
        let (b_total, n_total) = (b.total_ms(), n.total_ms());
        let count = self.count;
        let l = &self.lone;
        let lone = Stats::of(l.latencies(&l.sent, &l.seen));
        println!("unloaded: {LONE_COUNT} ConfigMaps created one at a time, each seen in a watch");
        println!("  create sent → in watch         {}", lone.line());
        println!("baseline: {count} ConfigMaps created at once, each seen in a watch");
        println!("  create sent → returned         {}", b_create.line());
        println!(
            "  create returned → in watch     {}   (small: event and response leave the apiserver together)",
            b_watch.line()
        );
        println!(
            "  create sent → in watch         {}   = the bare create→watch round trip",
            b_round.line()
        );
        println!("  first sent → all {count} seen      {b_total:>7.1} ms");
        println!(
            "nodes: {count} Nodes registered at once, each NodeNetwork with podCIDRs seen in a watch"
        );
        println!("  create sent → returned         {}", n_create.line());
        println!(
            "  create returned → NodeNetwork  {}   = the operator's latency",
            n_net.line()
        );
        println!("  create sent → NodeNetwork      {}", n_round.line());
        println!("  first sent → all {count} written   {n_total:>7.1} ms");
        println!("  operator reconcile passes      {}", self.passes);
        let (r50, r99, rtotal) = (
            n_net.p50 / b_round.p50,
            n_net.p99 / b_round.p99,
            n_total / b_total,
        );
        println!(
            "NodeNetwork latency = {r50:.2}x (p50), {r99:.2}x (p99) a bare create→watch round trip; \
             all {count} written in {rtotal:.2}x the time all {count} ConfigMaps were seen; \
             p50 = {:.0}x an unloaded round trip",
            n_net.p50 / lone.p50
        );
        println!(
            "RESULT count={count} passes={} nn_p50={:.1} nn_p99={:.1} nn_max={:.1} nn_total={n_total:.1} \
             rt_p50={:.1} rt_p99={:.1} rt_max={:.1} cm_total={b_total:.1} \
             ratio_p50={r50:.2} ratio_p99={r99:.2} ratio_total={rtotal:.2} lone_p50={:.1}",
            self.passes,
            n_net.p50,
            n_net.p99,
            n_net.max,
            b_round.p50,
            b_round.p99,
            b_round.max,
            lone.p50,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_may_be_negative() {
        let t = Instant::now();
        let later = t + Duration::from_millis(5);
        let phase = Phase::default();
        let from = BTreeMap::from([("a".to_string(), t), ("b".to_string(), later)]);
        let to = BTreeMap::from([("a".to_string(), later), ("b".to_string(), t)]);
        let ms = phase.latencies(&from, &to);
        assert_eq!(ms.len(), 2);
        assert!(
            (ms[0] + 5.0).abs() < 1e-6 && (ms[1] - 5.0).abs() < 1e-6,
            "{ms:?}"
        );
    }
}
