//! A real control plane (etcd + kube-apiserver, no controller-manager, no scheduler) on
//! loopback ports, started the way controller-runtime's envtest starts one.
//!
//! ```text
//! reset state dir ─► binaries ─► PKI ─► etcd ──/health──► kube-apiserver ──/readyz──► CRDs
//!  (end stale pids,  (build.sh,  (rcgen)  (127.0.0.1:free)   (127.0.0.1:free)         (SSA, Established)
//!   delete stale      cargo)
//!   namespaces)
//!   ─► namespace trellis-system ─► config/rbac ─► underlay ─► Nodes ─► trellis-operator ──/readyz──►
//!      (if asked)                 (operator or   (datapath:  (if any;   (if asked; own token;
//!                                  datapath)      + bpffs)    + netns)   127.0.0.1:free metrics)
//!   ─► trellis-node per node ──/healthz──► ready
//!      (if asked; own token bound to its Node; 127.0.0.1:free metrics)
//! ```
//!
//! Each phase is timed. Readiness is polled, never slept for; a process that exits while we
//! wait fails the start at once with the tail of its log.

use std::{
    future::Future,
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    access,
    agent::{self, AgentOptions},
    binaries::{Binaries, Tool},
    certs::{self, Pki, PkiPaths},
    crds,
    datapath::{self, DatapathConfig},
    error::{Error, Result},
    kubeconfig,
    nodes::{NodeSpec, Nodes},
    operator::{self, OperatorOptions},
    process::{Ended, PidRecord, Process},
    sandbox::{Endpoints, Sandbox, TERM_GRACE},
};

/// Default limit for each readiness wait (etcd, apiserver, CRDs).
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Interval between readiness probes.
const READY_POLL: Duration = Duration::from_millis(100);
/// Limit for one probe request.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts to start a process whose freshly picked port was taken in the meantime.
const PORT_ATTEMPTS: usize = 3;

/// The repository root this crate was built from (`tests/e2e/../..`).
pub fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::canonicalize(&root).unwrap_or(root)
}

/// How to start a [`ControlPlane`].
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// State directory; wiped (if it is a sandbox's or empty) and laid out afresh.
    pub state_dir: PathBuf,
    /// Repository root, for `tests/e2e/tools/build.sh`.
    pub repo_root: PathBuf,
    /// Directory of CRD YAML to install; `None` installs nothing.
    pub crd_dir: Option<PathBuf>,
    /// Binaries to run; `None` resolves them (env overrides, else `build.sh`).
    pub binaries: Option<Binaries>,
    /// Limit for each readiness wait.
    pub ready_timeout: Duration,
    /// Delete the state directory when the control plane is stopped or dropped (it is kept if
    /// the drop happens during a panic, so a failed test leaves its logs).
    pub remove_state_on_stop: bool,
    /// Create the namespace `trellis-system` once the CRDs are in (always done when
    /// `operator` is set: its Lease lives there).
    pub system_namespace: bool,
    /// Nodes to register once the CRDs are in (see [`crate::nodes`]); e.g.
    /// [`crate::nodes::numbered`].
    pub nodes: Vec<NodeSpec>,
    /// Run `trellis-operator` once the nodes exist, and wait for its `/readyz`; it is ended
    /// first on stop. `None` runs none.
    pub operator: Option<OperatorOptions>,
    /// Give the sandbox a datapath (see [`crate::datapath`]; needs root): an underlay bridge
    /// in its own network namespace, and for every node (also ones added later, by
    /// [`Nodes::add`] or `trellis-sandbox node add`) a namespace plugged into it. All are
    /// deleted on stop. `false`: nodes are Node objects only.
    pub datapath: bool,
    /// With `datapath`: run a `trellis-node` for every node (see [`crate::agent`]), once the
    /// operator (if any) is ready, and wait for each one's `/healthz`; nodes added later get
    /// one too. `None`: namespaces only ([`Nodes::start_agent`] starts an agent by hand).
    pub agents: Option<AgentOptions>,
}

