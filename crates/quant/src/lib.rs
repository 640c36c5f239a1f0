//! shrink-quant: quantization for shrink graphs and for any burn module.
//!
//! - [`scheme`]: the arithmetic every scheme shares: affine quantization parameters (scale and
//!   zero-point) for symmetric and asymmetric schemes at 2 to 8 bits, per tensor or per output
//!   channel, the stored integer of a weight, the u8 rounding of activations, and a weight-only
//!   round trip ([`fake_quantize`]);
//! - [`calibrate`]: observers that choose activation ranges (min-max, moving average,
//!   percentile, MSE);
//! - [`ptq`]: static post-training quantization of a graph ([`ptq::quantize_static`]) into a
//!   [`ptq::QuantizedModel`] that runs on burn with simulated rounding, or frozen into a CPU plan
//!   on real integer kernels ([`kernels`]: u8 × i8 → i32, on our AVX-512 VNNI or exact AVX2 kernels
//!   ([`shrink_core::kernels::int8`]) or rten-gemm);
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
pub mod onnx;
pub mod ptq;
pub mod qat;
pub mod scheme;
pub mod weights;

pub use calibrate::{Calibrator, Observer};
pub use ptq::{LayerQuant, Override, PtqSettings, QuantizedModel, check_overrides, output_grid, quantize_static};
pub use qat::{QatDistill, QatOutcome, QatSettings, quantization_aware_training};
pub use scheme::{
    ACTIVATION_SCHEME, ActivationType, Granularity, QuantParams, QuantScheme, fake_quantize, params_for_range,
    symmetric_max,
};
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
