//! Limits from resources, not magic numbers: before anything is allocated or trained, every
//! size-like setting is checked against what the machine has (memory available now) and what
//! the model needs (parameters, activations and multiply-adds, from the zoo's settings before
//! building, then from the built graph), and the whole run's work is estimated. A run that
//! cannot fit, or would take more than [`MAX_DAYS`] days even at [`OPTIMISTIC_MACS_PER_SECOND`],
//! is refused naming the key and the estimate.

use std::path::Path;

use anyhow::{Context, Result, bail};
use shrink_core::BackendKind;
use shrink_core::metrics::{available_memory, model_stats};
use shrink_core::train::TrainSettings;
use shrink_core::zoo::ModelSpec;
use shrink_prune::PruneSchedule;

use super::{DataSource, Plan, StagePlan};

/// The compute rate the work estimate assumes: about ten times what this project's CPU plan
/// reaches on a 2-core machine, so only runs that are out of reach on any CPU are refused.
pub const OPTIMISTIC_MACS_PER_SECOND: f64 = 1e12;
/// The least time one training step takes: a forward and backward pass through burn's
/// autodiff costs more than this for any graph (the smoke MLP, 25k parameters, takes 1.5 ms
/// per step of 50 images on this project's machine).
pub const MIN_STEP_SECONDS: f64 = 1e-4;
/// The least time a graph node takes per training step (its op dispatched forward and
/// backward), whatever its size.
pub const MIN_NODE_STEP_SECONDS: f64 = 3e-6;
/// The longest run accepted, by the estimate.
pub const MAX_DAYS: f64 = 7.0;
/// Bytes per trainable value while training: the value, its gradient and Adam's two moments.
const TRAINING_BYTES_PER_PARAM: f64 = 16.0;
/// Bytes a graph node costs beyond its tensors (name, op, shapes, burn's module bookkeeping).
const NODE_BYTES: f64 = 1024.0;

fn gib(bytes: f64) -> String {
    format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
}

/// What the machine and the data give the checks.
struct Resources {
    /// Bytes available now; `None` where that is not known (the memory checks are skipped).
    memory: Option<f64>,
    /// Training images (after `train_limit`) and test images (after `test_limit`).
    train_images: f64,
    test_images: f64,
}

impl Resources {
    fn fits(&self, key: &str, need: f64, what: impl FnOnce() -> String) -> Result<()> {
        match self.memory {
            Some(available) if need > available => bail!(
                "key `{key}`: {} needs about {}, more than the {} of memory available",
                what(),
                gib(need),
                gib(available)
            ),
            _ => Ok(()),
        }
    }
}

/// A built model's size and cost per image.
struct Cost {
    params: f64,
    /// Parameterised layers.
    layers: f64,
    /// Graph nodes.
    nodes: f64,
    /// Activation values of one image (every node's output).
    activations: f64,
    macs: f64,
}

/// Checks `plan` against the machine (see the module's documentation).
///
/// # Errors
/// The first limit exceeded, naming its key and the estimate.
pub(crate) fn check(plan: &Plan) -> Result<()> {
    let (train_images, test_images) = image_counts(plan)?;
    let r = Resources { memory: available_memory().map(|m| m as f64), train_images, test_images };
    let shape = plan.data.shape;
    let images = r.train_images + r.test_images;
    let pixels = |s: [usize; 3]| s.iter().map(|&v| v as f64).product::<f64>();
    r.fits("data", images * (pixels(plan.data.native_shape) + pixels(shape)), || {
        format!("holding {images} images of {shape:?} (and as read)")
    })?;
    // Every model the plan builds: its size from the settings first, then built.
    let mut models: Vec<(String, &ModelSpec)> = vec![("model".into(), &plan.model)];
    for (i, stage) in plan.stages.iter().enumerate() {
        if let StagePlan::Distill(d) = stage {
            let at = format!("stages[{i}] (kind = \"distill\")");
            if let Some(s) = &d.student {
                models.push((format!("{at}.student"), s));
            }
            for (j, t) in d.teachers.iter().enumerate() {
                if let Some(m) = &t.model {
                    models.push((format!("{at}.teachers[{j}].model"), m));
                }
            }
        }
    }
    let mut costs = Vec::with_capacity(models.len());
    for (key, spec) in &models {
        let floor = spec.size_floor(shape);
        let need = floor.params * TRAINING_BYTES_PER_PARAM + floor.nodes * NODE_BYTES + floor.activations * 4.0;
        r.fits(key, need, || {
            format!(
                "{} ({:.3e} parameters, {:.3e} graph nodes, {:.3e} activations per image, trained with Adam)",
                spec.name(),
                floor.params,
                floor.nodes,
                floor.activations
            )
        })?;
        costs.push(built_cost(plan, spec).with_context(|| format!("key `{key}`"))?);
    }
    check_batches(plan, &r, &costs[0])?;
    check_work(plan, &r, &models, &costs)
}

