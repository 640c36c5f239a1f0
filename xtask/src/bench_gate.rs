//! The bench regression gate (`cargo xtask bench-compare BASE HEAD`): compares the ratio tables
//! two commits' benches wrote (`<suite>.json` under each directory, as `cargo xtask bench`
//! writes them) and fails when one of shrink's ratios against a reference runner fell by more
//! than the tolerance (10 % by default).
//!
//! **Which ratios are gated.** Only ratios are compared, never times: both commits may run on
//! different machines (a pull request's base and head run one after the other on a CI runner
//! that changes), and a ratio measured side by side in one process cancels most of that. A row
//! is gated when its runner is shrink's code (`shrink …`, `cpu-plan…`) and its baseline a
//! pinned third-party reference ([`REFERENCES`]: ONNX Runtime from the PyPI pin, burn-ndarray
//! from Cargo.lock): the ratio then measures shrink's speed in units of the reference's on that
//! machine, and a drop is a slowdown of shrink. Ratios between two of shrink's own runners (the
//! integer plan against the f32 plan, an ISA path against another) are listed but not gated: a
//! faster f32 plan lowers the int8/f32 ratio without anything getting slower.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The third-party runners whose versions are pinned, so that a ratio against one is a stable
/// unit of speed.
pub const REFERENCES: &[&str] = &["burn-ndarray", "onnxruntime f32", "onnxruntime int8"];

/// Whether a row of runner `runner` measured against `baseline` is gated: shrink's code
/// against a [`REFERENCES`] runner.
pub fn gated(runner: &str, baseline: &str) -> bool {
    REFERENCES.contains(&baseline) && (runner.starts_with("shrink") || runner.starts_with("cpu-plan"))
}

/// One row of a suite's JSON (the fields the gate reads).
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct Row {
    /// `case / runner`.
    pub name: String,
    /// baseline time / this time.
    pub ratio: f64,
    /// The runner the ratio is against.
    pub baseline: String,
}

/// A suite's JSON (the fields the gate reads).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Suite {
    /// Suite name.
    pub suite: String,
    /// Commit it ran at.
    #[serde(default)]
    pub git_revision: String,
    /// CPU it ran on.
    #[serde(default)]
    pub cpu: String,
    /// Its rows.
    pub rows: Vec<Row>,
}

/// How a row's ratio changed between base and head.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// Suite name.
    pub suite: String,
    /// `case / runner`.
    pub name: String,
    /// The runner the ratio is against.
    pub baseline: String,
    /// Ratio at base (`None`: the row is new).
    pub base: Option<f64>,
    /// Ratio at head (`None`: the row is gone).
    pub head: Option<f64>,
    /// Whether the row is gated ([`gated`]).
    pub gated: bool,
    /// Gated, in both, and `head < base · (1 − tolerance)`.
    pub regression: bool,
}

impl Change {
    /// `head / base − 1`, where both exist.
    pub fn relative(&self) -> Option<f64> {
        Some(self.head? / self.base? - 1.0)
    }
}

/// The runner of a row name `case / runner`.
fn runner(name: &str) -> &str {
    name.rsplit_once(" / ").map_or(name, |(_, r)| r)
}

/// Every row of `base` and `head` (one suite) matched by name, in head's order then the rows
/// only base has. Rows whose runner is their own baseline (ratio 1 by definition) and rows
/// without a finite ratio are left out.
pub fn compare(base: &Suite, head: &Suite, tolerance: f64) -> Vec<Change> {
    let useful = |r: &&Row| r.ratio.is_finite() && r.ratio > 0.0 && runner(&r.name) != r.baseline;
    let base_rows: BTreeMap<&str, &Row> = base.rows.iter().filter(useful).map(|r| (r.name.as_str(), r)).collect();
    let mut changes: Vec<Change> = head
        .rows
        .iter()
        .filter(useful)
        .map(|r| {
            let before = base_rows.get(r.name.as_str()).filter(|b| b.baseline == r.baseline).map(|b| b.ratio);
            let gated = gated(runner(&r.name), &r.baseline);
            Change {
                suite: head.suite.clone(),
                name: r.name.clone(),
                baseline: r.baseline.clone(),
                base: before,
                head: Some(r.ratio),
                gated,
                regression: gated && before.is_some_and(|b| r.ratio < b * (1.0 - tolerance)),
            }
        })
        .collect();
    for (name, r) in base_rows {
        if !head.rows.iter().any(|h| h.name == name) {
            changes.push(Change {
                suite: base.suite.clone(),
                name: name.to_string(),
                baseline: r.baseline.clone(),
                base: Some(r.ratio),
                head: None,
                gated: gated(runner(name), &r.baseline),
                regression: false,
            });
        }
    }
    changes
}

/// Reads a suite's JSON.
///
/// # Errors
/// When the file cannot be read or is not a suite report (the error names the file).
pub fn read_suite(path: &Path) -> Result<Suite> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a bench report", path.display()))
}

