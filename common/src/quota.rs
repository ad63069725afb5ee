//! Rate limits and compute quotas, kept where every gateway replica sees the same numbers:
//! Redis for a fleet (scripts run on Redis's clock), memory for the embedded backend.
//!
//! - Request rate: GCRA (the generic cell rate algorithm, as in ATM networks and `redis-cell`).
//!   One stored number per bucket, the theoretical arrival time; a request is allowed when it
//!   does not move that time more than `burst` emission intervals past now.
//! - Compute: seconds of worker run time charged per tenant into hourly buckets; use over the
//!   last hour is the current bucket plus the previous one weighted by how much of it the
//!   sliding hour still covers.
//!
//! Jobs in flight are counted by the store, which sees every job end (`Store::reserve_slot`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use crate::store::StoreError;

const HOUR_MS: f64 = 3_600_000.0;
/// Buckets the embedded limiter keeps before it forgets idle ones.
const MAX_BUCKETS: usize = 100_000;

/// The answer to one request against a rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateDecision {
    pub allowed: bool,
    /// Requests still allowed right now.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// When denied: until one request is allowed again.
    pub retry_after: Duration,
}

/// A tenant's compute use over the sliding hour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ComputeUse {
    /// Seconds charged in the current clock hour.
    pub current: f64,
    /// Seconds charged in the hour before.
    pub previous: f64,
    /// How far into the current clock hour it is, 0..1.
    pub into_hour: f64,
}

impl ComputeUse {
    /// Seconds used over the last hour.
    pub fn used(&self) -> f64 {
        self.current + self.previous * (1.0 - self.into_hour)
    }

    /// How long until use falls below `limit` again, with nothing more charged.
    pub fn retry_after(&self, limit: f64) -> Duration {
        if self.used() < limit {
            return Duration::ZERO;
        }
        let left_in_hour = (1.0 - self.into_hour) * HOUR_MS;
        let ms = if self.current < limit && self.previous > 0.0 {
            // Within this hour, once the previous hour's share has slid out far enough.
            let f = 1.0 - (limit - self.current) / self.previous;
            (f - self.into_hour).max(0.0) * HOUR_MS
        } else {
            // After the hour turns, the current hour becomes the previous one.
            let f = if self.current > 0.0 { (1.0 - limit / self.current).max(0.0) } else { 0.0 };
            left_in_hour + f * HOUR_MS
        };
        Duration::from_millis(ms.ceil().max(1000.0) as u64)
    }
}

#[async_trait]
pub trait Limiter: Send + Sync + 'static {
    /// Takes one request from `bucket`'s allowance of `rate` per second with `burst` at once.
    async fn rate(&self, bucket: &str, rate: f64, burst: u32) -> Result<RateDecision, StoreError>;
    /// Charges `seconds` of worker run time to `tenant`.
    async fn charge(&self, tenant: &str, seconds: f64) -> Result<(), StoreError>;
    async fn compute(&self, tenant: &str) -> Result<ComputeUse, StoreError>;
}

/// GCRA on millisecond times: `interval` = 1000 / rate, capacity = interval × burst.
fn gcra(tat: Option<f64>, now: f64, rate: f64, burst: u32) -> (RateDecision, Option<f64>) {
    let interval = 1000.0 / rate.max(1e-6);
    let capacity = interval * f64::from(burst.max(1));
    let tat = tat.unwrap_or(now).max(now);
    let next = tat + interval;
    if next - now > capacity {
        let retry = next - now - capacity;
        let d = RateDecision {
            allowed: false,
            remaining: 0,
            reset: Duration::from_millis((tat - now).ceil() as u64),
            retry_after: Duration::from_millis(retry.ceil() as u64),
        };
        return (d, None);
    }
    let d = RateDecision {
        allowed: true,
        remaining: ((capacity - (next - now)) / interval).floor() as u32,
        reset: Duration::from_millis((next - now).ceil() as u64),
        retry_after: Duration::ZERO,
    };
    (d, Some(next))
}

fn now_ms() -> f64 {
    kiln_proto::now_millis() as f64
}

/// The limiter of the embedded backend.
#[derive(Default)]
pub struct EmbeddedLimiter {
    inner: Mutex<Buckets>,
}

#[derive(Default)]
struct Buckets {
    tat: HashMap<String, f64>,
    /// tenant → (hour number, seconds) for the current and previous hour.
    compute: HashMap<String, [(i64, f64); 2]>,
}

impl EmbeddedLimiter {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Limiter for EmbeddedLimiter {
    async fn rate(&self, bucket: &str, rate: f64, burst: u32) -> Result<RateDecision, StoreError> {
        let now = now_ms();
        let mut b = self.lock();
        if b.tat.len() >= MAX_BUCKETS {
            // Buckets whose time is past are full again: forgetting them changes nothing.
            b.tat.retain(|_, tat| *tat > now);
        }
        let (decision, next) = gcra(b.tat.get(bucket).copied(), now, rate, burst);
        if let Some(next) = next {
            b.tat.insert(bucket.to_owned(), next);
        }
        Ok(decision)
    }

    async fn charge(&self, tenant: &str, seconds: f64) -> Result<(), StoreError> {
        let hour = (now_ms() / HOUR_MS).floor() as i64;
        let mut b = self.lock();
        if b.compute.len() >= MAX_BUCKETS {
            b.compute.retain(|_, h| h[0].0 >= hour - 1);
        }
        let h = b.compute.entry(tenant.to_owned()).or_insert([(hour, 0.0), (hour - 1, 0.0)]);
        if h[0].0 != hour {
            *h = if h[0].0 == hour - 1 { [(hour, 0.0), h[0]] } else { [(hour, 0.0), (hour - 1, 0.0)] };
        }
        h[0].1 += seconds;
        Ok(())
    }

