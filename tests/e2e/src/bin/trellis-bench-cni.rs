//! `trellis-bench-cni`: how long a container runtime waits for Trellis to plug a pod in and
//! out (CNI ADD + DEL), against the reference `bridge` + `host-local` plugins doing the same
//! on the same node, in the same run, through the same runtime code.
//!
//! ```text
//! fresh sandbox with 1 node (etcd, kube-apiserver, CRDs, trellis-operator, an underlay,
//!   the node's netns + trellis-node) + IPPool default-ipv4 (config/samples)
//!   └─ wait: the node's conflist installed and CNI STATUS ok (the network is ready)
//!
//! two networks, both run by the node's cni_runtime::Runtime (as a runtime runs them:
//! nsenter --net=<node netns> -- <plugin>, CNI_PATH <node bin dir>:<reference plugins>,
//! results cached) with the node's netns as their host namespace:
//!   trellis    the node's installed 10-trellis.conflist: trellis, then portmap
//!   reference  bridge "trellis-bench0" (isGateway, no ipMasq) + host-local 10.98.0.0/22,
//!              then the same portmap
//!   (--without-portmap: both lists without portmap, the plugins under test alone)
//!
//! pod namespaces: created (and recorded by the sandbox) before anything is timed
//! warm-up:  W pods per network, ADD then DEL, not counted
//! ADD:      pod 1..N, both networks, the order alternating per pod   (the node fills up)
//! DEL:      pod 1..N, both networks, the order alternating per pod
//!           timed: Runtime::add / Runtime::del, on a monotonic clock; after each Trellis
//!           DEL (untimed) until trellis-node has finished it (DEL answers before the veth is
//!           gone), so its rest never overlaps the reference's next command; around each phase
//!           trellis-node's /metrics (its own time per request, reconciles, NetworkStatus
//!           writes) and its CPU time (/proc/<pid>/stat)
//! profile:  P more pods per network with every plugin run on its own (the same
//!           Runtime::exec), plugin starts (VERSION), trellis STATUS (a socket round trip),
//!           bare nsenter, and trellis-node's own time per request
//! ```
//!
//! The result per pod is its ADD + its DEL. Prints percentiles per network and the ratios
//! Trellis / reference, the profile, and one `RESULT key=value ...` line (milliseconds) for
//! `scripts/bench-cni.sh`.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::StreamExt as _;
use kube::{Client, ResourceExt as _};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use trellis_e2e::{
    ControlPlane, NetworkConfigList, Pod, PodSpec, Runtime, RuntimeConf, StartOptions,
    cni_runtime::{self, Command},
    datapath, operator, samples,
    support::{Stats, quantile},
};

#[derive(Parser)]
#[command(
    name = "trellis-bench-cni",
    about = "CNI ADD + DEL latency per pod: Trellis vs. the reference bridge + host-local plugins"
)]
struct Args {
    /// Pods per network (all on the node at once before the DELs; a /24 block holds 252).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(1..=250))]
    pods: u16,
    /// Warm-up pods per network (ADD then DEL, not counted).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(0..=50))]
    warmup: u16,
    /// Pods per network for the profile (every plugin timed on its own); 0 skips it.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(0..=50))]
    profile: u16,
    /// Sandbox state directory (ended and wiped at start, removed at the end).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("trellis-bench-cni"))]
    state_dir: PathBuf,
    /// Seconds to wait for the node's network to be ready.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Keep the state directory (logs) after stopping.
    #[arg(long)]
    keep_state: bool,
    /// Both networks without portmap: the plugins under test alone (trellis against bridge +
    /// host-local), instead of the chains as installed.
    #[arg(long)]
    without_portmap: bool,
    /// Pods on other nodes, published before anything is timed as the `NodeEndpoints` shards
    /// of 110 pods that nodes write (addresses in 10.128.0.0/10, a disabled IPPool of its
    /// own; 500 identities): what the node's policy sync carries in a cluster of that size.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    remote_pods: u32,
}

