//! HTTP handlers of prelock-service.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use domain::ports::PrelockError;
use domain::stock::{Attempt, PinOutcome, ReserveOutcome, WithdrawOutcome};
use domain::{Money, OrderId, SkuId, StoreId};
use postgres_store::{lock_sku_exclusive, skus};
use prelock_api::{
    ClockReply, DeductReply, HoldsReply, PinReply, PinRequest, ReleaseReply, ReserveReply,
    ReserveRequest, WithdrawReply, WithdrawRequest,
};
use serde::{Deserialize, Serialize};
use service_kit::auth::{Operator, Service, ServiceOrOperator};
use service_kit::error::ErrorBody;
use service_kit::http::ApiJson;
use service_kit::http::BearerAuth;
use service_kit::{ApiError, ErrorCode};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::rebuild::{self, RebuildError, RebuildReport, ReconcileReport};
use crate::{App, AppState};

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "bar-fulfillment prelock-service", description = "Owns stock: Redis pre-lock, stock admin, rebuild from Postgres."),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// Every route with its OpenAPI operation (one list, so the document cannot miss a route),
/// plus `GET /openapi.json`.
pub fn router(state: AppState) -> Router {
    let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(put_sku, get_sku))
        .routes(routes!(rebuild_all))
        .routes(routes!(reconcile_all))
        .routes(routes!(reserve, holds, release))
        .routes(routes!(pin))
        .routes(routes!(withdraw))
        .routes(routes!(lapse))
        .routes(routes!(deduct))
        .routes(routes!(clock))
        .with_state(state)
        .split_for_parts();
    let doc = service_kit::http::document_auth(doc);
    api.route("/openapi.json", get(move || async move { Json(doc) }))
}

fn parse_sku(s: &str) -> Result<SkuId, ApiError> {
    SkuId::parse(s).map_err(|e| ApiError::field("sku_id", e))
}

fn parse_ids(sku: &str, id: &str) -> Result<(SkuId, OrderId), ApiError> {
    Ok((
        parse_sku(sku)?,
        OrderId::parse(id).map_err(|e| ApiError::field("reservation_id", e))?,
    ))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PutSku {
    pub store_id: String,
    pub price_cents: i64,
    pub stock: i64,
    /// Pre-lock lifetime for this SKU; absent = the SKU's current one (a restock keeps it), or
    /// the service default for a new SKU.
    #[serde(default)]
    pub prelock_ttl_seconds: Option<i32>,
    /// Most units one buyer may hold of this SKU, in live and paid orders ("limit N per
    /// person"); 0 = no limit; absent = the SKU's current limit (a restock cannot lift it by
    /// leaving it out), or the service default (`PRELOCK_MAX_PER_BUYER`) for a new SKU.
    #[serde(default)]
    pub max_per_buyer: Option<i32>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SkuView {
    pub sku_id: String,
    pub store_id: String,
    pub price_cents: i64,
    /// Real stock (Postgres): units not yet deducted by a paid order's deduction job.
    pub stock_real: i64,
    /// Units still available for pre-lock (Redis); null while the SKU is not loaded.
    pub available: Option<i64>,
    /// Units held by live reservations (Postgres ledger): pre-locked or paid, not deducted.
    pub reserved: i64,
    pub prelock_ttl_seconds: Option<i32>,
    /// The SKU's own purchase limit; null = the service default applies.
    pub max_per_buyer: Option<i32>,
}

/// Stock admin: creates or updates a SKU and sets its real stock, then rewrites its Redis
/// state, all under the SKU's exclusive lock.
#[utoipa::path(put, path = "/v1/skus/{sku_id}", tag = "stock",
    params(("sku_id" = String, Path)), request_body = PutSku,
    responses((status = 200, body = SkuView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "ERR_STOCK_BELOW_RESERVED", body = ErrorBody)),
    security(("bearer" = [])))]