impl StartOptions {
    /// Defaults for `state_dir`: this repository, its `config/crd`, binaries from `build.sh`,
    /// [`DEFAULT_READY_TIMEOUT`], state kept on stop; no namespace, nodes or operator.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let repo_root = repo_root();
        StartOptions {
            state_dir: state_dir.into(),
            crd_dir: Some(repo_root.join("config/crd")),
            repo_root,
            binaries: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            remove_state_on_stop: false,
            system_namespace: false,
            nodes: Vec::new(),
            operator: None,
            datapath: false,
            agents: None,
        }
    }

    /// What `trellis-sandbox up` runs: the namespace `trellis-system`, `nodes` numbered nodes
    /// and the operator, with the datapath: a namespace and a `trellis-node` for each node.
    /// Operator and agent options already set are kept; unset ones get the defaults.
    pub fn with_cluster(mut self, nodes: usize) -> Result<Self> {
        let operator = self.operator.take().unwrap_or_default();
        let agents = self.agents.take().unwrap_or_default();
        Ok(StartOptions {
            system_namespace: true,
            nodes: crate::nodes::numbered(nodes)?,
            operator: Some(operator),
            datapath: true,
            agents: Some(agents),
            ..self
        })
    }

    /// Without the datapath: Node objects only, no namespaces, no agents.
    pub fn without_datapath(self) -> Self {
        StartOptions {
            datapath: false,
            agents: None,
            ..self
        }
    }

    /// Like [`StartOptions::new`] in `<temp dir>/trellis-e2e-<name>`, removed again on stop.
    /// The directory is the same on every run, so a run that was killed (SIGKILL leaves no
    /// chance to clean up) has its control plane ended by the next run of the same test,
    /// which [`ControlPlane::start`] does for any recorded processes.
    pub fn for_test(name: &str) -> Self {
        StartOptions {
            remove_state_on_stop: true,
            ..StartOptions::new(std::env::temp_dir().join(format!("trellis-e2e-{name}")))
        }
    }

    /// Like [`StartOptions::new`] in a fresh `trellis-*` directory under the temp dir, removed
    /// again on stop: for tests that need several control planes at once.
    pub fn temp() -> Result<Self> {
        let tmp = std::env::temp_dir();
        let dir = tempfile::Builder::new()
            .prefix("trellis-")
            .tempdir_in(&tmp)
            .map_err(|e| Error::io("create a temporary directory in", &tmp, e))?
            .keep();
        Ok(StartOptions {
            remove_state_on_stop: true,
            ..StartOptions::new(dir)
        })
    }
}

/// How long one phase of [`ControlPlane::start`] took.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub name: &'static str,
    pub took: Duration,
}

/// A running etcd + kube-apiserver. Stopped by [`ControlPlane::stop`] or on drop, unless
/// [`ControlPlane::detach`]ed.
pub struct ControlPlane {
    sandbox: Sandbox,
    endpoints: Endpoints,
    client: kube::Client,
    processes: Processes,
    timings: Vec<Phase>,
    crds: Vec<String>,
    stale: Vec<Ended>,
    stale_namespaces: Vec<String>,
    remove_state_on_stop: bool,
    finished: bool,
}

impl ControlPlane {
    /// Start a control plane in `opts.state_dir`, ending whatever an earlier run recorded
    /// there first (and deleting the network namespaces it recorded). Returns once `/readyz`
    /// is `ok`, every CRD is `Established` and, as asked, the operator is ready and every
    /// node agent answers `/healthz`.
    pub async fn start(opts: StartOptions) -> Result<Self> {
        if opts.agents.is_some() && !opts.datapath {
            return Err(Error::Datapath {
                path: opts.state_dir.clone(),
                reason: "node agents need the datapath (their --host-netns): set datapath too"
                    .into(),
            });
        }
        let total = Instant::now();
        let mut timings = Vec::new();
        let mut phase = |name: &'static str, started: Instant| {
            let took = started.elapsed();
            tracing::info!(
                phase = name,
                took_ms = took.as_millis() as u64,
                "control plane phase done"
            );
            timings.push(Phase { name, took });
        };
        let sandbox = Sandbox::new(&opts.state_dir);

        let t = Instant::now();
        // What an earlier run left: its processes (agents first), then its namespaces.
        let stale = sandbox.end_recorded_processes()?;
        let stale_namespaces = sandbox.delete_recorded_namespaces()?;
        sandbox.reset()?;
        phase("reset", t);

