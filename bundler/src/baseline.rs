//! Baseline statistics: what the model's inputs and outputs looked like at build time, the
//! reference the device's health monitor compares live traffic against. Also task detection,
//! accuracy, the ROC AUC of anomaly labels and reference latency.

use std::path::Path;
use std::time::{Duration, Instant};

use engine::{Model, Tensor, TensorData};
use protocol::manifest::{
    ClassificationBaseline, InputBaseline, LatencyBaseline, OutputStatistic, RegressionBaseline,
    ScoreKind, Task, TensorSpec,
};
use protocol::quality::roc_auc;
use protocol::stats::{Histogram, Moments};

use crate::error::BuildError;

/// Bins of every baseline histogram.
pub const HISTOGRAM_BINS: usize = 20;

/// Which task to record; `None` in [`crate::BuildOptions::task`] means detect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Classification,
    Regression,
}

/// The elements of a tensor as `f64`.
pub(crate) fn values(t: &Tensor) -> Box<dyn Iterator<Item = f64> + '_> {
    match &t.data {
        TensorData::F32(v) => Box::new(v.iter().map(|&x| x as f64)),
        TensorData::I32(v) => Box::new(v.iter().map(|&x| x as f64)),
        TensorData::I64(v) => Box::new(v.iter().map(|&x| x as f64)),
        TensorData::U8(v) => Box::new(v.iter().map(|&x| x as f64)),
    }
}

/// A histogram over the observed `[min, max]`, its top edge nudged up so the maximum itself
/// falls in the last bin rather than the overflow bin.
fn histogram_of(m: &Moments, values: impl Iterator<Item = f64>) -> Histogram {
    let hi = if m.max > m.min {
        m.max + (m.max - m.min) * 1e-6
    } else {
        m.max
    };
    let mut h = Histogram::new(m.min, hi, HISTOGRAM_BINS);
    values.for_each(|v| h.add(v));
    h
}

fn moments(values: impl Iterator<Item = f64>) -> Moments {
    let mut m = Moments::default();
    values.filter(|v| v.is_finite()).for_each(|v| m.add(v));
    m
}

/// Moments and histogram of all elements of one input.
pub(crate) fn input_baseline(name: &str, t: &Tensor) -> InputBaseline {
    let m = moments(values(t));
    InputBaseline {
        name: name.into(),
        mean: m.mean,
        std: m.std(),
        min: m.min,
        max: m.max,
        histogram: histogram_of(&m, values(t)),
    }
}

/// Observed `[min, max]` over several tensors (finite values only).
pub(crate) fn range_of<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Option<[f32; 2]> {
    let mut m = Moments::default();
    for t in tensors {
        values(t).filter(|v| v.is_finite()).for_each(|v| m.add(v));
    }
    (m.n > 0).then_some([m.min as f32, m.max as f32])
}

/// Per-sample element count (everything after axis 0).
fn per_sample(t: &Tensor) -> usize {
    t.shape.iter().skip(1).product()
}

/// Do the rows of `t` (its last axis) look like probability distributions?
fn rows_are_probabilities(t: &Tensor) -> bool {
    let Some(v) = t.as_f32() else { return false };
    let classes = per_sample(t);
    if t.shape.len() != 2 || classes < 2 || v.is_empty() {
        return false;
    }
    v.chunks(classes).all(|row| {
        let sum: f64 = row.iter().map(|&x| x as f64).sum();
        row.iter().all(|&x| (-1e-6..=1.0 + 1e-6).contains(&x)) && (sum - 1.0).abs() <= 1e-3
    })
}

fn classification_fit(spec: &TensorSpec, t: &Tensor) -> Result<usize, String> {
    let classes = per_sample(t);
    if t.as_f32().is_none() {
        return Err(format!(
            "output '{}' has element type {}, class scores must be FP32",
            spec.name,
            t.dtype().oip_name()
        ));
    }
    if t.shape.len() != 2 || classes < 2 {
        return Err(format!(
            "output '{}' has shape {:?}; class scores need shape [batch, classes] with at least 2 classes",
            spec.name, t.shape
        ));
    }
    Ok(classes)
}

