//! Integer kernels for the CPU plan: u8 × i8 → i32 GEMMs on rten-gemm (AVX-512 VNNI, AVX-512,
//! AVX2 or NEON, chosen at run time), weights quantized and packed once when the plan is frozen,
//! never dequantized while it runs.
//!
//! Activations travel between steps of the plan in f32. Each integer layer quantizes its input
//! to u8 in one pass (the rounding its calibrated parameters define), multiplies in integers,
//! and its epilogue turns the i32 accumulators back into f32 with the input and per-channel
//! weight scales, the bias and the fused ReLU.

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
    static BUFFERS: RefCell<Buffers> =
        const { RefCell::new(Buffers { signed: Vec::new(), cols: Vec::new(), col_zero: Vec::new(), image: Vec::new(), row_zero: Vec::new(), acc: Vec::new() }) };
}

/// The name of the integer GEMM kernel rten picked for this CPU (e.g. `x86_64-u8i8i32-avx512`).
pub fn int8_gemm_kernel_name() -> String {
    INT8.with(|e| e.kernel_name().to_string())
}

struct Buffers {
    /// A quantized image of a conv, shifted to i8.
    signed: Vec<i8>,
    /// Its unrolled patches.
    cols: Vec<i8>,
    /// One zero point per column of a conv's right-hand side.
    col_zero: Vec<i8>,
    /// A quantized batch of a linear layer.
    image: Vec<u8>,
    /// One zero point per row of a linear layer's left-hand side.
    row_zero: Vec<u8>,
    acc: Vec<i32>,
}

/// Quantizes `x` to u8 with `p` (round half up, saturating): `q = clamp(x / scale + zp)`.
/// Written so that it vectorises: multiply, add, clamp, truncate.
pub fn quantize_u8(x: &[f32], p: QuantParams, out: &mut [u8]) {
    let (inv, zp) = (1.0 / p.scale, p.zero_point as f32 + 0.5);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v * inv + zp).clamp(0.0, 255.49) as u8;
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
    /// Symmetric weight scale per output channel.
    pub weight_scales: Vec<f32>,
    /// u8 parameters of the layer's input.
    pub input: QuantParams,
}

impl IntLayer {
    fn qmax(&self) -> i32 {
        (1 << (self.weight_bits - 1)) - 1
    }
}

fn dims(shape: ValueShape) -> (usize, usize, usize) {
    match shape {
        ValueShape::Map { channels, height, width } => (channels, height, width),
        ValueShape::Flat { features } => (features, 1, 1),
    }
}

/// Integer convolution (groups = 1): `W [cout, k] (u8: weights + 128) × im2col(image) [k, h·w]
/// (i8: activations - 128)`. The image is quantized into a buffer already padded with the zero
/// point, then unrolled row by row with plain copies (rten's virtual im2col gathers one byte at
/// a time, which measured slower than the integer GEMM itself, and pads with a raw 0, which is
/// not the zero point of an asymmetric input). The weights are quantized and laid out once, at freeze
/// time; rten re-packs that small panel on every call because its pre-packed left-hand side
/// ignores zero points (tested in this module), which shifted weights need.
pub struct ConvInt8 {
    weights: Vec<u8>,
    /// Per output channel: 128, the zero point of the shifted weights.
    weight_zero: Vec<u8>,
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
    pointwise: bool,
    bits: u32,
}

impl std::fmt::Debug for ConvInt8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvInt8").field("input", &self.input).field("output", &self.output).finish()
    }
}

impl ConvInt8 {
    /// Builds the kernel, or `None` for grouped convolutions (left to the f32 kernels).
    pub fn new(view: &LayerView<'_>, layer: &IntLayer) -> Option<Self> {
        let Op::Conv2d { kernel, stride, padding, dilation, groups, out_channels, .. } = *view.op else {
            return None;
        };
        if groups != 1 || layer.weight_scales.len() != out_channels {
            return None;
        }
        let k = view.weight.len() / out_channels;
        let qmax = layer.qmax();
        let weights = view
            .weight
            .chunks_exact(k)
            .zip(&layer.weight_scales)
            .flat_map(|(row, &s)| row.iter().map(move |&w| (quantize_weight(w, s, qmax) + 128) as u8))
            .collect();
        Some(Self {
            weights,
            weight_zero: vec![128; out_channels],
            out_scale: layer.weight_scales.iter().map(|s| s * layer.input.scale).collect(),
            bias: view.bias.map(|b| b.to_vec()).unwrap_or_else(|| vec![0.0; out_channels]),
            relu: view.relu,
            input_params: layer.input,
            input: dims(view.input),
            output: dims(view.output),
            kernel,
            stride,
            padding,
            dilation,
            pointwise: kernel == [1, 1] && stride == [1, 1] && padding == [0, 0],
            bits: layer.weight_bits,
        })
    }

