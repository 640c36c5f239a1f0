//! `report.json`, `report.md` and the training curve of a run.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use shrink_core::metrics::{Latency, LayerStats, ModelStats};
use shrink_core::train::{EpochRecord, Evaluation};

use crate::config::{Experiment, Plan};

/// Where and how the numbers were produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Provenance {
    /// `git rev-parse HEAD`, or `unknown` outside a checkout.
    pub git_revision: String,
    /// Whether the working tree had uncommitted changes.
    pub git_dirty: bool,
    /// Host name.
    pub host: String,
    /// CPU model.
    pub cpu: String,
    /// Backend named in the config.
    pub backend: String,
    /// CPU threads in use.
    pub threads: usize,
    /// Seed.
    pub seed: u64,
    /// shrink's version.
    pub shrink_version: String,
    /// burn's version.
    pub burn_version: String,
    /// Build profile of the xtask (`release` or `debug`).
    pub profile: String,
    /// Start, UTC (RFC 3339).
    pub started_utc: String,
    /// End, UTC (RFC 3339); empty while running.
    pub finished_utc: String,
}

/// RFC 3339 text of a time.
pub fn utc(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

fn command(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `git rev-parse HEAD`, or `unknown` outside a checkout.
pub fn git_revision() -> String {
    command("git", &["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into())
}

/// The CPU's model name (Linux), else the architecture.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

impl Provenance {
    /// Collects provenance now.
    pub fn collect(e: &Experiment, started: time::OffsetDateTime) -> Self {
        Self {
            git_revision: git_revision(),
            git_dirty: command("git", &["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty()),
            host: command("hostname", &[])
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string()))
                .unwrap_or_else(|| "unknown".into()),
            cpu: cpu_model(),
            backend: e.backend.name().into(),
            threads: e.threads,
            seed: e.seed,
            shrink_version: env!("CARGO_PKG_VERSION").into(),
            burn_version: shrink_core::BURN_VERSION.into(),
            profile: if cfg!(debug_assertions) { "debug" } else { "release" }.into(),
            started_utc: utc(started),
            finished_utc: String::new(),
        }
    }
}

/// Sizes of the data actually used.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataSummary {
    /// Training images.
    pub train: usize,
    /// Validation images.
    pub validation: usize,
    /// Test images.
    pub test: usize,
    /// `[channels, height, width]`.
    pub shape: [usize; 3],
    /// Classes.
    pub classes: usize,
}

/// What one stage did and what the model measured after it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageReport {
    /// Position in the config.
    pub index: usize,
    /// Stage kind.
    pub kind: String,
    /// Test metrics after the stage.
    pub test: Option<Evaluation>,
    /// Trainable parameters.
    pub params: usize,
    /// Non-zero parameters.
    pub nonzeros: usize,
    /// Bytes of the model as stored (f32).
    pub bytes: usize,
    /// Multiply-accumulates per image.
    pub macs: u64,
    /// Measured forward latency, labelled with what ran it.
    pub latency: Vec<Latency>,
    /// Per-layer size and cost.
    pub layers: Vec<LayerStats>,
    /// Per-epoch training record (train stages).
    pub history: Vec<EpochRecord>,
    /// Training wall time, seconds (train stages; for a cached baseline, the original time).
    pub train_seconds: Option<f64>,
    /// Key under which this stage's result was cached.
    pub cache_key: Option<String>,
    /// Key of the cached baseline this stage reused instead of training.
    pub cached_baseline: Option<String>,
    /// Wall time of the stage in this run, seconds (measurement included).
    pub wall_seconds: f64,
    /// What computed `test`: `burn-flex` (f32 on burn) or `cpu-plan-int8` (the integer kernels).
    #[serde(default)]
    pub evaluated_on: String,
    /// Size of this stage's model file, bytes (as written: f32, or packed integers + scales).
    #[serde(default)]
    pub file_bytes: usize,
    /// What a quantize stage did and measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantSummary>,
    /// What a distill stage did and measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distillation: Option<DistillSummary>,
    /// What a prune stage did and measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<PruneSummary>,
}

/// What a prune stage did, before and after.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PruneSummary {
    /// One line: granularity, criterion, scope, schedule, fine-tuning.
    pub method: String,
    /// How the pruned model runs and is stored (dense kernels on zeros, or smaller tensors).
    pub execution: String,
    /// The pruning steps: when (fine-tuning epoch) and to which sparsity.
    pub events: Vec<shrink_prune::PruneEvent>,
    /// Weight sparsity reached over the conv and linear weights in scope (weights and N:M).
    pub weight_sparsity: Option<f64>,
    /// Channel groups (structured): producers, channels before, channels kept.
    pub groups: Vec<(String, usize, usize)>,
    /// Per-layer size and cost before the stage.
    pub layers_before: Vec<LayerStats>,
    /// Totals before the stage: parameters, non-zeros, MACs per image, model file bytes.
    pub params_before: usize,
    /// See `params_before`.
    pub nonzeros_before: usize,
    /// See `params_before`.
    pub macs_before: u64,
    /// See `params_before`.
    pub file_bytes_before: usize,
    /// Test metrics and latency of the model before the stage (the previous stage's).
    pub test_before: Option<Evaluation>,
    /// See `test_before`.
    pub latency_before: Vec<Latency>,
    /// Layers the sparse CPU plan runs on sparse kernels: `(layer, kernel)`.
    #[serde(default)]
    pub sparse_kernels: Vec<(String, String)>,
    /// Test metrics of the sparse CPU plan (the same model, on the sparse kernels).
    #[serde(default)]
    pub sparse_test: Option<Evaluation>,
    /// Each layer pruned alone (when asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<PruneSensitivity>,
    /// Lottery tickets: each round's sparsity and its last retraining epoch's training accuracy.
    #[serde(default)]
    pub tickets: Vec<(f64, Option<f64>)>,
}

/// Layers (or channel groups) pruned alone at several ratios, without fine-tuning.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PruneSensitivity {
    /// `validation` or `test`.
    pub evaluated_on: String,
    /// Top-1 and loss of the unpruned model on that split.
    pub reference_top1: f64,
    /// See `reference_top1`.
    pub reference_loss: f64,
    /// Per unit: `(ratio, top-1, loss)` points.
    pub units: Vec<shrink_prune::UnitSensitivity>,
    /// With a top-1 budget: the sparsity each unit got.
    pub chosen: Vec<(String, f64)>,
    /// The chart's file name in the run directory.
    pub chart: String,
}

