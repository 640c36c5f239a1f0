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
        const { RefCell::new(Buffers { image: Vec::new(), cols: Vec::new(), row_zero: Vec::new(), acc: Vec::new() }) };
}

/// The name of the integer GEMM kernel rten picked for this CPU (e.g. `x86_64-u8i8i32-avx512`).
pub fn int8_gemm_kernel_name() -> String {
    INT8.with(|e| e.kernel_name().to_string())
}

struct Buffers {
    /// A quantized image (conv) or batch (linear).
    image: Vec<u8>,
    /// The unrolled image of a conv.
    cols: Vec<u8>,
    /// One zero point per row of the left-hand side.
    row_zero: Vec<u8>,
    acc: Vec<i32>,
}

/// Quantizes `x` to u8 with `p` (round half up, saturating): `q = clamp(x / scale + zp)`.
/// Written so that it vectorises: multiply, add, clamp, truncate.
fn quantize_u8(x: &[f32], p: QuantParams, out: &mut [u8]) {
    let (inv, zp) = (1.0 / p.scale, p.zero_point as f32 + 0.5);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v * inv + zp).clamp(0.0, 255.49) as u8;
    }
}

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

/// Integer convolution (groups = 1), computed transposed: `im2col(image)ᵀ [h·w, k] (u8) ×
/// Wᵀ [k, cout] (i8, packed once)`. The weights sit on the GEMM's right-hand side because rten
/// keeps their packing valid only with a zero point of 0, which symmetric weights have; the
/// input is quantized and unrolled in one pass, and the epilogue writes channel-major f32.
pub struct ConvInt8 {
    packed: rten_gemm::PackedBMatrix<i8>,
    /// Per output channel: 0 (symmetric weights).
    weight_zero: Vec<i8>,
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
        let mut wt = vec![0i8; k * out_channels];
        for (o, row) in view.weight.chunks_exact(k).enumerate() {
            let s = layer.weight_scales[o];
            for (p, &w) in row.iter().enumerate() {
                wt[p * out_channels + o] = quantize_weight(w, s, qmax) as i8;
            }
        }
        let packed = INT8.with(|e| e.prepack_b(NdTensorView::from_data([k, out_channels], &wt[..])));
        Some(Self {
            packed,
            weight_zero: vec![0; out_channels],
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
            bits: layer.weight_bits,
        })
    }

    /// Unrolls the quantized image `q` (`[c, h, w]` u8) into `cols` (`[oh·ow, c·kh·kw]`), the
    /// padding filled with the zero point.
    fn unroll(&self, q: &[u8], cols: &mut [u8]) {
        let (cin, h, w) = self.input;
        let (_, oh, ow) = self.output;
        let [kh, kw] = self.kernel;
        let k = cin * kh * kw;
        let zero = self.input_params.zero_point as u8;
        for oy in 0..oh {
            for ox in 0..ow {
                let row = &mut cols[(oy * ow + ox) * k..][..k];
                let mut p = 0;
                for c in 0..cin {
                    let plane = &q[c * h * w..(c + 1) * h * w];
                    for ky in 0..kh {
                        let iy = (oy * self.stride[0] + ky * self.dilation[0]) as isize - self.padding[0] as isize;
                        for kx in 0..kw {
                            let ix = (ox * self.stride[1] + kx * self.dilation[1]) as isize - self.padding[1] as isize;
                            row[p] = if iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize {
                                plane[iy as usize * w + ix as usize]
                            } else {
                                zero
                            };
                            p += 1;
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
        format!("conv2d/int8-im2col-gemm-rten{}{bits}", if self.relu { "+relu" } else { "" })
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], _ctx: &RunContext) {
        let (cin, h, w) = self.input;
        let (cout, oh, ow) = self.output;
        let (in_len, out_len, n) = (cin * h * w, cout * oh * ow, oh * ow);
        let k = cin * self.kernel[0] * self.kernel[1];
        BUFFERS.with(|b| {
            let Buffers { image, cols, row_zero, acc } = &mut *b.borrow_mut();
            image.resize(in_len, 0);
            cols.resize(n * k, 0);
            acc.resize(n * cout, 0);
            row_zero.clear();
            row_zero.resize(n, self.input_params.zero_point as u8);
            for (i, out) in output.chunks_exact_mut(out_len).enumerate().take(batch) {
                quantize_u8(&inputs[0][i * in_len..(i + 1) * in_len], self.input_params, image);
                self.unroll(image, cols);
                let opts = GemmOptions {
                    a_quant: Some(RtenQuant { zero_point: &row_zero[..] }),
                    b_quant: Some(RtenQuant { zero_point: &self.weight_zero[..] }),
                    ..Default::default()
                };
                let a = GemmInputA::Unpacked(NdTensorView::from_data([n, k], &cols[..]));
                INT8.with(|e| e.gemm(&mut acc[..], a, GemmInputB::Packed(&self.packed), opts))
                    .expect("shapes checked at freeze time");
                for (j, a) in acc.chunks_exact(cout).enumerate() {
                    for c in 0..cout {
                        let y = a[c] as f32 * self.out_scale[c] + self.bias[c];
                        out[c * n + j] = if self.relu { y.max(0.0) } else { y };
                    }
                }
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
