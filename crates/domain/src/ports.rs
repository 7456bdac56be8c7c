//! Ports: what the use cases need from the outside world, with their contracts.
//!
//! Async functions in traits are used with generics (no boxing, no `dyn`): each binary wires
//! exactly one implementation.

use std::future::Future;

use crate::stock::{ConfirmOutcome, ReleaseOutcome, ReserveOutcome};
use crate::{OrderId, SkuId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrelockError {
    /// The SKU has no pre-lock state (Redis was flushed or never loaded). The pre-lock owner
    /// starts a rebuild of that SKU from Postgres; retrying shortly succeeds.
    #[error("pre-lock state for this SKU is not loaded")]
    NotLoaded,
    /// No SKU by that id exists.
    #[error("unknown SKU")]
    UnknownSku,
    /// The reservation id exists with a different quantity: two different requests share
    /// one idempotency key.
    #[error("reservation exists with a different quantity")]
    Mismatch,
    /// Timed out or could not reach the pre-lock store. Counts toward `prelock_timeout_rate`.
    #[error("pre-lock unavailable: {0}")]
    Unavailable(String),
}

/// The stock pre-lock, keyed by SKU and reservation id (= order id).
///
/// Contract (each call is atomic on one SKU):
/// - `reserve` takes `quantity` units from the SKU's available count, or reports a shortage
///   without changing anything; it never drives the count below zero. It first reclaims
///   lapsed reservations of that SKU. The same reservation id twice is a no-op that reports
///   the first reservation (`Existing`), or `Mismatch` if the quantity differs.
/// - `confirm` makes a live reservation permanent (it will not lapse) and is idempotent; a
///   lapsed one is reclaimed and reported as `Lapsed`.
/// - `release` gives a reservation's units back; releasing twice is a no-op (`NotFound`).
/// - Expiry times come from the pre-lock store's own clock, so every caller agrees on them.
pub trait StockPrelock: Send + Sync {
    fn reserve(
        &self,
        sku: &SkuId,
        id: OrderId,
        quantity: u32,
    ) -> impl Future<Output = Result<ReserveOutcome, PrelockError>> + Send;

    fn confirm(
        &self,
        sku: &SkuId,
        id: OrderId,
    ) -> impl Future<Output = Result<ConfirmOutcome, PrelockError>> + Send;

    fn release(
        &self,
        sku: &SkuId,
        id: OrderId,
    ) -> impl Future<Output = Result<ReleaseOutcome, PrelockError>> + Send;
}
