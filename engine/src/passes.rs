//! The engine's own rewrites of a decluttered model, run at every load before tract optimises
//! it (`model::optimize`), on ONNX and NNEF models alike: they match tract-core operators
//! (`Conv`, `MaxPool`), which is what both front ends produce, and never reach a file (the NNEF
//! conversion and the model cache write the model before them).
//!
//! First [`crate::fold`] folds constants computed from constants (a quantized model's
//! dequantized weights) that tract leaves unfolded. Each pass after it replaces an operator whose tract 0.23.9 implementation is slow on the small inputs of
//! edge models with one of the engine's, and leaves anything it does not recognise to tract:
//! - [`crate::im2col`]: a convolution as a column-matrix copy and a matrix product (the
//!   engine's, [`crate::pointwise`], where its AVX2 kernel runs; tract's otherwise);
//! - [`crate::pointwise`]: a pointwise (1x1) convolution as the engine's matrix product over the
//!   activation in place, with the bias addition after it folded in (`pointwise::fuse_bias`),
//!   on x86_64 CPUs with AVX2 + FMA only;
//! - [`crate::depthwise`]: a depthwise convolution over padded rows (batch size known only),
//!   also for convolutions of one input channel (a channel multiplier), with the `Max`/`Min`
//!   activation after it (or after a pointwise one) fused (`depthwise::fuse_clamp`);
//! - [`crate::maxpool`]: a max pool walking rows instead of points;
//! - [`crate::layout`]: on a model with depthwise convolutions, those and the pointwise
//!   ones run on channels-last activations, with transposes only where channels-last and
//!   channels-first values meet (none on `mobilenetish`); then the residual additions fold
//!   into the products before them (`pointwise::fuse_residual`), wide expansions into the
//!   depthwise convolutions after them ([`crate::pointwise_depthwise`]), and a wide depthwise
//!   convolution with no expansion before it into its projection
//!   ([`crate::depthwise_pointwise`]);
//! - [`crate::direct_conv`]: after the layout pass, an im2col convolution whose product is
//!   channels-last (or channels-first and small) reads its padded input in place, no column
//!   matrix;
//! - last, [`crate::matvec`]: a fully connected layer of the batch-1 plan as one
//!   matrix-vector op.
//!
//! Outputs stay within 1e-5 relative (plus 1e-6 of the output's largest value) of tract's own
//! plan for the same model on every reference model, loaded from ONNX and from NNEF (tests
//! below); each operator is also checked
//! against a naive implementation in its module.

use tract_nnef::prelude::*;
use tract_nnef::tract_core::internal::{TypedModelPatch, TypedOp};
use tract_nnef::tract_core::ops::change_axes::AxisOp;

/// How many operators each pass replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Rewrites {
    /// Nodes computing constants from constants, folded into constants (`fold`).
    pub folded_constants: usize,
    pub convolutions: usize,
    pub depthwise_convolutions: usize,
    pub max_pools: usize,
    /// Pointwise convolutions (tract `EinSum`s) run by the engine's matrix product.
    pub pointwise_convolutions: usize,
    /// Bias additions folded into the engine's matrix product.
    pub fused_biases: usize,
    /// Activations (`Max`/`Min` with a constant) fused into a depthwise convolution or the
    /// engine's matrix product.
    pub fused_clamps: usize,
    /// Depthwise and pointwise convolutions switched to channels-last activations
    /// ([`crate::layout`]).
    pub channels_last: usize,
    /// Transposes the layout pass left where channels-last and channels-first values meet.
    pub layout_transposes: usize,
    /// im2col convolutions whose product reads the padded input in place
    /// ([`crate::direct_conv`]).
    pub direct_convolutions: usize,
    /// Residual additions folded into the channels-last product before them.
    pub fused_residuals: usize,
    /// Channels-last products fused into the depthwise convolution they feed
    /// ([`crate::pointwise_depthwise`]).
    pub fused_pointwise_depthwise: usize,
    /// Channels-last depthwise convolutions fused into the product they feed
    /// ([`crate::depthwise_pointwise`]).
    pub fused_depthwise_pointwise: usize,
    /// Fully connected layers at batch 1 ([`crate::matvec`]).
    pub matrix_vector_products: usize,
}

