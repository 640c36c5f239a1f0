//! The channel-vectorised algorithm of [`DirectConv`](super::DirectConv): one register holds
//! `L` output channels of one output position (`L` = 16 on AVX-512, 8 on AVX2), the way oneDNN's
//! and ONNX Runtime's NCHWc kernels work.
//!
//! The image is copied once into a zero-padded channel-blocked buffer, `[c / L][hp][wp][L]`
//! (`hp`, `wp` padded). A tile is `R` consecutive output positions of one output row by `B`
//! blocks of `L` output channels: `R × B` accumulators (at most 28 of AVX-512's 32 registers,
//! 14 of AVX2's 16). Per tap `(c, ky, kx)` it loads `B` weight vectors and multiplies each by
//! the input value of every position, broadcast from memory — one fused multiply-add per
//! accumulator, no lane wasted on padding columns (the position-vectorised algorithm computes
//! `wp − ow` of them per row) and no lane wasted on channels as long as the layer has a multiple
//! of `L`. A stride only changes which input value a position reads.
//!
//! The taps are added in the reference's order, one `mul_add` each, and the tile goes through
//! the same [`epilogue`](super::epilogue) into the channel-major output, so the bits
//! equal [`reference`](super::reference)'s (tested with every path in `conv`'s tests).
#![allow(unsafe_code)]

use super::{BlockedImage, ConvShape, Epilogue, epilogue, epilogue_row, lanes, pack_panels};

