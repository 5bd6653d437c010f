//! `build`: from an ONNX file and sample data to a signed bundle.
//!
//! The steps, in order, each refusing early with a [`BuildError`] that names what is wrong:
//! check the options (name, semver, targets, quantization mode, tolerances, expiry), read the
//! signing key, check the output directory, read and load the model, load the golden inputs,
//! labels and calibration inputs against the model's input spec, evaluate, detect the task,
//! compute the baseline and reference latency, compress, sign, write to a temp file in the output
//! directory, fsync, read it back through the verifying reader, and only then rename it to the
//! output path.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, SubsecRound, Utc};
use engine::{EngineOptions, IoNames, Model, Tensor};
use protocol::bundle::{
    compress_payload, read_bundle_file, write_bundle, DiscardSink, VerifyOptions,
};
use protocol::keys::{KeyId, Keyring};
use protocol::manifest::{
    Baseline, HealthPolicy, LatencyBaseline, Manifest, ModelFormat, NarrowWeights, PayloadEntry,
    Quantization, Task, TelemetrySamples, TensorSpec, FORMAT_VERSION,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::baseline::{self, TaskKind};
use crate::error::BuildError;
use crate::golden;
use crate::half::HalfCompute;
use crate::keys::load_secret_key;
use crate::progress::Progress;
use crate::quality::Gate;
use crate::quantize::{Int8Form, QuantizeMode, RangeMethod, Selection};
use crate::{GOLDEN_FILE, MODEL_FILE, NARROW_WEIGHTS_FILE, NNEF_MODEL_FILE};

/// When the bundle stops being accepted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Expiry {
    /// At this instant (`--expires-at`).
    At(DateTime<Utc>),
    /// This long after the build (`--expires-in`).
    In(std::time::Duration),
}

/// Everything `bundler build` takes. [`BuildOptions::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub model: PathBuf,
    pub name: String,
    /// Semantic version, checked by `build`.
    pub version: String,
    pub security_version: u64,
    /// Secret key file (`NAME.key`).
    pub key: PathBuf,
    pub output: PathBuf,
    /// `.npy` with a batch of inputs for the model's single input. Without it, a few synthetic
    /// inputs make up the golden set and there is no accuracy.
    pub golden_inputs: Option<PathBuf>,
    /// `.npy` of integer labels, one per golden input: classes of a classifier, or anomaly
    /// labels (1 anomalous, 0 normal) of a model that reconstructs its input.
    pub golden_labels: Option<PathBuf>,
    /// `.npy` of inputs the baseline statistics are computed on instead of the golden inputs.
    pub calibration: Option<PathBuf>,
    pub targets: Vec<String>,
    pub expiry: Option<Expiry>,
    /// Quantization mode (`--quantize`). Default none.
    pub quantize: QuantizeMode,
    /// Nodes the quantization may touch (`--op-types`, `--exclude-node`).
    pub quantize_selection: Selection,
    /// How `int8` turns calibration activations into ranges. Default minmax.
    pub calibration_method: RangeMethod,
    /// How an `int8` model is written (`--int8-form`): QDQ or QOperator; `None` (the default)
    /// is QDQ. Given with another mode it is refused, whichever form it names.
    pub int8_form: Option<Int8Form>,
    /// The quantization quality gate (`--max-accuracy-drop`, `--min-snr-db`).
    pub quality_gate: Gate,
    /// Task override; `None` detects it.
    pub task: Option<TaskKind>,
    /// At most this many golden samples are stored (all of them are evaluated). Default 64.
    pub golden_max: usize,
    /// And no more than fit in this many bytes of golden payload (inputs and outputs,
    /// decompressed), but at least one sample. Default 1 MiB: one `mobilenetish` sample
    /// (3 × 224 × 224 floats), 64 of the digits models.
    pub golden_max_bytes: u64,
    /// Default 1e-4.
    pub golden_atol: f32,
    /// Default 1e-3.
    pub golden_rtol: f32,
    /// Default 10.
    pub zstd_level: i32,
    pub health_policy: HealthPolicy,
    /// What sampled-request telemetry may carry (`--telemetry-samples`). Default full.
    pub telemetry_samples: TelemetrySamples,
    /// Format of the model payload (`--model-format`). NNEF: the model as tract typed and
    /// decluttered it, which agents without the ONNX front end (device builds) load; its golden
    /// outputs, baseline and latency are the NNEF model's, checked against the ONNX model's
    /// outputs within the golden tolerance. `None` (the default): NNEF, except ONNX for a static
    /// `int8` model, which tract 0.23.9 cannot write as NNEF
    /// ([`BuildOptions::resolved_model_format`]); `int8-weights` and `f16` NNEF bundles carry
    /// their weights narrow ([`crate::narrow`]) and are as small as the ONNX ones.
    pub model_format: Option<ModelFormat>,
    /// Timed batch-1 runs for the reference latency. Default 30.
    pub latency_runs: usize,
    /// Draw progress bars on stderr. Default false (the CLI sets it when stdout is a terminal).
    pub progress: bool,
}

