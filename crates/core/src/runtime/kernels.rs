//! The f32 kernels of the CPU plan. Each implements [`Kernel`]; weights are laid out once, at
//! freeze time, in the order the GEMM reads them.

use super::{Aligned, aligned};
use super::{Kernel, LayerLink, LayerView, RunContext};
use crate::graph::{Op, PadMode, PoolWindow, ValueShape};
use shrink_kernels::activation::{Activate, Activation, WithActivation};
use shrink_kernels::sgemm::sgemm;

fn map_dims(shape: ValueShape) -> (usize, usize, usize) {
    match shape {
        ValueShape::Map { channels, height, width } => (channels, height, width),
        ValueShape::Flat { features } => (features, 1, 1),
    }
}

/// A linear layer's `[out, in]` weight as `[in, out]`, the GEMM's right-hand side.
fn transposed(weight: &[f32], out_features: usize, in_features: usize) -> Vec<f32> {
    let mut t = vec![0.0; in_features * out_features];
    for o in 0..out_features {
        for i in 0..in_features {
            t[i * out_features + o] = weight[o * in_features + i];
        }
    }
    t
}

/// Adds the bias and applies ReLU over `[channels, plane]` in one pass (the GEMM's epilogue).
/// `out += residual`, then the ReLU: a fused residual add, after the bias.
fn add_relu(out: &mut [f32], residual: &[f32], relu: bool) {
    if relu {
        out.iter_mut().zip(residual).for_each(|(o, &r)| *o = (*o + r).max(0.0));
    } else {
        out.iter_mut().zip(residual).for_each(|(o, &r)| *o += r);
    }
}

fn bias_relu(out: &mut [f32], bias: Option<&[f32]>, plane: usize, relu: bool) {
    match (bias, relu) {
        (None, false) => {}
        (bias, relu) => {
            for (c, row) in out.chunks_exact_mut(plane).enumerate() {
                let b = bias.map_or(0.0, |b| b[c]);
                if relu {
                    row.iter_mut().for_each(|v| *v = (*v + b).max(0.0));
                } else {
                    row.iter_mut().for_each(|v| *v += b);
                }
            }
        }
    }
}

/// The geometry of a 2-d convolution, for kernels that unroll its input (im2col).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input `(channels, height, width)`.
    pub input: (usize, usize, usize),
    /// Output `(channels, height, width)`.
    pub output: (usize, usize, usize),
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride.
    pub stride: [usize; 2],
    /// Zero padding.
    pub padding: [usize; 2],
    /// Dilation.
    pub dilation: [usize; 2],
}

impl ConvGeometry {
    /// The geometry of a convolution's layer view; `None` for other ops.
    pub fn of(view: &LayerView<'_>) -> Option<Self> {
        let Op::Conv2d { kernel, stride, padding, dilation, .. } = *view.op else { return None };
        Some(Self { input: map_dims(view.input), output: map_dims(view.output), kernel, stride, padding, dilation })
    }

