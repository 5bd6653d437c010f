//! Agent side, the part of a command the signature protects: arbitrary bytes as the `body` of
//! a command signed by the server key, so the fuzzer reaches what `command_auth::open` does
//! once the signature verified (body decode, addressee, expiry arithmetic), which a mutated
//! envelope (`command_envelope`) never gets past the signature to.
#![no_main]

use fuzz_support::{fuzz_now, secret_key, server_key, FUZZ_DEVICE};
use libfuzzer_sys::fuzz_target;
use protocol::command_auth::{open, SignedCommand, SIGNING_CONTEXT};
use protocol::link::LINK_SCHEMA;

fuzz_target!(|data: &[u8]| {
    // The body is a JSON string: only UTF-8 can be one.
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let signed = SignedCommand {
        schema: LINK_SCHEMA,
        body: body.to_string(),
        signature: secret_key().sign(&[SIGNING_CONTEXT, data].concat()),
    };
    let _ = open(&signed.encode(), &server_key(), FUZZ_DEVICE, fuzz_now());
});
