//! Direct f32 convolution (groups = 1, no dilation, any kernel size, stride and padding) on
//! channel-major images, with bias, ReLU and a residual add in its epilogue.
//!
//! No im2col matrix is written. The image is copied once into a zero-padded buffer, split into
//! `stride × stride` phase planes for strided layers (phase `(py, px)` holds the padded pixels
//! `(s·y + py, s·x + px)`), so that every tap `(c, ky, kx)` of every output pixel reads the
//! prepared buffer at `offset(c, ky, kx) + i`, where `i = oy · wq + ox` runs over a "wide" output
//! grid of `oh` rows of `wq` (the phase plane's width ≥ `ow`) positions. The product is then a
//! GEMM whose right-hand rows are windows of one buffer, read in place:
//! `wide[o, i] = Σ_k w[o, k] · x[offset[k] + i]`, the `wq − ow` extra columns of each row
//! computed and thrown away.
//!
//! The micro-kernel keeps 4 output channels × up to 96 positions (24 AVX-512 registers; 4 × 24
//! on AVX2) in registers; per tap it loads the positions once and broadcasts 4 weights. Weights
//! are packed once, as panels of 4 channels by depth. Every path (AVX-512, AVX2 + FMA, and the
//! portable loop) adds the taps in the same order with one fused multiply-add each, and all share
//! one scalar epilogue ([`epilogue`]), so they give the same bits as [`reference()`], the plain
//! loop (tested).
//!
//! Wider layers take a second algorithm, [`Algorithm::Channels`]: output channels in the lanes, input
//! values broadcast, on a channel-blocked copy of the image (ONNX Runtime's and oneDNN's NCHWc
//! kernels work this way). It wastes no lane on padding columns and needs no phase planes; its
//! input is blocked and its channel-major output written through 16 × 16 register transposes
//! on AVX-512 (scalar loops on AVX2), or it reads and writes [`BlockedImage`]s directly where two
//! such convolutions follow each other. [`Algorithm::for_layer`] says which layers gain
//! (measured), and both algorithms give the reference's bits.
#![allow(unsafe_code)]

mod channels;

use crate::isa::{self, Isa};
use crate::team::Team;

/// Which lanes a register of the direct convolution fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Output positions (16 or 8 of one output channel): any layer, the portable path too.
    Positions,
    /// Output channels (16 or 8 of one position): AVX-512 and AVX2 only.
    Channels,
}

impl Algorithm {
    /// The algorithm [`DirectConv::new`] takes for a layer on `isa`'s f32 path: channels for 32
    /// or more output channels (two AVX-512 registers, four AVX2 ones: each broadcast input
    /// value feeds two or more multiply-adds), on AVX2 only with 64 or more taps per output too
    /// (its image blocking and channel-major stores are scalar loops, which short layers do not
    /// repay). Measured per ResNet-20 layer (AMD EPYC Zen 4, one image, channels against
    /// positions): on AVX-512 the 3×3 layers of 32 and 64 channels 1.06–1.6×, the 1×1 stride-2
    /// shortcuts 1.1–1.2×, 16 channels 1.0× and the 1-channel stem 0.7×; on AVX2 64 channels
    /// 1.4×, 32 channels 1.0×, the shortcuts 0.4–0.6×.
    pub fn for_layer(shape: &ConvShape, isa: Isa) -> Algorithm {
        let lanes = lanes(isa);
        if lanes == 0 {
            return Algorithm::Positions;
        }
        let taps = shape.input[0] * shape.kernel[0] * shape.kernel[1];
        if shape.out_channels >= 32 && (lanes == 16 || taps >= 64) { Algorithm::Channels } else { Algorithm::Positions }
    }
}

/// `weight` (`[out][depth]`) as panels of `width` output channels, each `[depth][width]`
/// (the last panel's missing channels zero): the weight layout of both algorithms.
fn pack_panels(weight: &[f32], out_channels: usize, depth: usize, width: usize) -> Vec<f32> {
    let mut packed = vec![0.0; out_channels.div_ceil(width) * depth * width];
    for o in 0..out_channels {
        let (p, lane) = (o / width, o % width);
        for k in 0..depth {
            packed[(p * depth + k) * width + lane] = weight[o * depth + k];
        }
    }
    packed
}

/// f32 lanes of a register of the channel algorithm on `isa`'s f32 path (0 where it has none:
/// the portable and NEON paths run positions only).
fn lanes(isa: Isa) -> usize {
    match isa.f32_path() {
        Isa::Avx512 => 16,
        Isa::Avx2 => 8,
        _ => 0,
    }
}

/// A zero-padded, channel-blocked image, `[channels / lanes][height][width][lanes]` (the last
/// block's missing channels never read): what [`Algorithm::Channels`] reads, and what a
/// convolution can write for the next one ([`Output::Blocked`]) so that the next one does not
/// copy its input again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockedImage {
    /// Channels of the image.
    pub channels: usize,
    /// Channels per block: 16 (AVX-512) or 8 (AVX2).
    pub lanes: usize,
    /// Rows, padding included.
    pub height: usize,
    /// Columns, padding included.
    pub width: usize,
    /// Rows and columns of zeros before the image (as many after it).
    pub padding: [usize; 2],
}

