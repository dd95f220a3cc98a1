//! Installing Trellis as a platform team does (docs/install.md), against a real
//! kube-apiserver:
//!
//! - the install commands of docs/install.md, run verbatim: a server-side dry run of
//!   `config/default` that stores nothing, then the install, every object there;
//! - each component's ServiceAccount may do what its code needs and nothing else
//!   (`kubectl auth can-i --as`, for both answers);
//! - the admission policy keeps a node reconciler to its own `NetworkStatus` and
//!   `NodeEndpoints`: real writes with tokens bound to Node objects;
//! - the manifests hang together (namespace and images set in one place, bindings naming
//!   accounts that exist, the same RBAC as `config/rbac`, which the sandbox runs under);
//! - the Dockerfile and the containers' command lines match the real binaries.
//!
//! The sandbox's other tests run the operator and every `trellis-node` under this RBAC
//! (see `trellis_e2e::access`), so a permission the manifests lack fails them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use serde_yaml::Value;
use trellis_api::v1alpha1::{NetworkStatus, NodeEndpoints, NodeNetwork};
use trellis_e2e::access::{self, NODE_ACCOUNT, OPERATOR_ACCOUNT};
use trellis_e2e::binaries::{self, CargoBinary, Tool, WORKSPACE_BINARIES};
use trellis_e2e::controlplane::repo_root;
use trellis_e2e::{ControlPlane, StartOptions, kubeconfig, wait_for};

/// The page whose marked command blocks this test runs.
const INSTALL_DOC: &str = "docs/install.md";
/// The blocks of [`INSTALL_DOC`] this test runs, in this order (`<!-- e2e: NAME -->`).
const DOC_BLOCKS: [&str; 3] = ["preflight", "install", "permissions"];
/// Where Trellis runs (config/default's `namespace:`).
const NAMESPACE: &str = "trellis-system";
const TIMEOUT: Duration = Duration::from_secs(60);
/// The field manager of the writes this test makes as a component would.
const MANAGER: &str = "trellis-deploy-test";

// ---------------------------------------------------------------------------------------
// kubectl and the shell

/// The pinned kubectl (the apiserver's version), as the other tests use it.
async fn kubectl() -> PathBuf {
    binaries::resolve(Tool::Kubectl, &repo_root())
        .await
        .expect("the pinned kubectl (tests/e2e/tools/build.sh kubectl)")
}

/// What a command printed and how it ended.
#[derive(Debug)]
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs command lines as a user types them: `sh -c LINE` in the repository root, with the
/// pinned kubectl first on `PATH` and `KUBECONFIG` naming the sandbox's admin kubeconfig.
struct Shell {
    path: String,
    kubeconfig: PathBuf,
}

