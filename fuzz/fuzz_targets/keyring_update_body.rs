//! Agent side, the part of a keyring update the signatures protect: arbitrary bytes as the body
//! of an update signed by the fuzz key (the current keyring's only key), applied through a
//! chain, so the fuzzer reaches what follows the signature check (`Keyring::from_update_body`:
//! keys, threshold, version), which a mutated chain (`keyring_chain`) cannot get signed.
#![no_main]

use fuzz_support::{keyring, secret_key};
use libfuzzer_sys::fuzz_target;
use protocol::keyring_chain::KeyringChain;
use protocol::keys::SignedKeyringUpdate;

fuzz_target!(|data: &[u8]| {
    let update = SignedKeyringUpdate {
        body: data.to_vec(),
        signatures: vec![secret_key().sign(data)],
    };
    if let Ok(ring) = KeyringChain::new(vec![update]).apply(keyring()) {
        assert!(ring.threshold >= 1 && ring.threshold <= ring.len());
    }
});
