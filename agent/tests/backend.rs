//! The agent runs models only through its configured [`Backend`]: install (load, schema check,
//! golden self-test), start-up reloads and status all go through it, so a second backend plugs in
//! without touching the install / health / telemetry code.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use agent::backend::{Backend, LoadedModel, ModelFile, Tract};
use agent::{Agent, AgentConfig};
use common::*;
use engine::{EngineError, EngineOptions, Tensor};
use protocol::manifest::TensorSpec;

/// tract, counting what the agent asks of it (a test probe, not a shipped backend).
#[derive(Debug, Default)]
struct Counting {
    loads: AtomicUsize,
    runs: Arc<AtomicUsize>,
}

struct CountingModel {
    inner: Arc<dyn LoadedModel>,
    runs: Arc<AtomicUsize>,
}

impl LoadedModel for CountingModel {
    fn inputs(&self) -> &[TensorSpec] {
        self.inner.inputs()
    }
    fn outputs(&self) -> &[TensorSpec] {
        self.inner.outputs()
    }
    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.inner.run(inputs)
    }
}

impl Backend for Counting {
    fn name(&self) -> &'static str {
        "counting-tract"
    }
    fn load(
        &self,
        model: &ModelFile<'_>,
        opts: &EngineOptions,
    ) -> Result<Arc<dyn LoadedModel>, EngineError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(CountingModel {
            inner: Tract.load(model, opts)?,
            runs: self.runs.clone(),
        }))
    }
}

fn open(fx: &Fixture, data: &Path, backend: Arc<dyn Backend>) -> Agent {
    let keyring =
        protocol::keys::Keyring::from_file_text(&std::fs::read_to_string(&fx.keyring).unwrap())
            .unwrap();
    let mut config = AgentConfig::new(data);
    config.workers = 1;
    config.backend = backend;
    Agent::open(config, keyring).unwrap()
}

#[test]
fn install_self_test_reload_and_serving_go_through_the_configured_backend() {
    let fx = Fixture::new();
    let v1 = fx.bundle("digits_cnn", "1.0.0", 1);
    let data = fx.path("device");
    let backend = Arc::new(Counting::default());
    let agent = open(&fx, &data, backend.clone());
    agent.install(&std::fs::read(&v1).unwrap()).unwrap();
    assert_eq!(backend.loads.load(Ordering::SeqCst), 1);
    // The golden self-test ran on the backend's model before activation.
    let after_install = backend.runs.load(Ordering::SeqCst);
    assert!(after_install >= 1, "self-test did not run on the backend");
    let status = serde_json::to_value(agent.status().unwrap()).unwrap();
    assert_eq!(status["backend"], "counting-tract");

    // Serving uses the same loaded model: right answers, counted by the backend.
    let inputs = engine::npy::read_npy(models_dir().join("digits_cnn/test_input.npy")).unwrap();
    let labels = labels("digits_cnn");
    let serving = agent.registry.get("digits_cnn").unwrap();
    let out = serving.engine.run(&[sample(&inputs, 0)]).unwrap();
    let engine::TensorData::F32(scores) = &out[0].data else {
        panic!("f32 scores expected")
    };
    assert_eq!(argmax(scores) as i64, labels[0]);
    assert_eq!(backend.runs.load(Ordering::SeqCst), after_install + 1);
    drop((serving, agent));

    // A restart reloads (and re-self-tests) the installed slot through the backend too.
    let backend2 = Arc::new(Counting::default());
    let agent = open(&fx, &data, backend2.clone());
    assert_eq!(backend2.loads.load(Ordering::SeqCst), 1);
    assert!(backend2.runs.load(Ordering::SeqCst) >= 1);
    assert_eq!(agent.status().unwrap().models[0].active, "1.0.0");
}