impl BuildOptions {
    pub fn new(
        model: impl Into<PathBuf>,
        name: impl Into<String>,
        version: impl Into<String>,
        security_version: u64,
        key: impl Into<PathBuf>,
        output: impl Into<PathBuf>,
    ) -> BuildOptions {
        BuildOptions {
            model: model.into(),
            name: name.into(),
            version: version.into(),
            security_version,
            key: key.into(),
            output: output.into(),
            golden_inputs: None,
            golden_labels: None,
            calibration: None,
            targets: Vec::new(),
            expiry: None,
            quantize: QuantizeMode::None,
            quantize_selection: Selection::default(),
            calibration_method: RangeMethod::default(),
            int8_form: None,
            quality_gate: Gate::default(),
            task: None,
            golden_max: 64,
            golden_max_bytes: 1 << 20,
            golden_atol: 1e-4,
            golden_rtol: 1e-3,
            zstd_level: 10,
            health_policy: HealthPolicy::default(),
            telemetry_samples: TelemetrySamples::Full,
            model_format: None,
            latency_runs: 30,
            progress: false,
        }
    }

    /// The model format the bundle gets: `model_format`, or by default NNEF, what device builds
    /// load, except ONNX for static `int8` (no NNEF writer for it in tract 0.23.9; see
    /// [`BuildOptions::model_format`]).
    pub fn resolved_model_format(&self) -> ModelFormat {
        self.model_format.unwrap_or(match self.quantize {
            QuantizeMode::Int8 => ModelFormat::Onnx,
            QuantizeMode::None | QuantizeMode::Int8Weights | QuantizeMode::F16 => ModelFormat::Nnef,
        })
    }
}

/// What `build` did (the `--json` output of `bundler build`).
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub output: PathBuf,
    pub name: String,
    pub version: String,
    pub security_version: u64,
    pub key_id: KeyId,
    /// sha256 of the bundle file: its identity.
    pub sha256: String,
    pub size: u64,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub task: Task,
    /// Samples evaluated (all golden inputs) and stored in the golden set.
    pub evaluated: usize,
    pub golden_count: usize,
    /// `golden inputs FILE` or `synthetic`.
    pub golden_source: String,
    pub baseline_source: String,
    pub accuracy: Option<f64>,
    pub latency: LatencyBaseline,
    /// The manifest's quantization record.
    pub quantization: Quantization,
    /// The absolute tolerance the golden samples needed at other batch sizes (at most
    /// `--golden-atol`, or the build fails).
    pub golden_atol_needed: f32,
    /// `f16` bundles: whether devices with native float16 may compute in it, and on which gate
    /// (the manifest's `golden.f16_compute`), or why not; `None` for other modes.
    pub half_compute: Option<HalfCompute>,
    /// The format of the model payload (see [`BuildOptions::resolved_model_format`]).
    pub model_format: ModelFormat,
    pub payloads: Vec<PayloadEntry>,
    pub timings: BuildTimings,
}