        let t = Instant::now();
        let binaries = match opts.binaries {
            Some(b) => b,
            None => Binaries::resolve(&opts.repo_root).await?,
        };
        let operator_binary = match &opts.operator {
            None => None,
            Some(OperatorOptions {
                binary: Some(path), ..
            }) => Some(path.clone()),
            Some(_) => Some(operator::resolve(&opts.repo_root).await?),
        };
        let agent_binary = match &opts.agents {
            None => None,
            Some(AgentOptions {
                binary: Some(path), ..
            }) => Some(path.clone()),
            Some(_) => Some(agent::resolve(&opts.repo_root).await?),
        };
        // What the agents install for their pods (`trellis`) and what pods chain after it
        // (the reference plugins).
        let (cni_plugin_binary, cni_plugins_dir) = if opts.agents.is_some() {
            (
                Some(crate::binaries::CNI_PLUGIN.resolve(&opts.repo_root).await?),
                Some(crate::binaries::cni_plugins_dir(&opts.repo_root).await?),
            )
        } else {
            (None, None)
        };
        phase("binaries", t);

        let t = Instant::now();
        let pki = Pki::generate()?;
        let pki_paths = pki.write(&sandbox.pki_dir())?;
        phase("certs", t);

        // Anything started from here on is ended again if a later step fails; node agents and
        // namespaces (dropped first, while the apiserver still runs) by their records.
        let mut processes = Processes::default();
        let mut datapath_guard = DatapathGuard {
            sandbox: sandbox.clone(),
            armed: true,
        };

        let t = Instant::now();
        let (etcd_client_port, etcd_peer_port) =
            start_etcd(&sandbox, &binaries.etcd, opts.ready_timeout, &mut processes).await?;
        phase("etcd", t);

        let t = Instant::now();
        let etcd_client_url = format!("http://127.0.0.1:{etcd_client_port}");
        let (apiserver_port, client) = start_apiserver(
            &sandbox,
            &binaries.kube_apiserver,
            &etcd_client_url,
            &pki,
            &pki_paths,
            opts.ready_timeout,
            &mut processes,
        )
        .await?;
        phase("kube-apiserver", t);

        let mut endpoints = Endpoints {
            apiserver_url: format!("https://127.0.0.1:{apiserver_port}"),
            apiserver_port,
            etcd_client_url,
            etcd_client_port,
            etcd_peer_port,
            operator_metrics_port: None,
        };
        sandbox.write_endpoints(&endpoints)?;

        let t = Instant::now();
        let crds = match &opts.crd_dir {
            Some(dir) => {
                let names = crds::install(&client, dir, opts.ready_timeout).await?;
                if names.is_empty() {
                    tracing::info!(dir = %dir.display(), "no CRDs to install");
                }
                names
            }
            None => Vec::new(),
        };
        phase("crds", t);

        // The operator and the node agents (a datapath sandbox can start them later) run with
        // the manifests' ServiceAccounts, roles and admission policy, never as the admin.
        let components = opts.operator.is_some() || opts.datapath;
        if opts.system_namespace || components {
            let t = Instant::now();
            ensure_namespace(&client, operator::SYSTEM_NAMESPACE).await?;
            phase("namespace", t);
        }
        if components {
            let t = Instant::now();
            access::install(&opts.repo_root, &sandbox.kubeconfig_path()).await?;
            phase("rbac", t);
        }

        if opts.datapath {
            let t = Instant::now();
            let tag = datapath::sandbox_tag(sandbox.dir());
            let config = DatapathConfig {
                underlay_netns: datapath::underlay_netns_name(&tag),
                tag,
                repo_root: opts.repo_root.clone(),
                agents: opts.agents.is_some(),
                agent_binary: agent_binary.clone(),
                agent_log_filter: opts.agents.as_ref().and_then(|a| a.log_filter.clone()),
                agent_ready_timeout_ms: u64::try_from(opts.ready_timeout.as_millis())
                    .unwrap_or(u64::MAX),
                cni_plugin_binary: cni_plugin_binary.clone(),
                cni_plugins_dir: cni_plugins_dir.clone(),
            };
            config.write(&sandbox)?;
            let (dp_sandbox, underlay) = (sandbox.clone(), config.underlay_netns.clone());
            blocking(move || {
                dp_sandbox.mount_bpffs()?;
                datapath::create_underlay(&dp_sandbox, &underlay)
            })
            .await?;
            phase("underlay", t);
        }

