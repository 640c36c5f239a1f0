//! Accuracy-driven search: the smallest, fastest or cheapest model within a tolerated accuracy
//! loss. The search file's schema and the two strategies, as functions over an `evaluate`
//! callback (the runner's runs a trial as an ordinary run; the tests give them made-up
//! accuracies):
//!
//! - **quantize**: Intel Neural Compressor's "basic" order. Every layer at the lowest width
//!   first (its per-layer sensitivity measured in that same trial), then the layers fall back
//!   one by one, most sensitive first, to the next width (and at last to float) until the
//!   tolerance holds; then each fallen-back layer, least sensitive first, is lowered again where
//!   the tolerance still holds.
//! - **prune**: the prune stage chooses each layer's ratio from its measured sensitivity
//!   (`sensitivity_max_drop`); the search raises that per-layer budget step by step while the
//!   tolerance holds, then halves the gap to the first step that failed.
//!
//! Decisions use validation top-1 (the test images stay unseen by every choice); the tolerance
//! is against the validation top-1 of the model before the searched stage.
//!
//! ```toml
//! name = "resnet_int_mixed"
//! base = "../resnet_int8.toml"
//! objective = "size"                      # size | latency | macs
//! tolerance = { absolute = 0.003 }        # or { relative = 0.005 }
//! max_trials = 40
//! timeout_minutes = 30
//! set = { "data.validation_fraction" = 0.1 }
//!
//! [quantize]                              # or [prune] (one of them)
//! stage = 1
//! bits = [4, 8]                           # lowest first; float is the last fallback
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sweep::{Base, FieldPath};

/// What the search makes small.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// The model file's bytes.
    Size,
    /// Median latency at batch 1 on the CPU plan that runs the model.
    Latency,
    /// Multiply-accumulates per image.
    Macs,
}

/// How much accuracy may be lost against the model before the searched stage.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Tolerance {
    /// Top-1 may drop by this much (0.003: 0.3 percentage points).
    Absolute(f64),
    /// Top-1 may drop by this fraction of the reference (0.005: 0.5 %).
    Relative(f64),
}

impl Tolerance {
    /// Whether `accuracy` is within the tolerance of `reference`.
    pub fn holds(self, reference: f64, accuracy: f64) -> bool {
        // A hair of slack: equal accuracies computed two ways must pass.
        let slack = 1e-9;
        match self {
            Tolerance::Absolute(d) => reference - accuracy <= d + slack,
            Tolerance::Relative(r) => reference - accuracy <= r * reference + slack,
        }
    }

    /// `0.3 pp` or `0.5 %`.
    pub fn describe(self) -> String {
        match self {
            Tolerance::Absolute(d) => format!("{} pp", fmt(d * 100.0)),
            Tolerance::Relative(r) => format!("{} % of the reference", fmt(r * 100.0)),
        }
    }
}

fn fmt(v: f64) -> String {
    format!("{}", (v * 1e6).round() / 1e6)
}

/// The search's moves.
#[derive(Clone, Debug, PartialEq)]
pub enum Strategy {
    /// Per-layer weight widths of the quantize stage `stage`: `bits`, lowest first, then float.
    Quantize { stage: usize, bits: Vec<u32> },
    /// The prune stage `stage`'s `sensitivity_max_drop`, raised through `max_drop`.
    Prune { stage: usize, max_drop: Vec<f64> },
}