/// Wall-clock time of each build step, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BuildTimings {
    pub load_ms: f64,
    pub evaluate_ms: f64,
    /// Rewriting, loading, evaluating and gating the quantized model (0 without `--quantize`).
    pub quantize_ms: f64,
    /// Converting the model to NNEF, loading it back and re-evaluating the golden (and
    /// calibration) inputs on it (0 with `--model-format onnx`).
    pub convert_ms: f64,
    pub latency_ms: f64,
    pub compress_ms: f64,
    pub sign_write_ms: f64,
    pub total_ms: f64,
}

/// The file name of a sample file, as recorded in the manifest (build-machine paths stay out).
fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Refuses a model whose golden outputs differ at other batch sizes by more than the golden
/// tolerance: the device's self-test would fail on it, or pass by luck of its batch size.
/// (Seen: `mobilenetish` quantized to `int8` in tract 0.23.9, logits more than 1.0 apart between
/// a batch of 4 and single samples, until the engine ran integer graphs sample by sample.)
fn check_golden_tolerance(
    opts: &BuildOptions,
    repro: &golden::Reproducibility,
) -> Result<(), BuildError> {
    if repro.needed_atol <= opts.golden_atol {
        return Ok(());
    }
    let (output, sample, got, want) = repro.worst.clone().unwrap_or_default();
    Err(BuildError::GoldenUnstable {
        output,
        sample,
        got,
        want,
        atol: opts.golden_atol,
        rtol: opts.golden_rtol,
        needed_atol: repro.needed_atol,
    })
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Builds, signs and writes a bundle. On error nothing is left at `opts.output` (an existing file
/// there is left untouched).
pub fn build(opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    let mut timings = BuildTimings::default();
    let progress = Progress::new(opts.progress);

    // 1. Options, cheapest first.
    protocol::tar::check_entry_name(&opts.name).map_err(|reason| BuildError::Name {
        name: opts.name.clone(),
        reason,
    })?;
    let version = semver::Version::parse(&opts.version).map_err(|source| BuildError::Version {
        version: opts.version.clone(),
        source,
    })?;
    for t in &opts.targets {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) || t.len() > 100 {
            return Err(BuildError::Target(t.clone()));
        }
    }
    if opts.quantize == QuantizeMode::Int8 && opts.calibration.is_none() {
        return Err(BuildError::CalibrationNeeded);
    }
    if let Some(form) = opts
        .int8_form
        .filter(|_| opts.quantize != QuantizeMode::Int8)
    {
        return Err(BuildError::Int8FormWithoutInt8(form, opts.quantize));
    }
    let gate = opts.quality_gate;
    if !(gate.max_accuracy_drop.is_finite() && gate.max_accuracy_drop >= 0.0) {
        return Err(BuildError::Tolerance("--max-accuracy-drop"));
    }
    if !gate.min_snr_db.is_finite() {
        return Err(BuildError::Tolerance("--min-snr-db"));
    }
    if !(opts.golden_atol.is_finite() && opts.golden_atol >= 0.0) {
        return Err(BuildError::Tolerance("--golden-atol"));
    }
    if !(opts.golden_rtol.is_finite() && opts.golden_rtol >= 0.0) {
        return Err(BuildError::Tolerance("--golden-rtol"));
    }
    if opts.golden_max == 0 {
        return Err(BuildError::GoldenMax);
    }
    if opts.golden_labels.is_some() && opts.golden_inputs.is_none() {
        return Err(BuildError::LabelsWithoutInputs);
    }
    let created_at = Utc::now().trunc_subsecs(0);
    let expires_at = match opts.expiry {
        None => None,
        Some(Expiry::At(at)) => Some(at),
        Some(Expiry::In(d)) => {
            let d = chrono::Duration::from_std(d).map_err(|_| BuildError::ExpiryRange(d))?;
            Some(
                created_at
                    .checked_add_signed(d)
                    .ok_or(BuildError::ExpiryRange(d.to_std().unwrap_or_default()))?,
            )
        }
    };
    if let Some(at) = expires_at {
        if at <= Utc::now() {
            return Err(BuildError::ExpiryInPast {
                expires_at: at,
                now: created_at,
            });
        }
    }

    // 2. Key and output directory.
    let key = load_secret_key(&opts.key)?;
    let out_dir = match opts.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !out_dir.is_dir() {
        return Err(BuildError::OutputDir(out_dir));
    }

    // 3. Model.
    let t = Instant::now();
    let model_bytes = fs::read(&opts.model).map_err(|source| BuildError::ReadModel {
        path: opts.model.clone(),
        source,
    })?;
    let spinner = progress.spinner("loading model");
    let model = Model::load(&opts.model, &EngineOptions::default()).map_err(|source| {
        BuildError::Model {
            path: opts.model.clone(),
            source,
        }
    })?;
    spinner.finish_and_clear();
    timings.load_ms = ms(t);
    let input_specs = model.inputs().to_vec();
    let output_specs = model.outputs().to_vec();

    // 4. Sample data.
    let load_single = |path: &Path, what: &'static str| -> Result<Vec<Tensor>, BuildError> {
        if input_specs.len() != 1 {
            return Err(BuildError::MultiInput(input_specs.len()));
        }
        Ok(vec![golden::load_samples(path, what, &input_specs[0])?])
    };
    let batch_fixed = input_specs
        .first()
        .and_then(|s| s.shape.first().copied().flatten());
    let (golden_inputs, golden_source) = match &opts.golden_inputs {
        Some(path) => (
            load_single(path, "golden inputs")?,
            format!("golden inputs {}", file_name(path)),
        ),
        None => {
            let count = batch_fixed.unwrap_or(opts.golden_max.min(16));
            (
                golden::synthetic_inputs(&input_specs, count),
                "synthetic".to_string(),
            )
        }
    };
    let calibration = match &opts.calibration {
        Some(path) => Some(load_single(path, "calibration inputs")?),
        None => None,
    };
    let evaluated = golden_inputs.first().map(Tensor::rows).unwrap_or(0);
    let labels = match &opts.golden_labels {
        Some(path) => Some(golden::load_labels(path, evaluated)?),
        None => None,
    };
    let eval_batch = batch_fixed.unwrap_or(golden::EVAL_BATCH);
    for (what, path, tensors) in [
        ("golden inputs", &opts.golden_inputs, Some(&golden_inputs)),
        (
            "calibration inputs",
            &opts.calibration,
            calibration.as_ref(),
        ),
    ] {
        if let (Some(k), Some(ts)) = (batch_fixed, tensors) {
            let n = ts[0].rows();
            if !n.is_multiple_of(k) {
                return Err(BuildError::Samples {
                    what,
                    path: path.clone().unwrap_or_default(),
                    reason: format!(
                        "{n} samples is not a multiple of the model's fixed batch size {k}"
                    ),
                });
            }
        }
    }

    // 5. Evaluate.
    let t = Instant::now();
    let golden_outputs = golden::evaluate(
        &model,
        &golden_inputs,
        eval_batch,
        "golden inputs",
        &progress,
    )?;
    let calibration_outputs = match &calibration {
        Some(c) => Some(golden::evaluate(
            &model,
            c,
            eval_batch,
            "calibration inputs",
            &progress,
        )?),
        None => None,
    };
    timings.evaluate_ms = ms(t);

    // 6. Task, baseline, accuracy.
    let task = baseline::detect_task(
        &input_specs,
        &golden_inputs,
        &output_specs,
        &golden_outputs,
        labels.as_deref(),
        opts.task,
    )?;

    // 6b. Quantization: from here on the model, its golden outputs and the calibration
    // outputs are the quantized model's (what the device will run).
    let mut quantization = Quantization::None;
    let (model, model_bytes, golden_outputs, calibration_outputs) =
        if opts.quantize == QuantizeMode::None {
            (model, model_bytes, golden_outputs, calibration_outputs)
        } else {
            let t = Instant::now();
            let q = crate::quantize::step::quantize_and_gate(
                &crate::quantize::step::StepInputs {
                    float_bytes: &model_bytes,
                    mode: opts.quantize,
                    selection: &opts.quantize_selection,
                    method: opts.calibration_method,
                    form: opts.int8_form.unwrap_or_default(),
                    gate,
                    task: &task,
                    output_names: output_specs.iter().map(|s| s.name.clone()).collect(),
                    golden_inputs: &golden_inputs,
                    float_golden_outputs: &golden_outputs,
                    labels: labels.as_deref(),
                    calibration: calibration.as_deref().map(|c| {
                        let path = opts.calibration.as_deref().unwrap_or(Path::new(""));
                        (c, format!("calibration inputs {}", file_name(path)))
                    }),
                    eval_batch,
                },
                &progress,
            )?;
            let calibration_outputs = match &calibration {
                Some(c) => Some(golden::evaluate(
                    &q.model,
                    c,
                    eval_batch,
                    "calibration inputs (quantized model)",
                    &progress,
                )?),
                None => None,
            };
            quantization = q.record;
            timings.quantize_ms = ms(t);
            (q.model, q.bytes, q.golden_outputs, calibration_outputs)
        };
    // 6c. The model format: from here on the model and its outputs are the NNEF model's when
    // the bundle carries NNEF, so the golden outputs are computed by what the device loads.
    let t = Instant::now();
    let model_format = opts.resolved_model_format();
    let mut narrow_weights: Option<(Vec<u8>, NarrowWeights)> = None;
    // The NNEF archive a device loads, when it is not the model payload itself (narrow weights).
    let mut nnef_loaded: Option<Vec<u8>> = None;
    let (model, model_bytes, golden_outputs, calibration_outputs, model_file) = match model_format {
        ModelFormat::Onnx => (
            model,
            model_bytes,
            golden_outputs,
            calibration_outputs,
            MODEL_FILE,
        ),
        ModelFormat::Nnef => {
            let nnef = to_nnef(opts, &model_bytes)?;
            let nnef_model = nnef.model;
            narrow_weights = nnef.narrow;
            nnef_loaded = nnef.loaded;
            let (golden_outputs, calibration_outputs) = {
                let nnef_golden = golden::evaluate(
                    &nnef_model,
                    &golden_inputs,
                    eval_batch,
                    "golden inputs (NNEF model)",
                    &progress,
                )?;
                same_outputs(
                    &output_specs,
                    &nnef_golden,
                    &golden_outputs,
                    opts.golden_atol,
                    opts.golden_rtol,
                )?;
                let nnef_calibration = match &calibration {
                    Some(c) => Some(golden::evaluate(
                        &nnef_model,
                        c,
                        eval_batch,
                        "calibration inputs (NNEF model)",
                        &progress,
                    )?),
                    None => None,
                };
                (nnef_golden, nnef_calibration)
            };
            drop(model);
            (
                nnef_model,
                nnef.payload,
                golden_outputs,
                calibration_outputs,
                NNEF_MODEL_FILE,
            )
        }
    };
    if model_format == ModelFormat::Nnef {
        timings.convert_ms = ms(t);
    }
    let (base_inputs, base_outputs, base_source) = match (&calibration, &calibration_outputs) {
        (Some(i), Some(o)) => (
            i,
            o,
            format!(
                "calibration inputs {}",
                opts.calibration
                    .as_deref()
                    .unwrap_or(Path::new(""))
                    .display()
            ),
        ),
        _ => (&golden_inputs, &golden_outputs, golden_source.clone()),
    };
    let output_index = |name: &str| {
        output_specs
            .iter()
            .position(|s| s.name == name)
            .unwrap_or(0)
    };
    let (mut classification, mut regression, mut accuracy, mut auc) = (None, None, None, None);
    match &task {
        Task::Classification {
            output,
            scores,
            classes,
        } => {
            let ix = output_index(output);
            classification = Some(baseline::classification_baseline(
                &base_outputs[ix],
                *classes,
                *scores,
            ));
            if let (Some(labels), Some(path)) = (&labels, &opts.golden_labels) {
                if let Some((i, l)) = labels
                    .iter()
                    .enumerate()
                    .find(|(_, &l)| l < 0 || l >= *classes as i64)
                {
                    return Err(BuildError::Labels {
                        path: path.clone(),
                        reason: format!(
                            "label {l} of sample {i} is not a class of output '{output}' (0..{classes})"
                        ),
                    });
                }
                accuracy = Some(baseline::accuracy(&golden_outputs[ix], *classes, labels));
            }
        }
        Task::Regression { output, statistic } => {
            let ix = output_index(output);
            let stat =
                baseline::regression_statistic(&base_outputs[ix], &base_inputs[0], *statistic);
            regression = Some(baseline::regression_baseline(&stat));
            if let (Some(labels), Some(path)) = (&labels, &opts.golden_labels) {
                auc = Some(baseline::anomaly_auc(
                    &golden_outputs[ix],
                    &golden_inputs[0],
                    *statistic,
                    labels,
                    path,
                )?);
            }
        }
    }
    let t = Instant::now();
    let latency = baseline::latency(&model, &golden_inputs, opts.latency_runs)?;
    timings.latency_ms = ms(t);

    let mut inputs = input_specs.clone();
    for (i, spec) in inputs.iter_mut().enumerate() {
        let cal = calibration.as_ref().map(|c| &c[i]);
        spec.range = baseline::range_of(std::iter::once(&golden_inputs[i]).chain(cal));
    }
    let mut outputs = output_specs.clone();
    for (i, spec) in outputs.iter_mut().enumerate() {
        let cal = calibration_outputs.as_ref().map(|c| &c[i]);
        spec.range = baseline::range_of(std::iter::once(&golden_outputs[i]).chain(cal));
    }
    let baseline = Baseline {
        samples: base_inputs[0].rows(),
        source: base_source,
        inputs: input_specs
            .iter()
            .zip(base_inputs)
            .map(|(s, t)| baseline::input_baseline(&s.name, t))
            .collect(),
        classification,
        regression,
        accuracy,
        auc,
        latency: latency.clone(),
    };

    // 7. Golden set and compression.
    let mut golden_count = golden::stored_count(
        &golden_inputs
            .iter()
            .chain(&golden_outputs)
            .collect::<Vec<_>>(),
        evaluated,
        opts.golden_max,
        opts.golden_max_bytes,
    );
    if let Some(k) = batch_fixed {
        golden_count = (golden_count / k).max(1) * k;
    }
    // The device may run the golden samples at any batch size: check that other batchings (a
    // different plan from the batched evaluation) reproduce the stored outputs.
    let t = Instant::now();
    let repro = golden::reproducibility(
        &model,
        &golden_inputs,
        &golden_outputs,
        &output_specs,
        batch_fixed,
        golden_count,
        opts.golden_rtol,
    )?;
    check_golden_tolerance(opts, &repro)?;
    let (golden_bytes, mut golden) = golden::golden_payload(
        &input_specs,
        &golden_inputs,
        &output_specs,
        &golden_outputs,
        golden_count,
        opts.golden_atol,
        opts.golden_rtol,
    );
    // `f16` bundles: the offer to devices with native float16 (`crate::half`).
    let half_compute = (opts.quantize == QuantizeMode::F16).then(|| {
        let names = IoNames {
            inputs: input_specs.iter().map(|s| s.name.clone()).collect(),
            outputs: output_specs.iter().map(|s| s.name.clone()).collect(),
        };
        let rows = |ts: &[Tensor]| -> Vec<Tensor> {
            ts.iter().map(|t| t.slice_rows(0, golden_count)).collect()
        };
        crate::half::offer(
            nnef_loaded.as_deref().unwrap_or(&model_bytes),
            model_format,
            &names,
            &task,
            opts.quality_gate,
            &golden,
            (&rows(&golden_inputs), &rows(&golden_outputs)),
        )
    });
    golden.f16_compute = half_compute.as_ref().and_then(HalfCompute::offer);
    timings.evaluate_ms += ms(t);
    drop(model);

    let t = Instant::now();
    let mut payloads = Vec::new();
    let narrow_payload = narrow_weights
        .as_ref()
        .map(|(bytes, entry)| (entry.file.as_str(), bytes));
    for (name, bytes) in [(model_file, &model_bytes), (GOLDEN_FILE, &golden_bytes)]
        .into_iter()
        .chain(narrow_payload)
    {
        let bar = progress.bytes(bytes.len() as u64, &format!("compressing {name}"));
        let p = compress_payload(name, bytes, opts.zstd_level, |done, _| {
            bar.set_position(done)
        })
        .map_err(|source| BuildError::Write {
            path: opts.output.clone(),
            source,
        })?;
        bar.finish_and_clear();
        payloads.push(p);
    }
    timings.compress_ms = ms(t);

    // 8. Sign, write, check, rename.
    let t = Instant::now();
    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        name: opts.name.clone(),
        version,
        security_version: opts.security_version,
        created_at,
        expires_at,
        targets: opts.targets.clone(),
        model_file: model_file.into(),
        model_format,
        inputs,
        outputs,
        task: task.clone(),
        quantization: quantization.clone(),
        golden,
        baseline,
        health_policy: opts.health_policy.clone(),
        telemetry_samples: opts.telemetry_samples,
        narrow_weights: narrow_weights.map(|(_, entry)| entry),
        delta_base: None,
        payloads: vec![],
    };
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BuildError::Write { path, source }
    };
    let file_name = opts
        .output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".into());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(".tmp")
        .tempfile_in(&out_dir)
        .map_err(write_err(&out_dir))?;
    let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
    write_bundle(&mut w, &mut manifest, &payloads, &[&key]).map_err(|e| match e {
        protocol::bundle::BundleError::Io(source) => BuildError::Write {
            path: tmp.path().into(),
            source,
        },
        other => BuildError::Pack(other),
    })?;
    w.flush().map_err(write_err(tmp.path()))?;
    drop(w);
    tmp.as_file().sync_all().map_err(write_err(tmp.path()))?;
    let keyring = Keyring::new([key.public()]);
    let verified = read_bundle_file(tmp.path(), &VerifyOptions::new(&keyring), &mut DiscardSink)
        .map_err(BuildError::SelfCheck)?;
    tmp.persist(&opts.output).map_err(|e| BuildError::Write {
        path: opts.output.clone(),
        source: e.error,
    })?;
    // Make the rename itself durable.
    if let Ok(dir) = fs::File::open(&out_dir) {
        let _ = dir.sync_all();
    }
    timings.sign_write_ms = ms(t);
    timings.total_ms = ms(started);

    Ok(BuildReport {
        output: opts.output.clone(),
        name: manifest.name,
        version: manifest.version.to_string(),
        security_version: manifest.security_version,
        key_id: key.id(),
        sha256: verified.sha256,
        size: verified.size,
        created_at,
        expires_at,
        task,
        evaluated,
        golden_count,
        golden_source,
        baseline_source: manifest.baseline.source,
        accuracy,
        latency,
        quantization,
        golden_atol_needed: repro.needed_atol,
        half_compute,
        model_format,
        payloads: manifest.payloads,
        timings,
    })
}

