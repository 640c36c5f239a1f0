//! shrink-bench: criterion benchmarks across shrink's crates (`cargo bench -p shrink-bench`).
//!
//! Benchmarks measure ratios side by side in one process at one thread; speed goals live here,
//! never in timed unit tests.
#![warn(missing_docs)]

pub mod prune;
pub mod quant;
pub mod runtime;

use shrink_core::burn::tensor::{Distribution, Tensor};
use shrink_core::zoo::ModelSpec;
use shrink_core::{BackendKind, Graph};

/// The zoo models the forward benchmark covers: `(label, spec, input shape)`.
pub fn forward_cases() -> Vec<(&'static str, ModelSpec, [usize; 3])> {
    vec![
        ("resnet20-mnist", ModelSpec::CifarResnet { depth: 20, width: 1.0 }, [1, 28, 28]),
        ("resnet20-cifar", ModelSpec::CifarResnet { depth: 20, width: 1.0 }, [3, 32, 32]),
        ("lenet5-mnist", ModelSpec::Lenet5, [1, 28, 28]),
    ]
}

/// A model in evaluation mode and a random input batch for it on `backend`.
///
/// # Panics
/// If the backend is not compiled in or the case is invalid (benchmarks are not user input).
pub fn model_and_input(spec: &ModelSpec, input: [usize; 3], batch: usize, backend: BackendKind) -> (Graph, Tensor<4>) {
    use shrink_core::burn::module::Module;
    let device = backend.device().expect("backend compiled in");
    let graph = spec.build(input, 10, 0, &device).expect("valid zoo model").valid();
    let x = shrink_core::InitRng::seeded(1).tensor(
        [batch, input[0], input[1], input[2]],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    (graph, x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_runs() {
        for (label, spec, input) in forward_cases() {
            let (g, x) = model_and_input(&spec, input, 2, BackendKind::Flex);
            assert_eq!(g.forward(x).dims(), [2, 10], "{label}");
        }
    }
}
