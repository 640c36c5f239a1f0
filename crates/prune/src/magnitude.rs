//! Magnitude pruning of any burn module — a user's own struct as well as a graph — as burn
//! [`ModuleMapper`]s: layer-wise ([`MagnitudePruner`]) or with one global threshold
//! ([`prune_global`]); both leave [`ParamMasks`] that keep the zeros through the user's own
//! optimiser steps (map the model through them after each step).

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Tensor, TensorData};

use crate::Error;

/// Zeroes, in each weight tensor (rank ≥ 2: biases and norms are left alone), the `sparsity`
/// fraction of entries with the smallest magnitude (layer-wise magnitude pruning, Han et al.
/// 2015), and records each tensor's mask in [`MagnitudePruner::masks`]:
/// `MagnitudePruner::new(0.5)?.prune(module)?`, or `module.map(&mut pruner)` and then
/// [`MagnitudePruner::failure`].
#[derive(Debug)]
pub struct MagnitudePruner {
    sparsity: f64,
    /// Entries zeroed so far, over all tensors mapped.
    pub pruned: usize,
    /// Entries seen so far in pruned tensors.
    pub total: usize,
    /// The masks of the tensors pruned so far, by parameter id.
    pub masks: ParamMasks,
    /// The first weight that could not be read back (left unchanged), if any.
    failure: Option<shrink_core::Error>,
}

/// Pruning masks of a burn module's parameters, by parameter id (ids survive optimiser steps).
/// As a [`ModuleMapper`] it zeroes the masked entries again: map the model through it after each
/// optimiser step, and pruned weights stay pruned whatever the optimiser's momentum does.
#[derive(Clone, Debug, Default)]
pub struct ParamMasks {
    masks: HashMap<ParamId, Vec<f32>>,
}

impl ParamMasks {
    /// Parameters with a mask.
    pub fn len(&self) -> usize {
        self.masks.len()
    }

    /// Whether no parameter has a mask.
    pub fn is_empty(&self) -> bool {
        self.masks.is_empty()
    }

    /// Fraction of the masked parameters' entries that are masked out.
    pub fn sparsity(&self) -> f64 {
        let total: usize = self.masks.values().map(|m| m.len()).sum();
        let zeros: usize = self.masks.values().map(|m| m.iter().filter(|v| **v == 0.0).count()).sum();
        zeros as f64 / total.max(1) as f64
    }
}

impl ModuleMapper for ParamMasks {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(mask) = self.masks.get(&param.id) else { return param };
        let mask = mask.clone();
        param.map(|tensor| {
            let removed =
                Tensor::<D>::from_data(TensorData::new(mask, tensor.shape()), &tensor.device()).equal_elem(0.0);
            leaf_like(&tensor, tensor.clone().mask_fill(removed, 0.0))
        })
    }
}

/// `value` as a parameter like `original`: on an autodiff device, a fresh leaf that requires a
/// gradient if `original` did (a computed tensor would tie the parameter to this one step's
/// autodiff graph, which the next backward pass has already consumed).
fn leaf_like<const D: usize>(original: &Tensor<D>, value: Tensor<D>) -> Tensor<D> {
    if original.is_require_grad() { value.detach().require_grad() } else { value.detach() }
}

