//! Unstructured and N:M masks over a graph's conv and linear weights.
//!
//! A mask is held beside the graph, not inside it: during fine-tuning the forward pass multiplies
//! each weight by its mask ([`MaskHooks`], through [`Graph::forward_with_hooks`]), so a pruned
//! weight gets no gradient and has no effect whatever the optimiser does to its latent value
//! (momentum, weight decay); [`Masks::apply`] multiplies the masks in at the end. Masks only
//! grow: a schedule's later, sparser mask keeps every weight an earlier one removed.

use std::collections::{BTreeMap, HashMap};

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use shrink_core::Graph;
use shrink_core::graph::{ForwardHooks, NodeId, Params};

use crate::importance::{TaylorStats, taylor_stats};
use crate::scope::{Rules, Share, ascending, global_counts, weight_layers};
use crate::{Criterion, Error, Granularity, PruneSettings};

/// The mask of one layer's weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerMask {
    /// The conv or linear node.
    pub node: NodeId,
    /// Its name.
    pub name: String,
    /// The weight's shape.
    pub dims: Vec<usize>,
    /// One flag per weight, in the weight's row-major order: true keeps it.
    pub keep: Vec<bool>,
}

impl LayerMask {
    /// Fraction of weights removed.
    pub fn sparsity(&self) -> f64 {
        self.keep.iter().filter(|k| !**k).count() as f64 / self.keep.len().max(1) as f64
    }
}

/// Masks of the pruned layers of a graph (layers left dense have none).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Masks {
    /// In node order.
    pub layers: Vec<LayerMask>,
}

impl Masks {
    /// Fraction of the masked layers' weights removed.
    pub fn sparsity(&self) -> f64 {
        let total: usize = self.layers.iter().map(|l| l.keep.len()).sum();
        let removed: usize = self.layers.iter().map(|l| l.keep.iter().filter(|k| !**k).count()).sum();
        removed as f64 / total.max(1) as f64
    }

    /// The mask of `node`, if it has one.
    pub fn get(&self, node: NodeId) -> Option<&LayerMask> {
        self.layers.iter().find(|l| l.node == node)
    }

    /// A copy of `graph` with every masked weight set to zero (+0.0: a product with the mask would
    /// leave −0.0 for negative weights, which model files keep as a value).
    pub fn apply(&self, graph: &Graph) -> Graph {
        let mut out = graph.clone();
        for l in &self.layers {
            match out.nodes[l.node].params.as_mut() {
                Some(Params::Conv(p)) => {
                    let removed = mask_tensor::<4>(l, &p.weight.device()).equal_elem(0.0);
                    p.weight = Param::from_tensor(p.weight.val().mask_fill(removed, 0.0));
                }
                Some(Params::Linear(p)) => {
                    let removed = mask_tensor::<2>(l, &p.weight.device()).equal_elem(0.0);
                    p.weight = Param::from_tensor(p.weight.val().mask_fill(removed, 0.0));
                }
                _ => unreachable!("masks are made for conv and linear layers"),
            }
        }
        out
    }

    /// Forward hooks that multiply each masked weight by its mask, with the masks on `device`.
    pub fn hooks(&self, device: &Device) -> MaskHooks {
        let mut hooks = MaskHooks::default();
        for l in &self.layers {
            if l.dims.len() == 4 {
                hooks.conv.insert(l.node, mask_tensor::<4>(l, device));
            } else {
                hooks.linear.insert(l.node, mask_tensor::<2>(l, device));
            }
        }
        hooks
    }
}

fn mask_tensor<const D: usize>(l: &LayerMask, device: &Device) -> Tensor<D> {
    let values: Vec<f32> = l.keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
    Tensor::from_data(TensorData::new(values, l.dims.clone()), device)
}

/// [`ForwardHooks`] that mask weights: pruned weights read as zero and get no gradient.
#[derive(Clone, Debug, Default)]
pub struct MaskHooks {
    conv: HashMap<NodeId, Tensor<4>>,
    linear: HashMap<NodeId, Tensor<2>>,
}

impl ForwardHooks for MaskHooks {
    fn conv_weight(&mut self, node: NodeId, w: Tensor<4>) -> Tensor<4> {
        match self.conv.get(&node) {
            Some(m) => w * m.clone(),
            None => w,
        }
    }
    fn linear_weight(&mut self, node: NodeId, w: Tensor<2>) -> Tensor<2> {
        match self.linear.get(&node) {
            Some(m) => w * m.clone(),
            None => w,
        }
    }
}

