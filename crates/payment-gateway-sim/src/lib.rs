//! payment-gateway-sim: WeChat Pay, Alipay and Douyin Pay as the rest of the system sees them,
//! with faults that can be dialled in at run time.
//!
//! Routes:
//! - `POST /v1/{provider}/payments`            create (called by order-api) -> `{"pay_url"}`
//! - `GET  /v1/{provider}/payments/{id}`       query API (status, event id, amount)
//! - `GET  /v1/{provider}/transactions/{txn}`  query API by the provider's transaction id
//! - `POST /v1/sim/payments/{id}/pay`          "the buyer pays": marks it paid, sends callbacks
//! - `POST /v1/{provider}/refunds`             refund (idempotent by refund id)
//! - `GET  /v1/{provider}/refunds/{refund_id}` refund-query API
//! - `POST /v1/{provider}/payments/{id}/close` the merchant closes an unpaid payment
//! - `POST /v1/sim/payments/{id}/close`        "the provider closes it": CLOSED or FAILED
//! - `PUT  /v1/sim/payments/{id}/faults`       this payment's own faults (a broken query)
//! - `GET  /v1/sim/payments/{id}`              what the simulator did (callbacks, refunds)
//! - `GET  /v1/sim/payments`                   every payment it holds (checkers)
//! - `GET  /v1/sim/ledger?after=&limit=`       the same, a page at a time (large runs)
//! - `GET|PUT /v1/sim/faults`                  fault rates (see [`Faults`])
//!
//! Callbacks are signed per `gateway_protocol` and retried on 5xx or network errors with
//! exponential backoff, as real providers do. Random delays (`delay_rate`, `delay_ms`) also
//! reorder callbacks relative to each other. State is in memory: this is a test double, and
//! it must never be pointed at real money, nor be reachable in production: it signs
//! callbacks with the providers' secrets for anyone who asks it to "pay".

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use domain::Provider;
use gateway_protocol::{
    CreatePayment, CreatedPayment, PaymentNotification, PaymentQuery, ProviderSecrets, Refund,
    RefundRequest,
};
use serde::{Deserialize, Serialize};
use service_kit::error::ErrorBody;
use service_kit::http::ApiJson;
use service_kit::telemetry::Metrics;
use service_kit::{ApiError, ErrorCode};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Fault rates, each a probability in [0, 1], applied independently per event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// A paid payment's callback is never sent (the lost callback compensation must repair).
    pub drop_rate: f64,
    /// A callback waits a random 0..=`delay_ms` before its first attempt.
    pub delay_rate: f64,
    pub delay_ms: u64,
    /// A callback is sent `duplicate_count` extra times.
    pub duplicate_rate: f64,
    pub duplicate_count: u32,
    /// A query answers only after `query_timeout_ms` (past the caller's timeout).
    pub query_timeout_rate: f64,
    pub query_timeout_ms: u64,
    /// A query answers 500.
    pub query_error_rate: f64,
    /// A refund request answers 500 without refunding.
    pub refund_error_rate: f64,
    /// A refund is made, but the answer comes only after `query_timeout_ms` (past the
    /// caller's timeout): the caller must retry with the same refund id, not a new one.
    pub refund_timeout_rate: f64,
    /// Attempts per callback copy before giving up (retries on 5xx and network errors).
    pub callback_attempts: u32,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            drop_rate: 0.0,
            delay_rate: 0.0,
            delay_ms: 1000,
            duplicate_rate: 0.0,
            duplicate_count: 1,
            query_timeout_rate: 0.0,
            query_timeout_ms: 10_000,
            query_error_rate: 0.0,
            refund_error_rate: 0.0,
            refund_timeout_rate: 0.0,
            callback_attempts: 5,
        }
    }
}

