//! Integer kernels for the CPU plan: u8 × i8 → i32, weights quantized and packed once when the
//! plan is frozen, never dequantized while it runs. On CPUs with AVX-512 VNNI the arithmetic is
//! our own ([`crate::vnni`]: a direct convolution, and a GEMM that needs no packing of the
//! activations); elsewhere it is rten-gemm's (AVX-512, AVX2 or NEON, chosen at run time).
//!
//! Activations travel between steps of the plan in f32. Each integer layer quantizes its input
//! to u8 in one pass (the rounding its calibrated parameters define), multiplies in integers,
//! and its epilogue turns the i32 accumulators back into f32 with the input and per-channel
//! weight scales, the bias and the fused ReLU. The exception: a direct convolution feeding
//! another one alone writes its output already requantized in the layout that one reads
//! ([`ConvDirectInt8::requantize_for`]), the same bytes the other would have computed.

use std::cell::RefCell;

use rten_gemm::{GemmExecutor, GemmInputA, GemmInputB, GemmOptions, QuantParams as RtenQuant};
use rten_tensor::NdTensorView;
use shrink_core::graph::{Op, ValueShape};
use shrink_core::runtime::{Kernel, LayerView, RunContext};

use crate::QuantParams;

thread_local! {
    // rten's executor is not `Send`: one per thread, all with the same kernel for this CPU, so
    // weights packed by one are valid for every other.
    static INT8: GemmExecutor<u8, i8, i32> = GemmExecutor::default();
    /// Quantized inputs, zero points and i32 accumulators, reused across calls: a forward pass
    /// allocates only when a layer needs more than any before it on this thread.
    static BUFFERS: RefCell<Buffers> = const {
        RefCell::new(Buffers { image: Vec::new(), patches: Vec::new(), row_zero: Vec::new(), acc: Vec::new(), sums: Vec::new() })
    };
}

/// The name of the integer GEMM kernel the plans use on this CPU: `shrink-avx512-vnni`, or the
/// one rten picked (e.g. `x86_64-u8i8i32-avx2`).
pub fn int8_gemm_kernel_name() -> String {
    if crate::vnni::available() { "shrink-avx512-vnni".into() } else { INT8.with(|e| e.kernel_name().to_string()) }
}

/// Which GEMM an integer layer runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Gemm {
    /// [`crate::vnni`]: the default where the CPU has AVX-512 VNNI.
    Vnni,
    /// rten-gemm: everywhere else.
    Rten,
}

impl Int8Gemm {
    /// The fastest one this CPU runs.
    pub fn best() -> Self {
        if crate::vnni::available() { Self::Vnni } else { Self::Rten }
    }
}

/// Weights `[k, n]` (i8, symmetric: zero point 0) packed once for one of the GEMMs.
enum PackedInt8 {
    Vnni(crate::vnni::PackedWeights),
    /// With the depth, the weights' zero points (all 0, passed on every call) and
    /// [`Self::zero_sums`] (all 0).
    Rten(rten_gemm::PackedBMatrix<i8>, usize, Vec<i8>, Vec<i32>),
}

impl PackedInt8 {
    fn new(wt: &[i8], k: usize, n: usize, gemm: Int8Gemm) -> Self {
        match gemm {
            Int8Gemm::Vnni => Self::Vnni(crate::vnni::PackedWeights::new(wt, k, n)),
            Int8Gemm::Rten => {
                Self::Rten(INT8.with(|e| e.prepack_b(NdTensorView::from_data([k, n], wt))), k, vec![0; n], vec![0; n])
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Vnni(_) => "vnni",
            Self::Rten(..) => "rten",
        }
    }

    /// Bytes between rows of the activations.
    fn lda(&self, k: usize) -> usize {
        match self {
            Self::Vnni(w) => w.padded_depth(),
            Self::Rten(..) => k,
        }
    }

    /// Values between rows of the accumulators.
    fn ldc(&self, n: usize) -> usize {
        match self {
            Self::Vnni(w) => w.padded_columns(),
            Self::Rten(..) => n,
        }
    }

    /// Per column `j`, what times the activations' zero point to subtract from the
    /// accumulators: rten subtracts zero points itself (0), the VNNI kernel leaves
    /// `zero · Σ_k w[k, j]`.
    fn zero_sums(&self) -> &[i32] {
        match self {
            Self::Vnni(w) => w.column_sums(),
            Self::Rten(_, _, _, zeros) => zeros,
        }
    }

    /// `acc [rows, ldc] = a [rows, lda] × w`, exact (zero points handled as
    /// [`Self::zero_sums`] says).
    fn gemm(&self, a: &[u8], rows: usize, zero: u8, row_zero: &mut Vec<u8>, acc: &mut [i32]) {
        match self {
            Self::Vnni(w) => crate::vnni::gemm(a, w.padded_depth(), rows, w, acc),
            &Self::Rten(ref w, k, ref weight_zero, _) => {
                let n = weight_zero.len();
                row_zero.clear();
                row_zero.resize(rows, zero);
                let opts = GemmOptions {
                    a_quant: Some(RtenQuant { zero_point: &row_zero[..] }),
                    b_quant: Some(RtenQuant { zero_point: weight_zero }),
                    ..Default::default()
                };
                let a = GemmInputA::Unpacked(NdTensorView::from_data([rows, k], &a[..rows * k]));
                INT8.with(|e| e.gemm(&mut acc[..rows * n], a, GemmInputB::Packed(w), opts))
                    .expect("shapes checked at freeze time");
            }
        }
    }
}

struct Buffers {
    /// A quantized image (conv, channels-last and padded) or batch (linear).
    image: Vec<u8>,
    /// A conv's patch rows.
    patches: Vec<u8>,
    /// One zero point per row of the left-hand side.
    row_zero: Vec<u8>,
    acc: Vec<i32>,
    /// Per GEMM row (or output pixel): `Σ_k (a_k − a_zero)`, for asymmetric weights.
    sums: Vec<i32>,
}

/// 1.5 × 2²³: added to a float in `[0, 2²²)`, it leaves that float rounded to the nearest
/// integer (ties to even) in the low mantissa bits, a rounding that vectorises (unlike
/// `f32::round` without SSE4.1, or a saturating float-to-int cast).
const ROUNDING_MAGIC: f32 = 12_582_912.0;

/// `round_ties_even(clamp(v / scale + zero_point, 0, 255))` for `v * inv` = `v / scale`.
#[inline(always)]
fn quantize_one(v: f32, inv: f32, zp: f32) -> u8 {
    (((v * inv + zp).clamp(0.0, 255.0) + ROUNDING_MAGIC).to_bits() & 0xFF) as u8
}

/// Quantizes `x` to u8 with `p`: `q = round(clamp(x / scale + zp, 0, 255))`, ties to even, as
/// `f32::round_ties_even` would; NaN becomes 0. One pass, vectorised.
pub fn quantize_u8(x: &[f32], p: QuantParams, out: &mut [u8]) {
    let (inv, zp) = (1.0 / p.scale, p.zero_point as f32);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = quantize_one(v, inv, zp);
    }
}

