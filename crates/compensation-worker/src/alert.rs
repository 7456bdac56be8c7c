//! Alerts for archived compensation failures, to a chat-bot webhook (`ALERT_WEBHOOK_URL`;
//! WeCom and DingTalk bots take the `msgtype`/`text` body sent here).
//!
//! Rate-limited: the first failure after a quiet spell is sent at once; failures within
//! `ALERT_MIN_INTERVAL_MS` of a sent alert are held and sent together as one summary when
//! the interval ends. A storm of 10,000 failures is a handful of messages, not 10,000.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct Alert {
    pub failure_id: i64,
    pub payment_id: Uuid,
    pub order_id: Uuid,
    pub reason: String,
    pub last_error: String,
}

/// The rate limit, without clocks or I/O.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    last_sent: Option<Instant>,
    held: Vec<Alert>,
}

impl Throttle {
    pub fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            last_sent: None,
            held: Vec::new(),
        }
    }

    /// A new failure at `now`: what to send at once, if anything.
    pub fn offer(&mut self, now: Instant, alert: Alert) -> Option<Vec<Alert>> {
        self.held.push(alert);
        self.due(now)
    }

    /// What to send at `now`: everything held, once the interval since the last message
    /// has passed.
    pub fn due(&mut self, now: Instant) -> Option<Vec<Alert>> {
        if self.held.is_empty() {
            return None;
        }
        let open = self
            .last_sent
            .is_none_or(|at| now.duration_since(at) >= self.interval);
        if !open {
            return None;
        }
        self.last_sent = Some(now);
        Some(std::mem::take(&mut self.held))
    }

    /// When held alerts become due.
    pub fn deadline(&self) -> Option<Instant> {
        if self.held.is_empty() {
            return None;
        }
        self.last_sent.map(|at| at + self.interval)
    }
}

/// The chat message for a batch: one failure in full, or a summary by reason.
pub fn message(batch: &[Alert]) -> serde_json::Value {
    let content = match batch {
        [one] => format!(
            "Compensation failed for payment {} (order {}): {} ({}). Failure #{} is listed for manual replay.",
            one.payment_id, one.order_id, one.reason, one.last_error, one.failure_id
        ),
        many => {
            let mut by_reason = BTreeMap::<&str, usize>::new();
            for a in many {
                *by_reason.entry(a.reason.as_str()).or_default() += 1;
            }
            let reasons: Vec<String> = by_reason
                .iter()
                .map(|(r, n)| format!("{r}: {n}"))
                .collect();
            let sample: Vec<String> = many.iter().take(5).map(|a| a.payment_id.to_string()).collect();
            format!(
                "{} compensation failures since the last alert ({}). First payments: {}. All are listed for manual replay.",
                many.len(),
                reasons.join(", "),
                sample.join(", ")
            )
        }
    };
    json!({
        "msgtype": "text",
        "text": { "content": content },
        "failures": batch.len(),
        "failure_ids": batch.iter().map(|a| a.failure_id).collect::<Vec<_>>(),
    })
}

/// Sends alerts from `rx` until `stop`, rate-limited; without a webhook it only logs.
pub async fn run(
    mut rx: mpsc::UnboundedReceiver<Alert>,
    webhook: Option<String>,
    interval: Duration,
    sent: IntCounterVec,
    stop: CancellationToken,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    let mut throttle = Throttle::new(interval);
    loop {
        let deadline = throttle.deadline();
        let batch = tokio::select! {
            _ = stop.cancelled() => {
                // what is held goes out before the worker exits
                throttle.last_sent = None;
                throttle.due(Instant::now())
            }
            got = rx.recv() => match got {
                Some(a) => throttle.offer(Instant::now(), a),
                None => return,
            },
            _ = sleep_until(deadline) => throttle.due(Instant::now()),
        };
        if let Some(batch) = batch {
            let body = message(&batch);
            tracing::error!(failures = batch.len(), alert = %body["text"]["content"], "compensation alert");
            let result = match &webhook {
                None => "logged",
                Some(url) => match http.post(url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => "sent",
                    Ok(r) => {
                        tracing::warn!(status = %r.status(), "alert webhook refused the alert");
                        "failed"
                    }
                    Err(e) => {
                        // never the URL: the webhook's secret is in it
                        tracing::warn!(error = %e.without_url(), "alert webhook unreachable");
                        "failed"
                    }
                },
            };
            sent.with_label_values(&[result]).inc();
        }
        if stop.is_cancelled() {
            return;
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(n: i64, reason: &str) -> Alert {
        Alert {
            failure_id: n,
            payment_id: Uuid::from_u128(n as u128),
            order_id: Uuid::from_u128(1000 + n as u128),
            reason: reason.into(),
            last_error: "answered 500".into(),
        }
    }

    #[test]
    fn a_storm_is_one_alert_then_one_summary_per_interval() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut th = Throttle::new(Duration::from_secs(60));
        // the first goes at once
        let first = th.offer(t0, alert(1, "gateway_timeout")).unwrap();
        assert_eq!(first.len(), 1);
        // 999 more within the minute are held
        for n in 2..=1000 {
            assert!(th
                .offer(
                    ms(n as u64 * 10),
                    alert(
                        n,
                        if n % 2 == 0 {
                            "gateway_error"
                        } else {
                            "gateway_timeout"
                        }
                    )
                )
                .is_none());
        }
        assert_eq!(th.deadline(), Some(ms(60_000)));
        assert!(th.due(ms(59_999)).is_none());
        let summary = th.due(ms(60_000)).unwrap();
        assert_eq!(summary.len(), 999);
        let text = message(&summary)["text"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(text.starts_with("999 compensation failures"), "{text}");
        assert!(
            text.contains("gateway_error: 500") && text.contains("gateway_timeout: 499"),
            "{text}"
        );
        // nothing held: nothing due, no deadline
        assert!(th.due(ms(200_000)).is_none());
        assert_eq!(th.deadline(), None);
        // after a quiet spell, the next one goes at once again
        let later = th.offer(ms(130_000), alert(2000, "gateway_error")).unwrap();
        assert_eq!(later.len(), 1);
        let one = message(&later)["text"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(one.contains(&Uuid::from_u128(2000).to_string()), "{one}");
    }
}
