//! The experiment TOML: plain serde structs parsed strictly (unknown keys are errors naming the
//! line and column), then validated into a typed [`Plan`] ([`crate::plan`]) before any data
//! loads.
//!
//! The schema is the TOML's surface, flat as users write it: the training keys (`epochs`,
//! `batch_size`, `optimizer`, …) stand in each stage kind that trains, because serde cannot
//! flatten a shared struct into a table that also denies unknown keys. The plan holds them once,
//! as a `TrainSettings`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use shrink_core::BackendKind;
use shrink_core::data::Augmentation;
use shrink_core::metrics::LatencySettings;
use shrink_core::train::{OptimizerSettings, Schedule};
use shrink_core::zoo::ModelSpec;
use shrink_distill::FeaturePair;
use shrink_prune::{Criterion, Granularity, PruneSchedule, SparsityOverride};
use shrink_quant::{Calibrator, Override};

pub use crate::plan::Plan;

mod raw;

/// A config error: exit code 2, message names the file and the line/column or key.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// An experiment as written in TOML.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Run name: the run directory is `<out>/<name>/<timestamp>/`.
    pub name: String,
    /// Seed for weights, data order and augmentation.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `flex` (default), `ndarray` or `wgpu`.
    #[serde(default)]
    pub backend: BackendKind,
    /// CPU threads for burn's CPU backends.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// The data.
    pub data: DataConfig,
    /// The model to build.
    pub model: ModelSpec,
    /// How latency is measured after each stage.
    #[serde(default)]
    pub latency: LatencySettings,
    /// What the run writes besides its own model file.
    // Always written back: `[export] onnx = false` written by hand is then read like any table
    // (skipping the default made the raw check call the table unread).
    #[serde(default)]
    pub export: ExportSettings,
    /// Let prune, quantize and qat stages work on a model no stage trained (a zoo model's
    /// random initial weights): refused unless set, as that is almost always a mistake.
    #[serde(default)]
    pub allow_untrained: bool,
    /// The stages, in order.
    pub stages: Vec<Stage>,
}

/// `[export]`: ONNX files of the final model, written into the run directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSettings {
    /// Write `model.onnx` (the f32 model) and, after a quantize or qat stage, `model.int8.onnx`
    /// (QDQ: ONNX Runtime, TensorRT and OpenVINO run it on integer kernels).
    #[serde(default)]
    pub onnx: bool,
    /// Opset of the default domain: 13 or 17.
    #[serde(default = "default_opset")]
    pub opset: i64,
    /// Fold batch norms into the convolutions of `model.onnx` (the QDQ file always has them
    /// folded).
    #[serde(default)]
    pub fold_batch_norms: bool,
    /// Run both files in ONNX Runtime (Python's `onnxruntime`, which must be installed) on the
    /// test images and report how they agree with shrink's own plans, and which layers ONNX
    /// Runtime runs on integer kernels.
    #[serde(default)]
    pub check_onnxruntime: bool,
}

impl Default for ExportSettings {
    fn default() -> Self {
        Self { onnx: false, opset: default_opset(), fold_batch_norms: false, check_onnxruntime: false }
    }
}

fn default_opset() -> i64 {
    17
}

fn default_seed() -> u64 {
    42
}
fn default_threads() -> usize {
    1
}

/// Where the data comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Source format.
    pub kind: DataKind,
    /// File or folder (relative to the working directory); `mnist5k` defaults to `data/mnist5k`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Use only this many training images (a seeded random subset), for quick runs.
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Use only this many test images (the first ones of a seeded shuffle).
    #[serde(default)]
    pub test_limit: Option<usize>,
    /// Fraction of the training images held out for validation after each epoch.
    #[serde(default)]
    pub validation_fraction: f64,
    /// Training-time augmentation.
    #[serde(default)]
    pub augmentation: Augmentation,
    /// Image size `[height, width]`: what image folders are decoded to (required there); for
    /// the other kinds, the size the images are resized to (bilinear) for the model.
    #[serde(default)]
    pub image_size: Option<[usize; 2]>,
    /// Channels, 1 (grey) or 3 (RGB): what image folders are decoded to (required there); for
    /// the other kinds, what the images are turned into (grey copied to all three, or luma).
    #[serde(default)]
    pub channels: Option<usize>,
    /// The number of classes, when the labels should be checked against it (IDX labels
    /// outside it are refused); absent: the training labels' largest plus one, every class
    /// below it having an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<usize>,
}

