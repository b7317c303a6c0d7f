//! Who is on the other side of an mTLS connection: the common name of the
//! certificate the client presented (a node name of `tramontane certs`:
//! `router`, `worker-0`, ...), in every request of that connection's
//! extensions, for services that let only some nodes call some methods.

use std::sync::Arc;

/// The common name of the client's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerName(pub Arc<str>);

impl PeerName {
    /// The first common name of a DER certificate's subject; None when it
    /// has none or does not parse.
    pub fn of_certificate(der: &[u8]) -> Option<Self> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
        let name = certificate
            .subject()
            .iter_common_name()
            .next()?
            .as_str()
            .ok()?;
        Some(Self(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{Node, write_cluster_certs};
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn a_node_certificate_is_named_by_its_node() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = [("router", "r.svc"), ("worker-3", "127.0.0.1")].map(|(name, host)| Node {
            name: name.into(),
            hosts: vec![host.into()],
        });
        let files = write_cluster_certs(dir.path(), &nodes, 1).unwrap();
        for (name, cert, _) in &files.nodes {
            let der = CertificateDer::from_pem_file(cert).unwrap();
            assert_eq!(PeerName::of_certificate(&der).unwrap().as_str(), name);
        }
        assert_eq!(PeerName::of_certificate(b"not a certificate"), None);
    }
}
