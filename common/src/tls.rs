//! Client TLS: one stack, rustls on the `ring` provider, for every connection Kiln opens. This
//! owns the CA bundle (`KILN_TLS_CA`) that RabbitMQ (`amqps://`) and Redis (`rediss://`) servers
//! are verified against, the construction of Redis clients from URLs (every Redis connection goes
//! through [`ClientTls::redis_client`]), and the HTTP client builder (webhooks, OTLP, the CLI),
//! which needs the provider installed first.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use lapin::tcp::OwnedTLSConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the CA bundle {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA bundle {} is not PEM certificates: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the CA bundle {} holds no certificate", path.display())]
    Empty { path: PathBuf },
}

/// Makes `ring` the process's rustls provider. rustls picks one on its own only where a crate asks
/// through `ClientConfig::builder()`; reqwest (without its aws-lc-rs default) and others ask for
/// the installed one, so everything that may open TLS calls this first. Idempotent.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // An error means a provider is installed already, which is all this wants.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A builder of an HTTP client that can speak `https://` (over rustls and `ring`).
pub fn http_client() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
}

/// How servers of `amqps://` and `rediss://` URLs are verified: against the CA bundle, or the
/// system's roots when there is none. Plain `amqp://` and `redis://` URLs are unaffected.
#[derive(Clone, Default)]
pub struct ClientTls {
    ca: Option<CaBundle>,
}

#[derive(Clone)]
struct CaBundle {
    path: PathBuf,
    pem: Arc<str>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.ca {
            Some(ca) => write!(f, "ClientTls(ca: {})", ca.path.display()),
            None => f.write_str("ClientTls(system roots)"),
        }
    }
}

impl ClientTls {
    /// Reads and checks the CA bundle at `path`, if any: it must hold at least one PEM certificate.
    pub fn load(path: Option<&Path>) -> Result<Self, TlsError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let read = std::fs::read_to_string(path).map_err(|source| TlsError::Read { path: path.into(), source })?;
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(read.as_bytes()) {
            cert.map_err(|source| TlsError::Pem { path: path.into(), source })?;
            found += 1;
        }
        if found == 0 {
            return Err(TlsError::Empty { path: path.into() });
        }
        Ok(Self { ca: Some(CaBundle { path: path.into(), pem: read.into() }) })
    }

    /// A Redis client for `url`. A `rediss://` server must present a certificate for the URL's
    /// host that chains to the CA bundle (only to it), or to a system root when there is no bundle.
    pub fn redis_client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        let tls = url.get(..9).is_some_and(|scheme| scheme.eq_ignore_ascii_case("rediss://"));
        match &self.ca {
            Some(ca) if tls => {
                install_crypto_provider();
                let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(ca.pem.as_bytes().to_vec()) };
                redis::Client::build_with_tls(url, certs)
            }
            Some(_) | None => {
                if tls {
                    install_crypto_provider();
                }
                redis::Client::open(url)
            }
        }
    }

    /// The TLS settings for lapin. An `amqps://` server must present a certificate for the URL's
    /// host that chains to the CA bundle or to a system root: lapin always starts from the system
    /// roots and adds the bundle (set `SSL_CERT_FILE` to the bundle to trust it alone).
    pub fn amqp(&self) -> OwnedTLSConfig {
        install_crypto_provider();
        OwnedTLSConfig { identity: None, cert_chain: self.ca.as_ref().map(|ca| ca.pem.to_string()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("kiln-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = ClientTls::load(Some(&empty)).unwrap_err();
        assert!(matches!(e, TlsError::Empty { .. }), "{e}");
        let missing = dir.join("missing.pem");
        let e = ClientTls::load(Some(&missing)).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        assert!(ClientTls::load(None).unwrap().ca.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
