//! The SQL of the job table (`delayed_job`, see `migrations/`). Every state change is a
//! compare-and-set: claiming moves `scheduled -> running` under `FOR UPDATE SKIP LOCKED` and
//! hands out a fresh lease token; completing, retrying and failing match `(id, lease token,
//! running)`, so an owner whose lease was rescued (and perhaps re-claimed by another instance)
//! changes nothing: it learns it lost the lease.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Whether `err` means "the database is unavailable or too slow right now": the caller answers
/// 503 with `Retry-After` rather than 500. Pool timeouts and closed pools, I/O and protocol
/// errors on a dead connection, and the server's own refusals: `statement_timeout` (57014),
/// `lock_timeout` (55P03), shutdown (57P01-57P03), an idle session timed out (57P05), too
/// many connections (53300), and the connection exception class (08).
pub fn is_transient(err: &sqlx::Error) -> bool {
    is_dead_connection(err)
        || match err {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
                true
            }
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| matches!(&*c, "57014" | "55P03" | "57P03" | "53300")),
            _ => false,
        }
}

/// Whether `err` says the connection itself is gone (the socket, or the server ending the
/// session: `57P01` admin shutdown, `57P02` crash shutdown, `57P05` idle session timeout,
/// class `08`), as opposed to a statement's failure: the statement ran nothing and another
/// connection may run it. (`57P03`, cannot connect now, refuses new connections: trying
/// again at once would not help.)
pub fn is_dead_connection(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| matches!(&*c, "57P01" | "57P02" | "57P05") || c.starts_with("08")),
        _ => false,
    }
}

/// The caller's own bad value, as Postgres refused it: a data exception (class 22: a NUL byte
/// in text, an unsupported `\u0000` in jsonb, a number out of range) or a constraint
/// violation (class 23, but a unique violation, which callers handle as a conflict). Returns
/// what to tell the caller (the constraint's name or the kind of value; never the value).
pub fn bad_input(err: &sqlx::Error) -> Option<String> {
    let sqlx::Error::Database(db) = err else {
        return None;
    };
    let code = db.code()?;
    if code == "23505" {
        return None;
    }
    if code.starts_with("23") {
        return Some(match db.constraint() {
            Some(c) => format!("a value breaks the rule {c}"),
            None => "a value breaks a rule of the table".to_owned(),
        });
    }
    code.starts_with("22").then(|| match &*code {
        "22021" | "22P05" => "a value holds a NUL character or invalid text".to_owned(),
        "22003" => "a number is out of range".to_owned(),
        _ => "a value is malformed or out of range".to_owned(),
    })
}

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
    pub run_at: RunAt,
    /// Attempts before the job is dead (kept, with its last error, for a redrive). A snooze
    /// ([`Settle::Snooze`]) is not an attempt.
    pub max_attempts: i32,
    /// One job per business action: inserting the same key again is a no-op that names the
    /// existing job.
    pub dedupe_key: Option<String>,
}

/// When a job is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAt {
    /// At this time (e.g. an order's expiry, set by the pre-lock store's clock).
    At(DateTime<Utc>),
    /// This long after the database's clock when the insert runs: "in two seconds" means two
    /// seconds whatever the inserting instance's own clock says.
    In(Duration),
}

impl From<DateTime<Utc>> for RunAt {
    fn from(at: DateTime<Utc>) -> Self {
        RunAt::At(at)
    }
}