#[test]
fn onnx_and_nnef_bundles_of_one_model_install_and_give_the_same_answers() {
    use protocol::manifest::ModelFormat;
    let fx = Fixture::new();
    let onnx = fx.bundle_with("digits_cnn", "1.0.0", 1, |o| {
        o.model_format = Some(ModelFormat::Onnx)
    });
    let nnef = fx.bundle("digits_cnn", "1.0.1", 1);
    let keyring = bundler::load_keyring(std::slice::from_ref(&fx.keyring)).unwrap();
    let verify = |b: &Path| bundler::verify(b, &keyring).unwrap().manifest;
    let (m_onnx, m_nnef) = (verify(&onnx), verify(&nnef));
    assert_eq!(
        (m_onnx.model_format, m_onnx.model_file.as_str()),
        (ModelFormat::Onnx, "model.onnx")
    );
    assert_eq!(
        (m_nnef.model_format, m_nnef.model_file.as_str()),
        (ModelFormat::Nnef, "model.nnef.tar")
    );
    // The NNEF model reproduces the ONNX one bit for bit: the golden sets are the same bytes.
    assert_eq!(
        m_onnx.payload("golden.bin").unwrap().sha256,
        m_nnef.payload("golden.bin").unwrap().sha256
    );
    assert_eq!(m_onnx.baseline.accuracy, m_nnef.baseline.accuracy);

    let data = fx.path("device");
    let backend = Arc::new(Counting::default());
    let agent = open(&fx, &data, backend.clone());
    let inputs = engine::npy::read_npy(models_dir().join("digits_cnn/test_input.npy")).unwrap();
    let answers = |agent: &Agent, version: &str| {
        let serving = agent.registry.get("digits_cnn").unwrap();
        assert_eq!(serving.version(), version);
        (0..labels("digits_cnn").len())
            .map(|i| serving.engine.run(&[sample(&inputs, i)]).unwrap())
            .collect::<Vec<_>>()
    };
    agent.install(&std::fs::read(&onnx).unwrap()).unwrap();
    let from_onnx = answers(&agent, "1.0.0");
    agent.install(&std::fs::read(&nnef).unwrap()).unwrap();
    let from_nnef = answers(&agent, "1.0.1");
    assert_eq!(backend.loads.load(Ordering::SeqCst), 2);
    assert!(from_onnx == from_nnef, "same outputs from both formats");
    drop(agent);

    // Both slots reload after a restart, each in its own format.
    let agent = open(&fx, &data, Arc::new(Counting::default()));
    let status = agent.status().unwrap();
    assert_eq!(status.models[0].active, "1.0.1");
    assert_eq!(answers(&agent, "1.0.1"), from_nnef);
}

/// A device build's backend: tract through the NNEF path only (an agent built without the
/// engine's `onnx` feature refuses ONNX models the same way).
#[derive(Debug, Default)]
struct NnefOnly;

impl Backend for NnefOnly {
    fn name(&self) -> &'static str {
        "nnef-only-tract"
    }
    fn load(
        &self,
        model: &ModelFile<'_>,
        opts: &EngineOptions,
    ) -> Result<Arc<dyn LoadedModel>, EngineError> {
        if model.format != protocol::manifest::ModelFormat::Nnef {
            return Err(EngineError::FormatNotBuilt {
                path: model.path.to_owned(),
                format: model.format,
            });
        }
        Tract.load(model, opts)
    }
}