/// Prunes `module` with one magnitude threshold over all its weight tensors (rank ≥ 2): exactly
/// `floor(sparsity · n)` of their `n` entries, the smallest in magnitude wherever they are
/// (global magnitude pruning). Returns the pruned module and its masks.
///
/// # Errors
/// [`Error::Setting`] unless `0 <= sparsity < 1`; [`Error::Core`] when a weight cannot be read.
pub fn prune_global<M: Module>(module: M, sparsity: f64) -> Result<(M, ParamMasks), Error> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(Error::setting("sparsity", format!("must be in [0, 1), got {sparsity}")));
    }
    struct Magnitudes(Vec<(ParamId, Vec<f32>)>, Option<shrink_core::Error>);
    impl ModuleVisitor for Magnitudes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if D >= 2 && self.1.is_none() {
                match shrink_core::host::floats(param.val()) {
                    Ok(v) => self.0.push((param.id, v)),
                    Err(e) => self.1 = Some(e),
                }
            }
        }
    }
    let mut seen = Magnitudes(Vec::new(), None);
    module.visit(&mut seen);
    if let Some(e) = seen.1 {
        return Err(e.into());
    }
    // One ranking over every entry: (|w|, tensor, index), ties by position.
    let mut all: Vec<(f32, usize, usize)> = seen
        .0
        .iter()
        .enumerate()
        .flat_map(|(t, (_, v))| v.iter().enumerate().map(move |(i, x)| (x.abs(), t, i)))
        .collect();
    let remove = (sparsity * all.len() as f64).floor() as usize;
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut masks: Vec<Vec<f32>> = seen.0.iter().map(|(_, v)| vec![1.0; v.len()]).collect();
    for &(_, t, i) in &all[..remove] {
        masks[t][i] = 0.0;
    }
    let mut masks = ParamMasks { masks: seen.0.iter().map(|(id, _)| *id).zip(masks).collect() };
    let module = module.map(&mut masks);
    Ok((module, masks))
}

impl MagnitudePruner {
    /// A pruner for the given per-tensor sparsity.
    ///
    /// # Errors
    /// [`Error::Setting`] unless `0 <= sparsity < 1`.
    pub fn new(sparsity: f64) -> Result<Self, Error> {
        if !(0.0..1.0).contains(&sparsity) {
            return Err(Error::setting("sparsity", format!("must be in [0, 1), got {sparsity}")));
        }
        Ok(Self { sparsity, pruned: 0, total: 0, masks: ParamMasks::default(), failure: None })
    }

    /// Prunes the weights of `module` and returns it.
    ///
    /// # Errors
    /// [`Error::Core`] when a weight cannot be read back from its device.
    pub fn prune<M: Module>(&mut self, module: M) -> Result<M, Error> {
        let module = module.map(self);
        match self.failure.take() {
            Some(e) => Err(e.into()),
            None => Ok(module),
        }
    }

    /// The first error of a [`ModuleMapper`] pass (a weight that could not be read back, left
    /// unchanged), if any.
    pub fn failure(&self) -> Option<&shrink_core::Error> {
        self.failure.as_ref()
    }
}

/// The mask (1 = keep) that removes the `sparsity` fraction of smallest-magnitude values.
/// Exactly `floor(sparsity * n)` entries are removed; ties are broken by position, so the
/// result is deterministic.
pub fn magnitude_mask(values: &[f32], sparsity: f64) -> Vec<f32> {
    let remove = (sparsity * values.len() as f64).floor() as usize;
    let magnitudes: Vec<f32> = values.iter().map(|v| v.abs()).collect();
    crate::masks::keep_after_removing(&magnitudes, remove).into_iter().map(|k| if k { 1.0 } else { 0.0 }).collect()
}

impl ModuleMapper for MagnitudePruner {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if D < 2 {
            return param;
        }
        let sparsity = self.sparsity;
        let mut pruned = 0;
        let mut total = 0;
        let id = param.id;
        let mut kept = Vec::new();
        let mut failure = None;
        let param = param.map(|tensor| {
            let device = tensor.device();
            let shape = tensor.shape();
            let values = match shrink_core::host::floats(tensor.clone()) {
                Ok(v) => v,
                Err(e) => {
                    failure = Some(e);
                    return tensor;
                }
            };
            let mask = magnitude_mask(&values, sparsity);
            pruned = mask.iter().filter(|m| **m == 0.0).count();
            total = mask.len();
            kept = mask.clone();
            let removed = Tensor::<D>::from_data(TensorData::new(mask, shape), &device).equal_elem(0.0);
            leaf_like(&tensor, tensor.clone().mask_fill(removed, 0.0))
        });
        if let Some(e) = failure {
            self.failure.get_or_insert(e);
            return param;
        }
        self.masks.masks.insert(id, kept);
        self.pruned += pruned;
        self.total += total;
        tracing::debug!(pruned, total, "magnitude-pruned a weight tensor");
        param
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_removes_exactly_the_smallest() {
        let m = magnitude_mask(&[0.5, -0.1, 2.0, 0.05, -3.0], 0.4);
        assert_eq!(m, vec![1.0, 0.0, 1.0, 0.0, 1.0]);
        assert_eq!(magnitude_mask(&[1.0, 1.0, 1.0, 1.0], 0.5), vec![0.0, 0.0, 1.0, 1.0]);
        assert!(MagnitudePruner::new(1.0).is_err());
    }

