//! What to prune, how to rank it, how much and when.

use serde::{Deserialize, Serialize};

use crate::Error;

/// What one pruning decision removes. In configs: `"weights"`, `"channels"`, or `"N:M"` such
/// as `"2:4"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Granularity {
    /// Single weights of convolutions and linear layers (unstructured; masks).
    Weights,
    /// N:M semi-structured sparsity: in every run of `m` consecutive weights along a filter's
    /// input-channel axis (at each kernel position), at most `n` are kept (2:4, 4:8). The
    /// sparsity is then `1 − n/m`, not a setting.
    NOfM {
        /// Weights kept per group.
        n: usize,
        /// Group length.
        m: usize,
    },
    /// Whole channels — conv filters and linear neurons — removed physically, with everything
    /// coupled to them (batch norms, consumers, residual branches).
    Channels,
}

impl TryFrom<String> for Granularity {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "weights" => Ok(Granularity::Weights),
            "channels" => Ok(Granularity::Channels),
            other => {
                let parsed = other.split_once(':').and_then(|(n, m)| Some((n.parse().ok()?, m.parse().ok()?)));
                match parsed {
                    Some((n, m)) => Ok(Granularity::NOfM { n, m }),
                    None => {
                        Err(format!("expected \"weights\", \"channels\" or \"N:M\" such as \"2:4\", got {other:?}"))
                    }
                }
            }
        }
    }
}

impl From<Granularity> for String {
    fn from(g: Granularity) -> String {
        g.to_string()
    }
}

impl std::fmt::Display for Granularity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Granularity::Weights => f.write_str("weights"),
            Granularity::Channels => f.write_str("channels"),
            Granularity::NOfM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

/// How the importance of a weight or channel is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    /// |w| for weights; the L1 norm of a channel's filters (Li et al. 2017) for channels.
    L1,
    /// The L2 norm of a channel's filters (channels only; for weights it ranks as L1).
    L2,
    /// |γ| of the batch norms that follow the channel (Liu et al. 2017, network slimming).
    BnGamma,
    /// First-order Taylor expansion of the loss (Molchanov et al. 2019): `(Σ w·∂L/∂w)²` over a
    /// channel's parameters, or `|w·∂L/∂w|` for a weight, accumulated over training batches.
    Taylor,
    /// Uniformly random, seeded: the control every criterion should beat.
    Random,
}

/// A fixed sparsity for the layers (or, for channels, the groups produced by layers) whose
/// name matches `pattern`, outside the global budget. The first matching override wins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparsityOverride {
    /// Regular expression over node names (anchored: it must match the whole name).
    pub pattern: String,
    /// Sparsity of matching layers, in `[0, 1)`.
    pub sparsity: f64,
}

/// When pruning happens during the fine-tuning that follows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PruneSchedule {
    /// Everything at once, then fine-tuning.
    #[default]
    OneShot,
    /// `rounds` prunings, each followed by an equal share of the fine-tuning; round `k` of `R`
    /// reaches `1 − (1 − s)^(k/R)`, so each round removes the same share of what is left.
    Iterative {
        /// Number of pruning rounds (≥ 1).
        rounds: usize,
    },
    /// Lottery-ticket rewinding (Frankle & Carbin 2019): `rounds` times, prune the trained
    /// weights (each round removing the same share of what is left, as `iterative`), reset the
    /// survivors — and every other parameter — to their values at initialisation, and retrain
    /// for the fine-tuning's `epochs` with the mask. Weights and N:M only; needs the initial
    /// weights (the xtask rebuilds them from the experiment's seed, as the baseline began).
    Lottery {
        /// Prune–rewind–retrain rounds (≥ 1).
        rounds: usize,
    },
    /// Automated gradual pruning (Zhu & Gupta 2017): at `updates` evenly spaced points between
    /// `start_epoch` and `end_epoch`, sparsity `s_f + (s_i − s_f)(1 − k/updates)³`; the fine-tuning
    /// after `end_epoch` runs at the final sparsity. Weights and N:M only.
    Agp {
        /// Sparsity at the start, `s_i`.
        #[serde(default)]
        initial_sparsity: f64,
        /// Epoch (fractional) of the first update.
        #[serde(default)]
        start_epoch: f64,
        /// Epoch of the last update; default: three quarters of the epochs.
        #[serde(default)]
        end_epoch: Option<f64>,
        /// Number of sparsity increases.
        #[serde(default = "default_updates")]
        updates: usize,
    },
}

