//! Convolutions whose product reads the padded input in place: no column matrix.
//!
//! An im2col convolution ([`crate::im2col`]) first copies its input into a column matrix, one
//! row per input channel and kernel tap, one column per output point, then multiplies it by the
//! kernel. For `mobilenetish`'s first layer (3 channels, 3x3, stride 2, 224x224 → 112x112) that
//! matrix is 1.35 MB: written out of cache, then read back by the product. Yet within one
//! output row, the values that tap `(c, ky, kx)` takes for consecutive points are a contiguous
//! run of the input's [`PaddedPlane`] (stored by column phase for a column stride over 1), at a
//! fixed offset from where the row's first tap begins. So here the input is only padded (610 KB
//! for that layer, into a scratch buffer kept between calls), and the product
//! ([`crate::pointwise::gemm_taps`]) reads each tap through a table of those `k` offsets
//! from each output point's start:
//!
//! ```text
//! x [N, C, H, W] ─ EngineIm2col ─ [N, C·kh·kw, oh·ow] ─ EnginePointwise (channels-last out) ─ [N, oh, ow, M]
//!   becomes
//! x [N, C, H, W] ─ EngineDirectConv ─ [N, oh, ow, M]     (padded planes + tap offsets, inside)
//! ```
//!
//! The product's tiles are those of a channels-last output ([`Layout::OutChannelsLast`]):
//! points (one run of the kernel's rows, which a row of output points is) by output channels.
//! So the pass runs after the layout pass ([`crate::layout`]), which makes the products of
//! im2col convolutions channels-last where it runs. It also takes small channels-first ones
//! (an output of at most [`SMALL_CHANNELS_FIRST_BYTES`]: `digits_cnn`'s 4x4 `conv2`, 64
//! channels from 32): computed channels-last into a scratch buffer, then transposed. There the
//! channels-first tile, 16 points to a vector, broadcasts a weight for every multiply-add (and a
//! 4x4 plane is a single vector of points), where the channels-last one broadcasts a point for
//! every two; and the column matrix (288 x 16) took a third of the layer's time to copy.
//! Larger channels-first ones (`mobilenetish`'s first layer where the engine runs
//! channels-first: CPUs without AVX-512) would not keep their transposed output in cache: they
//! copy the column matrix of a band of output rows at a time out of the padded planes (about
//! [`COLUMN_BAND_BYTES`], in cache) and run the channels-first product on it, into the band's
//! columns of the output ([`DirectConv::by_bands`]).
//!
//! Invariant: a direct convolution sums the same products, in the same order, as the im2col
//! copy and product it replaces: results to the bit (`tests::matches_im2col_and_product`).

use tract_nnef::prelude::*;
use tract_nnef::tract_core::internal::*;

use crate::im2col::{copy_short, EngineIm2col, PaddedPlane};
use crate::pointwise::{
    gemm_channels_first, gemm_taps, pack_weights, unpack_weights, Kernel, Layout, Pointwise,
};
use crate::window::Avx2;

/// The largest output (bytes, one image) of a channels-first product that [`DirectConv`]
/// computes channels-last and transposes; larger ones it computes by bands of output rows.
const SMALL_CHANNELS_FIRST_BYTES: usize = 64 * 1024;

/// A band's column matrix, channels-first ([`DirectConv::by_bands`]): as many output rows as
/// fit here (at least one).
const COLUMN_BAND_BYTES: usize = 64 * 1024;

/// An [`EngineIm2col`] and the [`Pointwise`] product that reads it, as one op. Inputs: `x`, the
/// weights packed for [`DirectConv::weights_layout`], the bias; output: the product's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct DirectConv {
    im2col: EngineIm2col,
    product: Pointwise,
    padded: PaddedPlane,
    /// Where input channel `c`'s tap `(ky, kx)` (the product's `k` order) of an output row's
    /// first point is, from where the row's run starts in the padded planes.
    taps: Vec<usize>,
    /// A large channels-first product: the column matrix of a band of output rows at a time
    /// (about [`COLUMN_BAND_BYTES`], copied from the padded planes), each band's product
    /// written into its columns of the output at once.
    by_bands: bool,
}

