//! The Open Inference Protocol codec: round trips over JSON and binary tensor data, the bytes stock
//! clients send, and every way a request can be wrong.

use agent::oip::{
    decode_request, encode_response, error_body, EncodedResponse, InferRequest, OipError,
    RequestedOutput, MAX_ELEMENTS,
};
use engine::{Tensor, TensorData};
use protocol::manifest::{DType, TensorSpec};
use serde_json::{json, Value};

fn spec(name: &str, dtype: DType, shape: &[Option<usize>]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        range: None,
    }
}

/// A two-input, two-output classifier: `x` FP32 [-1, 3], `ids` INT32 [-1] → `probs` FP32 [-1, 3],
/// `label` INT64 [-1].
fn model() -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    (
        vec![
            spec("x", DType::F32, &[None, Some(3)]),
            spec("ids", DType::I32, &[None]),
        ],
        vec![
            spec("probs", DType::F32, &[None, Some(3)]),
            spec("label", DType::I64, &[None]),
        ],
    )
}

fn decode_json(body: &Value) -> Result<InferRequest, OipError> {
    let (inputs, outputs) = model();
    decode_request(&serde_json::to_vec(body).unwrap(), None, &inputs, &outputs)
}

fn decode_err(body: &Value) -> String {
    decode_json(body).unwrap_err().to_string()
}

/// A body made of a JSON header and binary tensor bytes, as the binary extension lays it out.
fn binary_body(header: &Value, blobs: &[&[u8]]) -> (Vec<u8>, usize) {
    let mut body = serde_json::to_vec(header).unwrap();
    let header_len = body.len();
    for blob in blobs {
        body.extend_from_slice(blob);
    }
    (body, header_len)
}

fn decode_binary(header: &Value, blobs: &[&[u8]]) -> Result<InferRequest, OipError> {
    let (inputs, outputs) = model();
    let (body, header_len) = binary_body(header, blobs);
    decode_request(&body, Some(header_len), &inputs, &outputs)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Splits a response into its JSON header and binary tail.
fn split(resp: &EncodedResponse) -> (Value, &[u8]) {
    let n = resp.header_len.unwrap_or(resp.body.len());
    (
        serde_json::from_slice(&resp.body[..n]).unwrap(),
        &resp.body[n..],
    )
}

fn model_outputs(batch: usize) -> Vec<Tensor> {
    let probs: Vec<f32> = (0..batch * 3).map(|i| i as f32 * 0.25).collect();
    let label: Vec<i64> = (0..batch as i64).map(|i| i * 10 - 1).collect();
    vec![
        Tensor::from_f32(vec![batch, 3], probs).unwrap(),
        Tensor::new(vec![batch], TensorData::I64(label)).unwrap(),
    ]
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

#[test]
fn json_request_and_json_response_round_trip() {
    let req = decode_json(&json!({
        "id": "req-42",
        "inputs": [
            {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0.5, -1, 2.25]},
            {"name": "ids", "shape": [1], "datatype": "INT32", "data": [7]}
        ]
    }))
    .unwrap();
    assert_eq!(req.id.as_deref(), Some("req-42"));
    assert_eq!(
        req.inputs,
        vec![
            Tensor::from_f32(vec![1, 3], vec![0.5, -1.0, 2.25]).unwrap(),
            Tensor::new(vec![1], TensorData::I32(vec![7])).unwrap(),
        ]
    );
    assert_eq!(req.outputs, None);
    assert!(!req.binary_response);
    assert!(!req.binary_inputs);

    let (_, outputs) = model();
    let resp = encode_response("clf", "1.2.0", &req, &outputs, &model_outputs(1)).unwrap();
    assert_eq!(resp.header_len, None);
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(
        body,
        json!({
            "model_name": "clf",
            "model_version": "1.2.0",
            "id": "req-42",
            "outputs": [
                {"name": "probs", "datatype": "FP32", "shape": [1, 3], "data": [0.0, 0.25, 0.5]},
                {"name": "label", "datatype": "INT64", "shape": [1], "data": [-1]}
            ]
        })
    );
}

#[test]
fn nested_data_equals_flat_data_and_batch_above_one() {
    let flat = decode_json(&json!({
        "inputs": [
            {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6.5]},
            {"name": "ids", "shape": [2], "datatype": "INT32", "data": [1, 2]}
        ]
    }))
    .unwrap();
    let nested = decode_json(&json!({
        "inputs": [
            {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6.5]]},
            {"name": "ids", "shape": [2], "datatype": "INT32", "data": [1, 2]}
        ]
    }))
    .unwrap();
    assert_eq!(flat, nested);
    assert_eq!(nested.inputs[0].shape, vec![2, 3]);
    assert_eq!(
        nested.inputs[0].as_f32().unwrap(),
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]
    );
}

