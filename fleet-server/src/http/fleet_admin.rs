//! Events, tokens, metrics, health and the OpenAPI document.

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{bad_request, ApiResult, App, OPENAPI};
use crate::auth::{Caller, Role};
use crate::store::EventFilter;

/// Default and largest number of events per `GET /api/v1/events`.
pub const DEFAULT_EVENTS: usize = 100;
pub const MAX_EVENTS: usize = 10_000;

pub async fn healthz(State(app): State<App>) -> Json<serde_json::Value> {
    Json(json!({"ok": true, "mqtt_connected": app.fleet.mqtt_connected()}))
}

pub async fn metrics(State(app): State<App>) -> Response {
    let fleet = app.fleet.clone();
    let text = tokio::task::spawn_blocking(move || fleet.render_metrics())
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[derive(Deserialize)]
pub struct EventsQuery {
    limit: Option<usize>,
    device_id: Option<String>,
    rollout_id: Option<String>,
    kind: Option<String>,
}

pub async fn events(
    State(app): State<App>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Query(q) = query.map_err(|e| bad_request(e.to_string()))?;
    let limit = q.limit.unwrap_or(DEFAULT_EVENTS);
    if limit > MAX_EVENTS {
        return Err(bad_request(format!(
            "limit {limit} is over the maximum of {MAX_EVENTS}"
        )));
    }
    let filter = EventFilter {
        device_id: q.device_id,
        rollout_id: q.rollout_id,
        kind: q.kind,
    };
    let fleet = app.fleet.clone();
    let events = tokio::task::spawn_blocking(move || fleet.events(&filter, limit))
        .await
        .map_err(|e| super::ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(json!({ "events": events })))
}

pub async fn tokens(State(app): State<App>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(json!({"tokens": app.fleet.token_list()?})))
}

#[derive(Deserialize)]
pub struct NewToken {
    name: String,
    role: Role,
}

pub async fn create_token(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<NewToken>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body.map_err(|e| {
        bad_request(format!(
            "body must be {{\"name\": \"...\", \"role\": \"viewer|operator|admin\"}}: {e}"
        ))
    })?;
    let secret = app
        .fleet
        .create_token(&body.name, body.role, &caller.name)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": body.name, "role": body.role, "token": secret})),
    )
        .into_response())
}

pub async fn delete_token(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    app.fleet.delete_token(&name, &caller.name)?;
    Ok(StatusCode::NO_CONTENT)
}
