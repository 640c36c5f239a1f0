//! Sparse execution in the CPU plan: pruned weights stored as CSR (compressed sparse rows) and
//! multiplied by the dense activations (SpMM), so the work scales with the non-zeros.
//!
//! `out[r, j] = Σ_{k ∈ row r} w[r, k] · b[k, j]`: for each output row the kernel keeps a tile of
//! 128 (or, for what is left, 16) output columns in registers and, for each non-zero of the row, adds the broadcast weight
//! times one contiguous 128-value row segment of `b` (the im2col matrix of a convolution, the
//! transposed batch of a linear layer). Each non-zero costs one load and one FMA per 16 lanes,
//! against the register-blocked dense GEMM's better reuse, so sparse wins only above a measured
//! sparsity ([`SPARSE_MAX_DENSITY`], from `cargo xtask bench prune`). Compiled for AVX-512 and
//! AVX2 and chosen at run time. Stride-1 convolutions skip the im2col matrix and read the padded
//! input directly (see [`ConvSparse`]).

use shrink_core::graph::Op;
use shrink_core::runtime::{ConvGeometry, Kernel, KernelRegistry, LayerView, RunContext};

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

mod simd {
    //! The one place shrink-prune uses `unsafe`: calling the AVX-512 and AVX2 compilations of
    //! the kernel, which is sound only after the CPU was checked to have those features.
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

/// `n` rounded up to whole narrow tiles: buffers padded so, with their extra columns ignored,
/// run on fixed-width tiles only.
fn padded(n: usize) -> usize {
    n.div_ceil(16) * 16
}

fn epilogue(row: &mut [f32], bias: f32, relu: bool) {
    if relu {
        row.iter_mut().for_each(|v| *v = (*v + bias).max(0.0));
    } else {
        row.iter_mut().for_each(|v| *v += bias);
    }
}

thread_local! {
    /// Per-thread work buffers (im2col columns, transposed inputs, outputs) reused across calls.
    static BUFFERS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Columns of the im2col matrix worth filling before one SpMM: small feature maps of several
/// images share a call, so the 128-wide tiles are full.
const COLUMNS: usize = 512;

/// A convolution (groups = 1) on CSR weights. Stride-1, undilated convolutions run directly on
/// the zero-padded input: a filter's non-zero `(c, ky, kx)` reads the input plane `c` shifted by
/// `(ky, kx)`, a contiguous row segment per output row, so no im2col matrix (nine times the
/// input, for 3×3) is written or read. Other convolutions unroll the input (im2col) and call
/// [`spmm`].
#[derive(Debug)]
pub struct ConvSparse {
    weight: Csr,
    bias: Vec<f32>,
    relu: bool,
    geometry: ConvGeometry,
    /// Direct path: each entry's offset in the padded input, `c·hp·wp + ky·wp + kx`.
    offsets: Option<Vec<u32>>,
}

impl ConvSparse {
    /// The sparse kernel of a convolution view, or `None` for grouped convolutions.
    pub fn new(view: &LayerView<'_>) -> Option<Self> {
        let Op::Conv2d { groups: 1, out_channels, .. } = *view.op else { return None };
        let geometry = ConvGeometry::of(view)?;
        let k = view.weight.len() / out_channels;
        let weight = Csr::from_dense(view.weight, out_channels, k);
        let direct = geometry.stride == [1, 1] && geometry.dilation == [1, 1];
        let offsets = direct.then(|| {
            let (_, hp, wp) = padded_dims(&geometry);
            let [kh, kw] = geometry.kernel;
            weight
                .col
                .iter()
                .map(|&k| {
                    let (c, ky, kx) = (k as usize / (kh * kw), k as usize / kw % kh, k as usize % kw);
                    (c * hp * wp + ky * wp + kx) as u32
                })
                .collect()
        });
        Some(Self {
            weight,
            bias: view.bias.map(|b| b.to_vec()).unwrap_or_else(|| vec![0.0; out_channels]),
            relu: view.relu,
            geometry,
            offsets,
        })
    }

    /// One image by the direct path: pad it into `x`, accumulate into `out`.
    fn direct(&self, offsets: &[u32], image: &[f32], x: &mut Vec<f32>, out: &mut [f32]) {
        let (c, h, w) = self.geometry.input;
        let (_, oh, ow) = self.geometry.output;
        let (_, hp, wp) = padded_dims(&self.geometry);
        let [ph, pw] = self.geometry.padding;
        // Slack past the planes: edge tiles read whole tiles (their extra lanes are dropped).
        x.clear();
        x.resize(c * hp * wp + (simd::ROWS + 1) * wp + 16, 0.0);
        for ch in 0..c {
            for y in 0..h {
                let dst = (ch * hp + y + ph) * wp + pw;
                x[dst..dst + w].copy_from_slice(&image[(ch * h + y) * w..][..w]);
            }
        }
        simd::conv_direct(&self.weight, offsets, x, wp, oh, ow, out);
        let n = oh * ow;
        for (ch, row) in out.chunks_exact_mut(n).enumerate() {
            epilogue(row, self.bias[ch], self.relu);
        }
    }
}

/// `(channels, height, width)` of a convolution's zero-padded input.
fn padded_dims(g: &ConvGeometry) -> (usize, usize, usize) {
    let (c, h, w) = g.input;
    (c, h + 2 * g.padding[0], w + 2 * g.padding[1])
}

impl Kernel for ConvSparse {
    fn label(&self) -> String {
        format!(
            "conv2d/f32-{}-spmm-csr ({:.0} % non-zero){}",
            if self.offsets.is_some() { "direct" } else { "im2col" },
            self.weight.density() * 100.0,
            if self.relu { "+relu" } else { "" }
        )
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], _ctx: &RunContext) {
        let (cin, h, w) = self.geometry.input;
        let (cout, oh, ow) = self.geometry.output;
        let (n, k) = (oh * ow, self.weight.cols);
        let (in_len, out_len) = (cin * h * w, cout * n);
        if let Some(offsets) = &self.offsets {
            BUFFERS.with(|buffers| {
                let (x, _) = &mut *buffers.borrow_mut();
                for i in 0..batch {
                    let image = &inputs[0][i * in_len..(i + 1) * in_len];
                    self.direct(offsets, image, x, &mut output[i * out_len..(i + 1) * out_len]);
                }
            });
            return;
        }
        let group = (COLUMNS / n.max(1)).clamp(1, batch.max(1));
        BUFFERS.with(|buffers| {
            let (col, acc) = &mut *buffers.borrow_mut();
            col.resize(k * padded(group * n), 0.0);
            acc.resize(cout * padded(group * n), 0.0);
            let mut first = 0;
            while first < batch {
                let g = group.min(batch - first);
                let ld = padded(g * n);
                for i in 0..g {
                    let image = &inputs[0][(first + i) * in_len..(first + i + 1) * in_len];
                    self.geometry.im2col(image, 0, cin, &mut col[i * n..], ld);
                }
                spmm(&self.weight, col, ld, ld, acc, ld);
                for i in 0..g {
                    let out = &mut output[(first + i) * out_len..(first + i + 1) * out_len];
                    for (c, row) in out.chunks_exact_mut(n).enumerate() {
                        row.copy_from_slice(&acc[c * ld + i * n..][..n]);
                        epilogue(row, self.bias[c], self.relu);
                    }
                }
                first += g;
            }
        });
    }
}

/// A linear layer on CSR weights: the batch transposed to `[in, batch]`, then [`spmm`].
#[derive(Debug)]
pub struct LinearSparse {
    weight: Csr,
    bias: Vec<f32>,
    relu: bool,
}

impl LinearSparse {
    /// The sparse kernel of a linear view.
    pub fn new(view: &LayerView<'_>) -> Option<Self> {
        let Op::Linear { in_features, out_features, .. } = *view.op else { return None };
        Some(Self {
            weight: Csr::from_dense(view.weight, out_features, in_features),
            bias: view.bias.map(|b| b.to_vec()).unwrap_or_else(|| vec![0.0; out_features]),
            relu: view.relu,
        })
    }
}

impl Kernel for LinearSparse {
    fn label(&self) -> String {
        format!(
            "linear/f32-spmm-csr ({:.0} % non-zero){}",
            self.weight.density() * 100.0,
            if self.relu { "+relu" } else { "" }
        )
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], _ctx: &RunContext) {
        let (k, o) = (self.weight.cols, self.weight.rows);
        // One image: a sparse matrix-vector product; more: the batch as padded columns.
        let ld = if batch == 1 { 1 } else { padded(batch) };
        BUFFERS.with(|buffers| {
            let (xt, acc) = &mut *buffers.borrow_mut();
            xt.resize(k * ld, 0.0);
            acc.resize(o * ld, 0.0);
            for (b, x) in inputs[0].chunks_exact(k).take(batch).enumerate() {
                for (i, &v) in x.iter().enumerate() {
                    xt[i * ld + b] = v;
                }
            }
            spmm(&self.weight, xt, ld, ld, acc, ld);
            for (b, y) in output.chunks_exact_mut(o).take(batch).enumerate() {
                for (j, v) in y.iter_mut().enumerate() {
                    let x = acc[j * ld + b] + self.bias[j];
                    *v = if self.relu { x.max(0.0) } else { x };
                }
            }
        });
    }
}

/// Adds builders that run every conv (groups = 1) and linear layer whose weights are at most
/// `max_density` non-zero on the sparse kernels; denser layers keep the dense defaults.
pub fn register_sparse_kernels(registry: &mut KernelRegistry, max_density: f64) {
    registry.register("f32/sparse-csr", move |view: &LayerView<'_>| {
        let density = view.weight.iter().filter(|v| **v != 0.0).count() as f64 / view.weight.len().max(1) as f64;
        if density > max_density {
            return None;
        }
        match view.op {
            Op::Conv2d { .. } => ConvSparse::new(view).map(|k| Box::new(k) as Box<dyn Kernel>),
            Op::Linear { .. } => LinearSparse::new(view).map(|k| Box::new(k) as Box<dyn Kernel>),
            _ => None,
        }
    });
}

/// A registry whose sparse-enough layers run on the sparse kernels (threshold
/// [`SPARSE_MAX_DENSITY`]).
pub fn sparse_registry() -> KernelRegistry {
    let mut r = KernelRegistry::default();
    register_sparse_kernels(&mut r, SPARSE_MAX_DENSITY);
    r
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
