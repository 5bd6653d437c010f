//! Routes the dashboard needs beyond the plain records: who am I, the fleet aggregated on the
//! server (so a page over 10 000 devices moves a few kilobytes), a rollout's canary-vs-control
//! series, bundle details read from the stored manifests, and the live stream.
//!
//! The stream (`GET /api/v1/stream`) is server-sent events over a normal authenticated GET: the
//! dashboard reads it with `fetch()` and a `ReadableStream`, so the bearer token travels in the
//! `Authorization` header (an `EventSource` cannot set headers, and a token in the URL would end
//! up in logs and history). Every second the stream looks at the newest stored events and the
//! status / telemetry message counters, and sends one `update` when something changed.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Extension;
use axum::Json;
use chrono::{DateTime, Utc};
use futures_util::stream::Stream;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad_request, ApiResult, App};
use crate::auth::Caller;
use crate::fleet::FleetError;
use crate::rollout::engine::{DeviceState, Rollout};
use crate::rollout::gates::CohortFigures;
use crate::store::{BundleRecord, EventFilter};
use protocol::stats::saturating_sum;

/// `GET /api/v1/whoami`: the token's name and role (the dashboard hides actions from viewers).
pub async fn whoami(Extension(caller): Extension<Caller>) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"name": caller.name, "role": caller.role})))
}

#[derive(Default)]
struct Count {
    total: u64,
    online: u64,
}

impl Count {
    fn add(&mut self, online: bool) {
        self.total += 1;
        self.online += u64::from(online);
    }
}

#[derive(Default)]
struct VersionCount {
    devices: u64,
    online: u64,
    trial: u64,
    committed: u64,
    reverted: u64,
}

/// Largest number of label (key, value) rows in the summary.
const MAX_LABEL_ROWS: usize = 200;

/// `GET /api/v1/fleet/summary`: device counts by state, target and label; models × versions.
pub async fn fleet_summary(State(app): State<App>) -> ApiResult<Json<Value>> {
    let fleet = app.fleet.clone();
    let summary = tokio::task::spawn_blocking(move || summary(&fleet.store))
        .await
        .map_err(|e| bad_request(e.to_string()))??;
    Ok(Json(summary))
}

