//! The web dashboard: static files compiled into the binary (`fleet-server/ui/`), served at `/`
//! and `/ui/{file}` with security headers. No build step: plain HTML, CSS and JavaScript
//! modules. The pages call the JSON API with the token the user signed in with (kept in
//! `sessionStorage`, sent as `Authorization: Bearer`, never in a URL); see `docs/dashboard.md`.

use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// Every file of the dashboard: (name, content type, bytes).
pub const FILES: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/api.js"),
    ),
    (
        "charts.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/charts.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/style.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../../ui/favicon.svg"),
    ),
];

/// No inline script or style, nothing from elsewhere, no framing; the API is same-origin.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// The headers every dashboard response carries.
pub fn security_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k: HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, header::CONTENT_SECURITY_POLICY, CSP);
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::CACHE_CONTROL, "no-cache");
    set(
        h,
        HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    set(
        h,
        HeaderName::from_static("permissions-policy"),
        "camera=(), microphone=(), geolocation=()",
    );
}

fn file(name: &str) -> Response {
    let mut resp = match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, ctype, bytes)) => {
            let mut r = (StatusCode::OK, *bytes).into_response();
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
            r
        }
        None => {
            ApiError(StatusCode::NOT_FOUND, format!("no dashboard file '{name}'")).into_response()
        }
    };
    security_headers(&mut resp);
    resp
}

/// `GET /`: the dashboard's page.
pub async fn index() -> Response {
    file("index.html")
}

/// `GET /ui/{file}`: its scripts, style sheet and icon.
pub async fn asset(Path(name): Path<String>) -> Response {
    file(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_have_no_inline_script_or_style() {
        let html = std::str::from_utf8(FILES[0].2).unwrap();
        assert!(!html.contains("<script>"), "inline script");
        assert!(!html.contains("style="), "inline style");
        assert!(!html.contains("<style"), "inline style sheet");
        // The token field has no name: even a native form submission (blocked anyway by
        // `form-action 'none'`) could not carry it into a URL.
        assert!(html.contains(r#"<input id="token""#));
        assert!(
            !html.contains(r#"name="token""#),
            "the token field has a name"
        );
        assert!(CSP.contains("form-action 'none'") && CSP.contains("frame-ancestors 'none'"));
        for (name, _, bytes) in FILES {
            let text = String::from_utf8_lossy(bytes);
            // Scripts never put the token in a URL and never use eval-like sinks.
            assert!(!text.contains("eval("), "{name}");
            assert!(!text.contains("?token="), "{name}");
        }
        for (name, _, _) in FILES.iter().skip(1) {
            assert!(
                html.contains(&format!("/ui/{name}")) || ["api.js", "charts.js"].contains(name),
                "index.html does not load {name}"
            );
        }
    }
}
