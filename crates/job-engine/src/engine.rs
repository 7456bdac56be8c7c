//! The worker side: handlers registered by job kind, a claim-run-settle step ([`Engine::run_once`])
//! that tests drive directly, and maintenance. The pipelined loop is in [`crate::runner`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::clock::Clock;
use crate::leader::Leadership;
use crate::store::{self, ClaimedJob, Settle};

/// What a handler says about one run of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: the job completes.
    Done,
    /// Failed in a way a later attempt may not: retried with exponential backoff and jitter,
    /// dead after its last attempt.
    Retry(String),
    /// Failed, and another attempt is due after exactly this long (a provider asked to come
    /// back later); the attempt counts, as with `Retry`.
    RetryAfter(Duration, String),
    /// Not yet, and not a failure (a payment not paid yet, a provider that cannot take a
    /// refund now): run again after exactly this long without spending an attempt. A job that
    /// only ever snoozes lives as long as its business reason does.
    Snooze(Duration, String),
    /// Retrying cannot help (bad payload, a rule says no): dead at once, kept for redrive.
    Permanent(String),
}

/// A job as its handler sees it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub kind: String,
    pub payload: serde_json::Value,
    /// This attempt's number, from 1.
    pub attempt: i32,
    pub max_attempts: i32,
}

pub(crate) type HandlerFn =
    dyn Fn(Job) -> Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync;

/// What the engine reports about each job it settles, for metrics (the engine keeps no
/// registry of its own).
#[derive(Debug, Clone)]
pub struct Settled {
    pub kind: String,
    pub priority: i16,
    /// Started at minus due at: how late the job fired (zero if it fired early).
    pub fire_delay: Duration,
    /// One of [`OUTCOMES`].
    pub outcome: &'static str,
}

/// What [`Settled::outcome`] can say.
pub const OUTCOMES: [&str; 5] = ["completed", "retried", "snoozed", "dead", "lease_lost"];

pub(crate) type Observer = dyn Fn(&Settled) + Send + Sync;
type MaintenanceObserver = dyn Fn(&Maintenance) + Send + Sync;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Names this instance in lease rows (host, pid); for operators, not for correctness.
    pub owner: String,
    /// Jobs claimed per round trip, at most.
    pub batch_size: i64,
    /// How long a claim holds a job before another instance may rescue it. The loop extends
    /// the leases it holds every third of this (heartbeat).
    pub lease: Duration,
    /// How long the loop waits for a wake-up (`NOTIFY`, a freed slot) before it polls anyway.
    pub poll_interval: Duration,
    /// Jobs due within this from now are claimed ahead and fire from the in-memory timer, on
    /// time. At least `poll_interval`.
    pub lookahead: Duration,
    /// Handlers running at once on this instance: starts at `concurrency_min`, doubles while
    /// due jobs wait, halves when idle, never above `concurrency_max`.
    pub concurrency_min: usize,
    pub concurrency_max: usize,
    /// First retry delay; doubled per attempt, up to `backoff_cap`, with jitter.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How often the loop tries for leadership and, as leader, runs maintenance.
    pub maintenance_interval: Duration,
    /// Finished jobs older than this leave the hot table for the archive.
    pub archive_after: Duration,
    /// A scheduled job overdue by this moves up one priority level (and again after as long).
    pub aging_step: Duration,
    /// At shutdown, how long running handlers may take to finish before their leases are given
    /// back anyway.
    pub drain_timeout: Duration,
    /// A schedule's occurrence older than this when the leader gets to it was missed (the
    /// leader was down) and follows the schedule's misfire policy.
    pub misfire_grace: Duration,
    /// The leader's lease (see [`crate::leader`]), renewed every third of it: a leader that
    /// stops renewing (dead, paused) is replaced within about this long.
    pub leader_lease: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            owner: format!("engine-{}", std::process::id()),
            batch_size: 200,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(250),
            lookahead: Duration::from_millis(1000),
            concurrency_min: 8,
            concurrency_max: 64,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            maintenance_interval: Duration::from_secs(5),
            archive_after: Duration::from_secs(3600),
            aging_step: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            misfire_grace: Duration::from_secs(60),
            leader_lease: Duration::from_secs(5),
        }
    }
}