impl BlockedImage {
    /// The layout [`Algorithm::Channels`] reads the input of `shape` in, on `isa`'s f32 path
    /// (`None` where the layer runs on positions: [`Algorithm::for_layer`]). The convolution
    /// before it may write its output so ([`Output::Blocked`]).
    pub fn input_of(shape: &ConvShape, isa: Isa) -> Option<BlockedImage> {
        (Algorithm::for_layer(shape, isa) == Algorithm::Channels).then(|| Self::padded(shape, lanes(isa)))
    }

    /// `shape`'s input, zero-padded, in blocks of `lanes` channels.
    fn padded(shape: &ConvShape, lanes: usize) -> BlockedImage {
        let [c, h, w] = shape.input;
        let [py, px] = shape.padding;
        BlockedImage { channels: c, lanes, height: h + 2 * py, width: w + 2 * px, padding: [py, px] }
    }

    /// Values the image takes.
    pub fn len(&self) -> usize {
        self.channels.div_ceil(self.lanes) * self.height * self.width * self.lanes
    }

    /// Whether the image has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Zeros the border of every block of `out` (the padding rows and columns), leaving the
    /// image inside it as it is: what a writer of every interior value must add.
    ///
    /// # Panics
    /// When `out` is shorter than [`Self::len`].
    pub fn fill_border(&self, out: &mut [f32]) {
        let [py, px] = self.padding;
        let image = [self.height - 2 * py, self.width - 2 * px];
        crate::fill_border(&mut out[..self.len()], [self.height, self.width, self.lanes], image, self.padding, 0.0);
    }
}

/// The image a convolution reads.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// `[c][h][w]`.
    ChannelMajor(&'a [f32]),
    /// Already in the convolution's [`DirectConv::input_layout`] (written by the one before it).
    Blocked(&'a [f32]),
}

/// Where a convolution writes.
#[derive(Debug)]
pub enum Output<'a> {
    /// `[out][oh][ow]`.
    ChannelMajor(&'a mut [f32]),
    /// In the next convolution's input layout (its whole image, border included, is written).
    Blocked(&'a mut [f32], BlockedImage),
}

/// Output channels per panel.
const OC: usize = 4;
/// f32 lanes of one AVX-512 register.
const LANES: usize = 16;
/// Positions per full tile (6 AVX-512 registers per channel).
const TILE: usize = 6 * LANES;

/// `(acc + bias) + residual`, then ReLU: the one epilogue of every path.
#[inline(always)]
pub fn epilogue(acc: f32, bias: f32, residual: Option<f32>, relu: bool) -> f32 {
    let mut v = acc + bias;
    if let Some(r) = residual {
        v += r;
    }
    if relu { v.max(0.0) } else { v }
}

/// [`epilogue`] over a row, with the choices made once (so the loops vectorise).
fn epilogue_row(acc: &[f32], bias: f32, residual: Option<&[f32]>, relu: bool, out: &mut [f32]) {
    match (residual, relu) {
        (None, false) => out.iter_mut().zip(acc).for_each(|(o, &a)| *o = epilogue(a, bias, None, false)),
        (None, true) => out.iter_mut().zip(acc).for_each(|(o, &a)| *o = epilogue(a, bias, None, true)),
        (Some(r), false) => {
            out.iter_mut().zip(acc).zip(r).for_each(|((o, &a), &r)| *o = epilogue(a, bias, Some(r), false))
        }
        (Some(r), true) => {
            out.iter_mut().zip(acc).zip(r).for_each(|((o, &a), &r)| *o = epilogue(a, bias, Some(r), true))
        }
    }
}

/// The geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Input channels, height, width.
    pub input: [usize; 3],
    /// Output channels.
    pub out_channels: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride (both directions).
    pub stride: usize,
    /// Padding (top = bottom, left = right).
    pub padding: [usize; 2],
}

impl ConvShape {
    /// Output height and width.
    pub fn output(&self) -> [usize; 2] {
        let [_, h, w] = self.input;
        let s = self.stride;
        [(h + 2 * self.padding[0] - self.kernel[0]) / s + 1, (w + 2 * self.padding[1] - self.kernel[1]) / s + 1]
    }
}

/// What the epilogue adds to each output: a bias per channel, a residual (an image of the
/// output's shape) and a ReLU.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    /// Bias per output channel.
    pub bias: Option<&'a [f32]>,
    /// Added after the bias, one value per output.
    pub residual: Option<&'a [f32]>,
    /// ReLU last.
    pub relu: bool,
}

/// A convolution's weights packed for [`DirectConv::run`], with the offsets of its taps.
#[derive(Clone, Debug)]
pub struct DirectConv {
    shape: ConvShape,
    /// Taps: `c · kh · kw`.
    depth: usize,
    /// Panels of [`OC`] channels, each `depth × OC` (channels beyond the last are zero).
    packed: Vec<f32>,
    /// Each tap's offset in the prepared image.
    offsets: Vec<usize>,
    /// Phase plane height and width.
    plane: [usize; 2],
    /// The prepared image's length, slack for the last tile's reads included.
    image_len: usize,
    isa: Isa,
    /// The channel-vectorised algorithm, when it was chosen (it then does all the work).
    channels: Option<channels::ChannelConv>,
}

