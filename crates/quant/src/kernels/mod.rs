//! Integer kernels for the CPU plan: u8 × i8 → i32, weights quantized and packed once when the
//! plan is frozen, never dequantized while it runs. On x86 and aarch64 the arithmetic is our own
//! ([`shrink_core::kernels::int8`]: on AVX-512 VNNI and AVX2 a direct convolution, and a GEMM
//! that needs no packing of the activations — also on NEON —, all exact, AVX2 without
//! `vpmaddubsw`'s saturation; a plain GEMM loop on the portable path; depthwise convolutions on
//! [`shrink_core::kernels::depthwise`]'s channels-last loop); elsewhere, and under
//! `SHRINK_ISA=portable` on aarch64, the GEMM is rten-gemm's.
//!
//! Activations travel between steps of the plan in f32. Each integer layer quantizes its input
//! to u8 in one pass (the rounding its calibrated parameters define), multiplies in integers,
//! and its epilogue turns the i32 accumulators back into f32 with the input and per-channel
//! weight scales and the bias, rounds the result to the layer's output grid if it has one,
//! adds a fused residual and applies the fused ReLU. The exception: a direct convolution feeding
//! another one alone writes its output already requantized in the layout that one reads
//! ([`ConvDirectInt8::requantize_for`]), the same bytes the other would have computed.

mod conv_direct;
mod conv_im2col;
mod depthwise;
mod linear;
#[cfg(test)]
mod tests;

pub use conv_direct::ConvDirectInt8;
pub use conv_im2col::ConvInt8;
pub use depthwise::{DepthwiseInt8, is_depthwise};
pub use linear::LinearInt8;

use std::cell::RefCell;
use std::collections::BTreeMap;

use rten_gemm::{GemmExecutor, GemmInputA, GemmInputB, GemmOptions, QuantParams as RtenQuant};
use rten_tensor::NdTensorView;
use shrink_core::graph::{Op, ValueShape};
use shrink_core::runtime::{Kernel, KernelRegistry, LayerLink, LayerView};

use crate::QuantParams;

thread_local! {
    // rten's executor is not `Send`: one per thread, all with the same kernel for this CPU, so
    // weights packed by one are valid for every other.
    pub(crate) static INT8: GemmExecutor<u8, i8, i32> = GemmExecutor::default();
    /// Quantized inputs, zero points and i32 accumulators, reused across calls: a forward pass
    /// allocates only when a layer needs more than any before it on this thread.
    pub(crate) static BUFFERS: RefCell<Buffers> = const {
        RefCell::new(Buffers {
            image: Vec::new(),
            planes: Vec::new(),
            patches: Vec::new(),
            row_zero: Vec::new(),
            acc: Vec::new(),
            channel_major: Vec::new(),
            sums: Vec::new(),
        })
    };
}

/// The name of the integer GEMM kernel the plans use on this CPU (and `SHRINK_ISA`):
/// `shrink-avx512-vnni`, `shrink-avx2`, `shrink-portable`, or the one rten picked off x86
/// (e.g. `arm-u8i8i32-dotprod`).
pub fn int8_gemm_kernel_name() -> String {
    match Int8Gemm::best() {
        Int8Gemm::Shrink(isa) => format!("shrink-{}", isa.name()),
        Int8Gemm::Rten => INT8.with(|e| e.kernel_name().to_string()),
    }
}

/// Whether rten-gemm's integer kernel on this CPU may saturate (its AVX2 and AVX-512-without-VNNI
/// kernels add pairs of u8 × i8 products in i16 with saturation): the plans never use it there
/// ([`Int8Gemm::best`] picks shrink's exact AVX2 kernel), and tests do not hold it to exact results.
pub fn rten_int8_saturates() -> bool {
    INT8.with(|e| e.may_saturate())
}

/// Which GEMM an integer layer runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Gemm {
    /// [`shrink_core::kernels::int8`] on one of its paths (`Avx512Vnni`, `Avx2`, `Portable`, or
    /// a NEON one): the default on x86 and on aarch64.
    Shrink(shrink_core::kernels::isa::Isa),
    /// rten-gemm: on other CPUs, and on aarch64 under `SHRINK_ISA=portable` (its NEON kernels
    /// are exact; its x86 ones without VNNI saturate and are never used).
    Rten,
}

