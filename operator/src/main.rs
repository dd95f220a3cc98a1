//! `trellis-operator`: watches IPPools, NetworkConfig and Nodes and keeps one
//! `NodeNetwork` per node; see the library crate for the flow.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::sync::{Notify, watch};
use trellis_common::process::{LogFormat, client, init_tracing, shutdown_signal, until_true};
use trellis_operator::apply::Writer;
use trellis_operator::controller::{self, LoopConfig};
use trellis_operator::identity_gc_controller::{self, GcConfig};
use trellis_operator::lease::{Elector, LeaseConfig};
use trellis_operator::ops::{self, ErrorKind, Health, Metrics, WriteKind};
use trellis_operator::policy_controller::{self, PolicyLoopConfig, PolicyStores};

#[derive(Parser)]
#[command(
    name = "trellis-operator",
    version,
    about = "Trellis cluster operator: IPAM, per-node desired state and policy status"
)]
struct Args {
    /// Kubeconfig to use; in-cluster configuration (or $KUBECONFIG) when unset.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the leader-election Lease.
    #[arg(long, default_value = "trellis-system")]
    leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "trellis-operator")]
    leader_election_name: String,
    /// This replica's identity in the Lease (default: $POD_NAME, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Seconds between full passes when nothing changes.
    #[arg(long, default_value_t = 300)]
    resync_seconds: u64,
    /// Delete a SecurityIdentity once no node's NodeEndpoints has named it
    /// for this many seconds (as seen by the leader since it took the
    /// lease); 0 turns the collection off.
    #[arg(long, default_value_t = 600)]
    identity_gc_grace_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    let identity = args.identity.clone().unwrap_or_else(default_identity);

    let client = client(args.kubeconfig.as_deref()).await?;
    let metrics = Metrics::new();
    let health = Health::new(Duration::from_secs(120), "caches not synced");
    let (shutdown_tx, shutdown) = watch::channel(false);
    let (leading_tx, leading) = watch::channel(false);

    let listener = ops::bind(args.metrics_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, identity = %identity, "serving /metrics, /healthz, /readyz");
    let server = tokio::spawn(ops::serve(
        listener,
        metrics.clone(),
        health.clone(),
        until_true(shutdown.clone()),
    ));

    let changed = Arc::new(Notify::new());
    let (stores, mut watches) = controller::watch_all(&client, changed.clone());
    let (policy_stores, policy_watches) = PolicyStores::watch(&client, &stores);
    watches.extend(policy_watches);

    let elector = Elector::new(
        client.clone(),
        LeaseConfig::new(
            &args.leader_election_namespace,
            &args.leader_election_name,
            &identity,
        ),
    );
    let mut election = tokio::spawn(elector.run(leading_tx, shutdown.clone()));
    {
        let (metrics, mut leading) = (metrics.clone(), leading.clone());
        tokio::spawn(async move {
            while leading.changed().await.is_ok() {
                let now = *leading.borrow_and_update();
                metrics.set_leader(now);
                tracing::info!(leading = now, "leadership changed");
            }
        });
    }

    let writer = Writer::new(client.clone(), Some(identity.clone()));
    let cfg = LoopConfig {
        resync: Duration::from_secs(args.resync_seconds),
        ..LoopConfig::default()
    };
    let on_pass = {
        let (metrics, health) = (metrics.clone(), health.clone());
        move |pass: &controller::PassReport| {
            health.beat();
            metrics.reconciled(pass.took);
            let p = &pass.plan;
            metrics.set_ipam(p.blocks_in_use, p.blocks_total, p.nodes_without_block);
            count_writes(&metrics, p);
            for e in &pass.errors {
                metrics.error(error_kind(e));
                tracing::warn!(error = %e, transient = e.is_transient(), "write failed");
            }
            for skipped in &p.skipped {
                tracing::warn!(%skipped, "ignored an object the schema should have refused");
            }
            if p.writes() > 0 || !pass.errors.is_empty() {
                tracing::info!(writes = p.writes(), errors = pass.errors.len(), took_ms = pass.took.as_millis() as u64,
                    waiting_for_address = ?p.waiting_for_address, "reconciled");
                for write in p.summary() {
                    tracing::debug!(%write, "wrote");
                }
            } else {
                tracing::debug!(
                    took_ms = pass.took.as_millis() as u64,
                    "reconciled; nothing to change"
                );
            }
        }
    };
    let gc_policy_stores = policy_stores.clone();
    let mut policy_task = {
        let (client, stores, leading, shutdown) = (
            client.clone(),
            stores.clone(),
            leading.clone(),
            shutdown.clone(),
        );
        let metrics = metrics.clone();
        tokio::spawn(policy_controller::run(
            client,
            stores,
            policy_stores,
            leading,
            shutdown,
            PolicyLoopConfig::default(),
            move |pass: &policy_controller::PolicyPass| {
                for e in &pass.errors {
                    metrics.error(error_kind(e));
                    tracing::warn!(error = %e, transient = e.is_transient(), "policy status write failed");
                }
                for skipped in &pass.rollup.skipped {
                    tracing::warn!(%skipped, "ignored an object the schema should have refused");
                }
                if pass.written.is_empty() && pass.errors.is_empty() {
                    tracing::debug!(
                        took_ms = pass.took.as_millis() as u64,
                        "policy status unchanged"
                    );
                } else {
                    for (name, status) in &pass.rollup.statuses {
                        tracing::info!(bundle = %name, desired = status.desired_nodes,
                            realized = status.realized_nodes, lagging = ?status.lagging_nodes,
                            hash = %pass.rollup.hash, "PolicyBundle status");
                    }
                }
            },
        ))
    };

    let gc = GcConfig::new(Duration::from_secs(args.identity_gc_grace_seconds));
    match gc {
        Some(cfg) => tracing::info!(
            grace_s = cfg.grace.as_secs(),
            interval_s = cfg.interval.as_secs(),
            "collecting SecurityIdentities that no NodeEndpoints names for the grace period"
        ),
        None => {
            tracing::info!("SecurityIdentity collection is off (--identity-gc-grace-seconds 0)")
        }
    }
    let mut gc_task = {
        let (client, leading, shutdown) = (client.clone(), leading.clone(), shutdown.clone());
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let Some(cfg) = gc else {
                // Off: a task that ends only with the process, like the others.
                std::future::pending::<()>().await;
                return;
            };
            identity_gc_controller::run(
                client,
                gc_policy_stores,
                leading,
                shutdown,
                cfg,
                move |pass: &identity_gc_controller::GcPass| on_gc_pass(&metrics, pass),
            )
            .await;
        })
    };

    // Ready (for /readyz) once the caches are synced; the loop starts then.
    let mut controller_task = {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        tokio::spawn(async move {
            if stores.ready().await.is_err() {
                return;
            }
            tracing::info!("caches synced");
            health.set_ready(true);
            controller::run(stores, changed, writer, leading, shutdown, cfg, on_pass).await;
        })
    };

    // Liveness heartbeat for standby replicas, which make no passes.
    {
        let health = health.clone();
        tokio::spawn(async move {
            loop {
                health.beat();
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
    }

    let result = tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
        res = &mut election => match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("leader election")),
            Err(e) => Err(anyhow::anyhow!("leader election task failed: {e}")),
        },
        res = &mut controller_task => Err(anyhow::anyhow!("controller loop ended unexpectedly: {res:?}")),
        res = &mut policy_task => Err(anyhow::anyhow!("policy status loop ended unexpectedly: {res:?}")),
        res = &mut gc_task => Err(anyhow::anyhow!("identity collection loop ended unexpectedly: {res:?}")),
    };

    // Stop writing first, then give the lease back so a standby takes over at once.
    let _ = shutdown_tx.send(true);
    let _ = controller_task.await;
    let _ = policy_task.await;
    gc_task.abort();
    let _ = gc_task.await;
    if !election.is_finished() {
        match election.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "releasing the lease failed"),
            Err(e) => tracing::warn!(error = %e, "leader election task failed"),
            Ok(Ok(())) => {}
        }
    }
    for task in watches {
        task.abort();
    }
    let _ = server.await;
    result
}

