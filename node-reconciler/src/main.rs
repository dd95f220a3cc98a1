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
use trellis_node::metrics::Metrics;
use trellis_node::netns::NetnsHandle;

#[derive(Parser)]
#[command(
    name = "trellis-node",
    version,
    about = "Trellis node reconciler: converges one node's VXLAN device, routes, neighbour and FDB entries"
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

    let client = client(args.kubeconfig.as_deref()).await?;
    let metrics = Metrics::new();
    let health = Health::new(Duration::from_secs(120), "not reconciled yet");
    let (shutdown_tx, shutdown) = watch::channel(false);

    let listener = ops::bind(args.metrics_addr).await?;
    let server = tokio::spawn(ops::serve(
        listener,
        metrics.clone(),
        health.clone(),
        until_true(shutdown.clone()),
    ));

    let cfg = Config {
        resync: Duration::from_secs(args.resync_seconds),
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
    };
    let _ = shutdown_tx.send(true);
    if !reconciler.is_finished() {
        let _ = reconciler.await;
    }
    let _ = server.await;
    result
}
