//! Codec for inference requests and responses of the Open Inference Protocol (OIP, also called the
//! KServe V2 protocol) REST API, including the binary tensor data extension that Triton defined and
//! KServe adopted. Pure functions over bytes: no HTTP server, no engine.
//!
//! The HTTP layer hands [`decode_request`] the raw body of `POST /v2/models/{m}/infer` and the value
//! of the `Inference-Header-Content-Length` header, runs the model on [`InferRequest::inputs`], then
//! calls [`encode_response`] and sends [`EncodedResponse::body`] with the headers it describes.
//! Errors become HTTP status [`OipError::status`] with the body [`error_body`].
//!
//! # The protocol subset implemented
//!
//! **Request** (`$inference_request`): `id` (optional string, echoed), `parameters` (optional
//! object), `inputs` (required), `outputs` (optional). Other top-level fields (`model_name`, …) are
//! ignored.
//!
//! - Every model input must appear exactly once, by name, in any order; the decoded inputs are
//!   returned in the model's input order. Unknown, duplicate and missing inputs are errors.
//! - `datatype` must be the model's: `FP32`, `INT32`, `INT64` or `UINT8`. Other OIP datatypes
//!   (`BOOL`, `FP16`, `BYTES`, …) are refused, as no modelfleet model takes them.
//! - `shape` is a list of non-negative integers; it must have the model's rank and equal each fixed
//!   dimension (free dimensions such as the batch take any size). A tensor may hold at most
//!   [`MAX_ELEMENTS`] elements.
//! - JSON `data` is an array in row-major order, either flat or nested exactly like `shape`
//!   (`[[1, 2], [3, 4]]` for `[2, 2]`); ragged or partially nested arrays are refused. Its element
//!   count must be the product of `shape`. `FP32` takes JSON integers and floats that fit an `f32`;
//!   integer datatypes take JSON integers in range only (`1.0` is refused). JSON has no NaN or
//!   infinity, and the OIP defines no spelling for them, so strings such as `"NaN"` are refused
//!   (non-finite values can be sent as binary data).
//!
//! **Binary tensor data extension** (requests): when the `Inference-Header-Content-Length` header is
//! present, the JSON header is the first that many bytes of the body and the rest holds the raw
//! tensors. An input with the parameter `binary_data_size` carries no `data`; its bytes are the next
//! `binary_data_size` bytes, little-endian, row-major, in the order the inputs appear in the JSON
//! header. `binary_data_size` must equal the element count times the element size, and the binary
//! sizes must add up to exactly the bytes after the header: leftover or missing bytes are errors.
//! JSON and binary inputs may be mixed. `BYTES` and `BOOL` (the datatypes with special binary
//! layouts) are not supported. Shared-memory inputs and outputs (`shared_memory_region`) and the
//! classification extension (`classification` on an output) are refused with an explicit message.
//!
//! **Requested outputs**: without `outputs` (or with an empty list) every model output is returned
//! in model order; otherwise the named ones in the order requested (unknown or duplicate names are
//! errors). An output is returned as binary data when its `parameters.binary_data` is `true`, or,
//! when that is absent, when the request's `parameters.binary_data_output` is `true` — the
//! precedence the extension specifies. Stock `tritonclient.http` therefore gets binary outputs and
//! KServe's JSON clients get JSON, each with default settings.
//!
//! **Response** (`$inference_response`): `model_name`, `model_version` (left out when empty), `id`
//! (when the request had one) and `outputs`, each with `name`, `datatype`, `shape` and either a flat
//! `data` array or `parameters.binary_data_size`. Binary outputs' bytes follow the JSON in the order
//! the outputs are listed, and [`EncodedResponse::header_len`] gives the JSON length for the
//! `Inference-Header-Content-Length` header. Non-finite `FP32` values in JSON `data` are written as
//! `null` (JSON has no NaN); numpy-based clients read `null` back as NaN, and binary outputs keep
//! the exact bits.
//!
//! Request-level parameters other than `binary_data_output` (`priority`, `timeout`, …) and unknown
//! tensor parameters are accepted and ignored, as the protocol lets servers do.
//!
//! Nothing in here panics on any input: malformed JSON, wrong types, non-UTF-8, absurd sizes and
//! truncated bodies all come back as an [`OipError`] whose message names the tensor at fault.

use std::collections::HashSet;
use std::fmt;

use engine::{Tensor, TensorData};
use protocol::manifest::{DType, TensorSpec};
use serde::Serialize;
use serde_json::{Map, Value};

/// Largest number of elements accepted in one tensor (64 Mi): 256 MiB of `FP32`.
pub const MAX_ELEMENTS: usize = 64 * 1024 * 1024;

