//! The compensation worker's ops API (an operator's staff token; documented in `/openapi.json`) and console.
//!
//! - failures: list, inspect (with the audit trail), edit the replay parameters, replay;
//!   every edit and replay is an audit row naming the operator (the staff token's `sub`: the
//!   credential says who, no header can);
//! - the SLA figures (success rate, open failures, time from "provider says paid" to paid,
//!   the poll mode);
//! - the job routes every engine binary serves (`job_engine::ops`): dead jobs of every kind,
//!   redrive, pause;
//! - `GET /ops/`: the console, one static page (plain HTML, `console.js` and `console.css`, no
//!   build step). The page itself holds nothing: it asks for an operator token and calls the API
//!   above with it. Every console file is served with a strict content security policy
//!   ([`CONSOLE_CSP`]: no inline script, never framed), `nosniff` and `no-referrer`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use axum::{Json, Router};
use domain::PaymentStatus;
use fulfillment::payments::Source;
use job_engine::ops::{db, OpsState};
use serde::{Deserialize, Serialize};
use service_kit::auth::{AuthConfig, Operator};
use service_kit::error::ErrorBody;
use service_kit::http::{ApiJson, BearerAuth};
use service_kit::{ApiError, ErrorCode};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::check::{provider_failure_label, CompensateError, Compensated, Lookup};
use crate::records::{self, AuditRow, Failure, ReplayParams, SlaFigures};
use crate::App;

#[derive(Clone)]
struct OpsApp(Arc<App>);

impl axum::extract::FromRef<OpsApp> for AuthConfig {
    fn from_ref(s: &OpsApp) -> AuthConfig {
        s.0.auth.clone()
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "bar-fulfillment compensation-worker", description = "Finds paid payments whose callback was lost and applies them; operators inspect and replay the ones it gave up on, and redrive dead jobs. Console at /ops/."),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

const CONSOLE: &str = include_str!("console.html");
const CONSOLE_JS: &str = include_str!("console.js");
const CONSOLE_CSS: &str = include_str!("console.css");

/// The console's content security policy: its own script and style files only (no inline
/// script or style, no eval), calls to its own origin only, never framed (clickjacking).
pub const CONSOLE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// One console file, with the security headers every console response carries.
fn console_file(content_type: &'static str, body: &'static str) -> axum::response::Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CONSOLE_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        body,
    )
        .into_response()
}

