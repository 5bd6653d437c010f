//! `int8 --int8-form qoperator`: static post-training quantization in QOperator form — the
//! selected Conv / MatMul / Gemm nodes become the standard integer operators `QLinearConv` and
//! `QLinearMatMul`, which take int8 tensors and produce int8 tensors, so the runtime runs them
//! with integer kernels (the QDQ form of [`super::static_int8`] leaves it to the runtime to
//! recognise the pattern, which tract 0.23.9 does not do: it runs QDQ graphs in float).
//!
//! What the rewrite emits (standard ONNX ops only, no `com.microsoft` contrib ops such as
//! onnxruntime's `QLinearAdd`, which tract cannot load):
//! - `Conv` → `QLinearConv` with per-channel int8 weights and an int32 bias;
//! - `Gemm`, and `MatMul` + `Add` of a constant bias on a rank-2 activation → a 1×1
//!   `QLinearConv` between two `Reshape`s (`QLinearMatMul` has no bias input; a bias added in
//!   float would cost a dequantize, an add and a quantize per layer, while tract lowers a 1×1
//!   `QLinearConv` to the same integer matrix product as `QLinearMatMul`, bias added in int32);
//! - any other `MatMul` with a constant 2-D weight → `QLinearMatMul` (per-column weight scales);
//! - a `Relu`, or a `Clip` whose minimum is 0, that alone reads the result is folded into the
//!   operator: the output range is calibrated after it, so the int8 saturation does the clamp;
//! - `MaxPool`, `Flatten`, `Reshape`, `Transpose`, `Squeeze`, `Unsqueeze` on an int8 tensor run
//!   on it directly (they move or pick values; the scale and zero point carry over);
//! - the final layers (selected nodes from whose output no integer operator is reachable, such
//!   as the classifier before a Softmax) stay float with int8 weights, as `int8-weights` writes
//!   them: an integer operator's output has 8-bit resolution, which the graph's outputs do not
//!   need to lose; so do grouped (depthwise) convolutions, which tract 0.23.9 has no integer
//!   kernel for (see [`plan`]);
//! - every other node stays in float, its int8 inputs read back through `DequantizeLinear`
//!   (`Softmax` in particular: see the module doc of [`super::static_int8`]), and a float
//!   tensor entering an integer operator goes through `QuantizeLinear` once.
//!
//! Activations are int8 with an asymmetric zero point (the uint8 parameters of the
//! calibration range shifted by 128): tract's integer kernels work on int8, and it would convert
//! uint8 activations at run time.

use std::collections::{HashMap, HashSet};

use super::graph::{self, Names};
use super::static_int8::int8_params;
use super::weights::{self, quantize_per_channel};
use super::{selected_nodes, QuantizeError, Rewritten, Selection, DEFAULT_OP_TYPES};
use crate::onnx_pb::{type_proto, GraphProto, NodeProto, TensorProto};

/// How a selected node is emitted.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// `Conv` → `QLinearConv`.
    Conv,
    /// `Gemm`, or `MatMul` + bias, on a rank-2 activation → `Reshape`, 1×1 `QLinearConv`,
    /// `Reshape`.
    Dense,
    /// `MatMul` → `QLinearMatMul`.
    MatMul,
}

/// One integer operator to emit.
#[derive(Debug, Clone)]
struct Site {
    node: usize,
    kind: Kind,
    /// The float activation it reads.
    input: String,
    /// The float weight initializer.
    weight: String,
    /// The weight is stored `[K, N]` (MatMul, Gemm with `transB = 0`), not `[N, K]`.
    weight_kn: bool,
    /// The float bias initializer (Conv or Gemm input 2, or the constant of a folded `Add`).
    bias: Option<String>,
    /// Nodes folded into the operator (a bias `Add`, a `Relu` or `Clip`).
    absorbed: Vec<usize>,
    /// The float tensor whose value the operator's int8 output represents.
    output: String,
}

/// Ops that only move or select values: run on int8 data, the parameters carry over.
const TRANSPARENT: [&str; 6] = [
    "MaxPool",
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
];

fn initializer<'g>(g: &'g GraphProto, name: &str) -> Option<&'g TensorProto> {
    g.initializer.iter().find(|t| t.name == name)
}

fn float_initializer(g: &GraphProto, name: &str) -> Option<(Vec<i64>, Vec<f32>)> {
    let t = initializer(g, name)?;
    Some((t.dims.clone(), graph::f32_values(t)?))
}