/// A decoded inference request.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The request's `id`, to echo in the response.
    pub id: Option<String>,
    /// One tensor per model input, in the model's input order.
    pub inputs: Vec<Tensor>,
    /// The outputs asked for, in the order asked, each with its encoding resolved (output-level
    /// `binary_data` first, then the request's `binary_data_output`). `None`: every model output,
    /// in model order, binary exactly when [`InferRequest::binary_response`] is set.
    pub outputs: Option<Vec<RequestedOutput>>,
    /// Whether the request set `parameters.binary_data_output` to `true`.
    pub binary_response: bool,
    /// Whether any input arrived as binary tensor data (informational).
    pub binary_inputs: bool,
}

/// An output named in the request's `outputs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedOutput {
    pub name: String,
    /// Return this output as binary data rather than a JSON array.
    pub binary: bool,
}

/// A response ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedResponse {
    pub body: Vec<u8>,
    /// `Some(n)`: the body is `n` bytes of JSON followed by binary tensor data; send
    /// `Inference-Header-Content-Length: n` and `Content-Type: application/octet-stream`.
    /// `None`: the body is JSON only; send `Content-Type: application/json`.
    pub header_len: Option<usize>,
}

/// Why a request could not be decoded or a response encoded. Every message is meant for the
/// client: it names the tensor or field at fault and says what is wrong.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum OipError {
    #[error("request body is not valid JSON: {detail}")]
    InvalidJson { detail: String },
    #[error(
        "Inference-Header-Content-Length is {header_len} but the request body has only {body_len} bytes"
    )]
    HeaderLength { header_len: usize, body_len: usize },
    /// A field has the wrong JSON type or an invalid value. `context` says where (`request`,
    /// `input 'x'`, `output 'y'`, …).
    #[error("{context}: {problem}")]
    Malformed { context: String, problem: String },
    #[error("unknown input '{name}'; the model's inputs are {expected}")]
    UnknownInput { name: String, expected: String },
    #[error("input '{name}' is given more than once")]
    DuplicateInput { name: String },
    #[error("missing input {names}; every model input must be given")]
    MissingInput { names: String },
    #[error("input '{name}': datatype {got} does not match the model's {expected}")]
    DatatypeMismatch {
        name: String,
        got: String,
        expected: &'static str,
    },
    #[error(
        "input '{name}': datatype {got} is not supported (the model takes {expected}; supported: FP32, INT32, INT64, UINT8)"
    )]
    UnsupportedDatatype {
        name: String,
        got: String,
        expected: &'static str,
    },
    #[error(
        "input '{name}': shape {got} does not fit the model's shape {expected} (-1 = any size)"
    )]
    ShapeMismatch {
        name: String,
        got: String,
        expected: String,
    },
    #[error("input '{name}': shape {shape} has more than the {limit} elements allowed per tensor")]
    TooLarge {
        name: String,
        shape: String,
        limit: usize,
    },
    #[error("input '{name}': shape {shape} holds {expected} elements but data has {got}")]
    ElementCount {
        name: String,
        shape: String,
        expected: usize,
        got: usize,
    },
    #[error("input '{name}': data element {index} {problem}")]
    BadElement {
        name: String,
        index: usize,
        problem: String,
    },
    #[error("input '{name}': {problem}")]
    BadData { name: String, problem: String },
    #[error(
        "input '{name}': binary_data_size is {declared} bytes but shape {shape} of {dtype} needs {expected}"
    )]
    BinarySize {
        name: String,
        declared: u64,
        expected: usize,
        shape: String,
        dtype: &'static str,
    },
    #[error(
        "input '{name}' is sent as binary data but the request has no Inference-Header-Content-Length header"
    )]
    BinaryWithoutHeader { name: String },
    #[error(
        "binary inputs declare {declared} bytes in total but only {available} bytes follow the JSON header"
    )]
    MissingBinaryData { declared: u64, available: usize },
    #[error(
        "{extra} bytes follow the binary input data that no input claims (binary inputs declare {declared} bytes)"
    )]
    TrailingBytes { extra: u64, declared: u64 },
    #[error("unknown output '{name}' requested; the model's outputs are {expected}")]
    UnknownOutput { name: String, expected: String },
    #[error("output '{name}' is requested more than once")]
    DuplicateOutput { name: String },
    #[error("{context}: {feature} is not supported by this server")]
    Unsupported { context: String, feature: String },
    /// The model produced something its manifest does not declare: a server-side fault.
    #[error("model output '{name}': {problem}")]
    OutputMismatch { name: String, problem: String },
}

