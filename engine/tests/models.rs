//! Behaviour of `engine::Model` on the reference models in examples/models.

use std::path::PathBuf;
use std::sync::Arc;

use engine::npy::read_npy;
use engine::{EngineError, EngineOptions, IoNames, Model, ModelFormat, Tensor, TensorData};
use protocol::manifest::DType;

fn dir(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/models")
        .join(model)
}

fn load(model: &str) -> Model {
    Model::load(
        &dir(model).join(format!("{model}.onnx")),
        &EngineOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Rows `from..to` (along axis 0) of a tensor.
fn rows(t: &Tensor, from: usize, to: usize) -> Tensor {
    let row: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = to - from;
    Tensor::from_f32(shape, t.as_f32().unwrap()[from * row..to * row].to_vec()).unwrap()
}

fn assert_close(got: &Tensor, want: &Tensor, atol: f32, rtol: f32, what: &str) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let (g, w) = (got.as_f32().unwrap(), want.as_f32().unwrap());
    for (i, (g, w)) in g.iter().zip(w).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

/// Runs `model` on samples one at a time, then on `batch` samples at once, against test_output.
fn check_model(name: &str, singles: usize, batch: usize, atol: f32, rtol: f32) {
    let model = load(name);
    let input = read_npy(dir(name).join("test_input.npy")).unwrap();
    let expected = read_npy(dir(name).join("test_output.npy")).unwrap();
    for i in 0..singles {
        let out = model.run(&[rows(&input, i, i + 1)]).unwrap();
        assert_eq!(out.len(), 1);
        assert_close(
            &out[0],
            &rows(&expected, i, i + 1),
            atol,
            rtol,
            &format!("{name} sample {i}"),
        );
    }
    let out = model.run(&[rows(&input, 0, batch)]).unwrap();
    assert_close(
        &out[0],
        &rows(&expected, 0, batch),
        atol,
        rtol,
        &format!("{name} batch {batch}"),
    );
    // An odd batch after the full one, then batch 1 again: plans and pooled states are reusable.
    let out = model.run(&[rows(&input, 1, 4)]).unwrap();
    assert_close(
        &out[0],
        &rows(&expected, 1, 4),
        atol,
        rtol,
        &format!("{name} batch 3"),
    );
    let out = model.run(&[rows(&input, 0, 1)]).unwrap();
    assert_close(
        &out[0],
        &rows(&expected, 0, 1),
        atol,
        rtol,
        &format!("{name} batch 1 again"),
    );
}

#[test]
fn digits_mlp_matches_reference() {
    check_model("digits_mlp", 25, 450, 1e-5, 0.0);
}

#[test]
fn digits_cnn_matches_reference() {
    check_model("digits_cnn", 25, 450, 1e-5, 0.0);
}

#[test]
fn vibration_ae_matches_reference() {
    check_model("vibration_ae", 10, 1000, 1e-4, 1e-4);
}

#[test]
fn mobilenetish_matches_reference() {
    check_model("mobilenetish", 2, 4, 1e-3, 1e-3);
}

#[test]
fn signature_comes_from_the_graph() {
    let m = load("digits_cnn");
    assert_eq!(m.inputs().len(), 1);
    assert_eq!(m.inputs()[0].name, "input");
    assert_eq!(m.inputs()[0].dtype, DType::F32);
    assert_eq!(m.inputs()[0].shape, vec![None, Some(1), Some(8), Some(8)]);
    assert_eq!(m.outputs().len(), 1);
    assert_eq!(m.outputs()[0].name, "probabilities");
    assert_eq!(m.outputs()[0].shape, vec![None, Some(10)]);
    let m = load("mobilenetish");
    assert_eq!(m.outputs()[0].name, "logits");
    assert_eq!(m.outputs()[0].shape, vec![None, Some(1000)]);
}

#[test]
fn bad_inputs_are_refused_with_clear_errors() {
    let m = load("digits_mlp");
    let ok = Tensor::from_f32(vec![2, 64], vec![0.5; 128]).unwrap();
    assert_eq!(m.run(&[ok.clone()]).unwrap()[0].shape, vec![2, 10]);

    let e = m.run(&[]).unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::InputCount {
                expected: 1,
                got: 0
            }
        ),
        "{e:?}"
    );
    let e = m.run(&[ok.clone(), ok.clone()]).unwrap_err();
    assert_eq!(e.to_string(), "the model takes 1 input tensor(s), got 2");

    let ints = Tensor::new(vec![1, 64], TensorData::I64(vec![0; 64])).unwrap();
    let e = m.run(&[ints]).unwrap_err();
    assert!(
        matches!(&e, EngineError::InputDtype { name, expected: DType::F32, got: DType::I64 } if name == "input"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "input 'input': expected element type FP32, got INT64"
    );

    let rank = Tensor::from_f32(vec![64], vec![0.0; 64]).unwrap();
    let e = m.run(&[rank]).unwrap_err();
    assert!(
        matches!(&e, EngineError::InputShape { name, expected, got }
            if name == "input" && *expected == vec![None, Some(64)] && *got == vec![64]),
        "{e:?}"
    );
    assert!(e.to_string().contains("rank 2 expected, got rank 1"), "{e}");

    let fixed = Tensor::from_f32(vec![1, 63], vec![0.0; 63]).unwrap();
    let e = m.run(&[fixed]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "input 'input': expected shape [?, 64] (dimension 1 must be 64, not 63; ? = any size), got [1, 63]"
    );

    // The fields are public, so shape and data can disagree.
    let lying = Tensor {
        shape: vec![2, 64],
        data: TensorData::F32(vec![0.0; 64]),
    };
    let e = m.run(&[lying]).unwrap_err();
    assert!(
        matches!(&e, EngineError::InputData { name, expected: 128, got: 64, .. } if name == "input"),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("128 element(s), but 64 value(s)"),
        "{e}"
    );

    // The model is still fine after refused requests.
    assert_eq!(m.run(&[ok]).unwrap()[0].shape, vec![2, 10]);
}

#[test]
fn load_errors_name_the_file() {
    let missing = dir("digits_mlp").join("nope.onnx");
    let e = Model::load(&missing, &EngineOptions::default()).unwrap_err();
    assert!(
        matches!(&e, EngineError::Load { path, .. } if *path == missing),
        "{e:?}"
    );
    assert!(e.to_string().contains("nope.onnx"), "{e}");

    let garbage = dir("digits_mlp").join("test_input.npy");
    let e = Model::load(&garbage, &EngineOptions::default()).unwrap_err();
    assert!(e.to_string().starts_with("cannot load model "), "{e}");
}

#[test]
fn model_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Model>();
    assert_send_sync::<Arc<Model>>();
    assert_send_sync::<EngineError>();
}