        let nodes = Nodes::new(sandbox.clone(), client.clone());
        if !opts.nodes.is_empty() {
            let t = Instant::now();
            // The agents come after the operator.
            nodes.add_all_with(&opts.nodes, false).await?;
            phase("nodes", t);
        }

        if let (Some(op), Some(binary)) = (&opts.operator, &operator_binary) {
            let t = Instant::now();
            let port = start_operator(
                &sandbox,
                &client,
                binary,
                op,
                opts.ready_timeout,
                &mut processes,
            )
            .await?;
            endpoints.operator_metrics_port = Some(port);
            sandbox.write_endpoints(&endpoints)?;
            phase("operator", t);
        }

        if opts.agents.is_some() && !opts.nodes.is_empty() {
            let t = Instant::now();
            let names: Vec<String> = opts.nodes.iter().map(|n| n.name.clone()).collect();
            nodes.start_agents(&names).await?;
            phase("agents", t);
        }
        datapath_guard.armed = false;

        timings.push(Phase {
            name: "total",
            took: total.elapsed(),
        });

        Ok(ControlPlane {
            sandbox,
            endpoints,
            client,
            processes,
            timings,
            crds,
            stale,
            stale_namespaces,
            remove_state_on_stop: opts.remove_state_on_stop,
            finished: false,
        })
    }

    /// A client authenticated as the admin (`system:masters`).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The admin kubeconfig, usable by `kubectl --kubeconfig`.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.sandbox.kubeconfig_path()
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Adds and removes the sandbox's nodes.
    pub fn nodes(&self) -> Nodes {
        Nodes::new(self.sandbox.clone(), self.client.clone())
    }

    /// Adds and removes the sandbox's pods.
    pub fn pods(&self) -> crate::pods::Pods {
        crate::pods::Pods::new(self.sandbox.clone(), self.client.clone())
    }

    /// The operator's process, if this control plane runs one.
    pub fn operator(&self) -> Option<PidRecord> {
        self.processes
            .0
            .iter()
            .find(|p| p.name() == operator::NAME)
            .map(|p| p.record.clone())
    }

    /// The control-plane processes this control plane runs (etcd, the apiserver, the
    /// operator), in start order. Node agents: [`Nodes::agent`].
    pub fn processes(&self) -> Vec<PidRecord> {
        self.processes.0.iter().map(|p| p.record.clone()).collect()
    }

    /// Duration of each start phase, the last one being `total`.
    pub fn timings(&self) -> &[Phase] {
        &self.timings
    }

    /// Names of the CRDs installed.
    pub fn crds(&self) -> &[String] {
        &self.crds
    }

    /// Processes of an earlier run that the start ended.
    pub fn ended_stale(&self) -> &[Ended] {
        &self.stale
    }

    /// Network namespaces of an earlier run that the start deleted.
    pub fn deleted_stale_namespaces(&self) -> &[String] {
        &self.stale_namespaces
    }

    /// End the node agents (by their pid files), then the control-plane processes (newest
    /// first: the operator, the apiserver, etcd), remove their pid files, delete every
    /// network namespace the sandbox recorded, unmount its bpffs and, if so configured, the
    /// state directory.
    /// Keeps going past failures and reports all of them (the state directory then stays).
    /// Idempotent.
    pub fn stop(&mut self) -> Result<Vec<Ended>> {
        if self.finished {
            return Ok(Vec::new());
        }
        self.finished = true;
        let mut ended = Vec::new();
        let mut errors = Vec::new();
        match self.sandbox.end_recorded_agents() {
            Ok(agents) => ended.extend(agents),
            Err(e) => errors.push(e),
        }
        match self.processes.end_all() {
            Ok(control_plane) => ended.extend(control_plane),
            Err(e) => errors.push(e),
        }
        if let Err(e) = self.sandbox.delete_recorded_namespaces() {
            errors.push(e);
        }
        if let Err(e) = self.sandbox.unmount_bpffs() {
            errors.push(e);
        }
        if errors.is_empty() && self.remove_state_on_stop {
            self.sandbox.remove()?;
        }
        Error::from_list(errors).map(|()| ended)
    }

    /// Leave the processes running (their pid files stay) and hand back the sandbox, e.g. for
    /// `trellis-sandbox up`, whose processes outlive it.
    pub fn detach(mut self) -> Sandbox {
        self.finished = true;
        self.processes.0.clear();
        self.sandbox.clone()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if std::thread::panicking() && self.remove_state_on_stop {
            self.remove_state_on_stop = false;
            eprintln!(
                "trellis sandbox: keeping {} for inspection (logs in {})",
                self.sandbox.dir().display(),
                self.sandbox.logs_dir().display()
            );
        }
        if let Err(e) = self.stop() {
            eprintln!(
                "trellis sandbox: stopping the control plane in {}: {e}",
                self.sandbox.dir().display()
            );
        }
    }
}