/// Decides what the model computes from its outputs on the sample inputs.
///
/// Classification when a rank-2 output's rows are probabilities, when an output's name contains
/// "logit", or when labels are given — unless they are all 0 or 1 and the model reconstructs
/// its input: those are anomaly labels; regression otherwise (reconstruction error when the
/// first output and the first input have the same number of elements per sample, else the
/// mean). `requested` (`--task`) overrides the detection.
pub(crate) fn detect_task(
    input_specs: &[TensorSpec],
    inputs: &[Tensor],
    output_specs: &[TensorSpec],
    outputs: &[Tensor],
    labels: Option<&[i64]>,
    requested: Option<TaskKind>,
) -> Result<Task, BuildError> {
    let pairs = || output_specs.iter().zip(outputs);
    let probabilities = pairs().find(|(_, t)| rows_are_probabilities(t));
    let logits = pairs().find(|(s, t)| {
        s.name.to_ascii_lowercase().contains("logit") && classification_fit(s, t).is_ok()
    });
    let classification = |spec: &TensorSpec, t: &Tensor, scores| -> Result<Task, String> {
        Ok(Task::Classification {
            output: spec.name.clone(),
            scores,
            classes: classification_fit(spec, t)?,
        })
    };
    let (spec, out) = (&output_specs[0], &outputs[0]);
    let reconstructs = inputs
        .first()
        .is_some_and(|i| per_sample(i) == per_sample(out) && input_specs.len() == inputs.len());
    // Labels of 0 and 1 given to a model that reconstructs its input and has no class scores
    // are anomaly labels (judged by the ROC AUC of the reconstruction error), not classes.
    let anomaly_labels =
        labels.is_some_and(|l| l.iter().all(|&v| v == 0 || v == 1)) && reconstructs;
    let want_classification = match requested {
        Some(TaskKind::Classification) => true,
        Some(TaskKind::Regression) => false,
        None => {
            probabilities.is_some() || logits.is_some() || (labels.is_some() && !anomaly_labels)
        }
    };
    if want_classification {
        let task = if let Some((s, t)) = probabilities {
            classification(s, t, ScoreKind::Probabilities)
        } else if let Some((s, t)) = logits {
            classification(s, t, ScoreKind::Logits)
        } else {
            // Labels given or classification requested, but nothing looks like scores: the
            // first output holds logits (unnormalised scores).
            classification(&output_specs[0], &outputs[0], ScoreKind::Logits)
        };
        return task.map_err(|reason| BuildError::Task {
            requested: "classification",
            reason,
        });
    }
    Ok(Task::Regression {
        output: spec.name.clone(),
        statistic: if reconstructs {
            OutputStatistic::ReconstructionError
        } else {
            OutputStatistic::Mean
        },
    })
}

/// Top-1 class and its confidence for each sample row of class scores.
fn top1(
    scores: &[f32],
    classes: usize,
    kind: ScoreKind,
) -> impl Iterator<Item = (usize, f64)> + '_ {
    scores.chunks(classes).map(move |row| {
        let (best, &max) = row
            .iter()
            .enumerate()
            .fold((0, &f32::NEG_INFINITY), |acc, (i, x)| {
                if *x > *acc.1 {
                    (i, x)
                } else {
                    acc
                }
            });
        let confidence = match kind {
            ScoreKind::Probabilities => max as f64,
            ScoreKind::Logits => {
                let denom: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
                1.0 / denom
            }
        };
        (best, confidence)
    })
}

pub(crate) fn classification_baseline(
    out: &Tensor,
    classes: usize,
    kind: ScoreKind,
) -> ClassificationBaseline {
    let scores = out.as_f32().unwrap_or(&[]);
    let mut counts = vec![0u64; classes];
    let mut confidence = Histogram::new(0.0, 1.0, HISTOGRAM_BINS);
    let mut m = Moments::default();
    for (class, c) in top1(scores, classes, kind) {
        counts[class] += 1;
        confidence.add(c);
        m.add(c);
    }
    let total = counts.iter().sum::<u64>().max(1) as f64;
    ClassificationBaseline {
        class_distribution: counts.iter().map(|&c| c as f64 / total).collect(),
        mean_confidence: m.mean,
        confidence,
    }
}

/// Fraction of samples whose top-1 class equals the label.
pub(crate) fn accuracy(out: &Tensor, classes: usize, labels: &[i64]) -> f64 {
    let scores = out.as_f32().unwrap_or(&[]);
    let hits = top1(scores, classes, ScoreKind::Probabilities)
        .zip(labels)
        .filter(|((class, _), &label)| *class as i64 == label)
        .count();
    hits as f64 / labels.len().max(1) as f64
}