const POOL: &str = "default-ipv4";
const FIELD_MANAGER: &str = "trellis-bench";
const NODE: &str = "trellis-node-1";
/// The Kubernetes namespace the pods claim (`K8S_POD_NAMESPACE`). The Trellis network's
/// pods have Pod objects (bound to the node, made before anything is timed), as every pod
/// of a cluster has: trellis-node reads a pod's labels from its cache of the node's pods.
const POD_NAMESPACE: &str = "trellis-bench";
/// The reference network: its name, bridge and host-local range (outside 10.244.0.0/16, the
/// sample pools, and the sandbox's 192.0.2.0/24 underlay).
const REF_NETWORK: &str = "trellis-bench-ref";
const REF_BRIDGE: &str = "trellis-bench0";
const REF_SUBNET: &str = "10.98.0.0/22";
/// How long trellis-node may take to finish an answered DEL in the profile.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

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
            .with_cluster(1)
            .context("sandbox options")?
    };
    let started = Instant::now();
    let mut cp = ControlPlane::start(opts)
        .await
        .with_context(|| format!("starting a sandbox in {}", args.state_dir.display()))?;
    eprintln!(
        "sandbox with trellis-operator and one trellis-node up in {:.1}s ({} build)",
        started.elapsed().as_secs_f64(),
        if operator::release_build() {
            "release"
        } else {
            "debug"
        }
    );
    let logs = cp.sandbox().logs_dir();
    let result = measure(&cp, args).await;
    // Stopped here also when `measure` failed: agents, operator, apiserver, etcd, and every
    // recorded namespace (the node's, with the bridge and veths in it, and the pods').
    let stopped = cp.stop();
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            if args.keep_state {
                eprintln!("logs kept in {}", logs.display());
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

/// One network under test.
struct Net {
    label: &'static str,
    /// `t` or `r`: in the pods' names.
    tag: char,
    list: NetworkConfigList,
}

/// What one network measured (milliseconds).
#[derive(Default)]
struct Times {
    add: Vec<f64>,
    del: Vec<f64>,
}

impl Times {
    /// ADD + DEL of each pod.
    fn both(&self) -> Vec<f64> {
        self.add.iter().zip(&self.del).map(|(a, d)| a + d).collect()
    }
}

async fn measure(cp: &ControlPlane, args: &Args) -> anyhow::Result<Report> {
    let client = cp.client();
    let timeout = Duration::from_secs(args.timeout);
    let sandbox = cp.sandbox().clone();
    let pods = cp.pods().with_network_ready_timeout(timeout);
    let nodes = cp.nodes();

    apply_pool(&client).await?;
    let ready = Instant::now();
    let trellis = pods.network(NODE).await.context("the node's network")?;
    let deadline = ready + timeout;
    loop {
        match pods.status(NODE).await {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context("CNI STATUS of the node's network");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    eprintln!(
        "{NODE}: network ready (conflist {}, CNI STATUS ok) {:.1}s after the IPPool was applied",
        trellis.path.display(),
        ready.elapsed().as_secs_f64()
    );
    let runtime = pods.runtime(NODE).await?;
    let bench_dir = sandbox.dir().join("bench");
    let reference = reference_network(&trellis, &bench_dir, !args.without_portmap)?;
    let trellis = if args.without_portmap {
        trellis_alone(&trellis, &bench_dir)?
    } else {
        trellis
    };
    let nets = [
        Net {
            label: "trellis",
            tag: 't',
            list: trellis,
        },
        Net {
            label: "reference",
            tag: 'r',
            list: reference,
        },
    ];
    let port = nodes
        .agent_metrics_port(NODE)?
        .context("the node's agent has no metrics port")?;
    let agent_pid = nodes.agent(NODE)?.map(|r| r.pid);
    if args.remote_pods > 0 {
        publish_remote_pods(&client, port, args.remote_pods as usize, timeout).await?;
    }

    // Every pod namespace first: creating them is not what is measured.
    let (warmup, n, profile) = (
        usize::from(args.warmup),
        usize::from(args.pods),
        usize::from(args.profile),
    );
    let total = warmup + n + profile;
    let made = Instant::now();
    trellis_e2e::controlplane::ensure_namespace(&client, POD_NAMESPACE)
        .await
        .with_context(|| format!("create namespace {POD_NAMESPACE}"))?;
    let tag = datapath::sandbox_tag(sandbox.dir());
    let mut slots: [Vec<Pod>; 2] = [Vec::new(), Vec::new()];
    for (k, net) in nets.iter().enumerate() {
        for i in 0..total {
            let mut pod = bench_pod(&tag, net.tag, i)?;
            let (s, record) = (sandbox.clone(), pod.clone());
            tokio::task::spawn_blocking(move || datapath::create_pod_netns(&s, &record))
                .await
                .context("creating a pod namespace")??;
            if k == 0 {
                pod.uid = Some(pod_object(&client, &pod.name).await?);
            }
            slots[k].push(pod);
        }
    }
    eprintln!(
        "{} pod namespaces and {total} Pod objects made in {:.1}s (not timed)",
        2 * total,
        made.elapsed().as_secs_f64()
    );

    let mut times = [Times::default(), Times::default()];
    // What the runtime passes for pod `i` of network `k`.
    let conf = |k: usize, i: usize| slots[k][i].runtime_conf();
    // Warm-up: page cache, the plugins' binaries, the agent's first requests.
    for i in 0..warmup {
        for k in order(i) {
            let rt = conf(k, i);
            add(&runtime, &nets[k], &rt).await?;
            runtime
                .del(&nets[k].list, &rt)
                .await
                .with_context(|| format!("{}: warm-up DEL", nets[k].label))?;
        }
    }

    let before_add = server_times(port).await?;
    let steps_before = add_steps(port).await?;
    let loop_start = Counters::scrape(port).await?;
    let cpu_start = agent_pid.map(cpu_ms);
    let add_phase = Instant::now();
    for i in warmup..warmup + n {
        for k in order(i) {
            let rt = conf(k, i);
            let t0 = Instant::now();
            add(&runtime, &nets[k], &rt).await?;
            times[k].add.push(ms(t0));
        }
    }
    let add_phase = add_phase.elapsed();
    let cpu_added = agent_pid.map(cpu_ms);
    let loop_added = Counters::scrape(port).await?;
    let before_del = server_times(port).await?;
    let steps_after = add_steps(port).await?;
    let endpoints = endpoint_count(port).await?;
    let del_phase = Instant::now();
    for i in warmup..warmup + n {
        for k in order(i) {
            let rt = conf(k, i);
            let t0 = Instant::now();
            runtime
                .del(&nets[k].list, &rt)
                .await
                .with_context(|| format!("{}: DEL of pod {}", nets[k].label, i + 1))?;
            times[k].del.push(ms(t0));
            if k == 0 {
                settle(port, timeout).await?;
            }
        }
    }
    let del_phase = del_phase.elapsed();
    let cpu_deleted = agent_pid.map(cpu_ms);
    let loop_deleted = Counters::scrape(port).await?;
    let after_del = server_times(port).await?;
    eprintln!(
        "{n} pods per network: ADD phase {:.1}s, DEL phase {:.1}s; {endpoints} Trellis \
         endpoints on the node when full",
        add_phase.as_secs_f64(),
        del_phase.as_secs_f64()
    );

    let prof = if profile > 0 {
        Some(
            profile_phase(
                &runtime,
                &nets,
                &slots,
                warmup + n..total,
                port,
                &nodes.netns_path(NODE)?,
            )
            .await?,
        )
    } else {
        None
    };

    // The pods' namespaces, by name (the control plane's stop would delete them too).
    for pod in slots.iter().flatten() {
        let (s, netns) = (sandbox.clone(), pod.netns.clone());
        tokio::task::spawn_blocking(move || datapath::delete_pod_netns(&s, &netns))
            .await
            .context("deleting a pod namespace")??;
    }

    Ok(Report {
        portmap: !args.without_portmap,
        remote_pods: args.remote_pods,
        pods: n,
        warmup,
        times,
        server_add: per_request(&before_add, &before_del, "add"),
        server_del: per_request(&before_del, &after_del, "del"),
        add_steps: steps_after
            .keys()
            .map(|step| {
                let mean = per_request(&steps_before, &steps_after, step);
                (step.clone(), mean)
            })
            .collect(),
        agent_pid,
        agent_cpu: match (cpu_start, cpu_added, cpu_deleted) {
            (Some(Ok(a)), Some(Ok(b)), Some(Ok(c))) => Some((b - a, c - b)),
            _ => None,
        },
        agent_loop: [
            loop_added.minus(&loop_start),
            loop_deleted.minus(&loop_added),
        ],
        profile: prof,
    })
}

/// The agent's reconcile loop, from its /metrics: what the pods' netlink notifications and
/// endpoint counts make it do.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    /// `trellis_node_reconciles_total`, every trigger.
    reconciles: f64,
    /// `trellis_node_reconcile_duration_seconds_sum` (seconds).
    reconcile_seconds: f64,
    /// `trellis_node_netlink_events_total`.
    netlink_events: f64,
    /// `trellis_node_status_writes_total`.
    status_writes: f64,
}

impl Counters {
    async fn scrape(port: u16) -> anyhow::Result<Self> {
        let text = metrics(port).await?;
        Ok(Counters {
            reconciles: metric_sum(&text, "trellis_node_reconciles_total"),
            reconcile_seconds: metric_sum(&text, "trellis_node_reconcile_duration_seconds_sum"),
            netlink_events: metric_sum(&text, "trellis_node_netlink_events_total"),
            status_writes: metric_sum(&text, "trellis_node_status_writes_total"),
        })
    }

    fn minus(&self, earlier: &Counters) -> Counters {
        Counters {
            reconciles: self.reconciles - earlier.reconciles,
            reconcile_seconds: self.reconcile_seconds - earlier.reconcile_seconds,
            netlink_events: self.netlink_events - earlier.netlink_events,
            status_writes: self.status_writes - earlier.status_writes,
        }
    }
}

/// The sum of every series of metric `name` in a Prometheus text exposition.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if let Some(labelled) = rest.strip_prefix('{') {
                labelled.split_once("} ")?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// CPU time (user + system, ms) process `pid` and its threads, also those that ended, have
/// used: `/proc/<pid>/stat` fields 14 and 15, in USER_HZ (100 per second on Linux).
fn cpu_ms(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // After the command name in parentheses, fields 3.. follow.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .with_context(|| format!("{path}: too few fields"))?
            .parse::<f64>()
            .with_context(|| format!("{path}: field {}", i + 3))
    };
    Ok((tick(11)? + tick(12)?) * 10.0)
}

/// Which network goes first for pod `i`: they take turns.
fn order(i: usize) -> [usize; 2] {
    if i.is_multiple_of(2) { [0, 1] } else { [1, 0] }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Apply the pool sample's `default-ipv4` (the operator then gives the node a block).
async fn apply_pool(client: &Client) -> anyhow::Result<()> {
    let pool = samples::ippools(samples::IPPOOL_SAMPLE)?
        .into_iter()
        .find(|p| p.name_any() == POOL)
        .with_context(|| format!("no IPPool {POOL} in {}", samples::IPPOOL_SAMPLE))?;
    samples::apply_ippools(client, &[pool], FIELD_MANAGER).await?;
    Ok(())
}

/// The reference network: `bridge` (its own bridge, the gateway address on it, no masquerade)
/// with `host-local` IPAM (state under `dir`), then, with `portmap`, the same `portmap` as
/// Trellis's list, in the same `cniVersion`. Written to `dir` as well, for a look by hand.
fn reference_network(
    trellis: &NetworkConfigList,
    dir: &Path,
    portmap: bool,
) -> anyhow::Result<NetworkConfigList> {
    let mut plugins = vec![json!({
        "type": "bridge",
        "bridge": REF_BRIDGE,
        "isGateway": true,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": REF_SUBNET }]],
            "dataDir": dir.join("host-local").display().to_string(),
        },
    })];
    if portmap {
        let portmap = trellis
            .plugins
            .iter()
            .find(|p| p.plugin_type == "portmap")
            .with_context(|| format!("{} chains no portmap", trellis.path.display()))?;
        plugins.push(Value::Object(portmap.raw.clone()));
    }
    let list = json!({
        "cniVersion": trellis.cni_version,
        "name": REF_NETWORK,
        "plugins": plugins,
    });
    write_list(dir, REF_NETWORK, &list)
}

/// The node's installed list with only its first plugin (`trellis`), in `dir`.
fn trellis_alone(installed: &NetworkConfigList, dir: &Path) -> anyhow::Result<NetworkConfigList> {
    let first = installed
        .plugins
        .first()
        .filter(|p| p.plugin_type == "trellis")
        .with_context(|| format!("{} does not start with trellis", installed.path.display()))?;
    let list = json!({
        "cniVersion": installed.cni_version,
        "name": installed.name,
        "plugins": [Value::Object(first.raw.clone())],
    });
    write_list(dir, "trellis-alone", &list)
}

fn write_list(dir: &Path, name: &str, list: &Value) -> anyhow::Result<NetworkConfigList> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("{name}.conflist"));
    let text = serde_json::to_vec_pretty(list)?;
    std::fs::write(&path, &text).with_context(|| format!("write {}", path.display()))?;
    Ok(NetworkConfigList::parse(&path, &text)?)
}