    /// im2col of channels `c0..c0+cin` of one image into `col` (`[cin*kh*kw, oh*ow]`, rows `ld`
    /// values apart, so several images can sit side by side in one matrix). Each
    /// output row is the zero padding at its ends and, between them, a plain copy of the image
    /// row (strided for stride > 1): measured faster than rten's gather-based virtual im2col.
    pub fn im2col(&self, image: &[f32], c0: usize, cin: usize, col: &mut [f32], ld: usize) {
        let (_, h, w) = self.input;
        let (_, oh, ow) = self.output;
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        let [ph, pw] = self.padding;
        let [dh, dw] = self.dilation;
        let n = oh * ow;
        for kx in 0..kw {
            // Output columns whose input column `ox * sw + kx * dw - pw` lies inside the image.
            let shift = (kx * dw) as isize - pw as isize;
            let lo = if shift >= 0 { 0 } else { ((-shift) as usize).div_ceil(sw) }.min(ow);
            let hi = if (w as isize) - shift <= 0 { 0 } else { (((w as isize - shift) as usize).div_ceil(sw)).min(ow) };
            let hi = hi.max(lo);
            for c in 0..cin {
                let plane = &image[(c0 + c) * h * w..(c0 + c + 1) * h * w];
                for ky in 0..kh {
                    let row = &mut col[((c * kh + ky) * kw + kx) * ld..][..n];
                    for (oy, dst) in row.chunks_exact_mut(ow).enumerate() {
                        let iy = (oy * sh + ky * dh) as isize - ph as isize;
                        if iy < 0 || iy >= h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                        dst[..lo].fill(0.0);
                        dst[hi..].fill(0.0);
                        let start = (lo * sw) as isize + shift;
                        if hi > lo {
                            let start = start as usize;
                            if sw == 1 {
                                dst[lo..hi].copy_from_slice(&src[start..start + hi - lo]);
                            } else {
                                for (d, s) in dst[lo..hi].iter_mut().zip(src[start..].iter().step_by(sw)) {
                                    *d = *s;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A layer's kernel followed by the activation fused into the layer
/// ([`LayerView::activation`]), for kernels that do not apply it themselves: one pass over the
/// output the kernel wrote, with [`Activation::apply`], the same bits as a separate step.
#[derive(Debug)]
pub struct Activated {
    inner: Box<dyn Kernel>,
    activation: Activation,
    /// Values per image of the layer's output.
    out_len: usize,
}

impl Activated {
    /// `inner`, then `activation` over its `out_len` values per image.
    ///
    /// # Panics
    /// When `inner` writes another layout than its output's (a hand-over to the next layer,
    /// [`Kernel::output_len_per_image`]): the plan never pairs such a kernel with an activation
    /// it leaves to this pass.
    pub fn new(inner: Box<dyn Kernel>, activation: Activation, out_len: usize) -> Self {
        assert!(inner.output_len_per_image().is_none(), "an activation over a hand-over layout");
        Self { inner, activation, out_len }
    }
}

impl Kernel for Activated {
    fn label(&self) -> String {
        format!("{}, then {}/f32", self.inner.label(), self.activation.label())
    }

    fn scratch_per_image(&self) -> usize {
        self.inner.scratch_per_image()
    }

    fn applies_activation(&self) -> bool {
        true
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, scratch: &mut [f32], ctx: &RunContext<'_>) {
        self.inner.run(inputs, output, batch, scratch, ctx);
        // The variant chosen outside the loop (as a type), so that the loop vectorises.
        Activation::dispatch(Some(self.activation), ActivateAll(&mut output[..batch * self.out_len]));
    }
}

/// [`Activate`] over every value of a slice, in place.
struct ActivateAll<'a>(&'a mut [f32]);

impl WithActivation for ActivateAll<'_> {
    type Output = ();

    fn run<A: Activate>(self, a: A) {
        for v in self.0.iter_mut() {
            *v = a.activate(*v);
        }
    }
}

/// Convolution as im2col + GEMM (1×1 stride-1 convolutions skip the im2col), grouped
/// convolutions as one GEMM per group, depthwise convolutions as a direct loop.
#[derive(Debug)]
pub struct ConvF32 {
    weight: Aligned,
    bias: Option<Vec<f32>>,
    relu: bool,
    /// Adds its second input after the bias (a fused residual add).
    residual: bool,
    input: (usize, usize, usize),
    output: (usize, usize, usize),
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    /// A depthwise convolution's kernel, its weights laid out once for its layout.
    depthwise: Option<shrink_kernels::depthwise::DepthwiseF32>,
}

impl ConvF32 {
    /// Builds the kernel from a layer view of a convolution.
    ///
    /// # Panics
    /// If the view is not a convolution (the registry only offers it convolutions).
    pub fn new(view: &LayerView<'_>) -> Self {
        let Op::Conv2d { kernel, stride, padding, dilation, groups, .. } = *view.op else {
            panic!("ConvF32 needs a conv2d view")
        };
        let mut conv = Self {
            weight: aligned(view.weight),
            bias: view.bias.map(|b| b.to_vec()),
            relu: view.relu,
            residual: view.residual,
            input: map_dims(view.input),
            output: map_dims(view.output),
            kernel,
            stride,
            padding,
            dilation,
            groups,
            depthwise: None,
        };
        if conv.is_depthwise() {
            use shrink_kernels::depthwise::{DepthwiseF32, DepthwiseLayout};
            let shape = conv.depthwise_shape();
            conv.depthwise = Some(DepthwiseF32::new(&shape, view.weight, DepthwiseLayout::for_shape(&shape)));
        }
        conv
    }

    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
    }

    fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.input.0 && self.groups == self.output.0
    }

    fn geometry(&self) -> ConvGeometry {
        ConvGeometry {
            input: self.input,
            output: self.output,
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
        }
    }

    fn im2col(&self, image: &[f32], c0: usize, cin: usize, col: &mut [f32]) {
        let (_, oh, ow) = self.output;
        self.geometry().im2col(image, c0, cin, col, oh * ow);
    }

    fn depthwise_shape(&self) -> shrink_kernels::depthwise::DepthwiseShape {
        let (c, h, w) = self.input;
        let (_, oh, ow) = self.output;
        shrink_kernels::depthwise::DepthwiseShape {
            channels: c,
            input: [h, w],
            output: [oh, ow],
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
        }
    }

    fn image(&self, image: &[f32], residual: Option<&[f32]>, out: &mut [f32], col: &mut [f32], threads: usize) {
        let (cin, _, _) = self.input;
        let (cout, oh, ow) = self.output;
        let n = oh * ow;
        if let Some(depthwise) = &self.depthwise {
            depthwise.run(image, out);
        } else {
            let (gin, gout) = (cin / self.groups, cout / self.groups);
            let k = gin * self.kernel[0] * self.kernel[1];
            for g in 0..self.groups {
                let w = &self.weight[g * gout * k..(g + 1) * gout * k];
                let dst = &mut out[g * gout * n..(g + 1) * gout * n];
                if self.is_pointwise() {
                    sgemm(gout, n, k, w, k, &image[g * gin * n..(g + 1) * gin * n], n, dst, n, false, threads);
                } else {
                    self.im2col(image, g * gin, gin, col);
                    sgemm(gout, n, k, w, k, col, n, dst, n, false, threads);
                }
            }
        }
        bias_relu(out, self.bias.as_deref(), n, self.relu && residual.is_none());
        if let Some(r) = residual {
            add_relu(out, r, self.relu);
        }
    }

    /// The label's suffix for what the epilogue fuses.
    fn fused(&self) -> &'static str {
        fused_suffix(self.residual, self.relu)
    }
}

/// What a convolution's label says it fuses.
fn fused_suffix(residual: bool, relu: bool) -> &'static str {
    match (residual, relu) {
        (true, true) => "+add+relu",
        (true, false) => "+add",
        (false, true) => "+relu",
        (false, false) => "",
    }
}

impl Kernel for ConvF32 {
    fn label(&self) -> String {
        use shrink_kernels::depthwise::DepthwiseLayout;
        let how = if let Some(depthwise) = &self.depthwise {
            match depthwise.layout() {
                DepthwiseLayout::Planar => "direct-depthwise",
                DepthwiseLayout::ChannelsLast => "direct-depthwise-channels-last",
            }
        } else if self.is_pointwise() {
            "gemm"
        } else {
            "im2col-gemm"
        };
        format!("conv2d/f32-{how}{}", self.fused())
    }

    fn scratch_per_image(&self) -> usize {
        if self.is_pointwise() || self.is_depthwise() {
            0
        } else {
            let (cin, _, _) = self.input;
            let (_, oh, ow) = self.output;
            cin / self.groups * self.kernel[0] * self.kernel[1] * oh * ow
        }
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, scratch: &mut [f32], ctx: &RunContext<'_>) {
        let (cin, h, w) = self.input;
        let (cout, oh, ow) = self.output;
        let (in_len, out_len, s_len) = (cin * h * w, cout * oh * ow, self.scratch_per_image());
        ctx.for_each_image(batch, output, out_len, scratch, s_len, |i, out, col, gemm_threads| {
            let residual = inputs.get(1).map(|r| &r[i * out_len..(i + 1) * out_len]);
            self.image(&inputs[0][i * in_len..(i + 1) * in_len], residual, out, col, gemm_threads);
        });
    }
}

/// Fully connected layer: one GEMM for the whole batch, `[batch, in] × [in, out]`.
#[derive(Debug)]
pub struct LinearF32 {
    /// `[in, out]`: transposed once at freeze time so the GEMM reads rows.
    weight_t: Aligned,
    bias: Option<Vec<f32>>,
    relu: bool,
    in_features: usize,
    out_features: usize,
}

impl LinearF32 {
    /// Builds the kernel from a layer view of a linear layer (`weight` is `[out, in]`).
    pub fn new(view: &LayerView<'_>) -> Self {
        let (out_features, in_features) = (view.weight_shape[0], view.weight_shape[1]);
        let weight_t = transposed(view.weight, out_features, in_features);
        Self {
            weight_t: aligned(&weight_t),
            bias: view.bias.map(|b| b.to_vec()),
            relu: view.relu,
            in_features,
            out_features,
        }
    }
}

impl Kernel for LinearF32 {
    fn label(&self) -> String {
        format!("linear/f32-gemm{}", if self.relu { "+relu" } else { "" })
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], ctx: &RunContext<'_>) {
        let (k, n) = (self.in_features, self.out_features);
        ctx.with_gemm_threads(|threads| sgemm(batch, n, k, inputs[0], k, &self.weight_t, n, output, n, false, threads));
        for row in output.chunks_exact_mut(n) {
            for (j, v) in row.iter_mut().enumerate() {
                let x = *v + self.bias.as_ref().map_or(0.0, |b| b[j]);
                *v = if self.relu { x.max(0.0) } else { x };
            }
        }
    }
}

/// Element-wise and pooling kernels that have no weights.
#[derive(Debug)]
pub enum Simple {
    /// `max(x, 0)`.
    Relu,
    /// Sum of the inputs, optionally followed by ReLU (residual block ends).
    Add {
        /// Fused ReLU.
        relu: bool,
    },
    /// Max or average pooling.
    Pool {
        /// Max, or average with or without the padding in the divisor.
        kind: PoolKind,
        /// Input `(c, h, w)`.
        input: (usize, usize, usize),
        /// Output `(c, h, w)`.
        output: (usize, usize, usize),
        /// Window, stride, padding, dilation.
        window: PoolWindow,
    },
    /// Padding of each channel's plane.
    Pad {
        /// Input `(c, h, w)`.
        input: (usize, usize, usize),
        /// Rows and columns added at the top and left.
        begin: [usize; 2],
        /// Output `(c, h, w)`.
        output: (usize, usize, usize),
        /// What the new pixels hold.
        mode: PadMode,
    },
    /// Local response normalisation across channels.
    Lrn {
        /// Channels.
        channels: usize,
        /// Values per channel.
        plane: usize,
        /// Channels in the window.
        size: usize,
        /// Scale of the window's sum of squares.
        alpha: f32,
        /// Exponent.
        beta: f32,
        /// Offset.
        bias: f32,
    },
    /// The values unchanged (a reshape: same order, new shape).
    Copy,
    /// Channel shuffle: channel `g · (c / groups) + k` moves to `k · groups + g`.
    ChannelShuffle {
        /// Channels.
        channels: usize,
        /// Groups.
        groups: usize,
        /// Values per channel.
        plane: usize,
    },
    /// Mean over each channel's plane.
    GlobalAvgPool {
        /// Channels.
        channels: usize,
        /// Plane size.
        plane: usize,
    },
    /// Per-channel `x * scale + shift` (a batch norm that could not be folded).
    Affine {
        /// Scale per channel.
        scale: Vec<f32>,
        /// Shift per channel.
        shift: Vec<f32>,
        /// Values per channel.
        plane: usize,
        /// Fused ReLU.
        relu: bool,
    },
    /// An element-wise activation.
    Unary(Unary),
    /// `a · b` element-wise, `b` holding one value per `plane` values of `a` (1: equal shapes;
    /// `h · w`: one scale per channel of a feature map).
    Mul {
        /// Values of `a` per value of `b`.
        plane: usize,
    },
    /// The inputs of each image one after the other (channels or features).
    Concat {
        /// Values per image of each input.
        parts: Vec<usize>,
    },
    /// Softmax over each image's values.
    Softmax {
        /// Values per image.
        classes: usize,
    },
}

/// What a pooling window computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// The maximum (padding never wins).
    Max,
    /// The mean, padding counted as zeros in the divisor.
    AvgWithPadding,
    /// The mean of the pixels inside the image only.
    AvgWithoutPadding,
}

/// Element-wise activations without parameters of their own but constants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    /// `min(max(x, min), max)`.
    Clip {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
    /// `1 / (1 + e^−x)`.
    Sigmoid,
    /// `max(0, min(1, alpha · x + beta))`.
    HardSigmoid {
        /// Slope.
        alpha: f32,
        /// Offset.
        beta: f32,
    },
    /// `x · max(0, min(1, x / 6 + 1/2))`.
    HardSwish,
    /// `x · max(0, min(1, alpha · x + beta))`: a `HardSigmoid` and the `Mul` of its input by
    /// it, fused into one step (how exporters write hard-swish before opset 14); the same
    /// operations as the two steps, so the same bits.
    HardSigmoidGate {
        /// Slope.
        alpha: f32,
        /// Offset.
        beta: f32,
    },
    /// `x` if positive, else `alpha · x`.
    LeakyRelu {
        /// Negative slope.
        alpha: f32,
    },
}

impl Unary {
    /// The activation of one value.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Unary::Clip { min, max } => Activation::Clip { min, max }.apply(x),
            Unary::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Unary::HardSigmoid { alpha, beta } => (alpha * x + beta).clamp(0.0, 1.0),
            Unary::HardSwish => Activation::HARD_SWISH.apply(x),
            Unary::HardSigmoidGate { alpha, beta } => Activation::HardSigmoidGate { alpha, beta }.apply(x),
            Unary::LeakyRelu { alpha } => {
                if x > 0.0 {
                    x
                } else {
                    alpha * x
                }
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Unary::Clip { .. } => "clip",
            Unary::Sigmoid => "sigmoid",
            Unary::HardSigmoid { .. } => "hard_sigmoid",
            Unary::HardSwish => "hard_swish",
            Unary::HardSigmoidGate { .. } => "hard_sigmoid+mul",
            Unary::LeakyRelu { .. } => "leaky_relu",
        }
    }
}

