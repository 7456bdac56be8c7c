//! Handlers, one module per resource.

pub mod orders;
pub mod payments;

use domain::OrderId;
use service_kit::ApiError;

pub(crate) fn parse_order_id(s: &str) -> Result<OrderId, ApiError> {
    OrderId::parse(s).map_err(|e| ApiError::field("order_id", e))
}