impl Faults {
    fn validate(&self) -> Result<(), ApiError> {
        for (name, rate) in [
            ("drop_rate", self.drop_rate),
            ("delay_rate", self.delay_rate),
            ("duplicate_rate", self.duplicate_rate),
            ("query_timeout_rate", self.query_timeout_rate),
            ("query_error_rate", self.query_error_rate),
            ("refund_error_rate", self.refund_error_rate),
            ("refund_timeout_rate", self.refund_timeout_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ApiError::field(name, "must be between 0 and 1"));
            }
        }
        if self.duplicate_count > 100 {
            return Err(ApiError::field("duplicate_count", "must be at most 100"));
        }
        if self.delay_ms > 600_000 || self.query_timeout_ms > 600_000 {
            return Err(ApiError::field(
                "delay_ms",
                "delays must be at most 600000 ms",
            ));
        }
        if !(1..=20).contains(&self.callback_attempts) {
            return Err(ApiError::field("callback_attempts", "must be 1 to 20"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SimPayment {
    pub payment_id: String,
    pub provider: String,
    pub order_id: String,
    pub amount_cents: i64,
    pub notify_url: String,
    /// CREATED, PAID, CLOSED or FAILED.
    pub status: String,
    pub event_id: Option<String>,
    pub paid_at: Option<DateTime<Utc>>,
    /// The provider's transaction id, once paid.
    pub transaction_id: Option<String>,
    /// The query by payment id answers 500, always (the query by transaction id still
    /// works): a payment compensation cannot resolve on its own.
    pub query_broken: bool,
    /// The refund API refuses this payment's refunds (409), always: money the provider will
    /// not give back.
    #[serde(default)]
    pub refund_refused: bool,
    /// Whether the callback was dropped by the drop fault.
    pub callback_dropped: bool,
    /// Callback copies sent (1 + duplicates), and how many were acknowledged with 2xx.
    pub callbacks_planned: u32,
    pub callbacks_acknowledged: u32,
    pub callback_attempts: u32,
    /// Refunds paid for this payment (each refund id once).
    pub refunds: Vec<Refund>,
}

#[derive(utoipa::OpenApi)]
#[openapi(info(
    title = "bar-fulfillment payment-gateway-sim",
    description = "WeChat Pay / Alipay / Douyin Pay simulator with fault injection. A test double: no auth."
))]
struct ApiDoc;

pub struct Sim {
    /// By payment id, in order: the ledger is read a page at a time.
    payments: Mutex<BTreeMap<String, SimPayment>>,
    faults: RwLock<Faults>,
    secrets: ProviderSecrets,
    http: reqwest::Client,
    public_url: String,
    pub metrics: Metrics,
    /// Callback deliveries in flight; drained on shutdown.
    pub tasks: service_kit::http::TaskTracker,
}

#[derive(Clone)]
pub struct SimState(pub Arc<Sim>);

impl Sim {
    pub fn new(secrets: ProviderSecrets, public_url: &str) -> anyhow::Result<Arc<Sim>> {
        Ok(Arc::new(Sim {
            payments: Mutex::new(BTreeMap::new()),
            faults: RwLock::new(Faults::default()),
            secrets,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            public_url: public_url.trim_end_matches('/').to_owned(),
            metrics: Metrics::new("payment-gateway-sim"),
            tasks: service_kit::http::TaskTracker::new(),
        }))
    }

    pub fn router(self: &Arc<Sim>) -> Router {
        let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
            .routes(routes!(create_payment))
            .routes(routes!(query_payment))
            .routes(routes!(query_transaction))
            .routes(routes!(close))
            .routes(routes!(merchant_close))
            .routes(routes!(put_payment_faults))
            .routes(routes!(refund))
            .routes(routes!(query_refund))
            .routes(routes!(pay))
            .routes(routes!(inspect))
            .routes(routes!(inspect_all))
            .routes(routes!(ledger))
            .routes(routes!(get_faults, put_faults))
            .with_state(SimState(self.clone()))
            .split_for_parts();
        let api = api.route("/openapi.json", get(move || async move { Json(doc) }));
        let ready = service_kit::http::ready_check(|| async { Ok(()) });
        service_kit::http::finish(api, self.metrics.clone(), ready)
    }

