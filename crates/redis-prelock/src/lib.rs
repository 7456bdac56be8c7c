//! Redis adapter for the stock pre-lock.
//!
//! Key layout for SKU `s` (every key of one SKU carries the hash tag `{s}`, so each script
//! touches one Redis Cluster slot; `prefix` isolates environments and tests):
//! - `stock_prelock:{s}`  integer: units still available for pre-lock. Absent = not loaded
//!   (Redis was flushed or the SKU never loaded): nothing is pre-locked until a rebuild.
//! - `prelock_res:{s}`    hash: reservation id -> quantity.
//! - `prelock_exp:{s}`    sorted set: reservation id -> lapse time in ms (`+inf` once pinned).
//! - `prelock_ttl:{s}`    the SKU's own pre-lock lifetime in ms, when it has one; else the
//!   service default applies. Kept here so a reserve never needs Postgres.
//! - `prelock_own:{s}`    hash: reservation id -> its claimants, space-separated: create
//!   attempts (32 hex digits each) and `order` (paid or rebuilt: an order exists). A
//!   withdrawal removes one attempt and gives the units back only when none is left
//!   (`domain::stock::Claim`).
//! - `prelock_pend:{s}`   sorted set: pending confirmations, one per (reservation, attempt),
//!   `"<reservation id> <attempt claim> <txid>"` -> when it is due to be checked (ms). The
//!   reserve writes it in the same script that takes the units; whoever checks pending
//!   confirmations (prelock-service's confirmer) reads the due ones ([`RedisPrelock::pending_due`])
//!   and settles each ([`RedisPrelock::confirm`]): the order exists -> claimed by `order`; the
//!   attempt's transaction ended without one -> the attempt's claim withdrawn.
//! - `prelock_lim:{s}`    the SKU's purchase limit (most units one buyer may hold), when it
//!   has one; else the service default applies (0 = no limit).
//! - `prelock_buy:{s}`    hash: buyer -> units they hold of this SKU: live reservations and
//!   paid ones (a deduction does not give them back; the buyer bought them).
//! - `prelock_who:{s}`    hash: reservation id -> its buyer, so units going back (release,
//!   lapse, withdrawal, a failed attempt) stop counting against them.
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
use domain::stock::{
    Attempt, Claim, ExpiresAtMs, PinOutcome, ReleaseOutcome, ReserveOutcome, WithdrawOutcome,
};
use domain::{OrderId, SkuId};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use uuid::Uuid;

/// At most this many lapsed reservations are reclaimed per call, so one call's cost stays
/// bounded after a long quiet period; the next calls reclaim the rest.
const RECLAIM_BATCH: i64 = 64;

/// Shared by every script. KEYS: stock, res, exp, ttl, own, pend, lim, buy, who.
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- forget a reservation's bookkeeping (not its units, nor its buyer's count)
local function drop(rid)
  redis.call('HDEL', KEYS[2], rid)
  redis.call('ZREM', KEYS[3], rid)
  redis.call('HDEL', KEYS[5], rid)
  redis.call('HDEL', KEYS[9], rid)
end
-- count units against a buyer (none for an empty buyer)
local function count(rid, buyer, qty)
  if buyer == '' then return end
  redis.call('HINCRBY', KEYS[8], buyer, qty)
  redis.call('HSET', KEYS[9], rid, buyer)
end
-- a reservation's units go back: they stop counting against its buyer
local function uncount(rid, held)
  local buyer = redis.call('HGET', KEYS[9], rid)
  if not buyer then return end
  if redis.call('HINCRBY', KEYS[8], buyer, -held) <= 0 then redis.call('HDEL', KEYS[8], buyer) end
end
-- add a claimant to a reservation (once)
local function claim(rid, tok)
  local c = redis.call('HGET', KEYS[5], rid)
  if not c or c == '' then redis.call('HSET', KEYS[5], rid, tok) return end
  for x in string.gmatch(c, '%S+') do if x == tok then return end end
  redis.call('HSET', KEYS[5], rid, c .. ' ' .. tok)
