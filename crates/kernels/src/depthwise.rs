//! Depthwise convolutions (one filter per channel: MobileNet's 3×3 layers) on planar f32 images
//! (`[channels][height][width]`).
//!
//! [`depthwise`] computes the same sums as the scalar definition [`depthwise_reference`], in the
//! same order and with the same operations (a product, then an add, tap by tap in row-major
//! order, taps outside the image skipped), so the results are bit-identical; it only moves the
//! border tests out of the inner loop: for each tap it works out the range of output columns
//! that read inside the image and runs over that range as one loop, which the compiler
//! vectorises (stride 1: contiguous reads; stride 2: every other value).

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

/// [`depthwise_reference`] with the border tests out of the inner loop: bit-identical results.
///
/// # Panics
/// As [`depthwise_reference`].
pub fn depthwise(shape: &DepthwiseShape, image: &[f32], weights: &[f32], out: &mut [f32]) {
    shape.check(image, weights, out);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit-identical to the scalar definition over strides, paddings, dilations, kernel sizes
    /// and images narrower than the kernel, with values whose rounding depends on the order.
    #[test]
    fn depthwise_equals_the_scalar_definition_bit_for_bit() {
        let mut state = 0x2545_F491u32;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f32 / u32::MAX as f32 - 0.5) * 3.0
        };
        let mut cases = 0;
        for (channels, [h, w]) in [(3, [7, 9]), (8, [16, 16]), (5, [1, 3]), (2, [2, 1]), (4, [13, 32])] {
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
                            depthwise(&shape, &image, &weights, &mut got);
                            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert_eq!(bits(&got), bits(&want), "{shape:?}");
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert!(cases > 250, "{cases} shapes");
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
}
