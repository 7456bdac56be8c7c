//! Postgres adapter: the source of truth for orders, stock, payments, events and jobs.
//!
//! Layout:
//! - this file: connecting, migrating, the transaction type, error mapping, SKU locks.
//! - [`skus`]: SKUs and the reservations ledger as stock sees it (held units, rebuild input).
//! - [`orders`]: order rows, the compare-and-set transition, reservation status changes.
//! - [`payments`]: payments and provider events (deduplicated by the database).
//! - [`effects`]: what a transaction schedules besides its own rows: outbox events and
//!   delayed jobs.
//!
//! It owns the SQL and maps database errors to what callers branch on. It must never decide
//! business rules (those are in `domain`) nor call Redis or HTTP.

pub mod effects;
pub mod orders;
pub mod payments;
pub mod skus;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

pub use sqlx;

pub type Tx = Transaction<'static, Postgres>;

/// The schema, embedded from `/migrations`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

#[derive(Clone, Debug)]
pub struct PgStore {
    pub pool: PgPool,
}

impl PgStore {
    /// Connects with a bounded pool. `acquire_timeout` bounds how long a request waits for a
    /// connection under a burst, so overload answers 503 instead of queueing forever. Half the
    /// pool is opened ahead of time: a flash sale's first second must not pay for connects.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgStore> {
        let opts: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections((max_connections / 2).max(1))
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.application_name("bar-fulfillment"))
            .await?;
        Ok(PgStore { pool })
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        self.pool.begin().await
    }
}

/// Whether `err` is a unique violation (optionally of one named constraint).
pub fn is_unique_violation(err: &sqlx::Error, constraint: Option<&str>) -> bool {
    match err {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            constraint.is_none() || db.constraint() == constraint
        }
        _ => false,
    }
}

/// Namespace (first key) of the per-SKU advisory locks; the second key is `hashtext(sku)`.
pub(crate) const SKU_LOCK_SPACE: i32 = 0x5e_4b_55; // "SKU"

/// Every transaction that changes a SKU's reservations *and* the Redis pre-lock takes this
/// shared lock first; a rebuild of that SKU takes it exclusively. So a rebuild never reads the
/// ledger while a reservation is in Redis but not yet committed here, and a flushed Redis
/// cannot be rebuilt short of an in-flight order. Hash collisions only cost extra waiting.
pub async fn lock_sku_shared(conn: &mut PgConnection, sku: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1, hashtext($2))")
        .bind(SKU_LOCK_SPACE)
        .bind(sku)
        .execute(conn)
        .await
        .map(|_| ())
}

pub async fn lock_sku_exclusive(conn: &mut PgConnection, sku: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(SKU_LOCK_SPACE)
        .bind(sku)
        .execute(conn)
        .await
        .map(|_| ())
}
