//! Cluster PKI for patchd: a CA, agent and controller certificates (rcgen, ECDSA P-256), and the mutual-TLS
//! configurations of the tonic server (agent) and client (controller).
//!
//! Roles are carried by the extended key usage: agent certificates have `serverAuth` only, controller
//! certificates `clientAuth` only. rustls' WebPKI verifiers enforce the EKU on both sides, so an agent certificate
//! presented as a client (or a controller certificate presented as a server) is refused by the handshake itself.
//! A controller certificate also names its [`ControllerRole`] (`observer`, `operator`) and the person it was issued
//! to in URI SANs (`urn:patchd:role:…`, `urn:patchd:operator:…`), which the agent reads per call
//! ([`PeerIdentity`]). Revoked serials are kept beside the CA ([`Revocations`]) and published as a CRL the agent
//! checks at the handshake. Only TLS 1.3 is offered or accepted ([`crypto_provider`]).
#![forbid(unsafe_code)]

mod files;
mod inspect;
mod mtls;
mod pki;
mod revocation;

pub use files::write_file_atomic;
pub use inspect::{IdentityInfo, PeerIdentity, check_identity};
pub use mtls::{HANDSHAKE_TIMEOUT, TlsFiles, TlsMaterial, load_crl};
pub use pki::{
    CA_CERT_FILE, CA_KEY_FILE, CRL_VALIDITY_DAYS, CaPaths, CertPaths, CertSpec,
    CertificateAuthority, ControllerRole, IssuedCert, OPERATOR_URI_PREFIX, ROLE_URI_PREFIX, Role,
    check_operator_name, init_ca,
};
pub use revocation::{CRL_FILE, REVOKED_FILE, Revocations, RevokedCert, serial_of_cert_pem};

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
        "a CA already exists ({}); pass --force to replace it (every certificate it issued will stop being trusted)",
        path.display()
    )]
    CaExists { path: PathBuf },
    #[error("{} is not a usable PEM certificate: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{} is not a usable PEM private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("invalid subject alternative name `{san}`: use an IP address or a DNS name")]
    BadSan { san: String },
    #[error(
        "wildcard name `{san}` refused: name each host the controller dials (one --san per name or address)"
    )]
    WildcardSan { san: String },
    #[error(
        "invalid operator name `{name}`: use 1 to 64 letters, digits, '.', '_', '@' or '-' (e.g. a login name)"
    )]
    BadOperator { name: String },
    #[error("{}: {problem}", path.display())]
    Revocation { path: PathBuf, problem: String },
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
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

/// The rustls crypto provider of both binaries: ring, TLS 1.3 suites only, AES-128-GCM preferred over AES-256-GCM.
///
/// Without a TLS 1.2 suite neither end can negotiate TLS 1.2: rustls offers and accepts only the versions its
/// provider has suites for, so tonic's client config (built on the process default) is TLS 1.3 only too.
///
/// Bulk transfer is CPU-bound on both ends and AES-128 runs 10 AES rounds to AES-256's 14; both are TLS 1.3
/// mandatory-to-implement suites with far more security margin than the ECDSA P-256 keys that authenticate the
/// session. The set of suites is unchanged, only the order: a peer that only offers AES-256 still connects.
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    let preferred = [
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    provider.cipher_suites.retain(|suite| {
        suite.version() == &rustls::version::TLS13
            && !preferred.iter().any(|p| p.suite() == suite.suite())
    });
    provider.cipher_suites.splice(0..0, preferred);
    provider
}

/// Installs [`crypto_provider`] as the process default (what tonic's TLS configs use). Call once, first thing
/// in `main`; a second call keeps the first provider.
pub fn install_crypto_provider() {
    let _ = crypto_provider().install_default();
}

#[cfg(test)]
mod provider_tests {
    use super::*;

    #[test]
    fn aes_128_gcm_comes_first_and_only_tls13_suites_remain() {
        let tuned = crypto_provider();
        let default = rustls::crypto::ring::default_provider();
        let names = |p: &rustls::crypto::CryptoProvider| {
            let mut v: Vec<_> = p
                .cipher_suites
                .iter()
                .filter(|s| s.version() == &rustls::version::TLS13)
                .map(|s| s.suite())
                .collect();
            v.sort_by_key(|s| u16::from(*s));
            v
        };
        assert_eq!(names(&tuned), names(&default));
        assert_eq!(tuned.cipher_suites.len(), names(&default).len());
        assert_eq!(
            tuned.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert_eq!(
            tuned.cipher_suites[1].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
    }
}