impl OipError {
    /// The HTTP status for this error: 500 for [`OipError::OutputMismatch`] (the server's fault),
    /// 400 for everything else.
    pub fn status(&self) -> u16 {
        match self {
            OipError::OutputMismatch { .. } => 500,
            _ => 400,
        }
    }
}

/// The OIP error body: `{"error": message}`.
pub fn error_body(message: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct ErrorBody<'a> {
        error: &'a str,
    }
    serde_json::to_vec(&ErrorBody { error: message }).unwrap_or_else(|_| b"{}".to_vec())
}

/// Decodes an inference request for a model with the given input and output schema.
///
/// `body` is the raw HTTP body; `header_len` the value of the `Inference-Header-Content-Length`
/// header, if present (the HTTP layer reports an unparsable header value itself).
pub fn decode_request(
    body: &[u8],
    header_len: Option<usize>,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Result<InferRequest, OipError> {
    let (header, binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(OipError::HeaderLength {
                header_len: n,
                body_len: body.len(),
            })
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let root: Value = serde_json::from_slice(header).map_err(|e| {
        let mut detail = e.to_string();
        if header_len.is_none() && detail.contains("trailing characters") {
            detail.push_str(
                " (a body with binary tensor data needs the Inference-Header-Content-Length header)",
            );
        }
        OipError::InvalidJson { detail }
    })?;
    let Value::Object(root) = root else {
        return Err(malformed(
            "request",
            format!("must be a JSON object, found {}", kind(&root)),
        ));
    };

    let id = match root.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(malformed(
                "request",
                format!("\"id\" must be a string, found {}", kind(other)),
            ))
        }
    };
    let params = parameters(root.get("parameters"), "request")?;
    let binary_response = bool_param(params, "binary_data_output", "request")?.unwrap_or(false);

    // Inputs: validate each against its spec, collect JSON tensors now and binary ones later.
    let raw_inputs = match root.get("inputs") {
        Some(Value::Array(a)) => a,
        None | Some(Value::Null) => {
            return Err(malformed(
                "request",
                "\"inputs\" is missing; give one entry per model input",
            ))
        }
        Some(other) => {
            return Err(malformed(
                "request",
                format!("\"inputs\" must be an array, found {}", kind(other)),
            ))
        }
    };
    let mut slots: Vec<Option<Tensor>> = vec![None; inputs.len()];
    let mut seen = vec![false; inputs.len()];
    // (slot, byte count, shape) of binary inputs, in header order.
    let mut pending: Vec<(usize, usize, Vec<usize>)> = Vec::new();
    for (i, raw) in raw_inputs.iter().enumerate() {
        let Value::Object(raw) = raw else {
            return Err(malformed(
                &format!("inputs[{i}]"),
                format!("must be an object, found {}", kind(raw)),
            ));
        };
        let name = match raw.get("name") {
            Some(Value::String(s)) => s.as_str(),
            None => return Err(malformed(&format!("inputs[{i}]"), "\"name\" is missing")),
            Some(other) => {
                return Err(malformed(
                    &format!("inputs[{i}]"),
                    format!("\"name\" must be a string, found {}", kind(other)),
                ))
            }
        };
        let Some(slot) = inputs.iter().position(|s| s.name == name) else {
            return Err(OipError::UnknownInput {
                name: name.to_string(),
                expected: name_list(inputs.iter().map(|s| s.name.as_str())),
            });
        };
        if std::mem::replace(&mut seen[slot], true) {
            return Err(OipError::DuplicateInput {
                name: name.to_string(),
            });
        }
        let spec = &inputs[slot];
        let context = format!("input '{name}'");

        let datatype = match raw.get("datatype") {
            Some(Value::String(s)) => s.as_str(),
            None => return Err(malformed(&context, "\"datatype\" is missing")),
            Some(other) => {
                return Err(malformed(
                    &context,
                    format!("\"datatype\" must be a string, found {}", kind(other)),
                ))
            }
        };
        match DType::from_oip_name(datatype) {
            Some(d) if d == spec.dtype => {}
            Some(_) => {
                return Err(OipError::DatatypeMismatch {
                    name: name.to_string(),
                    got: datatype.to_string(),
                    expected: spec.dtype.oip_name(),
                })
            }
            None => {
                return Err(OipError::UnsupportedDatatype {
                    name: name.to_string(),
                    got: datatype.to_string(),
                    expected: spec.dtype.oip_name(),
                })
            }
        }

        let dims = parse_shape(raw.get("shape"), &context)?;
        let fits = dims.len() == spec.shape.len()
            && spec
                .shape
                .iter()
                .zip(&dims)
                .all(|(want, &got)| want.is_none_or(|w| w as u64 == got));
        if !fits {
            return Err(OipError::ShapeMismatch {
                name: name.to_string(),
                got: fmt_shape(&dims),
                expected: fmt_shape(&spec.oip_shape()),
            });
        }
        let too_large = || OipError::TooLarge {
            name: name.to_string(),
            shape: fmt_shape(&dims),
            limit: MAX_ELEMENTS,
        };
        // Any dimension above the limit is refused even when another one is 0: no tensor of
        // this server has such a shape, and it keeps every later size computation small.
        let count = dims
            .iter()
            .try_fold(1u64, |acc, &d| {
                (d <= MAX_ELEMENTS as u64).then(|| acc.checked_mul(d))?
            })
            .filter(|&n| n <= MAX_ELEMENTS as u64)
            .ok_or_else(too_large)? as usize;
        let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();

        let params = parameters(raw.get("parameters"), &context)?;
        if params.is_some_and(|p| p.contains_key("shared_memory_region")) {
            return Err(OipError::Unsupported {
                context,
                feature: "shared memory (\"shared_memory_region\")".into(),
            });
        }
        let binary_size = match params.and_then(|p| p.get("binary_data_size")) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                malformed(
                    &context,
                    format!(
                        "\"binary_data_size\" must be a non-negative integer, found {}",
                        short(v)
                    ),
                )
            })?),
        };
        let data = raw.get("data").filter(|v| !v.is_null());
        match (binary_size, data) {
            (Some(_), Some(_)) => {
                return Err(bad_data(
                    name,
                    "has both \"data\" and a \"binary_data_size\" parameter; give one",
                ))
            }
            (None, None) => {
                return Err(bad_data(
                    name,
                    "has no \"data\" (and no \"binary_data_size\" parameter for binary data)",
                ))
            }
            (Some(declared), None) => {
                if header_len.is_none() {
                    return Err(OipError::BinaryWithoutHeader {
                        name: name.to_string(),
                    });
                }
                // count <= MAX_ELEMENTS and size <= 8: no overflow.
                let expected = count * spec.dtype.size();
                if declared != expected as u64 {
                    return Err(OipError::BinarySize {
                        name: name.to_string(),
                        declared,
                        expected,
                        shape: fmt_shape(&shape),
                        dtype: spec.dtype.oip_name(),
                    });
                }
                pending.push((slot, expected, shape));
            }
            (None, Some(data)) => {
                slots[slot] = Some(json_tensor(name, spec.dtype, shape, count, data)?);
            }
        }
    }

    let missing: Vec<&str> = inputs
        .iter()
        .zip(&seen)
        .filter(|(_, seen)| !**seen)
        .map(|(s, _)| s.name.as_str())
        .collect();
    if !missing.is_empty() {
        let names = inputs
            .iter()
            .filter(|s| missing.contains(&s.name.as_str()))
            .map(|s| {
                format!(
                    "'{}' ({} {})",
                    s.name,
                    s.dtype.oip_name(),
                    fmt_shape(&s.oip_shape())
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        return Err(OipError::MissingInput { names });
    }

    // Binary inputs: sizes are bounded per tensor, so the sum fits in u64.
    let declared: u64 = pending.iter().map(|(_, n, _)| *n as u64).sum();
    let available = binary.len() as u64;
    if declared > available {
        return Err(OipError::MissingBinaryData {
            declared,
            available: binary.len(),
        });
    }
    if declared < available {
        return Err(OipError::TrailingBytes {
            extra: available - declared,
            declared,
        });
    }
    let mut offset = 0;
    let binary_inputs = !pending.is_empty();
    for (slot, n, shape) in pending {
        let spec = &inputs[slot];
        let bytes = &binary[offset..offset + n];
        offset += n;
        let tensor = Tensor::from_le_bytes(spec.dtype, shape, bytes)
            .ok_or_else(|| bad_data(&spec.name, "binary data does not match its shape"))?;
        slots[slot] = Some(tensor);
    }
    let inputs: Vec<Tensor> = slots.into_iter().flatten().collect();

    let outputs = requested_outputs(root.get("outputs"), outputs, binary_response)?;
    Ok(InferRequest {
        id,
        inputs,
        outputs,
        binary_response,
        binary_inputs,
    })
}

/// Encodes the response to `request`. `values` are the model's outputs, one per entry of
/// `outputs` (the model's output schema) and in that order.
pub fn encode_response(
    model_name: &str,
    model_version: &str,
    request: &InferRequest,
    outputs: &[TensorSpec],
    values: &[Tensor],
) -> Result<EncodedResponse, OipError> {
    if values.len() != outputs.len() {
        return Err(OipError::OutputMismatch {
            name: name_list(outputs.iter().map(|s| s.name.as_str())),
            problem: format!(
                "the model declares {} outputs but produced {}",
                outputs.len(),
                values.len()
            ),
        });
    }
    for (spec, value) in outputs.iter().zip(values) {
        check_output(spec, value)?;
    }

    // (index into outputs, binary?) in response order.
    let selected: Vec<(usize, bool)> = match &request.outputs {
        None => (0..outputs.len())
            .map(|i| (i, request.binary_response))
            .collect(),
        Some(requested) => requested
            .iter()
            .map(|r| {
                outputs
                    .iter()
                    .position(|s| s.name == r.name)
                    .map(|i| (i, r.binary))
                    .ok_or_else(|| OipError::UnknownOutput {
                        name: r.name.clone(),
                        expected: name_list(outputs.iter().map(|s| s.name.as_str())),
                    })
            })
            .collect::<Result<_, _>>()?,
    };

    let mut blobs = Vec::new();
    let mut entries = Vec::with_capacity(selected.len());
    for (i, binary) in selected {
        let (spec, value) = (&outputs[i], &values[i]);
        let (data, parameters) = if binary {
            let bytes = value.to_le_bytes();
            let size = bytes.len();
            blobs.push(bytes);
            (
                None,
                Some(OutputParameters {
                    binary_data_size: size,
                }),
            )
        } else {
            (Some(JsonData(&value.data)), None)
        };
        entries.push(ResponseOutput {
            name: &spec.name,
            datatype: spec.dtype.oip_name(),
            shape: &value.shape,
            parameters,
            data,
        });
    }
    let response = ResponseBody {
        model_name,
        model_version: (!model_version.is_empty()).then_some(model_version),
        id: request.id.as_deref(),
        outputs: entries,
    };
    let mut body = serde_json::to_vec(&response).map_err(|e| OipError::OutputMismatch {
        name: model_name.to_string(),
        problem: format!("could not serialise the response: {e}"),
    })?;
    if blobs.is_empty() {
        return Ok(EncodedResponse {
            body,
            header_len: None,
        });
    }
    let header_len = body.len();
    body.reserve(blobs.iter().map(Vec::len).sum());
    for blob in blobs {
        body.extend_from_slice(&blob);
    }
    Ok(EncodedResponse {
        body,
        header_len: Some(header_len),
    })
}

#[derive(Serialize)]
struct ResponseBody<'a> {
    model_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<ResponseOutput<'a>>,
}

#[derive(Serialize)]
struct ResponseOutput<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<OutputParameters>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(Serialize)]
struct OutputParameters {
    binary_data_size: usize,
}

