//! The pipelined loop ([`Engine::run`]): claim ahead, fire on time, settle in batches.
//!
//! - **Claiming ahead.** Each poll claims (under a lease) the jobs due within `lookahead`, not
//!   just the ones due now, and hands each to a task that sleeps until its due time in tokio's
//!   timer, which is a hierarchical timing wheel (six levels of 64 slots, 1 ms resolution): a
//!   job fires at its due time, not at the next poll.
//! - **Waking.** Between polls the loop waits on `LISTEN delayed_job`: a job inserted due
//!   within [`store::WAKE_HORIZON`] sends a `NOTIFY`, so it is claimed at once; later ones are
//!   caught by a regular poll before they are due. A freed slot also wakes the loop when it
//!   had stopped claiming for lack of room.
//! - **Workers.** Handlers run under a limit that doubles while due jobs wait for a worker and
//!   halves when the instance is idle ([`next_limit`]), between `concurrency_min` and
//!   `concurrency_max`, and under each kind's own limit if it has one.
//! - **Settling.** Finished jobs go to one settler task that writes them in batches (one
//!   statement for everything that finished meanwhile), each row checked against its lease
//!   token. Leases of held jobs are extended every third of the lease (heartbeat).
//! - **Shutdown.** Jobs waiting for their due time or a worker are given back at once (their
//!   attempt not counted); running ones get `drain_timeout` to finish and settle; any still
//!   running after that are given back too, so another instance takes them without waiting
//!   for the lease to expire. Then leadership is given up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::clock::Clock;
use crate::engine::{
    settle_finished, settlement, to_chrono, Engine, EngineConfig, Finished, Kind, Observer,
};
use crate::leader::Leadership;
use crate::store::{self, ClaimedJob};
use crate::Outcome;

/// The next worker limit: double while due jobs wait for a worker, halve when nothing runs,
/// else keep; always within `[min, max]`.
pub fn next_limit(current: usize, min: usize, max: usize, waiting: usize, busy: usize) -> usize {
    let next = if waiting > 0 {
        current.saturating_mul(2)
    } else if busy == 0 {
        current / 2
    } else {
        current
    };
    next.clamp(min, max)
}

/// Rows settled per statement, at most.
const SETTLE_BATCH: usize = 500;

/// Jobs this instance holds a lease on, from claim to settle, by (job id, lease token): an
/// instance whose lease on a job was rescued may claim the same job again while its stale run
/// is still going, and the two runs must not share an entry (the stale run's refused settle
/// would drop the new run's, which would then go without heartbeat or give-back). The value
/// says whether the handler started.
type HeldJobs = HashMap<(i64, Uuid), bool>;

/// What a job task tells the settler.
enum Report {
    Ran(Finished),
    /// Given back before its handler started (shutdown).
    Unstarted(i64, Uuid),
}

/// State shared by the loop, the job tasks and the settler.
struct Shared {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    observer: Option<Arc<Observer>>,
    held: Mutex<HeldJobs>,
    /// The worker limit: permits are workers.
    workers: Arc<Semaphore>,
    limit: AtomicUsize,
    /// Jobs due and waiting for a worker.
    waiting: AtomicUsize,
    /// Wakes the loop: `NOTIFY`, or room freed while it could not claim.
    wake: Notify,
    starved: AtomicBool,
}

impl Shared {
    fn held(&self) -> std::sync::MutexGuard<'_, HeldJobs> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn running(&self) -> usize {
        self.limit
            .load(Ordering::Relaxed)
            .saturating_sub(self.workers.available_permits())
    }

    /// Applies [`next_limit`] to the worker semaphore.
    fn adjust_workers(&self) {
        let current = self.limit.load(Ordering::Relaxed);
        let next = next_limit(
            current,
            self.config.concurrency_min,
            self.config.concurrency_max,
            self.waiting.load(Ordering::Relaxed),
            self.running(),
        );
        if next > current {
            self.workers.add_permits(next - current);
            self.limit.store(next, Ordering::Relaxed);
        } else if next < current {
            // only idle permits can go; the rest go at a later tick
            let gone = self.workers.forget_permits(current - next);
            self.limit.store(current - gone, Ordering::Relaxed);
        }
    }
}

