//! compensation-worker: no paid order is lost when its payment callback is.
//!
//! Every started payment has a `payment.check` job (written with the payment, due shortly
//! after); a sweep gives one to any open payment that has none. This binary runs those jobs
//! on the job engine (the scheduler does not: each binary claims only its own kinds); what
//! one check does is in [`check`]. In short: paid at the provider -> applied through the
//! same `apply_payment` the webhook uses, under the Redis lock `compensate:order:{id}`; not
//! paid -> checked again every `PAYMENT_CHECK_INTERVAL_MS` (faster while the SLA trigger,
//! `domain::sla`, says so); provider failures -> backoff, then archived in
//! `compensation_failure` with a `CompensationFailed` event and a rate-limited alert
//! ([`alert`]), for manual replay through the ops API and the console at `/ops/` ([`ops`]).
//!
//! It also runs `payment.refund` (written when money arrived that an order cannot keep): the
//! provider's refund API is called with a refund id derived from the payment (`rf-<payment
//! id>`), so a retry after a timeout or a crash asks for the same refund and the provider
//! pays it once; then the payment is `REFUNDED` and a waiting order `REFUNDED` with
//! `OrderRefunded`. Counted in `refunds_total{outcome}`.

pub mod alert;
pub mod check;
pub mod ops;
pub mod records;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use domain::sla::SlaTrigger;
use fulfillment::events;
use fulfillment::{Fulfillment, FulfillmentConfig};
use gateway_protocol::GatewayClient;
use job_engine::{Coverage, DbClock, Engine, EngineConfig, Job, RunAt};
use postgres_store::{PgLimits, PgStore};
use prelock_api::PrelockClient;
use prometheus::{Gauge, IntGaugeVec};
use redis::aio::ConnectionManager;
use service_kit::auth::AuthConfig;
use service_kit::config::{env_millis, env_or, env_string};
use service_kit::telemetry::Metrics;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::alert::Alert;
use crate::check::{Checker, RetryPolicy};

/// How long the worker waits at start for the Redis of its compensation lock before it gives up.
const REDIS_STARTUP_PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub pg: PgLimits,
    pub run_migrations: bool,
    pub prelock_url: String,
    pub prelock_timeout: Duration,
    pub gateway_url: String,
    /// Bound on one provider query: past it the attempt counts as a gateway timeout.
    pub gateway_timeout: Duration,
    /// Hedged queries: another copy after this long without an answer (0: never), at most
    /// `query_hedges` extra copies.
    pub query_hedge_after: Duration,
    pub query_hedges: u32,
    pub redis_url: String,
    /// How long the compensation lock is held at most (a crashed holder frees it then).
    pub lock_ttl: Duration,
    /// Bound on each call to Redis for the compensation lock (connect and answer).
    pub redis_timeout: Duration,
    /// Between checks of a payment that is not paid yet (paper: 30 s).
    pub check_interval: Duration,
    /// The same while the SLA trigger says fast.
    pub fast_interval: Duration,
    /// Provider failures: attempts in a row before archiving, and the backoff between them.
    pub retry: RetryPolicy,
    /// How often the sweep looks for open payments without a check job, and how old such a
    /// payment must be (a payment's own check job is written with it: the grace only keeps
    /// the sweep off payments whose transaction is still committing).
    pub sweep_interval: Duration,
    pub sweep_grace: Duration,
    /// The SLA trigger: window, callback p99 threshold, missing events of one transaction.
    pub sla_window: Duration,
    pub sla_latency_p99: Duration,
    pub sla_missing_events: u32,
    /// Chat-bot webhook for failure alerts (unset: alerts are only logged), and the least
    /// time between two alerts (what comes in between is sent as one summary).
    pub alert_webhook: Option<String>,
    pub alert_interval: Duration,
    pub engine: EngineConfig,
}