impl std::fmt::Display for PruneSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PruneSchedule::OneShot => f.write_str("one-shot"),
            PruneSchedule::Iterative { rounds } => write!(f, "iterative, {rounds} rounds"),
            PruneSchedule::Lottery { rounds } => {
                write!(f, "lottery ticket, {rounds} rounds of prune, rewind to initialisation, retrain")
            }
            PruneSchedule::Agp { initial_sparsity, start_epoch, end_epoch, updates } => {
                write!(f, "gradual (AGP) from {initial_sparsity} in {updates} steps, epoch {start_epoch} to ")?;
                match end_epoch {
                    Some(e) => write!(f, "{e}"),
                    None => f.write_str("¾ of the fine-tuning"),
                }
            }
        }
    }
}

impl std::fmt::Display for Criterion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Criterion::L1 => "L1 magnitude",
            Criterion::L2 => "L2 norm",
            Criterion::BnGamma => "batch-norm |γ|",
            Criterion::Taylor => "first-order Taylor",
            Criterion::Random => "random (control)",
        })
    }
}

fn default_updates() -> usize {
    10
}

/// Everything a pruning pass needs to know.
#[derive(Clone, Debug, PartialEq)]
pub struct PruneSettings {
    /// What is removed.
    pub granularity: Granularity,
    /// How importance is measured.
    pub criterion: Criterion,
    /// Fraction removed: of the weights (unstructured), or of the channels (structured) of the
    /// layers in scope.
    pub sparsity: f64,
    /// One threshold over all layers in scope (true), or the same sparsity in each (false).
    pub global: bool,
    /// With `global`: no layer (or channel group) is pruned below this sparsity…
    pub min_layer_sparsity: f64,
    /// …or above this one.
    pub max_layer_sparsity: f64,
    /// Layers left dense: regular expressions over node names (for channels: a group is left
    /// whole if any of its producers matches).
    pub skip: Vec<String>,
    /// Fixed sparsities for some layers.
    pub overrides: Vec<SparsityOverride>,
    /// Channels only: the number of channels each group keeps is rounded up to a multiple of
    /// this (1: exact), as SIMD kernels prefer.
    pub round_to: usize,
    /// Training batches the Taylor criterion accumulates gradients over.
    pub taylor_batches: usize,
    /// Seed of the random criterion, and of the training batches a sensitivity scan's Taylor
    /// statistics use ([`crate::prune`] draws its own from its `TrainRun`'s seed, with the data
    /// order of the fine-tuning).
    pub seed: u64,
}

impl Default for PruneSettings {
    fn default() -> Self {
        Self {
            granularity: Granularity::Weights,
            criterion: Criterion::L1,
            sparsity: 0.5,
            global: false,
            min_layer_sparsity: 0.0,
            max_layer_sparsity: 0.99,
            skip: Vec::new(),
            overrides: Vec::new(),
            round_to: 1,
            taylor_batches: 8,
            seed: 0,
        }
    }
}

impl PruneSettings {
    /// The sparsity pruning reaches: `sparsity`, or `1 − n/m` for N:M.
    pub fn final_sparsity(&self) -> f64 {
        match self.granularity {
            Granularity::NOfM { n, m } => 1.0 - n as f64 / m as f64,
            _ => self.sparsity,
        }
    }

