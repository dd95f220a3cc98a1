//! `trellis-sandbox`: start, inspect and end a local Trellis sandbox.
//!
//! ```text
//! trellis-sandbox up          etcd + kube-apiserver + CRDs, detached; prints the kubeconfig
//! trellis-sandbox status      are the recorded processes alive, does /readyz say ok
//! trellis-sandbox kubeconfig  path of the admin kubeconfig
//! trellis-sandbox down        end the recorded processes, delete the state dir
//! ```

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use trellis_e2e::{
    ControlPlane, Sandbox, StartOptions,
    controlplane::{DEFAULT_READY_TIMEOUT, repo_root},
    sandbox::{DEFAULT_STATE_DIR, ProcessState, STATE_DIR_ENV},
};

#[derive(Parser)]
#[command(
    name = "trellis-sandbox",
    version,
    about = "Local Trellis sandbox: a real kube-apiserver and etcd"
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
    /// Start the control plane (ending whatever an earlier run left in the state dir) and
    /// install the CRDs.
    Up(UpArgs),
    /// End the recorded processes and delete the state directory.
    Down {
        /// Keep the state directory (logs, certificates, etcd data).
        #[arg(long)]
        keep_state: bool,
    },
    /// Show whether the recorded processes run and the apiserver is ready; exits non-zero if not.
    Status,
    /// Print the path of the admin kubeconfig.
    Kubeconfig,
}

#[derive(Args)]
struct UpArgs {
    /// Repository root (for tests/e2e/tools/build.sh and config/crd).
    #[arg(long, default_value_os_t = repo_root())]
    repo: PathBuf,
    /// Directory of CRD YAML to install [default: <repo>/config/crd].
    #[arg(long)]
    crd_dir: Option<PathBuf>,
    /// Install no CRDs.
    #[arg(long, conflicts_with = "crd_dir")]
    no_crds: bool,
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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // kube logs every failed readiness probe as an error; our errors say it better.
                .unwrap_or_else(|_| "warn,trellis_e2e=info,kube_client=off".into()),
        )
        .init();
    let cli = Cli::parse();
    let sandbox = Sandbox::new(&cli.state_dir);
    match cli.command {
        Command::Up(args) => up(&cli.state_dir, args).await,
        Command::Down { keep_state } => down(&sandbox, keep_state),
        Command::Status => status(&sandbox).await,
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
    let opts = StartOptions {
        crd_dir: crd_dir.clone(),
        repo_root: args.repo,
        ready_timeout: Duration::from_secs(args.timeout),
        ..StartOptions::new(state_dir)
    };
    let cp = ControlPlane::start(opts)
        .await
        .with_context(|| format!("starting the sandbox in {}", state_dir.display()))?;

    for ended in cp.ended_stale() {
        eprintln!("cleaned up from an earlier run: {ended}");
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

fn down(sandbox: &Sandbox, keep_state: bool) -> anyhow::Result<ExitCode> {
    let ended = sandbox
        .down(keep_state)
        .with_context(|| format!("ending the sandbox in {}", sandbox.dir().display()))?;
    if ended.is_empty() {
        eprintln!("no processes recorded in {}", sandbox.dir().display());
    }
    for e in &ended {
        eprintln!("{e}");
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
    for p in &status.processes {
        let state = match p.state {
            ProcessState::Running => "running",
            ProcessState::Gone => "not running",
            ProcessState::PidReused => "not running (pid reused by another program)",
        };
        println!("{:<15} pid {:<8} {state}", p.record.name, p.record.pid);
    }
    if let Some(ep) = &status.endpoints {
        println!("apiserver:  {}", ep.apiserver_url);
        println!("etcd:       {}", ep.etcd_client_url);
    }
    match &status.readyz {
        Ok(body) => println!("readyz:     {}", body.trim()),
        Err(e) => println!("readyz:     error: {e}"),
    }
    if status.healthy() {
        println!("healthy");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("NOT healthy");
        Ok(ExitCode::FAILURE)
    }
}
