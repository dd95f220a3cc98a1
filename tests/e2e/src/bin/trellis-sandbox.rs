//! `trellis-sandbox`: start, inspect and end a local Trellis sandbox.
//!
//! ```text
//! trellis-sandbox up          etcd + kube-apiserver + CRDs, namespace trellis-system, 3 Nodes
//!                             each with a network namespace on the underlay bridge and a
//!                             trellis-node, and trellis-operator, detached; a bpffs at
//!                             <state>/bpffs (a pin directory per node); prints the kubeconfig
//! trellis-sandbox status      are the recorded processes alive, do the /readyz and the agents'
//!                             /healthz say ok, do the node namespaces exist, is bpffs mounted
//! trellis-sandbox node add|del|list   add, remove and show nodes (namespace and agent too)
//! trellis-sandbox pod add|exec|del|list   pods: a Pod bound to a node, a namespace plugged in
//!                             by the node's CNI configuration as a runtime does, its status
//! trellis-sandbox cni status|check|gc     the runtime's other CNI operations
//! trellis-sandbox kubeconfig  path of the admin kubeconfig
//! trellis-sandbox down        CNI DEL for the remaining pods, end the recorded processes,
//!                             delete the recorded namespaces, unmount the bpffs, delete the
//!                             state dir
//! ```

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use trellis_e2e::{
    AgentOptions, ContainerPort, ControlPlane, NodeSpec, Nodes, OperatorOptions, PodName, PodSpec,
    Pods, Sandbox, StartOptions,
    controlplane::{DEFAULT_READY_TIMEOUT, repo_root},
    datapath::BRIDGE,
    nodes::{self, HOSTNAME_LABEL, MAX_NUMBERED},
    operator,
    pods::{self, DEFAULT_NAMESPACE},
    sandbox::{DEFAULT_STATE_DIR, ProcessState, ProcessStatus, STATE_DIR_ENV},
};

#[derive(Parser)]
#[command(
    name = "trellis-sandbox",
    version,
    about = "Local Trellis sandbox: a real kube-apiserver and etcd, nodes (network namespaces \
             running trellis-node) and trellis-operator"
)]
struct Cli {
    /// State directory: pid files, logs, certificates, kubeconfig, etcd data.
    #[arg(long, global = true, env = STATE_DIR_ENV, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the control plane (ending whatever an earlier run left in the state dir), install
    /// the CRDs, create namespace trellis-system, the underlay and the nodes, and start
    /// trellis-operator and a trellis-node per node.
    Up(UpArgs),
    /// End the recorded processes, delete the recorded network namespaces, unmount the
    /// sandbox's bpffs and delete the state directory.
    Down {
        /// Keep the state directory (logs, certificates, etcd data).
        #[arg(long)]
        keep_state: bool,
    },
    /// Show whether the recorded processes run and the apiserver is ready; exits non-zero if not.
    Status,
    /// Print the path of the admin kubeconfig.
    Kubeconfig,
    /// Add, remove or list the sandbox's nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Add, remove, list pods and run commands in them.
    #[command(subcommand)]
    Pod(PodCommand),
    /// Run CNI CHECK, STATUS or GC as the container runtime would.
    #[command(subcommand)]
    Cni(CniCommand),
}

