//! Orders and their reservations.

use chrono::{DateTime, Utc};
use domain::order::{check_transition, OrderState, TransitionError, Versioned};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use job_engine::NewJob;

use crate::effects::OutboxEvent;

#[derive(Debug, Clone)]
pub struct OrderRow {
    pub id: Uuid,
    pub user_id: String,
    pub sku_id: String,
    pub store_id: String,
    pub quantity: i32,
    pub unit_price_cents: i64,
    pub amount_cents: i64,
    pub state: OrderState,
    pub version: i32,
    pub request_fingerprint: String,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The trace context of the request that created the order (see `service_kit::trace`).
    pub traceparent: Option<String>,
}

impl OrderRow {
    pub fn versioned(&self) -> Versioned {
        Versioned {
            state: self.state,
            version: self.version,
        }
    }
}

#[derive(sqlx::FromRow)]
struct RawOrder {
    id: Uuid,
    user_id: String,
    sku_id: String,
    store_id: String,
    quantity: i32,
    unit_price_cents: i64,
    amount_cents: i64,
    state: String,
    version: i32,
    request_fingerprint: String,
    expires_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    traceparent: Option<String>,
}

impl TryFrom<RawOrder> for OrderRow {
    type Error = sqlx::Error;
    fn try_from(r: RawOrder) -> Result<Self, Self::Error> {
        let state = r
            .state
            .parse()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        Ok(OrderRow {
            id: r.id,
            user_id: r.user_id,
            sku_id: r.sku_id,
            store_id: r.store_id,
            quantity: r.quantity,
            unit_price_cents: r.unit_price_cents,
            amount_cents: r.amount_cents,
            state,
            version: r.version,
            request_fingerprint: r.request_fingerprint,
            expires_at: r.expires_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
            traceparent: r.traceparent,
        })
    }
}

const ORDER_COLUMNS: &str = "id, user_id, sku_id, store_id, quantity, unit_price_cents, \
    amount_cents, state, version, request_fingerprint, expires_at, created_at, updated_at, \
    traceparent";

/// The trace context of order `id` (`None` for an unknown order or one created before traces
/// were kept).
pub async fn order_traceparent(
    ex: impl PgExecutor<'_>,
    id: Uuid,
) -> Result<Option<String>, sqlx::Error> {
    let tp: Option<Option<String>> =
        sqlx::query_scalar("SELECT traceparent FROM orders WHERE id = $1")
            .bind(id)
            .fetch_optional(ex)
            .await?;
    Ok(tp.flatten())
}