    fn faults(&self) -> Faults {
        self.faults
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn with_payment<T>(&self, id: &str, f: impl FnOnce(&mut SimPayment) -> T) -> Option<T> {
        let mut map = self.payments.lock().unwrap_or_else(|p| p.into_inner());
        map.get_mut(id).map(f)
    }
}

/// The query APIs' faults: a 500 (`query_error_rate`) or a late answer (`query_timeout_rate`).
async fn query_faults(f: &Faults) -> Result<(), ApiError> {
    if fastrand::f64() < f.query_error_rate {
        return Err(ApiError::new(
            ErrorCode::Internal,
            "simulated provider error",
        ));
    }
    if fastrand::f64() < f.query_timeout_rate {
        tokio::time::sleep(Duration::from_millis(f.query_timeout_ms)).await;
    }
    Ok(())
}

fn provider(s: &str) -> Result<Provider, ApiError> {
    s.parse().map_err(|_| ApiError::not_found("provider"))
}

#[utoipa::path(post, path = "/v1/{provider}/payments", tag = "provider",
    params(("provider" = String, Path, description = "wechat, alipay or douyin")), request_body = CreatePayment,
    responses((status = 201, body = CreatedPayment), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn create_payment(
    State(s): State<SimState>,
    Path(p): Path<String>,
    ApiJson(req): ApiJson<CreatePayment>,
) -> Result<(StatusCode, Json<CreatedPayment>), ApiError> {
    let p = provider(&p)?;
    if req.amount_cents < 0 {
        return Err(ApiError::field("amount_cents", "must not be negative"));
    }
    if req.payment_id.is_empty()
        || req.payment_id.len() > 64
        || !req
            .payment_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(ApiError::field(
            "payment_id",
            "must be 1 to 64 characters of A-Z, a-z, 0-9, '-'",
        ));
    }
    let pay_url = format!("{}/v1/sim/payments/{}/pay", s.0.public_url, req.payment_id);
    let mut map = s.0.payments.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(req.payment_id.clone())
        .or_insert_with(|| SimPayment {
            payment_id: req.payment_id.clone(),
            provider: p.as_str().to_owned(),
            order_id: req.order_id.clone(),
            amount_cents: req.amount_cents,
            notify_url: req.notify_url.clone(),
            status: "CREATED".into(),
            event_id: None,
            paid_at: None,
            transaction_id: None,
            query_broken: false,
            refund_refused: false,
            callback_dropped: false,
            callbacks_planned: 0,
            callbacks_acknowledged: 0,
            callback_attempts: 0,
            refunds: Vec::new(),
        });
    Ok((StatusCode::CREATED, Json(CreatedPayment { pay_url })))
}

#[utoipa::path(get, path = "/v1/{provider}/payments/{payment_id}", tag = "provider",
    description = "The query API. Faults: `query_error_rate` (500), `query_timeout_rate` (late answer), a payment's `query_broken` (500).",
    params(("provider" = String, Path, description = "wechat, alipay or douyin"), ("payment_id" = String, Path)),
    responses((status = 200, body = PaymentQuery), (status = 404, body = ErrorBody), (status = 500, body = ErrorBody)))]
async fn query_payment(
    State(s): State<SimState>,
    Path((p, id)): Path<(String, String)>,
) -> Result<Json<PaymentQuery>, ApiError> {
    let p = provider(&p)?;
    query_faults(&s.0.faults()).await?;
    let found =
        s.0.with_payment(&id, |sp| sp.clone())
            .filter(|sp| sp.provider == p.as_str())
            .ok_or_else(|| ApiError::not_found("payment"))?;
    if found.query_broken {
        return Err(ApiError::new(
            ErrorCode::Internal,
            "simulated provider error (this payment's query is broken)",
        ));
    }
    Ok(Json(query_answer(found)))
}

/// The query API by the provider's transaction id: the way round a broken query by payment
/// id (`query_broken` does not apply here).
#[utoipa::path(get, path = "/v1/{provider}/transactions/{transaction_id}", tag = "provider",
    description = "The query API by the provider's transaction id. Faults: `query_error_rate`, `query_timeout_rate`.",
    params(("provider" = String, Path, description = "wechat, alipay or douyin"), ("transaction_id" = String, Path)),
    responses((status = 200, body = PaymentQuery), (status = 404, body = ErrorBody), (status = 500, body = ErrorBody)))]
