//! Agent side, `{p}/keyring` (retained): arbitrary bytes as a keyring chain message, decoded
//! as the agent does (`link::decode`) and applied to a keyring of the fuzz key
//! (`KeyringChain::apply`: update bodies, signatures, thresholds, versions).
#![no_main]

use fuzz_support::keyring;
use libfuzzer_sys::fuzz_target;
use protocol::keyring_chain::KeyringChain;
use protocol::link;

fuzz_target!(|data: &[u8]| {
    let Ok(chain) = link::decode::<KeyringChain>(data) else {
        return;
    };
    if let Ok(ring) = chain.apply(keyring()) {
        assert!(ring.version >= keyring().version);
        assert!(ring.threshold >= 1 && ring.threshold <= ring.len());
    }
});
