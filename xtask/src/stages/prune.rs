//! The prune stage: an optional sensitivity scan (which may set each layer's sparsity from a
//! top-1 budget), the pruning itself with its fine-tuning, and a summary of before and after.

use std::time::Instant;

use anyhow::{Context, Result};
use shrink_core::graph::Graph;
use shrink_core::io;
use shrink_core::metrics::{ModelStats, model_stats};
use shrink_core::train::{Evaluation, TrainRun, evaluate, evaluate_plan};
use shrink_prune::{Granularity, PruneOptions, PruneOutcome, PruneSchedule, PruneSettings, SparsityOverride};

use super::{RunState, StageContext};
use crate::plan::PruneStage;
use crate::progress::Progress;
use crate::report::{PruneSensitivity, PruneSummary, StageReport, write_prune_sensitivity_chart};

pub fn run(stage: &PruneStage, cx: &StageContext<'_>, state: &mut RunState, report: &mut StageReport) -> Result<()> {
    let (plan, index) = (cx.plan, cx.index);
    let mut settings = stage.settings.clone();
    let sensitivity = if stage.sensitivity.is_empty() {
        None
    } else {
        let (s, overrides) = sensitivity(cx, &state.graph, stage)?;
        if !overrides.is_empty() {
            // Each layer's sparsity comes from the budget.
            settings.overrides = overrides;
            settings.global = false;
        }
        write_prune_sensitivity_chart(&plan.name, &s, &cx.run_dir.join(&s.chart))?;
        Some(s)
    };
    let before = Before::of(cx, &state.graph)?;
    let mut progress = Progress::new(cx.opts.progress, stage.fine_tune.as_ref().map_or(0, |t| t.epochs), "prune");
    let t0 = Instant::now();
    // Lottery tickets rewind to the weights the baseline started from: the same seed builds them
    // again.
    let initial = match stage.schedule {
        PruneSchedule::Lottery { .. } => {
            Some(plan.model.build(cx.data.train.shape, cx.data.train.classes, plan.seed, cx.device)?)
        }
        _ => None,
    };
    let options = PruneOptions {
        schedule: stage.schedule.clone(),
        fine_tune: stage.fine_tune.clone(),
        rewind_to: initial.as_ref(),
    };
    let run = TrainRun { device: cx.device, seed: cx.stage_seed(), observer: &mut progress };
    let out = shrink_prune::prune(&state.graph, &settings, &options, cx.data.train_data(), run)
        .with_context(|| format!("stage {index} (prune)"))?;
    progress.finish();
    state.graph = out.graph.clone();
    report.history = out.history.clone();
    report.train_seconds = Some(t0.elapsed().as_secs_f64());
    report.pruning = Some(summary(cx, stage, &settings, &out, before, sensitivity)?);
    Ok(())
}

/// Each layer (or channel group) pruned alone at the stage's ratios, measured on the validation
/// split (or the test split when there is none); with a top-1 budget, also the overrides that
/// give each unit its sparsity.
fn sensitivity(
    cx: &StageContext<'_>,
    graph: &Graph,
    stage: &PruneStage,
) -> Result<(PruneSensitivity, Vec<SparsityOverride>)> {
    let (data, device, index) = (cx.data, cx.device, cx.index);
    let (set, evaluated_on) = match data.validation.as_ref() {
        Some(v) if !v.is_empty() => (v, "validation"),
        _ => (&data.test, "test"),
    };
    let reference = evaluate(graph, set, &data.batcher, 250, device)?;
    let mut measure = |g: &Graph| -> std::result::Result<(f64, f64), shrink_prune::Error> {
        let ev = evaluate(g, set, &data.batcher, 250, device)?;
        Ok((ev.top1, ev.loss))
    };
    let units =
        shrink_prune::sensitivity(graph, data.train_data(), &stage.settings, &stage.sensitivity, device, &mut measure)
            .with_context(|| format!("stage {index} (prune): sensitivity"))?;
    for u in &units {
        tracing::info!(layer = %u.name, points = ?u.points, "pruning sensitivity");
    }
    let overrides = stage
        .sensitivity_max_drop
        .map(|d| shrink_prune::ratios_for_drop(&units, reference.top1, d))
        .unwrap_or_default();
    let chosen = overrides.iter().zip(&units).map(|(o, u)| (u.name.clone(), o.sparsity)).collect();
    let sens = PruneSensitivity {
        evaluated_on: evaluated_on.into(),
        reference_top1: reference.top1,
        reference_loss: reference.loss,
        units,
        chosen,
        chart: format!("prune_sensitivity_stage{index}.svg"),
    };
    Ok((sens, overrides))
}