/// Bytes of unrolled patches one integer conv call works on (several images per GEMM when they
/// are small).
const ROWS_BUDGET: usize = 1 << 20;

/// Rounds `w / scale` to the nearest integer in `[-qmax, qmax]`.
pub(crate) fn quantize_weight(w: f32, scale: f32, qmax: i32) -> i32 {
    ((w / scale).round() as i32).clamp(-qmax, qmax)
}

/// The integer form of one layer, as the plan's builders receive it.
#[derive(Clone, Debug)]
pub struct IntLayer {
    /// Weight bits (8, 4 or 2: all run on the same int8 kernel; fewer bits only shrink the file).
    pub weight_bits: u32,
    /// Weight scale per output channel.
    pub weight_scales: Vec<f32>,
    /// Asymmetric weights: the zero point per output channel, in the signed storage range
    /// `[-2^(bits-1), 2^(bits-1) - 1]` (the unsigned zero point minus `2^(bits-1)`), so that
    /// `w = scale · (q − zero_point)` for stored `q` in the same range. Empty: symmetric
    /// (zero point 0, `q` in `[-(2^(bits-1) - 1), 2^(bits-1) - 1]`).
    pub weight_zero_points: Vec<i32>,
    /// u8 parameters of the layer's input (ignored when `dynamic`).
    pub input: QuantParams,
    /// Dynamic quantization: the input's range is measured on each batch at run time.
    pub dynamic: bool,
}

impl IntLayer {
    /// The stored integer of weight `w` (already on the grid, or any f32) of output channel `o`.
    pub fn int_weight(&self, w: f32, o: usize) -> i8 {
        int_weight(w, self.weight_scales[o], self.weight_zero_points.get(o).copied(), self.weight_bits)
    }

    /// The weight zero points when any is not 0: the kernels then subtract
    /// `zero_point[o] · Σ_k (a_k − a_zero)` per output.
    fn nonzero_weight_zero_points(&self) -> Option<Vec<i32>> {
        self.weight_zero_points.iter().any(|&z| z != 0).then(|| self.weight_zero_points.clone())
    }
}

/// The stored integer of weight `w`: symmetric (`zero_point` `None`) rounds `w / scale` into
/// `[-qmax, qmax]`; asymmetric adds the zero point and clamps to the full signed range.
pub(crate) fn int_weight(w: f32, scale: f32, zero_point: Option<i32>, bits: u32) -> i8 {
    match zero_point {
        None => quantize_weight(w, scale, crate::symmetric_max(bits)) as i8,
        Some(z) => {
            let half = 1 << (bits - 1);
            ((w / scale).round() as i32 + z).clamp(-half, half - 1) as i8
        }
    }
}

/// `Σ_k (a_k − zero)` of each row of `rows` (`k` bytes used of every `ld`): what an
/// asymmetric weight's zero point multiplies.
fn row_sums(a: &[u8], ld: usize, k: usize, count: usize, zero: u8, out: &mut Vec<i32>) {
    out.clear();
    out.extend(
        a.chunks(ld).take(count).map(|r| r[..k].iter().map(|&v| v as i32).sum::<i32>() - k as i32 * zero as i32),
    );
}

fn dims(shape: ValueShape) -> (usize, usize, usize) {
    match shape {
        ValueShape::Map { channels, height, width } => (channels, height, width),
        ValueShape::Flat { features } => (features, 1, 1),
    }
}

/// Integer convolution (groups = 1), computed as `patches [h·w, k] (u8) × Wᵀ [k, cout] (i8,
/// packed once)`. The weights sit on the GEMM's right-hand side, packed at freeze time (rten's
/// pre-packed right-hand side is exact with the zero point 0 of symmetric weights; tested), so a
/// call packs only the activations, which rten does about a third faster on the left-hand side
/// than on the right (measured). The input is quantized into a channels-last buffer already padded
/// with its zero point, so each patch row is `kh` plain copies of `kw · cin` bytes; the epilogue
/// writes channel-major f32. Several small images share one GEMM.
pub struct ConvInt8 {
    /// `Wᵀ` with rows ordered `(ky, kx, c)`, as the patches are.
    weights: PackedInt8,
    /// Per output channel: what to subtract from the accumulators (see
    /// [`PackedInt8::zero_sums`]).
    zero_correction: Vec<i32>,
    /// Asymmetric weights: their zero points (see [`IntLayer::weight_zero_points`]).
    weight_zero: Option<Vec<i32>>,
    /// Per output channel: input scale × weight scale.
    out_scale: Vec<f32>,
    bias: Vec<f32>,
    relu: bool,
    input_params: QuantParams,
    input: (usize, usize, usize),
    output: (usize, usize, usize),
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    bits: u32,
}

