//! prelock-service: owns stock.
//!
//! Layout:
//! - this file: configuration, the app state, the router.
//! - [`routes`]: stock admin (`PUT/GET /v1/skus/{sku_id}`), reservations (reserve, holds, pin,
//!   withdraw, release), `POST /v1/admin/rebuild`.
//! - [`rebuild`]: recomputing Redis from Postgres, per SKU under its exclusive lock, so it is
//!   safe while orders flow; also started on its own when a SKU is found not loaded (Redis
//!   lost its data).
//! - [`confirm`]: the delayed confirmation of every pre-lock (given back within seconds when
//!   its order never commits), run in the background by [`App::run`].
//!
//! Postgres is the source of truth (`skus.stock_real` + the reservations ledger); Redis is a
//! derived, losable index of it. This service writes orders in one case only: a rebuild that
//! finds a SKU's ledger holding more than its stock expires the newest unpaid orders, through
//! `fulfillment::orders::expire_pending`.

pub mod confirm;
pub mod rebuild;
pub mod routes;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::FromRef;
use axum::Router;
use postgres_store::PgStore;
use prometheus::IntCounterVec;
use redis_prelock::RedisPrelock;
use service_kit::auth::AuthConfig;
use service_kit::config::{env_millis, env_or, env_string};
use service_kit::telemetry::Metrics;

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub redis_url: String,
    /// Prepended to every Redis key (environments sharing one Redis; tests).
    pub redis_prefix: String,
    /// Bound on each Redis call; past it the answer is 503 and a timeout is counted.
    pub redis_timeout: Duration,
    /// Pre-lock lifetime for SKUs without their own (SPEC: 15 minutes).
    pub default_ttl: Duration,
    /// Pool size and how long to wait on Postgres before answering 503.
    pub pg: postgres_store::PgLimits,
    pub run_migrations: bool,
    /// A pre-lock's pending confirmation is checked this long after its reserve (paper: 5 s).
    pub confirm_after: Duration,
    /// How often the confirmer looks for pending confirmations that are due.
    pub confirm_poll: Duration,
    /// Most units of one SKU one buyer may hold (live and paid), for SKUs that set none
    /// (`max_per_buyer`); 0 = no limit.
    pub default_max_per_buyer: u32,
}

impl Config {
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Config {
            database_url: env_string(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/bar_fulfillment",
            ),
            redis_url: env_string("REDIS_URL", "redis://127.0.0.1:6379"),
            redis_prefix: env_string("REDIS_KEY_PREFIX", ""),
            redis_timeout: env_millis("REDIS_TIMEOUT_MS", 100)?,
            default_ttl: Duration::from_secs(env_or("PRELOCK_TTL_SECS", 900u64)?),
            pg: postgres_store::PgLimits::from_env(16, env_or)?,
            run_migrations: env_or("RUN_MIGRATIONS", true)?,
            confirm_after: env_millis("PRELOCK_CONFIRM_AFTER_MS", 3000)?,
            confirm_poll: env_millis("PRELOCK_CONFIRM_POLL_MS", 500)?,
            default_max_per_buyer: env_or("PRELOCK_MAX_PER_BUYER", 0u32)?,
        })
    }
}

/// Metrics of the pre-lock itself (beside the HTTP ones).
#[derive(Clone)]
pub struct PrelockMetrics {
    /// `prelock_requests_total{op,outcome}`: every Redis pre-lock call and how it ended.
    pub requests: IntCounterVec,
    /// `prelock_timeouts_total{op}`: calls that timed out or could not reach Redis; with
    /// `prelock_requests_total` this gives the paper's `prelock_timeout_rate`.
    pub timeouts: IntCounterVec,
    /// `prelock_rebuilds_total{trigger,outcome}`: SKU rebuilds (admin, not_loaded, restock).
    pub rebuilds: IntCounterVec,
    /// `prelock_overcommit_total{outcome}`: what rebuilds found over-committed ledgers did:
    /// `expired_order` per unpaid order dropped to fit `stock_real`, `paid_over_stock` per
    /// rebuild of a SKU whose paid units alone exceed it (an oversell no rebuild can undo).
    pub overcommit: IntCounterVec,
    /// `prelock_reconcile_drift_total`: SKUs the reconciliation found drifted and repaired.
    pub drift: IntCounterVec,
    /// `prelock_confirmations_total{outcome}`: pending confirmations settled (`confirmed`,
    /// `still_claimed`, `undecided`, and `given_back` per call that gave units back).
    pub confirmations: IntCounterVec,
    /// `prelock_given_back_units_total`: units given back because their order never
    /// committed.
    pub given_back_units: IntCounterVec,
}

