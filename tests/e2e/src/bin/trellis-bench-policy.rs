//! `trellis-bench-policy`: what NetworkPolicy enforcement costs traffic between pods on two
//! nodes, how long a policy change takes to be enforced on every node, and how long a
//! PolicyBundle change takes until its status says so, each against a baseline measured in
//! the same run and sandbox.
//!
//! ```text
//! traffic   fresh sandbox, 2 nodes (etcd, kube-apiserver, CRDs, trellis-operator, a
//!           trellis-node per node; release builds) + IPPool default-ipv4
//!   pods    trellis-bench/server on trellis-node-2, trellis-bench/client on trellis-node-1
//!   policy  bench-blocks: server ingress from N ipBlock /32s (198.18.0.0/15) on TCP 9000
//!           bench-client: server ingress from app=bench-client on TCP 5201, 5202
//!           → the server's ingress table holds >= N entries (read back from the node's maps)
//!   servers iperf3 -s in the server's namespace (ip netns exec); a 1-byte echo server
//!           (a thread of this process inside the server's namespace)
//!   states  with     the programs on both pods' host veths, on the hook trellis-node uses
//!                    (clsact filters; this process's load of the same object, with the
//!                    node's maps, swapped in once at the start, as a trellis-node restart
//!                    does)
//!           without  both programs detached from both veths (Datapath::detach on that
//!                    load), same pods, same path
//!           each checked once before the rounds by what it does: a SYN to the server's
//!           closed port 5203 is dropped with, refused without
//!   rounds  R times:
//!           iperf3 -c (one TCP stream, S s, first second omitted) in each state, ABBA
//!           order from round to round (not with --rr-only)
//!           request/response: 1 byte each way on one TCP_NODELAY connection, opened once
//!           with the programs on and kept for the whole run, on a thread of its own (and
//!           the echo's: pinned with --rr-cpus); S s per state in slices of --rr-slice-ms
//!           (100 ms), the states alternating slice by slice (ABBA)
//!           after each measurement the nodes' counters moved (with: at least a packet per
//!           transaction) or not at all (without)
//!   report  medians per state and of the per-round ratios; for request/response also the
//!           median of the ratios of adjacent slices (a paired comparison: the machine's
//!           own swings, which last longer than a slice, fall on both sides of a pair) with
//!           a 95 % confidence interval (target >= 0.95)
//!
//! realize   fresh sandbox, 3 nodes + IPPool default-ipv4; pods trellis-bench/p1..p3, one per
//!           node; p2 serves TCP 80 (a thread of this process in its namespace)
//!   watches NetworkStatus (every node), NetworkPolicy (trellis-bench); each event stamped
//!           with Instant::now() on arrival
//!   changes C times, alternating: create NetworkPolicy bench-realize (every pod of the
//!           namespace isolated for ingress, only app=bench-client on TCP 80) / delete it
//!           t0 just before the request; expected hash = policy_hash(mode, the policies then)
//!   timed   realized: the last node's NetworkStatus with PolicyReady=True and that hash
//!           watch floor: this process's own NetworkPolicy watch delivers the change
//!           probe: p1 → p2:80 changes: after a create the first SYN dropped (attempts
//!           every ~2 ms, 20 ms timeout, a drop confirmed by a second attempt); after a
//!           delete the first connection (attempts every 5 ms: each dropped one times out)
//!   report  p50/p99 of each; ratio realized / watch floor
//!
//! bundle    fresh sandbox, K nodes (--nodes) + IPPool default-ipv4; pods trellis-bench/p1..pK,
//!           one per node, so that every node is a desired node of the bundle
//!   watches PolicyBundle, NetworkStatus (every node); NodeEndpoints and SecurityIdentity
//!           only to tell when the cluster is quiet; each event stamped on arrival
//!   bundle  trellis-bench-bundle: Admin, subject the bench pods (namespace and app label),
//!           ingress from any pod or address to TCP 2323 denied (nothing listens there)
//!   cycles  server-side apply (as `kubectl apply --server-side`): create it (generation 1),
//!           edit it (port 2324: generation 2), delete it (not timed; until the nodes report
//!           the hash without it); the first cycle is a warm-up, not counted; each timed
//!           change starts after 1 s without any event on the four watches (the operator's
//!           rollup passes at most 500 ms after an event: it is idle by then)
//!           t0 just before the request; expected hash = policy_hash(mode, policies, bundles)
//!   timed   Realized: the bundle's status with observedGeneration = the new generation,
//!           Realized=True, realizedNodes = desiredNodes = K
//!           first status: the operator's first status write for the new generation
//!           all nodes: the last node's NetworkStatus with PolicyReady=True and that hash
//!           watch floor: this process's own PolicyBundle watch delivers the new generation
//!   report  p50/p99/max of each; ratio Realized / watch floor; the operator's part
//!           (Realized − all nodes); how many status writes it took
//! ```
//!
//! `scripts/bench-policy.sh` runs all three; the last line of each is `RESULT key=value ...`.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt as _;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::json;
use tokio::sync::watch;
use trellis_api::v1alpha1::{
    NETWORKSTATUS_POLICY_READY, NetworkConfig, NetworkStatus, NodeEndpoints, POLICYBUNDLE_REALIZED,
    PolicyBundle, PolicyEnforcement, SecurityIdentity,
};
use trellis_e2e::{
    ControlPlane, Pod, StartOptions,
    cluster::{add_pods, app_pod, start_cluster},
    datapath, operator, samples,
    support::{Stats, quantile},
};
use trellis_node::bpf::{AttachMode, Datapath, Program};

#[derive(Parser)]
#[command(
    name = "trellis-bench-policy",
    about = "NetworkPolicy enforcement on the sandbox: traffic with and without the programs, \
             policy change → enforced on every node, PolicyBundle applied → Realized"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pod-to-pod throughput and request/response rate across two nodes, with the programs
    /// and a table of >= ENTRIES entries, against the same path with the programs detached.
    Traffic(TrafficArgs),
    /// Time from a NetworkPolicy create/delete to every node reporting it enforced.
    Realize(RealizeArgs),
    /// Time from a PolicyBundle create/edit to its status saying Realized on every node.
    Bundle(BundleArgs),
}

#[derive(Args)]
struct Common {
    /// Sandbox state directory (ended and wiped at start, removed at the end).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("trellis-bench-policy"))]
    state_dir: PathBuf,
    /// Seconds to wait for the network, pods and policy to be ready.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Keep the state directory (logs) after stopping.
    #[arg(long)]
    keep_state: bool,
}