/// Sends a report when dropped without one: a handler that panicked is retried like a failure.
struct ReportGuard {
    tx: mpsc::UnboundedSender<Report>,
    shared: Arc<Shared>,
    job: Option<ClaimedJob>,
    fire_delay: Duration,
}

impl ReportGuard {
    fn send(&mut self, outcome: Outcome) {
        if let Some(job) = self.job.take() {
            let how = settlement(&self.shared.config, self.shared.clock.now(), &job, outcome);
            let _ = self.tx.send(Report::Ran(Finished {
                job,
                how,
                fire_delay: self.fire_delay,
            }));
        }
    }

    fn give_back(&mut self) {
        if let Some(job) = self.job.take() {
            let _ = self.tx.send(Report::Unstarted(job.id, job.lease_token));
        }
    }
}

impl Drop for ReportGuard {
    fn drop(&mut self) {
        if self.job.is_some() {
            tracing::error!("job handler panicked; retrying the job");
            self.send(Outcome::Retry("handler panicked".into()));
        }
    }
}

impl Engine {
    /// Runs until `shutdown`, then drains (see the module docs). Rounds, leadership and
    /// maintenance as in [`Engine::run_once`] and [`Engine::maintain_once`].
    pub async fn run(&self, shutdown: CancellationToken) {
        let config = &self.config;
        let shared = Arc::new(Shared {
            pool: self.pool.clone(),
            clock: self.clock.clone(),
            config: config.clone(),
            observer: self.observer.clone(),
            held: Mutex::new(HashMap::new()),
            workers: Arc::new(Semaphore::new(config.concurrency_min)),
            limit: AtomicUsize::new(config.concurrency_min),
            waiting: AtomicUsize::new(0),
            wake: Notify::new(),
            starved: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let stop_waiting = CancellationToken::new();
        let stop_settler = CancellationToken::new();
        let settler = tokio::spawn(settle_loop(shared.clone(), rx, stop_settler.clone()));
        let listener = tokio::spawn(listen(shared.clone(), shutdown.clone()));
        // held at once: two full batches (one settling while the next is claimed) beyond what
        // the workers can run
        let max_held = 2 * config.batch_size.max(1) as usize + config.concurrency_max * 2;

        if let Err(e) = self.sync_clock().await {
            tracing::warn!(error = %e, "the database's clock not sampled yet; will retry");
        }
        let mut leadership: Leadership = self.leadership();
        // the lease is renewed (or, by a standby, tried) every third of it, whatever the
        // maintenance interval
        let leader_check = config.leader_lease / 3;
        let mut last_leader_check: Option<tokio::time::Instant> = None;
        let mut last_maintenance: Option<chrono::DateTime<chrono::Utc>> = None;
        let mut last_heartbeat = self.clock.now();
        // paused kinds, re-read at most every poll interval
        let mut kinds = self.kinds.clone();
        let mut kinds_read: Option<tokio::time::Instant> = None;
        while !shutdown.is_cancelled() {
            if kinds_read.is_none_or(|t| t.elapsed() >= config.poll_interval) {
                match store::paused_kinds(&self.pool).await {
                    Ok(paused) => {
                        kinds = self.claimable(&paused);
                        kinds_read = Some(tokio::time::Instant::now());
                    }
                    Err(e) => tracing::warn!(error = %e, "reading paused kinds failed; will retry"),
                }
            }
            if last_leader_check.is_none_or(|t| t.elapsed() >= leader_check) {
                last_leader_check = Some(tokio::time::Instant::now());
                let was = leadership.is_leader();
                if leadership.ensure().await && !was {
                    last_maintenance = None; // a new leader's maintenance runs at once
                }
            }
            let now = self.clock.now();
            if last_maintenance.is_none_or(|t| now - t >= to_chrono(config.maintenance_interval)) {
                last_maintenance = Some(now);
                if let Err(e) = self.maintain_once(&mut leadership).await {
                    tracing::warn!(error = %e, "maintenance failed; will retry");
                }
            }
            if now - last_heartbeat >= to_chrono(config.lease / 3) {
                last_heartbeat = now;
                heartbeat(&shared).await;
            }
            let room = max_held.saturating_sub(shared.held().len());
            let want = (config.batch_size as usize).min(room);
            // short of room for a full batch: the settler wakes the loop when it frees some
            // (set before claiming, so a settle that lands meanwhile is not missed)
            shared
                .starved
                .store(want < config.batch_size as usize, Ordering::Relaxed);
            let mut backlog = false;
            if want > 0 && !kinds.is_empty() {
                match store::claim(
                    &self.pool,
                    &config.owner,
                    &kinds,
                    want as i64,
                    self.clock.decide_at(),
                    config.lookahead,
                    config.lease,
                )
                .await
                {
                    Ok(jobs) => {
                        backlog = jobs.len() == want;
                        if backlog {
                            shared.starved.store(true, Ordering::Relaxed);
                        }
                        for job in jobs {
                            self.start(&shared, &tx, &stop_waiting, job);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "claiming jobs failed; will retry"),
                }
            }
            shared.adjust_workers();
            if backlog && shared.held().len() < max_held {
                continue; // more are due: claim again at once
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep(config.poll_interval) => {}
            }
        }

        // drain: give back what has not started, let running handlers finish for a while
        stop_waiting.cancel();
        let deadline = tokio::time::Instant::now() + config.drain_timeout;
        while tokio::time::Instant::now() < deadline && !shared.held().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop_settler.cancel();
        let _ = settler.await;
        let still: Vec<(i64, Uuid)> = shared.held().keys().copied().collect();
        if !still.is_empty() {
            match store::release(&self.pool, &still, true).await {
                Ok(n) => tracing::warn!(
                    released = n,
                    "handlers still running at the drain timeout; their jobs were given back"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "could not give jobs back; their leases will expire")
                }
            }
        }
        listener.abort();
        leadership.resign().await;
    }

    /// Hands a claimed job to its own task: wait until due, take a worker, run, report.
    fn start(
        &self,
        shared: &Arc<Shared>,
        tx: &mpsc::UnboundedSender<Report>,
        stop_waiting: &CancellationToken,
        job: ClaimedJob,
    ) {
        let Some(kind) = self.handlers.get(&job.kind).cloned() else {
            return; // claimed only registered kinds
        };
        shared.held().insert((job.id, job.lease_token), false);
        let guard = ReportGuard {
            tx: tx.clone(),
            shared: shared.clone(),
            job: Some(job),
            fire_delay: Duration::ZERO,
        };
        tokio::spawn(fire(shared.clone(), kind, guard, stop_waiting.clone()));
    }
}

async fn fire(shared: Arc<Shared>, kind: Kind, mut guard: ReportGuard, stop: CancellationToken) {
    let Some(job) = guard.job.as_ref() else {
        return;
    };
    let (key, run_at) = ((job.id, job.lease_token), job.run_at);
    let span = job.span();
    let handed = job.as_handed();
    // sleep until due, and ask the clock again on waking: a new sample of the database's
    // clock taken meanwhile may have set the reading back, and a job never fires before it
    // is due by the clock it is judged by
    while let Ok(wait) = (run_at - shared.clock.now()).to_std() {
        if wait.is_zero() {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => return guard.give_back(),
            _ = tokio::time::sleep(wait) => {}
        }
    }
    shared.waiting.fetch_add(1, Ordering::Relaxed);
    let permits = tokio::select! {
        _ = stop.cancelled() => None,
        p = take_workers(&shared.workers, kind.limit.as_ref()) => p,
    };
    shared.waiting.fetch_sub(1, Ordering::Relaxed);
    let Some(_permits) = permits else {
        return guard.give_back();
    };
    if let Some(started) = shared.held().get_mut(&key) {
        *started = true;
    }
    guard.fire_delay = (shared.clock.now() - run_at).to_std().unwrap_or_default();
    let outcome = (kind.handler)(handed).instrument(span).await;
    guard.send(outcome);
}

/// A worker permit and, if the kind has a limit, one of its permits (taken first, so a job
/// waiting for its kind does not hold a worker).
async fn take_workers(
    workers: &Arc<Semaphore>,
    kind: Option<&Arc<Semaphore>>,
) -> Option<(
    Option<tokio::sync::OwnedSemaphorePermit>,
    tokio::sync::OwnedSemaphorePermit,
)> {
    let kind_permit = match kind {
        Some(k) => Some(k.clone().acquire_owned().await.ok()?),
        None => None,
    };
    let worker = workers.clone().acquire_owned().await.ok()?;
    Some((kind_permit, worker))
}

/// Writes reports in batches until stopped, then flushes what is queued.
async fn settle_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Report>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            r = rx.recv() => r,
            _ = stop.cancelled() => None,
        };
        let Some(first) = first else {
            // stopped: settle whatever already arrived
            let mut rest = Vec::new();
            while let Ok(r) = rx.try_recv() {
                rest.push(r);
            }
            if !rest.is_empty() {
                settle_reports(&shared, rest).await;
            }
            return;
        };
        let mut batch = vec![first];
        while batch.len() < SETTLE_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        settle_reports(&shared, batch).await;
    }
}

