//! Postgres adapter: the source of truth for orders, stock, payments, events and jobs.
//!
//! Layout:
//! - this file: connecting, migrating, the transaction type, error mapping, SKU locks.
//! - [`skus`]: SKUs and the reservations ledger as stock sees it (held units, rebuild input).
//! - [`orders`]: order rows, the compare-and-set transition, reservation status changes.
//! - [`payments`]: payments and provider events (deduplicated by the database).
//! - [`effects`]: what a transaction publishes besides its own rows: outbox events (delayed
//!   jobs are written through `job_engine::store`, in the same transactions).
//! - [`vouchers`]: the codes buyers redeem at the bar.
//!
//! It owns the SQL and maps database errors to what callers branch on. It must never decide
//! business rules (those are in `domain`) nor call Redis or HTTP.

pub mod effects;
pub mod orders;
pub mod payments;
pub mod skus;
pub mod vouchers;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

pub use sqlx;

pub type Tx = Transaction<'static, Postgres>;

/// The schema, embedded from `/migrations`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// How long [`PgStore::connect`] waits for Postgres to answer at start-up.
pub const STARTUP_PATIENCE: Duration = Duration::from_secs(10);

/// A pool whose every connection carries `statement_timeout`, `lock_timeout` and `settings`,
/// half of it opened ahead of time.
///
/// No ping before handing out a connection (`test_before_acquire(false)`). sqlx runs that
/// ping inside the acquire timeout: when waiting for a connection took most of the 250 ms,
/// the timeout cancels the ping mid-flight and the connection is destroyed (closed without a
/// goodbye: `sessions_abandoned` in `pg_stat_database`), so the pool shrinks exactly when it
/// is busiest, and regrowing it means connects that the same timeout cancels. The loadgen
/// scenario found this at 200 orders/s: 300 to 450 abandoned sessions a second, the pool
/// at 0 to 13 of its 24, every request 503 (sqlx's PR 4369 describes the same churn).
///
/// Instead, only a connection that sat idle for [`PING_IDLE_AFTER`] is pinged (a pool with
/// idle connections is not contended, so the ping has the whole acquire timeout): that finds
/// the connections a quiet night, an `idle_session_timeout` or a restart broke. One that broke
/// while busy fails its next statement, and sqlx's ping on release closes it;
/// [`PgStore::begin`] and [`PgStore::retry_dead`] try such a statement again on another
/// connection, so those cost retries, not requests.
fn pool(options: &PgConnectOptions, limits: &PgLimits, settings: &[(&str, &str)]) -> PgPool {
    let ms = |d: Duration| d.as_millis().to_string();
    let mut session = vec![
        ("statement_timeout", ms(limits.statement_timeout)),
        ("lock_timeout", ms(limits.lock_timeout)),
    ];
    session.extend(settings.iter().map(|&(k, v)| (k, v.to_owned())));
    PgPoolOptions::new()
        .max_connections(limits.max_connections)
        .min_connections((limits.max_connections / 2).max(1))
        .acquire_timeout(limits.acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                Ok(meta.idle_for < PING_IDLE_AFTER || sqlx::Connection::ping(conn).await.is_ok())
            })
        })
        .connect_lazy_with(options.clone().options(session))
}

/// A pooled connection idle this long is pinged before it is handed out.
pub const PING_IDLE_AFTER: Duration = Duration::from_secs(5);

/// How long the services wait on Postgres before answering 503 (`PG_*_MS`).
#[derive(Clone, Debug)]
pub struct PgLimits {
    pub max_connections: u32,
    /// Waiting for a pooled connection: overload or an outage answers 503 within this, not
    /// after a queue of seconds.
    pub acquire_timeout: Duration,
    /// Server-side bound on each statement (`statement_timeout`).
    pub statement_timeout: Duration,
    /// Server-side bound on waiting for a lock, advisory locks included (`lock_timeout`).
    pub lock_timeout: Duration,
}

impl PgLimits {
    pub fn new(max_connections: u32) -> Self {
        PgLimits {
            max_connections,
            acquire_timeout: Duration::from_millis(250),
            statement_timeout: Duration::from_secs(2),
            lock_timeout: Duration::from_secs(1),
        }
    }

