//! [`ConvInt8`]: integer convolution as im2col and a GEMM (ours on AVX-512 VNNI, rten's
//! elsewhere).

use shrink_core::graph::Op;
use shrink_core::kernels::transpose::PixelMap;
use shrink_core::runtime::{Kernel, LayerView, RunContext};

use super::{BUFFERS, Buffers, ChannelEpilogue, Int8Gemm, IntLayer, PackedInt8, dims, row_sums};
use crate::QuantParams;

/// Bytes of unrolled patches one integer conv call works on (several images per GEMM when they
/// are small).
const ROWS_BUDGET: usize = 1 << 20;

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
    epilogue: ChannelEpilogue,
    input_params: QuantParams,
    input: (usize, usize, usize),
    output: (usize, usize, usize),
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    bits: u32,
    /// The integer path the quantization and the epilogue are vectorised for.
    isa: shrink_core::kernels::isa::Isa,
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
            epilogue: ChannelEpilogue::new(view, layer, weights.zero_sums()),
            weights,
            input_params: layer.input,
            input,
            output: dims(view.output),
            kernel,
            stride,
            padding,
            dilation,
            bits: layer.weight_bits,
            isa: shrink_core::kernels::int8::path(),
        })
    }

    /// Height and width of the padded image.
    fn padded(&self) -> (usize, usize) {
        (self.input.1 + 2 * self.padding[0], self.input.2 + 2 * self.padding[1])
    }

    /// Quantizes channel-major image `x` into `out`, channels-last `[hp, wp, c]` with a border
    /// of zero points: quantized plane by plane into `planes` (contiguous, so it vectorises),
    /// then transposed ([`shrink_core::kernels::transpose`]).
    fn quantize_padded_nhwc(&self, x: &[f32], planes: &mut Vec<u8>, out: &mut [u8]) {
        let (c, h, w) = self.input;
        let (_, wp) = self.padded();
        let [ph, pw] = self.padding;
        if ph > 0 || pw > 0 {
            out.fill(self.input_params.zero_point as u8);
        }
        self.quantize_planes(x, planes);
        let map = PixelMap::padded(w, [ph, pw], wp, c);
        shrink_core::kernels::transpose::planes_to_pixels(planes, c, h * w, out, map, c);
    }

    /// Quantizes channel-major image `x` into `planes`, still channel-major.
    fn quantize_planes(&self, x: &[f32], planes: &mut Vec<u8>) {
        let (c, h, w) = self.input;
        planes.resize(c * h * w, 0);
        let (inverse_scale, zero) = (1.0 / self.input_params.scale, self.input_params.zero_point as u8);
        shrink_core::kernels::int8::quantize_slice(&x[..c * h * w], inverse_scale, zero, planes, self.isa);
    }

    /// Whether each patch is one input pixel (a 1×1 kernel, stride 1, no padding): the
    /// channels-last image is then the patch matrix, written straight into the GEMM's rows.
    fn pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
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
    fn applies_activation(&self) -> bool {
        true
    }

    fn label(&self) -> String {
        let bits = if self.bits == 8 { String::new() } else { format!(" (int{} weights)", self.bits) };
        let gemm = self.weights.name();
        format!("conv2d/int8-im2col-gemm-{gemm}{}{bits}", self.epilogue.label())
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], _ctx: &RunContext<'_>) {
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
            let Buffers { image, planes, patches, row_zero, acc, channel_major, sums } = &mut *b.borrow_mut();
            image.resize(cin * hp * wp, 0);
            patches.resize(group * n * lda, 0);
            acc.resize(group * n * ldc, 0);
            let mut first = 0;
            while first < batch {
                let g = group.min(batch - first);
                let rows = g * n;
                for i in 0..g {
                    let x = &inputs[0][(first + i) * in_len..(first + i + 1) * in_len];
                    if self.pointwise() {
                        self.quantize_planes(x, planes);
                        let map = PixelMap::dense(i * n * lda, lda);
                        shrink_core::kernels::transpose::planes_to_pixels(planes, cin, n, patches, map, cin);
                    } else {
                        self.quantize_padded_nhwc(x, planes, image);
                        self.unroll(image, patches, i * n, lda);
                    }
                }
                let zero = self.input_params.zero_point as u8;
                self.weights.gemm(patches, rows, zero, row_zero, acc);
                let asymmetric = self.epilogue.asymmetric();
                if asymmetric {
                    row_sums(patches, lda, k, rows, zero, sums);
                }
                // Pixel-major accumulators to channel-major planes, then the epilogue along each.
                channel_major.resize(cout * n, 0);
                for i in 0..g {
                    let image = (first + i) * out_len..(first + i + 1) * out_len;
                    let residual = inputs.get(1).map_or(&[][..], |r| &r[image.clone()]);
                    let sums = if asymmetric { &sums[i * n..(i + 1) * n] } else { &[][..] };
                    let epilogue = self.epilogue.kernel(sums, residual);
                    let acc = &acc[i * n * ldc..(i + 1) * n * ldc];
                    shrink_core::kernels::transpose::pixels_to_planes_32(acc, n, ldc, cout, channel_major);
                    epilogue.planes(channel_major, n, cout, &mut output[image], self.isa);
                }
                first += g;
            }
        });
    }
}
