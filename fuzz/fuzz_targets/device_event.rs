//! Server side, `{p}/devices/{id}/events`: arbitrary bytes into the event decoder the server's
//! ingest uses (`link::decode::<DeviceEvent>`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::link::{self, DeviceEvent};

fuzz_target!(|data: &[u8]| {
    let _ = link::decode::<DeviceEvent>(data);
});