/// Data formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    /// The MNIST-5k IDX files that ship in `data/mnist5k`.
    Mnist5k,
    /// A folder with `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
    /// `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]` (MNIST, Fashion-MNIST).
    Idx,
    /// A folder with CIFAR-10's `data_batch_1..5.bin` and `test_batch.bin`.
    Cifar10,
    /// A folder with `train/<class>/*.png` and `test/<class>/*.png`.
    ImageFolder,
}

/// One stage of an experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Stage {
    /// Train the current model. The first stage, training the freshly built model, is the
    /// baseline, and is cached.
    Train {
        /// Passes over the training set.
        epochs: usize,
        /// Images per step.
        batch_size: usize,
        /// Optimiser.
        optimizer: OptimizerSettings,
        /// Learning-rate schedule.
        #[serde(default)]
        schedule: Schedule,
        /// Epochs of linear warm-up.
        #[serde(default)]
        warmup_epochs: f64,
    },
    /// Static post-training quantization: batch norms folded, weights per channel, activations
    /// calibrated on training images; the model then runs on integer kernels in the CPU plan.
    Quantize {
        /// `static` (calibrated activation ranges, every conv and linear layer) or `dynamic`
        /// (linear layers only, activation ranges measured per batch at run time).
        #[serde(default)]
        mode: QuantMode,
        /// Weight bits: 8, 4 or 2.
        #[serde(default = "default_weight_bits")]
        weight_bits: u32,
        /// One weight scale per output channel (true) or per layer.
        #[serde(default = "default_true")]
        per_channel: bool,
        /// Asymmetric weights: `[min, max]` onto all `2^bits` levels with a zero point per
        /// channel (or layer), instead of symmetric `[-max|w|, max|w|]`. Not with `adaround`.
        #[serde(default)]
        asymmetric_weights: bool,
        /// How activation ranges are chosen: `{ kind = "min_max" }`, `{ kind = "moving_average",
        /// momentum = 0.9 }`, `{ kind = "percentile", percentile = 99.99 }`, `{ kind = "mse" }`,
        /// `{ kind = "kl" }`.
        #[serde(default = "default_calibrator")]
        calibrator: Calibrator,
        /// Batches of training images (without augmentation) to calibrate on.
        #[serde(default = "default_calibration_batches")]
        calibration_batches: usize,
        /// Images per calibration batch.
        #[serde(default = "default_calibration_batch")]
        batch_size: usize,
        /// Per-layer exceptions by node-name regex; the first match wins:
        /// `{ pattern = "stem\\.conv", keep_float = true }`, `{ pattern = "layer2\\..*", weight_bits = 4 }`.
        #[serde(default)]
        overrides: Vec<Override>,
        /// Also quantize one layer at a time (the others in f32) and report each layer's effect
        /// on test accuracy and loss, measured on the integer kernels (table + SVG chart).
        #[serde(default)]
        sensitivity: bool,
        /// Correct each layer's bias for the mean shift its weight rounding causes (measured on
        /// the calibration batches; static mode).
        #[serde(default)]
        bias_correction: bool,
        /// Cross-layer equalization before calibration: rescale the channels of consecutive
        /// layers joined by ReLU/pooling so their per-channel weight ranges match (same function).
        #[serde(default)]
        cross_layer_equalization: bool,
        /// Learn each weight's rounding (up or down), layer by layer, on calibration images:
        /// `adaround = {}` for the defaults, or `{ iterations = 500, batch_size = 32, lr = 0.01,
        /// lambda = 0.01, images = 128 }`. Static mode.
        #[serde(default)]
        adaround: Option<shrink_quant::adaround::AdaRoundSettings>,
        /// Activations as `"u8"` (asymmetric, with a zero point; the default) or `"i8"`
        /// (symmetric, zero point 0). Static mode.
        #[serde(default)]
        activations: shrink_quant::ActivationType,
    },
    /// Quantization-aware training: batch norms folded, the layers chosen as static PTQ chooses
    /// them, activation ranges calibrated, then fine-tuning with weights and layer inputs rounded
    /// as the integer kernels round them; the result runs on those kernels.
    Qat {
        /// Fine-tuning epochs.
        epochs: usize,
        /// Images per step.
        batch_size: usize,
        /// Optimiser.
        optimizer: OptimizerSettings,
        /// Learning-rate schedule.
        #[serde(default)]
        schedule: Schedule,
        /// Epochs of linear warm-up.
        #[serde(default)]
        warmup_epochs: f64,
        /// Weight bits: 8, 4 or 2.
        #[serde(default = "default_weight_bits")]
        weight_bits: u32,
        /// One weight scale per output channel (true) or per layer.
        #[serde(default = "default_true")]
        per_channel: bool,
        /// How the initial activation ranges are chosen (as for `quantize`).
        #[serde(default = "default_calibrator")]
        calibrator: Calibrator,
        /// Batches of training images to calibrate the initial ranges on.
        #[serde(default = "default_calibration_batches")]
        calibration_batches: usize,
        /// Images per calibration batch.
        #[serde(default = "default_calibration_batch")]
        calibration_batch_size: usize,
        /// Per-layer exceptions by node-name regex (as for `quantize`).
        #[serde(default)]
        overrides: Vec<Override>,
        /// Learn the weight and activation scales by gradient descent (LSQ).
        #[serde(default)]
        learn_scales: bool,
        /// Without `learn_scales`: the activation ranges follow the training batches (moving
        /// average) until this epoch, then stay fixed. Absent: they follow until the end.
        #[serde(default)]
        freeze_observers_epoch: Option<f64>,
        /// Also learn from the f32 model QAT starts from (distillation as recovery):
        /// `distill = { temperature = 4.0, alpha = 0.5 }`.
        #[serde(default)]
        distill: Option<QatDistill>,
        /// Activations as `"u8"` (asymmetric, with a zero point; the default) or `"i8"`
        /// (symmetric, zero point 0); training rounds them as the kernels will.
        #[serde(default)]
        activations: shrink_quant::ActivationType,
    },
    /// Knowledge distillation: a student learns from one teacher or an ensemble (their softened
    /// outputs, and optionally hint and attention pairs named by node) as well as the labels.
    Distill {
        /// Passes over the training set (the student's budget; the scratch comparison gets the same).
        epochs: usize,
        /// Images per step.
        batch_size: usize,
        /// Optimiser.
        optimizer: OptimizerSettings,
        /// Learning-rate schedule.
        #[serde(default)]
        schedule: Schedule,
        /// Epochs of linear warm-up.
        #[serde(default)]
        warmup_epochs: f64,
        /// Softening temperature T (> 0).
        #[serde(default = "default_temperature")]
        temperature: f64,
        /// Weight α of the teacher term; `1 − α` weighs the labels.
        #[serde(default = "default_alpha")]
        alpha: f64,
        /// The student to build (a zoo model); absent: the current model is the student.
        #[serde(default)]
        student: Option<ModelSpec>,
        /// Teachers, each a baseline trained (and cached) with the settings of the first train
        /// stage: `{ seed = 1 }`, `{ model = { kind = "lenet5" }, seed = 2, weight = 0.5 }`.
        /// Absent: the uncompressed model (the one the last train stage produced).
        #[serde(default)]
        teachers: Vec<TeacherSpec>,
        /// FitNets hints `{ student = "layer2.0.relu", teacher = "layer2.2.relu", weight = 1.0 }`
        /// (first teacher; a learned 1×1 conv maps channel counts that differ).
        #[serde(default)]
        hints: Vec<FeaturePair>,
        /// Attention-transfer pairs, as `hints` (weights of about 1000 are usual).
        #[serde(default)]
        attention: Vec<FeaturePair>,
        /// Students trained with seeds `seed`, `seed + 1`, …; the report gives each and the mean.
        #[serde(default = "default_one")]
        seeds: usize,
        /// Also train the same student alone, same budget and seeds, for comparison (default:
        /// on when `student` is given).
        #[serde(default)]
        compare_scratch: Option<bool>,
    },
    /// Pruning, with fine-tuning: single weights (masked while fine-tuning, zero in the result),
    /// N:M groups, or whole channels removed physically through the graph's coupling groups.
    Prune {
        /// `"weights"` (unstructured), `"channels"` (filters and neurons, removed), or `"N:M"`
        /// such as `"2:4"` (semi-structured).
        #[serde(default = "default_granularity")]
        granularity: Granularity,
        /// Importance: `"l1"`, `"l2"`, `"bn_gamma"` (channels), `"taylor"` or `"random"`.
        #[serde(default = "default_criterion")]
        criterion: Criterion,
        /// Fraction removed: of the weights in scope, or of the channels. Not for N:M.
        #[serde(default)]
        sparsity: Option<f64>,
        /// `"layer"`: the same sparsity in every layer; `"global"`: one ranking over all layers
        /// in scope, within `min_layer_sparsity` and `max_layer_sparsity`.
        #[serde(default)]
        scope: PruneScope,
        /// With `scope = "global"`: the least a layer is pruned.
        #[serde(default)]
        min_layer_sparsity: f64,
        /// With `scope = "global"`: the most a layer is pruned.
        #[serde(default = "default_max_layer_sparsity")]
        max_layer_sparsity: f64,
        /// Layers left dense, by node-name regex (for channels: groups whose producers match).
        #[serde(default)]
        skip: Vec<String>,
        /// Fixed sparsities by node-name regex: `{ pattern = "fc.*", sparsity = 0.5 }`.
        #[serde(default)]
        overrides: Vec<SparsityOverride>,
        /// Channels: each group keeps a multiple of this many channels.
        #[serde(default = "default_one")]
        round_to: usize,
        /// Taylor criterion: training batches of 64 images to accumulate gradients over.
        #[serde(default = "default_taylor_batches")]
        taylor_batches: usize,
        /// Prune each layer (or channel group) alone at these ratios, without fine-tuning, and
        /// report its top-1 (table + SVG chart): on the validation split if there is one, else
        /// on the test split (the report says which).
        #[serde(default)]
        sensitivity: Vec<f64>,
        /// With `sensitivity`: instead of `sparsity`, prune each layer to the largest ratio that
        /// costs at most this much validation top-1 on its own (e.g. 0.01). Needs a validation
        /// split (`data.validation_fraction`).
        #[serde(default)]
        sensitivity_max_drop: Option<f64>,
        /// When pruning happens: `{ kind = "one_shot" }`, `{ kind = "iterative", rounds = 3 }`,
        /// `{ kind = "agp", updates = 10, start_epoch = 0, end_epoch = 6 }`, `{ kind = "lottery",
        /// rounds = 3 }` (the last two for weights and N:M).
        #[serde(default)]
        prune_schedule: PruneSchedule,
        /// Fine-tuning epochs (0: prune only).
        #[serde(default)]
        epochs: usize,
        /// Images per fine-tuning step.
        #[serde(default = "default_train_batch")]
        batch_size: usize,
        /// Fine-tuning optimiser (needed when `epochs` > 0).
        #[serde(default)]
        optimizer: Option<OptimizerSettings>,
        /// Fine-tuning learning-rate schedule.
        #[serde(default)]
        schedule: Schedule,
        /// Epochs of linear warm-up.
        #[serde(default)]
        warmup_epochs: f64,
    },
    /// Evaluate the current model on the test set.
    Evaluate {
        /// Images per evaluation batch.
        #[serde(default = "default_eval_batch")]
        batch_size: usize,
    },
}