/// The layers weight pruning works on, with their share.
pub(crate) fn weight_units(graph: &Graph, settings: &PruneSettings) -> Result<Vec<(NodeId, Share)>, Error> {
    let layers = weight_layers(graph);
    let names: Vec<String> = layers.iter().map(|&id| graph.nodes[id].name.clone()).collect();
    let rules = Rules::new(settings, &names)?;
    Ok(layers.iter().map(|&id| (id, rules.share(std::iter::once(graph.nodes[id].name.as_str())))).collect())
}

/// Masks that remove the least important weights: the settings' sparsity of the weights of
/// every layer in scope (or of all of them together, with `settings.global`), the overrides'
/// sparsities, or N:M groups — each passed through `now`, which maps a final sparsity to the
/// sparsity reached at this point of a schedule (`&|s| s` prunes to the end at once; see
/// [`crate::PruneSchedule::sparsity_at`]). `scores` holds each layer's importance (see
/// [`crate::weight_scores`]); `previous` masks stay removed, so a schedule's masks only grow.
/// Exactly `floor(s · n)` weights are removed per layer (per pool, when global, unless the
/// bounds forbid it).
///
/// # Errors
/// [`Error::Setting`] for rules that match nothing or bad settings.
pub fn weight_masks(
    graph: &Graph,
    settings: &PruneSettings,
    now: &dyn Fn(f64) -> f64,
    scores: &BTreeMap<NodeId, Vec<f32>>,
    previous: Option<&Masks>,
) -> Result<Masks, Error> {
    let sparsity = now(settings.final_sparsity());
    let units = weight_units(graph, settings)?;
    // Removed weights score below anything alive.
    let score_of = |id: NodeId| -> Vec<f32> {
        let mut s = scores[&id].clone();
        if let Some(prev) = previous.and_then(|p| p.get(id)) {
            for (v, keep) in s.iter_mut().zip(&prev.keep) {
                if !keep {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        s
    };
    let mut layers = Vec::new();
    let mut make = |id: NodeId, keep: Vec<bool>| {
        let dims = graph.layer_weight_shape(id).expect("a weight layer");
        layers.push(LayerMask { node: id, name: graph.nodes[id].name.clone(), dims, keep });
    };
    if let Granularity::NOfM { n, m } = settings.granularity {
        for &(id, share) in &units {
            if share == Share::Skip {
                continue;
            }
            let s = score_of(id);
            let dims = graph.layer_weight_shape(id).expect("a weight layer");
            if let Some(keep) = n_of_m_mask(&s, &dims, n, m, sparsity) {
                make(id, keep);
            } else {
                tracing::warn!(layer = %graph.nodes[id].name, m, "input axis not a multiple of m: left dense");
            }
        }
        return Ok(Masks { layers });
    }
    let mut budget: Vec<(NodeId, Vec<f32>)> = Vec::new();
    for &(id, share) in &units {
        match share {
            Share::Skip => {}
            Share::Fixed(s) => {
                let sc = score_of(id);
                make(id, keep_after_removing(&sc, (now(s) * sc.len() as f64).floor() as usize));
            }
            Share::Budget if !settings.global => {
                let sc = score_of(id);
                make(id, keep_after_removing(&sc, (sparsity * sc.len() as f64).floor() as usize));
            }
            Share::Budget => budget.push((id, score_of(id))),
        }
    }
    if !budget.is_empty() {
        let lens: Vec<usize> = budget.iter().map(|(_, s)| s.len()).collect();
        let total: usize = lens.iter().sum();
        let (lo, hi) = (now(settings.min_layer_sparsity), now(settings.max_layer_sparsity));
        let min: Vec<usize> = lens.iter().map(|&n| (lo * n as f64).floor() as usize).collect();
        let max: Vec<usize> = lens.iter().map(|&n| (hi * n as f64).floor() as usize).collect();
        // Weights a previous mask removed are removed again whatever the bounds say.
        let min: Vec<usize> = budget
            .iter()
            .zip(&min)
            .map(|((_, s), &lo)| lo.max(s.iter().filter(|v| **v == f32::NEG_INFINITY).count()))
            .collect();
        let max: Vec<usize> = max.iter().zip(&min).map(|(&hi, &lo)| hi.max(lo)).collect();
        let refs: Vec<&[f32]> = budget.iter().map(|(_, s)| s.as_slice()).collect();
        let counts = global_counts(&refs, &min, &max, (sparsity * total as f64).floor() as usize);
        for ((id, s), k) in budget.iter().zip(counts) {
            make(*id, keep_after_removing(s, k));
        }
    }
    layers.sort_by_key(|l| l.node);
    Ok(Masks { layers })
}

/// Keep flags after removing the `remove` lowest scores (ties by position).
pub(crate) fn keep_after_removing(scores: &[f32], remove: usize) -> Vec<bool> {
    let mut keep = vec![true; scores.len()];
    for &i in &ascending(scores)[..remove.min(scores.len())] {
        keep[i] = false;
    }
    keep
}

/// The N:M mask of a weight `[out, in, kh, kw]` or `[out, in]`: in every run of `m` consecutive
/// input channels at the same output channel and kernel position, the `n` highest scores stay.
/// During a schedule (`sparsity` below `1 − n/m`) each group keeps proportionally more:
/// `m − round(sparsity · m)`, never fewer than `n`. `None` if `in` is not a multiple of `m`.
pub fn n_of_m_mask(scores: &[f32], dims: &[usize], n: usize, m: usize, sparsity: f64) -> Option<Vec<bool>> {
    let (out, inp) = (dims[0], dims[1]);
    let spatial: usize = dims[2..].iter().product();
    if inp % m != 0 {
        return None;
    }
    let kept = (m - (sparsity * m as f64).round() as usize).max(n);
    let mut keep = vec![true; scores.len()];
    let mut idx = Vec::with_capacity(m);
    for o in 0..out {
        for g in 0..inp / m {
            for pos in 0..spatial {
                idx.clear();
                idx.extend((0..m).map(|j| (o * inp + g * m + j) * spatial + pos));
                idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
                for &i in &idx[..m - kept] {
                    keep[i] = false;
                }
            }
        }
    }
    Some(keep)
}

/// The Taylor statistics the settings' criterion needs (none for the other criteria), from
/// `settings.taylor_batches` batches of 64 training images without augmentation, with `masks`
/// applied in the forward pass.
pub(crate) fn taylor_if_needed(
    graph: &Graph,
    data: &shrink_core::train::TrainData<'_>,
    settings: &PruneSettings,
    masks: Option<&Masks>,
    device: &Device,
    seed: u64,
) -> Result<Option<TaylorStats>, Error> {
    if settings.criterion != Criterion::Taylor {
        return Ok(None);
    }
    let ad = device.clone().autodiff();
    let order = shrink_core::data::shuffled(data.train.len(), seed ^ 0x007A_710E);
    let batches: Vec<_> =
        order.chunks(64).take(settings.taylor_batches).map(|c| data.batcher.batch(data.train, c, &ad, None)).collect();
    let mut hooks = masks.map(|m| m.hooks(&ad)).unwrap_or_default();
    Ok(Some(taylor_stats(graph, &mut batches.into_iter(), &ad, &mut hooks)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn n_of_m_keeps_the_largest_of_each_group_along_the_input_axis() {
        // [out 1, in 4, 1, 2]: groups run over the input axis at each kernel position.
        let s = [0.1f32, 9.0, 0.4, 8.0, 0.3, 7.0, 0.2, 6.0];
        let keep = n_of_m_mask(&s, &[1, 4, 1, 2], 2, 4, 0.5).unwrap();
        // Position 0 holds 0.1, 0.4, 0.3, 0.2 → keep 0.4 and 0.3; position 1 keeps 9 and 8.
        assert_eq!(keep, [false, true, true, true, true, false, false, false]);
        assert!(n_of_m_mask(&s, &[2, 3], 2, 4, 0.5).is_none());
    }

    #[test]
    fn masked_weights_get_no_gradient() {
        use burn::module::Module;
        let device = shrink_core::BackendKind::Flex.device().unwrap().autodiff();
        let g = shrink_core::zoo::ModelSpec::Mlp { hidden: vec![8] }.build([1, 2, 2], 3, 0, &device).unwrap();
        let fc1 = g.node_id("fc1").unwrap();
        let keep: Vec<bool> = (0..8 * 4).map(|i| i % 3 != 0).collect();
        let masks =
            Masks { layers: vec![LayerMask { node: fc1, name: "fc1".into(), dims: vec![8, 4], keep: keep.clone() }] };
        let g = g.fork(&device);
        let x = Tensor::<4>::ones([2, 1, 2, 2], &device);
        let y = g.forward_with_hooks(x, &[], &mut masks.hooks(&device)).0;
        let grads = y.sum().backward();
        let Some(Params::Linear(p)) = &g.nodes[fc1].params else { panic!("fc1 is linear") };
        let grad: Vec<f32> = p.weight.val().grad(&grads).unwrap().into_data().try_to_vec().unwrap();
        for (g, k) in grad.iter().zip(&keep) {
            assert!(*k || *g == 0.0);
        }
        assert!(grad.iter().zip(&keep).any(|(g, k)| *k && *g != 0.0));
    }
}