/// Offers every node of `model`, in evaluation order, to `patch_for`; each patch it returns
/// replaces that node at once (so later nodes see the rewritten graph). Returns how many nodes
/// were patched, and compacts the model if any were. The loop every pass shares.
pub(crate) fn patch_each(
    model: &mut TypedModel,
    mut patch_for: impl FnMut(&TypedModel, &TypedNode) -> TractResult<Option<TypedModelPatch>>,
) -> TractResult<usize> {
    let mut patched = 0;
    for id in model.eval_order()? {
        if let Some(patch) = patch_for(model, model.node(id))? {
            patch.apply(model)?;
            patched += 1;
        }
    }
    if patched > 0 {
        model.compact()?;
    }
    Ok(patched)
}

/// The node whose output `node` reads first, looking through a reshape of the spatial axes in
/// between (tract's NNEF reading keeps `[h·w, c]` to `[h, w, c]` reshapes between layers: the
/// same values in the same order): that node, then the reshape if there is one.
pub(crate) fn producer_through_reshape<'m>(
    model: &'m TypedModel,
    node: &TypedNode,
) -> (&'m TypedNode, Option<&'m TypedNode>) {
    let prev = model.node(node.inputs[0].node);
    let is_reshape = prev
        .op_as::<AxisOp>()
        .is_some_and(|op| matches!(op, AxisOp::Reshape(..)));
    if is_reshape {
        (model.node(prev.inputs[0].node), Some(prev))
    } else {
        (prev, None)
    }
}

/// A patch replacing the nodes of `path` (each feeding only the next, none a model output;
/// `None` otherwise) with one node of `op` reading `inputs`, named after the last node.
pub(crate) fn fuse_path(
    model: &TypedModel,
    path: &[&TypedNode],
    inputs: &[OutletId],
    op: impl TypedOp,
) -> TractResult<Option<TypedModelPatch>> {
    for pair in path.windows(2) {
        if model.single_succ(pair[0].id)?.map(|s| s.id) != Some(pair[1].id)
            || model.outputs.contains(&pair[0].id.into())
        {
            return Ok(None);
        }
    }
    let last = path.last().expect("a path of nodes");
    let mut patch = TypedModelPatch::new(format!("engine fused {}", last.name));
    let inputs = inputs
        .iter()
        .map(|i| patch.tap_model(model, *i))
        .collect::<TractResult<TVec<_>>>()?;
    let wire = patch.wire_node(format!("{}.engine_fused", last.name), op, &inputs)?[0];
    patch.shunt_outside(model, last.id.into(), wire)?;
    for n in path {
        patch.obliterate(n.id)?;
    }
    Ok(Some(patch))
}

/// Runs every pass on `model` (decluttered, not yet optimised), switching it to channels-last
/// if `channels_last` ([`crate::layout::channels_last_by_default`]).
pub(crate) fn apply(model: &mut TypedModel, channels_last: bool) -> TractResult<Rewrites> {
    // First, so the passes below see dequantized weights as the constants they are.
    let folded_constants = crate::fold::fold_constants(model)?;
    // Depthwise first: it also takes convolutions of one input channel (a depthwise one with
    // a channel multiplier), which im2col would otherwise take, when the batch size is known.
    let depthwise_convolutions = crate::depthwise::install(model)?;
    let convolutions = crate::im2col::install(model)?;
    let pointwise_convolutions = crate::pointwise::install(model)?;
    // Biases before clamps: a clamp is fused only right after the bias.
    let fused_biases = crate::pointwise::fuse_bias(model)?;
    let max_pools = crate::maxpool::install(model)?;
    let fused_clamps = crate::depthwise::fuse_clamp(model)?;
    // Last: it switches the ops the passes above installed.
    let layout = crate::layout::install(model, channels_last)?;
    // After the layout pass: it takes the im2col products it made channels-last.
    let direct_convolutions = crate::direct_conv::install(model)?;
    let fused_residuals = crate::pointwise::fuse_residual(model)?;
    let fused_pointwise_depthwise = crate::pointwise_depthwise::install(model)?;
    // After it: a depthwise convolution fused with its expansion is not fused again.
    let fused_depthwise_pointwise = crate::depthwise_pointwise::install(model)?;
    // After the layout pass: it takes the products' inputs as that pass leaves them.
    let matrix_vector_products = crate::matvec::install(model)?;
    Ok(Rewrites {
        folded_constants,
        depthwise_convolutions,
        convolutions,
        pointwise_convolutions,
        fused_biases,
        max_pools,
        fused_clamps,
        channels_last: layout.switched,
        layout_transposes: layout.transposes,
        direct_convolutions,
        fused_residuals,
        fused_pointwise_depthwise,
        fused_depthwise_pointwise,
        matrix_vector_products,
    })
}

