//! Cluster PKI for patchd: a CA, agent and controller certificates (rcgen, ECDSA P-256), and the mutual-TLS
//! configurations of the tonic server (agent) and client (controller).
//!
//! Roles are carried by the extended key usage: agent certificates have `serverAuth` only, controller
//! certificates `clientAuth` only. rustls' WebPKI verifiers enforce the EKU on both sides, so an agent certificate
//! presented as a client (or a controller certificate presented as a server) is refused by the handshake itself.
#![forbid(unsafe_code)]

mod files;
mod inspect;
mod mtls;
mod pki;

pub use files::write_file_atomic;
pub use inspect::{IdentityInfo, check_identity};
pub use mtls::{TlsFiles, TlsMaterial};
pub use pki::{
    CA_CERT_FILE, CA_KEY_FILE, CaPaths, CertPaths, CertSpec, CertificateAuthority, IssuedCert,
    Role, init_ca,
};

use std::path::{Path, PathBuf};

/// Everything that can go wrong creating, loading or checking TLS material. Messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot write {}: {cause}", path.display())]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "a CA already exists in {} ({}); pass --force to replace it (every certificate it issued will stop being trusted)",
        dir.display(),
        file
    )]
    CaExists { dir: PathBuf, file: &'static str },
    #[error("{} is not a usable PEM certificate: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{} is not a usable PEM private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("invalid subject alternative name `{san}`: use an IP address or a DNS name")]
    BadSan { san: String },
    #[error("invalid certificate validity: {0}")]
    BadValidity(String),
    #[error("{}: {problem}", path.display())]
    Identity { path: PathBuf, problem: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

impl TlsError {
    pub(crate) fn read(path: &Path, cause: std::io::Error) -> Self {
        Self::Read {
            path: path.to_path_buf(),
            cause,
        }
    }
}
