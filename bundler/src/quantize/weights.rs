//! Weight-only conversions: per-channel symmetric int8 (`int8-weights`) and half precision
//! (`f16`). Each converted initializer is stored under a new name and a node that restores the
//! float tensor under the original name (`DequantizeLinear` or `Cast`) is put at the front of
//! the graph, so every consumer stays as it was. The runtime folds those nodes into constants
//! when it loads the model: serving runs the same float graph as before.

use std::collections::BTreeMap;

use super::graph::{self, Names};
use super::QuantizeError;
use crate::onnx_pb::{GraphProto, NodeProto, TensorProto};

/// A weight initializer of an eligible node and its output-channel axis.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WeightSite {
    pub initializer: String,
    pub axis: usize,
}

/// What a weight conversion changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct WeightsSummary {
    pub tensors: usize,
    pub parameters: u64,
}

/// The output-channel axis of the weight (input 1) of a Conv, MatMul or Gemm of rank `rank`.
fn weight_axis(node: &NodeProto, rank: usize) -> Option<usize> {
    match node.op_type.as_str() {
        "Conv" if rank >= 3 => Some(0),
        "MatMul" if rank >= 2 => Some(rank - 1),
        "Gemm" if rank == 2 => Some(if graph::get_int(node, "transB") == Some(1) {
            0
        } else {
            1
        }),
        _ => None,
    }
}

/// Float weight initializers (input 1) of the selected nodes, with their channel axis. An
/// initializer read with two different axes, or also read by a node that is not selected, is
/// left out.
pub(crate) fn weight_sites(graph: &GraphProto, selected: &[usize]) -> Vec<WeightSite> {
    let inits: BTreeMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let consumers = graph::consumers(graph);
    let mut sites: BTreeMap<String, Option<usize>> = BTreeMap::new();
    for &i in selected {
        let node = &graph.node[i];
        let Some(name) = node.input.get(1) else {
            continue;
        };
        let Some(init) = inits.get(name.as_str()) else {
            continue;
        };
        if graph::f32_values(init).is_none() {
            continue;
        }
        let axis = weight_axis(node, init.dims.len());
        let only_selected = consumers
            .get(name)
            .is_some_and(|c| c.iter().all(|(n, _)| selected.contains(n)));
        let entry = sites.entry(name.clone()).or_insert(axis);
        if *entry != axis || !only_selected {
            *entry = None;
        }
    }
    sites
        .into_iter()
        .filter_map(|(initializer, axis)| axis.map(|axis| WeightSite { initializer, axis }))
        .collect()
}

