//! shrink-quant: quantization for shrink graphs and for any burn module.
//!
//! - the arithmetic every scheme shares: affine quantization parameters (scale and zero-point)
//!   for symmetric and asymmetric schemes at 2 to 8 bits, per tensor or per output channel, and a
//!   weight-only round trip ([`fake_quantize`]);
//! - [`calibrate`]: observers that choose activation ranges (min-max, moving average,
//!   percentile, MSE);
//! - [`ptq`]: static post-training quantization of a graph ([`ptq::quantize_static`]) into a
//!   [`ptq::QuantizedModel`] that runs on burn with simulated rounding, or frozen into a CPU plan
//!   on real integer kernels ([`kernels`]: u8 × i8 → i32, on our AVX-512 VNNI kernels
//!   ([`vnni`]) or rten-gemm);
//! - [`qat`]: quantization-aware training ([`quantization_aware_training`]): fake-quant with the
//!   straight-through estimator on core's training loop, scales from the data or learned (LSQ),
//!   into the same [`ptq::QuantizedModel`].
//!
//! - [`weights`]: weight-only quantization of any burn module (a user's own struct) as a burn
//!   `ModuleMapper` ([`WeightQuantizer`]).
//!
//! ```
//! use shrink_quant::{QuantScheme, fake_quantize};
//! let w = [0.5f32, -1.0, 0.25, 0.0];
//! let (q, params) = fake_quantize(&w, &[4], QuantScheme::int8_symmetric_per_tensor()).unwrap();
//! assert!((q[1] + 1.0).abs() < 1e-6);
//! assert_eq!(params.len(), 1);
//! ```
#![warn(missing_docs)]

pub mod adaround;
pub mod calibrate;
pub mod equalize;
pub mod kernels;
pub mod ptq;
pub mod qat;
pub mod vnni;
pub mod weights;

pub use calibrate::{Calibrator, Observer};
pub use ptq::{ActivationType, LayerQuant, Override, PtqSettings, QuantizedModel, quantize_static};
pub use qat::{QatOutcome, QatSettings, QatTeacher, quantization_aware_training};
pub use weights::{QuantizedWeight, WeightQuantizer};

/// The names most programs need: `use shrink_quant::prelude::*;` (shrink-prune's prelude has a
/// `Granularity` of its own, so this one leaves [`Granularity`] out).
pub mod prelude {
    pub use crate::{
        Calibrator, PtqSettings, QatSettings, QuantScheme, QuantizedModel, WeightQuantizer,
        quantization_aware_training, quantize_static,
    };
}

// The README's example, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Errors of shrink-quant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A bit width outside 2..=8.
    #[error("bits must be between 2 and 8, got {0}")]
    InvalidBits(u32),
    /// A setting or override that cannot work.
    #[error("{0}")]
    Setting(String),
    /// Calibration could not choose a range.
    #[error("calibration: {0}")]
    Calibration(String),
    /// From shrink-core: training, shapes, data.
    #[error(transparent)]
    Core(#[from] shrink_core::Error),
    /// Values and shape disagree.
    #[error("{values} values do not fill a tensor of shape {shape:?}")]
    ShapeMismatch {
        /// Number of values.
        values: usize,
        /// Shape given.
        shape: Vec<usize>,
    },
}

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
pub(crate) fn symmetric_max(bits: u32) -> i32 {
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
    let mut out = Vec::with_capacity(values.len());
    let mut params = Vec::with_capacity(slices);
    for slice in values.chunks_exact(per) {
        let min = slice.iter().copied().fold(f32::INFINITY, f32::min);
        let max = slice.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let p = params_for_range(min, max, scheme);
        out.extend(slice.iter().map(|&v| {
            let q = ((v / p.scale).round() as i32 + p.zero_point).clamp(qmin, qmax);
            p.scale * (q - p.zero_point) as f32
        }));
        params.push(p);
    }
    Ok((out, params))
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