/// How a prune stage spreads its sparsity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneScope {
    /// The same sparsity in every layer (or channel group) in scope.
    #[default]
    Layer,
    /// One ranking over all of them.
    Global,
}

fn default_granularity() -> Granularity {
    Granularity::Weights
}
fn default_criterion() -> Criterion {
    Criterion::L1
}
fn default_max_layer_sparsity() -> f64 {
    0.99
}
fn default_train_batch() -> usize {
    64
}
fn default_taylor_batches() -> usize {
    8
}

/// Distillation from the f32 model during QAT.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QatDistill {
    /// Softening temperature T (> 0).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Weight α of the teacher term; `1 − α` weighs the labels.
    #[serde(default = "default_half")]
    pub alpha: f64,
}

fn default_half() -> f64 {
    0.5
}

/// One teacher of a distill stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSpec {
    /// Architecture; absent: the experiment's model.
    #[serde(default)]
    pub model: Option<ModelSpec>,
    /// Seed of its weights and data order; absent: the experiment's seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Weight of its softened outputs in the ensemble mean.
    #[serde(default = "default_weight")]
    pub weight: f64,
}

/// How activations are quantized.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantMode {
    /// Ranges calibrated on training images.
    #[default]
    Static,
    /// Ranges measured on each batch at run time; linear layers only.
    Dynamic,
}

