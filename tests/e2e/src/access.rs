//! The sandbox's components run with the access the manifests give them, never as the admin:
//! the ServiceAccounts, roles and admission policy of `config/rbac` (what
//! `kubectl apply -k config/default` installs in a cluster), and a token of their own.
//!
//! ```text
//!  ControlPlane::start ─► kubectl apply --server-side -k config/rbac              (as the admin)
//!                          ServiceAccounts trellis-operator, trellis-node (trellis-system),
//!                          their ClusterRoles, Roles and bindings, the admission policy
//!  operator ─► TokenRequest trellis-system/trellis-operator            ─► <state>/operator.kubeconfig
//!  node N   ─► TokenRequest trellis-system/trellis-node, bound to Node N ─► <state>/nodes/N/kubeconfig
//!               (the token names node N in authentication.kubernetes.io/node-name, as the
//!                token of a DaemonSet pod on N does)
//! ```
//!
//! So a permission the manifests lack fails the sandbox's tests, as it would fail a cluster.
//! The test harness itself (Nodes, Pods, status written as a kubelet writes it) keeps the
//! admin's credentials.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::Api;
use kube::api::PostParams;

use crate::binaries::{self, Tool};
use crate::certs;
use crate::crds::FIELD_MANAGER;
use crate::error::{Error, Result};
use crate::kubeconfig;
use crate::operator::SYSTEM_NAMESPACE;
use crate::sandbox::Sandbox;

/// The kustomization with every ServiceAccount, role, binding and admission policy, relative
/// to the repository root.
pub const RBAC_DIR: &str = "config/rbac";
/// The operator's ServiceAccount (in [`SYSTEM_NAMESPACE`]).
pub const OPERATOR_ACCOUNT: &str = "trellis-operator";
/// Every node reconciler's ServiceAccount (in [`SYSTEM_NAMESPACE`]).
pub const NODE_ACCOUNT: &str = "trellis-node";
/// The user extra in which a token bound to a Pod or a Node names the node; the admission
/// policy compares it with the name of what a node reconciler writes.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// How long a sandbox component's token lasts. Tokens are minted when the component starts
/// and never refreshed: a sandbox left up for longer needs its components restarted (`down`,
/// `up`).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// The user name a ServiceAccount's tokens authenticate as:
/// `system:serviceaccount:trellis-system:<account>`.
pub fn user(account: &str) -> String {
    format!("system:serviceaccount:{SYSTEM_NAMESPACE}:{account}")
}

/// `kubectl --kubeconfig <kubeconfig> apply --server-side --field-manager trellis-sandbox -k
/// <repo_root>/config/rbac`, with the pinned kubectl (see [`binaries::resolve`]). The namespace
/// [`SYSTEM_NAMESPACE`] must exist.
pub async fn install(repo_root: &Path, kubeconfig: &Path) -> Result<()> {
    let kubectl = binaries::resolve(Tool::Kubectl, repo_root).await?;
    let dir = repo_root.join(RBAC_DIR);
    let args = [
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "apply".into(),
        "--server-side".into(),
        format!("--field-manager={FIELD_MANAGER}"),
        "-k".into(),
        dir.display().to_string(),
    ];
    let command = format!("{} {}", kubectl.display(), args.join(" "));
    let output = tokio::process::Command::new(&kubectl)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| Error::Command {
            command: command.clone(),
            reason: format!("could not be run: {e}"),
            stderr: String::new(),
        })?;
    if !output.status.success() {
        return Err(Error::Command {
            command,
            reason: format!("exited with {}", output.status),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    tracing::info!(dir = %dir.display(), "installed the manifests' ServiceAccounts, roles and admission policy");
    Ok(())
}

/// A token of ServiceAccount `account` in [`SYSTEM_NAMESPACE`] from the TokenRequest API
/// (asked as the admin, through `client`), valid for [`TOKEN_LIFETIME`]. With `node`, the
/// token is bound to that Node object: it names the node ([`NODE_NAME_EXTRA`]) and stops
/// working when the Node is deleted.
pub async fn token(client: &kube::Client, account: &str, node: Option<&Node>) -> Result<String> {
    let bound_object_ref = node.map(|n| BoundObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: n.metadata.name.clone(),
        uid: n.metadata.uid.clone(),
    });
    let what = match node.and_then(|n| n.metadata.name.as_deref()) {
        Some(name) => format!("request a token of {} bound to Node {name}", user(account)),
        None => format!("request a token of {}", user(account)),
    };
    let request = TokenRequest {
        spec: TokenRequestSpec {
            // None: the apiserver's own audiences.
            audiences: Vec::new(),
            bound_object_ref,
            expiration_seconds: Some(i64::try_from(TOKEN_LIFETIME.as_secs()).unwrap_or(i64::MAX)),
        },
        ..TokenRequest::default()
    };
    let made = Api::<ServiceAccount>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .map_err(|e| Error::kube(what.clone(), e))?;
    match made.status.map(|s| s.token) {
        Some(token) if !token.is_empty() => Ok(token),
        _ => Err(Error::Access {
            action: what,
            reason: "the TokenRequest came back without a token".into(),
        }),
    }
}

/// Write a kubeconfig with `token` for the sandbox's apiserver (its URL and CA from the admin
/// kubeconfig) to `path`, readable by its owner only.
pub fn write_kubeconfig(sandbox: &Sandbox, path: &Path, token: &str) -> Result<()> {
    let (server, ca) = kubeconfig::server_and_ca(&sandbox.kubeconfig_path())?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    }
    certs::write_file(path, &kubeconfig::render_token(&server, &ca, token), 0o600)
}