/// Waits until trellis-node has finished every answered DEL (`trellis_node_endpoints_deleting`
/// is 0).
async fn settle(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = metrics(port).await?;
        let pending = text
            .lines()
            .find_map(|l| l.strip_prefix("trellis_node_endpoints_deleting "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .context("trellis-node's /metrics has no trellis_node_endpoints_deleting")?;
        if pending == 0.0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("trellis-node still deleting {pending} endpoints after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Pods per remote shard (a node's pods).
const REMOTE_PER_NODE: usize = 110;
/// Where the remote pods' addresses are: a pool of its own, disabled (no node gets blocks
/// from it; its range still counts as where pod addresses are).
const REMOTE_POOL: &str = "trellis-bench-remote";
const REMOTE_CIDR: &str = "10.128.0.0/10";

/// Publishes `n` pods of other nodes as `NodeEndpoints` shards of [`REMOTE_PER_NODE`] pods,
/// then waits until the node's IP cache holds them all (its
/// `trellis_node_policy_ipcache_entries`). Not timed as part of the bench.
async fn publish_remote_pods(
    client: &Client,
    port: u16,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let pool: trellis_api::v1alpha1::IPPool = serde_json::from_value(json!({
        "apiVersion": "network.trellis.dev/v1alpha1",
        "kind": "IPPool",
        "metadata": {"name": REMOTE_POOL},
        "spec": {"cidr": REMOTE_CIDR, "blockSize": 26, "disabled": true},
    }))
    .context("the remote pods' IPPool")?;
    samples::apply_ippools(client, &[pool], FIELD_MANAGER).await?;
    let before = ipcache_entries(port).await?;
    let api = kube::Api::<trellis_api::v1alpha1::NodeEndpoints>::all(client.clone());
    let shards = n.div_ceil(REMOTE_PER_NODE);
    let mut writes = futures::stream::iter((0..shards).map(|k| {
        let api = api.clone();
        async move {
            let first = k * REMOTE_PER_NODE;
            let endpoints: Vec<Value> = (first..n.min(first + REMOTE_PER_NODE))
                .map(|i| {
                    // 10.128.0.0 + i + 1: inside 10.128.0.0/10 for up to 4M pods.
                    let a = 0x0a80_0000u32 + u32::try_from(i + 1).unwrap_or(u32::MAX);
                    json!({
                        "namespace": "trellis-bench-remote",
                        "name": format!("r-{i}"),
                        "addresses": [std::net::Ipv4Addr::from(a).to_string()],
                        "identity": 0x0010_0000 + i % 500,
                    })
                })
                .collect();
            let name = format!("trellis-bench-remote-{k:05}");
            let body = json!({
                "apiVersion": "network.trellis.dev/v1alpha1",
                "kind": "NodeEndpoints",
                "metadata": {"name": name},
                "spec": {"endpoints": endpoints},
            });
            api.patch(
                &name,
                &kube::api::PatchParams::apply(FIELD_MANAGER).force(),
                &kube::api::Patch::Apply(&body),
            )
            .await
            .with_context(|| format!("apply NodeEndpoints {name}"))
        }
    }))
    .buffer_unordered(16);
    while let Some(written) = writes.next().await {
        written?;
    }
    let written = started.elapsed();
    let deadline = Instant::now() + timeout;
    loop {
        let have = ipcache_entries(port).await?;
        if have >= before + n as f64 {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "the node's IP cache holds {have} entries after {timeout:?}, want {before} + {n}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{n} remote pods in {shards} NodeEndpoints shards written in {:.1}s, in the node's IP \
         cache {:.1}s later (not timed)",
        written.as_secs_f64(),
        (started.elapsed() - written).as_secs_f64()
    );
    Ok(())
}

/// `trellis_node_policy_ipcache_entries` of the agent.
async fn ipcache_entries(port: u16) -> anyhow::Result<f64> {
    let text = metrics(port).await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("trellis_node_policy_ipcache_entries "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Creates Pod `name` of the bench's namespace, bound to the node; its UID.
async fn pod_object(client: &Client, name: &str) -> anyhow::Result<String> {
    let created =
        kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), POD_NAMESPACE)
            .create(
                &kube::api::PostParams::default(),
                &PodSpec::new(name, NODE).in_namespace(POD_NAMESPACE).pod(),
            )
            .await
            .with_context(|| format!("create Pod {POD_NAMESPACE}/{name}"))?;
    created.metadata.uid.context("a created Pod has a UID")
}

/// Pod `i` of the network tagged `net`: its sandbox record (namespace
/// `trellis-<tag>-pod_trellis-bench_<net>-<i>`, recorded so that the sandbox's teardown
/// deletes it whatever happens) and a runtime's container ID.
fn bench_pod(tag: &str, net: char, i: usize) -> anyhow::Result<Pod> {
    let name = format!("{net}-{:03}", i + 1);
    Ok(Pod {
        netns: datapath::pod_netns_name(tag, POD_NAMESPACE, &name),
        namespace: POD_NAMESPACE.into(),
        name,
        node: NODE.into(),
        container_id: cni_runtime::random_container_id().context("a container ID")?,
        ifname: cni_runtime::DEFAULT_IFNAME.into(),
        uid: None,
        network: None,
        ips: Vec::new(),
    })
}

/// CNI ADD through the runtime; the pod must come back with an address.
async fn add(runtime: &Runtime, net: &Net, rt: &RuntimeConf) -> anyhow::Result<Vec<IpAddr>> {
    let result = runtime
        .add(&net.list, rt)
        .await
        .with_context(|| format!("{}: ADD of {}", net.label, rt.container_id))?;
    let ips = result.pod_ips();
    if ips.is_empty() {
        bail!("{}: ADD gave no address: {}", net.label, result.raw);
    }
    Ok(ips)
}

/// `trellis_node_cni_request_duration_seconds` of the agent: per command, (sum in seconds,
/// count).
async fn server_times(port: u16) -> anyhow::Result<BTreeMap<String, (f64, f64)>> {
    histogram(port, "trellis_node_cni_request_duration_seconds", "command").await
}

/// The steps of trellis-node's ADDs (`trellis_node_cni_add_phase_duration_seconds`): per
/// step, (sum in seconds, count).
async fn add_steps(port: u16) -> anyhow::Result<BTreeMap<String, (f64, f64)>> {
    histogram(port, "trellis_node_cni_add_phase_duration_seconds", "phase").await
}

/// Histogram `name` of the agent: per value of its label `label`, (sum, count).
async fn histogram(
    port: u16,
    name: &str,
    label: &str,
) -> anyhow::Result<BTreeMap<String, (f64, f64)>> {
    let text = metrics(port).await?;
    let key = format!("{label}=\"");
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in text.lines() {
        let (is_sum, rest) = if let Some(rest) = line.strip_prefix(&format!("{name}_sum{{")) {
            (true, rest)
        } else if let Some(rest) = line.strip_prefix(&format!("{name}_count{{")) {
            (false, rest)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let Some(command) = labels
            .split(',')
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|c| c.strip_suffix('"'))
        else {
            continue;
        };
        let value: f64 = value.trim().parse().unwrap_or(f64::NAN);
        let entry = out.entry(command.to_string()).or_default();
        if is_sum {
            entry.0 = value;
        } else {
            entry.1 = value;
        }
    }
    Ok(out)
}

/// `trellis_node_endpoints`: the node's Ready endpoints.
async fn endpoint_count(port: u16) -> anyhow::Result<f64> {
    let text = metrics(port).await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("trellis_node_endpoints "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN))
}

/// `GET /metrics` of the agent on 127.0.0.1.
async fn metrics(port: u16) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connect to the agent's metrics on port {port}"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

/// The agent's mean time per `command` request between two scrapes (ms); NaN without any.
fn per_request(
    before: &BTreeMap<String, (f64, f64)>,
    after: &BTreeMap<String, (f64, f64)>,
    command: &str,
) -> f64 {
    let (s0, c0) = before.get(command).copied().unwrap_or_default();
    let (s1, c1) = after.get(command).copied().unwrap_or_default();
    if c1 > c0 {
        (s1 - s0) / (c1 - c0) * 1e3
    } else {
        f64::NAN
    }
}

/// Where each network's time goes, measured on pods of its own.
struct Profile {
    pods: usize,
    /// Per network, per plugin (in list order): ADD and DEL times of that plugin alone.
    plugins: [Vec<(String, Times)>; 2],
    /// Per network: the whole ADD / DEL through `Runtime::add` / `del` on the same pods
    /// (a second round, after the per-plugin one).
    whole: [Times; 2],
    /// Per plugin type: `VERSION` (start, answer, exit; no work).
    version: Vec<(String, Vec<f64>)>,
    /// `nsenter --net=<node netns> -- true`.
    nsenter: Vec<f64>,
    /// `true`, spawned the same way without nsenter.
    spawn: Vec<f64>,
    /// `trellis` STATUS: start, configuration, a socket round trip, exit.
    status: Vec<f64>,
    /// trellis-node's mean time per ADD and per DEL of the per-plugin round (ms).
    server_add: f64,
    server_del: f64,
}

async fn profile_phase(
    runtime: &Runtime,
    nets: &[Net; 2],
    slots: &[Vec<Pod>; 2],
    pods: std::ops::Range<usize>,
    port: u16,
    node_netns: &Path,
) -> anyhow::Result<Profile> {
    let count = pods.len();
    let mut plugins: [Vec<(String, Times)>; 2] = [0, 1].map(|k| {
        nets[k]
            .list
            .plugins
            .iter()
            .map(|p| (p.plugin_type.clone(), Times::default()))
            .collect()
    });
    // Round 1: every plugin of the chain on its own, as Runtime::add / del run them.
    let before = server_times(port).await?;
    let mut results: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    for i in pods.clone() {
        for k in order(i) {
            let rt = slots[k][i].runtime_conf();
            let list = &nets[k].list;
            let mut prev: Option<Value> = None;
            for (j, plugin) in list.plugins.iter().enumerate() {
                let stdin = cni_runtime::plugin_stdin(list, plugin, prev.as_ref(), Some(&rt));
                let t0 = Instant::now();
                let out = runtime
                    .exec(&plugin.plugin_type, Command::Add, &stdin, Some(&rt))
                    .await
                    .with_context(|| format!("profile: {} ADD", plugin.plugin_type))?;
                plugins[k][j].1.add.push(ms(t0));
                prev = Some(serde_json::from_slice(&out).with_context(|| {
                    format!("profile: {} ADD printed no JSON", plugin.plugin_type)
                })?);
            }
            results[k].push(prev.unwrap_or(Value::Null));
        }
    }
    let middle = server_times(port).await?;
    for (n, i) in pods.clone().enumerate() {
        for k in order(i) {
            let rt = slots[k][i].runtime_conf();
            let list = &nets[k].list;
            for (j, plugin) in list.plugins.iter().enumerate().rev() {
                let stdin =
                    cni_runtime::plugin_stdin(list, plugin, Some(&results[k][n]), Some(&rt));
                let t0 = Instant::now();
                runtime
                    .exec(&plugin.plugin_type, Command::Del, &stdin, Some(&rt))
                    .await
                    .with_context(|| format!("profile: {} DEL", plugin.plugin_type))?;
                plugins[k][j].1.del.push(ms(t0));
            }
            if k == 0 {
                settle(port, SETTLE_TIMEOUT).await?;
            }
        }
    }
    let after = server_times(port).await?;

    // Round 2: the same pods through the whole runtime again, for the totals to compare.
    let mut whole = [Times::default(), Times::default()];
    for i in pods.clone() {
        for k in order(i) {
            let rt = slots[k][i].runtime_conf();
            let t0 = Instant::now();
            add(runtime, &nets[k], &rt).await?;
            whole[k].add.push(ms(t0));
        }
    }
    for i in pods.clone() {
        for k in order(i) {
            let rt = slots[k][i].runtime_conf();
            let t0 = Instant::now();
            runtime.del(&nets[k].list, &rt).await?;
            whole[k].del.push(ms(t0));
            if k == 0 {
                settle(port, SETTLE_TIMEOUT).await?;
            }
        }
    }

    // Starting a plugin: VERSION of each type, and nsenter alone, taking turns.
    let mut types: Vec<String> = nets
        .iter()
        .flat_map(|n| n.list.plugins.iter().map(|p| p.plugin_type.clone()))
        .collect();
    types.push("host-local".into());
    types.dedup();
    types.sort();
    types.dedup();
    let mut version: Vec<(String, Vec<f64>)> =
        types.iter().map(|t| (t.clone(), Vec::new())).collect();
    let (mut nsenter, mut spawn, mut status) = (Vec::new(), Vec::new(), Vec::new());
    let trellis_plugin = nets[0]
        .list
        .plugins
        .iter()
        .find(|p| p.plugin_type == "trellis")
        .context("the node's conflist has no trellis plugin")?;
    let status_stdin = cni_runtime::plugin_stdin(&nets[0].list, trellis_plugin, None, None);
    let mut stdin = Map::new();
    stdin.insert(
        "cniVersion".into(),
        Value::String(nets[0].list.cni_version.clone()),
    );
    for _ in 0..count {
        for (t, samples) in &mut version {
            let t0 = Instant::now();
            runtime
                .exec(t, Command::Version, &stdin, None)
                .await
                .with_context(|| format!("profile: {t} VERSION"))?;
            samples.push(ms(t0));
        }
        // STATUS: a whole socket round trip with (next to) nothing to do in trellis-node.
        let t0 = Instant::now();
        runtime
            .exec("trellis", Command::Status, &status_stdin, None)
            .await
            .context("profile: trellis STATUS")?;
        status.push(ms(t0));
        let net = format!("--net={}", node_netns.display());
        nsenter.push(time_command("nsenter", &[&net, "--", "true"]).await?);
        spawn.push(time_command("true", &[]).await?);
    }

    Ok(Profile {
        pods: count,
        plugins,
        whole,
        version,
        nsenter,
        spawn,
        status,
        server_add: per_request(&before, &middle, "add"),
        server_del: per_request(&middle, &after, "del"),
    })
}

/// Run `program args` with piped stdio, as `Runtime::exec` runs a plugin; ms until it exited.
async fn time_command(program: &str, args: &[&str]) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("run {program}"))?;
    let took = ms(t0);
    if !out.status.success() {
        bail!(
            "{program} {} exited with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn median(v: &[f64]) -> f64 {
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    quantile(&sorted, 0.5)
}

/// `p50 … p99 … mean …` of `v`.
fn line(v: &[f64]) -> String {
    let s = Stats::of(v.to_vec());
    format!(
        "p50 {:>6.1} ms   p99 {:>6.1} ms   mean {:>6.1} ms   max {:>6.1} ms",
        s.p50,
        s.p99,
        mean(v),
        s.max
    )
}

struct Report {
    /// Whether both chains had portmap (as installed) or not (the plugins alone).
    portmap: bool,
    /// Pods on other nodes the node's policy carried (`--remote-pods`).
    remote_pods: u32,
    pods: usize,
    warmup: usize,
    /// trellis, reference.
    times: [Times; 2],
    /// trellis-node's own mean time per ADD / DEL over the measured phases (ms).
    server_add: f64,
    server_del: f64,
    /// trellis-node's mean time per step of an ADD over the ADD phase (ms), by step.
    add_steps: BTreeMap<String, f64>,
    agent_pid: Option<u32>,
    /// trellis-node's CPU time (ms) over the ADD phase and over the DEL phase.
    agent_cpu: Option<(f64, f64)>,
    /// The agent's reconcile loop over the ADD phase and over the DEL phase.
    agent_loop: [Counters; 2],
    profile: Option<Profile>,
}

impl Report {
    fn print(&self) {
        let [t, r] = &self.times;
        let (tb, rb) = (t.both(), r.both());
        println!(
            "{} pods per network on one node ({} warm-up pods each not counted; {} pods on other \
             nodes), ADDs in turns, then DELs in turns; through cni_runtime::Runtime in the node's \
             namespace:",
            self.pods, self.warmup, self.remote_pods
        );
        let chain = if self.portmap { " + portmap" } else { "" };
        for (label, times, both) in [
            (format!("trellis{chain}"), t, &tb),
            (format!("bridge + host-local{chain}"), r, &rb),
        ] {
            println!("  {label}");
            println!("    ADD        {}", line(&times.add));
            println!("    DEL        {}", line(&times.del));
            println!("    ADD + DEL  {}", line(both));
        }
        let (ts, rs) = (Stats::of(tb.clone()), Stats::of(rb.clone()));
        let ratio = |a: f64, b: f64| a / b;
        let (r50, r99, rmean) = (
            ratio(ts.p50, rs.p50),
            ratio(ts.p99, rs.p99),
            ratio(mean(&tb), mean(&rb)),
        );
        let (ta, ra) = (Stats::of(t.add.clone()), Stats::of(r.add.clone()));
        let (td, rd) = (Stats::of(t.del.clone()), Stats::of(r.del.clone()));
        println!(
            "trellis / reference, ADD + DEL per pod: p50 {r50:.2}x   p99 {r99:.2}x   mean \
             {rmean:.2}x   (target <= 0.50x)"
        );
        println!(
            "  ADD alone: p50 {:.2}x p99 {:.2}x; DEL alone: p50 {:.2}x p99 {:.2}x",
            ta.p50 / ra.p50,
            ta.p99 / ra.p99,
            td.p50 / rd.p50,
            td.p99 / rd.p99
        );
        println!(
            "trellis-node's own time per request (its /metrics, mean): ADD {:.2} ms, DEL {:.2} ms{}",
            self.server_add,
            self.server_del,
            self.agent_pid
                .map(|p| format!(" (pid {p})"))
                .unwrap_or_default()
        );
        // In the order an ADD takes them.
        let order = [
            "prepare",
            "allocate",
            "wire",
            "identity",
            "policy_sync",
            "attach",
            "record",
        ];
        let steps: Vec<String> = order
            .iter()
            .filter_map(|s| Some(format!("{s} {:.2}", self.add_steps.get(*s)?)))
            .collect();
        println!("  its ADD by step (mean, ms): {}", steps.join(", "));
        if let Some((add, del)) = self.agent_cpu {
            let n = self.pods as f64;
            println!(
                "trellis-node's CPU time (reconciler included): {:.1} ms per pod in the ADD phase, \
                 {:.1} ms per pod in the DEL phase (one Trellis and one reference op each)",
                add / n,
                del / n
            );
        }
        for (phase, c) in ["ADD", "DEL"].iter().zip(&self.agent_loop) {
            let n = self.pods as f64;
            println!(
                "trellis-node's reconcile loop in the {phase} phase, per pod: {:.1} netlink \
                 notifications, {:.2} reconciles ({:.1} ms each, each a full dump of the node's \
                 links, addresses, routes, neighbours and FDB), {:.2} NetworkStatus writes",
                c.netlink_events / n,
                c.reconciles / n,
                if c.reconciles > 0.0 {
                    c.reconcile_seconds / c.reconciles * 1e3
                } else {
                    f64::NAN
                },
                c.status_writes / n
            );
        }
        let quarter = (self.pods / 4).max(1);
        let ends = |v: &[f64]| {
            (
                median(&v[..quarter.min(v.len())]),
                median(&v[v.len().saturating_sub(quarter)..]),
            )
        };
        let ((tf, tl), (rf, rl)) = (ends(&t.add), ends(&r.add));
        println!(
            "ADD p50 of the first / last {quarter} pods (the node filling up): trellis {tf:.1} / \
             {tl:.1} ms, reference {rf:.1} / {rl:.1} ms"
        );
        if let Some(p) = &self.profile {
            p.print();
        }
        println!(
            "RESULT chain={} pods={} t_add_p50={:.1} t_add_p99={:.1} t_del_p50={:.1} t_del_p99={:.1} \
             t_p50={:.1} t_p99={:.1} t_mean={:.1} r_add_p50={:.1} r_add_p99={:.1} \
             r_del_p50={:.1} r_del_p99={:.1} r_p50={:.1} r_p99={:.1} r_mean={:.1} \
             ratio_p50={r50:.2} ratio_p99={r99:.2} ratio_mean={rmean:.2} server_add={:.2} \
             server_del={:.2} agent_cpu_add={:.1} agent_cpu_del={:.1} remote_pods={} \
             policy_sync={:.2}",
            if self.portmap { "installed" } else { "plugins" },
            self.pods,
            ta.p50,
            ta.p99,
            td.p50,
            td.p99,
            ts.p50,
            ts.p99,
            mean(&tb),
            ra.p50,
            ra.p99,
            rd.p50,
            rd.p99,
            rs.p50,
            rs.p99,
            mean(&rb),
            self.server_add,
            self.server_del,
            self.agent_cpu
                .map_or(f64::NAN, |(a, _)| a / self.pods as f64),
            self.agent_cpu
                .map_or(f64::NAN, |(_, d)| d / self.pods as f64),
            self.remote_pods,
            self.add_steps
                .get("policy_sync")
                .copied()
                .unwrap_or(f64::NAN),
        );
    }
}

impl Profile {
    fn print(&self) {
        println!(
            "profile: {} more pods per network, each plugin of the chain run on its own \
             (Runtime::exec, as Runtime::add/del run it), medians:",
            self.pods
        );
        for (k, label) in ["trellis", "reference"].iter().enumerate() {
            let whole = &self.whole[k];
            let plugins: Vec<String> = self.plugins[k]
                .iter()
                .map(|(name, t)| {
                    format!(
                        "{name} ADD {:.1} / DEL {:.1}",
                        median(&t.add),
                        median(&t.del)
                    )
                })
                .collect();
            println!(
                "  {label:<10} whole chain ADD {:.1} / DEL {:.1} ms; {}",
                median(&whole.add),
                median(&whole.del),
                plugins.join("; ")
            );
        }
        let version: Vec<String> = self
            .version
            .iter()
            .map(|(t, v)| format!("{t} {:.1}", median(v)))
            .collect();
        println!(
            "  starting a plugin (VERSION, through nsenter): {} ms; nsenter + true {:.1} ms; \
             true alone {:.1} ms",
            version.join(", "),
            median(&self.nsenter),
            median(&self.spawn)
        );
        println!(
            "  trellis STATUS (start + configuration + a socket round trip, next to nothing to \
             do) {:.1} ms",
            median(&self.status)
        );
        println!(
            "  trellis-node's own time (mean): ADD {:.2} ms, DEL {:.2} ms",
            self.server_add, self.server_del
        );
        let trellis_add = self.plugins[0]
            .iter()
            .find(|(n, _)| n == "trellis")
            .map_or(f64::NAN, |(_, t)| median(&t.add));
        let trellis_del = self.plugins[0]
            .iter()
            .find(|(n, _)| n == "trellis")
            .map_or(f64::NAN, |(_, t)| median(&t.del));
        let start = self
            .version
            .iter()
            .find(|(n, _)| n == "trellis")
            .map_or(f64::NAN, |(_, v)| median(v));
        println!(
            "  trellis plugin ADD {trellis_add:.1} ms = start {start:.1} + node {:.1} + the \
             rest (config, socket, result) {:.1}; DEL {trellis_del:.1} = start {start:.1} + \
             node {:.1} + rest {:.1}",
            self.server_add,
            trellis_add - start - self.server_add,
            self.server_del,
            trellis_del - start - self.server_del,
        );
    }
}
