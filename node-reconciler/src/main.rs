//! `trellis-node`: the only writer of one node's network state; see the
//! library crate for the flow.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::sync::watch;
use trellis_common::ops::{self, Health};
use trellis_common::process::{LogFormat, client, init_tracing, shutdown_signal, until_true};
use trellis_node::agent::{self, Config};
use trellis_node::endpoint::install::Install;
use trellis_node::endpoint::server::{self, Server};
use trellis_node::endpoint::{EndpointPolicy, Endpoints, NodeFacts};
use trellis_node::metrics::Metrics;
use trellis_node::netns::NetnsHandle;
use trellis_node::policy::engine::{Engine, Unavailable};

#[derive(Parser)]
#[command(
    name = "trellis-node",
    version,
    about = "Trellis node reconciler: converges one node's VXLAN device, routes, neighbour and FDB entries, and serves the CNI plugin (pod addresses, veths and their routes)"
)]
struct Args {
    /// The Node this process manages.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Manage the network namespace at this path (e.g. /run/netns/NAME)
    /// as the node's host namespace instead of our own; the local sandbox
    /// runs several nodes on one machine this way.
    #[arg(long)]
    host_netns: Option<PathBuf>,
    /// Kubeconfig to use; in-cluster configuration (or $KUBECONFIG) when unset.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9470")]
    metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Seconds between full reconciles when nothing changes (netlink
    /// notifications and NodeNetwork changes trigger one at once). At most
    /// 60, so the loop beats well within /healthz's 120 s.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60))]
    resync_seconds: u64,
    /// Pod endpoint state: address allocations and endpoint records. One
    /// trellis-node per directory (it is locked).
    #[arg(long, default_value = "/var/lib/trellis")]
    state_dir: PathBuf,
    /// Runtime directory; the CNI plugin's socket is <run-dir>/cni.sock
    /// (a socket path has at most 107 bytes).
    #[arg(long, default_value = "/run/trellis", value_parser = run_dir)]
    run_dir: PathBuf,
    /// Where the CNI network configuration (10-trellis.conflist) is installed.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Where the CNI plugin binary (trellis) is installed.
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The CNI plugin binary to install; default: `trellis` next to this
    /// executable.
    #[arg(long)]
    cni_plugin_source: Option<PathBuf>,
    /// Install neither the CNI plugin nor its configuration (tests, or a
    /// node where something else installs them).
    #[arg(long)]
    no_cni_install: bool,
    /// A directory on a bpffs where the policy maps and program links are
    /// pinned (in `<dir>/v1/`), so they outlive restarts and upgrades.
    #[arg(long, default_value = "/sys/fs/bpf/trellis")]
    bpffs_root: PathBuf,
}

/// `--run-dir`, refused when the socket path in it would be too long.
fn run_dir(s: &str) -> Result<PathBuf, String> {
    let dir = PathBuf::from(s);
    server::socket_path(&dir).map_err(|e| e.to_string())?;
    Ok(dir)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);

    let path = args.host_netns.clone();
    let netns = tokio::task::spawn_blocking(move || NetnsHandle::new(path.as_deref()))
        .await
        .context("the namespace thread's starter failed")??;
    let netns = Arc::new(netns);
    tracing::info!(node = %args.node_name, namespace = %netns.namespace(), "managing the node's network");
    // A thread of its own for pod endpoints, so a CNI request never waits
    // behind a reconcile.
    let path = args.host_netns.clone();
    let endpoint_netns = tokio::task::spawn_blocking(move || NetnsHandle::new(path.as_deref()))
        .await
        .context("the namespace thread's starter failed")??;
    let install = if args.no_cni_install {
        None
    } else {
        let plugin_source = match args.cni_plugin_source.clone() {
            Some(p) => p,
            None => std::env::current_exe()
                .context("locating this executable (to find the CNI plugin next to it)")?
                .with_file_name(trellis_node::endpoint::install::PLUGIN_NAME),
        };
        anyhow::ensure!(
            plugin_source.is_file(),
            "the CNI plugin binary {} does not exist: pass --cni-plugin-source PATH, or \
             --no-cni-install when something else installs the plugin",
            plugin_source.display()
        );
        Some(Install {
            plugin_source,
            bin_dir: args.cni_bin_dir.clone(),
            conf_dir: args.cni_conf_dir.clone(),
            socket: server::socket_path(&args.run_dir)?,
        })
    };

    // First: a clash on the ops port shows at once, before the slower
    // start-up (loading the policy programs) hides it.
    let listener = ops::bind(args.metrics_addr).await?;
    let client = client(args.kubeconfig.as_deref()).await?;
    let metrics = Metrics::new();
    let health = Health::new(Duration::from_secs(120), "not reconciled yet");
    let (shutdown_tx, shutdown) = watch::channel(false);

