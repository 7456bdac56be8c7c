//! compensation-worker: no paid order is lost when its payment callback is.
//!
//! Every started payment has a `payment.check` job (written with the payment, due shortly
//! after). This binary runs those jobs on the job engine (the scheduler does not: each
//! binary claims only its own kinds). A check asks the provider's query API:
//! - paid: takes the Redis lock `compensate:order:{payment_id}` (SET NX PX with a random
//!   token, released by compare-and-delete) and applies the payment through the same
//!   `apply_payment` the webhook uses. The lock only saves duplicate work: if it expires
//!   mid-way, the payment row lock and the order's version check still allow one transition;
//! - not paid yet, order still payable: checks again after the poll interval;
//! - order no longer payable, or the payment closed at the provider: done;
//! - the provider timed out or failed (5xx): retried with exponential backoff and jitter.
//!
//! Each outcome is counted in `compensation_attempts_total{outcome}`.
//!
//! It also runs `payment.refund` (written when money arrived that an order cannot keep): the
//! provider's refund API is called with a refund id derived from the payment (`rf-<payment
//! id>`), so a retry after a timeout or a crash asks for the same refund and the provider
//! pays it once; then the payment is `REFUNDED` and a waiting order `REFUNDED` with
//! `OrderRefunded`. Counted in `refunds_total{outcome}`.
//!
//! Not here yet (the compensation issue continues): the failure archive and alert, the
//! fast-polling mode (`domain::sla`), the sweep for payments without a check job, and manual
//! replay with its console.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use domain::OrderState;
use fulfillment::events;
use fulfillment::payments::{ApplyOutcome, PaymentConfirmation, Source};
use fulfillment::{Fulfillment, FulfillmentConfig, FulfillmentError};
use gateway_protocol::{GatewayClient, GatewayError, RefundRequest};
use job_engine::{Engine, EngineConfig, Job, Outcome, SystemClock};
use postgres_store::{PgLimits, PgStore};
use prelock_api::PrelockClient;
use prometheus::IntCounterVec;
use redis::aio::ConnectionManager;
use service_kit::config::{env_millis, env_or, env_string};
use service_kit::telemetry::Metrics;
use uuid::Uuid;

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
    pub redis_url: String,
    /// How long the compensation lock is held at most (a crashed holder frees it then).
    pub lock_ttl: Duration,
    /// Between checks of a payment that is not paid yet (paper: 30 s).
    pub check_interval: Duration,
    pub engine: EngineConfig,
}

impl Config {
    pub fn from_env() -> anyhow::Result<Self> {
        // gateway failures back off 1 s, 2 s, 4 s ... capped at 30 s (paper: 1 / 3 / 9 s, 30 s)
        let defaults = EngineConfig {
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            ..EngineConfig::default()
        };
        Ok(Config {
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
            redis_url: env_string("REDIS_URL", "redis://127.0.0.1:6379/0"),
            lock_ttl: env_millis("COMPENSATION_LOCK_TTL_MS", 10_000)?,
            check_interval: env_millis("PAYMENT_CHECK_INTERVAL_MS", 30_000)?,
            engine: EngineConfig::from_env("compensation-worker", defaults)
                .map_err(anyhow::Error::msg)?,
        })
    }
}

pub struct App {
    pub config: Config,
    pub store: PgStore,
    pub engine: Engine,
    pub metrics: Metrics,
}

/// What one check needs.
struct Checker {
    store: PgStore,
    fulfillment: Fulfillment<PrelockClient>,
    gateway: GatewayClient,
    redis: ConnectionManager,
    lock_ttl: Duration,
    check_interval: Duration,
    attempts: IntCounterVec,
    refunds: IntCounterVec,
}

