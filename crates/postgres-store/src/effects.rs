//! What a transaction publishes besides its own rows: outbox events, written in the caller's
//! transaction, so they exist exactly when the state change does. (Delayed jobs are written the
//! same way, through `job_engine::store`.)

use sqlx::PgConnection;
use uuid::Uuid;

/// A domain event for the outbox. `payload` is the versioned wire form (the Kafka message's
/// `data`), stored as the JSON text it is written as (a `json` column: the relay sends it on
/// without parsing it); the row keeps the current trace context, which the relay sends on as
/// the `traceparent` header.
pub struct OutboxEvent<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: String,
    pub event_type: &'a str,
    pub schema_version: i32,
    pub payload: serde_json::Value,
}

pub async fn append_event(
    conn: &mut PgConnection,
    e: OutboxEvent<'_>,
) -> Result<Uuid, sqlx::Error> {
    let event_id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type,
             schema_version, payload, traceparent)
         VALUES ($1, $2, $3, $4, $5, $6::json, $7)",
    )
    .bind(event_id)
    .bind(e.aggregate_type)
    .bind(&e.aggregate_id)
    .bind(e.event_type)
    .bind(e.schema_version)
    .bind(e.payload.to_string())
    .bind(service_kit::trace::current_traceparent())
    .execute(conn)
    .await?;
    Ok(event_id)
}

/// The age in seconds of the oldest outbox event not published yet (none: no row): the
/// oldest of the first row past the relay's position and the first row in each of its gaps
/// (the `outbox_unpublished` view holds them all; this reads one row of each part).
pub const OLDEST_UNPUBLISHED: &str = "SELECT extract(epoch FROM now() - min(created_at))::float8
    FROM ((SELECT created_at FROM outbox
           WHERE id > (SELECT published_through FROM outbox_relay) ORDER BY id LIMIT 1)
          UNION ALL
          (SELECT o.created_at FROM outbox_relay r
           CROSS JOIN LATERAL unnest(r.gap_lo, r.gap_hi) g(lo, hi)
           CROSS JOIN LATERAL (SELECT created_at FROM outbox
                               WHERE id BETWEEN g.lo AND g.hi ORDER BY id LIMIT 1) o)) u
    HAVING count(*) > 0";

/// Deletes published events written before `before` (Kafka holds them), 10,000 at a time so
/// no statement runs long; an event not published yet (past the relay's position, or in one
/// of its gaps) is kept whatever its age. Returns how many.
pub async fn prune_published(
    pool: &sqlx::PgPool,
    before: chrono::DateTime<chrono::Utc>,
) -> Result<u64, sqlx::Error> {
    const BATCH: i64 = 10_000;
    let mut pruned = 0;
    loop {
        let n = sqlx::query(
            "DELETE FROM outbox WHERE id = ANY(ARRAY(
                 SELECT o.id FROM outbox o, outbox_relay r
                 WHERE o.created_at < $1 AND o.id <= r.published_through
                   AND NOT EXISTS (SELECT FROM unnest(r.gap_lo, r.gap_hi) g(lo, hi)
                                   WHERE o.id BETWEEN g.lo AND g.hi)
                 ORDER BY o.id LIMIT $2))",
        )
        .bind(before)
        .bind(BATCH)
        .execute(pool)
        .await?
        .rows_affected();
        pruned += n;
        if n < BATCH as u64 {
            return Ok(pruned);
        }
    }
}
