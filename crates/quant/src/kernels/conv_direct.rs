//! [`ConvDirectInt8`]: integer convolution computed directly on the quantized image, on
//! AVX-512 VNNI or AVX2 ([`shrink_core::kernels::int8::DirectConv`]).

use shrink_core::graph::{Op, ValueShape};
use shrink_core::runtime::{Kernel, LayerView, RunContext};

use super::{BUFFERS, Buffers, ChannelEpilogue, IntLayer, dims};
use crate::QuantParams;

/// Integer convolution on AVX-512 VNNI or AVX2, computed directly on the quantized image
/// ([`shrink_core::kernels::int8::DirectConv`]): the input is quantized once into four-channel-interleaved
/// rows padded with its zero point, and the epilogue writes channel-major f32, so unlike
/// [`ConvInt8`](super::ConvInt8) nothing is transposed or unrolled. Pruned weights (at most
/// [`shrink_core::kernels::int8::sparse_max_word_density`] of their four-channel words
/// non-zero) run on its sparse path, which skips the zero words. Convolutions with a stride other than 1 or 2
/// (or unequal strides), dilation, groups, or outputs the kernel's grid would waste more than
/// a third of the work on (see [`shrink_core::kernels::int8::DirectConv::supports`]) use [`ConvInt8`](super::ConvInt8).
pub struct ConvDirectInt8 {
    conv: shrink_core::kernels::int8::DirectConv,
    epilogue: ChannelEpilogue,
    input_params: QuantParams,
    input: (usize, usize, usize),
    output: (usize, usize, usize),
    padding: [usize; 2],
    kernel: [usize; 2],
    stride: usize,
    /// Rows and columns of the quantized image the kernel reads (see
    /// [`shrink_core::kernels::int8::DirectConv::image_size`]).
    image: (usize, usize),
    bits: u32,
    /// The output goes, requantized, straight into the next convolution's input image (see
    /// [`ConvDirectInt8::requantize_for`]).
    requantize: Option<shrink_core::kernels::int8::QuadImage>,
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
    /// Builds the kernel on the selected integer path ([`shrink_core::kernels::int8::path`]),
    /// or `None` where it does not apply (the path has no direct convolution, an unsupported
    /// stride, dilation or groups other than 1, an unsupported output width, dynamic
    /// quantization).
    pub fn new(view: &LayerView<'_>, layer: &IntLayer) -> Option<Self> {
        Self::with_isa(view, layer, shrink_core::kernels::int8::path())
    }

