//! Rollout routes: create, list, one (with cohorts, figures and decisions), and the
//! pause / resume / abort / rollback interventions.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Extension;
use axum::Json;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{bad_request, ApiResult, App};
use crate::auth::Caller;
use crate::rollout::driver::Intervention;
use crate::rollout::engine::{DeviceState, Rollout};
use crate::rollout::spec::{RolloutSpec, Stage};

pub async fn create(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<RolloutView>)> {
    let spec: RolloutSpec =
        serde_json::from_slice(&body).map_err(|e| bad_request(format!("rollout request: {e}")))?;
    let rollout = app.rollouts.create(spec, &caller.name).await?;
    // Start it now rather than at the next tick.
    app.rollouts.tick().await?;
    let rollout = app.rollouts.get(&rollout.id)?;
    Ok((StatusCode::CREATED, Json(view(&app, rollout))))
}

pub async fn list(State(app): State<App>) -> ApiResult<Json<Value>> {
    let rollouts: Vec<Value> = app
        .rollouts
        .list()?
        .iter()
        .map(|(r, devices)| {
            json!({"id": r.id, "state": r.state, "bundle_id": r.bundle.bundle_id,
                   "model": r.model(), "version": r.version(), "stage": r.stage,
                   "stages": r.spec.stages, "created_at": r.created_at,
                   "created_by": r.created_by, "devices": devices,
                   "last_decision": r.decisions.last()})
        })
        .collect();
    Ok(Json(json!({ "rollouts": rollouts })))
}

/// Query of `GET /api/v1/rollouts/{id}`.
#[derive(Debug, Deserialize)]
pub struct OneQuery {
    /// `false`: leave out the `devices` map (one entry per device of the rollout); the
    /// `cohorts` counts are there either way. For polling a large rollout's progress.
    devices: Option<bool>,
}

pub async fn one(
    State(app): State<App>,
    Path(id): Path<String>,
    query: Result<Query<OneQuery>, QueryRejection>,
) -> ApiResult<Json<RolloutView>> {
    let Query(q) = query.map_err(|e| bad_request(e.to_string()))?;
    let mut shown = view(&app, app.rollouts.get(&id)?);
    shown.devices = q.devices.unwrap_or(true);
    Ok(Json(shown))
}

pub async fn intervene(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Json<RolloutView>> {
    let what: Intervention = action.parse()?;
    let rollout = app.rollouts.intervene(&id, what, &caller.name).await?;
    if what == Intervention::Rollback || what == Intervention::Resume {
        app.rollouts.tick().await?;
    }
    Ok(Json(view(&app, app.rollouts.get(&rollout.id)?)))
}

/// A rollout as the API shows it: the stored record plus cohort counts. Serialised straight
/// from the rollout (not through a `serde_json::Value` of ten thousand device entries).
pub struct RolloutView {
    rollout: Arc<Rollout>,
    cohorts: Value,
    /// Whether the `devices` map is shown.
    devices: bool,
}

impl Serialize for RolloutView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shown<'a> {
            #[serde(flatten)]
            rollout: &'a Rollout,
            model: &'a str,
            version: &'a str,
            current_stage: Option<&'a Stage>,
            cohorts: &'a Value,
        }
        let r = &*self.rollout;
        let header;
        let shown = Shown {
            rollout: if self.devices {
                r
            } else {
                header = r.without_devices();
                &header
            },
            model: r.model(),
            version: r.version(),
            current_stage: r.spec.stages.get(r.stage),
            cohorts: &self.cohorts,
        };
        if self.devices {
            return shown.serialize(s);
        }
        // Without the devices: a small value, from which the (empty) map is taken out.
        let mut v = serde_json::to_value(shown).map_err(serde::ser::Error::custom)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("devices");
        }
        v.serialize(s)
    }
}

fn view(app: &App, r: Arc<Rollout>) -> RolloutView {
    let count = |s: DeviceState| r.devices.values().filter(|p| p.state == s).count();
    let selected = app
        .fleet
        .store
        .device_records()
        .map(|all| {
            all.iter()
                .filter(|d| r.spec.selector.matches(&d.labels))
                .count()
        })
        .unwrap_or(0);
    let cohorts = json!({
        "selected": selected,
        "canary": {
            "devices": r.devices.len(),
            "staged": count(DeviceState::Staged),
            "installed": count(DeviceState::Installed),
            "failed": count(DeviceState::Failed),
            "reverted": count(DeviceState::Reverted),
            "rolled_back": count(DeviceState::RolledBack),
        },
        "control": {"devices": selected.saturating_sub(r.devices.len())},
    });
    RolloutView {
        rollout: r,
        cohorts,
        devices: true,
    }
}