/// Draws each unit's top-1 against its pruning ratio (SVG).
pub fn write_prune_sensitivity_chart(title: &str, sens: &PruneSensitivity, path: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let lo = sens.units.iter().flat_map(|u| u.points.iter().map(|p| p.1)).fold(sens.reference_top1, f64::min).max(0.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{title}: {} top-1, one layer pruned at a time", sens.evaluated_on), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..1.0, (lo - 0.01)..(sens.reference_top1 + 0.01).min(1.0))
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc("ratio pruned").y_desc("top-1").draw().map_err(|e| err(&e))?;
        for (i, u) in sens.units.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points: Vec<(f64, f64)> =
                std::iter::once((0.0, sens.reference_top1)).chain(u.points.iter().map(|p| (p.0, p.1))).collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(u.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 10))
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    shrink_core::io::write_atomic(path, svg.as_bytes())?;
    Ok(())
}

/// Test accuracy of one model of a distill stage (measured on burn, f32).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelResult {
    /// What it is: `teacher 0`, `ensemble of 3`, `distilled`, `trained alone`.
    pub label: String,
    /// Architecture name.
    pub model: String,
    /// Seed of its weights and data order.
    pub seed: Option<u64>,
    /// Test top-1.
    pub top1: f64,
    /// Misclassified test images.
    pub errors: usize,
    /// Test cross-entropy (for the ensemble: negative log-likelihood of its mean probabilities).
    pub loss: f64,
}

/// One student seed: distilled, and trained alone with the same budget.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StudentRun {
    /// Seed of the student's initial weights and data order.
    pub seed: u64,
    /// Distilled from the teachers.
    pub distilled: ModelResult,
    /// The same student, same initial weights, budget and data order, trained on labels only.
    pub scratch: Option<ModelResult>,
}