#[test]
fn concurrent_runs_are_correct() {
    let model = Arc::new(load("digits_cnn"));
    let input = Arc::new(read_npy(dir("digits_cnn").join("test_input.npy")).unwrap());
    let expected = Arc::new(read_npy(dir("digits_cnn").join("test_output.npy")).unwrap());
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let (model, input, expected) = (model.clone(), input.clone(), expected.clone());
            std::thread::spawn(move || {
                for round in 0..40 {
                    let i = (t * 53 + round * 7) % 440;
                    // Mix batch-1 (fixed plan) and batch-n (symbolic plan) calls.
                    let n = if round % 3 == 0 { 1 + (round % 9) } else { 1 };
                    let out = model.run(&[rows(&input, i, i + n)]).unwrap();
                    assert_close(&out[0], &rows(&expected, i, i + n), 1e-5, 0.0, "concurrent");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[cfg(not(feature = "multithread"))]
#[test]
fn more_than_one_thread_is_refused_without_the_multithread_feature() {
    let opts = EngineOptions {
        threads: 2,
        ..EngineOptions::default()
    };
    let err = Model::load(&dir("digits_mlp").join("digits_mlp.onnx"), &opts).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("2 engine threads") && msg.contains("multithread"),
        "{msg}"
    );
}

#[cfg(feature = "multithread")]
#[test]
fn multithreaded_matmul_gives_the_same_answers() {
    let opts = EngineOptions {
        threads: 2,
        ..EngineOptions::default()
    };
    let model = Model::load(&dir("digits_mlp").join("digits_mlp.onnx"), &opts).unwrap();
    let input = read_npy(dir("digits_mlp").join("test_input.npy")).unwrap();
    let expected = read_npy(dir("digits_mlp").join("test_output.npy")).unwrap();
    let out = model.run(&[rows(&input, 0, 1)]).unwrap();
    assert_close(
        &out[0],
        &rows(&expected, 0, 1),
        1e-5,
        0.0,
        "threads=2 batch 1",
    );
    let out = model.run(&[rows(&input, 0, 450)]).unwrap();
    assert_close(
        &out[0],
        &rows(&expected, 0, 450),
        1e-5,
        0.0,
        "threads=2 batch 450",
    );
}

#[test]
fn npy_reads_the_example_files() {
    let labels = read_npy(dir("digits_mlp").join("test_labels.npy")).unwrap();
    assert_eq!(labels.shape, vec![450]);
    assert!(matches!(labels.data, TensorData::I32(_)));
    let input = read_npy(dir("mobilenetish").join("test_input.npy")).unwrap();
    assert_eq!(input.shape, vec![4, 3, 224, 224]);
    let e = read_npy(dir("digits_mlp").join("missing.npy")).unwrap_err();
    assert!(e.to_string().contains("missing.npy"), "{e}");
}

#[test]
fn cache_round_trip_gives_identical_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let cached = EngineOptions {
        cache_dir: Some(tmp.path().join("cache")),
        ..EngineOptions::default()
    };
    for name in ["digits_cnn", "mobilenetish"] {
        let path = dir(name).join(format!("{name}.onnx"));
        let plain = Model::load(&path, &EngineOptions::default()).unwrap();
        let first = Model::load(&path, &cached).unwrap();
        assert!(!first.loaded_from_cache(), "{name}: cache starts empty");
        let second = Model::load(&path, &cached).unwrap();
        assert!(
            second.loaded_from_cache(),
            "{name}: second load reads the cache"
        );
        assert_eq!(second.inputs(), plain.inputs());
        assert_eq!(second.outputs(), plain.outputs());
        let input = read_npy(dir(name).join("test_input.npy")).unwrap();
        for (from, to) in [(0, 1), (0, 3)] {
            let x = [rows(&input, from, to)];
            // Bit-identical: golden outputs computed without a cache must be reproduced with one.
            assert_eq!(
                second.run(&x).unwrap(),
                plain.run(&x).unwrap(),
                "{name} rows {from}..{to}"
            );
        }
    }
    // A damaged entry is ignored (and the model still loads from the ONNX file).
    for entry in std::fs::read_dir(tmp.path().join("cache")).unwrap() {
        let entry = entry.unwrap().path();
        if entry.to_string_lossy().ends_with(".nnef.tar") {
            std::fs::write(&entry, b"garbage").unwrap();
        }
    }
    let path = dir("digits_cnn").join("digits_cnn.onnx");
    let m = Model::load(&path, &cached).unwrap();
    assert!(!m.loaded_from_cache());
    assert_eq!(m.outputs()[0].name, "probabilities");
}

/// What a device serves: the ONNX model converted to NNEF, loaded through the NNEF path only
/// (the one a build without the `onnx` feature has), with the names the caller records.
#[test]
fn nnef_conversion_serves_the_same_model_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["digits_mlp", "digits_cnn", "vibration_ae", "mobilenetish"] {
        let path = dir(name).join(format!("{name}.onnx"));
        let onnx = Model::load(&path, &EngineOptions::default()).unwrap();
        let (archive, names) = engine::onnx_to_nnef(&path, &std::fs::read(&path).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            names.inputs,
            onnx.inputs()
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            names.outputs,
            onnx.outputs()
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>()
        );
        let nnef_path = tmp.path().join(format!("{name}.nnef.tar"));
        std::fs::write(&nnef_path, &archive).unwrap();
        let nnef = Model::load_as(
            &nnef_path,
            ModelFormat::Nnef,
            &names,
            &EngineOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        // Same signature, free batch dimension included.
        assert_eq!(nnef.inputs(), onnx.inputs(), "{name}");
        assert_eq!(nnef.outputs(), onnx.outputs(), "{name}");
        let input = read_npy(dir(name).join("test_input.npy")).unwrap();
        for (from, to) in [(0, 1), (0, 3)] {
            let x = [rows(&input, from, to)];
            assert_eq!(
                nnef.run(&x).unwrap(),
                onnx.run(&x).unwrap(),
                "{name} rows {from}..{to}"
            );
        }
    }
}

#[test]
fn nnef_conversion_is_deterministic() {
    let path = dir("digits_cnn").join("digits_cnn.onnx");
    let bytes = std::fs::read(&path).unwrap();
    let (a, _) = engine::onnx_to_nnef(&path, &bytes).unwrap();
    // Past a second boundary: tract's default writer would stamp another time.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (b, _) = engine::onnx_to_nnef(&path, &bytes).unwrap();
    assert!(a == b, "the same model converts to the same bytes");
}

#[test]
fn nnef_loads_refuse_wrong_names_and_damaged_archives() {
    let tmp = tempfile::tempdir().unwrap();
    let path = dir("digits_cnn").join("digits_cnn.onnx");
    let (archive, names) = engine::onnx_to_nnef(&path, &std::fs::read(&path).unwrap()).unwrap();
    let nnef_path = tmp.path().join("model.nnef.tar");
    std::fs::write(&nnef_path, &archive).unwrap();
    let opts = EngineOptions::default();

    let two_inputs = IoNames {
        inputs: vec!["a".into(), "b".into()],
        outputs: names.outputs.clone(),
    };
    let e = Model::load_nnef(&nnef_path, &two_inputs, &opts).unwrap_err();
    assert!(matches!(e, EngineError::Load { .. }), "{e}");
    assert!(e.to_string().contains("model.nnef.tar"), "{e}");

    // The names are the caller's: NNEF keeps none of its own.
    let renamed = IoNames {
        inputs: vec!["pixels".into()],
        outputs: vec!["scores".into()],
    };
    let m = Model::load_nnef(&nnef_path, &renamed, &opts).unwrap();
    assert_eq!(m.inputs()[0].name, "pixels");
    assert_eq!(m.outputs()[0].name, "scores");

    std::fs::write(&nnef_path, &archive[..archive.len() / 2]).unwrap();
    let e = Model::load_nnef(&nnef_path, &names, &opts).unwrap_err();
    assert!(e.to_string().contains("reading NNEF"), "{e}");

    // An ONNX file is not an NNEF archive (and vice versa): a load in the wrong format fails.
    let e = Model::load_as(&path, ModelFormat::Nnef, &names, &opts).unwrap_err();
    assert!(e.to_string().contains("reading NNEF"), "{e}");
}

/// `Precision::F16` computes in half precision (here on tract's portable kernels: this CPU has
/// no native f16 matrix product) behind the same float32 signature: outputs are close to the
/// float32 model's but not the same bits, top-1 classes agree, batches and single samples work,
/// from ONNX and from the NNEF a device loads.
#[test]
fn half_precision_keeps_the_signature_and_stays_close_to_float() {
    let half = EngineOptions {
        precision: engine::Precision::F16,
        ..EngineOptions::default()
    };
    for name in ["digits_mlp", "digits_cnn"] {
        let onnx = dir(name).join(format!("{name}.onnx"));
        let float = load(name);
        let (archive, names) = engine::onnx_to_nnef(&onnx, &std::fs::read(&onnx).unwrap()).unwrap();
        let nnef = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(nnef.path(), archive).unwrap();
        let input = read_npy(dir(name).join("test_input.npy")).unwrap();
        let batch = rows(&input, 0, 64);
        let want = float.run(&[batch.clone()]).unwrap();
        for model in [
            Model::load(&onnx, &half).unwrap(),
            Model::load_nnef(nnef.path(), &names, &half).unwrap(),
        ] {
            assert_eq!(model.precision(), engine::Precision::F16);
            assert_eq!(model.inputs(), float.inputs(), "{name}: inputs");
            assert_eq!(model.outputs(), float.outputs(), "{name}: outputs");
            let got = model.run(&[batch.clone()]).unwrap();
            assert_eq!(got[0].dtype(), DType::F32, "{name}: outputs widened back");
            // Softmax probabilities: half precision keeps ~3 significant digits.
            assert_close(&got[0], &want[0], 1e-2, 1e-2, name);
            assert_ne!(
                got[0], want[0],
                "{name}: the same bits as float32: not computed in f16"
            );
            let agreement = protocol::quality::top1_agreement(
                want[0].as_f32().unwrap(),
                got[0].as_f32().unwrap(),
                10,
            );
            assert!(
                agreement * 64.0 >= 63.0,
                "{name}: top-1 agreement {agreement}"
            );
            let single = model.run(&[rows(&input, 5, 6)]).unwrap();
            assert_close(&single[0], &rows(&got[0], 5, 6), 1e-3, 1e-3, name);
        }
    }
}