    /// As [`Self::new`], on integer path `isa` (`None` where the direct convolution does not run
    /// on it: [`shrink_core::kernels::int8::DirectConv::runs_on`]).
    pub fn with_isa(view: &LayerView<'_>, layer: &IntLayer, isa: shrink_core::kernels::isa::Isa) -> Option<Self> {
        if !shrink_core::kernels::int8::DirectConv::runs_on(isa) {
            return None;
        }
        let planned = Self::plan_input(view.op, view.input, view.output, layer)?;
        let Op::Conv2d { kernel, stride, padding, out_channels, .. } = *view.op else { unreachable!("planned") };
        let (input, output) = (dims(view.input), dims(view.output));
        let per = view.weight.len() / out_channels;
        let weights: Vec<i8> = view.weight.iter().enumerate().map(|(i, &w)| layer.int_weight(w, i / per)).collect();
        let mut conv =
            shrink_core::kernels::int8::DirectConv::with_isa(&weights, out_channels, input.0, kernel, stride[0], isa);
        // Pruned weights: the sparse path, below the measured crossover.
        if conv.word_density() <= shrink_core::kernels::int8::sparse_max_word_density(isa) {
            conv = conv.into_sparse(planned.height, planned.width);
        }
        Some(Self {
            image: (planned.height, planned.width),
            epilogue: ChannelEpilogue::new(view, layer, conv.column_sums()),
            conv,
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

    /// Whether a conv `op` from `input` to `output` quantized as `layer` fits this kernel
    /// ([`Self::new`] builds it exactly then, where the CPU has an integer path), and if so the
    /// image it reads: what the previous layer's epilogue must write to fuse its requantization.
    pub fn plan_input(
        op: &Op,
        input: ValueShape,
        output: ValueShape,
        layer: &IntLayer,
    ) -> Option<shrink_core::kernels::int8::QuadImage> {
        let Op::Conv2d { kernel, stride, padding, dilation, groups, out_channels, .. } = *op else {
            return None;
        };
        let ((cin, h, w), (_, oh, ow)) = (dims(input), dims(output));
        if layer.dynamic
            || groups != 1
            || stride[0] != stride[1]
            || !shrink_core::kernels::int8::DirectConv::supports_stride(stride[0])
            || dilation != [1, 1]
            || layer.weight_scales.len() != out_channels
            || !shrink_core::kernels::int8::DirectConv::supports(oh, ow)
        {
            return None;
        }
        let (hp, wp) = shrink_core::kernels::int8::DirectConv::image_size(
            kernel,
            stride[0],
            h + 2 * padding[0],
            w + 2 * padding[1],
            oh,
            ow,
        );
        Some(shrink_core::kernels::int8::QuadImage {
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
    pub fn requantize_for(mut self, next: shrink_core::kernels::int8::QuadImage) -> Self {
        let (cout, oh, ow) = self.output;
        assert_eq!(next.quads, cout.div_ceil(4), "the next layer reads this layer's channels");
        assert!(
            next.len() + shrink_core::kernels::int8::DirectConv::SLACK <= 4 * cout * oh * ow,
            "the image must fit the buffer"
        );
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
        let (gh, gw) = shrink_core::kernels::int8::DirectConv::grid(oh, ow);
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
    /// missing channels of the last group) of zero points, vectorised on the kernel's path.
    fn quantize_quads(&self, x: &[f32], out: &mut [u8]) {
        let (c, h, w) = self.input;
        let (hp, wp) = self.padded();
        let image = shrink_core::kernels::int8::QuadImage {
            quads: c.div_ceil(4),
            height: hp,
            width: wp,
            padding: self.padding,
            inverse_scale: 1.0 / self.input_params.scale,
            zero_point: self.input_params.zero_point as u8,
        };
        image.quantize_from(x, [c, h, w], out, self.conv.isa());
    }
}

impl Kernel for ConvDirectInt8 {
    fn applies_activation(&self) -> bool {
        true
    }

    fn label(&self) -> String {
        let bits = if self.bits == 8 { String::new() } else { format!(" (int{} weights)", self.bits) };
        let out = if self.requantize.is_some() { "+requantize-u8" } else { "" };
        let input = if self.quantized_input { " (u8 input)" } else { "" };
        let sparse = if self.conv.is_sparse() { "sparse-" } else { "" };
        format!("conv2d/int8-direct-{sparse}{}{}{out}{bits}{input}", self.conv.isa().name(), self.epilogue.label())
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], ctx: &RunContext<'_>) {
        let (cin, h, w) = self.input;
        let (hp, wp) = self.padded();
        let (cout, oh, ow) = self.output;
        let (in_len, out_len) = (cin * h * w, cout * oh * ow);
        BUFFERS.with(|b| {
            let Buffers { image: own, sums, acc: plane, .. } = &mut *b.borrow_mut();
            own.resize(self.conv.quads() * hp * wp * 4 + shrink_core::kernels::int8::DirectConv::SLACK, 0);
            for i in 0..batch {
                let x = &inputs[0][i * in_len..(i + 1) * in_len];
                let image: &[u8] = if self.quantized_input {
                    bytemuck::cast_slice(x)
                } else {
                    self.quantize_quads(x, own);
                    own
                };
                if self.epilogue.asymmetric() {
                    self.window_sums(image, plane, sums);
                }
                let residual = inputs.get(1).map_or(&[][..], |r| &r[i * out_len..(i + 1) * out_len]);
                let epilogue = self.epilogue.kernel(sums, residual);
                let out = &mut output[i * out_len..(i + 1) * out_len];
                let out = match self.requantize {
                    Some(next) => {
                        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
                        // The next image's border (and the slack) hold its zero point; the
                        // kernel writes the rest.
                        next.fill_border([oh, ow], bytes);
                        bytes[next.len()..next.len() + shrink_core::kernels::int8::DirectConv::SLACK]
                            .fill(next.zero_point);
                        shrink_core::kernels::int8::Output::Quads { bytes, image: next }
                    }
                    None => shrink_core::kernels::int8::Output::F32(out),
                };
                // A single image on a multi-threaded plan splits its channels between the threads.
                self.conv.run_on(image, hp, wp, oh, ow, out, &epilogue, ctx.team);
            }
        });
    }
}