pub async fn find_order(
    ex: impl PgExecutor<'_>,
    id: Uuid,
) -> Result<Option<OrderRow>, sqlx::Error> {
    let raw: Option<RawOrder> =
        sqlx::query_as(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"))
            .bind(id)
            .fetch_optional(ex)
            .await?;
    raw.map(OrderRow::try_from).transpose()
}

/// Reads the order and locks its row for the rest of the transaction: the follow-up jobs of
/// one order (deduct, voucher) run one at a time, so the last of them sees the others' work.
pub async fn lock_order(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<OrderRow>, sqlx::Error> {
    let raw: Option<RawOrder> = sqlx::query_as(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    raw.map(OrderRow::try_from).transpose()
}

/// The ledger status of an order's reservation (ACTIVE, CONFIRMED, ALLOCATED, RELEASED).
pub async fn reservation_status(
    ex: impl PgExecutor<'_>,
    order_id: Uuid,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM reservations WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(ex)
        .await
}

/// Whether `id` may own pre-locked units: an order exists, or an attempt to create it lost its
/// pre-lock answer (see [`record_lost_answer`]). One indexed read: what a sold-out shortcut
/// asks before answering "sold out".
pub async fn id_may_hold_units(ex: impl PgExecutor<'_>, id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1)
             OR EXISTS (SELECT 1 FROM prelock_lost_answers WHERE order_id = $1)",
    )
    .bind(id)
    .fetch_one(ex)
    .await
}

/// Which of `ids` are orders.
pub async fn existing_orders(
    ex: impl PgExecutor<'_>,
    ids: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM orders WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(ex)
        .await
}

/// Records that a create attempt for `id` lost its pre-lock answer: units may be held for it.
pub async fn record_lost_answer(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    sku: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO prelock_lost_answers (order_id, sku_id) VALUES ($1, $2)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(id)
    .bind(sku)
    .execute(ex)
    .await
    .map(|_| ())
}

/// Forgets lost answers recorded before `before` (left by a process that died before its
/// give-back ran): by then the pre-lock they guarded has long lapsed. Returns how many.
pub async fn prune_lost_answers(
    ex: impl PgExecutor<'_>,
    before: chrono::DateTime<chrono::Utc>,
) -> Result<u64, sqlx::Error> {
    sqlx::query("DELETE FROM prelock_lost_answers WHERE created_at < $1")
        .bind(before)
        .execute(ex)
        .await
        .map(|r| r.rows_affected())
}

/// Forgets a lost answer once the give-back for it has run.
pub async fn forget_lost_answer(ex: impl PgExecutor<'_>, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM prelock_lost_answers WHERE order_id = $1")
        .bind(id)
        .execute(ex)
        .await
        .map(|_| ())
}

pub struct NewOrder<'a> {
    pub id: Uuid,
    pub user_id: &'a str,
    pub sku_id: &'a str,
    pub store_id: &'a str,
    pub quantity: i32,
    pub unit_price_cents: i64,
    pub amount_cents: i64,
    pub idempotency_key: &'a str,
    pub request_fingerprint: &'a str,
    pub expires_at: DateTime<Utc>,
}

/// Inserts a PENDING order (version 1), its ACTIVE reservation, its `OrderCreated` outbox event
/// and its expiry job, in one statement (one round trip on the hot path of "buy now"). A
/// concurrent twin with the same idempotency key surfaces as a unique violation on
/// `orders_pkey`.
pub async fn insert_new_order(
    conn: &mut PgConnection,
    o: &NewOrder<'_>,
    event: &OutboxEvent<'_>,
    expiry: &NewJob,
) -> Result<OrderRow, sqlx::Error> {
    let raw: RawOrder = sqlx::query_as(&format!(
        "WITH o AS (
             INSERT INTO orders (id, user_id, sku_id, store_id, quantity, unit_price_cents,
                 amount_cents, state, version, idempotency_key, request_fingerprint, expires_at,
                 traceparent)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'PENDING', 1, $8, $9, $10, $22)
             RETURNING {ORDER_COLUMNS}),
         r AS (
             INSERT INTO reservations (order_id, sku_id, quantity, status, expires_at)
             SELECT id, sku_id, quantity, 'ACTIVE', expires_at FROM o),
         e AS (
             INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type,
                 schema_version, payload, traceparent)
             SELECT $11, $12, id::text, $13, $14, $15::json, traceparent FROM o),
         j AS (
             INSERT INTO delayed_job (kind, payload, priority, run_at, dedupe_key, max_attempts,
                 traceparent)
             SELECT $16, $17, $18, $19, $20, $21, traceparent FROM o
             ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING)
         SELECT * FROM o"
    ))
    .bind(o.id)
    .bind(o.user_id)
    .bind(o.sku_id)
    .bind(o.store_id)
    .bind(o.quantity)
    .bind(o.unit_price_cents)
    .bind(o.amount_cents)
    .bind(o.idempotency_key)
    .bind(o.request_fingerprint)
    .bind(o.expires_at)
    .bind(Uuid::new_v4())
    .bind(event.aggregate_type)
    .bind(event.event_type)
    .bind(event.schema_version)
    .bind(event.payload.to_string())
    .bind(&expiry.kind)
    .bind(&expiry.payload)
    .bind(expiry.priority as i16)
    .bind(o.expires_at) // the expiry job is due when the order expires
    .bind(&expiry.dedupe_key)
    .bind(expiry.max_attempts)
    .bind(service_kit::trace::current_traceparent())
    .fetch_one(conn)
    .await?;
    raw.try_into()
}

#[derive(Debug, thiserror::Error)]
pub enum TransitionFailure {
    #[error(transparent)]
    Illegal(#[from] TransitionError),
    /// Zero rows matched `(id, state, version)`: somebody else moved the order first.
    #[error("order changed concurrently")]
    Conflict,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// The compare-and-set: moves the order from `from` to `to` only if it is still exactly at
/// `from` (state and version). Zero rows is a conflict, never a silent overwrite.
pub async fn transition(
    conn: &mut PgConnection,
    id: Uuid,
    from: Versioned,
    to: OrderState,
) -> Result<Versioned, TransitionFailure> {
    check_transition(from.state, to)?;
    let done = sqlx::query(
        "UPDATE orders SET state = $2, version = version + 1
         WHERE id = $1 AND state = $3 AND version = $4",
    )
    .bind(id)
    .bind(to.as_str())
    .bind(from.state.as_str())
    .bind(from.version)
    .execute(conn)
    .await?;
    if done.rows_affected() == 1 {
        Ok(from.next(to)?)
    } else {
        Err(TransitionFailure::Conflict)
    }
}

/// Sets a reservation's ledger status (and, when re-reserved, its new expiry).
pub async fn set_reservation(
    conn: &mut PgConnection,
    order_id: Uuid,
    status: &str,
    expires_at: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE reservations SET status = $2, expires_at = COALESCE($3, expires_at),
             updated_at = now()
         WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(status)
    .bind(expires_at)
    .execute(conn)
    .await
    .map(|_| ())
}
