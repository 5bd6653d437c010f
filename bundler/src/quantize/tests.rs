//! Per-channel `DequantizeLinear` in the runtime against a reference computed here.
//!
//! tract before 0.23.9's fix (sonos/tract#2849, September 2026) read only the first scale and
//! zero point of a per-axis `DequantizeLinear`: every channel got channel 0's scale, silently.
//! These tests would catch that regression if the tract pin ever moves.

use engine::{EngineOptions, Model, Tensor};

use super::graph;
use super::{weights_only, QuantizeMode, Selection};
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
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..ModelProto::default()
    };
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