impl RunAt {
    fn columns(self) -> (Option<DateTime<Utc>>, f64) {
        match self {
            RunAt::At(at) => (Some(at), 0.0),
            RunAt::In(d) => (None, millis(d)),
        }
    }
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

/// A job inserted due sooner than this from now wakes the engines (`NOTIFY delayed_job`, sent
/// when the transaction commits): their next poll could come too late for it. Jobs due later
/// are claimed ahead by a regular poll (the engine's lookahead is at least its poll interval,
/// which is at most half of this), so they cost no NOTIFY: the order flow's expiries (minutes
/// ahead) and follow-ups (two seconds ahead) never send one.
pub const WAKE_HORIZON: Duration = Duration::from_secs(1);

/// The channel engines listen on for [`wake`].
pub const WAKE_CHANNEL: &str = "delayed_job";

/// Wakes every engine instance when the caller's transaction commits (Postgres delivers
/// `NOTIFY` at commit, and folds repeats within one transaction into one).
pub async fn wake(conn: &mut PgConnection, kind: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(WAKE_CHANNEL)
        .bind(kind)
        .execute(conn)
        .await?;
    Ok(())
}

/// Inserts a job in the caller's transaction (so it exists exactly when the state change that
/// needs it does). A dedupe key already used by a live or an archived job writes nothing and
/// names that job.
pub async fn insert(conn: &mut PgConnection, job: &NewJob) -> Result<Inserted, sqlx::Error> {
    let (at, after_ms) = job.run_at.columns();
    // `soon`: due within the wake-up horizon of the database's clock
    let row: Option<(i64, bool)> = sqlx::query_as(
        "INSERT INTO delayed_job (kind, payload, priority, run_at, max_attempts, dedupe_key,
             traceparent)
         VALUES ($1, $2, $3, COALESCE($4, clock_timestamp() + $8 * interval '1 millisecond'),
                 $5, $6, $7)
         ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
         RETURNING id, run_at <= clock_timestamp() + $9 * interval '1 millisecond'",
    )
    .bind(&job.kind)
    .bind(&job.payload)
    .bind(job.priority as i16)
    .bind(at)
    .bind(job.max_attempts)
    .bind(&job.dedupe_key)
    .bind(service_kit::trace::current_traceparent())
    .bind(after_ms)
    .bind(millis(WAKE_HORIZON))
    .fetch_optional(&mut *conn)
    .await?;
    let Some(key) = job.dedupe_key.as_deref() else {
        let row = row.ok_or(sqlx::Error::RowNotFound)?; // no key, no conflict
        return woken(conn, job, row).await;
    };
    match row {
        Some(row @ (id, _)) => {
            // The key may belong to a job that completed and moved to the archive. Checked
            // after the insert, in a statement of its own: the insert waited for any mover of
            // a conflicting row to commit, so this statement's snapshot sees where it went.
            let archived: Option<i64> = sqlx::query_scalar(
                "SELECT id FROM delayed_job_archive WHERE dedupe_key = $1 LIMIT 1",
            )
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
            match archived {
                Some(earlier) => {
                    sqlx::query("DELETE FROM delayed_job WHERE id = $1")
                        .bind(id)
                        .execute(&mut *conn)
                        .await?;
                    Ok(Inserted::DuplicateOf(earlier))
                }
                None => woken(conn, job, row).await,
            }
        }
        // only the key can conflict; the other job is live or, completed meanwhile, archived
        None => {
            let existing: i64 = sqlx::query_scalar(
                "SELECT id FROM delayed_job WHERE dedupe_key = $1
                 UNION ALL
                 SELECT id FROM delayed_job_archive WHERE dedupe_key = $1
                 LIMIT 1",
            )
            .bind(key)
            .fetch_one(&mut *conn)
            .await?;
            Ok(Inserted::DuplicateOf(existing))
        }
    }
}

/// A new job's id, after waking the engines if it is due within [`WAKE_HORIZON`] (`soon`, by
/// the database's clock).
async fn woken(
    conn: &mut PgConnection,
    job: &NewJob,
    (id, soon): (i64, bool),
) -> Result<Inserted, sqlx::Error> {
    if soon {
        wake(conn, &job.kind).await?;
    }
    Ok(Inserted::New(id))
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
    /// The trace context of what wrote the job: its run is a span of that trace.
    pub traceparent: Option<String>,
}

