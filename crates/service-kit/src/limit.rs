//! Rate limits: how many requests one buyer, one client address, and the webhooks may send.
//!
//! Each budget is a GCRA limiter from `governor` keyed by who is asking (a buyer's `sub`, a
//! client address, a webhook caller's address): `per_sec` requests a second sustained, with
//! `burst` at once. A request over budget is refused `429 ERR_RATE_LIMITED` with `Retry-After`
//! (whole seconds until one more would pass) and counted in `rate_limited_total{scope}`.
//! A budget of 0 per second is off.
//!
//! The client address is the peer of the TCP connection; behind a proxy or load balancer that
//! is the proxy, so `RATE_LIMIT_TRUST_FORWARDED=true` takes the rightmost `X-Forwarded-For`
//! entry instead (the one the proxy itself added, with or without a port; set it only behind
//! a proxy that does, or any client picks its own address; an entry that cannot be read falls
//! back to the peer). IPv6 clients are budgeted per /64.
//! Limiters live in each instance's memory: with N instances behind a balancer a key gets up
//! to N times its budget, which is the usual trade for not adding a network hop per request.
//! Keys not seen for a while are forgotten (a sweep every [`SWEEP_EVERY`] checks).

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus::IntCounterVec;

use crate::config::env_or;
use crate::error::ApiError;
use crate::telemetry::Metrics;

/// Checks between sweeps of keys whose budget has fully refilled.
pub const SWEEP_EVERY: u64 = 10_000;

/// One budget: `per_sec` sustained, `burst` at once; `per_sec == 0` is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub per_sec: u32,
    pub burst: u32,
}

impl Budget {
    /// `{PREFIX}_PER_SEC` and `{PREFIX}_BURST` (burst defaults to the rate, at least 1).
    pub fn from_env(prefix: &str, per_sec: u32, burst: u32) -> anyhow::Result<Self> {
        Ok(Budget {
            per_sec: env_or(&format!("{prefix}_PER_SEC"), per_sec)?,
            burst: env_or(&format!("{prefix}_BURST"), burst)?,
        })
    }
}

/// A keyed limiter for one scope (`buyer`, `address`, `webhook`).
pub struct Limiter {
    scope: &'static str,
    inner: Option<DefaultKeyedRateLimiter<String>>,
    refused: IntCounterVec,
    checks: AtomicU64,
}

impl Limiter {
    pub fn new(scope: &'static str, budget: Budget, refused: IntCounterVec) -> Self {
        let inner = NonZeroU32::new(budget.per_sec).map(|rate| {
            let burst = NonZeroU32::new(budget.burst).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        refused.with_label_values(&[scope]);
        Limiter {
            scope,
            inner,
            refused,
            checks: AtomicU64::new(0),
        }
    }

    /// One request from `key`: `Ok` if within its budget, else `429` with `Retry-After`.
    pub fn check(&self, key: &str) -> Result<(), ApiError> {
        let Some(limiter) = &self.inner else {
            return Ok(());
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        match limiter.check_key(&key.to_owned()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                self.refused.with_label_values(&[self.scope]).inc();
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(ApiError::rate_limited(
                    self.scope,
                    wait.max(Duration::from_millis(1)),
                ))
            }
        }
    }

    /// Keys currently tracked (tests, and a bound worth watching).
    pub fn tracked(&self) -> usize {
        self.inner.as_ref().map_or(0, |l| l.len())
    }
}

/// The budgets of a service that takes buyers' requests and webhooks (order-api).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub buyer: Budget,
    pub address: Budget,
    pub webhook: Budget,
    /// Take the client address from `X-Forwarded-For` (behind a trusted proxy only).
    pub trust_forwarded: bool,
}

impl RateLimitConfig {
    /// `RATE_LIMIT_BUYER_*` (default 10/s, burst 20: a person does not buy faster),
    /// `RATE_LIMIT_ADDRESS_*` (default 5,000/s, burst 10,000: many buyers share a NAT or a
    /// carrier's gateway), `RATE_LIMIT_WEBHOOK_*` (default 5,000/s, burst 10,000 per caller
    /// address: a provider's callbacks arrive from a few addresses at the sale's own rate),
    /// `RATE_LIMIT_TRUST_FORWARDED` (default false).
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(RateLimitConfig {
            buyer: Budget::from_env("RATE_LIMIT_BUYER", 10, 20)?,
            address: Budget::from_env("RATE_LIMIT_ADDRESS", 5_000, 10_000)?,
            webhook: Budget::from_env("RATE_LIMIT_WEBHOOK", 5_000, 10_000)?,
            trust_forwarded: env_or("RATE_LIMIT_TRUST_FORWARDED", false)?,
        })
    }

