//! The job ops routes every binary that runs the engine serves (an operator's staff token; documented in
//! its `/openapi.json`): jobs by state and kind, one job, redrive of a dead job, pause and
//! resume of a kind, and who the token names. Mount them with [`routes`] next to the binary's own.

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use service_kit::auth::{AuthConfig, Operator};
use service_kit::error::ErrorBody;
use service_kit::{ApiError, ErrorCode};
use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::store::{self, JobRow};

#[derive(Clone)]
pub struct OpsState {
    pub pool: PgPool,
    pub auth: AuthConfig,
}

impl axum::extract::FromRef<OpsState> for AuthConfig {
    fn from_ref(s: &OpsState) -> AuthConfig {
        s.auth.clone()
    }
}

/// The job routes with their OpenAPI operations, ready to merge into a binary's router.
pub fn routes(state: OpsState) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(redrive_job))
        .routes(routes!(list_paused))
        .routes(routes!(whoami))
        .routes(routes!(pause_kind, resume_kind))
        .with_state(state)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobQuery {
    /// scheduled, running, completed, dead or cancelled
    pub state: Option<String>,
    pub kind: Option<String>,
    /// Next page: the smallest id of the previous one.
    pub before: Option<i64>,
    /// 1 to 500; 100 when absent.
    pub limit: Option<i64>,
}

const STATES: [&str; 5] = ["scheduled", "running", "completed", "dead", "cancelled"];

/// A database failure as an answer: the caller's own bad value (Postgres' data exceptions
/// and constraint violations) is `400`; the database being down, slow or overloaded is `503`
/// with `Retry-After` ([`store::is_transient`], the one classifier); anything else is `500`.
pub fn db(e: sqlx::Error) -> ApiError {
    if let Some(problem) = store::bad_input(&e) {
        return ApiError::new(ErrorCode::Validation, problem);
    }
    let transient = store::is_transient(&e);
    ApiError::dependency(e, transient)
}

#[utoipa::path(get, path = "/v1/ops/jobs", tag = "jobs",
    description = "Jobs in the hot table, newest first; filter by state and kind, page with `before`.",
    params(JobQuery),
    responses((status = 200, body = [JobRow]), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_jobs(
    State(s): State<OpsState>,
    _operator: Operator,
    Query(q): Query<JobQuery>,
) -> Result<Json<Vec<JobRow>>, ApiError> {
    if let Some(state) = q.state.as_deref() {
        if !STATES.contains(&state) {
            return Err(ApiError::field(
                "state",
                format!("must be one of {}", STATES.join(", ")),
            ));
        }
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::field("limit", "must be 1 to 500"));
    }
    if let Some(kind) = q.kind.as_deref() {
        check_kind(kind)?;
    }
    let rows = store::list_jobs(
        &s.pool,
        q.state.as_deref(),
        q.kind.as_deref(),
        q.before,
        limit,
    )
    .await
    .map_err(db)?;
    Ok(Json(rows))
}

#[utoipa::path(get, path = "/v1/ops/jobs/{id}", tag = "jobs",
    description = "One job, from the hot table or the archive.",
    params(("id" = i64, Path)),
    responses((status = 200, body = JobRow), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_job(
    State(s): State<OpsState>,
    _operator: Operator,
    Path(id): Path<i64>,
) -> Result<Json<JobRow>, ApiError> {
    store::get_job(&s.pool, id)
        .await
        .map_err(db)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("job"))
}

#[utoipa::path(post, path = "/v1/ops/jobs/{id}/redrive", tag = "jobs",
    description = "Runs a dead job again now, with a fresh attempt budget. 409 if it is not dead.",
    params(("id" = i64, Path)),
    responses((status = 200, body = JobRow), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn redrive_job(
    State(s): State<OpsState>,
    Operator(operator): Operator,
    Path(id): Path<i64>,
) -> Result<Json<JobRow>, ApiError> {
    if !store::redrive(&s.pool, id, None).await.map_err(db)? {
        return match store::get_job(&s.pool, id).await.map_err(db)? {
            None => Err(ApiError::not_found("job")),
            Some(j) => Err(ApiError::new(
                ErrorCode::Conflict,
                format!("job {id} is {}, not dead", j.state),
            )),
        };
    }
    tracing::warn!(job_id = id, %operator, "dead job redriven by an operator");
    let job = store::get_job(&s.pool, id).await.map_err(db)?;
    job.map(Json).ok_or_else(|| ApiError::not_found("job"))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WhoAmI {
    /// The operator the staff token names: what every audit row and log line records.
    pub operator: String,
}

#[utoipa::path(get, path = "/v1/ops/whoami", tag = "jobs",
    description = "The operator the bearer's staff token names (the console shows it).",
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
async fn whoami(Operator(operator): Operator) -> Json<WhoAmI> {
    Json(WhoAmI { operator })
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PausedKinds {
    pub paused: Vec<String>,
}

#[utoipa::path(get, path = "/v1/ops/kinds/paused", tag = "jobs",
    description = "Job kinds no instance claims until resumed.",
    responses((status = 200, body = PausedKinds), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_paused(
    State(s): State<OpsState>,
    _operator: Operator,
) -> Result<Json<PausedKinds>, ApiError> {
    paused(&s).await
}

async fn paused(s: &OpsState) -> Result<Json<PausedKinds>, ApiError> {
    let paused = store::paused_kinds(&s.pool).await.map_err(db)?;
    Ok(Json(PausedKinds { paused }))
}

pub fn check_kind(kind: &str) -> Result<(), ApiError> {
    let ok = kind.len() <= 64
        && kind.starts_with(|c: char| c.is_ascii_lowercase())
        && kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::field("kind", "must look like `order.expire`"))
    }
}

#[utoipa::path(put, path = "/v1/ops/kinds/{kind}/pause", tag = "jobs",
    description = "Stops every instance from claiming jobs of this kind (running ones finish). Idempotent.",
    params(("kind" = String, Path)),
    responses((status = 200, body = PausedKinds), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn pause_kind(
    State(s): State<OpsState>,
    Operator(operator): Operator,
    Path(kind): Path<String>,
) -> Result<Json<PausedKinds>, ApiError> {
    check_kind(&kind)?;
    if store::pause_kind(&s.pool, &kind, &operator)
        .await
        .map_err(db)?
    {
        tracing::warn!(%kind, %operator, "job kind paused by an operator");
    }
    paused(&s).await
}

#[utoipa::path(delete, path = "/v1/ops/kinds/{kind}/pause", tag = "jobs",
    description = "Lets instances claim this kind again. Idempotent.",
    params(("kind" = String, Path)),
    responses((status = 200, body = PausedKinds), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn resume_kind(
    State(s): State<OpsState>,
    Operator(operator): Operator,
    Path(kind): Path<String>,
) -> Result<Json<PausedKinds>, ApiError> {
    check_kind(&kind)?;
    if store::resume_kind(&s.pool, &kind).await.map_err(db)? {
        tracing::warn!(%kind, %operator, "job kind resumed by an operator");
    }
    paused(&s).await
}