async fn query_transaction(
    State(s): State<SimState>,
    Path((p, txn)): Path<(String, String)>,
) -> Result<Json<PaymentQuery>, ApiError> {
    let p = provider(&p)?;
    query_faults(&s.0.faults()).await?;
    let found = {
        let map = s.0.payments.lock().unwrap_or_else(|e| e.into_inner());
        map.values()
            .find(|sp| sp.provider == p.as_str() && sp.transaction_id.as_deref() == Some(&txn))
            .cloned()
    };
    found
        .map(|sp| Json(query_answer(sp)))
        .ok_or_else(|| ApiError::not_found("transaction"))
}

fn query_answer(sp: SimPayment) -> PaymentQuery {
    PaymentQuery {
        payment_id: sp.payment_id,
        status: sp.status,
        transaction_id: sp.transaction_id,
        amount_cents: sp.amount_cents,
        event_id: sp.event_id,
        paid_at: sp.paid_at,
    }
}

/// The merchant closes an unpaid payment (WeChat Pay's "close order"): it can never be paid
/// after. Closing a closed one answers it again; a paid one answers 409.
#[utoipa::path(post, path = "/v1/{provider}/payments/{payment_id}/close", tag = "provider",
    description = "Close an unpaid payment. Faults: `query_error_rate` (500), `query_timeout_rate` (late answer).",
    params(("provider" = String, Path, description = "wechat, alipay or douyin"), ("payment_id" = String, Path)),
    responses((status = 200, body = PaymentQuery), (status = 404, body = ErrorBody), (status = 409, description = "already paid", body = ErrorBody), (status = 500, body = ErrorBody)))]
async fn merchant_close(
    State(s): State<SimState>,
    Path((p, id)): Path<(String, String)>,
) -> Result<Json<PaymentQuery>, ApiError> {
    let p = provider(&p)?;
    query_faults(&s.0.faults()).await?;
    s.0.with_payment(&id, |sp| {
        if sp.provider != p.as_str() {
            return Err(ApiError::not_found("payment"));
        }
        if sp.status == "PAID" {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "payment is already paid",
            ));
        }
        if sp.status == "CREATED" {
            sp.status = "CLOSED".into();
        }
        Ok(query_answer(sp.clone()))
    })
    .ok_or_else(|| ApiError::not_found("payment"))?
    .map(Json)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloseRequest {
    /// `CLOSED` (the buyer gave up) or `FAILED` (it failed at the provider).
    pub status: String,
}

/// The provider closes an unpaid payment: it will never be paid (409 if it already was).
#[utoipa::path(post, path = "/v1/sim/payments/{payment_id}/close", tag = "simulation",
    params(("payment_id" = String, Path)), request_body = CloseRequest,
    responses((status = 200, body = SimPayment), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn close(
    State(s): State<SimState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CloseRequest>,
) -> Result<Json<SimPayment>, ApiError> {
    if !matches!(req.status.as_str(), "CLOSED" | "FAILED") {
        return Err(ApiError::field("status", "must be CLOSED or FAILED"));
    }
    s.0.with_payment(&id, |sp| {
        if sp.status == "PAID" {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "payment is already paid",
            ));
        }
        sp.status = req.status.clone();
        Ok(sp.clone())
    })
    .ok_or_else(|| ApiError::not_found("payment"))?
    .map(Json)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentFaults {
    /// The query by payment id answers 500 for this payment until set back to false.
    #[serde(default)]
    pub query_broken: bool,
    /// The refund API refuses this payment's refunds (409) until set back to false.
    #[serde(default)]
    pub refund_refused: bool,
}

/// Faults of one payment (on top of the global rates).
#[utoipa::path(put, path = "/v1/sim/payments/{payment_id}/faults", tag = "simulation",
    params(("payment_id" = String, Path)), request_body = PaymentFaults,
    responses((status = 200, body = SimPayment), (status = 404, body = ErrorBody)))]