/// What a distill stage did and what it achieved.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DistillSummary {
    /// Objective, in words (temperature, α, hint and attention pairs).
    pub objective: String,
    /// Each teacher.
    pub teachers: Vec<ModelResult>,
    /// The ensemble, when there are several teachers.
    pub ensemble: Option<ModelResult>,
    /// Student architecture.
    pub student: String,
    /// One entry per student seed.
    pub runs: Vec<StudentRun>,
    /// Whether the teachers' softened outputs were computed once and reused each epoch.
    pub teacher_outputs_cached: bool,
    /// Mean test errors of the distilled students.
    pub mean_errors_distilled: f64,
    /// Mean test errors of the students trained alone.
    pub mean_errors_scratch: Option<f64>,
    /// `1 − distilled / alone` mean errors: the fraction of errors distillation removed.
    pub error_reduction: Option<f64>,
    /// With several teachers: `(best teacher's errors − distilled errors) / (best teacher's
    /// errors − ensemble's errors)`, the share of the ensemble's gain the student keeps; absent
    /// when the ensemble is not better than its best teacher.
    pub ensemble_gain_kept: Option<f64>,
}

impl DistillSummary {
    /// Derives the means and ratios from the measured runs.
    pub fn new(
        settings: &shrink_distill::DistillSettings,
        teachers: Vec<ModelResult>,
        ensemble: Option<ModelResult>,
        student: String,
        runs: Vec<StudentRun>,
        teacher_outputs_cached: bool,
        adapters: Vec<shrink_distill::AdapterInfo>,
    ) -> Self {
        let mean = |v: Vec<usize>| v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
        let mean_errors_distilled = mean(runs.iter().map(|r| r.distilled.errors).collect());
        let mean_errors_scratch = runs
            .iter()
            .all(|r| r.scratch.is_some())
            .then(|| mean(runs.iter().filter_map(|r| r.scratch.as_ref().map(|s| s.errors)).collect()));
        let error_reduction = mean_errors_scratch.filter(|s| *s > 0.0).map(|s| 1.0 - mean_errors_distilled / s);
        let best_teacher = teachers.iter().map(|t| t.errors).min().unwrap_or(0) as f64;
        let ensemble_gain_kept = ensemble
            .as_ref()
            .filter(|en| (en.errors as f64) < best_teacher)
            .map(|en| (best_teacher - mean_errors_distilled) / (best_teacher - en.errors as f64));
        // Short decimals: 1 - 0.9 prints as 0.1, not 0.09999999999999998.
        let num = |v: f64| format!("{}", (v * 1e6).round() / 1e6);
        let mut objective = format!(
            "{} · T² · KL(teacher ‖ student) at T = {} + {} · cross-entropy on the labels",
            num(settings.alpha),
            num(settings.temperature),
            num(1.0 - settings.alpha)
        );
        for p in &settings.hints {
            let adapter = adapters
                .iter()
                .find(|a| a.student == p.student && a.teacher == p.teacher)
                .map(|a| format!(" through a learned 1×1 conv {}→{}", a.channels[0], a.channels[1]))
                .unwrap_or_default();
            objective += &format!(" + {} · hint MSE(`{}`{adapter}, teacher `{}`)", num(p.weight), p.student, p.teacher);
        }
        for p in &settings.attention {
            objective +=
                &format!(" + {} · attention transfer(`{}`, teacher `{}`)", num(p.weight), p.student, p.teacher);
        }
        DistillSummary {
            objective,
            teachers,
            ensemble,
            student,
            runs,
            teacher_outputs_cached,
            mean_errors_distilled,
            mean_errors_scratch,
            error_reduction,
            ensemble_gain_kept,
        }
    }
}

/// What a quantize stage did, and the accuracy of both ways of running the result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuantSummary {
    /// `static post-training`.
    pub method: String,
    /// e.g. `int8 weights, symmetric, per channel`.
    pub weights: String,
    /// e.g. `u8 asymmetric per tensor`.
    pub activations: String,
    /// Calibrator and its parameters.
    pub calibrator: String,
    /// Training images the calibration saw.
    pub calibration_images: usize,
    /// Each quantized layer: name, weight bits, and the kernel the plan runs it on.
    pub quantized_layers: Vec<(String, u32, String)>,
    /// Layers left in f32 and why.
    pub float_layers: Vec<(String, String)>,
    /// Integer GEMM kernel rten picked for this CPU.
    pub int8_gemm: String,
    /// Test metrics of the simulated model (fake-quant on burn, f32 arithmetic).
    pub simulated_test: Evaluation,
    /// What ran the simulated model: `burn-flex`, `burn-ndarray` or `burn-wgpu`.
    #[serde(default)]
    pub simulated_on: String,
    /// Size of the f32 model file before quantization, bytes.
    pub f32_file_bytes: usize,
    /// Per-layer sensitivity (when asked for): the f32 reference, then each layer quantized
    /// alone, most harmful first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<Sensitivity>,
    /// After QAT: post-training quantization with the same settings, on the integer kernels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ptq_test: Option<Evaluation>,
}