end
-- give lapsed reservations' units back, at most `batch` of them
local function reclaim(batch)
  local lapsed = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, batch)
  local back = 0
  for _, rid in ipairs(lapsed) do
    local held = tonumber(redis.call('HGET', KEYS[2], rid) or '0')
    back = back + held
    uncount(rid, held)
    drop(rid)
  end
  if back > 0 then redis.call('INCRBY', KEYS[1], back) end
end
-- give a reservation's units back and forget it
local function give_back(rid, held)
  local avail = redis.call('INCRBY', KEYS[1], held)
  uncount(rid, held)
  drop(rid)
  return {'RELEASED', held, avail}
end
-- a reservation's lapse time: -1 once pinned, false if none
local function expiry(rid)
  local e = redis.call('ZSCORE', KEYS[3], rid)
  if e == false then return false end
  if e == 'inf' then return -1 end
  return tonumber(e)
end
if not redis.call('GET', KEYS[1]) then return {'NOT_LOADED', 0, 0} end
"#;

/// ARGV: id, qty, default_ttl_ms, reclaim_batch, claim, confirm_after_ms, txid (or ""),
/// buyer, default_limit.
/// Returns RESERVED(expires_at, available) | EXISTS(qty, expires_at or -1)
/// | LIMIT(holds, limit) | SHORTAGE(available, 0) | NOT_LOADED. A claim (new or existing
/// reservation) records its pending confirmation, due `confirm_after_ms` from now. The
/// purchase limit is checked and counted in the same step as the units are taken.
const RESERVE: &str = r#"
reclaim(tonumber(ARGV[4]))
local pending = ARGV[1] .. ' ' .. ARGV[5] .. ' ' .. ARGV[7]
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  claim(ARGV[1], ARGV[5])
  redis.call('ZADD', KEYS[6], now + tonumber(ARGV[6]), pending)
  return {'EXISTS', tonumber(held), expiry(ARGV[1]) or -1}
end
local avail = tonumber(redis.call('GET', KEYS[1]))
local qty = tonumber(ARGV[2])
if ARGV[8] ~= '' then
  local limit = tonumber(redis.call('GET', KEYS[7]) or ARGV[9])
  local holds = tonumber(redis.call('HGET', KEYS[8], ARGV[8]) or '0')
  if limit > 0 and holds + qty > limit then return {'LIMIT', holds, limit} end
end
if avail < qty then return {'SHORTAGE', avail, 0} end
avail = redis.call('DECRBY', KEYS[1], qty)
local expires = now + tonumber(redis.call('GET', KEYS[4]) or ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], qty)
redis.call('ZADD', KEYS[3], expires, ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[5])
redis.call('ZADD', KEYS[6], now + tonumber(ARGV[6]), pending)
count(ARGV[1], ARGV[8], qty)
return {'RESERVED', expires, avail}
"#;

