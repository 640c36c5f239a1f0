//! Which layers a pass touches, and at what sparsity: skip lists, overrides, and the exact
//! selection of the least important entries — per layer, or globally within per-layer bounds.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use regex::Regex;
use shrink_core::Graph;
use shrink_core::graph::{NodeId, Op};

use crate::{Error, PruneSettings};

/// The anchored regex of a pattern, or an error naming the setting.
pub(crate) fn pattern(key: &str, p: &str) -> Result<Regex, Error> {
    Regex::new(&format!("^(?:{p})$")).map_err(|e| Error::setting(key, format!("`{p}` is not a valid regex: {e}")))
}

/// The conv and linear layers of `graph`, in order.
pub(crate) fn weight_layers(graph: &Graph) -> Vec<NodeId> {
    graph.layers().filter(|(_, n)| matches!(n.op, Op::Conv2d { .. } | Op::Linear { .. })).map(|(id, _)| id).collect()
}

/// How a unit (a layer, or a channel group) is treated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Share {
    /// Left dense.
    Skip,
    /// Pruned to this sparsity, outside the global budget.
    Fixed(f64),
    /// Pruned to the settings' sparsity (per layer) or within the global budget.
    Budget,
}

/// The compiled skip list and overrides.
pub(crate) struct Rules {
    skip: Vec<Regex>,
    overrides: Vec<(Regex, f64)>,
}

impl Rules {
    /// Compiles the rules, checking that each one matches one of `names` (the units' names).
    pub(crate) fn new(settings: &PruneSettings, names: &[String]) -> Result<Self, Error> {
        let listing = || names.join(", ");
        let mut skip = Vec::new();
        for (i, p) in settings.skip.iter().enumerate() {
            let key = format!("skip[{i}]");
            let re = pattern(&key, p)?;
            if !names.iter().any(|n| re.is_match(n)) {
                return Err(Error::setting(&key, format!("`{p}` matches no prunable layer (they are: {})", listing())));
            }
            skip.push(re);
        }
        let mut overrides = Vec::new();
        for (i, o) in settings.overrides.iter().enumerate() {
            let key = format!("overrides[{i}].pattern");
            let re = pattern(&key, &o.pattern)?;
            if !names.iter().any(|n| re.is_match(n)) {
                return Err(Error::setting(
                    &key,
                    format!("`{}` matches no prunable layer (they are: {})", o.pattern, listing()),
                ));
            }
            overrides.push((re, o.sparsity));
        }
        Ok(Self { skip, overrides })
    }

    /// The share of a unit known by these names (a layer: its name; a channel group: the names of
    /// its producers). Skip wins over overrides; the first matching override wins.
    pub(crate) fn share<'a>(&self, names: impl Iterator<Item = &'a str> + Clone) -> Share {
        if names.clone().any(|n| self.skip.iter().any(|re| re.is_match(n))) {
            return Share::Skip;
        }
        for (re, s) in &self.overrides {
            if names.clone().any(|n| re.is_match(n)) {
                return Share::Fixed(*s);
            }
        }
        Share::Budget
    }
}

/// Indices of `scores` in ascending order of score, ties broken by position.
pub(crate) fn ascending(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order
}

/// How many entries each unit removes so that, in total, `target` are removed, taking the
/// globally least important first while unit `u` removes between `min[u]` and `max[u]`.
/// `scores[u]` are unit `u`'s scores; the result is exact unless the bounds forbid it.
pub(crate) fn global_counts(scores: &[&[f32]], min: &[usize], max: &[usize], target: usize) -> Vec<usize> {
    #[derive(PartialEq)]
    struct Next(f32, usize);
    impl Eq for Next {}
    impl PartialOrd for Next {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Next {
        // A min-heap on score, then on unit.
        fn cmp(&self, other: &Self) -> Ordering {
            other.0.total_cmp(&self.0).then(other.1.cmp(&self.1))
        }
    }
    let orders: Vec<Vec<usize>> = scores.iter().map(|s| ascending(s)).collect();
    let mut counts: Vec<usize> = min.to_vec();
    let mut taken: usize = counts.iter().sum();
    let mut heap = BinaryHeap::new();
    for (u, order) in orders.iter().enumerate() {
        if counts[u] < max[u] {
            heap.push(Next(scores[u][order[counts[u]]], u));
        }
    }
    while taken < target {
        let Some(Next(_, u)) = heap.pop() else { break };
        counts[u] += 1;
        taken += 1;
        if counts[u] < max[u] {
            heap.push(Next(scores[u][orders[u][counts[u]]], u));
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_counts_take_the_smallest_within_bounds() {
        let a = [0.1f32, 0.2, 0.3, 0.4];
        let b = [0.05f32, 0.5, 0.6, 0.7];
        // Unbounded: the four smallest are 0.05, 0.1, 0.2, 0.3.
        assert_eq!(global_counts(&[&a, &b], &[0, 0], &[4, 4], 4), [3, 1]);
        // Layer a may lose at most 2: the next smallest comes from b.
        assert_eq!(global_counts(&[&a, &b], &[0, 0], &[2, 4], 4), [2, 2]);
        // Layer b must lose at least 3.
        assert_eq!(global_counts(&[&a, &b], &[0, 3], &[4, 4], 4), [1, 3]);
    }
}
