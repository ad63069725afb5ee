//! Webhooks per the Standard Webhooks spec: URL admission (no loopback, private, link-local or
//! metadata addresses unless allowed), signing (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`), and the dispatcher that
//! delivers the deliveries the store's transitions queued, retrying with backoff and jitter for
//! hours, honouring `Retry-After`, never following redirects, and recording the outcome on the job.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use kiln_proto::now_millis;
use serde_json::json;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Secret, parse_duration};
use crate::store::{Store, WebhookAttempt, WebhookDelivery};

#[derive(clap::Args, Debug, Clone)]
pub struct WebhookConfig {
    /// Signing secret in Standard Webhooks form (`whsec_` + base64). Jobs with a webhook are
    /// refused while it is unset.
    #[arg(long, env = "KILN_WEBHOOK_SECRET")]
    pub webhook_secret: Option<Secret>,
    /// Hosts (names or IP addresses) that webhooks may target even though they are loopback,
    /// private or link-local, comma-separated; for development.
    #[arg(long, env = "KILN_WEBHOOK_ALLOWED_HOSTS", value_delimiter = ',')]
    pub webhook_allowed_hosts: Vec<String>,
    /// Run the webhook dispatcher in this process.
    #[arg(long, env = "KILN_WEBHOOK_DISPATCH", default_value_t = true, action = clap::ArgAction::Set)]
    pub webhook_dispatch: bool,
    /// Bound on one delivery attempt, connection included.
    #[arg(long, env = "KILN_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub webhook_timeout: Duration,
    /// Delay before the first retry; doubles with each attempt, with jitter.
    #[arg(long, env = "KILN_WEBHOOK_RETRY_BASE", default_value = "5s", value_parser = parse_duration)]
    pub webhook_retry_base: Duration,
    /// Longest delay between retries.
    #[arg(long, env = "KILN_WEBHOOK_RETRY_MAX", default_value = "1h", value_parser = parse_duration)]
    pub webhook_retry_max: Duration,
    /// A delivery still failing this long after its event is given up.
    #[arg(long, env = "KILN_WEBHOOK_GIVE_UP_AFTER", default_value = "24h", value_parser = parse_duration)]
    pub webhook_give_up_after: Duration,
    /// Deliveries in flight at once.
    #[arg(long, env = "KILN_WEBHOOK_CONCURRENCY", default_value_t = 32)]
    pub webhook_concurrency: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            webhook_secret: None,
            webhook_allowed_hosts: Vec::new(),
            webhook_dispatch: true,
            webhook_timeout: Duration::from_secs(10),
            webhook_retry_base: Duration::from_secs(5),
            webhook_retry_max: Duration::from_secs(3600),
            webhook_give_up_after: Duration::from_secs(86_400),
            webhook_concurrency: 32,
        }
    }
}

/// Why a webhook URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlRefused(pub String);

/// Whether an address is one a webhook must not reach by default: loopback, private, link-local
/// (cloud metadata lives there), unique-local, carrier-grade NAT, unspecified, multicast.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || o[0] == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Admission of a webhook URL: http(s) only, no credentials, and no internal address (checked
/// again on every delivery, after DNS resolution).
pub fn check_url(raw: &str, allowed_hosts: &[String]) -> Result<url::Url, UrlRefused> {
    let url = url::Url::parse(raw).map_err(|e| UrlRefused(format!("is not a valid URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlRefused(format!("must be an http or https URL, got {}:", url.scheme())));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlRefused("must not carry credentials".into()));
    }
    let host = url.host_str().ok_or_else(|| UrlRefused("has no host".into()))?.to_owned();
    if allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
        return Ok(url);
    }
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let internal_name = host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost");
    if internal_name || literal.parse::<IpAddr>().is_ok_and(is_internal) {
        return Err(UrlRefused(format!(
            "targets an internal address ({host}); refused unless allowed by KILN_WEBHOOK_ALLOWED_HOSTS"
        )));
    }
    Ok(url)
}

/// The signing key of a `whsec_` secret.
pub fn secret_key(secret: &Secret) -> Result<Vec<u8>, String> {
    let s = secret.expose();
    B64.decode(s.strip_prefix("whsec_").unwrap_or(s))
        .map_err(|e| format!("KILN_WEBHOOK_SECRET is not whsec_ + base64: {e}"))
}

/// `v1,<base64 HMAC-SHA256 over "{id}.{timestamp}.{body}">`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

/// A fresh random secret in `whsec_` form.
pub fn generate_secret() -> Secret {
    let bytes: Vec<u8> = (0..2).flat_map(|_| *uuid::Uuid::new_v4().as_bytes()).collect();
    Secret::new(format!("whsec_{}", B64.encode(bytes)))
}

/// Delivers due webhooks until `shutdown`.
pub async fn dispatch(store: Arc<dyn Store>, config: WebhookConfig, shutdown: CancellationToken) {
    let key = match config.webhook_secret.as_ref().map(secret_key) {
        Some(Ok(k)) => Arc::new(k),
        Some(Err(e)) => {
            tracing::error!(target: "kiln::webhooks", error = %e, "webhook dispatcher not started");
            return;
        }
        None => return,
    };
    let http = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(config.webhook_timeout)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(target: "kiln::webhooks", error = %e, "webhook dispatcher not started");
            return;
        }
    };
    let owner = format!("dispatcher-{}", std::process::id());
    let config = Arc::new(config);
    let permits = Arc::new(tokio::sync::Semaphore::new(config.webhook_concurrency.max(1)));
    loop {
        let claim = now_millis() + (config.webhook_timeout.as_millis() as i64) * 3 + 10_000;
        let due = match store.due_webhooks(now_millis(), &owner, claim, config.webhook_concurrency).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(target: "kiln::webhooks", error = %e, "cannot read due webhooks");
                Vec::new()
            }
        };
        let idle = due.is_empty();
        for d in due {
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let (store, http, key, config) = (store.clone(), http.clone(), key.clone(), config.clone());
            tokio::spawn(async move {
                deliver(&*store, &http, &key, &config, d).await;
                drop(permit);
            });
        }
        let pause = if idle { Duration::from_millis(200) } else { Duration::ZERO };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