#[cfg(all(test, feature = "onnx"))]
mod tests {
    use std::path::{Path, PathBuf};

    use tract_onnx::prelude::*;

    use super::Rewrites;
    use crate::{EngineOptions, Model};

    const MODELS: [&str; 4] = ["digits_mlp", "digits_cnn", "vibration_ae", "mobilenetish"];

    fn onnx_path(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/models")
            .join(name)
            .join(format!("{name}.onnx"))
    }

    fn first_rows(name: &str, n: usize) -> crate::Tensor {
        let dir = onnx_path(name).parent().unwrap().to_owned();
        let all = crate::npy::read_npy(dir.join("test_input.npy")).unwrap();
        let row: usize = all.shape[1..].iter().product();
        let mut shape = all.shape.clone();
        shape[0] = n;
        crate::Tensor::from_f32(shape, all.as_f32().unwrap()[..n * row].to_vec()).unwrap()
    }

    /// Stock tract: the model the engine prepares (decluttered, batch size fixed when 1, as the
    /// engine's batch-1 plan does; symbolic otherwise), optimised and run by tract alone.
    fn stock(name: &str, x: &crate::Tensor) -> Vec<f32> {
        let path = onnx_path(name);
        let (typed, names) =
            crate::cache::from_onnx_bytes(&path, &std::fs::read(&path).unwrap()).unwrap();
        let signature = crate::spec::Signature::of(&typed, &names, &path).unwrap();
        let typed = match (x.shape[0], signature.batch_symbol(&typed)) {
            (1, Some(sym)) => typed
                .set_symbols(&[(sym, TDim::Val(1))].into_iter().collect())
                .unwrap(),
            _ => typed,
        };
        let plan = typed.into_optimized().unwrap().into_runnable().unwrap();
        let x = Tensor::from_shape(&x.shape, x.as_f32().unwrap()).unwrap();
        let out = plan.run(tvec!(x.into())).unwrap();
        let view = out[0].try_as_plain_ram().unwrap();
        view.as_slice::<f32>().unwrap().to_vec()
    }

    #[test]
    fn engine_outputs_match_stock_tract_within_1e5() {
        let tmp = tempfile::tempdir().unwrap();
        for name in MODELS {
            let path = onnx_path(name);
            let onnx = Model::load(&path, &EngineOptions::default()).unwrap();
            let (archive, names) =
                crate::onnx_to_nnef(&path, &std::fs::read(&path).unwrap()).unwrap();
            let nnef_path = tmp.path().join(format!("{name}.nnef.tar"));
            std::fs::write(&nnef_path, archive).unwrap();
            let nnef = Model::load_nnef(&nnef_path, &names, &EngineOptions::default()).unwrap();
            for n in [1, 3] {
                let x = first_rows(name, n);
                let want = stock(name, &x);
                for (model, from) in [(&onnx, "ONNX"), (&nnef, "NNEF")] {
                    let got = model.run(std::slice::from_ref(&x)).unwrap();
                    let what = format!("{name} from {from}, batch {n}");
                    crate::testing::assert_close(got[0].as_f32().unwrap(), &want, &what);
                }
            }
        }
    }

