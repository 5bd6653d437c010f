//! `GET /api/v1/keyring` (viewer) and `POST /api/v1/keyring` (admin): the bundle-signing
//! keyring and its threshold-signed rotations (`crate::keyring`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::json;

use protocol::keys::{Keyring, SignedKeyringUpdate};

use super::{bad_request, ApiResult, App};
use crate::auth::Caller;

fn view(k: &Keyring, updates: usize) -> serde_json::Value {
    let keys: Vec<String> = k.ids().map(|i| i.to_string()).collect();
    json!({"version": k.version, "threshold": k.threshold, "keys": keys, "updates": updates})
}

/// The role each route needs is declared with the route (`super::router`) and enforced by the
/// guard before a handler runs.
pub async fn get_keyring(State(app): State<App>) -> ApiResult<Json<serde_json::Value>> {
    let k = &app.fleet.keyring;
    Ok(Json(view(&k.current(), k.chain().updates.len())))
}

pub async fn update_keyring(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let update: SignedKeyringUpdate = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("not a signed keyring update: {e}")))?;
    let new = app.fleet.update_keyring(update, &caller.name).await?;
    let updates = app.fleet.keyring.chain().updates.len();
    Ok((StatusCode::OK, Json(view(&new, updates))))
}
