//! Vouchers: what the buyer shows at the bar, one per paid order.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VoucherRow {
    pub order_id: Uuid,
    pub code: String,
    pub issued_at: DateTime<Utc>,
    pub redeemed_at: Option<DateTime<Utc>>,
}

/// Issues `code` for the order unless it has a voucher already; returns the order's voucher
/// and whether this call issued it.
pub async fn issue(
    conn: &mut PgConnection,
    order_id: Uuid,
    code: &str,
) -> Result<(VoucherRow, bool), sqlx::Error> {
    let new: Option<VoucherRow> = sqlx::query_as(
        "INSERT INTO vouchers (order_id, code) VALUES ($1, $2)
         ON CONFLICT (order_id) DO NOTHING
         RETURNING order_id, code, issued_at, redeemed_at",
    )
    .bind(order_id)
    .bind(code)
    .fetch_optional(&mut *conn)
    .await?;
    match new {
        Some(v) => Ok((v, true)),
        None => Ok((
            of_order(&mut *conn, order_id)
                .await?
                .ok_or(sqlx::Error::RowNotFound)?,
            false,
        )),
    }
}

pub async fn of_order(
    ex: impl PgExecutor<'_>,
    order_id: Uuid,
) -> Result<Option<VoucherRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT order_id, code, issued_at, redeemed_at FROM vouchers WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(ex)
    .await
}

pub async fn by_code(
    ex: impl PgExecutor<'_>,
    code: &str,
) -> Result<Option<VoucherRow>, sqlx::Error> {
    sqlx::query_as("SELECT order_id, code, issued_at, redeemed_at FROM vouchers WHERE code = $1")
        .bind(code)
        .fetch_optional(ex)
        .await
}

pub async fn mark_redeemed(conn: &mut PgConnection, order_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE vouchers SET redeemed_at = now() WHERE order_id = $1")
        .bind(order_id)
        .execute(conn)
        .await
        .map(|_| ())
}
