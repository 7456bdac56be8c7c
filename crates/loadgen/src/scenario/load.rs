//! The buyers: open-loop arrivals and each buyer's journey, every operation recorded.
//!
//! Arrivals follow a schedule fixed before the run (Poisson by default: exponential gaps at
//! `rate`), and each "buy now" is sent at its scheduled time whatever the server does; its
//! latency is measured from that *intended* time, so a stalled server shows as latency, not
//! as fewer requests (coordinated omission, as wrk2 corrects it). A buyer's choices (SKU,
//! quantity, journey, think times) come from a generator seeded by the run's seed and the
//! buyer's number, so a seed repeats the same sale whatever the timing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;
use service_kit::auth::mint_token;
use tokio::time::Instant;

use super::check::ClientOutcome;

/// What a buyer does after "buy now".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Journey {
    /// Starts a payment at one of the three providers and pays after a think time.
    Pay,
    /// Cancels after a think time.
    Cancel,
    /// Walks away: the pre-lock lapses and the order expires.
    Abandon,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Create,
    StartPayment,
    Pay,
    Cancel,
}

/// One operation, Jepsen-style: invoked at `sent` (scheduled for `intended`), then ok, fail
/// or unknown (no answer in time: it may have happened) at `answered`. Times are
/// milliseconds since the run started.
#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub buyer: u64,
    pub kind: OpKind,
    /// 1 for the first try; a retry (same idempotency key) counts up.
    pub attempt: u32,
    pub intended_ms: f64,
    pub sent_ms: f64,
    pub answered_ms: f64,
    pub outcome: ClientOutcome,
    pub status: u16,
    /// The error code or transport error.
    pub code: String,
    pub order_id: Option<String>,
}

#[derive(Clone)]
pub struct Plan {
    pub seed: u64,
    pub run: String,
    pub skus: Vec<String>,
    /// Cumulative Zipf weights over `skus`.
    pub cdf: Vec<f64>,
    pub store: String,
    pub pay_share: f64,
    pub cancel_share: f64,
    pub retry_share: f64,
    pub think_mean: Duration,
    pub timeout: Duration,
    pub jwt_secret: String,
}

/// Zipf(`s`) cumulative weights over `n` items (rank 1 the most popular).
pub fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let w: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = w.iter().sum();
    let mut acc = 0.0;
    w.iter()
        .map(|x| {
            acc += x / total;
            acc
        })
        .collect()
}

/// The arrival times (from the start) of a run: Poisson (exponential gaps) or evenly spaced.
pub fn arrivals(rate: f64, duration: Duration, poisson: bool, seed: u64) -> Vec<Duration> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xA11C_E5ED);
    let mut t = 0.0f64;
    let end = duration.as_secs_f64();
    let mut out = Vec::with_capacity((rate * end * 1.05) as usize + 16);
    loop {
        t = if poisson {
            // 1 - u is in (0, 1]: the logarithm is finite
            t - (1.0 - rng.f64()).ln() / rate
        } else {
            (out.len() + 1) as f64 / rate
        };
        if t >= end {
            return out;
        }
        out.push(Duration::from_secs_f64(t));
    }
}

/// Live figures for the progress line (reset every tick) and the whole run.
pub struct Live {
    pub sent: AtomicU64,
    pub created: AtomicU64,
    pub errors: AtomicU64,
    pub unknown: AtomicU64,
    /// "Buy now" latency of first tries since the last tick (µs).
    pub window: Mutex<Histogram<u64>>,
    /// ... and over the whole run.
    pub all: Mutex<Histogram<u64>>,
}

impl Live {
    pub fn new() -> Live {
        Live {
            sent: AtomicU64::new(0),
            created: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            unknown: AtomicU64::new(0),
            window: Mutex::new(histogram()),
            all: Mutex::new(histogram()),
        }
    }
}

/// Latency in microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

pub struct Recorder {
    pub start: Instant,
    pub ops: Mutex<Vec<Op>>,
    pub live: Live,
}

impl Recorder {
    fn ms(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.start).as_secs_f64() * 1000.0
    }
}