    /// `PG_MAX_CONNECTIONS`, `PG_ACQUIRE_TIMEOUT_MS`, `PG_STATEMENT_TIMEOUT_MS`,
    /// `PG_LOCK_TIMEOUT_MS`, each defaulting to [`PgLimits::new`]'s value; `env(name, default)`
    /// reads one variable (the services pass `service_kit::config::env_or`).
    pub fn from_env(
        default_max_connections: u32,
        env: impl Fn(&str, u64) -> anyhow::Result<u64>,
    ) -> anyhow::Result<Self> {
        let d = Self::new(default_max_connections);
        let ms = |name: &str, default: Duration| -> anyhow::Result<Duration> {
            env(name, default.as_millis() as u64).map(Duration::from_millis)
        };
        let max = env("PG_MAX_CONNECTIONS", u64::from(d.max_connections))?;
        Ok(PgLimits {
            max_connections: u32::try_from(max)
                .map_err(|_| anyhow::anyhow!("PG_MAX_CONNECTIONS={max} is too large"))?,
            acquire_timeout: ms("PG_ACQUIRE_TIMEOUT_MS", d.acquire_timeout)?,
            statement_timeout: ms("PG_STATEMENT_TIMEOUT_MS", d.statement_timeout)?,
            lock_timeout: ms("PG_LOCK_TIMEOUT_MS", d.lock_timeout)?,
        })
    }
}

#[derive(Clone, Debug)]
pub struct PgStore {
    pub pool: PgPool,
    /// Where migrations connect (on a connection of their own, without the pool's timeouts).
    options: PgConnectOptions,
}

impl PgStore {
    /// Connects with a bounded pool whose every connection carries `statement_timeout` and
    /// `lock_timeout`, so a slow or locked database answers 503 fast instead of holding the
    /// request (and its connection) for seconds. Half the pool is opened ahead of time: a
    /// flash sale's first second must not pay for connects.
    ///
    /// The short acquire timeout is for requests, not for start-up: the pool opens lazily and
    /// this waits (up to [`STARTUP_PATIENCE`]) until Postgres answers, so a busy machine's slow
    /// first connects do not stop a service from starting.
    /// [`PgStore::connect`] for start-up while Postgres may still be coming up with the
    /// stack: retries with backoff (0.5 s doubling to 5 s), logging each attempt, for up to
    /// two minutes.
    pub async fn connect_patiently(url: &str, limits: &PgLimits) -> anyhow::Result<PgStore> {
        let started = std::time::Instant::now();
        let mut wait = std::time::Duration::from_millis(500);
        loop {
            match PgStore::connect(url, limits).await {
                Ok(store) => return Ok(store),
                Err(e) if started.elapsed() < std::time::Duration::from_secs(120) => {
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "postgres not answering; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(5));
                }
                Err(e) => return Err(e.context("postgres did not answer for two minutes")),
            }
        }
    }

    pub async fn connect(url: &str, limits: &PgLimits) -> anyhow::Result<PgStore> {
        let options: PgConnectOptions = url
            .parse::<PgConnectOptions>()?
            .application_name("bar-fulfillment");
        let pool = pool(&options, limits, &[]);
        let store = PgStore { pool, options };
        let started = std::time::Instant::now();
        loop {
            match store.ping().await {
                Ok(()) => return Ok(store),
                Err(_) if started.elapsed() < STARTUP_PATIENCE => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(anyhow::Error::new(e).context("postgres did not answer")),
            }
        }
    }

    /// Another pool on the same database, with `limits` and the session `settings` on every
    /// connection (say `synchronous_commit=off`, for work whose commits may be lost in a
    /// crash); opened lazily.
    pub fn pool_with(&self, limits: &PgLimits, settings: &[(&str, &str)]) -> PgPool {
        pool(&self.options, limits, settings)
    }

