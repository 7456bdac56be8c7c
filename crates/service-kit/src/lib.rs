//! Plumbing every binary shares, so that each `main.rs` only wires config -> telemetry ->
//! app -> run(shutdown).
//!
//! Layout:
//! - [`config`]: environment variables with local defaults; secrets are never printed.
//! - [`telemetry`]: structured logs (`tracing`, JSON by default) and the Prometheus registry.
//! - [`error`]: the one HTTP error type: a stable `{"code","message"}` body, one table from
//!   code to status, opaque 5xx, `Retry-After` on 503.
//! - [`auth`]: buyer tokens (JWT HS256, `sub` = user id) and the operator token.
//! - [`http`]: health, readiness and metrics routes, per-route metrics middleware, the JSON
//!   extractor that turns bad input into `ERR_VALIDATION`, and graceful serving.
//! - [`limit`]: rate limits per buyer, per client address and on the webhooks (`governor`),
//!   answered `429 ERR_RATE_LIMITED` with `Retry-After`.
//!
//! It owns no business rule and must never learn one.

pub mod auth;
pub mod config;
pub mod error;
pub mod http;
pub mod limit;
pub mod telemetry;
pub mod trace;

pub use error::{ApiError, ErrorCode};