/// The suites both directories hold (`<suite>.json`), compared; the Markdown table of every
/// change, and whether any gated ratio regressed. Suites only one side has are named in the
/// table's notes.
///
/// # Errors
/// When a directory cannot be listed, a report cannot be read, or the two share no suite.
pub fn compare_dirs(base: &Path, head: &Path, tolerance: f64) -> Result<(String, bool)> {
    let suites = |dir: &Path| -> Result<BTreeMap<String, PathBuf>> {
        let entries = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
        Ok(entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .filter_map(|p| Some((p.file_stem()?.to_str()?.to_string(), p.clone())))
            .collect())
    };
    let (base_suites, head_suites) = (suites(base)?, suites(head)?);
    let mut md = format!(
        "# Bench ratios: {} (base) against {} (head), gate {:.0} %\n\n",
        base.display(),
        head.display(),
        tolerance * 100.0
    );
    let mut compared = 0;
    let mut failed = false;
    for (name, head_path) in &head_suites {
        let Some(base_path) = base_suites.get(name) else {
            md += &format!("Suite `{name}`: only in head, not compared.\n\n");
            continue;
        };
        let (b, h) = (read_suite(base_path)?, read_suite(head_path)?);
        compared += 1;
        md += &format!(
            "## `{name}` — base git {} on {}, head git {} on {}\n\n| case / runner | vs | base | head | change | |\n|---|---|---|---|---|---|\n",
            short(&b.git_revision),
            b.cpu,
            short(&h.git_revision),
            h.cpu
        );
        for c in compare(&b, &h, tolerance) {
            let ratio = |r: Option<f64>| r.map_or("—".to_string(), |r| format!("{r:.2}×"));
            let change = c.relative().map_or("—".to_string(), |d| format!("{:+.1} %", d * 100.0));
            let verdict = match (c.gated, c.regression, c.base, c.head) {
                (_, true, _, _) => "**regression**",
                (_, _, None, _) => "new",
                (_, _, _, None) => "gone",
                (true, false, _, _) => "gated, ok",
                (false, ..) => "not gated",
            };
            md += &format!(
                "| {} | {} | {} | {} | {change} | {verdict} |\n",
                c.name,
                c.baseline,
                ratio(c.base),
                ratio(c.head)
            );
            failed |= c.regression;
        }
        md += "\n";
    }
    for name in base_suites.keys().filter(|n| !head_suites.contains_key(*n)) {
        md += &format!("Suite `{name}`: only in base, not compared.\n\n");
    }
    anyhow::ensure!(
        compared > 0,
        "{} and {} share no bench suite (`<suite>.json` from `cargo xtask bench`)",
        base.display(),
        head.display()
    );
    Ok((md, failed))
}

fn short(revision: &str) -> &str {
    &revision[..revision.len().min(10)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, ratio: f64, baseline: &str) -> Row {
        Row { name: name.into(), ratio, baseline: baseline.into() }
    }

    fn suite(rows: Vec<Row>) -> Suite {
        Suite { suite: "onnxruntime".into(), git_revision: String::new(), cpu: String::new(), rows }
    }

    #[test]
    fn only_shrink_against_a_reference_is_gated() {
        assert!(gated("shrink int8 plan", "onnxruntime int8"));
        assert!(gated("cpu-plan", "burn-ndarray"));
        assert!(gated("cpu-plan-gemm-crate", "burn-ndarray"));
        assert!(!gated("burn-flex", "burn-ndarray"));
        assert!(!gated("int8 shrink-avx512-vnni", "f32 cpu-plan"));
        assert!(!gated("cpu-plan-2t", "cpu-plan"));
    }

    #[test]
    fn a_ratio_that_falls_beyond_the_tolerance_is_a_regression() {
        let base = suite(vec![
            row("r b1 / shrink int8 plan", 1.30, "onnxruntime int8"),
            row("r b64 / shrink int8 plan", 1.00, "onnxruntime int8"),
            row("r b1 / shrink f32 plan", 0.80, "onnxruntime f32"),
            row("r b1 / onnxruntime int8", 1.0, "onnxruntime int8"),
            row("r b1 / shrink f32 im2col-gemm", 0.50, "onnxruntime f32"),
            row("r b1 / int8 avx2", 3.0, "f32 avx2"),
        ]);
        let head = suite(vec![
            // -15 %: a regression; -9 %: within the gate; +20 %: better.
            row("r b1 / shrink int8 plan", 1.105, "onnxruntime int8"),
            row("r b64 / shrink int8 plan", 0.91, "onnxruntime int8"),
            row("r b1 / shrink f32 plan", 0.96, "onnxruntime f32"),
            row("r b1 / onnxruntime int8", 1.0, "onnxruntime int8"),
            // Not gated (ours against ours): halved, still no regression.
            row("r b1 / int8 avx2", 1.5, "f32 avx2"),
            row("r b1 / shrink new kernel", 2.0, "onnxruntime f32"),
            row("r b1 / shrink nan", f64::NAN, "onnxruntime f32"),
        ]);
        let changes = compare(&base, &head, 0.10);
        let find = |n: &str| changes.iter().find(|c| c.name == n).unwrap_or_else(|| panic!("{n}: {changes:?}"));
        assert!(find("r b1 / shrink int8 plan").regression);
        assert!((find("r b1 / shrink int8 plan").relative().unwrap() + 0.15).abs() < 1e-9);
        assert!(!find("r b64 / shrink int8 plan").regression);
        assert!(!find("r b1 / shrink f32 plan").regression);
        assert!(!find("r b1 / int8 avx2").regression && !find("r b1 / int8 avx2").gated);
        let new = find("r b1 / shrink new kernel");
        assert_eq!((new.base, new.regression), (None, false));
        let gone = find("r b1 / shrink f32 im2col-gemm");
        assert_eq!((gone.head, gone.regression), (None, false));
        // A runner against itself, and a ratio that is not a number, are not compared.
        assert!(changes.iter().all(|c| !c.name.ends_with("onnxruntime int8") && !c.name.ends_with("nan")));
        assert_eq!(changes.iter().filter(|c| c.regression).count(), 1);
        // A looser gate lets it pass; a row measured against another baseline is not matched.
        assert!(compare(&base, &head, 0.2).iter().all(|c| !c.regression));
        let rebased = suite(vec![row("r b1 / shrink int8 plan", 0.5, "burn-ndarray")]);
        assert!(compare(&base, &rebased, 0.1).iter().all(|c| !c.regression));
    }
}