/// During [`ControlPlane::start`]: if the start fails, end the node agents, delete the
/// namespaces recorded so far and unmount the bpffs.
struct DatapathGuard {
    sandbox: Sandbox,
    armed: bool,
}

impl Drop for DatapathGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(e) = self.sandbox.end_recorded_agents() {
            eprintln!("trellis sandbox: {e}");
        }
        if let Err(e) = self.sandbox.delete_recorded_namespaces() {
            eprintln!("trellis sandbox: {e}");
        }
        if let Err(e) = self.sandbox.unmount_bpffs() {
            eprintln!("trellis sandbox: {e}");
        }
    }
}

/// Run blocking work (`ip`, waiting for a process to end) off the async runtime's threads.
pub(crate) async fn blocking<T, F>(work: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) => match e.try_into_panic() {
            Ok(payload) => std::panic::resume_unwind(payload),
            // Only when the runtime shuts down, and then nobody awaits this any more.
            Err(e) => panic!("a blocking sandbox task was cancelled: {e}"),
        },
    }
}

/// Processes started by this program, ended on drop unless taken out.
#[derive(Default)]
struct Processes(Vec<Process>);

impl Processes {
    /// End all, newest first; report every failure.
    fn end_all(&mut self) -> Result<Vec<Ended>> {
        let mut ended = Vec::new();
        let mut errors = Vec::new();
        while let Some(mut p) = self.0.pop() {
            match p.end(TERM_GRACE) {
                Ok(outcome) => ended.push(Ended {
                    record: p.record.clone(),
                    outcome,
                }),
                Err(e) => errors.push(e),
            }
        }
        Error::from_list(errors).map(|()| ended)
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        if let Err(e) = self.end_all() {
            eprintln!("trellis sandbox: {e}");
        }
    }
}

/// etcd's command line.
pub fn etcd_args(data_dir: &Path, client_port: u16, peer_port: u16) -> Vec<String> {
    let client = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    vec![
        "--name=trellis".into(),
        format!("--data-dir={}", data_dir.display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=trellis={peer}"),
        "--initial-cluster-state=new".into(),
        "--initial-cluster-token=trellis-sandbox".into(),
        // Test data need not survive a power cut; fsync dominates etcd latency on CI disks.
        "--unsafe-no-fsync=true".into(),
    ]
}

/// kube-apiserver's command line (envtest's flags, plus what a CNI needs: privileged pods).
pub fn apiserver_args(etcd_url: &str, port: u16, pki: &PkiPaths) -> Vec<String> {
    let p = |path: &Path| path.display().to_string();
    vec![
        format!("--etcd-servers={etcd_url}"),
        "--bind-address=127.0.0.1".into(),
        // Without it the apiserver looks for a default route's address and fails on hosts
        // that have none.
        "--advertise-address=127.0.0.1".into(),
        // Endpoints may not hold loopback addresses, so the `kubernetes` Service's endpoint
        // reconciler would fail every 10 s; nothing in the sandbox dials the Service IP.
        "--endpoint-reconciler-type=none".into(),
        format!("--secure-port={port}"),
        format!("--tls-cert-file={}", p(&pki.apiserver_cert)),
        format!("--tls-private-key-file={}", p(&pki.apiserver_key)),
        format!("--client-ca-file={}", p(&pki.ca_cert)),
        "--authorization-mode=Node,RBAC".into(),
        "--service-account-issuer=https://kubernetes.default.svc".into(),
        format!("--service-account-key-file={}", p(&pki.service_account_pub)),
        format!(
            "--service-account-signing-key-file={}",
            p(&pki.service_account_key)
        ),
        format!("--service-cluster-ip-range={}", certs::SERVICE_CIDR),
        "--allow-privileged=true".into(),
        // No controller-manager: nothing would create the default ServiceAccounts or lift
        // the not-ready taints these plugins wait for.
        "--disable-admission-plugins=ServiceAccount,TaintNodesByCondition".into(),
        "--profiling=false".into(),
    ]
}

async fn start_etcd(
    sandbox: &Sandbox,
    binary: &Path,
    timeout: Duration,
    processes: &mut Processes,
) -> Result<(u16, u16)> {
    let name = Tool::Etcd.name();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let args = etcd_args(&sandbox.etcd_data_dir(), client_port, peer_port);
        let mut process = sandbox.spawn(name, binary, &args, &[])?;
        let ready = wait_ready(&mut process, timeout, || etcd_health(client_port)).await;
        if !retry_on_port_clash(ready, attempt, &mut process, sandbox)? {
            processes.0.push(process);
            return Ok((client_port, peer_port));
        }
    }
}