async fn put_sku(
    State(s): State<AppState>,
    Operator(operator): Operator,
    Path(sku_id): Path<String>,
    ApiJson(body): ApiJson<PutSku>,
) -> Result<Json<SkuView>, ApiError> {
    let app = &s.0;
    let sku = parse_sku(&sku_id)?;
    let store = StoreId::parse(&body.store_id).map_err(|e| ApiError::field("store_id", e))?;
    if Money::from_cents(body.price_cents).is_none() {
        return Err(ApiError::field(
            "price_cents",
            format!("must be 0 to {}", Money::MAX_CENTS),
        ));
    }
    if !(0..=1_000_000_000).contains(&body.stock) {
        return Err(ApiError::field("stock", "must be 0 to 1000000000"));
    }
    if body
        .prelock_ttl_seconds
        .is_some_and(|t| !(1..=86_400).contains(&t))
    {
        return Err(ApiError::field("prelock_ttl_seconds", "must be 1 to 86400"));
    }
    if body
        .max_per_buyer
        .is_some_and(|n| !(0..=1_000_000).contains(&n))
    {
        return Err(ApiError::field("max_per_buyer", "must be 0 to 1000000"));
    }
    let mut tx = app.store.begin().await.map_err(db_error)?;
    lock_sku_exclusive(&mut tx, sku.as_str())
        .await
        .map_err(db_error)?;
    let held = skus::held_units(&mut *tx, sku.as_str())
        .await
        .map_err(db_error)?;
    if let Err(e) = domain::stock::check_restock(body.stock, held) {
        return Err(ApiError::new(
            ErrorCode::StockBelowReserved,
            format!(
                "stock: cannot go below the {} units held by live reservations",
                e.held
            ),
        ));
    }
    let row = skus::upsert_sku(
        &mut tx,
        sku.as_str(),
        store.as_str(),
        body.price_cents,
        body.stock,
        body.prelock_ttl_seconds,
        body.max_per_buyer,
    )
    .await
    .map_err(db_error)?;
    let rebuilt = rebuild::write_back(app, &mut tx, &sku, &row)
        .await
        .map_err(rebuild_error)?;
    tx.commit().await.map_err(db_error)?;
    app.prelock_metrics
        .rebuilds
        .with_label_values(&["restock", "ok"])
        .inc();
    tracing::info!(%sku, %operator, stock_real = row.stock_real, available = rebuilt.available, "stock set");
    Ok(Json(SkuView {
        sku_id: row.id,
        store_id: row.store_id,
        price_cents: row.price_cents,
        stock_real: row.stock_real,
        available: Some(rebuilt.available),
        reserved: held,
        prelock_ttl_seconds: row.prelock_ttl_seconds,
        max_per_buyer: row.max_per_buyer,
    }))
}

#[utoipa::path(get, path = "/v1/skus/{sku_id}", tag = "stock",
    params(("sku_id" = String, Path)),
    responses((status = 200, body = SkuView), (status = 404, body = ErrorBody)))]
async fn get_sku(
    State(s): State<AppState>,
    Path(sku_id): Path<String>,
) -> Result<Json<SkuView>, ApiError> {
    let app = &s.0;
    let sku = parse_sku(&sku_id)?;
    let row = skus::get_sku(&app.store.pool, sku.as_str())
        .await
        .map_err(db_error)?
        .ok_or_else(|| ApiError::not_found("SKU"))?;
    let reserved = skus::held_units(&app.store.pool, sku.as_str())
        .await
        .map_err(db_error)?;
    let available = app.redis.available(&sku).await.map_err(unavailable)?;
    if available.is_none() {
        rebuild::spawn_rebuild(&s.0, &sku);
    }
    Ok(Json(SkuView {
        sku_id: row.id,
        store_id: row.store_id,
        price_cents: row.price_cents,
        stock_real: row.stock_real,
        available,
        reserved,
        prelock_ttl_seconds: row.prelock_ttl_seconds,
        max_per_buyer: row.max_per_buyer,
    }))
}

