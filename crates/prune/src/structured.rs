//! Structured pruning: whole channels removed physically through the graph's coupling groups.

use serde::{Deserialize, Serialize};
use shrink_core::Graph;
use shrink_core::graph::CouplingGroup;

use crate::importance::{TaylorStats, channel_scores};
use crate::scope::{Rules, Share, ascending, global_counts};
use crate::{Error, PruneSettings};

/// What structured pruning did to one coupling group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupPlan {
    /// Index in the graph's [`Graph::coupling_groups`].
    pub group: usize,
    /// The producers of the group's channels (conv filters or linear neurons), by name.
    pub producers: Vec<String>,
    /// Channels before this pruning.
    pub channels: usize,
    /// The channels kept, ascending.
    pub keep: Vec<usize>,
}

/// The prunable groups of `graph` and their share under the settings' rules (matched against
/// each group's producer names).
pub(crate) fn channel_units(
    graph: &Graph,
    groups: &[CouplingGroup],
    settings: &PruneSettings,
) -> Result<Vec<(usize, Share)>, Error> {
    let prunable: Vec<usize> = (0..groups.len()).filter(|&g| groups[g].prunable).collect();
    let names: Vec<String> =
        prunable.iter().flat_map(|&g| groups[g].producers().map(|p| graph.nodes[p].name.clone())).collect();
    let rules = Rules::new(settings, &names)?;
    Ok(prunable
        .into_iter()
        .map(|g| {
            let names: Vec<&str> = groups[g].producers().map(|p| graph.nodes[p].name.as_str()).collect();
            (g, rules.share(names.iter().copied()))
        })
        .collect())
}

/// Chooses the channels each prunable group keeps so that the settings' sparsity (each passed
/// through `now`, as for [`crate::weight_masks`]) of the channels are gone, counted against
/// `original[g]`, each group's channel count before any pruning (a later round of
/// an iterative schedule removes what is still missing). Per group, or globally over the groups
/// in the budget with scores normalised by each group's mean (so that wide and narrow groups
/// compete fairly, as Torch-Pruning does), within the per-group bounds; every group keeps at
/// least one channel, rounded up to a multiple of `settings.round_to`.
///
/// # Errors
/// [`Error::Setting`] for rules that match nothing or a criterion that cannot rank a group.
pub fn plan_channels(
    graph: &Graph,
    groups: &[CouplingGroup],
    settings: &PruneSettings,
    now: &dyn Fn(f64) -> f64,
    original: &[usize],
    taylor: Option<&TaylorStats>,
) -> Result<Vec<GroupPlan>, Error> {
    let units = channel_units(graph, groups, settings)?;
    let sparsity = now(settings.sparsity);
    // How many channels each group should have lost in total, against its original count.
    let removals = |g: usize, s: f64| -> usize {
        let target = (s * original[g] as f64).floor() as usize;
        let already = original[g] - groups[g].channels;
        target.saturating_sub(already).min(groups[g].channels - 1)
    };
    let mut plans = Vec::new();
    let mut budget: Vec<(usize, Vec<f32>)> = Vec::new();
    for &(g, share) in &units {
        let group = &groups[g];
        match share {
            Share::Skip => {}
            Share::Fixed(s) => {
                let scores = channel_scores(graph, group, settings.criterion, taylor, settings.seed)?;
                plans.push(plan(graph, g, group, &scores, removals(g, now(s)), settings.round_to));
            }
            Share::Budget if !settings.global => {
                let scores = channel_scores(graph, group, settings.criterion, taylor, settings.seed)?;
                plans.push(plan(graph, g, group, &scores, removals(g, sparsity), settings.round_to));
            }
            Share::Budget => {
                let mut scores = channel_scores(graph, group, settings.criterion, taylor, settings.seed)?;
                let mean = scores.iter().sum::<f32>() / scores.len() as f32;
                if mean > 0.0 {
                    scores.iter_mut().for_each(|s| *s /= mean);
                }
                budget.push((g, scores));
            }
        }
    }
    if !budget.is_empty() {
        let original_total: usize = budget.iter().map(|(g, _)| original[*g]).sum();
        let current_total: usize = budget.iter().map(|(g, _)| groups[*g].channels).sum();
        let target =
            ((sparsity * original_total as f64).floor() as usize).saturating_sub(original_total - current_total);
        let bound = |g: usize, s: f64| {
            ((s * original[g] as f64).floor() as usize)
                .saturating_sub(original[g] - groups[g].channels)
                .min(groups[g].channels - 1)
        };
        let min: Vec<usize> = budget.iter().map(|(g, _)| bound(*g, now(settings.min_layer_sparsity))).collect();
        let max: Vec<usize> = budget.iter().map(|(g, _)| bound(*g, now(settings.max_layer_sparsity))).collect();
        let refs: Vec<&[f32]> = budget.iter().map(|(_, s)| s.as_slice()).collect();
        let counts = global_counts(&refs, &min, &max, target);
        for ((g, scores), k) in budget.iter().zip(counts) {
            plans.push(plan(graph, *g, &groups[*g], scores, k, settings.round_to));
        }
    }
    plans.sort_by_key(|p| p.group);
    Ok(plans)
}

/// The plan that removes the `remove` least important channels of group `g` alone.
pub(crate) fn plan_one(
    graph: &Graph,
    g: usize,
    group: &CouplingGroup,
    settings: &PruneSettings,
    taylor: Option<&TaylorStats>,
    remove: usize,
) -> Result<GroupPlan, Error> {
    let scores = channel_scores(graph, group, settings.criterion, taylor, settings.seed)?;
    Ok(plan(graph, g, group, &scores, remove, settings.round_to))
}

fn plan(graph: &Graph, g: usize, group: &CouplingGroup, scores: &[f32], remove: usize, round_to: usize) -> GroupPlan {
    let n = group.channels;
    let kept = (n - remove).max(1).div_ceil(round_to) * round_to;
    let remove = n - kept.min(n);
    let mut keep: Vec<usize> = ascending(scores)[remove..].to_vec();
    keep.sort_unstable();
    GroupPlan {
        group: g,
        producers: group.producers().map(|p| graph.nodes[p].name.clone()).collect(),
        channels: n,
        keep,
    }
}

/// Removes the channels `plans` drop: see [`Graph::keep_channels`]. Plans that keep every
/// channel are skipped.
///
/// # Errors
/// As [`Graph::keep_channels`].
pub fn remove_channels(graph: &Graph, groups: &[CouplingGroup], plans: &[GroupPlan]) -> Result<Graph, Error> {
    let keep: Vec<(usize, Vec<usize>)> =
        plans.iter().filter(|p| p.keep.len() < p.channels).map(|p| (p.group, p.keep.clone())).collect();
    Ok(graph.keep_channels(groups, &keep)?)
}