    /// Applies `migrations/` on a dedicated connection: a long index build must not hit the
    /// pool's statement timeout, and a second binary starting at the same moment waits for
    /// sqlx's migration lock instead of failing on `lock_timeout`.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        use sqlx::Connection;
        let mut conn = PgConnection::connect_with(&self.options).await?;
        MIGRATOR.run(&mut conn).await?;
        conn.close().await?;
        Ok(())
    }

    /// Least privilege: grants `role` (the services' application role) what the services
    /// need and nothing more: `SELECT, INSERT, UPDATE, DELETE` on the tables, except that
    /// `order_transition` (the state machine) is read only and `compensation_audit` and
    /// `payment_events` (evidence) are append-only; the sequences and the functions. No DDL
    /// (the tables belong to the migrating role, so the application role can neither alter
    /// nor drop them), no `TRUNCATE`, no `CREATE` in the schema, no temporary tables, and
    /// nothing on the migration history. Idempotent; `db-migrate` runs it after every
    /// migration, so tables a migration adds are covered.
    pub async fn grant_application_role(&self, role: &str) -> anyhow::Result<()> {
        use sqlx::Connection;
        anyhow::ensure!(
            !role.is_empty()
                && role.len() <= 63
                && role
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "APP_DB_ROLE must be 1 to 63 lowercase letters, digits or underscores"
        );
        let mut conn = PgConnection::connect_with(&self.options).await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
                .bind(role)
                .fetch_one(&mut conn)
                .await?;
        anyhow::ensure!(exists, "the application role {role} does not exist: create it first (scripts/services.sh does locally)");
        let mut tx = conn.begin().await?;
        for statement in [
            format!("GRANT USAGE ON SCHEMA public TO {role}"),
            format!("REVOKE CREATE ON SCHEMA public FROM {role}"),
            // no temporary tables either (a session's own table would shadow a real one in an
            // unqualified name); a migrating role that does not own the database is warned, not
            // failed
            format!(
                "DO $$ BEGIN EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC, {role}', \
                 current_database()); END $$"
            ),
            format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
            ),
            format!(
                "REVOKE TRUNCATE, REFERENCES, TRIGGER ON ALL TABLES IN SCHEMA public FROM {role}"
            ),
            format!("REVOKE ALL ON TABLE _sqlx_migrations FROM {role}"),
            // the transition table is the state machine the trigger enforces: read only
            format!("REVOKE INSERT, UPDATE, DELETE ON TABLE order_transition FROM {role}"),
            // logs that are evidence (who did what to a failure; what each provider said):
            // appended to, never rewritten
            format!(
                "REVOKE UPDATE, DELETE ON TABLE compensation_audit, payment_events FROM {role}"
            ),
            format!("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {role}"),
            format!("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role}"),
        ] {
            sqlx::query(&statement).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        conn.close().await?;
        Ok(())
    }

    /// A readiness probe for a binary whose only dependency is Postgres: answers when the
    /// database does (wrap it with `service_kit::http::ready_check`).
    #[allow(clippy::type_complexity)]
    pub fn ready_probe(
        &self,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>
           + Send
           + Sync
           + 'static {
        let store = self.clone();
        move || {
            let store = store.clone();
            Box::pin(async move { store.ping().await.map_err(|e| format!("postgres: {e}")) })
        }
    }

    /// Exports `outbox_lag_seconds` (the age of the oldest unpublished outbox row, 0 when none)
    /// on `metrics`, refreshed every second by a task that lives as long as the runtime. Every
    /// binary with a database exports it, so the lag stays visible, and alertable, when no relay
    /// runs at all.
    pub fn export_outbox_lag(&self, metrics: &service_kit::telemetry::Metrics) {
        let lag = prometheus::Gauge::new(
            "outbox_lag_seconds",
            "Age of the oldest outbox event not yet published to Kafka",
        )
        .expect("valid metric");
        metrics.register(Box::new(lag.clone()));
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                let oldest: Result<Option<f64>, _> =
                    sqlx::query_scalar(effects::OLDEST_UNPUBLISHED)
                        .fetch_optional(&pool)
                        .await;
                if let Ok(age) = oldest {
                    lag.set(age.unwrap_or(0.0).max(0.0));
                }
            }
        });
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// A transaction. A `BEGIN` that fails because its connection was dead ran nothing: it
    /// is tried again on another connection ([`PgStore::retry_dead`]).
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        self.retry_dead(|pool| async move { pool.begin().await })
            .await
    }

    /// Runs `op` (a read, or anything that did nothing when its connection turned out dead)
    /// again on another connection when it failed because its connection was dead (terminated
    /// by an operator or a failover, or by a Postgres restart). Each such failure closes one
    /// dead connection (sqlx pings a connection when it comes back), so the pool's dead
    /// connections cost tries, not requests: at most one try per connection of the pool and
    /// one more, and only within the pool's acquire timeout, so a server that is really down
    /// is answered 503 as fast as before.
    pub async fn retry_dead<T, F, Fut>(&self, mut op: F) -> Result<T, sqlx::Error>
    where
        F: FnMut(PgPool) -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let options = self.pool.options();
        let (tries, within) = (
            options.get_max_connections() + 1,
            options.get_acquire_timeout(),
        );
        let began = std::time::Instant::now();
        let mut attempt = 1;
        loop {
            match op(self.pool.clone()).await {
                Err(e) if attempt < tries && began.elapsed() < within && is_dead_connection(&e) => {
                    tracing::debug!(error = %e, attempt, "a dead connection; trying another");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// The database's clock now (`clock_timestamp()`): for a decision that must not rest on this
/// process's own clock.
pub async fn database_now(
    ex: impl sqlx::PgExecutor<'_>,
) -> Result<chrono::DateTime<chrono::Utc>, sqlx::Error> {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(ex)
        .await
}

/// The one classifier of database failures, and of a dead connection (`job_engine`, the lowest
/// crate that speaks SQL, owns them): transient means 503 with `Retry-After`.
pub use job_engine::store::{bad_input, is_dead_connection, is_transient};

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
