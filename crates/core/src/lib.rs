//! shrink-core: the base every compression technique of shrink stands on.
//!
//! - [`graph`]: the one IR — a network as named, typed nodes with edges, parameters as burn
//!   tensors; a burn `Module`. Shape inference, feature taps and channel-coupling groups.
//! - [`zoo`]: CIFAR ResNets (6n+2), ImageNet ResNet-18/34, LeNet-5 and MLPs built as graphs.
//! - [`data`]: IDX (MNIST), CIFAR-10 binary and image-folder loaders; normalisation, seeded
//!   shuffling, batching, validation splits, augmentation.
//! - [`train`]: training (SGD, Adam, AdamW; step and cosine schedules with warm-up) and
//!   evaluation (top-1/top-5, per-class accuracy, confusion matrix).
//! - [`metrics`]: parameters, non-zeros, bytes, MACs per layer, measured latency.
//! - [`io`]: model files (safetensors with the graph in the header), atomic writes.
//! - [`onnx`]: ONNX import — a model exported from PyTorch, TensorFlow or Paddle becomes a graph.
//! - [`runtime`]: the CPU inference plan — [`runtime::freeze`] folds batch norms, fuses ReLUs,
//!   plans buffers and runs f32 kernels (direct convolutions, GEMMs); other crates plug kernels in through a registry.
//! - [`kernels`]: the compute kernels themselves (GEMMs, convolutions, sparse and integer
//!   kernels, ISA dispatch), the burn-free crate `shrink-kernels` below this one.
//! - [`backend`]: the one module that names burn's backends.
//! - [`init`]: the seeded generator initial weights are drawn from ([`InitRng`]).
//! - [`host`]: reading tensors back to the host, fallibly.
//!
//! ```
//! use shrink_core::{BackendKind, zoo::ModelSpec, metrics::model_stats};
//! let device = BackendKind::Flex.device().unwrap();
//! let graph = ModelSpec::CifarResnet { depth: 20, width: 1.0 }.build([3, 32, 32], 10, 42, &device).unwrap();
//! let stats = model_stats(&graph).unwrap();
//! assert!((0.26e6..0.28e6).contains(&(stats.params as f64)));
//! ```
//!
//! A model exported from another framework, imported ([`onnx`]):
//!
//! ```
//! use shrink_core::onnx::{ImportOptions, import};
//! let device = shrink_core::BackendKind::Flex.device().unwrap();
//! let path = std::path::Path::new("../../data/onnx/resnet_mnist_opset11.onnx");
//! let imported = import(path, &ImportOptions::default(), &device).unwrap();
//! println!("{}", imported.summary); // opset 11, from pytorch …; Conv2d ×9, …
//! assert_eq!(imported.graph.num_outputs(), 10);
//! ```
#![warn(missing_docs)]

pub mod backend;
pub mod data;
mod error;
pub mod graph;
pub mod host;
pub mod init;
pub mod io;
pub mod metrics;
pub mod onnx;
pub mod runtime;
pub mod train;
pub mod zoo;

pub use backend::BackendKind;
pub use error::{Error, Result};
pub use graph::Graph;
pub use init::InitRng;

/// burn, re-exported so that users of shrink-core name the same version.
pub use burn;

/// The compute kernels (`shrink-kernels`, no burn): what the plan's layers, shrink-quant's
/// integer kernels and shrink-prune's sparse ones call.
pub use shrink_kernels as kernels;

/// The names most programs need: `use shrink_core::prelude::*;`.
pub mod prelude {
    pub use crate::backend::BackendKind;
    pub use crate::data::{Batcher, Dataset, load_mnist_dir};
    pub use crate::graph::{Conv2dSpec, Graph, GraphBuilder};
    pub use crate::init::InitRng;
    pub use crate::metrics::{model_stats, param_report};
    pub use crate::runtime::freeze;
    pub use crate::train::{OptimizerSettings, Schedule, TrainData, TrainSettings, evaluate, train};
}

// The README's example, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The burn version shrink is built and tested against (pinned exactly in the workspace; a test
/// checks this constant against `cargo metadata`).
pub const BURN_VERSION: &str = "0.22.1";
