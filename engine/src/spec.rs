//! The model's signature: input/output specs read from the graph, and input validation.

use std::path::Path;

use protocol::manifest::{DType, TensorSpec};
use tract_nnef::prelude::*;

use crate::error::EngineError;
use crate::tensor::Tensor;

/// Names of a model's inputs and outputs, in order: as the ONNX file spells them, or, for an
/// NNEF archive (which does not keep them), as its caller records them (a bundle's manifest).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IoNames {
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// Input and output specs plus what validation needs to know about free dimensions.
pub(crate) struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// For each input and axis: index into `symbols` when that dimension is a plain symbol.
    input_symbols: Vec<Vec<Option<usize>>>,
    /// Names of the free dimensions, e.g. `N`.
    symbols: Vec<String>,
    /// The symbol on axis 0 of the first input, taken as the batch dimension.
    batch: Option<usize>,
}

impl Signature {
    pub fn of(model: &TypedModel, names: &IoNames, path: &Path) -> Result<Signature, EngineError> {
        let load_err = |reason: String| EngineError::Load {
            path: path.to_owned(),
            reason,
        };
        let in_count = model.inputs.len();
        let out_count = model.outputs.len();
        if names.inputs.len() != in_count || names.outputs.len() != out_count {
            return Err(load_err("inconsistent input/output names".into()));
        }
        let mut symbols: Vec<String> = vec![];
        let mut input_symbols = vec![];
        let mut inputs = vec![];
        for (ix, name) in names.inputs.iter().enumerate() {
            let fact = model
                .input_fact(ix)
                .map_err(|e| load_err(format!("{e:#}")))?;
            inputs.push(spec_of(fact, name, "input", path)?);
            let syms = fact
                .shape
                .iter()
                .map(|d| match d {
                    TDim::Sym(s) => {
                        let s = s.to_string();
                        Some(symbols.iter().position(|k| *k == s).unwrap_or_else(|| {
                            symbols.push(s);
                            symbols.len() - 1
                        }))
                    }
                    _ => None,
                })
                .collect::<Vec<_>>();
            input_symbols.push(syms);
        }
        let mut outputs = vec![];
        for (ix, name) in names.outputs.iter().enumerate() {
            let fact = model
                .output_fact(ix)
                .map_err(|e| load_err(format!("{e:#}")))?;
            outputs.push(spec_of(fact, name, "output", path)?);
        }
        let batch = input_symbols
            .first()
            .and_then(|s| s.first().copied().flatten());
        Ok(Signature {
            inputs,
            outputs,
            input_symbols,
            symbols,
            batch,
        })
    }

    /// The batch symbol of `model` (the model the signature was read from), if any.
    pub fn batch_symbol(&self, model: &TypedModel) -> Option<Symbol> {
        let name = &self.symbols[self.batch?];
        model
            .input_fact(0)
            .ok()?
            .shape
            .iter()
            .find_map(|d| match d {
                TDim::Sym(s) if s.to_string() == *name => Some(s.clone()),
                _ => None,
            })
    }

    /// Checks `inputs` against the specs. Returns whether the batch dimension is 1 (so the
    /// batch-one plan applies).
    pub fn validate(&self, inputs: &[Tensor]) -> Result<bool, EngineError> {
        if inputs.len() != self.inputs.len() {
            return Err(EngineError::InputCount {
                expected: self.inputs.len(),
                got: inputs.len(),
            });
        }
        // Value and first setter of each free dimension, to check inputs agree on them.
        let mut bound: Vec<Option<(usize, usize)>> = vec![None; self.symbols.len()];
        for (ix, (t, spec)) in inputs.iter().zip(&self.inputs).enumerate() {
            if t.dtype() != spec.dtype {
                return Err(EngineError::InputDtype {
                    name: spec.name.clone(),
                    expected: spec.dtype,
                    got: t.dtype(),
                });
            }
            if !spec.accepts_shape(&t.shape) {
                return Err(EngineError::InputShape {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    got: t.shape.clone(),
                });
            }
            let expected = t.shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
            if expected != Some(t.len()) {
                return Err(EngineError::InputData {
                    name: spec.name.clone(),
                    shape: t.shape.clone(),
                    expected: expected.unwrap_or(usize::MAX),
                    got: t.len(),
                });
            }
            for (axis, sym) in self.input_symbols[ix].iter().enumerate() {
                let Some(sym) = *sym else { continue };
                let got = t.shape[axis];
                match bound[sym] {
                    None => bound[sym] = Some((got, ix)),
                    Some((expected, first)) if expected != got => {
                        return Err(EngineError::InputDimMismatch {
                            name: spec.name.clone(),
                            axis,
                            symbol: self.symbols[sym].clone(),
                            first: self.inputs[first].name.clone(),
                            expected,
                            got,
                        });
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(self
            .batch
            .is_some_and(|b| bound[b].is_some_and(|(v, _)| v == 1)))
    }
}

fn spec_of(
    fact: &TypedFact,
    name: &str,
    kind: &'static str,
    path: &Path,
) -> Result<TensorSpec, EngineError> {
    let dtype = match fact.datum_type {
        DatumType::F32 => DType::F32,
        DatumType::I32 => DType::I32,
        DatumType::I64 => DType::I64,
        DatumType::U8 => DType::U8,
        other => {
            return Err(EngineError::UnsupportedDtype {
                path: path.to_owned(),
                kind,
                name: name.to_owned(),
                dtype: format!("{other:?}"),
            });
        }
    };
    let shape = fact
        .shape
        .iter()
        .map(|d| d.as_i64().and_then(|v| usize::try_from(v).ok()))
        .collect();
    Ok(TensorSpec {
        name: name.to_owned(),
        dtype,
        shape,
        range: None,
    })
}

/// The input and output names of an ONNX graph as tract parsed it.
#[cfg(feature = "onnx")]
pub(crate) fn names_of(model: &tract_onnx::prelude::InferenceModel) -> TractResult<IoNames> {
    let inputs = model
        .input_outlets()?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    let outputs = model
        .output_outlets()?
        .iter()
        .map(|o| {
            model
                .outlet_label(*o)
                .map(str::to_owned)
                .unwrap_or_else(|| model.node(o.node).name.clone())
        })
        .collect();
    Ok(IoNames { inputs, outputs })
}
