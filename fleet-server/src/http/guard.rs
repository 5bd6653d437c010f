//! The one place routes are guarded: every route is declared with an [`Access`] in
//! [`super::routes`], and [`enforce`] (a layer over the whole router) checks it before the
//! handler runs — a handler never authenticates by itself, so no route can forget to. An
//! authenticated handler reads the [`Caller`] from the request's extensions. The same layer
//! applies the failed-authentication rate limit ([`super::limit`]) and sets the security headers
//! every response carries.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, App};
use crate::auth::{Caller, Role};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token (the dashboard's files, health, metrics, the OpenAPI document, bundle bytes).
    Public,
    /// A token whose role is at least this one.
    Needs(Role),
}

impl Access {
    /// As written in the OpenAPI document's `x-min-role`.
    pub fn name(self) -> &'static str {
        match self {
            Access::Public => "public",
            Access::Needs(Role::Viewer) => "viewer",
            Access::Needs(Role::Operator) => "operator",
            Access::Needs(Role::Admin) => "admin",
        }
    }
}

/// Why a request was not let through.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Malformed,
    Unknown,
    Forbidden {
        name: String,
        role: Role,
        need: Role,
    },
}

impl Refusal {
    /// Whether this looks like a guess (counted by the rate limit): a token was presented and
    /// was wrong.
    fn is_guess(&self) -> bool {
        matches!(self, Refusal::Malformed | Refusal::Unknown)
    }

    fn into_error(self) -> ApiError {
        let unauthorized = |m: &str| ApiError(StatusCode::UNAUTHORIZED, m.to_string());
        match self {
            Refusal::Missing => {
                unauthorized("missing Authorization header (expected 'Bearer TOKEN')")
            }
            Refusal::Malformed => unauthorized("Authorization header is not 'Bearer TOKEN'"),
            Refusal::Unknown => unauthorized("unknown token"),
            Refusal::Forbidden { name, role, need } => ApiError(
                StatusCode::FORBIDDEN,
                format!("token '{name}' has role {role}; this needs role {need}"),
            ),
        }
    }
}

/// The caller behind `headers`' bearer token, if its role is at least `need`.
pub fn authenticate(app: &App, headers: &HeaderMap, need: Role) -> Result<Caller, Refusal> {
    let value = headers.get(header::AUTHORIZATION).ok_or(Refusal::Missing)?;
    let secret = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(Refusal::Malformed)?;
    let caller = app
        .fleet
        .authenticate(secret.trim())
        .ok_or(Refusal::Unknown)?;
    if caller.role < need {
        return Err(Refusal::Forbidden {
            name: caller.name,
            role: caller.role,
            need,
        });
    }
    Ok(caller)
}

fn client_ip(req: &Request) -> IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

/// The route's declared access, from the matched path and the method.
fn access(app: &App, req: &Request) -> Option<Access> {
    let path = req.extensions().get::<MatchedPath>()?.as_str();
    let method = req.method().as_str().to_ascii_lowercase();
    let method = if method == "head" {
        "get"
    } else {
        method.as_str()
    };
    app.access
        .iter()
        .find(|(m, p, _)| *m == method && *p == path)
        .map(|(_, _, a)| *a)
}

/// The layer: access check, rate limit, security headers.
pub async fn enforce(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let is_api = req.uri().path().starts_with("/api/");
    // No entry: the fallback (404) or a method the path does not have (405).
    if let Some(Access::Needs(need)) = access(&app, &req) {
        let ip = client_ip(&req);
        let now = Instant::now();
        if let Some(wait) = app.auth_limiter.blocked(ip, now) {
            app.fleet.metrics.http_rate_limited.fetch_add(1, Relaxed);
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut resp = ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                format!("too many failed authentications from this address; retry in {secs} s"),
            )
            .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            drain(req).await;
            return with_headers(resp, is_api);
        }
        match authenticate(&app, req.headers(), need) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
            }
            Err(refusal) => {
                if refusal.is_guess() {
                    app.auth_limiter.fail(ip, now);
                }
                let forbidden = matches!(refusal, Refusal::Forbidden { .. });
                if !forbidden {
                    app.fleet.metrics.http_unauthorized.fetch_add(1, Relaxed);
                }
                let mut resp = refusal.into_error().into_response();
                if !forbidden {
                    resp.headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                }
                drain(req).await;
                return with_headers(resp, is_api);
            }
        }
    }
    with_headers(next.run(req).await, is_api)
}

/// Most bytes of a refused request's body read and discarded before the refusal is sent.
const DRAIN_LIMIT: usize = 64 << 20;
/// Longest wait for them.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and discards what a refused client is still sending (bounded in bytes and time), so it
/// reads the refusal: a socket closed with unread bytes is reset, and a client still uploading a
/// bundle would see "broken pipe" instead of the 401/403/429 that says why.
async fn drain(req: Request) {
    let body = req.into_body();
    let _ = tokio::time::timeout(DRAIN_TIME, axum::body::to_bytes(body, DRAIN_LIMIT)).await;
}

/// Headers on every response. The dashboard's own (a page CSP, `no-cache`) are kept; API
/// responses are never stored by a cache, since they carry fleet state to token holders.
fn with_headers(mut resp: Response, is_api: bool) -> Response {
    let h = resp.headers_mut();
    let set = |h: &mut HeaderMap, k: HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        set(
            h,
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        );
    }
    if is_api || !h.contains_key(header::CACHE_CONTROL) {
        set(h, header::CACHE_CONTROL, "no-store");
    }
    resp
}