/// Flat JSON array of a tensor's elements (non-finite floats become `null`).
struct JsonData<'a>(&'a TensorData);

impl Serialize for JsonData<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            TensorData::F32(v) => v.serialize(s),
            TensorData::I32(v) => v.serialize(s),
            TensorData::I64(v) => v.serialize(s),
            TensorData::U8(v) => s.collect_seq(v.iter()),
        }
    }
}

fn check_output(spec: &TensorSpec, value: &Tensor) -> Result<(), OipError> {
    let mismatch = |problem: String| OipError::OutputMismatch {
        name: spec.name.clone(),
        problem,
    };
    if value.dtype() != spec.dtype {
        return Err(mismatch(format!(
            "produced {} but the model declares {}",
            value.dtype().oip_name(),
            spec.dtype.oip_name()
        )));
    }
    if !spec.accepts_shape(&value.shape) {
        return Err(mismatch(format!(
            "produced shape {} but the model declares {}",
            fmt_shape(&value.shape),
            fmt_shape(&spec.oip_shape())
        )));
    }
    let count = value
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if count != Some(value.len()) {
        return Err(mismatch(format!(
            "shape {} does not match its {} elements",
            fmt_shape(&value.shape),
            value.len()
        )));
    }
    Ok(())
}

fn requested_outputs(
    raw: Option<&Value>,
    outputs: &[TensorSpec],
    binary_response: bool,
) -> Result<Option<Vec<RequestedOutput>>, OipError> {
    let raw = match raw {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) if a.is_empty() => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(malformed(
                "request",
                format!("\"outputs\" must be an array, found {}", kind(other)),
            ))
        }
    };
    let mut seen = HashSet::new();
    let mut requested = Vec::with_capacity(raw.len());
    for (i, entry) in raw.iter().enumerate() {
        let Value::Object(entry) = entry else {
            return Err(malformed(
                &format!("outputs[{i}]"),
                format!("must be an object, found {}", kind(entry)),
            ));
        };
        let name = match entry.get("name") {
            Some(Value::String(s)) => s.as_str(),
            None => return Err(malformed(&format!("outputs[{i}]"), "\"name\" is missing")),
            Some(other) => {
                return Err(malformed(
                    &format!("outputs[{i}]"),
                    format!("\"name\" must be a string, found {}", kind(other)),
                ))
            }
        };
        if !outputs.iter().any(|s| s.name == name) {
            return Err(OipError::UnknownOutput {
                name: name.to_string(),
                expected: name_list(outputs.iter().map(|s| s.name.as_str())),
            });
        }
        if !seen.insert(name) {
            return Err(OipError::DuplicateOutput {
                name: name.to_string(),
            });
        }
        let context = format!("output '{name}'");
        let params = parameters(entry.get("parameters"), &context)?;
        if let Some(p) = params {
            if p.get("classification")
                .is_some_and(|v| v.as_u64() != Some(0))
            {
                return Err(OipError::Unsupported {
                    context,
                    feature: "the classification extension (\"classification\")".into(),
                });
            }
            if p.contains_key("shared_memory_region") {
                return Err(OipError::Unsupported {
                    context,
                    feature: "shared memory (\"shared_memory_region\")".into(),
                });
            }
        }
        let binary = bool_param(params, "binary_data", &context)?.unwrap_or(binary_response);
        requested.push(RequestedOutput {
            name: name.to_string(),
            binary,
        });
    }
    Ok(Some(requested))
}

