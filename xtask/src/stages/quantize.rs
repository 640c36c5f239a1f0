//! The quantize stage: post-training quantization (static or dynamic) of the current model, its
//! summary, and optionally each layer's sensitivity measured on the integer kernels. Also the
//! pieces the qat stage shares: calibration images and the quantization summary.

use anyhow::{Context, Result};
use shrink_core::graph::Graph;
use shrink_core::io;
use shrink_core::train::{Evaluation, evaluate_plan};
use shrink_quant::{ActivationType, QuantizedModel, quantize_static};

use super::{RunState, StageContext};
use crate::plan::{Calibration, QuantizeStage};
use crate::progress::calibration_bar;
use crate::report::{QuantSummary, Sensitivity, StageReport, write_sensitivity_chart};

pub fn run(stage: &QuantizeStage, cx: &StageContext<'_>, state: &mut RunState, report: &mut StageReport) -> Result<()> {
    let ptq = &stage.ptq;
    // Dynamic quantization calibrates nothing: no batch is even drawn.
    let wanted = Calibration { batches: if ptq.dynamic { 0 } else { stage.calibration.batches }, ..stage.calibration };
    let chunks = calibration_chunks(cx, wanted);
    let images: usize = chunks.iter().map(|c| c.len()).sum();
    let bar = calibration_bar(cx.opts.progress, chunks.len());
    let mut batches = chunks.iter().map(|c| {
        bar.as_ref().inspect(|b| b.inc(1));
        cx.data.batcher.batch(&cx.data.train, c, cx.device, None).0
    });
    let index = cx.index;
    let q = quantize_static(&state.graph, &mut batches, ptq).with_context(|| format!("stage {index} (quantize)"))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    tracing::info!(layers = q.layers.len(), float = q.float_layers.len(), images, "quantized");
    let dynamic = ptq.dynamic;
    let mut weights = weights_text(ptq.weight_bits, ptq.per_channel, ptq.asymmetric_weights, false);
    if !q.equalized.is_empty() {
        weights += &format!(", cross-layer equalized ({} layer pairs)", q.equalized.len());
    }
    if let (Some(a), false) = (&ptq.adaround, dynamic) {
        weights += &format!(
            ", rounding learned by AdaRound ({} steps per layer on {} calibration images)",
            a.iterations, a.images
        );
    }
    if ptq.bias_correction && !dynamic {
        weights += ", biases corrected for the rounding's mean shift";
    }
    let mut summary = quant_summary(
        &q,
        &state.graph,
        if dynamic { "dynamic post-training" } else { "static post-training" }.into(),
        weights,
        if dynamic {
            "u8 asymmetric, per tensor, range measured on each batch at run time".into()
        } else {
            activations_text(ptq.activations)
        },
        if dynamic { "none (dynamic)".into() } else { format!("{:?}", ptq.calibrator) },
        images,
    )?;
    if stage.sensitivity {
        summary.sensitivity = Some(sensitivity(cx, &state.graph, &q)?);
    }
    report.quantization = Some(summary);
    state.quantized = Some(q);
    Ok(())
}

/// Quantizes one layer at a time (the others f32) and measures each on the integer plan — on the
/// validation split when the config has one (a search orders layers by it, and must not look at
/// the test images), else on the test images; draws the chart into the run directory.
fn sensitivity(cx: &StageContext<'_>, original: &Graph, q: &QuantizedModel) -> Result<Sensitivity> {
    let (device, threads) = (cx.device, cx.plan.threads);
    let (images, split) = match &cx.data.validation {
        Some(v) => (v, "validation"),
        None => (&cx.data.test, "test"),
    };
    let (folded, _) = original.clone().fold_batch_norms()?;
    let mut f32_plan = shrink_core::runtime::freeze_with(
        &folded,
        &shrink_core::runtime::KernelRegistry::default(),
        &shrink_core::runtime::FreezeOptions { threads },
    )?;
    let reference = evaluate_plan(&mut f32_plan, images, &cx.data.batcher, 250, device)?;
    let mut layers = Vec::new();
    for name in q.layers.keys() {
        let one = q.with_only(original, name)?;
        let eval = evaluate_plan(&mut one.freeze(threads)?, images, &cx.data.batcher, 250, device)?;
        tracing::info!(layer = %name, top1 = eval.top1, loss = eval.loss, "sensitivity");
        layers.push((name.clone(), eval.top1, eval.loss));
    }
    layers.sort_by(|a, b| b.2.total_cmp(&a.2));
    let chart = format!("sensitivity_stage{}.svg", cx.index);
    let sens = Sensitivity {
        reference_top1: reference.top1,
        reference_loss: reference.loss,
        layers,
        chart,
        split: split.into(),
    };
    write_sensitivity_chart(&cx.plan.name, &sens, &cx.run_dir.join(&sens.chart))?;
    Ok(sens)
}

/// Calibration images: `batches` chunks of `batch_size` from a seeded shuffle of the training set.
pub(super) fn calibration_chunks(cx: &StageContext<'_>, c: Calibration) -> Vec<Vec<usize>> {
    let order = shrink_core::data::shuffled(cx.data.train.len(), cx.plan.seed ^ 0x7175);
    order.chunks(c.batch_size.max(1)).take(c.batches).map(|c| c.to_vec()).collect()
}

pub(super) fn weights_text(bits: u32, per_channel: bool, asymmetric: bool, learned: bool) -> String {
    format!(
        "int{bits} weights, {}, {}{} (batch norms folded first)",
        if asymmetric { "asymmetric" } else { "symmetric" },
        if per_channel { "per output channel" } else { "per layer" },
        if learned { ", scales learned" } else { "" }
    )
}

/// How a static quantize or a qat stage stores activations, for the report.
pub(super) fn activations_text(activations: ActivationType) -> String {
    match activations {
        ActivationType::U8 => "u8 asymmetric, per tensor, at the input of each quantized layer".into(),
        ActivationType::I8 => {
            "i8 symmetric, per tensor, at the input of each quantized layer (run as u8 with zero point 128)".into()
        }
    }
}

/// The report's summary of a quantized model (the measured accuracies are filled in later).
pub(super) fn quant_summary(
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
