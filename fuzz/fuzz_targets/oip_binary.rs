//! Agent, `POST /v2/models/{m}/infer` with the binary tensor extension: the first two bytes
//! (big-endian) are the `Inference-Header-Content-Length` value, the rest is the body (JSON
//! header, then raw tensors), into `agent::oip::decode_request`. Needs `--features agent`.
#![no_main]

use fuzz_support::oip_schema;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [a, b, body @ ..] = data else {
        return;
    };
    let header_len = u16::from_be_bytes([*a, *b]) as usize;
    let (inputs, outputs) = oip_schema();
    if let Ok(request) = agent::oip::decode_request(body, Some(header_len), inputs, outputs) {
        assert_eq!(request.inputs.len(), inputs.len());
    }
});
