//! The validated experiment: a typed [`Plan`] whose stages already hold the library settings
//! (`TrainSettings`, `PtqSettings`, `PruneSettings`, …), made once by validation from the
//! TOML schema of [`crate::config`], before any data loads. Code after validation never
//! converts a stage again nor asks which kind it is.
//!
//! A plan is also written back as TOML ([`Plan::to_experiment`], [`Plan::to_toml`]): the run
//! directory keeps it as `config.resolved.toml`, and sweeps generate and change plans. Parsing
//! that TOML gives the same plan again (tested for every config in `configs/`).

mod limits;
mod validate;

use std::path::PathBuf;

use serde::Serialize;
use shrink_core::BackendKind;
use shrink_core::data::Augmentation;
use shrink_core::metrics::LatencySettings;
use shrink_core::train::TrainSettings;
use shrink_core::zoo::ModelSpec;
use shrink_distill::DistillSettings;
use shrink_prune::{Granularity, PruneSchedule, PruneSettings};
use shrink_quant::{PtqSettings, QatSettings};

use crate::config::{self, DataConfig, DataKind, Experiment, PruneScope, QuantMode, Stage, TeacherSpec};

pub use validate::idx_file;
pub(crate) use validate::validate;

/// A validated experiment, ready to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The config file it came from.
    pub source: PathBuf,
    /// Run name: the run directory is `<out>/<name>/<timestamp>/`.
    pub name: String,
    /// Seed of the initial weights, the data order and augmentation.
    pub seed: u64,
    /// What trains and evaluates.
    pub backend: BackendKind,
    /// CPU threads for burn's CPU backends and the CPU plan.
    pub threads: usize,
    /// The data.
    pub data: DataPlan,
    /// The model to build.
    pub model: ModelSpec,
    /// How latency is measured after each stage.
    pub latency: LatencySettings,
    /// ONNX files written at the end.
    pub export: config::ExportSettings,
    /// Whether stages may prune or quantize a model no stage trained.
    pub allow_untrained: bool,
    /// The stages, in order.
    pub stages: Vec<StagePlan>,
}

/// Where the data comes from and how much of it is used.
#[derive(Clone, Debug, PartialEq)]
pub struct DataPlan {
    /// The format (and, for image folders, the decoded size).
    pub source: DataSource,
    /// The file or folder, resolved.
    pub path: PathBuf,
    /// The images' `[channels, height, width]` in the files, known before anything loads (read
    /// from the IDX header, fixed by the format, or set for image folders).
    pub native_shape: [usize; 3],
    /// The `[channels, height, width]` the model gets: the files' shape, or the one
    /// `data.image_size` and `data.channels` convert it to. The model is built for it.
    pub shape: [usize; 3],
    /// A seeded random subset of the training images.
    pub train_limit: Option<usize>,
    /// The first test images of a seeded shuffle.
    pub test_limit: Option<usize>,
    /// Fraction of the training images held out for validation.
    pub validation_fraction: f64,
    /// Training-time augmentation.
    pub augmentation: Augmentation,
    /// The declared class count, if any.
    pub classes: Option<usize>,
}

/// A data format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// The MNIST-5k IDX files that ship in `data/mnist5k`.
    Mnist5k,
    /// A folder of IDX files (MNIST, Fashion-MNIST).
    Idx,
    /// A folder with CIFAR-10's binary batches.
    Cifar10,
    /// `train/<class>/*` and `test/<class>/*` images, decoded at this size.
    ImageFolder {
        /// `[height, width]`.
        image_size: [usize; 2],
        /// 1 (grey) or 3 (RGB).
        channels: usize,
    },
}

/// One stage, holding its library settings.
#[derive(Clone, Debug, PartialEq)]
pub enum StagePlan {
    /// Train the current model (the first train stage of a fresh model is the cached baseline).
    Train(TrainStage),
    /// Knowledge distillation into the current model or a new student.
    Distill(DistillStage),
    /// Pruning with fine-tuning.
    Prune(PruneStage),
    /// Post-training quantization, static or dynamic.
    Quantize(QuantizeStage),
    /// Quantization-aware training.
    Qat(QatStage),
    /// Evaluation of the current model.
    Evaluate(EvaluateStage),
}

