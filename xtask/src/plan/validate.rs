//! The schema of [`crate::config`] checked and turned into a [`Plan`]: every error names the
//! key (`stages[2] (kind = "prune").sparsity`), and nothing is loaded but the few header bytes
//! that tell the images' shape.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use shrink_core::BackendKind;
use shrink_core::train::TrainSettings;
use shrink_core::zoo::ModelSpec;
use shrink_distill::DistillSettings;
use shrink_prune::{Granularity, PruneSchedule, PruneSettings};
use shrink_quant::{Calibrator, Override, PtqSettings, QatSettings};

use super::{
    Calibration, DataPlan, DataSource, DistillStage, EvaluateStage, Plan, PruneStage, QatStage, QuantizeStage,
    StagePlan, TrainStage,
};
use crate::config::{DataConfig, DataKind, Experiment, PruneScope, QuantMode, Stage};

/// `[export]`: a known opset, and ONNX Runtime importable before anything trains when the run
/// is to check its files with it.
fn check_export(x: &crate::config::ExportSettings) -> Result<()> {
    if ![13, 17].contains(&x.opset) {
        bail!("key `export.opset`: 13 or 17, got {}", x.opset);
    }
    if (x.check_onnxruntime || x.fold_batch_norms) && !x.onnx {
        bail!("key `export`: `check_onnxruntime` and `fold_batch_norms` apply to the ONNX files: set `onnx = true`");
    }
    if x.check_onnxruntime
        && let Err(why) = crate::onnxruntime::available()
    {
        bail!("key `export.check_onnxruntime`: {why}");
    }
    Ok(())
}

/// Checks `experiment` (read from `source`) and turns it into a plan.
///
/// # Errors
/// The first problem, naming its key.
pub(crate) fn validate(source: &Path, experiment: Experiment) -> Result<Plan> {
    let e = &experiment;
    check_run_settings(e)?;
    let data = data_plan(&e.data)?;
    let l = &e.latency;
    if l.batch_sizes.is_empty() || l.batch_sizes.contains(&0) || l.repeats == 0 {
        bail!("key `latency`: batch sizes must be positive and repeats at least 1");
    }
    check_export(&e.export)?;
    if e.stages.is_empty() {
        bail!("key `stages`: at least one stage is needed");
    }
    let mut order = StageOrder::default();
    let mut stages = Vec::with_capacity(e.stages.len());
    for (i, stage) in e.stages.iter().enumerate() {
        let at = format!("stages[{i}] (kind = \"{}\")", stage.kind());
        order.check(&at, stage)?;
        check_trained_before(&at, stage, e, i)?;
        let plan = match stage {
            Stage::Train { .. } => StagePlan::Train(TrainStage { train: train_settings(&at, stage)? }),
            Stage::Distill { .. } => StagePlan::Distill(distill_stage(&at, stage, &e.stages[..i])?),
            Stage::Prune { .. } => StagePlan::Prune(prune_stage(&at, stage, e, i)?),
            Stage::Quantize { .. } => StagePlan::Quantize(quantize_stage(&at, stage)?),
            Stage::Qat { .. } => StagePlan::Qat(qat_stage(&at, stage)?),
            &Stage::Evaluate { batch_size } => {
                if batch_size == 0 {
                    bail!("key `{at}.batch_size`: must be at least 1");
                }
                StagePlan::Evaluate(EvaluateStage { batch_size })
            }
        };
        order.record(i, &plan);
        stages.push(plan);
    }
    let plan = Plan {
        source: source.to_path_buf(),
        name: e.name.clone(),
        seed: e.seed,
        backend: e.backend,
        threads: e.threads,
        data,
        model: e.model.clone(),
        latency: e.latency.clone(),
        export: e.export.clone(),
        allow_untrained: e.allow_untrained,
        stages,
    };
    // The limits first: they build every model the plan names (importing an ONNX file, so an
    // op shrink cannot convert stops the run here), after checking its size from its settings.
    super::limits::check(&plan)?;
    check_distill_pairs(&plan)?;
    check_layer_rules(&plan)?;
    Ok(plan)
}

/// The longest run name: it names a directory, and file systems allow 255 bytes per name
/// (a sweep adds its trial's suffix to it).
pub const MAX_NAME_LEN: usize = 100;

