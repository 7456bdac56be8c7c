//! order-api: the HTTP API for buyers, payment webhooks and operators.
//!
//! Layout:
//! - this file: configuration, the app state, the router and its OpenAPI document.
//! - [`api`]: request/response types (the JSON contract) and the mapping from use-case
//!   errors to the house error body.
//! - [`routes`]: handlers for orders and payments.
//!
//! Handlers parse and authenticate, call a `fulfillment` use case, and shape the answer; they
//! hold no business rule. `GET /openapi.json` is generated from the handlers' own types.

pub mod api;
pub mod routes;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use axum::routing::get;
use axum::{Json, Router};
use fulfillment::{Fulfillment, FulfillmentConfig};
use gateway_protocol::{GatewayClient, ProviderSecrets};
use postgres_store::PgStore;
use prelock_api::PrelockClient;
use prometheus::IntCounterVec;
use service_kit::auth::AuthConfig;
use service_kit::config::{env_millis, env_or, env_string};
use service_kit::http::BearerAuth;
use service_kit::telemetry::Metrics;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub prelock_url: String,
    /// End-to-end bound on one call to prelock-service (SLA: "buy now" answers in 150 ms).
    pub prelock_timeout: Duration,
    pub gateway_url: String,
    pub gateway_timeout: Duration,
    /// How payment providers reach this service (the callback URL given to them).
    pub public_url: String,
    /// Pool size and how long to wait on Postgres before answering 503.
    pub pg: postgres_store::PgLimits,
    pub run_migrations: bool,
    pub fulfillment: FulfillmentConfig,
    /// Budgets per buyer, per client address and on the webhooks (`RATE_LIMIT_*`).
    pub rate_limits: service_kit::limit::RateLimitConfig,
}

impl Config {
    pub fn from_env() -> anyhow::Result<Self> {
        let defaults = FulfillmentConfig::default();
        Ok(Config {
            database_url: env_string(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/bar_fulfillment",
            ),
            prelock_url: env_string("PRELOCK_URL", "http://127.0.0.1:8081"),
            prelock_timeout: env_millis("PRELOCK_TIMEOUT_MS", 150)?,
            gateway_url: env_string("GATEWAY_URL", "http://127.0.0.1:8090"),
            gateway_timeout: env_millis("GATEWAY_TIMEOUT_MS", 3000)?,
            public_url: env_string("PUBLIC_URL", "http://127.0.0.1:8080"),
            pg: postgres_store::PgLimits::from_env(32, env_or)?,
            run_migrations: env_or("RUN_MIGRATIONS", true)?,
            fulfillment: FulfillmentConfig {
                max_quantity: env_or("ORDER_MAX_QUANTITY", defaults.max_quantity)?,
                follow_up_delay: env_millis("FOLLOW_UP_DELAY_MS", 2000)?,
                not_loaded_retries: env_or(
                    "PRELOCK_NOT_LOADED_RETRIES",
                    defaults.not_loaded_retries,
                )?,
                sold_out_ttl: env_millis("SOLD_OUT_TTL_MS", 500)?,
                orphan_release_delay: env_millis("ORPHAN_RELEASE_DELAY_MS", 2000)?,
                max_background_give_backs: env_or(
                    "ORPHAN_RELEASE_MAX",
                    defaults.max_background_give_backs,
                )?,
                first_payment_check: env_millis(
                    "PAYMENT_FIRST_CHECK_MS",
                    defaults.first_payment_check.as_millis() as u64,
                )?,
            },
            rate_limits: service_kit::limit::RateLimitConfig::from_env()?,
        })
    }
}

/// order-api's own metrics.
#[derive(Clone)]
pub struct ApiMetrics {
    /// `orders_created_total{outcome}`: created, replayed, shortage, prelock_unavailable, ...
    pub orders: IntCounterVec,
    /// `prelock_calls_total{outcome}`: from this side of the wire; `timeout` counts toward
    /// `prelock_timeout_rate` together with prelock-service's own count.
    pub prelock_calls: IntCounterVec,
    /// `payment_callbacks_total{provider,outcome}`.
    pub callbacks: IntCounterVec,
}

pub struct App {
    pub config: Config,
    pub fulfillment: Fulfillment<PrelockClient>,
    pub gateway: GatewayClient,
    pub secrets: ProviderSecrets,
    pub auth: AuthConfig,
    pub metrics: Metrics,
    pub api_metrics: ApiMetrics,
    /// Budgets per buyer and per client address (create, pay, cancel) and on the webhooks.
    pub limits: service_kit::limit::RateLimits,
}

#[derive(Clone)]
pub struct AppState(pub Arc<App>);

impl FromRef<AppState> for AuthConfig {
    fn from_ref(s: &AppState) -> AuthConfig {
        s.0.auth.clone()
    }
}

impl App {
    pub async fn build(
        config: Config,
        auth: AuthConfig,
        secrets: ProviderSecrets,
    ) -> anyhow::Result<Arc<App>> {
        let store = PgStore::connect(&config.database_url, &config.pg).await?;
        if config.run_migrations {
            store.migrate().await?;
        }
        let prelock = PrelockClient::new(
            &config.prelock_url,
            &auth.service_token,
            config.prelock_timeout,
        )?;
        let gateway = GatewayClient::new(&config.gateway_url, config.gateway_timeout)?;
        let metrics = Metrics::new("order-api");
        store.export_outbox_lag(&metrics);
        let api_metrics = ApiMetrics {
            orders: metrics.counter(
                "orders_created_total",
                "POST /v1/orders by outcome",
                &["outcome"],
            ),
            prelock_calls: metrics.counter(
                "prelock_calls_total",
                "Calls to prelock-service by outcome",
                &["outcome"],
            ),
            callbacks: metrics.counter(
                "payment_callbacks_total",
                "Payment callbacks by provider and outcome",
                &["provider", "outcome"],
            ),
        };
        let limits = service_kit::limit::RateLimits::new(&config.rate_limits, &metrics);
        Ok(Arc::new(App {
            limits,
            fulfillment: Fulfillment::new(store, prelock, config.fulfillment.clone()),
            config,
            gateway,
            secrets,
            auth,
            metrics,
            api_metrics,
        }))
    }

    pub fn router(self: &Arc<App>) -> Router {
        let (api, openapi) = openapi_router()
            .with_state(AppState(self.clone()))
            .split_for_parts();
        let openapi = service_kit::http::document_auth(openapi);
        let app = self.clone();
        let ready = service_kit::http::ready_check(move || {
            let app = app.clone();
            async move {
                app.fulfillment
                    .store
                    .ping()
                    .await
                    .map_err(|e| format!("postgres: {e}"))
            }
        });
        let api = api.route("/openapi.json", get(move || async move { Json(openapi) }));
        service_kit::http::finish(api, self.metrics.clone(), ready)
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "bar-fulfillment order-api", description = "Bar group-buy orders: buy now, pay, track."),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// Every API route, registered together with its OpenAPI operation (one list, so the
/// document cannot miss a route).
pub fn openapi_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(routes::orders::create_order))
        .routes(routes!(routes::orders::get_order))
        .routes(routes!(routes::orders::cancel_order))
        .routes(routes!(routes::payments::start_payment))
        .routes(routes!(routes::payments::payment_callback))
        .routes(routes!(routes::orders::redeem_voucher))
}

/// The OpenAPI document (also served at `GET /openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    service_kit::http::document_auth(openapi_router().split_for_parts().1)
}