impl EngineConfig {
    /// `JOB_*` environment variables over `defaults` (names in README.md), checked together.
    /// The owner names the binary, host and process.
    pub fn from_env(binary: &str, defaults: EngineConfig) -> Result<EngineConfig, String> {
        use service_kit::config::{env_millis, env_or, env_string};
        let var = |name: &str, default: usize| env_or(name, default).map_err(|e| e.to_string());
        let ms = |name: &str, d: Duration| {
            env_millis(name, d.as_millis() as u64).map_err(|e| e.to_string())
        };
        let d = defaults;
        let config = EngineConfig {
            owner: format!(
                "{binary}-{}-{}",
                env_string("HOSTNAME", "local"),
                std::process::id()
            ),
            batch_size: env_or("JOB_BATCH_SIZE", d.batch_size).map_err(|e| e.to_string())?,
            lease: ms("JOB_LEASE_MS", d.lease)?,
            poll_interval: ms("JOB_POLL_MS", d.poll_interval)?,
            lookahead: ms("JOB_LOOKAHEAD_MS", d.lookahead)?,
            concurrency_min: var("JOB_CONCURRENCY_MIN", d.concurrency_min)?,
            concurrency_max: var("JOB_CONCURRENCY_MAX", d.concurrency_max)?,
            backoff_base: ms("JOB_BACKOFF_BASE_MS", d.backoff_base)?,
            backoff_cap: ms("JOB_BACKOFF_CAP_MS", d.backoff_cap)?,
            maintenance_interval: ms("JOB_MAINTENANCE_MS", d.maintenance_interval)?,
            archive_after: ms("JOB_ARCHIVE_AFTER_MS", d.archive_after)?,
            aging_step: ms("JOB_AGING_STEP_MS", d.aging_step)?,
            drain_timeout: ms("JOB_DRAIN_TIMEOUT_MS", d.drain_timeout)?,
            misfire_grace: ms("JOB_MISFIRE_GRACE_MS", d.misfire_grace)?,
            leader_lease: ms("JOB_LEADER_LEASE_MS", d.leader_lease)?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the settings that only work together: a wrong value is an error at start-up,
    /// never a job fired late.
    pub fn validate(&self) -> Result<(), String> {
        let half_wake = store::WAKE_HORIZON / 2;
        if self.batch_size < 1 {
            return Err("JOB_BATCH_SIZE must be at least 1".into());
        }
        if self.poll_interval.is_zero() || self.poll_interval > half_wake {
            return Err(format!(
                "JOB_POLL_MS must be between 1 and {} (half the {} ms wake-up horizon)",
                half_wake.as_millis(),
                store::WAKE_HORIZON.as_millis()
            ));
        }
        if self.lookahead < self.poll_interval {
            return Err("JOB_LOOKAHEAD_MS must be at least JOB_POLL_MS".into());
        }
        if self.lease < self.lookahead + Duration::from_secs(1) {
            return Err("JOB_LEASE_MS must exceed JOB_LOOKAHEAD_MS by at least a second".into());
        }
        if self.concurrency_min == 0 || self.concurrency_min > self.concurrency_max {
            return Err("need 1 <= JOB_CONCURRENCY_MIN <= JOB_CONCURRENCY_MAX".into());
        }
        if self.leader_lease < 3 * self.poll_interval || self.leader_lease < Duration::from_secs(1)
        {
            return Err(
                "JOB_LEADER_LEASE_MS must be at least a second and three poll intervals".into(),
            );
        }
        Ok(())
    }
}

/// What one [`Engine::maintain_once`] did (all zero when this instance does not lead).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Maintenance {
    pub leader: bool,
    /// This round made this instance the leader (it was not before).
    pub became_leader: bool,
    pub rescued: u64,
    pub archived: u64,
    /// Jobs moved up a priority level by aging.
    pub aged: u64,
    /// Jobs written for recurring schedules' occurrences.
    pub scheduled: u64,
    /// Jobs due and not yet claimed, by priority (P0, P1, P2).
    pub depth: [i64; 3],
}

/// Finished jobs moved to the archive per statement, and statements per maintenance round.
const ARCHIVE_BATCH: i64 = 1000;
const ARCHIVE_BATCHES: usize = 20;

/// What one [`Engine::run_once`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundReport {
    pub claimed: usize,
    pub completed: usize,
    pub retried: usize,
    pub dead: usize,
    /// Settles refused because the lease had been rescued meanwhile.
    pub lease_lost: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// A registered kind: its handler and, if set, a bound on how many of its jobs run at once on
/// this instance.
#[derive(Clone)]
pub(crate) struct Kind {
    pub(crate) handler: Arc<HandlerFn>,
    pub(crate) limit: Option<Arc<tokio::sync::Semaphore>>,
}

/// One instance of the job engine. Any number may run against one database.
pub struct Engine {
    pub(crate) pool: PgPool,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: EngineConfig,
    pub(crate) handlers: HashMap<String, Kind>,
    pub(crate) kinds: Vec<String>,
    pub(crate) observer: Option<Arc<Observer>>,
    maintenance_observer: Option<Arc<MaintenanceObserver>>,
}

impl Engine {
    pub fn new(pool: PgPool, clock: Arc<dyn Clock>, config: EngineConfig) -> Self {
        Engine {
            pool,
            clock,
            config,
            handlers: HashMap::new(),
            kinds: Vec::new(),
            observer: None,
            maintenance_observer: None,
        }
    }