/// Claims up to `limit` jobs of `kinds` due within `lookahead` of `at` (zero: due now; more:
/// claimed ahead, to fire from the timer), most urgent first, skipping rows other instances
/// hold; each gets a fresh lease token valid until `lease` after it is due (or after `at`, if
/// it is already due). `at` is `None` for the database's clock ([`crate::Clock::decide_at`]):
/// what is due and when a lease ends are decided there, never by the claimer's own clock.
pub async fn claim(
    pool: &PgPool,
    owner: &str,
    kinds: &[String],
    limit: i64,
    at: Option<DateTime<Utc>>,
    lookahead: Duration,
    lease: Duration,
) -> Result<Vec<ClaimedJob>, sqlx::Error> {
    sqlx::query_as(
        "WITH t AS (SELECT COALESCE($3, clock_timestamp()) AS now)
         UPDATE delayed_job j
         SET state = 'running', lease_owner = $1, lease_token = gen_random_uuid(),
             lease_expires_at = GREATEST(j.run_at, t.now) + $6 * interval '1 millisecond',
             attempts = j.attempts + 1, updated_at = now()
         FROM t, (SELECT id FROM delayed_job
               WHERE state = 'scheduled'
                 AND run_at <= (SELECT now FROM t) + $4 * interval '1 millisecond'
                 AND kind = ANY($2)
               ORDER BY priority, run_at
               LIMIT $5
               FOR UPDATE SKIP LOCKED) due
         WHERE j.id = due.id
         RETURNING j.id, j.kind, j.payload, j.priority, j.run_at, j.attempts, j.max_attempts,
                   j.lease_token, j.lease_expires_at, j.traceparent",
    )
    .bind(owner)
    .bind(kinds)
    .bind(at)
    .bind(millis(lookahead))
    .bind(limit)
    .bind(millis(lease))
    .fetch_all(pool)
    .await
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// How a claimed job ends this attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    Completed,
    /// Scheduled again at `at`, keeping `error` as its last error; the attempt counts.
    Retry {
        at: DateTime<Utc>,
        error: String,
    },
    /// Scheduled again at `at` without spending an attempt: "not yet" is not a failure (a
    /// payment not paid yet, a refund the provider could not take now). `note` becomes the
    /// last error, for operators.
    Snooze {
        at: DateTime<Utc>,
        note: String,
    },
    /// Out of attempts, or an error that retrying cannot fix: kept for inspection and redrive.
    Dead {
        error: String,
    },
}

/// Settles a claimed job if `token` still holds its lease. `false` means the lease was lost
/// (rescued after it expired, maybe re-claimed): nothing was changed.
pub async fn settle(ex: &PgPool, id: i64, token: Uuid, how: &Settle) -> Result<bool, sqlx::Error> {
    Ok(settle_many(ex, &[(id, token, how.clone())]).await? == vec![(id, token)])
}

