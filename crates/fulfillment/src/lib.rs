//! Use cases of the order lifecycle, shared by every entry point: order-api's handlers, the
//! payment webhook, and (later) the compensation worker and manual replay, which all call the
//! same [`Fulfillment::apply_payment`].
//!
//! Layout:
//! - [`error`]: what callers branch on.
//! - [`orders`]: create (pre-lock + order + reservation + outbox + expiry job in one
//!   transaction) and cancel.
//! - [`payments`]: apply a confirmed payment exactly once.
//! - [`follow_up`]: what the scheduler runs for an order: expiry, stock deduction, voucher
//!   issue; and the bar's redemption.
//! - [`events`]: the outbox events and jobs these write (kinds, payloads, versions).
//!
//! Concurrency contract: every transaction that changes a SKU's reservations and the Redis
//! pre-lock holds that SKU's shared advisory lock while it talks to Redis; a rebuild holds it
//! exclusively (see `postgres_store::lock_sku_shared`). Order state changes are
//! compare-and-set on the version; a conflict is retried from a fresh read, never overwritten.
//! This crate decides the order of side effects; it must never speak HTTP or SQL itself.

pub mod error;
pub mod events;
pub mod follow_up;
pub mod orders;
pub mod payments;
pub mod refunds;

use std::time::Duration;

use domain::ports::StockPrelock;
use domain::stock::SoldOutMarker;
use postgres_store::PgStore;

pub use error::FulfillmentError;

#[derive(Debug, Clone)]
pub struct FulfillmentConfig {
    /// Largest quantity one order may take (a flash sale's per-order limit).
    pub max_quantity: u32,
    /// Follow-up jobs of a payment are due this long after it commits (paper: 2 s).
    pub follow_up_delay: Duration,
    /// How many times a create waits for a SKU whose Redis state is being rebuilt.
    pub not_loaded_retries: u32,
    /// How long a "sold out" answer is remembered in-process (0 disables the marker).
    pub sold_out_ttl: Duration,
    /// How long after a timed-out pre-lock call its possible reservation is given back (when
    /// no order took it). Longer than any late answer can take to land.
    pub orphan_release_delay: Duration,
    /// At most this many give-backs wait in the background at once; past that, reservations
    /// lapse on their own (a pre-lock outage must not turn into unbounded tasks).
    pub max_background_give_backs: usize,
    /// A started payment's first compensation check is due this long after it starts (then
    /// the compensation worker checks every poll interval until it is resolved).
    pub first_payment_check: Duration,
}

impl Default for FulfillmentConfig {
    fn default() -> Self {
        FulfillmentConfig {
            first_payment_check: Duration::from_secs(5),
            max_quantity: 20,
            follow_up_delay: Duration::from_secs(2),
            not_loaded_retries: 4,
            sold_out_ttl: Duration::from_millis(500),
            orphan_release_delay: Duration::from_secs(2),
            max_background_give_backs: 1024,
        }
    }
}

pub struct Fulfillment<P> {
    pub store: PgStore,
    pub prelock: P,
    pub config: FulfillmentConfig,
    /// Hot SKUs known to be empty, answered without a database transaction.
    pub sold_out: SoldOutMarker,
    /// Background work (orphaned pre-lock releases); drained on shutdown.
    pub tasks: tokio_util::task::TaskTracker,
    /// Bounds the background give-backs (`max_background_give_backs`).
    give_back_slots: std::sync::Arc<tokio::sync::Semaphore>,
}

impl<P: StockPrelock> Fulfillment<P> {
    pub fn new(store: PgStore, prelock: P, config: FulfillmentConfig) -> Self {
        let sold_out = SoldOutMarker::new(config.sold_out_ttl);
        let give_back_slots = std::sync::Arc::new(tokio::sync::Semaphore::new(
            config.max_background_give_backs,
        ));
        Fulfillment {
            store,
            prelock,
            config,
            sold_out,
            tasks: tokio_util::task::TaskTracker::new(),
            give_back_slots,
        }
    }
}