impl Kernel for Simple {
    fn label(&self) -> String {
        match self {
            Simple::Relu => "relu/f32".into(),
            Simple::Add { relu } => format!("add/f32{}", if *relu { "+relu" } else { "" }),
            Simple::Pool { kind: PoolKind::Max, .. } => "max_pool2d/f32".into(),
            Simple::Pool { .. } => "avg_pool2d/f32".into(),
            Simple::Pad { .. } => "pad/f32".into(),
            Simple::Lrn { .. } => "lrn/f32".into(),
            Simple::Copy => "reshape/f32-copy".into(),
            Simple::ChannelShuffle { .. } => "channel_shuffle/f32".into(),
            Simple::GlobalAvgPool { .. } => "global_avg_pool/f32".into(),
            Simple::Affine { relu, .. } => {
                format!("batch_norm/f32-affine{}", if *relu { "+relu" } else { "" })
            }
            Simple::Unary(u) => format!("{}/f32", u.name()),
            Simple::Mul { plane: 1 } => "mul/f32".into(),
            Simple::Mul { .. } => "mul/f32-per-channel".into(),
            Simple::Concat { .. } => "concat/f32".into(),
            Simple::Softmax { .. } => "softmax/f32".into(),
        }
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], _batch: usize, _scratch: &mut [f32], _ctx: &RunContext<'_>) {
        match self {
            Simple::Relu => output.iter_mut().zip(inputs[0]).for_each(|(o, &x)| *o = x.max(0.0)),
            Simple::Add { relu } => {
                output.copy_from_slice(&inputs[0][..output.len()]);
                for other in &inputs[1..] {
                    output.iter_mut().zip(other.iter()).for_each(|(o, &x)| *o += x);
                }
                if *relu {
                    output.iter_mut().for_each(|o| *o = o.max(0.0));
                }
            }
            Simple::Pool { kind, input: (_, h, w), output: (_, oh, ow), window } => {
                let planes = inputs[0].chunks_exact(h * w).zip(output.chunks_exact_mut(oh * ow));
                for (plane, out) in planes {
                    pool_plane(*kind, window, plane, [*h, *w], out, [*oh, *ow]);
                }
            }
            Simple::Pad { input: (_, h, w), begin, output: (_, oh, ow), mode } => {
                let planes = inputs[0].chunks_exact(h * w).zip(output.chunks_exact_mut(oh * ow));
                for (plane, out) in planes {
                    pad_plane(*mode, plane, [*h, *w], *begin, out, [*oh, *ow]);
                }
            }
            Simple::Lrn { channels, plane, size, alpha, beta, bias } => {
                let (c, p) = (*channels, *plane);
                let before = (size - 1) / 2;
                for (x, out) in inputs[0].chunks_exact(c * p).zip(output.chunks_exact_mut(c * p)) {
                    for ch in 0..c {
                        let (lo, hi) = (ch.saturating_sub(before), (ch + size - before).min(c));
                        for i in 0..p {
                            let sum: f32 = (lo..hi).map(|k| x[k * p + i] * x[k * p + i]).sum();
                            let v = x[ch * p + i];
                            out[ch * p + i] = v / (bias + alpha / *size as f32 * sum).powf(*beta);
                        }
                    }
                }
            }
            Simple::Copy => output.copy_from_slice(&inputs[0][..output.len()]),
            Simple::ChannelShuffle { channels, groups, plane } => {
                let (c, g, p) = (*channels, *groups, *plane);
                let per = c / g;
                for (x, out) in inputs[0].chunks_exact(c * p).zip(output.chunks_exact_mut(c * p)) {
                    for gi in 0..g {
                        for k in 0..per {
                            let (from, to) = (gi * per + k, k * g + gi);
                            out[to * p..(to + 1) * p].copy_from_slice(&x[from * p..(from + 1) * p]);
                        }
                    }
                }
            }
            Simple::GlobalAvgPool { plane, .. } => {
                for (o, p) in output.iter_mut().zip(inputs[0].chunks_exact(*plane)) {
                    *o = p.iter().sum::<f32>() / *plane as f32;
                }
            }
            Simple::Affine { scale, shift, plane, relu } => {
                let c = scale.len();
                for (i, (o, p)) in output.chunks_exact_mut(*plane).zip(inputs[0].chunks_exact(*plane)).enumerate() {
                    let (s, t) = (scale[i % c], shift[i % c]);
                    for (o, &x) in o.iter_mut().zip(p) {
                        let y = x * s + t;
                        *o = if *relu { y.max(0.0) } else { y };
                    }
                }
            }
            Simple::Unary(u) => output.iter_mut().zip(inputs[0]).for_each(|(o, &x)| *o = u.apply(x)),
            Simple::Mul { plane: 1 } => {
                output.iter_mut().zip(inputs[0].iter().zip(inputs[1])).for_each(|(o, (&a, &b))| *o = a * b);
            }
            Simple::Mul { plane } => {
                for (o, (a, &b)) in output.chunks_mut(*plane).zip(inputs[0].chunks(*plane).zip(inputs[1])) {
                    o.iter_mut().zip(a).for_each(|(o, &a)| *o = a * b);
                }
            }
            Simple::Concat { parts } => {
                let per: usize = parts.iter().sum();
                for (i, out) in output.chunks_exact_mut(per).enumerate() {
                    let mut at = 0;
                    for (input, &len) in inputs.iter().zip(parts) {
                        out[at..at + len].copy_from_slice(&input[i * len..(i + 1) * len]);
                        at += len;
                    }
                }
            }
            Simple::Softmax { classes } => {
                for (o, x) in output.chunks_exact_mut(*classes).zip(inputs[0].chunks_exact(*classes)) {
                    let top = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for (o, &v) in o.iter_mut().zip(x) {
                        *o = (v - top).exp();
                        sum += *o;
                    }
                    o.iter_mut().for_each(|v| *v /= sum);
                }
            }
        }
    }
}