/// The operator's kubeconfig, with a fresh token of [`OPERATOR_ACCOUNT`]:
/// `<state>/operator.kubeconfig`.
pub async fn operator_kubeconfig(sandbox: &Sandbox, client: &kube::Client) -> Result<PathBuf> {
    let token = token(client, OPERATOR_ACCOUNT, None).await?;
    let path = sandbox.operator_kubeconfig_path();
    write_kubeconfig(sandbox, &path, &token)?;
    Ok(path)
}

/// Node `node`'s kubeconfig for its `trellis-node`, with a fresh token of [`NODE_ACCOUNT`]
/// bound to its Node object: `<state>/nodes/<node>/kubeconfig`.
pub async fn node_kubeconfig(
    sandbox: &Sandbox,
    client: &kube::Client,
    node: &str,
) -> Result<PathBuf> {
    let object = Api::<Node>::all(client.clone())
        .get(node)
        .await
        .map_err(|e| Error::kube(format!("read Node {node} (to bind its token to)"), e))?;
    let token = token(client, NODE_ACCOUNT, Some(&object)).await?;
    let path = sandbox.node_dirs(node).kubeconfig();
    write_kubeconfig(sandbox, &path, &token)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_paths() {
        assert_eq!(
            user(NODE_ACCOUNT),
            "system:serviceaccount:trellis-system:trellis-node"
        );
        let sandbox = Sandbox::new("/s");
        assert_eq!(
            sandbox.operator_kubeconfig_path(),
            Path::new("/s/operator.kubeconfig")
        );
        assert_eq!(
            sandbox.node_dirs("trellis-node-1").kubeconfig(),
            Path::new("/s/nodes/trellis-node-1/kubeconfig")
        );
    }

    #[test]
    fn the_rbac_kustomization_names_these_accounts() {
        let dir = crate::controlplane::repo_root().join(RBAC_DIR);
        let text = std::fs::read_to_string(dir.join("service_accounts.yaml")).unwrap();
        let names: Vec<(String, String)> = serde_yaml::Deserializer::from_str(&text)
            .map(|doc| {
                let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
                let name = v["metadata"]["name"].as_str().unwrap().to_owned();
                let ns = v["metadata"]["namespace"].as_str().unwrap().to_owned();
                (ns, name)
            })
            .collect();
        for account in [OPERATOR_ACCOUNT, NODE_ACCOUNT] {
            assert!(
                names.contains(&(SYSTEM_NAMESPACE.to_owned(), account.to_owned())),
                "{account} not in {names:?}"
            );
        }
    }
}
