//! `inspect`: what a bundle says about itself, read without verifying anything.
//!
//! Inspecting needs no keyring: it reads the manifest and the signature list and hashes the
//! file. Nothing it prints is trustworthy until `verify` has passed.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use protocol::bundle::{read_head, BundleError, Limits};
use protocol::keys::KeyId;
use protocol::manifest::{
    Baseline, F16Compute, GoldenTensor, HealthPolicy, Manifest, ModelFormat, NarrowWeights,
    PayloadEntry, Quantization, Task, TelemetrySamples, TensorSpec,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Dims, InspectError};

/// The `--json` output of `bundler inspect`; see `docs/bundle-format.md` for every field.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub file: PathBuf,
    /// Size of the bundle file in bytes.
    pub size: u64,
    /// sha256 of the bundle file.
    pub sha256: String,
    pub format_version: u32,
    pub name: String,
    pub version: String,
    pub security_version: u64,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// `expires_at` is in the past (judged now, without slack).
    pub expired: bool,
    pub targets: Vec<String>,
    /// Key ids listed in `manifest.sig` (not verified: use `verify`).
    pub key_ids: Vec<KeyId>,
    pub model_file: String,
    /// Format of `model_file` (`onnx` when the manifest leaves it out).
    pub model_format: ModelFormat,
    pub payloads: Vec<PayloadEntry>,
    /// Sum of the decompressed payload sizes.
    pub payload_bytes: u64,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub task: Task,
    pub quantization: Quantization,
    pub golden: GoldenSummary,
    /// Copy of `baseline.accuracy`.
    pub accuracy: Option<f64>,
    pub baseline: Baseline,
    pub health_policy: HealthPolicy,
    /// What sampled-request telemetry may carry (`full` when the manifest leaves it out).
    pub telemetry_samples: TelemetrySamples,
    /// The manifest's `narrow_weights` (NNEF `int8-weights` / `f16` bundles), or null.
    pub narrow_weights: Option<NarrowWeights>,
    pub delta_base: Option<String>,
}

/// The golden set as the manifest describes it.
#[derive(Debug, Clone, Serialize)]
pub struct GoldenSummary {
    pub file: String,
    pub count: usize,
    pub inputs: Vec<GoldenTensor>,
    pub outputs: Vec<GoldenTensor>,
    pub atol: f32,
    pub rtol: f32,
    /// The gate offered to devices computing in float16 (`f16` bundles).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f16_compute: Option<F16Compute>,
}

/// Reads the manifest and signature list of the bundle at `path`.
pub fn inspect(path: &Path) -> Result<InspectReport, InspectError> {
    let err = |source: BundleError| InspectError {
        path: path.into(),
        source,
    };
    let file = File::open(path).map_err(|e| err(e.into()))?;
    let mut reader = HashAll {
        inner: BufReader::with_capacity(1 << 16, file),
        hasher: Sha256::new(),
        count: 0,
    };
    let head = read_head(&mut reader, &Limits::default()).map_err(err)?;
    let manifest: Manifest = head.manifest().map_err(err)?;
    io::copy(&mut reader, &mut io::sink()).map_err(|e| err(e.into()))?;
    let m = manifest;
    Ok(InspectReport {
        file: path.into(),
        size: reader.count,
        sha256: hex::encode(reader.hasher.finalize()),
        format_version: m.format_version,
        expired: m.expires_at.is_some_and(|at| at < Utc::now()),
        name: m.name,
        version: m.version.to_string(),
        security_version: m.security_version,
        created_at: m.created_at,
        expires_at: m.expires_at,
        targets: m.targets,
        key_ids: head.signatures.iter().map(|s| s.key_id).collect(),
        model_file: m.model_file,
        model_format: m.model_format,
        payload_bytes: m.payloads.iter().map(|p| p.size).sum(),
        payloads: m.payloads,
        inputs: m.inputs,
        outputs: m.outputs,
        task: m.task,
        quantization: m.quantization,
        golden: GoldenSummary {
            file: m.golden.file,
            count: m.golden.count,
            inputs: m.golden.inputs,
            outputs: m.golden.outputs,
            atol: m.golden.atol,
            rtol: m.golden.rtol,
            f16_compute: m.golden.f16_compute,
        },
        accuracy: m.baseline.accuracy,
        baseline: m.baseline,
        health_policy: m.health_policy,
        telemetry_samples: m.telemetry_samples,
        narrow_weights: m.narrow_weights,
        delta_base: m.delta_base,
    })
}

struct HashAll<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for HashAll<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