/// A parsed search file.
#[derive(Clone, Debug, PartialEq)]
pub struct Search {
    pub source: PathBuf,
    pub name: String,
    pub base: Base,
    pub objective: Objective,
    pub tolerance: Tolerance,
    pub max_trials: usize,
    /// Minutes; no new trial starts after them (the running one finishes).
    pub timeout_minutes: Option<f64>,
    /// Fields every trial sets alike (fine-tuning budgets, the validation split).
    pub set: Vec<(FieldPath, toml::Value)>,
    pub strategy: Strategy,
    /// `[slurm]`: how `--slurm` submits each trial (flags override it).
    pub slurm: crate::slurm::SlurmSettings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchFile {
    name: Option<String>,
    base: toml::Value,
    objective: Objective,
    tolerance: Tolerance,
    max_trials: usize,
    timeout_minutes: Option<f64>,
    #[serde(default)]
    set: toml::Table,
    quantize: Option<QuantizeFile>,
    prune: Option<PruneFile>,
    #[serde(default)]
    slurm: crate::slurm::SlurmSettings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuantizeFile {
    stage: usize,
    bits: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneFile {
    stage: usize,
    max_drop: Vec<f64>,
}

impl Search {
    /// Parses a search file's text strictly; errors name the file and the line or key.
    ///
    /// # Errors
    /// Unknown keys, a bad base or `set`, a tolerance outside (0, 1), no or both strategies,
    /// bits outside 2–8 or not increasing, budgets of 0, drops outside (0, 1) or not
    /// increasing.
    pub fn parse(text: &str, path: &Path) -> Result<Search, String> {
        let file: SearchFile = crate::sweep::parse_strict(text, path)?;
        let fail = |message: String| format!("{}: {message}", path.display());
        let name = crate::sweep::name_or_stem(file.name, path).map_err(fail)?;
        let base = crate::sweep::base_of(file.base, path).map_err(fail)?;
        let t = match file.tolerance {
            Tolerance::Absolute(v) | Tolerance::Relative(v) => v,
        };
        if !(t > 0.0 && t < 1.0) {
            return Err(fail(format!("key `tolerance`: a top-1 loss in (0, 1), got {t} (0.003 is 0.3 pp)")));
        }
        if file.max_trials == 0 {
            return Err(fail("key `max_trials`: 0; give at least 1".into()));
        }
        if let Some(m) = file.timeout_minutes
            && !(m > 0.0 && m.is_finite())
        {
            return Err(fail(format!("key `timeout_minutes`: a positive number of minutes, got {m}")));
        }
        let set = crate::sweep::set_of(file.set).map_err(fail)?;
        let strategy = match (file.quantize, file.prune) {
            (Some(q), None) => {
                if q.bits.is_empty()
                    || q.bits.iter().any(|b| !(2..=8).contains(b))
                    || !q.bits.is_sorted_by(|a, b| a < b)
                {
                    return Err(fail(format!(
                        "key `quantize.bits`: weight widths from 2 to 8, lowest first, each once; got {:?}",
                        q.bits
                    )));
                }
                Strategy::Quantize { stage: q.stage, bits: q.bits }
            }
            (None, Some(p)) => {
                if p.max_drop.is_empty()
                    || p.max_drop.iter().any(|d| !(*d > 0.0 && *d < 1.0))
                    || !p.max_drop.is_sorted_by(|a, b| a < b)
                {
                    return Err(fail(format!(
                        "key `prune.max_drop`: per-layer top-1 budgets in (0, 1), increasing; got {:?}",
                        p.max_drop
                    )));
                }
                Strategy::Prune { stage: p.stage, max_drop: p.max_drop }
            }
            _ => return Err(fail("give one strategy: a [quantize] or a [prune] table".into())),
        };
        file.slurm.validate().map_err(fail)?;
        Ok(Search {
            source: path.to_path_buf(),
            name,
            base,
            objective: file.objective,
            tolerance: file.tolerance,
            max_trials: file.max_trials,
            timeout_minutes: file.timeout_minutes,
            set,
            strategy,
            slurm: file.slurm,
        })
    }

    /// Reads and parses a search file.
    ///
    /// # Errors
    /// As [`Search::parse`], or the file cannot be read.
    pub fn load(path: &Path) -> Result<Search, String> {
        let text = crate::sweep::read_text(path)?;
        Search::parse(&text, path)
    }
}

/// A width of a layer in the quantize strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Width {
    Bits(u32),
    Float,
}

impl std::fmt::Display for Width {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Width::Bits(b) => write!(f, "int{b}"),
            Width::Float => f.write_str("float"),
        }
    }
}