async fn start_apiserver(
    sandbox: &Sandbox,
    binary: &Path,
    etcd_url: &str,
    pki: &Pki,
    pki_paths: &PkiPaths,
    timeout: Duration,
    processes: &mut Processes,
) -> Result<(u16, kube::Client)> {
    let name = Tool::KubeApiserver.name();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = free_port()?;
        let kubeconfig_path = sandbox.kubeconfig_path();
        let text = kubeconfig::render(
            &format!("https://127.0.0.1:{port}"),
            &pki.ca_cert,
            &pki.admin_cert,
            &pki.admin_key,
        );
        certs::write_file(&kubeconfig_path, &text, 0o600)?;
        let client = kubeconfig::client(&kubeconfig_path).await?;

        let args = apiserver_args(etcd_url, port, pki_paths);
        let mut process = sandbox.spawn(name, binary, &args, &[])?;
        let ready = wait_ready(&mut process, timeout, || async {
            match readyz(&client, PROBE_TIMEOUT).await {
                Ok(body) if body.trim() == "ok" => Ok(()),
                Ok(body) => Err(format!("/readyz answered {body:?}")),
                Err(e) => Err(e),
            }
        })
        .await;
        if !retry_on_port_clash(ready, attempt, &mut process, sandbox)? {
            processes.0.push(process);
            return Ok((port, client));
        }
    }
}

async fn start_operator(
    sandbox: &Sandbox,
    client: &kube::Client,
    binary: &Path,
    opts: &OperatorOptions,
    timeout: Duration,
    processes: &mut Processes,
) -> Result<u16> {
    let name = operator::NAME;
    // Its own ServiceAccount's token, not the admin's certificate.
    let kubeconfig = access::operator_kubeconfig(sandbox, client).await?;
    // Its log is a file: no colour codes in it.
    let env = [
        ("RUST_LOG", opts.log_filter.as_deref()),
        ("NO_COLOR", Some("1")),
    ];
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = free_port()?;
        let mut args = operator::args(&kubeconfig, &opts.identity, port);
        args.extend(opts.extra_args.iter().cloned());
        let mut process = sandbox.spawn(name, binary, &args, &env)?;
        let ready = wait_ready(&mut process, timeout, || {
            operator::readyz(port, PROBE_TIMEOUT)
        })
        .await;
        if !retry_on_port_clash(ready, attempt, &mut process, sandbox)? {
            processes.0.push(process);
            return Ok(port);
        }
    }
}

/// Create namespace `name` unless it exists.
pub async fn ensure_namespace(client: &kube::Client, name: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::Namespace;
    let ns = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    match kube::Api::<Namespace>::all(client.clone())
        .create(&kube::api::PostParams::default(), &ns)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(Error::kube(format!("create namespace {name}"), e)),
    }
}

/// `Ok(false)`: ready. `Ok(true)`: the process lost its port to someone else between
/// [`free_port`] and its bind, and was cleaned up; try again. `Err`: give up.
pub(crate) fn retry_on_port_clash(
    ready: Result<()>,
    attempt: usize,
    process: &mut Process,
    sandbox: &Sandbox,
) -> Result<bool> {
    let err = match ready {
        Ok(()) => return Ok(false),
        Err(e) => e,
    };
    let clash = matches!(&err, Error::ProcessExited { tail, .. }
        if tail.to_ascii_lowercase().contains("address already in use"));
    // Whatever happened, this process is not going to be used.
    let _ = process.end(TERM_GRACE);
    if !clash || attempt == PORT_ATTEMPTS {
        return Err(err);
    }
    tracing::warn!(
        name = process.name(),
        attempt,
        "port taken between picking and binding it; retrying"
    );
    let log = sandbox.log_path(process.name());
    let _ = std::fs::remove_file(&log);
    if process.name() == Tool::Etcd.name() {
        let data = sandbox.etcd_data_dir();
        let _ = std::fs::remove_dir_all(&data);
    }
    Ok(true)
}

