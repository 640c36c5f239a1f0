//! The experiment TOML: plain serde structs parsed strictly, then validated into a [`Plan`]
//! before any data loads.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use shrink_core::BackendKind;
use shrink_core::data::Augmentation;
use shrink_core::metrics::LatencySettings;
use shrink_core::train::{OptimizerSettings, Schedule, TrainSettings};
use shrink_core::zoo::ModelSpec;
use shrink_distill::{DistillSettings, FeaturePair};
use shrink_prune::{Criterion, Granularity, PruneSchedule, PruneSettings, SparsityOverride};
use shrink_quant::{Calibrator, Override};

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
    /// The stages, in order.
    pub stages: Vec<Stage>,
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
    /// Image size `[height, width]` for image folders.
    #[serde(default)]
    pub image_size: Option<[usize; 2]>,
    /// Channels (1 or 3) for image folders.
    #[serde(default)]
    pub channels: Option<usize>,
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
    /// The training settings of a train stage.
    pub fn train_settings(&self) -> Option<TrainSettings> {
        match self {
            Stage::Train { epochs, batch_size, optimizer, schedule, warmup_epochs }
            | Stage::Distill { epochs, batch_size, optimizer, schedule, warmup_epochs, .. }
            | Stage::Qat { epochs, batch_size, optimizer, schedule, warmup_epochs, .. } => Some(TrainSettings {
                epochs: *epochs,
                batch_size: *batch_size,
                optimizer: optimizer.clone(),
                schedule: schedule.clone(),
                warmup_epochs: *warmup_epochs,
            }),
            Stage::Prune { epochs, batch_size, optimizer: Some(optimizer), schedule, warmup_epochs, .. }
                if *epochs > 0 =>
            {
                Some(TrainSettings {
                    epochs: *epochs,
                    batch_size: *batch_size,
                    optimizer: optimizer.clone(),
                    schedule: schedule.clone(),
                    warmup_epochs: *warmup_epochs,
                })
            }
            Stage::Evaluate { .. } | Stage::Quantize { .. } | Stage::Prune { .. } => None,
        }
    }

    /// The pruning settings of a prune stage.
    pub fn prune_settings(&self, seed: u64) -> Option<PruneSettings> {
        match self {
            Stage::Prune {
                granularity,
                criterion,
                sparsity,
                scope,
                min_layer_sparsity,
                max_layer_sparsity,
                skip,
                overrides,
                round_to,
                taylor_batches,
                ..
            } => Some(PruneSettings {
                granularity: *granularity,
                criterion: *criterion,
                sparsity: sparsity.unwrap_or(0.0),
                global: *scope == PruneScope::Global,
                min_layer_sparsity: *min_layer_sparsity,
                max_layer_sparsity: *max_layer_sparsity,
                skip: skip.clone(),
                overrides: overrides.clone(),
                round_to: *round_to,
                taylor_batches: *taylor_batches,
                seed,
            }),
            _ => None,
        }
    }

    /// The distillation settings of a distill stage.
    pub fn distill_settings(&self) -> Option<DistillSettings> {
        match self {
            Stage::Distill { temperature, alpha, hints, attention, .. } => Some(DistillSettings {
                temperature: *temperature,
                alpha: *alpha,
                hints: hints.clone(),
                attention: attention.clone(),
            }),
            _ => None,
        }
    }

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

/// A validated experiment, ready to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The config file.
    pub source: PathBuf,
    /// The experiment, with every default filled in.
    pub experiment: Experiment,
    /// The data folder or file, resolved.
    pub data_path: PathBuf,
}

/// Parses `path` strictly and validates it into a plan. Nothing is loaded.
///
/// # Errors
/// A [`ConfigError`] naming the file and the line and column (parse errors) or the key
/// (validation errors).
pub fn load_plan(path: &Path) -> Result<Plan> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{}: cannot read the config: {e}", path.display())))?;
    parse_plan(&text, path)
}