/// A trial the strategy asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    /// The fields the trial changes in the base config (after the search's `set`).
    pub changes: Vec<(FieldPath, toml::Value)>,
    /// Why this trial, in a few words.
    pub why: String,
    /// Measure the quantize stage's per-layer sensitivity (the first quantize trial).
    pub wants_sensitivity: bool,
}

/// What a trial measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Validation top-1 of the result (on the kernels that run it).
    pub accuracy: f64,
    /// Validation top-1 of the model before the searched stage.
    pub reference: f64,
    /// The objective's value (smaller is better).
    pub cost: f64,
    /// The quantize stage's layers, most sensitive first, when it measured them.
    pub sensitivity: Vec<String>,
}

/// The end of a search: why it stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// The strategy ran out of moves.
    Finished,
    /// `max_trials` trials ran.
    MaxTrials,
    /// The timeout passed.
    Timeout,
}

/// The callback that runs a trial: `None` when the budget is spent (nothing ran), else the
/// outcome, or an error that ends the search.
pub type Evaluate<'a> = dyn FnMut(&Proposal) -> Result<Option<Outcome>, String> + 'a;

/// Runs the strategy with `evaluate`; returns why it stopped.
///
/// # Errors
/// From `evaluate`, or a first quantize trial that measured no layer.
pub fn run(search: &Search, evaluate: &mut Evaluate<'_>) -> Result<Stop, String> {
    match &search.strategy {
        Strategy::Quantize { stage, bits } => quantize(*stage, bits, search.tolerance, evaluate),
        Strategy::Prune { stage, max_drop } => prune(*stage, max_drop, search.tolerance, evaluate),
    }
}

/// The quantize stage's changes for per-layer widths: the lowest width for the stage, and an
/// override (an anchored pattern of the layer's name) for each layer above it.
pub fn quantize_changes(
    stage: usize,
    bits: &[u32],
    widths: &[(String, Width)],
    sensitivity: bool,
) -> Vec<(FieldPath, toml::Value)> {
    let at = |key: &str| FieldPath::parse(&format!("stages[{stage}].{key}")).expect("a field path");
    let overrides: Vec<toml::Value> = widths
        .iter()
        .filter(|(_, w)| *w != Width::Bits(bits[0]))
        .map(|(name, w)| {
            let mut t = toml::Table::new();
            t.insert("pattern".into(), format!("^{}$", regex::escape(name)).into());
            match w {
                Width::Bits(b) => t.insert("weight_bits".into(), i64::from(*b).into()),
                Width::Float => t.insert("keep_float".into(), true.into()),
            };
            toml::Value::Table(t)
        })
        .collect();
    vec![
        (at("weight_bits"), i64::from(bits[0]).into()),
        (at("overrides"), toml::Value::Array(overrides)),
        (at("sensitivity"), sensitivity.into()),
    ]
}