    /// Height and width of the padded image.
    fn padded(&self) -> (usize, usize) {
        (self.input.1 + 2 * self.padding[0], self.input.2 + 2 * self.padding[1])
    }

    /// Unrolls the padded quantized image into columns `[col0, col0 + oh·ow)` of `cols`, a
    /// `[c·kh·kw, stride]` matrix.
    fn unroll(&self, padded: &[i8], cols: &mut [i8], stride: usize, col0: usize) {
        let cin = self.input.0;
        let (hp, wp) = self.padded();
        let (_, oh, ow) = self.output;
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        let [dh, dw] = self.dilation;
        let n = oh * ow;
        for c in 0..cin {
            let plane = &padded[c * hp * wp..(c + 1) * hp * wp];
            for ky in 0..kh {
                for kx in 0..kw {
                    let row = &mut cols[((c * kh + ky) * kw + kx) * stride + col0..][..n];
                    for (oy, dst) in row.chunks_exact_mut(ow).enumerate() {
                        let src = &plane[(oy * sh + ky * dh) * wp + kx * dw..];
                        if sw == 1 {
                            dst.copy_from_slice(&src[..ow]);
                        } else {
                            dst.iter_mut().zip(src.iter().step_by(sw)).for_each(|(d, &s)| *d = s);
                        }
                    }
                }
            }
        }
    }

    /// Quantizes image `x` into `out`, the padded `[c, hp, wp]` buffer (border = zero point).
    fn quantize_padded(&self, x: &[f32], out: &mut [i8]) {
        let (c, h, w) = self.input;
        let (hp, wp) = self.padded();
        let [ph, pw] = self.padding;
        if ph == 0 && pw == 0 {
            return quantize_shifted_i8(x, self.input_params, out);
        }
        out.fill((self.input_params.zero_point - 128) as i8);
        for ch in 0..c {
            for y in 0..h {
                let src = &x[(ch * h + y) * w..][..w];
                let dst = &mut out[(ch * hp + y + ph) * wp + pw..][..w];
                quantize_shifted_i8(src, self.input_params, dst);
            }
        }
    }
}

/// As [`quantize_u8`], stored shifted into i8 (`q - 128`): the activations take the GEMM's
/// signed side.
fn quantize_shifted_i8(x: &[f32], p: QuantParams, out: &mut [i8]) {
    let (inv, zp) = (1.0 / p.scale, p.zero_point as f32 + 0.5);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = ((v * inv + zp).clamp(0.0, 255.49) as i32 - 128) as i8;
    }
}

