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

fn open(fx: &Fixture, data: &Path, backend: Arc<Counting>) -> Agent {
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
