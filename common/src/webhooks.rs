//! Webhooks per the Standard Webhooks spec: URL admission and the address policy (no loopback,
//! private, link-local, metadata, reserved or tunnelled-to-internal addresses unless allowed),
//! the delivery client that connects only to addresses it vetted itself, signing (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`), and
//! the dispatcher that delivers what the store's transitions queued: bounded in all and per target
//! host, one delivery per job at a time (so a job's events arrive in order), retrying with backoff
//! and jitter for hours, honouring `Retry-After`, never following redirects, and recording the
//! outcome on the job. A job of the predictions API gets the prediction itself as each body.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use kiln_proto::{JobId, now_millis};
use serde_json::json;
use sha2::Sha256;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
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
    /// Deliveries in flight at once, to all receivers together.
    #[arg(long, env = "KILN_WEBHOOK_CONCURRENCY", default_value_t = 32)]
    pub webhook_concurrency: usize,
    /// Deliveries in flight at once to one receiver (one `host:port`), so a slow or hanging
    /// receiver holds at most this many of the dispatcher's slots and the others keep flowing.
    /// Its further deliveries wait for their claim to lapse (a few webhook timeouts) and are
    /// tried again then.
    #[arg(long, env = "KILN_WEBHOOK_CONCURRENCY_PER_HOST", default_value_t = 4)]
    pub webhook_concurrency_per_host: usize,
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
            webhook_concurrency_per_host: 4,
        }
    }
}

/// Why a webhook URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlRefused(pub String);

/// Whether an address is one a webhook must not reach by default: anything that is not a public
/// unicast host, and any tunnelling or translation address whose embedded IPv4 is one.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(v4: Ipv4Addr) -> bool {
    let [a, b, c, _] = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local() // 169.254/16: cloud metadata lives here
        || v4.is_unspecified()
        || v4.is_multicast()
        || v4.is_documentation()
        || a == 0 // 0/8, "this network"
        || (a == 100 && (64..128).contains(&b)) // 100.64/10, carrier-grade NAT
        || (a == 192 && b == 0 && c == 0) // 192.0.0/24, IETF protocol assignments
        || (a == 192 && b == 88 && c == 99) // 192.88.99/24, the 6to4 relay anycast
        || (a == 198 && (b & 0xfe) == 18) // 198.18/15, benchmarking
        || a >= 240 // 240/4, reserved, and the broadcast address
}

fn is_internal_v6(v6: Ipv6Addr) -> bool {
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    let seg = v6.segments();
    match seg {
        // ::ffff:a.b.c.d (IPv4-mapped) and ::ffff:0:a.b.c.d (IPv4-translated): that IPv4 host.
        [0, 0, 0, 0, 0, 0xffff, hi, lo] | [0, 0, 0, 0, 0xffff, 0, hi, lo] => is_internal_v4(embedded(hi, lo)),
        // ::/96: `::`, `::1` and the deprecated IPv4-compatible `::a.b.c.d`; never a public host.
        [0, 0, 0, 0, 0, 0, _, _] => true,
        // 64:ff9b::/96, the NAT64 well-known prefix: the translator connects to the embedded
        // IPv4, so that is the address to judge (DNS64 networks reach public hosts this way).
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => is_internal_v4(embedded(hi, lo)),
        // 64:ff9b:1::/48, local-use NAT64 (RFC 8215): the operator's own translation, whose
        // embedding we cannot know.
        [0x64, 0xff9b, 1, ..] => true,
        // 2002::/16, 6to4: the relay delivers to the IPv4 in bits 16..48.
        [0x2002, hi, lo, ..] => is_internal_v4(embedded(hi, lo)),
        // 2001::/32, Teredo: a NAT-traversal tunnel (its client address is obfuscated); no
        // receiver of ours lives behind one.
        [0x2001, 0, ..] => true,
        // 2001:2::/48 benchmarking, 2001:10::/28 and 2001:20::/28 ORCHID, 2001:db8::/32 and
        // 3fff::/20 documentation, 100::/64 discard-only.
        [0x2001, 2, 0, ..] | [0x2001, 0xdb8, ..] | [0x100, 0, 0, 0, ..] => true,
        [0x2001, s, ..] if (s & 0xfff0) == 0x10 || (s & 0xfff0) == 0x20 => true,
        [0x3fff, s, ..] if s < 0x1000 => true,
        [s, ..] => {
            v6.is_multicast()
                || (s & 0xfe00) == 0xfc00 // fc00::/7, unique-local
                || (s & 0xffc0) == 0xfe80 // fe80::/10, link-local
                || (s & 0xffc0) == 0xfec0 // fec0::/10, the deprecated site-local
        }
    }
}

