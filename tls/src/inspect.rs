//! Offline checks of an identity (used by `patchd validate` and the controller): issued by the configured CA,
//! currently valid, carrying the EKU of its role, and matching its private key.

use crate::{ControllerRole, OPERATOR_URI_PREFIX, ROLE_URI_PREFIX, Role, TlsError, TlsMaterial};
use std::net::IpAddr;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::time::ASN1Time;

/// A short description of a checked certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityInfo {
    /// Subject distinguished name.
    pub subject: String,
    /// DNS and IP subject alternative names.
    pub sans: Vec<String>,
    /// End of validity, RFC 2822.
    pub not_after: String,
    /// End of validity, Unix seconds.
    pub not_after_unix: i64,
    /// Serial number, lower-case hex (what `patchctl ca revoke` takes).
    pub serial: String,
    /// The role of a controller certificate (`None`: issued before roles, or an agent certificate).
    pub controller_role: Option<ControllerRole>,
    /// The person a controller certificate was issued to.
    pub operator: Option<String>,
}

/// Who is calling: read from the client certificate of a connection, once per call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Subject common name (`patchctl cert issue <name>`).
    pub common_name: String,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// `None` for a certificate issued before roles existed (the agent treats it as an observer).
    pub role: Option<ControllerRole>,
    /// The person named by `--operator`, if any.
    pub operator: Option<String>,
}

impl PeerIdentity {
    /// Reads the identity of a (handshake-verified) client certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_string();
        let (role, operator) = role_and_operator(&cert);
        Ok(Self {
            common_name,
            serial: cert
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            role,
            operator,
        })
    }

    /// `CN (serial S, operator O)`: how logs and Status name the caller.
    pub fn describe(&self) -> String {
        match &self.operator {
            Some(operator) => format!(
                "{} (operator {operator}, serial {})",
                self.common_name, self.serial
            ),
            None => format!("{} (serial {})", self.common_name, self.serial),
        }
    }
}

fn role_and_operator(cert: &X509Certificate<'_>) -> (Option<ControllerRole>, Option<String>) {
    let mut role = None;
    let mut operator = None;
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Some(name) = uri.strip_prefix(ROLE_URI_PREFIX) {
                    role = role.or(ControllerRole::from_name(name));
                } else if let Some(name) = uri.strip_prefix(OPERATOR_URI_PREFIX) {
                    operator = operator.or(Some(name.to_string()));
                }
            }
        }
    }
    (role, operator)
}