/// One request's result: status (0 = none), error code, body.
struct Answer {
    status: u16,
    code: String,
    body: serde_json::Value,
    timed_out: bool,
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    match req.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            match r.bytes().await {
                Ok(b) => {
                    let body: serde_json::Value =
                        serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null);
                    Answer {
                        status,
                        code: body["code"].as_str().unwrap_or("").to_owned(),
                        body,
                        timed_out: false,
                    }
                }
                Err(e) => Answer {
                    status: 0,
                    code: format!("body: {e}"),
                    body: serde_json::Value::Null,
                    timed_out: e.is_timeout(),
                },
            }
        }
        Err(e) => Answer {
            status: 0,
            code: if e.is_timeout() {
                "timeout".to_owned()
            } else {
                format!("transport: {e}")
            },
            body: serde_json::Value::Null,
            // a request that was sent and not answered may have happened
            timed_out: true,
        },
    }
}

pub struct Targets {
    pub order_api: String,
    pub gateway: String,
    pub http: reqwest::Client,
}

const PROVIDERS: [&str; 3] = ["wechat", "alipay", "douyin"];

/// Runs buyer `i` arriving at `intended`: "buy now" (retried with the same key after a
/// timeout, for `retry_share` of them, and after a 503 as the `Retry-After` says), then its
/// journey.
pub async fn buyer(
    i: u64,
    intended: Instant,
    plan: Arc<Plan>,
    t: Arc<Targets>,
    rec: Arc<Recorder>,
) {
    let mut rng = fastrand::Rng::with_seed(plan.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i);
    let u = rng.f64();
    let sku = &plan.skus[plan
        .cdf
        .partition_point(|c| *c < u)
        .min(plan.skus.len() - 1)];
    let quantity = rng.u32(1..=3);
    let r = rng.f64();
    let journey = if r < plan.pay_share {
        Journey::Pay
    } else if r < plan.pay_share + plan.cancel_share {
        Journey::Cancel
    } else {
        Journey::Abandon
    };
    let user = format!("b-{}-{i}", plan.run);
    let token = mint_token(&plan.jwt_secret, &user, 3600);
    let key = format!("k-{i}");
    // the id the order gets (a function of buyer and key): an unanswered "buy now" is looked
    // up by it
    let derived = domain::UserId::parse(&user)
        .map(|u| domain::OrderId::from_idempotency_key(&u, &key).to_string())
        .ok();
    let body = json!({"sku_id": sku, "store_id": plan.store, "quantity": quantity});

    let mut intended_at = intended;
    let mut order_id = None;
    for attempt in 1..=4u32 {
        let sent = Instant::now();
        let a = send(
            t.http
                .post(format!("{}/v1/orders", t.order_api))
                .bearer_auth(&token)
                .header("Idempotency-Key", &key)
                .timeout(plan.timeout)
                .json(&body),
        )
        .await;
        let answered = Instant::now();
        let outcome = match a.status {
            201 => ClientOutcome::Ok,
            0 if a.timed_out => ClientOutcome::Unknown,
            _ => ClientOutcome::Fail,
        };
        let id = a.body["order_id"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| derived.clone());
        if attempt == 1 {
            rec.live.sent.fetch_add(1, Ordering::Relaxed);
            let us = answered.saturating_duration_since(intended_at).as_micros() as u64;
            let us = us.clamp(1, 600_000_000);
            if let Ok(mut h) = rec.live.window.lock() {
                let _ = h.record(us);
            }
            if let Ok(mut h) = rec.live.all.lock() {
                let _ = h.record(us);
            }
        }
        match outcome {
            ClientOutcome::Ok => rec.live.created.fetch_add(1, Ordering::Relaxed),
            ClientOutcome::Unknown => rec.live.unknown.fetch_add(1, Ordering::Relaxed),
            ClientOutcome::Fail if a.status >= 500 || a.status == 0 => {
                rec.live.errors.fetch_add(1, Ordering::Relaxed)
            }
            ClientOutcome::Fail => 0,
        };
        record(
            &rec,
            Op {
                buyer: i,
                kind: OpKind::Create,
                attempt,
                intended_ms: rec.ms(intended_at),
                sent_ms: rec.ms(sent),
                answered_ms: rec.ms(answered),
                outcome,
                status: a.status,
                code: a.code.clone(),
                order_id: id.clone(),
            },
        );
        let retry_after = match (outcome, a.status) {
            (ClientOutcome::Ok, _) => {
                order_id = id;
                break;
            }
            (ClientOutcome::Unknown, _) if rng.f64() < plan.retry_share => {
                Duration::from_millis(rng.u64(200..=1000))
            }
            // "try again shortly": a client honours Retry-After (a second here)
            (ClientOutcome::Fail, 503) => Duration::from_millis(rng.u64(500..=1500)),
            _ => break,
        };
        tokio::time::sleep(retry_after).await;
        intended_at = Instant::now();
    }
    let Some(order_id) = order_id else {
        return;
    };
    let think = |rng: &mut fastrand::Rng| {
        let mean = plan.think_mean.as_secs_f64();
        let s = (-(1.0 - rng.f64()).ln() * mean).min(mean * 5.0);
        Duration::from_secs_f64(s)
    };
    match journey {
        Journey::Abandon => {}
        Journey::Cancel => {
            tokio::time::sleep(think(&mut rng)).await;
            let url = format!("{}/v1/orders/{order_id}/cancel", t.order_api);
            step(&rec, i, OpKind::Cancel, &order_id, || {
                t.http.post(&url).bearer_auth(&token).timeout(plan.timeout)
            })
            .await;
        }
        Journey::Pay => {
            let provider = PROVIDERS[rng.usize(0..3)];
            let url = format!("{}/v1/orders/{order_id}/payments", t.order_api);
            let started = step(&rec, i, OpKind::StartPayment, &order_id, || {
                t.http
                    .post(&url)
                    .bearer_auth(&token)
                    .timeout(plan.timeout)
                    .json(&json!({ "provider": provider }))
            })
            .await;
            let Some(payment) = started.and_then(|b| b["payment_id"].as_str().map(str::to_owned))
            else {
                return;
            };
            tokio::time::sleep(think(&mut rng)).await;
            let url = format!("{}/v1/sim/payments/{payment}/pay", t.gateway);
            step(&rec, i, OpKind::Pay, &order_id, || {
                t.http.post(&url).timeout(plan.timeout)
            })
            .await;
        }
    }
}

