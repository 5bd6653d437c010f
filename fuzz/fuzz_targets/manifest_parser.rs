//! Arbitrary bytes into the manifest parser and the unverified head reader (`inspect`'s path),
//! which the signature check otherwise keeps the bundle_reader target from reaching.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::bundle::{parse_manifest, read_head, Limits};

fuzz_target!(|data: &[u8]| {
    let _ = parse_manifest(data);
    let _ = read_head(&mut &data[..], &Limits::default()).map(|h| h.manifest());
});
