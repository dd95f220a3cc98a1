//! `trellis-sandbox` as a user runs it: processes outlive `up`, a second `up` replaces the
//! first run's processes, `down` ends them and removes the state.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use trellis_e2e::{
    Sandbox,
    process::{PidRecord, is_alive},
};

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

    ok(&state_dir, &["up", "--nodes", "2"]);
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
