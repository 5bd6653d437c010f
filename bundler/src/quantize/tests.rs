//! Per-channel `DequantizeLinear` in the runtime against a reference computed here, and the
//! QOperator rewrite's structure and agreement with the float model.
//!
//! tract before 0.23.9's fix (sonos/tract#2849, September 2026) read only the first scale and
//! zero point of a per-axis `DequantizeLinear`: every channel got channel 0's scale, silently.
//! These tests would catch that regression if the tract pin ever moves.

use engine::{EngineOptions, Model, Tensor};

use super::{calibrate, graph, qoperator};
use super::{weights_only, QuantizeMode, RangeMethod, Selection};
use crate::onnx_pb::{
    tensor_shape_proto, type_proto, GraphProto, ModelProto, OperatorSetIdProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};

fn load(bytes: &[u8]) -> Model {
    let file = tempfile::Builder::new().suffix(".onnx").tempfile().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    Model::load(file.path(), &EngineOptions::default()).unwrap()
}

fn float_value(name: &str, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }
}

/// The example of the tract fix: int8 `[[1, 1, 1], [4, 4, 4]]`, scales `[0.5, 2, 10]`, zero
/// points `[0, 1, -1]`, axis 1 → `[[0.5, 0, 20], [2, 6, 50]]` (onnxruntime's answer).
#[test]
fn per_axis_dequantize_uses_every_channel_scale() {
    let graph = GraphProto {
        name: "dq".into(),
        node: vec![
            graph::node(
                "DequantizeLinear",
                "dq".into(),
                &["q", "s", "z"],
                &["w"],
                vec![graph::int_attr("axis", 1)],
            ),
            graph::node("Add", "add".into(), &["x", "w"], &["y"], vec![]),
        ],
        initializer: vec![
            graph::tensor_i8("q", &[2, 3], &[1, 1, 1, 4, 4, 4]),
            graph::tensor_f32("s", &[3], &[0.5, 2.0, 10.0]),
            graph::tensor_i8("z", &[3], &[0, 1, -1]),
        ],
        input: vec![float_value("x", &[2, 3])],
        output: vec![float_value("y", &[2, 3])],
        ..GraphProto::default()
    };
    let model = opset_13_model(graph);
    let m = load(&graph::encode(&model));
    let x = Tensor::from_f32(vec![2, 3], vec![0.0; 6]).unwrap();
    let y = m.run(&[x]).unwrap();
    assert_eq!(y[0].as_f32().unwrap(), &[0.5, 0.0, 20.0, 2.0, 6.0, 50.0]);
}

/// `int8-weights` on digits_cnn (Conv weights on axis 0, Gemm weights on axis 0 with transB)
/// run by tract against the same model with the weights dequantized here, in Rust.
#[test]
fn int8_weights_model_agrees_with_weights_dequantized_by_the_bundler() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/models/digits_cnn/digits_cnn.onnx");
    let float = std::fs::read(&path).unwrap();
    let q = weights_only(&float, QuantizeMode::Int8Weights, &Selection::default()).unwrap();
    assert!(q.tensors >= 3, "{} tensors", q.tensors);

    // Reference: replace each DequantizeLinear by the float tensor it stands for.
    let mut reference = graph::decode(&q.bytes).unwrap();
    let g = graph::graph_mut(&mut reference).unwrap();
    let dqs: Vec<_> = g
        .node
        .iter()
        .filter(|n| n.op_type == "DequantizeLinear")
        .cloned()
        .collect();
    let mut per_channel = 0;
    for dq in &dqs {
        let init = |name: &str| {
            g.initializer
                .iter()
                .find(|t| t.name == name)
                .unwrap()
                .clone()
        };
        let (qt, st) = (init(&dq.input[0]), init(&dq.input[1]));
        let scales = graph::f32_values(&st).unwrap();
        per_channel += usize::from(scales.len() > 1);
        let axis = graph::get_int(dq, "axis").unwrap() as usize;
        let inner: usize = qt.dims[axis + 1..].iter().product::<i64>() as usize;
        let values: Vec<f32> = qt
            .raw_data
            .iter()
            .enumerate()
            .map(|(e, &b)| b as i8 as f32 * scales[(e / inner) % scales.len()])
            .collect();
        g.initializer
            .push(graph::tensor_f32(&dq.output[0], &qt.dims, &values));
    }
    g.node.retain(|n| n.op_type != "DequantizeLinear");
    assert!(per_channel >= 3);

    let x = engine::npy::read_npy(&path.with_file_name("test_input.npy")).unwrap();
    let by_tract = load(&q.bytes).run(std::slice::from_ref(&x)).unwrap();
    let by_bundler = load(&graph::encode(&reference)).run(&[x]).unwrap();
    let (a, b) = (
        by_tract[0].as_f32().unwrap(),
        by_bundler[0].as_f32().unwrap(),
    );
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "tract and the reference differ by {worst}");
}

