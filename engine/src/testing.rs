//! Set-up the engine's unit tests share: a model prepared as a plan with a fixed batch size
//! is, and its first output.

use std::path::Path;
#[cfg(feature = "onnx")]
use std::path::PathBuf;

use tract_nnef::prelude::*;

/// `typed` (read from `path`, with input and output `names`) with its batch size fixed to
/// `n` and decluttered again, as the engine prepares its batch-1 plan.
pub(crate) fn batch_fixed(
    typed: TypedModel,
    names: &crate::IoNames,
    path: &Path,
    n: i64,
) -> TypedModel {
    let signature = crate::spec::Signature::of(&typed, names, path).unwrap();
    let sym = signature.batch_symbol(&typed).unwrap();
    let mut typed = typed
        .set_symbols(&[(sym, TDim::Val(n))].into_iter().collect())
        .unwrap();
    typed.declutter().unwrap();
    typed
}

/// The ONNX model at `path` with its batch size fixed to `n` ([`batch_fixed`]).
#[cfg(feature = "onnx")]
pub(crate) fn onnx_batch_fixed(path: &Path, n: i64) -> TypedModel {
    let (typed, names) =
        crate::cache::from_onnx_bytes(path, &std::fs::read(path).unwrap()).unwrap();
    batch_fixed(typed, &names, path, n)
}

/// `model` optimised by tract and run on `x`: its first output's values.
pub(crate) fn first_output(model: TypedModel, x: &Tensor) -> Vec<f32> {
    let out = model
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap()
        .run(tvec!(x.clone().into_tvalue()))
        .unwrap();
    out[0]
        .try_as_plain_ram()
        .unwrap()
        .as_slice::<f32>()
        .unwrap()
        .to_vec()
}

/// `mobilenetish`'s ONNX file among the example models.
#[cfg(feature = "onnx")]
pub(crate) fn mobilenetish_onnx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/mobilenetish/mobilenetish.onnx")
}

/// The first `n` of `mobilenetish`'s test images, `[n, 3, 224, 224]`.
#[cfg(feature = "onnx")]
pub(crate) fn mobilenetish_images(n: usize) -> Tensor {
    let input = crate::npy::read_npy(mobilenetish_onnx().with_file_name("test_input.npy")).unwrap();
    let image = 3 * 224 * 224;
    Tensor::from_shape(&[n, 3, 224, 224], &input.as_f32().unwrap()[..n * image]).unwrap()
}

/// Asserts that `got` has `want`'s length and each element is within 1e-5 relative of
/// `want`'s plus 1e-6 of the largest magnitude in `want` (at least 1), naming `what` and the
/// element otherwise. The absolute part scales with the tensor: an output near zero by
/// cancellation carries the rounding of sums as large as the tensor's values (`vibration_ae`'s
/// first output, −0.0062570 in float64, on a Zen 3: stock tract 9.2e-7 from it, the engine
/// 3.6e-7, so 1.3e-6 apart, with values up to 1.58 in that output).
#[cfg(feature = "onnx")]
pub(crate) fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1f32, |s, w| s.max(w.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs() + 1e-6 * scale,
            "{what}: element {i}: engine {g}, stock tract {w}"
        );
    }
}

/// `n` values in [-1, 1) that vary from one index to the next without a short period (a
/// multiplicative hash of the index), different for each `seed`.
pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
        })
        .collect()
}

/// Values at the very end of their own mapping, the page after them mapped without access: a
/// kernel that reads one value past the end faults here (SIGSEGV) every time, where past the
/// end of a `Vec` it would read a neighbour's memory and fault only when the allocation
/// happens to end at a page's end.
pub(crate) struct GuardedSlice {
    mapping: *mut libc::c_void,
    mapping_len: usize,
    values: *mut f32,
    len: usize,
}

impl GuardedSlice {
    pub(crate) fn new(values: &[f32]) -> GuardedSlice {
        // SAFETY: a fresh private anonymous mapping, checked; the guard page is its last page;
        // `values` are copied into the pages before it, ending where the guard page starts.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
            let data_pages = (values.len() * 4).div_ceil(page).max(1);
            let mapping_len = (data_pages + 1) * page;
            let mapping = libc::mmap(
                std::ptr::null_mut(),
                mapping_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(mapping, libc::MAP_FAILED, "mmap");
            let guard = mapping.cast::<u8>().add(data_pages * page);
            assert_eq!(libc::mprotect(guard.cast(), page, libc::PROT_NONE), 0);
            let start = guard.cast::<f32>().sub(values.len());
            std::ptr::copy_nonoverlapping(values.as_ptr(), start, values.len());
            GuardedSlice {
                mapping,
                mapping_len,
                values: start,
                len: values.len(),
            }
        }
    }
}

impl std::ops::Deref for GuardedSlice {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        // SAFETY: `len` values written by `new`, mapped until `drop`.
        unsafe { std::slice::from_raw_parts(self.values, self.len) }
    }
}

impl Drop for GuardedSlice {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, unmapped once.
        unsafe { libc::munmap(self.mapping, self.mapping_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::GuardedSlice;

    /// The values are those given and end where the inaccessible page starts.
    #[test]
    fn guarded_values_end_at_the_guard_page() {
        let values = super::values(1000, 7);
        let guarded = GuardedSlice::new(&values);
        assert_eq!(&guarded[..], &values[..]);
        let end = guarded.as_ptr_range().end as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        assert_eq!(end % page, 0, "ends at a page boundary");
    }
}
