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
    /// (so an expired or wrong-role certificate fails at the handshake, as it would for any client).
    pub fn load(files: &TlsFiles) -> Result<Self, ControllerTlsError> {
        TlsMaterial::load(files)
            .map(|material| Self { material })
            .map_err(|cause| ControllerTlsError { cause })
    }

    /// Checks the identity offline (CA chain, validity, clientAuth EKU, key match).
    pub fn check(&self) -> Result<patchd_tls::IdentityInfo, TlsError> {
        self.material.check(Role::Controller)
    }

    /// Client config for dialing `host`: the agent's certificate must name it.
    pub fn client_config(&self, host: &str) -> ClientTlsConfig {
        self.material.client_config(host)
    }
}