fn is_graph_output(g: &GraphProto, name: &str) -> bool {
    g.output.iter().any(|o| o.name == name)
}

/// The rank of `tensor` where the graph declares it or it follows from simple producers.
fn rank_of(g: &GraphProto, tensor: &str, depth: usize) -> Option<usize> {
    let declared = g
        .input
        .iter()
        .chain(&g.value_info)
        .chain(&g.output)
        .find(|v| v.name == tensor)
        .and_then(|v| match v.r#type.as_ref()?.value.as_ref()? {
            type_proto::Value::TensorType(t) => t.shape.as_ref().map(|s| s.dim.len()),
            _ => None,
        });
    if declared.is_some() || depth == 0 {
        return declared;
    }
    let producer = g
        .node
        .iter()
        .find(|n| n.output.first().map(String::as_str) == Some(tensor))?;
    match producer.op_type.as_str() {
        "Flatten" | "Gemm" => Some(2),
        "Relu" | "Clip" | "Sigmoid" | "Tanh" | "LeakyRelu" | "Add" | "Mul" | "Sub" | "Div"
        | "Softmax" => producer
            .input
            .iter()
            .filter(|i| initializer(g, i).is_none())
            .map(|i| rank_of(g, i, depth - 1))
            .next()
            .flatten(),
        "MatMul" => {
            let w = initializer(g, producer.input.get(1)?)?;
            (w.dims.len() == 2).then(|| rank_of(g, &producer.input[0], depth - 1))?
        }
        _ => None,
    }
}

/// Node index of the only reader of `tensor`, if it has exactly one and is no graph output.
fn sole_consumer(
    g: &GraphProto,
    consumers: &HashMap<String, Vec<(usize, usize)>>,
    tensor: &str,
) -> Option<usize> {
    match consumers.get(tensor).map(Vec::as_slice) {
        Some([(n, _)]) if !is_graph_output(g, tensor) => Some(*n),
        _ => None,
    }
}

/// `Relu`, or `Clip` with a constant minimum of 0.
fn clamps_at_zero(g: &GraphProto, n: &NodeProto) -> bool {
    match n.op_type.as_str() {
        "Relu" => true,
        "Clip" => n
            .input
            .get(1)
            .and_then(|m| float_initializer(g, m))
            .is_some_and(|(_, v)| v == [0.0]),
        _ => false,
    }
}

/// What the rewrite does with the selected nodes.
struct Plan {
    /// Integer operators.
    sites: Vec<Site>,
    /// Selected nodes kept in float with int8 weights, as `int8-weights` writes them: final
    /// layers (no integer operator reachable from their output) and grouped convolutions.
    float_layers: Vec<usize>,
}

/// Whether an integer operator of `sites` reads `tensor` or anything computed from it.
fn reaches_a_site(
    g: &GraphProto,
    consumers: &HashMap<String, Vec<(usize, usize)>>,
    sites: &[Site],
    tensor: &str,
) -> bool {
    let mut todo = vec![tensor.to_string()];
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(t) = todo.pop() {
        if !seen.insert(t.clone()) {
            continue;
        }
        for &(n, _) in consumers.get(&t).map(Vec::as_slice).unwrap_or(&[]) {
            if sites.iter().any(|s| s.node == n) {
                return true;
            }
            todo.extend(g.node[n].output.iter().cloned());
        }
    }
    false
}

/// The integer operators for the selected nodes, and the layers kept in float (with int8
/// weights):
/// - final layers: a final layer's output would only be dequantized again on its way to the
///   graph output, so quantizing it costs 8-bit output resolution for nothing (tied logits
///   after a Softmax; `vibration_ae`'s reconstruction measured 19.9 dB SNR that way, under the
///   default gate's 20);
/// - grouped (depthwise) convolutions: tract 0.23.9 has no integer depthwise kernel and runs an
///   int8 grouped `QLinearConv` as one matrix product per group — measured on `mobilenetish`,
///   537 ms an inference with its 17 depthwise layers integer (about 70 % of it in those
///   layers), against 22 ms for the float model.
///
/// Nodes that do not fit (weights not constant, Gemm with `transA` or `alpha`/`beta` other
/// than 1, …) are left out and stay float, weights too.
fn plan(g: &GraphProto, selected: &[usize], exclude: &[String]) -> Plan {
    let (grouped, candidates): (Vec<Site>, Vec<Site>) = candidate_sites(g, selected, exclude)
        .into_iter()
        .partition(|s| {
            s.kind == Kind::Conv && graph::get_int(&g.node[s.node], "group").unwrap_or(1) > 1
        });
    let consumers = graph::consumers(g);
    let (sites, finals): (Vec<Site>, Vec<Site>) = candidates
        .iter()
        .cloned()
        .partition(|s| reaches_a_site(g, &consumers, &candidates, &s.output));
    Plan {
        sites,
        float_layers: finals.iter().chain(&grouped).map(|s| s.node).collect(),
    }
}

