//! Integer kernels, u8 × i8 → i32: a GEMM and a direct convolution, on paths chosen at run
//! time ([`path`], overridable with `SHRINK_ISA`): AVX-512 VNNI and AVX2 on x86-64; on aarch64 the
//! GEMM (no direct convolution yet) on NEON with `usdot` (i8mm), `sdot` (dot product) or plain
//! NEON.
//!
//! **AVX-512 VNNI** (`vpdpbusd`) multiplies four consecutive u8 of an activation row by four i8
//! of a weight column and adds them to one i32 lane, so the activations need no packing at all:
//! each step of the GEMM broadcasts four bytes of a row straight from memory, and the direct
//! convolution reads 16 pixels × 4 channels as one register. Only the weights are packed, once.
//! (Why not rten-gemm here: it packs the activations on every call and sums their rows; for the
//! convolutions of small CNNs that costs more than the multiplication — measured: 68 GOP/s on
//! 8192×144×16, where the arithmetic alone runs at over 300.)
//!
//! **AVX2** has no such instruction. The usual substitute, `vpmaddubsw`, adds two u8 × i8
//! products into an i16 **with saturation**: 255·127 + 255·127 = 64,770 does not fit, so results
//! silently differ from the exact sum whenever two large products meet (rten-gemm's AVX2 kernel
//! and ONNX Runtime's U8S8 path accept that; the usual fix, 7-bit weights, changes the model).
//! This path is exact instead: the four bytes of each word are split into their even and odd
//! bytes as i16 pairs (`a & 0x00FF00FF` and `a >> 8` per 16-bit half: one AND and one shift per
//! activation vector), the weights are packed as the matching i16 pairs, and `vpmaddwd` adds two
//! i16 products into an i32 — at most 2 · 255 · 128 = 65,280, far from any limit. It costs two
//! multiply-adds per four bytes where VNNI needs one, and it gives the same bits as VNNI and the
//! scalar reference (tested on every path).
//!
//! **NEON** takes the VNNI layout as it is: one step of a panel (16 columns × 4 depths) is four
//! 128-bit registers of 4 columns × 4 bytes, and a row's four bytes broadcast to every lane are
//! what `usdot` (FEAT_I8MM: u8 × i8, four products per i32 lane) multiplies them with. `sdot`
//! (FEAT_DotProd) multiplies i8 × i8 only, so the activations are offset by −128 (`a ^ 0x80`)
//! and `128 · Σ_k w[k, n]` is added back — exact in wrapping i32, as every path sums. Without
//! either, plain NEON widens the offset products to i16 (`smull`; |−128 · −128| = 16,384 fits)
//! and sums them in pairs into i32 (`saddlp`, `addp`). Four rows share each step's weight
//! registers. These paths are checked under qemu-aarch64 in CI (bit-exact against the scalar
//! reference); their speed is not measured yet: no ARM machine is at hand.
//!
//! Every kernel computes `Σ_k a[m, k] · w[k, n]`, without zero points; the caller subtracts
//! `zero_point(a) · Σ_k w[k, n]` ([`PackedWeights::column_sums`]), which is exact when the
//! activations are padded with their zero point (as the convolution does).
#![allow(unsafe_code)]

use crate::activation::Activation;
use crate::isa::{self, Isa};
use crate::team::Team;

/// Output channels per VNNI panel: one 512-bit register of i32.
const PANEL: usize = 16;
/// Output channels per AVX2 panel: one 256-bit register of i32.
const PANEL_AVX2: usize = 8;
/// Depths per `vpdpbusd` lane (and per pair of `vpmaddwd` on AVX2).
const DEPTH_STEP: usize = 4;

/// The integer path the kernels take under the selected ISA ([`isa::selected`] and
/// [`Isa::int8_path`]): [`Isa::Avx512Vnni`], [`Isa::Avx2`] or [`Isa::Portable`] (a plain exact
/// loop: the GEMM only, no direct convolution).
pub fn path() -> Isa {
    isa::selected().int8_path()
}

/// Whether [`gemm()`] runs on `isa` on this CPU ([`Isa::Avx512Vnni`], [`Isa::Avx2`] or
/// [`Isa::Portable`]).
pub fn supports(isa: Isa) -> bool {
    has_gemm(isa) && isa.available()
}

/// The paths [`gemm()`] has code for (on their architecture).
fn has_gemm(isa: Isa) -> bool {
    matches!(isa, Isa::Avx512Vnni | Isa::Avx2 | Isa::Portable | Isa::Neon | Isa::NeonDot | Isa::NeonI8mm)
}

/// The integer paths a test must check on this CPU: each one it has, the others skipped with a
/// message — or the test fails where `SHRINK_REQUIRE_ISA` names one ([`Isa::available_for_test`]).
pub fn paths_for_test(test: &str) -> Vec<Isa> {
    let paths = if cfg!(target_arch = "aarch64") {
        [Isa::Portable, Isa::Neon, Isa::NeonDot, Isa::NeonI8mm].as_slice()
    } else {
        [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni].as_slice()
    };
    paths.iter().copied().filter(|i| i.available_for_test(test)).collect()
}

/// Whether the selected integer path has the direct convolution ([`DirectConv::runs_on`]); where
/// it has not, the test says so on stderr — and fails instead where `SHRINK_REQUIRE_ISA` names
/// an integer path this CPU lacks ([`paths_for_test`]).
pub fn direct_for_test(test: &str) -> bool {
    if DirectConv::runs_on(path()) {
        return true;
    }
    paths_for_test(test);
    eprintln!("{test}: no direct integer convolution under {:?}: that part is skipped", isa::selected());
    false
}

/// Weights `w [k, n]` (i8) packed for [`gemm()`] on one path. AVX-512 VNNI (and portable, NEON):
/// panels of 16 columns, each `k/4` blocks of 16 columns × 4 depths (one word per column: its four bytes).
/// AVX2: panels of 8 columns, each `k/4` blocks of two rows of 8 words — the i16 pairs of depths
/// 0 and 2, then of depths 1 and 3. Depths and columns are padded with zeros.
#[derive(Clone, Debug)]
pub struct PackedWeights {
    words: Vec<i32>,
    /// Depth, padded to a multiple of 4.
    depth: usize,
    columns: usize,
    column_sums: Vec<i32>,
    isa: Isa,
}

/// The i16 pairs `(b0, b2)` and `(b1, b3)` of four i8 `b`, as the AVX2 path multiplies them.
fn i16_pairs(b: [i8; 4]) -> [i32; 2] {
    let pair = |lo: i8, hi: i8| (lo as i16 as u16 as u32 | (hi as i16 as u16 as u32) << 16) as i32;
    [pair(b[0], b[2]), pair(b[1], b[3])]
}

impl PackedWeights {
    /// Packs `w`, row-major `[k, n]`, for the selected integer path ([`path`]).
    pub fn new(w: &[i8], k: usize, n: usize) -> Self {
        Self::with_isa(w, k, n, path())
    }

    /// Packs `w`, row-major `[k, n]`, for path `isa` (see [`supports`]; the CPU need not have it
    /// until [`gemm()`] runs). The portable and NEON paths use the VNNI layout.
    ///
    /// # Panics
    /// On a path [`gemm()`] does not have, or when `w` is not `[k, n]`.
    pub fn with_isa(w: &[i8], k: usize, n: usize, isa: Isa) -> Self {
        assert!(has_gemm(isa), "no integer GEMM for {isa:?}");
        assert_eq!(w.len(), k * n, "weights must be [k, n]");
        let depth = k.next_multiple_of(DEPTH_STEP);
        let steps = depth / DEPTH_STEP;
        let panel = if isa == Isa::Avx2 { PANEL_AVX2 } else { PANEL };
        let panels = n.div_ceil(panel);
        let mut words = vec![0i32; panels * steps * panel * if isa == Isa::Avx2 { 2 } else { 1 }];
        for p in 0..panels {
            for s in 0..steps {
                for c in 0..panel.min(n - p * panel) {
                    let col = p * panel + c;
                    let bytes: [i8; 4] = std::array::from_fn(|d| {
                        let kk = s * DEPTH_STEP + d;
                        if kk < k { w[kk * n + col] } else { 0 }
                    });
                    if isa == Isa::Avx2 {
                        let [even, odd] = i16_pairs(bytes);
                        let at = ((p * steps + s) * 2) * panel + c;
                        words[at] = even;
                        words[at + panel] = odd;
                    } else {
                        words[(p * steps + s) * panel + c] = i32::from_le_bytes(bytes.map(|b| b as u8));
                    }
                }
            }
        }
        let column_sums = (0..n).map(|col| (0..k).map(|kk| w[kk * n + col] as i32).sum()).collect();
        Self { words, depth, columns: n, column_sums, isa }
    }

    /// The path the weights are packed for.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Row length the activations must have (at least): the depth rounded up to 4. The bytes
    /// past the real depth meet zero weights, so their values do not matter.
    pub fn padded_depth(&self) -> usize {
        self.depth
    }

    /// Columns of the output rows [`gemm()`] writes: `n` rounded up to 16 (on either path).
    pub fn padded_columns(&self) -> usize {
        self.columns.next_multiple_of(PANEL)
    }

    /// `Σ_k w[k, n]` per column, to remove the activations' zero point from the result.
    pub fn column_sums(&self) -> &[i32] {
        &self.column_sums
    }
}