pub struct App {
    pub config: Config,
    pub store: PgStore,
    pub redis: RedisPrelock,
    pub auth: AuthConfig,
    pub metrics: Metrics,
    pub prelock_metrics: PrelockMetrics,
    /// SKUs with a background rebuild under way, so a burst of "not loaded" answers starts
    /// one rebuild, not hundreds.
    pub rebuilding: Mutex<HashSet<String>>,
    /// Background rebuilds; drained on shutdown.
    pub tasks: service_kit::http::TaskTracker,
    /// SKUs whose pending confirmations the confirmer watches, with when a reserve on this
    /// instance last noted each (see [`confirm`]).
    pub pending_skus: Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

#[derive(Clone)]
pub struct AppState(pub Arc<App>);

impl FromRef<AppState> for AuthConfig {
    fn from_ref(s: &AppState) -> AuthConfig {
        s.0.auth.clone()
    }
}

impl App {
    pub async fn build(config: Config, auth: AuthConfig) -> anyhow::Result<Arc<App>> {
        let store = PgStore::connect(&config.database_url, &config.pg).await?;
        if config.run_migrations {
            store.migrate().await?;
        }
        let redis = RedisPrelock::connect(
            &config.redis_url,
            &config.redis_prefix,
            config.redis_timeout,
            config.confirm_after,
        )
        .await?
        .with_default_limit(config.default_max_per_buyer);
        let metrics = Metrics::new("prelock-service");
        store.export_outbox_lag(&metrics);
        // counted from 0, so the first drift is an increase an alert sees
        let drift = metrics.counter(
            "prelock_reconcile_drift_total",
            "SKUs whose Redis state the reconciliation found drifted from Postgres and repaired",
            &[],
        );
        drift.with_label_values::<&str>(&[]);
        // counted from 0, so a first failed rebuild is an increase PrelockRebuildFailing sees
        let rebuilds = metrics.counter(
            "prelock_rebuilds_total",
            "SKU pre-lock rebuilds from Postgres",
            &["trigger", "outcome"],
        );
        for trigger in ["admin", "not_loaded", "restock"] {
            for outcome in ["ok", "error"] {
                rebuilds.with_label_values(&[trigger, outcome]);
            }
        }
        let prelock_metrics = PrelockMetrics {
            requests: metrics.counter(
                "prelock_requests_total",
                "Pre-lock calls by operation and outcome",
                &["op", "outcome"],
            ),
            timeouts: metrics.counter(
                "prelock_timeouts_total",
                "Pre-lock calls that timed out or found Redis unreachable",
                &["op"],
            ),
            rebuilds,
            overcommit: metrics.counter(
                "prelock_overcommit_total",
                "Over-committed ledgers found by rebuilds, by what was done",
                &["outcome"],
            ),
            drift,
            confirmations: metrics.counter(
                "prelock_confirmations_total",
                "Pending pre-lock confirmations settled: confirmed (an order holds it), still_claimed, undecided (its transaction still running), given_back (calls that gave units back)",
                &["outcome"],
            ),
            given_back_units: metrics.counter(
                "prelock_given_back_units_total",
                "Units given back because the order that pre-locked them never committed",
                &[],
            ),
        };
        Ok(Arc::new(App {
            config,
            store,
            redis,
            auth,
            metrics,
            prelock_metrics,
            rebuilding: Mutex::new(HashSet::new()),
            tasks: service_kit::http::TaskTracker::new(),
            pending_skus: Mutex::new(std::collections::HashMap::new()),
        }))
    }

    /// Notes that `sku` may have pending confirmations (a reserve ran on it).
    pub fn note_pending(&self, sku: &domain::SkuId) {
        let now = std::time::Instant::now();
        let mut pending = self.pending_skus.lock().unwrap_or_else(|p| p.into_inner());
        match pending.get_mut(sku.as_str()) {
            Some(noted) => *noted = now,
            None => {
                pending.insert(sku.as_str().to_owned(), now);
            }
        }
    }

    /// The background work (the confirmer), until `stop`.
    pub async fn run(self: Arc<App>, stop: tokio_util::sync::CancellationToken) {
        confirm::run(self, stop).await
    }

    pub fn router(self: &Arc<App>) -> Router {
        let app = self.clone();
        let ready = service_kit::http::ready_check(move || {
            let app = app.clone();
            async move {
                app.store
                    .ping()
                    .await
                    .map_err(|e| format!("postgres: {e}"))?;
                app.redis.ping().await.map_err(|e| format!("redis: {e}"))
            }
        });
        service_kit::http::finish(
            routes::router(AppState(self.clone())),
            self.metrics.clone(),
            ready,
        )
    }
}
