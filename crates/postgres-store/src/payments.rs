//! Payments and the provider events applied to them.

use chrono::{DateTime, Utc};
use domain::{PaymentStatus, Provider};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct PaymentRow {
    pub id: Uuid,
    pub order_id: Uuid,
    pub provider: Provider,
    pub amount_cents: i64,
    pub status: PaymentStatus,
    pub pay_url: String,
}

type RawPayment = (Uuid, Uuid, String, i64, String, String);

fn decode(r: RawPayment) -> Result<PaymentRow, sqlx::Error> {
    let (id, order_id, provider, amount_cents, status, pay_url) = r;
    Ok(PaymentRow {
        id,
        order_id,
        provider: provider
            .parse()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        amount_cents,
        status: PaymentStatus::parse(&status)
            .ok_or_else(|| sqlx::Error::Decode(format!("payment status {status:?}").into()))?,
        pay_url,
    })
}

const PAYMENT_COLUMNS: &str = "id, order_id, provider, amount_cents, status, pay_url";

/// Records a started payment, unless the order already has an open one at this provider
/// (`payments_one_open`): then nothing is written and that payment is returned instead, so
/// concurrent "start payment" calls all answer with one payment.
pub async fn insert_payment_or_open(
    conn: &mut PgConnection,
    id: Uuid,
    order_id: Uuid,
    provider: Provider,
    amount_cents: i64,
    pay_url: &str,
) -> Result<PaymentRow, sqlx::Error> {
    let inserted: Option<RawPayment> = sqlx::query_as(&format!(
        "INSERT INTO payments (id, order_id, provider, amount_cents, status, pay_url)
         VALUES ($1, $2, $3, $4, 'CREATED', $5)
         ON CONFLICT (order_id, provider) WHERE status = 'CREATED' DO NOTHING
         RETURNING {PAYMENT_COLUMNS}"
    ))
    .bind(id)
    .bind(order_id)
    .bind(provider.as_str())
    .bind(amount_cents)
    .bind(pay_url)
    .fetch_optional(&mut *conn)
    .await?;
    match inserted {
        Some(raw) => decode(raw),
        // the winner committed before our insert returned (the index made us wait for it)
        None => open_payment(&mut *conn, order_id, provider)
            .await?
            .ok_or(sqlx::Error::RowNotFound),
    }
}

/// The trace context of the order `payment_id` pays (`None` for an unknown payment or an order
/// created before traces were kept).
pub async fn order_traceparent(
    ex: impl PgExecutor<'_>,
    payment_id: Uuid,
) -> Result<Option<String>, sqlx::Error> {
    let tp: Option<Option<String>> = sqlx::query_scalar(
        "SELECT o.traceparent FROM payments p JOIN orders o ON o.id = p.order_id
         WHERE p.id = $1",
    )
    .bind(payment_id)
    .fetch_optional(ex)
    .await?;
    Ok(tp.flatten())
}

/// The order's open (CREATED) payment at `provider`, if any: starting a payment twice at one
/// provider returns the first.
pub async fn open_payment(
    ex: impl PgExecutor<'_>,
    order_id: Uuid,
    provider: Provider,
) -> Result<Option<PaymentRow>, sqlx::Error> {
    let raw: Option<RawPayment> = sqlx::query_as(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments
         WHERE order_id = $1 AND provider = $2 AND status = 'CREATED'
         ORDER BY created_at LIMIT 1"
    ))
    .bind(order_id)
    .bind(provider.as_str())
    .fetch_optional(ex)
    .await?;
    raw.map(decode).transpose()
}

pub async fn payments_of_order(
    ex: impl PgExecutor<'_>,
    order_id: Uuid,
) -> Result<Vec<PaymentRow>, sqlx::Error> {
    let raw: Vec<RawPayment> = sqlx::query_as(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE order_id = $1 ORDER BY created_at"
    ))
    .bind(order_id)
    .fetch_all(ex)
    .await?;
    raw.into_iter().map(decode).collect()
}

