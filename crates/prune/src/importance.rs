//! Importance of weights and channels: magnitude, norms, batch-norm γ, first-order Taylor and
//! a random control.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::{Device, Gradients, Int, Tensor};
use shrink_core::Graph;
use shrink_core::graph::{ChannelRole, CouplingGroup, ForwardHooks, NodeId, Params};
use shrink_core::host::floats;
use shrink_core::train::cross_entropy;

use crate::{Criterion, Error};

/// `w · ∂L/∂w` for every value of parameter `w` (0 where it has no gradient).
fn products<const D: usize>(w: Tensor<D>, grads: &Gradients) -> Result<Vec<f32>, Error> {
    let g = w.grad(grads).map(floats).transpose()?;
    let w = floats(w)?;
    Ok(match g {
        Some(g) => w.iter().zip(&g).map(|(w, g)| w * g).collect(),
        None => vec![0.0; w.len()],
    })
}

/// A deterministic stream of uniform numbers in [0, 1) (SplitMix64), for the random control.
pub(crate) fn uniform(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// First-order Taylor statistics of a graph, accumulated over training batches.
#[derive(Clone, Debug, Default)]
pub struct TaylorStats {
    /// Per conv/linear node: mean over batches of `(w·∂L/∂w)²`, per weight.
    pub weights: BTreeMap<NodeId, Vec<f32>>,
    /// Per batch, per parameterised node: `Σ w·∂L/∂w` over each output channel's parameters
    /// (filter and bias; for a batch norm, `γ·∂L/∂γ + β·∂L/∂β`).
    pub channels: Vec<BTreeMap<NodeId, Vec<f32>>>,
}

/// Accumulates [`TaylorStats`] of `graph` over `batches` (images and labels on `device`, which
/// must be an autodiff device), with cross-entropy as the loss and the batch norms in training
/// mode; `hooks` are applied in the forward pass (pruning masks), so masked weights score 0.
///
/// # Errors
/// [`Error::NonFinite`] if the loss is NaN or infinite.
pub fn taylor_stats(
    graph: &Graph,
    batches: &mut dyn Iterator<Item = (Tensor<4>, Tensor<1, Int>)>,
    device: &Device,
    hooks: &mut dyn ForwardHooks,
) -> Result<TaylorStats, Error> {
    let model = graph.clone().fork(device).train();
    let mut stats = TaylorStats::default();
    let mut count = 0usize;
    for (b, (images, labels)) in batches.enumerate() {
        let logits = model.forward_with_hooks(images, &[], hooks).0;
        let loss = cross_entropy(logits, labels);
        let value: f32 = loss.clone().into_scalar();
        if !value.is_finite() {
            return Err(Error::NonFinite(format!("the Taylor criterion's loss is {value} at batch {}", b + 1)));
        }
        let grads = loss.backward();
        let mut per_channel = BTreeMap::new();
        for (id, node) in model.nodes.iter().enumerate() {
            match &node.params {
                Some(Params::Conv(p)) => {
                    let wg = products(p.weight.val(), &grads)?;
                    let bg = p.bias.as_ref().map(|b| products(b.val(), &grads)).transpose()?;
                    accumulate(&mut stats, &mut per_channel, id, &wg, bg.as_deref(), p.weight.dims()[0]);
                }
                Some(Params::Linear(p)) => {
                    let wg = products(p.weight.val(), &grads)?;
                    let bg = p.bias.as_ref().map(|b| products(b.val(), &grads)).transpose()?;
                    accumulate(&mut stats, &mut per_channel, id, &wg, bg.as_deref(), p.weight.dims()[0]);
                }
                Some(Params::BatchNorm(bn)) => {
                    let gg = products(bn.gamma.val(), &grads)?;
                    let bb = products(bn.beta.val(), &grads)?;
                    per_channel.insert(id, gg.iter().zip(&bb).map(|(a, b)| a + b).collect());
                }
                None => {}
            }
        }
        stats.channels.push(per_channel);
        count += 1;
    }
    if count == 0 {
        return Err(Error::setting("taylor_batches", "no training batch to measure gradients on"));
    }
    for v in stats.weights.values_mut() {
        v.iter_mut().for_each(|x| *x /= count as f32);
    }
    Ok(stats)
}

fn accumulate(
    stats: &mut TaylorStats,
    per_channel: &mut BTreeMap<NodeId, Vec<f32>>,
    id: NodeId,
    wg: &[f32],
    bg: Option<&[f32]>,
    out: usize,
) {
    let acc = stats.weights.entry(id).or_insert_with(|| vec![0.0; wg.len()]);
    acc.iter_mut().zip(wg).for_each(|(a, x)| *a += x * x);
    let per = wg.len() / out;
    let sums = (0..out).map(|c| wg[c * per..(c + 1) * per].iter().sum::<f32>() + bg.map_or(0.0, |b| b[c])).collect();
    per_channel.insert(id, sums);
}

/// The importance of every weight of the conv and linear layers `layers`: `|w|` (l1, l2),
/// the Taylor statistic, or random numbers.
///
/// # Errors
/// [`Error::Setting`] for bn_gamma (a channel criterion), or Taylor without statistics.
pub fn weight_scores(
    graph: &Graph,
    layers: &[NodeId],
    criterion: Criterion,
    taylor: Option<&TaylorStats>,
    seed: u64,
) -> Result<BTreeMap<NodeId, Vec<f32>>, Error> {
    let mut out = BTreeMap::new();
    for &id in layers {
        let (w, _) = graph.layer_weight(id)?.expect("weight layers are conv or linear");
        let scores = match criterion {
            Criterion::L1 | Criterion::L2 => w.iter().map(|v| v.abs()).collect(),
            Criterion::Taylor => taylor
                .and_then(|t| t.weights.get(&id).cloned())
                .ok_or_else(|| Error::setting("criterion", "taylor needs gradient statistics"))?,
            Criterion::Random => uniform(seed.wrapping_add(id as u64 * 0x1000_0001), w.len()),
            Criterion::BnGamma => return Err(Error::setting("criterion", "bn_gamma ranks channels, not weights")),
        };
        out.insert(id, scores);
    }
    Ok(out)
}

/// The importance of each channel of `group`, summed over the producers (and depthwise or
/// batch-norm followers) that carry it: filter L1 or L2 norms, |γ|, the Taylor statistic
/// `mean over batches of (Σ w·∂L/∂w)²`, or random numbers.
///
/// # Errors
/// [`Error::Setting`] for bn_gamma on a group without a batch norm, or Taylor without statistics.
pub fn channel_scores(
    graph: &Graph,
    group: &CouplingGroup,
    criterion: Criterion,
    taylor: Option<&TaylorStats>,
    seed: u64,
) -> Result<Vec<f32>, Error> {
    let n = group.channels;
    let carriers = || group.members.iter().filter(|m| !matches!(m.role, ChannelRole::Consumes { .. }));
    let mut scores = vec![0.0f32; n];
    match criterion {
        Criterion::L1 | Criterion::L2 => {
            for m in carriers() {
                let Some((w, dims)) = graph.layer_weight(m.node)? else { continue };
                let per = w.len() / dims[0];
                for (c, s) in scores.iter_mut().enumerate() {
                    let row = m.offset + c;
                    let f = &w[row * per..(row + 1) * per];
                    *s += if criterion == Criterion::L1 {
                        f.iter().map(|v| v.abs()).sum::<f32>()
                    } else {
                        f.iter().map(|v| v * v).sum::<f32>().sqrt()
                    };
                }
            }
        }
        Criterion::BnGamma => {
            let mut found = false;
            for m in carriers() {
                if let Some(Params::BatchNorm(bn)) = &graph.nodes[m.node].params {
                    found = true;
                    let gamma = floats(bn.gamma.val())?;
                    scores.iter_mut().zip(&gamma[m.offset..]).for_each(|(s, g)| *s += g.abs());
                }
            }
            if !found {
                let name = &graph.nodes[group.carriers[0]].name;
                return Err(Error::setting(
                    "criterion",
                    format!("bn_gamma: the channels of `{name}` pass through no batch norm"),
                ));
            }
        }
        Criterion::Taylor => {
            let t = taylor.ok_or_else(|| Error::setting("criterion", "taylor needs gradient statistics"))?;
            for batch in &t.channels {
                let mut sums = vec![0.0f32; n];
                for m in carriers() {
                    if let Some(v) = batch.get(&m.node) {
                        sums.iter_mut().zip(&v[m.offset..]).for_each(|(s, x)| *s += x);
                    }
                }
                scores.iter_mut().zip(&sums).for_each(|(s, x)| *s += x * x);
            }
            scores.iter_mut().for_each(|s| *s /= t.channels.len() as f32);
        }
        Criterion::Random => {
            let first = group.carriers[0] as u64;
            scores = uniform(seed.wrapping_add(first * 0x1000_0001), n);
        }
    }
    Ok(scores)
}