#[test]
fn inputs_are_returned_in_model_order() {
    let req = decode_json(&json!({
        "inputs": [
            {"name": "ids", "shape": [1], "datatype": "INT32", "data": [3]},
            {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
        ]
    }))
    .unwrap();
    assert_eq!(req.inputs[0].dtype(), DType::F32);
    assert_eq!(req.inputs[1].dtype(), DType::I32);
}

#[test]
fn binary_request_and_binary_response_round_trip() {
    let x = [
        1.5f32,
        f32::NAN,
        -0.0,
        f32::INFINITY,
        3.0,
        f32::MIN_POSITIVE,
    ];
    let ids = [i32::MIN, i32::MAX];
    let req = decode_binary(
        &json!({
            "id": "b1",
            "inputs": [
                {"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}},
                {"name": "ids", "shape": [2], "datatype": "INT32", "parameters": {"binary_data_size": 8}}
            ],
            "parameters": {"binary_data_output": true}
        }),
        &[&f32_bytes(&x), &i32_bytes(&ids)],
    )
    .unwrap();
    assert!(req.binary_response);
    assert!(req.binary_inputs);
    let got = req.inputs[0].as_f32().unwrap();
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(req.inputs[1].data, TensorData::I32(ids.to_vec()));

    // The response carries every output as binary data, in model order.
    let (_, outputs) = model();
    let mut values = model_outputs(2);
    values[0] = Tensor::from_f32(vec![2, 3], vec![f32::NAN, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    let resp = encode_response("clf", "1.2.0", &req, &outputs, &values).unwrap();
    let (header, tail) = split(&resp);
    assert!(resp.header_len.is_some());
    assert_eq!(
        header,
        json!({
            "model_name": "clf",
            "model_version": "1.2.0",
            "id": "b1",
            "outputs": [
                {"name": "probs", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}},
                {"name": "label", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 16}}
            ]
        })
    );
    assert_eq!(tail.len(), 40);
    assert_eq!(&tail[..24], &values[0].to_le_bytes()[..]);
    assert_eq!(&tail[24..], &values[1].to_le_bytes()[..]);
}

/// The bytes `tritonclient.http` sends with default settings: inputs as binary data
/// (`set_data_from_numpy(binary_data=True)`), outputs requested with `binary_data: true`, the
/// header serialised by Python's `json.dumps` (with spaces), followed by the raw f32 LE array.
#[test]
fn tritonclient_style_request_bytes() {
    let x: Vec<f32> = (0..9).map(|i| i as f32 / 3.0).collect();
    let ids = [4i32, 5, 6];
    let header = r#"{"inputs": [{"name": "x", "shape": [3, 3], "datatype": "FP32", "parameters": {"binary_data_size": 36}}, {"name": "ids", "shape": [3], "datatype": "INT32", "parameters": {"binary_data_size": 12}}], "outputs": [{"name": "label", "parameters": {"binary_data": true}}, {"name": "probs", "parameters": {"binary_data": true}}]}"#;
    let mut body = header.as_bytes().to_vec();
    body.extend(f32_bytes(&x));
    body.extend(i32_bytes(&ids));
    let (inputs, outputs) = model();
    let req = decode_request(&body, Some(header.len()), &inputs, &outputs).unwrap();
    assert_eq!(req.inputs[0], Tensor::from_f32(vec![3, 3], x).unwrap());
    assert_eq!(req.inputs[1].data, TensorData::I32(ids.to_vec()));
    assert_eq!(
        req.outputs,
        Some(vec![
            RequestedOutput {
                name: "label".into(),
                binary: true
            },
            RequestedOutput {
                name: "probs".into(),
                binary: true
            },
        ])
    );

    // The response lists the outputs in the requested order; blobs follow in that order too,
    // which is how tritonclient's InferResult slices them.
    let values = model_outputs(3);
    let resp = encode_response("clf", "1.2.0", &req, &outputs, &values).unwrap();
    let (header, tail) = split(&resp);
    let listed = header["outputs"].as_array().unwrap();
    assert_eq!(listed[0]["name"], "label");
    assert_eq!(listed[0]["parameters"]["binary_data_size"], 24);
    assert_eq!(listed[1]["name"], "probs");
    assert_eq!(listed[1]["parameters"]["binary_data_size"], 36);
    assert!(listed.iter().all(|o| o.get("data").is_none()));
    let mut expected = values[1].to_le_bytes();
    expected.extend(values[0].to_le_bytes());
    assert_eq!(tail, &expected[..]);
}

/// tritonclient with `outputs=None` asks for every output through `binary_data_output`.
#[test]
fn tritonclient_default_outputs_use_binary_data_output() {
    let header = r#"{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}, {"name": "ids", "shape": [1], "datatype": "INT32", "parameters": {"binary_data_size": 4}}], "parameters": {"binary_data_output": true}}"#;
    let mut body = header.as_bytes().to_vec();
    body.extend(f32_bytes(&[1.0, 2.0, 3.0]));
    body.extend(i32_bytes(&[9]));
    let (inputs, outputs) = model();
    let req = decode_request(&body, Some(header.len()), &inputs, &outputs).unwrap();
    assert_eq!(req.outputs, None);
    assert!(req.binary_response);
    let resp = encode_response("clf", "1", &req, &outputs, &model_outputs(1)).unwrap();
    let (header, tail) = split(&resp);
    assert_eq!(header["outputs"][0]["parameters"]["binary_data_size"], 12);
    assert_eq!(header["outputs"][1]["parameters"]["binary_data_size"], 8);
    assert_eq!(tail.len(), 20);
}

/// KServe's Python client sends compact JSON and may include nulls for absent fields.
#[test]
fn kserve_client_style_json_with_nulls() {
    let body = br#"{"id":"k1","parameters":null,"inputs":[{"name":"x","shape":[2,3],"datatype":"FP32","parameters":null,"data":[[1.0,2.0,3.0],[4.0,5.0,6.0]]},{"name":"ids","shape":[2],"datatype":"INT32","parameters":null,"data":[1,2]}],"outputs":null}"#;
    let (inputs, outputs) = model();
    let req = decode_request(body, None, &inputs, &outputs).unwrap();
    assert_eq!(req.inputs[0].shape, vec![2, 3]);
    let resp = encode_response("clf", "1", &req, &outputs, &model_outputs(2)).unwrap();
    assert_eq!(resp.header_len, None);
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(body["outputs"][1]["data"], json!([-1, 9]));
}

#[test]
fn json_and_binary_inputs_can_be_mixed() {
    let req = decode_binary(
        &json!({
            "inputs": [
                {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
                {"name": "ids", "shape": [2], "datatype": "INT32", "parameters": {"binary_data_size": 8}}
            ]
        }),
        &[&i32_bytes(&[5, 6])],
    )
    .unwrap();
    assert_eq!(req.inputs[1].data, TensorData::I32(vec![5, 6]));
}

#[test]
fn binary_blobs_follow_header_order_not_model_order() {
    let req = decode_binary(
        &json!({
            "inputs": [
                {"name": "ids", "shape": [1], "datatype": "INT32", "parameters": {"binary_data_size": 4}},
                {"name": "x", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}
            ]
        }),
        &[&i32_bytes(&[77]), &f32_bytes(&[1.0, 2.0, 3.0])],
    )
    .unwrap();
    assert_eq!(req.inputs[0].as_f32().unwrap(), &[1.0, 2.0, 3.0]);
    assert_eq!(req.inputs[1].data, TensorData::I32(vec![77]));
}

#[test]
fn output_binary_data_overrides_binary_data_output() {
    let req = decode_json(&json!({
        "inputs": [
            {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
            {"name": "ids", "shape": [1], "datatype": "INT32", "data": [1]}
        ],
        "parameters": {"binary_data_output": true},
        "outputs": [
            {"name": "probs", "parameters": {"binary_data": false}},
            {"name": "label"}
        ]
    }))
    .unwrap();
    assert_eq!(
        req.outputs,
        Some(vec![
            RequestedOutput {
                name: "probs".into(),
                binary: false
            },
            RequestedOutput {
                name: "label".into(),
                binary: true
            },
        ])
    );
    let (_, outputs) = model();
    let values = model_outputs(1);
    let resp = encode_response("clf", "1", &req, &outputs, &values).unwrap();
    let (header, tail) = split(&resp);
    assert_eq!(header["outputs"][0]["data"], json!([0.0, 0.25, 0.5]));
    assert_eq!(header["outputs"][1]["parameters"]["binary_data_size"], 8);
    assert_eq!(tail, &(-1i64).to_le_bytes()[..]);
}

#[test]
fn requested_output_subset_without_binary_is_json() {
    let req = decode_json(&json!({
        "inputs": [
            {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
            {"name": "ids", "shape": [1], "datatype": "INT32", "data": [1]}
        ],
        "outputs": [{"name": "label"}]
    }))
    .unwrap();
    let (_, outputs) = model();
    let resp = encode_response("clf", "", &req, &outputs, &model_outputs(1)).unwrap();
    assert_eq!(resp.header_len, None);
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(
        body,
        json!({"model_name": "clf", "outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [-1]}]}),
        "no id and an empty version are left out"
    );
}

#[test]
fn empty_outputs_list_means_all_outputs() {
    let req = decode_json(&json!({
        "inputs": [
            {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
            {"name": "ids", "shape": [1], "datatype": "INT32", "data": [1]}
        ],
        "outputs": []
    }))
    .unwrap();
    assert_eq!(req.outputs, None);
}

#[test]
fn integer_and_uint8_tensors_in_json() {
    let inputs = [
        spec("tokens", DType::I64, &[None]),
        spec("image", DType::U8, &[Some(2), Some(2)]),
    ];
    let body = json!({"inputs": [
        {"name": "tokens", "shape": [3], "datatype": "INT64", "data": [-9223372036854775808i64, 0, 9223372036854775807i64]},
        {"name": "image", "shape": [2, 2], "datatype": "UINT8", "data": [[0, 255], [1, 128]]}
    ]});
    let req = decode_request(&serde_json::to_vec(&body).unwrap(), None, &inputs, &[]).unwrap();
    assert_eq!(
        req.inputs[0].data,
        TensorData::I64(vec![i64::MIN, 0, i64::MAX])
    );
    assert_eq!(req.inputs[1].data, TensorData::U8(vec![0, 255, 1, 128]));
    // UINT8 outputs come back as JSON numbers, not a byte string.
    let out = [spec("image", DType::U8, &[Some(2), Some(2)])];
    let resp = encode_response("m", "1", &req, &out, &[req.inputs[1].clone()]).unwrap();
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(body["outputs"][0]["data"], json!([0, 255, 1, 128]));
}

#[test]
fn non_finite_json_outputs_are_null() {
    let req = decode_json(&json!({
        "inputs": [
            {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
            {"name": "ids", "shape": [1], "datatype": "INT32", "data": [1]}
        ]
    }))
    .unwrap();
    let (_, outputs) = model();
    let mut values = model_outputs(1);
    values[0] = Tensor::from_f32(vec![1, 3], vec![f32::NAN, f32::NEG_INFINITY, 0.1]).unwrap();
    let resp = encode_response("clf", "1", &req, &outputs, &values).unwrap();
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(body["outputs"][0]["data"], json!([null, null, 0.1]));
}

#[test]
fn zero_batch_is_allowed() {
    let req = decode_json(&json!({
        "inputs": [
            {"name": "x", "shape": [0, 3], "datatype": "FP32", "data": []},
            {"name": "ids", "shape": [0], "datatype": "INT32", "data": []}
        ]
    }))
    .unwrap();
    assert!(req.inputs[0].is_empty());
}

#[test]
fn header_length_equal_to_body_without_binary_inputs_is_fine() {
    let (body, header_len) = binary_body(
        &json!({"inputs": [
            {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
            {"name": "ids", "shape": [1], "datatype": "INT32", "data": [1]}
        ]}),
        &[],
    );
    let (inputs, outputs) = model();
    decode_request(&body, Some(header_len), &inputs, &outputs).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Errors: each names what is wrong
// ---------------------------------------------------------------------------------------------

fn with_x(x: Value) -> Value {
    json!({"inputs": [x, {"name": "ids", "shape": [1], "datatype": "INT32", "data": [1]}]})
}

fn assert_contains(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "message {message:?} lacks {part:?}");
    }
}

#[test]
fn malformed_json_is_an_error() {
    let (inputs, outputs) = model();
    let err = decode_request(b"{\"inputs\": [", None, &inputs, &outputs).unwrap_err();
    assert_eq!(err.status(), 400);
    assert_contains(&err.to_string(), &["not valid JSON"]);
    let err = decode_request(b"", None, &inputs, &outputs).unwrap_err();
    assert_contains(&err.to_string(), &["not valid JSON"]);
}

#[test]
fn non_utf8_body_is_an_error() {
    let (inputs, outputs) = model();
    let err = decode_request(b"{\"id\": \"\xff\xfe\"}", None, &inputs, &outputs).unwrap_err();
    assert_contains(&err.to_string(), &["not valid JSON"]);
}

#[test]
fn wrong_top_level_types_are_errors() {
    assert_contains(
        &decode_err(&json!([1, 2])),
        &["request", "JSON object", "an array"],
    );
    assert_contains(
        &decode_err(&json!({"inputs": {"x": 1}})),
        &["\"inputs\" must be an array"],
    );
    assert_contains(&decode_err(&json!({})), &["\"inputs\" is missing"]);
    assert_contains(
        &decode_err(&json!({"id": 5, "inputs": []})),
        &["\"id\" must be a string"],
    );
    assert_contains(
        &decode_err(&json!({"inputs": [], "parameters": [1]})),
        &["\"parameters\" must be an object"],
    );
    assert_contains(
        &decode_err(&json!({"inputs": [], "parameters": {"binary_data_output": "yes"}})),
        &["binary_data_output", "true or false", "\"yes\""],
    );
    assert_contains(
        &decode_err(&json!({"inputs": [7]})),
        &["inputs[0]", "object"],
    );
    assert_contains(
        &decode_err(&json!({"inputs": [{"shape": [1]}]})),
        &["inputs[0]", "\"name\" is missing"],
    );
}

#[test]
fn trailing_bytes_without_header_length_hint_at_the_header() {
    let (inputs, outputs) = model();
    let mut body = serde_json::to_vec(&json!({"inputs": []})).unwrap();
    body.extend_from_slice(&[0, 0, 128, 63]);
    let err = decode_request(&body, None, &inputs, &outputs).unwrap_err();
    assert_contains(&err.to_string(), &["Inference-Header-Content-Length"]);
}

#[test]
fn unknown_duplicate_and_missing_inputs() {
    let err = decode_err(&json!({"inputs": [
        {"name": "y", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
    ]}));
    assert_contains(&err, &["unknown input 'y'", "'x'", "'ids'"]);

    let x = json!({"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]});
    let err = decode_err(&json!({"inputs": [x, x]}));
    assert_contains(&err, &["input 'x' is given more than once"]);

    let err = decode_err(&json!({"inputs": [x]}));
    assert_contains(&err, &["missing input", "'ids'", "INT32", "[-1]"]);
    let err = decode_err(&json!({"inputs": []}));
    assert_contains(&err, &["'x' (FP32 [-1, 3])", "'ids' (INT32 [-1])"]);
}

#[test]
fn datatype_must_match() {
    let err = decode_json(&with_x(
        json!({"name": "x", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}),
    ))
    .unwrap_err();
    assert!(matches!(err, OipError::DatatypeMismatch { .. }));
    assert_contains(&err.to_string(), &["input 'x'", "INT64", "FP32"]);

    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [1, 3], "datatype": "BYTES", "data": ["a", "b", "c"]}),
    ));
    assert_contains(&err, &["input 'x'", "BYTES", "not supported", "FP32"]);
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [1, 3], "datatype": "FP16", "parameters": {"binary_data_size": 6}}),
    ));
    assert_contains(&err, &["input 'x'", "FP16", "not supported"]);
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [1, 3], "data": [1, 2, 3]}),
    ));
    assert_contains(&err, &["input 'x'", "\"datatype\" is missing"]);
}