    /// Checks every range; the error names the setting.
    ///
    /// # Errors
    /// [`Error::Setting`] naming the setting and what was expected.
    pub fn validate(&self) -> Result<(), Error> {
        let unit = |key: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::setting(key, format!("must be in [0, 1), got {v}")))
            }
        };
        unit("sparsity", self.sparsity)?;
        unit("min_layer_sparsity", self.min_layer_sparsity)?;
        if !(self.max_layer_sparsity > 0.0 && self.max_layer_sparsity < 1.0) {
            return Err(Error::setting(
                "max_layer_sparsity",
                format!("must be in (0, 1), got {}", self.max_layer_sparsity),
            ));
        }
        if self.min_layer_sparsity > self.max_layer_sparsity {
            return Err(Error::setting("min_layer_sparsity", "must not exceed max_layer_sparsity"));
        }
        if self.global && !(self.min_layer_sparsity..=self.max_layer_sparsity).contains(&self.sparsity) {
            return Err(Error::setting(
                "sparsity",
                format!("{} cannot be reached within [min_layer_sparsity, max_layer_sparsity]", self.sparsity),
            ));
        }
        for (i, o) in self.overrides.iter().enumerate() {
            unit(&format!("overrides[{i}].sparsity"), o.sparsity)?;
        }
        match self.granularity {
            Granularity::NOfM { n, m } if n == 0 || n >= m || m > 64 => {
                return Err(Error::setting("granularity", format!("N:M needs 0 < n < m ≤ 64, got {n}:{m}")));
            }
            Granularity::NOfM { .. } if self.global || !self.overrides.is_empty() => {
                return Err(Error::setting(
                    "granularity",
                    "N:M sparsity is the same in every layer: no global scope or overrides",
                ));
            }
            Granularity::Channels if self.round_to == 0 => {
                return Err(Error::setting("round_to", "must be at least 1"));
            }
            _ => {}
        }
        if self.criterion == Criterion::BnGamma && self.granularity != Granularity::Channels {
            return Err(Error::setting("criterion", "bn_gamma ranks channels; use l1 or taylor for weights"));
        }
        if self.criterion == Criterion::Taylor && self.taylor_batches == 0 {
            return Err(Error::setting("taylor_batches", "must be at least 1"));
        }
        Ok(())
    }
}

