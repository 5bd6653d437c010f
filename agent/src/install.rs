//! The install path: from bundle bytes to a verified, self-tested slot.
//!
//! In this order, each step refusing with a typed error and leaving the serving model untouched:
//! 1. verify signatures, expiry and every payload hash while decompressing into a staging
//!    directory (`protocol::bundle::read_bundle` with a directory sink);
//! 2. check the security version against the device's persisted floor for that model;
//! 3. check the bundle's targets against this device's target;
//! 4. put narrow weights back into the model file (NNEF `int8-weights` / `f16` bundles), then
//!    move the staging directory to its slot name (fsync + rename);
//! 5. load and optimise the model with the engine (or take the already loaded one with the same
//!    bytes from a shared [`ModelCache`], in a simulated fleet);
//! 6. run the golden inputs and compare with the golden outputs within the bundle's tolerance.
//!
//! Activation (the pointer flip) is the caller's: see [`crate::agent::Agent::install`].

use std::fs;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use protocol::bundle::{read_bundle, BundleError, DirSink, VerifiedBundle, VerifyOptions};
use protocol::manifest::{F16Compute, Golden, Manifest};

use engine::{EngineOptions, Precision, Tensor};

use crate::backend::{Backend, LoadedModel, ModelFile};

use crate::model_cache::{ModelCache, ModelKey};

/// Why a bundle was refused. Every message names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("bundle rejected: {0}")]
    Bundle(#[from] BundleError),
    #[error(
        "bundle rejected: security version {got} of '{model}' is below the device's floor {floor}"
    )]
    SecurityVersion { model: String, got: u64, floor: u64 },
    #[error("bundle rejected: '{model}' targets [{targets}], this device is {device}")]
    Target {
        model: String,
        targets: String,
        device: String,
    },
    #[error("bundle rejected: {0}")]
    NarrowWeights(#[from] protocol::narrow_weights::NarrowWeightsError),
    #[error("bundle rejected: model does not load: {0}")]
    Load(engine::EngineError),
    #[error("bundle rejected: model schema differs from the manifest: {0}")]
    Schema(String),
    #[error("bundle rejected: golden self-test failed: {0}")]
    Golden(String),
    #[error(
        "install failed: no space left in the data directory ({0}); the serving model is unchanged"
    )]
    NoSpace(std::io::Error),
    #[error("install failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("install failed: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl InstallError {
    /// Short machine-readable reason, used as the `reason` of `rejected` events.
    pub fn reason(&self) -> &'static str {
        match self {
            InstallError::Bundle(BundleError::Expired { .. }) => "expired",
            InstallError::Bundle(
                BundleError::Untrusted { .. }
                | BundleError::BadSignature(_)
                | BundleError::TooFewSignatures { .. },
            ) => "signature",
            InstallError::Bundle(_) | InstallError::NarrowWeights(_) => "invalid_bundle",
            InstallError::SecurityVersion { .. } => "security_version",
            InstallError::Target { .. } => "target",
            // A device build (no ONNX front end) given an ONNX bundle: the bundle is fine, this
            // agent cannot read its format (`bundler build --model-format nnef` can).
            InstallError::Load(engine::EngineError::FormatNotBuilt { .. }) => "model_format",
            InstallError::Load(_) => "load",
            InstallError::Schema(_) => "schema",
            InstallError::Golden(_) => "golden_self_test",
            InstallError::NoSpace(_) => "no_space",
            InstallError::Io(_) | InstallError::Store(_) => "io",
        }
    }
}