fn default_temperature() -> f64 {
    4.0
}
fn default_alpha() -> f64 {
    0.9
}
fn default_one() -> usize {
    1
}
fn default_weight() -> f64 {
    1.0
}
fn default_eval_batch() -> usize {
    250
}
fn default_weight_bits() -> u32 {
    8
}
fn default_true() -> bool {
    true
}
fn default_calibrator() -> Calibrator {
    Calibrator::MinMax
}
fn default_calibration_batches() -> usize {
    8
}
fn default_calibration_batch() -> usize {
    64
}

impl Stage {
    /// Every stage kind, in the order they usually run (`cargo xtask list` prints it; a test
    /// checks it against the kinds the parser accepts).
    pub const KINDS: [&'static str; 6] = ["train", "distill", "prune", "quantize", "qat", "evaluate"];

    /// The `kind` as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            Stage::Train { .. } => "train",
            Stage::Evaluate { .. } => "evaluate",
            Stage::Quantize { .. } => "quantize",
            Stage::Distill { .. } => "distill",
            Stage::Qat { .. } => "qat",
            Stage::Prune { .. } => "prune",
        }
    }
}

/// The largest config file read: configs are written by hand (the largest in `configs/` is a
/// few kilobytes), and parsing takes several tens of times a file's size in memory, so a
/// larger file is refused before it is parsed.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Parses `path` strictly and validates it into a plan. Nothing is loaded.
///
/// # Errors
/// A [`ConfigError`] naming the file and the line and column (parse errors) or the key
/// (validation errors).
pub fn load_plan(path: &Path) -> Result<Plan> {
    let cannot = |e: std::io::Error| ConfigError(format!("{}: cannot read the config: {e}", path.display()));
    let size = std::fs::metadata(path).map_err(cannot)?.len();
    if size > MAX_CONFIG_BYTES {
        return Err(ConfigError(format!(
            "{}: the config is {size} bytes; configs of up to {MAX_CONFIG_BYTES} bytes are read (a config is written by hand, and parsing takes tens of times its size in memory)",
            path.display()
        ))
        .into());
    }
    let bytes = std::fs::read(path).map_err(cannot)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let offset = e.utf8_error().valid_up_to();
        let text = String::from_utf8_lossy(&e.as_bytes()[..offset]);
        let (line, col) = line_col(&text, offset);
        ConfigError(format!("{}:{line}:{col}: byte {offset}: not UTF-8 text (a TOML file is UTF-8)", path.display()))
    })?;
    parse_plan(&text, path)
}