#[derive(Subcommand)]
enum CniCommand {
    /// CNI STATUS of a node's network: can it serve ADD now?
    Status {
        /// Node name.
        node: String,
    },
    /// CNI CHECK of a pod against its node's network.
    Check {
        /// Pod name.
        name: String,
        #[arg(long, short = 'n', default_value = DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// CNI GC of a node's network, keeping the pods the sandbox records on it.
    Gc {
        /// Node name.
        node: String,
    },
}

#[derive(Subcommand)]
enum PodCommand {
    /// Add a pod: create its Namespace if missing and the Pod (bound to NODE), give it a
    /// network namespace, run CNI ADD with the node's conflist as a container runtime does,
    /// and write its status (Running, podIP) as a kubelet does. Waits for the node's network.
    Add {
        /// Pod name.
        name: String,
        /// The node to run it on.
        #[arg(long)]
        node: String,
        #[arg(long, short = 'n', default_value = DEFAULT_NAMESPACE)]
        namespace: String,
        /// Labels KEY=VALUE, comma-separated (repeatable).
        #[arg(long = "labels", visible_alias = "label", value_name = "K=V,...", value_delimiter = ',', value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// A container port NAME:PORT/PROTOCOL, name and protocol optional (TCP), e.g.
        /// http:80/TCP (repeatable).
        #[arg(long = "port", value_name = "[NAME:]PORT[/PROTO]")]
        ports: Vec<ContainerPort>,
        /// Seconds to wait for the node's network (its conflist).
        #[arg(long, default_value_t = pods::DEFAULT_NETWORK_READY_TIMEOUT.as_secs())]
        timeout: u64,
    },
    /// Run a command inside a pod's network namespace; exits with its status.
    Exec {
        /// Pod name.
        name: String,
        #[arg(long, short = 'n', default_value = DEFAULT_NAMESPACE)]
        namespace: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Remove a pod: CNI DEL, delete its network namespace and the Pod.
    #[command(visible_alias = "delete")]
    Del {
        /// Pod name.
        name: String,
        #[arg(long, short = 'n', default_value = DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Show every pod the sandbox made: namespace, name, node, address, network namespace.
    List,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Add a node: its network namespace on the underlay (if the sandbox has a datapath), the
    /// Node (created with the hostname label, addresses written through the status subresource
    /// as a kubelet does), and its trellis-node (if the sandbox runs agents).
    Add {
        /// Node name.
        name: String,
        /// InternalIP; repeat for dual-stack [default: the first free 192.0.2.x, x > 10].
        #[arg(long = "ip", value_name = "IP")]
        ips: Vec<IpAddr>,
        /// Extra label KEY=VALUE (repeatable); kubernetes.io/hostname=NAME is always set.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Remove a node: end its trellis-node, delete its namespace and bridge port, delete the
    /// Node and its NetworkStatus (what a cluster's garbage collector does); the operator then
    /// deletes its NodeNetwork.
    #[command(visible_alias = "delete")]
    Del {
        /// Node name.
        name: String,
    },
    /// Show every Node with its InternalIPs, the pod CIDRs of its NodeNetwork, its network
    /// namespace and whether its agent runs.
    List,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[derive(Args)]
struct UpArgs {
    /// Repository root (for tests/e2e/tools/build.sh and config/crd).
    #[arg(long, default_value_os_t = repo_root())]
    repo: PathBuf,
    /// Directory of CRD YAML to install [default: the repository's config/crd].
    #[arg(long)]
    crd_dir: Option<PathBuf>,
    /// Install no CRDs (and so run no operator, which needs them).
    #[arg(long, conflicts_with = "crd_dir")]
    no_crds: bool,
    /// Number of nodes to register: trellis-node-1..N at 192.0.2.11.. (0 for none).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(0..=MAX_NUMBERED as i64))]
    nodes: u8,
    /// Do not start trellis-operator (binary: $TRELLIS_OPERATOR, else built with cargo).
    #[arg(long)]
    no_operator: bool,
    /// Nodes are Node objects only: no underlay, no network namespaces, no trellis-node
    /// (the datapath needs root).
    #[arg(long)]
    no_datapath: bool,
    /// Give nodes their network namespaces but start no trellis-node (binary: $TRELLIS_NODE,
    /// else built with cargo).
    #[arg(long, conflicts_with = "no_datapath")]
    no_agents: bool,
    /// Seconds to wait for each component to become ready.
    #[arg(long, default_value_t = DEFAULT_READY_TIMEOUT.as_secs())]
    timeout: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(e) => {
            // Printed by hand: the chain matters (it carries process log tails), a backtrace
            // of this binary does not.
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<ExitCode> {
    // kube logs every failed readiness probe as an error; our errors say it better.
    trellis_e2e::support::init_logging("warn,trellis_e2e=info,kube_client=off");
    let cli = Cli::parse();
    let sandbox = Sandbox::new(&cli.state_dir);
    match cli.command {
        Command::Up(args) => up(&cli.state_dir, args).await,
        Command::Down { keep_state } => down(&sandbox, keep_state).await,
        Command::Status => status(&sandbox).await,
        Command::Node(cmd) => node(&sandbox, cmd).await,
        Command::Pod(cmd) => pod(&sandbox, cmd).await,
        Command::Cni(cmd) => cni(&sandbox, cmd).await,
        Command::Kubeconfig => {
            let path = sandbox.kubeconfig_path();
            if !path.is_file() {
                bail!(
                    "no kubeconfig at {} (run `trellis-sandbox up`)",
                    path.display()
                );
            }
            println!("{}", path.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn up(state_dir: &std::path::Path, args: UpArgs) -> anyhow::Result<ExitCode> {
    let crd_dir =
        (!args.no_crds).then(|| args.crd_dir.unwrap_or_else(|| args.repo.join("config/crd")));
    if args.no_crds && !args.no_operator {
        eprintln!("note: --no-crds: not starting trellis-operator, which needs the CRDs");
    }
    if args.no_crds && !args.no_datapath && !args.no_agents {
        eprintln!("note: --no-crds: not starting trellis-node, which needs the CRDs");
    }
    let run_operator = !args.no_crds && !args.no_operator;
    let run_agents = !args.no_crds && !args.no_datapath && !args.no_agents;
    let opts = StartOptions {
        crd_dir: crd_dir.clone(),
        repo_root: args.repo,
        ready_timeout: Duration::from_secs(args.timeout),
        system_namespace: true,
        nodes: nodes::numbered(usize::from(args.nodes))?,
        operator: run_operator.then(OperatorOptions::default),
        datapath: !args.no_datapath,
        agents: run_agents.then(AgentOptions::default),
        ..StartOptions::new(state_dir)
    };
    let node_names: Vec<String> = opts.nodes.iter().map(|n| n.name.clone()).collect();
    let cp = ControlPlane::start(opts)
        .await
        .with_context(|| format!("starting the sandbox in {}", state_dir.display()))?;

    for ended in cp.ended_stale() {
        eprintln!("cleaned up from an earlier run: {ended}");
    }
    for netns in cp.deleted_stale_namespaces() {
        eprintln!("cleaned up from an earlier run: network namespace {netns}");
    }
    let phases: Vec<String> = cp
        .timings()
        .iter()
        .map(|p| format!("{} {:.2}s", p.name, p.took.as_secs_f64()))
        .collect();
    eprintln!("phases: {}", phases.join(", "));
    match (&crd_dir, cp.crds()) {
        (None, _) => {}
        (Some(dir), []) => eprintln!("note: no CRDs found in {} (none installed)", dir.display()),
        (Some(_), names) => eprintln!("CRDs established: {}", names.join(", ")),
    }
    eprintln!("apiserver: {}", cp.endpoints().apiserver_url);
    if node_names.is_empty() {
        eprintln!("nodes: none");
    } else {
        eprintln!("nodes: {}", node_names.join(", "));
    }
    let nodes = cp.nodes();
    if let Some(config) = nodes.datapath_config()? {
        eprintln!(
            "underlay: bridge {BRIDGE} in network namespace {}",
            config.underlay_netns
        );
        eprintln!(
            "bpffs: {} (a pin directory per node)",
            cp.sandbox().bpffs_dir().display()
        );
        for name in &node_names {
            eprintln!("  {}", describe_node(&nodes, name)?);
        }
    }
    if let (Some(record), Some(port)) = (cp.operator(), cp.endpoints().operator_metrics_port) {
        eprintln!(
            "operator: pid {}, ready; metrics http://127.0.0.1:{port}/metrics, log {}",
            record.pid,
            cp.sandbox().log_path(operator::NAME).display()
        );
    }

    let kubeconfig = cp.kubeconfig_path();
    // The processes outlive this command; `down` ends them.
    cp.detach();
    println!("{}", kubeconfig.display());
    println!(
        "export KUBECONFIG={}; kubectl get nodes",
        kubeconfig.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `node <name>: netns <ns>, eth0 <ip>/24, agent pid <pid> (metrics http://…)`.
fn describe_node(nodes: &Nodes, name: &str) -> anyhow::Result<String> {
    let dp = nodes.datapath(name)?;
    let agent = match (nodes.agent(name)?, dp.agent_metrics_port) {
        (Some(record), Some(port)) => format!(
            "agent pid {}, metrics http://127.0.0.1:{port}/metrics, log {}",
            record.pid,
            nodes.sandbox().log_path(&record.name).display()
        ),
        (Some(record), None) => format!("agent pid {}", record.pid),
        (None, _) => "no agent".into(),
    };
    Ok(format!(
        "node {name}: network namespace {}, eth0 {} (bridge port {}), {agent}",
        dp.netns,
        dp.cidr(),
        dp.bridge_port
    ))
}

async fn down(sandbox: &Sandbox, keep_state: bool) -> anyhow::Result<ExitCode> {
    let context = || format!("ending the sandbox in {}", sandbox.dir().display());
    // Pods' CNI DEL first, while their nodes' agents still run (best effort: their namespaces
    // go below whatever happens).
    if sandbox.dir().join(trellis_e2e::sandbox::MARKER).is_file() {
        match pods::release_recorded(sandbox).await {
            Ok(failed) => {
                for line in failed {
                    eprintln!("warning: CNI DEL failed for pod {line}");
                }
            }
            Err(e) => eprintln!("warning: releasing the pods: {e}"),
        }
    }
    // Processes first (a running agent keeps its namespace alive), then namespaces, then the
    // state directory.
    let ended = sandbox.end_recorded_processes().with_context(context)?;
    let namespaces = sandbox.delete_recorded_namespaces().with_context(context)?;
    let bpffs = sandbox.unmount_bpffs().with_context(context)?;
    sandbox.down(keep_state).with_context(context)?;
    if ended.is_empty() {
        eprintln!("no processes recorded in {}", sandbox.dir().display());
    }
    for e in &ended {
        eprintln!("{e}");
    }
    for netns in &namespaces {
        eprintln!("deleted network namespace {netns}");
    }
    if bpffs > 0 {
        eprintln!("unmounted bpffs {}", sandbox.bpffs_dir().display());
    }
    if keep_state {
        eprintln!("kept {}", sandbox.dir().display());
    } else {
        eprintln!("removed {}", sandbox.dir().display());
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(sandbox: &Sandbox) -> anyhow::Result<ExitCode> {
    let status = sandbox.status().await?;
    println!("state dir:  {}", status.dir.display());
    if status.processes.is_empty() {
        println!("processes:  none recorded");
    }
    let width = status
        .processes
        .iter()
        .map(|p| p.record.name.len())
        .max()
        .unwrap_or(0)
        .max(16);
    for p in &status.processes {
        println!(
            "{:<width$} pid {:<8} {}",
            p.record.name,
            p.record.pid,
            state_text(p.state)
        );
    }
    if let Some(ep) = &status.endpoints {
        println!("apiserver:  {}", ep.apiserver_url);
        println!("etcd:       {}", ep.etcd_client_url);
        if let Some(port) = ep.operator_metrics_port {
            println!("operator:   http://127.0.0.1:{port}/metrics");
        }
    }
    match &status.readyz {
        Ok(body) => println!("readyz:     {}", body.trim()),
        Err(e) => println!("readyz:     error: {e}"),
    }
    match &status.operator_readyz {
        None => {}
        Some(Ok(body)) => println!("operator readyz: {}", body.trim()),
        Some(Err(e)) => println!("operator readyz: error: {e}"),
    }
    if let Some(config) = &status.datapath {
        let present = |netns: &str| {
            if std::path::Path::new("/run/netns").join(netns).exists() {
                "present"
            } else {
                "MISSING"
            }
        };
        println!(
            "underlay:   network namespace {} ({}), bridge {BRIDGE}",
            config.underlay_netns,
            present(&config.underlay_netns)
        );
        println!(
            "bpffs:      {} ({})",
            sandbox.bpffs_dir().display(),
            if status.bpffs_mounted == Some(true) {
                "mounted"
            } else {
                "NOT MOUNTED"
            }
        );
        for n in &status.nodes {
            let agent = match (&n.agent, &n.agent_healthz) {
                (None, _) if config.agents => "agent: none recorded".to_string(),
                (None, _) => "agent: none (started without agents)".to_string(),
                (Some(p), healthz) => {
                    let port = n
                        .node
                        .agent_metrics_port
                        .map(|port| format!(", metrics http://127.0.0.1:{port}/metrics"))
                        .unwrap_or_default();
                    let healthz = match healthz {
                        Some(Ok(_)) => ", healthz ok".to_string(),
                        Some(Err(e)) => format!(", healthz error: {e}"),
                        None => String::new(),
                    };
                    format!(
                        "agent: pid {} {}{healthz}{port}",
                        p.record.pid,
                        state_text(p.state)
                    )
                }
            };
            println!(
                "node {}: network namespace {} ({}), eth0 {}; {agent}",
                n.node.node,
                n.node.netns,
                if n.netns_present {
                    "present"
                } else {
                    "MISSING"
                },
                n.node.cidr(),
            );
        }
    }
    if status.healthy() {
        println!("healthy");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("NOT healthy");
        Ok(ExitCode::FAILURE)
    }
}

fn state_text(state: ProcessState) -> &'static str {
    match state {
        ProcessState::Running => "running",
        ProcessState::Gone => "not running",
        ProcessState::PidReused => "not running (pid reused by another program)",
    }
}

async fn node(sandbox: &Sandbox, cmd: NodeCommand) -> anyhow::Result<ExitCode> {
    let nodes = Nodes::connect(sandbox).await?;
    match cmd {
        NodeCommand::Add { name, ips, labels } => {
            let ips = if ips.is_empty() {
                vec![IpAddr::V4(nodes.next_free_address().await?)]
            } else {
                ips
            };
            let mut spec = NodeSpec {
                internal_ips: ips.clone(),
                ..NodeSpec::new(&name, ips[0])
            };
            for (k, v) in labels {
                if k == HOSTNAME_LABEL {
                    bail!("{HOSTNAME_LABEL} is always the node name");
                }
                spec = spec.with_label(k, v);
            }
            nodes.add(&spec).await?;
            let ips: Vec<String> = spec.internal_ips.iter().map(ToString::to_string).collect();
            eprintln!("added node {name} ({})", ips.join(", "));
            if nodes.datapath_config()?.is_some() {
                eprintln!("{}", describe_node(&nodes, &name)?);
            }
        }
        NodeCommand::Del { name } => {
            let netns = nodes.datapath(&name).ok().map(|dp| dp.netns);
            if !nodes.remove(&name).await? {
                bail!("no node {name}");
            }
            match netns {
                Some(netns) => eprintln!("deleted node {name} and its network namespace {netns}"),
                None => eprintln!("deleted node {name}"),
            }
        }
        NodeCommand::List => print_nodes(&nodes.list().await?),
    }
    Ok(ExitCode::SUCCESS)
}

async fn pod(sandbox: &Sandbox, cmd: PodCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PodCommand::List => {
            let pods = trellis_e2e::datapath::recorded_pods(sandbox)?;
            let rows: Vec<[String; 5]> = pods
                .iter()
                .map(|p| {
                    let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
                    [
                        p.namespace.clone(),
                        p.name.clone(),
                        p.node.clone(),
                        if ips.is_empty() {
                            "-".into()
                        } else {
                            ips.join(",")
                        },
                        p.netns.clone(),
                    ]
                })
                .collect();
            print_table(["NAMESPACE", "NAME", "NODE", "IP", "NETNS"], &rows);
            Ok(ExitCode::SUCCESS)
        }
        PodCommand::Exec {
            name,
            namespace,
            command,
        } => {
            let key = PodName::new(&namespace, &name);
            let Some(pod) = pods::recorded(sandbox, &key)? else {
                bail!("no pod {key} in the sandbox in {}", sandbox.dir().display());
            };
            let status = std::process::Command::new("ip")
                .args(["netns", "exec", &pod.netns])
                .args(&command)
                .status()
                .with_context(|| format!("running `ip netns exec {}`", pod.netns))?;
            Ok(match status.code() {
                Some(0) => ExitCode::SUCCESS,
                Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                None => ExitCode::FAILURE,
            })
        }
        PodCommand::Add {
            name,
            node,
            namespace,
            labels,
            ports,
            timeout,
        } => {
            let pods = Pods::connect(sandbox)
                .await?
                .with_network_ready_timeout(Duration::from_secs(timeout));
            let mut spec = PodSpec::new(&name, &node).in_namespace(&namespace);
            for (k, v) in labels {
                spec = spec.with_label(k, v);
            }
            for port in ports {
                spec = spec.with_port(port);
            }
            let pod = pods.add(&spec).await?;
            let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
            eprintln!(
                "added pod {} on {} ({}), network namespace {}, container {}",
                pod.key(),
                pod.node,
                ips.join(", "),
                pod.netns,
                pod.container_id
            );
            Ok(ExitCode::SUCCESS)
        }
        PodCommand::Del { name, namespace } => {
            let pods = Pods::connect(sandbox).await?;
            let key = PodName::new(&namespace, &name);
            if !pods.remove(&key).await? {
                bail!("no pod {key}");
            }
            eprintln!("deleted pod {key}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn cni(sandbox: &Sandbox, cmd: CniCommand) -> anyhow::Result<ExitCode> {
    let pods = Pods::connect(sandbox).await?;
    match cmd {
        CniCommand::Status { node } => {
            pods.status(&node).await?;
            eprintln!("node {node}: CNI STATUS ok");
        }
        CniCommand::Check { name, namespace } => {
            let key = PodName::new(&namespace, &name);
            pods.check(&key).await?;
            eprintln!("pod {key}: CNI CHECK ok");
        }
        CniCommand::Gc { node } => {
            pods.gc(&node).await?;
            eprintln!("node {node}: CNI GC ok");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Left-aligned columns, three spaces apart.
fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let header = header.map(String::from);
    let mut widths = [0; N];
    for row in std::iter::once(&header).chain(rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

fn print_nodes(views: &[nodes::NodeView]) {
    let dash = || "-".to_string();
    let rows: Vec<[String; 6]> = views
        .iter()
        .map(|n| {
            let labels: BTreeMap<_, _> = n
                .labels
                .iter()
                .filter(|(k, _)| *k != HOSTNAME_LABEL)
                .collect();
            [
                n.name.clone(),
                Some(n.internal_ips.join(","))
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(dash),
                n.pod_cidrs
                    .as_ref()
                    .map(|c| c.join(","))
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "(none yet)".into()),
                n.netns.clone().unwrap_or_else(dash),
                match &n.agent {
                    None => dash(),
                    Some(ProcessStatus { record, state }) => match state {
                        ProcessState::Running => format!("running (pid {})", record.pid),
                        ProcessState::Gone | ProcessState::PidReused => "not-running".into(),
                    },
                },
                Some(
                    labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                )
                .filter(|s| !s.is_empty())
                .unwrap_or_else(dash),
            ]
        })
        .collect();
    print_table(
        [
            "NAME",
            "INTERNAL-IP",
            "POD-CIDRS",
            "NETNS",
            "AGENT",
            "LABELS",
        ],
        &rows,
    );
}