impl InstallError {
    /// A full disk (or quota) wherever it struck — unpacking a payload, writing the manifest,
    /// renaming the slot — becomes [`InstallError::NoSpace`]: the device, not the bundle, is
    /// at fault, and the refusal says so.
    pub fn classify_no_space(self) -> InstallError {
        fn full(e: &std::io::Error) -> bool {
            matches!(
                e.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        }
        match self {
            InstallError::Io(e) if full(&e) => InstallError::NoSpace(e),
            InstallError::Bundle(BundleError::Sink { source, .. }) if full(&source) => {
                InstallError::NoSpace(source)
            }
            InstallError::Bundle(BundleError::Io(e)) if full(&e) => InstallError::NoSpace(e),
            other => other,
        }
    }
}

/// Step 1: verify the bundle while writing its payloads into `staging` (which must exist).
pub fn verify_into(
    bundle: impl Read,
    staging: &Path,
    opts: &VerifyOptions<'_>,
) -> Result<VerifiedBundle, InstallError> {
    let verified = read_bundle(bundle, opts, &mut DirSink(staging.to_path_buf()))?;
    crate::slots::write_file_durably(
        &staging.join(crate::slots::MANIFEST_FILE),
        &verified.manifest_bytes,
    )?;
    Ok(verified)
}

/// Steps 2 and 3.
pub fn check_policy(m: &Manifest, floor: u64, device_target: &str) -> Result<(), InstallError> {
    if m.security_version < floor {
        return Err(InstallError::SecurityVersion {
            model: m.name.clone(),
            got: m.security_version,
            floor,
        });
    }
    if !m.targets.is_empty() && !m.targets.iter().any(|t| t == device_target) {
        return Err(InstallError::Target {
            model: m.name.clone(),
            targets: m.targets.join(", "),
            device: device_target.to_string(),
        });
    }
    Ok(())
}

/// Step 3b, in the staging directory: with narrow weights (NNEF `int8-weights` / `f16`
/// bundles), puts them back into the model file — exactly the file the bundler evaluated, or
/// refused ([`protocol::narrow_weights::expand`] checks the manifest's size and sha256) — written
/// durably (temp, fsync, rename), and removes the narrow payload. Before the slot gets its name,
/// so a crash leaves only a staging directory, wiped at the next start.
pub fn expand_narrow_weights(staging: &Path, m: &Manifest) -> Result<(), InstallError> {
    let Some(narrow) = &m.narrow_weights else {
        return Ok(());
    };
    let model_path = staging.join(&m.model_file);
    let narrow_path = staging.join(&narrow.file);
    let expanded = protocol::narrow_weights::expand(
        &fs::read(&model_path)?,
        &fs::read(&narrow_path)?,
        narrow,
    )?;
    crate::slots::write_file_durably(&model_path, &expanded)?;
    fs::remove_file(&narrow_path)?;
    Ok(())
}

/// Steps 5 and 6 on a slot directory; also used at start-up to reload an installed slot.
/// `check_hash` re-hashes the model file against the manifest first (start-up: bit rot, a
/// partially synced disk).
///
/// With `shared`, the engine comes from that cache when a model with the same bytes (the model
/// payload's sha256 in `manifest`, which the caller has verified against the file: at install
/// while verifying the bundle, at start-up through `check_hash`) and the same engine options is
/// already loaded; otherwise it is loaded and put there. The schema check and the golden
/// self-test run either way, on the engine this slot will serve.
pub fn load_slot(
    slot: &Path,
    manifest: &Manifest,
    backend: &dyn Backend,
    opts: &EngineOptions,
    check_hash: bool,
    shared: Option<&ModelCache>,
) -> Result<(Arc<dyn LoadedModel>, std::time::Duration), InstallError> {
    let model_path = slot.join(&manifest.model_file);
    // The model file as loaded: the payload, or with narrow weights the expanded file.
    let model_sha256 = manifest.loaded_model_sha256();
    if check_hash {
        let expected = model_sha256.ok_or_else(|| {
            InstallError::Schema(format!(
                "manifest lists no payload '{}'",
                manifest.model_file
            ))
        })?;
        let bytes = fs::read(&model_path)?;
        let actual = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        if actual != expected {
            return Err(InstallError::Bundle(BundleError::Hash {
                name: manifest.model_file.clone(),
                expected: expected.to_owned(),
                actual,
            }));
        }
    }
    let started = Instant::now();
    let model_file = ModelFile::of(manifest, &model_path);
    let load_in = |precision: Precision| {
        let opts = EngineOptions {
            precision,
            ..opts.clone()
        };
        let load = || backend.load(&model_file, &opts).map_err(InstallError::Load);
        match (shared, model_sha256) {
            (Some(cache), Some(sha256)) => cache
                .get_or_load(&ModelKey::new(backend, sha256, &opts), load)
                .map(|(m, _)| m),
            // No payload entry to key on (a verified manifest always has one): load unshared.
            _ => load(),
        }
    };
    let half = match (opts.precision, manifest.golden.f16_compute) {
        (Precision::F16, Some(gate)) => {
            match load_in(Precision::F16).and_then(|m| judge_half(slot, manifest, &gate, m)) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(
                        "{} {}: computing in float32, not float16: {e}",
                        manifest.name,
                        manifest.version
                    );
                    None
                }
            }
        }
        _ => None,
    };
    let model = match half {
        Some(m) => m,
        None => {
            let model = load_in(Precision::F32)?;
            check_schema(manifest, model.as_ref())?;
            golden_self_test(slot, manifest, model.as_ref())?;
            model
        }
    };
    Ok((model, started.elapsed()))
}

