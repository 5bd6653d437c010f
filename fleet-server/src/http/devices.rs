//! Device routes: list with filters, one, telemetry, and the stage / revert commands.

use axum::extract::{Path, Query, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use chrono::{DateTime, Utc};
use protocol::telemetry::WindowRecord;
use serde::Deserialize;
use serde_json::json;

use super::{bad_request, ApiResult, App};
use crate::auth::Caller;
use crate::fleet::{DeviceQuery, DeviceView};

/// Default and largest page of `GET /api/v1/devices`.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// Parses `limit`, `offset`, `online`, `q` (search), `model` (`name` or `name@version`),
/// `state` (a model state) and any number of `label=k:v`.
pub fn device_query(raw: Option<&str>) -> Result<DeviceQuery, String> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|e| format!("bad query: {e}"))?;
    let mut q = DeviceQuery {
        limit: DEFAULT_LIMIT,
        ..DeviceQuery::default()
    };
    for (k, v) in pairs {
        match k.as_str() {
            "limit" => {
                q.limit = v
                    .parse()
                    .map_err(|_| format!("limit '{v}' is not a number"))?;
                if q.limit > MAX_LIMIT {
                    return Err(format!(
                        "limit {} is over the maximum of {MAX_LIMIT}",
                        q.limit
                    ));
                }
            }
            "offset" => {
                q.offset = v
                    .parse()
                    .map_err(|_| format!("offset '{v}' is not a number"))?
            }
            "online" => {
                q.online = Some(
                    v.parse()
                        .map_err(|_| format!("online '{v}' is not true or false"))?,
                )
            }
            "q" => q.search = Some(v),
            "model" => q.model = Some(v),
            "state" => {
                if !["trial", "committed", "reverted"].contains(&v.as_str()) {
                    return Err(format!("state '{v}' is not trial, committed or reverted"));
                }
                q.model_state = Some(v)
            }
            "label" => {
                let (lk, lv) = v
                    .split_once(':')
                    .ok_or_else(|| format!("label '{v}' is not KEY:VALUE"))?;
                q.labels.push((lk.to_string(), lv.to_string()));
            }
            other => return Err(format!("unknown query parameter '{other}'")),
        }
    }
    Ok(q)
}

pub async fn list(
    State(app): State<App>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<serde_json::Value>> {
    let q = device_query(raw.as_deref()).map_err(bad_request)?;
    let (devices, total) = app.fleet.devices(&q)?;
    Ok(Json(json!({"devices": devices, "total": total})))
}

pub async fn one(State(app): State<App>, Path(id): Path<String>) -> ApiResult<Json<DeviceView>> {
    Ok(Json(app.fleet.device(&id)?))
}

#[derive(Deserialize)]
pub struct StageBody {
    bundle_id: String,
    #[serde(default)]
    rollout_id: Option<String>,
}

pub async fn stage(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<StageBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) =
        body.map_err(|e| bad_request(format!("body must be {{\"bundle_id\": \"...\"}}: {e}")))?;
    let command_id = app
        .fleet
        .stage(
            &id,
            &body.bundle_id,
            body.rollout_id.as_deref(),
            &caller.name,
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"command_id": command_id})),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct RevertBody {
    model: String,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    rollout_id: Option<String>,
}

pub async fn revert(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<RevertBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) =
        body.map_err(|e| bad_request(format!("body must be {{\"model\": \"...\"}}: {e}")))?;
    let command_id = app
        .fleet
        .revert(
            &id,
            &body.model,
            body.version.as_deref(),
            body.rollout_id.as_deref(),
            &caller.name,
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"command_id": command_id})),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct TelemetryQuery {
    model: Option<String>,
    since: Option<DateTime<Utc>>,
}

pub async fn telemetry(
    State(app): State<App>,
    Path(id): Path<String>,
    query: Result<Query<TelemetryQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Query(q) = query.map_err(|e| bad_request(e.to_string()))?;
    app.fleet.device(&id)?;
    let windows = app
        .fleet
        .telemetry
        .windows(&id, q.model.as_deref(), q.since);
    let windows: Vec<&WindowRecord> = windows.iter().map(|w| &**w).collect();
    let samples = q
        .model
        .as_deref()
        .map(|m| app.fleet.telemetry.samples(&id, m))
        .unwrap_or_default();
    Ok(Json(
        json!({"device_id": id, "windows": windows, "samples": samples}),
    ))
}

#[cfg(test)]
mod tests {
    use super::device_query;

    #[test]
    fn device_query_takes_repeated_labels_and_refuses_junk() {
        let q = device_query(Some(
            "label=site:a&label=hw%3Api&online=true&limit=5&offset=2",
        ))
        .unwrap();
        assert_eq!(
            q.labels,
            vec![("site".into(), "a".into()), ("hw".into(), "pi".into())]
        );
        assert_eq!((q.online, q.limit, q.offset), (Some(true), 5, 2));
        let q = device_query(Some("q=berlin&model=digits%401.0.0&state=reverted")).unwrap();
        assert_eq!(q.search.as_deref(), Some("berlin"));
        assert_eq!(q.model.as_deref(), Some("digits@1.0.0"));
        assert_eq!(q.model_state.as_deref(), Some("reverted"));
        assert!(device_query(Some("state=asleep")).is_err());
        assert!(device_query(Some("label=nocolon")).is_err());
        assert!(device_query(Some("limit=x")).is_err());
        assert!(device_query(Some("colour=red")).is_err());
        assert!(device_query(Some("limit=100000")).is_err());
    }
}
