//! `trellis-bench-join`: how long a running cluster takes to take in a new node (join
//! convergence) and to let it go again (leave convergence), against a bare apiserver
//! create→watch round trip measured in the same sandbox and run.
//!
//! ```text
//! fresh sandbox with N nodes (etcd, kube-apiserver, CRDs, trellis-operator, an underlay,
//!   a netns + trellis-node per node) + IPPool default-ipv4 (config/samples)
//!   └─ wait: every node's NetworkStatus Ready with N-1 peers, then no update for 1 s
//!
//! watches (own tasks, every event stamped with Instant::now() on arrival):
//!   Node, NodeNetwork, NetworkStatus, ConfigMap (namespace trellis-bench)
//!
//! J times, each after no Node/NodeNetwork/NetworkStatus update for 1 s (--quiet-ms):
//!   baseline  ConfigMap create sent ──────────────────────► seen in the watch (3 times)
//!   join      t0 ─ Nodes::add(trellis-node-<N+1>) ─ returned (its agent answers /healthz)
//!              ├─► Node with InternalIP seen
//!              ├─► (a) its NodeNetwork with podCIDRs seen
//!              ├─► first / (b) last existing node's NetworkStatus: N peers, Ready
//!              └─► (c) its own NetworkStatus: N peers, Ready
//!   leave     t0 ─ Nodes::remove(trellis-node-<N+1>) ─ returned
//!              ├─► its NodeNetwork deleted (by the operator)
//!              └─► last existing node's NetworkStatus back to N-1 peers, Ready
//!   then its NetworkStatus is deleted, as a real cluster's garbage collector would (it is
//!   owned by the Node; the sandbox has no GC), so the next join starts from nothing
//!   NetworkStatus updates are counted per join, per leave and from one join to the next
//! ```
//!
//! `status.peers` counts peers whose blocks are programmed in the kernel, read back after the
//! apply (docs/node.md), so (b) is the moment the last node could route to the new one.
//! Nothing is polled: every time is an event's arrival in this process. Prints percentiles
//! per measure and one `RESULT key=value ...` line (milliseconds) for
//! `scripts/bench-node-join.sh`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ObjectMeta, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::mpsc;
use trellis_api::v1alpha1::{NETWORKSTATUS_READY, NetworkStatus, NodeNetwork};
use trellis_e2e::{
    ControlPlane, NodeSpec, Nodes, StartOptions, controlplane::ensure_namespace, nodes, operator,
    samples, support::Stats,
};

#[derive(Parser)]
#[command(
    name = "trellis-bench-join",
    about = "Join and leave convergence of a Trellis cluster vs. a bare create→watch round trip"
)]
struct Args {
    /// Nodes in the running cluster; the node that joins is number N+1.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..nodes::MAX_NUMBERED as i64))]
    nodes: u8,
    /// Joins, each followed by the node's removal.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    joins: u16,
    /// Sandbox state directory (ended and wiped at start, removed at the end).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("trellis-bench-join"))]
    state_dir: PathBuf,
    /// Baseline round trips (ConfigMaps created one at a time) before each join.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=100))]
    round_trips: u8,
    /// Before each join (and before the first baseline), wait until no Node, NodeNetwork or
    /// NetworkStatus update has arrived for this long, so a join does not start while the
    /// agents are still writing after the previous one.
    #[arg(long, default_value_t = 1000)]
    quiet_ms: u64,
    /// Seconds to wait for each step (cluster converged, one join, one leave, one ConfigMap).
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Keep the state directory (the logs of the operator and every agent) after stopping.
    #[arg(long)]
    keep_state: bool,
}

const POOL: &str = "default-ipv4";
const NAMESPACE: &str = "trellis-bench";
const FIELD_MANAGER: &str = "trellis-bench";

