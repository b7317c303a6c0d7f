//! Certificates for a cluster's mTLS, made with rcgen: one CA, and per node
//! (router, each worker) a certificate for its host names and addresses,
//! good both as a server's and as a client's. `serve --tls` makes a
//! throwaway set for its own processes; `tramontane certs` makes one for a
//! real cluster.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// One node's certificate: its name (the file names) and the DNS names and
/// IP addresses it is reached at.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub hosts: Vec<String>,
}

/// Where the files went: `ca.pem`, `ca-key.pem`, and per node
/// `NAME.pem` / `NAME-key.pem`.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    /// Per node: (name, certificate, key).
    pub nodes: Vec<(String, PathBuf, PathBuf)>,
}

impl CertFiles {
    /// The certificate and key of node `name`.
    pub fn node(&self, name: &str) -> Option<(&Path, &Path)> {
        self.nodes
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, cert, key)| (cert.as_path(), key.as_path()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("making a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{}: {error}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("node {0:?}: a name is letters, digits, '-', '_' or '.'")]
    Name(String),
    #[error("node {0:?} has no host name or address")]
    NoHosts(String),
}

/// Makes a new CA and a certificate per node into `dir`, valid for `days`
/// days from a day ago; keys are written readable by their owner only.
pub fn write_cluster_certs(dir: &Path, nodes: &[Node], days: u32) -> Result<CertFiles, CertError> {
    for node in nodes {
        let fine = !node.name.is_empty()
            && node
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !fine {
            return Err(CertError::Name(node.name.clone()));
        }
        if node.hosts.is_empty() {
            return Err(CertError::NoHosts(node.name.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|error| CertError::Write {
        path: dir.to_owned(),
        error,
    })?;
    let now = time::OffsetDateTime::now_utc();
    let validity = |params: &mut CertificateParams| {
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(i64::from(days));
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = name("Tramontane cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let files = CertFiles {
        ca: dir.join("ca.pem"),
        ca_key: dir.join("ca-key.pem"),
        nodes: nodes
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    dir.join(format!("{}.pem", n.name)),
                    dir.join(format!("{}-key.pem", n.name)),
                )
            })
            .collect(),
    };
    write(&files.ca, ca_cert.pem(), false)?;
    write(&files.ca_key, ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);
    for (node, (_, cert_path, key_path)) in nodes.iter().zip(&files.nodes) {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(node.hosts.clone())?;
        params.distinguished_name = name(&node.name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params);
        let cert = params.signed_by(&key, &issuer)?;
        write(cert_path, cert.pem(), false)?;
        write(key_path, key.serialize_pem(), true)?;
    }
    Ok(files)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn write(path: &Path, text: String, secret: bool) -> Result<(), CertError> {
    let failed = |error| CertError::Write {
        path: path.to_owned(),
        error,
    };
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(path)
            .map_err(failed)?;
        file.write_all(text.as_bytes()).map_err(failed)
    }
    #[cfg(not(unix))]
    {
        let _ = secret;
        std::fs::write(path, text).map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{Tls, TlsError};

    #[test]
    fn a_cluster_set_loads_as_tls_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = [
            Node {
                name: "router".into(),
                hosts: vec!["127.0.0.1".into(), "localhost".into()],
            },
            Node {
                name: "worker-0".into(),
                hosts: vec!["w0.cluster.local".into()],
            },
        ];
        let files = write_cluster_certs(dir.path(), &nodes, 30).unwrap();
        let (cert, key) = files.node("worker-0").unwrap();
        let tls = Tls::from_files(Some(cert), Some(key), Some(&files.ca))
            .unwrap()
            .unwrap();
        assert!(tls.verifies_clients());
        tls.server().unwrap();
        tls.https_server().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        // Wrong files are named.
        let err = Tls::from_files(Some(&files.ca_key), Some(key), None).unwrap_err();
        assert!(err.to_string().contains("--tls-cert"), "{err}");
        let err = Tls::from_files(Some(cert), None, None).unwrap_err();
        assert!(matches!(err, TlsError::Incomplete));
        assert!(Tls::from_files(None, None, None).unwrap().is_none());
        let bad = [Node {
            name: "a/b".into(),
            hosts: vec!["x".into()],
        }];
        assert!(matches!(
            write_cluster_certs(dir.path(), &bad, 1),
            Err(CertError::Name(_))
        ));
    }
}