/// The `parameters` object at `context`, if any.
fn parameters<'a>(
    raw: Option<&'a Value>,
    context: &str,
) -> Result<Option<&'a Map<String, Value>>, OipError> {
    match raw {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(malformed(
            context,
            format!("\"parameters\" must be an object, found {}", kind(other)),
        )),
    }
}

fn bool_param(
    params: Option<&Map<String, Value>>,
    key: &str,
    context: &str,
) -> Result<Option<bool>, OipError> {
    match params.and_then(|p| p.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(malformed(
            context,
            format!(
                "parameter \"{key}\" must be true or false, found {}",
                short(other)
            ),
        )),
    }
}

fn parse_shape(raw: Option<&Value>, context: &str) -> Result<Vec<u64>, OipError> {
    let dims = match raw {
        Some(Value::Array(dims)) => dims,
        None => return Err(malformed(context, "\"shape\" is missing")),
        Some(other) => {
            return Err(malformed(
                context,
                format!(
                    "\"shape\" must be an array of non-negative integers, found {}",
                    kind(other)
                ),
            ))
        }
    };
    dims.iter()
        .map(|d| {
            d.as_u64().ok_or_else(|| {
                malformed(
                    context,
                    format!(
                        "\"shape\" must be an array of non-negative integers, found {}",
                        short(d)
                    ),
                )
            })
        })
        .collect()
}

