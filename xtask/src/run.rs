//! Runs a validated [`Plan`]: loads the data, builds the model, runs each stage, measures the
//! model after each, and writes the run directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shrink_core::data::{
    Batcher, Dataset, load_cifar10_bin, load_idx_pair, load_image_folder, load_mnist_dir, shuffled,
};
use shrink_core::graph::Graph;
use shrink_core::metrics::{ModelStats, measure_frozen_latency, measure_latency, measure_plan_latency, model_stats};
use shrink_core::train::{
    EpochRecord, Evaluation, TrainData, TrainObserver, evaluate, evaluate_plan, evaluate_with, train,
};
use shrink_core::zoo::ModelSpec;
use shrink_core::{BackendKind, io};
use shrink_distill::{Teacher, distill, ensemble_log_probs};
use shrink_quant::{PtqSettings, QatSettings, QuantizedModel, quantization_aware_training, quantize_static};

use crate::config::{DataKind, Plan, Stage};
use crate::report::{
    DistillSummary, ModelResult, Provenance, PruneSummary, QuantSummary, Report, StageReport, StudentRun, write_report,
};

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

/// The loaded data of a run.
pub struct Data {
    pub train: Dataset,
    pub validation: Option<Dataset>,
    pub test: Dataset,
    pub batcher: Batcher,
}

fn load_data(plan: &Plan) -> Result<Data> {
    let d = &plan.experiment.data;
    let p = &plan.data_path;
    let find = |stem: &str| -> PathBuf {
        let gz = p.join(format!("{stem}.gz"));
        if gz.exists() { gz } else { p.join(stem) }
    };
    let (train_set, test_set) = match d.kind {
        DataKind::Mnist5k => load_mnist_dir(p)?,
        DataKind::Idx => (
            load_idx_pair(&find("train-images-idx3-ubyte"), &find("train-labels-idx1-ubyte"))?,
            load_idx_pair(&find("t10k-images-idx3-ubyte"), &find("t10k-labels-idx1-ubyte"))?,
        ),
        DataKind::Cifar10 => {
            let train_files: Vec<PathBuf> = (1..=5).map(|i| p.join(format!("data_batch_{i}.bin"))).collect();
            let refs: Vec<&Path> = train_files.iter().map(|f| f.as_path()).collect();
            (load_cifar10_bin(&refs)?, load_cifar10_bin(&[&p.join("test_batch.bin")])?)
        }
        DataKind::ImageFolder => {
            let size = d.image_size.expect("validated");
            let channels = d.channels.expect("validated");
            (load_image_folder(&p.join("train"), size, channels)?, load_image_folder(&p.join("test"), size, channels)?)
        }
    };
    if train_set.shape != test_set.shape {
        return Err(anyhow!(
            "{}: training images are {:?} but test images are {:?}",
            p.display(),
            train_set.shape,
            test_set.shape
        ));
    }
    let seed = plan.experiment.seed;
    let limit = |set: Dataset, limit: Option<usize>, salt: u64| match limit {
        Some(n) if n < set.len() => set.subset(&shuffled(set.len(), seed ^ salt)[..n]),
        _ => set,
    };
    let train_set = limit(train_set, d.train_limit, 0x7472);
    let test_set = limit(test_set, d.test_limit, 0x7465);
    let (train_set, validation) = if d.validation_fraction > 0.0 {
        let (t, v) = train_set.split(d.validation_fraction, seed)?;
        (t, Some(v))
    } else {
        (train_set, None)
    };
    let batcher = Batcher { normalization: train_set.channel_stats(), augmentation: d.augmentation.clone() };
    tracing::info!(train = train_set.len(), test = test_set.len(), "data loaded from {}", p.display());
    Ok(Data { train: train_set, validation, test: test_set, batcher })
}

/// What a cached baseline keeps beside its model file.
#[derive(Serialize, Deserialize)]
struct CacheEntry {
    key: String,
    history: Vec<EpochRecord>,
    train_seconds: f64,
}

/// The cache key of a model trained from scratch: everything that decides its weights (the
/// architecture, the seed of its initial weights, the data, the train stage, and the stage's
/// position, which offsets the seed of the data order).
fn baseline_key(plan: &Plan, model: &ModelSpec, seed: u64, stage: &Stage, index: usize) -> String {
    let e = &plan.experiment;
    let mut data = e.data.clone();
    data.path = Some(plan.data_path.clone());
    let mut described = serde_json::json!({
        "model": model, "data": data, "stage": stage, "seed": seed,
        "backend": e.backend, "threads": e.threads,
        "shrink": env!("CARGO_PKG_VERSION"), "burn": shrink_core::BURN_VERSION,
    });
    if index != 0 {
        // Keys of first-stage baselines stay as they were before the index counted.
        described["stage_index"] = index.into();
    }
    let digest = Sha256::digest(described.to_string().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A model trained from a fresh build (or reused from the cache).
struct Trained {
    graph: Graph,
    history: Vec<EpochRecord>,
    train_seconds: f64,
    key: String,
    reused: bool,
}

fn progress_bar(opts: &RunOptions, epochs: usize, label: &str) -> Progress {
    let bar = opts.progress.then(|| {
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} {msg} [{elapsed}<{eta}]")
                .expect("valid template"),
        );
        bar.set_prefix(label.to_string());
        bar
    });
    Progress { bar, epochs }
}

/// A bar over the calibration batches (ticked as each batch is drawn).
fn calibration_bar(opts: &RunOptions, batches: usize) -> Option<ProgressBar> {
    (opts.progress && batches > 0).then(|| {
        let bar = ProgressBar::new(batches as u64);
        bar.set_style(
            ProgressStyle::with_template("calibration {bar:30} {pos}/{len} batches [{elapsed}<{eta}]")
                .expect("valid template"),
        );
        bar
    })
}

