//! Sweeps: a base config and axes over its fields, expanded into trials (each an ordinary
//! config), and the Pareto fronts of their results. The runner (`cargo xtask sweep`) runs the
//! trials; this module is the part without side effects: the sweep file's schema, the
//! expansion (grid, zip or a seeded random draw from the grid), changing a config's field by
//! its path (`stages[1].sparsity`), and which points are on a front.
//!
//! A sweep file:
//!
//! ```toml
//! name = "resnet_pareto"             # default: the file's stem
//! base = "../resnet_prune_int8.toml" # relative to the sweep file; or an inline [base] table
//! combine = "grid"                   # or "zip" (axes of equal length, taken side by side)
//! random = 8                         # optional: 8 distinct grid points, drawn with `seed`
//! seed = 1
//! set = { "stages[0].epochs" = 5 }   # optional: fields every trial changes alike
//!
//! [[axes]]
//! field = "stages[1].sparsity"
//! values = [0.5, 0.7, 0.9]
//!
//! [[axes]]                           # fields that change together: one value per field
//! fields = ["stages[1].granularity", "stages[1].prune_schedule"]
//! values = [["weights", { kind = "agp" }], ["channels", { kind = "iterative" }]]
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The most trials a sweep expands to: each is a run with its own directory, so a larger grid
/// is a mistake in the file (a missing `random = N`), refused before anything runs.
pub const MAX_TRIALS: usize = 10_000;

/// How the axes combine into trials.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Combine {
    /// Every combination (the last axis changes fastest).
    #[default]
    Grid,
    /// The i-th value of every axis together; the axes have equal lengths.
    Zip,
}

/// Where the base config comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Base {
    /// A config file (relative paths in the sweep file are relative to the sweep file).
    File(PathBuf),
    /// A config written inside the sweep file, as TOML text.
    Inline(String),
}

/// A field of a config, named by its path: keys separated by `.`, array entries by `[i]`
/// (`stages[1].sparsity`, `latency.batch_sizes[1]`, `stages[0].optimizer.lr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldPath {
    text: String,
    steps: Vec<Step>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

impl FieldPath {
    /// Parses `text`; the error says what is wrong with it.
    ///
    /// # Errors
    /// An empty path, an empty key, a key with characters other than letters, digits, `_` and
    /// `-`, or an index that is not a number in brackets.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut steps = Vec::new();
        let mut rest = text;
        let mut expect_key = true;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('[') {
                let end = after.find(']').ok_or_else(|| format!("`{text}`: `[` without `]`"))?;
                let index = after[..end]
                    .parse::<usize>()
                    .map_err(|_| format!("`{text}`: `[{}]` is not an index (a number from 0)", &after[..end]))?;
                if steps.is_empty() {
                    return Err(format!("`{text}`: starts with an index; a path starts with a key"));
                }
                steps.push(Step::Index(index));
                rest = &after[end + 1..];
                expect_key = false;
                continue;
            }
            if !expect_key {
                rest = rest.strip_prefix('.').ok_or_else(|| format!("`{text}`: expected `.` or `[` after `]`"))?;
            }
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            let key = &rest[..end];
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(format!("`{text}`: `{key}` is not a key (letters, digits, `_` and `-`; entries as `[i]`)"));
            }
            steps.push(Step::Key(key.to_string()));
            rest = &rest[end..];
            if let Some(after) = rest.strip_prefix('.') {
                rest = after;
                if rest.is_empty() {
                    return Err(format!("`{text}`: ends with `.`"));
                }
                expect_key = true;
            } else {
                expect_key = false;
            }
        }
        if steps.is_empty() {
            return Err("an empty field path".into());
        }
        Ok(FieldPath { text: text.to_string(), steps })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// One axis: a field and the values it takes, or fields that change together and a value of
/// each per step.
#[derive(Clone, Debug, PartialEq)]
pub struct Axis {
    pub fields: Vec<FieldPath>,
    /// One row per step of the axis, one value per field.
    pub values: Vec<Vec<toml::Value>>,
}

impl Axis {
    /// The axis's fields, `a` or `a + b`.
    pub fn name(&self) -> String {
        self.fields.iter().map(FieldPath::as_str).collect::<Vec<_>>().join(" + ")
    }

    /// Step `i`'s values as written: `0.5`, or `("channels", { kind = "iterative" })`.
    pub fn describe_step(&self, i: usize) -> String {
        match self.values[i].as_slice() {
            [one] => inline(one),
            many => format!("({})", many.iter().map(inline).collect::<Vec<_>>().join(", ")),
        }
    }
}