/// The half-precision model if its golden outputs pass the bundle's `f16_compute` gate
/// ([`protocol::manifest::F16Compute`]); otherwise the reason.
fn judge_half(
    slot: &Path,
    manifest: &Manifest,
    gate: &F16Compute,
    model: Arc<dyn LoadedModel>,
) -> Result<Arc<dyn LoadedModel>, InstallError> {
    check_schema(manifest, model.as_ref())?;
    let (expected, got) = golden_run(slot, manifest, model.as_ref())?;
    let (want, have) = (Tensor::f32_slices(&expected), Tensor::f32_slices(&got));
    let figures = gate
        .judge(&manifest.task, &manifest.golden, &want, &have)
        .map_err(InstallError::Golden)?;
    tracing::info!(
        "{} {}: computing in float16 ({figures})",
        manifest.name,
        manifest.version
    );
    Ok(model)
}

fn check_schema(m: &Manifest, model: &dyn LoadedModel) -> Result<(), InstallError> {
    let same = |a: &[protocol::manifest::TensorSpec], b: &[protocol::manifest::TensorSpec]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.name == y.name && x.dtype == y.dtype && x.shape == y.shape)
    };
    if !same(&m.inputs, model.inputs()) || !same(&m.outputs, model.outputs()) {
        return Err(InstallError::Schema(format!(
            "manifest inputs {:?} outputs {:?}, model inputs {:?} outputs {:?}",
            names(&m.inputs),
            names(&m.outputs),
            names(model.inputs()),
            names(model.outputs())
        )));
    }
    Ok(())
}

fn names(specs: &[protocol::manifest::TensorSpec]) -> Vec<String> {
    specs
        .iter()
        .map(|s| format!("{}:{}{:?}", s.name, s.dtype.oip_name(), s.oip_shape()))
        .collect()
}

/// Runs the golden inputs and compares every output element within the tolerance.
pub fn golden_self_test(
    slot: &Path,
    m: &Manifest,
    model: &dyn LoadedModel,
) -> Result<(), InstallError> {
    let (expected, outputs) = golden_run(slot, m, model)?;
    compare_golden(&m.golden, &expected, &outputs).map_err(InstallError::Golden)
}

/// The golden outputs of `slot` and `model`'s outputs for the golden inputs (none when the
/// golden set is empty).
fn golden_run(
    slot: &Path,
    m: &Manifest,
    model: &dyn LoadedModel,
) -> Result<(Vec<Tensor>, Vec<Tensor>), InstallError> {
    let g = &m.golden;
    if g.count == 0 {
        return Ok((vec![], vec![]));
    }
    let bytes = fs::read(slot.join(&g.file))?;
    let (inputs, expected) =
        engine::tensor::golden_tensors(g, &bytes).map_err(InstallError::Golden)?;
    let outputs = model
        .run(&inputs)
        .map_err(|e| InstallError::Golden(format!("running the golden inputs: {e}")))?;
    Ok((expected, outputs))
}