#[tokio::main]
async fn main() -> ExitCode {
    trellis_e2e::support::init_logging("warn,kube_client=off");
    let args = Args::parse();
    trellis_e2e::support::run_until_interrupted(run(&args)).await
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let opts = StartOptions {
        remove_state_on_stop: !args.keep_state,
        ..StartOptions::new(&args.state_dir)
            .with_cluster(usize::from(args.nodes))
            .context("sandbox options")?
    };
    let started = Instant::now();
    let mut cp = ControlPlane::start(opts)
        .await
        .with_context(|| format!("starting a sandbox in {}", args.state_dir.display()))?;
    let up = started.elapsed();
    eprintln!(
        "sandbox with trellis-operator and {} trellis-node agents up in {:.1}s ({} build)",
        args.nodes,
        up.as_secs_f64(),
        if operator::release_build() {
            "release"
        } else {
            "debug"
        }
    );
    let logs = cp.sandbox().logs_dir();
    let result = measure(&cp, args, up).await;
    // The state dir goes with the sandbox: keep the logs of a failed run for its error.
    let kept = match (&result, args.keep_state) {
        (Err(_), false) => keep_logs(&logs),
        _ => None,
    };
    // Stopped here (agents, operator, apiserver, etcd, namespaces) also when `measure`
    // failed; the drop would do it too, without saying what went wrong.
    let stopped = cp.stop();
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            match (kept, args.keep_state) {
                (_, true) => eprintln!("logs kept in {}", logs.display()),
                (Some(copy), false) => eprintln!("logs copied to {}", copy.display()),
                (None, false) => {}
            }
            if let Err(stop) = stopped {
                eprintln!("stopping the sandbox: {stop}");
            }
            return Err(e);
        }
    };
    stopped.context("stopping the sandbox")?;
    report.print();
    if args.keep_state {
        eprintln!("logs kept in {}", logs.display());
    }
    Ok(())
}

