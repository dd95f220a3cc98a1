//! The Trellis API against a real kube-apiserver: every sample applies, every
//! manifest in `config/samples/invalid/` is rejected with an error that names
//! the offending field, schema defaults and list-map merging behave as the
//! types promise, and `kubectl get` shows the printer columns.
//!
//! One control plane serves all scenarios of this file (starting one costs
//! seconds and two cores are shared with the compiler); the scenarios run in
//! sequence, each in its own namespace or with its own object names, and every
//! failure is reported, not just the first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use trellis_api::v1alpha1::{
    Encapsulation, IPPool, NetworkConfig, NetworkStatus, NodeEndpoints, NodeNetwork, PolicyBundle,
    PolicyEnforcement, SecurityIdentity,
};
use trellis_e2e::{ControlPlane, StartOptions, Tool, binaries, controlplane::repo_root};

type Outcome = Result<(), String>;

/// What a scenario needs: the API client and a way to run the pinned kubectl.
struct Ctx {
    client: kube::Client,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    repo: PathBuf,
}

struct KubectlOutput {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Ctx {
    async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> KubectlOutput {
        let mut cmd = tokio::process::Command::new(&self.kubectl);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kubectl");
        if let Some(input) = stdin {
            use tokio::io::AsyncWriteExt;
            let mut pipe = child.stdin.take().expect("kubectl stdin");
            pipe.write_all(input.as_bytes())
                .await
                .expect("write kubectl stdin");
        }
        let out = child.wait_with_output().await.expect("kubectl output");
        KubectlOutput {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn fresh_namespace(&self, prefix: &str) -> String {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"generateName": format!("trellis-{prefix}-")}
        }))
        .expect("namespace");
        let created = api
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        created.metadata.name.expect("generated name")
    }
}

/// A manifest from `config/samples/invalid/` with its expectations.
struct InvalidSample {
    file: String,
    field: String,
    message: String,
    /// YAML documents: with two, the first is created and the second, an
    /// update of it, must be rejected.
    documents: Vec<String>,
}

fn invalid_samples(repo: &Path) -> Vec<InvalidSample> {
    let dir = repo.join("config/samples/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("config/samples/invalid")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("read invalid sample");
            let header = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                    .unwrap_or_else(|| panic!("{} lacks a '# {key}:' header", path.display()))
                    .trim()
                    .to_owned()
            };
            InvalidSample {
                file: path
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned(),
                field: header("expect-field"),
                message: header("expect-message"),
                documents: text.split("\n---\n").map(str::to_owned).collect(),
            }
        })
        .collect()
}

/// Every valid sample applies, and reads back through the Rust types.
async fn samples_apply(ctx: &Ctx) -> Outcome {
    let ns = ctx.fresh_namespace("samples").await;
    let dir = ctx.repo.join("config/samples");
    let out = ctx
        .kubectl(
            &["apply", "-n", &ns, "-f", dir.to_str().expect("utf-8 path")],
            None,
        )
        .await;
    if !out.ok {
        return Err(format!(
            "kubectl apply -f config/samples failed:\n{}",
            out.stderr
        ));
    }
    let lines = out
        .stdout
        .lines()
        .filter(|l| l.ends_with(" created") || l.ends_with(" unchanged"))
        .count();
    if lines < 10 {
        return Err(format!(
            "expected at least 10 objects applied, kubectl said:\n{}",
            out.stdout
        ));
    }
    let c = &ctx.client;
    let config = Api::<NetworkConfig>::all(c.clone())
        .get("default")
        .await
        .map_err(|e| e.to_string())?;
    let pools = Api::<IPPool>::all(c.clone())
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let bundles = Api::<PolicyBundle>::all(c.clone())
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let nodes = Api::<NodeNetwork>::all(c.clone())
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let statuses = Api::<NetworkStatus>::all(c.clone())
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let identities = Api::<SecurityIdentity>::all(c.clone())
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let shards = Api::<NodeEndpoints>::all(c.clone())
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let netpols = ctx
        .kubectl(&["get", "networkpolicies", "-n", &ns, "-o", "name"], None)
        .await;
    let mut got = vec![
        format!("networkconfig/{}", config.metadata.name.unwrap_or_default()),
        format!("ippools={}", pools.items.len()),
        format!("policybundles={}", bundles.items.len()),
        format!("nodenetworks={}", nodes.items.len()),
        format!("networkstatuses={}", statuses.items.len()),
        format!("securityidentities={}", identities.items.len()),
        format!(
            "nodeendpoints={} with {} endpoints",
            shards.items.len(),
            shards
                .items
                .iter()
                .map(|s| s.spec.endpoints.len())
                .sum::<usize>()
        ),
    ];
    got.extend(netpols.stdout.lines().map(str::to_owned));
    got.sort();
    let mut want = vec![
        "networkconfig/default".to_owned(),
        "ippools=2".to_owned(),
        "policybundles=5".to_owned(),
        "nodenetworks=1".to_owned(),
        "networkstatuses=1".to_owned(),
        "securityidentities=1".to_owned(),
        "nodeendpoints=1 with 2 endpoints".to_owned(),
        "networkpolicy.networking.k8s.io/allow-frontend-to-backend".to_owned(),
        "networkpolicy.networking.k8s.io/default-deny-ingress".to_owned(),
    ];
    want.sort();
    if got != want {
        return Err(format!(
            "objects after applying the samples: got {got:?}, want {want:?}"
        ));
    }
    Ok(())
}

