//! Redis adapter for the stock pre-lock.
//!
//! Key layout for SKU `s` (every key of one SKU carries the hash tag `{s}`, so each script
//! touches one Redis Cluster slot; `prefix` isolates environments and tests):
//! - `stock_prelock:{s}`  integer: units still available for pre-lock. Absent = not loaded
//!   (Redis was flushed or the SKU never loaded): nothing is pre-locked until a rebuild.
//! - `prelock_res:{s}`    hash: reservation id -> quantity.
//! - `prelock_exp:{s}`    sorted set: reservation id -> lapse time in ms (`+inf` once confirmed).
//! - `prelock_ttl:{s}`    the SKU's own pre-lock lifetime in ms, when it has one; else the
//!   service default applies. Kept here so a reserve never needs Postgres.
//!
//! SPEC.md sketches one key per reservation with a Redis TTL. We keep reservations in a per-SKU
//! hash + sorted set instead: a key that expires takes its quantity with it, so nothing could
//! give the units back, and keyspace notifications are not durable. With the sorted set the
//! reserve script reclaims lapsed reservations itself, bounded per call, and a rebuild replaces
//! a SKU's whole state in one MULTI.
//!
//! Expiry times come from Redis' own clock (`TIME`), so every service agrees on them.
//! The scripts implement [`domain::stock::SkuLedger`]; the adapter tests hold them to it.
//! This crate owns the scripts and key names; it must never read Postgres or decide business
//! rules.

use std::time::Duration;

use domain::ports::PrelockError;
use domain::stock::{ConfirmOutcome, ExpiresAtMs, ReleaseOutcome, ReserveOutcome};
use domain::{OrderId, SkuId};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

/// At most this many lapsed reservations are reclaimed per reserve call, so one call's cost
/// stays bounded after a long quiet period; the next calls reclaim the rest.
const RECLAIM_BATCH: i64 = 64;

const NOW_MS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// KEYS: stock, res, exp, ttl. ARGV: id, qty, default_ttl_ms, reclaim_batch.
/// Returns {status, a, b}: RESERVED(expires_at, available) | EXISTS(qty, expires_at or -1)
/// | SHORTAGE(available, 0) | NOT_LOADED(0, 0).
const RESERVE: &str = r#"
local avail = redis.call('GET', KEYS[1])
if not avail then return {'NOT_LOADED', 0, 0} end
avail = tonumber(avail)
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
local back = 0
for _, rid in ipairs(lapsed) do
  back = back + tonumber(redis.call('HGET', KEYS[2], rid) or '0')
  redis.call('HDEL', KEYS[2], rid)
  redis.call('ZREM', KEYS[3], rid)
end
if back > 0 then avail = redis.call('INCRBY', KEYS[1], back) end
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  local exp = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if exp == false or exp == 'inf' then exp = -1 else exp = tonumber(exp) end
  return {'EXISTS', tonumber(held), exp}
end
local qty = tonumber(ARGV[2])
if avail < qty then return {'SHORTAGE', avail, 0} end
avail = redis.call('DECRBY', KEYS[1], qty)
local expires = now + tonumber(redis.call('GET', KEYS[4]) or ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], qty)
redis.call('ZADD', KEYS[3], expires, ARGV[1])
return {'RESERVED', expires, avail}
"#;

/// KEYS: stock, res, exp. ARGV: id.
/// Returns CONFIRMED(qty) | LAPSED | NOT_FOUND | NOT_LOADED.
const CONFIRM: &str = r#"
if not redis.call('GET', KEYS[1]) then return {'NOT_LOADED', 0, 0} end
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return {'NOT_FOUND', 0, 0} end
local exp = redis.call('ZSCORE', KEYS[3], ARGV[1])
if exp ~= false and exp ~= 'inf' and tonumber(exp) <= now then
  redis.call('INCRBY', KEYS[1], tonumber(held))
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {'LAPSED', 0, 0}
end
redis.call('ZADD', KEYS[3], '+inf', ARGV[1])
return {'CONFIRMED', tonumber(held), 0}
"#;

/// KEYS: stock, res, exp. ARGV: id.
/// Returns RELEASED(qty, available) | NOT_FOUND | NOT_LOADED.
const RELEASE: &str = r#"
if not redis.call('GET', KEYS[1]) then return {'NOT_LOADED', 0, 0} end
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return {'NOT_FOUND', 0, 0} end
local avail = redis.call('INCRBY', KEYS[1], tonumber(held))
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return {'RELEASED', tonumber(held), avail}
"#;

