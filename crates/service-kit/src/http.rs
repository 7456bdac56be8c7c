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

/// Bounds on what one client can hold (`HTTP_*`): a slow or idle client cannot keep a socket,
/// and so a file descriptor, forever, nor can a crowd of them exhaust the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// The whole request head must arrive within this, or the connection is closed
    /// (`HTTP_HEADER_READ_TIMEOUT_MS`, 10 s): slowloris. It also ends idle keep-alive
    /// connections that start no new request in that time.
    pub header_read: std::time::Duration,
    /// From the head to the response, body reading included (`HTTP_REQUEST_TIMEOUT_MS`,
    /// 30 s): answered `408 ERR_REQUEST_TIMEOUT` (a slow body) and the handler dropped.
    pub request: std::time::Duration,
    /// Open connections at most (`HTTP_MAX_CONNECTIONS`, 1024); more are closed at accept
    /// and counted in `http_connections_refused_total`.
    pub max_connections: usize,
    /// Open connections from one client address at most (an IPv4 address, or an IPv6 /64;
    /// `HTTP_MAX_CONNECTIONS_PER_ADDRESS`, 128; 0 = no such bound), so one client cannot take
    /// every slot (eight addresses can: spreading over many addresses is a flood for the load
    /// balancer or firewall in front to stop); more are closed at accept and counted in
    /// `http_connections_refused_per_address_total`. Behind a proxy every client shares the
    /// proxy's address: raise it or set 0 there.
    pub max_per_address: usize,
}

impl ServeLimits {
    pub fn from_env() -> anyhow::Result<Self> {
        use crate::config::{env_millis, env_or};
        Ok(ServeLimits {
            header_read: env_millis("HTTP_HEADER_READ_TIMEOUT_MS", 10_000)?,
            request: env_millis("HTTP_REQUEST_TIMEOUT_MS", 30_000)?,
            max_connections: env_or("HTTP_MAX_CONNECTIONS", 1024usize)?.max(1),
            max_per_address: env_or("HTTP_MAX_CONNECTIONS_PER_ADDRESS", 128usize)?,
        })
    }
}

/// Serves `app` until `shutdown` resolves, then drains in-flight requests: HTTP/1.1 through
/// hyper with [`ServeLimits`] (header-read and request timeouts, a connection cap); each
/// request carries its peer address (`ConnectInfo`, for the rate limits).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let limits = ServeLimits::from_env()?;
    serve_with(listener, app, shutdown, limits).await
}

/// [`serve`] with explicit limits.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ServeLimits,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    tracing::info!(addr = %listener.local_addr()?, ?limits, "listening");
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_address = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        std::net::IpAddr,
        usize,
    >::new()));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut refused_logged = Instant::now() - std::time::Duration::from_secs(60);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // out of descriptors, or a connection reset before accept: keep serving
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            refused(
                &CONNECTIONS_REFUSED,
                &mut refused_logged,
                limits.max_connections,
                "connection limit reached; closing new connections",
            );
            continue;
        };
        let Some(address_slot) = AddressSlot::take(&per_address, peer.ip(), limits.max_per_address)
        else {
            drop(stream);
            refused(
                &CONNECTIONS_REFUSED_PER_ADDRESS,
                &mut refused_logged,
                limits.max_per_address,
                "one address holds its connection limit; closing its new connections",
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let request_timeout = limits.request;
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                let mut app = app.clone();
                async move {
                    let call =
                        tower_service::Service::call(&mut app, req.map(axum::body::Body::new));
                    match tokio::time::timeout(request_timeout, call).await {
                        Ok(resp) => resp,
                        Err(_) => Ok(ApiError::new(
                            ErrorCode::RequestTimeout,
                            format!(
                                "the request took longer than {} ms",
                                request_timeout.as_millis()
                            ),
                        )
                        .into_response()),
                    }
                }
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(address_slot);
            drop(slot);
        });
    }
    drop(listener);
    // in-flight requests finish; idle connections close
    if tokio::time::timeout(limits.request, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at exit");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Counts a connection closed at accept, and says why at most every 10 s.
fn refused(counter: &std::sync::atomic::AtomicU64, logged: &mut Instant, max: usize, why: &str) {
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if logged.elapsed() > std::time::Duration::from_secs(10) {
        *logged = Instant::now();
        tracing::warn!(max, "{why}");
    }
}

/// One connection's place in its address's count; given back on drop.
struct AddressSlot {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    key: std::net::IpAddr,
}

impl AddressSlot {
    /// A place for one more connection from `ip` (an IPv6 address counts as its /64), or
    /// `None` when it already holds `max` (0 = no bound).
    fn take(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
        max: usize,
    ) -> Option<AddressSlot> {
        let key = crate::limit::client_network(ip);
        let mut all = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = all.entry(key).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            counts: counts.clone(),
            key,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut all = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = all.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                all.remove(&self.key);
            }
        }
    }
}

