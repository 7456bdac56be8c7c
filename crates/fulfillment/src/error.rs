//! Errors of the use cases: each variant is something a caller answers differently.

use domain::OrderState;

#[derive(Debug, thiserror::Error)]
pub enum FulfillmentError {
    #[error("{field}: {message}")]
    Validation {
        field: &'static str,
        message: String,
    },
    #[error("unknown SKU")]
    UnknownSku,
    #[error("not found")]
    NotFound,
    /// The voucher is another store's: a bar redeems its own only.
    #[error("this voucher belongs to another store")]
    OtherStore,
    #[error("not enough stock to pre-lock ({available} available)")]
    Shortage { available: i64 },
    #[error("at most {limit} per buyer: you hold {holds}, and {quantity} more would pass it")]
    PurchaseLimit {
        holds: u32,
        limit: u32,
        quantity: u32,
    },
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyMismatch,
    #[error("order is {state}")]
    InvalidTransition { state: OrderState },
    #[error("the pre-lock of this order has lapsed")]
    OrderExpired,
    #[error("the order changed concurrently; retry")]
    Conflict,
    #[error("unknown payment")]
    UnknownPayment,
    #[error("amount {got} does not match the payment's {expected}")]
    AmountMismatch { expected: i64, got: i64 },
    /// The SKU's Redis state is being rebuilt; retrying shortly succeeds.
    #[error("the SKU's pre-lock state is being rebuilt")]
    PrelockNotLoaded,
    #[error("stock pre-lock unavailable: {0}")]
    PrelockUnavailable(String),
    #[error(transparent)]
    Db(#[from] postgres_store::sqlx::Error),
}

impl From<postgres_store::orders::TransitionFailure> for FulfillmentError {
    fn from(f: postgres_store::orders::TransitionFailure) -> Self {
        use postgres_store::orders::TransitionFailure::*;
        match f {
            Illegal(e) => FulfillmentError::InvalidTransition { state: e.from },
            Conflict => FulfillmentError::Conflict,
            Db(e) => FulfillmentError::Db(e),
        }
    }
}

impl From<domain::ports::PrelockError> for FulfillmentError {
    fn from(e: domain::ports::PrelockError) -> Self {
        use domain::ports::PrelockError::*;
        match e {
            UnknownSku => FulfillmentError::UnknownSku,
            Mismatch => FulfillmentError::IdempotencyMismatch,
            NotLoaded => FulfillmentError::PrelockNotLoaded,
            Unavailable(m) | Unreachable(m) => FulfillmentError::PrelockUnavailable(m),
        }
    }
}