/// One layer at a time quantized, measured on the integer kernels.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sensitivity {
    /// Test top-1 and loss of the folded f32 model on the CPU plan.
    pub reference_top1: f64,
    /// See `reference_top1`.
    pub reference_loss: f64,
    /// `(layer, top-1, loss)` with only that layer quantized, sorted by loss, highest first.
    pub layers: Vec<(String, f64, f64)>,
    /// The chart's file name in the run directory.
    pub chart: String,
}

impl StageReport {
    /// An empty report for a stage.
    pub fn new(index: usize, kind: &str) -> Self {
        Self {
            index,
            kind: kind.into(),
            test: None,
            params: 0,
            nonzeros: 0,
            bytes: 0,
            macs: 0,
            latency: Vec::new(),
            layers: Vec::new(),
            history: Vec::new(),
            train_seconds: None,
            cache_key: None,
            cached_baseline: None,
            wall_seconds: 0.0,
            evaluated_on: String::new(),
            file_bytes: 0,
            quantization: None,
            distillation: None,
            pruning: None,
        }
    }

    /// Fills in the measurements.
    pub fn set_measurements(&mut self, eval: Evaluation, stats: ModelStats, latency: Vec<Latency>) {
        self.test = Some(eval);
        self.params = stats.params;
        self.nonzeros = stats.nonzeros;
        self.bytes = stats.bytes;
        self.macs = stats.macs;
        self.layers = stats.layers;
        self.latency = latency;
    }
}

/// The whole report of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// Experiment name.
    pub name: String,
    /// Config file.
    pub config: String,
    /// `running`, `complete` or `failed`.
    pub status: String,
    /// The stage running when the report was written (set while running, and kept on failure).
    pub current_stage: Option<String>,
    /// Error, when failed.
    pub error: Option<String>,
    /// Provenance.
    pub provenance: Provenance,
    /// Model name.
    pub model: String,
    /// Data used.
    pub data: Option<DataSummary>,
    /// Stages finished.
    pub stages: Vec<StageReport>,
    /// Model file in the run directory.
    pub model_file: Option<String>,
    /// Conventions behind the numbers.
    pub conventions: Vec<String>,
    /// Each time the run was resumed from its checkpoint after it stopped unfinished.
    #[serde(default)]
    pub resumed: Vec<Resumption>,
}

/// One resumption of an unfinished run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Resumption {
    /// When, UTC.
    pub utc: String,
    /// The status the run had been left with (`running` when it was killed).
    pub previous_status: String,
    /// Finished stages taken from the checkpoint; the run went on from the next one.
    pub stages_kept: usize,
}

impl Report {
    /// A report for a plan that has not run yet.
    pub fn new(plan: &Plan, provenance: Provenance) -> Self {
        Self {
            name: plan.experiment.name.clone(),
            config: plan.source.display().to_string(),
            status: "pending".into(),
            current_stage: None,
            error: None,
            provenance,
            model: plan.experiment.model.name(),
            data: None,
            stages: Vec::new(),
            model_file: None,
            resumed: Vec::new(),
            conventions: vec![
                "MACs: 1 MAC = one multiply and one add, conv and linear layers only; FLOPs = 2 x MACs".into(),
                "parameters: trainable values (weights, biases, batch-norm gamma/beta); bytes include batch-norm running statistics, f32".into(),
                "latency: measured wall time of a forward pass after warm-up, median and p90; burn-* = burn's forward incl. read-back, cpu-plan = shrink's frozen CPU plan (batch norm folded, f32 GEMM kernels), cpu-plan-int8 = the same plan with quantized layers on integer kernels".into(),
                "accuracy: measured on the test split after each stage, by what `evaluated on` names: after a quantize stage, the integer kernels; the simulated (fake-quant) accuracy is shown beside it".into(),
                "file: size of the stage's model file as shrink writes it (safetensors; f32, or packed integer weights + f32 scales)".into(),
            ],
        }
    }
}