/// Every selected node that fits an integer operator.
fn candidate_sites(g: &GraphProto, selected: &[usize], exclude: &[String]) -> Vec<Site> {
    let consumers = graph::consumers(g);
    let foldable = |i: usize| !exclude.contains(&g.node[i].name);
    let mut sites = Vec::new();
    for &i in selected {
        let n = &g.node[i];
        let (Some(input), Some(weight)) = (n.input.first(), n.input.get(1)) else {
            continue;
        };
        if input.is_empty() || initializer(g, input).is_some() {
            continue;
        }
        let Some((dims, _)) = float_initializer(g, weight) else {
            continue;
        };
        let bias_input = n.input.get(2).filter(|b| !b.is_empty());
        let bias_ok = |b: &String, len: i64| {
            float_initializer(g, b).is_some_and(|(d, v)| {
                v.len() as i64 == len && (d.len() == 1 || (d.len() == 2 && d[0] == 1))
            })
        };
        let mut absorbed = Vec::new();
        let mut output = n.output[0].clone();
        let (kind, weight_kn, bias) = match n.op_type.as_str() {
            "Conv" if dims.len() >= 3 => {
                if bias_input.is_some_and(|b| !bias_ok(b, dims[0])) {
                    continue;
                }
                (Kind::Conv, false, bias_input.cloned())
            }
            "Gemm" if dims.len() == 2 => {
                let one = |a| graph::get_float(n, a).unwrap_or(1.0) == 1.0;
                if !one("alpha") || !one("beta") || graph::get_int(n, "transA") == Some(1) {
                    continue;
                }
                let kn = graph::get_int(n, "transB") != Some(1);
                let cols = if kn { dims[1] } else { dims[0] };
                if bias_input.is_some_and(|b| !bias_ok(b, cols)) {
                    continue;
                }
                (Kind::Dense, kn, bias_input.cloned())
            }
            "MatMul" if dims.len() == 2 => {
                let add = sole_consumer(g, &consumers, &output)
                    .filter(|&a| foldable(a) && g.node[a].op_type == "Add")
                    .and_then(|a| {
                        let other = g.node[a].input.iter().find(|x| **x != output)?;
                        bias_ok(other, dims[1]).then(|| (a, other.clone()))
                    })
                    .filter(|_| rank_of(g, input, 16) == Some(2));
                match add {
                    Some((a, b)) => {
                        absorbed.push(a);
                        output = g.node[a].output[0].clone();
                        (Kind::Dense, true, Some(b))
                    }
                    None => (Kind::MatMul, true, None),
                }
            }
            _ => continue,
        };
        if let Some(a) = sole_consumer(g, &consumers, &output)
            .filter(|&a| foldable(a) && clamps_at_zero(g, &g.node[a]))
        {
            absorbed.push(a);
            output = g.node[a].output[0].clone();
        }
        sites.push(Site {
            node: i,
            kind,
            input: input.clone(),
            weight: weight.clone(),
            weight_kn,
            bias,
            absorbed,
            output,
        });
    }
    sites
}

fn check_op_types(sel: &Selection) -> Result<(), QuantizeError> {
    let supported = DEFAULT_OP_TYPES.to_vec();
    match sel
        .op_types
        .iter()
        .find(|o| !supported.contains(&o.as_str()))
    {
        Some(op) => Err(QuantizeError::UnsupportedOpType(op.clone(), supported)),
        None => Ok(()),
    }
}