/// A parsed sweep file.
#[derive(Clone, Debug, PartialEq)]
pub struct Sweep {
    /// The sweep file.
    pub source: PathBuf,
    /// The sweep's name: its directory is `<out>/sweeps/<name>/<timestamp>/`.
    pub name: String,
    pub base: Base,
    pub combine: Combine,
    /// `random = N` with its seed: N distinct grid points.
    pub random: Option<(usize, u64)>,
    /// Fields every trial sets alike (`set = { "stages[0].epochs" = 5 }`), before the axes'.
    pub set: Vec<(FieldPath, toml::Value)>,
    pub axes: Vec<Axis>,
    /// `[slurm]`: how `--slurm` submits the trials (flags override it).
    pub slurm: crate::slurm::SlurmSettings,
}

/// One trial of a sweep: its position and the fields it changes in the base config (the
/// sweep's `set` first, then one value per axis).
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub index: usize,
    pub changes: Vec<(FieldPath, toml::Value)>,
    /// How many of `changes` come from `set` (the rest are the axes').
    pub fixed: usize,
}

impl Point {
    /// The axes' values as `field = value` pairs, e.g. `stages[1].sparsity = 0.9, stages[2].weight_bits = 4`.
    pub fn describe(&self) -> String {
        self.axes().iter().map(|(f, v)| format!("{f} = {}", inline(v))).collect::<Vec<_>>().join(", ")
    }

    /// The changes that vary between trials (the axes').
    pub fn axes(&self) -> &[(FieldPath, toml::Value)] {
        &self.changes[self.fixed..]
    }
}

