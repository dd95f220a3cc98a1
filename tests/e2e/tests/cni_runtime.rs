//! The sandbox's container runtime (`trellis_e2e::cni_runtime`) against the reference CNI
//! plugins and against small recording plugins, with no apiserver: a "node" network namespace
//! hosts the plugins (`nsenter --net`), a "pod" namespace gets plugged in.
//!
//! - recording plugins show what each plugin gets: stdin (name, cniVersion, prevResult,
//!   runtimeConfig filtered by capabilities), the `CNI_*` environment, the namespace it ran
//!   in, and the order of ADD, CHECK, DEL, STATUS and GC;
//! - `bridge` + `host-local` + `portmap` (pinned in `tests/e2e/tools/cni`): ADD gives the pod
//!   an address that answers a ping from the node, portmap's rules land in the node's
//!   namespace, CHECK passes, DEL twice succeeds, GC with an empty valid list releases
//!   host-local's allocation; the pinned `cnitool` agrees on STATUS;
//! - a failing plugin's error JSON comes back typed; a hanging one is killed at the timeout.
//!
//! Namespaces are `trellis-e2e-cnirt-<test>-{node,pod}`: fixed per test, so a killed run's
//! leftovers are deleted by the next run of the same test.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command as Std,
    time::Duration,
};

use serde_json::{Value, json};
use trellis_e2e::{
    Tool, binaries,
    cni_runtime::{
        Attachment, CniError, Command, NetworkConfigList, PluginFailure, Runtime, RuntimeConf,
    },
    controlplane::repo_root,
    wait_for,
};

