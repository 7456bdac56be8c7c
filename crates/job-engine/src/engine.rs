//! The worker side: handlers registered by job kind, a claim-run-settle step ([`Engine::run_once`])
//! that tests drive directly, and the loop around it ([`Engine::run`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

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
    /// Not yet (e.g. a provider asked to come back later): retried after exactly this long.
    RetryAfter(Duration, String),
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

type HandlerFn = dyn Fn(Job) -> Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync;

/// What the engine reports about each job it settles, for metrics (the engine keeps no
/// registry of its own).
#[derive(Debug, Clone)]
pub struct Settled {
    pub kind: String,
    pub priority: i16,
    /// Claimed at minus due at: how late the job started (zero if claimed early).
    pub fire_delay: Duration,
    /// `completed`, `retried`, `dead` or `lease_lost`.
    pub outcome: &'static str,
}

type Observer = dyn Fn(&Settled) + Send + Sync;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Names this instance in lease rows (host, pid); for operators, not for correctness.
    pub owner: String,
    /// Jobs claimed per round trip.
    pub batch_size: i64,
    /// How long a claim holds a job before another instance may rescue it.
    pub lease: Duration,
    /// How long the loop waits when nothing was due.
    pub poll_interval: Duration,
    /// First retry delay; doubled per attempt, up to `backoff_cap`, with jitter.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How often the loop tries for leadership and, as leader, runs maintenance.
    pub maintenance_interval: Duration,
    /// Finished jobs older than this leave the hot table for the archive.
    pub archive_after: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            owner: format!("engine-{}", std::process::id()),
            batch_size: 100,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(200),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            maintenance_interval: Duration::from_secs(5),
            archive_after: Duration::from_secs(3600),
        }
    }
}

/// What one [`Engine::maintain_once`] did (all zero when this instance does not lead).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Maintenance {
    pub leader: bool,
    pub rescued: u64,
    pub archived: u64,
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