/// `bundle` re-signed with the fixture's key after `edit` changed its decompressed payloads
/// (name → bytes): a bundle whose signature and hashes are all good but whose content is not.
fn resigned(
    fx: &Fixture,
    bundle: &Path,
    out: &str,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, Vec<u8>>),
) -> std::path::PathBuf {
    use protocol::bundle::{compress_payload, read_bundle_file, write_bundle, MemorySink};
    let keyring = bundler::load_keyring(std::slice::from_ref(&fx.keyring)).unwrap();
    let mut sink = MemorySink::default();
    let v = read_bundle_file(
        bundle,
        &protocol::bundle::VerifyOptions::new(&keyring),
        &mut sink,
    )
    .unwrap();
    let mut payloads: std::collections::BTreeMap<String, Vec<u8>> = sink.0.into_iter().collect();
    edit(&mut payloads);
    let mut manifest = v.manifest;
    let order: Vec<String> = manifest
        .payloads
        .iter()
        .map(|p| p.file.trim_end_matches(".zst").to_owned())
        .collect();
    let compressed: Vec<_> = order
        .iter()
        .map(|name| compress_payload(name, &payloads[name], 3, |_, _| {}).unwrap())
        .collect();
    let key = bundler::load_secret_key(&fx.key).unwrap();
    let mut bytes = Vec::new();
    write_bundle(&mut bytes, &mut manifest, &compressed, &[&key]).unwrap();
    let path = fx.path(out);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn an_int8_weights_nnef_bundle_is_expanded_once_at_install_on_a_device_build() {
    use protocol::manifest::ModelFormat;
    use sha2::Digest;
    let fx = Fixture::new();
    let q = fx.bundle_with("digits_cnn", "1.0.0", 1, |o| {
        o.quantize = bundler::QuantizeMode::Int8Weights;
        o.model_format = Some(ModelFormat::Nnef);
    });
    let keyring = bundler::load_keyring(std::slice::from_ref(&fx.keyring)).unwrap();
    let m = bundler::verify(&q, &keyring).unwrap().manifest;
    let narrow = m
        .narrow_weights
        .clone()
        .expect("narrow weights in the manifest");
    assert_eq!(narrow.file, "model.weights.bin");
    assert_eq!(narrow.tensors, 3, "two Conv weights, one Gemm weight");
    assert!(m.payload("model.weights.bin").is_some());

    let data = fx.path("device");
    let agent = open(&fx, &data, Arc::new(NnefOnly));
    agent.install(&std::fs::read(&q).unwrap()).unwrap();
    // The slot holds the expanded archive (the manifest's size and sha256), not the narrow form.
    let model_dir = data.join("slots/digits_cnn");
    let slot = std::fs::read_dir(&model_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let archive = std::fs::read(slot.join("model.nnef.tar")).unwrap();
    assert_eq!(archive.len() as u64, narrow.model_size);
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&archive)),
        narrow.model_sha256
    );
    assert!(!slot.join("model.weights.bin").exists());
    // It serves with the accuracy the manifest records, on every test sample.
    let serve_accuracy = |agent: &Agent| {
        let inputs = engine::npy::read_npy(models_dir().join("digits_cnn/test_input.npy")).unwrap();
        let labels = labels("digits_cnn");
        let serving = agent.registry.get("digits_cnn").unwrap();
        let hits = (0..labels.len())
            .filter(|&i| {
                let out = serving.engine.run(&[sample(&inputs, i)]).unwrap();
                argmax(out[0].as_f32().unwrap()) as i64 == labels[i]
            })
            .count();
        hits as f64 / labels.len() as f64
    };
    assert_eq!(Some(serve_accuracy(&agent)), m.baseline.accuracy);
    drop(agent);
    // A restart re-hashes the expanded file against the manifest and serves it again.
    let agent = open(&fx, &data, Arc::new(NnefOnly));
    assert_eq!(agent.status().unwrap().models[0].active, "1.0.0");
    assert_eq!(Some(serve_accuracy(&agent)), m.baseline.accuracy);

    // Signed bundles whose narrow weights are inconsistent are refused, naming what is wrong,
    // and the serving model stays.
    let flip_value = resigned(&fx, &q, "flipped.mfb", |p| {
        let w = p.get_mut("model.weights.bin").unwrap();
        let last = w.len() - 1;
        w[last] = if w[last] == 1 { 2 } else { 1 };
    });
    let minus_128 = resigned(&fx, &q, "minus128.mfb", |p| {
        let w = p.get_mut("model.weights.bin").unwrap();
        let last = w.len() - 1;
        w[last] = 0x80;
    });
    let truncated = resigned(&fx, &q, "truncated.mfb", |p| {
        p.get_mut("model.weights.bin").unwrap().pop();
    });
    for (bundle, says) in [
        (&flip_value, "the manifest says"),
        (&minus_128, "is -128"),
        (&truncated, "left in the payload"),
    ] {
        let err = agent.install(&std::fs::read(bundle).unwrap()).unwrap_err();
        assert_eq!(err.reason(), "invalid_bundle", "{err}");
        let text = err.to_string();
        assert!(
            text.contains("narrow weights") && text.contains(says),
            "{text}"
        );
        assert_eq!(agent.status().unwrap().models[0].active, "1.0.0");
    }
}
