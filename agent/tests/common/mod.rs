//! Shared fixtures: real keys, real bundles of the reference models, a real agent process.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use engine::Tensor;

pub mod mqtt;

pub const AGENT: &str = env!("CARGO_BIN_EXE_fleet-agent");

pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models")
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    pub keyring: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let files = bundler::keys::keygen_files(&dir.path().join("keys"), "fleet").unwrap();
        Fixture {
            key: files.secret,
            keyring: files.public,
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Builds a bundle of reference model `model` at `version` with its test inputs as the
    /// golden set (and labels, when the model has them).
    pub fn bundle(&self, model: &str, version: &str, security_version: u64) -> PathBuf {
        self.bundle_with(model, version, security_version, |_| {})
    }

    pub fn bundle_with(
        &self,
        model: &str,
        version: &str,
        security_version: u64,
        edit: impl FnOnce(&mut bundler::BuildOptions),
    ) -> PathBuf {
        let src = models_dir().join(model);
        let out = self.path(&format!("{model}-{version}.mfb"));
        let mut opts = bundler::BuildOptions::new(
            src.join(format!("{model}.onnx")),
            model,
            version,
            security_version,
            &self.key,
            &out,
        );
        opts.golden_inputs = Some(src.join("test_input.npy"));
        if src.join("test_labels.npy").exists() {
            opts.golden_labels = Some(src.join("test_labels.npy"));
        }
        opts.golden_max = 16;
        opts.latency_runs = 3;
        edit(&mut opts);
        bundler::build(&opts).unwrap();
        out
    }

    /// `fleet-agent install BUNDLE --data-dir DATA --keyring KEYRING`, asserting success;
    /// returns its standard output.
    pub fn install_offline(&self, bundle: &Path, data: &Path) -> String {
        let out = self
            .agent_cmd(&[
                "install",
                bundle.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
            ])
            .args(["--keyring", self.keyring.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn agent_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(AGENT);
        c.args(args).env("RUST_LOG", "warn");
        c
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `fleet-agent run` child process, killed on drop.
pub struct AgentProcess {
    pub child: Child,
    pub url: String,
}

impl AgentProcess {
    pub fn start(fx: &Fixture, data_dir: &Path, extra: &[&str]) -> AgentProcess {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec![
            "run",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--keyring",
            fx.keyring.to_str().unwrap(),
            "--listen",
            &listen,
        ];
        args.extend_from_slice(extra);
        let child = fx.agent_cmd(&args).stdout(Stdio::null()).spawn().unwrap();
        let p = AgentProcess {
            child,
            url: format!("http://{listen}"),
        };
        p.wait_live();
        p
    }

    fn wait_live(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if ureq::get(&format!("{}/v2/health/live", self.url))
                .call()
                .is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent at {} did not come up", self.url);
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sample `i` of a batch tensor, as a batch of one.
pub fn sample(batch: &Tensor, i: usize) -> Tensor {
    let per: usize = batch.shape[1..].iter().product();
    let mut shape = batch.shape.clone();
    shape[0] = 1;
    Tensor::from_f32(
        shape,
        batch.as_f32().unwrap()[i * per..(i + 1) * per].to_vec(),
    )
    .unwrap()
}

/// An OIP v2 JSON request for one input tensor.
pub fn json_request(input: &str, t: &Tensor) -> serde_json::Value {
    serde_json::json!({"inputs": [{"name": input, "datatype": "FP32", "shape": t.shape,
                                   "data": t.as_f32().unwrap()}]})
}

pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap()
}

pub fn labels(model: &str) -> Vec<i64> {
    match engine::npy::read_npy(models_dir().join(model).join("test_labels.npy"))
        .unwrap()
        .data
    {
        engine::TensorData::I32(v) => v.into_iter().map(i64::from).collect(),
        engine::TensorData::I64(v) => v,
        other => panic!("labels are {other:?}"),
    }
}
