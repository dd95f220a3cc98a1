//! `trellis-sandbox` as a user runs it: processes outlive `up`, a second `up` replaces the
//! first run's processes, `down` ends them and removes the state.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use kube::Api;
use trellis_api::v1alpha1::NetworkStatus;
use trellis_e2e::{
    DatapathConfig, Sandbox, agent, bpffs, datapath, kubeconfig,
    process::{PidRecord, is_alive},
    wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(30);
const PROBE: Duration = Duration::from_secs(2);

fn sandbox_cmd(state_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis-sandbox"))
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run trellis-sandbox")
}

fn ok(state_dir: &Path, args: &[&str]) -> String {
    let out = sandbox_cmd(state_dir, args);
    assert!(
        out.status.success(),
        "trellis-sandbox {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Ends whatever the sandbox recorded if a test fails half way.
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = sandbox_cmd(&self.0, &["down"]);
    }
}

fn recorded(state_dir: &Path) -> Vec<PidRecord> {
    Sandbox::new(state_dir)
        .recorded_processes()
        .expect("read pid files")
}

#[test]
fn up_status_up_again_down() {
    let tmp = tempfile::Builder::new()
        .prefix("trellis-cli-")
        .tempdir()
        .unwrap();
    let state_dir = tmp.path().join("sandbox");
    let _down = Down(state_dir.clone());

    let stdout = ok(&state_dir, &["up", "--no-crds"]);
    let kubeconfig = state_dir.join("kubeconfig");
    assert!(
        stdout.contains(&format!(
            "export KUBECONFIG={}; kubectl get nodes",
            kubeconfig.display()
        )),
        "{stdout}"
    );
    assert_eq!(
        ok(&state_dir, &["kubeconfig"]).trim(),
        kubeconfig.display().to_string()
    );

    // `up` has exited; its processes have not.
    let first = recorded(&state_dir);
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(first.iter().all(|r| is_alive(r.pid)), "{first:?}");
    let status = ok(&state_dir, &["status"]);
    assert!(status.contains("readyz:     ok"), "{status}");

    ok(&state_dir, &["up", "--no-crds"]);
    for r in &first {
        assert!(
            !is_alive(r.pid),
            "{} (pid {}) of the first up survived the second",
            r.name,
            r.pid
        );
    }
    let second = recorded(&state_dir);
    assert_eq!(second.len(), 2);
    assert!(second.iter().all(|r| is_alive(r.pid)));

    ok(&state_dir, &["down"]);
    for r in &second {
        assert!(!is_alive(r.pid), "{} (pid {}) survived down", r.name, r.pid);
    }
    assert!(!state_dir.exists());

    let out = sandbox_cmd(&state_dir, &["status"]);
    assert!(
        !out.status.success(),
        "status of a stopped sandbox must fail"
    );
}

#[test]
fn down_keep_state_keeps_logs() {
    let tmp = tempfile::Builder::new()
        .prefix("trellis-cli-")
        .tempdir()
        .unwrap();
    let state_dir = tmp.path().join("sandbox");
    let _down = Down(state_dir.clone());

    ok(&state_dir, &["up", "--no-crds"]);
    let pids = recorded(&state_dir);
    ok(&state_dir, &["down", "--keep-state"]);
    assert!(pids.iter().all(|r| !is_alive(r.pid)));
    assert!(recorded(&state_dir).is_empty(), "pid files are removed");
    let log = std::fs::read_to_string(state_dir.join("logs/kube-apiserver.log")).unwrap();
    assert!(!log.is_empty());
}

#[test]
fn up_runs_nodes_and_the_operator_and_node_commands_change_them() {
    let tmp = tempfile::Builder::new()
        .prefix("trellis-cli-")
        .tempdir()
        .unwrap();
    let state_dir = tmp.path().join("sandbox");
    let _down = Down(state_dir.clone());

    // Node objects and the operator only; `up_with_the_datapath_…` covers namespaces and agents.
    ok(&state_dir, &["up", "--nodes", "2", "--no-datapath"]);
    let records = recorded(&state_dir);
    let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["trellis-operator", "kube-apiserver", "etcd"]);
    let status = ok(&state_dir, &["status"]);
    assert!(status.contains("operator readyz: ok"), "{status}");
    assert!(status.contains("operator:   http://127.0.0.1:"), "{status}");

    let list = ok(&state_dir, &["node", "list"]);
    assert!(list.contains("trellis-node-1   192.0.2.11"), "{list}");
    assert!(list.contains("trellis-node-2   192.0.2.12"), "{list}");
    assert!(!list.contains("trellis-node-3"), "{list}");

    ok(
        &state_dir,
        &["node", "add", "trellis-extra", "--label", "rack=r1"],
    );
    ok(
        &state_dir,
        &["node", "add", "trellis-fixed", "--ip", "192.0.2.200"],
    );
    let list = ok(&state_dir, &["node", "list"]);
    assert!(
        list.lines().any(|l| l.starts_with("trellis-extra")
            && l.contains("192.0.2.13")
            && l.contains("rack=r1")),
        "the first free underlay address: {list}"
    );
    assert!(list.contains("192.0.2.200"), "{list}");
    let out = sandbox_cmd(&state_dir, &["node", "add", "trellis-extra"]);
    assert!(!out.status.success(), "a second node of the same name");

    ok(&state_dir, &["node", "del", "trellis-extra"]);
    let list = ok(&state_dir, &["node", "list"]);
    assert!(!list.contains("trellis-extra"), "{list}");
    let out = sandbox_cmd(&state_dir, &["node", "del", "trellis-extra"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no node trellis-extra"),
        "{out:?}"
    );

    ok(&state_dir, &["down"]);
    for r in &records {
        assert!(!is_alive(r.pid), "{} (pid {}) survived down", r.name, r.pid);
    }
}

/// For the checks that need a client or an HTTP probe: the tests here are plain `#[test]`s
/// that run the CLI as a user does.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

/// Waits until the agent of every node recorded in the sandbox answers `/readyz` (it has
/// reconciled its node once) and has written its node's `NetworkStatus`.
fn wait_for_agents(state_dir: &Path) {
    let sandbox = Sandbox::new(state_dir);
    block_on(async {
        let client = kubeconfig::client(&sandbox.kubeconfig_path())
            .await
            .expect("a client from the sandbox's kubeconfig");
        let statuses: Api<NetworkStatus> = Api::all(client);
        for node in datapath::recorded_nodes(&sandbox).expect("read the node records") {
            let port = node
                .agent_metrics_port
                .unwrap_or_else(|| panic!("{} has no agent metrics port", node.node));
            wait_for(
                &format!("{}'s agent to answer /readyz", node.node),
                TIMEOUT,
                || async move { agent::readyz(port, PROBE).await.ok() },
            )
            .await;
            let statuses = &statuses;
            let name = node.node.as_str();
            wait_for(
                &format!("{name}'s agent to write its NetworkStatus"),
                TIMEOUT,
                || async move { statuses.get_opt(name).await.ok().flatten() },
            )
            .await;
        }
    });
}

/// Whether the sandbox has a `NetworkStatus` named `node`.
fn has_network_status(state_dir: &Path, node: &str) -> bool {
    let sandbox = Sandbox::new(state_dir);
    block_on(async {
        let client = kubeconfig::client(&sandbox.kubeconfig_path())
            .await
            .expect("a client from the sandbox's kubeconfig");
        Api::<NetworkStatus>::all(client)
            .get_opt(node)
            .await
            .expect("get the NetworkStatus")
            .is_some()
    })
}

/// The sandbox's namespaces as the kernel lists them, sorted.
fn namespaces_of(tag: &str) -> Vec<String> {
    let mut names: Vec<String> = datapath::list_netns()
        .expect("ip -j netns list")
        .into_iter()
        .filter(|n| n.starts_with(&format!("trellis-{tag}-")))
        .collect();
    names.sort();
    names
}

#[test]
fn up_with_the_datapath_gives_nodes_namespaces_and_agents_and_down_deletes_them() {
    let tmp = tempfile::Builder::new()
        .prefix("trellis-cli-")
        .tempdir()
        .unwrap();
    let state_dir = tmp.path().join("sandbox");
    let _down = Down(state_dir.clone());

    // The real trellis-node for each node ($TRELLIS_NODE, else built with cargo); no operator,
    // so the agents find no NodeNetwork and report NoNodeNetwork.
    ok(&state_dir, &["up", "--nodes", "2", "--no-operator"]);
    let config = DatapathConfig::read(&Sandbox::new(&state_dir))
        .expect("read datapath.json")
        .expect("up records the datapath");
    let tag = config.tag.clone();
    assert!(config.agents);
    let node_ns = |node: &str| format!("trellis-{tag}-{node}");
    let mut want = vec![
        node_ns("trellis-node-1"),
        node_ns("trellis-node-2"),
        config.underlay_netns.clone(),
    ];
    want.sort();
    assert_eq!(namespaces_of(&tag), want);
    let records = recorded(&state_dir);
    let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "trellis-node-agent-trellis-node-1",
            "trellis-node-agent-trellis-node-2",
            "kube-apiserver",
            "etcd"
        ]
    );

    wait_for_agents(&state_dir);
    let status = ok(&state_dir, &["status"]);
    assert!(status.lines().any(|l| l == "healthy"), "{status}");
    assert!(
        status.contains(&format!(
            "node trellis-node-1: network namespace {} (present), eth0 192.0.2.11/24; agent: pid",
            node_ns("trellis-node-1")
        )),
        "{status}"
    );
    assert!(status.contains("healthz ok"), "{status}");
    let bpffs = state_dir.join("bpffs");
    assert!(
        status.contains(&format!("bpffs:      {} (mounted)", bpffs.display())),
        "{status}"
    );
    assert!(bpffs::is_mounted(&bpffs).expect("read mountinfo"));

    let list = ok(&state_dir, &["node", "list"]);
    assert!(
        list.lines().any(|l| l.starts_with("trellis-node-1")
            && l.contains(&node_ns("trellis-node-1"))
            && l.contains("running (pid ")),
        "{list}"
    );

    // A node added by a later process gets a namespace and an agent; deleting it ends both.
    ok(&state_dir, &["node", "add", "trellis-extra"]);
    assert!(namespaces_of(&tag).contains(&node_ns("trellis-extra")));
    let extra = recorded(&state_dir)
        .into_iter()
        .find(|r| r.name == "trellis-node-agent-trellis-extra")
        .expect("an agent for the added node");
    assert!(is_alive(extra.pid));
    let list = ok(&state_dir, &["node", "list"]);
    assert!(
        list.lines().any(|l| l.starts_with("trellis-extra")
            && l.contains("192.0.2.13")
            && l.contains(&node_ns("trellis-extra"))
            && l.contains("running (pid ")),
        "{list}"
    );
    wait_for_agents(&state_dir);
    assert!(has_network_status(&state_dir, "trellis-extra"));
    ok(&state_dir, &["node", "del", "trellis-extra"]);
    assert!(!is_alive(extra.pid), "the removed node's agent survived");
    assert!(!namespaces_of(&tag).contains(&node_ns("trellis-extra")));
    // What a cluster's garbage collector does when the Node goes: its NetworkStatus goes too.
    assert!(
        !has_network_status(&state_dir, "trellis-extra"),
        "the removed node's NetworkStatus is left"
    );
    assert!(has_network_status(&state_dir, "trellis-node-1"));

    ok(&state_dir, &["down"]);
    for r in &records {
        assert!(!is_alive(r.pid), "{} (pid {}) survived down", r.name, r.pid);
    }
    assert_eq!(namespaces_of(&tag), Vec::<String>::new());
    assert!(!bpffs::is_mounted(&bpffs).expect("read mountinfo"));
    assert!(!state_dir.exists());
}

#[test]
fn up_no_agents_makes_namespaces_only() {
    let tmp = tempfile::Builder::new()
        .prefix("trellis-cli-")
        .tempdir()
        .unwrap();
    let state_dir = tmp.path().join("sandbox");
    let _down = Down(state_dir.clone());

    ok(
        &state_dir,
        &["up", "--nodes", "1", "--no-operator", "--no-agents"],
    );
    let config = DatapathConfig::read(&Sandbox::new(&state_dir))
        .expect("read datapath.json")
        .expect("up records the datapath");
    assert!(!config.agents);
    assert_eq!(namespaces_of(&config.tag).len(), 2);
    let names: Vec<String> = recorded(&state_dir).into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["kube-apiserver", "etcd"]);
    let status = ok(&state_dir, &["status"]);
    assert!(
        status.contains("agent: none (started without agents)"),
        "{status}"
    );
    assert!(status.lines().any(|l| l == "healthy"), "{status}");

    ok(&state_dir, &["down"]);
    assert_eq!(namespaces_of(&config.tag), Vec::<String>::new());
}