/// Parses and validates a config's text as [`load_plan`] does; `path` names it in errors and
/// anchors relative data paths.
///
/// # Errors
/// As [`load_plan`].
pub fn parse_plan(text: &str, path: &Path) -> Result<Plan> {
    let at = |offset: usize| {
        let (line, col) = line_col(text, offset);
        format!("{}:{line}:{col}", path.display())
    };
    let located = |e: raw::Located| ConfigError(format!("{}: {}", at(e.offset), e.message));
    let document = raw::Document::parse(text);
    if let Some(doc) = &document {
        doc.check_written_values().map_err(located)?;
    }
    let experiment: Experiment = toml::from_str(text).map_err(|e| {
        let place = e
            .span()
            .map(|span| {
                let (line, col) = line_col(text, refine_span(text, span, e.message()));
                format!(":{line}:{col}")
            })
            .unwrap_or_default();
        ConfigError(format!("{}{place}: {}", path.display(), e.message()))
    })?;
    if let Some(doc) = &document {
        let read = toml::Value::try_from(&experiment)
            .map_err(|e| ConfigError(format!("{}: cannot write the config back: {e}", path.display())))?;
        doc.check_everything_was_read(&read).map_err(located)?;
    }
    crate::plan::validate(path, experiment).map_err(|e| {
        let message = format!("{e:#}");
        let offset = document.as_ref().zip(raw::key_in_message(&message)).and_then(|(doc, key)| doc.locate(key));
        match offset {
            Some(offset) => ConfigError(format!("{}: {message}", at(offset))).into(),
            None => ConfigError(format!("{}: {message}", path.display())).into(),
        }
    })
}