/// One instance of the job engine. Any number may run against one database.
pub struct Engine {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    handlers: HashMap<String, Arc<HandlerFn>>,
    kinds: Vec<String>,
    observer: Option<Arc<Observer>>,
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
        }
    }

    /// Calls `f` for every job this instance settles (metrics: fire delay, outcomes).
    pub fn on_settled(&mut self, f: impl Fn(&Settled) + Send + Sync + 'static) {
        self.observer = Some(Arc::new(f));
    }

    /// Runs `handler` for every job of `kind`. An instance claims only kinds it has handlers
    /// for, so two binaries with different kinds share one table without stepping on each
    /// other.
    pub fn register<F, Fut>(&mut self, kind: &str, handler: F)
    where
        F: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let f: Arc<HandlerFn> = Arc::new(move |job| Box::pin(handler(job)));
        if self.handlers.insert(kind.to_owned(), f).is_none() {
            self.kinds.push(kind.to_owned());
        }
    }

    /// Claims one batch of due jobs, runs them concurrently, and settles each under its lease.
    pub async fn run_once(&self) -> Result<RoundReport, EngineError> {
        let now = self.clock.now();
        let claimed = store::claim(
            &self.pool,
            &self.config.owner,
            &self.kinds,
            self.config.batch_size,
            now,
            self.config.lease,
        )
        .await?;
        let mut report = RoundReport {
            claimed: claimed.len(),
            ..Default::default()
        };
        let mut running = JoinSet::new();
        for job in claimed {
            let Some(handler) = self.handlers.get(&job.kind).cloned() else {
                continue; // claimed only registered kinds
            };
            running.spawn(async move {
                let outcome = handler(Job {
                    id: job.id,
                    kind: job.kind.clone(),
                    payload: job.payload.clone(),
                    attempt: job.attempts,
                    max_attempts: job.max_attempts,
                })
                .await;
                (job, outcome)
            });
        }
        while let Some(done) = running.join_next().await {
            let (job, outcome) = match done {
                Ok(v) => v,
                Err(e) => {
                    // a panicking handler: its lease runs out and the job is rescued
                    tracing::error!(error = %e, "job handler panicked");
                    continue;
                }
            };
            let how = self.settlement(&job, outcome);
            let held = store::settle(&self.pool, job.id, job.lease_token, &how).await?;
            let outcome = match (&how, held) {
                (_, false) => {
                    report.lease_lost += 1;
                    tracing::warn!(job_id = job.id, kind = %job.kind, "lease lost before the job settled; its new owner decides");
                    "lease_lost"
                }
                (Settle::Completed, true) => {
                    report.completed += 1;
                    "completed"
                }
                (Settle::Retry { .. }, true) => {
                    report.retried += 1;
                    "retried"
                }
                (Settle::Dead { error }, true) => {
                    report.dead += 1;
                    tracing::error!(job_id = job.id, kind = %job.kind, attempts = job.attempts, error = %error, "job is dead");
                    "dead"
                }
            };
            if let Some(observe) = &self.observer {
                observe(&Settled {
                    fire_delay: (now - job.run_at).to_std().unwrap_or_default(),
                    kind: job.kind,
                    priority: job.priority,
                    outcome,
                });
            }
        }
        Ok(report)
    }

    fn settlement(&self, job: &ClaimedJob, outcome: Outcome) -> Settle {
        let now = self.clock.now();
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
                        self.config.backoff_base,
                        self.config.backoff_cap,
                        fastrand::f64(),
                    )),
                error,
            },
            Outcome::RetryAfter(after, error) => Settle::Retry {
                at: now + to_chrono(after),
                error,
            },
        }
    }

    /// Puts jobs whose lease expired back to `scheduled` (their owner died or hung).
    pub async fn rescue_once(&self) -> Result<u64, EngineError> {
        let n = store::rescue_expired(&self.pool, self.clock.now()).await?;
        if n > 0 {
            tracing::warn!(rescued = n, "rescued jobs whose lease expired");
        }
        Ok(n)
    }

    /// Maintenance, on the leader only: rescues expired leases and moves finished jobs older
    /// than `archive_after` to the archive (in bounded batches).
    pub async fn maintain_once(
        &self,
        leadership: &mut Leadership,
    ) -> Result<Maintenance, EngineError> {
        if !leadership.ensure().await {
            return Ok(Maintenance::default());
        }
        let mut m = Maintenance {
            leader: true,
            rescued: self.rescue_once().await?,
            archived: 0,
        };
        let before = self.clock.now() - to_chrono(self.config.archive_after);
        for _ in 0..ARCHIVE_BATCHES {
            let moved = store::archive_finished(&self.pool, before, ARCHIVE_BATCH).await?;
            m.archived += moved;
            if moved < ARCHIVE_BATCH as u64 {
                break;
            }
        }
        Ok(m)
    }

    /// Runs rounds until `shutdown`: back to back while there is work, then every
    /// `poll_interval`; every `maintenance_interval` it tries for leadership and, as leader,
    /// runs maintenance. A round in progress finishes (its jobs settle) before the loop
    /// returns, and leadership is given up.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut leadership = Leadership::new(self.pool.clone());
        let mut last_maintenance: Option<chrono::DateTime<chrono::Utc>> = None;
        while !shutdown.is_cancelled() {
            let now = self.clock.now();
            if last_maintenance
                .is_none_or(|t| now - t >= to_chrono(self.config.maintenance_interval))
            {
                last_maintenance = Some(now);
                if let Err(e) = self.maintain_once(&mut leadership).await {
                    tracing::warn!(error = %e, "maintenance failed; will retry");
                }
            }
            let idle = match self.run_once().await {
                Ok(r) => r.claimed == 0,
                Err(e) => {
                    tracing::warn!(error = %e, "job round failed; will retry");
                    true
                }
            };
            if idle {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(self.config.poll_interval) => {}
                }
            }
        }
        leadership.resign().await;
    }
}

fn to_chrono(d: Duration) -> chrono::Duration {
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