/// `c[m, :] = Σ_k a[m, k] · w[k, :]` for `m < rows`, exactly: `a` rows are `lda` bytes apart (at
/// least [`PackedWeights::padded_depth`]), `c` rows hold [`PackedWeights::padded_columns`] values
/// (columns past `n` are left as they were or overwritten).
///
/// # Panics
/// When the CPU lacks the path the weights were packed for, or a slice is too short.
pub fn gemm(a: &[u8], lda: usize, rows: usize, w: &PackedWeights, c: &mut [i32]) {
    let ldc = w.padded_columns();
    assert!(w.isa.available(), "this CPU lacks {:?}", w.isa);
    assert!(lda >= w.depth && (rows == 0 || a.len() >= (rows - 1) * lda + w.depth), "a is too short");
    assert!(c.len() >= rows * ldc, "c is too short");
    match w.isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the path's features (checked above) and the slices hold what the
        // kernel reads and writes (checked above; the kernel reads rows below `rows` only).
        Isa::Avx512Vnni => unsafe { x86::gemm(a, lda, rows, w, c, ldc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::gemm_avx2(a, lda, rows, w, c, ldc) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::NeonI8mm => unsafe { neon::gemm_i8mm(a, lda, rows, w, c, ldc) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::NeonDot => unsafe { neon::gemm_dot(a, lda, rows, w, c, ldc) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon => unsafe { neon::gemm_plain(a, lda, rows, w, c, ldc) },
        _ => gemm_portable(a, lda, rows, w, c, ldc),
    }
}

/// The portable path of [`gemm()`]: a plain loop over the VNNI layout, wrapping i32 sums (as the
/// vector lanes wrap).
fn gemm_portable(a: &[u8], lda: usize, rows: usize, w: &PackedWeights, c: &mut [i32], ldc: usize) {
    let steps = w.depth / DEPTH_STEP;
    let panel_len = steps * PANEL;
    for r in 0..rows {
        let row = &a[r * lda..][..w.depth];
        for (p, panel) in w.words.chunks_exact(panel_len).enumerate() {
            let mut acc = [0i32; PANEL];
            for (x, words) in row.chunks_exact(DEPTH_STEP).zip(panel.chunks_exact(PANEL)) {
                for (acc, &word) in acc.iter_mut().zip(words) {
                    let b = word.to_le_bytes();
                    for d in 0..DEPTH_STEP {
                        *acc = acc.wrapping_add(x[d] as i32 * b[d] as i8 as i32);
                    }
                }
            }
            c[r * ldc + p * PANEL..][..PANEL].copy_from_slice(&acc);
        }
    }
}

/// The NEON paths of [`gemm()`] (see the module's documentation).
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{DEPTH_STEP, PANEL, PackedWeights};

    /// How four u8 × i8 products are added into each i32 lane.
    const PLAIN: u8 = 0;
    const SDOT: u8 = 1;
    const USDOT: u8 = 2;
    /// Rows computed together: 4 × 4 accumulator registers share each step's 4 weight registers.
    const ROWS: usize = 4;

    /// `acc + Σ_d x[4j+d] · w[4j+d]` per lane `j`; `x` is offset to i8 (`a ^ 0x80`) unless
    /// `DOT` is [`USDOT`].
    #[inline(always)]
    unsafe fn dot<const DOT: u8>(mut acc: int32x4_t, x: uint8x16_t, w: int8x16_t) -> int32x4_t {
        // SAFETY: in every arm, the callers' target features include the instruction's.
        unsafe {
            match DOT {
                USDOT => {
                    std::arch::asm!("usdot {0:v}.4s, {1:v}.16b, {2:v}.16b", inout(vreg) acc, in(vreg) x, in(vreg) w,
                        options(pure, nomem, nostack, preserves_flags));
                    acc
                }
                SDOT => {
                    std::arch::asm!("sdot {0:v}.4s, {1:v}.16b, {2:v}.16b", inout(vreg) acc, in(vreg) x, in(vreg) w,
                        options(pure, nomem, nostack, preserves_flags));
                    acc
                }
                _ => {
                    let x = vreinterpretq_s8_u8(x);
                    let low = vmull_s8(vget_low_s8(x), vget_low_s8(w));
                    let high = vmull_high_s8(x, w);
                    vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(low), vpaddlq_s16(high)))
                }
            }
        }
    }

    /// The first `R` rows of `a` (`lda` apart) times panel `panel` (its steps), plus `start`,
    /// into the first 16 values of `R` rows of `c` (`ldc` apart).
    #[inline(always)]
    unsafe fn block<const DOT: u8, const R: usize>(
        a: &[u8],
        lda: usize,
        panel: &[i32],
        start: &[int32x4_t; 4],
        c: &mut [i32],
        ldc: usize,
    ) {
        // SAFETY: the caller checked that the `R` rows of `a` hold the padded depth, that
        // `panel` holds every step and that `c` holds 16 values in each of the `R` rows.
        unsafe {
            let mut acc = [*start; R];
            let offset = vdupq_n_u8(if DOT == USDOT { 0 } else { 0x80 });
            for (s, words) in panel.chunks_exact(PANEL).enumerate() {
                let p = words.as_ptr().cast::<i8>();
                let w = [vld1q_s8(p), vld1q_s8(p.add(16)), vld1q_s8(p.add(32)), vld1q_s8(p.add(48))];
                for (i, acc) in acc.iter_mut().enumerate() {
                    let word = a.as_ptr().add(i * lda + s * DEPTH_STEP).cast::<u32>().read_unaligned();
                    let x = veorq_u8(vreinterpretq_u8_u32(vdupq_n_u32(word)), offset);
                    for j in 0..4 {
                        acc[j] = dot::<DOT>(acc[j], x, w[j]);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                let out = c.as_mut_ptr().add(i * ldc);
                for (j, v) in acc.iter().enumerate() {
                    vst1q_s32(out.add(4 * j), *v);
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn gemm<const DOT: u8>(a: &[u8], lda: usize, rows: usize, w: &PackedWeights, c: &mut [i32], ldc: usize) {
        let steps = w.depth / DEPTH_STEP;
        for (p, panel) in w.words.chunks_exact(steps * PANEL).enumerate() {
            // The offset activations lose 128 · Σ_k w[k, n]: it starts the sums.
            let mut start = [0i32; PANEL];
            if DOT != USDOT {
                for (o, col) in start.iter_mut().zip(p * PANEL..) {
                    *o = w.column_sums.get(col).map_or(0, |s| s.wrapping_mul(128));
                }
            }
            // SAFETY: `start` holds 16 i32; the slices were checked by `gemm()`.
            unsafe {
                let start = std::array::from_fn(|j| vld1q_s32(start.as_ptr().add(4 * j)));
                let mut r = 0;
                while r < rows {
                    let (a, c) = (&a[r * lda..], &mut c[r * ldc + p * PANEL..]);
                    if r + ROWS <= rows {
                        block::<DOT, ROWS>(a, lda, panel, &start, c, ldc);
                        r += ROWS;
                    } else {
                        block::<DOT, 1>(a, lda, panel, &start, c, ldc);
                        r += 1;
                    }
                }
            }
        }
    }

    /// [`gemm()`](super::gemm) by `usdot`.
    #[target_feature(enable = "neon,i8mm")]
    pub unsafe fn gemm_i8mm(a: &[u8], lda: usize, rows: usize, w: &PackedWeights, c: &mut [i32], ldc: usize) {
        // SAFETY: the caller checked the CPU and the slices.
        unsafe { gemm::<USDOT>(a, lda, rows, w, c, ldc) }
    }

    /// [`gemm()`](super::gemm) by `sdot`.
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn gemm_dot(a: &[u8], lda: usize, rows: usize, w: &PackedWeights, c: &mut [i32], ldc: usize) {
        // SAFETY: as above.
        unsafe { gemm::<SDOT>(a, lda, rows, w, c, ldc) }
    }

    /// [`gemm()`](super::gemm) by `smull` and pairwise adds.
    #[target_feature(enable = "neon")]
    pub unsafe fn gemm_plain(a: &[u8], lda: usize, rows: usize, w: &PackedWeights, c: &mut [i32], ldc: usize) {
        // SAFETY: as above.
        unsafe { gemm::<PLAIN>(a, lda, rows, w, c, ldc) }
    }
}

/// A convolution (stride 1 or 2) computed directly on the quantized image, without unrolling
/// patches: the image is stored as `[c/4][h][w][4]` (four channels interleaved, padded with its
/// zero point), so consecutive output pixels of one kernel tap read contiguous words — 16 pixels
/// are one AVX-512 register, exactly what `vpdpbusd` takes, 8 one AVX2 register — and the weights
/// of 4 channels × 1 tap are one broadcast word (two i16-pair words on AVX2). The accumulators of
/// a tile hold 8 output channels × 16 or 32 pixels (AVX2: 4 channels × 16 pixels), so the
/// epilogue (zero-point correction, scale, bias, ReLU) writes channel-major f32 rows with no
/// transposition, or the next layer's image.
///
/// Rows are computed on a virtual output grid ([`DirectConv::grid`]): the width rounded up to a
/// multiple of 16 (or 8, two rows per vector, for widths up to 8), the height to an even number
/// for the latter, reading extra zero-point padding on the right and bottom of the image; only
/// the real pixels are stored (masked stores). Grids that waste more than a third of the work
/// are left to other kernels.
#[derive(Clone, Debug)]
pub struct DirectConv {
    /// AVX-512 VNNI: `[tap][quad][out]`, four i8 weights (input channels `4·quad..4·quad+4`)
    /// per word. AVX2: `[tap][quad][out][2]`, their i16 pairs (channels 0 and 2, 1 and 3).
    words: Vec<i32>,
    quads: usize,
    out_channels: usize,
    /// Output channels rounded up to a tile (8); the extra ones have zero weights.
    out_padded: usize,
    kernel: [usize; 2],
    stride: usize,
    column_sums: Vec<i32>,
    isa: Isa,
    /// Pruned weights ([`DirectConv::into_sparse`]): each channel's non-zero words only.
    sparse: Option<SparseBlocks>,
}

/// The non-zero weight words of a pruned convolution, per output channel: a word (four input
/// channels × one tap) is skipped when its four weights are all zero.
#[derive(Clone, Debug)]
struct SparseBlocks {
    /// Output channel `o`'s blocks are `start[o]..start[o + 1]`.
    start: Vec<u32>,
    /// Per block: where its pixels start in the image, relative to the pixel a vector starts
    /// at (its tap's row and column, its quad's plane), in bytes, for images of [`Self::image`].
    offset: Vec<u32>,
    /// The padded image `(hp, wp)` the offsets are for.
    image: (usize, usize),
    /// Per block: the word (AVX-512 VNNI), or its two i16-pair words (AVX2).
    words: Vec<i32>,
}

/// The largest fraction of non-zero weight words ([`DirectConv::word_density`]) at which a
/// convolution on integer path `isa` runs on the sparse path ([`DirectConv::into_sparse`]):
/// below the crossover `cargo xtask bench quant` measured (its `int8 conv3x3 … % zero` cases:
/// 3×3 convolutions 64→64 at 32×32 and 16→16 at 28×28, one image, random zeros; AMD EPYC Zen 4,
/// one thread). AVX-512 VNNI: sparse 0.77–0.78× the dense kernel at word density 0.6, 1.11–1.21×
/// at 0.35, 1.5–1.9× at 0.18 — the crossover near 0.45, so 0.4. AVX2 (`SHRINK_ISA=avx2`), whose
/// dense kernel does twice the work per word: 0.98–1.09× at 0.6, 1.3–1.7× at 0.35, 1.9–2.9× at
/// 0.18 — so 0.5. Each non-zero word costs the sparse path its own activation loads, which the
/// dense tile shares between 8 (AVX2: 4) output channels, hence the crossover well below 1.
pub fn sparse_max_word_density(isa: Isa) -> f64 {
    match isa {
        Isa::Avx2 => 0.5,
        _ => 0.4,
    }
}

/// What the direct convolution's epilogue applies per output channel `o` and pixel `p`:
/// `y = (acc − correction[o] − weight_zero[o] · window_sums[p]) · scale[o] + bias[o]`, then
/// ReLU if asked, then the activation (the same operations, in the same order, as the scalar
/// epilogue, so both give the same bits).
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a> {
    /// Per output channel.
    pub correction: &'a [i32],
    /// Per output channel.
    pub scale: &'a [f32],
    /// Per output channel.
    pub bias: &'a [f32],
    /// ReLU on the output.
    pub relu: bool,
    /// Asymmetric weights: zero point per output channel; empty for symmetric weights.
    pub weight_zero: &'a [i32],
    /// With `weight_zero`: `Σ (a − a_zero)` over each output pixel's receptive field.
    pub window_sums: &'a [i32],
    /// A u8 grid the value is rounded to after the bias (a quantized model's rounded output).
    pub grid: Option<Grid>,
    /// A fused residual add: an image of the output's shape (`[out_channels][oh][ow]` f32)
    /// added after the rounding, before the ReLU; empty for none.
    pub residual: &'a [f32],
    /// An activation applied last, after the ReLU ([`Activation::apply`]): a clip or a
    /// hard-swish the plan fused into the layer.
    pub activation: Option<Activation>,
}

impl Epilogue<'_> {
    /// The scalar definition of the epilogue, which the vector epilogues follow operation by
    /// operation: output channel `o`'s value for accumulator `acc` ([`dequantize`] without the
    /// ReLU), rounded to [`Self::grid`], plus `residual` (the residual image's value at the
    /// pixel; ignored without [`Self::residual`]), then the ReLU. `window_sum` is the pixel's
    /// window sum (ignored for symmetric weights).
    #[inline(always)]
    pub fn apply(&self, o: usize, acc: i32, window_sum: i32, residual: f32) -> f32 {
        let y = self.before_activation(o, acc, window_sum, residual);
        self.activation.map_or(y, |a| a.apply(y))
    }

    /// [`Self::apply`] without the activation.
    #[inline(always)]
    fn before_activation(&self, o: usize, acc: i32, window_sum: i32, residual: f32) -> f32 {
        let weight_zero = self.weight_zero.get(o).copied().unwrap_or(0);
        let mut y = dequantize(acc, self.correction[o], weight_zero, window_sum, self.scale[o], self.bias[o], false);
        if let Some(grid) = self.grid {
            y = grid.round(y);
        }
        if !self.residual.is_empty() {
            y += residual;
        }
        if self.relu { y.max(0.0) } else { y }
    }

    /// [`Self::apply`] over one image's channel-major accumulators `acc` (`[channels][n]`, `n`
    /// pixels per channel) into `out` (`[channels][n]`), with [`Self::window_sums`] one per
    /// pixel and [`Self::residual`] an image of the output's shape: the epilogue of the integer
    /// kernels that have no vector epilogue of their own, compiled for the vector unit of
    /// `isa` (AVX-512 or AVX2 on x86, where the CPU has it; the baseline elsewhere). The same
    /// bits as `apply` on every path: the loops only hoist its tests out of the pixels.
    ///
    /// # Panics
    /// When `acc`, `out`, a residual or window sums are shorter than `channels · n` (`n`).
    pub fn planes(&self, acc: &[i32], n: usize, channels: usize, out: &mut [f32], isa: Isa) {
        assert!(acc.len() >= channels * n && out.len() >= channels * n, "short accumulators or output");
        assert!(self.residual.is_empty() || self.residual.len() >= channels * n, "short residual image");
        assert!(self.weight_zero.is_empty() || self.window_sums.len() >= n, "short window sums");
        #[cfg(target_arch = "x86_64")]
        if matches!(isa, Isa::Avx512Vnni | Isa::Avx512) && Isa::Avx512.available() {
            // SAFETY: the CPU has AVX-512 F.
            return unsafe { self.planes_avx512(acc, n, channels, out) };
        } else if isa != Isa::Portable && Isa::Avx2.available() {
            // SAFETY: the CPU has AVX2.
            return unsafe { self.planes_avx2(acc, n, channels, out) };
        }
        let _ = isa;
        self.planes_body(acc, n, channels, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn planes_avx512(&self, acc: &[i32], n: usize, channels: usize, out: &mut [f32]) {
        self.planes_body(acc, n, channels, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn planes_avx2(&self, acc: &[i32], n: usize, channels: usize, out: &mut [f32]) {
        self.planes_body(acc, n, channels, out)
    }

    /// [`Self::planes`]' loops, for a caller already compiled for its path: one copy per
    /// activation, so that no choice is left inside them.
    #[inline(always)]
    pub(crate) fn planes_body(&self, acc: &[i32], n: usize, channels: usize, out: &mut [f32]) {
        struct Planes<'e, 'a> {
            e: &'e Epilogue<'e>,
            acc: &'a [i32],
            n: usize,
            channels: usize,
            out: &'a mut [f32],
        }
        impl crate::activation::WithActivation for Planes<'_, '_> {
            type Output = ();
            #[inline(always)]
            fn run<A: crate::activation::Activate>(self, a: A) {
                self.e.planes_then(self.acc, self.n, self.channels, self.out, a)
            }
        }
        Activation::dispatch(self.activation, Planes { e: self, acc, n, channels, out })
    }

    /// [`Self::planes_body`] with the activation `a` (the type of the one [`Self::activation`] names).
    #[inline(always)]
    fn planes_then<A: crate::activation::Activate>(
        &self,
        acc: &[i32],
        n: usize,
        channels: usize,
        out: &mut [f32],
        a: A,
    ) {
        let (asymmetric, residual) = (!self.weight_zero.is_empty(), !self.residual.is_empty());
        let planes = out[..channels * n].chunks_exact_mut(n).zip(acc.chunks_exact(n)).enumerate();
        for (o, (dst, acc)) in planes {
            match (asymmetric, residual) {
                (false, false) => {
                    for (d, &acc) in dst.iter_mut().zip(acc) {
                        *d = a.activate(self.before_activation(o, acc, 0, 0.0));
                    }
                }
                (true, false) => {
                    for ((d, &acc), &s) in dst.iter_mut().zip(acc).zip(&self.window_sums[..n]) {
                        *d = a.activate(self.before_activation(o, acc, s, 0.0));
                    }
                }
                (false, true) => {
                    for ((d, &acc), &r) in dst.iter_mut().zip(acc).zip(&self.residual[o * n..][..n]) {
                        *d = a.activate(self.before_activation(o, acc, 0, r));
                    }
                }
                (true, true) => {
                    let pixels = dst.iter_mut().zip(acc).zip(&self.window_sums[..n]).zip(&self.residual[o * n..][..n]);
                    for (((d, &acc), &s), &r) in pixels {
                        *d = a.activate(self.before_activation(o, acc, s, r));
                    }
                }
            }
        }
    }
}

/// [`quantize`] over a slice (`out[i]` from `x[i]`), compiled for the vector unit of `isa`
/// (AVX-512 or AVX2 on x86, where the CPU has it; the baseline elsewhere): the same bytes on
/// every path.
///
/// # Panics
/// When `out` is shorter than `x`.
pub fn quantize_slice(x: &[f32], inverse_scale: f32, zero_point: u8, out: &mut [u8], isa: Isa) {
    assert!(out.len() >= x.len(), "the output is shorter than the input");
    #[inline(always)]
    fn body(x: &[f32], inverse_scale: f32, zero_point: u8, out: &mut [u8]) {
        let zero = zero_point as f32;
        for (q, &v) in out.iter_mut().zip(x) {
            *q = quantize(v, inverse_scale, zero);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512(x: &[f32], inverse_scale: f32, zero_point: u8, out: &mut [u8]) {
            body(x, inverse_scale, zero_point, out)
        }
        #[target_feature(enable = "avx2")]
        fn avx2(x: &[f32], inverse_scale: f32, zero_point: u8, out: &mut [u8]) {
            body(x, inverse_scale, zero_point, out)
        }
        if matches!(isa, Isa::Avx512Vnni | Isa::Avx512) && Isa::Avx512.available() {
            // SAFETY: the CPU has AVX-512 F.
            return unsafe { avx512(x, inverse_scale, zero_point, out) };
        } else if isa != Isa::Portable && Isa::Avx2.available() {
            // SAFETY: the CPU has AVX2.
            return unsafe { avx2(x, inverse_scale, zero_point, out) };
        }
    }
    let _ = isa;
    body(x, inverse_scale, zero_point, out)
}

/// The integer epilogue, the one definition of how an i32 accumulator becomes a value:
/// `(acc − correction − weight_zero · window_sum) · scale + bias`, then ReLU if asked, with
/// wrapping i32 arithmetic (as the SIMD lanes compute it) and the float product and sum rounded
/// separately (no fused multiply-add). `correction` is the input's zero point times the weights'
/// sum, `weight_zero · window_sum` the asymmetric weights' term (0 for symmetric weights),
/// `scale` the input scale times the weight scale. The vector epilogues of [`DirectConv`]
/// perform the same operations in the same order ([`Epilogue::apply`]); the tests hold them
/// to the same bits.
#[inline(always)]
pub fn dequantize(
    acc: i32,
    correction: i32,
    weight_zero: i32,
    window_sum: i32,
    scale: f32,
    bias: f32,
    relu: bool,
) -> f32 {
    let a = acc.wrapping_sub(correction).wrapping_sub(weight_zero.wrapping_mul(window_sum));
    let y = a as f32 * scale + bias;
    if relu { y.max(0.0) } else { y }
}

/// 1.5 × 2²³: added to a float in `[0, 2²²)`, it leaves that float rounded to the nearest
/// integer (ties to even) in the low mantissa bits, a rounding that vectorises (unlike
/// `f32::round` without SSE4.1, or a saturating float-to-int cast).
const ROUNDING_MAGIC: f32 = 12_582_912.0;

/// The one definition of u8 quantization: `round_ties_even(clamp(v · inverse_scale +
/// zero_point, 0, 255))` (the product and the sum rounded separately; NaN becomes 0). The
/// vector paths compute the same with `cvtps2dq` under the default rounding mode.
#[inline(always)]
pub fn quantize(v: f32, inverse_scale: f32, zero_point: f32) -> u8 {
    (((v * inverse_scale + zero_point).clamp(0.0, 255.0) + ROUNDING_MAGIC).to_bits() & 0xFF) as u8
}

/// A u8 grid a value is rounded to and back: `scale · (q − zero_point)` with `q` as
/// [`quantize`] computes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grid {
    /// The grid's step.
    pub scale: f32,
    /// `1 / scale`, what [`quantize`] multiplies by.
    pub inverse_scale: f32,
    /// The u8 that stands for 0.
    pub zero_point: u8,
}

impl Grid {
    /// The grid of step `scale` with `zero_point`.
    pub fn new(scale: f32, zero_point: u8) -> Self {
        Self { scale, inverse_scale: 1.0 / scale, zero_point }
    }

    /// `v` rounded to the grid.
    #[inline(always)]
    pub fn round(self, v: f32) -> f32 {
        let zero_point = self.zero_point as f32;
        (quantize(v, self.inverse_scale, zero_point) as f32 - zero_point) * self.scale
    }
}

const TILE_CHANNELS: usize = 8;

/// Where the direct convolution writes its output.
#[derive(Debug)]
pub enum Output<'a> {
    /// `[out_channels][oh][ow]` f32.
    F32(&'a mut [f32]),
    /// Requantized for the next convolution, in the layout it reads (see [`QuadImage`]): every
    /// byte of the `oh × ow` image at the padding, all four channels of each quad; the caller
    /// fills the rest with the next layer's zero point ([`QuadImage::fill_border`]).
    Quads {
        /// `[quads][height][width][4]` u8 (and [`DirectConv::SLACK`] bytes more).
        bytes: &'a mut [u8],
        /// The layout and the next layer's input parameters.
        image: QuadImage,
    },
}

/// A quantized image as [`DirectConv`] reads it: `[quads][height][width][4]` u8, the real
/// image at `(padding[0], padding[1])` inside a border of zero points.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuadImage {
    /// Groups of four channels.
    pub quads: usize,
    /// Rows, padding included.
    pub height: usize,
    /// Columns, padding included.
    pub width: usize,
    /// Rows and columns of padding before the image.
    pub padding: [usize; 2],
    /// `1 / scale` of the quantization.
    pub inverse_scale: f32,
    /// Zero point of the quantization.
    pub zero_point: u8,
}

impl QuadImage {
    /// Bytes the image takes, without the slack.
    pub fn len(&self) -> usize {
        self.quads * self.height * self.width * 4
    }

    /// Whether the image has no pixels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the zero point around an `h × w` image at `padding` in every quad of `out`,
    /// leaving the image as it is: all a writer of every interior byte (every channel of each
    /// quad, as [`DirectConv`]'s [`Output::Quads`] writes them) must add.
    ///
    /// # Panics
    /// When `out` is shorter than [`Self::len`] or the image does not fit.
    pub fn fill_border(&self, [h, w]: [usize; 2], out: &mut [u8]) {
        let layout = [self.height, self.width, 4];
        crate::fill_border(&mut out[..self.len()], layout, [h, w], self.padding, self.zero_point);
    }

    /// Quantizes the channel-major f32 image `x` (`[channels][h][w]`, `channels` at most four
    /// per quad) into `out` in this layout: each value as [`quantize`] defines it, the border
    /// and the missing channels of the last quad the zero point. Vectorised on `isa`'s path
    /// (AVX-512 or AVX2, where the CPU has it; a scalar loop otherwise), the same bytes on
    /// every path.
    ///
    /// # Panics
    /// When `x` or `out` is too short, or the image does not fit the layout.
    pub fn quantize_from(&self, x: &[f32], [channels, h, w]: [usize; 3], out: &mut [u8], isa: Isa) {
        assert!(channels.div_ceil(4) == self.quads, "one quad per four channels");
        assert!(h + self.padding[0] <= self.height && w + self.padding[1] <= self.width, "the image does not fit");
        assert!(x.len() >= channels * h * w && out.len() >= self.len(), "a slice is too short");
        let zero = self.zero_point;
        let [ph, pw] = self.padding;
        // The border only: the interior is written below.
        self.fill_border([h, w], out);
        #[cfg(target_arch = "x86_64")]
        if matches!(isa, Isa::Avx512Vnni | Isa::Avx512) && Isa::Avx512.available() {
            // SAFETY: the CPU has AVX-512; the bounds are asserted above.
            return unsafe { x86::quantize_image_512(self, x, [channels, h, w], out) };
        } else if isa != Isa::Portable && Isa::Avx2.available() {
            // SAFETY: the CPU has AVX2; the bounds are asserted above.
            return unsafe { x86::quantize_image_256(self, x, [channels, h, w], out) };
        }
        let _ = isa;
        let (inv, zp) = (self.inverse_scale, zero as f32);
        for q in 0..self.quads {
            for y in 0..h {
                let dst = &mut out[((q * self.height + y + ph) * self.width + pw) * 4..][..w * 4];
                for (i, px) in dst.chunks_exact_mut(4).enumerate() {
                    for (lane, byte) in px.iter_mut().enumerate() {
                        let c = 4 * q + lane;
                        *byte = if c < channels { quantize(x[(c * h + y) * w + i], inv, zp) } else { zero };
                    }
                }
            }
        }
    }
}

impl DirectConv {
    /// Packs `weight`, `[out, in, kh, kw]` (i8), for a convolution with the same `stride`
    /// (1 or 2) along both axes, on the selected integer path ([`path`]).
    ///
    /// # Panics
    /// On another stride, or where the selected integer path has no direct convolution
    /// ([`Self::runs_on`]).
    pub fn new(weight: &[i8], out_channels: usize, in_channels: usize, kernel: [usize; 2], stride: usize) -> Self {
        Self::with_isa(weight, out_channels, in_channels, kernel, stride, path())
    }

    /// Whether the direct convolution runs on integer path `isa` on this CPU: AVX-512 VNNI or
    /// AVX2 (the portable path has the GEMM only).
    pub fn runs_on(isa: Isa) -> bool {
        matches!(isa, Isa::Avx512Vnni | Isa::Avx2) && isa.available()
    }

    /// As [`DirectConv::new`], on path `isa` ([`Isa::Avx512Vnni`] or [`Isa::Avx2`]; the CPU need
    /// not have it until [`DirectConv::run`]).
    ///
    /// # Panics
    /// On another stride or path.
    pub fn with_isa(
        weight: &[i8],
        out_channels: usize,
        in_channels: usize,
        kernel: [usize; 2],
        stride: usize,
        isa: Isa,
    ) -> Self {
        assert!(Self::supports_stride(stride), "stride {stride}");
        assert!(matches!(isa, Isa::Avx512Vnni | Isa::Avx2), "no integer kernel for {isa:?}");
        let pairs = isa == Isa::Avx2;
        let [kh, kw] = kernel;
        assert_eq!(weight.len(), out_channels * in_channels * kh * kw, "weights must be [out, in, kh, kw]");
        let quads = in_channels.div_ceil(4);
        let out_padded = out_channels.next_multiple_of(TILE_CHANNELS);
        let mut words = vec![0i32; kh * kw * quads * out_padded * if pairs { 2 } else { 1 }];
        for tap in 0..kh * kw {
            for q in 0..quads {
                for o in 0..out_channels {
                    let bytes: [i8; 4] = std::array::from_fn(|l| {
                        let c = 4 * q + l;
                        if c < in_channels { weight[(o * in_channels + c) * kh * kw + tap] } else { 0 }
                    });
                    let at = (tap * quads + q) * out_padded + o;
                    if pairs {
                        words[2 * at..2 * at + 2].copy_from_slice(&i16_pairs(bytes));
                    } else {
                        words[at] = i32::from_le_bytes(bytes.map(|b| b as u8));
                    }
                }
            }
        }
        let per = in_channels * kh * kw;
        let column_sums =
            (0..out_channels).map(|o| weight[o * per..(o + 1) * per].iter().map(|&w| w as i32).sum()).collect();
        Self { words, quads, out_channels, out_padded, kernel, stride, column_sums, isa, sparse: None }
    }

    /// The fraction of weight words (four input channels × one tap of one output channel) that
    /// hold a non-zero weight: the work of the sparse path relative to the dense one.
    pub fn word_density(&self) -> f64 {
        let per = if self.isa == Isa::Avx2 { 2 } else { 1 };
        let taps = self.kernel[0] * self.kernel[1];
        let nonzero = (0..taps * self.quads)
            .flat_map(|block| (0..self.out_channels).map(move |o| block * self.out_padded + o))
            .filter(|&at| self.words[per * at..per * (at + 1)].iter().any(|&w| w != 0))
            .count();
        nonzero as f64 / (taps * self.quads * self.out_channels).max(1) as f64
    }

    /// The same convolution computed on its non-zero weight words only: each output channel
    /// walks its own list of (tap, quad) words, so the work scales with
    /// [`Self::word_density`] instead of the dense shape. The same bits as the dense path
    /// (the same products, summed in i32, exactly). The lists hold byte offsets into padded
    /// images of `hp × wp` pixels: [`Self::run`] then takes images of that size only.
    ///
    /// # Panics
    /// When an offset does not fit in 32 bits.
    pub fn into_sparse(mut self, hp: usize, wp: usize) -> Self {
        let per = if self.isa == Isa::Avx2 { 2 } else { 1 };
        let [_, kw] = self.kernel;
        let taps = self.kernel[0] * kw;
        let mut blocks = SparseBlocks { start: vec![0], offset: Vec::new(), image: (hp, wp), words: Vec::new() };
        for o in 0..self.out_channels {
            for tap in 0..taps {
                for q in 0..self.quads {
                    let at = (tap * self.quads + q) * self.out_padded + o;
                    let words = &self.words[per * at..per * (at + 1)];
                    if words.iter().any(|&w| w != 0) {
                        let offset = ((q * hp + tap / kw) * wp + tap % kw) * 4;
                        blocks.offset.push(u32::try_from(offset).expect("images under 4 GiB"));
                        blocks.words.extend_from_slice(words);
                    }
                }
            }
            blocks.start.push(blocks.offset.len() as u32);
        }
        self.sparse = Some(blocks);
        self
    }

    /// Whether it runs on the sparse path ([`Self::into_sparse`]).
    pub fn is_sparse(&self) -> bool {
        self.sparse.is_some()
    }

    /// The path it runs on.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Whether the kernel covers a stride (the same along both axes): 1 or 2.
    pub fn supports_stride(stride: usize) -> bool {
        matches!(stride, 1 | 2)
    }

    /// Bytes the image buffer needs beyond `[quads][hp][wp][4]`: with stride 2 the last vector
    /// of a row reads one word past the last pixel it uses.
    pub const SLACK: usize = 64;

    /// The virtual output grid an `oh × ow` output is computed on: `(rows, width)`, the width a
    /// multiple of 16, or 8 for outputs up to 8 wide (whose rows then go in pairs: rows even).
    pub fn grid(oh: usize, ow: usize) -> (usize, usize) {
        if ow <= 8 { (oh.next_multiple_of(2), 8) } else { (oh, ow.next_multiple_of(16)) }
    }

    /// Whether the kernel covers an output of `oh × ow` pixels: when its [`Self::grid`] adds at
    /// most a third to the work (e.g. 28 → 32 or 7 → 8 wide, not 17 → 32 or 4 → 8).
    pub fn supports(oh: usize, ow: usize) -> bool {
        let (gh, gw) = Self::grid(oh, ow);
        oh > 0 && ow > 0 && 3 * gh * gw <= 4 * oh * ow
    }

    /// The padded image `(hp, wp)` a convolution with this `kernel` and `stride` reads for an
    /// `oh × ow` output: at least the real padded image `(h, w)`, and enough rows and columns
    /// (zero points) for the whole grid.
    pub fn image_size(kernel: [usize; 2], stride: usize, h: usize, w: usize, oh: usize, ow: usize) -> (usize, usize) {
        let (gh, gw) = Self::grid(oh, ow);
        let [kh, kw] = kernel;
        (h.max((gh - 1) * stride + kh), w.max((gw - 1) * stride + kw))
    }

    /// Groups of four input channels: the image's first dimension.
    pub fn quads(&self) -> usize {
        self.quads
    }

    /// `Σ w` per output channel, to remove the input's zero point from the result.
    pub fn column_sums(&self) -> &[i32] {
        &self.column_sums
    }

    /// Convolves one image, `[quads][hp][wp][4]` u8 already padded to at least
    /// [`Self::image_size`] and followed by [`Self::SLACK`] bytes, into `out`: f32, or
    /// requantized for the next convolution (the same values rounded as that layer would round
    /// them, so the result is bit for bit the same). With asymmetric weights,
    /// `epilogue.window_sums` holds one sum per pixel of the [`Self::grid`].
    ///
    /// # Panics
    /// When the CPU lacks the path it was packed for, the output shape is not
    /// [`Self::supports`]ed, or a slice is too short.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        image: &[u8],
        hp: usize,
        wp: usize,
        oh: usize,
        ow: usize,
        out: Output<'_>,
        epilogue: &Epilogue<'_>,
    ) {
        self.run_on(image, hp, wp, oh, ow, out, epilogue, &Team::sequential());
    }

    /// As [`Self::run`], with the output channels split between the threads of `team` (in jobs
    /// of whole tiles of 8 channels, taken by whichever thread is free), so one image uses
    /// several cores. The same bits whatever the team.
    ///
    /// # Panics
    /// As [`Self::run`].
    #[allow(clippy::too_many_arguments)]
    pub fn run_on(
        &self,
        image: &[u8],
        hp: usize,
        wp: usize,
        oh: usize,
        ow: usize,
        out: Output<'_>,
        epilogue: &Epilogue<'_>,
        team: &Team,
    ) {
        let threads = team.threads();
        let [kh, kw] = self.kernel;
        assert!(self.isa.available(), "this CPU lacks {:?}", self.isa);
        assert!(Self::supports(oh, ow), "unsupported output width {ow}");
        let s = self.stride;
        let (gh, gw) = Self::grid(oh, ow);
        assert!(hp >= (gh - 1) * s + kh && wp >= (gw - 1) * s + kw, "image smaller than the output grid needs");
        assert!(image.len() >= self.quads * hp * wp * 4 + Self::SLACK, "image is too short");
        if let Some(sparse) = &self.sparse {
            assert_eq!(sparse.image, (hp, wp), "the sparse path was built for images of another size");
        }
        match &out {
            Output::F32(out) => assert!(out.len() >= self.out_channels * oh * ow, "output is too short"),
            Output::Quads { bytes, image } => {
                assert!(image.quads == self.out_channels.div_ceil(4), "one quad per four output channels");
                assert!(
                    image.height >= oh + image.padding[0] && image.width >= ow + image.padding[1],
                    "the next image is smaller than this output"
                );
                assert!(bytes.len() >= image.len(), "output is too short");
            }
        }
        let n = self.out_channels;
        assert!(epilogue.correction.len() >= n && epilogue.scale.len() >= n && epilogue.bias.len() >= n);
        assert!(
            epilogue.weight_zero.is_empty()
                || (epilogue.weight_zero.len() >= n && epilogue.window_sums.len() >= gh * gw),
            "asymmetric weights need a zero point per channel and a sum per pixel of the grid"
        );
        assert!(
            epilogue.residual.is_empty() || epilogue.residual.len() >= n * oh * ow,
            "the residual is an image of the output's shape"
        );
        let tiles = self.out_channels.div_ceil(TILE_CHANNELS);
        let job = |channels: std::ops::Range<usize>, out: Output<'_>| {
            // SAFETY: features and every bound the kernel relies on are checked above; each
            // job's output (below) starts at its first channel and holds its channels.
            unsafe { self.channels(channels, image, hp, wp, oh, ow, out, epilogue) }
        };
        if threads <= 1 || tiles < 2 {
            job(0..self.out_padded, out);
            return;
        }
        let per_job = tiles.div_ceil(2 * threads).max(1) * TILE_CHANNELS;
        let range = |j: usize| j * per_job..(j + 1) * per_job;
        match out {
            Output::F32(out) => {
                team.for_each_chunk(&mut out[..self.out_channels * oh * ow], per_job * oh * ow, &|j, chunk| {
                    job(range(j), Output::F32(chunk))
                })
            }
            Output::Quads { bytes, image: next } => team.for_each_chunk(
                &mut bytes[..next.len()],
                per_job / 4 * next.height * next.width * 4,
                &|j, chunk| job(range(j), Output::Quads { bytes: chunk, image: next }),
            ),
        }
    }

    /// Output channels `channels` (from a multiple of 8) into `out`, which starts at the range's
    /// first channel.
    ///
    /// # Safety
    /// What [`Self::run_on`] asserts; `out` holds the range's channels below
    /// `out_channels` (f32: `oh · ow` values each; the next image: its planes of their quads).
    #[allow(clippy::too_many_arguments)]
    unsafe fn channels(
        &self,
        channels: std::ops::Range<usize>,
        image: &[u8],
        hp: usize,
        wp: usize,
        oh: usize,
        ow: usize,
        out: Output<'_>,
        epilogue: &Epilogue<'_>,
    ) {
        let channels = channels.start..channels.end.min(self.out_padded);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: this function's contract.
        unsafe {
            match self.isa {
                Isa::Avx512Vnni => x86::direct(self, channels, image, hp, wp, oh, ow, out, epilogue),
                _ => x86::direct_avx2(self, channels, image, hp, wp, oh, ow, out, epilogue),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (channels, image, hp, wp, oh, ow, out, epilogue);
            unreachable!("the direct integer convolution runs on AVX-512 VNNI or AVX2 ({:?})", self.isa)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{DEPTH_STEP, DirectConv, Epilogue, Output, PANEL, PANEL_AVX2, PackedWeights, TILE_CHANNELS};

    /// Rows per block: the block's activations (at most a few tens of KiB) stay in L1/L2 while
    /// every panel group passes over them.
    const ROW_BLOCK: usize = 96;

    /// See [`super::gemm`].
    ///
    /// # Safety
    /// The CPU has the target features; `lda >= w.depth`, `a` holds `rows` rows (the last one at
    /// least `w.depth` bytes) and `c` holds `rows × ldc` values with `ldc >= w.padded_columns()`
    /// (what [`super::gemm`] asserts).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    pub(super) unsafe fn gemm(a: &[u8], lda: usize, rows: usize, w: &PackedWeights, c: &mut [i32], ldc: usize) {
        let panels = w.columns.div_ceil(PANEL);
        let steps = w.depth / DEPTH_STEP;
        // Words per panel.
        let panel_len = steps * PANEL;
        for r0 in (0..rows).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(rows);
            let mut p = 0;
            while p < panels {
                // Register budget: MR × R accumulators + R weights + 1 broadcast ≤ 32.
                let r = (panels - p).min(4);
                let b = &w.words[p * panel_len..];
                let col = p * PANEL;
                // SAFETY: this function's contract covers the CPU features, `a` and `c`; `b`
                // holds the `panels − p ≥ r` panels from `p` on, `panel_len` words each.
                unsafe {
                    match r {
                        4 => rows_of::<6, 4>(a, lda, r0, r1, b, panel_len, steps, c, ldc, col),
                        3 => rows_of::<8, 3>(a, lda, r0, r1, b, panel_len, steps, c, ldc, col),
                        2 => rows_of::<12, 2>(a, lda, r0, r1, b, panel_len, steps, c, ldc, col),
                        _ => rows_of::<16, 1>(a, lda, r0, r1, b, panel_len, steps, c, ldc, col),
                    }
                }
                p += r;
            }
        }
    }

    /// Rows `r0..r1` against `R` panels starting at `b`, in tiles of `MR` rows.
    ///
    /// # Safety
    /// The CPU has the target features; `b` holds `R` panels of `panel_len = steps · 16` words;
    /// rows `r0..r1` of `a` (`lda` apart) hold at least `steps · 4` bytes each; `c` holds rows
    /// `r0..r1` of `ldc` values, and `col + 16 · R <= ldc`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    unsafe fn rows_of<const MR: usize, const R: usize>(
        a: &[u8],
        lda: usize,
        r0: usize,
        r1: usize,
        b: &[i32],
        panel_len: usize,
        steps: usize,
        c: &mut [i32],
        ldc: usize,
        col: usize,
    ) {
        let mut i = r0;
        while i < r1 {
            let used = MR.min(r1 - i);
            // Rows past the end repeat the last row (read, never stored), so every load is in bounds.
            let rows: [*const u8; MR] = std::array::from_fn(|t| a[(i + t.min(used - 1)) * lda..].as_ptr());
            let mut acc = [[_mm512_setzero_si512(); R]; MR];
            let b = b.as_ptr();
            for s in 0..steps {
                // SAFETY: 16 words at `(s + 1) · 16 <= panel_len` into panel `j < R` of `b`.
                let wv: [__m512i; R] = std::array::from_fn(|j| unsafe {
                    _mm512_loadu_si512(b.add(j * panel_len + s * PANEL) as *const __m512i)
                });
                for t in 0..MR {
                    // SAFETY: 4 bytes at `s · 4 + 4 <= steps · 4` into a row below `r1` (rows past
                    // `used` repeat the last real row).
                    let av = _mm512_set1_epi32(unsafe { (rows[t].add(s * DEPTH_STEP) as *const i32).read_unaligned() });
                    for j in 0..R {
                        acc[t][j] = _mm512_dpbusd_epi32(acc[t][j], av, wv[j]);
                    }
                }
            }
            for (t, acc) in acc.iter().enumerate().take(used) {
                for (j, v) in acc.iter().enumerate() {
                    let dst = c[(i + t) * ldc + col + j * PANEL..][..PANEL].as_mut_ptr();
                    // SAFETY: `dst` starts a 16-value slice of `c` (bounds checked just above).
                    unsafe { _mm512_storeu_si512(dst as *mut __m512i, *v) };
                }
            }
            i += MR;
        }
    }

    /// The direct convolution: tiles of 8 output channels × 16·`R` output pixels, for the output
    /// channels `channels` (from a multiple of 8), written to `out` from the range's first.
    ///
    /// # Safety
    /// As [`direct_tiles`]: everything [`DirectConv::run`] asserts, for the range's channels.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    pub(super) unsafe fn direct(
        conv: &DirectConv,
        channels: std::ops::Range<usize>,
        image: &[u8],
        hp: usize,
        wp: usize,
        oh: usize,
        ow: usize,
        out: Output<'_>,
        epilogue: &Epilogue<'_>,
    ) {
        let (_, gw) = DirectConv::grid(oh, ow);
        // SAFETY: this function's contract is `direct_tiles`'s; the match only picks the tile
        // shape that fits the grid (R = 2 needs widths of 32, SPLIT widths of 8, S the stride).
        unsafe {
            match (conv.stride, gw.is_multiple_of(32), gw.is_multiple_of(16)) {
                (1, true, _) => {
                    direct_tiles::<2, false, 1>(conv, channels.clone(), image, hp, wp, oh, ow, out, epilogue)
                }
                (1, false, true) => {
                    direct_tiles::<1, false, 1>(conv, channels.clone(), image, hp, wp, oh, ow, out, epilogue)
                }
                (1, false, false) => {
                    direct_tiles::<1, true, 1>(conv, channels.clone(), image, hp, wp, oh, ow, out, epilogue)
                }
                (_, true, _) => {
                    direct_tiles::<2, false, 2>(conv, channels.clone(), image, hp, wp, oh, ow, out, epilogue)
                }
                (_, false, true) => {
                    direct_tiles::<1, false, 2>(conv, channels.clone(), image, hp, wp, oh, ow, out, epilogue)
                }
                (_, false, false) => {
                    direct_tiles::<1, true, 2>(conv, channels.clone(), image, hp, wp, oh, ow, out, epilogue)
                }
            }
        }
    }

    /// `R` vectors of 16 pixels per tile; `SPLIT`: a vector covers two rows of 8 pixels; `S`:
    /// the stride (with 2, a vector gathers the even words of two loads).
    ///
    /// # Safety
    /// The CPU has the target features and the arguments satisfy what [`DirectConv::run`]
    /// asserts: the grid of `oh × ow` is supported and `S` is the stride; `hp` and `wp` cover the
    /// grid's receptive field (`(gh − 1) · S + kh` rows, `(gw − 1) · S + kw` columns); `image`
    /// holds `quads · hp · wp · 4` bytes plus [`DirectConv::SLACK`]; `out` holds every output
    /// channel's `oh × ow` pixels (f32), or the next image; the epilogue has a value per channel
    /// and, for asymmetric weights, a window sum per pixel of the grid. `R = 2` needs a grid
    /// width that is a multiple of 32, `SPLIT` one of 8.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    unsafe fn direct_tiles<const R: usize, const SPLIT: bool, const S: usize>(
        conv: &DirectConv,
        channels: std::ops::Range<usize>,
        image: &[u8],
        hp: usize,
        wp: usize,
        oh: usize,
        ow: usize,
        mut out: Output<'_>,
        epilogue: &Epilogue<'_>,
    ) {
        const MR: usize = TILE_CHANNELS;
        let [kh, kw] = conv.kernel;
        let n = oh * ow;
        let (gh, gw) = DirectConv::grid(oh, ow);
        // Lanes of a row's last vector that hold real pixels (SPLIT: of each half).
        let row_mask = |x0: usize| -> u32 { if x0 >= ow { 0 } else { (1u32 << (ow - x0).min(16)) - 1 } };
        let img = image.as_ptr();
        let words = conv.words.as_ptr();
        let zero = _mm512_setzero_si512();
        // Words 0, 2, …, 30 of two vectors (indices from 16 on select the second).
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        for p0 in (0..gh * gw).step_by(16 * R) {
            // Byte offset in the image of each vector's first pixel (tap 0, quad 0); with SPLIT
            // the second half starts on the next output row.
            let (oy, ox) = (p0 / gw, p0 % gw);
            let first: [usize; R] = std::array::from_fn(|r| (oy * S * wp + (ox + 16 * r) * S) * 4);
            let second = ((oy + 1) * S * wp + ox * S) * 4;
            // The R vectors of tap (ky, kx) of quad q: `shift` bytes past each vector's first pixel.
            let pixels = |shift: usize| -> [__m512i; R] {
                // SAFETY: each load reads pixels of one quad's plane inside the receptive field
                // of grid pixels, which `hp × wp` covers; a stride-2 load reads at most one
                // 64-byte word past the last pixel it uses, which lands in the next row or the
                // SLACK after the last plane.
                std::array::from_fn(|r| unsafe {
                    if S == 2 {
                        // 16 output pixels: the even words of 32 (or 2 × 16) input pixels.
                        let lo = _mm512_loadu_si512(img.add(first[r] + shift) as *const __m512i);
                        let hi_at = if SPLIT { second } else { first[r] + 64 };
                        let hi = _mm512_loadu_si512(img.add(hi_at + shift) as *const __m512i);
                        _mm512_permutex2var_epi32(lo, even, hi)
                    } else if SPLIT {
                        let lo = _mm256_loadu_si256(img.add(first[r] + shift) as *const __m256i);
                        let hi = _mm256_loadu_si256(img.add(second + shift) as *const __m256i);
                        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
                    } else {
                        _mm512_loadu_si512(img.add(first[r] + shift) as *const __m512i)
                    }
                })
            };
            for o0 in channels.clone().step_by(MR) {
                let mut acc = [[zero; R]; MR];
                if let Some(sparse) = &conv.sparse {
                    // Each channel's own non-zero words: one broadcast, R loads and R products
                    // each, into four sets of partial sums (independent chains, so the products
                    // overlap as the dense tile's eight channels do), added at the end: wrapping
                    // i32 sums, the same bits in any order.
                    for (t, acc) in acc.iter_mut().enumerate().take(conv.out_channels.saturating_sub(o0)) {
                        let blocks = sparse.start[o0 + t] as usize..sparse.start[o0 + t + 1] as usize;
                        let (at, words) = (&sparse.offset[blocks.clone()], &sparse.words[blocks]);
                        let mut part = [[zero; R]; 4];
                        let step = |part: &mut [__m512i; R], offset: u32, word: i32| {
                            let a = pixels(offset as usize);
                            let b = _mm512_set1_epi32(word);
                            for r in 0..R {
                                part[r] = _mm512_dpbusd_epi32(part[r], a[r], b);
                            }
                        };
                        let whole = at.len() / 4 * 4;
                        for (at, words) in at[..whole].chunks_exact(4).zip(words[..whole].chunks_exact(4)) {
                            for k in 0..4 {
                                step(&mut part[k], at[k], words[k]);
                            }
                        }
                        for (&at, &word) in at[whole..].iter().zip(&words[whole..]) {
                            step(&mut part[0], at, word);
                        }
                        for r in 0..R {
                            let sum = _mm512_add_epi32(_mm512_add_epi32(part[0][r], part[1][r]), part[2][r]);
                            acc[r] = _mm512_add_epi32(sum, part[3][r]);
                        }
                    }
                } else {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let tap = ky * kw + kx;
                            for q in 0..conv.quads {
                                let a = pixels(((q * hp + ky) * wp + kx) * 4);
                                // SAFETY: `tap < kh · kw`, `q < quads` and `o0 + 8 <= out_padded`: the
                                // 8 words read below lie inside `words` (`kh·kw·quads·out_padded`).
                                let w = unsafe { words.add((tap * conv.quads + q) * conv.out_padded + o0) };
                                for (t, acc) in acc.iter_mut().enumerate() {
                                    // SAFETY: `t < 8`, see above.
                                    let b = _mm512_set1_epi32(unsafe { *w.add(t) });
                                    for r in 0..R {
                                        acc[r] = _mm512_dpbusd_epi32(acc[r], a[r], b);
                                    }
                                }
                            }
                        }
                    }
                }
                // `Epilogue::apply`, operation by operation.
                let mut ys = [[_mm512_setzero_ps(); R]; MR];
                for (t, acc) in acc.iter().enumerate() {
                    let o = o0 + t;
                    if o >= conv.out_channels {
                        break;
                    }
                    let correction = _mm512_set1_epi32(epilogue.correction[o]);
                    let scale = _mm512_set1_ps(epilogue.scale[o]);
                    let bias = _mm512_set1_ps(epilogue.bias[o]);
                    let weight_zero = epilogue.weight_zero.get(o).map(|&z| _mm512_set1_epi32(z));
                    for (r, v) in acc.iter().enumerate() {
                        let mut v = _mm512_sub_epi32(*v, correction);
                        if let Some(z) = weight_zero {
                            // SAFETY: 16 i32 of a slice of that length (bounds checked as it is made).
                            let sums = unsafe {
                                _mm512_loadu_si512(epilogue.window_sums[p0 + 16 * r..][..16].as_ptr() as *const __m512i)
                            };
                            v = _mm512_sub_epi32(v, _mm512_mullo_epi32(z, sums));
                        }
                        let y = _mm512_cvtepi32_ps(v);
                        let mut y = _mm512_add_ps(_mm512_mul_ps(y, scale), bias);
                        if let Some(grid) = epilogue.grid {
                            y = round_to_grid(y, grid);
                        }
                        if !epilogue.residual.is_empty() {
                            let plane = &epilogue.residual[o * n..(o + 1) * n];
                            // SAFETY: the CPU has the features (this function's contract);
                            // `load_f32` reads only through bounds-checked slices of `plane`.
                            let x = unsafe { load_f32(plane, oy, ox + 16 * r, oh, ow, SPLIT, row_mask(ox + 16 * r)) };
                            y = _mm512_add_ps(y, x);
                        }
                        if epilogue.relu {
                            y = _mm512_max_ps(y, _mm512_setzero_ps());
                        }
                        if let Some(a) = epilogue.activation {
                            y = activate_512(y, a);
                        }
                        ys[t][r] = y;
                    }
                }
                match &mut out {
                    Output::F32(out) => {
                        for (t, ys) in ys.iter().enumerate().take(conv.out_channels.saturating_sub(o0)) {
                            let at = o0 + t - channels.start;
                            let row = &mut out[at * n..(at + 1) * n];
                            for (r, &y) in ys.iter().enumerate() {
                                // SAFETY: the CPU has the features (this function's contract);
                                // `store_f32` writes only through bounds-checked slices of `row`.
                                unsafe { store_f32(row, y, oy, ox + 16 * r, oh, ow, SPLIT, row_mask(ox + 16 * r)) };
                            }
                        }
                    }
                    Output::Quads { bytes, image } => {
                        // Rounded as the next layer rounds its input (`kernels::quantize_u8`:
                        // multiply, add the zero point, clamp, round half to even; NaN to 0),
                        // four channels interleaved per pixel.
                        let (inv, zp) = (image.inverse_scale, image.zero_point);
                        for half in 0..MR / 4 {
                            let quad = o0 / 4 + half;
                            if 4 * quad >= conv.out_channels {
                                break;
                            }
                            #[allow(clippy::needless_range_loop)] // `r` indexes the inner arrays of `ys`
                            for r in 0..R {
                                let q: [__m128i; 4] = std::array::from_fn(|c| {
                                    _mm512_cvtepi32_epi8(quantize_512(ys[4 * half + c][r], inv, zp))
                                });
                                let (a_lo, a_hi) = (_mm_unpacklo_epi8(q[0], q[1]), _mm_unpackhi_epi8(q[0], q[1]));
                                let (b_lo, b_hi) = (_mm_unpacklo_epi8(q[2], q[3]), _mm_unpackhi_epi8(q[2], q[3]));
                                let mut px = _mm512_castsi128_si512(_mm_unpacklo_epi16(a_lo, b_lo));
                                px = _mm512_inserti32x4::<1>(px, _mm_unpackhi_epi16(a_lo, b_lo));
                                px = _mm512_inserti32x4::<2>(px, _mm_unpacklo_epi16(a_hi, b_hi));
                                px = _mm512_inserti32x4::<3>(px, _mm_unpackhi_epi16(a_hi, b_hi));
                                let plane = &mut bytes[(quad - channels.start / 4) * image.height * image.width * 4..]
                                    [..image.height * image.width * 4];
                                let [ph, pw] = image.padding;
                                let at = |y: usize, x: usize| ((y + ph) * image.width + x + pw) * 4;
                                if SPLIT {
                                    let mask = row_mask(0) as __mmask8;
                                    let lo = plane[at(oy, 0)..][..4 * ow].as_mut_ptr();
                                    // SAFETY: the mask enables `min(ow, 8)` lanes of 4 bytes: the
                                    // `4 · ow` bytes of the slice just made (bounds checked).
                                    unsafe {
                                        _mm256_mask_storeu_epi32(lo as *mut i32, mask, _mm512_castsi512_si256(px))
                                    };
                                    if oy + 1 < oh {
                                        let hi = plane[at(oy + 1, 0)..][..4 * ow].as_mut_ptr();
                                        let px_hi = _mm512_extracti64x4_epi64::<1>(px);
                                        // SAFETY: as above, on the next row.
                                        unsafe { _mm256_mask_storeu_epi32(hi as *mut i32, mask, px_hi) };
                                    }
                                } else {
                                    let x0 = ox + 16 * r;
                                    let mask = row_mask(x0);
                                    if mask != 0 {
                                        let dst = plane[at(oy, x0)..][..4 * (ow - x0).min(16)].as_mut_ptr();
                                        // SAFETY: the mask enables `min(ow − x0, 16)` lanes of 4
                                        // bytes: the slice just made (bounds checked).
                                        unsafe { _mm512_mask_storeu_epi32(dst as *mut i32, mask as __mmask16, px) };
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// [`super::quantize`] on 16 lanes: multiply, add the zero point, clamp, round half to
    /// even (`cvtps2dq` under the default rounding mode; NaN to 0 by the clamp), as i32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn quantize_512(y: __m512, inverse_scale: f32, zero_point: u8) -> __m512i {
        let v = _mm512_add_ps(_mm512_mul_ps(y, _mm512_set1_ps(inverse_scale)), _mm512_set1_ps(zero_point as f32));
        _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, _mm512_setzero_ps()), _mm512_set1_ps(255.0)))
    }

    /// [`QuadImage::quantize_from`](super::QuadImage::quantize_from) on AVX-512: 16 pixels ×
    /// 4 channels per step, each channel quantized in one vector and the four interleaved as
    /// the bytes of each pixel's word.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; the bounds `quantize_from` asserts hold. Every load and store
    /// goes through a bounds-checked slice.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize_image_512(
        image: &super::QuadImage,
        x: &[f32],
        [channels, h, w]: [usize; 3],
        out: &mut [u8],
    ) {
        let [ph, pw] = image.padding;
        let missing = _mm512_set1_epi32(image.zero_point as i32);
        for q in 0..image.quads {
            for y in 0..h {
                let dst = &mut out[((q * image.height + y + ph) * image.width + pw) * 4..][..w * 4];
                for x0 in (0..w).step_by(16) {
                    let count = (w - x0).min(16);
                    let mask = ((1u32 << count) - 1) as __mmask16;
                    let lane = |l: usize| -> __m512i {
                        let c = 4 * q + l;
                        if c >= channels {
                            return missing;
                        }
                        let src = x[(c * h + y) * w + x0..][..count].as_ptr();
                        // SAFETY: `count` lanes enabled from a slice of `count` values.
                        let v = unsafe { _mm512_maskz_loadu_ps(mask, src) };
                        quantize_512(v, image.inverse_scale, image.zero_point)
                    };
                    let word = _mm512_or_si512(
                        _mm512_or_si512(lane(0), _mm512_slli_epi32::<8>(lane(1))),
                        _mm512_or_si512(_mm512_slli_epi32::<16>(lane(2)), _mm512_slli_epi32::<24>(lane(3))),
                    );
                    let to = dst[x0 * 4..][..count * 4].as_mut_ptr();
                    // SAFETY: `count` words into a slice of `4 · count` bytes.
                    unsafe { _mm512_mask_storeu_epi32(to as *mut i32, mask, word) };
                }
            }
        }
    }

    /// [`Grid::round`](super::Grid::round) on 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    fn round_to_grid(y: __m512, grid: super::Grid) -> __m512 {
        let q = _mm512_cvtepi32_ps(quantize_512(y, grid.inverse_scale, grid.zero_point));
        _mm512_mul_ps(_mm512_sub_ps(q, _mm512_set1_ps(grid.zero_point as f32)), _mm512_set1_ps(grid.scale))
    }

    /// [`Activation::apply`](crate::activation::Activation::apply) on 16 lanes: each bound as
    /// `max(bound, y)` / `min(bound, y)`, which keep `y` unless it is past the bound, as the
    /// scalar comparisons do.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn activate_512(y: __m512, activation: crate::activation::Activation) -> __m512 {
        use crate::activation::Activation;
        match activation {
            Activation::Clip { min, max } => _mm512_min_ps(_mm512_set1_ps(max), _mm512_max_ps(_mm512_set1_ps(min), y)),
            Activation::HardSigmoidGate { alpha, beta } => {
                let gate = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(alpha), y), _mm512_set1_ps(beta));
                let gate = _mm512_min_ps(_mm512_set1_ps(1.0), _mm512_max_ps(_mm512_setzero_ps(), gate));
                _mm512_mul_ps(y, gate)
            }
        }
    }

    /// Loads what [`store_f32`] stores (the same pixels of a channel's `row`); lanes of pixels
    /// outside the output are 0.
    ///
    /// # Safety
    /// As [`store_f32`]: every load goes through a bounds-checked slice of `row`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    unsafe fn load_f32(row: &[f32], oy: usize, x0: usize, oh: usize, ow: usize, split: bool, mask: u32) -> __m512 {
        if split {
            let half = mask as __mmask8;
            // SAFETY: at most `ow` lanes enabled (this function's contract) from `ow` values.
            let lo = unsafe { _mm256_maskz_loadu_ps(half, row[oy * ow..][..ow].as_ptr()) };
            let hi = if oy + 1 < oh {
                // SAFETY: as above, on the next row.
                unsafe { _mm256_maskz_loadu_ps(half, row[(oy + 1) * ow..][..ow].as_ptr()) }
            } else {
                _mm256_setzero_ps()
            };
            _mm512_insertf32x8::<1>(_mm512_castps256_ps512(lo), hi)
        } else if mask != 0 {
            let src = row[oy * ow + x0..][..(ow - x0).min(16)].as_ptr();
            // SAFETY: at most `min(ow − x0, 16)` lanes enabled, the slice's length.
            unsafe { _mm512_maskz_loadu_ps(mask as __mmask16, src) }
        } else {
            _mm512_setzero_ps()
        }
    }

    /// Stores the real pixels of one output vector `y` of a channel's `row` (`oh × ow`): 16
    /// pixels of row `oy` from `x0`, or with `split` 8 of row `oy` and 8 of row `oy + 1`.
    ///
    /// # Safety
    /// The CPU has the target features; `mask` enables at most the real pixels: `min(ow − x0,
    /// 16)` lanes, or with `split` at most `ow <= 8` lanes of each half. Every store goes through
    /// a bounds-checked slice of `row`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    unsafe fn store_f32(
        row: &mut [f32],
        y: __m512,
        oy: usize,
        x0: usize,
        oh: usize,
        ow: usize,
        split: bool,
        mask: u32,
    ) {
        if split {
            let half = mask as __mmask8;
            let lo = row[oy * ow..][..ow].as_mut_ptr();
            // SAFETY: at most `ow` lanes enabled (this function's contract) into `ow` values.
            unsafe { _mm256_mask_storeu_ps(lo, half, _mm512_castps512_ps256(y)) };
            if oy + 1 < oh {
                let hi = row[(oy + 1) * ow..][..ow].as_mut_ptr();
                // SAFETY: as above, on the next row.
                unsafe { _mm256_mask_storeu_ps(hi, half, _mm512_extractf32x8_ps::<1>(y)) };
            }
        } else if mask != 0 {
            let dst = row[oy * ow + x0..][..(ow - x0).min(16)].as_mut_ptr();
            // SAFETY: at most `min(ow − x0, 16)` lanes enabled, the slice's length.
            unsafe { _mm512_mask_storeu_ps(dst, mask as __mmask16, y) };
        }
    }
    /// Rows per block of the AVX2 GEMM, as [`ROW_BLOCK`].
    const ROW_BLOCK_AVX2: usize = 64;

    /// See [`super::gemm`]: the AVX2 path (exact i16 pairs, see the module's documentation).
    ///
    /// # Safety
    /// As [`gemm`], with AVX2 in place of AVX-512 VNNI, and `w` packed for AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn gemm_avx2(a: &[u8], lda: usize, rows: usize, w: &PackedWeights, c: &mut [i32], ldc: usize) {
        let panels = w.columns.div_ceil(PANEL_AVX2);
        let steps = w.depth / DEPTH_STEP;
        // Words per panel: per step, 8 even pairs and 8 odd pairs.
        let panel_len = steps * 2 * PANEL_AVX2;
        for r0 in (0..rows).step_by(ROW_BLOCK_AVX2) {
            let r1 = (r0 + ROW_BLOCK_AVX2).min(rows);
            let mut p = 0;
            while p < panels {
                // Register budget (16): MR × R accumulators + 2R weights + 2 activations + mask.
                let r = (panels - p).min(2);
                let b = &w.words[p * panel_len..];
                let col = p * PANEL_AVX2;
                // SAFETY: as in `gemm`; `b` holds the `panels − p ≥ r` panels from `p` on.
                unsafe {
                    match r {
                        2 => rows_of_avx2::<4, 2>(a, lda, r0, r1, b, panel_len, steps, c, ldc, col),
                        _ => rows_of_avx2::<8, 1>(a, lda, r0, r1, b, panel_len, steps, c, ldc, col),
                    }
                }
                p += r;
            }
        }
    }

    /// [`QuadImage::quantize_from`](super::QuadImage::quantize_from) on AVX2: 8 pixels × 4
    /// channels per step, as [`quantize_image_512`].
    ///
    /// # Safety
    /// The CPU has AVX2; the bounds `quantize_from` asserts hold. Every load and store goes
    /// through a bounds-checked slice.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_image_256(
        image: &super::QuadImage,
        x: &[f32],
        [channels, h, w]: [usize; 3],
        out: &mut [u8],
    ) {
        let [ph, pw] = image.padding;
        let missing = _mm256_set1_epi32(image.zero_point as i32);
        let lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for q in 0..image.quads {
            for y in 0..h {
                let dst = &mut out[((q * image.height + y + ph) * image.width + pw) * 4..][..w * 4];
                for x0 in (0..w).step_by(8) {
                    let count = (w - x0).min(8);
                    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(count as i32), lane_index);
                    let lane = |l: usize| -> __m256i {
                        let c = 4 * q + l;
                        if c >= channels {
                            return missing;
                        }
                        let src = x[(c * h + y) * w + x0..][..count].as_ptr();
                        // SAFETY: `count` lanes enabled from a slice of `count` values.
                        let v = unsafe { _mm256_maskload_ps(src, mask) };
                        quantize_256(v, image.inverse_scale, image.zero_point)
                    };
                    let word = _mm256_or_si256(
                        _mm256_or_si256(lane(0), _mm256_slli_epi32::<8>(lane(1))),
                        _mm256_or_si256(_mm256_slli_epi32::<16>(lane(2)), _mm256_slli_epi32::<24>(lane(3))),
                    );
                    let to = dst[x0 * 4..][..count * 4].as_mut_ptr();
                    // SAFETY: `count` words into a slice of `4 · count` bytes.
                    unsafe { _mm256_maskstore_epi32(to as *mut i32, mask, word) };
                }
            }
        }
    }

    /// [`activate_512`] on 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn activate_256(y: __m256, activation: crate::activation::Activation) -> __m256 {
        use crate::activation::Activation;
        match activation {
            Activation::Clip { min, max } => _mm256_min_ps(_mm256_set1_ps(max), _mm256_max_ps(_mm256_set1_ps(min), y)),
            Activation::HardSigmoidGate { alpha, beta } => {
                let gate = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(alpha), y), _mm256_set1_ps(beta));
                let gate = _mm256_min_ps(_mm256_set1_ps(1.0), _mm256_max_ps(_mm256_setzero_ps(), gate));
                _mm256_mul_ps(y, gate)
            }
        }
    }

    /// [`quantize_512`] on 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn quantize_256(y: __m256, inverse_scale: f32, zero_point: u8) -> __m256i {
        let v = _mm256_add_ps(_mm256_mul_ps(y, _mm256_set1_ps(inverse_scale)), _mm256_set1_ps(zero_point as f32));
        _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_set1_ps(255.0)))
    }

    /// The even bytes (0 and 2) and the odd bytes (1 and 3) of each word of `v`, as i16 pairs.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn split_pairs(v: __m256i) -> (__m256i, __m256i) {
        (_mm256_and_si256(v, _mm256_set1_epi32(0x00FF_00FF)), _mm256_srli_epi16::<8>(v))
    }

    /// `acc + even · w_even + odd · w_odd`, each `vpmaddwd` adding two i16 products into i32.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn madd_pairs(acc: __m256i, even: __m256i, odd: __m256i, w_even: __m256i, w_odd: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(even, w_even), _mm256_madd_epi16(odd, w_odd)))
    }

    /// Rows `r0..r1` against `R` AVX2 panels starting at `b`, in tiles of `MR` rows.
    ///
    /// # Safety
    /// The CPU has AVX2; `b` holds `R` panels of `panel_len = steps · 16` words; rows `r0..r1`
    /// of `a` (`lda` apart) hold at least `steps · 4` bytes each; `c` holds rows `r0..r1` of
    /// `ldc` values, and `col + 8 · R <= ldc`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn rows_of_avx2<const MR: usize, const R: usize>(
        a: &[u8],
        lda: usize,
        r0: usize,
        r1: usize,
        b: &[i32],
        panel_len: usize,
        steps: usize,
        c: &mut [i32],
        ldc: usize,
        col: usize,
    ) {
        let mut i = r0;
        while i < r1 {
            let used = MR.min(r1 - i);
            // Rows past the end repeat the last row (read, never stored), so every load is in bounds.
            let rows: [*const u8; MR] = std::array::from_fn(|t| a[(i + t.min(used - 1)) * lda..].as_ptr());
            let mut acc = [[_mm256_setzero_si256(); R]; MR];
            let b = b.as_ptr();
            for s in 0..steps {
                // SAFETY: 2 × 8 words at `(s + 1) · 16 <= panel_len` into panel `j < R` of `b`.
                let wv: [(__m256i, __m256i); R] = std::array::from_fn(|j| unsafe {
                    let at = b.add(j * panel_len + s * 2 * PANEL_AVX2);
                    (_mm256_loadu_si256(at as *const __m256i), _mm256_loadu_si256(at.add(PANEL_AVX2) as *const __m256i))
                });
                for t in 0..MR {
                    // SAFETY: 4 bytes at `s · 4 + 4 <= steps · 4` into a row below `r1`.
                    let word = unsafe { (rows[t].add(s * DEPTH_STEP) as *const i32).read_unaligned() };
                    let (even, odd) = split_pairs(_mm256_set1_epi32(word));
                    for j in 0..R {
                        acc[t][j] = madd_pairs(acc[t][j], even, odd, wv[j].0, wv[j].1);
                    }
                }
            }
            for (t, acc) in acc.iter().enumerate().take(used) {
                for (j, v) in acc.iter().enumerate() {
                    let dst = c[(i + t) * ldc + col + j * PANEL_AVX2..][..PANEL_AVX2].as_mut_ptr();
                    // SAFETY: `dst` starts an 8-value slice of `c` (bounds checked just above).
                    unsafe { _mm256_storeu_si256(dst as *mut __m256i, *v) };
                }
            }
            i += MR;
        }
    }

    /// The direct convolution on AVX2: tiles of 4 output channels (one quad of the next image)
    /// × 2 vectors of 8 grid pixels, each vector inside one grid row (the grid's width is a
    /// multiple of 8), for the output channels `channels`, written to `out` from the range's
    /// first.
    ///
    /// # Safety
    /// As [`direct`], with AVX2 in place of AVX-512 VNNI, and `conv` packed for AVX2.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn direct_avx2(
        conv: &DirectConv,
        channels: std::ops::Range<usize>,
        image: &[u8],
        hp: usize,
        wp: usize,
        oh: usize,
        ow: usize,
        out: Output<'_>,
        epilogue: &Epilogue<'_>,
    ) {
        // SAFETY: this function's contract is `direct_tiles_avx2`'s; `S` is the stride.
        unsafe {
            if conv.stride == 1 {
                direct_tiles_avx2::<1>(conv, channels, image, hp, wp, oh, ow, out, epilogue)
            } else {
                direct_tiles_avx2::<2>(conv, channels, image, hp, wp, oh, ow, out, epilogue)
            }
        }
    }

    /// See [`direct_avx2`]; `S` is the stride (with 2, a vector gathers the even words of two
    /// loads).
    ///
    /// # Safety
    /// As [`direct_tiles`]: everything [`DirectConv::run`] asserts, AVX2, `conv` packed for it.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn direct_tiles_avx2<const S: usize>(
        conv: &DirectConv,
        channels: std::ops::Range<usize>,
        image: &[u8],
        hp: usize,
        wp: usize,
        oh: usize,
        ow: usize,
        mut out: Output<'_>,
        epilogue: &Epilogue<'_>,
    ) {
        const MR: usize = 4;
        const V: usize = 2;
        const LANES: usize = 8;
        let [kh, kw] = conv.kernel;
        let n = oh * ow;
        let (gh, gw) = DirectConv::grid(oh, ow);
        let img = image.as_ptr();
        let words = conv.words.as_ptr();
        let zero = _mm256_setzero_si256();
        let lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        // Lanes of a vector at column `x` that hold real pixels, as a mask of whole lanes.
        let real = |x: usize| (ow - x).min(LANES);
        let lane_mask = |count: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32(count as i32), lane_index);
        for p0 in (0..gh * gw).step_by(LANES * V) {
            // Each vector's grid row and column, and the byte offset of its first pixel (tap 0, quad 0).
            let at: [(usize, usize); V] = std::array::from_fn(|v| ((p0 + LANES * v) / gw, (p0 + LANES * v) % gw));
            let first: [usize; V] = std::array::from_fn(|v| (at[v].0 * S * wp + at[v].1 * S) * 4);
            // The V vectors of one tap of one quad, `shift` bytes past each vector's first
            // pixel, as i16 pairs.
            let pairs = |shift: usize| -> [(__m256i, __m256i); V] {
                // SAFETY: as in `direct_tiles`: each load reads pixels of one quad's plane
                // inside the receptive field of grid pixels, which `hp × wp` covers; a stride-2
                // load reads at most one word past the last pixel it uses, which lands in the
                // next row or the SLACK.
                std::array::from_fn(|v| unsafe {
                    let p = img.add(first[v] + shift);
                    let a = if S == 2 {
                        // 8 output pixels: the even words of 16 input pixels.
                        let lo = _mm256_castsi256_ps(_mm256_loadu_si256(p as *const __m256i));
                        let hi = _mm256_castsi256_ps(_mm256_loadu_si256(p.add(32) as *const __m256i));
                        let mixed = _mm256_castps_si256(_mm256_shuffle_ps::<0b10_00_10_00>(lo, hi));
                        _mm256_permute4x64_epi64::<0b11_01_10_00>(mixed)
                    } else {
                        _mm256_loadu_si256(p as *const __m256i)
                    };
                    split_pairs(a)
                })
            };
            for o0 in (channels.start..channels.end.min(conv.out_channels)).step_by(MR) {
                let mut acc = [[zero; V]; MR];
                if let Some(sparse) = &conv.sparse {
                    // Each channel's own non-zero words (two i16-pair words per block), into
                    // four sets of partial sums as on AVX-512.
                    for (t, acc) in acc.iter_mut().enumerate().take(conv.out_channels - o0) {
                        let blocks = sparse.start[o0 + t] as usize..sparse.start[o0 + t + 1] as usize;
                        let (at, words) =
                            (&sparse.offset[blocks.clone()], &sparse.words[2 * blocks.start..2 * blocks.end]);
                        let mut part = [[zero; V]; 4];
                        let step = |part: &mut [__m256i; V], offset: u32, word: &[i32]| {
                            let a = pairs(offset as usize);
                            let (we, wo) = (_mm256_set1_epi32(word[0]), _mm256_set1_epi32(word[1]));
                            for v in 0..V {
                                part[v] = madd_pairs(part[v], a[v].0, a[v].1, we, wo);
                            }
                        };
                        let whole = at.len() / 4 * 4;
                        for (at, words) in at[..whole].chunks_exact(4).zip(words[..2 * whole].chunks_exact(8)) {
                            for k in 0..4 {
                                step(&mut part[k], at[k], &words[2 * k..2 * k + 2]);
                            }
                        }
                        for (&at, word) in at[whole..].iter().zip(words[2 * whole..].chunks_exact(2)) {
                            step(&mut part[0], at, word);
                        }
                        for v in 0..V {
                            let sum = _mm256_add_epi32(_mm256_add_epi32(part[0][v], part[1][v]), part[2][v]);
                            acc[v] = _mm256_add_epi32(sum, part[3][v]);
                        }
                    }
                } else {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let tap = ky * kw + kx;
                            for q in 0..conv.quads {
                                let a = pairs(((q * hp + ky) * wp + kx) * 4);
                                // SAFETY: `tap < kh · kw`, `q < quads` and `o0 + 4 <= out_padded`: the
                                // 8 words read below lie inside `words` (`2 · kh·kw·quads·out_padded`).
                                let w = unsafe { words.add(((tap * conv.quads + q) * conv.out_padded + o0) * 2) };
                                for (t, acc) in acc.iter_mut().enumerate() {
                                    // SAFETY: `t < 4`, see above.
                                    let (we, wo) = unsafe {
                                        (_mm256_set1_epi32(*w.add(2 * t)), _mm256_set1_epi32(*w.add(2 * t + 1)))
                                    };
                                    for v in 0..V {
                                        acc[v] = madd_pairs(acc[v], a[v].0, a[v].1, we, wo);
                                    }
                                }
                            }
                        }
                    }
                }
                // The same operations, in the same order, as the AVX-512 epilogue.
                let mut ys = [[_mm256_setzero_ps(); V]; MR];
                for (t, acc) in acc.iter().enumerate() {
                    let o = o0 + t;
                    if o >= conv.out_channels {
                        break;
                    }
                    let correction = _mm256_set1_epi32(epilogue.correction[o]);
                    let scale = _mm256_set1_ps(epilogue.scale[o]);
                    let bias = _mm256_set1_ps(epilogue.bias[o]);
                    let weight_zero = epilogue.weight_zero.get(o).map(|&z| _mm256_set1_epi32(z));
                    for (v, a) in acc.iter().enumerate() {
                        let mut a = _mm256_sub_epi32(*a, correction);
                        if let Some(z) = weight_zero {
                            // SAFETY: 8 i32 of a slice of that length (bounds checked as it is made).
                            let sums = unsafe {
                                _mm256_loadu_si256(
                                    epilogue.window_sums[p0 + LANES * v..][..LANES].as_ptr() as *const __m256i
                                )
                            };
                            a = _mm256_sub_epi32(a, _mm256_mullo_epi32(z, sums));
                        }
                        let y = _mm256_cvtepi32_ps(a);
                        let mut y = _mm256_add_ps(_mm256_mul_ps(y, scale), bias);
                        if let Some(grid) = epilogue.grid {
                            let q = _mm256_cvtepi32_ps(quantize_256(y, grid.inverse_scale, grid.zero_point));
                            let zero_point = _mm256_set1_ps(grid.zero_point as f32);
                            y = _mm256_mul_ps(_mm256_sub_ps(q, zero_point), _mm256_set1_ps(grid.scale));
                        }
                        let (gy, gx) = at[v];
                        if !epilogue.residual.is_empty() && gy < oh && gx < ow {
                            let count = real(gx);
                            let src = epilogue.residual[o * n + gy * ow + gx..][..count].as_ptr();
                            // SAFETY: `count` lanes from a slice of `count` values.
                            let x = unsafe {
                                if count == LANES {
                                    _mm256_loadu_ps(src)
                                } else {
                                    _mm256_maskload_ps(src, lane_mask(count))
                                }
                            };
                            y = _mm256_add_ps(y, x);
                        }
                        if epilogue.relu {
                            y = _mm256_max_ps(y, _mm256_setzero_ps());
                        }
                        if let Some(a) = epilogue.activation {
                            y = activate_256(y, a);
                        }
                        ys[t][v] = y;
                    }
                }
                match &mut out {
                    Output::F32(out) => {
                        for (t, ys) in ys.iter().enumerate().take(conv.out_channels.saturating_sub(o0)) {
                            let c = o0 + t - channels.start;
                            let plane = &mut out[c * n..(c + 1) * n];
                            for (v, &y) in ys.iter().enumerate() {
                                let (gy, gx) = at[v];
                                if gy >= oh || gx >= ow {
                                    continue;
                                }
                                let count = real(gx);
                                let dst = plane[gy * ow + gx..][..count].as_mut_ptr();
                                // SAFETY: `count` lanes into a slice of `count` values.
                                unsafe {
                                    if count == LANES {
                                        _mm256_storeu_ps(dst, y)
                                    } else {
                                        _mm256_maskstore_ps(dst, lane_mask(count), y)
                                    }
                                }
                            }
                        }
                    }
                    Output::Quads { bytes, image } => {
                        // Rounded as the next layer rounds its input (`kernels::quantize_u8`:
                        // multiply, add the zero point, clamp, round half to even; NaN to 0);
                        // the four channels of the tile are one quad, each pixel one word.
                        let quad = (o0 - channels.start) / 4;
                        let plane =
                            &mut bytes[quad * image.height * image.width * 4..][..image.height * image.width * 4];
                        let [ph, pw] = image.padding;
                        #[allow(clippy::needless_range_loop)] // `v` indexes the inner arrays of `ys`
                        for v in 0..V {
                            let (gy, gx) = at[v];
                            if gy >= oh || gx >= ow {
                                continue;
                            }
                            let q: [__m256i; MR] =
                                std::array::from_fn(|c| quantize_256(ys[c][v], image.inverse_scale, image.zero_point));
                            let px = _mm256_or_si256(
                                _mm256_or_si256(q[0], _mm256_slli_epi32::<8>(q[1])),
                                _mm256_or_si256(_mm256_slli_epi32::<16>(q[2]), _mm256_slli_epi32::<24>(q[3])),
                            );
                            let count = real(gx);
                            let dst = plane[((gy + ph) * image.width + gx + pw) * 4..][..4 * count].as_mut_ptr();
                            // SAFETY: `count` words into a slice of `4 · count` bytes.
                            unsafe {
                                if count == LANES {
                                    _mm256_storeu_si256(dst as *mut __m256i, px)
                                } else {
                                    _mm256_maskstore_epi32(dst as *mut i32, lane_mask(count), px)
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fill_border` writes the zero point everywhere outside the `h × w` image (also in rows and
    /// columns past what the padding needs), and leaves every byte inside it.
    #[test]
    fn fill_border_writes_the_zero_point_exactly_around_the_image() {
        for (quads, [height, width], [h, w], padding) in [
            (2, [7, 6], [5, 4], [1, 1]),
            (1, [9, 10], [5, 4], [1, 1]),
            (3, [4, 9], [3, 7], [0, 2]),
            (1, [3, 3], [0, 1], [1, 1]),
        ] {
            let image = QuadImage { quads, height, width, padding, inverse_scale: 1.0, zero_point: 7 };
            let mut out = vec![0xa5u8; image.len()];
            image.fill_border([h, w], &mut out);
            let [ph, pw] = padding;
            for (i, &v) in out.iter().enumerate() {
                let (x, y) = (i / 4 % width, i / 4 / width % height);
                let inside = (ph..ph + h).contains(&y) && (pw..pw + w).contains(&x);
                assert_eq!(v, if inside { 0xa5 } else { 7 }, "{image:?}, image {h}x{w}: byte {i}");
            }
        }
    }

    /// The kernel equals a plain i32 loop exactly, for shapes that exercise partial panels,
    /// partial row tiles, every panel group width and depths that are not a multiple of 4.
    #[test]
    fn gemm_equals_the_reference_loop_on_every_path() {
        for isa in paths_for_test("gemm_equals_the_reference_loop_on_every_path") {
            gemm_equals_the_reference_loop(isa);
        }
    }

    fn gemm_equals_the_reference_loop(isa: Isa) {
        for (m, k, n) in [(1, 1, 1), (7, 5, 3), (13, 144, 16), (50, 27, 33), (97, 300, 64), (200, 64, 80), (17, 9, 10)]
        {
            let a: Vec<u8> = (0..m * k).map(|i| (i * 37 % 256) as u8).collect();
            let w: Vec<i8> = (0..k * n).map(|i| ((i * 53 % 256) as i32 - 128) as i8).collect();
            let packed = PackedWeights::with_isa(&w, k, n, isa);
            let lda = packed.padded_depth() + 8;
            let mut rows = vec![0u8; m * lda];
            for r in 0..m {
                rows[r * lda..r * lda + k].copy_from_slice(&a[r * k..(r + 1) * k]);
                // Padding bytes meet zero weights: any value gives the same result.
                rows[r * lda + k..(r + 1) * lda].fill(0xA5);
            }
            let ldc = packed.padded_columns();
            let mut c = vec![-1i32; m * ldc];
            gemm(&rows, lda, m, &packed, &mut c);
            for r in 0..m {
                for j in 0..n {
                    let want: i32 = (0..k).map(|p| a[r * k + p] as i32 * w[p * n + j] as i32).sum();
                    assert_eq!(c[r * ldc + j], want, "{isa:?} {m}x{k}x{n} at ({r},{j})");
                }
            }
            for j in 0..n {
                assert_eq!(packed.column_sums()[j], (0..k).map(|p| w[p * n + j] as i32).sum::<i32>());
            }
        }
    }

    /// Extreme values: 255 × −128 and 255 × 127 summed over a long depth stay exact (no
    /// saturation, where `vpmaddubsw` would clip each pair at ±32,767), on every path.
    #[test]
    fn gemm_does_not_saturate() {
        for isa in paths_for_test("gemm_does_not_saturate") {
            for weight in [-128i8, 127] {
                let (m, k, n) = (3, 4096, 16);
                let a = vec![255u8; m * k];
                let w = vec![weight; k * n];
                let packed = PackedWeights::with_isa(&w, k, n, isa);
                let mut c = vec![0i32; m * packed.padded_columns()];
                gemm(&a, k, m, &packed, &mut c);
                assert!(c.iter().all(|&v| v == 255 * weight as i32 * k as i32), "{isa:?} {weight}");
            }
        }
    }

    /// Quantizing an f32 image into the four-channel layout gives the same bytes on every path
    /// as [`quantize`] value by value: rows that fill no whole vector, channels that fill no
    /// whole quad, padding on every side, ties, values beyond both ends of the range and NaN.
    #[test]
    fn quantized_images_equal_the_scalar_definition_on_every_path() {
        let paths: Vec<Isa> = paths_for_test("quantized_images_equal_the_scalar_definition_on_every_path");
        for &(channels, h, w, padding) in
            &[(1usize, 3usize, 5usize, [1usize, 2]), (4, 7, 16, [0, 0]), (6, 5, 37, [2, 1]), (16, 2, 8, [1, 1])]
        {
            let image = QuadImage {
                quads: channels.div_ceil(4),
                height: h + 2 * padding[0] + 1,
                width: w + 2 * padding[1] + 3,
                padding,
                inverse_scale: 1.0 / 0.25,
                zero_point: 37,
            };
            let x: Vec<f32> = (0..channels * h * w)
                .map(|i| match i % 13 {
                    0 => f32::NAN,
                    1 => 1e9,
                    2 => -1e9,
                    3 => 0.125 * (i % 7) as f32, // ties on the quarter grid: .5 steps
                    _ => (i as f32 * 0.37).sin() * 40.0,
                })
                .collect();
            let want: Vec<u8> = (0..image.len())
                .map(|at| {
                    let (px, lane) = (at / 4, at % 4);
                    let (q, y, xx) =
                        (px / (image.height * image.width), px / image.width % image.height, px % image.width);
                    let (c, y, xx) = (4 * q + lane, y.wrapping_sub(padding[0]), xx.wrapping_sub(padding[1]));
                    if c < channels && y < h && xx < w {
                        quantize(x[(c * h + y) * w + xx], image.inverse_scale, image.zero_point as f32)
                    } else {
                        image.zero_point
                    }
                })
                .collect();
            assert!(want.contains(&0) && want.contains(&255));
            for isa in paths.iter().copied().chain([Isa::Avx512].into_iter().filter(|i| i.available())) {
                let mut out = vec![0xA5u8; image.len()];
                image.quantize_from(&x, [channels, h, w], &mut out, isa);
                assert_eq!(out, want, "{isa:?}, {channels} channels {h}x{w}");
            }
        }
    }

    /// The direct convolution's accumulators against a plain loop over the padded image, on
    /// every path and both strides, with extreme bytes (no saturation) and output channels that
    /// fill no whole tile; f32 output (scale 1, no bias: the accumulators themselves) and the
    /// requantized image, whose bytes both paths must agree on.
    #[test]
    fn direct_conv_equals_the_reference_loop_on_every_path() {
        let paths: Vec<Isa> = paths_for_test("direct_conv_equals_the_reference_loop_on_every_path")
            .into_iter()
            .filter(|&i| DirectConv::runs_on(i))
            .collect();
        for (case, &(cin, cout, [kh, kw], stride, (oh, ow))) in [
            (3usize, 5usize, [3usize, 3], 1usize, (7usize, 7usize)),
            (8, 16, [3, 3], 1, (12, 14)),
            (4, 6, [1, 1], 2, (8, 7)),
            (9, 11, [3, 3], 2, (6, 30)),
            (1, 8, [5, 5], 1, (24, 24)),
            (16, 4, [3, 1], 1, (3, 32)),
            (8, 37, [3, 3], 2, (7, 7)),
        ]
        .iter()
        .enumerate()
        {
            let (hp, wp) = DirectConv::image_size([kh, kw], stride, 0, 0, oh, ow);
            let quads = cin.div_ceil(4);
            let mut state = 0x9E37_79B9u32.wrapping_mul(case as u32 + 1);
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state
            };
            // Half the bytes and weights at the extremes, the rest anywhere.
            let image: Vec<u8> = (0..quads * hp * wp * 4 + DirectConv::SLACK)
                .map(|_| match next() % 4 {
                    0 => 255,
                    1 => 0,
                    _ => next() as u8,
                })
                .collect();
            // Odd cases pruned: 80 % of the weights zero, so whole words are skipped.
            let weight: Vec<i8> = (0..cout * cin * kh * kw)
                .map(|_| match next() % 4 {
                    _ if case % 2 == 1 && next() % 10 < 8 => 0,
                    0 => 127,
                    1 => -128,
                    _ => next() as i8,
                })
                .collect();
            let byte = |c: usize, y: usize, x: usize| {
                if c < cin { image[((c / 4 * hp + y) * wp + x) * 4 + c % 4] as i32 } else { 0 }
            };
            let want: Vec<i32> = (0..cout * oh * ow)
                .map(|i| {
                    let (o, y, x) = (i / (oh * ow), i / ow % oh, i % ow);
                    let mut sum = 0;
                    for c in 0..cin {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let w = weight[((o * cin + c) * kh + ky) * kw + kx] as i32;
                                sum += w * byte(c, y * stride + ky, x * stride + kx);
                            }
                        }
                    }
                    sum
                })
                .collect();
            let zeros = vec![0i32; cout];
            let (ones, nothing) = (vec![1.0f32; cout], vec![0.0f32; cout]);
            let epilogue = Epilogue {
                correction: &zeros,
                scale: &ones,
                bias: &nothing,
                relu: false,
                weight_zero: &[],
                window_sums: &[],
                grid: None,
                residual: &[],
                activation: None,
            };
            // The whole epilogue: zero-point correction, scale and bias, a rounded output, a
            // residual add (values on both sides of 0 and of the grid's range) and the ReLU,
            // against its scalar definition.
            let correction: Vec<i32> = (0..cout).map(|_| (next() % 2001) as i32 - 1000).collect();
            let scale: Vec<f32> = (0..cout).map(|_| 2e-5 + (next() % 1000) as f32 * 2e-7).collect();
            let bias: Vec<f32> = (0..cout).map(|_| (next() % 2001) as f32 / 100.0 - 10.0).collect();
            let residual: Vec<f32> = (0..cout * oh * ow).map(|_| (next() % 4001) as f32 / 100.0 - 20.0).collect();
            let full = Epilogue {
                correction: &correction,
                scale: &scale,
                bias: &bias,
                relu: true,
                weight_zero: &[],
                window_sums: &[],
                grid: Some(Grid::new(0.37, 7)),
                residual: &residual,
                activation: None,
            };
            let full_want: Vec<f32> =
                (0..cout * oh * ow).map(|i| full.apply(i / (oh * ow), want[i], 0, residual[i])).collect();
            assert!(full_want.contains(&0.0) && full_want.iter().any(|&v| v > 0.0), "case {case}");
            // The activations a plan fuses after the epilogue (a ReLU6-like clip with bounds on
            // both sides of the values, hard-swish), with and without the rounding and the add.
            let activated = [
                Epilogue { relu: false, activation: Some(Activation::Clip { min: -1.5, max: 6.0 }), ..full },
                Epilogue { relu: false, grid: None, activation: Some(Activation::HARD_SWISH), ..full },
                Epilogue {
                    residual: &[],
                    activation: Some(Activation::HardSigmoidGate { alpha: 0.2, beta: 0.5 }),
                    ..full
                },
            ];
            let activated_want: Vec<Vec<f32>> = activated
                .iter()
                .map(|e| (0..cout * oh * ow).map(|i| e.apply(i / (oh * ow), want[i], 0, residual[i])).collect())
                .collect();
            for (e, w) in activated.iter().zip(&activated_want) {
                let plain = Epilogue { activation: None, ..*e };
                let changed =
                    (0..cout * oh * ow).filter(|&i| plain.apply(i / (oh * ow), want[i], 0, residual[i]) != w[i]);
                assert!(changed.count() > 0, "case {case}: {:?} changes nothing", e.activation);
            }
            let next_image = QuadImage {
                quads: cout.div_ceil(4),
                height: oh + 2,
                width: ow + 2,
                padding: [1, 1],
                inverse_scale: 1.0 / 700.0,
                zero_point: 100,
            };
            let mut requantized = Vec::new();
            // One thread, and the output channels split between three workers.
            let (one, three) = (Team::sequential(), Team::always_split(3).unwrap());
            for &isa in &paths {
                let dense = DirectConv::with_isa(&weight, cout, cin, [kh, kw], stride, isa);
                let sparse = dense.clone().into_sparse(hp, wp);
                assert!(sparse.is_sparse() && !dense.is_sparse());
                assert_eq!(dense.word_density() < 0.9, case % 2 == 1, "case {case}: {}", dense.word_density());
                for (conv, team) in [(&dense, &one), (&dense, &three), (&sparse, &one), (&sparse, &three)] {
                    let threads = team.threads();
                    let mut out = vec![f32::NAN; cout * oh * ow];
                    conv.run_on(&image, hp, wp, oh, ow, Output::F32(&mut out), &epilogue, team);
                    for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                        assert_eq!(got, want as f32, "{isa:?} case {case}, {threads} threads, at {i}");
                    }
                    out.fill(f32::NAN);
                    conv.run_on(&image, hp, wp, oh, ow, Output::F32(&mut out), &full, team);
                    for (i, (&got, &want)) in out.iter().zip(&full_want).enumerate() {
                        assert_eq!(got, want, "{isa:?} case {case}, {threads} threads, whole epilogue at {i}");
                    }
                    for (e, want) in activated.iter().zip(&activated_want) {
                        out.fill(f32::NAN);
                        conv.run_on(&image, hp, wp, oh, ow, Output::F32(&mut out), e, team);
                        for (i, (&got, &want)) in out.iter().zip(want).enumerate() {
                            assert_eq!(got.to_bits(), want.to_bits(), "{isa:?} case {case}, {:?} at {i}", e.activation);
                        }
                    }
                    // Only the border filled, over two different canaries: the kernel must
                    // write every other byte.
                    let mut runs = [0x00u8, 0xff].map(|canary| {
                        let mut bytes = vec![canary; next_image.len()];
                        next_image.fill_border([oh, ow], &mut bytes);
                        let quads = Output::Quads { bytes: &mut bytes, image: next_image };
                        conv.run_on(&image, hp, wp, oh, ow, quads, &epilogue, team);
                        bytes
                    });
                    assert!(runs[0] == runs[1], "{isa:?} case {case}, {threads} threads: bytes left unwritten");
                    requantized.push(std::mem::take(&mut runs[0]));
                }
            }
            assert!(requantized.windows(2).all(|w| w[0] == w[1]), "case {case}: the paths requantize differently");
        }
    }
}
