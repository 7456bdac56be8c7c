//! The one HTTP error: `{"code": "...", "message": "..."}` with a stable code.
//!
//! `ErrorCode::status` is the single table from code to HTTP status. 5xx bodies are opaque:
//! the cause is logged once, here, where the error becomes a response.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Validation,
    MalformedJson,
    Unauthorized,
    BadSignature,
    StaleTimestamp,
    NotFound,
    UnknownSku,
    UnknownPayment,
    StockShortage,
    PurchaseLimit,
    RateLimited,
    Forbidden,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    InvalidTransition,
    OrderExpired,
    Conflict,
    IdempotencyMismatch,
    AmountMismatch,
    StockBelowReserved,
    PrelockUnavailable,
    PrelockNotLoaded,
    GatewayUnavailable,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The code for an error answer that was made without one (a framework rejection, a
    /// timeout, an unknown route), by its status.
    pub fn for_status(status: StatusCode) -> ErrorCode {
        use ErrorCode::*;
        match status.as_u16() {
            401 => Unauthorized,
            403 => Forbidden,
            404 => NotFound,
            405 => MethodNotAllowed,
            408 => RequestTimeout,
            413 => PayloadTooLarge,
            429 => RateLimited,
            503 => Unavailable,
            s if s >= 500 => Internal,
            _ => Validation,
        }
    }

    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Validation => "ERR_VALIDATION",
            MalformedJson => "ERR_MALFORMED_JSON",
            Unauthorized => "ERR_UNAUTHORIZED",
            BadSignature => "ERR_BAD_SIGNATURE",
            StaleTimestamp => "ERR_STALE_TIMESTAMP",
            NotFound => "ERR_NOT_FOUND",
            UnknownSku => "ERR_UNKNOWN_SKU",
            UnknownPayment => "ERR_UNKNOWN_PAYMENT",
            StockShortage => "ERR_STOCK_SHORTAGE_PRELOCK",
            PurchaseLimit => "ERR_PURCHASE_LIMIT",
            RateLimited => "ERR_RATE_LIMITED",
            Forbidden => "ERR_FORBIDDEN",
            MethodNotAllowed => "ERR_METHOD_NOT_ALLOWED",
            PayloadTooLarge => "ERR_PAYLOAD_TOO_LARGE",
            RequestTimeout => "ERR_REQUEST_TIMEOUT",
            InvalidTransition => "ERR_INVALID_TRANSITION",
            OrderExpired => "ERR_ORDER_EXPIRED",
            Conflict => "ERR_CONFLICT",
            IdempotencyMismatch => "ERR_IDEMPOTENCY_MISMATCH",
            AmountMismatch => "ERR_AMOUNT_MISMATCH",
            StockBelowReserved => "ERR_STOCK_BELOW_RESERVED",
            PrelockUnavailable => "ERR_PRELOCK_UNAVAILABLE",
            PrelockNotLoaded => "ERR_PRELOCK_NOT_LOADED",
            GatewayUnavailable => "ERR_GATEWAY_UNAVAILABLE",
            Unavailable => "ERR_UNAVAILABLE",
            Internal => "ERR_INTERNAL",
        }
    }

    pub fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            Validation | MalformedJson => StatusCode::BAD_REQUEST,
            Unauthorized | BadSignature | StaleTimestamp => StatusCode::UNAUTHORIZED,
            NotFound | UnknownPayment => StatusCode::NOT_FOUND,
            StockShortage | PurchaseLimit | InvalidTransition | OrderExpired | Conflict
            | StockBelowReserved => StatusCode::CONFLICT,
            RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Forbidden => StatusCode::FORBIDDEN,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            UnknownSku | IdempotencyMismatch | AmountMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            GatewayUnavailable => StatusCode::BAD_GATEWAY,
            PrelockUnavailable | PrelockNotLoaded | Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// `Retry-After` in seconds, for 503 and 429 (1 unless set).
    pub retry_after_secs: Option<u64>,
}

/// The JSON body of every error.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `ERR_STOCK_SHORTAGE_PRELOCK`.
    #[schema(example = "ERR_VALIDATION")]
    pub code: String,
    /// Human-readable detail; names the offending field for validation errors.
    #[schema(example = "quantity: must be 1 to 20")]
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// `429 ERR_RATE_LIMITED`, with `Retry-After` the whole seconds until a request would be
    /// let through (at least 1).
    pub fn rate_limited(scope: &str, wait: std::time::Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        ApiError {
            code: ErrorCode::RateLimited,
            message: format!("too many requests ({scope}); retry after {} s", secs.max(1)),
            retry_after_secs: Some(secs.max(1)),
        }
    }

    /// `ERR_VALIDATION` naming the offending field: `"quantity: must be 1 to 20"`.
    pub fn field(field: &str, problem: impl std::fmt::Display) -> Self {
        ApiError::new(ErrorCode::Validation, format!("{field}: {problem}"))
    }

    pub fn not_found(what: &str) -> Self {
        ApiError::new(ErrorCode::NotFound, format!("{what} not found"))
    }

    /// A failed call to a dependency (the database): `transient` failures (down, too slow,
    /// overloaded) answer 503 `ERR_UNAVAILABLE` with `Retry-After`, the rest are internal.
    pub fn dependency(err: impl Into<anyhow::Error>, transient: bool) -> Self {
        if !transient {
            return ApiError::internal(err);
        }
        tracing::warn!(
            error = format!("{:#}", err.into()),
            "dependency unavailable"
        );
        ApiError::new(
            ErrorCode::Unavailable,
            "temporarily unavailable; retry shortly",
        )
    }

    /// An unexpected failure: logged here with its full cause chain, answered opaquely.
    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        let err = err.into();
        tracing::error!(error = format!("{err:#}"), "request failed");
        ApiError::new(ErrorCode::Internal, "internal error")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        let retry_after = self.retry_after_secs.unwrap_or(1);
        let body = ErrorBody {
            code: self.code.as_str().to_owned(),
            message: self.message,
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_their_statuses() {
        assert_eq!(
            ErrorCode::StockShortage.as_str(),
            "ERR_STOCK_SHORTAGE_PRELOCK"
        );
        assert_eq!(ErrorCode::StockShortage.status(), StatusCode::CONFLICT);
        assert_eq!(
            ErrorCode::PrelockUnavailable.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn unavailable_carries_retry_after() {
        let r = ApiError::new(ErrorCode::PrelockUnavailable, "x").into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
