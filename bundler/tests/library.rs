//! The library API the demo and the harness call in-process.

mod common;

use bundler::{BuildError, BuildOptions, Expiry, TaskKind};
use common::*;
use engine::{EngineOptions, Model};
use protocol::bundle::{read_bundle_file, MemorySink, VerifyOptions};
use protocol::manifest::{ModelFormat, OutputStatistic, ScoreKind, Task};

fn options(dir: &std::path::Path, model_dir: &str, onnx: &str) -> BuildOptions {
    if !dir.join("k.key").exists() {
        bundler::keygen(dir, "k").unwrap();
    }
    let mut o = BuildOptions::new(
        model(model_dir, onnx),
        model_dir,
        "1.0.0",
        1,
        dir.join("k.key"),
        dir.join(format!("{model_dir}.mfb")),
    );
    o.latency_runs = 5;
    o
}

#[test]
fn vibration_ae_is_a_regression_on_reconstruction_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path(), "vibration_ae", "vibration_ae.onnx");
    o.golden_inputs = Some(model("vibration_ae", "test_input.npy"));
    o.calibration = Some(model("vibration_ae", "calib_input.npy"));
    o.golden_max = 10;
    let report = bundler::build(&o).unwrap();
    assert_eq!(
        report.task,
        Task::Regression {
            output: "reconstruction".into(),
            statistic: OutputStatistic::ReconstructionError
        }
    );
    assert_eq!(report.evaluated, 1000);
    assert_eq!(report.golden_count, 10);
    assert_eq!(report.accuracy, None);
    let info = bundler::inspect(&o.output).unwrap();
    let r = info.baseline.regression.expect("regression baseline");
    // Calibration windows are normal: their reconstruction error is near the validation MSE.
    assert!(
        r.mean > 0.02 && r.mean < 0.12,
        "mean reconstruction error {}",
        r.mean
    );
    assert_eq!(r.histogram.total(), 100);
    assert_eq!(
        r.histogram.counts[0] + r.histogram.counts[21],
        0,
        "all inside [min, max]"
    );
    assert!(info.baseline.classification.is_none());
    assert_eq!(info.baseline.inputs[0].histogram.total(), 100 * 128);
    assert_eq!(info.baseline.auc, None, "no labels");

    // Its labels (0 normal, 1 anomalous) are anomaly labels: the task stays a reconstruction
    // and the bundle records the ROC AUC of the reconstruction error (the model card: 0.9332),
    // not an accuracy over 128 "classes".
    o.golden_labels = Some(model("vibration_ae", "test_labels.npy"));
    let report = bundler::build(&o).unwrap();
    assert!(matches!(report.task, Task::Regression { .. }));
    assert_eq!(report.accuracy, None);
    let auc = bundler::inspect(&o.output).unwrap().baseline.auc.unwrap();
    assert!((auc - 0.933176).abs() < 1e-3, "{auc}");

    // Labels for a regression that is not a reconstruction are refused, naming the file.
    let mut o = options(dir.path(), "digits_mlp", "digits_mlp.onnx");
    o.golden_inputs = Some(model("digits_mlp", "test_input.npy"));
    o.golden_labels = Some(model("digits_mlp", "test_labels.npy"));
    o.task = Some(TaskKind::Regression);
    let err = bundler::build(&o).unwrap_err();
    assert!(
        matches!(&err, BuildError::Labels { reason, .. }
            if reason.contains("reconstructs its input")),
        "{err}"
    );
}

#[test]
fn golden_payload_reproduces_on_the_engine() {
    // What the agent's self-test will do: decode golden.bin and rerun the model.
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path(), "digits_mlp", "digits_mlp.onnx");
    o.golden_inputs = Some(model("digits_mlp", "test_input.npy"));
    o.golden_labels = Some(model("digits_mlp", "test_labels.npy"));
    o.golden_max = 50;
    let report = bundler::build(&o).unwrap();
    assert!((report.accuracy.unwrap() - 0.98).abs() < 1e-9);
    let keyring = bundler::load_keyring(&[dir.path().join("k.pub")]).unwrap();
    let mut sink = MemorySink::default();
    let v = read_bundle_file(&o.output, &VerifyOptions::new(&keyring), &mut sink).unwrap();
    let golden = &v.manifest.golden;
    assert_eq!(golden.count, 50);
    assert_eq!((golden.atol, golden.rtol), (1e-4, 1e-3));
    let (inputs, outputs) = bundler::golden::decode_golden(golden, &sink.0["golden.bin"]).unwrap();
    assert_eq!(inputs[0].shape, vec![50, 64]);
    assert_eq!(outputs[0].shape, vec![50, 10]);
    // The stored inputs are the first 50 test inputs.
    let test = engine::npy::read_npy(model("digits_mlp", "test_input.npy")).unwrap();
    assert_eq!(
        inputs[0].as_f32().unwrap(),
        &test.as_f32().unwrap()[..50 * 64]
    );
    // The bundle carries NNEF (the default): load it the way a device build does.
    assert_eq!(v.manifest.model_format, ModelFormat::Nnef);
    assert_eq!(v.manifest.model_file, "model.nnef.tar");
    assert!(report.timings.convert_ms > 0.0);
    std::fs::write(dir.path().join("m.nnef.tar"), &sink.0["model.nnef.tar"]).unwrap();
    let names = engine::IoNames {
        inputs: vec!["input".into()],
        outputs: vec![v.manifest.outputs[0].name.clone()],
    };
    let m = Model::load_nnef(
        &dir.path().join("m.nnef.tar"),
        &names,
        &EngineOptions::default(),
    )
    .unwrap();
    let again = m.run(&inputs).unwrap();
    for (y, g) in again[0]
        .as_f32()
        .unwrap()
        .iter()
        .zip(outputs[0].as_f32().unwrap())
    {
        assert!(
            (y - g).abs() <= golden.atol + golden.rtol * g.abs(),
            "{y} vs {g}"
        );
    }
    // Spec ranges made it in.
    assert_eq!(v.manifest.inputs[0].range, Some([0.0, 1.0]));
}

