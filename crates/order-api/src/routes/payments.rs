//! `POST /v1/orders/{order_id}/payments` (start paying) and
//! `POST /v1/payments/{provider}/callback` (the provider's signed webhook).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use chrono::Utc;
use domain::{OrderState, Provider};
use fulfillment::events;
use fulfillment::payments::{ApplyOutcome, PaymentConfirmation, Source};
use fulfillment::FulfillmentError;
use gateway_protocol::{CreatePayment, GatewayError, PaymentNotification, SignatureError};
use postgres_store::payments as pay_store;
use service_kit::auth::AuthUser;
use service_kit::error::ErrorBody;
use service_kit::http::ApiJson;
use service_kit::limit::ClientAddr;
use service_kit::{trace, ApiError, ErrorCode};
use tracing::Instrument;
use uuid::Uuid;

use super::orders::user_id;
use super::parse_order_id;
use crate::api::{api_error, db_error, CallbackAck, PaymentStarted, StartPaymentRequest};
use crate::AppState;

fn parse_provider(s: &str) -> Result<Provider, ApiError> {
    s.parse().map_err(|e| ApiError::field("provider", e))
}

/// Starts paying a PENDING order at a provider; returns where the buyer pays. Asking twice
/// for one provider returns the same open payment.
#[utoipa::path(
    post,
    path = "/v1/orders/{order_id}/payments",
    tag = "payments",
    params(("order_id" = String, Path, description = "Order id (UUID)")),
    request_body = StartPaymentRequest,
    responses(
        (status = 201, body = PaymentStarted),
        (status = 400, description = "ERR_VALIDATION (unknown provider)", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "ERR_INVALID_TRANSITION (not PENDING) / ERR_ORDER_EXPIRED", body = ErrorBody),
        (status = 429, description = "ERR_RATE_LIMITED (with Retry-After)", body = ErrorBody),
        (status = 502, description = "ERR_GATEWAY_UNAVAILABLE", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn start_payment(
    State(s): State<AppState>,
    user: AuthUser,
    from: ClientAddr,
    Path(order_id): Path<String>,
    ApiJson(body): ApiJson<StartPaymentRequest>,
) -> Result<(StatusCode, Json<PaymentStarted>), ApiError> {
    let app = &s.0;
    let user = user_id(&user)?;
    app.limits.buyer_request(user.as_str(), &from)?;
    let id = parse_order_id(&order_id)?;
    let provider = parse_provider(&body.provider)?;
    let order = app
        .fulfillment
        .owned_order(&user, id)
        .await
        .map_err(api_error)?;
    if order.state != OrderState::Pending {
        return Err(api_error(FulfillmentError::InvalidTransition {
            state: order.state,
        }));
    }
    // by the clock that set the expiry (the pre-lock store's), never this process's own
    let now_ms = domain::ports::StockPrelock::clock_ms(&app.fulfillment.prelock)
        .await
        .map_err(|e| api_error(e.into()))?;
    if order.expires_at.timestamp_millis() <= now_ms {
        return Err(api_error(FulfillmentError::OrderExpired));
    }
    // the payment is part of the order's trace: its rows (the check job) carry that context
    let span = trace::follow(
        tracing::info_span!("order.pay", order_id = %order.id, %provider),
        order.traceparent.as_deref(),
    );
    start_at_gateway(app, &order, provider)
        .instrument(span)
        .await
}

async fn start_at_gateway(
    app: &crate::App,
    order: &postgres_store::orders::OrderRow,
    provider: Provider,
) -> Result<(StatusCode, Json<PaymentStarted>), ApiError> {
    let started = |p: pay_store::PaymentRow| PaymentStarted {
        payment_id: p.id.to_string(),
        pay_url: p.pay_url,
        provider: p.provider.as_str().to_owned(),
        amount_cents: p.amount_cents,
    };
    let order_id = order.id;
    if let Some(open) = app
        .fulfillment
        .store
        .retry_dead(|pool| async move { pay_store::open_payment(&pool, order_id, provider).await })
        .await
        .map_err(db_error)?
    {
        return Ok((StatusCode::CREATED, Json(started(open))));
    }
    let payment_id = Uuid::new_v4();
    let notify_url = format!(
        "{}/v1/payments/{provider}/callback",
        app.config.public_url.trim_end_matches('/')
    );
    let created = app
        .gateway
        .create_payment(
            provider,
            &CreatePayment {
                payment_id: payment_id.to_string(),
                order_id: order.id.to_string(),
                amount_cents: order.amount_cents,
                notify_url,
            },
        )
        .await
        .map_err(|e| {
            tracing::warn!(%provider, error = %e, "could not start payment");
            match e {
                GatewayError::Timeout(_) | GatewayError::Unavailable(_) => ApiError::new(
                    ErrorCode::GatewayUnavailable,
                    "payment provider unavailable; retry",
                ),
                GatewayError::Rejected(_) => ApiError::new(
                    ErrorCode::GatewayUnavailable,
                    "payment provider refused the payment",
                ),
            }
        })?;
    // A concurrent call may have opened a payment meanwhile: then that one is the answer
    // (ours stays unused at the provider: its pay_url is never shown, so it is never paid).
    // the payment and its first compensation check commit together: a payment whose
    // callback is lost is always found again
    let mut tx = app.fulfillment.store.begin().await.map_err(db_error)?;
    let payment = pay_store::insert_payment_or_open(
        &mut tx,
        payment_id,
        order.id,
        provider,
        order.amount_cents,
        &created.pay_url,
    )
    .await
    .map_err(db_error)?;
    if payment.id == payment_id {
        // due by the database's clock, whatever this process's own says
        let due = job_engine::RunAt::In(app.config.fulfillment.first_payment_check);
        job_engine::store::insert(&mut tx, &events::payment_check_job(payment_id, due))
            .await
            .map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)?;
    if payment.id == payment_id {
        tracing::info!(order_id = %order.id, %payment_id, %provider, "payment started");
    }
    Ok((StatusCode::CREATED, Json(started(payment))))
}

/// The provider's signed "payment succeeded" webhook. Applies the payment once: duplicates
/// answer 200 `DUPLICATE` and change nothing. A bad signature or a timestamp more than 300 s
/// off answers 401 and changes nothing. Signature headers per provider: see README.md.
#[utoipa::path(
    post,
    path = "/v1/payments/{provider}/callback",
    tag = "payments",
    params(("provider" = String, Path, description = "wechat, alipay or douyin")),
    request_body = PaymentNotification,
    responses(
        (status = 200, body = CallbackAck),
        (status = 400, body = ErrorBody),
        (status = 401, description = "ERR_BAD_SIGNATURE / ERR_STALE_TIMESTAMP", body = ErrorBody),
        (status = 404, description = "ERR_UNKNOWN_PAYMENT", body = ErrorBody),
        (status = 422, description = "ERR_AMOUNT_MISMATCH", body = ErrorBody),
        (status = 429, description = "ERR_RATE_LIMITED: over the webhook budget of the caller's address; the provider should retry", body = ErrorBody),
        (status = 503, description = "ERR_PRELOCK_UNAVAILABLE: the provider should retry", body = ErrorBody),
    )
)]
pub async fn payment_callback(
    State(s): State<AppState>,
    from: ClientAddr,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<CallbackAck>, ApiError> {
    let app = &s.0;
    app.limits.webhook_request(&from)?;
    let provider: Provider = provider
        .parse()
        .map_err(|_| ApiError::not_found("payment provider"))?;
    let count = |outcome: &str| {
        app.api_metrics
            .callbacks
            .with_label_values(&[provider.as_str(), outcome])
            .inc();
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Err(e) = gateway_protocol::verify(
        app.secrets.get(provider),
        header(gateway_protocol::timestamp_header(provider)),
        header(gateway_protocol::signature_header(provider)),
        &body,
        Utc::now(),
    ) {
        count("rejected_signature");
        tracing::warn!(%provider, reason = %e, "callback refused");
        let code = match e {
            SignatureError::Stale => ErrorCode::StaleTimestamp,
            SignatureError::Missing | SignatureError::Bad => ErrorCode::BadSignature,
        };
        return Err(ApiError::new(code, e.to_string()));
    }
    let note: PaymentNotification = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorCode::Validation, format!("callback body: {e}")))?;
    if note.status != "SUCCESS" {
        count("ignored_status");
        return Err(ApiError::field(
            "status",
            "only SUCCESS notifications are accepted",
        ));
    }
    let payment_id = Uuid::parse_str(&note.payment_id)
        .map_err(|_| ApiError::field("payment_id", "must be a UUID"))?;
    let conf = PaymentConfirmation {
        provider,
        event_id: note.event_id,
        payment_id,
        amount_cents: note.amount_cents,
        paid_at: note.paid_at,
    };
    // the callback continues the trace of the order it pays
    let order_trace = pay_store::order_traceparent(&app.fulfillment.store.pool, payment_id)
        .await
        .map_err(db_error)?;
    let span = trace::follow(
        tracing::info_span!("payment.callback", %payment_id, %provider),
        order_trace.as_deref(),
    );
    let applied = app
        .fulfillment
        .apply_payment(&conf, Source::Webhook)
        .instrument(span)
        .await;
    match applied {
        Ok(outcome) => {
            let result = match outcome {
                ApplyOutcome::Paid => "PAID",
                ApplyOutcome::RefundRequired { .. } => "REFUND_REQUIRED",
                ApplyOutcome::Duplicate => "DUPLICATE",
            };
            count(result);
            Ok(Json(CallbackAck {
                result: result.into(),
            }))
        }
        Err(e) => {
            count(crate::api::outcome_label(&e));
            Err(api_error(e))
        }
    }
}