async fn deliver(store: &dyn Store, http: &reqwest::Client, key: &[u8], config: &WebhookConfig, d: WebhookDelivery) {
    let now = now_millis();
    let record = match store.get(d.job).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(target: "kiln::webhooks", delivery = %d.id, error = %e, "cannot read the job; will retry");
            return;
        }
    };
    let Some(record) = record else {
        // The job expired before its event could be delivered: nothing left to say.
        let attempt = WebhookAttempt { body: String::new(), status: None, ok: false, at: now, retry_at: None };
        let _ = store.webhook_attempted(&d, &attempt).await;
        return;
    };
    let Some(url) = record.webhook.as_ref().map(|w| w.url.clone()) else { return };
    let body = d.body.clone().unwrap_or_else(|| {
        let timestamp = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(d.at) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
        json!({ "type": d.event, "timestamp": timestamp, "data": record }).to_string()
    });
    let span = tracing::info_span!("webhook.deliver", delivery = %d.id, job_id = %d.job, event = %d.event, attempt = d.attempts + 1);
    crate::telemetry::set_parent(&span, record.traceparent.as_deref());
    let (status, retry_after, why) = match post(http, key, config, &url, &d, &body).instrument(span).await {
        Ok((status, retry_after)) => (Some(status), retry_after, format!("HTTP {status}")),
        Err(why) => (None, None, why),
    };
    let ok = status.is_some_and(|s| (200..300).contains(&s));
    let attempts = d.attempts + 1;
    let give_up = now - d.at >= config.webhook_give_up_after.as_millis() as i64;
    let retry_at = (!ok && !give_up).then(|| {
        let step = config
            .webhook_retry_base
            .saturating_mul(1 << attempts.saturating_sub(1).min(20))
            .min(config.webhook_retry_max);
        let jittered = step / 2 + step.mul_f64(rand_unit() / 2.0);
        now + jittered.max(retry_after.unwrap_or_default()).as_millis() as i64
    });
    let attempt = WebhookAttempt { body, status, ok, at: now, retry_at };
    let outcome = match (&attempt.ok, &attempt.retry_at) {
        (true, _) => "delivered",
        (false, Some(_)) => "retried",
        (false, None) => "gave_up",
    };
    metrics::counter!("kiln_gateway_webhook_deliveries_total", "outcome" => outcome).increment(1);
    match (&attempt.ok, &attempt.retry_at) {
        (true, _) => tracing::debug!(target: "kiln::webhooks", delivery = %d.id, attempts, "webhook delivered"),
        (false, Some(at)) => {
            tracing::info!(target: "kiln::webhooks", delivery = %d.id, attempts, %why, retry_in_ms = at - now, "webhook failed, will retry")
        }
        (false, None) => tracing::warn!(target: "kiln::webhooks", delivery = %d.id, attempts, %why, "webhook given up"),
    }
    if let Err(e) = store.webhook_attempted(&d, &attempt).await {
        tracing::warn!(target: "kiln::webhooks", delivery = %d.id, error = %e, "cannot record the attempt; it will be retried");
    }
}

fn rand_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}

/// One POST. Returns the status and any `Retry-After`, or why there was no answer.
async fn post(
    http: &reqwest::Client,
    key: &[u8],
    config: &WebhookConfig,
    url: &str,
    d: &WebhookDelivery,
    body: &str,
) -> Result<(u16, Option<Duration>), String> {
    let parsed = check_url(url, &config.webhook_allowed_hosts).map_err(|e| e.to_string())?;
    let host = parsed.host_str().unwrap_or_default().to_owned();
    if !config.webhook_allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
        // Resolve and check every address, so a name cannot point a delivery inside the network.
        let port = parsed.port_or_known_default().unwrap_or(443);
        let addrs = tokio::net::lookup_host((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?;
        if let Some(bad) = addrs.map(|a| a.ip()).find(|ip| is_internal(*ip)) {
            return Err(format!("{host} resolves to an internal address ({bad})"));
        }
    }
    let timestamp = d.at / 1000;
    let resp = http
        .post(parsed)
        .header("content-type", "application/json")
        .header("webhook-id", &d.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", sign(key, &d.id, timestamp, body))
        .body(body.to_owned())
        .send()
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    Ok((resp.status().as_u16(), retry_after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_internal_targets_unless_allowed() {
        for bad in [
            "http://127.0.0.1/x",
            "http://localhost:8080/x",
            "http://10.1.2.3/",
            "http://192.168.0.1/",
            "http://172.16.5.4/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://100.64.0.1/",
            "ftp://example.com/",
            "http://user:pw@example.com/",
            "not a url",
        ] {
            assert!(check_url(bad, &[]).is_err(), "{bad} accepted");
        }
        assert!(check_url("https://hooks.example.com/kiln", &[]).is_ok());
        assert!(check_url("http://127.0.0.1:9000/hook", &["127.0.0.1".into()]).is_ok());
    }

    #[test]
    fn signs_like_the_spec_example() {
        // The Standard Webhooks specification's published example.
        let key = secret_key(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