impl App {
    pub async fn build(config: Config, ops_token: &str) -> anyhow::Result<Arc<App>> {
        let store = PgStore::connect(&config.database_url, &config.pg).await?;
        if config.run_migrations {
            store.migrate().await?;
        }
        let prelock = PrelockClient::new(&config.prelock_url, ops_token, config.prelock_timeout)?;
        let redis = ConnectionManager::new(redis::Client::open(config.redis_url.as_str())?)
            .await
            .map_err(|e| anyhow::anyhow!("redis at {}: {e}", config.redis_url))?;
        let metrics = Metrics::new("compensation-worker");
        let checker = Arc::new(Checker {
            store: store.clone(),
            fulfillment: Fulfillment::new(store.clone(), prelock, FulfillmentConfig::default()),
            gateway: GatewayClient::new(&config.gateway_url, config.gateway_timeout)?,
            redis,
            lock_ttl: config.lock_ttl,
            check_interval: config.check_interval,
            attempts: metrics.counter(
                "compensation_attempts_total",
                "Payment checks by outcome: paid, duplicate, refund_required, not_paid, order_closed, closed_at_provider, locked, gateway_timeout, gateway_error, failed",
                &["outcome"],
            ),
            refunds: metrics.counter(
                "refunds_total",
                "Refund jobs by outcome: refunded, already_refunded, gateway_error, rejected, failed",
                &["outcome"],
            ),
        });
        let mut engine = Engine::new(
            store.pool.clone(),
            Arc::new(SystemClock),
            config.engine.clone(),
        );
        {
            let checker = checker.clone();
            engine.register(events::JOB_PAYMENT_CHECK, move |job: Job| {
                let checker = checker.clone();
                async move { checker.check(&job).await }
            });
        }
        engine.register(events::JOB_PAYMENT_REFUND, move |job: Job| {
            let checker = checker.clone();
            async move { checker.refund(&job).await }
        });
        Ok(Arc::new(App {
            config,
            store,
            engine,
            metrics,
        }))
    }

    /// `/healthz`, `/readyz` (Postgres answers), `/metrics`.
    pub fn router(self: &Arc<App>) -> Router {
        let app = self.clone();
        let ready = service_kit::http::ready_check(move || {
            let app = app.clone();
            async move { app.store.ping().await.map_err(|e| format!("postgres: {e}")) }
        });
        service_kit::http::finish(Router::new(), self.metrics.clone(), ready)
    }
}

impl Checker {
    async fn check(&self, job: &Job) -> Outcome {
        let (label, outcome) = self.check_inner(job).await;
        self.attempts.with_label_values(&[label]).inc();
        outcome
    }

    async fn check_inner(&self, job: &Job) -> (&'static str, Outcome) {
        let (payment_id, payment) = match self.payment_of(job).await {
            Ok(v) => v,
            Err(failed) => return failed,
        };
        let pool = &self.store.pool;
        if payment.status != domain::PaymentStatus::Created {
            // the webhook (or an earlier check) resolved it
            return ("duplicate", Outcome::Done);
        }
        let answer = match self
            .gateway
            .query_payment(payment.provider, &payment_id.to_string())
            .await
        {
            Ok(a) => a,
            Err(GatewayError::Unavailable(e)) => {
                let label = if e.contains("timed out") || e.contains("timeout") {
                    "gateway_timeout"
                } else {
                    "gateway_error"
                };
                return (label, Outcome::Retry(e));
            }
            Err(GatewayError::Rejected(e)) => {
                return ("closed_at_provider", Outcome::Permanent(e));
            }
        };
        match answer.status.as_str() {
            "PAID" => {}
            "CREATED" => {
                let payable = match postgres_store::orders::find_order(pool, payment.order_id).await
                {
                    Ok(Some(o)) => o.state == OrderState::Pending,
                    Ok(None) => false,
                    Err(e) => return ("failed", Outcome::Retry(e.to_string())),
                };
                return if payable {
                    (
                        "not_paid",
                        Outcome::RetryAfter(self.check_interval, "not paid yet".into()),
                    )
                } else {
                    ("order_closed", Outcome::Done)
                };
            }
            _ => return ("closed_at_provider", Outcome::Done),
        }
        let (Some(event_id), Some(paid_at)) = (answer.event_id, answer.paid_at) else {
            return (
                "gateway_error",
                Outcome::Retry("provider says paid without an event id".into()),
            );
        };
        let conf = PaymentConfirmation {
            provider: payment.provider,
            event_id,
            payment_id,
            amount_cents: answer.amount_cents,
            paid_at,
        };
        let key = format!("compensate:order:{payment_id}");
        let token = Uuid::new_v4().to_string();
        match self.lock(&key, &token).await {
            Ok(true) => {}
            Ok(false) => {
                return (
                    "locked",
                    Outcome::RetryAfter(Duration::from_secs(1), "another worker holds it".into()),
                )
            }
            // the lock only saves work: without Redis, the version check still decides
            Err(e) => {
                tracing::warn!(error = %e, %payment_id, "compensation lock unavailable; applying without it")
            }
        }
        let applied = self
            .fulfillment
            .apply_payment(&conf, Source::Compensation)
            .await;
        if let Err(e) = self.unlock(&key, &token).await {
            tracing::warn!(error = %e, %payment_id, "compensation lock not released; it expires");
        }
        use FulfillmentError as F;
        match applied {
            Ok(ApplyOutcome::Paid) => {
                tracing::info!(%payment_id, "lost callback compensated: order paid");
                ("paid", Outcome::Done)
            }
            Ok(ApplyOutcome::RefundRequired { state }) => {
                tracing::warn!(%payment_id, ?state, "paid for an order that cannot keep it: refund scheduled");
                ("refund_required", Outcome::Done)
            }
            Ok(ApplyOutcome::Duplicate) => ("duplicate", Outcome::Done),
            Err(e @ (F::Db(_) | F::PrelockUnavailable(_) | F::PrelockNotLoaded | F::Conflict)) => {
                ("failed", Outcome::Retry(e.to_string()))
            }
            Err(e) => ("failed", Outcome::Permanent(e.to_string())),
        }
    }

