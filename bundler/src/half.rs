//! Half-precision compute: the offer an `f16` bundle makes to devices with native float16.
//!
//! `--quantize f16` stores the weights as float16, and every device widens them back to float32
//! when it loads the model. A device whose CPU has native float16 arithmetic (ARMv8.2 FP16:
//! Cortex-A55, A75, A76 and later) can do better and compute in float16 too, at twice the
//! vector width. Its outputs then differ from the golden ones by more than the golden
//! tolerance, and by how much depends on its kernels: tract's native float16 matrix products
//! sum in float16, while on a build machine without native float16 tract sums in float32 and
//! rounds only the results (measured under qemu: `digits_mlp`'s golden outputs 0.007 apart on
//! the ARM kernels, 0.00017 here). A tolerance measured here would refuse what the device does,
//! so the offer is not a tolerance but a quality gate: the one the bundler applies to quantized
//! models ([`crate::quality`]), written into `golden.f16_compute`
//! ([`protocol::manifest::F16Compute`]) for the device to apply to its own float16 outputs
//! against the golden ones — top-1 agreement at least `1 - max_accuracy_drop / 100` for
//! classification, SNR at least `--min-snr-db` for regression.
//!
//! The bundler also runs that judgement here first, on tract's portable float16 path: a model
//! whose half-precision outputs overflow (an infinity or a NaN), fail the gate already here or
//! do not load in float16 gets no offer, with the reason in the build report, and its devices
//! compute in float32. So does a classifier whose bundle stores fewer than
//! [`MIN_AGREEMENT_SAMPLES`] golden samples: too few for an agreement to mean anything.

use engine::{EngineOptions, IoNames, Model, ModelFormat, Precision, Tensor};
use protocol::manifest::{F16Compute, Golden, Task};

use crate::quality::Gate;

/// What the bundle offers devices with native float16.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "offer", rename_all = "snake_case")]
pub enum HalfCompute {
    /// Devices with native float16 may compute in it, when their outputs pass `gate`.
    Offered {
        gate: F16Compute,
        /// The figures of the judgement on this machine's float16 path.
        here: String,
    },
    /// Devices compute this bundle in float32; why.
    NotOffered { reason: String },
}

impl HalfCompute {
    /// The manifest's `golden.f16_compute`.
    pub fn offer(&self) -> Option<F16Compute> {
        match self {
            HalfCompute::Offered { gate, .. } => Some(*gate),
            HalfCompute::NotOffered { .. } => None,
        }
    }
}

/// Fewest stored golden samples a classifier's offer is judged on: top-1 agreement over fewer
/// says little (one sample agrees or not).
pub const MIN_AGREEMENT_SAMPLES: usize = 16;

/// The gate of the quantization quality gate, as the device applies it to float16 outputs.
pub(crate) fn device_gate(task: &Task, gate: Gate) -> F16Compute {
    match task {
        Task::Classification { .. } => F16Compute {
            min_top1_agreement: Some(1.0 - gate.max_accuracy_drop / 100.0),
            min_snr_db: None,
        },
        Task::Regression { .. } => F16Compute {
            min_top1_agreement: None,
            min_snr_db: Some(gate.min_snr_db),
        },
    }
}

/// The offer for the model a device loads (`bytes` in `format`; `names` for NNEF), judged here
/// on the golden set `golden` (its inputs and outputs as tensors) as a device will judge it.
pub(crate) fn offer(
    bytes: &[u8],
    format: ModelFormat,
    names: &IoNames,
    task: &Task,
    gate: Gate,
    golden: &Golden,
    (inputs, expected): (&[Tensor], &[Tensor]),
) -> HalfCompute {
    let not_offered = |reason: String| HalfCompute::NotOffered { reason };
    let model = match load(bytes, format, names) {
        Ok(m) => m,
        Err(reason) => return not_offered(reason),
    };
    let got = match model.run(inputs) {
        Ok(o) => o,
        Err(e) => return not_offered(format!("running the golden inputs in float16: {e}")),
    };
    let (want, have) = (Tensor::f32_slices(&expected), Tensor::f32_slices(&got));
    let device_gate = device_gate(task, gate);
    match device_gate.judge(task, golden, &want, &have) {
        Ok(_)
            if matches!(task, Task::Classification { .. })
                && golden.count < MIN_AGREEMENT_SAMPLES =>
        {
            not_offered(format!(
                "a device would judge top-1 agreement on {} stored golden sample(s), too few \
                 to tell; the offer needs at least {MIN_AGREEMENT_SAMPLES} (--golden-max, \
                 --golden-max-bytes)",
                golden.count
            ))
        }
        Ok(here) => HalfCompute::Offered {
            gate: device_gate,
            here,
        },
        Err(reason) => not_offered(format!("in float16 on this machine already, {reason}")),
    }
}

fn load(bytes: &[u8], format: ModelFormat, names: &IoNames) -> Result<Model, String> {
    let suffix = match format {
        ModelFormat::Onnx => ".onnx",
        ModelFormat::Nnef => ".nnef.tar",
    };
    let file = tempfile::Builder::new()
        .suffix(suffix)
        .tempfile()
        .and_then(|f| std::fs::write(f.path(), bytes).map(|()| f))
        .map_err(|e| format!("writing the model to a temporary file: {e}"))?;
    let opts = EngineOptions {
        precision: Precision::F16,
        ..EngineOptions::default()
    };
    Model::load_as(file.path(), format, names, &opts)
        .map_err(|e| format!("loading the model in float16: {e}"))
}