/// One channel's pooling: every output pixel from its window's taps inside the image.
fn pool_plane(
    kind: PoolKind,
    window: &PoolWindow,
    plane: &[f32],
    [h, w]: [usize; 2],
    out: &mut [f32],
    [oh, ow]: [usize; 2],
) {
    let PoolWindow { kernel, stride, begin, end, dilation, .. } = *window;
    for oy in 0..oh {
        for ox in 0..ow {
            let (y0, x0) =
                ((oy * stride[0]) as isize - begin[0] as isize, (ox * stride[1]) as isize - begin[1] as isize);
            let mut acc = if kind == PoolKind::Max { f32::NEG_INFINITY } else { 0.0 };
            let (mut inside, mut padded) = (0usize, 0usize);
            for ky in 0..kernel[0] {
                let iy = y0 + (ky * dilation[0]) as isize;
                for kx in 0..kernel[1] {
                    let ix = x0 + (kx * dilation[1]) as isize;
                    if iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize {
                        let v = plane[iy as usize * w + ix as usize];
                        acc = if kind == PoolKind::Max { acc.max(v) } else { acc + v };
                        inside += 1;
                    }
                    // Taps in the declared padding count for the padded divisor; taps past it
                    // (a ceil-mode window hanging over the edge) never do.
                    if iy < (h + end[0]) as isize && ix < (w + end[1]) as isize {
                        padded += 1;
                    }
                }
            }
            out[oy * ow + ox] = match kind {
                PoolKind::Max => acc,
                PoolKind::AvgWithPadding => acc / padded as f32,
                PoolKind::AvgWithoutPadding => acc / inside.max(1) as f32,
            };
        }
    }
}

