//! The controller's TLS identity: `ca.crt`, `controller.crt` and `controller.key` in a TLS directory
//! (default `$PATCHCTL_HOME/tls`, or a topology's `agent.tls_dir`).

use patchd_tls::{Role, TlsError, TlsFiles, TlsMaterial};
use std::path::Path;
use tonic::transport::ClientTlsConfig;

/// File stem of the controller certificate and key inside a TLS directory.
pub const CONTROLLER_STEM: &str = "controller";

/// The controller identity could not be loaded; the message says how to create it.
#[derive(Debug, thiserror::Error)]
#[error(
    "{cause}\n  (the controller needs ca.crt, controller.crt and controller.key in its TLS directory: create them with \
     `patchctl ca init` and `patchctl cert issue controller --role operator --operator <your name>`, or pass \
     --tls-dir)"
)]
pub struct ControllerTlsError {
    pub cause: TlsError,
}

/// The loaded controller identity and cluster CA, shared by every agent connection.
#[derive(Debug, Clone)]
pub struct ControllerTls {
    material: TlsMaterial,
}

impl ControllerTls {
    /// The three paths inside `dir`.
    pub fn files_in(dir: &Path) -> TlsFiles {
        TlsFiles::in_dir(dir, CONTROLLER_STEM)
    }

    /// Loads `dir/{ca.crt,controller.crt,controller.key}`.
    pub fn load_dir(dir: &Path) -> Result<Self, ControllerTlsError> {
        Self::load(&Self::files_in(dir))
    }

    /// Loads explicit paths. Only checks that each file parses: the agent is the judge of the certificate
    /// (so an expired or wrong-role certificate fails at the handshake, as it would for any client). A certificate
    /// that expired or expires within a day gets a warning saying how to renew it: controller certificates are
    /// short-lived (7 days by default), and the agent's refusal alone would not say why.
    pub fn load(files: &TlsFiles) -> Result<Self, ControllerTlsError> {
        let tls = TlsMaterial::load(files)
            .map(|material| Self { material })
            .map_err(|cause| ControllerTlsError { cause })?;
        if let Some(note) = tls.expiry_note(time::OffsetDateTime::now_utc().unix_timestamp()) {
            errln!("warning: {note}");
        }
        Ok(tls)
    }

    /// What to tell the operator when the certificate has expired at `now` (Unix seconds) or expires within a day.
    fn expiry_note(&self, now: i64) -> Option<String> {
        const DAY: i64 = 86_400;
        let renew = format!(
            "renew it with `patchctl cert issue {CONTROLLER_STEM} --role operator --force` (or --role observer)"
        );
        let cert = &self.material.files().cert;
        match self.material.check(Role::Controller) {
            Err(TlsError::Identity { problem, .. }) if problem.starts_with("expired") => {
                Some(format!(
                    "the controller certificate {} {}; agents refuse it: {renew}",
                    cert.display(),
                    problem.split(": issue").next().unwrap_or(&problem)
                ))
            }
            Ok(info) if info.not_after_unix - now < DAY => Some(format!(
                "the controller certificate {} expires at {}: {renew}",
                cert.display(),
                info.not_after
            )),
            _ => None,
        }
    }

    /// Checks the identity offline (CA chain, validity, clientAuth EKU, key match).
    pub fn check(&self) -> Result<patchd_tls::IdentityInfo, TlsError> {
        self.material.check(Role::Controller)
    }

    /// The cluster CA's certificates (`ca.crt`): what hooks on `https://` trust besides the system roots.
    pub fn ca_certs_der(&self) -> Result<Vec<Vec<u8>>, TlsError> {
        Ok(self
            .material
            .ca_certs()?
            .into_iter()
            .map(|der| der.to_vec())
            .collect())
    }

    /// Client config for dialing `host`: the agent's certificate must name it.
    pub fn client_config(&self, host: &str) -> ClientTlsConfig {
        self.material.client_config(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchd_tls::{CertSpec, CertificateAuthority};

    #[test]
    fn an_expired_or_expiring_certificate_gets_a_note_saying_how_to_renew() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test CA").unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
        let issue = |spec: CertSpec| {
            ca.issue(&spec)
                .unwrap()
                .write(dir.path(), CONTROLLER_STEM)
                .unwrap();
            ControllerTls::load_dir(dir.path()).unwrap()
        };
        let now = time::OffsetDateTime::now_utc();
        let fresh = issue(CertSpec::new("controller", Role::Controller, vec![], 7));
        assert_eq!(fresh.expiry_note(now.unix_timestamp()), None);
        let note = fresh
            .expiry_note((now + time::Duration::days(7)).unix_timestamp())
            .unwrap();
        assert!(
            note.contains("expires at") && note.contains("--force"),
            "{note}"
        );

        let past = now - time::Duration::days(10);
        let expired = issue(
            CertSpec::new("controller", Role::Controller, vec![], 1)
                .with_validity(past, past + time::Duration::days(1)),
        );
        let note = expired.expiry_note(now.unix_timestamp()).unwrap();
        assert!(
            note.contains("expired on")
                && note.contains("agents refuse it")
                && note.contains("--force"),
            "{note}"
        );
    }
}