    /// Every budget off (tests that are not about rate limits).
    pub fn off() -> Self {
        let off = Budget {
            per_sec: 0,
            burst: 0,
        };
        RateLimitConfig {
            buyer: off,
            address: off,
            webhook: off,
            trust_forwarded: false,
        }
    }
}

pub struct RateLimits {
    pub buyer: Limiter,
    pub address: Limiter,
    pub webhook: Limiter,
    trust_forwarded: bool,
}

impl RateLimits {
    pub fn new(config: &RateLimitConfig, metrics: &Metrics) -> Self {
        let refused = metrics.counter(
            "rate_limited_total",
            "Requests refused with 429 ERR_RATE_LIMITED, by budget (buyer, address, webhook)",
            &["scope"],
        );
        RateLimits {
            buyer: Limiter::new("buyer", config.buyer, refused.clone()),
            address: Limiter::new("address", config.address, refused.clone()),
            webhook: Limiter::new("webhook", config.webhook, refused),
            trust_forwarded: config.trust_forwarded,
        }
    }

    /// A buyer's request (create, start a payment, cancel): both the address's and the
    /// buyer's budget.
    pub fn buyer_request(&self, buyer: &str, from: &ClientAddr) -> Result<(), ApiError> {
        if let Some(ip) = from.ip(self.trust_forwarded) {
            self.address.check(&budget_key(ip))?;
        }
        self.buyer.check(buyer)
    }

    /// A payment provider's callback, by its caller's address.
    pub fn webhook_request(&self, from: &ClientAddr) -> Result<(), ApiError> {
        match from.ip(self.trust_forwarded) {
            Some(ip) => self.webhook.check(&budget_key(ip)),
            None => self.webhook.check("unknown"),
        }
    }
}

/// The client an address stands for: an IPv4 address (an IPv4-mapped IPv6 one too), or an
/// IPv6 address's /64 (one subscriber's network: a client owns a whole /64 and could take a
/// fresh address per request). Address budgets and the per-address connection cap key by it.
pub fn client_network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
        v4 => v4,
    }
}

fn budget_key(ip: IpAddr) -> String {
    client_network(ip).to_string()
}

/// One `X-Forwarded-For` entry: an address, or an address with a port (`ip:port`,
/// `[v6]:port`, `[v6]`), as proxies write them.
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse::<IpAddr>().ok())
        })
}

/// Where a request came from: the TCP peer, and the rightmost `X-Forwarded-For` entry (the
/// one the proxy in front added: the entries to its left are the client's to write). When the
/// rightmost entry cannot be read, the peer stands in: an earlier entry never does.
/// Either may be unknown (a router driven in-process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    pub peer: Option<IpAddr>,
    pub forwarded: Option<IpAddr>,
}

impl ClientAddr {
    /// The address budgets are keyed by: the forwarded one only behind a trusted proxy.
    pub fn ip(&self, trust_forwarded: bool) -> Option<IpAddr> {
        if trust_forwarded {
            self.forwarded.or(self.peer)
        } else {
            self.peer
        }
    }

