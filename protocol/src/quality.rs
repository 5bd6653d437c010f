//! Figures that compare a model's outputs with reference outputs of the same inputs: the
//! bundler's quantization gate (quantized against float model) and the agent's judgement of
//! half-precision compute (`manifest::F16Compute`: the device's float16 outputs against the
//! golden ones) use the same ones. And one figure of a model against labels that is not a
//! plain accuracy: the ROC AUC of an anomaly score ([`roc_auc`]), how an autoencoder's
//! reconstruction error is judged against anomaly labels.

/// Signal-to-noise ratio of `got` against `reference` in dB; `None` when identical, NaN when
/// `got` holds a non-finite value.
pub fn snr_db(reference: &[f32], got: &[f32]) -> Option<f64> {
    let (mut signal, mut noise) = (0f64, 0f64);
    for (&r, &g) in reference.iter().zip(got) {
        signal += f64::from(r) * f64::from(r);
        noise += (f64::from(r) - f64::from(g)).powi(2);
    }
    if noise.is_nan() {
        return Some(f64::NAN);
    }
    (noise > 0.0).then(|| 10.0 * (signal / noise).log10())
}

/// The top-1 class of each row of `classes` scores (the first of equal scores).
fn argmax_rows(scores: &[f32], classes: usize) -> Vec<usize> {
    scores
        .chunks(classes.max(1))
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0
        })
        .collect()
}

/// Fraction of rows whose top-1 class in `got` is the one in `reference`.
pub fn top1_agreement(reference: &[f32], got: &[f32], classes: usize) -> f64 {
    let (a, b) = (argmax_rows(reference, classes), argmax_rows(got, classes));
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    agree as f64 / a.len().max(1) as f64
}

