//! Mutual-TLS configurations for tonic: the agent's server config (client certificate mandatory, from the cluster
//! CA, EKU clientAuth) and the controller's client config (agent certificate must name the dialed host).

use crate::{Role, TlsError};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A TLS handshake that takes longer than this is abandoned (a stuck or hostile peer must not pin a task).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Paths of the three files one side of a connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM), the only trust anchor.
    pub ca: PathBuf,
    /// This side's certificate (PEM).
    pub cert: PathBuf,
    /// This side's private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// `ca.crt`, `<stem>.crt` and `<stem>.key` inside `dir`.
    pub fn in_dir(dir: &Path, stem: &str) -> Self {
        Self {
            ca: dir.join(crate::CA_CERT_FILE),
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

/// The PEM contents of [`TlsFiles`], read and parsed once.
#[derive(Clone)]
pub struct TlsMaterial {
    files: TlsFiles,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("TlsMaterial")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Reads the three files and checks that each parses; an error names the file.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let ca_pem = read(&files.ca)?;
        parse_certs(&files.ca, &ca_pem)?;
        let cert_pem = read(&files.cert)?;
        parse_certs(&files.cert, &cert_pem)?;
        let key_pem = read(&files.key)?;
        parse_key(&files.key, &key_pem)?;
        Ok(Self {
            files: files.clone(),
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    /// Where this material was read from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The parsed CA certificates.
    pub fn ca_certs(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        parse_certs(&self.files.ca, &self.ca_pem)
    }

    /// The parsed certificate chain of this side (leaf first).
    pub fn cert_chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        parse_certs(&self.files.cert, &self.cert_pem)
    }

    /// The parsed private key of this side.
    pub fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        parse_key(&self.files.key, &self.key_pem)
    }

    /// Checks the identity (chain to the CA, validity, role, key) and summarises it.
    pub fn check(&self, role: Role) -> Result<crate::IdentityInfo, TlsError> {
        crate::check_identity(self, role)
    }

    /// The agent's server config: presents this identity; requires a client certificate issued by the CA.
    /// rustls' WebPKI client verifier refuses certificates from another CA, expired ones, and ones whose EKU
    /// lacks clientAuth (agent certificates).
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// The controller's client config for dialing `host` (IP or DNS name): trusts only the CA, presents this
    /// identity, and requires the agent's certificate to name `host`.
    pub fn client_config(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(host.trim_start_matches('[').trim_end_matches(']'))
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::read(path, e))
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadCertificate {
            path: path.to_path_buf(),
            reason: "no `BEGIN CERTIFICATE` block found".to_string(),
        });
    }
    Ok(certs)
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::BadKey {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
