//! Activation ranges for static int8: run the float model on the calibration inputs with the
//! activations of interest exposed as extra outputs, and reduce what they hold to a `[lo, hi]`
//! per tensor — the extremes (`minmax`) or a percentile of the values (`percentile`, which
//! ignores rare outliers so the common values get finer steps).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use engine::{EngineOptions, Model, Tensor};

use super::graph;
use super::QuantizeError;
use crate::onnx_pb::{type_proto, TypeProto, ValueInfoProto};

/// `--calibration-method`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RangeMethod {
    MinMax,
    /// Keep values between the `100 - p` and `p` percentiles, e.g. `p = 99.99`.
    Percentile(f64),
}

impl Default for RangeMethod {
    fn default() -> Self {
        RangeMethod::MinMax
    }
}

impl FromStr for RangeMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<RangeMethod, String> {
        match s.split_once(':') {
            None if s == "minmax" => Ok(RangeMethod::MinMax),
            None if s == "percentile" => Ok(RangeMethod::Percentile(99.99)),
            Some(("percentile", p)) => match p.parse::<f64>() {
                Ok(p) if (50.0..=100.0).contains(&p) => Ok(RangeMethod::Percentile(p)),
                _ => Err(format!("percentile '{p}' is not a number in [50, 100]")),
            },
            _ => Err(format!(
                "unknown calibration method '{s}' (minmax, percentile or percentile:P)"
            )),
        }
    }
}

impl fmt::Display for RangeMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RangeMethod::MinMax => f.write_str("minmax"),
            RangeMethod::Percentile(p) => write!(f, "percentile:{p}"),
        }
    }
}

/// Values kept per tensor and batch for the percentile method (an even stride through them).
const SAMPLE_PER_BATCH: usize = 1 << 16;

/// What has been seen of one tensor.
#[derive(Default)]
struct Seen {
    lo: f32,
    hi: f32,
    sample: Vec<f32>,
}

impl Seen {
    fn add(&mut self, values: &[f32]) {
        for &v in values {
            self.lo = self.lo.min(v);
            self.hi = self.hi.max(v);
        }
        let stride = values.len().div_ceil(SAMPLE_PER_BATCH).max(1);
        self.sample.extend(values.iter().step_by(stride));
    }

    /// `[lo, hi]`, always containing 0 so that zero is exact after quantization.
    fn range(mut self, method: RangeMethod) -> (f32, f32) {
        let (lo, hi) = match method {
            RangeMethod::MinMax => (self.lo, self.hi),
            RangeMethod::Percentile(p) => {
                self.sample.sort_by(f32::total_cmp);
                let n = self.sample.len();
                let at = |q: f64| self.sample[((n - 1) as f64 * q / 100.0).round() as usize];
                if n == 0 {
                    (0.0, 0.0)
                } else {
                    (at(100.0 - p), at(p))
                }
            }
        };
        (lo.min(0.0), hi.max(0.0))
    }
}

/// Runs the float model on `inputs` (batch on axis 0, `batch` samples per run) and returns the
/// range of each of `tensors`. A tensor that is a graph input is read from `inputs` directly.
pub(crate) fn observe(
    float_model: &[u8],
    tensors: &[String],
    inputs: &Tensor,
    batch: usize,
    method: RangeMethod,
) -> Result<HashMap<String, (f32, f32)>, QuantizeError> {
    let err = |what: &str, e: &dyn fmt::Display| QuantizeError::Calibration(format!("{what}: {e}"));
    let mut model = graph::decode(float_model)?;
    let g = graph::graph_mut(&mut model)?;
    let input_name = g.input.first().map(|v| v.name.clone()).unwrap_or_default();
    let float_tensor = TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: 1,
            shape: None,
        })),
        ..TypeProto::default()
    };
    let exposed: Vec<&String> = tensors.iter().filter(|t| **t != input_name).collect();
    let first_extra = g.output.len();
    for name in &exposed {
        g.output.push(ValueInfoProto {
            name: (*name).clone(),
            r#type: Some(float_tensor.clone()),
            ..ValueInfoProto::default()
        });
    }
    let file = tempfile::Builder::new()
        .suffix(".onnx")
        .tempfile()
        .map_err(|e| err("temporary file", &e))?;
    std::fs::write(file.path(), graph::encode(&model)).map_err(|e| err("temporary file", &e))?;
    let runner = Model::load(file.path(), &EngineOptions::default())
        .map_err(|e| err("loading the model with exposed activations", &e))?;
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let n = inputs.rows();
    let mut start = 0;
    while start < n {
        let end = (start + batch).min(n);
        let chunk = inputs.slice_rows(start, end);
        if tensors.contains(&input_name) {
            let values = chunk.as_f32().unwrap_or(&[]);
            seen.entry(input_name.clone()).or_default().add(values);
        }
        let outputs = runner
            .run(std::slice::from_ref(&chunk))
            .map_err(|e| err("running the calibration inputs", &e))?;
        for (name, out) in exposed.iter().zip(&outputs[first_extra..]) {
            let values = out.as_f32().unwrap_or(&[]);
            seen.entry((*name).clone()).or_default().add(values);
        }
        start = end;
    }
    Ok(seen
        .into_iter()
        .map(|(name, s)| (name, s.range(method)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_ignores_outliers_and_ranges_hold_zero() {
        let mut s = Seen::default();
        let mut values: Vec<f32> = (0..10_000).map(|i| 1.0 + i as f32 / 10_000.0).collect();
        values.push(1000.0);
        s.add(&values);
        let mut t = Seen::default();
        t.add(&values);
        assert_eq!(s.range(RangeMethod::MinMax), (0.0, 1000.0));
        let (lo, hi) = t.range(RangeMethod::Percentile(99.9));
        assert_eq!(lo, 0.0);
        assert!(hi < 2.0, "{hi}");
        assert_eq!("percentile:99.9".parse(), Ok(RangeMethod::Percentile(99.9)));
        assert!("percentile:12".parse::<RangeMethod>().is_err());
    }
}