/// A value as TOML writes it inline (`0.9`, `"channels"`, `[1, 64]`, `{ kind = "adam" }`).
pub fn inline(value: &toml::Value) -> String {
    edit_value(value).to_string().trim().to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    name: Option<String>,
    base: toml::Value,
    #[serde(default)]
    combine: Combine,
    random: Option<usize>,
    seed: Option<u64>,
    #[serde(default)]
    set: toml::Table,
    axes: Vec<AxisFile>,
    #[serde(default)]
    slurm: crate::slurm::SlurmSettings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AxisFile {
    field: Option<String>,
    fields: Option<Vec<String>>,
    values: Vec<toml::Value>,
}

impl Sweep {
    /// Parses a sweep file's text strictly; `path` names it in errors and anchors a relative
    /// base path. Errors name the file and the line and column, or the axis.
    ///
    /// # Errors
    /// Unknown keys, a base that is neither a path nor a table, no axes, an axis without values
    /// or with a bad field path, a field named by two axes, zipped axes of unequal lengths,
    /// `random` with `zip` or of 0, `seed` without `random`, or more than [`MAX_TRIALS`] trials.
    pub fn parse(text: &str, path: &Path) -> Result<Sweep, String> {
        let file: SweepFile = parse_strict(text, path)?;
        let fail = |message: String| format!("{}: {message}", path.display());
        let name = name_or_stem(file.name, path).map_err(fail)?;
        let base = base_of(file.base, path).map_err(fail)?;
        if file.axes.is_empty() {
            return Err(fail("key `axes`: no axis; add [[axes]] with `field` and `values`".into()));
        }
        let mut axes: Vec<Axis> = Vec::new();
        for (i, a) in file.axes.into_iter().enumerate() {
            let (names, linked) = match (a.field, a.fields) {
                (Some(f), None) => (vec![f], false),
                (None, Some(fs)) if !fs.is_empty() => (fs, true),
                _ => {
                    return Err(fail(format!(
                        "key `axes[{i}]`: give `field = \"…\"` or `fields = [\"…\", …]`, one of them"
                    )));
                }
            };
            let mut fields = Vec::new();
            for name in &names {
                let field = FieldPath::parse(name).map_err(|e| fail(format!("key `axes[{i}].field`: {e}")))?;
                if fields.contains(&field) {
                    return Err(fail(format!("key `axes[{i}].fields`: `{field}` twice")));
                }
                if let Some(j) = axes.iter().position(|b| b.fields.contains(&field)) {
                    return Err(fail(format!("key `axes[{i}].field`: `{field}` is already axis {j}")));
                }
                fields.push(field);
            }
            if a.values.is_empty() {
                return Err(fail(format!("key `axes[{i}].values`: no values for `{}`", names.join(" + "))));
            }
            let values = if linked {
                a.values
                    .into_iter()
                    .enumerate()
                    .map(|(k, v)| match v {
                        toml::Value::Array(row) if row.len() == fields.len() => Ok(row),
                        _ => Err(fail(format!(
                            "key `axes[{i}].values[{k}]`: an array of {} values, one per field of `fields`",
                            fields.len()
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                a.values.into_iter().map(|v| vec![v]).collect()
            };
            axes.push(Axis { fields, values });
        }
        let set = set_of(file.set).map_err(fail)?;
        if let Some((path, _)) = set.iter().find(|(p, _)| axes.iter().any(|a| a.fields.contains(p))) {
            return Err(fail(format!("key `set`: `{path}` is also an axis; give its values there")));
        }
        let random = match (file.random, file.seed) {
            (Some(0), _) => return Err(fail("key `random`: 0 trials; give at least 1".into())),
            (Some(_), _) if file.combine == Combine::Zip => {
                return Err(fail("key `random`: draws from a grid; it does not combine with combine = \"zip\"".into()));
            }
            (Some(n), seed) => Some((n, seed.unwrap_or(0))),
            (None, Some(_)) => {
                return Err(fail("key `seed`: seeds the `random` draw, and there is no `random = N`".into()));
            }
            (None, None) => None,
        };
        file.slurm.validate().map_err(fail)?;
        let sweep = Sweep {
            source: path.to_path_buf(),
            name,
            base,
            combine: file.combine,
            random,
            set,
            axes,
            slurm: file.slurm,
        };
        if sweep.combine == Combine::Zip
            && let Some(a) = sweep.axes.iter().find(|a| a.values.len() != sweep.axes[0].values.len())
        {
            return Err(fail(format!(
                "key `axes`: zipped axes take their values side by side, but `{}` has {} values and `{}` {}",
                sweep.axes[0].name(),
                sweep.axes[0].values.len(),
                a.name(),
                a.values.len()
            )));
        }
        let total = sweep.grid_size();
        if sweep.random.is_none() && total.is_none_or(|t| t > MAX_TRIALS) {
            return Err(fail(format!(
                "key `axes`: {} trials; a sweep runs at most {MAX_TRIALS} (draw some with `random = N`)",
                total.map_or_else(|| "more than 2^64".to_string(), |t| t.to_string())
            )));
        }
        if let Some((n, _)) = sweep.random
            && n > MAX_TRIALS
        {
            return Err(fail(format!("key `random`: {n} trials; a sweep runs at most {MAX_TRIALS}")));
        }
        Ok(sweep)
    }

    /// Reads and parses a sweep file.
    ///
    /// # Errors
    /// As [`Sweep::parse`], or the file cannot be read (too large, not UTF-8, missing).
    pub fn load(path: &Path) -> Result<Sweep, String> {
        Sweep::parse(&read_text(path)?, path)
    }

    /// Trials of the full grid (`None` beyond `usize`).
    fn grid_size(&self) -> Option<usize> {
        match self.combine {
            Combine::Zip => Some(self.axes[0].values.len()),
            Combine::Grid => self.axes.iter().try_fold(1usize, |n, a| n.checked_mul(a.values.len())),
        }
    }

    /// The trials, in order: the grid (last axis fastest), the zip, or `random` distinct grid
    /// points in the order a seeded shuffle draws them (all of them when the grid is smaller).
    pub fn expand(&self) -> Vec<Point> {
        let point = |index: usize, grid_index: usize| {
            let mut rest = grid_index;
            let mut steps = vec![0; self.axes.len()];
            for (a, axis) in self.axes.iter().enumerate().rev() {
                steps[a] = match self.combine {
                    Combine::Zip => grid_index,
                    Combine::Grid => {
                        let step = rest % axis.values.len();
                        rest /= axis.values.len();
                        step
                    }
                };
            }
            let changes = self.axes.iter().zip(&steps).flat_map(|(axis, &step)| {
                axis.fields.iter().cloned().zip(axis.values[step].iter().cloned()).collect::<Vec<_>>()
            });
            Point { index, changes: self.set.iter().cloned().chain(changes).collect(), fixed: self.set.len() }
        };
        match (self.random, self.grid_size()) {
            (Some((n, seed)), total) => {
                let drawn = draw_distinct(total.unwrap_or(usize::MAX), n, seed);
                drawn.into_iter().enumerate().map(|(i, g)| point(i, g)).collect()
            }
            (None, Some(total)) => (0..total).map(|i| point(i, i)).collect(),
            (None, None) => Vec::new(),
        }
    }
}

/// A hand-written TOML file's text (sweep or search file): at most 1 MiB, UTF-8.
///
/// # Errors
/// The file cannot be read, is larger, or is not UTF-8 (the byte offset named).
pub fn read_text(path: &Path) -> Result<String, String> {
    let size = std::fs::metadata(path).map_err(|e| format!("{}: cannot read the file: {e}", path.display()))?;
    if size.len() > crate::config::MAX_CONFIG_BYTES {
        return Err(format!("{}: {} bytes; the file is written by hand (at most 1 MiB)", path.display(), size.len()));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: cannot read the file: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        format!("{}: byte {}: not UTF-8 text (a TOML file is UTF-8)", path.display(), e.utf8_error().valid_up_to())
    })
}

/// `text` as `T` (whose unknown keys are errors), or an error naming `path` and the line and
/// column.
pub(crate) fn parse_strict<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, String> {
    toml::from_str(text).map_err(|e| {
        let place = e
            .span()
            .map(|span| {
                let (line, col) = crate::config::line_col(text, span.start);
                format!(":{line}:{col}")
            })
            .unwrap_or_default();
        format!("{}{place}: {}", path.display(), e.message())
    })
}

/// The `name` key, or the file's stem: letters, digits, `_` and `-` (it names a directory).
pub(crate) fn name_or_stem(name: Option<String>, path: &Path) -> Result<String, String> {
    let name = match name {
        Some(n) => n,
        None => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(format!("key `name`: `{name}` must be letters, digits, `_` or `-` (it names a directory)"));
    }
    Ok(name)
}

/// The `base` key: a path (relative to the file at `path`) or an inline table.
pub(crate) fn base_of(base: toml::Value, path: &Path) -> Result<Base, String> {
    match base {
        toml::Value::String(p) => {
            let p = PathBuf::from(p);
            Ok(Base::File(if p.is_relative() { path.parent().unwrap_or(Path::new("")).join(p) } else { p }))
        }
        toml::Value::Table(t) => {
            toml::to_string(&t).map(Base::Inline).map_err(|e| format!("key `base`: cannot write it back as TOML: {e}"))
        }
        other => Err(format!("key `base`: a config file's path or a [base] table, not {}", other.type_str())),
    }
}

/// The `set` table: field paths and their values.
pub(crate) fn set_of(set: toml::Table) -> Result<Vec<(FieldPath, toml::Value)>, String> {
    set.into_iter()
        .map(|(field, value)| Ok((FieldPath::parse(&field).map_err(|e| format!("key `set`: {e}"))?, value)))
        .collect()
}

/// `n` distinct numbers below `total` (all of them, shuffled, when `n ≥ total`), drawn by a
/// SplitMix64 generator seeded with `seed`: the same on every machine.
fn draw_distinct(total: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let n = n.min(total);
    // A partial Fisher–Yates shuffle over a sparse map, so a huge grid costs only n steps.
    let mut swapped = std::collections::HashMap::<usize, usize>::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let j = i + (next() % (total - i) as u64) as usize;
        let at_j = *swapped.get(&j).unwrap_or(&j);
        let at_i = *swapped.get(&i).unwrap_or(&i);
        swapped.insert(j, at_i);
        out.push(at_j);
    }
    out
}

/// `base` (a config's TOML) with each field set to its value; a missing last key is added (the
/// config's validation then says whether it exists). Comments and layout are kept.
///
/// # Errors
/// A path through something the base does not have (`stages[5]` of three stages, a key
/// inside a number), or a base that is not TOML.
pub fn apply(base: &str, changes: &[(FieldPath, toml::Value)]) -> Result<String, String> {
    let mut doc: toml_edit::DocumentMut = base.parse().map_err(|e| format!("the base config is not TOML: {e}"))?;
    for (field, value) in changes {
        set(doc.as_item_mut(), field, 0, value)?;
    }
    Ok(doc.to_string())
}

fn set(item: &mut toml_edit::Item, field: &FieldPath, at: usize, value: &toml::Value) -> Result<(), String> {
    use toml_edit::{Item, Value};
    let so_far = || {
        let mut s = String::new();
        for step in &field.steps[..at] {
            match step {
                Step::Key(k) if s.is_empty() => s += k,
                Step::Key(k) => s += &format!(".{k}"),
                Step::Index(i) => s += &format!("[{i}]"),
            }
        }
        if s.is_empty() { "the config".to_string() } else { format!("`{s}`") }
    };
    let last = at + 1 == field.steps.len();
    match (&field.steps[at], item) {
        (Step::Key(k), Item::Table(t)) => {
            if last {
                t.insert(k, Item::Value(edit_value(value)));
                return Ok(());
            }
            let next = t.get_mut(k).ok_or_else(|| format!("`{field}`: {} has no `{k}`", so_far()))?;
            set(next, field, at + 1, value)
        }
        (Step::Key(k), Item::Value(Value::InlineTable(t))) => {
            if last {
                t.insert(k, edit_value(value));
                return Ok(());
            }
            let mut next = t
                .get_mut(k)
                .map(|v| Item::Value(v.clone()))
                .ok_or_else(|| format!("`{field}`: {} has no `{k}`", so_far()))?;
            set(&mut next, field, at + 1, value)?;
            if let Item::Value(v) = next {
                t.insert(k, v);
            }
            Ok(())
        }
        (Step::Index(i), Item::ArrayOfTables(a)) => {
            let len = a.len();
            if last {
                return Err(format!("`{field}`: replaces a whole entry of {}; name a key inside it", so_far()));
            }
            let t = a
                .get_mut(*i)
                .ok_or_else(|| format!("`{field}`: {} has {len} entries ([0] to [{}])", so_far(), len.max(1) - 1))?;
            let mut next = Item::Table(std::mem::take(t));
            let result = set(&mut next, field, at + 1, value);
            if let Item::Table(back) = next {
                *t = back;
            }
            result
        }
        (Step::Index(i), Item::Value(Value::Array(a))) => {
            let len = a.len();
            if *i >= len {
                return Err(format!("`{field}`: {} has {len} entries", so_far()));
            }
            if last {
                a.replace(*i, edit_value(value));
                return Ok(());
            }
            let mut next = Item::Value(a.get(*i).cloned().unwrap_or(Value::from(false)));
            set(&mut next, field, at + 1, value)?;
            if let Item::Value(v) = next {
                a.replace(*i, v);
            }
            Ok(())
        }
        (Step::Key(k), _) => Err(format!("`{field}`: {} is not a table, so it has no `{k}`", so_far())),
        (Step::Index(i), _) => Err(format!("`{field}`: {} is not an array, so it has no entry [{i}]", so_far())),
    }
}

/// A TOML value as `toml_edit` holds it (tables become inline tables).
fn edit_value(value: &toml::Value) -> toml_edit::Value {
    use toml_edit::Value;
    match value {
        toml::Value::String(s) => Value::from(s.as_str()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => Value::from(*f),
        toml::Value::Boolean(b) => Value::from(*b),
        toml::Value::Datetime(d) => {
            d.to_string().parse::<toml_edit::Datetime>().map(Value::from).unwrap_or_else(|_| Value::from(d.to_string()))
        }
        toml::Value::Array(a) => Value::Array(a.iter().map(edit_value).collect()),
        toml::Value::Table(t) => {
            let mut inline = toml_edit::InlineTable::new();
            for (k, v) in t {
                inline.insert(k, edit_value(v));
            }
            Value::InlineTable(inline)
        }
    }
}

/// Whether a metric is better larger or smaller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sense {
    /// Larger is better (accuracy).
    Maximize,
    /// Smaller is better (size, latency, MACs).
    Minimize,
}

/// Which points are on the Pareto front: those no other point dominates (at least as good in
/// every metric and better in one, each metric in its `senses` direction). Equal points do
/// not dominate each other, so ties are on the front together. A point with a NaN metric is
/// never on the front and dominates nothing.
///
/// # Panics
/// If a point has another number of metrics than `senses`.
pub fn pareto_front(points: &[Vec<f64>], senses: &[Sense]) -> Vec<bool> {
    assert!(points.iter().all(|p| p.len() == senses.len()), "every point has one value per sense");
    let oriented = |p: &Vec<f64>| -> Vec<f64> {
        p.iter().zip(senses).map(|(v, s)| if *s == Sense::Maximize { *v } else { -*v }).collect()
    };
    let points: Vec<Vec<f64>> = points.iter().map(oriented).collect();
    let valid = |p: &[f64]| p.iter().all(|v| !v.is_nan());
    let dominates = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| x >= y) && a.iter().zip(b).any(|(x, y)| x > y);
    points.iter().map(|p| valid(p) && !points.iter().any(|q| valid(q) && dominates(q, p))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(text: &str) -> Result<Sweep, String> {
        Sweep::parse(text, Path::new("configs/sweeps/s.toml"))
    }

    const AXES: &str = r#"
[[axes]]
field = "stages[1].sparsity"
values = [0.5, 0.7, 0.9]
[[axes]]
field = "stages[2].weight_bits"
values = [8, 4]
"#;

    #[test]
    fn a_grid_runs_every_combination_last_axis_fastest() {
        let s = sweep(&format!("base = \"../smoke/mlp.toml\"\n{AXES}")).unwrap();
        assert_eq!(s.name, "s");
        assert_eq!(s.base, Base::File(PathBuf::from("configs/sweeps/../smoke/mlp.toml")));
        let points = s.expand();
        let described: Vec<String> = points.iter().map(Point::describe).collect();
        assert_eq!(
            described,
            [
                "stages[1].sparsity = 0.5, stages[2].weight_bits = 8",
                "stages[1].sparsity = 0.5, stages[2].weight_bits = 4",
                "stages[1].sparsity = 0.7, stages[2].weight_bits = 8",
                "stages[1].sparsity = 0.7, stages[2].weight_bits = 4",
                "stages[1].sparsity = 0.9, stages[2].weight_bits = 8",
                "stages[1].sparsity = 0.9, stages[2].weight_bits = 4",
            ]
        );
        assert_eq!(points.iter().map(|p| p.index).collect::<Vec<_>>(), (0..6).collect::<Vec<_>>());
    }

    #[test]
    fn set_changes_every_trial_alike_and_is_not_an_axis() {
        let s = sweep(&format!("base = \"b.toml\"\nset = {{ \"stages[0].epochs\" = 1, seed = 4 }}\n{AXES}")).unwrap();
        for p in s.expand() {
            assert_eq!(p.changes.len(), 4);
            assert_eq!(p.fixed, 2);
            assert!(!p.describe().contains("epochs"), "{}", p.describe());
            assert!(p.changes.iter().any(|(f, v)| f.as_str() == "stages[0].epochs" && v.as_integer() == Some(1)));
        }
        let err = sweep(&format!("base = \"b.toml\"\nset = {{ \"stages[1].sparsity\" = 0.1 }}\n{AXES}")).unwrap_err();
        assert!(err.contains("also an axis"), "{err}");
    }

    #[test]
    fn linked_fields_change_together() {
        let text = "base = \"b.toml\"\n[[axes]]\nfield = \"s\"\nvalues = [1, 2]\n[[axes]]\nfields = [\"g\", \"p\"]\nvalues = [[\"w\", { kind = \"agp\" }], [\"c\", { kind = \"it\" }]]\n";
        let s = sweep(text).unwrap();
        assert_eq!(s.axes[1].name(), "g + p");
        assert_eq!(s.axes[1].describe_step(1), "(\"c\", { kind = \"it\" })");
        let described: Vec<String> = s.expand().iter().map(Point::describe).collect();
        assert_eq!(
            described,
            [
                "s = 1, g = \"w\", p = { kind = \"agp\" }",
                "s = 1, g = \"c\", p = { kind = \"it\" }",
                "s = 2, g = \"w\", p = { kind = \"agp\" }",
                "s = 2, g = \"c\", p = { kind = \"it\" }",
            ]
        );
        for (bad, expected) in [
            (text.replace("[\"c\", { kind = \"it\" }]", "\"c\""), "`axes[1].values[1]`: an array of 2 values"),
            (text.replace("fields = [\"g\", \"p\"]", "fields = [\"g\", \"s\"]"), "`s` is already axis 0"),
            (text.replace("fields = [\"g\", \"p\"]", "field = \"g\"\nfields = [\"p\"]"), "one of them"),
        ] {
            let err = sweep(&bad).unwrap_err();
            assert!(err.contains(expected), "{bad}\n→ {err}");
        }
    }

    #[test]
    fn a_zip_pairs_values_and_needs_equal_lengths() {
        let text = "base = \"b.toml\"\ncombine = \"zip\"\n[[axes]]\nfield = \"a\"\nvalues = [1, 2]\n[[axes]]\nfield = \"b\"\nvalues = [\"x\", \"y\"]\n";
        let points = sweep(text).unwrap().expand();
        assert_eq!(points.iter().map(Point::describe).collect::<Vec<_>>(), ["a = 1, b = \"x\"", "a = 2, b = \"y\""]);
        let err = sweep(&text.replace("[\"x\", \"y\"]", "[\"x\"]")).unwrap_err();
        assert!(err.contains("`a` has 2 values and `b` 1"), "{err}");
    }

    #[test]
    fn a_random_draw_is_distinct_seeded_and_capped_by_the_grid() {
        let text = format!("base = \"b.toml\"\nrandom = 4\nseed = 3\n{AXES}");
        let a = sweep(&text).unwrap().expand();
        assert_eq!(a.len(), 4);
        assert_eq!(a, sweep(&text).unwrap().expand(), "the same seed draws the same trials");
        let mut seen: Vec<String> = a.iter().map(Point::describe).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 4, "distinct");
        let other = sweep(&text.replace("seed = 3", "seed = 4")).unwrap().expand();
        assert_ne!(a, other, "another seed draws other trials");
        let all = sweep(&text.replace("random = 4", "random = 50")).unwrap().expand();
        assert_eq!(all.len(), 6, "at most the grid");
        for n in [1, 7, 100] {
            let mut d = draw_distinct(n, n, 9);
            d.sort();
            assert_eq!(d, (0..n).collect::<Vec<_>>());
        }
        // A grid far past MAX_TRIALS is fine with a draw.
        let huge = format!(
            "base = \"b.toml\"\nrandom = 5\n{}",
            (0..8)
                .map(|i| format!("[[axes]]\nfield = \"f{i}\"\nvalues = {:?}\n", (0..20).collect::<Vec<_>>()))
                .collect::<String>()
        );
        assert_eq!(sweep(&huge).unwrap().expand().len(), 5);
        let err = sweep(&huge.replace("random = 5\n", "")).unwrap_err();
        assert!(err.contains("25600000000 trials"), "{err}");
    }

    #[test]
    fn bad_sweep_files_name_the_key_or_line() {
        let cases = [
            (format!("base = \"b.toml\"\nrandom = 0\n{AXES}"), "key `random`: 0 trials"),
            (format!("base = \"b.toml\"\nseed = 1\n{AXES}"), "key `seed`"),
            (format!("base = \"b.toml\"\ncombine = \"zip\"\nrandom = 2\n{AXES}"), "does not combine"),
            ("base = \"b.toml\"\naxes = []\n".to_string(), "no axis"),
            ("base = \"b.toml\"\n[[axes]]\nfield = \"a\"\nvalues = []\n".to_string(), "`axes[0].values`: no values"),
            ("base = \"b.toml\"\n[[axes]]\nfield = \"a..b\"\nvalues = [1]\n".to_string(), "`axes[0].field`"),
            (
                "base = \"b.toml\"\n[[axes]]\nfield = \"a\"\nvalues = [1]\n[[axes]]\nfield = \"a\"\nvalues = [2]\n"
                    .to_string(),
                "already axis 0",
            ),
            ("base = 3\n[[axes]]\nfield = \"a\"\nvalues = [1]\n".to_string(), "key `base`"),
            ("name = \"a b\"\nbase = \"b.toml\"\n[[axes]]\nfield = \"a\"\nvalues = [1]\n".to_string(), "key `name`"),
            (
                "base = \"b.toml\"\nbogus = 1\n[[axes]]\nfield = \"a\"\nvalues = [1]\n".to_string(),
                "s.toml:2:1: unknown field `bogus`",
            ),
            ("base = \"b.toml\"\n[[axes]]\nfield = \"a\"\nvalue = [1]\n".to_string(), "s.toml:"),
        ];
        for (text, expected) in cases {
            let err = sweep(&text).unwrap_err();
            assert!(err.starts_with("configs/sweeps/s.toml") && err.contains(expected), "{text}\n→ {err}");
        }
    }

    #[test]
    fn field_paths_parse_or_say_why_not() {
        let ok = ["a", "stages[1].sparsity", "latency.batch_sizes[0]", "a[0][1].b-c_d"];
        for p in ok {
            assert_eq!(FieldPath::parse(p).unwrap().as_str(), p);
        }
        for bad in ["", "a.", ".a", "a[x]", "a[1", "[0].a", "a b", "a[0]b", "a..b"] {
            assert!(FieldPath::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    const BASE: &str = r#"name = "b"
# a comment that stays
[latency]
batch_sizes = [1, 8]

[[stages]]
kind = "train"
optimizer = { kind = "adam", lr = 0.003 }

[[stages]]
kind = "prune"
sparsity = 0.5
"#;

    fn change(field: &str, value: toml::Value) -> (FieldPath, toml::Value) {
        (FieldPath::parse(field).unwrap(), value)
    }

    #[test]
    fn apply_sets_fields_by_path_and_keeps_the_rest() {
        let out = apply(
            BASE,
            &[
                change("stages[1].sparsity", toml::Value::Float(0.9)),
                change("stages[1].granularity", toml::Value::String("channels".into())),
                change("stages[0].optimizer.lr", toml::Value::Float(0.01)),
                change("latency.batch_sizes[1]", toml::Value::Integer(64)),
                change("seed", toml::Value::Integer(3)),
            ],
        )
        .unwrap();
        let v: toml::Value = toml::from_str(&out).unwrap();
        assert_eq!(v["stages"][1]["sparsity"].as_float(), Some(0.9));
        assert_eq!(v["stages"][1]["granularity"].as_str(), Some("channels"));
        assert_eq!(v["stages"][0]["optimizer"]["lr"].as_float(), Some(0.01));
        assert_eq!(v["stages"][0]["optimizer"]["kind"].as_str(), Some("adam"));
        assert_eq!(v["latency"]["batch_sizes"].as_array().unwrap().len(), 2);
        assert_eq!(v["latency"]["batch_sizes"][1].as_integer(), Some(64));
        assert_eq!(v["seed"].as_integer(), Some(3));
        assert!(out.contains("# a comment that stays"));
        let table: toml::Table = toml::from_str("kind = \"sgd\"\nlr = 0.1").unwrap();
        let out = apply(BASE, &[change("stages[0].optimizer", toml::Value::Table(table))]).unwrap();
        let v: toml::Value = toml::from_str(&out).unwrap();
        assert_eq!(v["stages"][0]["optimizer"]["kind"].as_str(), Some("sgd"));
    }

    #[test]
    fn apply_names_what_the_base_lacks() {
        let cases = [
            ("stages[5].sparsity", "`stages` has 2 entries"),
            ("stages[1]", "replaces a whole entry"),
            ("latency.batch_sizes[2]", "`latency.batch_sizes` has 2 entries"),
            ("model.kind", "the config has no `model`"),
            ("name.x", "`name` is not a table"),
            ("stages[0].optimizer.lr.x", "`stages[0].optimizer.lr` is not a table"),
            ("latency[0].x", "`latency` is not an array"),
        ];
        for (field, expected) in cases {
            let err = apply(BASE, &[change(field, toml::Value::Integer(1))]).unwrap_err();
            assert!(err.contains(expected), "{field}: {err}");
        }
    }

    fn front(points: &[[f64; 2]], senses: [Sense; 2]) -> Vec<bool> {
        pareto_front(&points.iter().map(|p| p.to_vec()).collect::<Vec<_>>(), &senses)
    }

    #[test]
    fn a_known_front_on_hand_made_points() {
        use Sense::*;
        // (accuracy, size): larger accuracy, smaller size.
        let points = [[0.99, 100.0], [0.98, 50.0], [0.97, 60.0], [0.95, 10.0], [0.99, 120.0], [0.90, 10.0]];
        assert_eq!(front(&points, [Maximize, Minimize]), [true, true, false, true, false, false]);
        // The same points with both maximised: only the largest of each.
        assert_eq!(front(&points, [Maximize, Maximize]), [false, false, false, false, true, false]);
        // Both minimised.
        assert_eq!(front(&points, [Minimize, Minimize]), [false, false, false, false, false, true]);
    }

    #[test]
    fn ties_share_the_front_and_nan_is_never_on_it() {
        use Sense::*;
        let points = [[0.9, 10.0], [0.9, 10.0], [0.8, 10.0], [f64::NAN, 1.0], [0.95, f64::NAN]];
        assert_eq!(front(&points, [Maximize, Minimize]), [true, true, false, false, false]);
        assert!(pareto_front(&[], &[Maximize]).is_empty());
        assert_eq!(front(&[[1.0, 1.0]], [Minimize, Minimize]), [true]);
    }

    proptest::proptest! {
        /// Any text is a sweep or an error naming the file; a sweep expands to the trials its
        /// axes say, each with one value per field.
        #[test]
        fn any_text_is_a_sweep_or_an_error(text in "(base = \"b.toml\"\n)?(random = [0-9]\n)?(combine = \"(zip|grid)\"\n)?(\\[\\[axes\\]\\]\nfields? = (\"[a-z.\\[\\]0-9]{0,6}\"|\\[\"[a-z]\", \"[a-z]\"\\])\nvalues = \\[([0-9], |\\[[0-9], [0-9]\\], ){0,3}\\]\n){0,3}[ -~]{0,4}") {
            match sweep(&text) {
                Ok(s) => {
                    let points = s.expand();
                    let fields: usize = s.axes.iter().map(|a| a.fields.len()).sum();
                    assert!(points.iter().all(|p| p.changes.len() == fields));
                    let expected = match (s.combine, s.random) {
                        (Combine::Zip, _) => s.axes[0].values.len(),
                        (Combine::Grid, None) => s.axes.iter().map(|a| a.values.len()).product(),
                        (Combine::Grid, Some((n, _))) => n.min(s.axes.iter().map(|a| a.values.len()).product()),
                    };
                    assert_eq!(points.len(), expected);
                }
                Err(e) => assert!(e.starts_with("configs/sweeps/s.toml"), "{e}"),
            }
        }

        /// Any field path on a config changes it or says why not; never a panic.
        #[test]
        fn any_field_path_applies_or_says_why_not(path in "[a-z_]{1,8}(\\[[0-9]\\]|\\.[a-z_]{1,10}){0,4}", v in 0i64..100) {
            if let Ok(field) = FieldPath::parse(&path)
                && let Ok(out) = apply(BASE, &[(field, toml::Value::Integer(v))])
            {
                assert!(out.parse::<toml_edit::DocumentMut>().is_ok(), "{out}");
            }
        }
    }
}