#[test]
fn shape_must_fit_the_spec() {
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}),
    ));
    assert_contains(&err, &["input 'x'", "shape [3]", "[-1, 3]"]);
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}),
    ));
    assert_contains(&err, &["input 'x'", "shape [1, 4]", "[-1, 3]"]);
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [-1, 3], "datatype": "FP32", "data": [1, 2, 3]}),
    ));
    assert_contains(&err, &["input 'x'", "non-negative integers", "-1"]);
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [1.5, 3], "datatype": "FP32", "data": [1, 2, 3]}),
    ));
    assert_contains(&err, &["input 'x'", "non-negative integers", "1.5"]);
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": "1,3", "datatype": "FP32", "data": [1, 2, 3]}),
    ));
    assert_contains(&err, &["input 'x'", "\"shape\" must be an array"]);
}

#[test]
fn absurd_sizes_are_refused() {
    // Product overflows u64.
    let err = decode_json(&with_x(json!({
        "name": "x", "shape": [u64::MAX, 3], "datatype": "FP32", "parameters": {"binary_data_size": 0}
    })))
    .unwrap_err();
    assert!(matches!(err, OipError::TooLarge { .. }), "{err}");
    assert_contains(
        &err.to_string(),
        &["input 'x'", "18446744073709551615", "more than"],
    );

    // Fits in memory arithmetic but exceeds the per-tensor limit.
    let batch = MAX_ELEMENTS / 3 + 1;
    let err = decode_err(&with_x(json!({
        "name": "x", "shape": [batch, 3], "datatype": "FP32", "data": [1, 2, 3]
    })));
    assert_contains(
        &err,
        &["input 'x'", &MAX_ELEMENTS.to_string(), "elements allowed"],
    );

    // A huge dimension next to a zero one is refused too.
    let inputs = [spec("z", DType::F32, &[None, None])];
    let body = json!({"inputs": [{"name": "z", "shape": [0, 1u64 << 40], "datatype": "FP32", "data": []}]});
    let err = decode_request(&serde_json::to_vec(&body).unwrap(), None, &inputs, &[]).unwrap_err();
    assert!(matches!(err, OipError::TooLarge { .. }), "{err}");
}

