//! The sandbox PKI: one CA that signs the apiserver's serving certificate and the admin's client
//! certificate, plus the service-account token signing key. Everything is generated fresh for
//! every `up`; nothing here is meant to outlive the sandbox.

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::{Error, Result};

/// The service CIDR handed to kube-apiserver (`--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The first address of [`SERVICE_CIDR`]: the `kubernetes` Service's ClusterIP, which in-cluster
/// clients dial, so it must be in the serving certificate.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// Subject of the admin client certificate. `system:masters` bypasses RBAC.
pub const ADMIN_USER: &str = "trellis-admin";
/// Group of the admin client certificate.
pub const ADMIN_GROUP: &str = "system:masters";

const CA_NAME: &str = "trellis-sandbox-ca";
const APISERVER_DNS_NAMES: [&str; 5] = [
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// All PEM material of one sandbox, in memory.
pub struct Pki {
    pub ca_cert: String,
    pub ca_key: String,
    pub apiserver_cert: String,
    pub apiserver_key: String,
    pub admin_cert: String,
    pub admin_key: String,
    /// ECDSA P-256 private key (PKCS#8 PEM) signing service-account tokens.
    pub service_account_key: String,
    /// Its public half (SPKI PEM), which the apiserver uses to verify tokens.
    pub service_account_pub: String,
}

/// Where [`Pki::write`] put each file.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub apiserver_cert: PathBuf,
    pub apiserver_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

impl PkiPaths {
    /// The file names used inside a PKI directory.
    pub fn in_dir(dir: &Path) -> Self {
        PkiPaths {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            apiserver_cert: dir.join("apiserver.crt"),
            apiserver_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            service_account_key: dir.join("sa.key"),
            service_account_pub: dir.join("sa.pub"),
        }
    }
}

impl Pki {
    /// Generate a CA, the apiserver serving certificate, the admin client certificate and the
    /// service-account key pair. All keys are ECDSA P-256.
    pub fn generate() -> Result<Self> {
        let cert_err = |what| move |source| Error::Certificate { what, source };

        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = dn(CA_NAME, None);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().map_err(cert_err("CA key"))?;
        let ca =
            CertifiedIssuer::self_signed(ca_params, ca_key).map_err(cert_err("CA certificate"))?;

        let mut server_params = CertificateParams::default();
        server_params.distinguished_name = dn("kube-apiserver", None);
        server_params.subject_alt_names = apiserver_sans()?;
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server_params.use_authority_key_identifier_extension = true;
        let server_key = KeyPair::generate().map_err(cert_err("apiserver key"))?;
        let server_cert = server_params
            .signed_by(&server_key, &ca)
            .map_err(cert_err("apiserver serving certificate"))?;

        let mut admin_params = CertificateParams::default();
        admin_params.distinguished_name = dn(ADMIN_USER, Some(ADMIN_GROUP));
        admin_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        admin_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        admin_params.use_authority_key_identifier_extension = true;
        let admin_key = KeyPair::generate().map_err(cert_err("admin key"))?;
        let admin_cert = admin_params
            .signed_by(&admin_key, &ca)
            .map_err(cert_err("admin client certificate"))?;

        let sa_key = KeyPair::generate().map_err(cert_err("service-account key"))?;

        Ok(Pki {
            ca_cert: ca.pem(),
            ca_key: ca.key().serialize_pem(),
            apiserver_cert: server_cert.pem(),
            apiserver_key: server_key.serialize_pem(),
            admin_cert: admin_cert.pem(),
            admin_key: admin_key.serialize_pem(),
            service_account_key: sa_key.serialize_pem(),
            service_account_pub: sa_key.public_key_pem(),
        })
    }

    /// Write every file into `dir` (created if missing); private keys get mode 0600.
    pub fn write(&self, dir: &Path) -> Result<PkiPaths> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
        let paths = PkiPaths::in_dir(dir);
        write_file(&paths.ca_cert, &self.ca_cert, 0o644)?;
        write_file(&paths.ca_key, &self.ca_key, 0o600)?;
        write_file(&paths.apiserver_cert, &self.apiserver_cert, 0o644)?;
        write_file(&paths.apiserver_key, &self.apiserver_key, 0o600)?;
        write_file(&paths.admin_cert, &self.admin_cert, 0o644)?;
        write_file(&paths.admin_key, &self.admin_key, 0o600)?;
        write_file(&paths.service_account_key, &self.service_account_key, 0o600)?;
        write_file(&paths.service_account_pub, &self.service_account_pub, 0o644)?;
        Ok(paths)
    }
}

fn dn(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(o) = organization {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

fn apiserver_sans() -> Result<Vec<SanType>> {
    let mut sans = vec![
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V4(KUBERNETES_SERVICE_IP)),
    ];
    for name in APISERVER_DNS_NAMES {
        let name = name.try_into().map_err(|source| Error::Certificate {
            what: "apiserver subject alternative names",
            source,
        })?;
        sans.push(SanType::DnsName(name));
    }
    Ok(sans)
}

/// Write `contents` to `path` with `mode`, replacing any earlier file (whose mode a plain
/// truncating open would keep).
pub(crate) fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("replace", path, e)),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| Error::io("write", path, e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn generates_distinct_pem_material() {
        let pki = Pki::generate().unwrap();
        for cert in [&pki.ca_cert, &pki.apiserver_cert, &pki.admin_cert] {
            assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
        }
        for key in [
            &pki.ca_key,
            &pki.apiserver_key,
            &pki.admin_key,
            &pki.service_account_key,
        ] {
            assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
        }
        assert!(
            pki.service_account_pub
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
        assert_ne!(pki.apiserver_key, pki.admin_key);
        assert_ne!(pki.ca_cert, pki.apiserver_cert);
    }

    #[test]
    fn keys_are_written_private() {
        let dir = tempfile::Builder::new()
            .prefix("trellis-pki-")
            .tempdir()
            .unwrap();
        let paths = Pki::generate().unwrap().write(dir.path()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for key in [
            &paths.ca_key,
            &paths.apiserver_key,
            &paths.admin_key,
            &paths.service_account_key,
        ] {
            assert_eq!(mode(key), 0o600, "{}", key.display());
        }
        assert_eq!(mode(&paths.ca_cert), 0o644);
        // A second write replaces the files and keeps the modes.
        Pki::generate().unwrap().write(dir.path()).unwrap();
        assert_eq!(mode(&paths.admin_key), 0o600);
    }
}