impl std::fmt::Debug for ConvInt8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvInt8").field("input", &self.input).field("output", &self.output).finish()
    }
}

impl ConvInt8 {
    /// Builds the kernel on the fastest GEMM for this CPU, or `None` for grouped convolutions
    /// (left to the f32 kernels).
    pub fn new(view: &LayerView<'_>, layer: &IntLayer) -> Option<Self> {
        Self::with_gemm(view, layer, Int8Gemm::best())
    }

    /// As [`Self::new`], on the given GEMM.
    pub fn with_gemm(view: &LayerView<'_>, layer: &IntLayer, gemm: Int8Gemm) -> Option<Self> {
        let Op::Conv2d { kernel, stride, padding, dilation, groups, out_channels, .. } = *view.op else {
            return None;
        };
        if groups != 1 || layer.weight_scales.len() != out_channels {
            return None;
        }
        let input = dims(view.input);
        let (cin, [kh, kw]) = (input.0, kernel);
        let k = cin * kh * kw;
        // Graph layout [cout, cin, kh, kw] → rows (ky, kx, c), columns cout.
        let mut wt = vec![0i8; k * out_channels];
        for o in 0..out_channels {
            for c in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let w = view.weight[((o * cin + c) * kh + ky) * kw + kx];
                        let row = (ky * kw + kx) * cin + c;
                        wt[row * out_channels + o] = layer.int_weight(w, o);
                    }
                }
            }
        }
        let weights = PackedInt8::new(&wt, k, out_channels, gemm);
        Some(Self {
            zero_correction: weights.zero_sums().iter().map(|s| s * layer.input.zero_point).collect(),
            weight_zero: layer.nonzero_weight_zero_points(),
            weights,
            out_scale: layer.weight_scales.iter().map(|s| s * layer.input.scale).collect(),
            bias: view.bias.map(|b| b.to_vec()).unwrap_or_else(|| vec![0.0; out_channels]),
            relu: view.relu,
            input_params: layer.input,
            input,
            output: dims(view.output),
            kernel,
            stride,
            padding,
            dilation,
            bits: layer.weight_bits,
        })
    }

    /// Height and width of the padded image.
    fn padded(&self) -> (usize, usize) {
        (self.input.1 + 2 * self.padding[0], self.input.2 + 2 * self.padding[1])
    }

    /// Quantizes channel-major image `x` into `out`, channels-last `[hp, wp, c]` with a border
    /// of zero points.
    fn quantize_padded_nhwc(&self, x: &[f32], out: &mut [u8]) {
        let (c, h, w) = self.input;
        let (_, wp) = self.padded();
        let [ph, pw] = self.padding;
        if ph > 0 || pw > 0 {
            out.fill(self.input_params.zero_point as u8);
        }
        let (inv, zp) = (1.0 / self.input_params.scale, self.input_params.zero_point as f32);
        // Row by row, so the strided writes stay within one padded row (L1-resident).
        for y in 0..h {
            let dst = &mut out[((y + ph) * wp + pw) * c..][..w * c];
            for ch in 0..c {
                let src = &x[(ch * h + y) * w..][..w];
                for (i, &v) in src.iter().enumerate() {
                    dst[i * c + ch] = quantize_one(v, inv, zp);
                }
            }
        }
    }

    /// Writes the patch of every output pixel of the padded channels-last image `q` as rows
    /// `[row0, row0 + oh·ow)` of `patches` (`k` bytes each, ordered `(ky, kx, c)`, `lda` apart).
    fn unroll(&self, q: &[u8], patches: &mut [u8], row0: usize, lda: usize) {
        let cin = self.input.0;
        let (_, wp) = self.padded();
        let (_, oh, ow) = self.output;
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        let [dh, dw] = self.dilation;
        let k = cin * kh * kw;
        for oy in 0..oh {
            for ox in 0..ow {
                let row = &mut patches[(row0 + oy * ow + ox) * lda..][..k];
                for ky in 0..kh {
                    let y = oy * sh + ky * dh;
                    let dst = &mut row[ky * kw * cin..(ky + 1) * kw * cin];
                    if dw == 1 {
                        let start = (y * wp + ox * sw) * cin;
                        dst.copy_from_slice(&q[start..start + kw * cin]);
                    } else {
                        for kx in 0..kw {
                            let start = (y * wp + ox * sw + kx * dw) * cin;
                            dst[kx * cin..(kx + 1) * cin].copy_from_slice(&q[start..start + cin]);
                        }
                    }
                }
            }
        }
    }
}