/// A train stage.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainStage {
    /// Epochs, batch size, optimiser, schedule, warm-up.
    pub train: TrainSettings,
}

/// A distill stage.
#[derive(Clone, Debug, PartialEq)]
pub struct DistillStage {
    /// The student's training budget (the student trained alone gets the same).
    pub train: TrainSettings,
    /// Temperature, α, hint and attention pairs.
    pub distill: DistillSettings,
    /// The student to build; `None`: the current model is the student.
    pub student: Option<ModelSpec>,
    /// Teachers trained (and cached) with the first train stage's settings; empty: the model
    /// the last train stage produced.
    pub teachers: Vec<TeacherSpec>,
    /// Students trained with seeds `seed`, `seed + 1`, ….
    pub seeds: usize,
    /// Also train each student alone, same budget and seeds.
    pub compare_scratch: bool,
}

/// A prune stage.
#[derive(Clone, Debug, PartialEq)]
pub struct PruneStage {
    /// What is removed, ranked how, in which scope (its seed is the experiment's).
    pub settings: PruneSettings,
    /// When pruning happens.
    pub schedule: PruneSchedule,
    /// Fine-tuning; `None`: prune only.
    pub fine_tune: Option<TrainSettings>,
    /// Images per fine-tuning step, kept when there is no fine-tuning so the TOML round-trips.
    pub batch_size: usize,
    /// Ratios at which each layer (or group) is also pruned alone and measured.
    pub sensitivity: Vec<f64>,
    /// With `sensitivity`: each layer's sparsity chosen as the largest costing at most this much
    /// validation top-1.
    pub sensitivity_max_drop: Option<f64>,
}

/// Batches of training images (no augmentation) a quantizing stage calibrates on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calibration {
    /// Batches (0 for dynamic quantization, which calibrates nothing).
    pub batches: usize,
    /// Images per batch.
    pub batch_size: usize,
}

/// A quantize stage.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizeStage {
    /// Bits, granularity, calibrator, overrides, dynamic or static, and the PTQ refinements.
    pub ptq: PtqSettings,
    /// The calibration images.
    pub calibration: Calibration,
    /// Also quantize one layer at a time and measure each on the integer kernels.
    pub sensitivity: bool,
}

/// A qat stage.
#[derive(Clone, Debug, PartialEq)]
pub struct QatStage {
    /// The quantization, the fine-tuning and its options.
    pub qat: QatSettings,
    /// The images the initial activation ranges are calibrated on (also those of the
    /// post-training quantization it is compared with).
    pub calibration: Calibration,
}

/// An evaluate stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvaluateStage {
    /// Images per evaluation batch.
    pub batch_size: usize,
}

impl StagePlan {
    /// The `kind` as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            StagePlan::Train(_) => "train",
            StagePlan::Distill(_) => "distill",
            StagePlan::Prune(_) => "prune",
            StagePlan::Quantize(_) => "quantize",
            StagePlan::Qat(_) => "qat",
            StagePlan::Evaluate(_) => "evaluate",
        }
    }

    /// The stage as the TOML schema writes it.
    pub fn to_stage(&self) -> Stage {
        match self {
            StagePlan::Train(s) => train_stage(&s.train),
            StagePlan::Distill(s) => s.to_stage(),
            StagePlan::Prune(s) => s.to_stage(),
            StagePlan::Quantize(s) => s.to_stage(),
            StagePlan::Qat(s) => s.to_stage(),
            StagePlan::Evaluate(s) => Stage::Evaluate { batch_size: s.batch_size },
        }
    }
}

/// A train stage with `t`'s settings, as the schema writes it (also the identity of a model
/// trained from scratch in the baseline cache).
pub fn train_stage(t: &TrainSettings) -> Stage {
    Stage::Train {
        epochs: t.epochs,
        batch_size: t.batch_size,
        optimizer: t.optimizer.clone(),
        schedule: t.schedule.clone(),
        warmup_epochs: t.warmup_epochs,
    }
}

