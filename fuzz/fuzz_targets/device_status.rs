//! Server side, `{p}/devices/{id}/status` (retained, last will): arbitrary bytes into the
//! status decoder the server's ingest uses (`link::decode::<DeviceStatus>`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::link::{self, DeviceStatus};

fuzz_target!(|data: &[u8]| {
    let _ = link::decode::<DeviceStatus>(data);
});