impl DirectConv {
    /// Packs `weight` (`[out, in, kh, kw]`, row-major) for `shape`, on the best path this CPU
    /// has ([`isa::selected`]).
    ///
    /// # Panics
    /// If `weight` does not hold `out · in · kh · kw` values, the stride is 0 or the kernel does
    /// not fit the padded input.
    pub fn new(weight: &[f32], shape: ConvShape) -> Self {
        Self::with_isa(weight, shape, isa::selected())
    }

    /// As [`DirectConv::new`], on the f32 path of `isa` ([`Isa::f32_path`]; the CPU must have
    /// `isa`: see [`Isa::available`]).
    ///
    /// # Panics
    /// As [`DirectConv::new`], and if the CPU lacks `isa`.
    pub fn with_isa(weight: &[f32], shape: ConvShape, isa: Isa) -> Self {
        Self::with_algorithm(weight, shape, isa, Algorithm::for_layer(&shape, isa))
    }

    /// As [`DirectConv::with_isa`], with `algorithm` (which falls back to
    /// [`Algorithm::Positions`] on the portable path).
    ///
    /// # Panics
    /// As [`DirectConv::with_isa`].
    pub fn with_algorithm(weight: &[f32], shape: ConvShape, isa: Isa, algorithm: Algorithm) -> Self {
        assert!(isa.available(), "this CPU lacks {isa:?}");
        let isa = isa.f32_path();
        let [c, h, w] = shape.input;
        let [kh, kw] = shape.kernel;
        let s = shape.stride;
        assert!(s >= 1, "stride 0");
        assert!(
            h + 2 * shape.padding[0] >= kh && w + 2 * shape.padding[1] >= kw,
            "kernel larger than the padded input"
        );
        let depth = c * kh * kw;
        assert_eq!(weight.len(), shape.out_channels * depth, "weights must be [out, in, kh, kw]");
        if algorithm == Algorithm::Channels && lanes(isa) > 0 {
            let channels = channels::ChannelConv::new(weight, shape, isa);
            let image_len = channels.scratch_len();
            // The positions algorithm's weights, offsets and planes are not needed.
            let (packed, offsets, plane) = (Vec::new(), Vec::new(), [0, 0]);
            return Self { shape, depth, packed, offsets, plane, image_len, isa, channels: Some(channels) };
        }
        let packed = pack_panels(weight, shape.out_channels, depth, OC);
        let (hp, wp) = (h + 2 * shape.padding[0], w + 2 * shape.padding[1]);
        let plane = [hp.div_ceil(s), wp.div_ceil(s)];
        let plane_len = c * plane[0] * plane[1];
        let mut offsets = Vec::with_capacity(depth);
        for ci in 0..c {
            for ky in 0..kh {
                for kx in 0..kw {
                    let phase = (ky % s) * s + kx % s;
                    offsets.push(phase * plane_len + ci * plane[0] * plane[1] + (ky / s) * plane[1] + kx / s);
                }
            }
        }
        let [oh, _] = shape.output();
        let wide = oh * plane[1];
        let reads = offsets.iter().max().copied().unwrap_or(0) + wide.next_multiple_of(LANES);
        let image_len = (s * s * plane_len).max(reads);
        Self { shape, depth, packed, offsets, plane, image_len, isa, channels: None }
    }

    /// The algorithm it runs.
    pub fn algorithm(&self) -> Algorithm {
        if self.channels.is_some() { Algorithm::Channels } else { Algorithm::Positions }
    }

    /// The geometry.
    pub fn shape(&self) -> ConvShape {
        self.shape
    }

    /// The path it runs on: `Portable`, `Avx2`, `Avx512` or `Neon`.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Scratch values [`DirectConv::run`] needs.
    pub fn scratch_len(&self) -> usize {
        self.image_len
    }

    /// Convolves one image (`[c, h, w]`) into `out` (`[out, oh, ow]`), with `epilogue`.
    ///
    /// # Panics
    /// If a slice is shorter than its shape, or `scratch` than [`DirectConv::scratch_len`].
    pub fn run(&self, image: &[f32], out: &mut [f32], epilogue: Epilogue<'_>, scratch: &mut [f32]) {
        self.run_on(image, out, epilogue, scratch, &Team::sequential());
    }

    /// As [`DirectConv::run`], with the output channels split between the threads of `team`
    /// (in jobs of a few panels or blocks, taken by whichever thread is free), so one image uses
    /// several cores. The result is the same bits whatever the team.
    ///
    /// # Panics
    /// As [`DirectConv::run`].
    pub fn run_on(&self, image: &[f32], out: &mut [f32], epilogue: Epilogue<'_>, scratch: &mut [f32], team: &Team) {
        self.run_with(Input::ChannelMajor(image), Output::ChannelMajor(out), epilogue, scratch, team);
    }

    /// The layout the channel algorithm reads its image in (`None` on positions): what the
    /// convolution before it may write ([`Output::Blocked`]) and pass as [`Input::Blocked`].
    pub fn input_layout(&self) -> Option<BlockedImage> {
        self.channels.as_ref().map(|c| c.input_layout())
    }