impl Kernel for ConvInt8 {
    fn label(&self) -> String {
        let bits = if self.bits == 8 { String::new() } else { format!(" (int{} weights)", self.bits) };
        let gemm = self.weights.name();
        format!("conv2d/int8-im2col-gemm-{gemm}{}{bits}", if self.relu { "+relu" } else { "" })
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], _ctx: &RunContext) {
        let (cin, h, w) = self.input;
        let (hp, wp) = self.padded();
        let (cout, oh, ow) = self.output;
        let (in_len, out_len, n) = (cin * h * w, cout * oh * ow, oh * ow);
        let k = cin * self.kernel[0] * self.kernel[1];
        let (lda, ldc) = (self.weights.lda(k), self.weights.ldc(cout));
        // Several images in one GEMM (up to about 1 MiB of patches): layers with small feature
        // maps would otherwise make many small, overhead-bound calls.
        let group = (ROWS_BUDGET / (lda * n).max(1)).clamp(1, batch.max(1));
        BUFFERS.with(|b| {
            let Buffers { image, patches, row_zero, acc, sums } = &mut *b.borrow_mut();
            image.resize(cin * hp * wp, 0);
            patches.resize(group * n * lda, 0);
            acc.resize(group * n * ldc, 0);
            let mut first = 0;
            while first < batch {
                let g = group.min(batch - first);
                let rows = g * n;
                for i in 0..g {
                    let x = &inputs[0][(first + i) * in_len..(first + i + 1) * in_len];
                    self.quantize_padded_nhwc(x, image);
                    self.unroll(image, patches, i * n, lda);
                }
                let zero = self.input_params.zero_point as u8;
                self.weights.gemm(patches, rows, zero, row_zero, acc);
                if self.weight_zero.is_some() {
                    row_sums(patches, lda, k, rows, zero, sums);
                }
                // Pixel-major accumulators to channel-major f32, in blocks of pixels whose
                // accumulators stay in L1 while each channel's outputs are written contiguously.
                const BLOCK: usize = 64;
                for i in 0..g {
                    let out = &mut output[(first + i) * out_len..(first + i + 1) * out_len];
                    let acc = &acc[i * n * ldc..(i + 1) * n * ldc];
                    let sums = if self.weight_zero.is_some() { &sums[i * n..(i + 1) * n] } else { &[][..] };
                    for j0 in (0..n).step_by(BLOCK) {
                        let len = BLOCK.min(n - j0);
                        for c in 0..cout {
                            let (s, b, z) = (self.out_scale[c], self.bias[c], self.zero_correction[c]);
                            let wz = self.weight_zero.as_ref().map_or(0, |wz| wz[c]);
                            let dst = &mut out[c * n + j0..c * n + j0 + len];
                            for (jj, o) in dst.iter_mut().enumerate() {
                                let mut a = acc[(j0 + jj) * ldc + c] - z;
                                if wz != 0 {
                                    a -= wz * sums[j0 + jj];
                                }
                                let y = a as f32 * s + b;
                                *o = if self.relu { y.max(0.0) } else { y };
                            }
                        }
                    }
                }
                first += g;
            }
        });
    }
}

/// Integer convolution on AVX-512 VNNI, computed directly on the quantized image
/// ([`crate::vnni::DirectConv`]): the input is quantized once into four-channel-interleaved
/// rows padded with its zero point, and the epilogue writes channel-major f32, so unlike
/// [`ConvInt8`] nothing is transposed or unrolled. Convolutions with a stride other than 1 or 2
/// (or unequal strides), dilation, groups, or outputs the kernel's grid would waste more than
/// a third of the work on (see [`crate::vnni::DirectConv::supports`]) use [`ConvInt8`].
pub struct ConvDirectInt8 {
    conv: crate::vnni::DirectConv,
    /// Per output channel: input zero point × Σ weights.
    zero_correction: Vec<i32>,
    /// Asymmetric weights: their zero points (see [`IntLayer::weight_zero_points`]).
    weight_zero: Option<Vec<i32>>,
    /// Per output channel: input scale × weight scale.
    out_scale: Vec<f32>,
    bias: Vec<f32>,
    relu: bool,
    input_params: QuantParams,
    input: (usize, usize, usize),
    output: (usize, usize, usize),
    padding: [usize; 2],
    kernel: [usize; 2],
    stride: usize,
    /// Rows and columns of the quantized image the kernel reads (see
    /// [`crate::vnni::DirectConv::image_size`]).
    image: (usize, usize),
    bits: u32,
    /// The output goes, requantized, straight into the next convolution's input image (see
    /// [`ConvDirectInt8::requantize_for`]).
    requantize: Option<crate::vnni::QuadImage>,
    /// The input arrives already quantized, in this kernel's image layout (written by the
    /// previous convolution's epilogue).
    quantized_input: bool,
}

impl std::fmt::Debug for ConvDirectInt8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvDirectInt8").field("input", &self.input).field("output", &self.output).finish()
    }
}

impl ConvDirectInt8 {
    /// Builds the kernel, or `None` where it does not apply (no AVX-512 VNNI, an unsupported
    /// stride, dilation or groups other than 1, an unsupported output width, dynamic
    /// quantization).
    pub fn new(view: &LayerView<'_>, layer: &IntLayer) -> Option<Self> {
        let planned = Self::plan_input(view.op, view.input, view.output, layer)?;
        let Op::Conv2d { kernel, stride, padding, out_channels, .. } = *view.op else { unreachable!("planned") };
        let (input, output) = (dims(view.input), dims(view.output));
        let per = view.weight.len() / out_channels;
        let weights: Vec<i8> = view.weight.iter().enumerate().map(|(i, &w)| layer.int_weight(w, i / per)).collect();
        let conv = crate::vnni::DirectConv::new(&weights, out_channels, input.0, kernel, stride[0]);
        let zero = layer.input.zero_point;
        Some(Self {
            image: (planned.height, planned.width),
            zero_correction: conv.column_sums().iter().map(|s| s * zero).collect(),
            weight_zero: layer.nonzero_weight_zero_points(),
            conv,
            out_scale: layer.weight_scales.iter().map(|s| s * layer.input.scale).collect(),
            bias: view.bias.map(|b| b.to_vec()).unwrap_or_else(|| vec![0.0; out_channels]),
            relu: view.relu,
            input_params: layer.input,
            input,
            output,
            padding,
            kernel,
            stride: stride[0],
            bits: layer.weight_bits,
            requantize: None,
            quantized_input: false,
        })
    }

