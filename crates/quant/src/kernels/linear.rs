//! [`LinearInt8`]: integer linear layers on the GEMM, with calibrated or per-batch (dynamic)
//! input ranges.

use shrink_core::graph::Op;
use shrink_core::runtime::{Kernel, LayerView, RunContext};

use super::{BUFFERS, Buffers, Int8Gemm, IntLayer, PackedInt8, dequantize, row_sums};
use crate::QuantParams;
use crate::scheme::quantize_u8;

/// Integer linear layer: `[batch, in] (u8 activations) × [in, out] (i8 weights, packed)`.
pub struct LinearInt8 {
    /// Input range measured per batch at run time instead of calibrated.
    dynamic: bool,
    /// Per output channel: the weight scale (times the input scale of the call in the epilogue).
    weight_scales: Vec<f32>,
    /// `Wᵀ`, `[in, out]`.
    weights: PackedInt8,
    /// Asymmetric weights: their zero points (see [`IntLayer::weight_zero_points`]); empty for
    /// symmetric weights.
    weight_zero: Vec<i32>,
    bias: Vec<f32>,
    relu: bool,
    /// The u8 grid the output is rounded to ([`IntLayer::output`]), after the ReLU.
    grid: Option<shrink_core::kernels::int8::Grid>,
    /// A clip or hard-swish fused after the layer, applied after the rounding.
    activation: Option<shrink_core::kernels::activation::Activation>,
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
            weight_zero: layer.nonzero_weight_zero_points().unwrap_or_default(),
            bias: view.bias.map(|b| b.to_vec()).unwrap_or_else(|| vec![0.0; out_features]),
            relu: view.relu,
            grid: layer.output.map(|p| shrink_core::kernels::int8::Grid::new(p.scale, p.zero_point as u8)),
            activation: view.activation,
            input_params: layer.input,
            in_features,
            out_features,
            bits: layer.weight_bits,
        })
    }
}

impl Kernel for LinearInt8 {
    fn applies_activation(&self) -> bool {
        true
    }

    fn label(&self) -> String {
        let bits = if self.bits == 8 { String::new() } else { format!(" (int{} weights)", self.bits) };
        let how = if self.dynamic { "int8-dynamic" } else { "int8" };
        let gemm = self.weights.name();
        let relu = if self.relu { "+relu" } else { "" };
        let rounded = if self.grid.is_some() { "+rounded-output" } else { "" };
        let activation = self.activation.map_or(String::new(), |a| format!("+{}", a.label()));
        format!("linear/{how}-gemm-{gemm}{relu}{rounded}{activation}{bits}")
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], _ctx: &RunContext<'_>) {
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
                crate::params_for_range(lo, hi, crate::scheme::ACTIVATION_SCHEME)
            } else {
                self.input_params
            };
            for (row, x) in input.chunks_exact(k).zip(x.chunks_exact_mut(lda)) {
                quantize_u8(row, params, &mut x[..k]);
            }
            self.weights.gemm(x, batch, params.zero_point as u8, row_zero, acc);
            let asymmetric = !self.weight_zero.is_empty();
            if asymmetric {
                row_sums(x, lda, k, batch, params.zero_point as u8, sums);
            }
            let zero_sums = self.weights.zero_sums();
            for (m, (o, a)) in output.chunks_exact_mut(n).zip(acc.chunks_exact(ldc)).take(batch).enumerate() {
                let (sum, relu) = (if asymmetric { sums[m] } else { 0 }, self.relu);
                for j in 0..n {
                    // The scale and correction of this call's input parameters (calibrated, or
                    // this batch's own when dynamic).
                    let correction = params.zero_point.wrapping_mul(zero_sums[j]);
                    let weight_zero = if asymmetric { self.weight_zero[j] } else { 0 };
                    let scale = self.weight_scales[j] * params.scale;
                    let y = dequantize(a[j], correction, weight_zero, sum, scale, self.bias[j], relu);
                    let y = self.grid.map_or(y, |g| g.round(y));
                    o[j] = self.activation.map_or(y, |a| a.apply(y));
                }
            }
        });
    }
}
