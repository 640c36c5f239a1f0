//! Sparse f32 kernels: pruned weights stored as CSR (compressed sparse rows) and multiplied by
//! dense activations (SpMM), so the work scales with the non-zeros.
//!
//! `out[r, j] = Σ_{k ∈ row r} w[r, k] · b[k, j]`: for each output row the kernel keeps a tile of
//! 128 (or, for what is left, 16) output columns in registers and, for each non-zero of the row,
//! adds the broadcast weight times one contiguous 128-value row segment of `b` (the im2col matrix
//! of a convolution, the transposed batch of a linear layer). Each non-zero costs one load and one
//! FMA per 16 lanes, against the register-blocked dense GEMM's better reuse, so sparse wins only
//! above a measured sparsity ([`SPARSE_MAX_DENSITY`], from `cargo xtask bench prune`). Compiled
//! for AVX-512 and AVX2 and chosen at run time. [`conv_direct`] runs a stride-1 convolution on
//! the padded input directly, without the im2col matrix.

/// Layers at or below this density (fraction of non-zero weights) run on the sparse kernels.
/// Measured by `cargo xtask bench prune` on this project's CPU (AMD EPYC, AVX-512, one thread):
/// against the dense GEMM the sparse kernel is 0.72–1.00× at 50 % sparsity and 1.28× at 70 %
/// (512³ and 64×576×1024), so the crossover lies between; 35 % non-zero sits safely past it.
pub const SPARSE_MAX_DENSITY: f64 = 0.35;

/// A matrix in compressed-sparse-row form.
#[derive(Clone, Debug, PartialEq)]
pub struct Csr {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row `r`'s entries are `row_ptr[r]..row_ptr[r + 1]`.
    pub row_ptr: Vec<u32>,
    /// Column of each entry.
    pub col: Vec<u32>,
    /// Value of each entry.
    pub val: Vec<f32>,
}

impl Csr {
    /// The non-zeros of a row-major `rows × cols` matrix.
    ///
    /// # Panics
    /// If `dense` does not hold `rows · cols` values, or has 2³² values or more.
    pub fn from_dense(dense: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(dense.len(), rows * cols, "dense matrix size");
        assert!(dense.len() < u32::MAX as usize, "CSR indices are 32-bit");
        let mut row_ptr = Vec::with_capacity(rows + 1);
        let (mut col, mut val) = (Vec::new(), Vec::new());
        row_ptr.push(0);
        for r in 0..rows {
            for (c, &v) in dense[r * cols..(r + 1) * cols].iter().enumerate() {
                if v != 0.0 {
                    col.push(c as u32);
                    val.push(v);
                }
            }
            row_ptr.push(col.len() as u32);
        }
        Self { rows, cols, row_ptr, col, val }
    }

    /// Stored entries.
    pub fn nnz(&self) -> usize {
        self.val.len()
    }

    /// Fraction of entries stored.
    pub fn density(&self) -> f64 {
        self.nnz() as f64 / (self.rows * self.cols).max(1) as f64
    }
}

/// `out[r · ldo + j] = Σ a[r, k] · b[k · ldb + j]` for `j < n`: the sparse × dense product.
///
/// # Panics
/// If a slice is too short for the shapes.
pub fn spmm(a: &Csr, b: &[f32], ldb: usize, n: usize, out: &mut [f32], ldo: usize) {
    simd::spmm(a, b, ldb, n, out, ldo)
}

/// Rows of output pixels one pass of [`conv_direct`] keeps in registers: the padded input needs
/// `(CONV_ROWS + 1) · wp + 16` values of slack past its end.
pub const CONV_ROWS: usize = simd::ROWS;

/// A stride-1 convolution on CSR weights `a` (`[out channels, c·kh·kw]`) straight from the
/// zero-padded input `x` (row length `wp`): entry `i` reads `x` at `offsets[i]` (its
/// `c·hp·wp + ky·wp + kx`) shifted to each output pixel; `out` is `[a.rows, oh·ow]`.
///
/// # Panics
/// If `x` lacks the slack [`CONV_ROWS`] asks for, or `out` is too short.
pub fn conv_direct(a: &Csr, offsets: &[u32], x: &[f32], wp: usize, oh: usize, ow: usize, out: &mut [f32]) {
    simd::conv_direct(a, offsets, x, wp, oh, ow, out)
}