    /// The passes find the same operators in a model read back from NNEF as in the ONNX one
    /// (the batch-1 plan's model), channels-last pointwise convolutions included.
    #[test]
    fn passes_rewrite_nnef_models_as_onnx_ones() {
        // The engine's matrix product (pointwise convolutions, im2col's products) is installed
        // only where its AVX2 kernel runs.
        let fast = usize::from(crate::pointwise::fast_kernel());
        let expected = [
            (
                "digits_mlp",
                Rewrites {
                    // Its three fully connected layers.
                    matrix_vector_products: 3 * fast,
                    ..Rewrites::default()
                },
            ),
            (
                "digits_cnn",
                Rewrites {
                    // Float weights: nothing tract leaves unfolded.
                    folded_constants: 0,
                    // conv2, its bias in the engine's product when installed.
                    convolutions: 1,
                    // conv1: one input channel, a depthwise convolution with multiplier 32,
                    // its ReLU fused.
                    depthwise_convolutions: 1,
                    max_pools: 1,
                    pointwise_convolutions: 0,
                    fused_biases: 0,
                    // conv1's ReLU, and conv2's into the engine's product.
                    fused_clamps: 1 + fast,
                    // No depthwise convolution of multiplier 1: channels-first throughout.
                    channels_last: 0,
                    layout_transposes: 0,
                    // conv2 (a 4x4 output): its product reads the padded input in place,
                    // channels-last into a scratch buffer, then transposed.
                    direct_convolutions: fast,
                    fused_residuals: 0,
                    fused_pointwise_depthwise: 0,
                    fused_depthwise_pointwise: 0,
                    // fc.
                    matrix_vector_products: fast,
                },
            ),
            (
                "vibration_ae",
                Rewrites {
                    // Its four fully connected layers.
                    matrix_vector_products: 4 * fast,
                    ..Rewrites::default()
                },
            ),
            (
                "mobilenetish",
                Rewrites {
                    folded_constants: 0,
                    // The 224x224 first layer: its column matrix (1.35 MB) is rewritten only
                    // for the engine's product.
                    convolutions: fast,
                    depthwise_convolutions: 17,
                    max_pools: 0,
                    pointwise_convolutions: 34 * fast,
                    fused_biases: 34 * fast,
                    // The ReLU6 (`Max`, `Min`) after every depthwise convolution, and after
                    // the 17 pointwise ones that have one and the first layer.
                    fused_clamps: 34 + 36 * fast,
                    // Every depthwise and pointwise convolution and the first layer's product
                    // channels-last, where the engine's product runs...
                    channels_last: 52 * fast,
                    // ...with no transpose left: the first layer writes channels-last, the
                    // residual additions and the global pool read it.
                    layout_transposes: 0,
                    // The first layer's product, channels-last, reads its padded input in
                    // place.
                    direct_convolutions: fast,
                    // The ten inverted-residual blocks' additions, into their projections.
                    fused_residuals: 10 * fast,
                    // The expanding products into the depthwise convolutions after them where
                    // the activation between them is 1 MiB or more: the 112x112 and 56x56 ones.
                    fused_pointwise_depthwise: 3 * fast,
                    // The first depthwise convolution (112x112, no expansion before it) into
                    // its projection.
                    fused_depthwise_pointwise: fast,
                    // fc.
                    matrix_vector_products: fast,
                },
            ),
        ];
        let tmp = tempfile::tempdir().unwrap();
        for (name, want) in expected {
            let path = onnx_path(name);
            let (from_onnx, names) =
                crate::cache::from_onnx_bytes(&path, &std::fs::read(&path).unwrap()).unwrap();
            let (archive, _) = crate::onnx_to_nnef(&path, &std::fs::read(&path).unwrap()).unwrap();
            let nnef_path = tmp.path().join(format!("{name}.nnef.tar"));
            std::fs::write(&nnef_path, archive).unwrap();
            let from_nnef = crate::nnef::read(&nnef_path).unwrap();
            // As the batch-1 plan is prepared: batch size fixed to 1, decluttered again.
            let batch_one = |typed| crate::testing::batch_fixed(typed, &names, &path, 1);
            let (mut from_onnx, mut from_nnef) = (batch_one(from_onnx), batch_one(from_nnef));
            assert_eq!(
                super::apply(&mut from_onnx, true).unwrap(),
                want,
                "{name} ONNX"
            );
            // Including mobilenetish's pointwise convolutions, to which tract's declutter of
            // the NNEF graph gives channels-last operands (`akbm,nk->bmn`, `mk,nk->nm`): the
            // engine's product takes those layouts too.
            assert_eq!(
                super::apply(&mut from_nnef, true).unwrap(),
                want,
                "{name} NNEF"
            );
        }
    }
}