async fn put_payment_faults(
    State(s): State<SimState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<PaymentFaults>,
) -> Result<Json<SimPayment>, ApiError> {
    s.0.with_payment(&id, |sp| {
        sp.query_broken = req.query_broken;
        sp.refund_refused = req.refund_refused;
        sp.clone()
    })
    .map(Json)
    .ok_or_else(|| ApiError::not_found("payment"))
}

/// The refund API: pays `amount_cents` back on a paid payment, once per refund id (the same
/// id again answers the refund already made, whatever its amount). Refunds of one payment
/// never exceed what was paid.
#[utoipa::path(post, path = "/v1/{provider}/refunds", tag = "provider",
    description = "Refund, idempotent by refund_id. Faults: `refund_error_rate` (500, nothing refunded), `refund_timeout_rate` (refunded, but the answer comes late), a payment's `refund_refused` (409).",
    params(("provider" = String, Path, description = "wechat, alipay or douyin")), request_body = RefundRequest,
    responses((status = 200, body = Refund), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "not paid, or more than was paid", body = ErrorBody), (status = 500, body = ErrorBody)))]
async fn refund(
    State(s): State<SimState>,
    Path(p): Path<String>,
    ApiJson(req): ApiJson<RefundRequest>,
) -> Result<Json<Refund>, ApiError> {
    let p = provider(&p)?;
    if req.refund_id.is_empty() || req.refund_id.len() > 64 {
        return Err(ApiError::field("refund_id", "must be 1 to 64 characters"));
    }
    if req.amount_cents <= 0 {
        return Err(ApiError::field("amount_cents", "must be positive"));
    }
    let f = s.0.faults();
    if fastrand::f64() < f.refund_error_rate {
        return Err(ApiError::new(
            ErrorCode::Internal,
            "simulated provider error",
        ));
    }
    let made = {
        let mut map = s.0.payments.lock().unwrap_or_else(|e| e.into_inner());
        // a refund id is paid once, whichever payment it names
        let earlier = map
            .values()
            .flat_map(|sp| sp.refunds.iter())
            .find(|r| r.refund_id == req.refund_id)
            .cloned();
        match earlier {
            Some(r) => r,
            None => {
                let sp = map
                    .get_mut(&req.payment_id)
                    .filter(|sp| sp.provider == p.as_str())
                    .ok_or_else(|| ApiError::not_found("payment"))?;
                if sp.status != "PAID" {
                    return Err(ApiError::new(ErrorCode::Conflict, "payment is not paid"));
                }
                if sp.refund_refused {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        "refund refused for this payment (simulated)",
                    ));
                }
                // checked: a huge amount must be refused, not wrap around past the check
                let refunded = sp
                    .refunds
                    .iter()
                    .try_fold(0i64, |sum, r| sum.checked_add(r.amount_cents))
                    .unwrap_or(i64::MAX);
                let after = refunded.checked_add(req.amount_cents);
                if after.is_none_or(|total| total > sp.amount_cents) {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!(
                            "refunds would exceed the {} paid ({refunded} already refunded)",
                            sp.amount_cents
                        ),
                    ));
                }
                let r = Refund {
                    refund_id: req.refund_id.clone(),
                    payment_id: req.payment_id.clone(),
                    amount_cents: req.amount_cents,
                    status: "SUCCESS".into(),
                    refunded_at: Utc::now(),
                };
                sp.refunds.push(r.clone());
                tracing::info!(refund_id = %r.refund_id, payment_id = %r.payment_id, amount_cents = r.amount_cents, "refund paid");
                r
            }
        }
    };
    if fastrand::f64() < f.refund_timeout_rate {
        tokio::time::sleep(Duration::from_millis(f.query_timeout_ms)).await;
    }
    Ok(Json(made))
}

