//! What a transaction publishes besides its own rows: outbox events, written in the caller's
//! transaction, so they exist exactly when the state change does. (Delayed jobs are written the
//! same way, through `job_engine::store`.)

use sqlx::PgConnection;
use uuid::Uuid;

/// A domain event for the outbox. `payload` is the versioned wire form (the Kafka message); the
/// row keeps the current trace context, which the relay sends on as the `traceparent` header.
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
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(event_id)
    .bind(e.aggregate_type)
    .bind(&e.aggregate_id)
    .bind(e.event_type)
    .bind(e.schema_version)
    .bind(&e.payload)
    .bind(service_kit::trace::current_traceparent())
    .execute(conn)
    .await?;
    Ok(event_id)
}
