//! Compensation's own tables (migration `compensation_failures`): where each payment's checks
//! stand, the failures archived for manual replay, and the operators' audit trail.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

/// Outcomes kept per payment in `payment_check_state.history`.
const HISTORY: i32 = 20;

/// Records one check's outcome; returns the provider failures in a row, this one included
/// (`failure` false resets the run).
pub async fn record_check(
    ex: impl PgExecutor<'_>,
    payment_id: Uuid,
    outcome: &str,
    error: Option<&str>,
    failure: bool,
) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO payment_check_state AS s
             (payment_id, checks, failures, last_outcome, last_error, history)
         VALUES ($1, 1, CASE WHEN $4 THEN 1 ELSE 0 END, $2, $3,
                 jsonb_build_array(jsonb_build_object('at', now(), 'outcome', $2, 'error', $3)))
         ON CONFLICT (payment_id) DO UPDATE SET
             checks = s.checks + 1,
             failures = CASE WHEN $4 THEN s.failures + 1 ELSE 0 END,
             last_outcome = $2, last_error = $3, updated_at = now(),
             history = (SELECT coalesce(jsonb_agg(e ORDER BY n), '[]') FROM
                 jsonb_array_elements(s.history || jsonb_build_array(
                     jsonb_build_object('at', now(), 'outcome', $2, 'error', $3)))
                 WITH ORDINALITY AS h(e, n)
                 WHERE n > jsonb_array_length(s.history) + 1 - $5)
         RETURNING failures",
    )
    .bind(payment_id)
    .bind(outcome)
    .bind(error)
    .bind(failure)
    .bind(HISTORY)
    .fetch_one(ex)
    .await
}

/// What a replay sends to the provider. Operators may edit it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayParams {
    /// Query the provider by its own transaction id instead of our payment id (when the query
    /// by payment id cannot find it). Read it off the provider's merchant console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Failure {
    pub id: i64,
    pub payment_id: Uuid,
    pub order_id: Uuid,
    pub provider: String,
    /// What ended the checks: gateway_timeout, gateway_error, unknown_at_provider,
    /// bad_answer, apply_rejected.
    pub reason: String,
    pub last_error: String,
    /// Checks made before it was archived.
    pub attempts: i32,
    /// The payment, the order and the recent checks when it was archived.
    #[schema(value_type = Object)]
    pub context: serde_json::Value,
    #[schema(value_type = ReplayParams)]
    pub params: serde_json::Value,
    /// open or resolved
    pub status: String,
    /// replay, webhook, compensation, closed_at_provider, already_settled
    pub resolution: Option<String>,
    /// The order's state now.
    pub order_state: String,
    /// The payment's status now.
    pub payment_status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
}

const FAILURE_SELECT: &str = "SELECT f.id, f.payment_id, f.order_id, f.provider, f.reason,
        f.last_error, f.attempts, f.context, f.params, f.status, f.resolution,
        o.state AS order_state, p.status AS payment_status, f.created_at, f.updated_at,
        f.resolved_at
    FROM compensation_failure f
    JOIN orders o ON o.id = f.order_id
    JOIN payments p ON p.id = f.payment_id";

#[derive(sqlx::FromRow)]
struct FailureRow {
    id: i64,
    payment_id: Uuid,
    order_id: Uuid,
    provider: String,
    reason: String,
    last_error: String,
    attempts: i32,
    context: serde_json::Value,
    params: serde_json::Value,
    status: String,
    resolution: Option<String>,
    order_state: String,
    payment_status: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    resolved_at: Option<DateTime<Utc>>,
}

impl From<FailureRow> for Failure {
    fn from(r: FailureRow) -> Self {
        Failure {
            id: r.id,
            payment_id: r.payment_id,
            order_id: r.order_id,
            provider: r.provider,
            reason: r.reason,
            last_error: r.last_error,
            attempts: r.attempts,
            context: r.context,
            params: r.params,
            status: r.status,
            resolution: r.resolution,
            order_state: r.order_state,
            payment_status: r.payment_status,
            created_at: r.created_at,
            updated_at: r.updated_at,
            resolved_at: r.resolved_at,
        }
    }
}

