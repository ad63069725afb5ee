//! Fetching an `https://` input URL for the gateway, behind the webhooks' address policy: the URL
//! is admitted by [`webhooks::check_url`] (no credentials, no internal address literal or
//! `localhost`), the name is resolved by the [`webhooks::VettingResolver`] (no connection to an
//! internal address, so no DNS rebinding), no redirects are followed and no proxy is used. The
//! whole fetch is bounded in time, and the body in bytes while it streams in.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::webhooks::{self, DeliveryError, ResolveError, VettingResolver};

/// How input URLs are fetched.
#[derive(Debug, Clone, Default)]
pub struct FetchSettings {
    /// Bound on one fetch, from connecting to the last byte.
    pub timeout: Duration,
    /// Hosts that may be fetched from even though they are internal (development).
    pub allowed_hosts: Vec<String>,
    /// Extra CA certificates (PEM) that servers may chain to, besides the system's roots.
    pub ca_pem: Option<String>,
}

/// Why a URL gave no input.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Refused by the address policy, or unreachable: see [`FetchError::refused`].
    #[error("{0}")]
    Delivery(#[source] DeliveryError),
    #[error("is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("answered HTTP {0} (only 200 is taken; redirects are not followed)")]
    Status(u16),
    #[error("was not fetched within {0:?}")]
    Timeout(Duration),
}

impl FetchError {
    /// Whether the address policy refused the URL (as it would refuse a webhook's).
    pub fn refused(&self) -> bool {
        matches!(
            self,
            Self::Delivery(DeliveryError::Refused(_) | DeliveryError::Resolve(ResolveError::Internal { .. }))
        )
    }
}

/// Why the fetcher cannot be built (a CA bundle that does not parse, a TLS set-up that fails).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the input fetcher: {0}")]
pub struct FetcherError(#[from] reqwest::Error);

pub struct Fetcher {
    client: reqwest::Client,
    allowed_hosts: Vec<String>,
    timeout: Duration,
}

impl Fetcher {
    pub fn new(settings: &FetchSettings) -> Result<Self, FetcherError> {
        let mut builder = crate::tls::http_client()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(settings.timeout)
            .dns_resolver(Arc::new(VettingResolver::system(&settings.allowed_hosts)));
        if let Some(pem) = &settings.ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem.as_bytes())? {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Self { client: builder.build()?, allowed_hosts: settings.allowed_hosts.clone(), timeout: settings.timeout })
    }

    /// The body at `url`, at most `max_bytes` of it.
    pub async fn fetch(&self, url: &str, max_bytes: usize) -> Result<Bytes, FetchError> {
        let url = webhooks::check_url(url, &self.allowed_hosts)
            .map_err(|e| FetchError::Delivery(DeliveryError::Refused(e)))?;
        let failed = |e| FetchError::Delivery(DeliveryError::from_client(e, self.timeout));
        let fetch = async {
            let mut resp = self.client.get(url).send().await.map_err(failed)?;
            if resp.status() != reqwest::StatusCode::OK {
                return Err(FetchError::Status(resp.status().as_u16()));
            }
            if resp.content_length().is_some_and(|n| n > max_bytes as u64) {
                return Err(FetchError::TooLarge { max: max_bytes });
            }
            let mut body = BytesMut::new();
            while let Some(chunk) = resp.chunk().await.map_err(failed)? {
                if body.len() + chunk.len() > max_bytes {
                    return Err(FetchError::TooLarge { max: max_bytes });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body.freeze())
        };
        tokio::time::timeout(self.timeout, fetch).await.map_err(|_| FetchError::Timeout(self.timeout))?
    }
}