#[utoipa::path(post, path = "/v1/admin/rebuild", tag = "stock",
    description = "Recomputes every SKU's Redis state from Postgres; safe while orders flow.",
    responses((status = 200, body = RebuildReport), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn rebuild_all(
    State(s): State<AppState>,
    Operator(operator): Operator,
) -> Result<Json<RebuildReport>, ApiError> {
    tracing::warn!(%operator, "rebuild of every SKU asked by an operator");
    let report = rebuild::rebuild_all(&s.0, "admin")
        .await
        .map_err(rebuild_error)?;
    Ok(Json(report))
}

#[utoipa::path(post, path = "/v1/admin/reconcile", tag = "stock",
    description = "Compares every SKU's Redis state with Postgres and writes Postgres's back where they differ (the nightly reconciliation); safe while orders flow.",
    responses((status = 200, body = ReconcileReport), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn reconcile_all(
    State(s): State<AppState>,
    caller: ServiceOrOperator,
) -> Result<Json<ReconcileReport>, ApiError> {
    if let ServiceOrOperator::Operator(operator) = &caller {
        tracing::warn!(%operator, "reconciliation of every SKU asked by an operator");
    }
    let report = rebuild::reconcile_all(&s.0).await.map_err(rebuild_error)?;
    Ok(Json(report))
}

#[utoipa::path(put, path = "/v1/skus/{sku_id}/reservations/{reservation_id}", tag = "reservations",
    description = "Reserves units for a create attempt; the same id again adds the attempt as a claimant and reports the existing reservation.",
    params(("sku_id" = String, Path), ("reservation_id" = String, Path, description = "= order id")),
    request_body = ReserveRequest,
    responses((status = 200, body = ReserveReply), (status = 422, body = ErrorBody),
        (status = 503, description = "ERR_PRELOCK_NOT_LOADED / ERR_PRELOCK_UNAVAILABLE", body = ErrorBody)),
    security(("bearer" = [])))]