/// The model before the stage: its size and cost, and the test result and latency the previous
/// stage measured.
struct Before {
    stats: ModelStats,
    file_bytes: usize,
    test: Option<Evaluation>,
    latency: Vec<shrink_core::metrics::Latency>,
}

impl Before {
    fn of(cx: &StageContext<'_>, graph: &Graph) -> Result<Self> {
        Ok(Self {
            stats: model_stats(graph)?,
            file_bytes: io::to_bytes(graph)?.len(),
            test: cx.previous.and_then(|p| p.test.clone()),
            latency: cx.previous.map(|p| p.latency.clone()).unwrap_or_default(),
        })
    }
}

/// The report's summary of a prune stage.
fn summary(
    cx: &StageContext<'_>,
    stage: &PruneStage,
    settings: &PruneSettings,
    out: &PruneOutcome,
    before: Before,
    sensitivity: Option<PruneSensitivity>,
) -> Result<PruneSummary> {
    // Which layers the sparse plan runs on sparse kernels, and its accuracy (the same model: it
    // checks the kernels on the test set).
    let (sparse_kernels, sparse_test) = match crate::measure::sparse_plan(&out.graph, cx.plan.threads)? {
        Some(mut p) => {
            let kernels: Vec<(String, String)> = p.kernels().into_iter().filter(|(_, k)| k.contains("spmm")).collect();
            (kernels, Some(evaluate_plan(&mut p, &cx.data.test, &cx.data.batcher, 250, cx.device)?))
        }
        None => (Vec::new(), None),
    };
    Ok(PruneSummary {
        sensitivity,
        tickets: out.tickets.iter().map(|(s, r)| (*s, r.as_ref().map(|r| r.train_accuracy))).collect(),
        sparse_kernels,
        sparse_test,
        method: method(stage, settings),
        execution: execution(settings.granularity),
        events: out.events.clone(),
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
                        let before = first.iter().find(|f| f.group == p.group).map_or(p.channels, |f| f.channels);
                        (p.producers.join(", "), before, p.keep.len())
                    })
                    .collect()
            })
            .unwrap_or_default(),
        layers_before: before.stats.layers,
        params_before: before.stats.params,
        nonzeros_before: before.stats.nonzeros,
        macs_before: before.stats.macs,
        file_bytes_before: before.file_bytes,
        test_before: before.test,
        latency_before: before.latency,
    })
}

/// One line: what was removed, ranked how, in which scope, when, and the fine-tuning.
fn method(stage: &PruneStage, settings: &PruneSettings) -> String {
    // The scope as written: a top-1 budget turns a layer scope's settings into overrides.
    let scope = if stage.settings.global {
        format!(
            "global ranking (each layer between {} and {})",
            settings.min_layer_sparsity, settings.max_layer_sparsity
        )
    } else {
        "the same sparsity in each layer".into()
    };
    let what = match settings.granularity {
        Granularity::Weights => format!("{:.0} % of the weights", settings.sparsity * 100.0),
        Granularity::Channels => format!("{:.0} % of the channels, removed physically", settings.sparsity * 100.0),
        Granularity::NOfM { n, m } => format!("{n}:{m} semi-structured"),
    };
    let tuning = match &stage.fine_tune {
        Some(t) => format!("fine-tuned {} epoch(s)", t.epochs),
        None => "no fine-tuning".into(),
    };
    let skipped =
        if settings.skip.is_empty() { String::new() } else { format!("; left dense: {}", settings.skip.join(", ")) };
    format!("{what}, ranked by {}, {scope}, schedule {}, {tuning}{skipped}", settings.criterion, stage.schedule)
}

/// How the pruned model runs and is stored.
fn execution(granularity: Granularity) -> String {
    if granularity == Granularity::Channels {
        "removed channels are gone: smaller dense tensors in the model file, in burn and in the CPU plan".into()
    } else {
        format!(
            "the model file stores each weight with at most {:.0} % non-zeros as a bitmask and its non-zero values; in the CPU plan (`cpu-plan-sparse`), layers with at most {:.0} % non-zero weights run on CSR sparse kernels, the others dense; burn and `cpu-plan` compute the zeros densely",
            io::SPARSE_FILE_MAX_DENSITY * 100.0,
            shrink_prune::SPARSE_MAX_DENSITY * 100.0
        )
    }
}
