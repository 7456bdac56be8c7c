//! The scheduler's ops API (an operator's staff token; documented in `/openapi.json`): the job routes every
//! engine binary serves (`job_engine::ops`), and the recurring schedules.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use job_engine::ops::{check_kind, db, OpsState};
use job_engine::schedule::{self, Put, Schedule, ScheduleDef};
use serde::Serialize;
use service_kit::auth::Operator;
use service_kit::error::ErrorBody;
use service_kit::http::{ApiJson, BearerAuth};
use service_kit::{ApiError, ErrorCode};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "bar-fulfillment scheduler", description = "Runs the delayed jobs and recurring schedules of the order flow; operators inspect, redrive, pause and schedule here."),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// Every ops route with its OpenAPI operation, plus `GET /openapi.json`.
pub fn router(state: OpsState) -> Router {
    let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_schedules))
        .routes(routes!(get_schedule, put_schedule, delete_schedule))
        .with_state(state.clone())
        .merge(job_engine::ops::routes(state))
        .split_for_parts();
    let doc = service_kit::http::document_auth(doc);
    api.route("/openapi.json", get(move || async move { Json(doc) }))
}

#[utoipa::path(delete, path = "/v1/ops/schedules/{name}", tag = "schedules",
    description = "Removes a schedule (the jobs it already wrote stay). 404 if there is none.",
    params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn delete_schedule(
    State(s): State<OpsState>,
    Operator(operator): Operator,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !schedule::delete(&s.pool, &name).await.map_err(db)? {
        return Err(ApiError::not_found("schedule"));
    }
    tracing::warn!(schedule = %name, %operator, "schedule removed by an operator");
    Ok(StatusCode::NO_CONTENT)
}

/// The kinds an operator may schedule: maintenance that takes nothing from its payload. A
/// refund or a stock deduction scheduled by hand would move money or stock on a payload
/// nobody checked.
pub const SCHEDULABLE: [&str; 3] = [
    fulfillment::events::JOB_STOCK_RECONCILE,
    fulfillment::events::JOB_OUTBOX_PRUNE,
    fulfillment::events::JOB_PRUNE_LOST_ANSWERS,
];

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ScheduleView {
    #[serde(flatten)]
    pub schedule: Schedule,
    /// The next occurrences after the cursor, in UTC.
    pub next: Vec<DateTime<Utc>>,
}

impl From<Schedule> for ScheduleView {
    fn from(s: Schedule) -> Self {
        let next = s
            .def()
            .check()
            .map(|(cal, _)| cal.between(s.cursor, s.cursor + chrono::Duration::days(400), 3))
            .unwrap_or_default();
        ScheduleView { schedule: s, next }
    }
}

#[utoipa::path(get, path = "/v1/ops/schedules", tag = "schedules",
    responses((status = 200, body = [ScheduleView]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_schedules(
    State(s): State<OpsState>,
    _operator: Operator,
) -> Result<Json<Vec<ScheduleView>>, ApiError> {
    let all = schedule::list(&s.pool).await.map_err(db)?;
    Ok(Json(all.into_iter().map(ScheduleView::from).collect()))
}

#[utoipa::path(get, path = "/v1/ops/schedules/{name}", tag = "schedules",
    params(("name" = String, Path)),
    responses((status = 200, body = ScheduleView), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_schedule(
    State(s): State<OpsState>,
    _operator: Operator,
    Path(name): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    schedule::get(&s.pool, &name)
        .await
        .map_err(db)?
        .map(|s| Json(s.into()))
        .ok_or_else(|| ApiError::not_found("schedule"))
}

#[utoipa::path(put, path = "/v1/ops/schedules/{name}", tag = "schedules",
    description = "Creates (201) or replaces (200) a schedule. A new one fires from now on; an edited one keeps what it already wrote. 400 names what is wrong with a recurrence, zone or policy, or a kind that may not be scheduled (only stock.reconcile, outbox.prune and orders.prune_lost_answers). 403 for a store token.",
    params(("name" = String, Path)),
    request_body = ScheduleDef,
    responses((status = 200, body = ScheduleView), (status = 201, body = ScheduleView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn put_schedule(
    State(s): State<OpsState>,
    Operator(operator): Operator,
    Path(name): Path<String>,
    ApiJson(def): ApiJson<ScheduleDef>,
) -> Result<(StatusCode, Json<ScheduleView>), ApiError> {
    let name_ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if !name_ok {
        return Err(ApiError::field(
            "name",
            "must look like `stock-reconcile-nightly`",
        ));
    }
    check_kind(&def.kind)?;
    if !SCHEDULABLE.contains(&def.kind.as_str()) {
        return Err(ApiError::field(
            "kind",
            format!(
                "only maintenance kinds may be scheduled ({}): a job that moves money or \
                 stock is written by the order flow, never from a payload an operator types",
                SCHEDULABLE.join(", ")
            ),
        ));
    }
    // the cursor starts at the database's now, not this instance's
    let now = postgres_store::database_now(&s.pool).await.map_err(db)?;
    let put = schedule::put(&s.pool, &name, &def, &operator, now, false)
        .await
        .map_err(db)?
        .map_err(|e| ApiError::new(ErrorCode::Validation, e.to_string()))?;
    tracing::warn!(schedule = %name, %operator, ?put, "schedule written by an operator");
    let row = schedule::get(&s.pool, &name)
        .await
        .map_err(db)?
        .ok_or_else(|| ApiError::not_found("schedule"))?;
    let status = if put == Put::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(row.into())))
}