/// Builds a tensor from JSON `data`: flat, or nested exactly like `shape`.
fn json_tensor(
    name: &str,
    dtype: DType,
    shape: Vec<usize>,
    count: usize,
    data: &Value,
) -> Result<Tensor, OipError> {
    if !data.is_array() {
        return Err(bad_data(
            name,
            format!("\"data\" must be an array, found {}", kind(data)),
        ));
    }
    let mut leaves = Vec::new();
    let mut dims = Vec::new();
    let mut leaf_depth = None;
    collect_leaves(name, data, 0, &mut dims, &mut leaf_depth, &mut leaves)?;
    if leaves.len() != count {
        return Err(OipError::ElementCount {
            name: name.to_string(),
            shape: fmt_shape(&shape),
            expected: count,
            got: leaves.len(),
        });
    }
    // Nested data must follow the shape; a flat array (one level) always may be used.
    if dims.len() > 1 && dims != shape {
        return Err(bad_data(
            name,
            format!(
                "nested data has dimensions {} but the shape is {}; nest it exactly like the shape or send a flat array",
                fmt_shape(&dims),
                fmt_shape(&shape)
            ),
        ));
    }
    let data = match dtype {
        DType::F32 => TensorData::F32(convert(name, &leaves, f32_element)?),
        DType::I32 => TensorData::I32(convert(name, &leaves, int_element::<i32>)?),
        DType::I64 => TensorData::I64(convert(name, &leaves, int_element::<i64>)?),
        DType::U8 => TensorData::U8(convert(name, &leaves, int_element::<u8>)?),
    };
    Ok(Tensor { shape, data })
}

fn convert<T>(
    name: &str,
    leaves: &[&Value],
    element: fn(&Value) -> Result<T, String>,
) -> Result<Vec<T>, OipError> {
    leaves
        .iter()
        .enumerate()
        .map(|(index, v)| {
            element(v).map_err(|problem| OipError::BadElement {
                name: name.to_string(),
                index,
                problem,
            })
        })
        .collect()
}