/// An NNEF model as the bundle carries it and as a device loads it.
struct NnefModel {
    /// The archive loaded back through the engine's NNEF path, as a device loads it.
    model: Model,
    /// The model payload: the archive, or with narrow weights the archive without them.
    payload: Vec<u8>,
    /// The narrow-weights payload and its manifest entry.
    narrow: Option<(Vec<u8>, NarrowWeights)>,
    /// With narrow weights, the archive a device loads (rebuilt); without, that is `payload`.
    loaded: Option<Vec<u8>>,
}

/// The ONNX model in `onnx` (the float or quantized bytes the bundle would otherwise carry) as
/// an NNEF archive; for `int8-weights` and `f16` with its weights narrowed
/// ([`crate::narrow`]). The model is loaded from the archive exactly as a device rebuilds it
/// (`protocol::narrow_weights::expand`, the function the agent runs), with the ONNX names.
fn to_nnef(opts: &BuildOptions, onnx: &[u8]) -> Result<NnefModel, BuildError> {
    let (path, mode) = (opts.model.as_path(), opts.quantize);
    let convert_err = |source| BuildError::Convert {
        path: path.to_path_buf(),
        format_given: opts.model_format.is_some(),
        source,
    };
    let (archive, names) = engine::onnx_to_nnef(path, onnx).map_err(convert_err)?;
    let narrow_err = |reason: String| BuildError::Narrow {
        path: path.to_path_buf(),
        reason,
    };
    // With narrow weights: the archive as the device rebuilds it, checked against the
    // archive's size and sha256 (the manifest entry) by the function the agent runs.
    let narrowed = match crate::narrow::narrow_archive(&archive, mode).map_err(narrow_err)? {
        None => None,
        Some(n) => {
            let entry = NarrowWeights {
                file: NARROW_WEIGHTS_FILE.into(),
                tensors: n.tensors,
                values: n.values,
                model_size: archive.len() as u64,
                model_sha256: hex::encode(Sha256::digest(&archive)),
            };
            let expanded = protocol::narrow_weights::expand(&n.stripped, &n.payload, &entry)
                .map_err(|e| narrow_err(e.to_string()))?;
            Some((expanded, n.stripped, (n.payload, entry)))
        }
    };
    let loaded: &[u8] = narrowed
        .as_ref()
        .map_or(&archive, |(expanded, _, _)| expanded);
    let file = tempfile::Builder::new()
        .suffix(".nnef.tar")
        .tempfile()
        .map_err(|source| BuildError::Write {
            path: std::env::temp_dir(),
            source,
        })?;
    fs::write(file.path(), loaded).map_err(|source| BuildError::Write {
        path: file.path().to_path_buf(),
        source,
    })?;
    let model =
        Model::load_nnef(file.path(), &names, &EngineOptions::default()).map_err(convert_err)?;
    let (payload, narrow, loaded) = match narrowed {
        None => (archive, None, None),
        Some((expanded, stripped, narrow)) => (stripped, Some(narrow), Some(expanded)),
    };
    Ok(NnefModel {
        model,
        payload,
        narrow,
        loaded,
    })
}

