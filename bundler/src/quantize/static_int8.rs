//! `int8`: static post-training quantization in QDQ form (`--int8-form qdq`; the QOperator
//! form is [`super::qoperator`]).
//!
//! For each selected node (Conv, MatMul, Gemm by default): its weight becomes per-channel
//! symmetric int8 behind a `DequantizeLinear` (as in `int8-weights`), and its activation input
//! passes through a `QuantizeLinear` → `DequantizeLinear` pair with a per-tensor asymmetric
//! uint8 scale and zero point from the calibration range. Nothing else is touched: Softmax and
//! every other op stay in float (tract folds a quantized Softmax into a lookup table that
//! returns 1.0 for every class).

use std::collections::HashMap;

use super::graph::{self, Names};
use super::weights;
use super::{selected_nodes, QuantizeError, Rewritten, Selection, DEFAULT_OP_TYPES};
use crate::onnx_pb::{GraphProto, NodeProto};

/// The activation tensors (input 0 of each selected node that is not an initializer) whose
/// range calibration must find.
pub(crate) fn activation_tensors(
    float_model: &[u8],
    sel: &Selection,
) -> Result<Vec<String>, QuantizeError> {
    let model = graph::decode(float_model)?;
    let g = model
        .graph
        .as_ref()
        .ok_or_else(|| QuantizeError::Parse("the model has no graph".into()))?;
    Ok(activations(g, &selected_nodes(g, sel)?))
}

fn activations(g: &GraphProto, selected: &[usize]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for &i in selected {
        if let Some(x) = g.node[i].input.first() {
            let constant = g.initializer.iter().any(|t| &t.name == x);
            if !x.is_empty() && !constant && !names.contains(x) {
                names.push(x.clone());
            }
        }
    }
    names
}

/// uint8 asymmetric parameters for `[lo, hi]` (which holds 0): `scale = (hi - lo) / 255`,
/// `zero_point = round(-lo / scale)`.
pub(crate) fn uint8_params(lo: f32, hi: f32) -> (f32, u8) {
    let span = hi - lo;
    let scale = if span > 0.0 && span.is_finite() {
        span / 255.0
    } else {
        1.0
    };
    let zero_point = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zero_point)
}

/// int8 asymmetric parameters for `[lo, hi]`: the [`uint8_params`] scale, and its zero point
/// shifted by 128 (the same grid of values, stored signed).
pub(crate) fn int8_params(lo: f32, hi: f32) -> (f32, i8) {
    let (scale, zero_point) = uint8_params(lo, hi);
    (scale, (i16::from(zero_point) - 128) as i8)
}

/// The QDQ rewrite. `ranges` holds a range for each of [`activation_tensors`]; returns the new
/// model and the number of activations given a QDQ pair.
pub(crate) fn qdq(
    float_model: &[u8],
    sel: &Selection,
    ranges: &HashMap<String, (f32, f32)>,
) -> Result<(Rewritten, usize), QuantizeError> {
    let supported = DEFAULT_OP_TYPES.to_vec();
    if let Some(op) = sel
        .op_types
        .iter()
        .find(|o| !supported.contains(&o.as_str()))
    {
        return Err(QuantizeError::UnsupportedOpType(op.clone(), supported));
    }
    let mut model = graph::decode(float_model)?;
    graph::require_opset_13(&model)?;
    let g = graph::graph_mut(&mut model)?;
    let selected = selected_nodes(g, sel)?;
    let acts = activations(g, &selected);

    // Activation QDQ pairs, placed just before the first selected node that reads them.
    let mut names = Names::of(g);
    let mut before: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut renamed: HashMap<String, String> = HashMap::new();
    for x in &acts {
        let &(lo, hi) = ranges
            .get(x)
            .ok_or_else(|| QuantizeError::Calibration(format!("no range for tensor '{x}'")))?;
        let (scale, zp) = uint8_params(lo, hi);
        let (sn, zn, qn, dqn) = (
            names.fresh(x, "_act_scale"),
            names.fresh(x, "_act_zero_point"),
            names.fresh(x, "_quantized"),
            names.fresh(x, "_dequantized"),
        );
        g.initializer.push(graph::tensor_f32(&sn, &[], &[scale]));
        g.initializer.push(graph::tensor_u8(&zn, &[], &[zp]));
        let first = *selected
            .iter()
            .find(|&&i| g.node[i].input.first() == Some(x))
            .expect("activation of a selected node");
        let q = graph::node(
            "QuantizeLinear",
            names.fresh(x, "_quantize"),
            &[x, &sn, &zn],
            &[&qn],
            vec![],
        );
        let dq = graph::node(
            "DequantizeLinear",
            names.fresh(x, "_dequantize"),
            &[&qn, &sn, &zn],
            &[&dqn],
            vec![],
        );
        before.entry(first).or_default().extend([q, dq]);
        renamed.insert(x.clone(), dqn);
    }
    for &i in &selected {
        if let Some(x) = g.node[i].input.first_mut() {
            if let Some(dq) = renamed.get(x) {
                *x = dq.clone();
            }
        }
    }
    let nodes = std::mem::take(&mut g.node);
    for (i, n) in nodes.into_iter().enumerate() {
        if let Some(pair) = before.remove(&i) {
            g.node.extend(pair);
        }
        g.node.push(n);
    }

    // Weights: per-channel int8 (indices of selected nodes are stale now; find them again).
    let selected = selected_nodes(g, sel)?;
    let sites = weights::weight_sites(g, &selected);
    let summary = weights::int8_weights(g, &sites)?;
    if summary.tensors == 0 && acts.is_empty() {
        return Err(QuantizeError::Nothing(sel.op_types.clone()));
    }
    Ok((
        Rewritten {
            bytes: graph::encode(&model),
            tensors: summary.tensors,
            parameters: summary.parameters,
        },
        acts.len(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uint8_params_put_zero_on_a_step() {
        let (s, z) = uint8_params(-1.0, 3.0);
        assert!((s - 4.0 / 255.0).abs() < 1e-7);
        assert_eq!(z, 64);
        assert_eq!(uint8_params(0.0, 0.0), (1.0, 0));
        assert_eq!(uint8_params(0.0, 2.55).1, 0);
        // The same grid stored signed: 0.0 (after a Relu) is the lowest value, -128.
        assert_eq!(int8_params(0.0, 2.55), (uint8_params(0.0, 2.55).0, -128));
        assert_eq!(int8_params(-1.0, 3.0).1, -64); // 64 - 128
    }
}