/// Archives a payment's failure with its whole context (in the caller's transaction, with
/// its outbox event). `None` if the payment already has an open failure.
pub async fn archive(
    conn: &mut PgConnection,
    payment_id: Uuid,
    reason: &str,
    last_error: &str,
) -> Result<Option<Failure>, sqlx::Error> {
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO compensation_failure
             (payment_id, order_id, provider, reason, last_error, attempts, context)
         SELECT p.id, p.order_id, p.provider, $2, $3, coalesce(s.checks, 0),
                jsonb_build_object(
                    'payment', to_jsonb(p) - 'pay_url',
                    'order', to_jsonb(o),
                    'checks', coalesce(s.history, '[]'))
         FROM payments p
         JOIN orders o ON o.id = p.order_id
         LEFT JOIN payment_check_state s ON s.payment_id = p.id
         WHERE p.id = $1
         ON CONFLICT (payment_id) WHERE status = 'open' DO NOTHING
         RETURNING id",
    )
    .bind(payment_id)
    .bind(reason)
    .bind(last_error)
    .fetch_optional(&mut *conn)
    .await?;
    match id {
        Some(id) => get_failure(&mut *conn, id).await,
        None => Ok(None),
    }
}

/// Says why a payment's open failure stands now (`reason`, `last_error`): the failure a refund
/// was archived with while it was still being retried became one that stopped. The failure's
/// id and attempts, or `None` if the payment has no open failure with another reason.
pub async fn restate(
    ex: impl PgExecutor<'_>,
    payment_id: Uuid,
    reason: &str,
    last_error: &str,
) -> Result<Option<(i64, i32)>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE compensation_failure SET reason = $2, last_error = $3, updated_at = now()
         WHERE payment_id = $1 AND status = 'open' AND reason <> $2
         RETURNING id, attempts",
    )
    .bind(payment_id)
    .bind(reason)
    .bind(last_error)
    .fetch_optional(ex)
    .await
}

pub async fn get_failure(ex: impl PgExecutor<'_>, id: i64) -> Result<Option<Failure>, sqlx::Error> {
    let row: Option<FailureRow> = sqlx::query_as(&format!("{FAILURE_SELECT} WHERE f.id = $1"))
        .bind(id)
        .fetch_optional(ex)
        .await?;
    Ok(row.map(Failure::from))
}

/// Failures newest first; `status` open or resolved (both when absent); `before` pages.
pub async fn list_failures(
    pool: &PgPool,
    status: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Failure>, sqlx::Error> {
    let rows: Vec<FailureRow> = sqlx::query_as(&format!(
        "{FAILURE_SELECT}
         WHERE ($1::text IS NULL OR f.status = $1) AND ($2::bigint IS NULL OR f.id < $2)
         ORDER BY f.id DESC LIMIT $3"
    ))
    .bind(status)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Failure::from).collect())
}

/// Sets the replay parameters of an open failure; the old ones, or `None` if it is not open.
pub async fn set_params(
    conn: &mut PgConnection,
    id: i64,
    params: &serde_json::Value,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE compensation_failure f SET params = $2, updated_at = now()
         FROM (SELECT id, params FROM compensation_failure WHERE id = $1 FOR UPDATE) old
         WHERE f.id = old.id AND f.status = 'open'
         RETURNING old.params",
    )
    .bind(id)
    .bind(params)
    .fetch_optional(conn)
    .await
}

/// Resolves an open failure that settling the payment did not (the payment was settled or
/// closed already). `false` if it was not open.
pub async fn resolve(
    ex: impl PgExecutor<'_>,
    id: i64,
    resolution: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE compensation_failure SET status = 'resolved', resolution = $2,
             resolved_at = now(), updated_at = now()
         WHERE id = $1 AND status = 'open'",
    )
    .bind(id)
    .bind(resolution)
    .execute(ex)
    .await?;
    Ok(r.rows_affected() == 1)
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AuditRow {
    pub id: i64,
    pub failure_id: i64,
    pub operator: String,
    /// edit or replay
    pub action: String,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    pub outcome: String,
    pub at: DateTime<Utc>,
}