/// ROC AUC of `scores` against `labels` (1: anomalous, 0: normal): the probability that an
/// anomalous sample scores higher than a normal one, ties counting one half (the Mann–Whitney
/// U statistic over the product of the class sizes, from average ranks). `None` when either
/// class is missing, a label is neither 0 nor 1, the lengths differ, or a score is NaN.
pub fn roc_auc(scores: &[f64], labels: &[i64]) -> Option<f64> {
    if scores.len() != labels.len()
        || scores.iter().any(|s| s.is_nan())
        || labels.iter().any(|&l| l != 0 && l != 1)
    {
        return None;
    }
    let positives = labels.iter().filter(|&&l| l == 1).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (1-based, tie-averaged) ranks of the anomalous samples.
    let mut positive_ranks = 0f64;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let average_rank = (start + 1 + end) as f64 / 2.0;
        let tied_positives = order[start..end]
            .iter()
            .filter(|&&i| labels[i] == 1)
            .count();
        positive_ranks += average_rank * tied_positives as f64;
        start = end;
    }
    let (p, n) = (positives as f64, negatives as f64);
    Some((positive_ranks - p * (p + 1.0) / 2.0) / (p * n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snr_and_agreement() {
        assert_eq!(snr_db(&[1.0, 2.0], &[1.0, 2.0]), None);
        let snr = snr_db(&[3.0, 4.0], &[3.0, 4.5]).unwrap();
        assert!(
            (snr - 10.0 * (25.0f64 / 0.25).log10()).abs() < 1e-9,
            "{snr}"
        );
        assert!(snr_db(&[1.0], &[f32::NAN]).unwrap().is_nan());
        assert_eq!(argmax_rows(&[0.1, 0.9, 0.5, 0.5], 2), vec![1, 0]);
        let r = [0.1, 0.9, 0.8, 0.2, 0.3, 0.7];
        assert_eq!(
            top1_agreement(&r, &[0.2, 0.8, 0.1, 0.9, 0.4, 0.6], 2),
            2.0 / 3.0
        );
    }

    #[test]
    fn roc_auc_counts_ordered_pairs_and_halves_ties() {
        // Perfect separation, perfect inversion, and a chance-level ordering.
        assert_eq!(roc_auc(&[0.1, 0.2, 0.8, 0.9], &[0, 0, 1, 1]), Some(1.0));
        assert_eq!(roc_auc(&[0.9, 0.8, 0.2, 0.1], &[0, 0, 1, 1]), Some(0.0));
        // Pairs (anomalous, normal): (0.5, 0.3) above, (0.5, 0.7) below, (0.9, 0.3) above,
        // (0.9, 0.7) above: 3 of 4.
        assert_eq!(roc_auc(&[0.3, 0.5, 0.7, 0.9], &[0, 1, 0, 1]), Some(0.75));
        // Every score equal: every pair a tie.
        assert_eq!(roc_auc(&[1.0; 4], &[0, 1, 0, 1]), Some(0.5));
        // One tie among four pairs: (0.5, 0.5) counts one half.
        assert_eq!(roc_auc(&[0.5, 0.5, 0.2, 0.9], &[0, 1, 0, 1]), Some(0.875));
        // Not computable.
        assert_eq!(roc_auc(&[0.1, 0.2], &[1, 1]), None);
        assert_eq!(roc_auc(&[0.1, 0.2], &[0, 2]), None);
        assert_eq!(roc_auc(&[0.1, f64::NAN], &[0, 1]), None);
        assert_eq!(roc_auc(&[0.1], &[0, 1]), None);
    }

    #[test]
    fn the_f16_gate_judges_the_task_output_like_the_quantization_gate() {
        use crate::manifest::{DType, F16Compute, GoldenTensor, OutputStatistic, Task};
        let mut golden = crate::testing::sample_manifest().golden;
        golden.outputs = vec![
            GoldenTensor {
                name: "embedding".into(),
                dtype: DType::F32,
                shape: vec![2, 1],
            },
            GoldenTensor {
                name: "probabilities".into(),
                dtype: DType::F32,
                shape: vec![2, 2],
            },
        ];
        let task = Task::Classification {
            output: "probabilities".into(),
            scores: crate::manifest::ScoreKind::Probabilities,
            classes: 2,
        };
        let gate = F16Compute {
            min_top1_agreement: Some(0.99),
            min_snr_db: None,
        };
        let want: [&[f32]; 2] = [&[5.0, 6.0], &[0.2, 0.8, 0.7, 0.3]];
        let close: [&[f32]; 2] = [&[5.0, 8.0], &[0.21, 0.79, 0.69, 0.31]];
        let ok = gate.judge(&task, &golden, &want, &close).unwrap();
        assert!(
            ok.contains("'probabilities': top-1 agreement 1.0000, SNR"),
            "{ok}"
        );
        let flipped: [&[f32]; 2] = [&[5.0, 6.0], &[0.2, 0.8, 0.4, 0.6]];
        let err = gate.judge(&task, &golden, &want, &flipped).unwrap_err();
        assert!(
            err.contains("top-1 agreement 0.5000") && err.contains("below 0.99"),
            "{err}"
        );
        // Any output not finite fails, the task's or another.
        let inf: [&[f32]; 2] = [&[f32::INFINITY, 6.0], &[0.2, 0.8, 0.7, 0.3]];
        let err = gate.judge(&task, &golden, &want, &inf).unwrap_err();
        assert!(
            err.contains("'embedding'") && err.contains("not finite"),
            "{err}"
        );

        let task = Task::Regression {
            output: "embedding".into(),
            statistic: OutputStatistic::Mean,
        };
        let gate = F16Compute {
            min_top1_agreement: None,
            min_snr_db: Some(20.0),
        };
        assert!(gate
            .judge(&task, &golden, &want, &close)
            .unwrap_err()
            .contains("< 20 dB"));
        let near: [&[f32]; 2] = [&[5.01, 6.0], &[0.0; 4]];
        assert!(gate.judge(&task, &golden, &want, &near).is_ok());
    }
}
