//! Depthwise convolutions (one filter per channel: MobileNet's 3×3 layers) on planar f32 images
//! (`[channels][height][width]`).
//!
//! [`depthwise`] computes the same sums as the scalar definition [`depthwise_reference`], in the
//! same order and with the same operations (a product, then an add, tap by tap in row-major
//! order, taps outside the image skipped), so the results are bit-identical; it only moves the
//! border tests out of the inner loop: for each tap it works out the range of output columns
//! that read inside the image and runs over that range as one loop, which the compiler
//! vectorises (stride 1: contiguous reads; stride 2: every other value).
//!
//! [`depthwise_u8`] is the integer form, on a channels-last u8 image: sixteen channels per
//! vector lane group, every tap of an output pixel accumulated in registers (wrapping i32, so
//! every path computes the same integers as [`depthwise_u8_reference`]). Channels-last suits
//! the small feature maps of mobile networks, whose rows are too short to vectorise along.

/// The shape of a depthwise convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepthwiseShape {
    /// Channels of the input and of the output.
    pub channels: usize,
    /// Input rows and columns.
    pub input: [usize; 2],
    /// Output rows and columns.
    pub output: [usize; 2],
    /// Kernel rows and columns.
    pub kernel: [usize; 2],
    /// Steps between output positions, in input rows and columns.
    pub stride: [usize; 2],
    /// Zeros before (and after) the image, in rows and columns.
    pub padding: [usize; 2],
    /// Steps between taps, in input rows and columns.
    pub dilation: [usize; 2],
}

impl DepthwiseShape {
    /// The same convolution on the zero-padded channels-last image the channels-last loops read
    /// ([`depthwise_u8`], [`DepthwiseLayout::ChannelsLast`]): the channels rounded up to
    /// [`CHANNEL_BLOCK`], the padding inside the image.
    pub fn channels_last(&self) -> ChannelsLastShape {
        let Self { channels, input: [h, w], output, kernel, stride, padding: [ph, pw], dilation } = *self;
        let padded = [h + 2 * ph, w + 2 * pw];
        ChannelsLastShape { channels: depthwise_u8_channels(channels), padded, output, kernel, stride, dilation }
    }

    /// Where the pixels of an input plane land in the padded channels-last image.
    fn channels_last_pixels(&self) -> crate::transpose::PixelMap {
        let ([_, w], [ph, pw]) = (self.input, self.padding);
        let (c, wp) = (depthwise_u8_channels(self.channels), w + 2 * pw);
        crate::transpose::PixelMap::padded(w, [ph, pw], wp, c)
    }

    fn check(&self, image: &[f32], weights: &[f32], out: &[f32]) {
        let ([h, w], [oh, ow], [kh, kw]) = (self.input, self.output, self.kernel);
        assert!(image.len() >= self.channels * h * w, "the image is shorter than [channels][h][w]");
        assert!(weights.len() >= self.channels * kh * kw, "the weights are shorter than [channels][kh][kw]");
        assert!(out.len() >= self.channels * oh * ow, "the output is shorter than [channels][oh][ow]");
        assert!(self.stride[0] > 0 && self.stride[1] > 0, "stride 0");
    }
}

/// The scalar definition: `out[c][y][x] = Σ_{ky, kx} image[c][y·s + ky·d − p][x·s + kx·d − p] ·
/// weights[c][ky][kx]`, taps outside the image skipped. The tests' reference and the bench's
/// baseline.
///
/// # Panics
/// When a slice is shorter than its shape, or a stride is 0.
pub fn depthwise_reference(shape: &DepthwiseShape, image: &[f32], weights: &[f32], out: &mut [f32]) {
    shape.check(image, weights, out);
    let DepthwiseShape { channels, input: [h, w], output: [oh, ow], kernel: [kh, kw], stride, padding, dilation } =
        *shape;
    for ch in 0..channels {
        let plane = &image[ch * h * w..][..h * w];
        let k = &weights[ch * kh * kw..][..kh * kw];
        let o = &mut out[ch * oh * ow..][..oh * ow];
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = 0.0f32;
                for ky in 0..kh {
                    let iy = (oy * stride[0] + ky * dilation[0]) as isize - padding[0] as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..kw {
                        let ix = (ox * stride[1] + kx * dilation[1]) as isize - padding[1] as isize;
                        if ix >= 0 && ix < w as isize {
                            acc += plane[iy as usize * w + ix as usize] * k[ky * kw + kx];
                        }
                    }
                }
                o[oy * ow + ox] = acc;
            }
        }
    }
}