/// Walks nested arrays in row-major order, collecting the scalars and checking that the nesting
/// is regular: all scalars at one depth, sibling arrays of equal length.
fn collect_leaves<'a>(
    name: &str,
    value: &'a Value,
    depth: usize,
    dims: &mut Vec<usize>,
    leaf_depth: &mut Option<usize>,
    leaves: &mut Vec<&'a Value>,
) -> Result<(), OipError> {
    let ragged = || {
        bad_data(
            name,
            "data is ragged: nested arrays must all have the same depth and sibling arrays the same length",
        )
    };
    match value {
        Value::Array(items) => {
            if leaf_depth.is_some_and(|d| depth >= d) {
                return Err(ragged());
            }
            match dims.get(depth) {
                Some(&len) if len != items.len() => return Err(ragged()),
                Some(_) => {}
                None => dims.push(items.len()),
            }
            for item in items {
                collect_leaves(name, item, depth + 1, dims, leaf_depth, leaves)?;
            }
        }
        scalar => {
            match *leaf_depth {
                Some(d) if d != depth => return Err(ragged()),
                Some(_) => {}
                None if dims.len() > depth => return Err(ragged()),
                None => *leaf_depth = Some(depth),
            }
            leaves.push(scalar);
        }
    }
    Ok(())
}

fn f32_element(v: &Value) -> Result<f32, String> {
    match v {
        Value::Number(n) => {
            let x = n.as_f64().ok_or_else(|| format!("{n} is not a number"))?;
            let y = x as f32;
            if y.is_finite() {
                Ok(y)
            } else {
                Err(format!("{n} is out of the FP32 range"))
            }
        }
        Value::String(s) if is_non_finite_spelling(s) => Err(format!(
            "is the string {s:?}: JSON has no NaN or infinity and the protocol defines no spelling for them; send this input as binary data (binary_data_size) to pass non-finite values"
        )),
        other => Err(format!("is {}, expected a number", short(other))),
    }
}

fn is_non_finite_spelling(s: &str) -> bool {
    let s = s.trim().trim_start_matches(['+', '-']).to_ascii_lowercase();
    matches!(s.as_str(), "nan" | "inf" | "infinity")
}

fn int_element<T>(v: &Value) -> Result<T, String>
where
    T: TryFrom<i64> + TryFrom<u64> + IntName,
{
    match v {
        Value::Number(n) => {
            let converted = if let Some(i) = n.as_i64() {
                <T as TryFrom<i64>>::try_from(i).ok()
            } else if let Some(u) = n.as_u64() {
                <T as TryFrom<u64>>::try_from(u).ok()
            } else {
                return Err(format!(
                    "{n} is not an integer ({} takes integers)",
                    T::NAME
                ));
            };
            converted.ok_or_else(|| format!("{n} is out of the {} range", T::NAME))
        }
        other => Err(format!("is {}, expected an integer", short(other))),
    }
}

trait IntName {
    const NAME: &'static str;
}
impl IntName for i32 {
    const NAME: &'static str = "INT32";
}
impl IntName for i64 {
    const NAME: &'static str = "INT64";
}
impl IntName for u8 {
    const NAME: &'static str = "UINT8";
}

fn malformed(context: &str, problem: impl Into<String>) -> OipError {
    OipError::Malformed {
        context: context.to_string(),
        problem: problem.into(),
    }
}

fn bad_data(name: &str, problem: impl Into<String>) -> OipError {
    OipError::BadData {
        name: name.to_string(),
        problem: problem.into(),
    }
}

/// The JSON type of a value, for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value for messages: scalars verbatim (strings truncated), containers by kind.
fn short(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() > 40 => {
            format!("the string {:?}…", s.chars().take(40).collect::<String>())
        }
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) | Value::Object(_) => kind(v).to_string(),
        other => other.to_string(),
    }
}

fn fmt_shape<T: fmt::Display>(dims: &[T]) -> String {
    let dims: Vec<String> = dims.iter().map(T::to_string).collect();
    format!("[{}]", dims.join(", "))
}