impl Kernel for ConvInt8 {
    fn label(&self) -> String {
        let bits = if self.bits == 8 { String::new() } else { format!(" (int{} weights)", self.bits) };
        let how = if self.pointwise { "gemm" } else { "im2col-gemm" };
        format!("conv2d/int8-{how}-rten{}{bits}", if self.relu { "+relu" } else { "" })
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], _ctx: &RunContext) {
        let (cin, h, w) = self.input;
        let (hp, wp) = self.padded();
        let (cout, oh, ow) = self.output;
        let (in_len, out_len, n) = (cin * h * w, cout * oh * ow, oh * ow);
        let k = cin * self.kernel[0] * self.kernel[1];
        // Several images side by side in one GEMM (up to about 1 MiB of unrolled patches): layers
        // with small feature maps would otherwise make many small, overhead-bound calls.
        let group = (ROWS_BUDGET / (k * n).max(1)).clamp(1, batch.max(1));
        BUFFERS.with(|b| {
            let Buffers { signed, cols, col_zero, acc, .. } = &mut *b.borrow_mut();
            signed.resize(cin * hp * wp, 0);
            cols.resize(k * n * group, 0);
            acc.resize(cout * n * group, 0);
            // rten wants one zero point per column of the right-hand side.
            col_zero.clear();
            col_zero.resize(n * group, (self.input_params.zero_point - 128) as i8);
            let mut first = 0;
            while first < batch {
                let g = group.min(batch - first);
                let width = g * n;
                for i in 0..g {
                    let image = &inputs[0][(first + i) * in_len..(first + i + 1) * in_len];
                    self.quantize_padded(image, signed);
                    if self.pointwise && g == 1 {
                        break;
                    }
                    self.unroll(signed, cols, width, i * n);
                }
                let rhs: &[i8] = if self.pointwise && g == 1 { &signed[..k * n] } else { &cols[..k * width] };
                let a = GemmInputA::Unpacked(NdTensorView::from_data([cout, k], &self.weights[..]));
                let opts = GemmOptions {
                    a_quant: Some(RtenQuant { zero_point: &self.weight_zero[..] }),
                    b_quant: Some(RtenQuant { zero_point: &col_zero[..width] }),
                    ..Default::default()
                };
                INT8.with(|e| {
                    let b = GemmInputB::Unpacked(NdTensorView::from_data([k, width], rhs));
                    e.gemm(&mut acc[..cout * width], a, b, opts)
                })
                .expect("shapes checked at freeze time");
                for i in 0..g {
                    let out = &mut output[(first + i) * out_len..(first + i + 1) * out_len];
                    for (c, o) in out.chunks_exact_mut(n).enumerate() {
                        let a = &acc[c * width + i * n..][..n];
                        let (s, b) = (self.out_scale[c], self.bias[c]);
                        if self.relu {
                            o.iter_mut().zip(a).for_each(|(o, &a)| *o = (a as f32 * s + b).max(0.0));
                        } else {
                            o.iter_mut().zip(a).for_each(|(o, &a)| *o = a as f32 * s + b);
                        }
                    }
                }
                first += g;
            }
        });
    }
}

/// Integer linear layer: `[batch, in] (u8 activations) × [in, out] (i8 weights, packed)`.
pub struct LinearInt8 {
    packed: rten_gemm::PackedBMatrix<i8>,
    weight_zero: Vec<i8>,
    out_scale: Vec<f32>,
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
    /// Builds the kernel from a linear layer's view.
    pub fn new(view: &LayerView<'_>, layer: &IntLayer) -> Option<Self> {
        let Op::Linear { in_features, out_features, .. } = *view.op else { return None };
        if layer.weight_scales.len() != out_features {
            return None;
        }
        let qmax = layer.qmax();
        // Transposed to `[in, out]`, the GEMM's right-hand side.
        let mut wt = vec![0i8; in_features * out_features];
        for o in 0..out_features {
            for i in 0..in_features {
                wt[i * out_features + o] =
                    quantize_weight(view.weight[o * in_features + i], layer.weight_scales[o], qmax) as i8;
            }
        }
        let packed = INT8.with(|e| e.prepack_b(NdTensorView::from_data([in_features, out_features], &wt[..])));
        Some(Self {
            packed,
            weight_zero: vec![0; out_features],
            out_scale: layer.weight_scales.iter().map(|s| s * layer.input.scale).collect(),
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
        format!("linear/int8-gemm-rten{}{bits}", if self.relu { "+relu" } else { "" })
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], _ctx: &RunContext) {
        let (k, n) = (self.in_features, self.out_features);
        BUFFERS.with(|b| {
            let Buffers { image: x, row_zero, acc, .. } = &mut *b.borrow_mut();
            x.resize(batch * k, 0);
            acc.resize(batch * n, 0);
            quantize_u8(&inputs[0][..batch * k], self.input_params, x);
            row_zero.clear();
            row_zero.resize(batch, self.input_params.zero_point as u8);
            let opts = GemmOptions {
                a_quant: Some(RtenQuant { zero_point: &row_zero[..] }),
                b_quant: Some(RtenQuant { zero_point: &self.weight_zero[..] }),
                ..Default::default()
            };
            let a = GemmInputA::Unpacked(NdTensorView::from_data([batch, k], &x[..]));
            INT8.with(|e| e.gemm(&mut acc[..batch * n], a, GemmInputB::Packed(&self.packed), opts))
                .expect("shapes checked at freeze time");
            for (o, a) in output.chunks_exact_mut(n).zip(acc.chunks_exact(n)).take(batch) {
                for j in 0..n {
                    let y = a[j] as f32 * self.out_scale[j] + self.bias[j];
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