#[utoipa::path(get, path = "/v1/{provider}/refunds/{refund_id}", tag = "provider",
    description = "The refund-query API: 404 if this refund id was never paid. Faults: as the payment query.",
    params(("provider" = String, Path, description = "wechat, alipay or douyin"), ("refund_id" = String, Path)),
    responses((status = 200, body = Refund), (status = 404, body = ErrorBody), (status = 500, body = ErrorBody)))]
async fn query_refund(
    State(s): State<SimState>,
    Path((p, id)): Path<(String, String)>,
) -> Result<Json<Refund>, ApiError> {
    let p = provider(&p)?;
    query_faults(&s.0.faults()).await?;
    let map = s.0.payments.lock().unwrap_or_else(|e| e.into_inner());
    map.values()
        .filter(|sp| sp.provider == p.as_str())
        .flat_map(|sp| sp.refunds.iter())
        .find(|r| r.refund_id == id)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::not_found("refund"))
}

/// The buyer pays: the payment becomes PAID and its callback goes out under the current
/// faults. Paying twice, or paying a closed payment, changes nothing and reports its state.
#[utoipa::path(post, path = "/v1/sim/payments/{payment_id}/pay", tag = "simulation",
    description = "The buyer pays: the payment becomes PAID and its signed callback goes out under the current faults.",
    params(("payment_id" = String, Path)),
    responses((status = 200, body = SimPayment), (status = 404, body = ErrorBody)))]
async fn pay(
    State(s): State<SimState>,
    Path(id): Path<String>,
) -> Result<Json<SimPayment>, ApiError> {
    let faults = s.0.faults();
    let (snapshot, newly_paid) =
        s.0.with_payment(&id, |sp| {
            if sp.status != "CREATED" {
                return (sp.clone(), false);
            }
            sp.status = "PAID".into();
            sp.transaction_id = Some(format!("txn_{}", uuid::Uuid::new_v4().simple()));
            sp.event_id = Some(format!(
                "evt_{}_{}",
                sp.provider,
                uuid::Uuid::new_v4().simple()
            ));
            sp.paid_at = Some(Utc::now());
            if fastrand::f64() < faults.drop_rate {
                sp.callback_dropped = true;
            } else {
                let dups = if fastrand::f64() < faults.duplicate_rate {
                    faults.duplicate_count
                } else {
                    0
                };
                sp.callbacks_planned = 1 + dups;
            }
            (sp.clone(), true)
        })
        .ok_or_else(|| ApiError::not_found("payment"))?;
    if newly_paid {
        if snapshot.callback_dropped {
            tracing::info!(payment_id = %id, "callback dropped (fault)");
        }
        for _ in 0..snapshot.callbacks_planned {
            let sim = s.0.clone();
            let p = snapshot.clone();
            let f = faults.clone();
            s.0.tasks.spawn(async move { deliver(sim, p, f).await });
        }
    }
    Ok(Json(snapshot))
}

/// Sends one callback copy, retrying on 5xx / network errors with exponential backoff.
async fn deliver(sim: Arc<Sim>, p: SimPayment, f: Faults) {
    if fastrand::f64() < f.delay_rate && f.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=f.delay_ms))).await;
    }
    let Ok(provider) = p.provider.parse::<Provider>() else {
        return;
    };
    let note = PaymentNotification {
        event_id: p.event_id.clone().unwrap_or_default(),
        payment_id: p.payment_id.clone(),
        order_id: p.order_id.clone(),
        amount_cents: p.amount_cents,
        status: "SUCCESS".into(),
        paid_at: p.paid_at.unwrap_or_else(Utc::now),
    };
    let body = serde_json::to_vec(&note).expect("notification serialises");
    for attempt in 0..f.callback_attempts {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt.min(6))).await;
        }
        let ts = Utc::now().timestamp().to_string();
        let sig = gateway_protocol::sign(sim.secrets.get(provider), &ts, &body);
        sim.with_payment(&p.payment_id, |sp| sp.callback_attempts += 1);
        let sent = sim
            .http
            .post(&p.notify_url)
            .header("Content-Type", "application/json")
            .header(gateway_protocol::timestamp_header(provider), &ts)
            .header(gateway_protocol::signature_header(provider), &sig)
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                sim.with_payment(&p.payment_id, |sp| sp.callbacks_acknowledged += 1);
                return;
            }
            Ok(r) if r.status().is_client_error() => {
                tracing::warn!(payment_id = %p.payment_id, status = %r.status(), "callback refused; not retrying");
                return;
            }
            Ok(r) => {
                tracing::info!(payment_id = %p.payment_id, status = %r.status(), attempt, "callback failed; will retry")
            }
            Err(e) => {
                tracing::info!(payment_id = %p.payment_id, error = %e, attempt, "callback failed; will retry")
            }
        }
    }
    tracing::warn!(payment_id = %p.payment_id, "callback gave up");
}

