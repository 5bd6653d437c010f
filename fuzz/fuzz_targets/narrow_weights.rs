//! Agent side, at install: arbitrary bytes as a bundle's `model.weights.bin` into
//! `narrow_weights::decode` and `splice` (signed like every payload, so only a bundler bug or a
//! key that signed garbage gets here; the agent must still refuse it cleanly). A payload that
//! decodes re-encodes to its exact bytes, and splices into a model file of the size its tensors
//! say, which `strip` cuts back to what was spliced into.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::narrow_weights::{decode, encode, splice, strip, NarrowTensor};

fuzz_target!(|data: &[u8]| {
    let Ok(tensors) = decode(data) else { return };
    assert_eq!(encode(&tensors), data);
    let stripped = b"head!midtail";
    if let Ok(spliced) = splice(stripped, &tensors) {
        let added: u64 = tensors.iter().map(NarrowTensor::f32_bytes).sum();
        assert_eq!(spliced.len() as u64, stripped.len() as u64 + added);
        assert_eq!(strip(&spliced, &tensors), stripped);
    }
});
