//! `order.notify`: a signed webhook to the buyer- and bar-notification service.
//!
//! Body `{"event":"order.paid","order_id","user_id","store_id"}`, signed like the payment
//! providers' callbacks: hex HMAC-SHA256 over `"{timestamp}.{body}"` in `X-Bar-Signature`, the
//! Unix timestamp in `X-Bar-Timestamp`. A receiver that is down only delays this job (it has
//! its own retries); the other follow-ups of the order are separate jobs.

use std::time::Duration;

use job_engine::{Job, Outcome};

pub struct Notifier {
    http: reqwest::Client,
    url: String,
    secret: String,
}

impl Notifier {
    pub fn new(url: &str, secret: String, timeout: Duration) -> anyhow::Result<Self> {
        Ok(Notifier {
            http: reqwest::Client::builder().timeout(timeout).build()?,
            url: url.to_owned(),
            secret,
        })
    }

    pub async fn send(&self, job: &Job) -> Outcome {
        let p = &job.payload;
        let body = serde_json::json!({
            "event": "order.paid",
            "order_id": p["order_id"],
            "user_id": p["user_id"],
            "store_id": p["store_id"],
        })
        .to_string();
        let ts = chrono::Utc::now().timestamp().to_string();
        let sig = gateway_protocol::sign(&self.secret, &ts, body.as_bytes());
        let sent = self
            .http
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("X-Bar-Timestamp", ts)
            .header("X-Bar-Signature", sig)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => Outcome::Done,
            Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => {
                Outcome::Permanent(format!("notification refused: {}", r.status()))
            }
            Ok(r) => Outcome::Retry(format!("notification receiver answered {}", r.status())),
            // never the URL: a webhook's secret is in it (and this text reaches the job's
            // last_error, the ops API and the console)
            Err(e) => Outcome::Retry(format!(
                "notification receiver unreachable: {}",
                e.without_url()
            )),
        }
    }
}