/// The fleet summary from the stored devices, rollouts and bundles (one pass over each).
pub fn summary(store: &crate::store::Store) -> Result<Value, FleetError> {
    let devices = store.device_records()?;
    let mut all = Count::default();
    let (mut trial, mut reverted, mut committed, mut without_models) = (0u64, 0u64, 0u64, 0u64);
    let mut by_target: BTreeMap<String, Count> = BTreeMap::new();
    let mut by_label: BTreeMap<(String, String), Count> = BTreeMap::new();
    let mut models: BTreeMap<String, BTreeMap<String, VersionCount>> = BTreeMap::new();
    for d in &devices {
        all.add(d.online);
        let has = |s: &str| d.models.iter().any(|m| m.state == s);
        trial += u64::from(has("trial"));
        reverted += u64::from(has("reverted"));
        committed += u64::from(has("committed"));
        without_models += u64::from(d.models.is_empty());
        by_target
            .entry(d.target.clone().unwrap_or_else(|| "(unknown)".into()))
            .or_default()
            .add(d.online);
        for (k, v) in &d.labels {
            by_label
                .entry((k.clone(), v.clone()))
                .or_default()
                .add(d.online);
        }
        for m in &d.models {
            let c = models
                .entry(m.name.clone())
                .or_default()
                .entry(m.active.clone())
                .or_default();
            c.devices += 1;
            c.online += u64::from(d.online);
            match m.state.as_str() {
                "trial" => c.trial += 1,
                "reverted" => c.reverted += 1,
                _ => c.committed += 1,
            }
        }
    }
    let label_rows = by_label.len();
    let mut labels: Vec<_> = by_label.into_iter().collect();
    labels.sort_by(|a, b| b.1.total.cmp(&a.1.total).then(a.0.cmp(&b.0)));
    labels.truncate(MAX_LABEL_ROWS);
    let rollouts = store.rollout_headers()?;
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for r in &rollouts {
        let state = serde_json::to_value(r.state).unwrap_or_default();
        *by_state
            .entry(state.as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    Ok(json!({
        "generated_at": Utc::now(),
        "devices": {"total": all.total, "online": all.online, "offline": all.total - all.online,
                    "trial": trial, "reverted": reverted, "committed": committed,
                    "without_models": without_models},
        "by_target": by_target.into_iter().map(|(t, c)| json!({
            "target": t, "total": c.total, "online": c.online})).collect::<Vec<_>>(),
        "by_label": labels.into_iter().map(|((k, v), c)| json!({
            "key": k, "value": v, "total": c.total, "online": c.online})).collect::<Vec<_>>(),
        "label_rows": label_rows,
        "models": models.into_iter().map(|(name, versions)| {
            let total: u64 = versions.values().map(|c| c.devices).sum();
            json!({"model": name, "devices": total,
                   "versions": versions.into_iter().map(|(v, c)| json!({
                       "version": v, "devices": c.devices, "online": c.online, "trial": c.trial,
                       "committed": c.committed, "reverted": c.reverted})).collect::<Vec<_>>()})
        }).collect::<Vec<_>>(),
        "rollouts": {"total": rollouts.len(),
                     "active": rollouts.iter().filter(|r| r.state.is_active()).count(),
                     "by_state": by_state},
        "bundles": store.bundles()?.len(),
    }))
}

#[derive(Deserialize)]
pub struct SeriesQuery {
    /// Bucket width in seconds (default: the rollout's span over 60 buckets, at least 1 s).
    bucket: Option<u64>,
}

/// Most buckets a series may have.
const MAX_BUCKETS: i64 = 500;

/// `GET /api/v1/rollouts/{id}/series`: canary vs control figures over time from the telemetry
/// kept in memory, the reverts over time, and the figures of every judged decision.
pub async fn rollout_series(
    State(app): State<App>,
    Path(id): Path<String>,
    query: Result<Query<SeriesQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query.map_err(|e| bad_request(e.to_string()))?;
    let rollout = app.rollouts.get(&id)?;
    let fleet = app.fleet.clone();
    let out = tokio::task::spawn_blocking(move || series(&fleet, &rollout, q.bucket, Utc::now()))
        .await
        .map_err(|e| bad_request(e.to_string()))??;
    Ok(Json(out))
}

fn figures(c: &CohortFigures) -> Value {
    json!({"devices": c.devices, "requests": c.requests, "errors": c.errors,
           "error_rate": c.error_rate(), "p95_ms": c.p95_ms(),
           "mean_confidence": c.mean_confidence()})
}

fn class_psi(canary: &CohortFigures, control: &CohortFigures) -> Option<f64> {
    let n = canary.class_counts.len().max(control.class_counts.len());
    if n == 0 || canary.requests == 0 || control.requests == 0 {
        return None;
    }
    let pad = |v: &[u64]| {
        let mut v = v.to_vec();
        v.resize(n, 0);
        v
    };
    let (a, b) = (pad(&control.class_counts), pad(&canary.class_counts));
    (saturating_sum(&a) > 0 && saturating_sum(&b) > 0).then(|| protocol::stats::psi(&a, &b))
}

/// The series of one rollout at `now`.
pub fn series(
    fleet: &crate::fleet::Fleet,
    r: &Rollout,
    bucket: Option<u64>,
    now: DateTime<Utc>,
) -> Result<Value, FleetError> {
    let from = r.created_at;
    let to = now.max(from + chrono::Duration::seconds(1));
    let span = (to - from).num_seconds().max(1);
    let bucket = match bucket {
        Some(0) => return Err(FleetError::BadRequest("bucket must be at least 1 s".into())),
        Some(b) => b as i64,
        None => (span + 59) / 60,
    }
    .max((span + MAX_BUCKETS - 1) / MAX_BUCKETS)
    .max(1);
    let buckets = ((span + bucket - 1) / bucket).max(1) as usize;
    let selected: HashMap<String, bool> = fleet
        .store
        .device_records()?
        .into_iter()
        .filter(|d| r.spec.selector.matches(&d.labels))
        .map(|d| (d.id.clone(), true))
        .collect();
    let mut canary = vec![CohortFigures::default(); buckets];
    let mut control = vec![CohortFigures::default(); buckets];
    let mut canary_devices: Vec<std::collections::HashSet<String>> =
        vec![Default::default(); buckets];
    let mut control_devices = canary_devices.clone();
    let version = r.version();
    fleet
        .telemetry
        .for_each_window(r.model(), Some(from), |device, w| {
            let i = (((w.end - from).num_milliseconds() / 1000) / bucket)
                .clamp(0, buckets as i64 - 1) as usize;
            let in_rollout = r.devices.contains_key(device);
            if in_rollout && w.version == version {
                canary[i].add_window(w);
                if !canary_devices[i].contains(device) {
                    canary_devices[i].insert(device.to_string());
                }
            } else if !in_rollout && selected.contains_key(device) && w.version != version {
                control[i].add_window(w);
                if !control_devices[i].contains(device) {
                    control_devices[i].insert(device.to_string());
                }
            }
        });
    let mut reverts: Vec<DateTime<Utc>> = r
        .devices
        .values()
        .filter(|p| p.state == DeviceState::Reverted)
        .map(|p| p.since)
        .collect();
    reverts.sort();
    let points: Vec<Value> = (0..buckets)
        .map(|i| {
            let end = from + chrono::Duration::seconds(bucket * (i as i64 + 1));
            canary[i].devices = canary_devices[i].len();
            control[i].devices = control_devices[i].len();
            json!({"t": end.min(to), "canary": figures(&canary[i]), "control": figures(&control[i]),
                   "prediction_psi": class_psi(&canary[i], &control[i]),
                   "reverts": reverts.iter().filter(|t| **t <= end).count()})
        })
        .collect();
    let decisions: Vec<Value> = r
        .decisions
        .iter()
        .map(|d| {
            let mut v = json!({"time": d.time, "stage": d.stage, "action": d.action,
                               "reason": d.reason});
            if let Some(j) = &d.judgement {
                let psi = j
                    .gates
                    .iter()
                    .find(|g| g.gate == "prediction_psi")
                    .and_then(|g| g.value);
                v["verdict"] = json!(j.verdict);
                v["canary"] = figures(&j.canary);
                v["control"] = j.control.as_ref().map(figures).unwrap_or(Value::Null);
                v["prediction_psi"] = json!(psi);
                v["reverts"] = json!(j.canary.reverts);
                v["install_failures"] = json!(j.canary.install_failures);
                v["gates"] = json!(j.gates);
            }
            v
        })
        .collect();
    Ok(
        json!({"id": r.id, "model": r.model(), "version": version, "from": from, "to": to,
              "bucket_seconds": bucket, "points": points, "decisions": decisions,
              "reverts": reverts.len()}),
    )
}

/// The manifest fields the bundles page shows (quantization, accuracy or AUC, task, targets), read
/// once per bundle from the stored file's head (verified at upload) and cached; `GET
/// /api/v1/bundles` adds them to each record.
pub fn bundle_details(app: &App, b: &BundleRecord) -> Value {
    if let Some(v) = app
        .bundle_details
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&b.id)
    {
        return v.clone();
    }
    let read = || -> Result<protocol::manifest::Manifest, String> {
        let mut f = std::fs::File::open(app.fleet.files.path(&b.id)).map_err(|e| e.to_string())?;
        let head = protocol::bundle::read_head(&mut f, &protocol::bundle::Limits::default())
            .map_err(|e| e.to_string())?;
        head.manifest().map_err(|e| e.to_string())
    };
    let v = match read() {
        Ok(m) => {
            let quality = m.quantization.record().map(|r| &r.quality);
            let task = match &m.task {
                protocol::manifest::Task::Classification { classes, .. } => {
                    json!({"kind": "classification", "classes": classes})
                }
                protocol::manifest::Task::Regression { .. } => json!({"kind": "regression"}),
            };
            json!({"quantization": m.quantization.mode(),
                   "accuracy": quality.and_then(|q| q.accuracy).or(m.baseline.accuracy),
                   "float_accuracy": quality.and_then(|q| q.float_accuracy),
                   "auc": quality.and_then(|q| q.auc).or(m.baseline.auc),
                   "float_auc": quality.and_then(|q| q.float_auc),
                   "accuracy_drop": quality.and_then(|q| q.accuracy_drop),
                   "task": task, "targets": m.targets, "created_at": m.created_at,
                   "reference_p95_us": m.baseline.latency.p95_us})
        }
        Err(e) => json!({"details_error": e}),
    };
    app.bundle_details
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(b.id.clone(), v.clone());
    v
}

/// How often the stream looks for changes.
const STREAM_POLL: Duration = Duration::from_secs(1);
/// Most event summaries in one update.
const STREAM_EVENTS: usize = 200;

struct StreamState {
    app: App,
    last_seq: u64,
    telemetry: u64,
    status: u64,
    first: bool,
}

/// `GET /api/v1/stream`: server-sent events, `hello` at once and then an `update` whenever
/// events were stored or status / telemetry messages arrived (at most one a second).
pub async fn stream(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let last_seq = app
        .fleet
        .store
        .events(&EventFilter::default(), 1)
        .map_err(FleetError::from)?
        .first()
        .map_or(0, |e| e.seq);
    let state = StreamState {
        telemetry: app.fleet.metrics.telemetry_received.load(Relaxed),
        status: app.fleet.metrics.status_received.load(Relaxed),
        app,
        last_seq,
        first: true,
    };
    tracing::debug!(token = %caller.name, "dashboard stream opened");
    let s = futures_util::stream::unfold(state, |mut st| async move {
        if st.first {
            st.first = false;
            let hello = json!({"seq": st.last_seq, "time": Utc::now()});
            return Some((
                Ok(SseEvent::default().event("hello").data(hello.to_string())),
                st,
            ));
        }
        loop {
            tokio::time::sleep(STREAM_POLL).await;
            if *st.app.stop.borrow() {
                return None;
            }
            let telemetry = st.app.fleet.metrics.telemetry_received.load(Relaxed);
            let status = st.app.fleet.metrics.status_received.load(Relaxed);
            let events = st
                .app
                .fleet
                .store
                .events(&EventFilter::default(), STREAM_EVENTS)
                .unwrap_or_default();
            let new: Vec<Value> = events
                .iter()
                .filter(|e| e.seq > st.last_seq)
                .map(|e| {
                    json!({"seq": e.seq, "kind": e.kind, "device_id": e.device_id,
                           "rollout_id": e.rollout_id, "model": e.model, "version": e.version})
                })
                .collect();
            if new.is_empty() && telemetry == st.telemetry && status == st.status {
                continue;
            }
            let update = json!({"events": new, "telemetry": telemetry - st.telemetry,
                                "status": status - st.status, "time": Utc::now()});
            st.last_seq = events
                .first()
                .map_or(st.last_seq, |e| e.seq.max(st.last_seq));
            st.telemetry = telemetry;
            st.status = status;
            return Some((
                Ok(SseEvent::default().event("update").data(update.to_string())),
                st,
            ));
        }
    });
    Ok(Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DeviceRecord, Store};
    use protocol::link::ModelSummary;

    /// 10 000 devices: the summary is one pass and answers in well under a second (debug build).
    #[test]
    fn the_summary_of_ten_thousand_devices_is_quick_and_small() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let now = Utc::now();
        store
            .batch(|b| {
                for i in 0..10_000 {
                    let d = DeviceRecord {
                        id: format!("dev-{i:05}"),
                        online: i % 10 != 0,
                        last_seen: now,
                        first_seen: now,
                        status_time: now,
                        labels: [
                            ("site".to_string(), format!("site-{}", i % 40)),
                            (
                                "hw".to_string(),
                                ["pi4", "pi5", "jetson"][i % 3].to_string(),
                            ),
                        ]
                        .into(),
                        target: Some(["aarch64", "x86_64"][i % 2].into()),
                        agent_version: None,
                        models: vec![ModelSummary {
                            name: "digits".into(),
                            active: ["1.0.0", "1.1.0"][i % 2].into(),
                            previous: None,
                            state: ["committed", "trial", "reverted", "committed"][i % 4].into(),
                            security_version: 1,
                            bundle_sha256: String::new(),
                            compute: None,
                        }],
                    };
                    let id = d.id.clone();
                    b.update_device(&id, |_| (Some(d), vec![])).unwrap();
                }
            })
            .unwrap();
        let t = std::time::Instant::now();
        let s = summary(&store).unwrap();
        let took = t.elapsed();
        let size = s.to_string().len();
        eprintln!("summary of 10 000 devices: {took:?}, {size} bytes");
        assert_eq!(s["devices"]["total"], 10_000);
        assert_eq!(s["devices"]["online"], 9_000);
        assert_eq!(s["devices"]["trial"], 2_500);
        assert_eq!(s["devices"]["reverted"], 2_500);
        assert_eq!(s["by_label"].as_array().unwrap().len(), 43);
        assert_eq!(s["models"][0]["versions"][1]["devices"], 5_000);
        assert!(size < 10_000, "{size} bytes");
        assert!(took < std::time::Duration::from_secs(3), "{took:?}");
    }
}