fn is_allowed(host: &str, allowed_hosts: &[String]) -> bool {
    let host = host.trim_end_matches('.');
    allowed_hosts.iter().any(|h| h.trim_end_matches('.').eq_ignore_ascii_case(host))
}

/// Admission of a webhook URL: http(s) only, no credentials, and no internal address literal or
/// `localhost` name. Names are vetted again at every connection, by [`VettingResolver`].
pub fn check_url(raw: &str, allowed_hosts: &[String]) -> Result<url::Url, UrlRefused> {
    let url = url::Url::parse(raw).map_err(|e| UrlRefused(format!("is not a valid URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlRefused(format!("must be an http or https URL, got {}:", url.scheme())));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlRefused("must not carry credentials".into()));
    }
    let host = url.host_str().ok_or_else(|| UrlRefused("has no host".into()))?.to_owned();
    if is_allowed(&host, allowed_hosts) {
        return Ok(url);
    }
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    let internal_name = name == "localhost" || name.ends_with(".localhost");
    if internal_name || literal.parse::<IpAddr>().is_ok_and(is_internal) {
        return Err(UrlRefused(format!(
            "targets an internal address ({host}); refused unless allowed by KILN_WEBHOOK_ALLOWED_HOSTS"
        )));
    }
    Ok(url)
}

/// Why [`VettingResolver`] gave the client no address for a name.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error("{host} resolves to an internal address ({addr}); no connection was made")]
    Internal { host: String, addr: IpAddr },
    #[error("cannot resolve {host}")]
    Failed {
        host: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("{host} has no address")]
    NoAddress { host: String },
}

/// Looks a name up: the system resolver in production, a script in tests.
type Lookup = Arc<dyn Fn(String) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>> + Send + Sync>;

/// The delivery client's DNS resolver: it resolves a name and refuses it when any address is
/// internal, so the connection goes to an address vetted by this very lookup. (Checking first and
/// letting the client resolve again left a window for DNS rebinding.) Allowed hosts resolve
/// unvetted. Address literals never reach a resolver; [`check_url`] judges those.
#[derive(Clone)]
pub struct VettingResolver {
    allowed_hosts: Arc<[String]>,
    lookup: Lookup,
}

impl VettingResolver {
    pub fn system(allowed_hosts: &[String]) -> Self {
        let lookup: Lookup = Arc::new(|host: String| {
            Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), 0)).await?.map(|a| a.ip()).collect()) })
        });
        Self { allowed_hosts: allowed_hosts.into(), lookup }
    }

    /// The vetted addresses of `host`.
    pub async fn vet(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let ips = (self.lookup)(host.to_owned())
            .await
            .map_err(|e| ResolveError::Failed { host: host.to_owned(), source: Arc::new(e) })?;
        if !is_allowed(host, &self.allowed_hosts)
            && let Some(addr) = ips.iter().copied().find(|ip| is_internal(*ip))
        {
            return Err(ResolveError::Internal { host: host.to_owned(), addr });
        }
        if ips.is_empty() {
            return Err(ResolveError::NoAddress { host: host.to_owned() });
        }
        Ok(ips)
    }
}

impl reqwest::dns::Resolve for VettingResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let ips = this.vet(&host).await?;
            // Port 0: the client puts in the URL's port.
            let addrs: reqwest::dns::Addrs = Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// The delivery client: the attempt bound, no redirects, no proxy (a proxy would resolve the
/// target itself, past the vetting), and the [`VettingResolver`].
pub fn client(config: &WebhookConfig, resolver: VettingResolver) -> Result<reqwest::Client, reqwest::Error> {
    crate::tls::http_client()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(config.webhook_timeout)
        .dns_resolver(Arc::new(resolver))
        .build()
}