    /// Whether a conv `op` from `input` to `output` quantized as `layer` gets this kernel
    /// ([`Self::new`] builds it exactly then), and if so the image it reads: what the previous
    /// layer's epilogue must write to fuse its requantization.
    pub fn plan_input(
        op: &Op,
        input: ValueShape,
        output: ValueShape,
        layer: &IntLayer,
    ) -> Option<crate::vnni::QuadImage> {
        let Op::Conv2d { kernel, stride, padding, dilation, groups, out_channels, .. } = *op else {
            return None;
        };
        let ((cin, h, w), (_, oh, ow)) = (dims(input), dims(output));
        if !crate::vnni::available()
            || layer.dynamic
            || groups != 1
            || stride[0] != stride[1]
            || !crate::vnni::DirectConv::supports_stride(stride[0])
            || dilation != [1, 1]
            || layer.weight_scales.len() != out_channels
            || !crate::vnni::DirectConv::supports(oh, ow)
        {
            return None;
        }
        let (hp, wp) =
            crate::vnni::DirectConv::image_size(kernel, stride[0], h + 2 * padding[0], w + 2 * padding[1], oh, ow);
        Some(crate::vnni::QuadImage {
            quads: cin.div_ceil(4),
            height: hp,
            width: wp,
            padding,
            inverse_scale: 1.0 / layer.input.scale,
            zero_point: layer.input.zero_point as u8,
        })
    }

    /// Writes the output requantized into `next`'s input image instead of f32: the plan then
    /// passes the bytes in the f32 buffer between the two, and `next` (built with
    /// [`Self::with_quantized_input`]) skips its quantization pass. The values are those the
    /// next layer would have computed from the f32 output (tested bit for bit).
    ///
    /// # Panics
    /// When the image does not fit this layer's output buffer, or its channels differ.
    pub fn requantize_for(mut self, next: crate::vnni::QuadImage) -> Self {
        let (cout, oh, ow) = self.output;
        assert_eq!(next.quads, cout.div_ceil(4), "the next layer reads this layer's channels");
        assert!(next.len() + crate::vnni::DirectConv::SLACK <= 4 * cout * oh * ow, "the image must fit the buffer");
        self.requantize = Some(next);
        self
    }

    /// Reads the input as the previous layer's fused requantization wrote it (see
    /// [`Self::requantize_for`]).
    pub fn with_quantized_input(mut self) -> Self {
        self.quantized_input = true;
        self
    }

    /// Height and width of the padded image: the convolution's padding, and on the bottom and
    /// right what the kernel's output grid reads beyond it.
    fn padded(&self) -> (usize, usize) {
        self.image
    }

    /// `Σ (a − zero)` over each output pixel's receptive field (all its taps and input
    /// channels) of the quantized image `q`, into `out`: the sum of the image's per-pixel
    /// channel sums over each window (padding holds the zero point and adds 0), for every pixel
    /// of the kernel's output grid.
    fn window_sums(&self, q: &[u8], plane: &mut Vec<i32>, out: &mut Vec<i32>) {
        let (c, _, _) = self.input;
        let (hp, wp) = self.padded();
        let (_, oh, ow) = self.output;
        let (gh, gw) = crate::vnni::DirectConv::grid(oh, ow);
        let [kh, kw] = self.kernel;
        let zero = self.input_params.zero_point;
        plane.clear();
        plane.resize(hp * wp, 0);
        for quad in 0..c.div_ceil(4) {
            let lanes = 4.min(c - 4 * quad);
            for (p, px) in plane.iter_mut().zip(q[quad * hp * wp * 4..(quad + 1) * hp * wp * 4].chunks_exact(4)) {
                *p += px[..lanes].iter().map(|&v| v as i32 - zero).sum::<i32>();
            }
        }
        out.clear();
        for oy in 0..gh {
            for ox in 0..gw {
                let (y, x) = (oy * self.stride, ox * self.stride);
                out.push((0..kh).map(|ky| plane[(y + ky) * wp + x..][..kw].iter().sum::<i32>()).sum());
            }
        }
    }

    /// Quantizes channel-major image `x` into `out`, `[c/4][hp][wp][4]`, with a border (and
    /// missing channels of the last group) of zero points.
    fn quantize_quads(&self, x: &[f32], out: &mut [u8]) {
        let (c, h, w) = self.input;
        let (hp, wp) = self.padded();
        let [ph, pw] = self.padding;
        if (hp, wp) != (h, w) || !c.is_multiple_of(4) {
            out.fill(self.input_params.zero_point as u8);
        }
        let (inv, zp) = (1.0 / self.input_params.scale, self.input_params.zero_point as f32);
        for q in 0..c.div_ceil(4) {
            for y in 0..h {
                let dst = &mut out[((q * hp + y + ph) * wp + pw) * 4..][..w * 4];
                for lane in 0..4.min(c - 4 * q) {
                    let src = &x[((4 * q + lane) * h + y) * w..][..w];
                    for (i, &v) in src.iter().enumerate() {
                        dst[i * 4 + lane] = quantize_one(v, inv, zp);
                    }
                }
            }
        }
    }
}

impl Kernel for ConvDirectInt8 {
    fn label(&self) -> String {
        let bits = if self.bits == 8 { String::new() } else { format!(" (int{} weights)", self.bits) };
        let relu = if self.relu { "+relu" } else { "" };
        let out = if self.requantize.is_some() { "+requantize-u8" } else { "" };
        let input = if self.quantized_input { " (u8 input)" } else { "" };
        format!("conv2d/int8-direct-vnni{relu}{out}{bits}{input}")
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], _ctx: &RunContext) {
        let (cin, h, w) = self.input;
        let (hp, wp) = self.padded();
        let (cout, oh, ow) = self.output;
        let (in_len, out_len) = (cin * h * w, cout * oh * ow);
        BUFFERS.with(|b| {
            let Buffers { image: own, sums, acc: plane, .. } = &mut *b.borrow_mut();
            own.resize(self.conv.quads() * hp * wp * 4 + crate::vnni::DirectConv::SLACK, 0);
            for i in 0..batch {
                let x = &inputs[0][i * in_len..(i + 1) * in_len];
                let image: &[u8] = if self.quantized_input {
                    bytemuck::cast_slice(x)
                } else {
                    self.quantize_quads(x, own);
                    own
                };
                if self.weight_zero.is_some() {
                    self.window_sums(image, plane, sums);
                }
                let epilogue = crate::vnni::Epilogue {
                    correction: &self.zero_correction,
                    scale: &self.out_scale,
                    bias: &self.bias,
                    relu: self.relu,
                    weight_zero: self.weight_zero.as_deref().unwrap_or(&[]),
                    window_sums: if self.weight_zero.is_some() { sums } else { &[] },
                };
                let out = &mut output[i * out_len..(i + 1) * out_len];
                let out = match self.requantize {
                    Some(next) => {
                        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
                        // The next image's border (and the slack) hold its zero point.
                        bytes[..next.len() + crate::vnni::DirectConv::SLACK].fill(next.zero_point);
                        crate::vnni::Output::Quads { bytes, image: next }
                    }
                    None => crate::vnni::Output::F32(out),
                };
                self.conv.run(image, hp, wp, oh, ow, out, &epilogue);
            }
        });
    }
}

