//! Payment provider wire formats, shared by order-api (which verifies) and the gateway
//! simulator (which signs), plus the client order-api and the compensation worker use.
//!
//! Callbacks are signed with HMAC-SHA256 over `"{timestamp}.{raw body}"` (hex), with a
//! per-provider secret. Headers per provider:
//!
//! | provider | timestamp header      | signature header      |
//! |----------|-----------------------|-----------------------|
//! | wechat   | `Wechatpay-Timestamp` | `Wechatpay-Signature` |
//! | alipay   | `Alipay-Timestamp`    | `Alipay-Signature`    |
//! | douyin   | `Douyin-Timestamp`    | `Douyin-Signature`    |
//!
//! A callback whose timestamp is more than [`MAX_SKEW_SECS`] away from our clock is refused,
//! so a captured callback cannot be replayed later. This crate owns these formats; it must
//! never touch orders.

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::Provider;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub const MAX_SKEW_SECS: i64 = 300;

pub fn timestamp_header(p: Provider) -> &'static str {
    match p {
        Provider::Wechat => "Wechatpay-Timestamp",
        Provider::Alipay => "Alipay-Timestamp",
        Provider::Douyin => "Douyin-Timestamp",
    }
}

pub fn signature_header(p: Provider) -> &'static str {
    match p {
        Provider::Wechat => "Wechatpay-Signature",
        Provider::Alipay => "Alipay-Signature",
        Provider::Douyin => "Douyin-Signature",
    }
}

/// Per-provider signing secrets (`PAYMENT_SECRET_WECHAT`, `..._ALIPAY`, `..._DOUYIN`).
#[derive(Clone)]
pub struct ProviderSecrets {
    wechat: String,
    alipay: String,
    douyin: String,
}

impl std::fmt::Debug for ProviderSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProviderSecrets { <redacted> }")
    }
}

impl ProviderSecrets {
    /// The variable that holds a provider's secret: `PAYMENT_SECRET_WECHAT`, ...
    pub fn variable(p: Provider) -> String {
        format!("PAYMENT_SECRET_{}", p.as_str().to_uppercase())
    }

    /// The public development value of a provider's secret (README.md documents it, so it
    /// signs nothing outside development).
    pub fn dev_default(p: Provider) -> String {
        format!("dev-{}-secret", p.as_str())
    }

    /// Reads each provider's secret through `require(variable, dev_default)`, which decides
    /// what an unset or public value means (the services refuse to start on one).
    pub fn load(mut require: impl FnMut(&str, &str) -> String) -> Self {
        let mut get = |p: Provider| require(&Self::variable(p), &Self::dev_default(p));
        ProviderSecrets {
            wechat: get(Provider::Wechat),
            alipay: get(Provider::Alipay),
            douyin: get(Provider::Douyin),
        }
    }

    /// The development values (tests and the local stack).
    pub fn development() -> Self {
        Self::load(|_, dev| dev.to_owned())
    }

    pub fn get(&self, p: Provider) -> &str {
        match p {
            Provider::Wechat => &self.wechat,
            Provider::Alipay => &self.alipay,
            Provider::Douyin => &self.douyin,
        }
    }
}

fn mac(secret: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    m.update(timestamp.as_bytes());
    m.update(b".");
    m.update(body);
    m
}

pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureError {
    Missing,
    Stale,
    Bad,
}

impl std::error::Error for SignatureError {}

impl std::fmt::Display for SignatureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SignatureError::Missing => "missing timestamp or signature header",
            SignatureError::Stale => "timestamp outside the 300 s window",
            SignatureError::Bad => "signature does not match",
        })
    }
}