/// Pending confirmations due by now. ARGV: limit.
/// Returns {members due (at most limit)..., total pending} (the count last).
const PENDING_DUE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
due[#due + 1] = tostring(redis.call('ZCARD', KEYS[6]))
return due
"#;

/// Settles pending confirmations. ARGV: later_ms, then member, verdict, member, verdict, ...
/// with verdict `order` (an order holds the reservation: claimed by `order`), `gone` (the
/// attempt's transaction ended without an order: its claim is withdrawn, and the units go
/// back when no claimant is left) or `later` (still undecided: due again in `later_ms`). A
/// member whose reservation is gone is just forgotten.
/// Returns {confirmed, units given back, still claimed by others}.
const CONFIRM: &str = r#"
local confirmed, back, kept = 0, 0, 0
for i = 2, #ARGV, 2 do
  local member, verdict = ARGV[i], ARGV[i + 1]
  if verdict == 'later' then
    redis.call('ZADD', KEYS[6], 'XX', now + tonumber(ARGV[1]), member)
  else
    redis.call('ZREM', KEYS[6], member)
    local rid, tok = string.match(member, '^(%S+) (%S+)')
    local held = rid and redis.call('HGET', KEYS[2], rid)
    if held and verdict == 'order' then
      claim(rid, 'order')
      confirmed = confirmed + 1
    elseif held then
      local rest = {}
      for x in string.gmatch(redis.call('HGET', KEYS[5], rid) or '', '%S+') do
        if x ~= tok then rest[#rest + 1] = x end
      end
      if #rest > 0 then
        redis.call('HSET', KEYS[5], rid, table.concat(rest, ' '))
        kept = kept + 1
      elseif expiry(rid) ~= -1 then
        give_back(rid, tonumber(held))
        back = back + tonumber(held)
      end
    end
  end
end
return {confirmed, back, kept}
"#;

/// The payment path: confirm, or reserve again, in one step. ARGV: id, qty, reclaim_batch,
/// buyer, default_limit (units taken again count against the buyer, and are refused past
/// the limit; a live reservation is pinned whatever it).
/// Returns PINNED(qty) | REPINNED(qty, available) | SHORTAGE(available) | MISMATCH(held)
/// | LIMIT(holds, limit) | NOT_LOADED.
const PIN: &str = r#"
reclaim(tonumber(ARGV[3]))
local qty = tonumber(ARGV[2])
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  local e = expiry(ARGV[1])
  if e and e >= 0 and e <= now then
    -- lapsed but not reclaimed yet (beyond this call's batch): give it back first
    give_back(ARGV[1], tonumber(held))
    held = false
  end
end
if held then
  if tonumber(held) ~= qty then return {'MISMATCH', tonumber(held), 0} end
  redis.call('ZADD', KEYS[3], '+inf', ARGV[1])
  claim(ARGV[1], 'order')
  return {'PINNED', qty, 0}
end
if ARGV[4] ~= '' then
  local limit = tonumber(redis.call('GET', KEYS[7]) or ARGV[5])
  local holds = tonumber(redis.call('HGET', KEYS[8], ARGV[4]) or '0')
  if limit > 0 and holds + qty > limit then return {'LIMIT', holds, limit} end
end
local avail = tonumber(redis.call('GET', KEYS[1]))
if avail < qty then return {'SHORTAGE', avail, 0} end
avail = redis.call('DECRBY', KEYS[1], qty)
redis.call('HSET', KEYS[2], ARGV[1], qty)
redis.call('ZADD', KEYS[3], '+inf', ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], 'order')
count(ARGV[1], ARGV[4], qty)
return {'REPINNED', qty, avail}
"#;

/// ARGV: id. Returns RELEASED(qty, available) | NOT_FOUND | NOT_LOADED.
const RELEASE: &str = r#"
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return {'NOT_FOUND', 0, 0} end
return give_back(ARGV[1], tonumber(held))
"#;

/// The expiry job: gives the units back unless the reservation is pinned (a late payment
/// pinned it again after the order expired). ARGV: id.
/// Returns RELEASED(qty, available) | NOT_FOUND (absent or pinned) | NOT_LOADED.
const LAPSE: &str = r#"
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held or expiry(ARGV[1]) == -1 then return {'NOT_FOUND', 0, 0} end
return give_back(ARGV[1], tonumber(held))
"#;

/// The stock-deduction job: a pinned reservation's units have left the real stock, so the
/// reservation goes without giving them back. ARGV: id.
/// Returns DEDUCTED(qty) | NOT_PINNED | NOT_FOUND | NOT_LOADED.
const DEDUCT: &str = r#"
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return {'NOT_FOUND', 0, 0} end
if expiry(ARGV[1]) ~= -1 then return {'NOT_PINNED', 0, 0} end
drop(ARGV[1])
return {'DEDUCTED', tonumber(held), 0}
"#;

/// ARGV: id, claim. Removes the claim; the units go back only when no claimant is left.
/// Returns RELEASED(qty, available) | CLAIMED | NOT_FOUND | NOT_LOADED.
const WITHDRAW: &str = r#"
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return {'NOT_FOUND', 0, 0} end
local rest = {}
for x in string.gmatch(redis.call('HGET', KEYS[5], ARGV[1]) or '', '%S+') do
  if x ~= ARGV[2] then rest[#rest + 1] = x end
end
if #rest > 0 then
  redis.call('HSET', KEYS[5], ARGV[1], table.concat(rest, ' '))
  return {'CLAIMED', 0, 0}
end
return give_back(ARGV[1], tonumber(held))
"#;

/// ARGV: id. Returns HELD(qty) | NOT_FOUND | NOT_LOADED; changes nothing.
const HOLDS: &str = r#"
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return {'NOT_FOUND', 0, 0} end
return {'HELD', tonumber(held), 0}
"#;

#[derive(Clone)]
pub struct RedisPrelock {
    conn: ConnectionManager,
    prefix: String,
    /// Bound on every Redis round trip: past it the caller answers 503 and counts a timeout.
    timeout: Duration,
    reserve: Script,
    pin: Script,
    release: Script,
    withdraw: Script,
    holds: Script,
    lapse: Script,
    deduct: Script,
    pending_due: Script,
    confirm: Script,
    /// How long after a reserve its pending confirmation is due to be checked.
    confirm_after: Duration,
    /// The purchase limit of SKUs that set none (0 = no limit).
    default_limit: u32,
}

/// One reservation as stored: (id, quantity, lapse time in ms or `None` once pinned).
pub type HeldEntry = (String, u32, ExpiresAtMs);

/// A SKU's purchase-limit state, as a rebuild writes it back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purchases {
    /// The SKU's own limit; `None` = the service default.
    pub limit: Option<u32>,
    /// Units each buyer holds (live reservations and paid orders).
    pub bought: Vec<(String, u32)>,
    /// Each reservation written back -> its buyer.
    pub buyer_of: Vec<(String, String)>,
}

/// How long start-up waits for Redis to answer before giving up (the process then exits and
/// its supervisor restarts it); each attempt is logged.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

impl RedisPrelock {
    /// Connects, retrying (logged) for up to [`CONNECT_PATIENCE`] while Redis does not answer.
    ///
    /// Reconnects after a lost connection are immediate and driven by demand: the manager
    /// makes one connection attempt (bounded by the connect timeout) whenever a call finds
    /// the connection broken, and never sleeps between attempts. Its default backoff (a 1 s
    /// minimum, then a factor of 100 capped at 60 s) kept the service down for about two
    /// minutes after a six-second Redis outage.
    pub async fn connect(
        url: &str,
        prefix: &str,
        timeout: Duration,
        confirm_after: Duration,
    ) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(timeout.max(Duration::from_millis(500)))
            .set_response_timeout(timeout)
            .set_number_of_retries(0);
        let started = std::time::Instant::now();
        let conn = loop {
            match ConnectionManager::new_with_config(client.clone(), cfg.clone()).await {
                Ok(conn) => break conn,
                Err(e) if started.elapsed() < CONNECT_PATIENCE => {
                    tracing::warn!(error = %e, "redis not answering yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                // the address only: the URL may carry a password
                Err(e) => {
                    let at = &client.get_connection_info().addr;
                    return Err(anyhow::anyhow!("redis at {at}: {e}"));
                }
            }
        };
        let script = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Ok(RedisPrelock {
            conn,
            prefix: prefix.to_owned(),
            timeout,
            reserve: script(RESERVE),
            pin: script(PIN),
            release: script(RELEASE),
            withdraw: script(WITHDRAW),
            holds: script(HOLDS),
            lapse: script(LAPSE),
            deduct: script(DEDUCT),
            pending_due: script(PENDING_DUE),
            confirm: script(CONFIRM),
            confirm_after,
            default_limit: 0,
        })
    }

    /// The purchase limit of SKUs that set none (0, the default: no limit).
    pub fn with_default_limit(mut self, limit: u32) -> Self {
        self.default_limit = limit;
        self
    }

    fn keys(&self, sku: &SkuId) -> [String; 9] {
        let p = &self.prefix;
        [
            format!("{p}stock_prelock:{{{sku}}}"),
            format!("{p}prelock_res:{{{sku}}}"),
            format!("{p}prelock_exp:{{{sku}}}"),
            format!("{p}prelock_ttl:{{{sku}}}"),
            format!("{p}prelock_own:{{{sku}}}"),
            format!("{p}prelock_pend:{{{sku}}}"),
            format!("{p}prelock_lim:{{{sku}}}"),
            format!("{p}prelock_buy:{{{sku}}}"),
            format!("{p}prelock_who:{{{sku}}}"),
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

    /// Runs a script on the SKU's keys; `NOT_LOADED` (every script's first check) is mapped
    /// here.
    async fn run(
        &self,
        script: &Script,
        sku: &SkuId,
        args: &[String],
    ) -> Result<(String, i64, i64), PrelockError> {
        let mut inv = script.prepare_invoke();
        for k in self.keys(sku) {
            inv.key(k);
        }
        for a in args {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        let reply: (String, i64, i64) = self.bounded(inv.invoke_async(&mut conn)).await?;
        if reply.0 == "NOT_LOADED" {
            return Err(PrelockError::NotLoaded);
        }
        Ok(reply)
    }

    pub async fn ping(&self) -> Result<(), PrelockError> {
        let mut conn = self.conn.clone();
        self.bounded(redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map(|_| ())
    }

    /// Reserves `quantity` units on behalf of `attempt`, for `buyer` within the SKU's
    /// purchase limit (an empty buyer is not counted); the reservation lapses after the
    /// SKU's own TTL, or `default_ttl` when the SKU has none. The attempt's pending
    /// confirmation is recorded in the same script.
    pub async fn reserve(
        &self,
        sku: &SkuId,
        id: OrderId,
        quantity: u32,
        default_ttl: Duration,
        attempt: Attempt,
        buyer: &str,
    ) -> Result<ReserveOutcome, PrelockError> {
        let args = [
            id.to_string(),
            quantity.to_string(),
            default_ttl.as_millis().to_string(),
            RECLAIM_BATCH.to_string(),
            Claim::Attempt(attempt.id).token(),
            self.confirm_after.as_millis().to_string(),
            attempt.txid.map(|t| t.to_string()).unwrap_or_default(),
            buyer.to_owned(),
            self.default_limit.to_string(),
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
            "LIMIT" => Ok(ReserveOutcome::OverLimit {
                holds: u32::try_from(a).unwrap_or(u32::MAX),
                limit: u32::try_from(b).unwrap_or(u32::MAX),
            }),
            other => Err(unexpected(other)),
        }
    }

    /// The payment path: pins the order's reservation, or takes the units again (counted
    /// against `buyer`).
    pub async fn pin(
        &self,
        sku: &SkuId,
        id: OrderId,
        quantity: u32,
        buyer: &str,
    ) -> Result<PinOutcome, PrelockError> {
        let args = [
            id.to_string(),
            quantity.to_string(),
            RECLAIM_BATCH.to_string(),
            buyer.to_owned(),
            self.default_limit.to_string(),
        ];
        let (status, a, b) = self.run(&self.pin, sku, &args).await?;
        let quantity = u32::try_from(a).unwrap_or(0);
        match status.as_str() {
            "PINNED" => Ok(PinOutcome::Pinned { quantity }),
            "REPINNED" => Ok(PinOutcome::Repinned {
                quantity,
                available: b,
            }),
            "SHORTAGE" => Ok(PinOutcome::Shortage { available: a }),
            "MISMATCH" => Ok(PinOutcome::Mismatch { held: quantity }),
            "LIMIT" => Ok(PinOutcome::OverLimit {
                holds: quantity,
                limit: u32::try_from(b).unwrap_or(u32::MAX),
            }),
            other => Err(unexpected(other)),
        }
    }

    pub async fn release(&self, sku: &SkuId, id: OrderId) -> Result<ReleaseOutcome, PrelockError> {
        release_outcome(self.run(&self.release, sku, &[id.to_string()]).await?)
    }

    /// Removes `attempt`'s claim; the units go back only when no claimant is left.
    pub async fn withdraw(
        &self,
        sku: &SkuId,
        id: OrderId,
        attempt: Uuid,
    ) -> Result<WithdrawOutcome, PrelockError> {
        let args = [id.to_string(), Claim::Attempt(attempt).token()];
        let (status, a, b) = self.run(&self.withdraw, sku, &args).await?;
        match status.as_str() {
            "RELEASED" => Ok(WithdrawOutcome::Released {
                quantity: u32::try_from(a).unwrap_or(0),
                available: b,
            }),
            "CLAIMED" => Ok(WithdrawOutcome::StillClaimed),
            "NOT_FOUND" => Ok(WithdrawOutcome::NotFound),
            other => Err(unexpected(other)),
        }
    }

    /// After the order expired: gives the units back unless the reservation is pinned.
    pub async fn lapse(&self, sku: &SkuId, id: OrderId) -> Result<ReleaseOutcome, PrelockError> {
        release_outcome(self.run(&self.lapse, sku, &[id.to_string()]).await?)
    }

    /// After the real stock was deducted: drops a pinned reservation without giving its units
    /// back. `true` if it did (false: nothing pinned under this id, e.g. already deducted).
    pub async fn deduct(&self, sku: &SkuId, id: OrderId) -> Result<bool, PrelockError> {
        let (status, _, _) = self.run(&self.deduct, sku, &[id.to_string()]).await?;
        match status.as_str() {
            "DEDUCTED" => Ok(true),
            "NOT_PINNED" | "NOT_FOUND" => Ok(false),
            other => Err(unexpected(other)),
        }
    }

    /// Up to `limit` pending confirmations due now (by Redis' clock), and how many are pending
    /// in all (due or not).
    pub async fn pending_due(
        &self,
        sku: &SkuId,
        limit: usize,
    ) -> Result<(Vec<PendingConfirmation>, usize), PrelockError> {
        let mut inv = self.pending_due.prepare_invoke();
        for k in self.keys(sku) {
            inv.key(k);
        }
        inv.arg(limit);
        let mut conn = self.conn.clone();
        let mut reply: Vec<String> = self.bounded(inv.invoke_async(&mut conn)).await?;
        if reply.first().map(String::as_str) == Some("NOT_LOADED") {
            // lost with the SKU's state; a rebuild writes back what the ledger holds
            return Ok((Vec::new(), 0));
        }
        let total = reply.pop().and_then(|n| n.parse().ok()).unwrap_or(0);
        Ok((
            reply
                .into_iter()
                .filter_map(|m| PendingConfirmation::parse(&m))
                .collect(),
            total,
        ))
    }

    /// Settles pending confirmations, each by its [`Verdict`]. Returns what it did.
    pub async fn confirm(
        &self,
        sku: &SkuId,
        verdicts: &[(PendingConfirmation, Verdict)],
    ) -> Result<Confirmed, PrelockError> {
        if verdicts.is_empty() {
            return Ok(Confirmed::default());
        }
        let mut args = Vec::with_capacity(verdicts.len() * 2 + 1);
        args.push(self.confirm_after.as_millis().to_string());
        for (p, verdict) in verdicts {
            args.push(p.member.clone());
            args.push(
                match verdict {
                    Verdict::Order => "order",
                    Verdict::Gone => "gone",
                    Verdict::Later => "later",
                }
                .to_owned(),
            );
        }
        let mut inv = self.confirm.prepare_invoke();
        for k in self.keys(sku) {
            inv.key(k);
        }
        for a in &args {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        let reply: (i64, i64, i64) = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(Confirmed {
            confirmed: reply.0 as u64,
            given_back: reply.1 as u64,
            still_claimed: reply.2 as u64,
        })
    }

    /// Whether a reservation with this id exists (lapsed ones included); changes nothing.
    pub async fn holds(&self, sku: &SkuId, id: OrderId) -> Result<bool, PrelockError> {
        let (status, _, _) = self.run(&self.holds, sku, &[id.to_string()]).await?;
        match status.as_str() {
            "HELD" => Ok(true),
            "NOT_FOUND" => Ok(false),
            other => Err(unexpected(other)),
        }
    }

    /// Replaces a SKU's whole pre-lock state in one MULTI/EXEC (rebuild and stock admin). The
    /// caller holds the SKU's exclusive lock in Postgres, so no reservation is in flight.
    /// Every reservation written back belongs to an order (it comes from the ledger), so its
    /// only claimant is `order`: no late withdrawal can take it. `purchases` are the
    /// purchase limit and what each buyer holds, from the ledger too.
    pub async fn replace_sku(
        &self,
        sku: &SkuId,
        available: i64,
        ttl: Option<Duration>,
        held: &[HeldEntry],
        purchases: &Purchases,
    ) -> Result<(), PrelockError> {
        let [stock, res, exp, ttl_key, own, pend, lim, buy, who] = self.keys(sku);
        let mut pipe = redis::pipe();
        // no pending confirmation survives: the caller holds the exclusive lock, so every
        // attempt has ended, and what it committed is in the ledger written back here
        pipe.atomic()
            .del(&res)
            .ignore()
            .del(&exp)
            .ignore()
            .del(&own)
            .ignore()
            .del(&pend)
            .ignore()
            .del(&buy)
            .ignore()
            .del(&who)
            .ignore();
        match ttl {
            Some(t) => pipe.set(&ttl_key, t.as_millis() as u64).ignore(),
            None => pipe.del(&ttl_key).ignore(),
        };
        match purchases.limit {
            Some(l) => pipe.set(&lim, l).ignore(),
            None => pipe.del(&lim).ignore(),
        };
        for chunk in purchases.bought.chunks(1000) {
            pipe.hset_multiple(&buy, chunk).ignore();
        }
        for chunk in purchases.buyer_of.chunks(1000) {
            pipe.hset_multiple(&who, chunk).ignore();
        }
        let order = Claim::Order.token();
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
            let claims: Vec<(&str, &str)> = chunk
                .iter()
                .map(|(id, _, _)| (id.as_str(), order.as_str()))
                .collect();
            pipe.hset_multiple(&res, &fields).ignore();
            pipe.zadd_multiple(&exp, &scores).ignore();
            pipe.hset_multiple(&own, &claims).ignore();
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

    /// What each buyer holds of a SKU, as Redis counts it, sorted (consistency checks and
    /// tests).
    pub async fn bought(&self, sku: &SkuId) -> Result<Vec<(String, u32)>, PrelockError> {
        let [.., buy, _] = self.keys(sku);
        let mut conn = self.conn.clone();
        let mut out: Vec<(String, u32)> = self
            .bounded(redis::cmd("HGETALL").arg(buy).query_async(&mut conn))
            .await?;
        out.sort();
        Ok(out)
    }

    /// Every reservation Redis holds for a SKU (consistency checks and tests).
    pub async fn held(&self, sku: &SkuId) -> Result<Vec<HeldEntry>, PrelockError> {
        let [_, res, exp, ..] = self.keys(sku);
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

/// One pending confirmation: a create attempt's claim on a reservation, and the transaction
/// that was to write its order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingConfirmation {
    /// As stored (`"<reservation id> <claim> <txid>"`).
    pub member: String,
    pub reservation: String,
    pub txid: Option<i64>,
}

impl PendingConfirmation {
    fn parse(member: &str) -> Option<Self> {
        let mut parts = member.split(' ');
        let reservation = parts.next()?.to_owned();
        parts.next()?;
        let txid = parts.next().and_then(|t| t.parse().ok());
        Some(PendingConfirmation {
            member: member.to_owned(),
            reservation,
            txid,
        })
    }
}

/// How a pending confirmation is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// An order holds the reservation (its transaction committed).
    Order,
    /// The attempt's transaction ended without an order.
    Gone,
    /// Still undecided (the transaction is in progress): checked again a window later.
    Later,
}

/// What settling pending confirmations did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Confirmed {
    /// Reservations an order holds: claimed by `order` now.
    pub confirmed: u64,
    /// Units given back: their attempt ended without an order and nobody else claims them.
    pub given_back: u64,
    /// Attempts withdrawn from reservations another attempt or an order still claims.
    pub still_claimed: u64,
}

fn unexpected(reply: &str) -> PrelockError {
    PrelockError::Unavailable(format!("unexpected reply {reply}"))
}

/// RELEASED(qty, available) | NOT_FOUND, as the release and lapse scripts answer.
fn release_outcome((status, a, b): (String, i64, i64)) -> Result<ReleaseOutcome, PrelockError> {
    match status.as_str() {
        "RELEASED" => Ok(ReleaseOutcome::Released {
            quantity: u32::try_from(a).unwrap_or(0),
            available: b,
        }),
        "NOT_FOUND" => Ok(ReleaseOutcome::NotFound),
        other => Err(unexpected(other)),
    }
}