    let (facts_tx, facts) = watch::channel(None);
    // The node's addresses, from the reconcile loop to the policy engine.
    let (host_addresses_tx, host_addresses) = watch::channel(None);
    let endpoint_netns = Arc::new(endpoint_netns);
    // Fail closed: without the policy datapath no pod is plugged in.
    let (policy, engine): (Arc<dyn EndpointPolicy>, _) = match Engine::start(
        client.clone(),
        &args.node_name,
        endpoint_netns.clone(),
        args.host_netns.clone(),
        host_addresses,
        &args.bpffs_root,
        metrics.clone(),
    )
    .await
    {
        Ok(engine) => (engine.clone(), Some(engine)),
        Err(e) => {
            let why = format!(
                "the policy datapath could not be loaded (bpffs at {}): {e:#}",
                args.bpffs_root.display()
            );
            tracing::error!("{why}; pods on this node cannot be started");
            (Arc::new(Unavailable(why)), None)
        }
    };
    let endpoints = Endpoints::open_with_policy(
        &args.state_dir,
        endpoint_netns,
        facts.clone(),
        metrics.clone(),
        Some(policy),
    )
    .await
    .with_context(|| format!("opening the endpoint state in {}", args.state_dir.display()))?;
    let endpoints = Arc::new(endpoints);
    let policy_report = match &engine {
        Some(engine) => {
            engine.adopt(endpoints.admissions().await).await;
            tokio::spawn(engine.clone().run(shutdown.clone()));
            Some(engine.report())
        }
        None => None,
    };
    let cni_server = Server::bind(&args.run_dir).await?;

    let server = tokio::spawn(ops::serve(
        listener,
        metrics.clone(),
        health.clone(),
        until_true(shutdown.clone()),
    ));

    let cni = tokio::spawn(cni_server.serve(endpoints.clone(), metrics.clone(), shutdown.clone()));
    let installer = tokio::spawn(install_when_ready(install, facts, shutdown.clone()));
    // Only a failed install ends the process; a finished one waits here.
    let install_failed = async {
        match installer.await {
            Ok(Ok(())) => std::future::pending().await,
            Ok(Err(e)) => e,
            Err(e) => anyhow::anyhow!("the CNI install task failed: {e}"),
        }
    };

    let cfg = Config {
        resync: Duration::from_secs(args.resync_seconds),
        facts: Some(facts_tx),
        host_addresses: Some(host_addresses_tx),
        endpoints: Some(endpoints.ready_endpoints()),
        policy: policy_report,
        ..Config::new(&args.node_name)
    };
    let mut reconciler = tokio::spawn(agent::run(
        client,
        netns,
        cfg,
        metrics,
        health,
        shutdown.clone(),
    ));

    let result = tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("shutting down; the datapath stays as it is");
            Ok(())
        }
        res = &mut reconciler => match res {
            Ok(Ok(())) => Err(anyhow::anyhow!("the reconcile loop ended unexpectedly")),
            Ok(Err(e)) => Err(e.context("reconcile loop")),
            Err(e) => Err(anyhow::anyhow!("the reconcile loop failed: {e}")),
        },
        e = install_failed => Err(e),
    };
    let _ = shutdown_tx.send(true);
    if !reconciler.is_finished() {
        let _ = reconciler.await;
    }
    let _ = cni.await;
    let _ = server.await;
    result
}

/// Once the node can serve pods (a block, and a reconcile that converged),
/// installs the CNI plugin and its configuration; returns at once when
/// installing is off, and on shutdown.
async fn install_when_ready(
    install: Option<Install>,
    mut facts: watch::Receiver<Option<NodeFacts>>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Some(install) = install else {
        tracing::info!("--no-cni-install: leaving the CNI plugin and configuration alone");
        return Ok(());
    };
    // The configuration tells the runtime that the node's network is
    // ready: written once ADD can succeed, not before.
    tokio::select! {
        usable = facts.wait_for(|f| f.as_ref().is_some_and(NodeFacts::serves_pods)) => {
            if usable.is_err() {
                return Ok(());
            }
        }
        () = until_true(shutdown) => return Ok(()),
    }
    let target = install.clone();
    let installed = tokio::task::spawn_blocking(move || target.run())
        .await
        .context("the CNI install task failed")??;
    tracing::info!(
        plugin = %install.bin_dir.join(trellis_node::endpoint::install::PLUGIN_NAME).display(),
        plugin_written = installed.plugin,
        conflist = %install.conf_dir.join(trellis_node::endpoint::install::CONFLIST_NAME).display(),
        conflist_written = installed.conflist,
        "CNI plugin installed"
    );
    Ok(())
}
