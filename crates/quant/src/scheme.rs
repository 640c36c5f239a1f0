//! The arithmetic every quantization scheme shares, in one place: affine parameters (scale and
//! zero point) for symmetric and asymmetric schemes at 2 to 8 bits, per tensor or per output
//! channel; how a weight becomes its stored integer; how an activation is rounded to u8. The
//! calibrators, PTQ, QAT and the integer kernels all call these functions, so the simulated and
//! the integer models round alike.

use serde::{Deserialize, Serialize};

use crate::Error;

/// Granularity of the quantization parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// One scale (and zero-point) for the whole tensor.
    PerTensor,
    /// One per slice along axis 0 (output channels of a conv or linear weight).
    PerChannel,
}

/// A quantization scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantScheme {
    /// Bits per value, 2..=8.
    pub bits: u32,
    /// Symmetric (zero-point 0, range `[-(2^(b-1)-1), 2^(b-1)-1]`) or asymmetric (full
    /// unsigned range with a zero-point).
    pub symmetric: bool,
    /// Per tensor or per channel.
    pub granularity: Granularity,
}

impl QuantScheme {
    /// int8, symmetric, per tensor.
    pub fn int8_symmetric_per_tensor() -> Self {
        Self { bits: 8, symmetric: true, granularity: Granularity::PerTensor }
    }

    /// The integer range `(min, max)` of the scheme.
    pub fn range(&self) -> (i32, i32) {
        if self.symmetric {
            let m = symmetric_max(self.bits);
            (-m, m)
        } else {
            (0, (1 << self.bits) - 1)
        }
    }
}

/// The largest integer of a symmetric `bits`-bit scheme: `2^(bits-1) - 1`.
pub fn symmetric_max(bits: u32) -> i32 {
    (1 << (bits - 1)) - 1
}

/// Scale and zero-point of one quantized slice: `real = scale * (q - zero_point)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantParams {
    /// Step between two integer levels.
    pub scale: f32,
    /// Integer that represents 0.0 exactly.
    pub zero_point: i32,
}

/// The parameters that map `[min, max]` (widened to include 0) onto the scheme's range.
pub fn params_for_range(min: f32, max: f32, scheme: QuantScheme) -> QuantParams {
    let (qmin, qmax) = scheme.range();
    let (min, max) = (min.min(0.0), max.max(0.0));
    if scheme.symmetric {
        let bound = min.abs().max(max.abs());
        let scale = if bound > 0.0 { bound / qmax as f32 } else { 1.0 };
        QuantParams { scale, zero_point: 0 }
    } else {
        let scale = if max > min { (max - min) / (qmax - qmin) as f32 } else { 1.0 };
        let zero_point = (qmin as f32 - min / scale).round().clamp(qmin as f32, qmax as f32) as i32;
        QuantParams { scale, zero_point }
    }
}

/// `values` of `shape` quantized with min-max ranges: the stored integers and the parameters
/// per slice (one, or one per output channel).
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    /// The integers, row-major as the values (in the scheme's range: `[-(2^(b-1)-1), 2^(b-1)-1]`
    /// symmetric, `[0, 2^b - 1]` asymmetric).
    pub integers: Vec<i16>,
    /// Scale and zero point per slice.
    pub params: Vec<QuantParams>,
}

impl Quantized {
    /// The values the integers stand for: `scale · (q − zero_point)`.
    pub fn dequantize(&self) -> Vec<f32> {
        let per = self.integers.len() / self.params.len().max(1);
        self.integers
            .chunks_exact(per.max(1))
            .zip(&self.params)
            .flat_map(|(slice, p)| slice.iter().map(move |&q| p.scale * (q as i32 - p.zero_point) as f32))
            .collect()
    }
}

/// Quantizes `values` of `shape` with min-max ranges per slice.
///
/// # Errors
/// [`Error::InvalidBits`] or [`Error::ShapeMismatch`].
pub fn quantize(values: &[f32], shape: &[usize], scheme: QuantScheme) -> Result<Quantized, Error> {
    if !(2..=8).contains(&scheme.bits) {
        return Err(Error::InvalidBits(scheme.bits));
    }
    if shape.iter().product::<usize>() != values.len() || values.is_empty() {
        return Err(Error::ShapeMismatch { values: values.len(), shape: shape.to_vec() });
    }
    let slices = match scheme.granularity {
        Granularity::PerTensor => 1,
        Granularity::PerChannel => shape[0],
    };
    let per = values.len() / slices;
    let (qmin, qmax) = scheme.range();
    let mut integers = Vec::with_capacity(values.len());
    let mut params = Vec::with_capacity(slices);
    for slice in values.chunks_exact(per) {
        let min = slice.iter().copied().fold(f32::INFINITY, f32::min);
        let max = slice.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let p = params_for_range(min, max, scheme);
        integers.extend(slice.iter().map(|&v| ((v / p.scale).round() as i32 + p.zero_point).clamp(qmin, qmax) as i16));
        params.push(p);
    }
    Ok(Quantized { integers, params })
}

/// Quantizes then dequantizes `values` of `shape` with min-max ranges, returning the values the
/// quantized model would see and the parameters per slice.
///
/// # Errors
/// [`Error::InvalidBits`] or [`Error::ShapeMismatch`].
pub fn fake_quantize(
    values: &[f32],
    shape: &[usize],
    scheme: QuantScheme,
) -> Result<(Vec<f32>, Vec<QuantParams>), Error> {
    let q = quantize(values, shape, scheme)?;
    Ok((q.dequantize(), q.params))
}

