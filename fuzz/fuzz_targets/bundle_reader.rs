//! Arbitrary bytes into the verifying bundle reader, with a keyring that trusts the fuzz key.
//!
//! The reader must never panic, never allocate beyond the declared and limited sizes, and
//! accept nothing but an intact bundle signed by the fuzz key. The seed corpus
//! (`corpus/bundle_reader/`) holds a tiny valid bundle signed by that key, written by the
//! bundler test `fuzz_seed` (and `scripts/fuzz.sh` adds real model bundles signed by it) —
//! without them the fuzzer could not get past the signature check.
#![no_main]

use fuzz_support::{fuzz_now, keyring};
use libfuzzer_sys::fuzz_target;
use protocol::bundle::{read_bundle, DiscardSink, Limits, VerifyOptions};

fuzz_target!(|data: &[u8]| {
    let mut opts = VerifyOptions::new(keyring());
    // A fixed clock keeps runs reproducible; the seed never expires.
    opts.now = fuzz_now();
    opts.limits = Limits {
        max_manifest_bytes: 1 << 20,
        max_signature_bytes: 16 << 10,
        max_payload_bytes: 64 << 20,
        max_payloads: 16,
    };
    if let Ok(v) = read_bundle(data, &opts, &mut DiscardSink) {
        // Anything accepted must be signed by the fuzz key and hash to what it says.
        assert!(!v.signed_by.is_empty());
        assert_eq!(v.size, data.len() as u64);
    }
});