/// A journey step: sent, retried after a 502/503 or no answer (each of these calls is
/// idempotent) up to three times; its body when it succeeded.
async fn step(
    rec: &Recorder,
    buyer: u64,
    kind: OpKind,
    order_id: &str,
    make: impl Fn() -> reqwest::RequestBuilder,
) -> Option<serde_json::Value> {
    for attempt in 1..=3u32 {
        let sent = Instant::now();
        let a = send(make()).await;
        let answered = Instant::now();
        let outcome = match a.status {
            200..=299 => ClientOutcome::Ok,
            0 if a.timed_out => ClientOutcome::Unknown,
            _ => ClientOutcome::Fail,
        };
        record(
            rec,
            Op {
                buyer,
                kind,
                attempt,
                intended_ms: rec.ms(sent),
                sent_ms: rec.ms(sent),
                answered_ms: rec.ms(answered),
                outcome,
                status: a.status,
                code: a.code,
                order_id: Some(order_id.to_owned()),
            },
        );
        match (outcome, a.status) {
            (ClientOutcome::Ok, _) => return Some(a.body),
            (ClientOutcome::Unknown, _) | (_, 502 | 503) => {
                tokio::time::sleep(Duration::from_millis(300)).await
            }
            _ => return None,
        }
    }
    None
}

fn record(rec: &Recorder, op: Op) {
    if let Ok(mut ops) = rec.ops.lock() {
        ops.push(op);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_arrivals_come_at_the_rate_and_repeat_with_the_seed() {
        let a = arrivals(1000.0, Duration::from_secs(20), true, 7);
        let n = a.len() as f64;
        assert!((n - 20_000.0).abs() < 20_000.0 * 0.03, "{n} arrivals");
        assert_eq!(a, arrivals(1000.0, Duration::from_secs(20), true, 7));
        assert_ne!(a, arrivals(1000.0, Duration::from_secs(20), true, 8));
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        let even = arrivals(10.0, Duration::from_secs(1), false, 7);
        assert_eq!(even.len(), 9);
    }

    #[test]
    fn zipf_puts_the_weight_on_a_few_skus() {
        let cdf = zipf_cdf(50, 1.1);
        assert!((cdf[49] - 1.0).abs() < 1e-9);
        assert!(cdf[0] > 0.2 && cdf[0] < 0.3, "top SKU {}", cdf[0]);
        assert!(cdf.windows(2).all(|w| w[0] < w[1]));
    }
}