/// The output columns `lo..hi` whose tap at input offset `offset − padding` (`offset = kx · d`)
/// reads inside a row of `w` values, for stride `s` and `ow` outputs.
fn inside(offset: usize, padding: usize, s: usize, w: usize, ow: usize) -> (usize, usize) {
    // ix = ox·s + offset − padding ∈ [0, w)  ⇔  ox·s ≥ padding − offset and ox·s < w + padding − offset.
    let lo = padding.saturating_sub(offset).div_ceil(s);
    let end = (w + padding).saturating_sub(offset);
    let hi = end.div_ceil(s).min(ow);
    (lo.min(hi), hi)
}

/// How [`depthwise_with`] lays the image out while it computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DepthwiseLayout {
    /// Row by row of each channel plane, the border tests out of the inner loop: suits rows
    /// long enough to fill vectors.
    Planar,
    /// Through a zero-padded channels-last copy of the image (sixteen channels per vector, every
    /// tap of a pixel summed in registers) and a transpose back: suits the short rows of the
    /// small feature maps of mobile networks.
    ChannelsLast,
}

impl DepthwiseLayout {
    /// Output rows narrower than this run channels-last (measured with `cargo xtask bench
    /// runtime`'s depthwise cases: see the README).
    pub const CHANNELS_LAST_BELOW: usize = 32;

    /// The layout [`depthwise`] uses for `shape`.
    pub fn for_shape(shape: &DepthwiseShape) -> Self {
        if shape.output[1] < Self::CHANNELS_LAST_BELOW { Self::ChannelsLast } else { Self::Planar }
    }
}

/// [`depthwise_reference`], bit-identical for finite weights, in the layout that suits the shape
/// ([`DepthwiseLayout::for_shape`]) on the selected f32 path: [`DepthwiseF32`] built for one
/// call (a plan builds it once and keeps it).
///
/// # Panics
/// As [`depthwise_reference`].
pub fn depthwise(shape: &DepthwiseShape, image: &[f32], weights: &[f32], out: &mut [f32]) {
    DepthwiseF32::new(shape, weights, DepthwiseLayout::for_shape(shape)).run(image, out)
}

/// [`depthwise`] in the given layout.
///
/// # Panics
/// As [`depthwise_reference`].
pub fn depthwise_with(
    shape: &DepthwiseShape,
    image: &[f32],
    weights: &[f32],
    out: &mut [f32],
    layout: DepthwiseLayout,
) {
    DepthwiseF32::new(shape, weights, layout).run(image, out)
}

thread_local! {
    static CHANNELS_LAST: std::cell::RefCell<ChannelsLastScratch> = std::cell::RefCell::default();
}

/// The buffers of the channels-last layout, reused between calls on a thread.
#[derive(Default)]
struct ChannelsLastScratch {
    image: Vec<f32>,
    acc: Vec<f32>,
}

/// An f32 depthwise layer, its weights laid out once for its layout. Both layouts compute
/// each output as the scalar definition does (a product, then an add, tap by tap in row-major
/// order); the planar one skips the taps outside the image, the channels-last one adds their
/// `0 · w`, which leaves every sum as it is (an exact zero added to a sum that is not −0, which
/// it never is) as long as the weights are finite.
#[derive(Clone, Debug)]
pub struct DepthwiseF32 {
    shape: DepthwiseShape,
    layout: DepthwiseLayout,
    /// Planar: `[channels][kh][kw]`; channels-last: `[tap][channels rounded up to
    /// CHANNEL_BLOCK]`, zero past the layer's channels.
    weights: Vec<f32>,
}

impl DepthwiseF32 {
    /// The layer of `shape` with `weights` (`[channels][kh][kw]`) in `layout`.
    ///
    /// # Panics
    /// When `weights` is shorter than its shape, or a stride is 0.
    pub fn new(shape: &DepthwiseShape, weights: &[f32], layout: DepthwiseLayout) -> Self {
        let ([kh, kw], channels) = (shape.kernel, shape.channels);
        let taps = kh * kw;
        assert!(weights.len() >= channels * taps, "the weights are shorter than [channels][kh][kw]");
        assert!(shape.stride[0] > 0 && shape.stride[1] > 0, "stride 0");
        let weights = match layout {
            DepthwiseLayout::Planar => weights[..channels * taps].to_vec(),
            DepthwiseLayout::ChannelsLast => {
                let c = depthwise_u8_channels(channels);
                let mut packed = vec![0.0; taps * c];
                for ch in 0..channels {
                    for t in 0..taps {
                        packed[t * c + ch] = weights[ch * taps + t];
                    }
                }
                packed
            }
        };
        Self { shape: *shape, layout, weights }
    }

    /// The layout it computes in.
    pub fn layout(&self) -> DepthwiseLayout {
        self.layout
    }

