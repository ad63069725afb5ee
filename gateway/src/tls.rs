//! HTTPS for the gateway: loading the certificate and key (rustls on `ring`, TLS 1.3 unless told
//! otherwise), a certificate resolver that a background task refreshes when the files change, and
//! a listener that does the handshakes off the accept loop and hands finished TLS streams to
//! `axum::serve` — so graceful shutdown is axum's own, exactly as for plain HTTP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::{TlsConfig, TlsVersion};

/// A client gets this long to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; past it, connections wait in the kernel's accept queue.
const MAX_HANDSHAKES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a PEM certificate chain: {source}", path.display())]
    Certificates {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no PEM private key: {source}", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the key {} does not fit the certificate {}: {source}", key.display(), cert.display())]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS settings refused: {0}")]
    Settings(#[source] rustls::Error),
}

type Stamp = [(SystemTime, u64); 2];

/// The configured certificate and key files.
#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn of(config: &TlsConfig) -> Option<Self> {
        match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Self { cert: cert.clone(), key: key.clone() }),
            // clap requires both or neither; one alone is no HTTPS rather than a panic.
            (Some(_), None) | (None, Some(_)) | (None, None) => None,
        }
    }

    fn load(&self, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
        let read = |path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source });
        let cert_pem = read(&self.cert)?;
        let key_pem = read(&self.key)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Certificates { path: self.cert.clone(), source })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate { path: self.cert.clone() });
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|source| TlsError::Key { path: self.key.clone(), source })?;
        CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Pair {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source,
        })
    }

    /// What tells a change: modification time and size of both files.
    fn stamp(&self) -> Option<Stamp> {
        let of = |path: &Path| std::fs::metadata(path).and_then(|m| Ok((m.modified()?, m.len()))).ok();
        Some([of(&self.cert)?, of(&self.key)?])
    }
}

/// Hands every handshake the certificate loaded last.
#[derive(Debug)]
struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone())
    }
}

/// The gateway's TLS: the acceptor and the resolver it reads certificates from.
pub struct ServerTls {
    acceptor: TlsAcceptor,
    watch: Watch,
    reload_every: Duration,
}

impl ServerTls {
    /// Loads the certificate and key; `None` when none are configured (plain HTTP).
    pub fn load(config: &TlsConfig) -> Result<Option<Self>, TlsError> {
        let Some(files) = Files::of(config) else {
            return Ok(None);
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Stamped before loading: a change made while loading is seen at the next look.
        let seen = files.stamp();
        let resolver = Arc::new(Reloading { current: RwLock::new(Arc::new(files.load(&provider)?)) });
        let versions: &[&'static rustls::SupportedProtocolVersion] = match config.tls_min_version {
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        };
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(TlsError::Settings)?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // The router speaks HTTP/1.1 only (axum's `http1` feature).
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            watch: Watch { resolver, files, provider, seen },
            reload_every: config.tls_reload_every,
        }))
    }

    /// Accepts on `listener` with TLS, and checks the files for a new certificate until
    /// `shutdown`. Handshakes run on tasks of their own, so one slow client never holds up the
    /// next; a failed one is logged at debug and its connection dropped.
    pub fn listen(self, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
        tokio::spawn(accept_loop(listener, self.acceptor, tx));
        tokio::spawn(reload(self.watch, self.reload_every, shutdown));
        Ok(TlsListener { rx, local })
    }
}

/// Connections that finished their handshake, for `axum::serve`. Dropping it (axum does when
/// shutdown begins) stops the accept loop and closes the port.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept loop only ends once this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        let permit = tokio::select! {
            () = tx.closed() => return,
            permit = handshakes.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => return,
            },
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    // Refused only when the server is shutting down: the connection is dropped.
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out"),
            }
        });
    }
}