fn quantize(stage: usize, bits: &[u32], tolerance: Tolerance, evaluate: &mut Evaluate<'_>) -> Result<Stop, String> {
    let levels: Vec<Width> = bits.iter().map(|b| Width::Bits(*b)).chain([Width::Float]).collect();
    let lowest = Proposal {
        changes: quantize_changes(stage, bits, &[], true),
        why: format!("every layer at {} (and each layer's sensitivity measured)", levels[0]),
        wants_sensitivity: true,
    };
    let Some(first) = evaluate(&lowest)? else { return Ok(Stop::MaxTrials) };
    if first.sensitivity.is_empty() {
        return Err("the first trial measured no layer's sensitivity".into());
    }
    let order = first.sensitivity.clone();
    if tolerance.holds(first.reference, first.accuracy) {
        return Ok(Stop::Finished);
    }
    let mut level: Vec<usize> = vec![0; order.len()];
    let widths = |level: &[usize]| -> Vec<(String, Width)> {
        order.iter().zip(level).map(|(n, l)| (n.clone(), levels[*l])).collect()
    };
    // Fall back: layer by layer, most sensitive first, one width up; again while it fails.
    let mut holds = false;
    'fallback: for (up, width) in levels.iter().enumerate().skip(1) {
        for i in 0..order.len() {
            level[i] = up;
            let proposal = Proposal {
                changes: quantize_changes(stage, bits, &widths(&level), false),
                why: format!("fall back `{}` to {width} (sensitivity rank {})", order[i], i + 1),
                wants_sensitivity: false,
            };
            let Some(o) = evaluate(&proposal)? else { return Ok(Stop::MaxTrials) };
            if tolerance.holds(o.reference, o.accuracy) {
                holds = true;
                break 'fallback;
            }
        }
    }
    if !holds {
        return Ok(Stop::Finished);
    }
    // Re-lower: least sensitive first, each fallen-back layer one width down where it holds.
    for i in (0..order.len()).rev() {
        if level[i] == 0 {
            continue;
        }
        level[i] -= 1;
        let proposal = Proposal {
            changes: quantize_changes(stage, bits, &widths(&level), false),
            why: format!("lower `{}` again to {}", order[i], levels[level[i]]),
            wants_sensitivity: false,
        };
        let Some(o) = evaluate(&proposal)? else { return Ok(Stop::MaxTrials) };
        if !tolerance.holds(o.reference, o.accuracy) {
            level[i] += 1;
        }
    }
    Ok(Stop::Finished)
}