/// The images the run reads, from the files' headers and sizes (nothing is decoded).
fn image_counts(plan: &Plan) -> Result<(f64, f64)> {
    let d = &plan.data;
    let p = &d.path;
    let (train, test) = match d.source {
        DataSource::Mnist5k | DataSource::Idx => {
            let count = |stem: &str| -> usize {
                shrink_core::data::idx_dims(&super::idx_file(p, stem))
                    .ok()
                    .and_then(|d| d.first().copied())
                    .unwrap_or(0)
            };
            (count("train-images-idx3-ubyte"), count("t10k-images-idx3-ubyte"))
        }
        DataSource::Cifar10 => {
            let records = |name: &str| std::fs::metadata(p.join(name)).map_or(0, |m| (m.len() / 3073) as usize);
            ((1..=5).map(|i| records(&format!("data_batch_{i}.bin"))).sum(), records("test_batch.bin"))
        }
        DataSource::ImageFolder { .. } => (folder_images(&p.join("train")), folder_images(&p.join("test"))),
    };
    let limit = |n: usize, l: Option<usize>| l.map_or(n, |l| l.min(n)) as f64;
    Ok((limit(train, d.train_limit), limit(test, d.test_limit)))
}

/// Files in the class folders of an image folder split.
fn folder_images(split: &Path) -> usize {
    let Ok(classes) = std::fs::read_dir(split) else { return 0 };
    classes.flatten().filter_map(|c| std::fs::read_dir(c.path()).ok()).map(|files| files.count()).sum()
}

fn built_cost(plan: &Plan, spec: &ModelSpec) -> Result<Cost> {
    let device = BackendKind::Flex.device()?;
    let graph = spec.build_for_names(plan.data.shape, &device)?;
    let stats = model_stats(&graph)?;
    let activations: f64 = graph.shapes()?.iter().map(|s| s.numel() as f64).sum();
    Ok(Cost {
        params: stats.params as f64,
        layers: stats.layers.len() as f64,
        nodes: graph.nodes.len() as f64,
        activations,
        macs: stats.macs as f64,
    })
}

/// Every batch the run will form, against the memory: training keeps each node's output and
/// its gradient; evaluation, calibration and latency measurement keep the outputs.
fn check_batches(plan: &Plan, r: &Resources, model: &Cost) -> Result<()> {
    let inference = |batch: usize| model.params * 4.0 + batch as f64 * model.activations * 4.0;
    let training =
        |batch: usize| model.params * TRAINING_BYTES_PER_PARAM + batch as f64 * model.activations * 4.0 * 2.0;
    for &b in &plan.latency.batch_sizes {
        r.fits("latency.batch_sizes", inference(b), || format!("measuring latency at batch {b}"))?;
    }
    for (i, stage) in plan.stages.iter().enumerate() {
        let at = format!("stages[{i}] (kind = \"{}\")", stage.kind());
        if let Some(t) = stage_training(stage) {
            r.fits(&format!("{at}.batch_size"), training(t.batch_size), || {
                format!("training with batches of {}", t.batch_size)
            })?;
        }
        let (key, batch) = match stage {
            StagePlan::Quantize(q) => ("batch_size", q.calibration.batch_size),
            StagePlan::Qat(q) => ("calibration_batch_size", q.calibration.batch_size),
            StagePlan::Evaluate(e) => ("batch_size", e.batch_size),
            _ => continue,
        };
        r.fits(&format!("{at}.{key}"), inference(batch), || format!("batches of {batch}"))?;
    }
    Ok(())
}

/// The training settings a stage trains the current model with.
fn stage_training(stage: &StagePlan) -> Option<&TrainSettings> {
    match stage {
        StagePlan::Train(t) => Some(&t.train),
        StagePlan::Distill(d) => Some(&d.train),
        StagePlan::Prune(p) => p.fine_tune.as_ref(),
        StagePlan::Qat(q) => Some(&q.qat.train),
        StagePlan::Quantize(_) | StagePlan::Evaluate(_) => None,
    }
}