/// Builds `model` with `seed`, trains it with the train stage `stage` (at position `index`) and
/// caches it; a second call with the same inputs loads the cached model instead.
#[allow(clippy::too_many_arguments)] // everything the cache key and the progress bar need
fn train_cached(
    plan: &Plan,
    opts: &RunOptions,
    data: &Data,
    model: &ModelSpec,
    seed: u64,
    stage: &Stage,
    index: usize,
    label: &str,
) -> Result<Trained> {
    let settings = stage.train_settings().expect("a train stage");
    let device = plan.experiment.backend.device()?;
    let key = baseline_key(plan, model, seed, stage, index);
    let model_file = opts.cache.join(format!("{key}.safetensors"));
    let meta = opts.cache.join(format!("{key}.json"));
    let hit = (|| {
        let entry: CacheEntry = serde_json::from_slice(&std::fs::read(&meta).ok()?).ok()?;
        let g = io::load(&model_file, &device).ok()?;
        (entry.key == key).then_some((g, entry))
    })();
    if let Some((graph, entry)) = hit {
        tracing::info!(%key, %label, "reusing the cached model from {}", opts.cache.display());
        eprintln!("reusing cached {label} {key} ({})", opts.cache.display());
        return Ok(Trained { graph, history: entry.history, train_seconds: entry.train_seconds, key, reused: true });
    }
    let graph = model.build(data.train.shape, data.train.classes, seed, &device)?;
    let mut progress = progress_bar(opts, settings.epochs, label);
    let t0 = Instant::now();
    let (graph, history) = train(
        graph,
        TrainData { train: &data.train, validation: data.validation.as_ref(), batcher: &data.batcher },
        &settings,
        &device,
        seed.wrapping_add(index as u64),
        &mut progress,
    )
    .with_context(|| format!("training the {label}"))?;
    if let Some(bar) = progress.bar {
        bar.finish_and_clear();
    }
    let train_seconds = t0.elapsed().as_secs_f64();
    let entry = CacheEntry { key: key.clone(), history: history.clone(), train_seconds };
    io::save(&graph, &model_file)?;
    io::write_atomic(&meta, serde_json::to_string_pretty(&entry)?.as_bytes())?;
    tracing::info!(%key, %label, "cached in {}", opts.cache.display());
    Ok(Trained { graph, history, train_seconds, key, reused: false })
}

struct Progress {
    bar: Option<ProgressBar>,
    epochs: usize,
}

