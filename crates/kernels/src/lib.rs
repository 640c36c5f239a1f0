//! shrink-kernels: the compute kernels of shrink's CPU plan, with no burn (and no other shrink
//! crate) below them, as tract keeps `tract-linalg` below `tract-core`. It builds in seconds and
//! cross-compiles on its own; shrink-core re-exports it as `shrink_core::kernels`, and the plan's
//! layers (core), the integer kernels (shrink-quant) and the sparse ones (shrink-prune) call it.
//!
//! - [`activation`]: the activations an epilogue applies after a layer (clip, hard-swish).
//! - [`conv`]: direct f32 convolution (no im2col) with bias, ReLU and a residual add fused.
//! - [`depthwise`]: depthwise convolution (one filter per channel), f32 on planes or through a
//!   channels-last copy for small maps, and u8 × i8 channels-last for the integer plans.
//! - [`transpose`]: layout changes between channel planes and channels-last pixels.
//! - [`sgemm`]: row-major f32 GEMM (the `gemm` crate, faer's, behind a safe wrapper).
//! - [`int8`]: u8 × i8 → i32 GEMM and direct convolution, AVX-512 VNNI, (exact) AVX2 and NEON.
//! - [`sparse`]: CSR × dense f32 products and a direct sparse convolution, AVX-512 and AVX2.
//! - [`team`]: the threads one image's layers are split between (helpers that spin between
//!   layers instead of sleeping).
//! - [`isa`]: the run-time choice of code path, overridable with `SHRINK_ISA`.
//!
//! Every ISA path is tested against a plain scalar loop in this crate's tests; a test whose path
//! this CPU lacks says so, and fails instead where `SHRINK_REQUIRE_ISA` asks for it.
//!
//! ```
//! use shrink_kernels::sparse::{Csr, spmm};
//! let a = Csr::from_dense(&[1.0, 0.0, 0.0, 2.0], 2, 2);
//! let mut out = [0.0; 2];
//! spmm(&a, &[3.0, 4.0], 1, 1, &mut out, 1);
//! assert_eq!(out, [3.0, 8.0]);
//! ```
#![warn(missing_docs)]

pub mod activation;
pub mod conv;
pub mod depthwise;
pub mod int8;
pub mod isa;
pub mod sgemm;
pub mod sparse;
pub mod team;
pub mod transpose;

/// Writes `value` around an `h × w` image at `padding` in every plane of `planes` (each
/// `height × width` pixels of `lanes` values), leaving the image as it is: the border of the
/// padded layouts both the f32 ([`conv::BlockedImage`]) and the integer ([`int8::QuadImage`])
/// convolutions read.
///
/// # Panics
/// When the image does not fit the plane, or `planes` is not a whole number of planes.
fn fill_border<T: Copy>(
    planes: &mut [T],
    [height, width, lanes]: [usize; 3],
    [h, w]: [usize; 2],
    [ph, pw]: [usize; 2],
    value: T,
) {
    assert!(h + ph <= height && w + pw <= width, "the image does not fit");
    let plane_len = height * width * lanes;
    assert!(plane_len == 0 || planes.len().is_multiple_of(plane_len), "not whole planes");
    if plane_len == 0 {
        return;
    }
    for plane in planes.chunks_exact_mut(plane_len) {
        if h == 0 || w == 0 {
            plane.fill(value);
            continue;
        }
        // The rows above and the first row's left border, then each row's right border with
        // the next one's left border (one run), then the rest.
        plane[..(ph * width + pw) * lanes].fill(value);
        for y in ph..ph + h - 1 {
            let gap = &mut plane[(y * width + pw + w) * lanes..((y + 1) * width + pw) * lanes];
            if let Ok(gap) = <&mut [T; 8]>::try_from(&mut *gap) {
                // One pixel of padding around 4-channel quads (the usual integer case): one
                // store, no call to memset.
                *gap = [value; 8];
            } else {
                gap.fill(value);
            }
        }
        plane[((ph + h - 1) * width + pw + w) * lanes..].fill(value);
    }
}