/// Settles many claimed jobs (batched completion): the completed in one statement that moves
/// them to the archive, the retried and dead in one more; each row changes only if its token
/// still holds the lease. Returns the (id, token) of each run that was settled: the others
/// had lost their lease.
///
/// No join with `unnest`: once the statement is prepared, Postgres's generic plan guesses ten
/// rows for it and rescans it per row (100 ms for 500 jobs). Rows are found by id through the
/// primary key; a lease token is a fresh random UUID per claim, so "the row's token is one of
/// ours" means "ours for this row"; each row's values are picked by its token's position (not
/// its id's: a stale run and a new run of one job may settle in one batch, and only the new
/// run's token matches the row).
pub async fn settle_many(
    ex: &PgPool,
    jobs: &[(i64, Uuid, Settle)],
) -> Result<Vec<(i64, Uuid)>, sqlx::Error> {
    let (done, other): (Vec<_>, Vec<_>) = jobs
        .iter()
        .partition(|(_, _, how)| *how == Settle::Completed);
    let mut settled = Vec::with_capacity(jobs.len());
    if !done.is_empty() {
        let (ids, tokens): (Vec<i64>, Vec<Uuid>) = done.iter().map(|(i, t, _)| (*i, *t)).unzip();
        settled.extend(complete_many(ex, &ids, &tokens).await?);
    }
    if other.is_empty() {
        return Ok(settled);
    }
    let mut ids = Vec::with_capacity(other.len());
    let mut tokens = Vec::with_capacity(other.len());
    let mut states = Vec::with_capacity(other.len());
    let mut run_ats: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(other.len());
    let mut errors: Vec<Option<&str>> = Vec::with_capacity(other.len());
    // a snooze gives back the attempt its claim counted
    let mut uncounted: Vec<i32> = Vec::with_capacity(other.len());
    for (id, token, how) in other {
        let (state, run_at, error, back) = match how {
            Settle::Completed => unreachable!("partitioned out"),
            Settle::Retry { at, error } => ("scheduled", Some(*at), Some(error.as_str()), 0),
            Settle::Snooze { at, note } => ("scheduled", Some(*at), Some(note.as_str()), 1),
            Settle::Dead { error } => ("dead", None, Some(error.as_str()), 0),
        };
        ids.push(*id);
        tokens.push(*token);
        states.push(state);
        run_ats.push(run_at);
        errors.push(error);
        uncounted.push(back);
    }
    let retried: Vec<(i64, Uuid)> = sqlx::query_as(
        "WITH held AS (
             SELECT id, lease_token FROM delayed_job
             WHERE id = ANY($1::bigint[]) AND lease_token = ANY($2::uuid[])
               AND state = 'running'
             FOR UPDATE)
         UPDATE delayed_job j
         SET state = ($3::text[])[array_position($2, h.lease_token)],
             run_at = COALESCE(($4::timestamptz[])[array_position($2, h.lease_token)], j.run_at),
             last_error = COALESCE(($5::text[])[array_position($2, h.lease_token)], j.last_error),
             attempts = GREATEST(j.attempts - ($6::int[])[array_position($2, h.lease_token)], 0),
             lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
         FROM held h
         WHERE j.id = h.id
         RETURNING j.id, h.lease_token",
    )
    .bind(ids)
    .bind(tokens)
    .bind(states)
    .bind(run_ats)
    .bind(errors)
    .bind(uncounted)
    .fetch_all(ex)
    .await?;
    settled.extend(retried);
    Ok(settled)
}

/// Completes jobs whose lease `tokens` still hold: each leaves the hot table for the archive
/// in one statement. Returns the ids completed.
async fn complete_many(
    ex: &PgPool,
    ids: &[i64],
    tokens: &[Uuid],
) -> Result<Vec<(i64, Uuid)>, sqlx::Error> {
    sqlx::query_as(
        "WITH done AS (
             DELETE FROM delayed_job
             WHERE id = ANY($1::bigint[]) AND lease_token = ANY($2::uuid[]) AND state = 'running'
             RETURNING id, lease_token, kind, payload, priority, run_at, attempts, max_attempts,
                       dedupe_key, last_error, traceparent, created_at),
         archived AS (
             INSERT INTO delayed_job_archive (id, kind, payload, priority, state, run_at,
                 attempts, max_attempts, dedupe_key, last_error, traceparent, created_at,
                 finished_at)
             SELECT id, kind, payload, priority, 'completed', run_at, attempts, max_attempts,
                    dedupe_key, last_error, traceparent, created_at, now()
             FROM done)
         SELECT id, lease_token FROM done",
    )
    .bind(ids)
    .bind(tokens)
    .fetch_all(ex)
    .await
}

