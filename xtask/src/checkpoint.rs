//! Checkpoints between stages, so that a run killed at any point (`kill -9` included) resumes
//! from its last finished stage when the same command is run again.
//!
//! After stage `n` finishes, its state goes to `checkpoint/stage-<n>/` (the model, the model as
//! the last training left it, the quantized model), each file written atomically; then
//! `checkpoint/state.json` — the commit point — names that directory and carries the finished
//! stages' reports. A run killed before `state.json` is replaced resumes from the previous
//! stage. A complete run removes its checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use shrink_core::io;
use shrink_quant::QuantizedModel;

use crate::report::{Report, RunStatus, StageReport};
use crate::stages::RunState;

/// The checkpoint directory inside a run directory.
pub const DIR: &str = "checkpoint";
const FORMAT: u32 = 2;
/// What every checkpoint error ends with.
const FRESH_HINT: &str = "run the same command with `--fresh` to start the run over";

/// Everything the stages after a finished one need, besides the config and the data.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    format: u32,
    /// Stages finished (the next one to run has this index).
    stages_done: usize,
    /// Whether no stage has trained the model yet (the next train stage is the baseline).
    fresh: bool,
    has_uncompressed: bool,
    has_quantized: bool,
    /// The finished stages' reports.
    stages: Vec<StageReport>,
    /// SHA-256 of each model file of the stage directory, checked before it is loaded.
    files: std::collections::BTreeMap<String, String>,
}

/// The run's state after its last finished stage.
pub struct Restored {
    /// Stages finished.
    pub stages_done: usize,
    /// The models the next stage starts from.
    pub state: RunState,
    /// The finished stages' reports.
    pub stages: Vec<StageReport>,
}

fn stage_dir(root: &Path, stages_done: usize) -> PathBuf {
    root.join(format!("stage-{stages_done}"))
}

/// Writes the checkpoint of `run` after the finished `stages` and removes older ones.
pub fn save(run_dir: &Path, run: &RunState, stages: &[StageReport]) -> Result<()> {
    let root = run_dir.join(DIR);
    let stages_done = stages.len();
    let dir = stage_dir(&root, stages_done);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    io::save(&run.graph, &dir.join("graph.safetensors"))?;
    if let Some(u) = &run.uncompressed {
        io::save(u, &dir.join("uncompressed.safetensors"))?;
    }
    if let Some(q) = &run.quantized {
        q.save(&dir.join("quantized.safetensors"))?;
    }
    let mut files = std::collections::BTreeMap::new();
    for name in ["graph", "uncompressed", "quantized"] {
        let file = dir.join(format!("{name}.safetensors"));
        if file.exists() {
            let bytes = std::fs::read(&file).with_context(|| format!("reading back {}", file.display()))?;
            files.insert(format!("{name}.safetensors"), crate::cache::sha256_hex(&bytes));
        }
    }
    let state = State {
        files,
        format: FORMAT,
        stages_done,
        fresh: run.fresh,
        has_uncompressed: run.uncompressed.is_some(),
        has_quantized: run.quantized.is_some(),
        stages: stages.to_vec(),
    };
    let json = serde_json::to_vec_pretty(&state).context("serialising the checkpoint state")?;
    io::write_atomic(&root.join("state.json"), &json)?;
    // Only the directory `state.json` names is needed from here on.
    for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() && path != dir {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
    tracing::debug!(stages_done, "checkpoint written");
    Ok(())
}

/// The checkpoint of `run_dir`, if it has one.
///
/// # Errors
/// When `state.json` or a file it names is damaged, naming the file.
pub fn load(run_dir: &Path, device: &burn::tensor::Device) -> Result<Option<Restored>> {
    let root = run_dir.join(DIR);
    let path = root.join("state.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let state: State = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a checkpoint of this version of shrink; {FRESH_HINT}", path.display()))?;
    if state.format != FORMAT {
        bail!("{}: checkpoint format {} (this build reads {FORMAT}); {FRESH_HINT}", path.display(), state.format);
    }
    if state.stages.len() != state.stages_done {
        bail!(
            "{}: {} stage reports for {} finished stages; {FRESH_HINT}",
            path.display(),
            state.stages.len(),
            state.stages_done
        );
    }
    let dir = stage_dir(&root, state.stages_done);
    // Every model file is the one written: its SHA-256 is the one state.json recorded.
    let verified = |name: &str| -> Result<PathBuf> {
        let file = dir.join(name);
        let recorded = state.files.get(name);
        let bytes = std::fs::read(&file).with_context(|| format!("{}: cannot read; {FRESH_HINT}", file.display()))?;
        if recorded != Some(&crate::cache::sha256_hex(&bytes)) {
            bail!("{}: not the file the checkpoint recorded (damaged or replaced); {FRESH_HINT}", file.display());
        }
        Ok(file)
    };
    let load_graph = |name: &str| -> Result<shrink_core::Graph> {
        let file = verified(name)?;
        io::load(&file, device).with_context(|| FRESH_HINT.to_string())
    };
    let graph = load_graph("graph.safetensors")?;
    let uncompressed = if state.has_uncompressed { Some(load_graph("uncompressed.safetensors")?) } else { None };
    let quantized = if state.has_quantized {
        let file = verified("quantized.safetensors")?;
        Some(QuantizedModel::load(&file, device).with_context(|| FRESH_HINT.to_string())?)
    } else {
        None
    };
    Ok(Some(Restored {
        stages_done: state.stages_done,
        state: RunState { graph, fresh: state.fresh, uncompressed, quantized },
        stages: state.stages,
    }))
}

/// Removes the checkpoint of a finished run.
pub fn remove(run_dir: &Path) {
    let _ = std::fs::remove_dir_all(run_dir.join(DIR));
}

/// The run directory a rerun of `resolved_config` should continue: the most recent run of
/// `experiment` under `out`, when it did not complete, ran the same resolved config, and was
/// made by the same revision of shrink (a checkpoint from other code is not trusted).
pub fn unfinished_run(
    out: &Path,
    experiment: &str,
    resolved_config: &str,
    revision: &str,
) -> Option<(PathBuf, Report)> {
    let mut runs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(out.join(experiment))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .filter_map(|p| Some((std::fs::metadata(p.join("config.resolved.toml")).ok()?.modified().ok()?, p)))
        .collect();
    runs.sort();
    let (_, last) = runs.pop()?;
    let report: Report = serde_json::from_slice(&std::fs::read(last.join("report.json")).ok()?).ok()?;
    let same_config = std::fs::read_to_string(last.join("config.resolved.toml")).ok()? == resolved_config;
    (report.status != RunStatus::Complete && same_config && report.provenance.git_revision == revision)
        .then_some((last, report))
}