/// Parses and validates a config's text as [`load_plan`] does; `path` names it in errors and
/// anchors relative data paths.
///
/// # Errors
/// As [`load_plan`].
pub fn parse_plan(text: &str, path: &Path) -> Result<Plan> {
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
    validate(path, experiment).map_err(|e| ConfigError(format!("{}: {e:#}", path.display())).into())
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

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

fn validate(source: &Path, experiment: Experiment) -> Result<Plan> {
    let e = &experiment;
    if e.name.is_empty() || !e.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        bail!("key `name`: expected letters, digits, `_` or `-`, got {:?}", e.name);
    }
    if !e.backend.is_compiled_in() {
        // The same message as the device constructor, checked before anything loads.
        bail!("key `backend`: {}", e.backend.device().expect_err("not compiled in"));
    }
    if e.threads == 0 || e.threads > 256 {
        bail!("key `threads`: expected 1 to 256, got {}", e.threads);
    }
    e.model.validate().map_err(|err| anyhow::anyhow!("{err}"))?;
    let d = &e.data;
    if !(0.0..1.0).contains(&d.validation_fraction) {
        bail!("key `data.validation_fraction`: expected a fraction in [0, 1), got {}", d.validation_fraction);
    }
    if d.train_limit == Some(0) || d.test_limit == Some(0) {
        bail!("key `data.train_limit` / `data.test_limit`: must be at least 1");
    }
    if d.kind == DataKind::ImageFolder {
        if d.image_size.is_none_or(|s| s.contains(&0)) {
            bail!("key `data.image_size`: image folders need [height, width], both positive");
        }
        if !matches!(d.channels, Some(1) | Some(3)) {
            bail!("key `data.channels`: image folders need 1 or 3");
        }
    } else if d.image_size.is_some() || d.channels.is_some() {
        bail!("keys `data.image_size` and `data.channels` apply only to kind = \"image_folder\"");
    }
    let data_path = match (&d.path, d.kind) {
        (Some(p), _) => p.clone(),
        (None, DataKind::Mnist5k) => PathBuf::from("data/mnist5k"),
        (None, kind) => bail!("key `data.path`: required for kind = {kind:?}"),
    };
    if !data_path.exists() {
        bail!("key `data.path`: {} does not exist", data_path.display());
    }
    let l = &e.latency;
    if l.batch_sizes.is_empty() || l.batch_sizes.contains(&0) || l.repeats == 0 {
        bail!("key `latency`: batch sizes must be positive and repeats at least 1");
    }
    if e.stages.is_empty() {
        bail!("key `stages`: at least one stage is needed");
    }
    let mut quantized_at = None;
    // The last prune stage that left masked (zeroed) weights rather than removed channels.
    let mut masked_at = None;
    for (i, stage) in e.stages.iter().enumerate() {
        let at = format!("stages[{i}] (kind = \"{}\")", stage.kind());
        match (stage, quantized_at) {
            (Stage::Distill { .. }, Some(q)) => bail!(
                "key `{at}`: a distill stage cannot follow the quantizing stage stages[{q}]: the quantized model runs on integer kernels and is not trainable; distill before quantizing"
            ),
            (Stage::Train { .. }, Some(q)) => bail!(
                "key `{at}`: a train stage cannot follow the quantizing stage stages[{q}]: the quantized model runs on integer kernels and is not trainable; train before quantizing, or fine-tune with a `qat` stage instead of `quantize`"
            ),
            (Stage::Quantize { .. } | Stage::Qat { .. }, Some(q)) => {
                bail!("key `{at}`: the model is already quantized by stages[{q}]; use one quantize or qat stage")
            }
            (Stage::Prune { .. }, Some(q)) => bail!(
                "key `{at}`: a prune stage cannot follow the quantizing stage stages[{q}]: prune first, then quantize (pruned zeros stay zero in int8)"
            ),
            _ => {}
        }
        let trains_current = match stage {
            Stage::Train { .. } | Stage::Distill { student: None, .. } | Stage::Qat { .. } => true,
            Stage::Prune { epochs, .. } => *epochs > 0,
            _ => false,
        };
        if let (true, Some(p)) = (trains_current, masked_at) {
            bail!(
                "key `{at}`: training after the weight-pruning stage stages[{p}] would regrow the pruned weights; fine-tune inside that prune stage (`epochs`, `optimizer`), and quantize with `quantize` (zeros stay zero)"
            );
        }
        match stage {
            Stage::Train { .. } => {
                let settings = stage.train_settings().expect("a train stage");
                settings.validate().with_context(|| format!("key `{at}`"))?;
            }
            Stage::Distill {
                temperature, alpha, student, teachers, hints, attention, seeds, compare_scratch, ..
            } => {
                let settings = stage.train_settings().expect("a distill stage");
                settings.validate().with_context(|| format!("key `{at}`"))?;
                if !(temperature.is_finite() && *temperature > 0.0) {
                    bail!("key `{at}.temperature`: expected a positive number, got {temperature}");
                }
                if !(0.0..=1.0).contains(alpha) {
                    bail!("key `{at}.alpha`: expected a value in [0, 1], got {alpha}");
                }
                if let Some(spec) = student {
                    spec.validate().map_err(|err| anyhow::anyhow!("key `{at}.student`: {err}"))?;
                }
                let trained_before = e.stages[..i].iter().any(|s| matches!(s, Stage::Train { .. }));
                if !trained_before {
                    bail!(
                        "key `{at}`: a distill stage needs a train stage before it: {}",
                        if teachers.is_empty() {
                            "without `teachers`, the teacher is the model that stage trains"
                        } else {
                            "the teachers are trained with the settings of the first train stage"
                        }
                    );
                }
                for (j, t) in teachers.iter().enumerate() {
                    if !(t.weight.is_finite() && t.weight > 0.0) {
                        bail!("key `{at}.teachers[{j}].weight`: expected a positive number, got {}", t.weight);
                    }
                    if let Some(spec) = &t.model {
                        spec.validate().map_err(|err| anyhow::anyhow!("key `{at}.teachers[{j}].model`: {err}"))?;
                    }
                }
                for (name, pairs) in [("hints", hints), ("attention", attention)] {
                    for (j, p) in pairs.iter().enumerate() {
                        if !(p.weight.is_finite() && p.weight >= 0.0) {
                            bail!("key `{at}.{name}[{j}].weight`: expected a non-negative number, got {}", p.weight);
                        }
                    }
                }
                if *seeds == 0 || *seeds > 100 {
                    bail!("key `{at}.seeds`: expected 1 to 100, got {seeds}");
                }
                if student.is_none() && (*seeds > 1 || *compare_scratch == Some(true)) {
                    bail!(
                        "key `{at}.student`: `seeds` > 1 and `compare_scratch` need a student to build; without `student` the current model is the student"
                    );
                }
            }
            Stage::Prune {
                granularity,
                sparsity,
                epochs,
                optimizer,
                prune_schedule,
                batch_size,
                sensitivity,
                sensitivity_max_drop,
                overrides,
                scope,
                ..
            } => {
                if let Some(r) = sensitivity.iter().find(|r| !(**r > 0.0 && **r < 1.0)) {
                    bail!("key `{at}.sensitivity`: ratios must be in (0, 1), got {r}");
                }
                if let Some(d) = sensitivity_max_drop {
                    if sensitivity.is_empty() {
                        bail!("key `{at}.sensitivity_max_drop`: needs `sensitivity` ratios to choose from");
                    }
                    if !(0.0..1.0).contains(d) {
                        bail!("key `{at}.sensitivity_max_drop`: expected a top-1 drop in [0, 1), got {d}");
                    }
                    if e.data.validation_fraction <= 0.0 {
                        bail!(
                            "key `{at}.sensitivity_max_drop`: choosing ratios on the test split would tune on it; set `data.validation_fraction`"
                        );
                    }
                    if sparsity.is_some() || !overrides.is_empty() || *scope == PruneScope::Global {
                        bail!(
                            "key `{at}.sensitivity_max_drop`: it sets every layer's sparsity; leave out `sparsity`, `overrides` and `scope = \"global\"`"
                        );
                    }
                }
                if !e.stages[..i].iter().any(|s| matches!(s, Stage::Train { .. } | Stage::Distill { .. })) {
                    bail!("key `{at}`: pruning ranks trained weights: put a train stage before it");
                }
                match (granularity, sparsity) {
                    (Granularity::NOfM { .. }, Some(_)) => {
                        bail!("key `{at}.sparsity`: N:M pruning's sparsity is 1 − N/M; leave `sparsity` out")
                    }
                    (Granularity::Weights | Granularity::Channels, None) if sensitivity_max_drop.is_none() => {
                        bail!("key `{at}.sparsity`: required (the fraction of {granularity} to remove, in [0, 1))")
                    }
                    _ => {}
                }
                if *epochs > 0 && optimizer.is_none() {
                    bail!("key `{at}.optimizer`: fine-tuning for {epochs} epoch(s) needs an optimizer");
                }
                if *epochs == 0 && !matches!(prune_schedule, PruneSchedule::OneShot) {
                    bail!(
                        "key `{at}.prune_schedule`: iterative and gradual schedules prune during fine-tuning; set `epochs`"
                    );
                }
                if *batch_size == 0 {
                    bail!("key `{at}.batch_size`: must be at least 1");
                }
                if let Some(settings) = stage.train_settings() {
                    settings.validate().with_context(|| format!("key `{at}`"))?;
                }
                let settings = stage.prune_settings(e.seed).expect("a prune stage");
                settings.validate().map_err(|err| prune_error(&at, err))?;
                prune_schedule.validate(*epochs, *granularity).map_err(|err| prune_error(&at, err))?;
                if *granularity != Granularity::Channels {
                    masked_at = Some(i);
                }
                if matches!(prune_schedule, PruneSchedule::Lottery { .. })
                    && let Some(j) = e.stages[..i]
                        .iter()
                        .position(|s| matches!(s, Stage::Distill { student: Some(_), .. } | Stage::Prune { .. }))
                {
                    bail!(
                        "key `{at}.prune_schedule`: lottery tickets rewind to the weights `[model]` was initialised with, but stages[{j}] changed the model; use it on the baseline"
                    );
                }
            }
            Stage::Evaluate { batch_size } => {
                if *batch_size == 0 {
                    bail!("key `{at}.batch_size`: must be at least 1");
                }
            }
            Stage::Qat {
                weight_bits,
                calibrator,
                calibration_batches,
                calibration_batch_size,
                overrides,
                learn_scales,
                freeze_observers_epoch,
                epochs,
                distill,
                ..
            } => {
                quantized_at = Some(i);
                if let Some(d) = distill {
                    if !(d.temperature.is_finite() && d.temperature > 0.0) {
                        bail!("key `{at}.distill.temperature`: expected a positive number, got {}", d.temperature);
                    }
                    if !(0.0..=1.0).contains(&d.alpha) {
                        bail!("key `{at}.distill.alpha`: expected a value in [0, 1], got {}", d.alpha);
                    }
                }
                let settings = stage.train_settings().expect("a qat stage");
                settings.validate().with_context(|| format!("key `{at}`"))?;
                if *calibration_batches == 0 || *calibration_batch_size == 0 {
                    bail!("key `{at}.calibration_batches` / `calibration_batch_size`: must be at least 1");
                }
                if let Some(f) = freeze_observers_epoch {
                    if *learn_scales {
                        bail!(
                            "key `{at}.freeze_observers_epoch`: applies without `learn_scales` only (learned scales have no observers)"
                        );
                    }
                    if !(f.is_finite() && *f >= 0.0 && *f <= *epochs as f64) {
                        bail!(
                            "key `{at}.freeze_observers_epoch`: expected a value between 0 and epochs ({epochs}), got {f}"
                        );
                    }
                }
                validate_quant_common(&at, *weight_bits, calibrator, overrides)?;
            }
            Stage::Quantize {
                weight_bits,
                calibrator,
                calibration_batches,
                batch_size,
                overrides,
                mode,
                bias_correction,
                adaround,
                activations,
                asymmetric_weights,
                ..
            } => {
                quantized_at = Some(i);
                if *asymmetric_weights && adaround.is_some() {
                    bail!("key `{at}.asymmetric_weights`: AdaRound learns the rounding of symmetric weights only");
                }
                if *activations != shrink_quant::ActivationType::U8 && *mode == QuantMode::Dynamic {
                    bail!(
                        "key `{at}.activations`: dynamic quantization measures each batch's u8 range at run time, so \
                         \"i8\" applies to mode = \"static\" only"
                    );
                }
                if let Some(ada) = adaround {
                    if *mode == QuantMode::Dynamic {
                        bail!(
                            "key `{at}.adaround`: learns from calibration images, so it applies to mode = \"static\" only"
                        );
                    }
                    ada.validate().map_err(|e| anyhow::anyhow!("key `{at}.adaround`: {e}"))?;
                }
                if *bias_correction && *mode == QuantMode::Dynamic {
                    bail!(
                        "key `{at}.bias_correction`: needs calibrated input means, so it applies to mode = \"static\" only"
                    );
                }
                if *calibration_batches == 0 || *batch_size == 0 {
                    bail!("key `{at}.calibration_batches` / `batch_size`: must be at least 1");
                }
                validate_quant_common(&at, *weight_bits, calibrator, overrides)?;
            }
        }
    }
    check_distill_pairs(e)?;
    check_prune_rules(e)?;
    Ok(Plan { source: source.to_path_buf(), experiment, data_path })
}