    fn of(parts: &Parts) -> Self {
        let forwarded = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            // split the raw bytes: one unreadable byte in an entry the client wrote must not
            // discard the proxy's entry after it
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .next_back()
            .and_then(|entry| std::str::from_utf8(entry).ok())
            .and_then(forwarded_ip);
        ClientAddr {
            peer: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
            forwarded,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr::of(parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> IntCounterVec {
        IntCounterVec::new(prometheus::Opts::new("t", "t"), &["scope"]).unwrap()
    }

    #[test]
    fn a_burst_gets_at_most_the_burst_through_and_other_keys_are_unaffected() {
        let c = counter();
        let l = Limiter::new(
            "buyer",
            Budget {
                per_sec: 1,
                burst: 5,
            },
            c.clone(),
        );
        let passed = (0..1000).filter(|_| l.check("hoarder").is_ok()).count();
        // a thousand at once within a second: the burst, plus at most one refilled
        assert!((5..=6).contains(&passed), "{passed} passed");
        assert!(l.check("someone-else").is_ok());
        let refused = l.check("hoarder").unwrap_err();
        assert_eq!(refused.code, crate::ErrorCode::RateLimited);
        assert_eq!(refused.retry_after_secs, Some(1));
        assert_eq!(
            c.with_label_values(&["buyer"]).get(),
            1000 - passed as u64 + 1
        );
    }

    #[test]
    fn a_budget_of_zero_is_off() {
        let l = Limiter::new(
            "address",
            Budget {
                per_sec: 0,
                burst: 0,
            },
            counter(),
        );
        assert!((0..10_000).all(|_| l.check("x").is_ok()));
        assert_eq!(l.tracked(), 0);
    }

    /// Where a request from peer 10.0.0.1 with this `X-Forwarded-For` came from.
    fn from_peer_10_0_0_1(forwarded: &[u8]) -> ClientAddr {
        let req = axum::http::Request::builder()
            .header(
                "x-forwarded-for",
                axum::http::HeaderValue::from_bytes(forwarded).unwrap(),
            )
            .body(())
            .unwrap();
        let (mut parts, _) = req.into_parts();
        parts
            .extensions
            .insert(ConnectInfo(SocketAddr::from(([10, 0, 0, 1], 4000))));
        ClientAddr::of(&parts)
    }

    #[test]
    fn the_address_is_the_peer_unless_a_trusted_proxy_says_otherwise() {
        let from = from_peer_10_0_0_1("203.0.113.9, 198.51.100.7".as_bytes());
        assert_eq!(from.ip(false), Some(IpAddr::from([10, 0, 0, 1])));
        assert_eq!(from.ip(true), Some(IpAddr::from([198, 51, 100, 7])));
        // the rightmost entry, whatever port it carries; one that cannot be read falls back
        // to the peer, never to an entry the client wrote
        for (header, want) in [
            ("6.6.6.6, 203.0.113.7:51234", IpAddr::from([203, 0, 113, 7])),
            ("6.6.6.6, [2001:db8::7]:443", "2001:db8::7".parse().unwrap()),
            ("6.6.6.6, [2001:db8::7]", "2001:db8::7".parse().unwrap()),
            ("6.6.6.6, garbage", IpAddr::from([10, 0, 0, 1])),
            ("6.6.6.6,", IpAddr::from([10, 0, 0, 1])),
        ] {
            let from = from_peer_10_0_0_1(header.as_bytes());
            assert_eq!(from.ip(true), Some(want), "{header}");
        }
    }

    #[test]
    fn a_byte_that_is_not_text_in_the_clients_part_leaves_the_proxys_entry() {
        assert_eq!(
            from_peer_10_0_0_1(b"\xff, 198.51.100.20").ip(true),
            Some(IpAddr::from([198, 51, 100, 20]))
        );
    }

    #[test]
    fn ipv6_clients_share_one_budget_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(budget_key(a), budget_key(b));
        assert_ne!(budget_key(a), budget_key(c));
        assert_eq!(budget_key("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1");
        assert_eq!(budget_key(IpAddr::from([10, 0, 0, 1])), "10.0.0.1");
    }
}