    /// As [`DirectConv::run_on`], reading and writing the given layouts. The values are
    /// the same bits in either layout.
    ///
    /// # Panics
    /// As [`DirectConv::run`]; and for a blocked input or output on the positions algorithm, a
    /// blocked input shorter than [`Self::input_layout`]'s, or a blocked output of another
    /// channel count or block width than this convolution's, or too small for its output.
    pub fn run_with(
        &self,
        input: Input<'_>,
        output: Output<'_>,
        epilogue: Epilogue<'_>,
        scratch: &mut [f32],
        team: &Team,
    ) {
        let threads = team.threads();
        let ConvShape { input: [c, h, w], out_channels, .. } = self.shape;
        let [oh, ow] = self.shape.output();
        assert!(epilogue.bias.is_none_or(|b| b.len() >= out_channels), "bias too short");
        assert!(epilogue.residual.is_none_or(|r| r.len() >= out_channels * oh * ow), "residual too short");
        let Some(conv) = &self.channels else {
            let (Input::ChannelMajor(image), Output::ChannelMajor(out)) = (input, output) else {
                panic!("blocked images are the channel algorithm's")
            };
            assert!(image.len() >= c * h * w, "image too short");
            assert!(out.len() >= out_channels * oh * ow, "output too short");
            let x = &mut scratch[..self.image_len];
            self.prepare(image, x);
            return self.positions(x, out, epilogue, team);
        };
        let x: &[f32] = match input {
            Input::ChannelMajor(image) => {
                assert!(image.len() >= c * h * w, "image too short");
                let x = &mut scratch[..self.image_len];
                conv.prepare(image, x);
                x
            }
            Input::Blocked(x) => {
                assert!(x.len() >= self.image_len, "blocked image too short");
                &x[..self.image_len]
            }
        };
        let per_job = conv.channels_per_job(threads);
        let parallel = threads > 1 && out_channels > per_job;
        match output {
            Output::ChannelMajor(out) => {
                assert!(out.len() >= out_channels * oh * ow, "output too short");
                let out = &mut out[..out_channels * oh * ow];
                if !parallel {
                    return conv.run(x, 0..out_channels, channels::Dest::ChannelMajor(out), epilogue);
                }
                team.for_each_chunk(out, per_job * oh * ow, &|j, chunk| {
                    let first = j * per_job;
                    let range = first..(first + per_job).min(out_channels);
                    conv.run(x, range, channels::Dest::ChannelMajor(chunk), epilogue);
                });
            }
            Output::Blocked(out, image) => {
                let [py, px] = image.padding;
                assert!(
                    image.channels == out_channels
                        && image.lanes == conv.lanes()
                        && image.height >= oh + 2 * py
                        && image.width >= ow + 2 * px
                        && out.len() >= image.len(),
                    "a blocked output must be this convolution's channels, in its blocks, and fit"
                );
                let out = &mut out[..image.len()];
                // The tiles write every value of the image (zeros in the lanes past the last
                // channel); the border is zero.
                image.fill_border(out);
                if !parallel {
                    return conv.run(x, 0..out_channels, channels::Dest::Blocked(out, image), epilogue);
                }
                let block_len = image.height * image.width * image.lanes;
                team.for_each_chunk(out, per_job / image.lanes * block_len, &|j, chunk| {
                    let first = j * per_job;
                    let range = first..(first + per_job).min(out_channels);
                    conv.run(x, range, channels::Dest::Blocked(chunk, image), epilogue);
                });
            }
        }
    }

    /// The positions algorithm on the prepared image `x`.
    fn positions(&self, x: &[f32], out: &mut [f32], epilogue: Epilogue<'_>, team: &Team) {
        let out_channels = self.shape.out_channels;
        let [oh, ow] = self.shape.output();
        let panels = out_channels.div_ceil(OC);
        let out = &mut out[..out_channels * oh * ow];
        let threads = team.threads();
        if threads <= 1 || panels < 2 {
            self.panels(x, 0..panels, out, epilogue);
            return;
        }
        let per_job = panels.div_ceil(2 * threads).max(1);
        team.for_each_chunk(out, per_job * OC * oh * ow, &|j, chunk| {
            let first = j * per_job;
            self.panels(x, first..(first + per_job).min(panels), chunk, epilogue);
        });
    }

    /// Panels `range` of the prepared image `x` into `out`, which starts at the range's first
    /// output channel.
    fn panels(&self, x: &[f32], range: std::ops::Range<usize>, out: &mut [f32], epilogue: Epilogue<'_>) {
        let out_channels = self.shape.out_channels;
        let [oh, ow] = self.shape.output();
        let base = range.start * OC * oh * ow;
        let wide = oh * self.plane[1];
        let mut acc = [[0.0f32; TILE]; OC];
        for p in range {
            let weights = &self.packed[p * self.depth * OC..(p + 1) * self.depth * OC];
            let mut i0 = 0;
            while i0 < wide {
                let n = TILE.min(wide - i0);
                self.tile(weights, x, i0, n, &mut acc);
                for (lane, row) in acc.iter().enumerate() {
                    let o = p * OC + lane;
                    if o >= out_channels {
                        break;
                    }
                    let bias = epilogue.bias.map_or(0.0, |b| b[o]);
                    // The tile's positions, row by row of the wide grid; the columns past `ow`
                    // are dropped.
                    let (mut j, wq) = (0, self.plane[1]);
                    while j < n {
                        let (oy, ox) = ((i0 + j) / wq, (i0 + j) % wq);
                        let len = (wq - ox).min(n - j);
                        if ox < ow {
                            let valid = len.min(ow - ox);
                            let at = o * oh * ow + oy * ow + ox;
                            let residual = epilogue.residual.map(|r| &r[at..at + valid]);
                            let dst = &mut out[at - base..at - base + valid];
                            epilogue_row(&row[j..j + valid], bias, residual, epilogue.relu, dst);
                        }
                        j += len;
                    }
                }
                i0 += n;
            }
        }
    }