    /// Exports what this instance's jobs do on `metrics`: `job_fire_delay_seconds{kind,
    /// priority}` (how late each started; buckets up to ten minutes) and
    /// `jobs_total{kind,outcome}`, every registered kind's outcomes counted from 0 so the first
    /// dead job of a kind is an increase an alert sees (a series born at 1 is not). Call it
    /// after registering the kinds; it takes the [`Engine::on_settled`] hook.
    pub fn export_job_metrics(&mut self, metrics: &service_kit::telemetry::Metrics) {
        let fire_delay = metrics.histogram_with(
            "job_fire_delay_seconds",
            "How late each job started: claimed at minus due at",
            &["kind", "priority"],
            service_kit::telemetry::SLA_BUCKETS,
        );
        let jobs = metrics.counter(
            "jobs_total",
            "Jobs settled, by kind and outcome (completed, retried, snoozed: not due yet, spending no attempt; dead, lease_lost)",
            &["kind", "outcome"],
        );
        for kind in &self.kinds {
            for outcome in OUTCOMES {
                jobs.with_label_values(&[kind.as_str(), outcome]);
            }
        }
        self.on_settled(move |s| {
            let priority = format!("P{}", s.priority);
            fire_delay
                .with_label_values(&[s.kind.as_str(), priority.as_str()])
                .observe(s.fire_delay.as_secs_f64());
            jobs.with_label_values(&[s.kind.as_str(), s.outcome]).inc();
        });
    }

    /// Calls `f` for every job this instance settles (metrics: fire delay, outcomes).
    pub fn on_settled(&mut self, f: impl Fn(&Settled) + Send + Sync + 'static) {
        self.observer = Some(Arc::new(f));
    }

    /// Calls `f` after every maintenance round this instance leads (metrics: leader changes,
    /// rescues, queue depth).
    pub fn on_maintenance(&mut self, f: impl Fn(&Maintenance) + Send + Sync + 'static) {
        self.maintenance_observer = Some(Arc::new(f));
    }

    /// Runs `handler` for every job of `kind`. An instance claims only kinds it has handlers
    /// for, so two binaries with different kinds share one table without stepping on each
    /// other.
    pub fn register<F, Fut>(&mut self, kind: &str, handler: F)
    where
        F: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        self.register_kind(kind, None, handler);
    }