mod simd {
    //! `unsafe` here only calls the AVX-512 and AVX2 compilations of the kernels, which is sound
    //! only after the CPU was checked to have those features.
    #![allow(unsafe_code)]

    use super::Csr;

    pub(super) fn spmm(a: &Csr, b: &[f32], ldb: usize, n: usize, out: &mut [f32], ldo: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX-512F and FMA, checked just above.
                return unsafe { spmm_avx512(a, b, ldb, n, out, ldo) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA, checked just above.
                return unsafe { spmm_avx2(a, b, ldb, n, out, ldo) };
            }
        }
        spmm_portable::<false>(a, b, ldb, n, out, ldo)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    fn spmm_avx512(a: &Csr, b: &[f32], ldb: usize, n: usize, out: &mut [f32], ldo: usize) {
        spmm_portable::<true>(a, b, ldb, n, out, ldo)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn spmm_avx2(a: &Csr, b: &[f32], ldb: usize, n: usize, out: &mut [f32], ldo: usize) {
        spmm_portable::<true>(a, b, ldb, n, out, ldo)
    }

    /// Rows of output pixels one pass of the direct convolution keeps in registers.
    pub(super) const ROWS: usize = 4;

    pub(super) fn conv_direct(a: &Csr, offsets: &[u32], x: &[f32], wp: usize, oh: usize, ow: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX-512F and FMA, checked just above.
                return unsafe { conv_direct_avx512(a, offsets, x, wp, oh, ow, out) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA, checked just above.
                return unsafe { conv_direct_avx2(a, offsets, x, wp, oh, ow, out) };
            }
        }
        conv_direct_portable::<false>(a, offsets, x, wp, oh, ow, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    fn conv_direct_avx512(a: &Csr, offsets: &[u32], x: &[f32], wp: usize, oh: usize, ow: usize, out: &mut [f32]) {
        conv_direct_portable::<true>(a, offsets, x, wp, oh, ow, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn conv_direct_avx2(a: &Csr, offsets: &[u32], x: &[f32], wp: usize, oh: usize, ow: usize, out: &mut [f32]) {
        conv_direct_portable::<true>(a, offsets, x, wp, oh, ow, out)
    }

    /// `acc + w · x`, fused (one rounding) where the compilation has FMA, else multiply and add:
    /// Rust never fuses on its own, and `mul_add` without FMA hardware is a slow library call.
    #[inline(always)]
    fn madd<const FMA: bool>(acc: f32, w: f32, x: f32) -> f32 {
        if FMA { w.mul_add(x, acc) } else { acc + w * x }
    }

    #[inline(always)]
    fn conv_direct_portable<const FMA: bool>(
        a: &Csr,
        offsets: &[u32],
        x: &[f32],
        wp: usize,
        oh: usize,
        ow: usize,
        out: &mut [f32],
    ) {
        if ow >= 16 {
            conv_tiles::<16, FMA>(a, offsets, x, wp, oh, ow, out)
        } else {
            conv_tiles::<8, FMA>(a, offsets, x, wp, oh, ow, out)
        }
    }

    /// Output tiles of `ROWS × T` pixels: each non-zero `(c, ky, kx)` of a filter adds its weight
    /// times the padded input at `offsets[i]` shifted to the tile, one contiguous row segment per
    /// output row. Tiles at the right and bottom edges compute whole tiles from the buffer's
    /// slack and store only their valid part.
    #[inline(always)]
    fn conv_tiles<const T: usize, const FMA: bool>(
        a: &Csr,
        offsets: &[u32],
        x: &[f32],
        wp: usize,
        oh: usize,
        ow: usize,
        out: &mut [f32],
    ) {
        let n = oh * ow;
        for oy0 in (0..oh).step_by(ROWS) {
            let rows = ROWS.min(oh - oy0);
            for ox0 in (0..ow).step_by(T) {
                let cols = T.min(ow - ox0);
                let origin = oy0 * wp + ox0;
                for r in 0..a.rows {
                    let (s, e) = (a.row_ptr[r] as usize, a.row_ptr[r + 1] as usize);
                    let mut acc = [[0.0f32; T]; ROWS];
                    for (&off, &w) in offsets[s..e].iter().zip(&a.val[s..e]) {
                        let base = off as usize + origin;
                        for (rr, acc_row) in acc.iter_mut().enumerate() {
                            let src: &[f32; T] = x[base + rr * wp..][..T].try_into().expect("padded input");
                            for j in 0..T {
                                acc_row[j] = madd::<FMA>(acc_row[j], w, src[j]);
                            }
                        }
                    }
                    for (rr, acc_row) in acc.iter().enumerate().take(rows) {
                        out[r * n + (oy0 + rr) * ow + ox0..][..cols].copy_from_slice(&acc_row[..cols]);
                    }
                }
            }
        }
    }

    /// Output columns kept in registers per pass over a row's non-zeros: wide tiles first, then
    /// narrow ones for what is left (a batch of 8, a 7×7 feature map), then a plain tail.
    const WIDE: usize = 128;
    const NARROW: usize = 16;

    #[inline(always)]
    fn tile<const T: usize, const FMA: bool>(a: &Csr, b: &[f32], ldb: usize, out: &mut [f32], ldo: usize, j0: usize) {
        for r in 0..a.rows {
            let (s, e) = (a.row_ptr[r] as usize, a.row_ptr[r + 1] as usize);
            let mut acc = [0.0f32; T];
            for (&k, &w) in a.col[s..e].iter().zip(&a.val[s..e]) {
                let src: &[f32; T] = b[k as usize * ldb + j0..][..T].try_into().expect("tile");
                for j in 0..T {
                    acc[j] = madd::<FMA>(acc[j], w, src[j]);
                }
            }
            out[r * ldo + j0..][..T].copy_from_slice(&acc);
        }
    }

    #[inline(always)]
    fn spmm_portable<const FMA: bool>(a: &Csr, b: &[f32], ldb: usize, n: usize, out: &mut [f32], ldo: usize) {
        if n == 1 {
            for r in 0..a.rows {
                let (s, e) = (a.row_ptr[r] as usize, a.row_ptr[r + 1] as usize);
                out[r * ldo] = a.col[s..e].iter().zip(&a.val[s..e]).map(|(&k, &w)| w * b[k as usize * ldb]).sum();
            }
            return;
        }
        let mut j0 = 0;
        while j0 + WIDE <= n {
            tile::<WIDE, FMA>(a, b, ldb, out, ldo, j0);
            j0 += WIDE;
        }
        while j0 + NARROW <= n {
            tile::<NARROW, FMA>(a, b, ldb, out, ldo, j0);
            j0 += NARROW;
        }
        if j0 < n {
            let width = n - j0;
            for r in 0..a.rows {
                let (s, e) = (a.row_ptr[r] as usize, a.row_ptr[r + 1] as usize);
                let mut acc = [0.0f32; NARROW];
                for (&k, &w) in a.col[s..e].iter().zip(&a.val[s..e]) {
                    let src = &b[k as usize * ldb + j0..][..width];
                    for (x, y) in acc[..width].iter_mut().zip(src) {
                        *x = madd::<FMA>(*x, w, *y);
                    }
                }
                out[r * ldo + j0..][..width].copy_from_slice(&acc[..width]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense_mm(a: &[f32], rows: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; rows * n];
        for r in 0..rows {
            for kk in 0..k {
                for j in 0..n {
                    out[r * n + j] += a[r * k + kk] * b[kk * n + j];
                }
            }
        }
        out
    }

    #[test]
    fn spmm_equals_the_dense_product_for_every_tile_shape() {
        for (rows, k, n) in [(5, 7, 1), (3, 9, 130), (8, 40, 256), (2, 3, 127)] {
            let a: Vec<f32> = (0..rows * k).map(|i| if i % 3 == 0 { (i as f32 * 0.37).sin() } else { 0.0 }).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
            let csr = Csr::from_dense(&a, rows, k);
            assert_eq!(csr.nnz(), a.iter().filter(|v| **v != 0.0).count());
            let mut out = vec![0.0; rows * n];
            spmm(&csr, &b, n, n, &mut out, n);
            for (x, y) in out.iter().zip(dense_mm(&a, rows, k, &b, n)) {
                assert!((x - y).abs() < 1e-4, "{rows}×{k}×{n}: {x} vs {y}");
            }
        }
    }
}