/// Extends the leases this instance still holds (heartbeat) to `lease` after `at` (the
/// database's clock when `None`), or after the job is due, for one waiting in the timer.
/// Returns the ids still held: a missing id was rescued meanwhile.
pub async fn extend_leases(
    pool: &PgPool,
    held: &[(i64, Uuid)],
    at: Option<DateTime<Utc>>,
    lease: Duration,
) -> Result<Vec<i64>, sqlx::Error> {
    let (ids, tokens): (Vec<i64>, Vec<Uuid>) = held.iter().copied().unzip();
    sqlx::query_scalar(
        "UPDATE delayed_job j
         SET lease_expires_at = GREATEST(j.run_at, COALESCE($3, clock_timestamp()))
                                + $4 * interval '1 millisecond'
         WHERE j.id = ANY($1::bigint[]) AND j.lease_token = ANY($2::uuid[])
           AND j.state = 'running'
         RETURNING j.id",
    )
    .bind(ids)
    .bind(tokens)
    .bind(at)
    .bind(millis(lease))
    .fetch_all(pool)
    .await
}

/// Gives leases back (shutdown): the jobs are `scheduled` again at their due time, for any
/// instance. `started: false` means the handler never ran, so the attempt is not counted.
pub async fn release(
    pool: &PgPool,
    held: &[(i64, Uuid)],
    started: bool,
) -> Result<u64, sqlx::Error> {
    let (ids, tokens): (Vec<i64>, Vec<Uuid>) = held.iter().copied().unzip();
    let done = sqlx::query(
        "UPDATE delayed_job j
         SET state = 'scheduled', lease_owner = NULL, lease_token = NULL,
             lease_expires_at = NULL,
             attempts = CASE WHEN $3 THEN j.attempts ELSE GREATEST(j.attempts - 1, 0) END,
             last_error = CASE WHEN $3 THEN 'released at shutdown while running'
                               ELSE j.last_error END,
             updated_at = now()
         WHERE j.id = ANY($1::bigint[]) AND j.lease_token = ANY($2::uuid[])
           AND j.state = 'running'",
    )
    .bind(ids)
    .bind(tokens)
    .bind(started)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Puts jobs whose lease expired before `at` (the database's clock when `None`) back to
/// `scheduled` (their owner died or hung); their old tokens stop working. The attempt they
/// were on counts. An instance whose own clock runs fast rescues nothing early: the expiry is
/// compared with the database's clock, the one that set it.
pub async fn rescue_expired(pool: &PgPool, at: Option<DateTime<Utc>>) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE delayed_job
         SET state = 'scheduled', lease_owner = NULL, lease_token = NULL,
             lease_expires_at = NULL, last_error = COALESCE(last_error, 'lease expired'),
             updated_at = now()
         WHERE id IN (SELECT id FROM delayed_job
                      WHERE state = 'running'
                        AND lease_expires_at < COALESCE($1, clock_timestamp())
                      FOR UPDATE SKIP LOCKED)",
    )
    .bind(at)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Moves up to `limit` jobs cancelled more than `older_than` before `at` (the database's clock
/// when `None`) to `delayed_job_archive` (completed ones move as they complete), in one
/// statement; returns how many moved. The hot table keeps what is scheduled, running, dead or
/// recently cancelled.
pub async fn archive_finished(
    pool: &PgPool,
    at: Option<DateTime<Utc>>,
    older_than: Duration,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "WITH moved AS (
             DELETE FROM delayed_job
             WHERE id IN (SELECT id FROM delayed_job
                          WHERE state IN ('completed', 'cancelled')
                            AND updated_at < COALESCE($1, clock_timestamp())
                                             - $3 * interval '1 millisecond'
                          ORDER BY updated_at LIMIT $2
                          FOR UPDATE SKIP LOCKED)
             RETURNING id, kind, payload, priority, state, run_at, attempts, max_attempts,
                       dedupe_key, last_error, traceparent, created_at, updated_at)
         INSERT INTO delayed_job_archive (id, kind, payload, priority, state, run_at, attempts,
             max_attempts, dedupe_key, last_error, traceparent, created_at, finished_at)
         SELECT * FROM moved",
    )
    .bind(at)
    .bind(limit)
    .bind(millis(older_than))
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Gives a dead job another run at `at` (the database's now when `None`), with a fresh
/// attempt budget. `false` if it is not dead.
pub async fn redrive(
    ex: impl sqlx::PgExecutor<'_>,
    id: i64,
    at: Option<DateTime<Utc>>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE delayed_job SET state = 'scheduled', run_at = COALESCE($2, clock_timestamp()),
             attempts = 0, updated_at = now()
         WHERE id = $1 AND state = 'dead'",
    )
    .bind(id)
    .bind(at)
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Where the job with each of `keys` stands, for a caller that must keep one job live per
/// business action (a sweep): only scheduled and running jobs cover their action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// Scheduled or running.
    Live(i64),
    /// Dead (attempts spent, or a permanent error): nothing runs unless it is redriven.
    Dead(i64),
    /// Cancelled, or completed (archived): it ended on purpose.
    Ended(i64),
    /// No job has the key.
    Missing,
}

/// The [`Coverage`] of each of `keys`, in order.
pub async fn coverage(
    conn: &mut PgConnection,
    keys: &[String],
) -> Result<Vec<Coverage>, sqlx::Error> {
    let rows: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT dedupe_key, id, state FROM delayed_job WHERE dedupe_key = ANY($1)
         UNION ALL
         SELECT a.dedupe_key, a.id, 'completed' FROM delayed_job_archive a
         WHERE a.dedupe_key = ANY($1)
           AND NOT EXISTS (SELECT 1 FROM delayed_job j WHERE j.dedupe_key = a.dedupe_key)",
    )
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    let found: std::collections::HashMap<&str, (i64, &str)> = rows
        .iter()
        .map(|(k, id, state)| (k.as_str(), (*id, state.as_str())))
        .collect();
    Ok(keys
        .iter()
        .map(|k| match found.get(k.as_str()) {
            Some((id, "scheduled" | "running")) => Coverage::Live(*id),
            Some((id, "dead")) => Coverage::Dead(*id),
            Some((id, _)) => Coverage::Ended(*id),
            None => Coverage::Missing,
        })
        .collect())
}