/// Copy the sandbox's logs to `<temp>/trellis-bench-join-logs` (emptied first); `None` (and
/// a warning) if that fails.
fn keep_logs(logs: &Path) -> Option<PathBuf> {
    let copy = std::env::temp_dir().join("trellis-bench-join-logs");
    let result = (|| -> std::io::Result<()> {
        if copy.exists() {
            std::fs::remove_dir_all(&copy)?;
        }
        std::fs::create_dir_all(&copy)?;
        for entry in std::fs::read_dir(logs)? {
            let path = entry?.path();
            if let Some(name) = path.file_name().filter(|_| path.is_file()) {
                std::fs::copy(&path, copy.join(name))?;
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => Some(copy),
        Err(e) => {
            eprintln!("cannot copy {} to {}: {e}", logs.display(), copy.display());
            None
        }
    }
}

async fn measure(cp: &ControlPlane, args: &Args, up: Duration) -> anyhow::Result<Report> {
    let client = cp.client();
    let timeout = Duration::from_secs(args.timeout);
    let n = usize::from(args.nodes);
    let logs = cp.sandbox().logs_dir();
    ensure_namespace(&client, NAMESPACE).await?;

    let mut view = View::start(&client);
    view.wait_synced(timeout).await?;

    let members: BTreeSet<String> = nodes::numbered(n)?.into_iter().map(|s| s.name).collect();
    let spec = NodeSpec::numbered(n + 1).context("no underlay address for node N+1")?;
    let pool_applied = Instant::now();
    apply_pool(&client).await?;
    view.wait_steady(&members, &spec.name, timeout, &logs)
        .await
        .context("the cluster did not converge after the IPPool was applied")?;
    let converged = pool_applied.elapsed();
    let quiet = Duration::from_millis(args.quiet_ms);
    let settled = view
        .wait_quiet(quiet, timeout)
        .await
        .context("after the cluster converged")?
        .saturating_duration_since(pool_applied);
    let forming = view.updates.len();
    eprintln!(
        "{n} nodes Ready with {} peers each {:.1}s after the IPPool was applied; the last \
         update {:.1}s after it; {forming} NetworkStatus updates",
        n - 1,
        converged.as_secs_f64(),
        settled.as_secs_f64(),
    );

    // The first object in the namespace is slower than the rest: not counted.
    view.round_trip("trellis-bench-join-warmup", timeout)
        .await?;

    let nodes = cp.nodes();
    let mut joins = Vec::new();
    for j in 1..=usize::from(args.joins) {
        view.wait_steady(&members, &spec.name, timeout, &logs)
            .await
            .with_context(|| format!("before join {j}"))?;
        view.wait_quiet(quiet, timeout)
            .await
            .with_context(|| format!("before join {j}"))?;
        let mut baseline = Vec::new();
        for k in 1..=args.round_trips {
            let name = format!("trellis-bench-join-{j}-{k}");
            baseline.push(view.round_trip(&name, timeout).await?);
        }
        let join = view
            .join(&nodes, &spec, &members, timeout, &logs)
            .await
            .with_context(|| format!("join {j} of {}", args.joins))?;
        let leave = view
            .leave(&nodes, &spec.name, &members, timeout, &logs)
            .await
            .with_context(|| format!("leave {j} of {}", args.joins))?;
        eprintln!(
            "join {j}: network {:.0} ms, last peer {:.0} ms ({}), own Ready {:.0} ms, add returned {:.0} ms; \
             leave: last peer {:.0} ms ({}); round trips {:.1?} ms",
            join.network,
            join.last_peer,
            join.last_peer_name,
            join.own_ready,
            join.add_returned,
            leave.last_peer,
            leave.last_peer_name,
            baseline,
        );
        joins.push(Sample {
            baseline,
            join,
            leave,
            updates: Updates::default(),
        });
    }
    // NetworkStatus updates per join, per leave, and per cycle: from one join to the next
    // (the last one until the next pause), which includes writes after convergence.
    view.wait_quiet(quiet, timeout)
        .await
        .context("after the last join")?;
    let end = Instant::now();
    let starts: Vec<Instant> = joins.iter().map(|s| s.join.t0).chain([end]).collect();
    for (sample, next) in joins.iter_mut().zip(&starts[1..]) {
        let within = |from: Instant, to: Instant| {
            view.updates
                .iter()
                .filter(move |(at, _)| from <= *at && at <= &to)
                .map(|(_, name)| name.as_str())
        };
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for name in within(sample.join.t0, *next).filter(|n| members.contains(*n)) {
            *per_node.entry(name).or_default() += 1;
        }
        sample.updates = Updates {
            join: within(sample.join.t0, sample.join.done).count(),
            leave: within(sample.leave.t0, sample.leave.done).count(),
            cycle: within(sample.join.t0, *next).count(),
            most_by_one: per_node.values().copied().max().unwrap_or(0),
        };
    }
    Ok(Report {
        nodes: n,
        new_node: spec.name,
        up,
        converged,
        settled,
        forming,
        samples: joins,
    })
}

/// Apply the pool sample's `default-ipv4` (the operator then gives every node a block).
async fn apply_pool(client: &Client) -> anyhow::Result<()> {
    let pool = samples::ippools(samples::IPPOOL_SAMPLE)?
        .into_iter()
        .find(|p| p.name_any() == POOL)
        .with_context(|| format!("no IPPool {POOL} in {}", samples::IPPOOL_SAMPLE))?;
    samples::apply_ippools(client, &[pool], FIELD_MANAGER).await?;
    Ok(())
}

/// One watch event, reduced to what the bench looks at.
#[derive(Debug, Clone)]
enum What {
    /// A Node; `registered` once it has an InternalIP (the operator needs one).
    Node {
        name: String,
        registered: bool,
    },
    NodeGone {
        name: String,
    },
    /// A NodeNetwork; `cidrs` once the operator gave it pod CIDRs.
    Network {
        name: String,
        cidrs: bool,
    },
    NetworkGone {
        name: String,
    },
    /// A NetworkStatus: programmed peers and the Ready condition.
    Status {
        name: String,
        state: NodeState,
    },
    StatusGone {
        name: String,
    },
    ConfigMap {
        name: String,
    },
    /// A watch finished its initial list.
    Synced(&'static str),
    /// Nothing the bench looks at (a ConfigMap deleted).
    Ignored,
}

/// When this process received an event.
#[derive(Debug)]
struct Seen {
    at: Instant,
    what: What,
    /// From a watch's (initial or repeated) list, not a change as it happened.
    listed: bool,
}

/// What a node's NetworkStatus says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeState {
    /// It reports pod CIDRs of its own.
    cidrs: bool,
    peers: i32,
    ready: bool,
    reason: String,
}

impl NodeState {
    fn of(ns: &NetworkStatus) -> Self {
        let status = ns.status.as_ref();
        let ready =
            status.and_then(|s| s.conditions.iter().find(|c| c.type_ == NETWORKSTATUS_READY));
        NodeState {
            cidrs: status.is_some_and(|s| !s.pod_cidrs.is_empty()),
            peers: status.map_or(0, |s| s.peers),
            ready: ready.is_some_and(|c| c.status == "True"),
            reason: ready.map_or_else(|| "no Ready condition".into(), |c| c.reason.clone()),
        }
    }

    /// Ready, with blocks of its own and `peers` peers programmed.
    fn is(&self, peers: usize) -> bool {
        self.ready && self.cidrs && usize::try_from(self.peers).is_ok_and(|p| p == peers)
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} peers, Ready {} ({}){}",
            self.peers,
            if self.ready { "True" } else { "False" },
            self.reason,
            if self.cidrs { "" } else { ", no podCIDRs" }
        )
    }
}

/// The watches' events in arrival order, and the latest state they add up to.
struct View {
    client: Client,
    rx: mpsc::UnboundedReceiver<Seen>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    kinds: usize,
    synced: BTreeSet<&'static str>,
    nodes: BTreeSet<String>,
    networks: BTreeMap<String, bool>,
    statuses: BTreeMap<String, NodeState>,
    /// Every NetworkStatus update (not deletions, not listed): when, and whose.
    updates: Vec<(Instant, String)>,
}

impl Drop for View {
    fn drop(&mut self) {
        // Before the sandbox stops, or they would retry against a stopped apiserver.
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Watch `api` in its own task, sending each event stamped with its arrival.
fn spawn_watch<K>(
    api: Api<K>,
    kind: &'static str,
    tx: mpsc::UnboundedSender<Seen>,
    applied: fn(&K) -> What,
    deleted: fn(&K) -> What,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
        while let Some(event) = stream.next().await {
            let at = Instant::now();
            let listed = matches!(event, Ok(watcher::Event::InitApply(_)));
            let what = match event {
                Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => applied(&obj),
                Ok(watcher::Event::Delete(obj)) => deleted(&obj),
                Ok(watcher::Event::InitDone) => What::Synced(kind),
                Ok(watcher::Event::Init) => continue,
                Err(e) => {
                    tracing::warn!(kind, error = %e, "watch error; the watcher retries");
                    continue;
                }
            };
            if tx.send(Seen { at, what, listed }).is_err() {
                break;
            }
        }
    })
}

/// `to - from` in milliseconds (0 if `to` came first).
fn ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1e3
}