impl Shell {
    async fn new(kubeconfig: &Path) -> Shell {
        let kubectl = kubectl().await;
        let dir = kubectl.parent().expect("kubectl's directory");
        let path = match std::env::var("PATH") {
            Ok(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
            _ => dir.display().to_string(),
        };
        Shell {
            path,
            kubeconfig: kubeconfig.to_path_buf(),
        }
    }

    async fn run(&self, line: &str) -> Output {
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(line)
            .current_dir(repo_root())
            .env("PATH", &self.path)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run sh -c {line:?}: {e}"));
        Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `line` and fails the test, with what it printed, unless it exits 0.
    async fn must(&self, line: &str) -> Output {
        let out = self.run(line).await;
        assert!(
            out.ok(),
            "`{line}` exited with {:?}\nstdout:\n{}\nstderr:\n{}",
            out.code,
            out.stdout,
            out.stderr
        );
        out
    }
}

/// `kubectl kustomize <dir>` (relative to the repository root), as YAML documents.
async fn render(dir: &Path) -> Vec<Value> {
    let dir = repo_root().join(dir);
    let out = tokio::process::Command::new(kubectl().await)
        .arg("kustomize")
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_documents(&String::from_utf8_lossy(&out.stdout))
}

fn parse_documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| <Value as serde::Deserialize>::deserialize(doc).expect("a YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

fn namespace(v: &Value) -> Option<&str> {
    v["metadata"]["namespace"].as_str()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// docs/install.md

/// The command blocks of [`INSTALL_DOC`] marked `<!-- e2e: NAME -->` (the marker alone on its
/// line, the next line opening a `sh` block), by name: one command per entry, continuation
/// lines joined, comment-only and blank lines left out.
fn doc_blocks() -> BTreeMap<String, Vec<String>> {
    let path = repo_root().join(INSTALL_DOC);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut blocks = BTreeMap::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let Some(marker) = line
            .trim()
            .strip_prefix("<!-- e2e:")
            .and_then(|l| l.strip_suffix("-->"))
        else {
            continue;
        };
        let block = marker.trim().to_owned();
        let fence = lines.next().map(|(_, l)| l.trim());
        assert_eq!(
            fence,
            Some("```sh"),
            "{INSTALL_DOC}:{}: the marker {block:?} must be followed by a ```sh block",
            i + 1
        );
        let mut commands = Vec::new();
        let mut pending = String::new();
        loop {
            let (j, l) = lines
                .next()
                .unwrap_or_else(|| panic!("{INSTALL_DOC}: block {block:?} is not closed"));
            if l.trim() == "```" {
                break;
            }
            let l = l.trim();
            if let Some(start) = l.strip_suffix('\\') {
                pending.push_str(start);
                continue;
            }
            pending.push_str(l);
            let command = std::mem::take(&mut pending);
            if command.is_empty() || command.starts_with('#') {
                continue;
            }
            assert!(
                command.starts_with("kubectl "),
                "{INSTALL_DOC}:{}: block {block:?} runs {command:?}; the test runs kubectl commands only",
                j + 1
            );
            commands.push(command);
        }
        assert!(
            blocks.insert(block.clone(), commands).is_none(),
            "{INSTALL_DOC}: two blocks marked {block:?}"
        );
    }
    blocks
}

/// The answer a documented `kubectl auth can-i` line expects: its trailing `# yes` / `# no`.
fn documented_answer(command: &str) -> Option<&str> {
    let (_, comment) = command.rsplit_once(" # ")?;
    match comment.trim() {
        a @ ("yes" | "no") => Some(a),
        _ => None,
    }
}

#[test]
fn the_install_doc_marks_the_blocks_this_test_runs() {
    let blocks = doc_blocks();
    let names: BTreeSet<&str> = blocks.keys().map(String::as_str).collect();
    assert_eq!(names, BTreeSet::from(DOC_BLOCKS));
    for (name, commands) in &blocks {
        assert!(!commands.is_empty(), "block {name:?} has no command");
    }
    for command in &blocks["permissions"] {
        assert!(
            command.starts_with("kubectl auth can-i ") && documented_answer(command).is_some(),
            "every permissions line is a can-i with its answer: {command:?}"
        );
    }
    assert_eq!(
        documented_answer("kubectl auth can-i get x   # yes"),
        Some("yes")
    );
    assert_eq!(documented_answer("kubectl get x   # the pods"), None);

    // The README's short version says nothing the install page does not.
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let install = std::fs::read_to_string(repo_root().join(INSTALL_DOC)).expect(INSTALL_DOC);
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Installing into a cluster"))
        .expect("README.md has a section `Installing into a cluster`");
    let commands: Vec<&str> = section
        .lines()
        .filter(|l| l.starts_with("kubectl "))
        .map(|l| l.split(" #").next().unwrap_or(l).trim_end())
        .collect();
    assert!(commands.len() >= 3, "{commands:?}");
    for command in commands {
        assert!(
            install.lines().any(|l| l.starts_with(command)),
            "README.md runs `{command}`, which {INSTALL_DOC} does not"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Install, as the docs say

#[tokio::test(flavor = "multi_thread")]
async fn the_install_commands_of_the_docs_work_against_a_real_apiserver() {
    // A bare control plane: no CRDs, no namespace, nothing of Trellis. The install brings all.
    let cp = ControlPlane::start(StartOptions {
        crd_dir: None,
        ..StartOptions::for_test("deploy-install")
    })
    .await
    .expect("start a control plane");
    let client = cp.client();
    let shell = Shell::new(&cp.kubeconfig_path()).await;
    let blocks = doc_blocks();
    let rendered = render(Path::new("config/default")).await;

    // Why the docs create the namespace first: a dry run creates none, so without it every
    // object that lives in it is refused.
    let early = shell
        .run("kubectl apply --dry-run=server -k config/default")
        .await;
    assert!(
        !early.ok()
            && early
                .stderr
                .contains(r#"namespaces "trellis-system" not found"#),
        "a dry run before the namespace exists: {early:?}"
    );

    // Preflight: the server-side dry run accepts every object and stores none of them.
    for command in &blocks["preflight"] {
        let out = shell.must(command).await;
        if command.contains("--dry-run=server") {
            let dry: Vec<&str> = out
                .stdout
                .lines()
                .filter(|l| l.ends_with("(server dry run)"))
                .collect();
            assert_eq!(
                dry.len(),
                rendered.len(),
                "one `(server dry run)` line per object of config/default:\n{}",
                out.stdout
            );
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(
        crds.get_opt("ippools.network.trellis.dev")
            .await
            .expect("read CRDs")
            .is_none(),
        "the dry run stored a CRD"
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    assert!(
        deployments
            .get_opt("trellis-operator")
            .await
            .expect("read Deployments")
            .is_none(),
        "the dry run stored the Deployment"
    );

    // Install: every object of config/default is there.
    for command in &blocks["install"] {
        shell.must(command).await;
    }
    let listed = shell.must("kubectl get -k config/default -o name").await;
    assert_eq!(
        listed.stdout.lines().count(),
        rendered.len(),
        "every object of config/default is installed:\n{}",
        listed.stdout
    );
    shell
        .must("kubectl wait --for=condition=Established --timeout=60s crd -l app.kubernetes.io/part-of=trellis")
        .await;
    // The samples the docs apply next are accepted by the installed CRDs.
    shell
        .must("kubectl apply -f config/samples/network.trellis.dev_v1alpha1_networkconfig.yaml")
        .await;
    shell
        .must("kubectl apply -f config/samples/network.trellis.dev_v1alpha1_ippool.yaml")
        .await;

    // The documented permission checks give the documented answers.
    for command in &blocks["permissions"] {
        let want = documented_answer(command).expect("checked by the doc test");
        let out = shell.run(command).await;
        assert_eq!(
            (out.stdout.trim(), out.code),
            (want, Some(if want == "yes" { 0 } else { 1 })),
            "`{command}`: {}",
            out.stderr
        );
    }
}

// ---------------------------------------------------------------------------------------
// RBAC: what each component may do, and what it may not

/// One `kubectl auth can-i` question and the answer the manifests must give.
struct Question {
    account: &'static str,
    /// `VERB RESOURCE[/NAME] [flags]`, e.g. `patch networkstatuses.network.trellis.dev
    /// --subresource=status`.
    ask: &'static str,
    allowed: bool,
}

const fn yes(account: &'static str, ask: &'static str) -> Question {
    Question {
        account,
        ask,
        allowed: true,
    }
}

const fn no(account: &'static str, ask: &'static str) -> Question {
    Question {
        account,
        ask,
        allowed: false,
    }
}

const NODE: &str = NODE_ACCOUNT;
const OPERATOR: &str = OPERATOR_ACCOUNT;

/// Every call of each component's code (see config/rbac/*.yaml for which call needs which
/// verb), and what it must not be able to do.
const QUESTIONS: &[Question] = &[
    // trellis-node: what it calls.
    yes(NODE, "get nodes"),
    yes(NODE, "get pods -A"),
    yes(NODE, "list pods -A"),
    yes(NODE, "watch pods -A"),
    yes(NODE, "get namespaces"),
    yes(NODE, "list namespaces"),
    yes(NODE, "watch namespaces"),
    yes(NODE, "list networkpolicies.networking.k8s.io -A"),
    yes(NODE, "watch networkpolicies.networking.k8s.io -A"),
    yes(NODE, "list networkconfigs.network.trellis.dev"),
    yes(NODE, "watch networkconfigs.network.trellis.dev"),
    yes(NODE, "list nodenetworks.network.trellis.dev"),
    yes(NODE, "watch nodenetworks.network.trellis.dev"),
    yes(NODE, "get securityidentities.network.trellis.dev"),
    yes(NODE, "list securityidentities.network.trellis.dev"),
    yes(NODE, "watch securityidentities.network.trellis.dev"),
    yes(NODE, "create securityidentities.network.trellis.dev"),
    yes(NODE, "get networkstatuses.network.trellis.dev"),
    yes(NODE, "list networkstatuses.network.trellis.dev"),
    yes(NODE, "watch networkstatuses.network.trellis.dev"),
    yes(NODE, "create networkstatuses.network.trellis.dev"),
    yes(NODE, "patch networkstatuses.network.trellis.dev"),
    yes(
        NODE,
        "patch networkstatuses.network.trellis.dev --subresource=status",
    ),
    yes(NODE, "list policybundles.network.trellis.dev"),
    yes(NODE, "watch policybundles.network.trellis.dev"),
    yes(NODE, "list ippools.network.trellis.dev"),
    yes(NODE, "watch ippools.network.trellis.dev"),
    yes(NODE, "list nodeendpoints.network.trellis.dev"),
    yes(NODE, "watch nodeendpoints.network.trellis.dev"),
    yes(NODE, "create nodeendpoints.network.trellis.dev"),
    yes(NODE, "patch nodeendpoints.network.trellis.dev"),
    // trellis-node: nothing else.
    no(NODE, "list nodes"),
    no(NODE, "patch nodes"),
    no(NODE, "update nodes"),
    no(NODE, "delete nodes"),
    no(NODE, "patch nodes --subresource=status"),
    no(NODE, "create pods -A"),
    no(NODE, "delete pods -A"),
    no(NODE, "patch pods --subresource=status -A"),
    no(NODE, "get secrets -A"),
    no(NODE, "list secrets -A"),
    no(NODE, "get configmaps -A"),
    no(NODE, "create serviceaccounts --subresource=token -A"),
    no(NODE, "update securityidentities.network.trellis.dev"),
    no(NODE, "patch securityidentities.network.trellis.dev"),
    no(NODE, "delete securityidentities.network.trellis.dev"),
    no(NODE, "update networkstatuses.network.trellis.dev"),
    no(NODE, "delete networkstatuses.network.trellis.dev"),
    no(
        NODE,
        "update networkstatuses.network.trellis.dev --subresource=status",
    ),
    no(NODE, "get nodeendpoints.network.trellis.dev"),
    no(NODE, "delete nodeendpoints.network.trellis.dev"),
    no(NODE, "create nodenetworks.network.trellis.dev"),
    no(NODE, "patch nodenetworks.network.trellis.dev"),
    no(
        NODE,
        "patch nodenetworks.network.trellis.dev --subresource=status",
    ),
    no(NODE, "get ippools.network.trellis.dev"),
    no(NODE, "patch ippools.network.trellis.dev"),
    no(NODE, "patch networkconfigs.network.trellis.dev"),
    no(NODE, "patch policybundles.network.trellis.dev"),
    no(
        NODE,
        "patch policybundles.network.trellis.dev --subresource=status",
    ),
    no(NODE, "create networkpolicies.networking.k8s.io -A"),
    no(NODE, "create events.events.k8s.io -A"),
    no(NODE, "get leases.coordination.k8s.io -n trellis-system"),
    no(NODE, "impersonate users"),
    // trellis-operator: what it calls.
    yes(OPERATOR, "list nodes"),
    yes(OPERATOR, "watch nodes"),
    yes(OPERATOR, "list ippools.network.trellis.dev"),
    yes(OPERATOR, "watch ippools.network.trellis.dev"),
    yes(OPERATOR, "patch ippools.network.trellis.dev"),
    yes(
        OPERATOR,
        "patch ippools.network.trellis.dev --subresource=status",
    ),
    yes(OPERATOR, "list networkconfigs.network.trellis.dev"),
    yes(OPERATOR, "watch networkconfigs.network.trellis.dev"),
    yes(
        OPERATOR,
        "patch networkconfigs.network.trellis.dev --subresource=status",
    ),
    yes(OPERATOR, "list nodenetworks.network.trellis.dev"),
    yes(OPERATOR, "watch nodenetworks.network.trellis.dev"),
    yes(OPERATOR, "create nodenetworks.network.trellis.dev"),
    yes(OPERATOR, "patch nodenetworks.network.trellis.dev"),
    yes(OPERATOR, "delete nodenetworks.network.trellis.dev"),
    yes(
        OPERATOR,
        "patch nodenetworks.network.trellis.dev --subresource=status",
    ),
    yes(OPERATOR, "list networkstatuses.network.trellis.dev"),
    yes(OPERATOR, "watch networkstatuses.network.trellis.dev"),
    yes(OPERATOR, "list networkpolicies.networking.k8s.io -A"),
    yes(OPERATOR, "watch networkpolicies.networking.k8s.io -A"),
    yes(OPERATOR, "list policybundles.network.trellis.dev"),
    yes(OPERATOR, "watch policybundles.network.trellis.dev"),
    yes(
        OPERATOR,
        "patch policybundles.network.trellis.dev --subresource=status",
    ),
    yes(OPERATOR, "list nodeendpoints.network.trellis.dev"),
    yes(OPERATOR, "watch nodeendpoints.network.trellis.dev"),
    yes(OPERATOR, "list securityidentities.network.trellis.dev"),
    yes(OPERATOR, "watch securityidentities.network.trellis.dev"),
    yes(OPERATOR, "delete securityidentities.network.trellis.dev"),
    yes(
        OPERATOR,
        "create leases.coordination.k8s.io -n trellis-system",
    ),
    yes(
        OPERATOR,
        "get leases.coordination.k8s.io/trellis-operator -n trellis-system",
    ),
    yes(
        OPERATOR,
        "update leases.coordination.k8s.io/trellis-operator -n trellis-system",
    ),
    yes(OPERATOR, "create events.events.k8s.io -n default"),
    yes(OPERATOR, "patch events.events.k8s.io -n default"),
    // trellis-operator: nothing else.
    no(OPERATOR, "get nodes"),
    no(OPERATOR, "patch nodes"),
    no(OPERATOR, "delete nodes"),
    no(OPERATOR, "list pods -A"),
    no(OPERATOR, "get secrets -A"),
    no(OPERATOR, "list secrets -A"),
    no(OPERATOR, "create ippools.network.trellis.dev"),
    no(OPERATOR, "update ippools.network.trellis.dev"),
    no(OPERATOR, "delete ippools.network.trellis.dev"),
    no(OPERATOR, "patch networkconfigs.network.trellis.dev"),
    no(OPERATOR, "delete networkconfigs.network.trellis.dev"),
    no(OPERATOR, "update nodenetworks.network.trellis.dev"),
    no(OPERATOR, "create networkstatuses.network.trellis.dev"),
    no(OPERATOR, "patch networkstatuses.network.trellis.dev"),
    no(
        OPERATOR,
        "patch networkstatuses.network.trellis.dev --subresource=status",
    ),
    no(OPERATOR, "patch nodeendpoints.network.trellis.dev"),
    no(OPERATOR, "create securityidentities.network.trellis.dev"),
    no(OPERATOR, "patch securityidentities.network.trellis.dev"),
    no(OPERATOR, "update securityidentities.network.trellis.dev"),
    no(OPERATOR, "delete nodeendpoints.network.trellis.dev"),
    no(OPERATOR, "patch policybundles.network.trellis.dev"),
    no(OPERATOR, "create policybundles.network.trellis.dev"),
    no(OPERATOR, "patch networkpolicies.networking.k8s.io -A"),
    no(
        OPERATOR,
        "get leases.coordination.k8s.io/another-lease -n trellis-system",
    ),
    no(
        OPERATOR,
        "update leases.coordination.k8s.io/another-lease -n trellis-system",
    ),
    no(
        OPERATOR,
        "delete leases.coordination.k8s.io/trellis-operator -n trellis-system",
    ),
    no(OPERATOR, "create leases.coordination.k8s.io -n kube-system"),
    no(OPERATOR, "create events.events.k8s.io -n kube-system"),
    no(OPERATOR, "create events -n default"),
];

#[tokio::test(flavor = "multi_thread")]
async fn each_component_may_do_what_its_code_calls_and_nothing_else() {
    let cp = ControlPlane::start(StartOptions {
        system_namespace: true,
        ..StartOptions::for_test("deploy-rbac")
    })
    .await
    .expect("start a control plane with the CRDs");
    // What the sandbox installs before it runs the operator and the node agents.
    access::install(&repo_root(), &cp.kubeconfig_path())
        .await
        .expect("install config/rbac");
    let kubectl = kubectl().await;
    let kubeconfig = cp.kubeconfig_path();

    let mut asked = tokio::task::JoinSet::new();
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    for (i, q) in QUESTIONS.iter().enumerate() {
        let (kubectl, kubeconfig, limit) = (kubectl.clone(), kubeconfig.clone(), limit.clone());
        asked.spawn(async move {
            let _slot = limit.acquire().await.expect("semaphore");
            let out = tokio::process::Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["auth", "can-i"])
                .args(q.ask.split_whitespace())
                .arg(format!("--as={}", access::user(q.account)))
                .stdin(Stdio::null())
                .output()
                .await
                .expect("run kubectl auth can-i");
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            (i, answer, stderr)
        });
    }
    let mut wrong = Vec::new();
    while let Some(joined) = asked.join_next().await {
        let (i, answer, stderr) = joined.expect("a can-i task");
        let q = &QUESTIONS[i];
        let want = if q.allowed { "yes" } else { "no" };
        if answer != want {
            wrong.push(format!(
                "{}: can-i {} → {answer:?}, want {want} {stderr}",
                q.account, q.ask
            ));
        }
    }
    wrong.sort();
    assert!(
        wrong.is_empty(),
        "the RBAC of config/rbac answers wrongly:\n{}",
        wrong.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// The admission policy: real writes, as the node reconcilers make them

/// A client authenticating with `token` (written as a kubeconfig into the sandbox's state
/// directory, under `name`).
async fn client_with(cp: &ControlPlane, name: &str, token: &str) -> kube::Client {
    let path = cp.sandbox().dir().join(format!("{name}.kubeconfig"));
    access::write_kubeconfig(cp.sandbox(), &path, token).expect("write a token kubeconfig");
    kubeconfig::client(&path).await.expect("a token client")
}

async fn node(client: &kube::Client, name: &str) -> Node {
    Api::<Node>::all(client.clone())
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("read Node {name}: {e}"))
}

/// What `trellis-node` writes: its `NetworkStatus` (created by server-side apply).
async fn apply_status_object(client: &kube::Client, name: &str) -> Result<(), kube::Error> {
    let body = json!({
        "apiVersion": "network.trellis.dev/v1alpha1", "kind": "NetworkStatus",
        "metadata": {"name": name}, "spec": {},
    });
    Api::<NetworkStatus>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map(drop)
}

/// ... and its status.
async fn apply_status(client: &kube::Client, name: &str, peers: i32) -> Result<(), kube::Error> {
    let body = json!({
        "apiVersion": "network.trellis.dev/v1alpha1", "kind": "NetworkStatus",
        "metadata": {"name": name}, "status": {"peers": peers},
    });
    Api::<NetworkStatus>::all(client.clone())
        .patch_status(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map(drop)
}

/// ... and its `NodeEndpoints` shard.
async fn apply_endpoints(client: &kube::Client, name: &str) -> Result<(), kube::Error> {
    let body = json!({
        "apiVersion": "network.trellis.dev/v1alpha1", "kind": "NodeEndpoints",
        "metadata": {"name": name}, "spec": {"endpoints": []},
    });
    Api::<NodeEndpoints>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map(drop)
}

/// What the operator writes: a `NodeNetwork`.
async fn apply_node_network(client: &kube::Client, name: &str) -> Result<(), kube::Error> {
    let body = json!({
        "apiVersion": "network.trellis.dev/v1alpha1", "kind": "NodeNetwork",
        "metadata": {"name": name},
        "spec": {"podCIDRs": ["10.244.7.0/24"], "underlayAddress": "192.0.2.11",
                 "encapsulation": "None"},
    });
    Api::<NodeNetwork>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map(drop)
}

/// The apiserver's refusal: its HTTP code and message. Panics, naming `what`, on success or
/// on an error that is not the apiserver's answer.
fn refusal(what: &str, result: Result<(), kube::Error>) -> (u16, String) {
    match result {
        Ok(()) => panic!("{what}: admitted, want refused"),
        Err(kube::Error::Api(s)) => (s.code, s.message.clone()),
        Err(e) => panic!("{what}: {e}, want the apiserver's refusal"),
    }
}

/// Refused by the admission policy, with its message.
#[track_caller]
fn assert_policy_refused(what: &str, result: Result<(), kube::Error>, message: &str) {
    let (code, text) = refusal(what, result);
    assert_eq!(code, 403, "{what}: {text}");
    assert!(
        text.contains("ValidatingAdmissionPolicy 'trellis-node-own-objects'")
            && text.contains(message),
        "{what}: refused with {text:?}, want the policy's {message:?}"
    );
}

/// Refused by RBAC (before admission).
#[track_caller]
fn assert_rbac_refused(what: &str, result: Result<(), kube::Error>) {
    let (code, text) = refusal(what, result);
    assert_eq!(code, 403, "{what}: {text}");
    assert!(
        text.contains("cannot") && !text.contains("ValidatingAdmissionPolicy"),
        "{what}: refused with {text:?}, want RBAC's refusal"
    );
}

#[track_caller]
fn assert_admitted(what: &str, result: Result<(), kube::Error>) {
    if let Err(e) = result {
        panic!("{what}: refused: {e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_reconciler_writes_only_its_own_node_s_objects() {
    let cp = ControlPlane::start(StartOptions {
        system_namespace: true,
        nodes: trellis_e2e::nodes::numbered(2).expect("two nodes"),
        ..StartOptions::for_test("deploy-admission")
    })
    .await
    .expect("start a control plane with two Nodes");
    access::install(&repo_root(), &cp.kubeconfig_path())
        .await
        .expect("install config/rbac");
    let admin = cp.client();
    let (n1, n2) = ("trellis-node-1", "trellis-node-2");

    // Tokens as a DaemonSet pod on each node gets them: bound, naming the node.
    let token1 = access::token(&admin, NODE_ACCOUNT, Some(&node(&admin, n1).await))
        .await
        .expect("a token for node 1");
    let token2 = access::token(&admin, NODE_ACCOUNT, Some(&node(&admin, n2).await))
        .await
        .expect("a token for node 2");
    let unbound = access::token(&admin, NODE_ACCOUNT, None)
        .await
        .expect("a trellis-node token bound to nothing");
    let operator = access::token(&admin, OPERATOR_ACCOUNT, None)
        .await
        .expect("an operator token");
    let node1 = client_with(&cp, "node-1", &token1).await;
    let node2 = client_with(&cp, "node-2", &token2).await;
    let unbound = client_with(&cp, "node-unbound", &unbound).await;
    let operator = client_with(&cp, "operator", &operator).await;

    // The apiserver enforces a new policy a moment after it is created: wait until a
    // dry run of a write it refuses is refused.
    wait_for("the admission policy to be in force", TIMEOUT, || async {
        let body = json!({
            "apiVersion": "network.trellis.dev/v1alpha1", "kind": "NetworkStatus",
            "metadata": {"name": n2}, "spec": {},
        });
        let params = PatchParams {
            dry_run: true,
            ..PatchParams::apply(MANAGER).force()
        };
        match Api::<NetworkStatus>::all(node1.clone())
            .patch(n2, &params, &Patch::Apply(&body))
            .await
        {
            Err(kube::Error::Api(s)) if s.code == 403 => Some(()),
            _ => None,
        }
    })
    .await;

    // Its own objects: admitted, created and updated.
    assert_admitted(
        "node 1 creates its NetworkStatus",
        apply_status_object(&node1, n1).await,
    );
    assert_admitted(
        "node 1 writes its status",
        apply_status(&node1, n1, 1).await,
    );
    assert_admitted(
        "node 1 updates its status",
        apply_status(&node1, n1, 2).await,
    );
    assert_admitted(
        "node 1 writes its NodeEndpoints",
        apply_endpoints(&node1, n1).await,
    );
    assert_admitted(
        "node 2 creates its NetworkStatus",
        apply_status_object(&node2, n2).await,
    );

    // Another node's: refused by the policy, whatever the write.
    let other_status = "trellis-node of node trellis-node-1 may write only the networkstatuses named trellis-node-1, not trellis-node-2";
    assert_policy_refused(
        "node 1 applies node 2's NetworkStatus",
        apply_status_object(&node1, n2).await,
        other_status,
    );
    assert_policy_refused(
        "node 1 writes node 2's status",
        apply_status(&node1, n2, 7).await,
        other_status,
    );
    assert_policy_refused(
        "node 1 creates a NetworkStatus of a node that does not exist",
        apply_status_object(&node1, "trellis-node-9").await,
        "may write only the networkstatuses named trellis-node-1, not trellis-node-9",
    );
    assert_policy_refused(
        "node 1 writes node 2's NodeEndpoints",
        apply_endpoints(&node1, n2).await,
        "trellis-node of node trellis-node-1 may write only the nodeendpoints named trellis-node-1, not trellis-node-2",
    );
    // A delete is not in its role at all.
    assert_rbac_refused(
        "node 1 deletes node 2's NetworkStatus",
        Api::<NetworkStatus>::all(node1.clone())
            .delete(n2, &DeleteParams::default())
            .await
            .map(drop),
    );
    // Node 2's status is what node 2 wrote.
    let status2 = Api::<NetworkStatus>::all(admin.clone())
        .get(n2)
        .await
        .expect("node 2's NetworkStatus");
    assert_eq!(status2.status.map(|s| s.peers), None);

    // A trellis-node token that names no node writes nothing, not even a node's own name.
    assert_policy_refused(
        "an unbound trellis-node token writes a NetworkStatus",
        apply_status(&unbound, n1, 3).await,
        "trellis-node credentials name no node",
    );

    // The policy is about trellis-node only; RBAC keeps each component to its kinds.
    assert_admitted(
        "the operator writes a NodeNetwork",
        apply_node_network(&operator, n1).await,
    );
    assert_rbac_refused(
        "the operator writes a NetworkStatus",
        apply_status(&operator, n2, 5).await,
    );
    assert_rbac_refused(
        "node 1 writes a NodeNetwork",
        apply_node_network(&node1, n1).await,
    );
    assert_admitted(
        "the admin writes node 2's status",
        apply_status(&admin, n2, 4).await,
    );

    // The token is bound to the Node object: deleting the Node ends it.
    Api::<Node>::all(admin.clone())
        .delete(n2, &DeleteParams::default())
        .await
        .expect("delete Node 2");
    let api2 = Api::<NetworkStatus>::all(node2.clone());
    wait_for(
        "node 2's token to be refused once its Node is deleted",
        TIMEOUT,
        || async {
            match api2.get(n2).await {
                Err(kube::Error::Api(s)) if s.code == 401 => Some(()),
                _ => None,
            }
        },
    )
    .await;
    // Node 1's still works.
    assert_admitted(
        "node 1 writes its status after node 2 went",
        apply_status(&node1, n1, 3).await,
    );
}

// ---------------------------------------------------------------------------------------
// The manifests hang together

const RBAC_KINDS: [&str; 7] = [
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

/// Kinds with no namespace.
const CLUSTER_SCOPED: [&str; 6] = [
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

/// The objects that stay in `default` wherever Trellis runs (Events about cluster-scoped
/// objects live there).
fn stays_in_default(v: &Value) -> bool {
    name(v) == "trellis-operator-events" && matches!(kind(v), "Role" | "RoleBinding")
}

/// Checks a rendering of config/default installed into `ns`: every namespaced object in
/// `ns` (but the Events role), the cluster-scoped ones in none, every binding naming an
/// account and a role of the rendering, every pod's account there, no literal namespace in
/// the workloads.
fn check_rendering(docs: &[Value], ns: &str) {
    let accounts: BTreeSet<(String, String)> = docs
        .iter()
        .filter(|d| kind(d) == "ServiceAccount")
        .map(|d| {
            (
                namespace(d).unwrap_or_default().to_owned(),
                name(d).to_owned(),
            )
        })
        .collect();
    assert_eq!(
        accounts,
        BTreeSet::from([
            (ns.to_owned(), "trellis-node".to_owned()),
            (ns.to_owned(), "trellis-operator".to_owned())
        ])
    );
    let roles: BTreeSet<(String, String, String)> = docs
        .iter()
        .filter(|d| matches!(kind(d), "Role" | "ClusterRole"))
        .map(|d| {
            (
                kind(d).to_owned(),
                namespace(d).unwrap_or_default().to_owned(),
                name(d).to_owned(),
            )
        })
        .collect();
    let namespaces: Vec<&str> = docs
        .iter()
        .filter(|d| kind(d) == "Namespace")
        .map(name)
        .collect();
    assert_eq!(namespaces, [ns]);
    for d in docs {
        let what = format!("{} {}", kind(d), name(d));
        if CLUSTER_SCOPED.contains(&kind(d)) {
            assert_eq!(namespace(d), None, "{what} is cluster-scoped");
        } else if stays_in_default(d) {
            assert_eq!(namespace(d), Some("default"), "{what}");
        } else {
            assert_eq!(namespace(d), Some(ns), "{what}");
        }
        if matches!(kind(d), "RoleBinding" | "ClusterRoleBinding") {
            let role_kind = d["roleRef"]["kind"].as_str().unwrap_or_default().to_owned();
            let role_ns = if role_kind == "Role" {
                namespace(d).unwrap_or_default().to_owned()
            } else {
                String::new()
            };
            let role_name = d["roleRef"]["name"].as_str().unwrap_or_default().to_owned();
            assert!(
                roles.contains(&(role_kind.clone(), role_ns, role_name.clone())),
                "{what} binds {role_kind} {role_name}, which is not in the manifests"
            );
            let subjects = d["subjects"].as_sequence().expect("subjects");
            assert!(!subjects.is_empty(), "{what} binds no one");
            for s in subjects {
                let subject = (
                    s["namespace"].as_str().unwrap_or_default().to_owned(),
                    s["name"].as_str().unwrap_or_default().to_owned(),
                );
                assert_eq!(s["kind"].as_str(), Some("ServiceAccount"), "{what}");
                assert!(
                    accounts.contains(&subject),
                    "{what} binds {subject:?}, not an account of the manifests"
                );
            }
        }
        if matches!(kind(d), "Deployment" | "DaemonSet") {
            let pod = &d["spec"]["template"]["spec"];
            let account = pod["serviceAccountName"].as_str().unwrap_or_default();
            assert!(
                accounts.contains(&(ns.to_owned(), account.to_owned())),
                "{what} runs as {account:?}, not an account of the manifests"
            );
            let text = serde_yaml::to_string(d).expect("YAML");
            assert!(
                !text.contains("trellis-system") || ns == "trellis-system",
                "{what} names the namespace literally:\n{text}"
            );
        }
    }
}

/// `(kind, namespace, name)` → the object without its labels.
fn access_objects(docs: &[Value]) -> BTreeMap<(String, String, String), Value> {
    docs.iter()
        .filter(|d| RBAC_KINDS.contains(&kind(d)))
        .map(|d| {
            let mut d = d.clone();
            if let Some(meta) = d["metadata"].as_mapping_mut() {
                meta.remove("labels");
            }
            let key = (
                kind(&d).to_owned(),
                namespace(&d).unwrap_or_default().to_owned(),
                name(&d).to_owned(),
            );
            (key, d)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_manifests_hang_together() {
    let default = render(Path::new("config/default")).await;
    check_rendering(&default, NAMESPACE);

    // Images: the registry names of config/default, never the bare names of config/manager.
    let images: BTreeSet<String> = default
        .iter()
        .filter(|d| matches!(kind(d), "Deployment" | "DaemonSet"))
        .flat_map(|d| {
            d["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .map(|c| c["image"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        images,
        BTreeSet::from([
            "ghcr.io/trellis-net/trellis-node:0.1.0".to_owned(),
            "ghcr.io/trellis-net/trellis-operator:0.1.0".to_owned()
        ])
    );

    // The sandbox runs under config/rbac: the very same objects.
    let rbac = render(Path::new("config/rbac")).await;
    assert_eq!(
        access_objects(&rbac),
        access_objects(&default),
        "config/default installs other RBAC than config/rbac"
    );
    assert_eq!(
        rbac.len(),
        access_objects(&rbac).len(),
        "config/rbac holds only access objects"
    );

    // The namespace is set in one place: change it there, and everything follows.
    let copy = tempfile::Builder::new()
        .prefix("trellis-deploy-")
        .tempdir()
        .expect("a temp dir");
    copy_dir(&repo_root().join("config"), &copy.path().join("config"));
    let kustomization = copy.path().join("config/default/kustomization.yaml");
    let text = std::fs::read_to_string(&kustomization).expect("read the kustomization");
    let moved = text.replacen(
        "\nnamespace: trellis-system\n",
        "\nnamespace: trellis-elsewhere\n",
        1,
    );
    assert_ne!(
        moved, text,
        "config/default sets `namespace: trellis-system`"
    );
    std::fs::write(&kustomization, moved).expect("write the kustomization");
    let elsewhere = render(&copy.path().join("config/default")).await;
    check_rendering(&elsewhere, "trellis-elsewhere");
    let all = elsewhere
        .iter()
        .map(|d| serde_yaml::to_string(d).expect("YAML"))
        .collect::<String>();
    assert!(
        !all.contains("trellis-system"),
        "the namespace is named outside config/default's `namespace:`"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create a dir");
    for entry in std::fs::read_dir(from).expect("list a dir") {
        let entry = entry.expect("a dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Images and command lines: short of building the images

/// One stage of the Dockerfile: its name, what it copies from the builder (source →
/// destination) and its entrypoint.
#[derive(Debug, Default)]
struct Stage {
    copies: Vec<(String, String)>,
    entrypoint: Vec<String>,
}

/// The Dockerfile's named stages. Only the instructions this test checks are read.
fn dockerfile_stages() -> BTreeMap<String, Stage> {
    let path = repo_root().join("Dockerfile");
    let text = std::fs::read_to_string(&path).expect("read the Dockerfile");
    let mut stages: BTreeMap<String, Stage> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["FROM", _, as_, stage] if as_.eq_ignore_ascii_case("AS") => {
                current = Some((*stage).to_owned());
                stages.entry((*stage).to_owned()).or_default();
            }
            ["FROM", ..] => current = None,
            ["COPY", from, source, destination] if from.starts_with("--from=") => {
                let stage = current.as_ref().expect("COPY --from in a named stage");
                stages
                    .get_mut(stage)
                    .expect("the stage")
                    .copies
                    .push(((*source).to_owned(), (*destination).to_owned()));
            }
            ["ENTRYPOINT", ..] => {
                let json = line.trim_start().trim_start_matches("ENTRYPOINT").trim();
                let argv: Vec<String> =
                    serde_json::from_str(json).expect("ENTRYPOINT in exec (JSON) form");
                let stage = current.as_ref().expect("ENTRYPOINT in a named stage");
                stages.get_mut(stage).expect("the stage").entrypoint = argv;
            }
            _ => {}
        }
    }
    stages
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn workspace_binary(name: &str) -> Option<CargoBinary> {
    WORKSPACE_BINARIES.into_iter().find(|b| b.bin == name)
}

/// A container's args with `$(VAR)` replaced by a sample value of each variable its `env`
/// defines (as the kubelet expands them); a reference to an undefined one fails the test.
fn expand(container: &Value) -> Vec<String> {
    let defined: BTreeSet<String> = container["env"]
        .as_sequence()
        .map(|env| {
            env.iter()
                .filter_map(|e| e["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    strings(&container["args"])
        .into_iter()
        .map(|arg| {
            let mut out = arg.clone();
            while let Some(start) = out.find("$(") {
                let end = out[start..]
                    .find(')')
                    .map(|e| start + e)
                    .unwrap_or_else(|| panic!("unclosed $( in {arg:?}"));
                let var = out[start + 2..end].to_owned();
                assert!(
                    defined.contains(&var),
                    "{arg:?} refers to ${var}, which the container's env does not define"
                );
                out.replace_range(start..=end, &format!("sample-{}", var.to_lowercase()));
            }
            out
        })
        .collect()
}

/// The value of `--flag=value` among `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(flag)?.strip_prefix('='))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dockerfile_and_the_command_lines_match_the_binaries() {
    let stages = dockerfile_stages();
    let rendered = render(Path::new("config/default")).await;
    let repo = repo_root();

    let mut checked = BTreeSet::new();
    for workload in rendered
        .iter()
        .filter(|d| matches!(kind(d), "Deployment" | "DaemonSet"))
    {
        let pod = &workload["spec"]["template"]["spec"];
        let containers = pod["containers"].as_sequence().expect("containers");
        assert!(
            pod["initContainers"].is_null(),
            "{}: no init container (docs/install.md says why)",
            name(workload)
        );
        for container in containers {
            let image = container["image"].as_str().expect("an image");
            // ghcr.io/trellis-net/trellis-node:0.1.0 → the Dockerfile target trellis-node.
            let target = file_name(image.split(':').next().unwrap_or(image));
            let stage = stages
                .get(target)
                .unwrap_or_else(|| panic!("image {image}: no Dockerfile target {target}"));
            // Every binary the image gets is one this workspace builds.
            for (source, destination) in &stage.copies {
                assert!(
                    workspace_binary(file_name(source)).is_some(),
                    "target {target} copies {source}, not a binary of the workspace"
                );
                assert_eq!(file_name(source), file_name(destination), "{target}");
            }
            let [entrypoint] = stage.entrypoint.as_slice() else {
                panic!(
                    "target {target}: ENTRYPOINT is one binary, not {:?}",
                    stage.entrypoint
                );
            };
            assert!(
                container["command"].is_null(),
                "{target}: the manifest runs the image's entrypoint"
            );
            assert!(
                stage.copies.iter().any(|(_, d)| d == entrypoint),
                "target {target}: its entrypoint {entrypoint} is not copied in"
            );
            let binary = workspace_binary(file_name(entrypoint))
                .unwrap_or_else(|| panic!("{entrypoint} is not a workspace binary"));
            assert_eq!(binary.bin, target, "each image runs its namesake");
            let built = binary
                .resolve(&repo)
                .await
                .unwrap_or_else(|e| panic!("build {}: {e}", binary.bin));

            // The real binary parses the container's command line: every flag exists and
            // takes what it is given (`--help` last: clap stops at the first bad argument).
            let args = expand(container);
            let help = std::process::Command::new(&built)
                .args(&args)
                .arg("--help")
                .output()
                .expect("run the binary");
            assert!(
                help.status.success(),
                "{} refuses the manifest's arguments {args:?}: {}",
                binary.bin,
                String::from_utf8_lossy(&help.stderr)
            );
            // ... and the check can fail.
            let bad = std::process::Command::new(&built)
                .args(&args)
                .arg("--no-such-flag")
                .arg("--help")
                .output()
                .expect("run the binary");
            assert!(!bad.status.success(), "{} accepts anything", binary.bin);

            // The probes ask the port the binary serves them on.
            let metrics = flag(&args, "--metrics-addr").expect("--metrics-addr");
            let port: i64 = metrics
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("a port");
            let ports = container["ports"].as_sequence().expect("ports");
            assert!(
                ports.iter().any(|p| p["name"].as_str() == Some("ops")
                    && p["containerPort"].as_i64() == Some(port)),
                "{target}: containerPort ops is not {port}"
            );
            for probe in ["livenessProbe", "readinessProbe"] {
                assert_eq!(
                    container[probe]["httpGet"]["port"].as_str(),
                    Some("ops"),
                    "{target} {probe}"
                );
            }

            // Every path the binary writes is a host path mounted into the container.
            let mounts: Vec<String> = container["volumeMounts"]
                .as_sequence()
                .map(|m| {
                    m.iter()
                        .filter_map(|v| v["mountPath"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            for path_flag in [
                "--state-dir",
                "--run-dir",
                "--cni-conf-dir",
                "--cni-bin-dir",
                "--bpffs-root",
            ] {
                if let Some(path) = flag(&args, path_flag) {
                    assert!(
                        mounts.iter().any(|m| Path::new(path).starts_with(m)),
                        "{target}: {path_flag}={path} is on no volume mount ({mounts:?})"
                    );
                }
            }
            // The plugin trellis-node installs is the one the image carries.
            if let Some(source) = flag(&args, "--cni-plugin-source") {
                assert!(
                    stage
                        .copies
                        .iter()
                        .any(|(s, d)| d == source && file_name(s) == binaries::CNI_PLUGIN.bin),
                    "{target}: --cni-plugin-source={source} is not the plugin the image carries"
                );
            }
            checked.insert(binary.bin);
        }
    }
    assert_eq!(
        checked,
        BTreeSet::from(["trellis-node", "trellis-operator"]),
        "both images are checked"
    );
}