pub async fn audit(
    ex: impl PgExecutor<'_>,
    failure_id: i64,
    operator: &str,
    action: &str,
    detail: &serde_json::Value,
    outcome: &str,
) -> Result<AuditRow, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO compensation_audit (failure_id, operator, action, detail, outcome)
         VALUES ($1, $2, $3, $4, $5)
         RETURNING id, failure_id, operator, action, detail, outcome, at",
    )
    .bind(failure_id)
    .bind(operator)
    .bind(action)
    .bind(detail)
    .bind(outcome)
    .fetch_one(ex)
    .await
}

pub async fn audit_of(pool: &PgPool, failure_id: i64) -> Result<Vec<AuditRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, failure_id, operator, action, detail, outcome, at
         FROM compensation_audit WHERE failure_id = $1 ORDER BY id",
    )
    .bind(failure_id)
    .fetch_all(pool)
    .await
}

/// Payments in `status` (last changed at least `grace` ago, oldest first, at most `limit`)
/// whose job (dedupe key `key_prefix` + payment id) is not live (scheduled, running): none was
/// ever written, it died, or it finished while the payment still needs it. A finished job
/// ended on purpose for a payment whose order can still take money (a check archived after
/// provider failures: an operator has it), so those are left out; once the order cannot take
/// money (cancelled, expired) its open payment is returned whatever became of its check,
/// since it must be closed at the provider. Money owed (`REFUND_REQUIRED`) is returned
/// unless its refund ended on purpose (refused, archived).
///
/// No row is locked: every way of giving a payment its job again is idempotent (an insert
/// names the existing job, a redrive or revival matches the job's state), so two workers
/// sweeping at once write one job, and a callback settling the payment meanwhile never waits
/// on the sweep (the job it gets finds the payment settled and ends).
pub async fn sweep(
    ex: impl PgExecutor<'_>,
    status: SweepStatus,
    key_prefix: &str,
    grace: std::time::Duration,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    // the status is written into the statement, not bound: the partial index `payments_sweep`
    // then serves a generic plan too
    let status = match status {
        SweepStatus::Open => "CREATED",
        SweepStatus::Owed => "REFUND_REQUIRED",
    };
    sqlx::query_scalar(&format!(
        "SELECT p.id FROM payments p
         WHERE p.status = '{status}'
           AND p.updated_at < now() - make_interval(secs => $1)
           AND NOT EXISTS (SELECT 1 FROM delayed_job j
                           WHERE j.dedupe_key = $2 || p.id::text
                             AND j.state IN ('scheduled', 'running'))
           AND (NOT EXISTS (SELECT 1 FROM delayed_job_archive a
                            WHERE a.dedupe_key = $2 || p.id::text)
                OR (p.status = 'CREATED'
                    AND EXISTS (SELECT 1 FROM orders o
                                WHERE o.id = p.order_id AND o.state <> 'PENDING')
                    -- brought back with a backoff: 30 s, doubling per provider failure in a
                    -- row, at most an hour: a provider that cannot answer is asked less and
                    -- less often, and never given up on
                    AND NOT EXISTS (SELECT 1 FROM payment_check_state s
                                    WHERE s.payment_id = p.id
                                      AND s.updated_at > now() - LEAST(interval '1 hour',
                                          make_interval(secs => 30 * power(2, LEAST(s.failures, 7)))))))
         ORDER BY p.updated_at
         LIMIT $3"
    ))
    .bind(grace.as_secs_f64())
    .bind(key_prefix)
    .bind(limit)
    .fetch_all(ex)
    .await
}

/// The payments a sweep looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepStatus {
    /// Open (`CREATED`): each needs a live check.
    Open,
    /// Money owed (`REFUND_REQUIRED`): each needs a live refund.
    Owed,
}