/// Makes the jobs with `keys` due now (by the database's clock), in the caller's transaction,
/// whatever became of them: a scheduled one comes forward; a dead one is scheduled again with
/// a fresh budget; a finished one (completed, archived) moves back to the hot table, scheduled
/// with a fresh budget. For a business action that needs its job after all: an order that can
/// no longer take money must have its payments closed, whatever their checks did before.
/// Running jobs are left alone (they are running). Wakes the engines. Returns how many moved.
pub async fn bring_forward(conn: &mut PgConnection, keys: &[String]) -> Result<u64, sqlx::Error> {
    if keys.is_empty() {
        return Ok(0);
    }
    // finished ones first: back to the hot table, where the statement below finds them
    sqlx::query(
        "WITH back AS (
             DELETE FROM delayed_job_archive a
             WHERE a.dedupe_key = ANY($1)
               AND NOT EXISTS (SELECT 1 FROM delayed_job j WHERE j.dedupe_key = a.dedupe_key)
             RETURNING id, kind, payload, priority, max_attempts, dedupe_key, last_error,
                       traceparent, created_at)
         INSERT INTO delayed_job (id, kind, payload, priority, state, run_at, attempts,
             max_attempts, dedupe_key, last_error, traceparent, created_at)
         SELECT id, kind, payload, priority, 'scheduled', clock_timestamp(), 0, max_attempts,
                dedupe_key, last_error, traceparent, created_at
         FROM back
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(keys)
    .execute(&mut *conn)
    .await?;
    let mut kinds: Vec<String> = sqlx::query_scalar(
        "UPDATE delayed_job
         SET run_at = LEAST(run_at, clock_timestamp()), state = 'scheduled',
             attempts = CASE WHEN state = 'dead' THEN 0 ELSE attempts END, updated_at = now()
         WHERE dedupe_key = ANY($1) AND state IN ('scheduled', 'dead')
         RETURNING kind",
    )
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    let moved = kinds.len() as u64;
    kinds.sort();
    kinds.dedup();
    for kind in &kinds {
        wake(conn, kind).await?;
    }
    Ok(moved)
}