/// The float tensors whose ranges the QOperator rewrite needs: what each integer operator
/// reads and what it produces (after the folded nodes).
pub(crate) fn activation_tensors(
    float_model: &[u8],
    sel: &Selection,
) -> Result<Vec<String>, QuantizeError> {
    check_op_types(sel)?;
    let model = graph::decode(float_model)?;
    let g = model
        .graph
        .as_ref()
        .ok_or_else(|| QuantizeError::Parse("the model has no graph".into()))?;
    let sites = plan(g, &selected_nodes(g, sel)?, &sel.exclude_nodes).sites;
    let mut names: Vec<String> = Vec::new();
    for s in &sites {
        for t in [&s.input, &s.output] {
            if !names.contains(t) {
                names.push(t.clone());
            }
        }
    }
    Ok(names)
}

/// Scale and zero point of one int8 activation, as initializers.
#[derive(Debug, Clone)]
struct QParams {
    scale: String,
    zero_point: String,
    scale_value: f32,
}

/// The int8 tensor that holds a float tensor's values.
#[derive(Debug, Clone)]
struct QTensor {
    name: String,
    params: QParams,
}

/// The graph being written, node by node in the original order.
struct Emitter<'a> {
    names: Names,
    ranges: &'a HashMap<String, (f32, f32)>,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    /// Float tensor → its int8 version.
    quantized: HashMap<String, QTensor>,
    /// Float tensors that exist in the new graph.
    float: HashSet<String>,
    activations: usize,
}

