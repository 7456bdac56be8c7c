//! scheduler: runs the order flow's delayed jobs on the job engine.
//!
//! Layout:
//! - this file: configuration, the app (engine + handlers + ops routes), start-up.
//! - [`notify`]: the `order.notify` webhook.
//! - [`ops`]: the ops API (jobs, redrive, pause and resume, schedules) and `/openapi.json`.
//!
//! Kinds it runs: `order.expire`, `stock.deduct`, `voucher.issue` (the `fulfillment` use
//! cases) and `order.notify`. `payment.refund` belongs to the compensation worker (it needs the
//! providers' refund API) and is left scheduled for it. Any number of schedulers may run: the
//! engine's leases keep each job to one of them. The handlers hold no business rule: they map
//! a use case's answer to a job outcome.

pub mod notify;
pub mod ops;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use domain::OrderId;
use fulfillment::events;
use fulfillment::follow_up::FollowUp;
use fulfillment::{Fulfillment, FulfillmentConfig, FulfillmentError};
use job_engine::{DbClock, Engine, EngineConfig, Job, Outcome};
use postgres_store::{PgLimits, PgStore};
use prelock_api::PrelockClient;
use service_kit::config::{env_millis, env_or, env_string};
use service_kit::telemetry::Metrics;

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub pg: PgLimits,
    pub run_migrations: bool,
    pub prelock_url: String,
    /// Bound on one call to prelock-service; a background job can wait longer than a buyer.
    pub prelock_timeout: Duration,
    pub engine: EngineConfig,
    /// Where `order.notify` posts; `None` switches notifications off (the jobs complete).
    pub notify_url: Option<String>,
    pub notify_timeout: Duration,
    /// The nightly reconciliation's schedule, written at first start only (then edited through
    /// the ops API).
    pub reconcile_recurrence: String,
    pub reconcile_time_zone: String,
    pub reconcile_timeout: Duration,
    /// How long published outbox events are kept (Kafka has them); the daily prune deletes
    /// older ones.
    pub outbox_retention: Duration,
}

impl Config {
    pub fn from_env() -> anyhow::Result<Self> {
        let notify_url = env_string("NOTIFY_WEBHOOK_URL", "");
        Ok(Config {
            database_url: env_string(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/bar_fulfillment",
            ),
            pg: PgLimits::from_env(16, env_or)?,
            run_migrations: env_or("RUN_MIGRATIONS", true)?,
            prelock_url: env_string("PRELOCK_URL", "http://127.0.0.1:8081"),
            prelock_timeout: env_millis("PRELOCK_TIMEOUT_MS", 1000)?,
            engine: EngineConfig::from_env("scheduler", EngineConfig::default())
                .map_err(anyhow::Error::msg)?,
            notify_url: (!notify_url.trim().is_empty()).then_some(notify_url),
            notify_timeout: env_millis("NOTIFY_TIMEOUT_MS", 2000)?,
            reconcile_recurrence: env_string("RECONCILE_SCHEDULE", "daily at 03:00"),
            reconcile_time_zone: env_string("RECONCILE_TIME_ZONE", "Asia/Shanghai"),
            reconcile_timeout: env_millis("RECONCILE_TIMEOUT_MS", 600_000)?,
            outbox_retention: Duration::from_secs(
                env_or::<u64>("OUTBOX_RETENTION_HOURS", 168)? * 3600,
            ),
        })
    }
}

pub struct App {
    pub config: Config,
    pub auth: service_kit::auth::AuthConfig,
    pub store: PgStore,
    pub engine: Engine,
    pub metrics: Metrics,
}