#[derive(Clone)]
pub struct RedisPrelock {
    conn: ConnectionManager,
    prefix: String,
    /// Bound on every Redis round trip: past it the caller answers 503 and counts a timeout.
    timeout: Duration,
    reserve: Script,
    confirm: Script,
    release: Script,
}

/// One reservation as stored: (id, quantity, lapse time in ms or `None` once confirmed).
pub type HeldEntry = (String, u32, ExpiresAtMs);

impl RedisPrelock {
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(timeout.max(Duration::from_millis(500)))
            .set_response_timeout(timeout)
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, cfg).await?;
        let with_now = |body: &str| Script::new(&format!("{NOW_MS}{body}"));
        Ok(RedisPrelock {
            conn,
            prefix: prefix.to_owned(),
            timeout,
            reserve: with_now(RESERVE),
            confirm: with_now(CONFIRM),
            release: Script::new(RELEASE),
        })
    }

    fn keys(&self, sku: &SkuId) -> [String; 4] {
        let p = &self.prefix;
        [
            format!("{p}stock_prelock:{{{sku}}}"),
            format!("{p}prelock_res:{{{sku}}}"),
            format!("{p}prelock_exp:{{{sku}}}"),
            format!("{p}prelock_ttl:{{{sku}}}"),
        ]
    }

    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, PrelockError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(PrelockError::Unavailable(format!("redis: {e}"))),
            Err(_) => Err(PrelockError::Unavailable(format!(
                "redis timed out after {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    async fn run(
        &self,
        script: &Script,
        sku: &SkuId,
        args: &[String],
    ) -> Result<(String, i64, i64), PrelockError> {
        let [k1, k2, k3, k4] = self.keys(sku);
        let mut inv = script.key(k1);
        inv.key(k2).key(k3).key(k4);
        for a in args {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        self.bounded(inv.invoke_async(&mut conn)).await
    }

    pub async fn ping(&self) -> Result<(), PrelockError> {
        let mut conn = self.conn.clone();
        self.bounded(redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map(|_| ())
    }

    /// Reserves `quantity` units; the reservation lapses after the SKU's own TTL, or
    /// `default_ttl` when the SKU has none.
    pub async fn reserve(
        &self,
        sku: &SkuId,
        id: OrderId,
        quantity: u32,
        default_ttl: Duration,
    ) -> Result<ReserveOutcome, PrelockError> {
        let args = [
            id.to_string(),
            quantity.to_string(),
            default_ttl.as_millis().to_string(),
            RECLAIM_BATCH.to_string(),
        ];
        let (status, a, b) = self.run(&self.reserve, sku, &args).await?;
        match status.as_str() {
            "RESERVED" => Ok(ReserveOutcome::Reserved {
                expires_at_ms: a,
                available: b,
            }),
            "EXISTS" if a == i64::from(quantity) => Ok(ReserveOutcome::Existing {
                quantity,
                expires_at_ms: (b >= 0).then_some(b),
            }),
            "EXISTS" => Err(PrelockError::Mismatch),
            "SHORTAGE" => Ok(ReserveOutcome::Shortage { available: a }),
            "NOT_LOADED" => Err(PrelockError::NotLoaded),
            other => Err(PrelockError::Unavailable(format!(
                "unexpected reply {other}"
            ))),
        }
    }

    pub async fn confirm(&self, sku: &SkuId, id: OrderId) -> Result<ConfirmOutcome, PrelockError> {
        let (status, a, _) = self.run(&self.confirm, sku, &[id.to_string()]).await?;
        match status.as_str() {
            "CONFIRMED" => Ok(ConfirmOutcome::Confirmed {
                quantity: u32::try_from(a).unwrap_or(0),
            }),
            "LAPSED" => Ok(ConfirmOutcome::Lapsed),
            "NOT_FOUND" => Ok(ConfirmOutcome::NotFound),
            "NOT_LOADED" => Err(PrelockError::NotLoaded),
            other => Err(PrelockError::Unavailable(format!(
                "unexpected reply {other}"
            ))),
        }
    }

    pub async fn release(&self, sku: &SkuId, id: OrderId) -> Result<ReleaseOutcome, PrelockError> {
        let (status, a, b) = self.run(&self.release, sku, &[id.to_string()]).await?;
        match status.as_str() {
            "RELEASED" => Ok(ReleaseOutcome::Released {
                quantity: u32::try_from(a).unwrap_or(0),
                available: b,
            }),
            "NOT_FOUND" => Ok(ReleaseOutcome::NotFound),
            "NOT_LOADED" => Err(PrelockError::NotLoaded),
            other => Err(PrelockError::Unavailable(format!(
                "unexpected reply {other}"
            ))),
        }
    }

    /// Replaces a SKU's whole pre-lock state in one MULTI/EXEC (rebuild and stock admin). The
    /// caller holds the SKU's exclusive lock in Postgres, so no reservation is in flight.
    pub async fn replace_sku(
        &self,
        sku: &SkuId,
        available: i64,
        ttl: Option<Duration>,
        held: &[HeldEntry],
    ) -> Result<(), PrelockError> {
        let [stock, res, exp, ttl_key] = self.keys(sku);
        let mut pipe = redis::pipe();
        pipe.atomic().del(&res).ignore().del(&exp).ignore();
        match ttl {
            Some(t) => pipe.set(&ttl_key, t.as_millis() as u64).ignore(),
            None => pipe.del(&ttl_key).ignore(),
        };
        for chunk in held.chunks(1000) {
            let fields: Vec<(&str, u32)> =
                chunk.iter().map(|(id, q, _)| (id.as_str(), *q)).collect();
            let scores: Vec<(String, &str)> = chunk
                .iter()
                .map(|(id, _, e)| {
                    (
                        e.map_or_else(|| "+inf".to_owned(), |ms| ms.to_string()),
                        id.as_str(),
                    )
                })
                .collect();
            pipe.hset_multiple(&res, &fields).ignore();
            pipe.zadd_multiple(&exp, &scores).ignore();
        }
        pipe.set(&stock, available).ignore();
        let mut conn = self.conn.clone();
        self.bounded(pipe.query_async::<()>(&mut conn)).await
    }

    /// Forgets a SKU's pre-lock state (tests simulate a flush of one SKU with this).
    pub async fn forget_sku(&self, sku: &SkuId) -> Result<(), PrelockError> {
        let keys = self.keys(sku);
        let mut conn = self.conn.clone();
        self.bounded(
            redis::cmd("DEL")
                .arg(&keys[..])
                .query_async::<()>(&mut conn),
        )
        .await
    }

    /// Redis' clock in ms since the epoch: the clock every lapse time is read from.
    pub async fn now_ms(&self) -> Result<i64, PrelockError> {
        let mut conn = self.conn.clone();
        let (secs, micros): (i64, i64) = self
            .bounded(redis::cmd("TIME").query_async(&mut conn))
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Units available for pre-lock; `None` when the SKU is not loaded.
    pub async fn available(&self, sku: &SkuId) -> Result<Option<i64>, PrelockError> {
        let [stock, ..] = self.keys(sku);
        let mut conn = self.conn.clone();
        self.bounded(
            redis::cmd("GET")
                .arg(stock)
                .query_async::<Option<i64>>(&mut conn),
        )
        .await
    }

    /// Every reservation Redis holds for a SKU (consistency checks and tests).
    pub async fn held(&self, sku: &SkuId) -> Result<Vec<HeldEntry>, PrelockError> {
        let [_, res, exp, _] = self.keys(sku);
        let mut conn = self.conn.clone();
        type Reply = (Vec<(String, u32)>, Vec<(String, String)>);
        let (qtys, scores): Reply = self
            .bounded(
                redis::pipe()
                    .cmd("HGETALL")
                    .arg(&res)
                    .cmd("ZRANGE")
                    .arg(&exp)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut conn),
            )
            .await?;
        let scores: std::collections::HashMap<String, String> = scores.into_iter().collect();
        let mut out: Vec<HeldEntry> = qtys
            .into_iter()
            .map(|(id, q)| {
                let e = scores.get(&id).and_then(|s| s.parse::<f64>().ok());
                let e = e.filter(|v| v.is_finite()).map(|v| v as i64);
                (id, q, e)
            })
            .collect();
        out.sort();
        Ok(out)
    }
}