impl DirectConv {
    /// The op for `im2col` read by `product`, or `None` when the points of an output row are
    /// not contiguous in the padded plane (a column stride with a column dilation), or the
    /// product's output is neither channels-last nor a small channels-first one.
    fn of(im2col: &EngineIm2col, product: &Pointwise) -> Option<DirectConv> {
        let win = im2col.window();
        let padded = PaddedPlane::of(win);
        let small = win.oh * win.ow * product.m * 4 <= SMALL_CHANNELS_FIRST_BYTES;
        let layout_taken = matches!(
            product.layout,
            Layout::OutChannelsLast | Layout::ChannelsFirst
        );
        if !layout_taken || product.residual || !padded.runs_are_contiguous(win) {
            return None;
        }
        let mut taps = Vec::with_capacity(win.c * win.kh * win.kw);
        for c in 0..win.c {
            for ky in 0..win.kh {
                for kx in 0..win.kw {
                    taps.push(c * padded.len() + padded.tap_at(win, 0, ky, kx));
                }
            }
        }
        if taps.len() != product.k {
            return None;
        }
        Some(DirectConv {
            im2col: im2col.clone(),
            product: product.clone(),
            padded,
            taps,
            by_bands: product.layout == Layout::ChannelsFirst && !small,
        })
    }

    /// How the op's weights are packed: for the channels-last tiles of [`gemm_taps`], or
    /// channels-first [`DirectConv::by_bands`].
    pub(crate) fn weights_layout(&self) -> Layout {
        if self.by_bands {
            Layout::ChannelsFirst
        } else {
            Layout::OutChannelsLast
        }
    }

    /// `out` (`[images, oh, ow, m]`, or `[images, m, oh, ow]` for a channels-first product)
    /// of `x` (`[images, c, h, w]`), every value written, with the weights `w` packed for
    /// [`DirectConv::weights_layout`] and the bias `b`.
    fn run(&self, x: &[f32], w: &[f32], b: &[f32], out: &mut [f32], kernel: Kernel) {
        let win = self.im2col.window();
        let (m, k) = (self.product.m, self.product.k);
        let (plane, row_step) = (self.padded.len(), win.stride.0 * self.padded.row_len);
        let points = win.oh * win.ow;
        let avx2 = Avx2::detect();
        let channels_first = self.product.layout == Layout::ChannelsFirst;
        PLANES.with_borrow_mut(|(planes, transposed)| {
            if planes.len() < win.c * plane {
                planes.resize(win.c * plane, 0.0);
            }
            let scratch = if self.by_bands {
                self.band_rows() * win.ow * k
            } else if channels_first {
                points * m
            } else {
                0
            };
            if transposed.len() < scratch {
                transposed.resize(scratch, 0.0);
            }
            let images = x.chunks_exact(win.c * win.h * win.w);
            for (image, out) in images.zip(out.chunks_exact_mut(points * m)) {
                let channels = image.chunks_exact(win.h * win.w);
                for (channel, to) in channels.zip(planes.chunks_exact_mut(plane)) {
                    self.padded.fill(win, channel, to, avx2);
                }
                if self.by_bands {
                    self.run_by_bands(planes, w, b, transposed, out, kernel);
                    continue;
                }
                // Where each output point's taps begin: `ow` consecutive values per output row.
                let ow = win.ow;
                let starts = (0..win.oh).flat_map(|oy| (oy * row_step..).take(ow));
                let clamp = self.product.clamp;
                let points_last = if channels_first {
                    &mut transposed[..points * m]
                } else {
                    &mut *out
                };
                gemm_taps(
                    m,
                    k,
                    w,
                    planes,
                    &self.taps,
                    starts,
                    b,
                    clamp,
                    points_last,
                    kernel,
                );
                if channels_first {
                    for (p, values) in transposed.chunks_exact(m).take(points).enumerate() {
                        for (o, v) in values.iter().enumerate() {
                            out[o * points + p] = *v;
                        }
                    }
                }
            }
        });
    }

