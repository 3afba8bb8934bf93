//! The cluster CA and certificate issuance (rcgen, ECDSA P-256).

use crate::{TlsError, write_file_atomic};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, RevokedCertParams, SanType, SerialNumber,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate inside a TLS directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside a TLS directory.
pub const CA_KEY_FILE: &str = "ca.key";

const CA_VALIDITY_DAYS: i64 = 3650;
/// The `nextUpdate` of a CRL, in days from its issue. The agent does not refuse a CRL past it (an agent that
/// cannot be reached with a fresh CRL must not lock every controller out); it says when to issue a new one.
pub const CRL_VALIDITY_DAYS: i64 = 30;
/// Certificates start slightly in the past so that hosts with a lagging clock accept them at once.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::minutes(5);

/// What a certificate is for. Encoded as the extended key usage, which the TLS stacks enforce; a controller
/// certificate also carries a [`ControllerRole`] that the agent enforces per RPC.
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

/// What a controller certificate may ask of an agent, carried as the URI SAN `urn:patchd:role:<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerRole {
    /// Info and Status only (`patchctl display`, `agent info`).
    Observer,
    /// Everything: also upload, query, stage, apply and rollback.
    Operator,
}

/// Prefix of the URI SAN naming a controller certificate's [`ControllerRole`].
pub const ROLE_URI_PREFIX: &str = "urn:patchd:role:";
/// Prefix of the URI SAN naming the person a controller certificate was issued to.
pub const OPERATOR_URI_PREFIX: &str = "urn:patchd:operator:";

impl ControllerRole {
    /// Lower-case name, as on the command line and in the certificate.
    pub fn as_str(self) -> &'static str {
        match self {
            ControllerRole::Observer => "observer",
            ControllerRole::Operator => "operator",
        }
    }

    /// The role named `name` (`observer`, `operator`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "observer" => Some(ControllerRole::Observer),
            "operator" => Some(ControllerRole::Operator),
            _ => None,
        }
    }
}

