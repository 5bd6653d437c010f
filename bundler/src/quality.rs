//! The quantization quality gate: the quantized model against the float model on the golden
//! inputs, and the decision whether the bundle may be written.
//!
//! Figures (recorded in the manifest whether or not the gate passes): SNR of the task output
//! in dB, the largest absolute difference, for classification the top-1 agreement with the
//! float model and, with labels, both accuracies — or, for a model that reconstructs its input
//! given anomaly labels, both ROC AUCs of its reconstruction error. The gate refuses when the
//! accuracy (or the AUC, × 100) drops by more than `max_accuracy_drop` points — against the
//! labels when given, else against the float model's own top-1 classes — and, for models
//! without a class output (regression), when the SNR is below `min_snr_db`. Any non-finite
//! output fails.

use engine::Tensor;
use protocol::manifest::{OutputStatistic, QuantizationQuality, Task};
use protocol::quality::{snr_db, top1_agreement};

use crate::baseline;

/// Thresholds of the gate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gate {
    /// Percentage points (`--max-accuracy-drop`, default 1).
    pub max_accuracy_drop: f64,
    /// dB, for models without a class output (`--min-snr-db`, default 20).
    pub min_snr_db: f64,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            max_accuracy_drop: 1.0,
            min_snr_db: 20.0,
        }
    }
}

/// The figures of the quantized outputs against the float outputs of the task's output, both
/// computed from `inputs`, which `labels` label.
pub(crate) fn compare(
    task: &Task,
    output_names: &[String],
    inputs: &[Tensor],
    float_outputs: &[Tensor],
    quantized_outputs: &[Tensor],
    labels: Option<&[i64]>,
    gate: Gate,
) -> QuantizationQuality {
    let output = match task {
        Task::Classification { output, .. } | Task::Regression { output, .. } => output.clone(),
    };
    let ix = output_names.iter().position(|n| *n == output).unwrap_or(0);
    let reference = float_outputs[ix].as_f32().unwrap_or(&[]);
    let got = quantized_outputs[ix].as_f32().unwrap_or(&[]);
    let max_abs_diff = reference
        .iter()
        .zip(got)
        .map(|(&r, &g)| f64::from((r - g).abs()))
        .fold(0f64, |a, d| {
            if d.is_nan() || a.is_nan() {
                f64::NAN
            } else {
                a.max(d)
            }
        });
    let mut q = QuantizationQuality {
        samples: float_outputs[ix].shape.first().copied().unwrap_or(0),
        output,
        snr_db: snr_db(reference, got),
        max_abs_diff,
        argmax_agreement: None,
        float_accuracy: None,
        accuracy: None,
        float_auc: None,
        auc: None,
        accuracy_drop: None,
        max_accuracy_drop: gate.max_accuracy_drop,
        min_snr_db: None,
    };
    match task {
        Task::Classification { classes, .. } => {
            let agreement = top1_agreement(reference, got, *classes);
            q.argmax_agreement = Some(agreement);
            q.accuracy_drop = Some(100.0 * (1.0 - agreement));
            if let Some(labels) = labels {
                let fa = baseline::accuracy(&float_outputs[ix], *classes, labels);
                let qa = baseline::accuracy(&quantized_outputs[ix], *classes, labels);
                q.float_accuracy = Some(fa);
                q.accuracy = Some(qa);
                q.accuracy_drop = Some(100.0 * (fa - qa));
            }
        }
        Task::Regression { statistic, .. } => {
            q.min_snr_db = Some(gate.min_snr_db);
            let anomaly_auc =
                |outputs: &Tensor| baseline::reconstruction_auc(outputs, inputs.first()?, labels?);
            if *statistic == OutputStatistic::ReconstructionError {
                if let (Some(fa), Some(qa)) = (
                    anomaly_auc(&float_outputs[ix]),
                    anomaly_auc(&quantized_outputs[ix]),
                ) {
                    q.float_auc = Some(fa);
                    q.auc = Some(qa);
                    q.accuracy_drop = Some(100.0 * (fa - qa));
                }
            }
        }
    }
    q
}

/// `Err(reason)` when the gate refuses the quantized model.
pub fn check(q: &QuantizationQuality) -> Result<(), String> {
    let finite = q.max_abs_diff.is_finite() && q.snr_db.is_none_or(f64::is_finite);
    if !finite {
        return Err("the quantized model gives non-finite outputs".into());
    }
    if let Some(drop) = q.accuracy_drop {
        if drop > q.max_accuracy_drop + 1e-9 {
            let against = match (q.float_accuracy, q.accuracy, q.float_auc, q.auc) {
                (Some(f), Some(a), ..) => format!("accuracy {a:.4} vs float {f:.4}"),
                (.., Some(f), Some(a)) => format!("ROC AUC {a:.4} vs float {f:.4}"),
                _ => format!(
                    "top-1 agreement with the float model {:.4} (no labels)",
                    q.argmax_agreement.unwrap_or(0.0)
                ),
            };
            return Err(format!(
                "{against}: a drop of {drop:.2} points > --max-accuracy-drop {}",
                q.max_accuracy_drop
            ));
        }
    }
    if let (Some(min), Some(snr)) = (q.min_snr_db, q.snr_db) {
        if snr < min {
            return Err(format!("SNR {snr:.1} dB < --min-snr-db {min}"));
        }
    }
    Ok(())
}