/// As axum does for plain TCP: errors of one connection are skipped; others (out of file
/// descriptors, say) are logged and the loop backs off for a second instead of spinning.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset => {}
        _ => {
            tracing::error!(error = %e, "accepting a connection failed");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Every `every`, loads the files again if they changed since the last look.
async fn reload(mut watch: Watch, every: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match watch.refresh() {
            Refresh::Unchanged => {}
            Refresh::Reloaded => tracing::info!(cert = %watch.files.cert.display(), "TLS certificate reloaded"),
            Refresh::Kept(error) => tracing::warn!(%error, "new TLS certificate not loaded; the one in use is kept"),
        }
    }
}

/// The certificate files, and what they looked like when last loaded.
struct Watch {
    resolver: Arc<Reloading>,
    files: Files,
    provider: Arc<CryptoProvider>,
    seen: Option<Stamp>,
}

#[derive(Debug)]
enum Refresh {
    Unchanged,
    Reloaded,
    /// The files changed but do not load: the certificate in use stays, and the files are tried
    /// again when they change again.
    Kept(TlsError),
}

impl Watch {
    fn refresh(&mut self) -> Refresh {
        let stamp = self.files.stamp();
        if stamp == self.seen {
            return Refresh::Unchanged;
        }
        self.seen = stamp;
        match self.files.load(&self.provider) {
            Ok(key) => {
                *self.resolver.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(key);
                Refresh::Reloaded
            }
            Err(e) => Refresh::Kept(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_common::testing::certs::{ServerCert, TestCa};

    use super::*;

    fn config(cert: &ServerCert) -> TlsConfig {
        TlsConfig { tls_cert: Some(cert.cert.clone()), tls_key: Some(cert.key.clone()), ..TlsConfig::default() }
    }

    fn served(watch: &Watch) -> Vec<u8> {
        watch.resolver.current.read().unwrap().cert[0].to_vec()
    }

    fn replace(from: &ServerCert, to: &ServerCert) {
        for (src, dst) in [(&from.key, &to.key), (&from.cert, &to.cert)] {
            std::fs::copy(src, dst).unwrap();
        }
    }

    #[test]
    fn a_changed_pair_is_served_and_a_broken_one_is_not() {
        let ca = TestCa::new("kiln unit CA");
        let (live, next) = (ca.server("live"), ca.server("next"));
        let first = std::fs::read(&live.cert).unwrap();
        let mut watch = ServerTls::load(&config(&live)).unwrap().expect("TLS configured").watch;
        assert!(matches!(watch.refresh(), Refresh::Unchanged));

        std::fs::write(&live.cert, "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n").unwrap();
        assert!(matches!(watch.refresh(), Refresh::Kept(_)), "a broken certificate is not loaded");
        let kept = served(&watch);
        // The key of another certificate does not fit.
        std::fs::write(&live.cert, &first).unwrap();
        std::fs::copy(&next.key, &live.key).unwrap();
        let refresh = watch.refresh();
        assert!(matches!(refresh, Refresh::Kept(TlsError::Pair { .. })), "{refresh:?}");
        assert_eq!(served(&watch), kept);

        replace(&next, &live);
        assert!(matches!(watch.refresh(), Refresh::Reloaded));
        let now = served(&watch);
        assert_ne!(now, kept);
        assert_eq!(rustls::pki_types::CertificateDer::from_pem_file(&next.cert).unwrap().to_vec(), now);
        assert!(matches!(watch.refresh(), Refresh::Unchanged));
    }

    #[test]
    fn no_certificate_is_plain_http_and_a_missing_file_is_an_error() {
        assert!(ServerTls::load(&TlsConfig::default()).unwrap().is_none());
        let missing = TlsConfig {
            tls_cert: Some("/nonexistent/kiln.crt".into()),
            tls_key: Some("/nonexistent/kiln.key".into()),
            ..TlsConfig::default()
        };
        let e = ServerTls::load(&missing).err().expect("an error");
        assert!(e.to_string().contains("/nonexistent/kiln.crt"), "{e}");
    }
}
