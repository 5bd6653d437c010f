//! The HTTP API (`/api/v1`, JSON), `/metrics` and `/healthz`.
//!
//! Every route is declared once in [`router`] through [`Routes::add`], which also records it,
//! so a test can check that the OpenAPI document (`openapi.json`, served at
//! `/api/v1/openapi.json`) covers every route. Handlers authenticate explicitly with
//! [`App::caller`] and the role the route needs; errors are `{"error": "..."}` with a 4xx/5xx.

mod bundles;
pub mod dashboard;
mod devices;
mod fleet_admin;
mod keyring;
mod rollouts;
pub mod views;

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::{Json, Router};
use serde_json::json;

use crate::auth::{Caller, Role};
use crate::fleet::{Fleet, FleetError};
use crate::rollout::driver::Rollouts;

/// Largest request body (bundle uploads).
pub const MAX_BODY: usize = 1 << 30;

/// The OpenAPI 3 document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

#[derive(Clone)]
pub struct App {
    pub fleet: Arc<Fleet>,
    pub rollouts: Arc<Rollouts>,
    /// Manifest fields of stored bundles (files never change), for the bundles page.
    pub bundle_details: Arc<RwLock<HashMap<String, serde_json::Value>>>,
    /// Becomes `true` when the server stops: long-lived responses (the stream) end then, so a
    /// graceful shutdown does not wait for a browser tab.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// An API error: a status and a message, answered as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> ApiError {
        let status = match &e {
            FleetError::NotFound { .. } => StatusCode::NOT_FOUND,
            FleetError::BadRequest(_) | FleetError::Verify(_) => StatusCode::BAD_REQUEST,
            FleetError::Conflict(_) => StatusCode::CONFLICT,
            FleetError::Mqtt(_) => StatusCode::SERVICE_UNAVAILABLE,
            FleetError::Keyring(crate::keyring::KeyringError::Refused(_)) => {
                StatusCode::BAD_REQUEST
            }
            FleetError::Store(_) | FleetError::Files(_) | FleetError::Keyring(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError(status, e.to_string())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

pub fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

impl App {
    /// The caller behind the request's bearer token, if its role is at least `need`.
    pub fn caller(&self, headers: &HeaderMap, need: Role) -> ApiResult<Caller> {
        let unauthorized = |why: &str| {
            self.fleet.metrics.http_unauthorized.fetch_add(1, Relaxed);
            ApiError(StatusCode::UNAUTHORIZED, why.to_string())
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized(
                "missing Authorization header (expected 'Bearer TOKEN')",
            ));
        };
        let Some(secret) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
            return Err(unauthorized("Authorization header is not 'Bearer TOKEN'"));
        };
        let Some(caller) = self.fleet.authenticate(secret.trim()) else {
            return Err(unauthorized("unknown token"));
        };
        if caller.role < need {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "token '{}' has role {}; this needs role {need}",
                    caller.name, caller.role
                ),
            ));
        }
        Ok(caller)
    }
}

/// A router that remembers the (method, path) of every route it was given.
pub struct Routes {
    router: Router<App>,
    list: Vec<(&'static str, &'static str)>,
}

impl Routes {
    fn add(mut self, method: &'static str, path: &'static str, mr: MethodRouter<App>) -> Routes {
        self.router = self.router.route(path, mr);
        self.list.push((method, path));
        self
    }
}

fn routes() -> Routes {
    let r = Routes {
        router: Router::new(),
        list: Vec::new(),
    };
    r.add("get", "/", get(dashboard::index))
        .add("get", "/ui/{file}", get(dashboard::asset))
        .add("get", "/healthz", get(fleet_admin::healthz))
        .add("get", "/metrics", get(fleet_admin::metrics))
        .add("get", "/api/v1/openapi.json", get(fleet_admin::openapi))
        .add("get", "/api/v1/bundles", get(bundles::list))
        .add("post", "/api/v1/bundles", post(bundles::upload))
        .add("get", "/api/v1/bundles/{id}", get(bundles::one))
        .add("get", "/api/v1/whoami", get(views::whoami))
        .add("get", "/api/v1/fleet/summary", get(views::fleet_summary))
        .add("get", "/api/v1/stream", get(views::stream))
        .add("get", "/api/v1/bundles/{id}/content", get(bundles::content))
        .add("get", "/api/v1/devices", get(devices::list))
        .add("get", "/api/v1/devices/{id}", get(devices::one))
        .add("post", "/api/v1/devices/{id}/stage", post(devices::stage))
        .add("post", "/api/v1/devices/{id}/revert", post(devices::revert))
        .add(
            "get",
            "/api/v1/devices/{id}/telemetry",
            get(devices::telemetry),
        )
        .add("get", "/api/v1/events", get(fleet_admin::events))
        .add("get", "/api/v1/rollouts", get(rollouts::list))
        .add("post", "/api/v1/rollouts", post(rollouts::create))
        .add("get", "/api/v1/rollouts/{id}", get(rollouts::one))
        .add(
            "get",
            "/api/v1/rollouts/{id}/series",
            get(views::rollout_series),
        )
        .add(
            "post",
            "/api/v1/rollouts/{id}/{action}",
            post(rollouts::intervene),
        )
        .add("get", "/api/v1/keyring", get(keyring::get_keyring))
        .add("post", "/api/v1/keyring", post(keyring::update_keyring))
        .add("get", "/api/v1/tokens", get(fleet_admin::tokens))
        .add("post", "/api/v1/tokens", post(fleet_admin::create_token))
        .add(
            "delete",
            "/api/v1/tokens/{name}",
            delete(fleet_admin::delete_token),
        )
}

/// Every (method, path) the router serves.
pub fn route_list() -> Vec<(&'static str, &'static str)> {
    routes().list
}

/// The HTTP API and the dashboard over `fleet`.
pub fn router(fleet: Arc<Fleet>, rollouts: Arc<Rollouts>) -> Router {
    let (_never, stop) = tokio::sync::watch::channel(false);
    router_until(fleet, rollouts, stop)
}

/// [`router`] whose long-lived responses end when `stop` becomes `true`.
pub fn router_until(
    fleet: Arc<Fleet>,
    rollouts: Arc<Rollouts>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Router {
    routes()
        .router
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(App {
            fleet,
            rollouts,
            bundle_details: Arc::default(),
            stop,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_in_the_openapi_document() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().unwrap();
        let mut documented = 0;
        for (path, ops) in paths {
            documented += ops.as_object().unwrap().len();
            let _ = path;
        }
        for (method, path) in route_list() {
            assert!(
                paths.get(path).and_then(|p| p.get(method)).is_some(),
                "{method} {path} is missing from openapi.json"
            );
        }
        assert_eq!(
            documented,
            route_list().len(),
            "openapi.json documents routes that do not exist"
        );
    }
}