/// Up to five entries of `list`, and how many more there are.
fn some_of(list: &[String]) -> String {
    let mut text = list.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
    if list.len() > 5 {
        text.push_str(&format!("; and {} more", list.len() - 5));
    }
    text
}

/// One join, in milliseconds from just before `Nodes::add`.
#[derive(Debug, Clone)]
struct JoinTimes {
    add_returned: f64,
    registered: f64,
    /// (a) its NodeNetwork with podCIDRs seen.
    network: f64,
    first_peer: f64,
    /// (b) join convergence: the last existing node reports it programmed.
    last_peer: f64,
    last_peer_name: String,
    /// (c) the new node is Ready with N peers.
    own_ready: f64,
    /// Just before `Nodes::add`, and when the last of (a), (b), (c) was seen.
    t0: Instant,
    done: Instant,
}

/// One leave, in milliseconds from just before `Nodes::remove`.
#[derive(Debug, Clone)]
struct LeaveTimes {
    remove_returned: f64,
    network_gone: f64,
    /// Leave convergence: the last existing node is back to N-1 peers.
    last_peer: f64,
    last_peer_name: String,
    /// Just before `Nodes::remove`, and when the last node was back.
    t0: Instant,
    done: Instant,
}

impl View {
    fn start(client: &Client) -> View {
        let (tx, rx) = mpsc::unbounded_channel();
        let tasks = vec![
            spawn_watch(
                Api::<Node>::all(client.clone()),
                "Node",
                tx.clone(),
                |n| What::Node {
                    name: n.name_any(),
                    registered: !nodes::internal_ips(n).is_empty(),
                },
                |n| What::NodeGone { name: n.name_any() },
            ),
            spawn_watch(
                Api::<NodeNetwork>::all(client.clone()),
                "NodeNetwork",
                tx.clone(),
                |nn| What::Network {
                    name: nn.name_any(),
                    cidrs: !nn.spec.pod_cidrs.is_empty(),
                },
                |nn| What::NetworkGone {
                    name: nn.name_any(),
                },
            ),
            spawn_watch(
                Api::<NetworkStatus>::all(client.clone()),
                "NetworkStatus",
                tx.clone(),
                |ns| What::Status {
                    name: ns.name_any(),
                    state: NodeState::of(ns),
                },
                |ns| What::StatusGone {
                    name: ns.name_any(),
                },
            ),
            spawn_watch(
                Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE),
                "ConfigMap",
                tx,
                |cm| What::ConfigMap {
                    name: cm.name_any(),
                },
                |_| What::Ignored,
            ),
        ];
        View {
            client: client.clone(),
            rx,
            kinds: tasks.len(),
            tasks,
            synced: BTreeSet::new(),
            nodes: BTreeSet::new(),
            networks: BTreeMap::new(),
            statuses: BTreeMap::new(),
            updates: Vec::new(),
        }
    }

    /// The next event, applied to the view; `None` once `deadline` has passed.
    async fn next(&mut self, deadline: Instant) -> anyhow::Result<Option<Seen>> {
        let seen = match tokio::time::timeout_at(deadline.into(), self.rx.recv()).await {
            Err(_) => return Ok(None),
            Ok(None) => bail!("every watch ended"),
            Ok(Some(seen)) => seen,
        };
        match &seen.what {
            What::Node { name, .. } => {
                self.nodes.insert(name.clone());
            }
            What::NodeGone { name } => {
                self.nodes.remove(name);
            }
            What::Network { name, cidrs } => {
                self.networks.insert(name.clone(), *cidrs);
            }
            What::NetworkGone { name } => {
                self.networks.remove(name);
            }
            What::Status { name, state } => {
                if !seen.listed {
                    self.updates.push((seen.at, name.clone()));
                }
                self.statuses.insert(name.clone(), state.clone());
            }
            What::StatusGone { name } => {
                self.statuses.remove(name);
            }
            What::Synced(kind) => {
                self.synced.insert(kind);
            }
            What::ConfigMap { .. } | What::Ignored => {}
        }
        Ok(Some(seen))
    }

    /// Until every watch has listed what there is.
    async fn wait_synced(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.synced.len() < self.kinds {
            if self.next(deadline).await?.is_none() {
                bail!(
                    "after {timeout:?} only these watches had listed: {:?}",
                    self.synced
                );
            }
        }
        Ok(())
    }

    /// Until every member is Ready with all the other members as peers, and `gone` has
    /// neither a Node, a NodeNetwork nor a NetworkStatus.
    async fn wait_steady(
        &mut self,
        members: &BTreeSet<String>,
        gone: &str,
        timeout: Duration,
        logs: &Path,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let peers = members.len() - 1;
        loop {
            let lagging: Vec<String> = members
                .iter()
                .filter_map(|m| match self.statuses.get(m) {
                    Some(s) if s.is(peers) => None,
                    Some(s) => Some(format!("{m}: {s}")),
                    None => Some(format!("{m}: no NetworkStatus")),
                })
                .collect();
            let leftovers: Vec<&str> = [
                self.nodes.contains(gone).then_some("Node"),
                self.networks.contains_key(gone).then_some("NodeNetwork"),
                self.statuses.contains_key(gone).then_some("NetworkStatus"),
            ]
            .into_iter()
            .flatten()
            .collect();
            if lagging.is_empty() && leftovers.is_empty() {
                return Ok(());
            }
            if self.next(deadline).await?.is_none() {
                bail!(
                    "after {timeout:?}, {} of {} nodes not Ready with {peers} peers ({}){}; \
                     agent logs in {}",
                    lagging.len(),
                    members.len(),
                    some_of(&lagging),
                    if leftovers.is_empty() {
                        String::new()
                    } else {
                        format!("; {gone} still has a {}", leftovers.join(", a "))
                    },
                    logs.display()
                );
            }
        }
    }

    /// Until no Node, NodeNetwork or NetworkStatus update has arrived for `quiet` (a timer on
    /// the event stream: the condition is the absence of events). Returns when the last one
    /// arrived (now, if none came).
    async fn wait_quiet(&mut self, quiet: Duration, timeout: Duration) -> anyhow::Result<Instant> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut last = None::<Instant>;
        loop {
            let quiet_from = last.unwrap_or(start);
            match self.next((quiet_from + quiet).min(deadline)).await? {
                None if Instant::now() >= quiet_from + quiet => return Ok(last.unwrap_or(start)),
                None => bail!(
                    "Nodes, NodeNetworks or NetworkStatuses still changing after {timeout:?} \
                     (no pause of {quiet:?})"
                ),
                Some(Seen {
                    what: What::ConfigMap { .. } | What::Synced(_) | What::Ignored,
                    ..
                }) => {}
                Some(seen) => last = Some(last.map_or(seen.at, |l| l.max(seen.at))),
            }
        }
    }

    /// The bare round trip: one ConfigMap created, from create sent to seen in the watch.
    async fn round_trip(&mut self, name: &str, timeout: Duration) -> anyhow::Result<f64> {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([("bench".to_string(), "join".to_string())])),
            ..ConfigMap::default()
        };
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), NAMESPACE);
        let sent = Instant::now();
        api.create(&PostParams::default(), &cm)
            .await
            .with_context(|| format!("create ConfigMap {name}"))?;
        let deadline = sent + timeout;
        loop {
            match self.next(deadline).await? {
                None => bail!("ConfigMap {name} not seen in the watch within {timeout:?}"),
                Some(Seen {
                    at,
                    what: What::ConfigMap { name: seen },
                    ..
                }) if seen == name => return Ok(ms(sent, at)),
                Some(_) => {}
            }
        }
    }

    /// Add `spec` and wait until it and every member have programmed each other.
    async fn join(
        &mut self,
        nodes: &Nodes,
        spec: &NodeSpec,
        members: &BTreeSet<String>,
        timeout: Duration,
        logs: &Path,
    ) -> anyhow::Result<JoinTimes> {
        let new = spec.name.as_str();
        let n = members.len();
        let t0 = Instant::now();
        nodes
            .add(spec)
            .await
            .with_context(|| format!("add node {new}"))?;
        let added = Instant::now();
        let deadline = t0 + timeout;
        let (mut registered, mut network, mut own) = (None, None, None);
        let mut programmed: BTreeMap<&str, Instant> = BTreeMap::new();
        while registered.is_none() || network.is_none() || own.is_none() || programmed.len() < n {
            let Some(seen) = self.next(deadline).await? else {
                let missing: Vec<String> = members
                    .iter()
                    .filter(|m| !programmed.contains_key(m.as_str()))
                    .map(|m| match self.statuses.get(m) {
                        Some(s) => format!("{m}: {s}"),
                        None => format!("{m}: no NetworkStatus"),
                    })
                    .collect();
                let own_state = match self.statuses.get(new) {
                    Some(s) => s.to_string(),
                    None => "no NetworkStatus".into(),
                };
                bail!(
                    "after {timeout:?}: Node with InternalIP seen: {}; NodeNetwork with podCIDRs \
                     seen: {}; {} of {n} nodes have not reported {new} programmed ({}); {new} \
                     itself (wants {n} peers): {own_state}; agent logs in {}",
                    registered.is_some(),
                    network.is_some(),
                    missing.len(),
                    some_of(&missing),
                    logs.display()
                );
            };
            if seen.at < t0 {
                continue;
            }
            match &seen.what {
                What::Node {
                    name,
                    registered: true,
                } if name == new => {
                    registered.get_or_insert(seen.at);
                }
                What::Network { name, cidrs: true } if name == new => {
                    network.get_or_insert(seen.at);
                }
                What::Status { name, state } if name == new && state.is(n) => {
                    own.get_or_insert(seen.at);
                }
                What::Status { name, state } if state.is(n) => {
                    if let Some(member) = members.get(name) {
                        programmed.entry(member.as_str()).or_insert(seen.at);
                    }
                }
                _ => {}
            }
        }
        let (first, _) = programmed
            .iter()
            .min_by_key(|(_, at)| **at)
            .context("no members")?;
        let (last_name, last) = programmed
            .iter()
            .max_by_key(|(_, at)| **at)
            .context("no members")?;
        let at = |t: Option<Instant>| t.map_or(f64::NAN, |t| ms(t0, t));
        Ok(JoinTimes {
            t0,
            done: programmed
                .values()
                .chain(&own)
                .chain(&network)
                .max()
                .copied()
                .unwrap_or(t0),
            add_returned: ms(t0, added),
            registered: at(registered),
            network: at(network),
            first_peer: ms(t0, programmed[first]),
            last_peer: ms(t0, *last),
            last_peer_name: (*last_name).to_string(),
            own_ready: at(own),
        })
    }

    /// Remove `name` and wait until every member is back to the other members as peers;
    /// then delete its NetworkStatus as the garbage collector would.
    async fn leave(
        &mut self,
        nodes: &Nodes,
        name: &str,
        members: &BTreeSet<String>,
        timeout: Duration,
        logs: &Path,
    ) -> anyhow::Result<LeaveTimes> {
        let peers = members.len() - 1;
        let t0 = Instant::now();
        nodes
            .remove(name)
            .await
            .with_context(|| format!("remove node {name}"))?;
        let removed = Instant::now();
        let deadline = t0 + timeout;
        let mut network_gone = None;
        let mut back: BTreeMap<&str, Instant> = BTreeMap::new();
        while network_gone.is_none() || back.len() < members.len() {
            let Some(seen) = self.next(deadline).await? else {
                let missing: Vec<String> = members
                    .iter()
                    .filter(|m| !back.contains_key(m.as_str()))
                    .map(|m| match self.statuses.get(m) {
                        Some(s) => format!("{m}: {s}"),
                        None => format!("{m}: no NetworkStatus"),
                    })
                    .collect();
                bail!(
                    "after {timeout:?}: NodeNetwork {name} deleted: {}; {} of {} nodes not back \
                     to {peers} peers ({}); agent logs in {}",
                    network_gone.is_some(),
                    missing.len(),
                    members.len(),
                    some_of(&missing),
                    logs.display()
                );
            };
            if seen.at < t0 {
                continue;
            }
            match &seen.what {
                What::NetworkGone { name: gone } if gone == name => {
                    network_gone.get_or_insert(seen.at);
                }
                What::Status { name: node, state } if state.is(peers) => {
                    if let Some(member) = members.get(node) {
                        back.entry(member.as_str()).or_insert(seen.at);
                    }
                }
                _ => {}
            }
        }
        let (last_name, last) = back
            .iter()
            .max_by_key(|(_, at)| **at)
            .context("no members")?;
        let times = LeaveTimes {
            remove_returned: ms(t0, removed),
            network_gone: network_gone.map_or(f64::NAN, |t| ms(t0, t)),
            last_peer: ms(t0, *last),
            last_peer_name: (*last_name).to_string(),
            t0,
            done: *last,
        };

        // Owned by the Node: a real cluster's garbage collector deletes it with the Node. The
        // sandbox has none, and a stale status would make the next join's (c) look instant.
        match Api::<NetworkStatus>::all(self.client.clone())
            .delete(name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("delete NetworkStatus {name}")),
        }
        let deadline = Instant::now() + timeout;
        while self.statuses.contains_key(name) {
            if self.next(deadline).await?.is_none() {
                bail!("NetworkStatus {name} not seen deleted within {timeout:?}");
            }
        }
        Ok(times)
    }
}