impl TrainObserver for Progress {
    fn on_step(&mut self, epoch: usize, step: usize, steps: usize, loss: f64) {
        if let Some(bar) = &self.bar {
            if step == 1 {
                bar.set_length(steps as u64);
                bar.set_position(0);
            }
            bar.set_message(format!("epoch {epoch}/{} loss {loss:.4}", self.epochs));
            bar.inc(1);
        }
    }
    fn on_epoch(&mut self, r: &EpochRecord) {
        let val = r.validation.as_ref().map(|v| format!(" val acc {:.4}", v.top1)).unwrap_or_default();
        let line = format!(
            "epoch {}/{}: loss {:.4} train acc {:.4}{val} lr {:.4} ({:.1}s)",
            r.epoch, self.epochs, r.train_loss, r.train_accuracy, r.lr, r.seconds
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

/// Quantizes one layer at a time (the others f32) and measures each on the integer plan; draws
/// the chart into the run directory.
fn measure_sensitivity(
    original: &Graph,
    q: &QuantizedModel,
    data: &Data,
    plan: &Plan,
    index: usize,
    run_dir: &Path,
) -> Result<crate::report::Sensitivity> {
    let device = plan.experiment.backend.device()?;
    let threads = plan.experiment.threads;
    let (folded, _) = original.clone().fold_batch_norms()?;
    let mut f32_plan = shrink_core::runtime::freeze_with(
        &folded,
        &shrink_core::runtime::KernelRegistry::default(),
        &shrink_core::runtime::FreezeOptions { threads },
    )?;
    let reference = evaluate_plan(&mut f32_plan, &data.test, &data.batcher, 250, &device)?;
    let mut layers = Vec::new();
    for name in q.layers.keys() {
        let one = q.with_only(original, name)?;
        let eval = evaluate_plan(&mut one.freeze(threads)?, &data.test, &data.batcher, 250, &device)?;
        tracing::info!(layer = %name, top1 = eval.top1, loss = eval.loss, "sensitivity");
        layers.push((name.clone(), eval.top1, eval.loss));
    }
    layers.sort_by(|a, b| b.2.total_cmp(&a.2));
    let chart = format!("sensitivity_stage{index}.svg");
    let sens =
        crate::report::Sensitivity { reference_top1: reference.top1, reference_loss: reference.loss, layers, chart };
    crate::report::write_sensitivity_chart(&plan.experiment.name, &sens, &run_dir.join(&sens.chart))?;
    Ok(sens)
}

/// Measures a quantized model: test metrics on the integer plan (and, with `simulate`, on burn
/// with fake-quant), size, cost, and latency of burn's forward, the f32 plan and the integer plan.
fn measure_quantized(
    q: &QuantizedModel,
    data: &Data,
    backend: BackendKind,
    plan: &Plan,
    batch: usize,
    simulate: bool,
) -> Result<(Evaluation, Option<Evaluation>, ModelStats, Vec<shrink_core::metrics::Latency>)> {
    let device = backend.device()?;
    let threads = plan.experiment.threads;
    let mut int8 = q.freeze(threads)?;
    let integer = evaluate_plan(&mut int8, &data.test, &data.batcher, batch, &device)?;
    let classes = q.graph.num_outputs();
    let simulated = simulate
        .then(|| evaluate_with(&data.test, &data.batcher, batch, classes, &device, &mut |x| Ok(q.forward_simulated(x))))
        .transpose()?;
    let stats = model_stats(&q.graph)?;
    let mut latency = measure_latency(&q.graph, backend, &plan.experiment.latency)?;
    latency.extend(measure_plan_latency(&q.graph, threads, &plan.experiment.latency)?);
    latency.extend(measure_frozen_latency(
        &mut int8,
        q.graph.input_shape(),
        "cpu-plan-int8",
        &plan.experiment.latency,
    )?);
    Ok((integer, simulated, stats, latency))
}

/// Each layer (or channel group) pruned alone at `ratios`, measured on the validation split (or
/// the test split when there is none); with `max_drop`, also the overrides that give each unit
/// its sparsity.
fn prune_sensitivity(
    graph: &Graph,
    data: &Data,
    settings: &shrink_prune::PruneSettings,
    ratios: &[f64],
    max_drop: Option<f64>,
    plan: &Plan,
    index: usize,
) -> Result<(crate::report::PruneSensitivity, Vec<shrink_prune::SparsityOverride>)> {
    let device = plan.experiment.backend.device()?;
    let (set, evaluated_on) = match data.validation.as_ref() {
        Some(v) if !v.is_empty() => (v, "validation"),
        _ => (&data.test, "test"),
    };
    let reference = evaluate(graph, set, &data.batcher, 250, &device)?;
    let mut measure = |g: &Graph| -> std::result::Result<(f64, f64), shrink_prune::Error> {
        let ev = evaluate(g, set, &data.batcher, 250, &device)?;
        Ok((ev.top1, ev.loss))
    };
    let train = TrainData { train: &data.train, validation: data.validation.as_ref(), batcher: &data.batcher };
    let units = shrink_prune::sensitivity(graph, train, settings, ratios, &device, &mut measure)
        .with_context(|| format!("stage {index} (prune): sensitivity"))?;
    for u in &units {
        tracing::info!(layer = %u.name, points = ?u.points, "pruning sensitivity");
    }
    let overrides = max_drop.map(|d| shrink_prune::ratios_for_drop(&units, reference.top1, d)).unwrap_or_default();
    let chosen = overrides.iter().zip(&units).map(|(o, u)| (u.name.clone(), o.sparsity)).collect();
    let sens = crate::report::PruneSensitivity {
        evaluated_on: evaluated_on.into(),
        reference_top1: reference.top1,
        reference_loss: reference.loss,
        units,
        chosen,
        chart: format!("prune_sensitivity_stage{index}.svg"),
    };
    Ok((sens, overrides))
}

/// The CPU plan of `graph` with shrink-prune's sparse kernels, if any layer is sparse enough to
/// run on them.
fn sparse_plan(graph: &Graph, threads: usize) -> Result<Option<shrink_core::runtime::Plan>> {
    let plan = shrink_core::runtime::freeze_with(
        graph,
        &shrink_prune::sparse_registry(),
        &shrink_core::runtime::FreezeOptions { threads },
    )?;
    Ok(plan.kernels().iter().any(|(_, k)| k.contains("spmm")).then_some(plan))
}

/// How a static quantize or a qat stage stores activations, for the report.
fn activations_text(activations: shrink_quant::ActivationType) -> String {
    match activations {
        shrink_quant::ActivationType::U8 => "u8 asymmetric, per tensor, at the input of each quantized layer".into(),
        shrink_quant::ActivationType::I8 => {
            "i8 symmetric, per tensor, at the input of each quantized layer (run as u8 with zero point 128)".into()
        }
    }
}

/// Measures the current model: test metrics, size, cost and latency.
fn measure(
    graph: &Graph,
    data: &Data,
    backend: BackendKind,
    plan: &Plan,
    batch: usize,
) -> Result<(Evaluation, ModelStats, Vec<shrink_core::metrics::Latency>)> {
    let device = backend.device()?;
    let eval = evaluate(graph, &data.test, &data.batcher, batch, &device)?;
    let stats = model_stats(graph)?;
    let mut latency = measure_latency(graph, backend, &plan.experiment.latency)?;
    latency.extend(measure_plan_latency(graph, plan.experiment.threads, &plan.experiment.latency)?);
    // Pruned weights: also the plan whose sparse-enough layers run on the sparse kernels.
    if let Some(mut sparse) = sparse_plan(graph, plan.experiment.threads)? {
        latency.extend(measure_frozen_latency(
            &mut sparse,
            graph.input_shape(),
            "cpu-plan-sparse",
            &plan.experiment.latency,
        )?);
    }
    Ok((eval, stats, latency))
}

/// The config as the run resolved it (defaults filled in), as `config.resolved.toml` holds it.
pub fn resolved_config(plan: &Plan) -> Result<String> {
    toml::to_string_pretty(&plan.experiment).context("serialising the resolved config")
}

/// Runs one plan; returns the run directory. The report is written even when a stage fails.
/// `resume` is the report of an unfinished run in `run_dir` to continue from its checkpoint
/// (see [`crate::checkpoint`]).
pub fn run_plan(plan: &Plan, opts: &RunOptions, run_dir: &Path, resume: Option<Report>) -> Result<PathBuf> {
    let e = &plan.experiment;
    let started = time::OffsetDateTime::now_utc();
    let mut report = Report::new(plan, Provenance::collect(e, started));
    std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    io::write_atomic(&run_dir.join("config.resolved.toml"), resolved_config(plan)?.as_bytes())?;
    let resuming = resume.is_some();
    if let Some(previous) = resume {
        report.resumed = previous.resumed;
        report.resumed.push(crate::report::Resumption {
            utc: crate::report::utc(started),
            previous_status: previous.status,
            stages_kept: 0,
        });
    }
    report.status = "running".into();
    write_report(&report, run_dir)?;

    let result = run_stages(plan, opts, run_dir, &mut report, resuming);
    report.provenance.finished_utc = crate::report::utc(time::OffsetDateTime::now_utc());
    match &result {
        Ok(()) => {
            report.status = "complete".into();
            crate::checkpoint::remove(run_dir);
        }
        Err(err) => {
            report.status = "failed".into();
            report.error = Some(format!("{err:#}"));
        }
    }
    write_report(&report, run_dir)?;
    result.map(|()| run_dir.to_path_buf())
}

fn run_stages(plan: &Plan, opts: &RunOptions, run_dir: &Path, report: &mut Report, resuming: bool) -> Result<()> {
    let e = &plan.experiment;
    let threads = shrink_core::backend::set_cpu_threads(e.threads);
    report.provenance.threads = threads;
    let data = {
        let _span = tracing::info_span!("load_data").entered();
        load_data(plan)?
    };
    report.data = Some(crate::report::DataSummary {
        train: data.train.len(),
        validation: data.validation.as_ref().map_or(0, |v| v.len()),
        test: data.test.len(),
        shape: data.train.shape,
        classes: data.train.classes,
    });
    let device = e.backend.device()?;
    // Initial weights from the host's generator: the same on every backend.
    let mut graph = e.model.build(data.train.shape, data.train.classes, e.seed, &device)?;
    tracing::info!(model = %e.model.name(), nodes = graph.nodes.len(), "model built");
    let mut fresh = true;
    // The model as the last train stage left it: the default teacher of a distill stage.
    let mut uncompressed: Option<Graph> = None;
    let mut quantized: Option<QuantizedModel> = None;
    let mut first = 0;
    if resuming && let Some(restored) = crate::checkpoint::load(run_dir, &device)? {
        tracing::info!(stages_done = restored.stages_done, "resuming from the checkpoint in {}", run_dir.display());
        eprintln!("resuming {} after {} finished stage(s)", run_dir.display(), restored.stages_done);
        first = restored.stages_done;
        fresh = restored.fresh;
        graph = restored.graph;
        uncompressed = restored.uncompressed;
        quantized = restored.quantized;
        report.stages = restored.stages;
        if let Some(r) = report.resumed.last_mut() {
            r.stages_kept = first;
        }
    }
    for (index, stage) in e.stages.iter().enumerate().skip(first) {
        // Each stage after the first draws from its own seed, so a resumed run initialises
        // (adapters, …) exactly as an uninterrupted one.
        if index > 0 {
            device.seed(e.seed.wrapping_add(0x5EED_0000 + index as u64));
        }
        report.current_stage = Some(format!("{index}:{}", stage.kind()));
        let _span = tracing::info_span!("stage", index, kind = stage.kind()).entered();
        let start = Instant::now();
        let mut stage_report = StageReport::new(index, stage.kind());
        match stage {
            Stage::Train { .. } if fresh => {
                let t = train_cached(plan, opts, &data, &e.model, e.seed, stage, index, "baseline")?;
                graph = t.graph;
                if t.reused {
                    stage_report.cached_baseline = Some(t.key);
                } else {
                    stage_report.cache_key = Some(t.key);
                }
                stage_report.history = t.history;
                stage_report.train_seconds = Some(t.train_seconds);
                fresh = false;
                uncompressed = Some(graph.clone());
            }
            Stage::Train { .. } => {
                let settings = &stage.train_settings().expect("a train stage");
                let mut progress = progress_bar(opts, settings.epochs, "train");
                let t0 = Instant::now();
                let (trained, history) = train(
                    graph,
                    TrainData { train: &data.train, validation: data.validation.as_ref(), batcher: &data.batcher },
                    settings,
                    &device,
                    e.seed.wrapping_add(index as u64),
                    &mut progress,
                )?;
                if let Some(bar) = progress.bar {
                    bar.finish_and_clear();
                }
                graph = trained;
                stage_report.history = history;
                stage_report.train_seconds = Some(t0.elapsed().as_secs_f64());
                uncompressed = Some(graph.clone());
            }
            Stage::Distill { .. } => {
                let out = run_distill(plan, opts, &data, stage, index, &graph, uncompressed.as_ref())?;
                graph = out.graph;
                if out.new_student {
                    uncompressed = Some(graph.clone());
                }
                fresh = false;
                stage_report.history = out.history;
                stage_report.train_seconds = Some(out.train_seconds);
                stage_report.distillation = Some(out.summary);
            }
            Stage::Quantize {
                mode,
                weight_bits,
                per_channel,
                calibrator,
                calibration_batches,
                batch_size,
                overrides,
                sensitivity,
                bias_correction,
                cross_layer_equalization,
                adaround,
                activations,
                asymmetric_weights,
            } => {
                let dynamic = *mode == crate::config::QuantMode::Dynamic;
                let settings = PtqSettings {
                    weight_bits: *weight_bits,
                    per_channel: *per_channel,
                    asymmetric_weights: *asymmetric_weights,
                    calibrator: *calibrator,
                    overrides: overrides.clone(),
                    dynamic,
                    bias_correction: *bias_correction,
                    cross_layer_equalization: *cross_layer_equalization,
                    adaround: adaround.clone(),
                    activations: *activations,
                };
                let wanted = if dynamic { 0 } else { *calibration_batches };
                let chunks = calibration_batches_of(&data, e.seed, wanted, *batch_size);
                let images: usize = chunks.iter().map(|c| c.len()).sum();
                let bar = calibration_bar(opts, chunks.len());
                let mut batches = chunks.iter().map(|c| {
                    bar.as_ref().inspect(|b| b.inc(1));
                    data.batcher.batch(&data.train, c, &device, None).0
                });
                let q = quantize_static(&graph, &mut batches, &settings)
                    .with_context(|| format!("stage {index} (quantize)"))?;
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                tracing::info!(layers = q.layers.len(), float = q.float_layers.len(), images, "quantized");
                stage_report.quantization = Some(quant_summary(
                    &q,
                    &graph,
                    if dynamic { "dynamic post-training" } else { "static post-training" }.into(),
                    weights_text(*weight_bits, *per_channel, *asymmetric_weights, false)
                        + &if q.equalized.is_empty() {
                            String::new()
                        } else {
                            format!(", cross-layer equalized ({} layer pairs)", q.equalized.len())
                        }
                        + &match adaround {
                            Some(a) if !dynamic => format!(
                                ", rounding learned by AdaRound ({} steps per layer on {} calibration images)",
                                a.iterations, a.images
                            ),
                            _ => String::new(),
                        }
                        + if *bias_correction && !dynamic {
                            ", biases corrected for the rounding's mean shift"
                        } else {
                            ""
                        },
                    if dynamic {
                        "u8 asymmetric, per tensor, range measured on each batch at run time".into()
                    } else {
                        activations_text(*activations)
                    },
                    if dynamic { "none (dynamic)".into() } else { format!("{calibrator:?}") },
                    images,
                )?);
                if *sensitivity {
                    let sens = measure_sensitivity(&graph, &q, &data, plan, index, run_dir)?;
                    if let Some(summary) = stage_report.quantization.as_mut() {
                        summary.sensitivity = Some(sens);
                    }
                }
                quantized = Some(q);
            }
            Stage::Qat {
                weight_bits,
                per_channel,
                calibrator,
                calibration_batches,
                calibration_batch_size,
                overrides,
                learn_scales,
                freeze_observers_epoch,
                distill,
                activations,
                ..
            } => {
                let ptq = PtqSettings {
                    weight_bits: *weight_bits,
                    per_channel: *per_channel,
                    asymmetric_weights: false,
                    calibrator: *calibrator,
                    overrides: overrides.clone(),
                    dynamic: false,
                    bias_correction: false,
                    cross_layer_equalization: false,
                    adaround: None,
                    activations: *activations,
                };
                // The calibration images, assembled once for both the comparison and QAT.
                let bar = calibration_bar(opts, *calibration_batches);
                let images: Vec<_> =
                    calibration_batches_of(&data, e.seed, *calibration_batches, *calibration_batch_size)
                        .iter()
                        .map(|c| {
                            bar.as_ref().inspect(|b| b.inc(1));
                            data.batcher.batch(&data.train, c, &device, None).0
                        })
                        .collect();
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                // Post-training quantization with the same settings, for comparison.
                let post = quantize_static(&graph, &mut images.iter().cloned(), &ptq)
                    .with_context(|| format!("stage {index} (qat): post-training quantization for comparison"))?;
                let ptq_test = evaluate_plan(&mut post.freeze(e.threads)?, &data.test, &data.batcher, 250, &device)?;
                tracing::info!(top1 = ptq_test.top1, "post-training quantization with the same settings");
                let settings = stage.train_settings().expect("a qat stage");
                let qat = QatSettings {
                    ptq,
                    train: settings.clone(),
                    learn_scales: *learn_scales,
                    freeze_observers_epoch: *freeze_observers_epoch,
                    distill: distill
                        .as_ref()
                        .map(|d| shrink_quant::QatDistill { temperature: d.temperature, alpha: d.alpha }),
                };
                let mut progress = progress_bar(opts, settings.epochs, "qat");
                let t0 = Instant::now();
                let out = quantization_aware_training(
                    &graph,
                    &mut images.into_iter(),
                    TrainData { train: &data.train, validation: data.validation.as_ref(), batcher: &data.batcher },
                    &qat,
                    shrink_core::train::TrainRun {
                        device: &device,
                        seed: e.seed.wrapping_add(index as u64),
                        observer: &mut progress,
                    },
                )
                .with_context(|| format!("stage {index} (qat)"))?;
                if let Some(bar) = progress.bar {
                    bar.finish_and_clear();
                }
                stage_report.history = out.history;
                stage_report.train_seconds = Some(t0.elapsed().as_secs_f64());
                let q = out.model;
                let taught = distill
                    .as_ref()
                    .map(|d| format!(", distilled from the f32 model (T = {}, α = {})", d.temperature, d.alpha))
                    .unwrap_or_default();
                let method = if *learn_scales {
                    "quantization-aware training, learned scales (LSQ)".to_string()
                } else {
                    match freeze_observers_epoch {
                        Some(f) => format!(
                            "quantization-aware training, scales from the data (activation observers frozen after epoch {f})"
                        ),
                        None => "quantization-aware training, scales from the data".to_string(),
                    }
                };
                stage_report.quantization = Some(quant_summary(
                    &q,
                    &graph,
                    method + &taught,
                    weights_text(*weight_bits, *per_channel, false, *learn_scales),
                    activations_text(*activations),
                    format!("{calibrator:?} (initial ranges)"),
                    out.calibration_images,
                )?);
                if let Some(summary) = stage_report.quantization.as_mut() {
                    summary.ptq_test = Some(ptq_test);
                }
                quantized = Some(q);
            }
            Stage::Prune {
                granularity,
                criterion,
                prune_schedule,
                scope,
                epochs,
                sensitivity,
                sensitivity_max_drop,
                ..
            } => {
                let mut settings = stage.prune_settings(e.seed).expect("a prune stage");
                let sens = if sensitivity.is_empty() {
                    None
                } else {
                    let (s, overrides) =
                        prune_sensitivity(&graph, &data, &settings, sensitivity, *sensitivity_max_drop, plan, index)?;
                    if !overrides.is_empty() {
                        // Each layer's sparsity comes from the budget.
                        settings.overrides = overrides;
                        settings.global = false;
                    }
                    crate::report::write_prune_sensitivity_chart(&e.name, &s, &run_dir.join(&s.chart))?;
                    Some(s)
                };
                let train_settings = stage.train_settings();
                let before = model_stats(&graph)?;
                let file_bytes_before = io::to_bytes(&graph)?.len();
                let previous = report.stages.last();
                let (test_before, latency_before) =
                    (previous.and_then(|p| p.test.clone()), previous.map(|p| p.latency.clone()).unwrap_or_default());
                let mut progress = progress_bar(opts, *epochs, "prune");
                let t0 = Instant::now();
                // Lottery tickets rewind to the weights the baseline started from: the same seed
                // builds them again.
                let initial = match prune_schedule {
                    shrink_prune::PruneSchedule::Lottery { .. } => {
                        Some(e.model.build(data.train.shape, data.train.classes, e.seed, &device)?)
                    }
                    _ => None,
                };
                let options = shrink_prune::PruneOptions {
                    schedule: prune_schedule.clone(),
                    fine_tune: train_settings.clone(),
                    rewind_to: initial.as_ref(),
                };
                let out = shrink_prune::prune(
                    &graph,
                    &settings,
                    &options,
                    TrainData { train: &data.train, validation: data.validation.as_ref(), batcher: &data.batcher },
                    shrink_core::train::TrainRun {
                        device: &device,
                        seed: e.seed.wrapping_add(index as u64),
                        observer: &mut progress,
                    },
                )
                .with_context(|| format!("stage {index} (prune)"))?;
                if let Some(bar) = progress.bar {
                    bar.finish_and_clear();
                }
                graph = out.graph;
                stage_report.history = out.history;
                stage_report.train_seconds = Some(t0.elapsed().as_secs_f64());
                let structured = *granularity == shrink_prune::Granularity::Channels;
                let scope_text = match scope {
                    crate::config::PruneScope::Global => format!(
                        "global ranking (each layer between {} and {})",
                        settings.min_layer_sparsity, settings.max_layer_sparsity
                    ),
                    crate::config::PruneScope::Layer => "the same sparsity in each layer".into(),
                };
                let what = match granularity {
                    shrink_prune::Granularity::Weights => format!("{:.0} % of the weights", settings.sparsity * 100.0),
                    shrink_prune::Granularity::Channels => {
                        format!("{:.0} % of the channels, removed physically", settings.sparsity * 100.0)
                    }
                    shrink_prune::Granularity::NOfM { n, m } => format!("{n}:{m} semi-structured"),
                };
                let tuning = match &train_settings {
                    Some(t) => format!("fine-tuned {} epoch(s)", t.epochs),
                    None => "no fine-tuning".into(),
                };
                let skipped = if settings.skip.is_empty() {
                    String::new()
                } else {
                    format!("; left dense: {}", settings.skip.join(", "))
                };
                // Which layers the sparse plan runs on sparse kernels, and its accuracy (the same
                // model: it checks the kernels on the test set).
                let (sparse_kernels, sparse_test) = match sparse_plan(&graph, e.threads)? {
                    Some(mut p) => {
                        let kernels: Vec<(String, String)> =
                            p.kernels().into_iter().filter(|(_, k)| k.contains("spmm")).collect();
                        (kernels, Some(evaluate_plan(&mut p, &data.test, &data.batcher, 250, &device)?))
                    }
                    None => (Vec::new(), None),
                };
                stage_report.pruning = Some(PruneSummary {
                    sensitivity: sens,
                    tickets: out.tickets.iter().map(|(s, r)| (*s, r.as_ref().map(|r| r.train_accuracy))).collect(),
                    sparse_kernels,
                    sparse_test,
                    method: format!(
                        "{what}, ranked by {criterion}, {scope_text}, schedule {prune_schedule}, {tuning}{skipped}"
                    ),
                    execution: if structured {
                        "removed channels are gone: smaller dense tensors in the model file, in burn and in the CPU plan".into()
                    } else {
                        format!(
                            "the model file stores each weight with at most {:.0} % non-zeros as a bitmask and its non-zero values; in the CPU plan (`cpu-plan-sparse`), layers with at most {:.0} % non-zero weights run on CSR sparse kernels, the others dense; burn and `cpu-plan` compute the zeros densely",
                            io::SPARSE_FILE_MAX_DENSITY * 100.0,
                            shrink_prune::SPARSE_MAX_DENSITY * 100.0
                        )
                    },
                    events: out.events,
                    weight_sparsity: out.masks.as_ref().map(|m| m.sparsity()),
                    groups: out
                        .rounds
                        .last()
                        .map(|plans| {
                            // Channels before the first round, kept after the last.
                            let first = &out.rounds[0];
                            plans
                                .iter()
                                .map(|p| {
                                    let before =
                                        first.iter().find(|f| f.group == p.group).map_or(p.channels, |f| f.channels);
                                    (p.producers.join(", "), before, p.keep.len())
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    layers_before: before.layers,
                    params_before: before.params,
                    nonzeros_before: before.nonzeros,
                    macs_before: before.macs,
                    file_bytes_before,
                    test_before,
                    latency_before,
                });
            }
            Stage::Evaluate { .. } => {}
        }
        let batch = match stage {
            Stage::Evaluate { batch_size } => *batch_size,
            _ => 250,
        };
        let (eval, stats, latency) = match &quantized {
            Some(q) => {
                // The simulated accuracy is reported by the quantize stage only.
                let simulate = stage_report.quantization.is_some();
                let (integer, simulated, stats, latency) =
                    measure_quantized(q, &data, e.backend, plan, batch, simulate)?;
                if let (Some(summary), Some(simulated)) = (stage_report.quantization.as_mut(), simulated) {
                    summary.simulated_test = simulated;
                    summary.simulated_on = e.backend.runner_label().into();
                }
                stage_report.evaluated_on = "cpu-plan-int8".into();
                stage_report.file_bytes = q.to_bytes()?.len();
                (integer, stats, latency)
            }
            None => {
                stage_report.evaluated_on = e.backend.runner_label().into();
                stage_report.file_bytes = io::to_bytes(&graph)?.len();
                measure(&graph, &data, e.backend, plan, batch)?
            }
        };
        tracing::info!(top1 = eval.top1, params = stats.params, macs = stats.macs, "stage measured");
        stage_report.set_measurements(eval, stats, latency);
        stage_report.wall_seconds = start.elapsed().as_secs_f64();
        report.stages.push(stage_report);
        report.current_stage = None;
        crate::checkpoint::save(
            run_dir,
            &crate::checkpoint::Snapshot {
                graph: &graph,
                fresh,
                uncompressed: uncompressed.as_ref(),
                quantized: quantized.as_ref(),
                stages: &report.stages,
            },
        )?;
        write_report(report, run_dir)?;
        pause_for_tests(report.stages.len());
    }
    match &quantized {
        Some(q) => q.save(&run_dir.join("model.safetensors"))?,
        None => io::save(&graph, &run_dir.join("model.safetensors"))?,
    }
    report.model_file = Some("model.safetensors".into());
    crate::report::write_training_curve(report, &run_dir.join("training_curve.svg"))?;
    Ok(())
}

/// What a distill stage leaves behind.
struct DistillOutcome {
    graph: Graph,
    new_student: bool,
    history: Vec<EpochRecord>,
    train_seconds: f64,
    summary: DistillSummary,
}

/// A train stage with a distill stage's budget, for the student trained alone.
fn as_train_stage(stage: &Stage) -> Stage {
    let s = stage.train_settings().expect("a distill stage");
    Stage::Train {
        epochs: s.epochs,
        batch_size: s.batch_size,
        optimizer: s.optimizer,
        schedule: s.schedule,
        warmup_epochs: s.warmup_epochs,
    }
}

fn model_result(label: String, model: &ModelSpec, seed: Option<u64>, eval: &Evaluation) -> ModelResult {
    ModelResult { label, model: model.name(), seed, top1: eval.top1, errors: eval.errors(), loss: eval.loss }
}

/// Runs a distill stage: trains (or reuses) the teachers, distills them into the student for
/// each seed, trains the same student alone for comparison, and measures all of them.
fn run_distill(
    plan: &Plan,
    opts: &RunOptions,
    data: &Data,
    stage: &Stage,
    index: usize,
    current: &Graph,
    uncompressed: Option<&Graph>,
) -> Result<DistillOutcome> {
    let e = &plan.experiment;
    let Stage::Distill { student, teachers: teacher_specs, seeds, compare_scratch, .. } = stage else {
        unreachable!("a distill stage")
    };
    let device = e.backend.device()?;
    let eval = |g: &Graph| evaluate(g, &data.test, &data.batcher, 250, &device);
    let settings = stage.distill_settings().expect("a distill stage");
    let train_settings = stage.train_settings().expect("a distill stage");

    // Teachers.
    let mut teachers = Vec::new();
    let mut teacher_results = Vec::new();
    if teacher_specs.is_empty() {
        let graph = uncompressed.context("a distill stage needs a trained teacher")?.clone();
        let r = eval(&graph)?;
        teacher_results.push(model_result("teacher (the uncompressed model)".into(), &e.model, None, &r));
        teachers.push(Teacher { graph, weight: 1.0 });
    } else {
        let first_train = e.stages.iter().position(|s| matches!(s, Stage::Train { .. })).expect("validated");
        for (j, t) in teacher_specs.iter().enumerate() {
            let spec = t.model.clone().unwrap_or_else(|| e.model.clone());
            let seed = t.seed.unwrap_or(e.seed);
            let label = format!("teacher {j}");
            let trained = train_cached(plan, opts, data, &spec, seed, &e.stages[first_train], first_train, &label)?;
            let r = eval(&trained.graph)?;
            tracing::info!(teacher = j, model = %spec.name(), seed, top1 = r.top1, reused = trained.reused, "teacher ready");
            let mut result = model_result(label, &spec, Some(seed), &r);
            if trained.reused {
                result.label += &format!(" (cached {})", trained.key);
            }
            teacher_results.push(result);
            teachers.push(Teacher { graph: trained.graph, weight: t.weight });
        }
    }
    let ensemble = (teachers.len() > 1)
        .then(|| {
            let classes = teachers[0].graph.num_outputs();
            evaluate_with(&data.test, &data.batcher, 250, classes, &device, &mut |x| {
                Ok(ensemble_log_probs(&teachers, x))
            })
        })
        .transpose()?
        .map(|r| ModelResult {
            label: format!("ensemble of {} (mean of probabilities)", teachers.len()),
            model: String::new(),
            seed: None,
            top1: r.top1,
            errors: r.errors(),
            loss: r.loss,
        });

    // Students.
    let student_spec = student.clone();
    let compare = compare_scratch.unwrap_or(student_spec.is_some());
    let scratch_stage = as_train_stage(stage);
    let mut runs = Vec::new();
    let mut first: Option<(Graph, Vec<EpochRecord>)> = None;
    let mut cached_outputs = false;
    let mut adapters = Vec::new();
    let t0 = Instant::now();
    for r in 0..*seeds {
        let seed = e.seed.wrapping_add(r as u64);
        let initial = match &student_spec {
            Some(spec) => spec.build(data.train.shape, data.train.classes, seed, &device)?,
            None => current.clone(),
        };
        let mut progress = progress_bar(opts, train_settings.epochs, &format!("distill (seed {seed})"));
        let out = distill(
            initial,
            &teachers,
            TrainData { train: &data.train, validation: data.validation.as_ref(), batcher: &data.batcher },
            &train_settings,
            &settings,
            &device,
            seed.wrapping_add(index as u64),
            &mut progress,
        )
        .with_context(|| format!("stage {index} (distill), student seed {seed}"))?;
        if let Some(bar) = progress.bar {
            bar.finish_and_clear();
        }
        cached_outputs = out.teacher_outputs_cached;
        adapters = out.adapters;
        let name = student_spec.as_ref().map_or_else(|| "current model".into(), |s| s.name());
        let distilled = eval(&out.student)?;
        tracing::info!(seed, top1 = distilled.top1, errors = distilled.errors(), "distilled student");
        let mut run = StudentRun {
            seed,
            distilled: ModelResult {
                label: "distilled".into(),
                model: name.clone(),
                seed: Some(seed),
                top1: distilled.top1,
                errors: distilled.errors(),
                loss: distilled.loss,
            },
            scratch: None,
        };
        if let (true, Some(spec)) = (compare, &student_spec) {
            let alone = train_cached(plan, opts, data, spec, seed, &scratch_stage, index, "student alone")?;
            let a = eval(&alone.graph)?;
            tracing::info!(seed, top1 = a.top1, errors = a.errors(), "student trained alone");
            run.scratch = Some(model_result("trained alone".into(), spec, Some(seed), &a));
        }
        runs.push(run);
        if first.is_none() {
            first = Some((out.student, out.history));
        }
    }
    let (graph, history) = first.expect("at least one seed");
    let summary = DistillSummary::new(
        &settings,
        teacher_results,
        ensemble,
        student_spec.as_ref().map_or_else(|| "the current model".into(), |s| s.name()),
        runs,
        cached_outputs,
        adapters,
    );
    Ok(DistillOutcome {
        graph,
        new_student: student_spec.is_some(),
        history,
        train_seconds: t0.elapsed().as_secs_f64(),
        summary,
    })
}

/// Calibration images: `batches` chunks of `batch_size` from a seeded shuffle of the training set.
fn calibration_batches_of(data: &Data, seed: u64, batches: usize, batch_size: usize) -> Vec<Vec<usize>> {
    let order = shrink_core::data::shuffled(data.train.len(), seed ^ 0x7175);
    order.chunks(batch_size.max(1)).take(batches).map(|c| c.to_vec()).collect()
}

fn weights_text(bits: u32, per_channel: bool, asymmetric: bool, learned: bool) -> String {
    format!(
        "int{bits} weights, {}, {}{} (batch norms folded first)",
        if asymmetric { "asymmetric" } else { "symmetric" },
        if per_channel { "per output channel" } else { "per layer" },
        if learned { ", scales learned" } else { "" }
    )
}

/// The report's summary of a quantized model (the measured accuracies are filled in later).
fn quant_summary(
    q: &QuantizedModel,
    original: &Graph,
    method: String,
    weights: String,
    activations: String,
    calibrator: String,
    calibration_images: usize,
) -> Result<QuantSummary> {
    let labels = q.freeze(1)?.kernels();
    let kernel_of = |name: &str| labels.iter().find(|(n, _)| n == name).map(|(_, k)| k.clone());
    Ok(QuantSummary {
        method,
        weights,
        activations,
        calibrator,
        calibration_images,
        quantized_layers: q
            .layers
            .iter()
            .map(|(n, l)| (n.clone(), l.weight_bits, kernel_of(n).unwrap_or_default()))
            .collect(),
        float_layers: q.float_layers.clone(),
        int8_gemm: shrink_quant::kernels::int8_gemm_kernel_name(),
        simulated_test: Evaluation::default(),
        simulated_on: String::new(),
        f32_file_bytes: io::to_bytes(original)?.len(),
        sensitivity: None,
        ptq_test: None,
    })
}

/// The kill-and-resume test's hook: with `SHRINK_TEST_STOP_AFTER_STAGES=n`, the run prints a line
/// and waits forever once the checkpoint after `n` finished stages is written, so the test can
/// `kill -9` it at a known point. Not for anything else.
fn pause_for_tests(stages_done: usize) {
    if std::env::var("SHRINK_TEST_STOP_AFTER_STAGES").ok().and_then(|v| v.parse::<usize>().ok()) == Some(stages_done) {
        eprintln!("SHRINK_TEST_STOP_AFTER_STAGES={stages_done}: waiting to be killed");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
