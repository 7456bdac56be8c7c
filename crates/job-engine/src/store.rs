//! The SQL of the job table (`delayed_job`, see `migrations/`). Every state change is a
//! compare-and-set: claiming moves `scheduled -> running` under `FOR UPDATE SKIP LOCKED` and
//! hands out a fresh lease token; completing, retrying and failing match `(id, lease token,
//! running)`, so an owner whose lease was rescued (and perhaps re-claimed by another instance)
//! changes nothing: it learns it lost the lease.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

/// Job priority: P0 (money, stock) before P1 (user-facing follow-ups) before P2 (reports,
/// archiving).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    P0 = 0,
    P1 = 1,
    P2 = 2,
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub kind: String,
    pub payload: serde_json::Value,
    pub priority: Priority,
    pub run_at: DateTime<Utc>,
    /// Attempts before the job is dead (kept, with its last error, for a redrive).
    pub max_attempts: i32,
    /// One job per business action: inserting the same key again is a no-op that names the
    /// existing job.
    pub dedupe_key: Option<String>,
}

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    New(i64),
    /// A job with this dedupe key exists (in any state): nothing was written.
    DuplicateOf(i64),
}

impl Inserted {
    pub fn id(self) -> i64 {
        match self {
            Inserted::New(id) | Inserted::DuplicateOf(id) => id,
        }
    }
}

/// Inserts a job in the caller's transaction (so it exists exactly when the state change that
/// needs it does).
pub async fn insert(conn: &mut PgConnection, job: &NewJob) -> Result<Inserted, sqlx::Error> {
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO delayed_job (kind, payload, priority, run_at, max_attempts, dedupe_key)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (dedupe_key) DO NOTHING
         RETURNING id",
    )
    .bind(&job.kind)
    .bind(&job.payload)
    .bind(job.priority as i16)
    .bind(job.run_at)
    .bind(job.max_attempts)
    .bind(&job.dedupe_key)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = id {
        return Ok(Inserted::New(id));
    }
    // only a dedupe key can conflict; the other transaction has committed (the insert waited)
    let existing: i64 = sqlx::query_scalar("SELECT id FROM delayed_job WHERE dedupe_key = $1")
        .bind(&job.dedupe_key)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Inserted::DuplicateOf(existing))
}

/// Cancels a job that has not started (e.g. the expiry job of an order that was paid), in the
/// caller's transaction. `false` if no scheduled job has this key.
pub async fn cancel(conn: &mut PgConnection, dedupe_key: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE delayed_job SET state = 'cancelled', updated_at = now()
         WHERE dedupe_key = $1 AND state = 'scheduled'",
    )
    .bind(dedupe_key)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A job this instance holds a lease on.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedJob {
    pub id: i64,
    pub kind: String,
    pub payload: serde_json::Value,
    pub priority: i16,
    /// When it was due (the fire delay is measured from here).
    pub run_at: DateTime<Utc>,
    /// Including this one.
    pub attempts: i32,
    pub max_attempts: i32,
    pub lease_token: Uuid,
    pub lease_expires_at: DateTime<Utc>,
}

/// Claims up to `limit` jobs of `kinds` due at `now`, most urgent first, skipping rows other
/// instances hold; each gets a fresh lease token valid for `lease`.
pub async fn claim(
    pool: &PgPool,
    owner: &str,
    kinds: &[String],
    limit: i64,
    now: DateTime<Utc>,
    lease: Duration,
) -> Result<Vec<ClaimedJob>, sqlx::Error> {
    let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::days(365));
    sqlx::query_as(
        "UPDATE delayed_job j
         SET state = 'running', lease_owner = $1, lease_token = gen_random_uuid(),
             lease_expires_at = $5, attempts = j.attempts + 1, updated_at = now()
         FROM (SELECT id FROM delayed_job
               WHERE state = 'scheduled' AND run_at <= $3 AND kind = ANY($2)
               ORDER BY priority, run_at
               LIMIT $4
               FOR UPDATE SKIP LOCKED) due
         WHERE j.id = due.id
         RETURNING j.id, j.kind, j.payload, j.priority, j.run_at, j.attempts, j.max_attempts,
                   j.lease_token, j.lease_expires_at",
    )
    .bind(owner)
    .bind(kinds)
    .bind(now)
    .bind(limit)
    .bind(until)
    .fetch_all(pool)
    .await
}

/// How a claimed job ends this attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    Completed,
    /// Scheduled again at `at`, keeping `error` as its last error.
    Retry {
        at: DateTime<Utc>,
        error: String,
    },
    /// Out of attempts, or an error that retrying cannot fix: kept for inspection and redrive.
    Dead {
        error: String,
    },
}

/// Settles a claimed job if `token` still holds its lease. `false` means the lease was lost
/// (rescued after it expired, maybe re-claimed): nothing was changed.
pub async fn settle(
    ex: impl PgExecutor<'_>,
    id: i64,
    token: Uuid,
    how: &Settle,
) -> Result<bool, sqlx::Error> {
    let (state, run_at, error): (&str, Option<DateTime<Utc>>, Option<&str>) = match how {
        Settle::Completed => ("completed", None, None),
        Settle::Retry { at, error } => ("scheduled", Some(*at), Some(error)),
        Settle::Dead { error } => ("dead", None, Some(error)),
    };
    let done = sqlx::query(
        "UPDATE delayed_job
         SET state = $3, run_at = COALESCE($4, run_at), last_error = COALESCE($5, last_error),
             lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
         WHERE id = $1 AND lease_token = $2 AND state = 'running'",
    )
    .bind(id)
    .bind(token)
    .bind(state)
    .bind(run_at)
    .bind(error)
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Puts jobs whose lease expired before `now` back to `scheduled` (their owner died or hung);
/// their old tokens stop working. The attempt they were on counts.
pub async fn rescue_expired(pool: &PgPool, now: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE delayed_job
         SET state = 'scheduled', lease_owner = NULL, lease_token = NULL,
             lease_expires_at = NULL, last_error = COALESCE(last_error, 'lease expired'),
             updated_at = now()
         WHERE state = 'running' AND lease_expires_at < $1",
    )
    .bind(now)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Moves up to `limit` jobs that finished (completed or cancelled) before `before` to
/// `delayed_job_archive`, in one statement; returns how many moved. The hot table keeps what is
/// scheduled, running, dead or just finished.
pub async fn archive_finished(
    pool: &PgPool,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "WITH moved AS (
             DELETE FROM delayed_job
             WHERE id IN (SELECT id FROM delayed_job
                          WHERE state IN ('completed', 'cancelled') AND updated_at < $1
                          ORDER BY updated_at LIMIT $2
                          FOR UPDATE SKIP LOCKED)
             RETURNING id, kind, payload, priority, state, run_at, attempts, max_attempts,
                       dedupe_key, last_error, traceparent, created_at, updated_at)
         INSERT INTO delayed_job_archive (id, kind, payload, priority, state, run_at, attempts,
             max_attempts, dedupe_key, last_error, traceparent, created_at, finished_at)
         SELECT * FROM moved",
    )
    .bind(before)
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Gives a dead job another run at `now`, with a fresh attempt budget. `false` if it is not
/// dead.
pub async fn redrive(pool: &PgPool, id: i64, now: DateTime<Utc>) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE delayed_job SET state = 'scheduled', run_at = $2, attempts = 0, updated_at = now()
         WHERE id = $1 AND state = 'dead'",
    )
    .bind(id)
    .bind(now)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}