impl Int8Gemm {
    /// The one the plans use under the selected path (`SHRINK_ISA`): shrink's on x86 and on
    /// aarch64's NEON paths (checked bit-exact under qemu; their speed is not measured on an ARM
    /// machine yet), rten's elsewhere.
    pub fn best() -> Self {
        use shrink_core::kernels::isa::Isa;
        let path = shrink_core::kernels::int8::path();
        if cfg!(target_arch = "x86_64") || matches!(path, Isa::Neon | Isa::NeonDot | Isa::NeonI8mm) {
            Self::Shrink(path)
        } else {
            Self::Rten
        }
    }
}

/// Weights `[k, n]` (i8, symmetric: zero point 0) packed once for one of the GEMMs.
pub(crate) enum PackedInt8 {
    Shrink(shrink_core::kernels::int8::PackedWeights),
    /// With the depth, the weights' zero points (all 0, passed on every call) and
    /// [`Self::zero_sums`] (all 0).
    Rten(rten_gemm::PackedBMatrix<i8>, usize, Vec<i8>, Vec<i32>),
}

impl PackedInt8 {
    pub(crate) fn new(wt: &[i8], k: usize, n: usize, gemm: Int8Gemm) -> Self {
        match gemm {
            Int8Gemm::Shrink(isa) => Self::Shrink(shrink_core::kernels::int8::PackedWeights::with_isa(wt, k, n, isa)),
            Int8Gemm::Rten => {
                Self::Rten(INT8.with(|e| e.prepack_b(NdTensorView::from_data([k, n], wt))), k, vec![0; n], vec![0; n])
            }
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Shrink(w) => w.isa().name(),
            Self::Rten(..) => "rten",
        }
    }

    /// Bytes between rows of the activations.
    pub(crate) fn lda(&self, k: usize) -> usize {
        match self {
            Self::Shrink(w) => w.padded_depth(),
            Self::Rten(..) => k,
        }
    }

    /// Values between rows of the accumulators.
    pub(crate) fn ldc(&self, n: usize) -> usize {
        match self {
            Self::Shrink(w) => w.padded_columns(),
            Self::Rten(..) => n,
        }
    }

    /// Per column `j`, what times the activations' zero point to subtract from the
    /// accumulators: rten subtracts zero points itself (0), shrink's kernels leave
    /// `zero · Σ_k w[k, j]`.
    pub(crate) fn zero_sums(&self) -> &[i32] {
        match self {
            Self::Shrink(w) => w.column_sums(),
            Self::Rten(_, _, _, zeros) => zeros,
        }
    }

