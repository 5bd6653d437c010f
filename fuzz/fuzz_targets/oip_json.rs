//! Agent, `POST /v2/models/{m}/infer` without `Inference-Header-Content-Length`: arbitrary
//! bytes as a JSON inference request into `agent::oip::decode_request`, for a model with one
//! input of each supported datatype. Needs `--features agent` (pulls tract; see README.md).
#![no_main]

use fuzz_support::oip_schema;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (inputs, outputs) = oip_schema();
    if let Ok(request) = agent::oip::decode_request(data, None, inputs, outputs) {
        assert_eq!(request.inputs.len(), inputs.len());
        assert!(!request.binary_inputs);
    }
});
