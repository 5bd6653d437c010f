//! Reading and writing the pieces of an ONNX graph that quantization touches: initializers as
//! `f32`, new initializers (int8, uint8, int32, int64, f16, f32), nodes with integer attributes, fresh
//! names, and which node reads which tensor.

use std::collections::{HashMap, HashSet};

use prost::Message;

use super::QuantizeError;
use crate::onnx_pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, GraphProto, ModelProto,
    NodeProto, TensorProto,
};

pub(crate) fn decode(bytes: &[u8]) -> Result<ModelProto, QuantizeError> {
    ModelProto::decode(bytes).map_err(|e| QuantizeError::Parse(e.to_string()))
}

pub(crate) fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// The opset of the default (`ai.onnx`) domain.
pub(crate) fn default_opset(model: &ModelProto) -> Option<i64> {
    model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
}

/// Refuses a model whose default opset is below 13: per-axis QuantizeLinear/DequantizeLinear
/// (and the quantized operators written with them) need opset 13.
pub(crate) fn require_opset_13(model: &ModelProto) -> Result<(), QuantizeError> {
    let opset = default_opset(model).unwrap_or(0);
    if opset < 13 {
        return Err(QuantizeError::Opset { found: opset });
    }
    Ok(())
}

pub(crate) fn graph_mut(model: &mut ModelProto) -> Result<&mut GraphProto, QuantizeError> {
    model
        .graph
        .as_mut()
        .ok_or_else(|| QuantizeError::Parse("the model has no graph".into()))
}

/// The values of a `FLOAT` initializer stored inside the file; `None` for other types and for
/// external data.
pub(crate) fn f32_values(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != DataType::Float as i32 || !t.external_data.is_empty() {
        return None;
    }
    let count: usize = t.dims.iter().map(|&d| d.max(0) as usize).product();
    let values: Vec<f32> = if !t.raw_data.is_empty() {
        t.raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        t.float_data.clone()
    };
    (values.len() == count).then_some(values)
}

fn raw(name: &str, dims: &[i64], data_type: DataType, raw_data: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: data_type as i32,
        raw_data,
        ..TensorProto::default()
    }
}

pub(crate) fn tensor_f32(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw(name, dims, DataType::Float, bytes)
}

pub(crate) fn tensor_i8(name: &str, dims: &[i64], data: &[i8]) -> TensorProto {
    raw(
        name,
        dims,
        DataType::Int8,
        data.iter().map(|&v| v as u8).collect(),
    )
}

pub(crate) fn tensor_u8(name: &str, dims: &[i64], data: &[u8]) -> TensorProto {
    raw(name, dims, DataType::Uint8, data.to_vec())
}

pub(crate) fn tensor_i32(name: &str, dims: &[i64], data: &[i32]) -> TensorProto {
    let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw(name, dims, DataType::Int32, bytes)
}

pub(crate) fn tensor_i64(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw(name, dims, DataType::Int64, bytes)
}

pub(crate) fn tensor_f16(name: &str, dims: &[i64], data: &[half::f16]) -> TensorProto {
    let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw(name, dims, DataType::Float16, bytes)
}

pub(crate) fn int_attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..AttributeProto::default()
    }
}

pub(crate) fn ints_attr(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..AttributeProto::default()
    }
}

/// An integer attribute of a node, if set.
pub(crate) fn get_int(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// A float attribute of a node, if set.
pub(crate) fn get_float(node: &NodeProto, name: &str) -> Option<f32> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}

pub(crate) fn node(
    op_type: &str,
    name: String,
    inputs: &[&str],
    outputs: &[&str],
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op_type.to_string(),
        name,
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute,
        ..NodeProto::default()
    }
}

/// Every tensor and node name in use, to make new ones that clash with nothing.
pub(crate) struct Names(HashSet<String>);

impl Names {
    pub(crate) fn of(graph: &GraphProto) -> Names {
        let mut used = HashSet::new();
        for n in &graph.node {
            used.insert(n.name.clone());
            used.extend(n.input.iter().cloned());
            used.extend(n.output.iter().cloned());
        }
        used.extend(graph.initializer.iter().map(|t| t.name.clone()));
        used.extend(graph.input.iter().map(|v| v.name.clone()));
        used.extend(graph.output.iter().map(|v| v.name.clone()));
        Names(used)
    }

    /// `base` + `suffix`, with a counter added if that is taken.
    pub(crate) fn fresh(&mut self, base: &str, suffix: &str) -> String {
        let mut name = format!("{base}{suffix}");
        let mut i = 1;
        while self.0.contains(&name) {
            name = format!("{base}{suffix}_{i}");
            i += 1;
        }
        self.0.insert(name.clone());
        name
    }
}

/// For each tensor name, the (node index, input index) pairs that read it.
pub(crate) fn consumers(graph: &GraphProto) -> HashMap<String, Vec<(usize, usize)>> {
    let mut map: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for (j, input) in n.input.iter().enumerate() {
            if !input.is_empty() {
                map.entry(input.clone()).or_default().push((i, j));
            }
        }
    }
    map
}