/// Verifies a callback: timestamp within [`MAX_SKEW_SECS`] of `now`, and the HMAC (constant
/// time) over the raw body bytes as received.
pub fn verify(
    secret: &str,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<(), SignatureError> {
    let (Some(ts), Some(sig)) = (timestamp, signature) else {
        return Err(SignatureError::Missing);
    };
    let secs: i64 = ts.trim().parse().map_err(|_| SignatureError::Stale)?;
    // abs_diff cannot overflow: `(now - secs).abs()` wraps for a timestamp near i64::MIN in
    // a release build and would let an ancient, signed callback through
    if now.timestamp().abs_diff(secs) > MAX_SKEW_SECS.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    let sig = hex::decode(sig.trim()).map_err(|_| SignatureError::Bad)?;
    mac(secret, ts.trim(), body)
        .verify_slice(&sig)
        .map_err(|_| SignatureError::Bad)
}

/// The body of a "payment succeeded" callback (all three providers, in this simulation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PaymentNotification {
    /// The provider's id for this result; the same id comes back from the query API, so a
    /// webhook and a compensation query of one payment deduplicate to one record.
    pub event_id: String,
    pub payment_id: String,
    pub order_id: String,
    pub amount_cents: i64,
    /// Always `SUCCESS` for now; other values are refused.
    pub status: String,
    pub paid_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatePayment {
    pub payment_id: String,
    pub order_id: String,
    pub amount_cents: i64,
    /// Where the provider sends the signed callback.
    pub notify_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedPayment {
    pub pay_url: String,
}

/// The query API's answer.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PaymentQuery {
    pub payment_id: String,
    /// `CREATED` (not paid yet), `PAID`, or `CLOSED` / `FAILED` (closed unpaid at the
    /// provider: it will not be paid).
    pub status: String,
    /// The provider's own id for the transaction, once paid (WeChat's `transaction_id`,
    /// Alipay's `trade_no`).
    #[serde(default)]
    pub transaction_id: Option<String>,
    pub amount_cents: i64,
    pub event_id: Option<String>,
    pub paid_at: Option<DateTime<Utc>>,
}

/// What closing a payment at the provider did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseOutcome {
    /// Closed (or it was already): it will never be paid.
    Closed,
    /// Too late: the buyer had paid.
    Paid,
}

/// A refund request. `refund_id` is the merchant's id for this refund: the provider pays a
/// refund id once, so a retried request (after a timeout, a crash) never pays twice.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RefundRequest {
    pub refund_id: String,
    pub payment_id: String,
    pub amount_cents: i64,
}

/// A refund as the provider knows it (the refund and refund-query APIs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Refund {
    pub refund_id: String,
    pub payment_id: String,
    pub amount_cents: i64,
    /// `SUCCESS`: the money went back.
    pub status: String,
    pub refunded_at: DateTime<Utc>,
}

/// Client for the providers' merchant APIs (create and query payments, refund and query
/// refunds).
#[derive(Clone)]
pub struct GatewayClient {
    http: reqwest::Client,
    base_url: String,
}

#[derive(Debug)]
pub enum GatewayError {
    /// No answer within the client's timeout: try again later.
    Timeout(String),
    /// Unreachable, or a 5xx: try again later.
    Unavailable(String),
    /// The provider answered with an error.
    Rejected(String),
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GatewayError::Timeout(m) => write!(f, "payment gateway timed out: {m}"),
            GatewayError::Unavailable(m) => write!(f, "payment gateway unavailable: {m}"),
            GatewayError::Rejected(m) => write!(f, "payment gateway refused: {m}"),
        }
    }
}

impl std::error::Error for GatewayError {}

impl GatewayClient {
    pub fn new(base_url: &str, timeout: Duration) -> anyhow::Result<Self> {
        Ok(GatewayClient {
            http: reqwest::Client::builder().timeout(timeout).build()?,
            base_url: base_url.trim_end_matches('/').to_owned(),
        })
    }