    /// Like [`Engine::register`], with at most `concurrency` jobs of this kind running at once
    /// on this instance (a slow provider, a rate limit).
    pub fn register_limited<F, Fut>(&mut self, kind: &str, concurrency: usize, handler: F)
    where
        F: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        self.register_kind(kind, Some(concurrency.max(1)), handler);
    }

    fn register_kind<F, Fut>(&mut self, kind: &str, limit: Option<usize>, handler: F)
    where
        F: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let entry = Kind {
            handler: Arc::new(move |job| Box::pin(handler(job))),
            limit: limit.map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
        };
        if self.handlers.insert(kind.to_owned(), entry).is_none() {
            self.kinds.push(kind.to_owned());
        }
    }

    /// Claims one batch of jobs due now, runs them concurrently and settles them in one
    /// statement, each under its lease. The deterministic step tests drive with a test clock;
    /// [`Engine::run`] is the pipelined loop built from the same pieces.
    pub async fn run_once(&self) -> Result<RoundReport, EngineError> {
        let kinds = self.claimable(&store::paused_kinds(&self.pool).await?);
        let claimed = store::claim(
            &self.pool,
            &self.config.owner,
            &kinds,
            self.config.batch_size,
            self.clock.decide_at(),
            Duration::ZERO,
            self.config.lease,
        )
        .await?;
        let now = self.clock.now();
        let mut report = RoundReport {
            claimed: claimed.len(),
            ..Default::default()
        };
        let mut running = JoinSet::new();
        for job in claimed {
            let Some(kind) = self.handlers.get(&job.kind).cloned() else {
                continue; // claimed only registered kinds
            };
            running.spawn(async move {
                let outcome = (kind.handler)(job.as_handed()).instrument(job.span()).await;
                (job, outcome)
            });
        }
        let mut finished = Vec::new();
        while let Some(done) = running.join_next().await {
            match done {
                Ok((job, outcome)) => finished.push(Finished {
                    how: settlement(&self.config, self.clock.now(), &job, outcome),
                    fire_delay: (now - job.run_at).to_std().unwrap_or_default(),
                    job,
                }),
                // a panicking handler: its lease runs out and the job is rescued
                Err(e) => tracing::error!(error = %e, "job handler panicked"),
            }
        }
        for label in settle_finished(&self.pool, &finished, self.observer.as_deref()).await? {
            match label {
                "completed" => report.completed += 1,
                "retried" | "snoozed" => report.retried += 1,
                "dead" => report.dead += 1,
                _ => report.lease_lost += 1,
            }
        }
        Ok(report)
    }

    /// The kinds this instance runs, less those an operator paused.
    pub(crate) fn claimable(&self, paused: &[String]) -> Vec<String> {
        self.kinds
            .iter()
            .filter(|k| !paused.contains(k))
            .cloned()
            .collect()
    }

    /// Puts jobs whose lease expired back to `scheduled` (their owner died or hung).
    pub async fn rescue_once(&self) -> Result<u64, EngineError> {
        let n = store::rescue_expired(&self.pool, self.clock.decide_at()).await?;
        if n > 0 {
            tracing::warn!(rescued = n, "rescued jobs whose lease expired");
        }
        Ok(n)
    }

    /// Maintenance. On every instance: samples the database's clock and rescues expired
    /// leases. A leader that is paused (a SIGSTOP, a frozen VM) stops renewing its lease and
    /// is replaced once it lapses, but the rescue need not wait for that; it is safe anywhere
    /// (`SKIP LOCKED`, token-checked settles). On the leader only: writes recurring
    /// schedules' next jobs (fenced by the lease: a leader that woke from a pause writes
    /// nothing once replaced), ages priorities, moves finished jobs older than
    /// `archive_after` to the archive (in bounded batches) and counts the queue.
    pub async fn maintain_once(
        &self,
        leadership: &mut Leadership,
    ) -> Result<Maintenance, EngineError> {
        self.sync_clock().await?;
        let rescued = self.rescue_once().await?;
        let fence = match leadership.ensure().await {
            true => leadership.fence(),
            false => None,
        };
        let Some(fence) = fence else {
            let m = Maintenance {
                rescued,
                ..Default::default()
            };
            if let (Some(observe), true) = (&self.maintenance_observer, rescued > 0) {
                observe(&m);
            }
            return Ok(m);
        };
        let now = self.clock.now();
        let at = self.clock.decide_at();
        // schedules are written ahead, past the next maintenance round, so that their jobs
        // are claimed ahead and fire from the timer on time
        let until = now + to_chrono(2 * self.config.maintenance_interval + self.config.lookahead);
        let grace = to_chrono(self.config.misfire_grace);
        let mut m = Maintenance {
            leader: true,
            became_leader: leadership.newly_leading(),
            scheduled: crate::schedule::materialize(
                &self.pool,
                now,
                until,
                grace,
                Some((&fence, leadership.lease())),
            )
            .await?,
            rescued,
            aged: store::age_priorities(&self.pool, at, self.config.aging_step).await?,
            ..Default::default()
        };
        for _ in 0..ARCHIVE_BATCHES {
            let moved =
                store::archive_finished(&self.pool, at, self.config.archive_after, ARCHIVE_BATCH)
                    .await?;
            m.archived += moved;
            if moved < ARCHIVE_BATCH as u64 {
                break;
            }
        }
        m.depth = store::queue_depth(&self.pool, at).await?;
        if let Some(observe) = &self.maintenance_observer {
            observe(&m);
        }
        Ok(m)
    }

    /// Gives the clock a fresh sample of the database's (see [`crate::clock`]).
    pub async fn sync_clock(&self) -> Result<(), EngineError> {
        let sent = std::time::Instant::now();
        let db: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&self.pool)
            .await?;
        self.clock.observe(db, sent, std::time::Instant::now());
        Ok(())
    }

    /// This instance's leadership of the engine's maintenance (one leader per database).
    pub fn leadership(&self) -> Leadership {
        Leadership::new(
            self.pool.clone(),
            "job",
            &self.config.owner,
            self.config.leader_lease,
        )
    }
}

/// A job whose handler returned, with how it is to be settled.
pub(crate) struct Finished {
    pub(crate) job: ClaimedJob,
    pub(crate) how: Settle,
    pub(crate) fire_delay: Duration,
}