/// The per-sample statistic of a regression output.
pub(crate) fn regression_statistic(
    out: &Tensor,
    first_input: &Tensor,
    statistic: OutputStatistic,
) -> Vec<f64> {
    let n = out.rows();
    let per = per_sample(out).max(1);
    let outs: Vec<f64> = values(out).collect();
    match statistic {
        OutputStatistic::Mean => outs
            .chunks(per)
            .map(|r| r.iter().sum::<f64>() / per as f64)
            .collect(),
        OutputStatistic::ReconstructionError => {
            let ins: Vec<f64> = values(first_input).collect();
            (0..n)
                .map(|i| {
                    let (o, x) = (&outs[i * per..(i + 1) * per], &ins[i * per..(i + 1) * per]);
                    o.iter().zip(x).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / per as f64
                })
                .collect()
        }
    }
}

/// ROC AUC of the per-sample reconstruction error of `out` against anomaly labels (1 anomalous,
/// 0 normal, one per sample); `None` when it cannot be computed (`protocol::quality::roc_auc`).
pub(crate) fn reconstruction_auc(
    out: &Tensor,
    first_input: &Tensor,
    labels: &[i64],
) -> Option<f64> {
    let errors = regression_statistic(out, first_input, OutputStatistic::ReconstructionError);
    roc_auc(&errors, labels)
}

/// [`reconstruction_auc`] for the bundle's baseline, or the error naming what is wrong with the
/// labels: how well a reconstruction model's error tells anomalous from normal samples.
pub(crate) fn anomaly_auc(
    out: &Tensor,
    first_input: &Tensor,
    statistic: OutputStatistic,
    labels: &[i64],
    path: &Path,
) -> Result<f64, BuildError> {
    let refuse = |reason: String| BuildError::Labels {
        path: path.to_path_buf(),
        reason,
    };
    if statistic != OutputStatistic::ReconstructionError {
        return Err(refuse(
            "labels need a classifier (class labels) or a model that reconstructs its input \
             (anomaly labels 0 and 1); this model's first output is neither"
                .into(),
        ));
    }
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l != 0 && l != 1) {
        return Err(refuse(format!(
            "label {l} of sample {i}: the labels of a reconstruction model are anomaly labels, \
             1 for anomalous and 0 for normal"
        )));
    }
    reconstruction_auc(out, first_input, labels).ok_or_else(|| {
        refuse(
            "the ROC AUC needs both normal (0) and anomalous (1) samples, and finite \
             reconstruction errors"
                .into(),
        )
    })
}

pub(crate) fn regression_baseline(stat: &[f64]) -> RegressionBaseline {
    let m = moments(stat.iter().copied());
    RegressionBaseline {
        mean: m.mean,
        std: m.std(),
        histogram: histogram_of(&m, stat.iter().copied()),
    }
}