/// Checks the NNEF model's outputs against the ONNX model's on the same inputs, with the golden
/// tolerance (they are bit-identical on every reference model; the tolerance is what a device
/// would accept anyway).
fn same_outputs(
    specs: &[TensorSpec],
    nnef: &[Tensor],
    onnx: &[Tensor],
    atol: f32,
    rtol: f32,
) -> Result<(), BuildError> {
    for ((spec, got), want) in specs.iter().zip(nnef).zip(onnx) {
        let (need, worst) = golden::needed_atol(want, got, rtol);
        let bad = worst.filter(|_| need > atol);
        if let Some((sample, got, want)) = bad {
            return Err(BuildError::ConvertMismatch {
                output: spec.name.clone(),
                sample,
                got,
                want,
                atol,
                rtol,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden::Reproducibility;

    fn repro(needed_atol: f32) -> Reproducibility {
        Reproducibility {
            needed_atol,
            worst: Some(("logits".into(), 1, "-4.611".into(), "-3.254".into())),
        }
    }

    #[test]
    fn golden_outputs_must_hold_at_every_batch_size() {
        let o = BuildOptions::new("m.onnx", "m", "1.0.0", 1, "k.key", "m.mfb");
        assert!(check_golden_tolerance(&o, &repro(0.0)).is_ok());
        assert!(check_golden_tolerance(&o, &repro(1e-4)).is_ok());
        let err = check_golden_tolerance(&o, &repro(1.35))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'logits' of sample 1 is -4.611 at another batch size, -3.254")
                && err.contains("needs atol 1.35"),
            "{err}"
        );
    }
}
