//! The confirmer: every pre-lock is confirmed by its order's commit or given back within
//! seconds (the paper's "delayed confirmation", section 3.1), even when the process that made
//! it died between the reserve and the commit.
//!
//! The reserve script records a pending confirmation in the same atomic step as it takes the
//! units: the reservation, the attempt's claim and the Postgres transaction (xid) that is to
//! write the order (`redis_prelock`, `prelock_pend:{sku}`). A few seconds later
//! (`PRELOCK_CONFIRM_AFTER_MS`) it is due, and this loop settles it by that transaction's
//! fate, read from Postgres (`pg_xact_status`):
//! - **committed**: the order exists (a create commits only with its order row), so the
//!   reservation is claimed by `order`. The order's row is deliberately not read: right after
//!   a commit a fresh snapshot may not see it yet, and a missed order would give its units
//!   away;
//! - **aborted** (rolled back, or its process died and took the connection): the attempt's
//!   claim is withdrawn. The units go back only when nobody else claims them (a retry of the
//!   same order, which claims the reservation it finds, keeps them);
//! - **in progress**: still undecided (a slow commit, a paused process): due again a window
//!   later. A commit that lands late keeps its units;
//! - no xid, or one too old for Postgres to tell: decided by whether the order exists.
//!
//! Which SKUs to look at: the ones this instance reserved on, until their pending set has
//! stayed empty for two windows (a reserve noted just before its script ran is not missed),
//! and every SKU at start and every [`FULL_SCAN`]; a SKU a scan finds with confirmations
//! pending (left by another instance, or by this one before it restarted) is watched from
//! then on like one this instance reserved on.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use domain::SkuId;
use postgres_store::{orders, skus};
use redis_prelock::Verdict;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::App;

/// How often every SKU is looked at, not just the ones this instance reserved on.
pub const FULL_SCAN: Duration = Duration::from_secs(60);

/// Pending confirmations settled per Redis call, and calls per SKU per round at most.
const BATCH: usize = 500;
const BATCHES: usize = 8;

/// Settles due pending confirmations every `PRELOCK_CONFIRM_POLL_MS` until `stop`.
pub async fn run(app: Arc<App>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(app.config.confirm_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut todo: HashSet<String> = app
            .pending_skus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        if last_full.is_none_or(|t| t.elapsed() >= FULL_SCAN) {
            match all_skus(&app).await {
                Ok(all) => {
                    last_full = Some(tokio::time::Instant::now());
                    todo.extend(all);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "SKUs not listed for the confirmer; will retry")
                }
            }
        }
        let quiet = 2 * app.config.confirm_after;
        for sku in todo {
            let Ok(id) = SkuId::parse(&sku) else { continue };
            match confirm_sku(&app, &id).await {
                Ok(0) => {
                    let mut pending = app.pending_skus.lock().unwrap_or_else(|p| p.into_inner());
                    if pending
                        .get(&sku)
                        .is_some_and(|noted| noted.elapsed() >= quiet)
                    {
                        pending.remove(&sku);
                    }
                }
                // found by a scan, or still pending: watched until it empties
                Ok(_) => {
                    app.pending_skus
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(sku)
                        .or_insert_with(std::time::Instant::now);
                }
                Err(e) => {
                    tracing::warn!(%sku, error = %e, "pending pre-lock confirmations not settled; will retry")
                }
            }
        }
    }
}

/// The whole catalogue, a page at a time.
async fn all_skus(app: &App) -> Result<Vec<String>, postgres_store::sqlx::Error> {
    let mut all: Vec<String> = Vec::new();
    loop {
        let after = all.last().cloned().unwrap_or_default();
        let page = skus::sku_ids_after(&app.store.pool, &after, 1000).await?;
        let short = page.len() < 1000;
        all.extend(page);
        if short {
            return Ok(all);
        }
    }
}

/// Settles the due pending confirmations of one SKU; returns how many are still pending (due
/// later, or undecided).
pub async fn confirm_sku(app: &App, sku: &SkuId) -> anyhow::Result<usize> {
    let mut left = 0;
    for _ in 0..BATCHES {
        let (due, total) = app.redis.pending_due(sku, BATCH).await?;
        left = total;
        if due.is_empty() {
            break;
        }
        let txids: Vec<i64> = due.iter().filter_map(|p| p.txid).collect();
        let statuses: std::collections::HashMap<i64, Option<String>> =
            skus::transaction_statuses(&app.store.pool, &txids)
                .await?
                .into_iter()
                .collect();
        let mut verdicts = Vec::with_capacity(due.len());
        let mut by_order = Vec::new();
        for p in due.iter() {
            let status = p.txid.and_then(|t| statuses.get(&t).cloned().flatten());
            match status.as_deref() {
                Some("committed") => verdicts.push((p.clone(), Verdict::Order)),
                Some("aborted") => verdicts.push((p.clone(), Verdict::Gone)),
                Some(_) => verdicts.push((p.clone(), Verdict::Later)),
                // no xid, or too old to tell: its transaction ended long ago
                None => by_order.push(p.clone()),
            }
        }
        if !by_order.is_empty() {
            let ids: Vec<Uuid> = by_order
                .iter()
                .filter_map(|p| Uuid::parse_str(&p.reservation).ok())
                .collect();
            let exist: HashSet<String> = orders::existing_orders(&app.store.pool, &ids)
                .await?
                .into_iter()
                .map(|id| id.to_string())
                .collect();
            for p in by_order {
                let v = if exist.contains(&p.reservation) {
                    Verdict::Order
                } else {
                    Verdict::Gone
                };
                verdicts.push((p, v));
            }
        }
        let undecided = verdicts
            .iter()
            .filter(|(_, v)| *v == Verdict::Later)
            .count();
        let done = app.redis.confirm(sku, &verdicts).await?;
        let m = &app.prelock_metrics.confirmations;
        m.with_label_values(&["confirmed"]).inc_by(done.confirmed);
        m.with_label_values(&["still_claimed"])
            .inc_by(done.still_claimed);
        m.with_label_values(&["undecided"]).inc_by(undecided as u64);
        if done.given_back > 0 {
            m.with_label_values(&["given_back"]).inc();
            app.prelock_metrics
                .given_back_units
                .with_label_values::<&str>(&[])
                .inc_by(done.given_back);
            tracing::warn!(%sku, units = done.given_back, "gave back pre-locks whose order never committed");
        }
        left = total - (verdicts.len() - undecided);
        if due.len() < BATCH {
            break;
        }
    }
    Ok(left)
}