    /// One image, `[channels][h][w]` into `[channels][oh][ow]`, on the selected f32 path.
    ///
    /// # Panics
    /// When a slice is shorter than its shape.
    #[allow(unsafe_code)] // calls the target-feature functions of the paths, after checking the CPU
    pub fn run(&self, image: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        use crate::isa::Isa;
        let ([h, w], [oh, ow], c) = (self.shape.input, self.shape.output, self.shape.channels);
        assert!(image.len() >= c * h * w, "the image is shorter than [channels][h][w]");
        assert!(out.len() >= c * oh * ow, "the output is shorter than [channels][oh][ow]");
        CHANNELS_LAST.with(|scratch| {
            let scratch = &mut *scratch.borrow_mut();
            match crate::isa::selected().f32_path() {
                // SAFETY: the selected path is available on this CPU (`isa::selected`).
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { self.run_avx512(image, out, scratch) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx2 => unsafe { self.run_avx2(image, out, scratch) },
                _ => self.run_body(image, out, scratch),
            }
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn run_avx512(&self, image: &[f32], out: &mut [f32], scratch: &mut ChannelsLastScratch) {
        self.run_body(image, out, scratch)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn run_avx2(&self, image: &[f32], out: &mut [f32], scratch: &mut ChannelsLastScratch) {
        self.run_body(image, out, scratch)
    }

    #[inline(always)]
    fn run_body(&self, image: &[f32], out: &mut [f32], scratch: &mut ChannelsLastScratch) {
        match self.layout {
            DepthwiseLayout::Planar => depthwise_body(&self.shape, image, &self.weights, out),
            DepthwiseLayout::ChannelsLast => self.channels_last(image, out, scratch),
        }
    }

    /// [`DepthwiseLayout::ChannelsLast`]: the image copied into a zero-padded channels-last
    /// buffer, per output pixel and block of sixteen channels the taps summed in registers, and
    /// the sums transposed back to planes.
    #[inline(always)]
    fn channels_last(&self, image: &[f32], out: &mut [f32], scratch: &mut ChannelsLastScratch) {
        let geometry = self.shape.channels_last();
        let ChannelsLastShape { channels: c, padded: [hp, wp], output: [oh, ow], .. } = geometry;
        let ([h, w], channels, n) = (self.shape.input, self.shape.channels, oh * ow);
        let ChannelsLastScratch { image: padded, acc } = scratch;
        padded.clear();
        padded.resize(hp * wp * c, 0.0);
        acc.resize(n * c, 0.0);
        let map = self.shape.channels_last_pixels();
        crate::transpose::planes_to_pixels(&image[..channels * h * w], channels, h * w, padded, map, c);
        channels_last_sums(&geometry, padded, &self.weights, acc, |sum: f32, x: f32, w: f32| sum + x * w);
        crate::transpose::pixels_to_planes_32(acc, n, c, channels, out);
    }
}

/// [`depthwise`]'s loop, compiled once per path (products and sums stay separate operations: Rust
/// does not contract them into fused multiply-adds, so every path rounds alike).
#[inline(always)]
fn depthwise_body(shape: &DepthwiseShape, image: &[f32], weights: &[f32], out: &mut [f32]) {
    let DepthwiseShape { channels, input: [h, w], output: [oh, ow], kernel: [kh, kw], stride, padding, dilation } =
        *shape;
    let columns: Vec<(usize, usize)> =
        (0..kw).map(|kx| inside(kx * dilation[1], padding[1], stride[1], w, ow)).collect();
    for ch in 0..channels {
        let plane = &image[ch * h * w..][..h * w];
        let k = &weights[ch * kh * kw..][..kh * kw];
        let o = &mut out[ch * oh * ow..][..oh * ow];
        for (oy, row) in o.chunks_exact_mut(ow).enumerate() {
            row.fill(0.0);
            for ky in 0..kh {
                let iy = (oy * stride[0] + ky * dilation[0]) as isize - padding[0] as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                let src = &plane[iy as usize * w..][..w];
                for (kx, &(lo, hi)) in columns.iter().enumerate() {
                    if lo == hi {
                        continue;
                    }
                    let wk = k[ky * kw + kx];
                    // The first column read: lo·s + kx·d − p ≥ 0 by the choice of `lo`.
                    let first = lo * stride[1] + kx * dilation[1] - padding[1];
                    let dst = &mut row[lo..hi];
                    if stride[1] == 1 {
                        for (a, &v) in dst.iter_mut().zip(&src[first..first + (hi - lo)]) {
                            *a += v * wk;
                        }
                    } else {
                        for (a, &v) in dst.iter_mut().zip(src[first..].iter().step_by(stride[1])) {
                            *a += v * wk;
                        }
                    }
                }
            }
        }
    }
}

/// Channels per block of the integer depthwise kernel: its image, weights and accumulators hold
/// the channels rounded up to a multiple of this ([`depthwise_u8_channels`]).
pub const CHANNEL_BLOCK: usize = 16;

/// `channels` rounded up to a multiple of [`CHANNEL_BLOCK`].
pub fn depthwise_u8_channels(channels: usize) -> usize {
    channels.div_ceil(CHANNEL_BLOCK) * CHANNEL_BLOCK
}

/// The shape of a depthwise convolution over a padded channels-last image: the integer kernel's
/// input (u8), and the f32 channels-last layout's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelsLastShape {
    /// Channels of the image, weights and accumulators: a multiple of [`CHANNEL_BLOCK`] (the
    /// channels past the layer's own have zero weights).
    pub channels: usize,
    /// Rows and columns of the image, padding included (the border holds the input's zero
    /// point, so that it stands for 0).
    pub padded: [usize; 2],
    /// Output rows and columns.
    pub output: [usize; 2],
    /// Kernel rows and columns.
    pub kernel: [usize; 2],
    /// Steps between output positions, in padded rows and columns.
    pub stride: [usize; 2],
    /// Steps between taps, in padded rows and columns.
    pub dilation: [usize; 2],
}

impl ChannelsLastShape {
    fn check(&self, image: &[u8], weights: &[i32], acc: &[i32]) {
        let Self { channels: c, padded: [hp, wp], output: [oh, ow], kernel: [kh, kw], stride, dilation } = *self;
        assert!(c % CHANNEL_BLOCK == 0, "channels {c} not a multiple of {CHANNEL_BLOCK}");
        assert!(image.len() >= hp * wp * c, "the image is shorter than [rows][columns][channels]");
        assert!(weights.len() >= kh * kw * c, "the weights are shorter than [taps][channels]");
        assert!(acc.len() >= oh * ow * c, "the accumulators are shorter than [rows][columns][channels]");
        assert!(stride[0] > 0 && stride[1] > 0 && kh > 0 && kw > 0, "stride or kernel 0");
        if oh > 0 && ow > 0 {
            assert!(
                (oh - 1) * stride[0] + (kh - 1) * dilation[0] < hp
                    && (ow - 1) * stride[1] + (kw - 1) * dilation[1] < wp,
                "the last window reads past the padded image"
            );
        }
    }
}

/// The scalar definition: `acc[y][x][c] = Σ_{ky, kx} image[y·s + ky·d][x·s + kx·d][c] ·
/// weights[ky·kw + kx][c]`, wrapping i32 arithmetic.
///
/// # Panics
/// When a slice is shorter than its shape, the channels are not a multiple of
/// [`CHANNEL_BLOCK`], or a window reads past the image.
pub fn depthwise_u8_reference(shape: &ChannelsLastShape, image: &[u8], weights: &[i32], acc: &mut [i32]) {
    shape.check(image, weights, acc);
    let ChannelsLastShape { channels: c, padded: [_, wp], output: [oh, ow], kernel: [kh, kw], stride, dilation } =
        *shape;
    for oy in 0..oh {
        for ox in 0..ow {
            for ch in 0..c {
                let mut sum = 0i32;
                for ky in 0..kh {
                    for kx in 0..kw {
                        let (y, x) = (oy * stride[0] + ky * dilation[0], ox * stride[1] + kx * dilation[1]);
                        let v = image[(y * wp + x) * c + ch] as i32;
                        sum = sum.wrapping_add(v.wrapping_mul(weights[(ky * kw + kx) * c + ch]));
                    }
                }
                acc[(oy * ow + ox) * c + ch] = sum;
            }
        }
    }
}

/// [`depthwise_u8_reference`] on the vector unit of kernel path `isa` (AVX-512 or AVX2 on x86;
/// elsewhere, and on the portable path, the same loop compiled for the baseline: NEON on
/// aarch64). The integers are the same on every path.
///
/// # Panics
/// As [`depthwise_u8_reference`]; when `isa` is not available on this CPU.
#[allow(unsafe_code)] // calls the target-feature functions of the paths, after checking the CPU
pub fn depthwise_u8(shape: &ChannelsLastShape, image: &[u8], weights: &[i32], acc: &mut [i32], isa: crate::isa::Isa) {
    #[cfg(target_arch = "x86_64")]
    use crate::isa::Isa;
    shape.check(image, weights, acc);
    assert!(isa.available(), "this CPU lacks {isa:?}");
    match isa {
        // SAFETY: the path's features are available (asserted above).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { depthwise_u8_avx512(shape, image, weights, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { depthwise_u8_avx2(shape, image, weights, acc) },
        _ => depthwise_u8_body(shape, image, weights, acc),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn depthwise_u8_avx512(shape: &ChannelsLastShape, image: &[u8], weights: &[i32], acc: &mut [i32]) {
    depthwise_u8_body(shape, image, weights, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn depthwise_u8_avx2(shape: &ChannelsLastShape, image: &[u8], weights: &[i32], acc: &mut [i32]) {
    depthwise_u8_body(shape, image, weights, acc)
}

/// The loop every path compiles: per output pixel and block of [`CHANNEL_BLOCK`] channels, the
/// taps summed in sixteen lanes held in registers.
#[inline(always)]
fn depthwise_u8_body(shape: &ChannelsLastShape, image: &[u8], weights: &[i32], acc: &mut [i32]) {
    channels_last_sums(shape, image, weights, acc, |sum: i32, x: u8, w: i32| {
        sum.wrapping_add((x as i32).wrapping_mul(w))
    });
}

/// The channels-last loop both depthwise kernels run: per output pixel and block of
/// [`CHANNEL_BLOCK`] channels, `sum = mac(sum, x, w)` over the taps in row-major order, in
/// sixteen lanes held in registers, from 0 (`A::default()`). `shape` gives the geometry on the
/// padded image (its `channels` a multiple of the block). A 3×3 kernel runs unrolled, the block's
/// nine weight vectors held in registers across its pixels.
#[inline(always)]
fn channels_last_sums<X: Copy, W: Copy + Default, A: Copy + Default>(
    shape: &ChannelsLastShape,
    image: &[X],
    weights: &[W],
    acc: &mut [A],
    mac: impl Fn(A, X, W) -> A + Copy,
) {
    if shape.kernel == [3, 3] {
        sums_of::<X, W, A, 3, 3>(shape, image, weights, acc, mac)
    } else {
        let ChannelsLastShape { channels: c, padded: [_, wp], output: [oh, ow], kernel: [kh, kw], stride, dilation } =
            *shape;
        for oy in 0..oh {
            for ox in 0..ow {
                let out = &mut acc[(oy * ow + ox) * c..][..c];
                for (b, out) in out.chunks_exact_mut(CHANNEL_BLOCK).enumerate() {
                    let mut sum = [A::default(); CHANNEL_BLOCK];
                    for ky in 0..kh {
                        let row = (oy * stride[0] + ky * dilation[0]) * wp;
                        for kx in 0..kw {
                            let at = (row + ox * stride[1] + kx * dilation[1]) * c + b * CHANNEL_BLOCK;
                            let x: &[X; CHANNEL_BLOCK] = image[at..at + CHANNEL_BLOCK].try_into().expect("16 values");
                            let tap = (ky * kw + kx) * c + b * CHANNEL_BLOCK;
                            let w: &[W; CHANNEL_BLOCK] =
                                weights[tap..tap + CHANNEL_BLOCK].try_into().expect("16 values");
                            for i in 0..CHANNEL_BLOCK {
                                sum[i] = mac(sum[i], x[i], w[i]);
                            }
                        }
                    }
                    out.copy_from_slice(&sum);
                }
            }
        }
    }
}

/// [`channels_last_sums`] for a `KH × KW` kernel known when compiling: block by block, its
/// weights loaded once, every tap of a pixel unrolled.
#[inline(always)]
fn sums_of<X: Copy, W: Copy + Default, A: Copy + Default, const KH: usize, const KW: usize>(
    shape: &ChannelsLastShape,
    image: &[X],
    weights: &[W],
    acc: &mut [A],
    mac: impl Fn(A, X, W) -> A + Copy,
) {
    let ChannelsLastShape { channels: c, padded: [_, wp], output: [oh, ow], stride, dilation, .. } = *shape;
    for b in 0..c / CHANNEL_BLOCK {
        let mut w = [[[W::default(); CHANNEL_BLOCK]; KW]; KH];
        for (ky, row) in w.iter_mut().enumerate() {
            for (kx, tap) in row.iter_mut().enumerate() {
                let at = (ky * KW + kx) * c + b * CHANNEL_BLOCK;
                tap.copy_from_slice(&weights[at..at + CHANNEL_BLOCK]);
            }
        }
        for oy in 0..oh {
            for ox in 0..ow {
                let mut sum = [A::default(); CHANNEL_BLOCK];
                for (ky, row) in w.iter().enumerate() {
                    let line = (oy * stride[0] + ky * dilation[0]) * wp + ox * stride[1];
                    for (kx, tap) in row.iter().enumerate() {
                        let at = (line + kx * dilation[1]) * c + b * CHANNEL_BLOCK;
                        let x: &[X; CHANNEL_BLOCK] = image[at..at + CHANNEL_BLOCK].try_into().expect("16 values");
                        for i in 0..CHANNEL_BLOCK {
                            sum[i] = mac(sum[i], x[i], tap[i]);
                        }
                    }
                }
                let at = (oy * ow + ox) * c + b * CHANNEL_BLOCK;
                acc[at..at + CHANNEL_BLOCK].copy_from_slice(&sum);
            }
        }
    }
}

/// An integer depthwise layer on channel-major f32 images: what an integer plan runs per image.
#[derive(Clone, Debug)]
pub struct DepthwiseU8Layer {
    /// The convolution, on the layer's own channels (the sums run on its
    /// [`DepthwiseShape::channels_last`] form).
    pub shape: DepthwiseShape,
    /// `1 / scale` of the input's u8 grid.
    pub inverse_scale: f32,
    /// The input's zero point.
    pub zero_point: u8,
    /// `[tap][channels rounded up to CHANNEL_BLOCK]` (zero past the layer's channels).
    pub weights: Vec<i32>,
}

/// Buffers [`DepthwiseU8Layer::run`] reuses between calls.
#[derive(Debug, Default)]
pub struct DepthwiseScratch {
    planes: Vec<u8>,
    image: Vec<u8>,
    acc: Vec<i32>,
    channel_major: Vec<i32>,
}

impl DepthwiseU8Layer {
    /// One image: `x` (`[channels][h][w]`) quantized to u8 ([`crate::int8::quantize`]), the
    /// depthwise sums of [`depthwise_u8`], and `epilogue` ([`crate::int8::Epilogue::planes`],
    /// its residual image the one a fused add reads) writing `out` (`[channels][oh][ow]`). Each
    /// element-wise pass runs along contiguous memory; the two layout changes (planes to
    /// channels-last bytes, pixel-major accumulators to channel-major) are plain copies.
    ///
    /// # Panics
    /// When a slice is shorter than its shape, or `isa` is not available on this CPU.
    #[allow(unsafe_code)] // calls the target-feature functions of the paths, after checking the CPU
    pub fn run(
        &self,
        x: &[f32],
        epilogue: &crate::int8::Epilogue<'_>,
        out: &mut [f32],
        scratch: &mut DepthwiseScratch,
        isa: crate::isa::Isa,
    ) {
        #[cfg(target_arch = "x86_64")]
        use crate::isa::Isa;
        assert!(isa.available(), "this CPU lacks {isa:?}");
        let DepthwiseShape { channels, input: [h, w], output: [oh, ow], .. } = self.shape;
        assert!(x.len() >= channels * h * w && out.len() >= channels * oh * ow, "short image");
        let ChannelsLastShape { channels: c, padded: [hp, wp], .. } = self.shape.channels_last();
        scratch.planes.resize(channels * h * w, 0);
        scratch.image.resize(hp * wp * c, 0);
        scratch.acc.resize(oh * ow * c, 0);
        scratch.channel_major.resize(oh * ow * channels, 0);
        match isa {
            // SAFETY: the path's features are available (asserted above).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx512Vnni => unsafe { self.run_avx512(x, epilogue, out, scratch) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { self.run_avx2(x, epilogue, out, scratch) },
            _ => self.run_body(x, epilogue, out, scratch),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn run_avx512(&self, x: &[f32], e: &crate::int8::Epilogue<'_>, out: &mut [f32], s: &mut DepthwiseScratch) {
        self.run_body(x, e, out, s)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn run_avx2(&self, x: &[f32], e: &crate::int8::Epilogue<'_>, out: &mut [f32], s: &mut DepthwiseScratch) {
        self.run_body(x, e, out, s)
    }

    #[inline(always)]
    fn run_body(
        &self,
        x: &[f32],
        epilogue: &crate::int8::Epilogue<'_>,
        out: &mut [f32],
        scratch: &mut DepthwiseScratch,
    ) {
        let DepthwiseScratch { planes, image, acc, channel_major } = scratch;
        let DepthwiseShape { channels, input: [h, w], output: [oh, ow], padding: [ph, pw], .. } = self.shape;
        let geometry = self.shape.channels_last();
        let (c, n) = (geometry.channels, oh * ow);
        let zero = self.zero_point as f32;
        for (q, &v) in planes.iter_mut().zip(&x[..channels * h * w]) {
            *q = crate::int8::quantize(v, self.inverse_scale, zero);
        }
        if ph > 0 || pw > 0 || c != channels {
            image.fill(self.zero_point);
        }
        let map = self.shape.channels_last_pixels();
        crate::transpose::planes_to_pixels(planes, channels, h * w, image, map, c);
        depthwise_u8_body(&geometry, image, &self.weights, acc);
        crate::transpose::pixels_to_planes_32(acc, n, c, channels, channel_major);
        epilogue.planes_body(channel_major, n, channels, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit-identical to the scalar definition on every f32 path of this CPU, in both layouts, over strides,
    /// paddings, dilations, kernel sizes and images narrower than the kernel, with values whose
    /// rounding depends on the order.
    #[test]
    fn depthwise_equals_the_scalar_definition_bit_for_bit() {
        let mut state = 0x2545_F491u32;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f32 / u32::MAX as f32 - 0.5) * 3.0
        };
        let paths: Vec<crate::isa::Isa> = crate::isa::Isa::ALL
            .into_iter()
            .filter(|&i| i.f32_path() == i && i.available_for_test("depthwise_equals_the_scalar_definition"))
            .collect();
        let mut cases = 0;
        for (channels, [h, w]) in [(3, [7, 9]), (8, [16, 16]), (5, [1, 3]), (2, [2, 1]), (4, [13, 32]), (21, [9, 10])] {
            for kernel in [[3, 3], [1, 1], [5, 5], [3, 1]] {
                for stride in [[1, 1], [2, 2], [1, 2]] {
                    for padding in [[0, 0], [1, 1], [2, 1]] {
                        for dilation in [[1, 1], [2, 2]] {
                            let span = |i: usize| (kernel[i] - 1) * dilation[i] + 1;
                            let (hp, wp) = (h + 2 * padding[0], w + 2 * padding[1]);
                            if hp < span(0) || wp < span(1) {
                                continue;
                            }
                            let output = [(hp - span(0)) / stride[0] + 1, (wp - span(1)) / stride[1] + 1];
                            let shape =
                                DepthwiseShape { channels, input: [h, w], output, kernel, stride, padding, dilation };
                            let image: Vec<f32> = (0..channels * h * w).map(|_| next()).collect();
                            let weights: Vec<f32> = (0..channels * kernel[0] * kernel[1]).map(|_| next()).collect();
                            let n = channels * output[0] * output[1];
                            let (mut want, mut got) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                            depthwise_reference(&shape, &image, &weights, &mut want);
                            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            for &isa in &paths {
                                for layout in [DepthwiseLayout::Planar, DepthwiseLayout::ChannelsLast] {
                                    got.fill(f32::NAN);
                                    crate::isa::with_selected(isa, || {
                                        depthwise_with(&shape, &image, &weights, &mut got, layout)
                                    });
                                    assert_eq!(bits(&got), bits(&want), "{isa:?} {layout:?} {shape:?}");
                                }
                            }
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert!(cases > 300, "{cases} shapes");
    }

    #[test]
    fn the_inside_range_is_exact() {
        for (offset, padding, s, w, ow) in
            [(0, 1, 1, 5, 5), (2, 1, 1, 5, 5), (0, 1, 2, 7, 4), (4, 2, 2, 3, 2), (0, 0, 1, 4, 4)]
        {
            let (lo, hi) = inside(offset, padding, s, w, ow);
            for ox in 0..ow {
                let ix = (ox * s + offset) as isize - padding as isize;
                assert_eq!((lo..hi).contains(&ox), ix >= 0 && ix < w as isize, "{offset} {padding} {s} {w} {ow}: {ox}");
            }
        }
    }

    /// Every integer path the CPU has computes the scalar definition's integers, over strides,
    /// dilations, kernel sizes and channel counts, with weights at the ends of their range.
    #[test]
    fn depthwise_u8_equals_the_scalar_definition_on_every_path() {
        use crate::isa::Isa;
        let mut state = 0x9E37_79B9u32;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let mut cases = 0;
        for isa in Isa::ALL {
            if !isa.available_for_test("depthwise_u8_equals_the_scalar_definition_on_every_path") {
                continue;
            }
            for channels in [16, 32, 48] {
                for ([hp, wp], kernel, stride, dilation) in [
                    ([9, 9], [3, 3], [1, 1], [1, 1]),
                    ([16, 10], [3, 3], [2, 2], [1, 1]),
                    ([11, 13], [5, 5], [1, 2], [1, 1]),
                    ([12, 12], [3, 3], [1, 1], [2, 2]),
                    ([3, 3], [3, 3], [1, 1], [1, 1]),
                    ([7, 5], [1, 1], [2, 1], [1, 1]),
                ] {
                    let span = |i: usize| (kernel[i] - 1) * dilation[i] + 1;
                    let output = [([hp, wp][0] - span(0)) / stride[0] + 1, (wp - span(1)) / stride[1] + 1];
                    let shape = ChannelsLastShape { channels, padded: [hp, wp], output, kernel, stride, dilation };
                    let image: Vec<u8> = (0..hp * wp * channels).map(|_| next() as u8).collect();
                    let weights: Vec<i32> = (0..kernel[0] * kernel[1] * channels)
                        .map(|i| match i % 7 {
                            0 => 255,
                            1 => -255,
                            _ => (next() % 511) as i32 - 255,
                        })
                        .collect();
                    let n = output[0] * output[1] * channels;
                    let (mut want, mut got) = (vec![i32::MIN; n], vec![i32::MAX; n]);
                    depthwise_u8_reference(&shape, &image, &weights, &mut want);
                    depthwise_u8(&shape, &image, &weights, &mut got, isa);
                    assert_eq!(got, want, "{isa:?} {shape:?}");
                    cases += 1;
                }
            }
        }
        assert!(cases >= 18, "{cases} cases");
    }

    #[test]
    #[should_panic(expected = "reads past the padded image")]
    fn depthwise_u8_refuses_a_window_past_the_image() {
        let shape = ChannelsLastShape {
            channels: 16,
            padded: [4, 4],
            output: [3, 3],
            kernel: [3, 3],
            stride: [1, 1],
            dilation: [1, 1],
        };
        depthwise_u8_reference(&shape, &[0; 256], &[0; 144], &mut [0; 144]);
    }

    /// The integer layer on every path: quantization, the sums and the epilogue give what
    /// their scalar definitions composed give, for widths on and off the transposes' blocks
    /// and channel counts on and off sixteen, with a fused residual add and without.
    #[test]
    fn the_integer_layer_composes_its_scalar_definitions() {
        use crate::int8::{Epilogue, Grid, quantize};
        use crate::isa::Isa;
        let mut state = 0x1234_5678u32;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as f32 / u32::MAX as f32 * 4.0 - 2.0
        };
        let paths: Vec<Isa> =
            Isa::ALL.into_iter().filter(|i| i.available_for_test("the_integer_layer_composes")).collect();
        for (channels, [h, w], stride) in [(5, [7, 9], 1), (16, [20, 18], 2), (21, [17, 33], 1), (40, [6, 4], 2)] {
            let c = depthwise_u8_channels(channels);
            let output = [(h - 1) / stride + 1, (w - 1) / stride + 1];
            let n = output[0] * output[1];
            let shape = ChannelsLastShape {
                channels: c,
                padded: [h + 2, w + 2],
                output,
                kernel: [3, 3],
                stride: [stride, stride],
                dilation: [1, 1],
            };
            let mut weights = vec![0i32; 9 * c];
            for t in 0..9 {
                for ch in 0..channels {
                    weights[t * c + ch] = (next() * 120.0) as i32;
                }
            }
            let layer = DepthwiseU8Layer {
                shape: DepthwiseShape {
                    channels,
                    input: [h, w],
                    output,
                    kernel: [3, 3],
                    stride: [stride, stride],
                    padding: [1, 1],
                    dilation: [1, 1],
                },
                inverse_scale: 1.0 / 0.02,
                zero_point: 97,
                weights: weights.clone(),
            };
            assert_eq!(layer.shape.channels_last(), shape);
            let x: Vec<f32> = (0..channels * h * w).map(|_| next()).collect();
            let residual: Vec<f32> = (0..channels * n).map(|_| next()).collect();
            let correction: Vec<i32> =
                (0..channels).map(|ch| 97 * (0..9).map(|t| weights[t * c + ch]).sum::<i32>()).collect();
            let scale: Vec<f32> = (0..channels).map(|ch| 0.02 * 0.001 * (ch + 1) as f32).collect();
            let bias: Vec<f32> = (0..channels).map(|_| next()).collect();
            // The scalar composition: quantize into a padded channels-last image, the reference sums.
            let mut image = vec![97u8; (h + 2) * (w + 2) * c];
            for ch in 0..channels {
                for y in 0..h {
                    for xx in 0..w {
                        image[((y + 1) * (w + 2) + xx + 1) * c + ch] = quantize(x[(ch * h + y) * w + xx], 50.0, 97.0);
                    }
                }
            }
            let mut acc = vec![0i32; n * c];
            depthwise_u8_reference(&shape, &image, &weights, &mut acc);
            for fused in [false, true] {
                let epilogue = Epilogue {
                    correction: &correction,
                    scale: &scale,
                    bias: &bias,
                    relu: fused,
                    weight_zero: &[],
                    window_sums: &[],
                    grid: (!fused).then(|| Grid::new(0.05, 11)),
                    residual: if fused { &residual } else { &[] },
                    activation: fused.then_some(crate::activation::Activation::HARD_SWISH),
                };
                let r: &[f32] = if fused { &residual } else { &[] };
                let want: Vec<u32> = (0..channels * n)
                    .map(|i| {
                        let (ch, p) = (i / n, i % n);
                        epilogue.apply(ch, acc[p * c + ch], 0, r.get(i).copied().unwrap_or(0.0)).to_bits()
                    })
                    .collect();
                for &isa in &paths {
                    let mut out = vec![f32::NAN; channels * n];
                    layer.run(&x, &epilogue, &mut out, &mut DepthwiseScratch::default(), isa);
                    let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{isa:?} {channels} channels {h}x{w} stride {stride} fused {fused}");
                }
            }
        }
    }
}