/// Every invalid manifest is refused, with an error that names its field and
/// says what is wrong; a refused update leaves the stored object unchanged.
async fn invalid_samples_are_rejected(ctx: &Ctx) -> Outcome {
    let samples = invalid_samples(&ctx.repo);
    if samples.len() < 15 {
        return Err(format!(
            "only {} invalid samples; the API promises at least 15",
            samples.len()
        ));
    }
    let mut failures = Vec::new();
    for sample in &samples {
        let (base, attempt) = match sample.documents.as_slice() {
            [one] => (None, one),
            [base, update] => (Some(base), update),
            _ => {
                failures.push(format!(
                    "{}: expected one or two YAML documents",
                    sample.file
                ));
                continue;
            }
        };
        if let Some(base) = base {
            let out = ctx.kubectl(&["create", "-f", "-"], Some(base)).await;
            if !out.ok {
                failures.push(format!(
                    "{}: the base object was refused: {}",
                    sample.file, out.stderr
                ));
                continue;
            }
        }
        let verb = if base.is_some() { "replace" } else { "create" };
        let out = ctx.kubectl(&[verb, "-f", "-"], Some(attempt)).await;
        if out.ok {
            failures.push(format!(
                "{}: accepted by the apiserver: {}",
                sample.file,
                out.stdout.trim()
            ));
            continue;
        }
        let err = out.stderr.trim();
        if !err.contains("is invalid") {
            failures.push(format!(
                "{}: failed, but not as a validation error: {err}",
                sample.file
            ));
        }
        if !err.contains(&sample.field) {
            failures.push(format!(
                "{}: error does not name field {:?}: {err}",
                sample.file, sample.field
            ));
        }
        if !err.contains(&sample.message) {
            failures.push(format!(
                "{}: error lacks {:?}: {err}",
                sample.file, sample.message
            ));
        }
        if let Some(base) = base {
            // The rejected update lost nothing: the stored spec is the base's.
            let stored = ctx
                .kubectl(&["get", "-f", "-", "-o", "json"], Some(base))
                .await;
            let base_spec: serde_yaml::Value =
                serde_yaml::from_str::<serde_yaml::Value>(base).expect("base YAML")["spec"].clone();
            let stored: serde_json::Value = match serde_json::from_str(&stored.stdout) {
                Ok(v) => v,
                Err(e) => {
                    failures.push(format!(
                        "{}: cannot read the stored object back: {e}: {}",
                        sample.file, stored.stderr
                    ));
                    continue;
                }
            };
            // `get -f` answers with a List of the file's objects: one here.
            let stored_spec = if stored["kind"] == "List" {
                &stored["items"][0]["spec"]
            } else {
                &stored["spec"]
            };
            for (key, value) in base_spec.as_mapping().into_iter().flatten() {
                let key = key.as_str().expect("string key");
                let want = serde_json::to_value(value).expect("as JSON");
                if stored_spec[key] != want {
                    failures.push(format!(
                        "{}: after the rejected update spec.{key} is {}, want {want}",
                        sample.file, stored_spec[key]
                    ));
                }
            }
            ctx.kubectl(&["delete", "-f", "-", "--wait=false"], Some(base))
                .await;
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// A node's shard may name at most `MAX_NODE_NAMED_PORTS` ports in all (a
/// CEL rule over the whole list, which no single-field sample can reach).
async fn node_endpoints_named_port_total(ctx: &Ctx) -> Outcome {
    use trellis_api::v1alpha1::{
        MAX_ENDPOINT_NAMED_PORTS, MAX_NODE_NAMED_PORTS, NamedPort, NodeEndpointsSpec, PodEndpoint,
        Protocol,
    };
    let api = Api::<NodeEndpoints>::all(ctx.client.clone());
    let shard = |pods: usize| {
        let endpoints = (0..pods)
            .map(|i| PodEndpoint {
                namespace: "payments".to_owned(),
                name: format!("checkout-{i}"),
                addresses: vec![format!("10.244.{}.{}", i / 250, i % 250 + 1)],
                identity: 3_022_894,
                named_ports: (0..MAX_ENDPOINT_NAMED_PORTS)
                    .map(|p| NamedPort {
                        name: format!("port-{p}"),
                        protocol: Protocol::Tcp,
                        port: 10_000 + i32::try_from(p).expect("small"),
                    })
                    .collect(),
            })
            .collect();
        NodeEndpoints::new("trellis-e2e-ports", NodeEndpointsSpec { endpoints })
    };
    let at_limit = MAX_NODE_NAMED_PORTS / MAX_ENDPOINT_NAMED_PORTS;
    let _ = api.delete("trellis-e2e-ports", &Default::default()).await;
    api.create(&PostParams::default(), &shard(at_limit))
        .await
        .map_err(|e| format!("{at_limit} pods with {MAX_ENDPOINT_NAMED_PORTS} named ports each (the limit) refused: {e}"))?;
    let _ = api.delete("trellis-e2e-ports", &Default::default()).await;
    match api
        .create(&PostParams::default(), &shard(at_limit + 1))
        .await
    {
        Ok(_) => Err(format!(
            "{} named ports accepted; the limit is {MAX_NODE_NAMED_PORTS}",
            (at_limit + 1) * MAX_ENDPOINT_NAMED_PORTS
        )),
        Err(e)
            if e.to_string().contains(&format!(
                "at most {MAX_NODE_NAMED_PORTS} named ports in all"
            )) =>
        {
            Ok(())
        }
        Err(e) => Err(format!("refused, but not by the named-port total: {e}")),
    }
}

/// The size budget of a node's shard: the apiserver's CEL rule and
/// `NodeEndpointsSpec::check_limits` (what the node checks before it admits
/// a pod) draw the line at the same byte: a shard the estimate puts exactly at
/// `MAX_NODE_ENDPOINTS_BYTES` is taken, one character more is refused with
/// the rule's message.
async fn node_endpoints_size_budget(ctx: &Ctx) -> Outcome {
    use trellis_api::v1alpha1::{
        MAX_NODE_ENDPOINTS_BYTES, NodeEndpointsSpec, PodEndpoint, ShardLimit,
    };
    let api = Api::<NodeEndpoints>::all(ctx.client.clone());
    let endpoint = |i: usize, name_len: usize| PodEndpoint {
        namespace: "payments".to_owned(),
        name: format!("{i:04}{}", "x".repeat(name_len - 4)),
        addresses: vec![
            format!("10.244.{}.{}", i / 250, i % 250 + 1),
            format!("fd00:10:244::{i:x}"),
        ],
        identity: 3_022_894,
        named_ports: Vec::new(),
    };
    // Long names until the estimate is as close to the limit as whole endpoints get, then
    // the last name made longer to land on it exactly.
    let mut spec = NodeEndpointsSpec::default();
    let mut i = 0;
    while spec.estimated_bytes() + endpoint(i, 253).estimated_bytes() <= MAX_NODE_ENDPOINTS_BYTES {
        spec.endpoints.push(endpoint(i, 253));
        i += 1;
    }
    let rest = MAX_NODE_ENDPOINTS_BYTES - spec.estimated_bytes();
    let last = endpoint(i, 4);
    let name_len = 4 + rest - last.estimated_bytes();
    if !(4..=253).contains(&name_len) {
        return Err(format!("cannot land on the limit: {rest} bytes left"));
    }
    spec.endpoints.push(endpoint(i, name_len));
    if spec.estimated_bytes() != MAX_NODE_ENDPOINTS_BYTES || spec.check_limits().is_err() {
        return Err(format!(
            "the shard at the limit is estimated {} bytes: {:?}",
            spec.estimated_bytes(),
            spec.check_limits()
        ));
    }
    let object = |spec: NodeEndpointsSpec| NodeEndpoints::new("trellis-e2e-size", spec);
    let _ = api.delete("trellis-e2e-size", &Default::default()).await;
    api.create(&PostParams::default(), &object(spec.clone()))
        .await
        .map_err(|e| {
            format!(
                "a shard estimated at exactly {MAX_NODE_ENDPOINTS_BYTES} bytes ({} pods) refused: {e}",
                spec.endpoints.len()
            )
        })?;
    let _ = api.delete("trellis-e2e-size", &Default::default()).await;
    let mut over = spec;
    if let Some(e) = over.endpoints.last_mut() {
        e.name.push('y');
    }
    if !matches!(over.check_limits(), Err(ShardLimit::Bytes(_))) {
        return Err(format!(
            "one byte over: check_limits says {:?}",
            over.check_limits()
        ));
    }
    match api.create(&PostParams::default(), &object(over)).await {
        Ok(_) => Err(format!(
            "a shard estimated at {} bytes accepted; the limit is {MAX_NODE_ENDPOINTS_BYTES}",
            MAX_NODE_ENDPOINTS_BYTES + 1
        )),
        Err(e)
            if e.to_string().contains(&format!(
                "would take more than {MAX_NODE_ENDPOINTS_BYTES} bytes"
            )) =>
        {
            Ok(())
        }
        Err(e) => Err(format!("refused, but not by the size budget: {e}")),
    }
}

/// `spec: {}` is filled in by the apiserver with the documented defaults, so
/// every reader sees the same values.
async fn schema_defaults(ctx: &Ctx) -> Outcome {
    let api = Api::<NetworkConfig>::all(ctx.client.clone());
    // The samples scenario may have created `default`; start from empty.
    let _ = api.delete("default", &Default::default()).await;
    let out = ctx
        .kubectl(
            &["create", "-f", "-"],
            Some("apiVersion: network.trellis.dev/v1alpha1\nkind: NetworkConfig\nmetadata: {name: default}\nspec: {}\n"),
        )
        .await;
    if !out.ok {
        return Err(format!("empty NetworkConfig refused: {}", out.stderr));
    }
    let config = api.get("default").await.map_err(|e| e.to_string())?;
    let spec = &config.spec;
    let got = (
        spec.encapsulation,
        spec.vxlan.vni,
        spec.vxlan.port,
        spec.mtu,
        spec.policy_enforcement,
    );
    let want = (
        Encapsulation::Vxlan,
        1,
        8472,
        None,
        PolicyEnforcement::Default,
    );
    if got != want {
        return Err(format!("defaults: got {got:?}, want {want:?}"));
    }
    // The defaults are stored, not only computed by our deserializer.
    let raw = ctx
        .kubectl(&["get", "networkconfig", "default", "-o", "json"], None)
        .await;
    let raw: serde_json::Value = serde_json::from_str(&raw.stdout).map_err(|e| e.to_string())?;
    let stored = &raw["spec"];
    let want = json!({"encapsulation": "VXLAN", "vxlan": {"vni": 1, "port": 8472}, "policyEnforcement": "Default"});
    if *stored != want {
        return Err(format!("stored spec {stored}, want {want}"));
    }
    Ok(())
}

/// Conditions are a list-map keyed by `type`: two writers applying different
/// condition types with server-side apply both keep theirs.
async fn conditions_merge_by_type(ctx: &Ctx) -> Outcome {
    let api = Api::<NetworkStatus>::all(ctx.client.clone());
    let name = "trellis-e2e-merge";
    let _ = api.delete(name, &Default::default()).await;
    let object = json!({
        "apiVersion": "network.trellis.dev/v1alpha1", "kind": "NetworkStatus",
        "metadata": {"name": name}, "spec": {}
    });
    api.patch(
        name,
        &PatchParams::apply("trellis-e2e").force(),
        &Patch::Apply(&object),
    )
    .await
    .map_err(|e| format!("create: {e}"))?;
    let condition = |type_: &str| {
        json!({
            "apiVersion": "network.trellis.dev/v1alpha1", "kind": "NetworkStatus",
            "metadata": {"name": name},
            "status": {"conditions": [{
                "type": type_, "status": "True", "reason": "Converged", "message": "e2e",
                "lastTransitionTime": "2026-01-01T00:00:00Z"
            }]}
        })
    };
    for (manager, type_) in [
        ("trellis-e2e-tunnel", "TunnelReady"),
        ("trellis-e2e-routes", "RoutesReady"),
    ] {
        api.patch_status(
            name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&condition(type_)),
        )
        .await
        .map_err(|e| format!("apply {type_}: {e}"))?;
    }
    let status = api
        .get_status(name)
        .await
        .map_err(|e| e.to_string())?
        .status
        .unwrap_or_default();
    let mut types: Vec<_> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    types.sort();
    if types != ["RoutesReady", "TunnelReady"] {
        return Err(format!(
            "conditions after two appliers: {types:?}, want both"
        ));
    }
    Ok(())
}

/// `kubectl get` of every kind works and shows the printer columns declared
/// in the CRDs, with values from the objects.
async fn printer_columns(ctx: &Ctx) -> Outcome {
    let api = Api::<NetworkStatus>::all(ctx.client.clone());
    let name = "trellis-e2e-columns";
    let _ = api.delete(name, &Default::default()).await;
    let object = json!({
        "apiVersion": "network.trellis.dev/v1alpha1", "kind": "NetworkStatus",
        "metadata": {"name": name}, "spec": {}
    });
    let manager = PatchParams::apply("trellis-e2e").force();
    api.patch(name, &manager, &Patch::Apply(&object))
        .await
        .map_err(|e| e.to_string())?;
    let status = json!({
        "apiVersion": "network.trellis.dev/v1alpha1", "kind": "NetworkStatus",
        "metadata": {"name": name},
        "status": {
            "podCIDRs": ["10.244.7.0/24"], "encapsulation": "VXLAN", "endpoints": 3, "peers": 2,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Converged", "message": "e2e",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]
        }
    });
    api.patch_status(name, &manager, &Patch::Apply(&status))
        .await
        .map_err(|e| e.to_string())?;

    let mut failures = Vec::new();
    let out = ctx
        .kubectl(
            &[
                "get",
                "networkconfigs,ippools,policybundles,nodenetworks,networkstatuses,securityidentities,nodeendpoints",
            ],
            None,
        )
        .await;
    if !out.ok {
        return Err(format!("kubectl get of every kind failed: {}", out.stderr));
    }
    // kubectl prints one table per kind, each starting with a NAME header.
    let headers: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("NAME "))
        .collect();
    for crd in trellis_api::crds::all() {
        let kind = &crd.spec.names.kind;
        let columns = crd.spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap_or_default();
        let wanted: Vec<String> = columns
            .iter()
            .filter(|c| c.priority.unwrap_or(0) == 0)
            .map(|c| c.name.to_uppercase())
            .collect();
        if !headers
            .iter()
            .any(|h| wanted.iter().all(|w| h.contains(w.as_str())))
        {
            failures.push(format!(
                "no table header with {kind}'s columns {wanted:?} in:\n{}",
                out.stdout
            ));
        }
    }
    // Values, read through the columns: one row of the NetworkStatus table.
    let row = ctx
        .kubectl(
            &[
                "get",
                "networkstatus",
                name,
                "--no-headers",
                "-o",
                "custom-columns=X:.metadata.name",
            ],
            None,
        )
        .await;
    if row.stdout.trim() != name {
        failures.push(format!("networkstatus {name} not listed: {}", row.stderr));
    }
    let table = ctx.kubectl(&["get", "networkstatus", name], None).await;
    let cells = table_cells(&table.stdout);
    let expect = [
        ("POD CIDRS", "[\"10.244.7.0/24\"]"),
        ("MODE", "VXLAN"),
        ("ENDPOINTS", "3"),
        ("PEERS", "2"),
        ("READY", "True"),
    ];
    for (column, value) in expect {
        if cells.get(column).map(String::as_str) != Some(value) {
            failures.push(format!(
                "column {column}: got {:?}, want {value:?} in:\n{}",
                cells.get(column),
                table.stdout
            ));
        }
    }
    let wide = ctx.kubectl(&["get", "ippools", "-o", "wide"], None).await;
    if !wide.stdout.contains("DISABLED") {
        failures.push(format!(
            "-o wide does not add the priority-1 DISABLED column:\n{}",
            wide.stdout
        ));
    }
    // The sample identity (applied by `samples_apply`): its namespace, and
    // its pod labels with -o wide.
    let identity = ctx
        .kubectl(
            &["get", "securityidentities", "3022894", "-o", "wide"],
            None,
        )
        .await;
    let cells = table_cells(&identity.stdout);
    if cells.get("NAMESPACE").map(String::as_str) != Some("payments")
        || !identity
            .stdout
            .contains(r#"{"app":"checkout","tier":"backend"}"#)
    {
        failures.push(format!(
            "securityidentity 3022894 -o wide lacks its namespace or pod labels:\n{}{}",
            identity.stdout, identity.stderr
        ));
    }
    let category = ctx.kubectl(&["get", "trellis"], None).await;
    if !category.ok
        || !category
            .stdout
            .contains(&format!("networkstatus.network.trellis.dev/{name}"))
    {
        failures.push(format!(
            "`kubectl get trellis` (the category) does not list every kind:\n{}{}",
            category.stdout, category.stderr
        ));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// Splits a one-row kubectl table into column → cell, using the header's
/// column offsets (column names contain spaces, cells here do not).
fn table_cells(table: &str) -> BTreeMap<String, String> {
    let mut lines = table.lines();
    let (Some(header), Some(row)) = (lines.next(), lines.next()) else {
        return BTreeMap::new();
    };
    let mut starts = vec![0];
    let bytes = header.as_bytes();
    for i in 2..bytes.len() {
        if bytes[i] != b' ' && bytes[i - 1] == b' ' && bytes[i - 2] == b' ' {
            starts.push(i);
        }
    }
    let mut cells = BTreeMap::new();
    for (n, &start) in starts.iter().enumerate() {
        let end = starts
            .get(n + 1)
            .copied()
            .unwrap_or(header.len().max(row.len()));
        let name = header
            .get(start..end.min(header.len()))
            .unwrap_or("")
            .trim()
            .to_owned();
        let cell = row
            .get(start.min(row.len())..end.min(row.len()))
            .unwrap_or("")
            .trim()
            .to_owned();
        cells.insert(name, cell);
    }
    cells
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_against_a_real_apiserver() {
    let repo = repo_root();
    let mut cp = ControlPlane::start(StartOptions::for_test("api-validation"))
        .await
        .expect("control plane");
    let ctx = Ctx {
        client: cp.client(),
        kubectl: binaries::resolve(Tool::Kubectl, &repo)
            .await
            .expect("pinned kubectl"),
        kubeconfig: cp.kubeconfig_path(),
        repo,
    };

    let mut failures = Vec::new();
    macro_rules! scenario {
        ($f:ident) => {
            match $f(&ctx).await {
                Ok(()) => eprintln!("scenario {} ... ok", stringify!($f)),
                Err(e) => {
                    eprintln!("scenario {} ... FAILED", stringify!($f));
                    failures.push(format!("{}:\n{e}", stringify!($f)));
                }
            }
        };
    }
    scenario!(samples_apply);
    scenario!(invalid_samples_are_rejected);
    scenario!(node_endpoints_named_port_total);
    scenario!(node_endpoints_size_budget);
    scenario!(schema_defaults);
    scenario!(conditions_merge_by_type);
    scenario!(printer_columns);

    cp.stop().expect("stop control plane");
    assert!(
        failures.is_empty(),
        "{} scenario(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
