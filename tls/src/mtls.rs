//! Mutual-TLS configurations: the agent's rustls server config (TLS 1.3 only, client certificate mandatory, from the
//! cluster CA, EKU clientAuth, not on the CRL) and the controller's tonic client config (agent certificate must name
//! the dialed host).

use crate::{Role, TlsError};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A TLS handshake that takes longer than this is abandoned (a stuck or hostile peer must not pin a task).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

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

    /// The agent's server config: TLS 1.3 only, presents this identity, requires a client certificate issued by the
    /// CA. rustls' WebPKI client verifier refuses certificates from another CA, expired ones, ones whose EKU lacks
    /// clientAuth (agent certificates) and, given the CA's `crl`, revoked ones.
    pub fn server_config(
        &self,
        crl: Option<CertificateRevocationListDer<'static>>,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(crate::crypto_provider());
        let config_error = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
        let mut roots = RootCertStore::empty();
        for ca in self.ca_certs()? {
            roots.add(ca).map_err(|e| TlsError::BadCertificate {
                path: self.files.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let mut verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
        if let Some(crl) = crl {
            // The CA is the trust anchor, so only the client's own certificate can be on a CRL.
            verifier = verifier.with_crls([crl]).only_check_end_entity_revocation();
        }
        let verifier = verifier.build().map_err(|e| config_error(&e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_error(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.cert_chain()?, self.private_key()?)
            .map_err(|e| config_error(&e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
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

/// Reads the CRL at `path` (PEM, as `patchctl ca crl` writes it) and checks that `ca_pem`'s CA signed it: a CRL of
/// another CA would make the agent refuse every client, so it is refused here, naming the file.
pub fn load_crl(
    path: &Path,
    ca_pem_path: &Path,
) -> Result<CertificateRevocationListDer<'static>, TlsError> {
    let problem = |problem: String| TlsError::Revocation {
        path: path.to_path_buf(),
        problem,
    };
    let pem = read(path)?;
    let crl = CertificateRevocationListDer::from_pem_slice(&pem).map_err(|e| {
        problem(format!(
            "not a PEM CRL ({e}): write it with `patchctl ca crl` and copy it here"
        ))
    })?;
    let (_, parsed) =
        x509_parser::parse_x509_crl(&crl).map_err(|e| problem(format!("not a valid CRL: {e}")))?;
    let ca_pem = read(ca_pem_path)?;
    let signed_by_ca = parse_certs(ca_pem_path, &ca_pem)?.iter().any(|der| {
        x509_parser::parse_x509_certificate(der)
            .is_ok_and(|(_, ca)| parsed.verify_signature(ca.public_key()).is_ok())
    });
    if !signed_by_ca {
        return Err(problem(format!(
            "not signed by the CA in {}: write it with `patchctl ca crl` from that CA",
            ca_pem_path.display()
        )));
    }
    Ok(crl)
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
