//! Rebuilding Redis from Postgres.
//!
//! `available = stock_real - units held by live reservations`, and every live reservation is
//! written back with its lapse time (or pinned, if confirmed). Each SKU is rebuilt in its own
//! transaction holding that SKU's *exclusive* advisory lock: order creation, payment and
//! cancellation hold the shared one while they talk to Redis, so the rebuild waits for
//! in-flight reservations to commit (or roll back) and no new one starts until it is done.
//! That is what makes it safe while orders flow, including right after Redis lost everything.
//!
//! A rebuild never restores more than `stock_real` ([`domain::stock::plan_rebuild`]): if the
//! ledger holds more (a defect, a hand edit), paid reservations win, the newest unpaid ones
//! lose and their orders are expired in the same transaction (`OrderExpired`, reason
//! `overcommitted`), and the rebuild reports them. Writing every reservation back would let
//! each of them be paid: an oversell.
//!
//! Purchase limits are rebuilt from the same snapshot: each buyer's count is the units of
//! their paid orders of the SKU plus those of the reservations written back (never more), and
//! each reservation written back carries its buyer, so its units stop counting when they go
//! back. A count Redis lost is therefore restored before the SKU serves again, and a count
//! that drifted (a refunded order's units, which Redis keeps counting) is repaired by the
//! reconciliation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::stock::{plan_rebuild, LiveHold};
use domain::SkuId;
use postgres_store::{lock_sku_exclusive, skus};
use serde::Serialize;
use uuid::Uuid;