/// Why a delivery attempt got no HTTP answer. Each is retried until the delivery is given up,
/// except a URL refused outright, which cannot become admissible.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("refused: the URL {0}")]
    Refused(#[source] UrlRefused),
    #[error("refused: {0}")]
    Resolve(#[source] ResolveError),
    #[error("no answer within {after:?}")]
    Timeout {
        after: Duration,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot connect: {0}")]
    Connect(#[source] reqwest::Error),
    #[error("the request failed: {0}")]
    Request(#[source] reqwest::Error),
}

impl DeliveryError {
    pub(crate) fn from_client(e: reqwest::Error, timeout: Duration) -> Self {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if let Some(vetting) = s.downcast_ref::<ResolveError>() {
                return Self::Resolve(vetting.clone());
            }
            source = s.source();
        }
        if e.is_timeout() {
            Self::Timeout { after: timeout, source: e }
        } else if e.is_connect() {
            Self::Connect(e)
        } else {
            Self::Request(e)
        }
    }

    /// Whether trying again can help.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Refused(_) => true,
            Self::Resolve(_) | Self::Timeout { .. } | Self::Connect(_) | Self::Request(_) => false,
        }
    }

    /// A low-cardinality label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Refused(_) => "refused",
            Self::Resolve(ResolveError::Internal { .. }) => "internal_address",
            Self::Resolve(ResolveError::Failed { .. } | ResolveError::NoAddress { .. }) => "unresolvable",
            Self::Timeout { .. } => "timeout",
            Self::Connect(_) => "connect",
            Self::Request(_) => "request",
        }
    }
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

/// The receiver a URL names, for the per-host bound: its `host:port`.
fn authority(url: &url::Url) -> String {
    format!("{}:{}", url.host_str().unwrap_or_default(), url.port_or_known_default().unwrap_or(0))
}

/// How long a delivery waits in line for a slot of its receiver before it is put back.
const PARK: Duration = Duration::from_secs(1);

/// Deliveries in flight, per receiver and per job: at most `per_host` sending to one receiver,
/// the others in line for it (FIFO, up to `park`), and one per job, so a job's next event is never
/// sent while its previous one is still on its way. A receiver whose line timed out is
/// congested: until one of its deliveries ends, new ones for it are put back at once instead of
/// queueing behind it, so a receiver that hangs costs the dispatcher its `per_host` slots and
/// nothing more.
struct InFlight {
    per_host: usize,
    park: Duration,
    inner: Mutex<InFlightInner>,
}

#[derive(Default)]
struct InFlightInner {
    hosts: HashMap<String, Host>,
    jobs: HashSet<JobId>,
}

struct Host {
    slots: Arc<Semaphore>,
    /// Deliveries sending or in line: the entry is dropped when none is left.
    users: usize,
    congested: bool,
}

/// Why a claimed delivery did not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Busy {
    Job,
    Host,
}

impl Busy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Job => "job_busy",
            Self::Host => "host_busy",
        }
    }
}

/// A delivery's place in [`InFlight`], given back on drop.
struct Lane {
    in_flight: Arc<InFlight>,
    job: JobId,
    host: String,
    slot: Option<OwnedSemaphorePermit>,
}