    /// Writes the zero-padded image, the phase planes the taps read for a stride > 1, and
    /// zeros in the slack.
    fn prepare(&self, image: &[f32], x: &mut [f32]) {
        let ConvShape { input: [c, h, w], kernel: [kh, kw], stride: s, padding: [pad_y, pad_x], .. } = self.shape;
        let [hq, wq] = self.plane;
        x.fill(0.0);
        let plane_len = c * hq * wq;
        for ci in 0..c {
            for y in 0..h {
                let row = &image[(ci * h + y) * w..][..w];
                let yp = y + pad_y;
                // Phase rows no tap reads (a 1×1 kernel of stride 2 reads one phase of four).
                if yp % s >= kh {
                    continue;
                }
                let base = ci * hq * wq + (yp / s) * wq;
                if s == 1 {
                    x[base + pad_x..][..w].copy_from_slice(row);
                    continue;
                }
                for phase_x in 0..s.min(kw) {
                    // The input columns whose padded column `xi + pad_x` is `phase_x` mod `s`,
                    // at padded column / s in the phase plane.
                    let first = (phase_x + s - pad_x % s) % s;
                    let dst = &mut x[((yp % s) * s + phase_x) * plane_len + base..][..wq];
                    let start = (first + pad_x) / s;
                    for (d, &v) in dst[start..].iter_mut().zip(row.iter().skip(first).step_by(s)) {
                        *d = v;
                    }
                }
            }
        }
    }