/// Settles `finished` in one statement (rows sorted by id, so concurrent batches lock in one
/// order) and reports each job to the observer. Returns each job's outcome label, in order.
pub(crate) async fn settle_finished(
    pool: &PgPool,
    finished: &[Finished],
    observer: Option<&Observer>,
) -> Result<Vec<&'static str>, sqlx::Error> {
    if finished.is_empty() {
        return Ok(Vec::new());
    }
    let mut rows: Vec<(i64, uuid::Uuid, Settle)> = finished
        .iter()
        .map(|f| (f.job.id, f.job.lease_token, f.how.clone()))
        .collect();
    rows.sort_by_key(|r| r.0);
    // by (id, token): a stale run and a new run of one job may settle together
    let settled: HashSet<(i64, uuid::Uuid)> =
        store::settle_many(pool, &rows).await?.into_iter().collect();
    let mut labels = Vec::with_capacity(finished.len());
    for f in finished {
        let label = match (&f.how, settled.contains(&(f.job.id, f.job.lease_token))) {
            (_, false) => {
                tracing::warn!(job_id = f.job.id, kind = %f.job.kind, "lease lost before the job settled; its new owner decides");
                "lease_lost"
            }
            (Settle::Completed, true) => "completed",
            (Settle::Retry { .. }, true) => "retried",
            (Settle::Snooze { .. }, true) => "snoozed",
            (Settle::Dead { error }, true) => {
                tracing::error!(job_id = f.job.id, kind = %f.job.kind, attempts = f.job.attempts, error = %error, "job is dead");
                "dead"
            }
        };
        if let Some(observe) = observer {
            observe(&Settled {
                kind: f.job.kind.clone(),
                priority: f.job.priority,
                fire_delay: f.fire_delay,
                outcome: label,
            });
        }
        labels.push(label);
    }
    Ok(labels)
}

/// How a handler's outcome settles its job: a retry backs off (or waits as asked) until the
/// attempt budget is spent, then the job is dead.
pub(crate) fn settlement(
    config: &EngineConfig,
    now: DateTime<Utc>,
    job: &ClaimedJob,
    outcome: Outcome,
) -> Settle {
    let out_of_attempts = job.attempts >= job.max_attempts;
    match outcome {
        Outcome::Done => Settle::Completed,
        Outcome::Permanent(error) => Settle::Dead { error },
        Outcome::Retry(error) | Outcome::RetryAfter(_, error) if out_of_attempts => {
            Settle::Dead { error }
        }
        Outcome::Retry(error) => Settle::Retry {
            at: now
                + to_chrono(backoff(
                    job.attempts,
                    config.backoff_base,
                    config.backoff_cap,
                    fastrand::f64(),
                )),
            error,
        },
        Outcome::RetryAfter(after, error) => Settle::Retry {
            at: now + to_chrono(after),
            error,
        },
        Outcome::Snooze(after, note) => Settle::Snooze {
            at: now + to_chrono(after),
            note,
        },
    }
}

impl ClaimedJob {
    /// The span a run of the job is: a child of the trace that wrote the job (an order's
    /// follow-ups continue the order's trace).
    pub(crate) fn span(&self) -> tracing::Span {
        let span = tracing::info_span!(
            "job",
            otel.name = format!("job {}", self.kind),
            job.id = self.id,
            job.kind = %self.kind,
            job.attempt = self.attempts,
        );
        service_kit::trace::follow(span, self.traceparent.as_deref())
    }

    pub(crate) fn as_handed(&self) -> Job {
        Job {
            id: self.id,
            kind: self.kind.clone(),
            payload: self.payload.clone(),
            attempt: self.attempts,
            max_attempts: self.max_attempts,
        }
    }
}

pub(crate) fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::days(365))
}

/// The delay before retry number `attempt` (1-based): `base * 2^(attempt-1)`, capped, then
/// "equal jitter": half fixed, half random (`unit` in [0, 1)), so retries of many jobs that
/// failed together spread out without ever retrying sooner than half the backoff.
pub fn backoff(attempt: i32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let exp = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(0)
        .min(30);
    let full = base.saturating_mul(1u32 << exp).min(cap);
    full / 2 + full.mul_f64(unit.clamp(0.0, 1.0) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(30));
        // (attempt, unit, expected)
        let cases = [
            (1, 0.0, 500),
            (1, 1.0, 1000),
            (2, 0.0, 1000),
            (3, 0.5, 3000),
            (5, 0.0, 8000),
            (6, 1.0, 30_000),
            (40, 0.0, 15_000),
            (0, 0.0, 500),
        ];
        for (attempt, unit, ms) in cases {
            assert_eq!(
                backoff(attempt, base, cap, unit),
                Duration::from_millis(ms),
                "attempt {attempt}, unit {unit}"
            );
        }
    }
}