#[utoipa::path(get, path = "/v1/sim/payments/{payment_id}", tag = "simulation",
    params(("payment_id" = String, Path)),
    responses((status = 200, body = SimPayment), (status = 404, body = ErrorBody)))]
async fn inspect(
    State(s): State<SimState>,
    Path(id): Path<String>,
) -> Result<Json<SimPayment>, ApiError> {
    s.0.with_payment(&id, |sp| sp.clone())
        .map(Json)
        .ok_or_else(|| ApiError::not_found("payment"))
}

#[utoipa::path(get, path = "/v1/sim/payments", tag = "simulation",
    description = "Every payment the simulator holds, paid or not, with its refunds (what a money checker compares with the system's books).",
    responses((status = 200, body = [SimPayment])))]
async fn inspect_all(State(s): State<SimState>) -> Json<Vec<SimPayment>> {
    let payments = s.0.payments.lock().unwrap_or_else(|p| p.into_inner());
    Json(payments.values().cloned().collect())
}

/// A page of the ledger: [`ledger`]'s query and answer.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LedgerQuery {
    /// Payments whose id sorts after this one (the previous page's `next_after`).
    pub after: Option<String>,
    /// At most this many (1 to 10000; default 1000).
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LedgerPage {
    pub payments: Vec<SimPayment>,
    /// Where the next page starts; absent on the last page.
    pub next_after: Option<String>,
}

#[utoipa::path(get, path = "/v1/sim/ledger", tag = "simulation",
    description = "Every payment the simulator holds with its refunds, in payment id order, a page at a time: a checker reads a large run's books without one huge answer.",
    params(LedgerQuery),
    responses((status = 200, body = LedgerPage), (status = 400, body = ErrorBody)))]
async fn ledger(
    State(s): State<SimState>,
    axum::extract::Query(q): axum::extract::Query<LedgerQuery>,
) -> Result<Json<LedgerPage>, ApiError> {
    let limit = q.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::field("limit", "must be 1 to 10000"));
    }
    let payments = s.0.payments.lock().unwrap_or_else(|p| p.into_inner());
    use std::ops::Bound;
    let from = match &q.after {
        Some(a) => Bound::Excluded(a.clone()),
        None => Bound::Unbounded,
    };
    let mut page: Vec<&SimPayment> = payments
        .range((from, Bound::Unbounded))
        .map(|(_, p)| p)
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let next_after = more.then(|| page[page.len() - 1].payment_id.clone());
    Ok(Json(LedgerPage {
        payments: page.into_iter().cloned().collect(),
        next_after,
    }))
}

#[utoipa::path(get, path = "/v1/sim/faults", tag = "simulation", responses((status = 200, body = Faults)))]
async fn get_faults(State(s): State<SimState>) -> Json<Faults> {
    Json(s.0.faults())
}

#[utoipa::path(put, path = "/v1/sim/faults", tag = "simulation", request_body = Faults,
    responses((status = 200, body = Faults), (status = 400, body = ErrorBody)))]
async fn put_faults(
    State(s): State<SimState>,
    ApiJson(f): ApiJson<Faults>,
) -> Result<Json<Faults>, ApiError> {
    f.validate()?;
    *s.0.faults.write().unwrap_or_else(|p| p.into_inner()) = f.clone();
    tracing::info!(faults = ?f, "faults set");
    Ok(Json(f))
}