fn prune(stage: usize, max_drop: &[f64], tolerance: Tolerance, evaluate: &mut Evaluate<'_>) -> Result<Stop, String> {
    let proposal = |d: f64, why: String| Proposal {
        changes: vec![(
            FieldPath::parse(&format!("stages[{stage}].sensitivity_max_drop")).expect("a field path"),
            toml::Value::Float(d),
        )],
        why,
        wants_sensitivity: false,
    };
    let mut passed: Option<f64> = None;
    let mut failed: Option<f64> = None;
    for &d in max_drop {
        let Some(o) = evaluate(&proposal(d, format!("each layer may cost {} pp of validation top-1", fmt(d * 100.0))))?
        else {
            return Ok(Stop::MaxTrials);
        };
        if tolerance.holds(o.reference, o.accuracy) {
            passed = Some(d);
        } else {
            failed = Some(d);
            break;
        }
    }
    // Halve the gap between the last step that held and the first that failed, twice.
    if let Some(mut hi) = failed {
        let mut lo = passed.unwrap_or(0.0);
        for _ in 0..2 {
            let mid = (lo + hi) / 2.0;
            if mid <= 0.0 {
                break;
            }
            let Some(o) = evaluate(&proposal(mid, format!("between {} and {} pp", fmt(lo * 100.0), fmt(hi * 100.0))))?
            else {
                return Ok(Stop::MaxTrials);
            };
            if tolerance.holds(o.reference, o.accuracy) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    Ok(Stop::Finished)
}

/// The winner among trials: the lowest cost among those within the tolerance, ties to the
/// higher accuracy, then the earlier trial. `None` when no trial holds.
pub fn best(outcomes: &[Option<Outcome>], tolerance: Tolerance) -> Option<usize> {
    outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.as_ref().map(|o| (i, o)))
        .filter(|(_, o)| tolerance.holds(o.reference, o.accuracy) && o.cost.is_finite())
        .min_by(|(i, a), (j, b)| a.cost.total_cmp(&b.cost).then(b.accuracy.total_cmp(&a.accuracy)).then(i.cmp(j)))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search(text: &str) -> Result<Search, String> {
        Search::parse(text, Path::new("configs/search/s.toml"))
    }

    const QUANT: &str = "base = \"b.toml\"\nobjective = \"size\"\ntolerance = { absolute = 0.003 }\nmax_trials = 40\n[quantize]\nstage = 1\nbits = [4, 8]\n";

    #[test]
    fn search_files_parse_or_name_the_key() {
        let s = search(QUANT).unwrap();
        assert_eq!(s.strategy, Strategy::Quantize { stage: 1, bits: vec![4, 8] });
        assert_eq!(s.tolerance, Tolerance::Absolute(0.003));
        assert_eq!(s.name, "s");
        let cases = [
            (QUANT.replace("absolute = 0.003", "absolute = 3"), "key `tolerance`"),
            (QUANT.replace("absolute = 0.003", "percent = 0.3"), "s.toml:3:"),
            (QUANT.replace("bits = [4, 8]", "bits = [8, 4]"), "key `quantize.bits`"),
            (QUANT.replace("bits = [4, 8]", "bits = [1, 8]"), "key `quantize.bits`"),
            (QUANT.replace("max_trials = 40", "max_trials = 0"), "key `max_trials`"),
            (QUANT.replace("objective = \"size\"", "objective = \"speed\""), "s.toml:2:"),
            (QUANT.replace("[quantize]\nstage = 1\nbits = [4, 8]\n", ""), "one strategy"),
            (format!("{QUANT}[prune]\nstage = 1\nmax_drop = [0.01]\n"), "one strategy"),
            (
                QUANT.replace("[quantize]\nstage = 1\nbits = [4, 8]", "[prune]\nstage = 1\nmax_drop = [0.02, 0.01]"),
                "`prune.max_drop`",
            ),
            (format!("timeout_minutes = -1\n{QUANT}"), "key `timeout_minutes`"),
        ];
        for (text, expected) in cases {
            let err = search(&text).unwrap_err();
            assert!(err.starts_with("configs/search/s.toml") && err.contains(expected), "{text}\n→ {err}");
        }
    }

    #[test]
    fn tolerances_hold_at_their_edge() {
        assert!(Tolerance::Absolute(0.003).holds(0.990, 0.987));
        assert!(!Tolerance::Absolute(0.003).holds(0.990, 0.9869));
        assert!(Tolerance::Relative(0.01).holds(0.9, 0.891));
        assert!(!Tolerance::Relative(0.01).holds(0.9, 0.8909));
        assert!(Tolerance::Absolute(0.001).holds(0.9, 0.95), "better is within");
    }

    /// A made-up model: each layer costs `loss[i]` accuracy at int4, a tenth of it at int8,
    /// nothing in float; the reference is 0.99. Records the trials.
    struct Fake {
        layers: Vec<&'static str>,
        loss4: Vec<f64>,
        trials: Vec<Proposal>,
        budget: usize,
    }

    impl Fake {
        fn widths(&self, p: &Proposal) -> Vec<Width> {
            let overrides = p.changes.iter().find(|(f, _)| f.as_str().ends_with("overrides")).unwrap().1.clone();
            let base =
                p.changes.iter().find(|(f, _)| f.as_str().ends_with("weight_bits")).unwrap().1.as_integer().unwrap();
            self.layers
                .iter()
                .map(|name| {
                    let pattern = format!("^{}$", regex::escape(name));
                    match overrides.as_array().unwrap().iter().find(|o| o["pattern"].as_str() == Some(&pattern)) {
                        Some(o) if o.get("keep_float").is_some() => Width::Float,
                        Some(o) => Width::Bits(o["weight_bits"].as_integer().unwrap() as u32),
                        None => Width::Bits(base as u32),
                    }
                })
                .collect()
        }

        fn evaluate(&mut self, p: &Proposal) -> Result<Option<Outcome>, String> {
            if self.trials.len() == self.budget {
                return Ok(None);
            }
            self.trials.push(p.clone());
            let widths = self.widths(p);
            let lost: f64 = widths
                .iter()
                .zip(&self.loss4)
                .map(|(w, l)| match w {
                    Width::Bits(4) => *l,
                    Width::Bits(_) => l / 10.0,
                    Width::Float => 0.0,
                })
                .sum();
            let cost = widths
                .iter()
                .map(|w| match w {
                    Width::Bits(b) => *b as f64,
                    Width::Float => 32.0,
                })
                .sum();
            let mut order: Vec<usize> = (0..self.layers.len()).collect();
            order.sort_by(|a, b| self.loss4[*b].total_cmp(&self.loss4[*a]));
            Ok(Some(Outcome {
                accuracy: 0.99 - lost,
                reference: 0.99,
                cost,
                sensitivity: if p.wants_sensitivity {
                    order.iter().map(|i| self.layers[*i].to_string()).collect()
                } else {
                    vec![]
                },
            }))
        }
    }

    fn fake(loss4: &[f64], budget: usize) -> Fake {
        let names = ["stem.conv", "l1.conv", "l2.conv", "fc"];
        Fake { layers: names[..loss4.len()].to_vec(), loss4: loss4.to_vec(), trials: vec![], budget }
    }

    fn run_fake(f: &mut Fake, tolerance: f64) -> Stop {
        let s = search(&QUANT.replace("0.003", &tolerance.to_string())).unwrap();
        run(&s, &mut |p| f.evaluate(p)).unwrap()
    }

    #[test]
    fn basic_falls_back_most_sensitive_first_then_lowers_again() {
        // stem.conv costs 0.02 at int4, fc 0.004, the others 0.0005: the tolerance (0.003)
        // fails at all-int4 (0.025 lost); stem.conv → int8 leaves 0.007, fc → int8 0.0034,
        // l1 → int8 0.00295: holds. Lowering again, least sensitive first: l2 is at int4
        // already; l1 back to int4 fails (0.0034), fc (0.00655) and stem (0.02) too.
        let mut f = fake(&[0.02, 0.0005, 0.0005, 0.004], 100);
        assert_eq!(run_fake(&mut f, 0.003), Stop::Finished);
        let whys: Vec<&str> = f.trials.iter().map(|p| p.why.as_str()).collect();
        assert!(whys[0].starts_with("every layer at int4"), "{whys:?}");
        assert!(whys[1].starts_with("fall back `stem.conv` to int8"), "{whys:?}");
        assert!(whys[2].starts_with("fall back `fc` to int8"), "{whys:?}");
        assert!(whys[3].starts_with("fall back `l1.conv` to int8"), "{whys:?}");
        assert!(whys[4].starts_with("lower `l1.conv` again to int4"), "{whys:?}");
        assert!(whys[5].starts_with("lower `fc` again to int4"), "{whys:?}");
        assert!(whys[6].starts_with("lower `stem.conv` again to int4"), "{whys:?}");
        assert_eq!(f.trials.len(), 7, "{whys:?}");
        // Only the first trial measures sensitivity.
        assert_eq!(f.trials.iter().filter(|p| p.wants_sensitivity).count(), 1);
    }

    #[test]
    fn basic_keeps_a_layer_lowered_when_the_tolerance_allows_it() {
        // Only stem.conv matters: falling back stem and then l1 (rank 2) holds after stem;
        // fc and l1 are never raised; nothing to lower but stem, which fails lowered.
        let mut f = fake(&[0.02, 0.0, 0.0, 0.0001], 100);
        run_fake(&mut f, 0.003);
        let whys: Vec<&str> = f.trials.iter().map(|p| p.why.as_str()).collect();
        assert_eq!(whys.len(), 3, "{whys:?}");
        assert!(whys[2].starts_with("lower `stem.conv` again to int4"), "{whys:?}");
        let outcomes: Vec<Option<Outcome>> = {
            let mut g = fake(&[0.02, 0.0, 0.0, 0.0001], 100);
            f.trials.iter().map(|p| g.evaluate(p).unwrap()).collect()
        };
        assert_eq!(best(&outcomes, Tolerance::Absolute(0.003)), Some(1), "stem at int8, the rest int4");
    }

    #[test]
    fn basic_falls_back_to_float_when_int8_is_not_enough() {
        // stem.conv costs 0.05 at int4 and 0.005 at int8: only float holds.
        let mut f = fake(&[0.05, 0.0, 0.0, 0.0], 100);
        run_fake(&mut f, 0.003);
        let whys: Vec<&str> = f.trials.iter().map(|p| p.why.as_str()).collect();
        assert!(whys.iter().any(|w| w.starts_with("fall back `stem.conv` to float")), "{whys:?}");
        assert!(
            whys.iter().any(|w| w.starts_with("lower `l1.conv` again to int4")),
            "the others lowered again: {whys:?}"
        );
    }

    #[test]
    fn the_budget_stops_the_search_and_all_lowest_that_holds_ends_it() {
        let mut f = fake(&[0.02, 0.0005, 0.0005, 0.004], 3);
        assert_eq!(run_fake(&mut f, 0.003), Stop::MaxTrials);
        assert_eq!(f.trials.len(), 3);
        let mut f = fake(&[0.001, 0.0, 0.0, 0.0], 100);
        assert_eq!(run_fake(&mut f, 0.003), Stop::Finished);
        assert_eq!(f.trials.len(), 1, "everything at the lowest width holds: nothing else to try");
    }

    #[test]
    fn prune_raises_the_budget_while_it_holds_then_bisects() {
        let s = search(&QUANT.replace(
            "[quantize]\nstage = 1\nbits = [4, 8]",
            "[prune]\nstage = 2\nmax_drop = [0.01, 0.02, 0.04, 0.08]",
        ))
        .unwrap();
        // Accuracy falls by half the per-layer budget; with a tolerance of 0.015: 0.01 and 0.02
        // hold, 0.04 fails; then 0.03 holds (0.015 lost, at the edge) and 0.035 fails.
        let s = Search { tolerance: Tolerance::Absolute(0.015), ..s };
        let mut drops = Vec::new();
        let stop = run(&s, &mut |p| {
            let d = p.changes[0].1.as_float().unwrap();
            assert_eq!(p.changes[0].0.as_str(), "stages[2].sensitivity_max_drop");
            drops.push(d);
            Ok(Some(Outcome { accuracy: 0.99 - d / 2.0, reference: 0.99, cost: 1.0 - d, sensitivity: vec![] }))
        })
        .unwrap();
        assert_eq!(stop, Stop::Finished);
        let rounded: Vec<f64> = drops.iter().map(|d| (d * 1e6).round() / 1e6).collect();
        assert_eq!(rounded, [0.01, 0.02, 0.04, 0.03, 0.035]);
    }

    #[test]
    fn the_best_is_the_cheapest_within_tolerance() {
        let o = |accuracy: f64, cost: f64| Some(Outcome { accuracy, reference: 0.99, cost, sensitivity: vec![] });
        let t = Tolerance::Absolute(0.005);
        assert_eq!(best(&[o(0.99, 10.0), o(0.98, 1.0), o(0.986, 5.0), o(0.988, 5.0), None], t), Some(3));
        assert_eq!(best(&[o(0.9, 1.0)], t), None);
        assert_eq!(best(&[o(0.99, 2.0), o(0.99, 2.0)], t), Some(0), "ties: the earlier");
    }

    #[test]
    fn quantize_changes_escape_layer_names() {
        let changes = quantize_changes(
            2,
            &[4, 8],
            &[("layer1.0.conv1".into(), Width::Bits(8)), ("fc".into(), Width::Bits(4)), ("stem".into(), Width::Float)],
            false,
        );
        assert_eq!(changes[0].0.as_str(), "stages[2].weight_bits");
        let overrides = changes[1].1.as_array().unwrap();
        assert_eq!(overrides.len(), 2, "the lowest width needs no override");
        assert_eq!(overrides[0]["pattern"].as_str(), Some("^layer1\\.0\\.conv1$"));
        assert_eq!(overrides[0]["weight_bits"].as_integer(), Some(8));
        assert_eq!(overrides[1]["keep_float"].as_bool(), Some(true));
    }
}
