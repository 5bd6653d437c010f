//! The alternative transport (`--transfer http`): the bundle fetched from `BundleRef.http_url`
//! with HTTP Range requests, on a blocking thread.
//!
//! It shares everything else with the MQTT transport — the partial file, the bitmap in redb, the
//! checkpoints, the progress events — so it resumes from what is on disk after an outage or a
//! restart: each request asks for the next run of missing chunks. HTTP has no per-chunk hash;
//! the whole file is checked against the bundle id before the install path sees it. Network
//! errors are retried with backoff ([`MAX_ATTEMPTS`] in a row) before the transfer fails.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::agent::Agent;

use super::backoff::Backoff;
use super::metrics::LinkMetrics;
use super::transfer::{ChunkError, Transfer, CHECKPOINT_CHUNKS};
use super::LinkError;

/// Consecutive failed requests before the transfer is given up.
pub const MAX_ATTEMPTS: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum HttpFetchError {
    #[error("the stage command has no http_url for this bundle")]
    NoUrl,
    #[error("cancelled")]
    Cancelled,
    #[error("GET {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("GET {url} answered {status}")]
    Status { url: String, status: u16 },
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error(transparent)]
    Link(#[from] LinkError),
}

impl HttpFetchError {
    fn retriable(&self) -> bool {
        match self {
            HttpFetchError::Http { .. } => true,
            HttpFetchError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// A short machine-readable reason for the `transfer_failed` event.
    pub fn reason(&self) -> &'static str {
        match self {
            HttpFetchError::NoUrl => "no_http_url",
            HttpFetchError::Cancelled => "cancelled",
            HttpFetchError::Http { .. } | HttpFetchError::Status { .. } => "http_error",
            HttpFetchError::Chunk(_) => "bad_chunk",
            HttpFetchError::Link(_) => "disk_error",
        }
    }
}

/// Fetches every missing chunk of `t`, then checkpoints it.
pub fn fetch(agent: &Agent, t: &mut Transfer, cancel: &AtomicBool) -> Result<(), HttpFetchError> {
    let url = t.bundle.http_url.clone().ok_or(HttpFetchError::NoUrl)?;
    let seed = t
        .id()
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10), seed);
    let mut failures = 0;
    loop {
        let next_missing = t.received().missing().next();
        let Some(first) = next_missing else {
            break;
        };
        if cancel.load(Ordering::Relaxed) {
            t.checkpoint(agent)?;
            return Err(HttpFetchError::Cancelled);
        }
        let mut last = first;
        while last + 1 < t.received().len() && !t.received().get(last + 1) {
            last += 1;
        }
        match fetch_range(agent, t, &url, first, last, cancel) {
            Ok(()) => {
                failures = 0;
                backoff.reset();
            }
            Err(e) if e.retriable() && failures + 1 < MAX_ATTEMPTS => {
                failures += 1;
                t.checkpoint(agent)?;
                tracing::warn!(bundle = %t.id(), attempt = failures, "bundle download: {e}; retrying");
                std::thread::sleep(backoff.next_delay());
            }
            Err(e) => {
                t.checkpoint(agent)?;
                return Err(e);
            }
        }
    }
    t.checkpoint(agent)?;
    Ok(())
}

/// One Range request for chunks `first..=last`, written as they stream in.
fn fetch_range(
    agent: &Agent,
    t: &mut Transfer,
    url: &str,
    first: u32,
    last: u32,
    cancel: &AtomicBool,
) -> Result<(), HttpFetchError> {
    let cs = t.bundle.chunk_size as u64;
    let start = first as u64 * cs;
    let end = ((last as u64 + 1) * cs).min(t.bundle.size) - 1;
    let http = |reason: String| HttpFetchError::Http {
        url: url.to_string(),
        reason,
    };
    let response = ureq::get(url)
        .set("Range", &format!("bytes={start}-{end}"))
        .timeout(Duration::from_secs(60))
        .call()
        .map_err(|e| match e {
            ureq::Error::Status(status, _) => HttpFetchError::Status {
                url: url.to_string(),
                status,
            },
            other => http(other.to_string()),
        })?;
    // 206: the range asked for; 200: a server without Range support sent the whole file.
    let from = match response.status() {
        206 => first,
        200 => 0,
        status => {
            return Err(HttpFetchError::Status {
                url: url.to_string(),
                status,
            })
        }
    };
    let mut body = response.into_reader();
    let mut buf = vec![0u8; cs as usize];
    for index in from..=last {
        if cancel.load(Ordering::Relaxed) {
            return Err(HttpFetchError::Cancelled);
        }
        let len = t.chunk_len(index) as usize;
        body.read_exact(&mut buf[..len])
            .map_err(|e| http(format!("reading chunk {index}: {e}")))?;
        if t.write_chunk(index, &buf[..len])? {
            let m = &agent.link_metrics;
            LinkMetrics::inc(&m.chunks_received_total);
            LinkMetrics::add(&m.chunk_bytes_total, len as u64);
            if t.unsynced() >= CHECKPOINT_CHUNKS {
                t.checkpoint(agent)?;
            }
            if let Some(event) = t.progress_event() {
                let _ = agent.record(&[event]);
            }
        }
    }
    Ok(())
}