fn count_writes(metrics: &Metrics, p: &trellis_operator::plan::Plan) {
    let counts = [
        (WriteKind::NodeNetworkSpec, p.node_network_specs.len()),
        (WriteKind::NodeNetworkStatus, p.node_network_statuses.len()),
        (WriteKind::NodeNetworkDelete, p.node_network_deletes.len()),
        (WriteKind::PoolStatus, p.pool_statuses.len()),
        (
            WriteKind::PoolFinalizer,
            p.finalizers_to_add.len() + p.finalizers_to_remove.len(),
        ),
        (
            WriteKind::NetworkConfigStatus,
            usize::from(p.config_status.is_some()),
        ),
        (WriteKind::Event, p.events.len()),
    ];
    for (kind, n) in counts {
        for _ in 0..n {
            metrics.wrote(kind);
        }
    }
}

fn on_gc_pass(metrics: &Metrics, pass: &identity_gc_controller::GcPass) {
    let plan = &pass.plan;
    metrics.set_identities(plan.identities, plan.unreferenced.len());
    for skipped in &plan.skipped {
        tracing::warn!(%skipped, "ignored an object the schema should have refused");
    }
    for (c, outcome) in &pass.outcomes {
        match outcome {
            identity_gc_controller::Outcome::Deleted => {
                metrics.collected_identity();
                tracing::info!(id = c.id, labels = %c.labels,
                    unreferenced_s = c.unreferenced_for.as_secs(),
                    "security identity collected: no NodeEndpoints named it for the grace period");
            }
            identity_gc_controller::Outcome::Skipped(code) => tracing::debug!(
                id = c.id,
                code,
                "security identity not collected: gone or re-created meanwhile"
            ),
            identity_gc_controller::Outcome::Failed(e) => {
                metrics.error(error_kind(e));
                tracing::warn!(error = %e, transient = e.is_transient(), "security identity delete failed; retrying next pass");
            }
        }
    }
    tracing::debug!(
        identities = plan.identities,
        unreferenced = plan.unreferenced.len(),
        took_ms = pass.took.as_millis() as u64,
        "identity collection pass"
    );
}

fn error_kind(e: &trellis_operator::apply::WriteError) -> ErrorKind {
    match e.kind() {
        "conflict" => ErrorKind::Conflict,
        "invalid" => ErrorKind::Invalid,
        "timeout" | "transport" => ErrorKind::Timeout,
        _ => ErrorKind::Api,
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
