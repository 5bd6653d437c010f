//! The agent's local HTTP API: Open Inference Protocol v2 for applications, `/metrics` for
//! Prometheus, and the admin API (`/admin/v1`) that `fleet-agent install --agent` uses.
//!
//! Handlers stay thin: inference is decoded, run and encoded on the inference pool, installs run
//! on a blocking thread, and every error is answered as `{"error": "..."}` with a 4xx/5xx status.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::agent::{Agent, AgentError};
use crate::oip;

/// Largest request body accepted (bundles are posted to the admin API).
pub const MAX_BODY: usize = 1 << 30;

#[derive(Clone)]
struct App {
    agent: Arc<Agent>,
    admin_token: Option<Arc<str>>,
}

/// The router for `agent`; `admin_token` (if set) guards `/admin/v1`.
pub fn router(agent: Arc<Agent>, admin_token: Option<String>) -> Router {
    crate::watch::spawn(&agent);
    let app = App {
        agent,
        admin_token: admin_token.map(Into::into),
    };
    let admin = Router::new()
        .route("/admin/v1/bundles", post(install))
        .route("/admin/v1/status", get(status))
        .route("/admin/v1/models/{name}/revert", post(revert))
        .route("/admin/v1/models/{name}/feedback", post(feedback))
        .route("/admin/v1/events", get(events))
        .layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_version_metadata),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version),
        )
        .route("/metrics", get(metrics))
        .merge(admin)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    let body = oip::error_body(&message.to_string());
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn ready(State(app): State<App>) -> StatusCode {
    if app.agent.registry.is_empty() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn server_metadata() -> Json<serde_json::Value> {
    Json(
        json!({"name": "modelfleet-agent", "version": env!("CARGO_PKG_VERSION"),
                "extensions": ["binary_tensor_data"]}),
    )
}

fn metadata(m: &crate::serving::ServingModel) -> serde_json::Value {
    let specs = |specs: &[protocol::manifest::TensorSpec]| {
        specs
            .iter()
            .map(
                |s| json!({"name": s.name, "datatype": s.dtype.oip_name(), "shape": s.oip_shape()}),
            )
            .collect::<Vec<_>>()
    };
    // OIP's `platform` names the runtime and the model's format (as in `onnxruntime_onnx`).
    let platform = match m.manifest.model_format {
        protocol::manifest::ModelFormat::Onnx => "tract_onnx",
        protocol::manifest::ModelFormat::Nnef => "tract_nnef",
    };
    json!({"name": m.name, "versions": [m.version()], "platform": platform,
           "inputs": specs(&m.manifest.inputs), "outputs": specs(&m.manifest.outputs)})
}

async fn model_metadata(State(app): State<App>, Path(name): Path<String>) -> Response {
    match app.agent.registry.get(&name) {
        Some(m) => Json(metadata(&m)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("unknown model '{name}'")),
    }
}

async fn model_version_metadata(
    State(app): State<App>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    match app.agent.registry.get(&name) {
        Some(m) if m.version() == version => Json(metadata(&m)).into_response(),
        Some(m) => error(
            StatusCode::NOT_FOUND,
            format!(
                "model '{name}' serves version {}, not {version}",
                m.version()
            ),
        ),
        None => error(StatusCode::NOT_FOUND, format!("unknown model '{name}'")),
    }
}

async fn model_ready(State(app): State<App>, Path(name): Path<String>) -> Response {
    match app.agent.registry.get(&name) {
        Some(_) => StatusCode::OK.into_response(),
        None => error(StatusCode::NOT_FOUND, format!("unknown model '{name}'")),
    }
}

async fn infer(
    State(app): State<App>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    run_inference(app, name, None, headers, body).await
}

async fn infer_version(
    State(app): State<App>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    run_inference(app, name, Some(version), headers, body).await
}

async fn run_inference(
    app: App,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Take the model now: this request finishes on it even if a swap happens meanwhile.
    let Some(model) = app.agent.registry.get(&name) else {
        return error(StatusCode::NOT_FOUND, format!("unknown model '{name}'"));
    };
    if let Some(v) = version.filter(|v| v != model.version()) {
        return error(
            StatusCode::NOT_FOUND,
            format!("model '{name}' serves version {}, not {v}", model.version()),
        );
    }
    let header_len = match headers.get("inference-header-content-length") {
        None => None,
        Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()) {
            Some(n) => Some(n),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "Inference-Header-Content-Length is not a non-negative integer",
                )
            }
        },
    };
    let job = move || serve_request(&model, &body, header_len);
    let pending = match app.agent.pool.submit(job) {
        Ok(p) => p,
        Err(full) => return error(StatusCode::SERVICE_UNAVAILABLE, full),
    };
    match pending.await {
        Ok(Ok(encoded)) => {
            let mut response = encoded.body.into_response();
            let h = response.headers_mut();
            match encoded.header_len {
                Some(n) => {
                    h.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    h.insert("inference-header-content-length", HeaderValue::from(n));
                }
                None => {
                    h.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                }
            }
            response
        }
        Ok(Err((status, message))) => error(status, message),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "inference worker failed"),
    }
}

/// One inference request on `model`, as an inference worker runs it: decode, run, encode, then
/// record it in the request metrics and the health figures.
pub fn serve_request(
    model: &crate::serving::ServingModel,
    body: &[u8],
    header_len: Option<usize>,
) -> Result<oip::EncodedResponse, (StatusCode, String)> {
    let started = Instant::now();
    let result = infer_blocking(model, body, header_len, started);
    model.metrics.observe(started.elapsed(), result.is_ok());
    result
}