impl InspectReport {
    /// The human-readable form `bundler inspect` prints.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let ids: Vec<String> = self.key_ids.iter().map(|k| k.to_string()).collect();
        let _ = writeln!(s, "bundle           {}", self.file.display());
        let _ = writeln!(s, "name             {} {}", self.name, self.version);
        let _ = writeln!(s, "security version {}", self.security_version);
        let _ = writeln!(s, "format version   {}", self.format_version);
        let _ = writeln!(
            s,
            "signed by        {} (unverified; run `bundler verify`)",
            ids.join(", ")
        );
        let _ = writeln!(
            s,
            "size             {} bytes, sha256 {}",
            self.size, self.sha256
        );
        let _ = writeln!(s, "created          {}", self.created_at.to_rfc3339());
        let expiry = match self.expires_at {
            None => "never".to_string(),
            Some(at) if self.expired => format!("{} (EXPIRED)", at.to_rfc3339()),
            Some(at) => at.to_rfc3339(),
        };
        let _ = writeln!(s, "expires          {expiry}");
        let targets = if self.targets.is_empty() {
            "any".to_string()
        } else {
            self.targets.join(", ")
        };
        let _ = writeln!(s, "targets          {targets}");
        let samples = match self.telemetry_samples {
            TelemetrySamples::Full => "full (sampled requests carry input and output values)",
            TelemetrySamples::Hashed => {
                "hashed (sampled requests carry a sha256 per tensor, no values)"
            }
            TelemetrySamples::None => "none (no sampled requests; aggregate figures only)",
        };
        let _ = writeln!(s, "telemetry        {samples}");
        let _ = writeln!(
            s,
            "model            {} ({})",
            self.model_file,
            match self.model_format {
                ModelFormat::Onnx => "ONNX: agents built with the `onnx` feature only",
                ModelFormat::Nnef => "NNEF: device and default builds of the agent",
            }
        );
        if let Some(n) = &self.narrow_weights {
            let _ = writeln!(
                s,
                "narrow weights   {}: {} tensors ({} values) put back at install into {} bytes, \
                 sha256 {}",
                n.file, n.tensors, n.values, n.model_size, n.model_sha256
            );
        }
        let _ = writeln!(s, "quantization     {}", self.quantization.mode());
        if let Some(r) = self.quantization.record() {
            let _ = writeln!(
                s,
                "  {} tensors ({} parameters) of {}{}; float model {} bytes, sha256 {}",
                r.tensors,
                r.parameters,
                r.op_types.join(", "),
                if r.excluded_nodes.is_empty() {
                    String::new()
                } else {
                    format!(" except nodes {}", r.excluded_nodes.join(", "))
                },
                r.float_model_size,
                r.float_model_sha256
            );
            if let Some(c) = &r.calibration {
                let _ = writeln!(
                    s,
                    "  calibration: {}{} on {} samples ({}), {} activations, form {}",
                    c.method,
                    c.percentile.map(|p| format!(" {p}")).unwrap_or_default(),
                    c.samples,
                    c.source,
                    c.activations,
                    r.form.as_deref().unwrap_or("-")
                );
            }
            let _ = writeln!(s, "  quality gate: {}", crate::quality::summary(&r.quality));
        }
        let _ = writeln!(s, "payloads");
        for p in &self.payloads {
            let _ = writeln!(
                s,
                "  {:<20} {:>10} bytes ({:>10} compressed)  sha256 {}",
                p.file, p.size, p.compressed_size, p.sha256
            );
        }
        let spec = |s: &mut String, kind: &str, t: &TensorSpec| {
            let range = t
                .range
                .map(|[lo, hi]| format!("  range [{lo:.4}, {hi:.4}]"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "  {kind:<6} {:<16} {} {}{range}",
                t.name,
                t.dtype.oip_name(),
                Dims(&t.shape)
            );
        };
        let _ = writeln!(s, "schema");
        self.inputs.iter().for_each(|t| spec(&mut s, "input", t));
        self.outputs.iter().for_each(|t| spec(&mut s, "output", t));
        let task = match &self.task {
            Task::Classification {
                output,
                scores,
                classes,
            } => {
                format!("classification of '{output}' ({classes} classes, {scores:?})")
            }
            Task::Regression { output, statistic } => {
                format!("regression of '{output}' (statistic {statistic:?})")
            }
        };
        let _ = writeln!(s, "task             {task}");
        let _ = writeln!(
            s,
            "golden           {} samples in {}, tolerance |y-g| <= {} + {}*|g|",
            self.golden.count, self.golden.file, self.golden.atol, self.golden.rtol
        );
        if let Some(h) = &self.golden.f16_compute {
            let gate = match (h.min_top1_agreement, h.min_snr_db) {
                (Some(a), _) => format!("top-1 agreement with the golden outputs >= {a}"),
                (None, Some(snr)) => format!("SNR against the golden outputs >= {snr} dB"),
                (None, None) => "finite outputs".to_string(),
            };
            let _ = writeln!(
                s,
                "f16 compute      offered to devices with native float16, if {gate}"
            );
        }
        let b = &self.baseline;
        let _ = writeln!(
            s,
            "baseline         {} samples from {}",
            b.samples, b.source
        );
        for i in &b.inputs {
            let _ = writeln!(
                s,
                "  input {:<12} mean {:.4} std {:.4} min {:.4} max {:.4}",
                i.name, i.mean, i.std, i.min, i.max
            );
        }
        if let Some(c) = &b.classification {
            let dist: Vec<String> = c
                .class_distribution
                .iter()
                .map(|f| format!("{f:.3}"))
                .collect();
            let _ = writeln!(s, "  mean top-1 confidence {:.4}", c.mean_confidence);
            let _ = writeln!(s, "  class distribution [{}]", dist.join(", "));
        }
        if let Some(r) = &b.regression {
            let _ = writeln!(s, "  output statistic mean {:.6} std {:.6}", r.mean, r.std);
        }
        if let Some(a) = b.accuracy {
            let _ = writeln!(s, "  accuracy {a:.4}");
        }
        if let Some(a) = b.auc {
            let _ = writeln!(
                s,
                "  ROC AUC of the reconstruction error {a:.4} (anomaly labels)"
            );
        }
        let _ = writeln!(
            s,
            "  latency batch {}: p50 {:.0} us, p95 {:.0} us on {}",
            b.latency.batch, b.latency.p50_us, b.latency.p95_us, b.latency.machine
        );
        s
    }
}
