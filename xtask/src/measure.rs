//! What every stage ends with: the model measured — test metrics (on the integer kernels once it
//! is quantized) and, with a validation split, validation metrics on the same kernels, size,
//! cost, latency on each runner — into the stage's report.

use anyhow::Result;
use shrink_core::graph::Graph;
use shrink_core::io;
use shrink_core::metrics::{
    Latency, ModelStats, measure_frozen_latency, measure_latency, measure_plan_latency, model_stats,
};
use shrink_core::train::{Evaluation, evaluate, evaluate_plan, evaluate_with};
use shrink_quant::QuantizedModel;

use crate::report::StageReport;
use crate::stages::{RunState, StageContext};

/// Measures the model `state` holds after a stage into `report`, evaluating `batch` images at a
/// time.
///
/// # Errors
/// From evaluation, freezing or latency measurement.
pub fn after_stage(cx: &StageContext<'_>, state: &RunState, batch: usize, report: &mut StageReport) -> Result<()> {
    let backend = cx.plan.backend;
    let (eval, stats, latency) = match &state.quantized {
        Some(q) => {
            // The simulated accuracy is reported by the quantizing stage only.
            let simulate = report.quantization.is_some();
            let (integer, validation, simulated, stats, latency) = quantized(cx, q, batch, simulate)?;
            report.validation = validation;
            if let (Some(summary), Some(simulated)) = (report.quantization.as_mut(), simulated) {
                summary.simulated_test = simulated;
                summary.simulated_on = backend.runner_label().into();
            }
            report.evaluated_on = "cpu-plan-int8".into();
            report.file_bytes = q.to_bytes()?.len();
            (integer, stats, latency)
        }
        None => {
            report.evaluated_on = backend.runner_label().into();
            report.file_bytes = io::to_bytes(&state.graph)?.len();
            let (eval, validation, stats, latency) = float(cx, &state.graph, batch)?;
            report.validation = validation;
            (eval, stats, latency)
        }
    };
    tracing::info!(top1 = eval.top1, params = stats.params, macs = stats.macs, "stage measured");
    report.set_measurements(eval, stats, latency);
    Ok(())
}

/// A float model: test (and validation) metrics on the run's backend, size, cost, and latency of
/// burn's forward, the f32 plan and, when layers are sparse enough, the sparse plan.
fn float(
    cx: &StageContext<'_>,
    graph: &Graph,
    batch: usize,
) -> Result<(Evaluation, Option<Evaluation>, ModelStats, Vec<Latency>)> {
    let (plan, data) = (cx.plan, cx.data);
    let eval = evaluate(graph, &data.test, &data.batcher, batch, cx.device)?;
    let validation =
        data.validation.as_ref().map(|v| evaluate(graph, v, &data.batcher, batch, cx.device)).transpose()?;
    let stats = model_stats(graph)?;
    let mut latency = measure_latency(graph, plan.backend, &plan.latency)?;
    latency.extend(measure_plan_latency(graph, plan.threads, &plan.latency)?);
    // Pruned weights: also the plan whose sparse-enough layers run on the sparse kernels.
    if let Some(mut sparse) = sparse_plan(graph, plan.threads)? {
        latency.extend(measure_frozen_latency(&mut sparse, graph.input_shape(), "cpu-plan-sparse", &plan.latency)?);
    }
    Ok((eval, validation, stats, latency))
}

/// A quantized model: test (and validation) metrics on the integer plan (and, with `simulate`,
/// test metrics on burn with fake-quant), size, cost, and latency of burn's forward, the f32 plan
/// and the integer plan.
#[allow(clippy::type_complexity)]
fn quantized(
    cx: &StageContext<'_>,
    q: &QuantizedModel,
    batch: usize,
    simulate: bool,
) -> Result<(Evaluation, Option<Evaluation>, Option<Evaluation>, ModelStats, Vec<Latency>)> {
    let (plan, data, device) = (cx.plan, cx.data, cx.device);
    let mut int8 = q.freeze(plan.threads)?;
    let integer = evaluate_plan(&mut int8, &data.test, &data.batcher, batch, device)?;
    let validation =
        data.validation.as_ref().map(|v| evaluate_plan(&mut int8, v, &data.batcher, batch, device)).transpose()?;
    let classes = q.graph.num_outputs();
    let simulated = simulate
        .then(|| evaluate_with(&data.test, &data.batcher, batch, classes, device, &mut |x| Ok(q.forward_simulated(x))))
        .transpose()?;
    let stats = model_stats(&q.graph)?;
    let mut latency = measure_latency(&q.graph, plan.backend, &plan.latency)?;
    latency.extend(measure_plan_latency(&q.graph, plan.threads, &plan.latency)?);
    latency.extend(measure_frozen_latency(&mut int8, q.graph.input_shape(), "cpu-plan-int8", &plan.latency)?);
    Ok((integer, validation, simulated, stats, latency))
}

/// The CPU plan of `graph` with shrink-prune's sparse kernels, if any layer is sparse enough to
/// run on them.
pub fn sparse_plan(graph: &Graph, threads: usize) -> Result<Option<shrink_core::runtime::Plan>> {
    let plan = shrink_core::runtime::freeze_with(
        graph,
        &shrink_prune::sparse_registry(),
        &shrink_core::runtime::FreezeOptions { threads },
    )?;
    Ok(plan.kernels().iter().any(|(_, k)| k.contains("spmm")).then_some(plan))
}