    async fn send<T: serde::de::DeserializeOwned>(
        req: reqwest::RequestBuilder,
    ) -> Result<T, GatewayError> {
        let resp = req.send().await.map_err(|e| {
            // the error without its URL (ids and, at a real provider, signed query strings)
            if e.is_timeout() {
                GatewayError::Timeout(e.without_url().to_string())
            } else {
                GatewayError::Unavailable(e.without_url().to_string())
            }
        })?;
        let status = resp.status();
        if status.is_server_error() {
            return Err(GatewayError::Unavailable(format!("answered {status}")));
        }
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(GatewayError::Rejected(format!("{status}: {text}")));
        }
        resp.json()
            .await
            .map_err(|e| GatewayError::Unavailable(format!("bad reply: {}", e.without_url())))
    }

    pub async fn create_payment(
        &self,
        provider: Provider,
        req: &CreatePayment,
    ) -> Result<CreatedPayment, GatewayError> {
        let url = format!("{}/v1/{provider}/payments", self.base_url);
        Self::send(self.http.post(url).json(req)).await
    }

    pub async fn query_payment(
        &self,
        provider: Provider,
        payment_id: &str,
    ) -> Result<PaymentQuery, GatewayError> {
        let url = format!("{}/v1/{provider}/payments/{payment_id}", self.base_url);
        Self::send(self.http.get(url)).await
    }

    /// Closes an unpaid payment at the provider (WeChat Pay's "close order"), so it can no
    /// longer be paid: what a merchant does once the order cannot take the money. `Paid` if
    /// the buyer paid first (then the money must be applied, and given back).
    pub async fn close_payment(
        &self,
        provider: Provider,
        payment_id: &str,
    ) -> Result<CloseOutcome, GatewayError> {
        let url = format!(
            "{}/v1/{provider}/payments/{payment_id}/close",
            self.base_url
        );
        match Self::send::<PaymentQuery>(self.http.post(url)).await {
            Ok(_) => Ok(CloseOutcome::Closed),
            Err(GatewayError::Rejected(m)) if m.starts_with("409") => Ok(CloseOutcome::Paid),
            Err(e) => Err(e),
        }
    }

    /// The query API by the provider's transaction id (for when the query by our payment id
    /// cannot find it: an operator reads the id off the provider's merchant console).
    pub async fn query_transaction(
        &self,
        provider: Provider,
        transaction_id: &str,
    ) -> Result<PaymentQuery, GatewayError> {
        let url = format!(
            "{}/v1/{provider}/transactions/{transaction_id}",
            self.base_url
        );
        Self::send(self.http.get(url)).await
    }

    /// Asks for a refund; the same `refund_id` again answers the refund already made.
    pub async fn refund(
        &self,
        provider: Provider,
        req: &RefundRequest,
    ) -> Result<Refund, GatewayError> {
        let url = format!("{}/v1/{provider}/refunds", self.base_url);
        Self::send(self.http.post(url).json(req)).await
    }

    /// The refund-query API: `Rejected` (404) if the provider never made this refund.
    pub async fn query_refund(
        &self,
        provider: Provider,
        refund_id: &str,
    ) -> Result<Refund, GatewayError> {
        let url = format!("{}/v1/{provider}/refunds/{refund_id}", self.base_url);
        Self::send(self.http.get(url)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_refuse_tampering_and_staleness() {
        let now = Utc::now();
        let ts = now.timestamp().to_string();
        let body = br#"{"a":1}"#;
        let sig = sign("k", &ts, body);
        assert_eq!(verify("k", Some(&ts), Some(&sig), body, now), Ok(()));
        assert_eq!(
            verify("k", Some(&ts), Some(&sig), br#"{"a":2}"#, now),
            Err(SignatureError::Bad)
        );
        assert_eq!(
            verify("other", Some(&ts), Some(&sig), body, now),
            Err(SignatureError::Bad)
        );
        let old = (now.timestamp() - 301).to_string();
        let old_sig = sign("k", &old, body);
        assert_eq!(
            verify("k", Some(&old), Some(&old_sig), body, now),
            Err(SignatureError::Stale)
        );
        let edge = (now.timestamp() - 300).to_string();
        let edge_sig = sign("k", &edge, body);
        assert_eq!(verify("k", Some(&edge), Some(&edge_sig), body, now), Ok(()));
        assert_eq!(
            verify("k", None, Some(&sig), body, now),
            Err(SignatureError::Missing)
        );
        // timestamps whose distance from now overflows i64 are stale, not accepted
        for far in [
            now.timestamp().wrapping_sub(i64::MIN),
            now.timestamp() - i64::MAX,
            i64::MIN,
            i64::MAX,
        ] {
            let ts = far.to_string();
            let sig = sign("k", &ts, body);
            assert_eq!(
                verify("k", Some(&ts), Some(&sig), body, now),
                Err(SignatureError::Stale),
                "{ts}"
            );
        }
    }

    #[test]
    fn headers_differ_per_provider() {
        let names: std::collections::HashSet<_> =
            Provider::ALL.iter().map(|p| signature_header(*p)).collect();
        assert_eq!(names.len(), 3);
    }
}
