//! [`DepthwiseInt8`]: integer depthwise convolutions (one filter per channel, MobileNet's 3×3
//! layers) on [`shrink_core::kernels::depthwise::depthwise_u8`].

use shrink_core::graph::Op;
use std::cell::RefCell;

use shrink_core::kernels::depthwise::{DepthwiseScratch, DepthwiseShape, DepthwiseU8Layer, depthwise_u8_channels};
use shrink_core::runtime::{Kernel, LayerView, RunContext};

use super::{ChannelEpilogue, IntLayer, dims};

thread_local! {
    static SCRATCH: RefCell<DepthwiseScratch> = RefCell::new(DepthwiseScratch::default());
}

/// Integer depthwise convolution: the input quantized to u8 into a channels-last image padded
/// with its zero point (the channels rounded up to the kernel's block), `Σ a · (q − z_w)` per
/// channel and pixel in i32, and the integer epilogue back to channel-major f32. Asymmetric
/// weights are handled by storing `q − z_w` (in `[-255, 255]`) as the kernel's weights, so the
/// only correction left is the input's zero point times each channel's weight sum: the
/// epilogue computes `scale_in · scale_w · Σ (a − z_a)(q − z_w) + bias`, what the simulation does.
pub struct DepthwiseInt8 {
    /// The integer layer (its weights `q − z_w`).
    layer: DepthwiseU8Layer,
    epilogue: ChannelEpilogue,
    bits: u32,
    isa: shrink_core::kernels::isa::Isa,
}

impl std::fmt::Debug for DepthwiseInt8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DepthwiseInt8").field("layer", &self.layer.shape).finish()
    }
}

impl DepthwiseInt8 {
    /// Builds the kernel for a depthwise convolution (groups = input channels = output
    /// channels), or `None` for any other layer.
    pub fn new(view: &LayerView<'_>, layer: &IntLayer) -> Option<Self> {
        let Op::Conv2d { in_channels, out_channels, kernel, stride, padding, dilation, groups, .. } = *view.op else {
            return None;
        };
        if !is_depthwise(view.op) || layer.weight_scales.len() != out_channels || layer.dynamic {
            return None;
        }
        let input = dims(view.input);
        let (_, oh, ow) = dims(view.output);
        debug_assert_eq!((in_channels, groups), (out_channels, out_channels));
        let c = depthwise_u8_channels(out_channels);
        let taps = kernel[0] * kernel[1];
        let mut weights = vec![0i32; taps * c];
        let mut sums = vec![0i32; out_channels];
        for o in 0..out_channels {
            let zero = layer.weight_zero_points.get(o).copied().unwrap_or(0);
            for t in 0..taps {
                let q = layer.int_weight(view.weight[o * taps + t], o) as i32 - zero;
                weights[t * c + o] = q;
                sums[o] += q;
            }
        }
        let mut epilogue = ChannelEpilogue::new(view, layer, &sums);
        // The weights' zero points are inside the stored weights.
        epilogue.weight_zero.clear();
        Some(Self {
            layer: DepthwiseU8Layer {
                shape: DepthwiseShape {
                    channels: out_channels,
                    input: [input.1, input.2],
                    output: [oh, ow],
                    kernel,
                    stride,
                    padding,
                    dilation,
                },
                inverse_scale: 1.0 / layer.input.scale,
                zero_point: layer.input.zero_point as u8,
                weights,
            },
            epilogue,
            bits: layer.weight_bits,
            isa: shrink_core::kernels::int8::path(),
        })
    }
}

/// Whether `op` is a depthwise convolution: one group per input channel, one filter per group.
pub fn is_depthwise(op: &Op) -> bool {
    matches!(*op, Op::Conv2d { in_channels, out_channels, groups, .. } if groups > 1 && groups == in_channels && out_channels == in_channels)
}

impl Kernel for DepthwiseInt8 {
    fn applies_activation(&self) -> bool {
        true
    }

    fn label(&self) -> String {
        let bits = if self.bits == 8 { String::new() } else { format!(" (int{} weights)", self.bits) };
        format!("conv2d/int8-depthwise-{}{}{bits}", self.isa.name(), self.epilogue.label())
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], _ctx: &RunContext<'_>) {
        let DepthwiseShape { channels, input: [h, w], output: [oh, ow], .. } = self.layer.shape;
        let (in_len, out_len) = (channels * h * w, channels * oh * ow);
        SCRATCH.with(|s| {
            let scratch = &mut *s.borrow_mut();
            for i in 0..batch {
                let residual = inputs.get(1).map_or(&[][..], |r| &r[i * out_len..(i + 1) * out_len]);
                self.layer.run(
                    &inputs[0][i * in_len..(i + 1) * in_len],
                    &self.epilogue.kernel(&[], residual),
                    &mut output[i * out_len..(i + 1) * out_len],
                    scratch,
                    self.isa,
                );
            }
        });
    }
}