impl PruneSchedule {
    /// Checks the schedule against the fine-tuning length and the granularity.
    ///
    /// # Errors
    /// [`Error::Setting`] naming the field.
    pub fn validate(&self, epochs: usize, granularity: Granularity) -> Result<(), Error> {
        match *self {
            PruneSchedule::OneShot => Ok(()),
            PruneSchedule::Iterative { rounds } => {
                if rounds == 0 {
                    return Err(Error::setting("prune_schedule.rounds", "must be at least 1"));
                }
                if rounds > epochs.max(1) {
                    return Err(Error::setting(
                        "prune_schedule.rounds",
                        format!("{rounds} rounds need at least as many fine-tuning epochs, got {epochs}"),
                    ));
                }
                Ok(())
            }
            PruneSchedule::Lottery { rounds } => {
                if granularity == Granularity::Channels {
                    return Err(Error::setting(
                        "prune_schedule",
                        "lottery tickets rewind masked weights: use it for weights or N:M",
                    ));
                }
                if rounds == 0 || epochs == 0 {
                    return Err(Error::setting(
                        "prune_schedule.rounds",
                        "lottery tickets need at least one round and fine-tuning epochs to retrain",
                    ));
                }
                Ok(())
            }
            PruneSchedule::Agp { initial_sparsity, start_epoch, end_epoch, updates } => {
                if granularity == Granularity::Channels {
                    return Err(Error::setting(
                        "prune_schedule",
                        "agp changes the sparsity while training, which works on masks: use it for weights or N:M; channels are removed physically with one_shot or iterative",
                    ));
                }
                if !(0.0..1.0).contains(&initial_sparsity) {
                    return Err(Error::setting("prune_schedule.initial_sparsity", "must be in [0, 1)"));
                }
                if updates == 0 {
                    return Err(Error::setting("prune_schedule.updates", "must be at least 1"));
                }
                let end = end_epoch.unwrap_or(0.75 * epochs as f64);
                if !(start_epoch >= 0.0 && end > start_epoch && end <= epochs as f64) {
                    return Err(Error::setting(
                        "prune_schedule",
                        format!("needs 0 ≤ start_epoch < end_epoch ≤ epochs ({epochs}), got {start_epoch} and {end}"),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The pruning events over a fine-tuning of `epochs` epochs of `steps` steps each, as
    /// `(step, t)` pairs in order, where `t ∈ (0, 1]` is the schedule's position (1 at the last);
    /// [`PruneSchedule::sparsity_at`] turns a position into each layer's sparsity.
    pub fn events(&self, epochs: usize, steps: usize) -> Vec<(usize, f64)> {
        let total = epochs * steps;
        match *self {
            PruneSchedule::OneShot => vec![(0, 1.0)],
            PruneSchedule::Lottery { rounds } => {
                (1..=rounds).map(|k| ((k - 1) * total, k as f64 / rounds as f64)).collect()
            }
            PruneSchedule::Iterative { rounds } => {
                (1..=rounds).map(|k| ((k - 1) * total / rounds, k as f64 / rounds as f64)).collect()
            }
            PruneSchedule::Agp { start_epoch, end_epoch, updates, .. } => {
                let end = end_epoch.unwrap_or(0.75 * epochs as f64);
                // Position 0 prunes to the initial sparsity at the start.
                (0..=updates)
                    .map(|k| {
                        let t = k as f64 / updates as f64;
                        let epoch = start_epoch + t * (end - start_epoch);
                        ((epoch * steps as f64).round() as usize, t)
                    })
                    .filter(|&(_, t)| t > 0.0 || self.sparsity_at(0.0, 1.0) > 0.0)
                    .collect()
            }
        }
    }

    /// The sparsity a layer whose final sparsity is `target` has at position `t` of the
    /// schedule: the target itself for one-shot; `1 − (1 − target)^t` for iterative and lottery
    /// rounds (each removes the same share of what is left); AGP's cubic
    /// `s_f + (s_i − s_f)(1 − t)³`, with `s_i` capped at the target.
    pub fn sparsity_at(&self, t: f64, target: f64) -> f64 {
        match *self {
            PruneSchedule::OneShot => target,
            PruneSchedule::Iterative { .. } | PruneSchedule::Lottery { .. } => 1.0 - (1.0 - target).powf(t),
            PruneSchedule::Agp { initial_sparsity, .. } => {
                target + (initial_sparsity.min(target) - target) * (1.0 - t).powi(3)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agp_follows_the_cubic_and_ends_at_the_target() {
        let s = PruneSchedule::Agp { initial_sparsity: 0.0, start_epoch: 0.0, end_epoch: Some(8.0), updates: 4 };
        let ev = s.events(10, 100);
        // Position 0 has sparsity 0 and is dropped.
        let steps: Vec<usize> = ev.iter().map(|e| e.0).collect();
        assert_eq!(steps, [200, 400, 600, 800]);
        let expect = [0.9 * (1.0 - 0.75f64.powi(3)), 0.9 * (1.0 - 0.125), 0.9 * (1.0 - 0.25f64.powi(3)), 0.9];
        for (e, x) in ev.iter().zip(expect) {
            assert!((s.sparsity_at(e.1, 0.9) - x).abs() < 1e-12, "{e:?} vs {x}");
        }
        // A layer with its own final sparsity follows the same curve to its own target.
        assert!((s.sparsity_at(1.0, 0.5) - 0.5).abs() < 1e-12);
        assert!((s.sparsity_at(0.5, 0.5) - 0.5 * 0.875).abs() < 1e-12);
        // The sparsity never decreases.
        assert!(ev.windows(2).all(|w| s.sparsity_at(w[0].1, 0.9) <= s.sparsity_at(w[1].1, 0.9)));
    }

    #[test]
    fn iterative_rounds_remove_the_same_share_of_what_is_left() {
        let s = PruneSchedule::Iterative { rounds: 3 };
        let ev = s.events(6, 10);
        assert_eq!(ev.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 20, 40]);
        for (e, x) in ev.iter().zip([0.5, 0.75, 0.875]) {
            assert!((s.sparsity_at(e.1, 0.875) - x).abs() < 1e-12);
        }
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let bad = PruneSettings { sparsity: 1.5, ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("sparsity"));
        let nm = PruneSettings { granularity: Granularity::NOfM { n: 4, m: 4 }, ..Default::default() };
        assert!(nm.validate().unwrap_err().to_string().contains("N:M"));
        let agp = PruneSchedule::Agp { initial_sparsity: 0.0, start_epoch: 0.0, end_epoch: None, updates: 5 };
        assert!(agp.validate(4, Granularity::Channels).is_err());
        assert!(agp.validate(4, Granularity::Weights).is_ok());
        assert!(PruneSchedule::Iterative { rounds: 5 }.validate(4, Granularity::Channels).is_err());
    }
}