impl InFlight {
    fn new(per_host: usize, park: Duration) -> Arc<Self> {
        Arc::new(Self { per_host: per_host.max(1), park, inner: Mutex::default() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InFlightInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the job's turn and a slot of its receiver, waiting in line for the slot when that
    /// helps; `queued` is called when it does wait.
    async fn enter(self: &Arc<Self>, job: JobId, host: String, queued: impl FnOnce()) -> Result<Lane, Busy> {
        let (slots, congested) = {
            let mut inner = self.lock();
            if !inner.jobs.insert(job) {
                return Err(Busy::Job);
            }
            let per_host = self.per_host;
            let entry = inner.hosts.entry(host.clone()).or_insert_with(|| Host {
                slots: Arc::new(Semaphore::new(per_host)),
                users: 0,
                congested: false,
            });
            entry.users += 1;
            (entry.slots.clone(), entry.congested)
        };
        let mut lane = Lane { in_flight: self.clone(), job, host, slot: None };
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            lane.slot = Some(slot);
            return Ok(lane);
        }
        if congested {
            return Err(Busy::Host);
        }
        queued();
        match tokio::time::timeout(self.park, slots.acquire_owned()).await {
            Ok(Ok(slot)) => {
                lane.slot = Some(slot);
                Ok(lane)
            }
            Ok(Err(_)) | Err(_) => {
                if let Some(h) = self.lock().hosts.get_mut(&lane.host) {
                    h.congested = true;
                }
                Err(Busy::Host)
            }
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let sent = self.slot.take().is_some();
        let mut inner = self.in_flight.lock();
        inner.jobs.remove(&self.job);
        if let Some(h) = inner.hosts.get_mut(&self.host) {
            h.users -= 1;
            // The receiver finished one (answer or timeout): its line moves again.
            h.congested &= !sent;
            if h.users == 0 {
                inner.hosts.remove(&self.host);
            }
        }
    }
}

/// What every delivery task shares.
struct Dispatcher {
    store: Arc<dyn Store>,
    http: reqwest::Client,
    key: Vec<u8>,
    config: WebhookConfig,
    in_flight: Arc<InFlight>,
}

/// Delivers due webhooks until `shutdown`.
pub async fn dispatch(store: Arc<dyn Store>, config: WebhookConfig, shutdown: CancellationToken) {
    let key = match config.webhook_secret.as_ref().map(secret_key) {
        Some(Ok(k)) => k,
        Some(Err(e)) => {
            tracing::error!(target: "kiln::webhooks", error = %e, "webhook dispatcher not started");
            return;
        }
        None => return,
    };
    let http = match client(&config, VettingResolver::system(&config.webhook_allowed_hosts)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(target: "kiln::webhooks", error = %e, "webhook dispatcher not started");
            return;
        }
    };
    let owner = format!("dispatcher-{}", std::process::id());
    // A claimed delivery holds a slot from its claim to its end, sending or in line.
    let slots = Arc::new(Semaphore::new(config.webhook_concurrency.max(1)));
    let in_flight = InFlight::new(config.webhook_concurrency_per_host, PARK.min(config.webhook_timeout));
    let claim_for = (config.webhook_timeout.as_millis() as i64) * 3 + 10_000;
    let ctx = Arc::new(Dispatcher { store, http, key, config, in_flight });
    loop {
        // Claim only as many as there are slots: a claim waiting for a slot is a delivery held
        // back from every other dispatcher for nothing.
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let mut free = vec![first];
        while let Ok(slot) = slots.clone().try_acquire_owned() {
            free.push(slot);
        }
        let now = now_millis();
        let due = match ctx.store.due_webhooks(now, &owner, now + claim_for, free.len()).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(target: "kiln::webhooks", error = %e, "cannot read due webhooks");
                Vec::new()
            }
        };
        let mut starts = Vec::with_capacity(due.len());
        for (d, slot) in due.into_iter().zip(free.drain(..)) {
            let (tx, rx) = oneshot::channel();
            starts.push(rx);
            tokio::spawn(run(ctx.clone(), d, slot, tx));
        }
        drop(free);
        // Nothing went ahead (none was due, or every one was put back): pause, so a backlog
        // for a backed-up receiver is not claimed over and over in a hot loop.
        let went = futures::future::join_all(starts).await.into_iter().filter(|s| matches!(s, Ok(true))).count();
        let pause = if went == 0 { Duration::from_millis(200) } else { Duration::ZERO };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// One claimed delivery, holding one of the dispatcher's slots. When its job already has a
/// delivery in flight, or its receiver has no slot for it soon, it is put back: its claim lapses
/// and brings it back. Reports on `went` whether it went ahead (or into line).
async fn run(ctx: Arc<Dispatcher>, d: WebhookDelivery, _slot: OwnedSemaphorePermit, went: oneshot::Sender<bool>) {
    let store = &*ctx.store;
    let record = match store.get(d.job).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(target: "kiln::webhooks", delivery = %d.id, error = %e, "cannot read the job; will retry");
            let _ = went.send(false);
            return;
        }
    };
    let Some(record) = record else {
        // The job expired before its event could be delivered: nothing left to say.
        let _ = went.send(true);
        let attempt = WebhookAttempt { body: String::new(), status: None, ok: false, at: now_millis(), retry_at: None };
        let _ = store.webhook_attempted(&d, &attempt).await;
        return;
    };
    let Some(raw) = record.webhook.as_ref().map(|w| w.url.clone()) else {
        let _ = went.send(false);
        return;
    };
    let url = check_url(&raw, &ctx.config.webhook_allowed_hosts);
    let host = url.as_ref().map(authority).unwrap_or_default();
    let mut went = Some(went);
    let mut report = |ok: bool| {
        if let Some(tx) = went.take() {
            let _ = tx.send(ok);
        }
    };
    let entered = ctx.in_flight.enter(d.job, host, || report(true)).await;
    let _lane = match entered {
        Ok(lane) => lane,
        Err(busy) => {
            metrics::counter!("kiln_gateway_webhook_deferred_total", "reason" => busy.as_str()).increment(1);
            tracing::debug!(target: "kiln::webhooks", delivery = %d.id, reason = busy.as_str(), "delivery put back");
            report(false);
            return;
        }
    };
    report(true);
    let now = now_millis();
    let body = d.body.clone().unwrap_or_else(|| {
        let timestamp = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(d.at) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
        match record.webhook.as_ref().and_then(|w| w.prediction.as_ref()) {
            // A prediction's webhook sends the prediction itself, as Replicate's do.
            Some(view) => {
                serde_json::to_string(&kiln_proto::Prediction::of(&record, view, None)).expect("predictions serialise")
            }
            // `seq` orders a job's events for receivers that process them out of band.
            None => json!({ "type": d.event, "seq": d.seq, "timestamp": timestamp, "data": record }).to_string(),
        }
    });
    let span = tracing::info_span!("webhook.deliver", delivery = %d.id, job_id = %d.job, event = %d.event, attempt = d.attempts + 1);
    crate::telemetry::set_parent(&span, record.traceparent.as_deref());
    let answer = match url {
        Ok(url) => post(&ctx, url, &d, &body).instrument(span).await,
        Err(refused) => Err(DeliveryError::Refused(refused)),
    };
    let (status, retry_after, permanent) = match &answer {
        Ok((status, retry_after)) => (Some(*status), *retry_after, false),
        Err(e) => (None, None, e.is_permanent()),
    };
    let config = &ctx.config;
    let ok = status.is_some_and(|s| (200..300).contains(&s));
    let attempts = d.attempts + 1;
    let give_up = permanent || now - d.at >= config.webhook_give_up_after.as_millis() as i64;
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
    if let Err(e) = &answer {
        metrics::counter!("kiln_gateway_webhook_failures_total", "reason" => e.reason()).increment(1);
    }
    let why = match &answer {
        Ok((status, _)) => format!("HTTP {status}"),
        Err(e) => e.to_string(),
    };
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
    ctx: &Dispatcher,
    url: url::Url,
    d: &WebhookDelivery,
    body: &str,
) -> Result<(u16, Option<Duration>), DeliveryError> {
    let timestamp = d.at / 1000;
    let resp = ctx
        .http
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &d.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", sign(&ctx.key, &d.id, timestamp, body))
        .body(body.to_owned())
        .send()
        .await
        .map_err(|e| DeliveryError::from_client(e, ctx.config.webhook_timeout))?;
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
            "http://LocalHost./x",
            "http://10.1.2.3/",
            "http://192.168.0.1/",
            "http://172.16.5.4/",
            "http://169.254.169.254/latest/meta-data",
            "http://2130706433/",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://100.64.0.1/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:7f00:1::]/",
            "http://198.18.0.1/",
            "http://255.255.255.255/",
            "ftp://example.com/",
            "http://user:pw@example.com/",
            "not a url",
        ] {
            assert!(check_url(bad, &[]).is_err(), "{bad} accepted");
        }
        assert!(check_url("https://hooks.example.com/kiln", &[]).is_ok());
        assert!(check_url("http://127.0.0.1:9000/hook", &["127.0.0.1".into()]).is_ok());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_ranges_that_are_not_public_hosts_are_internal() {
        for (what, addr) in [
            ("loopback", "127.0.0.1"),
            ("loopback /8", "127.255.0.9"),
            ("private 10/8", "10.0.0.1"),
            ("private 172.16/12", "172.31.255.254"),
            ("private 192.168/16", "192.168.1.1"),
            ("link-local and cloud metadata", "169.254.169.254"),
            ("this network 0/8", "0.1.2.3"),
            ("unspecified", "0.0.0.0"),
            ("carrier-grade NAT 100.64/10", "100.127.0.1"),
            ("IETF protocol assignments 192.0.0/24", "192.0.0.8"),
            ("documentation 192.0.2/24", "192.0.2.1"),
            ("documentation 198.51.100/24", "198.51.100.7"),
            ("documentation 203.0.113/24", "203.0.113.9"),
            ("6to4 relay anycast 192.88.99/24", "192.88.99.1"),
            ("benchmarking 198.18/15", "198.18.0.1"),
            ("benchmarking 198.18/15, upper half", "198.19.255.254"),
            ("multicast", "224.0.0.1"),
            ("reserved 240/4", "240.0.0.1"),
            ("reserved 240/4, top", "254.255.255.255"),
            ("broadcast", "255.255.255.255"),
        ] {
            assert!(is_internal(ip(addr)), "{what}: {addr} counted as public");
        }
        for addr in
            ["8.8.8.8", "1.1.1.1", "100.63.255.255", "100.128.0.0", "198.17.255.255", "198.20.0.0", "93.184.216.34"]
        {
            assert!(!is_internal(ip(addr)), "{addr} counted as internal");
        }
    }

    #[test]
    fn ipv6_ranges_and_tunnels_to_internal_ipv4_are_internal() {
        for (what, addr) in [
            ("loopback", "::1"),
            ("unspecified", "::"),
            ("IPv4-compatible ::a.b.c.d, internal", "::127.0.0.1"),
            ("IPv4-compatible ::a.b.c.d, public", "::8.8.8.8"),
            ("IPv4-mapped, loopback", "::ffff:127.0.0.1"),
            ("IPv4-mapped, metadata", "::ffff:169.254.169.254"),
            ("IPv4-translated, private", "::ffff:0:10.0.0.1"),
            ("NAT64 64:ff9b::/96 to loopback", "64:ff9b::127.0.0.1"),
            ("NAT64 64:ff9b::/96 to metadata", "64:ff9b::a9fe:a9fe"),
            ("NAT64 64:ff9b::/96 to private", "64:ff9b::192.168.0.1"),
            ("local-use NAT64 64:ff9b:1::/48", "64:ff9b:1::808:808"),
            ("6to4 2002::/16 of loopback", "2002:7f00:1::1"),
            ("6to4 2002::/16 of private", "2002:0a00:0001::"),
            ("6to4 2002::/16 of metadata", "2002:a9fe:a9fe::1"),
            ("Teredo 2001::/32", "2001:0:4136:e378:8000:63bf:3fff:fdd2"),
            ("benchmarking 2001:2::/48", "2001:2::1"),
            ("ORCHIDv2 2001:20::/28", "2001:20::1"),
            ("documentation 2001:db8::/32", "2001:db8::1"),
            ("documentation 3fff::/20", "3fff:fff::1"),
            ("discard-only 100::/64", "100::1"),
            ("unique-local fc00::/7", "fd12:3456::1"),
            ("link-local fe80::/10", "fe80::1"),
            ("site-local fec0::/10", "fec0::1"),
            ("multicast", "ff02::1"),
        ] {
            assert!(is_internal(ip(addr)), "{what}: {addr} counted as public");
        }
        for (what, addr) in [
            ("global unicast", "2606:4700:4700::1111"),
            ("NAT64 of a public IPv4", "64:ff9b::8.8.8.8"),
            ("6to4 of a public IPv4", "2002:0808:0808::1"),
            ("IPv4-mapped public", "::ffff:8.8.8.8"),
            ("2001:4860:: is not Teredo", "2001:4860:4860::8888"),
            ("3fff:1000:: is past the documentation /20", "3fff:1000::1"),
        ] {
            assert!(!is_internal(ip(addr)), "{what}: {addr} counted as internal");
        }
    }

    fn scripted(answers: Vec<IpAddr>) -> Lookup {
        Arc::new(move |_host: String| {
            let answers = answers.clone();
            Box::pin(async move { Ok(answers) })
        })
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_with_an_internal_address_unless_allowed() {
        let rebinder = |allowed: &[String]| VettingResolver {
            allowed_hosts: allowed.into(),
            lookup: scripted(vec![ip("93.184.216.34"), ip("10.0.0.7")]),
        };
        let refused = rebinder(&[]).vet("hooks.example.com").await.unwrap_err();
        assert!(matches!(&refused, ResolveError::Internal { addr, .. } if *addr == ip("10.0.0.7")), "{refused:?}");
        assert!(refused.to_string().contains("hooks.example.com resolves to an internal address (10.0.0.7)"));
        let allowed = rebinder(&["Hooks.Example.com".into()]).vet("hooks.example.com").await.unwrap();
        assert_eq!(allowed.len(), 2);
        let public = VettingResolver { allowed_hosts: Arc::from([]), lookup: scripted(vec![ip("93.184.216.34")]) };
        assert_eq!(public.vet("hooks.example.com").await.unwrap(), [ip("93.184.216.34")]);
    }

    /// The client itself connects only to vetted addresses: a name that passes [`check_url`] but
    /// resolves to loopback at connect time (what a rebinding DNS server answers the second time)
    /// never reaches the listener there.
    #[tokio::test]
    async fn the_client_never_connects_to_an_address_its_resolver_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = accepted.clone();
        tokio::spawn(async move {
            while let Ok((_conn, _)) = listener.accept().await {
                seen.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let config = WebhookConfig { webhook_timeout: Duration::from_secs(5), ..WebhookConfig::default() };
        let url = format!("http://rebound.example.com:{port}/hook");
        assert!(check_url(&url, &[]).is_ok(), "the name itself is admissible");
        let rebound = VettingResolver { allowed_hosts: Arc::from([]), lookup: scripted(vec![ip("127.0.0.1")]) };
        let err = client(&config, rebound).unwrap().post(&url).body("{}").send().await.unwrap_err();
        let err = DeliveryError::from_client(err, config.webhook_timeout);
        assert_eq!(err.reason(), "internal_address", "{err}");
        assert!(err.to_string().contains("rebound.example.com resolves to an internal address (127.0.0.1)"), "{err}");
        assert!(!accepted.load(std::sync::atomic::Ordering::SeqCst), "a connection reached the refused address");
        // The same name allowed: the request goes through to the listener.
        let allowed = VettingResolver {
            allowed_hosts: Arc::from(["rebound.example.com".to_owned()]),
            lookup: scripted(vec![ip("127.0.0.1")]),
        };
        let quick = WebhookConfig { webhook_timeout: Duration::from_millis(300), ..config };
        let err = client(&quick, allowed).unwrap().post(&url).body("{}").send().await.unwrap_err();
        assert!(accepted.load(std::sync::atomic::Ordering::SeqCst), "the allowed host was not reached: {err}");
    }

    #[tokio::test]
    async fn in_flight_allows_one_delivery_per_job_and_a_few_per_host() {
        let lanes = InFlight::new(2, Duration::from_millis(200));
        let ids: Vec<JobId> = (0..6).map(|_| JobId::random()).collect();
        let enter = |job: JobId, host: &str| {
            let (lanes, host) = (lanes.clone(), host.to_owned());
            async move { lanes.enter(job, host, || {}).await }
        };
        let first = enter(ids[0], "slow:80").await.unwrap();
        assert_eq!(enter(ids[0], "fast:80").await.err(), Some(Busy::Job), "a second delivery of one job");
        let second = enter(ids[1], "slow:80").await.unwrap();
        let other = enter(ids[2], "fast:80").await.expect("another host is not held up");

        // A third for the full host waits in line, and gets the slot the first gives back.
        let (queued_tx, queued) = oneshot::channel();
        let in_line = {
            let lanes = lanes.clone();
            let job = ids[3];
            tokio::spawn(async move { lanes.enter(job, "slow:80".into(), move || queued_tx.send(()).unwrap()).await })
        };
        queued.await.expect("it waits in line");
        drop(first);
        let third = in_line.await.unwrap().expect("the freed slot goes to the one in line");

        // A line that does not move within `park` puts the delivery back and marks the host
        // congested: the next one is put back at once, without queueing.
        assert_eq!(enter(ids[4], "slow:80").await.err(), Some(Busy::Host));
        let mut queued_again = false;
        let at_once = lanes.enter(ids[5], "slow:80".into(), || queued_again = true).await;
        assert_eq!((at_once.err(), queued_again), (Some(Busy::Host), false));
        // One of its deliveries ends: its line moves again.
        drop(second);
        let _fourth = enter(ids[4], "slow:80").await.expect("a free slot after a delivery ended");
        drop((third, other));
        assert_eq!(lanes.lock().hosts.len(), 1, "hosts without deliveries are forgotten");
        assert_eq!(lanes.lock().jobs.len(), 1);
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
