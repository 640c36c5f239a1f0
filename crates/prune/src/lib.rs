//! shrink-prune: pruning for shrink graphs and for any burn module.
//!
//! - [`prune`]: the pass over a [`Graph`](shrink_core::Graph) — unstructured (single weights),
//!   N:M semi-structured, or structured (whole filters and neurons, removed physically through the
//!   graph's coupling groups, residual adds included) — ranked by magnitude, norms, batch-norm γ,
//!   first-order Taylor or at random, per layer or globally within per-layer bounds, with skip
//!   lists and per-layer overrides, on a one-shot, iterative or gradual (AGP) schedule with
//!   fine-tuning on core's training loop. Masks persist through fine-tuning: a pruned weight has
//!   no effect and gets no gradient.
//! - [`sensitivity`]: each layer (or channel group) pruned alone at several ratios and measured;
//!   [`ratios_for_drop`] turns that into per-layer sparsities for an accuracy budget.
//! - [`kernels`]: sparse execution — pruned layers run on CSR sparse × dense kernels in the CPU
//!   plan ([`sparse_registry`]) when they are sparse enough to beat the dense GEMM.
//! - [`MagnitudePruner`]: layer-wise magnitude pruning as a burn `ModuleMapper`, for any burn
//!   module (a user's own struct as well as a graph).
//!
//! ```
//! use shrink_core::{BackendKind, zoo::ModelSpec, metrics::model_stats};
//! use shrink_prune::MagnitudePruner;
//!
//! let device = BackendKind::Flex.device().unwrap();
//! let graph = ModelSpec::Lenet5.build([1, 28, 28], 10, 42, &device).unwrap();
//! let mut pruner = MagnitudePruner::new(0.5).unwrap();
//! let pruned = pruner.prune(graph).unwrap();
//! let stats = model_stats(&pruned).unwrap();
//! assert!(stats.nonzeros < stats.params * 6 / 10);
//! ```
#![warn(missing_docs)]

mod finetune;
mod importance;
pub mod kernels;
mod magnitude;
mod masks;
mod scope;
mod sensitivity;
mod settings;
mod structured;

pub use finetune::{PruneEvent, PruneOptions, PruneOutcome, prune};
pub use importance::{TaylorStats, channel_scores, taylor_stats, weight_scores};
pub use kernels::{SPARSE_MAX_DENSITY, register_sparse_kernels, sparse_registry};
pub use magnitude::{MagnitudePruner, ParamMasks, magnitude_mask, prune_global};
pub use masks::{LayerMask, MaskHooks, Masks, n_of_m_mask, weight_masks};
pub use sensitivity::{Measure, UnitSensitivity, ratios_for_drop, sensitivity};
pub use settings::{Criterion, Granularity, PruneSchedule, PruneSettings, SparsityOverride};
pub use structured::{GroupPlan, plan_channels, remove_channels};

/// The names most programs need: `use shrink_prune::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Criterion, Granularity, MagnitudePruner, ParamMasks, PruneSchedule, PruneSettings, prune, prune_global,
        sparse_registry,
    };
}

// The README's example, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Errors of shrink-prune.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting that cannot work, naming it.
    #[error("{key}: {message}")]
    Setting {
        /// The setting, as in the config (`sparsity`, `skip[1]`, `prune_schedule.rounds`).
        key: String,
        /// What was expected.
        message: String,
    },
    /// A NaN or infinite value where a statistic was measured.
    #[error("{0}")]
    NonFinite(String),
    /// From shrink-core: training, shapes, data.
    #[error(transparent)]
    Core(#[from] shrink_core::Error),
}

/// Checks `settings` against `graph`: ranges, and that every skip and override pattern matches
/// a layer that pass would prune (for channels: a producer of a prunable group).
///
/// # Errors
/// [`Error::Setting`] naming the setting, with the layers it could have matched.
pub fn check_settings(graph: &shrink_core::Graph, settings: &PruneSettings) -> Result<(), Error> {
    settings.validate()?;
    match settings.granularity {
        Granularity::Channels => {
            let groups = graph.coupling_groups()?;
            let units = structured::channel_units(graph, &groups, settings)?;
            // Each group keeps a multiple of `round_to` (at least one multiple): a group of at
            // most `round_to` channels cannot lose any.
            let widest = units.iter().map(|&(g, _)| groups[g].channels).max().unwrap_or(0);
            if settings.round_to > 1 && settings.round_to >= widest {
                return Err(Error::setting(
                    "round_to",
                    format!(
                        "every group keeps a multiple of {} channels, but the widest prunable group has {widest}, so nothing would be pruned",
                        settings.round_to
                    ),
                ));
            }
            Ok(())
        }
        _ => masks::weight_units(graph, settings).map(|_| ()),
    }
}

impl Error {
    pub(crate) fn setting(key: &str, message: impl Into<String>) -> Self {
        Error::Setting { key: key.to_string(), message: message.into() }
    }
}