fn op_types(bytes: &[u8]) -> Vec<String> {
    let model = graph::decode(bytes).unwrap();
    model
        .graph
        .unwrap()
        .node
        .iter()
        .map(|n| n.op_type.clone())
        .collect()
}

fn worst_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// QOperator on digits_cnn: both Convs become integer operators, the Relus fold into them,
/// MaxPool and Flatten run on int8; the final Gemm (whose output only goes to the Softmax) stays
/// float with int8 weights, reading the int8 activations through one DequantizeLinear. Its
/// classes agree with the float model's.
#[test]
fn qoperator_digits_cnn_runs_its_convolutions_on_int8() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/models/digits_cnn/digits_cnn.onnx");
    let float = std::fs::read(&path).unwrap();
    let sel = Selection::default();
    let tensors = qoperator::activation_tensors(&float, &sel).unwrap();
    assert_eq!(tensors, ["input", "relu1", "pool1", "relu2"]);
    let calib = engine::npy::read_npy(path.with_file_name("calib_input.npy")).unwrap();
    let ranges = calibrate::observe(&float, &tensors, &calib, 32, RangeMethod::MinMax).unwrap();
    let (q, activations) = qoperator::qoperator(&float, &sel, &ranges).unwrap();
    // Two integer operators and the Gemm's weight; scales for input, relu1, relu2.
    assert_eq!((q.tensors, activations), (3, 3));
    assert_eq!(
        op_types(&q.bytes),
        [
            "DequantizeLinear", // the Gemm's int8 weight
            "QuantizeLinear",
            "QLinearConv",
            "MaxPool",
            "QLinearConv",
            "Flatten",
            "DequantizeLinear",
            "Gemm",
            "Softmax"
        ]
    );
    // No float weight is left behind.
    let model = graph::decode(&q.bytes).unwrap();
    let g = model.graph.unwrap();
    assert!(
        g.initializer
            .iter()
            .all(|t| graph::f32_values(t).is_none() || t.dims.len() <= 1),
        "a float weight tensor is still in the model"
    );

    let x = engine::npy::read_npy(path.with_file_name("test_input.npy")).unwrap();
    let y_float = load(&float).run(std::slice::from_ref(&x)).unwrap();
    let y_q = load(&q.bytes).run(&[x]).unwrap();
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    let (a, b) = (y_float[0].as_f32().unwrap(), y_q[0].as_f32().unwrap());
    let agree = a
        .chunks(10)
        .zip(b.chunks(10))
        .filter(|(r, s)| argmax(r) == argmax(s))
        .count();
    assert!(
        agree * 100 >= a.len() / 10 * 98,
        "{agree} of {} agree",
        a.len() / 10
    );
}