    /// The output rows of a band's column matrix ([`DirectConv::by_bands`]).
    fn band_rows(&self) -> usize {
        let win = self.im2col.window();
        (COLUMN_BAND_BYTES / (self.product.k * win.ow * 4)).clamp(1, win.oh)
    }

    /// One image's channels-first `out` (`m x oh·ow`) from its padded `planes`, by bands of
    /// output rows: each band's column matrix (the rows [`crate::im2col::im2col`] writes, for
    /// the band's points) copied into `columns`, then its product (`w` packed channels-first)
    /// written into the band's columns of `out`. The same sums as the whole column matrix's
    /// product: each point's is over its own column.
    fn run_by_bands(
        &self,
        planes: &[f32],
        w: &[f32],
        b: &[f32],
        columns: &mut [f32],
        out: &mut [f32],
        kernel: Kernel,
    ) {
        let win = self.im2col.window();
        let (m, k, ow) = (self.product.m, self.product.k, win.ow);
        let row_step = win.stride.0 * self.padded.row_len;
        let band_rows = self.band_rows();
        for oy0 in (0..win.oh).step_by(band_rows) {
            let oy1 = win.oh.min(oy0 + band_rows);
            let n = (oy1 - oy0) * ow;
            let columns = &mut columns[..k * n];
            for (row, tap) in columns.chunks_exact_mut(n).zip(&self.taps) {
                for (oy, to) in (oy0..oy1).zip(row.chunks_exact_mut(ow)) {
                    copy_short(to, &planes[tap + oy * row_step..][..ow]);
                }
            }
            let (points, clamp) = (win.oh * ow, self.product.clamp);
            let out = &mut out[oy0 * ow..];
            gemm_channels_first(m, k, n, n, points, w, columns, b, clamp, None, out, kernel);
        }
    }
}

thread_local! {
    /// The padded planes of [`DirectConv`] (every value is written per image:
    /// [`PaddedPlane::fill`]), and a channels-first product's output before its transposition
    /// (or a band's column matrix), kept between calls.
    static PLANES: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl Op for DirectConv {
    fn name(&self) -> StaticName {
        "EngineDirectConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![
            format!("{:?}", self.im2col.window()),
            format!("{:?}", self.product),
        ])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for DirectConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, w, b) = (&inputs[0], &inputs[1], &inputs[2]);
        let win = self.im2col.window();
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<f32>()?;
        let ws = w.try_as_plain_ram()?;
        let ws = ws.as_slice::<f32>()?;
        let bs = b.try_as_plain_ram()?;
        let bs = bs.as_slice::<f32>()?;
        let (m, k) = (self.product.m, self.product.k);
        let images = win.batch(x.shape());
        if xs.len() != images * win.c * win.h * win.w
            || bs.len() != m
            || ws.len() != crate::pointwise::packed_len(self.weights_layout(), m, k)
        {
            bail!("EngineDirectConv: input sizes do not match {self:?}");
        }
        let shape = self.product.output_shape(&self.im2col.output_shape(images));
        // Every element is written by `run`.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        {
            let mut out_ram = out.try_as_plain_ram_mut()?;
            self.run(xs, ws, bs, out_ram.as_slice_mut::<f32>()?, Kernel::best());
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for DirectConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let columns = self.im2col.output_facts(&[inputs[0]])?.remove(0);
        self.product.output_facts(&[&columns, inputs[1], inputs[2]])
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let columns = self.im2col.output_facts(&[inputs[0]])?.remove(0);
        self.product.cost(&[&columns, inputs[1], inputs[2]])
    }

    as_op!();
}