#[derive(Args)]
struct TrafficArgs {
    /// Rounds; each measures both states (ABBA order).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
    /// Seconds per measurement (iperf3 runs one more, omitted).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// ipBlock /32s in the server's policy: entries in its ingress table (plus the client's).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=60000))]
    entries: u32,
    /// The hook of the "with" state: auto (trellis-node's choice: clsact), tcx or clsact.
    #[arg(long, value_enum, default_value_t = HookArg::Auto)]
    hook: HookArg,
    /// Request/response only, no iperf3: shorter rounds, so more pairs of rounds in the
    /// same time (throughput is reported as not measured).
    #[arg(long)]
    rr_only: bool,
    /// Request/response alternates between the states in slices this long (milliseconds),
    /// `seconds` per state in each round, on one connection kept for the whole run.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(10..=60000))]
    rr_slice_ms: u32,
    /// Request/response's client and echo threads pinned: CLIENT[,SERVER] CPU numbers (one
    /// number: both on it). Unset: wherever the scheduler puts them.
    #[arg(long, value_delimiter = ',', num_args = 1..=2)]
    rr_cpus: Vec<usize>,
    /// Request/response rounds after the others, with the programs on and the kernel's
    /// run-time statistics enabled (off during the measured rounds: they add two clock
    /// reads to every run): each program's own run time per packet. 0: none.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
    run_time_rounds: u32,
    #[command(flatten)]
    common: Common,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum HookArg {
    Auto,
    Tcx,
    Clsact,
}

impl HookArg {
    fn mode(self) -> AttachMode {
        match self {
            HookArg::Auto => AttachMode::Auto,
            HookArg::Tcx => AttachMode::Tcx,
            HookArg::Clsact => AttachMode::Clsact,
        }
    }
}

#[derive(Args)]
struct RealizeArgs {
    /// Policy changes (creates and deletes alternating).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(2..=1000))]
    changes: u32,
    /// Nodes in the sandbox (one pod each).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=20))]
    nodes: u8,
    /// Do not probe the datapath (only the NetworkStatus reports).
    #[arg(long)]
    no_probe: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct BundleArgs {
    /// Timed changes: creates and edits in turn (the bundle is deleted after each edit, not
    /// timed, so that the next create is one).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(2..=1000))]
    changes: u32,
    /// Nodes in the sandbox (one pod each: every node is a desired node of the bundle).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=20))]
    nodes: u8,
    #[command(flatten)]
    common: Common,
}

const POOL: &str = "default-ipv4";
const FIELD_MANAGER: &str = "trellis-bench";
const NS: &str = "trellis-bench";
const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 5202;
/// A port nothing listens on and no policy allows: the state check.
const CLOSED_PORT: u16 = 5203;
const BLOCKS_PORT: u16 = 9000;
const PROBE_PORT: u16 = 80;
/// The `app` label of the pods of `realize` and `bundle`, one per node.
const BENCH_APP: &str = "bench-pod";
/// A SYN not answered in this long was dropped (pods are on one machine: a round trip is
/// well under a millisecond, but a busy machine can delay one by a few).
const DROPPED_AFTER: Duration = Duration::from_millis(20);
/// While waiting for the first connection after a delete, each attempt gives up this soon:
/// the probe's resolution. A slow answer taken for a drop only delays the result by one
/// attempt.
const RETRY_AFTER: Duration = Duration::from_millis(5);

/// Attempts between probes that connected, so a probe does not flood the pod.
const PROBE_PAUSE: Duration = Duration::from_millis(2);
const CLIENT_NODE: &str = "trellis-node-1";
const SERVER_NODE: &str = "trellis-node-2";

#[tokio::main]
async fn main() -> ExitCode {
    trellis_e2e::support::init_logging("warn,kube_client=off");
    let cli = Cli::parse();
    trellis_e2e::support::run_until_interrupted(async {
        match &cli.command {
            Command::Traffic(args) => {
                let cp = start(&args.common, 2).await?;
                let result = traffic(&cp, args).await;
                finish(cp, &args.common, result)
            }
            Command::Realize(args) => {
                let cp = start(&args.common, usize::from(args.nodes)).await?;
                let result = realize(&cp, args).await;
                finish(cp, &args.common, result)
            }
            Command::Bundle(args) => {
                let cp = start(&args.common, usize::from(args.nodes)).await?;
                let result = bundle(&cp, args).await;
                finish(cp, &args.common, result)
            }
        }
    })
    .await
}

/// A fresh sandbox with `nodes` nodes and the default IPv4 pool.
async fn start(common: &Common, nodes: usize) -> anyhow::Result<ControlPlane> {
    let opts = StartOptions {
        remove_state_on_stop: !common.keep_state,
        ..StartOptions::new(&common.state_dir)
    };
    let pool = samples::ippools(samples::IPPOOL_SAMPLE)?
        .into_iter()
        .find(|p| p.name_any() == POOL)
        .with_context(|| format!("no IPPool {POOL} in {}", samples::IPPOOL_SAMPLE))?;
    let started = Instant::now();
    let cp = start_cluster(opts, nodes, &[pool], FIELD_MANAGER)
        .await
        .with_context(|| format!("starting a sandbox in {}", common.state_dir.display()))?;
    eprintln!(
        "sandbox with {nodes} nodes up in {:.1}s ({} build)",
        started.elapsed().as_secs_f64(),
        if operator::release_build() {
            "release"
        } else {
            "debug"
        }
    );
    Ok(cp)
}

/// Stops the sandbox (also after a failed body: agents, operator, apiserver, etcd and every
/// recorded namespace), then reports the body's error first.
fn finish(mut cp: ControlPlane, common: &Common, result: anyhow::Result<()>) -> anyhow::Result<()> {
    let logs = cp.sandbox().logs_dir();
    let stopped = cp.stop();
    if common.keep_state {
        eprintln!("logs kept in {}", logs.display());
    }
    result?;
    stopped.context("stopping the sandbox")?;
    Ok(())
}

/// Pods in namespace [`NS`], each `(name, node, app)` labelled `app=<app>` and plugged in on
/// its node, all at once; with their addresses, in order.
async fn add_app_pods(
    cp: &ControlPlane,
    pods: &[(&str, &str, &str)],
    timeout: Duration,
) -> anyhow::Result<Vec<(Pod, IpAddr)>> {
    let specs: Vec<_> = pods
        .iter()
        .map(|(name, node, app)| app_pod(NS, name, node, app))
        .collect();
    let names: Vec<String> = specs.iter().map(|s| s.key().to_string()).collect();
    add_pods(&cp.pods().with_network_ready_timeout(timeout), &specs)
        .await
        .with_context(|| format!("adding pods {}", names.join(", ")))
}

/// Nodes `trellis-node-1..=count`, and pods `p1..=p<count>` in namespace [`NS`], one on each
/// node in order, labelled `app=`[`BENCH_APP`]: with a pod on every node, a policy selecting
/// the namespace's pods matters to every node.
async fn pod_per_node(
    cp: &ControlPlane,
    count: u8,
    timeout: Duration,
) -> anyhow::Result<(Vec<String>, Vec<(Pod, IpAddr)>)> {
    let nodes: Vec<String> = (1..=count).map(|i| format!("trellis-node-{i}")).collect();
    let names: Vec<String> = (1..=nodes.len()).map(|i| format!("p{i}")).collect();
    let wanted: Vec<(&str, &str, &str)> = names
        .iter()
        .zip(&nodes)
        .map(|(name, node)| (name.as_str(), node.as_str(), BENCH_APP))
        .collect();
    let pods = add_app_pods(cp, &wanted, timeout).await?;
    Ok((nodes, pods))
}

fn policy(name: &str, spec: serde_json::Value) -> anyhow::Result<NetworkPolicy> {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": NS, "name": name},
        "spec": spec,
    }))
    .with_context(|| format!("NetworkPolicy {NS}/{name}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Watches: every event stamped on arrival, kept, and waited on.

/// Events of one watch, each with the moment it reached this process.
struct Log<E> {
    events: Arc<Mutex<Vec<(Instant, E)>>>,
    tick: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl<E: Send + 'static> Log<E> {
    /// Watches `api` in its own task; `keep` turns an event into what is kept, if anything.
    fn watch<K>(api: Api<K>, keep: fn(watcher::Event<K>) -> Option<E>) -> Log<E>
    where
        K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    {
        let events = Arc::new(Mutex::new(Vec::new()));
        let (tx, tick) = watch::channel(0u64);
        let kept = events.clone();
        let task = tokio::spawn(async move {
            let mut stream =
                std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
            while let Some(event) = stream.next().await {
                let at = Instant::now();
                match event {
                    Ok(event) => {
                        if let Some(e) = keep(event) {
                            lock(&kept).push((at, e));
                            tx.send_modify(|n| *n += 1);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "watch error; the watcher retries"),
                }
            }
        });
        Log { events, tick, task }
    }

    /// Waits until `done` finds what it looks for in the events so far.
    async fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[(Instant, E)]) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = self.tick.clone();
        loop {
            if let Some(found) = done(&lock(&self.events)) {
                return Ok(found);
            }
            match tokio::time::timeout_at(deadline, tick.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => bail!("the watch ended while waiting for {what}"),
                Err(_) => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
    }
}

impl<E> Drop for Log<E> {
    fn drop(&mut self) {
        // Before the sandbox stops, or it would retry against a stopped apiserver.
        self.task.abort();
    }
}

/// A node's NetworkStatus as one event showed it.
struct Reported {
    node: String,
    hash: Option<String>,
    policy_ready: bool,
}

fn reported(event: watcher::Event<NetworkStatus>) -> Option<Reported> {
    let (watcher::Event::Apply(s) | watcher::Event::InitApply(s)) = event else {
        return None;
    };
    let status = s.status.as_ref();
    Some(Reported {
        node: s.name_any(),
        hash: status.and_then(|st| st.policy_hash.clone()),
        policy_ready: status.is_some_and(|st| {
            st.conditions
                .iter()
                .any(|c| c.type_ == NETWORKSTATUS_POLICY_READY && c.status == "True")
        }),
    })
}

/// Any object written or deleted: only the moment counts.
fn any_change<K>(event: watcher::Event<K>) -> Option<()> {
    matches!(
        event,
        watcher::Event::Apply(_) | watcher::Event::InitApply(_) | watcher::Event::Delete(_)
    )
    .then_some(())
}

/// A NetworkPolicy event: its uid, and whether it was deleted.
fn policy_event(event: watcher::Event<NetworkPolicy>) -> Option<(String, bool)> {
    match event {
        watcher::Event::Apply(p) | watcher::Event::InitApply(p) => Some((p.uid()?, false)),
        watcher::Event::Delete(p) => Some((p.uid()?, true)),
        _ => None,
    }
}

/// The first moment after `since` each of `nodes` reported PolicyReady=True with `hash`;
/// waits until all have.
async fn realized(
    log: &Log<Reported>,
    nodes: &[String],
    hash: &str,
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, Instant>> {
    log.wait(
        &format!("every node to report PolicyReady=True with policyHash {hash}"),
        timeout,
        |events| {
            let mut first = BTreeMap::new();
            for (at, r) in events.iter().filter(|(at, _)| *at >= since) {
                if r.policy_ready && r.hash.as_deref() == Some(hash) && nodes.contains(&r.node) {
                    first.entry(r.node.clone()).or_insert(*at);
                }
            }
            (first.len() == nodes.len()).then_some(first)
        },
    )
    .await
    .with_context(|| {
        let last: Vec<String> = nodes
            .iter()
            .map(|n| {
                let events = lock(&log.events);
                let r = events.iter().rev().find(|(_, r)| &r.node == n);
                match r {
                    Some((_, r)) => format!(
                        "{n}: {} PolicyReady={}",
                        r.hash.as_deref().unwrap_or("no hash"),
                        r.policy_ready
                    ),
                    None => format!("{n}: no NetworkStatus seen"),
                }
            })
            .collect();
        format!("last reported: {}", last.join("; "))
    })
}

/// The hash every node reports once it enforces the NetworkPolicies and PolicyBundles the
/// apiserver serves now (all namespaces; the mode from NetworkConfig `default`).
async fn expected_hash(client: &Client) -> anyhow::Result<String> {
    let mode = Api::<NetworkConfig>::all(client.clone())
        .get_opt("default")
        .await
        .context("reading NetworkConfig default")?
        .map(|c| c.spec.policy_enforcement)
        .unwrap_or(PolicyEnforcement::Default);
    let policies = Api::<NetworkPolicy>::all(client.clone())
        .list(&Default::default())
        .await
        .context("listing NetworkPolicies")?
        .items;
    let bundles = Api::<PolicyBundle>::all(client.clone())
        .list(&Default::default())
        .await
        .context("listing PolicyBundles")?
        .items;
    Ok(trellis_policy::generation::policy_hash(
        mode, &policies, &bundles,
    ))
}

/// The hash of the policy set the apiserver serves now ([`expected_hash`]), and the first
/// moment after `since` each of `nodes` reported enforcing it ([`realized`]).
async fn enforced_everywhere(
    client: &Client,
    statuses: &Log<Reported>,
    nodes: &[String],
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<(String, BTreeMap<String, Instant>)> {
    let hash = expected_hash(client).await?;
    let per_node = realized(statuses, nodes, &hash, since, timeout).await?;
    Ok((hash, per_node))
}

/// When the first and the last node reported a change enforced, in milliseconds from `t0`.
struct Spread {
    first: f64,
    last: f64,
    last_node: String,
}

impl Spread {
    fn of(per_node: &BTreeMap<String, Instant>, t0: Instant) -> anyhow::Result<Spread> {
        let (last_node, last) = per_node
            .iter()
            .max_by_key(|(_, at)| **at)
            .context("no node")?;
        let first = per_node.values().min().context("no node")?;
        Ok(Spread {
            first: ms(t0, *first),
            last: ms(t0, *last),
            last_node: last_node.clone(),
        })
    }
}

/// Waits until none of `logs` has had an event for `quiet`: whatever the last change set off
/// (node reports, the operator's rollup and its writes) is over, so the next change starts
/// from an idle cluster. Bounded by `timeout`.
async fn until_quiet(
    logs: &[&dyn LastEvent],
    quiet: Duration,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        let since = logs
            .iter()
            .filter_map(|l| l.last_event())
            .max()
            .unwrap_or(start);
        let until = since + quiet;
        if Instant::now() >= until {
            return Ok(());
        }
        if until > deadline {
            bail!("no {quiet:?} without an event within {timeout:?}");
        }
        // The condition is an absence: no event before `until`. One meanwhile moves `until`
        // on, and the loop waits again.
        tokio::time::sleep_until(until.into()).await;
    }
}

/// The moment a [`Log`]'s latest event arrived.
trait LastEvent {
    fn last_event(&self) -> Option<Instant>;
}

impl<E> LastEvent for Log<E> {
    fn last_event(&self) -> Option<Instant> {
        lock(&self.events).last().map(|(at, _)| *at)
    }
}

// ---------------------------------------------------------------------------------------------
// Sockets inside pods' namespaces: threads of this process that entered them.

/// Runs `f` on a new thread inside the network namespace at `netns` (sockets it makes live
/// there); the thread's handle.
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<T>> {
    let path = netns.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)
            .with_context(|| format!("opening network namespace {}", path.display()))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {}", path.display()))?;
        f()
    })
}

/// Waits for a thread of [`in_netns`] without blocking the runtime.
async fn join<T: Send + 'static>(
    thread: std::thread::JoinHandle<anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .context("joining a thread")?
        .map_err(|_| anyhow::anyhow!("a thread in a pod's namespace panicked"))?
}

