//! Agent side, `{p}/devices/{id}/transfer/chunk`: arbitrary bytes as a chunk frame into
//! `link::decode_chunk` (magic, header length, header JSON, size and index checks, sha256).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::link::decode_chunk;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, bytes)) = decode_chunk(data) {
        if header.error.is_none() {
            assert!(!bytes.is_empty() && bytes.len() <= header.chunk_size as usize);
            assert!(header.index < header.total);
        } else {
            assert!(bytes.is_empty());
        }
    }
});