/// Tagged tables (`[[stages]]`, `optimizer = { kind = .. }`) are parsed as a whole, so toml
/// reports the span of the table for an unknown key inside it; point at the key itself.
fn refine_span(text: &str, span: std::ops::Range<usize>, message: &str) -> usize {
    let key = message.strip_prefix("unknown field `").and_then(|rest| rest.split('`').next());
    let Some(key) = key else { return span.start };
    let region = &text[span.start.min(text.len())..span.end.min(text.len())];
    let mut offset = 0;
    for line in region.split_inclusive('\n') {
        for (i, _) in line.match_indices(key) {
            let before = &line[..i];
            let after = line[i + key.len()..].trim_start();
            let starts_entry =
                before.trim().is_empty() || before.trim_end().ends_with('{') || before.trim_end().ends_with(',');
            if starts_entry && after.starts_with('=') {
                return span.start + offset + i;
            }
        }
        offset += line.len();
    }
    span.start
}

pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shrink-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const GOOD: &str = r#"
name = "t"
[data]
kind = "mnist5k"
path = "../data/mnist5k"
[model]
kind = "mlp"
hidden = [8]
[[stages]]
kind = "train"
epochs = 1
batch_size = 10
optimizer = { kind = "sgd", lr = 0.1 }
[[stages]]
kind = "evaluate"
"#;

    #[test]
    fn the_listed_stage_kinds_are_the_parsed_ones() {
        let e = load_plan(&write("kinds.toml", &GOOD.replace("kind = \"evaluate\"", "kind = \"nope\""))).unwrap_err();
        let msg = e.to_string();
        let listed: std::collections::BTreeSet<&str> =
            msg.split("expected one of ").nth(1).unwrap().split(", ").map(|k| k.trim().trim_matches('`')).collect();
        assert_eq!(listed, Stage::KINDS.into_iter().collect(), "{msg}");
    }

    #[test]
    fn a_good_config_validates() {
        let plan = load_plan(&write("good.toml", GOOD)).unwrap();
        assert_eq!(plan.seed, 42);
        assert_eq!(plan.stages.len(), 2);
        assert_eq!(plan.data.shape, [1, 28, 28], "read from the IDX header");
    }

    /// The defaults written out by hand are read like any other setting.
    #[test]
    fn an_export_table_at_its_defaults_validates() {
        let text = GOOD.replace("[model]", "[export]\nonnx = false\n[model]");
        let plan = load_plan(&write("export-off.toml", &text)).unwrap();
        assert!(!plan.export.onnx);
    }

    #[test]
    fn qat_takes_the_activation_type() {
        let qat =
            "[[stages]]\nkind = \"qat\"\nepochs = 1\nbatch_size = 10\noptimizer = { kind = \"sgd\", lr = 0.01 }\n";
        for (line, want) in
            [("", shrink_quant::ActivationType::U8), ("activations = \"i8\"\n", shrink_quant::ActivationType::I8)]
        {
            let text = GOOD.replace("[[stages]]\nkind = \"evaluate\"", &format!("{qat}{line}"));
            let plan = load_plan(&write("qat_i8.toml", &text)).unwrap();
            match &plan.stages[1] {
                crate::plan::StagePlan::Qat(q) => assert_eq!(q.qat.ptq.activations, want),
                other => panic!("{other:?}"),
            }
        }
    }

    /// An IDX folder's image shape comes from its header, so the model validation builds (to
    /// check names) is the one the run trains; a damaged header is refused before anything runs.
    #[test]
    fn the_data_shape_comes_from_the_idx_header() {
        let dir = std::env::temp_dir().join(format!("shrink-config-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut header = vec![0u8, 0, 8, 3];
        for d in [5u32, 16, 12] {
            header.extend_from_slice(&d.to_be_bytes());
        }
        std::fs::write(dir.join("train-images-idx3-ubyte"), &header).unwrap();
        let text = GOOD.replace(
            "kind = \"mnist5k\"\npath = \"../data/mnist5k\"",
            &format!("kind = \"idx\"\npath = {:?}", dir.display().to_string()),
        );
        assert_eq!(load_plan(&write("idx.toml", &text)).unwrap().data.shape, [1, 16, 12]);
        // LeNet-5 does not fit 16 × 12 images: found at validation, where a pattern needs the model.
        let lenet = text.replace("kind = \"mlp\"\nhidden = [8]", "kind = \"lenet5\"").replace(
            "[[stages]]\nkind = \"evaluate\"",
            "[[stages]]\nkind = \"prune\"\nsparsity = 0.5\nskip = [\"conv1\"]",
        );
        let e = format!("{:#}", load_plan(&write("idx_lenet.toml", &lenet)).unwrap_err());
        assert!(e.contains("idx_lenet.toml") && e.contains("conv2"), "{e}");
        std::fs::write(dir.join("train-images-idx3-ubyte"), &header[..9]).unwrap();
        let e = format!("{:#}", load_plan(&write("idx_bad.toml", &text)).unwrap_err());
        assert!(e.contains("data.path") && e.contains("train-images-idx3-ubyte") && e.contains("byte 8"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_config_over_the_size_limit_is_refused_unread() {
        // Millions of stages: parsing would take gigabytes; refused from the file's size.
        let stage = "[[stages]]\nkind = \"evaluate\"\n";
        let text = format!("{GOOD}{}", stage.repeat(MAX_CONFIG_BYTES as usize / stage.len() + 1));
        let e = load_plan(&write("huge.toml", &text)).unwrap_err().to_string();
        assert!(e.contains("huge.toml") && e.contains("configs of up to 1048576 bytes"), "{e}");
    }

    #[test]
    fn a_config_that_is_not_utf8_names_the_byte() {
        let p = write("latin1.toml", "");
        std::fs::write(&p, b"name = \"t\"\n# caf\xe9\n").unwrap();
        let e = load_plan(&p).unwrap_err().to_string();
        assert!(e.contains("latin1.toml:2:6: byte 16: not UTF-8"), "{e}");
    }

    #[test]
    fn misspelt_key_names_file_line_column_and_expected_keys() {
        let text = GOOD.replace("epochs = 1", "epoch = 1");
        let e = load_plan(&write("typo.toml", &text)).unwrap_err().to_string();
        assert!(e.contains("typo.toml:11:1"), "{e}");
        assert!(e.contains("unknown field `epoch`") && e.contains("`epochs`"), "{e}");
    }

    #[test]
    fn values_out_of_range_name_the_key() {
        let cases = [
            (GOOD.replace("lr = 0.1", "lr = -0.1"), "optimizer.lr"),
            (GOOD.replace("hidden = [8]", "hidden = [0]"), "model.hidden"),
            (GOOD.replace("kind = \"mlp\"", "kind = \"transformer\""), "unknown variant `transformer`"),
            (GOOD.replace("kind = \"evaluate\"", "kind = \"explode\""), "unknown variant `explode`"),
            (GOOD.replace("path = \"../data/mnist5k\"", "path = \"/nope\""), "does not exist"),
            (GOOD.replace("name = \"t\"", "name = \"t\"\nbackend = \"tpu\""), "unknown variant `tpu`"),
            (GOOD.replace("epochs = 1", "epochs = \"one\""), "invalid type"),
        ];
        for (text, expected) in cases {
            let e = load_plan(&write("bad.toml", &text)).unwrap_err().to_string();
            assert!(e.contains(expected) && e.contains("bad.toml"), "expected `{expected}` in: {e}");
        }
    }
}