/// Bias initializers (input 2) of the selected Conv and Gemm nodes.
fn bias_names(graph: &GraphProto, selected: &[usize]) -> Vec<String> {
    let mut names: Vec<String> = selected
        .iter()
        .map(|&i| &graph.node[i])
        .filter(|n| matches!(n.op_type.as_str(), "Conv" | "Gemm"))
        .filter_map(|n| n.input.get(2).filter(|s| !s.is_empty()).cloned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Per-channel symmetric int8: for each slice along `axis`, `scale = max|w| / 127` and
/// `q = round(w / scale)` in [-127, 127]. An all-zero channel gets scale 1.
pub(crate) fn quantize_per_channel(
    values: &[f32],
    dims: &[i64],
    axis: usize,
) -> (Vec<i8>, Vec<f32>) {
    let channels = dims[axis].max(1) as usize;
    let inner: usize = dims[axis + 1..]
        .iter()
        .map(|&d| d.max(1) as usize)
        .product();
    let channel = |e: usize| (e / inner) % channels;
    let mut amax = vec![0f32; channels];
    for (e, v) in values.iter().enumerate() {
        amax[channel(e)] = amax[channel(e)].max(v.abs());
    }
    let scales: Vec<f32> = amax
        .iter()
        .map(|&m| if m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let q = values
        .iter()
        .enumerate()
        .map(|(e, v)| {
            (v / scales[channel(e)])
                .round_ties_even()
                .clamp(-127.0, 127.0) as i8
        })
        .collect();
    (q, scales)
}

/// Takes initializer `name` out of the graph (and out of the graph inputs, where old exporters
/// list initializers), returning it.
fn take_initializer(graph: &mut GraphProto, name: &str) -> Option<TensorProto> {
    let at = graph.initializer.iter().position(|t| t.name == name)?;
    graph.input.retain(|v| v.name != name);
    Some(graph.initializer.remove(at))
}

/// Replaces each weight initializer with int8 values, per-channel scales and a zero point of
/// zeros, read back through a `DequantizeLinear` (with `axis`) that outputs the original name.
pub(crate) fn int8_weights(
    graph: &mut GraphProto,
    sites: &[WeightSite],
) -> Result<WeightsSummary, QuantizeError> {
    let mut names = Names::of(graph);
    let mut front = Vec::new();
    let mut summary = WeightsSummary::default();
    for site in sites {
        let Some(init) = take_initializer(graph, &site.initializer) else {
            continue;
        };
        let values = graph::f32_values(&init).ok_or_else(|| {
            QuantizeError::Parse(format!("initializer '{}' is not float", init.name))
        })?;
        let (q, scales) = quantize_per_channel(&values, &init.dims, site.axis);
        let base = &site.initializer;
        let (qn, sn, zn) = (
            names.fresh(base, "_quantized"),
            names.fresh(base, "_scale"),
            names.fresh(base, "_zero_point"),
        );
        let c = scales.len() as i64;
        graph
            .initializer
            .push(graph::tensor_i8(&qn, &init.dims, &q));
        graph
            .initializer
            .push(graph::tensor_f32(&sn, &[c], &scales));
        graph
            .initializer
            .push(graph::tensor_i8(&zn, &[c], &vec![0; scales.len()]));
        front.push(graph::node(
            "DequantizeLinear",
            names.fresh(base, "_dequantize"),
            &[&qn, &sn, &zn],
            &[base],
            vec![graph::int_attr("axis", site.axis as i64)],
        ));
        summary.tensors += 1;
        summary.parameters += values.len() as u64;
    }
    front.append(&mut graph.node);
    graph.node = front;
    Ok(summary)
}

/// Stores the weights and biases of the selected nodes as float16, read back through a
/// `Cast(to = FLOAT)` that outputs the original name. A tensor with a value beyond the float16
/// range stays float.
pub(crate) fn f16_weights(
    graph: &mut GraphProto,
    sites: &[WeightSite],
    selected: &[usize],
) -> Result<WeightsSummary, QuantizeError> {
    let mut targets: Vec<String> = sites.iter().map(|s| s.initializer.clone()).collect();
    let consumers = graph::consumers(graph);
    for b in bias_names(graph, selected) {
        let only_selected = consumers
            .get(&b)
            .is_some_and(|c| c.iter().all(|(n, _)| selected.contains(n)));
        if only_selected && !targets.contains(&b) {
            targets.push(b);
        }
    }
    let mut names = Names::of(graph);
    let mut front = Vec::new();
    let mut summary = WeightsSummary::default();
    for name in &targets {
        let Some(values) = graph
            .initializer
            .iter()
            .find(|t| &t.name == name)
            .and_then(graph::f32_values)
        else {
            continue;
        };
        if values.iter().any(|v| v.abs() > f32::from(half::f16::MAX)) {
            continue;
        }
        let init = take_initializer(graph, name).expect("found above");
        let halves: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
        let hn = names.fresh(name, "_f16");
        graph
            .initializer
            .push(graph::tensor_f16(&hn, &init.dims, &halves));
        front.push(graph::node(
            "Cast",
            names.fresh(name, "_to_float"),
            &[&hn],
            &[name],
            vec![graph::int_attr("to", 1)],
        ));
        summary.tensors += 1;
        summary.parameters += values.len() as u64;
    }
    front.append(&mut graph.node);
    graph.node = front;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_scales_follow_the_axis() {
        // [2, 3], axis 1: columns are the channels.
        let w = [1.0, -2.0, 0.0, 0.5, 4.0, 0.0];
        let (q, s) = quantize_per_channel(&w, &[2, 3], 1);
        assert_eq!(s, vec![1.0 / 127.0, 4.0 / 127.0, 1.0]);
        assert_eq!(q, vec![127, -64, 0, 64, 127, 0]);
        // axis 0: rows.
        let (q, s) = quantize_per_channel(&w, &[2, 3], 0);
        assert_eq!(s, vec![2.0 / 127.0, 4.0 / 127.0]);
        assert_eq!(q, vec![64, -127, 0, 16, 127, 0]);
    }

    #[test]
    fn dequantized_weights_are_within_half_a_step() {
        let w: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 31.5) / 7.0)
            .collect();
        let (q, s) = quantize_per_channel(&w, &[4, 4, 2, 2], 0);
        for (e, (&v, &qv)) in w.iter().zip(&q).enumerate() {
            let scale = s[e / 16];
            assert!((v - qv as f32 * scale).abs() <= scale / 2.0 + 1e-6);
        }
    }
}
