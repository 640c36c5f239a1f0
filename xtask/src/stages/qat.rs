//! The qat stage: post-training quantization with the same settings for comparison, then
//! quantization-aware training of the current model into an integer model.

use std::time::Instant;

use anyhow::{Context, Result};
use shrink_core::train::{TrainRun, evaluate_plan};
use shrink_quant::{quantization_aware_training, quantize_static};

use super::quantize::{activations_text, calibration_chunks, quant_summary, weights_text};
use super::{RunState, StageContext};
use crate::plan::QatStage;
use crate::progress::{Progress, calibration_bar};
use crate::report::StageReport;

pub fn run(stage: &QatStage, cx: &StageContext<'_>, state: &mut RunState, report: &mut StageReport) -> Result<()> {
    let (qat, data, device, index) = (&stage.qat, cx.data, cx.device, cx.index);
    // The calibration images, assembled once for both the comparison and QAT.
    let bar = calibration_bar(cx.opts.progress, stage.calibration.batches);
    let images: Vec<_> = calibration_chunks(cx, stage.calibration)
        .iter()
        .map(|c| {
            bar.as_ref().inspect(|b| b.inc(1));
            data.batcher.batch(&data.train, c, device, None).0
        })
        .collect();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // Post-training quantization with the same settings, for comparison.
    let post = quantize_static(&state.graph, &mut images.iter().cloned(), &qat.ptq)
        .with_context(|| format!("stage {index} (qat): post-training quantization for comparison"))?;
    let ptq_test = evaluate_plan(&mut post.freeze(cx.plan.threads)?, &data.test, &data.batcher, 250, device)?;
    tracing::info!(top1 = ptq_test.top1, "post-training quantization with the same settings");
    let mut progress = Progress::new(cx.opts.progress, qat.train.epochs, "qat");
    let t0 = Instant::now();
    let run = TrainRun { device, seed: cx.stage_seed(), observer: &mut progress };
    let out = quantization_aware_training(&state.graph, &mut images.into_iter(), data.train_data(), qat, run)
        .with_context(|| format!("stage {index} (qat)"))?;
    progress.finish();
    report.history = out.history;
    report.train_seconds = Some(t0.elapsed().as_secs_f64());
    let taught = qat
        .distill
        .map(|d| format!(", distilled from the f32 model (T = {}, α = {})", d.temperature, d.alpha))
        .unwrap_or_default();
    let method = if qat.learn_scales {
        "quantization-aware training, learned scales (LSQ)".to_string()
    } else {
        match qat.freeze_observers_epoch {
            Some(f) => format!(
                "quantization-aware training, scales from the data (activation observers frozen after epoch {f})"
            ),
            None => "quantization-aware training, scales from the data".to_string(),
        }
    };
    let mut summary = quant_summary(
        &out.model,
        &state.graph,
        method + &taught,
        weights_text(qat.ptq.weight_bits, qat.ptq.per_channel, false, qat.learn_scales),
        activations_text(qat.ptq.activations),
        format!("{:?} (initial ranges)", qat.ptq.calibrator),
        out.calibration_images,
    )?;
    summary.ptq_test = Some(ptq_test);
    report.quantization = Some(summary);
    state.quantized = Some(out.model);
    Ok(())
}
