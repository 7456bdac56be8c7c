//! Ports: what the use cases need from the outside world, with their contracts.
//!
//! Async functions in traits are used with generics (no boxing, no `dyn`): each binary wires
//! exactly one implementation.

use std::future::Future;

use uuid::Uuid;

use crate::stock::{Attempt, PinOutcome, ReleaseOutcome, ReserveOutcome, WithdrawOutcome};
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
    /// The pre-lock store could not be reached at all (connection refused): the call never
    /// left, so nothing was done. Counts toward `prelock_timeout_rate`.
    #[error("pre-lock unreachable: {0}")]
    Unreachable(String),
    /// Timed out, or failed after the call was sent: it may or may not have run. Counts
    /// toward `prelock_timeout_rate`.
    #[error("pre-lock unavailable: {0}")]
    Unavailable(String),
}

/// The stock pre-lock, keyed by SKU and reservation id (= order id).
///
/// Contract (each call is atomic on one SKU):
/// - `reserve` takes `quantity` units from the SKU's available count, or reports a shortage
///   without changing anything; it never drives the count below zero. It first reclaims
///   lapsed reservations of that SKU. The same reservation id twice is a no-op that reports
///   the first reservation (`Existing`), or `Mismatch` if the quantity differs. Either way
///   `attempt` (one id per create attempt) becomes a claimant of the reservation, and its
///   pending confirmation is recorded in the same step (see [`Attempt`]): if no order
///   confirms it, the claim is withdrawn within seconds even if the caller dies. A new
///   reservation counts against `buyer`'s purchase limit for the SKU (live and paid units of
///   theirs); one that would pass it is refused (`OverLimit`) in the same atomic step, so
///   concurrent orders of one buyer never pass it together.
/// - `pin` (the payment path) makes the order's reservation permanent, or, when it lapsed or
///   is gone, takes the units again and pins them, in one step; it never consults a sold-out
///   shortcut, nor the purchase limit (the money is paid): units taken again count against
///   `buyer`. Idempotent.
/// - `release` gives a reservation's units back whoever claims it; releasing twice is a no-op
///   (`NotFound`).
/// - `withdraw` removes `attempt`'s claim, giving the units back only if no claimant is left:
///   how a create attempt whose answer was lost gives back an orphaned pre-lock without ever
///   taking units from a retry or an order that found it.
/// - `lapse` (the expiry job, once its order expired) gives the units back unless the
///   reservation is pinned: a late payment that pinned them meanwhile keeps them.
/// - `deduct` (once the real stock was deducted) drops a pinned reservation without giving its
///   units back; `false` when nothing is pinned under the id (already deducted).
/// - Expiry times come from the pre-lock store's own clock, so every caller agrees on them;
///   `clock_ms` reads it (an order expires by the clock that set its expiry, not by the
///   caller's).
pub trait StockPrelock: Send + Sync {
    fn reserve(
        &self,
        sku: &SkuId,
        id: OrderId,
        quantity: u32,
        attempt: Attempt,
        buyer: &str,
    ) -> impl Future<Output = Result<ReserveOutcome, PrelockError>> + Send;

    /// The pre-lock store's clock, in ms since the Unix epoch.
    fn clock_ms(&self) -> impl Future<Output = Result<i64, PrelockError>> + Send;

    fn pin(
        &self,
        sku: &SkuId,
        id: OrderId,
        quantity: u32,
        buyer: &str,
    ) -> impl Future<Output = Result<PinOutcome, PrelockError>> + Send;

    fn release(
        &self,
        sku: &SkuId,
        id: OrderId,
    ) -> impl Future<Output = Result<ReleaseOutcome, PrelockError>> + Send;

    fn withdraw(
        &self,
        sku: &SkuId,
        id: OrderId,
        attempt: Uuid,
    ) -> impl Future<Output = Result<WithdrawOutcome, PrelockError>> + Send;

    fn lapse(
        &self,
        sku: &SkuId,
        id: OrderId,
    ) -> impl Future<Output = Result<ReleaseOutcome, PrelockError>> + Send;

    fn deduct(
        &self,
        sku: &SkuId,
        id: OrderId,
    ) -> impl Future<Output = Result<bool, PrelockError>> + Send;
}