/// REFUND_REQUIRED -> REFUNDED, with the provider's refund id (in the caller's transaction,
/// which holds the payment's lock).
pub async fn mark_refunded(
    conn: &mut PgConnection,
    id: Uuid,
    refund_id: &str,
    refunded_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE payments SET status = 'REFUNDED', refund_id = $2, refunded_at = $3,
             updated_at = now()
         WHERE id = $1 AND status = 'REFUND_REQUIRED'",
    )
    .bind(id)
    .bind(refund_id)
    .bind(refunded_at)
    .execute(&mut *conn)
    .await?;
    // a refund archived as failing (the provider kept refusing, then took it) is settled now
    resolve_failures(conn, id, "refunded").await
}

/// Resolves the open compensation failure of a payment that just settled (`resolution`:
/// how).
async fn resolve_failures(
    ex: impl PgExecutor<'_>,
    payment_id: Uuid,
    resolution: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE compensation_failure SET status = 'resolved', resolution = $2,
             resolved_at = now(), updated_at = now()
         WHERE payment_id = $1 AND status = 'open'",
    )
    .bind(payment_id)
    .bind(resolution)
    .execute(ex)
    .await
    .map(|_| ())
}

/// One payment, unlocked (the compensation worker's first look).
pub async fn get_payment(
    ex: impl PgExecutor<'_>,
    id: Uuid,
) -> Result<Option<PaymentRow>, sqlx::Error> {
    let raw: Option<RawPayment> = sqlx::query_as(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(ex)
    .await?;
    raw.map(decode).transpose()
}

/// Locks the payment row for the rest of the transaction: every application of one payment
/// (webhook, compensation, replay, duplicates) is serialised here.
pub async fn lock_payment(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<PaymentRow>, sqlx::Error> {
    let raw: Option<RawPayment> = sqlx::query_as(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    raw.map(decode).transpose()
}

pub struct NewPaymentEvent<'a> {
    pub provider: Provider,
    pub provider_event_id: &'a str,
    pub payment_id: Uuid,
    pub source: &'a str,
    pub amount_cents: i64,
    pub outcome: &'a str,
}

/// Records a provider event; `false` if this provider event id was recorded before. A
/// concurrent duplicate waits on the unique index until the first transaction ends.
pub async fn record_event(
    conn: &mut PgConnection,
    e: &NewPaymentEvent<'_>,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "INSERT INTO payment_events (provider, provider_event_id, payment_id, source,
             amount_cents, outcome)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (provider, provider_event_id) DO NOTHING",
    )
    .bind(e.provider.as_str())
    .bind(e.provider_event_id)
    .bind(e.payment_id)
    .bind(e.source)
    .bind(e.amount_cents)
    .bind(e.outcome)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Settles the payment with a provider result, and resolves an open compensation failure of
/// it (the money arrived after all: by callback, a later check or an operator's replay, named
/// by `source`).
pub async fn settle_payment(
    conn: &mut PgConnection,
    id: Uuid,
    status: PaymentStatus,
    provider_event_id: &str,
    paid_at: DateTime<Utc>,
    source: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE payments SET status = $2, provider_event_id = $3, paid_at = $4,
             updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(status.as_str())
    .bind(provider_event_id)
    .bind(paid_at)
    .execute(&mut *conn)
    .await?;
    resolve_failures(conn, id, source).await
}

/// CREATED -> CLOSED: the provider closed it unpaid (no money can arrive for it now), and an
/// open compensation failure of it is resolved (`closed_at_provider`). `false` if it was no
/// longer CREATED.
pub async fn close_payment(pool: &sqlx::PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let r = sqlx::query(
        "UPDATE payments SET status = 'CLOSED', updated_at = now()
         WHERE id = $1 AND status = 'CREATED'",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    if r.rows_affected() == 1 {
        resolve_failures(&mut *tx, id, "closed_at_provider").await?;
    }
    tx.commit().await?;
    Ok(r.rows_affected() == 1)
}

/// The payments of an order that are still open (CREATED), in the caller's transaction.
pub async fn open_payments_of_order(
    ex: impl PgExecutor<'_>,
    order_id: Uuid,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM payments WHERE order_id = $1 AND status = 'CREATED'")
        .bind(order_id)
        .fetch_all(ex)
        .await
}
