//! `kubectl-trellis`: reads the cluster the way kubectl does (`--kubeconfig`,
//! else `$KUBECONFIG` / `~/.kube/config`, else the in-cluster service
//! account), then hands the objects to the pure core ([`kubectl_trellis::explain`]).
//!
//! Exit status: 0 when the connection was explained (whatever the verdict),
//! 1 when it could not be (a pod or identity missing, the cluster
//! unreachable), 3 when the compiled tables and the reference evaluator
//! disagree (a bug in Trellis, printed loudly).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use kubectl_trellis::explain::{
    Destination, ExplainError, Objects, PodName, PortSpec, Query, explain,
};
use serde::de::DeserializeOwned;
use trellis_api::v1alpha1::{IPPool, NetworkConfig, NodeEndpoints, PolicyBundle, SecurityIdentity};

const EXPLAIN_ABOUT: &str = "\
Explain whether a connection from a pod is allowed, and by which rule.

Reads the cluster's Pods, Namespaces, NetworkPolicies, PolicyBundles,
SecurityIdentities, NodeEndpoints, NetworkConfig and IPPools, builds the
input every node compiles against, and compiles the sender's egress and the
receiver's ingress with the same compiler the nodes run. For each end it
prints the verdict and the deciding rule (a PolicyBundle rule, a
NetworkPolicy rule, isolation with nothing allowed, or the enforcement
mode's default); the connection gets through when both ends allow it.

Each pod's identity is resolved as its node resolves it: its labels and its
namespace's labels select the SecurityIdentity that holds that label set.
The verdict is also computed by Trellis' reference evaluator; if the two
disagree, the tool says so loudly and exits with status 3.

Not explained: replies within an established connection (they pass
whatever the policy says now), and traffic from a node's own addresses into
its pods (always let in, for health probes).";

#[derive(Debug, Parser)]
#[command(name = "kubectl-trellis", version, about = "Trellis kubectl plugin")]
struct Cli {
    /// The kubeconfig to use (else $KUBECONFIG, ~/.kube/config, or the
    /// in-cluster service account, as kubectl).
    #[arg(long, global = true, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (else the current one).
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Explain whether a connection from a pod is allowed, and by which rule.
    #[command(long_about = EXPLAIN_ABOUT)]
    Explain(ExplainArgs),
}

#[derive(Debug, clap::Args)]
struct ExplainArgs {
    /// The pod that opens the connection.
    #[arg(long, value_name = "NAMESPACE/POD")]
    from: PodName,
    /// Where it goes: a pod, or an IP address (a pod's, or one outside the cluster).
    #[arg(long, value_name = "NAMESPACE/POD|IP")]
    to: Destination,
    /// The destination port and protocol (TCP, UDP or SCTP; TCP when not given).
    #[arg(long, value_name = "PORT[/PROTOCOL]")]
    port: PortSpec,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(ExplainError::Disagreement { .. }) = e.downcast_ref::<ExplainError>() {
                eprintln!("kubectl-trellis: {e}");
                return ExitCode::from(3);
            }
            eprintln!("kubectl-trellis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = client(cli.kubeconfig, cli.context).await?;
    match cli.command {
        Command::Explain(args) => {
            let query = Query {
                from: args.from,
                to: args.to,
                port: args.port,
            };
            let objects = read_objects(&client, &query).await?;
            let explanation = explain(&objects, &query)?;
            match args.output {
                Output::Text => print!("{explanation}"),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&explanation)
                        .context("serializing the explanation")?
                ),
            }
            Ok(())
        }
    }
}

/// A client configured as kubectl would be.
async fn client(kubeconfig: Option<PathBuf>, context: Option<String>) -> anyhow::Result<Client> {
    let options = KubeConfigOptions {
        context,
        ..KubeConfigOptions::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(&path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None if options.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .context("loading the kubeconfig ($KUBECONFIG or ~/.kube/config)")?,
        None => Config::infer()
            .await
            .context("no kubeconfig ($KUBECONFIG, ~/.kube/config) and not in a cluster")?,
    };
    Client::try_from(config).context("creating the Kubernetes client")
}

/// Everything [`explain`] needs, from the apiserver.
async fn read_objects(client: &Client, query: &Query) -> anyhow::Result<Objects> {
    let mut objects = Objects {
        enforcement: Api::<NetworkConfig>::all(client.clone())
            .get_opt("default")
            .await
            .context("reading NetworkConfig default")?
            .map(|c| c.spec.policy_enforcement)
            .unwrap_or_default(),
        policies: list::<NetworkPolicy>(client, "NetworkPolicies").await?,
        bundles: list::<PolicyBundle>(client, "PolicyBundles").await?,
        identities: list::<SecurityIdentity>(client, "SecurityIdentities").await?,
        shards: list::<NodeEndpoints>(client, "NodeEndpoints").await?,
        pools: list::<IPPool>(client, "IPPools").await?,
        ..Objects::default()
    };
    let mut pods = vec![query.from.clone()];
    match &query.to {
        Destination::Pod(p) => pods.push(p.clone()),
        // A pod's address: that pod too (the shards say whose).
        Destination::Address(ip) => {
            let shards = trellis_policy::cluster::read_shards(&objects.shards);
            if let Some(a) = shards.addresses.iter().find(|a| a.address == *ip) {
                pods.push(PodName {
                    namespace: a.pod.0.clone(),
                    name: a.pod.1.clone(),
                });
            }
        }
    }
    for p in pods {
        if let Some(pod) = Api::<Pod>::namespaced(client.clone(), &p.namespace)
            .get_opt(&p.name)
            .await
            .with_context(|| format!("reading pod {p}"))?
        {
            objects.pods.push(pod);
        }
        if !objects
            .namespaces
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some(&p.namespace))
            && let Some(ns) = Api::<Namespace>::all(client.clone())
                .get_opt(&p.namespace)
                .await
                .with_context(|| format!("reading namespace {}", p.namespace))?
        {
            objects.namespaces.push(ns);
        }
    }
    Ok(objects)
}

async fn list<K>(client: &Client, what: &str) -> anyhow::Result<Vec<K>>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    Ok(Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing {what}"))?
        .items)
}
