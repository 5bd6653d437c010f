//! Agent side, `{p}/server` (retained, the server's last will): arbitrary bytes into the
//! presence decoder the agent's link uses (`link::decode::<ServerPresence>`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::link::{self, ServerPresence};

fuzz_target!(|data: &[u8]| {
    let _ = link::decode::<ServerPresence>(data);
});