/// Integer linear layer: `[batch, in] (u8 activations) × [in, out] (i8 weights, packed)`.
pub struct LinearInt8 {
    /// Input range measured per batch at run time instead of calibrated.
    dynamic: bool,
    /// Per output channel: the weight scale (times the input scale of the call in the epilogue).
    weight_scales: Vec<f32>,
    /// `Wᵀ`, `[in, out]`.
    weights: PackedInt8,
    /// Asymmetric weights: their zero points (see [`IntLayer::weight_zero_points`]).
    weight_zero: Option<Vec<i32>>,
    bias: Vec<f32>,
    relu: bool,
    input_params: QuantParams,
    in_features: usize,
    out_features: usize,
    bits: u32,
}

impl std::fmt::Debug for LinearInt8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinearInt8").field("in", &self.in_features).field("out", &self.out_features).finish()
    }
}

impl LinearInt8 {
    /// Builds the kernel from a linear layer's view, on the fastest GEMM for this CPU.
    pub fn new(view: &LayerView<'_>, layer: &IntLayer) -> Option<Self> {
        Self::with_gemm(view, layer, Int8Gemm::best())
    }

    /// As [`Self::new`], on the given GEMM.
    pub fn with_gemm(view: &LayerView<'_>, layer: &IntLayer, gemm: Int8Gemm) -> Option<Self> {
        let Op::Linear { in_features, out_features, .. } = *view.op else { return None };
        if layer.weight_scales.len() != out_features {
            return None;
        }
        // Transposed to `[in, out]`, the GEMM's right-hand side.
        let mut wt = vec![0i8; in_features * out_features];
        for o in 0..out_features {
            for i in 0..in_features {
                wt[i * out_features + o] = layer.int_weight(view.weight[o * in_features + i], o);
            }
        }
        Some(Self {
            dynamic: layer.dynamic,
            weight_scales: layer.weight_scales.clone(),
            weights: PackedInt8::new(&wt, in_features, out_features, gemm),
            weight_zero: layer.nonzero_weight_zero_points(),
            bias: view.bias.map(|b| b.to_vec()).unwrap_or_else(|| vec![0.0; out_features]),
            relu: view.relu,
            input_params: layer.input,
            in_features,
            out_features,
            bits: layer.weight_bits,
        })
    }
}

