//! Magnitude pruning of any burn module, as a [`ModuleMapper`].

use burn::module::{ModuleMapper, Param};
use burn::tensor::{Tensor, TensorData};

use crate::Error;

/// Zeroes, in each weight tensor, the `sparsity` fraction of entries with the smallest
/// magnitude (layer-wise magnitude pruning, Han et al. 2015).
#[derive(Clone, Debug)]
pub struct MagnitudePruner {
    sparsity: f64,
    /// Entries zeroed so far, over all tensors mapped.
    pub pruned: usize,
    /// Entries seen so far in pruned tensors.
    pub total: usize,
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
        Ok(Self { sparsity, pruned: 0, total: 0 })
    }
}

/// The mask (1 = keep) that removes the `sparsity` fraction of smallest-magnitude values.
/// Exactly `floor(sparsity * n)` entries are removed; ties are broken by position, so the
/// result is deterministic.
pub fn magnitude_mask(values: &[f32], sparsity: f64) -> Vec<f32> {
    let remove = (sparsity * values.len() as f64).floor() as usize;
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].abs().total_cmp(&values[b].abs()).then(a.cmp(&b)));
    let mut mask = vec![1.0; values.len()];
    for &i in &order[..remove] {
        mask[i] = 0.0;
    }
    mask
}

impl ModuleMapper for MagnitudePruner {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if D < 2 {
            return param;
        }
        let sparsity = self.sparsity;
        let mut pruned = 0;
        let mut total = 0;
        let param = param.map(|tensor| {
            let device = tensor.device();
            let shape = tensor.shape();
            let values: Vec<f32> = tensor.clone().into_data().convert::<f32>().try_to_vec().expect("f32 values");
            let mask = magnitude_mask(&values, sparsity);
            pruned = mask.iter().filter(|m| **m == 0.0).count();
            total = mask.len();
            let mask = Tensor::<D>::from_data(TensorData::new(mask, shape), &device);
            tensor * mask
        });
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
        use burn::module::Module;
        use shrink_core::graph::Params;
        let device = shrink_core::BackendKind::Flex.device().unwrap();
        let g = shrink_core::zoo::ModelSpec::Mlp { hidden: vec![16] }.build([1, 4, 4], 3, &device).unwrap();
        let mut pruner = MagnitudePruner::new(0.75).unwrap();
        let p = g.clone().map(&mut pruner);
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
}