impl App {
    /// Connects (retrying, and saying so, while Postgres does not answer), then registers the
    /// handlers. `notify_secret` is required when `config.notify_url` is set.
    pub async fn build(
        config: Config,
        auth: service_kit::auth::AuthConfig,
        notify_secret: Option<String>,
    ) -> anyhow::Result<Arc<App>> {
        let ops_token = auth.service_token.as_str();
        let store = PgStore::connect_patiently(&config.database_url, &config.pg).await?;
        if config.run_migrations {
            store.migrate().await?;
        }
        let prelock = PrelockClient::new(&config.prelock_url, ops_token, config.prelock_timeout)?;
        let fulfillment = Arc::new(Fulfillment::new(
            store.clone(),
            prelock.clone(),
            FulfillmentConfig::default(),
        ));
        let mut engine = Engine::new(
            store.pool.clone(),
            Arc::new(DbClock::new()),
            config.engine.clone(),
        );
        register_follow_ups(&mut engine, fulfillment);
        let notifier = match (&config.notify_url, notify_secret) {
            (Some(url), Some(secret)) => Some(Arc::new(notify::Notifier::new(
                url,
                secret,
                config.notify_timeout,
            )?)),
            (Some(_), None) => anyhow::bail!("NOTIFY_WEBHOOK_URL is set without a secret"),
            (None, _) => {
                tracing::info!("NOTIFY_WEBHOOK_URL unset: order notifications are off");
                None
            }
        };
        engine.register(events::JOB_ORDER_NOTIFY, move |job| {
            let notifier = notifier.clone();
            async move {
                match notifier {
                    Some(n) => n.send(&job).await,
                    None => Outcome::Done,
                }
            }
        });
        let reconcile_timeout = config.reconcile_timeout;
        engine.register_limited(events::JOB_STOCK_RECONCILE, 1, move |_job| {
            let prelock = prelock.clone();
            async move {
                match prelock.reconcile(reconcile_timeout).await {
                    Ok(r) if r.failed.is_empty() => {
                        tracing::info!(skus = r.skus, drifted = ?r.drifted, "reconciliation done");
                        Outcome::Done
                    }
                    Ok(r) => {
                        Outcome::Retry(format!("{} SKUs failed: {:?}", r.failed.len(), r.failed))
                    }
                    Err(e) => Outcome::Retry(e.to_string()),
                }
            }
        });
        {
            let pool = store.pool.clone();
            engine.register_limited(events::JOB_PRUNE_LOST_ANSWERS, 1, move |_job| {
                let pool = pool.clone();
                async move {
                    // cutoffs on the database's clock, which stamped the rows
                    let now = match postgres_store::database_now(&pool).await {
                        Ok(now) => now,
                        Err(e) => return Outcome::Retry(e.to_string()),
                    };
                    let before = now - chrono::Duration::days(1);
                    match postgres_store::orders::prune_lost_answers(&pool, before).await {
                        Ok(n) => {
                            tracing::info!(pruned = n, "stale lost pre-lock answers forgotten");
                            Outcome::Done
                        }
                        Err(e) => Outcome::Retry(e.to_string()),
                    }
                }
            });
        }
        {
            let (pool, keep) = (store.pool.clone(), config.outbox_retention);
            engine.register_limited(events::JOB_OUTBOX_PRUNE, 1, move |_job| {
                let pool = pool.clone();
                async move {
                    let now = match postgres_store::database_now(&pool).await {
                        Ok(now) => now,
                        Err(e) => return Outcome::Retry(e.to_string()),
                    };
                    let before =
                        now - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
                    match postgres_store::effects::prune_published(&pool, before).await {
                        Ok(n) => {
                            tracing::info!(
                                pruned = n,
                                "published outbox events past retention deleted"
                            );
                            Outcome::Done
                        }
                        Err(e) => Outcome::Retry(e.to_string()),
                    }
                }
            });
        }
        seed_schedules(&store, &config).await?;
        let metrics = Metrics::new("scheduler");
        store.export_outbox_lag(&metrics);
        engine.export_job_metrics(&metrics);
        let depth = metrics.gauge(
            "job_queue_depth",
            "Jobs due and not yet claimed, by priority (set by the leader)",
            &["priority"],
        );
        let rescues = metrics.counter(
            "job_lease_rescues_total",
            "Jobs put back to scheduled because their lease expired (their owner died or hung)",
            &[],
        );
        let leader_changes = metrics.counter(
            "job_leader_changes_total",
            "Times this instance became the job leader",
            &[],
        );
        let aged = metrics.counter(
            "job_priority_aged_total",
            "Jobs moved up a priority level because they waited too long",
            &[],
        );
        engine.on_maintenance(move |m| {
            // the leader counts the queue; every instance rescues
            if m.leader {
                for (p, n) in m.depth.iter().enumerate() {
                    depth.with_label_values(&[&format!("P{p}")]).set(*n);
                }
            }
            rescues.with_label_values::<&str>(&[]).inc_by(m.rescued);
            aged.with_label_values::<&str>(&[]).inc_by(m.aged);
            if m.became_leader {
                leader_changes.with_label_values::<&str>(&[]).inc();
            }
        });
        Ok(Arc::new(App {
            config,
            auth,
            store,
            engine,
            metrics,
        }))
    }

