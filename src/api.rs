//! A small blocking client of the fleet server's `/api/v1`, for the demo and the end-to-end
//! tests: bearer token, JSON in and out, and a status code with the body for every answer
//! (a 409 is a result a test wants to look at, not an error).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Where the API is and who asks.
#[derive(Debug, Clone)]
pub struct ApiClient {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base: String,
    pub token: String,
}

impl ApiClient {
    pub fn new(base: &str, token: &str) -> ApiClient {
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    /// GETs `path`; anything but 2xx is an error naming the path, status and message.
    pub fn get(&self, path: &str) -> Result<Value> {
        let (status, body) = self.send("GET", path, None, &[])?;
        if !(200..300).contains(&status) {
            bail!("GET {path}: {status} {body}");
        }
        Ok(body)
    }

    /// POSTs a JSON body; returns the status and JSON body, whatever the status.
    pub fn post_json(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        self.send(
            "POST",
            path,
            Some("application/json"),
            body.to_string().as_bytes(),
        )
    }

    /// POSTs raw bytes; returns the status and JSON body, whatever the status.
    pub fn post_bytes(&self, path: &str, body: &[u8]) -> Result<(u16, Value)> {
        self.send("POST", path, Some("application/octet-stream"), body)
    }

    /// Uploads a bundle; returns its id (an already stored bundle answers with the same id).
    pub fn upload(&self, bundle: &[u8]) -> Result<String> {
        let (status, body) = self.post_bytes("/api/v1/bundles", bundle)?;
        if status != 201 && status != 200 {
            bail!("upload refused: {status} {body}");
        }
        body["id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("upload answer has no id: {body}"))
    }

    /// Starts a rollout; returns its id.
    pub fn create_rollout(&self, spec: &Value) -> Result<String> {
        let (status, body) = self.post_json("/api/v1/rollouts", spec)?;
        if status != 201 {
            bail!("rollout refused: {status} {body}");
        }
        body["id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("rollout answer has no id: {body}"))
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<(u16, Value)> {
        let mut req = ureq::request(method, &format!("{}{path}", self.base))
            .timeout(Duration::from_secs(60))
            .set("Authorization", &format!("Bearer {}", self.token));
        let result = match content_type {
            Some(ct) => req.set("Content-Type", ct).send_bytes(body),
            None => {
                req = req.set("Accept", "application/json");
                req.call()
            }
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e).with_context(|| format!("{method} {}{path}", self.base)),
        };
        let status = response.status();
        let text = response.into_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }
}