/// Replaces every [`EngineIm2col`] read only by a [`Pointwise`] product with [`DirectConv`]
/// (where [`DirectConv::of`] takes them). Returns how many were replaced.
pub(crate) fn install(model: &mut TypedModel) -> TractResult<usize> {
    crate::passes::patch_each(model, |model, node| {
        let Some(product) = node.op_as::<Pointwise>() else {
            return Ok(None);
        };
        let columns = model.node(node.inputs[0].node);
        let Some(im2col) = columns.op_as::<EngineIm2col>() else {
            return Ok(None);
        };
        if columns.outputs[0].successors.len() != 1 || model.outputs.contains(&node.inputs[0]) {
            return Ok(None);
        }
        let Some(op) = DirectConv::of(im2col, product) else {
            return Ok(None);
        };
        let mut patch = TypedModelPatch::new(format!("engine direct conv {}", node.name));
        let x = patch.tap_model(model, columns.inputs[0])?;
        let w = if product.layout == op.weights_layout() {
            patch.tap_model(model, node.inputs[1])?
        } else {
            let Some(packed) = model.outlet_fact(node.inputs[1])?.konst.clone() else {
                return Ok(None);
            };
            let (m, k) = (product.m, product.k);
            let packed = packed.try_as_plain_ram()?;
            let weights = unpack_weights(product.layout, m, k, packed.as_slice::<f32>()?);
            let repacked = pack_weights(Layout::OutChannelsLast, m, k, &weights);
            let repacked = Tensor::from_shape(&[repacked.len()], &repacked)?;
            patch.add_const(
                format!("{}.engine_points_last_weights", node.name),
                repacked,
            )?
        };
        let b = patch.tap_model(model, node.inputs[2])?;
        let y = patch.wire_node(format!("{}.engine_direct", node.name), op, &[x, w, b])?[0];
        patch.shunt_outside(model, node.id.into(), y)?;
        patch.obliterate(node.id)?;
        Ok(Some(patch))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::depthwise::Clamp;
    use crate::pointwise::{gemm, pack_weights};
    use crate::window::{Window2d, WindowCase};

    /// The op for `win` with `m` output channels, as the pass builds it, for a product in
    /// `layout`.
    fn direct(win: Window2d, m: usize, clamp: Clamp, layout: Layout) -> Option<DirectConv> {
        let k = win.c * win.kh * win.kw;
        let product = Pointwise {
            m,
            k,
            k_axis: 1,
            keep_batch: true,
            spatial: tvec![win.oh, win.ow],
            out_spatial: tvec![win.oh, win.ow],
            layout,
            clamp,
            residual: false,
        };
        DirectConv::of(&EngineIm2col::new(win), &product)
    }

    #[test]
    fn matches_im2col_and_product() {
        // (h, w, kh, kw, stride, dilation, pad_top, pad_left, oh, ow): mobilenetish's first
        // layer's form (stride 2, by phase) with rows of partial tiles, stride 1 with padding
        // on every side, a row dilation, a column dilation at stride 1, stride 3, a stride
        // (2, 1), no padding, a 1-point output row; then two whose channels-first outputs
        // are computed by bands of rows (more than `SMALL_CHANNELS_FIRST_BYTES` with 32 or 40
        // output channels; 5 to 9 rows to a band, the last one shorter), stride 1 and 2.
        let cases: [WindowCase; _] = [
            (12, 13, 3, 3, (2, 2), (1, 1), 1, 1, 6, 7),
            (9, 30, 3, 3, (1, 1), (1, 1), 1, 1, 9, 30),
            (11, 14, 3, 3, (1, 1), (2, 1), 2, 1, 11, 14),
            (9, 9, 3, 3, (1, 1), (1, 2), 1, 2, 9, 9),
            (11, 14, 3, 4, (1, 3), (1, 1), 0, 2, 9, 5),
            (10, 11, 5, 5, (2, 1), (1, 1), 2, 1, 5, 11),
            (10, 10, 3, 3, (2, 2), (1, 1), 0, 0, 4, 4),
            (3, 3, 3, 3, (1, 1), (1, 1), 0, 0, 1, 1),
            (24, 64, 3, 3, (1, 1), (1, 1), 1, 1, 24, 64),
            (48, 100, 3, 3, (2, 2), (1, 1), 1, 1, 24, 50),
        ];
        let layouts = [Layout::OutChannelsLast, Layout::ChannelsFirst];
        let all = Kernel::all_available();
        for (kernel, layout) in all.into_iter().flat_map(|k| layouts.map(|l| (k, l))) {
            for (i, &case) in cases.iter().enumerate() {
                for (c, m, clamp) in [
                    (3, 32, Clamp::new(0.0, 6.0)),
                    (2, 7, Clamp::NONE),
                    (5, 40, Clamp::NONE),
                ] {
                    let images = 2;
                    let win = Window2d::of_case(c, case);
                    let (k, n) = (c * win.kh * win.kw, win.oh * win.ow);
                    let x: Vec<f32> = (0..images * c * win.h * win.w)
                        .map(|v| ((v * 37 % 101) as f32 - 50.0) / 25.0)
                        .collect();
                    let w: Vec<f32> = (0..m * k)
                        .map(|v| ((v * 13 % 17) as f32 - 8.0) / 8.0)
                        .collect();
                    let b: Vec<f32> = (0..m).map(|v| v as f32 * 0.25 - 2.0).collect();
                    let packed = pack_weights(layout, m, k, &w);
                    let op = direct(win.clone(), m, clamp, layout).expect("a direct convolution");
                    let large = n * m * 4 > SMALL_CHANNELS_FIRST_BYTES;
                    assert_eq!(op.by_bands, layout == Layout::ChannelsFirst && large);
                    let op_weights = pack_weights(op.weights_layout(), m, k, &w);
                    let mut columns = vec![0f32; images * k * n];
                    crate::im2col::im2col(&win, &x, &mut columns);
                    // The reference product's reads end at a page's end: the last image's
                    // last tile reads nothing past its points (a tile of fewer points than
                    // its kernel's rows once did).
                    let columns = crate::testing::GuardedSlice::new(&columns);
                    let mut expected = vec![0f32; images * n * m];
                    for (x, out) in columns
                        .chunks_exact(k * n)
                        .zip(expected.chunks_exact_mut(n * m))
                    {
                        gemm(layout, m, k, n, &packed, x, &b, clamp, None, out, kernel);
                    }
                    // Twice: the scratch planes of the first call must not leak into the second.
                    for _ in 0..2 {
                        let mut out = vec![f32::NAN; images * n * m];
                        op.run(&x, &op_weights, &b, &mut out, kernel);
                        let differ = out
                            .iter()
                            .zip(&expected)
                            .position(|(a, b)| a.to_bits() != b.to_bits());
                        assert_eq!(
                            differ, None,
                            "{kernel:?} {layout:?} case {i} c {c} m {m}: first differing value"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn takes_contiguous_runs_of_the_column_layouts_only() {
        let relu = Clamp::new(0.0, f32::INFINITY);
        let plain = Window2d::of_case(3, (12, 13, 3, 3, (2, 2), (1, 1), 1, 1, 6, 7));
        assert!(direct(plain.clone(), 8, relu, Layout::OutChannelsLast).is_some());
        assert!(direct(plain.clone(), 8, relu, Layout::ChannelsFirst).is_some());
        // Products whose input is not a column matrix.
        assert!(direct(plain.clone(), 8, relu, Layout::ChannelsLast).is_none());
        assert!(direct(plain.clone(), 8, relu, Layout::InChannelsLast).is_none());
        // A column stride with a column dilation: a tap's points are not contiguous.
        let strided_dilated = Window2d::of_case(3, (9, 9, 3, 3, (1, 2), (2, 2), 2, 0, 9, 3));
        assert!(direct(strided_dilated, 8, relu, Layout::OutChannelsLast).is_none());
        // A channels-first output over 64 KiB (mobilenetish's first layer where the layout
        // pass does not run): by bands, its weights packed channels-first.
        let first_layer = Window2d::of_case(3, (224, 224, 3, 3, (2, 2), (1, 1), 1, 1, 112, 112));
        let by_bands = direct(first_layer.clone(), 32, relu, Layout::ChannelsFirst).unwrap();
        assert!(by_bands.by_bands && by_bands.weights_layout() == Layout::ChannelsFirst);
        let small = direct(plain, 8, relu, Layout::ChannelsFirst).unwrap();
        assert!(!small.by_bands && small.weights_layout() == Layout::OutChannelsLast);
        assert!(direct(first_layer, 32, relu, Layout::OutChannelsLast).is_some());
    }
}