/// Checks an operator name: 1 to 64 ASCII letters, digits, `.`, `_`, `@` or `-` (it is logged and shown).
pub fn check_operator_name(name: &str) -> Result<(), TlsError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(TlsError::BadOperator {
            name: name.to_string(),
        })
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

    /// `ca.crt` inside `dir`, the key at `key` when given (a CA key kept off the controller's TLS directory),
    /// else `ca.key` beside the certificate.
    pub fn with_key(dir: &Path, key: Option<&Path>) -> Self {
        let mut paths = Self::in_dir(dir);
        if let Some(key) = key {
            paths.key = key.to_path_buf();
        }
        paths
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
    /// What a controller certificate may do (ignored for agents).
    pub controller_role: ControllerRole,
    /// Who a controller certificate is for (a person; logged by the agent with every mutating call).
    pub operator: Option<String>,
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
            controller_role: ControllerRole::Operator,
            operator: None,
            not_before: now - CLOCK_SKEW_ALLOWANCE,
            not_after: now + Duration::days(i64::from(days)),
        }
    }

    /// The same request for a controller with `role` (default [`ControllerRole::Operator`]).
    pub fn with_controller_role(mut self, role: ControllerRole) -> Self {
        self.controller_role = role;
        self
    }

    /// The same request naming the person it is for.
    pub fn with_operator(mut self, operator: impl Into<String>) -> Self {
        self.operator = Some(operator.into());
        self
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
        Self::load_from(&CaPaths::in_dir(dir))
    }

    /// Loads the CA certificate and key from `paths` (the key may live elsewhere, see [`CaPaths::with_key`]).
    pub fn load_from(paths: &CaPaths) -> Result<Self, TlsError> {
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
        self.write_to(&CaPaths::in_dir(dir), force)
    }

    /// Writes the certificate (0644) and key (0600) to `paths`; refuses to replace either unless `force`.
    pub fn write_to(&self, paths: &CaPaths, force: bool) -> Result<CaPaths, TlsError> {
        refuse_existing_ca(paths, force)?;
        write_file_atomic(&paths.key, self.key_pem.as_bytes(), 0o600)?;
        write_file_atomic(&paths.cert, self.cert_pem.as_bytes(), 0o644)?;
        Ok(paths.clone())
    }

    /// Signs a CRL listing every serial in `revocations`, valid from now for [`CRL_VALIDITY_DAYS`]. The CRL number
    /// is the current Unix time, so a later CRL always has a higher number.
    pub fn crl_pem(&self, revocations: &crate::Revocations) -> Result<String, TlsError> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = revocations
            .entries()
            .iter()
            .map(|entry| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&entry.serial_bytes()?),
                    revocation_time: OffsetDateTime::from_unix_timestamp(entry.revoked_unix)
                        .unwrap_or(now),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, TlsError>>()?;
        let params = CertificateRevocationListParams {
            this_update: now - CLOCK_SKEW_ALLOWANCE,
            next_update: now + Duration::days(CRL_VALIDITY_DAYS),
            crl_number: SerialNumber::from(u64::try_from(now.unix_timestamp()).unwrap_or(0)),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
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
        if spec.role == Role::Controller {
            let mut uris = vec![format!(
                "{ROLE_URI_PREFIX}{}",
                spec.controller_role.as_str()
            )];
            if let Some(operator) = &spec.operator {
                check_operator_name(operator)?;
                uris.push(format!("{OPERATOR_URI_PREFIX}{operator}"));
            }
            for text in uris {
                let uri = text
                    .clone()
                    .try_into()
                    .map_err(|_| TlsError::BadSan { san: text })?;
                params.subject_alt_names.push(SanType::URI(uri));
            }
        }
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

/// Creates a new CA (`paths.cert`, `paths.key` mode 0600). Refuses to replace an existing one unless `force`.
pub fn init_ca(paths: &CaPaths, force: bool) -> Result<CaPaths, TlsError> {
    refuse_existing_ca(paths, force)?;
    CertificateAuthority::generate("patchd cluster CA")?.write_to(paths, force)
}

fn refuse_existing_ca(paths: &CaPaths, force: bool) -> Result<(), TlsError> {
    if force {
        return Ok(());
    }
    for path in [&paths.cert, &paths.key] {
        if path.exists() {
            return Err(TlsError::CaExists { path: path.clone() });
        }
    }
    Ok(())
}

fn parse_san(raw: &str) -> Result<SanType, TlsError> {
    let bad = || TlsError::BadSan {
        san: raw.to_string(),
    };
    let trimmed = raw.trim().trim_start_matches('[').trim_end_matches(']');
    if trimmed.contains('*') {
        // A wildcard would let one agent's key answer for every host it matches.
        return Err(TlsError::WildcardSan {
            san: raw.to_string(),
        });
    }
    if let Ok(ip) = trimmed.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid_dns = !trimmed.is_empty()
        && trimmed.len() <= 253
        && trimmed.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
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
        let paths = CaPaths::in_dir(dir.path());
        let first = init_ca(&paths, false).unwrap();
        let pem = std::fs::read_to_string(&first.cert).unwrap();
        assert!(matches!(
            init_ca(&paths, false),
            Err(TlsError::CaExists { .. })
        ));
        assert_eq!(pem, std::fs::read_to_string(&first.cert).unwrap());
        init_ca(&paths, true).unwrap();
        assert_ne!(pem, std::fs::read_to_string(&first.cert).unwrap());
        let mode = std::fs::metadata(&first.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn issued_key_is_private_and_ca_reloads() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(&CaPaths::in_dir(dir.path()), false).unwrap();
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
        assert!(matches!(
            parse_san("*.example.com"),
            Err(TlsError::WildcardSan { .. })
        ));
    }

    #[test]
    fn ca_key_can_live_in_another_directory() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("offline/ca.key");
        std::fs::create_dir_all(key.parent().unwrap()).unwrap();
        let paths = CaPaths::with_key(&dir.path().join("tls"), Some(&key));
        std::fs::create_dir_all(dir.path().join("tls")).unwrap();
        init_ca(&paths, false).unwrap();
        assert!(key.exists());
        assert!(!dir.path().join("tls").join(CA_KEY_FILE).exists());
        assert!(CertificateAuthority::load(&dir.path().join("tls")).is_err());
        CertificateAuthority::load_from(&paths).unwrap();
    }
}
