//! Chunk serving: answers a device's [`ChunkRequest`] with one frame per chunk on its
//! `transfer/chunk` topic: on the bulk connection at QoS 0 while it is up, else on the main
//! connection at QoS 1 ([`crate::bulk`]).
//!
//! A request is served up to [`max_chunks_per_request`] chunks (the caps of `protocol::link`,
//! which the agent also honours when it asks); requests for an unknown bundle, from an unknown
//! device, with a bad chunk size or a range past the end are answered with an error frame and
//! counted. Chunks are read with positioned reads from files kept open, hashed, and published.

use std::sync::atomic::Ordering::Relaxed;

use crate::bulk::Route;
use crate::bundles::error_frame;
use crate::fleet::Fleet;
use protocol::link::{chunk_count, max_chunks_per_request, Channel, ChunkRequest, MAX_CHUNK_SIZE};

impl Fleet {
    /// Serves one chunk request from `device`.
    pub async fn serve_chunks(&self, device: &str, req: ChunkRequest) {
        let topic = self.topics.device(device, Channel::TransferChunk);
        let refuse = |why: String, total: u32| {
            tracing::warn!(device, bundle_id = %req.bundle_id, first = req.first, count = req.count, "chunk request refused: {why}");
            self.metrics.chunk_errors_sent.fetch_add(1, Relaxed);
            error_frame(&req.bundle_id, req.chunk_size, req.first, total, &why)
        };
        let frame = match self.check(device, &req) {
            Ok((size, served)) => {
                self.serve_range(device, &topic, &req, size, served).await;
                return;
            }
            Err((why, total)) => refuse(why, total),
        };
        let _ = self.publish_frame(device, &topic, frame).await;
    }

    /// Publishes one frame (bulk connection or main, see [`crate::bulk::BulkLink::publish`]),
    /// counted by the connection it took; false if it could not be queued.
    async fn publish_frame(&self, device: &str, topic: &str, frame: Vec<u8>) -> bool {
        match self.bulk.publish(&self.mqtt, topic, frame).await {
            Ok(Route::Bulk) => {
                self.metrics.chunk_frames_bulk.fetch_add(1, Relaxed);
                true
            }
            Ok(Route::Main) => {
                self.metrics.chunk_frames_main.fetch_add(1, Relaxed);
                true
            }
            Err(e) => {
                self.metrics.chunk_frames_unsent.fetch_add(1, Relaxed);
                tracing::warn!(device, error = %e, "cannot queue chunk for the broker");
                false
            }
        }
    }

    /// The bundle size and the number of chunks to serve, or why not (and the chunk total).
    fn check(&self, device: &str, req: &ChunkRequest) -> Result<(u64, u32), (String, u32)> {
        match self.store.device(device) {
            Ok(Some(_)) => {}
            Ok(None) => return Err(("unknown device".into(), 0)),
            Err(e) => return Err((format!("server store error: {e}"), 0)),
        }
        if req.chunk_size == 0 || req.chunk_size > MAX_CHUNK_SIZE {
            return Err((
                format!(
                    "chunk size {} out of range 1..={MAX_CHUNK_SIZE}",
                    req.chunk_size
                ),
                0,
            ));
        }
        let size = match self.store.bundle(&req.bundle_id) {
            Ok(Some(b)) => b.size,
            Ok(None) => return Err(("unknown bundle".into(), 0)),
            Err(e) => return Err((format!("server store error: {e}"), 0)),
        };
        let total = chunk_count(size, req.chunk_size);
        if req.count == 0 || req.first >= total {
            return Err((
                format!(
                    "chunk range {}+{} is outside the bundle's {total} chunks",
                    req.first, req.count
                ),
                total,
            ));
        }
        let n = req
            .count
            .min(total - req.first)
            .min(max_chunks_per_request(req.chunk_size));
        Ok((size, n))
    }

    async fn serve_range(&self, device: &str, topic: &str, req: &ChunkRequest, size: u64, n: u32) {
        let total = chunk_count(size, req.chunk_size);
        let mut served = 0u64;
        for index in req.first..req.first + n {
            let frame = match self
                .files
                .chunk_frame(&req.bundle_id, size, req.chunk_size, index)
            {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(device, bundle_id = %req.bundle_id, index, error = %e, "cannot read chunk");
                    self.metrics.chunk_errors_sent.fetch_add(1, Relaxed);
                    error_frame(
                        &req.bundle_id,
                        req.chunk_size,
                        index,
                        total,
                        "server cannot read the bundle",
                    )
                }
            };
            let bytes = frame.len() as u64;
            if !self.publish_frame(device, topic, frame).await {
                break;
            }
            served += 1;
            self.metrics.chunks_served.fetch_add(1, Relaxed);
            self.metrics.chunk_bytes_served.fetch_add(bytes, Relaxed);
        }
        self.note_chunks_served(device, &req.bundle_id, total, served);
    }
}