async fn reserve(
    State(s): State<AppState>,
    _service: Service,
    Path((sku_id, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<ReserveRequest>,
) -> Result<Json<ReserveReply>, ApiError> {
    let app = &s.0;
    let (sku, id) = parse_ids(&sku_id, &id)?;
    if body.quantity == 0 {
        return Err(ApiError::field("quantity", "must be positive"));
    }
    if !(1..=128).contains(&body.buyer.len()) {
        return Err(ApiError::field("buyer", "must be 1 to 128 bytes"));
    }
    // No sold-out shortcut here: only Redis knows whether this id already holds units (a
    // retry after a lost answer), and a shortcut that answered before asking turned such
    // retries, and late payments, into false "sold out"s. order-api keeps the shortcut for
    // order ids that cannot hold units (no order, no lost answer).
    let attempt = Attempt {
        id: body.attempt,
        txid: body.txid,
    };
    // noted before the call: a reserve whose answer is lost may still have recorded its
    // pending confirmation
    app.note_pending(&sku);
    let outcome = app
        .redis
        .reserve(
            &sku,
            id,
            body.quantity,
            app.config.default_ttl,
            attempt,
            &body.buyer,
        )
        .await;
    let outcome = settle(&s, &sku, "reserve", outcome).await?;
    count(
        app,
        "reserve",
        match outcome {
            ReserveOutcome::Reserved { .. } => "reserved",
            ReserveOutcome::Existing { .. } => "existing",
            ReserveOutcome::Shortage { .. } => "shortage",
            ReserveOutcome::OverLimit { .. } => "over_limit",
        },
    );
    Ok(Json(ReserveReply::from_outcome(body.quantity, outcome)))
}

#[utoipa::path(get, path = "/v1/clock", tag = "reservations",
    description = "The pre-lock store's clock (Redis `TIME`): the clock every lapse time is set by, and so the one an order expires by.",
    responses((status = 200, body = ClockReply), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn clock(State(s): State<AppState>, _service: Service) -> Result<Json<ClockReply>, ApiError> {
    let now_ms = s.0.redis.now_ms().await.map_err(unavailable)?;
    Ok(Json(ClockReply { now_ms }))
}

#[utoipa::path(get, path = "/v1/skus/{sku_id}/reservations/{reservation_id}", tag = "reservations",
    description = "Whether a reservation with this id exists; changes nothing (for operators).",
    params(("sku_id" = String, Path), ("reservation_id" = String, Path)),
    responses((status = 200, body = HoldsReply), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn holds(
    State(s): State<AppState>,
    _caller: ServiceOrOperator,
    Path((sku_id, id)): Path<(String, String)>,
) -> Result<Json<HoldsReply>, ApiError> {
    let (sku, id) = parse_ids(&sku_id, &id)?;
    let held = s.0.redis.holds(&sku, id).await;
    let held = settle(&s, &sku, "holds", held).await?;
    count(&s.0, "holds", "ok");
    Ok(Json(HoldsReply { held }))
}

#[utoipa::path(post, path = "/v1/skus/{sku_id}/reservations/{reservation_id}/pin", tag = "reservations",
    description = "The payment path: makes the reservation permanent, or takes the units again when it lapsed or is gone, in one atomic step.",
    params(("sku_id" = String, Path), ("reservation_id" = String, Path)),
    request_body = PinRequest,
    responses((status = 200, body = PinReply), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn pin(
    State(s): State<AppState>,
    _service: Service,
    Path((sku_id, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<PinRequest>,
) -> Result<Json<PinReply>, ApiError> {
    let (sku, id) = parse_ids(&sku_id, &id)?;
    if body.quantity == 0 {
        return Err(ApiError::field("quantity", "must be positive"));
    }
    if body.buyer.len() > 128 {
        return Err(ApiError::field("buyer", "must be at most 128 bytes"));
    }
    let outcome = s.0.redis.pin(&sku, id, body.quantity, &body.buyer).await;
    let outcome = settle(&s, &sku, "pin", outcome).await?;
    count(
        &s.0,
        "pin",
        match outcome {
            PinOutcome::Pinned { .. } => "pinned",
            PinOutcome::Repinned { .. } => "repinned",
            PinOutcome::Shortage { .. } => "shortage",
            PinOutcome::Mismatch { .. } => "mismatch",
            PinOutcome::OverLimit { .. } => "over_limit",
        },
    );
    Ok(Json(outcome.into()))
}

#[utoipa::path(post, path = "/v1/skus/{sku_id}/reservations/{reservation_id}/withdraw", tag = "reservations",
    description = "Removes one create attempt's claim; the units go back only when no attempt or order claims the reservation any more.",
    params(("sku_id" = String, Path), ("reservation_id" = String, Path)),
    request_body = WithdrawRequest,
    responses((status = 200, body = WithdrawReply), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn withdraw(
    State(s): State<AppState>,
    _service: Service,
    Path((sku_id, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<WithdrawRequest>,
) -> Result<Json<WithdrawReply>, ApiError> {
    let (sku, id) = parse_ids(&sku_id, &id)?;
    let outcome = s.0.redis.withdraw(&sku, id, body.attempt).await;
    let outcome = settle(&s, &sku, "withdraw", outcome).await?;
    count(
        &s.0,
        "withdraw",
        match outcome {
            WithdrawOutcome::Released { .. } => "released",
            WithdrawOutcome::StillClaimed => "still_claimed",
            WithdrawOutcome::NotFound => "not_found",
        },
    );
    Ok(Json(outcome.into()))
}

#[utoipa::path(post, path = "/v1/skus/{sku_id}/reservations/{reservation_id}/lapse", tag = "reservations",
    description = "The expiry job, once its order expired: gives the units back unless the reservation is pinned (a late payment pinned it again).",
    params(("sku_id" = String, Path), ("reservation_id" = String, Path)),
    responses((status = 200, body = ReleaseReply), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn lapse(
    State(s): State<AppState>,
    _service: Service,
    Path((sku_id, id)): Path<(String, String)>,
) -> Result<Json<ReleaseReply>, ApiError> {
    let (sku, id) = parse_ids(&sku_id, &id)?;
    let outcome = s.0.redis.lapse(&sku, id).await;
    let outcome = settle(&s, &sku, "lapse", outcome).await?;
    count(&s.0, "lapse", "ok");
    Ok(Json(outcome.into()))
}

#[utoipa::path(post, path = "/v1/skus/{sku_id}/reservations/{reservation_id}/deduct", tag = "reservations",
    description = "The stock-deduction job, once the real stock was deducted: drops the pinned reservation without giving its units back.",
    params(("sku_id" = String, Path), ("reservation_id" = String, Path)),
    responses((status = 200, body = DeductReply), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn deduct(
    State(s): State<AppState>,
    _service: Service,
    Path((sku_id, id)): Path<(String, String)>,
) -> Result<Json<DeductReply>, ApiError> {
    let (sku, id) = parse_ids(&sku_id, &id)?;
    let deducted = s.0.redis.deduct(&sku, id).await;
    let deducted = settle(&s, &sku, "deduct", deducted).await?;
    count(&s.0, "deduct", "ok");
    Ok(Json(DeductReply { deducted }))
}

#[utoipa::path(delete, path = "/v1/skus/{sku_id}/reservations/{reservation_id}", tag = "reservations",
    params(("sku_id" = String, Path), ("reservation_id" = String, Path)),
    responses((status = 200, body = ReleaseReply), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn release(
    State(s): State<AppState>,
    _service: Service,
    Path((sku_id, id)): Path<(String, String)>,
) -> Result<Json<ReleaseReply>, ApiError> {
    let (sku, id) = parse_ids(&sku_id, &id)?;
    let outcome = s.0.redis.release(&sku, id).await;
    let outcome = settle(&s, &sku, "release", outcome).await?;
    count(&s.0, "release", "ok");
    Ok(Json(outcome.into()))
}

fn count(app: &App, op: &str, outcome: &str) {
    app.prelock_metrics
        .requests
        .with_label_values(&[op, outcome])
        .inc();
}

/// Maps a Redis pre-lock failure to the wire, counting timeouts and starting a rebuild of a
/// SKU that is not loaded (or answering `ERR_UNKNOWN_SKU` if Postgres has no such SKU).
async fn settle<T>(
    s: &AppState,
    sku: &SkuId,
    op: &str,
    r: Result<T, PrelockError>,
) -> Result<T, ApiError> {
    let app = &s.0;
    match r {
        Ok(v) => Ok(v),
        Err(PrelockError::NotLoaded) => {
            count(app, op, "not_loaded");
            let known = skus::get_sku(&app.store.pool, sku.as_str())
                .await
                .map_err(db_error)?;
            if known.is_none() {
                return Err(ApiError::new(
                    ErrorCode::UnknownSku,
                    format!("sku_id: unknown SKU {sku}"),
                ));
            }
            rebuild::spawn_rebuild(&s.0, sku);
            Err(ApiError::new(
                ErrorCode::PrelockNotLoaded,
                "SKU pre-lock is being rebuilt; retry shortly",
            ))
        }
        Err(PrelockError::Mismatch) => {
            count(app, op, "mismatch");
            Err(ApiError::new(
                ErrorCode::IdempotencyMismatch,
                "reservation exists with a different quantity",
            ))
        }
        Err(PrelockError::UnknownSku) => Err(ApiError::new(ErrorCode::UnknownSku, "unknown SKU")),
        Err(e @ (PrelockError::Unavailable(_) | PrelockError::Unreachable(_))) => {
            count(app, op, "timeout");
            app.prelock_metrics.timeouts.with_label_values(&[op]).inc();
            Err(unavailable(e))
        }
    }
}

fn unavailable(e: PrelockError) -> ApiError {
    tracing::warn!(error = %e, "redis pre-lock unavailable");
    ApiError::new(
        ErrorCode::PrelockUnavailable,
        "stock pre-lock store unavailable",
    )
}

fn rebuild_error(e: RebuildError) -> ApiError {
    match e {
        RebuildError::UnknownSku => ApiError::not_found("SKU"),
        RebuildError::Redis(e) => unavailable(e),
        RebuildError::Db(e) => db_error(e),
        RebuildError::Expire(fulfillment::FulfillmentError::Db(e)) => db_error(e),
        RebuildError::Expire(e) => ApiError::internal(e),
    }
}

/// A database failure: 503 with `Retry-After` when Postgres is down, slow or overloaded.
fn db_error(e: postgres_store::sqlx::Error) -> ApiError {
    let transient = postgres_store::is_transient(&e);
    ApiError::dependency(e, transient)
}