/// Name, backend, threads and model.
fn check_run_settings(e: &Experiment) -> Result<()> {
    if e.name.is_empty() || !e.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        bail!("key `name`: expected letters, digits, `_` or `-`, got {:?}", e.name);
    }
    if e.name.len() > MAX_NAME_LEN {
        bail!(
            "key `name`: {} characters; a run name has at most {MAX_NAME_LEN} (it names the run's directory)",
            e.name.len()
        );
    }
    if let Some(c) = e.data.classes.filter(|&c| c < 2) {
        bail!("key `data.classes`: a classifier needs at least 2 classes, got {c}");
    }
    if let Some(err) = e.backend.not_compiled_error().filter(|_| !e.backend.is_compiled_in()) {
        // The same message as the device constructor, checked before anything loads.
        bail!("key `backend`: {err}");
    }
    if e.threads == 0 || e.threads > 256 {
        bail!("key `threads`: expected 1 to 256, got {}", e.threads);
    }
    e.model.validate().map_err(|err| anyhow::anyhow!("{err}"))?;
    Ok(())
}

/// The data section: ranges, the image-folder keys, the path, and the images' shape.
fn data_plan(d: &DataConfig) -> Result<DataPlan> {
    if !(0.0..1.0).contains(&d.validation_fraction) {
        bail!("key `data.validation_fraction`: expected a fraction in [0, 1), got {}", d.validation_fraction);
    }
    if d.train_limit == Some(0) || d.test_limit == Some(0) {
        bail!("key `data.train_limit` / `data.test_limit`: must be at least 1");
    }
    let source = match d.kind {
        DataKind::ImageFolder => {
            let Some(image_size) = d.image_size.filter(|s| !s.contains(&0)) else {
                bail!("key `data.image_size`: image folders need [height, width], both positive");
            };
            let Some(channels) = d.channels.filter(|c| matches!(c, 1 | 3)) else {
                bail!("key `data.channels`: image folders need 1 or 3");
            };
            DataSource::ImageFolder { image_size, channels }
        }
        DataKind::Mnist5k => DataSource::Mnist5k,
        DataKind::Idx => DataSource::Idx,
        DataKind::Cifar10 => DataSource::Cifar10,
    };
    let path = match (&d.path, d.kind) {
        (Some(p), _) => p.clone(),
        (None, DataKind::Mnist5k) => PathBuf::from("data/mnist5k"),
        (None, kind) => bail!("key `data.path`: required for kind = {kind:?}"),
    };
    if !path.exists() {
        bail!("key `data.path`: {} does not exist", path.display());
    }
    let native_shape = image_shape(source, &path)?;
    let mut shape = native_shape;
    if let Some(size) = d.image_size {
        if size.contains(&0) {
            bail!("key `data.image_size`: height and width must be positive, got {size:?}");
        }
        shape = [shape[0], size[0], size[1]];
    }
    if let Some(c) = d.channels {
        if !matches!(c, 1 | 3) {
            bail!("key `data.channels`: expected 1 (grey) or 3 (RGB), got {c}");
        }
        shape[0] = c;
    }
    Ok(DataPlan {
        source,
        path,
        native_shape,
        shape,
        train_limit: d.train_limit,
        test_limit: d.test_limit,
        validation_fraction: d.validation_fraction,
        augmentation: d.augmentation.clone(),
        classes: d.classes,
    })
}

/// The training images' IDX file in an IDX folder: gzip-compressed or raw.
pub fn idx_file(dir: &Path, stem: &str) -> PathBuf {
    let gz = dir.join(format!("{stem}.gz"));
    if gz.exists() { gz } else { dir.join(stem) }
}

/// The images' `[channels, height, width]`: from the training images' IDX header (a damaged
/// header is an error here, naming the file and the byte), fixed by CIFAR-10's format, or set
/// for image folders.
fn image_shape(source: DataSource, path: &Path) -> Result<[usize; 3]> {
    Ok(match source {
        DataSource::Mnist5k | DataSource::Idx => {
            let images = idx_file(path, "train-images-idx3-ubyte");
            if !images.exists() {
                bail!("key `data.path`: {} has no train-images-idx3-ubyte[.gz]", path.display());
            }
            shrink_core::data::idx_image_shape(&images).with_context(|| "key `data.path`")?
        }
        DataSource::Cifar10 => [3, 32, 32],
        DataSource::ImageFolder { image_size: [h, w], channels } => [channels, h, w],
    })
}

