//! shrink-distill: knowledge distillation on burn tensors and on shrink graphs.
//!
//! - [`losses`]: Hinton's distillation loss ([`kd_loss`], and [`distillation_loss`] on an ensemble's
//!   [`soft_targets`]), FitNets' [`hint_loss`] and attention transfer ([`attention_loss`]) as
//!   plain functions on burn tensors, usable in any training loop.
//! - [`distill()`]: one teacher or an ensemble (frozen, run without autodiff) into a student
//!   graph, with hint and attention pairs named by node, learned 1×1 adapters where channel
//!   counts differ, and the teachers' outputs cached when nothing changes between epochs.
//!
//! ```
//! use burn::tensor::{Int, Tensor};
//! use shrink_distill::kd_loss;
//! let device = shrink_core::BackendKind::Flex.device().unwrap();
//! let student = Tensor::<2>::from_floats([[1.0, 2.0, 3.0]], &device);
//! let teacher = student.clone();
//! let labels = Tensor::<1, Int>::from_ints([2], &device);
//! // A student equal to its teacher has no distillation term: only the hard-label loss remains.
//! let loss = kd_loss(student.clone(), teacher, labels.clone(), 4.0, 1.0).into_scalar::<f32>();
//! assert!(loss.abs() < 1e-6);
//! ```
#![warn(missing_docs)]

mod distill;
pub mod losses;

pub use distill::{
    AdapterInfo, DistillSettings, Distilled, FeaturePair, Learner, Teacher, check_pairs, distill, ensemble_log_probs,
};
pub use losses::{attention_loss, attention_map, distillation_loss, hint_loss, kd_loss, soft_targets};

/// The names most programs need: `use shrink_distill::prelude::*;`.
pub mod prelude {
    pub use crate::{
        DistillSettings, FeaturePair, Teacher, attention_loss, distill, distillation_loss, hint_loss, kd_loss,
        soft_targets,
    };
}

// The README's example, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Everything that can go wrong while distilling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting that cannot work (its key is named first).
    #[error("{0}")]
    Setting(String),
    /// A feature pair names a node that is not in the network.
    #[error("{key}: the {role} has no node named `{name}` (its nodes: {known})")]
    UnknownNode {
        /// Where the name was given, e.g. `hints[0].student`.
        key: String,
        /// `student` or `teacher`.
        role: &'static str,
        /// The name given.
        name: String,
        /// Some of the names that exist.
        known: String,
    },
    /// A teacher produced NaN or an infinity.
    #[error("non-finite value in the {0}")]
    NonFinite(String),
    /// From shrink-core: training, shapes, data.
    #[error(transparent)]
    Core(#[from] shrink_core::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
