//! Runs a validated [`Plan`]: loads the data, builds the model, runs each stage
//! ([`crate::stages`]), measures the model after each ([`crate::measure`]), checkpoints, and
//! writes the run directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use shrink_core::io;

use crate::plan::{Plan, StagePlan};
use crate::report::{DataSummary, Provenance, Report, Resumption, RunStatus, StageReport, utc, write_report};
use crate::stages::{RunState, StageContext};

/// Options from the command line.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Root of run directories (`runs` by default).
    pub out: PathBuf,
    /// Where trained baselines are cached.
    pub cache: PathBuf,
    /// Show progress bars.
    pub progress: bool,
}

/// The config as the run resolved it (defaults filled in, data path resolved), as
/// `config.resolved.toml` holds it.
///
/// # Errors
/// If the plan cannot be written as TOML.
pub fn resolved_config(plan: &Plan) -> Result<String> {
    plan.to_toml()
}

/// Runs one plan; returns the run directory. The report is written even when a stage fails.
/// `resume` is the report of an unfinished run in `run_dir` to continue from its checkpoint
/// (see [`crate::checkpoint`]).
pub fn run_plan(plan: &Plan, opts: &RunOptions, run_dir: &Path, resume: Option<Report>) -> Result<PathBuf> {
    let started = time::OffsetDateTime::now_utc();
    let mut report = Report::new(plan, Provenance::collect(plan, started));
    std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    io::write_atomic(&run_dir.join("config.resolved.toml"), resolved_config(plan)?.as_bytes())?;
    let resuming = resume.is_some();
    if let Some(previous) = resume {
        report.resumed = previous.resumed;
        report.resumed.push(Resumption { utc: utc(started), previous_status: previous.status, stages_kept: 0 });
    }
    report.status = RunStatus::Running;
    write_report(&report, run_dir)?;

    let result = run_stages(plan, opts, run_dir, &mut report, resuming);
    report.provenance.finished_utc = utc(time::OffsetDateTime::now_utc());
    match &result {
        Ok(()) => {
            report.status = RunStatus::Complete;
            crate::checkpoint::remove(run_dir);
        }
        Err(err) => {
            report.status = RunStatus::Failed;
            report.error = Some(format!("{err:#}"));
        }
    }
    write_report(&report, run_dir)?;
    result.map(|()| run_dir.to_path_buf())
}

/// The stage loop: each stage runs, is measured, checkpointed and reported, in order.
fn run_stages(plan: &Plan, opts: &RunOptions, run_dir: &Path, report: &mut Report, resuming: bool) -> Result<()> {
    report.provenance.threads = shrink_core::backend::set_cpu_threads(plan.threads);
    let data = {
        let _span = tracing::info_span!("load_data").entered();
        crate::data::load(plan)?
    };
    report.data = Some(DataSummary {
        train: data.train.len(),
        validation: data.validation.as_ref().map_or(0, |v| v.len()),
        test: data.test.len(),
        shape: data.train.shape,
        classes: data.train.classes,
    });
    let device = plan.backend.device()?;
    let (mut state, first) = initial_state(plan, &data, &device, run_dir, report, resuming)?;
    for (index, stage) in plan.stages.iter().enumerate().skip(first) {
        report.current_stage = Some(format!("{index}:{}", stage.kind()));
        let _span = tracing::info_span!("stage", index, kind = stage.kind()).entered();
        let start = Instant::now();
        let mut stage_report = StageReport::new(index, stage.kind());
        let cx =
            StageContext { plan, opts, data: &data, device: &device, index, run_dir, previous: report.stages.last() };
        crate::stages::run(stage, &cx, &mut state, &mut stage_report)?;
        let batch = match stage {
            StagePlan::Evaluate(e) => e.batch_size,
            _ => 250,
        };
        crate::measure::after_stage(&cx, &state, batch, &mut stage_report)?;
        stage_report.wall_seconds = start.elapsed().as_secs_f64();
        report.stages.push(stage_report);
        report.current_stage = None;
        crate::checkpoint::save(run_dir, &state, &report.stages)?;
        write_report(report, run_dir)?;
        pause_for_tests(&plan.name, report.stages.len());
    }
    match &state.quantized {
        Some(q) => q.save(&run_dir.join("model.safetensors"))?,
        None => io::save(&state.graph, &run_dir.join("model.safetensors"))?,
    }
    report.model_file = Some("model.safetensors".into());
    if plan.export.onnx {
        let _span = tracing::info_span!("export").entered();
        let options = crate::export::options(&plan.export, &plan.name, &report.provenance.git_revision);
        let mut exported = crate::export::write_files(&state.graph, state.quantized.as_ref(), &options, run_dir)?;
        if plan.export.check_onnxruntime {
            let order: Vec<usize> = (0..data.test.len()).collect();
            let mut images = Vec::new();
            let mut labels = Vec::new();
            for chunk in order.chunks(250) {
                let (x, y) = data.batcher.batch(&data.test, chunk, &device, None);
                images.extend(shrink_core::host::floats(x)?);
                labels.extend(y.into_data().iter::<i64>().map(|l| l as u32));
            }
            let checked = crate::export::check_with_onnxruntime(
                &state.graph,
                state.quantized.as_ref(),
                &images,
                &labels,
                run_dir,
            )?;
            tracing::info!(onnxruntime = %checked.onnxruntime, "checked by ONNX Runtime");
            exported.onnxruntime = Some(checked);
        }
        report.export = Some(exported);
    }
    crate::report::write_training_curve(report, &run_dir.join("training_curve.svg"))?;
    Ok(())
}

/// The state the first stage to run starts from, and its index: the freshly built model, or,
/// when resuming, what the checkpoint of the last finished stage holds.
fn initial_state(
    plan: &Plan,
    data: &crate::data::Data,
    device: &burn::tensor::Device,
    run_dir: &Path,
    report: &mut Report,
    resuming: bool,
) -> Result<(RunState, usize)> {
    if resuming && let Some(restored) = crate::checkpoint::load(run_dir, device)? {
        tracing::info!(stages_done = restored.stages_done, "resuming from the checkpoint in {}", run_dir.display());
        eprintln!("resuming {} after {} finished stage(s)", run_dir.display(), restored.stages_done);
        report.stages = restored.stages;
        if let Some(r) = report.resumed.last_mut() {
            r.stages_kept = restored.stages_done;
        }
        return Ok((restored.state, restored.stages_done));
    }
    // Initial weights from a generator seeded by the plan: the same on every backend.
    let graph = plan.model.build(data.train.shape, data.train.classes, plan.seed, device)?;
    tracing::info!(model = %plan.model.name(), nodes = graph.nodes.len(), "model built");
    Ok((RunState { graph, fresh: true, uncompressed: None, quantized: None }, 0))
}

/// The kill-and-resume test's hook: with `SHRINK_TEST_STOP_AFTER_STAGES=n`, the run prints a line
/// and waits forever once the checkpoint after `n` finished stages is written, so the test can
/// `kill -9` it at a known point; with `SHRINK_TEST_STOP_ONLY=<run name>` only that run waits (a
/// sweep's one trial). Not for anything else.
fn pause_for_tests(name: &str, stages_done: usize) {
    if std::env::var("SHRINK_TEST_STOP_AFTER_STAGES").ok().and_then(|v| v.parse::<usize>().ok()) == Some(stages_done)
        && std::env::var("SHRINK_TEST_STOP_ONLY").map_or(true, |only| only == name)
    {
        eprintln!("SHRINK_TEST_STOP_AFTER_STAGES={stages_done}: waiting to be killed");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