    /// The payment a job's payload names, or the outcome for a job that names none.
    async fn payment_of(
        &self,
        job: &Job,
    ) -> Result<(Uuid, postgres_store::payments::PaymentRow), (&'static str, Outcome)> {
        let Some(payment_id) = job.payload["payment_id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
        else {
            return Err((
                "failed",
                Outcome::Permanent("payload has no payment_id".into()),
            ));
        };
        match postgres_store::payments::get_payment(&self.store.pool, payment_id).await {
            Ok(Some(p)) => Ok((payment_id, p)),
            Ok(None) => Err(("failed", Outcome::Permanent("unknown payment".into()))),
            Err(e) => Err(("failed", Outcome::Retry(e.to_string()))),
        }
    }

    async fn refund(&self, job: &Job) -> Outcome {
        let (label, outcome) = self.refund_inner(job).await;
        self.refunds.with_label_values(&[label]).inc();
        outcome
    }

    async fn refund_inner(&self, job: &Job) -> (&'static str, Outcome) {
        let (payment_id, payment) = match self.payment_of(job).await {
            Ok(v) => v,
            Err(failed) => return failed,
        };
        match payment.status {
            domain::PaymentStatus::Refunded => return ("already_refunded", Outcome::Done),
            domain::PaymentStatus::RefundRequired => {}
            other => {
                return (
                    "failed",
                    Outcome::Permanent(format!("payment is {}", other.as_str())),
                )
            }
        }
        let request = RefundRequest {
            // one refund per payment, the same id on every attempt: never paid twice
            refund_id: format!("rf-{payment_id}"),
            payment_id: payment_id.to_string(),
            amount_cents: job.payload["amount_cents"]
                .as_i64()
                .unwrap_or(payment.amount_cents),
        };
        let refund = match self.gateway.refund(payment.provider, &request).await {
            Ok(r) => r,
            Err(GatewayError::Unavailable(e)) => return ("gateway_error", Outcome::Retry(e)),
            Err(GatewayError::Rejected(e)) => return ("rejected", Outcome::Permanent(e)),
        };
        use FulfillmentError as F;
        match self
            .fulfillment
            .record_refund(payment_id, &refund.refund_id, refund.refunded_at)
            .await
        {
            Ok(_) => ("refunded", Outcome::Done),
            Err(e @ (F::Db(_) | F::Conflict)) => ("failed", Outcome::Retry(e.to_string())),
            Err(e) => ("failed", Outcome::Permanent(e.to_string())),
        }
    }

    async fn lock(&self, key: &str, token: &str) -> redis::RedisResult<bool> {
        let mut conn = self.redis.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(self.lock_ttl.as_millis() as u64)
            .query_async(&mut conn)
            .await?;
        Ok(set.is_some())
    }

    /// Compare-and-delete: only the holder's token frees the lock (a lock that expired and was
    /// taken by another worker stays theirs).
    async fn unlock(&self, key: &str, token: &str) -> redis::RedisResult<()> {
        let mut conn = self.redis.clone();
        redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        )
        .key(key)
        .arg(token)
        .invoke_async::<i64>(&mut conn)
        .await?;
        Ok(())
    }
}