impl Emitter<'_> {
    fn params(&mut self, tensor: &str) -> Result<QParams, QuantizeError> {
        let &(lo, hi) = self
            .ranges
            .get(tensor)
            .ok_or_else(|| QuantizeError::Calibration(format!("no range for tensor '{tensor}'")))?;
        let (scale_value, zp) = int8_params(lo, hi);
        let scale = self.names.fresh(tensor, "_scale");
        let zero_point = self.names.fresh(tensor, "_zero_point");
        self.initializers
            .push(graph::tensor_f32(&scale, &[], &[scale_value]));
        self.initializers
            .push(graph::tensor_i8(&zero_point, &[], &[zp]));
        self.activations += 1;
        Ok(QParams {
            scale,
            zero_point,
            scale_value,
        })
    }

    /// The int8 version of `tensor`, quantizing the float one here if there is none yet.
    fn quantized(&mut self, tensor: &str) -> Result<QTensor, QuantizeError> {
        if let Some(q) = self.quantized.get(tensor) {
            return Ok(q.clone());
        }
        let params = self.params(tensor)?;
        let name = self.names.fresh(tensor, "_quantized");
        self.nodes.push(graph::node(
            "QuantizeLinear",
            self.names.fresh(tensor, "_quantize"),
            &[tensor, &params.scale, &params.zero_point],
            &[&name],
            vec![],
        ));
        let q = QTensor { name, params };
        self.quantized.insert(tensor.to_string(), q.clone());
        Ok(q)
    }

    /// Makes the float `tensor` exist, dequantizing its int8 version if that is all there is.
    fn float(&mut self, tensor: &str) {
        if tensor.is_empty() || self.float.contains(tensor) {
            return;
        }
        if let Some(q) = self.quantized.get(tensor).cloned() {
            self.nodes.push(graph::node(
                "DequantizeLinear",
                self.names.fresh(tensor, "_dequantize"),
                &[&q.name, &q.params.scale, &q.params.zero_point],
                &[tensor],
                vec![],
            ));
            self.float.insert(tensor.to_string());
        }
    }

    /// Emits the integer operator of `site`; returns the weight's parameter count.
    fn site(&mut self, g: &GraphProto, site: &Site) -> Result<u64, QuantizeError> {
        let node = &g.node[site.node];
        let x = self.quantized(&site.input)?;
        let y = self.params(&site.output)?;
        let y_name = self.names.fresh(&site.output, "_quantized");
        let (dims, values) = float_initializer(g, &site.weight).ok_or_else(|| {
            QuantizeError::Parse(format!("weight '{}' is not float", site.weight))
        })?;
        let base = site.weight.clone();
        let (w_dims, w_values, axis) = match site.kind {
            Kind::Conv => (dims.clone(), values.clone(), 0),
            Kind::MatMul => (dims.clone(), values.clone(), 1),
            Kind::Dense => {
                // As a 1×1 convolution: [N, K, 1, 1].
                let (n, k) = if site.weight_kn {
                    (dims[1], dims[0])
                } else {
                    (dims[0], dims[1])
                };
                let nk = if site.weight_kn {
                    transpose(&values, k as usize, n as usize)
                } else {
                    values.clone()
                };
                (vec![n, k, 1, 1], nk, 0)
            }
        };
        let (q, scales) = quantize_per_channel(&w_values, &w_dims, axis);
        let channels = scales.len();
        let (wq, ws, wz) = (
            self.names.fresh(&base, "_quantized"),
            self.names.fresh(&base, "_scale"),
            self.names.fresh(&base, "_zero_point"),
        );
        self.initializers.push(graph::tensor_i8(&wq, &w_dims, &q));
        self.initializers
            .push(graph::tensor_f32(&ws, &[channels as i64], &scales));
        // QLinearMatMul wants a zero point shaped like the scale; QLinearConv takes a scalar.
        self.initializers.push(if site.kind == Kind::MatMul {
            graph::tensor_i8(&wz, &[channels as i64], &vec![0; channels])
        } else {
            graph::tensor_i8(&wz, &[], &[0])
        });
        let bias = match &site.bias {
            None => None,
            Some(b) => {
                let (_, bv) = float_initializer(g, b)
                    .ok_or_else(|| QuantizeError::Parse(format!("bias '{b}' is not float")))?;
                let bq = int32_bias(&bv, x.params.scale_value, &scales);
                let name = self.names.fresh(b, "_quantized");
                self.initializers
                    .push(graph::tensor_i32(&name, &[channels as i64], &bq));
                Some(name)
            }
        };
        let mut inputs: Vec<&str> = vec![
            x.name.as_str(),
            x.params.scale.as_str(),
            x.params.zero_point.as_str(),
            wq.as_str(),
            ws.as_str(),
            wz.as_str(),
            y.scale.as_str(),
            y.zero_point.as_str(),
        ];
        if let Some(b) = &bias {
            inputs.push(b.as_str());
        }
        match site.kind {
            Kind::Conv => {
                let mut n = graph::node(
                    "QLinearConv",
                    node.name.clone(),
                    &inputs,
                    &[&y_name],
                    vec![],
                );
                n.attribute = node.attribute.clone();
                self.nodes.push(n);
            }
            Kind::MatMul => {
                self.nodes.push(graph::node(
                    "QLinearMatMul",
                    node.name.clone(),
                    &inputs,
                    &[&y_name],
                    vec![],
                ));
            }
            Kind::Dense => {
                let k = w_dims[1];
                let n = w_dims[0];
                let to4 = self.names.fresh(&site.input, "_nchw_shape");
                self.initializers
                    .push(graph::tensor_i64(&to4, &[4], &[0, k, 1, 1]));
                let x4 = self.names.fresh(&site.input, "_quantized_nchw");
                self.nodes.push(graph::node(
                    "Reshape",
                    self.names.fresh(&node.name, "_to_nchw"),
                    &[&x.name, &to4],
                    &[&x4],
                    vec![],
                ));
                inputs[0] = x4.as_str();
                let y4 = self.names.fresh(&site.output, "_quantized_nchw");
                self.nodes.push(graph::node(
                    "QLinearConv",
                    node.name.clone(),
                    &inputs,
                    &[&y4],
                    vec![graph::ints_attr("kernel_shape", &[1, 1])],
                ));
                let to2 = self.names.fresh(&site.output, "_rows_shape");
                self.initializers
                    .push(graph::tensor_i64(&to2, &[2], &[0, n]));
                self.nodes.push(graph::node(
                    "Reshape",
                    self.names.fresh(&node.name, "_to_rows"),
                    &[&y4, &to2],
                    &[&y_name],
                    vec![],
                ));
            }
        }
        self.quantized.insert(
            site.output.clone(),
            QTensor {
                name: y_name,
                params: y,
            },
        );
        Ok(values.len() as u64)
    }
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// The int32 bias of an integer operator: `round(b / (x_scale * w_scale[c]))`, saturated.
fn int32_bias(bias: &[f32], x_scale: f32, w_scales: &[f32]) -> Vec<i32> {
    bias.iter()
        .zip(w_scales)
        .map(|(&b, &ws)| {
            let q = (f64::from(b) / (f64::from(x_scale) * f64::from(ws))).round_ties_even();
            q.clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32
        })
        .collect()
}

