//! The pure domain of bar-fulfillment.
//!
//! Layout:
//! - [`ids`]: typed identifiers (orders, payments, SKUs, stores, users) and their validation.
//! - [`money`]: integer cents, with overflow-checked arithmetic.
//! - [`order`]: order states, the allowed-transition table and the compare-and-set contract.
//! - [`stock`]: the stock ledger model (pre-lock with claims, pin, release, withdraw, expiry,
//!   deduction) that the Redis scripts and the Postgres ledger both implement, the rebuild
//!   plan, and the in-process sold-out marker.
//! - [`payment`]: providers, payment states, and what a confirmed payment does to an order.
//! - [`sla`]: the SLA-boundary trigger that switches compensation to fast polling (slow
//!   callbacks and a transaction missing events, both).
//! - [`ports`]: the traits adapters implement, each with its written contract.
//!
//! This crate owns the rules. It must never do I/O: no tokio, sqlx, redis or axum here, and no
//! serde either (wire formats belong to the adapters that speak them).

pub mod ids;
pub mod money;
pub mod order;
pub mod payment;
pub mod ports;
pub mod sla;
pub mod stock;

pub use ids::{IdError, OrderId, PaymentId, SkuId, StoreId, UserId};
pub use money::Money;
pub use order::{OrderState, TransitionError};
pub use payment::{PaymentPlan, PaymentStatus, Provider};