/// Checks that `material`'s certificate chains to its CA, is valid now, has the EKU of `role`, and matches
/// the private key. The error names the file and says what to do.
pub fn check_identity(material: &TlsMaterial, role: Role) -> Result<IdentityInfo, TlsError> {
    let files = material.files();
    let cert_problem = |problem: String| TlsError::Identity {
        path: files.cert.clone(),
        problem,
    };
    let chain = material.cert_chain()?;
    let ca_ders = material.ca_certs()?;
    let leaf_der = chain
        .first()
        .ok_or_else(|| cert_problem("contains no certificate".into()))?;
    let (_, leaf) =
        x509_parser::parse_x509_certificate(leaf_der).map_err(|e| TlsError::BadCertificate {
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;

    let mut cas = Vec::new();
    for der in &ca_ders {
        let (_, ca) =
            x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadCertificate {
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        cas.push(ca);
    }
    if !cas
        .iter()
        .any(|ca| leaf.verify_signature(Some(ca.public_key())).is_ok())
    {
        return Err(cert_problem(format!(
            "not issued by the CA in {}: issue it with `patchctl cert issue` from that CA, or point the CA path at \
             the CA that issued it",
            files.ca.display()
        )));
    }

    let validity = leaf.validity();
    let now = ASN1Time::now();
    if now < validity.not_before {
        return Err(cert_problem(format!(
            "not valid before {}: check this host's clock",
            validity.not_before
        )));
    }
    if now > validity.not_after {
        return Err(cert_problem(format!(
            "expired on {}: issue a new one with `patchctl cert issue`",
            validity.not_after
        )));
    }

    let (has_server, has_client) = eku(&leaf);
    let ok = match role {
        Role::Agent => has_server,
        Role::Controller => has_client,
    };
    if !ok {
        return Err(cert_problem(format!(
            "is not {} certificate (missing the {} extended key usage): issue one with `patchctl cert issue <name> \
             --role {}`",
            match role {
                Role::Agent => "an agent",
                Role::Controller => "a controller",
            },
            match role {
                Role::Agent => "serverAuth",
                Role::Controller => "clientAuth",
            },
            role.as_str()
        )));
    }

    let names = sans(&leaf);
    if role == Role::Agent
        && let Some(wildcard) = names.iter().find(|name| name.contains('*'))
    {
        return Err(cert_problem(format!(
            "names the wildcard `{wildcard}`: issue a certificate naming this host (`patchctl cert issue <host> \
             --role agent --san <host>`)"
        )));
    }

    let key = material.private_key()?;
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| TlsError::BadKey {
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
    rustls::sign::CertifiedKey::new(chain.clone(), signing_key)
        .keys_match()
        .map_err(|_| TlsError::Identity {
            path: files.key.clone(),
            problem: format!(
                "does not belong to the certificate {}: use the key issued with it",
                files.cert.display()
            ),
        })?;

    let (controller_role, operator) = role_and_operator(&leaf);
    Ok(IdentityInfo {
        subject: leaf.subject().to_string(),
        sans: names,
        not_after_unix: validity.not_after.timestamp(),
        serial: leaf
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        controller_role,
        operator,
        not_after: validity
            .not_after
            .to_rfc2822()
            .unwrap_or_else(|_| validity.not_after.to_string()),
    })
}

fn eku(cert: &X509Certificate<'_>) -> (bool, bool) {
    match cert.extended_key_usage() {
        Ok(Some(ext)) => (
            ext.value.server_auth || ext.value.any,
            ext.value.client_auth || ext.value.any,
        ),
        // No EKU extension at all means "any usage" in WebPKI terms.
        Ok(None) => (true, true),
        Err(_) => (false, false),
    }
}

fn sans(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(ext)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_string()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes)
                    .ok()
                    .map(|b| IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes)
                    .ok()
                    .map(|b| IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertSpec, CertificateAuthority, TlsFiles};
    use rustls_pki_types::pem::PemObject;

    fn write_identity(
        dir: &std::path::Path,
        ca: &CertificateAuthority,
        spec: &CertSpec,
    ) -> TlsFiles {
        crate::write_file_atomic(&dir.join("ca.crt"), ca.cert_pem().as_bytes(), 0o644).unwrap();
        ca.issue(spec).unwrap().write(dir, "id").unwrap();
        TlsFiles::in_dir(dir, "id")
    }

    #[test]
    fn good_identity_passes_and_lists_sans() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let spec = CertSpec::new(
            "a",
            Role::Agent,
            vec!["127.0.1.1".into(), "node-a".into()],
            1,
        );
        let files = write_identity(dir.path(), &ca, &spec);
        let info = TlsMaterial::load(&files)
            .unwrap()
            .check(Role::Agent)
            .unwrap();
        assert_eq!(
            info.sans,
            vec!["127.0.1.1".to_string(), "node-a".to_string()]
        );
    }

    #[test]
    fn wrong_role_expired_and_foreign_ca_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let files = write_identity(
            dir.path(),
            &ca,
            &CertSpec::new("c", Role::Controller, vec![], 1),
        );
        let material = TlsMaterial::load(&files).unwrap();
        assert!(material.check(Role::Controller).is_ok());
        assert!(material.check(Role::Agent).is_err());

        let past = time::OffsetDateTime::now_utc() - time::Duration::days(10);
        let expired = CertSpec::new("c", Role::Controller, vec![], 1)
            .with_validity(past, past + time::Duration::days(1));
        let files = write_identity(dir.path(), &ca, &expired);
        let err = TlsMaterial::load(&files)
            .unwrap()
            .check(Role::Controller)
            .unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");

        let other = CertificateAuthority::generate("other CA").unwrap();
        let files = write_identity(
            dir.path(),
            &other,
            &CertSpec::new("c", Role::Controller, vec![], 1),
        );
        crate::write_file_atomic(&files.ca, ca.cert_pem().as_bytes(), 0o644).unwrap();
        let err = TlsMaterial::load(&files)
            .unwrap()
            .check(Role::Controller)
            .unwrap_err();
        assert!(err.to_string().contains("not issued by the CA"), "{err}");
    }

    #[test]
    fn peer_identity_names_role_operator_and_serial() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let issued = ca
            .issue(
                &CertSpec::new("ctl", Role::Controller, vec![], 1)
                    .with_controller_role(ControllerRole::Observer)
                    .with_operator("alice"),
            )
            .unwrap();
        let der =
            rustls_pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let peer = PeerIdentity::from_der(&der).unwrap();
        assert_eq!(peer.common_name, "ctl");
        assert_eq!(peer.role, Some(ControllerRole::Observer));
        assert_eq!(peer.operator.as_deref(), Some("alice"));
        assert!(!peer.serial.is_empty());
        assert!(peer.describe().contains("operator alice"));
        assert!(
            ca.issue(&CertSpec::new("ctl", Role::Controller, vec![], 1).with_operator("bad name"))
                .is_err()
        );
    }

    #[test]
    fn mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let files = write_identity(
            dir.path(),
            &ca,
            &CertSpec::new("a", Role::Agent, vec!["h".into()], 1),
        );
        let other = ca
            .issue(&CertSpec::new("b", Role::Agent, vec!["h".into()], 1))
            .unwrap();
        std::fs::write(&files.key, other.key_pem).unwrap();
        let err = TlsMaterial::load(&files)
            .unwrap()
            .check(Role::Agent)
            .unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }
}
