//! AdaRound (Nagel et al. 2020, "Up or down? Adaptive rounding for post-training
//! quantization"): instead of rounding each weight to the nearest level, learn, layer by layer
//! on calibration data, whether to round it up or down so that the layer's *output* changes
//! least. A continuous variable `V` per weight gives the rounding offset
//! `h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1)`; the loss is the output's mean squared error plus a
//! regulariser `λ·Σ(1 − |2h − 1|^β)` whose β anneals from 20 to 2, pushing every `h` to 0 or 1.

use burn::module::{Module, Param};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::sigmoid;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use shrink_core::graph::Op;

/// Settings of AdaRound.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaRoundSettings {
    /// Optimisation steps per layer.
    pub iterations: usize,
    /// Images per step (drawn from the stored calibration images).
    pub batch_size: usize,
    /// Adam's learning rate on `V`.
    pub lr: f64,
    /// Weight λ of the rounding regulariser.
    pub lambda: f64,
    /// Calibration images whose layer inputs are kept for the optimisation.
    pub images: usize,
}

impl AdaRoundSettings {
    /// Checks ranges; the error names the field.
    ///
    /// # Errors
    /// A message naming the field and what was expected.
    pub fn validate(&self) -> Result<(), String> {
        if self.iterations == 0 || self.batch_size == 0 || self.images == 0 {
            return Err("iterations, batch_size and images must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!("lr: expected a positive number, got {}", self.lr));
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(format!("lambda: expected a non-negative number, got {}", self.lambda));
        }
        Ok(())
    }
}

impl Default for AdaRoundSettings {
    fn default() -> Self {
        AdaRoundSettings { iterations: 500, batch_size: 32, lr: 0.01, lambda: 0.01, images: 128 }
    }
}

const ZETA: f64 = 1.1;
const GAMMA: f64 = -0.1;

#[derive(Module, Debug)]
struct Rounding {
    v: Param<Tensor<4>>,
}

fn rectified_sigmoid(v: Tensor<4>) -> Tensor<4> {
    sigmoid(v).mul_scalar(ZETA - GAMMA).add_scalar(GAMMA).clamp(0.0, 1.0)
}

/// The layer's output for input `x` and a weight `[out, in/groups, kh, kw]` (a linear layer's
/// `[out, in]` weight is stored as `[out, in, 1, 1]` and `x` is `[n, in]` reshaped to
/// `[n, in, 1, 1]`).
fn layer(op: &Op, x: Tensor<4>, w: Tensor<4>) -> Tensor<4> {
    match *op {
        Op::Conv2d { stride, padding, dilation, groups, .. } => {
            conv2d(x, w, None, ConvOptions::new(stride, padding, dilation, groups))
        }
        _ => conv2d(x, w, None, ConvOptions::new([1, 1], [0, 0], [1, 1], 1)),
    }
}

/// Learns the rounding of one layer's weight (`values` in the layout of `dims`; per-output-
/// channel `scales`, symmetric range `±qmax`) on its calibration `inputs` (`[n, c, h, w]`, or
/// `[n, in, 1, 1]` for a linear layer). Returns the dequantized weight, every value on its grid
/// and within one step of its nearest-rounding value.
///
/// # Errors
/// [`shrink_core::Error::TensorRead`] when the learned rounding cannot be read back.
pub fn adaround_weight(
    op: &Op,
    values: &[f32],
    dims: &[usize],
    scales: &[f32],
    qmax: i32,
    inputs: &Tensor<4>,
    settings: &AdaRoundSettings,
) -> shrink_core::Result<Vec<f32>> {
    let device: Device = inputs.device();
    let out = dims[0];
    let per = values.len() / out;
    let shape4 = if dims.len() == 4 { [dims[0], dims[1], dims[2], dims[3]] } else { [dims[0], dims[1], 1, 1] };
    // floor(W/s) and the fractional rest; V starts where h(V) equals the rest.
    let mut floor = Vec::with_capacity(values.len());
    let mut v0 = Vec::with_capacity(values.len());
    for (k, &w) in values.iter().enumerate() {
        let t = w / scales[k / per];
        let f = t.floor();
        floor.push(f);
        let rest = ((t - f) as f64).clamp(0.01, 0.99);
        v0.push((-((ZETA - GAMMA) / (rest - GAMMA) - 1.0).ln()) as f32);
    }
    let scale_t = Tensor::<4>::from_data(TensorData::new(scales.to_vec(), [out, 1, 1, 1]), &device);
    let floor_t = Tensor::<4>::from_data(TensorData::new(floor.clone(), shape4), &device);
    let w_f32 = Tensor::<4>::from_data(TensorData::new(values.to_vec(), shape4), &device);
    let ad = device.clone().autodiff();
    let mut module =
        Rounding { v: Param::from_tensor(Tensor::from_data(TensorData::new(v0, shape4), &device)) }.fork(&ad).train();
    let mut optim = AdamConfig::new().init();
    let n = inputs.dims()[0];
    let batch = settings.batch_size.min(n).max(1);
    // Deterministic batch offsets (xorshift), seeded by the layer's size.
    let mut state = (values.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let (lo, hi) = (-(qmax as f32), qmax as f32);
    for it in 0..settings.iterations {
        // A contiguous window of the stored images, at a pseudo-random offset.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let start = (state as usize) % (n - batch + 1);
        let x = inputs.clone().narrow(0, start, batch);
        let target = layer(op, x.clone(), w_f32.clone());
        let h = rectified_sigmoid(module.v.val());
        let levels = (floor_t.clone().autodiff() + h.clone()).clamp(lo, hi);
        let w_soft = levels * scale_t.clone().autodiff();
        let y = layer(op, x.autodiff(), w_soft);
        let rec = (y - target.autodiff()).powi_scalar(2).mean();
        // β anneals from 20 to 2 over the steps after a 20 % warm-up without the regulariser.
        let progress = it as f64 / settings.iterations.max(1) as f64;
        let loss = if progress < 0.2 {
            rec
        } else {
            let beta = 2.0 + 18.0 * (1.0 - (progress - 0.2) / 0.8);
            let reg = (h.mul_scalar(2.0).sub_scalar(1.0).abs().powf_scalar(beta).neg().add_scalar(1.0)).sum();
            rec + reg.mul_scalar(settings.lambda)
        };
        let grads = GradientsParams::from_grads(loss.backward(), &module);
        module = optim.step(settings.lr, module, grads);
    }
    let h = shrink_core::host::floats(rectified_sigmoid(module.v.val().inner()))?;
    Ok(floor
        .iter()
        .zip(&h)
        .enumerate()
        .map(|(k, (f, h))| (f + if *h >= 0.5 { 1.0 } else { 0.0 }).clamp(lo, hi) * scales[k / per])
        .collect())
}