/// The checks `quantize` and `qat` share: bits, calibrator parameters, overrides.
fn validate_quant_common(at: &str, weight_bits: u32, calibrator: &Calibrator, overrides: &[Override]) -> Result<()> {
    if ![2, 4, 8].contains(&weight_bits) {
        bail!("key `{at}.weight_bits`: expected 2, 4 or 8, got {weight_bits}");
    }
    match *calibrator {
        Calibrator::MovingAverage { momentum } if !(0.0..1.0).contains(&momentum) => {
            bail!("key `{at}.calibrator.momentum`: expected a value in [0, 1), got {momentum}")
        }
        Calibrator::Percentile { percentile } if !(percentile > 50.0 && percentile <= 100.0) => {
            bail!("key `{at}.calibrator.percentile`: expected a value in (50, 100], got {percentile}")
        }
        _ => {}
    }
    for (j, o) in overrides.iter().enumerate() {
        if let Err(err) = regex::Regex::new(&o.pattern) {
            bail!("key `{at}.overrides[{j}].pattern`: not a valid regular expression: {err}");
        }
        if let Some(bits) = o.weight_bits
            && ![2, 4, 8].contains(&bits)
        {
            bail!("key `{at}.overrides[{j}].weight_bits`: expected 2, 4 or 8, got {bits}");
        }
        if o.keep_float && o.weight_bits.is_some() {
            bail!("key `{at}.overrides[{j}]`: `keep_float` and `weight_bits` exclude each other");
        }
    }
    Ok(())
}