/// Compares outputs with the golden outputs: `|y - g| <= atol + rtol * |g|` element-wise.
/// The error names the worst element.
pub fn compare_golden(g: &Golden, expected: &[Tensor], got: &[Tensor]) -> Result<(), String> {
    if expected.len() != got.len() {
        return Err(format!(
            "model gave {} outputs, golden set has {}",
            got.len(),
            expected.len()
        ));
    }
    for ((spec, want), have) in g.outputs.iter().zip(expected).zip(got) {
        if want.shape != have.shape {
            return Err(format!(
                "output '{}' has shape {:?}, golden shape {:?}",
                spec.name, have.shape, want.shape
            ));
        }
        let (Some(w), Some(h)) = (want.as_f32(), have.as_f32()) else {
            if want != have {
                return Err(format!(
                    "output '{}' differs from the golden output",
                    spec.name
                ));
            }
            continue;
        };
        // Worst excess over the tolerance; NaN anywhere is a failure.
        let mut worst: Option<(usize, f32, f32, f32)> = None;
        for (i, (&y, &e)) in h.iter().zip(w).enumerate() {
            let diff = (y - e).abs();
            let bad = !(diff <= g.atol + g.rtol * e.abs());
            if bad && worst.is_none_or(|(_, _, _, d)| diff.is_nan() || diff > d) {
                worst = Some((i, y, e, diff));
            }
        }
        if let Some((i, y, e, diff)) = worst {
            let per_sample: usize = want.shape.iter().skip(1).product::<usize>().max(1);
            return Err(format!(
                "output '{}' sample {} element {}: got {y}, expected {e} (|diff| {diff} > atol {} + rtol {} * |expected|)",
                spec.name,
                i / per_sample,
                i % per_sample,
                g.atol,
                g.rtol
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::manifest::{DType, GoldenTensor};

    fn golden() -> Golden {
        Golden {
            file: "golden.bin".into(),
            count: 2,
            inputs: vec![GoldenTensor {
                name: "x".into(),
                dtype: DType::F32,
                shape: vec![2, 1],
            }],
            outputs: vec![GoldenTensor {
                name: "y".into(),
                dtype: DType::F32,
                shape: vec![2, 2],
            }],
            atol: 1e-3,
            rtol: 0.0,
            f16_compute: None,
        }
    }

    #[test]
    fn golden_split_and_compare_name_the_worst_element() {
        let g = golden();
        let vals: Vec<f32> = vec![1.0, 2.0, 0.1, 0.2, 0.3, 0.4];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (inputs, outputs) = engine::tensor::golden_tensors(&g, &bytes).unwrap();
        assert_eq!(inputs[0].as_f32().unwrap(), &[1.0, 2.0]);
        compare_golden(&g, &outputs, &outputs).unwrap();
        let off = Tensor::from_f32(vec![2, 2], vec![0.1, 0.2, 0.3, 0.9]).unwrap();
        let err = compare_golden(&g, &outputs, &[off]).unwrap_err();
        assert!(
            err.contains("sample 1 element 1") && err.contains("got 0.9"),
            "{err}"
        );
        let nan = Tensor::from_f32(vec![2, 2], vec![f32::NAN, 0.2, 0.3, 0.4]).unwrap();
        assert!(compare_golden(&g, &outputs, &[nan])
            .unwrap_err()
            .contains("NaN"));
        assert!(engine::tensor::golden_tensors(&g, &bytes[..20])
            .unwrap_err()
            .contains("too short"));
        let mut long = bytes.clone();
        long.push(0);
        assert!(engine::tensor::golden_tensors(&g, &long)
            .unwrap_err()
            .contains("trailing"));
    }

    #[test]
    fn policy_refuses_lower_security_version_and_foreign_target() {
        let mut m = protocol::testing::sample_manifest();
        m.security_version = 3;
        assert!(check_policy(&m, 3, "x86_64-unknown-linux-gnu").is_ok());
        let err = check_policy(&m, 4, "x86_64-unknown-linux-gnu")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("security version 3") && err.contains("floor 4"),
            "{err}"
        );
        m.targets = vec!["aarch64-unknown-linux-gnu".into()];
        let err = check_policy(&m, 0, "x86_64-unknown-linux-gnu")
            .unwrap_err()
            .to_string();
        assert!(err.contains("aarch64-unknown-linux-gnu") && err.contains("this device is x86_64"));
    }
}