    async fn compute(&self, tenant: &str) -> Result<ComputeUse, StoreError> {
        let now = now_ms();
        let hour = (now / HOUR_MS).floor() as i64;
        let into_hour = now / HOUR_MS - hour as f64;
        let b = self.lock();
        let of = |n: i64| b.compute.get(tenant).and_then(|h| h.iter().find(|(k, _)| *k == n)).map_or(0.0, |(_, s)| *s);
        Ok(ComputeUse { current: of(hour), previous: of(hour - 1), into_hour })
    }
}

/// The limiter of a fleet, in Redis under `{prefix}rate:{bucket}` and
/// `{prefix}tenant:{t}:compute:{hour}`.
pub struct RedisLimiter {
    conn: ConnectionManager,
    prefix: String,
    rate: redis::Script,
    charge: redis::Script,
    compute: redis::Script,
}

impl RedisLimiter {
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            // KEYS[1]: the bucket. ARGV: rate per second, burst. Replies {allowed, remaining,
            // reset ms, retry ms}.
            rate: redis::Script::new(
                r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = 1000 / math.max(tonumber(ARGV[1]), 0.000001)
local capacity = interval * math.max(tonumber(ARGV[2]), 1)
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
local nxt = tat + interval
if nxt - now > capacity then
  return {0, 0, math.ceil(tat - now), math.ceil(nxt - now - capacity)}
end
redis.call('SET', KEYS[1], tostring(nxt), 'PX', math.ceil(nxt - now) + 1)
return {1, math.floor((capacity - (nxt - now)) / interval), math.ceil(nxt - now), 0}",
            ),
            // KEYS[1]: the tenant's compute prefix. ARGV[1]: seconds.
            charge: redis::Script::new(
                r"
local t = redis.call('TIME')
local hour = math.floor(tonumber(t[1]) / 3600)
local k = KEYS[1] .. hour
redis.call('INCRBYFLOAT', k, ARGV[1])
redis.call('EXPIRE', k, 7300)
return 1",
            ),
            compute: redis::Script::new(
                r"
local t = redis.call('TIME')
local secs = tonumber(t[1]) + tonumber(t[2]) / 1000000
local hour = math.floor(secs / 3600)
local cur = redis.call('GET', KEYS[1] .. hour) or '0'
local prev = redis.call('GET', KEYS[1] .. (hour - 1)) or '0'
return {cur, prev, tostring((secs - hour * 3600) / 3600)}",
            ),
        }
    }

    fn compute_key(&self, tenant: &str) -> String {
        format!("{}tenant:{tenant}:compute:", self.prefix)
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

#[async_trait]
impl Limiter for RedisLimiter {
    async fn rate(&self, bucket: &str, rate: f64, burst: u32) -> Result<RateDecision, StoreError> {
        let r: (u8, u64, u64, u64) = self
            .rate
            .key(format!("{}rate:{bucket}", self.prefix))
            .arg(rate)
            .arg(burst)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(RateDecision {
            allowed: r.0 == 1,
            remaining: u32::try_from(r.1).unwrap_or(u32::MAX),
            reset: Duration::from_millis(r.2),
            retry_after: Duration::from_millis(r.3),
        })
    }

    async fn charge(&self, tenant: &str, seconds: f64) -> Result<(), StoreError> {
        self.charge
            .key(self.compute_key(tenant))
            .arg(seconds)
            .invoke_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn compute(&self, tenant: &str) -> Result<ComputeUse, StoreError> {
        let (cur, prev, into): (String, String, String) = self
            .compute
            .key(self.compute_key(tenant))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let num = |s: &str| s.parse::<f64>().unwrap_or(0.0);
        Ok(ComputeUse { current: num(&cur), previous: num(&prev), into_hour: num(&into) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_allows_the_burst_then_one_per_interval() {
        let (mut tat, now) = (None, 1_000_000.0);
        for i in 0..5 {
            let (d, next) = gcra(tat, now, 10.0, 5);
            assert!(d.allowed, "request {i} of the burst");
            assert_eq!(d.remaining, 4 - i);
            tat = next;
        }
        let (d, next) = gcra(tat, now, 10.0, 5);
        assert!(!d.allowed && next.is_none());
        assert_eq!(d.retry_after, Duration::from_millis(100));
        let (d, _) = gcra(tat, now + 100.0, 10.0, 5);
        assert!(d.allowed, "one interval later one more fits");
    }

    #[test]
    fn compute_use_slides_and_says_when_it_falls_below_the_limit() {
        let u = ComputeUse { current: 30.0, previous: 60.0, into_hour: 0.5 };
        assert_eq!(u.used(), 60.0);
        assert_eq!(u.retry_after(100.0), Duration::ZERO);
        // 30 + 60 × (1 − f) < 50 once f > 2/3: a sixth of an hour after now.
        assert_eq!(u.retry_after(50.0).as_secs(), 600);
        let over = ComputeUse { current: 120.0, previous: 0.0, into_hour: 0.25 };
        // Next hour 120 × (1 − f) < 100 once f > 1/6: 45 + 10 minutes from now.
        assert_eq!(over.retry_after(100.0).as_secs(), 3300);
    }
}