impl DistillStage {
    fn to_stage(&self) -> Stage {
        let t = &self.train;
        Stage::Distill {
            epochs: t.epochs,
            batch_size: t.batch_size,
            optimizer: t.optimizer.clone(),
            schedule: t.schedule.clone(),
            warmup_epochs: t.warmup_epochs,
            temperature: self.distill.temperature,
            alpha: self.distill.alpha,
            student: self.student.clone(),
            teachers: self.teachers.clone(),
            hints: self.distill.hints.clone(),
            attention: self.distill.attention.clone(),
            seeds: self.seeds,
            compare_scratch: Some(self.compare_scratch),
        }
    }
}

impl PruneStage {
    fn to_stage(&self) -> Stage {
        let s = &self.settings;
        // N:M has no `sparsity` key, and a top-1 budget sets every layer's instead.
        let sparsity = match s.granularity {
            Granularity::NOfM { .. } => None,
            _ if self.sensitivity_max_drop.is_some() => None,
            _ => Some(s.sparsity),
        };
        let t = self.fine_tune.as_ref();
        Stage::Prune {
            granularity: s.granularity,
            criterion: s.criterion,
            sparsity,
            scope: if s.global { PruneScope::Global } else { PruneScope::Layer },
            min_layer_sparsity: s.min_layer_sparsity,
            max_layer_sparsity: s.max_layer_sparsity,
            skip: s.skip.clone(),
            overrides: s.overrides.clone(),
            round_to: s.round_to,
            taylor_batches: s.taylor_batches,
            sensitivity: self.sensitivity.clone(),
            sensitivity_max_drop: self.sensitivity_max_drop,
            prune_schedule: self.schedule.clone(),
            epochs: t.map_or(0, |t| t.epochs),
            batch_size: self.batch_size,
            optimizer: t.map(|t| t.optimizer.clone()),
            schedule: t.map(|t| t.schedule.clone()).unwrap_or_default(),
            warmup_epochs: t.map_or(0.0, |t| t.warmup_epochs),
        }
    }
}

impl QuantizeStage {
    fn to_stage(&self) -> Stage {
        let p = &self.ptq;
        Stage::Quantize {
            mode: if p.dynamic { QuantMode::Dynamic } else { QuantMode::Static },
            weight_bits: p.weight_bits,
            per_channel: p.per_channel,
            asymmetric_weights: p.asymmetric_weights,
            calibrator: p.calibrator,
            calibration_batches: self.calibration.batches,
            batch_size: self.calibration.batch_size,
            overrides: p.overrides.clone(),
            sensitivity: self.sensitivity,
            bias_correction: p.bias_correction,
            cross_layer_equalization: p.cross_layer_equalization,
            adaround: p.adaround.clone(),
            activations: p.activations,
        }
    }
}

impl QatStage {
    fn to_stage(&self) -> Stage {
        let (q, t, p) = (&self.qat, &self.qat.train, &self.qat.ptq);
        Stage::Qat {
            epochs: t.epochs,
            batch_size: t.batch_size,
            optimizer: t.optimizer.clone(),
            schedule: t.schedule.clone(),
            warmup_epochs: t.warmup_epochs,
            weight_bits: p.weight_bits,
            per_channel: p.per_channel,
            calibrator: p.calibrator,
            calibration_batches: self.calibration.batches,
            calibration_batch_size: self.calibration.batch_size,
            overrides: p.overrides.clone(),
            learn_scales: q.learn_scales,
            freeze_observers_epoch: q.freeze_observers_epoch,
            distill: q.distill.map(|d| config::QatDistill { temperature: d.temperature, alpha: d.alpha }),
            activations: p.activations,
        }
    }
}

