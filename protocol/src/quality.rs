//! Figures that compare a model's outputs with reference outputs of the same inputs: the
//! bundler's quantization gate (quantized against float model) and the agent's judgement of
//! half-precision compute (`manifest::F16Compute`: the device's float16 outputs against the
//! golden ones) use the same ones.

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