/// One join with the round trip measured just before it and the leave after it.
struct Sample {
    /// Round trips just before the join.
    baseline: Vec<f64>,
    join: JoinTimes,
    leave: LeaveTimes,
    updates: Updates,
}

/// NetworkStatus updates (writes that changed the object) seen around one join.
#[derive(Debug, Default)]
struct Updates {
    /// From just before the add until the join converged.
    join: usize,
    /// From just before the remove until the leave converged.
    leave: usize,
    /// From just before the add until just before the next add.
    cycle: usize,
    /// The most any one existing node made in the cycle (its peer count changes twice).
    most_by_one: usize,
}

struct Report {
    nodes: usize,
    new_node: String,
    up: Duration,
    /// IPPool applied → every node Ready with N-1 peers.
    converged: Duration,
    /// IPPool applied → the last update before the first quiet pause.
    settled: Duration,
    /// NetworkStatus updates until then (from the sandbox start on).
    forming: usize,
    samples: Vec<Sample>,
}

impl Report {
    fn stats(&self, value: impl Fn(&Sample) -> f64) -> Stats {
        Stats::of(self.samples.iter().map(value).collect())
    }

    fn print(&self) {
        let (n, new, joins) = (self.nodes, &self.new_node, self.samples.len());
        let rt = Stats::of(
            self.samples
                .iter()
                .flat_map(|s| s.baseline.iter().copied())
                .collect(),
        );
        let trips = self.samples.iter().map(|s| s.baseline.len()).sum::<usize>();
        let added = self.stats(|s| s.join.add_returned);
        let registered = self.stats(|s| s.join.registered);
        let network = self.stats(|s| s.join.network);
        let first = self.stats(|s| s.join.first_peer);
        let join = self.stats(|s| s.join.last_peer);
        let own = self.stats(|s| s.join.own_ready);
        let removed = self.stats(|s| s.leave.remove_returned);
        let gone = self.stats(|s| s.leave.network_gone);
        let leave = self.stats(|s| s.leave.last_peer);
        let count = |c: fn(&Updates) -> usize| self.stats(move |s| c(&s.updates) as f64);
        let (u_join, u_leave) = (count(|u| u.join), count(|u| u.leave));
        let (u_cycle, u_one) = (count(|u| u.cycle), count(|u| u.most_by_one));
        println!(
            "cluster: {n} nodes, sandbox up in {:.1} s; after the IPPool was applied every node \
             Ready with {} peers in {:.1} s, the last update at {:.1} s; {} NetworkStatus updates \
             ({:.0} per node)",
            self.up.as_secs_f64(),
            n - 1,
            self.converged.as_secs_f64(),
            self.settled.as_secs_f64(),
            self.forming,
            self.forming as f64 / n as f64
        );
        println!(
            "joins: {joins} times node {new} added (Nodes::add: netns, Node, trellis-node), from just before the add:"
        );
        println!("  Nodes::add returned (/healthz)   {}", added.line());
        println!("  Node with InternalIP seen        {}", registered.line());
        println!("  (a) NodeNetwork with podCIDRs    {}", network.line());
        println!("  first node programmed it         {}", first.line());
        println!(
            "  (b) last node programmed it      {}   = join convergence ({n} nodes at {n} peers, Ready)",
            join.line()
        );
        println!(
            "  {:<33}{}",
            format!("(c) new node Ready, {n} peers"),
            own.line()
        );
        println!(
            "leaves: {joins} times node {new} removed (Nodes::remove), from just before the remove:"
        );
        println!("  Nodes::remove returned           {}", removed.line());
        println!("  NodeNetwork deleted              {}", gone.line());
        println!(
            "  {:<33}{}   = leave convergence",
            format!("last node back to {} peers", n - 1),
            leave.line()
        );
        println!(
            "NetworkStatus updates (writes that changed one; the fewest possible in brackets):"
        );
        let counts = |s: &Stats| format!("p50 {:>5} p99 {:>5} max {:>5}", s.p50, s.p99, s.max);
        println!(
            "  until the join converged         {}   [{}: one per node, two to create the new one's]",
            counts(&u_join),
            n + 2
        );
        println!(
            "  until the leave converged        {}   [{n}]",
            counts(&u_leave)
        );
        println!(
            "  join to next join                {}   [{}]",
            counts(&u_cycle),
            2 * n + 2
        );
        println!(
            "  most by one existing node        {}   [2: its peer count changed twice]",
            counts(&u_one)
        );
        println!(
            "baseline: {trips} ConfigMaps created one at a time, {} before each join, each seen in a watch",
            trips / joins.max(1)
        );
        println!(
            "  create sent → in watch           {}   = the bare create→watch round trip",
            rt.line()
        );
        let (r50, r99) = (join.p50 / rt.p50, join.p99 / rt.p99);
        let (o50, o99) = (own.p50 / rt.p50, own.p99 / rt.p99);
        let (l50, l99) = (leave.p50 / rt.p50, leave.p99 / rt.p99);
        println!(
            "join convergence = {r50:.1}x (p50), {r99:.1}x (p99) a bare create→watch round trip; \
             new node Ready = {o50:.1}x, {o99:.1}x; leave convergence = {l50:.1}x, {l99:.1}x"
        );
        println!(
            "RESULT nodes={n} joins={joins} up={:.1} converged={:.1} settled={:.1} forming={} \
             add_p50={:.1} node_p50={:.1} nn_p50={:.1} nn_p99={:.1} first_p50={:.1} \
             join_p50={:.1} join_p99={:.1} join_max={:.1} own_p50={:.1} own_p99={:.1} own_max={:.1} \
             remove_p50={:.1} gone_p50={:.1} leave_p50={:.1} leave_p99={:.1} leave_max={:.1} \
             rt_p50={:.1} rt_p99={:.1} rt_max={:.1} ratio_p50={r50:.1} ratio_p99={r99:.1} \
             own_ratio_p50={o50:.1} own_ratio_p99={o99:.1} leave_ratio_p50={l50:.1} leave_ratio_p99={l99:.1} \
             updates_join_p50={} updates_leave_p50={} updates_cycle_p50={} updates_cycle_max={} \
             updates_one_max={}",
            self.up.as_secs_f64() * 1e3,
            self.converged.as_secs_f64() * 1e3,
            self.settled.as_secs_f64() * 1e3,
            self.forming,
            added.p50,
            registered.p50,
            network.p50,
            network.p99,
            first.p50,
            join.p50,
            join.p99,
            join.max,
            own.p50,
            own.p99,
            own.max,
            removed.p50,
            gone.p50,
            leave.p50,
            leave.p99,
            leave.max,
            rt.p50,
            rt.p99,
            rt.max,
            u_join.p50,
            u_leave.p50,
            u_cycle.p50,
            u_cycle.max,
            u_one.max,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_state_counts_only_ready_with_the_peers_wanted() {
        let state = |peers, ready| NodeState {
            cidrs: true,
            peers,
            ready,
            reason: String::new(),
        };
        assert!(state(9, true).is(9));
        assert!(!state(9, false).is(9));
        assert!(!state(10, true).is(9));
        assert!(!state(-1, true).is(usize::MAX));
        let no_block = NodeState {
            cidrs: false,
            ..state(9, true)
        };
        assert!(!no_block.is(9));
    }
}
