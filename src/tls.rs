//! HTTPS on the listener, with rustls. containerd and Docker refuse plain HTTP mirrors unless
//! told the registry is insecure; with a certificate from the site's CA they need nothing.
//!
//! The certificate and key are re-read when their files change (checked every few seconds),
//! so a cert-manager or ACME renewal takes effect without a restart. New connections get the
//! new certificate; open ones keep theirs. A renewal that fails to load leaves the old
//! certificate in place and logs why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("certificate and key do not work together: {0}")]
    Config(#[from] rustls::Error),
}

/// How often the files are checked for a renewal.
const RELOAD_CHECK: Duration = Duration::from_secs(5);

pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    /// A std RwLock: read once per accepted connection, written on a renewal.
    current: RwLock<Loaded>,
}

struct Loaded {
    acceptor: TlsAcceptor,
    stamp: (Option<SystemTime>, Option<SystemTime>),
}

impl Tls {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Tls>, TlsError> {
        let loaded = Loaded { acceptor: acceptor(cert, key)?, stamp: stamp(cert, key) };
        Ok(Arc::new(Tls { cert: cert.to_owned(), key: key.to_owned(), current: RwLock::new(loaded) }))
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().expect("tls state poisoned").acceptor.clone()
    }

    /// Watches the files in the background for as long as the process runs.
    pub fn spawn_reloader(self: &Arc<Self>) {
        let tls = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(RELOAD_CHECK);
            loop {
                ticks.tick().await;
                let Some(tls) = tls.upgrade() else { return };
                tls.reload_if_changed();
            }
        });
    }

    fn reload_if_changed(&self) {
        let now = stamp(&self.cert, &self.key);
        if self.current.read().expect("tls state poisoned").stamp == now {
            return;
        }
        match acceptor(&self.cert, &self.key) {
            Ok(acceptor) => {
                *self.current.write().expect("tls state poisoned") = Loaded { acceptor, stamp: now };
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(error) => tracing::warn!(%error, "TLS certificate changed but cannot be loaded: keeping the old one"),
        }
    }
}

fn stamp(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (modified(cert), modified(key))
}

fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let read_error =
        |path: &Path, e: &dyn std::fmt::Display| TlsError::Read { path: path.to_owned(), message: e.to_string() };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| read_error(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(cert, &e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert.to_owned() });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| read_error(key, &e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