/// The image shape a data source gives, as far as the config tells (10 classes assumed: node
/// names and feature shapes do not depend on it).
fn expected_input(d: &DataConfig) -> [usize; 3] {
    match d.kind {
        DataKind::Mnist5k | DataKind::Idx => [1, 28, 28],
        DataKind::Cifar10 => [3, 32, 32],
        DataKind::ImageFolder => {
            let [h, w] = d.image_size.unwrap_or([1, 1]);
            [d.channels.unwrap_or(1), h, w]
        }
    }
}

/// Checks every distill stage's hint and attention pairs on the architectures they will name
/// (built here with untrained weights), so a misspelt node fails before anything trains.
fn check_distill_pairs(e: &Experiment) -> Result<()> {
    if !e
        .stages
        .iter()
        .any(|s| matches!(s, Stage::Distill { hints, attention, .. } if !hints.is_empty() || !attention.is_empty()))
    {
        return Ok(());
    }
    let device = BackendKind::Flex.device()?;
    let shape = expected_input(&e.data);
    let build = |spec: &ModelSpec| spec.build(shape, 10, 0, &device);
    // The architecture of the current model as the stages go (a distill stage with a student
    // replaces it), and of the model the last train stage left (the default teacher).
    let mut current = e.model.clone();
    let mut uncompressed = e.model.clone();
    for (i, stage) in e.stages.iter().enumerate() {
        match stage {
            Stage::Train { .. } => uncompressed = current.clone(),
            Stage::Distill { student, teachers, .. } => {
                let student_spec = student.clone().unwrap_or_else(|| current.clone());
                let teacher_spec = match teachers.first() {
                    Some(t) => t.model.clone().unwrap_or_else(|| e.model.clone()),
                    None => uncompressed.clone(),
                };
                let settings = stage.distill_settings().expect("a distill stage");
                if !settings.hints.is_empty() || !settings.attention.is_empty() {
                    shrink_distill::check_pairs(&build(&student_spec)?, &build(&teacher_spec)?, &settings)
                        .map_err(|err| anyhow::anyhow!("key `stages[{i}] (kind = \"distill\")`: {err}"))?;
                }
                if student.is_some() {
                    uncompressed = student_spec.clone();
                }
                current = student_spec;
            }
            _ => {}
        }
    }
    Ok(())
}

