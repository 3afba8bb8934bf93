//! The agent's TLS handshakes: every accepted connection is handshaken (TLS 1.3 only, client certificate from the
//! CA, not on the CRL) with the rustls config of the moment. The config is rebuilt when the `[tls] crl` file
//! changes (checked at every connection: one `stat`), so a revocation takes effect at the next connection without
//! a restart. A CRL that cannot be read or verified refuses every connection until it is fixed (fail closed), and
//! says so in the log.

use patchd_tls::{TlsError, TlsMaterial};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// What identifies one version of the CRL file: a rename or rewrite changes at least one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(metadata: &std::fs::Metadata) -> Self {
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.size(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
            ctime: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

struct Loaded {
    /// `None` without a CRL, or when the CRL could not be loaded (then `acceptor` is `None` too).
    stamp: Option<FileStamp>,
    acceptor: Option<TlsAcceptor>,
}

/// The server side of the agent's TLS, reloading the CRL when its file changes.
pub struct ReloadingTls {
    material: TlsMaterial,
    crl: Option<PathBuf>,
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTls")
            .field("crl", &self.crl)
            .finish_non_exhaustive()
    }
}

impl ReloadingTls {
    /// Builds the first config; an unreadable or foreign CRL is an error here (the agent does not start).
    pub fn new(material: TlsMaterial, crl: Option<PathBuf>) -> Result<Self, TlsError> {
        let tls = Self {
            material,
            crl,
            loaded: Mutex::new(Loaded {
                stamp: None,
                acceptor: None,
            }),
        };
        match &tls.crl {
            None => {
                let acceptor = tls.build(None)?;
                tls.lock().acceptor = Some(acceptor);
            }
            Some(_) => {
                tls.acceptor()?;
            }
        }
        Ok(tls)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn build(&self, crl: Option<&PathBuf>) -> Result<TlsAcceptor, TlsError> {
        let crl = crl
            .map(|path| patchd_tls::load_crl(path, &self.material.files().ca))
            .transpose()?;
        let config = self.material.server_config(crl)?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// The acceptor for a connection arriving now: the cached one unless the CRL file changed since it was built.
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        let Some(path) = &self.crl else {
            return self
                .lock()
                .acceptor
                .clone()
                .ok_or_else(|| TlsError::Config("no TLS configuration".into()));
        };
        let stamp = std::fs::metadata(path)
            .map(|m| FileStamp::of(&m))
            .map_err(|e| TlsError::Read {
                path: path.clone(),
                cause: e,
            })?;
        let mut loaded = self.lock();
        if loaded.stamp == Some(stamp)
            && let Some(acceptor) = &loaded.acceptor
        {
            return Ok(acceptor.clone());
        }
        // Reading and verifying a CRL takes well under a millisecond; holding the lock keeps one reload per change.
        match self.build(Some(path)) {
            Ok(acceptor) => {
                if loaded.stamp.is_some() {
                    tracing::info!(crl = %path.display(), "reloaded the certificate revocation list");
                }
                loaded.stamp = Some(stamp);
                loaded.acceptor = Some(acceptor.clone());
                Ok(acceptor)
            }
            Err(e) => {
                loaded.stamp = None;
                loaded.acceptor = None;
                Err(e)
            }
        }
    }

    /// Handshakes `stream` within [`patchd_tls::HANDSHAKE_TIMEOUT`]; the error says why the peer was refused.
    pub async fn handshake<IO>(&self, stream: IO) -> Result<TlsStream<IO>, String>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = self.acceptor().map_err(|e| {
            format!("the TLS configuration cannot be loaded, every connection is refused until it is fixed: {e}")
        })?;
        match tokio::time::timeout(patchd_tls::HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
            Err(_) => Err(format!(
                "TLS handshake not finished within {:?}",
                patchd_tls::HANDSHAKE_TIMEOUT
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchd_tls::{CertSpec, CertificateAuthority, Revocations, Role, TlsFiles};
    use std::path::Path;

    fn install(path: &Path, text: &str) {
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, path).unwrap();
    }

    #[test]
    fn a_changed_crl_is_reloaded_and_a_bad_one_refuses_until_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let files = TlsFiles::in_dir(dir.path(), "agent");
        std::fs::write(&files.ca, ca.cert_pem()).unwrap();
        ca.issue(&CertSpec::new(
            "a",
            Role::Agent,
            vec!["127.0.0.1".into()],
            1,
        ))
        .unwrap()
        .write(dir.path(), "agent")
        .unwrap();
        let crl = dir.path().join("ca.crl");
        install(&crl, &ca.crl_pem(&Revocations::default()).unwrap());
        let tls = ReloadingTls::new(TlsMaterial::load(&files).unwrap(), Some(crl.clone())).unwrap();
        assert!(tls.acceptor().is_ok());

        let foreign = CertificateAuthority::generate("other CA").unwrap();
        install(&crl, &foreign.crl_pem(&Revocations::default()).unwrap());
        let refused = tls
            .acceptor()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(refused.contains("not signed by the CA"), "{refused}");
        assert!(
            tls.acceptor().is_err(),
            "still refused while the file is bad"
        );

        let mut revocations = Revocations::default();
        revocations.revoke("01", "").unwrap();
        install(&crl, &ca.crl_pem(&revocations).unwrap());
        assert!(
            tls.acceptor().is_ok(),
            "served again once a good CRL is back"
        );

        std::fs::remove_file(&crl).unwrap();
        assert!(tls.acceptor().is_err(), "a missing CRL refuses too");
    }
}
