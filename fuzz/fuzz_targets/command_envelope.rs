//! Agent side, `{p}/devices/{id}/commands`: arbitrary bytes as a signed command message into
//! `command_auth::open` (the envelope parse, key id, signature, body, addressee and expiry
//! checks), with the fuzz key as the server key. Seeds: commands the fuzz key signed.
#![no_main]

use fuzz_support::{fuzz_now, server_key, FUZZ_DEVICE};
use libfuzzer_sys::fuzz_target;
use protocol::command_auth::open;

fuzz_target!(|data: &[u8]| {
    if let Ok(command) = open(data, &server_key(), FUZZ_DEVICE, fuzz_now()) {
        assert_eq!(command.device_id, FUZZ_DEVICE);
    }
});
