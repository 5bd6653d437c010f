//! Small valid values for tests and examples of the crates that build on the protocol.

use chrono::{DateTime, Utc};

use crate::keys::SecretKey;
use crate::manifest::*;

/// The key that signs the fuzz seed corpora (`fuzz/corpus/`) and that the fuzz targets trust:
/// without a trusted signature the fuzzer could not get past the signature checks. Public on
/// purpose: it signs nothing else and no keyring outside tests lists it.
pub const FUZZ_SECRET_KEY: &str =
    "ed25519-secret 6d6f64656c666c6565742066757a7a696e67206b6579206e6f74207365637265";

/// The device id of the fuzz targets and their seeds.
pub const FUZZ_DEVICE: &str = "fuzz-device";

/// [`FUZZ_SECRET_KEY`], parsed.
pub fn fuzz_key() -> SecretKey {
    SecretKey::from_file_text(FUZZ_SECRET_KEY).expect("the fuzz key parses")
}

/// The fixed clock of the fuzz targets and their seeds (2027-01-15), so runs are reproducible.
pub fn fuzz_now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).expect("valid time")
}

/// A minimal valid manifest for a one-input, ten-class model with payloads `model.onnx` and
/// `golden.bin` (their entries are filled in by `write_bundle`).
pub fn sample_manifest() -> Manifest {
    let spec = |name: &str, dims: Vec<Option<usize>>| TensorSpec {
        name: name.into(),
        dtype: DType::F32,
        shape: dims,
        range: None,
    };
    Manifest {
        format_version: FORMAT_VERSION,
        name: "sample".into(),
        version: semver::Version::new(1, 0, 0),
        security_version: 1,
        created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("valid time"),
        expires_at: None,
        targets: vec![],
        model_file: "model.onnx".into(),
        model_format: ModelFormat::Onnx,
        inputs: vec![spec("input", vec![None, Some(4)])],
        outputs: vec![spec("probabilities", vec![None, Some(10)])],
        task: Task::Classification {
            output: "probabilities".into(),
            scores: ScoreKind::Probabilities,
            classes: 10,
        },
        quantization: Quantization::None,
        golden: Golden {
            file: "golden.bin".into(),
            count: 0,
            inputs: vec![],
            outputs: vec![],
            atol: 1e-5,
            rtol: 1e-4,
            f16_compute: None,
        },
        baseline: Baseline {
            samples: 0,
            source: "none".into(),
            inputs: vec![],
            classification: None,
            regression: None,
            accuracy: None,
            auc: None,
            latency: LatencyBaseline {
                batch: 1,
                p50_us: 0.0,
                p95_us: 0.0,
                machine: "test".into(),
            },
        },
        health_policy: HealthPolicy::default(),
        telemetry_samples: TelemetrySamples::Full,
        narrow_weights: None,
        delta_base: None,
        payloads: vec![],
    }
}

/// A crash test's hook in the programs: ends the process at once (`abort`, as `kill -9` would)
/// when the environment variable `MODELFLEET_CRASH_AT` names `point` (`agent/tests/crash.rs`,
/// `tests/agent_faults.rs`, `tests/rollout_commands.rs`). One cached lookup otherwise.
pub fn crash_point(point: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("MODELFLEET_CRASH_AT").ok())
        .as_deref()
        == Some(point)
    {
        eprintln!("MODELFLEET_CRASH_AT={point}: aborting");
        std::process::abort();
    }
}