#[test]
fn element_count_must_match_shape() {
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3]}),
    ));
    assert_contains(&err, &["input 'x'", "[2, 3]", "6 elements", "data has 3"]);
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3, 4]}),
    ));
    assert_contains(&err, &["input 'x'", "3 elements", "data has 4"]);
}

#[test]
fn ragged_or_misnested_data_is_refused() {
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3, 4], [5, 6]]}),
    ));
    assert_contains(&err, &["input 'x'", "ragged"]);
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], 4, 5, 6]}),
    ));
    assert_contains(&err, &["input 'x'", "ragged"]);
    // Regular but transposed nesting: the element count fits, the layout does not.
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2], [3, 4], [5, 6]]}),
    ));
    assert_contains(&err, &["input 'x'", "[3, 2]", "[2, 3]", "flat array"]);
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [1, 3], "datatype": "FP32", "data": 1}),
    ));
    assert_contains(&err, &["input 'x'", "\"data\" must be an array"]);
}

#[test]
fn element_types_and_ranges_are_checked() {
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, true, 3]}),
    ));
    assert_contains(
        &err,
        &["input 'x'", "element 1", "true", "expected a number"],
    );
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, null, 3]}),
    ));
    assert_contains(&err, &["input 'x'", "element 1", "null"]);
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 1e39]}),
    ));
    assert_contains(&err, &["input 'x'", "element 2", "out of the FP32 range"]);
    for spelling in ["NaN", "Infinity", "-Infinity"] {
        let err = decode_err(&with_x(
            json!({"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, spelling, 3]}),
        ));
        assert_contains(&err, &["input 'x'", "element 1", spelling, "binary data"]);
    }

    let ids = |v: Value| {
        json!({"inputs": [
            {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
            {"name": "ids", "shape": [1], "datatype": "INT32", "data": [v]}
        ]})
    };
    assert_contains(
        &decode_err(&ids(json!(1.5))),
        &["input 'ids'", "element 0", "1.5", "not an integer"],
    );
    assert_contains(
        &decode_err(&ids(json!(1.0))),
        &["input 'ids'", "not an integer"],
    );
    assert_contains(
        &decode_err(&ids(json!(2147483648u64))),
        &["input 'ids'", "2147483648", "out of the INT32 range"],
    );
    assert_contains(
        &decode_err(&ids(json!("3"))),
        &["input 'ids'", "\"3\"", "expected an integer"],
    );

    let inputs = [spec("image", DType::U8, &[None])];
    for bad in [json!(-1), json!(256)] {
        let body = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "UINT8", "data": [bad]}]});
        let err = decode_request(&serde_json::to_vec(&body).unwrap(), None, &inputs, &[])
            .unwrap_err()
            .to_string();
        assert_contains(&err, &["input 'image'", "out of the UINT8 range"]);
    }
    let inputs = [spec("t", DType::I64, &[None])];
    let body = br#"{"inputs": [{"name": "t", "shape": [1], "datatype": "INT64", "data": [9223372036854775808]}]}"#;
    let err = decode_request(body, None, &inputs, &[])
        .unwrap_err()
        .to_string();
    assert_contains(&err, &["input 't'", "out of the INT64 range"]);
}

