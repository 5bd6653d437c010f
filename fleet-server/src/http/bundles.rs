//! Bundle routes: upload (verified against the keyring), list, one, and the bytes with HTTP
//! Range support.
//!
//! `GET /api/v1/bundles/{id}/content` needs no token: agents fetch it from the `http_url` of a
//! stage command, the id is the sha256 of the bytes, and a device verifies the signatures before
//! anything is used — the same bytes travel to any subscribed device over MQTT.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

use super::{ApiError, ApiResult, App};
use crate::auth::Caller;
use crate::fleet::FleetError;
use crate::store::BundleRecord;

fn summary(b: &BundleRecord) -> serde_json::Value {
    json!({"id": b.id, "name": b.name, "version": b.version, "size": b.size,
           "security_version": b.security_version})
}

pub async fn upload(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<Response> {
    if body.is_empty() {
        return Err(super::bad_request(
            "empty body: send the bundle file's bytes",
        ));
    }
    let fleet = app.fleet.clone();
    let (record, created) =
        tokio::task::spawn_blocking(move || fleet.upload_bundle(&body, &caller.name))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(summary(&record))).into_response())
}

pub async fn list(State(app): State<App>) -> ApiResult<Json<serde_json::Value>> {
    let mut bundles = app.fleet.store.bundles().map_err(FleetError::from)?;
    bundles.sort_by(|a, b| b.uploaded_at.cmp(&a.uploaded_at));
    let app2 = app.clone();
    // Manifest fields (quantization, accuracy, task) from each stored file's head, cached.
    let bundles = tokio::task::spawn_blocking(move || {
        bundles
            .iter()
            .map(|b| {
                let mut v = serde_json::to_value(b).unwrap_or_default();
                if let (Some(o), serde_json::Value::Object(d)) =
                    (v.as_object_mut(), super::views::bundle_details(&app2, b))
                {
                    o.extend(d);
                }
                v
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(json!({ "bundles": bundles })))
}

pub async fn one(State(app): State<App>, Path(id): Path<String>) -> ApiResult<Json<BundleRecord>> {
    Ok(Json(app.fleet.bundle(&id)?))
}

/// A byte range request: `bytes=a-b`, `bytes=a-` or `bytes=-n`, resolved against `size`
/// to an inclusive (first, last). `Err` when it cannot be satisfied or is not understood.
pub fn parse_range(value: &str, size: u64) -> Result<(u64, u64), String> {
    let spec = value
        .strip_prefix("bytes=")
        .ok_or_else(|| format!("range '{value}' is not in bytes"))?;
    if spec.contains(',') {
        return Err("multiple ranges are not supported".into());
    }
    let (a, b) = spec
        .split_once('-')
        .ok_or_else(|| format!("range '{value}' is malformed"))?;
    let num = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("range '{value}' is malformed"))
    };
    let (first, last) = match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, false) => {
            let n = num(b)?;
            if n == 0 {
                return Err("a suffix range of 0 bytes is empty".into());
            }
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        (false, true) => (num(a)?, size.saturating_sub(1)),
        (false, false) => (num(a)?, num(b)?.min(size.saturating_sub(1))),
        (true, true) => return Err(format!("range '{value}' is malformed")),
    };
    if size == 0 || first >= size || first > last {
        return Err(format!(
            "range '{value}' is outside the {size} bytes of the bundle"
        ));
    }
    Ok((first, last))
}

pub async fn content(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let b = app.fleet.bundle(&id)?;
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(v) => {
            let v = v.to_str().unwrap_or("");
            match parse_range(v, b.size) {
                Ok(r) => Some(r),
                Err(why) => {
                    let mut resp = ApiError(StatusCode::RANGE_NOT_SATISFIABLE, why).into_response();
                    resp.headers_mut().insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&format!("bytes */{}", b.size)).expect("ascii"),
                    );
                    return Ok(resp);
                }
            }
        }
    };
    let size = b.size;
    let (first, last) = range.unwrap_or((0, size.saturating_sub(1)));
    let len = if size == 0 { 0 } else { last - first + 1 };
    let fleet = app.fleet.clone();
    let bytes =
        tokio::task::spawn_blocking(move || fleet.files.read_at(&b.id, first, len as usize))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot read bundle: {e}"),
                )
            })?;
    let mut resp = Response::new(Body::from(bytes));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{id}\"")).expect("hex id"),
    );
    if range.is_some() {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {first}-{last}/{size}")).expect("ascii"),
        );
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_resolve_against_the_size() {
        assert_eq!(parse_range("bytes=0-99", 1000), Ok((0, 99)));
        assert_eq!(parse_range("bytes=900-", 1000), Ok((900, 999)));
        assert_eq!(parse_range("bytes=-10", 1000), Ok((990, 999)));
        assert_eq!(parse_range("bytes=990-5000", 1000), Ok((990, 999)));
        for bad in [
            "bytes=1000-",
            "bytes=5-1",
            "bytes=a-b",
            "items=0-1",
            "bytes=0-1,3-4",
            "bytes=-0",
            "bytes=-",
        ] {
            assert!(parse_range(bad, 1000).is_err(), "{bad}");
        }
    }
}