    /// The ops API and `/openapi.json`, `/healthz`, `/readyz` (Postgres answers), `/metrics`.
    pub fn router(self: &Arc<App>) -> Router {
        let ready = service_kit::http::ready_check(self.store.ready_probe());
        let ops = ops::router(job_engine::ops::OpsState {
            pool: self.store.pool.clone(),
            auth: self.auth.clone(),
        });
        service_kit::http::finish(ops, self.metrics.clone(), ready)
    }
}

/// Name of the nightly reconciliation's schedule.
pub const RECONCILE_SCHEDULE: &str = "stock-reconcile-nightly";
/// Name of the daily clean-up of lost pre-lock answers older than a day.
pub const PRUNE_SCHEDULE: &str = "orders-prune-lost-answers";
/// Deletes published outbox events past `OUTBOX_RETENTION_HOURS`.
pub const OUTBOX_PRUNE_SCHEDULE: &str = "outbox-prune";

/// Writes the schedules the scheduler ships unless they exist (an operator's edits win).
async fn seed_schedules(store: &PgStore, config: &Config) -> anyhow::Result<()> {
    use job_engine::schedule::ScheduleDef as Def;
    let defaults = [
        (
            RECONCILE_SCHEDULE,
            Def::new(
                events::JOB_STOCK_RECONCILE,
                &config.reconcile_recurrence,
                &config.reconcile_time_zone,
            ),
            "RECONCILE_SCHEDULE / RECONCILE_TIME_ZONE",
        ),
        (
            PRUNE_SCHEDULE,
            Def::new(events::JOB_PRUNE_LOST_ANSWERS, "daily at 04:30", "UTC"),
            "the prune schedule",
        ),
        (
            OUTBOX_PRUNE_SCHEDULE,
            Def::new(events::JOB_OUTBOX_PRUNE, "daily at 05:00", "UTC"),
            "the outbox prune schedule",
        ),
    ];
    // a new schedule's cursor starts at the database's now, not this instance's
    let now = postgres_store::database_now(&store.pool).await?;
    for (name, def, what) in defaults {
        job_engine::schedule::put(&store.pool, name, &def, "scheduler", now, true)
            .await?
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    }
    Ok(())
}

/// Registers the order follow-ups: each handler parses the order id and maps the use case's
/// answer to an outcome.
fn register_follow_ups(engine: &mut Engine, f: Arc<Fulfillment<PrelockClient>>) {
    macro_rules! follow_up {
        ($kind:expr, $method:ident) => {{
            let f = f.clone();
            engine.register($kind, move |job: Job| {
                let f = f.clone();
                async move {
                    match order_id(&job) {
                        Ok(id) => outcome(f.$method(id).await),
                        Err(bad) => bad,
                    }
                }
            });
        }};
    }
    follow_up!(events::JOB_ORDER_EXPIRE, expire_order);
    follow_up!(events::JOB_STOCK_DEDUCT, deduct_stock);
    follow_up!(events::JOB_VOUCHER_ISSUE, issue_voucher);
}

fn order_id(job: &Job) -> Result<OrderId, Outcome> {
    job.payload["order_id"]
        .as_str()
        .and_then(|s| OrderId::parse(s).ok())
        .ok_or_else(|| Outcome::Permanent("payload has no valid order_id".into()))
}

/// A use case's answer as a job outcome: trouble with a dependency is retried, a request that
/// can never succeed is permanent, and "not due yet" waits as long as the use case says (read
/// off the clock that decides it), without spending an attempt.
fn outcome(r: Result<FollowUp, FulfillmentError>) -> Outcome {
    use FulfillmentError as F;
    match r {
        Ok(FollowUp::Done) => Outcome::Done,
        Ok(FollowUp::NotNeeded(why)) => {
            tracing::info!(why, "follow-up not needed");
            Outcome::Done
        }
        // at least a tenth of a second: never a tight loop on a clock that barely lags
        Ok(FollowUp::NotDue(wait)) => {
            Outcome::Snooze(wait.max(Duration::from_millis(100)), "not due yet".into())
        }
        Err(e @ (F::Db(_) | F::PrelockUnavailable(_) | F::PrelockNotLoaded | F::Conflict)) => {
            Outcome::Retry(e.to_string())
        }
        Err(e) => Outcome::Permanent(e.to_string()),
    }
}