/// Writes `report.json` and `report.md` into `dir`, atomically.
pub fn write_report(report: &Report, dir: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(report).context("serialising the report")?;
    shrink_core::io::write_atomic(&dir.join("report.json"), json.as_bytes())?;
    shrink_core::io::write_atomic(&dir.join("report.md"), markdown(report).as_bytes())?;
    Ok(())
}

fn mb(bytes: usize) -> String {
    format!("{:.3} MB", bytes as f64 / 1e6)
}

/// The report as a table a person reads.
pub fn markdown(r: &Report) -> String {
    let p = &r.provenance;
    let mut s = format!("# {} — {}\n\n", r.name, r.status);
    s += &format!(
        "- config: `{}`; model: `{}`\n- backend: {} ({} thread(s)); seed {}\n- git {}{}; host {}; CPU {}\n- shrink {}, burn {}, {} build\n- started {} finished {}\n",
        r.config,
        r.model,
        p.backend,
        p.threads,
        p.seed,
        p.git_revision,
        if p.git_dirty { " (dirty)" } else { "" },
        p.host,
        p.cpu,
        p.shrink_version,
        p.burn_version,
        p.profile,
        p.started_utc,
        if p.finished_utc.is_empty() { "-" } else { &p.finished_utc },
    );
    if let Some(d) = &r.data {
        s += &format!(
            "- data: {} train, {} validation, {} test images of {:?}, {} classes\n",
            d.train, d.validation, d.test, d.shape, d.classes
        );
    }
    for x in &r.resumed {
        s += &format!(
            "- resumed {} from its checkpoint after {} finished stage(s) (it had been left `{}`)\n",
            x.utc, x.stages_kept, x.previous_status
        );
    }
    if let Some(err) = &r.error {
        s += &format!("\n**Failed** in stage {}: {err}\n", r.current_stage.as_deref().unwrap_or("?"));
    }
    s += "\n| # | stage | test top-1 | top-5 | loss | evaluated on | params | non-zeros | file | MACs | latency (median / p90) | wall |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for st in &r.stages {
        let (top1, top5, loss) = st
            .test
            .as_ref()
            .map(|t| (format!("{:.4}", t.top1), format!("{:.4}", t.top5), format!("{:.4}", t.loss)))
            .unwrap_or_default();
        let lat: Vec<String> = st
            .latency
            .iter()
            .map(|l| {
                format!("b{}: {:.3} / {:.3} ms ({}, {}t)", l.batch_size, l.median_ms, l.p90_ms, l.runner, l.threads)
            })
            .collect();
        let mut kind = st.kind.clone();
        if let Some(k) = &st.cached_baseline {
            kind += &format!(" (cached baseline {k})");
        }
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1}s |\n",
            st.index,
            kind,
            top1,
            top5,
            loss,
            st.evaluated_on,
            st.params,
            st.nonzeros,
            mb(st.file_bytes),
            st.macs,
            lat.join("<br>"),
            st.wall_seconds
        );
    }
    for st in &r.stages {
        let Some(p) = &st.pruning else { continue };
        s += &format!("\n## Pruning, stage {}\n\n- method: {}\n- execution: {}\n", st.index, p.method, p.execution);
        if let (Some(before), Some(after)) = (&p.test_before, &st.test) {
            s += &format!(
                "- test top-1 {:.4} → **{:.4}** ({:+.2} pp), {} → {} errors\n",
                before.top1,
                after.top1,
                (after.top1 - before.top1) * 100.0,
                before.errors(),
                after.errors()
            );
        }
        if let Some(t) = &p.sparse_test {
            s += &format!(
                "- on the sparse CPU plan (`cpu-plan-sparse`): test top-1 {:.4}; sparse kernels for {}\n",
                t.top1,
                p.sparse_kernels.iter().map(|(l, k)| format!("{l} ({k})")).collect::<Vec<_>>().join(", ")
            );
        }
        if let Some(w) = p.weight_sparsity {
            s += &format!("- weight sparsity of the pruned layers: **{:.2} %**\n", w * 100.0);
        }
        s += &format!(
            "- parameters {} → {} ({:.3}×); non-zeros {} → {} ({:.3}×); MACs per image {} → {} ({:.3}×); model file {} → {} ({:.3}×)\n",
            p.params_before,
            st.params,
            st.params as f64 / p.params_before.max(1) as f64,
            p.nonzeros_before,
            st.nonzeros,
            st.nonzeros as f64 / p.nonzeros_before.max(1) as f64,
            p.macs_before,
            st.macs,
            st.macs as f64 / p.macs_before.max(1) as f64,
            mb(p.file_bytes_before),
            mb(st.file_bytes),
            st.file_bytes as f64 / p.file_bytes_before.max(1) as f64
        );
        for after in &st.latency {
            // The sparse plan replaces the dense plan of the model before pruning.
            let runner = if after.runner == "cpu-plan-sparse" { "cpu-plan" } else { after.runner.as_str() };
            if let Some(before) = p
                .latency_before
                .iter()
                .find(|b| b.runner == runner && b.batch_size == after.batch_size && b.threads == after.threads)
            {
                s += &format!(
                    "- latency {} b{} ({}t): {:.3} → {:.3} ms median, **{:.2}×** faster (measured in this run, one after the other)\n",
                    if runner == after.runner {
                        after.runner.clone()
                    } else {
                        format!("{runner} → {}", after.runner)
                    },
                    after.batch_size,
                    after.threads,
                    before.median_ms,
                    after.median_ms,
                    before.median_ms / after.median_ms.max(1e-9)
                );
            }
        }
        if !p.events.is_empty() {
            let ev: Vec<String> =
                p.events.iter().map(|e| format!("{:.2} @ epoch {:.2}", e.sparsity, e.epoch)).collect();
            s += &format!("- schedule: {}\n", ev.join(", "));
        }
        if !p.tickets.is_empty() {
            let t: Vec<String> = p
                .tickets
                .iter()
                .map(|(sp, acc)| match acc {
                    Some(a) => format!("{:.3} (train top-1 {a:.4})", sp),
                    None => format!("{sp:.3}"),
                })
                .collect();
            s += &format!("- lottery-ticket rounds (sparsity after each): {}\n", t.join(", "));
        }
        if let Some(sens) = &p.sensitivity {
            s += &format!(
                "\n### Sensitivity: one layer pruned at a time, no fine-tuning\n\nMeasured on the {} split (unpruned: top-1 {:.4}, loss {:.4}). Chart: `{}`.\n\n| layer | ratio: top-1 |\n|---|---|\n",
                sens.evaluated_on, sens.reference_top1, sens.reference_loss, sens.chart
            );
            for u in &sens.units {
                let pts: Vec<String> = u.points.iter().map(|(r, t, _)| format!("{r:.2}: {t:.4}")).collect();
                s += &format!("| {} | {} |\n", u.name, pts.join(", "));
            }
            if !sens.chosen.is_empty() {
                let c: Vec<String> = sens.chosen.iter().map(|(n, r)| format!("{n} {r:.2}")).collect();
                s += &format!("\nSparsity chosen per layer for the top-1 budget: {}\n", c.join(", "));
            }
        }
        if !p.groups.is_empty() {
            s += "\n| channel group (producers) | channels | kept |\n|---|---|---|\n";
            for (name, n, kept) in &p.groups {
                s += &format!("| {name} | {n} | {kept} |\n");
            }
        }
        s += "\n| layer | params before | after | non-zeros before | after | removed or zero | MACs before | after |\n|---|---|---|---|---|---|---|---|\n";
        for b in &p.layers_before {
            let Some(a) = st.layers.iter().find(|l| l.name == b.name) else { continue };
            s += &format!(
                "| {} | {} | {} | {} | {} | {:.1} % | {} | {} |\n",
                b.name,
                b.params,
                a.params,
                b.nonzeros,
                a.nonzeros,
                100.0 * (1.0 - a.nonzeros as f64 / b.params.max(1) as f64),
                b.macs,
                a.macs
            );
        }
    }
    for st in &r.stages {
        let Some(q) = &st.quantization else { continue };
        let int = st.test.as_ref().map(|t| t.top1).unwrap_or_default();
        s += &format!("\n## Quantization, stage {}\n\n", st.index);
        s += &format!(
            "- method: {}; weights: {}; activations: {}; calibrator: {} on {} training images\n",
            q.method, q.weights, q.activations, q.calibrator, q.calibration_images
        );
        s += &format!(
            "- test top-1 **measured on the integer kernels** (`cpu-plan-int8`, {}): {int:.4}; simulated (fake-quant on `{}`, f32 arithmetic): {:.4}\n",
            q.int8_gemm, q.simulated_on, q.simulated_test.top1
        );
        if let Some(p) = &q.ptq_test {
            s += &format!(
                "- for comparison, post-training quantization with the same settings (integer kernels): {:.4}\n",
                p.top1
            );
        }
        s += &format!(
            "- model file: {} (f32 before: {}, ratio {:.3})\n",
            mb(st.file_bytes),
            mb(q.f32_file_bytes),
            st.file_bytes as f64 / q.f32_file_bytes.max(1) as f64
        );
        if let Some(sens) = &q.sensitivity {
            let worst: Vec<&str> = sens.layers.iter().take(3).map(|(n, _, _)| n.as_str()).collect();
            s += &format!(
                "\n### Sensitivity: one layer quantized at a time\n\nMeasured on the integer kernels against the f32 plan (top-1 {:.4}, loss {:.4}); most sensitive: {}. Chart: `{}`.\n\n| layer | top-1 | Δ top-1 (pp) | loss | Δ loss |\n|---|---|---|---|---|\n",
                sens.reference_top1,
                sens.reference_loss,
                worst.join(", "),
                sens.chart
            );
            for (name, top1, loss) in &sens.layers {
                s += &format!(
                    "| {name} | {top1:.4} | {:+.2} | {loss:.4} | {:+.5} |\n",
                    (top1 - sens.reference_top1) * 100.0,
                    loss - sens.reference_loss
                );
            }
        }
        s += "\n| layer | weight bits | kernel |\n|---|---|---|\n";
        for (name, bits, kernel) in &q.quantized_layers {
            s += &format!("| {name} | {bits} | {kernel} |\n");
        }
        for (name, why) in &q.float_layers {
            s += &format!("| {name} | f32 | {why} |\n");
        }
    }
    for st in &r.stages {
        let Some(d) = &st.distillation else { continue };
        s += &format!("\n## Distillation, stage {}\n\n", st.index);
        s += &format!("- objective: {}\n", d.objective);
        s += &format!(
            "- teachers run frozen, without autodiff; their softened outputs were {}\n",
            if d.teacher_outputs_cached {
                "computed once and reused every epoch (no augmentation, no feature pairs)"
            } else {
                "computed on every batch"
            }
        );
        s += "- every accuracy below is measured on the test split, on burn (f32)\n\n";
        s += "| model | architecture | seed | test top-1 | errors | loss |\n|---|---|---|---|---|---|\n";
        let row = |m: &ModelResult| {
            format!(
                "| {} | {} | {} | {:.4} | {} | {:.4} |\n",
                m.label,
                m.model,
                m.seed.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                m.top1,
                m.errors,
                m.loss
            )
        };
        for t in &d.teachers {
            s += &row(t);
        }
        if let Some(en) = &d.ensemble {
            s += &row(en);
        }
        for run in &d.runs {
            if let Some(alone) = &run.scratch {
                s += &row(alone);
            }
            s += &row(&run.distilled);
        }
        s += &format!(
            "\nStudent `{}`, {} seed(s): mean test errors distilled {:.1}",
            d.student,
            d.runs.len(),
            d.mean_errors_distilled
        );
        if let Some(alone) = d.mean_errors_scratch {
            s += &format!(", trained alone {alone:.1}");
        }
        if let Some(red) = d.error_reduction {
            s += &format!("; distillation removed **{:.1} %** of the errors", red * 100.0);
        }
        s += ".\n";
        if let Some(en) = &d.ensemble {
            match d.ensemble_gain_kept {
                Some(kept) => {
                    s += &format!(
                        "The ensemble makes {} errors; the student keeps **{:.0} %** of its gain over the best single teacher.\n",
                        en.errors,
                        kept * 100.0
                    )
                }
                None => {
                    s += &format!(
                        "The ensemble ({} errors) is not better than its best teacher: no gain to keep.\n",
                        en.errors
                    )
                }
            }
        }
    }
    for st in r.stages.iter().filter(|st| !st.history.is_empty()) {
        s += &format!("\n## Training, stage {}\n\n", st.index);
        if let Some(t) = st.train_seconds {
            s += &format!(
                "Training time: {t:.1} s{}\n\n",
                if st.cached_baseline.is_some() { " (when the cached baseline was trained)" } else { "" }
            );
        }
        s += "| epoch | train loss | train acc | val acc | lr | seconds |\n|---|---|---|---|---|---|\n";
        for h in &st.history {
            let val = h.validation.as_ref().map(|v| format!("{:.4}", v.top1)).unwrap_or_else(|| "-".into());
            s += &format!(
                "| {} | {:.4} | {:.4} | {} | {:.5} | {:.1} |\n",
                h.epoch, h.train_loss, h.train_accuracy, val, h.lr, h.seconds
            );
        }
    }
    if let Some(last) = r.stages.last() {
        if let Some(t) = &last.test {
            s += "\n## Per-class test accuracy (last stage)\n\n| class | accuracy |\n|---|---|\n";
            for (c, a) in t.per_class_accuracy.iter().enumerate() {
                s += &format!("| {c} | {a:.4} |\n");
            }
        }
        s += "\n## Layers (last stage)\n\n| layer | kind | params | non-zeros | MACs | output |\n|---|---|---|---|---|---|\n";
        for l in &last.layers {
            s +=
                &format!("| {} | {} | {} | {} | {} | {:?} |\n", l.name, l.kind, l.params, l.nonzeros, l.macs, l.output);
        }
    }
    s += "\n## Conventions\n\n";
    for c in &r.conventions {
        s += &format!("- {c}\n");
    }
    s
}