/// One channel's padding: the image copied into the middle, the border filled by `mode`.
fn pad_plane(
    mode: PadMode,
    plane: &[f32],
    [h, w]: [usize; 2],
    begin: [usize; 2],
    out: &mut [f32],
    [oh, ow]: [usize; 2],
) {
    // Where a padded coordinate reads from, for the modes that copy image pixels.
    let source = |i: usize, before: usize, n: usize| -> Option<usize> {
        let at = i as isize - before as isize;
        let last = n as isize - 1;
        match mode {
            PadMode::Constant { .. } => (0..=last).contains(&at).then_some(at as usize),
            PadMode::Edge => Some(at.clamp(0, last) as usize),
            PadMode::Reflect => {
                let r = if at < 0 {
                    -at
                } else if at > last {
                    2 * last - at
                } else {
                    at
                };
                Some(r as usize)
            }
        }
    };
    let fill = match mode {
        PadMode::Constant { value } => value,
        _ => 0.0,
    };
    for oy in 0..oh {
        let sy = source(oy, begin[0], h);
        for ox in 0..ow {
            out[oy * ow + ox] = match (sy, source(ox, begin[1], w)) {
                (Some(y), Some(x)) => plane[y * w + x],
                _ => fill,
            };
        }
    }
}

/// Direct convolution ([`shrink_kernels::conv::DirectConv`]): no im2col matrix; the image is
/// padded (split into phase planes for a stride of 2 or more, or blocked by channels for the
/// channel algorithm) into the plan's scratch, and a tile of outputs is accumulated in registers,
/// with the bias, residual and fused ReLU applied as it is stored. For dense (groups = 1),
/// undilated convolutions with equal strides, on the path `SHRINK_ISA` selects or the best this
/// CPU has. Between two convolutions on the channel algorithm, where the plan paired them, the
/// first writes the second's blocked input directly ([`blocked_handover`]).
#[derive(Debug)]
pub struct ConvDirect {
    conv: shrink_kernels::conv::DirectConv,
    bias: Option<Vec<f32>>,
    relu: bool,
    residual: bool,
    /// Its input arrives in its blocked layout, written by the convolution before it.
    input_blocked: bool,
    /// It writes its output in the next convolution's blocked layout.
    output_blocked: Option<shrink_kernels::conv::BlockedImage>,
}