/// A MatMul with a bias Add and a Relu becomes one 1×1 QLinearConv (bias in int32, Relu folded);
/// a MatMul without a bias becomes a QLinearMatMul with per-column weight scales; the final
/// MatMul stays float. tract runs them close to the float model (within a few int8 steps).
#[test]
fn qoperator_matmul_forms_agree_with_float() {
    let w1: Vec<f32> = (0..12).map(|i| ((i * 7 % 12) as f32 - 5.5) / 4.0).collect();
    let w2: Vec<f32> = (0..6)
        .map(|i| ((i * 5 % 6) as f32 - 2.5) * (1 + i) as f32)
        .collect();
    let w3: Vec<f32> = vec![0.5, -1.0, 0.25, 2.0];
    let graph = GraphProto {
        name: "mlp".into(),
        node: vec![
            graph::node("MatMul", "mm1".into(), &["x", "w1"], &["h"], vec![]),
            graph::node("Add", "add1".into(), &["h", "b1"], &["hb"], vec![]),
            graph::node("Relu", "relu1".into(), &["hb"], &["r"], vec![]),
            graph::node("MatMul", "mm2".into(), &["r", "w2"], &["h2"], vec![]),
            graph::node("MatMul", "mm3".into(), &["h2", "w3"], &["y"], vec![]),
        ],
        initializer: vec![
            graph::tensor_f32("w1", &[4, 3], &w1),
            graph::tensor_f32("b1", &[3], &[0.5, -0.25, 0.1]),
            graph::tensor_f32("w2", &[3, 2], &w2),
            graph::tensor_f32("w3", &[2, 2], &w3),
        ],
        input: vec![float_value("x", &[8, 4])],
        output: vec![float_value("y", &[8, 2])],
        ..GraphProto::default()
    };
    let model = opset_13_model(graph);
    let float = graph::encode(&model);
    let sel = Selection::default();
    let tensors = qoperator::activation_tensors(&float, &sel).unwrap();
    assert_eq!(tensors, ["x", "r", "h2"]);
    let x = Tensor::from_f32(
        vec![8, 4],
        (0..32)
            .map(|i| ((i * 11 % 32) as f32 - 16.0) / 8.0)
            .collect(),
    )
    .unwrap();
    let ranges = calibrate::observe(&float, &tensors, &x, 8, RangeMethod::MinMax).unwrap();
    let (q, _) = qoperator::qoperator(&float, &sel, &ranges).unwrap();
    assert_eq!(
        op_types(&q.bytes),
        [
            "DequantizeLinear", // w3
            "QuantizeLinear",
            "Reshape",
            "QLinearConv",
            "Reshape",
            "QLinearMatMul",
            "DequantizeLinear",
            "MatMul"
        ]
    );
    let y_float = load(&float).run(std::slice::from_ref(&x)).unwrap();
    let y_q = load(&q.bytes).run(&[x]).unwrap();
    let (a, b) = (y_float[0].as_f32().unwrap(), y_q[0].as_f32().unwrap());
    // A few steps of h2, through w3.
    let (lo, hi) = ranges["h2"];
    let step = (hi - lo) / 255.0 * w3.iter().map(|w| w.abs()).sum::<f32>();
    let worst = worst_difference(a, b);
    assert!(
        worst <= 4.0 * step,
        "worst {worst}, h2 step through w3 {step}"
    );
}

/// mobilenetish in QOperator form: the full and pointwise convolutions become QLinearConv, the
/// depthwise (grouped) ones stay float with int8 weights (tract 0.23.9 has no integer depthwise
/// kernel), and so does the final Gemm.
#[test]
fn qoperator_keeps_depthwise_convolutions_float() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/models/mobilenetish/mobilenetish.onnx");
    let float = std::fs::read(&path).unwrap();
    let sel = Selection::default();
    let tensors = qoperator::activation_tensors(&float, &sel).unwrap();
    let x = engine::npy::read_npy(path.with_file_name("test_input.npy")).unwrap();
    let ranges = calibrate::observe(&float, &tensors, &x, 4, RangeMethod::MinMax).unwrap();
    let (q, _) = qoperator::qoperator(&float, &sel, &ranges).unwrap();
    let model = graph::decode(&q.bytes).unwrap();
    let g = model.graph.unwrap();
    let count = |op: &str| g.node.iter().filter(|n| n.op_type == op).count();
    let grouped = |n: &&crate::onnx_pb::NodeProto| graph::get_int(n, "group").unwrap_or(1) > 1;
    assert!(g
        .node
        .iter()
        .filter(|n| n.op_type == "QLinearConv")
        .all(|n| !grouped(&n)));
    let depthwise = g
        .node
        .iter()
        .filter(|n| n.op_type == "Conv")
        .filter(grouped)
        .count();
    assert_eq!(
        (count("QLinearConv"), depthwise, count("Gemm")),
        (35, 17, 1)
    );
    // 52 Conv weights and the Gemm weight, all int8.
    assert_eq!(q.tensors, 53);
}

/// A model of `graph` at IR 8, default opset 13.
fn opset_13_model(graph: GraphProto) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..ModelProto::default()
    }
}