/// Draws the loss increase of each layer quantized alone as a horizontal bar chart (SVG).
pub fn write_sensitivity_chart(title: &str, sens: &Sensitivity, path: &Path) -> Result<()> {
    let n = sens.layers.len().max(1);
    let deltas: Vec<f64> = sens.layers.iter().map(|(_, _, loss)| loss - sens.reference_loss).collect();
    let lo = deltas.iter().copied().fold(0.0, f64::min);
    let hi = deltas.iter().copied().fold(0.0, f64::max).max(lo + 1e-6);
    let mut svg = String::new();
    {
        let height = 80 + 22 * n as u32;
        let root = SVGBackend::with_string(&mut svg, (800, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let names: Vec<String> = sens.layers.iter().map(|(name, _, _)| name.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{title}: test-loss increase, one layer quantized"), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(170)
            .build_cartesian_2d(lo..hi * 1.05, -0.5..n as f64 - 0.5)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Bar i (most harmful first, at the top) is centred on y = n - 1 - i.
        chart
            .configure_mesh()
            .y_labels(n)
            .y_label_formatter(&|y| {
                let i = n as f64 - 1.0 - y;
                if (y - y.round()).abs() > 1e-6 || i < -1e-6 {
                    return String::new();
                }
                names.get(i.round() as usize).cloned().unwrap_or_default()
            })
            .x_desc("Δ loss vs f32")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(deltas.iter().enumerate().map(|(i, &d)| {
                let y = (n - 1 - i) as f64;
                Rectangle::new([(0.0, y - 0.35), (d, y + 0.35)], BLUE.filled())
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    shrink_core::io::write_atomic(path, svg.as_bytes())?;
    Ok(())
}

/// Draws training loss and accuracy per epoch of every train stage as an SVG.
pub fn write_training_curve(r: &Report, path: &Path) -> Result<()> {
    let points: Vec<(f64, f64, f64, Option<f64>)> = r
        .stages
        .iter()
        .flat_map(|st| st.history.iter())
        .enumerate()
        .map(|(i, h)| ((i + 1) as f64, h.train_loss, h.train_accuracy, h.validation.as_ref().map(|v| v.top1)))
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (left, right) = root.split_horizontally(400);
        let n = points.len().max(1) as f64;
        let max_loss = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.05;
        let mut loss_chart = ChartBuilder::on(&left)
            .caption(format!("{}: training loss", r.name), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0.5..n + 0.5, 0.0..max_loss)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        loss_chart.configure_mesh().x_desc("epoch").y_desc("loss").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
        loss_chart
            .draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.1)), &RED))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let min_acc = points.iter().map(|p| p.2.min(p.3.unwrap_or(1.0))).fold(1.0, f64::min).min(0.9);
        let mut acc_chart = ChartBuilder::on(&right)
            .caption("accuracy (train: blue, validation: green)", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0.5..n + 0.5, min_acc..1.0)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        acc_chart.configure_mesh().x_desc("epoch").y_desc("accuracy").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
        acc_chart
            .draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.2)), &BLUE))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        acc_chart
            .draw_series(LineSeries::new(points.iter().filter_map(|p| p.3.map(|v| (p.0, v))), &GREEN))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    shrink_core::io::write_atomic(path, svg.as_bytes())?;
    Ok(())
}
