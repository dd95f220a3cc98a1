//! The sandbox control plane against the real pinned etcd and kube-apiserver.
//!
//! Every test starts its own control plane in a fresh `trellis-*` temp dir on free ports, so
//! tests (and test binaries) run in parallel.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, api::ListParams};
use trellis_e2e::{
    Binaries, ControlPlane, Error, Sandbox, StartOptions, Tool, binaries,
    controlplane::{readyz, repo_root},
    crds,
    process::{Outcome, PidRecord, identity_matches, is_alive, proc_identity},
};

/// The pinned kubectl (`$TRELLIS_KUBECTL` overrides it).
async fn kubectl() -> PathBuf {
    binaries::resolve(Tool::Kubectl, &repo_root())
        .await
        .expect("pinned kubectl")
}

fn run_kubectl(kubectl: &Path, kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

fn assert_running(record: &PidRecord) {
    let seen = proc_identity(record.pid)
        .unwrap_or_else(|| panic!("{} (pid {}) is not running", record.name, record.pid));
    assert!(identity_matches(record, &seen), "{record:?} vs {seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_the_api_to_kube_and_kubectl_and_stops_cleanly() {
    let opts = StartOptions::temp().unwrap();
    let state_dir = opts.state_dir.clone();
    assert!(
        state_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("trellis-"),
        "{}",
        state_dir.display()
    );
    let mut cp = ControlPlane::start(opts).await.unwrap();
    let client = cp.client();

    assert_eq!(
        readyz(&client, Duration::from_secs(10))
            .await
            .unwrap()
            .trim(),
        "ok"
    );

    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.git_version, "v1.33.13");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "33")
    );

    // The kubeconfig works for kubectl as is.
    let kubectl = kubectl().await;
    let kubeconfig = cp.kubeconfig_path();
    assert_eq!(
        run_kubectl(&kubectl, &kubeconfig, &["get", "--raw", "/readyz"]).trim(),
        "ok"
    );
    let ns: serde_json::Value = serde_json::from_str(&run_kubectl(
        &kubectl,
        &kubeconfig,
        &["get", "ns", "default", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(ns["metadata"]["name"], "default");
    assert_eq!(ns["status"]["phase"], "Active");
    let whoami: serde_json::Value = serde_json::from_str(&run_kubectl(
        &kubectl,
        &kubeconfig,
        &["auth", "whoami", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(whoami["status"]["userInfo"]["username"], "trellis-admin");
    assert!(
        whoami["status"]["userInfo"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g == "system:masters")
    );

    // The serving certificate also carries the in-cluster names.
    let mut config = trellis_e2e::kubeconfig::config(&kubeconfig).await.unwrap();
    config.tls_server_name = Some("kubernetes.default.svc".into());
    let by_service_name = kube::Client::try_from(config).unwrap();
    assert_eq!(
        readyz(&by_service_name, Duration::from_secs(10))
            .await
            .unwrap()
            .trim(),
        "ok"
    );

    // Every CRD in config/crd is installed and served.
    let on_disk: Vec<String> = crds::load(&repo_root().join("config/crd"))
        .unwrap()
        .into_iter()
        .filter_map(|f| f.crd.metadata.name)
        .collect();
    assert_eq!(cp.crds(), on_disk.as_slice());
    let served: Vec<String> = Api::<CustomResourceDefinition>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    for name in &on_disk {
        assert!(
            served.contains(name),
            "{name} not served; served: {served:?}"
        );
    }

    // Status from the state dir alone, as `trellis-sandbox status` sees it.
    let status = Sandbox::new(&state_dir).status().await.unwrap();
    assert!(status.healthy(), "{status:?}");
    assert_eq!(
        status.endpoints.as_ref().map(|e| e.apiserver_url.as_str()),
        Some(cp.endpoints().apiserver_url.as_str())
    );

    let records = cp.processes();
    let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["etcd", "kube-apiserver"]);
    for r in &records {
        assert_running(r);
        assert_eq!(
            &PidRecord::read(&cp.sandbox().pid_path(&r.name)).unwrap(),
            r
        );
    }
    let phases: Vec<&str> = cp.timings().iter().map(|p| p.name).collect();
    assert_eq!(
        phases,
        [
            "reset",
            "binaries",
            "certs",
            "etcd",
            "kube-apiserver",
            "crds",
            "total"
        ]
    );

    let ended = cp.stop().unwrap();
    assert_eq!(ended.len(), 2);
    assert!(
        ended.iter().all(|e| e.outcome == Outcome::Terminated),
        "{ended:?}"
    );
    for r in &records {
        assert!(!is_alive(r.pid), "{} (pid {}) survived stop", r.name, r.pid);
    }
    assert!(!state_dir.exists(), "temp state dir is removed on stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_start_ends_the_processes_of_a_crashed_run() {
    let opts = StartOptions {
        crd_dir: None,
        ..StartOptions::temp().unwrap()
    };
    let first = ControlPlane::start(opts.clone()).await.unwrap();
    let old = first.processes();
    // As if the owner crashed: the handle is gone, the processes and pid files stay.
    let sandbox = first.detach();
    for r in &old {
        assert_running(r);
        assert!(sandbox.pid_path(&r.name).is_file());
    }

    let mut second = ControlPlane::start(opts).await.unwrap();
    for r in &old {
        assert!(
            !is_alive(r.pid),
            "{} (pid {}) of the first run survived",
            r.name,
            r.pid
        );
        let ended = second
            .ended_stale()
            .iter()
            .find(|e| e.record.pid == r.pid)
            .unwrap_or_else(|| panic!("{} not reported as ended", r.name));
        assert_eq!(ended.outcome, Outcome::Terminated);
    }
    let new = second.processes();
    for r in &new {
        assert_running(r);
        assert!(old.iter().all(|o| o.pid != r.pid));
    }
    assert_eq!(
        readyz(&second.client(), Duration::from_secs(10))
            .await
            .unwrap()
            .trim(),
        "ok"
    );

    second.stop().unwrap();
    for r in &new {
        assert!(!is_alive(r.pid));
    }
}

/// Start options whose etcd and kube-apiserver are both `script`, in a fresh temp dir (kept
/// alive by the returned guard).
fn fake_control_plane(script: &str) -> (tempfile::TempDir, StartOptions) {
    let tmp = tempfile::Builder::new()
        .prefix("trellis-fake-")
        .tempdir()
        .expect("temp dir");
    let fake = tmp.path().join("etcd");
    std::fs::write(&fake, script).expect("write fake binary");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755))
        .expect("make fake binary executable");
    let opts = StartOptions {
        binaries: Some(Binaries {
            etcd: fake.clone(),
            kube_apiserver: fake,
        }),
        crd_dir: None,
        ..StartOptions::new(tmp.path().join("state"))
    };
    (tmp, opts)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_dies_fails_the_start_at_once_with_its_log() {
    let (_tmp, opts) =
        fake_control_plane("#!/bin/sh\necho \"trellis-fake-etcd: cannot start: $1\" >&2\nexit 3\n");
    let state_dir = opts.state_dir.clone();

    let started = Instant::now();
    let err = match ControlPlane::start(opts).await {
        Ok(_) => panic!("a control plane whose etcd exits must not start"),
        Err(e) => e,
    };
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    match &err {
        Error::ProcessExited {
            name, status, tail, ..
        } => {
            assert_eq!(name, "etcd");
            assert!(status.contains('3'), "{status}");
            assert!(
                tail.contains("trellis-fake-etcd: cannot start: --name=trellis"),
                "{tail}"
            );
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(err.to_string().contains("trellis-fake-etcd"), "{err}");
    // Nothing is left recorded as running.
    assert!(
        Sandbox::new(&state_dir)
            .recorded_processes()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_never_gets_ready_times_out_and_is_ended() {
    let (_tmp, opts) =
        fake_control_plane("#!/bin/sh\necho 'trellis-fake-etcd: hanging'\nexec sleep 600\n");
    let state_dir = opts.state_dir.clone();
    let opts = StartOptions {
        ready_timeout: Duration::from_secs(1),
        ..opts
    };

    let err = match ControlPlane::start(opts).await {
        Ok(_) => panic!("a control plane whose etcd never answers must not start"),
        Err(e) => e,
    };
    match &err {
        Error::NotReady {
            name,
            pid,
            last_probe,
            tail,
            ..
        } => {
            assert_eq!(name, "etcd");
            assert!(!last_probe.is_empty());
            assert!(tail.contains("trellis-fake-etcd: hanging"), "{tail}");
            assert!(!is_alive(*pid), "the hanging process must be ended");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(
        Sandbox::new(&state_dir)
            .recorded_processes()
            .unwrap()
            .is_empty()
    );
}
