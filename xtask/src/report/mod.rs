//! What a run reports: the types of `report.json` (this module), `report.md`
//! ([`markdown`]) and the SVG charts ([`charts`]).

pub mod charts;
mod markdown;

pub use charts::{write_prune_sensitivity_chart, write_sensitivity_chart, write_training_curve};
pub use markdown::markdown;

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use shrink_core::metrics::{Latency, LayerStats, ModelStats};
use shrink_core::train::{EpochRecord, Evaluation};

use crate::plan::Plan;

/// Where a run stands; `report.json` writes it in lower case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Not started.
    Pending,
    /// Running, or stopped without finishing (killed).
    Running,
    /// Every stage finished and the model file is written.
    Complete,
    /// A stage failed; the report names it and the error.
    Failed,
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunStatus::Pending => "pending",
            RunStatus::Running => "running",
            RunStatus::Complete => "complete",
            RunStatus::Failed => "failed",
        })
    }
}

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

/// This machine's host name (`unknown` when neither `hostname` nor `/etc/hostname` says).
pub fn hostname() -> String {
    command("hostname", &[])
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

impl Provenance {
    /// Collects provenance now.
    pub fn collect(e: &Plan, started: time::OffsetDateTime) -> Self {
        Self {
            git_revision: git_revision(),
            git_dirty: command("git", &["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty()),
            host: hostname(),
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
    /// The same on the validation split, when the config has one (`data.validation_fraction`):
    /// what a search decides on, so that the test images stay unseen by every choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Evaluation>,
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
    /// The images measured: `validation` when the config has a split, else `test`.
    #[serde(default = "test_split")]
    pub split: String,
}

fn test_split() -> String {
    "test".into()
}

impl StageReport {
    /// An empty report for a stage.
    pub fn new(index: usize, kind: &str) -> Self {
        Self {
            index,
            kind: kind.into(),
            test: None,
            validation: None,
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
    /// Where the run stands.
    pub status: RunStatus,
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
    /// The ONNX files `[export]` wrote, and ONNX Runtime's check of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<crate::export::ExportReport>,
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
    pub previous_status: RunStatus,
    /// Finished stages taken from the checkpoint; the run went on from the next one.
    pub stages_kept: usize,
}

impl Report {
    /// A report for a plan that has not run yet.
    pub fn new(plan: &Plan, provenance: Provenance) -> Self {
        Self {
            name: plan.name.clone(),
            config: plan.source.display().to_string(),
            status: RunStatus::Pending,
            current_stage: None,
            error: None,
            provenance,
            model: plan.model.name(),
            data: None,
            stages: Vec::new(),
            model_file: None,
            export: None,
            resumed: Vec::new(),
            conventions: vec![
                "MACs: 1 MAC = one multiply and one add, conv and linear layers only; FLOPs = 2 x MACs".into(),
                "parameters: trainable values (weights, biases, batch-norm gamma/beta); bytes include batch-norm running statistics, f32".into(),
                "latency: measured wall time of a forward pass after warm-up, median and p90; burn-* = burn's forward incl. read-back, cpu-plan = shrink's frozen CPU plan (batch norm folded, f32 kernels: direct convolutions, GEMM for linear layers), cpu-plan-int8 = the same plan with quantized layers on integer kernels".into(),
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
