//! The cluster CA and certificate issuance (rcgen, ECDSA P-256).

use crate::{TlsError, write_file_atomic};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate inside a TLS directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside a TLS directory.
pub const CA_KEY_FILE: &str = "ca.key";

const CA_VALIDITY_DAYS: i64 = 3650;
/// Certificates start slightly in the past so that hosts with a lagging clock accept them at once.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::minutes(5);

/// What a certificate is for. Encoded as the extended key usage, which the TLS stacks enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A patchd agent: TLS server (EKU serverAuth only).
    Agent,
    /// The patchctl controller: TLS client (EKU clientAuth only).
    Controller,
}

impl Role {
    /// Lower-case name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Controller => "controller",
        }
    }
}

/// Where a CA lives on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaPaths {
    /// The standard file names inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join(CA_CERT_FILE),
            key: dir.join(CA_KEY_FILE),
        }
    }
}

/// Where an issued certificate and its key were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate request: who, which role, which names, and when it is valid.
#[derive(Debug, Clone)]
pub struct CertSpec {
    /// Common name; also the default file stem.
    pub name: String,
    pub role: Role,
    /// Subject alternative names: IP addresses become IP SANs, anything else a DNS SAN.
    pub sans: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl CertSpec {
    /// A certificate valid from now (minus a small clock-skew allowance) for `days` days.
    pub fn new(name: impl Into<String>, role: Role, sans: Vec<String>, days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            name: name.into(),
            role,
            sans,
            not_before: now - CLOCK_SKEW_ALLOWANCE,
            not_after: now + Duration::days(i64::from(days)),
        }
    }

    /// The same request with an explicit validity window (tests use it to make expired certificates).
    pub fn with_validity(mut self, not_before: OffsetDateTime, not_after: OffsetDateTime) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }
}

/// A freshly issued certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl IssuedCert {
    /// Writes `<dir>/<stem>.crt` (0644) and `<dir>/<stem>.key` (0600), replacing older files of that name.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<CertPaths, TlsError> {
        let paths = CertPaths {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        write_file_atomic(&paths.key, self.key_pem.as_bytes(), 0o600)?;
        write_file_atomic(&paths.cert, self.cert_pem.as_bytes(), 0o644)?;
        Ok(paths)
    }
}

/// A loaded (or freshly generated) cluster CA that can issue certificates.
#[derive(Debug)]
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    /// Generates a new CA in memory; nothing is written.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "patchd");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `ca.crt` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let paths = CaPaths::in_dir(dir);
        let cert_pem =
            std::fs::read_to_string(&paths.cert).map_err(|e| TlsError::read(&paths.cert, e))?;
        let key_pem =
            std::fs::read_to_string(&paths.key).map_err(|e| TlsError::read(&paths.key, e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::BadKey {
            path: paths.key.clone(),
            reason: e.to_string(),
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| TlsError::BadCertificate {
                path: paths.cert.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`; refuses to replace an existing CA unless `force`.
    pub fn write(&self, dir: &Path, force: bool) -> Result<CaPaths, TlsError> {
        let paths = CaPaths::in_dir(dir);
        if !force {
            for (path, file) in [(&paths.cert, CA_CERT_FILE), (&paths.key, CA_KEY_FILE)] {
                if path.exists() {
                    return Err(TlsError::CaExists {
                        dir: dir.to_path_buf(),
                        file,
                    });
                }
            }
        }
        write_file_atomic(&paths.key, self.key_pem.as_bytes(), 0o600)?;
        write_file_atomic(&paths.cert, self.cert_pem.as_bytes(), 0o644)?;
        Ok(paths)
    }

    /// Issues a certificate for `spec`, signed by this CA, with a new ECDSA P-256 key.
    pub fn issue(&self, spec: &CertSpec) -> Result<IssuedCert, TlsError> {
        if spec.not_after <= spec.not_before {
            return Err(TlsError::BadValidity(format!(
                "not_after ({}) is not after not_before ({})",
                spec.not_after, spec.not_before
            )));
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = spec
            .sans
            .iter()
            .map(|s| parse_san(s))
            .collect::<Result<_, _>>()?;
        params
            .distinguished_name
            .push(DnType::CommonName, spec.name.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationName, "patchd");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match spec.role {
            Role::Agent => ExtendedKeyUsagePurpose::ServerAuth,
            Role::Controller => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Creates a new CA in `dir` (`ca.crt`, `ca.key` mode 0600). Refuses to replace an existing one unless `force`.
pub fn init_ca(dir: &Path, force: bool) -> Result<CaPaths, TlsError> {
    let paths = CaPaths::in_dir(dir);
    if !force {
        for (path, file) in [(&paths.cert, CA_CERT_FILE), (&paths.key, CA_KEY_FILE)] {
            if path.exists() {
                return Err(TlsError::CaExists {
                    dir: dir.to_path_buf(),
                    file,
                });
            }
        }
    }
    CertificateAuthority::generate("patchd cluster CA")?.write(dir, force)
}

fn parse_san(raw: &str) -> Result<SanType, TlsError> {
    let bad = || TlsError::BadSan {
        san: raw.to_string(),
    };
    let trimmed = raw.trim().trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = trimmed.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid_dns = !trimmed.is_empty()
        && trimmed.len() <= 253
        && trimmed.split('.').enumerate().all(|(i, label)| {
            !label.is_empty()
                && label.len() <= 63
                && (label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    || (i == 0 && label == "*"))
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !valid_dns {
        return Err(bad());
    }
    Ok(SanType::DnsName(
        trimmed.to_ascii_lowercase().try_into().map_err(|_| bad())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_init_refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let first = init_ca(dir.path(), false).unwrap();
        let pem = std::fs::read_to_string(&first.cert).unwrap();
        assert!(matches!(
            init_ca(dir.path(), false),
            Err(TlsError::CaExists { .. })
        ));
        assert_eq!(pem, std::fs::read_to_string(&first.cert).unwrap());
        init_ca(dir.path(), true).unwrap();
        assert_ne!(pem, std::fs::read_to_string(&first.cert).unwrap());
        let mode = std::fs::metadata(&first.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn issued_key_is_private_and_ca_reloads() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), false).unwrap();
        let ca = CertificateAuthority::load(dir.path()).unwrap();
        let issued = ca
            .issue(&CertSpec::new(
                "a1",
                Role::Agent,
                vec!["127.0.0.1".into()],
                30,
            ))
            .unwrap();
        let paths = issued.write(&dir.path().join("out"), "a1").unwrap();
        let mode = std::fs::metadata(&paths.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn sans_are_checked() {
        assert!(matches!(
            parse_san("127.0.1.3").unwrap(),
            SanType::IpAddress(_)
        ));
        assert!(matches!(parse_san("[::1]").unwrap(), SanType::IpAddress(_)));
        assert!(matches!(
            parse_san("node-1.example.com").unwrap(),
            SanType::DnsName(_)
        ));
        assert!(parse_san("bad name").is_err());
        assert!(parse_san("").is_err());
        assert!(parse_san("-x.example").is_err());
    }
}