/// The u8 asymmetric per-tensor scheme of activations.
pub const ACTIVATION_SCHEME: QuantScheme =
    QuantScheme { bits: 8, symmetric: false, granularity: Granularity::PerTensor };

/// The integer type of quantized activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationType {
    /// Unsigned 8 bits, asymmetric: `[min, max]` (widened to 0) onto 0..=255 with a zero point.
    /// Uses all 256 levels on one-sided inputs such as ReLU outputs.
    #[default]
    U8,
    /// Signed 8 bits, symmetric: `[-a, a]` onto -127..=127, zero point 0 (as TensorRT and
    /// int8-only accelerators expect). The integer kernels read it as u8 with zero point 128,
    /// which is exact: `q + 128` is the same grid shifted.
    I8,
}

impl ActivationType {
    /// The scheme its ranges are chosen for.
    pub fn scheme(self) -> QuantScheme {
        match self {
            ActivationType::U8 => ACTIVATION_SCHEME,
            ActivationType::I8 => QuantScheme { bits: 8, symmetric: true, granularity: Granularity::PerTensor },
        }
    }

    /// The parameters the u8 kernels use for `p`, chosen for [`ActivationType::scheme`].
    pub fn kernel_params(self, p: QuantParams) -> QuantParams {
        match self {
            ActivationType::U8 => p,
            ActivationType::I8 => QuantParams { scale: p.scale, zero_point: p.zero_point + 128 },
        }
    }
}

/// `round_ties_even(clamp(v / scale + zero_point, 0, 255))` for `v * inv` = `v / scale`: the
/// kernels' one definition ([`shrink_core::kernels::int8::quantize`]).
#[inline(always)]
pub(crate) fn quantize_one(v: f32, inv: f32, zp: f32) -> u8 {
    shrink_core::kernels::int8::quantize(v, inv, zp)
}

/// `x` rounded in place to the u8 grid of `p` and back: `scale · (q − zero_point)` with `q` as
/// [`quantize_u8`] computes it — where a quantized model rounds a layer's output that its plan
/// otherwise keeps in f32 (see [`crate::QuantizedModel::outputs`]).
pub fn round_to_grid(x: &mut [f32], p: QuantParams) {
    let grid = shrink_core::kernels::int8::Grid::new(p.scale, p.zero_point as u8);
    for v in x {
        *v = grid.round(*v);
    }
}

/// Quantizes `x` to u8 with `p`: `q = round(clamp(x / scale + zp, 0, 255))`, ties to even, as
/// `f32::round_ties_even` would; NaN becomes 0. One pass, vectorised.
pub fn quantize_u8(x: &[f32], p: QuantParams, out: &mut [u8]) {
    let (inv, zp) = (1.0 / p.scale, p.zero_point as f32);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = quantize_one(v, inv, zp);
    }
}

/// Rounds `w / scale` to the nearest integer in `[-qmax, qmax]`.
pub(crate) fn quantize_weight(w: f32, scale: f32, qmax: i32) -> i32 {
    ((w / scale).round() as i32).clamp(-qmax, qmax)
}

/// The stored integer of weight `w`: symmetric (`zero_point` `None`) rounds `w / scale` into
/// `[-qmax, qmax]`; asymmetric adds the zero point and clamps to the full signed range.
pub(crate) fn int_weight(w: f32, scale: f32, zero_point: Option<i32>, bits: u32) -> i8 {
    match zero_point {
        None => quantize_weight(w, scale, symmetric_max(bits)) as i8,
        Some(z) => {
            let half = 1 << (bits - 1);
            ((w / scale).round() as i32 + z).clamp(-half, half - 1) as i8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize) -> Vec<f32> {
        let mut s = 12345u64;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn error_stays_within_half_a_step() {
        let w = lcg(4096);
        for bits in [8, 4, 2] {
            for symmetric in [true, false] {
                let scheme = QuantScheme { bits, symmetric, granularity: Granularity::PerTensor };
                let (q, p) = fake_quantize(&w, &[64, 64], scheme).unwrap();
                let max_err = w.iter().zip(&q).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(max_err <= p[0].scale / 2.0 + 1e-6, "{bits} bits sym={symmetric}: {max_err} vs {}", p[0].scale);
                let levels: std::collections::BTreeSet<i64> =
                    q.iter().map(|v| (v / p[0].scale).round() as i64).collect();
                assert!(levels.len() <= 1 << bits);
            }
        }
    }

    #[test]
    fn per_channel_beats_per_tensor_on_uneven_channels() {
        let mut w = lcg(256);
        for v in &mut w[..128] {
            *v *= 100.0; // channel 0 is 100x wider than channel 1
        }
        let err = |g| {
            let (q, _) =
                fake_quantize(&w, &[2, 128], QuantScheme { bits: 8, symmetric: true, granularity: g }).unwrap();
            w[128..].iter().zip(&q[128..]).map(|(a, b)| (a - b).powi(2)).sum::<f32>()
        };
        assert!(err(Granularity::PerChannel) * 100.0 < err(Granularity::PerTensor));
    }

    #[test]
    fn zero_is_exact_and_bad_bits_refused() {
        let (q, p) = fake_quantize(
            &[0.0, 0.3, 1.7],
            &[3],
            QuantScheme { bits: 4, symmetric: false, granularity: Granularity::PerTensor },
        )
        .unwrap();
        assert_eq!(q[0], 0.0);
        assert!(p[0].zero_point == 0);
        assert!(
            fake_quantize(&[1.0], &[1], QuantScheme { bits: 9, symmetric: true, granularity: Granularity::PerTensor })
                .is_err()
        );
        assert!(fake_quantize(&[1.0], &[2], QuantScheme::int8_symmetric_per_tensor()).is_err());
    }
}