/// Connections closed at accept because one address held
/// [`ServeLimits::max_per_address`] (`http_connections_refused_per_address_total`).
pub static CONNECTIONS_REFUSED_PER_ADDRESS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Connections closed at accept because [`ServeLimits::max_connections`] were open (every
/// service's `/metrics` shows it as `http_connections_refused_total`).
pub static CONNECTIONS_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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
        format!(
            "{}# HELP http_connections_refused_total Connections closed at accept: the connection limit (HTTP_MAX_CONNECTIONS) was reached\n\
             # TYPE http_connections_refused_total counter\n\
             http_connections_refused_total {}\n\
             # HELP http_connections_refused_per_address_total Connections closed at accept: their address held HTTP_MAX_CONNECTIONS_PER_ADDRESS\n\
             # TYPE http_connections_refused_per_address_total counter\n\
             http_connections_refused_per_address_total {}\n",
            s.metrics.render(),
            CONNECTIONS_REFUSED.load(std::sync::atomic::Ordering::Relaxed),
            CONNECTIONS_REFUSED_PER_ADDRESS.load(std::sync::atomic::Ordering::Relaxed)
        ),
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

/// Adds the ops routes, the house error body for every error (unknown routes and wrong
/// methods included) and the metrics middleware to a service's router.
pub fn finish(app: Router, metrics: Metrics, ready: ReadyCheck) -> Router {
    app.merge(ops_routes(metrics.clone(), ready))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .layer(axum::middleware::from_fn(run_to_completion))
        .layer(axum::middleware::map_response(house_error_body))
        .layer(axum::middleware::from_fn_with_state(metrics, track))
}

/// Middleware: every handler runs to its end on a task of its own, whatever happens to the
/// request that started it. Without it, a client that gave up (a phone that lost its signal,
/// a load balancer's timeout) or the server's own request timeout dropped the handler's future
/// halfway, inside a transaction or holding a pooled connection: sqlx then closes the
/// connection from under the pool, and under load the pool lost its connections for good
/// (`pool timed out while waiting for an open connection` on every request, with no
/// connection open; the scenario saw "buy now" collapse at 200/s within seconds, and never
/// come back). A detached handler commits or rolls back and returns its connection; the
/// answer nobody reads is dropped.
pub async fn run_to_completion(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // The body is read here, under the request timeout, before the handler is detached: a
    // client that never finishes its body is cut off by the timeout as before (a detached
    // task holding the body would keep the connection open). Bodies are small JSON; the
    // limit is axum's own default for its extractors.
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(e) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return if too_large {
                ApiError::new(ErrorCode::PayloadTooLarge, "the request body is too large")
            } else {
                ApiError::new(
                    ErrorCode::Validation,
                    format!("the request body could not be read: {e}"),
                )
            }
            .into_response();
        }
    };
    let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
    // the task continues the request's span (and so its trace)
    let work = tracing::Instrument::instrument(next.run(req), tracing::Span::current());
    match tokio::spawn(work).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(error = %e, "request handler failed");
            ApiError::new(ErrorCode::Internal, "internal error").into_response()
        }
    }
}

/// Largest request body read (axum's default limit for its extractors).
const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// Longest framework error text carried over into the house body.
const REJECTION_TEXT_MAX: usize = 1024;

/// Middleware: an error answer that is not already the house JSON body (a path or query
/// rejection in `text/plain`, an empty 405, a timeout) becomes `{"code","message"}`, with its
/// status, its headers (`Allow`, `Retry-After`) and its text as the message.
pub async fn house_error_body(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, REJECTION_TEXT_MAX * 4).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(_) => String::new(),
    };
    let mut message: String = text.chars().take(REJECTION_TEXT_MAX).collect();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_lowercase();
    }
    let code = ErrorCode::for_status(status);
    let fresh = ApiError::new(code, message).into_response();
    let (fresh_parts, body) = fresh.into_parts();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    for (name, value) in &fresh_parts.headers {
        parts.headers.insert(name, value.clone());
    }
    Response::from_parts(parts, body)
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
            // the body limit (2 MB) is a 413, not a bad request
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                "request body too large",
            )),
            Err(e) => Err(ApiError::new(ErrorCode::Validation, e.body_text())),
        }
    }
}

/// OpenAPI modifier declaring the `bearer` security scheme (JWT for buyers and for staff, the
/// service token between services) that operations reference with `security(("bearer" = []))`.
pub struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Each route takes one kind of credential: a buyer's JWT \
                         (AUTH_JWT_SECRET) for orders and payments; a store's staff JWT \
                         (STAFF_JWT_SECRET, `role` = store, `store_id`) to redeem that store's \
                         vouchers; an operator's staff JWT (`role` = operator) for stock admin \
                         and every /v1/ops route; the service token (SERVICE_TOKEN) for the \
                         reservation routes and the clock (reconcile and the reservation \
                         lookup take an operator's token too). An invalid credential is 401, \
                         a valid one of the wrong kind 403.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Documents on every operation that takes a credential the answers every such route can
/// give: `401` (no or an invalid credential) and `403` (a valid one of the wrong kind), in the
/// house error format. Call it on a document after its routes are merged.
pub fn document_auth(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    let answer = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build(),
        )
    };
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            if op.security.as_ref().is_none_or(|s| s.is_empty()) {
                continue;
            }
            let responses = &mut op.responses.responses;
            responses
                .entry("401".to_owned())
                .or_insert_with(|| answer("ERR_UNAUTHORIZED: no credential, or an invalid one"));
            responses.entry("403".to_owned()).or_insert_with(|| {
                answer("ERR_FORBIDDEN: a valid credential of a kind this route does not take")
            });
        }
    }
    doc
}