/// Settles one batch, retrying while the database fails (the leases hold meanwhile; if they
/// run out, the jobs are rescued and run again, which handlers are written to survive).
async fn settle_reports(shared: &Shared, batch: Vec<Report>) {
    let mut ran = Vec::new();
    let mut unstarted = Vec::new();
    for r in batch {
        match r {
            Report::Ran(f) => ran.push(f),
            Report::Unstarted(id, token) => unstarted.push((id, token)),
        }
    }
    let mut wait = Duration::from_millis(50);
    for attempt in 1.. {
        let result = async {
            settle_finished(&shared.pool, &ran, shared.observer.as_deref()).await?;
            if !unstarted.is_empty() {
                store::release(&shared.pool, &unstarted, false).await?;
            }
            Ok::<_, sqlx::Error>(())
        }
        .await;
        match result {
            Ok(()) => break,
            Err(e) if attempt < 20 => {
                tracing::warn!(error = %e, jobs = ran.len() + unstarted.len(), "settling jobs failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(error = %e, "could not settle jobs; their leases will expire and they will run again");
                break;
            }
        }
    }
    {
        let mut held = shared.held();
        for f in &ran {
            held.remove(&(f.job.id, f.job.lease_token));
        }
        for key in &unstarted {
            held.remove(key);
        }
    }
    if shared.starved.load(Ordering::Relaxed) {
        shared.wake.notify_one();
    }
}

/// Extends the leases of every held job; a job whose lease was rescued meanwhile stays held
/// until its handler returns, and its settle is refused then.
async fn heartbeat(shared: &Shared) {
    let held: Vec<(i64, Uuid)> = shared.held().keys().copied().collect();
    if held.is_empty() {
        return;
    }
    let at = shared.clock.decide_at();
    match store::extend_leases(&shared.pool, &held, at, shared.config.lease).await {
        Ok(kept) if kept.len() < held.len() => {
            tracing::warn!(
                lost = held.len() - kept.len(),
                "leases lost before the heartbeat (rescued); those jobs' settles will be refused"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "lease heartbeat failed; will retry"),
    }
}

/// `LISTEN delayed_job` on a connection of its own, waking the loop on every notification;
/// reconnects after a failure (and wakes the loop then, in case one was missed).
async fn listen(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        match PgListener::connect_with(&shared.pool).await {
            Ok(mut listener) => match listener.listen(store::WAKE_CHANNEL).await {
                Ok(()) => {
                    shared.wake.notify_one();
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            n = listener.try_recv() => match n {
                                Ok(Some(_)) => shared.wake.notify_one(),
                                Ok(None) => {
                                    tracing::warn!("job wake-up listener lost its connection; reconnecting");
                                    shared.wake.notify_one();
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "job wake-up listener failed; reconnecting");
                                    break;
                                }
                            },
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "LISTEN failed; retrying"),
            },
            Err(e) => tracing::warn!(error = %e, "job wake-up listener cannot connect; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_limit_doubles_while_jobs_wait_and_halves_when_idle() {
        // (current, waiting, busy, expected) with min 4, max 64
        let cases = [
            (4, 1, 4, 8),
            (8, 10, 8, 16),
            (64, 5, 64, 64), // capped
            (16, 0, 3, 16),  // busy, nobody waiting: keep
            (16, 0, 0, 8),   // idle: halve
            (5, 0, 0, 4),    // never below min
            (4, 0, 0, 4),
        ];
        for (current, waiting, busy, expected) in cases {
            assert_eq!(
                next_limit(current, 4, 64, waiting, busy),
                expected,
                "current {current}, waiting {waiting}, busy {busy}"
            );
        }
    }
}