/// Where [`ChannelConv::run`] writes.
pub(super) enum Dest<'a> {
    /// Channel-major, from the first channel of the range.
    ChannelMajor(&'a mut [f32]),
    /// Blocked for the next convolution, from the first block of the range.
    Blocked(&'a mut [f32], BlockedImage),
}
use crate::isa::Isa;

/// Accumulator registers one tile may use.
const fn max_accumulators(lanes: usize) -> usize {
    if lanes == 16 { 28 } else { 14 }
}

/// Weights packed for the channel-vectorised algorithm, and its tiling.
#[derive(Clone, Debug)]
pub(super) struct ChannelConv {
    shape: ConvShape,
    /// f32 lanes of one register: 16 (AVX-512) or 8 (AVX2).
    lanes: usize,
    /// Blocks of `lanes` output channels, each `[c][kh][kw][lanes]` (missing channels zero).
    packed: Vec<f32>,
    isa: Isa,
}

impl ChannelConv {
    /// Packs `weight` (`[out, in, kh, kw]`) for `isa` (`Avx512` or `Avx2`, present on this CPU).
    pub(super) fn new(weight: &[f32], shape: ConvShape, isa: Isa) -> Self {
        debug_assert!(matches!(isa, Isa::Avx512 | Isa::Avx2) && isa.available());
        let lanes = lanes(isa);
        let depth = shape.input[0] * shape.kernel[0] * shape.kernel[1];
        let packed = pack_panels(weight, shape.out_channels, depth, lanes);
        Self { shape, lanes, packed, isa }
    }

    /// Blocks of output channels.
    fn blocks(&self) -> usize {
        self.shape.out_channels.div_ceil(self.lanes)
    }

    /// Output-channel blocks per tile: 4, 2 or 1, the most the layer has (with 4, a tile has at
    /// most 28 / 4 = 7 positions on AVX-512).
    fn blocks_per_tile(&self) -> usize {
        tile_blocks(self.blocks())
    }

    /// Scratch values: the padded, blocked image.
    pub(super) fn scratch_len(&self) -> usize {
        self.input_layout().len()
    }

    /// Output channels per job of a split between `threads`: one tile's blocks, fewer when the
    /// layer has too few blocks to give every thread one such job (a 32-channel layer at two
    /// threads: one block each, so a single image uses both cores).
    pub(super) fn channels_per_job(&self, threads: usize) -> usize {
        let blocks = (self.blocks() / threads.max(1)).clamp(1, self.blocks_per_tile());
        blocks * self.lanes
    }

    /// The layout [`Self::prepare`] writes and [`Self::run`] reads.
    pub(super) fn input_layout(&self) -> BlockedImage {
        BlockedImage::padded(&self.shape, self.lanes)
    }

    /// f32 lanes per block.
    pub(super) fn lanes(&self) -> usize {
        self.lanes
    }

    /// Writes `image` (`[c][h][w]`) into `x` as `[c / L][hp][wp][L]` with a zero border.
    pub(super) fn prepare(&self, image: &[f32], x: &mut [f32]) {
        let ConvShape { input: [c, h, w], padding: [py, px], .. } = self.shape;
        let BlockedImage { height: hp, width: wp, .. } = self.input_layout();
        let l = self.lanes;
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx512 {
            assert!(image.len() >= c * h * w && x.len() >= self.scratch_len());
            // The transposes write all 16 lanes of every interior position (zeros past the
            // last channel): only the border needs zeros.
            self.input_layout().fill_border(x);
            // SAFETY: the CPU has AVX-512F (`new` was given the path); the assert bounds the
            // reads (`c · h · w`) and the writes (the padded image, inside the scratch).
            unsafe { x86::block_image_avx512(image, [c, h, w], [hp, wp], [py, px], x) };
            return;
        }
        x[..self.scratch_len()].fill(0.0);
        for ci in 0..c {
            let (block, lane) = (ci / l, ci % l);
            for y in 0..h {
                let row = &image[(ci * h + y) * w..][..w];
                let dst = &mut x[((block * hp + y + py) * wp + px) * l + lane..];
                for (i, &v) in row.iter().enumerate() {
                    dst[i * l] = v;
                }
            }
        }
    }

    /// Output channels `channels` (whole blocks, from a multiple of
    /// [`Self::channels_per_job`]) of the prepared image `x` into `out`, which starts at the
    /// range's first channel.
    pub(super) fn run(&self, x: &[f32], channels: std::ops::Range<usize>, mut out: Dest<'_>, epi: Epilogue<'_>) {
        let [oh, ow] = self.shape.output();
        let l = self.lanes;
        let b_max = self.blocks_per_tile();
        let r_max = (max_accumulators(l) / b_max).min(ow);
        // Positions per tile: the row split into tiles of nearly equal size.
        let tiles_per_row = ow.div_ceil(r_max);
        let depth = self.shape.input[0] * self.shape.kernel[0] * self.shape.kernel[1];
        let mut tile = [0.0f32; 28 * 16];
        let first_block = channels.start / l;
        let last_block = channels.end.div_ceil(l).min(self.blocks());
        let mut block = first_block;
        while block < last_block {
            let b = tile_blocks(last_block - block).min(b_max);
            let weights = &self.packed[block * depth * l..(block + b) * depth * l];
            for oy in 0..oh {
                let mut ox = 0;
                for t in 0..tiles_per_row {
                    // Split `ow` as evenly as possible: the first tiles take the remainder.
                    let r = ow / tiles_per_row + usize::from(t < ow % tiles_per_row);
                    self.tile(weights, x, [oy, ox], b, r, &mut tile);
                    match &mut out {
                        Dest::ChannelMajor(out) => self.store(&tile, block, b, [oy, ox], r, channels.start, out, epi),
                        Dest::Blocked(out, image) => {
                            self.store_blocked(&tile, block, b, [oy, ox], r, first_block, out, *image, epi)
                        }
                    }
                    ox += r;
                }
            }
            block += b;
        }
    }

    /// The epilogue of one tile (`tile[j · b · L + bi · L + lane]` for position `j`, block `bi`)
    /// into the channel-major `out` (which starts at channel `first`).
    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        tile: &[f32],
        block: usize,
        b: usize,
        [oy, ox]: [usize; 2],
        r: usize,
        first: usize,
        out: &mut [f32],
        epi: Epilogue<'_>,
    ) {
        let [oh, ow] = self.shape.output();
        let l = self.lanes;
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx512 {
            let plane = oh * ow;
            let at = oy * ow + ox;
            let channels = (self.shape.out_channels - block * l).min(b * l);
            assert!(out.len() >= ((block * l + channels - first) - 1) * plane + at + r, "output too short");
            assert!(tile.len() >= r * b * l);
            assert!(epi.bias.is_none_or(|v| v.len() >= block * l + channels));
            assert!(epi.residual.is_none_or(|v| v.len() >= (block * l + channels - 1) * plane + at + r));
            let bias = epi.bias.map(|v| &v[block * l..]);
            let residual = epi.residual.map(|v| &v[block * l * plane + at..]);
            let out = &mut out[(block * l - first) * plane + at..];
            // SAFETY: the CPU has AVX-512F (`new` was given the path); the asserts above bound
            // every write (`channels` rows of `r` values, `plane` apart) and read.
            unsafe { x86::store_avx512(tile, b, r, channels, plane, bias, residual, epi.relu, out) };
            return;
        }
        let mut column = [0.0f32; 28];
        for bi in 0..b {
            for lane in 0..l {
                let o = (block + bi) * l + lane;
                if o >= self.shape.out_channels {
                    return;
                }
                // The channel's values, gathered from the tile, then the row epilogue (which
                // vectorises).
                for (j, v) in column[..r].iter_mut().enumerate() {
                    *v = tile[(j * b + bi) * l + lane];
                }
                let at = (o * oh + oy) * ow + ox;
                let residual = epi.residual.map(|res| &res[at..at + r]);
                let bias = epi.bias.map_or(0.0, |v| v[o]);
                epilogue_row(&column[..r], bias, residual, epi.relu, &mut out[at - first * oh * ow..][..r]);
            }
        }
    }

    /// The epilogue of one tile into a blocked image (`out` starts at block `first`): each
    /// position's `L` channels are one contiguous run there. Channels past the layer's get 0.
    #[allow(clippy::too_many_arguments)]
    fn store_blocked(
        &self,
        tile: &[f32],
        block: usize,
        b: usize,
        [oy, ox]: [usize; 2],
        r: usize,
        first: usize,
        out: &mut [f32],
        image: BlockedImage,
        epi: Epilogue<'_>,
    ) {
        let [oh, ow] = self.shape.output();
        let l = self.lanes;
        let [py, px] = image.padding;
        let oc = self.shape.out_channels;
        for bi in 0..b {
            let c0 = (block + bi) * l;
            let row = ((block + bi - first) * image.height + oy + py) * image.width + ox + px;
            let full = c0 + l <= oc;
            let bias = epi.bias.map(|v| &v[c0..(c0 + l).min(oc)]);
            let lane_bias: [f32; 16] = std::array::from_fn(|i| bias.and_then(|v| v.get(i)).copied().unwrap_or(0.0));
            for j in 0..r {
                let src = &tile[(j * b + bi) * l..][..l];
                let dst = &mut out[(row + j) * l..][..l];
                if full && epi.residual.is_none() {
                    // The common case, in a loop of a fixed length that vectorises.
                    match (l, epi.relu) {
                        (16, true) => lanes_epilogue::<16, true>(src, &lane_bias, dst),
                        (16, false) => lanes_epilogue::<16, false>(src, &lane_bias, dst),
                        (_, true) => lanes_epilogue::<8, true>(src, &lane_bias, dst),
                        (_, false) => lanes_epilogue::<8, false>(src, &lane_bias, dst),
                    }
                    continue;
                }
                for (lane, (d, &a)) in dst.iter_mut().zip(src).enumerate() {
                    let o = c0 + lane;
                    *d = if o < oc {
                        let residual = epi.residual.map(|v| v[(o * oh + oy) * ow + ox + j]);
                        epilogue(a, bias.map_or(0.0, |v| v[lane]), residual, epi.relu)
                    } else {
                        0.0
                    };
                }
            }
        }
    }

    /// `tile[(j · b + bi) · L + lane] = Σ_k w[block bi][k][lane] · x[tap k of position j]`.
    fn tile(&self, weights: &[f32], x: &[f32], [oy, ox]: [usize; 2], b: usize, r: usize, tile: &mut [f32; 28 * 16]) {
        let ConvShape { input: [c, ..], kernel: [kh, kw], stride: s, .. } = self.shape;
        let BlockedImage { height: hp, width: wp, .. } = self.input_layout();
        let l = self.lanes;
        // The first input value position 0 of the tile reads, for channel 0 and tap (0, 0).
        let origin = ((oy * s) * wp + ox * s) * l;
        // The reads: channel ci, tap (ky, kx), position j at
        // `origin + (ci / L) · hp · wp · L + ci % L + (ky · wp + kx) · L + j · s · L`,
        // at most the last value of the last block's padded image.
        debug_assert!(
            origin + ((c - 1) / l * hp * wp + (kh - 1) * wp + kw - 1 + (r - 1) * s) * l + (c - 1) % l
                < x.len().min(self.scratch_len())
        );
        debug_assert!(r * b <= max_accumulators(l) && weights.len() >= b * c * kh * kw * l);
        let geometry = Geometry { channels: c, kernel: [kh, kw], row: wp * l, plane: hp * wp * l, step: s * l };
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `new` was given a path this CPU has; the reads stay inside `x` and the
            // weights (checked above in debug builds: `run` only makes tiles inside the output,
            // whose taps lie inside the padded image), the writes inside `tile` (`r · b ≤ 28`).
            Isa::Avx512 => unsafe { x86::tile_avx512(weights, &x[origin..], geometry, b, r, tile) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as for AVX-512 (`r · b ≤ 14`).
            Isa::Avx2 => unsafe { x86::tile_avx2(weights, &x[origin..], geometry, b, r, tile) },
            _ => {
                let _ = (weights, geometry, b, r, tile);
                unreachable!("the channel-vectorised convolution runs on AVX-512 or AVX2")
            }
        }
    }
}

