//! Server side, `{p}/devices/{id}/transfer/req`: arbitrary bytes into the chunk request decoder
//! of the server's MQTT dispatch (`link::decode::<ChunkRequest>`), then the chunk arithmetic the
//! server applies to a request (`chunk_count`, `max_chunks_per_request`) for a few bundle sizes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::link::{self, chunk_count, max_chunks_per_request, ChunkRequest};

fuzz_target!(|data: &[u8]| {
    let Ok(req) = link::decode::<ChunkRequest>(data) else {
        return;
    };
    let cap = max_chunks_per_request(req.chunk_size);
    assert!(cap >= 1);
    for size in [
        0,
        1,
        u64::from(req.first),
        u64::from(u32::MAX) * 2,
        u64::MAX,
    ] {
        let _ = chunk_count(size, req.chunk_size);
    }
});
