//! Offline checks of an identity (used by `patchd validate` and the controller): issued by the configured CA,
//! currently valid, carrying the EKU of its role, and matching its private key.

use crate::{Role, TlsError, TlsMaterial};
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
}

/// The subject common name of a DER certificate (the peer's, as the handshake verified it), `None` when it has
/// none or does not parse. Used to name who holds a lease; never to decide trust (the handshake did that).
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(name)
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

    Ok(IdentityInfo {
        subject: leaf.subject().to_string(),
        sans: sans(&leaf),
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