impl Config {
    pub fn from_env() -> anyhow::Result<Self> {
        let check_interval = env_millis("PAYMENT_CHECK_INTERVAL_MS", 30_000)?;
        let config = Config {
            database_url: env_string(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/bar_fulfillment",
            ),
            pg: PgLimits::from_env(16, env_or)?,
            run_migrations: env_or("RUN_MIGRATIONS", true)?,
            prelock_url: env_string("PRELOCK_URL", "http://127.0.0.1:8081"),
            prelock_timeout: env_millis("PRELOCK_TIMEOUT_MS", 1000)?,
            gateway_url: env_string("GATEWAY_URL", "http://127.0.0.1:8090"),
            gateway_timeout: env_millis("GATEWAY_TIMEOUT_MS", 2000)?,
            query_hedge_after: env_millis("PAYMENT_QUERY_HEDGE_MS", 250)?,
            query_hedges: env_or("PAYMENT_QUERY_HEDGES", 3)?,
            redis_url: env_string("REDIS_URL", "redis://127.0.0.1:6379/0"),
            lock_ttl: env_millis("COMPENSATION_LOCK_TTL_MS", 10_000)?,
            redis_timeout: env_millis("REDIS_TIMEOUT_MS", 500)?,
            check_interval,
            // 5 s, or the normal interval when that is shorter
            fast_interval: env_millis(
                "PAYMENT_CHECK_FAST_INTERVAL_MS",
                check_interval.min(Duration::from_secs(5)).as_millis() as u64,
            )?,
            retry: RetryPolicy {
                max_attempts: env_or("COMPENSATION_MAX_ATTEMPTS", 5)?,
                base: env_millis("COMPENSATION_BACKOFF_BASE_MS", 1_000)?,
                factor: env_or("COMPENSATION_BACKOFF_FACTOR", 3.0)?,
                cap: env_millis("COMPENSATION_BACKOFF_CAP_MS", 30_000)?,
            },
            sweep_interval: env_millis("COMPENSATION_SWEEP_MS", 30_000)?,
            sweep_grace: env_millis("COMPENSATION_SWEEP_GRACE_MS", 60_000)?,
            sla_window: env_millis("SLA_WINDOW_MS", 30_000)?,
            sla_latency_p99: env_millis("SLA_CALLBACK_P99_MS", 200)?,
            sla_missing_events: env_or("SLA_MISSING_EVENTS", 4)?,
            alert_webhook: std::env::var("ALERT_WEBHOOK_URL")
                .ok()
                .filter(|s| !s.is_empty()),
            alert_interval: env_millis("ALERT_MIN_INTERVAL_MS", 60_000)?,
            // a short lease (kept alive by the heartbeat) and a rescue every second: the
            // checks of a worker that died are taken over within seconds, not half a minute
            engine: EngineConfig::from_env(
                "compensation-worker",
                EngineConfig {
                    lease: Duration::from_secs(6),
                    maintenance_interval: Duration::from_secs(1),
                    // a refund (or a check) that failed for a reason of ours (the database,
                    // prelock-service) is retried within 30 s, not minutes
                    backoff_base: Duration::from_secs(1),
                    backoff_cap: Duration::from_secs(30),
                    ..EngineConfig::default()
                },
            )
            .map_err(anyhow::Error::msg)?,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let r = &self.retry;
        if !(1..=100).contains(&r.max_attempts) {
            anyhow::bail!("COMPENSATION_MAX_ATTEMPTS must be 1 to 100");
        }
        if !(1.0..=10.0).contains(&r.factor) {
            anyhow::bail!("COMPENSATION_BACKOFF_FACTOR must be 1 to 10");
        }
        if r.base.is_zero() || r.cap < r.base {
            anyhow::bail!("COMPENSATION_BACKOFF_BASE_MS must be above 0 and at most COMPENSATION_BACKOFF_CAP_MS");
        }
        for (name, d) in [
            ("PAYMENT_CHECK_INTERVAL_MS", self.check_interval),
            ("PAYMENT_CHECK_FAST_INTERVAL_MS", self.fast_interval),
            ("COMPENSATION_SWEEP_MS", self.sweep_interval),
            ("SLA_WINDOW_MS", self.sla_window),
            ("COMPENSATION_LOCK_TTL_MS", self.lock_ttl),
        ] {
            if d.is_zero() {
                anyhow::bail!("{name} must be above 0");
            }
        }
        if self.query_hedges > 10 {
            anyhow::bail!("PAYMENT_QUERY_HEDGES must be 0 to 10");
        }
        if self.fast_interval > self.check_interval {
            anyhow::bail!(
                "PAYMENT_CHECK_FAST_INTERVAL_MS must not exceed PAYMENT_CHECK_INTERVAL_MS"
            );
        }
        Ok(())
    }
}

pub struct App {
    pub config: Config,
    pub auth: AuthConfig,
    pub store: PgStore,
    pub engine: Engine,
    pub metrics: Metrics,
    pub checker: Arc<Checker>,
    alerts: Mutex<Option<mpsc::UnboundedReceiver<Alert>>>,
    alerts_sent: prometheus::IntCounterVec,
}

impl App {
    pub async fn build(config: Config, auth: AuthConfig) -> anyhow::Result<Arc<App>> {
        let store = PgStore::connect_patiently(&config.database_url, &config.pg).await?;
        if config.run_migrations {
            store.migrate().await?;
        }
        let prelock = PrelockClient::new(
            &config.prelock_url,
            &auth.service_token,
            config.prelock_timeout,
        )?;
        // connect and answer bounded; each lock call is bounded as a whole too (Check::lock),
        // reconnects included: the lock only saves work, so a Redis that does not answer
        // (killed, restarted, partitioned) must cost a check little, never hold it (the
        // scenario saw a worker's checks wait two minutes after a Redis restart without it)
        let redis_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(config.redis_timeout)
            .set_response_timeout(config.redis_timeout)
            .set_number_of_retries(1);
        let redis_client = redis::Client::open(config.redis_url.as_str())?;
        let started = std::time::Instant::now();
        let redis = loop {
            match ConnectionManager::new_with_config(redis_client.clone(), redis_config.clone())
                .await
            {
                Err(e) if started.elapsed() < REDIS_STARTUP_PATIENCE => {
                    tracing::warn!(error = %e, "redis (the compensation lock) not answering yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => break other,
            }
        }
        .map_err(|e| {
            let at = service_kit::config::redact_url(&config.redis_url);
            anyhow::anyhow!("redis at {at}: {e}")
        })?;
        let metrics = Metrics::new("compensation-worker");
        store.export_outbox_lag(&metrics);
        let (alerts_tx, alerts_rx) = mpsc::unbounded_channel();
        let checker = Arc::new(Checker {
            store: store.clone(),
            hedge_after: config.query_hedge_after,
            hedges: config.query_hedges,
            hedged: metrics.counter(
                "compensation_query_hedges_total",
                "Extra copies of provider queries sent because the first had not answered in time",
                &[],
            ),
            fulfillment: Fulfillment::new(store.clone(), prelock, FulfillmentConfig::default()),
            gateway: GatewayClient::new(&config.gateway_url, config.gateway_timeout)?,
            redis,
            lock_ttl: config.lock_ttl,
            redis_timeout: config.redis_timeout,
            check_interval: config.check_interval,
            fast_interval: config.fast_interval,
            retry: config.retry.clone(),
            attempts: metrics.counter(
                "compensation_attempts_total",
                "Payment checks by outcome: paid, duplicate, refund_required, not_paid, order_closed, closed_at_provider, locked, gateway_timeout, gateway_error, unknown_at_provider, bad_answer, archived, failed",
                &["outcome"],
            ),
            refunds: metrics.counter(
                "refunds_total",
                "Refund jobs by outcome: refunded, already_refunded, gateway_error, rejected, failed",
                &["outcome"],
            ),
            failures: metrics.counter(
                "compensation_failures_total",
                "Payments archived as compensation failures, by reason",
                &["reason"],
            ),
            paid_latency: metrics.histogram_with(
                "payment_paid_latency_seconds",
                "From the provider's paid time to the order paid here, by source (compensation, replay)",
                &["source"],
                service_kit::telemetry::SLA_BUCKETS,
            ),
            alerts: alerts_tx,
            sla: Mutex::new(SlaTrigger::new(
                config.sla_window.as_millis() as i64,
                config.sla_latency_p99.as_millis() as i64,
                config.sla_missing_events,
            )),
            epoch: std::time::Instant::now(),
            fast: AtomicBool::new(false),
        });
        // on /metrics from the start (its buckets at 0), as its alert reads it
        checker.paid_latency.with_label_values(&["compensation"]);
        let alerts_sent = metrics.counter(
            "compensation_alerts_total",
            "Failure alerts (one per message, a summary counts once) by result: sent, failed, logged",
            &["result"],
        );
        let mut engine = Engine::new(
            store.pool.clone(),
            Arc::new(DbClock::new()),
            config.engine.clone(),
        );
        {
            let checker = checker.clone();
            engine.register(events::JOB_PAYMENT_CHECK, move |job: Job| {
                let checker = checker.clone();
                async move { checker.check(&job).await }
            });
        }
        {
            let checker = checker.clone();
            engine.register(events::JOB_PAYMENT_REFUND, move |job: Job| {
                let checker = checker.clone();
                async move { checker.refund(&job).await }
            });
        }
        // a dead refund or check pages (JobsDead), and their fire delay is charted
        engine.export_job_metrics(&metrics);
        Ok(Arc::new(App {
            config,
            auth,
            store,
            engine,
            metrics,
            checker,
            alerts: Mutex::new(Some(alerts_rx)),
            alerts_sent,
        }))
    }

    /// The ops API and console, `/openapi.json`, `/healthz`, `/readyz` (Postgres answers),
    /// `/metrics`.
    pub fn router(self: &Arc<App>) -> Router {
        let ready = service_kit::http::ready_check(self.store.ready_probe());
        service_kit::http::finish(ops::router(self.clone()), self.metrics.clone(), ready)
    }

    /// The job engine, the sweep, the SLA monitor and the alerter, until `stop` (then the
    /// engine drains, and held alerts go out).
    pub async fn run(self: Arc<App>, stop: CancellationToken) {
        let rx = self
            .alerts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("App::run is called once");
        let alerter = tokio::spawn(alert::run(
            rx,
            self.config.alert_webhook.clone(),
            self.config.alert_interval,
            self.alerts_sent.clone(),
            stop.clone(),
        ));
        let background = tokio::spawn(self.clone().background(stop.clone()));
        self.engine.run(stop).await;
        let _ = tokio::join!(alerter, background);
    }

    /// Every second: the SLA trigger's input and the gauges; every sweep interval: the sweep.
    async fn background(self: Arc<App>, stop: CancellationToken) {
        let gauges = Gauges::new(&self.metrics);
        // callbacks are stamped by the database: their window starts at its now, not ours
        let mut since = loop {
            match postgres_store::database_now(&self.store.pool).await {
                Ok(now) => break now,
                Err(e) => {
                    tracing::warn!(error = %e, "the database's clock not read; will retry");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let mut last_sweep = std::time::Instant::now();
        let mut last_figures: Option<std::time::Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match records::callback_latencies(&self.store.pool, since).await {
                Ok(seen) => {
                    let now = self.checker.epoch.elapsed().as_millis() as i64;
                    let mut sla = self.checker.sla.lock().unwrap_or_else(|p| p.into_inner());
                    for (at, latency) in &seen {
                        sla.observe_latency(now, *latency);
                        since = since.max(*at);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "callback latencies not read"),
            }
            let fast = self.checker.poll_mode() == domain::sla::PollMode::Fast;
            if fast && gauges.fast.get() == 0 {
                // fast from now: checks already waiting out the normal interval come forward
                match records::pull_checks_forward(
                    &self.store.pool,
                    events::JOB_PAYMENT_CHECK,
                    self.config.fast_interval,
                )
                .await
                {
                    Ok(n) => tracing::warn!(
                        checks_brought_forward = n,
                        "callbacks slow and events missing: compensation polls fast"
                    ),
                    Err(e) => tracing::warn!(error = %e, "checks not brought forward"),
                }
            } else if !fast && gauges.fast.get() == 1 {
                tracing::info!("compensation polls at the normal interval again");
            }
            gauges.fast.set(fast as i64);
            if last_figures.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                last_figures = Some(std::time::Instant::now());
                match records::sla_figures(&self.store.pool, Duration::from_secs(3600)).await {
                    Ok(f) => {
                        gauges.success_rate.set(f.success_rate);
                        gauges
                            .open_failures
                            .with_label_values::<&str>(&[])
                            .set(f.open_failures);
                    }
                    Err(e) => tracing::warn!(error = %e, "SLA figures not read"),
                }
            }
            if last_sweep.elapsed() >= self.config.sweep_interval {
                last_sweep = std::time::Instant::now();
                match self.sweep().await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::warn!(
                            payments = n,
                            "payments whose check or refund job was missing or dead: given one again"
                        );
                        gauges.swept.with_label_values::<&str>(&[]).inc_by(n as u64);
                    }
                    Err(e) => tracing::warn!(error = %e, "sweep failed; next round retries"),
                }
            }
        }
    }

    /// Gives every open payment whose check is missing, dead, or finished while its order can
    /// no longer take money a check again, and every payment whose money is owed and whose
    /// refund job is missing or dead a refund again (see [`records::sweep`]): nothing the
    /// worker owes a payment waits on a job that will never run. Returns how many jobs it
    /// wrote or revived.
    pub async fn sweep(&self) -> Result<usize, sqlx::Error> {
        let (grace, batch) = (self.config.sweep_grace, 200);
        let mut tx = self.store.begin().await?;
        let checks = records::sweep(
            &mut *tx,
            records::SweepStatus::Open,
            &events::payment_check_key_prefix(),
            grace,
            batch,
        )
        .await?;
        let keys: Vec<String> = checks
            .iter()
            .map(|id| events::payment_check_key(*id))
            .collect();
        let covered = job_engine::store::coverage(&mut tx, &keys).await?;
        let mut swept = 0;
        for ((id, key), coverage) in checks.iter().zip(&keys).zip(covered) {
            let job = || events::payment_check_job(*id, RunAt::In(Duration::ZERO));
            swept += revive(&mut tx, coverage, key, job).await?;
        }
        let owed = records::sweep(
            &mut *tx,
            records::SweepStatus::Owed,
            &events::refund_job_key_prefix(),
            grace,
            batch,
        )
        .await?;
        let keys: Vec<String> = owed.iter().map(|id| events::refund_job_key(*id)).collect();
        let covered = job_engine::store::coverage(&mut tx, &keys).await?;
        for ((id, key), coverage) in owed.iter().zip(&keys).zip(covered) {
            let Some(payment) = postgres_store::payments::get_payment(&mut *tx, *id).await? else {
                continue;
            };
            let Some(order) =
                postgres_store::orders::find_order(&mut *tx, payment.order_id).await?
            else {
                continue;
            };
            let job = || {
                events::refund_job(
                    *id,
                    &order,
                    payment.amount_cents,
                    "owed, and its refund job was gone",
                )
            };
            swept += revive(&mut tx, coverage, key, job).await?;
        }
        tx.commit().await?;
        Ok(swept)
    }
}

/// Gives a payment's job back to it: a dead one redriven (a fresh budget), a finished one
/// brought back, a missing one written.
async fn revive(
    tx: &mut postgres_store::Tx,
    coverage: Coverage,
    key: &str,
    job: impl FnOnce() -> job_engine::NewJob,
) -> Result<usize, sqlx::Error> {
    Ok(match coverage {
        Coverage::Dead(id) => job_engine::store::redrive(&mut **tx, id, None).await? as usize,
        Coverage::Ended(_) => {
            job_engine::store::bring_forward(tx, &[key.to_owned()]).await? as usize
        }
        Coverage::Missing => {
            job_engine::store::insert(tx, &job()).await?;
            1
        }
        Coverage::Live(_) => 0,
    })
}

struct Gauges {
    fast: prometheus::IntGauge,
    success_rate: Gauge,
    open_failures: IntGaugeVec,
    swept: prometheus::IntCounterVec,
}

impl Gauges {
    fn new(metrics: &Metrics) -> Gauges {
        let success_rate = Gauge::new(
            "compensation_success_rate",
            "Over the last hour: payments compensation brought to a result / (those + failures archived); 1 when there were none",
        )
        .expect("valid metric");
        metrics.register(Box::new(success_rate.clone()));
        let fast = prometheus::IntGauge::new(
            "compensation_fast_mode",
            "1 while the SLA trigger has compensation poll faster (slow callbacks and missing events)",
        )
        .expect("valid metric");
        metrics.register(Box::new(fast.clone()));
        Gauges {
            fast,
            success_rate,
            open_failures: metrics.gauge(
                "compensation_open_failures",
                "Archived compensation failures not yet resolved",
                &[],
            ),
            swept: metrics.counter(
                "compensation_swept_total",
                "Payments the sweep found without a live check or refund job (and gave one again)",
                &[],
            ),
        }
    }
}

/// Used by the ops console: the fast-mode flag the last decision left.
pub fn fast_mode(checker: &Checker) -> bool {
    checker.fast.load(Ordering::Relaxed)
}