    #[test]
    fn survivors_are_unchanged_and_biases_untouched() {
        use shrink_core::graph::Params;
        let device = shrink_core::BackendKind::Flex.device().unwrap();
        let g = shrink_core::zoo::ModelSpec::Mlp { hidden: vec![16] }.build([1, 4, 4], 3, 0, &device).unwrap();
        let mut pruner = MagnitudePruner::new(0.75).unwrap();
        let p = pruner.prune(g.clone()).unwrap();
        assert_eq!(pruner.total, 16 * 16 + 3 * 16);
        assert_eq!(pruner.pruned, 12 * 16 + 36);
        let (Some(Params::Linear(a)), Some(Params::Linear(b))) = (&g.nodes[2].params, &p.nodes[2].params) else {
            panic!("fc1 is linear")
        };
        let before: Vec<f32> = a.weight.val().into_data().try_to_vec().unwrap();
        let after: Vec<f32> = b.weight.val().into_data().try_to_vec().unwrap();
        for (x, y) in before.iter().zip(&after) {
            assert!(*y == 0.0 || x == y);
        }
        let bias_a: Vec<f32> = a.bias.as_ref().unwrap().val().into_data().try_to_vec().unwrap();
        let bias_b: Vec<f32> = b.bias.as_ref().unwrap().val().into_data().try_to_vec().unwrap();
        assert_eq!(bias_a, bias_b);
    }

    #[test]
    fn global_pruning_ranks_across_tensors_and_its_masks_reapply() {
        use burn::module::Module;
        let device = shrink_core::BackendKind::Flex.device().unwrap();
        let g = shrink_core::zoo::ModelSpec::Lenet5.build([1, 28, 28], 10, 0, &device).unwrap();
        // Zeros before pruning: the conv biases start at zero.
        let before = shrink_core::metrics::model_stats(&g).unwrap();
        let (pruned, mut masks) = prune_global(g, 0.7).unwrap();
        let stats = shrink_core::metrics::model_stats(&pruned).unwrap();
        let weights: usize = stats.params - (6 + 16 + 120 + 84 + 10);
        let zeros = |s: &shrink_core::metrics::ModelStats| s.params - s.nonzeros;
        assert_eq!(zeros(&stats) - zeros(&before), (0.7 * weights as f64).floor() as usize);
        // One threshold: the layers end at different sparsities.
        let sp: Vec<f64> = stats.layers.iter().map(|l| 1.0 - l.nonzeros as f64 / l.params as f64).collect();
        assert!(sp.iter().any(|s| (s - 0.7).abs() > 0.05), "{sp:?}");
        assert_eq!(masks.len(), 5);
        // Weights that come back (as an optimiser step would move them) are zeroed again.
        struct Shift;
        impl ModuleMapper for Shift {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                if D < 2 { param } else { param.map(|t| t.add_scalar(0.5)) }
            }
        }
        let revived = pruned.clone().map(&mut Shift);
        assert_eq!(zeros(&shrink_core::metrics::model_stats(&revived).unwrap()), zeros(&before));
        let again = revived.map(&mut masks);
        assert_eq!(zeros(&shrink_core::metrics::model_stats(&again).unwrap()), zeros(&stats));
        // The per-parameter report of any module sees the same: weights sparse, biases not.
        let report = shrink_core::metrics::param_report(&pruned).unwrap();
        let fc1 = report.iter().find(|r| r.path == "nodes.8.params.Linear.weight").expect("fc1's weight");
        assert_eq!(fc1.shape, [120, 400]);
        assert!(fc1.sparsity() > 0.5, "{fc1:?}");
        assert!(fc1.min < 0.0 && fc1.max > 0.0 && fc1.bytes == 4 * 48_000);
        assert!(report.iter().filter(|r| r.shape.len() == 1).all(|r| r.nonzeros + 22 >= r.values));
        assert!(prune_global(again, 1.0).is_err());
    }
}
