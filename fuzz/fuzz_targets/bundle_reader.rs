//! Arbitrary bytes into the verifying bundle reader, with a fixed keyring.
//!
//! The reader must never panic, never allocate beyond the declared and limited sizes, and
//! accept nothing but an intact bundle signed by the fixed key. The seed corpus
//! (`corpus/bundle_reader/`) holds a tiny valid bundle signed by that key, written by the
//! bundler test `fuzz_seed` — without it the fuzzer could not get past the signature check.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use protocol::bundle::{read_bundle, DiscardSink, Limits, VerifyOptions};
use protocol::keys::{Keyring, SecretKey};

/// The fuzzing key. Public on purpose: it signs nothing but the seed corpus.
/// Keep in sync with `bundler/tests/fuzz_seed.rs`.
const FUZZ_SECRET_KEY: &str =
    "ed25519-secret 6d6f64656c666c6565742066757a7a696e67206b6579206e6f74207365637265";

fn keyring() -> &'static Keyring {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    KEYRING.get_or_init(|| {
        let key = SecretKey::from_file_text(FUZZ_SECRET_KEY).expect("fuzz key parses");
        Keyring::new([key.public()])
    })
}

fuzz_target!(|data: &[u8]| {
    let mut opts = VerifyOptions::new(keyring());
    // A fixed clock keeps runs reproducible; the seed never expires.
    opts.now = chrono::DateTime::from_timestamp(1_800_000_000, 0).expect("valid time");
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