pub fn router(app: Arc<App>) -> Router {
    let jobs = job_engine::ops::routes(OpsState {
        pool: app.store.pool.clone(),
        auth: app.auth.clone(),
    });
    let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_failures))
        .routes(routes!(get_failure, edit_failure))
        .routes(routes!(replay))
        .routes(routes!(sla))
        .with_state(OpsApp(app))
        .merge(jobs)
        .split_for_parts();
    let doc = service_kit::http::document_auth(doc);
    api.route("/openapi.json", get(move || async move { Json(doc) }))
        .route("/ops", get(|| async { Redirect::permanent("/ops/") }))
        .route(
            "/ops/",
            get(|| async { console_file("text/html; charset=utf-8", CONSOLE) }),
        )
        .route(
            "/ops/console.js",
            get(|| async { console_file("text/javascript; charset=utf-8", CONSOLE_JS) }),
        )
        .route(
            "/ops/console.css",
            get(|| async { console_file("text/css; charset=utf-8", CONSOLE_CSS) }),
        )
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FailureQuery {
    /// open or resolved; both when absent
    pub status: Option<String>,
    /// Next page: the smallest id of the previous one.
    pub before: Option<i64>,
    /// 1 to 500; 100 when absent.
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/v1/ops/compensation/failures", tag = "compensation",
    description = "Payments compensation gave up on, newest first.",
    params(FailureQuery),
    responses((status = 200, body = [Failure]), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_failures(
    State(s): State<OpsApp>,
    _operator: Operator,
    Query(q): Query<FailureQuery>,
) -> Result<Json<Vec<Failure>>, ApiError> {
    if let Some(st) = q.status.as_deref() {
        if !matches!(st, "open" | "resolved") {
            return Err(ApiError::field("status", "must be open or resolved"));
        }
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::field("limit", "must be 1 to 500"));
    }
    records::list_failures(&s.0.store.pool, q.status.as_deref(), q.before, limit)
        .await
        .map(Json)
        .map_err(db)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FailureDetail {
    pub failure: Failure,
    /// Every operator action on it, oldest first.
    pub audit: Vec<AuditRow>,
}

async fn detail(app: &App, id: i64) -> Result<FailureDetail, ApiError> {
    let failure = records::get_failure(&app.store.pool, id)
        .await
        .map_err(db)?
        .ok_or_else(|| ApiError::not_found("failure"))?;
    let audit = records::audit_of(&app.store.pool, id).await.map_err(db)?;
    Ok(FailureDetail { failure, audit })
}

#[utoipa::path(get, path = "/v1/ops/compensation/failures/{id}", tag = "compensation",
    description = "One failure with its context (the payment, the order and the checks when it was archived) and its audit trail.",
    params(("id" = i64, Path)),
    responses((status = 200, body = FailureDetail), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_failure(
    State(s): State<OpsApp>,
    _operator: Operator,
    Path(id): Path<i64>,
) -> Result<Json<FailureDetail>, ApiError> {
    detail(&s.0, id).await.map(Json)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditFailure {
    pub params: ReplayParams,
}

#[utoipa::path(patch, path = "/v1/ops/compensation/failures/{id}", tag = "compensation",
    description = "Sets the parameters the next replay uses (e.g. the provider's transaction id). Audited under the operator the staff token names. 409 once resolved.",
    params(("id" = i64, Path)),
    request_body = EditFailure,
    responses((status = 200, body = FailureDetail), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn edit_failure(
    State(s): State<OpsApp>,
    Operator(who): Operator,
    Path(id): Path<i64>,
    ApiJson(edit): ApiJson<EditFailure>,
) -> Result<Json<FailureDetail>, ApiError> {
    if let Some(t) = &edit.params.transaction_id {
        let ok = (1..=64).contains(&t.len())
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(ApiError::field(
                "params.transaction_id",
                "must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-'",
            ));
        }
    }
    let after = serde_json::to_value(&edit.params).map_err(ApiError::internal)?;
    let mut tx = s.0.store.begin().await.map_err(db)?;
    let Some(before) = records::set_params(&mut tx, id, &after).await.map_err(db)? else {
        drop(tx);
        return Err(not_open(&s.0, id).await);
    };
    records::audit(
        &mut *tx,
        id,
        &who,
        "edit",
        &serde_json::json!({ "before": before, "after": after }),
        "edited",
    )
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    tracing::warn!(failure_id = id, operator = %who, params = %after, "failure parameters edited");
    detail(&s.0, id).await.map(Json)
}

/// 404 for an unknown failure, 409 for a resolved one.
async fn not_open(app: &App, id: i64) -> ApiError {
    match records::get_failure(&app.store.pool, id).await {
        Ok(Some(f)) => ApiError::new(
            ErrorCode::Conflict,
            format!(
                "failure {id} is {} ({})",
                f.status,
                f.resolution.unwrap_or_default()
            ),
        ),
        Ok(None) => ApiError::not_found("failure"),
        Err(e) => db(e),
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReplayResult {
    /// paid, refund_required, already_settled, not_paid, closed_at_provider, locked, or a
    /// provider failure (gateway_timeout, gateway_error, unknown_at_provider, bad_answer,
    /// apply_rejected) with its detail after a colon; for a refund: refunded,
    /// already_refunded, gateway_error or rejected.
    pub outcome: String,
    /// Whether the failure is resolved now.
    pub resolved: bool,
    pub failure: Failure,
    pub audit: AuditRow,
}

#[utoipa::path(post, path = "/v1/ops/compensation/failures/{id}/replay", tag = "compensation",
    description = "Asks the provider again (by the edited transaction id when set, else by payment id) and, if paid, applies it through the same idempotent apply_payment as the webhook (source `replay`); for money owed (a refund that failed), asks for the refund again (the same refund id, so it is paid once). Audited under the operator the staff token names, whatever the outcome. 409 once resolved.",
    params(("id" = i64, Path)),
    responses((status = 200, body = ReplayResult), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn replay(
    State(s): State<OpsApp>,
    Operator(who): Operator,
    Path(id): Path<i64>,
) -> Result<Json<ReplayResult>, ApiError> {
    let app = &s.0;
    let pool = &app.store.pool;
    let failure = records::get_failure(pool, id)
        .await
        .map_err(db)?
        .ok_or_else(|| ApiError::not_found("failure"))?;
    if failure.status != "open" {
        return Err(not_open(app, id).await);
    }
    let params: ReplayParams = serde_json::from_value(failure.params.clone()).unwrap_or_default();
    let payment = postgres_store::payments::get_payment(pool, failure.payment_id)
        .await
        .map_err(db)?
        .ok_or_else(|| ApiError::not_found("payment"))?;
    let checker = &app.checker;
    if payment.status == PaymentStatus::RefundRequired {
        // money owed: the replay asks for the refund again (the same refund id: paid once)
        let (label, outcome) = checker.pay_back(&payment, payment.amount_cents).await;
        let outcome = match outcome {
            job_engine::Outcome::Done => label.to_owned(),
            job_engine::Outcome::Retry(e)
            | job_engine::Outcome::RetryAfter(_, e)
            | job_engine::Outcome::Snooze(_, e)
            | job_engine::Outcome::Permanent(e) => format!("{label}: {e}"),
        };
        return audited(app, id, &who, &params, outcome).await.map(Json);
    }
    let lookup = match &params.transaction_id {
        Some(t) => Lookup::Transaction(t.clone()),
        None => Lookup::Payment(failure.payment_id.to_string()),
    };
    let answer = checker.query(payment.provider, lookup).await;
    let outcome = match answer {
        Err(e) => format!("{}: {e}", provider_failure_label(&e)),
        Ok(a) => match a.status.as_str() {
            "PAID" => match checker
                .compensate(failure.payment_id, &payment, &a, Source::Replay)
                .await
            {
                Ok(Compensated::Paid) => "paid".to_owned(),
                Ok(Compensated::RefundRequired) => "refund_required".to_owned(),
                Ok(Compensated::Duplicate) => {
                    records::resolve(pool, id, "already_settled")
                        .await
                        .map_err(db)?;
                    "already_settled".to_owned()
                }
                Ok(Compensated::Locked) => "locked: a worker is applying it now".to_owned(),
                Err(e @ CompensateError::BadAnswer(_)) => format!("bad_answer: {e}"),
                Err(e) => format!("apply_rejected: {e}"),
            },
            // the check's own decision: not paid yet, or closed once the order cannot take it
            "CREATED" => match checker.not_paid(&payment).await {
                (label, job_engine::Outcome::Retry(e)) => format!("{label}: {e}"),
                (label, _) => label.to_owned(),
            },
            "CLOSED" | "FAILED" => {
                if payment.status == PaymentStatus::Created {
                    postgres_store::payments::close_payment(pool, failure.payment_id)
                        .await
                        .map_err(db)?;
                }
                records::resolve(pool, id, "closed_at_provider")
                    .await
                    .map_err(db)?;
                "closed_at_provider".to_owned()
            }
            other => format!("bad_answer: unknown payment status {other:?}"),
        },
    };
    audited(app, id, &who, &params, outcome).await.map(Json)
}

/// Records a replay's audit row and answers with the failure as it stands now.
async fn audited(
    app: &App,
    id: i64,
    who: &str,
    params: &ReplayParams,
    outcome: String,
) -> Result<ReplayResult, ApiError> {
    let pool = &app.store.pool;
    let used = serde_json::to_value(params).map_err(ApiError::internal)?;
    let audit = records::audit(
        pool,
        id,
        who,
        "replay",
        &serde_json::json!({ "params": used }),
        &outcome,
    )
    .await
    .map_err(db)?;
    let failure = records::get_failure(pool, id)
        .await
        .map_err(db)?
        .ok_or_else(|| ApiError::not_found("failure"))?;
    tracing::warn!(failure_id = id, operator = %who, %outcome, "failure replayed");
    Ok(ReplayResult {
        resolved: failure.status == "resolved",
        outcome,
        failure,
        audit,
    })
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SlaView {
    #[serde(flatten)]
    pub figures: SlaFigures,
    /// Whether the SLA trigger has compensation poll fast now.
    pub fast_mode: bool,
    pub check_interval_ms: u64,
    pub fast_interval_ms: u64,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SlaQuery {
    /// The window in seconds, 60 to 604800; 3600 when absent.
    pub window_secs: Option<u64>,
}

#[utoipa::path(get, path = "/v1/ops/compensation/sla", tag = "compensation",
    description = "The compensation SLA over a window: success rate, failures, open failures, time from \"provider says paid\" to paid by source, and the poll mode.",
    params(SlaQuery),
    responses((status = 200, body = SlaView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn sla(
    State(s): State<OpsApp>,
    _operator: Operator,
    Query(q): Query<SlaQuery>,
) -> Result<Json<SlaView>, ApiError> {
    let window = q.window_secs.unwrap_or(3600);
    if !(60..=604_800).contains(&window) {
        return Err(ApiError::field("window_secs", "must be 60 to 604800"));
    }
    let figures = records::sla_figures(&s.0.store.pool, Duration::from_secs(window))
        .await
        .map_err(db)?;
    Ok(Json(SlaView {
        figures,
        fast_mode: crate::fast_mode(&s.0.checker),
        check_interval_ms: s.0.config.check_interval.as_millis() as u64,
        fast_interval_ms: s.0.config.fast_interval.as_millis() as u64,
    }))
}