    /// `acc [rows, ldc] = a [rows, lda] × w`, exact (zero points handled as
    /// [`Self::zero_sums`] says).
    pub(crate) fn gemm(&self, a: &[u8], rows: usize, zero: u8, row_zero: &mut Vec<u8>, acc: &mut [i32]) {
        match self {
            Self::Shrink(w) => shrink_core::kernels::int8::gemm(a, w.padded_depth(), rows, w, acc),
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

pub(crate) struct Buffers {
    /// A quantized image (conv, channels-last and padded) or batch (linear).
    pub(crate) image: Vec<u8>,
    /// A quantized image in planes, before it becomes channels-last.
    pub(crate) planes: Vec<u8>,
    /// A conv's patch rows.
    pub(crate) patches: Vec<u8>,
    /// One zero point per row of the left-hand side.
    pub(crate) row_zero: Vec<u8>,
    pub(crate) acc: Vec<i32>,
    /// One image's accumulators in planes (`[channels][pixels]`), for the epilogue.
    pub(crate) channel_major: Vec<i32>,
    /// Per GEMM row (or output pixel): `Σ_k (a_k − a_zero)`, for asymmetric weights.
    pub(crate) sums: Vec<i32>,
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
    /// The u8 grid the layer's output is rounded to after its epilogue (see
    /// [`crate::QuantizedModel::outputs`]); `None`: the output stays as the epilogue writes it.
    pub output: Option<QuantParams>,
}

impl IntLayer {
    /// The stored integer of weight `w` (already on the grid, or any f32) of output channel `o`.
    pub fn int_weight(&self, w: f32, o: usize) -> i8 {
        crate::scheme::int_weight(w, self.weight_scales[o], self.weight_zero_points.get(o).copied(), self.weight_bits)
    }

    /// The weight zero points when any is not 0: the kernels then subtract
    /// `zero_point[o] · Σ_k (a_k − a_zero)` per output.
    pub(crate) fn nonzero_weight_zero_points(&self) -> Option<Vec<i32>> {
        self.weight_zero_points.iter().any(|&z| z != 0).then(|| self.weight_zero_points.clone())
    }
}

/// `Σ_k (a_k − zero)` of each row of `rows` (`k` bytes used of every `ld`): what an
/// asymmetric weight's zero point multiplies.
pub(crate) fn row_sums(a: &[u8], ld: usize, k: usize, count: usize, zero: u8, out: &mut Vec<i32>) {
    out.clear();
    out.extend(
        a.chunks(ld).take(count).map(|r| r[..k].iter().map(|&v| v as i32).sum::<i32>() - k as i32 * zero as i32),
    );
}

pub(crate) fn dims(shape: ValueShape) -> (usize, usize, usize) {
    match shape {
        ValueShape::Map { channels, height, width } => (channels, height, width),
        ValueShape::Flat { features } => (features, 1, 1),
    }
}

pub use shrink_core::kernels::int8::dequantize;

/// What an integer layer's epilogue applies per output channel (see [`dequantize`]), owned by
/// its kernel.
#[derive(Clone, Debug)]
pub(crate) struct ChannelEpilogue {
    /// Input zero point × Σ weights of the channel, where the GEMM leaves it in the
    /// accumulators.
    pub correction: Vec<i32>,
    /// Asymmetric weights: their zero points; empty for symmetric weights.
    pub weight_zero: Vec<i32>,
    /// Input scale × weight scale.
    pub scale: Vec<f32>,
    pub bias: Vec<f32>,
    pub relu: bool,
    /// The u8 grid the output is rounded to ([`IntLayer::output`]).
    pub grid: Option<shrink_core::kernels::int8::Grid>,
    /// Whether a residual add is fused: the kernel's second input is added after the rounding.
    pub residual: bool,
    /// A clip or hard-swish fused after the layer ([`LayerView::activation`]), applied last.
    pub activation: Option<shrink_core::kernels::activation::Activation>,
}

impl ChannelEpilogue {
    /// The epilogue of `layer` with calibrated input parameters; `zero_sums` is what the GEMM
    /// leaves to subtract per channel (see [`PackedInt8::zero_sums`]).
    pub fn new(view: &LayerView<'_>, layer: &IntLayer, zero_sums: &[i32]) -> Self {
        let channels = layer.weight_scales.len();
        Self {
            correction: zero_sums.iter().map(|s| s.wrapping_mul(layer.input.zero_point)).collect(),
            weight_zero: layer.nonzero_weight_zero_points().unwrap_or_default(),
            scale: layer.weight_scales.iter().map(|s| s * layer.input.scale).collect(),
            bias: view.bias.map(|b| b.to_vec()).unwrap_or_else(|| vec![0.0; channels]),
            relu: view.relu,
            grid: layer.output.map(|p| shrink_core::kernels::int8::Grid::new(p.scale, p.zero_point as u8)),
            residual: view.residual,
            activation: view.activation,
        }
    }

    /// Whether the weights have zero points (the kernels then need window sums).
    pub fn asymmetric(&self) -> bool {
        !self.weight_zero.is_empty()
    }

    /// The epilogue as the kernels read it, for one image: `window_sums` per pixel of the
    /// direct convolution's grid (asymmetric weights; else ignored) and, with a fused residual
    /// add, `residual`, the image added ([`shrink_core::kernels::int8::Epilogue::apply`] is its
    /// scalar definition).
    pub fn kernel<'a>(
        &'a self,
        window_sums: &'a [i32],
        residual: &'a [f32],
    ) -> shrink_core::kernels::int8::Epilogue<'a> {
        shrink_core::kernels::int8::Epilogue {
            correction: &self.correction,
            scale: &self.scale,
            bias: &self.bias,
            relu: self.relu,
            weight_zero: &self.weight_zero,
            window_sums: if self.asymmetric() { window_sums } else { &[] },
            grid: self.grid,
            residual: if self.residual { residual } else { &[] },
            activation: self.activation,
        }
    }

    /// The suffix of a kernel's label: what the epilogue fuses (`+rounded-output`, `+add`,
    /// `+relu`, `+clip` or `+hard_sigmoid+mul`), in the order it applies them.
    pub fn label(&self) -> String {
        let mut s = String::new();
        if self.grid.is_some() {
            s.push_str("+rounded-output");
        }
        if self.residual {
            s.push_str("+add");
        }
        if self.relu {
            s.push_str("+relu");
        }
        if let Some(a) = self.activation {
            s.push('+');
            s.push_str(a.label());
        }
        s
    }
}

/// A kernel registry that gives each layer of `layers` (by node name) its integer kernel: the
/// direct convolution (AVX-512 VNNI or AVX2) where it applies, else im2col on the best GEMM;
/// linear layers on the GEMM. Each epilogue rounds its output to the layer's grid
/// ([`IntLayer::output`]). With `fuse`, the plan also fuses into the integer convolutions'
/// epilogues what it fuses into its own: the residual add (and the ReLU after it) a
/// convolution's value meets ([`LayerView::residual`]); and two direct convolutions it pairs
/// (the first's value read by the second alone: [`LayerView::read_by`]) hand the value over as
/// u8, written by the first's epilogue in the second's input layout
/// ([`requantized_handover`]). Without, each add is a step of its own and every value
/// travels in f32: the same bits, more passes.
pub fn int8_registry(layers: BTreeMap<String, IntLayer>, fuse: bool) -> KernelRegistry {
    let mut registry = if fuse { KernelRegistry::fusing_epilogues() } else { KernelRegistry::default() };
    registry.register("int8", move |view: &LayerView<'_>| {
        let layer = layers.get(view.name)?;
        int8_kernel(view, layer, &layers, fuse)
    });
    registry
}