/// The QOperator rewrite. `ranges` holds a range for each of [`activation_tensors`]; returns
/// the new model and the number of activation tensors given int8 parameters.
pub(crate) fn qoperator(
    float_model: &[u8],
    sel: &Selection,
    ranges: &HashMap<String, (f32, f32)>,
) -> Result<(Rewritten, usize), QuantizeError> {
    check_op_types(sel)?;
    let mut model = graph::decode(float_model)?;
    graph::require_opset_13(&model)?;
    let g = graph::graph_mut(&mut model)?;
    let selected = selected_nodes(g, sel)?;
    let Plan {
        sites,
        float_layers,
    } = plan(g, &selected, &sel.exclude_nodes);
    let float_outputs: Vec<Vec<String>> = float_layers
        .iter()
        .map(|&i| g.node[i].output.clone())
        .collect();
    if sites.is_empty() && float_layers.is_empty() {
        return Err(QuantizeError::Nothing(sel.op_types.clone()));
    }
    let at: HashMap<usize, &Site> = sites.iter().map(|s| (s.node, s)).collect();
    let absorbed: HashSet<usize> = sites.iter().flat_map(|s| s.absorbed.clone()).collect();
    let mut e = Emitter {
        names: Names::of(g),
        ranges,
        nodes: Vec::new(),
        initializers: Vec::new(),
        quantized: HashMap::new(),
        float: g
            .input
            .iter()
            .map(|v| v.name.clone())
            .chain(g.initializer.iter().map(|t| t.name.clone()))
            .collect(),
        activations: 0,
    };
    let mut parameters = 0;
    for (i, n) in g.node.iter().enumerate() {
        if absorbed.contains(&i) {
            continue;
        }
        if let Some(site) = at.get(&i) {
            parameters += e.site(g, site)?;
            continue;
        }
        let data = n.input.first().and_then(|x| e.quantized.get(x)).cloned();
        let rest_constant = n
            .input
            .iter()
            .skip(1)
            .all(|x| x.is_empty() || initializer(g, x).is_some());
        if let (Some(q), true, 1) = (data, rest_constant, n.output.len()) {
            if TRANSPARENT.contains(&n.op_type.as_str()) {
                let out = e.names.fresh(&n.output[0], "_quantized");
                let mut m = n.clone();
                m.input[0] = q.name.clone();
                m.output[0] = out.clone();
                e.nodes.push(m);
                e.quantized.insert(
                    n.output[0].clone(),
                    QTensor {
                        name: out,
                        params: q.params,
                    },
                );
                continue;
            }
        }
        for x in &n.input {
            e.float(x);
        }
        e.nodes.push(n.clone());
        e.float.extend(n.output.iter().cloned());
    }
    for o in g.output.iter().map(|o| o.name.clone()).collect::<Vec<_>>() {
        e.float(&o);
    }
    let activations = e.activations;
    g.node = std::mem::take(&mut e.nodes);
    g.initializer.append(&mut e.initializers);

    // Float weights and biases no node reads any more go.
    let read: HashSet<&String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter())
        .chain(g.output.iter().map(|o| &o.name))
        .collect();
    let unused: HashSet<String> = sites
        .iter()
        .flat_map(|s| std::iter::once(&s.weight).chain(&s.bias))
        .filter(|t| !read.contains(t))
        .cloned()
        .collect();
    let produced: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .collect();
    g.initializer.retain(|t| !unused.contains(&t.name));
    g.input.retain(|v| !unused.contains(&v.name));
    g.value_info.retain(|v| produced.contains(&v.name));

    // Float layers: int8 weights read back through DequantizeLinear, as int8-weights.
    let float_layers: Vec<usize> = float_outputs
        .iter()
        .filter_map(|o| g.node.iter().position(|n| &n.output == o))
        .collect();
    let summary = weights::int8_weights(g, &weights::weight_sites(g, &float_layers))?;
    Ok((
        Rewritten {
            bytes: graph::encode(&model),
            tensors: sites.len() + summary.tensors,
            parameters: parameters + summary.parameters,
        },
        activations,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int32_bias_divides_by_both_scales() {
        assert_eq!(int32_bias(&[1.0, -0.5], 0.5, &[0.01, 0.1]), vec![200, -10]);
        assert_eq!(int32_bias(&[1e30], 1e-3, &[1e-3]), vec![i32::MAX]);
    }

    #[test]
    fn transpose_swaps_rows_and_columns() {
        // [[1, 2, 3], [4, 5, 6]] → [[1, 4], [2, 5], [3, 6]]
        assert_eq!(
            transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3),
            vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
    }
}