/// A network namespace this test owns, deleted on drop (and before creation, if a killed run
/// of the same test left it).
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: &str) -> Self {
        assert!(name.starts_with("trellis-") && name.len() < 64, "{name}");
        if Path::new("/run/netns").join(name).exists() {
            run("ip", &["netns", "del", name]);
        }
        run("ip", &["netns", "add", name]);
        run("ip", &["-n", name, "link", "set", "lo", "up"]);
        Netns { name: name.into() }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip netns exec <it> argv…`: stdout, panicking on failure.
    fn exec(&self, argv: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(argv);
        run("ip", &all)
    }

    /// Its `net:[inode]`, as a process inside it sees `/proc/self/ns/net`.
    fn id(&self) -> String {
        self.exec(&["readlink", "/proc/self/ns/net"]).trim().into()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Std::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Std::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `/tmp/trellis-e2e-cnirt-<test>`, emptied.
fn test_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trellis-e2e-cnirt-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test dir");
    dir
}

fn write_plugin(dir: &Path, name: &str, script: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{script}")).expect("write the plugin");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn write_conflist(dir: &Path, file: &str, list: &Value) -> NetworkConfigList {
    std::fs::create_dir_all(dir).expect("create the conf dir");
    std::fs::write(dir.join(file), list.to_string()).expect("write the conflist");
    NetworkConfigList::load_dir(dir).expect("load the conflist")
}

fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()))
}

/// `KEY=VALUE` lines as pairs.
fn read_env(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn env_value<'a>(env: &'a [(String, String)], key: &str) -> &'a str {
    env.iter()
        .find(|(k, _)| k == key)
        .map_or_else(|| panic!("no {key} in {env:?}"), |(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread")]
async fn plugins_get_what_the_spec_says_in_the_node_namespace() {
    let dir = test_dir("record");
    let node = Netns::new("trellis-e2e-cnirt-record-node");
    let pod = Netns::new("trellis-e2e-cnirt-record-pod");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = dir.join("log");
    // Records its stdin, CNI_* environment and namespace per command, appends
    // "<type> <command>" to a log, and answers ADD with a result naming itself.
    for name in ["trellis-rec-a", "trellis-rec-b"] {
        write_plugin(
            &bin,
            name,
            &format!(
                r#"d={dir}
cat > "$d/{name}.$CNI_COMMAND.stdin"
env | grep '^CNI_' | sort > "$d/{name}.$CNI_COMMAND.env"
readlink /proc/self/ns/net > "$d/{name}.$CNI_COMMAND.netns"
echo "{name} $CNI_COMMAND" >> {log}
if [ "$CNI_COMMAND" = ADD ]; then
  echo '{{"cniVersion":"1.1.0","interfaces":[{{"name":"eth0","sandbox":"'"$CNI_NETNS"'"}}],"ips":[{{"address":"10.77.0.{last}/32","interface":0}}],"dns":{{}},"by":"{name}"}}'
fi
"#,
                dir = dir.display(),
                log = log.display(),
                last = if name.ends_with('a') { 1 } else { 2 },
            ),
        );
    }
    let list = write_conflist(
        &dir.join("net.d"),
        "10-rec.conflist",
        &json!({"cniVersion": "1.1.0", "name": "trellis-rec", "plugins": [
            {"type": "trellis-rec-a", "socket": "/run/x.sock"},
            {"type": "trellis-rec-b", "capabilities": {"portMappings": true, "bandwidth": false}},
        ]}),
    );
    // A later-sorted list is not the one a runtime picks.
    write_conflist(
        &dir.join("net.d"),
        "20-other.conflist",
        &json!({"cniVersion": "1.1.0", "name": "other", "plugins": [{"type": "x"}]}),
    );
    assert_eq!(
        NetworkConfigList::load_dir(&dir.join("net.d"))
            .unwrap()
            .name,
        "trellis-rec"
    );
    let runtime = Runtime::new(
        vec![dir.join("missing"), bin.clone()],
        Some(node.path()),
        dir.join("cache"),
    );
    let container_id = "c".repeat(64);
    let mut rt = RuntimeConf::for_pod(&container_id, &pod.path(), "default", "a", Some("uid-1"));
    rt.capability_args.insert(
        "portMappings".into(),
        json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
    );
    rt.capability_args
        .insert("bandwidth".into(), json!({"ingressRate": 1000}));

    let result = runtime.add(&list, &rt).await.expect("ADD");
    assert_eq!(
        result.raw["by"], "trellis-rec-b",
        "the last plugin's result"
    );
    assert_eq!(result.pod_ips(), ["10.77.0.2".parse::<IpAddr>().unwrap()]);

    let a = read_json(&dir.join("trellis-rec-a.ADD.stdin"));
    assert_eq!(
        a,
        json!({"type": "trellis-rec-a", "socket": "/run/x.sock",
               "name": "trellis-rec", "cniVersion": "1.1.0"}),
        "the first plugin: its config, name and version; no prevResult, no capabilities"
    );
    let b = read_json(&dir.join("trellis-rec-b.ADD.stdin"));
    assert_eq!(b["prevResult"]["by"], "trellis-rec-a");
    assert_eq!(
        b["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}),
        "only the capabilities the plugin declares (and enables)"
    );
    let env = read_env(&dir.join("trellis-rec-a.ADD.env"));
    assert_eq!(env_value(&env, "CNI_COMMAND"), "ADD");
    assert_eq!(env_value(&env, "CNI_CONTAINERID"), container_id);
    assert_eq!(
        env_value(&env, "CNI_NETNS"),
        pod.path().display().to_string()
    );
    assert_eq!(env_value(&env, "CNI_IFNAME"), "eth0");
    assert_eq!(
        env_value(&env, "CNI_ARGS"),
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=a;\
             K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=uid-1"
        )
    );
    assert_eq!(
        env_value(&env, "CNI_PATH"),
        format!("{}:{}", dir.join("missing").display(), bin.display())
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("trellis-rec-a.ADD.netns"))
            .unwrap()
            .trim(),
        node.id(),
        "plugins run in the node's namespace"
    );
    let cached = runtime
        .cached("trellis-rec", &container_id, "eth0")
        .unwrap()
        .expect("ADD caches the result");
    assert_eq!(cached.result["by"], "trellis-rec-b");
    assert_eq!(cached.netns.as_deref(), Some(pod.path().as_path()));

    runtime.check(&list, &rt).await.expect("CHECK");
    for name in ["trellis-rec-a", "trellis-rec-b"] {
        let stdin = read_json(&dir.join(format!("{name}.CHECK.stdin")));
        assert_eq!(
            stdin["prevResult"]["by"], "trellis-rec-b",
            "CHECK gives every plugin the cached result"
        );
    }

    runtime.status(&list).await.expect("STATUS");
    let status_env = read_env(&dir.join("trellis-rec-a.STATUS.env"));
    assert_eq!(env_value(&status_env, "CNI_CONTAINERID"), "");
    assert!(
        read_json(&dir.join("trellis-rec-b.STATUS.stdin"))
            .get("runtimeConfig")
            .is_none()
    );

    let keep = Attachment {
        container_id: container_id.clone(),
        ifname: "eth0".into(),
    };
    runtime
        .gc(&list, std::slice::from_ref(&keep))
        .await
        .expect("GC");
    let gc = read_json(&dir.join("trellis-rec-a.GC.stdin"));
    assert_eq!(
        gc["cni.dev/valid-attachments"],
        json!([{"containerID": container_id, "ifname": "eth0"}])
    );
    assert!(
        runtime
            .cached("trellis-rec", &container_id, "eth0")
            .unwrap()
            .is_some(),
        "a valid attachment is kept"
    );

    runtime.del(&list, &rt).await.expect("DEL");
    let del_b = read_json(&dir.join("trellis-rec-b.DEL.stdin"));
    assert_eq!(del_b["prevResult"]["by"], "trellis-rec-b");
    assert!(
        runtime
            .cached("trellis-rec", &container_id, "eth0")
            .unwrap()
            .is_none()
    );
    // Without a cached result DEL still runs, without prevResult.
    runtime.del(&list, &rt).await.expect("DEL again");
    assert!(
        read_json(&dir.join("trellis-rec-b.DEL.stdin"))
            .get("prevResult")
            .is_none()
    );
    let order = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        order.lines().collect::<Vec<_>>(),
        [
            "trellis-rec-a ADD",
            "trellis-rec-b ADD",
            "trellis-rec-a CHECK",
            "trellis-rec-b CHECK",
            "trellis-rec-a STATUS",
            "trellis-rec-b STATUS",
            "trellis-rec-a GC",
            "trellis-rec-b GC",
            "trellis-rec-b DEL",
            "trellis-rec-a DEL",
            "trellis-rec-b DEL",
            "trellis-rec-a DEL",
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether a netfilter tool portmap can use is installed (it runs `iptables` or `nft`).
fn have_netfilter_tools() -> bool {
    ["iptables", "nft"].iter().any(|tool| {
        Std::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn bridge_host_local_and_portmap_through_the_runtime() {
    assert!(
        have_netfilter_tools(),
        "portmap needs iptables or nft: apt-get install iptables nftables"
    );
    let plugins = binaries::cni_plugins_dir(&repo_root())
        .await
        .expect("the reference plugins");
    let dir = test_dir("bridge");
    let node = Netns::new("trellis-e2e-cnirt-bridge-node");
    let pod = Netns::new("trellis-e2e-cnirt-bridge-pod");
    let ipam_dir = dir.join("ipam");
    let list = write_conflist(
        &dir.join("net.d"),
        "10-bridge.conflist",
        &json!({"cniVersion": "1.1.0", "name": "trellis-bridge", "plugins": [
            {"type": "bridge", "bridge": "trellis-rtbr0", "isGateway": true,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.99.0.0/24"}]],
                      "dataDir": ipam_dir.display().to_string()}},
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
        ]}),
    );
    // Plugins are looked up in the node's (empty) bin dir first, as in the sandbox.
    let runtime = Runtime::new(
        vec![dir.join("bin"), plugins],
        Some(node.path()),
        dir.join("cache"),
    );
    let container_id = "b".repeat(64);
    let mut rt = RuntimeConf::for_pod(&container_id, &pod.path(), "default", "a", None);
    rt.capability_args.insert(
        "portMappings".into(),
        json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
    );

    let result = runtime.add(&list, &rt).await.expect("ADD");
    let ip = result.pod_ips()[0];
    assert_eq!(ip, "10.99.0.2".parse::<IpAddr>().unwrap(), "{result:?}");
    let allocation = ipam_dir.join("trellis-bridge").join(ip.to_string());
    assert!(
        std::fs::read_to_string(&allocation)
            .expect("host-local's allocation")
            .contains(&container_id)
    );
    // The pod has its address on eth0; the bridge and its gateway address are in the node.
    assert!(
        pod.exec(&["ip", "-4", "addr", "show", "dev", "eth0"])
            .contains("10.99.0.2/24")
    );
    assert!(
        node.exec(&["ip", "-4", "addr", "show", "dev", "trellis-rtbr0"])
            .contains("10.99.0.1/24")
    );
    node.exec(&["ping", "-c", "1", "-W", "5", &ip.to_string()]);
    // portmap's rules are in the node's namespace, never in the root namespace.
    let rules = node.exec(&["iptables-save", "-t", "nat"]);
    assert!(
        rules.contains("CNI-HOSTPORT-DNAT") && rules.contains("--dport 8080"),
        "{rules}"
    );
    let root_rules = run("iptables-save", &["-t", "nat"]);
    assert!(
        !root_rules.contains(&container_id) && !root_rules.contains("10.99.0.2"),
        "portmap wrote into the root namespace:\n{root_rules}"
    );

    runtime.check(&list, &rt).await.expect("CHECK");
    runtime.status(&list).await.expect("STATUS");
    // The reference runtime agrees (STATUS touches no results cache, so it leaves nothing in
    // /var/lib/cni).
    let cnitool = binaries::resolve(Tool::Cnitool, &repo_root())
        .await
        .expect("the pinned cnitool");
    let out = Std::new("nsenter")
        .arg(format!("--net={}", node.path().display()))
        .arg("--")
        .arg(&cnitool)
        .args([
            "status",
            "trellis-bridge",
            &pod.path().display().to_string(),
        ])
        .env("NETCONFPATH", dir.join("net.d"))
        .env("CNI_PATH", std::env::join_paths(&runtime.cni_path).unwrap())
        .output()
        .expect("run cnitool");
    assert!(
        out.status.success(),
        "cnitool status: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    runtime.del(&list, &rt).await.expect("DEL");
    assert!(!allocation.exists(), "DEL releases the address");
    assert!(
        !node
            .exec(&["iptables-save", "-t", "nat"])
            .contains("--dport 8080")
    );
    runtime.del(&list, &rt).await.expect("DEL of what is gone");
    assert!(matches!(
        runtime.check(&list, &rt).await,
        Err(CniError::NoCachedResult { .. })
    ));

    // GC: an attachment nobody vouches for is released (DEL with what was cached).
    let other = RuntimeConf::for_pod(&"d".repeat(64), &pod.path(), "default", "b", None);
    let ip = runtime
        .add(&list, &other)
        .await
        .expect("ADD again")
        .pod_ips()[0];
    let allocation = ipam_dir.join("trellis-bridge").join(ip.to_string());
    assert!(allocation.exists());
    runtime.gc(&list, &[]).await.expect("GC");
    assert!(!allocation.exists(), "GC releases host-local's allocation");
    assert!(runtime.cached_attachments().unwrap().is_empty());
    assert!(
        pod.exec(&["ip", "-j", "link", "show"])
            .matches("\"ifname\"")
            .count()
            == 1,
        "only lo is left in the pod"
    );
    drop((pod, node));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_failures_are_typed_errors() {
    let dir = test_dir("errors");
    let node = Netns::new("trellis-e2e-cnirt-errors-node");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    write_plugin(
        &bin,
        "trellis-fail",
        r#"cat >/dev/null
echo '{"cniVersion":"1.1.0","code":11,"msg":"try again later","details":"node not ready"}'
echo 'a log line' >&2
exit 3
"#,
    );
    write_plugin(&bin, "trellis-garbage", "echo 'panic: oops'\nexit 2\n");
    write_plugin(&bin, "trellis-hang", "exec sleep 600\n");
    write_plugin(&bin, "trellis-silent", "cat >/dev/null\n");
    let ok_log = dir.join("ok.log");
    write_plugin(
        &bin,
        "trellis-ok",
        &format!(
            "cat >/dev/null\necho $CNI_COMMAND >> {}\n",
            ok_log.display()
        ),
    );
    let runtime = Runtime::new(vec![bin.clone()], Some(node.path()), dir.join("cache"))
        .with_timeout(Duration::from_millis(500));
    let list = |plugin: &str| {
        NetworkConfigList::parse(
            Path::new("test"),
            json!({"cniVersion": "1.1.0", "name": "trellis-err", "plugins": [{"type": plugin}]})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
    };
    let rt = RuntimeConf::for_pod(&"e".repeat(64), &node.path(), "default", "a", None);

    let err = runtime.add(&list("trellis-fail"), &rt).await.unwrap_err();
    let failure = err.plugin_failure().unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(
        (
            failure.plugin.as_str(),
            failure.command,
            failure.code,
            failure.msg.as_str(),
            failure.details.as_str(),
            failure.status.code(),
            failure.stderr.trim(),
        ),
        (
            "trellis-fail",
            Command::Add,
            11,
            "try again later",
            "node not ready",
            Some(3),
            "a log line"
        )
    );
    let _: &PluginFailure = failure;
    assert!(
        runtime.cached_attachments().unwrap().is_empty(),
        "a failed ADD caches nothing"
    );
    let err = runtime.status(&list("trellis-fail")).await.unwrap_err();
    assert_eq!(err.code(), Some(11));

    match runtime.add(&list("trellis-garbage"), &rt).await {
        Err(CniError::BadOutput { stdout, status, .. }) => {
            assert_eq!(stdout.trim(), "panic: oops");
            assert_eq!(status.code(), Some(2));
        }
        other => panic!("{other:?}"),
    }
    match runtime.add(&list("trellis-silent"), &rt).await {
        Err(CniError::BadOutput { reason, .. }) => assert!(reason.contains("no JSON"), "{reason}"),
        other => panic!("{other:?}"),
    }
    match runtime.add(&list("trellis-missing"), &rt).await {
        Err(CniError::PluginNotFound { plugin, path }) => {
            assert_eq!(
                (plugin.as_str(), path),
                ("trellis-missing", vec![bin.clone()])
            );
        }
        other => panic!("{other:?}"),
    }
    // DEL stops at the first failure (libcni); the teardown variant goes on to every plugin.
    let chain = NetworkConfigList::parse(
        Path::new("test"),
        json!({"cniVersion": "1.1.0", "name": "trellis-err", "plugins": [
            {"type": "trellis-ok"}, {"type": "trellis-fail"}]})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let err = runtime.del(&chain, &rt).await.unwrap_err();
    assert_eq!(err.code(), Some(11));
    assert!(!ok_log.exists(), "DEL went past a failure");
    let err = runtime.del_keep_going(&chain, &rt).await.unwrap_err();
    assert_eq!(err.code(), Some(11));
    assert_eq!(std::fs::read_to_string(&ok_log).unwrap(), "DEL\n");

    match runtime.del(&list("trellis-hang"), &rt).await {
        Err(CniError::Timeout {
            plugin, command, ..
        }) => assert_eq!((plugin.as_str(), command), ("trellis-hang", Command::Del)),
        other => panic!("{other:?}"),
    }
    // The killed plugin goes (it ran `sleep` in this test's namespace only).
    wait_for(
        "the timed-out plugin to be gone",
        Duration::from_secs(10),
        || async {
            run("ip", &["netns", "pids", &node.name])
                .trim()
                .is_empty()
                .then_some(())
        },
    )
    .await;
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