/// One line of figures, for messages and `inspect`.
pub fn summary(q: &QuantizationQuality) -> String {
    let mut s = match q.snr_db {
        Some(snr) => format!("SNR {snr:.1} dB"),
        None => "identical outputs".into(),
    };
    s += &format!(", max |diff| {:.3e}", q.max_abs_diff);
    if let Some(a) = q.argmax_agreement {
        s += &format!(", top-1 agreement {a:.4}");
    }
    if let (Some(f), Some(a)) = (q.float_accuracy, q.accuracy) {
        s += &format!(", accuracy {a:.4} (float {f:.4})");
    }
    if let (Some(f), Some(a)) = (q.float_auc, q.auc) {
        s += &format!(", ROC AUC {a:.4} (float {f:.4})");
    }
    if let Some(d) = q.accuracy_drop {
        s += &format!(", drop {d:.2} points (max {})", q.max_accuracy_drop);
    }
    if let Some(m) = q.min_snr_db {
        s += &format!(", min SNR {m} dB");
    }
    s + &format!(", on {} golden samples", q.samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::manifest::ScoreKind;

    fn t(rows: usize, v: Vec<f32>) -> Tensor {
        let cols = v.len() / rows;
        Tensor::from_f32(vec![rows, cols], v).unwrap()
    }

    #[test]
    fn gate_refuses_an_accuracy_drop_beyond_the_limit() {
        let task = Task::Classification {
            output: "p".into(),
            scores: ScoreKind::Probabilities,
            classes: 2,
        };
        let names = vec!["p".to_string()];
        let float = [t(4, vec![0.9, 0.1, 0.2, 0.8, 0.7, 0.3, 0.4, 0.6])];
        let worse = [t(4, vec![0.9, 0.1, 0.6, 0.4, 0.7, 0.3, 0.4, 0.6])];
        let labels = [0, 1, 0, 1];
        let q = compare(
            &task,
            &names,
            &[],
            &float,
            &worse,
            Some(&labels),
            Gate::default(),
        );
        assert_eq!(q.float_accuracy, Some(1.0));
        assert_eq!(q.accuracy, Some(0.75));
        assert_eq!(q.argmax_agreement, Some(0.75));
        let err = check(&q).unwrap_err();
        assert!(
            err.contains("drop of 25.00 points > --max-accuracy-drop 1"),
            "{err}"
        );
        let lenient = Gate {
            max_accuracy_drop: 30.0,
            ..Gate::default()
        };
        assert!(check(&compare(
            &task,
            &names,
            &[],
            &float,
            &worse,
            Some(&labels),
            lenient
        ))
        .is_ok());
        let same = compare(&task, &names, &[], &float, &float, None, Gate::default());
        assert_eq!((same.snr_db, same.accuracy_drop), (None, Some(0.0)));
        assert!(check(&same).is_ok());
    }

    #[test]
    fn gate_refuses_low_snr_and_nan_for_regression() {
        let task = Task::Regression {
            output: "y".into(),
            statistic: protocol::manifest::OutputStatistic::Mean,
        };
        let names = vec!["y".to_string()];
        let float = [t(1, vec![1.0, -1.0, 2.0, 0.5])];
        let close = [t(1, vec![1.001, -1.0, 2.0, 0.5])];
        let far = [t(1, vec![1.5, -0.5, 2.0, 0.5])];
        let nan = [t(1, vec![f32::NAN, -1.0, 2.0, 0.5])];
        assert!(check(&compare(
            &task,
            &names,
            &[],
            &float,
            &close,
            None,
            Gate::default()
        ))
        .is_ok());
        let err = check(&compare(
            &task,
            &names,
            &[],
            &float,
            &far,
            None,
            Gate::default(),
        ))
        .unwrap_err();
        assert!(err.contains("< --min-snr-db 20"), "{err}");
        let err = check(&compare(
            &task,
            &names,
            &[],
            &float,
            &nan,
            None,
            Gate::default(),
        ))
        .unwrap_err();
        assert!(err.contains("non-finite"), "{err}");
    }

    #[test]
    fn gate_judges_a_reconstruction_model_by_the_auc_of_its_anomaly_labels() {
        let task = Task::Regression {
            output: "y".into(),
            statistic: OutputStatistic::ReconstructionError,
        };
        let names = vec!["y".to_string()];
        let inputs = [t(4, vec![1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0])];
        let labels = [0, 0, 1, 1];
        // The float model reconstructs the normal samples exactly and the anomalous ones badly
        // (errors 0, 0, 4, 4: AUC 1); the quantized one mixes them up (errors 4, 0, 0, 4).
        let float = [t(4, vec![1.0; 8])];
        let worse = [t(4, vec![3.0, 3.0, 1.0, 1.0, 3.0, 3.0, 1.0, 1.0])];
        let q = compare(
            &task,
            &names,
            &inputs,
            &float,
            &worse,
            Some(&labels),
            Gate::default(),
        );
        assert_eq!((q.float_auc, q.auc), (Some(1.0), Some(0.5)));
        assert_eq!(q.accuracy_drop, Some(50.0));
        let err = check(&q).unwrap_err();
        assert!(
            err.contains("ROC AUC 0.5000 vs float 1.0000: a drop of 50.00 points"),
            "{err}"
        );
        let same = compare(
            &task,
            &names,
            &inputs,
            &float,
            &float,
            Some(&labels),
            Gate::default(),
        );
        assert_eq!((same.auc, same.accuracy_drop), (Some(1.0), Some(0.0)));
        assert!(check(&same).is_ok());
        // Without labels there is no AUC, only the SNR gate.
        let unlabelled = compare(
            &task,
            &names,
            &inputs,
            &float,
            &float,
            None,
            Gate::default(),
        );
        assert_eq!((unlabelled.auc, unlabelled.accuracy_drop), (None, None));
    }
}
