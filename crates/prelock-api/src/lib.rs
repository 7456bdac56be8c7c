//! The wire contract of prelock-service's reservation endpoints, and the HTTP client that
//! implements [`domain::ports::StockPrelock`] for order-api.
//!
//! Routes (all take `Authorization: Bearer <SERVICE_TOKEN>`, the reservation lookup an
//! operator's staff token too; reservation id = order id):
//! - `PUT    /v1/skus/{sku_id}/reservations/{id}`           `{"quantity","attempt","buyer","txid"?}` -> [`ReserveReply`]
//! - `GET    /v1/skus/{sku_id}/reservations/{id}`           -> [`HoldsReply`] (operators)
//! - `POST   /v1/skus/{sku_id}/reservations/{id}/pin`       `{"quantity","buyer"?}` -> [`PinReply`]
//! - `POST   /v1/skus/{sku_id}/reservations/{id}/withdraw`  `{"attempt"}` -> [`WithdrawReply`]
//! - `POST   /v1/skus/{sku_id}/reservations/{id}/lapse`     -> [`ReleaseReply`]
//! - `POST   /v1/skus/{sku_id}/reservations/{id}/deduct`    -> [`DeductReply`]
//! - `DELETE /v1/skus/{sku_id}/reservations/{id}`           -> [`ReleaseReply`]
//! - `GET    /v1/clock`                                      -> [`ClockReply`] (the pre-lock
//!   store's clock, which lapse times come from)
//!
//! Outcomes (reserved, shortage, pinned, ...) are 200 bodies; failures are the house error
//! body with `ERR_PRELOCK_NOT_LOADED`, `ERR_UNKNOWN_SKU`, `ERR_IDEMPOTENCY_MISMATCH` or
//! `ERR_PRELOCK_UNAVAILABLE`. This crate owns that mapping and nothing else.

use std::time::Duration;

