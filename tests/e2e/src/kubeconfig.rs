//! The admin kubeconfig: rendered once per `up` with every credential embedded, so the file alone
//! is enough for `kubectl --kubeconfig` and for [`client`].

use std::path::Path;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::error::{Error, Result};

/// Name of the cluster, user and context in the generated kubeconfig.
pub const CONTEXT: &str = "trellis-sandbox";

/// Render a kubeconfig for `server` (e.g. `https://127.0.0.1:6443`) that trusts `ca_pem` and
/// authenticates with the client certificate `cert_pem` / `key_pem`.
pub fn render(server: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> String {
    let ca = STANDARD.encode(ca_pem);
    let cert = STANDARD.encode(cert_pem);
    let key = STANDARD.encode(key_pem);
    // Every value is either a fixed name, base64 or a URL without quotes or backslashes, so
    // double-quoted YAML scalars need no escaping.
    format!(
        r#"apiVersion: v1
kind: Config
clusters:
- name: {CONTEXT}
  cluster:
    server: "{server}"
    certificate-authority-data: "{ca}"
users:
- name: {CONTEXT}
  user:
    client-certificate-data: "{cert}"
    client-key-data: "{key}"
contexts:
- name: {CONTEXT}
  context:
    cluster: {CONTEXT}
    user: {CONTEXT}
    namespace: default
current-context: {CONTEXT}
"#
    )
}

/// Render a kubeconfig for `server` that trusts `ca_pem` and authenticates with the bearer
/// `token` (a ServiceAccount token): what a component running under its own ServiceAccount
/// uses instead of the admin's certificate.
pub fn render_token(server: &str, ca_pem: &str, token: &str) -> String {
    let ca = STANDARD.encode(ca_pem);
    // A token is a JWT: base64url segments and dots, nothing to escape in double quotes.
    format!(
        r#"apiVersion: v1
kind: Config
clusters:
- name: {CONTEXT}
  cluster:
    server: "{server}"
    certificate-authority-data: "{ca}"
users:
- name: {CONTEXT}
  user:
    token: "{token}"
contexts:
- name: {CONTEXT}
  context:
    cluster: {CONTEXT}
    user: {CONTEXT}
current-context: {CONTEXT}
"#
    )
}

/// The server URL and CA certificate (PEM) of the kubeconfig at `path`, as [`render`] wrote
/// them.
pub fn server_and_ca(path: &Path) -> Result<(String, String)> {
    let kubeconfig_err = |source| Error::Kubeconfig {
        path: path.to_path_buf(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_err)?;
    let missing = |what: &str| Error::Kubeconfig {
        path: path.to_path_buf(),
        source: kube::config::KubeconfigError::LoadClusterOfContext(format!(
            "no cluster {CONTEXT} with {what}"
        )),
    };
    let cluster = kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == CONTEXT)
        .and_then(|c| c.cluster.as_ref())
        .ok_or_else(|| missing("a cluster entry"))?;
    let server = cluster.server.clone().ok_or_else(|| missing("a server"))?;
    let ca = cluster
        .certificate_authority_data
        .as_deref()
        .and_then(|data| STANDARD.decode(data).ok())
        .and_then(|pem| String::from_utf8(pem).ok())
        .ok_or_else(|| missing("certificate-authority-data"))?;
    Ok((server, ca))
}

/// Load the kubeconfig at `path` into a client configuration.
pub async fn config(path: &Path) -> Result<kube::Config> {
    let kubeconfig_err = |source| Error::Kubeconfig {
        path: path.to_path_buf(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_err)?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(kubeconfig_err)
}

/// A kube client authenticated as the sandbox admin, from the kubeconfig at `path`.
pub async fn client(path: &Path) -> Result<kube::Client> {
    let config = config(path).await?;
    kube::Client::try_from(config)
        .map_err(|e| Error::kube(format!("building a client from {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh PKI and its admin kubeconfig for https://127.0.0.1:40123, in a temporary
    /// directory (removed when dropped).
    fn admin_kubeconfig() -> (crate::certs::Pki, tempfile::TempDir, std::path::PathBuf) {
        let pki = crate::certs::Pki::generate().unwrap();
        let dir = tempfile::Builder::new()
            .prefix("trellis-kc-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            render(
                "https://127.0.0.1:40123",
                &pki.ca_cert,
                &pki.admin_cert,
                &pki.admin_key,
            ),
        )
        .unwrap();
        (pki, dir, path)
    }

    #[test]
    fn renders_a_kubeconfig_kube_can_read() {
        let text = render(
            "https://127.0.0.1:40123",
            "CA PEM\n",
            "CERT PEM\n",
            "KEY PEM\n",
        );
        let kc = Kubeconfig::from_yaml(&text).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some(CONTEXT));

        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:40123"));
        let ca = STANDARD
            .decode(cluster.certificate_authority_data.as_ref().unwrap())
            .unwrap();
        assert_eq!(ca, b"CA PEM\n");

        let user = kc.auth_infos[0].auth_info.as_ref().unwrap();
        let cert = STANDARD
            .decode(user.client_certificate_data.as_ref().unwrap())
            .unwrap();
        assert_eq!(cert, b"CERT PEM\n");
        assert!(user.client_key_data.is_some());

        let ctx = kc.contexts[0].context.as_ref().unwrap();
        assert_eq!(ctx.cluster, CONTEXT);
        assert_eq!(ctx.user.as_deref(), Some(CONTEXT));
    }

    #[tokio::test]
    async fn token_kubeconfig_carries_the_admin_one_s_server_and_ca() {
        let (pki, dir, admin) = admin_kubeconfig();
        let (server, ca) = server_and_ca(&admin).unwrap();
        assert_eq!(
            (server.as_str(), ca.as_str()),
            ("https://127.0.0.1:40123", pki.ca_cert.as_str())
        );

        let path = dir.path().join("token.kubeconfig");
        std::fs::write(&path, render_token(&server, &ca, "aaa.bbb-ccc_ddd.eee")).unwrap();
        let yaml: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let user = &yaml["users"][0]["user"];
        assert_eq!(user["token"].as_str(), Some("aaa.bbb-ccc_ddd.eee"));
        assert!(user.get("client-certificate-data").is_none());
        let config = config(&path).await.unwrap();
        assert_eq!(config.cluster_url.to_string(), "https://127.0.0.1:40123/");
        assert!(config.auth_info.token.is_some());
        kube::Client::try_from(config).unwrap();

        let missing = dir.path().join("none");
        std::fs::write(&missing, "apiVersion: v1\nkind: Config\n").unwrap();
        assert!(
            server_and_ca(&missing)
                .unwrap_err()
                .to_string()
                .contains("no cluster trellis-sandbox")
        );
    }

    #[tokio::test]
    async fn rendered_kubeconfig_loads_into_a_client_config() {
        let (_pki, _dir, path) = admin_kubeconfig();
        let config = config(&path).await.unwrap();
        assert_eq!(config.cluster_url.to_string(), "https://127.0.0.1:40123/");
        assert_eq!(config.default_namespace, "default");
        // The embedded PEM must survive the round trip and be accepted by the TLS stack.
        kube::Client::try_from(config).unwrap();
    }
}
