//! `--quantize`: rewrite the float ONNX model into a smaller (and, where the runtime allows,
//! faster) one. The rewrite happens here, in the bundler; a device only runs what it is given.
//!
//! Modes (see `docs/bundle-format.md`, "Quantization"):
//! - `int8-weights`: per-channel symmetric int8 weights of Conv / MatMul / Gemm, each read back
//!   through a `DequantizeLinear` that the runtime folds into a float constant at load;
//! - `f16`: the same weights and the Conv / Gemm biases stored as float16, read back through a
//!   `Cast`;
//! - `int8`: static post-training quantization calibrated on sample inputs, in one of two
//!   [`Int8Form`]s: QDQ ([`static_int8`], the default) or QOperator ([`qoperator`]).
//!
//! Which nodes are touched: the op types of [`Selection::op_types`] minus the nodes named in
//! [`Selection::exclude_nodes`]. The quality gate that decides whether the result may ship is
//! in [`crate::quality`].

pub(crate) mod calibrate;
pub(crate) mod graph;
pub(crate) mod qoperator;
pub(crate) mod static_int8;
pub(crate) mod step;
#[cfg(test)]
mod tests;
pub(crate) mod weights;

use std::fmt;
use std::str::FromStr;

use crate::onnx_pb::GraphProto;

pub use calibrate::RangeMethod;

/// `--quantize MODE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantizeMode {
    #[default]
    None,
    Int8Weights,
    Int8,
    F16,
}

impl QuantizeMode {
    pub const NAMES: [&'static str; 4] = ["none", "int8-weights", "int8", "f16"];
}

impl FromStr for QuantizeMode {
    type Err = String;
    fn from_str(s: &str) -> Result<QuantizeMode, String> {
        Ok(match s {
            "none" => QuantizeMode::None,
            "int8-weights" => QuantizeMode::Int8Weights,
            "int8" => QuantizeMode::Int8,
            "f16" => QuantizeMode::F16,
            other => {
                return Err(format!(
                    "unknown quantization mode '{other}' (one of: {})",
                    QuantizeMode::NAMES.join(", ")
                ))
            }
        })
    }
}

impl fmt::Display for QuantizeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = *self as usize;
        f.write_str(QuantizeMode::NAMES[i])
    }
}

/// `--int8-form`: how a static `int8` model is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Int8Form {
    /// Float operators between `QuantizeLinear` / `DequantizeLinear` pairs; the runtime decides
    /// whether it recognises the pattern (tract 0.23.9 computes it in float).
    #[default]
    Qdq,
    /// The integer operators `QLinearConv` / `QLinearMatMul`, int8 tensors between them.
    QOperator,
}

impl Int8Form {
    pub const NAMES: [&'static str; 2] = ["qdq", "qoperator"];
}

impl FromStr for Int8Form {
    type Err = String;
    fn from_str(s: &str) -> Result<Int8Form, String> {
        match s {
            "qdq" => Ok(Int8Form::Qdq),
            "qoperator" => Ok(Int8Form::QOperator),
            other => Err(format!(
                "unknown int8 form '{other}' (one of: {})",
                Int8Form::NAMES.join(", ")
            )),
        }
    }
}

impl fmt::Display for Int8Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Int8Form::NAMES[*self as usize])
    }
}

/// Op types quantized when `--op-types` is not given.
pub const DEFAULT_OP_TYPES: [&str; 3] = ["Conv", "MatMul", "Gemm"];

/// Which nodes a mode may touch.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// `--op-types`; default [`DEFAULT_OP_TYPES`].
    pub op_types: Vec<String>,
    /// `--exclude-node`: node names kept in float.
    pub exclude_nodes: Vec<String>,
}

impl Default for Selection {
    fn default() -> Self {
        Selection {
            op_types: DEFAULT_OP_TYPES.iter().map(|s| s.to_string()).collect(),
            exclude_nodes: Vec::new(),
        }
    }
}

/// Why a model could not be quantized.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("cannot read the model as ONNX protobuf: {0}")]
    Parse(String),
    #[error("--exclude-node '{0}': the model has no node of that name")]
    UnknownNode(String),
    #[error(
        "--op-types '{0}' cannot be quantized in this mode (supported: {supported})",
        supported = .1.join(", ")
    )]
    UnsupportedOpType(String, Vec<&'static str>),
    #[error("the model's default opset is {found}; quantization nodes need opset 13 or later")]
    Opset { found: i64 },
    #[error(
        "nothing to quantize: no float weight initializer feeds a selected node (op types {})",
        .0.join(", ")
    )]
    Nothing(Vec<String>),
    #[error("calibration: {0}")]
    Calibration(String),
}

/// Indices of the nodes of the selected op types, minus the excluded ones.
pub(crate) fn selected_nodes(
    graph: &GraphProto,
    sel: &Selection,
) -> Result<Vec<usize>, QuantizeError> {
    for name in &sel.exclude_nodes {
        if !graph.node.iter().any(|n| &n.name == name) {
            return Err(QuantizeError::UnknownNode(name.clone()));
        }
    }
    Ok(graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| sel.op_types.contains(&n.op_type) && !sel.exclude_nodes.contains(&n.name))
        .map(|(i, _)| i)
        .collect())
}

/// What a weight-only rewrite produced.
#[derive(Debug, Clone)]
pub(crate) struct Rewritten {
    pub bytes: Vec<u8>,
    pub tensors: usize,
    pub parameters: u64,
}

/// `int8-weights` or `f16` on a float model's bytes.
pub(crate) fn weights_only(
    float_model: &[u8],
    mode: QuantizeMode,
    sel: &Selection,
) -> Result<Rewritten, QuantizeError> {
    let supported = DEFAULT_OP_TYPES.to_vec();
    if let Some(op) = sel
        .op_types
        .iter()
        .find(|o| !supported.contains(&o.as_str()))
    {
        return Err(QuantizeError::UnsupportedOpType(op.clone(), supported));
    }
    let mut model = graph::decode(float_model)?;
    if mode == QuantizeMode::Int8Weights {
        graph::require_opset_13(&model)?;
    }
    let g = graph::graph_mut(&mut model)?;
    let selected = selected_nodes(g, sel)?;
    let sites = weights::weight_sites(g, &selected);
    let summary = match mode {
        QuantizeMode::Int8Weights => weights::int8_weights(g, &sites)?,
        QuantizeMode::F16 => weights::f16_weights(g, &sites, &selected)?,
        _ => unreachable!("weights_only takes int8-weights or f16"),
    };
    if summary.tensors == 0 {
        return Err(QuantizeError::Nothing(sel.op_types.clone()));
    }
    Ok(Rewritten {
        bytes: graph::encode(&model),
        tensors: summary.tensors,
        parameters: summary.parameters,
    })
}
