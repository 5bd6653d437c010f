//! Constants computed from constants, folded once at load.
//!
//! A quantized model ships its weights narrow and widens them in the graph: `int8-weights` as
//! `DequantizeLinear` (a `Cast` to f32 and a `Mul` by the channel scales once tract has
//! decluttered it), `f16` as a `Cast`. tract folds such subgraphs into constants only while the
//! result stays under 4 MiB (`CONST_FOLD_MEM_BUDGET`, a memory guard), so a larger weight — the
//! 1000 x 1280 classifier of `mobilenetish`, 5 MB as f32 — was widened, scaled and packed for
//! the matrix product again on every request: 5 ms of a 30 ms inference (BENCHMARKS.md,
//! "Quantization"). The bundle format promises that the device dequantizes once, at load; this
//! pass keeps that promise, and the passes after it then see the weights as constants.
//!
//! The guard kept here is against blow-ups rather than widening: a fold whose output is more than
//! four times the size of its inputs (an int8 to f32 cast is exactly four) and over tract's
//! budget is left to run as it would have.

use tract_nnef::prelude::*;
use tract_nnef::tract_core::internal::TypedModelPatch;
use tract_nnef::tract_core::ops::konst::Const;
use tract_nnef::tract_core::ops::source::TypedSource;

/// How many times an output may outgrow its inputs and still be folded (an int8 to f32 cast).
const MAX_GROWTH: u64 = 4;
/// tract's own budget (`tract_core::optim::CONST_FOLD_MEM_BUDGET`): anything under it is folded
/// whatever its growth.
const ALWAYS_FOLD_BYTES: u64 = 4 << 20;

/// Replaces every stateless node whose inputs are all constant by the constants it evaluates
/// to, in evaluation order (so chains fold whole). Returns how many nodes were folded.
pub(crate) fn fold_constants(model: &mut TypedModel) -> TractResult<usize> {
    crate::passes::patch_each(model, |model, node| {
        if node.op_is::<Const>() || node.op_is::<TypedSource>() || node.inputs.is_empty() {
            return Ok(None);
        }
        let facts = model.node_input_facts(node.id)?;
        let Some(values) = facts
            .iter()
            .map(|f| f.konst.clone())
            .collect::<Option<TVec<Arc<Tensor>>>>()
        else {
            return Ok(None);
        };
        let input_bytes: u64 = values.iter().map(|t| bytes(t)).sum();
        let Ok(Some(outputs)) = node
            .op
            .eval_out_of_plan(values.into_iter().map(|t| t.into_tvalue()).collect())
        else {
            // Stateful, or not evaluable before run time: tract's to run.
            return Ok(None);
        };
        let output_bytes: u64 = outputs.iter().map(|t| bytes(t)).sum();
        if output_bytes > ALWAYS_FOLD_BYTES && output_bytes > MAX_GROWTH * input_bytes {
            return Ok(None);
        }
        let mut patch = TypedModelPatch::default();
        for (slot, value) in outputs.into_iter().enumerate() {
            let name = if slot == 0 {
                node.name.clone()
            } else {
                format!("{}.{slot}", node.name)
            };
            let wire = patch.add_const(name, value.into_arc_tensor())?;
            patch.shunt_outside(model, OutletId::new(node.id, slot), wire)?;
        }
        Ok(Some(patch))
    })
}

fn bytes(t: &Tensor) -> u64 {
    (t.datum_type().size_of() * t.len()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_nnef::tract_core::ops::cast::cast;
    use tract_nnef::tract_core::ops::math;

    /// `x · (cast(w_i8) * scale)`: a dequantized weight of `n` int8 values, as declutter leaves
    /// an `int8-weights` one.
    fn dequantized(n: usize) -> TractResult<(TypedModel, OutletId)> {
        let mut model = TypedModel::default();
        let w = model.add_const("w", Tensor::from_shape(&[n], &vec![3i8; n])?)?;
        let w = model.wire_node("w.cast", cast(f32::datum_type()), &[w])?[0];
        let scale = model.add_const("scale", tensor1(&[0.5f32]))?;
        let w = model.wire_node("w.scale", math::mul(), &[w, scale])?[0];
        let x = model.add_source("x", f32::fact([n]))?;
        let y = model.wire_node("y", math::mul(), &[x, w])?[0];
        model.select_output_outlets(&[y])?;
        Ok((model, y))
    }

    #[test]
    fn a_dequantized_weight_over_tracts_budget_becomes_one_constant() -> TractResult<()> {
        // 2 Mi int8 values: 8 MiB as f32, over the 4 MiB tract folds.
        let n = 2 << 20;
        let (mut model, _) = dequantized(n)?;
        model.declutter()?;
        let before = model.nodes().len();
        assert!(
            model.nodes().iter().any(|n| n.name == "w.cast"),
            "tract left it"
        );
        assert_eq!(fold_constants(&mut model)?, 2, "the cast and the scaling");
        assert!(model.nodes().len() < before);
        let y = model.node(model.outputs[0].node);
        let w = model
            .outlet_fact(y.inputs[1])?
            .konst
            .clone()
            .expect("a constant weight");
        assert_eq!(w.datum_type(), f32::datum_type());
        assert!(w
            .try_as_plain_ram()?
            .as_slice::<f32>()?
            .iter()
            .all(|v| *v == 1.5));
        // And it still computes the same thing.
        let out = model
            .into_runnable()?
            .run(tvec![Tensor::from_shape(&[n], &vec![2f32; n])?.into()])?;
        assert!(out[0]
            .try_as_plain_ram()?
            .as_slice::<f32>()?
            .iter()
            .all(|v| *v == 3.0));
        Ok(())
    }

    #[test]
    fn a_fold_that_would_grow_more_than_fourfold_past_the_budget_is_left() -> TractResult<()> {
        use tract_nnef::tract_core::ops::array::MultiBroadcastTo;
        let mut model = TypedModel::default();
        let one = model.add_const("one", tensor1(&[1f32]))?;
        let shape = ShapeFact::from_dims([4usize << 20]);
        let big = model.wire_node("big", MultiBroadcastTo::new(shape), &[one])?[0];
        let x = model.add_source("x", f32::fact([4usize << 20]))?;
        let y = model.wire_node("y", math::add(), &[x, big])?[0];
        model.select_output_outlets(&[y])?;
        assert_eq!(fold_constants(&mut model)?, 0);
        assert!(model.nodes().iter().any(|n| n.name == "big"));
        Ok(())
    }
}