/// What a [`Server`] does with a connection.
#[derive(Clone, Copy)]
enum Serve {
    /// Accepts and closes.
    Close,
    /// Echoes every byte back, on a thread of its own (pinned to this CPU, if any).
    Echo(Option<usize>),
}

/// A TCP server inside a pod's namespace. Ends when dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    fn start(netns: &Path, port: u16, serve: Serve) -> anyhow::Result<Server> {
        let stop = Arc::new(AtomicBool::new(false));
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = in_netns(netns, move || {
            let listener = TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port));
            let listener = match listener {
                Ok(l) => {
                    let _ = bound_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = bound_tx.send(Err(e));
                    return Ok(());
                }
            };
            // Polled, so that the thread sees `stop`; the kernel completes handshakes in
            // the meantime, so nobody waits for the poll.
            listener.set_nonblocking(true)?;
            while !flag.load(Ordering::Relaxed) {
                match (listener.accept(), serve) {
                    (Ok((stream, _)), Serve::Echo(cpu)) => {
                        std::thread::spawn(move || echo_bytes(stream, cpu));
                    }
                    (Ok(_), Serve::Close) => {}
                    (Err(e), _) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    (Err(e), _) => return Err(e).context("accepting"),
                }
            }
            Ok(())
        });
        match bound_rx.recv() {
            Ok(Ok(())) => Ok(Server {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e).with_context(|| format!("listening on TCP {port}")),
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => bail!("the server thread for TCP {port} ended"),
            },
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Echoes until the peer closes; a thread that cannot be pinned closes the connection at
/// once (its client reports it).
fn echo_bytes(mut stream: TcpStream, cpu: Option<usize>) {
    if let Some(cpu) = cpu
        && let Err(e) = pin_to(cpu)
    {
        eprintln!("echo server: {e:#}");
        return;
    }
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let mut b = [0u8; 1];
    while matches!(stream.read(&mut b), Ok(1)) {
        if stream.write_all(&b).is_err() {
            break;
        }
    }
}

/// What a connection attempt met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    Connected,
    /// RST: the SYN reached the pod, nothing listens.
    Refused,
    /// No answer within the timeout: dropped on the way.
    Dropped,
}

fn attempt(addr: SocketAddr, timeout: Duration) -> anyhow::Result<Reach> {
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(_) => Ok(Reach::Connected),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(Reach::Refused),
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
            Ok(Reach::Dropped)
        }
        Err(e) => Err(e).with_context(|| format!("connecting to {addr}")),
    }
}

// ---------------------------------------------------------------------------------------------
// traffic

/// Both programs on one pod's host veth, through a pinned load of its node (the node's own
/// maps and link pins).
struct Hook {
    pod: String,
    mode: AttachMode,
    dp: Datapath,
    netns: PathBuf,
    ifname: String,
    ifindex: u32,
}

