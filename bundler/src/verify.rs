//! `verify`: the full check a device performs, run on the build side.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use protocol::bundle::{read_bundle_file, DiscardSink, VerifiedBundle, VerifyOptions};
use protocol::keys::{KeyId, Keyring};
use serde::Serialize;

use crate::error::VerifyError;

/// Verifies the bundle at `path` against `keyring`, now, without expiry slack: structure,
/// signatures, format version, expiry, and every payload's sizes and hashes after bounded,
/// streamed decompression. Payloads are discarded.
pub fn verify(path: &Path, keyring: &Keyring) -> Result<VerifiedBundle, VerifyError> {
    verify_with(path, &VerifyOptions::new(keyring))
}

/// [`verify`] with explicit options (time, slack, required signatures, limits).
pub fn verify_with(path: &Path, opts: &VerifyOptions<'_>) -> Result<VerifiedBundle, VerifyError> {
    read_bundle_file(path, opts, &mut DiscardSink).map_err(|source| VerifyError {
        path: path.into(),
        source,
    })
}

/// The `--json` output of `bundler verify`.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub file: PathBuf,
    pub valid: bool,
    /// The error chain when invalid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security_version: Option<u64>,
    /// Trusted keys whose signature verified.
    pub signed_by: Vec<KeyId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Total decompressed payload bytes checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

impl VerifyReport {
    pub fn valid(path: &Path, v: &VerifiedBundle) -> VerifyReport {
        VerifyReport {
            file: path.into(),
            valid: true,
            error: None,
            name: Some(v.manifest.name.clone()),
            version: Some(v.manifest.version.to_string()),
            security_version: Some(v.manifest.security_version),
            signed_by: v.signed_by.clone(),
            sha256: Some(v.sha256.clone()),
            size: Some(v.size),
            payload_bytes: Some(v.manifest.payloads.iter().map(|p| p.size).sum()),
            expires_at: v.manifest.expires_at,
        }
    }

    pub fn invalid(path: &Path, e: &VerifyError) -> VerifyReport {
        VerifyReport {
            file: path.into(),
            valid: false,
            error: Some(error_chain(e)),
            name: None,
            version: None,
            security_version: None,
            signed_by: vec![],
            sha256: None,
            size: None,
            payload_bytes: None,
            expires_at: None,
        }
    }
}

/// An error and its sources, joined with `: `.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