use domain::ports::{PrelockError, StockPrelock};
use domain::stock::{Attempt, PinOutcome, ReleaseOutcome, ReserveOutcome, WithdrawOutcome};
use domain::{OrderId, SkuId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReserveRequest {
    pub quantity: u32,
    /// This create attempt's id (a fresh UUID per try): it becomes a claimant of the
    /// reservation, and only it can withdraw that claim.
    pub attempt: Uuid,
    /// The Postgres transaction (xid) that is to write the order: the pending confirmation
    /// recorded with the reserve is settled by that transaction's fate, within seconds, even
    /// if the caller dies. Without it, only by whether the order exists once the
    /// confirmation window has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txid: Option<i64>,
    /// Whose purchase limit the units count against (the order's user id).
    pub buyer: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClockReply {
    /// The pre-lock store's clock (Redis `TIME`), ms since the Unix epoch.
    pub now_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PinRequest {
    pub quantity: u32,
    /// The order's user: units taken again (the reservation had lapsed) count against their
    /// purchase limit, and are refused past it (`over_limit`).
    #[serde(default)]
    pub buyer: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WithdrawRequest {
    pub attempt: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeductReply {
    /// Whether a pinned reservation was dropped (false: none under this id, e.g. already).
    pub deducted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HoldsReply {
    /// Whether a reservation with this id exists (lapsed ones not yet reclaimed included).
    pub held: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReserveStatus {
    Reserved,
    Existing,
    Shortage,
    /// The buyer would hold more of this SKU than its purchase limit allows.
    OverLimit,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReserveReply {
    pub outcome: ReserveStatus,
    pub quantity: u32,
    /// Lapse time (ms since epoch, Redis clock); absent on shortage or once confirmed.
    pub expires_at_ms: Option<i64>,
    /// Units left after the call (absent for `existing` and `over_limit`).
    pub available: Option<i64>,
    /// `over_limit`: the units the buyer holds already, and the most they may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

impl ReserveReply {
    pub fn from_outcome(quantity: u32, o: ReserveOutcome) -> Self {
        match o {
            ReserveOutcome::Reserved {
                expires_at_ms,
                available,
            } => ReserveReply {
                outcome: ReserveStatus::Reserved,
                quantity,
                expires_at_ms: Some(expires_at_ms),
                available: Some(available),
                holds: None,
                limit: None,
            },
            ReserveOutcome::Existing {
                quantity,
                expires_at_ms,
            } => ReserveReply {
                outcome: ReserveStatus::Existing,
                quantity,
                expires_at_ms,
                available: None,
                holds: None,
                limit: None,
            },
            ReserveOutcome::Shortage { available } => ReserveReply {
                outcome: ReserveStatus::Shortage,
                quantity,
                expires_at_ms: None,
                available: Some(available),
                holds: None,
                limit: None,
            },
            ReserveOutcome::OverLimit { holds, limit } => ReserveReply {
                outcome: ReserveStatus::OverLimit,
                quantity,
                expires_at_ms: None,
                available: None,
                holds: Some(holds),
                limit: Some(limit),
            },
        }
    }

    pub fn into_outcome(self) -> Result<ReserveOutcome, PrelockError> {
        let bad = || PrelockError::Unavailable("incomplete reserve reply".into());
        Ok(match self.outcome {
            ReserveStatus::Reserved => ReserveOutcome::Reserved {
                expires_at_ms: self.expires_at_ms.ok_or_else(bad)?,
                available: self.available.ok_or_else(bad)?,
            },
            ReserveStatus::Existing => ReserveOutcome::Existing {
                quantity: self.quantity,
                expires_at_ms: self.expires_at_ms,
            },
            ReserveStatus::Shortage => ReserveOutcome::Shortage {
                available: self.available.ok_or_else(bad)?,
            },
            ReserveStatus::OverLimit => ReserveOutcome::OverLimit {
                holds: self.holds.ok_or_else(bad)?,
                limit: self.limit.ok_or_else(bad)?,
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PinStatus {
    Pinned,
    Repinned,
    Shortage,
    Mismatch,
    /// Taking the units again would pass the buyer's purchase limit (`quantity` = what they
    /// hold).
    OverLimit,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PinReply {
    pub outcome: PinStatus,
    /// Units pinned (`pinned`, `repinned`), held under another quantity (`mismatch`), or
    /// held by the buyer already (`over_limit`).
    pub quantity: Option<u32>,
    /// Units left after the call (`repinned`, `shortage`).
    pub available: Option<i64>,
    /// The SKU's purchase limit (`over_limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

impl From<PinOutcome> for PinReply {
    fn from(o: PinOutcome) -> Self {
        let (outcome, quantity, available) = match o {
            PinOutcome::Pinned { quantity } => (PinStatus::Pinned, Some(quantity), None),
            PinOutcome::Repinned {
                quantity,
                available,
            } => (PinStatus::Repinned, Some(quantity), Some(available)),
            PinOutcome::Shortage { available } => (PinStatus::Shortage, None, Some(available)),
            PinOutcome::Mismatch { held } => (PinStatus::Mismatch, Some(held), None),
            PinOutcome::OverLimit { holds, .. } => (PinStatus::OverLimit, Some(holds), None),
        };
        PinReply {
            outcome,
            quantity,
            available,
            limit: match o {
                PinOutcome::OverLimit { limit, .. } => Some(limit),
                _ => None,
            },
        }
    }
}

impl PinReply {
    pub fn into_outcome(self) -> Result<PinOutcome, PrelockError> {
        let bad = || PrelockError::Unavailable("incomplete pin reply".into());
        Ok(match self.outcome {
            PinStatus::Pinned => PinOutcome::Pinned {
                quantity: self.quantity.ok_or_else(bad)?,
            },
            PinStatus::Repinned => PinOutcome::Repinned {
                quantity: self.quantity.ok_or_else(bad)?,
                available: self.available.ok_or_else(bad)?,
            },
            PinStatus::Shortage => PinOutcome::Shortage {
                available: self.available.ok_or_else(bad)?,
            },
            PinStatus::Mismatch => PinOutcome::Mismatch {
                held: self.quantity.ok_or_else(bad)?,
            },
            PinStatus::OverLimit => PinOutcome::OverLimit {
                holds: self.quantity.ok_or_else(bad)?,
                limit: self.limit.ok_or_else(bad)?,
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WithdrawStatus {
    Released,
    StillClaimed,
    NotFound,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WithdrawReply {
    pub outcome: WithdrawStatus,
    pub quantity: Option<u32>,
    pub available: Option<i64>,
}

impl From<WithdrawOutcome> for WithdrawReply {
    fn from(o: WithdrawOutcome) -> Self {
        let (outcome, quantity, available) = match o {
            WithdrawOutcome::Released {
                quantity,
                available,
            } => (WithdrawStatus::Released, Some(quantity), Some(available)),
            WithdrawOutcome::StillClaimed => (WithdrawStatus::StillClaimed, None, None),
            WithdrawOutcome::NotFound => (WithdrawStatus::NotFound, None, None),
        };
        WithdrawReply {
            outcome,
            quantity,
            available,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseStatus {
    Released,
    NotFound,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReleaseReply {
    pub outcome: ReleaseStatus,
    pub quantity: Option<u32>,
    pub available: Option<i64>,
}

impl From<ReleaseReply> for ReleaseOutcome {
    fn from(r: ReleaseReply) -> Self {
        match r.outcome {
            ReleaseStatus::Released => ReleaseOutcome::Released {
                quantity: r.quantity.unwrap_or(0),
                available: r.available.unwrap_or(0),
            },
            ReleaseStatus::NotFound => ReleaseOutcome::NotFound,
        }
    }
}

impl From<ReleaseOutcome> for ReleaseReply {
    fn from(o: ReleaseOutcome) -> Self {
        match o {
            ReleaseOutcome::Released {
                quantity,
                available,
            } => ReleaseReply {
                outcome: ReleaseStatus::Released,
                quantity: Some(quantity),
                available: Some(available),
            },
            ReleaseOutcome::NotFound => ReleaseReply {
                outcome: ReleaseStatus::NotFound,
                quantity: None,
                available: None,
            },
        }
    }
}

/// `POST /v1/admin/reconcile`: what the comparison of Redis with Postgres found.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReconcileReport {
    /// SKUs compared.
    pub skus: u64,
    /// SKUs whose Redis state had drifted from Postgres and was written back.
    pub drifted: Vec<String>,
    /// SKUs that could not be compared (they are retried by the next run).
    pub failed: Vec<String>,
    pub duration_ms: u64,
}

/// Error codes this contract uses (the house `{"code","message"}` body).
pub const CODE_NOT_LOADED: &str = "ERR_PRELOCK_NOT_LOADED";
pub const CODE_UNKNOWN_SKU: &str = "ERR_UNKNOWN_SKU";
pub const CODE_MISMATCH: &str = "ERR_IDEMPOTENCY_MISMATCH";

#[derive(Deserialize)]
struct ErrorBody {
    code: String,
    message: String,
}

/// order-api's handle on prelock-service.
#[derive(Clone)]
pub struct PrelockClient {
    http: reqwest::Client,
    base_url: String,
    token: String,
}

impl PrelockClient {
    /// `timeout` bounds each call end to end; past it the order answers 503 and the call
    /// counts toward `prelock_timeout_rate`.
    pub fn new(base_url: &str, token: &str, timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        Ok(PrelockClient {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    fn url(&self, sku: &SkuId, id: OrderId, tail: &str) -> String {
        format!("{}/v1/skus/{sku}/reservations/{id}{tail}", self.base_url)
    }

    /// Compares every SKU's Redis state with Postgres and repairs drift (`timeout` bounds the
    /// whole walk, which takes longer than one pre-lock call).
    pub async fn reconcile(&self, timeout: Duration) -> Result<ReconcileReport, PrelockError> {
        self.call(
            self.http
                .post(format!("{}/v1/admin/reconcile", self.base_url))
                .timeout(timeout),
        )
        .await
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, PrelockError> {
        // the pre-lock service's span joins the caller's trace
        let req = match service_kit::trace::current_traceparent() {
            Some(tp) => req.header(service_kit::trace::TRACEPARENT, tp),
            None => req,
        };
        let resp = req.bearer_auth(&self.token).send().await.map_err(|e| {
            // a refused (or timed-out) connect never sent the request: nothing was done
            let e = e.without_url();
            if e.is_connect() {
                PrelockError::Unreachable(format!("prelock-service: {e}"))
            } else {
                PrelockError::Unavailable(format!("prelock-service: {e}"))
            }
        })?;
        let status = resp.status();
        if status.is_success() {
            return resp.json().await.map_err(|e| {
                PrelockError::Unavailable(format!("prelock-service reply: {}", e.without_url()))
            });
        }
        let body: Option<ErrorBody> = resp.json().await.ok();
        Err(match body {
            Some(b) if b.code == CODE_NOT_LOADED => PrelockError::NotLoaded,
            Some(b) if b.code == CODE_UNKNOWN_SKU => PrelockError::UnknownSku,
            Some(b) if b.code == CODE_MISMATCH => PrelockError::Mismatch,
            Some(b) => PrelockError::Unavailable(format!("{status} {}: {}", b.code, b.message)),
            None => PrelockError::Unavailable(format!("prelock-service answered {status}")),
        })
    }
}

impl StockPrelock for PrelockClient {
    async fn reserve(
        &self,
        sku: &SkuId,
        id: OrderId,
        quantity: u32,
        attempt: Attempt,
        buyer: &str,
    ) -> Result<ReserveOutcome, PrelockError> {
        let body = ReserveRequest {
            quantity,
            attempt: attempt.id,
            txid: attempt.txid,
            buyer: buyer.to_owned(),
        };
        let reply: ReserveReply = self
            .call(self.http.put(self.url(sku, id, "")).json(&body))
            .await?;
        reply.into_outcome()
    }

    async fn clock_ms(&self) -> Result<i64, PrelockError> {
        let reply: ClockReply = self
            .call(self.http.get(format!("{}/v1/clock", self.base_url)))
            .await?;
        Ok(reply.now_ms)
    }

    async fn pin(
        &self,
        sku: &SkuId,
        id: OrderId,
        quantity: u32,
        buyer: &str,
    ) -> Result<PinOutcome, PrelockError> {
        let reply: PinReply = self
            .call(self.http.post(self.url(sku, id, "/pin")).json(&PinRequest {
                quantity,
                buyer: buyer.to_owned(),
            }))
            .await?;
        reply.into_outcome()
    }

    async fn release(&self, sku: &SkuId, id: OrderId) -> Result<ReleaseOutcome, PrelockError> {
        let reply: ReleaseReply = self.call(self.http.delete(self.url(sku, id, ""))).await?;
        Ok(reply.into())
    }

    async fn lapse(&self, sku: &SkuId, id: OrderId) -> Result<ReleaseOutcome, PrelockError> {
        let reply: ReleaseReply = self
            .call(self.http.post(self.url(sku, id, "/lapse")))
            .await?;
        Ok(reply.into())
    }

    async fn deduct(&self, sku: &SkuId, id: OrderId) -> Result<bool, PrelockError> {
        let reply: DeductReply = self
            .call(self.http.post(self.url(sku, id, "/deduct")))
            .await?;
        Ok(reply.deducted)
    }

    async fn withdraw(
        &self,
        sku: &SkuId,
        id: OrderId,
        attempt: Uuid,
    ) -> Result<WithdrawOutcome, PrelockError> {
        let reply: WithdrawReply = self
            .call(
                self.http
                    .post(self.url(sku, id, "/withdraw"))
                    .json(&WithdrawRequest { attempt }),
            )
            .await?;
        Ok(match reply.outcome {
            WithdrawStatus::Released => WithdrawOutcome::Released {
                quantity: reply.quantity.unwrap_or(0),
                available: reply.available.unwrap_or(0),
            },
            WithdrawStatus::StillClaimed => WithdrawOutcome::StillClaimed,
            WithdrawStatus::NotFound => WithdrawOutcome::NotFound,
        })
    }
}
