//! What a transaction schedules besides its own rows: outbox events and delayed jobs. Both are
//! written in the caller's transaction, so they exist exactly when the state change does.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// A domain event for the outbox. `payload` is the versioned wire form (the Kafka message).
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
             schema_version, payload)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(event_id)
    .bind(e.aggregate_type)
    .bind(&e.aggregate_id)
    .bind(e.event_type)
    .bind(e.schema_version)
    .bind(&e.payload)
    .execute(conn)
    .await?;
    Ok(event_id)
}

pub struct NewJob<'a> {
    pub kind: &'a str,
    pub payload: serde_json::Value,
    pub priority: i16,
    pub run_at: DateTime<Utc>,
    /// One job per business action; scheduling it again is a no-op.
    pub dedupe_key: String,
}

/// Schedules a job; returns false when a job with this dedupe key already exists.
pub async fn schedule_job(conn: &mut PgConnection, j: NewJob<'_>) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "INSERT INTO delayed_job (kind, payload, priority, run_at, dedupe_key)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (dedupe_key) DO NOTHING",
    )
    .bind(j.kind)
    .bind(&j.payload)
    .bind(j.priority)
    .bind(j.run_at)
    .bind(&j.dedupe_key)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Cancels a job that has not started (e.g. the expiry job of an order that was cancelled).
pub async fn cancel_job(conn: &mut PgConnection, dedupe_key: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE delayed_job SET state = 'cancelled', updated_at = now()
         WHERE dedupe_key = $1 AND state = 'scheduled'",
    )
    .bind(dedupe_key)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}