use crate::App;
pub use prelock_api::ReconcileReport;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuiltSku {
    pub available: i64,
    pub reservations: usize,
    /// Unpaid orders expired because the ledger held more than `stock_real`.
    pub expired: Vec<Uuid>,
    /// Paid units beyond `stock_real` (0 unless units were already sold twice).
    pub paid_over_stock: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("unknown SKU")]
    UnknownSku,
    #[error("postgres: {0}")]
    Db(#[from] postgres_store::sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] domain::ports::PrelockError),
    #[error("expiring an over-committed order: {0}")]
    Expire(#[from] fulfillment::FulfillmentError),
}

/// Rebuilds one SKU under its exclusive lock.
pub async fn rebuild_sku(app: &App, sku: &SkuId) -> Result<RebuiltSku, RebuildError> {
    let mut tx = app.store.begin().await?;
    lock_sku_exclusive(&mut tx, sku.as_str()).await?;
    let row = skus::get_sku(&mut *tx, sku.as_str())
        .await?
        .ok_or(RebuildError::UnknownSku)?;
    let rebuilt = write_back(app, &mut tx, sku, &row).await?;
    tx.commit().await?;
    Ok(rebuilt)
}

/// The SKU's live reservations and what Redis should hold for them ([`plan_rebuild`]: never
/// more than `stock_real`; the plan's indexes point into the reservations).
async fn ledger_plan(
    conn: &mut postgres_store::sqlx::PgConnection,
    sku: &SkuId,
    row: &skus::SkuRow,
) -> Result<
    (
        Vec<skus::LiveReservation>,
        domain::stock::RebuildPlan<usize>,
    ),
    RebuildError,
> {
    let live = skus::live_reservations(&mut *conn, sku.as_str()).await?;
    let holds: Vec<LiveHold<usize>> = live
        .iter()
        .enumerate()
        .map(|(i, r)| LiveHold {
            id: i,
            quantity: r.quantity as u32,
            paid: r.expires_at.is_none(),
        })
        .collect();
    let plan = plan_rebuild(row.stock_real, &holds);
    Ok((live, plan))
}

/// Writes the SKU's ledger to Redis, never more than `stock_real` of it (expiring the newest
/// unpaid orders that do not fit, in `conn`'s transaction). The caller holds the SKU's
/// exclusive lock in `conn` and commits.
pub async fn write_back(
    app: &App,
    conn: &mut postgres_store::sqlx::PgConnection,
    sku: &SkuId,
    row: &skus::SkuRow,
) -> Result<RebuiltSku, RebuildError> {
    let (live, plan) = ledger_plan(conn, sku, row).await?;
    let mut expired = Vec::new();
    for &i in &plan.expire {
        let order_id = live[i].order_id;
        if fulfillment::orders::expire_pending(&mut *conn, order_id, "overcommitted")
            .await?
            .is_none()
        {
            // not PENDING with an ACTIVE reservation: the ledger row is stale; drop it too
            postgres_store::orders::set_reservation(&mut *conn, order_id, "RELEASED", None).await?;
        }
        expired.push(order_id);
    }
    if !expired.is_empty() {
        app.prelock_metrics
            .overcommit
            .with_label_values(&["expired_order"])
            .inc_by(expired.len() as u64);
        tracing::error!(%sku, stock_real = row.stock_real, expired = ?expired, "ledger over-committed: expired the newest unpaid orders that did not fit the stock");
    }
    if plan.paid_over_stock > 0 {
        app.prelock_metrics
            .overcommit
            .with_label_values(&["paid_over_stock"])
            .inc();
        tracing::error!(%sku, stock_real = row.stock_real, paid_over_stock = plan.paid_over_stock, "paid reservations exceed the real stock: units were sold twice; pre-locking nothing more");
    }
    let entries: Vec<_> = plan
        .keep
        .iter()
        .map(|&i| {
            let r = &live[i];
            (
                r.order_id.to_string(),
                r.quantity as u32,
                r.expires_at.map(|t| t.timestamp_millis()),
            )
        })
        .collect();
    let purchases = purchases(conn, sku, row, &live, &plan).await?;
    let ttl = row
        .prelock_ttl_seconds
        .map(|s| Duration::from_secs(s as u64));
    app.redis
        .replace_sku(sku, plan.available, ttl, &entries, &purchases)
        .await?;
    Ok(RebuiltSku {
        available: plan.available,
        reservations: entries.len(),
        expired,
        paid_over_stock: plan.paid_over_stock,
    })
}

/// The purchase-limit state the ledger gives for the reservations `plan` keeps.
async fn purchases(
    conn: &mut postgres_store::sqlx::PgConnection,
    sku: &SkuId,
    row: &skus::SkuRow,
    live: &[skus::LiveReservation],
    plan: &domain::stock::RebuildPlan<usize>,
) -> Result<redis_prelock::Purchases, RebuildError> {
    let kept: Vec<Uuid> = plan.keep.iter().map(|&i| live[i].order_id).collect();
    let bought = skus::bought_units(&mut *conn, sku.as_str(), &kept).await?;
    Ok(redis_prelock::Purchases {
        limit: row.max_per_buyer.map(|n| n.max(0) as u32),
        bought: bought
            .into_iter()
            .map(|(buyer, n)| (buyer, u32::try_from(n).unwrap_or(u32::MAX)))
            .collect(),
        buyer_of: plan
            .keep
            .iter()
            .map(|&i| (live[i].order_id.to_string(), live[i].user_id.clone()))
            .collect(),
    })
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct RebuildReport {
    pub skus: u64,
    pub reservations: u64,
    pub failed: Vec<String>,
    /// Unpaid orders expired because their SKU's ledger held more than its real stock.
    pub expired_orders: Vec<String>,
    /// SKUs whose paid reservations alone exceed the real stock (already oversold).
    pub paid_over_stock: Vec<String>,
    pub duration_ms: u64,
}

/// The catalogue in id order, 500 SKUs at a time (ids that do not parse are skipped).
#[derive(Default)]
struct SkuWalk {
    after: String,
}

impl SkuWalk {
    async fn next_page(&mut self, app: &App) -> Result<Option<Vec<(String, SkuId)>>, RebuildError> {
        let page = skus::sku_ids_after(&app.store.pool, &self.after, 500).await?;
        let Some(last) = page.last() else {
            return Ok(None);
        };
        self.after = last.clone();
        Ok(Some(
            page.into_iter()
                .filter_map(|id| SkuId::parse(&id).ok().map(|sku| (id, sku)))
                .collect(),
        ))
    }
}

/// Rebuilds every SKU, a page at a time, logging progress. A SKU that fails is reported and
/// skipped (its reserves answer 503 and retry their own rebuild); the rest go on.
pub async fn rebuild_all(app: &App, trigger: &str) -> Result<RebuildReport, RebuildError> {
    let started = Instant::now();
    let total = skus::count_skus(&app.store.pool).await?;
    let mut report = RebuildReport::default();
    let mut walk = SkuWalk::default();
    tracing::info!(total, trigger, "rebuild started");
    while let Some(page) = walk.next_page(app).await? {
        for (id, sku) in page {
            match rebuild_sku(app, &sku).await {
                Ok(r) => {
                    report.skus += 1;
                    report.reservations += r.reservations as u64;
                    report
                        .expired_orders
                        .extend(r.expired.iter().map(Uuid::to_string));
                    if r.paid_over_stock > 0 {
                        report.paid_over_stock.push(id.clone());
                    }
                    app.prelock_metrics
                        .rebuilds
                        .with_label_values(&[trigger, "ok"])
                        .inc();
                }
                Err(e) => {
                    tracing::error!(%sku, error = %e, "rebuild of SKU failed");
                    app.prelock_metrics
                        .rebuilds
                        .with_label_values(&[trigger, "error"])
                        .inc();
                    report.failed.push(id);
                }
            }
            let done = report.skus + report.failed.len() as u64;
            if done.is_multiple_of(1000) {
                tracing::info!(done, total, "rebuild progress");
            }
        }
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        skus = report.skus,
        reservations = report.reservations,
        failed = report.failed.len(),
        expired_orders = report.expired_orders.len(),
        duration_ms = report.duration_ms,
        "rebuild finished"
    );
    Ok(report)
}

/// Compares one SKU's Redis state with what Postgres says it should be (under the SKU's
/// exclusive lock, so nothing is in flight) and, if they differ, writes Postgres's version
/// back. Reservations Redis still holds past their lapse time count as lapsed (Redis returns
/// them lazily). `true` if the SKU had drifted and was repaired.
pub async fn reconcile_sku(app: &App, sku: &SkuId) -> Result<bool, RebuildError> {
    let mut tx = app.store.begin().await?;
    lock_sku_exclusive(&mut tx, sku.as_str()).await?;
    let row = skus::get_sku(&mut *tx, sku.as_str())
        .await?
        .ok_or(RebuildError::UnknownSku)?;
    let (live, plan) = ledger_plan(&mut tx, sku, &row).await?;
    let mut want: Vec<(String, u32, bool)> = plan
        .keep
        .iter()
        .map(|&i| {
            let r = &live[i];
            (
                r.order_id.to_string(),
                r.quantity as u32,
                r.expires_at.is_none(),
            )
        })
        .collect();
    want.sort();
    let now_ms = app.redis.now_ms().await?;
    let available = app.redis.available(sku).await?;
    let mut lapsed_units = 0i64;
    let mut have: Vec<(String, u32, bool)> = Vec::new();
    for (id, quantity, expires_at) in app.redis.held(sku).await? {
        match expires_at {
            Some(at) if at <= now_ms => lapsed_units += i64::from(quantity),
            _ => have.push((id, quantity, expires_at.is_none())),
        }
    }
    have.sort();
    // lapsed reservations still in Redis count against their buyers until reclaimed: only
    // compare purchase counts when nothing has lapsed unreclaimed
    let purchases_drifted = lapsed_units == 0
        && app.redis.bought(sku).await?
            != purchases(&mut tx, sku, &row, &live, &plan).await?.bought;
    let drifted = available.map(|a| a + lapsed_units) != Some(plan.available)
        || have != want
        || purchases_drifted
        || !plan.expire.is_empty();
    if drifted {
        tracing::warn!(
            %sku,
            redis_available = ?available,
            postgres_available = plan.available,
            redis_reservations = have.len(),
            postgres_reservations = want.len(),
            "Redis had drifted from Postgres; writing Postgres's state back"
        );
        write_back(app, &mut tx, sku, &row).await?;
    }
    tx.commit().await?;
    Ok(drifted)
}

/// [`reconcile_sku`] over the whole catalogue, a page at a time; a SKU that fails is reported
/// and the walk goes on.
pub async fn reconcile_all(app: &App) -> Result<ReconcileReport, RebuildError> {
    let started = Instant::now();
    let mut report = ReconcileReport::default();
    let mut walk = SkuWalk::default();
    while let Some(page) = walk.next_page(app).await? {
        for (id, sku) in page {
            match reconcile_sku(app, &sku).await {
                Ok(drifted) => {
                    report.skus += 1;
                    if drifted {
                        app.prelock_metrics
                            .drift
                            .with_label_values::<&str>(&[])
                            .inc();
                        report.drifted.push(id);
                    }
                }
                Err(e) => {
                    tracing::error!(%sku, error = %e, "reconciling SKU failed");
                    report.failed.push(id);
                }
            }
        }
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        skus = report.skus,
        drifted = report.drifted.len(),
        failed = report.failed.len(),
        duration_ms = report.duration_ms,
        "reconciliation finished"
    );
    Ok(report)
}

/// Starts a background rebuild of `sku` unless one is already running. Used when Redis says
/// a SKU is not loaded: the caller answers 503 at once (it may hold the SKU's shared lock,
/// which the rebuild must wait for), and its retry finds the SKU loaded.
pub fn spawn_rebuild(app: &Arc<App>, sku: &SkuId) {
    {
        let mut running = app.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
        if !running.insert(sku.as_str().to_owned()) {
            return;
        }
    }
    let tasks = app.tasks.clone();
    let app = app.clone();
    let sku = sku.clone();
    tasks.spawn(async move {
        let result = rebuild_sku(&app, &sku).await;
        app.rebuilding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sku.as_str());
        match result {
            Ok(r) => {
                app.prelock_metrics
                    .rebuilds
                    .with_label_values(&["not_loaded", "ok"])
                    .inc();
                tracing::warn!(%sku, available = r.available, reservations = r.reservations, "SKU was not loaded in Redis; rebuilt from Postgres");
            }
            Err(e) => {
                app.prelock_metrics
                    .rebuilds
                    .with_label_values(&["not_loaded", "error"])
                    .inc();
                tracing::error!(%sku, error = %e, "background rebuild failed");
            }
        }
    });
}
