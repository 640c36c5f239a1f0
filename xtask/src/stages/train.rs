//! The train stage: the first one of a fresh model trains (or reuses) the cached baseline;
//! later ones train the current model further.

use std::time::Instant;

use anyhow::Result;
use shrink_core::train::train;

use super::{RunState, StageContext};
use crate::plan::TrainStage;
use crate::progress::Progress;
use crate::report::StageReport;

pub fn run(stage: &TrainStage, cx: &StageContext<'_>, state: &mut RunState, report: &mut StageReport) -> Result<()> {
    if state.fresh {
        let t = crate::cache::train_cached(cx, &cx.plan.model, cx.plan.seed, &stage.train, cx.index, "baseline")?;
        if t.reused {
            report.cached_baseline = Some(t.key);
        } else {
            report.cache_key = Some(t.key);
        }
        state.graph = t.graph;
        report.history = t.history;
        report.train_seconds = Some(t.train_seconds);
        state.fresh = false;
    } else {
        let mut progress = Progress::new(cx.opts.progress, stage.train.epochs, "train");
        let t0 = Instant::now();
        let (trained, history) =
            train(state.graph.clone(), cx.data.train_data(), &stage.train, cx.device, cx.stage_seed(), &mut progress)?;
        progress.finish();
        state.graph = trained;
        report.history = history;
        report.train_seconds = Some(t0.elapsed().as_secs_f64());
    }
    state.uncompressed = Some(state.graph.clone());
    Ok(())
}