/// The geometry of a convolution the direct kernel runs on `isa` (not the portable path): groups
/// 1, no dilation, equal strides.
fn direct_shape(
    op: &Op,
    input: ValueShape,
    output: ValueShape,
    isa: shrink_kernels::isa::Isa,
) -> Option<shrink_kernels::conv::ConvShape> {
    let Op::Conv2d { kernel, stride, padding, dilation, groups, .. } = *op else { return None };
    if groups != 1 || dilation != [1, 1] || stride[0] != stride[1] || isa == shrink_kernels::isa::Isa::Portable {
        return None;
    }
    let (cin, h, w) = map_dims(input);
    let (cout, ..) = map_dims(output);
    Some(shrink_kernels::conv::ConvShape { input: [cin, h, w], out_channels: cout, kernel, stride: stride[0], padding })
}

/// The f32 fusion rule, in one place: the blocked image `to` reads when `from` (the layer whose
/// value only `to` reads, as the plan paired them) writes it in its epilogue — both on the
/// direct kernel's channel algorithm. Producer and consumer both call it, so they agree. Only
/// for the plan's own kernels (`ConvDirect::new`'s `hand_over`): where a registry has builders,
/// one of them could take either layer.
pub fn blocked_handover(from: &LayerLink<'_>, to: &LayerLink<'_>) -> Option<shrink_kernels::conv::BlockedImage> {
    use shrink_kernels::conv::{Algorithm, BlockedImage};
    let isa = shrink_kernels::isa::selected();
    if from.activation.is_some() {
        // Applied after the producer's kernel (`Activated`), which a blocked output would skip.
        return None;
    }
    let first = direct_shape(from.op, from.input, from.output, isa)?;
    let second = direct_shape(to.op, to.input, to.output, isa)?;
    if Algorithm::for_layer(&first, isa) != Algorithm::Channels || from.value != to.input {
        return None;
    }
    BlockedImage::input_of(&second, isa)
}