fn name_list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.map(|n| format!("'{n}'")).collect();
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: DType, shape: &[Option<usize>]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            range: None,
        }
    }

    /// xorshift64*: deterministic, dependency-free randomness.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn seeds() -> Vec<(Vec<u8>, Option<usize>)> {
        let json = br#"{"id":"7","inputs":[{"name":"x","shape":[2,3],"datatype":"FP32","data":[[1,2,3],[4.5,5,6]]},{"name":"k","shape":[1],"datatype":"INT64","data":[3]}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#.to_vec();
        let header = br#"{"inputs":[{"name":"k","shape":[1],"datatype":"INT64","parameters":{"binary_data_size":8}},{"name":"x","shape":[1,3],"datatype":"FP32","parameters":{"binary_data_size":12}}],"parameters":{"binary_data_output":true}}"#;
        let mut binary = header.to_vec();
        binary.extend_from_slice(&3i64.to_le_bytes());
        for v in [1.0f32, -2.0, f32::NAN] {
            binary.extend_from_slice(&v.to_le_bytes());
        }
        vec![(json, None), (binary, Some(header.len()))]
    }

    /// Decodes and, when that succeeds, encodes a response; returns whether the request decoded.
    fn run(body: &[u8], header_len: Option<usize>) -> bool {
        let inputs = [
            spec("x", DType::F32, &[None, Some(3)]),
            spec("k", DType::I64, &[Some(1)]),
        ];
        let outputs = [spec("y", DType::F32, &[None, Some(2)])];
        if let Ok(req) = decode_request(body, header_len, &inputs, &outputs) {
            let batch = req.inputs[0].shape[0];
            let y = Tensor::from_f32(vec![batch, 2], vec![0.5; batch * 2]).unwrap();
            encode_response("m", "1.0.0", &req, &outputs, &[y]).unwrap();
            return true;
        }
        false
    }

    #[test]
    fn seeds_decode() {
        let inputs = [
            spec("x", DType::F32, &[None, Some(3)]),
            spec("k", DType::I64, &[Some(1)]),
        ];
        let outputs = [spec("y", DType::F32, &[None, Some(2)])];
        for (body, header_len) in seeds() {
            decode_request(&body, header_len, &inputs, &outputs).unwrap();
        }
    }

    #[test]
    fn random_and_mangled_bytes_never_panic() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let seeds = seeds();
        let mut decoded = 0;
        for round in 0..20_000 {
            let (seed, seed_header) = &seeds[round % seeds.len()];
            let mut body = seed.clone();
            let mut header_len = *seed_header;
            match rng.below(6) {
                // Truncate anywhere.
                0 => body.truncate(rng.below(body.len() + 1)),
                // Flip, overwrite or insert a few bytes.
                1 if !body.is_empty() => {
                    for _ in 0..1 + rng.below(4) {
                        let i = rng.below(body.len());
                        match rng.below(3) {
                            0 => body[i] ^= 1 << rng.below(8),
                            1 => body[i] = rng.next() as u8,
                            _ => {
                                let alphabet = b"[]{}\",:-0e9.\xff";
                                body.insert(i, alphabet[rng.below(alphabet.len())])
                            }
                        }
                    }
                }
                1 => {}
                // Random header length, possibly beyond the body.
                2 => header_len = Some(rng.below(body.len() + 16)),
                // Pure noise.
                3 => {
                    body = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
                    header_len = [None, Some(rng.below(400))][rng.below(2)];
                }
                // Swap in suspicious numbers and shapes.
                4 => {
                    let text = String::from_utf8_lossy(&body).into_owned();
                    let subst = [
                        "18446744073709551615",
                        "-1",
                        "1e39",
                        "\"NaN\"",
                        "null",
                        "[[[]]]",
                        "4294967296",
                        "0",
                    ];
                    let text = text.replacen(
                        ["2", "3", "1", "8", "12"][rng.below(5)],
                        subst[rng.below(subst.len())],
                        1 + rng.below(3),
                    );
                    body = text.into_bytes();
                }
                // Drop the header length of a binary request, or add one to a JSON request.
                _ => header_len = header_len.xor(Some(body.len())),
            }
            decoded += usize::from(run(&body, header_len));
        }
        // Some mutations keep the request valid, so the encoder is exercised too.
        assert!(decoded > 100, "only {decoded} mangled requests decoded");
    }

    #[test]
    fn deep_nesting_and_huge_shapes_are_errors() {
        let inputs = [spec("x", DType::F32, &[None, None, None])];
        let deep = format!(
            r#"{{"inputs":[{{"name":"x","shape":[1,1,1],"datatype":"FP32","data":{}1{}}}]}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert!(decode_request(deep.as_bytes(), None, &inputs, &[]).is_err());
        let huge = br#"{"inputs":[{"name":"x","shape":[4294967296,4294967296,4294967296],"datatype":"FP32","parameters":{"binary_data_size":0}}]}"#;
        let err = decode_request(huge, Some(huge.len()), &inputs, &[]).unwrap_err();
        assert!(matches!(err, OipError::TooLarge { .. }), "{err}");
    }
}