/// A shrink-prune error as a config error naming the key.
fn prune_error(at: &str, err: shrink_prune::Error) -> anyhow::Error {
    match err {
        shrink_prune::Error::Setting { key, message } => anyhow::anyhow!("key `{at}.{key}`: {message}"),
        other => anyhow::anyhow!("key `{at}`: {other}"),
    }
}

/// Checks every prune stage's skip list and overrides against the layers of the model it will
/// prune (built here with untrained weights), so a pattern that matches nothing fails first.
fn check_prune_rules(e: &Experiment) -> Result<()> {
    if !e
        .stages
        .iter()
        .any(|s| matches!(s, Stage::Prune { skip, overrides, .. } if !skip.is_empty() || !overrides.is_empty()))
    {
        return Ok(());
    }
    let device = BackendKind::Flex.device()?;
    let shape = expected_input(&e.data);
    let mut current = e.model.clone();
    for (i, stage) in e.stages.iter().enumerate() {
        match stage {
            Stage::Distill { student: Some(s), .. } => current = s.clone(),
            Stage::Prune { .. } => {
                let settings = stage.prune_settings(e.seed).expect("a prune stage");
                shrink_prune::check_settings(&current.build(shape, 10, 0, &device)?, &settings)
                    .map_err(|err| prune_error(&format!("stages[{i}] (kind = \"prune\")"), err))?;
            }
            _ => {}
        }
    }
    Ok(())
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
        assert_eq!(plan.experiment.seed, 42);
        assert_eq!(plan.experiment.stages.len(), 2);
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
            match &plan.experiment.stages[1] {
                Stage::Qat { activations, .. } => assert_eq!(*activations, want),
                other => panic!("{other:?}"),
            }
        }
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