/// The whole run's multiply-adds and training steps, against [`MAX_DAYS`].
fn check_work(plan: &Plan, r: &Resources, models: &[(String, &ModelSpec)], costs: &[Cost]) -> Result<()> {
    let n = r.train_images.max(1.0);
    let steps = |t: &TrainSettings| t.epochs as f64 * (n / t.batch_size as f64).ceil();
    // A training pass costs about three forward passes (forward, and backward for inputs and
    // weights).
    let training = |t: &TrainSettings, macs: f64| t.epochs as f64 * n * macs * 3.0;
    let first_train = plan.stages.iter().find_map(|s| match s {
        StagePlan::Train(t) => Some(&t.train),
        _ => None,
    });
    let cost_of =
        |spec: &ModelSpec| models.iter().position(|(_, m)| *m == spec).map_or(costs[0].macs, |i| costs[i].macs);
    let mut current = costs[0].macs;
    let (mut macs, mut train_steps) = (0.0, 0.0);
    let per_stage_checks = r.test_images * current
        + plan.latency.batch_sizes.iter().map(|&b| b as f64).sum::<f64>()
            * (plan.latency.warmup + plan.latency.repeats) as f64
            * current;
    let mut worst: Option<(String, f64)> = None;
    for (i, stage) in plan.stages.iter().enumerate() {
        let at = format!("stages[{i}] (kind = \"{}\")", stage.kind());
        let before = macs;
        match stage {
            StagePlan::Train(t) => {
                macs += training(&t.train, current);
                train_steps += steps(&t.train);
            }
            StagePlan::Distill(d) => {
                let student = d.student.as_ref().map_or(current, cost_of);
                let teachers: Vec<f64> =
                    d.teachers.iter().map(|t| t.model.as_ref().map_or(costs[0].macs, cost_of)).collect();
                let teacher_forward: f64 = if teachers.is_empty() { current } else { teachers.iter().sum() };
                let runs = d.seeds as f64 * if d.compare_scratch { 2.0 } else { 1.0 };
                macs += runs * d.train.epochs as f64 * n * (student * 3.0 + teacher_forward);
                train_steps += runs * steps(&d.train);
                if let Some(first) = first_train {
                    macs += teachers.iter().map(|&t| training(first, t)).sum::<f64>();
                    train_steps += teachers.len() as f64 * steps(first);
                }
                if d.student.is_some() {
                    current = student;
                }
            }
            StagePlan::Prune(p) => {
                if let Some(t) = &p.fine_tune {
                    let rounds = match p.schedule {
                        PruneSchedule::Lottery { rounds } => rounds as f64,
                        _ => 1.0,
                    };
                    macs += rounds * training(t, current);
                    train_steps += rounds * steps(t);
                    if let PruneSchedule::Agp { updates, .. } = p.schedule
                        && updates as f64 > steps(t)
                    {
                        bail!(
                            "key `{at}.prune_schedule.updates`: {updates} sparsity updates, but the fine-tuning has {} steps ({} epochs of {} images in batches of {}); at most one update per step",
                            steps(t),
                            t.epochs,
                            n,
                            t.batch_size
                        );
                    }
                }
                // Sensitivity: each ratio of each layer, evaluated.
                macs += p.sensitivity.len() as f64 * costs[0].layers * r.test_images * current;
            }
            StagePlan::Quantize(q) => {
                macs += (q.calibration.batches * q.calibration.batch_size) as f64 * current;
            }
            StagePlan::Qat(q) => {
                macs += (q.calibration.batches * q.calibration.batch_size) as f64 * current
                    + training(&q.qat.train, current) * 2.0;
                train_steps += steps(&q.qat.train);
            }
            StagePlan::Evaluate(_) => {}
        }
        macs += per_stage_checks;
        if worst.as_ref().is_none_or(|(_, w)| macs - before > *w) {
            worst = Some((at, macs - before));
        }
    }
    let step_seconds = MIN_STEP_SECONDS + costs.iter().map(|c| c.nodes).fold(0.0, f64::max) * MIN_NODE_STEP_SECONDS;
    let seconds = macs / OPTIMISTIC_MACS_PER_SECOND + train_steps * step_seconds;
    let days = seconds / 86_400.0;
    if days > MAX_DAYS {
        let (at, _) = worst.unwrap_or_default();
        bail!(
            "key `{at}`: the run would take about {days:.0} days even at {OPTIMISTIC_MACS_PER_SECOND:.0e} multiply-adds per second ({macs:.2e} multiply-adds in {train_steps:.2e} training steps over all stages, most of them in this stage); runs of up to {MAX_DAYS} days are accepted — lower its epochs or batches"
        );
    }
    Ok(())
}