impl ConvDirect {
    /// Builds the kernel, or `None` for a convolution it does not run (groups, dilation,
    /// unequal strides), or where the CPU has no vector path (the GEMM kernels are faster there).
    /// With `hand_over`, it reads or writes a blocked image where [`blocked_handover`] says so.
    pub fn new(view: &LayerView<'_>, hand_over: bool) -> Option<Self> {
        let isa = shrink_kernels::isa::selected();
        let shape = direct_shape(view.op, view.input, view.output, isa)?;
        let this = LayerLink {
            name: view.name,
            op: view.op,
            input: view.input,
            output: view.output,
            value: view.output,
            activation: view.activation,
        };
        let (mut input_blocked, mut output_blocked) = (false, None);
        if hand_over {
            input_blocked = view.reads_from.is_some_and(|from| blocked_handover(&from, &this).is_some());
            output_blocked = view.read_by.and_then(|to| blocked_handover(&this, &to));
        }
        let conv = shrink_kernels::conv::DirectConv::with_isa(view.weight, shape, isa);
        debug_assert!(!input_blocked || conv.input_layout().is_some());
        Some(Self {
            conv,
            bias: view.bias.map(|b| b.to_vec()),
            relu: view.relu,
            residual: view.residual,
            input_blocked,
            output_blocked,
        })
    }
}

impl Kernel for ConvDirect {
    fn label(&self) -> String {
        let algorithm = match self.conv.algorithm() {
            shrink_kernels::conv::Algorithm::Positions => "",
            shrink_kernels::conv::Algorithm::Channels => "-channels",
        };
        let handover = match (self.input_blocked, self.output_blocked.is_some()) {
            (false, false) => "",
            (true, false) => "-blocked-in",
            (false, true) => "-blocked-out",
            (true, true) => "-blocked-in-out",
        };
        format!(
            "conv2d/f32-direct-{}{algorithm}{handover}{}",
            self.conv.isa().name(),
            fused_suffix(self.residual, self.relu)
        )
    }

    fn scratch_per_image(&self) -> usize {
        self.conv.scratch_len()
    }

    fn output_len_per_image(&self) -> Option<usize> {
        self.output_blocked.map(|image| image.len())
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, scratch: &mut [f32], ctx: &RunContext<'_>) {
        use shrink_kernels::conv::{Input, Output};
        let shape = self.conv.shape();
        let [c, h, w] = shape.input;
        let [oh, ow] = shape.output();
        let plain_out = shape.out_channels * oh * ow;
        let in_len = match (self.input_blocked, self.conv.input_layout()) {
            (true, Some(layout)) => layout.len(),
            _ => c * h * w,
        };
        let out_len = self.output_blocked.map_or(plain_out, |image| image.len());
        for (i, out) in output.chunks_exact_mut(out_len).enumerate().take(batch) {
            let epilogue = shrink_kernels::conv::Epilogue {
                bias: self.bias.as_deref(),
                residual: inputs.get(1).map(|r| &r[i * plain_out..(i + 1) * plain_out]),
                relu: self.relu,
            };
            let image = &inputs[0][i * in_len..(i + 1) * in_len];
            let input = if self.input_blocked { Input::Blocked(image) } else { Input::ChannelMajor(image) };
            let output = match self.output_blocked {
                Some(layout) => Output::Blocked(out, layout),
                None => Output::ChannelMajor(out),
            };
            self.conv.run_with(input, output, epilogue, scratch, ctx.team);
        }
    }
}

/// Convolution on rten-gemm, the default: the weights of each group are packed once, at freeze
/// time, into the GEMM's panel layout; the image is unrolled (im2col by row copies) into the
/// plan's scratch and rten packs it into thread-local buffers that are reused, so a forward pass
/// allocates nothing; the bias is added in the GEMM's epilogue. (rten's own "virtual" im2col,
/// which gathers while packing, measured as slow as the GEMM itself and was dropped.)
pub struct ConvRten {
    inner: ConvF32,
    packed: Vec<rten_gemm::PackedAMatrix<f32>>,
}

thread_local! {
    // rten's executor is not `Send`; each thread keeps its own. All pick the same kernel for the
    // CPU, so weights packed by one are valid for every other.
    static RTEN: rten_gemm::GemmExecutor<f32, f32, f32> = rten_gemm::GemmExecutor::default();
}

impl std::fmt::Debug for ConvRten {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvRten").field("conv", &self.inner).finish()
    }
}

