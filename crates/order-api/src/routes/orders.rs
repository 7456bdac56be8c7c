//! `POST /v1/orders`, `GET /v1/orders/{order_id}`, `POST /v1/orders/{order_id}/cancel`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use domain::{SkuId, StoreId, UserId};
use fulfillment::orders::CreateOrder;
use service_kit::auth::AuthUser;
use service_kit::error::ErrorBody;
use service_kit::http::ApiJson;
use service_kit::limit::ClientAddr;
use service_kit::ApiError;
use tracing::Instrument;

use super::parse_order_id;
use crate::api::{api_error, outcome_label, CreateOrderRequest, OrderView};
use crate::AppState;

pub(crate) fn user_id(user: &AuthUser) -> Result<UserId, ApiError> {
    UserId::parse(&user.0).map_err(|e| {
        ApiError::new(
            service_kit::ErrorCode::Unauthorized,
            format!("token sub {e}"),
        )
    })
}

/// "Buy now": pre-locks stock and creates a PENDING order.
///
/// The same `Idempotency-Key` (per user) returns the same order, with header
/// `Idempotent-Replayed: true`; with a different body it is refused.
#[utoipa::path(
    post,
    path = "/v1/orders",
    tag = "orders",
    request_body = CreateOrderRequest,
    params(("Idempotency-Key" = String, Header, description = "Client-chosen key, 1-128 printable ASCII characters")),
    responses(
        (status = 201, description = "Order created (or replayed)", body = OrderView),
        (status = 400, description = "ERR_VALIDATION / ERR_MALFORMED_JSON, naming the field", body = ErrorBody),
        (status = 401, description = "ERR_UNAUTHORIZED", body = ErrorBody),
        (status = 409, description = "ERR_STOCK_SHORTAGE_PRELOCK / ERR_PURCHASE_LIMIT", body = ErrorBody),
        (status = 422, description = "ERR_UNKNOWN_SKU / ERR_IDEMPOTENCY_MISMATCH", body = ErrorBody),
        (status = 429, description = "ERR_RATE_LIMITED (with Retry-After)", body = ErrorBody),
        (status = 503, description = "ERR_PRELOCK_UNAVAILABLE (with Retry-After)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_order(
    State(s): State<AppState>,
    user: AuthUser,
    from: ClientAddr,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateOrderRequest>,
) -> Result<Response, ApiError> {
    let app = &s.0;
    let user = user_id(&user)?;
    app.limits.buyer_request(user.as_str(), &from)?;
    let key = headers
        .get("Idempotency-Key")
        .ok_or_else(|| ApiError::field("Idempotency-Key", "header is required"))?
        .to_str()
        .map_err(|_| ApiError::field("Idempotency-Key", "must be printable ASCII"))?;
    let req = CreateOrder {
        sku_id: SkuId::parse(&body.sku_id).map_err(|e| ApiError::field("sku_id", e))?,
        store_id: StoreId::parse(&body.store_id).map_err(|e| ApiError::field("store_id", e))?,
        quantity: body.quantity,
    };
    match app.fulfillment.create_order(&user, key, req).await {
        Ok(created) => {
            let outcome = if created.replayed {
                "replayed"
            } else {
                "created"
            };
            app.api_metrics.orders.with_label_values(&[outcome]).inc();
            if !created.replayed {
                // a replay answered from the row never called the pre-lock
                app.api_metrics
                    .prelock_calls
                    .with_label_values(&["ok"])
                    .inc();
            }
            let mut resp =
                (StatusCode::CREATED, Json(OrderView::from(created.order))).into_response();
            if created.replayed {
                resp.headers_mut()
                    .insert("Idempotent-Replayed", HeaderValue::from_static("true"));
            }
            Ok(resp)
        }
        Err(e) => {
            let label = outcome_label(&e);
            app.api_metrics.orders.with_label_values(&[label]).inc();
            if matches!(label, "timeout" | "not_loaded" | "shortage") {
                app.api_metrics
                    .prelock_calls
                    .with_label_values(&[label])
                    .inc();
            }
            Err(api_error(e))
        }
    }
}

/// The buyer's own order. Anyone else's answers 404.
#[utoipa::path(
    get,
    path = "/v1/orders/{order_id}",
    tag = "orders",
    params(("order_id" = String, Path, description = "Order id (UUID)")),
    responses(
        (status = 200, body = OrderView),
        (status = 404, description = "ERR_NOT_FOUND (also for another user's order)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_order(
    State(s): State<AppState>,
    user: AuthUser,
    Path(order_id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let user = user_id(&user)?;
    let id = parse_order_id(&order_id)?;
    let order =
        s.0.fulfillment
            .owned_order(&user, id)
            .await
            .map_err(api_error)?;
    let voucher = postgres_store::vouchers::of_order(&s.0.fulfillment.store.pool, order.id)
        .await
        .map_err(crate::api::db_error)?;
    Ok(Json(OrderView::with_voucher(
        order,
        voucher.map(|v| v.code),
    )))
}

/// The bar redeems a buyer's voucher (a store token: a staff token with the `store` role
/// and the bar's `store_id`): the order goes CONFIRMED -> REDEEMED. Another store's voucher
/// answers 403; a second redemption 409.
#[utoipa::path(
    post,
    path = "/v1/vouchers/{code}/redeem",
    tag = "vouchers",
    params(("code" = String, Path, description = "The voucher code the buyer shows")),
    responses(
        (status = 200, description = "Now REDEEMED", body = OrderView),
        (status = 401, body = ErrorBody),
        (status = 403, description = "ERR_FORBIDDEN: another store's voucher, or a token that is not a store token", body = ErrorBody),
        (status = 404, description = "ERR_NOT_FOUND: no such voucher", body = ErrorBody),
        (status = 409, description = "ERR_INVALID_TRANSITION: already redeemed, or not confirmed yet", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn redeem_voucher(
    State(s): State<AppState>,
    staff: service_kit::auth::StoreStaff,
    Path(code): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    if code.len() != 12 || !code.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(ApiError::field("code", "must be 12 letters and digits"));
    }
    let order =
        s.0.fulfillment
            .redeem_voucher(&code.to_ascii_uppercase(), &staff.store_id, &staff.staff)
            .await
            .map_err(|e| match e {
                fulfillment::FulfillmentError::NotFound => ApiError::not_found("voucher"),
                e => api_error(e),
            })?;
    Ok(Json(OrderView::with_voucher(
        order,
        Some(code.to_ascii_uppercase()),
    )))
}

/// Cancels a PENDING order and releases its stock.
#[utoipa::path(
    post,
    path = "/v1/orders/{order_id}/cancel",
    tag = "orders",
    params(("order_id" = String, Path, description = "Order id (UUID)")),
    responses(
        (status = 200, description = "Now CANCELLED", body = OrderView),
        (status = 404, body = ErrorBody),
        (status = 409, description = "ERR_INVALID_TRANSITION: the order is not PENDING", body = ErrorBody),
        (status = 429, description = "ERR_RATE_LIMITED (with Retry-After)", body = ErrorBody),
        (status = 503, description = "ERR_PRELOCK_UNAVAILABLE", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn cancel_order(
    State(s): State<AppState>,
    user: AuthUser,
    from: ClientAddr,
    Path(order_id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let user = user_id(&user)?;
    s.0.limits.buyer_request(user.as_str(), &from)?;
    let id = parse_order_id(&order_id)?;
    // the cancellation (its release, its event) is part of the order's trace
    let order_trace = postgres_store::orders::order_traceparent(&s.0.fulfillment.store.pool, id.0)
        .await
        .map_err(crate::api::db_error)?;
    let span = service_kit::trace::follow(
        tracing::info_span!("order.cancel", order_id = %id),
        order_trace.as_deref(),
    );
    let order =
        s.0.fulfillment
            .cancel_order(&user, id)
            .instrument(span)
            .await
            .map_err(api_error)?;
    Ok(Json(order.into()))
}