/// A port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|source| Error::FreePort { source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| Error::FreePort { source })?;
    Ok(addr.port())
}

/// Poll `probe` every [`READY_POLL`] until it succeeds, `process` exits, or `timeout` passes.
pub(crate) async fn wait_ready<F, Fut>(
    process: &mut Process,
    timeout: Duration,
    mut probe: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = process.exit_status() {
            return Err(process.exited_error(status));
        }
        let last_probe = match probe().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(Error::NotReady {
                name: process.name().to_string(),
                pid: process.pid(),
                timeout,
                last_probe,
                log: process.log.clone(),
                tail: process.log_tail(),
            });
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// `GET /health` on etcd's client port, by hand: etcd speaks plain HTTP there and a kube
/// client does not apply.
pub async fn etcd_health(port: u16) -> std::result::Result<(), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {PROBE_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    check_etcd_health(&String::from_utf8_lossy(&response))
}

/// Whether an HTTP response to etcd's `/health` says healthy: status 200 and
/// `{"health":"true",…}`.
pub fn check_etcd_health(response: &str) -> std::result::Result<(), String> {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("malformed HTTP response {response:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{status}: {}", body.trim()));
    }
    let health: serde_json::Value =
        serde_json::from_str(body.trim()).map_err(|e| format!("body {body:?}: {e}"))?;
    match health.get("health").and_then(serde_json::Value::as_str) {
        Some("true") => Ok(()),
        _ => Err(format!("unhealthy: {}", body.trim())),
    }
}

/// The body of `GET /readyz` (`ok` when ready), or why there was none within `timeout`.
pub async fn readyz(
    client: &kube::Client,
    timeout: Duration,
) -> std::result::Result<String, String> {
    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, client.request_text(request)).await {
        Err(_) => Err(format!("no answer within {timeout:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(body)) => Ok(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_health_response() {
        let ok = "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"health\":\"true\",\"reason\":\"\"}";
        assert_eq!(check_etcd_health(ok), Ok(()));
        let sick = "HTTP/1.0 503 Service Unavailable\r\n\r\n{\"health\":\"false\",\"reason\":\"RAFT NO LEADER\"}";
        assert!(
            check_etcd_health(sick)
                .unwrap_err()
                .contains("RAFT NO LEADER")
        );
        let odd = "HTTP/1.0 200 OK\r\n\r\n{\"health\":\"false\"}";
        assert!(check_etcd_health(odd).is_err());
        assert!(check_etcd_health("").is_err());
    }

    #[test]
    fn free_ports_are_bindable_and_distinct_while_held() {
        let a = free_port().unwrap();
        let _held = TcpListener::bind((Ipv4Addr::LOCALHOST, a)).unwrap();
        let b = free_port().unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn apiserver_flags() {
        let pki = PkiPaths::in_dir(Path::new("/s/pki"));
        let args = apiserver_args("http://127.0.0.1:2379", 6443, &pki);
        for want in [
            "--etcd-servers=http://127.0.0.1:2379",
            "--secure-port=6443",
            "--bind-address=127.0.0.1",
            "--service-cluster-ip-range=10.96.0.0/12",
            "--service-account-signing-key-file=/s/pki/sa.key",
            "--service-account-key-file=/s/pki/sa.pub",
            "--client-ca-file=/s/pki/ca.crt",
            "--allow-privileged=true",
        ] {
            assert!(args.iter().any(|a| a == want), "missing {want} in {args:?}");
        }
    }

    #[test]
    fn etcd_flags() {
        let args = etcd_args(Path::new("/s/etcd"), 2379, 2380);
        for want in [
            "--data-dir=/s/etcd",
            "--listen-client-urls=http://127.0.0.1:2379",
            "--initial-cluster=trellis=http://127.0.0.1:2380",
            "--unsafe-no-fsync=true",
        ] {
            assert!(args.iter().any(|a| a == want), "missing {want} in {args:?}");
        }
    }
}