/// [`epilogue`] without a residual over `L` lanes (`L` a constant, so the loop vectorises).
#[inline(always)]
fn lanes_epilogue<const L: usize, const RELU: bool>(src: &[f32], bias: &[f32; 16], dst: &mut [f32]) {
    let (src, dst) = (&src[..L], &mut dst[..L]);
    for i in 0..L {
        dst[i] = epilogue(src[i], bias[i], None, RELU);
    }
}

/// The most blocks of output channels a tile takes out of `blocks`: 4, 2 or 1.
fn tile_blocks(blocks: usize) -> usize {
    match blocks {
        4.. => 4,
        2 | 3 => 2,
        _ => 1,
    }
}

/// Strides of the blocked image, in f32.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 kernels only
struct Geometry {
    /// Input channels.
    channels: usize,
    kernel: [usize; 2],
    /// One padded row: `wp · L`.
    row: usize,
    /// One block's padded image: `hp · wp · L`.
    plane: usize,
    /// From one output position to the next: `stride · L`.
    step: usize,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Geometry;

    /// The epilogue of a tile of `b` blocks of 16 channels by `r` positions (`tile[(j · b + bi) ·
    /// 16 + lane]`) into `channels` channel-major rows of `out`, `plane` apart: 16 positions at
    /// a time, transposed in registers, then `(acc + bias) + residual` and the ReLU as
    /// [`epilogue`](super::super::epilogue) computes them (`vmaxps(v, 0)` is `v > 0 ? v : 0`,
    /// as `f32::max(v, 0)` for every `v` a sum started at +0 can take, NaN included).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `tile` holds `r · b · 16` values; `channels ≤ 16 · b`; `out` and `residual` hold `(channels − 1) ·
    /// plane + r` values, `bias` `channels`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn store_avx512(
        tile: &[f32],
        b: usize,
        r: usize,
        channels: usize,
        plane: usize,
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
        relu: bool,
        out: &mut [f32],
    ) {
        let zero = _mm512_setzero_ps();
        for bi in 0..b {
            let lanes = channels.saturating_sub(bi * 16).min(16);
            let mut j0 = 0;
            while j0 < r {
                let n = (r - j0).min(16);
                let mask: __mmask16 = ((1u32 << n) - 1) as u16;
                let mut rows = [zero; 16];
                for (j, row) in rows.iter_mut().enumerate().take(n) {
                    // SAFETY: position `j0 + j < r` of block `bi` (the caller's contract).
                    *row = unsafe { _mm512_loadu_ps(tile.as_ptr().add(((j0 + j) * b + bi) * 16)) };
                }
                let columns = transpose16(rows);
                for (lane, &acc) in columns.iter().enumerate().take(lanes) {
                    let o = bi * 16 + lane;
                    let mut v = _mm512_add_ps(acc, _mm512_set1_ps(bias.map_or(0.0, |v| v[o])));
                    if let Some(res) = residual {
                        // SAFETY: `n` values of row `o` from `j0` (the caller's contract).
                        v = _mm512_add_ps(v, unsafe { _mm512_maskz_loadu_ps(mask, res.as_ptr().add(o * plane + j0)) });
                    }
                    if relu {
                        v = _mm512_max_ps(v, zero);
                    }
                    // SAFETY: `n` values of row `o` from `j0` (the caller's contract).
                    unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(o * plane + j0), mask, v) };
                }
                j0 += n;
            }
        }
    }

    /// `image` (`[c][h][w]`) into `x` as `[c / 16][hp][wp][16]` at `(py, px)`: 16 positions of
    /// 16 channels at a time, transposed in registers (the border is left as it is).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `image` holds `c · h · w` values and `x` the blocked image,
    /// `c.div_ceil(16) · hp · wp · 16`, with `h + py ≤ hp` and `w + px ≤ wp`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block_image_avx512(
        image: &[f32],
        [c, h, w]: [usize; 3],
        [hp, wp]: [usize; 2],
        [py, px]: [usize; 2],
        x: &mut [f32],
    ) {
        for block in 0..c.div_ceil(16) {
            let channels = (c - block * 16).min(16);
            for y in 0..h {
                let mut x0 = 0;
                while x0 < w {
                    let n = (w - x0).min(16);
                    let mask: __mmask16 = ((1u32 << n) - 1) as u16;
                    let mut rows = [_mm512_setzero_ps(); 16];
                    for (k, row) in rows.iter_mut().enumerate().take(channels) {
                        let at = ((block * 16 + k) * h + y) * w + x0;
                        // SAFETY: `n` values of channel `block · 16 + k < c`, row `y`, from `x0`.
                        *row = unsafe { _mm512_maskz_loadu_ps(mask, image.as_ptr().add(at)) };
                    }
                    let positions = transpose16(rows);
                    for (i, &v) in positions.iter().enumerate().take(n) {
                        let at = ((block * hp + y + py) * wp + x0 + i + px) * 16;
                        // SAFETY: position `(y + py, x0 + i + px)` of block `block`, inside `x`.
                        unsafe { _mm512_storeu_ps(x.as_mut_ptr().add(at), v) };
                    }
                    x0 += n;
                }
            }
        }
    }

    /// The 16 × 16 transpose: `out[i]` lane `j` = `rows[j]` lane `i`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut u = [_mm512_setzero_ps(); 16];
        for q in 0..4 {
            let (a0, a1, a2, a3) = (t[4 * q], t[4 * q + 1], t[4 * q + 2], t[4 * q + 3]);
            let pd = _mm512_castps_pd;
            u[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a0), pd(a2)));
            u[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a0), pd(a2)));
            u[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a1), pd(a3)));
            u[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a1), pd(a3)));
        }
        // u[4q + c] holds, in each 128-bit lane k, column c of rows 4q .. 4q + 4 for columns
        // 4k .. 4k + 4; gather the 128-bit pieces.
        let mut v = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            for h in 0..2 {
                let (a, b) = (u[8 * h + c], u[8 * h + 4 + c]);
                v[8 * h + c] = _mm512_shuffle_f32x4::<0x88>(a, b);
                v[8 * h + 4 + c] = _mm512_shuffle_f32x4::<0xDD>(a, b);
            }
        }
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..8 {
            out[c] = _mm512_shuffle_f32x4::<0x88>(v[c], v[8 + c]);
            out[8 + c] = _mm512_shuffle_f32x4::<0xDD>(v[c], v[8 + c]);
        }
        out
    }

    /// Calls `$f::<B, R>` for the runtime `b` and `r`, `B` in 1, 2, 4 and `R ≤ $max / B`.
    macro_rules! dispatch {
        ($f:ident, $b:expr, $r:expr, $args:tt, [$($r1:literal)*], [$($r2:literal)*], [$($r4:literal)*]) => {
            match ($b, $r) {
                $((1, $r1) => $f::<1, $r1> $args,)*
                $((2, $r2) => $f::<2, $r2> $args,)*
                $((4, $r4) => $f::<4, $r4> $args,)*
                (b, r) => unreachable!("no tile of {b} blocks by {r} positions"),
            }
        };
    }

    /// One tile of `b` blocks (1, 2 or 4) by `r` positions (`r · b ≤ 28`), 16 channels per block.
    ///
    /// # Safety
    /// The CPU has AVX-512F and FMA; `x` holds every value the taps read (see `ChannelConv::tile`)
    /// and `weights` `b` blocks of `channels · kh · kw · 16`.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn tile_avx512(
        weights: &[f32],
        x: &[f32],
        g: Geometry,
        b: usize,
        r: usize,
        tile: &mut [f32; 448],
    ) {
        // SAFETY: every arm forwards the caller's contract.
        unsafe {
            dispatch!(
                avx512,
                b,
                r,
                (weights, x, g, tile),
                [1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28],
                [1 2 3 4 5 6 7 8 9 10 11 12 13 14],
                [1 2 3 4 5 6 7]
            )
        }
    }

    /// # Safety
    /// As `tile_avx512`, with `B` blocks and `R` positions.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn avx512<const B: usize, const R: usize>(weights: &[f32], x: &[f32], g: Geometry, tile: &mut [f32; 448]) {
        const L: usize = 16;
        let [kh, kw] = g.kernel;
        let depth = g.channels * kh * kw;
        let mut acc = [[_mm512_setzero_ps(); B]; R];
        let (w, x) = (weights.as_ptr(), x.as_ptr());
        let mut k = 0;
        for ci in 0..g.channels {
            let channel = (ci / L) * g.plane + ci % L;
            for ky in 0..kh {
                for kx in 0..kw {
                    let src = x.wrapping_add(channel + ky * g.row + kx * L);
                    let mut wv = [_mm512_setzero_ps(); B];
                    for (bi, v) in wv.iter_mut().enumerate() {
                        // SAFETY: block `bi`, tap `k` of the packed weights (the caller's contract).
                        *v = unsafe { _mm512_loadu_ps(w.add((bi * depth + k) * L)) };
                    }
                    for (j, a) in acc.iter_mut().enumerate() {
                        // SAFETY: position `j`'s value for this tap (the caller's contract).
                        let v = _mm512_set1_ps(unsafe { *src.add(j * g.step) });
                        for (ab, &wb) in a.iter_mut().zip(&wv) {
                            *ab = _mm512_fmadd_ps(wb, v, *ab);
                        }
                    }
                    k += 1;
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            for (bi, &v) in a.iter().enumerate() {
                // SAFETY: `(j · B + bi + 1) · 16 ≤ R · B · 16 ≤ 448`.
                unsafe { _mm512_storeu_ps(tile.as_mut_ptr().add((j * B + bi) * L), v) };
            }
        }
    }

    /// One tile of `b` blocks (1, 2 or 4) by `r` positions (`r · b ≤ 14`), 8 channels per block.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; otherwise as `tile_avx512`, with blocks of 8 channels.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(weights: &[f32], x: &[f32], g: Geometry, b: usize, r: usize, tile: &mut [f32; 448]) {
        // SAFETY: every arm forwards the caller's contract.
        unsafe {
            dispatch!(
                avx2,
                b,
                r,
                (weights, x, g, tile),
                [1 2 3 4 5 6 7 8 9 10 11 12 13 14],
                [1 2 3 4 5 6 7],
                [1 2 3]
            )
        }
    }

    /// # Safety
    /// As `tile_avx2`, with `B` blocks and `R` positions.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const B: usize, const R: usize>(weights: &[f32], x: &[f32], g: Geometry, tile: &mut [f32; 448]) {
        const L: usize = 8;
        let [kh, kw] = g.kernel;
        let depth = g.channels * kh * kw;
        let mut acc = [[_mm256_setzero_ps(); B]; R];
        let (w, x) = (weights.as_ptr(), x.as_ptr());
        let mut k = 0;
        for ci in 0..g.channels {
            let channel = (ci / L) * g.plane + ci % L;
            for ky in 0..kh {
                for kx in 0..kw {
                    let src = x.wrapping_add(channel + ky * g.row + kx * L);
                    let mut wv = [_mm256_setzero_ps(); B];
                    for (bi, v) in wv.iter_mut().enumerate() {
                        // SAFETY: block `bi`, tap `k` of the packed weights (the caller's contract).
                        *v = unsafe { _mm256_loadu_ps(w.add((bi * depth + k) * L)) };
                    }
                    for (j, a) in acc.iter_mut().enumerate() {
                        // SAFETY: position `j`'s value for this tap (the caller's contract).
                        let v = _mm256_set1_ps(unsafe { *src.add(j * g.step) });
                        for (ab, &wb) in a.iter_mut().zip(&wv) {
                            *ab = _mm256_fmadd_ps(wb, v, *ab);
                        }
                    }
                    k += 1;
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            for (bi, &v) in a.iter().enumerate() {
                // SAFETY: `(j · B + bi + 1) · 8 ≤ R · B · 8 ≤ 448`.
                unsafe { _mm256_storeu_ps(tile.as_mut_ptr().add((j * B + bi) * L), v) };
            }
        }
    }
}
