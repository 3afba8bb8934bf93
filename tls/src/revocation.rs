//! The CA's record of revoked certificates (`revoked.json` beside `ca.crt`), from which
//! [`crate::CertificateAuthority::crl_pem`] signs the CRL the agents load (`[tls] crl`).

use crate::{TlsError, write_file_atomic};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// File name of the revocation record inside the CA directory.
pub const REVOKED_FILE: &str = "revoked.json";
/// Default file name of the CRL inside the CA directory.
pub const CRL_FILE: &str = "ca.crl";

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCert {
    /// Serial number, lower-case hex without separators (as `openssl x509 -serial` prints it, lower-cased).
    pub serial: String,
    /// Subject of the certificate when it was revoked from its file; empty when revoked by serial.
    #[serde(default)]
    pub subject: String,
    /// When it was revoked (Unix seconds).
    pub revoked_unix: i64,
}

impl RevokedCert {
    /// The serial number as big-endian bytes.
    pub(crate) fn serial_bytes(&self) -> Result<Vec<u8>, TlsError> {
        parse_serial(&self.serial).ok_or_else(|| TlsError::Revocation {
            path: REVOKED_FILE.into(),
            problem: format!("serial `{}` is not hexadecimal", self.serial),
        })
    }
}

/// Every certificate the CA revoked, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    revoked: Vec<RevokedCert>,
}

impl Revocations {
    /// Reads the record at `path`; a missing file is an empty record (nothing revoked yet).
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| TlsError::Revocation {
                path: path.to_path_buf(),
                problem: format!("not a revocation record ({e}): restore it from a backup"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(TlsError::read(path, e)),
        }
    }

    /// Writes the record atomically (0644: serials are not secret).
    pub fn save(&self, path: &Path) -> Result<(), TlsError> {
        let mut text = serde_json::to_string_pretty(self).map_err(|e| TlsError::Revocation {
            path: path.to_path_buf(),
            problem: e.to_string(),
        })?;
        text.push('\n');
        write_file_atomic(path, text.as_bytes(), 0o644)
    }

    /// The revoked certificates, oldest first.
    pub fn entries(&self) -> &[RevokedCert] {
        &self.revoked
    }

    /// Records `serial` (any hex spelling, `:` separators allowed) as revoked now. Returns its entry and whether it
    /// is new (false: it was already revoked); an invalid serial is an error naming it.
    pub fn revoke(&mut self, serial: &str, subject: &str) -> Result<(RevokedCert, bool), TlsError> {
        let bytes = parse_serial(serial).ok_or_else(|| TlsError::Revocation {
            path: serial.into(),
            problem:
                "neither a readable certificate file nor a hexadecimal serial number (e.g. 3a:0f:…)"
                    .to_string(),
        })?;
        let canonical = hex_of(&bytes);
        if let Some(entry) = self.revoked.iter().find(|entry| entry.serial == canonical) {
            return Ok((entry.clone(), false));
        }
        let entry = RevokedCert {
            serial: canonical,
            subject: subject.to_string(),
            revoked_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
        };
        self.revoked.push(entry.clone());
        Ok((entry, true))
    }
}

/// The serial (lower-case hex) and subject of the certificate in `pem`, which must be signed by `ca_pem`'s key:
/// revoking a certificate of another CA would do nothing and hide the mistake.
pub fn serial_of_cert_pem(
    path: &Path,
    pem: &[u8],
    ca_pem: &[u8],
) -> Result<(String, String), TlsError> {
    let bad = |reason: String| TlsError::BadCertificate {
        path: path.to_path_buf(),
        reason,
    };
    let der = CertificateDer::from_pem_slice(pem).map_err(|e| bad(e.to_string()))?;
    let ca_der = CertificateDer::from_pem_slice(ca_pem).map_err(|e| bad(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad(e.to_string()))?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).map_err(|e| bad(e.to_string()))?;
    if cert.verify_signature(Some(ca.public_key())).is_err() {
        return Err(TlsError::Identity {
            path: path.to_path_buf(),
            problem: "was not issued by this CA: revoke it with the CA that issued it".to_string(),
        });
    }
    Ok((hex_of(cert.raw_serial()), cert.subject().to_string()))
}

/// Hex digits with optional `:` separators, as big-endian bytes without leading zero bytes.
fn parse_serial(text: &str) -> Option<Vec<u8>> {
    let digits: String = text.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || digits.len() > 40 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let bytes: Vec<u8> = (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let first = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len() - 1);
    Some(bytes[first..].to_vec())
}

fn hex_of(bytes: &[u8]) -> String {
    let first = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    bytes[first..].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertSpec, CertificateAuthority, Role};

    #[test]
    fn serials_are_canonical_and_recorded_once() {
        let mut revocations = Revocations::default();
        assert!(revocations.revoke("3A:0f:01", "").unwrap().1);
        assert!(!revocations.revoke("3a0f01", "").unwrap().1);
        let (entry, added) = revocations.revoke("00:3a:0f:01", "").unwrap();
        assert!(!added);
        assert_eq!(entry.serial, "3a0f01");
        assert_eq!(revocations.entries()[0].serial, "3a0f01");
        assert!(revocations.revoke("not-hex", "").is_err());
        assert!(revocations.revoke("", "").is_err());
    }

    #[test]
    fn record_round_trips_and_a_missing_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REVOKED_FILE);
        assert_eq!(Revocations::load(&path).unwrap(), Revocations::default());
        let mut revocations = Revocations::default();
        revocations.revoke("01", "CN=c").unwrap();
        revocations.save(&path).unwrap();
        assert_eq!(Revocations::load(&path).unwrap(), revocations);
        std::fs::write(&path, "{").unwrap();
        assert!(Revocations::load(&path).is_err());
    }

    #[test]
    fn crl_lists_the_revoked_serial_and_is_signed_by_the_ca() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let issued = ca
            .issue(&CertSpec::new("c", Role::Controller, vec![], 1))
            .unwrap();
        let (serial, subject) = serial_of_cert_pem(
            Path::new("c.crt"),
            issued.cert_pem.as_bytes(),
            ca.cert_pem().as_bytes(),
        )
        .unwrap();
        assert!(subject.contains("CN=c"), "{subject}");
        let mut revocations = Revocations::default();
        revocations.revoke(&serial, &subject).unwrap();
        let crl_pem = ca.crl_pem(&revocations).unwrap();
        let der =
            rustls_pki_types::CertificateRevocationListDer::from_pem_slice(crl_pem.as_bytes())
                .unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        crl.verify_signature(ca_cert.public_key()).unwrap();
        let listed: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| hex_of(r.raw_serial()))
            .collect();
        assert_eq!(listed, vec![serial]);

        let other = CertificateAuthority::generate("other CA").unwrap();
        assert!(
            serial_of_cert_pem(
                Path::new("c.crt"),
                issued.cert_pem.as_bytes(),
                other.cert_pem().as_bytes()
            )
            .is_err()
        );
    }
}