fn infer_blocking(
    model: &crate::serving::ServingModel,
    body: &[u8],
    header_len: Option<usize>,
    started: Instant,
) -> Result<oip::EncodedResponse, (StatusCode, String)> {
    let m = &model.manifest;
    let oip_error = |e: oip::OipError| {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, e.to_string())
    };
    let request =
        oip::decode_request(body, header_len, &m.inputs, &m.outputs).map_err(oip_error)?;
    let outputs = model.engine.run(&request.inputs).map_err(|e| match e {
        engine::EngineError::Run(_) => {
            model.health.observe_failure(started.elapsed());
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        _ => (StatusCode::BAD_REQUEST, e.to_string()),
    })?;
    let response =
        oip::encode_response(&model.name, model.version(), &request, &m.outputs, &outputs)
            .map_err(oip_error);
    // Health sees every request the model ran (an unencodable output is still its output).
    model.health.observe(
        request.id.as_deref(),
        &request.inputs,
        &outputs,
        started.elapsed(),
    );
    response
}

async fn metrics(State(app): State<App>) -> Response {
    let mut out = String::new();
    out.push_str("# TYPE modelfleet_agent_requests_total counter\n");
    out.push_str("# TYPE modelfleet_agent_errors_total counter\n");
    out.push_str("# TYPE modelfleet_agent_request_duration_seconds histogram\n");
    for m in app.agent.registry.all() {
        m.metrics.render(&m.name, m.version(), &mut out);
    }
    app.agent.link_metrics.render(&mut out);
    out.push_str("# TYPE modelfleet_agent_telemetry_windows_total counter\n");
    for ((model, version), n) in app.agent.windows_written() {
        out.push_str(&format!(
            "modelfleet_agent_telemetry_windows_total{{model=\"{model}\",version=\"{version}\"}} {n}\n"
        ));
    }
    out.push_str("# TYPE modelfleet_agent_models_loaded gauge\n");
    out.push_str(&format!(
        "modelfleet_agent_models_loaded {}\n",
        app.agent.registry.all().len()
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn require_token(State(app): State<App>, request: Request, next: Next) -> Response {
    if let Some(token) = &app.admin_token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            // Read (a bounded amount of) the body first: answering before the client has sent
            // it makes most clients report a broken pipe instead of the 401.
            let _ = axum::body::to_bytes(request.into_body(), 64 << 20).await;
            return error(
                StatusCode::UNAUTHORIZED,
                "admin API needs 'Authorization: Bearer <token>'",
            );
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn install(State(app): State<App>, body: Bytes) -> Response {
    let agent = app.agent.clone();
    match tokio::task::spawn_blocking(move || agent.install(&body)).await {
        Ok(Ok(installed)) => (StatusCode::CREATED, Json(installed)).into_response(),
        Ok(Err(e)) => {
            let status = match e {
                crate::install::InstallError::Io(_) | crate::install::InstallError::Store(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                crate::install::InstallError::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            let mut r = error(status, &e);
            if let Ok(v) = HeaderValue::from_str(e.reason()) {
                r.headers_mut().insert("x-modelfleet-reason", v);
            }
            r
        }
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "install task failed"),
    }
}

async fn status(State(app): State<App>) -> Response {
    match app.agent.status() {
        Ok(s) => Json(s).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn revert(State(app): State<App>, Path(name): Path<String>) -> Response {
    let agent = app.agent.clone();
    let result = tokio::task::spawn_blocking(move || {
        agent.revert(&name, "manual", json!({"requested_by": "admin api"}))
    })
    .await;
    match result {
        Ok(Ok(s)) => Json(s).into_response(),
        Ok(Err(e @ AgentError::NoSuchModel(_))) => error(StatusCode::NOT_FOUND, e),
        Ok(Err(e @ AgentError::NothingToRevert(_))) => error(StatusCode::CONFLICT, e),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "revert task failed"),
    }
}

#[derive(Deserialize)]
struct EventQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

async fn events(State(app): State<App>, Query(q): Query<EventQuery>) -> Response {
    match app.agent.events(q.after, q.limit.unwrap_or(100).min(1000)) {
        Ok(events) => Json(json!({"events": events})).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `POST /admin/v1/models/{name}/feedback`: `{"labels": [{"id": "<request id>", "label": 3}, …]}`.
#[derive(Deserialize)]
struct FeedbackBody {
    labels: Vec<FeedbackLabel>,
}

#[derive(Deserialize)]
struct FeedbackLabel {
    id: String,
    label: usize,
}

async fn feedback(State(app): State<App>, Path(name): Path<String>, body: Bytes) -> Response {
    let parsed: FeedbackBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                "feedback body: {e} (expected {{\"labels\": [{{\"id\": \"...\", \"label\": 0}}]}})"
            ),
            )
        }
    };
    let labels: Vec<(String, usize)> = parsed.labels.into_iter().map(|l| (l.id, l.label)).collect();
    match app.agent.feedback(&name, &labels) {
        Ok((matched, correct)) => Json(json!({"received": labels.len(), "matched": matched,
                                              "correct": correct}))
        .into_response(),
        Err(e @ AgentError::NoSuchModel(_)) => error(StatusCode::NOT_FOUND, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}