/// What the stages before the one being checked did: where the model became quantized, and
/// where weights were last masked (zeroed) rather than removed.
#[derive(Default)]
struct StageOrder {
    quantized_at: Option<usize>,
    masked_at: Option<usize>,
}

impl StageOrder {
    /// The rules of order: nothing trains or prunes a quantized model, nothing trains the weights
    /// a weight-pruning stage zeroed.
    fn check(&self, at: &str, stage: &Stage) -> Result<()> {
        if let Some(q) = self.quantized_at {
            match stage {
                Stage::Distill { .. } => bail!(
                    "key `{at}`: a distill stage cannot follow the quantizing stage stages[{q}]: the quantized model runs on integer kernels and is not trainable; distill before quantizing"
                ),
                Stage::Train { .. } => bail!(
                    "key `{at}`: a train stage cannot follow the quantizing stage stages[{q}]: the quantized model runs on integer kernels and is not trainable; train before quantizing, or fine-tune with a `qat` stage instead of `quantize`"
                ),
                Stage::Quantize { .. } | Stage::Qat { .. } => {
                    bail!("key `{at}`: the model is already quantized by stages[{q}]; use one quantize or qat stage")
                }
                Stage::Prune { .. } => bail!(
                    "key `{at}`: a prune stage cannot follow the quantizing stage stages[{q}]: prune first, then quantize (pruned zeros stay zero in int8)"
                ),
                Stage::Evaluate { .. } => {}
            }
        }
        let trains_current = match stage {
            Stage::Train { .. } | Stage::Distill { student: None, .. } | Stage::Qat { .. } => true,
            Stage::Prune { epochs, .. } => *epochs > 0,
            _ => false,
        };
        if let (true, Some(p)) = (trains_current, self.masked_at) {
            bail!(
                "key `{at}`: training after the weight-pruning stage stages[{p}] would regrow the pruned weights; fine-tune inside that prune stage (`epochs`, `optimizer`), and quantize with `quantize` (zeros stay zero)"
            );
        }
        Ok(())
    }

    fn record(&mut self, index: usize, stage: &StagePlan) {
        match stage {
            StagePlan::Quantize(_) | StagePlan::Qat(_) => self.quantized_at = Some(index),
            StagePlan::Prune(p) if p.settings.granularity != Granularity::Channels => self.masked_at = Some(index),
            _ => {}
        }
    }
}

/// Pruning ranks trained weights and quantizing calibrates trained ranges: on a zoo model's
/// random initial weights both are almost always a mistake (a forgotten train stage), so they
/// need a train or distill stage before them, an imported (trained) model, or
/// `allow_untrained = true`.
fn check_trained_before(at: &str, stage: &Stage, e: &Experiment, index: usize) -> Result<()> {
    let what = match stage {
        Stage::Prune { .. } => "pruning ranks trained weights",
        Stage::Quantize { .. } => "quantizing calibrates the ranges of a trained model",
        Stage::Qat { .. } => "quantization-aware training starts from a trained model",
        _ => return Ok(()),
    };
    let trained = e.stages[..index].iter().any(|s| matches!(s, Stage::Train { .. } | Stage::Distill { .. }));
    if trained || e.allow_untrained || matches!(e.model, ModelSpec::Onnx { .. }) {
        return Ok(());
    }
    bail!(
        "key `{at}`: {what}, but no stage before it trains `{}` (its weights would be random): put a train stage before it, or set `allow_untrained = true` if that is what you mean",
        e.model.name()
    )
}

/// The training settings of a train, distill or qat stage (or a prune stage's fine-tuning),
/// checked.
fn train_settings(at: &str, stage: &Stage) -> Result<TrainSettings> {
    let t = match stage {
        Stage::Train { epochs, batch_size, optimizer, schedule, warmup_epochs }
        | Stage::Distill { epochs, batch_size, optimizer, schedule, warmup_epochs, .. }
        | Stage::Qat { epochs, batch_size, optimizer, schedule, warmup_epochs, .. } => TrainSettings {
            epochs: *epochs,
            batch_size: *batch_size,
            optimizer: optimizer.clone(),
            schedule: schedule.clone(),
            warmup_epochs: *warmup_epochs,
        },
        Stage::Prune { epochs, batch_size, optimizer: Some(optimizer), schedule, warmup_epochs, .. } => TrainSettings {
            epochs: *epochs,
            batch_size: *batch_size,
            optimizer: optimizer.clone(),
            schedule: schedule.clone(),
            warmup_epochs: *warmup_epochs,
        },
        _ => unreachable!("called for stages that train"),
    };
    t.validate().with_context(|| format!("key `{at}`"))?;
    Ok(t)
}

