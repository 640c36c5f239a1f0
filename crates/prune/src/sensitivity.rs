//! Sensitivity analysis: each layer (or channel group) pruned alone at several ratios, without
//! fine-tuning, and measured; the most sensitive ones are where pruning hurts. From it, per-layer
//! ratios for an accuracy budget: each layer gets the largest ratio that costs at most the
//! budget on its own (as NNI's sensitivity pruner does).

use serde::{Deserialize, Serialize};
use shrink_core::Graph;
use shrink_core::train::TrainData;

use crate::importance::weight_scores;
use crate::masks::{LayerMask, Masks, keep_after_removing, n_of_m_mask, taylor_if_needed, weight_units};
use crate::scope::Share;
use crate::structured::{channel_units, plan_one, remove_channels};
use crate::{Error, Granularity, PruneSettings, SparsityOverride};

/// Measures a pruned graph: `(top-1, loss)` on held-out data.
pub type Measure<'a> = dyn FnMut(&Graph) -> Result<(f64, f64), Error> + 'a;

/// How one layer (or channel group) responds to being pruned alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnitSensitivity {
    /// The layer, or a channel group's producers joined by `, `.
    pub name: String,
    /// The node name overrides match (a group's first producer).
    pub node: String,
    /// `(ratio, top-1, loss)` for each ratio tried.
    pub points: Vec<(f64, f64, f64)>,
}

/// Prunes each unit in scope alone at each of `ratios` (the settings' granularity, criterion and
/// skip list; N:M tries its one pattern) and measures the result with `measure`, which returns
/// `(top-1, loss)`. `data` feeds the Taylor criterion's gradients.
///
/// # Errors
/// [`Error::Setting`] for ratios outside `(0, 1)`; whatever pruning or `measure` returns.
pub fn sensitivity(
    graph: &Graph,
    data: TrainData<'_>,
    settings: &PruneSettings,
    ratios: &[f64],
    device: &burn::tensor::Device,
    measure: &mut Measure<'_>,
) -> Result<Vec<UnitSensitivity>, Error> {
    if let Some(r) = ratios.iter().find(|r| !(**r > 0.0 && **r < 1.0)) {
        return Err(Error::setting("sensitivity", format!("ratios must be in (0, 1), got {r}")));
    }
    let taylor = taylor_if_needed(graph, &data, settings, None, device, settings.seed)?;
    let mut out = Vec::new();
    match settings.granularity {
        Granularity::Channels => {
            let groups = graph.coupling_groups()?;
            for (g, share) in channel_units(graph, &groups, settings)? {
                if share == Share::Skip {
                    continue;
                }
                let producers: Vec<String> = groups[g].producers().map(|p| graph.nodes[p].name.clone()).collect();
                let mut points = Vec::new();
                for &r in ratios {
                    let remove = ((r * groups[g].channels as f64).floor() as usize).min(groups[g].channels - 1);
                    let plan = plan_one(graph, g, &groups[g], settings, taylor.as_ref(), remove)?;
                    let (top1, loss) = measure(&remove_channels(graph, &groups, &[plan])?)?;
                    points.push((r, top1, loss));
                }
                out.push(UnitSensitivity { name: producers.join(", "), node: producers[0].clone(), points });
            }
        }
        granularity => {
            let units: Vec<usize> = weight_units(graph, settings)?
                .into_iter()
                .filter(|(_, share)| *share != Share::Skip)
                .map(|(id, _)| id)
                .collect();
            let scores = weight_scores(graph, &units, settings.criterion, taylor.as_ref(), settings.seed)?;
            for id in units {
                let dims = graph.layer_weight_shape(id).expect("a weight layer");
                let s = &scores[&id];
                let tries: Vec<(f64, Option<Vec<bool>>)> = match granularity {
                    Granularity::NOfM { n, m } => {
                        let r = settings.final_sparsity();
                        vec![(r, n_of_m_mask(s, &dims, n, m, r))]
                    }
                    _ => ratios
                        .iter()
                        .map(|&r| (r, Some(keep_after_removing(s, (r * s.len() as f64).floor() as usize))))
                        .collect(),
                };
                let mut points = Vec::new();
                for (r, keep) in tries {
                    let Some(keep) = keep else { continue };
                    let name = graph.nodes[id].name.clone();
                    let masks = Masks { layers: vec![LayerMask { node: id, name, dims: dims.clone(), keep }] };
                    let (top1, loss) = measure(&masks.apply(graph))?;
                    points.push((r, top1, loss));
                }
                let name = graph.nodes[id].name.clone();
                out.push(UnitSensitivity { node: name.clone(), name, points });
            }
        }
    }
    Ok(out)
}

/// Per-unit sparsities for an accuracy budget: each unit gets the largest ratio whose top-1,
/// pruned alone, is at least `reference_top1 − max_drop` (none: it is not pruned), as overrides
/// that match the unit's node exactly.
pub fn ratios_for_drop(units: &[UnitSensitivity], reference_top1: f64, max_drop: f64) -> Vec<SparsityOverride> {
    units
        .iter()
        .map(|u| {
            let best = u
                .points
                .iter()
                .filter(|(_, top1, _)| *top1 >= reference_top1 - max_drop)
                .map(|(r, _, _)| *r)
                .fold(0.0, f64::max);
            SparsityOverride { pattern: regex::escape(&u.node), sparsity: best }
        })
        .collect()
}
