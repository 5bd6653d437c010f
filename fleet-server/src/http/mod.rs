//! The HTTP API (`/api/v1`, JSON), `/metrics` and `/healthz`.
//!
//! Every route is declared once in [`router`] through [`Routes::add`], with the least role it
//! needs ([`guard::Access`]); the declaration is recorded, so a test can check that the OpenAPI
//! document (`openapi.json`, served at `/api/v1/openapi.json`) covers every route with the same
//! `x-min-role`, and [`guard::enforce`] checks it for every request before the handler runs.
//! Errors are `{"error": "..."}` with a 4xx/5xx.

mod bundles;
pub mod dashboard;
mod devices;
mod fleet_admin;
pub mod guard;
mod keyring;
pub mod limit;
mod rollouts;
pub mod views;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::{Json, Router};
use serde_json::json;

use self::guard::Access::{self, Needs, Public};
use self::limit::{AuthFailureLimit, FailureLimiter};
use crate::auth::Role::{Admin, Operator, Viewer};
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
    /// Every route's (method, path, access), as declared in [`routes`].
    pub access: Arc<Vec<Route>>,
    pub auth_limiter: Arc<FailureLimiter>,
}

/// A route: method (lowercase), path pattern, who may call it.
pub type Route = (&'static str, &'static str, Access);

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

/// A router that remembers the (method, path, access) of every route it was given.
pub struct Routes {
    router: Router<App>,
    list: Vec<Route>,
}

impl Routes {
    fn add(
        mut self,
        method: &'static str,
        path: &'static str,
        access: Access,
        mr: MethodRouter<App>,
    ) -> Routes {
        self.router = self.router.route(path, mr);
        self.list.push((method, path, access));
        self
    }
}

fn routes() -> Routes {
    let r = Routes {
        router: Router::new(),
        list: Vec::new(),
    };
    let v = Needs(Viewer);
    let o = Needs(Operator);
    let a = Needs(Admin);
    r.add("get", "/", Public, get(dashboard::index))
        .add("get", "/ui/{file}", Public, get(dashboard::asset))
        .add("get", "/healthz", Public, get(fleet_admin::healthz))
        .add("get", "/metrics", Public, get(fleet_admin::metrics))
        .add(
            "get",
            "/api/v1/openapi.json",
            Public,
            get(fleet_admin::openapi),
        )
        .add("get", "/api/v1/bundles", v, get(bundles::list))
        .add("post", "/api/v1/bundles", o, post(bundles::upload))
        .add("get", "/api/v1/bundles/{id}", v, get(bundles::one))
        .add("get", "/api/v1/whoami", v, get(views::whoami))
        .add("get", "/api/v1/fleet/summary", v, get(views::fleet_summary))
        .add("get", "/api/v1/stream", v, get(views::stream))
        .add(
            "get",
            "/api/v1/bundles/{id}/content",
            Public,
            get(bundles::content),
        )
        .add("get", "/api/v1/devices", v, get(devices::list))
        .add("get", "/api/v1/devices/{id}", v, get(devices::one))
        .add(
            "post",
            "/api/v1/devices/{id}/stage",
            o,
            post(devices::stage),
        )
        .add(
            "post",
            "/api/v1/devices/{id}/revert",
            o,
            post(devices::revert),
        )
        .add(
            "get",
            "/api/v1/devices/{id}/telemetry",
            v,
            get(devices::telemetry),
        )
        .add("get", "/api/v1/events", v, get(fleet_admin::events))
        .add("get", "/api/v1/rollouts", v, get(rollouts::list))
        .add("post", "/api/v1/rollouts", o, post(rollouts::create))
        .add("get", "/api/v1/rollouts/{id}", v, get(rollouts::one))
        .add(
            "get",
            "/api/v1/rollouts/{id}/series",
            v,
            get(views::rollout_series),
        )
        .add(
            "post",
            "/api/v1/rollouts/{id}/{action}",
            o,
            post(rollouts::intervene),
        )
        .add("get", "/api/v1/keyring", v, get(keyring::get_keyring))
        .add("post", "/api/v1/keyring", a, post(keyring::update_keyring))
        .add("get", "/api/v1/tokens", a, get(fleet_admin::tokens))
        .add("post", "/api/v1/tokens", a, post(fleet_admin::create_token))
        .add(
            "delete",
            "/api/v1/tokens/{name}",
            a,
            delete(fleet_admin::delete_token),
        )
}

/// Every (method, path, access) the router serves.
pub fn route_list() -> Vec<Route> {
    routes().list
}

/// The HTTP API and the dashboard over `fleet`.
pub fn router(fleet: Arc<Fleet>, rollouts: Arc<Rollouts>) -> Router {
    let (_never, stop) = tokio::sync::watch::channel(false);
    router_until(fleet, rollouts, stop, AuthFailureLimit::default())
}

/// [`router`] whose long-lived responses end when `stop` becomes `true`, with this limit on
/// failed authentications. Serve it with connect info (`into_make_service_with_connect_info`)
/// so the limit counts per client address; without it every client shares one count.
pub fn router_until(
    fleet: Arc<Fleet>,
    rollouts: Arc<Rollouts>,
    stop: tokio::sync::watch::Receiver<bool>,
    auth_limit: AuthFailureLimit,
) -> Router {
    let Routes { router, list } = routes();
    let app = App {
        fleet,
        rollouts,
        bundle_details: Arc::default(),
        stop,
        access: Arc::new(list),
        auth_limiter: Arc::new(FailureLimiter::new(auth_limit)),
    };
    router
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            guard::enforce,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
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
        for (method, path, access) in route_list() {
            let op = paths.get(path).and_then(|p| p.get(method));
            assert!(op.is_some(), "{method} {path} is missing from openapi.json");
            assert_eq!(
                op.unwrap()["x-min-role"].as_str(),
                Some(access.name()),
                "{method} {path}: openapi.json's x-min-role is not the role the router enforces"
            );
            let public_in_doc = op.unwrap().get("security") == Some(&json!([]));
            assert_eq!(
                public_in_doc,
                access == Public,
                "{method} {path}: 'security: []' must mark exactly the public routes"
            );
        }
        assert_eq!(
            documented,
            route_list().len(),
            "openapi.json documents routes that do not exist"
        );
    }
}