/// Aging, so a low priority is never starved: a scheduled job overdue by more than `step` moves
/// up one priority level, at most once per `step` (the clock of the last change is
/// `updated_at`). A P2 job overdue by two steps runs as P0. Returns how many moved. `at`:
/// the database's clock when `None`.
pub async fn age_priorities(
    pool: &PgPool,
    at: Option<DateTime<Utc>>,
    step: Duration,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "WITH t AS (SELECT COALESCE($1, clock_timestamp()) AS now)
         UPDATE delayed_job
         SET priority = priority - 1, updated_at = t.now
         FROM t
         WHERE state = 'scheduled' AND priority > 0
           AND run_at < t.now - $2 * interval '1 millisecond'
           AND updated_at < t.now - $2 * interval '1 millisecond'",
    )
    .bind(at)
    .bind(millis(step))
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Jobs due by `at` (the database's clock when `None`) and waiting to be claimed, by priority
/// (P0, P1, P2).
pub async fn queue_depth(
    pool: &PgPool,
    at: Option<DateTime<Utc>>,
) -> Result<[i64; 3], sqlx::Error> {
    let rows: Vec<(i16, i64)> = sqlx::query_as(
        "SELECT priority, count(*) FROM delayed_job
         WHERE state = 'scheduled' AND run_at <= COALESCE($1, clock_timestamp())
         GROUP BY priority",
    )
    .bind(at)
    .fetch_all(pool)
    .await?;
    let mut depth = [0; 3];
    for (p, n) in rows {
        if let Some(d) = depth.get_mut(p as usize) {
            *d = n;
        }
    }
    Ok(depth)
}

/// Stops every instance from claiming jobs of `kind` (running ones finish), within one poll
/// interval (how often a running engine re-reads the paused kinds). `false` if it was already
/// paused.
pub async fn pause_kind(pool: &PgPool, kind: &str, by: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO job_kind_pause (kind, paused_by) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(kind)
    .bind(by)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The kinds an operator paused. Callers leave them out of the kinds they claim (a filter in
/// the claim itself would keep Postgres from reading due jobs in index order).
pub async fn paused_kinds(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT kind FROM job_kind_pause")
        .fetch_all(pool)
        .await
}

/// Lets instances claim `kind` again. `false` if it was not paused.
pub async fn resume_kind(pool: &PgPool, kind: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM job_kind_pause WHERE kind = $1")
        .bind(kind)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// A job as operators see it (the ops API).
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize, utoipa::ToSchema)]
pub struct JobRow {
    pub id: i64,
    pub kind: String,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    /// 0 = P0 ... 2 = P2 (after aging, if it waited long)
    pub priority: i16,
    /// scheduled, running, completed, dead or cancelled
    pub state: String,
    pub run_at: DateTime<Utc>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub dedupe_key: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const JOB_COLUMNS: &str = "id, kind, payload, priority, state, run_at, attempts, max_attempts,
    dedupe_key, lease_owner, lease_expires_at, last_error, created_at, updated_at";

/// Jobs, live or archived (completed ones are archived as they complete), newest first,
/// filtered by state and kind when given, a page at a time (`before`: the last id of the
/// previous page).
pub async fn list_jobs(
    pool: &PgPool,
    state: Option<&str>,
    kind: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<JobRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM delayed_job_all
         WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR kind = $2)
           AND ($3::bigint IS NULL OR id < $3)
         ORDER BY id DESC LIMIT $4"
    ))
    .bind(state)
    .bind(kind)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// One job, live or archived.
pub async fn get_job(pool: &PgPool, id: i64) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM delayed_job_all WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}