impl ConvRten {
    /// Builds the kernel, or `None` for depthwise convolutions (left to the direct kernel).
    pub fn new(view: &LayerView<'_>) -> Option<Self> {
        let inner = ConvF32::new(view);
        if inner.is_depthwise() {
            return None;
        }
        let (cin, cout) = (inner.input.0, inner.output.0);
        let (gin, gout) = (cin / inner.groups, cout / inner.groups);
        let k = gin * inner.kernel[0] * inner.kernel[1];
        let packed = RTEN.with(|exec| {
            (0..inner.groups)
                .map(|g| {
                    let w = &inner.weight[g * gout * k..(g + 1) * gout * k];
                    exec.prepack_a(rten_tensor::NdTensorView::from_data([gout, k], w))
                })
                .collect()
        });
        Some(Self { inner, packed })
    }
}

impl Kernel for ConvRten {
    fn label(&self) -> String {
        let how = if self.inner.is_pointwise() { "rten-gemm" } else { "im2col-rten-gemm" };
        format!("conv2d/f32-{how}{}", self.inner.fused())
    }

    fn scratch_per_image(&self) -> usize {
        self.inner.scratch_per_image()
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, scratch: &mut [f32], ctx: &RunContext<'_>) {
        // rten spreads a GEMM over the current rayon pool: the team's, or this thread alone.
        ctx.with_gemm_threads(|_| self.images(inputs, output, batch, scratch));
    }
}

impl ConvRten {
    fn images(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, scratch: &mut [f32]) {
        let c = &self.inner;
        let (cin, h, w) = c.input;
        let (cout, oh, ow) = c.output;
        let (in_len, out_len) = (cin * h * w, cout * oh * ow);
        let (gin, gout) = (cin / c.groups, cout / c.groups);
        let (n, k) = (oh * ow, gin * c.kernel[0] * c.kernel[1]);
        for (i, out) in output.chunks_exact_mut(out_len).enumerate().take(batch) {
            let image = &inputs[0][i * in_len..(i + 1) * in_len];
            for g in 0..c.groups {
                let bias = c.bias.as_ref().map(|b| rten_gemm::BiasVector::Column(&b[g * gout..(g + 1) * gout]));
                let opts = rten_gemm::GemmOptions { bias, ..Default::default() };
                let dst = &mut out[g * gout * n..(g + 1) * gout * n];
                let rhs: &[f32] = if c.is_pointwise() {
                    &image[g * gin * n..(g + 1) * gin * n]
                } else {
                    c.im2col(image, g * gin, gin, scratch);
                    &scratch[..k * n]
                };
                let a = rten_gemm::GemmInputA::Packed(&self.packed[g]);
                let b = rten_gemm::GemmInputB::Unpacked(rten_tensor::NdTensorView::from_data([k, n], rhs));
                RTEN.with(|exec| exec.gemm(dst, a, b, opts)).expect("shapes checked at freeze time");
            }
            match inputs.get(1) {
                Some(r) => add_relu(out, &r[i * out_len..(i + 1) * out_len], c.relu),
                None if c.relu => out.iter_mut().for_each(|v| *v = v.max(0.0)),
                None => {}
            }
        }
    }
}

/// Fully connected layer on rten-gemm, the default: `[batch, in] × [in, out]` with the weight
/// side packed once at freeze time and the bias added in the GEMM's epilogue.
pub struct LinearRten {
    packed: rten_gemm::PackedBMatrix<f32>,
    bias: Option<Vec<f32>>,
    relu: bool,
    in_features: usize,
    out_features: usize,
}

impl std::fmt::Debug for LinearRten {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinearRten").field("in", &self.in_features).field("out", &self.out_features).finish()
    }
}

impl LinearRten {
    /// Builds the kernel from a layer view of a linear layer (`weight` is `[out, in]`).
    pub fn new(view: &LayerView<'_>) -> Self {
        let (out_features, in_features) = (view.weight_shape[0], view.weight_shape[1]);
        let weight_t = transposed(view.weight, out_features, in_features);
        let packed = RTEN.with(|exec| {
            exec.prepack_b(rten_tensor::NdTensorView::from_data([in_features, out_features], &weight_t[..]))
        });
        Self { packed, bias: view.bias.map(|b| b.to_vec()), relu: view.relu, in_features, out_features }
    }
}

impl Kernel for LinearRten {
    fn label(&self) -> String {
        format!("linear/f32-rten-gemm{}", if self.relu { "+relu" } else { "" })
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], ctx: &RunContext<'_>) {
        let (k, n) = (self.in_features, self.out_features);
        let bias = self.bias.as_deref().map(rten_gemm::BiasVector::Row);
        let opts = rten_gemm::GemmOptions { bias, ..Default::default() };
        let a = rten_tensor::NdTensorView::from_data([batch, k], &inputs[0][..batch * k]);
        // rten spreads a GEMM over the current rayon pool: the team's, or this thread alone.
        ctx.with_gemm_threads(|_| {
            RTEN.with(|exec| {
                exec.gemm(
                    &mut output[..batch * n],
                    rten_gemm::GemmInputA::Unpacked(a),
                    rten_gemm::GemmInputB::Packed(&self.packed),
                    opts,
                )
            })
        })
        .expect("shapes checked at freeze time");
        if self.relu {
            output.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    }
}
