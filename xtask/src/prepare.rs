//! `xtask prepare CONFIG...`: trains (or finds in the cache) the models that the configs' runs
//! share — baselines, distillation teachers, students trained alone ([`shared_trainings`]) —
//! and nothing else. A sweep on Slurm runs it as one job before the trials' array, so the array's
//! tasks load the baseline instead of each training it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use xtask::config::load_plan;

use crate::run::RunOptions;
use crate::stages::{StageContext, shared_trainings};

/// What `--mark` holds: written at the end, on the machine that ran it — which shows that the
/// sweep directory is writable there.
#[derive(Serialize)]
struct Prepared {
    host: String,
    finished_utc: String,
    /// `label key trained|cached` for each shared training.
    models: Vec<String>,
}

/// Prepares every config's shared trainings, in order; writes `mark` at the end when given.
///
/// # Errors
/// A config that does not load ([`xtask::config::ConfigError`]), data that does not load, or a
/// training that fails.
pub fn prepare(configs: &[PathBuf], opts: &RunOptions, mark: Option<&Path>) -> Result<()> {
    let mut models = Vec::new();
    for path in configs {
        let plan = load_plan(path)?;
        let trainings = shared_trainings(&plan);
        if trainings.is_empty() {
            continue;
        }
        shrink_core::backend::set_cpu_threads(plan.threads);
        let data = crate::data::load(&plan).with_context(|| format!("{}: loading the data", path.display()))?;
        let device = plan.backend.device()?;
        for t in trainings {
            let cx = StageContext {
                plan: &plan,
                opts,
                data: &data,
                device: &device,
                index: t.index,
                run_dir: &opts.out,
                previous: None,
            };
            let trained = crate::cache::train_cached(&cx, &t.model, t.seed, t.train, t.index, &t.label)
                .with_context(|| format!("{}: the {}", path.display(), t.label))?;
            let what = if trained.reused { "cached" } else { "trained" };
            eprintln!("{}: {} {} {what}", path.display(), t.label, trained.key);
            if !models.iter().any(|m: &String| m.contains(&format!(" {} ", trained.key))) {
                models.push(format!("{} {} {what}", t.label, trained.key));
            }
        }
    }
    if let Some(mark) = mark {
        let prepared = Prepared {
            host: crate::report::hostname(),
            finished_utc: crate::report::utc(time::OffsetDateTime::now_utc()),
            models,
        };
        shrink_core::io::write_atomic(mark, serde_json::to_string_pretty(&prepared)?.as_bytes())
            .with_context(|| format!("cannot write {}", mark.display()))?;
    }
    Ok(())
}