/// Reference latency at batch 1 on the first sample: a few warm-up runs, then up to `runs` timed
/// runs (at least 5, stopping early after about 5 s).
pub(crate) fn latency(
    model: &Model,
    inputs: &[Tensor],
    runs: usize,
) -> Result<LatencyBaseline, BuildError> {
    let one: Vec<Tensor> = inputs.iter().map(|t| t.slice_rows(0, 1)).collect();
    let run = || {
        model.run(&one).map_err(|source| BuildError::Run {
            what: "latency sample",
            source,
        })
    };
    for _ in 0..2 {
        run()?;
    }
    let budget = Duration::from_secs(5);
    let started = Instant::now();
    let mut times = Vec::with_capacity(runs);
    while times.len() < runs.max(1) && (times.len() < 5 || started.elapsed() < budget) {
        let t = Instant::now();
        run()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((q * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1];
    Ok(LatencyBaseline {
        batch: 1,
        p50_us: pick(0.50),
        p95_us: pick(0.95),
        machine: machine_name(),
    })
}

/// A short description of this machine: CPU model and count, or the architecture.
pub fn machine_name() -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    });
    format!(
        "{} ({cpus} CPUs, {})",
        model.unwrap_or_else(|| "unknown CPU".into()),
        std::env::consts::ARCH
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::manifest::DType;

    fn spec(name: &str, dims: &[Option<usize>]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: DType::F32,
            shape: dims.to_vec(),
            range: None,
        }
    }

    fn t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_f32(shape.to_vec(), v.to_vec()).unwrap()
    }

    #[test]
    fn detects_probabilities_logits_and_regression() {
        let x = [spec("x", &[None, Some(2)])];
        let xin = [t(&[2, 2], &[0.0, 1.0, 2.0, 3.0])];
        let probs = t(&[2, 2], &[0.25, 0.75, 1.0, 0.0]);
        let task = detect_task(
            &x,
            &xin,
            &[spec("y", &[None, Some(2)])],
            &[probs],
            None,
            None,
        );
        assert!(matches!(
            task.unwrap(),
            Task::Classification {
                scores: ScoreKind::Probabilities,
                classes: 2,
                ..
            }
        ));
        let scores = t(&[2, 2], &[3.0, -1.0, 0.5, 0.5]);
        let o = [spec("Logits", &[None, Some(2)])];
        let task = detect_task(&x, &xin, &o, std::slice::from_ref(&scores), None, None);
        assert!(matches!(
            task.unwrap(),
            Task::Classification {
                scores: ScoreKind::Logits,
                ..
            }
        ));
        // Same numbers under another name: regression; same size as the input → reconstruction.
        let o = [spec("y", &[None, Some(2)])];
        let task = detect_task(&x, &xin, &o, std::slice::from_ref(&scores), None, None).unwrap();
        assert_eq!(
            task,
            Task::Regression {
                output: "y".into(),
                statistic: OutputStatistic::ReconstructionError
            }
        );
        let one = t(&[2, 1], &[3.0, 4.0]);
        let task = detect_task(
            &x,
            &xin,
            &[spec("y", &[None, Some(1)])],
            std::slice::from_ref(&one),
            None,
            None,
        );
        assert!(matches!(
            task.unwrap(),
            Task::Regression {
                statistic: OutputStatistic::Mean,
                ..
            }
        ));
        // Labels ask for classification, which a single column cannot be.
        let e = detect_task(
            &x,
            &xin,
            &[spec("y", &[None, Some(1)])],
            &[one],
            Some(&[0, 1]),
            None,
        );
        assert!(matches!(e, Err(BuildError::Task { .. })));
        // Labels of 0 and 1 for a model that reconstructs its input: anomaly labels, the task
        // stays a reconstruction; other labels for the same model are classes.
        let task = detect_task(
            &x,
            &xin,
            &o,
            std::slice::from_ref(&scores),
            Some(&[0, 1]),
            None,
        );
        assert!(matches!(
            task.unwrap(),
            Task::Regression {
                statistic: OutputStatistic::ReconstructionError,
                ..
            }
        ));
        let task = detect_task(
            &x,
            &xin,
            &o,
            std::slice::from_ref(&scores),
            Some(&[0, 2]),
            None,
        );
        assert!(matches!(task.unwrap(), Task::Classification { .. }));
    }

    #[test]
    fn confidence_uses_softmax_for_logits() {
        let scores = t(&[2, 2], &[0.0, 0.0, 10.0, 0.0]);
        let b = classification_baseline(&scores, 2, ScoreKind::Logits);
        assert_eq!(
            b.class_distribution,
            vec![1.0, 0.0],
            "ties go to the first class"
        );
        let expected = (0.5 + 1.0 / (1.0 + (-10f64).exp())) / 2.0;
        assert!((b.mean_confidence - expected).abs() < 1e-9);
        assert_eq!(b.confidence.total(), 2);
        assert_eq!(accuracy(&scores, 2, &[0, 1]), 0.5);
    }

    #[test]
    fn histograms_keep_the_maximum_inside() {
        let b = input_baseline("x", &t(&[4], &[0.0, 1.0, 2.0, 3.0]));
        assert_eq!((b.min, b.max, b.mean), (0.0, 3.0, 1.5));
        assert_eq!(b.histogram.counts[0], 0);
        assert_eq!(b.histogram.counts[HISTOGRAM_BINS + 1], 0);
        assert_eq!(b.histogram.total(), 4);
        let stat = regression_statistic(
            &t(&[2, 2], &[1.0, 1.0, 0.0, 0.0]),
            &t(&[2, 2], &[0.0, 0.0, 0.0, 2.0]),
            OutputStatistic::ReconstructionError,
        );
        assert_eq!(stat, vec![1.0, 2.0]);
    }
}