#[test]
fn onnx_format_ships_the_file_byte_for_byte_and_nnef_the_same_answers() {
    let dir = tempfile::tempdir().unwrap();
    let keyring_for = |dir: &std::path::Path| bundler::load_keyring(&[dir.join("k.pub")]).unwrap();
    let mut reports = vec![];
    for format in [ModelFormat::Onnx, ModelFormat::Nnef] {
        let mut o = options(dir.path(), "digits_mlp", "digits_mlp.onnx");
        o.output = dir.path().join(format!("{format}.mfb"));
        o.golden_inputs = Some(model("digits_mlp", "test_input.npy"));
        o.golden_labels = Some(model("digits_mlp", "test_labels.npy"));
        o.model_format = Some(format);
        let report = bundler::build(&o).unwrap();
        let mut sink = MemorySink::default();
        let v = read_bundle_file(
            &o.output,
            &VerifyOptions::new(&keyring_for(dir.path())),
            &mut sink,
        )
        .unwrap();
        assert_eq!(v.manifest.model_format, format);
        let text = String::from_utf8(v.manifest_bytes.clone()).unwrap();
        // Left out when onnx: such a manifest reads in agents that predate the field.
        assert_eq!(text.contains("model_format"), format == ModelFormat::Nnef);
        match format {
            ModelFormat::Onnx => {
                assert_eq!(v.manifest.model_file, "model.onnx");
                assert_eq!(report.timings.convert_ms, 0.0);
                assert!(
                    sink.0["model.onnx"]
                        == std::fs::read(model("digits_mlp", "digits_mlp.onnx")).unwrap()
                );
            }
            ModelFormat::Nnef => {
                assert_eq!(v.manifest.model_file, "model.nnef.tar");
                assert!(!sink.0.contains_key("model.onnx"));
                // An NNEF archive is a tar holding the graph.
                let tar = &sink.0["model.nnef.tar"];
                assert!(tar.windows(10).any(|w| w == b"graph.nnef"));
            }
        }
        reports.push((report, v.manifest));
    }
    // Same model, same answers: identical golden outputs and accuracy.
    let (onnx, nnef) = (&reports[0].1, &reports[1].1);
    assert_eq!(onnx.baseline.accuracy, nnef.baseline.accuracy);
    assert_eq!(
        onnx.payload("golden.bin").unwrap().sha256,
        nnef.payload("golden.bin").unwrap().sha256
    );
    assert_eq!(onnx.inputs, nnef.inputs);
    assert_eq!(onnx.outputs, nnef.outputs);
}

#[test]
fn without_golden_inputs_a_synthetic_set_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path(), "digits_mlp", "digits_mlp.onnx");
    o.expiry = Some(Expiry::In(std::time::Duration::from_secs(3600)));
    o.targets = vec!["aarch64-unknown-linux-gnu".into()];
    o.health_policy.max_error_rate = Some(0.02);
    let report = bundler::build(&o).unwrap();
    assert_eq!(report.golden_source, "synthetic");
    assert_eq!(report.golden_count, 16);
    assert_eq!(report.accuracy, None);
    // Softmax outputs are recognised as probabilities even without labels.
    assert!(matches!(
        report.task,
        Task::Classification {
            scores: ScoreKind::Probabilities,
            classes: 10,
            ..
        }
    ));
    let info = bundler::inspect(&o.output).unwrap();
    assert_eq!(info.health_policy.max_error_rate, Some(0.02));
    let exp = info.expires_at.unwrap();
    assert!((exp - info.created_at).num_seconds() == 3600);
    assert_eq!(info.targets, vec!["aarch64-unknown-linux-gnu".to_string()]);
}

#[test]
fn task_override_and_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path(), "vibration_ae", "vibration_ae.onnx");
    o.golden_inputs = Some(model("vibration_ae", "test_input.npy"));
    o.task = Some(TaskKind::Classification);
    // 128 "classes" of reconstruction values: allowed when asked for explicitly, scored as logits.
    let report = bundler::build(&o).unwrap();
    assert!(matches!(
        report.task,
        Task::Classification {
            scores: ScoreKind::Logits,
            classes: 128,
            ..
        }
    ));

    let mut o = options(dir.path(), "digits_cnn", "digits_cnn.onnx");
    o.version = "v1".into();
    assert!(matches!(
        bundler::build(&o),
        Err(BuildError::Version { .. })
    ));
    o.version = "1.0.0".into();
    o.golden_labels = Some(model("digits_cnn", "test_labels.npy"));
    assert!(matches!(
        bundler::build(&o),
        Err(BuildError::LabelsWithoutInputs)
    ));
    o.golden_labels = None;
    o.golden_inputs = Some(model("digits_cnn", "test_output.npy"));
    let e = bundler::build(&o).unwrap_err();
    assert!(matches!(e, BuildError::Shape { .. }), "{e}");
    assert!(!o.output.exists());
}

#[test]
fn keygen_refuses_names_that_are_paths() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["../k", "a/b", "", ".."] {
        assert!(matches!(
            bundler::keygen(dir.path(), bad),
            Err(bundler::KeygenError::BadName { .. })
        ));
    }
    // Refuses when only the public half exists, too.
    std::fs::write(dir.path().join("half.pub"), "x").unwrap();
    assert!(matches!(
        bundler::keygen(dir.path(), "half"),
        Err(bundler::KeygenError::Exists(_))
    ));
    assert!(!dir.path().join("half.key").exists());
}