    /// `acc[lane][j] = Σ_k w[k][lane] · x[offset[k] + i0 + j]` for `j < n` (entries past `n`
    /// are left undefined).
    fn tile(&self, weights: &[f32], x: &[f32], i0: usize, n: usize, acc: &mut [[f32; TILE]; OC]) {
        // The reads stay inside `x`: `new` sized it for `max offset + wide` rounded up to whole
        // registers, and `i0 + n ≤ wide`.
        let vectors = n.div_ceil(LANES);
        debug_assert!(self.offsets.iter().all(|&o| o + i0 + vectors * LANES <= x.len()));
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                // SAFETY: `with_isa` checked that the CPU has AVX-512F (and FMA); the reads stay
                // inside `x` as `new` sized it (checked above in debug builds) and the writes
                // inside `acc`.
                unsafe { x86::tile_avx512(weights, x, &self.offsets, i0, vectors, acc) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                // SAFETY: `with_isa` checked that the CPU has AVX2 and FMA; reads and writes as
                // for AVX-512, in 8-lane halves.
                unsafe { x86::tile_avx2(weights, x, &self.offsets, i0, vectors * 2, acc) }
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => {
                // SAFETY: reads as for AVX-512 (whole registers of 16 positions, in quarters);
                // NEON is part of aarch64.
                unsafe { neon::tile(weights, x, &self.offsets, i0, vectors * 4, acc) }
            }
            _ => portable_tile(weights, x, &self.offsets, i0, vectors * LANES, acc),
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{OC, TILE};

    /// `quads` (1 to 24) registers of 4 positions per channel, in passes of at most 6 (24
    /// accumulators and 6 inputs of NEON's 32 registers).
    ///
    /// # Safety
    /// `off + i0 + 4 · quads ≤ x.len()` for every offset.
    pub(super) unsafe fn tile(
        weights: &[f32],
        x: &[f32],
        offsets: &[usize],
        i0: usize,
        quads: usize,
        acc: &mut [[f32; TILE]; OC],
    ) {
        let mut j = 0;
        while j < quads {
            // SAFETY: every arm forwards the caller's contract, for positions `4·j ..` of the tile.
            unsafe {
                match quads - j {
                    1 => pass::<1>(weights, x, offsets, i0, j * 4, acc),
                    2 => pass::<2>(weights, x, offsets, i0, j * 4, acc),
                    3 => pass::<3>(weights, x, offsets, i0, j * 4, acc),
                    4 => pass::<4>(weights, x, offsets, i0, j * 4, acc),
                    5 => pass::<5>(weights, x, offsets, i0, j * 4, acc),
                    _ => pass::<6>(weights, x, offsets, i0, j * 4, acc),
                }
            }
            j += 6;
        }
    }

    /// The taps in order, one fused multiply-add (`fmla`) each, as `mul_add` computes it.
    ///
    /// # Safety
    /// As `tile`, for the `V` registers from position `at`.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn pass<const V: usize>(
        weights: &[f32],
        x: &[f32],
        offsets: &[usize],
        i0: usize,
        at: usize,
        acc: &mut [[f32; TILE]; OC],
    ) {
        let mut sum = [[vdupq_n_f32(0.0); V]; OC];
        let base = x.as_ptr().wrapping_add(i0 + at);
        for (k, &off) in offsets.iter().enumerate() {
            let src = base.wrapping_add(off);
            // SAFETY: `off + i0 + at + 4·V ≤ x.len()` (the caller's contract).
            let v: [float32x4_t; V] = std::array::from_fn(|j| unsafe { vld1q_f32(src.add(j * 4)) });
            for (lane, s) in sum.iter_mut().enumerate() {
                let w = vdupq_n_f32(weights[k * OC + lane]);
                for j in 0..V {
                    s[j] = vfmaq_f32(s[j], w, v[j]);
                }
            }
        }
        for (lane, s) in sum.iter().enumerate() {
            for (j, &sj) in s.iter().enumerate() {
                // SAFETY: `at + 4·V ≤ TILE` values of the row.
                unsafe { vst1q_f32(acc[lane].as_mut_ptr().add(at + j * 4), sj) };
            }
        }
    }
}

/// The portable path: the same taps in the same order, one `mul_add` each.
fn portable_tile(weights: &[f32], x: &[f32], offsets: &[usize], i0: usize, n: usize, acc: &mut [[f32; TILE]; OC]) {
    for row in acc.iter_mut() {
        row[..n].fill(0.0);
    }
    for (k, &off) in offsets.iter().enumerate() {
        let src = &x[off + i0..][..n];
        for (lane, row) in acc.iter_mut().enumerate() {
            let wk = weights[k * OC + lane];
            for (a, &v) in row[..n].iter_mut().zip(src) {
                *a = wk.mul_add(v, *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{OC, TILE};

    /// `vectors` (1 to 6) registers of 16 positions per channel.
    ///
    /// # Safety
    /// The CPU has AVX-512F and FMA, and `off + i0 + 16 · vectors ≤ x.len()` for every offset.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn tile_avx512(
        weights: &[f32],
        x: &[f32],
        offsets: &[usize],
        i0: usize,
        vectors: usize,
        acc: &mut [[f32; TILE]; OC],
    ) {
        // SAFETY: every arm forwards the caller's contract.
        unsafe {
            match vectors {
                1 => avx512::<1>(weights, x, offsets, i0, acc),
                2 => avx512::<2>(weights, x, offsets, i0, acc),
                3 => avx512::<3>(weights, x, offsets, i0, acc),
                4 => avx512::<4>(weights, x, offsets, i0, acc),
                5 => avx512::<5>(weights, x, offsets, i0, acc),
                _ => avx512::<6>(weights, x, offsets, i0, acc),
            }
        }
    }

    /// # Safety
    /// As `tile_avx512`, with `V` registers.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn avx512<const V: usize>(
        weights: &[f32],
        x: &[f32],
        offsets: &[usize],
        i0: usize,
        acc: &mut [[f32; TILE]; OC],
    ) {
        let mut sum = [[_mm512_setzero_ps(); V]; OC];
        let base = x.as_ptr().wrapping_add(i0);
        for (k, &off) in offsets.iter().enumerate() {
            let src = base.wrapping_add(off);
            let mut v = [_mm512_setzero_ps(); V];
            for (j, vj) in v.iter_mut().enumerate() {
                // SAFETY: `off + i0 + 16·V ≤ x.len()` (the caller's contract).
                *vj = unsafe { _mm512_loadu_ps(src.add(j * 16)) };
            }
            for (lane, s) in sum.iter_mut().enumerate() {
                let w = _mm512_set1_ps(weights[k * OC + lane]);
                for j in 0..V {
                    s[j] = _mm512_fmadd_ps(w, v[j], s[j]);
                }
            }
        }
        for (lane, s) in sum.iter().enumerate() {
            for (j, &sj) in s.iter().enumerate() {
                // SAFETY: `16·V ≤ TILE` values of the row.
                unsafe { _mm512_storeu_ps(acc[lane].as_mut_ptr().add(j * 16), sj) };
            }
        }
    }

    /// `vectors` (1 to 12) registers of 8 positions per channel, in passes of at most 3.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA, and `off + i0 + 8 · vectors ≤ x.len()` for every offset.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(
        weights: &[f32],
        x: &[f32],
        offsets: &[usize],
        i0: usize,
        vectors: usize,
        acc: &mut [[f32; TILE]; OC],
    ) {
        let mut j = 0;
        while j < vectors {
            // SAFETY: every arm forwards the caller's contract, for positions `8·j ..` of the tile.
            unsafe {
                match vectors - j {
                    1 => avx2::<1>(weights, x, offsets, i0, j * 8, acc),
                    2 => avx2::<2>(weights, x, offsets, i0, j * 8, acc),
                    _ => avx2::<3>(weights, x, offsets, i0, j * 8, acc),
                }
            }
            j += 3;
        }
    }

    /// # Safety
    /// As `tile_avx2`, for the `V` registers from position `at`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const V: usize>(
        weights: &[f32],
        x: &[f32],
        offsets: &[usize],
        i0: usize,
        at: usize,
        acc: &mut [[f32; TILE]; OC],
    ) {
        let mut sum = [[_mm256_setzero_ps(); V]; OC];
        let base = x.as_ptr().wrapping_add(i0 + at);
        for (k, &off) in offsets.iter().enumerate() {
            let src = base.wrapping_add(off);
            let mut v = [_mm256_setzero_ps(); V];
            for (j, vj) in v.iter_mut().enumerate() {
                // SAFETY: `off + i0 + at + 8·V ≤ x.len()` (the caller's contract).
                *vj = unsafe { _mm256_loadu_ps(src.add(j * 8)) };
            }
            for (lane, s) in sum.iter_mut().enumerate() {
                let w = _mm256_set1_ps(weights[k * OC + lane]);
                for j in 0..V {
                    s[j] = _mm256_fmadd_ps(w, v[j], s[j]);
                }
            }
        }
        for (lane, s) in sum.iter().enumerate() {
            for (j, &sj) in s.iter().enumerate() {
                // SAFETY: `at + 8·V ≤ TILE` values of the row.
                unsafe { _mm256_storeu_ps(acc[lane].as_mut_ptr().add(at + j * 8), sj) };
            }
        }
    }
}

/// The plain loop every path is held to: for each output, the taps `(c, ky, kx)` in order, one
/// `mul_add` each (padding reads 0), then [`epilogue`].
pub fn reference(image: &[f32], weight: &[f32], shape: ConvShape, epi: Epilogue<'_>) -> Vec<f32> {
    let ConvShape { input: [c, h, w], out_channels, kernel: [kh, kw], stride: s, padding: [py, px] } = shape;
    let [oh, ow] = shape.output();
    let mut out = vec![0.0; out_channels * oh * ow];
    for o in 0..out_channels {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = 0.0f32;
                for ci in 0..c {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let (y, x) = ((oy * s + ky) as isize - py as isize, (ox * s + kx) as isize - px as isize);
                            let v = if (0..h as isize).contains(&y) && (0..w as isize).contains(&x) {
                                image[(ci * h + y as usize) * w + x as usize]
                            } else {
                                0.0
                            };
                            acc = weight[((o * c + ci) * kh + ky) * kw + kx].mul_add(v, acc);
                        }
                    }
                }
                let at = (o * oh + oy) * ow + ox;
                out[at] = epilogue(acc, epi.bias.map_or(0.0, |b| b[o]), epi.residual.map(|r| r[at]), epi.relu);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 8388608.0 - 1.0).collect()
    }

    /// `fill_border` zeros every value outside the image, in every block and lane, and leaves
    /// every value inside it.
    #[test]
    fn fill_border_zeros_exactly_the_padding() {
        for (channels, lanes, [h, w], [py, px]) in
            [(3, 8, [5, 4], [1, 1]), (17, 16, [3, 7], [2, 0]), (8, 8, [1, 1], [0, 2]), (16, 16, [0, 3], [1, 1])]
        {
            let image = BlockedImage { channels, lanes, height: h + 2 * py, width: w + 2 * px, padding: [py, px] };
            let mut out = vec![f32::NAN; image.len()];
            image.fill_border(&mut out);
            for (i, v) in out.iter().enumerate() {
                let (x, y) = (i / lanes % image.width, i / lanes / image.width % image.height);
                let inside = (py..py + h).contains(&y) && (px..px + w).contains(&x);
                assert!(if inside { v.is_nan() } else { v.to_bits() == 0 }, "{image:?}: value {i} = {v}");
            }
        }
    }

    /// Every path this CPU has gives the reference's bits, over geometries that exercise
    /// partial panels, partial tiles, strides 1 to 3, 1×1 to 5×5 kernels and every epilogue.
    #[test]
    fn every_path_gives_the_reference_bits() {
        let shapes = [
            ConvShape { input: [3, 28, 28], out_channels: 16, kernel: [3, 3], stride: 1, padding: [1, 1] },
            ConvShape { input: [16, 14, 14], out_channels: 32, kernel: [3, 3], stride: 2, padding: [1, 1] },
            ConvShape { input: [16, 14, 14], out_channels: 32, kernel: [1, 1], stride: 2, padding: [0, 0] },
            ConvShape { input: [5, 7, 9], out_channels: 6, kernel: [1, 1], stride: 1, padding: [0, 0] },
            ConvShape { input: [2, 11, 6], out_channels: 3, kernel: [5, 3], stride: 3, padding: [2, 0] },
            ConvShape { input: [7, 1, 1], out_channels: 9, kernel: [3, 3], stride: 1, padding: [1, 1] },
            ConvShape { input: [4, 9, 10], out_channels: 5, kernel: [3, 1], stride: 2, padding: [1, 0] },
            ConvShape { input: [64, 7, 7], out_channels: 64, kernel: [3, 3], stride: 1, padding: [1, 1] },
            // Rows wider than one tile, three blocks of output channels (a tile of 2, then of 1),
            // a partial block of input channels.
            ConvShape { input: [20, 5, 37], out_channels: 48, kernel: [3, 3], stride: 1, padding: [1, 1] },
            ConvShape { input: [9, 12, 31], out_channels: 40, kernel: [3, 3], stride: 2, padding: [1, 1] },
        ];
        let paths = Isa::ALL.into_iter().filter(|&i| i.f32_path() == i);
        for isa in paths.filter(|i| i.available_for_test("every_path_gives_the_reference_bits")) {
            for (n, &shape) in shapes.iter().enumerate() {
                let [c, h, w] = shape.input;
                let [oh, ow] = shape.output();
                let image = values(c * h * w, n as u32);
                let weight = values(shape.out_channels * c * shape.kernel[0] * shape.kernel[1], 7 + n as u32);
                let bias = values(shape.out_channels, 99);
                let residual = values(shape.out_channels * oh * ow, 5);
                for (epi, algorithm) in [
                    Epilogue::default(),
                    Epilogue { bias: Some(&bias), residual: None, relu: true },
                    Epilogue { bias: Some(&bias), residual: Some(&residual), relu: true },
                ]
                .into_iter()
                .flat_map(|e| [(e, Algorithm::Positions), (e, Algorithm::Channels)])
                {
                    let conv = DirectConv::with_algorithm(&weight, shape, isa, algorithm);
                    let want_algorithm = if lanes(isa) == 0 { Algorithm::Positions } else { algorithm };
                    assert_eq!(conv.algorithm(), want_algorithm);
                    let want = reference(&image, &weight, shape, epi);
                    // One thread, and the channels split between three workers.
                    for threads in [1, 3] {
                        let mut scratch = vec![f32::NAN; conv.scratch_len()];
                        let mut out = vec![f32::NAN; shape.out_channels * oh * ow];
                        let team = Team::always_split(threads).unwrap();
                        conv.run_on(&image, &mut out, epi, &mut scratch, &team);
                        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{isa:?} {algorithm:?} {shape:?} {threads} threads at {i}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A convolution that writes the next one's blocked input, and the next one reading it, give
    /// the bits of the two reference loops one after the other: with and without bias, residual
    /// and ReLU on the first, a partial block of channels between them, 1 and 3 threads.
    #[test]
    fn blocked_hand_over_gives_the_reference_bits() {
        let pairs = [
            (
                ConvShape { input: [16, 14, 14], out_channels: 32, kernel: [3, 3], stride: 1, padding: [1, 1] },
                ConvShape { input: [32, 14, 14], out_channels: 64, kernel: [3, 3], stride: 2, padding: [1, 1] },
            ),
            (
                ConvShape { input: [9, 12, 31], out_channels: 40, kernel: [3, 3], stride: 2, padding: [1, 1] },
                ConvShape { input: [40, 6, 16], out_channels: 48, kernel: [3, 3], stride: 1, padding: [1, 1] },
            ),
            (
                ConvShape { input: [8, 9, 9], out_channels: 24, kernel: [1, 1], stride: 1, padding: [0, 0] },
                ConvShape { input: [24, 9, 9], out_channels: 16, kernel: [5, 3], stride: 1, padding: [2, 1] },
            ),
        ];
        let paths = [Isa::Avx2, Isa::Avx512];
        for isa in paths.into_iter().filter(|i| i.available_for_test("blocked_hand_over_gives_the_reference_bits")) {
            for (n, &(a, b)) in pairs.iter().enumerate() {
                let [c, h, w] = a.input;
                let [oh, ow] = a.output();
                let [bh, bw] = b.output();
                let image = values(c * h * w, n as u32);
                let wa = values(a.out_channels * c * a.kernel[0] * a.kernel[1], 3 + n as u32);
                let wb = values(b.out_channels * b.input[0] * b.kernel[0] * b.kernel[1], 11 + n as u32);
                let bias = values(a.out_channels, 17);
                let residual = values(a.out_channels * oh * ow, 23);
                let second_bias = values(b.out_channels, 19);
                let second = Epilogue { bias: Some(&second_bias), residual: None, relu: true };
                for first in [
                    Epilogue::default(),
                    Epilogue { bias: Some(&bias), residual: None, relu: true },
                    Epilogue { bias: Some(&bias), residual: Some(&residual), relu: true },
                ] {
                    let want = reference(&reference(&image, &wa, a, first), &wb, b, second);
                    let conv_a = DirectConv::with_algorithm(&wa, a, isa, Algorithm::Channels);
                    let conv_b = DirectConv::with_algorithm(&wb, b, isa, Algorithm::Channels);
                    let layout = conv_b.input_layout().expect("the channel algorithm has a blocked input");
                    for threads in [1, 3] {
                        let team = Team::always_split(threads).unwrap();
                        let mut scratch = vec![f32::NAN; conv_a.scratch_len().max(conv_b.scratch_len())];
                        let mut blocked = vec![f32::NAN; layout.len()];
                        let mut out = vec![f32::NAN; b.out_channels * bh * bw];
                        let to = Output::Blocked(&mut blocked, layout);
                        conv_a.run_with(Input::ChannelMajor(&image), to, first, &mut scratch, &team);
                        let to = Output::ChannelMajor(&mut out);
                        conv_b.run_with(Input::Blocked(&blocked), to, second, &mut scratch, &team);
                        for (i, (x, y)) in out.iter().zip(&want).enumerate() {
                            assert_eq!(
                                x.to_bits(),
                                y.to_bits(),
                                "{isa:?} pair {n}, {threads} threads, at {i}: {x} vs {y}"
                            );
                        }
                    }
                }
            }
        }
    }
}