fn int8_kernel(
    view: &LayerView<'_>,
    layer: &IntLayer,
    layers: &BTreeMap<String, IntLayer>,
    fuse: bool,
) -> Option<Box<dyn Kernel>> {
    {
        match view.op {
            op if is_depthwise(op) => DepthwiseInt8::new(view, layer).map(|k| Box::new(k) as Box<dyn Kernel>),
            Op::Conv2d { .. } => match ConvDirectInt8::new(view, layer) {
                Some(mut k) => {
                    if fuse {
                        let this = |value| LayerLink {
                            name: view.name,
                            op: view.op,
                            input: view.input,
                            output: view.output,
                            value,
                            activation: view.activation,
                        };
                        if let Some(next) = view.read_by
                            && let Some(image) = requantized_handover(&this(next.value), &next, layers)
                        {
                            k = k.requantize_for(image);
                        }
                        if let Some(previous) = view.reads_from
                            && requantized_handover(&previous, &this(previous.value), layers).is_some()
                        {
                            k = k.with_quantized_input();
                        }
                    }
                    Some(Box::new(k) as Box<dyn Kernel>)
                }
                None => ConvInt8::new(view, layer).map(|k| Box::new(k) as Box<dyn Kernel>),
            },
            Op::Linear { .. } => LinearInt8::new(view, layer).map(|k| Box::new(k) as Box<dyn Kernel>),
            _ => None,
        }
    }
}

/// The fusion rule, in one place: the image `to` reads when `from` (the layer whose value only
/// `to` reads, as the plan paired them) writes it requantized in its epilogue — both quantized,
/// both on the direct kernel, and the image (with the kernel's slack) fitting the f32 buffer the
/// plan gives the value. Both builders call it, so producer and consumer always agree.
pub fn requantized_handover(
    from: &LayerLink<'_>,
    to: &LayerLink<'_>,
    layers: &BTreeMap<String, IntLayer>,
) -> Option<shrink_core::kernels::int8::QuadImage> {
    if !shrink_core::kernels::int8::DirectConv::runs_on(shrink_core::kernels::int8::path()) {
        return None;
    }
    let producer = layers.get(from.name)?;
    if producer.output.is_some() {
        // Its output is rounded to its own grid after the epilogue: no handover.
        return None;
    }
    ConvDirectInt8::plan_input(from.op, from.input, from.output, producer)?;
    let image = ConvDirectInt8::plan_input(to.op, to.input, to.output, layers.get(to.name)?)?;
    (image.len() + shrink_core::kernels::int8::DirectConv::SLACK <= 4 * from.value.numel()).then_some(image)
}