#[test]
fn data_presence_is_checked() {
    let err = decode_err(&with_x(
        json!({"name": "x", "shape": [1, 3], "datatype": "FP32"}),
    ));
    assert_contains(&err, &["input 'x'", "has no \"data\""]);
    let err = decode_binary(
        &with_x(json!({
            "name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3],
            "parameters": {"binary_data_size": 12}
        })),
        &[&f32_bytes(&[1.0, 2.0, 3.0])],
    )
    .unwrap_err();
    assert_contains(&err.to_string(), &["input 'x'", "both \"data\" and"]);
}

#[test]
fn binary_errors() {
    let x_bin = |size: Value| {
        with_x(
            json!({"name": "x", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": size}}),
        )
    };
    let three = f32_bytes(&[1.0, 2.0, 3.0]);

    // Declared size disagrees with the shape.
    let err = decode_binary(&x_bin(json!(8)), &[&three[..8]]).unwrap_err();
    assert!(matches!(err, OipError::BinarySize { .. }));
    assert_contains(
        &err.to_string(),
        &["input 'x'", "8 bytes", "[1, 3]", "FP32", "needs 12"],
    );

    // Not a size.
    let err = decode_binary(&x_bin(json!(-12)), &[&three]).unwrap_err();
    assert_contains(
        &err.to_string(),
        &["input 'x'", "binary_data_size", "non-negative integer"],
    );

    // Missing bytes.
    let err = decode_binary(&x_bin(json!(12)), &[&three[..10]]).unwrap_err();
    assert!(matches!(err, OipError::MissingBinaryData { .. }));
    assert_contains(&err.to_string(), &["12 bytes", "only 10 bytes"]);

    // Leftover bytes.
    let err = decode_binary(&x_bin(json!(12)), &[&three, &[1, 2]]).unwrap_err();
    assert!(matches!(err, OipError::TrailingBytes { .. }));
    assert_contains(&err.to_string(), &["2 bytes", "no input claims"]);

    // Bytes after a JSON-only header.
    let err = decode_binary(
        &with_x(json!({"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]})),
        &[&[0]],
    )
    .unwrap_err();
    assert_contains(&err.to_string(), &["1 bytes", "no input claims"]);

    // Header length beyond the body.
    let (inputs, outputs) = model();
    let (body, _) = binary_body(&x_bin(json!(12)), &[&three]);
    let err = decode_request(&body, Some(body.len() + 1), &inputs, &outputs).unwrap_err();
    assert!(matches!(err, OipError::HeaderLength { .. }));
    assert_contains(
        &err.to_string(),
        &[
            "Inference-Header-Content-Length",
            &(body.len() + 1).to_string(),
            "only",
        ],
    );

    // Header length cutting the JSON short.
    let err = decode_request(&body, Some(10), &inputs, &outputs).unwrap_err();
    assert_contains(&err.to_string(), &["not valid JSON"]);

    // Binary input without the header.
    let err = decode_request(&body, None, &inputs, &outputs).unwrap_err();
    assert_contains(
        &err.to_string(),
        &["not valid JSON", "Inference-Header-Content-Length"],
    );
    let header_only = serde_json::to_vec(&x_bin(json!(12))).unwrap();
    let err = decode_request(&header_only, None, &inputs, &outputs).unwrap_err();
    assert!(matches!(err, OipError::BinaryWithoutHeader { .. }));
    assert_contains(
        &err.to_string(),
        &["input 'x'", "no Inference-Header-Content-Length"],
    );
}

#[test]
fn requested_output_errors() {
    let base = |outputs: Value| {
        json!({
            "inputs": [
                {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
                {"name": "ids", "shape": [1], "datatype": "INT32", "data": [1]}
            ],
            "outputs": outputs
        })
    };
    assert_contains(
        &decode_err(&base(json!([{"name": "logits"}]))),
        &["unknown output 'logits'", "'probs'", "'label'"],
    );
    assert_contains(
        &decode_err(&base(json!([{"name": "label"}, {"name": "label"}]))),
        &["output 'label' is requested more than once"],
    );
    assert_contains(
        &decode_err(&base(
            json!([{"name": "label", "parameters": {"binary_data": 1}}]),
        )),
        &["output 'label'", "binary_data", "true or false"],
    );
    assert_contains(
        &decode_err(&base(
            json!([{"name": "probs", "parameters": {"classification": 2}}]),
        )),
        &["output 'probs'", "classification", "not supported"],
    );
    assert_contains(
        &decode_err(&base(json!({"name": "probs"}))),
        &["\"outputs\" must be an array"],
    );
    assert_contains(
        &decode_err(&base(json!([{}]))),
        &["outputs[0]", "\"name\" is missing"],
    );
}

#[test]
fn shared_memory_is_refused() {
    let err = decode_err(&with_x(json!({
        "name": "x", "shape": [1, 3], "datatype": "FP32",
        "parameters": {"shared_memory_region": "r0", "shared_memory_byte_size": 12}
    })));
    assert_contains(&err, &["input 'x'", "shared memory", "not supported"]);
}

#[test]
fn encode_rejects_outputs_that_break_the_schema() {
    let req = decode_json(&json!({
        "inputs": [
            {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
            {"name": "ids", "shape": [1], "datatype": "INT32", "data": [1]}
        ]
    }))
    .unwrap();
    let (_, outputs) = model();
    let mut values = model_outputs(1);
    values[1] = Tensor::new(vec![1], TensorData::I32(vec![1])).unwrap();
    let err = encode_response("clf", "1", &req, &outputs, &values).unwrap_err();
    assert_eq!(err.status(), 500);
    assert_contains(
        &err.to_string(),
        &["model output 'label'", "INT32", "INT64"],
    );

    let mut values = model_outputs(1);
    values[0] = Tensor::from_f32(vec![1, 2], vec![1.0, 2.0]).unwrap();
    let err = encode_response("clf", "1", &req, &outputs, &values).unwrap_err();
    assert_contains(
        &err.to_string(),
        &["model output 'probs'", "[1, 2]", "[-1, 3]"],
    );

    let err = encode_response("clf", "1", &req, &outputs, &model_outputs(1)[..1]).unwrap_err();
    assert_contains(&err.to_string(), &["declares 2 outputs but produced 1"]);

    // A tensor whose fields disagree (they are public) is an error, not a panic.
    let mut values = model_outputs(1);
    values[0].shape = vec![2, 3];
    let err = encode_response("clf", "1", &req, &outputs, &values).unwrap_err();
    assert_contains(
        &err.to_string(),
        &["model output 'probs'", "does not match"],
    );
}

#[test]
fn error_body_is_oip_json() {
    let body = error_body("input 'x': \"quoted\" and\nnewline");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v, json!({"error": "input 'x': \"quoted\" and\nnewline"}));
}
