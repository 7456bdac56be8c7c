//! HTTP plumbing: health/readiness/metrics routes, per-route metrics, JSON input that fails as
//! `ERR_VALIDATION`, and serving with graceful shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::error::{ApiError, ErrorCode};
use crate::telemetry::Metrics;

/// Resolves when the process is asked to stop (SIGTERM or Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown requested; draining");
}

pub use tokio_util::task::TaskTracker;

/// After the server stopped: waits, at most `within`, for background tasks (releases,
/// rebuilds, deliveries) to finish, so a rolling deploy does not drop them half way.
pub async fn drain(tasks: &TaskTracker, within: std::time::Duration) {
    tasks.close();
    if tokio::time::timeout(within, tasks.wait()).await.is_err() {
        tracing::warn!(
            pending = tasks.len(),
            "background tasks still running at exit"
        );
    } else {
        tracing::info!("background tasks drained");
    }
}

/// Serves `app` next to a background `worker` (a job engine's loop), named `what` in the logs:
/// on SIGTERM or Ctrl-C the server drains, `stop` is cancelled, and the worker gets `drain` to
/// finish before the process goes on exiting (what it leaves is for its leases to hand over).
pub async fn serve_with_worker(
    listener: tokio::net::TcpListener,
    app: Router,
    (what, worker): (&str, tokio::task::JoinHandle<()>),
    stop: tokio_util::sync::CancellationToken,
    drain: std::time::Duration,
) -> anyhow::Result<()> {
    let shutdown = {
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            stop.cancel();
        }
    };
    serve(listener, app, shutdown).await?;
    stop.cancel();
    match tokio::time::timeout(drain, worker).await {
        Ok(_) => tracing::info!("{what} drained"),
        Err(_) => tracing::warn!("{what} still busy at exit; its leases will be rescued"),
    }
    Ok(())
}

/// Serves `app` until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    tracing::info!("stopped");
    Ok(())
}

/// A readiness probe: `Ok` or the name of the dependency that failed.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Wraps an async readiness probe as a [`ReadyCheck`].
pub fn ready_check<F, Fut>(probe: F) -> ReadyCheck
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    Arc::new(move || Box::pin(probe()))
}

#[derive(Clone)]
struct OpsState {
    metrics: Metrics,
    ready: ReadyCheck,
}

/// `/healthz` (the process runs), `/readyz` (its dependencies answer), `/metrics`.
pub fn ops_routes(metrics: Metrics, ready: ReadyCheck) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(OpsState { metrics, ready })
}

/// A readiness probe answers within this, whatever its dependencies do: an orchestrator's
/// probe timeout is short, and a hung probe looks like a hung process.
pub const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

async fn readyz(State(s): State<OpsState>) -> Response {
    let probe = tokio::time::timeout(READY_TIMEOUT, (s.ready)())
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {READY_TIMEOUT:?}")));
    match probe {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(what) => {
            tracing::warn!(dependency = %what, "not ready");
            ApiError::new(ErrorCode::Unavailable, format!("not ready: {what}")).into_response()
        }
    }
}

async fn render_metrics(State(s): State<OpsState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// Middleware: counts and times every request by method, route template and status, and runs
/// it in a server span (`POST /v1/orders`) that continues the caller's `traceparent`. The
/// probes and `/metrics` are not traced.
pub async fn track(State(metrics): State<Metrics>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let resp = if matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics") {
        next.run(req).await
    } else {
        let span = tracing::info_span!(
            "http.request",
            otel.name = format!("{method} {route}"),
            otel.kind = "server",
            http.request.method = %method,
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
        );
        let caller = req
            .headers()
            .get(crate::trace::TRACEPARENT)
            .and_then(|v| v.to_str().ok());
        let span = crate::trace::follow(span, caller);
        let resp = next.run(req).instrument(span.clone()).await;
        span.record("http.response.status_code", resp.status().as_u16());
        resp
    };
    let status = resp.status().as_u16().to_string();
    metrics
        .http_requests
        .with_label_values(&[&method, &route, &status])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[&method, &route])
        .observe(start.elapsed().as_secs_f64());
    resp
}

/// Adds the ops routes and the metrics middleware to a service's router.
pub fn finish(app: Router, metrics: Metrics, ready: ReadyCheck) -> Router {
    app.merge(ops_routes(metrics.clone(), ready))
        .layer(axum::middleware::from_fn_with_state(metrics, track))
}

/// JSON body extractor whose failures are `ERR_MALFORMED_JSON` / `ERR_VALIDATION` in the house
/// error format, naming the field when serde can.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::JsonDataError(e)) => {
                // serde's message names the field: "quantity: invalid value: -1 ..."
                let detail = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.body_text());
                Err(ApiError::new(ErrorCode::Validation, detail))
            }
            Err(JsonRejection::JsonSyntaxError(e)) => Err(ApiError::new(
                ErrorCode::MalformedJson,
                format!("malformed JSON: {}", e.body_text()),
            )),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                ErrorCode::Validation,
                "Content-Type must be application/json",
            )),
            Err(e) => Err(ApiError::new(ErrorCode::Validation, e.body_text())),
        }
    }
}

/// OpenAPI modifier declaring the `bearer` security scheme (JWT for buyers, the ops token
/// for operators) that operations reference with `security(("bearer" = []))`.
pub struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