impl Hook {
    async fn new(
        cp: &ControlPlane,
        node: &str,
        pod: &str,
        ip: IpAddr,
        mode: AttachMode,
    ) -> anyhow::Result<Hook> {
        let nodes = cp.nodes();
        let netns_name = nodes.netns(node)?;
        let route = datapath::ip_json(&netns_name, &["route", "get", &ip.to_string()]).await?;
        let ifname = route[0]["dev"]
            .as_str()
            .with_context(|| format!("no route to {ip} in {netns_name}: {route}"))?
            .to_owned();
        let link = datapath::ip_json(&netns_name, &["link", "show", "dev", &ifname]).await?;
        let ifindex = link[0]["ifindex"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .with_context(|| format!("no ifindex for {ifname}: {link}"))?;
        let root = nodes.node_dirs(node).bpffs;
        let dp = tokio::task::block_in_place(|| Datapath::load(Some(&root)))
            .with_context(|| format!("loading the programs on {node}'s pins {}", root.display()))?;
        Ok(Hook {
            pod: pod.to_owned(),
            mode,
            dp,
            netns: nodes.netns_path(node)?,
            ifname,
            ifindex,
        })
    }

    /// Attaches or detaches both programs, and waits until the hooks say so: a TCX link
    /// whose last pin is removed is released by a kernel worker a moment later (a clsact
    /// filter comes and goes with its netlink request).
    fn set(&mut self, attached: bool) -> anyhow::Result<()> {
        let what = if attached { "attaching" } else { "detaching" };
        let context = || format!("{what} the programs on {} ({})", self.ifname, self.pod);
        let on_clsact = tokio::task::block_in_place(|| {
            if attached {
                // A hook chosen by hand: off the other one first, so the programs never
                // run twice.
                if self.mode != AttachMode::Auto {
                    self.dp.detach(Some(&self.netns), &self.ifname)?;
                }
                let a = self
                    .dp
                    .attach_with(Some(&self.netns), &self.ifname, self.mode)?;
                Ok(a.hook == trellis_node::bpf::Hook::Clsact)
            } else {
                self.dp
                    .detach(Some(&self.netns), &self.ifname)
                    .map(|()| false)
            }
        })
        .with_context(context)?;
        if on_clsact {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let on = tokio::task::block_in_place(|| {
                self.dp.tcx_attached(Some(&self.netns), &self.ifname)
            })
            .with_context(context)?;
            if on == [attached; 2] {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{}: the hooks still say {on:?} after 5 s", context());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Each program's accumulated run time and runs, as the kernel counts them while
    /// run-time statistics are enabled.
    fn runs(&self) -> anyhow::Result<[(Duration, u64); 2]> {
        let [a, b] = Program::ALL.map(|p| {
            self.dp
                .program_info(p)
                .map(|i| (i.run_time(), i.run_count()))
                .with_context(|| format!("reading {}'s statistics on {}", p.name(), self.pod))
        });
        Ok([a?, b?])
    }

    /// Packets the node's programs counted, every reason and direction.
    fn packets(&self) -> anyhow::Result<u64> {
        let counters = self.dp.counters()?;
        Ok(counters.nonzero().iter().map(|(_, _, n)| n).sum())
    }
}

/// The iperf3 server in the server pod (a child of this process, killed when dropped).
struct Iperf(tokio::process::Child);

impl Iperf {
    async fn start(netns: &str, timeout: Duration) -> anyhow::Result<Iperf> {
        let child = tokio::process::Command::new("ip")
            .args(["netns", "exec", netns, "iperf3", "-s", "-p"])
            .arg(IPERF_PORT.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting iperf3 -s (scripts/install-deps.sh installs iperf3)")?;
        let mut server = Iperf(child);
        let deadline = Instant::now() + timeout;
        loop {
            let out =
                datapath::netns_exec(netns, &["ss", "-Hltn", &format!("sport = :{IPERF_PORT}")])
                    .await?;
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return Ok(server);
            }
            if let Some(status) = server.0.try_wait()? {
                bail!("iperf3 -s ended: {status}");
            }
            if Instant::now() > deadline {
                bail!("iperf3 -s does not listen on {IPERF_PORT} after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.0.kill().await;
    }
}

/// One TCP stream for `seconds` (plus one omitted): received Gbit/s and retransmits.
async fn iperf(client_netns: &str, server: IpAddr, seconds: u64) -> anyhow::Result<(f64, u64)> {
    let out = datapath::netns_exec(
        client_netns,
        &[
            "iperf3",
            "-c",
            &server.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &seconds.to_string(),
            "-O",
            "1",
            "-J",
        ],
    )
    .await?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 -c: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = report["error"].as_str() {
        bail!("iperf3 -c: {e}");
    }
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 -c reported no throughput: {report}"))?;
    let retransmits = report["end"]["sum_sent"]["retransmits"]
        .as_u64()
        .unwrap_or_default();
    Ok((bps / 1e9, retransmits))
}

/// The request/response connection: one TCP_NODELAY connection from the client pod to the
/// server's echo, made once and kept for the whole run, and used by a thread of its own
/// (pinned to a CPU if asked) that runs slices of transactions on request.
struct RrConnection {
    slices: std::sync::mpsc::Sender<Duration>,
    done: std::sync::mpsc::Receiver<anyhow::Result<(u64, Duration)>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl RrConnection {
    fn open(client_netns: &Path, server_ip: IpAddr, cpu: Option<usize>) -> anyhow::Result<Self> {
        let addr = SocketAddr::new(server_ip, RR_PORT);
        let (slices, todo) = std::sync::mpsc::channel::<Duration>();
        let (report, done) = std::sync::mpsc::channel();
        let thread = in_netns(client_netns, move || {
            if let Some(cpu) = cpu {
                pin_to(cpu)?;
            }
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .with_context(|| format!("connecting to {addr}"))?;
            s.set_nodelay(true)?;
            // A short warm-up, reported as the first slice: the connection's first packets
            // go through policy, the rest are established.
            let start = Instant::now();
            let warm_up = (0..100).try_for_each(|_| transact(&mut s));
            if report
                .send(warm_up.map(|()| (100, start.elapsed())))
                .is_err()
            {
                return Ok(());
            }
            while let Ok(length) = todo.recv() {
                let start = Instant::now();
                let mut n = 0u64;
                let result = loop {
                    if start.elapsed() >= length {
                        break Ok((n, start.elapsed()));
                    }
                    if let Err(e) = transact(&mut s) {
                        break Err(e);
                    }
                    n += 1;
                };
                let failed = result.is_err();
                if report.send(result).is_err() || failed {
                    break;
                }
            }
            Ok(())
        });
        let mut conn = RrConnection {
            slices,
            done,
            thread: Some(thread),
        };
        conn.next()?;
        Ok(conn)
    }

    /// Transactions back to back for `length`: how many, and the time they took.
    fn transact_for(&mut self, length: Duration) -> anyhow::Result<(u64, Duration)> {
        if self.slices.send(length).is_err() {
            return Err(self.ended());
        }
        self.next()
    }

    fn next(&mut self) -> anyhow::Result<(u64, Duration)> {
        match tokio::task::block_in_place(|| self.done.recv()) {
            Ok(result) => result,
            Err(_) => Err(self.ended()),
        }
    }

    /// Why the connection's thread ended.
    fn ended(&mut self) -> anyhow::Error {
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(Err(e))) => e.context("request/response"),
            Some(Err(_)) => anyhow::anyhow!("the request/response thread panicked"),
            _ => anyhow::anyhow!("the request/response thread ended"),
        }
    }
}

impl Drop for RrConnection {
    fn drop(&mut self) {
        // Its sender gone, the thread's loop ends.
        let (gone, _) = std::sync::mpsc::channel();
        self.slices = gone;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One byte each way.
fn transact(s: &mut TcpStream) -> anyhow::Result<()> {
    let mut b = [1u8; 1];
    s.write_all(&b).context("request")?;
    s.read_exact(&mut b).context("response")?;
    Ok(())
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning a thread to CPU {cpu}"))
}

/// Request/response in one round.
struct RrRound {
    /// Per state (`[without, with]`): transactions, time, packets counted.
    states: [(u64, Duration, u64); 2],
    /// Each pair of adjacent slices: the rate with / the rate without.
    pairs: Vec<f64>,
}

/// Request/response in one round: `slices` pairs of slices of `slice` on the same
/// connection, the states alternating slice by slice (ABBA), so that what the machine does
/// meanwhile falls on both alike. After each slice, the nodes' counters must have moved by
/// at least one packet per transaction (with) or not at all (without).
fn rr_slices(
    hooks: &mut [Hook; 2],
    conn: &mut RrConnection,
    slices: u32,
    slice: Duration,
    round: u32,
) -> anyhow::Result<RrRound> {
    let mut out = RrRound {
        states: [(0u64, Duration::ZERO, 0u64); 2],
        pairs: Vec::new(),
    };
    for k in 0..slices {
        let mut rates = [0.0; 2];
        let order = if k % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for attached in order {
            for h in hooks.iter_mut() {
                h.set(attached)?;
            }
            let before = counted(hooks)?;
            let (n, took) = conn.transact_for(slice)?;
            let packets = counted(hooks)? - before;
            check_counted(attached, packets, n, || {
                format!("round {}, slice {} ({n} transactions)", round + 1, k + 1)
            })?;
            rates[usize::from(attached)] = n as f64 / took.as_secs_f64();
            let o = &mut out.states[usize::from(attached)];
            o.0 += n;
            o.1 += took;
            o.2 += packets;
        }
        out.pairs.push(rates[1] / rates[0]);
    }
    Ok(out)
}

/// Packets both nodes' programs have counted so far.
fn counted(hooks: &[Hook]) -> anyhow::Result<u64> {
    hooks.iter().map(Hook::packets).sum()
}

/// The state check after a measurement: with the programs every packet is counted (at
/// least `at_least`); without, none may be. `what`: the measurement, for the error.
fn check_counted(
    attached: bool,
    packets: u64,
    at_least: u64,
    what: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if (attached && packets < at_least) || (!attached && packets != 0) {
        bail!(
            "{}: the programs counted {packets} packets {} them: the state is not what it \
             should be",
            what(),
            if attached { "with" } else { "without" }
        );
    }
    Ok(())
}

/// What one state measured in one round.
#[derive(Debug, Clone, Copy)]
struct Sample {
    gbps: f64,
    retransmits: u64,
    rr: f64,
    packets: u64,
}

async fn traffic(cp: &ControlPlane, args: &TrafficArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.common.timeout);
    let kube = cp.client();
    let statuses = Log::watch(Api::<NetworkStatus>::all(kube.clone()), reported);
    let [(client, client_ip), (server, server_ip)]: [_; 2] = add_app_pods(
        cp,
        &[
            ("client", CLIENT_NODE, "bench-client"),
            ("server", SERVER_NODE, "bench-server"),
        ],
        timeout,
    )
    .await?
    .try_into()
    .map_err(|pods: Vec<_>| anyhow::anyhow!("{} pods added instead of 2", pods.len()))?;
    eprintln!("pods: {NS}/client on {CLIENT_NODE}, {NS}/server on {SERVER_NODE} ({server_ip})");

    let blocks: Vec<serde_json::Value> = (0..args.entries)
        .map(|k| json!({"ipBlock": {"cidr": format!("198.{}.{}.{}/32", 18 + k / 65536, (k / 256) % 256, k % 256)}}))
        .collect();
    let server_selector = json!({"matchLabels": {"app": "bench-server"}});
    let policies = [
        policy(
            "bench-blocks",
            json!({
                "podSelector": server_selector.clone(),
                "policyTypes": ["Ingress"],
                "ingress": [{"from": blocks, "ports": [{"protocol": "TCP", "port": BLOCKS_PORT}]}],
            }),
        )?,
        policy(
            "bench-client",
            json!({
                "podSelector": server_selector,
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {"app": "bench-client"}}}],
                    "ports": [
                        {"protocol": "TCP", "port": IPERF_PORT},
                        {"protocol": "TCP", "port": RR_PORT},
                    ],
                }],
            }),
        )?,
    ];
    let applied = Instant::now();
    let api = Api::<NetworkPolicy>::namespaced(kube.clone(), NS);
    for p in &policies {
        api.create(
            &PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PostParams::default()
            },
            p,
        )
        .await
        .with_context(|| format!("creating NetworkPolicy {}", p.name_any()))?;
    }
    let hash = expected_hash(&kube).await?;
    let nodes = [CLIENT_NODE.to_owned(), SERVER_NODE.to_owned()];
    realized(&statuses, &nodes, &hash, applied, timeout).await?;
    eprintln!(
        "policies enforced on both nodes {:.2}s after the creates ({hash})",
        applied.elapsed().as_secs_f64()
    );
    drop(statuses);

    let mut hooks = [
        Hook::new(cp, CLIENT_NODE, "client", client_ip, args.hook.mode()).await?,
        Hook::new(cp, SERVER_NODE, "server", server_ip, args.hook.mode()).await?,
    ];
    let entries = table_entries(&hooks[1])?;
    if entries < args.entries as usize {
        bail!(
            "the server's ingress table has {entries} entries, fewer than the {} asked for",
            args.entries
        );
    }
    eprintln!(
        "server's ingress table: {entries} entries; host veths {} ({CLIENT_NODE}), {} ({SERVER_NODE})",
        hooks[0].ifname, hooks[1].ifname
    );

    // This process's own load of the same programs takes over the pinned links (one
    // BPF_LINK_UPDATE each, as a trellis-node restart does), so that `Hook::set` can tell
    // from the hooks when its programs are on or off.
    for h in &mut hooks {
        h.set(true)?;
    }
    let _echo = Server::start(
        &server.netns_path(),
        RR_PORT,
        Serve::Echo(args.rr_cpus.last().copied()),
    )?;
    let iperf_server = Iperf::start(&server.netns, timeout).await?;
    let client_netns = client.netns_path();
    // Each state checked by what it does before the first round: the counters after every
    // measurement check it from then on.
    for attached in [false, true] {
        for h in &mut hooks {
            h.set(attached)?;
        }
        check_state(&client_netns, server_ip, attached).await?;
    }
    // Opened with the programs on: its first packets go through policy.
    let mut conn = RrConnection::open(&client_netns, server_ip, args.rr_cpus.first().copied())?;
    let slice = Duration::from_millis(args.rr_slice_ms.into());
    let slices = u32::try_from(args.seconds * 1000 / u64::from(args.rr_slice_ms))
        .unwrap_or(u32::MAX)
        .max(1);
    let mut with = Vec::new();
    let mut without = Vec::new();
    let mut pairs = Vec::new();
    for round in 0..args.rounds {
        // iperf3, one run per state (ABBA from round to round): [without, with].
        let mut throughput = [(f64::NAN, 0u64, 0u64); 2];
        if !args.rr_only {
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for attached in order {
                for h in &mut hooks {
                    h.set(attached)?;
                }
                let before = counted(&hooks)?;
                let (gbps, retransmits) = iperf(&client.netns, server_ip, args.seconds).await?;
                let packets = counted(&hooks)? - before;
                check_counted(attached, packets, 1000, || {
                    format!("round {}, iperf3's run", round + 1)
                })?;
                throughput[usize::from(attached)] = (gbps, retransmits, packets);
            }
        }
        let rr = rr_slices(&mut hooks, &mut conn, slices, slice, round)?;
        pairs.extend(&rr.pairs);
        for attached in [true, false] {
            let i = usize::from(attached);
            let (gbps, retransmits, iperf_packets) = throughput[i];
            let (n, took, rr_packets) = rr.states[i];
            let sample = Sample {
                gbps,
                retransmits,
                rr: n as f64 / took.as_secs_f64(),
                packets: iperf_packets + rr_packets,
            };
            eprintln!(
                "round {} {:<16} {gbps:6.2} Gbit/s ({retransmits} retransmits), {:8.0} \
                 transactions/s, {} packets counted",
                round + 1,
                if attached {
                    "with programs"
                } else {
                    "without programs"
                },
                sample.rr,
                sample.packets,
            );
            (if attached { &mut with } else { &mut without }).push(sample);
        }
    }
    // Leave the pods as trellis-node had them.
    for h in &mut hooks {
        h.set(true)?;
    }
    iperf_server.stop().await;
    let run_time = run_time(&hooks, &mut conn, args).await?;
    report_traffic(args, entries, &with, &without, &pairs);
    report_run_time(&run_time);
    Ok(())
}

/// One program on one pod's veth in the run-time pass: nanoseconds per run, each round.
struct RunTime {
    what: String,
    ns_per_run: Vec<f64>,
    runs: u64,
}

/// The run-time pass: `--run-time-rounds` request/response rounds with statistics on.
async fn run_time(
    hooks: &[Hook; 2],
    conn: &mut RrConnection,
    args: &TrafficArgs,
) -> anyhow::Result<Vec<RunTime>> {
    let mut out: Vec<RunTime> = hooks
        .iter()
        .flat_map(|h| {
            Program::ALL.map(|p| RunTime {
                what: format!("{} on {}'s veth", p.name(), h.pod),
                ns_per_run: Vec::new(),
                runs: 0,
            })
        })
        .collect();
    if args.run_time_rounds == 0 {
        return Ok(out);
    }
    // Enabled for as long as the descriptor is open.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling the kernel's BPF run-time statistics (BPF_ENABLE_STATS)")?;
    for round in 0..args.run_time_rounds {
        let runs = || -> anyhow::Result<Vec<_>> { hooks.iter().map(Hook::runs).collect() };
        let before = runs()?;
        let (n, took) = conn.transact_for(Duration::from_secs(args.seconds))?;
        let rr = n as f64 / took.as_secs_f64();
        let after = runs()?;
        let deltas = before.iter().flatten().zip(after.iter().flatten());
        for (slot, ((t0, n0), (t1, n1))) in out.iter_mut().zip(deltas) {
            let runs = n1 - n0;
            if runs == 0 {
                bail!("run-time round {}: {} did not run", round + 1, slot.what);
            }
            slot.ns_per_run
                .push((*t1 - *t0).as_nanos() as f64 / runs as f64);
            slot.runs += runs;
        }
        eprintln!(
            "run-time round {} {rr:8.0} transactions/s (statistics on): {} ns per run",
            round + 1,
            out.iter()
                .map(|r| format!("{:.0}", r.ns_per_run.last().copied().unwrap_or(f64::NAN)))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    Ok(out)
}

fn report_run_time(run_time: &[RunTime]) {
    if run_time.iter().all(|r| r.ns_per_run.is_empty()) {
        return;
    }
    println!();
    println!(
        "The programs' own run time in request/response traffic (kernel BPF_STATS_RUN_TIME, \
         {} rounds; medians)",
        run_time[0].ns_per_run.len()
    );
    println!("| program | ns per run | per round | runs |");
    println!("|---|---|---|---|");
    for r in run_time {
        println!(
            "| {} | {:.0} | {} | {} |",
            r.what,
            median(&r.ns_per_run),
            joined(r.ns_per_run.iter().copied(), 0),
            r.runs
        );
    }
    let per_transaction: f64 = run_time.iter().map(|r| median(&r.ns_per_run)).sum();
    println!("one transaction runs each once: {per_transaction:.0} ns");
    println!(
        "RESULT bench=run-time ns_per_transaction={per_transaction:.0} ns_per_run={}",
        joined(run_time.iter().map(|r| median(&r.ns_per_run)), 0)
    );
}

/// Entries of the table the endpoint `hook` names for its ingress.
fn table_entries(hook: &Hook) -> anyhow::Result<usize> {
    let (_, entry) = hook
        .dp
        .endpoints()?
        .into_iter()
        .find(|(i, _)| *i == hook.ifindex)
        .with_context(|| format!("no endpoint entry for {}", hook.ifname))?;
    if !entry.is_isolated(trellis_node::bpf::abi::Direction::Ingress) {
        bail!("{} is not isolated for ingress", hook.pod);
    }
    Ok(hook
        .dp
        .policy_entries()?
        .iter()
        .filter(|(k, _)| k.policy == entry.ingress_policy)
        .count())
}

/// A SYN to the server's closed port is dropped with the programs (policy allows only the
/// benchmark's ports) and refused without them.
async fn check_state(client_netns: &Path, server: IpAddr, attached: bool) -> anyhow::Result<()> {
    let addr = SocketAddr::new(server, CLOSED_PORT);
    let reach = join(in_netns(client_netns, move || {
        attempt(addr, Duration::from_millis(300))
    }))
    .await?;
    let want = if attached {
        Reach::Dropped
    } else {
        Reach::Refused
    };
    if reach != want {
        bail!(
            "a SYN to {addr} was {reach:?} {} the programs, expected {want:?}",
            if attached { "with" } else { "without" }
        );
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn joined(v: impl IntoIterator<Item = f64>, precision: usize) -> String {
    v.into_iter()
        .map(|x| format!("{x:.precision$}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The median of `v` and a 95 % confidence interval for it, from order statistics (no
/// assumption about the distribution): `(median, low, high)`.
fn median_ci(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let half = 1.96 * (n as f64).sqrt() / 2.0;
    let lo = ((n as f64 / 2.0 - half).floor().max(0.0)) as usize;
    let hi = ((n as f64 / 2.0 + half).ceil() as usize).min(n - 1);
    (median(&s), s[lo], s[hi])
}

fn report_traffic(
    args: &TrafficArgs,
    entries: usize,
    with: &[Sample],
    without: &[Sample],
    pairs: &[f64],
) {
    let gbps = |s: &[Sample]| s.iter().map(|x| x.gbps).collect::<Vec<_>>();
    let rr = |s: &[Sample]| s.iter().map(|x| x.rr).collect::<Vec<_>>();
    let (wg, og) = (median(&gbps(with)), median(&gbps(without)));
    let (wr, or) = (median(&rr(with)), median(&rr(without)));
    // Ratios of the two states within each round (adjacent in time, so drift of the
    // machine over the run cancels): range and median.
    let per_round = |f: fn(&Sample) -> f64| -> (f64, f64, f64) {
        let r: Vec<f64> = with.iter().zip(without).map(|(a, b)| f(a) / f(b)).collect();
        (
            r.iter().copied().fold(f64::INFINITY, f64::min),
            r.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            median(&r),
        )
    };
    let (tlo, thi, tmed) = per_round(|s| s.gbps);
    let (rlo, rhi, rmed) = per_round(|s| s.rr);
    let hook = match args.hook {
        HookArg::Auto => "trellis-node's hook",
        HookArg::Tcx => "TCX",
        HookArg::Clsact => "clsact",
    };
    // Throughput's cells, or what --rr-only left of them.
    let tp = |cell: String| {
        if args.rr_only {
            "not measured".to_owned()
        } else {
            cell
        }
    };
    println!();
    println!(
        "Pod to pod across nodes ({CLIENT_NODE} → {SERVER_NODE}), {} rounds of {} s per state, \
         request/response alternating between the states every {} ms within each round; \
         medians; the server's ingress table: {entries} entries",
        args.rounds, args.seconds, args.rr_slice_ms
    );
    println!(
        "| state | TCP throughput (iperf3, 1 stream) | per round | request/response (1 byte) | per round |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| with the programs ({hook}), {entries} entries | {} | {} | {wr:.0} /s | {} |",
        tp(format!("{wg:.2} Gbit/s")),
        tp(joined(gbps(with), 2)),
        joined(rr(with), 0)
    );
    println!(
        "| without the programs | {} | {} | {or:.0} /s | {} |",
        tp(format!("{og:.2} Gbit/s")),
        tp(joined(gbps(without), 2)),
        joined(rr(without), 0)
    );
    println!(
        "| ratio with / without | {} | {} | {:.3}x | {rlo:.2}–{rhi:.2} |",
        tp(format!("{:.3}x", wg / og)),
        tp(format!("{tlo:.2}–{thi:.2}")),
        wr / or
    );
    println!(
        "| median of the per-round ratios | {} | | {rmed:.3}x | |",
        tp(format!("{tmed:.3}x"))
    );
    let (pmed, plo, phi) = median_ci(pairs);
    println!(
        "| median of the {}-ms slice pairs' ratios (95 % CI) | | | {pmed:.3}x ({plo:.3}–{phi:.3}) | {} pairs |",
        args.rr_slice_ms,
        pairs.len()
    );
    let retrans = |s: &[Sample]| s.iter().map(|x| x.retransmits).sum::<u64>();
    println!(
        "retransmits: {} with, {} without; packets the programs counted per round with them: {}",
        retrans(with),
        retrans(without),
        with.iter()
            .map(|s| s.packets.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    println!(
        "RESULT bench=traffic rounds={} seconds={} entries={entries} with_gbps={wg:.3} \
         without_gbps={og:.3} gbps_ratio={:.3} with_rr={wr:.0} without_rr={or:.0} rr_ratio={:.3} \
         gbps_round_ratio={tmed:.3} rr_round_ratio={rmed:.3} rr_slice_ms={} \
         rr_pair_ratio={pmed:.3} rr_pair_ratio_ci={plo:.3}-{phi:.3} rr_pairs={} hook={} \
         with_gbps_runs={} without_gbps_runs={} with_rr_runs={} without_rr_runs={}",
        args.rounds,
        args.seconds,
        wg / og,
        wr / or,
        args.rr_slice_ms,
        pairs.len(),
        args.hook
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default(),
        joined(gbps(with), 3),
        joined(gbps(without), 3),
        joined(rr(with), 0),
        joined(rr(without), 0),
    );
}

// ---------------------------------------------------------------------------------------------
// realize

/// One policy change, in milliseconds from just before its request.
#[derive(Debug, Clone)]
struct Change {
    create: bool,
    /// The request returned.
    write: f64,
    /// This process's own NetworkPolicy watch delivered it: the floor for any watcher.
    seen: f64,
    /// The first and the last node reporting it enforced.
    first: f64,
    last: f64,
    last_node: String,
    /// The probe saw the datapath change.
    probe: Option<f64>,
}

fn ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1e3
}

async fn realize(cp: &ControlPlane, args: &RealizeArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.common.timeout);
    let kube = cp.client();
    let begin = Instant::now();
    let statuses = Log::watch(Api::<NetworkStatus>::all(kube.clone()), reported);
    let seen = Log::watch(
        Api::<NetworkPolicy>::namespaced(kube.clone(), NS),
        policy_event,
    );
    let (nodes, pods) = pod_per_node(cp, args.nodes, timeout).await?;
    let (probe_from, _) = &pods[0];
    let (probe_to, probe_ip) = &pods[1];
    let probe_addr = SocketAddr::new(*probe_ip, PROBE_PORT);
    let _listener = Server::start(&probe_to.netns_path(), PROBE_PORT, Serve::Close)?;
    let probe_netns = probe_from.netns_path();

    let (hash, _) = enforced_everywhere(&kube, &statuses, &nodes, begin, timeout).await?;
    let reach = join(in_netns(&probe_netns, move || {
        attempt(probe_addr, Duration::from_secs(1))
    }))
    .await?;
    if reach != Reach::Connected {
        bail!("p1 → p2:{PROBE_PORT} is {reach:?} before any policy");
    }
    eprintln!(
        "{} nodes report PolicyReady with {hash}; p1 → p2:{PROBE_PORT} connects",
        nodes.len()
    );

    let api = Api::<NetworkPolicy>::namespaced(kube.clone(), NS);
    let isolate = policy(
        "bench-realize",
        json!({
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": "bench-client"}}}],
                "ports": [{"protocol": "TCP", "port": PROBE_PORT}],
            }],
        }),
    )?;
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    let mut changes = Vec::new();
    let mut uid = String::new();
    for i in 0..args.changes {
        let create = i % 2 == 0;
        let deadline = Instant::now() + timeout;
        let t0 = Instant::now();
        let probe = (!args.no_probe).then(|| {
            in_netns(&probe_netns, move || {
                probe_until(probe_addr, create, deadline)
            })
        });
        if create {
            let made = api
                .create(&params, &isolate)
                .await
                .context("creating NetworkPolicy bench-realize")?;
            uid = made.uid().context("the created policy has no uid")?;
        } else {
            api.delete("bench-realize", &DeleteParams::default())
                .await
                .context("deleting NetworkPolicy bench-realize")?;
        }
        let returned = Instant::now();
        let (_, per_node) = enforced_everywhere(&kube, &statuses, &nodes, t0, timeout).await?;
        let watched = seen
            .wait("the NetworkPolicy watch", timeout, |events| {
                events
                    .iter()
                    .find(|(at, (u, deleted))| *at >= t0 && *u == uid && *deleted != create)
                    .map(|(at, _)| *at)
            })
            .await?;
        let probed = match probe {
            Some(p) => Some(join(p).await?),
            None => None,
        };
        let nodes_at = Spread::of(&per_node, t0)?;
        let change = Change {
            create,
            write: ms(t0, returned),
            seen: ms(t0, watched),
            first: nodes_at.first,
            last: nodes_at.last,
            last_node: nodes_at.last_node,
            probe: probed.map(|p| ms(t0, p)),
        };
        eprintln!(
            "{:>3} {:<6} write {:6.1} ms  watch {:6.1} ms  first node {:6.1} ms  all nodes {:6.1} \
             ms (last {})  probe {}",
            i + 1,
            if create { "create" } else { "delete" },
            change.write,
            change.seen,
            change.first,
            change.last,
            change.last_node,
            change
                .probe
                .map_or_else(|| "-".to_owned(), |p| format!("{p:6.1} ms")),
        );
        changes.push(change);
        // Changes one after another, not on top of each other: the next starts once the
        // nodes' writes of this one are in (a short pause, not timed).
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report_realize(args, &changes);
    Ok(())
}

/// Connects to `addr` again and again until the datapath's answer changes: for a create,
/// the first SYN dropped (confirmed by a second attempt, so a slow answer on a busy machine
/// is not taken for a drop); for a delete, the first connection. When the attempt that saw
/// the change started.
fn probe_until(addr: SocketAddr, create: bool, deadline: Instant) -> anyhow::Result<Instant> {
    loop {
        let t = Instant::now();
        if t > deadline {
            bail!("the probe saw no change before the deadline");
        }
        let timeout = if create { DROPPED_AFTER } else { RETRY_AFTER };
        match (create, attempt(addr, timeout)?) {
            (true, Reach::Dropped) => {
                if attempt(addr, Duration::from_millis(200))? == Reach::Dropped {
                    return Ok(t);
                }
            }
            (false, Reach::Connected) => return Ok(t),
            (_, Reach::Connected) => std::thread::sleep(PROBE_PAUSE),
            (_, Reach::Dropped) => {}
            (_, Reach::Refused) => bail!("{addr} refused the probe: nothing listens"),
        }
    }
}

fn report_realize(args: &RealizeArgs, changes: &[Change]) {
    println!();
    println!(
        "NetworkPolicy created/deleted → every one of {} nodes reports PolicyReady=True with the \
         new policyHash; {} changes, milliseconds from just before the request",
        args.nodes,
        changes.len()
    );
    println!(
        "| changes | n | all nodes p50 | p99 | max | first node p50 | watch floor p50 | p99 | \
         probe p50 | p99 | ratio all nodes / floor p50 | p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut result = format!(
        "RESULT bench=realize nodes={} changes={}",
        args.nodes,
        changes.len()
    );
    for (label, filter) in [
        ("create", Some(true)),
        ("delete", Some(false)),
        ("all", None),
    ] {
        let set: Vec<&Change> = changes
            .iter()
            .filter(|c| filter.is_none_or(|f| c.create == f))
            .collect();
        let stats = |f: fn(&Change) -> f64| Stats::of(set.iter().map(|c| f(c)).collect());
        let last = stats(|c| c.last);
        let first = stats(|c| c.first);
        let seen = stats(|c| c.seen);
        let probes: Vec<f64> = set.iter().filter_map(|c| c.probe).collect();
        let probe = Stats::of(probes.clone());
        let probe_text = |v: f64| {
            if probes.is_empty() {
                "-".to_owned()
            } else {
                format!("{v:.1} ms")
            }
        };
        println!(
            "| {label} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | \
             {} | {} | {:.1}x | {:.1}x |",
            set.len(),
            last.p50,
            last.p99,
            last.max,
            first.p50,
            seen.p50,
            seen.p99,
            probe_text(probe.p50),
            probe_text(probe.p99),
            last.p50 / seen.p50,
            last.p99 / seen.p99,
        );
        result.push_str(&format!(
            " {label}_p50={:.1} {label}_p99={:.1} {label}_floor_p50={:.1} {label}_floor_p99={:.1} \
             {label}_probe_p50={:.1} {label}_probe_p99={:.1}",
            last.p50, last.p99, seen.p50, seen.p99, probe.p50, probe.p99
        ));
    }
    report_requests("create/delete", changes.iter().map(|c| c.write));
    println!("{result}");
}

/// The line on how long the requests themselves took (`what` returned).
fn report_requests(what: &str, writes: impl IntoIterator<Item = f64>) {
    let mut writes: Vec<f64> = writes.into_iter().collect();
    writes.sort_by(f64::total_cmp);
    println!(
        "the request itself ({what} returned): p50 {:.1} ms, p99 {:.1} ms",
        quantile(&writes, 0.5),
        quantile(&writes, 0.99)
    );
}

// ---------------------------------------------------------------------------------------------
// bundle

const BUNDLE: &str = "trellis-bench-bundle";
/// The port the bundle denies when created, and the one an edit moves it to.
const BUNDLE_PORTS: [u16; 2] = [2323, 2324];
/// Before each timed change, this long without a PolicyBundle, NetworkStatus, NodeEndpoints
/// or SecurityIdentity event: the operator's rollup loop (an event wakes it, it passes once
/// the caches were quiet for 100 ms, at most 500 ms after the first; its own status write is
/// such an event) is idle, so every change meets it in the same state rather than in a wait
/// that an earlier event started.
const QUIET: Duration = Duration::from_secs(1);

/// PolicyBundle [`BUNDLE`] as its owner applies it: Admin, subject every pod of namespace
/// [`NS`] labelled `app=`[`BENCH_APP`] (one on each node), ingress from any pod or address
/// to TCP `port` denied (nothing listens there: enforcing it disturbs nothing).
fn bundle_manifest(port: u16) -> serde_json::Value {
    json!({
        "apiVersion": "network.trellis.dev/v1alpha1",
        "kind": "PolicyBundle",
        "metadata": {"name": BUNDLE},
        "spec": {
            "tier": "Admin",
            "priority": 900,
            "subject": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NS}},
                "podSelector": {"matchLabels": {"app": BENCH_APP}},
            },
            "ingress": [{
                "name": "no-telnet-alt",
                "action": "Deny",
                "peers": [{"namespaces": {}}, {"ipBlock": {"cidr": "0.0.0.0/0"}}],
                "ports": [{"protocol": "TCP", "port": port}],
            }],
        },
    })
}

/// A PolicyBundle event: which object (uid) at which generation, and what its status said.
struct BundleSeen {
    uid: String,
    generation: i64,
    deleted: bool,
    /// `status.observedGeneration`.
    observed: Option<i64>,
    /// Condition `Realized` is True.
    realized: bool,
    desired_nodes: i32,
    realized_nodes: i32,
}

fn bundle_event(event: watcher::Event<PolicyBundle>) -> Option<BundleSeen> {
    let (b, deleted) = match event {
        watcher::Event::Apply(b) | watcher::Event::InitApply(b) => (b, false),
        watcher::Event::Delete(b) => (b, true),
        _ => return None,
    };
    if b.name_any() != BUNDLE {
        return None;
    }
    let status = b.status.clone().unwrap_or_default();
    Some(BundleSeen {
        uid: b.uid()?,
        generation: b.metadata.generation?,
        deleted,
        observed: status.observed_generation,
        realized: status
            .conditions
            .iter()
            .any(|c| c.type_ == POLICYBUNDLE_REALIZED && c.status == "True"),
        desired_nodes: status.desired_nodes,
        realized_nodes: status.realized_nodes,
    })
}

/// One bundle change, in milliseconds from just before its request.
#[derive(Debug, Clone)]
struct Applied {
    create: bool,
    generation: i64,
    /// The request returned.
    write: f64,
    /// This process's own PolicyBundle watch delivered the new generation: the floor.
    seen: f64,
    /// The first and the last node reporting PolicyReady=True with the new policyHash.
    first: f64,
    last: f64,
    last_node: String,
    /// The operator's first status for the new generation (whatever it said).
    first_status: f64,
    /// The status for the new generation with Realized=True and realizedNodes =
    /// desiredNodes = the number of nodes.
    realized: f64,
    /// Status writes for the new generation up to and including that one.
    passes: usize,
}

async fn bundle(cp: &ControlPlane, args: &BundleArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.common.timeout);
    let kube = cp.client();
    let begin = Instant::now();
    let statuses = Log::watch(Api::<NetworkStatus>::all(kube.clone()), reported);
    let bundles = Log::watch(Api::<PolicyBundle>::all(kube.clone()), bundle_event);
    // The rest of what wakes the operator's rollup, watched only to know when all is quiet.
    let endpoints = Log::watch(Api::<NodeEndpoints>::all(kube.clone()), any_change);
    let identities = Log::watch(Api::<SecurityIdentity>::all(kube.clone()), any_change);
    let (nodes, _pods) = pod_per_node(cp, args.nodes, timeout).await?;
    let (hash, _) = enforced_everywhere(&kube, &statuses, &nodes, begin, timeout).await?;
    eprintln!(
        "{} nodes, a pod on each, report PolicyReady with {hash}",
        nodes.len()
    );

    let api = Api::<PolicyBundle>::all(kube.clone());
    let mut applied: Vec<Applied> = Vec::new();
    // Cycles of create, edit (each timed), delete (not timed); the first is a warm-up that
    // also shows that every node becomes a desired node (pods' identities and endpoint
    // shards published) before anything counts.
    let mut cycle = 0;
    while applied.len() < args.changes as usize {
        let warm_up = cycle == 0;
        cycle += 1;
        let mut uid = String::new();
        let mut generation = 0;
        for (step, port) in BUNDLE_PORTS.into_iter().enumerate() {
            let create = step == 0;
            if !warm_up && applied.len() == args.changes as usize {
                break;
            }
            until_quiet(
                &[&statuses, &bundles, &endpoints, &identities],
                QUIET,
                timeout,
            )
            .await?;
            let a = apply_bundle_timed(
                &api,
                &kube,
                (&statuses, &bundles),
                &nodes,
                port,
                (create, &mut uid, &mut generation),
                timeout,
            )
            .await?;
            eprintln!(
                "{:>3} {:<6} gen {} write {:6.1} ms  watch {:6.1} ms  nodes {:6.1} – {:6.1} ms \
                 (last {})  first status {:6.1} ms  Realized {:6.1} ms ({} status write{})",
                if warm_up {
                    "-".to_owned()
                } else {
                    (applied.len() + 1).to_string()
                },
                if create { "create" } else { "edit" },
                a.generation,
                a.write,
                a.seen,
                a.first,
                a.last,
                a.last_node,
                a.first_status,
                a.realized,
                a.passes,
                if a.passes == 1 { "" } else { "s" },
            );
            if !warm_up {
                applied.push(a);
            }
        }
        // Back to no bundle, so the next create is a create; not timed.
        let t = Instant::now();
        api.delete(BUNDLE, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting PolicyBundle {BUNDLE}"))?;
        bundles
            .wait(
                "the PolicyBundle watch to show the delete",
                timeout,
                |events| {
                    events
                        .iter()
                        .any(|(at, b)| *at >= t && b.uid == uid && b.deleted)
                        .then_some(())
                },
            )
            .await?;
        enforced_everywhere(&kube, &statuses, &nodes, t, timeout).await?;
    }
    report_bundle(args, &applied);
    Ok(())
}

/// Applies [`BUNDLE`] with `port` denied (server-side apply, as `kubectl apply
/// --server-side`): a create when `create`, else an edit of the object `uid` at `generation`
/// (both updated to what the apiserver returned); waits until the bundle's status says the
/// new generation is realised on every one of `nodes`, and times each step.
async fn apply_bundle_timed(
    api: &Api<PolicyBundle>,
    kube: &Client,
    (statuses, bundles): (&Log<Reported>, &Log<BundleSeen>),
    nodes: &[String],
    port: u16,
    (create, uid, generation): (bool, &mut String, &mut i64),
    timeout: Duration,
) -> anyhow::Result<Applied> {
    let want = i32::try_from(nodes.len()).context("too many nodes")?;
    let t0 = Instant::now();
    let made = api
        .patch(
            BUNDLE,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(bundle_manifest(port)),
        )
        .await
        .with_context(|| format!("applying PolicyBundle {BUNDLE} (TCP {port} denied)"))?;
    let returned = Instant::now();
    let new_uid = made.uid().context("the applied bundle has no uid")?;
    let new_generation = made
        .metadata
        .generation
        .context("the applied bundle has no generation")?;
    if create && new_generation != 1 {
        bail!("PolicyBundle {BUNDLE} was not created: it is at generation {new_generation}");
    }
    if !create && (new_uid != *uid || new_generation <= *generation) {
        bail!(
            "the edit of PolicyBundle {BUNDLE} did not move its generation on: {} {} → {} {}",
            uid,
            generation,
            new_uid,
            new_generation
        );
    }
    *uid = new_uid.clone();
    *generation = new_generation;
    let (uid, generation) = (new_uid, new_generation);

    let seen = bundles
        .wait("the PolicyBundle watch", timeout, |events| {
            events
                .iter()
                .find(|(at, b)| {
                    *at >= t0 && b.uid == uid && b.generation == generation && !b.deleted
                })
                .map(|(at, _)| *at)
        })
        .await?;
    let (_, per_node) = enforced_everywhere(kube, statuses, nodes, t0, timeout).await?;
    let (first_status, realized, passes) = bundles
        .wait(
            &format!(
                "status.observedGeneration {generation} with Realized=True on {want} of {want} nodes"
            ),
            timeout,
            |events| {
                let mine: Vec<&(Instant, BundleSeen)> = events
                    .iter()
                    .filter(|(at, b)| *at >= t0 && b.uid == uid && b.observed == Some(generation))
                    .collect();
                let (n, (at, _)) = mine.iter().enumerate().find(|(_, (_, b))| {
                    b.realized && b.desired_nodes == want && b.realized_nodes == want
                })?;
                Some((mine[0].0, *at, n + 1))
            },
        )
        .await
        .with_context(|| {
            let events = lock(&bundles.events);
            match events.iter().rev().find(|(_, b)| b.uid == uid) {
                Some((_, b)) => format!(
                    "last status seen: observedGeneration {:?}, Realized {}, {} of {} nodes",
                    b.observed, b.realized, b.realized_nodes, b.desired_nodes
                ),
                None => "no event of the bundle seen".to_owned(),
            }
        })?;
    let nodes_at = Spread::of(&per_node, t0)?;
    Ok(Applied {
        create,
        generation,
        write: ms(t0, returned),
        seen: ms(t0, seen),
        first: nodes_at.first,
        last: nodes_at.last,
        last_node: nodes_at.last_node,
        first_status: ms(t0, first_status),
        realized: ms(t0, realized),
        passes,
    })
}

fn report_bundle(args: &BundleArgs, applied: &[Applied]) {
    println!();
    println!(
        "PolicyBundle applied (created, or edited: its denied port moved) → its status says \
         observedGeneration = the new generation, Realized=True, realizedNodes = desiredNodes = \
         {}; {} changes, milliseconds from just before the request",
        args.nodes,
        applied.len()
    );
    println!(
        "| changes | n | Realized p50 | p99 | max | first status p50 | all nodes enforce p50 | \
         p99 | watch floor p50 | p99 | ratio Realized / floor p50 | p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut result = format!(
        "RESULT bench=bundle nodes={} changes={}",
        args.nodes,
        applied.len()
    );
    for (label, filter) in [("create", Some(true)), ("edit", Some(false)), ("all", None)] {
        let set: Vec<&Applied> = applied
            .iter()
            .filter(|a| filter.is_none_or(|f| a.create == f))
            .collect();
        if set.is_empty() {
            continue;
        }
        let stats = |f: fn(&Applied) -> f64| Stats::of(set.iter().map(|a| f(a)).collect());
        let realized = stats(|a| a.realized);
        let first_status = stats(|a| a.first_status);
        let last = stats(|a| a.last);
        let seen = stats(|a| a.seen);
        println!(
            "| {label} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | \
             {:.1} ms | {:.1} ms | {:.0}x | {:.0}x |",
            set.len(),
            realized.p50,
            realized.p99,
            realized.max,
            first_status.p50,
            last.p50,
            last.p99,
            seen.p50,
            seen.p99,
            realized.p50 / seen.p50,
            realized.p99 / seen.p99,
        );
        result.push_str(&format!(
            " {label}_p50={:.1} {label}_p99={:.1} {label}_max={:.1} \
             {label}_first_status_p50={:.1} {label}_nodes_p50={:.1} {label}_nodes_p99={:.1} \
             {label}_floor_p50={:.1} {label}_floor_p99={:.1}",
            realized.p50,
            realized.p99,
            realized.max,
            first_status.p50,
            last.p50,
            last.p99,
            seen.p50,
            seen.p99
        ));
    }
    let one_pass = applied.iter().filter(|a| a.passes == 1).count();
    println!(
        "the operator's first status for the new generation already said Realized in {one_pass} \
         of {} changes (status writes until Realized, per change: {})",
        applied.len(),
        applied
            .iter()
            .map(|a| a.passes.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let after_nodes = Stats::of(applied.iter().map(|a| a.realized - a.last).collect());
    println!(
        "from the last node enforcing to Realized (the operator's part): p50 {:.1} ms, p99 {:.1} \
         ms",
        after_nodes.p50, after_nodes.p99
    );
    report_requests("apply", applied.iter().map(|a| a.write));
    result.push_str(&format!(
        " one_pass={one_pass} rollup_after_nodes_p50={:.1} rollup_after_nodes_p99={:.1}",
        after_nodes.p50, after_nodes.p99
    ));
    println!("{result}");
}

#[cfg(test)]
mod tests {
    use super::{median, median_ci};

    /// A deterministic stream of uniform numbers in [0, 1) (64-bit LCG, top bits).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn median_ci_brackets_the_median_by_order_statistics() {
        assert!(median_ci(&[]).0.is_nan());
        assert_eq!(median_ci(&[3.0]), (3.0, 3.0, 3.0));
        // 0..1000 in a scrambled order: the interval is the 469th and 531st of the sorted
        // values (n/2 ∓ 1.96·√n/2, rounded outwards).
        let v: Vec<f64> = (0..1000).map(|i| ((i * 7919) % 1000) as f64).collect();
        assert_eq!(median_ci(&v), (499.5, 469.0, 531.0));
        assert_eq!(median(&v), 499.5);
    }

    #[test]
    fn median_ci_covers_the_true_median_about_95_percent_of_the_time() {
        // Samples of 101 from Uniform(0, 1), whose median is 0.5: a 95 % interval must
        // contain it in about 95 % of 4,000 samples (binomial sd ≈ 0.35 %).
        let mut rng = Lcg(42);
        let trials = 4000;
        let covered = (0..trials)
            .filter(|_| {
                let v: Vec<f64> = (0..101).map(|_| rng.next()).collect();
                let (_, lo, hi) = median_ci(&v);
                lo <= 0.5 && 0.5 <= hi
            })
            .count();
        let coverage = covered as f64 / trials as f64;
        assert!(
            (0.94..=0.98).contains(&coverage),
            "coverage {coverage:.3} of a 95 % interval"
        );
    }
}
