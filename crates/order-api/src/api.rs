//! The JSON contract of order-api, and how use-case errors become HTTP answers.

use chrono::{DateTime, Utc};
use fulfillment::FulfillmentError;
use postgres_store::orders::OrderRow;
use serde::{Deserialize, Serialize};
use service_kit::{ApiError, ErrorCode};
use utoipa::ToSchema;

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateOrderRequest {
    #[schema(example = "sku-123")]
    pub sku_id: String,
    #[schema(example = "store-7")]
    pub store_id: String,
    /// Units to buy, 1 to `ORDER_MAX_QUANTITY` (default 20).
    #[schema(example = 2, minimum = 1)]
    pub quantity: u32,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderView {
    pub order_id: String,
    /// PENDING, PAID, CONFIRMED, REDEEMED, EXPIRED, CANCELLED, REFUND_PENDING or REFUNDED.
    #[schema(example = "PENDING")]
    pub state: String,
    /// Bumped by every state change (optimistic concurrency).
    pub version: i32,
    pub sku_id: String,
    pub store_id: String,
    pub quantity: i32,
    pub amount_cents: i64,
    /// When the stock pre-lock lapses unless the order is paid.
    pub expires_at: DateTime<Utc>,
    /// The code to show at the bar, once the voucher is issued (a few seconds after payment).
    pub voucher_code: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl OrderView {
    pub fn with_voucher(o: OrderRow, voucher_code: Option<String>) -> Self {
        OrderView {
            voucher_code,
            ..o.into()
        }
    }
}

impl From<OrderRow> for OrderView {
    fn from(o: OrderRow) -> Self {
        OrderView {
            voucher_code: None,
            order_id: o.id.to_string(),
            state: o.state.as_str().to_owned(),
            version: o.version,
            sku_id: o.sku_id,
            store_id: o.store_id,
            quantity: o.quantity,
            amount_cents: o.amount_cents,
            expires_at: o.expires_at,
            created_at: o.created_at,
            updated_at: o.updated_at,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct StartPaymentRequest {
    /// `wechat`, `alipay` or `douyin`.
    #[schema(example = "wechat")]
    pub provider: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PaymentStarted {
    pub payment_id: String,
    /// Where the buyer completes the payment at the provider.
    pub pay_url: String,
    pub provider: String,
    pub amount_cents: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CallbackAck {
    /// PAID, REFUND_REQUIRED or DUPLICATE.
    pub result: String,
}

/// The one mapping from use-case errors to the house error body.
pub fn api_error(e: FulfillmentError) -> ApiError {
    use FulfillmentError as F;
    match e {
        F::Validation { field, message } => ApiError::field(field, message),
        F::UnknownSku => ApiError::new(ErrorCode::UnknownSku, "sku_id: no such SKU"),
        F::NotFound => ApiError::not_found("order"),
        F::OtherStore => ApiError::new(
            ErrorCode::Forbidden,
            "this voucher belongs to another store: a store token redeems its own store's only",
        ),
        F::Shortage { available } => ApiError::new(
            ErrorCode::StockShortage,
            format!("not enough stock to pre-lock ({available} available); refresh or pick another store"),
        ),
        F::PurchaseLimit { holds, limit, quantity } => ApiError::new(
            ErrorCode::PurchaseLimit,
            format!("this SKU is limited to {limit} per buyer: you hold {holds} in live and paid orders, so {quantity} more is too many"),
        ),
        F::IdempotencyMismatch => ApiError::new(
            ErrorCode::IdempotencyMismatch,
            "Idempotency-Key was already used with a different request body",
        ),
        F::InvalidTransition { state } => {
            ApiError::new(ErrorCode::InvalidTransition, format!("order is {state}"))
        }
        F::OrderExpired => ApiError::new(ErrorCode::OrderExpired, "the stock pre-lock of this order has lapsed"),
        F::Conflict => ApiError::new(ErrorCode::Conflict, "the order changed concurrently; retry"),
        F::UnknownPayment => ApiError::new(ErrorCode::UnknownPayment, "unknown payment"),
        F::AmountMismatch { expected, got } => ApiError::new(
            ErrorCode::AmountMismatch,
            format!("amount_cents {got} does not match the payment's {expected}"),
        ),
        F::PrelockNotLoaded => ApiError::new(
            ErrorCode::PrelockUnavailable,
            "stock pre-lock is being rebuilt; retry shortly",
        ),
        F::PrelockUnavailable(m) => {
            tracing::warn!(error = %m, "pre-lock unavailable");
            ApiError::new(ErrorCode::PrelockUnavailable, "stock pre-lock unavailable; retry shortly")
        }
        F::Db(e) => db_error(e),
    }
}

/// A database failure: 503 with `Retry-After` when Postgres is down, slow or overloaded.
pub fn db_error(e: postgres_store::sqlx::Error) -> ApiError {
    let transient = postgres_store::is_transient(&e);
    ApiError::dependency(e, transient)
}

/// Label for `orders_created_total` / `prelock_calls_total`.
pub fn outcome_label(e: &FulfillmentError) -> &'static str {
    use FulfillmentError as F;
    match e {
        F::Validation { .. } | F::UnknownSku => "invalid",
        F::Shortage { .. } => "shortage",
        F::PurchaseLimit { .. } => "purchase_limit",
        F::IdempotencyMismatch => "idempotency_mismatch",
        F::PrelockNotLoaded => "not_loaded",
        F::PrelockUnavailable(_) => "timeout",
        F::Db(_) => "error",
        _ => "other",
    }
}