fn distill_stage(at: &str, stage: &Stage, before: &[Stage]) -> Result<DistillStage> {
    let train = train_settings(at, stage)?;
    let Stage::Distill { temperature, alpha, student, teachers, hints, attention, seeds, compare_scratch, .. } = stage
    else {
        unreachable!("a distill stage")
    };
    check_temperature_and_alpha(at, "", *temperature, *alpha)?;
    if let Some(spec) = student {
        spec.validate().map_err(|err| anyhow::anyhow!("key `{at}.student`: {err}"))?;
    }
    if !before.iter().any(|s| matches!(s, Stage::Train { .. })) {
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
    Ok(DistillStage {
        train,
        distill: DistillSettings {
            temperature: *temperature,
            alpha: *alpha,
            hints: hints.clone(),
            attention: attention.clone(),
        },
        student: student.clone(),
        teachers: teachers.clone(),
        seeds: *seeds,
        compare_scratch: compare_scratch.unwrap_or(student.is_some()),
    })
}

/// A softening temperature (> 0) and a teacher weight α (in [0, 1]) under `at` + `prefix`.
fn check_temperature_and_alpha(at: &str, prefix: &str, temperature: f64, alpha: f64) -> Result<()> {
    if !(temperature.is_finite() && temperature > 0.0) {
        bail!("key `{at}{prefix}.temperature`: expected a positive number, got {temperature}");
    }
    if !(0.0..=1.0).contains(&alpha) {
        bail!("key `{at}{prefix}.alpha`: expected a value in [0, 1], got {alpha}");
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

fn prune_stage(at: &str, stage: &Stage, e: &Experiment, index: usize) -> Result<PruneStage> {
    let Stage::Prune {
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
        sensitivity,
        sensitivity_max_drop,
        prune_schedule,
        epochs,
        batch_size,
        optimizer,
        ..
    } = stage
    else {
        unreachable!("a prune stage")
    };
    check_prune_sensitivity(at, stage, e.data.validation_fraction)?;
    let before = &e.stages[..index];
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
        bail!("key `{at}.prune_schedule`: iterative and gradual schedules prune during fine-tuning; set `epochs`");
    }
    if *batch_size == 0 {
        bail!("key `{at}.batch_size`: must be at least 1");
    }
    let fine_tune = if *epochs > 0 { Some(train_settings(at, stage)?) } else { None };
    let settings = PruneSettings {
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
        seed: e.seed,
    };
    settings.validate().map_err(|err| prune_error(at, err))?;
    prune_schedule.validate(*epochs, *granularity).map_err(|err| prune_error(at, err))?;
    if matches!(prune_schedule, PruneSchedule::Lottery { .. })
        && let Some(j) =
            before.iter().position(|s| matches!(s, Stage::Distill { student: Some(_), .. } | Stage::Prune { .. }))
    {
        bail!(
            "key `{at}.prune_schedule`: lottery tickets rewind to the weights `[model]` was initialised with, but stages[{j}] changed the model; use it on the baseline"
        );
    }
    Ok(PruneStage {
        settings,
        schedule: prune_schedule.clone(),
        fine_tune,
        batch_size: *batch_size,
        sensitivity: sensitivity.clone(),
        sensitivity_max_drop: *sensitivity_max_drop,
    })
}

/// A prune stage's sensitivity ratios and top-1 budget.
fn check_prune_sensitivity(at: &str, stage: &Stage, validation_fraction: f64) -> Result<()> {
    let Stage::Prune { sensitivity, sensitivity_max_drop, sparsity, overrides, scope, .. } = stage else {
        unreachable!("a prune stage")
    };
    if let Some(r) = sensitivity.iter().find(|r| !(**r > 0.0 && **r < 1.0)) {
        bail!("key `{at}.sensitivity`: ratios must be in (0, 1), got {r}");
    }
    let Some(d) = sensitivity_max_drop else { return Ok(()) };
    if sensitivity.is_empty() {
        bail!("key `{at}.sensitivity_max_drop`: needs `sensitivity` ratios to choose from");
    }
    if !(0.0..1.0).contains(d) {
        bail!("key `{at}.sensitivity_max_drop`: expected a top-1 drop in [0, 1), got {d}");
    }
    if validation_fraction <= 0.0 {
        bail!(
            "key `{at}.sensitivity_max_drop`: choosing ratios on the test split would tune on it; set `data.validation_fraction`"
        );
    }
    if sparsity.is_some() || !overrides.is_empty() || *scope == PruneScope::Global {
        bail!(
            "key `{at}.sensitivity_max_drop`: it sets every layer's sparsity; leave out `sparsity`, `overrides` and `scope = \"global\"`"
        );
    }
    Ok(())
}

fn quantize_stage(at: &str, stage: &Stage) -> Result<QuantizeStage> {
    let &Stage::Quantize {
        mode,
        weight_bits,
        per_channel,
        asymmetric_weights,
        calibrator,
        calibration_batches,
        batch_size,
        ref overrides,
        sensitivity,
        bias_correction,
        cross_layer_equalization,
        ref adaround,
        activations,
    } = stage
    else {
        unreachable!("a quantize stage")
    };
    let dynamic = mode == QuantMode::Dynamic;
    if asymmetric_weights && adaround.is_some() {
        bail!("key `{at}.asymmetric_weights`: AdaRound learns the rounding of symmetric weights only");
    }
    if activations != shrink_quant::ActivationType::U8 && dynamic {
        bail!(
            "key `{at}.activations`: dynamic quantization measures each batch's u8 range at run time, so \
             \"i8\" applies to mode = \"static\" only"
        );
    }
    if let Some(ada) = adaround {
        if dynamic {
            bail!("key `{at}.adaround`: learns from calibration images, so it applies to mode = \"static\" only");
        }
        ada.validate().map_err(|e| anyhow::anyhow!("key `{at}.adaround`: {e}"))?;
    }
    if bias_correction && dynamic {
        bail!("key `{at}.bias_correction`: needs calibrated input means, so it applies to mode = \"static\" only");
    }
    if calibration_batches == 0 || batch_size == 0 {
        bail!("key `{at}.calibration_batches` / `batch_size`: must be at least 1");
    }
    check_quant_common(at, weight_bits, &calibrator, overrides)?;
    Ok(QuantizeStage {
        ptq: PtqSettings {
            weight_bits,
            per_channel,
            asymmetric_weights,
            calibrator,
            overrides: overrides.clone(),
            dynamic,
            bias_correction,
            cross_layer_equalization,
            adaround: adaround.clone(),
            activations,
        },
        calibration: Calibration { batches: calibration_batches, batch_size },
        sensitivity,
    })
}

fn qat_stage(at: &str, stage: &Stage) -> Result<QatStage> {
    let &Stage::Qat {
        weight_bits,
        per_channel,
        calibrator,
        calibration_batches,
        calibration_batch_size,
        ref overrides,
        learn_scales,
        freeze_observers_epoch,
        epochs,
        ref distill,
        activations,
        ..
    } = stage
    else {
        unreachable!("a qat stage")
    };
    if let Some(d) = distill {
        check_temperature_and_alpha(at, ".distill", d.temperature, d.alpha)?;
    }
    let train = train_settings(at, stage)?;
    if calibration_batches == 0 || calibration_batch_size == 0 {
        bail!("key `{at}.calibration_batches` / `calibration_batch_size`: must be at least 1");
    }
    if let Some(f) = freeze_observers_epoch {
        if learn_scales {
            bail!(
                "key `{at}.freeze_observers_epoch`: applies without `learn_scales` only (learned scales have no observers)"
            );
        }
        if !(f.is_finite() && f >= 0.0 && f <= epochs as f64) {
            bail!("key `{at}.freeze_observers_epoch`: expected a value between 0 and epochs ({epochs}), got {f}");
        }
    }
    check_quant_common(at, weight_bits, &calibrator, overrides)?;
    let ptq = PtqSettings {
        weight_bits,
        per_channel,
        calibrator,
        overrides: overrides.clone(),
        activations,
        ..PtqSettings::default()
    };
    Ok(QatStage {
        qat: QatSettings {
            ptq,
            train,
            learn_scales,
            freeze_observers_epoch,
            distill: distill.as_ref().map(|d| shrink_quant::QatDistill { temperature: d.temperature, alpha: d.alpha }),
        },
        calibration: Calibration { batches: calibration_batches, batch_size: calibration_batch_size },
    })
}

/// The checks `quantize` and `qat` share: bits, calibrator parameters, overrides.
fn check_quant_common(at: &str, weight_bits: u32, calibrator: &Calibrator, overrides: &[Override]) -> Result<()> {
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

/// Builds `spec` (untrained) for the plan's images, to check names against.
fn build_for_checks(plan: &Plan, spec: &ModelSpec) -> Result<shrink_core::Graph> {
    let device = BackendKind::Flex.device()?;
    Ok(spec.build_for_names(plan.data.shape, &device)?)
}

/// Checks every distill stage's hint and attention pairs on the architectures they will name
/// (built for the data's real image shape), so a misspelt node fails before anything trains.
fn check_distill_pairs(plan: &Plan) -> Result<()> {
    let named = |s: &StagePlan| matches!(s, StagePlan::Distill(d) if !d.distill.hints.is_empty() || !d.distill.attention.is_empty());
    if !plan.stages.iter().any(named) {
        return Ok(());
    }
    // The architecture of the current model as the stages go (a distill stage with a student
    // replaces it), and of the model the last train stage left (the default teacher).
    let mut current = plan.model.clone();
    let mut uncompressed = plan.model.clone();
    for (i, stage) in plan.stages.iter().enumerate() {
        match stage {
            StagePlan::Train(_) => uncompressed = current.clone(),
            StagePlan::Distill(d) => {
                let student = d.student.clone().unwrap_or_else(|| current.clone());
                let teacher = match d.teachers.first() {
                    Some(t) => t.model.clone().unwrap_or_else(|| plan.model.clone()),
                    None => uncompressed.clone(),
                };
                if named(stage) {
                    let (s, t) = (build_for_checks(plan, &student)?, build_for_checks(plan, &teacher)?);
                    shrink_distill::check_pairs(&s, &t, &d.distill)
                        .map_err(|err| anyhow::anyhow!("key `stages[{i}] (kind = \"distill\")`: {err}"))?;
                }
                if d.student.is_some() {
                    uncompressed = student.clone();
                }
                current = student;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks every prune stage's skip list and overrides, and every quantize and qat stage's
/// overrides, against the layers of the model the stage will see (built for the data's real
/// image shape), so a pattern that matches nothing fails before anything trains.
fn check_layer_rules(plan: &Plan) -> Result<()> {
    let has_rules = |s: &StagePlan| match s {
        StagePlan::Prune(p) => {
            !p.settings.skip.is_empty() || !p.settings.overrides.is_empty() || p.settings.round_to > 1
        }
        StagePlan::Quantize(q) => !q.ptq.overrides.is_empty(),
        StagePlan::Qat(q) => !q.qat.ptq.overrides.is_empty(),
        _ => false,
    };
    if !plan.stages.iter().any(has_rules) {
        return Ok(());
    }
    let mut current = plan.model.clone();
    // The model is built once per architecture, not once per stage (a config may have many).
    let mut built: Option<(ModelSpec, shrink_core::Graph)> = None;
    let mut graph_of = |spec: &ModelSpec| -> Result<shrink_core::Graph> {
        let graph = match built.take() {
            Some((s, g)) if s == *spec => g,
            _ => build_for_checks(plan, spec)?,
        };
        built = Some((spec.clone(), graph.clone()));
        Ok(graph)
    };
    for (i, stage) in plan.stages.iter().enumerate() {
        let at = format!("stages[{i}] (kind = \"{}\")", stage.kind());
        let overrides = match stage {
            StagePlan::Distill(DistillStage { student: Some(s), .. }) => {
                current = s.clone();
                continue;
            }
            StagePlan::Prune(p) if has_rules(stage) => {
                shrink_prune::check_settings(&graph_of(&current)?, &p.settings).map_err(|err| prune_error(&at, err))?;
                continue;
            }
            StagePlan::Quantize(q) if has_rules(stage) => &q.ptq.overrides,
            StagePlan::Qat(q) if has_rules(stage) => &q.qat.ptq.overrides,
            _ => continue,
        };
        let graph = graph_of(&current)?;
        for (j, o) in overrides.iter().enumerate() {
            shrink_quant::check_overrides(&graph, std::slice::from_ref(o))
                .map_err(|err| anyhow::anyhow!("key `{at}.overrides[{j}].pattern`: {err}"))?;
        }
    }
    Ok(())
}