impl DataPlan {
    /// The data section as the schema writes it, with the path resolved.
    pub fn to_config(&self) -> DataConfig {
        let [c, h, w] = self.shape;
        let converted = self.shape != self.native_shape;
        let (image_size, channels) = if converted { (Some([h, w]), Some(c)) } else { (None, None) };
        let (kind, image_size, channels) = match self.source {
            DataSource::Mnist5k => (DataKind::Mnist5k, image_size, channels),
            DataSource::Idx => (DataKind::Idx, image_size, channels),
            DataSource::Cifar10 => (DataKind::Cifar10, image_size, channels),
            DataSource::ImageFolder { image_size, channels } => {
                (DataKind::ImageFolder, Some(image_size), Some(channels))
            }
        };
        DataConfig {
            kind,
            path: Some(self.path.clone()),
            train_limit: self.train_limit,
            test_limit: self.test_limit,
            validation_fraction: self.validation_fraction,
            augmentation: self.augmentation.clone(),
            image_size,
            channels,
            classes: self.classes,
        }
    }
}

impl Plan {
    /// The plan as the TOML schema writes it, every default filled in and the data path
    /// resolved.
    pub fn to_experiment(&self) -> Experiment {
        Experiment {
            name: self.name.clone(),
            seed: self.seed,
            backend: self.backend,
            threads: self.threads,
            data: self.data.to_config(),
            model: self.model.clone(),
            latency: self.latency.clone(),
            export: self.export.clone(),
            allow_untrained: self.allow_untrained,
            stages: self.stages.iter().map(StagePlan::to_stage).collect(),
        }
    }

    /// The plan as TOML ([`Plan::to_experiment`]); parsing it gives this plan again.
    ///
    /// # Errors
    /// If a value cannot be written as TOML (none of the schema's can).
    pub fn to_toml(&self) -> anyhow::Result<String> {
        to_toml(&self.to_experiment())
    }
}

fn to_toml(value: &impl Serialize) -> anyhow::Result<String> {
    use anyhow::Context;
    toml::to_string_pretty(value).context("writing the plan as TOML")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// A config of the repository with its data and model paths made absolute (tests run in
    /// `xtask/`).
    fn rooted(path: &std::path::Path) -> String {
        let text = std::fs::read_to_string(path).unwrap();
        let data = root().join("data/mnist5k").display().to_string();
        let models = root().join("data/onnx/").display().to_string();
        let text = text.replace("path = \"data/onnx/", &format!("path = \"{models}"));
        assert!(
            text.lines().filter(|l| l.starts_with("path = ")).all(|l| l.contains(&models)),
            "{}: the configs use the default data path",
            path.display()
        );
        text.replace("kind = \"mnist5k\"", &format!("kind = \"mnist5k\"\npath = {data:?}"))
    }

    /// Every config of the repository, written back from its plan and parsed again, gives the
    /// same plan: what sweeps rely on when they generate and change plans.
    #[test]
    fn every_config_round_trips_through_its_plan() {
        let mut seen = 0;
        for dir in ["configs", "configs/smoke"] {
            for entry in std::fs::read_dir(root().join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_none_or(|x| x != "toml") {
                    continue;
                }
                let plan =
                    config::parse_plan(&rooted(&path), &path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                let text = plan.to_toml().unwrap();
                let again =
                    config::parse_plan(&text, &path).unwrap_or_else(|e| panic!("{}: {e:#}\n{text}", path.display()));
                assert_eq!(again, plan, "{}", path.display());
                seen += 1;
            }
        }
        assert!(seen >= 15, "{seen} configs");
    }

    /// A plan changed in code (as a sweep changes one) is written with the change and reads
    /// back with it.
    #[test]
    fn a_changed_plan_writes_its_change() {
        let path = root().join("configs/smoke/lenet_int8.toml");
        let mut plan = config::parse_plan(&rooted(&path), &path).unwrap();
        let Some(StagePlan::Quantize(q)) = plan.stages.iter_mut().find(|s| s.kind() == "quantize") else {
            panic!("a quantize stage")
        };
        assert_eq!(q.ptq.weight_bits, 8);
        q.ptq.weight_bits = 4;
        let written = config::parse_plan(&plan.to_toml().unwrap(), &path).unwrap();
        assert_eq!(written, plan, "the changed plan reads back as changed");
        let Some(StagePlan::Quantize(q)) = written.stages.iter().find(|s| s.kind() == "quantize") else {
            panic!("a quantize stage")
        };
        assert_eq!(q.ptq.weight_bits, 4);
    }
}