impl Kernel for LinearInt8 {
    fn label(&self) -> String {
        let bits = if self.bits == 8 { String::new() } else { format!(" (int{} weights)", self.bits) };
        let how = if self.dynamic { "int8-dynamic" } else { "int8" };
        let gemm = self.weights.name();
        format!("linear/{how}-gemm-{gemm}{}{bits}", if self.relu { "+relu" } else { "" })
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], _ctx: &RunContext) {
        let (k, n) = (self.in_features, self.out_features);
        let (lda, ldc) = (self.weights.lda(k), self.weights.ldc(n));
        BUFFERS.with(|b| {
            let Buffers { image: x, row_zero, acc, sums, .. } = &mut *b.borrow_mut();
            x.resize(batch * lda, 0);
            acc.resize(batch * ldc, 0);
            let input = &inputs[0][..batch * k];
            // Dynamic: this batch's own range (widened to include 0), as calibration would set it.
            let params = if self.dynamic {
                let (lo, hi) = input.iter().fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
                crate::params_for_range(lo, hi, crate::ptq::ACTIVATION_SCHEME)
            } else {
                self.input_params
            };
            for (row, x) in input.chunks_exact(k).zip(x.chunks_exact_mut(lda)) {
                quantize_u8(row, params, &mut x[..k]);
            }
            self.weights.gemm(x, batch, params.zero_point as u8, row_zero, acc);
            if self.weight_zero.is_some() {
                row_sums(x, lda, k, batch, params.zero_point as u8, sums);
            }
            let zero_sums = self.weights.zero_sums();
            for (m, (o, a)) in output.chunks_exact_mut(n).zip(acc.chunks_exact(ldc)).take(batch).enumerate() {
                for j in 0..n {
                    let mut a = a[j] - params.zero_point * zero_sums[j];
                    if let Some(wz) = &self.weight_zero {
                        a -= wz[j] * sums[m];
                    }
                    let y = a as f32 * (self.weight_scales[j] * params.scale) + self.bias[j];
                    o[j] = if self.relu { y.max(0.0) } else { y };
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_rounds_ties_to_even_and_saturates() {
        let p = QuantParams { scale: 0.5, zero_point: 10 };
        let x = [0.0, 0.25, 0.75, -0.25, 1000.0, -1000.0, 122.5, f32::NAN, 1.2];
        let mut q = [0u8; 9];
        quantize_u8(&x, p, &mut q);
        // 0.25/0.5 = 0.5 -> 0 (even), 0.75/0.5 = 1.5 -> 2, -0.5 -> -0 -> 10, 255 clamp, 0 clamp.
        assert_eq!(q, [10, 10, 12, 10, 255, 0, 255, 0, 12]);
        for (&v, &q) in x.iter().zip(&q).filter(|(v, _)| v.is_finite()) {
            assert_eq!(q as f32, (v / 0.5 + 10.0).clamp(0.0, 255.0).round_ties_even());
        }
    }

    /// A pseudo-random f32 in [-1, 1) from `i` (deterministic, no RNG crate).
    fn noise(i: usize, salt: usize) -> f32 {
        let x = (i.wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(40_503)) % 10_007;
        x as f32 / 5_003.5 - 1.0
    }

    /// Every conv kernel this CPU can run (direct VNNI, im2col on our VNNI GEMM, im2col on
    /// rten) gives the same bits as im2col on rten, for geometries that cover each path of the
    /// direct kernel (stride 1 and 2, rows of 32, 16 and 2 × 8 pixels, channels not a multiple
    /// of 4 or 8, 1×1, 3×3 and 5×5 kernels) and inputs that saturate the u8 range.
    #[test]
    fn every_int8_conv_kernel_gives_the_same_bits() {
        // (cin, h, w, cout, kernel, stride, padding, relu)
        let cases = [
            (3, 32, 32, 16, 3, 1, 1, true),
            (16, 16, 16, 32, 3, 2, 1, false),
            (16, 32, 32, 32, 3, 2, 1, true),
            (5, 16, 16, 10, 3, 1, 1, false),
            (16, 16, 16, 24, 1, 2, 0, false),
            (8, 8, 8, 16, 3, 1, 1, true),
            (4, 64, 64, 8, 1, 2, 0, false),
            (7, 20, 20, 9, 5, 1, 0, true),
            (6, 12, 12, 8, 3, 1, 1, false),
            // MNIST-sized maps: 28 → a 32-wide grid, 14 → 16, 7 → 8 (two rows per vector, odd
            // height), strided 28 → 14 and 14 → 7, and 17 (declined).
            (5, 28, 28, 16, 3, 1, 1, true),
            (16, 14, 14, 24, 3, 1, 1, false),
            (12, 7, 7, 8, 3, 1, 1, true),
            (16, 28, 28, 32, 3, 2, 1, false),
            (32, 14, 14, 16, 1, 2, 0, true),
            (4, 17, 17, 8, 3, 1, 1, false),
        ];
        for (case, &(cin, h, w, cout, k, stride, pad, relu)) in cases.iter().enumerate() {
            let op = Op::Conv2d {
                in_channels: cin,
                out_channels: cout,
                kernel: [k, k],
                stride: [stride, stride],
                padding: [pad, pad],
                dilation: [1, 1],
                groups: 1,
                bias: true,
            };
            let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (w + 2 * pad - k) / stride + 1);
            let weight: Vec<f32> = (0..cout * cin * k * k).map(|i| noise(i, case) * 0.5).collect();
            let bias: Vec<f32> = (0..cout).map(|i| noise(i, 99 + case)).collect();
            let view = LayerView {
                name: "conv",
                op: &op,
                weight: &weight,
                weight_shape: &[cout, cin, k, k],
                bias: Some(&bias),
                input: ValueShape::Map { channels: cin, height: h, width: w },
                output: ValueShape::Map { channels: cout, height: oh, width: ow },
                relu,
            };
            let symmetric = IntLayer {
                weight_bits: 8,
                weight_scales: (0..cout).map(|o| 0.5 / 127.0 * (1.0 + o as f32 / cout as f32)).collect(),
                weight_zero_points: Vec::new(),
                // Inputs span [-1.2, 1.2) against a range of about [-0.9, 1.1]: some saturate.
                input: QuantParams { scale: 2.0 / 255.0, zero_point: 115 },
                dynamic: false,
            };
            // Asymmetric weights (zero points −3..=3, int4 on the last cases).
            let asymmetric = IntLayer {
                weight_bits: if case % 3 == 2 { 4 } else { 8 },
                weight_zero_points: (0..cout).map(|o| (o as i32 % 7) - 3).collect(),
                ..symmetric.clone()
            };
            for layer in [symmetric, asymmetric] {
                let batch = 3;
                let input: Vec<f32> = (0..batch * cin * h * w).map(|i| noise(i, 7 + case) * 1.2).collect();
                let run = |kernel: &dyn Kernel| {
                    let mut out = vec![f32::NAN; batch * cout * oh * ow];
                    kernel.run(&[&input], &mut out, batch, &mut [], &RunContext { threads: 1 });
                    out
                };
                let reference = run(&ConvInt8::with_gemm(&view, &layer, Int8Gemm::Rten).expect("conv"));
                assert!(reference.iter().all(|v| v.is_finite()));
                if crate::vnni::available() {
                    let im2col = run(&ConvInt8::with_gemm(&view, &layer, Int8Gemm::Vnni).expect("conv"));
                    assert_eq!(im2col, reference, "im2col on the VNNI GEMM, case {case}");
                    // Rows of 17 pixels (a 32-wide grid) are left to im2col.
                    match ConvDirectInt8::new(&view, &layer) {
                        Some(direct) => assert_eq!(run(&direct), reference, "direct, case {case}"),
                        None => assert_eq!(ow, 17, "the direct kernel declined case {case}"),
                    }
                } else {
                    assert!(ConvDirectInt8::new(&view, &layer).is_none());
                    eprintln!("no AVX-512 VNNI on this CPU: only the rten kernel ran");
                }
            }
        }
    }

    /// The linear layer gives the same bits on the VNNI GEMM as on rten, static and dynamic,
    /// with input widths that are not a multiple of 4 and outputs that are not of 16.
    #[test]
    fn int8_linear_gives_the_same_bits_on_both_gemms() {
        for (case, &(k, n, dynamic, relu)) in
            [(10, 3, false, true), (64, 16, true, false), (301, 45, false, false), (7, 130, true, true)]
                .iter()
                .enumerate()
        {
            let op = Op::Linear { in_features: k, out_features: n, bias: true };
            let weight: Vec<f32> = (0..n * k).map(|i| noise(i, 20 + case) * 0.3).collect();
            let bias: Vec<f32> = (0..n).map(|i| noise(i, 30 + case)).collect();
            let view = LayerView {
                name: "fc",
                op: &op,
                weight: &weight,
                weight_shape: &[n, k],
                bias: Some(&bias),
                input: ValueShape::Flat { features: k },
                output: ValueShape::Flat { features: n },
                relu,
            };
            let layer = IntLayer {
                weight_bits: 8,
                weight_scales: (0..n).map(|o| 0.3 / 127.0 * (1.0 + o as f32 / n as f32)).collect(),
                // Asymmetric weights in the odd cases.
                weight_zero_points: if case % 2 == 1 {
                    (0..n).map(|o| (o as i32 % 5) - 2).collect()
                } else {
                    Vec::new()
                },
                input: QuantParams { scale: 1.5 / 255.0, zero_point: 140 },
                dynamic,
            };
            let batch = 5;
            let input: Vec<f32> = (0..batch * k).map(|i| noise(i, 40 + case)).collect();
            let run = |kernel: &dyn Kernel| {
                let mut out = vec![f32::NAN; batch * n];
                kernel.run(&[&input], &mut out, batch, &mut [], &RunContext { threads: 1 });
                out
            };
            let reference = run(&LinearInt8::with_gemm(&view, &layer, Int8Gemm::Rten).expect("linear"));
            assert!(reference.iter().all(|v| v.is_finite()));
            // Close to the f32 layer on the inputs clipped to the calibrated range (static), so
            // the reference itself is right.
            let p = layer.input;
            let (lo, hi) = if dynamic {
                (-1.0, 1.0)
            } else {
                (-p.zero_point as f32 * p.scale, (255 - p.zero_point) as f32 * p.scale)
            };
            for (b, row) in reference.chunks_exact(n).enumerate() {
                for (j, &y) in row.iter().enumerate() {
                    let x = &input[b * k..(b + 1) * k];
                    let w = &weight[j * k..(j + 1) * k];
                    let f: f32 = x.iter().zip(w).map(|(x, w)| x.clamp(lo, hi) * w).sum::<f32>() + bias[j];
                    let f = if relu { f.max(0.0) } else { f };
                    assert!((y - f).abs() < 0.05 * (1.0 + f.abs()), "case {case} ({b},{j}): {y} vs {f}");
                }
            }
            if crate::vnni::available() {
                let vnni = run(&LinearInt8::with_gemm(&view, &layer, Int8Gemm::Vnni).expect("linear"));
                assert_eq!(vnni, reference, "case {case}");
            }
        }
    }

    #[test]
    fn rten_int8_gemm_subtracts_zero_points() {
        let (m, k, n) = (3, 5, 4);
        let a: Vec<u8> = (0..m * k).map(|i| (i * 37 % 251) as u8).collect();
        let b: Vec<i8> = (0..k * n).map(|i| ((i * 53 % 255) as i32 - 127) as i8).collect();
        let (za, zb) = (vec![128u8; m], vec![-3i8; n]);
        let mut c = vec![0i32; m * n];
        INT8.with(|e| {
            let opts = GemmOptions {
                a_quant: Some(RtenQuant { zero_point: &za }),
                b_quant: Some(RtenQuant { zero_point: &zb }),
                ..Default::default()
            };
            e.gemm(
                &mut c,
                GemmInputA::Unpacked(NdTensorView::from_data([m, k], &a[..])),
                GemmInputB::Unpacked(NdTensorView::from_data([k, n], &b[..])),
                opts,
            )
            .unwrap();
        });
        for i in 0..m {
            for j in 0..n {
                let r: i32 = (0..k).map(|p| (a[i * k + p] as i32 - 128) * (b[p * n + j] as i32 + 3)).sum();
                assert_eq!(c[i * n + j], r, "({i},{j})");
            }
        }
    }

    /// What the kernels rely on: B (the weights) pre-packed once with a zero point of 0, A
    /// (activations) with a zero point per row. (rten's `prepack_a` ignores zero points, which
    /// is why weights go on the B side.)
    #[test]
    fn rten_int8_gemm_with_prepacked_weights_on_the_right() {
        let (m, k, n) = (7, 300, 19);
        let a: Vec<u8> = (0..m * k).map(|i| (i * 37 % 251) as u8).collect();
        let b: Vec<i8> = (0..k * n).map(|i| ((i * 53 % 255) as i32 - 127) as i8).collect();
        let (za, zb) = (vec![77u8; m], vec![0i8; n]);
        let mut c = vec![0i32; m * n];
        INT8.with(|e| {
            let packed = e.prepack_b(NdTensorView::from_data([k, n], &b[..]));
            let opts = GemmOptions {
                a_quant: Some(RtenQuant { zero_point: &za }),
                b_quant: Some(RtenQuant { zero_point: &zb }),
                ..Default::default()
            };
            e.gemm(
                &mut c,
                GemmInputA::Unpacked(NdTensorView::from_data([m, k], &a[..])),
                GemmInputB::Packed(&packed),
                opts,
            )
            .unwrap();
        });
        for i in 0..m {
            for j in 0..n {
                let r: i32 = (0..k).map(|p| (a[i * k + p] as i32 - 77) * b[p * n + j] as i32).sum();
                assert_eq!(c[i * n + j], r, "({i},{j})");
            }
        }
    }
}
