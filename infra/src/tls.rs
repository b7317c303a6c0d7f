//! TLS of this project's listeners and links (rustls, through tonic's TLS
//! support): a certificate and key to present, and a CA to verify the other
//! side with, read from PEM files once at start so that a wrong file is an
//! error there, naming it.
//!
//! - A server with a CA requires clients to present a certificate that CA
//!   signed (mTLS): a worker refuses any router that has none.
//! - A client with a CA connects over TLS and verifies the server against
//!   it; with a certificate and key it presents them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: {error}", path.display())]
    File {
        flag: &'static str,
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("{flag} {}: no {what} in it (PEM expected)", path.display())]
    Pem {
        flag: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("--tls-cert and --tls-key go together")]
    Incomplete,
    #[error("TLS on a server needs --tls-cert and --tls-key")]
    NoIdentity,
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// The TLS files of one process.
#[derive(Debug, Clone)]
pub struct Tls {
    /// Certificate chain and private key, PEM.
    identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The CA that signed the other side's certificate, PEM.
    ca: Option<Vec<u8>>,
}

impl Tls {
    /// Reads and checks the files; None when none is given.
    pub fn from_files(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        let identity = match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let cert_pem = read("--tls-cert", cert)?;
                if CertificateDer::pem_slice_iter(&cert_pem).next().is_none() {
                    return Err(pem_error("--tls-cert", cert, "certificate"));
                }
                let key_pem = read("--tls-key", key)?;
                if PrivateKeyDer::from_pem_slice(&key_pem).is_err() {
                    return Err(pem_error("--tls-key", key, "private key"));
                }
                Some((cert_pem, key_pem))
            }
            _ => return Err(TlsError::Incomplete),
        };
        let ca = match ca {
            None => None,
            Some(path) => {
                let pem = read("--tls-ca", path)?;
                if CertificateDer::pem_slice_iter(&pem).next().is_none() {
                    return Err(pem_error("--tls-ca", path, "certificate"));
                }
                Some(pem)
            }
        };
        Ok((identity.is_some() || ca.is_some()).then_some(Self { identity, ca }))
    }

    /// Whether clients must present a certificate the CA signed.
    pub fn verifies_clients(&self) -> bool {
        self.ca.is_some()
    }

    /// Whether a certificate and key are given (a server can use them).
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// A worker's TLS: its identity, and with a CA, client certificates
    /// that CA signed required (mTLS); gRPC, and `/metrics` over HTTP/1.1.
    pub fn server(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        self.rustls_server(true)
    }

    /// A gRPC client's TLS: the server verified against the CA (the
    /// system's roots are not used), the identity presented.
    pub fn client(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        config
    }

    /// A public server's TLS (HTTPS, the router's gRPC): its identity
    /// only (clients of the public APIs authenticate with keys, not
    /// certificates).
    pub fn https_server(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        self.rustls_server(false)
    }

    /// The identity presented; with `verify_clients` and a CA, clients must
    /// present a certificate it signed. ALPN offers HTTP/2 and HTTP/1.1.
    fn rustls_server(&self, verify_clients: bool) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let (cert, key) = self.identity.as_ref().ok_or(TlsError::NoIdentity)?;
        let chain = certificates(cert)?;
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|_| TlsError::Config(rustls::Error::General("bad key PEM".into())))?;
        let provider = crypto_provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?;
        let builder = match (&self.ca, verify_clients) {
            (Some(ca), true) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates(ca)? {
                    roots.add(cert).map_err(TlsError::Config)?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(TlsError::Config)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::Config(rustls::Error::General("bad certificate PEM".into())))
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::File {
        flag,
        path: path.to_owned(),
        error,
    })
}

fn pem_error(flag: &'static str, path: &Path, what: &'static str) -> TlsError {
    TlsError::Pem {
        flag,
        path: path.to_owned(),
        what,
    }
}

/// The cryptography every TLS link of the project uses (ring's), for
/// clients that take one (the CLI's HTTPS client).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