/// The SLA figures over the last `window`, from the database (so every worker, and the
/// console, agree).
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct SlaFigures {
    pub window_secs: i64,
    /// Payments compensation (or an operator's replay) brought to a result.
    pub compensated: i64,
    /// Failures archived.
    pub failed: i64,
    /// compensated / (compensated + failed); 1 when neither happened.
    pub success_rate: f64,
    /// Failures still open (any age).
    pub open_failures: i64,
    /// From "provider says paid" to applied, by source, over the window (ms).
    pub paid_latency: Vec<LatencyFigures>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct LatencyFigures {
    /// webhook, compensation or replay
    pub source: String,
    pub count: i64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub async fn sla_figures(
    pool: &PgPool,
    window: std::time::Duration,
) -> Result<SlaFigures, sqlx::Error> {
    let secs = window.as_secs_f64();
    let (compensated, failed, open_failures): (i64, i64, i64) = sqlx::query_as(
        "SELECT
           (SELECT count(*) FROM payment_events
             WHERE source IN ('compensation', 'replay')
               AND outcome IN ('PAID', 'REFUND_REQUIRED')
               AND received_at > now() - make_interval(secs => $1)),
           (SELECT count(*) FROM compensation_failure
             WHERE created_at > now() - make_interval(secs => $1)),
           (SELECT count(*) FROM compensation_failure WHERE status = 'open')",
    )
    .bind(secs)
    .fetch_one(pool)
    .await?;
    let paid_latency: Vec<LatencyFigures> = sqlx::query_as(
        "SELECT e.source, count(*) AS count,
            percentile_cont(0.5) WITHIN GROUP (ORDER BY lat) AS p50_ms,
            percentile_cont(0.99) WITHIN GROUP (ORDER BY lat) AS p99_ms,
            max(lat) AS max_ms
         FROM payment_events e
         JOIN payments p ON p.id = e.payment_id
         CROSS JOIN LATERAL (SELECT (extract(epoch FROM e.received_at - p.paid_at) * 1000)::float8
                             AS lat) l
         WHERE e.outcome IN ('PAID', 'REFUND_REQUIRED') AND p.paid_at IS NOT NULL
           AND e.received_at > now() - make_interval(secs => $1)
         GROUP BY e.source ORDER BY e.source",
    )
    .bind(secs)
    .fetch_all(pool)
    .await?;
    let total = compensated + failed;
    Ok(SlaFigures {
        window_secs: window.as_secs() as i64,
        compensated,
        failed,
        success_rate: if total == 0 {
            1.0
        } else {
            compensated as f64 / total as f64
        },
        open_failures,
        paid_latency,
    })
}

/// Callback latencies (ms) of webhook results received after `since`, with the time of the
/// newest: the SLA trigger's input.
pub async fn callback_latencies(
    pool: &PgPool,
    since: DateTime<Utc>,
) -> Result<Vec<(DateTime<Utc>, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT e.received_at,
                (extract(epoch FROM e.received_at - p.paid_at) * 1000)::bigint
         FROM payment_events e JOIN payments p ON p.id = e.payment_id
         WHERE e.source = 'webhook' AND e.received_at > $1 AND p.paid_at IS NOT NULL
         ORDER BY e.received_at LIMIT 20000",
    )
    .bind(since)
    .fetch_all(pool)
    .await
}

/// How many of a paid payment's events are missing when a check finds it paid at the provider
/// and still open here: its callback (still open: no webhook applied it), and of those that
/// follow payment (`OrderPaid`, `StockDeducted`, `VoucherIssued`, `OrderConfirmed`) what the
/// order's state says cannot be there yet. Read from the order's row (one primary-key
/// lookup), not the outbox, which has no index by order and only grows.
pub async fn missing_events(pool: &PgPool, order_id: Uuid) -> Result<u32, sqlx::Error> {
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM orders WHERE id = $1")
        .bind(order_id)
        .fetch_optional(pool)
        .await?;
    let after_payment = match state.as_deref() {
        Some("PENDING" | "EXPIRED" | "CANCELLED") | None => 4,
        // OrderPaid is there; the follow-ups may not be, OrderConfirmed is not
        Some("PAID") => 3,
        _ => 0,
    };
    Ok(1 + after_payment)
}

/// Brings scheduled checks due later than `within` from now forward to then (the SLA
/// trigger's fast mode starting); returns how many moved.
pub async fn pull_checks_forward(
    pool: &PgPool,
    kind: &str,
    within: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE delayed_job SET run_at = now() + make_interval(secs => $2), updated_at = now()
         WHERE kind = $1 AND state = 'scheduled' AND run_at > now() + make_interval(secs => $2)",
    )
    .bind(kind)
    .bind(within.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}
