//! SKUs and the reservations ledger, as stock sees it.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SkuRow {
    pub id: String,
    pub store_id: String,
    pub price_cents: i64,
    pub stock_real: i64,
    pub prelock_ttl_seconds: Option<i32>,
    /// Most units one buyer may hold; `None` = the service default.
    pub max_per_buyer: Option<i32>,
}

const SKU_COLUMNS: &str =
    "id, store_id, price_cents, stock_real, prelock_ttl_seconds, max_per_buyer";

/// Units held by live reservations: confirmed ones, and active ones not yet lapsed. Uses the
/// wall clock (not the transaction start), since a rebuild may wait for its lock.
const HELD: &str =
    "(status = 'CONFIRMED' OR (status = 'ACTIVE' AND expires_at > clock_timestamp()))";

pub async fn get_sku(ex: impl PgExecutor<'_>, id: &str) -> Result<Option<SkuRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {SKU_COLUMNS} FROM skus WHERE id = $1"))
        .bind(id)
        .fetch_optional(ex)
        .await
}

/// Reads a SKU and takes its shared advisory lock in one round trip (see
/// [`crate::lock_sku_shared`]). No row, no lock.
pub async fn get_sku_locked_shared(
    conn: &mut PgConnection,
    id: &str,
) -> Result<Option<SkuRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {SKU_COLUMNS} FROM skus
         WHERE id = $1 AND pg_advisory_xact_lock_shared($2, hashtext($1)) IS NOT NULL"
    ))
    .bind(id)
    .bind(crate::SKU_LOCK_SPACE)
    .fetch_optional(conn)
    .await
}

/// [`get_sku_locked_shared`] for a create: also the id of the caller's transaction (its
/// xid), taken in the same round trip; the pre-lock's pending confirmation is settled by that
/// transaction's fate.
pub async fn get_sku_for_create(
    conn: &mut PgConnection,
    id: &str,
) -> Result<Option<(SkuRow, i64)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        sku: SkuRow,
        txid: i64,
    }
    let row: Option<Row> = sqlx::query_as(&format!(
        "SELECT {SKU_COLUMNS}, pg_current_xact_id()::text::bigint AS txid FROM skus
         WHERE id = $1 AND pg_advisory_xact_lock_shared($2, hashtext($1)) IS NOT NULL"
    ))
    .bind(id)
    .bind(crate::SKU_LOCK_SPACE)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| (r.sku, r.txid)))
}

/// How the transactions `txids` (xids) ended, as far as Postgres knows now: `committed`,
/// `aborted`, `in progress`, or `None` when one is too old to tell.
pub async fn transaction_statuses(
    ex: impl PgExecutor<'_>,
    txids: &[i64],
) -> Result<Vec<(i64, Option<String>)>, sqlx::Error> {
    sqlx::query_as("SELECT x, pg_xact_status(x::text::xid8) FROM unnest($1::bigint[]) x")
        .bind(txids)
        .fetch_all(ex)
        .await
}

/// Creates or updates a SKU (stock admin). Returns the row as stored.
pub async fn upsert_sku(
    conn: &mut PgConnection,
    id: &str,
    store_id: &str,
    price_cents: i64,
    stock_real: i64,
    prelock_ttl_seconds: Option<i32>,
    max_per_buyer: Option<i32>,
) -> Result<SkuRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO skus (id, store_id, price_cents, stock_real, prelock_ttl_seconds,
                           max_per_buyer)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO UPDATE SET store_id = EXCLUDED.store_id,
             price_cents = EXCLUDED.price_cents, stock_real = EXCLUDED.stock_real,
             -- a restock that names no pre-lock lifetime or limit keeps the SKU's (mid-sale,
             -- leaving one out must not lift a limit nor stretch the pre-locks)
             prelock_ttl_seconds = COALESCE(EXCLUDED.prelock_ttl_seconds, skus.prelock_ttl_seconds),
             max_per_buyer = COALESCE(EXCLUDED.max_per_buyer, skus.max_per_buyer),
             updated_at = now()
         RETURNING {SKU_COLUMNS}"
    ))
    .bind(id)
    .bind(store_id)
    .bind(price_cents)
    .bind(stock_real)
    .bind(prelock_ttl_seconds)
    .bind(max_per_buyer)
    .fetch_one(conn)
    .await
}

/// A paid order's units leave the real stock for good (the stock-deduction job).
pub async fn deduct_stock(
    conn: &mut PgConnection,
    sku: &str,
    quantity: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE skus SET stock_real = stock_real - $2, updated_at = now() WHERE id = $1")
        .bind(sku)
        .bind(quantity)
        .execute(conn)
        .await
        .map(|_| ())
}

pub async fn held_units(ex: impl PgExecutor<'_>, sku: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT COALESCE(SUM(quantity), 0)::bigint FROM reservations WHERE sku_id = $1 AND {HELD}"
    ))
    .bind(sku)
    .fetch_one(ex)
    .await
}

/// A live reservation, as a rebuild writes it back to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveReservation {
    pub order_id: Uuid,
    /// The order's buyer, whose purchase limit the units count against.
    pub user_id: String,
    pub quantity: i32,
    /// `None` once confirmed (it never lapses).
    pub expires_at: Option<DateTime<Utc>>,
}

/// A SKU's live reservations, oldest first (the order a rebuild keeps them in when the
/// stock cannot hold them all).
pub async fn live_reservations(
    ex: impl PgExecutor<'_>,
    sku: &str,
) -> Result<Vec<LiveReservation>, sqlx::Error> {
    let rows: Vec<(Uuid, String, i32, String, DateTime<Utc>)> = sqlx::query_as(&format!(
        "SELECT order_id, (SELECT o.user_id FROM orders o WHERE o.id = reservations.order_id),
                quantity, status, expires_at
         FROM reservations
         WHERE sku_id = $1 AND {HELD} ORDER BY created_at, order_id"
    ))
    .bind(sku)
    .fetch_all(ex)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(order_id, user_id, quantity, status, expires_at)| LiveReservation {
                order_id,
                user_id,
                quantity,
                expires_at: (status == "ACTIVE").then_some(expires_at),
            },
        )
        .collect())
}

/// What each buyer holds of a SKU, by the ledger, for its purchase limit: paid orders
/// (`PAID`, `CONFIRMED`, `REDEEMED`: deducted or not, the buyer bought them) and the orders of
/// `live` (the reservations a rebuild keeps). Sorted by buyer.
pub async fn bought_units(
    ex: impl PgExecutor<'_>,
    sku: &str,
    live: &[Uuid],
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT user_id, sum(quantity)::bigint FROM (
             SELECT user_id, quantity FROM orders
             WHERE sku_id = $1 AND state IN ('PAID', 'CONFIRMED', 'REDEEMED')
             UNION ALL
             SELECT user_id, quantity FROM orders
             WHERE id = ANY($2) AND state NOT IN ('PAID', 'CONFIRMED', 'REDEEMED')
         ) held GROUP BY user_id ORDER BY user_id",
    )
    .bind(sku)
    .bind(live)
    .fetch_all(ex)
    .await
}

/// SKU ids in id order, a page at a time (rebuild walks the catalogue with this).
pub async fn sku_ids_after(
    ex: impl PgExecutor<'_>,
    after: &str,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM skus WHERE id > $1 ORDER BY id LIMIT $2")
        .bind(after)
        .bind(limit)
        .fetch_all(ex)
        .await
}

pub async fn count_skus(ex: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM skus")
        .fetch_one(ex)
        .await
}
